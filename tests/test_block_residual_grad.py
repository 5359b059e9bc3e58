"""hrm.layers.linear_keep_input, its MLP form, and Block.FUSED_GRAD_RESIDUAL: the residual branch's
gradient added inside the input projection's gradient matmul gives autograd's gradients (odd widths)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from hrm import layers
from hrm.layers import Attention, Block, RotaryEmbedding, linear_keep_input, linear_rope_keep_input
from hrm_kernels import _gluon_gemm, linear_swiglu_reference, use_backend
from hrm_kernels.backend import triton_can_run
from tests.reference64 import linear_swiglu64
from tests.tolerance import assert_close_to_reference


@pytest.mark.parametrize("use", ["both", "projection", "kept", "kept_strided"])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_linear_keep_input_gradients(use, weight_grad):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 37, dtype=torch.float64, requires_grad=True)
    w = torch.randn(123, 37, dtype=torch.float64, requires_grad=weight_grad)
    a, b = torch.randn(3, 7, 123, dtype=torch.float64), torch.randn(3, 7, 37, dtype=torch.float64)
    b_strided = torch.randn(37, 7, 3, dtype=torch.float64).permute(2, 1, 0)

    def loss(y, kept):
        if use == "kept_strided":  # the kept input's gradient arrives non-contiguous (a permuted b)
            return (y * a).sum() + (kept * b_strided).sum()
        return (((y * a).sum() if use != "kept" else 0) + ((kept.tanh() * b).sum() if use != "projection" else 0))

    y, kept = linear_keep_input(x, w)
    torch.testing.assert_close(y, F.linear(x, w), rtol=0, atol=0)
    torch.testing.assert_close(kept, x, rtol=0, atol=0)
    got = torch.autograd.grad(loss(y, kept), [x, w] if weight_grad else [x])
    want = torch.autograd.grad(loss(F.linear(x, w), x), [x, w] if weight_grad else [x], allow_unused=True)
    for g, r in zip(got, want):  # an unused projection: autograd gives None, the Function zeros
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, rtol=1e-12, atol=1e-12)


def test_linear_rope_keep_input_gradients(monkeypatch):
    """``linear_rope_keep_input``'s backward (rope_qkv's gradient kernel, then the keep-input matmuls)
    against autograd of the same composition (F.linear, rope_qkv_reference), with the Gluon GEMM's
    forward replaced by that composition (it runs on Hopper only; its GPU test is below): the
    gradients of x (both uses) and of w, fp32, 2 x 11 tokens, 2 heads of 16, half tables. On CUDA
    where there is one (the gradient kernel compiled), else on the CPU (the interpreter)."""
    from hrm_kernels import first_halves, rope_qkv_reference

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, seq, heads, head_dim, width_in = 2, 11, 2, 16, 24
    cos, sin = first_halves(*RotaryEmbedding(head_dim, 16, 10000.0).to(device)())

    def reference(x, w):
        q, k, v = rope_qkv_reference(F.linear(x, w).view(batch, seq, 3 * heads, head_dim), cos, sin)
        return torch.cat((q, k, v), dim=2).reshape(batch, seq, -1)

    def fake_gemm(x2, w, epilogue, rope):  # what the "rope" epilogue computes
        assert epilogue == "rope" and rope[2:] == (seq, head_dim)
        return reference(x2.view(batch, seq, -1), w).reshape(x2.shape[0], -1)

    monkeypatch.setattr(_gluon_gemm, "gemm", fake_gemm)
    x = torch.randn(batch, seq, width_in, device=device, requires_grad=True)
    w = torch.randn(3 * heads * head_dim, width_in, device=device, requires_grad=True)
    g_y = torch.randn(batch, seq, 3 * heads * head_dim, device=device)
    g_x = torch.randn(batch, seq, width_in, device=device)
    y, kept = linear_rope_keep_input(x, w, (cos, sin, seq, head_dim))
    got = torch.autograd.grad((y * g_y).sum() + (kept * g_x).sum(), [x, w])
    y_ref = reference(x, w)
    want = torch.autograd.grad((y_ref * g_y).sum() + (x * g_x).sum(), [x, w])
    torch.testing.assert_close(y, y_ref)
    for name, a, b in zip(("x", "w"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("use", ["both", "mlp", "kept_strided", "summed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_swiglu_mlp_keep_input_gradients(use, dtype):
    """``_SwiGLUMLPKeepInput`` (the MLP whose gate_up kernel keeps gate_up, with its input handed on):
    output and the three gradients against float64 at odd widths (in and out 40, I 37), within a
    multiple of the same-precision eager composition's error. On CUDA the kernels (on Hopper with
    ``GLUON_KEEPS_GATE_UP`` the Gluon GEMM only where I is a multiple of 8, so not here: the GPU
    test of the Block covers it), else the interpreter's."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not triton_can_run(device):
        pytest.skip("Triton cannot run here (no CUDA and TRITON_INTERPRET unset)")
    torch.manual_seed(2)
    x = torch.randn(3, 7, 40, device=device).to(dtype)
    w_gate_up = (torch.randn(2 * 37, 40, device=device) / 40 ** 0.5).to(dtype)
    w_down = (torch.randn(40, 37, device=device) / 37 ** 0.5).to(dtype)  # out = in, as in a block
    a, b = torch.randn(3, 7, 40, device=device), torch.randn(3, 7, 40, device=device)
    b_strided = torch.randn(40, 7, 3, device=device).permute(2, 1, 0)

    def grads(fn, x, w1, w2):
        x, w1, w2 = (t.detach().clone().requires_grad_() for t in (x, w1, w2))
        y, kept = fn(x, w1, w2)
        loss = (y.double() * a.double()).sum()  # "mlp": the kept input unused (autograd hands in zeros)
        if use == "both":
            loss = loss + (kept.double().tanh() * b.double()).sum()
        elif use == "kept_strided":  # its gradient arrives non-contiguous
            loss = loss + (kept.double() * b_strided.double()).sum()
        elif use == "summed":  # the two outputs meet in one add (the block's add+RMSNorm): autograd
            loss = ((y + kept).double() * a.double()).sum()  # hands both one gradient tensor
        return (y.detach(), *torch.autograd.grad(loss, (x, w1, w2)))

    def eager(x, w1, w2):
        return F.linear(linear_swiglu_reference(x, w1), w2), x

    def reference(x, w1, w2):
        return F.linear(linear_swiglu64(x, w1), w2.double()), x.double()

    with use_backend("triton"):
        got = grads(layers._SwiGLUMLPKeepInput.apply, x, w_gate_up, w_down)
    want = grads(eager, x, w_gate_up, w_down)
    ref = grads(reference, x.double(), w_gate_up.double(), w_down.double())
    for name, g, e, r in zip(("y", "dx", "dw_gate_up", "dw_down"), got, want, ref):
        assert g.dtype == dtype
        assert_close_to_reference(f"swiglu mlp keep input {dtype} {use} {name}", g, e, r)


def _small_block(backend: str, seed: int, requires_grad: bool):
    """(block, cos_sin, h, dout): a float32 block at odd widths (hidden 40, 2 heads, MLP 76) on
    CUDA when present, its RoPE tables, an input [2, 11, 40] and an output gradient."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if backend == "triton" and not triton_can_run(device):
        pytest.skip("Triton cannot run here (no CUDA and TRITON_INTERPRET unset)")
    torch.manual_seed(seed)
    block = Block(hidden_size=40, num_heads=2, intermediate_size=76, eps=1e-5, attn_backend="sdpa").to(device)
    cos_sin = RotaryEmbedding(20, 16, 10000.0).to(device)()
    h = torch.randn(2, 11, 40, device=device, requires_grad=requires_grad)
    return block, cos_sin, h, torch.randn(2, 11, 40, device=device)


@pytest.mark.parametrize("input_also_used", [False, True])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_block_fused_residual_gradient_equals_autograd(monkeypatch, backend, input_also_used):
    """A block's output and every gradient (input and parameters), switch on vs off, float32: the
    same math, the fused path rounding the two-term sum once instead of twice (differences of a
    few float32 ulps of the gradient's scale). On the Triton kernels the add+RMSNorm's backward
    hands one tensor to both of its inputs: the in-place sum must not disturb the sublayer's use of it.
    ``input_also_used``: the block's input feeds another branch too (its gradients meet autograd's sum)."""
    block, cos_sin, h, dout = _small_block(backend, seed=1, requires_grad=True)
    c = torch.randn_like(dout)
    calls = []
    monkeypatch.setattr(layers, "linear_keep_input", lambda x, w: calls.append(1) or linear_keep_input(x, w))
    results = []
    with use_backend(backend):
        for fused in (False, True):
            monkeypatch.setattr(Block, "FUSED_GRAD_RESIDUAL", fused)
            out = block(h, cos_sin)
            loss = (out * dout).sum() + ((h.tanh() * c).sum() if input_also_used else 0)
            results.append((out, torch.autograd.grad(loss, [h, *block.parameters()])))
            assert len(calls) == (2 if fused else 0)  # the path under test ran (once per sublayer)
    (out0, grads0), (out1, grads1) = results
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)  # the forward is the same computation
    for (name, _), g1, g0 in zip([("h", h), *block.named_parameters()], grads1, grads0):
        torch.testing.assert_close(g1, g0, rtol=0, atol=20 * torch.finfo(torch.float32).eps * g0.abs().max().item(),
                                   msg=name)



requires_gluon = pytest.mark.skipif(not (torch.cuda.is_available() and _gluon_gemm.available(torch.device("cuda"))),
                                    reason="the Gluon GEMM runs on a Hopper GPU")


def _block_switch_ab(monkeypatch, block, cos_sin, h32, switch: tuple, epilogue: str, name: str):
    """A bf16 block's output and gradients with ``switch`` (owner, attribute) off, then on, counting the
    Gluon GEMM launches with ``epilogue`` (none off, one on), each within 3x the switch-off path's
    error against the same block in fp32."""
    dout = torch.randn_like(h32)
    calls = []
    gemm = _gluon_gemm.gemm
    monkeypatch.setattr(_gluon_gemm, "gemm", lambda *a, **k: calls.append(a[2] if len(a) > 2 else k.get("epilogue"))
                        or gemm(*a, **k))

    def run(h):
        h = h.detach().clone().requires_grad_()
        out = block(h, cos_sin)
        return (out.detach(), *torch.autograd.grad((out.float() * dout).sum(), [h, *block.parameters()]))

    with use_backend("triton"):
        ref = run(h32)
        monkeypatch.setattr(*switch, False)
        off = run(h32.bfloat16())
        assert epilogue not in calls
        monkeypatch.setattr(*switch, True)
        on = run(h32.bfloat16())
        assert calls.count(epilogue) == 1
    for param, g, e, r in zip(["out", "h", *(n for n, _ in block.named_parameters())], on, off, ref):
        assert_close_to_reference(f"{name} {param}", g.float(), e.float(), r, factor=3.0)


@requires_gluon
def test_block_with_gluon_gate_up_keeping_gradient(monkeypatch):
    """``linear_swiglu.GLUON_KEEPS_GATE_UP`` on: a bf16 block's MLP with a gradient runs the Gluon
    "swiglu_keep" GEMM (counted: the block's one MLP), and its output and every gradient stay within
    a multiple of the switch-off path's error against the same block in fp32 (hidden 64, I 120: not a
    tile multiple)."""
    torch.manual_seed(3)
    block = Block(hidden_size=64, num_heads=2, intermediate_size=120, eps=1e-5, attn_backend="sdpa").cuda()
    _block_switch_ab(monkeypatch, block, RotaryEmbedding(32, 16, 10000.0).cuda()(), torch.randn(2, 13, 64, device="cuda"),
                     (importlib.import_module("hrm_kernels.linear_swiglu"), "GLUON_KEEPS_GATE_UP"), "swiglu_keep",
                     "block gluon keep")


@requires_gluon
@pytest.mark.parametrize("head_dim", [32, 64])
def test_block_with_rope_in_the_qkv_matmul_with_gradient(monkeypatch, head_dim):
    """``Attention.ROPE_IN_QKV_GRAD`` on: a bf16 block past rope_attention's fused length (131 tokens)
    with a gradient rotates q and k in the qkv GEMM's "rope" epilogue (counted: the block's one qkv
    projection) and rope_qkv's gradient kernel transposes it; its output and every gradient stay
    within a multiple of the switch-off path's error (rope_qkv + attention) against the same block
    in fp32."""
    torch.manual_seed(5)
    block = Block(hidden_size=2 * head_dim, num_heads=2, intermediate_size=120, eps=1e-5, attn_backend="sdpa").cuda()
    _block_switch_ab(monkeypatch, block, RotaryEmbedding(head_dim, 140, 10000.0).cuda()(),
                     torch.randn(2, 131, 2 * head_dim, device="cuda"), (Attention, "ROPE_IN_QKV_GRAD"), "rope",
                     "block rope in qkv grad")

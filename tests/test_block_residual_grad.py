"""hrm.layers.linear_keep_input and Block.FUSED_GRAD_RESIDUAL: the residual branch's gradient added
inside the input projection's gradient matmul gives autograd's gradients (odd widths); and
hrm.layers.linear_add and Block.RESIDUAL_IN_MATMUL: the residual added inside the output
projection's matmul gives the two-step block's output and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hrm import layers
from hrm.layers import Block, RotaryEmbedding, linear_add, linear_keep_input
from hrm_kernels import use_backend
from hrm_kernels.backend import triton_can_run


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


@pytest.mark.parametrize("weight_grad", [True, False])
def test_linear_add_equals_its_two_step_form(weight_grad):
    """hrm.layers.linear_add: ``residual + F.linear(x, w)`` and all three gradients, float64, odd widths."""
    torch.manual_seed(2)
    x = torch.randn(3, 7, 37, dtype=torch.float64, requires_grad=True)
    w = torch.randn(123, 37, dtype=torch.float64, requires_grad=weight_grad)
    r = torch.randn(3, 7, 123, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(3, 7, 123, dtype=torch.float64)
    inputs = [x, r, w] if weight_grad else [x, r]
    got = layers.linear_add(x, w, r)
    want = r + F.linear(x, w)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    for g, e in zip(torch.autograd.grad((got * dout).sum(), inputs), torch.autograd.grad((want * dout).sum(), inputs)):
        torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("mode", ["no_grad", "grad", "grad_without_fused_residual"])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_block_residual_in_matmul_equals_switch_off(monkeypatch, backend, mode):
    """Block.RESIDUAL_IN_MATMUL: the block's output and every gradient equal the switch-off
    block's, float32, odd widths; the residual is added inside the two output projections'
    matmuls (``linear_add`` runs twice). The same math with the sum rounded at another point:
    differences of a few float32 ulps of each tensor's scale."""
    block, cos_sin, h, dout = _small_block(backend, seed=3, requires_grad=mode != "no_grad")
    monkeypatch.setattr(Block, "FUSED_GRAD_RESIDUAL", mode == "grad")
    calls = []
    monkeypatch.setattr(layers, "linear_add", lambda x, w, r: calls.append(1) or linear_add(x, w, r))
    results = []
    with use_backend(backend), torch.set_grad_enabled(mode != "no_grad"):
        for on in (False, True):
            monkeypatch.setattr(Block, "RESIDUAL_IN_MATMUL", on)
            out = block(h, cos_sin)
            grads = torch.autograd.grad((out * dout).sum(), [h, *block.parameters()]) if mode != "no_grad" else ()
            results.append((out, grads))
            assert len(calls) == (2 if on else 0)  # the path under test ran (once per sublayer)
    (out0, grads0), (out1, grads1) = results
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(out1, out0, rtol=0, atol=20 * eps * out0.abs().max().item())
    for (name, _), g1, g0 in zip([("h", h), *block.named_parameters()], grads1, grads0):
        torch.testing.assert_close(g1, g0, rtol=0, atol=50 * eps * g0.abs().max().item(), msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 matmuls through cuBLAS: CUDA only")
@pytest.mark.parametrize("fused_residual_grad", [True, False])
def test_block_residual_in_matmul_bf16_error(monkeypatch, fused_residual_grad):
    """bf16 on the GPU, hidden 512 (HRM's): with RESIDUAL_IN_MATMUL the block's output and input
    gradient are as close to float64 as the switch-off block's (at most 1.5x its max error)."""
    torch.manual_seed(4)
    device = torch.device("cuda")
    block = Block(hidden_size=512, num_heads=8, intermediate_size=1536, eps=1e-5, attn_backend="sdpa").to(device)
    cos_sin = RotaryEmbedding(64, 96, 10000.0).to(device)()
    h64 = torch.randn(4, 81, 512, device=device, dtype=torch.float64)
    dout64 = torch.randn_like(h64)
    monkeypatch.setattr(Block, "FUSED_GRAD_RESIDUAL", fused_residual_grad)

    def run(dtype, on):
        monkeypatch.setattr(Block, "RESIDUAL_IN_MATMUL", on)
        h = h64.to(dtype).requires_grad_()
        with torch.autocast("cuda", enabled=False):
            out = block(h, cos_sin)
            (dh,) = torch.autograd.grad((out * dout64.to(dtype)).sum(), [h])
        return out.double(), dh.double()

    with use_backend("eager"):  # float64 through PyTorch's own ops
        ref = run(torch.float64, False)
    off, on = run(torch.bfloat16, False), run(torch.bfloat16, True)
    for name, r, a, b in zip(("out", "dh"), ref, off, on):
        err_off, err_on = (a - r).abs().max().item(), (b - r).abs().max().item()
        assert err_on <= 1.5 * err_off, f"{name}: max error {err_on:.3g} with the switch, {err_off:.3g} without"

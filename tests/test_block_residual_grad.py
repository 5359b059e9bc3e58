"""hrm.layers.linear_keep_input and Block.FUSED_GRAD_RESIDUAL: the residual branch's gradient added
inside the input projection's gradient matmul gives autograd's gradients (odd widths)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hrm import layers
from hrm.layers import Block, RotaryEmbedding, linear_keep_input
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


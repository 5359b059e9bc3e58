"""Output projection + residual add + RMSNorm in one kernel: against float64 at odd sizes (several
column and K tiles, rows not filling a tile), the kernel really running, fallbacks (unaligned K,
gradients), the model's block, clear errors."""

import importlib

import pytest
import torch

from hrm_kernels import linear_add_rms_norm, linear_add_rms_norm_reference, use_backend
from tests.conftest import CUDA, DEVICE, record_calls
from tests.reference64 import assert_float32_math, linear_add_rms_norm64, rms_norm64, rope_attention64, swiglu_linear64
from tests.tolerance import assert_close_to_reference

kernel_module = importlib.import_module("hrm_kernels.linear_add_rms_norm")

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# (M, K, N): N over several column tiles and not a multiple of one, K over two K tiles, a single
# row, more row tiles than programs (each program's persistent loop runs several times: 9 tiles
# over the interpreter's 4 programs, 157 over an H100's 132); HRM's o_proj and down_proj.
SHAPES = [(37, 48, 80), (19, 64, 40), (1, 32, 16), (131, 48, 80)] + (
    [(20000, 512, 512), (1000, 1536, 512)] if CUDA else [])


def _inputs(m, k, n, dtype):
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    weight = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    residual = torch.randn(m, n, device=DEVICE, dtype=dtype)
    return x, weight, residual


def _spy(monkeypatch):
    return record_calls(monkeypatch, kernel_module, "_launch")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_float64(shape, dtype, monkeypatch):
    if not CUDA:  # the interpreter must run the kernel, or CI would test only the fallback
        assert kernel_module.tma_available(DEVICE)
    x, weight, residual = _inputs(*shape, dtype)
    calls = _spy(monkeypatch)
    with use_backend("triton"), torch.no_grad():
        got = linear_add_rms_norm(x, weight, residual, eps=1e-5)
    if kernel_module.tma_available(DEVICE):
        assert calls == [True], "the fused kernel did not run"
    assert got.shape == residual.shape and got.dtype == dtype
    eager = linear_add_rms_norm_reference(x, weight, residual)
    ref = linear_add_rms_norm64(x, weight, residual)
    assert_close_to_reference(f"{dtype} {shape}", got, eager, ref)
    # Unit RMS per row, up to the output rounding: the norm really ran over whole rows.
    rms = got.double().square().mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=2e-2, rtol=0)


def test_leading_dims_and_unaligned_fallback(monkeypatch):
    """[B, S, K] inputs as the model passes them; K = 123 (rows not 16-byte aligned for TMA) runs
    as F.linear + rms_norm with the same result."""
    for k, fused in ((64, True), (123, False)):
        x = torch.randn(2, 7, k, device=DEVICE, dtype=torch.float16)
        weight = (torch.randn(24, k, device=DEVICE) / k ** 0.5).half()
        residual = torch.randn(2, 7, 24, device=DEVICE, dtype=torch.float16)
        calls = _spy(monkeypatch)
        with use_backend("triton"), torch.no_grad():
            got = linear_add_rms_norm(x, weight, residual)
        if kernel_module.tma_available(DEVICE):
            assert calls == ([True] if fused else [])
        ref = linear_add_rms_norm64(x, weight, residual)
        assert_close_to_reference(f"k={k}", got, linear_add_rms_norm_reference(x, weight, residual), ref)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_gradients(backend):
    """With a gradient the op is F.linear + rms_norm: all three gradients against float64."""
    x, weight, residual = _inputs(13, 32, 24, torch.float32)
    dout = torch.randn(13, 24, device=DEVICE)

    def run(fn, *tensors):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*tensors)
        out.backward(dout.to(out.dtype))
        return [out.detach()] + [t.grad for t in tensors]

    with use_backend(backend):
        got = run(linear_add_rms_norm, x, weight, residual)
    eager = run(linear_add_rms_norm_reference, x, weight, residual)
    ref = run(linear_add_rms_norm64, x.double(), weight.double(), residual.double())
    for name, g, e, r in zip(("out", "dx", "dweight", "dresidual"), got, eager, ref):
        assert_close_to_reference(f"{backend} {name}", g, e, r)
        assert_float32_math(name, e, r)


def _block64(block, h, cos, sin):
    """hrm.layers.Block in float64 from its definition: h = norm(h + o_proj(attention(rope(qkv_proj(h)))))
    then h = norm(h + down_proj(swiglu(gate_up_proj(h)))), weightless RMSNorm with the block's eps."""
    attn, mlp = block.self_attn, block.mlp
    b, s, hidden = h.shape
    h = h.double()
    qkv = (h @ attn.qkv_proj.weight.double().T).view(b, s, 3 * attn.num_heads, attn.head_dim)
    heads = rope_attention64(qkv, cos, sin).reshape(b, s, hidden)
    h = rms_norm64(h, residual=heads @ attn.o_proj.weight.double().T, eps=block.eps)
    return rms_norm64(h, residual=swiglu_linear64(h @ mlp.gate_up_proj.weight.double().T, mlp.down_proj.weight),
                      eps=block.eps)


def test_model_block_fused_equals_unfused(monkeypatch):
    """hrm.layers.Block with FUSED_NO_GRAD, and without: both within tolerance.py's bound of the
    block in float64, set by the eager-backend unfused block at the same precision."""
    from hrm.layers import Block, RotaryEmbedding

    dtype = torch.bfloat16 if CUDA else torch.float16
    block = Block(64, 4, 96, 1e-5, attn_backend="sdpa").to(DEVICE)
    h = torch.randn(2, 9, 64, device=DEVICE, dtype=dtype)
    cos_sin = RotaryEmbedding(16, 9, 10000.0).to(DEVICE)()
    calls = _spy(monkeypatch)
    with torch.no_grad():
        monkeypatch.setattr(Block, "FUSED_NO_GRAD", False)
        with use_backend("eager"):
            eager = block(h, cos_sin)
        with use_backend("triton"):
            plain = block(h, cos_sin)
            monkeypatch.setattr(Block, "FUSED_NO_GRAD", True)
            fused = block(h, cos_sin)
        ref = _block64(block, h, *cos_sin)
    if kernel_module.tma_available(DEVICE):
        assert len(calls) == 2
    for name, got in (("unfused", plain), ("fused", fused)):
        assert got.dtype == dtype
        assert_close_to_reference(f"block {name}", got, eager, ref)


def test_clear_errors():
    x, weight, residual = _inputs(4, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="need x \\[..., K\\], weight \\[N, K\\] and residual \\[..., N\\]"):
        linear_add_rms_norm(x, weight, residual[:, :4])
    with pytest.raises(ValueError, match="need x"):
        linear_add_rms_norm(x, weight.t(), residual)
    with pytest.raises(TypeError, match="residual has dtype torch.float16 but x has dtype torch.float32"):
        linear_add_rms_norm(x, weight, residual.half())
    with pytest.raises(TypeError, match="weight has dtype torch.int64"):
        linear_add_rms_norm(x, weight.long(), residual)

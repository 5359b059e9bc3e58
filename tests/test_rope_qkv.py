"""RoPE on q and k of a fused qkv with a one-pass qkv gradient: outputs and dqkv against float64
through attention (gradients arriving transposed, as SDPA's backward gives them), unused
outputs, the model's attention with and without it, clear errors."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from hrm_kernels import rope_qkv, rope_qkv_reference, use_backend
from tests.conftest import CUDA, DEVICE, record_calls
from tests.reference64 import assert_float32_math, rope_qkv64
from tests.test_rope import LAYOUTS, _tables, table_layouts
from tests.tolerance import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # no tl.dot: bf16 runs in the interpreter too
# (batch, seq, heads, head_dim): odd sizes, a head_dim whose half (5, 12) is not a power of two.
SHAPES = [(2, 7, 3, 10), (1, 37, 2, 64), (2, 5, 1, 24)] + ([(4, 82, 8, 64)] if CUDA else [])


def _attention_grad(fn, qkv, cos, sin, weight):
    """out and dqkv of sum(attention(fn(qkv)) * weight): the gradients reach rope_qkv through SDPA's
    backward, in its transposed layouts."""
    qkv = qkv.detach().clone().requires_grad_()
    q, k, v = fn(qkv, cos, sin)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    (out * weight.to(out.dtype)).sum().backward()
    return out.detach(), qkv.grad


@pytest.mark.parametrize("tables", ["full", "half_view"])
@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_through_attention_matches_float64(backend, dtype, shape, tables):
    """Output and dqkv against float64 (full tables), given the tables in the layout ``tables``
    (``tests.test_rope.table_layouts``)."""
    b, s, h, d = shape
    qkv = torch.randn(b, s, 3 * h, d, device=DEVICE, dtype=dtype)
    cos, sin = _tables(s + 2, d)
    given = table_layouts(cos, sin)[tables]
    weight = torch.randn(b, s, h, d, device=DEVICE)
    with use_backend(backend):
        got = _attention_grad(rope_qkv, qkv, *given, weight)
    eager = _attention_grad(rope_qkv_reference, qkv, *given, weight)
    ref = _attention_grad(rope_qkv64, qkv.double(), cos, sin, weight.double())
    for name, g, e, r in zip(("out", "dqkv"), got, eager, ref):
        assert g.dtype == dtype
        assert_close_to_reference(f"{backend} {dtype} {shape} {name}", g, e, r)
        if dtype == torch.float32:
            assert_float32_math(f"{dtype} {shape} {name}", e, r)


@pytest.mark.parametrize("tables", LAYOUTS)
def test_table_layouts(tables):
    """Every table layout through the forward and the one-pass dqkv kernel, odd sizes."""
    test_through_attention_matches_float64("triton", torch.float32, (2, 7, 3, 10), tables)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_strided_head_dim(backend):
    """A qkv whose last dimension is strided (every other column of a wider tensor) is taken, as
    ``rope`` and ``rope_attention`` take it; the gradient lands in those columns only."""
    base = torch.randn(2, 7, 6, 10, 2, device=DEVICE, requires_grad=True)
    cos, sin = _tables(7, 10)
    weight = [torch.randn(2, 7, 2, 10, device=DEVICE) for _ in range(3)]
    with use_backend(backend):
        outs = rope_qkv(base[..., 0], cos, sin)
    sum((o * w).sum() for o, w in zip(outs, weight)).backward()
    qkv64 = base.detach()[..., 0].double().requires_grad_()
    refs = rope_qkv64(qkv64, cos, sin)
    sum((o * w.double()).sum() for o, w in zip(refs, weight)).backward()
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=1e-5)  # fp32 against float64
    torch.testing.assert_close(base.grad[..., 0].double(), qkv64.grad, atol=1e-5, rtol=1e-5)
    assert (base.grad[..., 1] == 0).all()


@pytest.mark.parametrize("used", [(0,), (1, 2), (2,)], ids=["q_only", "k_v", "v_only"])
def test_unused_outputs_get_zero_gradient(used):
    qkv = torch.randn(2, 6, 6, 8, device=DEVICE)
    cos, sin = _tables(6, 8)
    grads = []
    for fn in (rope_qkv, rope_qkv64):
        x = qkv.clone().requires_grad_()
        with use_backend("triton"):
            outs = fn(x, cos, sin)
        sum((outs[i] * (i + 1)).sum() for i in used).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-6)
    for section in {0, 1, 2} - set(used):
        assert (grads[0][:, :, section * 2:(section + 1) * 2] == 0).all()


def test_model_attention_same_gradients():
    """hrm.layers.Attention with ROPE_QKV (the path with a gradient when rope_attention's fused one,
    FUSED_GRAD, is off): the same output and input/weight gradients as without."""
    from hrm.layers import Attention, RotaryEmbedding

    attn = Attention(48, 3, backend="sdpa").to(DEVICE)
    h = torch.randn(2, 10, 48, device=DEVICE)
    cos_sin = RotaryEmbedding(16, 12, 10000.0).to(DEVICE)()
    module = importlib.import_module("hrm_kernels.rope_qkv")
    results, launches = [], []
    for flag in (False, True):
        attn.zero_grad()
        x = h.clone().requires_grad_()
        with use_backend("triton"), pytest.MonkeyPatch.context() as mp:
            mp.setattr(Attention, "ROPE_QKV", flag)
            mp.setattr(Attention, "FUSED_GRAD", False)
            calls = record_calls(mp, module, "_grad_launch")
            out = attn(x, cos_sin)
            out.square().sum().backward()
        launches.append(len(calls))
        results.append((out.detach(), x.grad, attn.qkv_proj.weight.grad.clone()))
    assert launches == [0, 1]  # the one-pass backward ran with the switch on, and only then
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_clear_errors():
    cos, sin = _tables(8, 6)
    with pytest.raises(ValueError, match="need \\[batch, seq, 3 \\* heads, head_dim\\]"):
        rope_qkv(torch.randn(1, 8, 4, 6, device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match="positions >= seq"):
        rope_qkv(torch.randn(1, 9, 3, 6, device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match="cos must be a float32"):
        rope_qkv(torch.randn(1, 8, 3, 6, device=DEVICE), cos.double(), sin)

"""Rotary embedding: output and gradient against float64, strided q/k slices of a qkv tensor,
odd sizes, torch.compile."""

import math

import pytest
import torch

import hrm_kernels
from hrm_kernels import first_halves, rope, rope_reference, use_backend
from tests.conftest import CUDA, DEVICE, requires_cuda
from tests.reference64 import assert_float32_math, rope64
from tests.tolerance import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch, seq, heads, head_dim): odd sequence lengths and head counts, a one-pair head.
SHAPES = [(2, 7, 3, 10), (1, 37, 2, 64), (3, 5, 1, 2), (2, 82, 5, 24)]


def _tables(positions, head_dim, device=DEVICE):
    """HRM's tables (hrm.layers.RotaryEmbedding): angles p / base^(2i/d), halves duplicated."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(device), angles.sin().to(device)


def _run(fn, x, cos, sin, dout):
    x = x.detach().clone().requires_grad_()
    out = fn(x, cos, sin)
    out.backward(dout)
    return out.detach(), x.grad


def table_layouts(cos, sin) -> dict:
    """The same rotation as tables in each layout the kernels must read in place or repack: full,
    the first halves as views (the model's) or packed, full rows of a wider buffer whose extra
    columns are NaN (a kernel reading past a row shows), cos and sin with different strides."""
    half = cos.shape[1] // 2

    def wide(t):
        return torch.cat((t, torch.full_like(t, float("nan"))), dim=1)[:, : 2 * half]

    return {"full": (cos, sin), "half_view": first_halves(cos, sin),
            "half_packed": tuple(t.contiguous() for t in first_halves(cos, sin)),
            "full_strided": (wide(cos), wide(sin)), "mixed_strides": (cos[:, :half], sin[:, :half].contiguous())}


LAYOUTS = ["full", "half_view", "half_packed", "full_strided", "mixed_strides"]


def _check(backend, x, cos, sin, tables="full"):
    """rope's output and gradient against float64 (full tables), given the tables in the layout
    ``tables`` (``table_layouts``)."""
    dout = torch.randn(x.shape, device=x.device, dtype=x.dtype)
    given = table_layouts(cos, sin)[tables]
    with use_backend(backend):
        got = _run(rope, x, *given, dout)
    eager = _run(rope_reference, x, *given, dout)
    ref = _run(rope64, x.double(), cos, sin, dout.double())
    for name, g, e, r in zip(("out", "dx"), got, eager, ref):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_close_to_reference(f"{backend} {x.dtype} {tuple(x.shape)} {name}", g, e, r)
        if x.dtype == torch.float32:
            assert_float32_math(f"{x.dtype} {tuple(x.shape)} {name}", e, r)


@pytest.mark.parametrize("tables", ["full", "half_view"])
@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(backend, dtype, shape, tables):
    b, s, h, d = shape
    cos, sin = _tables(s + 3, d)  # tables longer than the sequence, as in the model
    _check(backend, torch.randn(shape, device=DEVICE, dtype=dtype), cos, sin, tables)


@pytest.mark.parametrize("tables", LAYOUTS)
def test_table_layouts(tables):
    """Every table layout (``table_layouts``) through the kernel, forward and backward, odd sizes."""
    cos, sin = _tables(11, 10)
    _check("triton", torch.randn(2, 9, 3, 10, device=DEVICE), cos, sin, tables)


def test_custom_op_repacks_tables_itself():
    """The registered op (what torch.compile calls) with cos and sin of different strides: the
    launcher repacks them, as the public function would."""
    cos, sin = _tables(7, 8)
    x = torch.randn(1, 7, 2, 8, device=DEVICE)
    with use_backend("triton"):
        got = torch.ops.hrm_kernels.rope(x, cos[:, :4], sin[:, :4].contiguous(), False)
    torch.testing.assert_close(got.double(), rope64(x.double(), cos, sin), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_qk_slice_of_qkv(backend):
    """The model's use: q and k as one strided slice of the fused projection [B, S, 3H, Dh]."""
    qkv = torch.randn(2, 9, 3 * 3, 16, device=DEVICE)
    qk = qkv[:, :, :6]
    assert not qk.is_contiguous()
    cos, sin = _tables(9, 16)
    _check(backend, qk, cos, sin)
    # The rotation preserves each (j, j + Dh/2) pair's norm.
    with use_backend(backend):
        out = rope(qk, cos, sin)
    pair_norm = lambda t: t[..., :8] ** 2 + t[..., 8:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(out), pair_norm(qk), atol=1e-5, rtol=1e-5)


def test_position_zero_is_identity_and_angle_matches():
    cos, sin = _tables(4, 2)
    x = torch.tensor([[[[1.0, 0.0]]] * 4], device=DEVICE)  # [1, 4, 1, 2]: the unit vector at every position
    with use_backend("triton"):
        out = rope(x, cos, sin)
    # A pair rotates by angle p (inv_freq 1 for the first pair): (cos p, sin p).
    want = torch.tensor([[math.cos(p), math.sin(p)] for p in range(4)])
    torch.testing.assert_close(out[0, :, 0], want.to(out.device), atol=1e-6, rtol=0)


def test_clear_errors():
    cos, sin = _tables(8, 6)
    with pytest.raises(ValueError, match="need x \\[batch, seq, heads, head_dim\\] with an even head_dim"):
        rope(torch.randn(2, 8, 6, device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match="positions >= seq"):
        rope(torch.randn(1, 9, 2, 6, device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match="or \\[positions >= seq, head_dim / 2\\] tables"):  # width 2: neither
        rope(torch.randn(1, 8, 2, 6, device=DEVICE), cos[:, :2], sin[:, :2])
    with pytest.raises(ValueError, match="cos must be a float32"):
        rope(torch.randn(1, 8, 2, 6, device=DEVICE), cos.double(), sin)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        rope(torch.ones(1, 8, 2, 6, dtype=torch.int64, device=DEVICE), cos, sin)
    if CUDA:
        with pytest.raises(ValueError, match="cos is on cuda:0 but x is on cpu"):
            rope(torch.randn(1, 8, 2, 6), cos, sin)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_torch_compile_fullgraph(backend):
    x = torch.randn(2, 5, 3, 8, device=DEVICE, requires_grad=True)
    cos, sin = _tables(5, 8)

    def f(t):
        return rope(t * 1.5, cos, sin)

    compile_backend = "inductor" if (backend == "eager" or CUDA) else "aot_eager"
    with use_backend(backend):
        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True, backend=compile_backend)(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
    leaf = x.detach().double().requires_grad_()
    ref = rope64(leaf * 1.5, cos, sin)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), leaf)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-5)


def test_double_backward_of_the_custom_op():
    """The op's two directions are each other's gradient (the rotation is orthogonal), so the
    backward op is differentiable too (torch.compile's double backward goes through it)."""
    cos, sin = _tables(6, 8)
    x = torch.randn(2, 6, 3, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(2, 6, 3, 8, device=DEVICE)
    with use_backend("triton"):
        for direction in (False, True):
            y = torch.ops.hrm_kernels.rope(x, cos.contiguous(), sin.contiguous(), direction)
            (grad,) = torch.autograd.grad((y * w).sum(), x)
            want = torch.ops.hrm_kernels.rope(w, cos.contiguous(), sin.contiguous(), not direction)
            torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-6)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(768, 82, 8, 64), (96, 901, 8, 64)], ids=str)
def test_cuda_full_size(dtype, shape):
    b, s, h, d = shape
    qkv = torch.randn(b, s, 3 * h, d, device="cuda", dtype=dtype)
    cos, sin = _tables(s, d, device="cuda")
    _check("triton", qkv[:, :, : 2 * h], cos, sin)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("op", ["rope", "rope_qkv", "rope_attention"])
def test_tables_that_require_grad_are_refused(op, backend):
    """The tables are constants: a cos/sin that requires grad would get a gradient on the eager backend
    and none on the kernels', so every op refuses it with the fix; under no_grad it is harmless."""
    fn = getattr(hrm_kernels, op)
    x = torch.randn(1, 5, 3 if op != "rope" else 2, 6, device=DEVICE)
    cos, sin = _tables(5, 6)
    with use_backend(backend):
        with pytest.raises(ValueError, match="pass cos.detach\\(\\)"):
            fn(x, cos.requires_grad_(), sin)
        with torch.no_grad():
            fn(x, cos, sin)

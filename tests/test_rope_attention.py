"""RoPE + attention from a fused qkv tensor: the no-gradient kernel against float64 (with and
without rotation, odd sequence lengths and head sizes, several key blocks), the gradient path,
the model's use, and clear errors."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from hrm_kernels import first_halves, rope_attention, rope_attention_reference, use_backend
from tests.conftest import CUDA, DEVICE, record_calls, requires_cuda
from tests.reference64 import assert_float32_math, rope_attention64
from tests.test_rope import LAYOUTS, _tables, table_layouts
from tests.tolerance import assert_close_to_reference

# The module (its name is shadowed by the function in the package namespace).
rope_attention_module = importlib.import_module("hrm_kernels.rope_attention")


@pytest.fixture(autouse=True)
def _triton_kernels(monkeypatch):
    """The Triton kernels, which serve every GPU and shape the Gluon ones do not take, keep their
    tests on Hopper too: the Gluon routes are off unless a test turns them on."""
    monkeypatch.setattr(rope_attention_module, "USE_GLUON", False)
    monkeypatch.setattr(rope_attention_module, "USE_GLUON_BACKWARD", False)
    monkeypatch.setattr(rope_attention_module, "USE_GLUON_LONG", False)
    monkeypatch.setattr(rope_attention_module, "USE_GLUON_LONG_GRAD", False)


# bf16 tl.dot is broken in the interpreter: bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# (batch, seq, heads, head_dim): sequences over several key blocks (16 on the CPU, 32 on the GPU)
# and query blocks, odd lengths, a head_dim whose half (20) is not a power of two, a single
# position, HRM's Sudoku length (82) and the longest the kernel takes (MAX_FUSED_SEQ = 128).
SHAPES = [(2, 37, 3, 40), (1, 5, 2, 64), (3, 1, 1, 16), (2, 82, 2, 64)] + (
    [(2, 128, 3, 64), (2, 127, 3, 40)] if CUDA else [])


def _joins(cuda_config: str):
    """JOIN_HALVES values to test: both in the interpreter; on the GPU the one ``cuda_config`` (the
    name of a config tuple ending in it) picks (each compiles its own kernels: the other doubled
    this file's GPU time to ~450 s)."""
    join = [getattr(rope_attention_module, cuda_config)[-1]] if CUDA else [False, True]
    return pytest.mark.parametrize("join", join, ids=lambda join: "joined" if join else "halves")


def _set_join(monkeypatch, configs: tuple[str, str], join: bool) -> None:
    """Set the last field (JOIN_HALVES) of the CUDA and interpreter config tuples named ``configs``."""
    for name in configs:
        monkeypatch.setattr(rope_attention_module, name, getattr(rope_attention_module, name)[:-1] + (join,))


@_joins("CUDA_CONFIG")  # the forward's q.k over the halves apart or interleaved
@pytest.mark.parametrize("rotate", [True, False], ids=["rope", "no_rope"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_float64(shape, dtype, rotate, join, monkeypatch):
    _set_join(monkeypatch, ("CUDA_CONFIG", "INTERPRETER_CONFIG"), join)
    b, s, h, d = shape
    qkv = torch.randn(b, s, 3 * h, d, device=DEVICE, dtype=dtype)
    cos, sin = _tables(s + 3, d) if rotate else (None, None)
    calls = _spy(monkeypatch)
    with use_backend("triton"), torch.no_grad():
        got = rope_attention(qkv, cos, sin)
    assert calls == [True], "the kernel did not run"
    assert got.shape == (b, s, h, d) and got.dtype == dtype and got.is_contiguous()
    eager = rope_attention_reference(qkv, cos, sin)
    assert_close_to_reference(f"{dtype} {shape} rotate={rotate}", got, eager, rope_attention64(qkv, cos, sin))


def _spy(monkeypatch):
    """The kernel's launches (``rope_attention`` looks ``_launch`` up at call time)."""
    return record_calls(monkeypatch, rope_attention_module, "_launch")


def test_longer_sequences_with_a_gradient_from_a_strided_qkv(monkeypatch):
    """Above MAX_FUSED_SEQ, a qkv whose last dimension is strided (rope_qkv needs it packed) and an
    SDPA backend that returns a strided result: the op still gives contiguous output and gradients."""
    monkeypatch.setattr(rope_attention_module, "MAX_FUSED_SEQ", 4)
    base = torch.randn(1, 9, 6, 16, 2, device=DEVICE, requires_grad=True)
    cos, sin = _tables(9, 16)
    with use_backend("triton"), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = rope_attention(base[..., 0], cos, sin)
        assert out.is_contiguous()
        out.square().sum().backward()
    ref = rope_attention64(base[..., 0].detach(), cos, sin)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert base.grad[..., 0].abs().sum() > 0 and (base.grad[..., 1] == 0).all()


def test_longer_sequences_take_rope_and_sdpa(monkeypatch):
    """Above MAX_FUSED_SEQ the op runs as rope + SDPA, with the same result."""
    monkeypatch.setattr(rope_attention_module, "MAX_FUSED_SEQ", 8)
    qkv = torch.randn(1, 9, 6, 16, device=DEVICE, dtype=torch.float16)
    cos, sin = _tables(9, 16)
    calls = _spy(monkeypatch)
    with use_backend("triton"), torch.no_grad():
        got = rope_attention(qkv, cos, sin)
    assert calls == []
    assert_close_to_reference("seq 9 > 8", got, rope_attention_reference(qkv, cos, sin),
                              rope_attention64(qkv, cos, sin))


def test_odd_head_dim_without_rotation(monkeypatch):
    """Learned positions allow any head_dim: an odd one (the kernels take head_dim in halves) runs as
    SDPA on the Triton backend too, with gradients; with RoPE tables it is a clear error."""
    qkv = torch.randn(2, 7, 6, 5, device=DEVICE, requires_grad=True)
    calls = _spy(monkeypatch)
    with use_backend("triton"):
        out = rope_attention(qkv)
        out.square().sum().backward()
    assert calls == [] and out.shape == (2, 7, 2, 5)
    qkv64 = qkv.detach().double().requires_grad_()
    ref = rope_attention64(qkv64, None, None)
    ref.square().sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)  # fp32 SDPA vs float64
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, atol=1e-5, rtol=1e-5)
    cos, sin = _tables(7, 5)
    with pytest.raises(ValueError, match="head_dim 5 is odd"):
        rope_attention(qkv.detach(), cos, sin)


def test_strided_qkv_view_and_rotation_matter():
    """A [B, S, 3H, Dh] view of a projection with padding columns (rows not packed): the kernel
    reads it in place. Rotation changes the result (the test would catch a kernel ignoring it)."""
    b, s, h, d = 2, 11, 2, 16
    wide = torch.randn(b, s, 3 * h * d + 8, device=DEVICE, dtype=torch.float16)
    qkv = wide[..., : 3 * h * d].view(b, s, 3 * h, d)
    assert not qkv.is_contiguous()
    cos, sin = _tables(s, d)
    with use_backend("triton"), torch.no_grad():
        rotated = rope_attention(qkv, cos, sin)
        plain = rope_attention(qkv, None, None)
    ref = rope_attention64(qkv, cos, sin)
    assert_close_to_reference("strided", rotated, rope_attention_reference(qkv, cos, sin), ref)
    assert (plain.double() - ref).abs().max() > 1e-2


def _out_and_grad(fn, qkv, cos, sin, dout):
    """fn's output and qkv's gradient for the output gradient ``dout``."""
    x = qkv.detach().clone().requires_grad_()
    out = fn(x, cos, sin)
    out.backward(dout.to(x.dtype))
    return out.detach(), x.grad


@_joins("CUDA_BACKWARD_CONFIG")
@pytest.mark.parametrize("rotate", [True, False], ids=["rope", "no_rope"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_backward_matches_float64(shape, dtype, rotate, join, monkeypatch):
    """With a gradient: the forward kernel (with log-sum-exp) and the one-kernel backward (both ways
    of taking products over head_dim, JOIN_HALVES); output and the whole qkv gradient (q, k rotated
    back, v) against float64, on fresh non-zero inputs."""
    _set_join(monkeypatch, ("CUDA_BACKWARD_CONFIG", "INTERPRETER_BACKWARD_CONFIG"), join)
    b, s, h, d = shape
    qkv = torch.randn(b, s, 3 * h, d, device=DEVICE, dtype=dtype)
    cos, sin = _tables(s + 3, d) if rotate else (None, None)
    dout = torch.randn(b, s, h, d, device=DEVICE)
    backward = record_calls(monkeypatch, rope_attention_module, "_backward_launch")
    with use_backend("triton"):
        got = _out_and_grad(rope_attention, qkv, cos, sin, dout)
    assert backward == [True], "the fused backward did not run"
    eager = _out_and_grad(rope_attention_reference, qkv, cos, sin, dout)
    ref = _out_and_grad(rope_attention64, qkv.double(), cos, sin, dout)
    for name, g, e, r in zip(("out", "dqkv"), got, eager, ref):
        assert g.dtype == dtype
        assert_close_to_reference(f"{dtype} {shape} rotate={rotate} {name}", g, e, r)


@pytest.mark.parametrize("layout", ["view", "packed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[4:], ids=str)
def test_half_width_tables_match_float64(shape, dtype, layout, monkeypatch):
    """[positions, head_dim / 2] tables (the half rotate-half RoPE repeats; as a strided view of the
    full ones, the model's way, or packed): forward and the whole qkv gradient through the kernels'
    HALF_TABLES path, against float64 with the full tables."""
    b, s, h, d = shape
    qkv = torch.randn(b, s, 3 * h, d, device=DEVICE, dtype=dtype)
    cos, sin = _tables(s + 2, d)
    half_cos, half_sin = first_halves(cos, sin)
    if layout == "packed":
        half_cos, half_sin = half_cos.contiguous(), half_sin.contiguous()
    dout = torch.randn(b, s, h, d, device=DEVICE)
    meta = []
    real = rope_attention_module._meta
    monkeypatch.setattr(rope_attention_module, "_meta", lambda *a: meta.append(real(*a)) or meta[-1])
    with use_backend("triton"):
        got = _out_and_grad(rope_attention, qkv, half_cos, half_sin, dout)
    assert len(meta) == 2 and all(m["HALF_TABLES"] for m in meta), "forward and backward kernels did not both run"
    eager = _out_and_grad(rope_attention_reference, qkv, half_cos, half_sin, dout)
    ref = _out_and_grad(rope_attention64, qkv.double(), cos, sin, dout)
    for name, g, e, r in zip(("out", "dqkv"), got, eager, ref):
        assert_close_to_reference(f"{dtype} {shape} half tables {name}", g, e, r)


@pytest.mark.parametrize("tables", LAYOUTS)
def test_table_layouts(tables):
    """Every table layout (``tests.test_rope.table_layouts``) through both kernels, against float64."""
    b, s, h, d = 2, 13, 2, 24
    qkv = torch.randn(b, s, 3 * h, d, device=DEVICE)
    cos, sin = _tables(s + 1, d)
    dout = torch.randn(b, s, h, d, device=DEVICE)
    with use_backend("triton"):
        got = _out_and_grad(rope_attention, qkv, *table_layouts(cos, sin)[tables], dout)
    ref = _out_and_grad(rope_attention64, qkv.double(), cos, sin, dout)
    for name, g, r in zip(("out", "dqkv"), got, ref):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5, msg=f"{tables} {name}")


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_gradient_path_of_longer_sequences(backend, monkeypatch):
    """Above MAX_FUSED_SEQ (and on the eager backend) gradients go through rope_qkv + SDPA: qkv's
    gradient against float64, and the fused backward does not run."""
    monkeypatch.setattr(rope_attention_module, "MAX_FUSED_SEQ", 8)
    backward = record_calls(monkeypatch, rope_attention_module, "_backward_launch")
    b, s, h, d = 2, 13, 2, 24
    qkv = torch.randn(b, s, 3 * h, d, device=DEVICE, dtype=torch.float32)
    cos, sin = _tables(s + 1, d)
    dout = torch.randn(b, s, h, d, device=DEVICE)
    with use_backend(backend):
        got = _out_and_grad(rope_attention, qkv, cos, sin, dout)
        # half-width tables take the same path (repeated to the full width for rope_qkv)
        half = _out_and_grad(rope_attention, qkv, *first_halves(cos, sin), dout)
    assert backward == []
    for g, g_half in zip(got, half):
        torch.testing.assert_close(g_half, g, atol=0, rtol=0)
    eager = _out_and_grad(rope_attention_reference, qkv, cos, sin, dout)
    ref = _out_and_grad(rope_attention64, qkv.double(), cos, sin, dout)
    for name, g, e, r in zip(("out", "dqkv"), got, eager, ref):
        assert_close_to_reference(f"{backend} {name}", g, e, r)
        assert_float32_math(name, e, r)


def test_fused_backward_of_a_strided_view(monkeypatch):
    """qkv as a view with padding columns (the kernel reads it in place): its gradient has qkv's
    shape and matches float64."""
    b, s, h, d = 2, 11, 2, 16
    wide = torch.randn(b, s, 3 * h * d + 8, device=DEVICE, dtype=torch.float32)
    cos, sin = _tables(s, d)
    dout = torch.randn(b, s, h, d, device=DEVICE)

    def grad_of_wide(fn, w, c, t):
        w = w.detach().clone().requires_grad_()
        out = fn(w[..., : 3 * h * d].view(b, s, 3 * h, d), c, t)
        out.backward(dout.to(w.dtype))
        return w.grad

    backward = record_calls(monkeypatch, rope_attention_module, "_backward_launch")
    with use_backend("triton"):
        got = grad_of_wide(rope_attention, wide, cos, sin)
    assert backward == [True]
    eager = grad_of_wide(rope_attention_reference, wide, cos, sin)
    ref = grad_of_wide(rope_attention64, wide.double(), cos, sin)
    assert (got[..., 3 * h * d:] == 0).all()
    assert_close_to_reference("strided grad", got, eager, ref)


def _attention64(h, w_qkv, w_o, num_heads, tables):
    """hrm.layers.Attention in float64 from its definition: o_proj(attention(rope(q), rope(k), v))
    with q, k, v = qkv_proj(h) split into heads (no rotation when ``tables`` is None)."""
    b, s, hidden = h.shape
    qkv = (h.double() @ w_qkv.double().T).view(b, s, 3 * num_heads, hidden // num_heads)
    heads = rope_attention64(qkv, *(tables if tables is not None else (None, None)))
    return heads.reshape(b, s, hidden) @ w_o.double().T


def test_model_attention_fused_gradient_equals_the_composed_one():
    """hrm.layers.Attention with a gradient: the fused path (FUSED_GRAD) and rope_qkv + SDPA, output
    and gradients (input and both projection weights) within tolerance.py's bound of float64, set
    by the eager backend's (rope_reference + SDPA) error at the same precision."""
    from hrm.layers import Attention, RotaryEmbedding

    dtype = torch.bfloat16 if CUDA else torch.float16
    attn = Attention(48, 3, backend="sdpa").to(DEVICE)
    h = torch.randn(2, 10, 48, device=DEVICE, dtype=dtype)
    dout = torch.randn(2, 10, 48, device=DEVICE, dtype=dtype)
    cos_sin = RotaryEmbedding(16, 12, 10000.0).to(DEVICE)()
    weights = (attn.qkv_proj.weight, attn.o_proj.weight)

    def run(fn, h, weights):
        """fn(h)'s output and the gradients of h and of the two ``weights`` it uses."""
        attn.zero_grad(set_to_none=True)
        x = h.detach().clone().requires_grad_()
        out = fn(x)
        out.backward(dout.to(out.dtype))
        return [out.detach(), x.grad, *(w.grad for w in weights)]

    module = lambda x: attn(x, cos_sin)  # noqa: E731
    with use_backend("eager"):
        eager = run(module, h, weights)
    results, launches = {}, []
    for fused in (True, False):
        with use_backend("triton"), pytest.MonkeyPatch.context() as mp:
            mp.setattr(Attention, "FUSED_GRAD", fused)
            calls = record_calls(mp, rope_attention_module, "_backward_launch")
            results["fused" if fused else "composed"] = run(module, h, weights)
        launches.append(len(calls))
    assert launches == [1, 0]
    leaves = [w.detach().double().requires_grad_() for w in weights]
    ref = run(lambda x: _attention64(x, *leaves, attn.num_heads, cos_sin), h.double(), leaves)
    for path, got in results.items():
        for name, g, e, r in zip(("out", "dh", "dW_qkv", "dW_o"), got, eager, ref):
            assert_close_to_reference(f"{path} {name}", g, e, r)


def test_model_attention_uses_it_without_grad(monkeypatch):
    """hrm.layers.Attention: the no-grad forward (fused kernel) and the grad forward through rope +
    SDPA (``FUSED_GRAD`` off), with RoPE and without, within tolerance.py's bound of float64, set
    by the eager backend's error at the same precision."""
    from hrm.layers import Attention, RotaryEmbedding

    monkeypatch.setattr(Attention, "FUSED_GRAD", False)
    calls = _spy(monkeypatch)

    dtype = torch.bfloat16 if CUDA else torch.float16
    attn = Attention(48, 3, backend="sdpa").to(DEVICE)
    h = torch.randn(2, 10, 48, device=DEVICE, dtype=dtype)
    cos_sin = RotaryEmbedding(16, 12, 10000.0).to(DEVICE)()
    for tables in (cos_sin, None):
        with torch.no_grad():
            with use_backend("eager"):
                eager = attn(h, tables)
            with use_backend("triton"):
                fused = attn(h, tables)
            ref = _attention64(h, attn.qkv_proj.weight, attn.o_proj.weight, attn.num_heads, tables)
        with use_backend("triton"), torch.enable_grad():
            composed = attn(h.clone().requires_grad_(), tables).detach()
        for name, got in (("fused", fused), ("composed", composed)):
            assert_close_to_reference(f"{name} rope={tables is not None}", got, eager, ref)
    assert calls == [True, True]  # the two no-grad calls, not the two with a gradient


def test_clear_errors():
    cos, sin = _tables(8, 6)
    with pytest.raises(ValueError, match="need \\[batch, seq, 3 \\* heads, head_dim\\]"):
        rope_attention(torch.randn(1, 8, 4, 6, device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match="pass both cos and sin"):
        rope_attention(torch.randn(1, 8, 3, 6, device=DEVICE), cos, None)
    with pytest.raises(ValueError, match="positions >= seq"):
        rope_attention(torch.randn(1, 9, 3, 6, device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match="head_dim / 2\\] tables"):  # width 2: neither head_dim nor its half
        rope_attention(torch.randn(1, 8, 3, 6, device=DEVICE), cos[:, :2], sin[:, :2])
    with pytest.raises(ValueError, match="cos must be a float32"):
        rope_attention(torch.randn(1, 8, 3, 6, device=DEVICE), cos.double(), sin)
    with pytest.raises(TypeError, match="qkv has dtype torch.int64"):
        rope_attention(torch.ones(1, 8, 3, 6, dtype=torch.int64, device=DEVICE), cos, sin)


@requires_cuda
def test_sudoku_shape_bf16_gradient_matches_sdpa():
    """HRM's Sudoku shape in bf16 with a gradient: the fused backward's qkv gradient against float64,
    bounded by SDPA's (cuDNN's) own bf16 error through rope_qkv."""
    qkv = torch.randn(768, 82, 24, 64, device="cuda", dtype=torch.bfloat16)
    cos, sin = _tables(82, 64)
    dout = torch.randn(768, 82, 8, 64, device="cuda", dtype=torch.bfloat16)
    with use_backend("triton"):
        got = _out_and_grad(rope_attention, qkv, cos, sin, dout)
        sdpa = _out_and_grad(rope_attention_module._composed, qkv[:64], cos, sin, dout[:64])
    ref = _out_and_grad(rope_attention64, qkv[:64].double(), cos, sin, dout[:64])
    for name, g, e, r in zip(("out", "dqkv"), got, sdpa, ref):
        assert_close_to_reference(f"sudoku bf16 {name}", g[:64], e, r)


@requires_cuda
def test_sudoku_shape_bf16_matches_sdpa():
    """HRM's Sudoku shape (768 x 82 tokens, 8 heads of 64) in bf16 against float64, and against
    SDPA's own bf16 error."""
    qkv = torch.randn(768, 82, 24, 64, device="cuda", dtype=torch.bfloat16)
    cos, sin = _tables(82, 64)
    with use_backend("triton"), torch.no_grad():
        got = rope_attention(qkv, cos, sin)
    ref = rope_attention64(qkv[:64], cos, sin)
    q, k, v = rope_attention_module._split(qkv[:64])
    from hrm_kernels import rope_reference

    sdpa = F.scaled_dot_product_attention(rope_reference(q, cos, sin).transpose(1, 2),
                                          rope_reference(k, cos, sin).transpose(1, 2), v.transpose(1, 2))
    assert_close_to_reference("sudoku bf16", got[:64], sdpa.transpose(1, 2), ref)


# The forward and backward on Hopper as Gluon kernels (``USE_GLUON``, ``USE_GLUON_BACKWARD``, on by
# default; the tests below turn them on themselves): no interpreter path (tests/test_compile_for_gpu.py
# compiles them for sm_90 on CPU).
gra = importlib.import_module("hrm_kernels._gluon_rope_attention")
gluon_available = importlib.import_module("hrm_kernels._gluon_gemm").available  # resolved on CPU too
requires_gluon = pytest.mark.skipif(not (CUDA and gluon_available(torch.device("cuda"))),
                                    reason="the Gluon attention kernel runs on a Hopper GPU")


@requires_gluon
@pytest.mark.parametrize("rotate", ["views", "packed", None], ids=["rope_views", "rope_packed", "no_rope"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 82, 3, 64), (3, 1, 2, 64), (2, 64, 2, 64), (2, 65, 2, 64), (2, 128, 3, 64),
                                   (768, 82, 8, 64)], ids=str)
def test_gluon_forward_matches_float64(monkeypatch, shape, dtype, rotate):
    """One key, one warpgroup's rows, one more, the longest sequence, and HRM's Sudoku call (many
    items a program: the slots under load), with the model's half-table views (row stride 64) or
    packed half tables (32): within the bound eager's same-precision error sets against float64,
    and the same bits with 3 programs."""
    monkeypatch.setattr(rope_attention_module, "USE_GLUON", True)
    b, s, h, d = shape
    qkv = torch.randn(b, s, 3 * h, d, device="cuda", dtype=dtype)
    cos, sin = _tables(s + 3, d, device="cuda") if rotate else (None, None)
    half = first_halves(cos, sin) if rotate else (None, None)
    if rotate == "packed":
        half = tuple(t.contiguous() for t in half)
    calls = record_calls(monkeypatch, gra, "rope_attention_forward")
    with use_backend("triton"), torch.no_grad():
        got = rope_attention(qkv, *half)
    assert len(calls) == 1
    assert got.shape == (b, s, h, d) and got.dtype == dtype and got.is_contiguous()
    assert_close_to_reference(f"gluon {dtype} {shape} rotate={rotate}", got, rope_attention_reference(qkv, cos, sin),
                              rope_attention64(qkv, cos, sin))
    assert torch.equal(gra.rope_attention_forward(qkv, *half, programs=3), got)


@requires_gluon
@pytest.mark.parametrize("shape", [(2, 82, 3, 64), (768, 82, 8, 64)], ids=str)
def test_gluon_forward_and_backward_with_gradient(monkeypatch, shape):
    """With a gradient the Gluon forward also writes the log-sum-exp, and the Gluon backward reads
    it: the output and the whole qkv gradient against float64; the backward's the same bits with 3
    programs, and next to the Triton backward's from the same saved tensors."""
    monkeypatch.setattr(rope_attention_module, "USE_GLUON", True)
    monkeypatch.setattr(rope_attention_module, "USE_GLUON_BACKWARD", True)
    b, s, h, d = shape
    qkv = torch.randn(b, s, 3 * h, d, device="cuda", dtype=torch.bfloat16)
    cos, sin = _tables(s + 1, d, device="cuda")
    half = first_halves(cos, sin)
    dout = torch.randn(b, s, h, d, device="cuda")
    calls = record_calls(monkeypatch, gra, "rope_attention_forward", with_kwargs=True)
    backward_calls = record_calls(monkeypatch, gra, "rope_attention_backward")
    with use_backend("triton"):
        got = _out_and_grad(rope_attention, qkv, *half, dout)
    assert len(calls) == 1 and calls[0][1].get("with_lse") and len(backward_calls) == 1
    out, lse = gra.rope_attention_forward(qkv, *half, with_lse=True)
    dout_c = dout.to(qkv.dtype)
    dqkv = gra.rope_attention_backward(qkv, *half, out, lse, dout_c)
    assert torch.equal(gra.rope_attention_backward(qkv, *half, out, lse, dout_c, programs=3), dqkv)
    monkeypatch.setattr(rope_attention_module, "USE_GLUON_BACKWARD", False)
    triton_dqkv = rope_attention_module._backward_launch(qkv, *half, out, lse, dout_c)
    torch.testing.assert_close(dqkv.float(), triton_dqkv.float(), atol=0.05, rtol=0.05)
    eager = _out_and_grad(rope_attention_reference, qkv, cos, sin, dout)
    ref = _out_and_grad(rope_attention64, qkv.double(), cos, sin, dout)
    for name, g, e, r in zip(("out", "dqkv"), got, eager, ref):
        assert_close_to_reference(f"gluon with a gradient {shape} {name}", g, e, r)


@requires_gluon
@pytest.mark.parametrize("rotate", ["views", "packed", None], ids=["rope_views", "rope_packed", "no_rope"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 82, 3, 64), (3, 1, 2, 64), (2, 64, 2, 64), (2, 65, 2, 64), (2, 128, 3, 64),
                                   (768, 82, 8, 64)], ids=str)
def test_gluon_backward_matches_float64(monkeypatch, shape, dtype, rotate):
    """The Gluon backward alone (the Triton forward's out and LSE) over the forward test's cases: one
    key, a second warpgroup with nothing to do (seq <= 64), one more, the longest sequence, the
    model's call: the whole qkv gradient against float64, the same bits with 3 programs, and close
    to the Triton backward from the same saved tensors."""
    monkeypatch.setattr(rope_attention_module, "USE_GLUON_BACKWARD", True)
    b, s, h, d = shape
    qkv = torch.randn(b, s, 3 * h, d, device="cuda", dtype=dtype)
    cos, sin = _tables(s + 2, d, device="cuda") if rotate else (None, None)
    half = first_halves(cos, sin) if rotate else (None, None)
    if rotate == "packed":
        half = tuple(t.contiguous() for t in half)
    dout = torch.randn(b, s, h, d, device="cuda")
    calls = record_calls(monkeypatch, gra, "rope_attention_backward")
    with use_backend("triton"):
        got = _out_and_grad(rope_attention, qkv, *half, dout)
    assert len(calls) == 1
    eager = _out_and_grad(rope_attention_reference, qkv, cos, sin, dout)
    ref = _out_and_grad(rope_attention64, qkv.double(), cos, sin, dout)
    assert_close_to_reference(f"gluon backward {dtype} {shape} rotate={rotate} dqkv", got[1], eager[1], ref[1])
    out, lse = rope_attention_module._launch(qkv, *half, with_lse=True)
    dout_c = dout.to(dtype)
    dqkv = gra.rope_attention_backward(qkv, *half, out, lse, dout_c)
    assert torch.equal(gra.rope_attention_backward(qkv, *half, out, lse, dout_c, programs=3), dqkv)
    monkeypatch.setattr(rope_attention_module, "USE_GLUON_BACKWARD", False)
    torch.testing.assert_close(dqkv.float(), rope_attention_module._backward_launch(qkv, *half, out, lse, dout_c).float(),
                               atol=0.05, rtol=0.05)


@requires_gluon
def test_gluon_forward_routing(monkeypatch):
    """Only calls of shapes, dtypes and tables it takes, with ``USE_GLUON`` on."""
    calls = record_calls(monkeypatch, gra, "rope_attention_forward")
    cos, sin = first_halves(*_tables(140, 64, device="cuda"))
    qkv = torch.randn(2, 82, 6, 64, device="cuda", dtype=torch.bfloat16)
    assert not gra.supported(torch.randn(2, 129, 6, 64, device="cuda", dtype=torch.bfloat16), cos, sin)
    assert not gra.supported(qkv[:, :, :0], cos, sin)  # no heads
    with use_backend("triton"), torch.no_grad():
        rope_attention(qkv, cos, sin)  # off (the fixture)
        monkeypatch.setattr(rope_attention_module, "USE_GLUON", True)
        rope_attention(qkv, cos, sin)
        assert len(calls) == 1
        rope_attention(qkv, *_tables(140, 64, device="cuda"))  # full tables
        rope_attention(torch.randn(2, 129, 6, 64, device="cuda", dtype=torch.bfloat16), cos, sin)  # too long
        rope_attention(torch.randn(2, 82, 6, 32, device="cuda", dtype=torch.bfloat16), *first_halves(
            *_tables(140, 32, device="cuda")))  # head_dim 32
        rope_attention(qkv.float(), cos, sin)
        rope_attention(qkv.detach().requires_grad_(), cos, sin)  # under no_grad: no LSE needed
    assert len(calls) == 2
    with pytest.raises(ValueError, match="programs must be at least 1"):
        gra.rope_attention_forward(qkv, cos, sin, programs=0)


@requires_gluon
def test_gluon_backward_routing(monkeypatch):
    """The Gluon backward only with ``USE_GLUON_BACKWARD``, for inputs it takes (a dout of another
    layout is made contiguous for it)."""
    calls = record_calls(monkeypatch, gra, "rope_attention_backward")
    cos, sin = first_halves(*_tables(140, 64, device="cuda"))

    def grad_of(qkv, c, s, dout=None):
        qkv = qkv.detach().requires_grad_()
        out = rope_attention(qkv, c, s)
        out.backward(torch.ones_like(out) if dout is None else dout)

    qkv = torch.randn(2, 82, 6, 64, device="cuda", dtype=torch.bfloat16)
    with use_backend("triton"):
        grad_of(qkv, cos, sin)  # off (the fixture)
        assert not calls
        monkeypatch.setattr(rope_attention_module, "USE_GLUON_BACKWARD", True)
        grad_of(qkv, cos, sin)
        assert len(calls) == 1
        strided = torch.randn(82, 2, 2, 64, device="cuda", dtype=torch.bfloat16).transpose(0, 1)
        grad_of(qkv, cos, sin, strided)  # a dout that is not contiguous: copied, still the Gluon kernel
        assert len(calls) == 2
        grad_of(qkv, *_tables(140, 64, device="cuda"))  # full tables
        grad_of(qkv.float(), cos, sin)
        grad_of(torch.randn(2, 82, 6, 32, device="cuda", dtype=torch.bfloat16), *first_halves(
            *_tables(140, 32, device="cuda")))  # head_dim 32
        grad_of(torch.randn(2, 129, 6, 64, device="cuda", dtype=torch.bfloat16), cos, sin)  # too long
    assert len(calls) == 2
    with pytest.raises(ValueError, match="programs must be at least 1"):
        out, lse = rope_attention_module._launch(qkv, cos, sin, with_lse=True)
        gra.rope_attention_backward(qkv, cos, sin, out, lse, out, programs=0)


# Attention of pre-rotated q, k past 128 positions without a gradient (``USE_GLUON_LONG``, on since
# session 32): the Gluon kernel of ``hrm_kernels._gluon_attention``.
ga = importlib.import_module("hrm_kernels._gluon_attention")


@requires_gluon
@pytest.mark.parametrize("consumers", [2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 129, 3, 64), (3, 256, 2, 64), (2, 300, 1, 64), (1, 901, 8, 64),
                                   (96, 901, 8, 64)], ids=str)
def test_gluon_long_forward_matches_float64(monkeypatch, shape, dtype, consumers):
    """One key past a block, whole blocks, a partial last block, ARC's length, and ARC's call (many
    items a program: the stages under load), with two and three consumer warpgroups (items of 128
    and 192 queries): within the bound eager's same-precision error sets against float64, and the
    same bits with 3 programs."""
    monkeypatch.setattr(rope_attention_module, "USE_GLUON_LONG", True)
    monkeypatch.setattr(ga, "THREE_CONSUMERS", consumers == 3)
    b, s, h, d = shape
    qkv = torch.randn(b, s, 3 * h, d, device="cuda", dtype=dtype)
    calls = record_calls(monkeypatch, ga, "attention_forward")
    with use_backend("triton"), torch.no_grad():
        got = rope_attention(qkv)
    assert len(calls) == 1
    assert got.shape == (b, s, h, d) and got.dtype == dtype and got.is_contiguous()
    # the float64 reference of ARC's whole call would take ~10 GB: 4 batches spread over it (items
    # of each program's first and later passes through the q slots)
    sample = slice(None, None, max(1, b // 4))
    assert_close_to_reference(f"gluon long {dtype} {shape}", got[sample], rope_attention_reference(qkv[sample], None, None),
                              rope_attention64(qkv[sample], None, None))
    assert torch.equal(ga.attention_forward(qkv, programs=3), got)


@requires_gluon
@pytest.mark.parametrize("shape", [(3, 193, 2), (96, 901, 8)], ids=str)
def test_gluon_long_three_consumers_same_bits_as_two(monkeypatch, shape):
    """Items of 192 queries (three consumer warpgroups) and of 128 (two) compute each query's row the
    same way (the same key blocks, wgmmas and online softmax): the same output and log-sum-exp bits."""
    b, s, h = shape
    q, k, v = torch.randn(b, s, 3 * h, 64, device="cuda", dtype=torch.bfloat16).split(h, dim=2)
    results = {}
    for three in (False, True):
        monkeypatch.setattr(ga, "THREE_CONSUMERS", three)
        results[three] = ga.attention_views_forward(q, k, v, with_lse=True)
    assert ga.consumers() == 3
    assert torch.equal(results[True][0], results[False][0]) and torch.equal(results[True][1], results[False][1])


def _negative_scores_qkv(b, s, h, dtype):
    """q > 0 and k < 0 elementwise: every valid score strongly negative, so a padded key (score 0)
    let through the mask would take over its row."""
    q = torch.randn(b, s, h, 64, device="cuda").abs() + 0.5
    k = -(torch.randn(b, s, h, 64, device="cuda").abs() + 0.5)
    v = torch.randn(b, s, h, 64, device="cuda") + 1
    return torch.cat((q, k, v), dim=2).to(dtype)


@requires_gluon
@pytest.mark.parametrize("form", ["plain", "pipelined", "stream", "plain, three consumers"])
@pytest.mark.parametrize("seq", [1, 5, 64, 65, 128, 129, 191, 192, 193, 300], ids=str)
def test_gluon_long_forward_any_length_and_mask(monkeypatch, seq, form):
    """Every form of the kernel (``FORMS``; the plain one also with three consumer warpgroups) at
    one key block (sequences up to 128: the pipelined form's peeled tail alone; the stream's items of
    one block), a partial one and several, around an item of 192 queries, on random inputs and on
    ones whose valid scores are all strongly negative (a leak through the last block's mask shows);
    with 3 programs (several items each) the same bits."""
    monkeypatch.setattr(ga, "DEFAULT_FORM", form.split(",")[0])
    monkeypatch.setattr(ga, "THREE_CONSUMERS", form.endswith("three consumers"))
    for qkv in (torch.randn(3, seq, 6, 64, device="cuda", dtype=torch.bfloat16),
                _negative_scores_qkv(3, seq, 2, torch.bfloat16)):
        got = ga.attention_forward(qkv)
        assert_close_to_reference(f"gluon long seq={seq} form={form}", got,
                                  rope_attention_reference(qkv, None, None), rope_attention64(qkv, None, None))
        assert torch.equal(ga.attention_forward(qkv, programs=3), got)


@requires_gluon
def test_gluon_long_forward_sharp_rows():
    """Scores far apart (scaled q, k: the running maximum moves by far more than one block's range):
    the online softmax's rescaling of o and l, against float64 (a missed rescale is off by whole
    units here)."""
    qkv = torch.randn(2, 700, 6, 64, device="cuda", dtype=torch.bfloat16)
    qkv[:, :, :4] *= 4  # q and k: scores up to ~1e2, so exp2 spans far beyond one block's range
    got = ga.attention_forward(qkv)
    assert_close_to_reference("gluon long sharp", got, rope_attention_reference(qkv, None, None),
                              rope_attention64(qkv, None, None))


@requires_gluon
def test_gluon_long_forward_routing(monkeypatch):
    """Only calls past 128 positions, without tables, without a gradient, of dtypes and head sizes
    it takes, with ``USE_GLUON_LONG`` on."""
    calls = record_calls(monkeypatch, ga, "attention_forward")
    qkv = torch.randn(2, 200, 6, 64, device="cuda", dtype=torch.bfloat16)
    with use_backend("triton"):
        with torch.no_grad():
            rope_attention(qkv)  # off (the fixture)
            monkeypatch.setattr(rope_attention_module, "USE_GLUON_LONG", True)
            rope_attention(qkv)
            assert len(calls) == 1
            rope_attention(qkv, *first_halves(*_tables(210, 64, device="cuda")))  # tables: rope_qkv + SDPA
            rope_attention(torch.randn(2, 200, 6, 32, device="cuda", dtype=torch.bfloat16))  # head_dim 32
            rope_attention(qkv.float())
            rope_attention(qkv[:, :100])  # within the fused kernels' length
        out = rope_attention(qkv.detach().requires_grad_())  # a gradient: SDPA's backward
        out.sum().backward()
    assert len(calls) == 1
    assert not ga.supported(qkv[:, :, :0]) and not ga.supported(qkv.transpose(0, 1))  # no heads; strided
    with pytest.raises(ValueError, match="programs must be at least 1"):
        ga.attention_forward(qkv, programs=0)


# With a gradient (``USE_GLUON_LONG_GRAD``): the same kernel keeping each
# query's log-sum-exp, then cuDNN's SDPA backward from it (``_gluon_attention.AttentionFunction``).
@requires_gluon
@pytest.mark.parametrize("shape", [(2, 129, 3, 64), (3, 300, 2, 64), (2, 901, 8, 64)], ids=str)
def test_gluon_long_lse_matches_float64_and_cudnn(shape):
    """The stored log-sum-exp (natural log of sum exp(q k^T / 8) per query, [batch, heads, seq]) against
    float64, and against what cuDNN's forward hands its own backward (the backward reads it as that)."""
    b, s, h, d = shape
    q, k, v = torch.randn(b, s, 3 * h, d, device="cuda", dtype=torch.bfloat16).split(h, dim=2)
    out, lse = ga.attention_views_forward(q, k, v, with_lse=True)
    assert lse.shape == (b, h, s) and lse.dtype == torch.float32
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / d ** 0.5
    ref = torch.logsumexp(scores, dim=-1)
    # fp32 sums of bf16 inputs' exact products: ~1e-6 relative, against lse values of ~3-7
    torch.testing.assert_close(lse.double(), ref, atol=1e-4, rtol=1e-5)
    cudnn_lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True)[1]
    assert cudnn_lse.dim() == ga._cudnn_stats_rank() and cudnn_lse.shape[:3] == (b, h, s)
    torch.testing.assert_close(lse.flatten(), cudnn_lse.flatten().float(), atol=1e-4, rtol=1e-5)
    assert torch.equal(ga.attention_views_forward(q, k, v), out)  # the same output without the lse


@requires_gluon
@pytest.mark.parametrize("rotate", [True, False], ids=["rope", "no_rope"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 129, 3, 64), (3, 300, 2, 64), (2, 901, 8, 64)], ids=str)
def test_gluon_long_grad_matches_float64(monkeypatch, shape, dtype, rotate):
    """rope_attention with a gradient past 128 positions through the Gluon forward and cuDNN's backward
    (q and k rotated by rope_qkv, or no tables): the output and the whole qkv gradient within the
    bound eager's same-precision error (SDPA's forward and backward) sets against float64."""
    monkeypatch.setattr(rope_attention_module, "USE_GLUON_LONG_GRAD", True)
    b, s, h, d = shape
    qkv = torch.randn(b, s, 3 * h, d, device="cuda", dtype=dtype)
    cos, sin = _tables(s + 2, d, device="cuda") if rotate else (None, None)
    half = first_halves(cos, sin) if rotate else (None, None)
    dout = torch.randn(b, s, h, d, device="cuda")
    calls = record_calls(monkeypatch, ga, "attention_views_forward")
    with use_backend("triton"):
        got = _out_and_grad(rope_attention, qkv, *half, dout)
    assert len(calls) == 1
    eager = _out_and_grad(rope_attention_reference, qkv, cos, sin, dout)
    ref = _out_and_grad(rope_attention64, qkv.double(), cos, sin, dout)
    name = f"gluon long grad {dtype} {shape} rotate={rotate}"
    assert_close_to_reference(name + " out", got[0], eager[0], ref[0])
    assert_close_to_reference(name + " dqkv", got[1], eager[1], ref[1])


@requires_gluon
def test_gluon_long_grad_under_a_cuda_graph(monkeypatch):
    """As the trainer runs it: a qkv projection and rope_attention past 128 positions with a gradient,
    captured by hrm.cuda_graphs.GradGraphCache (forward and backward graphs), over 3 steps with new
    inputs: the output and the input's and weight's gradients as the same calls launched eagerly
    (cuDNN's backward is not deterministic: close, not equal)."""
    from hrm.cuda_graphs import GradGraphCache

    monkeypatch.setattr(rope_attention_module, "USE_GLUON_LONG_GRAD", True)
    calls = record_calls(monkeypatch, ga, "attention_views_forward")
    proj = torch.nn.Linear(96, 3 * 2 * 64, bias=False, device="cuda", dtype=torch.bfloat16)
    cos, sin = first_halves(*_tables(300, 64, device="cuda"))

    def fn(x):
        return rope_attention(proj(x).view(*x.shape[:2], 6, 64), cos, sin)

    cache = GradGraphCache()
    with use_backend("triton"):
        for _ in range(3):
            x = torch.randn(3, 257, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            dout = torch.randn(3, 257, 2, 64, device="cuda", dtype=torch.bfloat16)
            proj.zero_grad(set_to_none=True)
            (out,) = cache.run("k", lambda x: (fn(x),), (x,), (proj,))
            out.backward(dout)
            got = (out.detach(), x.grad, proj.weight.grad)
            x2 = x.detach().clone().requires_grad_()
            proj.zero_grad(set_to_none=True)
            out2 = fn(x2)
            out2.backward(dout)
            for name, g, w in zip(("out", "dx", "dw"), got, (out2.detach(), x2.grad, proj.weight.grad)):
                torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2, msg=name)
    assert len(cache) == 1 and calls  # the Gluon forward ran (in the capture's warm-up and eagerly)


@requires_gluon
def test_gluon_long_grad_routing(monkeypatch):
    """With ``USE_GLUON_LONG_GRAD`` on, only calls with a gradient past 128 positions take the Gluon
    forward with the log-sum-exp; without a gradient ``USE_GLUON_LONG`` decides (off here)."""
    monkeypatch.setattr(rope_attention_module, "USE_GLUON_LONG_GRAD", True)
    calls = record_calls(monkeypatch, ga, "attention_views_forward", with_kwargs=True)
    qkv = torch.randn(2, 200, 6, 64, device="cuda", dtype=torch.bfloat16)
    cos, sin = first_halves(*_tables(210, 64, device="cuda"))
    with use_backend("triton"):
        with torch.no_grad():
            rope_attention(qkv, cos, sin)
        assert not calls
        rope_attention(qkv[:, :100].detach().requires_grad_(), cos, sin)  # the fused kernels' length
        rope_attention(qkv.float().requires_grad_(), cos, sin)  # fp32: SDPA
        assert not calls
        rope_attention(qkv.detach().requires_grad_(), cos, sin).sum().backward()
    assert len(calls) == 1 and calls[0][1] == {"with_lse": True}

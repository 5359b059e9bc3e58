"""SwiGLU + down projection with the SwiGLU backward in the input-gradient matmul's epilogue:
output and both gradients against float64 on odd shapes, the fused kernel and the unfused path."""

import importlib

import pytest
import torch

from hrm_kernels import _gluon_swiglu_backward, swiglu_linear, swiglu_linear_reference, use_backend
from hrm_kernels.swiglu import swiglu_backward
from tests.conftest import CUDA, DEVICE, record_calls, requires_cuda
from tests.reference64 import assert_float32_math, swiglu_linear64
from tests.tolerance import assert_close_to_reference

module = importlib.import_module("hrm_kernels.swiglu_linear")
GLUON = CUDA and _gluon_swiglu_backward.available(torch.device("cuda"))
requires_gluon = pytest.mark.skipif(not GLUON, reason="the Gluon kernel runs on a Hopper GPU")

# The interpreter's tl.dot works in fp16/fp32 only (GPU.md); bf16 is covered on the GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# (leading dims, I, N): the kernel needs 16-byte rows (I and N multiples of 8 in half precision,
# of 4 in fp32). The first three run it: partial row, column (I=40 < 2 tiles) and K (N=72) tiles,
# one row; the last two are misaligned (I=37, N=50) and take the unfused path.
SHAPES = [((37,), 40, 24), ((2, 35), 48, 72), ((1,), 16, 64), ((37,), 37, 24), ((3, 1, 4), 8, 50)]


@pytest.fixture
def fused_launches(monkeypatch):
    """How many times the fused backward kernel was launched."""
    count = [0]
    launch = module._fused_backward

    def counted(*args, **kwargs):
        count[0] += 1
        return launch(*args, **kwargs)

    monkeypatch.setattr(module, "_fused_backward", counted)
    return count


def _make(lead, inter, n, dtype, device=DEVICE):
    gate_up = torch.randn(*lead, 2 * inter, device=device, dtype=dtype) * 2
    weight = (torch.randn(n, inter, device=device) / inter ** 0.5).to(dtype)
    dy = torch.randn(*lead, n, device=device, dtype=dtype)
    return gate_up, weight, dy


def _run(fn, gate_up, weight, dy):
    gate_up, weight = gate_up.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    out = fn(gate_up, weight)
    out.backward(dy)
    return out.detach(), gate_up.grad, weight.grad


def _assert_close(label, got, eager, gate_up, weight, dy):
    """Output and both gradients within the tolerance of tests/tolerance.py of float64, in the inputs' dtype."""
    ref = _run(swiglu_linear64, gate_up.double(), weight.double(), dy.double())
    for name, g, e, r in zip(("out", "dgate_up", "dweight"), got, eager, ref):
        assert g.dtype == gate_up.dtype
        assert_close_to_reference(f"{label} {name}", g, e, r)
        if gate_up.dtype == torch.float32:
            assert_float32_math(f"{label} {name}", e, r)


# The Triton kernel's variants: epilogue through TMA descriptors or pointers, one program per tile or
# a persistent grid (a few programs per "SM", each walking several tiles); the Gluon kernel (Hopper).
VARIANTS = {"tma-epilogue": (True, 0, False), "pointer-epilogue": (False, 0, False), "persistent": (False, 1, False),
            "unfused": None, "gluon": "gluon"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,inter,n", SHAPES)
@pytest.mark.parametrize("variant", [pytest.param(v, marks=requires_gluon) if v == "gluon" else v for v in VARIANTS])
def test_against_float64(lead, inter, n, dtype, variant, fused_launches, monkeypatch):
    fused = VARIANTS[variant] not in (None, "gluon")
    monkeypatch.setattr(module, "FUSED_BACKWARD", fused)
    monkeypatch.setattr(module, "USE_GLUON", variant == "gluon")
    gluon_launches = record_calls(monkeypatch, _gluon_swiglu_backward, "swiglu_linear_backward")
    if fused:
        tiles = module.tile_config(CUDA, dtype.itemsize)[:5]
        monkeypatch.setattr(module, "tile_config", lambda on_cuda, size: (*tiles, *VARIANTS[variant]))
    gate_up, weight, dy = _make(lead, inter, n, dtype)
    with use_backend("triton"):
        got = _run(swiglu_linear, gate_up, weight, dy)
    eager = _run(swiglu_linear_reference, gate_up, weight, dy)
    _assert_close(f"{dtype} {lead} I={inter} N={n}", got, eager, gate_up, weight, dy)
    item = gate_up.element_size()
    aligned = (inter * item) % 16 == 0 and (n * item) % 16 == 0
    assert fused_launches[0] == (1 if fused and aligned else 0)
    assert len(gluon_launches) == (1 if variant == "gluon" and item == 2 and inter % 8 == 0 and n % 8 == 0 else 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,inter,n", SHAPES)
def test_eager_backend_against_float64(lead, inter, n, dtype):
    """The eager backend (the CPU fallback: ``swiglu_linear_reference``) against the float64 formula."""
    gate_up, weight, dy = _make(lead, inter, n, dtype)
    with use_backend("eager"):
        got = _run(swiglu_linear, gate_up, weight, dy)
    _assert_close(f"eager {dtype} {lead} I={inter} N={n}", got, _run(swiglu_linear_reference, gate_up, weight, dy),
                  gate_up, weight, dy)


def test_no_grad_and_weight_only_gradient(fused_launches):
    gate_up, weight, dy = _make((5, 7), 24, 16, torch.float32)
    with use_backend("triton"):
        with torch.no_grad():
            out = swiglu_linear(gate_up, weight)
        w = weight.clone().requires_grad_()
        swiglu_linear(gate_up, w).backward(dy)  # gate_up needs no gradient: no fused launch
    ref = swiglu_linear64(gate_up, weight)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    ref_w = weight.double().clone().requires_grad_()
    swiglu_linear64(gate_up, ref_w).backward(dy.double())
    torch.testing.assert_close(w.grad.double(), ref_w.grad, atol=1e-4, rtol=1e-4)
    assert fused_launches[0] == 0


@pytest.mark.parametrize("gate_up_shape,weight_shape,match", [
    ((4, 10), (6, 4), "need gate_up"),   # 2I = 10 but weight has I = 4
    ((4, 9), (6, 4), "need gate_up"),
    ((4, 8), (6,), "need gate_up"),
])
def test_bad_shapes_name_the_problem(gate_up_shape, weight_shape, match):
    with pytest.raises(ValueError, match=match):
        swiglu_linear(torch.randn(*gate_up_shape), torch.randn(*weight_shape))


def test_dtype_mismatch_is_an_error():
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but gate_up has dtype torch.float32"):
        swiglu_linear(torch.randn(4, 8), torch.randn(6, 4, dtype=torch.float16))
    with pytest.raises(TypeError, match="weight has dtype torch.float64; supported are float32, float16 and bfloat16"):
        swiglu_linear(torch.randn(4, 8), torch.randn(6, 4, dtype=torch.float64))


@requires_cuda
def test_compile_fullgraph_matches_eager():
    gate_up, weight, dy = _make((3, 41), 64, 32, torch.bfloat16)
    compiled = torch.compile(swiglu_linear, fullgraph=True)
    with use_backend("triton"):
        got = _run(compiled, gate_up, weight, dy)
        eager = _run(swiglu_linear, gate_up, weight, dy)
    _assert_close("compiled", got, eager, gate_up, weight, dy)


@requires_cuda
@pytest.mark.parametrize("path", ["fused", "unfused", pytest.param("gluon", marks=requires_gluon)])
def test_hrm_size_bf16(path, fused_launches, monkeypatch):
    """HRM's MLP at a few thousand rows: hidden 512, I = 1536, bf16, the kernels' CUDA tiles."""
    monkeypatch.setattr(module, "FUSED_BACKWARD", path == "fused")
    monkeypatch.setattr(module, "USE_GLUON", path == "gluon")
    gluon_launches = record_calls(monkeypatch, _gluon_swiglu_backward, "swiglu_linear_backward")
    gate_up, weight, dy = _make((4, 1001), 1536, 512, torch.bfloat16)
    with use_backend("triton"):
        got = _run(swiglu_linear, gate_up, weight, dy)
    _assert_close("HRM size", got, _run(swiglu_linear_reference, gate_up, weight, dy), gate_up, weight, dy)
    assert fused_launches[0] == int(path == "fused") and len(gluon_launches) == int(path == "gluon")


@requires_gluon
@pytest.mark.parametrize("programs", [3, None], ids=["3-programs", "one-per-SM"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,inter,n", [(1000, 384, 512), (777, 200, 136), (62976, 1536, 512)], ids=str)
def test_gluon_backward_matches_float64(rows, inter, n, dtype, programs):
    """dgate_up from the Gluon kernel directly: odd row counts, partial N tiles (I = 200), K = 136 (a
    partial k-step), a few programs walking many tiles, HRM's full Sudoku size; against float64 within
    the tolerance of cuBLAS + the SwiGLU backward kernel's error."""
    gate_up, weight, dy = _make((rows,), inter, n, dtype)
    assert _gluon_swiglu_backward.supported(dy, weight, gate_up)
    got = _gluon_swiglu_backward.swiglu_linear_backward(dy, weight, gate_up, programs=programs)
    unfused = swiglu_backward(dy @ weight, gate_up)
    gate, up = gate_up.double().chunk(2, -1)  # the SwiGLU backward in float64 from its formula
    dact = dy.double() @ weight.double()
    sig = torch.sigmoid(gate)
    ref = torch.cat((dact * up * sig * (1 + gate * (1 - sig)), dact * gate * sig), -1)
    assert got.dtype == dtype and got.shape == gate_up.shape
    assert_close_to_reference(f"gluon {dtype} {rows}x{n}x{inter}", got, unfused, ref)


def test_gluon_backward_is_not_taken_off_hopper():
    """``supported`` is False on the CPU (and for fp32, misaligned widths): those keep the other paths."""
    gate_up, weight, dy = _make((5,), 16, 8, torch.bfloat16, device="cpu")
    assert not _gluon_swiglu_backward.supported(dy, weight, gate_up)

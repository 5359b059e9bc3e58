"""add+RMSNorm: outputs and all gradients against float64, both backends, odd shapes."""

import pytest
import torch

from hrm_kernels import rms_norm, rms_norm_reference, use_backend
from tests.conftest import CUDA, DEVICE, requires_cuda
from tests.reference64 import assert_float32_math, rms_norm64
from tests.tolerance import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape, description): 1-D to 4-D, odd widths, width 1
SHAPES = [(37,), (5, 1), (3, 123), (2, 3, 760), (2, 1, 3, 37)]


def _run(fn, x, residual, weight, dy):
    """Forward + backward; returns (y, dx, dresidual, dweight)."""
    x = x.detach().clone().requires_grad_()
    r = residual.detach().clone().requires_grad_() if residual is not None else None
    w = weight.detach().clone().requires_grad_() if weight is not None else None
    y = fn(x, w, residual=r)
    y.backward(dy)
    return y.detach(), x.grad, (r.grad if r is not None else None), (w.grad if w is not None else None)


def _check(backend, shape, dtype, has_residual, has_weight, device=DEVICE, make=None):
    make = make or (lambda *s: torch.randn(*s, device=device, dtype=dtype))
    x = make(*shape)
    residual = make(*shape) if has_residual else None
    weight = (1 + 0.3 * torch.randn(shape[-1], device=device)) if has_weight else None  # fp32 param
    dy = torch.randn(shape, device=device, dtype=dtype)

    with use_backend(backend):
        got = _run(rms_norm, x, residual, weight, dy)
    eager = _run(rms_norm_reference, x, residual, weight, dy)
    d64 = lambda t: t.double() if t is not None else None  # noqa: E731
    ref = _run(rms_norm64, d64(x), d64(residual), d64(weight), dy.double())
    # Without a weight the backward takes xhat from the rounded output (6 passes instead of 7,
    # Apex's memory-efficient mode), so the input gradient's rounding error is relative to the
    # scale of rstd * dy, the gradient before its projection cancels (visible at tiny widths).
    h64 = x.double() + (residual.double() if residual is not None else 0)
    rstd = torch.rsqrt(h64.square().mean(-1, keepdim=True) + 1e-5)
    dx_scale = None if has_weight else max((rstd * dy.double()).abs().max().item(), 1.0)
    for name, g, e, r in zip(("y", "dx", "dresidual", "dweight"), got, eager, ref):
        if r is None:
            assert g is None
            continue
        assert g.dtype == e.dtype, f"{name}: dtype {g.dtype} != {e.dtype}"
        # (dweight too: the kernel reduces it in fp32, eager in the activations' dtype; its error
        # stayed within 1.5x of eager's from 64 to 16384 rows in fp32 and far below it in bf16/fp16)
        scale = dx_scale if name in ("dx", "dresidual") else None
        assert_close_to_reference(f"{backend} {dtype} {shape} {name}", g, e, r, scale=scale)
        if dtype == torch.float32:
            assert_float32_math(f"{dtype} {shape} {name}", e, r, scale=scale)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(backend, dtype, shape):
    _check(backend, shape, dtype, has_residual=True, has_weight=False)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("has_residual,has_weight", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_optional_operands(backend, has_residual, has_weight, dtype):
    _check(backend, (7, 123), dtype, has_residual, has_weight)


def test_weight_gradient_summed_over_programs():
    """Enough rows for several row blocks and programs, each holding a partial weight-gradient row
    (the single-block shapes above would not see a partial left out of the sum)."""
    _check("triton", (300, 123), torch.float32, has_residual=True, has_weight=True)


@pytest.mark.parametrize("has_weight", [False, True], ids=["no_weight", "weight"])
def test_double_backward_refused(has_weight):
    """The kernels' gradients carry no graph: a second derivative (a gradient penalty) raises instead
    of silently coming out without the terms that pass through the norm."""
    x = torch.randn(6, 37, device=DEVICE, requires_grad=True)
    weight = (1 + 0.3 * torch.randn(37, device=DEVICE)).requires_grad_() if has_weight else None
    with use_backend("triton"):
        (dx,) = torch.autograd.grad(rms_norm(x, weight).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            dx.square().sum().backward()


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_non_contiguous_inputs(backend):
    base = torch.randn(9, 2 * 37, device=DEVICE)
    x = base[:, ::2]  # strided last dimension
    residual = torch.randn(37, 9, device=DEVICE).t()  # transposed
    dy = torch.randn(9, 37, device=DEVICE)
    with use_backend(backend):
        got = _run(rms_norm, x, residual, None, dy)
    ref = _run(rms_norm64, x.double(), residual.double(), None, dy.double())
    for g, r in zip(got[:3], ref[:3]):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_empty_rows(backend):
    x = torch.randn(0, 3, 37, device=DEVICE, requires_grad=True)
    w = torch.ones(37, device=DEVICE, requires_grad=True)
    with use_backend(backend):
        y = rms_norm(x, w, residual=torch.zeros_like(x))
        y.sum().backward()
    assert y.shape == (0, 3, 37)
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_clear_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"residual has shape \(4, 9\) but x has shape \(4, 8\)"):
        rms_norm(x, residual=torch.randn(4, 9))
    with pytest.raises(TypeError, match="residual has dtype torch.float16 but x has dtype torch.float32"):
        rms_norm(x, residual=torch.randn(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"weight must be \[8\]"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        rms_norm(torch.ones(4, 8, dtype=torch.long))
    with use_backend("triton"), pytest.raises(ValueError, match="outside the fused kernel's range"):
        rms_norm(torch.randn(1, 65537, device=DEVICE))


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_torch_compile_fullgraph(backend):
    """No graph break: the Triton path is one opaque custom op (checked with aot_eager, which
    traces exactly what inductor would get, without C++ codegen); the eager path through inductor."""
    x = torch.randn(6, 37, device=DEVICE, requires_grad=True)
    r = torch.randn(6, 37, device=DEVICE, requires_grad=True)
    w = torch.randn(37, device=DEVICE, requires_grad=True)

    def f(x, r, w):
        return rms_norm(x, w, residual=r) * 2

    compile_backend = "inductor" if (backend == "eager" or CUDA) else "aot_eager"
    with use_backend(backend):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
        out = compiled(x, r, w)
        grads = torch.autograd.grad(out.sum(), (x, r, w))
    leaves = [t.detach().double().requires_grad_() for t in (x, r, w)]
    ref_out = rms_norm64(leaves[0], leaves[2], residual=leaves[1]) * 2
    ref_grads = torch.autograd.grad(ref_out.sum(), leaves)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=1e-4, rtol=1e-4)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(62976, 512), (96 * 901, 512), (1000, 1536), (257, 8192), (31, 16384)], ids=str)
def test_cuda_large(dtype, shape):
    _check("triton", shape, dtype, has_residual=True, has_weight=False, device="cuda")
    _check("triton", shape, dtype, has_residual=True, has_weight=True, device="cuda")

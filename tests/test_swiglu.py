"""SwiGLU activation: outputs and gradients against float64, both backends, odd shapes."""

import pytest
import torch

from hrm_kernels import swiglu, swiglu_reference, use_backend
from tests.conftest import CUDA, DEVICE, requires_cuda
from tests.reference64 import assert_float32_math, swiglu64
from tests.tolerance import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2,), (74,), (3, 246), (2, 3, 2 * 760), (2, 1, 3, 2 * 37), (4, 2 * 1100)]


def _run(fn, gate_up, dout):
    gate_up = gate_up.detach().clone().requires_grad_()
    out = fn(gate_up)
    out.backward(dout)
    return out.detach(), gate_up.grad


def _check(backend, shape, dtype, device=DEVICE):
    gate_up = 2 * torch.randn(shape, device=device, dtype=dtype)
    dout = torch.randn(*shape[:-1], shape[-1] // 2, device=device, dtype=dtype)
    with use_backend(backend):
        got = _run(swiglu, gate_up, dout)
    eager = _run(swiglu_reference, gate_up, dout)
    ref = _run(swiglu64, gate_up.double(), dout.double())
    for name, g, e, r in zip(("out", "dgate_up"), got, eager, ref):
        assert g.dtype == dtype
        assert_close_to_reference(f"{backend} {dtype} {shape} {name}", g, e, r)
        if dtype == torch.float32:
            assert_float32_math(f"{dtype} {shape} {name}", e, r)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(backend, dtype, shape):
    _check(backend, shape, dtype)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_non_contiguous_and_empty(backend):
    gate_up = torch.randn(2 * 37, 5, device=DEVICE).t()  # [5, 74], transposed storage
    dout = torch.randn(5, 37, device=DEVICE)
    with use_backend(backend):
        got = _run(swiglu, gate_up, dout)
        empty = swiglu(torch.randn(0, 2, 10, device=DEVICE))
    ref = _run(swiglu64, gate_up.double(), dout.double())
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)
    assert empty.shape == (0, 2, 5)


def test_double_backward_refused():
    """The kernel's gradient carries no graph: a second derivative raises instead of coming out
    silently without the terms that pass through SwiGLU."""
    gate_up = torch.randn(5, 2 * 37, device=DEVICE, requires_grad=True)
    with use_backend("triton"):
        (d,) = torch.autograd.grad(swiglu(gate_up).square().sum(), gate_up, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            d.square().sum().backward()


def test_clear_errors():
    with pytest.raises(ValueError, match=r"gate_up has shape \(4, 7\); its last dimension must be even"):
        swiglu(torch.randn(4, 7))
    with pytest.raises(TypeError, match="gate_up has dtype torch.int32"):
        swiglu(torch.ones(4, 8, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_torch_compile_fullgraph(backend):
    gate_up = torch.randn(6, 2 * 37, device=DEVICE, requires_grad=True)

    def f(t):
        return swiglu(t * 1.5)

    compile_backend = "inductor" if (backend == "eager" or CUDA) else "aot_eager"
    with use_backend(backend):
        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True, backend=compile_backend)(gate_up)
        (grad,) = torch.autograd.grad(out.sum(), gate_up)
    leaf = gate_up.detach().double().requires_grad_()
    ref = swiglu64(leaf * 1.5)
    (ref_grad,) = torch.autograd.grad(ref.sum(), leaf)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(62976, 2 * 1536), (96 * 901, 2 * 1536), (1000, 2 * 8192), (33, 2 * 123)], ids=str)
def test_cuda_large(dtype, shape):
    _check("triton", shape, dtype, device="cuda")

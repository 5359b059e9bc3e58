"""The kernels' shared sigmoid (``hrm_kernels._math``) against float64: the exact path everywhere,
the one-instruction tanh path on CUDA within its documented 2^-12 absolute error."""

import pytest
import torch
import triton
import triton.language as tl

from hrm_kernels import _math
from tests.conftest import DEVICE, requires_cuda


@triton.jit
def _sigmoid_kernel(X, Y, n, FAST: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    tl.store(Y + i, _math.sigmoid(tl.load(X + i, mask=mask, other=0.0), FAST), mask=mask)


def _inputs():
    # densely from where the sigmoid is about 1e-35 (still a normal fp32) to 1, plus random logits
    return torch.cat((torch.linspace(-80, 20, 100_001), 4 * torch.randn(20_000))).to(DEVICE)


def _sigmoid(x, fast):
    y = torch.empty_like(x)
    _sigmoid_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), FAST=fast, BLOCK=1024)
    return y


def test_exact_path_matches_float64():
    x = _inputs()
    ref = torch.sigmoid(x.double())
    rel = (_sigmoid(x, False).double() - ref).abs() / ref
    # a few fp32 roundings, plus (on the GPU) exp's argument x * log2(e) rounded to fp32: |x| ulps
    bound = 2.0 ** -22 * (1 + x.double().abs())
    assert (rel <= bound).all(), (rel / bound).max().item()


@requires_cuda
def test_fast_path_within_its_bound():
    x = _inputs()
    ref = torch.sigmoid(x.double())
    err = (_sigmoid(x, True).double() - ref).abs()
    assert err.max().item() <= 2.0 ** -11.9, err.max().item()  # tanh.approx: relative error 2^-10.99
    assert err.max().item() > 0  # it is the approximate path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fast_path_only_for_two_byte_activations_on_the_gpu(dtype, monkeypatch):
    expected = dtype != torch.float32 and DEVICE.type == "cuda" and torch.version.hip is None
    assert _math.fast_sigmoid_for(dtype) is expected
    monkeypatch.setattr(_math, "FAST_SIGMOID", False)
    assert _math.fast_sigmoid_for(dtype) is False

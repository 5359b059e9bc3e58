"""An empty last dimension (a zero-width feature axis) takes the fused path to the eager result: the
rows were once viewed with ``reshape(-1, 0)``, which torch refuses as ambiguous."""

from __future__ import annotations

import pytest
import torch

import hrm_kernels as hk
from hrm_kernels import use_backend
from tests.conftest import DEVICE


def _cases():
    def r(*shape):
        return torch.randn(*shape, device=DEVICE)

    return {
        "swiglu": (hk.swiglu, lambda: (r(3, 0),), (3, 0)),
        "swiglu_linear": (hk.swiglu_linear, lambda: (r(3, 0), r(4, 0)), (3, 4)),
        "gated_blend": (hk.gated_blend, lambda: (r(2, 3, 0), r(2, 3, 0), None, r(4, 0), r(4), r(0, 4), r(0)), (2, 3, 0)),
        "linear_add_rms_norm K=0": (hk.linear_add_rms_norm, lambda: (r(3, 0), r(5, 0), r(3, 5), 1e-5), (3, 5)),
        "linear_add_rms_norm N=0": (hk.linear_add_rms_norm, lambda: (r(3, 4), r(0, 4), r(3, 0), 1e-5), (3, 0)),
        "add3": (hk.add3, lambda: (r(3, 0), r(3, 0), r(3, 0)), (3, 0)),
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_empty_last_dimension_matches_eager(name):
    op, make, shape = _cases()[name]
    torch.manual_seed(0)
    args = make()
    with use_backend("triton"):
        got = op(*args)
    with use_backend("eager"):
        want = op(*args)
    assert got.shape == want.shape == shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

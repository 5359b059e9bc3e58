"""reset_rows: HRM's carry reset, bit for bit the torch.where it replaces; errors; the model's use."""

import sys

import pytest
import torch

from hrm_kernels import use_backend
from hrm_kernels.reset_rows import reset_rows, reset_rows_reference
from tests.conftest import DEVICE, record_calls

reset_rows_module = sys.modules["hrm_kernels.reset_rows"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(5, 37), (7, 9, 123), (3, 2, 5, 40), (1, 760)], ids=str)
def test_bit_identical_to_torch_where(monkeypatch, shape, dtype):
    torch.manual_seed(len(shape) * 100 + shape[-1])
    x = torch.randn(shape, device=DEVICE).to(dtype)
    init = torch.randn(shape[-1], device=DEVICE).to(dtype)
    reset = torch.rand(shape[0], device=DEVICE) < 0.5
    reset[0] = True  # both kinds of rows
    if shape[0] > 1:
        reset[-1] = False
    calls = record_calls(monkeypatch, reset_rows_module, "launch")
    with use_backend("triton"), torch.no_grad():
        got = reset_rows(x, reset, init)
    assert len(calls) == 1  # the kernel ran
    want = torch.where(reset.view(-1, *(1,) * (x.dim() - 1)), init, x)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(got[0], init.expand_as(got[0]))


def test_a_strided_flag_reads_its_own_rows():
    """A flag that is a view with a stride (a column of a larger mask, every other element)."""
    x = torch.randn(3, 4, 9, device=DEVICE)
    init = torch.randn(9, device=DEVICE)
    flags = torch.tensor([[True, False], [False, True], [True, True]], device=DEVICE)
    every_other = torch.tensor([True, True, False, False, True, False], device=DEVICE)[::2]
    for reset in (flags[:, 0], every_other):
        assert not reset.is_contiguous()
        with use_backend("triton"), torch.no_grad():
            assert torch.equal(reset_rows(x, reset, init), reset_rows_reference(x, reset, init))


def test_empty_batch_and_the_eager_path():
    x = torch.empty(0, 3, 8, device=DEVICE)
    with use_backend("triton"):
        assert reset_rows(x, torch.zeros(0, dtype=torch.bool, device=DEVICE), torch.zeros(8, device=DEVICE)).shape == x.shape
    x, init, reset = torch.randn(4, 6), torch.randn(6), torch.tensor([True, False, True, False])
    with use_backend("eager"):
        assert torch.equal(reset_rows(x, reset, init), reset_rows_reference(x, reset, init))


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_out_is_written_and_may_be_x(monkeypatch, backend):
    """``out=``: the result lands there (the kernel or torch.where's), the same bits; ``out`` may be x
    itself (each element read before it is written, by the same program)."""
    torch.manual_seed(11)
    x = torch.randn(6, 5, 37, device=DEVICE)
    init = torch.randn(37, device=DEVICE)
    reset = torch.tensor([True, False, False, True, False, True], device=DEVICE)
    want = reset_rows_reference(x, reset, init)
    calls = record_calls(monkeypatch, reset_rows_module, "launch")
    with use_backend(backend), torch.no_grad():
        out = torch.randn_like(x)  # not zeros: every element must be written
        assert reset_rows(x, reset, init, out=out) is out
        assert torch.equal(out, want)
        assert reset_rows(x, reset, init, out=x) is x
        assert torch.equal(x, want)
    assert len(calls) == (2 if backend == "triton" else 0)


def test_bad_inputs_are_named():
    x, init = torch.randn(4, 6), torch.randn(6)
    with pytest.raises(ValueError, match="reset must be a bool \\[4\\]"):
        reset_rows(x, torch.ones(4), init)
    with pytest.raises(ValueError, match="reset must be a bool \\[4\\]"):
        reset_rows(x, torch.ones(3, dtype=torch.bool), init)
    with pytest.raises(ValueError, match="init must be \\[6\\] in x's dtype"):
        reset_rows(x, torch.ones(4, dtype=torch.bool), init.double())
    with pytest.raises(ValueError, match="at least 2-D"):
        reset_rows(init, torch.ones(6, dtype=torch.bool), init)
    flags = torch.ones(4, dtype=torch.bool)
    for out in (torch.empty(4, 5), torch.empty(4, 6, dtype=torch.float64), torch.empty(6, 4).t()):
        with pytest.raises(ValueError, match="out must be a contiguous torch.float32 tensor of x's shape"):
            reset_rows(x, flags, init, out=out)


def test_the_model_resets_its_carry_through_it(monkeypatch):
    """HRMInner.reset_carry: the halted rows at H_init / L_init, the others unchanged, by the kernel."""
    from hrm import HRM
    from tests.test_model_spec import tiny_config

    inner = HRM(tiny_config(forward_dtype="bfloat16")).inner.to(DEVICE)
    carry = inner.empty_carry(3, DEVICE)
    carry.z_H.copy_(torch.randn_like(carry.z_H))
    carry.z_L.copy_(torch.randn_like(carry.z_L))
    reset = torch.tensor([True, False, True], device=DEVICE)
    calls = record_calls(monkeypatch, reset_rows_module, "launch")
    with use_backend("triton"), torch.no_grad():
        got = inner.reset_carry(reset, carry)
    assert len(calls) == 2
    for state, init, old in ((got.z_H, inner.H_init, carry.z_H), (got.z_L, inner.L_init, carry.z_L)):
        assert torch.equal(state[0], init.expand_as(state[0])) and torch.equal(state[2], init.expand_as(state[2]))
        assert torch.equal(state[1], old[1])

"""add3: a + (b + c) in one kernel, bit-identical to the eager expression it replaces (HRM's ungated
module input), gradients, errors, torch.compile, and the model's use of it."""

import sys

import pytest
import torch

from hrm_kernels import add3, add3_reference, use_backend
from tests.conftest import CUDA, DEVICE, record_calls, requires_cuda

add3_module = sys.modules["hrm_kernels.add3"]  # (the package's ``add3`` is the function)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (37,), (3, 123), (2, 5, 760), (4097,)]


def _inputs(shape, dtype, device=DEVICE):
    # different scales, so that b + c rounds and the intermediate rounding matters
    return [(torch.randn(shape, device=device) * s).to(dtype) for s in (1.0, 30.0, 0.01)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_identical_to_eager(monkeypatch, shape, dtype):
    a, b, c = _inputs(shape, dtype)
    calls = record_calls(monkeypatch, add3_module, "add3_forward")
    with use_backend("triton"):
        got = add3(a, b, c)
    assert len(calls) == 1  # the kernel ran
    want = a + (b + c)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_gradients(backend):
    a, b, c = (t.requires_grad_() for t in _inputs((3, 123), torch.float32))
    dout = torch.randn(3, 123, device=DEVICE)
    with use_backend(backend):
        add3(a, b, c).backward(dout)
    for t in (a, b, c):
        assert torch.equal(t.grad, dout)


def test_one_input_without_grad():
    a, b, c = _inputs((5, 37), torch.float32)
    c.requires_grad_()
    with use_backend("triton"):
        add3(a, b, c).sum().backward()
    assert torch.equal(c.grad, torch.ones_like(c))


def test_non_contiguous_and_empty():
    """Three layouts at once: a strided view with gaps, a transposed tensor and a dense one."""
    a = torch.randn(6, 74, device=DEVICE)[:, ::2]
    b = torch.randn(37, 6, device=DEVICE).t()
    c = torch.randn(6, 37, device=DEVICE)
    with use_backend("triton"):
        got = add3(a, b, c)
        empty = add3(*(torch.empty(0, 4, device=DEVICE) for _ in range(3)))
    assert torch.equal(got, a + (b + c))
    assert empty.shape == (0, 4) and empty.numel() == 0
    with use_backend("triton"):  # the registered op itself (what torch.compile calls) takes any layout too
        direct = torch.ops.hrm_kernels.add3(a, b, c)
    assert torch.equal(direct, a + (b + c)) and direct.is_contiguous()


def test_clear_errors():
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"c has shape \(4, 1\) but a has shape \(4, 8\)"):
        add3(a, a, torch.randn(4, 1))
    with pytest.raises(TypeError, match="b has dtype torch.float16 but a has dtype torch.float32"):
        add3(a, a.half(), a)
    with pytest.raises(TypeError, match="c has dtype torch.int32"):
        add3(a, a, torch.ones(4, 8, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_torch_compile_fullgraph(monkeypatch, backend):
    a, b, c = _inputs((6, 37), torch.float32)
    c.requires_grad_()
    compile_backend = "inductor" if (backend == "eager" or CUDA) else "aot_eager"
    calls = record_calls(monkeypatch, add3_module, "add3_forward")
    with use_backend(backend):
        torch._dynamo.reset()
        out = torch.compile(lambda x, y, z: add3(x * 2.0, y, z), fullgraph=True, backend=compile_backend)(a, b, c)
        (grad,) = torch.autograd.grad(out.sum(), c)
    assert len(calls) == (backend == "triton")  # the custom op's kernel, once
    assert torch.equal(out, add3_reference(a * 2.0, b, c))
    assert torch.equal(grad, torch.ones_like(c))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(768, 82, 512), (96, 901, 512), (33, 123)], ids=str)
def test_cuda_large(shape, dtype):
    a, b, c = _inputs(shape, dtype, device="cuda")
    with use_backend("triton"):
        assert torch.equal(add3(a, b, c), a + (b + c))


def test_model_ungated_input_bit_identical(monkeypatch):
    """The ungated L modules' input runs through add3 with ``ReasoningModule.FUSED_INPUT``, and the
    loss, outputs and every gradient of a bf16 training segment (where the intermediate rounding
    matters) are bit-identical with it off."""
    from hrm import ACTLossHead, HRM
    from hrm.model import HRMInner, ReasoningModule
    from tests.test_model_spec import make_batch, randomize_, tiny_config

    # pending norms off: on a Hopper GPU the no-gradient calls would sum their pending inputs in
    # normed_add instead (tests/test_normed_add.py), leaving add3 the with-gradient calls only
    monkeypatch.setattr(HRMInner, "PENDING_NORMS", False)
    torch.manual_seed(7)
    model = HRM(tiny_config(use_gating=False, puzzle_emb_ndim=32, H_layers=1, L_layers=1, H_cycles=1,
                            L_cycles=2, halt_exploration_prob=0.0, kernels="triton", forward_dtype="bfloat16",
                            cuda_graphs=False)).to(DEVICE)  # (a graph's capture runs each call thrice)
    randomize_(model)
    batch = {k: v.to(DEVICE) for k, v in make_batch(None).items()}
    calls = record_calls(monkeypatch, add3_module, "add3_forward")
    monkeypatch.setattr(ReasoningModule, "FUSED_INPUT", True)
    with torch.no_grad():  # states of other dtypes or shapes take the eager sum
        x = torch.randn(2, 3, 32, device=DEVICE, dtype=torch.bfloat16)
        assert torch.equal(model.inner.L_level._input_sum(x, x.float(), x), x + (x.float() + x))
    assert not calls

    def run(fused):
        monkeypatch.setattr(ReasoningModule, "FUSED_INPUT", fused)
        model.zero_grad(set_to_none=True)
        head = ACTLossHead(model)
        head.train()
        _, loss, _, outputs, _ = head(return_keys=("logits",), carry=head.initial_carry(batch), batch=batch)
        loss.backward()
        return [loss, outputs["logits"]] + [p.grad for p in model.parameters() if p.grad is not None]

    fused = run(True)
    # the segment's two L calls (the first without gradients, the last with) and the continue
    # target pass's two
    assert len(calls) == 4
    unfused = run(False)
    assert len(calls) == 4
    assert len(fused) == len(unfused) > 3
    for f, u in zip(fused, unfused):
        assert torch.equal(f, u)

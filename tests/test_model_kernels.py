"""The model on the fused kernels (Triton; the interpreter on CPU) vs the eager path, and under
torch.compile (no graph break in the recurrent core)."""

from __future__ import annotations

import pytest
import torch

from hrm import ACTLossHead, HRM
from hrm_kernels import use_backend
from hrm_kernels.backend import triton_can_run
from tests.test_model_spec import _single_thread, assert_close, make_batch, randomize_, tiny_config  # noqa: F401

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not triton_can_run(DEVICE),
                                  reason="Triton cannot run here (no CUDA and TRITON_INTERPRET unset)")

# Small enough for the interpreter: one block per module, one cycle each.
FUSED = dict(use_gating=True, puzzle_emb_ndim=32, H_layers=1, L_layers=1, H_cycles=1, L_cycles=2,
             halt_exploration_prob=0.0, gate_reg_weight=0.5)


def _run(kernels, state, batch, compile_backend=None):
    model = HRM(tiny_config(**FUSED, kernels=kernels)).to(DEVICE)
    model.load_state_dict(state)
    head = ACTLossHead(model)
    head.train()
    head.set_step(1)
    fn = torch.compile(head, backend=compile_backend, fullgraph=False) if compile_backend else head
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    torch.manual_seed(0)
    _, loss, metrics, outputs, _ = fn(return_keys=("logits", "q_halt_logits", "q_continue_logits"),
                                      carry=head.initial_carry(batch), batch=batch)
    loss.backward()
    grads = {n: p.grad for n, p in head.named_parameters()}
    grads["puzzle_rows"] = model.inner.puzzle_emb.local_weights.grad
    # On the CPU for the comparisons (the reference run too, whatever DEVICE is).
    cpu = lambda d: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in d.items()}  # noqa: E731
    return loss.detach().cpu(), cpu(metrics), cpu(outputs), cpu(grads)


@pytest.fixture(scope="module")
def reference_run():
    torch.manual_seed(1234)
    model = HRM(tiny_config(**FUSED, kernels="eager"))
    randomize_(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = make_batch(None)
    return state, batch, _run("eager", state, batch)


@needs_triton
def test_fused_kernels_match_eager(reference_run):
    """Outputs, gate statistics, the regularised loss and every gradient (fp32, so the
    interpreter's tl.dot is exact enough for tight bounds)."""
    state, batch, (loss_e, metrics_e, out_e, grads_e) = reference_run
    loss_t, metrics_t, out_t, grads_t = _run("triton", state, batch)
    for key in out_e:
        assert_close(key, out_t[key].cpu(), out_e[key], rtol=2e-5)
    assert_close("loss", loss_t.cpu(), loss_e, rtol=2e-5)
    for key, value in metrics_e.items():
        if key.startswith("gate/") or key.endswith("loss"):
            assert_close(key, metrics_t[key].cpu(), value, rtol=2e-5)
    assert "gate_reg_loss" in metrics_t
    for name, g in grads_e.items():
        assert grads_t[name] is not None, name
        assert_close(f"grad {name}", grads_t[name].cpu(), g, rtol=1e-4)


@pytest.mark.parametrize("kernels", ["eager", pytest.param("triton", marks=needs_triton)])
def test_torch_compile_matches_eager(reference_run, kernels):
    """torch.compile of the whole loss head in training mode (aot_eager: dynamo + AOT autograd,
    without Inductor's slow C++ build on CI) gives the eager results."""
    torch._dynamo.reset()
    state, batch, (loss_e, metrics_e, out_e, grads_e) = reference_run
    loss_c, metrics_c, out_c, grads_c = _run(kernels, state, batch, compile_backend="aot_eager")
    for key in out_e:
        assert_close(key, out_c[key].cpu(), out_e[key], rtol=2e-5)
    assert_close("loss", loss_c.cpu(), loss_e, rtol=2e-5)
    for name, g in grads_e.items():
        assert_close(f"grad {name}", grads_c[name].cpu(), g, rtol=1e-4)


@pytest.mark.parametrize("kernels", ["eager", pytest.param("triton", marks=needs_triton)])
def test_recurrent_core_compiles_without_graph_breaks(kernels):
    torch._dynamo.reset()
    model = HRM(tiny_config(**FUSED, kernels=kernels)).to(DEVICE)
    batch = {k: v.to(DEVICE) for k, v in make_batch(None).items()}
    model.train()
    carry = model.initial_carry(batch)
    inner_carry = model.inner.reset_carry(carry.halted, carry.inner_carry)
    with use_backend(kernels):
        explanation = torch._dynamo.explain(model.inner)(inner_carry, batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # and the whole ACT step (with the kernel-selection context inside forward)
    explanation = torch._dynamo.explain(model)(carry, batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_inductor_compile_of_eager_model_matches():
    """The default backend (Inductor) on the eager-kernel model, evaluation mode."""
    torch._dynamo.reset()
    torch.manual_seed(3)
    cfg = tiny_config(use_gating=True, H_layers=1, L_layers=1, H_cycles=1, L_cycles=1)
    model = HRM(cfg)
    randomize_(model)
    model.eval()
    batch = make_batch(None)
    compiled = torch.compile(model.inner, fullgraph=True)
    carry = model.inner.reset_carry(torch.ones(batch["inputs"].shape[0], dtype=torch.bool),
                                    model.inner.empty_carry(batch["inputs"].shape[0]))
    with torch.no_grad():
        want = model.inner(carry, batch)
        got = compiled(carry, batch)
    assert_close("logits", got[1], want[1], rtol=1e-5)
    assert_close("q_halt", got[2][0], want[2][0], rtol=1e-5)
    assert_close("gate stats", got[3], want[3], rtol=1e-5)


def _bf16_model_step(state, forward_dtype, kernels):
    """One training segment of the gated model with the parameters ``state``: (head, loss,
    metrics, outputs, carry); the same batch and random draws for every call."""
    model = HRM(tiny_config(use_gating=True, puzzle_emb_ndim=32, forward_dtype=forward_dtype, kernels=kernels,
                            attn_backend="auto"))
    model.load_state_dict(state)
    head = ACTLossHead(model)
    head.train()
    torch.manual_seed(5)
    batch = make_batch(None)
    torch.manual_seed(7)
    carry, loss, metrics, outputs, _ = head(return_keys=("logits", "q_halt_logits"), carry=head.initial_carry(batch),
                                            batch=batch)
    loss.backward()
    return head, loss, metrics, outputs, carry


@pytest.mark.parametrize("kernels", ["auto", "eager"])
def test_bfloat16_activations_with_fp32_parameters(kernels):
    """The default forward dtype: bf16 carry and logits, fp32 parameters and Q values; the logits
    within bf16's reach of the float32 model with the same parameters (eager bf16: 1.7% of their
    scale here; the fused kernels: at most 3x eager bf16's error, checked on CUDA only: the
    interpreter's bf16 tl.dot is wrong)."""
    torch.manual_seed(0)
    state = HRM(tiny_config(use_gating=True, puzzle_emb_ndim=32, forward_dtype="float32")).state_dict()
    head, loss, metrics, outputs, carry = _bf16_model_step(state, "bfloat16", kernels)
    model = head.model
    assert carry.inner_carry.z_H.dtype == torch.bfloat16 and outputs["logits"].dtype == torch.bfloat16
    assert outputs["q_halt_logits"].dtype == torch.float32 and model.inner.H_init.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
               for p in head.parameters())
    assert torch.isfinite(loss) and metrics["gate/L/own_mean"].dtype == torch.float32
    want = _bf16_model_step(state, "float32", "eager")[3]["logits"]
    err = (outputs["logits"].float() - want).abs().max().item()
    scale = want.abs().max().item()
    if kernels == "eager":
        assert err <= 0.05 * scale, f"bf16 logits off by {err:.3g} (scale {scale:.3g})"
    elif torch.cuda.is_available():
        eager = _bf16_model_step(state, "bfloat16", "eager")[3]["logits"]
        eager_err = (eager.float() - want).abs().max().item()
        assert err <= 3 * eager_err + 1e-2 * scale, f"bf16 logits off by {err:.3g}, eager bf16 by {eager_err:.3g}"


def test_act_steps_compile_once():
    """Training segments register no module, parameter or buffer (the count that ``hrm.cuda_graphs``
    and torch.compile's guards read: a ModuleList sliced inside forward registers its modules
    anew every call, and on an H100 made every compiled step recompile until torch.compile gave
    up), and consecutive segments of a compiled model reuse its graph. On the CPU that slicing
    recompiles nothing (no guard there reads the count): the count is what catches it."""
    import hrm.cuda_graphs

    torch._dynamo.reset()
    model = HRM(tiny_config(**FUSED, kernels="eager")).to(DEVICE)
    model.train()
    batch = {k: v.to(DEVICE) for k, v in make_batch(None).items()}
    carry = model.initial_carry(batch)
    before = hrm.cuda_graphs._registrations
    carry, _ = model(carry, batch)
    assert hrm.cuda_graphs._registrations == before
    compiled = torch.compile(model, backend="eager")
    before = hrm.cuda_graphs._registrations  # (the wrapper registers the model as its submodule)
    carry, _ = compiled(carry, batch)  # first call: compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            carry, outputs = compiled(carry, batch)
    assert hrm.cuda_graphs._registrations == before
    assert torch.isfinite(outputs["target_q_continue"]).all()

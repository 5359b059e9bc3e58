"""Gate monitoring (ACTLossHead's gate/* metrics) against gates materialised from the blend's own
inputs, and the gate-saturation regulariser (value, warm-up, gradient direction)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hrm.model
from hrm import ACTLossHead, HRM, reduce_metrics
from tests.test_model_spec import _single_thread, make_batch, randomize_, tiny_config  # noqa: F401

LN9 = math.log(9.0)


class BlendRecorder:
    """Wraps ``hrm.model.gated_blend`` to keep the arguments of every call made with stats."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = hrm.model.gated_blend

        def spy(own, other, inj, w1, b1, w2, b2, *, stats=False, saturation=False):
            if stats:
                self.calls.append(tuple(t.detach().clone() if t is not None else None
                                        for t in (own, other, inj, w1, b1, w2, b2)))
            return real(own, other, inj, w1, b1, w2, b2, stats=stats, saturation=saturation)

        monkeypatch.setattr(hrm.model, "gated_blend", spy)


def materialised_metrics(call, module, saturation):
    own, other, inj, w1, b1, w2, b2 = (t.double() if t is not None else None for t in call)
    src = {"own": own, "other": other, "inj": inj}
    z = F.linear(F.silu(F.linear(torch.cat([own, other, inj if inj is not None else torch.zeros_like(own)], -1),
                                 w1, b1)), w2, b2)
    kinds = ("own", "other", "inj") if inj is not None else ("own", "other")
    out, contrib = {}, {}
    for i, kind in enumerate(kinds):
        zk = z.chunk(3, -1)[i]
        g = torch.sigmoid(zk)
        contrib[kind] = (g * src[kind]).abs().mean()
        out[f"gate/{module}/{kind}_mean"] = g.mean()
        out[f"gate/{module}/{kind}_frac_low"] = (g < 0.1).double().mean()
        out[f"gate/{module}/{kind}_frac_high"] = (g > 0.9).double().mean()
        out[f"gate/{module}/{kind}_contribution"] = contrib[kind]
        if saturation:
            out[f"gate/{module}/{kind}_saturation"] = torch.relu(zk.abs() - LN9).square().mean()
    total = sum(contrib.values())
    for kind in kinds:
        out[f"gate/{module}/{kind}_share"] = contrib[kind] / total
    return out


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("reg_weight", [0.0, 0.2], ids=["monitor", "regulariser"])
def test_gate_metrics_match_materialised_gates(monkeypatch, training, reg_weight):
    """Every gate/* metric against the gates materialised in float64; the saturation metric only
    with the regulariser on (its column is computed only then)."""
    model = HRM(tiny_config(use_gating=True, puzzle_emb_ndim=32, gate_reg_weight=reg_weight))
    randomize_(model, scale=1.0)  # spread the gates over (0, 1): some below 0.1, some above 0.9
    with torch.no_grad():
        for level in (model.inner.L_level, model.inner.H_level):
            level.gating_network.gate_proj[2].bias.normal_(0, 3)
    head = ACTLossHead(model)
    head.train(training)
    recorder = BlendRecorder(monkeypatch)
    batch = make_batch(None)
    carry = head.initial_carry(batch)
    for _ in range(2):
        recorder.calls.clear()
        carry, _, metrics, outputs, _ = head(return_keys=("gate_stats",), carry=carry, batch=batch)
        # exactly one stats call per module per segment: the with-grad step (not the Q-target pass)
        assert len(recorder.calls) == 2
        assert outputs["gate_stats"].shape == (2, 3, 5 if reg_weight else 4)
        expected = {**materialised_metrics(recorder.calls[0], "L", reg_weight > 0),
                    **materialised_metrics(recorder.calls[1], "H", reg_weight > 0)}
        assert recorder.calls[1][2] is None  # H's injection is zeros: inj=None
        got = {k: v for k, v in metrics.items() if k.startswith("gate/") and k != "gate/count"}
        assert set(got) == set(expected)
        assert not any(k.startswith("gate/H/inj") for k in got)
        for key, value in expected.items():
            assert got[key].dim() == 0 and got[key].dtype == torch.float32
            assert abs(got[key].item() - value.item()) <= 1e-5 * max(1.0, abs(value.item())), key
        assert 0 < expected["gate/L/own_frac_low"] < 1 and 0 < expected["gate/L/own_frac_high"] < 1
        assert float(metrics["gate/count"]) == 1.0


def test_ungated_model_has_no_gate_metrics():
    head = ACTLossHead(HRM(tiny_config()))
    batch = make_batch(None)
    _, _, metrics, outputs, _ = head(return_keys=("gate_stats",), carry=head.initial_carry(batch), batch=batch)
    assert not any(k.startswith("gate") for k in metrics) and "gate_stats" not in outputs


def _reg_head(weight, warmup, bias):
    model = HRM(tiny_config(use_gating=True, gate_reg_weight=weight, gate_reg_warmup_steps=warmup,
                            gate_init_bias=bias, halt_exploration_prob=0.0))
    head = ACTLossHead(model)
    head.train()
    return head


def test_gate_regulariser_value_and_warmup():
    head = _reg_head(weight=0.2, warmup=10, bias=-4.0)  # sigmoid(-4) = 0.018: saturated low gates
    batch = make_batch(None)
    for step, scale in ((0, 0.0), (5, 0.1), (10, 0.2), (1000, 0.2)):
        head.set_step(step)
        torch.manual_seed(0)
        _, loss, metrics, outputs, _ = head(return_keys=("gate_stats",), carry=head.initial_carry(batch), batch=batch)
        sat = outputs["gate_stats"][:, :, 4]
        penalty = torch.stack([sat[0, 0], sat[0, 1], sat[0, 2], sat[1, 0], sat[1, 1]]).mean()
        assert penalty > 0
        expected = scale * batch["inputs"].shape[0] * penalty
        assert torch.allclose(metrics["gate_reg_loss"], expected, rtol=1e-6, atol=1e-9), step
        base = metrics["lm_loss"] + 0.5 * (metrics["q_halt_loss"] + metrics["q_continue_loss"])
        assert torch.allclose(loss.detach().double(), base.double() + expected.double(), rtol=1e-6)
    # logged the reference way (losses / global batch): w * mean saturation
    logged = reduce_metrics(metrics, global_batch_size=batch["inputs"].shape[0])
    assert abs(logged["train/gate_reg_loss"] - 0.2 * penalty.item()) < 1e-6
    # without warm-up the full weight applies from step 0
    assert _reg_head(weight=0.3, warmup=0, bias=-2.2).gate_reg_weight_at(0) == 0.3


@pytest.mark.parametrize("weight", [0.0, 0.2])
def test_gate_stats_carry_a_gradient_only_for_the_regulariser(weight):
    """Stats that are only logged have no saturation column and no gradient, so the gate kernels'
    backward skips the saturation term (CUDA graphs record a backward for every output that
    requires grad)."""
    model = HRM(tiny_config(use_gating=True, gate_reg_weight=weight))
    model.train()
    batch = make_batch(None)
    _, outputs = model(model.initial_carry(batch), batch)
    assert outputs["gate_stats"].shape == (2, 3, 5 if weight > 0 else 4)
    assert outputs["gate_stats"].requires_grad == (weight > 0)


def test_gate_regulariser_is_off_by_default():
    head = ACTLossHead(HRM(tiny_config(use_gating=True)))
    batch = make_batch(None)
    head.train()
    _, _, metrics, _, _ = head(carry=head.initial_carry(batch), batch=batch)
    assert "gate_reg_loss" not in metrics
    with pytest.raises(ValueError, match="use_gating"):
        HRM(tiny_config(gate_reg_weight=0.1))  # a regulariser without gates is a config mistake


def _gate_grads(head, batch, step):
    head.zero_grad(set_to_none=True)
    head.set_step(step)
    torch.manual_seed(0)
    _, loss, _, _, _ = head(carry=head.initial_carry(batch), batch=batch)
    loss.backward()
    return {n: p.grad.clone() for n, p in head.named_parameters() if "gating_network" in n}


@pytest.mark.parametrize("bias", [-4.0, 4.0], ids=["closed", "open"])
def test_gate_regulariser_gradient_pushes_gates_to_the_middle(bias):
    head = _reg_head(weight=1.0, warmup=0, bias=bias)
    batch = make_batch(None)
    with_reg = _gate_grads(head, batch, step=1)
    head.gate_reg_scale.fill_(0.0)
    torch.manual_seed(0)
    head.zero_grad(set_to_none=True)
    _, loss, _, _, _ = head(carry=head.initial_carry(batch), batch=batch)
    loss.backward()
    without = {n: p.grad.clone() for n, p in head.named_parameters() if "gating_network" in n}
    reg = {n: with_reg[n] - without[n] for n in with_reg}
    for name, g in reg.items():  # the regulariser's gradient reaches every gate parameter
        assert g.abs().max() > 0, name
    # saturated closed gates (z < -ln 9) are pushed up, saturated open ones down: a gradient step
    # on the output bias moves it towards 0
    for level in ("L", "H"):
        db2 = reg[f"model.inner.{level}_level.gating_network.gate_proj.2.bias"]
        kinds = 3 if level == "L" else 2
        d = db2.shape[0] // 3
        live = db2[: kinds * d]
        assert (torch.sign(live) == math.copysign(1.0, bias)).float().mean() > 0.9, level

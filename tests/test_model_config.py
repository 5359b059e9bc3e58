"""HRMConfig: reference defaults, hydra-style input, validation messages that name the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hrm import ACTLossHead, HRM, HRMConfig

DATA = dict(batch_size=4, seq_len=81, vocab_size=11, num_puzzle_identifiers=1000)


def test_defaults_are_hrm_v1():
    c = HRMConfig(**DATA)
    assert (c.H_cycles, c.L_cycles, c.H_layers, c.L_layers) == (2, 2, 4, 4)
    assert (c.hidden_size, c.num_heads, c.expansion, c.pos_encodings, c.rope_theta) == (512, 8, 4, "rope", 10000.0)
    assert c.puzzle_emb_ndim == 512 and c.puzzle_emb_len == 1 and c.intermediate_size == 1536
    assert (c.halt_max_steps, c.halt_exploration_prob, c.rms_norm_eps, c.forward_dtype) == (16, 0.1, 1e-5, "bfloat16")
    assert (c.use_gating, c.gate_hidden_ratio, c.gate_init_bias) == (False, 0.25, -2.2)
    assert (c.kernels, c.attn_backend, c.gate_reg_weight, c.gate_reg_warmup_steps) == ("auto", "auto", 0.0, 0)
    assert c.loss.loss_type == "stablemax_cross_entropy"
    # hrm_v1_gated is hrm_v1 + use_gating and nothing else
    g = HRMConfig(**DATA, use_gating=True)
    assert g.model_dump(exclude={"use_gating"}) == c.model_dump(exclude={"use_gating"})
    assert g.gate_hidden_size == 128


def test_reference_arch_group_is_accepted():
    arch = dict(name="hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1",
                loss=dict(name="losses@ACTLossHead", loss_type="softmax_cross_entropy"),
                halt_exploration_prob=0.1, halt_max_steps=16, H_cycles=2, L_cycles=2, H_layers=1, L_layers=1,
                hidden_size=64, num_heads=2, expansion=4, puzzle_emb_ndim=64, pos_encodings="learned", causal=False)
    model = HRM({**arch, **DATA, "forward_dtype": "float32"})
    assert ACTLossHead(model).loss_type == "softmax_cross_entropy"
    assert model.config.pos_encodings == "learned"


@pytest.mark.parametrize("bad, field, text", [
    (dict(hidden_size=100, num_heads=8), "hidden_size", "divisible by num_heads"),
    (dict(gate_hidden_ratio=0.0), "gate_hidden_ratio", "greater than 0"),
    (dict(use_gating=True, gate_hidden_ratio=0.001), "gate_hidden_ratio", ">= 1"),
    (dict(forward_dtype="fp8"), "forward_dtype", "bfloat16"),
    (dict(loss={"loss_type": "mse"}), "loss.loss_type", "stablemax_cross_entropy"),
    (dict(pos_encodings="alibi"), "pos_encodings", "rope"),
    (dict(kernels="cuda"), "kernels", "triton"),
    (dict(attn_backend="xformers"), "attn_backend", "sdpa"),
    (dict(halt_exploration_prob=1.5), "halt_exploration_prob", "less than or equal to 1"),
    (dict(halt_max_steps=0), "halt_max_steps", "greater than or equal to 1"),
    (dict(gate_reg_weight=-1.0), "gate_reg_weight", "greater than or equal to 0"),
    (dict(gate_reg_weight=0.1), "gate_reg_weight", "use_gating"),
    (dict(use_gatng=True), "use_gatng", "Extra inputs"),
    (dict(causal=True), "causal", "bidirectional"),
])
def test_invalid_values_name_the_field(bad, field, text):
    with pytest.raises(ValidationError) as info:
        HRMConfig(**{**DATA, **bad})
    msg = str(info.value)
    assert field in msg and text in msg, msg


def test_missing_data_fields_are_reported():
    with pytest.raises(ValidationError) as info:
        HRMConfig(hidden_size=64, num_heads=2)
    for field in DATA:
        assert field in str(info.value)


def test_loss_head_rejects_unknown_loss():
    model = HRM({**DATA, "hidden_size": 32, "num_heads": 2, "H_layers": 1, "L_layers": 1, "forward_dtype": "float32"})
    with pytest.raises(ValueError, match="loss_type"):
        ACTLossHead(model, loss_type="mse")

"""Checkpoint keys and loading: our own round trips and reference-style key sets."""

from __future__ import annotations

import pytest
import torch

from hrm import ACTLossHead, HRM, load_checkpoint
from tests.test_model_spec import _single_thread, make_batch, randomize_, tiny_config  # noqa: F401

REFERENCE_KEYS_UNGATED = {  # a reference loss-head state dict for H_layers=1, L_layers=2, rope, puzzle emb
    "model.inner.H_init", "model.inner.L_init",
    "model.inner.embed_tokens.embedding_weight", "model.inner.lm_head.weight",
    "model.inner.q_head.weight", "model.inner.q_head.bias", "model.inner.puzzle_emb.weights",
} | {
    f"model.inner.{m}.layers.{i}.{p}.weight"
    for m, n in (("H_level", 1), ("L_level", 2)) for i in range(n)
    for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
}
GATE_KEYS = {f"model.inner.{m}_level.gating_network.gate_proj.{i}.{p}"
             for m in "HL" for i in (0, 2) for p in ("weight", "bias")}


def _head(**overrides):
    model = HRM(tiny_config(**overrides))
    randomize_(model)
    return ACTLossHead(model)


def _outputs(head, batch):
    head.eval()
    with torch.no_grad():
        carry = head.initial_carry(batch)
        _, _, _, out, _ = head(return_keys=("logits", "q_halt_logits"), carry=carry, batch=batch)
    return out


def test_state_dict_keys_are_the_references():
    head = _head(puzzle_emb_ndim=32)
    assert set(head.state_dict()) == REFERENCE_KEYS_UNGATED
    gated = _head(puzzle_emb_ndim=32, use_gating=True)
    assert set(gated.state_dict()) == REFERENCE_KEYS_UNGATED | GATE_KEYS
    learned = _head(puzzle_emb_ndim=0, pos_encodings="learned")
    assert "model.inner.embed_pos.embedding_weight" in learned.state_dict()
    assert not any("puzzle_emb" in k for k in learned.state_dict())
    bare = HRM(tiny_config(puzzle_emb_ndim=32))
    assert set(bare.state_dict()) == {k.removeprefix("model.") for k in REFERENCE_KEYS_UNGATED}
    # Non-persistent helpers (rope tables, per-batch puzzle rows, the regulariser scale) are not saved.
    assert not any(s in k for k in head.state_dict() for s in ("cos_cached", "local_weights", "local_ids", "gate_reg"))


def test_file_round_trip(tmp_path):
    src = _head(use_gating=True, puzzle_emb_ndim=32)
    path = tmp_path / "step_10"
    torch.save(src.state_dict(), path)
    dst = _head(use_gating=True, puzzle_emb_ndim=32)
    result = load_checkpoint(dst, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    batch = make_batch(None)
    assert torch.equal(_outputs(src, batch)["logits"], _outputs(dst, batch)["logits"])


@pytest.mark.parametrize("style", ["compiled-head", "bare-model", "compiled-bare", "orig-mod-inside", "wrapped"])
def test_reference_style_key_sets_load(style, tmp_path):
    src = _head(use_gating=True, pos_encodings="learned", puzzle_emb_ndim=32)
    sd = src.state_dict()
    if style == "compiled-head":  # the reference trainer: torch.compile(loss head) -> _orig_mod.model.inner...
        sd = {"_orig_mod." + k: v for k, v in sd.items()}
    elif style == "bare-model":
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
    elif style == "compiled-bare":
        sd = {"_orig_mod." + k.removeprefix("model."): v for k, v in sd.items()}
    elif style == "orig-mod-inside":  # head around a compiled model
        sd = {k.replace("model.", "model._orig_mod.", 1): v for k, v in sd.items()}
    elif style == "wrapped":  # a training checkpoint with the model's weights under "model"
        sd = {"model": sd, "step": 3}
    # reference checkpoints keep H_init / L_init in the forward dtype (bfloat16 by default)
    for key in list(sd if style != "wrapped" else sd["model"]):
        target = sd if style != "wrapped" else sd["model"]
        if key.endswith("_init"):
            target[key] = target[key].to(torch.bfloat16)
    path = tmp_path / "ckpt.pt"
    torch.save(sd, path)

    for dst in (_head(use_gating=True, pos_encodings="learned", puzzle_emb_ndim=32),
                HRM(tiny_config(use_gating=True, pos_encodings="learned", puzzle_emb_ndim=32))):
        load_checkpoint(dst, path)
        got = dst.state_dict()
        for key, value in src.state_dict().items():
            name = key if key in got else key.removeprefix("model.")
            tol = 1e-2 if key.endswith("_init") else 0.0
            assert torch.allclose(got[name], value, atol=tol, rtol=tol), key


def test_load_into_compiled_module():
    src = _head(puzzle_emb_ndim=32)
    dst = _head(puzzle_emb_ndim=32)
    dst.model = torch.compile(dst.model)  # keys model._orig_mod.inner...; compile is lazy, nothing runs
    load_checkpoint(dst, src.state_dict())
    assert torch.equal(dst.model._orig_mod.inner.lm_head.weight, src.model.inner.lm_head.weight)


def test_mismatched_keys_are_listed_with_hints():
    gated = _head(use_gating=True, puzzle_emb_ndim=32)
    plain = _head(puzzle_emb_ndim=32)
    with pytest.raises(RuntimeError) as info:
        load_checkpoint(plain, gated.state_dict())
    msg = str(info.value)
    assert "unexpected in the checkpoint (8)" in msg and "model.inner.L_level.gating_network.gate_proj.0.weight" in msg
    assert "use_gating=true" in msg
    with pytest.raises(RuntimeError) as info:
        load_checkpoint(gated, plain.state_dict())
    assert "missing from the checkpoint (8)" in str(info.value) and "use_gating=false" in str(info.value)
    # strict=False loads what matches and reports the rest
    result = load_checkpoint(gated, plain.state_dict(), strict=False)
    assert len(result.missing_keys) == 8 and result.unexpected_keys == []
    assert torch.equal(gated.model.inner.lm_head.weight, plain.model.inner.lm_head.weight)


def test_puzzle_embedding_size_mismatch():
    src = _head(puzzle_emb_ndim=32)
    with torch.no_grad():
        src.model.inner.puzzle_emb.weights.normal_()
    bigger = HRM(tiny_config(puzzle_emb_ndim=32, num_puzzle_identifiers=11))
    with pytest.raises(RuntimeError, match=r"7 puzzle identifiers, the model 11.*puzzle_emb_mismatch='mean'"):
        load_checkpoint(bigger, src.state_dict())
    load_checkpoint(bigger, src.state_dict(), puzzle_emb_mismatch="mean")
    mean_row = src.model.inner.puzzle_emb.weights.mean(0)
    assert torch.allclose(bigger.inner.puzzle_emb.weights, mean_row.expand(11, -1), atol=1e-6)
    # any other shape mismatch is an error naming the key
    wider = HRM(tiny_config(puzzle_emb_ndim=32, expansion=13.0))  # MLP width 256 -> 512
    with pytest.raises(RuntimeError, match=r"gate_up_proj.weight: checkpoint \(512, 32\) vs model \(1024, 32\)"):
        load_checkpoint(wider, src.state_dict())


def test_loading_never_unpickles_objects(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    path = tmp_path / "c.pt"
    head = _head(puzzle_emb_ndim=32)
    torch.save(head.state_dict(), path)
    load_checkpoint(head, path)
    assert calls == [True]


class _Payload:
    """Pickles to a call of ``Path.touch`` on ``marker``: loading it unsafely would create the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("kind", ["pickled_object", "truncated", "text"])
def test_unreadable_files_get_one_clear_error(kind, tmp_path):
    """A file that is not a tensor checkpoint: an error naming the file and the way out, never torch's
    advice to turn ``weights_only`` off, and no code from the file runs."""
    head = _head(puzzle_emb_ndim=32)
    path, marker = tmp_path / "step_7", tmp_path / "code_ran"
    if kind == "pickled_object":
        torch.save({"payload": _Payload(marker)}, path)
    elif kind == "truncated":
        torch.save(head.state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="is not a readable checkpoint") as error:
        load_checkpoint(head, path)
    assert str(path) in str(error.value) and "weights_only=False" not in str(error.value)
    assert not marker.exists()

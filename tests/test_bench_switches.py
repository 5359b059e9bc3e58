"""bench_train_step's --switches: every named switch is a real attribute of the model or kernel
module, is set for the run and restored after it, and a wrong name stops with the list of names."""

from __future__ import annotations

import importlib

import pytest

from benchmarks.bench_train_step import SWITCHES, switches


def _owner(name):
    module, cls, attr = SWITCHES[name]
    owner = importlib.import_module(module)
    return (getattr(owner, cls) if cls else owner), attr


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_switch_set_and_restored(name):
    owner, attr = _owner(name)
    before = getattr(owner, attr)
    assert isinstance(before, bool), (name, before)
    with switches(f"{name}={int(not before)}"):
        assert getattr(owner, attr) is (not before)
    assert getattr(owner, attr) is before


def test_combined_setting_and_bad_items():
    """A comma-separated setting sets each switch; a bad item (wrong value or unknown name) stops
    before anything is changed, naming the item and the valid names."""
    values = {name: getattr(*_owner(name)) for name in SWITCHES}
    with switches("default"):
        assert {name: getattr(*_owner(name)) for name in SWITCHES} == values
    with switches("rope_qkv=0,block_no_grad=1"):
        assert getattr(*_owner("rope_qkv")) is False and getattr(*_owner("block_no_grad")) is True
    assert {name: getattr(*_owner(name)) for name in SWITCHES} == values
    for bad in ("rope_qkv=0,rope_qkv=2", "rope_qkv=0,no_such_switch=1"):
        with pytest.raises(SystemExit) as err:
            with switches(bad):
                pass
        assert repr(bad.split(",")[1]) in str(err.value) and "block_no_grad" in str(err.value)
        assert {name: getattr(*_owner(name)) for name in SWITCHES} == values, bad


@pytest.mark.parametrize("provider,setting,want_on,label", [
    ("eager", "default", {"q_target_first_position": False, "prescaled_embeddings": False}, True),
    ("eager+compile", "add3=0", {"q_target_first_position": False, "prescaled_embeddings": False}, True),
    ("eager", "q_target_first_position=1", {"q_target_first_position": True, "prescaled_embeddings": False}, False),
    ("fused", "default", {"q_target_first_position": True, "prescaled_embeddings": True}, False),
])
def test_eager_providers_run_the_reference_work_they_do_not_override(monkeypatch, provider, setting, want_on, label):
    """The eager providers run each ``REFERENCE_WORK`` item the setting does not name (naming one
    keeps the others, and drops the "reference work" label); the fused ones run the defaults."""
    import benchmarks.bench_train_step as bench

    seen = {}

    def fake_run(*args):
        seen.update({name: getattr(*_owner(name)) for name in want_on})
        return {"provider": provider}

    monkeypatch.setattr(bench, "_run", fake_run)
    result = bench.run("sudoku", False, provider, "train", setting=setting)
    assert seen == want_on
    assert result["provider"].endswith("(reference work)") == label

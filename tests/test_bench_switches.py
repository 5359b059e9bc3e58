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


def test_default_changes_nothing_and_bad_names_are_named():
    values = {name: getattr(*_owner(name)) for name in SWITCHES}
    with switches("default"):
        assert {name: getattr(*_owner(name)) for name in SWITCHES} == values
    with pytest.raises(SystemExit, match="rope_qkv"):
        with switches("rope_qkv=2"):
            pass
    with pytest.raises(SystemExit, match="not name=0"):
        with switches("no_such_switch=1"):
            pass

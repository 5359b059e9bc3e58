"""Helpers for the trainer's tests: tiny datasets and a tiny-model override set."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A model small enough that a training step takes milliseconds on one CPU core.
TINY_ARCH = [
    "arch.hidden_size=32", "arch.num_heads=2", "arch.expansion=1", "arch.H_layers=1", "arch.L_layers=1",
    "arch.H_cycles=1", "arch.L_cycles=2", "arch.halt_max_steps=2", "arch.kernels=eager",
    "arch.forward_dtype=float32",
]
QUIET = ["wandb=false", "progress=false"]


def build_tiny_sudoku4(path: str | os.PathLike) -> str:
    """The quickstart task cut down: 240 training puzzles, 16 held-out ones (seq_len 16)."""
    from hrm.data import quickstart

    path = str(path)
    if not os.path.isfile(os.path.join(path, "test", "dataset.json")):
        with contextlib.redirect_stdout(io.StringIO()):
            quickstart.build(path, test_grids=16, train_per_grid=1, test_per_grid=1, quiet=True)
    return path


def build_tiny_arc(path: str | os.PathLike) -> str:
    """Two ARC training and two evaluation puzzles with 3 augmented copies each (seq_len 900,
    one puzzle identifier per copy)."""
    from hrm.data import arc

    path = str(path)
    if not os.path.isfile(os.path.join(path, "test", "dataset.json")):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            arc.build(path, num_aug=3, limit=2, workers=1)
    return path


def subprocess_env(**extra: str) -> dict:
    """Environment for trainer subprocesses: the repository importable, eager kernels (the
    Triton interpreter that kernel tests switch on is far too slow for training), W&B offline."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("WANDB_API_KEY", None)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HRM_KERNELS_BACKEND"] = "eager"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env

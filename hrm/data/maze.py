"""30x30 maze datasets in the reference's format, generated offline.

Characters `# SGo` -> tokens 1..5 (0 is pad; vocab 6), seq_len 900. The input shows walls '#',
open cells ' ', start 'S' and goal 'G'; the label is the same grid with the shortest S->G path
drawn as 'o'. Mazes: a random spanning tree over a 15x15 lattice of rooms (randomized depth-first
search) carved into a 30x30 cell grid, then a fraction of the remaining inner walls knocked out to
make loops; S and G are placed so that the shortest path is at least `--min-path-length` steps and
(by default) is the only shortest path, so the label is well defined.

    python -m hrm.data.maze --output-dir data/maze-30x30-hard-1k --min-path-length 110
"""

from __future__ import annotations

import random
import time
from collections import deque
from typing import Optional, Tuple

import numpy as np
from tqdm import tqdm

from .common import (SplitWriter, builder_parser, dihedral_transform, finish_build, note_limited_build,
                     write_writer_split)

CHARSET = "# SGo"
WALL, OPEN, START, GOAL, PATH = 1, 2, 3, 4, 5  # token ids (character index + 1)
DEFAULT_OUTPUT = "data/maze-30x30-hard-1k"


def _neighbours(size: int):
    nb = []
    for i in range(size * size):
        r, c = divmod(i, size)
        nb.append([j for j, ok in ((i - size, r > 0), (i + size, r < size - 1), (i - 1, c > 0), (i + 1, c < size - 1)) if ok])
    return nb


_NB_CACHE = {}


def _nb(size: int):
    if size not in _NB_CACHE:
        _NB_CACHE[size] = _neighbours(size)
    return _NB_CACHE[size]


def carve_maze(size: int, rng: random.Random, loop_fraction: float) -> np.ndarray:
    """Boolean [size, size] grid, True = open. Rooms sit at even coordinates; a perfect maze is
    carved by randomized depth-first search, then `loop_fraction` of the inner walls that separate
    two rooms are opened to make loops."""
    rooms = (size + 1) // 2
    open_ = [False] * (size * size)
    visited = [False] * (rooms * rooms)
    start = rng.randrange(rooms * rooms)
    stack = [start]
    visited[start] = True
    open_[2 * (start // rooms) * size + 2 * (start % rooms)] = True
    while stack:
        cur = stack[-1]
        r, c = divmod(cur, rooms)
        nbrs = [n for n, ok in ((cur - rooms, r > 0), (cur + rooms, r < rooms - 1), (cur - 1, c > 0),
                                (cur + 1, c < rooms - 1)) if ok and not visited[n]]
        if not nbrs:
            stack.pop()
            continue
        n = nbrs[rng.randrange(len(nbrs))]
        nr, nc = divmod(n, rooms)
        visited[n] = True
        open_[2 * nr * size + 2 * nc] = True
        open_[(r + nr) * size + (c + nc)] = True  # the wall cell between the two rooms
        stack.append(n)
    lim = 2 * rooms - 1
    walls = [r * size + c for r in range(lim) for c in range(lim) if (r % 2) != (c % 2) and not open_[r * size + c]]
    rng.shuffle(walls)
    for i in walls[:int(round(loop_fraction * len(walls)))]:
        open_[i] = True
    return np.array(open_, dtype=bool).reshape(size, size)


def _bfs_flat(open_flat, nb, src):
    n = len(open_flat)
    dist = [-1] * n
    count = [0] * n
    dist[src] = 0
    count[src] = 1
    q = deque([src])
    while q:
        i = q.popleft()
        d = dist[i] + 1
        ci = count[i]
        for j in nb[i]:
            if open_flat[j]:
                dj = dist[j]
                if dj < 0:
                    dist[j] = d
                    count[j] = ci
                    q.append(j)
                elif dj == d:
                    count[j] = min(2, count[j] + ci)
    return dist, count


def bfs(open_: np.ndarray, src: Tuple[int, int]):
    """Distances (-1 unreachable) and numbers of shortest paths (capped at 2) from src."""
    h, w = open_.shape
    dist, count = _bfs_flat(open_.reshape(-1).tolist(), _nb(h) if h == w else _neighbours_rect(h, w),
                            int(src[0]) * w + int(src[1]))
    return np.array(dist, dtype=np.int32).reshape(h, w), np.array(count, dtype=np.int32).reshape(h, w)


def _neighbours_rect(h, w):
    nb = []
    for i in range(h * w):
        r, c = divmod(i, w)
        nb.append([j for j, ok in ((i - w, r > 0), (i + w, r < h - 1), (i - 1, c > 0), (i + 1, c < w - 1)) if ok])
    return nb


def shortest_path(open_: np.ndarray, src, dst) -> Optional[list]:
    """One shortest path src..dst (list of cells, both ends included), or None."""
    dist, _ = bfs(open_, src)
    if dist[tuple(dst)] < 0:
        return None
    path = [tuple(int(x) for x in dst)]
    r, c = path[0]
    while (r, c) != tuple(src):
        for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= nr < open_.shape[0] and 0 <= nc < open_.shape[1] and dist[nr, nc] == dist[r, c] - 1:
                r, c = nr, nc
                break
        path.append((r, c))
    return path[::-1]


def generate_maze(rng: random.Random, size: int = 30, min_path_length: int = 110, loop_fraction: float = 0.1,
                  unique_path: bool = True, max_tries: int = 1000) -> Tuple[np.ndarray, np.ndarray, int]:
    """(input tokens [size, size], label tokens [size, size], shortest path length in steps).

    S is drawn among the cells far from a random cell (so long paths exist from it), G uniformly
    among the cells at distance >= min_path_length from S (with a unique shortest path if asked)."""
    nb = _nb(size)
    for _ in range(max_tries):
        open_ = carve_maze(size, rng, loop_fraction)
        flat = open_.reshape(-1).tolist()
        cells = [i for i, o in enumerate(flat) if o]
        d0, _ = _bfs_flat(flat, nb, cells[rng.randrange(len(cells))])
        half = (4 * max(d0)) // 5
        far = [i for i in cells if d0[i] >= half]
        src = far[rng.randrange(len(far))]
        dist, count = _bfs_flat(flat, nb, src)
        goals = [i for i in cells if dist[i] >= min_path_length and (count[i] == 1 or not unique_path)]
        if not goals:
            continue
        dst = goals[rng.randrange(len(goals))]
        src_rc, dst_rc = divmod(src, size), divmod(dst, size)
        path = shortest_path(open_, src_rc, dst_rc)
        inp = np.where(open_, OPEN, WALL).astype(np.uint8)
        inp[src_rc] = START
        inp[dst_rc] = GOAL
        lab = inp.copy()
        for cell in path[1:-1]:
            lab[cell] = PATH
        return inp, lab, len(path) - 1
    raise RuntimeError(f"no maze with a shortest path of >= {min_path_length} steps after {max_tries} tries; "
                       "lower --min-path-length or --loop-fraction")


def to_text(grid: np.ndarray) -> str:
    return "\n".join("".join(CHARSET[t - 1] if t > 0 else "?" for t in row) for row in np.asarray(grid))


def check_label(inp: np.ndarray, lab: np.ndarray) -> bool:
    """True if `lab` marks a shortest S->G path of the maze `inp` (tokens)."""
    inp, lab = np.asarray(inp), np.asarray(lab)
    if not np.array_equal(np.where(lab == PATH, OPEN, lab), inp) or np.any(inp[lab == PATH] != OPEN):
        return False
    open_ = inp != WALL
    src = tuple(np.argwhere(inp == START)[0])
    dst = tuple(np.argwhere(inp == GOAL)[0])
    dist, _ = bfs(open_, src)
    on_path = (lab == PATH) | (inp == START) | (inp == GOAL)
    # A path of exactly dist(G)+1 cells, connected from S to G, inside the marked cells.
    if on_path.sum() != dist[dst] + 1:
        return False
    d_marked, _ = bfs(on_path, src)
    return d_marked[dst] == dist[dst]


def build(output_dir: str = DEFAULT_OUTPUT, seed: int = 0, num_train: int = 1000, num_test: int = 1000,
          min_path_length: int = 110, loop_fraction: float = 0.1, unique_path: bool = True, aug: bool = False,
          size: int = 30, validate: bool = True) -> None:
    t0 = time.time()
    params = {k: v for k, v in locals().items() if k not in ("t0", "workers")}
    lengths = []
    for split, n in (("train", num_train), ("test", num_test)):
        rng = random.Random(f"maze-{seed}-{split}")
        w = SplitWriter(size * size)
        for _ in tqdm(range(n), desc=f"Generating {split} mazes"):
            inp, lab, length = generate_maze(rng, size, min_path_length, loop_fraction, unique_path)
            lengths.append(length)
            tids = range(8) if (aug and split == "train") else [0]
            # The reference's maze set: one example per puzzle, identifier 0, group = maze + its copies.
            w.add_group([[(dihedral_transform(inp, t), dihedral_transform(lab, t))] for t in tids], [0] * len(tids))
        write_writer_split(output_dir, split, w, vocab_size=len(CHARSET) + 1, num_puzzle_identifiers=1)
    print(f"Shortest path lengths: mean {np.mean(lengths):.1f}, min {min(lengths)}, max {max(lengths)}")
    finish_build(output_dir, "hrm.data.maze", params, ["<blank>"], validate, started=t0)


def main(argv=None):
    p = builder_parser("hrm.data.maze", __doc__, DEFAULT_OUTPUT)
    p.add_argument("--num-train", type=int, default=1000, help="training mazes (default 1000)")
    p.add_argument("--num-test", type=int, default=1000, help="test mazes (default 1000)")
    p.add_argument("--min-path-length", type=int, default=110,
                   help="minimum shortest-path length S->G in steps (default 110: long, 'hard' mazes)")
    p.add_argument("--loop-fraction", type=float, default=0.1,
                   help="fraction of inner walls removed after carving a perfect maze (default 0.1)")
    p.add_argument("--allow-ties", action="store_true",
                   help="allow several shortest paths (the label then shows one of them)")
    p.add_argument("--aug", action="store_true", help="add the 8 dihedral copies of each training maze")
    p.add_argument("--size", type=int, default=30, help="grid side (default 30; seq_len = size^2)")
    p.add_argument("--limit", type=int, default=None, help="cap train and test sizes (for quick tests)")
    a = p.parse_args(argv)
    note_limited_build(a.limit, a.output_dir != DEFAULT_OUTPUT, a.output_dir)
    if a.limit is not None:
        a.num_train, a.num_test = min(a.num_train, a.limit), min(a.num_test, a.limit)
    build(a.output_dir, a.seed, a.num_train, a.num_test, a.min_path_length, a.loop_fraction, not a.allow_ties,
          a.aug, a.size, not a.no_validate)


if __name__ == "__main__":
    main()

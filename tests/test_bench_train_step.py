"""bench_train_step's idle time: the gaps between kernels inside the profiled span, overlaps merged."""

from __future__ import annotations

import random

from benchmarks.bench_train_step import idle_us


def test_idle_is_the_uncovered_part_of_the_span():
    assert idle_us([]) == 0.0
    assert idle_us([(5.0, 9.0)]) == 0.0
    # two streams overlapping, a nested kernel, then a 3 us gap and a 1 us gap, given out of order
    intervals = [(20.0, 21.0), (0.0, 10.0), (2.0, 4.0), (8.0, 14.0), (17.0, 19.0)]
    assert idle_us(intervals) == 3.0 + 1.0


def test_idle_matches_a_unit_grid_count():
    rng = random.Random(0)
    for _ in range(200):
        intervals = []
        for _ in range(rng.randint(1, 12)):
            start = rng.randint(0, 60)
            intervals.append((float(start), float(start + rng.randint(1, 9))))
        lo, hi = min(s for s, _ in intervals), max(e for _, e in intervals)
        uncovered = sum(1 for t in range(int(lo), int(hi)) if not any(s <= t < e for s, e in intervals))
        assert idle_us(intervals) == uncovered

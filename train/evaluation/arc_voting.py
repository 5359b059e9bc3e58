"""ARC pass@k by voting over augmented copies (docs/REFERENCE.md, "Dataset format").

Every test input of an ARC puzzle appears once per augmented copy of the puzzle (a dihedral
transform and a colour permutation). For each copy the model's predicted canvas is cropped at
its end-of-grid markers, the augmentation is undone, and the resulting grid is one vote for that
test input. Candidates are ranked by vote count, ties broken by the mean ``sigmoid(q_halt)`` of
their voters. A puzzle is solved at k when, for every one of its test inputs, the true answer is
among the top k candidates; pass@k is the fraction of puzzles solved at k. ``pass@k_per_input``
gives a puzzle with several test inputs partial credit (the fraction of its inputs answered in the
top k), as the public HRM-family ARC evaluators count (``num_test_correct / len(puzzle["test"])``,
the count behind published figures); both are equal when every puzzle has one test input.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np


def grid_key(grid: np.ndarray) -> bytes:
    """Hashable identity of a grid: its shape and its values."""
    grid = np.ascontiguousarray(grid, dtype=np.uint8)
    return np.array(grid.shape, dtype=np.int32).tobytes() + grid.tobytes()


@dataclass
class _Candidate:
    grid: np.ndarray
    votes: int = 0
    q_sum: float = 0.0

    @property
    def q_mean(self) -> float:
        return self.q_sum / max(self.votes, 1)


@dataclass
class TestInputVotes:
    """Votes for one test input of one original puzzle."""

    answer: np.ndarray | None = None
    candidates: dict = field(default_factory=dict)

    def add(self, grid: np.ndarray, q_halt_prob: float) -> None:
        key = grid_key(grid)
        cand = self.candidates.get(key)
        if cand is None:
            cand = self.candidates[key] = _Candidate(np.ascontiguousarray(grid, dtype=np.uint8))
        cand.votes += 1
        cand.q_sum += float(q_halt_prob)

    def ranked(self) -> list[_Candidate]:
        return sorted(self.candidates.values(), key=lambda c: (-c.votes, -c.q_mean))

    def rank_of_answer(self) -> int | None:
        """0-based rank of the true answer among the candidates, None if nobody voted for it."""
        if self.answer is None:
            return None
        target = grid_key(self.answer)
        for i, cand in enumerate(self.ranked()):
            if grid_key(cand.grid) == target:
                return i
        return None


def undo_arc_augmentation(name: str, tokens: np.ndarray) -> tuple[str, np.ndarray]:
    """(original puzzle id, grid in the original frame) of a canvas predicted for puzzle ``name``."""
    from hrm.data import arc

    return arc.parse_name(name)[0], arc.inverse(tokens, name)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def collect_votes(
    predictions: np.ndarray,
    labels: np.ndarray,
    q_halt_logits: np.ndarray,
    example_puzzle: np.ndarray,
    example_position: np.ndarray,
    puzzle_names: Sequence[str],
    undo: Callable[[str, np.ndarray], tuple[str, np.ndarray]] | None = None,
) -> dict[str, dict[int, TestInputVotes]]:
    """Votes per original puzzle and test-input position.

    ``predictions``, ``labels``: [N, side*side] tokens, one row per test example;
    ``q_halt_logits``: [N]; ``example_puzzle``: [N] the augmented puzzle (index into
    ``puzzle_names``) each row belongs to; ``example_position``: [N] the row's position among its
    puzzle's examples (= which test input). ``undo(name, tokens) -> (original_id, grid)`` crops a
    canvas at its end markers and undoes the augmentation named ``name`` (default:
    ``hrm.data.arc``'s ``parse_name`` and ``inverse``).
    """
    undo = undo or undo_arc_augmentation
    votes: dict[str, dict[int, TestInputVotes]] = defaultdict(lambda: defaultdict(TestInputVotes))
    probs = sigmoid(q_halt_logits)
    for i in range(predictions.shape[0]):
        name = puzzle_names[int(example_puzzle[i])]
        original, pred = undo(name, predictions[i])
        slot = votes[original][int(example_position[i])]
        if slot.answer is None:
            _, slot.answer = undo(name, labels[i])
        slot.add(pred, probs[i])
    return {k: dict(v) for k, v in votes.items()}


def pass_at_k(votes: dict[str, dict[int, TestInputVotes]], ks: Iterable[int] = (1, 2, 10)) -> dict[str, float]:
    """``{"pass@k": fraction of puzzles whose every test input has its answer in the top k,
    "pass@k_per_input": the mean over puzzles of the fraction of their test inputs that have}``."""
    ks = list(ks)
    solved = {k: 0 for k in ks}
    credit = {k: 0.0 for k in ks}
    for per_input in votes.values():
        ranks = [slot.rank_of_answer() for slot in per_input.values()]
        for k in ks:
            hits = sum(r is not None and r < k for r in ranks)
            solved[k] += bool(ranks) and hits == len(ranks)
            credit[k] += hits / len(ranks) if ranks else 0.0
    n = max(len(votes), 1)
    out = {f"pass@{k}": solved[k] / n for k in ks}
    out.update({f"pass@{k}_per_input": credit[k] / n for k in ks})
    out["puzzles"] = float(len(votes))
    return out

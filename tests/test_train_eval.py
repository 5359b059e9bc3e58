"""ARC voting on a hand-made case, and evaluate.py end to end on a tiny ARC run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from hrm.data import arc
from train.evaluation.arc_voting import collect_votes, pass_at_k
from train.testing import QUIET, REPO, TINY_ARCH, build_tiny_arc, subprocess_env

ANSWER = np.array([[1, 2, 0], [3, 3, 4]], dtype=np.uint8)
WRONG = np.array([[1, 2], [3, 3]], dtype=np.uint8)
OTHER = np.array([[5]], dtype=np.uint8)
PERM = np.array([0, 3, 1, 2, 5, 4, 6, 8, 7, 9], dtype=np.uint8)
AUGS = [(0, np.arange(10, dtype=np.uint8)), (1, PERM), (5, PERM[::-1].copy()), (6, PERM), (7, np.arange(10, dtype=np.uint8))]


def canvas(grid, tid, cmap):
    return arc.grid_to_tokens(arc.augment_grid(grid, tid, cmap))


def make_case(predicted, q_logits, answer=ANSWER, puzzle="p1"):
    """One row per augmented copy of `puzzle`: its predicted grid (in the original frame, so the
    test augments it like the model's output would be) and its true label."""
    preds, labels, names = [], [], []
    for (tid, cmap), grid in zip(AUGS, predicted):
        preds.append(canvas(grid, tid, cmap))
        labels.append(canvas(answer, tid, cmap))
        names.append(puzzle if tid == 0 and (cmap == np.arange(10)).all() else arc.aug_name(puzzle, tid, cmap))
    return np.stack(preds), np.stack(labels), np.asarray(q_logits, dtype=np.float32), names


def votes_for(cases):
    preds, labels, q, names, positions = [], [], [], [], []
    for case, position in cases:
        p, l, qq, n = case
        preds.append(p); labels.append(l); q.append(qq); names += n; positions += [position] * len(n)
    n = len(names)
    return collect_votes(np.concatenate(preds), np.concatenate(labels), np.concatenate(q),
                         np.arange(n), np.asarray(positions), names)


def test_majority_vote_after_undoing_augmentations():
    # 3 copies vote for WRONG, 2 for the answer: rank 2 -> pass@1 fails, pass@2 holds.
    case = make_case([WRONG, ANSWER, WRONG, ANSWER, WRONG], [0, 0, 0, 0, 0])
    votes = votes_for([(case, 0)])
    slot = votes["p1"][0]
    assert np.array_equal(slot.answer, ANSWER)
    ranked = slot.ranked()
    assert [c.votes for c in ranked] == [3, 2] and np.array_equal(ranked[0].grid, WRONG)
    assert pass_at_k(votes) == {"pass@1": 0.0, "pass@2": 1.0, "pass@10": 1.0, "pass@1_per_input": 0.0,
                                "pass@2_per_input": 1.0, "pass@10_per_input": 1.0, "puzzles": 1.0}


def test_ties_broken_by_mean_q_halt():
    # 2 votes each for ANSWER and WRONG, 1 for OTHER; ANSWER's voters are more confident.
    case = make_case([ANSWER, WRONG, ANSWER, WRONG, OTHER], [3.0, -1.0, 2.0, -2.0, 5.0])
    votes = votes_for([(case, 0)])
    ranked = votes["p1"][0].ranked()
    assert np.array_equal(ranked[0].grid, ANSWER) and np.array_equal(ranked[1].grid, WRONG)
    assert pass_at_k(votes, ks=(1,))["pass@1"] == 1.0
    flipped = make_case([ANSWER, WRONG, ANSWER, WRONG, OTHER], [-3.0, 1.0, -2.0, 2.0, 5.0])
    assert pass_at_k(votes_for([(flipped, 0)]), ks=(1, 2))["pass@1"] == 0.0


def test_every_test_input_must_be_solved():
    second_answer = np.array([[7, 7], [0, 7]], dtype=np.uint8)
    good = make_case([ANSWER] * 5, [1] * 5)
    bad = make_case([WRONG] * 5, [1] * 5, answer=second_answer)
    other_puzzle = make_case([ANSWER] * 5, [1] * 5, puzzle="p2")
    votes = votes_for([(good, 0), (bad, 1), (other_puzzle, 0)])
    assert set(votes) == {"p1", "p2"} and set(votes["p1"]) == {0, 1}
    result = pass_at_k(votes)
    assert result["pass@1"] == 0.5 and result["pass@10"] == 0.5  # p1's second input never right
    # Partial credit (the HRM-family evaluators' count): p1 half solved, p2 solved -> (0.5 + 1) / 2.
    assert result["pass@1_per_input"] == result["pass@10_per_input"] == 0.75


@pytest.fixture(scope="module")
def arc_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("arc_eval")
    data = build_tiny_arc(root / "arc-tiny")
    args = [f"data_path={data}", *TINY_ARCH, *QUIET, "global_batch_size=4", "epochs=1", "eval_interval=1",
            f"checkpoint_path={root / 'run'}", "eval_save_outputs=[inputs,labels,puzzle_identifiers,preds,q_halt_logits]"]
    out = subprocess.run([sys.executable, str(REPO / "train" / "pretrain.py"), *args], cwd=root,
                         env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def test_evaluate_command_on_arc(arc_run):
    run_dir = arc_run / "run"
    out = subprocess.run([sys.executable, str(REPO / "train" / "evaluate.py"), f"checkpoint={run_dir}",
                          "save_outputs=true"], cwd=arc_run, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for key in ("all/exact_accuracy", "all/pass@1", "all/pass@2", "all/pass@10"):
        assert key in out.stdout, key
    record = json.loads((run_dir / "eval_metrics.jsonl").read_text().splitlines()[-1])
    assert record["all/puzzles"] == 2.0
    # The logged pass@k are the votes over the predictions the command saved (the voting itself is
    # checked on hand-made cases above), and a larger k never scores lower.
    import torch

    from train.evaluate import arc_pass_at_k

    (saved,) = run_dir.glob("eval_step*_outputs.pt")
    again = arc_pass_at_k({"data_path": str(arc_run / "arc-tiny")}, torch.load(saved, weights_only=True))
    assert {k: record[k] for k in again} == again and {"all/pass@1", "all/pass@2", "all/pass@10"} <= set(again)
    assert record["all/pass@1"] <= record["all/pass@2"] <= record["all/pass@10"]
    # Predictions saved during training too (eval_save_outputs), one file per rank.
    assert list(run_dir.glob("step_*_all_preds.0"))


def test_evaluate_errors_are_one_line(arc_run, tmp_path):
    for args, expect in (([], "checkpoint=<file or run directory> is required"),
                         ([f"checkpoint={tmp_path / 'nope.pt'}"], "does not exist"),
                         ([f"checkpoint={arc_run / 'run'}", "data_path=/nonexistent/arc"], "/nonexistent/arc")):
        out = subprocess.run([sys.executable, str(REPO / "train" / "evaluate.py"), *args], cwd=tmp_path,
                             env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and expect in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr

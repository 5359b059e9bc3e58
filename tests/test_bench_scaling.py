"""``benchmarks/bench_scaling.py`` end to end on CPU processes (gloo), so that its command works the day
a multi-GPU host is lent: real ``torchrun`` runs of the trainer on 1 and 2 ranks, a table row each, and
the 2-rank run's losses equal to the 1-rank run's at the same global batch (fp32: reduction order only).
On CPU even where a GPU is present (``device=cpu``). The trainer's gradient sync itself is tested in
``test_train_distributed.py``."""

from __future__ import annotations

import re

from benchmarks import bench_scaling
from train.testing import TINY_ARCH, build_tiny_sudoku4, subprocess_env


def test_scaling_table_on_two_cpu_ranks(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)  # (on the GPU machine: no CPU table among a run's results)
    monkeypatch.setattr(bench_scaling, "RUN_OPTIONS", dict(timeout=400, env=subprocess_env()))
    data = build_tiny_sudoku4(tmp_path / "data")
    arch = [a for a in TINY_ARCH if not a.startswith("arch.kernels")] + ["arch.kernels=eager"]
    table = bench_scaling.main(["--data", data, "--gpus", "1", "2", "--per-gpu-batch", "8", "--steps", "13",
                                "--warmup", "10", "--out", str(tmp_path / "runs"), "device=cpu", *arch])
    rows = [line.split("|")[1:-1] for line in table.splitlines() if re.match(r"\| [12] \|", line)]
    assert [(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows] == [("1", "-", "8"), ("2", "flat", "16")], table
    assert all(float(r[3]) > 0 for r in rows), table  # ms/step measured
    loss_diff = float(rows[1][7].split()[0])
    assert loss_diff < 1e-5, f"2 ranks drifted from 1 rank at the same global batch: {loss_diff}\n{table}"

"""The training step never waits for the GPU: the host can queue step t+1 while step t runs
(CUDA only; on CPU there is nothing to wait for)."""

from __future__ import annotations

import pytest
import torch

import train.pretrain as pretrain
from train.testing import QUIET, TINY_ARCH, build_tiny_sudoku4
from tests.conftest import requires_cuda


@requires_cuda
def test_train_step_does_not_synchronize(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = build_tiny_sudoku4(tmp_path / "sudoku4")
    original, checked = pretrain.train_step, []

    def strict(cfg, state, batch, info):
        if state.step < 2:  # the first steps compile kernels and build optimizer state
            return original(cfg, state, batch, info)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(cfg, state, batch, info)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            checked.append(state.step)

    monkeypatch.setattr(pretrain, "train_step", strict)
    arch = [a for a in TINY_ARCH if not a.startswith(("arch.kernels", "arch.forward_dtype"))]
    pretrain.run([f"data_path={data}", *arch, *QUIET, "global_batch_size=32", "epochs=1", "eval_interval=1",
                  "device=cuda", "compile=false", "arch.kernels=triton", "arch.forward_dtype=bfloat16",
                  "arch.puzzle_emb_ndim=16", f"checkpoint_path={tmp_path / 'run'}", "max_steps=6"])
    assert checked == [3, 4, 5, 6]


def test_pending_metrics_report_a_nonfinite_loss_with_its_step():
    ok = pretrain.PendingMetrics(7, torch.tensor([3.0, 1.5]), ["count"], 1e-3)
    assert ok.read().tolist() == [3.0]
    bad = pretrain.PendingMetrics(8, torch.tensor([3.0, float("inf")]), ["count"], 1e-3)
    with pytest.raises(pretrain.TrainingDiverged, match="loss became inf at step 8") as e:
        bad.read()
    assert e.value.step == 8

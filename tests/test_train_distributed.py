"""torchrun with 2 CPU processes (gloo) against one process on the same global batch."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from train import checkpointing
from train.testing import QUIET, REPO, TINY_ARCH, build_tiny_arc, subprocess_env

PRETRAIN = str(REPO / "train" / "pretrain.py")


@pytest.fixture(scope="module")
def arc_data(tmp_path_factory):
    # ARC: one puzzle identifier per augmented copy, so the sparse puzzle embeddings are exercised.
    return build_tiny_arc(tmp_path_factory.mktemp("data") / "arc-tiny")


@pytest.fixture(scope="module")
def single_process(arc_data, tmp_path_factory):
    """The one-process run every multi-rank variant is compared with: (args, stdout, run dir)."""
    # 16 train examples / global batch 4: about 3-4 steps an epoch (partial batches dropped), 2 epochs with an evaluation after each.
    # Exploration off: its random draws are per rank by design, so they would differ from one process.
    args = [f"data_path={arc_data}", *TINY_ARCH, *QUIET, "global_batch_size=4", "epochs=2", "eval_interval=1",
            "lr=1e-2", "lr_warmup_steps=2", "puzzle_emb_lr=1e-1", "arch.halt_exploration_prob=0", "device=cpu"]
    run_dir = tmp_path_factory.mktemp("one")
    single = subprocess.run([sys.executable, PRETRAIN, *args, f"checkpoint_path={run_dir}"],
                            cwd=run_dir, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert single.returncode == 0, single.stderr[-3000:]
    return args, single.stdout, run_dir


# ddp: gradients summed by DistributedDataParallel buckets during the backward; flat: one
# all-reduce after it. compile=true compiles DDP(model) (what compile=auto does on CUDA with the eager
# kernels): covered on CPU too.
# precompile_kernels=true: every rank's dry run (with its gradient all-reduce) must leave the
# collectives in step and the run unchanged.
# grad_accum_steps=2 under compiled DDP: one micro-batch per backward, only the last all-reduces
# (no_sync), the puzzle embedding filled row slice by row slice.
@pytest.mark.parametrize("grad_sync,compile,extra", [("ddp", "false", ()), ("flat", "false", ()),
                                                     ("ddp", "true", ()),
                                                     ("flat", "false", ("precompile_kernels=true",)),
                                                     ("ddp", "true", ("grad_accum_steps=2",))])
def test_two_gloo_ranks_match_one_process(single_process, tmp_path, grad_sync, compile, extra):
    args, single_stdout, one = single_process
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            PRETRAIN, *args, f"grad_sync={grad_sync}", f"compile={compile}", *extra,
                            f"checkpoint_path={tmp_path / 'two'}"],
                           cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert f"x2 ranks (grad_sync={grad_sync}), compile={compile == 'true'}" in multi.stdout
    assert "torch.compile failed" not in multi.stderr
    if "precompile_kernels=true" in extra:
        assert "precompile_kernels: 0 Triton kernel variants compiled ahead" in multi.stdout

    a = checkpointing.load_file(checkpointing.latest_checkpoint(one))
    b = checkpointing.load_file(checkpointing.latest_checkpoint(tmp_path / "two"))
    step = a["step"]
    assert step > 2 and b["step"] == step and b["world_size"] == 2
    assert (tmp_path / "two" / f"step_{step}.rank1.pt").is_file()  # rank 1's RNG / carry / data position
    emb = "model.inner.puzzle_emb.weights"
    assert emb in a["model"] and not torch.equal(a["model"][emb], torch.zeros_like(a["model"][emb]))
    for k, v in a["model"].items():
        # fp32 sums in another order (all-reduce of two halves): tiny differences only. Sign-SGD
        # embeddings move by exactly +-lr, so they must agree exactly unless a gradient is ~0.
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # The same evaluation metrics, reduced over both ranks.
    line = [l for l in single_stdout.splitlines() if l.startswith(f"eval @ step {step}")]
    line2 = [l for l in multi.stdout.splitlines() if l.startswith(f"eval @ step {step}")]
    assert line and line == line2


def test_resume_on_another_rank_count(single_process, tmp_path):
    """The one-process run resumed on 2 gloo ranks, then that checkpoint on one process again:
    both continue from the saved step. (The puzzle embedding's optimizer gathers over the ranks it
    runs on now: restored from a 2-rank checkpoint, one process waited for a process group that
    did not exist; see test_model_sparse_embedding for the other direction's update.)"""
    args, _, one = single_process
    run = tmp_path / "run"
    shutil.copytree(one, run)
    step = checkpointing.load_file(checkpointing.latest_checkpoint(run))["step"]
    for launcher, stop in ((["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], step + 2),
                           ([], step + 4)):
        proc = subprocess.run([sys.executable, *launcher, PRETRAIN, *args, "epochs=6", f"checkpoint_path={run}",
                               f"max_steps={stop}"],
                              cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resuming on" in proc.stdout  # the rank count changed, and the run said so
        saved = checkpointing.load_file(checkpointing.latest_checkpoint(run))
        ranks = 2 if launcher else 1
        assert saved["step"] == stop and saved["world_size"] == ranks
        # the embedding's optimizer ran with the ranks of this run, not those it was restored from
        assert [g["world_size"] for g in saved["optimizers"][0]["param_groups"]] == [ranks]


def test_config_error_printed_once_under_torchrun(arc_data, tmp_path):
    """Every rank finds the same mistake; the message appears once, not once per rank."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           PRETRAIN, f"data_path={arc_data}", *TINY_ARCH, *QUIET, "global_batch_size=7", "device=cpu"],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: global_batch_size=7 is not divisible by the number of ranks (2)") == 1, proc.stderr


def _stop_clock_rank(rank: int, init_file: str, answers) -> None:
    import time

    import torch.distributed as dist

    from train.distributed import DistInfo
    from train.pretrain import StopClock

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # Rank 0's clock has run out, rank 1's has not: rank 0 decides for both.
        t_start = 0.0 if rank == 0 else time.time()
        clock = StopClock(t_start, 1.0, DistInfo(rank=rank, world_size=2))
        # Only rank 0 got a SIGTERM (15), no time limit: rank 0 decides again.
        signal_clock = StopClock(time.time(), None, DistInfo(rank=rank, world_size=2),
                                 signalled=lambda: 15 if rank == 0 else None)
        answers[rank] = [clock() for _ in range(3)] + [signal_clock() for _ in range(3)]
        dist.barrier()  # both ranks done before teardown (see test_model_sparse_embedding)
    finally:
        dist.destroy_process_group()


def test_stop_clock_ranks_agree_one_step_late(tmp_path):
    """Every rank stops after the same step, for the same reason (time limit or signal): the answer
    read is rank 0's of the previous call."""
    import torch.multiprocessing as mp

    answers = mp.Manager().dict()
    mp.spawn(_stop_clock_rank, args=(str(tmp_path / "init"), answers), nprocs=2, join=True)
    assert answers[0] == answers[1] == [None, "time", "time", None, "signal", "signal"]

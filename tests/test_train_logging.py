"""Monitoring: W&B offline run files, the metrics JSONL, gate plots, a progress bar."""

from __future__ import annotations

import json

import pytest

from train.logging_utils import MetricsLogger, read_jsonl
from train.pretrain import run
from train.testing import TINY_ARCH, build_tiny_sudoku4

GUIDE_METRICS = ["train/lm_loss", "train/accuracy", "train/exact_accuracy", "train/steps", "train/q_halt_loss",
                 "train/q_continue_loss", "train/q_halt_accuracy", "train/lr"]
GATE_METRICS = [f"train/gate/{m}/{k}_{s}" for m, kinds in (("L", ("own", "other", "inj")), ("H", ("own", "other")))
                for k in kinds for s in ("mean", "frac_low", "frac_high", "share")]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return build_tiny_sudoku4(tmp_path_factory.mktemp("data") / "sudoku4")


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_offline_wandb_jsonl_gate_plot_and_progress(tiny_data, tmp_path, monkeypatch, no_wandb_key, capsys):
    monkeypatch.chdir(tmp_path)
    run([f"data_path={tiny_data}", *TINY_ARCH, "arch=hrm_v1_gated", "global_batch_size=136", "epochs=2",
         "eval_interval=1", "wandb=true", "progress=true", "run_name=logged", "project_name=P"])
    run_dir = tmp_path / "checkpoints" / "P" / "logged"
    # W&B ran offline and wrote its run files.
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("run-*.wandb"))
    records = read_jsonl(run_dir / "metrics.jsonl")
    keys = set().union(*records)
    assert "num_params" in records[0]
    missing = [k for k in GUIDE_METRICS + GATE_METRICS if k not in keys]
    assert not missing, missing
    assert "eval/all/exact_accuracy" in keys and "eval/all/gate/L/own_mean" in keys
    assert (run_dir / "gates.png").stat().st_size > 1000
    assert (run_dir / "all_config.yaml").is_file()
    err = capsys.readouterr().err
    assert "step/s" in err or "s/step" in err  # tqdm progress bar with throughput
    assert "ex_s=" in err and "loss=" in err


def test_wandb_failure_never_stops_training(tiny_data, tmp_path, monkeypatch, no_wandb_key):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    monkeypatch.chdir(tmp_path)
    run([f"data_path={tiny_data}", *TINY_ARCH, "global_batch_size=64", "epochs=1", "eval_interval=1", "wandb=true", "progress=false",
         "run_name=r", "project_name=P", "max_steps=2"])
    records = read_jsonl(tmp_path / "checkpoints" / "P" / "r" / "metrics.jsonl")
    assert [r["step"] for r in records if "train/lm_loss" in r] == [1, 2]


def test_wandb_off_writes_no_run_files(tmp_path, monkeypatch, no_wandb_key):
    monkeypatch.chdir(tmp_path)
    logger = MetricsLogger(tmp_path / "run", "P", "r", {}, use_wandb=False)
    logger.log({"train/lm_loss": 1.5, "x": float("nan")}, step=3)
    logger.finish()
    assert not (tmp_path / "wandb").exists()
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert rec["step"] == 3 and rec["train/lm_loss"] == 1.5 and rec["x"] == "nan"


def test_resume_drops_the_records_it_replays(tmp_path, capsys):
    """Records after the resumed checkpoint's step, and a line a crash cut short, leave metrics.jsonl;
    the rest stays as written."""
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "train/lm_loss": 1.0 / s} for s in range(1, 8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 8, "train/lm')
    MetricsLogger(tmp_path, "p", "r", {}, use_wandb=False, resume_step=5)
    assert read_jsonl(path) == records[:5]
    assert "dropped 3 record(s) after step 5" in capsys.readouterr().out
    MetricsLogger(tmp_path, "p", "r", {}, use_wandb=False, resume_step=5)  # nothing more to drop
    assert read_jsonl(path) == records[:5] and "dropped" not in capsys.readouterr().out
    # A new run (step -1) where an earlier one stopped before its first checkpoint starts a new file.
    MetricsLogger(tmp_path, "p", "r", {}, use_wandb=False, resume_step=-1)
    assert read_jsonl(path) == [] and "left no checkpoint" in capsys.readouterr().out


def test_offline_resume_keeps_the_run_id_and_says_how_to_upload(tmp_path, monkeypatch, no_wandb_key, capsys):
    """A resumed offline run logs to the same W&B id from a folder of its own; the message names
    the one upload command that sends every part, in order."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    folders = []
    for step in (None, 1):  # a new run, then its resumption
        logger = MetricsLogger(tmp_path / "run", "P", "r", {}, resume_id=folders[0][1] if folders else None,
                               resume_step=step)
        logger.log({"train/lm_loss": 2.0}, step=(step or 0) + 1)
        folders.append((Path(logger.wandb_run.dir).parent.name, logger.wandb_id))
        logger.finish()
        out = capsys.readouterr().out
    (first, run_id), (second, resumed_id) = folders
    assert resumed_id == run_id and first.startswith("offline-run-") and f"-{run_id}" in second
    assert f"`wandb sync wandb/offline-run-*-{run_id}*`" in out

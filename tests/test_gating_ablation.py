"""The gated-vs-ungated experiment's scripts (experiments/gating_ablation) end to end on a CPU at a
tiny size: run.py builds the data, trains both arms and the fused/eager comparison, analyze.py
writes plots and tables whose numbers must be those of the metrics files."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from train.testing import REPO, subprocess_env

HERE = REPO / "experiments" / "gating_ablation"
RUN = HERE / "run.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gating_ablation_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Both modes' outputs: `ablation` builds the dataset, then `compare_paths` (reusing it) runs
    alongside its trainers."""
    root = tmp_path_factory.mktemp("gating")
    work, out_a, out_c = root / "work", root / "ablation_out", root / "compare_out"
    # On the CPU even on a GPU machine: the arms' step counts must not depend on how long a CUDA
    # compilation takes. --max-steps ends each arm; the time budget (60 min, beyond CI's whole run)
    # and the waits below only stop a hung run: no result depends on the machine's speed (with
    # a one-minute budget, under the GPU suite's 8 parallel pytest processes, an arm once stopped
    # at step 6).
    env = subprocess_env(CUDA_VISIBLE_DEVICES="")
    common = ["--smoke", "--work", str(work)]
    procs = [subprocess.Popen([sys.executable, str(RUN), "ablation", "--out", str(out_a), "--max-steps", "10",
                               "--minutes", "60", *common], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
    deadline = time.time() + 600  # a hang guard, as communicate's timeout below
    while not (out_a / "dataset_info.json").is_file():  # written once the dataset is complete
        assert procs[0].poll() is None and time.time() < deadline, procs[0].communicate()[0]
        time.sleep(0.2)
    procs.append(subprocess.Popen([sys.executable, str(RUN), "compare_paths", "--out", str(out_c), "--steps", "6",
                                   "--archive", str(root / "compare.tgz"), *common], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, text in zip(procs, logs):
        assert p.returncode == 0, text
    return {"ablation": out_a / "ablation", "compare": out_c / "compare_paths", "logs": logs,
            "compare_out": out_c, "compare_archive": root / "compare.tgz"}


def test_archive_holds_the_whole_output(smoke):
    """--archive packs every file of --out (the deep report folders too), the finished log included."""
    import tarfile

    out = smoke["compare_out"]
    with tarfile.open(smoke["compare_archive"]) as tar:
        packed = {m.name for m in tar.getmembers() if m.isfile()}
        run_info = tar.extractfile("run_info.txt").read().decode()
    assert packed == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert "compare_paths/report/summary.md" in packed and run_info.rstrip().endswith("done")


def test_ablation_files_and_fairness(smoke):
    d = smoke["ablation"]
    for arm in ("ungated", "gated"):
        for name in ("metrics.jsonl", "all_config.yaml", "segments.jsonl", "train.log", "command.txt"):
            assert (d / arm / name).is_file(), (arm, name)
    assert (d / "gated" / "gates.png").read_bytes()[:8] == PNG_MAGIC
    # The arms differ in the gates and in their names only.
    cfg = {arm: yaml.safe_load((d / arm / "all_config.yaml").read_text()) for arm in ("ungated", "gated")}
    diff = {f"arch.{k}" for k in cfg["gated"]["arch"] if cfg["gated"]["arch"][k] != cfg["ungated"]["arch"].get(k)}
    diff |= {k for k in cfg["gated"] if k != "arch" and cfg["gated"][k] != cfg["ungated"].get(k)}
    assert diff == {"arch.use_gating", "run_name", "checkpoint_path"}
    assert len(_records(d / "gated" / "segments.jsonl")) == 1


def test_ablation_report_matches_metrics(smoke):
    report = smoke["ablation"] / "report"
    for name in ("accuracy.png", "training.png", "gates_gated.png", "gate_evolution_gated.png"):
        data = (report / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
    summary = json.loads((report / "summary.json").read_text())
    md = (report / "summary.md").read_text()
    assert [r["label"] for r in summary["runs"]] == ["ungated", "gated"]
    for r in summary["runs"]:
        recs = _records(smoke["ablation"] / r["label"] / "metrics.jsonl")
        evals = [x for x in recs if "eval/all/exact_accuracy" in x]
        assert evals, r["label"]
        e = r["eval"]["all"]
        assert e["final_exact_accuracy"] == evals[-1]["eval/all/exact_accuracy"]
        assert e["best_exact_accuracy"] == max(x["eval/all/exact_accuracy"] for x in evals)
        assert e["final_accuracy"] == evals[-1]["eval/all/accuracy"]
        assert e["best_accuracy"] == max(x["eval/all/accuracy"] for x in evals)
        assert e["final_act_steps"] == evals[-1]["eval/all/steps"]
        assert r["evaluations"] == len(evals)
        assert r["last_step"] == max(x["step"] for x in recs) == 10
        assert r["num_params"] == next(x["num_params"] for x in recs if "num_params" in x)
        train = [x for x in recs if "train/lm_loss" in x]
        assert r["last_train_lm_loss"] == train[-1]["train/lm_loss"]
        halted = [x for x in train if x["train/count"] > 0][-10:]
        assert r["train_act_steps_last10"] == pytest.approx(sum(x["train/steps"] for x in halted) / len(halted))
        assert r["gating"] == (r["label"] == "gated")
        row = next(line for line in md.splitlines() if line.startswith(f"| {r['label']} |"))
        assert f"| {100 * e['final_exact_accuracy']:.2f}% |" in row
        assert f"| {100 * e['final_accuracy']:.2f}% |" in row
        assert f"| {r['last_train_lm_loss']:.4f} |" in row
    gates = summary["runs"][1]["gates"]
    last_train = [x for x in _records(smoke["ablation"] / "gated" / "metrics.jsonl") if "train/lm_loss" in x][-1]
    assert set(gates["train"]) == {"L/own", "L/other", "L/inj", "H/own", "H/other"}
    for name, v in gates["train"].items():
        key = f"train/gate/{name}"
        assert v["mean"] == last_train[f"{key}_mean"]
        assert v["share"] == last_train[f"{key}_share"]
        assert v["saturated"] == last_train[f"{key}_frac_low"] + last_train[f"{key}_frac_high"]
    assert "## Gates of gated" in md and summary["runs"][0]["gates"] == {}


def test_compare_paths_report(smoke):
    d = smoke["compare"]
    report = d / "report"
    assert (report / "compare_paths.png").read_bytes()[:8] == PNG_MAGIC
    comp = json.loads((report / "summary.json").read_text())["compare"]
    loss = {arm: {x["step"]: x["train/lm_loss"] for x in _records(d / arm / "metrics.jsonl") if "train/lm_loss" in x}
            for arm in ("fused", "eager")}
    assert sorted(loss["fused"]) == list(range(1, 7))
    want = max(abs(loss["fused"][s] - loss["eager"][s]) for s in loss["fused"])
    assert comp["fused_vs_eager"]["max_abs_diff"] == pytest.approx(want, abs=0)
    assert "eager_vs_reference" not in comp  # smoke runs are float32: no bf16 reference to run
    # On a CPU both "paths" run the same eager code: the curves are identical.
    assert comp["verdict"] == "identical loss curves"
    assert "Verdict: **identical loss curves**" in (report / "summary.md").read_text()


def test_analyze_missing_metrics_says_how_to_produce(tmp_path, capsys):
    analyze = _load("analyze")
    missing = tmp_path / "no_such_run"
    assert analyze.main(["--out", str(tmp_path / "report"), str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing / "metrics.jsonl") in err and "run.py ablation" in err


def test_continue_without_checkpoints_fails_fast(tmp_path):
    res = subprocess.run([sys.executable, str(RUN), "continue", "--smoke", "--out", str(tmp_path / "out"),
                          "--work", str(tmp_path / "work")], env=subprocess_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=60)
    assert res.returncode == 2
    assert "no checkpoint in" in res.stdout and "Run `ablation` instead" in res.stdout


def test_gpu_commands_differ_only_in_arch(tmp_path):
    """The GPU ablation's two trainer commands (--dry-run): identical but for arch= and the names."""
    res = subprocess.run([sys.executable, str(RUN), "ablation", "--out", str(tmp_path), "--dry-run"],
                         env=subprocess_env(), stdout=subprocess.PIPE, text=True, timeout=60, check=True)
    lines = [line.split() for line in res.stdout.splitlines() if "train/pretrain.py" in line]
    assert len(lines) == 2
    a, b = ({w for w in line if not w.startswith(("arch=", "run_name=", "checkpoint_path=", "CUDA_VISIBLE_DEVICES="))} for line in lines)
    assert a == b
    assert "arch=hrm_v1" in lines[0] and "arch=hrm_v1_gated" in lines[1]
    assert "data_path=" + str(REPO / "data" / "gating_ablation" / "sudoku-hard-1k-aug-1000") in lines[0]


def test_two_gpus_per_arm_run_data_parallel(tmp_path):
    """--gpus 0+1,2+3: each arm is a 2-rank torchrun on its own pair, same global batch."""
    res = subprocess.run([sys.executable, str(RUN), "ablation", "--out", str(tmp_path), "--dry-run",
                          "--gpus", "0+1,2+3"], env=subprocess_env(), stdout=subprocess.PIPE, text=True,
                         timeout=60, check=True)
    lines = [line for line in res.stdout.splitlines() if "train/pretrain.py" in line]
    assert len(lines) == 2
    for line, gpus in zip(lines, ("0,1", "2,3")):
        assert line.startswith(f"CUDA_VISIBLE_DEVICES={gpus} python3 -m torch.distributed.run --standalone "
                               "--nproc-per-node=2 train/pretrain.py")
        assert "global_batch_size=768" in line


def _write_run(path: Path, losses: dict[int, float], t0: float = 1000.0, segments: list[float] | None = None,
               times: dict[int, float] | None = None) -> Path:
    """A synthetic run directory: train/lm_loss per step (one second apart unless ``times``)."""
    path.mkdir(parents=True)
    recs = [{"step": s, "time": (times or {}).get(s, t0 + s), "train/lm_loss": v, "train/count": 4.0}
            for s, v in sorted(losses.items())]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if segments:
        (path / "segments.jsonl").write_text("".join(json.dumps({"start": s}) + "\n" for s in segments))
    return path


def test_compare_judged_against_the_bf16_reference(tmp_path):
    """With a float32 reference, fused-vs-eager is judged by the eager bf16-vs-float32 difference."""
    analyze = _load("analyze")
    steps = range(1, 101)
    base = {s: 2.0 - 0.01 * s + 0.05 * (-1) ** s for s in steps}
    fused = _write_run(tmp_path / "fused", {s: v + 0.001 for s, v in base.items()})
    eager = _write_run(tmp_path / "eager", base)
    ref = _write_run(tmp_path / "eager_fp32", {s: v + (0.004 if s > 50 else 0.0) for s, v in base.items()})
    summary = analyze.analyze(tmp_path / "report", [], [fused, eager], ref, window=10)
    comp = summary["compare"]
    assert comp["fused_vs_eager"]["max_abs_diff"] == pytest.approx(0.001)
    assert comp["fused_vs_eager"]["first_diff"] == pytest.approx(0.001)
    assert comp["eager_vs_reference"]["max_abs_smoothed_diff"] == pytest.approx(0.004)
    assert comp["ratio"] == pytest.approx(0.25)
    assert comp["verdict"] == "agree within bf16 noise"
    # A fused path four times further off than bf16 rounding is flagged.
    worse = _write_run(tmp_path / "worse", {s: v + 0.016 for s, v in base.items()})
    comp = analyze.analyze(tmp_path / "report2", [], [worse, eager], ref, window=10)["compare"]
    assert comp["ratio"] == pytest.approx(4.0) and comp["verdict"].startswith("differ by more")


def test_minutes_add_up_over_resumed_segments(tmp_path):
    """A run resumed after a 100 s gap: the time axis counts each process from its start."""
    analyze = _load("analyze")
    times = {1: 1010.0, 2: 1020.0, 3: 1200.0, 4: 1210.0}
    path = _write_run(tmp_path / "run", {1: 2.0, 2: 1.9, 3: 1.8, 4: 1.7}, times=times, segments=[1000.0, 1190.0])
    run = analyze.load_run(path)
    assert [r["minutes"] * 60 for r in run.train] == pytest.approx([10, 20, 30, 40])
    assert run.resume_minutes == pytest.approx([20 / 60])
    # Steps per second between logs of one segment (not across the gap between the processes).
    assert [round(v, 3) for _, v, _ in analyze.step_rates(run)] == [0.1, 0.1]

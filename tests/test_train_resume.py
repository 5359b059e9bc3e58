"""Checkpoints: exact resume, atomic writes, non-finite loss, weight-only checkpoints."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import checkpointing
from train.pretrain import TrainingDiverged, run
from train.testing import QUIET, REPO, TINY_ARCH, build_tiny_sudoku4, subprocess_env


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return build_tiny_sudoku4(tmp_path_factory.mktemp("data") / "sudoku4")


def common(data, ckpt_dir):
    # 272 examples / 32 = 8 steps an epoch; 2 epochs, an evaluation (and checkpoint) after each.
    # ACT exploration on (halt_exploration_prob 0.1 by default): the random streams must resume too.
    return [f"data_path={data}", *TINY_ARCH, *QUIET, "global_batch_size=32", "epochs=2", "eval_interval=1",
            "lr=3e-3", "lr_warmup_steps=3", f"checkpoint_path={ckpt_dir}", "arch.halt_max_steps=3"]


def load(path):
    return checkpointing.load_file(path)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two checkpoints' weights and optimizer states, bit for bit."""
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizers"], b["optimizers"]):
        for p in sa["state"]:
            for name, t in sa["state"][p].items():
                if isinstance(t, torch.Tensor):
                    assert torch.equal(t, sb["state"][p][name]), (p, name)


def test_resume_is_exact(tiny_data, tmp_path, monkeypatch):
    """Bit for bit, on the CPU. On CUDA (H200, session 4) the resumed and the uninterrupted run
    differed in the last bits; test_resume_on_cuda_drifts_no_more_than_a_rerun tells a resume bug
    from kernels that add in a varying order."""
    monkeypatch.chdir(tmp_path)
    full = run(common(tiny_data, tmp_path / "full") + ["device=cpu"])
    # Stopped mid-epoch (step 5 of 16), then resumed with the same command.
    run(common(tiny_data, tmp_path / "split") + ["max_steps=5", "device=cpu"])
    assert checkpointing.latest_checkpoint(tmp_path / "split").name == "step_5.pt"
    resumed = run(common(tiny_data, tmp_path / "split") + ["device=cpu"])

    a, b = load(tmp_path / "full" / "step_16.pt"), load(tmp_path / "split" / "step_16.pt")
    assert a["step"] == b["step"] == 16
    assert a["model"].keys() == b["model"].keys()
    assert_same_training_state(a, b)
    assert full == resumed  # same evaluation metrics at the end
    # Reference key names, no torch.compile prefix.
    assert "model.inner.lm_head.weight" in a["model"] and not any("_orig_mod" in k for k in a["model"])


def test_resume_by_guide_command_uses_saved_config(tiny_data, tmp_path, monkeypatch):
    """The guide's resume command names only arch and checkpoint_path: the rest comes from the run."""
    monkeypatch.chdir(tmp_path)
    run(common(tiny_data, tmp_path / "run") + ["arch=hrm_v1_gated", "max_steps=4"])
    from train.pretrain import resolve_config

    cfg = resolve_config(["arch=hrm_v1_gated", f"checkpoint_path={tmp_path / 'run'}", "max_steps=6"])
    assert cfg.data_path == str(tiny_data) and cfg.global_batch_size == 32 and cfg.arch.hidden_size == 32
    assert cfg.max_steps == 6
    run(["arch=hrm_v1_gated", f"checkpoint_path={tmp_path / 'run'}", "max_steps=6"])
    assert checkpointing.latest_checkpoint(tmp_path / "run").name == "step_6.pt"


def test_resume_without_all_config_yaml_takes_the_checkpoints_config(tiny_data, tmp_path, monkeypatch, capsys):
    """A run directory without its all_config.yaml (deleted, or copied without it) resumes with the
    config its newest checkpoint stores, and says so; it used to fall back to the defaults (another
    dataset, another batch size)."""
    monkeypatch.chdir(tmp_path)
    run(common(tiny_data, tmp_path / "run") + ["arch=hrm_v1_gated", "max_steps=3"])
    (tmp_path / "run" / "all_config.yaml").unlink()
    capsys.readouterr()
    run(["arch=hrm_v1_gated", f"checkpoint_path={tmp_path / 'run'}", "max_steps=4"])
    assert (f"note: {tmp_path / 'run' / 'all_config.yaml'} is missing: resuming with the config stored in "
            "step_3.pt") in capsys.readouterr().err
    resumed = load(tmp_path / "run" / "step_4.pt")["config"]
    assert resumed["data_path"] == str(tiny_data) and resumed["global_batch_size"] == 32
    assert resumed["arch"]["hidden_size"] == 32


def test_resume_says_when_the_chosen_arch_is_not_the_runs(tiny_data, tmp_path, monkeypatch, capsys):
    """``arch=hrm_v1`` on a gated run's resume: the saved arch is kept, and the run says which
    chosen fields were not applied (explicit ``arch.<field>=`` overrides apply and are not listed)."""
    monkeypatch.chdir(tmp_path)
    run(common(tiny_data, tmp_path / "run") + ["arch=hrm_v1_gated", "max_steps=2"])
    from train.pretrain import resolve_config

    capsys.readouterr()
    tiny = [o for o in common(tiny_data, tmp_path / "run") if o.startswith("arch.")]
    cfg = resolve_config(["arch=hrm_v1", *tiny, "arch.loss.loss_type=softmax_cross_entropy",
                          f"checkpoint_path={tmp_path / 'run'}"])
    out = capsys.readouterr().err
    assert cfg.arch.use_gating and "note: resuming keeps the run's saved arch" in out
    assert "use_gating: True kept, not False" in out and "hidden_size" not in out
    # a nested field given explicitly is applied, and not reported as kept
    assert cfg.arch.loss.loss_type == "softmax_cross_entropy" and "loss" not in out
    resolve_config(["arch=hrm_v1_gated", *tiny, f"checkpoint_path={tmp_path / 'run'}"])
    assert "note:" not in capsys.readouterr().err  # the run's own arch: nothing to say


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resume_on_cuda_drifts_no_more_than_a_rerun(tiny_data, tmp_path, monkeypatch):
    """Two uninterrupted CUDA runs give the drift of the GPU's summation order (zero where it is
    deterministic); a stopped-and-resumed run may differ from the first by no more than ~that."""
    monkeypatch.chdir(tmp_path)
    cuda = ["device=cuda", "compile=false"]
    run(common(tiny_data, tmp_path / "a") + cuda)
    run(common(tiny_data, tmp_path / "b") + cuda)
    run(common(tiny_data, tmp_path / "split") + cuda + ["max_steps=5"])
    run(common(tiny_data, tmp_path / "split") + cuda)
    a, b, c = (load(tmp_path / d / "step_16.pt")["model"] for d in ("a", "b", "split"))

    def largest_difference(x, y):
        return max((x[k].float() - y[k].float()).abs().max().item() for k in x)

    rerun, resumed = largest_difference(a, b), largest_difference(a, c)
    assert resumed <= 10 * rerun, f"resumed run differs by {resumed:.3g}, a rerun by {rerun:.3g}"


def test_atomic_write_keeps_previous_latest(tmp_path, monkeypatch):
    checkpointing.save_training_state(tmp_path, 1, {"model": {"w": torch.ones(3)}})

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpointing.save_training_state(tmp_path, 2, {"model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    latest = checkpointing.latest_checkpoint(tmp_path)
    assert latest.name == "step_1.pt"
    assert torch.equal(load(latest)["model"]["w"], torch.ones(3))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    assert not (tmp_path / "step_2.pt").exists()


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from hrm import ACTLossHead

    original = ACTLossHead.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        carry, loss, metrics, outputs, halted = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= 10:  # step 10: after the epoch-1 checkpoint (step 8)
                loss = loss * float("nan")
        return carry, loss, metrics, outputs, halted

    monkeypatch.setattr(ACTLossHead, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="at step 10") as e:
        run(common(tiny_data, tmp_path / "nan"))
    assert "step_8.pt" in str(e.value)
    latest = checkpointing.latest_checkpoint(tmp_path / "nan")
    assert latest.name == "step_8.pt"
    state = load(latest)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_weight_only_checkpoint_evaluates_and_finetunes(tiny_data, tmp_path, monkeypatch):
    """A reference-style file: a bare state dict with torch.compile's `_orig_mod.` prefix, named
    step_<N>, with the reference trainer's all_config.yaml (class-path names) beside it."""
    monkeypatch.chdir(tmp_path)
    run(common(tiny_data, tmp_path / "src") + ["max_steps=3"])
    full = load(tmp_path / "src" / "step_3.pt")
    ref_dir = tmp_path / "reference_run"
    ref_dir.mkdir()
    torch.save({f"_orig_mod.{k}": v for k, v in full["model"].items()}, ref_dir / "step_3")
    import yaml

    cfg = yaml.safe_load((tmp_path / "src" / "all_config.yaml").read_text())
    cfg["arch"]["name"] = "hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1"
    cfg["arch"]["loss"] = {"name": "losses@ACTLossHead", "loss_type": "stablemax_cross_entropy"}
    for extra in ("compile", "device", "wandb", "progress", "log_interval", "max_steps", "data_build", "init_from"):
        cfg.pop(extra, None)
    (ref_dir / "all_config.yaml").write_text(yaml.safe_dump(cfg))

    out = subprocess.run([sys.executable, str(REPO / "train" / "evaluate.py"), f"checkpoint={ref_dir / 'step_3'}",
                          "save_outputs=true"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "all/exact_accuracy" in out.stdout
    saved = torch.load(ref_dir / "eval_step3_outputs.pt", weights_only=True)
    assert saved["preds"].shape == (16, 16) and saved["example_index"].tolist() == list(range(16))

    # Fine-tuning: a new run starting from those weights.
    run(common(tiny_data, tmp_path / "ft") + [f"init_from={ref_dir / 'step_3'}", "max_steps=1"])
    ft = load(tmp_path / "ft" / "step_1.pt")
    assert ft["step"] == 1
    # Resuming from a weight-only file is refused with a pointer to init_from.
    from train.config_utils import ConfigError

    with pytest.raises(ConfigError, match="init_from"):
        run(common(tiny_data, ref_dir))


def test_killed_run_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    """SIGKILL a training process once its first checkpoint exists, resume with the same command:
    the end state equals an uninterrupted run's (on the CPU, bit for bit: see test_resume_is_exact)."""
    import os
    import signal
    import time

    monkeypatch.chdir(tmp_path)
    args = common(tiny_data, tmp_path / "killed")[:-1] + ["epochs=6", "eval_interval=1", "arch.halt_max_steps=3"]
    args = [a for a in args if not a.startswith(("epochs=2",))] + ["device=cpu"]
    proc = subprocess.Popen([sys.executable, str(REPO / "train" / "pretrain.py"), *args], cwd=tmp_path,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if checkpointing.latest_checkpoint(tmp_path / "killed") is not None:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    killed_at = checkpointing.latest_checkpoint(tmp_path / "killed")
    assert killed_at is not None, proc.stderr.read()[-2000:]
    # Same thread count as the subprocess (OMP_NUM_THREADS=1): float sums then add up identically.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(args)  # resume
        uninterrupted = [a.replace(str(tmp_path / "killed"), str(tmp_path / "straight")) for a in args]
        run(uninterrupted)
    finally:
        torch.set_num_threads(threads)
    end = checkpointing.latest_checkpoint(tmp_path / "straight")
    a, b = load(end), load(tmp_path / "killed" / end.name)
    assert a["step"] == b["step"] > load(killed_at)["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # Steps logged before the kill and replayed after the resume are in metrics.jsonl once.
    from train.logging_utils import read_jsonl

    logged = [r["step"] for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl") if "train/lm_loss" in r]
    assert logged == list(range(1, a["step"] + 1))


def test_sigterm_checkpoints_after_the_step_and_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    """A SIGTERM (a scheduler's preemption) during step 5: the step finishes, a checkpoint of step 5 is
    written, the run stops with StoppedBySignal; resuming ends where an uninterrupted run does, bit for bit."""
    import os
    import signal

    import train.pretrain as pretrain

    monkeypatch.chdir(tmp_path)
    run(common(tiny_data, tmp_path / "full") + ["device=cpu"])
    real_step = pretrain.train_step

    def step_then_signal(cfg, state, batch, info):
        if state.step == 4:  # the step that becomes step 5
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(cfg, state, batch, info)

    monkeypatch.setattr(pretrain, "train_step", step_then_signal)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(pretrain.StoppedBySignal, match="SIGTERM") as stopped:
        run(common(tiny_data, tmp_path / "split") + ["device=cpu"])
    assert stopped.value.checkpoint.name == "step_5.pt" == checkpointing.latest_checkpoint(tmp_path / "split").name
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the trainer's handler is gone again
    monkeypatch.setattr(pretrain, "train_step", real_step)
    run(common(tiny_data, tmp_path / "split") + ["device=cpu"])
    assert_same_training_state(load(tmp_path / "full" / "step_16.pt"), load(tmp_path / "split" / "step_16.pt"))


def test_signals_before_training_starts_stop_at_once():
    """Before the loop is armed (data, model, compilation) a signal stops as usual: nothing trained,
    nothing to save; once armed it only raises the flag; the previous handlers come back after."""
    import os
    import signal

    from train.pretrain import stop_on_signals

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_on_signals() as flag:
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stopped.value.code == 128 + signal.SIGTERM and flag() is None
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        flag.arm()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert flag() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C once armed: at once
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_ctrl_c_from_the_shell_saves_and_says_how_to_resume(tiny_data, tmp_path):
    """SIGINT to the trainer process: exit status 130, a checkpoint, and the resume command on stderr."""
    import signal
    import time

    run_dir = tmp_path / "interrupted"
    args = [a for a in common(tiny_data, run_dir) if not a.startswith(("epochs=", "eval_interval="))]
    proc = subprocess.Popen([sys.executable, str(REPO / "train" / "pretrain.py"), *args, "epochs=50",
                             "eval_interval=50", "device=cpu"], cwd=tmp_path, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:  # a few steps logged
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-3000:]
    saved = checkpointing.latest_checkpoint(run_dir)
    assert saved is not None and load(saved)["step"] >= 2
    assert f'resume with checkpoint_path="{run_dir}"' in err


def test_max_train_minutes_stops_evaluates_and_checkpoints(tiny_data, tmp_path, monkeypatch, capsys):
    """A time limit ends training after the step in progress, then evaluates and saves, so that
    the same command resumes from there."""
    monkeypatch.chdir(tmp_path)
    clock = itertools.count(0, 30)  # every time.time() call advances 30 s (torch.compile calls it too)
    monkeypatch.setattr("train.pretrain.time.time", lambda: float(next(clock)))
    metrics = run(common(tiny_data, tmp_path / "timed") + ["max_train_minutes=2"])
    out = capsys.readouterr().out
    assert "max_train_minutes=2 reached at step" in out
    latest = checkpointing.latest_checkpoint(tmp_path / "timed")
    step = load(latest)["step"]
    assert 1 <= step < 16 and latest.name == f"step_{step}.pt"
    assert any(k.endswith("exact_accuracy") for k in metrics)


def test_final_accuracy_line_names_the_evaluation_step(tiny_data, tmp_path, monkeypatch, capsys):
    """A max_steps stop does not evaluate: the last line repeats the epoch-end evaluation and says so."""
    monkeypatch.chdir(tmp_path)
    run(common(tiny_data, tmp_path / "run") + ["max_steps=10"])  # evaluations at step 8 only
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("held-out exact accuracy")]
    assert line and line[-1].endswith("(step 10, from the evaluation at step 8)")


def _rng() -> list:
    """Every RNG stream the trainer checkpoints (python, numpy, torch, CUDA), comparable with ==."""
    state = checkpointing.capture_rng_state()
    cuda = state["cuda"] or []
    return [state["python"], [x.tolist() if torch.is_tensor(x) else x for x in state["numpy"]],
            state["torch"].tolist(), [t.tolist() for t in cuda]]


def test_precompile_dry_run_leaves_the_run_unchanged(tiny_data, tmp_path, monkeypatch, capsys):
    """precompile_kernels runs a throwaway training step and evaluation segment before the first
    step (on CUDA only their kernels compile; here they run): the model, the optimizer state and
    the RNG streams must be left as they were, so the whole run is the one without it."""
    import train.pretrain as pretrain

    seen = {}
    real_dry_run, real_step = pretrain.compile_kernels_ahead, pretrain.train_step

    def dry_run(cfg, state, batch, info):
        rng, weights = _rng(), {k: v.clone() for k, v in state.head.state_dict().items()}
        real_dry_run(cfg, state, batch, info)
        seen["rng kept"] = _rng() == rng
        seen["weights kept"] = all(torch.equal(v, weights[k]) for k, v in state.head.state_dict().items())

    def step(cfg, state, batch, info):  # the dry step draws random numbers (ACT exploration)
        rng = _rng()
        out = real_step(cfg, state, batch, info)
        seen.setdefault("dry step drew", _rng() != rng)
        return out

    monkeypatch.chdir(tmp_path)
    # On the CPU: bit-for-bit comparisons, and the exploration draws from the generator checked.
    args = common(tiny_data, tmp_path / "plain") + ["arch=hrm_v1_gated", "max_steps=6", "device=cpu"]
    plain = run(args)
    monkeypatch.setattr(pretrain, "compile_kernels_ahead", dry_run)
    monkeypatch.setattr(pretrain, "train_step", step)
    dry = run([a.replace("plain", "dry") for a in args] + ["precompile_kernels=true"])
    assert "precompile_kernels: 0 Triton kernel variants compiled ahead" in capsys.readouterr().out
    assert seen == {"dry step drew": True, "rng kept": True, "weights kept": True}
    a, b = load(tmp_path / "plain" / "step_6.pt"), load(tmp_path / "dry" / "step_6.pt")
    assert_same_training_state(a, b)
    assert plain == dry


def test_precompile_setting_is_checked(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="precompile_kernels must be auto, true or false"):
        run(common(tiny_data, tmp_path / "bad") + ["precompile_kernels=sometimes"])


def test_precompile_failure_warns_and_trains_on(tiny_data, tmp_path, monkeypatch, capsys):
    """A dry run that breaks (say, a Triton without what it needs) costs a warning, not the run."""
    import hrm_kernels

    def broken(*args, **kwargs):
        raise RuntimeError("no AsyncCompileMode here")

    monkeypatch.setattr(hrm_kernels, "compile_ahead", broken)
    monkeypatch.chdir(tmp_path)
    run(common(tiny_data, tmp_path / "run") + ["max_steps=2", "precompile_kernels=true"])
    err = capsys.readouterr().err
    assert "warning: precompile_kernels failed (RuntimeError: no AsyncCompileMode here)" in err
    assert checkpointing.latest_checkpoint(tmp_path / "run").name == "step_2.pt"


def test_checkpoint_keep_last_rotates_and_still_resumes(tiny_data, tmp_path, monkeypatch):
    """checkpoint_keep_last=2: after three evaluations only the newest two checkpoints remain, and
    the run resumes from the newest one."""
    monkeypatch.chdir(tmp_path)
    args = common(tiny_data, tmp_path / "run") + ["epochs=3", "checkpoint_keep_last=2"]
    run(args + ["max_steps=20"])
    kept = [p.name for p in checkpointing.list_checkpoints(tmp_path / "run")]
    assert kept == ["step_16.pt", "step_20.pt"]  # evaluations after steps 8 and 16, the stop at 20
    run(args)
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "run")] == ["step_20.pt", "step_24.pt"]
    assert load(tmp_path / "run" / "step_24.pt")["step"] == 24


def test_keep_last_removes_the_other_ranks_files_too(tmp_path):
    for step in (1, 2, 3):
        checkpointing.atomic_torch_save({"step": step}, tmp_path / f"step_{step}.rank1.pt")
        checkpointing.save_training_state(tmp_path, step, {"step": step}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "step_2.pt", "step_2.rank1.pt", "step_3.pt", "step_3.rank1.pt"]


def test_checkpoint_keep_last_is_checked(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="checkpoint_keep_last must be null"):
        run(common(tiny_data, tmp_path / "bad") + ["checkpoint_keep_last=0"])


def test_precompile_dry_run_with_the_triton_kernels(tiny_data, tmp_path, monkeypatch, capsys):
    """The dry run on copies of the Triton path's optimizers: no failure (the interpreter on the
    CPU compiles nothing ahead; on CUDA the variants compile on the thread pool, and the training
    steps and evaluation after it meet no kernel variant that it did not prepare)."""
    import contextlib

    import hrm_kernels

    monkeypatch.chdir(tmp_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded, after_dry_run = [], []  # kernel variants loaded into Triton's in-memory caches
    if torch.cuda.is_available():
        from triton import knobs

        monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda *a, **k: loaded.append(k.get("repr")))
        ahead = hrm_kernels.compile_ahead

        @contextlib.contextmanager
        def marking_the_end(*args, **kwargs):
            with ahead(*args, **kwargs) as done:
                yield done
            after_dry_run.append(len(loaded))

        monkeypatch.setattr(hrm_kernels, "compile_ahead", marking_the_end)
    run(common(tiny_data, tmp_path / "run") + ["arch.kernels=triton", "max_steps=2", f"device={device}",
                                               "precompile_kernels=true"])
    captured = capsys.readouterr()
    assert "precompile_kernels failed" not in captured.err
    compiled = re.search(r"precompile_kernels: (\d+) Triton kernel variants compiled ahead", captured.out)
    assert compiled is not None, captured.out[-2000:]
    if not torch.cuda.is_available():
        assert int(compiled.group(1)) == 0
    else:
        # The hook saw each variant compiled ahead (so it is watching), and nothing after.
        assert after_dry_run and after_dry_run[0] == int(compiled.group(1)), (after_dry_run, loaded)
        assert loaded[after_dry_run[0]:] == [], "compiled after the dry run"


def _config_error(args):
    from train.config_utils import ConfigError

    with pytest.raises(ConfigError) as e:
        run(args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_resume_mistakes_are_refused_with_the_fix(tiny_data, tmp_path, monkeypatch):
    """Settings the saved data position depends on (eval_interval: an iteration's epochs; batch size;
    seed), another model shape, a damaged newest checkpoint: one-line errors that say what to do,
    instead of a silent early end (eval_interval), a shape error deep in the model, or a traceback."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run(common(tiny_data, run_dir) + ["max_steps=10"])  # checkpoints at steps 8 (end of epoch 1) and 10
    for override, run_value in (("eval_interval=2", "eval_interval=1"), ("global_batch_size=16", "global_batch_size=32"),
                                ("seed=3", "seed=0")):
        msg = _config_error(common(tiny_data, run_dir) + [override])
        assert f"{override} differs from the run's {run_value}" in msg and "another checkpoint_path" in msg, msg
    msg = _config_error(common(tiny_data, run_dir) + ["arch.hidden_size=64"])
    assert "does not match this model" in msg and "size mismatch" in msg
    newest = run_dir / "step_10.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short
    msg = _config_error(common(tiny_data, run_dir))
    assert "step_10.pt is not a readable checkpoint" in msg and "resume from the previous one, step_8.pt" in msg
    msg = _config_error(common(tiny_data, tmp_path / "new") + [f"init_from={newest}"])
    assert msg.startswith(f"init_from={newest}: ") and "not a readable checkpoint" in msg
    newest.unlink()  # as the message says: the previous checkpoint resumes
    run(common(tiny_data, run_dir))
    assert checkpointing.latest_checkpoint(run_dir).name == "step_16.pt"
    # A run whose iterations were its whole `epochs` (eval_interval null) trains longer only with the
    # iteration length named: the message says how.
    whole = [a for a in common(tiny_data, tmp_path / "whole") if not a.startswith("eval_interval=")]
    run(whole + ["eval_interval=null", "max_steps=3"])
    msg = _config_error(whole + ["epochs=4"])
    assert "had eval_interval=null" in msg and "with epochs=4 pass eval_interval=2" in msg, msg
    run(whole + ["epochs=4", "eval_interval=2", "max_steps=5"])
    assert checkpointing.latest_checkpoint(tmp_path / "whole").name == "step_5.pt"


def test_reusing_a_run_name_is_refused(tiny_data, tmp_path, monkeypatch):
    """A new run under the name of one with checkpoints would resume it silently with the new settings
    (and rewrite its saved config): it stops and names both ways on."""
    monkeypatch.chdir(tmp_path)
    args = [a for a in common(tiny_data, tmp_path) if not a.startswith("checkpoint_path=")] + ["run_name=r1"]
    run(args + ["max_steps=2"])
    saved = next((tmp_path / "checkpoints").glob("*/r1/all_config.yaml")).read_text()
    msg = _config_error(args + ["lr=5e-3"])
    assert "run_name='r1' already has checkpoints" in msg and "checkpoint_path=" in msg and "another run_name" in msg
    assert next((tmp_path / "checkpoints").glob("*/r1/all_config.yaml")).read_text() == saved


def test_checkpoint_files_follow_the_umask(tmp_path):
    """Readable by the group and others like any file the user writes (mkstemp alone makes them 0600)."""
    import os

    path = checkpointing.save_training_state(tmp_path, 1, {"model": {"w": torch.ones(2)}})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_checkpoint_path_above_the_runs_is_refused(tiny_data, tmp_path, monkeypatch, capsys):
    """checkpoint_path naming a directory of runs (the project directory checkpoints/<project>, or
    checkpoints/) started a fresh run there, beside the runs: it is refused, naming the run
    directories below it, newest first. An empty or new directory still starts a new run, and says so."""
    import os

    from train.pretrain import resolve_config

    monkeypatch.chdir(tmp_path)
    project = Path("checkpoints") / "proj"
    for name, step, when in (("HRM older", 3, 1_000_000), ("newer", 5, 2_000_000), ("no checkpoint yet", 0, 0)):
        (project / name).mkdir(parents=True)
        if step:
            path = checkpointing.save_training_state(project / name, step, {"model": {}})
            os.utime(path, (when, when))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for given in (project, Path("checkpoints")):
        msg = _config_error(common(tiny_data, given))
        assert msg.startswith(f"checkpoint_path={given} holds no checkpoint to resume, but run directories "
                              "inside it do: did you mean "), msg
        assert (f"did you mean checkpoint_path={project / 'newer'} (step_5.pt) or "
                f"checkpoint_path=\"{project / 'HRM older'}\" (step_3.pt)?") in msg, msg
        assert "to start a new run, give it a directory of its own" in msg
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written
    # A directory without checkpoints anywhere below it, or a new one: a new run, said plainly.
    capsys.readouterr()
    resolve_config(common(tiny_data, project / "no checkpoint yet"))
    err = capsys.readouterr().err
    assert (f"note: checkpoint_path={project / 'no checkpoint yet'} holds no checkpoint (step_<N>.pt): nothing to "
            "resume, so a NEW run starts there from step 0") in err


def test_resume_with_another_length_says_the_schedule_follows(tiny_data, tmp_path, monkeypatch, capsys):
    """Resuming with other epochs changes total_steps, so the LR schedule: allowed (a run may be
    lengthened), with a note naming both lengths; the same length gives no note."""
    monkeypatch.chdir(tmp_path)
    run(common(tiny_data, tmp_path / "run") + ["max_steps=3"])  # epochs=2: total_steps 2 * 272 // 32 = 17
    capsys.readouterr()
    run(common(tiny_data, tmp_path / "run") + ["epochs=3", "max_steps=4"])
    err = capsys.readouterr().err
    assert ("note: resuming with total_steps=25 (epochs=3); the checkpoint step_3.pt was written with "
            "total_steps=17 (epochs=2): the learning-rate schedule follows the new length from step 3 on") in err
    assert load(tmp_path / "run" / "step_4.pt")["total_steps"] == 25
    run(common(tiny_data, tmp_path / "run") + ["epochs=3", "max_steps=5"])
    assert "total_steps" not in capsys.readouterr().err


def test_resume_applies_optimizer_overrides_and_keeps_the_wandb_id(tiny_data, tmp_path, monkeypatch, capsys):
    """Betas and weight decays given on resume are the ones the optimizers run with (the loaded
    state's saved settings used to win silently while all_config.yaml claimed the new values), with a
    note; an unchanged resume gives none. A resume without W&B keeps the run's W&B id for a later one."""
    monkeypatch.chdir(tmp_path)
    run(common(tiny_data, tmp_path / "run") + ["max_steps=3"])
    first = load(tmp_path / "run" / "step_3.pt")
    groups = [sd["param_groups"][0] for sd in first["optimizers"]]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1] and tuple(groups[1]["betas"]) == (0.9, 0.95)
    first["wandb_id"] = "abc123"  # as a run with W&B on would have written it
    checkpointing.atomic_torch_save(first, tmp_path / "run" / "step_3.pt")
    capsys.readouterr()
    run(common(tiny_data, tmp_path / "run") + ["max_steps=4", "weight_decay=0.5", "beta2=0.5",
                                                "puzzle_emb_weight_decay=0.7"])
    err = capsys.readouterr().err
    assert "note: resuming AdamATan2 with betas=(0.9, 0.5) (the checkpoint had (0.9, 0.95)), weight_decay=0.5" in err
    assert "weight_decay=0.7 (the checkpoint had 0.1)" in err
    groups = [sd["param_groups"][0] for sd in load(tmp_path / "run" / "step_4.pt")["optimizers"]]
    assert [g["weight_decay"] for g in groups] == [0.7, 0.5] and tuple(groups[1]["betas"]) == (0.9, 0.5)
    assert load(tmp_path / "run" / "step_4.pt")["wandb_id"] == "abc123"
    run(common(tiny_data, tmp_path / "run") + ["max_steps=5", "weight_decay=0.5", "beta2=0.5",
                                                "puzzle_emb_weight_decay=0.7"])
    assert "note: resuming" not in capsys.readouterr().err


def test_resume_is_exact_with_several_sets(tiny_data, tmp_path, monkeypatch):
    """A dataset with two sets (the train split stored as sets a and b): the loader counts one
    iteration per set, so a pass is two of them. Stopped inside the first pass's second set and inside
    the second pass, the resumed run ends bit for bit where the uninterrupted one does (it used to
    restart the pass, or skip the rest of training)."""
    import json
    import shutil

    data = tmp_path / "two_sets"
    shutil.copytree(tiny_data, data)
    train = data / "train"
    for f in list(train.glob("all__*")):
        for s in ("a", "b"):
            shutil.copy(f, train / f"{s}__{f.name[5:]}")
    meta = json.loads((train / "dataset.json").read_text())
    meta.update(sets=["a", "b"], total_groups=2 * meta["total_groups"])
    (train / "dataset.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    run(common(data, tmp_path / "full") + ["device=cpu"])
    last = checkpointing.latest_checkpoint(tmp_path / "full")
    for stop in (12, 20):
        run(common(data, tmp_path / f"split{stop}") + [f"max_steps={stop}", "device=cpu"])
        run(common(data, tmp_path / f"split{stop}") + ["device=cpu"])
        resumed = checkpointing.latest_checkpoint(tmp_path / f"split{stop}")
        assert resumed.name == last.name
        assert_same_training_state(load(last), load(resumed))


def test_checkpoint_path_near_a_run_asks_whether_it_was_meant(tmp_path, monkeypatch, capsys):
    """A typo of a run directory to resume (``r11`` beside the run ``r1``) still starts a new run (a
    note, as for any new directory), but the note names the run it was probably meant to be; a name
    unlike any run's gets no such question."""
    from train.pretrain import resolve_config

    monkeypatch.chdir(tmp_path)
    project = Path("checkpoints") / "proj"
    checkpointing.save_training_state(project / "sudoku run1", 4, {"model": {}})
    capsys.readouterr()
    resolve_config([f"checkpoint_path={project / 'sudoku rnu1'}"])
    err = capsys.readouterr().err
    assert "so a NEW run starts there from step 0" in err
    assert f"did you mean checkpoint_path=\"{project / 'sudoku run1'}\" (step_4.pt)?" in err, err
    resolve_config([f"checkpoint_path={project / 'maze'}"])
    err = capsys.readouterr().err
    assert "so a NEW run starts there from step 0" in err and "did you mean" not in err, err

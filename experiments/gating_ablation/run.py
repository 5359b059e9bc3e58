"""Gated vs ungated HRM on hard 9x9 Sudoku: every command of the experiment, in one script.

Each mode is one command that fits the GPU machine's 10-minute limit (``--deadline``, 560 s by
default, after which running trainers are stopped so that their files still come back). It
writes only small files to ``--out``: each run's ``metrics.jsonl``, ``all_config.yaml``,
``segments.jsonl``, ``gates.png``, ``train.log`` and ``command.txt``, a report (plots and
``summary.md``) made by ``analyze.py``, and ``run_info.txt`` / ``dataset_info.json``.

Modes::

    ablation       build the dataset, then train arch=hrm_v1 (first GPU) and arch=hrm_v1_gated
                   (second GPU) at the same time, --minutes each, every other setting identical
    continue       resume both ablation arms from their checkpoints for --minutes more (needs the
                   same machine, still holding the checkpoints under --work: see the README)
    compare_paths  the gated model for --steps steps from the same seed with arch.kernels=triton
                   (fused, first GPU) and arch.kernels=eager (second GPU), both bf16 without
                   torch.compile, then the eager path in float32 as the bf16-noise reference
    scenario1      the user guide's Scenario 1 quick test on the same Sudoku data (one GPU)
    checks         compare_paths and scenario1 in one command (scenario1 on the second GPU
                   while the float32 reference runs on the first)

GPU machine (two H100s)::

    python3 experiments/gating_ablation/run.py ablation --out "$OUT"
    python3 experiments/gating_ablation/run.py checks --out "$OUT"

Local CPU smoke version (tiny model, tiny dataset, the same pipeline)::

    python experiments/gating_ablation/run.py ablation --smoke --out /tmp/gating-smoke
    python experiments/gating_ablation/run.py checks --smoke --out /tmp/gating-smoke

Datasets and checkpoints go under ``--work`` (default: the repository root, whose ``data/`` and
``checkpoints/`` are git-ignored); nothing large is written to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
T0 = time.time()

# Files of a trainer run directory that are small enough to come back from the GPU machine.
ARTEFACTS = ("metrics.jsonl", "all_config.yaml", "segments.jsonl", "gates.png")

# ------------------------------------------------------------------------------------------------
# The experiment's settings. "gpu" is the real experiment; "smoke" shrinks the data and the model
# so that the same pipeline runs on a CPU in seconds (a test of the scripts, not of the model).
# ------------------------------------------------------------------------------------------------
DATA_NAME = {"gpu": "sudoku-hard-1k-aug-1000", "smoke": "sudoku-hard-smoke"}

# python -m hrm.data.sudoku arguments (the README's "Train on the real tasks" Sudoku line, seed 0).
DATA_ARGS = {
    "gpu": ["--difficulty", "hard", "--subsample-size", "1000", "--num-aug", "1000", "--seed", "0"],
    "smoke": ["--difficulty", "hard", "--num-train", "32", "--num-test", "16", "--num-aug", "8", "--seed", "0"],
}

# Settings shared by both ablation arms (the arms differ only in arch=...). One epoch is one
# augmented copy of each of the 1000 training puzzles (1000 examples, 1.3 steps at batch 768);
# eval_interval=250 epochs is 325 steps, so an arm at ~10 steps/s is evaluated about every 30 s.
# lr_min_ratio stays 1.0 (the default): after warm-up the learning rate is constant, so stopping
# on time does not cut a schedule short.
TRAIN_COMMON = {
    "gpu": ["global_batch_size=768", "epochs=20000", "eval_interval=250", "lr=1e-4", "lr_warmup_steps=1000",
            "seed=0", "checkpoint_every_eval=false", "log_interval=10"],
    "smoke": ["global_batch_size=16", "epochs=400", "eval_interval=2", "lr=1e-3", "lr_warmup_steps=5",
              "seed=0", "checkpoint_every_eval=false", "log_interval=2",
              "device=cpu", "compile=false", "arch.forward_dtype=float32",
              "arch.hidden_size=64", "arch.num_heads=2", "arch.expansion=2", "arch.H_layers=1",
              "arch.L_layers=1", "arch.halt_max_steps=2"],
}
QUIET = ["wandb=false", "progress=false", "project_name=gating_ablation"]

ABLATION_ARMS = (("ungated", "arch=hrm_v1"), ("gated", "arch=hrm_v1_gated"))

# compare_paths: the same seed, data and model; only the kernels (and, for the reference, the
# precision) differ. No torch.compile: Inductor would replace the eager ops by its own kernels.
# A short warm-up so that the learning rate is at full size for most of the steps compared.
COMPARE_ARMS = {
    "gpu": {"fused": ["arch.kernels=triton"], "eager": ["arch.kernels=eager"],
            "eager_fp32": ["arch.kernels=eager", "arch.forward_dtype=float32"]},
    # On a CPU Triton runs only in its (far too slow) interpreter: the smoke "fused" arm runs
    # arch.kernels=auto, which is eager on CPU, and there is no float32 reference (smoke runs are
    # float32 throughout). The smoke run checks the pipeline, not the kernels.
    "smoke": {"fused": ["arch.kernels=auto"], "eager": ["arch.kernels=eager"]},
}
COMPARE_EXTRA = ["compile=false", "lr_warmup_steps=50", "log_interval=1"]

# The guide's Scenario 1, as written (data_path added: the guide leaves it at its ARC default).
SCENARIO1 = ["arch=hrm_v1_gated", "arch.hidden_size=128", "arch.H_layers=2", "arch.L_layers=2",
             "global_batch_size=32", "epochs=1000", "eval_interval=100"]
SCENARIO1_SMOKE = ["device=cpu", "compile=false", "arch.forward_dtype=float32", "arch.halt_max_steps=2",
                   "log_interval=2"]

DEFAULT_MINUTES = {"gpu": 8.0, "smoke": 0.15}
DEFAULT_STEPS = {"gpu": 300, "smoke": 10}
DEFAULT_SCENARIO1_MINUTES = {"gpu": 4.0, "smoke": 0.2}
# Seconds a trainer needs besides its max_train_minutes: start-up (imports, loading the 160 MB
# dataset, building the model), the final evaluation and the final checkpoint (~330 MB).
MARGIN_S = {"gpu": 75.0, "smoke": 20.0}


VERSIONS = ("import sys, numpy, torch; print('python', sys.version.split()[0], '| numpy', numpy.__version__, "
            "'| torch', torch.__version__, '| cuda', torch.version.cuda, end=' ')\n"
            "try:\n    import triton; print('| triton', triton.__version__)\nexcept Exception: print('| no triton')")


class UsageError(Exception):
    """A mistake in how the script was called or what the machine has; the message says what to do."""


def log(msg: str, out: Path | None = None) -> None:
    line = f"[{time.time() - T0:7.1f}s] {msg}"
    print(line, flush=True)
    if out is not None:
        with open(out / "run_info.txt", "a") as f:
            f.write(line + "\n")


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------
def dataset_digest(path: Path) -> str:
    """sha256 over the dataset's arrays and metadata (file names and bytes, in sorted order): two
    builds with equal digests hold the same puzzles in the same order."""
    h = hashlib.sha256()
    for split in ("train", "test"):
        for f in sorted((path / split).iterdir()):
            h.update(f"{split}/{f.name}\n".encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def build_dataset(profile: str, path: Path, out: Path, workers: int) -> None:
    """Build the Sudoku dataset at ``path`` unless a finished build is already there."""
    cmd = [sys.executable, "-m", "hrm.data.sudoku", "--output-dir", str(path), *DATA_ARGS[profile],
           "--workers", str(workers)]
    info = {"command": shlex.join(cmd), "path": str(path)}
    if (path / "test" / "dataset.json").is_file() and (path / "build_info.json").is_file():
        log(f"dataset: reusing {path}", out)
        info["reused"] = True
    else:
        if path.exists():
            shutil.rmtree(path)  # an unfinished build of ours
        log(f"dataset: {shlex.join(cmd)}", out)
        t = time.time()
        res = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        (out / "dataset_build.log").write_text(re.sub(r"[^\n]*\r", "", res.stdout))  # drop progress bars
        if res.returncode != 0:
            raise UsageError(f"dataset build failed (exit {res.returncode}); see {out / 'dataset_build.log'}")
        info["build_seconds"] = round(time.time() - t, 1)
        info["reused"] = False
        log(f"dataset: built in {info['build_seconds']} s with {workers} workers", out)
    info["sha256"] = dataset_digest(path)
    info["build_info"] = json.loads((path / "build_info.json").read_text())
    for split in ("train", "test"):
        info[split] = json.loads((path / split / "dataset.json").read_text())
    (out / "dataset_info.json").write_text(json.dumps(info, indent=1))
    log(f"dataset: sha256 {info['sha256']}", out)


# ------------------------------------------------------------------------------------------------
# Trainer processes
# ------------------------------------------------------------------------------------------------
def child_env(gpu: str | None = None, threads: int = 1) -> dict:
    """Environment of a child process: the repository importable, the given GPU only (None: leave
    CUDA_VISIBLE_DEVICES alone), no Triton interpreter (pytest switches it on for kernel tests on
    CPU; training under it would take hours)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = str(threads)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def latest_step(run_dir: Path) -> int | None:
    """Step of the newest ``step_<N>.pt`` training checkpoint in ``run_dir`` (None if none)."""
    steps = [int(m.group(1)) for p in run_dir.glob("step_*.pt") if (m := re.fullmatch(r"step_(\d+)\.pt", p.name))]
    return max(steps) if steps else None


@dataclass
class Arm:
    """One trainer invocation: where it checkpoints, where its small files go, how it is called."""

    name: str
    run_dir: Path                   # checkpoint_path (large files stay here)
    out_dir: Path                   # small files, under --out
    overrides: list[str]
    gpu: str | None = None
    minutes: float | None = None    # max_train_minutes of this invocation
    mode: str = ""
    fresh: bool = True              # start from step 0: remove an earlier run in run_dir first
    proc: subprocess.Popen | None = None
    rc: int | None = None
    killed: bool = False
    extra: dict = field(default_factory=dict)

    def command(self) -> list[str]:
        """The trainer command: plain python on one GPU, torchrun (data-parallel, same global
        batch) when ``gpu`` lists several, e.g. "0,1"."""
        ov = list(self.overrides) + [f"run_name={self.name}", f"checkpoint_path={self.run_dir}"]
        if self.minutes is not None:
            ov.append(f"max_train_minutes={self.minutes:.3f}")
        ranks = len(self.gpu.split(",")) if self.gpu else 1
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
                    if ranks > 1 else [sys.executable])
        return [*launcher, "train/pretrain.py", *merge_overrides(ov)]

    def shown(self) -> str:
        """The command as a shell line, GPUs included."""
        gpus = f"CUDA_VISIBLE_DEVICES={self.gpu} " if self.gpu is not None else ""
        return gpus + shlex.join(["python3", *self.command()[1:]])


def merge_overrides(overrides: list[str]) -> list[str]:
    """One ``key=value`` per key, the last value winning (as Hydra does), in first-seen order, so
    that the printed command lines show each setting once."""
    merged: dict[str, str] = {}
    for ov in overrides:
        key = ov.split("=", 1)[0]
        merged[key] = ov
    return list(merged.values())


def sync_artefacts(arm: Arm) -> None:
    """Copy the run directory's small files to the arm's output directory."""
    arm.out_dir.mkdir(parents=True, exist_ok=True)
    for name in ARTEFACTS:
        src = arm.run_dir / name
        if src.is_file():
            tmp = arm.out_dir / f".{name}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, arm.out_dir / name)


def start(arm: Arm, threads: int, out: Path) -> None:
    """Launch the trainer for ``arm`` (in its own process group), noting the segment's start."""
    if arm.fresh and arm.run_dir.exists():
        log(f"{arm.name}: removing the earlier run in {arm.run_dir} (this one starts from step 0)", out)
        shutil.rmtree(arm.run_dir)
    arm.run_dir.mkdir(parents=True, exist_ok=True)
    arm.out_dir.mkdir(parents=True, exist_ok=True)
    resumed_from = latest_step(arm.run_dir)
    segment = {"start": time.time(), "mode": arm.mode, "max_train_minutes": arm.minutes,
               "resumed_from_step": resumed_from, "gpu": arm.gpu}
    with open(arm.run_dir / "segments.jsonl", "a") as f:
        f.write(json.dumps(segment) + "\n")
    cmd = arm.command()
    with open(arm.out_dir / "command.txt", "a") as f:
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} mode={arm.mode}\n{arm.shown()}\n")
    log(f"{arm.name}: start{' (resuming from step %d)' % resumed_from if resumed_from is not None else ''}: "
        f"{arm.shown()}", out)
    logf = open(arm.out_dir / "train.log", "a")
    arm.proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(arm.gpu, threads), stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    logf.close()


def stop(arm: Arm) -> None:
    """Stop a trainer that outlived the deadline: SIGTERM to its process group, SIGKILL 5 s later."""
    if arm.proc is None or arm.proc.poll() is not None:
        return
    arm.killed = True
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(arm.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            arm.proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_chains(chains: list[list], threads: int, out: Path, deadline: float) -> None:
    """Run lists of arms: the chains in parallel, the arms of a chain one after the other. An item
    may be a callable returning an Arm (or None to skip), to size it when its turn comes. Every
    trainer still running at ``deadline`` (absolute time) is stopped. Small files are copied to
    --out every 15 s, so they come back even if the machine's own time limit strikes first."""
    pending = [list(c) for c in chains]
    running: list[Arm | None] = [None] * len(chains)
    done: list[Arm] = []
    last_sync = 0.0
    while True:
        for i, chain in enumerate(pending):
            arm = running[i]
            if arm is not None and arm.proc.poll() is not None:
                arm.rc = arm.proc.returncode
                sync_artefacts(arm)
                log(f"{arm.name}: finished with exit code {arm.rc}"
                    + (f" (see {arm.out_dir / 'train.log'})" if arm.rc else ""), out)
                done.append(arm)
                running[i] = arm = None
            while arm is None and chain:
                item = chain.pop(0)
                arm = item() if callable(item) else item
                if arm is not None:
                    start(arm, threads, out)
                    running[i] = arm
        if all(a is None for a in running):
            break
        now = time.time()
        if now >= deadline:
            for arm in running:
                if arm is not None:
                    log(f"{arm.name}: still running at the deadline: stopping it", out)
                    stop(arm)
            for chain in pending:
                for item in chain:
                    log(f"skipped (deadline reached): {getattr(item, 'name', 'a later run')}", out)
                chain.clear()
            continue
        if now - last_sync > 15:
            for arm in running:
                if arm is not None:
                    sync_artefacts(arm)
            last_sync = now
        time.sleep(0.5)
    for arm in done:
        sync_artefacts(arm)
    failed = [a.name + (" (stopped at the deadline)" if a.killed else "") for a in done if a.rc]
    if failed:
        raise RuntimeError(f"trainer run(s) did not finish cleanly: {', '.join(failed)}")


def analyze(report: Path, runs: list[Path], out: Path, compare: list[Path] | None = None,
            reference: Path | None = None) -> bool:
    """Run analyze.py on the runs that wrote a metrics file; say which did not."""
    have = [r for r in runs if (r / "metrics.jsonl").is_file()]
    for r in runs:
        if r not in have:
            log(f"analysis: {r} has no metrics.jsonl (the run failed before logging; see its train.log)", out)
    cmd = [sys.executable, str(HERE / "analyze.py"), "--out", str(report), *map(str, have)]
    if compare:
        if not all((c / "metrics.jsonl").is_file() for c in compare):
            log("analysis: a compare_paths run has no metrics.jsonl; no comparison", out)
        else:
            cmd += ["--compare", *map(str, compare)]
            if reference is not None and (reference / "metrics.jsonl").is_file():
                cmd += ["--reference", str(reference)]
    if len(cmd) == 4:
        return False
    log(f"analysis: {shlex.join(cmd[1:])}", out)
    res = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    (report.parent / "analysis.log").write_text(res.stdout)
    print(res.stdout, flush=True)
    if res.returncode != 0:
        log(f"analysis failed (exit {res.returncode}); the metrics files are in {out}", out)
    return res.returncode == 0


# ------------------------------------------------------------------------------------------------
# Modes
# ------------------------------------------------------------------------------------------------
def gpu_list() -> list[str]:
    """Visible GPUs, one line each (empty without nvidia-smi)."""
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=30)
        return [l.strip() for l in res.stdout.splitlines() if l.strip()] if res.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        return []


def remaining_minutes(deadline: float, margin: float) -> float:
    return (deadline - time.time() - margin) / 60.0


def ablation_arms(args, resume: bool) -> list[Arm]:
    """The two arms: identical settings but for arch=hrm_v1 / arch=hrm_v1_gated."""
    common = [f"data_path={args.data}", *TRAIN_COMMON[args.profile], *QUIET]
    if args.max_steps is not None:
        common.append(f"max_steps={args.max_steps}")
    return [Arm(name, args.ckpt / "ablation" / name, args.out / "ablation" / name, [arch, *common, *args.set],
                gpu=args.gpus[i], mode="continue" if resume else "ablation", fresh=not resume)
            for i, (name, arch) in enumerate(ABLATION_ARMS)]


def check_resumable(args) -> None:
    """``continue`` needs both arms' checkpoints; say so at once (before building anything)."""
    for arm in ablation_arms(args, resume=True):
        if latest_step(arm.run_dir) is None:
            raise UsageError(
                f"continue: no checkpoint in {arm.run_dir}. Checkpoints (~330 MB each) are not carried back "
                f"through --out, so `continue` works only on the machine that ran `ablation` while it still "
                f"holds {args.ckpt} (a warm machine, or a persistent --work disk). Run `ablation` instead.")


def mode_ablation(args, resume: bool) -> None:
    arms = ablation_arms(args, resume)
    minutes = min(args.minutes, remaining_minutes(args.deadline_at, MARGIN_S[args.profile]))
    if minutes < args.minutes:
        log(f"max_train_minutes capped at {minutes:.2f} (asked {args.minutes}) to finish before the "
            f"{args.deadline:.0f} s deadline", args.out)
    if minutes <= 0.05:
        raise UsageError(f"no time left for training before the {args.deadline:.0f} s deadline")
    for arm in arms:
        arm.minutes = minutes
    try:
        run_chains([[a] for a in arms], args.threads, args.out, args.deadline_at)
    finally:
        for arm in arms:
            log(f"{arm.name}: checkpoint step {latest_step(arm.run_dir)} in {arm.run_dir}", args.out)
        analyze(args.out / "ablation" / "report", [a.out_dir for a in arms], args.out)


def compare_arm(args, name: str, gpu: str | None) -> Arm:
    """One compare_paths run: the gated model, the ablation's settings, --steps steps."""
    ov = ["arch=hrm_v1_gated", f"data_path={args.data}", *TRAIN_COMMON[args.profile], *QUIET, *COMPARE_EXTRA,
          *COMPARE_ARMS[args.profile][name], f"max_steps={args.steps}", *args.set]
    return Arm(name, args.ckpt / "compare_paths" / name, args.out / "compare_paths" / name, ov, gpu=gpu,
               mode="compare_paths")


def scenario1_arm(args, gpu: str | None) -> Arm | None:
    minutes = min(args.scenario1_minutes, remaining_minutes(args.deadline_at, MARGIN_S[args.profile]))
    if minutes < min(0.5, args.scenario1_minutes):
        log(f"scenario1: skipped, only {max(minutes, 0):.2f} min left before the deadline", args.out)
        return None
    ov = [*SCENARIO1, f"data_path={args.data}", *QUIET, "log_interval=10"]
    if args.profile == "smoke":
        ov += SCENARIO1_SMOKE
    return Arm("scenario1", args.ckpt / "scenario1" / "gated", args.out / "scenario1" / "gated", [*ov, *args.set],
               gpu=gpu, minutes=minutes, mode="scenario1")


def mode_checks(args, compare: bool, scenario1: bool) -> None:
    g0, g1 = args.gpus[0], args.gpus[-1]
    chains: list[list] = []
    if compare:
        # fused and eager at once (one GPU each), then the float32 reference on the first GPU. The
        # smoke profile runs in float32 already: there the reference would repeat the eager run.
        first = [compare_arm(args, "fused", g0)]
        if args.profile == "gpu":
            first.append(lambda: compare_arm(args, "eager_fp32", g0))
        chains.append(first)
        second = [compare_arm(args, "eager", g1)]
        if scenario1:
            second.append(lambda: scenario1_arm(args, g1))
        chains.append(second)
    elif scenario1:
        chains.append([lambda: scenario1_arm(args, g0)])
    try:
        run_chains(chains, args.threads, args.out, args.deadline_at)
    finally:
        if compare:
            d = args.out / "compare_paths"
            analyze(d / "report", [], args.out, compare=[d / "fused", d / "eager"], reference=d / "eager_fp32")
        if scenario1:
            analyze(args.out / "scenario1" / "report", [args.out / "scenario1" / "gated"], args.out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="experiments/gating_ablation/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["ablation", "continue", "compare_paths", "scenario1", "checks"])
    p.add_argument("--out", required=True, type=Path, help="where the small result files go (e.g. $OUT)")
    p.add_argument("--work", type=Path, default=REPO,
                   help="where data/ and checkpoints/ go (default: the repository root, git-ignored there)")
    p.add_argument("--smoke", action="store_true", help="tiny data and model on the CPU: checks the pipeline")
    p.add_argument("--minutes", type=float, default=None,
                   help="max_train_minutes of each ablation arm in this command (default 8 GPU / 0.15 smoke; "
                        "capped so that the command ends before --deadline)")
    p.add_argument("--steps", type=int, default=None, help="compare_paths: steps per run (default 300 GPU / 10 smoke)")
    p.add_argument("--scenario1-minutes", type=float, default=None, help="scenario1: max_train_minutes (default 4)")
    p.add_argument("--max-steps", type=int, default=None, help="ablation: also stop each arm after this many steps")
    p.add_argument("--deadline", type=float, default=560.0,
                   help="seconds after the start by which every trainer is stopped (default 560: the GPU "
                        "machine allows 600 s per command, and stopping and the analysis take up to ~30 s)")
    p.add_argument("--gpus", default="0,1",
                   help="GPU ids for the two arms (default 0,1; 0,0 shares one GPU; 0+1,2+3 gives each arm two "
                        "GPUs, data-parallel through torchrun with the same global batch)")
    p.add_argument("--workers", type=int, default=None, help="dataset generator processes (default: all cores)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra trainer override for every run of this command (repeatable)")
    p.add_argument("--archive", type=Path, default=None,
                   help="also pack --out into this .tar.gz when the command ends (a transfer that takes "
                        "only a few files or shallow folders, such as the GPU machine's $OUT, gets all of it)")
    p.add_argument("--dry-run", action="store_true", help="print the trainer commands and exit")
    args = p.parse_args(argv)
    args.profile = "smoke" if args.smoke else "gpu"
    args.minutes = DEFAULT_MINUTES[args.profile] if args.minutes is None else args.minutes
    args.steps = DEFAULT_STEPS[args.profile] if args.steps is None else args.steps
    if args.scenario1_minutes is None:
        args.scenario1_minutes = DEFAULT_SCENARIO1_MINUTES[args.profile]
    # One entry per arm; "+" joins the GPUs of a data-parallel arm ("0+1,2+3": two GPUs each).
    args.gpus = [",".join(g.strip() for g in arm.split("+")) for arm in args.gpus.split(",") if arm.strip()]
    if len(args.gpus) != 2:
        p.error(f"--gpus needs one entry per arm, e.g. 0,1 or 0+1,2+3 (got {args.gpus})")
    if args.smoke:
        args.gpus = [None, None]  # device=cpu; CUDA_VISIBLE_DEVICES left as it is
    if args.minutes <= 0 or args.steps <= 0 or args.scenario1_minutes <= 0:
        p.error("--minutes, --steps and --scenario1-minutes must be > 0")
    for s in args.set:
        if "=" not in s:
            p.error(f"--set takes KEY=VALUE, got {s!r}")
    args.out = args.out.resolve()
    if args.archive is not None:
        args.archive = args.archive.resolve()
        if args.archive == args.out or args.out in args.archive.parents:
            p.error("--archive must lie outside --out (it packs --out)")
    args.work = args.work.resolve()
    args.ckpt = args.work / "checkpoints" / "gating_ablation"
    args.deadline_at = T0 + args.deadline
    cores = os.cpu_count() or 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    args.workers = args.workers or cores
    # Two trainers at a time share the cores.
    args.threads = max(1, cores // 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.data = args.work / "data" / "gating_ablation" / DATA_NAME[args.profile]
    try:
        return run_mode(args, argv)
    finally:
        if args.archive is not None and args.out.is_dir():
            pack(args.out, args.archive)


def run_mode(args, argv) -> int:
    if args.dry_run:
        arms = []
        if args.mode in ("ablation", "continue"):
            arms = ablation_arms(args, args.mode == "continue")
            for a in arms:
                a.minutes = args.minutes
        if args.mode in ("compare_paths", "checks"):
            arms += [compare_arm(args, n, g) for n, g in (("fused", args.gpus[0]), ("eager", args.gpus[1]),
                                                          ("eager_fp32", args.gpus[0]))
                     if n in COMPARE_ARMS[args.profile]]
        if args.mode in ("scenario1", "checks"):
            arms.append(scenario1_arm(args, args.gpus[-1] if args.mode == "checks" else args.gpus[0]))
        print(f"python -m hrm.data.sudoku --output-dir {args.data} {shlex.join(DATA_ARGS[args.profile])}")
        for a in arms:
            print(a.shown())
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        gpus = gpu_list()
        needs_two = args.mode in ("ablation", "continue", "compare_paths", "checks")
        if not args.smoke:
            if not gpus:
                raise UsageError("no GPU found (nvidia-smi lists none); for a CPU run of the pipeline add --smoke")
            wanted = {g for arm in args.gpus for g in arm.split(",")}
            if needs_two and len(gpus) < len(wanted):
                raise UsageError(f"mode {args.mode} asks for GPUs {','.join(sorted(wanted))} but only {len(gpus)} "
                                 f"are visible; pass --gpus 0,1 (one each) or 0,0 to share one (then the arms' "
                                 f"timings are not those of a whole GPU each)")
        log(f"run.py {' '.join(sys.argv[1:] if argv is None else argv)} | profile {args.profile} | "
            f"commit {git_commit()} | GPUs: {'; '.join(gpus) or 'none'} | cores {os.cpu_count()}", args.out)
        if args.mode == "continue":
            check_resumable(args)
        # Library versions of the GPU run, found in the background (importing torch takes seconds).
        versions = None
        if not args.smoke:
            versions = subprocess.Popen([sys.executable, "-c", VERSIONS], cwd=REPO, env=child_env(),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            build_dataset(args.profile, args.data, args.out, args.workers)
            if args.mode in ("ablation", "continue"):
                mode_ablation(args, resume=args.mode == "continue")
            else:
                mode_checks(args, compare=args.mode in ("compare_paths", "checks"),
                            scenario1=args.mode in ("scenario1", "checks"))
        finally:
            if versions is not None:
                try:
                    log(f"versions: {versions.communicate(timeout=30)[0].strip()}", args.out)
                except subprocess.TimeoutExpired:
                    versions.kill()
    except UsageError as e:
        log(f"error: {e}", args.out)
        return 2
    except RuntimeError as e:
        log(f"error: {e}", args.out)
        return 1
    log("done", args.out)
    return 0


def pack(folder: Path, archive: Path) -> None:
    """``folder``'s contents as a .tar.gz (written to a temporary name, then renamed)."""
    import tarfile

    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    partial.replace(archive)
    log(f"packed {folder} into {archive} ({archive.stat().st_size / 1e6:.1f} MB)")


def git_commit() -> str:
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, timeout=10)
        return res.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())

"""Data-parallel scaling of the real trainer: ``torchrun --nproc-per-node N train/pretrain.py`` on
1..N GPUs (NCCL) with a fixed per-GPU batch, plus a one-GPU run at each multi-GPU global batch
for the loss comparison.

For every run the trainer's ``metrics.jsonl`` (one record per step, with a wall-clock time) gives
the steady-state step time (steps after ``--warmup`` up to the last). Reported: ms/step,
examples/s, examples/s per GPU and its ratio to one GPU (the scaling efficiency), and the largest
difference of ``train/lm_loss`` between N GPUs and one GPU at the same global batch (data order,
initial weights and the ACT exploration switched off make the two runs the same computation up to
reduction order and bf16 rounding).

    python benchmarks/bench_scaling.py --data data/sudoku-small --gpus 1 2 4 [--steps 40] [--grad-sync flat,ddp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_OPTIONS: dict = {}  # extra subprocess.run arguments for each torchrun (the tests set a timeout and env)


def train(data: str, gpus: int, global_batch: int, steps: int, out: Path, extra: list[str]) -> list[dict]:
    run_dir = out / f"gpus{gpus}_gbs{global_batch}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           str(ROOT / "train" / "pretrain.py"), f"data_path={data}", f"global_batch_size={global_batch}",
           f"max_steps={steps}", f"checkpoint_path={run_dir}", "wandb=false", "progress=false",
           "checkpoint_every_eval=false", "eval_interval=100000", "epochs=100000",
           "arch.halt_exploration_prob=0", "lr_warmup_steps=10", *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **RUN_OPTIONS)
    with open(run_dir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "train/lm_loss" in r]


def step_ms(records: list[dict], warmup: int) -> float:
    timed = [r for r in records if r["step"] > warmup]
    if len(timed) < 2:
        raise SystemExit(f"only {len(timed)} logged steps after the {warmup} warm-up steps: use --steps > --warmup + 1")
    return (timed[-1]["time"] - timed[0]["time"]) / (timed[-1]["step"] - timed[0]["step"]) * 1e3


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="a built dataset directory")
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--per-gpu-batch", type=int, default=768)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    parser.add_argument("--grad-sync", default="flat",
                        help="the trainer's grad_sync modes to compare on the multi-GPU runs, comma-separated "
                             "(flat, ddp or flat,ddp)")
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*", help="extra trainer overrides, e.g. arch=hrm_v1_gated compile=false")
    args = parser.parse_args(argv)
    args.grad_sync = args.grad_sync.split(",")
    if args.gpus[0] != 1:
        parser.error("--gpus must start with 1: the other runs are compared with the one-GPU run")
    if not set(args.grad_sync) <= {"flat", "ddp"}:
        parser.error(f"--grad-sync takes flat, ddp or flat,ddp; got {','.join(args.grad_sync)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="hrm-scaling-"))

    rows, base, singles = [], None, {}
    for n in args.gpus:
        gbs = n * args.per_gpu_batch
        for mode in args.grad_sync if n > 1 else ["-"]:
            extra = [*args.overrides, f"grad_sync={mode}"] if n > 1 else args.overrides
            records = train(args.data, n, gbs, args.steps, out / mode, extra)
            ms = step_ms(records, args.warmup)
            per_gpu = gbs / ms * 1e3 / n
            base = base or per_gpu
            loss_diff = "-"
            if n > 1:
                if gbs not in singles:
                    singles[gbs] = {r["step"]: r["train/lm_loss"]
                                    for r in train(args.data, 1, gbs, args.steps, out / "single", args.overrides)}
                diffs = [abs(r["train/lm_loss"] - singles[gbs][r["step"]]) for r in records if r["step"] in singles[gbs]]
                loss_diff = f"{max(diffs):.2e} (loss {records[-1]['train/lm_loss']:.4f})"
            rows.append((n, mode, gbs, ms, gbs / ms * 1e3, per_gpu, per_gpu / base, loss_diff))

    import torch

    card = f"{torch.cuda.get_device_name()}, NCCL" if torch.cuda.is_available() else "CPU processes, gloo"
    lines = [f"### Data-parallel scaling (up to {max(args.gpus)} x {card}, torch {torch.__version__}, "
             f"per-GPU batch {args.per_gpu_batch}, overrides: {' '.join(args.overrides) or 'none'})", "",
             "| GPUs | grad_sync | global batch | ms/step | examples/s | examples/s per GPU | vs 1 GPU | max lm_loss diff vs 1 GPU at the same global batch |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {n} | {m} | {g} | {ms:.1f} | {eps:.0f} | {pg:.0f} | {eff:.1%} | {d} |"
              for n, m, g, ms, eps, pg, eff, d in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "scaling.md").write_text(table)
    return table


if __name__ == "__main__":
    main()

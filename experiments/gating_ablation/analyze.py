"""Plots and a summary table from trainer runs' ``metrics.jsonl`` files.

    python experiments/gating_ablation/analyze.py --out REPORT RUN [RUN ...]
    python experiments/gating_ablation/analyze.py --out REPORT --compare FUSED EAGER [--reference EAGER_FP32]

A RUN is a directory holding ``metrics.jsonl`` (a trainer checkpoint directory, or a run's
directory under run.py's ``--out``) or the metrics file itself; ``segments.jsonl`` and
``all_config.yaml`` beside it are read when present. Every run given is reported; none is
dropped or picked.

Written to REPORT:

* ``accuracy.png``: held-out exact and token accuracy against trainer minutes and against step;
* ``training.png``: training loss, steps per second, ACT steps (training and held-out);
* ``gates_<run>.png`` for each gated run: gate means, saturated fraction (gates < 0.1 or > 0.9)
  and contribution shares of every (module, gate kind) over trainer minutes; and
  ``gate_evolution_<run>.png``, the trainer's own gate plot (``train.plots``) of that run;
* ``compare_paths.png`` with ``--compare``: the runs' loss curves and their differences;
* ``summary.md`` (tables) and ``summary.json`` (the same numbers, machine-readable).

Minutes are wall-clock minutes of the trainer processes: from each start (``segments.jsonl``,
written by run.py; without it, from the run's first record) to each record, summed over resumed
segments. They include start-up, torch.compile and evaluations, the same for every arm.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from train.logging_utils import read_jsonl  # noqa: E402
from train.plots import parse_gate_key, plot_gate_evolution  # noqa: E402

HOW_TO_PRODUCE = ("produce it with `python experiments/gating_ablation/run.py ablation --out DIR` (runs land in "
                  "DIR/ablation/<arm>/) or with train/pretrain.py, which writes metrics.jsonl into its "
                  "checkpoint_path directory")


class AnalysisError(Exception):
    """Bad input (a missing or empty metrics file, ...); the message says what is wrong and what to do."""


# ------------------------------------------------------------------------------------------------
# Reading runs
# ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One trainer run: its records split into training logs and evaluations, on a time axis."""

    label: str
    path: Path                      # the metrics file
    config: dict | None
    train: list[dict]               # records with train/* metrics, in step order
    evals: list[dict]               # records with eval/* metrics
    num_params: int | None
    segments: list[dict] = field(default_factory=list)
    resume_minutes: list[float] = field(default_factory=list)  # where resumed segments begin

    @property
    def eval_sets(self) -> list[str]:
        """Held-out set names (``eval/<set>/exact_accuracy``), e.g. ["all"] for Sudoku."""
        return sorted({k.split("/")[1] for r in self.evals for k in r if k.endswith("/exact_accuracy")})

    @property
    def gated(self) -> bool:
        if self.config is not None and "use_gating" in self.config.get("arch", {}):
            return bool(self.config["arch"]["use_gating"])
        return any(parse_gate_key(k) for r in self.train for k in r)

    def setting(self, dotted: str, default=None):
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def _metrics_path(path: Path) -> Path:
    if path.is_dir() or path.suffix != ".jsonl":
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise AnalysisError(f"no metrics file at {path}: {HOW_TO_PRODUCE}")
    return path


def _load_yaml(path: Path) -> dict | None:
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Read a run directory (or its metrics.jsonl). Raises AnalysisError for unusable input."""
    mpath = _metrics_path(Path(path))
    records = read_jsonl(mpath)
    if not records:
        raise AnalysisError(f"{mpath} holds no metric records (the run stopped before its first log); {HOW_TO_PRODUCE}")
    train = sorted((r for r in records if any(k.startswith("train/") for k in r)), key=lambda r: (r["step"], r["time"]))
    evals = sorted((r for r in records if any(k.startswith("eval/") for k in r)), key=lambda r: (r["step"], r["time"]))
    if not train:
        raise AnalysisError(f"{mpath} has no train/* records; {HOW_TO_PRODUCE}")
    num_params = next((int(r["num_params"]) for r in records if "num_params" in r), None)
    segments = sorted(read_jsonl(mpath.parent / "segments.jsonl"), key=lambda s: s["start"])
    run = Run(label or mpath.parent.name, mpath, _load_yaml(mpath.parent / "all_config.yaml"), train, evals,
              num_params, segments)
    _add_minutes(run, records)
    return run


def _add_minutes(run: Run, records: list[dict]) -> None:
    """Set ``minutes`` on every record: trainer wall time since the start, over all segments."""
    starts = [s["start"] for s in run.segments]
    first = min(r["time"] for r in records)
    if not starts or starts[0] > first:
        starts = [first] + [s for s in starts if s > first]  # records older than the segment log
    # The end of each segment: its last record before the next segment starts.
    ends = []
    for i, s in enumerate(starts):
        nxt = starts[i + 1] if i + 1 < len(starts) else math.inf
        inside = [r["time"] for r in records if s <= r["time"] < nxt]
        ends.append(max(inside) if inside else s)
    offsets = [sum(e - s for s, e in zip(starts[:i], ends[:i])) for i in range(len(starts))]
    run.resume_minutes = [o / 60.0 for o in offsets[1:]]
    for r in records:
        i = max(j for j, s in enumerate(starts) if s <= r["time"]) if r["time"] >= starts[0] else 0
        r["minutes"] = (offsets[i] + r["time"] - starts[i]) / 60.0
        r["segment"] = i


def labelled(runs: list[Run]) -> list[Run]:
    """Make labels unique: a repeated directory name gets its parent's name in front."""
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            r.label = f"{r.path.parent.parent.name}/{r.path.parent.name}"
    return runs


# ------------------------------------------------------------------------------------------------
# Numbers
# ------------------------------------------------------------------------------------------------
def step_rates(run: Run) -> list[tuple[float, float, int]]:
    """(minutes, steps per second, step) between consecutive training logs of the same segment:
    the time before a segment's first log (start-up, the first compilation) is in no interval;
    intervals with an evaluation in them are kept (evaluations are part of the run's time)."""
    out = []
    for a, b in zip(run.train, run.train[1:]):
        if a["segment"] != b["segment"] or b["time"] <= a["time"] or b["step"] <= a["step"]:
            continue
        out.append((b["minutes"], (b["step"] - a["step"]) / (b["time"] - a["time"]), b["step"]))
    return out


def _halted(rec: dict) -> bool:
    """Training accuracy and ACT steps are over the sequences that halted in that step; a log
    where none did (train/count 0) carries zeros that mean nothing."""
    return rec.get("train/count", 1) > 0


def summarize_run(run: Run) -> dict:
    """The per-run numbers of summary.json / summary.md."""
    last = run.train[-1]
    rates = [r for _, r, _ in step_rates(run)]
    total_min = max(r["minutes"] for r in run.train + run.evals)
    last_step = max(r["step"] for r in run.train + run.evals)
    halted = [r for r in run.train if _halted(r)]
    out = {
        "label": run.label,
        "path": str(run.path.parent),
        "gating": run.gated,
        "arch": {k: run.setting(f"arch.{k}") for k in ("hidden_size", "H_layers", "L_layers", "H_cycles",
                                                        "L_cycles", "halt_max_steps", "kernels", "forward_dtype")},
        "global_batch_size": run.setting("global_batch_size"),
        "num_params": run.num_params,
        "segments": max(len(run.segments), 1),
        "last_step": last_step,
        "minutes": total_min,
        "steps_per_s_median": statistics.median(rates) if rates else None,
        "steps_per_s_overall": last_step / (60.0 * total_min) if total_min > 0 else None,
        "last_train_lm_loss": last.get("train/lm_loss"),
        "last_train_accuracy": halted[-1].get("train/accuracy") if halted else None,
        # ACT steps vary in training only (an evaluation always runs halt_max_steps segments).
        "train_act_steps_last10": (statistics.fmean(r["train/steps"] for r in halted[-10:])
                                   if halted and "train/steps" in halted[-1] else None),
        "evaluations": len(run.evals),
        "eval": {},
        "gates": gate_table(run) if run.gated else {},
    }
    for s in run.eval_sets:
        ev = [r for r in run.evals if f"eval/{s}/exact_accuracy" in r]
        fin = ev[-1]
        best_ex = max(ev, key=lambda r: r[f"eval/{s}/exact_accuracy"])
        best_tok = max(ev, key=lambda r: r[f"eval/{s}/accuracy"])
        out["eval"][s] = {
            "final_step": fin["step"], "final_minutes": fin["minutes"],
            "final_exact_accuracy": fin[f"eval/{s}/exact_accuracy"],
            "best_exact_accuracy": best_ex[f"eval/{s}/exact_accuracy"], "best_exact_accuracy_step": best_ex["step"],
            "final_accuracy": fin[f"eval/{s}/accuracy"],
            "best_accuracy": best_tok[f"eval/{s}/accuracy"], "best_accuracy_step": best_tok["step"],
            "final_act_steps": fin.get(f"eval/{s}/steps"),
            "final_lm_loss": fin.get(f"eval/{s}/lm_loss"),
        }
    return out


GATE_STATS = ("mean", "saturated", "share")


def gate_values(rec: dict, prefix: str) -> dict[str, dict[str, float]]:
    """{"<module>/<kind>": {"mean", "saturated" (frac_low + frac_high), "share"}} from one record,
    for keys under ``prefix`` ("train" or "eval/<set>")."""
    raw: dict[str, dict[str, float]] = {}
    for key, value in rec.items():
        parsed = parse_gate_key(key)
        if parsed is None or parsed[0] != prefix or not isinstance(value, (int, float)):
            continue
        _, module, kind, stat = parsed
        raw.setdefault(f"{module}/{kind}", {})[stat] = float(value)
    out = {}
    for name, st in sorted(raw.items()):
        out[name] = {"mean": st.get("mean"), "share": st.get("share"),
                     "saturated": (st["frac_low"] + st["frac_high"]) if "frac_low" in st and "frac_high" in st else None}
    return out


def gate_table(run: Run) -> dict:
    """Gate statistics at the last training log and at the last evaluation (first held-out set)."""
    out = {"train_step": run.train[-1]["step"], "train": gate_values(run.train[-1], "train")}
    sets = run.eval_sets
    ev = [r for r in run.evals if sets and any(k.startswith(f"eval/{sets[0]}/gate/") for k in r)]
    if ev:
        out["eval_step"] = ev[-1]["step"]
        out["eval"] = gate_values(ev[-1], f"eval/{sets[0]}")
    return out


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def curve_difference(a: Run, b: Run, window: int, key: str = "train/lm_loss") -> dict:
    """How far apart two runs' loss curves are, over the steps both logged."""
    va = {r["step"]: r[key] for r in a.train if key in r}
    vb = {r["step"]: r[key] for r in b.train if key in r}
    steps = sorted(set(va) & set(vb))
    if not steps:
        raise AnalysisError(f"{a.label} and {b.label} logged {key} at no common step; compare runs made with the "
                            f"same log_interval (run.py compare_paths)")
    diff = [va[s] - vb[s] for s in steps]
    sa, sb = moving_average([va[s] for s in steps], window), moving_average([vb[s] for s in steps], window)
    sdiff = [x - y for x, y in zip(sa, sb)]
    i_raw = max(range(len(diff)), key=lambda i: abs(diff[i]))
    i_s = max(range(len(sdiff)), key=lambda i: abs(sdiff[i]))
    return {"a": a.label, "b": b.label, "key": key, "steps": len(steps), "first_step": steps[0],
            "last_step": steps[-1], "first_diff": diff[0], "max_abs_diff": abs(diff[i_raw]),
            "max_abs_diff_step": steps[i_raw], "mean_abs_diff": sum(map(abs, diff)) / len(diff),
            "smooth_window": window, "max_abs_smoothed_diff": abs(sdiff[i_s]), "max_abs_smoothed_diff_step": steps[i_s],
            "final_a": va[steps[-1]], "final_b": vb[steps[-1]],
            "_series": (steps, diff, sdiff)}


def step_noise(run: Run, window: int, key: str = "train/lm_loss") -> float:
    """Standard deviation of a loss curve around its centred moving average: how much the loss
    moves from step to step with the batch (the noise a difference between curves is set against)."""
    vals = [r[key] for r in run.train if key in r]
    half = window // 2
    resid = []
    for i in range(half, len(vals) - half):
        seg = vals[i - half:i + half + 1]
        resid.append(vals[i] - sum(seg) / len(seg))
    return statistics.pstdev(resid) if len(resid) > 1 else float("nan")


def compare_summary(fused: Run, eager: Run, reference: Run | None, window: int) -> dict:
    """fused vs eager, with the scale they are judged by: eager bf16 vs eager float32 (the effect
    of bf16 rounding alone) when a reference run is given, and the loss's step-to-step noise."""
    out = {"fused_vs_eager": curve_difference(fused, eager, window),
           "step_noise": {r.label: step_noise(r, window) for r in (fused, eager)}}
    fe = out["fused_vs_eager"]["max_abs_smoothed_diff"]
    if reference is not None:
        out["eager_vs_reference"] = curve_difference(eager, reference, window)
        scale, scale_name = out["eager_vs_reference"]["max_abs_smoothed_diff"], "bf16 vs float32 (eager)"
    else:
        scale, scale_name = out["step_noise"][eager.label], "step-to-step noise of the eager loss"
    if fe == 0:
        ratio = 0.0
    elif scale and scale > 0 and not math.isnan(scale):
        ratio = fe / scale
    else:
        ratio = float("inf")  # no noise scale to judge a difference by
    if fe == 0:
        verdict = "identical loss curves"
    elif ratio <= 1.0:
        verdict = "agree within bf16 noise"
    elif ratio <= 2.0:
        verdict = "differ by about as much as bf16 noise (within a factor of 2)"
    else:
        verdict = "differ by more than bf16 noise: investigate"
    out.update(scale=scale, scale_name=scale_name, ratio=ratio, verdict=verdict)
    return out


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path


def _mark_resumes(ax, runs: list[Run]) -> None:
    """Dotted vertical lines where a run was resumed (the gap before is the new process's start-up)."""
    for i, run in enumerate(runs):
        for m in run.resume_minutes:
            ax.axvline(m, color=f"C{i}", ls=":", lw=0.8)


def plot_accuracy(runs: list[Run], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for run in runs:
        for s in run.eval_sets:
            ev = [r for r in run.evals if f"eval/{s}/exact_accuracy" in r]
            name = run.label if len(run.eval_sets) == 1 else f"{run.label} ({s})"
            for row, metric in enumerate(("exact_accuracy", "accuracy")):
                ys = [100 * r[f"eval/{s}/{metric}"] for r in ev]
                axes[row][0].plot([r["minutes"] for r in ev], ys, "o-", ms=3, label=name)
                axes[row][1].plot([r["step"] for r in ev], ys, "o-", ms=3, label=name)
    for row, what in enumerate(("held-out exact accuracy (%)", "held-out token accuracy (%)")):
        for col, xlabel in enumerate(("trainer minutes", "step")):
            ax = axes[row][col]
            if col == 0:
                _mark_resumes(ax, runs)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("held-out accuracy at each evaluation" +
                 (" (dotted: a resumed segment starts)" if any(r.resume_minutes for r in runs) else ""))
    return _save(fig, path)


def plot_training(runs: list[Run], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for i, run in enumerate(runs):
        color = f"C{i}"
        steps = [r["step"] for r in run.train if "train/lm_loss" in r]
        axes[0][0].plot(steps, [r["train/lm_loss"] for r in run.train if "train/lm_loss" in r], color=color,
                        lw=0.8, label=run.label)
        rates = step_rates(run)
        if rates:
            axes[0][1].plot([m for m, _, _ in rates], [v for _, v, _ in rates], color=color, lw=0.8,
                            label=f"{run.label} (median {statistics.median(v for _, v, _ in rates):.2f})")
        halted = [r for r in run.train if _halted(r) and "train/steps" in r]
        axes[1][0].plot([r["step"] for r in halted], [r["train/steps"] for r in halted], color=color, lw=0.6,
                        alpha=0.6, label=f"{run.label} train")
        for s in run.eval_sets:
            ev = [r for r in run.evals if f"eval/{s}/steps" in r]
            axes[1][0].plot([r["step"] for r in ev], [r[f"eval/{s}/steps"] for r in ev], "o-", color=color, ms=4,
                            label=f"{run.label} held-out ({s})")
            ev = [r for r in run.evals if f"eval/{s}/lm_loss" in r]
            axes[1][1].plot([r["step"] for r in ev], [r[f"eval/{s}/lm_loss"] for r in ev], "o-", color=color, ms=4,
                            label=f"{run.label} ({s})")
    _mark_resumes(axes[0][1], runs)
    titles = (("training lm_loss", "step", "lm_loss"), ("training speed", "trainer minutes", "steps / s"),
              ("ACT steps used (mean over halted sequences)", "step", "ACT steps"),
              ("held-out lm_loss", "step", "lm_loss"))
    for ax, (title, xl, yl) in zip([a for row in axes for a in row], titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_gates(run: Run, path: Path) -> Path | None:
    """Gate means, saturated fraction and contribution shares of every (module, kind) over time."""
    series = [(r["minutes"], gate_values(r, "train")) for r in run.train]
    series = [(m, g) for m, g in series if g]
    if not series:
        return None
    plt = _plt()
    names = sorted(series[-1][1])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for stat, ax, title in zip(GATE_STATS, axes, ("gate mean", "saturated fraction (< 0.1 or > 0.9)",
                                                   "contribution share within the module")):
        for name in names:
            pts = [(m, g[name][stat]) for m, g in series if name in g and g[name][stat] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if name.startswith("L") else "--", lw=1,
                    label=name.replace("/", " "))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("trainer minutes")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if stat == "mean":
            ax.axhspan(0.1, 0.9, color="0.93", zorder=0)
        ax.legend(fontsize=7)
    fig.suptitle(f"{run.label}: gate statistics during training (training batches)", fontsize=10)
    return _save(fig, path)


def plot_compare(comp: dict, runs: list[Run], path: Path) -> Path:
    plt = _plt()
    fig, (ax_l, ax_d) = plt.subplots(1, 2, figsize=(14, 4.5))
    window = comp["fused_vs_eager"]["smooth_window"]
    for i, run in enumerate(runs):
        pts = [(r["step"], r["train/lm_loss"]) for r in run.train if "train/lm_loss" in r]
        ax_l.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", lw=0.5, alpha=0.4)
        ax_l.plot([p[0] for p in pts], moving_average([p[1] for p in pts], window), color=f"C{i}", lw=1.5,
                  label=f"{run.label} ({run.setting('arch.kernels', '?')}, {run.setting('arch.forward_dtype', '?')})")
    ax_l.set_title(f"training lm_loss (thin: every step; thick: mean of {window})", fontsize=10)
    ax_l.set_xlabel("step")
    ax_l.legend(fontsize=8)
    ax_l.grid(alpha=0.3)
    for i, key in enumerate(("fused_vs_eager", "eager_vs_reference")):
        if key not in comp:
            continue
        c = comp[key]
        steps, diff, sdiff = c["_series"]
        ax_d.plot(steps, diff, color=f"C{i}", lw=0.5, alpha=0.4)
        ax_d.plot(steps, sdiff, color=f"C{i}", lw=1.5,
                  label=f"{c['a']} - {c['b']}: max |d| {c['max_abs_diff']:.4f}, smoothed {c['max_abs_smoothed_diff']:.4f}")
    ax_d.axhline(0, color="0.5", lw=0.5)
    ax_d.set_title(f"loss difference ({comp['verdict']})", fontsize=10)
    ax_d.set_xlabel("step")
    ax_d.legend(fontsize=8)
    ax_d.grid(alpha=0.3)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------
def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def num(v, fmt: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def markdown(summary: dict) -> str:
    lines = ["# Results", ""]
    runs = summary["runs"]
    if runs:
        lines += ["Every run given to analyze.py, in the order given. Minutes: trainer wall time (start-up, "
                  "compilation and evaluations included). Accuracies are on the held-out set at an evaluation; "
                  "'best' is the highest over all evaluations of the run (the step in brackets), 'final' the last. "
                  "ACT steps: mean segments used by the training sequences that halted (an evaluation always "
                  "runs halt_max_steps segments, as in the reference HRM).",
                  "",
                  "| run | gating | params | batch | steps | minutes | steps/s (median) | steps/s (overall) | evals "
                  "| set | final exact acc | best exact acc (step) | final token acc | best token acc (step) "
                  "| ACT steps (train, last 10 logs) | last train loss |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in runs:
            sets = r["eval"] or {"-": None}
            params = "-" if r["num_params"] is None else f"{r['num_params'] / 1e6:.2f}M"
            batch = r["global_batch_size"] if isinstance(r["global_batch_size"], int) else "-"
            for s, e in sets.items():
                e = e or {}
                lines.append(
                    f"| {r['label']} | {'yes' if r['gating'] else 'no'} | {params} | {batch} | "
                    f"{r['last_step']} | {r['minutes']:.2f} | {num(r['steps_per_s_median'], '.2f')} | "
                    f"{num(r['steps_per_s_overall'], '.2f')} | {r['evaluations']} | {s} | "
                    f"{pct(e.get('final_exact_accuracy'))} | {pct(e.get('best_exact_accuracy'))} "
                    f"({e.get('best_exact_accuracy_step', '-')}) | {pct(e.get('final_accuracy'))} | "
                    f"{pct(e.get('best_accuracy'))} ({e.get('best_accuracy_step', '-')}) | "
                    f"{num(r['train_act_steps_last10'], '.2f')} | {num(r['last_train_lm_loss'], '.4f')} |")
        lines.append("")
        for r in runs:
            g = r["gates"]
            if not g:
                continue
            lines += [f"## Gates of {r['label']}", "",
                      f"Training batch at step {g['train_step']}" + (f"; held-out evaluation at step {g['eval_step']}"
                                                                    if "eval" in g else "") +
                      ". Saturated: fraction of gate values below 0.1 or above 0.9. Share: the source's part of "
                      "the module's summed gated contributions.", "",
                      "| gate | mean (train) | saturated (train) | share (train) | mean (eval) | saturated (eval) "
                      "| share (eval) |", "|---|---:|---:|---:|---:|---:|---:|"]
            for name, t in g["train"].items():
                e = g.get("eval", {}).get(name, {})
                lines.append(f"| {name} | {num(t['mean'])} | {pct(t['saturated'])} | {num(t['share'])} | "
                             f"{num(e.get('mean'))} | {pct(e.get('saturated'))} | {num(e.get('share'))} |")
            lines.append("")
    comp = summary.get("compare")
    if comp:
        lines += ["## Fused vs eager", "",
                  f"Verdict: **{comp['verdict']}** (largest smoothed difference fused - eager / {comp['scale_name']} "
                  f"= {num(comp['ratio'], '.2f')}).", "",
                  "| curves | steps | difference at the first step | max abs diff (step) | mean abs diff "
                  "| max abs diff of the moving means (step) | final loss a / b |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for key in ("fused_vs_eager", "eager_vs_reference"):
            if key in comp:
                c = comp[key]
                lines.append(f"| {c['a']} - {c['b']} | {c['steps']} | {c['first_diff']:+.5f} | "
                             f"{c['max_abs_diff']:.5f} ({c['max_abs_diff_step']}) | {c['mean_abs_diff']:.5f} | "
                             f"{c['max_abs_smoothed_diff']:.5f} ({c['max_abs_smoothed_diff_step']}) | "
                             f"{c['final_a']:.4f} / {c['final_b']:.4f} |")
        lines += ["", "Step-to-step noise of each loss curve (std around its moving mean): " +
                  ", ".join(f"{k} {num(v, '.5f')}" for k, v in comp["step_noise"].items()) + ".", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def analyze(out: Path, run_paths: list[Path], compare: list[Path] | None = None, reference: Path | None = None,
            window: int = 20) -> dict:
    """Write the report for ``run_paths`` (and the comparison) to ``out``; return the summary."""
    if not run_paths and not compare:
        raise AnalysisError("nothing to analyse: give run directories and/or --compare FUSED EAGER")
    runs = labelled([load_run(p) for p in run_paths])
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"runs": [summarize_run(r) for r in runs], "files": []}
    if runs:
        summary["files"] += [plot_accuracy(runs, out / "accuracy.png").name,
                             plot_training(runs, out / "training.png").name]
        for r in runs:
            if not r.gated:
                continue
            safe = r.label.replace("/", "_")
            p = plot_gates(r, out / f"gates_{safe}.png")
            if p is not None:
                summary["files"].append(p.name)
            last_eval = r.evals[-1] if r.evals else {}
            p = plot_gate_evolution(r.train + r.evals, last_eval, out / f"gate_evolution_{safe}.png",
                                    title=f"{r.label} step {r.train[-1]['step']}")
            if p is not None:
                summary["files"].append(p.name)
    if compare:
        cruns = labelled([load_run(p) for p in compare] + ([load_run(reference)] if reference else []))
        comp = compare_summary(cruns[0], cruns[1], cruns[2] if reference else None, window)
        summary["files"].append(plot_compare(comp, cruns, out / "compare_paths.png").name)
        summary["compare_runs"] = [summarize_run(r) for r in cruns]
        for key in ("fused_vs_eager", "eager_vs_reference"):
            if key in comp:
                comp[key].pop("_series")
        summary["compare"] = comp
    (out / "summary.md").write_text(markdown(summary))
    summary["files"].append("summary.md")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="experiments/gating_ablation/analyze.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", required=True, type=Path, help="report directory")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("FUSED", "EAGER"),
                   help="two runs of the same seed and settings whose loss curves must agree")
    p.add_argument("--reference", type=Path, help="with --compare: a third run (eager float32) giving the bf16 noise scale")
    p.add_argument("--smooth", type=int, default=20, help="moving-mean window (steps) for --compare (default 20)")
    a = p.parse_args(argv)
    if a.reference is not None and a.compare is None:
        p.error("--reference needs --compare")
    if a.smooth < 1:
        p.error("--smooth must be >= 1")
    try:
        summary = analyze(a.out, a.runs, a.compare, a.reference, a.smooth)
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((a.out / "summary.md").read_text())
    print(f"wrote {', '.join(summary['files'])} to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

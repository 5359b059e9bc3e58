"""Gate-evolution plot: how each gate of each reasoning module moves during training.

Reads the gate metrics the loss head reports (``gate/<module>/<kind>_<stat>``, e.g.
``gate/L/own_mean``, ``gate/H/other_sat_low``), as logged under ``train/`` and ``eval/...``
prefixes. Left: the mean of every (module, gate kind) over training steps. Right: bars of the
latest evaluation's statistics per (module, gate kind).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

_GATE_KEY = re.compile(r"^(?:(?P<prefix>.+)/)?gate/(?P<module>[^/]+)/(?P<kind>[^/_]+)_(?P<stat>.+)$")


def parse_gate_key(key: str):
    """``train/gate/L/own_mean`` -> ("train", "L", "own", "mean"); None for other keys."""
    m = _GATE_KEY.match(key)
    if m is None:
        return None
    return m.group("prefix") or "", m.group("module"), m.group("kind"), m.group("stat")


def gate_history(records: list[dict], prefix: str = "train") -> dict[tuple[str, str], tuple[list, list]]:
    """{(module, kind): (steps, means)} from logged metric records."""
    out: dict = defaultdict(lambda: ([], []))
    for rec in records:
        step = rec.get("step")
        for key, value in rec.items():
            parsed = parse_gate_key(key)
            if parsed is None or not isinstance(value, (int, float)):
                continue
            p, module, kind, stat = parsed
            if p == prefix and stat == "mean":
                out[(module, kind)][0].append(step)
                out[(module, kind)][1].append(value)
    return dict(out)


def latest_eval_gate_stats(metrics: dict) -> dict[tuple[str, str], dict[str, float]]:
    """{(module, kind): {stat: value}} from one evaluation's flat metrics (any prefix)."""
    out: dict = defaultdict(dict)
    for key, value in metrics.items():
        parsed = parse_gate_key(key)
        if parsed is None or not isinstance(value, (int, float)):
            continue
        _, module, kind, stat = parsed
        out[(module, kind)][stat] = float(value)
    return dict(out)


def plot_gate_evolution(records: list[dict], eval_metrics: dict, path: str | os.PathLike,
                        title: str = "") -> Path | None:
    """Write the PNG at ``path``; returns it, or None when there are no gate metrics to plot."""
    history = gate_history(records, "train")
    latest = latest_eval_gate_stats(eval_metrics)
    if not history and not latest:
        return None

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax_hist, ax_bar) = plt.subplots(1, 2, figsize=(13, 4.5))
    styles = {"L": "-", "H": "--"}
    for (module, kind), (steps, means) in sorted(history.items()):
        ax_hist.plot(steps, means, styles.get(module, ":"), label=f"{module} {kind}")
    ax_hist.set_xlabel("step")
    ax_hist.set_ylabel("mean gate value")
    ax_hist.set_ylim(0, 1)
    ax_hist.axhspan(0.1, 0.9, color="0.92", zorder=0)
    ax_hist.set_title("gate means during training (shaded: 0.1-0.9)")
    if history:
        ax_hist.legend(fontsize=8, ncol=2)

    if latest:
        names = sorted(latest)
        # Values in [0, 1] only (contribution and saturation are unbounded).
        stats = [s for s in ("mean", "frac_low", "frac_high", "share") if any(s in v for v in latest.values())]
        width = 0.8 / max(len(stats), 1)
        for i, stat in enumerate(stats):
            xs = [j + i * width for j in range(len(names))]
            ax_bar.bar(xs, [latest[n].get(stat, 0.0) for n in names], width=width, label=stat)
        ax_bar.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
        ax_bar.set_xticklabels([f"{m} {k}" for m, k in names], rotation=30, fontsize=8)
        ax_bar.set_ylim(0, 1)
        ax_bar.legend(fontsize=8)
    ax_bar.set_title("latest evaluation: gate statistics")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path

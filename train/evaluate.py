"""Evaluate a checkpoint on its dataset's test split: ``python train/evaluate.py checkpoint=<file>``.

    python train/evaluate.py checkpoint=checkpoints/<project>/<run>/step_1000.pt
    python train/evaluate.py checkpoint=checkpoints/<project>/<run>            # its latest checkpoint
    python train/evaluate.py checkpoint=<file> data_path=data/other save_outputs=true

Settings (key=value): ``checkpoint`` (required: a file, or a run directory for its latest),
``config`` (the training config yaml; default ``all_config.yaml`` beside the checkpoint),
``data_path``, ``global_batch_size``, ``device`` (auto|cpu|cuda), ``compile`` (auto|true|false),
``arch.kernels``, ``save_outputs`` (false; true writes ``eval_step<N>_outputs.pt`` beside the
checkpoint: inputs, labels, preds, q_halt_logits, puzzle_identifiers, example_index),
``arc_voting`` (auto: for ARC datasets also report pass@1/2/10 by voting over augmented copies),
``wandb`` (false; true logs the metrics to the run's W&B project).

Works with this trainer's full-state checkpoints and with weight-only state dicts (the reference
HRM's ``step_<N>`` files, given their ``all_config.yaml`` or ``config=<yaml>``). Metrics are printed
and appended to ``eval_metrics.jsonl`` beside the checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from train import checkpointing, distributed  # noqa: E402
from train.config_utils import ConfigError, compose, exit_with, to_container  # noqa: E402

EVAL_KEYS = {"checkpoint": None, "config": None, "save_outputs": False, "arc_voting": "auto", "wandb": False}


def parse_args(argv: Sequence[str]) -> tuple[dict, list[str]]:
    """Split ``key=value`` arguments into evaluate's own settings and training-config overrides."""
    own, overrides = dict(EVAL_KEYS), []
    for arg in argv:
        if arg in ("-h", "--help"):
            own["help"] = True
            continue
        if "=" not in arg:
            raise ConfigError(f"expected key=value, got {arg!r} (e.g. checkpoint=checkpoints/<project>/<run>/step_100.pt)")
        key, value = arg.split("=", 1)
        if key in EVAL_KEYS:
            parsed = OmegaConf.from_dotlist([f"v={value}"])["v"]
            own[key] = parsed
        else:
            overrides.append(arg)
    return own, overrides


def find_checkpoint(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        latest = checkpointing.latest_checkpoint(p)
        if latest is None:
            raise ConfigError(f"no checkpoint (step_<N>.pt or step_<N>) in directory {p}")
        return latest
    if not p.is_file():
        raise ConfigError(f"checkpoint {p} does not exist")
    return p


def load_training_config(ckpt: Path, config_path: str | None, overrides: Sequence[str]) -> dict:
    """The run's training config (saved beside the checkpoint, or inside it), with overrides."""
    saved = None
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise ConfigError(f"config {config_path} does not exist")
        saved = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    elif (ckpt.parent / "all_config.yaml").is_file():
        saved = OmegaConf.to_container(OmegaConf.load(ckpt.parent / "all_config.yaml"), resolve=True)
    else:
        obj = checkpointing.load_file(ckpt)
        if checkpointing.is_training_state(obj):
            saved = obj.get("config")
    if saved is None:
        raise ConfigError(f"no training config for {ckpt}: put its all_config.yaml beside it or pass config=<yaml>")
    base = to_container(compose([]))
    # The reference's arch names classes by import path; ours are fixed.
    arch = dict(saved.get("arch", {}))
    arch.pop("name", None)
    if isinstance(arch.get("loss"), dict):
        arch["loss"] = {k: v for k, v in arch["loss"].items() if k == "loss_type"}
    merged = OmegaConf.merge(OmegaConf.create(base),
                             OmegaConf.create({**{k: v for k, v in saved.items() if k in base}, "arch": arch}))
    OmegaConf.set_struct(merged, True)
    for ov in overrides:
        key, value = ov.split("=", 1)
        key = key.lstrip("+")
        if OmegaConf.select(merged, key, default="__missing__") == "__missing__":
            raise ConfigError(f"unknown setting '{key}' (evaluate takes {', '.join(EVAL_KEYS)} and training-config "
                              "fields such as data_path, global_batch_size, device, compile, arch.kernels)")
        OmegaConf.update(merged, key, OmegaConf.from_dotlist([f"v={value}"])["v"], merge=False)
    return to_container(merged)


def arc_pass_at_k(cfg: dict, outputs: dict, ks=(1, 2, 10)) -> dict:
    from hrm.data.puzzle_dataset import _load_set, load_metadata
    from train.evaluation.arc_voting import collect_votes, pass_at_k

    meta = load_metadata(cfg["data_path"], "test")
    with open(os.path.join(cfg["data_path"], "identifiers.json")) as f:
        identifier_names = json.load(f)
    results = {}
    for set_id, set_name in enumerate(meta.sets):
        rows = (outputs["set_index"] == set_id).numpy()
        if not rows.any():
            continue
        d = _load_set(cfg["data_path"], "test", set_name, mmap=True)
        ex = outputs["example_index"].numpy()[rows]
        puzzle = np.searchsorted(d["puzzle_indices"], ex, side="right") - 1
        position = ex - d["puzzle_indices"][puzzle]
        names = [identifier_names[int(i)] for i in d["puzzle_identifiers"]]
        votes = collect_votes(outputs["preds"].numpy()[rows], outputs["labels"].numpy()[rows],
                              outputs["q_halt_logits"].float().numpy()[rows], puzzle, position, names)
        for k, v in pass_at_k(votes, ks).items():
            results[f"{set_name}/{k}"] = v
    return results


def is_arc_dataset(data_path: str) -> bool:
    """Built by ``hrm.data.arc`` (its ``build_info.json``), or else (a dataset from elsewhere, e.g. the
    reference's builder) 30 x 30 grids of vocabulary 12 with augmentation names (``_t<k>``)."""
    from hrm.data.common import read_build_info

    info = read_build_info(data_path)
    if info is not None and info.get("builder") == "hrm.data.arc":
        return True
    try:
        with open(os.path.join(data_path, "identifiers.json")) as f:
            names = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    meta_ok = False
    try:
        from hrm.data.puzzle_dataset import load_metadata

        meta = load_metadata(data_path, "test")
        meta_ok = meta.seq_len == 900 and meta.vocab_size == 12
    except Exception:
        pass
    return meta_ok and any(re.search(r"_t\d", str(n)) for n in names[1:50])


def run(argv: Sequence[str]) -> dict:
    from hrm import load_checkpoint
    from hrm.data.puzzle_dataset import DatasetError, PuzzleDataset, PuzzleDatasetConfig
    from train.pretrain import TrainState, arch_config, build_model, evaluate, resolve_compile

    own, overrides = parse_args(argv)
    if own.get("help"):
        print(__doc__)
        return {}
    if not own["checkpoint"]:
        raise ConfigError("checkpoint=<file or run directory> is required")
    ckpt = find_checkpoint(str(own["checkpoint"]))
    cfg = load_training_config(ckpt, own["config"], overrides)
    info = distributed.setup(str(cfg.get("device", "auto")))
    try:
        try:
            ds = PuzzleDataset(PuzzleDatasetConfig(seed=cfg["seed"], dataset_path=cfg["data_path"],
                                                   global_batch_size=cfg["global_batch_size"], test_set_mode=True,
                                                   rank=info.rank, num_replicas=info.world_size), split="test")
        except DatasetError as e:
            raise ConfigError(str(e)) from None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        hconf = arch_config(cfg, ds.metadata, info.world_size, info.device)
        head = build_model(hconf, info.device, cfg["seed"])
        try:
            load_checkpoint(head, str(ckpt))
        except (RuntimeError, ValueError, TypeError) as e:
            raise ConfigError(f"{ckpt}: {e}") from None
        step = _step_of(ckpt)
        forward = torch.compile(head, dynamic=False) if resolve_compile(
            cfg["compile"], info.device, str(cfg["arch"].get("kernels", "auto"))) else head
        state = TrainState(head=head, forward=forward, optimizers=[], base_lrs=[], carry=None, step=step, total_steps=0)

        voting = own["arc_voting"]
        voting = is_arc_dataset(cfg["data_path"]) if voting == "auto" else bool(voting)
        keys = ["inputs", "labels", "puzzle_identifiers", "preds", "q_halt_logits"] if (voting or own["save_outputs"]) else []
        if info.is_main:
            print(f"Evaluating {ckpt} (step {step}) on {cfg['data_path']} test split, device {info.device}", flush=True)
        metrics, outputs = evaluate(cfg, state, ds, info, return_keys=keys, progress=bool(cfg.get("progress", True)))
        if info.world_size > 1 and keys:
            gathered = distributed.all_gather_objects(outputs, info)
            outputs = {k: torch.cat([g[k] for g in gathered]) for k in outputs}
        if not info.is_main:
            return {}
        if voting:
            metrics.update(arc_pass_at_k(cfg, outputs))
        if own["save_outputs"]:
            out_path = ckpt.parent / f"eval_step{step}_outputs.pt"
            checkpointing.atomic_torch_save(outputs, out_path)
            print(f"Saved predictions to {out_path}")
        for k, v in sorted(metrics.items()):
            print(f"  {k}: {v:.4f}")
        with open(ckpt.parent / "eval_metrics.jsonl", "a") as f:
            f.write(json.dumps({"checkpoint": str(ckpt), "step": step, "data_path": cfg["data_path"],
                                **{k: float(v) for k, v in metrics.items()}}) + "\n")
        if own["wandb"]:
            from train.logging_utils import MetricsLogger

            logger = MetricsLogger(ckpt.parent, cfg.get("project_name") or "HRM eval",
                                   f"{cfg.get('run_name') or ckpt.parent.name} eval", cfg, use_wandb=True)
            logger.jsonl_path = ckpt.parent / "eval_metrics_wandb.jsonl"
            logger.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
            logger.finish()
        return metrics
    finally:
        distributed.teardown(info)


def _step_of(path: Path) -> int:
    m = re.match(r"^step_(\d+)", path.name)
    return int(m.group(1)) if m else 0


def cli(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(argv)
    except ConfigError as e:
        exit_with(str(e), 2)


if __name__ == "__main__":
    cli()

"""Metrics go to W&B (when it can) and always to ``metrics.jsonl`` beside the checkpoints.

W&B never blocks or crashes training:

* ``wandb=false`` turns it off;
* without an API key (no ``WANDB_API_KEY``, no ``~/.netrc`` entry) and no ``WANDB_MODE`` set, the
  run is written offline (``wandb/offline-run-*``; upload later with ``wandb sync``);
* if ``wandb.init`` fails anyway (no network, bad key, a broken install) the logger says so once
  and carries on with the JSONL file only.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        rc = netrc.netrc(os.path.expanduser(os.environ.get("NETRC", "~/.netrc")))
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return rc.authenticators(host) is not None
    except Exception:
        return False


def _to_python(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except Exception:
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """``log(metrics, step)`` to W&B and ``<run_dir>/metrics.jsonl``. Make one on rank 0 only."""

    def __init__(self, run_dir: str | os.PathLike, project: str, name: str, config: dict,
                 use_wandb: bool = True, resume_id: str | None = None, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            self._drop_records_after(resume_step)
        self.wandb_run = None
        self.wandb_mode = "disabled"
        if use_wandb:
            self._init_wandb(project, name, config, resume_id)

    def _drop_records_after(self, step: int) -> None:
        """A resumed run replays the steps after its checkpoint: their records from before the
        interruption (and a line cut short by it) leave metrics.jsonl, so each step appears once.
        ``step`` -1: a new run, in a directory an earlier run left without a checkpoint."""
        from train.checkpointing import atomic_write_bytes

        if not self.jsonl_path.is_file():
            return
        written = sum(1 for line in self.jsonl_path.read_text().splitlines() if line.strip())
        kept = [json.dumps(r) for r in read_jsonl(self.jsonl_path) if r.get("step", 0) <= step]
        if len(kept) != written:
            atomic_write_bytes(self.jsonl_path, "".join(line + "\n" for line in kept).encode())
            print(f"{self.jsonl_path}: dropped {written - len(kept)} record(s) "
                  + (f"after step {step}, the checkpoint resumed from (those steps run again)" if step >= 0 else
                     "of an earlier run here that left no checkpoint (this run starts over)"))

    def _init_wandb(self, project: str, name: str, config: dict, resume_id: str | None) -> None:
        try:
            import wandb
        except Exception as e:  # pragma: no cover - wandb is a dependency, but be safe
            print(f"W&B is not available ({e}); metrics go to {self.jsonl_path} only.")
            return
        mode = os.environ.get("WANDB_MODE")
        if mode is None and not _wandb_has_credentials():
            mode = "offline"
            print("W&B: no API key found, logging offline (upload later with `wandb sync wandb/offline-run-*`).")
        try:
            kwargs = dict(project=project, name=name, config=config, mode=mode,
                          settings=wandb.Settings(x_disable_stats=True, init_timeout=60, silent=True))
            if resume_id is not None:
                kwargs.update(id=resume_id, resume="allow")
            self.wandb_run = wandb.init(**kwargs)
            self.wandb_mode = mode or "online"
            if resume_id is not None and mode == "offline":  # each resumed part writes a folder of its own
                print(f"W&B: run {resume_id} resumed offline; upload all its parts in one call "
                      f"(`wandb sync wandb/offline-run-*-{resume_id}*`), which sends them in order of start time.")
        except Exception as e:
            print(f"W&B could not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                  f"metrics go to {self.jsonl_path} only.")
            self.wandb_run = None

    @property
    def wandb_id(self) -> str | None:
        return None if self.wandb_run is None else self.wandb_run.id

    def log(self, metrics: dict, step: int) -> None:
        record = {"step": int(step), "time": time.time(), **{k: _to_python(v) for k, v in metrics.items()}}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({k: _to_python(v) for k, v in metrics.items()}, step=int(step))
            except Exception as e:
                print(f"W&B log failed ({type(e).__name__}: {e}); continuing with the JSONL file only.")
                self.wandb_run = None

    def log_image(self, key: str, path: str | os.PathLike, step: int) -> None:
        if self.wandb_run is None:
            return
        try:
            import wandb

            self.wandb_run.log({key: wandb.Image(str(path))}, step=int(step))
        except Exception as e:
            print(f"W&B image log failed ({type(e).__name__}: {e}).")

    def summary(self, values: dict) -> None:
        if self.wandb_run is None:
            return
        try:
            for k, v in values.items():
                self.wandb_run.summary[k] = _to_python(v)
        except Exception:
            pass

    def finish(self) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as e:
                print(f"W&B finish failed ({type(e).__name__}: {e}).")
            self.wandb_run = None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut short by a crash
    return out

"""Train a (gated) HRM: ``python train/pretrain.py [key=value ...]`` or under ``torchrun``.

    python train/pretrain.py arch=hrm_v1_gated data_path=data/sudoku-extreme-1k-aug-1000 lr=1e-4
    torchrun --nproc_per_node=4 train/pretrain.py arch=hrm_v1_gated global_batch_size=512
    python train/pretrain.py --config-name quickstart          # small built-in task, CPU-friendly
    python train/pretrain.py --cfg job [overrides]              # print the composed config

The loop is the reference trainer's (docs/REFERENCE.md, "Training loop defaults"): ACT carry across
batches, loss / global_batch_size, gradients summed over ranks, Adam-atan2 for the weights and
sign-SGD for the puzzle embeddings, warmup + cosine learning rate, an evaluation every
``eval_interval`` epochs. Added: checkpoints of the whole training state that resume exactly
(``checkpoint_path=<run dir>``), W&B that works offline, a metrics JSONL file, gate plots, clear
errors, a stop on non-finite loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):
    # Run as a script (python train/pretrain.py): make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from train import checkpointing, distributed  # noqa: E402
from train.config_utils import ConfigError, compose, exit_with, parse_cli, to_container  # noqa: E402


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""

    def __init__(self, message: str, step: Optional[int] = None):
        super().__init__(message)
        self.step = step


class StoppedBySignal(RuntimeError):
    """SIGINT or SIGTERM stopped the run after a step; its training state was checkpointed."""

    def __init__(self, signum: int, checkpoint: Optional[Path]):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint: {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class SignalFlag:
    """The first SIGINT/SIGTERM received once armed (``flag()`` -> its number, or None). Before
    ``arm()`` (start-up: data, model, compilation) a signal stops the process at once, as usual:
    no step has trained, so there is nothing to save."""

    def __init__(self):
        self.received: list[int] = []
        self.armed = False

    def arm(self) -> None:
        self.armed = True

    def __call__(self) -> Optional[int]:
        return self.received[0] if self.received else None


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, once the yielded ``SignalFlag`` is armed, SIGINT and SIGTERM (a Ctrl-C, a
    scheduler's preemption, torchrun passing one on) only set the flag, read after each training
    step; a second SIGINT interrupts at once. Off the main thread (where signal handlers cannot be
    set) the flag never rises."""
    import threading

    flag = SignalFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if not flag.armed:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        if not flag.received and _first_rank():
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint"
                  + (" (Ctrl-C again to abort without one)" if signum == signal.SIGINT else ""),
                  file=sys.stderr, flush=True)
        flag.received.append(signum)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ============================================================================================
# Config: defaults, checks, names, resume merge
# ============================================================================================

SAFE_GROUPS = ("arch",)
PER_INVOCATION = ("max_steps", "max_train_minutes", "init_from")


def _override_key(override: str) -> str:
    key = override.split("=", 1)[0].strip()
    return key.lstrip("+~")


def _first_rank() -> bool:
    """Rank 0, or one process (read from torchrun's environment: the config is resolved before
    the process group starts)."""
    return os.environ.get("RANK", "0") == "0"


def _note_ignored_group(group: str, cfg: DictConfig, saved: dict, overrides: Sequence[str]) -> None:
    """On resume, say so when a group choice (``arch=...``) asks for other fields than the run's
    (rank 0 only): the saved ones are kept, not silently replaced."""
    chosen, kept = to_container(cfg).get(group), saved.get(group)
    if not isinstance(chosen, dict) or not isinstance(kept, dict) or not _first_rank():
        return
    # fields an explicit override touches (arch.loss.loss_type touches loss) are the override's
    explicit = {_override_key(o)[len(group) + 1:].split(".")[0] for o in overrides
                if _override_key(o).startswith(group + ".")}
    differ = [f"{k}: {kept[k]!r} kept, not {v!r}" for k, v in chosen.items()
              if k in kept and k not in explicit and kept[k] != v]
    if differ:
        print(f"note: resuming keeps the run's saved {group} (the checkpoint fixes the model), not the chosen one's "
              f"fields: {'; '.join(differ[:4])}{' ...' if len(differ) > 4 else ''}", file=sys.stderr, flush=True)


def merge_saved_config(cfg: DictConfig, overrides: Sequence[str], saved: dict) -> DictConfig:
    """On resume, the run's saved config is the base; keys given on the command line win.

    A group choice such as ``arch=hrm_v1_gated`` does not replace the saved arch (the checkpoint
    fixes the model), but its explicit fields (``arch.halt_max_steps=8``) do apply."""
    merged = OmegaConf.create(saved)
    OmegaConf.set_struct(merged, False)
    # Settings of one invocation, not of the run: a stop step or start weights do not carry over.
    for key in PER_INVOCATION:
        if key in merged:
            merged[key] = OmegaConf.select(cfg, key)
    for ov in overrides:
        key = _override_key(ov)
        if key in SAFE_GROUPS:
            _note_ignored_group(key, cfg, saved, overrides)
        if key in SAFE_GROUPS or key.startswith("hydra"):
            continue
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        OmegaConf.update(merged, key, value, merge=False, force_add=True)
    # Fields added to cfg_pretrain after the run was saved: take today's defaults.
    base = OmegaConf.create(to_container(cfg))
    OmegaConf.set_struct(base, False)
    out = OmegaConf.merge(base, merged)
    OmegaConf.set_struct(out, True)
    return out


def check_config(cfg: dict, world_size: int) -> None:
    """Raise ConfigError for the mistakes that would otherwise fail late or obscurely."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    def whole(x) -> bool:  # (YAML's true/false are ints to Python: epochs=true is no epoch count)
        return isinstance(x, int) and not isinstance(x, bool)

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    for key in ("global_batch_size", "epochs"):
        need(whole(cfg[key]) and cfg[key] > 0, f"{key} must be a positive integer, got {cfg[key]!r}")
    ev = cfg.get("eval_interval")
    need(ev is None or (whole(ev) and ev > 0), f"eval_interval must be a positive integer, got {ev!r}")
    if ev is not None and cfg["epochs"] % ev != 0:
        divisors = [d for d in range(1, min(cfg["epochs"], 10**6) + 1) if cfg["epochs"] % d == 0]
        near = sorted(divisors, key=lambda d: abs(d - ev))[:3]
        raise ConfigError(f"eval_interval={ev} must divide epochs={cfg['epochs']} (evaluation runs every "
                          f"eval_interval epochs); e.g. eval_interval={' or '.join(str(d) for d in sorted(near))}")
    gbs = cfg["global_batch_size"]
    if gbs % world_size != 0:
        lo = gbs - gbs % world_size
        raise ConfigError(f"global_batch_size={gbs} is not divisible by the number of ranks ({world_size}): "
                          f"each rank takes an equal share; use e.g. global_batch_size={max(lo, world_size)} "
                          f"or {lo + world_size}")
    for key in ("lr", "puzzle_emb_lr", "weight_decay", "puzzle_emb_weight_decay", "lr_min_ratio"):
        need(number(cfg[key]) and cfg[key] >= 0, f"{key} must be a number >= 0, got {cfg[key]!r}")
    need(number(cfg["lr_warmup_steps"]) and cfg["lr_warmup_steps"] >= 0,
         f"lr_warmup_steps must be >= 0, got {cfg['lr_warmup_steps']!r}")
    for key in ("beta1", "beta2"):
        need(number(cfg[key]) and 0 <= cfg[key] < 1,
             f"{key} must be a number in [0, 1), got {cfg[key]!r}")
    for key in ("seed", "log_interval"):
        need(whole(cfg[key]) and cfg[key] >= (key == "log_interval"),
             f"{key} must be a whole number{' >= 1' if key == 'log_interval' else ''}, got {cfg[key]!r}")
    for key in ("wandb", "progress", "checkpoint_every_eval"):
        need(isinstance(cfg.get(key, True), bool), f"{key} must be true or false, got {cfg.get(key)!r}")
    need(cfg["compile"] in ("auto", True, False), f"compile must be auto, true or false, got {cfg['compile']!r}")
    keep = cfg.get("checkpoint_keep_last")
    need(keep is None or (whole(keep) and keep >= 1),
         f"checkpoint_keep_last must be null (keep every checkpoint) or a whole number >= 1, got {keep!r}")
    need(cfg.get("precompile_kernels", "auto") in ("auto", True, False),
         f"precompile_kernels must be auto, true or false, got {cfg.get('precompile_kernels')!r}")
    run_dir = cfg.get("checkpoint_path")
    if run_dir and Path(run_dir).is_file():
        raise ConfigError(f"checkpoint_path={run_dir} is a file, but names a run directory: to resume that run use "
                          f"checkpoint_path={Path(run_dir).parent}; to start a new run from these weights use "
                          f"init_from={run_dir}")
    init = cfg.get("init_from")
    if init and not Path(init).is_file():
        latest = checkpointing.latest_checkpoint(init) if Path(init).is_dir() else None
        hint = f"e.g. init_from={latest}" if latest else "e.g. init_from=checkpoints/<project>/<run>/step_<N>.pt"
        raise ConfigError(f"init_from={init} " + ("is a directory" if Path(init).is_dir() else "does not exist")
                          + f": it takes one checkpoint file, {hint}")
    need(cfg.get("grad_sync", "flat") in ("ddp", "flat"),
         f"grad_sync must be ddp or flat, got {cfg.get('grad_sync')!r}")
    accum = cfg.get("grad_accum_steps", 1)
    need(whole(accum) and accum >= 1,
         f"grad_accum_steps must be a whole number >= 1, got {accum!r}")
    local = gbs // world_size
    if gbs % world_size == 0 and local % accum != 0:
        fits = [d for d in range(1, local + 1) if local % d == 0]
        near = sorted(fits, key=lambda d: abs(d - accum))[:2]
        raise ConfigError(f"grad_accum_steps={accum} must divide the per-rank batch ({gbs} / {world_size} ranks = "
                          f"{local} rows) into equal micro-batches; use e.g. grad_accum_steps="
                          f"{' or '.join(str(d) for d in sorted(near))}")
    need(cfg.get("data_build") in (None, "quickstart"), f"data_build must be null or quickstart, got {cfg.get('data_build')!r}")
    mt = cfg.get("max_train_minutes")
    need(mt is None or (number(mt) and mt > 0), f"max_train_minutes must be null or > 0, got {mt!r}")
    ms = cfg.get("max_steps")
    need(ms is None or (whole(ms) and ms >= 0), f"max_steps must be null or an integer >= 0, got {ms!r}")
    need(isinstance(cfg.get("eval_save_outputs", []), list), "eval_save_outputs must be a list, e.g. [inputs,logits]")


def default_names(cfg: dict, model_class: str) -> None:
    """Fill project_name / run_name / checkpoint_path the reference way (in place)."""
    if not cfg.get("project_name"):
        cfg["project_name"] = f"{os.path.basename(os.path.normpath(cfg['data_path'])).capitalize()} ACT-torch"
    if not cfg.get("run_name"):
        import coolname

        cfg["run_name"] = f"{model_class} {coolname.generate_slug(2)}"
    if not cfg.get("checkpoint_path"):
        cfg["checkpoint_path"] = os.path.join("checkpoints", cfg["project_name"], cfg["run_name"])


def _forward_dtype(arch: dict, device: torch.device) -> Any:
    """``arch.forward_dtype`` with ``auto`` resolved for ``device`` (bfloat16 on CUDA, else float32)."""
    dtype = arch.get("forward_dtype", "bfloat16")
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return dtype


def check_device_options(cfg: dict, device: torch.device) -> None:
    """ConfigError for arch options that cannot run on ``device`` (they would fail at the first step,
    after the data, the model, W&B and the run directory): Triton kernels where Triton cannot run,
    FlashAttention without the package, off CUDA or on float32 activations."""
    from hrm_kernels.backend import get_backend, triton_available, triton_can_run

    arch = cfg.get("arch") or {}
    kernels = str(arch.get("kernels", "auto"))
    # arch.kernels=auto defers to hrm_kernels' own switch (HRM_KERNELS_BACKEND)
    if (kernels if kernels != "auto" else get_backend()) == "triton" and not triton_can_run(device):
        asked = ("arch.kernels=triton" if kernels == "triton"
                 else "HRM_KERNELS_BACKEND=triton (which arch.kernels=auto follows)")
        if not triton_available():
            raise ConfigError(f"{asked} needs the triton package, which cannot be imported here: install it, "
                              + ("or use arch.kernels=auto (the PyTorch fallback where Triton cannot run) or "
                                 "arch.kernels=eager" if kernels == "triton"
                                 else "or unset HRM_KERNELS_BACKEND (or set it to auto), or pass arch.kernels=eager"))
        fix = ("use arch.kernels=auto (Triton where it can run, else the PyTorch fallback) or arch.kernels=eager"
               if kernels == "triton" else "unset HRM_KERNELS_BACKEND (or set it to auto), or pass arch.kernels=eager")
        raise ConfigError(f"{asked} needs a device where the Triton kernels run (CUDA, or the CPU only under "
                          f"TRITON_INTERPRET=1, Triton's slow interpreter), but the run's device is {device.type}: "
                          f"{fix}, or device=cuda on a machine with a GPU")
    if arch.get("attn_backend") == "flash":
        from hrm import layers

        if not layers.FLASH_ATTN_AVAILABLE:
            raise ConfigError("arch.attn_backend=flash needs FlashAttention (the flash_attn_interface or flash_attn "
                              "package), which cannot be imported here: use arch.attn_backend=sdpa (or auto: "
                              "FlashAttention where it can run, else PyTorch's scaled_dot_product_attention), or "
                              "install flash-attn")
        if device.type != "cuda":
            raise ConfigError(f"arch.attn_backend=flash runs on CUDA only, but the run's device is {device.type}: use "
                              "arch.attn_backend=sdpa (or auto: FlashAttention where it can run), or device=cuda")
        dtype = _forward_dtype(arch, device)
        if dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"arch.attn_backend=flash needs bfloat16 or float16 activations, but "
                              f"arch.forward_dtype={dtype}: use arch.attn_backend=sdpa (or auto), or "
                              "arch.forward_dtype=bfloat16")


def arch_config(cfg: dict, metadata, world_size: int, device: torch.device):
    """The HRMConfig for this run: the arch group plus the data-derived fields."""
    import pydantic

    from hrm import HRMConfig

    check_device_options(cfg, device)
    arch = dict(cfg["arch"])
    arch["forward_dtype"] = _forward_dtype(arch, device)
    arch.update(batch_size=cfg["global_batch_size"] // world_size, seq_len=metadata.seq_len,
                vocab_size=metadata.vocab_size, num_puzzle_identifiers=metadata.num_puzzle_identifiers)
    try:
        return HRMConfig(**arch)
    except pydantic.ValidationError as e:
        problems = "; ".join(f"arch.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid arch config: {problems}") from None
    except ValueError as e:
        raise ConfigError(f"invalid arch config: {e}") from None


# ============================================================================================
# Data
# ============================================================================================

def ensure_dataset(cfg: dict, info: distributed.DistInfo) -> None:
    """Build the dataset when it is missing and the config says how (quickstart); else check it."""
    from hrm.data.puzzle_dataset import DatasetError, validate_dataset

    path = cfg["data_path"]
    missing = not os.path.isfile(os.path.join(path, "train", "dataset.json"))
    if missing and cfg.get("data_build") == "quickstart":
        if info.is_main:
            from hrm.data import quickstart

            quickstart.ensure_built(path)
        if info.world_size > 1:
            dist.barrier()
    try:
        validate_dataset(path, check_values=False)
    except DatasetError as e:
        raise ConfigError(str(e)) from None


def make_datasets(cfg: dict, info: distributed.DistInfo, train_epochs_per_iter: int):
    from hrm.data.puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig

    common = dict(seed=cfg["seed"], dataset_path=cfg["data_path"], global_batch_size=cfg["global_batch_size"],
                  rank=info.rank, num_replicas=info.world_size)
    train_ds = PuzzleDataset(PuzzleDatasetConfig(**common, test_set_mode=False, epochs_per_iter=train_epochs_per_iter),
                             split="train")
    eval_ds = None
    if os.path.isfile(os.path.join(cfg["data_path"], "test", "dataset.json")):
        eval_ds = PuzzleDataset(PuzzleDatasetConfig(**common, test_set_mode=True, epochs_per_iter=1), split="test")
    return train_ds, eval_ds


def check_batches(cfg: dict, train_ds, epochs_per_iter: int, total_steps: int, world_size: int) -> None:
    """ConfigError when no training step would run: ``global_batch_size`` above all epochs' examples
    (``total_steps`` 0), or above what one iteration (``eval_interval`` epochs) can hold, since the
    loader fills batches within an iteration, set by set, and drops a last partial one (each group
    gives one of its puzzles per epoch: at most its largest puzzle's examples, at least its smallest's)."""
    import numpy as np

    meta = train_ds.metadata
    gbs, epochs = cfg["global_batch_size"], cfg["epochs"]
    per_epoch_max, per_epoch_min = 0, 0  # examples an epoch draws, over the best set
    for data in train_ds._lazy_load().values():
        sizes = np.diff(np.asarray(data["puzzle_indices"], dtype=np.int64))
        starts = np.asarray(data["group_indices"], dtype=np.int64)[:-1]
        if sizes.size == 0 or starts.size == 0:
            continue
        per_epoch_max = max(per_epoch_max, int(np.maximum.reduceat(sizes, starts).sum()))
        per_epoch_min = max(per_epoch_min, int(np.minimum.reduceat(sizes, starts).sum()))
    # a batch size that trains: a multiple of ranks x micro-batches, within one iteration and all epochs
    unit = world_size * cfg.get("grad_accum_steps", 1)
    room = min(per_epoch_min * epochs_per_iter, int(epochs * meta.total_groups * meta.mean_puzzle_examples))
    fits = f"global_batch_size={max(unit, room // unit * unit)}"
    if total_steps <= 0:
        per_epoch = meta.total_groups * meta.mean_puzzle_examples  # as total_steps counts them
        raise ConfigError(
            f"global_batch_size={gbs} is larger than the training data: an epoch holds {round(per_epoch)} examples, "
            f"so epochs={epochs} give {round(epochs * per_epoch)}, less than one batch, and no step would train; "
            f"use a smaller batch, e.g. {fits}, or more epochs")
    if per_epoch_max * epochs_per_iter < gbs:
        iteration = (f"eval_interval={epochs_per_iter} epoch(s)" if cfg.get("eval_interval")
                     else f"epochs={epochs} (eval_interval=null: one iteration)")
        longer = [k for k in range(epochs_per_iter + 1, epochs + 1) if epochs % k == 0 and k * per_epoch_max >= gbs]
        raise ConfigError(
            f"global_batch_size={gbs} is larger than an iteration of the training data: the loader fills batches "
            f"within each iteration, whose {iteration} hold at most {per_epoch_max * epochs_per_iter} examples, "
            f"and drops a partial batch, so no step would train; use e.g. {fits}"
            + (f", or eval_interval={longer[0]} (it must divide epochs={epochs})" if longer else ""))


def to_device(batch: dict, device: torch.device) -> dict:
    """Host batch -> device. On CUDA the tensors go through pinned memory: a copy from pageable
    memory would first wait for every kernel already queued, i.e. synchronise each step."""
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


# ============================================================================================
# Model, optimizers, carry (de)serialisation
# ============================================================================================

def resolve_compile(flag: Any, device: torch.device, kernels: str = "auto") -> bool:
    """``compile``: auto = on CUDA for a model on the eager kernels only. With the fused Triton
    kernels torch.compile gains nothing per step (H100, Sudoku gated, same run: 89.1 ms compiled
    vs 89.4 ms without), costs ~25 s more before the first step (42.7 vs 17.3 s), and turns off
    what only runs without it: the CUDA graphs of the no-grad recurrence (2.5x at 32 sequences
    per GPU), ``linear_swiglu`` and ``rope_attention`` in the no-grad passes. On CPU the compile
    time exceeds the gain of short runs and needs a C++ toolchain. Without Triton, no compile."""
    if flag == "auto":
        from hrm_kernels.backend import triton_available, triton_can_run

        fused = kernels != "eager" and triton_can_run(device)
        # Inductor generates Triton code for CUDA: without Triton it cannot compile there either.
        return device.type == "cuda" and triton_available() and not fused
    return bool(flag)


def build_model(hconf, device: torch.device, seed: int):
    from hrm import HRM, ACTLossHead

    torch.manual_seed(seed)
    with torch.device(device):
        head = ACTLossHead(HRM(hconf))
    return head


def build_optimizers(head, cfg: dict, world_size: int):
    from hrm import CastedSparseEmbeddingSignSGD
    from train.optim import AdamATan2

    optimizers, base_lrs = [], []
    inner = head.model.inner
    if getattr(inner, "puzzle_emb", None) is not None and head.model.config.puzzle_emb_ndim > 0:
        optimizers.append(CastedSparseEmbeddingSignSGD(inner.puzzle_emb, lr=0,
                                                       weight_decay=cfg["puzzle_emb_weight_decay"],
                                                       world_size=world_size))
        base_lrs.append(cfg["puzzle_emb_lr"])
    optimizers.append(AdamATan2(head.parameters(), lr=0, betas=(cfg["beta1"], cfg["beta2"]),
                                weight_decay=cfg["weight_decay"]))
    base_lrs.append(cfg["lr"])
    return optimizers, base_lrs


def carry_to_state(obj: Any) -> Any:
    """Dataclass / dict / tensor tree -> plain dicts of CPU tensors (weights_only-loadable)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: carry_to_state(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: carry_to_state(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    return obj


def load_carry_state(carry: Any, state: Any) -> Any:
    """Copy a saved tree into a freshly made carry of the same structure (in place, device kept)."""
    if dataclasses.is_dataclass(carry):
        for f in dataclasses.fields(carry):
            setattr(carry, f.name, load_carry_state(getattr(carry, f.name), state[f.name]))
        return carry
    if isinstance(carry, dict):
        return {k: load_carry_state(carry[k], state[k]) if k in carry else state[k] for k in state}
    if isinstance(carry, torch.Tensor):
        return state.to(device=carry.device, dtype=carry.dtype)
    return state


# ============================================================================================
# Training state
# ============================================================================================

@dataclasses.dataclass
class TrainState:
    head: torch.nn.Module           # the ACT loss head (uncompiled: owns the state dict)
    forward: Any                    # module or torch.compile(module)
    optimizers: list
    base_lrs: list
    carry: Any
    step: int
    total_steps: int
    compiled_ok: bool = False       # the compiled forward has run once
    module: Any = None              # head, or head in DistributedDataParallel (grad_sync=ddp)

    @property
    def ddp(self) -> bool:
        return self.module is not None and self.module is not self.head


def lr_at(cfg: dict, base_lr: float, step: int, total_steps: int) -> float:
    from train.optim import cosine_schedule_with_warmup

    return cosine_schedule_with_warmup(step, base_lr=base_lr, warmup_steps=round(cfg["lr_warmup_steps"]),
                                       total_steps=total_steps, min_ratio=cfg["lr_min_ratio"])


def map_tree(fn, *trees):
    """``fn`` over the tensors of same-structured dataclass / dict / tensor trees (a carry, a
    batch), the structure kept; other leaves are taken from the first tree."""
    first = trees[0]
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return type(first)(**{f.name: map_tree(fn, *(getattr(t, f.name) for t in trees))
                              for f in dataclasses.fields(first)})
    if isinstance(first, dict):
        return {k: map_tree(fn, *(t[k] for t in trees)) for k in first}
    if isinstance(first, torch.Tensor):
        return fn(*trees)
    return first


def _forward_backward(cfg: dict, state: TrainState, carry, batch: dict, info: distributed.DistInfo):
    """Forward of ``batch`` from ``carry``, backward of loss / global_batch_size (gradients add up
    in ``.grad``). Returns (new carry, loss, metrics)."""
    try:
        carry, loss, metrics, _, _ = state.forward(carry=carry, batch=batch, return_keys=())
    except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.Unsupported,
            torch._dynamo.exc.InternalTorchDynamoError) as e:
        eager = state.module if state.module is not None else state.head
        if state.forward is eager or state.compiled_ok:
            raise
        # torch.compile failed on the first step (toolchain, unsupported op): run eager instead.
        # Only compiler errors land here; OOM, device asserts and shape bugs propagate as they are.
        if info.is_main:
            print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  "continuing without it (set compile=false to skip the attempt)", file=sys.stderr, flush=True)
        state.forward = eager
        carry, loss, metrics, _, _ = state.forward(carry=carry, batch=batch, return_keys=())
    ((1.0 / cfg["global_batch_size"]) * loss).backward()
    return carry, loss, metrics


def _accumulate(cfg: dict, state: TrainState, batch: dict, info: distributed.DistInfo, steps: int):
    """``_forward_backward`` over ``steps`` equal row slices of the batch and of the carry, in order
    (rows are independent: the result is the whole batch's up to rounding, ACT exploration draws
    aside). The puzzle embedding fills the slice's rows of its per-batch buffers, so its sparse
    optimizer sees the whole batch; under DDP only the last backward all-reduces."""
    from hrm.sparse_embedding import CastedSparseEmbedding

    rows = next(iter(batch.values())).shape[0] // steps
    embeddings = [m for m in state.head.modules() if isinstance(m, CastedSparseEmbedding)]
    new_carry = map_tree(torch.empty_like, state.carry)  # filled slice by slice
    loss, metrics = None, {}
    try:
        for i in range(steps):
            part = slice(i * rows, (i + 1) * rows)
            for emb in embeddings:
                emb.row_index = torch.arange(part.start, part.stop, device=emb.local_ids.device)
            sync = not state.ddp or i == steps - 1
            with (contextlib.nullcontext() if sync else state.module.no_sync()):
                carry, part_loss, part_metrics = _forward_backward(
                    cfg, state, map_tree(lambda t: t[part], state.carry), {k: v[part] for k, v in batch.items()}, info)
            map_tree(lambda whole, new: whole[part].copy_(new), new_carry, carry)
            loss = part_loss.detach() if loss is None else loss + part_loss.detach()
            metrics = {k: v.detach() + metrics[k] if k in metrics else v.detach() for k, v in part_metrics.items()}
    finally:
        for emb in embeddings:
            emb.row_index = None
    return new_carry, loss, metrics


def train_step(cfg: dict, state: TrainState, batch: dict, info: distributed.DistInfo):
    """One optimizer step on this rank's share of the global batch (in ``grad_accum_steps``
    micro-batches).

    Returns the step's PendingMetrics: metric sums over all ranks (every rank gets them, so every
    rank sees a non-finite loss and stops together), read later without stalling the GPU."""
    state.step += 1
    if hasattr(state.head, "set_step"):
        state.head.set_step(state.step)
    if state.carry is None:
        with torch.device(info.device):
            state.carry = state.head.initial_carry(batch)
    accum = cfg.get("grad_accum_steps", 1)
    if accum == 1:
        state.carry, loss, metrics = _forward_backward(cfg, state, state.carry, batch, info)
    else:
        state.carry, loss, metrics = _accumulate(cfg, state, batch, info, accum)
    state.compiled_ok = True  # a whole step ran (compiled, or eager after a failed compile)
    if not state.ddp:  # DDP has summed the gradients during the backward already
        distributed.all_reduce_gradients(state.head.parameters(), info)

    keys = sorted(metrics.keys())
    values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys] + [loss.detach().float().reshape(())])
    if info.world_size > 1:
        dist.all_reduce(values)
    # A non-finite loss (the same on every rank after the all-reduce) skips the update on the
    # device: no host synchronisation here. The host sees it when it reads these metrics, one
    # step later (PendingMetrics), and stops training then.
    found_inf = ~torch.isfinite(values[-1])
    lr_this_step = 0.0
    for opt, base_lr in zip(state.optimizers, state.base_lrs):
        lr_this_step = lr_at(cfg, base_lr, state.step, state.total_steps)
        for group in opt.param_groups:
            group["lr"] = lr_this_step
        opt.step(found_inf=found_inf)
        opt.zero_grad(set_to_none=True)
    return PendingMetrics(state.step, values, keys, lr_this_step)


class PendingMetrics:
    """A step's summed metrics on their way to the host: the copy is queued behind the step's
    kernels (pinned memory, non-blocking) so the host can start the next step before reading them."""

    def __init__(self, step: int, values: torch.Tensor, keys: list[str], lr: float):
        self.step, self.keys, self.lr = step, keys, lr
        self.event = None
        if values.is_cuda:
            self.values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.values.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.values = values

    def read(self) -> torch.Tensor:
        """The metric sums (the last entry is the summed loss); raises TrainingDiverged if the loss
        was not finite (that step's update was skipped on the device)."""
        if self.event is not None:
            self.event.synchronize()
        if not math.isfinite(float(self.values[-1])):
            raise TrainingDiverged(f"loss became {float(self.values[-1])} at step {self.step}", step=self.step)
        return self.values[:-1]


def release_cublas_workspaces(device: torch.device) -> None:
    """Hand the cuBLAS workspaces (32 MiB a stream on Hopper) back to the caching allocator once the
    dry run's work is done: its matmuls left one allocated, which would sit under every later peak;
    the run allocates its own at its first matmul, as without the dry run (and PyTorch clears them
    the same way at each CUDA graph capture)."""
    if torch.device(device).type == "cuda" and hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch.cuda.synchronize(device)
        torch._C._cuda_clearCublasWorkspaces()


def compile_kernels_ahead(cfg: dict, state: TrainState, batch: dict, info: distributed.DistInfo) -> None:
    """Compile the Triton kernels of a training step and of an evaluation segment all at once,
    on a thread pool (``hrm_kernels.compile_ahead``), instead of one after another inside the first
    step and the first evaluation. It is a dry run of ``train_step`` and one evaluation segment on
    throwaway copies of the model and optimizers (their kernels only compile, so the copies fill
    with garbage); the RNG states are restored afterwards, so the real run is the same as without
    it. Every rank runs it (the dry step's all-reduces pair up across ranks)."""
    import copy

    from hrm_kernels import compile_ahead

    rng = checkpointing.capture_rng_state()
    head = optimizers = dry = None
    try:
        head, optimizers = copy.deepcopy((state.head, state.optimizers))
        dry = TrainState(head=head, forward=head, optimizers=optimizers, base_lrs=state.base_lrs, carry=None,
                         step=state.step, total_steps=state.total_steps)
        head.train()
        with compile_ahead() as done:
            train_step(cfg, dry, batch, info)
            head.eval()
            with torch.inference_mode(), torch.device(info.device):
                head(carry=head.initial_carry(batch), batch=batch, return_keys=())
    except Exception as e:
        if info.world_size > 1:
            # This rank may have stopped between the dry step's collectives while the others did
            # not: their next collectives would pair up wrongly. There is no safe way on.
            raise RuntimeError("precompile_kernels failed on this rank; set precompile_kernels=false") from e
        # One process: the real step compiles whatever is missing, one kernel after another.
        print(f"warning: precompile_kernels failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
              "kernels compile during the first step instead (set precompile_kernels=false to skip the attempt)",
              file=sys.stderr, flush=True)
        return
    finally:
        del dry, head, optimizers
        checkpointing.restore_rng_state(rng)
    release_cublas_workspaces(info.device)
    if info.is_main:
        print(f"precompile_kernels: {done.kernels} Triton kernel variants compiled ahead in {done.seconds:.1f} s",
              flush=True)


def resolve_precompile(flag: Any, kernels: str, device: torch.device, world_size: int = 1) -> bool:
    """``precompile_kernels``: auto = one process, where Triton kernels compile (a CUDA device, not
    the interpreter) and the model uses them (``arch.kernels`` not eager). Under torchrun ``true``
    opts in (2 H100s, NCCL, empty Triton cache: first step 31.5 s after launch instead of 35.8 s);
    not the default there because a rank whose dry run fails must stop the whole run."""
    if flag == "auto":
        from hrm_kernels.precompile import available

        return world_size == 1 and kernels != "eager" and device.type == "cuda" and available()
    return bool(flag)


def evaluate(cfg: dict, state: TrainState, eval_ds, info: distributed.DistInfo,
             return_keys: Sequence[str] = (), progress: bool = False):
    """Run the test split. Returns (metrics {f"{set}/{name}": value} on rank 0 else None,
    outputs {key: CPU tensor} of this rank for ``return_keys``, padding rows dropped, plus
    ``example_index`` / ``set_index``: which test example of which set each row is)."""
    from tqdm import tqdm

    head = state.head
    was_training = head.training
    head.eval()
    eval_segments = head.model.config.halt_max_steps
    set_ids = {name: i for i, name in enumerate(eval_ds.metadata.sets)}
    sums = None
    keys: list[str] = []
    outputs: dict[str, list] = {}
    bar = None
    if progress and info.is_main:
        bar = tqdm(total=eval_ds.num_test_batches(), desc="eval", leave=False, dynamic_ncols=True)
    try:
        with torch.inference_mode():
            offsets = {name: 0 for name in set_ids}
            local = eval_ds.local_batch_size
            for set_name, batch, effective in eval_ds:
                # Which test examples this rank's rows are (the last share may be padded).
                start = offsets[set_name] + info.rank * local
                offsets[set_name] += effective
                n_real = max(0, min(local, offsets[set_name] - start))
                batch = to_device(batch, info.device)
                with torch.device(info.device):
                    carry = head.initial_carry(batch)
                # In eval mode every row halts after exactly halt_max_steps segments (no Q-halting,
                # no exploration): run them back to back and let the host check once at the end,
                # instead of synchronising with the GPU after every segment. Only the last segment's
                # metrics and outputs are read, so only it computes them.
                for segment in range(eval_segments):
                    last = segment == eval_segments - 1
                    carry, _, metrics, preds, all_finish = state.forward(
                        carry=carry, batch=batch, return_keys=tuple(return_keys) if last else (), metrics=last)
                if not bool(all_finish & (carry.steps == eval_segments).all()):
                    raise RuntimeError(f"evaluation runs halt_max_steps={eval_segments} segments per batch, but "
                                       "not every row halted exactly at the last one; this model halts "
                                       "differently in eval mode than HRM does")
                if return_keys:
                    for k in return_keys:
                        src = preds if k in preds else batch
                        if k in src:
                            outputs.setdefault(k, []).append(src[k][:n_real].detach().cpu())
                    outputs.setdefault("example_index", []).append(torch.arange(start, start + n_real))
                    outputs.setdefault("set_index", []).append(torch.full((n_real,), set_ids[set_name]))
                if sums is None:
                    keys = sorted(metrics.keys())
                    sums = torch.zeros(len(set_ids), len(keys), dtype=torch.float64, device=info.device)
                sums[set_ids[set_name]] += torch.stack([metrics[k].detach().double().reshape(()) for k in keys])
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        head.train(was_training)
    outputs = {k: torch.cat(v) for k, v in outputs.items()}
    if sums is None:
        return ({} if info.is_main else None), outputs
    if info.world_size > 1:
        dist.reduce(sums, dst=0)
    if not info.is_main:
        return None, outputs
    sums = sums.cpu()
    result = {}
    for set_name, sid in set_ids.items():
        row = {k: float(sums[sid, j]) for j, k in enumerate(keys)}
        count = max(row.pop("count", 0.0), 1.0)
        gate_count = max(row.pop("gate/count", 0.0), 1.0)
        for k, v in row.items():
            result[f"{set_name}/{k}"] = v / (gate_count if k.startswith("gate/") else count)
    return result, outputs


class StopClock:
    """Whether to stop after this step, and why: "time" (``max_train_minutes`` is up), "signal"
    (``signalled()`` says SIGINT/SIGTERM came) or None. Rank 0 decides, so that every rank stops after
    the same step. A single process asks itself. Several ranks: each step queues a broadcast of rank
    0's answer and its copy to pinned host memory behind that step's kernels, and the host reads the
    previous step's answer, which has long arrived; so the check never waits for the step in flight,
    and all ranks stop one step after rank 0 decided."""

    REASONS = (None, "time", "signal")

    def __init__(self, t_start: float, minutes: Optional[float], info: distributed.DistInfo, signalled=None):
        self.t_start, self.minutes, self.info, self.signalled = t_start, minutes, info, signalled
        self.previous = None  # (host flag, event) of the last call's broadcast

    def _own_answer(self) -> int:
        if self.signalled is not None and self.signalled() is not None:
            return 2
        return int(self.minutes is not None and time.time() - self.t_start > 60.0 * self.minutes)

    def __call__(self) -> Optional[str]:
        code = self._own_answer()
        if self.info.world_size == 1:
            return self.REASONS[code]
        flag = torch.full((1,), float(code), device=self.info.device)
        dist.broadcast(flag, src=0)
        event = None
        if flag.is_cuda:
            host = torch.empty(1, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flag = host
        previous, self.previous = self.previous, (flag, event)
        if previous is None:
            return None
        if previous[1] is not None:
            previous[1].synchronize()
        return self.REASONS[int(previous[0][0])]


def reduce_train_metrics(values: torch.Tensor, keys: list[str], gbs: int) -> dict:
    from hrm import reduce_metrics

    summed = {k: float(values[i]) for i, k in enumerate(keys)}
    return dict(reduce_metrics(summed, gbs, prefix="train/"))


# ============================================================================================
# Checkpoints
# ============================================================================================

def rank_state(state: TrainState, train_ds) -> dict:
    return {"rng": checkpointing.capture_rng_state(), "data": train_ds.state_dict(),
            "carry": None if state.carry is None else carry_to_state(state.carry)}


def save_checkpoint(cfg: dict, state: TrainState, train_ds, info: distributed.DistInfo,
                    wandb_id: str | None) -> Path | None:
    run_dir = Path(cfg["checkpoint_path"])
    mine = rank_state(state, train_ds)
    if info.rank > 0:
        checkpointing.atomic_torch_save(mine, run_dir / f"step_{state.step}.rank{info.rank}.pt")
    if info.world_size > 1:
        dist.barrier()
    path = None
    if info.is_main:
        payload = {
            "model": checkpointing.clean_state_dict(state.head.state_dict()),
            "optimizers": [opt.state_dict() for opt in state.optimizers],
            "step": state.step, "total_steps": state.total_steps,
            "world_size": info.world_size, "rank0": mine,
            "config": cfg, "wandb_id": wandb_id,
        }
        path = checkpointing.save_training_state(run_dir, state.step, payload, keep_last=cfg.get("checkpoint_keep_last"))
    if info.world_size > 1:
        dist.barrier()
    return path


# Settings a resumed run must keep: the data position counts batches of ``global_batch_size`` within
# iterations of ``eval_interval`` epochs (``epochs`` when null) drawn in ``seed``'s order.
_RESUME_FIXED = ("seed", "global_batch_size", "eval_interval")


def _epochs_per_iter(cfg: dict) -> int:
    return cfg.get("eval_interval") or cfg["epochs"]


def check_resume_settings(cfg: dict, saved: dict, path: Path) -> None:
    """ConfigError when ``cfg`` changes a setting the checkpoint's data position depends on."""
    fresh_run = (f"start a new run from these weights with init_from={path} and another checkpoint_path (or "
                 "run_name)")
    for key in _RESUME_FIXED:
        if key not in saved:
            continue
        ours, run_value = ((_epochs_per_iter(cfg), _epochs_per_iter(saved)) if key == "eval_interval"
                           else (cfg[key], saved[key]))
        if ours == run_value:
            continue
        if key == "eval_interval" and saved["eval_interval"] is None:  # the run's iterations were its `epochs`
            raise ConfigError(
                f"the run ({path}) had eval_interval=null, so its data position counts iterations of its "
                f"epochs={run_value}; to resume with epochs={cfg['epochs']} pass eval_interval={run_value} "
                f"(it must divide epochs), or {fresh_run}")
        raise ConfigError(
            f"{key}={cfg[key]} differs from the run's {key}={run_value} ({path}): its data position counts "
            f"batches of global_batch_size within iterations of eval_interval epochs in seed's order, so "
            f"resuming needs the run's value; drop the override, or {fresh_run}")


def _as_tuple(value):
    return tuple(value) if isinstance(value, list) else value


def restore_checkpoint(cfg: dict, path: Path, state: TrainState, train_ds, info: distributed.DistInfo) -> dict:
    try:
        obj = checkpointing.load_file(path)
    except ValueError as e:
        older = [p for p in checkpointing.list_checkpoints(path.parent) if p != path]
        fallback = (f"move it out of {path.parent} to resume from the previous one, {older[-1].name}" if older
                    else "no other checkpoint of this run exists: start a new run")
        raise ConfigError(f"{e}. Resuming takes the newest checkpoint; {fallback}") from None
    if not checkpointing.is_training_state(obj):
        raise ConfigError(f"{path} holds model weights only (no optimizer, step or data position): it cannot be "
                          f"resumed. To start a new run from these weights use init_from={path}")
    check_resume_settings(cfg, obj.get("config") or {}, path)
    try:
        missing, unexpected = state.head.load_state_dict(obj["model"], strict=False)
    except RuntimeError as e:  # a shape differs
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise ConfigError(f"checkpoint {path} does not match this model ({first}): resume with the run's arch "
                          "settings (drop the arch.* overrides)") from None
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path} does not match this model: missing {list(missing)[:5]}, "
                          f"unexpected {list(unexpected)[:5]} (resume with the same arch as the run)")
    for opt, sd in zip(state.optimizers, obj["optimizers"]):
        # the groups' settings (betas, weight decay) as this run's config says, not as saved: an
        # override on resume applies (lr is the schedule's, set every step)
        settings = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in opt.param_groups]
        opt.load_state_dict(sd)
        for group, ours in zip(opt.param_groups, settings):
            changed = {k: (group.get(k), v) for k, v in ours.items() if _as_tuple(group.get(k)) != _as_tuple(v)}
            if changed and info.is_main:
                print(f"note: resuming {type(opt).__name__} with " + ", ".join(
                    f"{k}={new} (the checkpoint had {old})" for k, (old, new) in changed.items()),
                      file=sys.stderr, flush=True)
            group.update(ours)
    state.step = int(obj["step"])
    saved_total = obj.get("total_steps")
    if isinstance(saved_total, int) and saved_total != state.total_steps and info.is_main:
        saved_epochs = (obj.get("config") or {}).get("epochs")
        past = (f"; step {state.step} is already at or past the new end, so no step trains"
                if state.step >= state.total_steps else "")
        print(f"note: resuming with total_steps={state.total_steps} (epochs={cfg['epochs']}); the checkpoint "
              f"{path.name} was written with total_steps={saved_total}"
              + (f" (epochs={saved_epochs})" if saved_epochs is not None else "")
              + f": the learning-rate schedule follows the new length from step {state.step} on{past}",
              file=sys.stderr, flush=True)
    if info.rank == 0:
        mine = obj["rank0"]
    else:
        rank_file = path.with_name(f"step_{state.step}.rank{info.rank}.pt")
        try:
            mine = checkpointing.load_file(rank_file) if rank_file.is_file() else None
        except ValueError as e:  # damaged: as if missing (the carry restarts), said on this rank
            print(f"note: rank {info.rank}: {e}", file=sys.stderr, flush=True)
            mine = None
    if obj.get("world_size", 1) != info.world_size or mine is None:
        if info.is_main:
            print(f"note: checkpoint was written by {obj.get('world_size', 1)} rank(s), resuming on "
                  f"{info.world_size}: weights, optimizers, step and data position continue; the ACT carry restarts.")
        train_ds.load_state_dict(obj["rank0"]["data"])
        state.carry = None
        return obj
    train_ds.load_state_dict(mine["data"])
    obj["_rng"] = mine["rng"]  # restored just before the loop (logger/W&B start-up may draw numbers)
    state.carry = None
    if mine.get("carry") is not None:
        state.carry = ("pending", mine["carry"])  # materialised on the first batch (needs a batch shape)
    return obj


# ============================================================================================
# Main
# ============================================================================================

def main(cfg: DictConfig | dict, overrides: Sequence[str] = ()) -> dict:
    """Train with a composed config. Returns the final evaluation metrics (rank 0; {} elsewhere)."""
    import contextlib

    cfg_dict = cfg if isinstance(cfg, dict) else to_container(cfg)
    info = distributed.setup(str(cfg_dict.get("device", "auto")))
    try:
        # arch.kernels also picks the optimizer's implementation (hrm_kernels' global switch).
        kernels = str(cfg_dict.get("arch", {}).get("kernels", "auto"))
        ctx = contextlib.nullcontext()
        if kernels in ("triton", "eager"):
            from hrm_kernels import use_backend

            ctx = use_backend(kernels)
        with ctx, stop_on_signals() as signalled:
            return _train(cfg_dict, info, signalled)
    finally:
        distributed.teardown(info)


def _train(cfg: dict, info: distributed.DistInfo, signalled: Optional[SignalFlag] = None) -> dict:
    from tqdm import tqdm

    from train.logging_utils import MetricsLogger, read_jsonl
    from train.plots import plot_gate_evolution

    check_config(cfg, info.world_size)
    check_device_options(cfg, info.device)
    ensure_dataset(cfg, info)
    epochs_per_iter = _epochs_per_iter(cfg)
    total_iters = cfg["epochs"] // epochs_per_iter
    train_ds, eval_ds = make_datasets(cfg, info, epochs_per_iter)
    meta = train_ds.metadata
    total_steps = int(cfg["epochs"] * meta.total_groups * meta.mean_puzzle_examples / cfg["global_batch_size"])
    check_batches(cfg, train_ds, epochs_per_iter, total_steps, info.world_size)
    hconf = arch_config(cfg, meta, info.world_size, info.device)

    # Names on rank 0, shared with all ranks.
    from hrm import HRM

    run_dir_given = bool(cfg.get("checkpoint_path"))
    if info.is_main:
        default_names(cfg, HRM.__name__)
    cfg = distributed.broadcast_object(cfg, info)
    if not run_dir_given and checkpointing.latest_checkpoint(cfg["checkpoint_path"]) is not None:
        raise ConfigError(f"run_name={cfg['run_name']!r} already has checkpoints in {cfg['checkpoint_path']}: to resume "
                          f"that run pass checkpoint_path=\"{cfg['checkpoint_path']}\" (it keeps the run's settings); "
                          "to start a new run pick another run_name")

    head = build_model(hconf, info.device, cfg["seed"])
    distributed.broadcast_module_state(head, info)
    if cfg.get("init_from"):
        from hrm import load_checkpoint

        try:
            load_checkpoint(head, cfg["init_from"], puzzle_emb_mismatch="mean")
        except (RuntimeError, ValueError, TypeError) as e:
            raise ConfigError(f"init_from={cfg['init_from']}: {e}") from None
        if info.is_main:
            print(f"Loaded weights from {cfg['init_from']}")
    use_compile = resolve_compile(cfg["compile"], info.device, str(cfg["arch"].get("kernels", "auto")))
    module = head
    if info.world_size > 1 and cfg.get("grad_sync", "flat") == "ddp":
        module = distributed.wrap_ddp(head, info)
    forward = torch.compile(module, dynamic=False) if use_compile else module
    optimizers, base_lrs = build_optimizers(head, cfg, info.world_size)
    state = TrainState(head=head, forward=forward, optimizers=optimizers, base_lrs=base_lrs, carry=None,
                       step=0, total_steps=total_steps, module=module)

    run_dir = Path(cfg["checkpoint_path"])
    resume_from = checkpointing.latest_checkpoint(run_dir)
    wandb_id = None
    obj: dict = {}
    if resume_from is not None:
        obj = restore_checkpoint(cfg, resume_from, state, train_ds, info)
        wandb_id = obj.get("wandb_id")
        if info.is_main:
            print(f"Resuming from {resume_from} (step {state.step})")
    # Seed the per-rank random streams (ACT exploration) unless they are restored below. A resume
    # that cannot restore them (other world size, missing rank file) gets a fresh per-rank stream
    # keyed by the step, so ranks stay decorrelated and resumes do not replay the same draws.
    if obj.get("_rng") is None:
        torch.manual_seed(cfg["seed"] + info.rank + 1_000_003 * state.step)

    logger = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.atomic_write_bytes(run_dir / "all_config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)).encode())
        logger = MetricsLogger(run_dir, cfg["project_name"], cfg["run_name"], cfg, use_wandb=bool(cfg["wandb"]),
                               resume_id=wandb_id, resume_step=state.step if resume_from is not None else -1)
        wandb_id = logger.wandb_id or wandb_id  # a run without W&B (or whose W&B failed) keeps the run's id
        num_params = sum(p.numel() for p in head.parameters())
        ranks = f" x{info.world_size} ranks (grad_sync={'ddp' if state.ddp else 'flat'})" if info.world_size > 1 else ""
        print(f"{cfg['run_name']}: {num_params / 1e6:.2f}M parameters, device {info.device}{ranks}, compile={use_compile}, "
              f"kernels={hconf.kernels}, {hconf.forward_dtype}, gating={hconf.use_gating}; {total_steps} steps; "
              f"checkpoints in {run_dir}", flush=True)
        if resume_from is None:
            logger.log({"num_params": num_params}, step=0)

    if resume_from is not None and obj.get("_rng") is not None:
        checkpointing.restore_rng_state(obj["_rng"])

    max_steps = cfg.get("max_steps")
    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
    bar = None
    if info.is_main and cfg["progress"]:
        bar = tqdm(total=total_steps, initial=min(state.step, total_steps), desc="train", dynamic_ncols=True,
                   unit="step")
    last_saved: Path | None = resume_from
    saved_step = state.step if resume_from is not None else -1
    last_eval: dict = {}
    last_eval_step = -1
    gbs = cfg["global_batch_size"]
    t_last, step_last = time.time(), state.step

    def checkpoint_now() -> None:
        nonlocal last_saved, saved_step
        if saved_step == state.step:
            return
        last_saved = save_checkpoint(cfg, state, train_ds, info, wandb_id)
        saved_step = state.step

    def run_eval() -> dict:
        nonlocal last_eval, last_eval_step
        if eval_ds is None:
            return {}
        last_eval_step = state.step
        metrics, outputs = evaluate(cfg, state, eval_ds, info, return_keys=cfg.get("eval_save_outputs") or (),
                                    progress=bool(cfg["progress"]))
        if outputs:
            checkpointing.atomic_torch_save(outputs, run_dir / f"step_{state.step}_all_preds.{info.rank}")
        if info.is_main:
            logged = {f"eval/{k}": v for k, v in metrics.items()}
            logger.log(logged, step=state.step)
            last_eval = metrics
            shown = {k: v for k, v in metrics.items() if k.split("/", 1)[1] in ("accuracy", "exact_accuracy", "steps")}
            msg = ", ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items()))
            (bar.write if bar is not None else print)(f"eval @ step {state.step}: {msg}")
            if hconf.use_gating:
                png = plot_gate_evolution(read_jsonl(logger.jsonl_path), logged, run_dir / "gates.png",
                                          title=f"{cfg['run_name']} step {state.step}")
                if png is not None:
                    logger.log_image("gates", png, step=state.step)
        return metrics or {}

    signalled = signalled if signalled is not None else SignalFlag()
    time_limit = cfg.get("max_train_minutes")
    stop_reason: Optional[str] = None
    should_stop = StopClock(time.time(), time_limit, info, signalled)
    bar_values: dict[str, str] = {}  # progress-bar values kept between logs
    pending: Optional[PendingMetrics] = None  # the last step's metrics, not read yet

    def report(metrics: PendingMetrics) -> None:
        """Read one step's metrics (every rank: a non-finite loss stops all of them), log them."""
        nonlocal t_last, step_last
        try:
            values = metrics.read()
        except TrainingDiverged as e:
            where = (f"last good checkpoint: {last_saved} (step {saved_step})" if last_saved is not None
                     else "no checkpoint was written before it")
            raise TrainingDiverged(f"{e}; training stopped, {where}. Try a lower lr, more lr_warmup_steps "
                                   f"or a more negative arch.gate_init_bias.", step=e.step) from None
        if not info.is_main:
            return
        if metrics.step % cfg["log_interval"] == 0 or metrics.step == stop_at:
            m = reduce_train_metrics(values, metrics.keys, gbs)
            m["train/lr"] = metrics.lr
            logger.log(m, step=metrics.step)
            if bar is not None:
                now = time.time()
                rate = (metrics.step - step_last) * gbs / max(now - t_last, 1e-9)
                t_last, step_last = now, metrics.step
                if m.get("train/count", 1) > 0:  # accuracy is over sequences that halted
                    bar_values["acc"] = f"{m.get('train/accuracy', float('nan')):.3f}"
                bar.set_postfix(loss=f"{m.get('train/lm_loss', float('nan')):.3f}",
                                ex_s=f"{rate:.0f}", refresh=False, **bar_values)
        if bar is not None:
            bar.update(1)

    def flush() -> None:
        """Read the pending metrics: before anything that evaluates, saves or ends the run."""
        nonlocal pending
        if pending is not None:
            last, pending = pending, None
            report(last)

    precompile = resolve_precompile(cfg.get("precompile_kernels", "auto"), str(cfg["arch"].get("kernels", "auto")),
                                    info.device, info.world_size)
    signalled.arm()  # from here a signal stops after the step in progress, with a checkpoint
    try:
        start_iter = train_ds.completed_passes()  # (one iteration here is one pass over the sets)
        stopped = state.step >= stop_at
        for _iter in range(start_iter, total_iters):
            if stopped:
                break
            head.train()
            for _set_name, batch, _ in train_ds:
                if state.step >= total_steps:
                    continue  # the loader can hold a few batches more than total_steps (rounding)
                batch = to_device(batch, info.device)
                if isinstance(state.carry, tuple) and state.carry and state.carry[0] == "pending":
                    with torch.device(info.device):
                        fresh = head.initial_carry(batch)
                    state.carry = load_carry_state(fresh, state.carry[1])
                if precompile:
                    compile_kernels_ahead(cfg, state, batch, info)
                    precompile = False
                current = train_step(cfg, state, batch, info)
                if pending is not None:  # the previous step's metrics: this step is queued already
                    report(pending)
                pending = current
                if state.step >= stop_at and max_steps is not None and state.step < total_steps:
                    stopped = True
                    break
                if state.step < total_steps:
                    stop_reason = should_stop()
                    if stop_reason is not None:
                        stopped = True
                        break
            flush()
            if stopped:
                break
            # One iteration (eval_interval epochs) done: evaluate, checkpoint.
            last_eval = run_eval()
            if cfg["checkpoint_every_eval"]:
                checkpoint_now()
        flush()
        if stop_reason == "time":
            if info.is_main:
                (bar.write if bar is not None else print)(
                    f"max_train_minutes={cfg['max_train_minutes']} reached at step {state.step}: evaluating now")
            last_eval = run_eval()
        checkpoint_now()
    except TrainingDiverged as e:
        if bar is not None:
            bar.close()
            bar = None
        if info.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
            logger.summary({"diverged_at_step": e.step if e.step is not None else state.step})
            logger.finish()
        raise
    finally:
        if bar is not None:
            bar.close()
    if info.is_main:
        if last_eval:
            ex = {k: v for k, v in last_eval.items() if k.endswith("/exact_accuracy")}
            for k, v in sorted(ex.items()):
                stale = f", from the evaluation at step {last_eval_step}" if last_eval_step != state.step else ""
                print(f"held-out exact accuracy ({k.split('/')[0]}): {100 * v:.1f}% (step {state.step}{stale})")
            logger.summary({f"final/{k}": v for k, v in last_eval.items()})
        print(f"checkpoint: {last_saved}", flush=True)
        logger.finish()
    if stop_reason == "signal":
        raise StoppedBySignal(signalled() or signal.SIGTERM, last_saved)
    return last_eval if info.is_main else {}


def _shell_value(value: str) -> str:
    """``value`` as typed after ``key=`` in a shell: double-quoted when it has spaces or the like."""
    import re

    return value if re.fullmatch(r"[\w@%+:,./-]+", value) else f'"{value}"'


def runs_below(directory: str | os.PathLike, depth: int = 2, limit: int = 5000) -> list[tuple[Path, Path]]:
    """Run directories (holding a checkpoint, as ``checkpointing.latest_checkpoint`` finds it) below
    ``directory`` down to ``depth`` levels (2: ``checkpoints/`` -> project -> run), newest checkpoint
    first, as (run directory, its latest checkpoint); a run's own subdirectories are not searched,
    nor hidden ones, and at most ``limit`` directories are looked at."""
    found, level, seen = [], [Path(directory)], 0
    for _ in range(depth):
        below = []
        for parent in level:
            try:
                children = sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            for child in children:
                seen += 1
                if seen > limit:
                    return _newest_first(found)
                latest = checkpointing.latest_checkpoint(child)
                if latest is not None:
                    found.append((child, latest))
                else:
                    below.append(child)
        level = below
    return _newest_first(found)


def _newest_first(runs: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    def age(item):
        try:
            return item[1].stat().st_mtime
        except OSError:
            return 0.0

    return sorted(runs, key=age, reverse=True)


def check_checkpoint_path(ckpt_dir: str) -> None:
    """``checkpoint_path`` named on the command line holds no checkpoint: a ConfigError when
    directories below it do (a project directory, ``checkpoints/``: a new run there would sit beside
    them, and a resume was probably meant), else a note that a new run starts there."""
    runs = runs_below(ckpt_dir)
    if runs:
        shown = " or ".join(f"checkpoint_path={_shell_value(str(d))} ({ckpt.name})" for d, ckpt in runs[:3])
        order = "newest first" + (f", {len(runs) - 3} more not shown" if len(runs) > 3 else "")
        raise ConfigError(
            f"checkpoint_path={ckpt_dir} holds no checkpoint to resume, but run directories inside it do: did you "
            f"mean {shown}? ({order}); to start a new run, give it a directory of its own, e.g. "
            f"checkpoint_path={_shell_value(str(Path(ckpt_dir) / '<new run name>'))}")
    if _first_rank():
        where = ("does not exist" if not Path(ckpt_dir).exists()
                 else "holds no checkpoint (step_<N>.pt)")
        print(f"note: checkpoint_path={ckpt_dir} {where}: nothing to resume, so a NEW run starts there from step 0 "
              "(to resume a run instead, name the directory that holds its step_<N>.pt files)"
              + _near_run(ckpt_dir), file=sys.stderr, flush=True)


def _near_run(ckpt_dir: str) -> str:
    """``; did you mean checkpoint_path=<run> (step_<N>.pt)?`` when a run directory beside ``ckpt_dir``
    has a name close to its name (a typo of a run to resume), else empty. A note, not an error: a
    new run beside ``run1`` is often called ``run2``."""
    path = Path(ckpt_dir)
    siblings = {d.name: ckpt for d, ckpt in runs_below(path.parent, depth=1)} if path.name else {}
    near = difflib.get_close_matches(path.name, list(siblings), n=1, cutoff=0.8)
    if not near:
        return ""
    return (f"; did you mean checkpoint_path={_shell_value(str(path.parent / near[0]))} "
            f"({siblings[near[0]].name})?")


def resolve_config(overrides: Sequence[str] = (), config_name: str = "cfg_pretrain") -> DictConfig:
    """Compose the config; when resuming from a run directory, merge it onto the run's saved config."""
    cfg = compose(overrides, config_name)
    ckpt_dir = cfg.get("checkpoint_path")
    given = any(o.split("=", 1)[0].lstrip("+") == "checkpoint_path" for o in overrides)
    if given and ckpt_dir and not Path(ckpt_dir).is_file() and checkpointing.latest_checkpoint(ckpt_dir) is None:
        check_checkpoint_path(str(ckpt_dir))
    latest = checkpointing.latest_checkpoint(ckpt_dir) if ckpt_dir else None
    if latest is not None:
        saved_yaml = Path(ckpt_dir) / "all_config.yaml"
        saved = None
        if saved_yaml.is_file():
            saved = OmegaConf.to_container(OmegaConf.load(saved_yaml), resolve=True)
        else:  # (deleted, or the run directory copied without it) the config every checkpoint stores
            saved = _checkpoint_config(latest)
            if saved is not None and _first_rank():
                print(f"note: {saved_yaml} is missing: resuming with the config stored in {latest.name}",
                      file=sys.stderr, flush=True)
        if saved is not None:
            saved["checkpoint_path"] = ckpt_dir
            cfg = merge_saved_config(cfg, overrides, saved)
    return cfg


def _checkpoint_config(path: Path) -> dict | None:
    """The run config a training checkpoint stores, or None (an unreadable file is reported when the
    resume loads it)."""
    try:
        obj = checkpointing.load_file(path)
    except (ValueError, OSError):
        return None
    config = obj.get("config") if checkpointing.is_training_state(obj) else None
    return dict(config) if isinstance(config, dict) else None


def run(overrides: Sequence[str] = (), config_name: str = "cfg_pretrain") -> dict:
    """In-process entry for scripts and tests: ``run(["arch=hrm_v1_gated", "epochs=2"])``."""
    return main(resolve_config(overrides, config_name))


def cli(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config_name, overrides, show = parse_cli(argv)
        if show == "help":
            print(__doc__)
            print("Fields (override any with key=value):\n")
            print(OmegaConf.to_yaml(compose([], config_name)))
            return
        cfg = resolve_config(overrides, config_name)
        if show is not None:
            print(OmegaConf.to_yaml(cfg, resolve=True))
            return
        main(cfg)
    except ConfigError as e:
        exit_with(str(e), 2)
    except TrainingDiverged:
        raise SystemExit(1)
    except StoppedBySignal as e:
        if e.checkpoint is not None and _first_rank():
            print(f"{e}; resume with checkpoint_path=\"{e.checkpoint.parent}\"", file=sys.stderr)
        raise SystemExit(128 + e.signum)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    cli()

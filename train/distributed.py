"""torch.distributed set-up for ``torchrun``: NCCL on GPUs, gloo on CPU, nothing when single."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from train.config_utils import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for but no CUDA GPU is visible; use device=auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def setup(device_name: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1 in the environment)."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or "LOCAL_RANK" not in os.environ:
        if device.type == "cuda":
            torch.cuda.set_device(0 if device.index is None else device.index)
            device = torch.device("cuda", torch.cuda.current_device())
        return DistInfo(device=device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        initialized_here = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=device, initialized_here=initialized_here)


def teardown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if info.world_size == 1:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj, info: DistInfo) -> list:
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_module_state(module: torch.nn.Module, info: DistInfo) -> None:
    """Make parameters and buffers identical on every rank (rank 0's values)."""
    if info.world_size == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def _sum_bucket(_state, bucket):
    """DDP communication hook: sum the bucket over ranks (DDP's default hook averages)."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_ddp(module: torch.nn.Module, info: DistInfo, bucket_cap_mb: float = 25.0) -> torch.nn.Module:
    """``module`` in DistributedDataParallel whose gradient buckets are summed over ranks while
    the backward is still running (the same sums as ``all_reduce_gradients``, overlapped with
    compute; under torch.compile Dynamo splits the graph at bucket boundaries for the same
    overlap). Buffers are never broadcast: the constant ones were made identical by
    ``broadcast_module_state`` already, the puzzle embedding's per-rank batch rows must stay per
    rank, and re-sending its [num_puzzle_identifiers, D] table every forward would be costly."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    options = inspect.signature(DistributedDataParallel.__init__).parameters
    kwargs = dict(device_ids=[info.device.index] if info.device.type == "cuda" else None,
                  bucket_cap_mb=bucket_cap_mb)
    if "init_sync" in options and "forward_sync_buffers" in options:  # torch >= 2.13
        kwargs.update(init_sync=False, forward_sync_buffers=False)  # broadcast_module_state did it
    else:
        kwargs.update(broadcast_buffers=False)
    ddp = DistributedDataParallel(module, **kwargs)
    ddp.register_comm_hook(None, _sum_bucket)
    return ddp


def all_reduce_gradients(params, info: DistInfo) -> None:
    """Sum gradients over ranks. The loss is already scaled by 1/global_batch_size on every rank,
    so the sum is the gradient of the global-batch mean, the same as one process on the whole
    global batch (the reference's semantics; "averaged" over the global batch)."""
    if info.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    # One flat buffer: far fewer collective calls than one per parameter.
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n

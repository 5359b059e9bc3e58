"""Small helpers shared by the ops: argument checks with clear messages, launch sizing."""

from __future__ import annotations

import math

import functools

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t: torch.Tensor, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype}; supported are float32, float16 and bfloat16 "
            f"(cast with {name}.float() or {name}.to(torch.bfloat16))"
        )


def check_same(op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor,
               *, shape: bool = True, dtype: bool = True) -> None:
    """Raise unless ``t`` matches ``ref`` in device (always), shape and dtype (when asked)."""
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                         "move both to the same device")
    if shape and t.shape != ref.shape:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but {ref_name} has shape "
                         f"{tuple(ref.shape)}; they must match")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; "
                        "cast one of them so they match")


def as_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """View ``t`` as a 2-D [rows, width] tensor whose last dimension is contiguous (copying only
    when the layout cannot be viewed that way)."""
    t2 = t.reshape(math.prod(t.shape[:-1]), width)  # (not -1: ambiguous for an empty last dimension)
    if width > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side grid sizes, in plain Python: ``triton.cdiv`` is a function that
    kernels can call too and costs microseconds per host call, a dozen of which add up per op."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for n = 0), as ``triton.next_power_of_2``, in plain Python."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def num_programs_for(device_type: str, index: int | None) -> int:
    """Programs that keep the device busy in a persistent grid: the SM count on CUDA."""
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index or 0).multi_processor_count
    return 4  # the interpreter runs programs one after another: a few suffice


def row_tile(n_cols: int, elements_per_tile: int = 4096, max_rows: int = 64) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for row-wise kernels: the whole row in one tile, several rows per
    program when rows are short so that each program moves a useful amount of memory."""
    block_n = next_power_of_2(max(n_cols, 1))
    block_m = max(1, min(max_rows, elements_per_tile // block_n))
    return block_m, block_n


def warps_for(tile_elements: int) -> int:
    return max(1, min(16, tile_elements // 512))

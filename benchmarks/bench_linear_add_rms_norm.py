"""Output projection + residual add + RMSNorm (``linear_add_rms_norm``), forward without gradients
(the model's no-grad passes): triton (one kernel) vs eager (``F.linear`` + ``rms_norm_reference``)
vs torch.compile of that eager code; plus the path the model takes without it (cuBLAS +
the ``rms_norm`` kernel) in a second table. Bytes: x, weight and residual read once, the output
written once; FLOPs: 2 M N K.

    python benchmarks/bench_linear_add_rms_norm.py [--sweep]   # markdown tables; --sweep: tiles
    python -m pytest benchmarks/bench_linear_add_rms_norm.py   # pytest-benchmark
"""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # as a script: the repository importable

from benchmarks.common import (PROVIDERS, Case, against_unfused, bench_case,  # noqa: E402
                               fused_op_report, require_cuda, sweep_flag_main, tile_sweep)
from hrm_kernels import linear_add_rms_norm, linear_add_rms_norm_reference, rms_norm, use_backend  # noqa: E402

kernel_module = importlib.import_module("hrm_kernels.linear_add_rms_norm")

# (M, K, N): HRM's o_proj (K = hidden) and down_proj (K = intermediate) at the Sudoku (768 x 82)
# and ARC (96 x 901) token counts.
SHAPES = [(62976, 512, 512), (62976, 1536, 512), (86496, 512, 512), (86496, 1536, 512)]


def _inputs(m, k, n, dtype=torch.bfloat16):
    return (torch.randn(m, k, device="cuda", dtype=dtype), (torch.randn(n, k, device="cuda") / k ** 0.5).to(dtype),
            torch.randn(m, n, device="cuda", dtype=dtype))


def _triton(x, weight, residual):
    with use_backend("triton"), torch.no_grad():
        return linear_add_rms_norm(x, weight, residual)


def _cublas_then_rms_norm(x, weight, residual):
    with use_backend("triton"), torch.no_grad():
        return rms_norm(F.linear(x, weight), residual=residual)


def _eager(x, weight, residual):
    with torch.no_grad():
        return linear_add_rms_norm_reference(x, weight, residual)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(_eager, dynamic=False)


def _label(shape) -> str:
    return "x".join(map(str, shape))


def cases() -> list[Case]:
    out = []
    for m, k, n in SHAPES:
        args = _inputs(m, k, n)
        fns = {"triton": functools.partial(_triton, *args), "eager": functools.partial(_eager, *args),
               "compile": functools.partial(_compiled(), *args)}
        out.append(Case("linear_add_rms_norm", _label((m, k, n)), "fwd", (m * k + n * k + 2 * m * n) * 2, fns,
                        flops=2 * m * n * k))
    return out


@pytest.fixture(scope="module")
def all_cases():
    return {c.id: c for c in cases()}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_id", [f"linear_add_rms_norm-{_label(s)}-fwd" for s in SHAPES])
def test_linear_add_rms_norm(benchmark, all_cases, case_id, provider):
    bench_case(benchmark, all_cases[case_id], provider)


def against_model_path(shapes=SHAPES) -> str:
    """The kernel against the model's unfused path (cuBLAS matmul + rms_norm kernel), same process."""
    cases = []
    for m, k, n in shapes:
        args = _inputs(m, k, n)
        cases.append((_label((m, k, n)), functools.partial(_triton, *args),
                      functools.partial(_cublas_then_rms_norm, *args), 2 * m * n * k))
    return against_unfused(cases, "cuBLAS + rms_norm")


def sweep(shapes=SHAPES[:2], configs=None) -> str:
    """GPU time per (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    configs = configs or [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 4, 3), (128, 128, 64, 4, 4),
                          (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (256, 128, 64, 8, 3)]
    return tile_sweep(kernel_module, "CUDA_CONFIG", configs, shapes,
                      lambda shape: functools.partial(_triton, *_inputs(*shape)))


def main(do_sweep: bool = False) -> str:
    return fused_op_report("Output projection + add + RMSNorm (no gradient), bf16", "linear_add_rms_norm", cases(), against_model_path,
                           "the model's unfused path (cuBLAS + rms_norm kernel)", sweep if do_sweep else None)


if __name__ == "__main__":
    require_cuda(__file__)
    sweep_flag_main(main, __doc__)

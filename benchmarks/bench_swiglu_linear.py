"""SwiGLU + down projection (``swiglu_linear``), the MLP's second half in the gradient pass, where
its backward can run the SwiGLU gradient as the epilogue of the dact matmul: triton (forward: the
``swiglu`` kernel + cuBLAS; backward: the fused kernel, forced on here) vs eager
(``F.linear(swiglu_reference(gate_up), W)``) vs torch.compile of that eager code; plus the fused
backward against the model's default path (cuBLAS for dact + the SwiGLU backward kernel).

gate_up [M, 2I], W [N, I]. Bytes (the floor we count) of the backward alone: dy and W read,
gate_up read, dgate_up written, act read for dW (2 x (M N + N I + 4 M I + M I)); forward +
backward adds reading gate_up and writing act and y. FLOPs: 2 M N I forward, twice that backward.

    python benchmarks/bench_swiglu_linear.py [--sweep]   # markdown tables; --sweep: tiles
    python -m pytest benchmarks/bench_swiglu_linear.py   # pytest-benchmark
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # as a script: the repository importable

from benchmarks.common import (PROVIDERS, Case, against_unfused, bench_case, fused_op_report, grad_fn,  # noqa: E402
                               require_cuda, sweep_flag_main, tile_sweep)
from hrm_kernels import swiglu_linear, swiglu_linear_reference, use_backend  # noqa: E402
from hrm_kernels.swiglu import swiglu_backward  # noqa: E402

kernel_module = importlib.import_module("hrm_kernels.swiglu_linear")

SHAPES = [(768 * 82, 1536, 512), (96 * 901, 1536, 512)]  # (M, I, N): HRM's Sudoku and ARC batches
MODES = ("bwd", "fwd+bwd")


@contextlib.contextmanager
def fused_backward(on: bool):
    saved = kernel_module.FUSED_BACKWARD
    kernel_module.FUSED_BACKWARD = on
    try:
        yield
    finally:
        kernel_module.FUSED_BACKWARD = saved


def _inputs(m, i, n, dtype=torch.bfloat16):
    gate_up = (torch.randn(m, 2 * i, device="cuda", dtype=dtype) * 2).requires_grad_()
    weight = (torch.randn(n, i, device="cuda") / i ** 0.5).to(dtype).requires_grad_()
    return gate_up, weight, torch.randn(m, n, device="cuda", dtype=dtype)


def _triton(gate_up, weight):
    with use_backend("triton"):
        return swiglu_linear(gate_up, weight)


def _fused_grad(call):
    """``call`` (a grad_fn callable) with the fused backward on, for the triton provider."""
    def run():
        with fused_backward(True):
            return call()
    return run


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(swiglu_linear_reference, dynamic=False)


def _bytes(m: int, i: int, n: int, mode: str) -> int:
    bwd = m * n + n * i + 4 * m * i + m * i
    return 2 * (bwd if mode == "bwd" else bwd + 2 * m * i + m * i + m * n + n * i)


def _label(shape) -> str:
    return "x".join(map(str, shape))


def cases() -> list[Case]:
    out = []
    for m, i, n in SHAPES:
        gate_up, weight, dy = _inputs(m, i, n)
        impls = {"triton": _triton, "eager": swiglu_linear_reference, "compile": _compiled()}
        for mode in MODES:
            fns = {p: grad_fn(functools.partial(impls[p], gate_up, weight), [gate_up, weight], mode, dy)
                   for p in PROVIDERS}
            fns["triton"] = _fused_grad(fns["triton"])
            flops = 2 * m * n * i * (2 if mode == "bwd" else 3)
            out.append(Case("swiglu_linear", _label((m, i, n)), mode, _bytes(m, i, n, mode), fns, flops=flops))
    return out


@pytest.fixture(scope="module")
def all_cases():
    return {c.id: c for c in cases()}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_id", [f"swiglu_linear-{_label(s)}-{mode}" for s in SHAPES for mode in MODES])
def test_swiglu_linear(benchmark, all_cases, case_id, provider):
    bench_case(benchmark, all_cases[case_id], provider)


def _dgate_up_calls(m, i, n):
    """(fused kernel, cuBLAS + swiglu backward) computing dgate_up from the same inputs."""
    gate_up, weight, dy = (t.detach() for t in _inputs(m, i, n))
    return (functools.partial(kernel_module._fused_backward, dy, weight, gate_up),
            lambda: swiglu_backward(dy @ weight, gate_up))


def against_model_path(shapes=SHAPES) -> str:
    """dgate_up: the fused kernel against the model's default (cuBLAS + SwiGLU backward kernel)."""
    return against_unfused([(_label(s), *_dgate_up_calls(*s), 2 * s[0] * s[1] * s[2]) for s in shapes],
                           "cuBLAS dact + swiglu backward")


def sweep(shapes=SHAPES[:1], configs=None) -> str:
    """GPU time of the fused dgate_up per (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages,
    TMA_EPILOGUE, programs per SM or 0, WARP_SPECIALIZE)."""
    configs = configs or [(64, 128, 64, 4, 4, False, 0, False), (128, 64, 64, 4, 4, False, 0, False),
                          (128, 128, 64, 8, 3, False, 0, False), (128, 128, 64, 8, 3, True, 1, False),
                          (128, 128, 64, 8, 3, False, 1, True), (128, 256, 64, 8, 3, False, 0, False)]
    return tile_sweep(kernel_module, "CUDA_CONFIG", configs, shapes, lambda shape: _dgate_up_calls(*shape)[0])


def main(do_sweep: bool = False) -> str:
    return fused_op_report("SwiGLU + down projection (swiglu_linear, fused backward on), bf16", "swiglu_linear",
                           cases(), against_model_path, "the model's default backward (cuBLAS + swiglu backward)",
                           sweep if do_sweep else None)


if __name__ == "__main__":
    require_cuda(__file__)
    sweep_flag_main(main, __doc__)

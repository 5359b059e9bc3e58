"""gate_up projection + SwiGLU (``linear_swiglu``): the fused Triton kernel against cuBLAS + the
eager activation and torch.compile of that. x [M, K] @ W[2I, K]^T, then ``silu(gate) * up``.

FLOP: 2·M·K·2I forward, three times that forward + backward. Bytes (the floor we count): forward
reads x and W and writes the [M, I] result; forward + backward adds writing and reading the
[M, 2I] gate_up once, reading dout, writing dx and dW and reading x again.

    python benchmarks/bench_linear_swiglu.py           # markdown table
    python -m pytest benchmarks/bench_linear_swiglu.py    # pytest-benchmark
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # as a script: the repository importable

from benchmarks.common import (PROVIDERS, Case, bench_case,  # noqa: E402
                               grad_fn, markdown_table, require_cuda, run_cases)
from hrm_kernels import linear_swiglu, linear_swiglu_reference, use_backend  # noqa: E402

SHAPES = [(768 * 82, 512, 1536), (96 * 901, 512, 1536)]  # (M, K, I): HRM's Sudoku and ARC batches
MODES = ("fwd", "fwd+bwd")


def _triton(x, w):
    with use_backend("triton"):
        return linear_swiglu(x, w)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(linear_swiglu_reference, dynamic=False)


def _bytes(m: int, k: int, i: int, mode: str, itemsize: int) -> int:
    fwd = m * k + 2 * i * k + m * i
    if mode == "fwd":
        return fwd * itemsize
    return (fwd + 2 * (2 * m * i) + m * i + 2 * m * k + 2 * i * k) * itemsize


def cases(dtype=torch.bfloat16) -> list[Case]:
    out = []
    for m, k, i in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
        w = (torch.randn(2 * i, k, device="cuda") / k ** 0.5).to(dtype).requires_grad_()
        dout = torch.randn(m, i, device="cuda", dtype=dtype)
        impls = {"triton": _triton, "eager": linear_swiglu_reference, "compile": _compiled()}
        for mode in MODES:
            fns = {p: grad_fn(functools.partial(impls[p], x, w), [x, w], mode, dout) for p in PROVIDERS}
            flops = 2 * m * k * 2 * i * (1 if mode == "fwd" else 3)
            out.append(Case("linear_swiglu", f"{m}x{k}x2x{i}", mode, _bytes(m, k, i, mode, x.element_size()),
                            fns, flops=flops))
    return out


@pytest.fixture(scope="module")
def all_cases():
    return {c.id: c for c in cases()}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_id", [f"linear_swiglu-{m}x{k}x2x{i}-{mode}" for m, k, i in SHAPES for mode in MODES])
def test_linear_swiglu(benchmark, all_cases, case_id, provider):
    bench_case(benchmark, all_cases[case_id], provider)


def main() -> str:
    table = markdown_table(run_cases(cases(), "linear_swiglu"),
                           "gate_up projection + SwiGLU (linear_swiglu), bf16")
    print(table)
    return table


if __name__ == "__main__":
    require_cuda(__file__, parses_args=False)
    main()

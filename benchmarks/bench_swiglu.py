"""SwiGLU activation ``silu(gate) * up`` over [M, 2I]: fwd, bwd, fwd+bwd; triton vs eager vs
torch.compile of the eager code. Bytes: forward reads 2I and writes I, backward reads I + 2I and
writes 2I per row: 3 + 5 = 8 passes of [M, I] in the activation dtype.

    python benchmarks/bench_swiglu.py           # markdown table
    python -m pytest benchmarks/bench_swiglu.py    # pytest-benchmark
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
from hrm_kernels import swiglu, swiglu_reference, use_backend  # noqa: E402

SHAPES = [(768 * 82, 1536), (96 * 901, 1536)] + [(8192, i) for i in (1024, 2048, 4096, 8192)]
MODES = ("fwd", "bwd", "fwd+bwd")
PASSES = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}


def _triton(gate_up):
    with use_backend("triton"):
        return swiglu(gate_up)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(swiglu_reference, dynamic=False)


def cases(dtype=torch.bfloat16) -> list[Case]:
    out = []
    for m, i in SHAPES:
        gate_up = torch.randn(m, 2 * i, device="cuda", dtype=dtype, requires_grad=True)
        dout = torch.randn(m, i, device="cuda", dtype=dtype)
        impls = {"triton": _triton, "eager": swiglu_reference, "compile": _compiled()}
        for mode in MODES:
            fns = {p: grad_fn(functools.partial(impls[p], gate_up), [gate_up], mode, dout) for p in PROVIDERS}
            out.append(Case("swiglu", f"{m}x2x{i}", mode, PASSES[mode] * m * i * gate_up.element_size(), fns))
    return out


@pytest.fixture(scope="module")
def all_cases():
    return {c.id: c for c in cases()}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_id", [f"swiglu-{m}x2x{i}-{mode}" for m, i in SHAPES for mode in MODES])
def test_swiglu(benchmark, all_cases, case_id, provider):
    bench_case(benchmark, all_cases[case_id], provider)


def main() -> str:
    table = markdown_table(run_cases(cases(), "swiglu"), "SwiGLU activation silu(gate) * up, bf16")
    print(table)
    return table


if __name__ == "__main__":
    require_cuda(__file__, parses_args=False)
    main()

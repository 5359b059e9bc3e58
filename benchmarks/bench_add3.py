"""The ungated module input ``a + (b + c)`` over [M, D]: forward only (its backward hands the
output's gradient to the three inputs, no kernel); triton vs eager vs torch.compile of the eager
code. Bytes: three reads and one write of [M, D] in the activation dtype (eager's two adds move six).

    python benchmarks/bench_add3.py           # markdown table
    python -m pytest benchmarks/bench_add3.py    # pytest-benchmark
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # as a script: the repository importable

from benchmarks.common import PROVIDERS, Case, bench_case, markdown_table, require_cuda, run_cases  # noqa: E402
from hrm_kernels import add3, add3_reference, use_backend  # noqa: E402

SHAPES = [(768 * 82, 512), (96 * 901, 512), (8192, 4096)]


def _triton(a, b, c):
    with use_backend("triton"):
        return add3(a, b, c)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(add3_reference, dynamic=False)


def cases(dtype=torch.bfloat16) -> list[Case]:
    out = []
    for m, d in SHAPES:
        a, b, c = (torch.randn(m, d, device="cuda", dtype=dtype) for _ in range(3))
        impls = {"triton": _triton, "eager": add3_reference, "compile": _compiled()}
        fns = {p: functools.partial(impls[p], a, b, c) for p in PROVIDERS}
        out.append(Case("add3", f"{m}x{d}", "fwd", 4 * m * d * a.element_size(), fns))
    return out


@pytest.fixture(scope="module")
def all_cases():
    return {c.id: c for c in cases()}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_id", [f"add3-{m}x{d}-fwd" for m, d in SHAPES])
def test_add3(benchmark, all_cases, case_id, provider):
    bench_case(benchmark, all_cases[case_id], provider)


def main() -> str:
    table = markdown_table(run_cases(cases(), "add3"), "add3: a + (b + c) (ungated module input), bf16")
    print(table)
    return table


if __name__ == "__main__":
    require_cuda(__file__, parses_args=False)
    main()

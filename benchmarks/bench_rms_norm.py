"""add+RMSNorm as HRM uses it (residual, no weight): fwd, bwd, fwd+bwd; triton vs eager vs
torch.compile of the eager code. Bytes: 3 passes of [M, N] forward (x, residual in; y out),
3 backward (dy, y in; dh out), in the activation dtype.

    python benchmarks/bench_rms_norm.py          # markdown table
    python -m pytest benchmarks/bench_rms_norm.py   # pytest-benchmark
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
from hrm_kernels import rms_norm, rms_norm_reference, use_backend  # noqa: E402

SHAPES = [(768 * 82, 512), (96 * 901, 512)] + [(8192, n) for n in (1024, 2048, 4096, 8192)]
MODES = ("fwd", "bwd", "fwd+bwd")
PASSES = {"fwd": 3, "bwd": 3, "fwd+bwd": 6}


def _triton(x, r):
    with use_backend("triton"):
        return rms_norm(x, residual=r)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(lambda x, r: rms_norm_reference(x, residual=r), dynamic=False)


def cases(dtype=torch.bfloat16) -> list[Case]:
    out = []
    for m, n in SHAPES:
        x = torch.randn(m, n, device="cuda", dtype=dtype, requires_grad=True)
        r = torch.randn(m, n, device="cuda", dtype=dtype, requires_grad=True)
        dy = torch.randn(m, n, device="cuda", dtype=dtype)
        impls = {"triton": _triton, "eager": lambda x, r: rms_norm_reference(x, residual=r),
                 "compile": _compiled()}
        for mode in MODES:
            fns = {p: grad_fn(functools.partial(impls[p], x, r), [x, r], mode, dy) for p in PROVIDERS}
            out.append(Case("rms_norm", f"{m}x{n}", mode, PASSES[mode] * m * n * x.element_size(), fns))
    return out


@pytest.fixture(scope="module")
def all_cases():
    return {c.id: c for c in cases()}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_id", [f"rms_norm-{m}x{n}-{mode}" for m, n in SHAPES for mode in MODES])
def test_rms_norm(benchmark, all_cases, case_id, provider):
    bench_case(benchmark, all_cases[case_id], provider)


def main() -> str:
    table = markdown_table(run_cases(cases(), "rms_norm"), "add+RMSNorm (residual, no weight), bf16")
    print(table)
    return table


if __name__ == "__main__":
    require_cuda(__file__, parses_args=False)
    main()

"""Benchmarks run on CUDA only; on a CPU machine every benchmark is skipped with the reason."""

from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU (Triton kernels are timed on-device)")
    here = Path(__file__).parent
    for item in items:  # this hook sees the whole session's items: mark only the benchmarks
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)

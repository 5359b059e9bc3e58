"""Benchmarks run on CUDA only; on a CPU machine every benchmark is skipped with the reason."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU (Triton kernels are timed on-device)")
    for item in items:
        item.add_marker(skip)

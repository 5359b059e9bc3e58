"""Test setup. Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be
switched on before any kernel module is imported: this file is loaded before the tests."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

CUDA = torch.cuda.is_available()
# Kernel tests run on CUDA when there is one, else on CPU tensors through the interpreter.
DEVICE = torch.device("cuda" if CUDA else "cpu")

requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test, the same in every run (a CRC of the test's id, not ``hash``,
    which Python salts per process): fresh random inputs per test, and a failure replays."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def record_calls(monkeypatch, module, name: str, with_kwargs: bool = False) -> list:
    """Replace ``module.<name>`` by a wrapper that appends its first argument (or True) to the
    returned list on each call, then calls the original: tests check that a kernel really ran.
    ``with_kwargs``: append ``(first argument, keyword arguments)`` instead."""
    original = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        first = args[0] if args and callable(args[0]) else True
        calls.append((first, kwargs) if with_kwargs else first)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def pytest_addoption(parser):
    parser.addoption("--shard", action="append", default=[], metavar="FILE:I/N",
                     help="run only every N-th test of FILE (a test file's name), starting at the I-th "
                          "(0-based), in collection order; repeatable; other files' tests are untouched "
                          "(tests/run_gpu.sh splits its heaviest files over processes with it)")


def pytest_collection_modifyitems(config, items):
    shards = {}
    for spec in config.getoption("shard"):
        try:
            name, part = spec.rsplit(":", 1)
            index, count = (int(v) for v in part.split("/"))
            if not 0 <= index < count:
                raise ValueError
        except ValueError:
            raise pytest.UsageError(f"--shard {spec!r}: expected FILE:I/N with 0 <= I < N, e.g. "
                                    "test_gated_blend.py:0/2") from None
        shards[name] = (index, count)
    if not shards:
        return
    seen, keep, dropped = {}, [], []
    for item in items:
        name = item.path.name
        if name in shards:
            index, count = shards[name]
            position = seen[name] = seen.get(name, -1) + 1
            if position % count != index:
                dropped.append(item)
                continue
        keep.append(item)
    config.hook.pytest_deselected(items=dropped)
    items[:] = keep

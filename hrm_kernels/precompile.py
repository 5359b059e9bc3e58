"""Compile ahead: the Triton kernels a piece of work launches, compiled all at once on a thread pool.

With empty caches, a first training step compiles each kernel variant it meets one after another
(about 18 variants of about 1.2 s each on an H100 host: 20-24 s before the first step ends).
Inside ``with compile_ahead():`` every launch of this package's kernels queues that kernel's
compilation on a thread pool (Triton's ``AsyncCompileMode``) instead of running it; leaving the
block waits for all of them and puts them in the kernels' caches, so the real run that follows
starts with every variant compiled. The pool also builds each variant's host launcher: some
Triton versions (3.6 among them) compile a small C module per kernel signature with the system C
compiler at the kernel's first launch, on the launching thread (about 0.3 s each, 4.6 s of a gated
HRM's first step on an H100 host); built on the pool, the first launch finds it in Triton's cache::

    with compile_ahead():
        dry_run_on_copies()   # the same shapes, dtypes and options as the real work
    real_work()               # no compilation left for these kernels

Inside the block the kernels' outputs are **not computed**: their buffers hold whatever memory
held, and everything computed from them is garbage. Run only throwaway copies of the model and
optimizer state there. Torch's own ops still run (on that garbage). Compilations that do not
depend on the launch arguments' values (all of this package's) are exactly those of the real run.

Without CUDA, or under the Triton interpreter, the block just runs its body: nothing is compiled
ahead, and the kernels run as usual.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import triton

from hrm_kernels.backend import triton_interpreting

# The AsyncCompileMode of the open compile_ahead block. A module global, not a context variable:
# the backward's kernels are launched from autograd's device threads, which must see it too. So
# while a block is open, launches from *any* thread only compile: run nothing else meanwhile.
_active: Optional["triton.AsyncCompileMode"] = None


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; inside ``compile_ahead``, queue its compilation instead."""
    mode = _active
    if mode is None:
        kernel[grid](*args, **kwargs)
        return
    from triton.runtime import _async_compile

    if _async_compile.active_mode.get() is mode:
        kernel.warmup(*args, grid=grid, **kwargs)
        return
    # Another thread (autograd's, for the backward): Triton reads the mode from a context variable.
    token = _async_compile.active_mode.set(mode)
    try:
        kernel.warmup(*args, grid=grid, **kwargs)
    finally:
        _async_compile.active_mode.reset(token)


def compiling_ahead() -> bool:
    """Whether a ``compile_ahead`` block is open (its launches compile and run nothing)."""
    return _active is not None


def available() -> bool:
    """Whether compile_ahead compiles anything here: CUDA, real Triton (not its interpreter), and
    a Triton with ``AsyncCompileMode`` (3.4 or newer)."""
    return torch.cuda.is_available() and not triton_interpreting() and hasattr(triton, "AsyncCompileMode")


def _build_launcher(kernel) -> None:
    """Build ``kernel``'s host launcher once (a ``CompiledKernel``), which puts the module Triton
    compiles for it (if this Triton version compiles one) in Triton's cache. Best effort: if this
    Triton's internals differ, the first launch builds it instead, as without compile_ahead."""
    try:
        from triton.runtime import driver

        driver.active.launcher_cls(kernel.src, kernel.metadata)
    except Exception:  # noqa: BLE001 - an optimisation only; the real launch reports real errors
        pass


class _CompileAndBuildLauncher(Executor):
    """The executor AsyncCompileMode submits each kernel's compilation to: runs it on ``pool``,
    then builds the compiled kernel's launcher on the same worker (``_build_launcher``)."""

    def __init__(self, pool: Executor, build=_build_launcher):
        self.pool, self.build = pool, build

    def submit(self, fn, /, *args, **kwargs) -> Future:
        def compile_then_build():
            kernel = fn(*args, **kwargs)
            self.build(kernel)
            return kernel

        return self.pool.submit(compile_then_build)

    def shutdown(self, wait: bool = True, **kwargs) -> None:
        self.pool.shutdown(wait=wait, **kwargs)


@dataclass
class CompiledAhead:
    """What a compile_ahead block did: kernel variants compiled, and the block's seconds."""

    kernels: int = 0
    seconds: float = 0.0


@contextmanager
def compile_ahead(workers: Optional[int] = None) -> Iterator[CompiledAhead]:
    """Queue the compilation of every kernel launched inside the block on ``workers`` threads
    (default: the CPU count) and wait for all of them at the end. Yields a ``CompiledAhead``,
    filled in when the block ends. See the module docstring: the kernels inside do not run."""
    global _active
    done = CompiledAhead()
    if not available() or _active is not None:  # nothing to compile ahead, or already inside one
        yield done
        return
    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1, thread_name_prefix="hrm-compile")
    try:
        with triton.AsyncCompileMode(_CompileAndBuildLauncher(pool)) as mode:
            _active = mode
            try:
                yield done
            finally:
                _active = None
        done.kernels = len(mode.future_kernels)  # variants not yet loaded here (a disk-cache hit counts, quickly)
    finally:
        pool.shutdown(wait=True)
        done.seconds = time.perf_counter() - start

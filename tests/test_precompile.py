"""hrm_kernels.precompile.compile_ahead: launches become queued compilations inside the block (on every thread), real
launches outside it; without CUDA the block only runs its body."""

from __future__ import annotations

import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import hrm_kernels.precompile as ca
from hrm_kernels import compile_ahead, rms_norm, rms_norm_reference, use_backend
from tests.conftest import CUDA
from tests.reference64 import rms_norm64
from tests.tolerance import assert_close_to_reference

triton_async = pytest.importorskip("triton.runtime._async_compile")


class FakeKernel:
    """Records how it was called, and which AsyncCompileMode Triton would have seen then."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(("launch", grid, args, kwargs, None))

    def warmup(self, *args, grid, **kwargs):
        self.calls.append(("warmup", grid, args, kwargs, triton_async.active_mode.get()))


def test_launch_outside_the_block_launches():
    kernel = FakeKernel()
    ca.launch(kernel, (3,), 1, 2, BLOCK=4)
    assert kernel.calls == [("launch", (3,), (1, 2), {"BLOCK": 4}, None)]


def test_launch_inside_queues_a_compilation_on_every_thread(monkeypatch):
    """The backward's kernels are launched from autograd's threads: they must see the mode too,
    and the launching thread's own context must be left as it was."""
    mode = object()
    monkeypatch.setattr(ca, "_active", mode)
    kernel = FakeKernel()
    token = triton_async.active_mode.set(mode)  # the block's own thread, as AsyncCompileMode sets it
    try:
        ca.launch(kernel, (5,), "x", BLOCK=8)
    finally:
        triton_async.active_mode.reset(token)
    after = []
    worker = threading.Thread(target=lambda: (ca.launch(kernel, (7,), "y"),
                                              after.append(triton_async.active_mode.get())))
    worker.start()
    worker.join()
    assert kernel.calls == [("warmup", (5,), ("x",), {"BLOCK": 8}, mode), ("warmup", (7,), ("y",), {}, mode)]
    assert after == [None]


def test_each_compilation_also_builds_its_launcher_on_the_pool():
    """The pool's workers compile, then build the compiled kernel's launcher (Triton 3.6 runs a C
    compiler for it), so the first real launch on the main thread finds it built. A failed
    compilation builds nothing and reaches AsyncCompileMode as the future's error."""
    built = []
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-compile")
    executor = ca._CompileAndBuildLauncher(pool, build=lambda k: built.append((k, threading.current_thread().name)))
    kernel = object()
    assert executor.submit(lambda x: (x, kernel), 7).result() == (7, kernel)
    assert built == [((7, kernel), built[0][1])] and built[0][1].startswith("test-compile")

    def broken():
        raise ValueError("compile error")

    with pytest.raises(ValueError, match="compile error"):
        executor.submit(broken).result()
    assert len(built) == 1
    executor.shutdown()
    with pytest.raises(RuntimeError):  # shut down: the pool takes no more work
        executor.submit(lambda: None)


class FakeDriver:
    """Stands in for Triton's active driver: records the launchers built, or fails to build."""

    def __init__(self, error=None):
        self.built, self.error = [], error

    def launcher_cls(self, src, metadata):
        if self.error:
            raise self.error
        self.built.append((src, metadata))


def test_launcher_build_is_best_effort(monkeypatch):
    """The compiled kernel's src and metadata go to the active driver's launcher; a kernel without
    them, or a driver that fails, builds nothing and raises nothing."""
    from triton.runtime import driver

    kernel = type("Compiled", (), {"src": "src", "metadata": {"name": "k"}})()
    for fake, want in ((FakeDriver(), [("src", {"name": "k"})]), (FakeDriver(RuntimeError("no cc")), [])):
        monkeypatch.setattr(driver, "_active", fake)
        ca._build_launcher(kernel)
        ca._build_launcher(object())  # no src/metadata
        assert fake.built == want


@pytest.mark.skipif(CUDA, reason="the CPU behaviour: nothing to compile ahead")
def test_without_cuda_the_block_runs_its_body():
    x, h = torch.randn(5, 37), torch.randn(5, 37)
    with use_backend("triton"), compile_ahead() as done:
        out = rms_norm(x, residual=h)
    torch.testing.assert_close(out, rms_norm_reference(x, residual=h), atol=1e-5, rtol=1e-5)
    assert (done.kernels, done.seconds) == (0, 0.0) and not ca.available() and ca._active is None


@pytest.mark.skipif(not CUDA, reason="needs CUDA (real Triton compilation)")
def test_cuda_kernels_compile_ahead_then_run(tmp_path, monkeypatch):
    """With an empty Triton cache: the block compiles (the variants show up in its count), its
    outputs are not computed, and the same call afterwards runs the compiled kernels."""
    from hrm_kernels.rms_norm import _rms_norm_forward_kernel

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    _rms_norm_forward_kernel.device_caches.clear()  # compiled variants already loaded by other tests
    x = torch.randn(333, 123, device="cuda", dtype=torch.bfloat16)
    h = torch.randn_like(x)
    def loaded():  # compiled variants this kernel holds in memory
        return sum(len(caches[0]) for caches in _rms_norm_forward_kernel.device_caches.values())

    with use_backend("triton"), compile_ahead() as done:
        rms_norm(x, residual=h)
    assert done.kernels >= 1 and done.seconds > 0
    compiled = loaded()

    def no_compiler(*args, **kwargs):  # Triton 3.6 builds a launcher with the C compiler at first launch
        raise AssertionError(f"the first launch after compile_ahead ran {args}")

    with use_backend("triton"), monkeypatch.context() as m:
        m.setattr(subprocess, "check_call", no_compiler)
        m.setattr(subprocess, "run", no_compiler)
        out = rms_norm(x, residual=h)
    assert loaded() == compiled >= 1  # the real call compiled nothing more
    assert_close_to_reference("after compile_ahead", out, rms_norm_reference(x, residual=h), rms_norm64(x, residual=h))


def test_trainer_dry_run_failure_on_several_ranks_stops(monkeypatch):
    """With several ranks a failed dry run may have left the collectives out of step: it must stop
    the run (one process only warns; tests/test_train_resume.py)."""
    import hrm_kernels
    from train.distributed import DistInfo
    from train.pretrain import TrainState, compile_kernels_ahead

    def broken(*args, **kwargs):
        raise RuntimeError("broken")

    monkeypatch.setattr(hrm_kernels, "compile_ahead", broken)
    head = torch.nn.Linear(3, 3)
    state = TrainState(head=head, forward=head, optimizers=[torch.optim.SGD(head.parameters(), lr=0.1)],
                       base_lrs=[0.1], carry=None, step=0, total_steps=1)
    with pytest.raises(RuntimeError, match="precompile_kernels failed on this rank"):
        compile_kernels_ahead({}, state, {}, DistInfo(rank=1, world_size=2))


def test_dry_run_hands_back_its_cublas_workspaces():
    """``release_cublas_workspaces``: the workspace a side stream's matmul left in the caching
    allocator is freed (on the CPU the call does nothing)."""
    from train.pretrain import release_cublas_workspaces

    release_cublas_workspaces(torch.device("cpu"))
    if not CUDA:
        pytest.skip("the workspace part needs CUDA")
    a = torch.randn(257, 123, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        (a @ a.t()).sum()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    release_cublas_workspaces(torch.device("cuda"))
    assert torch.cuda.memory_allocated() < held


def test_compile_auto_means_cuda_with_the_eager_kernels(monkeypatch):
    from hrm_kernels import backend
    from train.pretrain import resolve_compile

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert resolve_compile("auto", cuda, "eager")
    assert not resolve_compile("auto", cuda, "auto") and not resolve_compile("auto", cuda, "triton")
    assert not resolve_compile("auto", cpu, "eager") and not resolve_compile("auto", cpu, "auto")
    monkeypatch.setattr(backend, "triton_available", lambda: False)  # Inductor needs Triton on CUDA too
    assert not resolve_compile("auto", cuda, "auto") and not resolve_compile("auto", cuda, "eager")
    assert resolve_compile(True, cpu, "auto") and not resolve_compile(False, cuda, "eager")


def test_auto_means_one_cuda_process_whose_model_uses_triton(monkeypatch):
    from train.pretrain import resolve_precompile

    monkeypatch.setattr(ca, "available", lambda: True)  # as on a CUDA machine with Triton >= 3.4
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_precompile("auto", "auto", cuda, world_size=1)
    assert not resolve_precompile("auto", "auto", cuda, world_size=2)  # torchrun: opt in with true
    assert not resolve_precompile("auto", "eager", cuda, world_size=1)
    assert not resolve_precompile("auto", "triton", cpu, world_size=1)
    monkeypatch.setattr(ca, "available", lambda: False)
    assert not resolve_precompile("auto", "auto", cuda, world_size=1)
    assert resolve_precompile(True, "eager", cpu, world_size=4) and not resolve_precompile(False, "auto", cuda)

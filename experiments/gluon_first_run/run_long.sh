#!/usr/bin/env bash
# Session 30's long-sequence attention (no gradient, pre-rotated q, k; hrm_kernels/_gluon_attention.py), first
# GPU run: its check script, its GPU tests, then the ungated ARC step A/B of USE_GLUON_LONG, in one device call.
set -u
source experiments/gluon_first_run/device_env.sh
start=$(date +%s)
timeout 180 python3 experiments/gluon_first_run/long_attention_check.py 2>&1 | grep -v Warn
echo "== long attention check at $(( $(date +%s) - start )) s"
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_rope_attention.py -k gluon_long 2>&1 | tail -8
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_gated_blend.py -k triton_backward_at 2>&1 | tail -3
echo "== long attention tests at $(( $(date +%s) - start )) s"
timeout 200 python3 benchmarks/bench_train_step.py --shape arc --gated 0 --providers fused --mode train \
  --switches gluon_attention_long=1 gluon_attention_long=0 gluon_attention_long=1 gluon_attention_long=0 2>&1 | grep "^| arc"
echo "== ARC A/B at $(( $(date +%s) - start )) s"
# Attention.ROPE_IN_QKV_SHORT (session 30, off): Sudoku's no-gradient blocks rotate q, k in the qkv GEMM and the
# Gluon attention kernel attends without rotating
timeout 150 python3 benchmarks/bench_train_step.py --shape sudoku --gated 0 --providers fused --mode train \
  --switches rope_in_qkv_short=1 rope_in_qkv_short=0 rope_in_qkv_short=1 rope_in_qkv_short=0 2>&1 | grep "^| sudoku"
echo "== Sudoku A/B at $(( $(date +%s) - start )) s"

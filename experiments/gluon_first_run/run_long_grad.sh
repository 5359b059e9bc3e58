#!/usr/bin/env bash
# Session 32's with-gradient paths for ARC, first GPU run, in one device call: the long attention with
# a gradient (the Gluon forward keeping each query's log-sum-exp, then cuDNN's SDPA backward;
# rope_attention.USE_GLUON_LONG_GRAD, off) and RoPE in the with-gradient qkv GEMM
# (Attention.ROPE_IN_QKV_GRAD, off): their GPU tests, then the ARC step A/Bs.
set -u
source experiments/gluon_first_run/device_env.sh
start=$(date +%s)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_rope_attention.py -k "gluon_long" 2>&1 | tail -8
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_block_residual_grad.py 2>&1 | tail -4
echo "== tests at $(( $(date +%s) - start )) s"
# rope_attention.USE_GLUON_LONG is off until the tests above pass on the three-view kernel: the A/Bs
# below turn it on themselves (first its own A/B, then the with-gradient paths on top of it).
L=gluon_attention_long=1
for gated in 0 1; do  # one process each, each timed on its own; the per-run dict lines survive a timeout
  timeout 200 python3 benchmarks/bench_train_step.py --shape arc --gated $gated --providers fused --mode train \
    --switches $L gluon_attention_long=0 $L,gluon_attention_long_grad=1 $L $L,gluon_attention_long_grad=1 \
    2>&1 | grep -E "^\| arc|'shape': 'arc'"
  echo "== ARC gated=$gated A/B at $(( $(date +%s) - start )) s"
done
# Attention.ROPE_IN_QKV_GRAD (session 32, off): q, k rotated in the with-gradient qkv GEMM's epilogue
timeout 200 python3 benchmarks/bench_train_step.py --shape arc --gated 0 --providers fused --mode train \
  --switches $L,rope_in_qkv_grad=1 $L $L,rope_in_qkv_grad=1 $L 2>&1 | grep -E "^\| arc|'shape': 'arc'"
echo "== ARC rope_in_qkv_grad A/B at $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# Session 43: first GPU run of the software-pipelined consumers of the Gluon gated blend kernels
# (gated_blend.PIPELINE_GLUON_FORWARD / _DPRE / _MAIN, off). One device call (about 6 minutes):
# check_43.py (bits against the default forms, kernel and op timings), then the Gluon gated blend
# GPU tests, the pipelined forms' own among them. Turn a switch on only where its kernel gives the
# same bits and is faster; then run the gated training-step A/B:
#   python benchmarks/bench_train_step.py --shape sudoku arc --gated 1 --providers fused --precompile \
#     --switches default gluon_gated_blend_main_pipelined=1 ...
set -u
source experiments/gluon_first_run/device_env.sh
start=$(date +%s)
timeout 330 python3 experiments/gluon_first_run/check_43.py 2>&1 | grep -v Warning
echo "== check at $(( $(date +%s) - start )) s"
timeout $(( 570 - $(date +%s) + start )) python3 -m pytest -q -p no:cacheprovider tests/test_gated_blend.py \
  -k "pipelined or gluon_main_matches or gluon_forward_store or dpre_with_triton" 2>&1 | tail -6
echo "== tests at $(( $(date +%s) - start )) s"

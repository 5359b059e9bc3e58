#!/usr/bin/env bash
# Session 43: first GPU run of the software-pipelined consumers of the Gluon gated blend kernels
# (gated_blend.PIPELINE_GLUON_FORWARD / _DPRE / _MAIN, off). One device call (about 8 minutes):
#   1. the pipelined forms' own GPU test first (bits against the default forms, bf16 and fp16, 3
#      programs and one row split; then the op with the switches on against float64);
#   2. check_43.py (bits at more shapes, each kernel's time default against pipelined, the op against
#      torch.compile; it names each kernel before running it, so a hang shows where);
#   3. the other Gluon gated blend GPU tests, with what time is left.
# Turn a switch on only where its kernel gives the same bits and is faster; then run the gated
# training-step A/B:
#   python benchmarks/bench_train_step.py --shape sudoku arc --gated 1 --providers fused --precompile \
#     --switches default gluon_gated_blend_main_pipelined=1 ...
set -u
start=$(date +%s)
source experiments/gluon_first_run/device_env.sh
timeout 200 python3 -m pytest -q -x -p no:cacheprovider \
  "tests/test_gated_blend.py::test_gluon_pipelined_forms_give_the_same_bits" 2>&1 | tail -6
echo "== pipelined test at $(( $(date +%s) - start )) s"
timeout 230 python3 experiments/gluon_first_run/check_43.py 2>&1 | grep -v Warning
echo "== check at $(( $(date +%s) - start )) s"
timeout $(( 580 - $(date +%s) + start )) python3 -m pytest -q -p no:cacheprovider tests/test_gated_blend.py \
  -k "gluon_main_matches or gluon_forward_store or dpre_with_triton" 2>&1 | tail -6
echo "== tests at $(( $(date +%s) - start )) s"

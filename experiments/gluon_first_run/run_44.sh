#!/usr/bin/env bash
# Session 44: the first GPU run of gated_blend's weight-gradient sums in one Triton kernel
# (gated_blend.FUSED_WEIGHT_SUMS), one device call of at most about 9 minutes: weight_sums_check.py
# (accuracy at the real calls, the sums alone and the op fwd+bwd against torch.compile with the
# switch on and off, peak memory, a per-kernel profile), then the gated blend's GPU tests that reach
# the sums, with the switch turned on in the machine's copy of the tree. CHECK, BUDGET: seconds for
# the check script and for everything; TESTS: a pytest -k.
set -u
start=$(date +%s)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout ${CHECK:-300} python3 experiments/gluon_first_run/weight_sums_check.py 2>&1 | grep -v -i warn
echo "== check at $(( $(date +%s) - start )) s"
# the tests with the switch on (in this copy of the tree only)
sed -i 's/^FUSED_WEIGHT_SUMS = False/FUSED_WEIGHT_SUMS = True/' hrm_kernels/gated_blend.py
grep -n '^FUSED_WEIGHT_SUMS' hrm_kernels/gated_blend.py
left=$(( ${BUDGET:-560} - $(date +%s) + start )); left=$(( left > 1 ? left : 1 ))
timeout $left python3 -m pytest -v -p no:cacheprovider tests/test_gated_blend.py -k "${TESTS:-weight_grads or \
  fused_weight_sums or gluon_main_matches or dpre_with_triton or forward_store or cuda_full_size or triton_backward_at}" \
  > $OUT/tests.log 2>&1
echo "pytest rc=$? passed $(grep -c ' PASSED' $OUT/tests.log) skipped $(grep -c ' SKIPPED' $OUT/tests.log) failed $(grep -c -E ' FAILED| ERROR' $OUT/tests.log)"
grep -E ' FAILED| ERROR' $OUT/tests.log | head; tail -3 $OUT/tests.log
echo "== tests at $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# Session 45: the second device call of the next GPU session (after run_44.sh), at most about 9
# minutes: the Gluon GEMM's GPU tests, fp16 included (session 45 rounds the fp16 SwiGLU epilogue in
# explicit cvt.rn.f16x2.f32 pairs, untested on a GPU), then gluon_knobs.py (the Gluon gated-blend
# constants one at a time) with what is left. BUDGET: seconds for everything.
set -u
start=$(date +%s)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_linear_swiglu.py -k gluon > $OUT/gemm_tests.log 2>&1
echo "gluon GEMM tests rc=$?: $(tail -1 $OUT/gemm_tests.log)"
grep -E "FAILED|ERROR" $OUT/gemm_tests.log | head
echo "== tests at $(( $(date +%s) - start )) s"
left=$(( ${BUDGET:-560} - $(date +%s) + start - 20 )); left=$(( left > 30 ? left : 30 ))
timeout $(( left + 15 )) python3 experiments/gluon_first_run/gluon_knobs.py --budget $left 2>&1 | grep -v -i warn | tee $OUT/knobs.log | tail -75
echo "== knobs at $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# Session 37's kernel changes, written without a GPU and off (README.md here): their first GPU run, in two
# device calls (bash experiments/gluon_first_run/run_37.sh 1, then 2 on the same machine).
#   1: check_37.py (the packed conversions' bits and times against the library as it is; the long attention's
#      variants), then with everything that passed turned on (in this copy of the tree), the GPU tests of the
#      kernels involved.
#   2: same-run ungated pairs, fused against eager+torch.compile (issue 7's bars), with the settings call 1
#      printed: THREE=... POLY=... PACKED=... bash experiments/gluon_first_run/run_37.sh 2
set -u
source experiments/gluon_first_run/device_env.sh
start=$(date +%s)
turn_on() {  # THREE_CONSUMERS, POLY_EXP2_QUARTERS and PACKED_CONVERSIONS set to $THREE $POLY $PACKED in this copy
  sed -i "s/^THREE_CONSUMERS = .*/THREE_CONSUMERS = $THREE/; s/^POLY_EXP2_QUARTERS = .*/POLY_EXP2_QUARTERS = $POLY/" \
    hrm_kernels/_gluon_attention.py
  sed -i "s/^    PACKED_CONVERSIONS = gl.constexpr(.*)/    PACKED_CONVERSIONS = gl.constexpr($PACKED)/" hrm_kernels/_gluon_gemm.py
  grep -n "^THREE_CONSUMERS\|^POLY_EXP2_QUARTERS\|^    PACKED_CONVERSIONS" hrm_kernels/_gluon_attention.py hrm_kernels/_gluon_gemm.py
}
if [ "${1:-1}" = 1 ]; then
  timeout 120 python3 experiments/gluon_first_run/check_37.py attention 2>&1 | grep "^attention\|CHOICE\|Error"
  timeout 150 python3 experiments/gluon_first_run/check_37.py gemm > $OUT/gemm.log 2>&1
  grep "^sudoku\|^arc\|Error" $OUT/gemm.log
  PACKED=False  # on only if all 18 calls (9 kernels x 2 shapes) ran and gave the library's bits
  [ "$(grep "^sudoku\|^arc" $OUT/gemm.log | grep -c "bits equal True")" = 18 ] && PACKED=True
  read THREE POLY < <(cat $OUT/choice.txt 2>/dev/null || echo "False 0")
  echo "== checks at $(( $(date +%s) - start )) s: THREE=$THREE POLY=$POLY PACKED=$PACKED (pass these to call 2)"
  turn_on
  timeout $(( 580 - $(date +%s) + start )) python3 -m pytest -q -p no:cacheprovider tests/test_rope_attention.py \
    tests/test_deferred_norm.py tests/test_linear_swiglu.py tests/test_swiglu_linear.py tests/test_gated_blend.py \
    -k "gluon or rope_epilogue or keep" 2>&1 | tail -6
  echo "== tests at $(( $(date +%s) - start )) s"
else  # THREE=True POLY=0 PACKED=True bash experiments/gluon_first_run/run_37.sh 2 (call 1's line)
  : "${THREE:?}" "${POLY:?}" "${PACKED:?}"
  turn_on
  timeout 580 python3 benchmarks/bench_train_step.py --shape arc sudoku --gated 0 --providers fused eager+compile \
    --mode train --precompile 2>&1 | grep "^| \|ratio\|first"
  echo "== pairs at $(( $(date +%s) - start )) s"
fi

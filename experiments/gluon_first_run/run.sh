#!/usr/bin/env bash
# For session 30, on branch gluon-all (every session-29 Gluon kernel): their check scripts and GPU tests in one call.
set -u
source experiments/gluon_first_run/device_env.sh
start=$(date +%s)
timeout 150 python3 experiments/gluon_first_run/att_check29.py 2>&1 | grep -v Warn
echo "== attention check at $(( $(date +%s) - start )) s"
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_rope_attention.py -k gluon 2>&1 | tail -8
echo "== attention tests at $(( $(date +%s) - start )) s"
timeout 150 python3 experiments/gluon_first_run/gb_dpre_check.py 2>&1 | grep -v Warn
echo "== gated blend check at $(( $(date +%s) - start )) s"
timeout 120 python3 -m pytest -q -p no:cacheprovider -x tests/test_gated_blend.py -k "gluon_backward or gluon_dpre" 2>&1 | tail -8
echo "== gated blend tests at $(( $(date +%s) - start )) s"

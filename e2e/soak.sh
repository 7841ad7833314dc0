#!/usr/bin/env bash
# Runs the GitOps end-to-end test (tests/e2e_gitops.rs) N times in a row and prints how
# many passed in a row, each run's duration and the median (issue #13's acceptance: 10 in
# a row on the project's 2-core machine). Stops at the first failure: the e2e then keeps
# its lab directory (agent, Flower and controller logs) and prints its path; this script
# prints where that run's output is.
#
#   e2e/soak.sh [N]        (default 10; needs FLOWER_VENV, see e2e/test-all.sh)
#
# Heavy (about 3-4 minutes and ~1 GiB per run): run it alone. Labs of two onesims on one
# machine share VM addresses, so another e2e or lab test running at the same time (from
# any checkout) makes both fail.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10}
[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [N>0]" >&2; exit 2; }
: "${FLOWER_VENV:?set FLOWER_VENV to the pinned Flower virtualenv (e2e/test-all.sh creates target/flower-venv)}"
export FLWR_TELEMETRY_ENABLED=0

cargo nextest run --no-run --test e2e_gitops >/dev/null
out=$(mktemp -d -t e2e-soak-XXXXXX)
durations=()
passed=0
for i in $(seq 1 "$n"); do
  log="$out/run-$i.log"
  start=$(date +%s)
  if cargo nextest run --test e2e_gitops --no-capture >"$log" 2>&1; then
    secs=$(( $(date +%s) - start ))
    durations+=("$secs")
    passed=$((passed + 1))
    echo "soak: run $i passed in ${secs}s"
  else
    secs=$(( $(date +%s) - start ))
    echo "soak: run $i FAILED after ${secs}s; output: $log"
    grep -m1 "directory kept" "$log" || true
    break
  fi
done
median="-"
if (( ${#durations[@]} > 0 )); then
  median=$(printf '%s\n' "${durations[@]}" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
fi
echo "soak: $passed of $n runs passed in a row; durations (s): ${durations[*]:-none}; median ${median}s; logs in $out"
(( passed == n ))

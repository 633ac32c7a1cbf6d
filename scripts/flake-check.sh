#!/usr/bin/env bash
# Runs a test command N times in a row with a CPU-bound process beside it, to show that the
# tests do not depend on the machine being idle. Stops at the first failure.
#
#   scripts/flake-check.sh [N] [command...]     default: 10 × scripts/test.sh
#   scripts/flake-check.sh 10 cargo test --locked -p bench --test e2e
set -uo pipefail
cd "$(dirname "$0")/.."
n="${1:-10}"
shift || true
[ "$#" -gt 0 ] || set -- ./scripts/test.sh
( while :; do :; done ) &
hog=$!
trap 'kill "$hog" 2>/dev/null' EXIT
for i in $(seq 1 "$n"); do
  if ! "$@" > "/tmp/flake-check-$i.log" 2>&1; then
    echo "flake-check: run $i of $n failed (log: /tmp/flake-check-$i.log)" >&2
    exit 1
  fi
  echo "flake-check: run $i of $n passed"
done

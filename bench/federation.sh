#!/usr/bin/env bash
# bench/federation.sh: the federation figures in one command. Builds convo and
# convo-load in release, makes the federation-tests venv (Synapse from PyPI) if missing,
# then runs bench/federation.py: two Convo and two Synapse servers on loopback with real
# TLS from a throwaway CA (SQLite for all of them), the load tool's federation-fanout
# and federation-join scenarios for Convo→Convo, Convo→Synapse, Synapse→Convo and
# Synapse→Synapse, three runs each, and prints a markdown table (also written to
# $BENCH_OUT/results.md, with every run's JSON and the servers' logs).
#
# Usage: bench/federation.sh [bench/federation.py arguments...]
#   e.g. bench/federation.sh --runs 1 --scenarios fanout
# Environment:
#   BENCH_OUT          output folder (default <repo>/bench/results/federation-<UTC time>)
#   BENCH_FED_TIMEOUT_S  the whole run's limit in seconds (default 7200)
#   CARGO_TARGET_DIR   cargo target dir (default <repo>/target)
# Every server it starts is stopped on exit (the harness's teardown, then its atexit kill).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${BENCH_OUT:-$ROOT/bench/results/federation-$(date -u +%Y%m%dT%H%M%SZ)}

echo "== building convo and convo-load (release, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
(cd "$ROOT" && cargo build --release --bin convo --bin convo-load)

VENV=$ROOT/federation-tests/.venv
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$ROOT/federation-tests/requirements.txt" -c "$ROOT/federation-tests/constraints.txt"

export TEST_CONVO_BIN=$CARGO_TARGET_DIR/release/convo
mkdir -p "$OUT"
echo "== results in $OUT"
exec timeout --kill-after=30 "${BENCH_FED_TIMEOUT_S:-7200}" "$VENV/bin/python" "$ROOT/bench/federation.py" \
    --load-bin "$CARGO_TARGET_DIR/release/convo-load" --out "$OUT" "$@"

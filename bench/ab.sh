#!/usr/bin/env bash
# Compares prebuilt Convo binaries in turn, so that a VM whose speed drifts affects
# them alike: for each round, each binary is started on a fresh SQLite data dir on
# loopback and measured by the load tool with the same arguments.
#
#   bench/ab.sh ROUNDS LOAD_TOOL BINARY... -- LOAD_TOOL_ARGS...
#   e.g. bench/ab.sh 3 target/release/convo-load /tmp/convo-old /tmp/convo-new \
#          -- --scenarios sends,initial-sync,messages
#
# Results: $BENCH_OUT (default bench/results/ab)/<binary name>-<round>/convo.txt and
# .json; one summary line per run on stdout. Only the settings every Convo since issue
# 10 knows are set (open registration, no rate limits), so older commits run too.
set -u
rounds=$1; load=$2; shift 2
bins=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do bins+=("$1"); shift; done
[ $# -gt 0 ] && shift
out=${BENCH_OUT:-$(cd "$(dirname "$0")" && pwd)/results/ab}
port=${BENCH_CONVO_PORT:-18108}
ulimit -n "$(ulimit -Hn)"
for round in $(seq 1 "$rounds"); do
    for bin in "${bins[@]}"; do
        name=$(basename "$bin")
        dir=$out/$name-$round
        data=$(mktemp -d)
        mkdir -p "$dir"
        CONVO_LISTENERS__CLIENT=127.0.0.1:$port CONVO_DATA_DIR=$data CONVO_REGISTRATION__MODE=open \
            CONVO_RATE_LIMITS__ENABLED=false RUST_LOG=warn "$bin" > "$dir/convo.log" 2>&1 &
        pid=$!
        for _ in $(seq 1 150); do
            curl -fsS -o /dev/null "http://127.0.0.1:$port/_matrix/client/versions" 2>/dev/null && break
            sleep 0.2
        done
        timeout 900 "$load" --base-url "http://127.0.0.1:$port" --server-pid "$pid" --label "$name" \
            --json "$dir/convo.json" "$@" > "$dir/convo.txt" 2>&1
        kill "$pid"
        wait "$pid" 2>/dev/null
        rm -rf "$data"
        echo "$name round $round: $(grep -E '^  (sends_per_s|server_cpu_ms_per_send|median_ms|pages_per_s|server_cpu_ms_per_message|delivery_p99_ms) ' \
            "$dir/convo.txt" | awk '{printf "%s=%s ", $1, $2}')"
    done
done

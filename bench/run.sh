#!/usr/bin/env bash
# bench/run.sh: build Convo in release, then run the same load tool (convo-load) against
# Convo (SQLite, fresh data dir) and against Synapse (from PyPI, SQLite, fresh data dir),
# both on loopback. Results go to $BENCH_OUT (default bench/results/): a table (.txt)
# and JSON per server, plus machine.txt with the machine and the versions.
#
# Usage: bench/run.sh [convo-load arguments...]
#   e.g. bench/run.sh --scenarios sends,initial-sync --sends-count 500
# The arguments go to both runs; BENCH_CONVO_ARGS and BENCH_SYNAPSE_ARGS (split on
# spaces) are added for one server only, e.g. BENCH_SYNAPSE_ARGS="--fanout-rates 5,15,100"
# (do not give the same option in both places).
# Environment (none of these start with CONVO_, which Convo would read as config keys):
#   BENCH_TARGETS      "convo synapse" (default), or only one of them
#   BENCH_CONVO_ENV    extra NAME=VALUE settings (space separated) for the Convo process
#                      only, e.g. "MALLOC_MMAP_THRESHOLD_=131072" (glibc tunable)
#   BENCH_CONVO_BIN    a prebuilt convo binary to measure instead of this checkout's
#                      (e.g. an older commit built elsewhere); the load tool is still
#                      built from this checkout
#   BENCH_CONVO_PORT   loopback port for Convo (default 18108)
#   BENCH_SYNAPSE_PORT loopback port for Synapse (default 18208)
#   BENCH_OUT          output folder (default <repo>/bench/results)
#   SYNAPSE_VENV       venv for Synapse, outside the repo (default /work/synapse-venv)
#   SYNAPSE_VERSION    pip requirement for Synapse (default: matrix-synapse, latest)
#   BENCH_LOAD_BIN     a prebuilt convo-load to use (e.g. target/debug/convo-load for a
#                      quick check); with BENCH_CONVO_BIN, or without convo in
#                      BENCH_TARGETS, nothing is built
#   CARGO_TARGET_DIR   cargo target dir (default /work/target-bench, to keep off the
#                      build lock of another checkout user)
# Every process this script starts is stopped on exit (trap).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-bench}
TARGETS=${BENCH_TARGETS:-"convo synapse"}
CPORT=${BENCH_CONVO_PORT:-18108}
SPORT=${BENCH_SYNAPSE_PORT:-18208}
OUT=${BENCH_OUT:-$ROOT/bench/results}
SYNAPSE_VENV=${SYNAPSE_VENV:-/work/synapse-venv}
SYNAPSE_VERSION=${SYNAPSE_VERSION:-matrix-synapse}
WORK=$(mktemp -d /tmp/convo-bench.XXXXXX)
# 1,000 long-polling users need more than 1,024 open files in the servers and the tool:
# raise the soft limit to the hard one (the servers inherit it).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mkdir -p "$OUT"

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

wait_http() { # url, seconds
    local url=$1 tries=$(( $2 * 4 ))
    for _ in $(seq 1 "$tries"); do
        if curl -fsS -o /dev/null "$url" 2>/dev/null; then return 0; fi
        sleep 0.25
    done
    echo "no answer from $url after $2 s" >&2
    return 1
}

stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
}

if [ -n "${BENCH_LOAD_BIN:-}" ] && { [ -n "${BENCH_CONVO_BIN:-}" ] || [[ " $TARGETS " != *" convo "* ]]; }; then
    echo "== no build: load tool $BENCH_LOAD_BIN${BENCH_CONVO_BIN:+, Convo $BENCH_CONVO_BIN}"
else
    echo "== building Convo (release, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    (cd "$ROOT" && cargo build --release --bins)
fi
CONVO_BIN=${BENCH_CONVO_BIN:-$CARGO_TARGET_DIR/release/convo}
LOAD_BIN=${BENCH_LOAD_BIN:-$CARGO_TARGET_DIR/release/convo-load}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nproc: $(nproc)"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "kernel: $(uname -r)"
    if [ -n "${BENCH_CONVO_BIN:-}" ]; then echo "convo commit: not this checkout's (a prebuilt binary, below)"; fi
    echo "$([ -n "${BENCH_CONVO_BIN:-}" ] && echo checkout || echo convo) commit: $(git -C "$ROOT" rev-parse HEAD)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock migrations ':!src/bin/convo-load.rs' ':!src/bin/convo-load' 2>/dev/null || echo ' (with uncommitted server changes)')"
    echo "load tool: $(git -C "$ROOT" diff --quiet HEAD -- src/bin/convo-load.rs src/bin/convo-load 2>/dev/null && echo 'as committed' || echo 'with uncommitted changes')"
    echo "convo binary: $CONVO_BIN"
    echo "rustc: $(rustc --version)"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "load tool arguments (both): $*"
    echo "load tool arguments (convo only): ${BENCH_CONVO_ARGS:-}"
    echo "extra environment of the Convo process: ${BENCH_CONVO_ENV:-}"
    echo "load tool arguments (synapse only): ${BENCH_SYNAPSE_ARGS:-}"
} > "$OUT/machine.txt"
read -r -a CONVO_EXTRA <<< "${BENCH_CONVO_ARGS:-}"
read -r -a CONVO_ENV <<< "${BENCH_CONVO_ENV:-}"
read -r -a SYNAPSE_EXTRA <<< "${BENCH_SYNAPSE_ARGS:-}"

run_convo() {
    local data=$WORK/convo-data
    mkdir -p "$data"
    echo "== starting Convo on 127.0.0.1:$CPORT (SQLite in $data)"
    env "${CONVO_ENV[@]}" CONVO_LISTENERS__CLIENT=127.0.0.1:$CPORT CONVO_DATA_DIR=$data \
        CONVO_REGISTRATION__MODE=open CONVO_RATE_LIMITS__ENABLED=false CONVO_FEDERATION__RESOLVE_NAMES=false RUST_LOG=warn \
        "$CONVO_BIN" > "$WORK/convo.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_http "http://127.0.0.1:$CPORT/_matrix/client/versions" 30 || { cat "$WORK/convo.log"; return 1; }
    echo "== convo-load against Convo (pid $pid)"
    "$LOAD_BIN" --base-url "http://127.0.0.1:$CPORT" --server-pid "$pid" --label convo \
        --json "$OUT/convo.json" "$@" "${CONVO_EXTRA[@]}" | tee "$OUT/convo.txt" || echo "convo-load exited with $?"
    cp "$WORK/convo.log" "$OUT/convo.log"
    stop_pid "$pid"
}

install_synapse() {
    if [ ! -x "$SYNAPSE_VENV/bin/python" ] || ! "$SYNAPSE_VENV/bin/python" -c 'import synapse' 2>/dev/null; then
        echo "== installing Synapse into $SYNAPSE_VENV"
        python3 -m venv "$SYNAPSE_VENV"
        "$SYNAPSE_VENV/bin/pip" install -q --upgrade pip
        "$SYNAPSE_VENV/bin/pip" install -q "$SYNAPSE_VERSION"
    fi
}

run_synapse() {
    install_synapse
    local dir=$WORK/synapse py=$SYNAPSE_VENV/bin/python
    mkdir -p "$dir"
    echo "synapse: $("$py" -c 'import synapse; print(synapse.__version__)') (python $("$py" -c 'import platform; print(platform.python_version())'))" >> "$OUT/machine.txt"
    # Generate once for the signing key and secrets, then write our own config.
    (cd "$dir" && "$py" -m synapse.app.homeserver --server-name localhost --config-path "$dir/generated.yaml" \
        --generate-config --report-stats=no > /dev/null)
    cat > "$dir/log.yaml" <<LOG
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: $dir/homeserver.log
root:
  level: WARNING
  handlers: [file]
disable_existing_loggers: false
LOG
    local big='{per_second: 100000, burst_count: 100000}'
    {
        grep -E '^(registration_shared_secret|macaroon_secret_key|form_secret):' "$dir/generated.yaml"
        cat <<YAML
server_name: "localhost"
pid_file: $dir/homeserver.pid
listeners:
  - port: $SPORT
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: $dir/homeserver.db
log_config: $dir/log.yaml
media_store_path: $dir/media_store
signing_key_path: $dir/localhost.signing.key
report_stats: false
trusted_key_servers: []
suppress_key_server_warning: true
enable_registration: true
# Registration only (large-room registers 10,000 users): bcrypt's default 12 rounds
# take about 0.25 s of CPU per user; nothing measured hashes a password.
bcrypt_rounds: 4
enable_registration_without_verification: true
ip_range_blacklist: []
ip_range_whitelist: ['127.0.0.0/8', '::1/128']
rc_message: $big
rc_registration: $big
rc_registration_token_validity: $big
rc_login:
  address: $big
  account: $big
  failed_attempts: $big
rc_joins:
  local: $big
  remote: $big
rc_joins_per_room: $big
rc_invites:
  per_room: $big
  per_user: $big
  per_issuer: $big
rc_third_party_invite: $big
rc_3pid_validation: $big
rc_admin_redaction: $big
rc_room_creation: $big
rc_presence:
  per_user: $big
rc_delayed_event_mgmt: $big
rc_reports: $big
rc_media_create: $big
rc_federation:
  window_size: 1000
  sleep_limit: 100000
  sleep_delay: 0
  reject_limit: 100000
  concurrent: 100000
YAML
    } > "$dir/homeserver.yaml"
    echo "== starting Synapse on 127.0.0.1:$SPORT (SQLite in $dir)"
    (cd "$dir" && exec "$py" -m synapse.app.homeserver -c "$dir/homeserver.yaml") > "$WORK/synapse.out" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_http "http://127.0.0.1:$SPORT/_matrix/client/versions" 90 || { cat "$WORK/synapse.out" "$dir/homeserver.log"; return 1; }
    echo "== convo-load against Synapse (pid $pid)"
    "$LOAD_BIN" --base-url "http://127.0.0.1:$SPORT" --server-pid "$pid" --label synapse \
        --json "$OUT/synapse.json" "$@" "${SYNAPSE_EXTRA[@]}" | tee "$OUT/synapse.txt" || echo "convo-load exited with $?"
    cp "$dir/homeserver.log" "$OUT/synapse.log" 2>/dev/null || true
    stop_pid "$pid"
}

for t in $TARGETS; do
    case $t in
        convo) run_convo "$@" ;;
        synapse) run_synapse "$@" ;;
        *) echo "unknown target $t" >&2; exit 1 ;;
    esac
done
echo "== results in $OUT"
cat "$OUT/machine.txt"

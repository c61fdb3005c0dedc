#!/usr/bin/env bash
# Element Web 1.11.88 in headless Chromium against the real `convo` binary: two users
# register through Element's form, share a group room and an encrypted DM, set up
# cross-signing; the steps are in scenario.mjs (docs/client-compatibility.md lists them).
# scripts/test runs it on every CI run.
#
#   bash tests/element/run.sh               build what is missing, then run the scenario
#   bash tests/element/run.sh --build-only  only build Element (and install playwright-core)
#   bash tests/element/run.sh --skip-if-unavailable
#                                           print SKIP and exit 0 when the Element source
#                                           tarball or Chromium is missing (scripts/test
#                                           passes it unless REQUIRE_ELEMENT=1, as .ci/run sets)
#
# What it needs, and where it looks:
#   - Element Web: built once from the source tarball and cached outside the checkout, keyed
#     by the tarball's sha256: $ELEMENT_CACHE_DIR/<sha256>/webapp (ELEMENT_CACHE_DIR defaults
#     to ${XDG_CACHE_HOME:-$HOME/.cache}/convo-element), so every later run and checkout on
#     the machine reuses it. ELEMENT_WEB_TARBALL names the tarball; by default the shared
#     folder's element-web/element-web-v1.11.88.tar.gz, looked for in ../shared beside the
#     repository, /tmp/shared and /work/shared. ELEMENT_WEBAPP names an already built
#     webapp/ folder instead (nothing is built then). The build gives up after
#     ELEMENT_BUILD_TIMEOUT seconds (default 1500).
#   - Chromium: CHROMIUM, else /usr/bin/chromium (Debian's package; installed with apt-get
#     when missing and running as root). Playwright never downloads a browser here.
#   - Convo: CONVO_BIN, else target/debug/convo (built with `cargo build --bin convo`).
#   - Node.js 20+ and npm: playwright-core and yarn (for the Element build) are pinned in
#     package-lock.json and installed into tests/element/node_modules.
# Results: summary.json, failures' screenshots, the server log and Element's requests go to
# tests/element/.results/ (git-ignored; ELEMENT_RESULTS elsewhere). Exit status 0 only when
# every step passed.
# ELEMENT_STEPS chooses the optional steps (media, avatar, threads, search, backup; a
# comma-separated list, "all" or "none"; by default those whose feature is on main, see
# FEATURES in scenario.mjs). ELEMENT_HEADED=1 shows the browser (needs a display);
# ELEMENT_STEP_TIMEOUT_MS changes the per-step limit (default 60 s); the whole scenario
# gives up after ELEMENT_SCENARIO_TIMEOUT seconds (default 900).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
ELEMENT_VERSION=1.11.88

die() {
  echo "tests/element/run.sh: $*" >&2
  exit 1
}

build_only=false
skip_if_unavailable=false
case "${1:-}" in
  --build-only) build_only=true ;;
  --skip-if-unavailable) skip_if_unavailable=true ;;
  "") ;;
  *) die "unknown argument '$1' (--build-only or --skip-if-unavailable)" ;;
esac

# What the test cannot do without (the source tarball, Chromium): an error, or a SKIP line.
unavailable() {
  if $skip_if_unavailable; then
    echo "SKIP tests/element: $*"
    exit 0
  fi
  die "$*"
}

command -v node >/dev/null 2>&1 || die "node (20 or later) and npm are needed (Debian: apt-get install nodejs npm)"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' ||
  die "node 20 or later is needed, this is $(node --version)"

# --- what is needed: the Element source (or a built webapp) and Chromium -----------------

TARBALL=
if [ -z "${ELEMENT_WEBAPP:-}" ]; then
  if [ -n "${ELEMENT_WEB_TARBALL:-}" ]; then
    [ -f "$ELEMENT_WEB_TARBALL" ] || die "ELEMENT_WEB_TARBALL=$ELEMENT_WEB_TARBALL: no such file"
    TARBALL="$ELEMENT_WEB_TARBALL"
  else
    name="element-web/element-web-v$ELEMENT_VERSION.tar.gz"
    for dir in "$REPO/../shared" /tmp/shared /work/shared; do
      if [ -f "$dir/$name" ]; then
        TARBALL="$dir/$name"
        break
      fi
    done
    [ -n "$TARBALL" ] || unavailable "Element Web's source tarball was not found (looked for $name in
$REPO/../shared, /tmp/shared and /work/shared). Set ELEMENT_WEB_TARBALL to element-web-v$ELEMENT_VERSION.tar.gz
(a git archive of Element Web's release commit), or ELEMENT_WEBAPP to an already built webapp/ folder."
  fi
fi

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if ! $build_only && [ ! -x "$CHROMIUM" ]; then
  if [ "$CHROMIUM" = /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing Debian's chromium"
    apt-get install -y -q chromium >/dev/null || {
      apt-get update -q >/dev/null
      apt-get install -y -q chromium >/dev/null
    }
  fi
  [ -x "$CHROMIUM" ] || unavailable "no Chromium at $CHROMIUM (Debian: apt-get install chromium; or set CHROMIUM)"
fi

echo "== tests/element: npm packages (playwright-core, yarn)"
npm ci --prefix "$HERE" --no-audit --no-fund --loglevel=error

# --- Element Web ----------------------------------------------------------------------

# Builds $1 (the tarball) into $2/webapp. The build happens in a fresh folder beside it and
# the webapp is moved into place only when complete, so an interrupted build leaves nothing
# that looks finished; a lock keeps two runs on the machine from building at once.
build_element() {
  local tarball="$1" dir="$2" src started=$SECONDS status=0
  mkdir -p "$dir"
  exec 9>"$dir/.lock"
  if ! flock -n 9; then
    echo "== another run is building Element in $dir: waiting for it"
    flock 9
  fi
  if [ -f "$dir/webapp/index.html" ]; then
    exec 9>&-
    return
  fi
  src="$dir/build.$$"
  echo "== building Element Web $ELEMENT_VERSION from $tarball into $dir/webapp (about 7 minutes on 2 cores)"
  rm -rf "$dir"/build.* "$dir/webapp"
  mkdir -p "$src"
  # The tarball holds one top folder (element-web/).
  tar xzf "$tarball" -C "$src" --strip-components=1
  [ -f "$src/package.json" ] || die "$tarball does not hold Element Web's source (no package.json)"
  # The registry answers 404 for `fs@latest` (a stray dependency of
  # webpack-version-file-plugin that nothing uses): drop it from the lock file.
  sed -i '/^fs@latest:$/,/^$/d; /^    fs latest$/d' "$src/yarn.lock"
  timeout -k 30 "${ELEMENT_BUILD_TIMEOUT:-1500}" bash -ec '
    cd "$1"
    "$2" install --frozen-lockfile --ignore-scripts --non-interactive --network-timeout 600000
    "$2" build
  ' build "$src" "$HERE/node_modules/.bin/yarn" >"$dir/build.log" 2>&1 || status=$?
  if [ "$status" -ne 0 ] || [ ! -f "$src/webapp/index.html" ]; then
    tail -n 40 "$dir/build.log" >&2
    rm -rf "$src"
    [ "$status" -eq 124 ] && die "the Element build timed out after ${ELEMENT_BUILD_TIMEOUT:-1500} s (log: $dir/build.log)"
    die "the Element build failed (exit status $status; log: $dir/build.log)"
  fi
  mv "$src/webapp" "$dir/webapp"
  # The source tree with its node_modules is large; the webapp is all we keep.
  rm -rf "$src"
  echo "== Element built in $((SECONDS - started)) s (log: $dir/build.log)"
  exec 9>&-
}

if [ -n "${ELEMENT_WEBAPP:-}" ]; then
  [ -f "$ELEMENT_WEBAPP/index.html" ] || die "ELEMENT_WEBAPP=$ELEMENT_WEBAPP has no index.html"
  WEBAPP="$(cd "$ELEMENT_WEBAPP" && pwd)"
else
  sha="$(sha256sum "$TARBALL" | cut -d' ' -f1)"
  cache_dir="${ELEMENT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/convo-element}/$sha"
  [ -f "$cache_dir/webapp/index.html" ] || build_element "$TARBALL" "$cache_dir"
  WEBAPP="$cache_dir/webapp"
fi
echo "== Element Web: $WEBAPP"

if $build_only; then
  exit 0
fi

# --- Convo ------------------------------------------------------------------------------

if [ -z "${CONVO_BIN:-}" ]; then
  echo "== cargo build --bin convo"
  (cd "$REPO" && cargo build --locked --bin convo)
  CONVO_BIN="$REPO/target/debug/convo"
fi
[ -x "$CONVO_BIN" ] || die "CONVO_BIN=$CONVO_BIN is not an executable"
CONVO_BIN="$(cd "$(dirname "$CONVO_BIN")" && pwd)/$(basename "$CONVO_BIN")"

# --- the scenario ---------------------------------------------------------------------

RESULTS="${ELEMENT_RESULTS:-$HERE/.results}"
echo "== Element Web scenario (Element $ELEMENT_VERSION, $("$CHROMIUM" --version 2>/dev/null || echo chromium))"
start=$SECONDS
status=0
# The scenario's own limits are per step; this one bounds the whole run (the server and the
# browser are in the same process group, and go with it).
ELEMENT_WEBAPP="$WEBAPP" CHROMIUM="$CHROMIUM" CONVO_BIN="$CONVO_BIN" ELEMENT_RESULTS="$RESULTS" \
  timeout -k 30 "${ELEMENT_SCENARIO_TIMEOUT:-900}" node "$HERE/scenario.mjs" || status=$?
echo "== scenario took $((SECONDS - start)) s, exit status $status"
if [ "$status" -eq 124 ]; then
  echo "tests/element/run.sh: the scenario did not finish within ${ELEMENT_SCENARIO_TIMEOUT:-900} s" >&2
fi
if [ "$status" -ne 0 ]; then
  echo "tests/element/run.sh: results (summary.json, screenshots, convo.log, Element's requests and console) in $RESULTS" >&2
fi
exit "$status"

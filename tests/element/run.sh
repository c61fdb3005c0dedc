#!/usr/bin/env bash
# Element Web 1.11.88 in headless Chromium against the real `convo` binary: two users
# register through Element's form, share a group room and an encrypted DM, set up
# cross-signing; the steps are in scenario.mjs (docs/client-compatibility.md lists them).
#
#   bash tests/element/run.sh               build what is missing, then run the scenario
#   bash tests/element/run.sh --build-only  only build Element (and install playwright-core)
#
# What it needs, and where it looks:
#   - Element Web: built once from the source tarball into tests/element/.build/ (git-ignored).
#     ELEMENT_WEB_TARBALL names the tarball; by default the shared folder's
#     element-web/element-web-v1.11.88.tar.gz, beside the repository or in /work/shared.
#     ELEMENT_WEBAPP names an already built webapp/ folder instead (nothing is built then).
#   - Chromium: CHROMIUM, else /usr/bin/chromium (Debian's package; installed with apt-get
#     when missing and running as root). Playwright never downloads a browser here.
#   - Convo: CONVO_BIN, else target/debug/convo (built with `cargo build --bin convo`).
#   - Node.js 20+ and npm: playwright-core and yarn (for the Element build) are pinned in
#     package-lock.json and installed into tests/element/node_modules.
# Results: failures' screenshots, the server log and Element's error responses go to
# tests/element/.results/ (git-ignored). Exit status 0 only when every step passed.
# ELEMENT_HEADED=1 shows the browser (needs a display); ELEMENT_STEP_TIMEOUT_MS changes the
# per-step wait (default 60 s).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
ELEMENT_VERSION=1.11.88
BUILD="$HERE/.build"
WEBAPP_BUILT="$BUILD/webapp-$ELEMENT_VERSION"

die() {
  echo "tests/element/run.sh: $*" >&2
  exit 1
}

build_only=false
case "${1:-}" in
  --build-only) build_only=true ;;
  "") ;;
  *) die "unknown argument '$1' (only --build-only)" ;;
esac

command -v node >/dev/null 2>&1 || die "node (20 or later) and npm are needed (Debian: apt-get install nodejs npm)"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' ||
  die "node 20 or later is needed, this is $(node --version)"

echo "== tests/element: npm packages (playwright-core, yarn)"
npm ci --prefix "$HERE" --no-audit --no-fund --loglevel=error

# --- Element Web ----------------------------------------------------------------------

find_tarball() {
  if [ -n "${ELEMENT_WEB_TARBALL:-}" ]; then
    [ -f "$ELEMENT_WEB_TARBALL" ] || die "ELEMENT_WEB_TARBALL=$ELEMENT_WEB_TARBALL: no such file"
    echo "$ELEMENT_WEB_TARBALL"
    return
  fi
  local name="element-web/element-web-v$ELEMENT_VERSION.tar.gz" dir
  for dir in "$REPO/../shared" /work/shared; do
    if [ -f "$dir/$name" ]; then
      echo "$dir/$name"
      return
    fi
  done
  die "Element Web's source tarball was not found (looked for $name in $REPO/../shared and /work/shared).
Set ELEMENT_WEB_TARBALL to element-web-v$ELEMENT_VERSION.tar.gz (a git archive of Element Web's
release commit), or ELEMENT_WEBAPP to an already built webapp/ folder."
}

build_element() {
  local tarball src
  tarball="$(find_tarball)"
  src="$BUILD/src"
  echo "== building Element Web $ELEMENT_VERSION from $tarball into $WEBAPP_BUILT (about 5 to 8 minutes)"
  rm -rf "$src" "$WEBAPP_BUILT"
  mkdir -p "$src"
  # The tarball holds one top folder (element-web/).
  tar xzf "$tarball" -C "$src" --strip-components=1
  [ -f "$src/package.json" ] || die "$tarball does not hold Element Web's source (no package.json)"
  (
    cd "$src"
    # The registry answers 404 for `fs@latest` (a stray dependency of
    # webpack-version-file-plugin that nothing uses): drop it from the lock file.
    sed -i '/^fs@latest:$/,/^$/d; /^    fs latest$/d' yarn.lock
    local yarn="$HERE/node_modules/.bin/yarn"
    "$yarn" install --frozen-lockfile --ignore-scripts --non-interactive --network-timeout 600000
    "$yarn" build
  )
  [ -f "$src/webapp/index.html" ] || die "the Element build finished without webapp/index.html"
  mv "$src/webapp" "$WEBAPP_BUILT"
  # The source tree with its node_modules is large; the webapp is all we keep.
  rm -rf "$src"
}

if [ -n "${ELEMENT_WEBAPP:-}" ]; then
  [ -f "$ELEMENT_WEBAPP/index.html" ] || die "ELEMENT_WEBAPP=$ELEMENT_WEBAPP has no index.html"
  WEBAPP="$(cd "$ELEMENT_WEBAPP" && pwd)"
else
  [ -f "$WEBAPP_BUILT/index.html" ] || build_element
  WEBAPP="$WEBAPP_BUILT"
fi
echo "== Element Web: $WEBAPP"

if $build_only; then
  exit 0
fi

# --- Chromium ---------------------------------------------------------------------------

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
  if [ "$CHROMIUM" = /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing Debian's chromium"
    apt-get install -y -q chromium >/dev/null || {
      apt-get update -q >/dev/null
      apt-get install -y -q chromium >/dev/null
    }
  fi
  [ -x "$CHROMIUM" ] || die "no Chromium at $CHROMIUM (Debian: apt-get install chromium; or set CHROMIUM)"
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

echo "== Element Web scenario (Element $ELEMENT_VERSION, $("$CHROMIUM" --version 2>/dev/null || echo chromium))"
start=$(date +%s)
status=0
ELEMENT_WEBAPP="$WEBAPP" CHROMIUM="$CHROMIUM" CONVO_BIN="$CONVO_BIN" \
  ELEMENT_RESULTS="${ELEMENT_RESULTS:-$HERE/.results}" \
  node "$HERE/scenario.mjs" || status=$?
echo "== scenario took $(($(date +%s) - start)) s, exit status $status"
exit "$status"

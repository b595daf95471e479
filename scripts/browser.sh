#!/usr/bin/env bash
# Browser test tooling for the dashboard test (tests/ui/dashboard.mjs).
#
#   scripts/browser.sh install    installs Debian's chromium (if /usr/bin/chromium
#                                 is missing) and playwright-core (pinned) into
#                                 $INFERQ_BROWSER_DIR (default ~/.cache/inferq-browser).
#                                 Idempotent; quiet when everything is already there.
#   scripts/browser.sh node-path  prints the NODE_PATH that lets node find playwright-core.
#
# Playwright's own browser download is never used (it cannot work here):
# the test launches /usr/bin/chromium through executablePath.
set -euo pipefail

PLAYWRIGHT_CORE_VERSION="1.64.1"
CACHE_DIR="${INFERQ_BROWSER_DIR:-$HOME/.cache/inferq-browser}"
CHROMIUM_BIN="${CHROMIUM:-/usr/bin/chromium}"

die() { echo "browser.sh: $*" >&2; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH (Node.js and npm are needed for the browser test)"
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "not root and no sudo: cannot run $*"
  fi
}

install_chromium() {
  if [ -x "$CHROMIUM_BIN" ]; then
    return 0
  fi
  [ "$CHROMIUM_BIN" = /usr/bin/chromium ] || die "CHROMIUM=$CHROMIUM_BIN does not exist"
  echo "browser.sh: installing Debian's chromium"
  export DEBIAN_FRONTEND=noninteractive
  # Try without refreshing the package lists first; update only if that fails.
  if ! as_root apt-get install -y -q --no-install-recommends chromium >/tmp/inferq-apt.log 2>&1; then
    as_root apt-get update -q >>/tmp/inferq-apt.log 2>&1 || { cat /tmp/inferq-apt.log >&2; die "apt-get update failed"; }
    as_root apt-get install -y -q --no-install-recommends chromium >>/tmp/inferq-apt.log 2>&1 \
      || { tail -n 30 /tmp/inferq-apt.log >&2; die "apt-get install chromium failed"; }
  fi
  [ -x "$CHROMIUM_BIN" ] || die "chromium installed but $CHROMIUM_BIN is missing"
  echo "browser.sh: $("$CHROMIUM_BIN" --version 2>/dev/null || echo chromium)"
}

installed_playwright_version() {
  local pj="$CACHE_DIR/node_modules/playwright-core/package.json"
  [ -f "$pj" ] || return 0
  node -e 'process.stdout.write(require(process.argv[1]).version)' "$pj" 2>/dev/null || true
}

install_playwright() {
  need node
  need npm
  if [ "$(installed_playwright_version)" = "$PLAYWRIGHT_CORE_VERSION" ]; then
    return 0
  fi
  echo "browser.sh: installing playwright-core@$PLAYWRIGHT_CORE_VERSION into $CACHE_DIR"
  mkdir -p "$CACHE_DIR"
  # A package.json of its own keeps npm from walking up to another project.
  [ -f "$CACHE_DIR/package.json" ] || echo '{"name":"inferq-browser","private":true}' >"$CACHE_DIR/package.json"
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$CACHE_DIR" --no-audit --no-fund \
    --loglevel=error --save-exact "playwright-core@$PLAYWRIGHT_CORE_VERSION" >/dev/null \
    || die "npm install playwright-core@$PLAYWRIGHT_CORE_VERSION failed"
  [ "$(installed_playwright_version)" = "$PLAYWRIGHT_CORE_VERSION" ] || die "playwright-core did not install"
}

case "${1:-}" in
  install)
    install_chromium
    install_playwright
    ;;
  node-path)
    echo "$CACHE_DIR/node_modules"
    ;;
  *)
    echo "usage: $0 install|node-path" >&2
    exit 2
    ;;
esac

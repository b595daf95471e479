#!/usr/bin/env bash
# schemathesis (PyPI, pinned) for the OpenAPI test (tests/openapi.rs).
#
#   scripts/schemathesis.sh install   a venv in $INFERQ_SCHEMATHESIS_DIR
#                                     (default ~/.cache/inferq-schemathesis-venv);
#                                     idempotent, quiet when already there.
#   scripts/schemathesis.sh bin       prints the path of its `schemathesis`.
#
# Also makes sure openssl and curl are there (the TLS test uses both).
set -euo pipefail

VERSION="4.32.5"
VENV="${INFERQ_SCHEMATHESIS_DIR:-$HOME/.cache/inferq-schemathesis-venv}"

die() { echo "schemathesis.sh: $*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "not root and no sudo: cannot run $*"; fi
}

case "${1:-}" in
  install)
    for tool in openssl curl; do
      if ! command -v "$tool" >/dev/null 2>&1; then
        echo "schemathesis.sh: installing $tool"
        export DEBIAN_FRONTEND=noninteractive
        as_root apt-get update -q >/tmp/inferq-apt.log 2>&1 || true
        as_root apt-get install -y -q --no-install-recommends "$tool" >>/tmp/inferq-apt.log 2>&1 \
          || { tail -n 20 /tmp/inferq-apt.log >&2; die "apt-get install $tool failed"; }
      fi
    done
    if [ -x "$VENV/bin/schemathesis" ] && [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null)" = "$VERSION" ]; then
      exit 0
    fi
    echo "schemathesis.sh: installing schemathesis $VERSION into $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed (install python3-venv)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$VERSION" \
      || die "pip install schemathesis==$VERSION failed"
    ;;
  bin)
    [ -x "$VENV/bin/schemathesis" ] || die "not installed: run scripts/schemathesis.sh install"
    echo "$VENV/bin/schemathesis"
    ;;
  *)
    die "usage: scripts/schemathesis.sh install|bin"
    ;;
esac

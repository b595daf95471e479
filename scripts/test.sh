#!/usr/bin/env bash
# The whole test suite, on a fresh machine of this kind: starts PostgreSQL
# and Redis if needed, installs the small real model and its server (cached
# under ~/.cache after the first time) and the dashboard test's browser
# (Debian's chromium, playwright-core) and schemathesis, then runs every
# test.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
scripts/llm-server.sh install
scripts/browser.sh install
scripts/schemathesis.sh install
cargo nextest run --workspace "$@"

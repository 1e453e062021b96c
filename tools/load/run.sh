#!/usr/bin/env bash
# Load test on loopback: 64 concurrent clients for 60 s on resnet20 /predict,
# then 16 clients for 30 s on /gradcam. Bounded in time and count; traffic
# goes to 127.0.0.1 only. Prints throughput, latency percentiles, responses
# by status and the server's peak RSS. Needs a release build and wrk
# (installed from Debian's packages if missing).
#
#     tools/load/run.sh            # results go in BENCHMARKS.md
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
BIN=target/release/convscope
[ -x "$BIN" ] || cargo build --release
PORT=${PORT:-18080}
"$BIN" serve --addr "127.0.0.1:$PORT" >/tmp/convscope-load.log 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
rss() { grep -E "^(VmRSS|VmHWM)" "/proc/$PID/status" | tr -s ' \t' ' ' | tr '\n' ' '; echo; }
echo "idle: $(rss)"
IMG=data/cifar10/samples/test0000_cat.png
echo "== /predict, resnet20, 64 connections, 60 s"
wrk -t4 -c64 -d60s --timeout 30s -s tools/load/post_image.lua "http://127.0.0.1:$PORT/models/resnet20-cifar10/predict" -- "$IMG"
echo "after predict: $(rss)"
echo "== /predict, resnet20, 1 connection, 20 s (single-client baseline)"
wrk -t1 -c1 -d20s --timeout 30s -s tools/load/post_image.lua "http://127.0.0.1:$PORT/models/resnet20-cifar10/predict" -- "$IMG"
echo "== /gradcam, resnet20, 16 connections, 30 s"
wrk -t2 -c16 -d30s --timeout 30s -s tools/load/post_image.lua "http://127.0.0.1:$PORT/models/resnet20-cifar10/gradcam?output=json" -- "$IMG"
echo "after gradcam: $(rss)"

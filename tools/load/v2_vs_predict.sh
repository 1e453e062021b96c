#!/usr/bin/env bash
# Throughput of the Open Inference Protocol against convscope's own
# /predict, on loopback, ResNet-20, the same image: 64 connections, in
# alternating rounds (the machine's speed drifts; alternation spreads the
# drift over every variant). Variants:
#   predict      POST /models/resnet20-cifar10/predict, raw image/png body
#   v2-bytes     POST /v2/models/resnet20-cifar10/infer, the PNG as a BYTES
#                tensor in binary data (tritonclient's default encoding)
#   v2-json      the same, the PNG base64 in JSON
#   v2-fp32      a preprocessed FP32 [1, 3, 32, 32] tensor in binary data
#                (no decoding: the forward pass alone)
# Prints each run's requests/s and, per variant, the median over rounds.
#
#     tools/load/v2_vs_predict.sh [rounds] [seconds]     (default 3, 15)
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
seconds=${2:-15}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
BIN=target/release/convscope
[ -x "$BIN" ] || cargo build --release
PORT=${PORT:-18081}
work=$(mktemp -d)
"$BIN" serve --addr "127.0.0.1:$PORT" --train-workers 0 >"$work/server.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
IMG=data/cifar10/samples/test0000_cat.png

# The request bodies, written once (Python's standard library only).
python3 - "$IMG" "$work" <<'PY'
import base64, json, random, struct, sys
img = open(sys.argv[1], "rb").read()
out = sys.argv[2]
def binary(header, data):
    h = json.dumps(header).encode()
    open(f"{out}/{name}.body", "wb").write(h + data)
    open(f"{out}/{name}.len", "w").write(str(len(h)))
name = "v2-bytes"
data = struct.pack("<I", len(img)) + img
binary({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                    "parameters": {"binary_data_size": len(data)}}],
        "parameters": {"binary_data_output": True}}, data)
name = "v2-fp32"
rng = random.Random(0)
data = struct.pack("<3072f", *[rng.gauss(0, 1) for _ in range(3072)])
binary({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                    "parameters": {"binary_data_size": len(data)}}],
        "parameters": {"binary_data_output": True}}, data)
open(f"{out}/v2-json.body", "w").write(json.dumps(
    {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                 "data": [base64.b64encode(img).decode()]}]}))
PY
# Each body must be answered 200 before it is timed.
v2="http://127.0.0.1:$PORT/v2/models/resnet20-cifar10/infer"
for v in v2-bytes v2-fp32; do
  curl -sf -o /dev/null -H "Inference-Header-Content-Length: $(cat "$work/$v.len")" --data-binary @"$work/$v.body" "$v2"
done
curl -sf -o /dev/null -H 'Content-Type: application/json' --data-binary @"$work/v2-json.body" "$v2"

run() {  # variant -> requests/s
  local v=$1 out
  case $v in
    predict) out=$(wrk -t4 -c64 -d"${seconds}s" --timeout 30s -s tools/load/post_image.lua \
               "http://127.0.0.1:$PORT/models/resnet20-cifar10/predict" -- "$IMG") ;;
    v2-json) out=$(wrk -t4 -c64 -d"${seconds}s" --timeout 30s -s tools/load/post_image.lua \
               "$v2" -- "$work/v2-json.body" application/json) ;;
    *) out=$(wrk -t4 -c64 -d"${seconds}s" --timeout 30s -s tools/load/post_image.lua \
               "$v2" -- "$work/$v.body" application/octet-stream \
               "Inference-Header-Content-Length: $(cat "$work/$v.len")") ;;
  esac
  if echo "$out" | grep '^status' | grep -vq '^status 200:'; then
    echo "$v: answers other than 200:" >&2; echo "$out" >&2; exit 1
  fi
  echo "$out" | sed -n 's/^requests .*: \([0-9.]*\) req\/s.*/\1/p'
}
declare -A all
for r in $(seq "$rounds"); do
  for v in predict v2-bytes v2-json v2-fp32; do
    rps=$(run "$v")
    all[$v]="${all[$v]:-} $rps"
    echo "round $r $v: $rps req/s"
  done
done
for v in predict v2-bytes v2-json v2-fp32; do
  median=$(echo "${all[$v]}" | tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  echo "median $v: $median req/s (runs:${all[$v]})"
done

#!/usr/bin/env bash
# Grade a folder of student images against a convscope server, with curl.
#
#   examples/grading.sh DIR [MODEL] [URL]
#
# For each PNG/JPEG in DIR: predict (top-1 label), save the conv2 activation
# grid and a Grad-CAM overlay into DIR/report/, and compare the prediction
# with the expected label, read from DIR/labels.csv (lines `file,label`) or,
# failing that, from a file name ending in _<label>.png or _digit<label>.png.
# Prints one line per image and exits 1 if any prediction is wrong (2 on a
# server or usage error). Needs only bash and curl.
set -uo pipefail

dir=${1:?usage: grading.sh DIR [MODEL] [URL]}
model=${2:-cnn-a-mnist}
url=${3:-http://127.0.0.1:8080}
layer=${LAYER:-conv2}
report="$dir/report"
mkdir -p "$report"

curl -sf "$url/models/$model" >/dev/null || { echo "model '$model' is not served at $url" >&2; exit 2; }

expected_label() {
  local file=$1 base
  base=$(basename "$file")
  if [ -f "$dir/labels.csv" ]; then
    local line
    line=$(grep -m1 "^$base," "$dir/labels.csv") && { echo "${line#*,}"; return; }
  fi
  base=${base%.*}
  base=${base##*_}
  echo "${base#digit}"
}

total=0; wrong=0
printf '%-28s %-10s %-10s %-8s %s\n' image expected predicted prob result
shopt -s nullglob
for img in "$dir"/*.png "$dir"/*.jpg "$dir"/*.jpeg; do
  total=$((total + 1))
  name=$(basename "$img")
  stem=${name%.*}
  want=$(expected_label "$img")
  answer=$(curl -s -F "image=@$img" "$url/models/$model/predict?top_k=1") || { echo "$name: server unreachable" >&2; exit 2; }
  got=$(printf '%s' "$answer" | grep -o '"label":"[^"]*"' | head -1 | cut -d'"' -f4)
  prob=$(printf '%s' "$answer" | grep -o '"probability":[0-9.e-]*' | head -1 | cut -d: -f2)
  if [ -z "$got" ]; then
    echo "$name: the server refused it: $answer" >&2
    wrong=$((wrong + 1))
    continue
  fi
  curl -s -o "$report/${stem}_${layer}.png" -F "image=@$img" "$url/models/$model/activations/$layer?labels=true"
  curl -s -o "$report/${stem}_gradcam.png" -F "image=@$img" "$url/models/$model/gradcam"
  if [ "$got" = "$want" ]; then result=ok; else result=WRONG; wrong=$((wrong + 1)); fi
  printf '%-28s %-10s %-10s %-8.4f %s\n' "$name" "$want" "$got" "$prob" "$result"
done
echo "$((total - wrong))/$total correct; pictures in $report"
[ "$wrong" -eq 0 ]

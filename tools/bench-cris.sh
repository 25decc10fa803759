#!/usr/bin/env bash
# Times CRIS (full size: the study's RN50 config at 416 px, random weights) with vlsm,
# medvlsm's CRIS module (PyTorch) and ONNX Runtime in one run on this machine, single
# thread, and prints a Markdown table (CPU and wall seconds, peak memory). Usage:
#   PY=/path/to/venv/bin/python tools/bench-cris.sh [WORKDIR]   (default /var/tmp/vlsm-bench-cris)
# The venv needs torch, transformers, onnx, onnxruntime,
# pillow. vlsm runs from the release build (`segment --timings`, encode + decode phases).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${1:-/var/tmp/vlsm-bench-cris}
[ -f "$WORK/model.onnx" ] || "$PY" tools/bench_cris_reference.py setup "$WORK" >&2
cargo build -q --locked --release -p vlsm-cli
BIN=${CARGO_TARGET_DIR:-target}/release/vlsm
PROMPTS=("polyp" "round polyp" "pink round polyp" "medium pink round polyp" "one medium pink round polyp"
  "one medium pink round polyp, located in bottom right of the image" "polyp which is a projecting growth of tissue"
  "a small lump in the lining of the colon" "skin melanoma" "left ventricle of the heart in a two chamber view")

run_vlsm() { # n_prompts
  local args=() best=""
  for p in "${PROMPTS[@]:0:$1}"; do args+=(--prompt "$p"); done
  for _ in 1 2 3; do
    local out row
    out=$(RAYON_NUM_THREADS=1 "$BIN" segment "$WORK/image.png" "${args[@]}" --weights "$WORK/model" \
      --out "$WORK/out" --timings 2>&1 >/dev/null)
    row=$(echo "$out" | awk -v n="$1" '
      /timings: encode image|timings: decode prompts/ { w += $(NF-1); c += $NF }
      /peak RSS/ { m = $(NF-1) }
      END { printf "{\"framework\": \"vlsm release build (burn flex, 1 thread)\", \"case\": \"1x%s\", \"wall_s\": %.3f, \"cpu_s\": %.3f, \"peak_mib\": %s}\n", n, w, c, m }')
    if [ -z "$best" ] || awk -v a="$row" -v b="$best" 'BEGIN { exit !(a < b) }'; then best=$row; fi
  done
  echo "$best"
}

{
  "$PY" tools/bench_cris_reference.py ort "$WORK"
  "$PY" tools/bench_cris_reference.py torch "$WORK"
  for n in 1 10; do run_vlsm "$n"; done
} > "$WORK/results.jsonl"
"$PY" tools/bench_reference.py table "$WORK"

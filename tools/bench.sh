#!/usr/bin/env bash
# Times CLIPSeg rd64-refined (full size, random weights) with vlsm, transformers (PyTorch) and
# ONNX Runtime in one run on this machine, and prints a Markdown table (CPU and wall seconds,
# peak memory). Usage:
#   PY=/path/to/venv/bin/python tools/bench.sh [WORKDIR]   (default /var/tmp/vlsm-bench)
# The venv needs torch, transformers, onnx, onnxruntime, pillow (see tools/make_fixtures.py).
# vlsm is run from the dev build (`cargo build -p vlsm-cli`; its dependencies and core are
# compiled at opt-level 2), once with one thread and once with all cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${1:-/var/tmp/vlsm-bench}
[ -f "$WORK/model.onnx" ] || "$PY" tools/bench_reference.py setup "$WORK" >&2
cargo build -q -p vlsm-cli
BIN=${CARGO_TARGET_DIR:-target}/debug/vlsm
PROMPTS=("polyp" "round polyp" "pink round polyp" "medium pink round polyp" "one medium pink round polyp"
  "one medium pink round polyp, located in bottom right of the image" "polyp which is a projecting growth of tissue"
  "a small lump in the lining of the colon" "skin melanoma" "left ventricle of the heart in a two chamber view")

# vlsm: best of 3 runs of `segment --timings`; the model-work phases (encode + decode) count.
run_vlsm() { # threads n_prompts
  local args=() best=""
  for p in "${PROMPTS[@]:0:$2}"; do args+=(--prompt "$p"); done
  for _ in 1 2 3; do
    local out
    out=$(RAYON_NUM_THREADS=$1 "$BIN" segment "$WORK/image.png" "${args[@]}" --weights "$WORK/model" \
      --out "$WORK/out" --timings 2>&1 >/dev/null)
    local row
    row=$(echo "$out" | awk -v t="$1" -v n="$2" '
      /timings: encode image|timings: decode prompts/ { w += $(NF-1); c += $NF }
      /peak RSS/ { m = $(NF-1) }
      END { printf "{\"framework\": \"vlsm (burn flex, %s thread%s)\", \"case\": \"1x%s\", \"wall_s\": %.3f, \"cpu_s\": %.3f, \"peak_mib\": %s}\n", t, (t == 1 ? "" : "s"), n, w, c, m }')
    if [ -z "$best" ] || awk -v a="$row" -v b="$best" 'BEGIN { exit !(a < b) }'; then best=$row; fi
  done
  echo "$best"
}

{
  "$PY" tools/bench_reference.py ort "$WORK"
  "$PY" tools/bench_reference.py torch "$WORK"
  for threads in 1 "$(nproc)"; do
    for n in 1 10; do run_vlsm "$threads" "$n"; done
  done
} > "$WORK/results.jsonl"
"$PY" tools/bench_reference.py table "$WORK"

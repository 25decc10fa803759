#!/usr/bin/env bash
# Times CLIPSeg rd64-refined (full size, random weights) with vlsm, transformers (PyTorch) and
# ONNX Runtime in one run on this machine, and prints a Markdown table (CPU and wall seconds,
# peak memory). Usage:
#   PY=/path/to/venv/bin/python tools/bench.sh [WORKDIR]   (default /var/tmp/vlsm-bench)
# The venv needs torch, transformers, onnx, onnxruntime, pillow (see tools/make_fixtures.py).
# vlsm runs from the release build and from the dev build (dependencies optimised, see
# Cargo.toml), each once with one thread and once with all cores, in f32 and with
# --precision bf16 (where the CPU has AVX-512 BF16; else it runs f32). RELEASE_FEATURES (e.g.
# cuda,wgpu, to reuse tools/gpu-check-prepare.sh's build) adds features to the release build;
# only the CPU backend is timed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${1:-/var/tmp/vlsm-bench}
[ -f "$WORK/model.onnx" ] || "$PY" tools/bench_reference.py setup "$WORK" >&2
# DEV_TARGET_DIR: where the dev build lives (e.g. CI's warm target dir), if not the same.
DEV_TARGET=${DEV_TARGET_DIR:-${CARGO_TARGET_DIR:-target}}
# PROFILES: which builds to time, "release debug" by default ("debug" is the dev profile,
# dependencies and the core optimised as in a release build; see Cargo.toml).
PROFILES=${PROFILES:-release debug}
case " $PROFILES " in *" debug "*) CARGO_TARGET_DIR=$DEV_TARGET cargo build -q --locked -p vlsm-cli ;; esac
features=()
if [ -n "${RELEASE_FEATURES:-}" ]; then
  features=(--features "$RELEASE_FEATURES")
  case $RELEASE_FEATURES in *cuda*) export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000} ;; esac
fi
case " $PROFILES " in *" release "*) cargo build -q --locked --release -p vlsm-cli "${features[@]}" ;; esac
TARGET=${CARGO_TARGET_DIR:-target}
PROMPTS=("polyp" "round polyp" "pink round polyp" "medium pink round polyp" "one medium pink round polyp"
  "one medium pink round polyp, located in bottom right of the image" "polyp which is a projecting growth of tissue"
  "a small lump in the lining of the colon" "skin melanoma" "left ventricle of the heart in a two chamber view")
# Eight 640×480 images for the batch case.
if [ ! -f "$WORK/batch/7.png" ]; then
  mkdir -p "$WORK/batch"
  "$PY" -c "
import numpy as np, sys
from PIL import Image
rng = np.random.default_rng(2)
for i in range(8):
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(f'{sys.argv[1]}/{i}.png')
" "$WORK/batch"
fi

# vlsm: best of 3 runs of `segment --timings`; the model-work phases (encode + decode) count.
run_vlsm() { # profile threads n_images n_prompts precision
  local profile=$1 threads=$2 images=$3 n=$4 precision=$5 args=() best=""
  for p in "${PROMPTS[@]:0:$n}"; do args+=(--prompt "$p"); done
  if [ "$images" = 1 ]; then
    args+=("$WORK/image.png")
  else
    args+=("$WORK/batch" --batch-size "$images")
  fi
  for _ in 1 2 3; do
    local out
    local bin=$TARGET/release/vlsm
    [ "$profile" = release ] || bin=$DEV_TARGET/debug/vlsm
    out=$(RAYON_NUM_THREADS=$threads "$bin" segment "${args[@]}" --weights "$WORK/model" \
      --precision "$precision" --out "$WORK/out" --timings 2>&1 >/dev/null)
    local row
    row=$(echo "$out" | awk -v t="$threads" -v i="$images" -v n="$n" -v b="$profile" -v p="$precision" '
      /timings: encode image|timings: decode prompts/ { w += $(NF-1); c += $NF }
      /peak RSS/ { m = $(NF-1) }
      END { printf "{\"framework\": \"vlsm %s build (burn flex, %s thread%s, %s)\", \"case\": \"%sx%s\", \"wall_s\": %.3f, \"cpu_s\": %.3f, \"peak_mib\": %s}\n", (b == "debug" ? "dev" : b), t, (t == 1 ? "" : "s"), p, i, n, w, c, m }')
    if [ -z "$best" ] || awk -v a="$row" -v b="$best" 'BEGIN { exit !(a < b) }'; then best=$row; fi
  done
  echo "$best"
}

{
  "$PY" tools/bench_reference.py ort "$WORK"
  "$PY" tools/bench_reference.py torch "$WORK"
  for profile in $PROFILES; do
    for threads in 1 "$(nproc)"; do
      for precision in f32 bf16; do
        for case in 1x1 1x10 8x1; do run_vlsm "$profile" "$threads" "${case%x*}" "${case#*x}" "$precision"; done
      done
    done
  done
} > "$WORK/results.jsonl"
"$PY" tools/bench_reference.py table-flops "$WORK"

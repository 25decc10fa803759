#!/usr/bin/env bash
# The GPU check: runs a prebuilt CUDA + wgpu vlsm on a machine with an NVIDIA GPU and no Rust
# toolchain (offline), and prints one Markdown table. Made by tools/gpu-check-prepare.sh here;
# run there from the repository root, within 10 minutes:
#
#   bash tools/gpu-check.sh [BUNDLE]            (default gpu-bundle/)
#
# BUNDLE holds vlsm.xz (stripped release binary, --features cuda,wgpu), model.tar.xz (the
# full-size rd64-refined architecture with synthetic weights: speed does not depend on them)
# and, when the machine may lack a CUDA toolkit, nvvm/libdevice/libdevice.10.bc.
#
# It measures:
#   1. parity: `vlsm segment --backend cuda` vs `--backend cpu` on the test fixtures
#      (max |Δlogit| over two images and three prompts, both checkpoint variants);
#   2. speed on the full-size model: image encode, 1 and 10 prompts, 8 images × 1 prompt
#      (steady state: a run with one image is subtracted, which removes start-up and the
#      kernels' JIT compilation);
#   3. `vlsm train` (decoder, activation cache) on a synthetic set, f32 and f16: samples/s
#      and whether the training loss falls;
#   4. the same parity and 1-prompt speed through wgpu when a Vulkan ICD of NVIDIA's is there.
# A step that fails prints its error in the table and the others still run. Exit status 0
# when every step that could run passed, 1 otherwise. GPU_CHECK_BACKEND=cpu runs the same
# steps on the CPU backend (parity then compares the CPU with itself): a dry run of the
# script on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=${1:-gpu-bundle}
work=${GPU_CHECK_WORK:-/tmp/vlsm-gpu-check}
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-540})) # stay inside the machine's 10-minute call
rm -rf "$work" && mkdir -p "$work"
rows=()
failed=0
row() { rows+=("| $1 | $2 | $3 |"); }
fail() { row "$1" "FAILED" "$2"; failed=1; }
left() { echo $((deadline - SECONDS)); }
# Runs a command with what is left of the time, its stderr to $work/$1.log; the last error
# line is kept for the table.
run() {
  local name=$1
  shift
  local budget
  budget=$(left)
  if [ "$budget" -le 5 ]; then
    echo "out of time" >"$work/$name.log"
    return 124
  fi
  timeout "$budget" "$@" >"$work/$name.out" 2>"$work/$name.log"
}
last_error() { grep -m1 '^error' "$work/$1.log" || tail -n1 "$work/$1.log"; }

echo "== unpacking $bundle" >&2
if [ ! -f "$bundle/vlsm.xz" ]; then
  echo "error: $bundle/vlsm.xz not found (make the bundle with tools/gpu-check-prepare.sh)" >&2
  exit 1
fi
xz -dc "$bundle/vlsm.xz" >"$work/vlsm" && chmod +x "$work/vlsm"
vlsm=$work/vlsm
if [ -f "$bundle/model.tar.xz" ]; then
  tar -C "$work" -xJf "$bundle/model.tar.xz"
fi
model=$work/model
if [ -z "${CUDA_PATH:-}" ] && [ -f "$bundle/nvvm/libdevice/libdevice.10.bc" ] \
  && [ ! -f /usr/local/cuda/nvvm/libdevice/libdevice.10.bc ]; then
  export CUDA_PATH
  CUDA_PATH=$(cd "$bundle" && pwd)
fi

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1)
row "machine" "${gpu:-no nvidia-smi}" "$(nproc) CPU cores; CUDA_PATH=${CUDA_PATH:-unset}"

# --- 1. parity -----------------------------------------------------------------------------
# Raw logits (.npy, float32) from both backends, compared with Python's standard library.
max_delta() {
  python3 - "$1" "$2" <<'EOF'
import array, ast, sys
def read(path):
    data = open(path, "rb").read()
    assert data[:6] == b"\x93NUMPY", path
    header_len = int.from_bytes(data[8:10], "little")
    header = ast.literal_eval(data[10:10 + header_len].decode())
    assert header["descr"] == "<f4", header
    values = array.array("f")
    values.frombytes(data[10 + header_len:])
    return header["shape"], values
(sa, a), (sb, b) = read(sys.argv[1]), read(sys.argv[2])
assert sa == sb, (sa, sb)
print(f"{max(abs(x - y) for x, y in zip(a, b)):.2e} {max(abs(x) for x in a):.1f}")
EOF
}
parity() { # backend
  local backend=$1 worst=0 detail=""
  for weights in clipseg_refined clipseg_simple; do
    for b in cpu "$backend"; do
      if ! run "parity-$weights-$b" "$vlsm" segment tests/fixtures/images/rgb_150x100.png \
        tests/fixtures/images/grey_120x90.png --prompt "a polyp" --prompt "" \
        --prompt "a large pink polyp in the top left of the image" \
        --weights "tests/fixtures/$weights" --out "$work/out-$b" --backend "$b" \
        --save-logits "$work/$weights-$b.npy"; then
        fail "$backend parity ($weights)" "$(last_error "parity-$weights-$b")"
        return
      fi
    done
    local result
    if ! result=$(max_delta "$work/$weights-cpu.npy" "$work/$weights-$backend.npy" 2>&1); then
      fail "$backend parity ($weights)" "comparison failed: $(echo "$result" | tail -n1)"
      return
    fi
    detail+="$weights: max |Δlogit| ${result% *} (logits up to ${result#* }); "
    worst=$(python3 -c "print(max($worst, ${result% *}))")
  done
  if python3 -c "import sys; sys.exit(not $worst <= 1e-3)"; then
    row "$backend vs cpu logits" "max |Δ| $worst" "${detail%; }"
  else
    fail "$backend vs cpu logits" "max |Δ| $worst > 1e-3: ${detail%; }"
  fi
}

# --- 2. speed ------------------------------------------------------------------------------
# Sum of the `encode image` and `decode prompts` phases of --timings (wall s).
phase() { awk -v p="$2" '$0 ~ "timings: " p { s += $(NF-1) } END { printf "%.4f", s }' "$work/$1.log"; }
segment_timed() { # name backend n_images n_prompts
  local images=() prompts=()
  for _ in $(seq "$3"); do images+=(tests/fixtures/images/rgb_150x100.png); done
  local texts=("polyp" "round polyp" "pink round polyp" "medium pink round polyp"
    "one medium pink round polyp" "one medium pink round polyp, located in bottom right of the image"
    "polyp which is a projecting growth of tissue" "a small lump in the lining of the colon"
    "skin melanoma" "left ventricle of the heart in a two chamber view")
  for p in "${texts[@]:0:$4}"; do prompts+=(--prompt "$p"); done
  run "$1" "$vlsm" segment "${images[@]}" "${prompts[@]}" --weights "$model" \
    --out "$work/speed-out" --backend "$2" --timings
}
speed() { # backend
  local b=$1
  if [ ! -f "$model/config.json" ]; then
    fail "$b speed" "no full-size model in the bundle"
    return
  fi
  for case in "1 1" "9 1" "1 10" "2 10"; do
    set -- $case
    if ! segment_timed "speed-$b-$1x$2" "$b" "$1" "$2"; then
      fail "$b speed ($1 image(s) × $2 prompt(s))" "$(last_error "speed-$b-$1x$2")"
      return
    fi
  done
  local first enc1 enc9 dec1 dec9 dec10a dec10b
  first=$(awk '/timings: encode image/ { print $(NF-1) }' "$work/speed-$b-1x1.log")
  enc1=$(phase "speed-$b-1x1" "encode image")
  enc9=$(phase "speed-$b-9x1" "encode image")
  dec1=$(phase "speed-$b-1x1" "decode prompts")
  dec9=$(phase "speed-$b-9x1" "decode prompts")
  dec10a=$(phase "speed-$b-1x10" "decode prompts")
  dec10b=$(phase "speed-$b-2x10" "decode prompts")
  local enc_img dec_1 dec_10 img8 peak
  enc_img=$(python3 -c "print(f'{($enc9 - $enc1) / 8 * 1000:.1f}')")
  dec_1=$(python3 -c "print(f'{($dec9 - $dec1) / 8 * 1000:.1f}')")
  dec_10=$(python3 -c "print(f'{($dec10b - $dec10a) * 1000:.1f}')")
  img8=$(python3 -c "print(f'{($enc9 + $dec9 - $enc1 - $dec1) * 1000:.0f}')")
  peak=$(awk '/peak RSS/ { print $(NF-1) }' "$work/speed-$b-9x1.log")
  row "$b encode image (full size, 352²)" "$enc_img ms" "first image with start-up and JIT: ${first} s"
  row "$b 1 prompt (decode)" "$dec_1 ms" "steady state, per image"
  row "$b 10 prompts (decode)" "$dec_10 ms" "one image's ten prompts"
  row "$b 8 images × 1 prompt" "$img8 ms" "encode + decode of 8 images after the first; host peak RSS ${peak} MiB"
}

# --- 3. training ---------------------------------------------------------------------------
train() { # backend precision
  local b=$1 precision=$2 name="train-$1-$2"
  if ! run "$name" "$vlsm" train --weights "$model" --data "$work/synthetic" --datasets ellipses \
    --prompt p1 --out "$work/run-$b-$precision" --epochs 3 --batch-size 16 --precision "$precision" \
    --backend "$b"; then
    fail "$b train $precision" "$(last_error "$name")"
    return
  fi
  local rate losses
  rate=$(grep -o '[0-9.]* samples/s' "$work/$name.log" | tail -n1)
  losses=$(grep -o 'train loss [0-9.]*' "$work/$name.log" | awk '{ print $3 }' | paste -sd' ')
  local first last
  first=$(echo "$losses" | awk '{ print $1 }')
  last=$(echo "$losses" | awk '{ print $NF }')
  if python3 -c "import sys; sys.exit(not $last < $first)"; then
    row "$b train $precision (decoder, cache)" "$rate" "train loss by epoch: $losses; $(grep -m1 -o 'cached .* in [0-9.]* s' "$work/$name.log")"
  else
    fail "$b train $precision" "the loss did not fall: $losses"
  fi
}

backend=${GPU_CHECK_BACKEND:-cuda}
echo "== 1. parity ($backend)" >&2
parity "$backend"
echo "== 2. speed ($backend)" >&2
speed "$backend"
echo "== 3. training ($backend)" >&2
if run synthetic "$vlsm" synthetic "$work/synthetic" --train 64 --val 16 --test 8 --size 96; then
  train "$backend" f32
  train "$backend" f16
else
  fail "synthetic data" "$(last_error synthetic)"
fi
echo "== 4. wgpu through Vulkan" >&2
icd=$(grep -ls nvidia /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json 2>/dev/null | head -n1)
if [ -n "$icd" ] && ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1'; then
  parity wgpu
  grep -m1 'wgpu adapter' "$work/parity-clipseg_refined-wgpu.log" >"$work/adapter.txt" || true
  row "wgpu adapter" "$(sed 's/^wgpu adapter: //' "$work/adapter.txt")" "ICD $icd"
  speed wgpu
else
  row "wgpu (Vulkan)" "skipped" "no NVIDIA Vulkan ICD (${icd:-none}) or no libvulkan.so.1 on this machine"
fi

echo
echo "| check | result | details |"
echo "|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "logs: $work/*.log; $((SECONDS)) s in all"
exit "$failed"

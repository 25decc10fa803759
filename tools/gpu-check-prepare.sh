#!/usr/bin/env bash
# Makes the bundle tools/gpu-check.sh runs on an offline GPU machine, in gpu-bundle/ (ignored
# by git; carry it to the device):
#   vlsm.xz        the release binary with --features cuda,wgpu, stripped and xz-compressed
#   model.tar.xz   full-size rd64-refined with synthetic periodic weights (tools/gpu_check_model.py)
#   nvvm/libdevice/libdevice.10.bc   from NVIDIA's PyPI wheel, for machines without a CUDA toolkit
# Needs the Python venv of tools/bench.sh (for the full-size model's layout) as PY, e.g.
#   PY=/var/tmp/pyref/venv/bin/python bash tools/gpu-check-prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${WORK:-/var/tmp/vlsm-bench}
out=gpu-bundle
mkdir -p "$out"

bash tools/install-cuda-llvm.sh
CUDARC_CUDA_VERSION=13000 cargo build --release --locked -p vlsm-cli --features cuda,wgpu
bin=${CARGO_TARGET_DIR:-target}/release/vlsm
strip -o "$out/vlsm" "$bin"
xz -f -T0 -6 "$out/vlsm"

[ -f "$WORK/model/model.safetensors" ] || "$PY" tools/bench_reference.py setup "$WORK" >&2
rm -rf "$out/model"
python3 tools/gpu_check_model.py "$WORK/model" "$out/model"
tar -C "$out" -cf - model | xz -T0 -6 >"$out/model.tar.xz"
rm -rf "$out/model"

if [ ! -f "$out/nvvm/libdevice/libdevice.10.bc" ]; then
  wheels=$(mktemp -d)
  python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$wheels" \
    "nvidia-cuda-nvcc-cu12==12.9.86"
  python3 - "$wheels" "$out" <<'PYEOF'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("nvvm/libdevice/libdevice.10.bc"))
    target = pathlib.Path(sys.argv[2], "nvvm/libdevice/libdevice.10.bc")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(z.read(name))
PYEOF
  rm -rf "$wheels"
fi
ls -l "$out" "$out/nvvm/libdevice"
du -sh "$out"

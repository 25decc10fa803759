#!/usr/bin/env bash
# Makes `cargo build -p vlsm-cli --features cuda` work offline.
#
# burn 0.22's CUDA backend links LLVM 23.1 (with the NVPTX target) through cubecl-llvm, whose
# build dependency tracel-llvm-bundler 23.1.0-4 downloads an LLVM bundle unless it finds one
# already installed under ${XDG_DATA_HOME:-~/.local/share}/tracel/. PyPI's mlc-llvm-static
# wheels (plus -extra-targets, which adds NVPTX) hold exactly such an LLVM, so this puts
# them there and marks the bundle as installed. Idempotent; ≈92 MB download, ≈400 MB on disk.
# Then (no CUDA toolkit needed to build; cudarc loads the driver at run time):
#   CUDARC_CUDA_VERSION=13000 cargo build --release -p vlsm-cli --features cuda
set -euo pipefail
version=23.1.1.post0
base="${XDG_DATA_HOME:-$HOME/.local/share}/tracel"
wheels="$base/mlc-llvm-static-$version"
bundle="$base/tracel-llvm-23.1.0-4" # the path tracel-llvm-bundler 23.1.0-4 looks at
python=${PYTHON:-python3}

if [ ! -f "$bundle/.tracel-llvm-installed" ]; then
  rm -rf "$wheels" "$bundle"
  mkdir -p "$base"
  # Both wheels in one pip call: they fill the same static/ tree, and a second --target call
  # would not merge into it.
  "$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --no-compile \
    --target "$wheels" "mlc-llvm-static==$version" "mlc-llvm-static-extra-targets==$version"
  ln -sfn "$wheels/mlc_llvm_static/static" "$bundle"
  touch "$bundle/.tracel-llvm-installed"
fi

llvm_config="$bundle/bin/llvm-config"
if ! "$llvm_config" --targets-built | grep -qw NVPTX; then
  echo "error: the LLVM at $bundle lacks the NVPTX target; remove $base and rerun" >&2
  exit 1
fi
echo "LLVM $("$llvm_config" --version) with NVPTX at $bundle"

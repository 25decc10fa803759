#!/usr/bin/env bash
# The test command: installs whatever this machine lacks for the tests, then runs
# `cargo test --workspace` (extra arguments are passed on). Works on a fresh machine of this
# project's kind (Debian with rustup, Node.js and internet access to the package registries);
# installs nothing that is already there. Run from anywhere: `bash tools/test.sh`.
#
# What the tests need beyond Rust: the wasm32 target, trunk and wasm-bindgen-cli (to build the
# browser page), Chromium and Node.js with npm (the page's end-to-end test, driven by
# playwright-core from tests/e2e), and a TrueType font (`vlsm report`'s plots).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
unset NO_COLOR # trunk 0.21 refuses NO_COLOR=1

say() { echo "== setup: $*" >&2; }

rustup target list --installed | grep -qx wasm32-unknown-unknown || {
  say "rustup target add wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
}

# Trunk must find these exact versions (Trunk.toml, Cargo.lock's wasm-bindgen). Debug builds
# of the tools install in minutes instead of half an hour; they only orchestrate the build.
if ! trunk --version 2>/dev/null | grep -q '0\.21\.14'; then
  say "cargo install trunk 0.21.14"
  cargo install --locked --debug trunk --version 0.21.14
fi
if ! wasm-bindgen --version 2>/dev/null | grep -q '0\.2\.130'; then
  say "cargo install wasm-bindgen-cli 0.2.130"
  # Without --locked: its lock file pins a crate version the registry lacks.
  cargo install --debug wasm-bindgen-cli --version 0.2.130
fi

# Debian packages, one at a time and only those missing: on this machine kind Node.js comes
# from another repository and bundles npm, and apt refuses Debian's npm beside it.
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  say "apt-get update"
  "${sudo[@]}" apt-get update -qq
  for package in "${missing[@]}"; do
    # npm may have come with nodejs just now.
    if [ "$package" = npm ] && command -v npm >/dev/null; then continue; fi
    say "apt-get install $package"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$package" >/dev/null
  done
fi

if [ ! -f tests/e2e/node_modules/playwright-core/package.json ]; then
  say "npm ci in tests/e2e"
  (cd tests/e2e && npm ci --no-audit --no-fund)
fi

cargo test --workspace "$@"

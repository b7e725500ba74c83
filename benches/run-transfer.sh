#!/usr/bin/env bash
# Builds the release binaries and runs the side-by-side transfer benchmark
# (`migrate send | receive` vs `zstd -1 | TCP | zstd -d`), passing every argument through to
# it: see `benches/run-transfer.sh --help`. Installs the zstd command line tool if missing.
# With --baseline-only, the `migrate` binary is neither needed nor built.
set -euo pipefail

cd "$(dirname "$0")/.."

if ! command -v zstd >/dev/null 2>&1; then
    echo "zstd not found; installing the Debian package" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get install -y zstd || { $sudo apt-get update && $sudo apt-get install -y zstd; }
fi

packages=(-p cli -p benches)
for arg in "$@"; do
    if [ "$arg" = "--baseline-only" ]; then packages=(-p benches); fi
done
cargo build --release "${packages[@]}"

# `transfer` finds `migrate` beside itself in the same target directory.
exec "${CARGO_TARGET_DIR:-target}/release/transfer" "$@"

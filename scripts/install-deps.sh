#!/usr/bin/env bash
# Installs the Debian packages the demo, tests and benchmarks use, when they are missing.
# The Rust toolchain itself is expected (cargo, rustc, rustfmt, clippy).
set -euo pipefail

need=()
command -v zstd >/dev/null || need+=(zstd)
command -v cc >/dev/null || need+=(gcc)
command -v make >/dev/null || need+=(make)
command -v jq >/dev/null || need+=(jq)   # benches/run-migration.sh reads JSON with it
# scripts/check-k8s-files.sh (make lint-k8s): Vagrantfile syntax, shell scripts, kustomize render.
command -v ruby >/dev/null || need+=(ruby)
command -v shellcheck >/dev/null || need+=(shellcheck)
command -v kubectl >/dev/null || need+=(kubernetes-client)   # Debian's kubectl (1.20 on bookworm)
if ((${#need[@]})); then
    if [[ $EUID -ne 0 ]]; then
        echo "missing packages: ${need[*]}; run as root or install them" >&2
        exit 1
    fi
    echo "installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
for tool in cargo rustfmt; do
    command -v "$tool" >/dev/null || { echo "$tool not found: install the Rust toolchain (rustup)" >&2; exit 1; }
done
cargo clippy --version >/dev/null 2>&1 || { echo "clippy not found: rustup component add clippy" >&2; exit 1; }

#!/usr/bin/env bash
# Installs what vubd's build, tests and benchmarks need on a Debian bookworm machine.
# Safe to run again: it only installs what is missing.
set -euo pipefail
need=()
command -v cargo >/dev/null || { echo "setup: a Rust toolchain (cargo) is required" >&2; exit 1; }
command -v cc >/dev/null || need+=(gcc)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-storage-daemon >/dev/null || need+=(qemu-utils)
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

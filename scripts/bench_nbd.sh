#!/usr/bin/env bash
# qemu-img convert of a 1 GiB image of random data (in /dev/shm) from an NBD export of
# vubd and of qemu-storage-daemon, side by side (scripts/bench.sh --nbd [--reps N]).
# Usage: scripts/bench_nbd.sh VUBD_BINARY [--reps N]
set -euo pipefail
bin=${1:?usage: bench_nbd.sh VUBD_BINARY [--reps N]}
shift
reps=3
[ "${1:-}" = "--reps" ] && reps=${2:?--reps N}
dir=$(mktemp -d /dev/shm/vubd-nbd-bench.XXXXXX)
trap 'rm -rf "$dir"' EXIT
head -c 1G /dev/urandom >"$dir/src.raw"

# Seconds of one run, for the daemon started with "$@".
runs() {
    rm -f "$dir/s.sock"
    "$@" --blockdev "file,filename=$dir/src.raw,node-name=f" \
        --nbd-server "addr.type=unix,addr.path=$dir/s.sock" \
        --export nbd,id=e,node-name=f >/dev/null 2>&1 &
    local pid=$!
    for _ in $(seq 200); do [ -S "$dir/s.sock" ] && break; sleep 0.05; done
    local out=()
    for _ in $(seq "$reps"); do
        rm -f "$dir/out.raw"
        local t0 t1
        t0=$(date +%s.%N)
        qemu-img convert -f raw -O raw "nbd+unix:///f?socket=$dir/s.sock" "$dir/out.raw"
        t1=$(date +%s.%N)
        cmp -s "$dir/src.raw" "$dir/out.raw" || { echo "copy differs" >&2; exit 1; }
        out+=("$(echo "$t1 - $t0" | bc)")
    done
    # The daemon's CPU time over all runs (user + system ticks), less load-sensitive
    # than the wall clock on a busy machine.
    local ticks
    ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    echo "${out[*]} | $(echo "scale=2; $ticks / $(getconf CLK_TCK)" | bc)"
}

echo "| daemon | qemu-img convert of 1 GiB from its NBD export, seconds per run | daemon CPU seconds, all runs |"
echo "|---|---|---|"
echo "| vubd | $(runs "$bin") |"
echo "| qemu-storage-daemon | $(runs qemu-storage-daemon) |"

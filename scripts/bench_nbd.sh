#!/usr/bin/env bash
# qemu-img convert of a 1 GiB image of random data (in /dev/shm) from an NBD export of
# vubd and of qemu-storage-daemon, side by side (scripts/bench.sh --nbd [--reps N]);
# then qemu-img bench through each daemon's NBD export of an nbd node on qemu-nbd.
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

# The nbd driver: each daemon serves over its own NBD export a node of driver nbd on
# qemu-nbd (the same image); qemu-img bench runs against that export.
rm -f "$dir/out.raw"
qemu-nbd -f raw -t -x disk -k "$dir/q.sock" "$dir/src.raw" >/dev/null 2>&1 &
qpid=$!
for _ in $(seq 200); do [ -S "$dir/q.sock" ] && break; sleep 0.05; done
chain() {
    rm -f "$dir/s.sock"
    "$@" --blockdev "{\"driver\":\"nbd\",\"node-name\":\"c\",\"server\":{\"type\":\"unix\",\"path\":\"$dir/q.sock\"},\"export\":\"disk\"}" \
        --nbd-server "addr.type=unix,addr.path=$dir/s.sock" \
        --export nbd,id=e,node-name=c,writable=on >/dev/null 2>&1 &
    local pid=$!
    for _ in $(seq 200); do [ -S "$dir/s.sock" ] && break; sleep 0.05; done
    local u="nbd+unix:///c?socket=$dir/s.sock" r w
    r=$(qemu-img bench -f raw -d 32 -c 100000 -s 4096 -S 1048576 "$u" | sed -n 's/Run completed in \(.*\) seconds./\1/p')
    w=$(qemu-img bench -f raw -w -d 32 -c 8192 -s 65536 "$u" | sed -n 's/Run completed in \(.*\) seconds./\1/p')
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    echo "$r | $w"
}
echo
echo "| daemon (nbd node on qemu-nbd, served over NBD) | 100k 4k reads qd32, s | 8192 64k writes qd32, s |"
echo "|---|---|---|"
echo "| vubd | $(chain "$bin") |"
echo "| qemu-storage-daemon | $(chain qemu-storage-daemon) |"
kill "$qpid"

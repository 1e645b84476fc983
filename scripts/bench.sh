#!/usr/bin/env bash
# Benchmark vubd against qemu-storage-daemon through libblkio (see tests/src/bin/vubd-bench.rs).
# Builds the release binaries, then runs vubd-bench with the arguments given, e.g.
#   scripts/bench.sh                  # everything, about 32 minutes on 2 vCPUs
#   scripts/bench.sh --quick          # 1 s runs
#   scripts/bench.sh --runtime 5 --reps 5 --filter null-co
#   scripts/bench.sh --poll-max-ns 0 --filter randread-4k-qd1
#   scripts/bench.sh --list [--filter ...]       # the case names, nothing run
#   scripts/bench.sh --filter 2q/1iothread --filter 4q/1iothread --no-idle
#   scripts/bench.sh --filter exports --exports 16 --no-idle   # N exports on 2 iothreads
#   scripts/bench.sh --idle-only [--idle-exports 200]  # idle CPU and idle density only
#   scripts/bench.sh --jobs [--size-mib 1024 --reps 3] [--kinds backup]   (stream/commit/backup, scripts/bench_jobs.py)
#   scripts/bench.sh --nbd [--reps 3]  # qemu-img convert of 1 GiB from vubd's and QSD's NBD exports (scripts/bench_nbd.sh)
# The rbd cases run on the Ceph cluster of $CEPH_CONF, or start one (scripts/ceph.sh)
# for the run. The loop and loop-pinned cases (a block device: a loop device in
# direct-I/O mode over the bench image, cache.direct=on; loop-pinned with vubd's
# pin-guest-memory=on) need root; without it they are skipped.
# Cases are BACKEND/WORKLOAD/CONFIG; --filter SUBSTR (repeatable) keeps the cases whose
# name contains one of them. Configs: 1q/1iothread, 2q/1iothread, 4q/1iothread,
# 4q/2iothreads (one export), and "N exports/2iothreads" (--exports N, default 8: one
# queue and one client thread per export, aggregate IOPS). Unless --no-idle, two idle
# tables follow: CPU with a connected client, and the density of --idle-exports null-co
# exports with no frontend (threads, idle CPU, RSS per export). --warmup SECS sets the
# warm-up. vubd-bench --help lists every option.
# The markdown table goes to stdout, progress to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q -p vubd -p vubd-tests --bin vubd --bin vubd-bench --bin vubd-io
target_dir="${CARGO_TARGET_DIR:-target}"
if [ "${1:-}" = "--nbd" ]; then
    shift
    exec scripts/bench_nbd.sh "$target_dir/release/vubd" "$@"
fi
if [ "${1:-}" = "--jobs" ]; then
    shift
    exec python3 scripts/bench_jobs.py --vubd "$target_dir/release/vubd" \
        --vubd-io "$target_dir/release/vubd-io" "$@"
fi
exec "$target_dir/release/vubd-bench" --vubd "$target_dir/release/vubd" "$@"

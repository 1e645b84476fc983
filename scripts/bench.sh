#!/usr/bin/env bash
# Benchmark vubd against qemu-storage-daemon through libblkio (see tests/src/bin/vubd-bench.rs).
# Builds the release binaries, then runs vubd-bench with the arguments given, e.g.
#   scripts/bench.sh --quick
#   scripts/bench.sh --runtime 5 --reps 5 --filter null-co
#   scripts/bench.sh --poll-max-ns 0 --filter randread-4k-qd1
#   scripts/bench.sh --jobs [--size-mib 1024 --reps 3]   (stream/commit, scripts/bench_jobs.py)
# The markdown table goes to stdout, progress to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q -p vubd -p vubd-tests --bin vubd --bin vubd-bench --bin vubd-io
target_dir="${CARGO_TARGET_DIR:-target}"
if [ "${1:-}" = "--jobs" ]; then
    shift
    exec python3 scripts/bench_jobs.py --vubd "$target_dir/release/vubd" \
        --vubd-io "$target_dir/release/vubd-io" "$@"
fi
exec "$target_dir/release/vubd-bench" --vubd "$target_dir/release/vubd" "$@"

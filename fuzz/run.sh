#!/bin/sh
# A long cargo-fuzz session of one target (docs/fuzzing.md):
#   fuzz/run.sh TARGET [SECONDS] [libFuzzer flags...]
# New inputs go to fuzz/corpus-run/TARGET (not committed); the committed corpus
# fuzz/corpus/TARGET is read as seeds. Crashes land in fuzz/artifacts/TARGET/.
# cargo-fuzz needs nightly-only flags; on a stable toolchain RUSTC_BOOTSTRAP=1
# lets rustc accept them.
set -eu
cd "$(dirname "$0")/.."
target=$1
secs=${2:-600}
shift
[ $# -gt 0 ] && shift
case $target in
desc_chain) max_len=40000 timeout=10 ;;
vhost_user_msg) max_len=16384 timeout=30 ;;
keyval) max_len=4096 timeout=10 ;;
qcow2_meta) max_len=262144 timeout=30 ;;
luks_header) max_len=1048576 timeout=30 ;;
*) echo "unknown target $target" >&2; exit 2 ;;
esac
mkdir -p "fuzz/corpus-run/$target" "fuzz/artifacts/$target"
export RUSTC_BOOTSTRAP=1
exec nice -n 10 cargo fuzz run -O -a "$target" \
    "fuzz/corpus-run/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$secs" -max_len="$max_len" -timeout="$timeout" \
    -rss_limit_mb=4096 -print_final_stats=1 "$@"

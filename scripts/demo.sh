#!/usr/bin/env bash
# The main job in one command: install what is needed, build vubd, serve a disk image
# (configs/default.toml: /dev/shm/vubd-demo.img on /tmp/vubd.sock) and have a real
# vhost-user-blk frontend (libblkio) write and read back data through it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== building vubd (release)"
cargo build --release -q -p vubd -p vubd-tests --bin vubd --bin vubd-demo
img=/dev/shm/vubd-demo.img
sock=/tmp/vubd.sock
[ -f "$img" ] || truncate -s 1G "$img"
echo "== starting: vubd --config configs/default.toml"
target/release/vubd --config configs/default.toml &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { echo "vubd did not create $sock" >&2; exit 1; }
echo "== frontend: vubd-demo $sock"
target/release/vubd-demo "$sock"
echo "== stopping vubd (SIGTERM: drain, flush, remove socket)"
kill -TERM $pid
wait $pid
trap - EXIT
echo "vubd exited with status 0; $img holds the data"

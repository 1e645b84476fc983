#!/usr/bin/env bash
# Runs every test: formatting and lint checks, unit tests, and the end-to-end tests that
# drive a running vubd through real frontends (libblkio, and Linux guests in QEMU).
# Exits non-zero on any failure.
#
# The end-to-end tests (tests/tests/*.rs) start the vubd binary found next to the test
# executables (target/debug/vubd, or $CARGO_TARGET_DIR/debug/vubd); set VUBD_BIN to test
# another build. Randomised tests print their seed; VUBD_TEST_SEED=<n> replays one.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
# The end-to-end tests start target/debug/vubd: build it first.
cargo build --workspace -q
# The QEMU guest tests (tests/tests/guest_*.rs) boot a kernel and initramfs made from
# the installed packages; the tests would build it on demand, this reports problems first.
scripts/build-guest.sh "${CARGO_TARGET_DIR:-target}/guest"
# One single-node Ceph cluster for the whole run (the rbd tests of both suites use
# $CEPH_CONF), stopped on exit.
ceph_dir=$(mktemp -d /tmp/vubd-test-ceph.XXXXXX)
trap 'scripts/ceph.sh stop "$ceph_dir"; rm -rf "$ceph_dir"' EXIT
CEPH_CONF=$(scripts/ceph.sh start "$ceph_dir" | sed -n 's/^CEPH_CONF=//p')
export CEPH_CONF
cargo test --workspace --no-fail-fast
# The QMP monitor tests (Python, qemu.qmp) start target/debug/vubd and drive exports
# with target/debug/vubd-io, both built above. --daemon=qsd runs them against
# qemu-storage-daemon instead, to check the expectations.
python3 -m pytest -q tests/qmp

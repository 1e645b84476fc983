#!/usr/bin/env bash
# The main job in one command: install what is needed, build vubd, serve a disk image
# (configs/default.toml: /dev/shm/vubd-demo.img on /tmp/vubd.sock), have a real
# vhost-user-blk frontend (libblkio) write and read back data through it, then boot a
# Linux guest in QEMU on the same export and run fio in it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== building vubd (release)"
cargo build --release -q -p vubd -p vubd-tests --bin vubd --bin vubd-demo
echo "== building the guest (scripts/build-guest.sh: Debian's kernel, busybox and fio)"
scripts/build-guest.sh target/guest
img=/dev/shm/vubd-demo.img
sock=/tmp/vubd.sock
[ -f "$img" ] || truncate -s 1G "$img"
echo "== starting: vubd --config configs/default.toml"
target/release/vubd --config configs/default.toml &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { echo "vubd did not create $sock" >&2; exit 1; }

echo "== frontend 1: vubd-demo $sock (libblkio)"
target/release/vubd-demo "$sock"

# The guest runs this script instead of its command loop (vubd.run= on the kernel
# command line), prints the exit status and powers off.
guest_script='
d=/sys/block/vda
echo "guest: $(uname -sr); vda: $(($(cat $d/size) / 2048)) MiB, serial $(cat $d/serial), $(ls $d/mq | wc -l) queue(s), discard up to $(cat $d/queue/discard_max_bytes) bytes"
echo "guest: fio: 64 MiB of random 4k writes, then a crc32c read-back verification"
fio --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --size=64M --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting --eta=never >/tmp/f1
r1=$?
grep -E "err=|READ:|WRITE:" /tmp/f1
echo "guest: fio: 10 s of 4k random reads and writes, queue depth 16"
fio --name=randrw --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randrw --bs=4k --size=512M --iodepth=16 --runtime=10 --time_based --group_reporting --eta=never >/tmp/f2
r2=$?
grep -E "err=|IOPS=|READ:|WRITE:" /tmp/f2
[ $r1 -eq 0 ] && [ $r2 -eq 0 ]
'
echo "== frontend 2: a Linux guest in QEMU (TCG, emulated CPU) with vhost-user-blk-pci on $sock"
echo "   (the guest's CPU is emulated: its fio numbers measure the emulator, not vubd)"
log=$(mktemp /tmp/vubd-demo-guest.XXXXXX)
timeout 600 qemu-system-x86_64 -nodefaults -no-user-config -accel tcg -m 512M \
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -kernel target/guest/vmlinuz -initrd target/guest/initramfs.gz \
    -append "console=ttyS0 quiet panic=-1 no_timer_check vubd.run=$(printf '%s' "$guest_script" | base64 -w0)" \
    -display none -serial stdio -no-reboot \
    -chardev socket,id=c0,path="$sock" -device vhost-user-blk-pci,chardev=c0,num-queues=1 \
    </dev/null 2>&1 | tr -d '\r' | tee "$log" | grep -v -e '^@@VUBD-' -e '\] reboot: Power down' \
    | sed 's/^/   | /'
if ! grep -q '^@@VUBD-RUN-EXIT-0@@' "$log"; then
    echo "the guest's fio runs failed (console output: $log)" >&2
    exit 1
fi
rm -f "$log"
echo "== the guest powered off; vubd waits for the next frontend"

echo "== stopping vubd (SIGTERM: drain, flush, remove socket)"
kill -TERM $pid
wait $pid
trap - EXIT
echo "vubd exited with status 0; $img holds the data"

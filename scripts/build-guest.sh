#!/usr/bin/env bash
# Builds a tiny Linux guest for the QEMU end-to-end tests (tests/src/guest.rs) and the
# demo, from installed Debian packages only (scripts/setup.sh installs them):
#   <outdir>/vmlinuz        the newest /boot/vmlinuz-<ver> that has /lib/modules/<ver>
#   <outdir>/initramfs.gz   cpio (newc), gzip: busybox-static with its applets, the
#                           virtio-pci, virtio-blk and ext4 modules, fio, blkdiscard,
#                           fstrim, fallocate, mkfs.ext4, GNU dd (busybox dd drops
#                           O_DIRECT when it fails), with every shared library ldd
#                           lists and the dynamic loader, and an /init that runs a
#                           command loop on the serial console (see tests/src/guest.rs)
# Usage: scripts/build-guest.sh [outdir]     (default: target/guest)
# Rebuilds only when an input changed (kernel, modules, binaries, libraries, this
# script); otherwise it returns at once.
set -euo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
out="${1:-$(dirname "$self")/../target/guest}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
# One build at a time (test processes may start it concurrently).
exec 9>"$out/.lock"
flock 9

die() { echo "build-guest: $*" >&2; exit 1; }

# --- the kernel: newest version with both a vmlinuz and a modules directory
kver=""
for k in $(ls /boot/vmlinuz-* 2>/dev/null | sed 's|^/boot/vmlinuz-||' | sort -V); do
    [ -f "/lib/modules/$k/modules.dep" ] && kver="$k"
done
[ -n "$kver" ] || die "no /boot/vmlinuz-<ver> with /lib/modules/<ver>/modules.dep (install linux-image-amd64: scripts/setup.sh)"
kernel="/boot/vmlinuz-$kver"
moddir="/lib/modules/$kver"

# --- modules, in load order (dependencies first, from modules.dep). crc32c_generic
# is ext4's and jbd2's soft dependency (crypto-crc32c): the guest has no modprobe.
want_modules=(virtio_pci virtio_blk crc32c_generic ext4)
declare -A seen=()
modules=()
mod_path() { # module name -> path relative to $moddir (from modules.dep)
    local n="$1" alt
    alt="${n//_/-}"
    awk -F: -v a="/$n.ko" -v b="/$alt.ko" \
        '{ p = $1; sub(/\.(xz|zst|gz)$/, "", p) }
         substr(p, length(p) - length(a) + 1) == a || substr(p, length(p) - length(b) + 1) == b { print $1; exit }' \
        "$moddir/modules.dep"
}
add_module() { # path relative to $moddir; adds its dependencies first
    local p="$1" d
    [ -n "${seen[$p]:-}" ] && return 0
    seen[$p]=1
    for d in $(awk -F: -v p="$p" '$1 == p { print $2; exit }' "$moddir/modules.dep"); do
        add_module "$d"
    done
    modules+=("$p")
}
is_builtin() { # module name -> success if built into the kernel (modules.builtin)
    grep -qE "/(${1}|${1//_/-})\.ko\$" "$moddir/modules.builtin" 2>/dev/null
}
for m in "${want_modules[@]}"; do
    p="$(mod_path "$m")"
    if [ -z "$p" ]; then
        is_builtin "$m" && continue
        die "module $m is neither in $moddir/modules.dep nor built in"
    fi
    add_module "$p"
done
for p in "${modules[@]}"; do
    case "$p" in
        *.ko) ;;
        *) die "compressed module $p is not supported (the guest's busybox insmod loads plain .ko files)" ;;
    esac
done

# --- programs and their libraries
busybox="$(command -v busybox || true)"
[ -n "$busybox" ] || die "busybox not found (install busybox-static)"
ldd "$busybox" >/dev/null 2>&1 && die "$busybox is dynamically linked: install busybox-static"
progs=()
for p in fio blkdiscard fstrim fallocate mkfs.ext4 mke2fs dd; do
    path="$(PATH="/usr/sbin:/usr/bin:/sbin:/bin:$PATH" command -v "$p" || true)"
    [ -n "$path" ] || die "$p not found (install fio, util-linux, e2fsprogs, coreutils)"
    progs+=("$path")
done
libs=()
for p in "${progs[@]}"; do
    while read -r lib; do
        libs+=("$lib")
    done < <(ldd "$p" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
done
mapfile -t libs < <(printf '%s\n' "${libs[@]}" | sort -u)

# --- up to date?
inputs=("$self" "$kernel" "$busybox" "${progs[@]}" "${libs[@]}")
for p in "${modules[@]}"; do inputs+=("$moddir/$p"); done
[ -f /etc/mke2fs.conf ] && inputs+=(/etc/mke2fs.conf)
stamp="$( { sha256sum "$self"; for f in "${inputs[@]}"; do stat -L -c '%n %s %Y' "$f"; done; } | sha256sum | cut -d' ' -f1)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] \
    && [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.gz" ]; then
    exit 0
fi
echo "build-guest: building $out (kernel $kver)" >&2

root="$(mktemp -d "$out/root.XXXXXX")"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,mnt,root,lib/modules}

# busybox and its applets (real tools from util-linux/e2fsprogs come first in PATH)
cp "$busybox" "$root/bin/busybox"
for a in $("$busybox" --list); do
    [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"
done

# Debian's busybox ash runs its own applets before searching PATH
# (FEATURE_SH_STANDALONE): shell functions, which come first, select the real tools.
applets=" $("$busybox" --list | tr '\n' ' ') "
: >"$root/etc/vubd-prelude.sh"
for p in "${progs[@]}"; do
    mkdir -p "$root$(dirname "$p")"
    cp -L "$p" "$root$p"
    n="$(basename "$p")"
    case "$applets" in
        *" $n "*) printf '%s() { %s "$@"; }\n' "$n" "$p" >>"$root/etc/vubd-prelude.sh" ;;
    esac
done
for l in "${libs[@]}"; do
    mkdir -p "$root$(dirname "$l")"
    cp -L "$l" "$root$l"
done
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"

: >"$root/lib/modules/load-order"
for p in "${modules[@]}"; do
    cp "$moddir/$p" "$root/lib/modules/"
    basename "$p" >>"$root/lib/modules/load-order"
done

cat >"$root/init" <<'EOF'
#!/bin/sh
# vubd test guest. Runs as PID 1: mounts, loads modules, then serves commands on the
# serial console. Protocol (tests/src/guest.rs):
#   host -> guest: one line "<id> <base64 of a shell script>"
#   guest -> host: "@@VUBD-BEGIN-<id>@@", the script's output (stdout and stderr, not a
#   tty), then "\n@@VUBD-END-<id>-<exit status>@@". Echo is off, so the markers never
#   appear in what the host sends; kernel messages go to the console only at
#   KERN_EMERG (read them with dmesg).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
[ -t 0 ] || exec </dev/ttyS0 >/dev/ttyS0 2>&1
echo 1 >/proc/sys/kernel/printk
while read -r m; do
    insmod "/lib/modules/$m" || echo "@@VUBD-INSMOD-FAILED $m@@"
done </lib/modules/load-order
# virtio-blk probes asynchronously: give the disks a moment to appear.
n=0
while [ $n -lt 50 ] && [ -d /sys/bus/virtio/devices ] \
    && [ "$(ls /sys/bus/virtio/devices | wc -l)" -gt "$(ls -d /sys/block/vd* 2>/dev/null | wc -l)" ]; do
    sleep 0.1
    n=$((n + 1))
done
# vubd.run=<base64 script> on the kernel command line (scripts/demo.sh): run it, print
# its exit status and power off, without the command loop.
run="$(sed -n 's/.*vubd\.run=\([^ ]*\).*/\1/p' /proc/cmdline)"
if [ -n "$run" ]; then
    { cat /etc/vubd-prelude.sh; echo "$run" | base64 -d; } >/tmp/.cmd
    { sh /tmp/.cmd; echo $? >/tmp/.rc; } </dev/null 2>&1 | cat
    echo "@@VUBD-RUN-EXIT-$(cat /tmp/.rc)@@"
    sync
    poweroff -f
fi
stty -echo
echo "@@VUBD-READY@@"
while read -r id b64; do
    [ -n "$id" ] || continue
    { cat /etc/vubd-prelude.sh; echo "$b64" | base64 -d; } >/tmp/.cmd
    echo "@@VUBD-BEGIN-$id@@"
    { sh /tmp/.cmd; echo $? >/tmp/.rc; } </dev/null 2>&1 | cat
    printf '\n@@VUBD-END-%s-%s@@\n' "$id" "$(cat /tmp/.rc)"
done
echo "@@VUBD-EOF@@"
poweroff -f
EOF
chmod 755 "$root/init"

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) \
    | gzip -1 >"$out/initramfs.gz.tmp"
cp "$kernel" "$out/vmlinuz.tmp"
mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$kver" >"$out/kernel-version"
echo "$stamp" >"$out/stamp"
echo "build-guest: $out/vmlinuz, $out/initramfs.gz ($(du -h "$out/initramfs.gz" | cut -f1))" >&2

#!/usr/bin/env bash
# Installs what vubd's build, tests and benchmarks need on a Debian bookworm machine.
# Safe to run again: it only installs what is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
updated=""
apt_install() { # [apt-get options] packages...
    [ -n "$updated" ] || { apt-get update -qq; updated=1; }
    apt-get install -y -qq "$@" >/dev/null
}

command -v cargo >/dev/null || { echo "setup: a Rust toolchain (cargo) is required" >&2; exit 1; }

# The QEMU guest of the end-to-end tests (tests/src/guest.rs, scripts/build-guest.sh):
# QEMU, a kernel with modules, busybox, fio, and the tools build-guest.sh copies in.
guest=()
command -v qemu-system-x86_64 >/dev/null || guest+=(qemu-system-x86)
kernel_ok=""
for k in /boot/vmlinuz-*; do
    [ -f "$k" ] && [ -f "/lib/modules/${k#/boot/vmlinuz-}/modules.dep" ] && kernel_ok=1
done
[ -n "$kernel_ok" ] || guest+=(linux-image-amd64)
# busybox-static, not a dynamically linked busybox
if ! command -v busybox >/dev/null || ldd "$(command -v busybox)" >/dev/null 2>&1; then
    guest+=(busybox-static)
fi
command -v fio >/dev/null || guest+=(fio)
command -v cpio >/dev/null || guest+=(cpio)
PATH="$PATH:/usr/sbin:/sbin" command -v mkfs.ext4 >/dev/null || guest+=(e2fsprogs)
for t in blkdiscard fstrim fallocate flock; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$t" >/dev/null || { guest+=(util-linux); break; }
done
if [ ${#guest[@]} -gt 0 ]; then
    echo "setup: installing ${guest[*]}"
    # INITRD=No: the guest brings its own initramfs; skip the slow update-initramfs.
    INITRD=No apt_install --no-install-recommends "${guest[@]}"
    # qemu-system-x86 can replace an installed qemu-utils with its own version: make
    # sure qemu-img and qemu-storage-daemon are (still) there.
    case " ${guest[*]} " in
        *" qemu-system-x86 "*) apt_install qemu-utils ;;
    esac
fi

need=()
command -v cc >/dev/null || need+=(gcc)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-storage-daemon >/dev/null || need+=(qemu-utils)
# NBD clients and servers for the NBD export and driver tests.
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v nbdkit >/dev/null || need+=(nbdkit)
# systemd-socket-activate and systemd-analyze, for the socket activation tests.
command -v systemd-socket-activate >/dev/null || need+=(systemd)
# Test certificates for NBD over TLS (scripts/tls-certs.sh).
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    apt_install "${need[@]}"
fi
# Ceph, for the rbd driver's tests and benchmarks: the single-node cluster of
# scripts/ceph.sh (ceph-mon, ceph-mgr, ceph-osd), the `rbd` tool (ceph-common), librbd
# (loaded by vubd at run time; no build dependency) and qemu-storage-daemon's rbd module
# (qemu-block-extra) for the side-by-side checks.
ceph=()
for t in ceph-mon ceph-mgr ceph-osd; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$t" >/dev/null || ceph+=("$t")
done
command -v rbd >/dev/null || ceph+=(ceph-common)
ldconfig -p | grep -q 'librbd\.so\.1' || ceph+=(librbd1)
ls /usr/lib/*/qemu/block-rbd.so >/dev/null 2>&1 || ceph+=(qemu-block-extra)
if [ ${#ceph[@]} -gt 0 ]; then
    echo "setup: installing ${ceph[*]}"
    apt_install --no-install-recommends "${ceph[@]}"
fi
# libvirt, for the libvirt domain test (tests/tests/libvirt.rs): Debian's libvirtd with
# its QEMU driver, the libvirt-qemu user and libvirt's directories (libvirt-daemon-system)
# and virsh. Nothing is started here: the test runs a private libvirtd of its own.
libvirt=""
PATH="$PATH:/usr/sbin:/sbin" command -v libvirtd >/dev/null || libvirt=1
command -v virsh >/dev/null || libvirt=1
ls /usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so >/dev/null 2>&1 || libvirt=1
getent passwd libvirt-qemu >/dev/null || libvirt=1
for d in /etc/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
    [ -d "$d" ] || libvirt=1
done
if [ -n "$libvirt" ]; then
    echo "setup: installing libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients"
    apt_install --no-install-recommends libvirt-daemon-system libvirt-daemon-driver-qemu \
        libvirt-clients
fi
# The QMP tests (tests/qmp/, run by scripts/test.sh) use the qemu.qmp client library
# and pytest.
if ! python3 -c 'import qemu.qmp, pytest' >/dev/null 2>&1; then
    echo "setup: installing the Python packages qemu.qmp and pytest"
    python3 -m pip install --quiet --disable-pip-version-check qemu.qmp pytest
fi

#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for development and the RBD tests.
#
#   scripts/ceph.sh start DIR [--cephx]
#                               starts one monitor, one manager and one OSD whose store is
#                               in memory (memstore), all on 127.0.0.1, creates the pool
#                               `rbd` (size 1) and prints CEPH_CONF=DIR/ceph.conf
#   scripts/ceph.sh stop DIR    stops them (nothing running: nothing to do)
#
# Authentication is off (auth ... = none): the cluster is for tests on this host only.
# With --cephx it is on (cephx everywhere): every daemon and client.admin get keys,
# DIR/<name>.keyring holds each (the configuration points there, so `rbd -c` and
# `ceph -c` work as client.admin), and start also prints
# CEPH_KEYRING=DIR/client.admin.keyring.
# Everything, logs included, lives under DIR. Needs Debian's ceph-mon, ceph-mgr,
# ceph-osd and ceph-common (scripts/setup.sh installs them).
# CEPH_OSD_BYTES sets the OSD's memory store size (default 3 GiB).
set -euo pipefail

usage() {
    echo "usage: $0 start DIR [--cephx] | stop DIR" >&2
    exit 2
}
case $# in
    2) ;;
    3) [ "$1" = start ] && [ "$3" = --cephx ] || usage ;;
    *) usage ;;
esac
cmd=$1
dir=$2
cephx=""
[ $# -eq 3 ] && cephx=1
PATH="$PATH:/usr/sbin:/sbin"

# A free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

stop() {
    local pids=() f pid
    for f in "$dir"/run/*.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f" 2>/dev/null || true)
        rm -f "$f"
        [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && pids+=("$pid")
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    kill "${pids[@]}" 2>/dev/null || true
    # Up to 20 s for a clean exit, then SIGKILL.
    for _ in $(seq 200); do
        local alive=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        [ ${#alive[@]} -gt 0 ] || return 0
        sleep 0.1
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
}

start() {
    for t in ceph-mon ceph-mgr ceph-osd ceph rbd monmaptool ceph-authtool; do
        command -v "$t" >/dev/null || {
            echo "ceph.sh: $t is missing (scripts/setup.sh installs Ceph)" >&2
            exit 1
        }
    done
    stop
    rm -rf "$dir"
    mkdir -p "$dir"/{mon,mgr,osd,run,log}
    dir=$(cd "$dir" && pwd)
    local conf=$dir/ceph.conf fsid port2 port1 uuid id auth=none keyring=/dev/null
    if [ -n "$cephx" ]; then
        auth=cephx
        keyring="$dir/\$name.keyring"
    fi
    fsid=$(cat /proc/sys/kernel/random/uuid)
    port2=$(free_port)
    port1=$(free_port)
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port2,v1:127.0.0.1:$port1]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = $auth
auth service required = $auth
auth client required = $auth
auth supported = $auth
keyring = $keyring
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
mon data = $dir/mon/\$name
mgr data = $dir/mgr/\$name
osd data = $dir/osd/\$name
osd objectstore = memstore
memstore device bytes = ${CEPH_OSD_BYTES:-3221225472}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon warn on insecure global id reclaim allowed = false
mgr initial modules =
[client]
# Clients (rbd, vubd, qemu-storage-daemon) get no admin socket: several run at once.
admin socket =
log file = $dir/log/client.log
EOF
    local mon_keyring=()
    if [ -n "$cephx" ]; then
        # The monitor's key, and client.admin's (which the monitor learns at mkfs).
        ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. \
            --cap mon 'allow *' >/dev/null
        ceph-authtool --create-keyring "$dir/client.admin.keyring" --gen-key -n client.admin \
            --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' \
            >/dev/null
        ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/client.admin.keyring" >/dev/null
        mon_keyring=(--keyring "$dir/mon.keyring")
    fi
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port2,v1:127.0.0.1:$port1]" \
        "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" "${mon_keyring[@]}" >/dev/null 2>&1 || {
        echo "ceph.sh: ceph-mon --mkfs failed" >&2
        exit 1
    }
    ceph-mon -c "$conf" -i a 2>>"$dir/log/daemons.err"
    if [ -n "$cephx" ]; then
        timeout 60 ceph -c "$conf" auth get-or-create mgr.x mon 'allow profile mgr' \
            osd 'allow *' mds 'allow *' -o "$dir/mgr.x.keyring" >/dev/null 2>&1 || {
            echo "ceph.sh: the monitor does not answer (see $dir/log/mon.a.log)" >&2
            exit 1
        }
    fi
    ceph-mgr -c "$conf" -i x 2>>"$dir/log/daemons.err"
    uuid=$(cat /proc/sys/kernel/random/uuid)
    id=$(timeout 60 ceph -c "$conf" osd new "$uuid") || {
        echo "ceph.sh: the monitor does not answer (see $dir/log/mon.a.log)" >&2
        exit 1
    }
    if [ -n "$cephx" ]; then
        timeout 60 ceph -c "$conf" auth get-or-create "osd.$id" mon 'allow profile osd' \
            mgr 'allow profile osd' osd 'allow *' -o "$dir/osd.$id.keyring" >/dev/null
    fi
    mkdir -p "$dir/osd/osd.$id"
    ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$uuid" >/dev/null 2>&1 || {
        echo "ceph.sh: ceph-osd --mkfs failed (see $dir/log/osd.$id.log)" >&2
        exit 1
    }
    ceph-osd -c "$conf" -i "$id" 2>>"$dir/log/daemons.err"
    local up=""
    for _ in $(seq 600); do
        timeout 10 ceph -c "$conf" osd stat 2>/dev/null | grep -q '1 up' && { up=1; break; }
        sleep 0.1
    done
    [ -n "$up" ] || {
        echo "ceph.sh: the OSD did not come up in 60 s (see $dir/log/osd.$id.log)" >&2
        exit 1
    }
    timeout 60 ceph -c "$conf" osd pool create rbd 8 8 >/dev/null 2>&1
    timeout 60 ceph -c "$conf" osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null 2>&1
    timeout 60 rbd -c "$conf" pool init rbd || {
        echo "ceph.sh: rbd pool init failed" >&2
        exit 1
    }
    echo "CEPH_CONF=$conf"
    [ -z "$cephx" ] || echo "CEPH_KEYRING=$dir/client.admin.keyring"
}

case $cmd in
    start) start ;;
    stop)
        [ -d "$dir" ] || exit 0
        stop
        ;;
    *) usage ;;
esac

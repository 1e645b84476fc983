"""Internal snapshots over QMP: blockdev-snapshot-internal-sync and
blockdev-snapshot-delete-internal-sync on qcow2 nodes, under I/O, checked afterwards
with qemu-img; and their errors, which are QEMU's (the tests pass against
qemu-storage-daemon too)."""

import asyncio
import json
import subprocess
import time
from pathlib import Path

from conftest import MIB, IoProc, error, execute, export_args, io_ok, make_image

SNAPSHOT_KEYS = {"id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec"}


def qemu_img(*args) -> str:
    p = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    assert p.returncode == 0, f"qemu-img {' '.join(map(str, args))}: {p.stdout}{p.stderr}"
    return p.stdout


def qcow2_args(tmp: Path, node: str, size: int = 64 * MIB, read_only: bool = False) -> list[str]:
    """A new qcow2 image ``<node>.qcow2``: ``--blockdev file`` (node ``<node>-file``)
    and ``--blockdev qcow2`` (node ``<node>``) over it."""
    img = tmp / f"{node}.qcow2"
    if not img.exists():
        qemu_img("create", "-f", "qcow2", img, size)
    ro = ",read-only=on" if read_only else ""
    return [
        "--blockdev",
        f"file,node-name={node}-file,filename={img}{ro}",
        "--blockdev",
        f"qcow2,node-name={node},file={node}-file{ro}",
    ]


def check_clean(img: Path):
    out = json.loads(qemu_img("check", "--output=json", img))
    assert out.get("corruptions", 0) == 0 and out.get("leaks", 0) == 0, out
    assert "check-errors" not in out or out["check-errors"] == 0, out


def snapshot_names(img: Path) -> list[str]:
    info = json.loads(qemu_img("info", "-U", "--output=json", img))
    return [s["name"] for s in info.get("snapshots", [])]


async def node_snapshots(c, node: str):
    for n in await execute(c, "query-named-block-nodes", {"flat": True}):
        if n["node-name"] == node:
            return n["image"].get("snapshots")
    raise AssertionError(f"no node {node}")


async def test_snapshot_create_query_delete(start_daemon, tmp):
    d = start_daemon(qcow2_args(tmp, "q") + export_args("e0", "q", tmp / "d-e0.sock"))
    sock = tmp / "d-e0.sock"
    img = tmp / "q.qcow2"
    io_ok("write", "--socket", sock, "--offset", 0, "--len", 2 * MIB, "--seed", 1)
    async with d.qmp() as c:
        assert await node_snapshots(c, "q") is None
        before = time.time()
        assert await execute(c, "blockdev-snapshot-internal-sync", {"device": "q", "name": "a"}) == {}
        io_ok("write", "--socket", sock, "--offset", MIB, "--len", 2 * MIB, "--seed", 2)
        # A name that is another snapshot's id is a name like any other.
        await execute(c, "blockdev-snapshot-internal-sync", {"device": "q", "name": "1"})
        snaps = await node_snapshots(c, "q")
        assert [(s["id"], s["name"]) for s in snaps] == [("1", "a"), ("2", "1")], snaps
        for s in snaps:
            assert SNAPSHOT_KEYS <= set(s), s
            assert s["vm-state-size"] == 0, s
            assert abs(s["date-sec"] - before) < 60, s
            assert 0 <= s["date-nsec"] < 1_000_000_000 and 0 <= s["vm-clock-nsec"] < 1_000_000_000, s
        # The child node keeps no snapshots of its own.
        assert await node_snapshots(c, "q-file") is None
        # By name: the name, not the id "1".
        gone = await execute(c, "blockdev-snapshot-delete-internal-sync", {"device": "q", "name": "1"})
        assert gone == snaps[1], gone
        # By id and name together.
        gone = await execute(
            c, "blockdev-snapshot-delete-internal-sync", {"device": "q", "id": "1", "name": "a"}
        )
        assert gone == snaps[0], gone
        assert await node_snapshots(c, "q") is None
        await execute(c, "blockdev-snapshot-internal-sync", {"device": "q", "name": "kept"})
        io_ok("verify", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 1)
        io_ok("verify", "--socket", sock, "--offset", MIB, "--len", 2 * MIB, "--seed", 2)
    d.expect_exit = True
    assert d.stop() is None
    check_clean(img)
    assert snapshot_names(img) == ["kept"]


async def test_snapshot_under_io_then_apply_with_qemu_img(start_daemon, tmp, io_procs):
    """Snapshots taken while `vubd-io stress` writes and verifies the first 16 MiB: no
    request fails or reads wrong data. Afterwards qemu-img finds the image clean, lists
    the snapshots, and applying one gives the disk as it was when it was taken."""
    sock = tmp / "d-e0.sock"
    img = tmp / "q.qcow2"
    d = start_daemon(qcow2_args(tmp, "q") + export_args("e0", "q", sock, extra=",num-queues=2"))
    io_ok("write", "--socket", sock, "--offset", 32 * MIB, "--len", 4 * MIB, "--seed", 7)
    p = IoProc(
        tmp, "stress", "--socket", sock, "--seconds", 3, "--seed", 11,
        "--queues", 2, "--span", 16 * MIB,
    )
    io_procs.append(p)
    await p.ready()
    async with d.qmp() as c:
        for i in range(5):
            await execute(c, "blockdev-snapshot-internal-sync", {"device": "q", "name": f"s{i}"})
            await asyncio.sleep(0.25)
        r = await p.result()
        assert r["rc"] == 0 and r["ok"], r
        # The region outside the stress span changes after the last snapshot.
        io_ok("write", "--socket", sock, "--offset", 32 * MIB, "--len", 4 * MIB, "--seed", 8)
        await execute(c, "blockdev-snapshot-delete-internal-sync", {"device": "q", "name": "s2"})
    d.expect_exit = True
    assert d.stop() is None
    check_clean(img)
    assert snapshot_names(img) == ["s0", "s1", "s3", "s4"]
    qemu_img("snapshot", "-a", "s4", img)
    check_clean(img)
    d2 = start_daemon(qcow2_args(tmp, "q") + export_args("e1", "q", tmp / "d2-e1.sock"), name="d2")
    io_ok("verify", "--socket", tmp / "d2-e1.sock", "--offset", 32 * MIB, "--len", 4 * MIB, "--seed", 7)
    d2.expect_exit = True
    assert d2.stop() is None


async def test_snapshot_errors(start_daemon, tmp):
    ro_img = tmp / "ro.qcow2"
    qemu_img("create", "-f", "qcow2", ro_img, 16 * MIB)
    qemu_img("snapshot", "-c", "old", ro_img)
    raw = make_image(tmp / "r.img", 16 * MIB)
    args = [
        *qcow2_args(tmp, "q"),
        *qcow2_args(tmp, "ro", read_only=True),
        "--blockdev", f"file,node-name=r-file,filename={raw}",
        "--blockdev", "raw,node-name=r,file=r-file",
        "--blockdev", "null-co,node-name=nul",
        *export_args("e0", "q", tmp / "d-e0.sock"),
    ]
    d = start_daemon(args)
    create, delete = "blockdev-snapshot-internal-sync", "blockdev-snapshot-delete-internal-sync"
    async with d.qmp() as c:
        await execute(c, create, {"device": "q", "name": "s1"})
        cases = [
            (create, {"device": "q"}, "Parameter 'name' is missing"),
            (create, {"name": "x"}, "Parameter 'device' is missing"),
            (create, {"device": "q", "name": 5}, "Invalid parameter type for 'name', expected: string"),
            (create, {"device": "q", "name": "x", "bogus": 1}, "Parameter 'bogus' is unexpected"),
            (create, {"device": "nosuch", "name": "x"}, "Cannot find device='nosuch' nor node-name='nosuch'"),
            # The export id is not a device.
            (create, {"device": "e0", "name": "x"}, "Cannot find device='e0' nor node-name='e0'"),
            (create, {"device": "q-file", "name": "x"}, "Need a root block node"),
            (create, {"device": "ro", "name": "x"}, "Device 'ro' is read only"),
            (create, {"device": "r", "name": "x"},
             "Block format 'raw' used by device 'r' does not support internal snapshots"),
            (create, {"device": "nul", "name": "x"},
             "Block format 'null-co' used by device 'nul' does not support internal snapshots"),
            (create, {"device": "q", "name": ""}, "Name is empty"),
            (create, {"device": "q", "name": "s1"}, "Snapshot with name 's1' already exists on device 'q'"),
            (delete, {"device": "q"}, "Name or id must be provided"),
            (delete, {"name": "s1"}, "Parameter 'device' is missing"),
            (delete, {"device": "q", "id": 1}, "Invalid parameter type for 'id', expected: string"),
            (delete, {"device": "q", "name": "s1", "x": 1}, "Parameter 'x' is unexpected"),
            (delete, {"device": "nosuch", "name": "s1"}, "Cannot find device='nosuch' nor node-name='nosuch'"),
            (delete, {"device": "q-file", "name": "s1"}, "Need a root block node"),
            (delete, {"device": "r", "name": "s1"}, "Failed to get a snapshot list: Operation not supported"),
            (delete, {"device": "nul", "id": "1"}, "Failed to get a snapshot list: Operation not supported"),
            (delete, {"device": "q", "name": "nope"},
             "Snapshot with id 'null' and name 'nope' does not exist on device 'q'"),
            (delete, {"device": "q", "id": "9"},
             "Snapshot with id '9' and name 'null' does not exist on device 'q'"),
            (delete, {"device": "q", "id": "2", "name": "s1"},
             "Snapshot with id '2' and name 's1' does not exist on device 'q'"),
            (delete, {"device": "ro", "name": "old"},
             "Failed to remove snapshot from snapshot list: Operation not permitted"),
        ]
        for cmd, args, desc in cases:
            await error(c, cmd, args, desc=desc)
        # Nothing changed.
        assert [s["name"] for s in await node_snapshots(c, "q")] == ["s1"]
        # (qemu-storage-daemon 7.2 drops the snapshot from its own list when the
        # read-only delete fails; the image keeps it.)
        assert snapshot_names(ro_img) == ["old"]
        io_ok("write", "--socket", tmp / "d-e0.sock", "--offset", 0, "--len", MIB, "--seed", 3)
        io_ok("verify", "--socket", tmp / "d-e0.sock", "--offset", 0, "--len", MIB, "--seed", 3)

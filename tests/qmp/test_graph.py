"""Block graph commands over QMP: external snapshots (blockdev-snapshot with an overlay
added by blockdev-add, blockdev-snapshot-sync creating or opening the overlay file),
change-backing-file, block-set-write-threshold with BLOCK_WRITE_THRESHOLD,
x-debug-query-block-graph, permission conflicts between exports, format nodes and jobs,
block_resize checks, blockdev-reopen (read-only, backing, discard, detect-zeroes, cache;
atomic lists) and the copy-on-read filter. Data is checked through the export (vubd-io)
and offline with qemu-img. Every expectation is qemu-storage-daemon 7.2's (the tests pass
with ``--daemon=qsd``) except the two vubd-only tests, where qemu-storage-daemon aborts or
hangs."""

import asyncio

import pytest
from qemu.qmp import ExecuteError

from chains import (
    KIB,
    JobEvents,
    allocated_depths,
    backing_of,
    chain_args,
    check_clean,
    compare,
    expected_disk,
    export_node,
    img_info,
    make_chain,
    nodes_by_name,
    pattern,
    qemu_img,
    read_disk,
    run,
    seed_runs,
    verify_export,
    write_raw,
)
from conftest import MIB, error, execute, export_args, export_opts, io_ok, make_image, vubd_io

SIZE = 4 * MIB
BASE = ("base", [(0, SIZE, 1)])
MID = ("mid", [(2 * MIB, 128 * KIB, 3)])
TOP = ("top", [(MIB, 64 * KIB, 2)])


def path(tmp, name):
    return str(tmp / f"{name}.qcow2")


def raw_args(tmp, node, size=SIZE):
    """A raw node ``<node>`` over a file node ``<node>-file`` (both named, separately
    added) on a new sparse image."""
    img = make_image(tmp / f"{node}.img", size)
    return [
        "--blockdev", f"file,node-name={node}-file,filename={img}",
        "--blockdev", f"raw,node-name={node},file={node}-file",
    ]


# ---------------------------------------------------------------------------------------
# blockdev-snapshot


async def test_blockdev_snapshot(start_daemon, tmp):
    """An overlay created with qemu-img (backing file in its header), added with
    backing: null, then put over the exported node: the export moves to it, the old
    node becomes its read-only backing node, new writes land in the overlay."""
    make_chain(tmp, [BASE], SIZE)
    sock = tmp / "d-e0.sock"
    d = start_daemon(chain_args(tmp, ["base"]) + export_args("e0", "base", sock))
    ov = tmp / "ov.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", path(tmp, "base"), "-F", "qcow2", ov, SIZE)
    async with d.qmp() as c:
        assert (await nodes_by_name(c))["base"]["ro"] is False
        await execute(c, "blockdev-add", {
            "driver": "qcow2", "node-name": "ov", "backing": None,
            "file": {"driver": "file", "filename": str(ov), "node-name": "ov-file"}})
        assert await execute(c, "blockdev-snapshot", {"node": "base", "overlay": "ov"}) == {}
        assert await export_node(c, "e0") == "ov"
        nodes = await nodes_by_name(c)
        assert nodes["ov"]["backing_file"] == path(tmp, "base"), nodes["ov"]
        assert nodes["ov"]["ro"] is False
        # The old top is now read-only (its file node, added on its own, is not).
        assert nodes["base"]["ro"] is True and nodes["base-file"]["ro"] is False, nodes["base"]
        io_ok("write", "--socket", sock, "--offset", MIB, "--len", 64 * KIB, "--seed", 2)
        verify_export(sock, seed_runs([BASE, TOP], SIZE))
        # base has a parent now: no second snapshot of it.
        await error(c, "blockdev-snapshot", {"node": "base", "overlay": "ov"},
                    desc="Node 'base' is busy: node is used as backing hd of 'ov'")
        await error(c, "blockdev-del", {"node-name": "ov"}, desc="Node ov is in use")
    d.expect_exit = True
    assert d.stop() is None
    chain = img_info(ov, chain=True)
    assert [i["filename"] for i in chain] == [str(ov), path(tmp, "base")], chain
    compare(write_raw(tmp / "ref.raw", expected_disk([BASE, TOP], SIZE)), ov)
    assert allocated_depths(ov, MIB, 64 * KIB) == {0}
    assert allocated_depths(ov, 0, MIB) == {1}
    # The old image did not change.
    assert read_disk(tmp / "base.qcow2", tmp) == pattern(1, 0, SIZE)
    check_clean(ov)
    check_clean(tmp / "base.qcow2")


async def test_blockdev_snapshot_errors(start_daemon, tmp):
    make_chain(tmp, [("b", []), ("t", [])], SIZE)
    args = chain_args(tmp, ["b", "t"]) + raw_args(tmp, "r") + raw_args(tmp, "r2")
    d = start_daemon(args + ["--blockdev", "null-co,node-name=nul"])
    s = "blockdev-snapshot"
    async with d.qmp() as c:
        cases = [
            ({"node": "r"}, "Parameter 'overlay' is missing"),
            ({"overlay": "r"}, "Parameter 'node' is missing"),
            ({"node": "r", "overlay": "nosuch"}, "Cannot find device='nosuch' nor node-name='nosuch'"),
            ({"node": "nosuch", "overlay": "r2"}, "Cannot find device='nosuch' nor node-name='nosuch'"),
            ({"node": "r", "overlay": "t"}, "The overlay already has a backing image"),
            ({"node": "r", "overlay": "r2"}, "The overlay does not support backing images"),
            ({"node": "r", "overlay": "nul"}, "The overlay does not support backing images"),
            ({"node": "r", "overlay": "t-file"}, "The overlay is already in use"),
            ({"node": "t-file", "overlay": "r"}, "The overlay does not support backing images"),
            ({"node": "b", "overlay": "t"}, "Node 'b' is busy: node is used as backing hd of 't'"),
        ]
        for a, desc in cases:
            await error(c, s, a, desc=desc)
        nodes = await nodes_by_name(c)
        assert "backing_file" not in nodes["r2"] and nodes["r"]["ro"] is False


async def test_blockdev_snapshot_sync(start_daemon, tmp):
    """blockdev-snapshot-sync creates the overlay file (qcow2, the old node's file name
    as backing file) and puts it over the node; mode=existing opens a file made
    beforehand."""
    make_chain(tmp, [BASE], SIZE)
    sock = tmp / "d-e0.sock"
    d = start_daemon(chain_args(tmp, ["base"]) + export_args("e0", "base", sock))
    s1, s2 = tmp / "s1.qcow2", tmp / "s2.qcow2"
    sync = "blockdev-snapshot-sync"
    async with d.qmp() as c:
        assert await execute(c, sync, {
            "node-name": "base", "snapshot-file": str(s1), "snapshot-node-name": "s1"}) == {}
        assert await export_node(c, "e0") == "s1"
        info = img_info(s1)
        assert (info["format"], info["virtual-size"]) == ("qcow2", SIZE), info
        assert info["backing-filename"] == path(tmp, "base"), info
        assert info["backing-filename-format"] == "qcow2", info
        nodes = await nodes_by_name(c)
        assert nodes["s1"]["backing_file"] == path(tmp, "base")
        assert nodes["s1"]["drv"] == "qcow2" and nodes["s1"]["ro"] is False
        assert nodes["base"]["ro"] is True
        io_ok("write", "--socket", sock, "--offset", MIB, "--len", 64 * KIB, "--seed", 2)

        # An overlay made beforehand (its header already names s1).
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(s1), "-F", "qcow2", s2, SIZE)
        assert await execute(c, sync, {
            "node-name": "s1", "snapshot-file": str(s2), "snapshot-node-name": "s2",
            "mode": "existing", "format": "qcow2"}) == {}
        assert await export_node(c, "e0") == "s2"
        assert (await nodes_by_name(c))["s2"]["backing_file"] == str(s1)
        io_ok("write", "--socket", sock, "--offset", 2 * MIB, "--len", 128 * KIB, "--seed", 3)
        verify_export(sock, seed_runs([BASE, TOP, MID], SIZE))
    d.expect_exit = True
    assert d.stop() is None
    chain = img_info(s2, chain=True)
    assert [i["filename"] for i in chain] == [str(s2), str(s1), path(tmp, "base")], chain
    compare(write_raw(tmp / "ref.raw", expected_disk([BASE, TOP, MID], SIZE)), s2)
    assert allocated_depths(s2, 2 * MIB, 128 * KIB) == {0}
    assert allocated_depths(s2, MIB, 64 * KIB) == {1}
    assert read_disk(tmp / "base.qcow2", tmp) == pattern(1, 0, SIZE)
    for img in (s1, s2, tmp / "base.qcow2"):
        check_clean(img)


async def test_blockdev_snapshot_sync_errors(start_daemon, tmp):
    make_chain(tmp, [BASE], SIZE)
    d = start_daemon(chain_args(tmp, ["base"]) + raw_args(tmp, "r") + export_args("e0", "base", tmp / "d-e0.sock"))
    sync = "blockdev-snapshot-sync"

    def f(name):
        return str(tmp / name)

    async with d.qmp() as c:
        cases = [
            ({"node-name": "base", "snapshot-node-name": "s"}, "Parameter 'snapshot-file' is missing"),
            ({"snapshot-file": f("a.qcow2")}, "Cannot find device='' nor node-name=''"),
            # A device is a BlockBackend name, which nodes added with --blockdev lack.
            ({"device": "base", "snapshot-file": f("a.qcow2"), "snapshot-node-name": "s"},
             "Cannot find device='base' nor node-name=''"),
            ({"node-name": "nosuch", "snapshot-file": f("a.qcow2"), "snapshot-node-name": "s"},
             "Cannot find device='' nor node-name='nosuch'"),
            ({"node-name": "base", "snapshot-file": f("a.qcow2")}, "New overlay node-name missing"),
            ({"node-name": "base", "snapshot-file": f("a.qcow2"), "snapshot-node-name": "r"},
             "New overlay node-name already in use"),
            ({"node-name": "base", "snapshot-file": f("a.qcow2"), "snapshot-node-name": "s", "format": "bogus"},
             "Unknown file format 'bogus'"),
            ({"node-name": "base", "snapshot-file": f("a.qcow2"), "snapshot-node-name": "s", "mode": "bogus"},
             "Parameter 'mode' does not accept value 'bogus'"),
            ({"node-name": "base", "snapshot-file": f("none.qcow2"), "snapshot-node-name": "s", "mode": "existing"},
             f"Could not open '{f('none.qcow2')}': No such file or directory"),
            ({"node-name": "base", "snapshot-file": f("nodir/a.qcow2"), "snapshot-node-name": "s"},
             f"Could not create '{f('nodir/a.qcow2')}': No such file or directory"),
            ({"node-name": "base", "snapshot-file": f("a.raw"), "snapshot-node-name": "s", "format": "raw"},
             "Backing file not supported for file format 'raw'"),
            # (QEMU creates the file before it checks the node name, and leaves it.)
            ({"node-name": "base", "snapshot-file": f("b.qcow2"), "snapshot-node-name": "2x"},
             "Invalid node-name: '2x'"),
        ]
        for a, desc in cases:
            await error(c, sync, a, desc=desc)
        nodes = await nodes_by_name(c)
        assert "s" not in nodes and nodes["base"]["ro"] is False
        # With both, node-name is used.
        await execute(c, sync, {"device": "base", "node-name": "base",
                                "snapshot-file": f("c.qcow2"), "snapshot-node-name": "s"})
        assert await export_node(c, "e0") == "s"
        await error(c, sync, {"node-name": "base", "snapshot-file": f("d.qcow2"), "snapshot-node-name": "s2"},
                    desc="Node 'base' is busy: node is used as backing hd of 's'")
        # A node nothing uses: QEMU creates the overlay and puts it over the node (which
        # becomes read-only), but nothing holds the overlay node, so it is gone at once,
        # and the node stays read-only (odd, but QEMU's).
        await execute(c, sync, {"node-name": "r", "snapshot-file": f("e.qcow2"), "snapshot-node-name": "s3"})
        nodes = await nodes_by_name(c)
        assert "s3" not in nodes and nodes["r"]["ro"] is True, nodes.keys()
        assert img_info(tmp / "e.qcow2")["backing-filename"] == str(tmp / "r.img")


# ---------------------------------------------------------------------------------------
# change-backing-file


async def test_change_backing_file(start_daemon, tmp):
    layers = [BASE, MID, TOP]
    make_chain(tmp, layers, SIZE)
    make_chain(tmp, [("b2", []), ("t2", [])], SIZE)
    sock = tmp / "d-e0.sock"
    args = chain_args(tmp, ["base", "mid", "top"]) + chain_args(tmp, ["b2", "t2"]) + raw_args(tmp, "r")
    d = start_daemon(args + export_args("e0", "top", sock))
    cbf = "change-backing-file"
    mid = tmp / "mid.qcow2"
    async with d.qmp() as c:
        # A relative name (resolved against mid's directory: the same file).
        assert await execute(c, cbf, {"device": "top", "image-node-name": "mid", "backing-file": "base.qcow2"}) == {}
        assert img_info(mid)["backing-filename"] == "base.qcow2"
        assert img_info(mid)["full-backing-filename"] == path(tmp, "base")
        nodes = await nodes_by_name(c)
        assert nodes["mid"]["image"]["backing-filename"] == "base.qcow2", nodes["mid"]
        # Only the header changes: the graph and the data stay.
        verify_export(sock, seed_runs(layers, SIZE))
        # The root node itself.
        assert await execute(c, cbf, {"device": "top", "image-node-name": "top", "backing-file": "mid.qcow2"}) == {}
        assert img_info(tmp / "top.qcow2")["backing-filename"] == "mid.qcow2"
        # An empty name removes the backing file (and its format) from the header.
        assert await execute(c, cbf, {"device": "t2", "image-node-name": "t2", "backing-file": ""}) == {}
        info = img_info(tmp / "t2.qcow2")
        assert "backing-filename" not in info and "backing-filename-format" not in info, info

        cases = [
            ({"device": "top", "image-node-name": "mid"}, "Parameter 'backing-file' is missing"),
            ({"device": "top", "backing-file": "x"}, "Parameter 'image-node-name' is missing"),
            ({"device": "nosuch", "image-node-name": "mid", "backing-file": "x"},
             "Cannot find device='nosuch' nor node-name='nosuch'"),
            ({"device": "top", "image-node-name": "nosuch", "backing-file": "x"},
             "Cannot find device='' nor node-name='nosuch'"),
            ({"device": "mid", "image-node-name": "mid", "backing-file": "x"}, "Need a root block node"),
            ({"device": "top", "image-node-name": "base", "backing-file": "x"},
             "not allowing backing file change on an image without a backing file"),
            ({"device": "top", "image-node-name": "r", "backing-file": "x"},
             "not allowing backing file change on an image without a backing file"),
            ({"device": "r", "image-node-name": "r-file", "backing-file": "x"},
             "not allowing backing file change on an image without a backing file"),
            ({"device": "top", "image-node-name": "t2", "backing-file": "x"},
             "'top' and image file are not in the same chain"),
            ({"device": "t2", "image-node-name": "mid", "backing-file": "x"},
             "'t2' and image file are not in the same chain"),
        ]
        for a, desc in cases:
            await error(c, cbf, a, desc=desc)
        assert img_info(mid)["backing-filename"] == "base.qcow2"
    d.expect_exit = True
    assert d.stop() is None
    chain = img_info(tmp / "top.qcow2", chain=True)
    assert [i["filename"] for i in chain] == [path(tmp, n) for n in ("top", "mid", "base")], chain
    compare(write_raw(tmp / "ref.raw", expected_disk(layers, SIZE)), tmp / "top.qcow2")
    for n in ("mid", "top", "t2"):
        check_clean(tmp / f"{n}.qcow2")


# ---------------------------------------------------------------------------------------
# block-set-write-threshold


async def test_write_threshold(start_daemon, tmp):
    sock = tmp / "d-e0.sock"
    d = start_daemon(raw_args(tmp, "r") + export_args("e0", "r", sock))
    wt = "block-set-write-threshold"

    def write(off, n):
        io_ok("write", "--socket", sock, "--offset", off, "--len", n, "--seed", 1)

    async def thresholds(c):
        nodes = await nodes_by_name(c)
        return nodes["r"]["write_threshold"], nodes["r-file"]["write_threshold"]

    async with d.qmp() as c:
        ev = JobEvents(c)
        assert await thresholds(c) == (0, 0)
        assert await execute(c, wt, {"node-name": "r", "write-threshold": MIB}) == {}
        assert await execute(c, wt, {"node-name": "r-file", "write-threshold": MIB + 4 * KIB}) == {}
        assert await thresholds(c) == (MIB, MIB + 4 * KIB)
        # Below the threshold, and ending at it exactly: no event.
        write(0, 64 * KIB)
        write(MIB - 64 * KIB, 64 * KIB)
        await asyncio.sleep(0.2)
        assert [e for e in ev.listener.clear() if e["event"] == "BLOCK_WRITE_THRESHOLD"] == []
        # Across: one event per node, by how many bytes the write ends past it.
        write(MIB, 64 * KIB)
        got = [(await ev.event("BLOCK_WRITE_THRESHOLD"))["data"] for _ in range(2)]
        assert sorted(got, key=lambda e: e["node-name"]) == [
            {"node-name": "r", "write-threshold": MIB, "amount-exceeded": 64 * KIB},
            {"node-name": "r-file", "write-threshold": MIB + 4 * KIB, "amount-exceeded": 60 * KIB},
        ], got
        # A threshold fires once, then is 0 (off).
        assert await thresholds(c) == (0, 0)
        write(2 * MIB, 64 * KIB)
        await asyncio.sleep(0.2)
        assert [e for e in ev.listener.clear() if e["event"] == "BLOCK_WRITE_THRESHOLD"] == []
        await execute(c, wt, {"node-name": "r", "write-threshold": MIB + 512})
        write(MIB, 4 * KIB)
        e = await ev.event("BLOCK_WRITE_THRESHOLD")
        assert e["data"] == {"node-name": "r", "write-threshold": MIB + 512, "amount-exceeded": 4 * KIB - 512}
        # 0 turns it off.
        await execute(c, wt, {"node-name": "r", "write-threshold": MIB})
        await execute(c, wt, {"node-name": "r", "write-threshold": 0})
        assert await thresholds(c) == (0, 0)
        write(3 * MIB, 64 * KIB)
        await asyncio.sleep(0.2)
        assert [e for e in ev.listener.clear() if e["event"] == "BLOCK_WRITE_THRESHOLD"] == []

        await error(c, wt, {"node-name": "nosuch", "write-threshold": 1}, desc="Device 'nosuch' not found")
        await error(c, wt, {"node-name": "e0", "write-threshold": 1}, desc="Device 'e0' not found")
        await error(c, wt, {"node-name": "r"}, desc="Parameter 'write-threshold' is missing")
        await error(c, wt, {"write-threshold": 1}, desc="Parameter 'node-name' is missing")
        await error(c, wt, {"node-name": "r", "write-threshold": "1"},
                    desc="Parameter 'write-threshold' expects uint64")


# ---------------------------------------------------------------------------------------
# x-debug-query-block-graph

PERM_ALL = ["resize", "write-unchanged", "write", "consistent-read"]


def named_graph(g):
    """Nodes as (type, name); edges as (parent, child, name, perm, shared-perm) with the
    ids replaced by names (block backends are unnamed: "")."""
    ids = {}
    for n in g["nodes"]:
        assert set(n) == {"id", "type", "name"}, n
        assert n["id"] not in ids, g
        ids[n["id"]] = (n["type"], n["name"])
    edges = []
    for e in g["edges"]:
        assert set(e) == {"parent", "child", "name", "perm", "shared-perm"}, e
        edges.append((ids[e["parent"]][1], ids[e["child"]][1], e["name"], e["perm"], e["shared-perm"]))
    return sorted(ids.values()), edges


async def test_query_block_graph(start_daemon, tmp):
    make_chain(tmp, [BASE, TOP], SIZE)
    d = start_daemon(chain_args(tmp, ["base", "top"]) + export_args("e0", "top", tmp / "d-e0.sock"))
    async with d.qmp() as c:
        ev = JobEvents(c)
        nodes, edges = named_graph(await execute(c, "x-debug-query-block-graph"))
        assert nodes == [
            ("block-backend", ""),
            ("block-driver", "base"),
            ("block-driver", "base-file"),
            ("block-driver", "top"),
            ("block-driver", "top-file"),
        ]
        # Permission lists are in QEMU's order (highest bit first).
        assert sorted(edges) == sorted([
            ("", "top", "root", ["write", "consistent-read"], PERM_ALL),
            ("top", "top-file", "file", ["resize", "write", "consistent-read"], ["write-unchanged", "consistent-read"]),
            ("top", "base", "backing", ["consistent-read"], PERM_ALL),
            ("base", "base-file", "file", ["resize", "write", "consistent-read"], ["write-unchanged", "consistent-read"]),
        ]), edges
        await error(c, "x-debug-query-block-graph", {"x": 1}, desc="Parameter 'x' is unexpected")

        # A job is a node of the graph, with edges to the nodes it uses.
        await execute(c, "block-stream", {"job-id": "s", "device": "top", "speed": 1})
        await ev.until("s", "running")
        nodes, edges = named_graph(await execute(c, "x-debug-query-block-graph"))
        assert ("block-job", "s") in nodes, nodes
        job_edges = {(child, name) for parent, child, name, _, _ in edges if parent == "s"}
        assert {("top", "active node"), ("base", "intermediate node")} <= job_edges, edges
        assert "main node" in {name for _, name in job_edges}, edges
        await execute(c, "job-cancel", {"id": "s"})
        await ev.until("s", "null")
        nodes, _ = named_graph(await execute(c, "x-debug-query-block-graph"))
        assert [n for n in nodes if n[0] == "block-job"] == []


# ---------------------------------------------------------------------------------------
# Permissions


def conflict(node, perms, required_by, unshared_by):
    return (
        f"Permission conflict on node '{node}': permissions '{perms}' are both required by "
        f"{required_by} and unshared by {unshared_by}."
    )


def by_export(node):
    return f"an unnamed block device (uses node '{node}' as 'root' child)"


async def test_permission_conflicts(start_daemon, tmp):
    """QEMU's permission checks and their texts: a qcow2 node does not share write on
    its file; a job does not share write (and, for commit, consistent read) on the
    nodes it works on, nor write on an intermediate commit's base; an active commit in
    ready lets others write to its base."""
    # mid is allocated all over, so that the slow jobs below always have more to copy:
    # in QEMU every drained section (each export added or deleted) wakes a job sleeping
    # in its rate limiter, and the job then goes on to its next chunk.
    size = 8 * MIB
    make_chain(tmp, [("base", []), ("mid", []), ("top", [])], size)
    run("qemu-io", "-f", "qcow2", "-c", f"write -q -P 0x33 0 {size}", tmp / "mid.qcow2")
    d = start_daemon(chain_args(tmp, ["base", "mid", "top"]) + export_args("e0", "top", tmp / "d-e0.sock"))
    add = "block-export-add"

    def exp(eid, node, writable=True):
        return export_opts(eid, node, d.sock(eid), writable=writable)

    async with d.qmp() as c:
        ev = JobEvents(c)
        await error(c, add, exp("x", "top-file"), desc=conflict(
            "top-file", "write", by_export("top-file"), "node 'top' (uses node 'top-file' as 'file' child)"))
        await error(c, "blockdev-add", {"driver": "qcow2", "node-name": "top2", "file": "top-file", "backing": None},
                    desc=conflict("top-file", "write, resize", "node 'top' (uses node 'top-file' as 'file' child)",
                                  "node 'top2' (uses node 'top-file' as 'file' child)"))
        await error(c, "block_resize", {"node-name": "top-file", "size": 8 * MIB}, desc=conflict(
            "top-file", "resize", by_export("top-file"), "node 'top' (uses node 'top-file' as 'file' child)"))
        # Reading is shared; so is everything by raw.
        await execute(c, add, exp("ro", "top-file", writable=False))
        await execute(c, "block-export-del", {"id": "ro"})
        await execute(c, "blockdev-add", {"driver": "raw", "node-name": "raw", "file": "top-file", "read-only": True})
        await execute(c, "blockdev-del", {"node-name": "raw"})
        # Outside jobs, a backing node may be written by others.
        await execute(c, add, exp("w", "mid"))
        await execute(c, "block-export-del", {"id": "w"})

        # Stream: the intermediate node.
        await execute(c, "block-stream", {"job-id": "s", "device": "top", "speed": 1})
        await ev.until("s", "running")
        await error(c, add, exp("x", "mid"), desc=conflict(
            "mid", "write", by_export("mid"), "stream job 's' (uses node 'mid' as 'intermediate node' child)"))
        await execute(c, add, exp("ro", "mid", writable=False))
        await execute(c, "block-export-del", {"id": "ro"})
        await execute(c, "job-cancel", {"id": "s"})
        await ev.until("s", "null")

        # Intermediate commit: the base and the committed node.
        await execute(c, "block-commit", {"job-id": "c", "device": "top", "top-node": "mid", "speed": 1})
        await ev.until("c", "running")
        await error(c, add, exp("x", "base"), desc=conflict("base", "write", by_export("base"), by_export("base")))
        await error(c, add, exp("x", "mid"), desc=conflict(
            "mid", "consistent read", by_export("mid"),
            "commit job 'c' (uses node 'mid' as 'intermediate node' child)"))
        await execute(c, add, exp("ro", "base", writable=False))
        await execute(c, "block-export-del", {"id": "ro"})
        await execute(c, "job-cancel", {"id": "c"})
        await ev.until("c", "null")

        # Active commit in ready.
        await execute(c, "block-commit", {"job-id": "a", "device": "top"})
        await ev.until("a", "BLOCK_JOB_READY")
        await execute(c, add, exp("w", "base"))
        await execute(c, "block-export-del", {"id": "w"})
        await error(c, add, exp("x", "mid"), desc=conflict(
            "mid", "consistent read", by_export("mid"),
            "commit job 'a' (uses node 'mid' as 'intermediate node' child)"))
        await execute(c, "job-cancel", {"id": "a"})
        await ev.until("a", "null")
        assert await export_node(c, "e0") == "top"


# ---------------------------------------------------------------------------------------
# block_resize


async def test_block_resize_checks(start_daemon, tmp):
    make_chain(tmp, [BASE, TOP], SIZE)
    args = chain_args(tmp, ["base", "top"]) + raw_args(tmp, "r") + ["--blockdev", "null-co,node-name=nul"]
    d = start_daemon(args)
    rs = "block_resize"
    async with d.qmp() as c:
        ev = JobEvents(c)
        cases = [
            ({"node-name": "top", "size": 1000}, "The new size must be a multiple of 512"),
            ({"node-name": "top", "size": SIZE + 1}, "The new size must be a multiple of 512"),
            ({"node-name": "top", "size": -512}, "Parameter 'size' expects a >0 size"),
            ({"node-name": "nul", "size": MIB}, "Image format driver does not support resize"),
            ({"device": "top", "size": MIB}, "Cannot find device='top' nor node-name=''"),
            ({"size": MIB}, "Cannot find device='' nor node-name=''"),
            # A backing node may not be resized. QEMU's message names the device, which
            # is NULL here (the node was given by node-name), and glibc prints "(null)".
            ({"node-name": "base", "size": 8 * MIB}, "Device '(null)' is in use"),
        ]
        for a, desc in cases:
            await error(c, rs, a, desc=desc)
        assert (await nodes_by_name(c))["top"]["image"]["virtual-size"] == SIZE
        assert await execute(c, rs, {"node-name": "top", "size": 8 * MIB}) == {}
        assert (await nodes_by_name(c))["top"]["image"]["virtual-size"] == 8 * MIB
        # raw and file take any size.
        assert await execute(c, rs, {"node-name": "r", "size": 1000}) == {}
        assert (tmp / "r.img").stat().st_size == 1000
        # Nor may a node in a job.
        await execute(c, "block-stream", {"job-id": "s", "device": "top", "speed": 1})
        await ev.until("s", "running")
        await error(c, rs, {"node-name": "top", "size": 16 * MIB}, desc="Device '(null)' is in use")
        await execute(c, "job-cancel", {"id": "s"})
        await ev.until("s", "null")
    d.expect_exit = True
    assert d.stop() is None
    assert img_info(tmp / "top.qcow2")["virtual-size"] == 8 * MIB
    check_clean(tmp / "top.qcow2")


# ---------------------------------------------------------------------------------------
# blockdev-reopen


def raw_opts(**extra):
    return {"driver": "raw", "node-name": "r", "file": "r-file", **extra}


def top_opts(**extra):
    return {"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": "base", **extra}


async def test_blockdev_reopen_options(start_daemon, tmp):
    """read-only, discard/detect-zeroes and cache of a raw node. Options left out go back
    to their defaults: each reopen gives the node's whole option set."""
    sock = tmp / "d-e0.sock"
    d = start_daemon(raw_args(tmp, "r") + export_args("e0", "r", sock, writable=False))
    ro = "blockdev-reopen"

    async def node(c, name="r"):
        return (await nodes_by_name(c))[name]

    async with d.qmp() as c:
        assert await execute(c, ro, {"options": [raw_opts(**{"read-only": True})]}) == {}
        n = await node(c)
        assert n["ro"] is True, n
        # The file node was added on its own: it keeps its own options.
        assert (await node(c, "r-file"))["ro"] is False
        assert await execute(c, ro, {"options": [raw_opts()]}) == {}
        assert (await node(c))["ro"] is False
        # Both in one list.
        assert await execute(c, ro, {"options": [
            {"driver": "file", "node-name": "r-file", "filename": str(tmp / "r.img"), "read-only": True},
            raw_opts(**{"read-only": True})]}) == {}
        assert (await node(c))["ro"] is True and (await node(c, "r-file"))["ro"] is True
        assert await execute(c, ro, {"options": [
            {"driver": "file", "node-name": "r-file", "filename": str(tmp / "r.img")}, raw_opts()]}) == {}
        assert (await node(c))["ro"] is False and (await node(c, "r-file"))["ro"] is False

        await error(c, ro, {"options": [raw_opts(**{"detect-zeroes": "unmap"})]},
                    desc="setting detect-zeroes to unmap is not allowed without setting discard operation to unmap")
        await execute(c, ro, {"options": [raw_opts(**{"detect-zeroes": "unmap", "discard": "unmap"})]})
        assert (await node(c))["detect_zeroes"] == "unmap"
        await execute(c, ro, {"options": [raw_opts(**{"detect-zeroes": "on", "cache": {"direct": True, "no-flush": True}})]})
        n = await node(c)
        assert n["detect_zeroes"] == "on", n
        assert n["cache"] == {"writeback": True, "direct": True, "no-flush": True}, n
        await execute(c, ro, {"options": [raw_opts()]})
        n = await node(c)
        assert n["detect_zeroes"] == "off", n
        assert n["cache"] == {"writeback": True, "direct": False, "no-flush": False}, n
        # The read-only export is still there (vubd-io cannot attach to a read-only
        # export: libblkio opens it read-write).
        assert await export_node(c, "e0") == "r"


async def test_blockdev_reopen_backing_and_errors(start_daemon, tmp):
    layers = [BASE, TOP]
    make_chain(tmp, layers, SIZE)
    sock = tmp / "d-e0.sock"
    args = chain_args(tmp, ["base", "top"]) + raw_args(tmp, "r") + ["--blockdev", "null-co,node-name=nul"]
    d = start_daemon(args + export_args("e0", "top", sock))
    ro = "blockdev-reopen"
    async with d.qmp() as c:
        # Drop the backing node: base's data is no longer seen, top's is.
        assert await execute(c, ro, {"options": [top_opts(backing=None)]}) == {}
        assert "backing_file" not in (await nodes_by_name(c))["top"]
        io_ok("verify", "--socket", sock, "--offset", MIB, "--len", 64 * KIB, "--seed", 2)
        r = vubd_io("verify", "--socket", sock, "--offset", 0, "--len", 64 * KIB, "--seed", 1)
        assert r["rc"] == 1 and "mismatch" in r["error"], r
        # And back.
        assert await execute(c, ro, {"options": [top_opts()]}) == {}
        assert (await nodes_by_name(c))["top"]["backing_file"] == path(tmp, "base")
        verify_export(sock, seed_runs(layers, SIZE))
        # Another node as backing (the header is not changed).
        assert await execute(c, ro, {"options": [top_opts(backing="nul")]}) == {}
        assert (await nodes_by_name(c))["top"]["backing_file"] == "null-co://"
        assert await execute(c, ro, {"options": [top_opts()]}) == {}
        # A backing node may be made read-only.
        assert await execute(c, ro, {"options": [
            {"driver": "qcow2", "node-name": "base", "file": "base-file", "read-only": True}]}) == {}
        assert (await nodes_by_name(c))["base"]["ro"] is True

        cases = [
            ([{"driver": "raw", "node-name": "r"}], "Parameter 'options[0].file' is missing"),
            ([raw_opts(bogus=1)], "Parameter 'options[0].bogus' is unexpected"),
            ([{"driver": "raw", "file": "r-file"}], "node-name not specified"),
            ([{"driver": "raw", "node-name": "nosuch", "file": "r-file"}], "Failed to find node with node-name='nosuch'"),
            ([{"driver": "qcow2", "node-name": "r", "file": "r-file"}], "Cannot change the option 'driver'"),
            ([raw_opts(file={"driver": "file", "filename": str(tmp / "r.img")})], "Cannot change the option 'file.driver'"),
            ([{"driver": "file", "node-name": "r-file", "filename": path(tmp, "base")}], "Cannot change the option 'filename'"),
            ([{"driver": "file", "node-name": "r-file", "filename": str(tmp / "r.img"), "aio": "native"}],
             "Cannot change the option 'aio'"),
            ([{"driver": "file", "node-name": "r-file", "filename": str(tmp / "r.img"), "locking": "off"}],
             "Cannot change the option 'locking'"),
            ([{"driver": "qcow2", "node-name": "top", "file": "top-file"}], "backing is missing for 'top'"),
            ([top_opts(backing="nosuch")], "Cannot find device='' nor node-name='nosuch'"),
            ([top_opts(backing="top")], "Making 'top' a backing child of 'top' would create a cycle"),
            ([top_opts(**{"read-only": True})], "Read-only block node 'top' cannot support read-write users"),
            ([top_opts(file="base")], "Block node is read-only"),
            # All or nothing: the first entry is valid, the second is not.
            ([raw_opts(**{"read-only": True}), {"driver": "qcow2", "node-name": "top", "file": "top-file"}],
             "backing is missing for 'top'"),
        ]
        for opts, desc in cases:
            await error(c, ro, {"options": opts}, desc=desc)
        await error(c, ro, {}, desc="Parameter 'options' is missing")
        nodes = await nodes_by_name(c)
        assert nodes["r"]["ro"] is False
        assert nodes["top"]["backing_file"] == path(tmp, "base")
        verify_export(sock, seed_runs(layers, SIZE))
    d.expect_exit = True
    assert d.stop() is None
    assert backing_of(tmp / "top.qcow2") == path(tmp, "base")
    check_clean(tmp / "top.qcow2")


@pytest.mark.vubd_only("qemu-storage-daemon 7.2 aborts on an empty list "
                       "(bdrv_reopen_multiple: Assertion `bs_queue != NULL' failed)")
async def test_blockdev_reopen_empty_list(daemon):
    async with daemon.qmp() as c:
        try:
            r = await execute(c, "blockdev-reopen", {"options": []})
            assert r == {}, r
        except ExecuteError:  # an error is as good as success; a crash is not
            pass
        assert "n0" in await nodes_by_name(c)


# ---------------------------------------------------------------------------------------
# copy-on-read


@pytest.mark.parametrize("bottom", [None, "mid"])
async def test_copy_on_read_filter(start_daemon, tmp, bottom):
    """Reads through a copy-on-read filter over top copy what they read from the backing
    chain into top (down to ``bottom`` if given); writes go to top."""
    layers = [BASE, MID, TOP]
    make_chain(tmp, layers, SIZE)
    sock = tmp / "d-e0.sock"
    cor = {"driver": "copy-on-read", "node-name": "cor", "file": "top"}
    if bottom:
        cor["bottom"] = bottom
    d = start_daemon(chain_args(tmp, ["base", "mid", "top"]))
    async with d.qmp() as c:
        assert await execute(c, "blockdev-add", cor) == {}
        n = (await nodes_by_name(c))["cor"]
        assert (n["drv"], n["image"]["virtual-size"], n["ro"]) == ("copy-on-read", SIZE, False), n
        await execute(c, "block-export-add", export_opts("e0", "cor", sock))
        verify_export(sock, seed_runs(layers, SIZE))
        io_ok("write", "--socket", sock, "--offset", 3 * MIB, "--len", 64 * KIB, "--seed", 6)
        await error(c, "blockdev-add", {"driver": "copy-on-read", "node-name": "c2", "file": "top", "bottom": "nosuch"},
                    desc="Bottom node 'nosuch' not found")
        await error(c, "blockdev-add", {"driver": "copy-on-read", "node-name": "c2"},
                    desc="Parameter 'file' is missing")
        await error(c, "blockdev-del", {"node-name": "cor"}, desc="Node cor is in use")
    d.expect_exit = True
    assert d.stop() is None
    top = tmp / "top.qcow2"
    final = layers + [("w", [(3 * MIB, 64 * KIB, 6)])]
    compare(write_raw(tmp / "ref.raw", expected_disk(final, SIZE)), top)
    # Read from mid: copied either way.
    assert allocated_depths(top, 2 * MIB, 128 * KIB) == {0}
    assert allocated_depths(top, 3 * MIB, 64 * KIB) == {0}
    # Read from base: copied only without a bottom above it.
    assert allocated_depths(top, 0, MIB) == ({2} if bottom else {0})
    assert backing_of(top) == path(tmp, "mid")
    # The lower images are untouched.
    assert read_disk(tmp / "base.qcow2", tmp) == pattern(1, 0, SIZE)
    check_clean(top)


@pytest.mark.vubd_only("qemu-storage-daemon 7.2 hangs (its monitor stops answering) when "
                       "a copy-on-read filter's bottom is not below its file node")
async def test_copy_on_read_bottom_outside_chain(start_daemon, tmp):
    make_chain(tmp, [BASE, TOP], SIZE)
    d = start_daemon(chain_args(tmp, ["base", "top"]) + raw_args(tmp, "r"))
    async with d.qmp() as c:
        for file, bottom in (("r", "base"), ("top-file", "top")):
            try:
                await execute(c, "blockdev-add", {"driver": "copy-on-read", "node-name": "c", "file": file,
                                                  "bottom": bottom}, timeout=5)
                await execute(c, "blockdev-del", {"node-name": "c"}, timeout=5)
            except ExecuteError:  # refusing it is fine; hanging is not
                pass
        assert "top" in await nodes_by_name(c)

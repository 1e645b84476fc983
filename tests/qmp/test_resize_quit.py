"""block_resize (seen by a running frontend) and quit."""

import asyncio
import os

import pytest

from conftest import MIB, IoProc, error, execute, io_ok, is_socket, make_image


async def node_size(c, node):
    for n in await execute(c, "query-named-block-nodes", {"flat": True}):
        if n["node-name"] == node:
            return n["image"]["virtual-size"]
    raise AssertionError(f"no node {node}")


@pytest.mark.vubd_only(
    "qemu-storage-daemon's vhost-user-blk export does not follow block_resize (7.2: the "
    "capacity stays, then abort on SIGTERM; 10.0.2: SIGSEGV on the resize)"
)
@pytest.mark.parametrize("node", ["n0", "n0-file"])
async def test_resize_seen_by_running_frontend(daemon, tmp, io_procs, node):
    sock = daemon.sock("e0")
    img = tmp / "n0.img"
    io_ok("write", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 1)
    new = 96 * MIB
    # The watcher connects before the resize and keeps its connection.
    w = IoProc(tmp, "watch-capacity", "--socket", sock, "--expect", new, "--timeout-secs", 20)
    io_procs.append(w)
    await w.ready()
    async with daemon.qmp() as c:
        assert await execute(c, "block_resize", {"node-name": node, "size": new}) == {}
        r = await w.result()
        assert r["rc"] == 0 and r["capacity"] == new and r["initial"] == 64 * MIB, r
        assert os.path.getsize(img) == new
        assert await node_size(c, "n0") == new
        assert await node_size(c, "n0-file") == new
        # The new space is usable, the old data is intact.
        io_ok("write", "--socket", sock, "--offset", 90 * MIB, "--len", 6 * MIB, "--seed", 2)
        io_ok("verify", "--socket", sock, "--offset", 90 * MIB, "--len", 6 * MIB, "--seed", 2)
        io_ok("verify", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 1)
        # Shrink.
        w = IoProc(tmp, "watch-capacity", "--socket", sock, "--expect", 32 * MIB, "--timeout-secs", 20)
        io_procs.append(w)
        await w.ready()
        await execute(c, "block_resize", {"node-name": "n0", "size": 32 * MIB})
        r = await w.result()
        assert r["rc"] == 0 and r["capacity"] == 32 * MIB, r
        assert os.path.getsize(img) == 32 * MIB
        io_ok("verify", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 1)


@pytest.mark.vubd_only("qemu-storage-daemon's export does not follow block_resize (see above)")
async def test_resize_under_io(daemon, tmp, io_procs):
    """Growing the disk while `vubd-io stress` runs on its first 16 MiB: no request
    fails."""
    p = IoProc(
        tmp, "stress", "--socket", daemon.sock("e0"), "--seconds", 3, "--seed", 5,
        "--queues", 2, "--span", 16 * MIB,
    )
    io_procs.append(p)
    await p.ready()
    async with daemon.qmp() as c:
        for i in range(1, 5):
            await execute(c, "block_resize", {"node-name": "n0", "size": (64 + 16 * i) * MIB})
            await asyncio.sleep(0.2)
    r = await p.result()
    assert r["rc"] == 0 and r["ok"], r
    assert io_ok("capacity", "--socket", daemon.sock("e0"))["capacity"] == 128 * MIB


async def test_resize_unexported_node(daemon, tmp):
    img = make_image(tmp / "r.img", 4 * MIB)
    async with daemon.qmp() as c:
        await execute(
            c,
            "blockdev-add",
            {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": str(img)}},
        )
        await execute(c, "block_resize", {"node-name": "r", "size": 8 * MIB})
        assert os.path.getsize(img) == 8 * MIB
        assert await node_size(c, "r") == 8 * MIB
        await execute(c, "block_resize", {"node-name": "r", "size": 2 * MIB})
        assert os.path.getsize(img) == 2 * MIB
        assert await node_size(c, "r") == 2 * MIB


async def test_resize_errors(daemon, tmp):
    img = make_image(tmp / "ro.img", 4 * MIB)
    async with daemon.qmp() as c:
        await error(c, "block_resize", {"node-name": "n0"}, desc="Parameter 'size' is missing")
        await error(
            c,
            "block_resize",
            {"node-name": "n0", "size": "1G"},
            desc="Invalid parameter type for 'size', expected: integer",
        )
        await error(
            c,
            "block_resize",
            {"node-name": 1, "size": MIB},
            desc="Invalid parameter type for 'node-name', expected: string",
        )
        await error(
            c,
            "block_resize",
            {"node-name": "n0", "size": MIB, "x": 1},
            desc="Parameter 'x' is unexpected",
        )
        await error(
            c,
            "block_resize",
            {"node-name": "n0", "size": -1},
            desc="Parameter 'size' expects a >0 size",
        )
        await error(c, "block_resize", {"node-name": "nosuch", "size": MIB}, contains=["nosuch"])
        await error(c, "block_resize", {"device": "nosuch", "size": MIB}, contains=["nosuch"])
        await error(c, "block_resize", {"size": MIB})
        # null-co cannot resize.
        await execute(c, "blockdev-add", {"driver": "null-co", "node-name": "nul", "size": MIB})
        await error(
            c,
            "block_resize",
            {"node-name": "nul", "size": 2 * MIB},
            desc="Image format driver does not support resize",
        )
        # A raw node with a fixed size.
        await execute(
            c,
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "fixed",
                "size": MIB,
                "file": {"driver": "file", "filename": str(img), "node-name": "fixedf"},
            },
        )
        await error(
            c,
            "block_resize",
            {"node-name": "fixed", "size": 2 * MIB},
            desc="Cannot resize fixed-size raw disks",
        )
        # A read-only node (on an image of its own: the one above is locked).
        img2 = make_image(tmp / "ro2.img", 4 * MIB)
        await execute(
            c,
            "blockdev-add",
            {"driver": "file", "node-name": "ro", "filename": str(img2), "read-only": True},
        )
        await error(
            c, "block_resize", {"node-name": "ro", "size": 8 * MIB}, desc="Image is read-only"
        )
        assert os.path.getsize(img) == 4 * MIB and os.path.getsize(img2) == 4 * MIB
        assert await node_size(c, "n0") == 64 * MIB


@pytest.mark.parametrize("with_io", [False, True], ids=["idle", "frontend-connected"])
async def test_quit(daemon, tmp, io_procs, with_io, kind):
    if with_io and kind == "qsd":
        pytest.skip("qemu-storage-daemon 7.2 may hang in quit while a vhost-user frontend has I/O in flight")
    sockets = [daemon.monitor, daemon.sock("e0")]
    assert all(is_socket(s) for s in sockets)
    if with_io:
        p = IoProc(tmp, "stress", "--socket", daemon.sock("e0"), "--seconds", 10, "--seed", 7)
        io_procs.append(p)
        await p.ready()
    async with daemon.qmp() as c:
        daemon.expect_exit = True
        assert await execute(c, "quit") == {}
    rc = await asyncio.to_thread(daemon.wait_exit)
    assert rc == 0, f"exit status {rc}\n{daemon.output()}"
    for s in sockets:
        assert not s.exists(), f"{s} still exists after quit"


async def test_quit_with_arguments_refused(daemon):
    async with daemon.qmp() as c:
        await error(c, "quit", {"x": 1}, desc="Parameter 'x' is unexpected")
        assert daemon.alive()

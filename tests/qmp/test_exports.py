"""block-export-add, block-export-del and BLOCK_EXPORT_DELETED, also while another
export serves I/O."""

import asyncio

import pytest

from conftest import (
    MIB,
    IoProc,
    check_timestamp,
    error,
    execute,
    export_ids,
    export_opts,
    io_ok,
    is_socket,
    make_image,
    vubd_io,
    wait_event,
)


async def add_file_node(c, tmp, node, size=16 * MIB):
    img = make_image(tmp / f"{node}.img", size)
    await execute(
        c,
        "blockdev-add",
        {"driver": "raw", "node-name": node, "file": {"driver": "file", "filename": str(img)}},
    )
    return img


@pytest.mark.parametrize("mode", [None, "safe", "hard"])
async def test_export_add_del_event(daemon, tmp, mode):
    sock = daemon.sock("x1")
    async with daemon.qmp() as c:
        await add_file_node(c, tmp, "xn")
        assert await execute(c, "block-export-add", export_opts("x1", "xn", sock, **{"num-queues": 2})) == {}
        # Serving as soon as the command returned.
        assert is_socket(sock)
        exps = await execute(c, "query-block-exports")
        assert {"id": "x1", "type": "vhost-user-blk", "node-name": "xn", "shutting-down": False} in [
            {k: e[k] for k in ("id", "type", "node-name", "shutting-down")} for e in exps
        ], exps
        io_ok("write", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 1)
        io_ok("verify", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 1)
        args = {"id": "x1"} if mode is None else {"id": "x1", "mode": mode}
        with c.listener() as lst:
            assert await execute(c, "block-export-del", args) == {}
            ev = await wait_event(lst, "BLOCK_EXPORT_DELETED")
        assert set(ev) == {"event", "data", "timestamp"}, ev
        assert ev["data"] == {"id": "x1"}, ev
        check_timestamp(ev)
        assert await export_ids(c) == {"e0"}
        # The socket file is removed with the export.
        for _ in range(100):
            if not sock.exists():
                break
            await asyncio.sleep(0.02)
        assert not sock.exists(), f"{sock} still exists after the export was deleted"
        # The id and the socket path can be used again; the data is still there.
        await execute(c, "block-export-add", export_opts("x1", "xn", sock))
        io_ok("verify", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 1)
        with c.listener() as lst:
            await execute(c, "block-export-del", {"id": "x1"})
            await wait_event(lst, "BLOCK_EXPORT_DELETED")
        await execute(c, "blockdev-del", {"node-name": "xn"})


async def test_export_options(daemon, tmp):
    sock = daemon.sock("x2")
    async with daemon.qmp() as c:
        await add_file_node(c, tmp, "xn", size=8 * MIB)
        await execute(c, "object-add", {"qom-type": "iothread", "id": "iox"})
        await execute(
            c,
            "block-export-add",
            export_opts(
                "x2",
                "xn",
                sock,
                **{"num-queues": 3, "iothread": "iox", "logical-block-size": 4096, "writethrough": True},
            ),
        )
        r = io_ok("capacity", "--socket", sock)
        assert r["capacity"] == 8 * MIB and r["logical_block_size"] == 4096, r
        r = io_ok("stress", "--socket", sock, "--seconds", 0.5, "--seed", 3, "--queues", 3)
        assert r["writes"] > 0, r
        with c.listener() as lst:
            await execute(c, "block-export-del", {"id": "x2"})
            await wait_event(lst, "BLOCK_EXPORT_DELETED")


async def test_export_read_only(daemon, tmp):
    sock = daemon.sock("ro")
    async with daemon.qmp() as c:
        await add_file_node(c, tmp, "xn", size=4 * MIB)
        opts = export_opts("ro", "xn", sock)
        del opts["writable"]
        await execute(c, "block-export-add", opts)
        # libblkio refuses to start without read-only=on against a read-only device, so
        # a writing frontend fails.
        r = await asyncio.to_thread(
            vubd_io, "write", "--socket", sock, "--offset", 0, "--len", 4096, "--seed", 1
        )
        assert r["rc"] != 0, r


async def test_export_add_errors(daemon, tmp):
    s = str(daemon.sock("bad"))
    addr = {"type": "unix", "path": s}
    # On a node of its own.
    base = {"type": "vhost-user-blk", "id": "bad", "node-name": "xn", "addr": addr}
    async with daemon.qmp() as c:
        await add_file_node(c, tmp, "xn")

        def with_(**kw):
            o = dict(base, **{k.replace("_", "-"): v for k, v in kw.items()})
            return {k: v for k, v in o.items() if v is not None}

        await error(c, "block-export-add", with_(type=None), desc="Parameter 'type' is missing")
        await error(c, "block-export-add", with_(id=None), desc="Parameter 'id' is missing")
        await error(c, "block-export-add", with_(node_name=None), desc="Parameter 'node-name' is missing")
        await error(c, "block-export-add", with_(addr=None), desc="Parameter 'addr' is missing")
        await error(
            c,
            "block-export-add",
            with_(type="nbd-bogus"),
            desc="Parameter 'type' does not accept value 'nbd-bogus'",
        )
        await error(c, "block-export-add", with_(bogus=1), desc="Parameter 'bogus' is unexpected")
        await error(
            c,
            "block-export-add",
            with_(writable="yes"),
            desc="Invalid parameter type for 'writable', expected: boolean",
        )
        await error(
            c,
            "block-export-add",
            with_(id=7),
            desc="Invalid parameter type for 'id', expected: string",
        )
        await error(
            c,
            "block-export-add",
            with_(num_queues="two"),
            desc="Parameter 'num-queues' expects uint64",
        )
        await error(
            c,
            "block-export-add",
            with_(num_queues=70000),
            desc="Parameter 'num-queues' expects uint16_t",
        )
        await error(
            c,
            "block-export-add",
            with_(addr={"type": "unix"}),
            desc="Parameter 'addr.path' is missing",
        )
        await error(
            c,
            "block-export-add",
            with_(addr={"type": "unix", "path": s, "x": 1}),
            desc="Parameter 'addr.x' is unexpected",
        )
        await error(c, "block-export-add", with_(num_queues=0), contains=["num-queues"])
        await error(c, "block-export-add", with_(logical_block_size=1000), contains=["logical-block-size"])
        await error(c, "block-export-add", with_(logical_block_size=256), contains=["logical-block-size"])
        await error(c, "block-export-add", with_(iothread="nosuch"), contains=["nosuch"])
        await error(
            c,
            "block-export-add",
            with_(node_name="nosuch"),
            desc="Cannot find device='' nor node-name='nosuch'",
        )
        # Duplicate id (of an export made on the command line).
        await error(
            c,
            "block-export-add",
            with_(id="e0", node_name="xn"),
            desc="Block export id 'e0' is already in use",
        )
        # A socket path in a directory that does not exist.
        await error(
            c,
            "block-export-add",
            with_(node_name="xn", addr={"type": "unix", "path": str(tmp / "no" / "dir.sock")}),
        )
        # Nothing was left behind.
        assert await export_ids(c) == {"e0"}
        assert not daemon.sock("bad").exists()
        # The id is free after all these failures.
        await execute(c, "block-export-add", with_(node_name="xn"))
        await error(
            c,
            "block-export-add",
            with_(node_name="xn", addr={"type": "unix", "path": str(daemon.sock("bad2"))}),
            desc="Block export id 'bad' is already in use",
        )


@pytest.mark.vubd_only("vubd refuses what qemu-storage-daemon allows (docs/qmp.md)")
async def test_export_add_vubd_refusals(daemon, tmp):
    async with daemon.qmp() as c:
        await add_file_node(c, tmp, "xn")
        # e0's socket path.
        await error(c, "block-export-add", export_opts("b2", "xn", daemon.sock("e0")))
        assert await export_ids(c) == {"e0"}
        # A second writable export of n0 is accepted, as in QEMU (exports share their
        # node; two QEMUs migrating a VM on one host each attach to one): both serve
        # the same data.
        await execute(c, "block-export-add", export_opts("b3", "n0", daemon.sock("b3")))
        io_ok("write", "--socket", daemon.sock("b3"), "--offset", 0, "--len", MIB, "--seed", 5)
        io_ok("verify", "--socket", daemon.sock("e0"), "--offset", 0, "--len", MIB, "--seed", 5)
        await execute(c, "block-export-del", {"id": "b3"})
        for _ in range(100):
            if await export_ids(c) == {"e0"}:
                break
            await asyncio.sleep(0.05)
        assert await export_ids(c) == {"e0"}
        # e0 still serves.
        io_ok("write", "--socket", daemon.sock("e0"), "--offset", 0, "--len", MIB, "--seed", 4)
        io_ok("verify", "--socket", daemon.sock("e0"), "--offset", 0, "--len", MIB, "--seed", 4)


async def test_export_del_errors(daemon):
    async with daemon.qmp() as c:
        await error(c, "block-export-del", {}, desc="Parameter 'id' is missing")
        await error(
            c,
            "block-export-del",
            {"id": 1},
            desc="Invalid parameter type for 'id', expected: string",
        )
        await error(
            c,
            "block-export-del",
            {"id": "e0", "mode": "bogus"},
            desc="Parameter 'mode' does not accept value 'bogus'",
        )
        await error(c, "block-export-del", {"id": "e0", "x": 1}, desc="Parameter 'x' is unexpected")
        await error(c, "block-export-del", {"id": "nosuch"}, desc="Export 'nosuch' is not found")
        assert await export_ids(c) == {"e0"}
        # Deleted twice: the second one finds nothing (or, while the first is still
        # shutting down, says so).
        with c.listener() as lst:
            await execute(c, "block-export-del", {"id": "e0"})
            desc = await error(c, "block-export-del", {"id": "e0"})
            assert desc in ("Export 'e0' is not found", "Export 'e0' is already shutting down"), desc
            await wait_event(lst, "BLOCK_EXPORT_DELETED")
        await error(c, "block-export-del", {"id": "e0"}, desc="Export 'e0' is not found")


@pytest.mark.vubd_only(
    "qemu-storage-daemon 7.2 hangs when an export is deleted while its frontend has I/O "
    "in flight (no reply, no exit on SIGTERM)"
)
async def test_export_del_with_frontend_connected(daemon, tmp, io_procs):
    """Deleting an export whose frontend is in the middle of I/O: the daemon survives,
    the event comes, and the node can be reused."""
    sock = daemon.sock("e0")
    p = IoProc(tmp, "stress", "--socket", sock, "--seconds", 5, "--seed", 11)
    io_procs.append(p)
    await p.ready()
    async with daemon.qmp() as c:
        with c.listener() as lst:
            await execute(c, "block-export-del", {"id": "e0", "mode": "hard"})
            await wait_event(lst, "BLOCK_EXPORT_DELETED")
        assert await export_ids(c) == set()
        p.kill()
        await execute(c, "block-export-add", export_opts("e0", "n0", sock))
        io_ok("write", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 12)
        io_ok("verify", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 12)


async def test_exports_come_and_go_while_another_serves_io(daemon, tmp, io_procs):
    """`vubd-io stress` on e0 (2 queues) while other exports are added, used and
    deleted: no request fails, the data stays intact."""
    p = IoProc(
        tmp, "stress", "--socket", daemon.sock("e0"), "--seconds", 6, "--seed", 21, "--queues", 2
    )
    io_procs.append(p)
    await p.ready()
    async with daemon.qmp() as c:
        for i in range(2):
            await add_file_node(c, tmp, f"side{i}", size=8 * MIB)
        with c.listener() as lst:
            for rnd in range(4):
                i = rnd % 2
                sock = daemon.sock(f"s{i}")
                await execute(c, "block-export-add", export_opts(f"s{i}", f"side{i}", sock))
                await asyncio.to_thread(
                    io_ok, "write", "--socket", sock, "--offset", rnd * MIB, "--len", MIB, "--seed", rnd
                )
                await asyncio.to_thread(
                    io_ok, "verify", "--socket", sock, "--offset", rnd * MIB, "--len", MIB, "--seed", rnd
                )
                await execute(c, "block-export-del", {"id": f"s{i}"})
                ev = await wait_event(lst, "BLOCK_EXPORT_DELETED")
                assert ev["data"] == {"id": f"s{i}"}
                # Nodes come and go too.
                await execute(c, "blockdev-add", {"driver": "null-co", "node-name": f"tmp{rnd}"})
                await execute(c, "blockdev-del", {"node-name": f"tmp{rnd}"})
        assert p.proc.poll() is None, "the stress run ended before the export changes did"
        r = await p.result()
        assert r["rc"] == 0 and r["ok"], f"I/O on e0 failed while exports came and went: {r}"
        assert r["writes"] > 0 and r["verified_blocks"] > 0, r
        # The side exports' data survived their export being deleted and re-added.
        for rnd in range(4):
            i = rnd % 2
            sock = daemon.sock(f"s{i}")
            await execute(c, "block-export-add", export_opts(f"s{i}", f"side{i}", sock))
            await asyncio.to_thread(
                io_ok, "verify", "--socket", sock, "--offset", rnd * MIB, "--len", MIB, "--seed", rnd
            )
            with c.listener() as lst:
                await execute(c, "block-export-del", {"id": f"s{i}"})
                await wait_event(lst, "BLOCK_EXPORT_DELETED")

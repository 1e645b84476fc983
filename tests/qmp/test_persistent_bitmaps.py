"""Persistent dirty bitmaps of qcow2 nodes over QMP: loaded when the node is added
(one qemu-img made, with the bits qemu-io's writes set), stored when it is deleted,
deleted from the image at once by block-dirty-bitmap-remove, read-only on a read-only
node and stored when a reopen makes the node read-only, in use in the image while the
node writes. Every expectation is qemu-storage-daemon 7.2's (``--daemon=qsd``)."""

import asyncio
import struct

from chains import img_info, qemu_img, run
from conftest import MIB, error, execute, export_opts, io_ok
from test_bitmaps import Model, bitmaps, check, info

SIZE = 16 * MIB


def image_bitmaps(img) -> list:
    """The bitmaps ``qemu-img info`` lists: (name, granularity, flags)."""
    data = img_info(img)["format-specific"]["data"]
    return [(b["name"], b["granularity"], b["flags"]) for b in data.get("bitmaps", [])]


async def add_node(c, img, read_only=False):
    await execute(c, "blockdev-add", {"driver": "file", "node-name": "qf",
                                      "filename": str(img)})
    await execute(c, "blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "qf",
                                      "read-only": read_only})


async def del_node(c):
    await execute(c, "blockdev-del", {"node-name": "q"})
    await execute(c, "blockdev-del", {"node-name": "qf"})


async def write_through_export(c, tmp, offset, length):
    sock = tmp / "q.sock"
    await execute(c, "block-export-add", export_opts("eq", "q", sock))
    io_ok("write", "--socket", sock, "--offset", offset, "--len", length, "--seed", 3)
    await execute(c, "block-export-del", {"id": "eq"})
    # The export goes once its client has gone: wait until it has.
    for _ in range(100):
        if not await execute(c, "query-block-exports"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("export eq still there")


async def test_stored_on_delete_loaded_on_add(start_daemon, tmp):
    img = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_img("bitmap", "--add", "-g", "64k", str(img), "qb")
    run("qemu-io", "-f", "qcow2", "-c", "write 0 64k", str(img))
    d = start_daemon([])
    async with d.qmp() as c:
        await add_node(c, img)
        qb = Model(SIZE, 65536)
        qb.mark(0, 65536)
        assert await info(c, "q", "qb") == {
            "name": "qb", "recording": True, "persistent": True, "busy": False,
            "granularity": 65536, "count": 65536}
        await check(c, "q", "qb", qb)
        # In use in the image while the node may write; the node's image
        # information lists the image's bitmaps as qemu-img does.
        assert image_bitmaps(img) == [("qb", 65536, ["in-use", "auto"])]
        nodes = await execute(c, "query-named-block-nodes")
        q = next(n for n in nodes if n["node-name"] == "q")
        assert q["image"]["format-specific"]["data"]["bitmaps"] == [
            {"flags": ["in-use", "auto"], "name": "qb", "granularity": 65536}]
        await execute(c, "block-dirty-bitmap-add", {"node": "q", "name": "p",
                                                    "granularity": 4096, "persistent": True})
        await execute(c, "block-dirty-bitmap-add", {"node": "q", "name": "t"})
        await execute(c, "block-dirty-bitmap-add", {"node": "q", "name": "off",
                                                    "persistent": True, "disabled": True})
        await write_through_export(c, tmp, 1 * MIB, 8192)
        qb.mark(1 * MIB, 8192)
        p = Model(SIZE, 4096)
        p.mark(1 * MIB, 8192)
        await del_node(c)
        # New ones follow the image's own, newest first.
        assert image_bitmaps(img) == [
            ("qb", 65536, ["auto"]), ("off", 65536, []), ("p", 4096, ["auto"])]
        await add_node(c, img)
        # Persistent ones come back with their bits, the others do not.
        assert [b["name"] for b in await bitmaps(c, "q")] == ["p", "off", "qb"]
        await check(c, "q", "qb", qb)
        await check(c, "q", "p", p)
        assert (await info(c, "q", "off"))["recording"] is False
        # Removing a persistent bitmap deletes it from the image at once.
        await execute(c, "block-dirty-bitmap-remove", {"node": "q", "name": "p"})
        assert image_bitmaps(img) == [
            ("qb", 65536, ["in-use", "auto"]), ("off", 65536, ["in-use"])]
        await del_node(c)
    assert "No errors were found" in qemu_img("check", str(img))
    assert image_bitmaps(img) == [("qb", 65536, ["auto"]), ("off", 65536, [])]


async def test_read_only_nodes_and_reopen(start_daemon, tmp):
    img = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_img("bitmap", "--add", str(img), "b")
    d = start_daemon([])
    async with d.qmp() as c:
        await add_node(c, img, read_only=True)
        # Not marked in use by a read-only node; its bitmaps cannot change.
        assert image_bitmaps(img) == [("b", 65536, ["auto"])]
        await error(c, "block-dirty-bitmap-clear", {"node": "q", "name": "b"},
                    desc="Bitmap 'b' is readonly and cannot be modified")
        await execute(c, "blockdev-reopen", {"options": [
            {"driver": "qcow2", "node-name": "q", "file": "qf", "read-only": False}]})
        assert image_bitmaps(img) == [("b", 65536, ["in-use", "auto"])]
        await execute(c, "block-dirty-bitmap-clear", {"node": "q", "name": "b"})
        await write_through_export(c, tmp, 0, 4096)
        m = Model(SIZE, 65536)
        m.mark(0, 4096)
        await check(c, "q", "b", m)
        # Read-only again: stored, not in use.
        await execute(c, "blockdev-reopen", {"options": [
            {"driver": "qcow2", "node-name": "q", "file": "qf", "read-only": True}]})
        assert image_bitmaps(img) == [("b", 65536, ["auto"])]
        await error(c, "block-dirty-bitmap-clear", {"node": "q", "name": "b"},
                    desc="Bitmap 'b' is readonly and cannot be modified")
        await check(c, "q", "b", m)
        await del_node(c)
    assert "No errors were found" in qemu_img("check", str(img))


def set_in_use(img):
    """Sets the in-use flag of every bitmap in the image's directory (what a crash
    leaves)."""
    with open(img, "r+b") as f:
        head = f.read(65536)
        p = struct.unpack(">I", head[100:104])[0]
        while True:
            kind, length = struct.unpack(">II", head[p:p + 8])
            if kind == 0:
                raise AssertionError("no bitmaps extension")
            if kind == 0x23852875:
                nb, _, size, off = struct.unpack(">IIQQ", head[p + 8:p + 32])
                f.seek(off)
                d = bytearray(f.read(size))
                q = 0
                for _ in range(nb):
                    d[q + 15] |= 1
                    name_size, extra = struct.unpack(">HI", d[q + 18:q + 24])
                    q += (24 + name_size + extra + 7) // 8 * 8
                f.seek(off)
                f.write(d)
                return
            p += 8 + (length + 7) // 8 * 8


async def test_resize(start_daemon, tmp):
    img = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_img("bitmap", "--add", str(img), "b")
    d = start_daemon([])
    async with d.qmp() as c:
        await add_node(c, img)
        await write_through_export(c, tmp, SIZE - 4096, 4096)
        await execute(c, "block_resize", {"node-name": "q", "size": 2 * SIZE})
        await write_through_export(c, tmp, 2 * SIZE - 4096, 4096)
        m = Model(2 * SIZE, 65536)
        m.mark(SIZE - 4096, 4096)
        m.mark(2 * SIZE - 4096, 4096)
        await check(c, "q", "b", m)
        # Stored at the new size, and loaded so.
        await del_node(c)
        await add_node(c, img)
        await check(c, "q", "b", m)
        await del_node(c)
        assert "No errors were found" in qemu_img("check", str(img))
        # An inconsistent bitmap stops a resize.
        set_in_use(img)
        await add_node(c, img)
        assert (await info(c, "q", "b"))["inconsistent"] is True
        await error(c, "block_resize", {"node-name": "q", "size": 3 * SIZE},
                    desc="Bitmap 'b' is inconsistent and cannot be used")
        await execute(c, "block-dirty-bitmap-remove", {"node": "q", "name": "b"})
        await execute(c, "block_resize", {"node-name": "q", "size": 3 * SIZE})
        await del_node(c)
    assert "No errors were found" in qemu_img("check", str(img))

"""blockdev-add and blockdev-del."""

import pytest

from conftest import MIB, error, execute, export_opts, io_ok, make_image, node_names


@pytest.mark.parametrize(
    "opts,expect",
    [
        ({"driver": "null-co", "node-name": "x"}, {"x": ("null-co", 1 << 30)}),
        ({"driver": "null-co", "node-name": "x", "size": 4 * MIB}, {"x": ("null-co", 4 * MIB)}),
        (
            {"driver": "null-aio", "node-name": "x", "size": MIB, "read-zeroes": True},
            {"x": ("null-aio", MIB)},
        ),
        ({"driver": "file", "node-name": "x", "filename": "@img"}, {"x": ("file", 8 * MIB)}),
        (
            {"driver": "raw", "node-name": "x", "file": {"driver": "file", "filename": "@img"}},
            {"x": ("raw", 8 * MIB)},
        ),
        (
            {
                "driver": "raw",
                "node-name": "x",
                "offset": MIB,
                "size": 2 * MIB,
                "file": {"driver": "file", "filename": "@img", "node-name": "xf"},
            },
            {"x": ("raw", 2 * MIB), "xf": ("file", 8 * MIB)},
        ),
        (
            {"driver": "raw", "node-name": "x", "file": {"driver": "null-co", "size": MIB}},
            {"x": ("raw", MIB)},
        ),
    ],
    ids=["null-co", "null-co-size", "null-aio", "file", "raw-inline", "raw-window", "raw-null"],
)
async def test_blockdev_add_and_del(daemon, tmp, opts, expect):
    img = make_image(tmp / "x.img", 8 * MIB)

    def subst(o):
        if isinstance(o, dict):
            return {k: subst(v) for k, v in o.items()}
        return str(img) if o == "@img" else o

    async with daemon.qmp() as c:
        before = await node_names(c)
        assert await execute(c, "blockdev-add", subst(opts)) == {}
        nodes = {n["node-name"]: n for n in await execute(c, "query-named-block-nodes", {"flat": True})}
        for name, (drv, size) in expect.items():
            assert nodes[name]["drv"] == drv, nodes[name]
            assert nodes[name]["image"]["virtual-size"] == size, nodes[name]
        added = set(nodes) - before
        assert set(expect) <= added, added
        # Inline children without a node-name get a generated one.
        assert all(n in expect or n.startswith("#block") for n in added), added
        assert await execute(c, "blockdev-del", {"node-name": "x"}) == {}
        # The node goes with its inline children.
        assert await node_names(c) == before


async def test_blockdev_add_child_by_reference(daemon, tmp):
    img = make_image(tmp / "r.img", 4 * MIB)
    async with daemon.qmp() as c:
        await execute(c, "blockdev-add", {"driver": "file", "node-name": "rf", "filename": str(img)})
        await execute(c, "blockdev-add", {"driver": "raw", "node-name": "rr", "file": "rf"})
        # The child is in use by rr.
        await error(c, "blockdev-del", {"node-name": "rf"}, contains=["rf", "in use"])
        await execute(c, "blockdev-del", {"node-name": "rr"})
        # A child added on its own stays when its parent goes.
        assert "rf" in await node_names(c)
        await execute(c, "blockdev-del", {"node-name": "rf"})
        assert "rf" not in await node_names(c)


async def test_blockdev_add_export_and_io(daemon, tmp):
    """A node added at run time can be exported and serves I/O."""
    img = make_image(tmp / "io.img", 16 * MIB)
    async with daemon.qmp() as c:
        await execute(
            c,
            "blockdev-add",
            {"driver": "raw", "node-name": "io", "file": {"driver": "file", "filename": str(img)}},
        )
        sock = daemon.sock("io0")
        await execute(c, "block-export-add", export_opts("io0", "io", sock))
        assert io_ok("capacity", "--socket", sock)["capacity"] == 16 * MIB
        io_ok("write", "--socket", sock, "--offset", 0, "--len", 2 * MIB, "--seed", 9)
        io_ok("verify", "--socket", sock, "--offset", 0, "--len", 2 * MIB, "--seed", 9)
    # The data went to the file.
    with open(img, "rb") as f:
        assert f.read(512) != b"\0" * 512


async def test_blockdev_add_errors(daemon, tmp):
    img = make_image(tmp / "e.img", MIB)
    async with daemon.qmp() as c:
        before = await node_names(c)
        await error(c, "blockdev-add", {"node-name": "x"}, desc="Parameter 'driver' is missing")
        await error(
            c,
            "blockdev-add",
            {"driver": "bogus", "node-name": "x"},
            desc="Parameter 'driver' does not accept value 'bogus'",
        )
        await error(
            c,
            "blockdev-add",
            {"driver": "null-co", "node-name": "x", "size": "1M"},
            desc="Invalid parameter type for 'size', expected: integer",
        )
        await error(
            c,
            "blockdev-add",
            {"driver": "null-co", "node-name": "x", "read-only": "on"},
            desc="Invalid parameter type for 'read-only', expected: boolean",
        )
        await error(
            c,
            "blockdev-add",
            {"driver": "null-co", "node-name": "x", "bogus": 1},
            desc="Parameter 'bogus' is unexpected",
        )
        await error(
            c,
            "blockdev-add",
            {"driver": "file", "node-name": "x"},
            desc="Parameter 'filename' is missing",
        )
        await error(
            c,
            "blockdev-add",
            {"driver": "file", "node-name": "x", "filename": 5},
            desc="Invalid parameter type for 'filename', expected: string",
        )
        await error(
            c,
            "blockdev-add",
            {"driver": "raw", "node-name": "x"},
            desc="Parameter 'file' is missing",
        )
        await error(
            c,
            "blockdev-add",
            {"driver": "null-co", "node-name": "x", "detect-zeroes": "maybe"},
            desc="Parameter 'detect-zeroes' does not accept value 'maybe'",
        )
        # A root node needs a name.
        await error(
            c,
            "blockdev-add",
            {"driver": "null-co"},
            desc="'node-name' must be specified for the root node",
        )
        await error(
            c, "blockdev-add", {"driver": "null-co", "node-name": "n0"}, contains=["n0"]
        )
        await error(
            c, "blockdev-add", {"driver": "null-co", "node-name": "n0-file"}, contains=["n0-file"]
        )
        await error(
            c,
            "blockdev-add",
            {"driver": "file", "node-name": "x", "filename": str(tmp / "missing" / "x.img")},
            contains=["x.img"],
        )
        await error(
            c,
            "blockdev-add",
            {"driver": "raw", "node-name": "x", "file": "nosuch"},
            contains=["nosuch"],
        )
        await error(
            c,
            "blockdev-add",
            {"driver": "raw", "node-name": "x", "file": {"driver": "file"}},
            desc="Parameter 'file.filename' is missing",
        )
        await error(
            c,
            "blockdev-add",
            {"driver": "host_device", "node-name": "x", "filename": str(img)},
            contains=[str(img)],
        )
        # A window beyond the end of its child.
        await error(
            c,
            "blockdev-add",
            {"driver": "raw", "node-name": "x", "offset": 4096, "size": MIB, "file": {"driver": "file", "filename": str(img)}},
        )
        # Nothing was left behind by the failures (no half-made nodes or children).
        assert await node_names(c) == before
        # And the names are still free.
        await execute(c, "blockdev-add", {"driver": "null-co", "node-name": "x"})
        await execute(c, "blockdev-del", {"node-name": "x"})


async def test_blockdev_add_invalid_node_names(daemon):
    async with daemon.qmp() as c:
        for name in ("", "1abc", "a b", "#block5", "x" * 200):
            await error(c, "blockdev-add", {"driver": "null-co", "node-name": name})
        assert await node_names(c) == {"n0", "n0-file"}


async def test_blockdev_add_read_only_file(daemon, tmp):
    img = make_image(tmp / "ro.img", MIB)
    img.chmod(0o444)
    async with daemon.qmp() as c:
        await execute(
            c, "blockdev-add", {"driver": "file", "node-name": "ro", "filename": str(img), "read-only": True}
        )
        nodes = {n["node-name"]: n for n in await execute(c, "query-named-block-nodes", {"flat": True})}
        assert nodes["ro"]["ro"] is True
        # A read-only node cannot back a writable export.
        await error(c, "block-export-add", export_opts("roe", "ro", tmp / "roe.sock"), contains=[])
        await execute(c, "blockdev-del", {"node-name": "ro"})


async def test_blockdev_del_errors(daemon):
    async with daemon.qmp() as c:
        await error(c, "blockdev-del", {}, desc="Parameter 'node-name' is missing")
        await error(
            c,
            "blockdev-del",
            {"node-name": 5},
            desc="Invalid parameter type for 'node-name', expected: string",
        )
        await error(
            c, "blockdev-del", {"node-name": "n0", "x": 1}, desc="Parameter 'x' is unexpected"
        )
        await error(
            c,
            "blockdev-del",
            {"node-name": "nosuch"},
            desc="Failed to find node with node-name='nosuch'",
        )
        # In use by an export.
        await error(c, "blockdev-del", {"node-name": "n0"}, desc="Node n0 is in use")
        # In use as another node's child.
        await error(c, "blockdev-del", {"node-name": "n0-file"}, desc="Block device n0-file is in use")
        assert await node_names(c) == {"n0", "n0-file"}


async def test_blockdev_del_inline_child_refused(daemon, tmp):
    img = make_image(tmp / "i.img", MIB)
    async with daemon.qmp() as c:
        await execute(
            c,
            "blockdev-add",
            {"driver": "raw", "node-name": "p", "file": {"driver": "file", "filename": str(img)}},
        )
        child = [n for n in await node_names(c) if n.startswith("#block")]
        assert len(child) == 1, child
        await error(c, "blockdev-del", {"node-name": child[0]}, contains=[child[0]])
        # A named inline child is not the monitor's either.
        await execute(
            c,
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "q",
                "file": {"driver": "null-co", "node-name": "qchild"},
            },
        )
        await error(c, "blockdev-del", {"node-name": "qchild"}, contains=["qchild"])
        await execute(c, "blockdev-del", {"node-name": "q"})
        await execute(c, "blockdev-del", {"node-name": "p"})
        assert await node_names(c) == {"n0", "n0-file"}


async def test_blockdev_del_after_export_del(daemon):
    async with daemon.qmp() as c:
        with c.listener() as lst:
            await execute(c, "block-export-del", {"id": "e0"})
            from conftest import wait_event

            await wait_event(lst, "BLOCK_EXPORT_DELETED")
        await execute(c, "blockdev-del", {"node-name": "n0"})
        await execute(c, "blockdev-del", {"node-name": "n0-file"})
        assert await node_names(c) == set()


async def test_blockdev_readd_same_file_after_del(daemon, tmp):
    """blockdev-del releases the image (its lock and descriptor): the same file opens
    again, writable, right away."""
    img = make_image(tmp / "again.img", MIB)
    async with daemon.qmp() as c:
        for _ in range(3):
            await execute(c, "blockdev-add", {"driver": "file", "node-name": "ag", "filename": str(img)})
            await execute(c, "blockdev-del", {"node-name": "ag"})

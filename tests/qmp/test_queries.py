"""query-version, query-named-block-nodes, query-block-exports, query-iothreads,
query-blockstats."""

import os

import pytest

from conftest import MIB, error, execute, io_ok

# BlockDeviceInfo members QEMU 7.2 always returns (qapi/block-core.json).
BLOCK_DEVICE_INFO_REQUIRED = {
    "file",
    "node-name",
    "ro",
    "drv",
    "backing_file_depth",
    "encrypted",
    "detect_zeroes",
    "bps",
    "bps_rd",
    "bps_wr",
    "iops",
    "iops_rd",
    "iops_wr",
    "image",
    "cache",
    "write_threshold",
}

# BlockDeviceStats members the brief and docs/qmp.md promise for vubd.
BLOCK_DEVICE_STATS_REQUIRED = {
    "rd_bytes",
    "wr_bytes",
    "unmap_bytes",
    "rd_operations",
    "wr_operations",
    "flush_operations",
    "unmap_operations",
    "rd_total_time_ns",
    "wr_total_time_ns",
    "flush_total_time_ns",
    "unmap_total_time_ns",
    "rd_merged",
    "wr_merged",
    "unmap_merged",
    "failed_rd_operations",
    "failed_wr_operations",
    "failed_flush_operations",
    "failed_unmap_operations",
    "invalid_rd_operations",
    "invalid_wr_operations",
    "invalid_flush_operations",
    "invalid_unmap_operations",
    "account_invalid",
    "account_failed",
    "timed_stats",
    "wr_highest_offset",
}


async def test_query_version(daemon, kind):
    async with daemon.qmp() as c:
        v = await execute(c, "query-version")
        assert set(v) == {"qemu", "package"}, v
        assert set(v["qemu"]) == {"major", "minor", "micro"}, v
        if kind == "vubd":
            assert v["qemu"] == {"major": 7, "minor": 2, "micro": 0}, v
            assert v["package"].startswith("vubd "), v
            # The greeting says the same.
            assert c.greeting.QMP.version["package"] == v["package"]
        await error(c, "query-version", {"x": 1}, desc="Parameter 'x' is unexpected")


def check_node_info(n: dict):
    missing = BLOCK_DEVICE_INFO_REQUIRED - set(n)
    assert not missing, f"{n.get('node-name')}: lacks {sorted(missing)}: {n}"
    assert isinstance(n["ro"], bool) and isinstance(n["encrypted"], bool), n
    assert isinstance(n["drv"], str) and isinstance(n["file"], str), n
    for k in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr", "write_threshold"):
        assert n[k] == 0, (k, n)
    assert n["backing_file_depth"] == 0, n
    assert n["detect_zeroes"] in ("off", "on", "unmap"), n
    assert set(n["cache"]) == {"writeback", "direct", "no-flush"}, n
    assert all(isinstance(x, bool) for x in n["cache"].values()), n
    img = n["image"]
    for k, t in (("filename", str), ("format", str), ("virtual-size", int)):
        assert isinstance(img.get(k), t), (k, n)


@pytest.mark.parametrize("flat", [True, False, None])
async def test_query_named_block_nodes(daemon, tmp, flat):
    args = {} if flat is None else {"flat": flat}
    img = str(tmp / "n0.img")
    async with daemon.qmp() as c:
        nodes = await execute(c, "query-named-block-nodes", args)
        by_name = {n["node-name"]: n for n in nodes}
        assert set(by_name) == {"n0", "n0-file"}, by_name.keys()
        for n in nodes:
            check_node_info(n)
        raw, f = by_name["n0"], by_name["n0-file"]
        assert raw["drv"] == "raw" and f["drv"] == "file", nodes
        assert raw["image"]["format"] == "raw" and f["image"]["format"] == "file", nodes
        assert raw["image"]["virtual-size"] == 64 * MIB, raw
        assert f["image"]["virtual-size"] == 64 * MIB, f
        assert raw["file"] == img and f["file"] == img, nodes
        assert f["image"]["filename"] == img, f
        assert raw["ro"] is False and f["ro"] is False, nodes
        assert raw["detect_zeroes"] == "off", raw
        assert raw["cache"] == {"writeback": True, "direct": False, "no-flush": False}, raw


async def test_query_named_block_nodes_reflects_options(daemon, tmp):
    img = tmp / "ro.img"
    img.write_bytes(b"\0" * (2 * MIB))
    async with daemon.qmp() as c:
        await execute(
            c,
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "opt",
                "read-only": True,
                "detect-zeroes": "on",
                "file": {
                    "driver": "file",
                    "filename": str(img),
                    "read-only": True,
                    "cache": {"direct": True, "no-flush": True},
                },
            },
        )
        nodes = await execute(c, "query-named-block-nodes", {"flat": True})
        by_name = {n["node-name"]: n for n in nodes}
        opt = by_name["opt"]
        check_node_info(opt)
        assert opt["ro"] is True and opt["detect_zeroes"] == "on", opt
        assert opt["image"]["virtual-size"] == 2 * MIB, opt
        # The inline child is listed under a generated name.
        anon = [n for n in nodes if n["node-name"] not in ("n0", "n0-file", "opt")]
        assert len(anon) == 1, nodes
        child = anon[0]
        assert child["node-name"].startswith("#block"), child
        check_node_info(child)
        assert child["drv"] == "file" and child["ro"] is True, child
        assert child["cache"] == {"writeback": True, "direct": True, "no-flush": True}, child


async def test_query_named_block_nodes_errors(daemon):
    async with daemon.qmp() as c:
        await error(
            c,
            "query-named-block-nodes",
            {"flat": "yes"},
            desc="Invalid parameter type for 'flat', expected: boolean",
        )
        await error(c, "query-named-block-nodes", {"x": 1}, desc="Parameter 'x' is unexpected")


async def test_query_block_exports(daemon, kind):
    async with daemon.qmp() as c:
        exps = await execute(c, "query-block-exports")
        if kind == "vubd":
            # docs/qmp.md: a vubd extension, present when the export's error policies
            # can stop it (the default werror=enospc can).
            assert [e.pop("iostatus", None) for e in exps] == ["ok"], exps
        assert exps == [
            {"id": "e0", "type": "vhost-user-blk", "node-name": "n0", "shutting-down": False}
        ], exps
        await error(c, "query-block-exports", {"x": 1}, desc="Parameter 'x' is unexpected")


@pytest.mark.vubd_only("qemu-storage-daemon has no query-iothreads")
async def test_query_iothreads(start_daemon, tmp):
    d = start_daemon(
        [
            "--object",
            "iothread,id=io0",
            "--object",
            "iothread,id=io1,poll-max-ns=1000,poll-grow=3,poll-shrink=4",
        ]
    )
    async with d.qmp() as c:
        its = await execute(c, "query-iothreads")
        by_id = {t["id"]: t for t in its}
        assert set(by_id) == {"io0", "io1"}, its
        for t in its:
            assert set(t) == {
                "id",
                "thread-id",
                "poll-max-ns",
                "poll-grow",
                "poll-shrink",
                "aio-max-batch",
            }, t
            assert isinstance(t["thread-id"], int) and t["thread-id"] > 0, t
            assert os.path.isdir(f"/proc/{d.proc.pid}/task/{t['thread-id']}"), (
                f"thread-id {t['thread-id']} is not a thread of the daemon: {t}"
            )
        assert by_id["io0"]["poll-max-ns"] == 32768, by_id["io0"]
        assert (by_id["io1"]["poll-max-ns"], by_id["io1"]["poll-grow"], by_id["io1"]["poll-shrink"]) == (
            1000,
            3,
            4,
        ), by_id["io1"]
        assert by_id["io0"]["thread-id"] != by_id["io1"]["thread-id"], its
        await execute(c, "object-add", {"qom-type": "iothread", "id": "io2", "poll-max-ns": 0})
        its = {t["id"]: t for t in await execute(c, "query-iothreads")}
        assert its["io2"]["poll-max-ns"] == 0, its
        await execute(c, "object-del", {"id": "io2"})
        assert {t["id"] for t in await execute(c, "query-iothreads")} == {"io0", "io1"}
        await error(c, "query-iothreads", {"x": 1}, desc="Parameter 'x' is unexpected")


def check_stats(s: dict):
    missing = BLOCK_DEVICE_STATS_REQUIRED - set(s)
    assert not missing, f"stats lack {sorted(missing)}: {s}"
    for k, v in s.items():
        if k in ("account_invalid", "account_failed"):
            assert isinstance(v, bool), (k, s)
        elif k == "timed_stats":
            assert v == [], s
        elif k.endswith("_histogram"):
            continue
        else:
            assert isinstance(v, int) and v >= 0, (k, s)


@pytest.mark.vubd_only("qemu-storage-daemon keeps no statistics for export I/O")
async def test_query_blockstats_per_export(daemon):
    sock = daemon.sock("e0")
    async with daemon.qmp() as c:
        st = await execute(c, "query-blockstats")
        assert len(st) == 1, st
        e = st[0]
        assert e["qdev"] == "e0" and e["node-name"] == "n0" and e["device"] == "", e
        check_stats(e["stats"])
        for k in ("rd_bytes", "wr_bytes", "rd_operations", "wr_operations", "flush_operations"):
            assert e["stats"][k] == 0, (k, e)
        if "parent" in e:
            check_stats(e["parent"]["stats"])

        io_ok("write", "--socket", sock, "--offset", MIB, "--len", MIB, "--seed", 5)
        s = (await execute(c, "query-blockstats"))[0]["stats"]
        assert s["wr_bytes"] == MIB, s
        assert s["wr_operations"] >= 1, s
        assert s["flush_operations"] >= 1, s
        assert s["wr_highest_offset"] == 2 * MIB, s
        assert s["rd_bytes"] == 0, s
        assert s["failed_wr_operations"] == 0 and s["invalid_wr_operations"] == 0, s

        io_ok("verify", "--socket", sock, "--offset", MIB, "--len", MIB, "--seed", 5)
        s = (await execute(c, "query-blockstats"))[0]["stats"]
        assert s["rd_bytes"] == MIB and s["rd_operations"] >= 1, s
        assert s["wr_bytes"] == MIB, s

        # Per node: the write went through both nodes.
        nodes = {x["node-name"]: x for x in await execute(c, "query-blockstats", {"query-nodes": True})}
        assert set(nodes) == {"n0", "n0-file"}, nodes
        for x in nodes.values():
            check_stats(x["stats"])
        assert nodes["n0"]["stats"]["wr_bytes"] == MIB, nodes["n0"]
        assert nodes["n0-file"]["stats"]["wr_bytes"] == MIB, nodes["n0-file"]
        assert nodes["n0"]["stats"]["rd_bytes"] == MIB, nodes["n0"]


async def test_query_blockstats_query_nodes(daemon):
    async with daemon.qmp() as c:
        st = await execute(c, "query-blockstats", {"query-nodes": True})
        names = sorted(x["node-name"] for x in st)
        assert names == ["n0", "n0-file"], st
        for x in st:
            assert "stats" in x, x
            check_stats(x["stats"])
        st = await execute(c, "query-blockstats", {"query-nodes": False})
        assert isinstance(st, list)


async def test_query_blockstats_errors(daemon):
    async with daemon.qmp() as c:
        await error(
            c,
            "query-blockstats",
            {"query-nodes": 1},
            desc="Invalid parameter type for 'query-nodes', expected: boolean",
        )
        await error(c, "query-blockstats", {"x": 1}, desc="Parameter 'x' is unexpected")


@pytest.mark.parametrize("flat", [False, True])
async def test_query_named_block_nodes_qcow2_chain(start_daemon, tmp, flat):
    """A qcow2 node over a raw backing file: QEMU's qcow2 ImageInfo (cluster size,
    format-specific data, backing file names and, unless flat, the backing image) and
    the backing members of BlockDeviceInfo. Passes against qemu-storage-daemon too."""
    import subprocess

    base = tmp / "base.raw"
    top = tmp / "top.qcow2"
    for args in (
        ["create", "-q", "-f", "raw", base, "4M"],
        ["create", "-q", "-f", "qcow2", "-o", "cluster_size=128k,lazy_refcounts=on",
         "-b", base, "-F", "raw", top, "4M"],
    ):
        subprocess.run(["qemu-img", *map(str, args)], check=True)
    d = start_daemon([
        "--blockdev", f"file,node-name=f,filename={top}",
        "--blockdev", "qcow2,node-name=q,file=f",
    ])
    async with d.qmp() as c:
        nodes = {
            n["node-name"]: n
            for n in await execute(c, "query-named-block-nodes", {"flat": flat})
        }
    q = nodes["q"]
    # QEMU counts the depth only without flat.
    assert q["backing_file_depth"] == (0 if flat else 1), q
    assert q["backing_file"] == str(base), q
    img = q["image"]
    assert img["format"] == "qcow2" and img["cluster-size"] == 128 * 1024, img
    assert img["backing-filename"] == str(base), img
    assert img["full-backing-filename"] == str(base), img
    assert img["backing-filename-format"] == "raw", img
    assert img["format-specific"] == {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": True,
            "refcount-bits": 16,
            "corrupt": False,
            "extended-l2": False,
        },
    }, img
    if flat:
        assert "backing-image" not in img, img
    else:
        b = img["backing-image"]
        assert b["format"] == "raw" and b["filename"] == str(base), b
        assert b["virtual-size"] == 4 * MIB, b
    assert nodes["f"]["backing_file_depth"] == 0 and "backing_file" not in nodes["f"]

"""throttle-group objects (object-add, --object, object-del) and the throttle filter
driver (blockdev-add over a node, an export over it), with QEMU 7.2's texts.

Rates are measured by the Rust end-to-end test (tests/tests/throttle.rs), not here."""

from conftest import MIB, error, execute, export_opts, io_ok, node_names

TG = "throttle-group"


def limits(**kw) -> dict:
    """A full ThrottleLimits as qom-get returns it: zeroes, burst lengths 1."""
    out = {}
    for kind in ("iops", "bps"):
        for d in ("total", "read", "write"):
            out[f"{kind}-{d}"] = 0
            out[f"{kind}-{d}-max"] = 0
            out[f"{kind}-{d}-max-length"] = 1
    out["iops-size"] = 0
    out.update({k.replace("_", "-"): v for k, v in kw.items()})
    return out


async def test_throttle_group_add_del_and_limits(daemon):
    async with daemon.qmp() as c:
        assert await execute(c, "object-add", {"qom-type": TG, "id": "tg0"}) == {}
        await execute(
            c,
            "object-add",
            {"qom-type": TG, "id": "tg1", "limits": {"iops-total": 100, "bps-read": 1 << 20}},
        )
        await execute(
            c,
            "object-add",
            {
                "qom-type": TG,
                "id": "tg2",
                "x-iops-total": 10,
                "x-iops-total-max": 50,
                "x-iops-total-max-length": 3,
                "x-iops-size": 4096,
            },
        )
        get = lambda i, p: execute(c, "qom-get", {"path": f"/objects/{i}", "property": p})
        assert await get("tg0", "limits") == limits()
        assert await get("tg1", "limits") == limits(iops_total=100, bps_read=1 << 20)
        assert await get("tg2", "limits") == limits(
            iops_total=10, iops_total_max=50, iops_total_max_length=3, iops_size=4096
        )
        assert await get("tg2", "x-iops-total-max-length") == 3
        for i in ("tg0", "tg1", "tg2"):
            assert await execute(c, "object-del", {"id": i}) == {}
        await error(c, "object-del", {"id": "tg0"}, desc="object 'tg0' not found")


async def test_throttle_group_validation_texts(daemon):
    cases = [
        (
            {"limits": {"iops-total": 10, "iops-read": 5}},
            "bps/iops/max total values and read/write values cannot be used at the same time",
        ),
        (
            {"x-bps-total-max": 10, "x-bps-total": 5, "x-bps-write-max": 20, "x-bps-write": 1},
            "bps/iops/max total values and read/write values cannot be used at the same time",
        ),
        ({"x-iops-total": -1}, "Property values cannot be negative"),
        (
            {"x-iops-total-max-length": 5000000000},
            "x-iops-total-max-length value must be in therange [0, 4294967295]",
        ),
        ({"x-iops-size": 100}, "iops size requires an iops value to be set"),
        (
            {"x-iops-total": 1000000000000001},
            "bps/iops/max values must be within [0, 1000000000000000]",
        ),
        ({"x-iops-total": 10, "x-iops-total-max": 5}, "bps_max/iops_max cannot be lower than bps/iops"),
        ({"x-iops-total": 10, "x-iops-total-max-length": 5}, "burst length set without burst rate"),
        ({"x-iops-total-max": 10}, "bps_max/iops_max require corresponding bps/iops values"),
        (
            {"x-iops-total": 10, "x-iops-total-max": 20, "x-iops-total-max-length": 0},
            "the burst length cannot be 0",
        ),
        (
            {"x-iops-total": 10, "x-iops-total-max": 200000000, "x-iops-total-max-length": 200000000},
            "burst length too high for this burst rate",
        ),
        ({"x-iops-total": "5"}, "Invalid parameter type for 'x-iops-total', expected: integer"),
        ({"limits": {"iops-total": 1, "bogus": 1}}, "Parameter 'limits.bogus' is unexpected"),
        (
            {"limits": {"iops-total": "1"}},
            "Invalid parameter type for 'limits.iops-total', expected: integer",
        ),
        ({"limits": 5}, "Invalid parameter type for 'limits', expected: object"),
        ({"bogus": 1}, "Parameter 'bogus' is unexpected"),
    ]
    async with daemon.qmp() as c:
        for extra, desc in cases:
            await error(c, "object-add", {"qom-type": TG, "id": "tgx", **extra}, desc=desc)
        # Ids are shared with iothreads.
        await error(
            c,
            "object-add",
            {"qom-type": TG, "id": "io0"},
            desc="attempt to add duplicate property 'io0' to object (type 'container')",
        )
        await execute(c, "object-add", {"qom-type": TG, "id": "tg0"})
        await error(
            c,
            "object-add",
            {"qom-type": "iothread", "id": "tg0"},
            desc="attempt to add duplicate property 'tg0' to object (type 'container')",
        )
        # None of the failures left an object behind.
        await error(c, "object-del", {"id": "tgx"}, desc="object 'tgx' not found")


async def test_throttle_node_open_errors_and_group_in_use(daemon):
    async with daemon.qmp() as c:
        await execute(c, "object-add", {"qom-type": TG, "id": "tg0"})
        # Over a node in no iothread: qemu-storage-daemon 7.2 dies when a throttle
        # node over one in an iothread fails to open.
        await execute(c, "blockdev-add", {"driver": "null-co", "node-name": "z", "size": 8 * MIB})
        await error(
            c,
            "blockdev-add",
            {"driver": "throttle", "node-name": "t0", "file": "z"},
            desc="Parameter 'throttle-group' is missing",
        )
        await error(
            c,
            "blockdev-add",
            {"driver": "throttle", "node-name": "t0", "file": "z", "throttle-group": "nosuch"},
            desc="Throttle group 'nosuch' does not exist",
        )
        await error(
            c,
            "blockdev-add",
            {"driver": "throttle", "node-name": "t0", "throttle-group": "tg0"},
            desc="Parameter 'file' is missing",
        )
        await error(
            c,
            "blockdev-add",
            {"driver": "throttle", "node-name": "t0", "file": "z", "throttle-group": 5},
            desc="Invalid parameter type for 'throttle-group', expected: string",
        )
        await error(
            c,
            "blockdev-add",
            {"driver": "throttle", "node-name": "t0", "file": "z", "throttle-group": "tg0",
             "limits": {}},
            desc="Parameter 'limits' is unexpected",
        )
        assert "t0" not in await node_names(c)
        await execute(
            c, "blockdev-add", {"driver": "throttle", "node-name": "t0", "file": "z", "throttle-group": "tg0"}
        )
        # Two nodes may share a group.
        await execute(
            c, "blockdev-add", {"driver": "throttle", "node-name": "t1", "file": "t0", "throttle-group": "tg0"}
        )
        nodes = {n["node-name"]: n for n in await execute(c, "query-named-block-nodes", {"flat": True})}
        assert nodes["t0"]["drv"] == "throttle"
        assert nodes["t0"]["image"]["virtual-size"] == 8 * MIB
        await error(c, "object-del", {"id": "tg0"}, desc="object 'tg0' is in use, can not be deleted")
        await execute(c, "blockdev-del", {"node-name": "t1"})
        await error(c, "object-del", {"id": "tg0"}, desc="object 'tg0' is in use, can not be deleted")
        await execute(c, "blockdev-del", {"node-name": "t0"})
        assert await execute(c, "object-del", {"id": "tg0"}) == {}


async def test_export_over_a_throttle_node(start_daemon, tmp):
    """Data written through a throttled export reads back; the limits change live."""
    img = tmp / "t.img"
    with open(img, "wb") as f:
        f.truncate(16 * MIB)
    sock = tmp / "t.sock"
    d = start_daemon(
        [
            "--object", "iothread,id=io0",
            "--object", "throttle-group,id=tg0,x-iops-total=2000,x-bps-total=200000000",
            "--blockdev", f"file,node-name=f0,filename={img}",
            "--blockdev", "throttle,node-name=t0,file=f0,throttle-group=tg0",
            "--export", f"vhost-user-blk,id=e0,node-name=t0,addr.type=unix,addr.path={sock},writable=on,iothread=io0",
        ]
    )
    io_ok("write", "--socket", sock, "--offset", 0, "--len", 4 * MIB, "--seed", 7)
    io_ok("verify", "--socket", sock, "--offset", 0, "--len", 4 * MIB, "--seed", 7)
    async with d.qmp() as c:
        await execute(
            c, "qom-set", {"path": "/objects/tg0", "property": "limits", "value": {"iops-total": 0, "bps-total": 0}}
        )
        v = await execute(c, "qom-get", {"path": "tg0", "property": "limits"})
        assert v == limits()
    io_ok("verify", "--socket", sock, "--offset", 0, "--len", 4 * MIB, "--seed", 7)


async def test_reopen_moves_a_throttle_node_to_another_group(daemon):
    async with daemon.qmp() as c:
        await execute(c, "blockdev-add", {"driver": "null-co", "node-name": "z", "size": 8 * MIB})
        for i in ("tg0", "tg1"):
            await execute(c, "object-add", {"qom-type": TG, "id": i})
        t0 = {"driver": "throttle", "node-name": "t0", "file": "z"}
        await execute(c, "blockdev-add", {**t0, "throttle-group": "tg0"})
        await execute(c, "blockdev-reopen", {"options": [{**t0, "throttle-group": "tg1"}]})
        # The node left tg0 and holds tg1.
        assert await execute(c, "object-del", {"id": "tg0"}) == {}
        await error(c, "object-del", {"id": "tg1"}, desc="object 'tg1' is in use, can not be deleted")
        await error(c, "blockdev-reopen", {"options": [{**t0, "throttle-group": "tg0"}]},
                    desc="Throttle group 'tg0' does not exist")
        await error(c, "blockdev-reopen", {"options": [t0]},
                    desc="Parameter 'options[0].throttle-group' is missing")
        await error(c, "object-del", {"id": "tg1"}, desc="object 'tg1' is in use, can not be deleted")


async def test_insert_a_throttle_node_under_a_running_export(start_daemon, tmp):
    """blockdev-reopen puts a throttle node between a format node and its file while
    the export serves; data still round-trips, and the group is then in use."""
    img = tmp / "i.img"
    with open(img, "wb") as f:
        f.truncate(16 * MIB)
    sock = tmp / "i.sock"
    d = start_daemon(
        [
            "--object", "throttle-group,id=tg0,x-bps-total=100000000",
            "--blockdev", f"file,node-name=f0,filename={img}",
            "--blockdev", "raw,node-name=r0,file=f0",
            "--export", f"vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path={sock},writable=on",
        ]
    )
    io_ok("write", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 3)
    async with d.qmp() as c:
        await execute(c, "blockdev-add", {"driver": "throttle", "node-name": "t0", "file": "f0",
                                          "throttle-group": "tg0"})
        await execute(c, "blockdev-reopen",
                      {"options": [{"driver": "raw", "node-name": "r0", "file": "t0"}]})
        nodes = {n["node-name"]: n for n in await execute(c, "query-named-block-nodes", {"flat": True})}
        assert "t0" in nodes
        io_ok("verify", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 3)
        io_ok("write", "--socket", sock, "--offset", MIB, "--len", MIB, "--seed", 4)
        io_ok("verify", "--socket", sock, "--offset", MIB, "--len", MIB, "--seed", 4)
        await error(c, "object-del", {"id": "tg0"}, desc="object 'tg0' is in use, can not be deleted")
        # And out again.
        await execute(c, "blockdev-reopen",
                      {"options": [{"driver": "raw", "node-name": "r0", "file": "f0"}]})
        await execute(c, "blockdev-del", {"node-name": "t0"})
        assert await execute(c, "object-del", {"id": "tg0"}) == {}
        io_ok("verify", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 3)
        io_ok("verify", "--socket", sock, "--offset", MIB, "--len", MIB, "--seed", 4)

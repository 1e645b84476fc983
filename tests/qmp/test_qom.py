"""qom-list, qom-get, qom-set, qom-list-types and qom-list-properties for the object
types vubd has (iothread, throttle-group, secret), with QEMU 7.2's paths and texts.

QEMU lists properties in hash order: lists are compared as sets."""

from conftest import error, execute

IOTHREAD_PROPS = {
    ("type", "string"),
    ("thread-pool-min", "int"),
    ("thread-pool-max", "int"),
    ("aio-max-batch", "int"),
    ("poll-max-ns", "int"),
    ("poll-grow", "int"),
    ("poll-shrink", "int"),
}

THROTTLE_PROPS = {("type", "string"), ("limits", "ThrottleLimits")} | {
    (f"x-{k}-{d}{s}", "int")
    for k in ("iops", "bps")
    for d in ("total", "read", "write")
    for s in ("", "-max", "-max-length")
} | {("x-iops-size", "int")}


SECRET_PROPS = {
    ("type", "string"),
    ("loaded", "bool"),
    ("format", "QCryptoSecretFormat"),
    ("keyid", "string"),
    ("iv", "string"),
    ("data", "string"),
    ("file", "string"),
}


def props(lst) -> set:
    return {(p["name"], p["type"]) for p in lst}


async def test_qom_list_tree(daemon):
    async with daemon.qmp() as c:
        await execute(c, "object-add", {"qom-type": "throttle-group", "id": "tg0"})
        root = props(await execute(c, "qom-list", {"path": "/"}))
        assert {("type", "string"), ("objects", "child<container>")} <= root
        objs = props(await execute(c, "qom-list", {"path": "/objects"}))
        assert objs == {
            ("type", "string"),
            ("io0", "child<iothread>"),
            ("tg0", "child<throttle-group>"),
        }
        assert props(await execute(c, "qom-list", {"path": "/objects/io0"})) == IOTHREAD_PROPS
        # Partial paths, and a trailing slash.
        assert props(await execute(c, "qom-list", {"path": "io0"})) == IOTHREAD_PROPS
        assert props(await execute(c, "qom-list", {"path": "/objects/tg0/"})) == THROTTLE_PROPS
        assert props(await execute(c, "qom-list", {"path": "objects"})) == objs
        await error(c, "qom-list", {"path": "/nosuch"}, cls="DeviceNotFound", desc="Device '/nosuch' not found")
        await error(c, "qom-list", {"path": "nosuch"}, cls="DeviceNotFound", desc="Device 'nosuch' not found")
        await error(c, "qom-list", {"path": ""}, desc="Path '' is ambiguous")
        await error(c, "qom-list", {}, desc="Parameter 'path' is missing")


async def test_qom_get(daemon):
    async with daemon.qmp() as c:
        await execute(c, "object-add", {"qom-type": "iothread", "id": "io1", "poll-max-ns": 1000,
                                        "poll-grow": 3, "poll-shrink": 4, "aio-max-batch": 5})
        get = lambda p, n: execute(c, "qom-get", {"path": p, "property": n})
        assert await get("/objects/io1", "poll-max-ns") == 1000
        assert await get("/objects/io1", "poll-grow") == 3
        assert await get("io1", "poll-shrink") == 4
        assert await get("io1", "aio-max-batch") == 5
        assert await get("io1", "thread-pool-min") == 0
        assert await get("io1", "thread-pool-max") == 64
        assert await get("/objects/io0", "poll-max-ns") == 32768
        assert await get("/objects/io0", "type") == "iothread"
        assert await get("/objects", "type") == "container"
        assert await get("/", "type") == "container"
        assert await get("/objects", "io1") == "/objects/io1"
        assert await get("/", "objects") == "/objects"
        # QEMU 7.2's iothread has no thread-id property (query-iothreads has it).
        await error(c, "qom-get", {"path": "io0", "property": "thread-id"},
                    desc="Property 'iothread.thread-id' not found")
        await error(c, "qom-get", {"path": "/objects/nosuch", "property": "type"},
                    cls="DeviceNotFound", desc="Device '/objects/nosuch' not found")
        await error(c, "qom-get", {"path": "io0"}, desc="Parameter 'property' is missing")
        await error(c, "qom-get", {"path": "io0", "property": "type", "x": 1},
                    desc="Parameter 'x' is unexpected")


async def test_qom_set_iothread(daemon):
    async with daemon.qmp() as c:
        path = "/objects/io0"
        for prop, value in (("poll-max-ns", 5000), ("poll-grow", 2), ("poll-shrink", 3),
                            ("aio-max-batch", 7), ("thread-pool-min", 1), ("thread-pool-max", 8)):
            assert await execute(c, "qom-set", {"path": path, "property": prop, "value": value}) == {}
            assert await execute(c, "qom-get", {"path": path, "property": prop}) == value
        # The polling parameters are live: polling off, then on again.
        await execute(c, "qom-set", {"path": path, "property": "poll-max-ns", "value": 0})
        await execute(c, "qom-set", {"path": path, "property": "poll-max-ns", "value": 32768})
        for prop in ("poll-max-ns", "poll-grow", "aio-max-batch", "thread-pool-min"):
            await error(c, "qom-set", {"path": path, "property": prop, "value": -1},
                        desc=f"{prop} value must be in range [0, 9223372036854775807]")
        await error(c, "qom-set", {"path": path, "property": "thread-pool-min", "value": 100},
                    desc="bad thread-pool-min/thread-pool-max values")
        await error(c, "qom-set", {"path": path, "property": "thread-pool-max", "value": 3000000000},
                    desc="bad thread-pool-min/thread-pool-max values")
        for bad in ("5", 1.5, 18446744073709551615):
            await error(c, "qom-set", {"path": path, "property": "poll-max-ns", "value": bad},
                        desc="Invalid parameter type for 'poll-max-ns', expected: integer")
        await error(c, "qom-set", {"path": path, "property": "nosuch", "value": 1},
                    desc="Property 'iothread.nosuch' not found")
        await error(c, "qom-set", {"path": path, "property": "type", "value": "x"},
                    desc="Property 'iothread.type' is not writable")
        await error(c, "qom-set", {"path": path, "property": "poll-max-ns"},
                    desc="Parameter 'value' is missing")
        await error(c, "qom-set", {"path": "/objects", "property": "io0", "value": "x"},
                    desc="Property 'container.io0' is not writable")
        # Failed sets changed nothing.
        assert await execute(c, "qom-get", {"path": path, "property": "poll-max-ns"}) == 32768


async def test_qom_set_throttle_group(daemon):
    async with daemon.qmp() as c:
        await execute(c, "object-add", {"qom-type": "throttle-group", "id": "tg0", "x-iops-total": 100})
        path = "/objects/tg0"
        lim = lambda: execute(c, "qom-get", {"path": path, "property": "limits"})
        sets = lambda v: {"path": path, "property": "limits", "value": v}
        assert (await lim())["iops-total"] == 100
        # A partial update keeps the other limits.
        await execute(c, "qom-set", sets({"bps-total": 1 << 20}))
        v = await lim()
        assert (v["iops-total"], v["bps-total"]) == (100, 1 << 20)
        assert await execute(c, "qom-get", {"path": path, "property": "x-bps-total"}) == 1 << 20
        await error(c, "qom-set", sets({"iops-read": 50}),
                    desc="bps/iops/max total values and read/write values cannot be used at the same time")
        await error(c, "qom-set", sets({"iops-total": -1}),
                    desc="bps/iops/max values must be within [0, 1000000000000000]")
        await error(c, "qom-set", sets({"iops-total-max-length": 5000000000}),
                    desc="iops-total-max-length value must be in the range [0, 4294967295]")
        await error(c, "qom-set", sets({"bogus": 1}), desc="Parameter 'limits.bogus' is unexpected")
        await error(c, "qom-set", sets(5), desc="Invalid parameter type for 'limits', expected: object")
        await error(c, "qom-set", {"path": path, "property": "x-iops-total", "value": 5},
                    desc="Property cannot be set after initialization")
        await error(c, "qom-set", {"path": path, "property": "type", "value": "x"},
                    desc="Property 'throttle-group.type' is not writable")
        # Failed sets changed nothing.
        v = await lim()
        assert (v["iops-total"], v["bps-total"], v["iops-read"]) == (100, 1 << 20, 0)
        await execute(c, "qom-set", sets({"iops-total": 0}))
        await error(c, "qom-set", sets({"iops-total-max": 200}),
                    desc="bps_max/iops_max require corresponding bps/iops values")


async def test_qom_list_types_and_properties(daemon):
    async with daemon.qmp() as c:
        t = await execute(c, "qom-list-types", {"implements": "throttle-group"})
        assert t == [{"name": "throttle-group", "parent": "object"}]
        t = await execute(c, "qom-list-types", {"implements": "iothread"})
        assert t == [{"name": "iothread", "parent": "event-loop-base"}]
        assert await execute(c, "qom-list-types", {"implements": "nosuch"}) == []
        t = await execute(c, "qom-list-types", {"implements": "event-loop-base", "abstract": True})
        assert {"abstract": True, "name": "event-loop-base", "parent": "object"} in t
        uc = {x["name"] for x in await execute(c, "qom-list-types", {"implements": "user-creatable"})}
        assert {"iothread", "throttle-group"} <= uc
        alltypes = {x["name"] for x in await execute(c, "qom-list-types")}
        assert {"iothread", "throttle-group", "container"} <= alltypes
        assert "event-loop-base" not in alltypes
        lp = lambda n: execute(c, "qom-list-properties", {"typename": n})
        assert props(await lp("iothread")) == IOTHREAD_PROPS
        assert props(await lp("throttle-group")) == THROTTLE_PROPS
        assert props(await lp("object")) == {("type", "string")}
        assert props(await lp("container")) == {("type", "string")}
        assert props(await lp("event-loop-base")) == {
            ("type", "string"), ("thread-pool-min", "int"), ("thread-pool-max", "int"), ("aio-max-batch", "int")}
        await error(c, "qom-list-properties", {"typename": "nosuch"}, cls="DeviceNotFound",
                    desc="Class 'nosuch' not found")


async def test_query_commands_lists_the_qom_commands(daemon):
    async with daemon.qmp() as c:
        names = {x["name"] for x in await execute(c, "query-commands")}
        assert {"qom-list", "qom-get", "qom-set", "qom-list-types", "qom-list-properties"} <= names


async def test_qom_secret(daemon, tmp):
    """Secrets are QOM objects as in QEMU: listed under /objects, their properties the
    options they were added with (empty strings for unset ones). Setting them later
    changes what they read and nothing else: the secret stays what it was loaded as."""
    key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
    pw = tmp / "pw.txt"
    pw.write_text("from-file")
    async with daemon.qmp() as c:
        await execute(c, "object-add", {"qom-type": "secret", "id": "s0", "data": "pw0"})
        await execute(c, "object-add", {"qom-type": "secret", "id": "s1", "file": str(pw)})
        await execute(c, "object-add", {"qom-type": "secret", "id": "k", "data": key,
                                        "format": "base64"})
        objs = props(await execute(c, "qom-list", {"path": "/objects"}))
        assert {("s0", "child<secret>"), ("s1", "child<secret>"), ("k", "child<secret>")} <= objs
        for path in ("/objects/s0", "s1", "/objects/k/"):
            assert props(await execute(c, "qom-list", {"path": path})) == SECRET_PROPS
        get = lambda p, n: execute(c, "qom-get", {"path": p, "property": n})
        want = {
            "s0": {"type": "secret", "data": "pw0", "file": "", "format": "raw", "keyid": "",
                   "iv": "", "loaded": True},
            "s1": {"data": "", "file": str(pw), "format": "raw", "loaded": True},
            "k": {"data": key, "file": "", "format": "base64", "keyid": "", "iv": ""},
        }
        for sid, values in want.items():
            for prop, value in values.items():
                assert await get(f"/objects/{sid}", prop) == value, (sid, prop)
        await error(c, "qom-get", {"path": "/objects/s0", "property": "bogus"},
                    desc="Property 'secret.bogus' not found")
        sets = lambda n, v: {"path": "/objects/s0", "property": n, "value": v}
        await error(c, "qom-set", sets("loaded", False), desc="Property 'secret.loaded' is not writable")
        await error(c, "qom-set", sets("type", "x"), desc="Property 'secret.type' is not writable")
        await error(c, "qom-set", sets("bogus", 1), desc="Property 'secret.bogus' not found")
        await error(c, "qom-set", sets("data", 5),
                    desc="Invalid parameter type for 'data', expected: string")
        await error(c, "qom-set", sets("format", "bogus"),
                    desc="Parameter 'format' does not accept value 'bogus'")
        await error(c, "qom-set", sets("format", 1),
                    desc="Invalid parameter type for 'format', expected: string")
        for prop, value in (("data", "new"), ("format", "base64"), ("keyid", "k"),
                            ("iv", "AAAAAAAAAAAAAAAAAAAAAA=="), ("file", "/nonexistent")):
            assert await execute(c, "qom-set", sets(prop, value)) == {}
            assert await get("/objects/s0", prop) == value
        t = await execute(c, "qom-list-types", {"implements": "secret"})
        assert t == [{"name": "secret", "parent": "secret_common"}]
        t = await execute(c, "qom-list-types", {"implements": "secret_common", "abstract": True})
        assert {"abstract": True, "name": "secret_common", "parent": "object"} in t
        assert {"name": "secret", "parent": "secret_common"} in t
        uc = {x["name"] for x in await execute(c, "qom-list-types", {"implements": "user-creatable"})}
        assert "secret" in uc
        lp = lambda n: execute(c, "qom-list-properties", {"typename": n})
        assert props(await lp("secret")) == SECRET_PROPS
        assert props(await lp("secret_common")) == SECRET_PROPS - {("data", "string"), ("file", "string")}
        await execute(c, "object-del", {"id": "s0"})
        objs = props(await execute(c, "qom-list", {"path": "/objects"}))
        assert ("s0", "child<secret>") not in objs and ("s1", "child<secret>") in objs
        await error(c, "qom-get", {"path": "/objects/s0", "property": "data"},
                    cls="DeviceNotFound", desc="Device '/objects/s0' not found")

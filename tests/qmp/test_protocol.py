"""QMP protocol: greeting, negotiation, ids, input errors, several clients, events."""

import asyncio
import json
import socket

import pytest
from qemu.qmp import ExecuteError

from conftest import (
    check_timestamp,
    error,
    execute,
    export_ids,
    export_opts,
    node_names,
    wait_event,
)


def test_greeting_shape(daemon, kind):
    r = daemon.raw()
    g = r.greeting
    assert set(g) == {"QMP"}, g
    assert set(g["QMP"]) == {"version", "capabilities"}, g
    v = g["QMP"]["version"]
    assert set(v) == {"qemu", "package"}, g
    assert set(v["qemu"]) == {"major", "minor", "micro"}, g
    assert all(type(v["qemu"][k]) is int for k in ("major", "minor", "micro")), g
    assert isinstance(v["package"], str), g
    assert g["QMP"]["capabilities"] == ["oob"], g
    if kind == "vubd":
        assert v["qemu"] == {"major": 7, "minor": 2, "micro": 0}, g
        assert v["package"].startswith("vubd "), g
    # Every message is one line ending in CRLF, as QEMU sends it.
    assert r.lines[0].endswith(b"}\r\n"), r.lines[0]
    r.negotiate()
    assert r.lines[-1] == b'{"return": {}}\r\n', r.lines[-1]
    r.close()


async def test_greeting_through_qemu_qmp(daemon, kind):
    async with daemon.qmp() as c:
        g = c.greeting
        assert g is not None
        if kind == "vubd":
            v = g.QMP.version
            assert v["qemu"] == {"major": 7, "minor": 2, "micro": 0}
            assert v["package"].startswith("vubd ")
        assert "oob" in g.QMP.capabilities


@pytest.mark.parametrize(
    "cmd,args",
    [
        ("query-version", None),
        ("query-block-exports", None),
        ("blockdev-add", {"driver": "null-co", "node-name": "x"}),
        ("quit", None),
        ("no-such-command", None),
    ],
)
async def test_commands_refused_before_negotiation(daemon, cmd, args):
    async with daemon.qmp(negotiate=False) as c:
        await error(
            c,
            cmd,
            args,
            cls="CommandNotFound",
            desc="Expecting capabilities negotiation with 'qmp_capabilities'",
        )
        # Nothing happened, and negotiation still works afterwards.
        assert await execute(c, "qmp_capabilities") == {}
        assert "x" not in await node_names(c)
        assert await export_ids(c) == {"e0"}


async def test_qmp_capabilities_twice(daemon):
    async with daemon.qmp() as c:
        await error(
            c,
            "qmp_capabilities",
            cls="CommandNotFound",
            desc="Capabilities negotiation is already complete, command ignored",
        )
        await error(
            c,
            "qmp_capabilities",
            {"enable": ["oob"]},
            cls="CommandNotFound",
            desc="Capabilities negotiation is already complete, command ignored",
        )
        # The session still works.
        assert "qemu" in await execute(c, "query-version")


async def test_qmp_capabilities_arguments(daemon):
    async with daemon.qmp(negotiate=False) as c:
        await error(c, "qmp_capabilities", {"x": 1}, desc="Parameter 'x' is unexpected")
        await error(
            c,
            "qmp_capabilities",
            {"enable": "oob"},
            desc="Invalid parameter type for 'enable', expected: array",
        )
        # A rejected qmp_capabilities does not complete negotiation.
        await error(
            c,
            "query-version",
            cls="CommandNotFound",
            desc="Expecting capabilities negotiation with 'qmp_capabilities'",
        )
        assert await execute(c, "qmp_capabilities", {"enable": ["oob"]}) == {}
        assert "qemu" in await execute(c, "query-version")


def test_unknown_enable_capability(daemon):
    r = daemon.raw()
    resp = r.cmd("qmp_capabilities", {"enable": ["bogus"]})
    assert resp["error"]["class"] == "GenericError", resp
    assert "'bogus'" in resp["error"]["desc"], resp
    r.negotiate()
    r.close()


@pytest.mark.parametrize(
    "the_id", ["a1", 7, 0, -3, 1.5, None, True, {"x": [1, {"y": "z"}]}, [1, "two"], ""]
)
def test_id_echoed(daemon, the_id):
    r = daemon.raw()
    # Also before negotiation, in an error.
    resp = r.cmd("query-version", id=the_id)
    assert resp["id"] == the_id and resp["error"]["class"] == "CommandNotFound", resp
    resp = r.cmd("qmp_capabilities", id=the_id)
    assert resp == {"return": {}, "id": the_id}, resp
    resp = r.cmd("query-block-exports", id=the_id)
    assert resp["id"] == the_id and isinstance(resp["return"], list), resp
    resp = r.cmd("no-such-command", id=the_id)
    assert resp["id"] == the_id and resp["error"]["class"] == "CommandNotFound", resp
    resp = r.cmd("blockdev-del", {"node-name": 1}, id=the_id)
    assert resp["id"] == the_id and resp["error"]["class"] == "GenericError", resp
    r.close()


def test_no_id_no_id_member(daemon):
    r = daemon.raw(negotiate=True)
    resp = r.cmd("query-block-exports")
    assert set(resp) == {"return"}, resp
    resp = r.cmd("no-such-command")
    assert set(resp) == {"error"}, resp
    assert resp["error"] == {
        "class": "CommandNotFound",
        "desc": "The command no-such-command has not been found",
    }
    r.close()


# Input QEMU rejects before it looks at the command, and the exact reply (QEMU 7.2 and
# later agree on these texts). The connection must keep working after each.
BAD_INPUT = [
    ("not-object-array", b"[1, 2]", "QMP input must be a JSON object"),
    ("not-object-string", b'"query-version"', "QMP input must be a JSON object"),
    ("not-object-number", b"42", "QMP input must be a JSON object"),
    ("no-execute", b'{"arguments": {}}', "QMP input lacks member 'execute'"),
    ("empty-object", b"{}", "QMP input lacks member 'execute'"),
    ("execute-not-string", b'{"execute": 5}', "QMP input member 'execute' must be a string"),
    (
        "unexpected-member",
        b'{"execute": "query-version", "foo": 1}',
        "QMP input member 'foo' is unexpected",
    ),
    (
        "unexpected-member-control",
        b'{"execute": "query-version", "control": {}}',
        "QMP input member 'control' is unexpected",
    ),
    (
        "arguments-not-object",
        b'{"execute": "query-version", "arguments": []}',
        "QMP input member 'arguments' must be an object",
    ),
    (
        "arguments-string",
        b'{"execute": "query-version", "arguments": "x"}',
        "QMP input member 'arguments' must be an object",
    ),
]


@pytest.mark.parametrize("line,desc", [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT])
@pytest.mark.parametrize("negotiated", [False, True], ids=["before-caps", "after-caps"])
def test_bad_input(daemon, line, desc, negotiated):
    r = daemon.raw(negotiate=negotiated)
    resp = r.request(line)
    assert resp == {"error": {"class": "GenericError", "desc": desc}}, resp
    # The connection still works, in the same negotiation state.
    resp = r.cmd("query-block-exports", id="after")
    if negotiated:
        assert resp["id"] == "after" and [e["id"] for e in resp["return"]] == ["e0"], resp
    else:
        assert resp["error"]["class"] == "CommandNotFound", resp
        r.negotiate()
    r.close()


@pytest.mark.parametrize(
    "line",
    [
        b"garbage",
        b'{"execute": "query-version" "id": 4}',
        b"}",
        b'{"execute": "query-version",, }',
        b'{"execute": "query-version"]',
        b'{"execute": "query-\\x"}',
    ],
    ids=["keyword", "missing-comma", "stray-brace", "double-comma", "bracket", "bad-escape"],
)
def test_malformed_json(daemon, line):
    r = daemon.raw(negotiate=True)
    resp = r.request(line)
    assert set(resp) == {"error"}, resp
    assert resp["error"]["class"] == "GenericError", resp
    assert resp["error"]["desc"].startswith("JSON parse error"), resp
    # Later input is parsed afresh.
    resp = r.cmd("query-version", id="next")
    assert resp["id"] == "next" and "return" in resp, resp
    r.close()


def test_single_quoted_strings(daemon):
    """QEMU's JSON parser takes single-quoted strings too (an extension that humans
    typing into socat rely on)."""
    r = daemon.raw()
    resp = r.request(b"{'execute': 'qmp_capabilities', 'id': 'sq'}")
    assert resp == {"return": {}, "id": "sq"}, resp
    resp = r.request(b"{'execute': 'query-block-exports', 'arguments': {}}")
    assert [e["id"] for e in resp["return"]] == ["e0"], resp
    r.close()


def test_several_commands_in_one_write(daemon):
    r = daemon.raw(negotiate=True)
    r.send(b'{"execute": "query-version", "id": 1}{"execute": "query-block-exports", "id": 2}\n')
    a, b = r.reply(), r.reply()
    assert a["id"] == 1 and "qemu" in a["return"], a
    assert b["id"] == 2 and isinstance(b["return"], list), b
    # One command split over several writes and lines.
    r.send(b'{"execute": "query-')
    r.send(b'version",\n "id": 3}\n')
    c = r.reply()
    assert c["id"] == 3 and "qemu" in c["return"], c
    r.close()


async def test_unknown_command(daemon):
    async with daemon.qmp() as c:
        await error(
            c,
            "x-no-such-command",
            {"a": 1},
            cls="CommandNotFound",
            desc="The command x-no-such-command has not been found",
        )


async def test_query_commands_lists_what_works(daemon, kind):
    expected = {
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "query-named-block-nodes",
        "query-block-exports",
        "query-blockstats",
        "blockdev-add",
        "blockdev-del",
        "block-export-add",
        "block-export-del",
        "object-add",
        "object-del",
        "x-blockdev-set-iothread",
        "block_resize",
        "quit",
    }
    if kind == "vubd":
        expected.add("query-iothreads")
    async with daemon.qmp() as c:
        cmds = await execute(c, "query-commands")
        assert all(set(x) == {"name"} and isinstance(x["name"], str) for x in cmds), cmds
        names = [x["name"] for x in cmds]
        assert len(names) == len(set(names)), f"duplicates in {names}"
        missing = expected - set(names)
        assert not missing, f"query-commands lacks {sorted(missing)}"
        await error(c, "query-commands", {"x": 1}, desc="Parameter 'x' is unexpected")
        if kind == "vubd":
            # Every listed command exists (does not answer CommandNotFound).
            for n in names:
                if n in ("quit", "qmp_capabilities"):
                    continue
                try:
                    await execute(c, n, {"no-such-argument": 1})
                except ExecuteError as e:
                    assert e.error_class != "CommandNotFound", f"{n}: {e}"


@pytest.mark.vubd_only("QEMU's socket chardev serves one monitor client at a time")
async def test_several_clients(daemon):
    clients = [await daemon.connect(name=f"c{i}") for i in range(4)]
    try:
        # All at once.
        results = await asyncio.gather(
            *(execute(c, "query-block-exports") for c in clients),
            *(execute(c, "query-named-block-nodes", {"flat": True}) for c in clients),
        )
        for r in results[:4]:
            assert [e["id"] for e in r] == ["e0"], r
        # A change made through one client is seen by the others.
        await execute(clients[0], "blockdev-add", {"driver": "null-co", "node-name": "shared"})
        for c in clients[1:]:
            assert "shared" in await node_names(c)
        await error(
            clients[1],
            "blockdev-add",
            {"driver": "null-co", "node-name": "shared"},
            contains=["shared"],
        )
        await execute(clients[2], "blockdev-del", {"node-name": "shared"})
        assert "shared" not in await node_names(clients[3])
    finally:
        for c in clients:
            await c.disconnect()
    daemon.check_alive()


@pytest.mark.vubd_only("QEMU's socket chardev serves one monitor client at a time")
async def test_events_go_to_every_negotiated_client(daemon, tmp):
    a = await daemon.connect(name="a")
    b = await daemon.connect(name="b")
    raw_unnegotiated = daemon.raw(negotiate=False)
    try:
        with a.listener() as la, b.listener() as lb:
            await execute(a, "blockdev-add", {"driver": "null-co", "node-name": "ev"})
            await execute(a, "block-export-add", export_opts("ev0", "ev", daemon.sock("ev0")))
            await execute(a, "block-export-del", {"id": "ev0"})
            for lst in (la, lb):
                ev = await wait_event(lst, "BLOCK_EXPORT_DELETED")
                assert ev["data"] == {"id": "ev0"}, ev
                check_timestamp(ev)
        # A client that has not negotiated gets no events: the next thing it reads is
        # the reply to its own command.
        resp = raw_unnegotiated.cmd("qmp_capabilities", id="late")
        assert resp == {"return": {}, "id": "late"}, resp
        assert raw_unnegotiated.events == [], raw_unnegotiated.events
    finally:
        raw_unnegotiated.close()
        await a.disconnect()
        await b.disconnect()


async def test_client_disconnects_before_reply(daemon, tmp):
    """Clients that send commands and go away at once, without reading the replies. QEMU
    may drop commands still queued when a client goes, but whatever did run must have
    run completely: the daemon keeps serving, and every node or export that exists
    works and can be removed."""
    img = tmp / "gone.img"
    img.write_bytes(b"\0" * (1 << 20))
    for i in range(5):
        r = daemon.raw(negotiate=True)
        lines = [
            {
                "execute": "blockdev-add",
                "arguments": {"driver": "file", "node-name": f"gone{i}", "filename": str(img)},
            },
            {"execute": "block-export-add", "arguments": export_opts(f"g{i}", f"gone{i}", daemon.sock(f"g{i}"))},
            {"execute": "query-named-block-nodes"},
        ]
        r.send(b"".join(json.dumps(m).encode() + b"\n" for m in lines))
        r.sock.shutdown(socket.SHUT_RDWR)
        r.close()
    async with daemon.qmp() as c:
        # Let whatever is still running finish (commands run one at a time, in order,
        # so a query answered now comes after them).
        await asyncio.sleep(0.2)
        nodes = await node_names(c)
        exports = await export_ids(c)
        for i in range(5):
            if f"g{i}" in exports:
                assert f"gone{i}" in nodes
                await execute(c, "block-export-del", {"id": f"g{i}"})
        for i in range(5):
            if f"gone{i}" in nodes:
                # The export's removal may still be in progress: retry briefly.
                for _ in range(100):
                    try:
                        await execute(c, "blockdev-del", {"node-name": f"gone{i}"})
                        break
                    except ExecuteError:
                        await asyncio.sleep(0.05)
                else:
                    await execute(c, "blockdev-del", {"node-name": f"gone{i}"})
        assert await export_ids(c) == {"e0"}
    daemon.check_alive()


@pytest.mark.vubd_only("QEMU's socket chardev serves one monitor client at a time")
async def test_client_disconnects_during_export_del(daemon, tmp):
    """Disconnect while block-export-del runs; another client sees the event."""
    async with daemon.qmp(name="watcher") as w:
        with w.listener() as lw:
            await execute(w, "blockdev-add", {"driver": "null-co", "node-name": "ev"})
            await execute(w, "block-export-add", export_opts("ev0", "ev", daemon.sock("ev0")))
            r = daemon.raw(negotiate=True)
            r.send(b'{"execute": "block-export-del", "arguments": {"id": "ev0"}}\n')
            r.close()
            ev = await wait_event(lw, "BLOCK_EXPORT_DELETED")
            assert ev["data"] == {"id": "ev0"}
        assert await export_ids(w) == {"e0"}
    daemon.check_alive()


def test_client_closes_mid_message(daemon):
    r = daemon.raw(negotiate=True)
    r.send(b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-na')
    r.close()
    r = daemon.raw(negotiate=True)
    resp = r.cmd("query-named-block-nodes", {"flat": True})
    assert all(not n["node-name"].startswith("null") for n in resp["return"]), resp
    r.close()
    daemon.check_alive()


async def test_many_sequential_connections(daemon):
    for i in range(20):
        async with daemon.qmp(name=f"s{i}") as c:
            assert await export_ids(c) == {"e0"}
    daemon.check_alive()


async def test_reply_order_and_ids_with_pipelined_commands(daemon):
    """qemu.qmp pipelines when commands are issued concurrently; every reply must reach
    the right caller (matched by id)."""
    async with daemon.qmp() as c:
        tasks = []
        for i in range(30):
            if i % 3 == 0:
                tasks.append(execute(c, "query-version"))
            elif i % 3 == 1:
                tasks.append(execute(c, "query-block-exports"))
            else:
                tasks.append(error(c, "blockdev-del", {"node-name": f"none{i}"}, contains=[f"none{i}"]))
        res = await asyncio.gather(*tasks)
        for i, r in enumerate(res):
            if i % 3 == 0:
                assert "qemu" in r
            elif i % 3 == 1:
                assert [e["id"] for e in r] == ["e0"]

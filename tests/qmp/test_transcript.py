"""The same QMP session against vubd and qemu-storage-daemon, compared by structure.

Values that legitimately differ (versions, file names, sizes, thread ids, timestamps)
are ignored: what is compared is, for each reply, whether it is a return or an error,
the error class, the presence of ``id``, and the members and JSON types of the return
value (recursively; list elements merged). Events likewise.
"""

import json
import time

import pytest

from conftest import MIB, RawQmp, make_image, shape, shape_diff, standard_args, vubd_bin

EVENT = object()

#: Members vubd adds on purpose (documented in docs/qmp.md), by step label prefix.
DOCUMENTED_VUBD_EXTRAS = {
    # "query-block-exports has iostatus (a vubd extension) when the export's policies
    # can stop it"
    "query-block-exports": ["return[].iostatus: only in vubd"],
}


def steps(d):
    img = make_image(d.dir / f"{d.name}-t.img", 8 * MIB)
    sock = str(d.sock("t0"))
    ex = lambda cmd, args=None, **kw: dict(  # noqa: E731
        {"execute": cmd}, **({"arguments": args} if args is not None else {}), **kw
    )
    return [
        ("before caps: query-version", ex("query-version", id=1)),
        ("before caps: bad arguments", ex("qmp_capabilities", {"x": 1})),
        ("before caps: bad enable type", ex("qmp_capabilities", {"enable": "oob"})),
        ("qmp_capabilities", ex("qmp_capabilities", id="caps")),
        ("qmp_capabilities again", ex("qmp_capabilities")),
        ("qmp_capabilities again, enable", ex("qmp_capabilities", {"enable": ["oob"]}, id=2)),
        ("unknown command", ex("x-no-such-command", id=[1])),
        ("query-version", ex("query-version")),
        ("query-block-exports", ex("query-block-exports")),
        ("query-named-block-nodes flat", ex("query-named-block-nodes", {"flat": True})),
        ("blockdev-add file", ex("blockdev-add", {"driver": "file", "node-name": "tf", "filename": str(img)})),
        ("blockdev-add raw", ex("blockdev-add", {"driver": "raw", "node-name": "t", "file": "tf"})),
        ("blockdev-add null-co", ex("blockdev-add", {"driver": "null-co", "node-name": "nul", "size": MIB})),
        ("blockdev-add: no driver", ex("blockdev-add", {"node-name": "x"})),
        ("blockdev-add: duplicate", ex("blockdev-add", {"driver": "null-co", "node-name": "t"})),
        ("blockdev-add: unknown driver", ex("blockdev-add", {"driver": "bogus", "node-name": "x"})),
        ("blockdev-add: ill-typed", ex("blockdev-add", {"driver": "null-co", "node-name": "x", "size": "1"})),
        ("blockdev-add: unexpected", ex("blockdev-add", {"driver": "null-co", "node-name": "x", "y": 1})),
        ("blockdev-add: no node-name", ex("blockdev-add", {"driver": "null-co"})),
        ("blockdev-add: unknown child", ex("blockdev-add", {"driver": "raw", "node-name": "x", "file": "nosuch"})),
        (
            "blockdev-add: missing file",
            ex("blockdev-add", {"driver": "file", "node-name": "x", "filename": str(d.dir / "none" / "x")}),
        ),
        ("query-named-block-nodes flat, after adds", ex("query-named-block-nodes", {"flat": True})),
        (
            "block-export-add",
            ex(
                "block-export-add",
                {
                    "type": "vhost-user-blk",
                    "id": "t0",
                    "node-name": "t",
                    "writable": True,
                    "addr": {"type": "unix", "path": sock},
                },
                id="add",
            ),
        ),
        (
            "block-export-add: duplicate id",
            ex(
                "block-export-add",
                {"type": "vhost-user-blk", "id": "t0", "node-name": "nul", "addr": {"type": "unix", "path": sock + "2"}},
            ),
        ),
        (
            "block-export-add: unknown node",
            ex(
                "block-export-add",
                {"type": "vhost-user-blk", "id": "t1", "node-name": "nosuch", "addr": {"type": "unix", "path": sock + "3"}},
            ),
        ),
        ("block-export-add: missing addr", ex("block-export-add", {"type": "vhost-user-blk", "id": "t1", "node-name": "nul"})),
        ("query-block-exports, after add", ex("query-block-exports")),
        ("blockdev-del: exported", ex("blockdev-del", {"node-name": "t"})),
        ("blockdev-del: child", ex("blockdev-del", {"node-name": "tf"})),
        ("block-export-del", ex("block-export-del", {"id": "t0"}, id="del")),
        ("BLOCK_EXPORT_DELETED", EVENT),
        ("block-export-del: gone", ex("block-export-del", {"id": "t0"})),
        ("block-export-del: bad mode", ex("block-export-del", {"id": "e0", "mode": "soft"})),
        ("query-block-exports, after del", ex("query-block-exports")),
        ("blockdev-del", ex("blockdev-del", {"node-name": "t"})),
        ("blockdev-del child", ex("blockdev-del", {"node-name": "tf"})),
        ("blockdev-del: unknown", ex("blockdev-del", {"node-name": "t"})),
        ("query-named-block-nodes flat, at the end", ex("query-named-block-nodes", {"flat": True})),
    ]


def normalise(msg: dict):
    if "error" in msg:
        out = {"error": {"class": msg["error"]["class"], "desc": shape(msg["error"]["desc"])}}
        out.update({k: shape(v) for k, v in msg.items() if k != "error"})
        return out
    return shape(msg)


def transcript(d) -> list:
    r = RawQmp(d.monitor)
    out = [("greeting", shape(r.greeting))]
    try:
        for label, msg in steps(d):
            if msg is EVENT:
                deadline = time.monotonic() + 20
                while not r.events and time.monotonic() < deadline:
                    m = r.recv()
                    assert "event" in m, f"{d.kind}: unexpected message {m}"
                    r.events.append(m)
                assert r.events, f"{d.kind}: no event"
                out.append((label, shape(r.events.pop(0))))
                continue
            resp = r.request(json.dumps(msg))
            out.append((label, normalise(resp)))
    finally:
        r.close()
    return out


@pytest.mark.needs_qsd
def test_transcript_matches_qsd(start_daemon, tmp):
    if not vubd_bin().is_file():
        pytest.skip(f"{vubd_bin()} not built")
    v = start_daemon(standard_args(tmp, name="v"), kind="vubd", name="v")
    q = start_daemon(standard_args(tmp, name="q"), kind="qsd", name="q")
    tv, tq = transcript(v), transcript(q)
    assert len(tv) == len(tq) == len(steps(v)) + 1
    problems = []
    for (label, a), (_, b) in zip(tv, tq):
        for line in shape_diff(a, b):
            allowed = [
                x
                for prefix, xs in DOCUMENTED_VUBD_EXTRAS.items()
                if label.startswith(prefix)
                for x in xs
            ]
            if any(line.startswith(x) for x in allowed):
                continue
            problems.append(f"{label}: {line}")
    assert not problems, "vubd's replies differ in structure from qemu-storage-daemon's:\n" + "\n".join(
        problems
    )

"""``transaction``: actions that take effect together or not at all (bitmap actions,
external and internal snapshots, abort), and the snapshot commands that QEMU runs as a
transaction of one. Writes go through a vhost-user-blk export (vubd-io, a libblkio
frontend) around the transactions; the images are checked with qemu-img afterwards.
Every expectation, texts included, is qemu-storage-daemon 7.2's (the tests pass with
``--daemon=qsd``)."""

import json

from chains import qemu_img
from conftest import MIB, error, execute, export_args, io_ok

SIZE = 64 * MIB
ABORTED = "Transaction aborted using Abort action"


def qcow2_args(tmp, node: str, backing_null: bool = False) -> list[str]:
    img = tmp / f"{node}.qcow2"
    if not img.exists():
        qemu_img("create", "-q", "-f", "qcow2", img, SIZE)
    q = {"driver": "qcow2", "node-name": node, "file": f"{node}-file"}
    if backing_null:
        q["backing"] = None
    return [
        "--blockdev",
        f"file,node-name={node}-file,filename={img}",
        "--blockdev",
        json.dumps(q),
    ]


def act(kind: str, **data) -> dict:
    return {"type": kind, "data": data}


async def nodes(c) -> dict:
    return {n["node-name"]: n for n in await execute(c, "query-named-block-nodes")}


async def bitmap_state(c, node: str) -> dict:
    n = (await nodes(c))[node]
    return {b["name"]: (b["count"], b["recording"], b["busy"]) for b in n.get("dirty-bitmaps", [])}


def snapshot_names(img) -> list[str]:
    info = json.loads(qemu_img("info", "-U", "--output=json", img))
    return [s["name"] for s in info.get("snapshots", [])]


async def test_argument_errors(start_daemon, tmp):
    d = start_daemon(qcow2_args(tmp, "a"))
    async with d.qmp() as c:
        cases = [
            ({}, "Parameter 'actions' is missing"),
            ({"actions": {}}, "Invalid parameter type for 'actions', expected: array"),
            ({"actions": [1]}, "Invalid parameter type for 'actions[0]', expected: object"),
            ({"actions": [{"data": {}}]}, "Parameter 'actions[0].type' is missing"),
            ({"actions": [{"type": "abort"}]}, "Parameter 'actions[0].data' is missing"),
            ({"actions": [{"type": "bogus", "data": {}}]}, "Parameter 'type' does not accept value 'bogus'"),
            ({"actions": [act("abort", x=1)]}, "Parameter 'actions[0].data.x' is unexpected"),
            (
                {"actions": [act("abort"), act("block-dirty-bitmap-add", node="a")]},
                "Parameter 'actions[1].data.name' is missing",
            ),
            (
                {"actions": [act("block-dirty-bitmap-merge", node="a", target="b", bitmaps=[{"node": "a"}])]},
                "Parameter 'actions[0].data.bitmaps[0].name' is missing",
            ),
            (
                {"actions": [act("abort")], "properties": {"completion-mode": "bad"}},
                "Parameter 'completion-mode' does not accept value 'bad'",
            ),
            (
                {"actions": [act("block-dirty-bitmap-add", node="a", name="b")], "properties": {"completion-mode": "grouped"}},
                "Action 'block-dirty-bitmap-add' does not support Transaction property completion-mode = grouped",
            ),
            ({"actions": [act("block-dirty-bitmap-add", node="a", name="b")], "x": 1}, "Parameter 'x' is unexpected"),
        ]
        for args, desc in cases:
            await error(c, "transaction", args, desc=desc)
        # An argument error anywhere means no action ran.
        assert await bitmap_state(c, "a") == {}
        assert await execute(c, "transaction", {"actions": []}) == {}


async def test_bitmap_actions_all_or_nothing(start_daemon, tmp):
    sock = tmp / "e.sock"
    d = start_daemon(qcow2_args(tmp, "a") + export_args("e", "a", sock))
    async with d.qmp() as c:
        await execute(c, "block-dirty-bitmap-add", {"node": "a", "name": "keep"})
        io_ok("write", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 1)
        before = await bitmap_state(c, "a")
        assert before == {"keep": (MIB, True, False)}
        # Every kind of bitmap action, then abort: nothing changed.
        await error(
            c,
            "transaction",
            {
                "actions": [
                    act("block-dirty-bitmap-add", node="a", name="new"),
                    act("block-dirty-bitmap-clear", node="a", name="keep"),
                    act("block-dirty-bitmap-disable", node="a", name="keep"),
                    act("block-dirty-bitmap-add", node="a", name="other", disabled=True),
                    act("block-dirty-bitmap-enable", node="a", name="other"),
                    act("block-dirty-bitmap-merge", node="a", target="other", bitmaps=["keep"]),
                    act("abort"),
                ]
            },
            desc=ABORTED,
        )
        assert await bitmap_state(c, "a") == before
        # A failing action in the middle undoes those before it, whatever they were.
        await error(
            c,
            "transaction",
            {
                "actions": [
                    act("block-dirty-bitmap-add", node="a", name="new"),
                    act("block-dirty-bitmap-clear", node="a", name="keep"),
                    act("block-dirty-bitmap-add", node="a", name="new"),
                ]
            },
            desc="Bitmap already exists: new",
        )
        assert await bitmap_state(c, "a") == before
        # Removed in the transaction: later actions cannot use it, and it is back after.
        for second in ("block-dirty-bitmap-remove", "block-dirty-bitmap-clear"):
            await error(
                c,
                "transaction",
                {"actions": [act("block-dirty-bitmap-remove", node="a", name="keep"), act(second, node="a", name="keep")]},
                desc="Bitmap 'keep' is currently in use by another operation and cannot be used",
            )
            assert await bitmap_state(c, "a") == before
        # The same actions without the abort all take effect.
        await execute(
            c,
            "transaction",
            {
                "actions": [
                    act("block-dirty-bitmap-add", node="a", name="new"),
                    act("block-dirty-bitmap-add", node="a", name="copy", disabled=True),
                    act("block-dirty-bitmap-merge", node="a", target="copy", bitmaps=["keep"]),
                    act("block-dirty-bitmap-clear", node="a", name="keep"),
                    act("block-dirty-bitmap-disable", node="a", name="keep"),
                ]
            },
        )
        io_ok("write", "--socket", sock, "--offset", 8 * MIB, "--len", MIB, "--seed", 2)
        assert await bitmap_state(c, "a") == {
            "keep": (0, False, False),
            "new": (MIB, True, False),
            "copy": (MIB, False, False),
        }
        await execute(c, "transaction", {"actions": [act("block-dirty-bitmap-remove", node="a", name="copy")]})
        assert "copy" not in await bitmap_state(c, "a")


async def test_snapshot_actions_undone_on_abort(start_daemon, tmp):
    sock = tmp / "e.sock"
    d = start_daemon(qcow2_args(tmp, "a") + qcow2_args(tmp, "ov", backing_null=True) + export_args("e", "a", sock))
    overlay_file = tmp / "s.qcow2"
    async with d.qmp() as c:
        io_ok("write", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 1)
        for actions in (
            [act("blockdev-snapshot", node="a", overlay="ov"), act("abort")],
            [
                act("blockdev-snapshot-sync", **{"node-name": "a", "snapshot-file": str(overlay_file), "snapshot-node-name": "s"}),
                act("abort"),
            ],
            [act("blockdev-snapshot-internal-sync", device="a", name="snap"), act("abort")],
        ):
            await error(c, "transaction", {"actions": actions}, desc=ABORTED)
            n = await nodes(c)
            assert "s" not in n, n.keys()
            assert n["a"]["ro"] is False and n["ov"]["backing_file_depth"] == 0, n["a"]
            assert "snapshots" not in n["a"]["image"] or n["a"]["image"]["snapshots"] == []
        # The export still writes to the old top.
        io_ok("write", "--socket", sock, "--offset", MIB, "--len", MIB, "--seed", 2)
        # Both snapshots at once, the same chain afterwards.
        await execute(
            c,
            "transaction",
            {
                "actions": [
                    act("blockdev-snapshot-internal-sync", device="a", name="snap"),
                    act("block-dirty-bitmap-add", node="a", name="b"),
                    act("blockdev-snapshot", node="a", overlay="ov"),
                ]
            },
        )
        io_ok("write", "--socket", sock, "--offset", 2 * MIB, "--len", MIB, "--seed", 3)
        n = await nodes(c)
        assert n["ov"]["backing_file_depth"] == 1 and n["a"]["ro"] is True, n["ov"]
        # The bitmap on the old top saw none of the writes that went to the overlay.
        assert await bitmap_state(c, "a") == {"b": (0, True, False)}
        await error(
            c,
            "transaction",
            {"actions": [act("blockdev-snapshot", node="a", overlay="ov")]},
            desc="Node 'a' is busy: node is used as backing hd of 'ov'",
        )
    d.expect_exit = True
    assert d.stop() is None
    assert snapshot_names(tmp / "a.qcow2") == ["snap"]
    # Old top: the first two writes; overlay: the third.
    a_map = json.loads(qemu_img("map", "--output=json", tmp / "a.qcow2"))
    assert [(e["start"], e["length"]) for e in a_map if e["data"]] == [(0, 2 * MIB)], a_map
    ov_map = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", tmp / "ov.qcow2"))
    assert [(e["start"], e["length"]) for e in ov_map if e["data"]] == [(2 * MIB, MIB)], ov_map
    for img in ("a.qcow2", "ov.qcow2"):
        out = json.loads(qemu_img("check", "--output=json", tmp / img))
        assert out.get("corruptions", 0) == 0 and out.get("leaks", 0) == 0, out


async def test_single_snapshot_commands_are_transactions(start_daemon, tmp):
    d = start_daemon(qcow2_args(tmp, "a"))
    async with d.qmp() as c:
        # Their argument errors name the members alone, as QEMU's commands do.
        await error(c, "blockdev-snapshot", {"node": "a"}, desc="Parameter 'overlay' is missing")
        await error(c, "blockdev-snapshot-internal-sync", {"device": "a", "name": "x", "y": 1}, desc="Parameter 'y' is unexpected")
        await execute(c, "blockdev-snapshot-internal-sync", {"device": "a", "name": "x"})
        await error(
            c,
            "transaction",
            {"actions": [act("blockdev-snapshot-internal-sync", device="a", name="x")]},
            desc="Snapshot with name 'x' already exists on device 'a'",
        )


def raw_args(tmp, node: str, size: int = 4 * MIB) -> list[str]:
    img = tmp / f"{node}.raw"
    with open(img, "wb") as f:
        f.truncate(size)
    return ["--blockdev", f"file,node-name={node},filename={img}"]


async def wait_jobs_gone(c, timeout: float = 30):
    import asyncio
    for _ in range(int(timeout * 20)):
        if await execute(c, "query-jobs") == []:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(await execute(c, "query-jobs"))


async def test_bitmap_and_full_backup_start_together(start_daemon, tmp):
    """The usual start of incremental backups: a new bitmap and a full backup in one
    transaction, so that the bitmap records exactly what the backup does not hold."""
    sock = tmp / "e.sock"
    d = start_daemon(raw_args(tmp, "src") + raw_args(tmp, "full") + raw_args(tmp, "inc") + export_args("e", "src", sock))
    io_ok("write", "--socket", sock, "--offset", 0, "--len", 2 * MIB, "--seed", 1)
    async with d.qmp() as c:
        # Undone: no bitmap, no job, no filter left above the source.
        await error(
            c,
            "transaction",
            {
                "actions": [
                    act("block-dirty-bitmap-add", node="src", name="b"),
                    act("blockdev-backup", **{"job-id": "j0", "device": "src", "target": "full", "sync": "full"}),
                    act("abort"),
                ]
            },
            desc=ABORTED,
        )
        await wait_jobs_gone(c)
        n = await nodes(c)
        assert "dirty-bitmaps" not in n["src"] or n["src"]["dirty-bitmaps"] == [], n["src"]
        assert [m for m in n.values() if m["drv"] == "copy-before-write"] == [], n.keys()
        io_ok("verify", "--socket", sock, "--offset", 0, "--len", 2 * MIB, "--seed", 1)
        # Done: the full backup holds the disk as it was; the bitmap, the writes after.
        await execute(
            c,
            "transaction",
            {
                "actions": [
                    act("block-dirty-bitmap-add", node="src", name="b"),
                    act("blockdev-backup", **{"job-id": "j1", "device": "src", "target": "full", "sync": "full"}),
                ]
            },
        )
        await wait_jobs_gone(c)
        io_ok("write", "--socket", sock, "--offset", 3 * MIB, "--len", 64 * 1024, "--seed", 2)
        assert (await bitmap_state(c, "src"))["b"][0] == 64 * 1024
        await execute(
            c,
            "transaction",
            {
                "actions": [
                    act(
                        "blockdev-backup",
                        **{"job-id": "j2", "device": "src", "target": "inc", "sync": "incremental", "bitmap": "b"},
                    )
                ]
            },
        )
        await wait_jobs_gone(c)
        assert (await bitmap_state(c, "src"))["b"][0] == 0
    d.expect_exit = True
    assert d.stop() is None
    src = (tmp / "src.raw").read_bytes()
    full = (tmp / "full.raw").read_bytes()
    inc = (tmp / "inc.raw").read_bytes()
    # The full backup: the first write only.
    assert full[: 2 * MIB] == src[: 2 * MIB] and full[2 * MIB :] == bytes(2 * MIB)
    # The incremental: the one region written after, nothing else.
    assert inc[3 * MIB : 3 * MIB + 64 * 1024] == src[3 * MIB : 3 * MIB + 64 * 1024]
    assert inc[: 3 * MIB] == bytes(3 * MIB) and inc[3 * MIB + 64 * 1024 :] == bytes(MIB - 64 * 1024)


def backup_pair_args(tmp, failing_target: bool) -> list[str]:
    """Sources s1, s2 (raw, 4 MiB of data) and targets t1, t2; with
    ``failing_target`` t2's first data write fails (blkdebug)."""
    from chains import pattern, write_raw

    args = []
    for n in ("s1", "s2", "t1", "t2"):
        img = tmp / f"{n}.img"
        with open(img, "wb") as f:
            f.truncate(4 * MIB)
        if n.startswith("s"):
            write_raw(img, pattern(1 if n == "s1" else 2, 0, 4 * MIB))
        args += ["--blockdev", f"file,node-name={n}-file,filename={img}"]
        if n == "t2" and failing_target:
            args += ["--blockdev", json.dumps({
                "driver": "blkdebug", "node-name": "t2-dbg", "image": "t2-file",
                "inject-error": [{"event": "write_aio", "errno": 5, "once": True}]})]
            args += ["--blockdev", "raw,node-name=t2,file=t2-dbg"]
        else:
            args += ["--blockdev", f"raw,node-name={n},file={n}-file"]
    return args


GROUPED = {"completion-mode": "grouped"}


def two_backups(**extra) -> list[dict]:
    return [
        act("blockdev-backup", **{"job-id": f"j{i}", "device": f"s{i}", "target": f"t{i}", "sync": "full", **extra})
        for i in (1, 2)
    ]


async def test_grouped_backups_complete_together(start_daemon, tmp):
    from chains import JobEvents

    d = start_daemon(backup_pair_args(tmp, failing_target=False))
    async with d.qmp() as c:
        ev = JobEvents(c)
        await error(
            c,
            "transaction",
            {"actions": [act("block-dirty-bitmap-add", node="s1", name="b")] + two_backups(), "properties": GROUPED},
            desc="Action 'block-dirty-bitmap-add' does not support Transaction property completion-mode = grouped",
        )
        await execute(c, "transaction", {"actions": two_backups(), "properties": GROUPED})
        for j in ("j1", "j2"):
            trace = await ev.until(j, "null")
            assert trace[-4:] == ["pending", "BLOCK_JOB_COMPLETED", "concluded", "null"], (j, trace)
            assert "waiting" in trace, trace
            assert "error" not in ev.data["BLOCK_JOB_COMPLETED"], ev.data
        # Neither went on to pending before both had done their work.
        labels = [(e["data"]["id"], e["data"]["status"]) for e in ev.all if e["event"] == "JOB_STATUS_CHANGE"]
        first_pending = labels.index(next(x for x in labels if x[1] == "pending"))
        assert {("j1", "waiting"), ("j2", "waiting")} <= set(labels[:first_pending]), labels
    d.expect_exit = True
    assert d.stop() is None
    for i in (1, 2):
        assert (tmp / f"s{i}.img").read_bytes() == (tmp / f"t{i}.img").read_bytes()


async def test_grouped_backup_failure_cancels_the_other(start_daemon, tmp):
    from chains import JobEvents

    d = start_daemon(backup_pair_args(tmp, failing_target=True))
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "transaction", {"actions": two_backups(), "properties": GROUPED})
        t2 = await ev.until("j2", "null")
        assert "BLOCK_JOB_COMPLETED" in t2 and "pending" not in t2, t2
        assert ev.data["BLOCK_JOB_COMPLETED"]["error"] == "Input/output error", ev.data
        t1 = await ev.until("j1", "null")
        assert "BLOCK_JOB_CANCELLED" in t1 and "pending" not in t1, t1
        # The once-rule is spent: the same two backups, individually, both complete.
        ev2 = JobEvents(c)
        await execute(c, "transaction", {"actions": two_backups(**{"on-target-error": "report"})})
        t1 = await ev2.until("j1", "null")
        assert "BLOCK_JOB_COMPLETED" in t1 and "error" not in ev2.data["BLOCK_JOB_COMPLETED"], t1
        await ev2.until("j2", "null")


async def test_backup_undone_by_a_later_action_copies_nothing(start_daemon, tmp):
    """A backup action whose transaction fails in a later action copies nothing to its
    target (QEMU starts the job only when the transaction commits): the target holds no
    data afterwards, per qemu-img map, and no job is left."""
    src, tgt = tmp / "src.qcow2", tmp / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, 4 * MIB)
    qemu_img("create", "-q", "-f", "qcow2", tgt, 4 * MIB)
    from chains import run
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 3 0 {4 * MIB}", src)
    d = start_daemon(qcow2_args(tmp, "src") + qcow2_args(tmp, "tgt"))
    async with d.qmp() as c:
        await error(c, "transaction", {"actions": [
            act("blockdev-backup", device="src", target="tgt", sync="full", **{"job-id": "b"}),
            act("abort"),
        ]}, desc=ABORTED)
        await wait_jobs_gone(c)
        assert "#" not in "".join(await nodes(c)), await nodes(c)
    d.expect_exit = True
    assert d.stop() is None
    m = json.loads(qemu_img("map", "-U", "--output=json", tgt))
    assert not any(e["data"] for e in m), m

"""The job framework over QMP, with block-stream (and blockdev-create) as the jobs: the
JobStatus state machine as JOB_STATUS_CHANGE events, the BLOCK_JOB_* events and their
data, query-jobs and query-block-jobs, the job-* and block-job-* verbs (pause, resume,
cancel, set-speed, finalize, dismiss) in the states that accept them and the errors in
those that do not, auto-finalize/auto-dismiss, speed, on-error policies, and job id
checks. Every expectation is qemu-storage-daemon 7.2's (the tests pass with
``--daemon=qsd``).

Jobs that must stay running are started with ``speed=1`` (1 byte/s): QEMU copies one
chunk, then its rate limiter sleeps for ages, so the job sits in ``running`` until the
test pauses, cancels or speeds it up."""

import json

import pytest

from chains import (
    BLOCK_JOB_INFO_KEYS,
    JOB_INFO_KEYS,
    KIB,
    JobEvents,
    backing_of,
    block_job,
    chain_args,
    check_clean,
    compare,
    expected_disk,
    job,
    make_chain,
    nodes_by_name,
    verb_error,
    write_raw,
)
from conftest import MIB, error, execute, export_args, io_ok

SIZE = 4 * MIB
LAYERS = [
    ("base", [(0, SIZE, 1)]),
    ("top", [(MIB, 64 * KIB, 2)]),
]


def setup(start_daemon, tmp, extra_args=(), base_extra=None):
    """base <- top, both filled; export e0 of top."""
    make_chain(tmp, LAYERS, SIZE)
    args = chain_args(tmp, ["base", "top"], extra=base_extra)
    d = start_daemon(args + export_args("e0", "top", tmp / "d-e0.sock") + list(extra_args))
    return d


def check_disk_intact(tmp):
    """The chain still reads as it was written (nothing lost by a job that stopped)."""
    ref = write_raw(tmp / "ref.raw", expected_disk(LAYERS, SIZE))
    compare(ref, tmp / "top.qcow2")


async def start_slow_stream(c, ev, jid="s", **extra):
    args = {"job-id": jid, "device": "top", "speed": 1, **extra}
    assert await execute(c, "block-stream", args) == {}
    assert await ev.until(jid, "running") == ["created", "running"]


async def test_stream_runs_to_completion(start_daemon, tmp):
    d = setup(start_daemon, tmp)
    async with d.qmp() as c:
        ev = JobEvents(c)
        assert await execute(c, "block-stream", {"job-id": "s", "device": "top"}) == {}
        trace = await ev.until("s", "null")
        assert trace == [
            "created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null",
        ]
        assert ev.data["BLOCK_JOB_COMPLETED"] == {
            "device": "s", "len": SIZE, "offset": SIZE, "speed": 0, "type": "stream",
        }
        assert await execute(c, "query-jobs") == []
        assert await execute(c, "query-block-jobs") == []
        # The job id is free again, and the node is no longer busy.
        assert "backing_file" not in (await nodes_by_name(c))["top"]
        io_ok("verify", "--socket", tmp / "d-e0.sock", "--offset", MIB, "--len", 64 * KIB, "--seed", 2)
        io_ok("verify", "--socket", tmp / "d-e0.sock", "--offset", 0, "--len", MIB, "--seed", 1)
    d.expect_exit = True
    assert d.stop() is None
    assert backing_of(tmp / "top.qcow2") is None
    check_clean(tmp / "top.qcow2")


async def test_running_job_queries_and_set_speed(start_daemon, tmp):
    d = setup(start_daemon, tmp)
    async with d.qmp() as c:
        ev = JobEvents(c)
        await start_slow_stream(c, ev)
        j = await job(c, "s")
        assert set(j) == JOB_INFO_KEYS, j
        assert (j["id"], j["type"], j["status"], j["total-progress"]) == ("s", "stream", "running", SIZE), j
        assert 0 <= j["current-progress"] < SIZE, j
        b = await block_job(c, "s")
        assert set(b) == BLOCK_JOB_INFO_KEYS, b
        want = {
            "device": "s", "type": "stream", "status": "running", "len": SIZE, "speed": 1,
            "paused": False, "ready": False, "io-status": "ok", "auto-finalize": True,
            "auto-dismiss": True,
        }
        assert {k: b[k] for k in want} == want, b
        # (busy: true while the first chunk is copied, false once the rate limiter
        # sleeps; either may be seen here.)
        assert isinstance(b["busy"], bool), b
        # The same progress as query-jobs (which may see the first chunk land).
        j2 = await job(c, "s")
        assert j["current-progress"] <= b["offset"] <= j2["current-progress"] < SIZE, (j, b, j2)
        # Only the one job exists.
        assert len(await execute(c, "query-jobs")) == 1
        assert await execute(c, "block-job-set-speed", {"device": "s", "speed": 2}) == {}
        assert (await block_job(c, "s"))["speed"] == 2
        # Wrong speeds and wrong jobs leave the job alone.
        await error(c, "block-job-set-speed", {"device": "s", "speed": -1},
                    desc="Parameter 'speed' expects a non-negative value")
        await error(c, "block-job-set-speed", {"device": "nosuch", "speed": 1},
                    cls="DeviceNotActive", desc="Block job 'nosuch' not found")
        await error(c, "block-job-set-speed", {"device": "s"}, desc="Parameter 'speed' is missing")
        await error(c, "block-job-set-speed", {"device": "s", "speed": "9"},
                    desc="Invalid parameter type for 'speed', expected: integer")
        assert (await block_job(c, "s"))["speed"] == 2
        # Unlimited: the job runs to the end at once.
        assert await execute(c, "block-job-set-speed", {"device": "s", "speed": 0}) == {}
        assert await ev.until("s", "null") == [
            "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null",
        ]
        assert ev.data["BLOCK_JOB_COMPLETED"] == {
            "device": "s", "len": SIZE, "offset": SIZE, "speed": 0, "type": "stream",
        }
        # The export served the whole time, and still does.
        io_ok("verify", "--socket", tmp / "d-e0.sock", "--offset", MIB, "--len", 64 * KIB, "--seed", 2)
    d.expect_exit = True
    assert d.stop() is None
    assert backing_of(tmp / "top.qcow2") is None
    compare(write_raw(tmp / "ref.raw", expected_disk(LAYERS, SIZE)), tmp / "top.qcow2")
    check_clean(tmp / "top.qcow2")


@pytest.mark.parametrize("family", ["job", "block-job"])
async def test_pause_resume_and_verbs(start_daemon, tmp, family):
    """Pause and resume with job-* (id) or block-job-* (device); the verbs a running
    and a paused job refuse; then cancel."""
    d = setup(start_daemon, tmp)
    key = "id" if family == "job" else "device"
    async with d.qmp() as c:
        ev = JobEvents(c)
        await start_slow_stream(c, ev)
        for verb in ("complete", "finalize", "dismiss"):
            await error(c, f"job-{verb}", {"id": "s"}, desc=verb_error("s", "running", verb))
        await error(c, "block-job-complete", {"device": "s"}, desc=verb_error("s", "running", "complete"))
        await error(c, "block-job-finalize", {"id": "s"}, desc=verb_error("s", "running", "finalize"))
        await error(c, "block-job-dismiss", {"id": "s"}, desc=verb_error("s", "running", "dismiss"))
        await error(c, f"{family}-resume", {key: "s"}, desc="Can't resume a job that was not paused")

        assert await execute(c, f"{family}-pause", {key: "s"}) == {}
        assert await ev.until("s", "paused") == ["paused"]
        j, b = await job(c, "s"), await block_job(c, "s")
        assert j["status"] == "paused" and b["status"] == "paused", (j, b)
        assert b["paused"] is True and b["busy"] is False and b["ready"] is False, b
        assert set(j) == JOB_INFO_KEYS and set(b) == BLOCK_JOB_INFO_KEYS, (j, b)
        await error(c, "job-pause", {"id": "s"}, desc="Job is already paused")
        await error(c, "block-job-pause", {"device": "s"}, desc="Job is already paused")
        for verb in ("complete", "finalize", "dismiss"):
            await error(c, f"job-{verb}", {"id": "s"}, desc=verb_error("s", "paused", verb))
        # A paused job takes a new speed.
        assert await execute(c, "block-job-set-speed", {"device": "s", "speed": 3}) == {}
        assert (await block_job(c, "s"))["speed"] == 3
        # Nothing happens while paused.
        assert await ev.quiet("s", 0.3) == []

        assert await execute(c, f"{family}-resume", {key: "s"}) == {}
        assert await ev.until("s", "running") == ["running"]
        b = await block_job(c, "s")
        assert (b["status"], b["paused"]) == ("running", False), b
        await error(c, f"{family}-resume", {key: "s"}, desc="Can't resume a job that was not paused")

        offset = (await block_job(c, "s"))["offset"]
        cancel = ("job-cancel", {"id": "s"}) if family == "job" else ("block-job-cancel", {"device": "s"})
        assert await execute(c, *cancel) == {}
        assert await ev.until("s", "null") == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
        done = ev.data["BLOCK_JOB_CANCELLED"]
        # (The resumed job may have copied one more chunk before the cancel.)
        assert offset <= done["offset"] < SIZE, (offset, done)
        assert done == {
            "device": "s", "len": SIZE, "offset": done["offset"], "speed": 3, "type": "stream",
        }
        assert await execute(c, "query-jobs") == []
        # The chain is as it was.
        assert (await nodes_by_name(c))["top"]["backing_file"] == str(tmp / "base.qcow2")
    d.expect_exit = True
    assert d.stop() is None
    assert backing_of(tmp / "top.qcow2") == str(tmp / "base.qcow2")
    check_disk_intact(tmp)
    check_clean(tmp / "top.qcow2")


async def test_cancel_paused_job(start_daemon, tmp):
    """Cancelling a paused job resumes it first (a "running" event), then aborts it."""
    d = setup(start_daemon, tmp)
    async with d.qmp() as c:
        ev = JobEvents(c)
        await start_slow_stream(c, ev)
        await execute(c, "job-pause", {"id": "s"})
        assert await ev.until("s", "paused") == ["paused"]
        assert await execute(c, "job-cancel", {"id": "s"}) == {}
        assert await ev.until("s", "null") == [
            "running", "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null",
        ]
        assert ev.data["BLOCK_JOB_CANCELLED"]["speed"] == 1
        await error(c, "job-cancel", {"id": "s"}, desc="Job not found")
    d.expect_exit = True
    assert d.stop() is None
    check_disk_intact(tmp)


async def test_manual_finalize_and_dismiss(start_daemon, tmp):
    """auto-finalize=false stops the job in "pending" (BLOCK_JOB_PENDING) with the
    graph unchanged until job-finalize; auto-dismiss=false keeps it "concluded" until
    job-dismiss."""
    d = setup(start_daemon, tmp)
    async with d.qmp() as c:
        ev = JobEvents(c)
        await start_slow_stream(c, ev, **{"auto-finalize": False, "auto-dismiss": False})
        b = await block_job(c, "s")
        assert (b["auto-finalize"], b["auto-dismiss"]) == (False, False), b
        await execute(c, "block-job-set-speed", {"device": "s", "speed": 0})
        assert await ev.until("s", "BLOCK_JOB_PENDING") == ["waiting", "pending", "BLOCK_JOB_PENDING"]
        assert ev.data["BLOCK_JOB_PENDING"] == {"type": "stream", "id": "s"}
        j = await job(c, "s")
        assert j == {
            "id": "s", "type": "stream", "status": "pending",
            "current-progress": SIZE, "total-progress": SIZE,
        }, j
        b = await block_job(c, "s")
        assert (b["status"], b["offset"], b["len"], b["paused"], b["ready"]) == (
            "pending", SIZE, SIZE, False, False,
        ), b
        # Not finalized: top still has its backing node.
        assert (await nodes_by_name(c))["top"]["backing_file"] == str(tmp / "base.qcow2")
        for verb in ("pause", "complete", "dismiss"):
            await error(c, f"job-{verb}", {"id": "s"}, desc=verb_error("s", "pending", verb))
        await error(c, "block-job-set-speed", {"device": "s", "speed": 5},
                    desc=verb_error("s", "pending", "set-speed"))
        await error(c, "job-resume", {"id": "s"}, desc="Can't resume a job that was not paused")
        assert await ev.quiet("s", 0.3) == []

        assert await execute(c, "job-finalize", {"id": "s"}) == {}
        assert await ev.until("s", "concluded") == ["BLOCK_JOB_COMPLETED", "concluded"]
        assert ev.data["BLOCK_JOB_COMPLETED"] == {
            "device": "s", "len": SIZE, "offset": SIZE, "speed": 0, "type": "stream",
        }
        # (qemu-storage-daemon 7.2 crashes on query-named-block-nodes between the
        # finalize and the dismiss of a stream job: the check of top's backing file is
        # after job-dismiss below, and test_query_nodes_while_concluded covers vubd.)
        j = await job(c, "s")
        assert j["status"] == "concluded" and "error" not in j, j
        b = await block_job(c, "s")
        assert b["status"] == "concluded" and "error" not in b, b
        for verb in ("pause", "complete", "finalize", "cancel"):
            await error(c, f"job-{verb}", {"id": "s"}, desc=verb_error("s", "concluded", verb))
        await error(c, "job-resume", {"id": "s"}, desc="Can't resume a job that was not paused")
        assert await ev.quiet("s", 0.2) == []
        assert await execute(c, "job-dismiss", {"id": "s"}) == {}
        assert await ev.until("s", "null") == ["null"]
        assert await execute(c, "query-jobs") == []
        await error(c, "job-dismiss", {"id": "s"}, desc="Job not found")
        assert "backing_file" not in (await nodes_by_name(c))["top"]
    d.expect_exit = True
    assert d.stop() is None
    assert backing_of(tmp / "top.qcow2") is None
    check_clean(tmp / "top.qcow2")


@pytest.mark.vubd_only("qemu-storage-daemon 7.2 segfaults on query-named-block-nodes "
                       "while a finalized stream job waits in concluded for job-dismiss")
async def test_query_nodes_while_concluded(start_daemon, tmp):
    d = setup(start_daemon, tmp)
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "block-stream", {"job-id": "s", "device": "top", "auto-dismiss": False})
        assert (await ev.until("s", "concluded"))[-2:] == ["BLOCK_JOB_COMPLETED", "concluded"]
        nodes = await nodes_by_name(c)
        assert {"top", "top-file", "base", "base-file"} <= set(nodes), nodes
        assert "backing_file" not in nodes["top"]
        await execute(c, "job-dismiss", {"id": "s"})
        assert await ev.until("s", "null") == ["null"]


async def test_block_job_finalize_and_dismiss(start_daemon, tmp):
    """The block-job-* spellings of finalize and dismiss (argument ``id``); a job that
    has nothing to do (top has no backing file any more) still goes through every
    state; cancelling a pending job aborts it."""
    d = setup(start_daemon, tmp)
    async with d.qmp() as c:
        ev = JobEvents(c)
        flags = {"auto-finalize": False, "auto-dismiss": False}
        await execute(c, "block-stream", {"job-id": "s", "device": "top", **flags})
        assert await ev.until("s", "BLOCK_JOB_PENDING") == [
            "created", "running", "waiting", "pending", "BLOCK_JOB_PENDING",
        ]
        await error(c, "block-job-finalize", {"id": "nosuch"}, cls="DeviceNotActive",
                    desc="Block job 'nosuch' not found")
        assert await execute(c, "block-job-finalize", {"id": "s"}) == {}
        assert await ev.until("s", "concluded") == ["BLOCK_JOB_COMPLETED", "concluded"]
        await error(c, "block-job-dismiss", {"id": "nosuch"}, cls="DeviceNotActive",
                    desc="Block job 'nosuch' not found")
        assert await execute(c, "block-job-dismiss", {"id": "s"}) == {}
        assert await ev.until("s", "null") == ["null"]
        await error(c, "block-job-dismiss", {"id": "s"}, cls="DeviceNotActive",
                    desc="Block job 's' not found")

        # top has no backing file now: nothing to copy, len 0.
        await execute(c, "block-stream", {"job-id": "t", "device": "top", **flags})
        assert await ev.until("t", "BLOCK_JOB_PENDING") == [
            "created", "running", "waiting", "pending", "BLOCK_JOB_PENDING",
        ]
        assert await execute(c, "job-cancel", {"id": "t"}) == {}
        assert await ev.until("t", "concluded") == ["aborting", "BLOCK_JOB_CANCELLED", "concluded"]
        assert ev.data["BLOCK_JOB_CANCELLED"] == {
            "device": "t", "len": 0, "offset": 0, "speed": 0, "type": "stream",
        }
        j = await job(c, "t")
        assert j == {
            "id": "t", "type": "stream", "status": "concluded", "current-progress": 0,
            "total-progress": 0, "error": "Operation canceled",
        }, j
        b = await block_job(c, "t")
        assert set(b) == BLOCK_JOB_INFO_KEYS | {"error"}, b
        assert (b["status"], b["error"]) == ("concluded", "Operation canceled"), b
        assert await execute(c, "job-dismiss", {"id": "t"}) == {}
        assert await ev.until("t", "null") == ["null"]


async def test_jobs_not_found(daemon):
    async with daemon.qmp() as c:
        for verb in ("pause", "resume", "cancel", "complete", "finalize", "dismiss"):
            await error(c, f"job-{verb}", {"id": "x"}, desc="Job not found")
            await error(c, f"job-{verb}", {}, desc="Parameter 'id' is missing")
            await error(c, f"job-{verb}", {"id": 5}, desc="Invalid parameter type for 'id', expected: string")
        for verb in ("pause", "resume", "cancel", "complete"):
            await error(c, f"block-job-{verb}", {"device": "x"}, cls="DeviceNotActive",
                        desc="Block job 'x' not found")
            await error(c, f"block-job-{verb}", {}, desc="Parameter 'device' is missing")
        for verb in ("finalize", "dismiss"):
            await error(c, f"block-job-{verb}", {"id": "x"}, cls="DeviceNotActive",
                        desc="Block job 'x' not found")
        # An export id or node name is not a job.
        await error(c, "block-job-cancel", {"device": "n0"}, cls="DeviceNotActive",
                    desc="Block job 'n0' not found")
        await error(c, "block-job-cancel", {"device": "x", "force": "yes"},
                    desc="Invalid parameter type for 'force', expected: boolean")
        assert await execute(c, "query-jobs") == []
        assert await execute(c, "query-block-jobs") == []
        await error(c, "query-jobs", {"x": 1}, desc="Parameter 'x' is unexpected")


async def test_job_id_and_busy_node(start_daemon, tmp):
    make_chain(tmp, LAYERS, SIZE)
    make_chain(tmp, [("b2", []), ("t2", [])], SIZE)
    d = start_daemon(chain_args(tmp, ["base", "top"]) + chain_args(tmp, ["b2", "t2"]))
    async with d.qmp() as c:
        ev = JobEvents(c)
        # Without job-id the job would be named after the device, but a node added with
        # --blockdev belongs to no device: the id is "" and invalid.
        await error(c, "block-stream", {"device": "top"}, desc="Invalid job ID ''")
        await error(c, "block-stream", {"job-id": "", "device": "top"}, desc="Invalid job ID ''")
        await error(c, "block-stream", {"job-id": "1x", "device": "top"}, desc="Invalid job ID '1x'")
        await error(c, "block-stream", {"job-id": "a b", "device": "top"}, desc="Invalid job ID 'a b'")
        await start_slow_stream(c, ev)
        await error(c, "block-stream", {"job-id": "s", "device": "t2"}, desc="Job ID 's' already in use")
        busy = "Node 'top' is busy: block device is in use by block job: stream"
        await error(c, "block-stream", {"job-id": "s2", "device": "top"}, desc=busy)
        await error(c, "block-stream", {"device": "top"}, desc=busy)
        # A second job elsewhere is fine.
        await execute(c, "block-stream", {"job-id": "s2", "device": "t2"})
        assert await ev.until("s2", "null") == [
            "created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null",
        ]
        assert [j["id"] for j in await execute(c, "query-jobs")] == ["s"]
        await execute(c, "job-cancel", {"id": "s"})
        assert (await ev.until("s", "null"))[-1] == "null"
        # The id is free again.
        await start_slow_stream(c, ev)
        await execute(c, "job-cancel", {"id": "s"})
        await ev.until("s", "null")


async def test_block_stream_argument_errors(start_daemon, tmp):
    d = setup(start_daemon, tmp)
    async with d.qmp() as c:
        cases = [
            ({"job-id": "s"}, "Parameter 'device' is missing"),
            ({"job-id": "s", "device": "top", "speed": "1"}, "Invalid parameter type for 'speed', expected: integer"),
            ({"job-id": "s", "device": "top", "speed": -5}, "Parameter 'speed' expects a non-negative value"),
            ({"job-id": "s", "device": "top", "on-error": "bogus"}, "Parameter 'on-error' does not accept value 'bogus'"),
            ({"job-id": "s", "device": "top", "auto-finalize": "yes"},
             "Invalid parameter type for 'auto-finalize', expected: boolean"),
            ({"job-id": "s", "device": "top", "bogus": 1}, "Parameter 'bogus' is unexpected"),
        ]
        for args, desc in cases:
            await error(c, "block-stream", args, desc=desc)
        assert await execute(c, "query-jobs") == []


ON_ERROR_CASES = {
    # policy, errno: BLOCK_JOB_ERROR action, then what happens.
    "report": ("report", 5, "report"),
    "ignore": ("ignore", 5, "ignore"),
    "stop": ("stop", 5, "stop"),
    "enospc-eio": ("enospc", 5, "report"),
    "enospc-enospc": ("enospc", 28, "stop"),
}


@pytest.mark.parametrize("case", list(ON_ERROR_CASES))
async def test_on_error(start_daemon, tmp, case):
    """A read error in the backing file (blkdebug fails base's first data read once):
    BLOCK_JOB_ERROR, then per on-error: report fails the job; ignore carries on but
    the job still ends with the error (and keeps the backing file); stop (and enospc
    for ENOSPC) pauses the job with io-status failed/nospace, and job-resume retries."""
    policy, errno, action = ON_ERROR_CASES[case]
    make_chain(tmp, LAYERS, SIZE)
    rule = {"event": "read_aio", "errno": errno, "once": True}
    args = [
        "--blockdev", f"file,node-name=base-file,filename={tmp / 'base.qcow2'}",
        "--blockdev", json.dumps({"driver": "blkdebug", "node-name": "dbg", "image": "base-file",
                                  "inject-error": [rule]}),
        "--blockdev", "qcow2,node-name=base,file=dbg",
        "--blockdev", f"file,node-name=top-file,filename={tmp / 'top.qcow2'}",
        "--blockdev", "qcow2,node-name=top,file=top-file,backing=base",
    ]
    d = start_daemon(args)
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "block-stream", {"job-id": "s", "device": "top", "on-error": policy})
        assert await ev.until("s", "BLOCK_JOB_ERROR") == ["created", "running", "BLOCK_JOB_ERROR"]
        assert ev.data["BLOCK_JOB_ERROR"] == {"device": "s", "operation": "read", "action": action}
        if action == "stop":
            assert await ev.until("s", "paused") == ["paused"]
            b = await block_job(c, "s")
            assert (b["status"], b["paused"], b["io-status"]) == (
                "paused", True, "nospace" if errno == 28 else "failed",
            ), b
            assert "error" not in b, b
            assert await execute(c, "job-resume", {"id": "s"}) == {}
            assert await ev.until("s", "null") == [
                "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null",
            ]
            assert ev.data["BLOCK_JOB_COMPLETED"] == {
                "device": "s", "len": SIZE, "offset": SIZE, "speed": 0, "type": "stream",
            }
            streamed = True
        else:
            assert await ev.until("s", "null") == [
                "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null",
            ]
            done = ev.data["BLOCK_JOB_COMPLETED"]
            # report stops at the failed chunk (nothing before it needed copying);
            # ignore went on to the end.
            assert done == {
                "device": "s", "len": SIZE, "offset": SIZE if action == "ignore" else 0,
                "speed": 0, "type": "stream", "error": "Input/output error",
            }, done
            streamed = False
    d.expect_exit = True
    assert d.stop() is None
    assert backing_of(tmp / "top.qcow2") == (None if streamed else str(tmp / "base.qcow2"))
    check_disk_intact(tmp)
    check_clean(tmp / "top.qcow2")


async def test_blockdev_create_job_states(daemon, tmp):
    """blockdev-create is a job too: success goes created, running, waiting, pending,
    concluded; failure goes created, running, aborting, concluded with the error in
    query-jobs. Either waits in concluded for job-dismiss (no BLOCK_JOB_* events:
    it is not a block job)."""
    async with daemon.qmp() as c:
        ev = JobEvents(c)
        bad = tmp / "nodir" / "x.img"
        await execute(c, "blockdev-create", {"job-id": "cr", "options": {
            "driver": "file", "filename": str(bad), "size": MIB}})
        assert await ev.until("cr", "concluded") == ["created", "running", "aborting", "concluded"]
        assert await job(c, "cr") == {
            "id": "cr", "type": "create", "status": "concluded", "current-progress": 1,
            "total-progress": 1, "error": f"Could not create '{bad}': No such file or directory",
        }
        # Not a block job.
        assert await execute(c, "query-block-jobs") == []
        await error(c, "block-job-cancel", {"device": "cr"}, cls="DeviceNotActive",
                    desc="Block job 'cr' not found")
        for verb in ("pause", "cancel", "complete", "finalize"):
            await error(c, f"job-{verb}", {"id": "cr"}, desc=verb_error("cr", "concluded", verb))
        await error(c, "job-resume", {"id": "cr"}, desc="Can't resume a job that was not paused")
        assert await execute(c, "job-dismiss", {"id": "cr"}) == {}
        assert await ev.until("cr", "null") == ["null"]

        # A format error fails the same way.
        await execute(c, "blockdev-add", {"driver": "null-co", "node-name": "nul"})
        await execute(c, "blockdev-create", {"job-id": "cr", "options": {
            "driver": "qcow2", "file": "nul", "size": 1000}})
        assert await ev.until("cr", "concluded") == ["created", "running", "aborting", "concluded"]
        assert (await job(c, "cr"))["error"] == "Image size must be a multiple of 512 bytes"
        await execute(c, "job-dismiss", {"id": "cr"})
        await ev.until("cr", "null")

        good = tmp / "ok.img"
        await execute(c, "blockdev-create", {"job-id": "cr", "options": {
            "driver": "file", "filename": str(good), "size": MIB}})
        assert await ev.until("cr", "concluded") == [
            "created", "running", "waiting", "pending", "concluded",
        ]
        assert await job(c, "cr") == {
            "id": "cr", "type": "create", "status": "concluded", "current-progress": 1,
            "total-progress": 1,
        }
        await error(c, "blockdev-create", {"job-id": "cr", "options": {
            "driver": "file", "filename": str(good), "size": MIB}},
            desc="Job ID 'cr' already in use")
        assert await execute(c, "job-dismiss", {"id": "cr"}) == {}
        assert await ev.until("cr", "null") == ["null"]
        assert good.stat().st_size == MIB


async def test_blockdev_amend(start_daemon, tmp):
    """x-blockdev-amend is an `amend` job. On a qcow2 image without encryption it has
    nothing to change and succeeds; an encryption amendment fails in the job with
    QEMU's text. Argument errors are QMP errors, in QEMU's order and texts."""
    d = setup(start_daemon, tmp, extra_args=["--blockdev", "null-co,node-name=nul"])
    am = "x-blockdev-amend"
    async with d.qmp() as c:
        ev = JobEvents(c)
        for options, err in [
            ({"driver": "qcow2"}, None),
            ({"driver": "qcow2", "encrypt": {"format": "luks", "state": "active", "new-secret": "s"}},
             "image is not encrypted, can't amend"),
            ({"driver": "qcow2", "encrypt": {"format": "qcow"}}, "image is not encrypted, can't amend"),
        ]:
            assert await execute(c, am, {"job-id": "a", "node-name": "top", "options": options}) == {}
            states = await ev.until("a", "concluded")
            want = {"id": "a", "type": "amend", "status": "concluded",
                    "current-progress": 1, "total-progress": 1}
            if err is None:
                assert states == ["created", "running", "waiting", "pending", "concluded"]
            else:
                assert states == ["created", "running", "aborting", "concluded"]
                want["error"] = err
            assert await job(c, "a") == want
            assert await execute(c, "query-block-jobs") == []
            assert await execute(c, "job-dismiss", {"id": "a"}) == {}
            await ev.until("a", "null")
        cases = [
            ({"node-name": "top", "options": {"driver": "qcow2"}}, "Parameter 'job-id' is missing"),
            ({"job-id": "a", "node-name": "top"}, "Parameter 'options' is missing"),
            ({"job-id": "a", "node-name": "top", "options": {}}, "Parameter 'options.driver' is missing"),
            ({"job-id": "a", "node-name": "top", "options": {"driver": "bogus"}},
             "Parameter 'driver' does not accept value 'bogus'"),
            ({"job-id": "a", "node-name": "top", "options": {"driver": "qcow2", "bogus": 1}},
             "Parameter 'options.bogus' is unexpected"),
            ({"job-id": "a", "node-name": "top", "options": {"driver": "qcow2", "encrypt": {"format": "luks"}}},
             "Parameter 'options.encrypt.state' is missing"),
            ({"job-id": "a", "node-name": "top", "options": {"driver": "luks"}}, "Parameter 'options.state' is missing"),
            ({"job-id": "a", "node-name": "top", "options": {"driver": "qcow2"}, "force": 1},
             "Invalid parameter type for 'force', expected: boolean"),
            ({"job-id": "a", "node-name": "nosuch", "options": {"driver": "qcow2"}},
             "Cannot find device='' nor node-name='nosuch'"),
            ({"job-id": "a", "node-name": "top", "options": {"driver": "raw"}},
             "x-blockdev-amend doesn't support changing the block driver"),
            ({"job-id": "a", "node-name": "top-file", "options": {"driver": "qcow2"}},
             "x-blockdev-amend doesn't support changing the block driver"),
            ({"job-id": "a", "node-name": "top-file", "options": {"driver": "file"}},
             "Driver does not support x-blockdev-amend"),
            ({"job-id": "a", "node-name": "nul", "options": {"driver": "null-co"}},
             "Driver does not support x-blockdev-amend"),
            ({"job-id": "1a", "node-name": "top", "options": {"driver": "qcow2"}}, "Invalid job ID '1a'"),
        ]
        for args, desc in cases:
            await error(c, am, args, desc=desc)
        assert await execute(c, "query-jobs") == []
    d.expect_exit = True
    assert d.stop() is None
    check_clean(tmp / "top.qcow2")

"""block-stream and block-commit over QMP on a three-layer qcow2 chain (base <- mid <-
top, each with data of its own, top exported): streaming the whole chain, down to a base
(base, base-node, bottom, backing-file), into an intermediate node; intermediate commit
(top, top-node, base, base-node, backing-file) and active commit with its ready state,
block-job-complete pivot under guest I/O, and the three ways of cancelling a ready
commit; the arguments' errors. After each job the data is read back through the export
(vubd-io) and, once the daemon has quit, from the files (qemu-img compare, map, info,
check). Every expectation is qemu-storage-daemon 7.2's (the tests pass with
``--daemon=qsd``)."""

import pytest

from chains import (
    CANCEL_WAYS,
    KIB,
    PivotUnderIo,
    JobEvents,
    allocated_depths,
    backing_of,
    block_job,
    cancel_in_ready,
    chain_args,
    check_clean,
    compare,
    expected_disk,
    export_node,
    job,
    make_chain,
    nodes_by_name,
    pattern,
    read_disk,
    seed_runs,
    verify_export,
    verb_error,
    write_raw,
)
from conftest import MIB, error, execute, export_args, io_ok

SIZE = 4 * MIB
BASE = ("base", [(0, SIZE, 1)])
MID = ("mid", [(2 * MIB, 128 * KIB, 3), (3 * MIB, 64 * KIB, 4)])
TOP = ("top", [(MIB, 64 * KIB, 2), (2 * MIB + 64 * KIB, 64 * KIB, 5)])
LAYERS = [BASE, MID, TOP]
#: Bytes allocated above base, in top or mid (what an active commit has to copy).
ABOVE_BASE = 256 * KIB

DONE = ["created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]


def setup(start_daemon, tmp, layers=LAYERS):
    make_chain(tmp, layers, SIZE)
    names = [n for n, _ in layers]
    sock = tmp / "d-e0.sock"
    d = start_daemon(chain_args(tmp, names) + export_args("e0", names[-1], sock))
    return d, sock


def ref(tmp, layers=LAYERS):
    return write_raw(tmp / "ref.raw", expected_disk(layers, SIZE))


def path(tmp, name):
    return str(tmp / f"{name}.qcow2")


# ---------------------------------------------------------------------------------------
# block-stream


async def test_stream_whole_chain(start_daemon, tmp):
    d, sock = setup(start_daemon, tmp)
    async with d.qmp() as c:
        ev = JobEvents(c)
        assert await execute(c, "block-stream", {"job-id": "s", "device": "top"}) == {}
        assert await ev.until("s", "null") == DONE
        assert ev.data["BLOCK_JOB_COMPLETED"] == {
            "device": "s", "len": SIZE, "offset": SIZE, "speed": 0, "type": "stream",
        }
        nodes = await nodes_by_name(c)
        assert "backing_file" not in nodes["top"], nodes["top"]
        assert nodes["top"]["backing_file_depth"] == 0, nodes["top"]
        # The export is still on top and reads the same disk.
        assert await export_node(c, "e0") == "top"
        verify_export(sock, seed_runs(LAYERS, SIZE))
    d.expect_exit = True
    assert d.stop() is None
    top = tmp / "top.qcow2"
    assert backing_of(top) is None
    assert allocated_depths(top, 0, SIZE) == {0}
    compare(ref(tmp), top)
    check_clean(top)


@pytest.mark.parametrize("how", ["base-node", "base", "bottom", "backing-file"])
async def test_stream_down_to_base(start_daemon, tmp, how):
    """Stream mid's data into top and keep base: named by node (base-node), by file
    name (base), by the lowest node to copy (bottom=mid); backing-file sets the name
    written in top's header."""
    d, sock = setup(start_daemon, tmp)
    args = {
        "base-node": {"base-node": "base"},
        "base": {"base": path(tmp, "base")},
        "bottom": {"bottom": "mid"},
        "backing-file": {"base-node": "base", "backing-file": "base.qcow2"},
    }[how]
    async with d.qmp() as c:
        ev = JobEvents(c)
        assert await execute(c, "block-stream", {"job-id": "s", "device": "top", **args}) == {}
        assert await ev.until("s", "null") == DONE
        assert ev.data["BLOCK_JOB_COMPLETED"] == {
            "device": "s", "len": SIZE, "offset": SIZE, "speed": 0, "type": "stream",
        }
        top = (await nodes_by_name(c))["top"]
        # backing_file names the node's backing file; backing-filename is the header's.
        assert top["backing_file"] == path(tmp, "base"), top
        header = "base.qcow2" if how == "backing-file" else path(tmp, "base")
        assert top["image"]["backing-filename"] == header, top
        verify_export(sock, seed_runs(LAYERS, SIZE))
    d.expect_exit = True
    assert d.stop() is None
    top = tmp / "top.qcow2"
    assert backing_of(top) == ("base.qcow2" if how == "backing-file" else path(tmp, "base"))
    assert img_backing_format(top) == "qcow2"
    # mid's regions are now in top; base's are still read from base.
    for off, n, _ in MID[1]:
        assert allocated_depths(top, off, n) == {0}, (off, n)
    assert allocated_depths(top, 0, MIB) == {1}
    compare(ref(tmp), top)
    check_clean(top)


def img_backing_format(img):
    from chains import img_info

    return img_info(img).get("backing-filename-format")


async def test_stream_into_intermediate_node(start_daemon, tmp):
    """Streaming into mid (not the exported node): base's data goes into mid, mid loses
    its backing file, top and the export are unaffected."""
    d, sock = setup(start_daemon, tmp)
    async with d.qmp() as c:
        ev = JobEvents(c)
        assert await execute(c, "block-stream", {"job-id": "s", "device": "mid"}) == {}
        assert await ev.until("s", "null") == DONE
        nodes = await nodes_by_name(c)
        assert "backing_file" not in nodes["mid"]
        assert nodes["top"]["backing_file"] == path(tmp, "mid")
        verify_export(sock, seed_runs(LAYERS, SIZE))
    d.expect_exit = True
    assert d.stop() is None
    assert backing_of(tmp / "mid.qcow2") is None
    assert backing_of(tmp / "top.qcow2") == path(tmp, "mid")
    compare(ref(tmp, [BASE, MID]), tmp / "mid.qcow2")
    compare(ref(tmp), tmp / "top.qcow2")
    check_clean(tmp / "mid.qcow2")


async def test_read_only_nodes_are_reopened_for_jobs(start_daemon, tmp):
    """A job writes into a read-only node by reopening it read-write for its run, and
    read-only again at its end: stream into a read-only mid, then (in a second daemon)
    an intermediate commit into a read-only base."""
    make_chain(tmp, LAYERS, SIZE)
    sock = tmp / "d-e0.sock"
    extra = {"base": "read-only=on", "mid": "read-only=on"}
    d = start_daemon(chain_args(tmp, ["base", "mid", "top"], extra) + export_args("e0", "top", sock))
    async with d.qmp() as c:
        ev = JobEvents(c)
        assert (await nodes_by_name(c))["mid"]["ro"] is True
        assert await execute(c, "block-stream", {"job-id": "s", "device": "mid"}) == {}
        assert await ev.until("s", "null") == DONE
        nodes = await nodes_by_name(c)
        assert nodes["mid"]["ro"] is True and "backing_file" not in nodes["mid"], nodes["mid"]
        verify_export(sock, seed_runs(LAYERS, SIZE))
    d.expect_exit = True
    assert d.stop() is None
    assert backing_of(tmp / "mid.qcow2") is None
    compare(ref(tmp, [BASE, MID]), tmp / "mid.qcow2")
    check_clean(tmp / "mid.qcow2")

    make_chain(tmp, LAYERS, SIZE)
    d = start_daemon(chain_args(tmp, ["base", "mid", "top"], extra) + export_args("e0", "top", sock))
    async with d.qmp() as c:
        ev = JobEvents(c)
        assert await execute(c, "block-commit", {"job-id": "c", "device": "top", "top-node": "mid"}) == {}
        assert await ev.until("c", "null") == DONE
        nodes = await nodes_by_name(c)
        assert nodes["base"]["ro"] is True, nodes["base"]
        assert nodes["top"]["backing_file"] == path(tmp, "base")
        verify_export(sock, seed_runs(LAYERS, SIZE))
    d.expect_exit = True
    assert d.stop() is None
    assert read_disk(tmp / "base.qcow2", tmp) == bytes(expected_disk([BASE, MID], SIZE))
    check_clean(tmp / "base.qcow2")


@pytest.mark.parametrize("job", ["stream", "commit", "active-commit"])
async def test_jobs_cancelled_on_shutdown(start_daemon, tmp, job):
    """SIGTERM while a job runs (an active commit in ready, with its filter over the
    top): the daemon cancels the job and exits cleanly; every image is clean and the
    chain is as before."""
    make_chain(tmp, LAYERS, SIZE)
    sock = tmp / "d-e0.sock"
    extra = {"base": "read-only=on"}
    d = start_daemon(chain_args(tmp, ["base", "mid", "top"], extra) + export_args("e0", "top", sock))
    args = {
        "stream": ("block-stream", {"device": "top", "speed": 1}, "running"),
        "commit": ("block-commit", {"device": "top", "top-node": "mid", "speed": 1}, "running"),
        "active-commit": ("block-commit", {"device": "top"}, "BLOCK_JOB_READY"),
    }[job]
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, args[0], {"job-id": "j", **args[1]})
        await ev.until("j", args[2])
        io_ok("write", "--socket", sock, "--offset", 0, "--len", 64 * KIB, "--seed", 9)
    d.expect_exit = True
    assert d.stop() is None
    for name in ("top", "mid", "base"):
        check_clean(tmp / f"{name}.qcow2")
    assert backing_of(tmp / "top.qcow2") == path(tmp, "mid")
    assert backing_of(tmp / "mid.qcow2") == path(tmp, "base")
    final = LAYERS + [("w", [(0, 64 * KIB, 9)])]
    compare(ref(tmp, final), tmp / "top.qcow2")


async def test_stream_errors(start_daemon, tmp):
    d, _ = setup(start_daemon, tmp)
    bs = "block-stream"
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "blockdev-add", {"driver": "null-co", "node-name": "nul"})
        cases = [
            ({"job-id": "s", "device": "nosuch"}, "Cannot find device='nosuch' nor node-name='nosuch'"),
            ({"job-id": "s", "device": "e0"}, "Cannot find device='e0' nor node-name='e0'"),
            ({"job-id": "s", "device": "top", "base": "x", "base-node": "y"},
             "'base' and 'base-node' cannot be specified at the same time"),
            ({"job-id": "s", "device": "top", "bottom": "mid", "base-node": "base"},
             "'bottom' and 'base-node' cannot be specified at the same time"),
            ({"job-id": "s", "device": "top", "bottom": "mid", "base": path(tmp, "base")},
             "'base' and 'bottom' cannot be specified at the same time"),
            ({"job-id": "s", "device": "top", "base": "x"}, "Can't find 'x' in the backing chain"),
            # (QEMU looks the node up with an empty device name, and says so.)
            ({"job-id": "s", "device": "top", "base-node": "nosuch"},
             "Cannot find device='' nor node-name='nosuch'"),
            ({"job-id": "s", "device": "top", "bottom": "nosuch"},
             "Cannot find device='' nor node-name='nosuch'"),
            ({"job-id": "s", "device": "top", "base-node": "top"}, "Node 'top' is not a backing image of 'top'"),
            ({"job-id": "s", "device": "mid", "base-node": "top"}, "Node 'top' is not a backing image of 'mid'"),
            ({"job-id": "s", "device": "top", "base-node": "nul"}, "Node 'nul' is not a backing image of 'top'"),
            ({"job-id": "s", "device": "top", "bottom": "nul"}, "Node 'nul' is not in a chain starting from 'top'"),
            ({"job-id": "s", "device": "top", "backing-file": "x"},
             "backing file specified, but streaming the entire chain"),
            ({"job-id": "s", "device": "top", "bottom": "mid", "backing-file": "x"},
             "backing file specified, but streaming the entire chain"),
        ]
        for args, desc in cases:
            await error(c, bs, args, desc=desc)
        # None of them created a job.
        assert await ev.quiet("s", 0.2) == []
        assert await execute(c, "query-jobs") == []
        # Nodes without a backing file, or with nothing between them and the bottom,
        # give jobs with nothing to do.
        for args in ({"device": "base"}, {"device": "nul"}, {"device": "top", "bottom": "top"}):
            await execute(c, bs, {"job-id": "s", **args})
            assert await ev.until("s", "null") == DONE
            assert ev.data["BLOCK_JOB_COMPLETED"] == {
                "device": "s", "len": 0, "offset": 0, "speed": 0, "type": "stream",
            }
        assert (await nodes_by_name(c))["top"]["backing_file"] == path(tmp, "mid")


# ---------------------------------------------------------------------------------------
# block-commit: intermediate


@pytest.mark.parametrize("how", ["nodes", "files", "top-node-only", "backing-file"])
async def test_commit_intermediate(start_daemon, tmp, how):
    """Commit mid into base while top stays exported: top's backing becomes base, base
    holds mid's data, the disk reads the same."""
    d, sock = setup(start_daemon, tmp)
    args = {
        "nodes": {"top-node": "mid", "base-node": "base"},
        "files": {"top": path(tmp, "mid"), "base": path(tmp, "base")},
        # The base defaults to the bottom of the chain.
        "top-node-only": {"top-node": "mid"},
        "backing-file": {"top-node": "mid", "base-node": "base", "backing-file": "base.qcow2"},
    }[how]
    async with d.qmp() as c:
        ev = JobEvents(c)
        assert await execute(c, "block-commit", {"job-id": "c", "device": "top", **args}) == {}
        assert await ev.until("c", "null") == DONE
        assert ev.data["BLOCK_JOB_COMPLETED"] == {
            "device": "c", "len": SIZE, "offset": SIZE, "speed": 0, "type": "commit",
        }
        top = (await nodes_by_name(c))["top"]
        assert top["backing_file"] == path(tmp, "base"), top
        header = "base.qcow2" if how == "backing-file" else path(tmp, "base")
        assert top["image"]["backing-filename"] == header, top
        assert await export_node(c, "e0") == "top"
        verify_export(sock, seed_runs(LAYERS, SIZE))
        io_ok("write", "--socket", sock, "--offset", 0, "--len", 64 * KIB, "--seed", 9)
    d.expect_exit = True
    assert d.stop() is None
    top, base = tmp / "top.qcow2", tmp / "base.qcow2"
    assert backing_of(top) == ("base.qcow2" if how == "backing-file" else path(tmp, "base"))
    # base now reads as base + mid did.
    assert read_disk(base, tmp) == bytes(expected_disk([BASE, MID], SIZE))
    final = LAYERS + [("w", [(0, 64 * KIB, 9)])]
    compare(ref(tmp, final), top)
    for img in (top, base):
        check_clean(img)


async def test_commit_intermediate_cancelled(start_daemon, tmp):
    """A slow commit cancelled halfway: the chain stays base <- mid <- top and reads the
    same (base may have taken some of mid's clusters: they are hidden by mid)."""
    d, sock = setup(start_daemon, tmp)
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "block-commit", {"job-id": "c", "device": "top", "top-node": "mid", "speed": 1})
        assert await ev.until("c", "running") == ["created", "running"]
        b = await block_job(c, "c")
        assert (b["type"], b["status"], b["len"], b["speed"], b["ready"]) == (
            "commit", "running", SIZE, 1, False,
        ), b
        await error(c, "job-complete", {"id": "c"}, desc=verb_error("c", "running", "complete"))
        await error(c, "block-job-complete", {"device": "c"}, desc=verb_error("c", "running", "complete"))
        assert await execute(c, "job-cancel", {"id": "c"}) == {}
        assert await ev.until("c", "null") == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
        done = ev.data["BLOCK_JOB_CANCELLED"]
        assert done == {"device": "c", "len": SIZE, "offset": done["offset"], "speed": 1, "type": "commit"}
        assert done["offset"] < SIZE
        assert (await nodes_by_name(c))["top"]["backing_file"] == path(tmp, "mid")
        verify_export(sock, seed_runs(LAYERS, SIZE))
    d.expect_exit = True
    assert d.stop() is None
    assert backing_of(tmp / "top.qcow2") == path(tmp, "mid")
    assert backing_of(tmp / "mid.qcow2") == path(tmp, "base")
    compare(ref(tmp), tmp / "top.qcow2")
    check_clean(tmp / "base.qcow2")


async def test_commit_errors(start_daemon, tmp):
    d, _ = setup(start_daemon, tmp)
    bc = "block-commit"
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "blockdev-add", {"driver": "null-co", "node-name": "nul"})
        cases = [
            ({"job-id": "c"}, "GenericError", "Parameter 'device' is missing"),
            # block-commit's device must be a root node, and its lookup error differs
            # from block-stream's.
            ({"job-id": "c", "device": "nosuch"}, "DeviceNotFound", "Device 'nosuch' not found"),
            ({"job-id": "c", "device": "mid"}, "GenericError", "Need a root block node"),
            ({"job-id": "c", "device": "top-file"}, "GenericError", "Need a root block node"),
            ({"device": "top"}, "GenericError", "Invalid job ID ''"),
            ({"job-id": "c", "device": "top", "base": "x", "base-node": "y"}, "GenericError",
             "'base-node' and 'base' are mutually exclusive"),
            ({"job-id": "c", "device": "top", "top": "x", "top-node": "y"}, "GenericError",
             "'top-node' and 'top' are mutually exclusive"),
            ({"job-id": "c", "device": "top", "base-node": "y"}, "GenericError",
             "Cannot find device='' nor node-name='y'"),
            ({"job-id": "c", "device": "top", "top-node": "y"}, "GenericError",
             "Cannot find device='' nor node-name='y'"),
            ({"job-id": "c", "device": "top", "top-node": "nul"}, "GenericError",
             "'nul' is not in this backing file chain"),
            ({"job-id": "c", "device": "top", "base-node": "nul"}, "GenericError",
             "'nul' is not in this backing file chain"),
            ({"job-id": "c", "device": "top", "top-node": "base", "base-node": "mid"}, "GenericError",
             "'mid' is not in this backing file chain"),
            ({"job-id": "c", "device": "top", "top": "x"}, "GenericError", "Top image file x not found"),
            ({"job-id": "c", "device": "top", "base": "x"}, "GenericError", "Can't find 'x' in the backing chain"),
            ({"job-id": "c", "device": "top", "top-node": "base"}, "GenericError",
             "cannot commit an image into itself"),
            ({"job-id": "c", "device": "top", "top-node": "mid", "base-node": "mid"}, "GenericError",
             "cannot commit an image into itself"),
            # A node without a backing file has nothing to commit into.
            ({"job-id": "c", "device": "nul"}, "GenericError", "cannot commit an image into itself"),
            ({"job-id": "c", "device": "top", "backing-file": "x"}, "GenericError",
             "'backing-file' specified, but 'top' is the active layer"),
            ({"job-id": "c", "device": "top", "on-error": "nope"}, "GenericError",
             "Parameter 'on-error' does not accept value 'nope'"),
        ]
        for args, cls, desc in cases:
            await error(c, bc, args, cls=cls, desc=desc)
        assert await ev.quiet("c", 0.2) == []
        # QEMU creates the job before it checks the speed: the refused commit shows as a
        # job that is created and at once gone.
        await error(c, bc, {"job-id": "c", "device": "top", "top-node": "mid", "speed": -1},
                    desc="Parameter 'speed' expects a non-negative value")
        assert await ev.until("c", "null") == ["created", "null"]
        assert await execute(c, "query-jobs") == []
        # A node in a running job's chain is busy.
        await execute(c, bc, {"job-id": "c", "device": "top", "top-node": "mid", "speed": 1})
        await ev.until("c", "running")
        # (Not "busy": the job is now a parent of top, and QEMU takes for root nodes
        # only those whose parents are all block backends.)
        await error(c, bc, {"job-id": "c2", "device": "top", "top-node": "mid"},
                    desc="Need a root block node")
        await error(c, "block-stream", {"job-id": "s", "device": "top"},
                    desc="Node 'top' is busy: block device is in use by block job: commit")
        await execute(c, "job-cancel", {"id": "c"})
        await ev.until("c", "null")


# ---------------------------------------------------------------------------------------
# block-commit: active


async def test_active_commit_ready_and_pivot_under_io(start_daemon, tmp, io_procs):
    """Active commit of top into base while a frontend writes and verifies through the
    export: BLOCK_JOB_READY, pause in ready (standby), then block-job-complete pivots
    the export onto base with no error and no lost write. Writes from before, during and
    after the job are all in base afterwards."""
    size = 8 * MIB
    layers = [("base", [(0, size, 1)]), ("top", [(6 * MIB, 64 * KIB, 2)])]
    make_chain(tmp, layers, size)
    sock = tmp / "d-e0.sock"
    d = start_daemon(chain_args(tmp, ["base", "top"]) + export_args("e0", "top", sock, extra=",num-queues=2"))
    # Outside the stress span: A before the job, B in ready, C after the pivot.
    p = PivotUnderIo(tmp, sock, io_procs, (2 * MIB, MIB, 3), (3 * MIB, MIB, 4), (4 * MIB, MIB, 5),
                     seconds=3, span=2 * MIB)
    await p.start()
    async with d.qmp() as c:
        ev = JobEvents(c)
        assert await execute(c, "block-commit", {"job-id": "c", "device": "top"}) == {}
        assert await ev.until("c", "BLOCK_JOB_READY") == ["created", "running", "ready", "BLOCK_JOB_READY"]
        rd = ev.data["BLOCK_JOB_READY"]
        assert rd == {"device": "c", "len": rd["len"], "offset": rd["len"], "speed": 0, "type": "commit"}, rd
        bj = await block_job(c, "c")
        assert (bj["status"], bj["ready"], bj["type"], bj["paused"]) == ("ready", True, "commit", False), bj
        assert (await job(c, "c"))["status"] == "ready"
        for verb in ("finalize", "dismiss"):
            await error(c, f"job-{verb}", {"id": "c"}, desc=verb_error("c", "ready", verb))
        await error(c, "job-resume", {"id": "c"}, desc="Can't resume a job that was not paused")
        p.write(p.b)
        # Paused in ready: standby.
        await execute(c, "job-pause", {"id": "c"})
        assert await ev.until("c", "standby") == ["standby"]
        bj = await block_job(c, "c")
        assert (bj["status"], bj["ready"], bj["paused"]) == ("standby", True, True), bj
        await error(c, "job-pause", {"id": "c"}, desc="Job is already paused")
        await execute(c, "job-resume", {"id": "c"})
        assert await ev.until("c", "ready") == ["ready"]
        await p.stress_ok()
        # The export then writes to base.
        cd = await p.complete(c, ev, "c", "base")
        assert cd == {"device": "c", "len": cd["len"], "offset": cd["len"], "speed": 0, "type": "commit"}, cd
        io_ok("verify", "--socket", sock, "--offset", 6 * MIB, "--len", 64 * KIB, "--seed", 2)
        # A stress run after the pivot, on base.
        r = io_ok("stress", "--socket", sock, "--seconds", 1, "--seed", 8, "--queues", 2, "--span", 2 * MIB)
        assert r["ok"], r
    d.expect_exit = True
    assert d.stop() is None
    base = tmp / "base.qcow2"
    data = read_disk(base, tmp)
    for off, n, seed in (p.a, p.b, p.c, (6 * MIB, 64 * KIB, 2), (5 * MIB, MIB, 1), (7 * MIB, MIB, 1)):
        assert data[off:off + n] == pattern(seed, off, n), (off, n, seed)
    check_clean(base)
    check_clean(tmp / "top.qcow2")
    # top was left as it was at the pivot: C never reached it.
    assert backing_of(tmp / "top.qcow2") == str(base)
    assert allocated_depths(tmp / "top.qcow2", 4 * MIB, MIB) == {1}


@pytest.mark.parametrize("how", CANCEL_WAYS)
async def test_active_commit_cancel_in_ready(start_daemon, tmp, how):
    """Cancelling a ready active commit: block-job-cancel completes it without the pivot
    (BLOCK_JOB_COMPLETED, base holds top's data); with force, or job-cancel, it is
    cancelled (BLOCK_JOB_CANCELLED). The export stays on top either way."""
    d, sock = setup(start_daemon, tmp)
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "block-commit", {"job-id": "c", "device": "top"})
        assert await ev.until("c", "BLOCK_JOB_READY") == ["created", "running", "ready", "BLOCK_JOB_READY"]
        # QEMU counts what is allocated above base, not the whole disk.
        assert ev.data["BLOCK_JOB_READY"] == {
            "device": "c", "len": ABOVE_BASE, "offset": ABOVE_BASE, "speed": 0, "type": "commit",
        }
        data = {"device": "c", "len": ABOVE_BASE, "offset": ABOVE_BASE, "speed": 0, "type": "commit"}
        assert await cancel_in_ready(c, ev, "c", how) == data
        assert await export_node(c, "e0") == "top"
        assert (await nodes_by_name(c))["top"]["backing_file"] == path(tmp, "mid")
        verify_export(sock, seed_runs(LAYERS, SIZE))
    d.expect_exit = True
    assert d.stop() is None
    compare(ref(tmp), tmp / "top.qcow2")
    # Both ways, base took the data of mid and top (the base of an active commit
    # defaults to the bottom of the chain).
    assert read_disk(tmp / "base.qcow2", tmp) == bytes(expected_disk(LAYERS, SIZE))
    for n in ("base", "mid", "top"):
        check_clean(tmp / f"{n}.qcow2")

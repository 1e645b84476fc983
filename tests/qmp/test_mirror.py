"""blockdev-mirror and drive-mirror over QMP, on a qcow2 chain (base <- top, top
exported): the ready state, block-job-complete pivoting the export onto the target
under guest I/O in both copy modes, the three ways of cancelling (a soft cancel in
ready completes without the pivot), sync=full|top|none, the mirror_top filter and
its filter-node-name, drive-mirror creating its target (sync=top: the source's backing
file becomes the target's), query-block-jobs, on-target-error (stop, report) with a
blkdebug target, and the arguments' errors with QEMU's
texts in QEMU's order. Data is read back through the export (vubd-io) and, once the
daemon has quit, from the files (qemu-img compare, check). Every expectation is
qemu-storage-daemon 7.2's (the tests pass with ``--daemon=qsd``)."""

import asyncio
import pytest

from chains import (
    CANCEL_WAYS,
    COMPLETED,
    KIB,
    PivotUnderIo,
    JobEvents,
    backing_of,
    block_job,
    cancel_in_ready,
    chain_args,
    check_clean,
    compare,
    expected_disk,
    export_node,
    img_map,
    make_chain,
    nodes_by_name,
    pattern,
    qemu_img,
    run,
    read_disk,
    seed_runs,
    verb_error,
    verify_export,
    write_pattern,
    write_raw,
)
from conftest import MIB, error, execute, export_args, io_ok

SIZE = 4 * MIB
BASE = ("base", [(0, SIZE, 1)])
TOP = ("top", [(MIB, 64 * KIB, 2), (2 * MIB + 64 * KIB, 128 * KIB, 3)])
LAYERS = [BASE, TOP]
#: What top holds itself (what sync=top copies).
IN_TOP = 192 * KIB

DONE = COMPLETED
START = ["created", "running", "ready", "BLOCK_JOB_READY"]


def blank(tmp, name, size=SIZE):
    img = tmp / f"{name}.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, size)
    return ["--blockdev", f"file,node-name={name}-file,filename={img}",
            "--blockdev", f"qcow2,node-name={name},file={name}-file"]


def setup(start_daemon, tmp, extra=(), export_extra=""):
    make_chain(tmp, LAYERS, SIZE)
    sock = tmp / "d-e0.sock"
    args = chain_args(tmp, ["base", "top"]) + blank(tmp, "tgt")
    d = start_daemon(args + list(extra) + export_args("e0", "top", sock, extra=export_extra))
    return d, sock


def ref(tmp):
    return write_raw(tmp / "ref.raw", expected_disk(LAYERS, SIZE))


def info(jid, n, kind="mirror"):
    return {"device": jid, "len": n, "offset": n, "speed": 0, "type": kind}


# ---------------------------------------------------------------------------------------
# blockdev-mirror: pivot


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
async def test_mirror_pivot_under_io(start_daemon, tmp, io_procs, mode):
    """Full mirror of the exported top to a blank qcow2 while a frontend writes and
    verifies through the export: ready, then block-job-complete pivots the export to
    the target with no I/O error and no lost write; the mirror_top filter is there,
    under its filter-node-name, while the job runs and gone after it."""
    d, sock = setup(start_daemon, tmp, export_extra=",num-queues=2")
    p = PivotUnderIo(tmp, sock, io_procs, (3 * MIB, 256 * KIB, 4), (3 * MIB + 256 * KIB, 256 * KIB, 5),
                     (3 * MIB + 512 * KIB, 256 * KIB, 6), seconds=4, span=2 * MIB)
    await p.start()
    async with d.qmp() as c:
        ev = JobEvents(c)
        assert await execute(c, "blockdev-mirror", {
            "job-id": "m", "device": "top", "target": "tgt", "sync": "full",
            "filter-node-name": "mt", "copy-mode": mode,
        }) == {}
        assert await ev.until("m", "BLOCK_JOB_READY") == START
        rd = ev.data["BLOCK_JOB_READY"]
        # Under guest writes QEMU's write-blocking mirror may count a write still on
        # its way in len: offset may be a little behind.
        assert rd == {**info("m", rd["len"]), "offset": rd["offset"]}, rd
        assert rd["len"] >= SIZE and rd["len"] - rd["offset"] < 64 * KIB, rd
        nodes = await nodes_by_name(c)
        assert nodes["mt"]["drv"] == "mirror_top", nodes["mt"]
        assert await export_node(c, "e0") == "mt"
        bj = await block_job(c, "m")
        assert (bj["type"], bj["status"], bj["ready"], bj["paused"], bj["io-status"]) == (
            "mirror", "ready", True, False, "ok"), bj
        for verb in ("finalize", "dismiss"):
            await error(c, f"job-{verb}", {"id": "m"}, desc=verb_error("m", "ready", verb))
        p.write(p.b)
        cd = await p.complete(c, ev, "m", "tgt")
        assert cd == info("m", cd["len"]), cd
        assert "mt" not in await nodes_by_name(c)
        assert await execute(c, "query-block-jobs") == []
    d.expect_exit = True
    assert d.stop() is None
    data = read_disk(tmp / "tgt.qcow2", tmp)
    for off, n, seed in (p.a, p.b, p.c, *LAYERS[1][1]):
        if off >= 2 * MIB:
            assert data[off:off + n] == pattern(seed, off, n), (off, n, seed)
    assert data[2 * MIB + 512 * KIB:3 * MIB] == pattern(1, 2 * MIB + 512 * KIB, 512 * KIB)
    check_clean(tmp / "tgt.qcow2")
    check_clean(tmp / "top.qcow2")


# ---------------------------------------------------------------------------------------
# Cancelling


@pytest.mark.parametrize("how", CANCEL_WAYS)
async def test_mirror_cancel_in_ready(start_daemon, tmp, how):
    """block-job-cancel of a ready mirror completes it without the pivot
    (BLOCK_JOB_COMPLETED; the target is a full copy); with force, or job-cancel, it is
    cancelled (BLOCK_JOB_CANCELLED). The export stays on top either way."""
    d, sock = setup(start_daemon, tmp)
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "blockdev-mirror", {"job-id": "m", "device": "top", "target": "tgt", "sync": "full"})
        assert await ev.until("m", "BLOCK_JOB_READY") == START
        # A target opened with discard=ignore cannot be zeroed by unmapping: all of
        # it is copied.
        assert ev.data["BLOCK_JOB_READY"] == info("m", SIZE)
        assert await cancel_in_ready(c, ev, "m", how) == info("m", SIZE)
        assert await export_node(c, "e0") == "top"
        assert set(await nodes_by_name(c)) == {"base", "base-file", "top", "top-file", "tgt", "tgt-file"}
        verify_export(sock, seed_runs(LAYERS, SIZE))
    d.expect_exit = True
    assert d.stop() is None
    compare(ref(tmp), tmp / "top.qcow2")
    compare(ref(tmp), tmp / "tgt.qcow2")
    check_clean(tmp / "tgt.qcow2")


async def test_mirror_cancel_while_running(start_daemon, tmp):
    """A mirror held back by its speed is cancelled before it is ready, and may not be
    completed meanwhile; query-block-jobs shows it running, with its speed."""
    d, sock = setup(start_daemon, tmp)
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "blockdev-mirror", {
            "job-id": "m", "device": "top", "target": "tgt", "sync": "full", "speed": 64 * KIB,
            "auto-dismiss": False,
        })
        assert await ev.until("m", "running") == ["created", "running"]
        # The job counts what it has to copy once it runs (QEMU's mirror_dirty_init,
        # in the job itself): len is 0 until then, in both daemons.
        for _ in range(100):
            bj = await block_job(c, "m")
            if bj["len"]:
                break
            await asyncio.sleep(0.05)
        assert (bj["type"], bj["status"], bj["ready"], bj["speed"], bj["auto-dismiss"]) == (
            "mirror", "running", False, 64 * KIB, False), bj
        assert bj["len"] == SIZE and bj["offset"] < SIZE, bj
        await error(c, "block-job-complete", {"device": "m"},
                    desc=verb_error("m", "running", "complete"))
        await execute(c, "block-job-cancel", {"device": "m"})
        assert await ev.until("m", "concluded") == ["aborting", "BLOCK_JOB_CANCELLED", "concluded"]
        bj = await block_job(c, "m")
        assert bj["status"] == "concluded" and bj["error"] == "Operation canceled", bj
        await execute(c, "job-dismiss", {"id": "m"})
        assert await ev.until("m", "null") == ["null"]
        assert await export_node(c, "e0") == "top"
        verify_export(sock, seed_runs(LAYERS, SIZE))


# ---------------------------------------------------------------------------------------
# sync modes and drive-mirror


async def test_drive_mirror_sync_top(start_daemon, tmp):
    """drive-mirror sync=top creates a qcow2 target whose backing file is base's image,
    copies only what top holds, and pivots: the export then reads top's data and
    base's through the new image."""
    d, sock = setup(start_daemon, tmp)
    dm = tmp / "dm.qcow2"
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "drive-mirror", {
            "job-id": "m", "device": "top", "target": str(dm), "sync": "top", "node-name": "dm",
        })
        assert await ev.until("m", "BLOCK_JOB_READY") == START
        assert ev.data["BLOCK_JOB_READY"] == info("m", IN_TOP)
        await execute(c, "block-job-complete", {"device": "m"})
        assert await ev.until("m", "null") == DONE
        assert await export_node(c, "e0") == "dm"
        nodes = await nodes_by_name(c)
        assert nodes["dm"]["backing_file"] == str(tmp / "base.qcow2"), nodes["dm"]
        verify_export(sock, seed_runs(LAYERS, SIZE))
    d.expect_exit = True
    assert d.stop() is None
    assert backing_of(dm) == str(tmp / "base.qcow2")
    compare(ref(tmp), dm)
    check_clean(dm)


@pytest.mark.parametrize("sync", ["full", "none"])
async def test_drive_mirror_full_and_none(start_daemon, tmp, sync):
    """drive-mirror sync=full makes a standalone copy of the whole chain; sync=none
    copies nothing at first (the new image's backing file is top's image) and then only
    what the guest writes."""
    d, sock = setup(start_daemon, tmp)
    dm = tmp / "dm.qcow2"
    w = (3 * MIB, 128 * KIB, 9)
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "drive-mirror", {
            "job-id": "m", "device": "top", "target": str(dm), "sync": sync, "node-name": "dm",
            "granularity": 4096, "buf-size": MIB,
        })
        assert await ev.until("m", "BLOCK_JOB_READY") == START
        n = SIZE if sync == "full" else 0
        assert ev.data["BLOCK_JOB_READY"] == info("m", n)
        io_ok("write", "--socket", sock, "--offset", w[0], "--len", w[1], "--seed", w[2])
        await execute(c, "block-job-complete", {"device": "m"})
        assert await ev.until("m", "null") == DONE
        # The write in ready was copied too.
        assert ev.data["BLOCK_JOB_COMPLETED"]["offset"] == n + w[1]
        assert await export_node(c, "e0") == "dm"
        verify_export(sock, seed_runs(LAYERS + [("w", [w])], SIZE))
    d.expect_exit = True
    assert d.stop() is None
    if sync == "full":
        assert backing_of(dm) is None
    else:
        assert backing_of(dm) == str(tmp / "top.qcow2")
    compare(write_raw(tmp / "ref.raw", expected_disk(LAYERS + [("w", [w])], SIZE)), dm)
    check_clean(dm)


# ---------------------------------------------------------------------------------------
# Errors


async def test_blockdev_mirror_errors(start_daemon, tmp):
    """QEMU's checks and texts, in its order."""
    d, _ = setup(start_daemon, tmp, extra=blank(tmp, "other"))
    m = {"job-id": "m", "device": "top", "target": "tgt", "sync": "full"}
    async with d.qmp() as c:
        cases = [
            ({"device": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
            ({"device": "top-file"}, "Need a root block node"),
            ({"target": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
            ({"granularity": 256}, "Parameter 'granularity' expects a value in range [512B, 64MB]"),
            ({"granularity": 3 * 4096}, "Parameter 'granularity' expects a power of 2"),
            ({"granularity": 256, "target": "base"}, "Parameter 'granularity' expects a value in range [512B, 64MB]"),
            ({"target": "base"}, "Node 'base' is busy: node is used as backing hd of 'top'"),
            ({"replaces": "nope"}, "Failed to find node with node-name='nope'"),
            ({"replaces": "base"}, "Node 'base' is busy: node is used as backing hd of 'top'"),
            ({"replaces": "other"}, "Cannot replace 'other' by a node mirrored from 'top', because it "
             "cannot be guaranteed that doing so would not lead to an abrupt change of visible data"),
            ({"sync": "bitmap"}, "Sync mode 'bitmap' not supported"),
            ({"sync": "incremental"}, "Sync mode 'incremental' not supported"),
            ({"buf-size": -1}, "Invalid parameter 'buf-size'"),
            ({"target": "top"}, "Can't mirror node into itself"),
            ({"filter-node-name": "base"}, "Duplicate nodes with node-name='base'"),
            ({"filter-node-name": "bad name"}, "Invalid node-name: 'bad name'"),
            ({"job-id": "bad id"}, "Invalid job ID 'bad id'"),
            ({"copy-mode": "x"}, "Parameter 'copy-mode' does not accept value 'x'"),
            ({"sync": "most"}, "Parameter 'sync' does not accept value 'most'"),
        ]
        for over, desc in cases:
            await error(c, "blockdev-mirror", {**m, **over}, desc=desc)
        no_id = dict(m)
        del no_id["job-id"]
        await error(c, "blockdev-mirror", no_id, desc="Invalid job ID ''")
        ev = JobEvents(c)
        await error(c, "blockdev-mirror", {**m, "speed": -1},
                    desc="Parameter 'speed' expects a non-negative value")
        assert await ev.until("m", "null") == ["created", "null"]
        # Nothing was left behind by the failed attempts.
        assert set(await nodes_by_name(c)) == {
            "base", "base-file", "top", "top-file", "tgt", "tgt-file", "other", "other-file"}
        assert await export_node(c, "e0") == "top"
        # While a mirror runs: its source is no longer a root node, its target busy.
        await execute(c, "blockdev-mirror", {**m, "speed": 64 * KIB})
        await error(c, "blockdev-mirror", {**m, "job-id": "m2"}, desc="Need a root block node")
        await error(c, "blockdev-mirror", {**m, "job-id": "m2", "device": "other"},
                    desc="Node 'tgt' is busy: block device is in use by block job: mirror")
        await execute(c, "block-job-cancel", {"device": "m", "force": True})
        assert await ev.until("m", "null") == [
            "created", "running", "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]


async def test_drive_mirror_errors(start_daemon, tmp):
    """drive-mirror's own checks: the format, a raw image with a backing file, a
    node-name for replaces, an existing image that is not there, a file that cannot be
    created; the node-name is checked once the image is created, as QEMU does."""
    d, _ = setup(start_daemon, tmp)
    m = {"job-id": "m", "device": "top", "target": str(tmp / "dm.qcow2"), "sync": "full"}
    async with d.qmp() as c:
        await error(c, "drive-mirror", {**m, "device": "nope"},
                    desc="Cannot find device='nope' nor node-name='nope'")
        await error(c, "drive-mirror", {**m, "format": "bogus"}, desc="Unknown file format 'bogus'")
        await error(c, "drive-mirror", {**m, "format": "raw", "sync": "top", "target": str(tmp / "dm.raw")},
                    desc="Backing file not supported for file format 'raw'")
        await error(c, "drive-mirror", {**m, "replaces": "top"},
                    desc="a node-name must be provided when replacing a named node of the graph")
        missing = tmp / "missing.qcow2"
        await error(c, "drive-mirror", {**m, "mode": "existing", "target": str(missing)},
                    desc=f"Could not open '{missing}': No such file or directory")
        nodir = tmp / "nodir" / "x.qcow2"
        await error(c, "drive-mirror", {**m, "target": str(nodir)},
                    desc=f"Could not create '{nodir}': No such file or directory")
        await error(c, "drive-mirror", {**m, "node-name": "bad name"}, desc="Invalid node-name: 'bad name'")
        assert (tmp / "dm.qcow2").exists()
        await error(c, "drive-mirror", {**m, "node-name": "base"}, desc="Duplicate nodes with node-name='base'")
        await error(c, "drive-mirror", {**m, "filter-node-name": "f"},
                    cls="GenericError", desc="Parameter 'filter-node-name' is unexpected")
        assert set(await nodes_by_name(c)) == {"base", "base-file", "top", "top-file", "tgt", "tgt-file"}


# ---------------------------------------------------------------------------------------
# on-target-error


def failing_target(tmp):
    """A qcow2 target over blkdebug whose first data write fails with EIO."""
    img = tmp / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, SIZE)
    return ["--blockdev", f"file,node-name=bad-file,filename={img}",
            "--blockdev", "blkdebug,node-name=bad-dbg,image=bad-file,inject-error.0.event=write_aio,"
            "inject-error.0.errno=5,inject-error.0.once=on",
            "--blockdev", "qcow2,node-name=bad,file=bad-dbg"]


@pytest.mark.parametrize("policy", ["stop", "report"])
async def test_mirror_on_target_error(start_daemon, tmp, policy):
    """A failed write to the target: BLOCK_JOB_ERROR (operation write); with stop the
    job pauses (io-status failed) and, resumed, copies the range again and gets ready;
    with report it ends with the error."""
    d, sock = setup(start_daemon, tmp, extra=failing_target(tmp))
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "blockdev-mirror", {
            "job-id": "m", "device": "top", "target": "bad", "sync": "top", "on-target-error": policy,
        })
        err = await ev.event("BLOCK_JOB_ERROR")
        assert err["data"] == {"device": "m", "operation": "write", "action": policy}, err
        if policy == "stop":
            assert await ev.until("m", "paused") == ["created", "running", "paused"]
            bj = await block_job(c, "m")
            assert (bj["status"], bj["paused"], bj["io-status"]) == ("paused", True, "failed"), bj
            assert bj["offset"] < bj["len"] == IN_TOP, bj
            await execute(c, "block-job-resume", {"device": "m"})
            assert await ev.until("m", "BLOCK_JOB_READY") == ["running", "ready", "BLOCK_JOB_READY"]
            assert ev.data["BLOCK_JOB_READY"] == info("m", IN_TOP)
            assert (await block_job(c, "m"))["io-status"] == "ok"
            await execute(c, "block-job-complete", {"device": "m"})
            assert await ev.until("m", "null") == DONE
            assert await export_node(c, "e0") == "bad"
            # sync=top to a target without a backing file: top's own data only.
            verify_export(sock, TOP[1])
        else:
            assert await ev.until("m", "null") == [
                "created", "running", "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null"]
            assert ev.data["BLOCK_JOB_COMPLETED"]["error"] == "Input/output error"
            assert await export_node(c, "e0") == "top"


@pytest.mark.parametrize("policy", ["report", "stop", "ignore"])
async def test_write_blocking_target_error_on_the_guest_write(start_daemon, tmp, policy):
    """In write-blocking mode a guest write that the target fails meets on-target-error
    itself (BLOCK_JOB_ERROR, operation write), as QEMU's active write does: the guest
    sees success (the source took it), and the error is reported even though the
    target fails only once (a later copy of the range would succeed and hide it). With
    report the job ends with the error; with stop it pauses and, resumed, copies the
    range again; with ignore it goes on. A sync=none job copies nothing by itself, so
    the only target write is the guest's."""
    d, sock = setup(start_daemon, tmp, extra=failing_target(tmp))
    w = (3 * MIB, 64 * KIB, 11)
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "blockdev-mirror", {
            "job-id": "m", "device": "top", "target": "bad", "sync": "none",
            "copy-mode": "write-blocking", "on-target-error": policy,
        })
        assert await ev.until("m", "BLOCK_JOB_READY") == START
        io_ok("write", "--socket", sock, "--offset", w[0], "--len", w[1], "--seed", w[2])
        err = await ev.event("BLOCK_JOB_ERROR")
        assert err["data"] == {"device": "m", "operation": "write", "action": policy}, err
        if policy == "report":
            assert await ev.until("m", "null") == [
                "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null"]
            assert ev.data["BLOCK_JOB_COMPLETED"]["error"] == "Input/output error"
            assert await export_node(c, "e0") == "top"
            return
        if policy == "stop":
            assert await ev.until("m", "standby") == ["standby"]
            bj = await block_job(c, "m")
            assert (bj["status"], bj["paused"], bj["io-status"]) == ("standby", True, "failed"), bj
            await execute(c, "block-job-resume", {"device": "m"})
            assert await ev.until("m", "ready") == ["ready"]
        await execute(c, "block-job-complete", {"device": "m"})
        assert await ev.until("m", "null") == DONE
        assert await export_node(c, "e0") == "bad"
        # The range the target failed was copied again: the export (now the target,
        # which has no backing file) reads the guest's write there.
        verify_export(sock, [w])


async def test_complete_while_paused(start_daemon, tmp):
    """block-job-complete on a paused ready mirror (standby) is accepted, as QEMU 7.2's
    verb table allows: the job stays paused and pivots once resumed. A mirror paused
    before it is ready (paused) refuses it with QEMU's text."""
    d, sock = setup(start_daemon, tmp)
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "blockdev-mirror", {
            "job-id": "slow", "device": "top", "target": "tgt", "sync": "full", "speed": 64 * KIB,
        })
        assert await ev.until("slow", "running") == ["created", "running"]
        await execute(c, "block-job-pause", {"device": "slow"})
        assert await ev.until("slow", "paused") == ["paused"]
        await error(c, "block-job-complete", {"device": "slow"},
                    desc=verb_error("slow", "paused", "complete"))
        await execute(c, "block-job-cancel", {"device": "slow", "force": True})
        assert await ev.until("slow", "null") == [
            "running", "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]

        await execute(c, "blockdev-mirror", {"job-id": "m", "device": "top", "target": "tgt", "sync": "full"})
        assert await ev.until("m", "BLOCK_JOB_READY") == START
        await execute(c, "block-job-pause", {"device": "m"})
        assert await ev.until("m", "standby") == ["standby"]
        assert await execute(c, "block-job-complete", {"device": "m"}) == {}
        assert await ev.quiet("m") == []
        bj = await block_job(c, "m")
        assert (bj["status"], bj["paused"]) == ("standby", True), bj
        # Not pivoted yet: the export is still on the mirror_top filter.
        assert await export_node(c, "e0") not in ("top", "tgt")
        await execute(c, "block-job-resume", {"device": "m"})
        assert await ev.until("m", "null") == ["ready"] + DONE
        assert await export_node(c, "e0") == "tgt"
        verify_export(sock, seed_runs(LAYERS, SIZE))


async def test_mirror_buf_size_of_one_granule(start_daemon, tmp):
    """A mirror whose buffer holds one granule (buf-size rounded up to the granularity,
    as QEMU rounds it) copies one granule at a time and still converges, completes and
    leaves a target equal to the source."""
    d, sock = setup(start_daemon, tmp)
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "blockdev-mirror", {
            "job-id": "m", "device": "top", "target": "tgt", "sync": "full",
            "granularity": 4096, "buf-size": 1,
        })
        assert await ev.until("m", "BLOCK_JOB_READY") == START
        assert ev.data["BLOCK_JOB_READY"] == info("m", SIZE)
        await execute(c, "block-job-complete", {"device": "m"})
        assert await ev.until("m", "null") == DONE
        assert await export_node(c, "e0") == "tgt"
    d.expect_exit = True
    assert d.stop() is None
    compare(ref(tmp), tmp / "tgt.qcow2")
    check_clean(tmp / "tgt.qcow2")


async def test_drive_mirror_existing_target_backing(start_daemon, tmp):
    """drive-mirror mode=existing probes the image's format and opens it without the
    backing file its header names (QEMU's BDRV_O_NO_BACKING) while the job runs; when
    the job completes that backing file is opened (a node of its own) and the export,
    pivoted to the image, reads top's data and base's through it."""
    make_chain(tmp, LAYERS, SIZE)
    sock = tmp / "d-e0.sock"
    # base read-only: the backing file opened at the end shares it (image locks).
    args = chain_args(tmp, ["base", "top"], {"base": "read-only=on"})
    args[1] += ",read-only=on"
    d = start_daemon(args + export_args("e0", "top", sock))
    dm = tmp / "dm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", tmp / "base.qcow2", "-F", "qcow2", dm, SIZE)
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "drive-mirror", {
            "job-id": "m", "device": "top", "target": str(dm), "sync": "top", "mode": "existing",
            "node-name": "dm",
        })
        assert await ev.until("m", "BLOCK_JOB_READY") == START
        assert ev.data["BLOCK_JOB_READY"] == info("m", IN_TOP)
        n = (await nodes_by_name(c))["dm"]
        assert (n["drv"], n["backing_file_depth"]) == ("qcow2", 0), n
        assert "backing-image" not in n["image"], n
        before = set(await nodes_by_name(c))
        await execute(c, "block-job-complete", {"device": "m"})
        assert await ev.until("m", "null") == DONE
        assert await export_node(c, "e0") == "dm"
        nodes = await nodes_by_name(c)
        assert nodes["dm"]["backing_file"] == str(tmp / "base.qcow2"), nodes["dm"]
        # Nodes of its own (the image and its file), not the source's base.
        new = set(nodes) - before
        assert len(new) == 2 and all(n.startswith("#") for n in new), (before, set(nodes))
        verify_export(sock, seed_runs(LAYERS, SIZE))
    d.expect_exit = True
    assert d.stop() is None
    compare(ref(tmp), dm)
    check_clean(dm)


@pytest.mark.parametrize("unmap", [True, False])
async def test_drive_mirror_unmap(start_daemon, tmp, unmap):
    """A full mirror into an existing image zeroes what the source does not hold; with
    unmap=true (the default) the target's clusters there are unmapped (zero, no data,
    no host offset), with unmap=false they are written as zeroes and stay allocated
    (zero, with a host offset), per qemu-img map. The target is opened with the
    source's discard=unmap, as QEMU opens it with the source's flags."""
    src, dm = tmp / "src.qcow2", tmp / "dm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, SIZE)
    qemu_img("create", "-q", "-f", "qcow2", dm, SIZE)
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {MIB}", src)
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 9 0 {SIZE}", dm)
    d = start_daemon([
        "--blockdev", f"file,node-name=src-file,filename={src}",
        "--blockdev", "qcow2,node-name=src,file=src-file,discard=unmap",
    ])
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "drive-mirror", {
            "job-id": "m", "device": "src", "target": str(dm), "sync": "full", "mode": "existing",
            "unmap": unmap,
        })
        assert await ev.until("m", "BLOCK_JOB_READY") == START
        await execute(c, "block-job-cancel", {"device": "m"})
        assert await ev.until("m", "null") == DONE
    d.expect_exit = True
    assert d.stop() is None
    compare(src, dm)
    check_clean(dm)
    rest = [e for e in img_map(dm) if e["start"] >= MIB]
    assert sum(e["length"] for e in rest) == SIZE - MIB, rest
    for e in rest:
        assert (e["data"], e["zero"], "offset" in e) == (False, True, not unmap), rest


@pytest.mark.parametrize("job_kind", ["background", "write-blocking", "active-commit"])
async def test_job_bitmaps_are_listed(start_daemon, tmp, job_kind):
    """A mirror's (and an active commit's) own dirty bitmap is listed in its source's
    dirty-bitmaps while the job runs, without a name, as QEMU lists it: recording
    (but for a write-blocking mirror, whose bitmap the mirror keeps itself), not
    persistent, not busy, with its granularity and what is still dirty; gone once
    the job has ended."""
    d, sock = setup(start_daemon, tmp)
    async with d.qmp() as c:
        ev = JobEvents(c)
        if job_kind == "active-commit":
            await execute(c, "block-commit", {"job-id": "m", "device": "top"})
            gran = 64 * KIB
        else:
            await execute(c, "blockdev-mirror", {
                "job-id": "m", "device": "top", "target": "tgt", "sync": "full",
                "granularity": 4096, "copy-mode": job_kind,
            })
            gran = 4096
        await ev.until("m", "BLOCK_JOB_READY")
        bitmaps = (await nodes_by_name(c))["top"].get("dirty-bitmaps")
        assert bitmaps == [{"recording": job_kind != "write-blocking", "persistent": False,
                            "busy": False, "granularity": gran, "count": 0}], bitmaps
        # A write the job has not copied yet is counted (the job is paused).
        if job_kind == "background":
            await execute(c, "block-job-pause", {"device": "m"})
            assert await ev.until("m", "standby") == ["standby"]
            io_ok("write", "--socket", sock, "--offset", MIB, "--len", 4096, "--seed", 5)
            bitmaps = (await nodes_by_name(c))["top"]["dirty-bitmaps"]
            assert [b["count"] for b in bitmaps] == [4096], bitmaps
            await execute(c, "block-job-resume", {"device": "m"})
        await execute(c, "block-job-cancel", {"device": "m", "force": True})
        await ev.until("m", "null")
        assert "dirty-bitmaps" not in (await nodes_by_name(c))["top"]


def failing_source(tmp):
    """A qcow2 source (not exported) over blkdebug whose first data read fails with
    EIO, holding seed 4 over its first MiB."""
    img = tmp / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, SIZE)
    write_pattern(img, "qcow2", [(0, MIB, 4)])
    return ["--blockdev", f"file,node-name=src-file,filename={img}",
            "--blockdev", "blkdebug,node-name=src-dbg,image=src-file,inject-error.0.event=read_aio,"
            "inject-error.0.errno=5,inject-error.0.once=on",
            "--blockdev", "qcow2,node-name=src,file=src-dbg"]


@pytest.mark.parametrize("policy", ["report", "ignore", "stop"])
async def test_mirror_on_source_error(start_daemon, tmp, policy):
    """A failed read of the source: BLOCK_JOB_ERROR (operation read, the
    on-source-error action); with report the job ends with the error; with ignore the
    range stays dirty and is copied again; with stop the job pauses (io-status failed)
    and, resumed, copies it again. Either way the target then equals the source."""
    d, _ = setup(start_daemon, tmp, extra=failing_source(tmp))
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "blockdev-mirror", {
            "job-id": "m", "device": "src", "target": "tgt", "sync": "full",
            "on-source-error": policy,
        })
        err = await ev.event("BLOCK_JOB_ERROR")
        assert err["data"] == {"device": "m", "operation": "read", "action": policy}, err
        if policy == "report":
            assert await ev.until("m", "null") == [
                "created", "running", "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null"]
            assert ev.data["BLOCK_JOB_COMPLETED"]["error"] == "Input/output error"
            return
        if policy == "stop":
            assert await ev.until("m", "paused") == ["created", "running", "paused"]
            bj = await block_job(c, "m")
            assert (bj["status"], bj["io-status"]) == ("paused", "failed"), bj
            await execute(c, "block-job-resume", {"device": "m"})
        assert (await ev.until("m", "BLOCK_JOB_READY"))[-2:] == ["ready", "BLOCK_JOB_READY"]
        await execute(c, "block-job-cancel", {"device": "m"})
        assert await ev.until("m", "null") == DONE
    d.expect_exit = True
    assert d.stop() is None
    compare(tmp / "src.qcow2", tmp / "tgt.qcow2")


async def test_mirror_replaces_a_node_below_a_filter(start_daemon, tmp):
    """replaces names a node below the source through filters only (here top, under a
    copy-on-read filter that the export uses): at completion the target takes top's
    place under the filter, and top, used by nothing any more, can be deleted."""
    make_chain(tmp, LAYERS, SIZE)
    sock = tmp / "d-e0.sock"
    d = start_daemon(chain_args(tmp, ["base", "top"]) + blank(tmp, "tgt")
                     + ["--blockdev", "copy-on-read,node-name=cor,file=top"]
                     + export_args("e0", "cor", sock))
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "blockdev-mirror", {
            "job-id": "m", "device": "cor", "target": "tgt", "sync": "full", "replaces": "top",
        })
        assert await ev.until("m", "BLOCK_JOB_READY") == START
        await execute(c, "block-job-complete", {"device": "m"})
        assert await ev.until("m", "null") == DONE
        assert await export_node(c, "e0") == "cor"
        # QEMU names the filter's file by a json: description that holds it.
        assert str(tmp / "tgt.qcow2") in (await nodes_by_name(c))["cor"]["file"]
        assert await execute(c, "blockdev-del", {"node-name": "top"}) == {}
        verify_export(sock, seed_runs(LAYERS, SIZE))
    d.expect_exit = True
    assert d.stop() is None
    compare(ref(tmp), tmp / "tgt.qcow2")


async def test_mirror_writes_zero_clusters_as_zeroes(start_daemon, tmp):
    """What the source holds as zero clusters is written to the target as zeroes (QEMU's
    MIRROR_METHOD_ZERO), not read and written as data: the target holds no data there,
    per qemu-img map."""
    src, dm = tmp / "src.qcow2", tmp / "dm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, SIZE)
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {MIB}", "-c", f"write -z {MIB} {2 * MIB}", src)
    assert [e["zero"] for e in img_map(src) if e["start"] == MIB] == [True]
    d = start_daemon([
        "--blockdev", f"file,node-name=src-file,filename={src}",
        "--blockdev", "qcow2,node-name=src,file=src-file",
    ])
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "drive-mirror", {
            "job-id": "m", "device": "src", "target": str(dm), "sync": "full",
        })
        assert await ev.until("m", "BLOCK_JOB_READY") == START
        await execute(c, "block-job-cancel", {"device": "m"})
        assert await ev.until("m", "null") == DONE
    d.expect_exit = True
    assert d.stop() is None
    compare(src, dm)
    check_clean(dm)
    m = img_map(dm)
    assert [e["data"] for e in m if e["start"] < MIB] == [True], m
    rest = [e for e in m if e["start"] >= MIB]
    assert rest and not any(e["data"] for e in rest), m

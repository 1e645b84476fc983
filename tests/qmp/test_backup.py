"""blockdev-backup and drive-backup over QMP, the copy-before-write filter they put
above the source, and snapshot-access (image fleecing): the disk as it was when the job
started reaches the target while a frontend keeps writing; sync=full|top|none; the job
events and query-block-jobs fields; the argument checks in QEMU 7.2's order and texts.
Every expectation is qemu-storage-daemon 7.2's (the tests pass with ``--daemon=qsd``).

Jobs that must stay running are started with ``speed=1``: one chunk is copied, then the
rate limit holds the job in ``running`` until the test sets the speed to 0."""

import asyncio
import json
import os
import shutil
import signal

import pytest

from chains import (
    BLOCK_JOB_INFO_KEYS,
    KIB,
    JobEvents,
    block_job,
    chain_args,
    compare,
    expected_disk,
    make_chain,
    nodes_by_name,
    pattern,
    qemu_img,
    read_disk,
    write_raw,
)
from conftest import (
    MIB,
    IoProc,
    error,
    execute,
    export_args,
    file_raw_args,
    io_ok,
    make_image,
    vubd_io,
)

SIZE = 4 * MIB
#: QEMU runs the command as a transaction in a drained section: the new job pauses
#: at once and resumes when the section ends.
START = ["created", "running", "paused", "running"]
DONE = START + ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
CANCELLED = START + ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]


def setup(start_daemon, tmp, target_size=SIZE, extra=()):
    """Source n0 (raw, exported as e0), target t0 (raw, same size unless told)."""
    args = file_raw_args(tmp, "n0", SIZE) + file_raw_args(tmp, "t0", target_size)
    return start_daemon(args + export_args("e0", "n0", tmp / "d-e0.sock") + list(extra))


def sock(tmp, eid="e0"):
    return tmp / f"d-{eid}.sock"


def write(tmp, off, n, seed, eid="e0"):
    io_ok("write", "--socket", sock(tmp, eid), "--offset", off, "--len", n, "--seed", seed)


def verify(tmp, off, n, seed, eid="e0"):
    io_ok("verify", "--socket", sock(tmp, eid), "--offset", off, "--len", n, "--seed", seed)


async def test_full_backup_keeps_the_disk_as_it_was_at_the_start(start_daemon, tmp):
    d = setup(start_daemon, tmp)
    write(tmp, 0, SIZE, 1)
    async with d.qmp() as c:
        ev = JobEvents(c)
        args = {"job-id": "b", "device": "n0", "target": "t0", "sync": "full", "speed": 1}
        assert await execute(c, "blockdev-backup", args) == {}
        assert await ev.until("b", "running") == ["created", "running"]
        assert await ev.until("b", "running") == ["paused", "running"]
        info = await block_job(c, "b")
        assert set(info) == BLOCK_JOB_INFO_KEYS
        assert (info["type"], info["len"], info["speed"], info["status"]) == (
            "backup", SIZE, 1, "running",
        )
        # Guest writes while the job runs: their old data goes to the target first.
        write(tmp, MIB, 64 * KIB, 2)
        write(tmp, SIZE - 4 * KIB, 4 * KIB, 3)
        assert await execute(c, "block-job-set-speed", {"device": "b", "speed": 0}) == {}
        assert await ev.until("b", "null") == DONE[len(START):]
        assert ev.data["BLOCK_JOB_COMPLETED"] == {
            "device": "b", "len": SIZE, "offset": SIZE, "speed": 0, "type": "backup",
        }
        # The filter is gone again; the guest's data stays on the source.
        assert set(await nodes_by_name(c)) == {"n0", "n0-file", "t0", "t0-file"}
        verify(tmp, MIB, 64 * KIB, 2)
    ref = write_raw(tmp / "ref.raw", pattern(1, 0, SIZE))
    compare(ref, tmp / "t0.img")


async def test_filter_node_name_and_busy_target(start_daemon, tmp):
    d = setup(start_daemon, tmp, extra=file_raw_args(tmp, "n1", SIZE) + file_raw_args(tmp, "n2", SIZE))
    async with d.qmp() as c:
        ev = JobEvents(c)
        args = {"job-id": "b", "device": "n0", "target": "t0", "sync": "full", "speed": 1,
                "filter-node-name": "cbw0"}
        assert await execute(c, "blockdev-backup", args) == {}
        nodes = await nodes_by_name(c)
        assert nodes["cbw0"]["drv"] == "copy-before-write"
        await error(c, "blockdev-backup",
                    {"job-id": "b2", "device": "n1", "target": "t0", "sync": "full"},
                    desc="Node 't0' is busy: block device is in use by block job: backup")
        await error(c, "blockdev-backup",
                    {"job-id": "b", "device": "n1", "target": "n2", "sync": "full"},
                    desc="Job ID 'b' already in use")
        assert await execute(c, "block-job-cancel", {"device": "b"}) == {}
        # Each command, even one that fails, drains every node: the job pauses and
        # resumes each time.
        blips = ["paused", "running"] * 2
        assert await ev.until("b", "null") == START + blips + CANCELLED[len(START):]
        assert ev.data["BLOCK_JOB_CANCELLED"]["type"] == "backup"
        assert "cbw0" not in await nodes_by_name(c)


async def test_sync_none_copies_only_what_the_guest_overwrites(start_daemon, tmp):
    d = setup(start_daemon, tmp)
    write(tmp, 0, SIZE, 1)
    async with d.qmp() as c:
        ev = JobEvents(c)
        args = {"job-id": "b", "device": "n0", "target": "t0", "sync": "none"}
        assert await execute(c, "blockdev-backup", args) == {}
        assert await ev.until("b", "running") == ["created", "running"]
        assert await ev.until("b", "running") == ["paused", "running"]
        write(tmp, 2 * MIB, 4 * KIB, 2)
        # sync=none never ends by itself.
        assert await ev.quiet("b", 0.5) == []
        assert await execute(c, "block-job-cancel", {"device": "b"}) == {}
        assert await ev.until("b", "null") == CANCELLED[len(START):]
        assert ev.data["BLOCK_JOB_CANCELLED"]["offset"] == 64 * KIB
    data = (tmp / "t0.img").read_bytes()
    # The 64 KiB cluster around the write holds the old data; the rest was not copied.
    assert data[2 * MIB:2 * MIB + 64 * KIB] == pattern(1, 2 * MIB, 64 * KIB)
    assert data[:2 * MIB] == bytes(2 * MIB)
    assert data[2 * MIB + 64 * KIB:] == bytes(SIZE - 2 * MIB - 64 * KIB)


LAYERS = [("base", [(0, SIZE, 1)]), ("top", [(MIB, 64 * KIB, 2), (3 * MIB, 128 * KIB, 3)])]


async def test_sync_top_copies_the_top_layer_only(start_daemon, tmp):
    imgs = make_chain(tmp, LAYERS, SIZE)
    tgt = tmp / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", imgs["base"], "-F", "qcow2", tgt, SIZE)
    args = chain_args(tmp, ["base", "top"]) + [
        "--blockdev", f"file,node-name=tgt-file,filename={tgt}",
        "--blockdev", "qcow2,node-name=tgt,file=tgt-file,backing=base",
    ] + export_args("e0", "top", tmp / "d-e0.sock")
    d = start_daemon(args)
    async with d.qmp() as c:
        ev = JobEvents(c)
        args = {"job-id": "b", "device": "top", "target": "tgt", "sync": "top"}
        assert await execute(c, "blockdev-backup", args) == {}
        assert await ev.until("b", "null") == DONE
        assert ev.data["BLOCK_JOB_COMPLETED"]["len"] == 192 * KIB
        assert ev.data["BLOCK_JOB_COMPLETED"]["offset"] == 192 * KIB
        # Closed, so that its metadata is on disk.
        for n in ("tgt", "tgt-file"):
            assert await execute(c, "blockdev-del", {"node-name": n}) == {}
    assert read_disk(tgt, tmp) == bytes(expected_disk(LAYERS, SIZE))
    m = {(e["start"], e["depth"]) for e in json.loads(
        qemu_img("map", "-U", "--output=json", tgt)) if e["data"]}
    assert (MIB, 0) in m and (0, 1) in m


async def test_drive_backup_creates_the_target(start_daemon, tmp):
    d = setup(start_daemon, tmp)
    write(tmp, 0, SIZE, 4)
    async with d.qmp() as c:
        ev = JobEvents(c)
        for fmt in ("qcow2", "raw"):
            target = tmp / f"drive.{fmt}"
            args = {"job-id": "b", "device": "n0", "target": str(target), "sync": "full",
                    "format": fmt}
            assert await execute(c, "drive-backup", args) == {}
            assert await ev.until("b", "null") == DONE
            compare(tmp / "n0.img", target)
        assert set(await nodes_by_name(c)) == {"n0", "n0-file", "t0", "t0-file"}
        await error(c, "drive-backup",
                    {"device": "n0", "target": str(tmp / "nosuch.img"), "sync": "full",
                     "mode": "existing", "format": "raw", "job-id": "b"},
                    desc=f"Could not open '{tmp / 'nosuch.img'}': No such file or directory")


async def test_fleecing_through_snapshot_access(start_daemon, tmp):
    """Image fleecing: copy-before-write above the source (exported), snapshot-access
    above it on a second, read-only export: that export keeps reading the disk as it
    was while the first one writes."""
    make_image(tmp / "fl.img", SIZE)
    args = file_raw_args(tmp, "n0", SIZE)
    write_raw(tmp / "n0.img", pattern(1, 0, SIZE))
    args += [
        "--blockdev", f"file,node-name=fl,filename={tmp / 'fl.img'}",
        "--blockdev", "copy-before-write,node-name=cbw,file=n0,target=fl",
        "--blockdev", "snapshot-access,node-name=acc,file=cbw",
    ] + export_args("e0", "cbw", sock(tmp)) + export_args(
        "e1", "acc", sock(tmp, "e1"), writable=False)
    d = start_daemon(args)
    async with d.qmp() as c:
        nodes = await nodes_by_name(c)
        assert nodes["acc"]["drv"] == "snapshot-access"
        assert nodes["cbw"]["drv"] == "copy-before-write"
        write(tmp, 0, MIB, 5)
        write(tmp, 3 * MIB + 512, 4 * KIB, 6)
        verify(tmp, 0, MIB, 5)
        verify(tmp, 3 * MIB + 512, 4 * KIB, 6)
        # The view on e1 is the disk as it was when the filter was opened. (Read in
        # pieces that are either all copied or all not: QEMU 7.2's hbitmap_status
        # gets a range that starts copied and ends not copied wrong, and reads the
        # copied part from the source.)
        for off, n in ((0, MIB), (MIB, 2 * MIB), (3 * MIB, 64 * KIB),
                       (3 * MIB + 64 * KIB, MIB - 64 * KIB)):
            io_ok("verify", "--socket", sock(tmp, "e1"), "--offset", off, "--len", n,
                  "--seed", 1, "--read-only", "on")
    # Only the clusters written were copied to the fleecing image.
    fl = (tmp / "fl.img").read_bytes()
    assert fl[:MIB] == pattern(1, 0, MIB)
    assert fl[3 * MIB:3 * MIB + 64 * KIB] == pattern(1, 3 * MIB, 64 * KIB)
    assert fl[MIB:3 * MIB] == bytes(2 * MIB)


@pytest.mark.parametrize("args, desc", [
    ({"device": "nosuch", "target": "t0", "sync": "full"},
     "Cannot find device='nosuch' nor node-name='nosuch'"),
    ({"device": "n0", "target": "nosuch", "sync": "full"},
     "Cannot find device='nosuch' nor node-name='nosuch'"),
    ({"device": "n0", "target": "t0"}, "Parameter 'sync' is missing"),
    ({"device": "n0", "target": "t0", "sync": "sometimes"},
     "Parameter 'sync' does not accept value 'sometimes'"),
    ({"device": "n0", "target": "t0", "sync": "bitmap"},
     "must provide a valid bitmap name for 'bitmap' sync mode"),
    ({"device": "n0", "target": "t0", "sync": "incremental", "bitmap-mode": "never"},
     "must provide a valid bitmap name for 'incremental' sync mode"),
    ({"device": "n0", "target": "t0", "sync": "incremental", "bitmap": "b0",
      "bitmap-mode": "never"},
     "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
    ({"device": "n0", "target": "t0", "sync": "bitmap", "bitmap": "b0",
      "bitmap-mode": "always"},
     "Bitmap 'b0' could not be found"),
    ({"device": "n0", "target": "t0", "sync": "full", "bitmap-mode": "always"},
     "Cannot specify bitmap sync mode without a bitmap"),
    ({"device": "n0", "target": "n0", "sync": "full"}, "Source and target cannot be the same"),
    ({"device": "n0", "target": "t0", "sync": "full", "x-perf": {"max-workers": 0}},
     "max-workers must be between 1 and 2147483647"),
    ({"device": "n0", "target": "t0", "sync": "full", "x-perf": {"max-chunk": -1}},
     "max-chunk must be zero (which means no limit) or positive"),
    ({"device": "n0", "target": "t1", "sync": "full"},
     "Source and target image have different sizes"),
    ({"device": "n0", "target": "t0", "sync": "full", "x-perf": {"max-chunk": 4096}},
     "Required max-chunk (4096) is less than backup cluster size (65536)"),
    ({"device": "n0", "target": "t0", "sync": "full"}, "Invalid job ID ''"),
    ({"device": "n0", "target": "t0", "sync": "full", "job-id": "b", "speed": -1},
     "Parameter 'speed' expects a non-negative value"),
    ({"device": "n0", "target": "t0", "sync": "full", "job-id": "b", "compress": True},
     "Compression is not supported for this drive "),
    ({"device": "n0", "target": "t0", "sync": "full", "job-id": "1x"}, "Invalid job ID '1x'"),
    ({"device": "n0", "target": "t0", "sync": "full", "job-id": "b",
      "filter-node-name": "n0"}, "Could not create node: Duplicate nodes with node-name='n0'"),
    ({"device": "n0", "target": "ro", "sync": "full", "job-id": "b"}, "Could not create node: Block node is read-only"),
    ({"device": "n0", "target": "t0", "sync": "full", "job-id": "b", "bogus": 1},
     "Parameter 'bogus' is unexpected"),
])
async def test_blockdev_backup_errors(start_daemon, tmp, args, desc):
    extra = file_raw_args(tmp, "t1", 2 * MIB) + file_raw_args(tmp, "ro0", SIZE)[:2] + [
        "--blockdev", "raw,node-name=ro,file=ro0-file,read-only=on"]
    d = setup(start_daemon, tmp, extra=extra)
    async with d.qmp() as c:
        await error(c, "blockdev-backup", args, desc=desc)
        assert await execute(c, "query-block-jobs") == []
        assert set(await nodes_by_name(c)) == {
            "n0", "n0-file", "t0", "t0-file", "t1", "t1-file", "ro", "ro0-file"}


async def test_point_in_time_while_a_frontend_writes(start_daemon, tmp, io_procs):
    """A frontend writes at random all along (vubd-io stress, which checks what it reads
    back). It is stopped for the moment the backup starts, so that the disk then can be
    recorded; the target must equal that record, whatever was written afterwards."""
    size = 32 * MIB
    args = file_raw_args(tmp, "n0", size) + file_raw_args(tmp, "t0", size)
    d = start_daemon(args + export_args("e0", "n0", sock(tmp), extra=",num-queues=2"))
    io = IoProc(tmp, "stress", "--socket", sock(tmp), "--seconds", 8, "--seed", 7,
                "--queues", 2)
    io_procs.append(io)
    await io.ready()
    async with d.qmp() as c:
        ev = JobEvents(c)
        os.kill(io.proc.pid, signal.SIGSTOP)
        try:
            # The requests the frontend had posted complete meanwhile.
            await asyncio.sleep(0.5)
            shutil.copyfile(tmp / "n0.img", tmp / "ref.img")
            args = {"job-id": "b", "device": "n0", "target": "t0", "sync": "full",
                    "speed": 16 * MIB}
            assert await execute(c, "blockdev-backup", args) == {}
        finally:
            os.kill(io.proc.pid, signal.SIGCONT)
        assert await ev.until("b", "null", timeout=60) == DONE
        r = await io.result()
        assert r["rc"] == 0 and r["ok"], r
        assert r["writes"] > 0
    compare(tmp / "ref.img", tmp / "t0.img")


async def test_sigkill_during_backup_leaves_the_source_intact(start_daemon, tmp):
    layers = [("src", [(0, SIZE, 1)])]
    make_chain(tmp, layers, SIZE)
    args = chain_args(tmp, ["src"]) + file_raw_args(tmp, "t0", SIZE)
    d = start_daemon(args + export_args("e0", "src", sock(tmp)))
    async with d.qmp() as c:
        ev = JobEvents(c)
        args = {"job-id": "b", "device": "src", "target": "t0", "sync": "full", "speed": 1}
        assert await execute(c, "blockdev-backup", args) == {}
        assert await ev.until("b", "running") == ["created", "running"]
        write(tmp, 2 * MIB, 128 * KIB, 2)
        d.expect_exit = True
        d.kill()
    qemu_img("check", tmp / "src.qcow2")
    want = expected_disk(layers + [("w", [(2 * MIB, 128 * KIB, 2)])], SIZE)
    assert read_disk(tmp / "src.qcow2", tmp) == bytes(want)
    # What the filter copied before the write is the old data.
    t = (tmp / "t0.img").read_bytes()
    assert t[2 * MIB:2 * MIB + 128 * KIB] == pattern(1, 2 * MIB, 128 * KIB)


ON_ERROR_CASES = {
    # side: (policy, errno, BLOCK_JOB_ERROR action)
    "target-report": ("target", "report", 5, "report"),
    "target-ignore": ("target", "ignore", 5, "ignore"),
    "target-stop": ("target", "stop", 5, "stop"),
    "target-enospc-eio": ("target", "enospc", 5, "report"),
    "target-enospc-enospc": ("target", "enospc", 28, "stop"),
    "source-report": ("source", "report", 5, "report"),
    "source-ignore": ("source", "ignore", 5, "ignore"),
    "source-stop": ("source", "stop", 5, "stop"),
}


@pytest.mark.parametrize("case", list(ON_ERROR_CASES))
async def test_on_error(start_daemon, tmp, case):
    """blkdebug fails one data write of the target (or read of the source): the policy of
    that side decides. report fails the job; ignore and stop (once resumed) retry, and
    the backup completes with the whole disk."""
    side, policy, errno, action = ON_ERROR_CASES[case]
    make_image(tmp / "n0.img", SIZE)
    write_raw(tmp / "n0.img", pattern(1, 0, SIZE))
    make_image(tmp / "t0.img", SIZE)
    event = "write_aio" if side == "target" else "read_aio"
    args = []
    for node in ("n0", "t0"):
        img = tmp / f"{node}.img"
        args += ["--blockdev", f"file,node-name={node}-file,filename={img}"]
        if node == ("t0" if side == "target" else "n0"):
            args += ["--blockdev", json.dumps({
                "driver": "blkdebug", "node-name": f"{node}-dbg", "image": f"{node}-file",
                "inject-error": [{"event": event, "errno": errno, "once": True}]})]
            args += ["--blockdev", f"raw,node-name={node},file={node}-dbg"]
        else:
            args += ["--blockdev", f"raw,node-name={node},file={node}-file"]
    d = start_daemon(args)
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "blockdev-backup", {"job-id": "b", "device": "n0", "target": "t0",
                                             "sync": "full", f"on-{side}-error": policy})
        assert await ev.until("b", "BLOCK_JOB_ERROR") == START + ["BLOCK_JOB_ERROR"]
        assert ev.data["BLOCK_JOB_ERROR"] == {
            "device": "b", "operation": "write" if side == "target" else "read",
            "action": action,
        }
        if action == "stop":
            assert await ev.until("b", "paused") == ["paused"]
            b = await block_job(c, "b")
            assert (b["status"], b["paused"], b["io-status"]) == (
                "paused", True, "nospace" if errno == 28 else "failed",
            ), b
            assert await execute(c, "job-resume", {"id": "b"}) == {}
            assert await ev.until("b", "null") == ["running"] + DONE[len(START):]
        elif action == "ignore":
            assert await ev.until("b", "null") == DONE[len(START):]
        else:
            assert await ev.until("b", "null") == [
                "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null",
            ]
            assert ev.data["BLOCK_JOB_COMPLETED"]["error"] == "Input/output error"
            return
        done = ev.data["BLOCK_JOB_COMPLETED"]
        assert "error" not in done and done["offset"] == done["len"] == SIZE, done
    compare(tmp / "n0.img", tmp / "t0.img")


async def bitmap_info(c, node, name):
    for b in (await nodes_by_name(c))[node].get("dirty-bitmaps", []):
        # (QEMU lists the anonymous bitmaps of jobs too.)
        if b.get("name") == name:
            return b
    return None


async def test_bitmap_checks_and_modes(start_daemon, tmp):
    """bitmap-mode never, on-success (incremental) and always, with jobs that succeed
    and jobs that are cancelled: what the bitmap holds afterwards. The jobs run with
    speed=1, so that at least two separate dirty areas keep them running."""
    d = setup(start_daemon, tmp)
    write(tmp, 0, SIZE, 1)

    async def count(c):
        return (await bitmap_info(c, "n0", "b0"))["count"]

    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "block-dirty-bitmap-add", {"node": "n0", "name": "b0"})
        write(tmp, MIB, 128 * KIB, 2)
        write(tmp, 3 * MIB, 64 * KIB, 3)
        base = {"device": "n0", "target": "t0", "job-id": "b", "bitmap": "b0"}
        await error(c, "blockdev-backup", {**base, "sync": "bitmap"},
                    desc="Bitmap sync mode must be given when providing a bitmap")
        await error(c, "blockdev-backup", {**base, "sync": "none", "bitmap-mode": "always"},
                    desc="sync mode 'none' does not produce meaningful bitmap outputs")
        await error(c, "blockdev-backup", {**base, "sync": "full", "bitmap-mode": "never"},
                    desc="Bitmap sync mode 'never' has no meaningful effect when combined "
                         "with sync mode 'full'")
        # never: the job copies what the bitmap marks; the bitmap is frozen meanwhile
        # (its successor records) and then holds what it held and what was written
        # since.
        args = {**base, "sync": "bitmap", "bitmap-mode": "never", "speed": 1}
        assert await execute(c, "blockdev-backup", args) == {}
        b = await bitmap_info(c, "n0", "b0")
        assert (b["busy"], b["recording"], b["count"]) == (True, True, 192 * KIB), b
        await error(c, "blockdev-backup", {**base, "job-id": "b2", "sync": "incremental"},
                    desc="Bitmap 'b0' is currently in use by another operation and cannot "
                         "be used")
        write(tmp, 2 * MIB, 64 * KIB, 4)
        assert await execute(c, "block-job-set-speed", {"device": "b", "speed": 0}) == {}
        await ev.until("b", "null")
        assert ev.data["BLOCK_JOB_COMPLETED"]["len"] == 192 * KIB
        b = await bitmap_info(c, "n0", "b0")
        assert (b["busy"], b["recording"], b["count"]) == (False, True, 256 * KIB), b
        # on-success (incremental), completed: only what was written since the start.
        args = {**base, "sync": "incremental", "speed": 1}
        assert await execute(c, "blockdev-backup", args) == {}
        write(tmp, 0, 64 * KIB, 5)
        assert await execute(c, "block-job-set-speed", {"device": "b", "speed": 0}) == {}
        await ev.until("b", "null")
        assert ev.data["BLOCK_JOB_COMPLETED"]["len"] == 256 * KIB
        assert await count(c) == 64 * KIB
        # on-success, cancelled: the writes since are merged back; nothing is lost.
        write(tmp, 2 * MIB, 64 * KIB, 6)
        args = {**base, "sync": "bitmap", "bitmap-mode": "on-success", "speed": 1}
        assert await execute(c, "blockdev-backup", args) == {}
        write(tmp, 3 * MIB, 64 * KIB, 7)
        assert await execute(c, "block-job-cancel", {"device": "b"}) == {}
        await ev.until("b", "null")
        assert await count(c) == 192 * KIB
        # always, cancelled after its first copy (of the cluster at 0): what was
        # written since (at 1 MiB) and what it did not copy (2 and 3 MiB).
        args = {**base, "sync": "bitmap", "bitmap-mode": "always", "speed": 1}
        assert await execute(c, "blockdev-backup", args) == {}
        write(tmp, MIB, 64 * KIB, 8)
        assert await execute(c, "block-job-cancel", {"device": "b"}) == {}
        await ev.until("b", "null")
        assert await count(c) == 192 * KIB
        b = await bitmap_info(c, "n0", "b0")
        assert (b["busy"], b["recording"]) == (False, True), b


async def test_full_and_three_incrementals_while_a_frontend_writes(start_daemon, tmp, io_procs):
    """A full backup and three incrementals (sync=incremental with bitmap b0), each
    taken while vubd-io stress writes at random; each restored with qemu-img (the
    chain of qcow2 targets, converted) equals the disk when its job started (recorded
    with the frontend stopped for that moment)."""
    size = 32 * MIB
    args = file_raw_args(tmp, "n0", size)
    d = start_daemon(args + export_args("e0", "n0", sock(tmp), extra=",num-queues=2"))
    io = IoProc(tmp, "stress", "--socket", sock(tmp), "--seconds", 15, "--seed", 9,
                "--queues", 2)
    io_procs.append(io)
    await io.ready()
    chain = []
    async with d.qmp() as c:
        ev = JobEvents(c)
        for i in range(4):
            name = f"bk{i}"
            img = tmp / f"{name}.qcow2"
            if i == 0:
                qemu_img("create", "-q", "-f", "qcow2", img, size)
            else:
                qemu_img("create", "-q", "-f", "qcow2", "-b", chain[-1], "-F", "qcow2", img,
                         size)
            await execute(c, "blockdev-add", {
                "driver": "qcow2", "node-name": name, "backing": None,
                "file": {"driver": "file", "filename": str(img)}})
            os.kill(io.proc.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(0.5)
                shutil.copyfile(tmp / "n0.img", tmp / f"ref{i}.img")
                if i == 0:
                    await execute(c, "block-dirty-bitmap-add", {"node": "n0", "name": "b0"})
                    job = {"sync": "full"}
                else:
                    job = {"sync": "incremental", "bitmap": "b0"}
                await execute(c, "blockdev-backup", {
                    "job-id": name, "device": "n0", "target": name, "speed": 32 * MIB, **job})
            finally:
                os.kill(io.proc.pid, signal.SIGCONT)
            assert await ev.until(name, "null", timeout=60) == DONE
            assert "error" not in ev.data["BLOCK_JOB_COMPLETED"]
            await execute(c, "blockdev-del", {"node-name": name})
            chain.append(img)
        r = await io.result()
        assert r["rc"] == 0 and r["ok"] and r["writes"] > 0, r
    for i, img in enumerate(chain):
        qemu_img("check", img)
        compare(tmp / f"ref{i}.img", img)


async def test_target_gone_as_soon_as_each_backup_is(start_daemon, tmp, io_procs):
    """Backup after backup while a frontend writes, to one image: blockdev-backup to a
    node deleted as soon as its job reached null, and drive-backup (mode=existing),
    whose target is gone from the graph by then. The copy-before-write filter, and
    its edge to the target, are gone with the job's events (guest requests held by
    its last drained section keep none of it): blockdev-del never finds the target in
    use, and no node is left holding the image."""
    d = start_daemon(file_raw_args(tmp, "n0", SIZE)
                     + export_args("e0", "n0", sock(tmp), extra=",num-queues=2"))
    io = IoProc(tmp, "stress", "--socket", sock(tmp), "--seconds", 8, "--seed", 5,
                "--queues", 2)
    io_procs.append(io)
    await io.ready()
    img = make_image(tmp / "t.img", SIZE)
    done = 0
    async with d.qmp() as c:
        ev = JobEvents(c)
        end = asyncio.get_running_loop().time() + 6
        while asyncio.get_running_loop().time() < end:
            name = f"t{done}"
            if done % 2:
                await execute(c, "drive-backup", {
                    "job-id": name, "device": "n0", "target": str(img), "sync": "full",
                    "mode": "existing", "format": "raw"})
            else:
                await execute(c, "blockdev-add", {
                    "driver": "raw", "node-name": name,
                    "file": {"driver": "file", "filename": str(img)}})
                await execute(c, "blockdev-backup", {
                    "job-id": name, "device": "n0", "target": name, "sync": "full"})
            assert await ev.until(name, "null") == DONE
            assert "error" not in ev.data["BLOCK_JOB_COMPLETED"]
            if not done % 2:
                assert await execute(c, "blockdev-del", {"node-name": name}) == {}
            assert set(await nodes_by_name(c)) == {"n0", "n0-file"}
            done += 1
        r = await io.result()
        assert r["rc"] == 0 and r["ok"] and r["writes"] > 0, r
    assert done >= 10, done


@pytest.mark.parametrize("policy", ["break-guest-write", "break-snapshot"])
async def test_on_cbw_error(start_daemon, tmp, policy):
    """A copy that fails (blkdebug fails the fleecing image's writes): with
    break-guest-write the guest write fails and the snapshot stays readable; with
    break-snapshot the guest write succeeds and snapshot reads fail from then on."""
    make_image(tmp / "fl.img", SIZE)
    args = file_raw_args(tmp, "n0", SIZE)
    write_raw(tmp / "n0.img", pattern(1, 0, SIZE))
    args += [
        "--blockdev", f"file,node-name=fl-file,filename={tmp / 'fl.img'}",
        "--blockdev", json.dumps({"driver": "blkdebug", "node-name": "fl-dbg",
                                  "image": "fl-file",
                                  "inject-error": [{"event": "write_aio", "errno": 5}]}),
        "--blockdev", "raw,node-name=fl,file=fl-dbg",
        "--blockdev", f"copy-before-write,node-name=cbw,file=n0,target=fl,on-cbw-error={policy}",
        "--blockdev", "snapshot-access,node-name=acc,file=cbw",
    ] + export_args("e0", "cbw", sock(tmp)) + export_args(
        "e1", "acc", sock(tmp, "e1"), writable=False)
    start_daemon(args)
    r = io_ok("verify", "--socket", sock(tmp, "e1"), "--offset", 0, "--len", 64 * KIB,
              "--seed", 1, "--read-only", "on")
    w = vubd_io("write", "--socket", sock(tmp), "--offset", 0, "--len", 4 * KIB, "--seed", 2)
    snap = vubd_io("verify", "--socket", sock(tmp, "e1"), "--offset", MIB, "--len", 4 * KIB,
                   "--seed", 1, "--read-only", "on")
    if policy == "break-guest-write":
        assert w["rc"] != 0 and not w["ok"], w
        assert snap["ok"], snap
        verify(tmp, 0, 4 * KIB, 1)
    else:
        assert w["ok"], w
        assert snap["rc"] != 0 and not snap["ok"], snap
        verify(tmp, 0, 4 * KIB, 2)
    assert r["ok"]


#: The fleecing target's latency in the cbw-timeout test, well above the timeout.
SLOW_TARGET_NS = 5_000_000_000


@pytest.mark.parametrize("policy", ["break-guest-write", "break-snapshot"])
async def test_cbw_timeout(start_daemon, tmp, policy):
    """cbw-timeout=1 with a target whose writes take 5 s (null-co latency-ns): the
    guest write's copy times out (it goes on in the background). break-guest-write:
    the guest write fails, the disk and the snapshot keep the old data;
    break-snapshot: the guest write is done without its copy, and the snapshot is
    gone (its reads fail)."""
    args = file_raw_args(tmp, "n0", SIZE)
    write_raw(tmp / "n0.img", pattern(1, 0, SIZE))
    args += [
        "--blockdev", json.dumps({"driver": "null-co", "node-name": "fl", "size": SIZE,
                                  "read-zeroes": True, "latency-ns": SLOW_TARGET_NS}),
        "--blockdev", json.dumps({"driver": "copy-before-write", "node-name": "cbw",
                                  "file": "n0", "target": "fl", "on-cbw-error": policy,
                                  "cbw-timeout": 1}),
        "--blockdev", "snapshot-access,node-name=acc,file=cbw",
    ] + export_args("e0", "cbw", sock(tmp)) + export_args(
        "e1", "acc", sock(tmp, "e1"), writable=False)
    start_daemon(args)
    w = vubd_io("write", "--socket", sock(tmp), "--offset", MIB, "--len", 4 * KIB, "--seed", 2)
    snap = vubd_io("verify", "--socket", sock(tmp, "e1"), "--offset", 2 * MIB,
                   "--len", 4 * KIB, "--seed", 1, "--read-only", "on")
    if policy == "break-guest-write":
        assert w["rc"] != 0 and "Input/output error" in w["error"], w
        assert snap["ok"], snap
        verify(tmp, MIB, 4 * KIB, 1)
        io_ok("verify", "--socket", sock(tmp, "e1"), "--offset", MIB, "--len", 4 * KIB,
              "--seed", 1, "--read-only", "on")
    else:
        assert w["ok"], w
        assert snap["rc"] != 0 and not snap["ok"], snap
        verify(tmp, MIB, 4 * KIB, 2)


async def test_shutdown_with_backups_running(start_daemon, tmp):
    """The daemon exits cleanly (SIGTERM at teardown) with a rate-limited full backup
    and a sync=none backup still running; the source image stays as written."""
    d = setup(start_daemon, tmp, extra=file_raw_args(tmp, "t2", SIZE))
    write(tmp, 0, SIZE, 1)
    async with d.qmp() as c:
        ev = JobEvents(c)
        for jid, target, sync in (("b1", "t0", "full"), ("b2", "t2", "none")):
            assert await execute(c, "blockdev-backup", {
                "job-id": jid, "device": "n0", "target": target, "sync": sync,
                "speed": 1}) == {}
            await ev.until(jid, "running")
        write(tmp, MIB, 64 * KIB, 2)
    assert d.stop() is None
    d.expect_exit = True
    want = bytearray(pattern(1, 0, SIZE))
    want[MIB:MIB + 64 * KIB] = pattern(2, MIB, 64 * KIB)
    assert (tmp / "n0.img").read_bytes() == bytes(want)


async def test_drive_backup_top_and_none_targets_have_backing_files(start_daemon, tmp):
    """drive-backup creates a sync=top target over the source's backing file and a
    sync=none target over the source itself; the top target's chain reads as the disk."""
    imgs = make_chain(tmp, LAYERS, SIZE)
    # The target opens the base again from its header: the chain's base file node
    # takes no locks, or that second open would find it locked.
    args = chain_args(tmp, ["base", "top"])
    args[1] += ",locking=off"
    d = start_daemon(args + export_args("e0", "top", sock(tmp)))
    async with d.qmp() as c:
        ev = JobEvents(c)
        tgt = tmp / "drive-top.qcow2"
        assert await execute(c, "drive-backup", {"job-id": "b", "device": "top", "sync": "top",
                                                 "target": str(tgt)}) == {}
        assert await ev.until("b", "null") == DONE
        assert ev.data["BLOCK_JOB_COMPLETED"]["len"] == 192 * KIB
        none = tmp / "drive-none.qcow2"
        assert await execute(c, "drive-backup", {"job-id": "n", "device": "top", "sync": "none",
                                                 "target": str(none)}) == {}
        assert await execute(c, "block-job-cancel", {"device": "n"}) == {}
        assert await ev.until("n", "null") == CANCELLED
    info = json.loads(qemu_img("info", "-U", "--output=json", tgt))
    assert info["backing-filename"] == str(imgs["base"])
    assert read_disk(tgt, tmp) == bytes(expected_disk(LAYERS, SIZE))
    info = json.loads(qemu_img("info", "-U", "--output=json", none))
    assert info["backing-filename"] == str(imgs["top"])


async def test_compressed_backup_to_qcow2(start_daemon, tmp):
    """compress=true into a qcow2 target: every cluster written compressed (qemu-img
    check counts them), the data equal to the source's."""
    make_image(tmp / "n0.img", SIZE)
    # Compressible data: a repeated pattern in every cluster, one cluster left zero.
    data = bytearray((b"vubd-compress-" * 5000)[: 64 * KIB]) * (SIZE // (64 * KIB))
    data[64 * KIB: 128 * KIB] = bytes(64 * KIB)
    write_raw(tmp / "n0.img", bytes(data))
    qemu_img("create", "-q", "-f", "qcow2", tmp / "t0.qcow2", SIZE)
    d = start_daemon([
        "--blockdev", f"file,node-name=n0,filename={tmp / 'n0.img'}",
        "--blockdev", f"file,node-name=t0-file,filename={tmp / 't0.qcow2'}",
        "--blockdev", "qcow2,node-name=t0,file=t0-file",
    ])
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "blockdev-backup", {"job-id": "b", "device": "n0", "target": "t0",
                                             "sync": "full", "compress": True})
        await ev.until("b", "null")
        assert "error" not in ev.data["BLOCK_JOB_COMPLETED"], ev.data
    d.expect_exit = True
    assert d.stop() is None
    check = json.loads(qemu_img("check", "--output=json", tmp / "t0.qcow2"))
    assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0, check
    frag = check.get("compressed-clusters", 0)
    assert frag >= SIZE // (64 * KIB) - 1, check
    compare(tmp / "n0.img", tmp / "t0.qcow2")


async def test_backup_bitmaps_are_listed(start_daemon, tmp):
    """While a backup runs, its anonymous bitmaps are listed as QEMU lists them, none
    recording: on the copy-before-write filter the clusters the snapshot may be read
    at (all of them) and those a guest write has copied (one, after a write); on the
    source what is still to copy, at the cluster size. All go with the job."""
    d = setup(start_daemon, tmp)
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "blockdev-backup", {
            "job-id": "b", "device": "n0", "target": "t0", "sync": "full", "speed": 1,
            "filter-node-name": "cbw",
        })
        assert await ev.until("b", "running") == ["created", "running"]
        write(tmp, 3 * MIB, 4096, 5)

        def anon(count):
            return {"recording": False, "persistent": False, "busy": False,
                    "granularity": 64 * KIB, "count": count}

        nodes = await nodes_by_name(c)
        assert nodes["cbw"]["dirty-bitmaps"] == [anon(SIZE), anon(64 * KIB)], nodes["cbw"]
        [left] = nodes["n0"]["dirty-bitmaps"]
        assert left == anon(left["count"]) and 0 < left["count"] < SIZE, left
        assert "dirty-bitmaps" not in nodes["t0"], nodes["t0"]
        await execute(c, "block-job-cancel", {"device": "b"})
        await ev.until("b", "null")
        nodes = await nodes_by_name(c)
        assert "cbw" not in nodes
        assert "dirty-bitmaps" not in nodes["n0"], nodes["n0"]

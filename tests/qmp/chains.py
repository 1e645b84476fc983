"""Helpers for the block job and block graph tests (test_jobs.py, test_stream_commit.py,
test_mirror.py, test_graph.py): qcow2 backing chains built offline with qemu-img and
qemu-io, filled with vubd-io's data pattern so that the same regions can be checked
through an export with ``vubd-io verify`` and offline with ``qemu-img compare``; a
collector of job events; and what mirror and active commit tests share (the pivot under
I/O, cancelling in ready).
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import time
from pathlib import Path
from typing import Iterable, Optional

from qemu.qmp import EventListener, QMPClient

from conftest import CMD_TIMEOUT, MIB, check_timestamp, execute

KIB = 1 << 10

# ---------------------------------------------------------------------------------------
# vubd-io's data pattern (tests/src/bin/vubd-io.rs: splitmix64 of seed and offset)

_M64 = (1 << 64) - 1


def _mix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def pattern(seed: int, offset: int, length: int) -> bytes:
    """The bytes ``vubd-io write --seed SEED`` puts at ``offset..offset+length`` (both
    multiples of 8)."""
    assert offset % 8 == 0 and length % 8 == 0
    s = _mix(seed)
    return struct.pack(f"<{length // 8}Q", *[_mix(s ^ w) for w in range(offset, offset + length, 8)])


# ---------------------------------------------------------------------------------------
# Tools


def run(*args, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if ok:
        assert p.returncode == 0, f"{' '.join(map(str, args))}: rc {p.returncode}\n{p.stdout}{p.stderr}"
    return p


#: What QEMU says when it cannot time PBKDF2 for a LUKS key slot (on a loaded machine).
PBKDF2_TIMING = "Unable to get accurate CPU usage"


def run_timing_pbkdf2(*args) -> subprocess.CompletedProcess:
    """``run`` for a command that derives a LUKS key with a timed PBKDF2 (qemu-img
    create or amend): retried while it fails only because it could not time it."""
    # It fails at random when the first PBKDF2 round takes under a millisecond of
    # CPU: 80-90% of the attempts with sha1 on a quiet machine here, whatever
    # iter-time is. Enough attempts that all failing is never seen.
    for _ in range(300):
        p = run(*args, ok=False)
        if p.returncode == 0:
            return p
        assert PBKDF2_TIMING in p.stderr, p.stderr
        time.sleep(0.01)
    raise AssertionError(f"{' '.join(map(str, args))} kept failing: {p.stderr}")


def qemu_img(*args) -> str:
    return run("qemu-img", *args).stdout


def img_info(img: Path, chain: bool = False) -> list[dict] | dict:
    """``qemu-img info -U --output=json`` (a list with ``chain``)."""
    args = ["info", "-U", "--output=json"] + (["--backing-chain"] if chain else []) + [img]
    return json.loads(qemu_img(*args))


def backing_of(img: Path) -> Optional[str]:
    """The backing file name written in an image's header (None if it has none)."""
    return img_info(img).get("backing-filename")


def img_map(img: Path) -> list[dict]:
    return json.loads(qemu_img("map", "-U", "--output=json", img))


def allocated_depths(img: Path, offset: int, length: int) -> set[int]:
    """The set of ``depth`` values of ``qemu-img map`` over a range (0: the image itself,
    1: its backing file, ...)."""
    out = set()
    for e in img_map(img):
        if e["start"] < offset + length and e["start"] + e["length"] > offset:
            out.add(e["depth"])
    return out


def check_clean(img: Path):
    p = run("qemu-img", "check", "--output=json", img, ok=False)
    assert p.returncode == 0, f"qemu-img check {img}: rc {p.returncode}\n{p.stdout}{p.stderr}"
    out = json.loads(p.stdout)
    assert out.get("corruptions", 0) == 0 and out.get("leaks", 0) == 0, out
    assert out.get("check-errors", 0) == 0, out


def compare(a: Path, b: Path, fmt_b: Optional[str] = None):
    """``qemu-img compare -U`` must find the two disks identical."""
    args = ["qemu-img", "compare", "-U"] + (["-F", fmt_b] if fmt_b else []) + [a, b]
    p = run(*args, ok=False)
    assert p.returncode == 0, f"{' '.join(map(str, args))}: rc {p.returncode}\n{p.stdout}{p.stderr}"


def read_disk(img: Path, tmp: Path) -> bytes:
    """The whole guest-visible content of an image (with its backing chain)."""
    out = tmp / f"{img.name}.read.raw"
    qemu_img("convert", "-U", "-O", "raw", img, out)
    data = out.read_bytes()
    out.unlink()
    return data


# ---------------------------------------------------------------------------------------
# Chains

#: A write: (offset, length, seed).
Write = tuple[int, int, int]


def write_pattern(img: Path, fmt: str, writes: Iterable[Write]):
    """Write vubd-io's pattern into an image offline, with qemu-io."""
    cmds = []
    files = []
    for i, (off, n, seed) in enumerate(writes):
        pf = img.with_name(f"{img.name}.pat{i}")
        pf.write_bytes(pattern(seed, off, n))
        files.append(pf)
        cmds += ["-c", f"write -q -s {pf} {off} {n}"]
    if cmds:
        run("qemu-io", "-f", fmt, *cmds, img)
    for pf in files:
        pf.unlink()


def make_chain(tmp: Path, layers: list[tuple[str, list[Write]]], size: int = 4 * MIB) -> dict[str, Path]:
    """qcow2 images ``<name>.qcow2``, base first, each with the previous one as its backing
    file (absolute name, format qcow2), with the given writes. Returns name -> path."""
    out = {}
    prev = None
    for name, writes in layers:
        img = tmp / f"{name}.qcow2"
        if prev is None:
            qemu_img("create", "-q", "-f", "qcow2", img, size)
        else:
            qemu_img("create", "-q", "-f", "qcow2", "-b", prev, "-F", "qcow2", img, size)
        write_pattern(img, "qcow2", writes)
        out[name] = img
        prev = img
    return out


def expected_disk(layers: list[tuple[str, list[Write]]], size: int = 4 * MIB) -> bytearray:
    """What the top of such a chain reads: the writes of every layer, base first."""
    buf = bytearray(size)
    for _, writes in layers:
        for off, n, seed in writes:
            buf[off:off + n] = pattern(seed, off, n)
    return buf


def write_raw(path: Path, data: bytes) -> Path:
    path.write_bytes(bytes(data))
    return path


def chain_args(tmp: Path, names: list[str], extra: dict[str, str] | None = None) -> list[str]:
    """``--blockdev`` options for the images of make_chain: for each layer a file node
    ``<name>-file`` and a qcow2 node ``<name>`` with the previous layer as ``backing``.
    ``extra`` maps a layer name to more keyval options for its qcow2 node."""
    args = []
    prev = None
    for name in names:
        img = tmp / f"{name}.qcow2"
        args += ["--blockdev", f"file,node-name={name}-file,filename={img}"]
        opt = f"qcow2,node-name={name},file={name}-file"
        if prev is not None:
            opt += f",backing={prev}"
        if extra and name in extra:
            opt += "," + extra[name]
        args += ["--blockdev", opt]
        prev = name
    return args


async def nodes_by_name(c: QMPClient) -> dict[str, dict]:
    return {n["node-name"]: n for n in await execute(c, "query-named-block-nodes", {"flat": True})}


async def export_node(c: QMPClient, eid: str) -> str:
    for e in await execute(c, "query-block-exports"):
        if e["id"] == eid:
            return e["node-name"]
    raise AssertionError(f"no export {eid}")


# ---------------------------------------------------------------------------------------
# Job events

JOB_EVENTS = {
    "JOB_STATUS_CHANGE",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_ERROR",
    "BLOCK_JOB_READY",
    "BLOCK_JOB_PENDING",
}


def _job_of(ev: dict) -> Optional[str]:
    d = ev.get("data") or {}
    return d.get("id", d.get("device"))


async def create_timing_pbkdf2(c: QMPClient, ev: "JobEvents", options: dict) -> None:
    """``blockdev-create`` of ``options`` (job ``cr``, concluded and dismissed), retried
    while its only error is that the daemon could not time PBKDF2 (qemu-storage-daemon
    has this from qemu-img); any other error fails the test."""
    for _ in range(30):
        await execute(c, "blockdev-create", {"job-id": "cr", "options": options})
        await ev.until("cr", "concluded")
        j = await execute(c, "query-jobs")
        await execute(c, "job-dismiss", {"id": "cr"})
        await ev.until("cr", "null")
        if PBKDF2_TIMING not in j[0].get("error", ""):
            break
    assert "error" not in j[0], j[0].get("error")


class JobEvents:
    """Collects a client's events. ``until`` waits for a job's event and returns the
    job's events since the previous call, as a trace: the status for JOB_STATUS_CHANGE,
    the event name for the BLOCK_JOB_* events (``self.data[name]`` keeps the last data
    of each of those)."""

    def __init__(self, c: QMPClient):
        self.listener = EventListener()
        c.register_listener(self.listener)
        self.pending: list[dict] = []
        self.data: dict[str, dict] = {}
        self.all: list[dict] = []

    def _label(self, ev: dict) -> str:
        if ev["event"] == "JOB_STATUS_CHANGE":
            return ev["data"]["status"]
        return ev["event"]

    async def _next(self, deadline: float) -> dict:
        left = deadline - time.monotonic()
        if left <= 0:
            raise asyncio.TimeoutError
        ev = await asyncio.wait_for(self.listener.get(), left)
        check_timestamp(ev)
        self.all.append(ev)
        if ev["event"] != "JOB_STATUS_CHANGE" and ev["event"] in JOB_EVENTS:
            self.data[ev["event"]] = ev["data"]
        return ev

    def _take(self, job: str) -> Optional[dict]:
        for i, ev in enumerate(self.pending):
            if _job_of(ev) == job:
                return self.pending.pop(i)
        return None

    async def until(self, job: str, label: str, timeout: float = CMD_TIMEOUT) -> list[str]:
        """Events of ``job`` up to and including the first one labelled ``label`` (a
        status or an event name)."""
        deadline = time.monotonic() + timeout
        trace = []
        while True:
            ev = self._take(job)
            if ev is None:
                try:
                    ev = await self._next(deadline)
                except asyncio.TimeoutError:
                    raise AssertionError(
                        f"job {job}: no {label} within {timeout}s; got {trace}"
                    ) from None
                if ev["event"] not in JOB_EVENTS:
                    continue
                if _job_of(ev) != job:
                    self.pending.append(ev)
                    continue
            trace.append(self._label(ev))
            if trace[-1] == label:
                return trace

    async def quiet(self, job: str, seconds: float = 0.3) -> list[str]:
        """Events of ``job`` that arrive within ``seconds`` (to check that none does)."""
        deadline = time.monotonic() + seconds
        trace = [self._label(ev) for ev in self.pending if _job_of(ev) == job]
        self.pending = [ev for ev in self.pending if _job_of(ev) != job]
        while True:
            try:
                ev = await self._next(deadline)
            except asyncio.TimeoutError:
                return trace
            if ev["event"] in JOB_EVENTS:
                if _job_of(ev) == job:
                    trace.append(self._label(ev))
                else:
                    self.pending.append(ev)

    async def event(self, name: str, timeout: float = CMD_TIMEOUT) -> dict:
        """The next event called ``name`` (any job or none)."""
        for i, ev in enumerate(self.pending):
            if ev["event"] == name:
                return self.pending.pop(i)
        deadline = time.monotonic() + timeout
        try:
            while True:
                ev = await self._next(deadline)
                if ev["event"] == name:
                    return ev
                self.pending.append(ev)
        except asyncio.TimeoutError:
            raise AssertionError(f"no {name} event within {timeout}s") from None


async def job(c: QMPClient, jid: str) -> Optional[dict]:
    """The job's query-jobs entry (None if there is none)."""
    for j in await execute(c, "query-jobs"):
        if j["id"] == jid:
            return j
    return None


async def block_job(c: QMPClient, jid: str) -> Optional[dict]:
    """The job's query-block-jobs entry (None if there is none)."""
    for j in await execute(c, "query-block-jobs"):
        if j["device"] == jid:
            return j
    return None


#: Members of a query-jobs entry (plus "error" once a job failed or was cancelled).
JOB_INFO_KEYS = {"id", "type", "status", "current-progress", "total-progress"}
#: Members of a query-block-jobs entry (plus "error" as above).
BLOCK_JOB_INFO_KEYS = {
    "type", "device", "len", "offset", "busy", "paused", "speed", "io-status", "ready",
    "status", "auto-finalize", "auto-dismiss",
}


def verb_error(jid: str, state: str, verb: str) -> str:
    return f"Job '{jid}' in state '{state}' cannot accept command verb '{verb}'"


def seed_runs(layers: list[tuple[str, list[Write]]], size: int, gran: int = 64 * KIB) -> list[Write]:
    """The disk of expected_disk as runs of one seed: (offset, length, seed) for every
    region written (writes must be multiples of ``gran``), for ``vubd-io verify``."""
    seeds: list[Optional[int]] = [None] * (size // gran)
    for _, writes in layers:
        for off, n, seed in writes:
            assert off % gran == 0 and n % gran == 0, (off, n)
            for i in range(off // gran, (off + n) // gran):
                seeds[i] = seed
    out: list[Write] = []
    for i, s in enumerate(seeds):
        if s is None:
            continue
        if out and out[-1][2] == s and out[-1][0] + out[-1][1] == i * gran:
            out[-1] = (out[-1][0], out[-1][1] + gran, s)
        else:
            out.append((i * gran, gran, s))
    return out


def verify_export(sock: Path, runs: list[Write]):
    """``vubd-io verify`` of every run through an export."""
    from conftest import io_ok

    for off, n, seed in runs:
        io_ok("verify", "--socket", sock, "--offset", off, "--len", n, "--seed", seed)


# ---------------------------------------------------------------------------------------
# Mirror-like jobs (mirror, active commit): the pivot under I/O and cancelling in ready

#: A mirror-like job's events from block-job-complete (or a soft cancel) to its end.
COMPLETED = ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
#: Its events from a forced cancel in ready to its end.
CANCELLED_IN_READY = ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
#: The three ways of cancelling a ready job (see cancel_in_ready).
CANCEL_WAYS = ["block-job-cancel", "block-job-cancel-force", "job-cancel"]


async def cancel_in_ready(c: QMPClient, ev: JobEvents, jid: str, how: str) -> dict:
    """Cancels the ready job ``jid`` one of the CANCEL_WAYS: block-job-cancel
    completes it without the pivot (BLOCK_JOB_COMPLETED); with force, or job-cancel,
    it is cancelled (BLOCK_JOB_CANCELLED). Returns the data of that event."""
    cmd, args = {
        "block-job-cancel": ("block-job-cancel", {"device": jid}),
        "block-job-cancel-force": ("block-job-cancel", {"device": jid, "force": True}),
        "job-cancel": ("job-cancel", {"id": jid}),
    }[how]
    assert await execute(c, cmd, args) == {}
    if how == "block-job-cancel":
        assert await ev.until(jid, "null") == COMPLETED
        return ev.data["BLOCK_JOB_COMPLETED"]
    assert await ev.until(jid, "null") == CANCELLED_IN_READY
    return ev.data["BLOCK_JOB_CANCELLED"]


class PivotUnderIo:
    """A pivot while a frontend writes and verifies through export e0 (``vubd-io
    stress`` on two queues over ``[0, span)``), with three writes outside that span:
    A before the job, B while it is ready, C after the pivot; each is verified through
    the export after the pivot."""

    def __init__(self, tmp: Path, sock: Path, io_procs: list, a: Write, b: Write, c: Write,
                 seconds: int, span: int):
        self.tmp, self.sock, self.io_procs = tmp, sock, io_procs
        self.a, self.b, self.c = a, b, c
        self.seconds, self.span = seconds, span
        self.stress = None
        self.stress_result = None

    def write(self, r: Write):
        from conftest import io_ok

        io_ok("write", "--socket", self.sock, "--offset", r[0], "--len", r[1], "--seed", r[2])

    async def start(self):
        """Writes A, then starts the stress run."""
        from conftest import IoProc

        self.write(self.a)
        self.stress = IoProc(self.tmp, "stress", "--socket", self.sock, "--seconds", self.seconds,
                             "--seed", 7, "--queues", 2, "--span", self.span)
        self.io_procs.append(self.stress)
        await self.stress.ready()

    async def stress_ok(self):
        """The stress run ended without an error or a wrong read."""
        if self.stress_result is None:
            self.stress_result = await self.stress.result()
        r = self.stress_result
        assert r["rc"] == 0 and r["ok"], r

    async def complete(self, c: QMPClient, ev: JobEvents, jid: str, node: str) -> dict:
        """block-job-complete of the ready job: it ends (COMPLETED) with the export on
        ``node``; then C is written, and A, B and C are verified. Returns the data of
        BLOCK_JOB_COMPLETED."""
        from conftest import io_ok

        assert await execute(c, "block-job-complete", {"device": jid}) == {}
        assert await ev.until(jid, "null") == COMPLETED
        done = ev.data["BLOCK_JOB_COMPLETED"]
        assert await export_node(c, "e0") == node
        await self.stress_ok()
        self.write(self.c)
        for off, n, seed in (self.a, self.b, self.c):
            io_ok("verify", "--socket", self.sock, "--offset", off, "--len", n, "--seed", seed)
        return done

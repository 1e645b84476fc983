#!/usr/bin/env python3
"""Block job throughput: vubd against qemu-storage-daemon, side by side.

For each daemon, on image files under /dev/shm (or --dir):
  * stream: base.qcow2 holds SIZE bytes of data, top.qcow2 is an empty overlay
    exported writable; block-stream copies the base into the top;
  * commit: base.qcow2 is empty, mid.qcow2 holds SIZE bytes, top.qcow2 is an empty
    overlay exported writable; block-commit (top-node=mid) copies mid into base;
  * mirror: as stream, drive-mirror sync=full of top into a new qcow2 image, pivoted
    with block-job-complete as soon as it is ready;
  * speed: the stream again with speed=SPEED: the rate reached against the one set;
  * backup: the chain of stream (base.qcow2 with SIZE bytes under an empty top.qcow2,
    exported writable); blockdev-backup sync=full of top into an empty qcow2 image;
  * I/O during a job: `vubd-io stress` (random verified reads and writes on the first
    32 MiB of the disk, 1 queue; the guest of this benchmark) on the exported top for
    --io-secs without a job, then as long again while a stream with speed=SPEED copies
    the rest: its operations per second both times, and how much they dropped.
The time runs from the command to BLOCK_JOB_COMPLETED; the median of --reps runs is
printed, with the ratio vubd/qsd. Usage (scripts/bench.sh --jobs does the build):
  scripts/bench_jobs.py --vubd target/release/vubd --vubd-io target/release/vubd-io \
      [--size-mib 1024] [--reps 3] [--kinds stream,commit,speed,backup,io]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from qemu.qmp import QMPClient

MIB = 1 << 20


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def make_chain(d: Path, kind: str, size: int) -> None:
    """stream and mirror: data in base, top an empty overlay; commit: data in mid."""
    for f in d.glob("*.qcow2"):
        f.unlink()
    base, mid, top = d / "base.qcow2", d / "mid.qcow2", d / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size))
    data = base
    if kind == "commit":
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid))
        data = mid
    run("qemu-io", "-c", f"write -P 0x5a 0 {size}", str(data))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(data), "-F", "qcow2", str(top))
    if kind == "backup":
        run("qemu-img", "create", "-q", "-f", "qcow2", str(d / "tgt.qcow2"), str(size))


def backup_target_args(d: Path) -> list[str]:
    return [
        "--blockdev", f"file,node-name=tgt-file,filename={d / 'tgt.qcow2'}",
        "--blockdev", "qcow2,node-name=tgt,file=tgt-file",
    ]


def daemon_args(d: Path) -> list[str]:
    return [
        "--blockdev", f"file,node-name=top-file,filename={d / 'top.qcow2'}",
        "--blockdev", "qcow2,node-name=top,file=top-file",
        "--export", f"vhost-user-blk,id=e,node-name=top,addr.type=unix,addr.path={d / 'e.sock'},writable=on",
        "--chardev", f"socket,id=m,path={d / 'm.sock'},server=on,wait=off",
        "--monitor", "chardev=m",
    ]


async def one(binary: str, d: Path, kind: str, size: int, speed: int) -> float:
    make_chain(d, kind, size)
    extra = backup_target_args(d) if kind == "backup" else []
    p = subprocess.Popen([binary, *daemon_args(d), *extra], stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if (d / "m.sock").exists():
                break
            time.sleep(0.05)
        c = QMPClient()
        await c.connect(str(d / "m.sock"))
        done = asyncio.get_running_loop().create_future()

        async def listen() -> None:
            async for ev in c.events:
                if ev["event"] == "BLOCK_JOB_READY":
                    # A mirror pivots as soon as it is in sync.
                    asyncio.create_task(c.execute("block-job-complete", {"device": "j"}))
                if ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                    done.set_result(ev["data"])
                    return

        task = asyncio.create_task(listen())
        if kind == "commit":
            # The middle node was opened from top's header: find its generated name.
            nodes = await c.execute("query-named-block-nodes", {"flat": True})
            mid = [n["node-name"] for n in nodes
                   if n["drv"] == "qcow2" and n["file"].endswith("mid.qcow2")][0]
            cmd, args = "block-commit", {"job-id": "j", "device": "top", "top-node": mid}
        elif kind == "backup":
            cmd, args = "blockdev-backup", {"job-id": "j", "device": "top", "target": "tgt",
                                            "sync": "full"}
        elif kind == "mirror":
            cmd, args = "drive-mirror", {"job-id": "j", "device": "top", "sync": "full",
                                         "target": str(d / "mirror.qcow2"), "format": "qcow2"}
        else:
            cmd, args = "block-stream", {"job-id": "j", "device": "top"}
        if speed:
            args["speed"] = speed
        t0 = time.monotonic()
        await c.execute(cmd, args)
        data = await asyncio.wait_for(done, 600)
        elapsed = time.monotonic() - t0
        assert "error" not in data, data
        task.cancel()
        try:
            await c.execute("quit")
        except Exception:
            pass
        try:
            await c.disconnect()
        except EOFError:
            # The daemon closed the socket after 'quit' before the client did.
            pass
        p.wait(timeout=30)
        return elapsed
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def stress_ops(vubd_io: str, sock: Path, secs: int) -> float:
    """Operations per second of one `vubd-io stress` run on the export."""
    out = subprocess.run(
        [vubd_io, "stress", "--socket", str(sock), "--seconds", str(secs), "--seed", "7",
         "--span", str(32 * MIB)],
        check=True, capture_output=True, text=True,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["ok"], r
    return (r["reads"] + r["writes"]) / (r["elapsed_ms"] / 1000)


async def io_during_job(binary: str, vubd_io: str, d: Path, size: int, speed: int,
                        secs: int, kind: str = "stream") -> tuple[float, float]:
    """(stress ops/s without a job, with a stream (or a full backup, or a full
    mirror) at `speed` running)."""
    make_chain(d, kind, size)
    extra = backup_target_args(d) if kind == "backup" else []
    p = subprocess.Popen([binary, *daemon_args(d), *extra], stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if (d / "m.sock").exists() and (d / "e.sock").exists():
                break
            time.sleep(0.05)
        c = QMPClient()
        await c.connect(str(d / "m.sock"))
        loop = asyncio.get_running_loop()
        idle = await loop.run_in_executor(None, stress_ops, vubd_io, d / "e.sock", secs)
        if kind == "backup":
            await c.execute("blockdev-backup", {"job-id": "j", "device": "top", "target": "tgt",
                                                "sync": "full", "speed": speed})
        elif kind == "mirror":
            await c.execute("drive-mirror", {"job-id": "j", "device": "top", "sync": "full",
                                             "target": str(d / "mirror.qcow2"), "format": "qcow2",
                                             "speed": speed})
        else:
            await c.execute("block-stream", {"job-id": "j", "device": "top", "speed": speed})
        busy = await loop.run_in_executor(None, stress_ops, vubd_io, d / "e.sock", secs)
        jobs = await c.execute("query-block-jobs")
        assert jobs and jobs[0]["offset"] < size, f"the job ended before the I/O: {jobs}"
        try:
            await c.execute("quit")
        except Exception:
            pass
        try:
            await c.disconnect()
        except EOFError:
            # The daemon closed the socket after 'quit' before the client did.
            pass
        rc = p.wait(timeout=60)
        assert rc == 0, f"{binary} exited with {rc}"
        return idle, busy
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vubd", default="target/release/vubd")
    ap.add_argument("--qsd", default=shutil.which("qemu-storage-daemon"))
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--speed-mib", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vubd-io", default="target/release/vubd-io")
    ap.add_argument("--io-secs", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--kinds", default="stream,commit,speed,backup,mirror,io",
                    help="comma-separated: stream, commit, speed, backup, mirror, io (stress I/O during a "
                         "stream), io-backup (during a backup) or io-mirror (during a mirror)")
    a = ap.parse_args()
    kinds = set(a.kinds.split(","))
    size = a.size_mib * MIB
    d = Path(tempfile.mkdtemp(prefix="vubd-bench-jobs-", dir=a.dir))
    try:
        print(f"| job ({a.size_mib} MiB on {a.dir}) | vubd | qsd | vubd/qsd |")
        print("|---|---:|---:|---:|")
        for label, kind, speed in (("stream", "stream", 0), ("commit", "commit", 0),
                                   ("speed", "stream", a.speed_mib * MIB),
                                   ("backup", "backup", 0), ("mirror", "mirror", 0)):
            if label not in kinds:
                continue
            res: dict[str, list[float]] = {"vubd": [], "qsd": []}
            # The two daemons alternate, rep by rep.
            for _ in range(a.reps):
                for name, binary in (("vubd", a.vubd), ("qsd", a.qsd)):
                    res[name].append(asyncio.run(one(binary, d, kind, size, speed)))
            med = {k: statistics.median(v) for k, v in res.items()}
            if speed:
                rate = {k: size / v / MIB for k, v in med.items()}
                print(f"| {kind}, speed={a.speed_mib} MiB/s: MiB/s reached | {rate['vubd']:.1f} "
                      f"| {rate['qsd']:.1f} | {rate['vubd'] / rate['qsd']:.2f} |")
            else:
                mbs = {k: size / v / MIB for k, v in med.items()}
                print(f"| {kind}: MiB/s (median s) | {mbs['vubd']:.0f} ({med['vubd']:.2f} s) "
                      f"| {mbs['qsd']:.0f} ({med['qsd']:.2f} s) | {mbs['vubd'] / mbs['qsd']:.2f}x |")
        io_kind = ("backup" if "io-backup" in kinds
                   else "mirror" if "io-mirror" in kinds else "stream")
        if not kinds & {"io", "io-backup", "io-mirror"}:
            return
        print()
        print(f"| stress I/O on the export (ops/s), {io_kind} at {a.speed_mib} MiB/s | vubd | qsd "
              "| vubd/qsd |")
        print("|---|---:|---:|---:|")
        io: dict[str, list[tuple[float, float]]] = {"vubd": [], "qsd": []}
        for _ in range(a.reps):
            for name, binary in (("vubd", a.vubd), ("qsd", a.qsd)):
                io[name].append(asyncio.run(io_during_job(
                    binary, a.vubd_io, d, size, a.speed_mib * MIB, a.io_secs, io_kind)))
        idle = {k: statistics.median(x for x, _ in v) for k, v in io.items()}
        busy = {k: statistics.median(y for _, y in v) for k, v in io.items()}
        drop = {k: 100 * (1 - busy[k] / idle[k]) for k in io}
        print(f"| without a job | {idle['vubd']:.0f} | {idle['qsd']:.0f} | {idle['vubd'] / idle['qsd']:.2f}x |")
        print(f"| while the {io_kind} runs | {busy['vubd']:.0f} | {busy['qsd']:.0f} | {busy['vubd'] / busy['qsd']:.2f}x |")
        print(f"| drop | {drop['vubd']:.0f}% | {drop['qsd']:.0f}% | |")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()

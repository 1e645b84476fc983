"""The rbd driver over QMP: blockdev-add with QEMU's options and error texts,
query-named-block-nodes image info, block_resize, blockdev-create, and I/O through an
export, against one single-node Ceph cluster for the session ($CEPH_CONF, or one
started with scripts/ceph.sh)."""

import json
import os
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from conftest import MIB, ROOT, error, execute, export_opts, io_ok

CEPH_SH = ROOT / "scripts" / "ceph.sh"


@pytest.fixture(scope="session")
def ceph_conf():
    """The session's cluster configuration file."""
    conf = os.environ.get("CEPH_CONF")
    if conf and Path(conf).is_file():
        yield conf
        return
    d = tempfile.mkdtemp(prefix="vq-ceph-")
    try:
        out = subprocess.run(
            [str(CEPH_SH), "start", d], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, f"ceph.sh start failed: {out.stdout}\n{out.stderr}"
        conf = next(l[len("CEPH_CONF="):] for l in out.stdout.splitlines() if l.startswith("CEPH_CONF="))
        yield conf
    finally:
        subprocess.run([str(CEPH_SH), "stop", d], timeout=60)
        subprocess.run(["rm", "-rf", d])


def rbd(conf, *args) -> str:
    out = subprocess.run(["rbd", "-c", conf, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"rbd {args}: {out.stderr}"
    return out.stdout


def new_image(conf, size=16 * MIB) -> str:
    name = f"q-{uuid.uuid4().hex[:12]}"
    rbd(conf, "create", "--size", f"{size // MIB}M", f"rbd/{name}")
    return name


def rbd_opts(conf, node, image, **extra) -> dict:
    o = {"driver": "rbd", "node-name": node, "pool": "rbd", "image": image, "conf": conf}
    o.update(extra)
    return o


async def test_blockdev_add_info_and_resize(start_daemon, ceph_conf):
    image = new_image(ceph_conf, 16 * MIB)
    d = start_daemon()
    async with d.qmp() as c:
        await execute(c, "blockdev-add", rbd_opts(ceph_conf, "r0", image))
        nodes = await execute(c, "query-named-block-nodes", {"flat": True})
        (n,) = [n for n in nodes if n["node-name"] == "r0"]
        assert n["drv"] == "rbd" and n["ro"] is False, n
        info = n["image"]
        assert info["format"] == "rbd", info
        assert info["virtual-size"] == 16 * MIB, info
        assert info["cluster-size"] == 4 * MIB, info
        assert info["format-specific"] == {"type": "rbd", "data": {}}, info
        fn = info["filename"]
        assert fn.startswith("json:"), fn
        assert json.loads(fn[5:]) == {"driver": "rbd", "pool": "rbd", "image": image, "conf": ceph_conf}
        await execute(c, "block_resize", {"node-name": "r0", "size": 40 * MIB})
        nodes = await execute(c, "query-named-block-nodes", {"flat": True})
        (n,) = [n for n in nodes if n["node-name"] == "r0"]
        assert n["image"]["virtual-size"] == 40 * MIB
    info = json.loads(rbd(ceph_conf, "info", "--format", "json", f"rbd/{image}"))
    assert info["size"] == 40 * MIB, info


async def test_blockdev_add_errors(start_daemon, ceph_conf):
    image = new_image(ceph_conf)
    d = start_daemon()
    async with d.qmp() as c:
        cases = [
            (rbd_opts(ceph_conf, "e1", "no-such-image"),
             "error reading header from no-such-image: No such file or directory"),
            ({**rbd_opts(ceph_conf, "e2", image), "pool": "nopool"},
             "error opening pool nopool: No such file or directory"),
            ({**rbd_opts(ceph_conf, "e3", image), "conf": "/nonexistent.conf"},
             "error reading conf file /nonexistent.conf: No such file or directory"),
            (rbd_opts(ceph_conf, "e4", image, namespace="nons"), "namespace 'nons' does not exist"),
            (rbd_opts(ceph_conf, "e5", image, **{"key-secret": "sec0"}), "No secret with id 'sec0'"),
            (rbd_opts(ceph_conf, "e6", image, snapshot="nosnap", **{"read-only": True}),
             f"error reading header from {image}: No such file or directory"),
            ({"driver": "rbd", "node-name": "e7", "image": image}, "Parameter 'pool' is missing"),
        ]
        for opts, desc in cases:
            await error(c, "blockdev-add", opts, desc=desc)


async def test_key_secret_names_a_secret_object(start_daemon, ceph_conf):
    """key-secret is looked up in the secret objects and handed to librados as its key
    (the test cluster runs without cephx, so any key connects): a node that names a
    secret opens and reads, in both daemons; one that names none gets QEMU's text."""
    image = new_image(ceph_conf)
    d = start_daemon()
    async with d.qmp() as c:
        await execute(c, "object-add", {"qom-type": "secret", "id": "cephkey",
                                        "data": "AQBJTzBmAAAAABAAwmiNQ3c0Y9p1hBG9sIRrfQ==",
                                        "format": "raw"})
        await execute(c, "blockdev-add", rbd_opts(ceph_conf, "k", image, **{"key-secret": "cephkey"}))
        nodes = await execute(c, "query-named-block-nodes", {"flat": True})
        assert any(n["node-name"] == "k" and n["drv"] == "rbd" for n in nodes), nodes
        await error(c, "blockdev-add", rbd_opts(ceph_conf, "k2", image, **{"key-secret": "nokey"}),
                    desc="No secret with id 'nokey'")


async def test_snapshot_opens_read_only(start_daemon, ceph_conf):
    image = new_image(ceph_conf)
    rbd(ceph_conf, "snap", "create", f"rbd/{image}@s1")
    d = start_daemon()
    async with d.qmp() as c:
        await error(c, "blockdev-add", rbd_opts(ceph_conf, "s", image, snapshot="s1"),
                    desc="rbd snapshots are read-only")
        await execute(c, "blockdev-add",
                      rbd_opts(ceph_conf, "s", image, snapshot="s1", **{"auto-read-only": True}))
        nodes = await execute(c, "query-named-block-nodes", {"flat": True})
        (n,) = [n for n in nodes if n["node-name"] == "s"]
        assert n["ro"] is True, n


async def test_blockdev_create(start_daemon, ceph_conf):
    name = f"qc-{uuid.uuid4().hex[:12]}"
    loc = {"pool": "rbd", "image": name, "conf": ceph_conf}
    d = start_daemon()
    async with d.qmp() as c:
        await execute(c, "blockdev-create", {"job-id": "j1", "options": {
            "driver": "rbd", "location": loc, "size": 8 * MIB, "cluster-size": MIB}})
        job = await wait_concluded(c, "j1")
        assert "error" not in job, job
        await execute(c, "blockdev-create", {"job-id": "j2", "options": {
            "driver": "rbd", "location": loc, "size": 8 * MIB}})
        job = await wait_concluded(c, "j2")
        assert job.get("error") == "error rbd create: File exists", job
        await execute(c, "blockdev-create", {"job-id": "j3", "options": {
            "driver": "rbd", "location": {**loc, "image": name + "x"}, "size": 8 * MIB,
            "cluster-size": 3000}})
        job = await wait_concluded(c, "j3")
        assert job.get("error") == "obj size needs to be power of 2", job
    info = json.loads(rbd(ceph_conf, "info", "--format", "json", f"rbd/{name}"))
    assert info["size"] == 8 * MIB and info["object_size"] == MIB, info


async def wait_concluded(c, job_id):
    import asyncio

    for _ in range(600):
        jobs = await execute(c, "query-jobs")
        (j,) = [j for j in jobs if j["id"] == job_id]
        if j["status"] == "concluded":
            return j
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not conclude: {j}")


async def test_export_io_lands_in_the_image(start_daemon, tmp, ceph_conf):
    """Writes through an export of an rbd node land in the image: `rbd export` of it
    compares equal to a file image written the same way."""
    image = new_image(ceph_conf, 16 * MIB)
    d = start_daemon(["--object", "iothread,id=io0"])
    sock = tmp / "r.sock"
    async with d.qmp() as c:
        await execute(c, "blockdev-add", rbd_opts(ceph_conf, "r0", image))
        await execute(c, "block-export-add", export_opts("x", "r0", sock, iothread="io0"))
        io_ok("write", "--socket", sock, "--offset", 3 * MIB + 512, "--len", 5 * MIB, "--seed", 7)
        io_ok("verify", "--socket", sock, "--offset", 3 * MIB + 512, "--len", 5 * MIB, "--seed", 7)
        await execute(c, "block-export-del", {"id": "x"})
        # The same writes into a file, through a second export.
        ref = tmp / "ref.img"
        with open(ref, "wb") as f:
            f.truncate(16 * MIB)
        await execute(c, "blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(ref)})
        sock2 = tmp / "f.sock"
        await execute(c, "block-export-add", export_opts("y", "f0", sock2))
        io_ok("write", "--socket", sock2, "--offset", 3 * MIB + 512, "--len", 5 * MIB, "--seed", 7)
        await execute(c, "block-export-del", {"id": "y"})
    out = tmp / "exported.img"
    rbd(ceph_conf, "export", "--no-progress", f"rbd/{image}", str(out))
    assert out.read_bytes() == ref.read_bytes()


async def test_unreachable_cluster_fails_within_the_mount_timeout(start_daemon, tmp):
    """No monitor answers: blockdev-add fails with QEMU's text once librados'
    client_mount_timeout (from the conf file) has passed, and the monitor goes on."""
    conf = tmp / "unreachable.conf"
    conf.write_text(
        "[global]\nmon host = 127.0.0.1:1\nauth client required = none\n"
        "client mount timeout = 2\nkeyring = /dev/null\n"
    )
    d = start_daemon()
    async with d.qmp() as c:
        for extra in ({}, {"server": [{"host": "127.0.0.1", "port": "2"}]}):
            opts = {"driver": "rbd", "node-name": "u", "pool": "rbd", "image": "x",
                    "conf": str(conf), **extra}
            await error(c, "blockdev-add", opts, desc="error connecting: Connection timed out")
        assert "u" not in {n["node-name"] for n in await execute(c, "query-named-block-nodes")}

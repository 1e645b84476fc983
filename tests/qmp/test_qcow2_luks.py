"""qcow2 with encrypt.format=luks: blockdev-add errors (QEMU's texts), data
interoperability with qemu-img/qemu-io for every cipher combination QEMU 7.2 creates,
copy-on-write over backing files (plain or encrypted with their own secret),
blockdev-create and ``vubd img create`` with encryption, and SIGKILL during writes."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from chains import (JobEvents, create_timing_pbkdf2, pattern, run, run_timing_pbkdf2,
                    write_raw)
from conftest import (MIB, IoProc, error, execute, export_args, io_ok, vubd_bin,
                      wait_image_unlocked)
from test_luks import COMBOS, PASSWORD, combo_opts, qemu_img_luks, secret_object, shut_down

OTHER = "0th3r"


def qemu_img_qcow2_luks(path: Path, size: str = "4M", sid: str = "sec0", pw: str = PASSWORD,
                        backing: Path | None = None, backing_fmt: str = "raw",
                        qcow2_opts: str = "", **luks) -> Path:
    """A qcow2 image with LUKS encryption made by qemu-img (retried when qemu-img cannot
    time its key derivation on a loaded machine)."""
    o = ",".join(["encrypt.format=luks", f"encrypt.key-secret={sid}", "encrypt.iter-time=10",
                  *(f"encrypt.{k}={v}" for k, v in luks.items())])
    if qcow2_opts:
        o += "," + qcow2_opts
    args = ["qemu-img", "create", "-f", "qcow2", "--object", secret_object(sid, pw), "-o", o]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt]
    run_timing_pbkdf2(*args, path, size)
    return path


def q_opts(img: Path, extra: str = "") -> str:
    return f"driver=qcow2,encrypt.key-secret=sec0,file.filename={img}{extra}"


def qemu_io_q(img: Path, *cmds: str, extra: str = ""):
    args = []
    for c in cmds:
        args += ["-c", c]
    run("qemu-io", "--object", secret_object(), "--object", secret_object("sec1", OTHER),
        "--image-opts", q_opts(img, extra), *args)


def compare_q(img: Path, expected: Path, extra: str = ""):
    """qemu-img (given the secrets) reads the image as the raw file ``expected``."""
    run("qemu-img", "compare", "--object", secret_object(), "--object",
        secret_object("sec1", OTHER), "--image-opts",
        f"driver=raw,file.filename={expected}", q_opts(img, extra))


def check_q(img: Path, extra: str = "") -> subprocess.CompletedProcess:
    return run("qemu-img", "check", "--object", secret_object(), "--object",
               secret_object("sec1", OTHER), "--image-opts", q_opts(img, extra), ok=False)


def q_daemon_args(img: Path, sock: Path, extra: str = "", key: str = "sec0") -> list[str]:
    return [
        "--object", secret_object(),
        "--object", secret_object("sec1", OTHER),
        "--blockdev", f"file,node-name=f0,filename={img}",
        "--blockdev", f"qcow2,node-name=q0,file=f0,encrypt.format=luks,"
                      f"encrypt.key-secret={key}{extra}",
        *export_args("e0", "q0", sock),
    ]


async def test_qcow2_luks_blockdev_add_errors(start_daemon, tmp):
    img = qemu_img_qcow2_luks(tmp / "e.qcow2")
    plain = tmp / "p.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", plain, "1M")
    d = start_daemon(["--object", secret_object(), "--object", "secret,id=bad,data=wrong",
                      "--blockdev", f"file,node-name=f0,filename={img}",
                      "--blockdev", f"file,node-name=f1,filename={plain}"])

    def q(**kw):
        return {"driver": "qcow2", "node-name": "q0", "file": "f0", **kw}

    async with d.qmp() as c:
        await error(c, "blockdev-add", q(),
                    desc="Parameter 'encrypt.key-secret' is required for cipher")
        await error(c, "blockdev-add", q(**{"read-only": True}),
                    desc="Parameter 'encrypt.key-secret' is required for cipher")
        await error(c, "blockdev-add", q(encrypt={"key-secret": "sec0"}),
                    desc="Parameter 'encrypt.format' is missing")
        await error(c, "blockdev-add", q(encrypt={"format": "luks", "key-secret": "nope"}),
                    desc="No secret with id 'nope'")
        await error(c, "blockdev-add", q(encrypt={"format": "luks", "key-secret": "bad"}),
                    desc="Invalid password, cannot unlock any keyslot")
        await error(c, "blockdev-add", q(encrypt={"format": "aes", "key-secret": "sec0"}),
                    desc="Header reported 'luks' encryption format but options specify 'aes'")
        await error(c, "blockdev-add",
                    q(file="f1", encrypt={"format": "luks", "key-secret": "sec0"}),
                    desc="No encryption in image header, but options specified format 'luks'")
        await execute(c, "blockdev-add", q(encrypt={"format": "luks", "key-secret": "sec0"}))
        nodes = await execute(c, "query-named-block-nodes", {"flat": True})
        q0 = next(n for n in nodes if n["node-name"] == "q0")
        assert q0["encrypted"] is True
        assert q0["image"]["encrypted"] is True
        enc = q0["image"]["format-specific"]["data"]["encrypt"]
        assert (enc["format"], enc["cipher-alg"], enc["cipher-mode"], enc["ivgen-alg"]) == \
            ("luks", "aes-256", "xts", "plain64")
        assert enc["slots"][0]["active"] is True
        # The secret may go once the image is open.
        await execute(c, "object-del", {"id": "sec0"})
        await execute(c, "blockdev-del", {"node-name": "q0"})


@pytest.mark.vubd_only("qemu-storage-daemon opens the old AES encryption; vubd refuses it")
async def test_qcow2_aes_refused(start_daemon, tmp):
    img = tmp / "aes.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
    b = bytearray(img.read_bytes())
    b[32:36] = (1).to_bytes(4, "big")
    img.write_bytes(b)
    d = start_daemon(["--object", secret_object(),
                      "--blockdev", f"file,node-name=f0,filename={img}"])
    async with d.qmp() as c:
        await error(c, "blockdev-add", {
            "driver": "qcow2", "node-name": "q0", "file": "f0",
            "encrypt": {"format": "aes", "key-secret": "sec0"}},
            contains=["AES-encrypted qcow2 images are not supported"])


@pytest.mark.parametrize("alg,mode,ivgen,hash", COMBOS, ids=["-".join(c) for c in COMBOS])
async def test_qcow2_luks_interop(start_daemon, tmp, alg, mode, ivgen, hash):
    """An image qemu-img made and qemu-io filled reads identically through the daemon
    (vhost-user-blk, libblkio); what the daemon writes (in place, and partial clusters
    of unallocated space: copy-on-write of encrypted zeroes) qemu-img reads back."""
    size = 4 * MIB
    img = qemu_img_qcow2_luks(tmp / "q.qcow2", **combo_opts(alg, mode, ivgen, hash))
    src = write_raw(tmp / "src.raw", pattern(1, 0, 2 * MIB))
    qemu_io_q(img, f"write -q -s {src} 0 {2 * MIB}")
    sock = tmp / "e0.sock"
    d = start_daemon(q_daemon_args(img, sock))
    io_ok("verify", "--socket", sock, "--offset", 0, "--len", 2 * MIB, "--seed", 1)
    io_ok("write", "--socket", sock, "--offset", 3 * 512, "--len", 300 * 512, "--seed", 2)
    io_ok("write", "--socket", sock, "--offset", 3 * MIB + 1536, "--len", 5 * 512, "--seed", 3)
    io_ok("verify", "--socket", sock, "--offset", 3 * 512, "--len", 300 * 512, "--seed", 2)
    io_ok("verify", "--socket", sock, "--offset", 3 * MIB + 1536, "--len", 5 * 512, "--seed", 3)
    shut_down(d)
    want = bytearray(size)
    want[:2 * MIB] = pattern(1, 0, 2 * MIB)
    want[3 * 512:303 * 512] = pattern(2, 3 * 512, 300 * 512)
    want[3 * MIB + 1536:3 * MIB + 1536 + 2560] = pattern(3, 3 * MIB + 1536, 2560)
    compare_q(img, write_raw(tmp / "want.raw", want))
    assert check_q(img).returncode == 0


@pytest.mark.parametrize("base_kind", ["raw", "raw-extended-l2", "qcow2-luks"])
async def test_qcow2_luks_backing(start_daemon, tmp, base_kind):
    """Partial-cluster writes over a backing file (unencrypted, or encrypted with its
    own secret): the daemon copies the backing data around them into the encrypted
    overlay (with extended L2 entries: into the written subclusters only); qemu-img
    reads the same."""
    size = 4 * MIB
    base_data = pattern(7, 0, size)
    if base_kind.startswith("raw"):
        base = write_raw(tmp / "base.raw", base_data)
        extra_q, base_args, bfmt = "", [], "raw"
    else:
        base = qemu_img_qcow2_luks(tmp / "base.qcow2", sid="sec1", pw=OTHER)
        src = write_raw(tmp / "src.raw", base_data)
        run("qemu-io", "--object", secret_object("sec1", OTHER), "--image-opts",
            f"driver=qcow2,encrypt.key-secret=sec1,file.filename={base}",
            "-c", f"write -q -s {src} 0 {size}")
        extra_q = ",backing.encrypt.key-secret=sec1"
        base_args = ["--blockdev", f"file,node-name=fb,filename={base}",
                     "--blockdev", "qcow2,node-name=b0,file=fb,read-only=on,"
                                   "encrypt.format=luks,encrypt.key-secret=sec1"]
        bfmt = "qcow2"
    img = qemu_img_qcow2_luks(tmp / "top.qcow2", backing=base, backing_fmt=bfmt,
                              qcow2_opts="extended_l2=on" if "extended" in base_kind else "")
    sock = tmp / "e0.sock"
    args = q_daemon_args(img, sock, extra=",backing=b0" if base_args else "")
    args[4:4] = base_args
    d = start_daemon(args)
    writes = [(512, 1024, 11), (65536 + 4096, 512, 12), (3 * 65536 - 1024, 2048, 13),
              (MIB + 7 * 512, 20 * 512, 14)]
    for off, n, seed in writes:
        io_ok("write", "--socket", sock, "--offset", off, "--len", n, "--seed", seed)
    want = bytearray(base_data)
    for off, n, seed in writes:
        want[off:off + n] = pattern(seed, off, n)
    # The rest of each written cluster, and clusters not written, come from the base.
    for off, n, seed in writes:
        c0 = off // 65536 * 65536
        io_ok("verify", "--socket", sock, "--offset", off, "--len", n, "--seed", seed)
        io_ok("verify", "--socket", sock, "--offset", c0, "--len", off - c0, "--seed", 7) \
            if off > c0 else None
    shut_down(d)
    compare_q(img, write_raw(tmp / "want.raw", want), extra=extra_q)
    r = check_q(img, extra_q)
    assert r.returncode == 0, r.stdout + r.stderr


async def test_qcow2_luks_blockdev_create(start_daemon, tmp):
    """blockdev-create driver=qcow2 with encrypt makes an image qemu-img opens and
    checks clean; data written through the daemon reads back in qemu-img."""
    img = tmp / "new.qcow2"
    img.write_bytes(b"")
    sock = tmp / "e0.sock"
    d = start_daemon(["--object", secret_object(),
                      "--blockdev", f"file,node-name=f0,filename={img}"])
    opts = combo_opts("aes-128", "cbc", "essiv", "sha1")
    async with d.qmp() as c:
        ev = JobEvents(c)
        await create_timing_pbkdf2(c, ev, {
            "driver": "qcow2", "file": "f0", "size": 2 * MIB,
            "encrypt": {"format": "luks", "key-secret": "sec0", "iter-time": 10, **opts}})
        await execute(c, "blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "f0",
                                          "encrypt": {"format": "luks", "key-secret": "sec0"}})
        nodes = await execute(c, "query-named-block-nodes", {"flat": True})
        q0 = next(n for n in nodes if n["node-name"] == "q0")
        enc = q0["image"]["format-specific"]["data"]["encrypt"]
        assert (enc["cipher-alg"], enc["cipher-mode"], enc["ivgen-alg"], enc["hash-alg"]) == \
            ("aes-128", "cbc", "essiv", "sha1")
        await execute(c, "block-export-add", {
            "type": "vhost-user-blk", "id": "e0", "node-name": "q0",
            "addr": {"type": "unix", "path": str(sock)}, "writable": True})
    io_ok("write", "--socket", sock, "--offset", MIB + 512, "--len", 4096, "--seed", 5)
    shut_down(d)
    want = bytearray(2 * MIB)
    want[MIB + 512:MIB + 512 + 4096] = pattern(5, MIB + 512, 4096)
    compare_q(img, write_raw(tmp / "want.raw", want))
    assert check_q(img).returncode == 0
    assert "encrypted: yes" in run("qemu-img", "info", img).stdout


async def test_vubd_img_create_qcow2_luks(start_daemon, tmp):
    """`vubd img create -f qcow2 -o encrypt.*` makes an image qemu-img opens, checks
    clean and reads; `vubd img info` shows the encryption, `vubd img check` counts the
    LUKS header clusters after qemu-io and the daemon wrote."""
    img = tmp / "v.qcow2"
    run(vubd_bin(), "img", "create", "-f", "qcow2", "--object", secret_object(),
        "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,"
              "encrypt.cipher-alg=aes-128", img, "4M")
    info = run(vubd_bin(), "img", "info", img).stdout
    assert "encrypted: yes" in info and "format: luks" in info and "aes-128" in info, info
    qemu_io_q(img, "write -q -P 0x5a 65536 131072")
    sock = tmp / "e0.sock"
    d = start_daemon(q_daemon_args(img, sock))
    io_ok("write", "--socket", sock, "--offset", 2 * MIB + 512, "--len", 1024, "--seed", 9)
    shut_down(d)
    want = bytearray(4 * MIB)
    want[65536:65536 + 131072] = b"\x5a" * 131072
    want[2 * MIB + 512:2 * MIB + 1536] = pattern(9, 2 * MIB + 512, 1024)
    compare_q(img, write_raw(tmp / "want.raw", want))
    assert check_q(img).returncode == 0
    assert "No errors were found" in run(vubd_bin(), "img", "check", img).stdout
    # vubd img takes no secrets to read with: it never copies ciphertext out.
    bad = run(vubd_bin(), "img", "convert", "-O", "raw", img, tmp / "out.raw", ok=False)
    assert bad.returncode != 0 and "encrypted" in bad.stderr, bad.stderr
    # Without the passphrase nothing is created.
    bad = run(vubd_bin(), "img", "create", "-f", "qcow2", "-o",
              "encrypt.format=luks", tmp / "x.qcow2", "1M", ok=False)
    assert bad.returncode != 0 and "encrypt.key-secret" in bad.stderr, bad.stderr
    assert not (tmp / "x.qcow2").exists()


async def test_qcow2_luks_sigkill_during_writes(start_daemon, tmp, io_procs):
    """SIGKILL while a frontend writes: the image opens in qemu-img with its passphrase,
    has no corruption (leaks at most), and what was written before reads back."""
    size = 4 * MIB
    img = qemu_img_qcow2_luks(tmp / "q.qcow2")
    sock = tmp / "e0.sock"
    d = start_daemon(q_daemon_args(img, sock))
    io_ok("write", "--socket", sock, "--offset", 3 * MIB, "--len", MIB, "--seed", 21)
    io = IoProc(tmp, "stress", "--socket", sock, "--seconds", 30, "--seed", 22,
                "--span", 2 * MIB)
    io_procs.append(io)
    await io.ready()
    time.sleep(0.5)
    d.proc.kill()
    d.proc.wait()
    d.expect_exit = True
    io.kill()
    wait_image_unlocked(img)
    r = check_q(img)
    assert r.returncode in (0, 3), r.stdout + r.stderr
    out = tmp / "read.raw"
    run("qemu-img", "convert", "--object", secret_object(), "--image-opts", q_opts(img),
        "-O", "raw", out)
    assert out.read_bytes()[3 * MIB:] == pattern(21, 3 * MIB, MIB)
    assert size == out.stat().st_size


async def test_qcow2_luks_snapshot_cow(start_daemon, tmp):
    """Writes into clusters an internal snapshot shares: the daemon decrypts the old
    cluster with its host offsets and encrypts the copy for the new cluster; the
    snapshot keeps the old data (qemu-img reverts to it)."""
    size = 4 * MIB
    img = qemu_img_qcow2_luks(tmp / "q.qcow2")
    src = write_raw(tmp / "src.raw", pattern(1, 0, MIB))
    qemu_io_q(img, f"write -q -s {src} 0 {MIB}")
    run("qemu-img", "snapshot", "--object", secret_object(), "--image-opts", q_opts(img),
        "-c", "s1")
    sock = tmp / "e0.sock"
    d = start_daemon(q_daemon_args(img, sock))
    io_ok("write", "--socket", sock, "--offset", 65536 + 512, "--len", 1024, "--seed", 2)
    io_ok("verify", "--socket", sock, "--offset", 65536 + 1536, "--len", 65536 - 1536,
          "--seed", 1)
    shut_down(d)
    want = bytearray(size)
    want[:MIB] = pattern(1, 0, MIB)
    want[65536 + 512:65536 + 1536] = pattern(2, 65536 + 512, 1024)
    compare_q(img, write_raw(tmp / "want.raw", want))
    assert check_q(img).returncode == 0
    run("qemu-img", "snapshot", "--object", secret_object(), "--image-opts", q_opts(img),
        "-a", "s1")
    want[:MIB] = pattern(1, 0, MIB)
    compare_q(img, write_raw(tmp / "want.raw", want))


async def test_qcow2_luks_bad_header(start_daemon, tmp):
    """A qcow2 image whose LUKS header is not one: QEMU's error, no crash."""
    img = qemu_img_qcow2_luks(tmp / "q.qcow2")
    b = bytearray(img.read_bytes())
    # The crypto header extension follows the 112-byte header: type, length, offset.
    assert int.from_bytes(b[112:116], "big") == 0x0537BE77
    off = int.from_bytes(b[120:128], "big")
    b[off:off + 6] = b"NOLUKS"
    img.write_bytes(b)
    d = start_daemon(["--object", secret_object(),
                      "--blockdev", f"file,node-name=f0,filename={img}"])
    async with d.qmp() as c:
        await error(c, "blockdev-add", {
            "driver": "qcow2", "node-name": "q0", "file": "f0",
            "encrypt": {"format": "luks", "key-secret": "sec0"}},
            desc="Volume is not in LUKS format")


@pytest.mark.vubd_only("vubd's bounds on the crypto header pointer")
async def test_qcow2_luks_header_pointer_past_eof(start_daemon, tmp):
    img = qemu_img_qcow2_luks(tmp / "q.qcow2")
    b = bytearray(img.read_bytes())
    assert int.from_bytes(b[112:116], "big") == 0x0537BE77
    b[128:136] = (1 << 40).to_bytes(8, "big")
    img.write_bytes(b)
    d = start_daemon(["--object", secret_object(),
                      "--blockdev", f"file,node-name=f0,filename={img}"])
    async with d.qmp() as c:
        await error(c, "blockdev-add", {
            "driver": "qcow2", "node-name": "q0", "file": "f0",
            "encrypt": {"format": "luks", "key-secret": "sec0"}},
            contains=["Encryption header length"])


async def amend_job(c, ev: JobEvents, node: str, options: dict, force: bool = False):
    """Runs x-blockdev-amend to its end; returns the job's error (None on success)."""
    args = {"job-id": "a", "node-name": node, "options": options}
    if force:
        args["force"] = True
    assert await execute(c, "x-blockdev-amend", args) == {}
    await ev.until("a", "concluded")
    j = await execute(c, "query-jobs")
    assert await execute(c, "job-dismiss", {"id": "a"}) == {}
    await ev.until("a", "null")
    return j[0].get("error")


def active_slots(info: dict) -> list[int]:
    return [i for i, s in enumerate(info["slots"]) if s["active"]]


#: x-blockdev-amend key-slot options that fail in the job, on a volume whose slot 0
#: holds sec0 (the secret it was opened with), and QEMU's texts.
AMEND_ERRORS = [
    ({"state": "active"}, "'new-secret' is required to activate a keyslot"),
    ({"state": "active", "new-secret": "sec1", "old-secret": "sec0"},
     "'old-secret' must not be given when activating keyslots"),
    ({"state": "active", "new-secret": "sec1", "keyslot": 0},
     "Refusing to overwrite active keyslot 0 - please erase it first"),
    ({"state": "active", "new-secret": "sec1", "keyslot": 9},
     "Invalid keyslot 9 specified, must be between 0 and 7"),
    ({"state": "active", "new-secret": "sec1", "keyslot": -1},
     "Invalid keyslot 4294967295 specified, must be between 0 and 7"),
    ({"state": "active", "new-secret": "nosuch", "iter-time": 10}, "No secret with id 'nosuch'"),
    ({"state": "active", "new-secret": "sec1", "secret": "nosuch", "iter-time": 10},
     "No secret with id 'nosuch'"),
    ({"state": "active", "new-secret": "sec1", "secret": "sec1", "iter-time": 10},
     "Invalid password, cannot unlock any keyslot"),
    ({"state": "inactive"}, "To erase keyslot(s), either explicit keyslot index or the "
     "password currently contained in them must be given"),
    ({"state": "inactive", "keyslot": 0}, "Attempt to erase the only active keyslot 0 which "
     "will erase all the data in the image irreversibly - refusing operation"),
    ({"state": "inactive", "keyslot": 2}, "Given keyslot 2 is already erased (inactive) "),
    ({"state": "inactive", "old-secret": "sec1"},
     "No keyslots match given (old) password for erase operation"),
]


@pytest.mark.parametrize("driver", ["luks", "qcow2"])
async def test_blockdev_amend_key_slots(start_daemon, tmp, driver):
    """x-blockdev-amend adds and erases key slots of a luks node and of an encrypted
    qcow2 node made by qemu-img, with QEMU's rules and texts (errors in the job);
    the node's format-specific info follows, and afterwards qemu-io opens the image
    with the new passphrase only."""
    if driver == "luks":
        img = qemu_img_luks(tmp / "l.img", size="1M")
        node = "luks,node-name=n0,file=f0,key-secret=sec0"

        def wrap(o):
            return {"driver": "luks", **o}

        def encrypt_info(fs):
            return fs["data"]

        def opts(sid):
            return f"driver=luks,key-secret={sid},file.filename={img}"
    else:
        img = qemu_img_qcow2_luks(tmp / "q.qcow2", size="1M")
        node = "qcow2,node-name=n0,file=f0,encrypt.format=luks,encrypt.key-secret=sec0"

        def wrap(o):
            return {"driver": "qcow2", "encrypt": {"format": "luks", **o}}

        def encrypt_info(fs):
            return fs["data"]["encrypt"]

        def opts(sid):
            return f"driver=qcow2,encrypt.key-secret={sid},file.filename={img}"
    d = start_daemon(["--object", secret_object(), "--object", secret_object("sec1", OTHER),
                      "--blockdev", f"file,node-name=f0,filename={img}", "--blockdev", node])

    async def slots(c):
        for n in await execute(c, "query-named-block-nodes"):
            if n["node-name"] == "n0":
                return active_slots(encrypt_info(n["image"]["format-specific"]))
        raise AssertionError("no node n0")

    async with d.qmp() as c:
        ev = JobEvents(c)
        assert await slots(c) == [0]
        for o, err in AMEND_ERRORS:
            assert await amend_job(c, ev, "n0", wrap(o)) == err, o
        assert await slots(c) == [0]
        assert await amend_job(c, ev, "n0", wrap(
            {"state": "active", "new-secret": "sec1", "keyslot": 3, "iter-time": 10})) is None
        assert await slots(c) == [0, 3]
        assert await amend_job(c, ev, "n0", wrap(
            {"state": "inactive", "old-secret": "sec0"})) is None
        assert await slots(c) == [3]
        # The node was opened with sec0, whose slot is gone: adding now needs `secret`.
        assert await amend_job(c, ev, "n0", wrap(
            {"state": "active", "new-secret": "sec0", "iter-time": 10})) == (
            "Invalid password, cannot unlock any keyslot")
        # force overwrites an active slot.
        assert await amend_job(c, ev, "n0", wrap(
            {"state": "active", "new-secret": "sec1", "secret": "sec1", "keyslot": 3,
             "iter-time": 10}), force=True) is None
        assert await slots(c) == [3]
        assert await amend_job(c, ev, "n0", wrap(
            {"state": "active", "new-secret": "sec1", "secret": "sec1", "keyslot": 4,
             "iter-time": 10})) is None
        assert await slots(c) == [3, 4]
        # Erasing unlocks nothing (sec0, the node's secret, opens no slot now).
        assert await amend_job(c, ev, "n0", wrap({"state": "inactive", "keyslot": 4})) is None
        assert await slots(c) == [3]
        if driver == "qcow2":
            assert await amend_job(c, ev, "n0", {
                "driver": "qcow2", "encrypt": {"format": "qcow"}}) == (
                "Amend can't be used to change the qcow2 encryption format")
    shut_down(d)
    objs = ["--object", secret_object(), "--object", secret_object("sec1", OTHER)]
    run("qemu-io", *objs, "--image-opts", opts("sec1"), "-c", "read 0 4k")
    p = run("qemu-io", *objs, "--image-opts", opts("sec0"), "-c", "read 0 4k", ok=False)
    assert "Invalid password, cannot unlock any keyslot" in p.stderr + p.stdout
    if driver == "qcow2":
        p = run("qemu-img", "check", *objs, "--image-opts", opts("sec1"))
        assert "No errors were found" in p.stdout, p.stdout


def vubd_amend(path: Path, o: str, key: str = "sec0", ok: bool = True):
    return run(vubd_bin(), "img", "amend", "--object", secret_object(), "--object",
               secret_object("sec1", OTHER), "--image-opts", "-o", o,
               f"driver=qcow2,encrypt.key-secret={key},file.filename={path}", ok=ok)


@pytest.mark.vubd_only("vubd img is vubd's tool")
async def test_img_amend_qcow2_key_slots(start_daemon, tmp):
    """`vubd img amend` changes the key slots of a qcow2 image qemu-img encrypted, in
    place; qemu-img then opens it with the new passphrase only and checks it clean.
    The other way round, qemu-img amend changes the slots of an image vubd created,
    which the daemon then opens with the new passphrase."""
    img = qemu_img_qcow2_luks(tmp / "q.qcow2", size="1M")
    qemu_io_q(img, "write -q -P 0x3c 0 64k")
    size = img.stat().st_size
    objs = ["--object", secret_object(), "--object", secret_object("sec1", OTHER)]
    vubd_amend(img, "encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=5,"
                    "encrypt.iter-time=10")
    info = json.loads(run("qemu-img", "info", "--output", "json", img).stdout)
    assert active_slots(info["format-specific"]["data"]["encrypt"]) == [0, 5]
    assert img.stat().st_size == size
    for o, text in [
        ("encrypt.state=inactive,encrypt.keyslot=4", "Given keyslot 4 is already erased"),
        ("encrypt.format=qcow,encrypt.state=inactive",
         "Amend can't be used to change the qcow2 encryption format"),
        ("encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10,encrypt.bogus=1",
         "bogus"),
    ]:
        p = vubd_amend(img, o, ok=False)
        assert p.returncode != 0 and text in p.stderr, p.stderr
    # As qemu-img, which opens the image with its key first: erasing too.
    p = vubd_amend(img, "encrypt.state=inactive,encrypt.keyslot=5", key="nosuch", ok=False)
    assert "No secret with id 'nosuch'" in p.stderr, p.stderr
    vubd_amend(img, "encrypt.state=inactive,encrypt.keyslot=0")
    new = f"driver=qcow2,encrypt.key-secret=sec1,file.filename={img}"
    run("qemu-io", *objs, "--image-opts", new, "-c", "read -P 0x3c 0 64k")
    p = run("qemu-io", *objs, "--image-opts", q_opts(img), "-c", "read 0 4k", ok=False)
    assert "Invalid password, cannot unlock any keyslot" in p.stderr + p.stdout
    assert "No errors were found" in run("qemu-img", "check", *objs, "--image-opts", new).stdout
    plain = tmp / "p.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", plain, "1M")
    p = vubd_amend(plain, "encrypt.state=inactive,encrypt.keyslot=0", ok=False)
    assert "image is not encrypted, can't amend" in p.stderr, p.stderr

    # vubd creates, qemu-img amends, vubd opens with the new passphrase only.
    v = tmp / "v.qcow2"
    run(vubd_bin(), "img", "create", "-f", "qcow2", *objs, "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", v, "1M")
    run_timing_pbkdf2("qemu-img", "amend", *objs, "--image-opts", "-o",
                      "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10",
                      q_opts(v))
    run("qemu-img", "amend", *objs, "--image-opts", "-o",
        "encrypt.state=inactive,encrypt.old-secret=sec0", q_opts(v))
    sock = tmp / "e0.sock"
    d = start_daemon(q_daemon_args(v, sock, key="sec1"))
    io_ok("write", "--socket", sock, "--offset", 0, "--len", 65536, "--seed", 4)
    shut_down(d)
    want = bytearray(MIB)
    want[:65536] = pattern(4, 0, 65536)
    run("qemu-img", "compare", *objs, "--image-opts",
        f"driver=raw,file.filename={write_raw(tmp / 'want.raw', want)}",
        f"driver=qcow2,encrypt.key-secret=sec1,file.filename={v}")


def mapped(img: Path, objs: list) -> list[dict]:
    return json.loads(run("qemu-img", "map", "--output", "json", *objs, "--image-opts",
                          q_opts(img)).stdout)


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
async def test_qcow2_luks_preallocation(start_daemon, tmp, prealloc):
    """Encryption with preallocation, as QEMU allows it: blockdev-create and `vubd img
    create` map every data cluster (qemu-img map: data, not zero) in a file of the
    size qemu-img makes, checked clean; what the daemon writes reads back in
    qemu-img."""
    objs = ["--object", secret_object()]
    ref = qemu_img_qcow2_luks(tmp / "ref.qcow2", size="1M", qcow2_opts=f"preallocation={prealloc}")
    want_map = [{"start": 0, "length": MIB, "depth": 0, "present": True, "zero": False,
                 "data": True}]
    assert [{k: v for k, v in m.items() if k != "offset"} for m in mapped(ref, objs)] == want_map
    img = tmp / "new.qcow2"
    img.write_bytes(b"")
    sock = tmp / "e0.sock"
    d = start_daemon(["--object", secret_object(),
                      "--blockdev", f"file,node-name=f0,filename={img}"])
    async with d.qmp() as c:
        ev = JobEvents(c)
        await create_timing_pbkdf2(c, ev, {
            "driver": "qcow2", "file": "f0", "size": MIB, "preallocation": prealloc,
            "encrypt": {"format": "luks", "key-secret": "sec0", "iter-time": 10}})
        await execute(c, "blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "f0",
                                          "encrypt": {"format": "luks", "key-secret": "sec0"}})
        await execute(c, "block-export-add", {
            "type": "vhost-user-blk", "id": "e0", "node-name": "q0", "writable": True,
            "addr": {"type": "unix", "path": str(sock)}})
        io_ok("write", "--socket", sock, "--offset", 8192, "--len", 4096, "--seed", 3)
    shut_down(d)
    assert img.stat().st_size == ref.stat().st_size
    assert [{k: v for k, v in m.items() if k != "offset"} for m in mapped(img, objs)] == want_map
    assert check_q(img).returncode == 0
    got = tmp / "got.raw"
    run("qemu-img", "convert", *objs, "--image-opts", q_opts(img), "-O", "raw", got)
    assert got.read_bytes()[8192:12288] == pattern(3, 8192, 4096)
    if d.kind == "vubd":
        v = tmp / "v.qcow2"
        run(vubd_bin(), "img", "create", "-f", "qcow2", *objs, "-o",
            f"encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,"
            f"preallocation={prealloc}", v, "1M")
        assert v.stat().st_size == ref.stat().st_size
        assert [{k: v for k, v in m.items() if k != "offset"} for m in mapped(v, objs)] == want_map
        assert check_q(v).returncode == 0


async def test_blockdev_amend_read_only(start_daemon, tmp, kind):
    """x-blockdev-amend of a read-only luks node is refused at once, with QEMU's text
    (qemu-storage-daemon 7.2 aborts on a read-only qcow2 node: vubd refuses it too)."""
    img = qemu_img_luks(tmp / "l.img", size="1M")
    q = qemu_img_qcow2_luks(tmp / "q.qcow2", size="1M")
    d = start_daemon(["--object", secret_object(), "--object", secret_object("sec1", OTHER),
                      "--blockdev", f"file,node-name=f0,filename={img},read-only=on",
                      "--blockdev", "luks,node-name=l0,file=f0,key-secret=sec0,read-only=on",
                      "--blockdev", f"file,node-name=f1,filename={q}",
                      "--blockdev", "qcow2,node-name=q0,file=f1,encrypt.format=luks,"
                                    "encrypt.key-secret=sec0,read-only=on"])
    add = {"state": "active", "new-secret": "sec1", "iter-time": 10}
    async with d.qmp() as c:
        await error(c, "x-blockdev-amend", {"job-id": "a", "node-name": "l0",
                                            "options": {"driver": "luks", **add}},
                    desc="Block node is read-only")
        if kind == "vubd":
            await error(c, "x-blockdev-amend", {
                "job-id": "a", "node-name": "q0",
                "options": {"driver": "qcow2", "encrypt": {"format": "luks", **add}}},
                desc="Block node is read-only")
        assert await execute(c, "query-jobs") == []

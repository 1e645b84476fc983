"""Secret objects (object-add qom-type=secret) and the luks driver's blockdev-add
errors."""

import base64
import os
import subprocess
import time
from pathlib import Path

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from conftest import MIB, error, execute

PASSWORD = "s3cr3t"


def secret(sid: str, **opts) -> dict:
    return {"qom-type": "secret", "id": sid, **opts}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encrypt_secret(key: bytes, iv: bytes, plain: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    data = padder.update(plain) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def qemu_img_luks(path: Path, size: str = "4M", **opts):
    """A LUKS image made by qemu-img with PASSWORD (retried when qemu-img cannot time
    its key derivation, which it sometimes fails on a loaded machine)."""
    o = ",".join(["key-secret=sec0", "iter-time=10", *(f"{k}={v}" for k, v in opts.items())])
    for _ in range(5):
        p = subprocess.run(
            ["qemu-img", "create", "-f", "luks", "--object",
             f"secret,id=sec0,data={PASSWORD}", "-o", o, str(path), size],
            capture_output=True, text=True,
        )
        if p.returncode == 0:
            return path
        assert "Unable to get accurate CPU usage" in p.stderr, p.stderr
        time.sleep(0.2)
    raise AssertionError(f"qemu-img create failed: {p.stderr}")


async def test_secret_add_del(daemon, tmp):
    f = tmp / "pw"
    f.write_bytes(b"from-file")
    async with daemon.qmp() as c:
        assert await execute(c, "object-add", secret("s1", data="abc")) == {}
        await execute(c, "object-add", secret("s2", file=str(f)))
        await execute(c, "object-add", secret("s3", data=b64(b"xyz"), format="base64"))
        key, iv = os.urandom(32), os.urandom(16)
        await execute(c, "object-add", secret("k", data=b64(key), format="base64"))
        await execute(
            c,
            "object-add",
            secret("s4", data=b64(encrypt_secret(key, iv, b"pw")), format="base64",
                   keyid="k", iv=b64(iv)),
        )
        # Ids are one namespace with iothreads.
        await error(
            c, "object-add", secret("io0", data="x"),
            desc="attempt to add duplicate property 'io0' to object (type 'container')",
        )
        await error(
            c, "object-add", {"qom-type": "iothread", "id": "s1"},
            desc="attempt to add duplicate property 's1' to object (type 'container')",
        )
        for sid in ("s1", "s2", "s3", "s4", "k"):
            assert await execute(c, "object-del", {"id": sid}) == {}
        await error(c, "object-del", {"id": "s1"}, desc="object 's1' not found")
        await execute(c, "object-add", secret("s1", data="again"))


async def test_secret_errors(daemon, tmp):
    key, iv = os.urandom(32), os.urandom(16)
    async with daemon.qmp() as c:
        await execute(c, "object-add", secret("k", data=b64(key), format="base64"))
        await execute(c, "object-add", secret("short", data="abcd"))
        cases = [
            (secret("x"), "Either 'file' or 'data' must be provided"),
            (secret("x", data="a", file="/nonexistent"), "'file' and 'data' are mutually exclusive"),
            (
                secret("x", file="/nonexistent/pw"),
                "Unable to read /nonexistent/pw: Failed to open file “/nonexistent/pw”: "
                "No such file or directory",
            ),
            (secret("x", data="ab!c", format="base64"), "Base64 data contains invalid characters"),
            (secret("x", data="a", format="hex"), "Parameter 'format' does not accept value 'hex'"),
            (secret("x", data="abcd", keyid="nope"), "No secret with id 'nope'"),
            (secret("x", data="abcd", keyid="short"), "Key should be 32 bytes in length"),
            (secret("x", data="abcd", keyid="k"), "IV is required to decrypt secret"),
            (secret("x", data="abcd", keyid="k", iv="AAAA"), "IV should be 16 bytes in length not 3"),
            (
                secret("x", data="abcd", keyid="k", iv=b64(iv)),
                "Length 4 must be a multiple of block size 16",
            ),
            (secret("x", data=1), "Invalid parameter type for 'data', expected: string"),
        ]
        for args, desc in cases:
            await error(c, "object-add", args, desc=desc)
        # No failure left an object behind.
        await error(c, "object-del", {"id": "x"}, desc="object 'x' not found")


async def test_luks_blockdev_add_errors(start_daemon, tmp):
    img = qemu_img_luks(tmp / "l.img")
    d = start_daemon(["--object", f"secret,id=good,data={PASSWORD}",
                      "--object", "secret,id=bad,data=wrong",
                      "--blockdev", f"file,node-name=f0,filename={img}"])
    async with d.qmp() as c:
        await error(
            c, "blockdev-add", {"driver": "luks", "node-name": "l0", "file": "f0"},
            desc="Parameter 'key-secret' is required for cipher",
        )
        await error(
            c, "blockdev-add",
            {"driver": "luks", "node-name": "l0", "file": "f0", "key-secret": "nope"},
            desc="No secret with id 'nope'",
        )
        await error(
            c, "blockdev-add",
            {"driver": "luks", "node-name": "l0", "file": "f0", "key-secret": "bad"},
            desc="Invalid password, cannot unlock any keyslot",
        )
        await execute(
            c, "blockdev-add",
            {"driver": "luks", "node-name": "l0", "file": "f0", "key-secret": "good"},
        )
        nodes = await execute(c, "query-named-block-nodes", {"flat": True})
        l0 = next(n for n in nodes if n["node-name"] == "l0")
        assert l0["drv"] == "luks"
        assert l0["encrypted"] is True
        assert l0["image"]["virtual-size"] == 4 * MIB
        # The secret may go once the image is open.
        await execute(c, "object-del", {"id": "good"})
        await execute(c, "blockdev-del", {"node-name": "l0"})


async def test_luks_not_luks(start_daemon, tmp):
    img = tmp / "plain.img"
    img.write_bytes(b"\0" * MIB)
    d = start_daemon(["--object", f"secret,id=good,data={PASSWORD}",
                      "--blockdev", f"file,node-name=f0,filename={img}"])
    async with d.qmp() as c:
        await error(
            c, "blockdev-add",
            {"driver": "luks", "node-name": "l0", "file": "f0", "key-secret": "good"},
            desc="Volume is not in LUKS format",
        )

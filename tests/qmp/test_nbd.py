"""The NBD server and NBD exports: nbd-server-start/add/remove/stop,
block-export-add type=nbd and --nbd-server; clients are QEMU's own (qemu-img,
qemu-io), libnbd's nbdinfo and a raw socket client for malformed input. Every
expectation is qemu-storage-daemon 7.2's (the tests pass with ``--daemon=qsd``)."""

import asyncio
import json
import socket
import struct
import subprocess

import pytest

from conftest import MIB, error, execute, wait_event

SIZE = 64 * MIB

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 7, 8, 10
CMD_READ, CMD_WRITE, CMD_DISC, CMD_BLOCK_STATUS = 0, 1, 2, 7
CMD_FLAG_DF = 1 << 2
EINVAL = 22


def run(*args) -> str:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{args}: {r.stderr}"
    return r.stdout


def url(sock, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def qcow2_image(tmp):
    """A qcow2 image with data, a zero cluster range and unallocated space."""
    img = tmp / "disk.qcow2"
    run("qemu-img", "create", "-f", "qcow2", img, SIZE)
    run(
        "qemu-io", "-f", "qcow2",
        "-c", "write -P 0xaa 0 1M",
        "-c", "write -z 2M 1M",
        "-c", "write -P 0x55 10M 64k",
        "-c", "write -P 0x66 40M 192k",
        img,
    )
    return img


def qcow2_args(img):
    return [
        "--blockdev", f"file,node-name=f,filename={img}",
        "--blockdev", "qcow2,node-name=n,file=f",
    ]


def nbd_server_args(tmp):
    return ["--nbd-server", f"addr.type=unix,addr.path={tmp / 'nbd.sock'}"]


def start_server(c, tmp):
    return execute(
        c, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(tmp / "nbd.sock")}}}
    )


def merged_map(entries):
    """(start, length, data, zero) runs, adjacent equal runs merged."""
    out = []
    for start, length, data, zero in entries:
        if out and out[-1][2:] == (data, zero) and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, data, zero)
        else:
            out.append((start, length, data, zero))
    return out


def qemu_img_map(img):
    m = json.loads(run("qemu-img", "map", "-U", "--output=json", img))
    return merged_map([(e["start"], e["length"], e["data"], e["zero"]) for e in m])


def nbdinfo_map(u, context="base:allocation"):
    m = json.loads(run("nbdinfo", "--json", f"--map={context}", u))
    return [(e["offset"], e["length"], e["type"]) for e in m]


async def test_server_commands(start_daemon, tmp):
    d = start_daemon(qcow2_args(qcow2_image(tmp)))
    async with d.qmp() as c:
        not_running = "NBD server not running"
        await error(c, "nbd-server-stop", desc=not_running)
        await error(c, "nbd-server-add", {"device": "n"}, desc=not_running)
        await error(c, "nbd-server-remove", {"name": "n"}, desc="Export 'n' is not found")
        await error(
            c, "block-export-add", {"type": "nbd", "id": "e", "node-name": "n"}, desc=not_running
        )
        await start_server(c, tmp)
        await error(
            c, "nbd-server-start",
            {"addr": {"type": "unix", "data": {"path": str(tmp / "other.sock")}}},
            desc="NBD server already running",
        )
        await execute(c, "nbd-server-add", {"device": "n"})
        await error(
            c, "nbd-server-add", {"device": "n"}, desc="Block export id 'n' is already in use"
        )
        await error(c, "nbd-server-add", {"device": "n", "name": "b", "bitmap": "nob"},
                    desc="Bitmap 'nob' is not found")
        await execute(c, "nbd-server-add",
                      {"device": "n", "name": "w", "writable": True, "description": "hello"})
        await execute(c, "block-export-add",
                      {"type": "nbd", "id": "e", "node-name": "n", "name": "ee",
                       "description": "d", "allocation-depth": True})
        await error(c, "block-export-add",
                    {"type": "nbd", "id": "e2", "node-name": "n", "name": "ee"},
                    desc="NBD server already has export named 'ee'")
        await error(c, "block-export-add", {"type": "nbd", "id": "e4", "node-name": "n"},
                    desc="NBD server already has export named 'n'")
        exports = sorted(await execute(c, "query-block-exports"), key=lambda e: e["id"])
        assert exports == [
            {"id": i, "type": "nbd", "node-name": "n", "shutting-down": False}
            for i in ("e", "n", "w")
        ]
        listed = json.loads(run("nbdinfo", "--json", "--list", f"nbd+unix://?socket={tmp / 'nbd.sock'}"))
        names = {e["export-name"]: e for e in listed["exports"]}
        assert set(names) == {"n", "w", "ee"}
        assert names["w"]["description"] == "hello"
        assert names["n"]["is_read_only"] is True
        assert names["w"]["is_read_only"] is False
        await error(c, "nbd-server-remove", {"name": "x"}, desc="Export 'x' is not found")
        # nbd-server-remove takes the export id (the name of nbd-server-add's exports).
        await error(c, "nbd-server-remove", {"name": "ee"}, desc="Export 'ee' is not found")
        with c.listener() as lst:
            await execute(c, "nbd-server-remove", {"name": "e"})
            assert (await wait_event(lst, "BLOCK_EXPORT_DELETED"))["data"] == {"id": "e"}
        await execute(c, "nbd-server-remove", {"name": "w", "mode": "hard"})
        ids = {e["id"] for e in await execute(c, "query-block-exports")}
        assert ids <= {"n", "w"}
        await execute(c, "nbd-server-stop")
        assert await execute(c, "query-block-exports") == []
        await error(c, "nbd-server-stop", desc=not_running)
        # Started again on the same path.
        await start_server(c, tmp)
        await execute(c, "nbd-server-add", {"device": "n"})
        run("nbdinfo", url(tmp / "nbd.sock", "n"))


async def test_qemu_img_convert_compare_and_map(start_daemon, tmp):
    img = qcow2_image(tmp)
    d = start_daemon([*qcow2_args(img), *nbd_server_args(tmp)])
    async with d.qmp() as c:
        await execute(c, "block-export-add", {"type": "nbd", "id": "e", "node-name": "n"})
        u = url(tmp / "nbd.sock", "n")
        out = run("qemu-img", "compare", "-U", u, img)
        assert "identical" in out
        run("qemu-img", "convert", "-O", "raw", u, tmp / "copy.raw")
        assert "identical" in run("qemu-img", "compare", "-U", "-f", "raw", tmp / "copy.raw", img)
        # Block status: nbdinfo's base:allocation map is qemu-img's map of the image.
        want = qemu_img_map(img)
        got = nbdinfo_map(u)
        assert [(s, n, t & 1 == 0, t & 2 != 0) for s, n, t in got] == [
            (s, n, data, zero) for s, n, data, zero in want
        ]
        assert len(want) >= 4


async def test_writes_land_in_the_image(start_daemon, tmp):
    img = tmp / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    d = start_daemon([
        "--blockdev", f"file,node-name=n,filename={img}",
        *nbd_server_args(tmp),
    ])
    async with d.qmp() as c:
        await execute(c, "nbd-server-add", {"device": "n", "writable": True})
        u = url(tmp / "nbd.sock", "n")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 1M 256k", "-c", "write -P 0x5a 33554431 2",
            "-c", "write -z 2M 64k", "-c", "flush", u)
        run("qemu-io", "-r", "-U", "-f", "raw", "-c", "read -P 0x3c 1M 256k",
            "-c", "read -P 0x5a 33554431 2", "-c", "read -P 0 2M 64k", img)
        # Written data is data in the map; the rest of the sparse file is a hole.
        got = nbdinfo_map(u)
        assert (1 * MIB, 256 * 1024, 0) in [(s, n, t) for s, n, t in got] or any(
            s <= 1 * MIB and s + n >= 1 * MIB + 256 * 1024 and t == 0 for s, n, t in got
        )
        assert got[0] == (0, 1 * MIB, 3)


async def test_read_only_by_default(start_daemon, tmp):
    d = start_daemon([*qcow2_args(qcow2_image(tmp)), *nbd_server_args(tmp)])
    async with d.qmp() as c:
        await execute(c, "nbd-server-add", {"device": "n"})
        s = Client(tmp / "nbd.sock", "n")
        assert s.flags & 2, "NBD_FLAG_READ_ONLY"
        # QEMU 7.2 answers EINVAL (the specification suggests EPERM).
        assert s.request(CMD_WRITE, 0, 512, payload=b"x" * 512)[0] == EINVAL
        assert s.request(CMD_READ, 0, 512)[0] == 0
        s.close()


async def test_dirty_bitmap_context(start_daemon, tmp):
    img = tmp / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    d = start_daemon([
        "--blockdev", f"file,node-name=n,filename={img}",
        *nbd_server_args(tmp),
    ])
    async with d.qmp() as c:
        await execute(c, "block-dirty-bitmap-add", {"node": "n", "name": "b", "granularity": 65536})
        await execute(c, "nbd-server-add", {"device": "n", "name": "w", "writable": True})
        run("qemu-io", "-f", "raw", "-c", "write 1M 64k", "-c", "write 5M 200k",
            url(tmp / "nbd.sock", "w"))
        await error(c, "nbd-server-add", {"device": "n", "name": "r", "bitmap": "b"},
                    desc="Enabled bitmap 'b' incompatible with readonly export")
        await execute(c, "block-dirty-bitmap-disable", {"node": "n", "name": "b"})
        await execute(c, "block-export-add", {"type": "nbd", "id": "r", "node-name": "n",
                                              "name": "r", "bitmaps": ["b"]})
        # Exported bitmaps are busy.
        await error(c, "block-dirty-bitmap-remove", {"node": "n", "name": "b"},
                    contains=["in use"])
        got = nbdinfo_map(url(tmp / "nbd.sock", "r"), "qemu:dirty-bitmap:b")
        assert [(s, n) for s, n, t in got if t & 1] == [(1 * MIB, 64 * 1024),
                                                         (5 * MIB, 256 * 1024)]
        assert sum(n for _, n, _ in got) == SIZE
        with c.listener() as lst:
            await execute(c, "block-export-del", {"id": "r"})
            await wait_event(lst, "BLOCK_EXPORT_DELETED")
        await execute(c, "block-dirty-bitmap-remove", {"node": "n", "name": "b"})


class Client:
    """A minimal NBD client on a raw socket: fixed newstyle, structured replies,
    NBD_OPT_GO."""

    def __init__(self, path, name: str, structured: bool = True, meta=()):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(20)
        self.s.connect(str(path))
        magic, opt, _hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        self.s.sendall(struct.pack(">I", 3))
        self.structured = structured
        if structured:
            assert self.option(OPT_STRUCTURED_REPLY, b"")[-1][0] == 1
        if meta:
            data = struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(meta))
            for m in meta:
                data += struct.pack(">I", len(m)) + m.encode()
            self.option(OPT_SET_META_CONTEXT, data)
        replies = self.option(OPT_GO, struct.pack(">I", len(name)) + name.encode() + b"\0\0")
        assert replies[-1][0] == 1, replies
        for kind, data in replies:
            if kind == 3 and struct.unpack(">H", data[:2])[0] == 0:
                self.size, self.flags = struct.unpack(">QH", data[2:12])
        self.handle = 0

    def recv(self, n: int) -> bytes:
        b = b""
        while len(b) < n:
            chunk = self.s.recv(n - len(b))
            if not chunk:
                raise EOFError
            b += chunk
        return b

    def option(self, opt: int, data: bytes):
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        out = []
        while True:
            magic, o, kind, n = struct.unpack(">QIII", self.recv(20))
            assert (magic, o) == (REPLY_MAGIC, opt)
            out.append((kind, self.recv(n)))
            if kind == 1 or kind & (1 << 31):
                return out

    def send(self, cmd: int, offset: int, length: int, flags: int = 0, payload: bytes = b""):
        self.handle += 1
        self.s.sendall(
            struct.pack(">IHHQQI", 0x25609513, flags, cmd, self.handle, offset, length) + payload
        )
        return self.handle

    def reply(self, cmd: int, length: int):
        """(error, data) of the next reply (all chunks of a structured one)."""
        magic = struct.unpack(">I", self.recv(4))[0]
        if magic == 0x67446698:
            err, _h = struct.unpack(">IQ", self.recv(12))
            data = self.recv(length) if cmd == CMD_READ and err == 0 else b""
            return err, data
        assert magic == 0x668E33EF
        err, data = 0, b""
        while True:
            flags, kind, _h, n = struct.unpack(">HHQI", self.recv(16))
            payload = self.recv(n)
            if kind & (1 << 15):
                err = struct.unpack(">I", payload[:4])[0]
            else:
                data += payload
            if flags & 1:
                return err, data
            assert struct.unpack(">I", self.recv(4))[0] == 0x668E33EF

    def request(self, cmd: int, offset: int, length: int, flags: int = 0, payload: bytes = b""):
        self.send(cmd, offset, length, flags, payload)
        return self.reply(cmd, length)

    def closed(self) -> bool:
        """Whether the server closed the connection."""
        try:
            return self.s.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self):
        self.s.close()


async def test_bad_requests(start_daemon, tmp):
    d = start_daemon([*qcow2_args(qcow2_image(tmp)), *nbd_server_args(tmp)])
    async with d.qmp() as c:
        await execute(c, "nbd-server-add", {"device": "n", "writable": True})
        sock = tmp / "nbd.sock"
        other = Client(sock, "n")
        a = Client(sock, "n")
        assert a.size == SIZE
        # Past the end: EINVAL (QEMU 7.2's answer for writes too); unknown command: EINVAL.
        assert a.request(CMD_READ, SIZE - 512, 1024)[0] == EINVAL
        assert a.request(CMD_READ, 1 << 62, 512)[0] == EINVAL
        assert a.request(CMD_WRITE, SIZE, 512, payload=b"\0" * 512)[0] == EINVAL
        assert a.request(99, 0, 512)[0] == EINVAL
        # Unknown flags.
        assert a.request(CMD_READ, 0, 512, flags=1 << 9)[0] == EINVAL
        # Block status without a negotiated context.
        assert a.request(CMD_BLOCK_STATUS, 0, 4096)[0] == EINVAL
        # Reads larger than 32 MiB.
        assert a.request(CMD_READ, 0, 33 * MIB)[0] == EINVAL
        err, data = a.request(CMD_READ, 0, 4096)
        assert err == 0 and data[8:] == b"\xaa" * 4096
        # A bad request magic: vubd drops that client (QEMU answers an error); either
        # way the other clients go on.
        a.s.sendall(b"\xde\xad" * 14)
        try:
            assert a.reply(99, 0)[0] != 0
        except (EOFError, ConnectionError):
            pass
        a.close()
        # A client that breaks off in its handshake.
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(sock))
        raw.recv(18)
        raw.sendall(struct.pack(">I", 1 << 20))  # unknown client flags
        raw.settimeout(20)
        assert raw.recv(100) == b""
        raw.close()
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(sock))
        raw.recv(18)
        raw.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x1234, OPT_GO, 4))
        raw.settimeout(20)
        assert raw.recv(100) == b""
        raw.close()
        err, data = other.request(CMD_READ, 10 * MIB, 4096)
        assert err == 0 and data[8:] == b"\x55" * 4096
        other.close()
        run("qemu-img", "compare", "-U", url(sock, "n"), tmp / "disk.qcow2")


async def test_safe_remove_refused_while_in_use(start_daemon, tmp):
    d = start_daemon([*qcow2_args(qcow2_image(tmp)), *nbd_server_args(tmp)])
    async with d.qmp() as c:
        await execute(c, "nbd-server-add", {"device": "n"})
        a = Client(tmp / "nbd.sock", "n")
        await error(c, "nbd-server-remove", {"name": "n"}, desc="export 'n' still in use")
        with c.listener() as lst:
            await execute(c, "nbd-server-remove", {"name": "n", "mode": "hard"})
            await wait_event(lst, "BLOCK_EXPORT_DELETED")
        # The client is dropped: its next request fails.
        try:
            err, _ = a.request(CMD_READ, 0, 512)
            assert err != 0
        except (EOFError, ConnectionError):
            pass
        a.close()
        assert await execute(c, "query-block-exports") == []


async def test_block_status_contexts(start_daemon, tmp):
    d = start_daemon([*qcow2_args(qcow2_image(tmp)), *nbd_server_args(tmp)])
    async with d.qmp() as c:
        await execute(c, "block-export-add", {"type": "nbd", "id": "e", "node-name": "n",
                                              "allocation-depth": True})
        a = Client(tmp / "nbd.sock", "n", meta=("base:allocation", "qemu:allocation-depth"))
        err, data = a.request(CMD_BLOCK_STATUS, 0, 4 * MIB)
        assert err == 0
        # Two chunks' payloads: context id, then (length, flags) pairs.
        ids = set()
        pos = 0
        chunks = []
        while pos < len(data):
            # Each payload is 4 + 8n bytes; find the next context id by walking.
            cid = struct.unpack(">I", data[pos:pos + 4])[0]
            pos += 4
            ext = []
            total = 0
            while total < 4 * MIB and pos < len(data):
                n, f = struct.unpack(">II", data[pos:pos + 8])
                ext.append((n, f))
                total += n
                pos += 8
            ids.add(cid)
            chunks.append(ext)
        assert len(ids) == 2
        base, depth = chunks
        assert base[0] == (1 * MIB, 0) and base[1] == (3 * MIB, 3)
        # Data and the zero cluster are allocated in the top node (depth 1); the rest
        # is allocated nowhere (0).
        assert depth[0] == (1 * MIB, 1) and depth[1] == (1 * MIB, 0) and depth[2] == (MIB, 1)
        # REQ_ONE: a single extent.
        err, data = a.request(CMD_BLOCK_STATUS, 0, 4 * MIB, flags=1 << 3)
        assert err == 0 and len(data) == 2 * 12
        a.close()


async def test_nbd_driver_on_qemu_nbd(start_daemon, tmp):
    """blockdev-add driver=nbd: a node on qemu-nbd's export, served again by the
    daemon's own NBD server."""
    img = tmp / "back.raw"
    with open(img, "wb") as f:
        f.truncate(16 * MIB)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 1M", "-c", "write -P 0x43 8M 64k", img)
    qsock = tmp / "qemu-nbd.sock"
    server = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-t", "-x", "disk", "-k", str(qsock), str(img)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(1500):
            if qsock.exists():
                break
            await asyncio.sleep(0.01)
        d = start_daemon(nbd_server_args(tmp))
        async with d.qmp() as c:
            missing = tmp / "none.sock"
            await error(c, "blockdev-add", {"driver": "nbd", "node-name": "x",
                                            "server": {"type": "unix", "path": str(missing)}},
                        desc=f"Failed to connect to '{missing}': No such file or directory")
            await execute(c, "blockdev-add", {"driver": "nbd", "node-name": "c",
                                              "server": {"type": "unix", "path": str(qsock)},
                                              "export": "disk"})
            nodes = {n["node-name"]: n for n in await execute(c, "query-named-block-nodes")}
            assert nodes["c"]["drv"] == "nbd"
            assert nodes["c"]["file"] == f"nbd+unix:///disk?socket={qsock}"
            assert nodes["c"]["image"]["virtual-size"] == 16 * MIB
            await execute(c, "nbd-server-add", {"device": "c", "writable": True})
            u = url(tmp / "nbd.sock", "c")
            assert "identical" in run("qemu-img", "compare", "-U", "-f", "raw", u, img)
            run("qemu-io", "-f", "raw", "-c", "write -P 0x44 4M 128k", u)
            run("qemu-io", "-r", "-U", "-f", "raw", "-c", "read -P 0x44 4M 128k", img)
            # Block status passes through both hops.
            got = [(s, n, t) for s, n, t in nbdinfo_map(u)]
            assert got[0] == (0, MIB, 0)
            await execute(c, "nbd-server-remove", {"name": "c"})
            await execute(c, "blockdev-del", {"node-name": "c"})
    finally:
        server.kill()
        server.wait()


async def test_export_on_an_iothread_and_exit_with_a_client(start_daemon, tmp):
    """An NBD export on a named iothread serves; the daemon still exits cleanly on
    SIGTERM (the teardown's check) while a client is connected."""
    d = start_daemon([
        "--object", "iothread,id=io0",
        *qcow2_args(qcow2_image(tmp)), *nbd_server_args(tmp),
    ])
    async with d.qmp() as c:
        await execute(c, "block-export-add", {"type": "nbd", "id": "e", "node-name": "n",
                                              "iothread": "io0", "writable": True})
        a = Client(tmp / "nbd.sock", "n")
        err, data = a.request(CMD_READ, 10 * MIB, 4096)
        assert err == 0 and data[8:] == b"\x55" * 4096
        assert a.request(CMD_WRITE, 0, 4096, payload=b"\x01" * 4096)[0] == 0
        err, data = a.request(CMD_READ, 0, 4096)
        assert err == 0 and data[8:] == b"\x01" * 4096
    # `a` stays connected until the daemon is stopped.
    d.client = a


async def test_bad_options_get_errors_and_negotiation_goes_on(start_daemon, tmp):
    d = start_daemon([*qcow2_args(qcow2_image(tmp)), *nbd_server_args(tmp)])
    async with d.qmp() as c:
        await execute(c, "nbd-server-add", {"device": "n"})
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        s.connect(str(tmp / "nbd.sock"))
        cl = Client.__new__(Client)
        cl.s = s
        cl.recv(18)
        s.sendall(struct.pack(">I", 3))
        err = 1 << 31
        # Truncated NBD_OPT_INFO (a name length past the payload).
        assert cl.option(6, struct.pack(">I", 100) + b"n")[-1][0] & err
        # STRUCTURED_REPLY takes no payload.
        assert cl.option(OPT_STRUCTURED_REPLY, b"x")[-1][0] & err
        # An unknown option.
        assert cl.option(99, b"")[-1][0] == err | 1
        # Meta contexts before structured replies are negotiated.
        q = struct.pack(">I", 1) + b"n" + struct.pack(">I", 1) + struct.pack(">I", 15)
        assert cl.option(OPT_SET_META_CONTEXT, q + b"base:allocation")[-1][0] & err
        assert cl.option(OPT_STRUCTURED_REPLY, b"")[-1][0] == 1
        # A query count far beyond the payload.
        bad = struct.pack(">I", 1) + b"n" + struct.pack(">I", 1 << 30)
        assert cl.option(OPT_SET_META_CONTEXT, bad)[-1][0] & err
        # An unknown export.
        assert cl.option(OPT_GO, struct.pack(">I", 4) + b"nope" + b"\0\0")[-1][0] & err
        replies = cl.option(OPT_GO, struct.pack(">I", 1) + b"n" + b"\0\0")
        assert replies[-1][0] == 1
        cl.handle = 0
        err, data = cl.request(CMD_READ, 0, 512)
        assert err == 0 and data[8:] == b"\xaa" * 512
        cl.close()


async def test_fleecing_pull_backup(start_daemon, tmp):
    """A backup pulled over NBD while the disk is written (image fleecing): the disk
    is written through a writable export of a copy-before-write filter; a read-only
    export of snapshot-access above it, with the dirty bitmap of the writes, gives
    the disk as it was and which ranges changed."""
    size = 8 * MIB
    src = tmp / "src.raw"
    fl = tmp / "fl.raw"
    for p in (src, fl):
        with open(p, "wb") as f:
            f.truncate(size)
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x11 0 {size}", src)
    d = start_daemon([
        "--blockdev", f"file,node-name=n0,filename={src}",
        "--blockdev", f"file,node-name=fl,filename={fl}",
        "--blockdev", "copy-before-write,node-name=cbw,file=n0,target=fl",
        "--blockdev", "snapshot-access,node-name=acc,file=cbw",
        *nbd_server_args(tmp),
    ])
    sock = tmp / "nbd.sock"
    async with d.qmp() as c:
        await execute(c, "block-dirty-bitmap-add", {"node": "n0", "name": "b"})
        await execute(c, "nbd-server-add", {"device": "cbw", "name": "live", "writable": True})
        run("qemu-io", "-f", "raw", "-c", "write -P 0x22 1M 64k", "-c", "write -P 0x23 5M 4k",
            url(sock, "live"))
        await execute(c, "block-dirty-bitmap-disable", {"node": "n0", "name": "b"})
        await execute(c, "block-export-add", {
            "type": "nbd", "id": "pull", "node-name": "acc", "name": "pull",
            "bitmaps": [{"node": "n0", "name": "b"}],
        })
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", url(sock, "pull"), tmp / "backup.raw")
        run("qemu-io", "-r", "-f", "raw", "-c", f"read -P 0x11 0 {size}", tmp / "backup.raw")
        dirty = [(s, n) for s, n, t in nbdinfo_map(url(sock, "pull"), "qemu:dirty-bitmap:b")
                 if t & 1]
        assert dirty == [(1 * MIB, 64 * 1024), (5 * MIB, 64 * 1024)]
        run("qemu-io", "-f", "raw", "-c", "read -P 0x22 1M 64k", "-c", "read -P 0x23 5M 4k",
            url(sock, "live"))


async def test_random_garbage_does_not_disturb_other_clients(start_daemon, tmp):
    """Clients that send random bytes, in the handshake or after it, get dropped or
    error replies; a well-behaved client keeps being served throughout."""
    import random

    rnd = random.Random(1234)
    d = start_daemon([*qcow2_args(qcow2_image(tmp)), *nbd_server_args(tmp)])
    sock = tmp / "nbd.sock"
    async with d.qmp() as c:
        await execute(c, "nbd-server-add", {"device": "n", "writable": True})
        good = Client(sock, "n")
        for i in range(40):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(20)
            s.connect(str(sock))
            try:
                s.recv(18)
                if i % 2:
                    # After a valid handshake: garbage requests.
                    s.close()
                    cl = Client(sock, "n")
                    s = cl.s
                else:
                    s.sendall(struct.pack(">I", 3))
                s.sendall(bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 4096))))
            except (BrokenPipeError, ConnectionResetError):
                pass
            s.close()
            err, data = good.request(CMD_READ, 0, 4096)
            assert err == 0 and data[8:] == b"\xaa" * 4096
        good.close()
        run("qemu-img", "compare", "-U", url(sock, "n"), tmp / "disk.qcow2")


async def test_max_connections_holds_new_clients_back(start_daemon, tmp):
    """max-connections: a client beyond the limit waits (it gets no greeting) until a
    connected one leaves, then it is served."""
    d = start_daemon([
        *qcow2_args(qcow2_image(tmp)),
        "--nbd-server", f"addr.type=unix,addr.path={tmp / 'nbd.sock'},max-connections=1",
    ])
    async with d.qmp() as c:
        await execute(c, "nbd-server-add", {"device": "n"})
        a = Client(tmp / "nbd.sock", "n")
        b = socket.socket(socket.AF_UNIX)
        b.connect(str(tmp / "nbd.sock"))
        b.settimeout(0.5)
        with pytest.raises(socket.timeout):
            b.recv(18)
        a.send(CMD_DISC, 0, 0)
        a.close()
        b.settimeout(20)
        got = b""
        while len(got) < 18:
            chunk = b.recv(18 - len(got))
            assert chunk, "the waiting client was dropped"
            got += chunk
        assert struct.unpack(">Q", got[:8])[0] == NBDMAGIC
        b.close()


async def test_blockstats_count_the_requests_of_an_nbd_export(start_daemon, tmp, kind):
    """What query-blockstats shows of I/O through an NBD export. qemu-storage-daemon
    7.2 accounts nothing for it: without query-nodes its list is empty (the export's
    BlockBackend has no device), and the nodes show only wr_highest_offset. vubd has an
    entry per export (as for vhost-user-blk) counting what the clients asked for; both
    agree on wr_highest_offset."""
    img = tmp / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    d = start_daemon([
        "--blockdev", f"file,node-name=f,filename={img}",
        # Reads of the sector at 8 MiB fail (blkdebug's read_aio comes from the format
        # above it).
        "--blockdev", "blkdebug,node-name=dbg,image=f,inject-error.0.event=read_aio,"
        "inject-error.0.errno=5,inject-error.0.sector=16384",
        "--blockdev", "raw,node-name=n,file=dbg",
        *nbd_server_args(tmp),
        "--export", "nbd,id=e0,node-name=n,name=x,writable=on",
    ])
    sock = tmp / "nbd.sock"
    async with d.qmp() as c:
        # qemu-io: 2 writes (one write-zeroes), a discard, 2 reads and 2 flushes (one
        # asked for, one when qemu-io closes the writable image).
        run("qemu-io", "-f", "raw",
            "-c", "write -P 0x11 0 1M", "-c", "write -z 2M 128k", "-c", "discard 1M 64k",
            "-c", "read -P 0x11 0 64k", "-c", "read -P 0 2M 4k", "-c", "flush", url(sock, "x"))
        # A raw client: invalid requests (past the end, unknown flags, a write past
        # the end), an unknown command (not a blockstats kind), a failing read.
        a = Client(sock, "x")
        assert a.request(CMD_READ, SIZE - 512, 1024)[0] == EINVAL
        assert a.request(CMD_READ, 0, 512, flags=1 << 9)[0] == EINVAL
        assert a.request(CMD_WRITE, SIZE, 512, payload=b"\0" * 512)[0] == EINVAL
        assert a.request(99, 0, 512)[0] == EINVAL
        # DF: QEMU's server sends a hole of a sparse file without reading it.
        assert a.request(CMD_READ, 8 * MIB, 4096, flags=CMD_FLAG_DF)[0] == 5
        assert a.request(CMD_READ, 16 * MIB, 4096)[0] == 0
        a.close()

        wr_end = 2 * MIB + 128 * 1024
        nodes = {x["node-name"]: x["stats"]
                 for x in await execute(c, "query-blockstats", {"query-nodes": True})}
        assert nodes["n"]["wr_highest_offset"] == wr_end, nodes["n"]
        st = await execute(c, "query-blockstats")
        if kind == "qsd":
            assert st == [], st
            assert nodes["n"]["rd_operations"] == nodes["n"]["wr_operations"] == 0, nodes
            return
        assert [(e["qdev"], e["node-name"], e["device"]) for e in st] == [("e0", "n", "")], st
        s = st[0]["stats"]
        want = {
            "rd_operations": 3, "rd_bytes": 64 * 1024 + 4096 + 4096,
            "failed_rd_operations": 1, "invalid_rd_operations": 2,
            "wr_operations": 2, "wr_bytes": MIB + 128 * 1024,
            "failed_wr_operations": 0, "invalid_wr_operations": 1,
            "unmap_operations": 1, "unmap_bytes": 64 * 1024,
            "flush_operations": 2, "failed_flush_operations": 0,
            "wr_highest_offset": wr_end,
        }
        assert {k: s[k] for k in want} == want, s
        assert s["account_invalid"] and s["account_failed"], s

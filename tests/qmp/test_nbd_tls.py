"""NBD over TLS: tls-creds-x509 objects (object-add, --object, QOM), nbd-server-start
and --nbd-server with tls-creds, and QEMU's clients (qemu-img, qemu-io with
tls-creds), libnbd's nbdinfo (nbds:// URLs) and a raw socket client against the TLS
server. Certificates come from scripts/tls-certs.sh (a CA with a server certificate
for 127.0.0.1 and a client certificate, and a second, unrelated CA). Every
expectation is qemu-storage-daemon 7.2's (the tests pass with ``--daemon=qsd``)."""

import socket
import ssl
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import MIB, error, execute

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
SIZE = 16 * MIB

IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
OPT_EXPORT_NAME, OPT_ABORT, OPT_STARTTLS, OPT_GO, OPT_STRUCTURED_REPLY = 1, 2, 5, 7, 8
REP_ACK, REP_ERR_INVALID, REP_ERR_TLS_REQD = 1, (1 << 31) | 3, (1 << 31) | 5


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Two independent sets of credentials: ``good`` (the servers') and ``other``
    (a CA nobody trusts)."""
    out = {}
    for name in ("good", "other"):
        d = tmp_path_factory.mktemp(f"pki-{name}")
        subprocess.run([str(SCRIPTS / "tls-certs.sh"), str(d)], check=True, capture_output=True)
        out[name] = d
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args, ok=True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    if ok:
        assert r.returncode == 0, f"{args}: {r.stderr}"
    return r


def creds(id: str, dir: Path, endpoint: str, **extra) -> dict:
    o = {"qom-type": "tls-creds-x509", "id": id, "dir": str(dir), "endpoint": endpoint}
    o.update(extra)
    return o


def client_object(dir: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={dir},endpoint=client"]


def image_opts(port: int, export: str, tls: bool = True) -> str:
    o = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={export}"
    return o + (",tls-creds=tls0" if tls else "")


def image_with_data(tmp) -> Path:
    img = tmp / "disk.raw"
    run("qemu-img", "create", "-f", "raw", img, SIZE)
    run("qemu-io", "-f", "raw", "-c", "write -P 0xa5 0 1M", "-c", "write -P 0x3c 9M 192k", img)
    return img


def raw_args(img) -> list[str]:
    return ["--blockdev", f"file,node-name=f,filename={img}", "--blockdev", "raw,node-name=n,file=f"]


async def start_tls_server(c, port: int, id: str = "tls0"):
    await execute(
        c,
        "nbd-server-start",
        {
            "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}},
            "tls-creds": id,
        },
    )


async def test_tls_creds_objects_and_their_errors(start_daemon, tmp, pki):
    good = pki["good"]
    d = start_daemon(["--object", "iothread,id=io0"])
    async with d.qmp() as c:
        missing = tmp / "nowhere"
        await error(c, "object-add", creds("t", missing, "client"),
                    desc=f"Unable to access credentials {missing}/ca-cert.pem: "
                         "No such file or directory")
        # A server needs its certificate; the client directory has none.
        await error(c, "object-add", creds("t", good / "client", "server"),
                    desc=f"Unable to access credentials {good}/client/server-cert.pem: "
                         "No such file or directory")
        await error(c, "object-add", {"qom-type": "tls-creds-x509", "id": "t", "endpoint": "server"},
                    desc="Missing 'dir' property value")
        await error(c, "object-add", creds("t", good / "server", "bogus"),
                    desc="Parameter 'endpoint' does not accept value 'bogus'")
        await error(c, "object-add", creds("t", good / "server", "server", foo=1),
                    desc="Parameter 'foo' is unexpected")
        # Files that are not what they should be.
        badkey, badca = tmp / "badkey", tmp / "badca"
        for bad, f in ((badkey, "server-key.pem"), (badca, "ca-cert.pem")):
            bad.mkdir()
            for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
                (bad / name).write_bytes((good / "server" / name).read_bytes())
            (bad / f).write_text("garbage\n")
        await error(c, "object-add", creds("t", badkey, "server"),
                    contains=[f"Cannot load certificate '{badkey}/server-cert.pem' & "
                              f"key '{badkey}/server-key.pem': "])
        await error(c, "object-add", creds("t", badca, "server"),
                    contains=[f"Unable to import CA certificate list {badca}/ca-cert.pem"])
        await execute(c, "object-add", creds("srv", good / "server", "server"))
        await execute(c, "object-add", creds("cli", good / "client", "client", **{"verify-peer": False}))
        await error(c, "object-add", creds("srv", good / "server", "server"),
                    desc="attempt to add duplicate property 'srv' to object (type 'container')")
        children = {p["name"]: p["type"] for p in await execute(c, "qom-list", {"path": "/objects"})}
        assert children["srv"] == "child<tls-creds-x509>"
        assert children["cli"] == "child<tls-creds-x509>"
        get = lambda o, p: execute(c, "qom-get", {"path": f"/objects/{o}", "property": p})
        assert await get("srv", "dir") == str(good / "server")
        assert await get("srv", "endpoint") == "server"
        assert await get("srv", "verify-peer") is True
        assert await get("cli", "verify-peer") is False
        assert await get("cli", "loaded") is True
        assert await get("cli", "type") == "tls-creds-x509"
        props = {(p["name"], p["type"]) for p in
                 await execute(c, "qom-list-properties", {"typename": "tls-creds-x509"})}
        assert props == {("type", "string"), ("endpoint", "QCryptoTLSCredsEndpoint"),
                         ("dir", "string"), ("verify-peer", "bool"), ("priority", "string"),
                         ("sanity-check", "bool"), ("passwordid", "string"), ("loaded", "bool")}
        addr = {"type": "unix", "data": {"path": str(tmp / "nbd.sock")}}
        await error(c, "nbd-server-start", {"addr": addr, "tls-creds": "nosuch"},
                    desc="No TLS credentials with id 'nosuch'")
        await error(c, "nbd-server-start", {"addr": addr, "tls-creds": "io0"},
                    desc="Object with id 'io0' is not TLS credentials")
        await error(c, "nbd-server-start", {"addr": addr, "tls-creds": "cli"},
                    desc="Expected TLS credentials for a server endpoint")
        if d.kind == "vubd":
            # vubd has no authz objects: with TLS, tls-authz is refused, not ignored
            # (QEMU would refuse each client whose authz object is missing).
            await error(c, "nbd-server-start",
                        {"addr": addr, "tls-creds": "srv", "tls-authz": "az0"},
                        desc="'tls-authz' is not supported (vubd has no authz objects)")
        # Without TLS, tls-authz has nothing to authorize (QEMU ignores it).
        await execute(c, "nbd-server-start", {"addr": addr, "tls-authz": "az0"})
        await execute(c, "nbd-server-stop")
        await execute(c, "object-del", {"id": "cli"})
        assert "cli" not in {p["name"] for p in await execute(c, "qom-list", {"path": "/objects"})}


async def test_qemu_img_qemu_io_and_nbdinfo_over_tls(start_daemon, tmp, pki):
    good = pki["good"]
    img = image_with_data(tmp)
    port = free_port()
    d = start_daemon([*raw_args(img), "--object",
                      f"tls-creds-x509,id=tls0,dir={good / 'server'},endpoint=server"])
    async with d.qmp() as c:
        await start_tls_server(c, port)
        await execute(c, "nbd-server-add", {"device": "n", "writable": True})
        copy = tmp / "copy.raw"
        run("qemu-img", "convert", *client_object(good / "client"), "--image-opts",
            "-O", "raw", image_opts(port, "n"), copy)
        assert copy.read_bytes() == img.read_bytes()
        run("qemu-img", "compare", *client_object(good / "client"), "--image-opts",
            f"driver=file,filename={img}", image_opts(port, "n"))
        run("qemu-io", *client_object(good / "client"), "--image-opts", image_opts(port, "n"),
            "-c", "write -P 0x77 4M 256k", "-c", "read -P 0x77 4M 256k")
        data = img.read_bytes()
        assert data[4 * MIB:4 * MIB + 256 * 1024] == b"\x77" * 256 * 1024
        out = run("nbdinfo", f"nbds://127.0.0.1:{port}/n?tls-certificates={good / 'client'}").stdout
        assert "with TLS" in out and "export-size: 16777216" in out
        # The server's name is checked against the certificate (127.0.0.1 is in it).
        run("nbdinfo", f"nbds://127.0.0.1:{port}/n?tls-certificates={good / 'client'}"
                       "&tls-verify-peer=true")


async def test_plaintext_and_untrusted_clients_are_refused(start_daemon, tmp, pki):
    good, other = pki["good"], pki["other"]
    img = image_with_data(tmp)
    port = free_port()
    d = start_daemon([*raw_args(img), "--object",
                      f"tls-creds-x509,id=tls0,dir={good / 'server'},endpoint=server"])
    async with d.qmp() as c:
        await start_tls_server(c, port)
        await execute(c, "nbd-server-add", {"device": "n"})
        # Without TLS: the server wants STARTTLS first.
        r = run("qemu-img", "info", f"nbd://127.0.0.1:{port}/n", ok=False)
        assert r.returncode != 0
        assert "TLS negotiation required before option 7 (go)" in r.stderr, r.stderr
        r = run("nbdinfo", f"nbd://127.0.0.1:{port}/n", ok=False)
        assert r.returncode != 0
        # A client that does not trust the server's CA.
        r = run("qemu-img", "info", *client_object(other / "client"), "--image-opts",
                image_opts(port, "n"), ok=False)
        assert "The certificate hasn't got a known issuer" in r.stderr, r.stderr
        # verify-peer=on (the default): a client without a certificate is refused.
        nocert = tmp / "nocert"
        nocert.mkdir()
        (nocert / "ca-cert.pem").write_bytes((good / "ca-cert.pem").read_bytes())
        r = run("qemu-img", "info", *client_object(nocert), "--image-opts",
                image_opts(port, "n"), ok=False)
        assert r.returncode != 0
        # A client certificate of another CA is refused too.
        mixed = tmp / "mixed"
        mixed.mkdir()
        (mixed / "ca-cert.pem").write_bytes((good / "ca-cert.pem").read_bytes())
        for f in ("client-cert.pem", "client-key.pem"):
            (mixed / f).write_bytes((other / "client" / f).read_bytes())
        r = run("qemu-img", "info", *client_object(mixed), "--image-opts",
                image_opts(port, "n"), ok=False)
        assert r.returncode != 0
        # The good client still gets in.
        run("qemu-img", "info", *client_object(good / "client"), "--image-opts", image_opts(port, "n"))


async def test_verify_peer_off_takes_clients_without_certificates(start_daemon, tmp, pki):
    good = pki["good"]
    img = image_with_data(tmp)
    sock = tmp / "nbd.sock"
    d = start_daemon([
        *raw_args(img),
        "--object", f"tls-creds-x509,id=tls0,dir={good / 'server'},endpoint=server,verify-peer=off",
        "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=tls0",
    ])
    async with d.qmp() as c:
        await execute(c, "nbd-server-add", {"device": "n"})
        nocert = tmp / "nocert"
        nocert.mkdir()
        (nocert / "ca-cert.pem").write_bytes((good / "ca-cert.pem").read_bytes())
        nbd = f"driver=nbd,server.type=unix,server.path={sock},export=n,tls-creds=tls0"
        # Over a UNIX socket the client needs tls-hostname to check the certificate.
        r = run("qemu-img", "info", *client_object(nocert), "--image-opts", nbd, ok=False)
        assert "No hostname for certificate validation" in r.stderr, r.stderr
        out = run("qemu-img", "compare", *client_object(nocert), "--image-opts",
                  f"driver=file,filename={img}", nbd + ",tls-hostname=localhost")
        assert "Images are identical" in out.stdout


class RawClient:
    """Fixed newstyle negotiation on a raw TCP socket, upgraded with Python's ssl."""

    def __init__(self, port: int):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=20)
        hello = self.recv(18)
        assert struct.unpack(">Q", hello[8:16])[0] == IHAVEOPT
        self.s.sendall(struct.pack(">I", 3))

    def recv(self, n: int) -> bytes:
        b = b""
        while len(b) < n:
            chunk = self.s.recv(n - len(b))
            if not chunk:
                raise EOFError
            b += chunk
        return b

    def send_option(self, opt: int, data: bytes = b""):
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def option(self, opt: int, data: bytes = b""):
        self.send_option(opt, data)
        out = []
        while True:
            magic, o, kind, n = struct.unpack(">QIII", self.recv(20))
            assert (magic, o) == (REPLY_MAGIC, opt)
            out.append((kind, self.recv(n)))
            if kind == REP_ACK or kind & (1 << 31):
                return out

    def closed(self) -> bool:
        """Whether the server closes the connection (after what it still sends, such
        as a TLS alert, at most 64 KiB)."""
        try:
            for _ in range(64):
                if self.s.recv(1024) == b"":
                    return True
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True


async def test_raw_client_before_and_after_starttls(start_daemon, tmp, pki):
    good = pki["good"]
    img = image_with_data(tmp)
    port = free_port()
    d = start_daemon([*raw_args(img), "--object",
                      f"tls-creds-x509,id=tls0,dir={good / 'server'},endpoint=server,verify-peer=off"])
    async with d.qmp() as c:
        await start_tls_server(c, port)
        await execute(c, "nbd-server-add", {"device": "n"})
        go = struct.pack(">I", 1) + b"n" + b"\0\0"
        cl = RawClient(port)
        # Options before TLS are refused, and the negotiation goes on.
        assert cl.option(OPT_STRUCTURED_REPLY)[-1][0] == REP_ERR_TLS_REQD
        assert cl.option(OPT_GO, go)[-1][0] == REP_ERR_TLS_REQD
        assert cl.option(99)[-1][0] == REP_ERR_TLS_REQD
        assert cl.option(OPT_STARTTLS)[-1][0] == REP_ACK
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(good / "ca-cert.pem"))
        cl.s = ctx.wrap_socket(cl.s, server_hostname="127.0.0.1")
        assert cl.s.version() == "TLSv1.3"
        # STARTTLS again: already on.
        assert cl.option(OPT_STARTTLS)[-1][0] == REP_ERR_INVALID
        assert cl.option(OPT_STRUCTURED_REPLY)[-1][0] == REP_ACK
        replies = cl.option(OPT_GO, go)
        assert replies[-1][0] == REP_ACK
        info = [data for kind, data in replies if kind == 3 and data[:2] == b"\0\0"]
        assert struct.unpack(">Q", info[0][2:10])[0] == SIZE
        cl.s.close()
        # STARTTLS with a payload drops the connection.
        cl = RawClient(port)
        cl.send_option(OPT_STARTTLS, b"x")
        magic, o, kind, n = struct.unpack(">QIII", cl.recv(20))
        assert kind == REP_ERR_INVALID
        cl.recv(n)
        assert cl.closed()
        # NBD_OPT_EXPORT_NAME before TLS drops it without a reply.
        cl = RawClient(port)
        cl.send_option(OPT_EXPORT_NAME, b"n")
        assert cl.closed()
        # Garbage where the TLS handshake should be ends that connection only.
        cl = RawClient(port)
        assert cl.option(OPT_STARTTLS)[-1][0] == REP_ACK
        cl.s.sendall(b"\x16\x03\x01\xff\xff" + b"\xa5" * 4096)
        assert cl.closed()
        # The server still serves TLS clients.
        run("nbdinfo", f"nbds://127.0.0.1:{port}/n?tls-certificates={good / 'client'}")


async def test_nbd_driver_over_tls(start_daemon, tmp, pki):
    """blockdev-add driver=nbd with tls-creds against another daemon's TLS export."""
    good, other = pki["good"], pki["other"]
    img = image_with_data(tmp)
    sock = tmp / "nbd.sock"
    start_daemon([
        *raw_args(img),
        "--object", f"tls-creds-x509,id=tls0,dir={good / 'server'},endpoint=server",
        "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=tls0",
        "--export", "nbd,id=e,node-name=n,name=disk",
    ], name="srv")
    d = start_daemon([])
    async with d.qmp() as c:
        await execute(c, "object-add", creds("good", good / "client", "client"))
        await execute(c, "object-add", creds("other", other / "client", "client"))
        # Files that are not what they should be.
        badkey, badca = tmp / "badkey", tmp / "badca"
        for bad, f in ((badkey, "server-key.pem"), (badca, "ca-cert.pem")):
            bad.mkdir()
            for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
                (bad / name).write_bytes((good / "server" / name).read_bytes())
            (bad / f).write_text("garbage\n")
        await error(c, "object-add", creds("t", badkey, "server"),
                    contains=[f"Cannot load certificate '{badkey}/server-cert.pem' & "
                              f"key '{badkey}/server-key.pem': "])
        await error(c, "object-add", creds("t", badca, "server"),
                    contains=[f"Unable to import CA certificate list {badca}/ca-cert.pem"])
        await execute(c, "object-add", creds("srv", good / "server", "server"))

        def node(name, **extra):
            o = {"driver": "nbd", "node-name": name, "read-only": True,
                 "server": {"type": "unix", "path": str(sock)}, "export": "disk"}
            o.update(extra)
            return o

        await error(c, "blockdev-add", node("a", **{"tls-creds": "other", "tls-hostname": "localhost"}),
                    contains=["The certificate hasn't got a known issuer"])
        await error(c, "blockdev-add", node("a", **{"tls-creds": "good", "tls-hostname": "example.com"}),
                    contains=["Certificate does not match the hostname example.com"])
        await error(c, "blockdev-add", node("a", **{"tls-creds": "good"}),
                    contains=["No hostname for certificate validation"])
        await error(c, "blockdev-add", node("a", **{"tls-creds": "nosuch"}),
                    desc="No TLS credentials with id 'nosuch'")
        await error(c, "blockdev-add", node("a", **{"tls-creds": "srv", "tls-hostname": "localhost"}),
                    contains=["Expected TLS credentials for a client endpoint"])
        await error(c, "blockdev-add", node("a"),
                    contains=["TLS negotiation required before option"])
        await execute(c, "blockdev-add", node("a", **{"tls-creds": "good", "tls-hostname": "localhost"}))
        nodes = {n["node-name"]: n for n in await execute(c, "query-named-block-nodes")}
        assert nodes["a"]["image"]["virtual-size"] == SIZE
        await execute(c, "blockdev-del", {"node-name": "a"})

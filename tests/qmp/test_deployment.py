"""Deployment: QMP on stdio and on pipes, sockets passed as file descriptors
(``addr.type=fd``), ``--daemonize`` with stdio, ``-T``.

These start the daemon themselves (not through the ``start_daemon`` fixture, whose
monitor is a socket), as vubd or qemu-storage-daemon (``--daemon=qsd``), and expect
the same behaviour and texts from both.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import MIB, _set_pdeathsig, io_ok, make_image, qsd_bin, vubd_bin

NAME = {"vubd": "vubd", "qsd": "qemu-storage-daemon"}


def binary(kind: str) -> str:
    return str(vubd_bin() if kind == "vubd" else qsd_bin())


class PipeQmp:
    """QMP over a pair of pipes: one JSON object a line, events set aside."""

    def __init__(self, write_fd: int, read_fd: int):
        self.write_fd = write_fd
        self.read_fd = read_fd
        self.buf = b""
        self.events: list[dict] = []

    def send(self, msg: dict):
        os.write(self.write_fd, json.dumps(msg).encode() + b"\n")

    def recv(self, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0, f"no reply within {timeout}s; have {self.buf!r}"
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 65536)
                assert chunk, f"end of output; have {self.buf!r}"
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def reply(self) -> dict:
        while True:
            m = self.recv()
            if "event" in m:
                self.events.append(m)
            else:
                return m

    def cmd(self, execute: str, **arguments) -> dict:
        msg: dict = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        self.send(msg)
        return self.reply()

    def start(self):
        """qemu-storage-daemon's stdio monitor greets only once input arrives: send
        the negotiation first, then read the greeting and its reply."""
        self.send({"execute": "qmp_capabilities"})
        greeting = self.recv()
        assert "QMP" in greeting, greeting
        assert self.reply() == {"return": {}}


def spawn(kind: str, args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [binary(kind), *args], preexec_fn=_set_pdeathsig, stderr=subprocess.PIPE, **kw
    )


def terminate(p: subprocess.Popen):
    p.send_signal(signal.SIGTERM)
    assert p.wait(15) == 0


def exercise(q: PipeQmp):
    q.start()
    nodes = q.cmd("query-named-block-nodes")["return"]
    assert [n["node-name"] for n in nodes] == ["n0"]
    assert q.cmd("blockdev-add", driver="null-co", **{"node-name": "n1"}) == {"return": {}}
    e = q.cmd("blockdev-add", driver="null-co", **{"node-name": "n1"})
    assert e["error"]["desc"] == "Duplicate nodes with node-name='n1'"


def test_stdio_monitor_and_end_of_input(kind):
    p = spawn(
        kind,
        ["--chardev", "stdio,id=m", "--monitor", "m", "--blockdev", "null-co,node-name=n0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        exercise(PipeQmp(p.stdin.fileno(), p.stdout.fileno()))
        # End of input ends the session, not the daemon (as qemu-storage-daemon).
        p.stdin.close()
        time.sleep(0.5)
        assert p.poll() is None, p.stderr.read()
        terminate(p)
    finally:
        p.kill()


def test_monitor_on_inherited_connected_socket(kind):
    """``--chardev socket,fd=3`` without server=on: one session on a connected socket
    (a socketpair's end, as a sandbox hands over); its end leaves the daemon running."""
    ours, theirs = socket.socketpair()
    p = _run_with_fd(
        kind,
        ["--chardev", "socket,id=m,fd=3", "--monitor", "m",
         "--blockdev", "null-co,node-name=n0"],
        theirs.fileno(),
    )
    theirs.close()
    try:
        exercise(PipeQmp(ours.fileno(), ours.fileno()))
        ours.close()
        time.sleep(0.5)
        assert p.poll() is None, p.stderr.read()
        terminate(p)
    finally:
        p.kill()


def test_pipe_monitor(kind, tmp):
    base = tmp / "qmp"
    os.mkfifo(f"{base}.in")
    os.mkfifo(f"{base}.out")
    # Both ends opened without waiting for the daemon (a FIFO opened read-write, or
    # read-only without O_NONBLOCK's wait, never blocks).
    to_daemon = os.open(f"{base}.in", os.O_RDWR)
    from_daemon = os.open(f"{base}.out", os.O_RDONLY | os.O_NONBLOCK)
    p = spawn(
        kind,
        ["--chardev", f"pipe,id=m,path={base}", "--monitor", "m",
         "--blockdev", "null-co,node-name=n0"],
    )
    try:
        exercise(PipeQmp(to_daemon, from_daemon))
        terminate(p)
    finally:
        p.kill()
        os.close(to_daemon)
        os.close(from_daemon)


def test_pipe_monitor_missing_path(kind, tmp):
    """Neither P.in and P.out nor P: the error names P."""
    path = tmp / "nope" / "qmp"
    p = spawn(kind, ["--chardev", f"pipe,id=m,path={path}", "--monitor", "m"])
    assert p.wait(10) == 1
    err = p.stderr.read().decode()
    assert err.endswith(f": Could not open '{path}': No such file or directory\n"), err


def test_stdio_with_daemonize_refused(kind):
    p = spawn(kind, ["--daemonize", "--chardev", "stdio,id=m", "--monitor", "m"])
    assert p.wait(10) == 1
    err = p.stderr.read().decode()
    assert err == f"{NAME[kind]}: --chardev stdio,id=m: cannot use stdio with -daemonize\n"


def test_daemonize_returns_when_listening(kind, tmp):
    img = make_image(tmp / "d.img", 4 * MIB)
    sock = tmp / "e.sock"
    pidfile = tmp / "pid"
    r = subprocess.run(
        [binary(kind), "--daemonize", "--pidfile", str(pidfile),
         "--blockdev", f"file,node-name=f,filename={img}",
         "--export", f"vhost-user-blk,id=e,node-name=f,writable=on,addr.type=unix,"
                     f"addr.path={sock}"],
        capture_output=True, timeout=20,
    )
    assert r.returncode == 0, r
    pid = int(pidfile.read_text())
    try:
        assert sock.exists()
        io_ok("write", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 3)
        io_ok("verify", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 3)
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not Path(f"/proc/{pid}").exists()


def _run_with_fd(kind: str, args: list[str], fd: int) -> subprocess.Popen:
    """Starts the daemon with ``fd`` as its descriptor 3 (close_fds would close it
    after the dup2; Python's own descriptors are close-on-exec anyway)."""

    def pre():
        _set_pdeathsig()
        os.dup2(fd, 3)

    return subprocess.Popen(
        [binary(kind), *args], preexec_fn=pre, close_fds=False,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def test_vhost_user_blk_export_on_inherited_socket(kind, tmp):
    img = make_image(tmp / "d.img", 4 * MIB)
    sock = tmp / "e.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen()
    args = ["--blockdev", f"file,node-name=f,filename={img}",
            "--export", "vhost-user-blk,id=e,node-name=f,writable=on,addr.type=fd,addr.str=3"]
    p = _run_with_fd(kind, args, listener.fileno())
    try:
        # Already listening: the frontend connects at once and is served when the
        # daemon is up.
        io_ok("write", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 5)
        io_ok("verify", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 5)
        terminate(p)
    finally:
        p.kill()
        listener.close()


def test_nbd_server_on_inherited_socket(kind, tmp):
    img = make_image(tmp / "d.img", 4 * MIB)
    sock = tmp / "nbd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))  # bound only: the daemon makes it listen
    args = ["--blockdev", f"file,node-name=f,filename={img}",
            "--nbd-server", "addr.type=fd,addr.str=3",
            "--export", "nbd,id=n,node-name=f"]
    p = _run_with_fd(kind, args, listener.fileno())
    try:
        deadline = time.monotonic() + 10
        while True:
            r = subprocess.run(
                ["qemu-img", "info", "--output=json", f"nbd+unix:///f?socket={sock}"],
                capture_output=True, text=True, timeout=10,
            )
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["virtual-size"] == 4 * MIB
        terminate(p)
    finally:
        p.kill()
        listener.close()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: open(tmp / "plain", "w"), "File descriptor '3' is not a socket"),
        (lambda tmp: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
         "Failed to listen on fd socket: Invalid argument"),
    ],
    ids=["file", "unbound-socket"],
)
@pytest.mark.parametrize("option", ["export", "nbd-server"])
def test_bad_inherited_descriptor(kind, tmp, make, message, option):
    thing = make(tmp)
    if option == "export":
        opt = "vhost-user-blk,id=e,node-name=n,addr.type=fd,addr.str=3"
    else:
        opt = "addr.type=fd,addr.str=3"
    args = ["--blockdev", "null-co,node-name=n", f"--{option}", opt]
    p = _run_with_fd(kind, args, thing.fileno())
    assert p.wait(10) == 1
    err = p.stderr.read().decode()
    # QEMU names the option as given; vubd names the export by id.
    assert err.startswith(f"{NAME[kind]}: --{option}") and err.endswith(f": {message}\n"), err
    thing.close()


def test_trace_unknown_event_is_a_warning(kind):
    p = spawn(kind, ["-T", "no_such_event", "--blockdev", "null-co,node-name=n"])
    try:
        time.sleep(0.5)
        assert p.poll() is None
        terminate(p)
    finally:
        p.kill()
    err = p.stderr.read().decode()
    assert (f"{NAME[kind]}: -T no_such_event: warning: trace event 'no_such_event' "
            "does not exist\n") in err, err

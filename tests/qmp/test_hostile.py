"""Hostile QMP clients: huge, deep and broken input, many clients at once, clients that
never read, and slow ones. Each bad input gets an error reply, the connection (or
another client) keeps working, and the daemon's memory stays bounded.

Where QEMU behaves the same, the test runs against qemu-storage-daemon too
(``--daemon=qsd``) and checks the same error texts. vubd-only checks are marked:
qemu-storage-daemon serves one monitor client at a time, and reads its socket a byte
per main-loop pass, so several of these cases cannot run against it at all.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
from pathlib import Path

import pytest

from conftest import (
    CMD_TIMEOUT,
    MIB,
    Daemon,
    RawQmp,
    execute,
    export_opts,
    wait_event,
)

#: vubd's limits (crates/backend/src/qmp/splitter.rs, outbox.rs, server.rs).
VUBD_MAX_CLIENTS = 64

#: How long a well-behaved client may wait for a reply while another client misbehaves
#: (a hang guard: replies normally take milliseconds).
PROMPT = 3.0


# ---------------------------------------------------------------------------------------
# Helpers


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class Peak:
    """The daemon's peak RSS over a stretch of a test, compared with its RSS at the
    start. The kernel's high-water mark (VmHWM) is reset at the start where that is
    allowed, so that short peaks between samples are not missed."""

    def __init__(self, d: Daemon):
        self.pid = d.proc.pid
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.hwm = True
        except OSError:
            self.hwm = False
        self.start = status_kib(self.pid, "VmRSS")
        self.sampled = self.start

    def sample(self):
        self.sampled = max(self.sampled, status_kib(self.pid, "VmRSS"))

    def growth_mib(self) -> float:
        self.sample()
        peak = self.sampled
        if self.hwm:
            peak = max(peak, status_kib(self.pid, "VmHWM"))
        return (peak - self.start) / 1024


def collect_until(r: RawQmp, marker_id: str, timeout: float = 60) -> list[dict]:
    """Messages a raw client receives up to and including the reply whose id is
    ``marker_id``. Reads in bulk: qemu-storage-daemon answers some inputs with a
    hundred thousand error lines."""
    deadline = time.monotonic() + timeout
    pending = bytearray(r.buf)
    r.buf = b""
    out: list[dict] = []
    while True:
        *lines, rest = pending.split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            msg = json.loads(line)
            out.append(msg)
            if msg.get("id") == marker_id:
                r.buf = b"\n".join(lines[i + 1:] + [rest])
                return out
        pending = bytearray(rest)
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"no reply with id {marker_id!r} within {timeout}s; last messages: {out[-3:]}"
            )
        r.sock.settimeout(left)
        chunk = r.sock.recv(1 << 20)
        if not chunk:
            raise AssertionError(f"connection closed before the reply {marker_id!r}: {out[-3:]}")
        pending += chunk


def errors_then_reply(r: RawQmp, marker_id: str, timeout: float = 60) -> list[dict]:
    """Sends ``query-version`` tagged ``marker_id`` after whatever bad input was just
    sent; returns the error replies that came first (at least one) after checking that
    nothing else came, and that the tagged command was answered normally."""
    r.send(json.dumps({"execute": "query-version", "id": marker_id}).encode() + b"\n")
    msgs = [m for m in collect_until(r, marker_id, timeout) if "event" not in m]
    *errors, last = msgs
    assert "return" in last and "qemu" in last["return"], last
    assert errors, "the bad input got no error reply"
    for e in errors:
        assert set(e) == {"error"} and e["error"]["class"] == "GenericError", e
    return [e["error"]["desc"] for e in errors]


def raw_header_then(r: RawQmp, body: bytes):
    """Sends ``query-version`` whose arguments member ``x`` is ``body``."""
    r.send(b'{"execute": "query-version", "arguments": {"x": ' + body + b"}}\n")


# ---------------------------------------------------------------------------------------
# Huge input


@pytest.mark.vubd_only(
    "qemu-storage-daemon's monitor reads its socket one byte per main-loop pass "
    "(about 0.25 MB/s), so 100 MB take some 7 minutes; past 64 MiB it answers 'JSON "
    "token size limit exceeded' and then an error for each token of the rest"
)
def test_100mb_line(daemon):
    """A 100 MB command line gets one error as soon as it passes the limit (1 MiB);
    the rest is skipped without being stored; another client is served meanwhile and
    the connection works afterwards."""
    r = daemon.raw(negotiate=True)
    other = daemon.raw(negotiate=True)
    peak = Peak(daemon)
    chunk = b"A" * MIB
    t0 = time.monotonic()
    r.send(b'{"execute": "query-version", "arguments": {"x": "')
    for i in range(100):
        r.send(chunk)
        if i % 10 == 0:
            peak.sample()
        if i == 50:
            t = time.monotonic()
            resp = other.cmd("query-version", id="meanwhile")
            assert resp["id"] == "meanwhile" and "return" in resp, resp
            assert time.monotonic() - t < PROMPT
    r.send(b'"}}\n')
    errors = errors_then_reply(r, "after")
    assert errors == ["JSON token size limit exceeded"], errors
    growth = peak.growth_mib()
    assert growth < 24, f"vubd's RSS grew by {growth:.1f} MiB for a 100 MB line"
    print(f"100 MB line: {time.monotonic() - t0:.1f}s, peak RSS growth {growth:.1f} MiB")
    daemon.check_alive()
    r.close()
    other.close()


@pytest.mark.vubd_only(
    "qemu-storage-daemon's monitor reads its socket one byte per main-loop pass: "
    "100 MB of junk take some 7 minutes"
)
def test_100mb_of_junk_without_brackets(daemon):
    """Junk with no brackets or newline is a top-level text too: one error, then it is
    skipped to the end of its line."""
    r = daemon.raw(negotiate=True)
    peak = Peak(daemon)
    chunk = b"x" * MIB
    for _ in range(100):
        r.send(chunk)
    r.send(b"\n")
    assert errors_then_reply(r, "after") == ["JSON token size limit exceeded"]
    growth = peak.growth_mib()
    assert growth < 24, f"vubd's RSS grew by {growth:.1f} MiB"
    r.close()


def test_token_count_limit(daemon, kind):
    """2.2 million tokens (a 2.2 MB array of ones): QEMU's limit is 2 Mi tokens, vubd's
    64 Ki; both answer with QEMU's message. QEMU then reads the rest of the array
    afresh (an error per token); vubd skips it to its end (one error in all)."""
    r = daemon.raw(negotiate=True)
    peak = Peak(daemon)
    # qemu-storage-daemon takes its input at some 0.25 MB/s.
    r.sock.settimeout(120)
    raw_header_then(r, b"[" + b"1," * 1_100_000 + b"1]")
    errors = errors_then_reply(r, "after", timeout=120)
    assert errors[0] == "JSON token count limit exceeded", errors[:3]
    if kind == "vubd":
        assert errors == ["JSON token count limit exceeded"], errors[:5]
        growth = peak.growth_mib()
        assert growth < 24, f"vubd's RSS grew by {growth:.1f} MiB"
    r.close()


# ---------------------------------------------------------------------------------------
# Deep nesting


def test_nesting_100000_deep(daemon, kind):
    """JSON nested 100000 deep gets QEMU's error; the connection keeps working. vubd
    answers once and skips the rest of the text without storing it; QEMU starts
    counting afresh after each error and answers many times."""
    r = daemon.raw(negotiate=True)
    peak = Peak(daemon)
    n = 100_000
    raw_header_then(r, b"[" * n + b"]" * n)
    errors = errors_then_reply(r, "after")
    assert errors[0] == "JSON nesting depth limit exceeded", errors[:3]
    if kind == "vubd":
        assert errors == ["JSON nesting depth limit exceeded"], errors[:5]
        growth = peak.growth_mib()
        assert growth < 8, f"vubd's RSS grew by {growth:.1f} MiB"
    r.close()


def test_nesting_within_the_limit_is_parsed(daemon):
    """Nesting that both limits allow (vubd: 127 levels, QEMU: 1024) is parsed: the
    command then fails on its argument, not on the JSON."""
    r = daemon.raw(negotiate=True)
    n = 120  # + the command object and its arguments
    raw_header_then(r, b"[" * n + b"]" * n)
    assert errors_then_reply(r, "after") == ["Parameter 'x' is unexpected"]
    r.close()


@pytest.mark.vubd_only("QEMU's nesting limit is 1024 levels; vubd's is 127 (serde_json's)")
def test_nesting_limit_boundary(daemon):
    r = daemon.raw(negotiate=True)
    # The command object and its arguments are two levels.
    raw_header_then(r, b"[" * 125 + b"]" * 125)
    assert errors_then_reply(r, "a") == ["Parameter 'x' is unexpected"]
    raw_header_then(r, b"[" * 126 + b"]" * 126)
    assert errors_then_reply(r, "b") == ["JSON nesting depth limit exceeded"]
    r.close()


# ---------------------------------------------------------------------------------------
# Invalid UTF-8 and stray bytes


@pytest.mark.parametrize(
    "bad",
    [b"\xe9", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"],
    ids=["lone-lead", "overlong", "surrogate", "above-10ffff", "truncated"],
)
def test_invalid_utf8_in_a_string(daemon, bad):
    """A string that is not valid UTF-8: exactly one error, QEMU's text."""
    r = daemon.raw(negotiate=True)
    r.send(b'{"execute": "query-version", "id": "a' + bad + b'b"}\n')
    assert errors_then_reply(r, "after") == [
        "JSON parse error, invalid UTF-8 sequence in string"
    ]
    r.close()


def test_impossible_bytes_in_a_string(daemon):
    """0xFF can never occur in UTF-8: it is a lexical error where it stands (QEMU
    quotes the string up to it), and the rest of the input is read afresh."""
    r = daemon.raw(negotiate=True)
    r.send(b'{"execute": "query-version", "id": "a\xffb"}\n')
    errors = errors_then_reply(r, "after")
    assert errors[0] == "JSON parse error, stray '\"a\ufffd'", errors


@pytest.mark.parametrize(
    "bad",
    [b"\xe9", b"\xc3\xa9", b"\xff\xfe"],
    ids=["latin1", "utf8-e-acute", "ff-fe"],
)
def test_invalid_utf8_outside_strings(daemon, bad):
    r = daemon.raw(negotiate=True)
    r.send(b'{"execute": "query-version", "id": 1' + bad + b"}\n")
    errors = errors_then_reply(r, "after")
    assert errors[0] == "JSON parse error, stray '\ufffd'", errors
    # Between two commands: an error, and the next command is served.
    r.send(bad + b'{"execute": "query-version", "id": "x"}\n')
    msgs = collect_until(r, "x")
    assert msgs[0] == {
        "error": {"class": "GenericError", "desc": "JSON parse error, stray '\ufffd'"}
    }, msgs
    assert "return" in msgs[-1], msgs
    r.close()


def test_valid_utf8_round_trip(daemon):
    r = daemon.raw(negotiate=True)
    text = "é€😀 ünïcödé"
    resp = r.request(json.dumps({"execute": "query-version", "id": text}, ensure_ascii=False))
    assert resp["id"] == text, resp
    r.close()


@pytest.mark.parametrize("reset", [b"\x01", b"\xff"], ids=["control-char", "0xff"])
def test_lexical_error_resets_the_parser(daemon, reset):
    """The QMP specification's way back to a known state: after input the parser is
    stuck in (an unterminated string and open brackets), a control character or 0xFF
    ends it with an error, and the next command is served."""
    r = daemon.raw(negotiate=True)
    r.send(b'{"execute": "query-version", "arguments": {"a": [[[ "never ends')
    r.send(reset)
    errors = errors_then_reply(r, "after")
    assert errors[0].startswith("JSON parse error, stray '"), errors
    r.close()


# ---------------------------------------------------------------------------------------
# Many clients


@pytest.mark.vubd_only(
    "qemu-storage-daemon serves one monitor client at a time and listens with a "
    "backlog of 1: a third concurrent connect fails with EAGAIN"
)
async def test_50_clients_at_once(daemon):
    """50 clients connected and negotiated at the same time, all asking at once: each
    gets its answer. Threads and memory per client stay small."""
    threads0 = int(
        re.search(r"Threads:\s+(\d+)", Path(f"/proc/{daemon.proc.pid}/status").read_text())[1]
    )
    peak = Peak(daemon)
    clients = await asyncio.gather(*(daemon.connect(name=f"c{i}") for i in range(50)))
    try:
        results = await asyncio.gather(*(execute(c, "query-version") for c in clients))
        assert all(r["qemu"]["major"] == 7 for r in results), results
        threads = int(
            re.search(r"Threads:\s+(\d+)", Path(f"/proc/{daemon.proc.pid}/status").read_text())[1]
        )
        assert threads - threads0 <= 2 * 50, f"{threads - threads0} threads for 50 clients"
        growth = peak.growth_mib()
        assert growth < 24, f"vubd's RSS grew by {growth:.1f} MiB for 50 clients"
    finally:
        await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)
    daemon.check_alive()


@pytest.mark.vubd_only(
    "qemu-storage-daemon serves one monitor client at a time; vubd serves 64 per "
    "monitor socket"
)
def test_clients_beyond_the_cap_wait_their_turn(daemon):
    """Past 64 clients, a new one waits in the listen backlog (no greeting, no thread,
    no memory) until a client leaves, then is greeted and served."""
    clients = [daemon.raw(negotiate=False) for _ in range(VUBD_MAX_CLIENTS)]
    late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        late.connect(str(daemon.monitor))
        late.settimeout(0.5)
        with pytest.raises(socket.timeout):
            late.recv(4096)
        clients.pop().close()
        late.settimeout(CMD_TIMEOUT)
        greeting = late.recv(4096)
        assert b'"QMP"' in greeting, greeting
        late.sendall(b'{"execute": "qmp_capabilities", "id": 1}\n')
        assert b'"return"' in late.recv(4096)
    finally:
        late.close()
        for c in clients:
            c.close()
    # Every slot is given back: 64 new clients are served again.
    again = [daemon.raw(negotiate=True) for _ in range(VUBD_MAX_CLIENTS)]
    for c in again:
        c.close()
    daemon.check_alive()


# ---------------------------------------------------------------------------------------
# Clients that do not read, and slow ones


def stuff_until_blocked(sock: socket.socket, msg: bytes, quiet: float = 1.0) -> int:
    """Sends ``msg`` over and over without reading, until the daemon has stopped taking
    input for ``quiet`` seconds. Returns how many were sent."""
    sock.setblocking(False)
    batch = msg * 64
    sent = 0
    last = time.monotonic()
    while time.monotonic() - last < quiet:
        try:
            sent += sock.send(batch)
            last = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
    return sent // len(msg)


@pytest.mark.vubd_only(
    "qemu-storage-daemon serves one monitor client at a time, so no other client is "
    "served while one does not read; it also buffers the unread replies without bound "
    "(200000 unread query-named-block-nodes replies grew it by 80 MB)"
)
async def test_client_that_never_reads(daemon, tmp):
    """One client floods commands and never reads its replies or events. Another client
    keeps being served at once, events included; the daemon's memory stays bounded;
    the reader is disconnected once its output has been stuck for 10 s."""
    hog = daemon.raw(negotiate=True)
    peak = Peak(daemon)
    n = stuff_until_blocked(hog.sock, b'{"execute": "query-named-block-nodes"}\n')
    stuck = time.monotonic()
    assert n > 100, n
    async with daemon.qmp(name="good") as c:
        with c.listener() as events:
            for i in range(20):
                t = time.monotonic()
                await execute(c, "blockdev-add", {"driver": "null-co", "node-name": f"h{i}"})
                await execute(c, "block-export-add", export_opts(f"h{i}", f"h{i}", tmp / f"h{i}.sock"))
                await execute(c, "block-export-del", {"id": f"h{i}"})
                ev = await wait_event(events, "BLOCK_EXPORT_DELETED", timeout=PROMPT)
                assert ev["data"] == {"id": f"h{i}"}, ev
                await execute(c, "query-version")
                took = time.monotonic() - t
                assert took < PROMPT, f"round {i} took {took:.1f}s while another client hogs"
                peak.sample()
        # vubd drops a client whose output has been stuck for 10 s. Once that has
        # passed, the hog's socket gives what was already sent, and then the end (or
        # a reset: its commands were left unread).
        await asyncio.sleep(max(0.0, stuck + 11 - time.monotonic()))
        await execute(c, "query-version")

        def drain():
            hog.sock.setblocking(True)
            hog.sock.settimeout(5)
            try:
                while hog.sock.recv(1 << 20):
                    pass
            except ConnectionResetError:
                # Closed with the hog's unread commands still in vubd's queue.
                pass

        await asyncio.to_thread(drain)
        for i in range(20):
            await execute(c, "blockdev-del", {"node-name": f"h{i}"})
    growth = peak.growth_mib()
    assert growth < 24, f"vubd's RSS grew by {growth:.1f} MiB"
    hog.close()
    daemon.check_alive()


@pytest.mark.vubd_only(
    "qemu-storage-daemon serves one monitor client at a time: a slow client holds "
    "every other one off"
)
def test_slow_and_stalled_partial_commands(daemon):
    """Clients that send a command a byte at a time, or leave one half-sent, hold up
    nobody; the slow command is answered once complete."""
    stalled = [daemon.raw(negotiate=True) for _ in range(10)]
    for s in stalled:
        s.send(b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-na')
    slow = daemon.raw(negotiate=True)
    other = daemon.raw(negotiate=True)
    cmd = b'{"execute": "query-version", "id": "slow"}\n'
    for i, b in enumerate(cmd):
        slow.send(bytes([b]))
        time.sleep(0.02)
        if i % 10 == 0:
            t = time.monotonic()
            resp = other.cmd("query-block-exports", id=i)
            assert resp["id"] == i and "return" in resp, resp
            assert time.monotonic() - t < PROMPT
    resp = slow.reply()
    assert resp["id"] == "slow" and "return" in resp, resp
    for s in stalled + [slow, other]:
        s.close()
    daemon.check_alive()


def test_client_that_half_closes_gets_its_replies(daemon):
    """A client that sends its commands and shuts down its sending side (as
    ``socat`` does at the end of its input) still gets every reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CMD_TIMEOUT)
    sock.connect(str(daemon.monitor))
    cmds = [{"execute": "qmp_capabilities"}] + [
        {"execute": "query-version", "id": i} for i in range(200)
    ]
    sock.sendall(b"".join(json.dumps(c).encode() + b"\n" for c in cmds))
    sock.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    sock.close()
    lines = [json.loads(x) for x in data.splitlines() if x.strip()]
    assert "QMP" in lines[0], lines[0]
    assert lines[1] == {"return": {}}, lines[1]
    assert [m.get("id") for m in lines[2:]] == list(range(200)), lines[-3:]

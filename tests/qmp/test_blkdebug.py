"""blkdebug events raised where QEMU 7.2 raises them: the same inject-error rule, on a
blkdebug node under a qcow2 node (or exported itself), makes the same request fail in
vubd and in qemu-storage-daemon.

Each case opens a daemon with the rule (``once``, so that one request fails), then
runs requests through the export with vubd-io: first some that must not raise the
event (they pass), then the one that raises it (it fails: a write, its flush, or a
read), then the same again (it passes), and the data reads back. Requests through
vhost-user-blk fail with EIO whatever the errno; the errno is checked where a QMP
error carries it (open, resize).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest

from chains import KIB, JobEvents, compare, qemu_img, run, write_pattern, write_raw
from conftest import MIB, error, execute, export_args, make_image, vubd_io

CS = 64 * KIB
SIZE = 1024 * MIB
#: One L2 table of a 64 KiB-cluster image maps 512 MiB.
L2_SPAN = 512 * MIB


def qcow2(tmp: Path, name: str, writes=(), backing: Optional[Path] = None, size=SIZE,
          cs: int = CS) -> Path:
    img = tmp / f"{name}.qcow2"
    args = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}"]
    if backing:
        args += ["-b", str(backing), "-F", "qcow2"]
    qemu_img(*args, img, size)
    write_pattern(img, "qcow2", writes)
    return img


def rule(event: str, errno: int = 5, **extra) -> dict:
    return {"event": event, "errno": errno, "once": True, **extra}


def qcow2_args(tmp: Path, img: Path, rules: list[dict], base: Optional[Path] = None) -> list[str]:
    """file -> blkdebug ``dbg`` (the rules) -> qcow2 ``q`` (over ``base``, a qcow2
    image opened without blkdebug, if given), exported as ``e0``."""
    q = {"driver": "qcow2", "node-name": "q", "file": "dbg", "backing": None}
    args = ["--blockdev", f"file,node-name=file,filename={img}"]
    if base:
        args += [
            "--blockdev", f"file,node-name=base-file,filename={base}",
            "--blockdev", json.dumps({"driver": "qcow2", "node-name": "base", "file": "base-file",
                                      "backing": None}),
        ]
        q["backing"] = "base"
    dbg = {"driver": "blkdebug", "node-name": "dbg", "image": "file", "inject-error": rules}
    return args + [
        "--blockdev", json.dumps(dbg),
        "--blockdev", json.dumps(q),
        *export_args("e0", "q", tmp / "d-e0.sock"),
    ]


def run_steps(sock: Path, steps: list[tuple]):
    """Each step is (op, offset, length, seed, failure): op "write" (a write then a
    flush) or "verify" (a read); failure None if the step must pass, else the start
    of vubd-io's message for the request that must fail ("write of", "flush", "read
    of")."""
    for i, (op, off, n, seed, fails) in enumerate(steps):
        r = vubd_io(op, "--socket", sock, "--offset", off, "--len", n, "--seed", seed)
        what = f"step {i} ({op} {off}+{n})"
        if fails is None:
            assert r["rc"] == 0 and r.get("ok"), f"{what} failed: {r}"
        else:
            assert r["rc"] != 0 and not r.get("ok"), f"{what} passed, expected it to fail"
            assert r["error"].startswith(fails), f"{what}: {r['error']!r}, expected {fails!r}"
            if fails != MISMATCH:
                assert "Input/output error" in r["error"], r


W = "write of"
R = "read of"
#: A read that passes, of data that is not vubd-io's pattern.
MISMATCH = "data mismatch"

# event: (data written offline before the start, requests)
QCOW2_CASES = {
    # The case: the header and tables are read without read_aio, so the image
    # opens; a write does not arm it; the first guest data read fails.
    "read_aio": ([(0, CS, 1)], [
        ("write", MIB, CS, 2, None),
        ("verify", 0, CS, 1, R),
        ("verify", 0, CS, 1, None),
        ("verify", MIB, CS, 2, None),
    ]),
    # A new L2 table (nothing to load), then the first read that misses the cache.
    "l2_load": ([(0, CS, 1)], [
        ("write", L2_SPAN + MIB, CS, 2, None),
        ("verify", 0, CS, 1, R),
        ("verify", 0, CS, 1, None),
        ("verify", L2_SPAN + MIB, CS, 2, None),
    ]),
    # An overwrite allocates nothing; the first write to a new cluster does.
    "cluster_alloc": ([(0, CS, 1)], [
        ("write", 0, CS, 2, None),
        ("write", 2 * CS, CS, 3, W),
        ("write", 2 * CS, CS, 3, None),
        ("verify", 0, CS, 2, None),
        ("verify", 2 * CS, CS, 3, None),
    ]),
    # A new cluster in an existing L2 table passes; one that needs a new table fails.
    "l2_alloc_write": ([(0, CS, 1)], [
        ("write", 2 * CS, CS, 2, None),
        ("write", L2_SPAN, CS, 3, W),
        ("write", L2_SPAN, CS, 3, None),
        ("verify", 0, CS, 1, None),
        ("verify", 2 * CS, CS, 2, None),
        ("verify", L2_SPAN, CS, 3, None),
    ]),
    # A write of part of a new cluster, whose rest reads as zeroes: QEMU zeroes the
    # cluster instead of copying zeroes (vubd zeroes or skips that part).
    "cluster_alloc_space": ([(0, CS, 1)], [
        ("write", 0, 4 * KIB, 2, None),
        ("write", 2 * CS + 4 * KIB, 4 * KIB, 3, W),
        ("write", 2 * CS + 4 * KIB, 4 * KIB, 3, None),
        ("verify", 0, 4 * KIB, 2, None),
        ("verify", 4 * KIB, CS - 4 * KIB, 1, None),
        ("verify", 2 * CS + 4 * KIB, 4 * KIB, 3, None),
    ]),
    # After blkdebug's own write: the flush after the first write fails.
    "pwritev_done": ([(0, CS, 1)], [
        ("write", 0, CS, 2, "flush"),
        ("write", 0, CS, 2, None),
        ("verify", 0, CS, 2, None),
    ]),
    # QEMU looks the refcount block up when it allocates (vubd too, when it reserves).
    "refblock_load": ([(0, CS, 1)], [
        ("write", 0, CS, 2, None),
        ("write", 2 * CS, CS, 3, W),
        ("write", 2 * CS, CS, 3, None),
        ("verify", 0, CS, 2, None),
        ("verify", 2 * CS, CS, 3, None),
    ]),
    "l1_update": ([(0, CS, 1)], [
        ("write", 2 * CS, CS, 2, None),
        ("write", L2_SPAN, CS, 3, W),
        ("write", L2_SPAN, CS, 3, None),
        ("verify", L2_SPAN, CS, 3, None),
    ]),
    # An overwrite changes no refcount; an allocating write does, and QEMU writes
    # its cached refcount block back at the flush after it (vubd has written it
    # already, at the write, and raises the event at that flush).
    "refblock_update_part": ([(0, CS, 1)], [
        ("write", 0, CS, 2, None),
        ("write", 2 * CS, CS, 3, "flush"),
        ("write", 2 * CS, CS, 3, None),
        ("write", 4 * CS, CS, 4, None),
        ("verify", 2 * CS, CS, 3, None),
        ("verify", 4 * CS, CS, 4, None),
    ]),
    # An overwrite changes no L2 entry; an allocating write does, and the table is
    # written back by the flush after it.
    "l2_update": ([(0, CS, 1)], [
        ("write", 0, CS, 2, None),
        ("write", 2 * CS, CS, 3, "flush"),
        ("write", 2 * CS, CS, 3, None),
        ("verify", 2 * CS, CS, 3, None),
    ]),
}


@pytest.mark.parametrize("event", list(QCOW2_CASES))
async def test_qcow2_event(start_daemon, tmp, event):
    writes, steps = QCOW2_CASES[event]
    img = qcow2(tmp, "top", writes)
    d = start_daemon(qcow2_args(tmp, img, [rule(event)]))
    run_steps(d.sock("e0"), steps)


# Copy on write of a partial cluster over a backing file: the base holds seed 1 in
# its first MiB; a whole-cluster write copies nothing; a 4 KiB one copies the rest of
# its cluster from the base (read from the backing node, written to top's file).
BACKING_STEPS = [
    ("write", 0, CS, 2, None),
    ("write", 2 * CS + 4 * KIB, 4 * KIB, 3, W),
    ("write", 2 * CS + 4 * KIB, 4 * KIB, 3, None),
    ("verify", 0, CS, 2, None),
    ("verify", 2 * CS, 4 * KIB, 1, None),
    ("verify", 2 * CS + 4 * KIB, 4 * KIB, 3, None),
    ("verify", 2 * CS + 8 * KIB, CS - 8 * KIB, 1, None),
]

BACKING_CASES = {
    "cow_read": BACKING_STEPS,
    "cow_write": BACKING_STEPS,
    # Raised on top's file before a read from the backing node, which does not go
    # through blkdebug: the rule fails the next request on top's file.
    "read_backing_aio": [
        ("verify", 0, CS, 1, None),
        ("verify", CS, CS, 1, None),
        ("write", 4 * MIB, CS, 2, W),
        ("write", 4 * MIB, CS, 2, None),
        ("verify", 4 * MIB, CS, 2, None),
        ("verify", 0, MIB, 1, None),
    ],
}


@pytest.mark.parametrize("event", list(BACKING_CASES))
async def test_qcow2_backing_event(start_daemon, tmp, event):
    base = qcow2(tmp, "base", [(0, MIB, 1)])
    top = qcow2(tmp, "top", backing=base)
    d = start_daemon(qcow2_args(tmp, top, [rule(event)], base=base))
    run_steps(d.sock("e0"), BACKING_STEPS if event != "read_backing_aio" else BACKING_CASES[event])


# Read-modify-write of a write smaller than blkdebug's own `align` (the node pads it):
# an aligned write passes; the unaligned one fails at the write after its padding read
# (after_head: a head to fill; after_tail: only a tail).
RMW_CASES = {
    "pwritev_rmw_after_head": 3 * KIB + 512,
    "pwritev_rmw_after_tail": 0,
}


def rmw_args(tmp: Path, event: str) -> list[str]:
    img = make_image(tmp / "disk.img", 16 * MIB)
    dbg = {
        "driver": "blkdebug", "node-name": "dbg", "align": 4096,
        "image": {"driver": "file", "filename": str(img)},
        "inject-error": [rule(event)],
    }
    return ["--blockdev", json.dumps(dbg), *export_args("e0", "dbg", tmp / "d-e0.sock")]


@pytest.mark.parametrize("event", list(RMW_CASES))
async def test_rmw_event(start_daemon, tmp, event):
    d = start_daemon(rmw_args(tmp, event))
    off = RMW_CASES[event]
    run_steps(d.sock("e0"), [
        ("write", 8 * KIB, 4 * KIB, 1, None),
        ("write", off, 512, 2, W),
        ("write", off, 512, 2, None),
        ("verify", off, 512, 2, None),
        ("verify", 8 * KIB, 4 * KIB, 1, None),
    ])


RMW_READ_CASES = [("pwritev_rmw_head", 3 * KIB + 512), ("pwritev_rmw_tail", 0)]


@pytest.mark.parametrize("event,off", RMW_READ_CASES)
async def test_rmw_read_event(start_daemon, tmp, event, off):
    """pwritev_rmw_head/_tail are raised before the padding read, which the rule
    fails: QEMU 7.2's bdrv_co_pwritev_part drops that read's error, so the write
    passes (its padding holds whatever the failed read left; only the written bytes
    are checked), and the next request is not failed."""
    d = start_daemon(rmw_args(tmp, event))
    run_steps(d.sock("e0"), [
        ("write", 8 * KIB, 4 * KIB, 1, None),
        ("write", off, 512, 2, None),
        ("verify", off, 512, 2, None),
        ("verify", 8 * KIB, 4 * KIB, 1, None),
    ])


def zeroes(sock: Path, off: int, n: int):
    r = vubd_io("zeroes", "--socket", sock, "--offset", off, "--len", n)
    assert r["rc"] == 0 and r.get("ok"), r


@pytest.mark.parametrize("op", ["write", "zeroes"])
@pytest.mark.parametrize("event,off", RMW_READ_CASES)
async def test_rmw_read_error_is_ignored(start_daemon, tmp, op, event, off):
    """A rule of iotype read that stays armed: the padding read after the event
    fails (the next read does too, which shows the rule was armed before it), yet
    the write or write-zeroes that padded passes, as in QEMU 7.2 (whose
    bdrv_co_do_zero_pwritev drops the padding read's error as well)."""
    img = make_image(tmp / "disk.img", 16 * MIB)
    dbg = {
        "driver": "blkdebug", "node-name": "dbg", "align": 4096,
        "image": {"driver": "file", "filename": str(img)},
        "inject-error": [{"event": event, "iotype": "read", "once": False}],
    }
    d = start_daemon(["--blockdev", json.dumps(dbg), *export_args("e0", "dbg", tmp / "d-e0.sock")])
    sock = d.sock("e0")
    run_steps(sock, [("write", 8 * KIB, 4 * KIB, 1, None), ("verify", 8 * KIB, 4 * KIB, 1, None)])
    if op == "write":
        run_steps(sock, [("write", off, 512, 2, None)])
    else:
        zeroes(sock, off, 512)
    run_steps(sock, [("verify", 8 * KIB, 4 * KIB, 1, R)])


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
@pytest.mark.parametrize("iotype", [None, "write"])
async def test_refblock_update_part_fails_flush(start_daemon, tmp, compat, iotype):
    """The refcount change of an allocating write is written back (QEMU: from its
    cache) at the next flush, which the rule fails; with iotype write, on the
    write-back itself. Version 2 images (vubd reserves no clusters there) too."""
    img = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS},compat={compat}", img, SIZE)
    write_pattern(img, "qcow2", [(0, CS, 1)])
    extra = {"iotype": iotype} if iotype else {}
    d = start_daemon(qcow2_args(tmp, img, [rule("refblock_update_part", **extra)]))
    run_steps(d.sock("e0"), [
        ("write", 0, CS, 2, None),
        ("write", 4 * CS, CS, 3, "flush"),
        ("write", 6 * CS, CS, 4, None),
        ("verify", 4 * CS, CS, 3, None),
        ("verify", 6 * CS, CS, 4, None),
    ])


async def test_reftable_load_fails_open(start_daemon, tmp):
    """The refcount table is read at open: its rule fails the open, with its errno."""
    img = qcow2(tmp, "top")
    d = start_daemon([])
    async with d.qmp() as c:
        await execute(c, "blockdev-add", {
            "driver": "blkdebug", "node-name": "dbg",
            "image": {"driver": "file", "filename": str(img)},
            "inject-error": [rule("reftable_load", errno=28)],
        })
        desc = await error(c, "blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "dbg"})
        assert "No space left on device" in desc, desc
        # The rule fired once: the next open works.
        await execute(c, "blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "dbg"})


@pytest.mark.parametrize("event", ["l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table"])
async def test_l1_grow_fails_resize(start_daemon, tmp, event):
    """Growing past what the L1 table maps moves it; each step's rule fails the resize
    with its errno, and a resize that keeps the table does not raise them."""
    img = qcow2(tmp, "top", [(0, CS, 1)])
    d = start_daemon(qcow2_args(tmp, img, [rule(event, errno=28)]))
    async with d.qmp() as c:
        # 1 GiB needs 2 L1 entries: a resize that still fits keeps the table.
        await execute(c, "block_resize", {"node-name": "q", "size": SIZE - MIB})
        desc = await error(c, "block_resize", {"node-name": "q", "size": 2 * SIZE})
        assert "No space left on device" in desc, desc
        await execute(c, "block_resize", {"node-name": "q", "size": 2 * SIZE})
    vubd_io("verify", "--socket", d.sock("e0"), "--offset", 0, "--len", CS, "--seed", 1)


@pytest.mark.parametrize("event", [
    "refblock_alloc", "refblock_alloc_write", "refblock_alloc_hookup",
])
async def test_refblock_alloc(start_daemon, tmp, event):
    """512-byte clusters: a refcount block covers 128 KiB of the file, so a first
    write of 256 KiB needs a new one, hooked into the refcount table."""
    img = qcow2(tmp, "top", size=MIB, cs=512)
    d = start_daemon(qcow2_args(tmp, img, [rule(event)]))
    run_steps(d.sock("e0"), [
        ("write", 0, 256 * KIB, 1, W),
        ("write", 0, 256 * KIB, 1, None),
        ("verify", 0, 256 * KIB, 1, None),
    ])


@pytest.mark.parametrize("event", [
    "reftable_grow", "refblock_alloc_write_blocks", "refblock_alloc_write_table",
    "refblock_alloc_switch_table",
])
async def test_reftable_grow(start_daemon, tmp, event):
    """512-byte clusters: the one-cluster refcount table covers 8 MiB of the file; a
    write of 9 MiB grows it (new blocks, new table, header switched to it)."""
    img = qcow2(tmp, "top", size=16 * MIB, cs=512)
    d = start_daemon(qcow2_args(tmp, img, [rule(event)]))
    run_steps(d.sock("e0"), [
        ("write", 0, 9 * MIB, 1, W),
        ("write", 0, 9 * MIB, 1, None),
        ("verify", 0, 9 * MIB, 1, None),
    ])


async def test_read_compressed(start_daemon, tmp):
    """A read of a compressed cluster raises read_compressed (a read of a plain one
    does not). The compressed cluster holds bytes of 1 (vubd-io's pattern would not
    compress): once the rule fired, its read passes with data that is not the pattern."""
    img = qcow2(tmp, "top", [(0, CS, 1)])
    run("qemu-io", "-f", "qcow2", "-c", f"write -q -c -P 1 {2 * CS} {CS}", img)
    check = json.loads(run("qemu-img", "check", "--output=json", img).stdout)
    assert check["compressed-clusters"] == 1, check
    d = start_daemon(qcow2_args(tmp, img, [rule("read_compressed")]))
    run_steps(d.sock("e0"), [
        ("verify", 0, CS, 1, None),
        ("verify", 2 * CS, CS, 2, R),
        ("verify", 2 * CS, CS, 2, MISMATCH),
    ])


async def test_l2_alloc_cow_read(start_daemon, tmp):
    """After an internal snapshot the L2 table is shared: the first write copies it
    (l2_alloc_cow_read), the next ones in its range do not."""
    img = qcow2(tmp, "top", [(0, CS, 1)])
    d = start_daemon(qcow2_args(tmp, img, [rule("l2_alloc_cow_read")]))
    run_steps(d.sock("e0"), [("write", 0, CS, 2, None)])
    async with d.qmp() as c:
        await execute(c, "blockdev-snapshot-internal-sync", {"device": "q", "name": "s1"})
    run_steps(d.sock("e0"), [
        ("write", 0, CS, 3, W),
        ("write", 0, CS, 3, None),
        ("write", 2 * CS, CS, 4, None),
        ("verify", 0, CS, 3, None),
        ("verify", 2 * CS, CS, 4, None),
    ])


@pytest.mark.parametrize("event", ["l1_shrink_write_table", "l1_shrink_free_l2_clusters"])
async def test_l1_shrink(start_daemon, tmp, event):
    """Shrinking below an L2 table's range clears its L1 entry (l1_shrink_write_table)
    and frees the table (l1_shrink_free_l2_clusters): the rule fails the resize with
    its errno; a resize that keeps every table does not raise them."""
    img = qcow2(tmp, "top", [(0, CS, 1), (L2_SPAN + MIB, CS, 2)])
    d = start_daemon(qcow2_args(tmp, img, [rule(event, errno=28)]))
    async with d.qmp() as c:
        await execute(c, "block_resize", {"node-name": "q", "size": SIZE - MIB})
        desc = await error(c, "block_resize", {"node-name": "q", "size": L2_SPAN})
        assert "No space left on device" in desc, desc
        await execute(c, "block_resize", {"node-name": "q", "size": L2_SPAN})
    run_steps(d.sock("e0"), [("verify", 0, CS, 1, None)])


async def test_cor_write(start_daemon, tmp):
    """A copy-on-read filter over a blkdebug node: the copy of what a read brought up
    from the backing file raises cor_write on the node read, and fails the read."""
    base = qcow2(tmp, "base", [(0, MIB, 1)])
    top = qcow2(tmp, "top", backing=base)
    dbg = {"driver": "blkdebug", "node-name": "dbg", "image": "q",
           "inject-error": [rule("cor_write")]}
    args = [
        "--blockdev", f"file,node-name=base-file,filename={base}",
        "--blockdev", json.dumps({"driver": "qcow2", "node-name": "base", "file": "base-file",
                                  "backing": None}),
        "--blockdev", f"file,node-name=file,filename={top}",
        "--blockdev", json.dumps({"driver": "qcow2", "node-name": "q", "file": "file",
                                  "backing": "base"}),
        "--blockdev", json.dumps(dbg),
        "--blockdev", "copy-on-read,node-name=cor,file=dbg",
        *export_args("e0", "cor", tmp / "d-e0.sock"),
    ]
    d = start_daemon(args)
    run_steps(d.sock("e0"), [
        ("write", 2 * MIB, CS, 2, None),
        ("verify", 2 * MIB, CS, 2, None),
        ("verify", 0, CS, 1, R),
        ("verify", 0, CS, 1, None),
        ("verify", 0, MIB, 1, None),
    ])


#: QEMU 7.2 events that a qcow2-over-file chain never raises (see the blkdebug driver).
NEVER_RAISED = ["vmstate_load", "vmstate_save", "reftable_update", "empty_image_prepare",
                "refblock_update"]


async def test_never_raised_events_are_accepted(start_daemon, tmp):
    """Rules on the events neither daemon raises are accepted, and (armed for good,
    on any request) never fail one: through refcount block allocation and refcount
    table growth (512-byte clusters, 9 MiB written), internal snapshots, growing and
    shrinking, flushes."""
    img = qcow2(tmp, "top", size=16 * MIB, cs=512)
    d = start_daemon(qcow2_args(tmp, img, [{"event": e, "once": False} for e in NEVER_RAISED]))
    sock = d.sock("e0")
    run_steps(sock, [("write", 0, 9 * MIB, 1, None), ("verify", 0, 9 * MIB, 1, None)])
    async with d.qmp() as c:
        await execute(c, "blockdev-snapshot-internal-sync", {"device": "q", "name": "s1"})
        run_steps(sock, [("write", MIB, 2 * MIB, 2, None)])
        await execute(c, "blockdev-snapshot-delete-internal-sync", {"device": "q", "name": "s1"})
        await execute(c, "block_resize", {"node-name": "q", "size": 64 * MIB})
        await execute(c, "block_resize", {"node-name": "q", "size": 16 * MIB})
    run_steps(sock, [
        ("verify", 0, MIB, 1, None),
        ("verify", MIB, 2 * MIB, 2, None),
        ("verify", 3 * MIB, 6 * MIB, 1, None),
    ])


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("event", ["cluster_alloc_bytes", "l2_update_compressed",
                                   "write_compressed"])
async def test_compressed_write_events(start_daemon, tmp, event, compress):
    """A backup with compress=true writes compressed clusters into a qcow2 target over
    blkdebug: bytes for them are allocated (cluster_alloc_bytes), the L2 entry points
    at them (l2_update_compressed), the data is written (write_compressed); each rule
    fails the write after it, so the job fails with EIO. A plain backup raises none of
    them and completes, equal to the source."""
    size = 4 * MIB
    src = make_image(tmp / "src.img", size)
    write_raw(src, bytes((b"vubd-compress-" * 5000)[: 64 * KIB]) * (size // (64 * KIB)))
    tgt = tmp / "t0.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", tgt, size)
    dbg = {"driver": "blkdebug", "node-name": "dbg", "image": "t0-file",
           "inject-error": [rule(event)]}
    d = start_daemon([
        "--blockdev", f"file,node-name=n0,filename={src}",
        "--blockdev", f"file,node-name=t0-file,filename={tgt}",
        "--blockdev", json.dumps(dbg),
        "--blockdev", "qcow2,node-name=t0,file=dbg",
    ])
    async with d.qmp() as c:
        ev = JobEvents(c)
        await execute(c, "blockdev-backup", {"job-id": "b", "device": "n0", "target": "t0",
                                             "sync": "full", "compress": compress})
        await ev.until("b", "null")
        done = ev.data["BLOCK_JOB_COMPLETED"]
        if compress:
            assert done.get("error") == "Input/output error", done
        else:
            assert "error" not in done, done
    d.expect_exit = True
    assert d.stop() is None
    if not compress:
        compare(src, tgt)


async def test_none_event_arms_at_open(start_daemon, tmp):
    """QEMU raises `none` once, when the blkdebug node opens: its rule fails the first
    request. Under qcow2 that is the header read (the open fails with the errno);
    exported raw with iotype write, the first guest write (reads pass)."""
    img = qcow2(tmp, "top")
    raw = make_image(tmp / "disk.img", 16 * MIB)
    dbg = {"driver": "blkdebug", "node-name": "dbg2", "image": {"driver": "file", "filename": str(raw)},
           "inject-error": [rule("none", iotype="write")]}
    d = start_daemon(["--blockdev", json.dumps(dbg), *export_args("e0", "dbg2", tmp / "d-e0.sock")])
    async with d.qmp() as c:
        await execute(c, "blockdev-add", {
            "driver": "blkdebug", "node-name": "dbg",
            "image": {"driver": "file", "filename": str(img)},
            "inject-error": [rule("none", errno=28)],
        })
        desc = await error(c, "blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "dbg"})
        assert "No space left on device" in desc, desc
        await execute(c, "blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "dbg"})
    run_steps(d.sock("e0"), [
        ("verify", 0, 4 * KIB, 0, MISMATCH),
        ("write", 0, 4 * KIB, 1, W),
        ("write", 0, 4 * KIB, 1, None),
        ("verify", 0, 4 * KIB, 1, None),
    ])


# The same requests for each (event, iotype) rule below, on a qcow2 image holding one
# cluster at 0: which one fails (its index and vubd-io's message start), as measured on
# qemu-storage-daemon 7.2. Write steps are a write and a flush.
MATRIX_STEPS = [
    ("verify", 0, CS, 1),
    ("write", 0, CS, 2),              # 1: an overwrite (no allocation)
    ("write", 2 * CS, CS, 3),         # 2: a new cluster in the existing L2 table
    ("zeroes", 4 * CS, CS, 0),        # 3: a zero flag
    ("write", 6 * CS + 4 * KIB, 4 * KIB, 4),  # 4: part of a new cluster
    ("zeroes", 0, 4 * KIB, 0),
    ("zeroes", 8 * CS, 4 * KIB, 0),
    ("write", 9 * CS, CS, 5),
    ("verify", 2 * CS, CS, 3),        # 8: reads step 2's cluster
]
MATRIX = {
    # vubd's own syncs in an allocating write (QEMU has none) are not seen by rules:
    # a flush rule armed by the allocation fails the guest's flush, as in QEMU.
    ("cluster_alloc", "flush"): {2: "flush"},
    ("refblock_load", "flush"): {2: "flush"},
    ("refblock_update_part", "flush"): {2: "flush"},
    ("l2_update", "flush"): {2: "flush"},
    # Every refcount update raises refblock_alloc (QEMU's alloc_refcount_block runs
    # whether or not the block exists), then refblock_load, also for clusters handed
    # out of vubd's reservation; the allocator's lookups raise neither.
    ("refblock_alloc", None): {2: "write", 8: "data"},
    ("refblock_alloc", "write"): {2: "write", 8: "data"},
    ("refblock_alloc", "flush"): {2: "flush"},
    ("refblock_alloc", "read"): {8: "read"},
    ("refblock_load", None): {2: "write", 8: "data"},
    ("refblock_load", "read"): {8: "read"},
    ("cluster_alloc", "read"): {2: "write", 8: "data"},
    ("cluster_alloc", "write"): {2: "write", 8: "data"},
    # Raised on every write: the overwrite's.
    ("flush_to_os", None): {1: "flush"},
    ("flush_to_disk", "flush"): {1: "flush"},
    ("pwritev", "write"): {1: "write"},
    ("write_aio", None): {1: "write"},
    ("pwritev_done", "read"): {2: "write", 8: "data"},
    # Nothing is freed.
    ("cluster_free", None): {},
    # Step 4's new cluster: its copy-on-write parts read as zeroes, so QEMU zeroes it
    # with one write-zeroes request on the file (pwritev_zero, raised by blkdebug
    # itself) and copies nothing (no cow_write).
    ("pwritev_zero", None): {4: "write"},
    ("pwritev_zero", "write"): {4: "write"},
    ("pwritev_zero", "flush"): {4: "flush"},
    ("pwritev_zero", "read"): {8: "read"},
    ("cluster_alloc_space", "flush"): {4: "flush"},
    ("cluster_alloc_space", "read"): {8: "read"},
    ("cow_write", None): {},
}


@pytest.mark.parametrize("event,iotype", list(MATRIX), ids=lambda v: str(v))
async def test_event_matrix(start_daemon, tmp, event, iotype):
    img = qcow2(tmp, "top", [(0, CS, 1)])
    extra = {"iotype": iotype} if iotype else {}
    d = start_daemon(qcow2_args(tmp, img, [rule(event, **extra)]))
    got = {}
    for i, (op, off, n, seed) in enumerate(MATRIX_STEPS):
        args = ["--socket", d.sock("e0"), "--offset", off, "--len", n]
        if op != "zeroes":
            args += ["--seed", seed]
        r = vubd_io(op, *args)
        if not r.get("ok"):
            got[i] = r["error"].split(" ")[0]
    assert got == MATRIX[(event, iotype)]


# Over a backing file holding seed 1 in its first MiB: a partial write copies from it
# (step 1, into a new L2 table); one past its data (step 2) finds nothing allocated in
# the chain, so QEMU zeroes the new cluster instead (cluster_alloc_space,
# pwritev_zero). The failing requests as measured on qemu-storage-daemon 7.2.
BACKING_MATRIX_STEPS = [
    ("verify", 0, CS, 1),
    ("write", 2 * CS + 4 * KIB, 4 * KIB, 2),
    ("write", 4 * MIB + 4 * KIB, 4 * KIB, 3),
    ("write", 8 * CS, CS, 4),
    ("verify", 2 * CS, 4 * KIB, 1),
]
BACKING_MATRIX = {
    # QEMU writes a new L2 table by flushing its L2 cache (l2_update, then a flush).
    ("l2_update", None): {1: "write"},
    ("l2_update", "flush"): {1: "write"},
    ("read_backing_aio", "flush"): {1: "write"},
    ("cow_read", "flush"): {1: "flush"},
    ("cluster_alloc_space", None): {2: "write"},
    ("cluster_alloc_space", "flush"): {2: "flush"},
    ("pwritev_zero", None): {2: "write"},
    ("pwritev_zero", "flush"): {2: "flush"},
}


@pytest.mark.parametrize("event,iotype", list(BACKING_MATRIX), ids=lambda v: str(v))
async def test_backing_event_matrix(start_daemon, tmp, event, iotype):
    base = qcow2(tmp, "base", [(0, MIB, 1)])
    top = qcow2(tmp, "top", backing=base)
    extra = {"iotype": iotype} if iotype else {}
    d = start_daemon(qcow2_args(tmp, top, [rule(event, **extra)], base=base))
    got = {}
    for i, (op, off, n, seed) in enumerate(BACKING_MATRIX_STEPS):
        r = vubd_io(op, "--socket", d.sock("e0"), "--offset", off, "--len", n, "--seed", seed)
        if not r.get("ok"):
            got[i] = r["error"].split(" ")[0]
    assert got == BACKING_MATRIX[(event, iotype)]

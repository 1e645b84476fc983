"""Named dirty bitmaps over QMP: block-dirty-bitmap-add/remove/clear/enable/disable/merge,
x-debug-block-dirty-bitmap-sha256 and the "dirty-bitmaps" member of
query-named-block-nodes. Writes go through the vhost-user-blk export (vubd-io, a
libblkio frontend); each bitmap's count and SHA-256 are checked against a model of the
granules written (the SHA-256 of the bits as 64-bit little-endian words, as QEMU hashes
them). Every expectation, argument errors included, is qemu-storage-daemon 7.2's (the
tests pass with ``--daemon=qsd``)."""

import asyncio
import hashlib

import pytest

from chains import KIB, chain_args, make_chain, qemu_img
from conftest import MIB, error, execute, export_args, file_raw_args, io_ok

SIZE = 64 * MIB


class Model:
    """The bits QEMU keeps for a bitmap of ``size`` bytes at ``gran``."""

    def __init__(self, size: int, gran: int):
        self.size, self.gran = size, gran
        self.bits: set[int] = set()

    def mark(self, offset: int, length: int):
        end = min(offset + length, self.size)
        self.bits.update(range(offset // self.gran, -(-end // self.gran)))

    @property
    def count(self) -> int:
        return len(self.bits) * self.gran

    @property
    def sha256(self) -> str:
        nbits = -(-self.size // self.gran)
        words = [0] * max(-(-nbits // 64), 1)
        for b in self.bits:
            words[b // 64] |= 1 << (b % 64)
        return hashlib.sha256(b"".join(w.to_bytes(8, "little") for w in words)).hexdigest()


async def bitmaps(c, node: str):
    """The node's "dirty-bitmaps" (None when the member is absent)."""
    nodes = await execute(c, "query-named-block-nodes")
    return next(n for n in nodes if n["node-name"] == node).get("dirty-bitmaps")


async def info(c, node: str, name: str) -> dict:
    return next(b for b in await bitmaps(c, node) if b["name"] == name)


async def sha(c, node: str, name: str) -> str:
    r = await execute(c, "x-debug-block-dirty-bitmap-sha256", {"node": node, "name": name})
    return r["sha256"]


async def check(c, node: str, name: str, model: Model):
    i = await info(c, node, name)
    assert i["count"] == model.count, f"{name}: count {i['count']}, expected {model.count}"
    assert await sha(c, node, name) == model.sha256, f"{name}: sha256 differs from the model"


def write(sock, offset: int, length: int, seed: int = 1):
    io_ok("write", "--socket", sock, "--offset", offset, "--len", length, "--seed", seed)


def add(c, node, name, **kw):
    return execute(c, "block-dirty-bitmap-add", {"node": node, "name": name, **kw})


async def test_add_and_query(daemon):
    async with daemon.qmp() as c:
        assert await bitmaps(c, "n0") is None
        await add(c, "n0", "b1")
        await add(c, "n0", "b2", granularity=512, disabled=True)
        await add(c, "n0-file", "big", granularity=1 << 31)
        # Newest first, QEMU's fields, no "inconsistent" unless set.
        assert await bitmaps(c, "n0") == [
            {"name": "b2", "recording": False, "persistent": False, "busy": False,
             "granularity": 512, "count": 0},
            {"name": "b1", "recording": True, "persistent": False, "busy": False,
             "granularity": 65536, "count": 0},
        ]
        assert (await info(c, "n0-file", "big"))["granularity"] == 1 << 31
        # The bits serialised: 1024 granules of 64 KiB are 16 words, 2 GiB granules
        # over 64 MiB one word.
        assert await sha(c, "n0", "b1") == Model(SIZE, 65536).sha256
        assert await sha(c, "n0", "b2") == Model(SIZE, 512).sha256
        assert await sha(c, "n0-file", "big") == hashlib.sha256(bytes(8)).hexdigest()


async def test_default_granularity_follows_cluster_size(start_daemon, tmp):
    args = []
    for name, cluster in [("q512", 512), ("q64k", 65536), ("q2m", 2 * MIB)]:
        img = tmp / f"{name}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", str(img), "16M")
        args += ["--blockdev", f"qcow2,node-name={name},file.driver=file,file.filename={img}"]
    d = start_daemon(args)
    async with d.qmp() as c:
        for name in ["q512", "q64k", "q2m"]:
            await add(c, name, "b")
        got = {n: (await info(c, n, "b"))["granularity"] for n in ["q512", "q64k", "q2m"]}
        # Clamped to 4 KiB..64 KiB.
        assert got == {"q512": 4096, "q64k": 65536, "q2m": 65536}


async def test_add_errors(start_daemon, tmp):
    v2 = tmp / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(v2), "16M")
    v3 = tmp / "v3.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(v3), "16M")
    big = tmp / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(big), "4T")
    raw = tmp / "r.img"
    with open(raw, "wb") as f:
        f.truncate(16 * MIB)
    d = start_daemon([
        "--blockdev", f"file,node-name=rf,filename={raw}",
        "--blockdev", "raw,node-name=r,file=rf",
        "--blockdev", f"qcow2,node-name=v2,file.driver=file,file.filename={v2}",
        "--blockdev", f"qcow2,node-name=v3,file.driver=file,file.filename={v3}",
        "--blockdev", f"qcow2,node-name=big,file.driver=file,file.filename={big}",
    ])
    cmd = "block-dirty-bitmap-add"
    async with d.qmp() as c:
        await add(c, "r", "b")
        long = "x" * 1024
        cases = [
            ({"name": "x"}, "Parameter 'node' is missing"),
            ({"node": "r"}, "Parameter 'name' is missing"),
            ({"node": 1, "name": "x"}, "Invalid parameter type for 'node', expected: string"),
            ({"node": "r", "name": "x", "granularity": "x"},
             "Parameter 'granularity' expects uint64"),
            ({"node": "r", "name": "x", "granularity": -1},
             "Parameter 'granularity' expects uint32_t"),
            ({"node": "r", "name": "x", "granularity": 1 << 32},
             "Parameter 'granularity' expects uint32_t"),
            ({"node": "r", "name": "x", "disabled": 1},
             "Invalid parameter type for 'disabled', expected: boolean"),
            ({"node": "r", "name": "x", "what": 1}, "Parameter 'what' is unexpected"),
            # The name is checked first, then the node, the granularity, persistence,
            # and last the name's uniqueness and length.
            ({"node": "nope", "name": ""}, "Bitmap name cannot be empty"),
            ({"node": "nope", "name": "x"}, "Cannot find device='nope' nor node-name='nope'"),
            ({"node": "r", "name": "b", "granularity": 100},
             "Granularity must be power of 2 and at least 512"),
            ({"node": "r", "name": "b", "granularity": 0},
             "Granularity must be power of 2 and at least 512"),
            ({"node": "r", "name": "b", "granularity": 3 * 512},
             "Granularity must be power of 2 and at least 512"),
            ({"node": "r", "name": "b", "persistent": True},
             "Can't store persistent bitmaps to r: Operation not supported"),
            ({"node": "rf", "name": "p", "persistent": True},
             "Can't store persistent bitmaps to rf: Operation not supported"),
            ({"node": "v2", "name": "p", "persistent": True},
             "Can't make bitmap 'p' persistent in 'v2': Cannot store dirty bitmaps in qcow2 "
             "v2 files"),
            ({"node": "big", "name": "p", "persistent": True, "granularity": 512},
             "Can't make bitmap 'p' persistent in 'big': Too much space will be occupied by "
             "the bitmap. Use larger granularity"),
            ({"node": "v3", "name": long, "persistent": True},
             f"Can't make bitmap '{long}' persistent in 'v3': Name length exceeds maximum "
             "(1023 characters)"),
            ({"node": "r", "name": "b"}, "Bitmap already exists: b"),
            ({"node": "r", "name": long}, f"Bitmap name too long: {long}"),
        ]
        for args, desc in cases:
            await error(c, cmd, args, desc=desc)
        # What is refused adds nothing.
        assert [b["name"] for b in await bitmaps(c, "r")] == ["b"]
        assert await bitmaps(c, "v2") is None
        # The longest name; persistent bitmaps on qcow2 v3, up to qcow2's size limit.
        await add(c, "r", "y" * 1023)
        await add(c, "v3", "p", persistent=True)
        await add(c, "big", "p", persistent=True, granularity=65536)
        assert (await info(c, "v3", "p"))["persistent"] is True
        assert (await info(c, "big", "p"))["granularity"] == 65536


async def test_counts_follow_guest_writes(daemon):
    sock = daemon.sock("e0")
    async with daemon.qmp() as c:
        await add(c, "n0", "g64k")
        await add(c, "n0", "g512", granularity=512)
        await add(c, "n0", "g1m", granularity=MIB)
        await add(c, "n0", "off", disabled=True)
        # The file node below sees the same writes.
        await add(c, "n0-file", "f")
        models = {n: Model(SIZE, g) for n, g in
                  [("g64k", 65536), ("g512", 512), ("g1m", MIB), ("f", 65536)]}
        writes = [(0, 4 * KIB), (MIB - 512, 1024), (3 * MIB, 192 * KIB), (SIZE - 512, 512)]
        for off, n in writes:
            write(sock, off, n)
            for m in models.values():
                m.mark(off, n)
        for name in ["g64k", "g512", "g1m"]:
            await check(c, "n0", name, models[name])
        await check(c, "n0-file", "f", models["f"])
        await check(c, "n0", "off", Model(SIZE, 65536))
        assert (await info(c, "n0", "g64k"))["count"] == 7 * 65536


async def test_enable_disable_clear_remove(daemon):
    sock = daemon.sock("e0")
    async with daemon.qmp() as c:
        await add(c, "n0", "b")
        m = Model(SIZE, 65536)
        write(sock, 0, 4096)
        m.mark(0, 4096)
        await execute(c, "block-dirty-bitmap-disable", {"node": "n0", "name": "b"})
        assert (await info(c, "n0", "b"))["recording"] is False
        write(sock, 8 * MIB, 4096)
        await check(c, "n0", "b", m)
        # Disabling twice is fine, as is enabling twice.
        await execute(c, "block-dirty-bitmap-disable", {"node": "n0", "name": "b"})
        await execute(c, "block-dirty-bitmap-enable", {"node": "n0", "name": "b"})
        await execute(c, "block-dirty-bitmap-enable", {"node": "n0", "name": "b"})
        assert (await info(c, "n0", "b"))["recording"] is True
        write(sock, 16 * MIB, 4096)
        m.mark(16 * MIB, 4096)
        await check(c, "n0", "b", m)
        # A disabled bitmap can still be cleared.
        await execute(c, "block-dirty-bitmap-disable", {"node": "n0", "name": "b"})
        await execute(c, "block-dirty-bitmap-clear", {"node": "n0", "name": "b"})
        await check(c, "n0", "b", Model(SIZE, 65536))
        await execute(c, "block-dirty-bitmap-remove", {"node": "n0", "name": "b"})
        assert await bitmaps(c, "n0") is None
        for cmd in ["remove", "clear", "enable", "disable"]:
            cmd = f"block-dirty-bitmap-{cmd}"
            await error(c, cmd, {"node": "n0", "name": "b"}, desc="Dirty bitmap 'b' not found")
            await error(c, cmd, {"node": "nope", "name": "b"}, desc="Node 'nope' not found")
            await error(c, cmd, {"node": "n0"}, desc="Parameter 'name' is missing")
            await error(c, cmd, {"name": "b"}, desc="Parameter 'node' is missing")
            await error(c, cmd, {"node": "n0", "name": "b", "x": 1},
                        desc="Parameter 'x' is unexpected")
        sha = "x-debug-block-dirty-bitmap-sha256"
        await error(c, sha, {"node": "n0", "name": "b"}, desc="Dirty bitmap 'b' not found")
        await error(c, sha, {"node": "nope", "name": "b"}, desc="Node 'nope' not found")
        await error(c, sha, {"node": "n0"}, desc="Parameter 'name' is missing")


async def test_merge(daemon, tmp):
    sock = daemon.sock("e0")
    async with daemon.qmp() as c:
        await execute(c, "blockdev-add", {"driver": "null-co", "node-name": "other",
                                          "size": SIZE})
        await execute(c, "blockdev-add", {"driver": "null-co", "node-name": "small",
                                          "size": SIZE // 2})
        await add(c, "n0", "t")
        await add(c, "n0", "a", granularity=512, disabled=True)
        await add(c, "n0", "b", granularity=MIB)
        await add(c, "other", "o", granularity=4096)
        await add(c, "small", "s")
        t, a, b = Model(SIZE, 65536), Model(SIZE, 512), Model(SIZE, MIB)
        for off, n in [(0, 512), (5 * MIB, 4096)]:
            write(sock, off, n)
            for m in (t, b):
                m.mark(off, n)
        await execute(c, "block-dirty-bitmap-disable", {"node": "n0", "name": "t"})
        await execute(c, "block-dirty-bitmap-disable", {"node": "n0", "name": "b"})
        await execute(c, "block-dirty-bitmap-enable", {"node": "n0", "name": "a"})
        write(sock, 9 * MIB + 512, 512)
        a.mark(9 * MIB + 512, 512)
        await check(c, "n0", "a", a)
        merge = "block-dirty-bitmap-merge"
        # Sources of any granularity, local names and {node, name}, the target itself.
        await execute(c, merge, {"node": "n0", "target": "t",
                                 "bitmaps": ["a", {"node": "n0", "name": "b"}, "t"]})
        for m in (a, b):
            for g in m.bits:
                t.mark(g * m.gran, m.gran)
        await check(c, "n0", "t", t)
        # A source on another node of the same size.
        await execute(c, merge, {"node": "other", "target": "o",
                                 "bitmaps": [{"node": "n0", "name": "a"}]})
        o = Model(SIZE, 4096)
        for g in a.bits:
            o.mark(g * 512, 512)
        await check(c, "other", "o", o)
        # Errors: the target first, then each source in turn; the target is unchanged.
        cases = [
            ({"node": "n0", "target": "t"}, "Parameter 'bitmaps' is missing"),
            ({"node": "n0", "target": "t", "bitmaps": "a"},
             "Invalid parameter type for 'bitmaps', expected: array"),
            ({"node": "n0", "target": "t", "bitmaps": [{"node": "n0"}]},
             "Parameter 'bitmaps[0].name' is missing"),
            ({"node": "n0", "target": "t", "bitmaps": ["a", {"name": "a"}]},
             "Parameter 'bitmaps[1].node' is missing"),
            ({"node": "n0", "target": "t", "bitmaps": [{"node": "n0", "name": "a", "z": 1}]},
             "Parameter 'bitmaps[0].z' is unexpected"),
            ({"node": "n0", "target": "t", "bitmaps": [3]},
             "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
            ({"node": "nope", "target": "t", "bitmaps": ["x"]}, "Node 'nope' not found"),
            ({"node": "n0", "target": "nope", "bitmaps": ["x"]}, "Dirty bitmap 'nope' not found"),
            ({"node": "n0", "target": "t", "bitmaps": ["a", "x"]}, "Dirty bitmap 'x' not found"),
            ({"node": "n0", "target": "t", "bitmaps": ["o"]}, "Dirty bitmap 'o' not found"),
            ({"node": "n0", "target": "t", "bitmaps": [{"node": "nope", "name": "o"}]},
             "Node 'nope' not found"),
            ({"node": "n0", "target": "t", "bitmaps": ["a", {"node": "small", "name": "s"}]},
             f"Bitmaps are of different sizes (destination size is {SIZE}, source size is "
             f"{SIZE // 2}) and can't be merged"),
        ]
        for args, desc in cases:
            await error(c, merge, args, desc=desc)
        await check(c, "n0", "t", t)


async def test_resize_truncates_bitmaps(start_daemon, tmp):
    # No iothread: qemu-storage-daemon 7.2 aborts at exit after block_resize of a node
    # with bitmaps in an iothread (a mutex left locked).
    daemon = start_daemon(file_raw_args(tmp, "n0", SIZE) + export_args("e0", "n0", tmp / "e0.sock"))
    async with daemon.qmp() as c:
        await add(c, "n0", "b")
        await add(c, "n0", "d", disabled=True, granularity=4096)
        write(tmp / "e0.sock", SIZE - 4096, 4096)
        await execute(c, "block_resize", {"node-name": "n0", "size": 2 * SIZE})
        m = Model(2 * SIZE, 65536)
        m.mark(SIZE - 4096, 4096)
        await check(c, "n0", "b", m)
        await check(c, "n0", "d", Model(2 * SIZE, 4096))
        await execute(c, "block_resize", {"node-name": "n0", "size": SIZE // 2})
        await check(c, "n0", "b", Model(SIZE // 2, 65536))
        await check(c, "n0", "d", Model(SIZE // 2, 4096))


async def test_blockdev_del_drops_bitmaps(daemon, tmp):
    img = tmp / "x.img"
    with open(img, "wb") as f:
        f.truncate(4 * MIB)
    opts = {"driver": "file", "node-name": "x", "filename": str(img)}
    async with daemon.qmp() as c:
        await execute(c, "blockdev-add", opts)
        await add(c, "x", "b1")
        await add(c, "x", "b2", disabled=True)
        await execute(c, "blockdev-del", {"node-name": "x"})
        await execute(c, "blockdev-add", opts)
        assert await bitmaps(c, "x") is None
        await error(c, "block-dirty-bitmap-remove", {"node": "x", "name": "b1"},
                    desc="Dirty bitmap 'b1' not found")


@pytest.mark.vubd_only("qemu-storage-daemon 7.2 aborts on a merge of no bitmaps")
async def test_merge_of_nothing(daemon):
    async with daemon.qmp() as c:
        await add(c, "n0", "t")
        write(daemon.sock("e0"), 0, 512)
        before = await sha(c, "n0", "t")
        await execute(c, "block-dirty-bitmap-merge", {"node": "n0", "target": "t", "bitmaps": []})
        assert await sha(c, "n0", "t") == before


async def test_bitmaps_stay_through_reopen(daemon, tmp):
    sock = daemon.sock("e0")
    async with daemon.qmp() as c:
        await add(c, "n0", "b")
        await add(c, "n0-file", "f", granularity=4096, disabled=True)
        m = Model(SIZE, 65536)
        write(sock, 0, 4096)
        m.mark(0, 4096)
        await execute(c, "blockdev-reopen", {"options": [
            {"driver": "raw", "node-name": "n0", "file": "n0-file", "discard": "unmap"}]})
        write(sock, 32 * MIB, 4096)
        m.mark(32 * MIB, 4096)
        await check(c, "n0", "b", m)
        assert (await info(c, "n0-file", "f"))["recording"] is False


async def wait_jobs_gone(c):
    for _ in range(400):
        if not await execute(c, "query-jobs"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"jobs still there: {await execute(c, 'query-jobs')}")


async def test_copy_on_read_marks_only_below(start_daemon, tmp):
    """Copy-on-read leaves what the node reads unchanged: QEMU writes it straight to
    the driver, past the node's bitmaps. The file below sees a plain write."""
    make_chain(tmp, [("base", [(0, MIB, 1)]), ("top", [])], 4 * MIB)
    sock = tmp / "e0.sock"
    d = start_daemon(chain_args(tmp, ["base", "top"])
                     + ["--blockdev", "copy-on-read,node-name=cor,file=top"]
                     + export_args("e0", "cor", sock))
    async with d.qmp() as c:
        await add(c, "top", "t")
        await add(c, "top-file", "tf")
        await add(c, "cor", "c")
        io_ok("verify", "--socket", sock, "--offset", 0, "--len", 256 * KIB, "--seed", 1)
        assert (await info(c, "top", "t"))["count"] == 0
        assert (await info(c, "cor", "c"))["count"] == 0
        assert (await info(c, "top-file", "tf"))["count"] > 0
        write(sock, 2 * MIB, 4096)
        m = Model(4 * MIB, 65536)
        m.mark(2 * MIB, 4096)
        await check(c, "top", "t", m)
        await check(c, "cor", "c", m)


async def test_job_writes(start_daemon, tmp):
    """An intermediate commit writes into the base: the base's bitmaps see it. A stream
    copies on read: the top's do not."""
    size = 4 * MIB
    make_chain(tmp, [("base", [(0, MIB, 1)]), ("mid", [(2 * MIB, 128 * KIB, 3)]),
                     ("top", [(MIB, 64 * KIB, 2)])], size)
    d = start_daemon(chain_args(tmp, ["base", "mid", "top"]))
    async with d.qmp() as c:
        await add(c, "base", "b")
        await add(c, "top", "t")
        await execute(c, "block-commit", {"job-id": "j", "device": "top", "top-node": "mid",
                                          "base-node": "base"})
        await wait_jobs_gone(c)
        m = Model(size, 65536)
        m.mark(2 * MIB, 128 * KIB)
        await check(c, "base", "b", m)
        await execute(c, "block-stream", {"job-id": "s", "device": "top"})
        await wait_jobs_gone(c)
        await check(c, "top", "t", Model(size, 65536))

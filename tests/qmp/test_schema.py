"""query-qmp-schema: the daemon describes its own commands, events and types as
QEMU's SchemaInfo (checked by qapi_schema.py), and what it sends fits that
description. Every test of the suite checks its replies and events against the
schema (conftest.py, ``SchemaRecorder``); the cases here add:

- the schema itself: well-formed, the same commands as query-commands, the events
  the daemon sends, and the probes libvirt makes (``blockdev-add/arg-type/+file/aio``);
- every command whose result is more than ``{}`` run on a rich state (qcow2 with
  bitmaps and an internal snapshot, an export, a mirror job, a create job) and its
  result checked, with the events on the way;
- the checker failing on values that do not fit (so the suite-wide check can fail);
- vubd's schema against qemu-storage-daemon's: shared commands and their types agree.

With ``--daemon=qsd`` these run on QEMU's own schema and replies, which checks the
checker.
"""

import copy
import subprocess

import pytest

from conftest import MIB, execute, export_args, io_ok, wait_event
from qapi_schema import Schema, SchemaError

SIZE = 16 * MIB

#: Events vubd sends (each raised by some test of the suite).
EVENTS = [
    "BLOCK_EXPORT_DELETED",
    "BLOCK_IMAGE_CORRUPTED",
    "BLOCK_IO_ERROR",
    "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_ERROR",
    "BLOCK_JOB_PENDING",
    "BLOCK_JOB_READY",
    "BLOCK_WRITE_THRESHOLD",
    "JOB_STATUS_CHANGE",
]

#: Schema paths libvirt-style clients probe before using a feature (libvirt's
#: virQEMUQAPISchemaPathGet syntax: members, ``+case`` for a union variant,
#: ``^value`` for an enum value).
PROBES = [
    "blockdev-add/arg-type/+file/filename",
    "blockdev-add/arg-type/+file/aio/^io_uring",
    "blockdev-add/arg-type/+qcow2/file",
    "blockdev-add/arg-type/+raw/offset",
    "blockdev-add/arg-type/+throttle/throttle-group",
    "blockdev-add/arg-type/detect-zeroes/^unmap",
    "blockdev-reopen/arg-type/options",
    "blockdev-create/arg-type/options/+qcow2/cluster-size",
    "block-export-add/arg-type/+vhost-user-blk/num-queues",
    "block-export-add/arg-type/+vhost-user-blk/addr/+unix/path",
    "block-export-add/arg-type/+nbd/bitmaps",
    "block-export-add/arg-type/fixed-iothread",
    "object-add/arg-type/+iothread/poll-max-ns",
    "object-add/arg-type/+throttle-group/limits/iops-total",
    "object-add/arg-type/+secret/data",
    "nbd-server-start/arg-type/max-connections",
    "query-named-block-nodes/arg-type/flat",
    "query-named-block-nodes/ret-type/image/format-specific/+qcow2/data/bitmaps",
    "query-blockstats/arg-type/query-nodes",
    "blockdev-mirror/arg-type/copy-mode/^write-blocking",
    "transaction/arg-type/actions/type/^block-dirty-bitmap-merge",
    "JOB_STATUS_CHANGE/arg-type/status/^pending",
]


def probe(s: Schema, path: str) -> bool:
    """Whether ``path`` exists in the schema."""
    head, *parts = path.split("/")
    e = s.entries.get(head)
    if e is None:
        return False
    for p in parts:
        while e["meta-type"] == "array":
            e = s.entries[e["element-type"]]
        if e["meta-type"] == "alternate" and not p.startswith(("arg-type", "ret-type")):
            objs = [s.entries[m["type"]] for m in e["members"]]
            objs = [o for o in objs if o["meta-type"] == "object"]
            if not objs:
                return False
            e = objs[0]
        if p in ("arg-type", "ret-type"):
            if p not in e:
                return False
            e = s.entries[e[p]]
        elif p.startswith("+"):
            var = [v for v in e.get("variants", []) if v["case"] == p[1:]]
            if not var:
                return False
            e = s.entries[var[0]["type"]]
        elif p.startswith("^"):
            return e["meta-type"] == "enum" and p[1:] in e["values"]
        else:
            m = [m for m in e.get("members", []) if m.get("name") == p]
            if not m:
                return False
            e = s.entries[m[0]["type"]]
    return True


def qemu_img(*args):
    p = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


async def test_schema_is_valid_schemainfo(daemon):
    async with daemon.qmp() as c:
        s = Schema(await execute(c, "query-qmp-schema"))
        commands = {x["name"] for x in await execute(c, "query-commands")}
    assert commands == set(s.commands), commands ^ set(s.commands)
    missing = [e for e in EVENTS if e not in s.events]
    assert not missing, f"events the daemon sends are not in its schema: {missing}"
    for name, cmd in s.commands.items():
        assert s.entries[cmd["arg-type"]]["meta-type"] == "object", name
    absent = [p for p in PROBES if not probe(s, p)]
    assert not absent, f"schema paths not found: {absent}"
    for p in ["blockdev-add/arg-type/+file/no-such-member", "blockdev-add/arg-type/+no-such-driver",
              "blockdev-add/arg-type/detect-zeroes/^sometimes", "no-such-command"]:
        assert not probe(s, p), p


async def test_results_fit_the_schema(start_daemon, tmp, kind):
    """Runs each command whose result is more than ``{}`` on a rich state; the
    results and the events on the way are checked against the schema (by the
    suite's recorder), and listed here as well."""
    img = tmp / "q.qcow2"
    qemu_img("create", "-f", "qcow2", img, SIZE)
    tgt = tmp / "t.qcow2"
    qemu_img("create", "-f", "qcow2", tgt, SIZE)
    sock = tmp / "d-e0.sock"
    d = start_daemon([
        "--object", "iothread,id=io0",
        "--blockdev", f"file,node-name=q-file,filename={img}",
        "--blockdev", "qcow2,node-name=q,file=q-file",
        *export_args("e0", "q", sock, extra=",iothread=io0"),
    ])
    io_ok("write", "--socket", sock, "--offset", 0, "--len", MIB, "--seed", 3)
    called = set()

    async def run(c, cmd, args=None):
        called.add(cmd)
        return await execute(c, cmd, args)

    async with d.qmp() as c:
        s = Schema(await run(c, "query-qmp-schema"))
        await run(c, "query-version")
        await run(c, "query-commands")
        await run(c, "block-dirty-bitmap-add", {"node": "q", "name": "b0", "persistent": True})
        await run(c, "block-dirty-bitmap-add", {"node": "q", "name": "b1"})
        await run(c, "blockdev-snapshot-internal-sync", {"device": "q", "name": "s1"})
        for flat in (False, True):
            nodes = await run(c, "query-named-block-nodes", {"flat": flat})
        q = next(n for n in nodes if n["node-name"] == "q")
        assert [x["name"] for x in q["image"]["snapshots"]] == ["s1"]
        assert {b["name"] for b in q["dirty-bitmaps"]} == {"b0", "b1"}
        for nodes_too in (False, True):
            await run(c, "query-blockstats", {"query-nodes": nodes_too})
        await run(c, "query-block-exports")
        if "query-iothreads" in s.commands:
            await run(c, "query-iothreads")
        await run(c, "x-debug-query-block-graph")
        await run(c, "x-debug-block-dirty-bitmap-sha256", {"node": "q", "name": "b0"})
        await run(c, "qom-list", {"path": "/objects"})
        await run(c, "qom-get", {"path": "/objects/io0", "property": "poll-max-ns"})
        await run(c, "qom-list-types", {})
        await run(c, "qom-list-properties", {"typename": "iothread"})
        snap = await run(c, "blockdev-snapshot-delete-internal-sync", {"device": "q", "name": "s1"})
        assert snap["name"] == "s1"
        with c.listener() as lst:
            await run(c, "blockdev-create", {"job-id": "c1", "options": {
                "driver": "file", "filename": str(tmp / "new.img"), "size": MIB}})
            while (await wait_event(lst, "JOB_STATUS_CHANGE"))["data"]["status"] != "concluded":
                pass
            jobs = await run(c, "query-jobs")
            assert [j["status"] for j in jobs] == ["concluded"], jobs
            await run(c, "job-dismiss", {"id": "c1"})
            await run(c, "blockdev-add", {"driver": "qcow2", "node-name": "tgt", "file": {
                "driver": "file", "filename": str(tgt)}})
            await run(c, "blockdev-mirror", {"job-id": "m", "device": "q", "target": "tgt",
                                             "sync": "full"})
            await wait_event(lst, "BLOCK_JOB_READY")
            [job] = await run(c, "query-block-jobs")
            assert job["ready"] and job["device"] == "m", job
            await run(c, "query-jobs")
            await run(c, "block-job-cancel", {"device": "m"})
            await wait_event(lst, "BLOCK_JOB_COMPLETED")
        await run(c, "query-block-jobs")
    rec = d.schema
    assert rec.schema is not None
    assert not rec.problems, "\n".join(rec.problems)
    assert rec.checked >= len(called), (rec.checked, len(called))
    if kind == "vubd":
        # Every command that answers more than {} was run here.
        empty = {n for n, e in s.entries.items()
                 if e["meta-type"] == "object" and not e["members"] and "variants" not in e}
        rich = {n for n, e in s.commands.items() if e["ret-type"] not in empty}
        assert rich <= called, f"not run: {sorted(rich - called)}"


async def test_checker_finds_misfits(daemon):
    """The checker is no rubber stamp: changed replies fail it."""
    async with daemon.qmp() as c:
        s = Schema(await execute(c, "query-qmp-schema"))
        nodes = await execute(c, "query-named-block-nodes", {"flat": True})
        version = await execute(c, "query-version")
    assert s.check_return("query-named-block-nodes", nodes) == []
    assert s.check_return("query-version", version) == []

    def misfit(change, contains):
        v = copy.deepcopy(nodes)
        change(v[0])
        found = s.check_return("query-named-block-nodes", v)
        assert any(contains in f for f in found), (contains, found)

    misfit(lambda n: n.pop("drv"), "lacks required member 'drv'")
    misfit(lambda n: n.update({"no-such-member": 1}), "'no-such-member' is not in the schema")
    misfit(lambda n: n.update({"ro": "yes"}), "expected boolean")
    misfit(lambda n: n.update({"detect_zeroes": "sometimes"}), "is not one of")
    misfit(lambda n: n.update({"bps": 1.5}), "expected int")
    misfit(lambda n: n["image"].update({"virtual-size": None}), "expected int")
    misfit(lambda n: n.update({"cache": []}), "expected an object")
    assert s.check_return("query-version", {"qemu": version["qemu"]}) != []
    assert s.check_return("no-such-command", {}) != []
    assert s.check_event("JOB_STATUS_CHANGE", {"id": "j", "status": "running"}) == []
    assert s.check_event("JOB_STATUS_CHANGE", {"id": "j", "status": "jogging"}) != []
    assert s.check_event("NO_SUCH_EVENT", {}) != []
    # A broken schema is refused.
    entries = [e for e in (s.entries[n] for n in s.entries)]
    broken = [e for e in entries if e["name"] != s.commands["query-version"]["ret-type"]]
    with pytest.raises(SchemaError, match="not defined"):
        Schema(broken)
    with pytest.raises(SchemaError, match="meta-type"):
        Schema(entries + [{"name": "x", "meta-type": "thing"}])


def _compare(v: Schema, q: Schema, vt: str, qt: str, path: str, seen: set, out: list):
    """Where vubd's type ``vt`` is not a subset of QEMU's ``qt``."""
    if (vt, qt) in seen:
        return
    seen.add((vt, qt))
    a, b = v.entries[vt], q.entries[qt]
    if a["meta-type"] != b["meta-type"]:
        out.append(f"{path}: {a['meta-type']} in vubd, {b['meta-type']} in QEMU")
        return
    meta = a["meta-type"]
    if meta == "builtin":
        if a["json-type"] != b["json-type"]:
            out.append(f"{path}: {a['json-type']} in vubd, {b['json-type']} in QEMU")
    elif meta == "enum":
        extra = set(a["values"]) - set(b["values"])
        if extra:
            out.append(f"{path}: values {sorted(extra)} not in QEMU")
    elif meta == "array":
        _compare(v, q, a["element-type"], b["element-type"], path + "[]", seen, out)
    elif meta == "alternate":
        if len(a["members"]) != len(b["members"]):
            out.append(f"{path}: alternate of {len(a['members'])} in vubd, {len(b['members'])}")
    elif meta == "object":
        qm = {m["name"]: m for m in b["members"]}
        for m in a["members"]:
            other = qm.get(m["name"])
            if other is None:
                # vubd's own members are named x-... or listed in VUBD_MEMBERS.
                if not m["name"].startswith("x-") and f"{path}.{m['name']}" not in VUBD_MEMBERS:
                    out.append(f"{path}.{m['name']}: not in QEMU")
                continue
            if ("default" in m) != ("default" in other):
                out.append(f"{path}.{m['name']}: optional {'default' in m} in vubd, "
                           f"{'default' in other} in QEMU")
            _compare(v, q, m["type"], other["type"], f"{path}.{m['name']}", seen, out)
        if a.get("tag") != b.get("tag"):
            out.append(f"{path}: tag {a.get('tag')} in vubd, {b.get('tag')} in QEMU")
        qv = {x["case"]: x["type"] for x in b.get("variants", [])}
        for x in a.get("variants", []):
            if x["case"] not in qv:
                if f"{path}+{x['case']}" not in VUBD_MEMBERS:
                    out.append(f"{path}: case {x['case']} not in QEMU")
                continue
            _compare(v, q, x["type"], qv[x["case"]], f"{path}+{x['case']}", seen, out)


#: What vubd's schema has that QEMU 7.2's has not (documented in docs/qmp.md).
VUBD_MEMBERS = {
    "query-block-exports ret[].iostatus",
}


@pytest.mark.vubd_only("compares vubd's schema with qemu-storage-daemon's")
@pytest.mark.needs_qsd
async def test_schema_agrees_with_qemu(start_daemon, tmp):
    vubd = start_daemon([])
    qsd = start_daemon([], kind="qsd", name="q")
    async with vubd.qmp() as c:
        v = Schema(await execute(c, "query-qmp-schema"))
    async with qsd.qmp() as c:
        q = Schema(await execute(c, "query-qmp-schema"))
    out: list[str] = []
    for name in sorted(set(v.commands) & set(q.commands)):
        extra = set(v.commands[name].get("features", [])) - set(q.commands[name].get("features", []))
        if extra:
            out.append(f"{name}: features {sorted(extra)} not in QEMU")
        seen: set = set()
        for key, short in (("arg-type", "arg"), ("ret-type", "ret")):
            _compare(v, q, v.commands[name][key], q.commands[name][key],
                     f"{name} {short}", seen, out)
    for name in sorted(set(v.events) & set(q.events)):
        _compare(v, q, v.events[name]["arg-type"], q.events[name]["arg-type"],
                 f"{name} data", set(), out)
    missing_events = sorted(set(v.events) - set(q.events))
    assert not missing_events, missing_events
    assert not out, "vubd's schema differs from QEMU's:\n  " + "\n  ".join(out)

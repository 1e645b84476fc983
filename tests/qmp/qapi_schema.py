"""A checker for QEMU's QMP introspection (``query-qmp-schema``'s ``SchemaInfo`` list)
and for values against it.

``Schema(entries)`` first checks that the list itself is well-formed SchemaInfo
(every entry has the members its meta-type requires, names are unique, every type it
names is defined); then ``check_return(command, value)`` and
``check_event(name, data)`` return the ways a command's result or an event's data
does not fit the schema (an empty list when it fits). Type names may be masked
(QEMU's "0", "1", ...) or not.
"""

from __future__ import annotations

from typing import Any

META = {
    "builtin": {"json-type"},
    "enum": {"values"},
    "array": {"element-type"},
    "object": {"members"},
    "alternate": {"members"},
    "command": {"arg-type", "ret-type"},
    "event": {"arg-type"},
}
OPTIONAL = {
    "builtin": set(),
    "enum": {"members"},
    "array": set(),
    "object": {"tag", "variants"},
    "alternate": set(),
    "command": {"allow-oob"},
    "event": set(),
}
JSON_TYPES = {"string", "number", "int", "boolean", "null", "object", "array", "value"}


class SchemaError(AssertionError):
    pass


def _json_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if v is None:
        return "null"
    if isinstance(v, dict):
        return "object"
    if isinstance(v, list):
        return "array"
    return type(v).__name__


class Schema:
    def __init__(self, entries: list):
        problems = []
        if not isinstance(entries, list):
            raise SchemaError(f"query-qmp-schema did not return a list: {entries!r}")
        self.entries: dict[str, dict] = {}
        for e in entries:
            problems += self._check_entry(e)
            name = e.get("name") if isinstance(e, dict) else None
            if isinstance(name, str):
                if name in self.entries:
                    problems.append(f"{name!r} defined twice")
                self.entries[name] = e
        if not problems:
            problems += self._check_references()
        if problems:
            raise SchemaError("invalid SchemaInfo:\n  " + "\n  ".join(problems[:50]))
        self.commands = {n: e for n, e in self.entries.items() if e["meta-type"] == "command"}
        self.events = {n: e for n, e in self.entries.items() if e["meta-type"] == "event"}

    # -- the schema itself ---------------------------------------------------------

    @staticmethod
    def _check_entry(e: Any) -> list[str]:
        if not isinstance(e, dict):
            return [f"entry {e!r} is not an object"]
        name, meta = e.get("name"), e.get("meta-type")
        where = f"entry {name!r}"
        if not isinstance(name, str):
            return [f"{where}: 'name' is not a string"]
        if meta not in META:
            return [f"{where}: meta-type {meta!r} unknown"]
        out = []
        allowed = {"name", "meta-type", "features"} | META[meta] | OPTIONAL[meta]
        for k in META[meta] - set(e):
            out.append(f"{where}: lacks {k!r}")
        for k in set(e) - allowed:
            out.append(f"{where}: unexpected member {k!r}")
        if "features" in e and not (
            isinstance(e["features"], list) and all(isinstance(f, str) for f in e["features"])
        ):
            out.append(f"{where}: 'features' is not a list of strings")
        if out:
            return out
        if meta == "builtin" and e["json-type"] not in JSON_TYPES:
            out.append(f"{where}: json-type {e['json-type']!r}")
        elif meta == "enum":
            if not all(isinstance(v, str) for v in e["values"]):
                out.append(f"{where}: values are not strings")
            if "members" in e and [m.get("name") for m in e["members"]] != e["values"]:
                out.append(f"{where}: members do not match values")
        elif meta == "object":
            names = set()
            for m in e["members"]:
                if not (isinstance(m, dict) and isinstance(m.get("name"), str)
                        and isinstance(m.get("type"), str)):
                    out.append(f"{where}: bad member {m!r}")
                    continue
                if set(m) - {"name", "type", "default", "features"}:
                    out.append(f"{where}: member {m['name']!r} has unexpected keys")
                if "default" in m and m["default"] is not None:
                    # QEMU 7.2: an optional member has "default": null.
                    pass
                names.add(m["name"])
            if ("tag" in e) != ("variants" in e):
                out.append(f"{where}: 'tag' and 'variants' go together")
            if "tag" in e:
                if e["tag"] not in names:
                    out.append(f"{where}: tag {e['tag']!r} is not a member")
                for v in e["variants"]:
                    if not (isinstance(v, dict) and set(v) == {"case", "type"}):
                        out.append(f"{where}: bad variant {v!r}")
        elif meta == "alternate":
            for m in e["members"]:
                if not (isinstance(m, dict) and set(m) == {"type"}):
                    out.append(f"{where}: bad alternate member {m!r}")
        return out

    def _check_references(self) -> list[str]:
        out = []

        def ref(where: str, t: Any):
            if t not in self.entries:
                out.append(f"{where}: type {t!r} is not defined")

        for n, e in self.entries.items():
            meta = e["meta-type"]
            if meta == "command":
                ref(n, e["arg-type"])
                ref(n, e["ret-type"])
                if e["arg-type"] in self.entries and (
                    self.entries[e["arg-type"]]["meta-type"] != "object"
                ):
                    out.append(f"{n}: arg-type is not an object type")
            elif meta == "event":
                ref(n, e["arg-type"])
            elif meta == "array":
                ref(n, e["element-type"])
            elif meta == "object":
                for m in e["members"]:
                    ref(f"{n}.{m['name']}", m["type"])
                for v in e.get("variants", []):
                    ref(f"{n} case {v['case']}", v["type"])
                if "tag" in e:
                    tag_type = next(m["type"] for m in e["members"] if m["name"] == e["tag"])
                    te = self.entries.get(tag_type, {})
                    if te.get("meta-type") != "enum":
                        out.append(f"{n}: tag {e['tag']!r} is not an enum")
                    else:
                        for v in e["variants"]:
                            if v["case"] not in te["values"]:
                                out.append(f"{n}: case {v['case']!r} is no tag value")
            elif meta == "alternate":
                for m in e["members"]:
                    ref(n, m["type"])
        return out

    # -- values ----------------------------------------------------------------------

    def check_return(self, command: str, value: Any) -> list[str]:
        c = self.commands.get(command)
        if c is None:
            return [f"{command}: not in the schema"]
        return self.check(c["ret-type"], value, f"{command} return")

    def check_event(self, name: str, data: Any) -> list[str]:
        e = self.events.get(name)
        if e is None:
            return [f"event {name}: not in the schema"]
        return self.check(e["arg-type"], {} if data is None else data, f"event {name} data")

    def check(self, type_name: str, v: Any, path: str) -> list[str]:
        t = self.entries[type_name]
        meta = t["meta-type"]
        if meta == "builtin":
            jt, kind = t["json-type"], _json_kind(v)
            ok = jt == "value" or jt == kind or (jt == "number" and kind == "int")
            return [] if ok else [f"{path}: {kind} {v!r}, expected {jt}"]
        if meta == "enum":
            if not isinstance(v, str) or v not in t["values"]:
                return [f"{path}: {v!r} is not one of {t['values']}"]
            return []
        if meta == "array":
            if not isinstance(v, list):
                return [f"{path}: {_json_kind(v)}, expected an array"]
            out = []
            for i, x in enumerate(v):
                out += self.check(t["element-type"], x, f"{path}[{i}]")
            return out
        if meta == "alternate":
            for m in t["members"]:
                if not self.check(m["type"], v, path):
                    return []
            return [f"{path}: {v!r} fits no branch of alternate {type_name}"]
        return self._check_object(type_name, t, v, path)

    def _members(self, t: dict, v: dict, path: str) -> tuple[list[dict], list[str]]:
        """The members an object value may have: the type's own, plus those of the
        variant its tag selects."""
        members = list(t["members"])
        if "tag" not in t:
            return members, []
        tag = v.get(t["tag"])
        for var in t["variants"]:
            if var["case"] == tag:
                vt = self.entries[var["type"]]
                if vt["meta-type"] != "object":
                    return members, [f"{path}: variant {tag!r} is not an object type"]
                more, problems = self._members(vt, v, path)
                return members + more, problems
        return members, []

    def _check_object(self, type_name: str, t: dict, v: Any, path: str) -> list[str]:
        if not isinstance(v, dict):
            return [f"{path}: {_json_kind(v)} {v!r}, expected an object ({type_name})"]
        members, out = self._members(t, v, path)
        known = {m["name"]: m for m in members}
        for m in members:
            if m["name"] not in v and "default" not in m:
                out.append(f"{path}: lacks required member {m['name']!r}")
        for k, x in v.items():
            m = known.get(k)
            if m is None:
                out.append(f"{path}: member {k!r} is not in the schema ({type_name})")
            else:
                out += self.check(m["type"], x, f"{path}.{k}")
        return out

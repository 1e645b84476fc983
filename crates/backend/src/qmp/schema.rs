//! The QAPI types of vubd's QMP interface, and `query-qmp-schema`'s introspection
//! built from them and from the command table ([`super::commands::COMMANDS`]).
//!
//! Types are written in QAPI's own notation: a member `"*name"` is optional, a type
//! `"[T]"` is an array of `T`. Builtins are `str`, `bool`, `number`, `null`, `any`
//! and the integer types `int` (int64), `uint64`, `uint32`, `uint16` and `size`, which
//! introspection shows as `int`, as QEMU does. Names follow QEMU 7.2's schema, with
//! the members and values vubd has. Introspection leaves type names unmasked.

use super::commands::{Arguments, CommandDef, COMMANDS};
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::sync::OnceLock;

/// A struct member: `("name", "type")`, `"*name"` when optional.
pub type Member = (&'static str, &'static str);

/// A named type.
pub enum TypeDef {
    Struct {
        name: &'static str,
        members: &'static [Member],
    },
    /// A flat union: the common members (`tag` among them, an enum), and per tag
    /// value the struct whose members follow.
    Union {
        name: &'static str,
        base: &'static [Member],
        tag: &'static str,
        variants: &'static [(&'static str, &'static str)],
    },
    Enum {
        name: &'static str,
        values: &'static [&'static str],
    },
    Alternate {
        name: &'static str,
        types: &'static [&'static str],
    },
}

impl TypeDef {
    pub fn name(&self) -> &'static str {
        match self {
            TypeDef::Struct { name, .. }
            | TypeDef::Union { name, .. }
            | TypeDef::Enum { name, .. }
            | TypeDef::Alternate { name, .. } => name,
        }
    }
}

/// An event and its `data` members.
pub struct EventDef {
    pub name: &'static str,
    pub data: &'static [Member],
}

/// The name of a member, and whether it is optional.
pub fn member_name(m: &Member) -> (&'static str, bool) {
    match m.0.strip_prefix('*') {
        Some(n) => (n, true),
        None => (m.0, false),
    }
}

/// The builtin types, with their JSON types.
const BUILTINS: &[(&str, &str)] = &[
    ("str", "string"),
    ("int", "int"),
    ("number", "number"),
    ("bool", "boolean"),
    ("null", "null"),
    ("any", "value"),
];

/// Integer types shown as `int`.
const INTEGERS: &[&str] = &["int", "uint64", "uint32", "uint16", "size"];

/// The empty object type: arguments of commands without any, results of commands
/// that return `{}`.
pub const EMPTY: &str = "q_empty";

pub fn find(name: &str) -> Option<&'static TypeDef> {
    TYPES.iter().find(|t| t.name() == name)
}

/// The name introspection shows for a type.
fn shown(ty: &str) -> String {
    if let Some(inner) = ty.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return format!("[{}]", shown(inner));
    }
    if INTEGERS.contains(&ty) {
        return "int".into();
    }
    ty.to_string()
}

fn members_json(members: &[Member]) -> Value {
    Value::Array(
        members
            .iter()
            .map(|m| {
                let (name, optional) = member_name(m);
                let mut o = Map::new();
                o.insert("name".into(), json!(name));
                o.insert("type".into(), json!(shown(m.1)));
                if optional {
                    // QEMU marks an optional member with a null default.
                    o.insert("default".into(), Value::Null);
                }
                Value::Object(o)
            })
            .collect(),
    )
}

/// Collects the introspection entries of types, each once.
struct Collector {
    seen: BTreeSet<String>,
    out: Vec<Value>,
}

impl Collector {
    fn object(&mut self, name: String, members: &[Member]) {
        if self.seen.insert(name.clone()) {
            self.out.push(
                json!({"name": name, "meta-type": "object", "members": members_json(members)}),
            );
            self.members(members);
        }
    }

    fn members(&mut self, members: &[Member]) {
        for m in members {
            self.ty(m.1);
        }
    }

    /// Adds `ty` and what it refers to.
    fn ty(&mut self, ty: &str) {
        let name = shown(ty);
        if self.seen.contains(&name) {
            return;
        }
        if let Some(inner) = ty.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            self.seen.insert(name.clone());
            self.out
                .push(json!({"name": name, "meta-type": "array", "element-type": shown(inner)}));
            self.ty(inner);
            return;
        }
        if let Some((_, json_type)) = BUILTINS.iter().find(|(b, _)| *b == name) {
            self.seen.insert(name.clone());
            self.out
                .push(json!({"name": name, "meta-type": "builtin", "json-type": json_type}));
            return;
        }
        if ty == EMPTY {
            self.object(EMPTY.into(), &[]);
            return;
        }
        let Some(def) = find(ty) else {
            // The table test (below) keeps this from happening.
            log::error!("QMP schema: type {ty} is not defined");
            return;
        };
        self.seen.insert(name.clone());
        match def {
            TypeDef::Struct { members, .. } => {
                self.out.push(
                    json!({"name": name, "meta-type": "object", "members": members_json(members)}),
                );
                self.members(members);
            }
            TypeDef::Union {
                base,
                tag,
                variants,
                ..
            } => {
                let vs: Vec<Value> = variants
                    .iter()
                    .map(|(case, t)| json!({"case": case, "type": t}))
                    .collect();
                self.out.push(json!({
                    "name": name, "meta-type": "object", "members": members_json(base),
                    "tag": tag, "variants": vs,
                }));
                self.members(base);
                for (_, t) in *variants {
                    self.ty(t);
                }
            }
            TypeDef::Enum { values, .. } => {
                let ms: Vec<Value> = values.iter().map(|v| json!({"name": v})).collect();
                self.out.push(json!({
                    "name": name, "meta-type": "enum", "members": ms, "values": values,
                }));
            }
            TypeDef::Alternate { types, .. } => {
                let ms: Vec<Value> = types.iter().map(|t| json!({"type": shown(t)})).collect();
                self.out
                    .push(json!({"name": name, "meta-type": "alternate", "members": ms}));
                for t in *types {
                    self.ty(t);
                }
            }
        }
    }
}

/// The argument type's name of a command.
fn arg_type(c: &CommandDef) -> String {
    match c.args {
        Arguments::Members([]) => EMPTY.into(),
        Arguments::Members(_) => format!("q_obj_{}-arg", c.name),
        Arguments::Boxed(t) => t.into(),
    }
}

/// `query-qmp-schema`: every command, event and type, as QEMU's `SchemaInfo` list
/// (built once).
pub fn introspect() -> Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(build).clone()
}

fn build() -> Value {
    let mut c = Collector {
        seen: BTreeSet::new(),
        out: Vec::new(),
    };
    let mut entries = Vec::new();
    for cmd in COMMANDS {
        let mut e = json!({
            "name": cmd.name, "meta-type": "command",
            "arg-type": arg_type(cmd), "ret-type": shown(cmd.ret),
        });
        let mut features = cmd.features.to_vec();
        if cmd.name.starts_with("x-") {
            features.push("unstable");
        }
        if !features.is_empty() {
            e["features"] = json!(features);
        }
        entries.push(e);
        match cmd.args {
            Arguments::Members(m) if !m.is_empty() => c.object(arg_type(cmd), m),
            Arguments::Members(_) => c.ty(EMPTY),
            Arguments::Boxed(t) => c.ty(t),
        }
        c.ty(cmd.ret);
    }
    for ev in EVENTS {
        let arg = if ev.data.is_empty() {
            EMPTY.to_string()
        } else {
            format!("q_obj_{}-arg", ev.name)
        };
        entries.push(json!({"name": ev.name, "meta-type": "event", "arg-type": arg}));
        if ev.data.is_empty() {
            c.ty(EMPTY);
        } else {
            c.object(arg, ev.data);
        }
    }
    entries.extend(c.out);
    Value::Array(entries)
}

// ---- events ----------------------------------------------------------------------

const JOB_INFO_EVENT: &[Member] = &[
    ("type", "JobType"),
    ("device", "str"),
    ("len", "int"),
    ("offset", "int"),
    ("speed", "int"),
];

/// Every event vubd sends.
pub const EVENTS: &[EventDef] = &[
    EventDef {
        name: "BLOCK_IMAGE_CORRUPTED",
        data: &[
            ("device", "str"),
            ("*node-name", "str"),
            ("msg", "str"),
            ("*offset", "int"),
            ("*size", "int"),
            ("fatal", "bool"),
        ],
    },
    EventDef {
        name: "BLOCK_IO_ERROR",
        data: &[
            ("device", "str"),
            ("*node-name", "str"),
            ("operation", "IoOperationType"),
            ("action", "BlockErrorAction"),
            ("*nospace", "bool"),
            ("reason", "str"),
        ],
    },
    EventDef {
        name: "BLOCK_JOB_COMPLETED",
        data: &[
            ("type", "JobType"),
            ("device", "str"),
            ("len", "int"),
            ("offset", "int"),
            ("speed", "int"),
            ("*error", "str"),
        ],
    },
    EventDef {
        name: "BLOCK_JOB_CANCELLED",
        data: JOB_INFO_EVENT,
    },
    EventDef {
        name: "BLOCK_JOB_ERROR",
        data: &[
            ("device", "str"),
            ("operation", "IoOperationType"),
            ("action", "BlockErrorAction"),
        ],
    },
    EventDef {
        name: "BLOCK_JOB_READY",
        data: JOB_INFO_EVENT,
    },
    EventDef {
        name: "BLOCK_JOB_PENDING",
        data: &[("type", "JobType"), ("id", "str")],
    },
    EventDef {
        name: "BLOCK_WRITE_THRESHOLD",
        data: &[
            ("node-name", "str"),
            ("amount-exceeded", "uint64"),
            ("write-threshold", "uint64"),
        ],
    },
    EventDef {
        name: "JOB_STATUS_CHANGE",
        data: &[("id", "str"), ("status", "JobStatus")],
    },
    EventDef {
        name: "BLOCK_EXPORT_DELETED",
        data: &[("id", "str")],
    },
];

// ---- types -----------------------------------------------------------------------

const ON_ERROR: &[&str] = &["report", "ignore", "enospc", "stop"];

/// QEMU's `BackupCommon` and `target`: `blockdev-backup`'s members.
const BACKUP_COMMON: &[Member] = &[
    ("*job-id", "str"),
    ("device", "str"),
    ("sync", "MirrorSyncMode"),
    ("*speed", "int"),
    ("*bitmap", "str"),
    ("*bitmap-mode", "BitmapSyncMode"),
    ("*compress", "bool"),
    ("*on-source-error", "BlockdevOnError"),
    ("*on-target-error", "BlockdevOnError"),
    ("*auto-finalize", "bool"),
    ("*auto-dismiss", "bool"),
    ("*filter-node-name", "str"),
    ("*x-perf", "BackupPerf"),
    ("target", "str"),
];

pub const BLOCKDEV_BACKUP: &[Member] = BACKUP_COMMON;

pub const DRIVE_BACKUP: &[Member] = &concat::<16>(
    BACKUP_COMMON,
    &[("*format", "str"), ("*mode", "NewImageMode")],
);

/// The members of a block job command after its own: QEMU's common job options.
pub const JOB_OPTIONS: &[Member] = &[
    ("*speed", "int"),
    ("*on-error", "BlockdevOnError"),
    ("*filter-node-name", "str"),
    ("*auto-finalize", "bool"),
    ("*auto-dismiss", "bool"),
];

/// `a` then `b` (`N`: their lengths' sum), for member lists that extend others as
/// QAPI's bases do.
pub const fn concat<const N: usize>(a: &[Member], b: &[Member]) -> [Member; N] {
    let mut out = [("", ""); N];
    let mut i = 0;
    while i < a.len() {
        out[i] = a[i];
        i += 1;
    }
    let mut j = 0;
    while j < b.len() {
        out[i + j] = b[j];
        j += 1;
    }
    assert!(i + j == N, "concat: wrong length");
    out
}

pub const BLOCKDEV_SNAPSHOT: &[Member] = &[("node", "str"), ("overlay", "str")];

pub const BLOCKDEV_SNAPSHOT_SYNC: &[Member] = &[
    ("*device", "str"),
    ("*node-name", "str"),
    ("snapshot-file", "str"),
    ("*snapshot-node-name", "str"),
    ("*format", "str"),
    ("*mode", "NewImageMode"),
];

pub const BLOCKDEV_SNAPSHOT_INTERNAL: &[Member] = &[("device", "str"), ("name", "str")];

pub const BITMAP_ADD: &[Member] = &[
    ("node", "str"),
    ("name", "str"),
    ("*granularity", "uint32"),
    ("*persistent", "bool"),
    ("*disabled", "bool"),
];

pub const BITMAP: &[Member] = &[("node", "str"), ("name", "str")];

pub const BITMAP_MERGE: &[Member] = &[
    ("node", "str"),
    ("target", "str"),
    ("bitmaps", "[BlockDirtyBitmapOrStr]"),
];

const FILE_OPTIONS: &[Member] = &[
    ("filename", "str"),
    ("*pr-manager", "str"),
    ("*locking", "OnOffAuto"),
    ("*aio", "BlockdevAioOptions"),
    ("*aio-max-batch", "int"),
    ("*drop-cache", "bool"),
    ("*x-check-cache-dropped", "bool"),
];

const GENERIC_FORMAT: &[Member] = &[("file", "BlockdevRef")];

const LUKS_SLOT_AMEND: &[Member] = &[
    ("state", "QCryptoBlockLUKSKeyslotState"),
    ("*new-secret", "str"),
    ("*old-secret", "str"),
    ("*keyslot", "int"),
    ("*iter-time", "int"),
    ("*secret", "str"),
];

/// Every named type.
pub const TYPES: &[TypeDef] = &[
    // -- introspection and control
    TypeDef::Struct {
        name: "VersionTriple",
        members: &[("major", "int"), ("minor", "int"), ("micro", "int")],
    },
    TypeDef::Struct {
        name: "VersionInfo",
        members: &[("qemu", "VersionTriple"), ("package", "str")],
    },
    TypeDef::Struct {
        name: "CommandInfo",
        members: &[("name", "str")],
    },
    TypeDef::Enum {
        name: "SchemaMetaType",
        values: &[
            "builtin",
            "enum",
            "array",
            "object",
            "alternate",
            "command",
            "event",
        ],
    },
    TypeDef::Union {
        name: "SchemaInfo",
        base: &[
            ("name", "str"),
            ("meta-type", "SchemaMetaType"),
            ("*features", "[str]"),
        ],
        tag: "meta-type",
        variants: &[
            ("builtin", "SchemaInfoBuiltin"),
            ("enum", "SchemaInfoEnum"),
            ("array", "SchemaInfoArray"),
            ("object", "SchemaInfoObject"),
            ("alternate", "SchemaInfoAlternate"),
            ("command", "SchemaInfoCommand"),
            ("event", "SchemaInfoEvent"),
        ],
    },
    TypeDef::Enum {
        name: "JSONType",
        values: &[
            "string", "number", "int", "boolean", "null", "object", "array", "value",
        ],
    },
    TypeDef::Struct {
        name: "SchemaInfoBuiltin",
        members: &[("json-type", "JSONType")],
    },
    TypeDef::Struct {
        name: "SchemaInfoEnum",
        members: &[("members", "[SchemaInfoEnumMember]"), ("values", "[str]")],
    },
    TypeDef::Struct {
        name: "SchemaInfoEnumMember",
        members: &[("name", "str"), ("*features", "[str]")],
    },
    TypeDef::Struct {
        name: "SchemaInfoArray",
        members: &[("element-type", "str")],
    },
    TypeDef::Struct {
        name: "SchemaInfoObject",
        members: &[
            ("members", "[SchemaInfoObjectMember]"),
            ("*tag", "str"),
            ("*variants", "[SchemaInfoObjectVariant]"),
        ],
    },
    TypeDef::Struct {
        name: "SchemaInfoObjectMember",
        members: &[
            ("name", "str"),
            ("type", "str"),
            ("*default", "any"),
            ("*features", "[str]"),
        ],
    },
    TypeDef::Struct {
        name: "SchemaInfoObjectVariant",
        members: &[("case", "str"), ("type", "str")],
    },
    TypeDef::Struct {
        name: "SchemaInfoAlternate",
        members: &[("members", "[SchemaInfoAlternateMember]")],
    },
    TypeDef::Struct {
        name: "SchemaInfoAlternateMember",
        members: &[("type", "str")],
    },
    TypeDef::Struct {
        name: "SchemaInfoCommand",
        members: &[
            ("arg-type", "str"),
            ("ret-type", "str"),
            ("*allow-oob", "bool"),
        ],
    },
    TypeDef::Struct {
        name: "SchemaInfoEvent",
        members: &[("arg-type", "str")],
    },
    TypeDef::Enum {
        name: "QMPCapability",
        values: &["oob"],
    },
    // -- common enums
    TypeDef::Enum {
        name: "OnOffAuto",
        values: &["auto", "on", "off"],
    },
    TypeDef::Enum {
        name: "BlockdevOnError",
        values: ON_ERROR,
    },
    TypeDef::Enum {
        name: "BlockdevDetectZeroesOptions",
        values: &["off", "on", "unmap"],
    },
    TypeDef::Enum {
        name: "BlockdevDiscardOptions",
        values: &["ignore", "unmap"],
    },
    TypeDef::Enum {
        name: "BlockdevAioOptions",
        values: &["threads", "native", "io_uring"],
    },
    TypeDef::Enum {
        name: "MirrorSyncMode",
        values: &["top", "full", "none", "incremental", "bitmap"],
    },
    TypeDef::Enum {
        name: "BitmapSyncMode",
        values: &["on-success", "never", "always"],
    },
    TypeDef::Enum {
        name: "NewImageMode",
        values: &["existing", "absolute-paths"],
    },
    TypeDef::Enum {
        name: "MirrorCopyMode",
        values: &["background", "write-blocking"],
    },
    TypeDef::Enum {
        name: "BlockExportRemoveMode",
        values: &["safe", "hard"],
    },
    TypeDef::Enum {
        name: "IoOperationType",
        values: &["read", "write"],
    },
    TypeDef::Enum {
        name: "BlockErrorAction",
        values: &["ignore", "report", "stop"],
    },
    TypeDef::Enum {
        name: "BlockDeviceIoStatus",
        values: &["ok", "failed", "nospace"],
    },
    TypeDef::Enum {
        name: "JobType",
        values: &[
            "commit",
            "stream",
            "mirror",
            "backup",
            "create",
            "amend",
            "snapshot-load",
            "snapshot-save",
            "snapshot-delete",
        ],
    },
    TypeDef::Enum {
        name: "JobStatus",
        values: &[
            "undefined",
            "created",
            "running",
            "paused",
            "ready",
            "standby",
            "waiting",
            "pending",
            "aborting",
            "concluded",
            "null",
        ],
    },
    TypeDef::Enum {
        name: "BlockdevDriver",
        values: &[
            "blkdebug",
            "copy-before-write",
            "copy-on-read",
            "file",
            "snapshot-access",
            "host_device",
            "luks",
            "nbd",
            "null-aio",
            "null-co",
            "qcow2",
            "raw",
            "rbd",
            "throttle",
        ],
    },
    // -- queries
    TypeDef::Struct {
        name: "BlockdevCacheInfo",
        members: &[
            ("writeback", "bool"),
            ("direct", "bool"),
            ("no-flush", "bool"),
        ],
    },
    TypeDef::Struct {
        name: "BlockDeviceInfo",
        members: &[
            ("file", "str"),
            ("*node-name", "str"),
            ("ro", "bool"),
            ("drv", "str"),
            ("*backing_file", "str"),
            ("backing_file_depth", "int"),
            ("encrypted", "bool"),
            ("detect_zeroes", "BlockdevDetectZeroesOptions"),
            ("bps", "int"),
            ("bps_rd", "int"),
            ("bps_wr", "int"),
            ("iops", "int"),
            ("iops_rd", "int"),
            ("iops_wr", "int"),
            ("image", "ImageInfo"),
            ("*bps_max", "int"),
            ("*bps_rd_max", "int"),
            ("*bps_wr_max", "int"),
            ("*iops_max", "int"),
            ("*iops_rd_max", "int"),
            ("*iops_wr_max", "int"),
            ("*bps_max_length", "int"),
            ("*bps_rd_max_length", "int"),
            ("*bps_wr_max_length", "int"),
            ("*iops_max_length", "int"),
            ("*iops_rd_max_length", "int"),
            ("*iops_wr_max_length", "int"),
            ("*iops_size", "int"),
            ("*group", "str"),
            ("cache", "BlockdevCacheInfo"),
            ("write_threshold", "int"),
            ("*dirty-bitmaps", "[BlockDirtyInfo]"),
        ],
    },
    TypeDef::Struct {
        name: "ImageInfo",
        members: &[
            ("filename", "str"),
            ("format", "str"),
            ("*dirty-flag", "bool"),
            ("*actual-size", "int"),
            ("virtual-size", "int"),
            ("*cluster-size", "int"),
            ("*encrypted", "bool"),
            ("*compressed", "bool"),
            ("*backing-filename", "str"),
            ("*full-backing-filename", "str"),
            ("*backing-filename-format", "str"),
            ("*snapshots", "[SnapshotInfo]"),
            ("*backing-image", "ImageInfo"),
            ("*format-specific", "ImageInfoSpecific"),
        ],
    },
    TypeDef::Struct {
        name: "SnapshotInfo",
        members: &[
            ("id", "str"),
            ("name", "str"),
            ("vm-state-size", "int"),
            ("date-sec", "int"),
            ("date-nsec", "int"),
            ("vm-clock-sec", "int"),
            ("vm-clock-nsec", "int"),
            ("*icount", "int"),
        ],
    },
    TypeDef::Enum {
        name: "ImageInfoSpecificKind",
        values: &["qcow2", "luks", "rbd"],
    },
    TypeDef::Union {
        name: "ImageInfoSpecific",
        base: &[("type", "ImageInfoSpecificKind")],
        tag: "type",
        variants: &[
            ("qcow2", "ImageInfoSpecificQCow2Wrapper"),
            ("luks", "ImageInfoSpecificLUKSWrapper"),
            ("rbd", "ImageInfoSpecificRbdWrapper"),
        ],
    },
    TypeDef::Struct {
        name: "ImageInfoSpecificQCow2Wrapper",
        members: &[("data", "ImageInfoSpecificQCow2")],
    },
    TypeDef::Struct {
        name: "ImageInfoSpecificLUKSWrapper",
        members: &[("data", "QCryptoBlockInfoLUKS")],
    },
    TypeDef::Struct {
        name: "ImageInfoSpecificRbdWrapper",
        members: &[("data", "ImageInfoSpecificRbd")],
    },
    TypeDef::Struct {
        name: "ImageInfoSpecificRbd",
        members: &[("*encryption-format", "RbdImageEncryptionFormat")],
    },
    TypeDef::Enum {
        name: "RbdImageEncryptionFormat",
        values: &["luks", "luks2"],
    },
    TypeDef::Struct {
        name: "ImageInfoSpecificQCow2",
        members: &[
            ("compat", "str"),
            ("*data-file", "str"),
            ("*data-file-raw", "bool"),
            ("*extended-l2", "bool"),
            ("*lazy-refcounts", "bool"),
            ("*corrupt", "bool"),
            ("refcount-bits", "int"),
            ("*encrypt", "ImageInfoSpecificQCow2Encryption"),
            ("*bitmaps", "[Qcow2BitmapInfo]"),
            ("compression-type", "Qcow2CompressionType"),
        ],
    },
    TypeDef::Enum {
        name: "BlockdevQcow2EncryptionFormat",
        values: &["aes", "luks"],
    },
    TypeDef::Union {
        name: "ImageInfoSpecificQCow2Encryption",
        base: &[("format", "BlockdevQcow2EncryptionFormat")],
        tag: "format",
        variants: &[("luks", "QCryptoBlockInfoLUKS"), ("aes", EMPTY)],
    },
    TypeDef::Struct {
        name: "QCryptoBlockInfoLUKS",
        members: &[
            ("cipher-alg", "QCryptoCipherAlgorithm"),
            ("cipher-mode", "QCryptoCipherMode"),
            ("ivgen-alg", "QCryptoIVGenAlgorithm"),
            ("*ivgen-hash-alg", "QCryptoHashAlgorithm"),
            ("hash-alg", "QCryptoHashAlgorithm"),
            ("payload-offset", "int"),
            ("master-key-iters", "int"),
            ("uuid", "str"),
            ("slots", "[QCryptoBlockInfoLUKSSlot]"),
        ],
    },
    // The LUKS algorithms vubd's LUKS code has.
    TypeDef::Enum {
        name: "QCryptoCipherAlgorithm",
        values: &["aes-128", "aes-192", "aes-256"],
    },
    TypeDef::Enum {
        name: "QCryptoCipherMode",
        values: &["ecb", "cbc", "xts", "ctr"],
    },
    TypeDef::Enum {
        name: "QCryptoIVGenAlgorithm",
        values: &["plain", "plain64", "essiv"],
    },
    TypeDef::Enum {
        name: "QCryptoHashAlgorithm",
        values: &["sha1", "sha224", "sha256", "sha384", "sha512"],
    },
    TypeDef::Struct {
        name: "QCryptoBlockInfoLUKSSlot",
        members: &[
            ("active", "bool"),
            ("*iters", "int"),
            ("*stripes", "int"),
            ("key-offset", "int"),
        ],
    },
    TypeDef::Struct {
        name: "Qcow2BitmapInfo",
        members: &[
            ("name", "str"),
            ("granularity", "uint32"),
            ("flags", "[Qcow2BitmapInfoFlags]"),
        ],
    },
    TypeDef::Enum {
        name: "Qcow2BitmapInfoFlags",
        values: &["in-use", "auto"],
    },
    TypeDef::Enum {
        name: "Qcow2CompressionType",
        values: &["zlib", "zstd"],
    },
    TypeDef::Struct {
        name: "BlockDirtyInfo",
        members: &[
            ("*name", "str"),
            ("count", "int"),
            ("granularity", "uint32"),
            ("recording", "bool"),
            ("busy", "bool"),
            ("persistent", "bool"),
            ("*inconsistent", "bool"),
        ],
    },
    TypeDef::Enum {
        name: "BlockExportType",
        values: &["nbd", "vhost-user-blk"],
    },
    TypeDef::Struct {
        name: "BlockExportInfo",
        members: &[
            ("id", "str"),
            ("type", "BlockExportType"),
            ("node-name", "str"),
            ("shutting-down", "bool"),
            // vubd: the export's I/O status while it has an error policy.
            ("*iostatus", "BlockDeviceIoStatus"),
        ],
    },
    TypeDef::Struct {
        name: "IOThreadInfo",
        members: &[
            ("id", "str"),
            ("thread-id", "int"),
            ("poll-max-ns", "int"),
            ("poll-grow", "int"),
            ("poll-shrink", "int"),
            ("aio-max-batch", "int"),
        ],
    },
    TypeDef::Struct {
        name: "BlockStats",
        members: &[
            ("*device", "str"),
            ("*qdev", "str"),
            ("*node-name", "str"),
            ("stats", "BlockDeviceStats"),
            ("*driver-specific", "BlockStatsSpecific"),
            ("*parent", "BlockStats"),
            ("*backing", "BlockStats"),
        ],
    },
    TypeDef::Struct {
        name: "BlockDeviceStats",
        members: &[
            ("rd_bytes", "int"),
            ("wr_bytes", "int"),
            ("unmap_bytes", "int"),
            ("rd_operations", "int"),
            ("wr_operations", "int"),
            ("flush_operations", "int"),
            ("unmap_operations", "int"),
            ("rd_total_time_ns", "int"),
            ("wr_total_time_ns", "int"),
            ("flush_total_time_ns", "int"),
            ("unmap_total_time_ns", "int"),
            ("wr_highest_offset", "int"),
            ("rd_merged", "int"),
            ("wr_merged", "int"),
            ("unmap_merged", "int"),
            ("*idle_time_ns", "int"),
            ("failed_rd_operations", "int"),
            ("failed_wr_operations", "int"),
            ("failed_flush_operations", "int"),
            ("failed_unmap_operations", "int"),
            ("invalid_rd_operations", "int"),
            ("invalid_wr_operations", "int"),
            ("invalid_flush_operations", "int"),
            ("invalid_unmap_operations", "int"),
            ("account_invalid", "bool"),
            ("account_failed", "bool"),
            ("timed_stats", "[BlockDeviceTimedStats]"),
            ("*rd_latency_histogram", "BlockLatencyHistogramInfo"),
            ("*wr_latency_histogram", "BlockLatencyHistogramInfo"),
            ("*flush_latency_histogram", "BlockLatencyHistogramInfo"),
        ],
    },
    TypeDef::Struct {
        name: "BlockDeviceTimedStats",
        members: &[
            ("interval_length", "int"),
            ("min_rd_latency_ns", "int"),
            ("max_rd_latency_ns", "int"),
            ("avg_rd_latency_ns", "int"),
            ("min_wr_latency_ns", "int"),
            ("max_wr_latency_ns", "int"),
            ("avg_wr_latency_ns", "int"),
            ("min_flush_latency_ns", "int"),
            ("max_flush_latency_ns", "int"),
            ("avg_flush_latency_ns", "int"),
            ("avg_rd_queue_depth", "number"),
            ("avg_wr_queue_depth", "number"),
        ],
    },
    TypeDef::Struct {
        name: "BlockLatencyHistogramInfo",
        members: &[("boundaries", "[uint64]"), ("bins", "[uint64]")],
    },
    TypeDef::Union {
        name: "BlockStatsSpecific",
        base: &[("driver", "BlockdevDriver")],
        tag: "driver",
        variants: &[
            ("file", "BlockStatsSpecificFile"),
            ("host_device", "BlockStatsSpecificFile"),
            ("qcow2", "BlockStatsSpecificQcow2"),
        ],
    },
    // vubd's own: the qcow2 metadata caches.
    TypeDef::Struct {
        name: "BlockStatsSpecificQcow2",
        members: &[
            ("x-l2-cache-entries", "uint64"),
            ("x-l2-cache-hits", "uint64"),
            ("x-l2-cache-misses", "uint64"),
            ("x-l2-cache-cleaned", "uint64"),
            ("x-refcount-cache-entries", "uint64"),
            ("x-refcount-cache-hits", "uint64"),
            ("x-refcount-cache-misses", "uint64"),
            ("x-refcount-cache-cleaned", "uint64"),
            ("x-cache-cleans", "uint64"),
        ],
    },
    TypeDef::Struct {
        name: "BlockStatsSpecificFile",
        members: &[
            ("discard-nb-ok", "uint64"),
            ("discard-nb-failed", "uint64"),
            ("discard-bytes-ok", "uint64"),
            // vubd's own: fsync/fdatasync calls.
            ("*x-sync-operations", "uint64"),
        ],
    },
    TypeDef::Struct {
        name: "JobInfo",
        members: &[
            ("id", "str"),
            ("type", "JobType"),
            ("status", "JobStatus"),
            ("current-progress", "int"),
            ("total-progress", "int"),
            ("*error", "str"),
        ],
    },
    TypeDef::Struct {
        name: "BlockJobInfo",
        members: &[
            ("type", "str"),
            ("device", "str"),
            ("len", "int"),
            ("offset", "int"),
            ("busy", "bool"),
            ("paused", "bool"),
            ("speed", "int"),
            ("io-status", "BlockDeviceIoStatus"),
            ("ready", "bool"),
            ("status", "JobStatus"),
            ("auto-finalize", "bool"),
            ("auto-dismiss", "bool"),
            ("*error", "str"),
        ],
    },
    TypeDef::Struct {
        name: "XDbgBlockGraph",
        members: &[
            ("nodes", "[XDbgBlockGraphNode]"),
            ("edges", "[XDbgBlockGraphEdge]"),
        ],
    },
    TypeDef::Enum {
        name: "XDbgBlockGraphNodeType",
        values: &["block-backend", "block-job", "block-driver"],
    },
    TypeDef::Struct {
        name: "XDbgBlockGraphNode",
        members: &[
            ("id", "uint64"),
            ("type", "XDbgBlockGraphNodeType"),
            ("name", "str"),
        ],
    },
    TypeDef::Enum {
        name: "BlockPermission",
        values: &["consistent-read", "write", "write-unchanged", "resize"],
    },
    TypeDef::Struct {
        name: "XDbgBlockGraphEdge",
        members: &[
            ("parent", "uint64"),
            ("child", "uint64"),
            ("name", "str"),
            ("perm", "[BlockPermission]"),
            ("shared-perm", "[BlockPermission]"),
        ],
    },
    TypeDef::Struct {
        name: "BlockDirtyBitmapSha256",
        members: &[("sha256", "str")],
    },
    TypeDef::Struct {
        name: "ObjectPropertyInfo",
        members: &[
            ("name", "str"),
            ("type", "str"),
            ("*description", "str"),
            ("*default-value", "any"),
        ],
    },
    TypeDef::Struct {
        name: "ObjectTypeInfo",
        members: &[("name", "str"), ("*abstract", "bool"), ("*parent", "str")],
    },
    // -- command arguments
    TypeDef::Struct {
        name: "BackupPerf",
        members: &[
            ("*use-copy-range", "bool"),
            ("*max-workers", "int"),
            ("*max-chunk", "int"),
        ],
    },
    TypeDef::Struct {
        name: "BlockDirtyBitmap",
        members: BITMAP,
    },
    TypeDef::Alternate {
        name: "BlockDirtyBitmapOrStr",
        types: &["str", "BlockDirtyBitmap"],
    },
    TypeDef::Alternate {
        name: "StrOrNull",
        types: &["str", "null"],
    },
    TypeDef::Enum {
        name: "SocketAddressType",
        values: &["inet", "unix", "vsock", "fd"],
    },
    TypeDef::Struct {
        name: "InetSocketAddress",
        members: &[
            ("host", "str"),
            ("port", "str"),
            ("*numeric", "bool"),
            ("*to", "uint32"),
            ("*ipv4", "bool"),
            ("*ipv6", "bool"),
            ("*keep-alive", "bool"),
        ],
    },
    TypeDef::Struct {
        name: "UnixSocketAddress",
        members: &[("path", "str"), ("*abstract", "bool"), ("*tight", "bool")],
    },
    TypeDef::Struct {
        name: "VsockSocketAddress",
        members: &[("cid", "str"), ("port", "str")],
    },
    TypeDef::Struct {
        name: "String",
        members: &[("str", "str")],
    },
    TypeDef::Union {
        name: "SocketAddress",
        base: &[("type", "SocketAddressType")],
        tag: "type",
        variants: &[
            ("inet", "InetSocketAddress"),
            ("unix", "UnixSocketAddress"),
            ("vsock", "VsockSocketAddress"),
            ("fd", "String"),
        ],
    },
    TypeDef::Union {
        name: "SocketAddressLegacy",
        base: &[("type", "SocketAddressType")],
        tag: "type",
        variants: &[
            ("inet", "InetSocketAddressWrapper"),
            ("unix", "UnixSocketAddressWrapper"),
            ("vsock", "VsockSocketAddressWrapper"),
            ("fd", "StringWrapper"),
        ],
    },
    TypeDef::Struct {
        name: "InetSocketAddressWrapper",
        members: &[("data", "InetSocketAddress")],
    },
    TypeDef::Struct {
        name: "UnixSocketAddressWrapper",
        members: &[("data", "UnixSocketAddress")],
    },
    TypeDef::Struct {
        name: "VsockSocketAddressWrapper",
        members: &[("data", "VsockSocketAddress")],
    },
    TypeDef::Struct {
        name: "StringWrapper",
        members: &[("data", "String")],
    },
    // blockdev-add
    TypeDef::Struct {
        name: "BlockdevCacheOptions",
        members: &[("*direct", "bool"), ("*no-flush", "bool")],
    },
    TypeDef::Union {
        name: "BlockdevOptions",
        base: &[
            ("driver", "BlockdevDriver"),
            ("*node-name", "str"),
            ("*discard", "BlockdevDiscardOptions"),
            ("*cache", "BlockdevCacheOptions"),
            ("*read-only", "bool"),
            ("*auto-read-only", "bool"),
            ("*force-share", "bool"),
            ("*detect-zeroes", "BlockdevDetectZeroesOptions"),
        ],
        tag: "driver",
        variants: &[
            ("blkdebug", "BlockdevOptionsBlkdebug"),
            ("copy-before-write", "BlockdevOptionsCbw"),
            ("copy-on-read", "BlockdevOptionsCor"),
            ("file", "BlockdevOptionsFile"),
            ("snapshot-access", "BlockdevOptionsGenericFormat"),
            ("host_device", "BlockdevOptionsFile"),
            ("luks", "BlockdevOptionsLUKS"),
            ("nbd", "BlockdevOptionsNbd"),
            ("null-aio", "BlockdevOptionsNull"),
            ("null-co", "BlockdevOptionsNull"),
            ("qcow2", "BlockdevOptionsQcow2"),
            ("raw", "BlockdevOptionsRaw"),
            ("rbd", "BlockdevOptionsRbd"),
            ("throttle", "BlockdevOptionsThrottle"),
        ],
    },
    TypeDef::Alternate {
        name: "BlockdevRef",
        types: &["BlockdevOptions", "str"],
    },
    TypeDef::Alternate {
        name: "BlockdevRefOrNull",
        types: &["BlockdevOptions", "str", "null"],
    },
    TypeDef::Struct {
        name: "BlockdevOptionsFile",
        members: FILE_OPTIONS,
    },
    TypeDef::Struct {
        name: "BlockdevOptionsGenericFormat",
        members: GENERIC_FORMAT,
    },
    TypeDef::Struct {
        name: "BlockdevOptionsRaw",
        members: &[
            ("file", "BlockdevRef"),
            ("*offset", "int"),
            ("*size", "int"),
        ],
    },
    TypeDef::Struct {
        name: "BlockdevOptionsNull",
        members: &[
            ("*size", "int"),
            ("*latency-ns", "uint64"),
            ("*read-zeroes", "bool"),
        ],
    },
    TypeDef::Struct {
        name: "BlockdevOptionsCor",
        members: &[("file", "BlockdevRef"), ("*bottom", "str")],
    },
    TypeDef::Enum {
        name: "OnCbwError",
        values: &["break-guest-write", "break-snapshot"],
    },
    TypeDef::Struct {
        name: "BlockdevOptionsCbw",
        members: &[
            ("file", "BlockdevRef"),
            ("target", "BlockdevRef"),
            ("*bitmap", "BlockDirtyBitmap"),
            ("*on-cbw-error", "OnCbwError"),
            ("*cbw-timeout", "uint32"),
        ],
    },
    TypeDef::Struct {
        name: "BlockdevOptionsThrottle",
        members: &[("throttle-group", "str"), ("file", "BlockdevRef")],
    },
    TypeDef::Struct {
        name: "BlockdevOptionsLUKS",
        members: &[("file", "BlockdevRef"), ("*key-secret", "str")],
    },
    TypeDef::Struct {
        name: "BlockdevOptionsQcow2",
        members: &[
            ("file", "BlockdevRef"),
            ("*backing", "BlockdevRefOrNull"),
            ("*lazy-refcounts", "bool"),
            ("*pass-discard-request", "bool"),
            ("*pass-discard-snapshot", "bool"),
            ("*pass-discard-other", "bool"),
            ("*cache-size", "int"),
            ("*l2-cache-size", "int"),
            ("*l2-cache-entry-size", "int"),
            ("*refcount-cache-size", "int"),
            ("*cache-clean-interval", "int"),
            ("*data-file", "BlockdevRef"),
        ],
    },
    TypeDef::Struct {
        name: "BlockdevOptionsNbd",
        members: &[
            ("server", "SocketAddress"),
            ("*export", "str"),
            ("*tls-creds", "str"),
            ("*tls-hostname", "str"),
            ("*x-dirty-bitmap", "str"),
            ("*reconnect-delay", "uint32"),
            ("*open-timeout", "uint32"),
        ],
    },
    TypeDef::Struct {
        name: "BlockdevOptionsRbd",
        members: &[
            ("pool", "str"),
            ("*namespace", "str"),
            ("image", "str"),
            ("*conf", "str"),
            ("*snapshot", "str"),
            ("*user", "str"),
            ("*key-secret", "str"),
        ],
    },
    TypeDef::Struct {
        name: "BlockdevOptionsBlkdebug",
        members: &[
            ("image", "BlockdevRef"),
            ("*config", "str"),
            ("*align", "int"),
            ("*max-transfer", "int"),
            ("*opt-write-zero", "int"),
            ("*max-write-zero", "int"),
            ("*opt-discard", "int"),
            ("*max-discard", "int"),
            ("*inject-error", "[BlkdebugInjectErrorOptions]"),
            ("*set-state", "[BlkdebugSetStateOptions]"),
            ("*take-child-perms", "[BlockPermission]"),
            ("*unshare-child-perms", "[BlockPermission]"),
        ],
    },
    TypeDef::Enum {
        name: "BlkdebugIOType",
        values: &[
            "read",
            "write",
            "write-zeroes",
            "discard",
            "flush",
            "block-status",
        ],
    },
    TypeDef::Struct {
        name: "BlkdebugInjectErrorOptions",
        members: &[
            ("event", "BlkdebugEvent"),
            ("*state", "int"),
            ("*iotype", "BlkdebugIOType"),
            ("*errno", "int"),
            ("*sector", "int"),
            ("*once", "bool"),
            ("*immediately", "bool"),
        ],
    },
    TypeDef::Struct {
        name: "BlkdebugSetStateOptions",
        members: &[
            ("event", "BlkdebugEvent"),
            ("*state", "int"),
            ("new_state", "int"),
        ],
    },
    TypeDef::Enum {
        name: "BlkdebugEvent",
        values: blocklayer::drivers::blkdebug::BLKDEBUG_EVENTS,
    },
    // blockdev-create, x-blockdev-amend
    TypeDef::Enum {
        name: "PreallocMode",
        values: &["off", "metadata", "falloc", "full"],
    },
    TypeDef::Union {
        name: "BlockdevCreateOptions",
        base: &[("driver", "BlockdevDriver")],
        tag: "driver",
        variants: &[
            ("file", "BlockdevCreateOptionsFile"),
            ("luks", "BlockdevCreateOptionsLUKS"),
            ("qcow2", "BlockdevCreateOptionsQcow2"),
            ("rbd", "BlockdevCreateOptionsRbd"),
        ],
    },
    TypeDef::Struct {
        name: "BlockdevCreateOptionsFile",
        members: &[
            ("filename", "str"),
            ("size", "size"),
            ("*preallocation", "PreallocMode"),
            ("*nocow", "bool"),
            ("*extent-size-hint", "size"),
        ],
    },
    TypeDef::Struct {
        name: "BlockdevCreateOptionsLUKS",
        members: &[
            ("*key-secret", "str"),
            ("*cipher-alg", "QCryptoCipherAlgorithm"),
            ("*cipher-mode", "QCryptoCipherMode"),
            ("*ivgen-alg", "QCryptoIVGenAlgorithm"),
            ("*ivgen-hash-alg", "QCryptoHashAlgorithm"),
            ("*hash-alg", "QCryptoHashAlgorithm"),
            ("*iter-time", "int"),
            ("file", "BlockdevRef"),
            ("size", "size"),
            ("*preallocation", "PreallocMode"),
        ],
    },
    TypeDef::Enum {
        name: "BlockdevQcow2Version",
        values: &["v2", "v3"],
    },
    TypeDef::Struct {
        name: "BlockdevCreateOptionsQcow2",
        members: &[
            ("file", "BlockdevRef"),
            ("*data-file", "BlockdevRef"),
            ("*data-file-raw", "bool"),
            ("*extended-l2", "bool"),
            ("size", "size"),
            ("*version", "BlockdevQcow2Version"),
            ("*backing-file", "str"),
            ("*backing-fmt", "BlockdevDriver"),
            ("*cluster-size", "size"),
            ("*preallocation", "PreallocMode"),
            ("*lazy-refcounts", "bool"),
            ("*refcount-bits", "int"),
            ("*compression-type", "Qcow2CompressionType"),
        ],
    },
    TypeDef::Struct {
        name: "BlockdevCreateOptionsRbd",
        members: &[
            ("location", "BlockdevOptionsRbd"),
            ("size", "size"),
            ("*cluster-size", "size"),
        ],
    },
    TypeDef::Union {
        name: "BlockdevAmendOptions",
        base: &[("driver", "BlockdevDriver")],
        tag: "driver",
        variants: &[
            ("luks", "QCryptoBlockAmendOptionsLUKS"),
            ("qcow2", "BlockdevAmendOptionsQcow2"),
        ],
    },
    TypeDef::Enum {
        name: "QCryptoBlockLUKSKeyslotState",
        values: &["active", "inactive"],
    },
    TypeDef::Struct {
        name: "QCryptoBlockAmendOptionsLUKS",
        members: LUKS_SLOT_AMEND,
    },
    TypeDef::Struct {
        name: "BlockdevAmendOptionsQcow2",
        members: &[("*encrypt", "QCryptoBlockAmendOptions")],
    },
    TypeDef::Enum {
        name: "QCryptoBlockFormat",
        values: &["qcow", "luks"],
    },
    TypeDef::Union {
        name: "QCryptoBlockAmendOptions",
        base: &[("format", "QCryptoBlockFormat")],
        tag: "format",
        variants: &[("luks", "QCryptoBlockAmendOptionsLUKS"), ("qcow", EMPTY)],
    },
    // block-export-add
    TypeDef::Union {
        name: "BlockExportOptions",
        base: &[
            ("type", "BlockExportType"),
            ("id", "str"),
            ("*fixed-iothread", "bool"),
            ("*iothread", "str"),
            ("node-name", "str"),
            ("*writable", "bool"),
            ("*writethrough", "bool"),
        ],
        tag: "type",
        variants: &[
            ("nbd", "BlockExportOptionsNbd"),
            ("vhost-user-blk", "BlockExportOptionsVhostUserBlk"),
        ],
    },
    TypeDef::Struct {
        name: "BlockExportOptionsNbd",
        members: &[
            ("*name", "str"),
            ("*description", "str"),
            ("*bitmaps", "[BlockDirtyBitmapOrStr]"),
            ("*allocation-depth", "bool"),
        ],
    },
    TypeDef::Struct {
        name: "BlockExportOptionsVhostUserBlk",
        members: &[
            ("addr", "SocketAddress"),
            ("*logical-block-size", "size"),
            ("*num-queues", "uint16"),
        ],
    },
    // object-add
    TypeDef::Enum {
        name: "ObjectType",
        values: &["iothread", "secret", "throttle-group"],
    },
    TypeDef::Union {
        name: "ObjectOptions",
        base: &[("qom-type", "ObjectType"), ("id", "str")],
        tag: "qom-type",
        variants: &[
            ("iothread", "IothreadProperties"),
            ("secret", "SecretProperties"),
            ("throttle-group", "ThrottleGroupProperties"),
        ],
    },
    TypeDef::Struct {
        name: "IothreadProperties",
        members: &[
            ("*aio-max-batch", "int"),
            ("*poll-max-ns", "int"),
            ("*poll-grow", "int"),
            ("*poll-shrink", "int"),
        ],
    },
    TypeDef::Enum {
        name: "QCryptoSecretFormat",
        values: &["raw", "base64"],
    },
    TypeDef::Struct {
        name: "SecretProperties",
        members: &[
            ("*format", "QCryptoSecretFormat"),
            ("*keyid", "str"),
            ("*iv", "str"),
            ("*data", "str"),
            ("*file", "str"),
        ],
    },
    TypeDef::Struct {
        name: "ThrottleGroupProperties",
        members: &[("*limits", "ThrottleLimits")],
    },
    TypeDef::Struct {
        name: "ThrottleLimits",
        members: &[
            ("*iops-total", "int"),
            ("*iops-total-max", "int"),
            ("*iops-total-max-length", "int"),
            ("*iops-read", "int"),
            ("*iops-read-max", "int"),
            ("*iops-read-max-length", "int"),
            ("*iops-write", "int"),
            ("*iops-write-max", "int"),
            ("*iops-write-max-length", "int"),
            ("*bps-total", "int"),
            ("*bps-total-max", "int"),
            ("*bps-total-max-length", "int"),
            ("*bps-read", "int"),
            ("*bps-read-max", "int"),
            ("*bps-read-max-length", "int"),
            ("*bps-write", "int"),
            ("*bps-write-max", "int"),
            ("*bps-write-max-length", "int"),
            ("*iops-size", "int"),
        ],
    },
    // transaction
    TypeDef::Enum {
        name: "TransactionActionKind",
        values: super::transaction::ACTIONS,
    },
    TypeDef::Union {
        name: "TransactionAction",
        base: &[("type", "TransactionActionKind")],
        tag: "type",
        variants: &[
            ("abort", "AbortWrapper"),
            ("blockdev-backup", "BlockdevBackupWrapper"),
            ("drive-backup", "DriveBackupWrapper"),
            ("block-dirty-bitmap-add", "BlockDirtyBitmapAddWrapper"),
            ("block-dirty-bitmap-remove", "BlockDirtyBitmapWrapper"),
            ("block-dirty-bitmap-clear", "BlockDirtyBitmapWrapper"),
            ("block-dirty-bitmap-enable", "BlockDirtyBitmapWrapper"),
            ("block-dirty-bitmap-disable", "BlockDirtyBitmapWrapper"),
            ("block-dirty-bitmap-merge", "BlockDirtyBitmapMergeWrapper"),
            ("blockdev-snapshot", "BlockdevSnapshotWrapper"),
            (
                "blockdev-snapshot-internal-sync",
                "BlockdevSnapshotInternalWrapper",
            ),
            ("blockdev-snapshot-sync", "BlockdevSnapshotSyncWrapper"),
        ],
    },
    TypeDef::Struct {
        name: "AbortWrapper",
        members: &[("data", EMPTY)],
    },
    TypeDef::Struct {
        name: "BlockdevBackupWrapper",
        members: &[("data", "BlockdevBackup")],
    },
    TypeDef::Struct {
        name: "BlockdevBackup",
        members: BLOCKDEV_BACKUP,
    },
    TypeDef::Struct {
        name: "DriveBackupWrapper",
        members: &[("data", "DriveBackup")],
    },
    TypeDef::Struct {
        name: "DriveBackup",
        members: DRIVE_BACKUP,
    },
    TypeDef::Struct {
        name: "BlockDirtyBitmapAddWrapper",
        members: &[("data", "BlockDirtyBitmapAdd")],
    },
    TypeDef::Struct {
        name: "BlockDirtyBitmapAdd",
        members: BITMAP_ADD,
    },
    TypeDef::Struct {
        name: "BlockDirtyBitmapWrapper",
        members: &[("data", "BlockDirtyBitmap")],
    },
    TypeDef::Struct {
        name: "BlockDirtyBitmapMergeWrapper",
        members: &[("data", "BlockDirtyBitmapMerge")],
    },
    TypeDef::Struct {
        name: "BlockDirtyBitmapMerge",
        members: BITMAP_MERGE,
    },
    TypeDef::Struct {
        name: "BlockdevSnapshotWrapper",
        members: &[("data", "BlockdevSnapshot")],
    },
    TypeDef::Struct {
        name: "BlockdevSnapshot",
        members: BLOCKDEV_SNAPSHOT,
    },
    TypeDef::Struct {
        name: "BlockdevSnapshotInternalWrapper",
        members: &[("data", "BlockdevSnapshotInternal")],
    },
    TypeDef::Struct {
        name: "BlockdevSnapshotInternal",
        members: BLOCKDEV_SNAPSHOT_INTERNAL,
    },
    TypeDef::Struct {
        name: "BlockdevSnapshotSyncWrapper",
        members: &[("data", "BlockdevSnapshotSync")],
    },
    TypeDef::Struct {
        name: "BlockdevSnapshotSync",
        members: BLOCKDEV_SNAPSHOT_SYNC,
    },
    TypeDef::Enum {
        name: "ActionCompletionMode",
        values: &["individual", "grouped"],
    },
    TypeDef::Struct {
        name: "TransactionProperties",
        members: &[("*completion-mode", "ActionCompletionMode")],
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every type a command, event or type names is defined, and names are unique.
    #[test]
    fn every_type_is_defined_once() {
        let mut names = BTreeSet::new();
        for t in TYPES {
            assert!(names.insert(t.name()), "{} defined twice", t.name());
        }
        let schema = introspect();
        let entries = schema.as_array().unwrap();
        let defined: BTreeSet<&str> = entries
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        let refer = |t: &Value| {
            let t = t.as_str().unwrap();
            assert!(defined.contains(t), "{t} is referred to but not defined");
        };
        for e in entries {
            match e["meta-type"].as_str().unwrap() {
                "command" => {
                    refer(&e["arg-type"]);
                    refer(&e["ret-type"]);
                }
                "event" => refer(&e["arg-type"]),
                "array" => refer(&e["element-type"]),
                "object" => {
                    for m in e["members"].as_array().unwrap() {
                        refer(&m["type"]);
                    }
                    for v in e["variants"].as_array().into_iter().flatten() {
                        refer(&v["type"]);
                    }
                }
                "alternate" => {
                    for m in e["members"].as_array().unwrap() {
                        refer(&m["type"]);
                    }
                }
                _ => {}
            }
        }
        // Every name is listed once.
        assert_eq!(defined.len(), entries.len());
    }

    /// The block layer's typed events are listed, with their data's members.
    #[test]
    fn block_layer_events_are_listed() {
        use blocklayer::events::*;
        let events = [
            BlockEvent::WriteThreshold(WriteThreshold {
                node_name: "n".into(),
                amount_exceeded: 1,
                write_threshold: 2,
            }),
            BlockEvent::ImageCorrupted(ImageCorrupted {
                device: String::new(),
                node_name: "n".into(),
                msg: "m".into(),
                fatal: true,
            }),
            BlockEvent::IoError(IoError {
                device: String::new(),
                node_name: "n".into(),
                operation: IoOperation::Read,
                action: "report",
                nospace: Some(false),
                reason: "r".into(),
            }),
        ];
        for e in &events {
            let def = EVENTS
                .iter()
                .find(|d| d.name == e.name())
                .unwrap_or_else(|| panic!("{} not in EVENTS", e.name()));
            for key in blocklayer::info::to_json(e).as_object().unwrap().keys() {
                assert!(
                    def.data.iter().any(|m| member_name(m).0 == key),
                    "{}: {key} not declared",
                    e.name()
                );
            }
        }
    }

    /// The driver enum is vubd's driver table.
    #[test]
    fn drivers_are_the_driver_table() {
        let Some(TypeDef::Enum { values, .. }) = find("BlockdevDriver") else {
            panic!("no BlockdevDriver");
        };
        let mut table: Vec<&str> = blocklayer::drivers::DRIVERS
            .iter()
            .flat_map(|e| e.names.iter().copied())
            .collect();
        table.sort_unstable();
        let mut schema = values.to_vec();
        schema.sort_unstable();
        assert_eq!(schema, table);
    }
}

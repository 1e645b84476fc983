//! The QMP commands vubd implements, with QEMU 7.2's names, arguments and results:
//! one table ([`COMMANDS`]) gives each command's argument and return types and its
//! handler. Dispatch, the argument check, `query-commands` and `query-qmp-schema`
//! all read it. The argument check ([`super::args::check`]) runs on the declared
//! members before the handler, which reads them (see [`Args`]) and calls the
//! control plane; commands whose arguments are one big union (`blockdev-add`,
//! `block-export-add`, `object-add`) hand them to the parser of that union.

use super::args::{self, Args};
use super::schema::{self, Member};
use super::wire::{ErrorClass, QmpError, QmpResult, QEMU_VERSION};
use crate::config::{ExportConfig, ObjectConfig};
use crate::control::Control;
use blocklayer::info::to_json;
use blocklayer::options::{BlockdevOptions, OptionsError};
use serde_json::{json, Value};

/// A `BlockdevOnError` member (QEMU's values but `auto`).
fn on_error(a: &mut Args, name: &str) -> Result<crate::config::OnError, QmpError> {
    Ok(
        match a.opt_enum(name, &["report", "ignore", "enospc", "stop"])? {
            Some("ignore") => crate::config::OnError::Ignore,
            Some("enospc") => crate::config::OnError::Enospc,
            Some("stop") => crate::config::OnError::Stop,
            _ => crate::config::OnError::Report,
        },
    )
}

/// What blockdev-mirror and drive-mirror share, and their job options
/// (`on-source-error` is the job's read policy).
fn mirror_args(
    a: &mut Args,
    filter: bool,
) -> Result<
    (
        crate::control::mirror::MirrorCommon,
        crate::control::jobs::JobOpts,
    ),
    QmpError,
> {
    let common = crate::control::mirror::MirrorCommon {
        replaces: a.opt_str("replaces")?,
        sync: a
            .opt_enum("sync", &["top", "full", "none", "incremental", "bitmap"])?
            .ok_or_else(|| QmpError::generic("Parameter 'sync' is missing"))?,
        granularity: match a.opt_uint("granularity")? {
            Some(g) if g > u64::from(u32::MAX) => {
                return Err(QmpError::generic("Parameter 'granularity' expects uint32"))
            }
            g => g,
        },
        buf_size: a.opt_int("buf-size")?,
        unmap: true,
        on_target_error: on_error(a, "on-target-error")?,
        filter_node_name: if filter {
            a.opt_str("filter-node-name")?
        } else {
            None
        },
        write_blocking: a.opt_enum("copy-mode", &["background", "write-blocking"])?
            == Some("write-blocking"),
    };
    let opts = crate::control::jobs::JobOpts {
        job_id: a.opt_str("job-id")?,
        speed: a.opt_int("speed")?.unwrap_or(0),
        on_error: on_error(a, "on-source-error")?,
        auto_finalize: a.opt_bool("auto-finalize")?.unwrap_or(true),
        auto_dismiss: a.opt_bool("auto-dismiss")?.unwrap_or(true),
    };
    Ok((common, opts))
}

/// The arguments every block job command takes.
fn job_opts(a: &mut Args) -> Result<crate::control::jobs::JobOpts, QmpError> {
    let on_error = match a.opt_enum("on-error", &["report", "ignore", "enospc", "stop"])? {
        Some("ignore") => crate::config::OnError::Ignore,
        Some("enospc") => crate::config::OnError::Enospc,
        Some("stop") => crate::config::OnError::Stop,
        _ => crate::config::OnError::Report,
    };
    // Accepted as QEMU's; vubd's jobs insert no filter node.
    a.opt_str("filter-node-name")?;
    Ok(crate::control::jobs::JobOpts {
        job_id: a.opt_str("job-id")?,
        speed: a.opt_int("speed")?.unwrap_or(0),
        on_error,
        auto_finalize: a.opt_bool("auto-finalize")?.unwrap_or(true),
        auto_dismiss: a.opt_bool("auto-dismiss")?.unwrap_or(true),
    })
}

/// QEMU's `BackupCommon` members, in schema order (the target is read after them).
pub(super) fn backup_args(
    a: &mut Args,
) -> Result<(crate::control::BackupArgs, crate::control::jobs::JobOpts), QmpError> {
    fn on_error(v: Option<&str>) -> crate::config::OnError {
        match v {
            Some("ignore") => crate::config::OnError::Ignore,
            Some("enospc") => crate::config::OnError::Enospc,
            Some("stop") => crate::config::OnError::Stop,
            _ => crate::config::OnError::Report,
        }
    }
    const ON_ERROR: &[&str] = &["report", "ignore", "enospc", "stop"];
    let job_id = a.opt_str("job-id")?;
    let device = a.str("device")?;
    let sync = a
        .opt_enum("sync", &["top", "full", "none", "incremental", "bitmap"])?
        .ok_or_else(|| QmpError::generic("Parameter 'sync' is missing"))?;
    let speed = a.opt_int("speed")?.unwrap_or(0);
    let bitmap = a.opt_str("bitmap")?;
    let bitmap_mode = a.opt_enum("bitmap-mode", &["on-success", "never", "always"])?;
    let compress = a.opt_bool("compress")?.unwrap_or(false);
    let on_source_error = on_error(a.opt_enum("on-source-error", ON_ERROR)?);
    let on_target_error = on_error(a.opt_enum("on-target-error", ON_ERROR)?);
    let auto_finalize = a.opt_bool("auto-finalize")?.unwrap_or(true);
    let auto_dismiss = a.opt_bool("auto-dismiss")?.unwrap_or(true);
    let filter_node_name = a.opt_str("filter-node-name")?;
    let mut perf = crate::control::BackupPerf::default();
    if let Some(v) = a.take("x-perf") {
        if !v.is_object() {
            return Err(QmpError::generic(
                "Invalid parameter type for 'x-perf', expected: object",
            ));
        }
        let mut p = Args::nested(&v, &a.full("x-perf"));
        if let Some(b) = p.opt_bool("use-copy-range")? {
            perf.use_copy_range = b;
        }
        if let Some(n) = p.opt_int("max-workers")? {
            perf.max_workers = n;
        }
        if let Some(n) = p.opt_int("max-chunk")? {
            perf.max_chunk = n;
        }
        p.finish()?;
    }
    Ok((
        crate::control::BackupArgs {
            device,
            target: String::new(),
            sync,
            bitmap,
            bitmap_mode,
            compress,
            on_source_error,
            on_target_error,
            filter_node_name,
            perf,
        },
        crate::control::jobs::JobOpts {
            job_id,
            speed,
            on_error: crate::config::OnError::Report,
            auto_finalize,
            auto_dismiss,
        },
    ))
}

fn ok() -> QmpResult {
    Ok(json!({}))
}

/// A command's arguments, as the schema declares them.
pub enum Arguments {
    /// Members of the command's own argument type (`q_obj_NAME-arg`), checked by
    /// [`args::check`] before the handler runs.
    Members(&'static [Member]),
    /// A named union type whose parser (called by the handler) checks them.
    Boxed(&'static str),
}

/// Runs a command: the control plane, the arguments (checked against the schema
/// when they are [`Arguments::Members`]) and the raw arguments.
pub type Handler = fn(&mut Control, Args, &Value) -> QmpResult;

/// One row of the command table.
pub struct CommandDef {
    pub name: &'static str,
    pub args: Arguments,
    /// The return type (a type name, `[T]`, or [`schema::EMPTY`] for `{}`).
    pub ret: &'static str,
    /// QAPI features (`deprecated`); `x-` commands also get `unstable`.
    pub features: &'static [&'static str],
    pub handler: Handler,
}

const NONE: Arguments = Arguments::Members(&[]);
/// Commands QEMU 7.2 marks deprecated (vubd has them as QEMU does).
const DEPRECATED: &[&str] = &["deprecated"];
const EMPTY: &str = schema::EMPTY;

const JOB_ID: &[Member] = &[("id", "str")];
const BLOCK_JOB_DEVICE: &[Member] = &[("device", "str")];

/// Job commands that take `{"id": ...}` (QEMU's `job-*`), block job ones that take
/// `{"device": ...}`, and the verb each runs.
fn job_verb(ctl: &mut Control, name: &str, id: &str) -> QmpResult {
    match name {
        "job-pause" => ctl.job_pause(id, false)?,
        "job-resume" => ctl.job_resume(id, false)?,
        "job-complete" => ctl.job_complete(id, false)?,
        "job-finalize" => ctl.job_finalize(id, false)?,
        "job-cancel" => ctl.job_cancel(id, true, false)?,
        "job-dismiss" => ctl.dismiss_job(id)?,
        "block-job-pause" => ctl.job_pause(id, true)?,
        "block-job-resume" => ctl.job_resume(id, true)?,
        "block-job-complete" => ctl.job_complete(id, true)?,
        "block-job-finalize" => ctl.job_finalize(id, true)?,
        _ => ctl.job_dismiss(id, true)?,
    }
    ok()
}

macro_rules! job_command {
    ($name:literal, $member:literal, $members:expr) => {
        CommandDef {
            name: $name,
            args: Arguments::Members($members),
            ret: EMPTY,
            features: &[],
            handler: |ctl, mut a, _| {
                let id = a.str($member)?;
                a.finish()?;
                job_verb(ctl, $name, &id)
            },
        }
    };
}

macro_rules! transaction_command {
    ($name:literal, $members:expr) => {
        transaction_command!($name, $members, &[])
    };
    ($name:literal, $members:expr, $features:expr) => {
        CommandDef {
            name: $name,
            args: Arguments::Members($members),
            ret: EMPTY,
            features: $features,
            handler: |ctl, a, _| super::transaction::execute_single(ctl, $name, a),
        }
    };
}

macro_rules! bitmap_command {
    ($name:literal, $members:expr, $ret:expr) => {
        CommandDef {
            name: $name,
            args: Arguments::Members($members),
            ret: $ret,
            features: &[],
            handler: |ctl, a, _| super::bitmap_commands::execute(ctl, $name, a),
        }
    };
}

/// Every command, in the order `query-commands` lists them.
pub const COMMANDS: &[CommandDef] = &[
    CommandDef {
        name: "qmp_capabilities",
        args: Arguments::Members(&[("*enable", "[QMPCapability]")]),
        ret: EMPTY,
        features: &[],
        // Negotiation is the connection's business (server.rs); once it is done,
        // the command is refused there.
        handler: |_, _, _| {
            Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            ))
        },
    },
    CommandDef {
        name: "query-version",
        args: NONE,
        ret: "VersionInfo",
        features: &[],
        handler: |_, a, _| {
            a.finish()?;
            Ok(json!({
                "qemu": { "major": QEMU_VERSION.0, "minor": QEMU_VERSION.1, "micro": QEMU_VERSION.2 },
                "package": format!("vubd {}", env!("CARGO_PKG_VERSION")),
            }))
        },
    },
    CommandDef {
        name: "query-commands",
        args: NONE,
        ret: "[CommandInfo]",
        features: &[],
        handler: |_, a, _| {
            a.finish()?;
            Ok(Value::Array(
                COMMANDS.iter().map(|c| json!({ "name": c.name })).collect(),
            ))
        },
    },
    CommandDef {
        name: "query-qmp-schema",
        args: NONE,
        ret: "[SchemaInfo]",
        features: &[],
        handler: |_, a, _| {
            a.finish()?;
            Ok(schema::introspect())
        },
    },
    CommandDef {
        name: "query-named-block-nodes",
        args: Arguments::Members(&[("*flat", "bool")]),
        ret: "[BlockDeviceInfo]",
        features: &[],
        handler: |ctl, mut a, _| {
            let flat = a.opt_bool("flat")?.unwrap_or(false);
            a.finish()?;
            Ok(to_json(&ctl.query_named_block_nodes(flat)))
        },
    },
    CommandDef {
        name: "query-block-exports",
        args: NONE,
        ret: "[BlockExportInfo]",
        features: &[],
        handler: |ctl, a, _| {
            a.finish()?;
            Ok(to_json(&ctl.query_block_exports()))
        },
    },
    CommandDef {
        name: "query-iothreads",
        args: NONE,
        ret: "[IOThreadInfo]",
        features: &[],
        handler: |ctl, a, _| {
            a.finish()?;
            Ok(to_json(&ctl.query_iothreads()))
        },
    },
    CommandDef {
        name: "query-blockstats",
        args: Arguments::Members(&[("*query-nodes", "bool")]),
        ret: "[BlockStats]",
        features: &[],
        handler: |ctl, mut a, _| {
            let query_nodes = a.opt_bool("query-nodes")?.unwrap_or(false);
            a.finish()?;
            Ok(to_json(&ctl.query_blockstats(query_nodes)))
        },
    },
    CommandDef {
        name: "blockdev-add",
        args: Arguments::Boxed("BlockdevOptions"),
        ret: EMPTY,
        features: &[],
        handler: |ctl, _, arguments| {
            let opts = BlockdevOptions::from_qmp(arguments)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            ctl.add_blockdev(&opts)?;
            ok()
        },
    },
    CommandDef {
        name: "blockdev-del",
        args: Arguments::Members(&[("node-name", "str")]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let node = a.str("node-name")?;
            a.finish()?;
            ctl.del_blockdev(&node)?;
            ok()
        },
    },
    CommandDef {
        name: "blockdev-reopen",
        args: Arguments::Members(&[("options", "[BlockdevOptions]")]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let list = match a.take("options") {
                Some(Value::Array(items)) => items,
                _ => return Err(QmpError::generic("Parameter 'options' is missing")),
            };
            a.finish()?;
            let list = list
                .iter()
                .enumerate()
                .map(|(i, v)| BlockdevOptions::from_qmp_at(v, &format!("options[{i}]")))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| match e {
                    // QEMU's reopen checks this itself, with the bare text.
                    OptionsError::BadValue { name, reason } if name.ends_with("detect-zeroes") => {
                        QmpError::generic(reason)
                    }
                    e => QmpError::generic(e.to_string()),
                })?;
            ctl.blockdev_reopen(&list)?;
            ok()
        },
    },
    CommandDef {
        name: "block-export-add",
        args: Arguments::Boxed("BlockExportOptions"),
        ret: EMPTY,
        features: &[],
        handler: |ctl, _, arguments| {
            let cfg =
                ExportConfig::from_qmp(arguments).map_err(|e| QmpError::generic(e.to_string()))?;
            ctl.add_export(&cfg)?;
            ok()
        },
    },
    CommandDef {
        name: "block-export-del",
        args: Arguments::Members(&[("id", "str"), ("*mode", "BlockExportRemoveMode")]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let id = a.str("id")?;
            let hard = a.opt_enum("mode", &["safe", "hard"])? == Some("hard");
            a.finish()?;
            ctl.del_export(&id, hard)?;
            ok()
        },
    },
    CommandDef {
        name: "nbd-server-start",
        args: Arguments::Members(&[
            ("addr", "SocketAddressLegacy"),
            ("*tls-creds", "str"),
            ("*tls-authz", "str"),
            ("*max-connections", "uint32"),
        ]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let cfg = super::nbd_commands::server_start(&mut a)?;
            a.finish()?;
            ctl.nbd_server_start(&cfg)?;
            ok()
        },
    },
    CommandDef {
        name: "nbd-server-add",
        args: Arguments::Members(&[
            ("device", "str"),
            ("*name", "str"),
            ("*description", "str"),
            ("*writable", "bool"),
            ("*bitmap", "str"),
        ]),
        ret: EMPTY,
        features: DEPRECATED,
        handler: |ctl, mut a, _| {
            let add = crate::control::nbd::NbdServerAdd {
                device: a.str("device")?,
                name: a.opt_str("name")?,
                description: a.opt_str("description")?,
                writable: a.opt_bool("writable")?.unwrap_or(false),
                bitmap: a.opt_str("bitmap")?,
            };
            a.finish()?;
            ctl.nbd_server_add(add)?;
            ok()
        },
    },
    CommandDef {
        name: "nbd-server-remove",
        args: Arguments::Members(&[("name", "str"), ("*mode", "BlockExportRemoveMode")]),
        ret: EMPTY,
        features: DEPRECATED,
        handler: |ctl, mut a, _| {
            let name = a.str("name")?;
            let hard = a.opt_enum("mode", &["safe", "hard"])? == Some("hard");
            a.finish()?;
            ctl.nbd_server_remove(&name, hard)?;
            ok()
        },
    },
    CommandDef {
        name: "nbd-server-stop",
        args: NONE,
        ret: EMPTY,
        features: &[],
        handler: |ctl, a, _| {
            a.finish()?;
            ctl.nbd_server_stop()?;
            ok()
        },
    },
    CommandDef {
        name: "object-add",
        args: Arguments::Boxed("ObjectOptions"),
        ret: EMPTY,
        features: &[],
        handler: |ctl, _, arguments| {
            let object =
                ObjectConfig::from_qmp(arguments).map_err(|e| QmpError::generic(e.to_string()))?;
            ctl.add_object(object)?;
            ok()
        },
    },
    CommandDef {
        name: "object-del",
        args: Arguments::Members(&[("id", "str")]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let id = a.str("id")?;
            a.finish()?;
            ctl.del_object(&id)?;
            ok()
        },
    },
    CommandDef {
        name: "x-blockdev-set-iothread",
        args: Arguments::Members(&[
            ("node-name", "str"),
            ("iothread", "StrOrNull"),
            ("*force", "bool"),
        ]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let node = a.str("node-name")?;
            let iothread = a.str_or_null("iothread")?;
            let force = a.opt_bool("force")?.unwrap_or(false);
            a.finish()?;
            ctl.set_iothread(&node, iothread.as_deref(), force)?;
            ok()
        },
    },
    CommandDef {
        name: "qom-list",
        args: Arguments::Members(&[("path", "str")]),
        ret: "[ObjectPropertyInfo]",
        features: &[],
        handler: |ctl, a, _| super::qom_commands::execute(ctl, "qom-list", a),
    },
    CommandDef {
        name: "qom-get",
        args: Arguments::Members(&[("path", "str"), ("property", "str")]),
        ret: "any",
        features: &[],
        handler: |ctl, a, _| super::qom_commands::execute(ctl, "qom-get", a),
    },
    CommandDef {
        name: "qom-set",
        args: Arguments::Members(&[("path", "str"), ("property", "str"), ("value", "any")]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, a, _| super::qom_commands::execute(ctl, "qom-set", a),
    },
    CommandDef {
        name: "qom-list-types",
        args: Arguments::Members(&[("*implements", "str"), ("*abstract", "bool")]),
        ret: "[ObjectTypeInfo]",
        features: &[],
        handler: |ctl, a, _| super::qom_commands::execute(ctl, "qom-list-types", a),
    },
    CommandDef {
        name: "qom-list-properties",
        args: Arguments::Members(&[("typename", "str")]),
        ret: "[ObjectPropertyInfo]",
        features: &[],
        handler: |ctl, a, _| super::qom_commands::execute(ctl, "qom-list-properties", a),
    },
    CommandDef {
        name: "block_resize",
        args: Arguments::Members(&[("*device", "str"), ("*node-name", "str"), ("size", "int")]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let device = a.opt_str("device")?;
            let node = a.opt_str("node-name")?;
            let size = a.int("size")?;
            a.finish()?;
            if size < 0 {
                return Err(QmpError::generic("Parameter 'size' expects a >0 size"));
            }
            let Some(node) = node else {
                return Err(QmpError::generic(format!(
                    "Cannot find device='{}' nor node-name=''",
                    device.unwrap_or_default()
                )));
            };
            ctl.resize(&node, size as u64)?;
            ok()
        },
    },
    transaction_command!(
        "blockdev-snapshot-internal-sync",
        schema::BLOCKDEV_SNAPSHOT_INTERNAL
    ),
    CommandDef {
        name: "blockdev-snapshot-delete-internal-sync",
        args: Arguments::Members(&[("device", "str"), ("*id", "str"), ("*name", "str")]),
        ret: "SnapshotInfo",
        features: &[],
        handler: |ctl, mut a, _| {
            let device = a.str("device")?;
            let id = a.opt_str("id")?;
            let name = a.opt_str("name")?;
            a.finish()?;
            let snap = ctl.snapshot_delete_internal(&device, id.as_deref(), name.as_deref())?;
            Ok(to_json(&snap))
        },
    },
    CommandDef {
        name: "blockdev-create",
        args: Arguments::Members(&[("job-id", "str"), ("options", "BlockdevCreateOptions")]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let job_id = a.str("job-id")?;
            let options = a.object("options")?;
            a.finish()?;
            ctl.blockdev_create(&job_id, &options)?;
            ok()
        },
    },
    CommandDef {
        name: "x-blockdev-amend",
        args: Arguments::Members(&[
            ("job-id", "str"),
            ("node-name", "str"),
            ("options", "BlockdevAmendOptions"),
            ("*force", "bool"),
        ]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let job_id = a.str("job-id")?;
            let node = a.str("node-name")?;
            let options = a.object("options")?;
            let force = a.opt_bool("force")?.unwrap_or(false);
            a.finish()?;
            ctl.blockdev_amend(&job_id, &node, &options, force)?;
            ok()
        },
    },
    CommandDef {
        name: "query-jobs",
        args: NONE,
        ret: "[JobInfo]",
        features: &[],
        handler: |ctl, a, _| {
            a.finish()?;
            Ok(to_json(&ctl.query_jobs()))
        },
    },
    job_command!("job-dismiss", "id", JOB_ID),
    job_command!("job-pause", "id", JOB_ID),
    job_command!("job-resume", "id", JOB_ID),
    job_command!("job-cancel", "id", JOB_ID),
    job_command!("job-complete", "id", JOB_ID),
    job_command!("job-finalize", "id", JOB_ID),
    CommandDef {
        name: "query-block-jobs",
        args: NONE,
        ret: "[BlockJobInfo]",
        features: &[],
        handler: |ctl, a, _| {
            a.finish()?;
            Ok(to_json(&ctl.query_block_jobs()))
        },
    },
    CommandDef {
        name: "block-job-cancel",
        args: Arguments::Members(&[("device", "str"), ("*force", "bool")]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let id = a.str("device")?;
            let force = a.opt_bool("force")?.unwrap_or(false);
            a.finish()?;
            ctl.job_cancel(&id, force, true)?;
            ok()
        },
    },
    job_command!("block-job-complete", "device", BLOCK_JOB_DEVICE),
    job_command!("block-job-dismiss", "id", JOB_ID),
    job_command!("block-job-finalize", "id", JOB_ID),
    job_command!("block-job-pause", "device", BLOCK_JOB_DEVICE),
    job_command!("block-job-resume", "device", BLOCK_JOB_DEVICE),
    CommandDef {
        name: "block-job-set-speed",
        args: Arguments::Members(&[("device", "str"), ("speed", "int")]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let id = a.str("device")?;
            let speed = a.int("speed")?;
            a.finish()?;
            ctl.job_set_speed(&id, speed)?;
            ok()
        },
    },
    CommandDef {
        name: "block-stream",
        args: Arguments::Members(&schema::concat::<11>(
            &[
                ("*job-id", "str"),
                ("device", "str"),
                ("*base", "str"),
                ("*base-node", "str"),
                ("*backing-file", "str"),
                ("*bottom", "str"),
            ],
            schema::JOB_OPTIONS,
        )),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let args = crate::control::jobs::StreamArgs {
                device: a.str("device")?,
                base: a.opt_str("base")?,
                base_node: a.opt_str("base-node")?,
                bottom: a.opt_str("bottom")?,
                backing_file: a.opt_str("backing-file")?,
            };
            let opts = job_opts(&mut a)?;
            a.finish()?;
            ctl.block_stream(args, opts)?;
            ok()
        },
    },
    CommandDef {
        name: "block-commit",
        args: Arguments::Members(&schema::concat::<12>(
            &[
                ("*job-id", "str"),
                ("device", "str"),
                ("*base-node", "str"),
                ("*base", "str"),
                ("*top-node", "str"),
                ("*top", "str"),
                ("*backing-file", "str"),
            ],
            schema::JOB_OPTIONS,
        )),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let args = crate::control::jobs::CommitArgs {
                device: a.str("device")?,
                base_node: a.opt_str("base-node")?,
                base: a.opt_str("base")?,
                top_node: a.opt_str("top-node")?,
                top: a.opt_str("top")?,
                backing_file: a.opt_str("backing-file")?,
            };
            let opts = job_opts(&mut a)?;
            a.finish()?;
            ctl.block_commit(args, opts)?;
            ok()
        },
    },
    transaction_command!("blockdev-backup", schema::BLOCKDEV_BACKUP),
    transaction_command!("drive-backup", schema::DRIVE_BACKUP, DEPRECATED),
    CommandDef {
        name: "blockdev-mirror",
        args: Arguments::Members(&[
            ("*job-id", "str"),
            ("device", "str"),
            ("target", "str"),
            ("*replaces", "str"),
            ("sync", "MirrorSyncMode"),
            ("*speed", "int"),
            ("*granularity", "uint32"),
            ("*buf-size", "int"),
            ("*on-source-error", "BlockdevOnError"),
            ("*on-target-error", "BlockdevOnError"),
            ("*filter-node-name", "str"),
            ("*copy-mode", "MirrorCopyMode"),
            ("*auto-finalize", "bool"),
            ("*auto-dismiss", "bool"),
        ]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let device = a.str("device")?;
            let target = a.str("target")?;
            let (common, opts) = mirror_args(&mut a, true)?;
            a.finish()?;
            ctl.blockdev_mirror(&device, &target, common, opts)?;
            ok()
        },
    },
    CommandDef {
        name: "drive-mirror",
        args: Arguments::Members(&[
            ("*job-id", "str"),
            ("device", "str"),
            ("target", "str"),
            ("*format", "str"),
            ("*node-name", "str"),
            ("*replaces", "str"),
            ("sync", "MirrorSyncMode"),
            ("*mode", "NewImageMode"),
            ("*speed", "int"),
            ("*granularity", "uint32"),
            ("*buf-size", "int"),
            ("*on-source-error", "BlockdevOnError"),
            ("*on-target-error", "BlockdevOnError"),
            ("*unmap", "bool"),
            ("*copy-mode", "MirrorCopyMode"),
            ("*auto-finalize", "bool"),
            ("*auto-dismiss", "bool"),
        ]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let d = crate::control::mirror::DriveMirror {
                device: a.str("device")?,
                target: a.str("target")?,
                format: a.opt_str("format")?,
                node_name: a.opt_str("node-name")?,
                existing: a.opt_enum("mode", &["existing", "absolute-paths"])? == Some("existing"),
            };
            let unmap = a.opt_bool("unmap")?.unwrap_or(true);
            let (mut common, opts) = mirror_args(&mut a, false)?;
            common.unmap = unmap;
            a.finish()?;
            ctl.drive_mirror(d, common, opts)?;
            ok()
        },
    },
    transaction_command!("blockdev-snapshot", schema::BLOCKDEV_SNAPSHOT),
    transaction_command!("blockdev-snapshot-sync", schema::BLOCKDEV_SNAPSHOT_SYNC),
    CommandDef {
        name: "change-backing-file",
        args: Arguments::Members(&[
            ("device", "str"),
            ("image-node-name", "str"),
            ("backing-file", "str"),
        ]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let device = a.str("device")?;
            let image = a.str("image-node-name")?;
            let backing = a.str("backing-file")?;
            a.finish()?;
            ctl.change_backing_file(&device, &image, &backing)?;
            ok()
        },
    },
    CommandDef {
        name: "block-set-write-threshold",
        args: Arguments::Members(&[("node-name", "str"), ("write-threshold", "uint64")]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let node = a.str("node-name")?;
            let t = a.uint("write-threshold")?;
            a.finish()?;
            ctl.set_write_threshold(&node, t)?;
            ok()
        },
    },
    bitmap_command!("block-dirty-bitmap-add", schema::BITMAP_ADD, EMPTY),
    bitmap_command!("block-dirty-bitmap-remove", schema::BITMAP, EMPTY),
    bitmap_command!("block-dirty-bitmap-clear", schema::BITMAP, EMPTY),
    bitmap_command!("block-dirty-bitmap-enable", schema::BITMAP, EMPTY),
    bitmap_command!("block-dirty-bitmap-disable", schema::BITMAP, EMPTY),
    bitmap_command!("block-dirty-bitmap-merge", schema::BITMAP_MERGE, EMPTY),
    bitmap_command!(
        "x-debug-block-dirty-bitmap-sha256",
        schema::BITMAP,
        "BlockDirtyBitmapSha256"
    ),
    CommandDef {
        name: "transaction",
        args: Arguments::Members(&[
            ("actions", "[TransactionAction]"),
            ("*properties", "TransactionProperties"),
        ]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, a, _| super::transaction::execute(ctl, a),
    },
    CommandDef {
        name: "x-debug-query-block-graph",
        args: NONE,
        ret: "XDbgBlockGraph",
        features: &[],
        handler: |ctl, a, _| {
            a.finish()?;
            Ok(to_json(&ctl.query_block_graph()))
        },
    },
    CommandDef {
        name: "cont",
        args: NONE,
        ret: EMPTY,
        features: &[],
        handler: |ctl, a, _| {
            a.finish()?;
            ctl.cont(None)?;
            ok()
        },
    },
    CommandDef {
        name: "x-block-export-cont",
        args: Arguments::Members(&[("id", "str")]),
        ret: EMPTY,
        features: &[],
        handler: |ctl, mut a, _| {
            let id = a.str("id")?;
            a.finish()?;
            ctl.cont(Some(&id))?;
            ok()
        },
    },
    CommandDef {
        name: "quit",
        args: NONE,
        ret: EMPTY,
        features: &[],
        handler: |_, a, _| {
            a.finish()?;
            ok()
        },
    },
];

/// The table row of a command.
pub fn find(name: &str) -> Option<&'static CommandDef> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// Runs one command (capabilities negotiation is the connection's business).
pub fn execute(ctl: &mut Control, name: &str, arguments: &Value) -> QmpResult {
    let Some(cmd) = find(name) else {
        return Err(QmpError::new(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        ));
    };
    let a = match cmd.args {
        Arguments::Members(members) => {
            args::check(members, arguments)?;
            Args::declared(arguments, members)
        }
        Arguments::Boxed(_) => Args::new(arguments),
    };
    (cmd.handler)(ctl, a, arguments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for c in COMMANDS {
            assert!(seen.insert(c.name), "{} listed twice", c.name);
        }
    }
}

//! The QMP commands vubd implements, with QEMU 7.2's names, arguments and results.
//! Each reads its arguments strictly (see [`Args`]) and calls the control plane.

use super::args::Args;
use super::wire::{ErrorClass, QmpError, QmpResult, QEMU_VERSION};
use crate::config::{ExportConfig, ObjectConfig};
use crate::control::Control;
use blocklayer::options::{BlockdevOptions, OptionsError};
use serde_json::{json, Value};

/// Every command, in the order `query-commands` lists them.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-named-block-nodes",
    "query-block-exports",
    "query-iothreads",
    "query-blockstats",
    "blockdev-add",
    "blockdev-del",
    "blockdev-reopen",
    "block-export-add",
    "block-export-del",
    "nbd-server-start",
    "nbd-server-add",
    "nbd-server-remove",
    "nbd-server-stop",
    "object-add",
    "object-del",
    "x-blockdev-set-iothread",
    "qom-list",
    "qom-get",
    "qom-set",
    "qom-list-types",
    "qom-list-properties",
    "block_resize",
    "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-delete-internal-sync",
    "blockdev-create",
    "x-blockdev-amend",
    "query-jobs",
    "job-dismiss",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-complete",
    "job-finalize",
    "query-block-jobs",
    "block-job-cancel",
    "block-job-complete",
    "block-job-dismiss",
    "block-job-finalize",
    "block-job-pause",
    "block-job-resume",
    "block-job-set-speed",
    "block-stream",
    "block-commit",
    "blockdev-backup",
    "drive-backup",
    "blockdev-mirror",
    "drive-mirror",
    "blockdev-snapshot",
    "blockdev-snapshot-sync",
    "change-backing-file",
    "block-set-write-threshold",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "x-debug-block-dirty-bitmap-sha256",
    "transaction",
    "x-debug-query-block-graph",
    "cont",
    "x-block-export-cont",
    "quit",
];

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

/// Runs one command (capabilities negotiation is the connection's business).
pub fn execute(ctl: &mut Control, name: &str, arguments: &Value) -> QmpResult {
    let mut a = Args::new(arguments);
    match name {
        "query-version" => {
            a.finish()?;
            Ok(json!({
                "qemu": { "major": QEMU_VERSION.0, "minor": QEMU_VERSION.1, "micro": QEMU_VERSION.2 },
                "package": format!("vubd {}", env!("CARGO_PKG_VERSION")),
            }))
        }
        "query-commands" => {
            a.finish()?;
            Ok(Value::Array(
                COMMANDS.iter().map(|c| json!({ "name": c })).collect(),
            ))
        }
        "query-named-block-nodes" => {
            let flat = a.opt_bool("flat")?.unwrap_or(false);
            a.finish()?;
            Ok(ctl.query_named_block_nodes(flat))
        }
        "query-block-exports" => {
            a.finish()?;
            Ok(ctl.query_block_exports())
        }
        "query-iothreads" => {
            a.finish()?;
            Ok(ctl.query_iothreads())
        }
        "query-blockstats" => {
            let query_nodes = a.opt_bool("query-nodes")?.unwrap_or(false);
            a.finish()?;
            Ok(ctl.query_blockstats(query_nodes))
        }
        "blockdev-add" => {
            let opts = BlockdevOptions::from_qmp(arguments)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            ctl.add_blockdev(&opts)?;
            ok()
        }
        "blockdev-reopen" => {
            let list = match a.take("options") {
                None => return Err(QmpError::generic("Parameter 'options' is missing")),
                Some(Value::Array(items)) => items,
                Some(_) => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'options', expected: array",
                    ))
                }
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
        }
        "blockdev-del" => {
            let node = a.str("node-name")?;
            a.finish()?;
            ctl.del_blockdev(&node)?;
            ok()
        }
        "block-export-add" => {
            let cfg =
                ExportConfig::from_qmp(arguments).map_err(|e| QmpError::generic(e.to_string()))?;
            ctl.add_export(&cfg)?;
            ok()
        }
        "block-export-del" => {
            let id = a.str("id")?;
            let hard = a.opt_enum("mode", &["safe", "hard"])? == Some("hard");
            a.finish()?;
            ctl.del_export(&id, hard)?;
            ok()
        }
        "nbd-server-start" => {
            let cfg = super::nbd_commands::server_start(&mut a)?;
            a.finish()?;
            ctl.nbd_server_start(&cfg)?;
            ok()
        }
        "nbd-server-add" => {
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
        }
        "nbd-server-remove" => {
            let name = a.str("name")?;
            let hard = a.opt_enum("mode", &["safe", "hard"])? == Some("hard");
            a.finish()?;
            ctl.nbd_server_remove(&name, hard)?;
            ok()
        }
        "nbd-server-stop" => {
            a.finish()?;
            ctl.nbd_server_stop()?;
            ok()
        }
        "object-add" => {
            let object =
                ObjectConfig::from_qmp(arguments).map_err(|e| QmpError::generic(e.to_string()))?;
            ctl.add_object(object)?;
            ok()
        }
        "object-del" => {
            let id = a.str("id")?;
            a.finish()?;
            ctl.del_object(&id)?;
            ok()
        }
        "x-blockdev-set-iothread" => {
            let node = a.str("node-name")?;
            let iothread = a.str_or_null("iothread")?;
            let force = a.opt_bool("force")?.unwrap_or(false);
            a.finish()?;
            ctl.set_iothread(&node, iothread.as_deref(), force)?;
            ok()
        }
        "block_resize" => {
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
        }
        "blockdev-snapshot-delete-internal-sync" => {
            let device = a.str("device")?;
            let id = a.opt_str("id")?;
            let name = a.opt_str("name")?;
            a.finish()?;
            let snap = ctl.snapshot_delete_internal(&device, id.as_deref(), name.as_deref())?;
            Ok(snap.to_qmp())
        }
        "x-blockdev-amend" => {
            let job_id = a.str("job-id")?;
            let node = a.str("node-name")?;
            let options = a.object("options")?;
            let force = a.opt_bool("force")?.unwrap_or(false);
            a.finish()?;
            ctl.blockdev_amend(&job_id, &node, &options, force)?;
            ok()
        }
        "blockdev-create" => {
            let job_id = a.str("job-id")?;
            let options = a.object("options")?;
            a.finish()?;
            ctl.blockdev_create(&job_id, &options)?;
            ok()
        }
        "query-jobs" => {
            a.finish()?;
            Ok(ctl.query_jobs())
        }
        "job-dismiss" => {
            let id = a.str("id")?;
            a.finish()?;
            ctl.dismiss_job(&id)?;
            ok()
        }
        "job-pause" | "job-resume" | "job-complete" | "job-finalize" | "job-cancel" => {
            let id = a.str("id")?;
            a.finish()?;
            match name {
                "job-pause" => ctl.job_pause(&id, false)?,
                "job-resume" => ctl.job_resume(&id, false)?,
                "job-complete" => ctl.job_complete(&id, false)?,
                "job-finalize" => ctl.job_finalize(&id, false)?,
                _ => ctl.job_cancel(&id, true, false)?,
            }
            ok()
        }
        "query-block-jobs" => {
            a.finish()?;
            Ok(ctl.query_block_jobs())
        }
        "block-job-cancel" => {
            let id = a.str("device")?;
            let force = a.opt_bool("force")?.unwrap_or(false);
            a.finish()?;
            ctl.job_cancel(&id, force, true)?;
            ok()
        }
        "block-job-pause" | "block-job-resume" | "block-job-complete" => {
            let id = a.str("device")?;
            a.finish()?;
            match name {
                "block-job-pause" => ctl.job_pause(&id, true)?,
                "block-job-resume" => ctl.job_resume(&id, true)?,
                _ => ctl.job_complete(&id, true)?,
            }
            ok()
        }
        "block-job-finalize" | "block-job-dismiss" => {
            let id = a.str("id")?;
            a.finish()?;
            if name == "block-job-finalize" {
                ctl.job_finalize(&id, true)?;
            } else {
                ctl.job_dismiss(&id, true)?;
            }
            ok()
        }
        "block-job-set-speed" => {
            let id = a.str("device")?;
            let speed = a.int("speed")?;
            a.finish()?;
            ctl.job_set_speed(&id, speed)?;
            ok()
        }
        "block-stream" => {
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
        }
        "block-commit" => {
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
        }
        "blockdev-mirror" => {
            let device = a.str("device")?;
            let target = a.str("target")?;
            let (common, opts) = mirror_args(&mut a, true)?;
            a.finish()?;
            ctl.blockdev_mirror(&device, &target, common, opts)?;
            ok()
        }
        "drive-mirror" => {
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
        }
        n if super::transaction::SINGLE.contains(&n) => {
            super::transaction::execute_single(ctl, n, a)
        }
        "transaction" => super::transaction::execute(ctl, a),
        "change-backing-file" => {
            let device = a.str("device")?;
            let image = a.str("image-node-name")?;
            let backing = a.str("backing-file")?;
            a.finish()?;
            ctl.change_backing_file(&device, &image, &backing)?;
            ok()
        }
        "block-set-write-threshold" => {
            let node = a.str("node-name")?;
            let t = a.uint("write-threshold")?;
            a.finish()?;
            ctl.set_write_threshold(&node, t)?;
            ok()
        }
        n if super::bitmap_commands::NAMES.contains(&n) => {
            super::bitmap_commands::execute(ctl, n, a)
        }
        n if super::qom_commands::NAMES.contains(&n) => super::qom_commands::execute(ctl, n, a),
        "x-debug-query-block-graph" => {
            a.finish()?;
            Ok(ctl.query_block_graph())
        }
        "cont" => {
            a.finish()?;
            ctl.cont(None)?;
            ok()
        }
        "x-block-export-cont" => {
            let id = a.str("id")?;
            a.finish()?;
            ctl.cont(Some(&id))?;
            ok()
        }
        "quit" => {
            a.finish()?;
            ok()
        }
        other => Err(QmpError::new(
            ErrorClass::CommandNotFound,
            format!("The command {other} has not been found"),
        )),
    }
}

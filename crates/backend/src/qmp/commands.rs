//! The QMP commands vubd implements, with QEMU 7.2's names, arguments and results.
//! Each reads its arguments strictly (see [`Args`]) and calls the control plane.

use super::args::Args;
use super::wire::{ErrorClass, QmpError, QmpResult, QEMU_VERSION};
use crate::config::{ExportConfig, ObjectConfig};
use crate::control::Control;
use blocklayer::options::BlockdevOptions;
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
    "block-export-add",
    "block-export-del",
    "object-add",
    "object-del",
    "x-blockdev-set-iothread",
    "block_resize",
    "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-delete-internal-sync",
    "blockdev-create",
    "query-jobs",
    "job-dismiss",
    "cont",
    "x-block-export-cont",
    "quit",
];

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
            // Checked, and without effect (see Control::del_export).
            a.opt_enum("mode", &["safe", "hard"])?;
            a.finish()?;
            ctl.del_export(&id)?;
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
        "blockdev-snapshot-internal-sync" => {
            let device = a.str("device")?;
            let name = a.str("name")?;
            a.finish()?;
            ctl.snapshot_internal(&device, &name)?;
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
        "blockdev-create" => {
            let job_id = a.str("job-id")?;
            let options = match a.take("options") {
                Some(v @ Value::Object(_)) => v,
                Some(_) => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'options', expected: object",
                    ))
                }
                None => return Err(QmpError::generic("Parameter 'options' is missing")),
            };
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

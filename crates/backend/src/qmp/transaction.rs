//! `transaction` and the commands QEMU runs as a transaction of one action
//! (blockdev-backup, drive-backup, blockdev-snapshot, blockdev-snapshot-sync,
//! blockdev-snapshot-internal-sync):
//! their arguments read as QEMU 7.2's input visitor reads them, whole paths in the
//! messages (`actions[0].data.node`), then handed to [`crate::control::transaction`].

use super::args::Args;
use super::bitmap_commands;
use super::wire::{QmpError, QmpResult};
use crate::control::graph_ops::SnapshotSync;
use crate::control::transaction::Action;
use crate::control::Control;
use serde_json::{json, Value};

/// The action types (QEMU's `TransactionActionKind`) vubd runs.
pub const ACTIONS: &[&str] = &[
    "abort",
    "blockdev-backup",
    "drive-backup",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-snapshot",
    "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-sync",
];

/// Reads the arguments of an action of type `kind`.
pub fn parse_action(kind: &str, mut a: Args) -> Result<Action, QmpError> {
    let action = match kind {
        "abort" => Action::Abort,
        "blockdev-backup" | "drive-backup" => {
            let (args, opts) = super::commands::backup_args(&mut a)?;
            let args = crate::control::BackupArgs {
                target: a.str("target")?,
                ..args
            };
            let drive = (kind == "drive-backup")
                .then(|| -> Result<_, QmpError> {
                    Ok(crate::control::DriveTarget {
                        format: a.opt_str("format")?,
                        existing: a.opt_enum("mode", &["existing", "absolute-paths"])?
                            == Some("existing"),
                    })
                })
                .transpose()?;
            Action::Backup { args, opts, drive }
        }
        "blockdev-snapshot" => Action::Snapshot {
            node: a.str("node")?,
            overlay: a.str("overlay")?,
        },
        "blockdev-snapshot-sync" => Action::SnapshotSync(SnapshotSync {
            device: a.opt_str("device")?,
            node_name: a.opt_str("node-name")?,
            snapshot_file: a.str("snapshot-file")?,
            snapshot_node_name: a.opt_str("snapshot-node-name")?,
            format: a.opt_str("format")?.unwrap_or_else(|| "qcow2".into()),
            existing: a.opt_enum("mode", &["existing", "absolute-paths"])? == Some("existing"),
        }),
        "blockdev-snapshot-internal-sync" => Action::SnapshotInternal {
            device: a.str("device")?,
            name: a.str("name")?,
        },
        bitmap => return bitmap_commands::parse(bitmap, a).map(Action::Bitmap),
    };
    a.finish()?;
    Ok(action)
}

/// Runs `transaction`.
pub fn execute(ctl: &mut Control, mut a: Args) -> QmpResult {
    let items = match a.take("actions") {
        None => return Err(QmpError::generic("Parameter 'actions' is missing")),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(QmpError::generic(
                "Invalid parameter type for 'actions', expected: array",
            ))
        }
    };
    let mut actions = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("actions[{i}]");
        if !item.is_object() {
            return Err(QmpError::generic(format!(
                "Invalid parameter type for '{at}', expected: object"
            )));
        }
        let mut it = Args::nested(item, &at);
        let kind = it.str("type")?;
        if !ACTIONS.contains(&kind.as_str()) {
            return Err(QmpError::generic(format!(
                "Parameter 'type' does not accept value '{kind}'"
            )));
        }
        let data = it.object("data")?;
        it.finish()?;
        let action = parse_action(&kind, Args::nested(&data, &format!("{at}.data")))?;
        actions.push((kind, action));
    }
    let grouped = match a.take("properties") {
        None => false,
        Some(p @ Value::Object(_)) => {
            let mut p = Args::nested(&p, "properties");
            let mode = p.opt_enum("completion-mode", &["individual", "grouped"])?;
            p.finish()?;
            mode == Some("grouped")
        }
        Some(_) => {
            return Err(QmpError::generic(
                "Invalid parameter type for 'properties', expected: object",
            ))
        }
    };
    a.finish()?;
    ctl.transaction(actions, grouped)?;
    Ok(json!({}))
}

/// Runs a command that is a transaction of one action (of type `kind`), as in QEMU.
pub fn execute_single(ctl: &mut Control, kind: &str, a: Args) -> QmpResult {
    let action = parse_action(kind, a)?;
    ctl.transaction(vec![(kind.to_string(), action)], false)?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_arguments_are_named_by_their_path() {
        let e = |kind: &str, v: Value| {
            parse_action(kind, Args::nested(&v, "actions[2].data"))
                .unwrap_err()
                .desc
        };
        assert_eq!(
            e("blockdev-snapshot", json!({"node": "a"})),
            "Parameter 'actions[2].data.overlay' is missing"
        );
        assert_eq!(
            e("abort", json!({"x": 1})),
            "Parameter 'actions[2].data.x' is unexpected"
        );
        assert_eq!(
            e("block-dirty-bitmap-add", json!({"node": "a", "name": 3})),
            "Invalid parameter type for 'actions[2].data.name', expected: string"
        );
        assert_eq!(
            e(
                "block-dirty-bitmap-merge",
                json!({"node": "a", "target": "b", "bitmaps": [{"node": "n"}]})
            ),
            "Parameter 'actions[2].data.bitmaps[0].name' is missing"
        );
    }

    /// Each action but `abort` is also a command of its own, with the same
    /// arguments.
    #[test]
    fn actions_are_commands() {
        use crate::qmp::commands::{find, Arguments};
        for kind in ACTIONS.iter().filter(|k| **k != "abort") {
            let cmd = find(kind).unwrap_or_else(|| panic!("{kind} is no command"));
            let Arguments::Members(members) = cmd.args else {
                panic!("{kind}: boxed arguments");
            };
            let wrapper = crate::qmp::schema::TYPES
                .iter()
                .find_map(|t| match t {
                    crate::qmp::schema::TypeDef::Union { name, variants, .. }
                        if *name == "TransactionAction" =>
                    {
                        variants.iter().find(|(c, _)| c == kind).map(|(_, t)| *t)
                    }
                    _ => None,
                })
                .unwrap_or_else(|| panic!("{kind} is no TransactionAction"));
            let Some(crate::qmp::schema::TypeDef::Struct { members: w, .. }) =
                crate::qmp::schema::find(wrapper)
            else {
                panic!("{wrapper}");
            };
            let Some(crate::qmp::schema::TypeDef::Struct { members: data, .. }) =
                crate::qmp::schema::find(w[0].1)
            else {
                panic!("{wrapper}.data");
            };
            assert_eq!(*data, members, "{kind}");
        }
    }
}

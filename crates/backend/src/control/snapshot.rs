//! Internal snapshots over QMP: `blockdev-snapshot-internal-sync` and
//! `blockdev-snapshot-delete-internal-sync`, with QEMU 7.2's checks in QEMU's order
//! and its error texts. The node is quiesced (exports paused, node drained) while the
//! image changes, so a snapshot taken under guest I/O is a consistent point in time.

use super::{Control, OpResult};
use crate::control::error::ControlError;
use blocklayer::error::strerror;
use blocklayer::snapshot::{NewSnapshot, SnapshotInfo};
use blocklayer::Node;
use std::sync::Arc;

impl Control {
    /// The node `device` names, which must be a root node (one no other node uses as
    /// a child; exports and nothing else may use it), as QEMU's `qmp_get_root_bs`.
    fn snapshot_root(&self, device: &str) -> OpResult<Arc<Node>> {
        let node = self.graph.get(device).ok_or_else(|| {
            ControlError::generic(format!(
                "Cannot find device='{device}' nor node-name='{device}'"
            ))
        })?;
        if !self.graph.is_root(&node) {
            return Err(ControlError::generic("Need a root block node"));
        }
        Ok(node)
    }

    /// `blockdev-snapshot-internal-sync`: takes an internal snapshot called `name` of
    /// the image of node `device`.
    pub fn snapshot_internal(&mut self, device: &str, name: &str) -> OpResult<()> {
        let node = self.snapshot_root(device)?;
        if node.is_read_only() {
            return Err(ControlError::generic(format!(
                "Device '{device}' is read only"
            )));
        }
        let Ok(existing) = node.driver().snapshot_list() else {
            return Err(ControlError::generic(format!(
                "Block format '{}' used by device '{device}' does not support internal \
                 snapshots",
                node.driver_name()
            )));
        };
        if name.is_empty() {
            return Err(ControlError::generic("Name is empty"));
        }
        if existing.iter().any(|s| s.name == name) {
            return Err(ControlError::generic(format!(
                "Snapshot with name '{name}' already exists on device '{device}'"
            )));
        }
        // There is no guest clock here: the snapshot records 0 as its VM clock, and
        // no instruction count.
        let new = NewSnapshot::now(name);
        let (r, _) = self.drained(&node, || {
            node.driver().snapshot_create(&new).map_err(|e| {
                ControlError::generic(format!(
                    "Failed to create snapshot '{name}' on device '{device}': {}",
                    strerror(e.errno())
                ))
            })
        });
        let snap = r?;
        log::info!(
            "node '{device}': internal snapshot '{}' (id {}) taken",
            snap.name,
            snap.id
        );
        Ok(())
    }

    /// `blockdev-snapshot-delete-internal-sync`: deletes the internal snapshot with
    /// id `id` and name `name` (either may be left out, not both); returns it.
    pub fn snapshot_delete_internal(
        &mut self,
        device: &str,
        id: Option<&str>,
        name: Option<&str>,
    ) -> OpResult<SnapshotInfo> {
        let node = self.snapshot_root(device)?;
        if id.is_none() && name.is_none() {
            return Err(ControlError::generic("Name or id must be provided"));
        }
        let list = node.driver().snapshot_list().map_err(|e| {
            ControlError::generic(format!(
                "Failed to get a snapshot list: {}",
                strerror(e.errno())
            ))
        })?;
        let matches =
            |s: &SnapshotInfo| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n);
        if !list.iter().any(matches) {
            return Err(ControlError::generic(format!(
                "Snapshot with id '{}' and name '{}' does not exist on device '{device}'",
                id.unwrap_or("null"),
                name.unwrap_or("null")
            )));
        }
        if node.is_read_only() {
            // QEMU's words: its attempt to rewrite the snapshot table fails so.
            return Err(ControlError::generic(format!(
                "Failed to remove snapshot from snapshot list: {}",
                strerror(libc::EPERM)
            )));
        }
        let (r, _) = self.drained(&node, || {
            node.driver().snapshot_delete(id, name).map_err(|e| {
                ControlError::generic(format!(
                    "Failed to delete snapshot on device '{device}': {}",
                    strerror(e.errno())
                ))
            })
        });
        let snap = r?;
        log::info!(
            "node '{device}': internal snapshot '{}' (id {}) deleted",
            snap.name,
            snap.id
        );
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::events::EventBus;
    use blocklayer::options::BlockdevOptions;
    use serde_json::json;

    fn control() -> Control {
        let (tx, _rx) = std::sync::mpsc::channel();
        let mut c = Control::new(tx, EventBus::new());
        let add = |c: &mut Control, v: serde_json::Value| {
            c.add_blockdev(&BlockdevOptions::from_json(&v).unwrap())
                .unwrap()
        };
        add(
            &mut c,
            json!({"driver": "null-co", "node-name": "nul", "size": 1 << 20}),
        );
        add(
            &mut c,
            json!({"driver": "raw", "node-name": "r", "file": {"driver": "null-co", "node-name": "rf"}}),
        );
        c
    }

    #[test]
    fn argument_and_node_errors() {
        let mut c = control();
        let desc = |r: OpResult<()>| r.unwrap_err().desc;
        assert_eq!(
            desc(c.snapshot_internal("nope", "s")),
            "Cannot find device='nope' nor node-name='nope'"
        );
        assert_eq!(
            desc(c.snapshot_internal("rf", "s")),
            "Need a root block node"
        );
        assert_eq!(
            desc(c.snapshot_internal("r", "s")),
            "Block format 'raw' used by device 'r' does not support internal snapshots"
        );
        assert_eq!(
            desc(c.snapshot_internal("nul", "")),
            "Block format 'null-co' used by device 'nul' does not support internal snapshots"
        );
        let e = c.snapshot_delete_internal("r", None, None).unwrap_err();
        assert_eq!(e.desc, "Name or id must be provided");
        let e = c
            .snapshot_delete_internal("r", None, Some("s"))
            .unwrap_err();
        assert_eq!(
            e.desc,
            "Failed to get a snapshot list: Operation not supported"
        );
    }
}

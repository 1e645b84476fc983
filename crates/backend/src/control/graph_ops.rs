//! Graph commands: external snapshots (`blockdev-snapshot`, `blockdev-snapshot-sync`),
//! `blockdev-reopen`, `change-backing-file`, `block-set-write-threshold` and
//! `x-debug-query-block-graph`, with QEMU's checks and texts.

use super::{generic, Control, OpResult, DRAIN_TIMEOUT};
use crate::qmp::wire::QmpError;
use blocklayer::drivers::file::create::{create_file, FilePrealloc};
use blocklayer::edge::Parent;
use blocklayer::options::BlockdevOptions;
use blocklayer::Node;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// `blockdev-snapshot-sync` arguments.
pub struct SnapshotSync {
    pub device: Option<String>,
    pub node_name: Option<String>,
    pub snapshot_file: String,
    pub snapshot_node_name: Option<String>,
    pub format: String,
    pub existing: bool,
}

impl Control {
    fn lookup_any(&self, name: &str) -> OpResult<Arc<Node>> {
        self.graph.lookup(name).map_err(generic)
    }

    /// `blockdev-reopen`: new options for a list of nodes, all applied or none, inside
    /// one drained section (see `blocklayer::reopen`).
    pub fn blockdev_reopen(&mut self, list: &[BlockdevOptions]) -> OpResult<()> {
        if list.is_empty() {
            return Ok(());
        }
        let nodes: Vec<Arc<Node>> = list
            .iter()
            .filter_map(|o| o.common.node_name.as_deref())
            .filter_map(|n| self.graph.get(n))
            .collect();
        let _drained = self
            .graph
            .drain_all(&nodes, DRAIN_TIMEOUT)
            .map_err(generic)?;
        self.graph.reopen_multiple(list).map_err(generic)
    }

    /// `blockdev-snapshot`: `overlay` (a node without backing) goes on top of `node`,
    /// taking its place under every user.
    pub fn blockdev_snapshot(&mut self, node: &str, overlay: &str) -> OpResult<()> {
        let base = self.lookup_any(node)?;
        let ov = self.lookup_any(overlay)?;
        if !ov.parents().is_empty() {
            return Err(QmpError::generic("The overlay is already in use"));
        }
        if !ov.driver().supports_backing() {
            return Err(QmpError::generic(
                "The overlay does not support backing images",
            ));
        }
        if ov.backing().is_some() {
            return Err(QmpError::generic("The overlay already has a backing image"));
        }
        if Arc::ptr_eq(&base, &ov) {
            return Err(QmpError::generic("The overlay is already in use"));
        }
        let _d = self
            .graph
            .drain_all(&[base.clone(), ov.clone()], DRAIN_TIMEOUT)
            .map_err(generic)?;
        self.graph.set_backing(&ov, Some(&base)).map_err(generic)?;
        if let Err(e) = self.graph.replace_node(&base, &ov, None) {
            let _ = self.graph.set_backing(&ov, None);
            return Err(generic(e));
        }
        Ok(())
    }

    /// `blockdev-snapshot-sync`: creates (or, with `mode=existing`, opens) a qcow2
    /// overlay whose header names the node's image as its backing file, and puts it
    /// on top of the node.
    pub fn blockdev_snapshot_sync(&mut self, a: SnapshotSync) -> OpResult<()> {
        let name = match (&a.device, &a.node_name) {
            (Some(d), _) => d.clone(),
            (None, Some(n)) => n.clone(),
            (None, None) => {
                return Err(QmpError::generic("Cannot find device='' nor node-name=''"))
            }
        };
        let base = self.lookup_any(&name)?;
        if a.format != "qcow2" {
            return Err(QmpError::generic(format!(
                "vubd creates snapshot overlays in the qcow2 format only, not '{}'",
                a.format
            )));
        }
        if let Some(n) = &a.snapshot_node_name {
            if self.graph.get(n).is_some() {
                return Err(QmpError::generic("New snapshot node name already in use"));
            }
        }
        let path = Path::new(&a.snapshot_file);
        if a.existing {
            if !path.exists() {
                return Err(QmpError::generic(format!(
                    "Could not open '{}': No such file or directory",
                    a.snapshot_file
                )));
            }
        } else {
            create_file(path, 0, FilePrealloc::Off).map_err(generic)?;
            let file = self
                .graph
                .add(
                    &BlockdevOptions::from_json(&json!({
                        "driver": "file", "filename": a.snapshot_file,
                    }))
                    .map_err(generic)?,
                )
                .map_err(generic)?;
            let mut o = qcow::CreateOptions::new(base.size());
            o.backing_file = Some(base.driver().filename());
            o.backing_fmt = Some(base.driver_name().to_string());
            let r = blocklayer::drivers::qcow2::create(file.clone(), None, o).map_err(generic);
            let fname = file.name().to_string();
            drop(file);
            let _ = self.graph.remove(&fname);
            r?;
        }
        let mut opts = json!({
            "driver": "qcow2",
            "file": {"driver": "file", "filename": a.snapshot_file},
            "backing": null,
        });
        if let Some(n) = &a.snapshot_node_name {
            opts["node-name"] = json!(n);
        }
        let ov = self
            .graph
            .add(&BlockdevOptions::from_json(&opts).map_err(generic)?)
            .map_err(generic)?;
        let ov_name = ov.name().to_string();
        drop(ov);
        if let Err(e) = self.blockdev_snapshot(&name, &ov_name) {
            let _ = self.graph.remove(&ov_name);
            return Err(e);
        }
        Ok(())
    }

    /// `change-backing-file`: rewrites the backing file name in the header of
    /// `image` (a node in the chain of the root node `device`).
    pub fn change_backing_file(
        &mut self,
        device: &str,
        image: &str,
        backing_file: &str,
    ) -> OpResult<()> {
        let root = self.lookup_any(device)?;
        if root
            .parents()
            .iter()
            .any(|e| matches!(e.parent(), Parent::Node(_)))
        {
            return Err(QmpError::generic("Need a root block node"));
        }
        let Some(img) = self.graph.get(image) else {
            return Err(QmpError::generic("image file not found"));
        };
        let Some(backing) = img.backing() else {
            return Err(QmpError::generic(
                "not allowing backing file change on an image without a backing file",
            ));
        };
        if !root.backing_chain().iter().any(|n| Arc::ptr_eq(n, &img)) {
            return Err(QmpError::generic(format!(
                "'{device}' and image file are not in the same chain"
            )));
        }
        let _d = self.graph.drain(&img, DRAIN_TIMEOUT).map_err(generic)?;
        let fmt = backing.driver_name();
        let was_ro = img.is_read_only();
        let target = if was_ro {
            self.graph.reopen(&img, true).map_err(generic)?
        } else {
            img.clone()
        };
        let r = target
            .driver()
            .change_backing_file(Some(backing_file), Some(fmt))
            .map_err(|e| {
                QmpError::generic(format!(
                    "Could not change backing file to '{backing_file}': {e}"
                ))
            });
        if was_ro {
            if let Err(e) = self.graph.reopen(&target, false) {
                log::warn!("change-backing-file: node '{image}' stays read-write: {e}");
            }
        }
        drop(_d);
        self.graph.collect_unused();
        r
    }

    /// `block-set-write-threshold`
    pub fn set_write_threshold(&mut self, node: &str, threshold: u64) -> OpResult<()> {
        let Some(n) = self.graph.get(node) else {
            return Err(QmpError::generic(format!("Device '{node}' not found")));
        };
        n.set_write_threshold(threshold);
        Ok(())
    }

    /// `x-debug-query-block-graph`: every node, backend and job, and the edges
    /// between them with their permissions.
    pub fn query_block_graph(&self) -> Value {
        let mut nodes = Vec::new();
        let mut ids: HashMap<String, usize> = HashMap::new();
        let mut next = 1usize;
        let mut edges = Vec::new();
        let mut users: HashMap<String, usize> = HashMap::new();
        for n in self.graph.nodes() {
            ids.insert(n.name().to_string(), next);
            nodes.push(json!({"id": next, "type": "block-driver", "name": n.name()}));
            next += 1;
        }
        for n in self.graph.nodes() {
            let child = ids[n.name()];
            for e in n.parents() {
                let parent = match e.parent() {
                    Parent::Node(p) => match ids.get(p) {
                        Some(&id) => id,
                        None => continue,
                    },
                    Parent::Backend(name) => {
                        let id = next;
                        next += 1;
                        nodes.push(json!({"id": id, "type": "block-backend",
                            "name": name.clone().unwrap_or_default()}));
                        id
                    }
                    Parent::Job { id: job, .. } => *users.entry(job.clone()).or_insert_with(|| {
                        let id = next;
                        next += 1;
                        nodes.push(json!({"id": id, "type": "block-job", "name": job}));
                        id
                    }),
                };
                edges.push(json!({
                    "parent": parent,
                    "child": child,
                    "name": e.name(),
                    "perm": e.perm().qmp_names(true),
                    "shared-perm": e.shared().qmp_names(true),
                }));
            }
        }
        json!({"nodes": nodes, "edges": edges})
    }
}

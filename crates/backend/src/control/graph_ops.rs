//! Graph commands: external snapshots (`blockdev-snapshot`, `blockdev-snapshot-sync`),
//! `blockdev-reopen`, `change-backing-file`, `block-set-write-threshold` and
//! `x-debug-query-block-graph`, with QEMU's checks and texts.

use super::{generic, Control, OpResult, DRAIN_TIMEOUT};
use crate::control::error::ControlError;
use blocklayer::drivers::file::create::{create_file, FilePrealloc};
use blocklayer::edge::{Parent, Role};
use blocklayer::options::BlockdevOptions;
use blocklayer::Node;
use serde::Serialize;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// `blockdev-snapshot-sync` arguments.
#[derive(Debug, Clone)]
pub struct SnapshotSync {
    pub device: Option<String>,
    pub node_name: Option<String>,
    pub snapshot_file: String,
    pub snapshot_node_name: Option<String>,
    pub format: String,
    pub existing: bool,
}

/// QEMU's text for a file it could not create.
pub(super) fn create_error(path: &Path, e: blocklayer::BlockError) -> ControlError {
    ControlError::generic(match e {
        blocklayer::BlockError::Open { source, .. } => format!(
            "Could not create '{}': {}",
            path.display(),
            blocklayer::error::strerror(source.raw_os_error().unwrap_or(libc::EIO))
        ),
        e => e.to_string(),
    })
}

impl Control {
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

    /// QEMU's op blockers for an external snapshot of `node`: a backing node of
    /// another node, or a node a job uses, is busy.
    pub(super) fn snapshot_blocked(node: &Node) -> OpResult<()> {
        for e in node.parents() {
            match e.parent() {
                Parent::Node(p) if e.role() == Role::Backing => {
                    return Err(ControlError::generic(format!(
                        "Node '{}' is busy: node is used as backing hd of '{p}'",
                        node.name()
                    )))
                }
                Parent::Job { kind, .. } => {
                    return Err(ControlError::generic(format!(
                        "Node '{}' is busy: block device is in use by block job: {kind}",
                        node.name()
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// `blockdev-snapshot`: `overlay` (a node without backing) goes on top of `node`,
    /// taking its place under every user.
    pub fn blockdev_snapshot(&mut self, node: &str, overlay: &str) -> OpResult<()> {
        let base = self.lookup_device(node)?;
        Self::snapshot_blocked(&base)?;
        let ov = self.lookup_device(overlay)?;
        self.snapshot_onto(&base, &ov)
    }

    /// Puts `ov` over `base` (the checks QEMU makes on the overlay, then the graph
    /// change); `base` becomes read-only where it can, as in QEMU.
    fn snapshot_onto(&mut self, base: &Arc<Node>, ov: &Arc<Node>) -> OpResult<()> {
        if !ov.parents().is_empty() || Arc::ptr_eq(base, ov) {
            return Err(ControlError::generic("The overlay is already in use"));
        }
        Self::snapshot_blocked(ov)?;
        if ov.backing().is_some() {
            return Err(ControlError::generic(
                "The overlay already has a backing image",
            ));
        }
        if !ov.driver().supports_backing() {
            return Err(ControlError::generic(
                "The overlay does not support backing images",
            ));
        }
        let drained = self
            .graph
            .drain_all(&[base.clone(), ov.clone()], DRAIN_TIMEOUT)
            .map_err(generic)?;
        self.graph.set_backing(ov, Some(base)).map_err(generic)?;
        if let Err(e) = self.graph.replace_node(base, ov, None) {
            let _ = self.graph.set_backing(ov, None);
            return Err(generic(e));
        }
        // The old top is only read from now on (QEMU reopens it read-only and goes on
        // if that fails).
        if !base.is_read_only() {
            if let Err(e) = self.graph.reopen(base, false) {
                log::warn!(
                    "blockdev-snapshot: node '{}' stays read-write: {e}",
                    base.name()
                );
            }
        }
        drop(drained);
        self.graph.collect_unused();
        Ok(())
    }

    /// `blockdev-snapshot-sync`: creates (or, with `mode=existing`, opens) a qcow2
    /// overlay whose header names the node's image as its backing file, and puts it
    /// on top of the node. Checks and texts in QEMU's order.
    pub fn blockdev_snapshot_sync(&mut self, a: SnapshotSync) -> OpResult<()> {
        // A device is a BlockBackend name: vubd's nodes have none, as nodes added
        // with --blockdev to qemu-storage-daemon.
        let base = a
            .node_name
            .as_deref()
            .and_then(|n| self.graph.get(n))
            .ok_or_else(|| {
                ControlError::generic(format!(
                    "Cannot find device='{}' nor node-name='{}'",
                    a.device.as_deref().unwrap_or(""),
                    a.node_name.as_deref().unwrap_or("")
                ))
            })?;
        Self::snapshot_blocked(&base)?;
        let Some(ov_name) = a.snapshot_node_name.clone() else {
            return Err(ControlError::generic("New overlay node-name missing"));
        };
        if self.graph.get(&ov_name).is_some() {
            return Err(ControlError::generic(
                "New overlay node-name already in use",
            ));
        }
        let path = Path::new(&a.snapshot_file);
        if !a.existing {
            match a.format.as_str() {
                "qcow2" => {}
                "raw" => {
                    return Err(ControlError::generic(
                        "Backing file not supported for file format 'raw'",
                    ))
                }
                f if BlockdevOptions::is_qemu_driver(f) => {
                    return Err(ControlError::generic(format!(
                        "vubd creates snapshot overlays in the qcow2 format only, not '{f}'"
                    )))
                }
                f => return Err(ControlError::generic(format!("Unknown file format '{f}'"))),
            }
            self.create_qcow2(path, base.size(), Some(&base))?;
        } else if !path.exists() {
            return Err(ControlError::generic(format!(
                "Could not open '{}': No such file or directory",
                a.snapshot_file
            )));
        }
        if blocklayer::options::coerce::check_node_name("node-name", &ov_name).is_err() {
            return Err(ControlError::generic(format!(
                "Invalid node-name: '{ov_name}'"
            )));
        }
        let opts = json!({
            "driver": a.format,
            "node-name": ov_name,
            "file": {"driver": "file", "filename": a.snapshot_file},
            "backing": null,
        });
        let ov = self
            .graph
            .add_implicit(&BlockdevOptions::from_json(&opts).map_err(generic)?)
            .map_err(generic)?;
        let r = self.snapshot_onto(&base, &ov);
        drop(ov);
        // An overlay nothing uses (the node had no users) is gone at once, as in QEMU.
        self.graph.collect_unused();
        r
    }

    /// Creates a qcow2 image of `size` bytes (a `blockdev-snapshot-sync` overlay, a
    /// `drive-mirror` target), with `backing`'s image as backing file if given.
    pub(super) fn create_qcow2(
        &mut self,
        path: &Path,
        size: u64,
        backing: Option<&Arc<Node>>,
    ) -> OpResult<()> {
        create_file(path, 0, FilePrealloc::Off).map_err(|e| create_error(path, e))?;
        let file = self
            .graph
            .add_implicit(
                &BlockdevOptions::from_json(&json!({
                    "driver": "file", "filename": path.display().to_string(),
                }))
                .map_err(generic)?,
            )
            .map_err(generic)?;
        let mut o = qcow::CreateOptions::new(size);
        if let Some(base) = backing {
            o.backing_file = Some(base.driver().filename());
            o.backing_fmt = Some(base.driver_name().to_string());
        }
        let r = blocklayer::drivers::qcow2::create(file.clone(), None, o).map_err(generic);
        drop(file);
        self.graph.collect_unused();
        r
    }

    /// `change-backing-file`: rewrites the backing file name in the header of
    /// `image` (a node in the chain of the root node `device`).
    pub fn change_backing_file(
        &mut self,
        device: &str,
        image: &str,
        backing_file: &str,
    ) -> OpResult<()> {
        let root = self.lookup_device(device)?;
        if root
            .parents()
            .iter()
            .any(|e| matches!(e.parent(), Parent::Node(_)))
        {
            return Err(ControlError::generic("Need a root block node"));
        }
        let Some(img) = self.graph.get(image) else {
            return Err(ControlError::generic(format!(
                "Cannot find device='' nor node-name='{image}'"
            )));
        };
        let Some(backing) = img.backing() else {
            return Err(ControlError::generic(
                "not allowing backing file change on an image without a backing file",
            ));
        };
        if !root.backing_chain().iter().any(|n| Arc::ptr_eq(n, &img)) {
            return Err(ControlError::generic(format!(
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
                ControlError::generic(format!(
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
            return Err(ControlError::generic(format!("Device '{node}' not found")));
        };
        n.set_write_threshold(threshold);
        Ok(())
    }

    /// `x-debug-query-block-graph`: every node, backend and job, and the edges
    /// between them with their permissions.
    pub fn query_block_graph(&self) -> XDbgBlockGraph {
        let mut nodes = Vec::new();
        let mut ids: HashMap<String, usize> = HashMap::new();
        let mut next = 1usize;
        let mut edges = Vec::new();
        let mut users: HashMap<String, usize> = HashMap::new();
        for n in self.graph.nodes() {
            ids.insert(n.name().to_string(), next);
            nodes.push(XDbgBlockGraphNode {
                id: next,
                kind: XDbgBlockGraphNodeType::BlockDriver,
                name: n.name().to_string(),
            });
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
                        nodes.push(XDbgBlockGraphNode {
                            id,
                            kind: XDbgBlockGraphNodeType::BlockBackend,
                            name: name.clone().unwrap_or_default(),
                        });
                        id
                    }
                    Parent::Job { id: job, .. } => *users.entry(job.clone()).or_insert_with(|| {
                        let id = next;
                        next += 1;
                        nodes.push(XDbgBlockGraphNode {
                            id,
                            kind: XDbgBlockGraphNodeType::BlockJob,
                            name: job.clone(),
                        });
                        id
                    }),
                };
                edges.push(XDbgBlockGraphEdge {
                    parent,
                    child,
                    name: e.name().to_string(),
                    perm: e.perm().qmp_names(true),
                    shared_perm: e.shared().qmp_names(true),
                });
            }
        }
        XDbgBlockGraph { nodes, edges }
    }
}

/// QEMU's `XDbgBlockGraph` (`x-debug-query-block-graph`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct XDbgBlockGraph {
    pub nodes: Vec<XDbgBlockGraphNode>,
    pub edges: Vec<XDbgBlockGraphEdge>,
}

/// QEMU's `XDbgBlockGraphNode`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct XDbgBlockGraphNode {
    pub id: usize,
    #[serde(rename = "type")]
    pub kind: XDbgBlockGraphNodeType,
    pub name: String,
}

/// QEMU's `XDbgBlockGraphNodeType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum XDbgBlockGraphNodeType {
    BlockBackend,
    BlockJob,
    BlockDriver,
}

/// QEMU's `XDbgBlockGraphEdge`: `perm` and `shared-perm` are `BlockPermission`
/// names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct XDbgBlockGraphEdge {
    pub parent: usize,
    pub child: usize,
    pub name: String,
    pub perm: Vec<&'static str>,
    pub shared_perm: Vec<&'static str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire shape of `XDbgBlockGraph`, pinned.
    #[test]
    fn block_graph_as_vubd_writes_it() {
        let g = XDbgBlockGraph {
            nodes: vec![XDbgBlockGraphNode {
                id: 1,
                kind: XDbgBlockGraphNodeType::BlockDriver,
                name: "n".into(),
            }],
            edges: vec![XDbgBlockGraphEdge {
                parent: 2,
                child: 1,
                name: "root".into(),
                perm: vec!["consistent-read"],
                shared_perm: vec!["write", "resize"],
            }],
        };
        assert_eq!(
            serde_json::to_string(&g).unwrap(),
            r#"{"nodes":[{"id":1,"type":"block-driver","name":"n"}],"edges":[{"parent":2,"child":1,"name":"root","perm":["consistent-read"],"shared-perm":["write","resize"]}]}"#
        );
    }
}

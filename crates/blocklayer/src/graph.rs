//! The node graph: every node by its unique node-name, opening nodes from options
//! (children given inline or by reference, as QEMU accepts), removing them, and the
//! node information `query-named-block-nodes` reports.

use crate::driver::Driver;
use crate::drivers::{
    blkdebug::BlkdebugDriver, file::FileDriver, null::NullDriver, raw::RawDriver,
};
use crate::error::{BlockError, Result};
use crate::node::{Node, NodeFlags};
use crate::options::{BlockdevOptions, BlockdevRef, DetectZeroes, DiscardMode, DriverOptions};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

#[derive(Default)]
pub struct Graph {
    nodes: BTreeMap<String, Arc<Node>>,
    /// Nodes added by `--blockdev`/`blockdev-add` themselves (not inline children):
    /// only these may be removed by `blockdev-del`, as QEMU's monitor-owned nodes.
    owned: BTreeSet<String>,
    anon: u64,
}

impl Graph {
    pub fn new() -> Self {
        Graph::default()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.get(name).cloned()
    }

    /// Like `get`, with QEMU's error when the node does not exist.
    pub fn lookup(&self, name: &str) -> Result<Arc<Node>> {
        self.get(name).ok_or_else(|| {
            BlockError::Graph(format!("Cannot find device='' nor node-name='{name}'"))
        })
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.nodes.values()
    }

    /// Opens a node (and any inline children) and adds it to the graph.
    pub fn add(&mut self, opts: &BlockdevOptions) -> Result<Arc<Node>> {
        self.check_names(opts)?;
        let node = self.open(opts)?;
        self.owned.insert(node.name().to_string());
        Ok(node)
    }

    /// Refuses node-names already in the graph, before anything is opened.
    fn check_names(&self, opts: &BlockdevOptions) -> Result<()> {
        if let Some(name) = &opts.common.node_name {
            if self.nodes.contains_key(name) {
                return Err(BlockError::Graph(format!(
                    "Duplicate nodes with node-name='{name}'"
                )));
            }
        }
        if let Some(BlockdevRef::Inline(child)) = opts.driver.child() {
            self.check_names(child)?;
        }
        Ok(())
    }

    fn child(&mut self, r: &BlockdevRef) -> Result<Arc<Node>> {
        match r {
            BlockdevRef::Reference(name) => self.lookup(name),
            BlockdevRef::Inline(opts) => self.open(opts),
        }
    }

    fn open(&mut self, opts: &BlockdevOptions) -> Result<Arc<Node>> {
        let common = &opts.common;
        let driver: Box<dyn Driver> = match &opts.driver {
            DriverOptions::File(f) => Box::new(FileDriver::open(f, common, false)?),
            DriverOptions::HostDevice(f) => Box::new(FileDriver::open(f, common, true)?),
            DriverOptions::Null(n) => Box::new(NullDriver::new(n.clone())),
            DriverOptions::Blkdebug(b) => {
                let image = self.child(&b.image)?;
                Box::new(BlkdebugDriver::new(image, b))
            }
            DriverOptions::Raw(r) => {
                let file = self.child(&r.file)?;
                let raw = (|| {
                    if !common.read_only && file.is_read_only() {
                        return Err(BlockError::Graph(format!(
                            "Node '{}' is read-only: open the raw node with read-only=on",
                            file.name()
                        )));
                    }
                    RawDriver::new(file.clone(), r.offset, r.size)
                })();
                match raw {
                    Ok(raw) => Box::new(raw),
                    Err(e) => {
                        // An inline child opened for this node goes with it.
                        if matches!(r.file, BlockdevRef::Inline(_)) {
                            self.remove_unused(file.name());
                        }
                        return Err(e);
                    }
                }
            }
        };
        let name = match &common.node_name {
            Some(n) => n.clone(),
            None => {
                self.anon += 1;
                format!("#block{:03}", self.anon)
            }
        };
        let flags = NodeFlags {
            read_only: common.read_only,
            discard_unmap: common.discard == DiscardMode::Unmap,
            detect_zeroes: common.detect_zeroes,
            no_flush: common.cache_no_flush,
            cache_direct: common.cache_direct,
        };
        let node = Arc::new(Node::new(name.clone(), driver, flags));
        self.nodes.insert(name, node.clone());
        Ok(node)
    }

    /// The nodes that have `name` as a child, with the child's role.
    pub fn parents(&self, name: &str) -> Vec<(String, &'static str)> {
        self.nodes
            .values()
            .flat_map(|p| {
                p.children()
                    .into_iter()
                    .filter(|c| c.node.name() == name)
                    .map(|c| (p.name().to_string(), c.role))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Removes a node added with `blockdev-add` (QEMU's `blockdev-del` checks, except
    /// "attached to an export", which the caller knows about), and with it the inline
    /// children nothing else uses. The caller has drained the node.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        if !self.nodes.contains_key(name) {
            return Err(BlockError::Graph(format!(
                "Failed to find node with node-name='{name}'"
            )));
        }
        if !self.owned.contains(name) {
            return Err(BlockError::Graph(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if !self.parents(name).is_empty() {
            return Err(BlockError::Graph(format!("Block device {name} is in use")));
        }
        self.owned.remove(name);
        self.remove_unused(name);
        Ok(())
    }

    /// Drops `name` and then each of its children that is neither monitor-owned nor
    /// used by another node.
    fn remove_unused(&mut self, name: &str) {
        let Some(node) = self.nodes.remove(name) else {
            return;
        };
        let children = node.children();
        drop(node);
        for c in children {
            let child = c.node.name().to_string();
            drop(c);
            if !self.owned.contains(&child) && self.parents(&child).is_empty() {
                self.remove_unused(&child);
            }
        }
    }

    /// QEMU's `ImageInfo` of a node; `flat` leaves out the backing chain.
    fn image_info(&self, node: &Node, _flat: bool) -> Value {
        let mut info = json!({
            "filename": node.driver().filename(),
            "format": node.driver_name(),
            "virtual-size": node.size(),
            "dirty-flag": false,
        });
        if let Some(actual) = node.driver().actual_size() {
            info["actual-size"] = json!(actual);
        }
        info
    }

    /// QEMU's `BlockDeviceInfo` of a node (`query-named-block-nodes`).
    pub fn node_info(&self, node: &Node, flat: bool) -> Value {
        let flags = node.flags();
        let detect_zeroes = match flags.detect_zeroes {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        };
        json!({
            "file": node.driver().filename(),
            "node-name": node.name(),
            "ro": node.is_read_only(),
            "drv": node.driver_name(),
            "backing_file_depth": 0,
            "encrypted": false,
            "detect_zeroes": detect_zeroes,
            "bps": 0,
            "bps_rd": 0,
            "bps_wr": 0,
            "iops": 0,
            "iops_rd": 0,
            "iops_wr": 0,
            "image": self.image_info(node, flat),
            "cache": {
                "writeback": true,
                "direct": flags.cache_direct,
                "no-flush": flags.no_flush,
            },
            "write_threshold": 0,
        })
    }

    /// Every node's `BlockDeviceInfo`, in node-name order.
    pub fn query_named_block_nodes(&self, flat: bool) -> Value {
        Value::Array(
            self.nodes
                .values()
                .map(|n| self.node_info(n, flat))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: Value) -> BlockdevOptions {
        BlockdevOptions::from_json(&v).unwrap()
    }

    #[test]
    fn remove_takes_inline_children_and_keeps_referenced_ones() {
        let mut g = Graph::new();
        g.add(&opts(json!({"driver": "null-co", "node-name": "base"})))
            .unwrap();
        g.add(&opts(
            json!({"driver": "raw", "node-name": "top", "file": "base"}),
        ))
        .unwrap();
        let err = g.remove("base").unwrap_err().to_string();
        assert_eq!(err, "Block device base is in use");
        g.add(&opts(json!({"driver": "raw", "node-name": "r2",
            "file": {"driver": "null-co", "node-name": "inline"}})))
            .unwrap();
        assert_eq!(
            g.remove("inline").unwrap_err().to_string(),
            "Node inline is not owned by the monitor"
        );
        g.remove("r2").unwrap();
        assert!(g.get("inline").is_none());
        g.remove("top").unwrap();
        assert!(g.get("base").is_some());
        g.remove("base").unwrap();
        assert_eq!(
            g.remove("base").unwrap_err().to_string(),
            "Failed to find node with node-name='base'"
        );
        assert_eq!(g.nodes().count(), 0);
    }

    #[test]
    fn node_info_shape() {
        let mut g = Graph::new();
        let n = g
            .add(&opts(
                json!({"driver": "null-co", "node-name": "n", "size": 4096}),
            ))
            .unwrap();
        let info = g.node_info(&n, true);
        assert_eq!(info["drv"], "null-co");
        assert_eq!(info["image"]["virtual-size"], 4096);
        assert_eq!(info["file"], "null-co://");
        assert_eq!(info["cache"]["no-flush"], false);
    }
}

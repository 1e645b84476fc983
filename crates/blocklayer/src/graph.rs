//! The node graph: every node by its unique node-name, and opening nodes from options
//! (children given inline or by reference, as QEMU accepts).

use crate::driver::Driver;
use crate::drivers::{file::FileDriver, null::NullDriver, raw::RawDriver};
use crate::error::{BlockError, Result};
use crate::node::{Node, NodeFlags};
use crate::options::{BlockdevOptions, BlockdevRef, DiscardMode, DriverOptions};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Default)]
pub struct Graph {
    nodes: BTreeMap<String, Arc<Node>>,
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
        self.open(opts)
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
        if let DriverOptions::Raw(r) = &opts.driver {
            if let BlockdevRef::Inline(child) = &r.file {
                self.check_names(child)?;
            }
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
            DriverOptions::Raw(r) => {
                let file = self.child(&r.file)?;
                if !common.read_only && file.is_read_only() {
                    return Err(BlockError::Graph(format!(
                        "Node '{}' is read-only: open the raw node with read-only=on",
                        file.name()
                    )));
                }
                Box::new(RawDriver::new(file, r.offset, r.size)?)
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
        };
        let node = Arc::new(Node::new(name.clone(), driver, flags));
        self.nodes.insert(name, node.clone());
        Ok(node)
    }
}

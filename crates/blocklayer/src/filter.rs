//! Filters inserted above a node and removed again (QEMU's `bdrv_insert_node` and
//! `bdrv_drop_filter`), for the filters block jobs put over the nodes they work on.

use crate::drivers::job_filter::{ActiveMirror, JobFilter, JobFilterKind};
use crate::edge::{Edge, Role};
use crate::error::{BlockError, Result};
use crate::graph::Graph;
use crate::node::{Node, NodeFlags};
use crate::options::DetectZeroes;
use std::sync::Arc;

impl Graph {
    /// Puts a new implicit filter node above `node`: every user of `node` uses the
    /// filter instead, and the filter uses `node` as its `backing` child. The caller
    /// has drained `node`; refused, with nothing changed, on a permission conflict.
    pub fn insert_filter(&mut self, node: &Arc<Node>, kind: JobFilterKind) -> Result<Arc<Node>> {
        self.insert_job_filter(node, kind, None, None)
    }

    /// [`Graph::insert_filter`] with the node-name the user gave the filter (QEMU's
    /// `filter-node-name`; generated if `None`) and, for a write-blocking mirror,
    /// the way to its target.
    pub fn insert_job_filter(
        &mut self,
        node: &Arc<Node>,
        kind: JobFilterKind,
        name: Option<&str>,
        active: Option<Arc<ActiveMirror>>,
    ) -> Result<Arc<Node>> {
        let name = match name {
            Some(n) => {
                if self.nodes.contains_key(n) {
                    return Err(BlockError::Graph(format!(
                        "Duplicate nodes with node-name='{n}'"
                    )));
                }
                n.to_string()
            }
            None => self.anon_name(),
        };
        let edge = Edge::child_of(&name, "backing", Role::Filtered, node);
        let flags = NodeFlags {
            read_only: node.is_read_only(),
            // Discards and zeroes go down as they come: the child applies its policy.
            discard_unmap: true,
            detect_zeroes: DetectZeroes::Off,
            no_flush: false,
            cache_direct: false,
        };
        let driver = match active {
            Some(a) => JobFilter::with_active(edge, a),
            None => JobFilter::new(kind, edge),
        };
        let filter = Arc::new(Node::new(name.clone(), Box::new(driver), flags));
        self.nodes.insert(name.clone(), filter.clone());
        if let Err(e) = self.replace_node(node, &filter, None) {
            self.nodes.remove(&name);
            return Err(e);
        }
        Ok(filter)
    }

    /// Takes a filter out again: its users use its child. The caller has drained
    /// both.
    pub fn remove_filter(&mut self, filter: &Arc<Node>) -> Result<()> {
        let Some(child) = filter.children().first().map(|c| c.node_arc()) else {
            return Err(BlockError::Graph(format!(
                "Node '{}' is not a filter",
                filter.name()
            )));
        };
        self.replace_node(filter, &child, None)?;
        self.nodes.remove(filter.name());
        self.options.remove(filter.name());
        Ok(())
    }
}

impl Graph {
    /// Opens the node `opts` describe, whose primary child is `node`, and puts it
    /// above `node` (QEMU's `bdrv_insert_node`): every other user of `node` uses
    /// the new node instead. The caller has drained `node`; on a permission conflict
    /// the new node is gone again and nothing changed.
    pub fn insert_node(
        &mut self,
        node: &Arc<Node>,
        opts: &crate::options::BlockdevOptions,
    ) -> Result<Arc<Node>> {
        let new = self.add_implicit(opts)?;
        if let Err(e) = self.replace_node(node, &new, None) {
            let name = new.name().to_string();
            drop(new);
            self.remove_unused(&name);
            return Err(e);
        }
        Ok(new)
    }
}

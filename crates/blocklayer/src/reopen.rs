//! `blockdev-reopen` (QEMU's `bdrv_reopen_multiple`): new options for a list of nodes,
//! applied all together or not at all.
//!
//! Each listed node gets its whole option set anew: what the list leaves out goes back
//! to its default, as in QEMU. Options a driver cannot change on an open image
//! (`filename`, `aio`, `locking`, ...) must keep their value; children are given by
//! reference (a `file` or `backing` that names another node re-points the edge).
//!
//! The change is made by node replacement: inside the caller's drained section, every
//! listed node is opened again under its own name with the new options (children
//! first, so that a parent opens over its reopened child), every user of the old node
//! is re-pointed at the new one, and the permissions of the whole graph are checked
//! once. On any error the old nodes take their places back and nothing has changed.
//! A qcow2 image is closed cleanly (metadata written back) before its new node opens
//! it, so that two instances never hold unwritten metadata for one file.

use crate::drivers::qcow2::Qcow2Options;
use crate::edge::{Edge, Parent};
use crate::error::{BlockError, Result};
use crate::graph::Graph;
use crate::node::Node;
use crate::options::{BackingRef, BlockdevOptions, BlockdevRef};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long a reopen waits for the requests in flight in the nodes it replaces.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of every node that a reopen may change.
const COMMON_MUTABLE: &[&str] = &[
    "node-name",
    "read-only",
    "auto-read-only",
    "discard",
    "detect-zeroes",
    "cache",
];

/// The keys that name children.
const CHILD_KEYS: &[&str] = &["file", "image", "backing", "data-file"];

fn graph_err(msg: impl Into<String>) -> BlockError {
    BlockError::Graph(msg.into())
}

/// One node to reopen: the node now and the options it is to be opened with.
struct Plan {
    name: String,
    old: Arc<Node>,
    opts: BlockdevOptions,
}

/// A plan being applied: the new node, once opened.
struct Applied {
    plan: Plan,
    new: Option<Arc<Node>>,
    /// The old node's users, re-pointed at the new node.
    moved: Vec<Arc<Edge>>,
    locks_released: bool,
}

impl Graph {
    /// Reopens every node of `list` with its options (see the module documentation).
    /// The caller has drained the listed nodes.
    pub fn reopen_multiple(&mut self, list: &[BlockdevOptions]) -> Result<()> {
        let mut plans: Vec<Plan> = Vec::new();
        for opts in list {
            let plan = self.reopen_check(opts)?;
            if plans.iter().any(|p| p.name == plan.name) {
                return Err(graph_err(format!(
                    "Node '{}' is listed more than once",
                    plan.name
                )));
            }
            plans.push(plan);
        }
        self.add_implicit_children(&mut plans);
        self.check_writable_children(&plans)?;
        self.reopen_apply(plans)
    }

    /// Reopens `node` (and its `file` child, where that differs and the child is not
    /// monitor-owned) with `read_only`,
    /// keeping all other options and the children it has now.
    pub(crate) fn reopen_read_only(&mut self, node: &Arc<Node>, read_only: bool) -> Result<()> {
        let mut plans = Vec::new();
        let file = node.child("file");
        // A file child the monitor added keeps its own options (QEMU reopens only the
        // children that inherit from the node).
        if let Some(f) =
            file.filter(|f| f.is_read_only() != read_only && !self.owned.contains(f.name()))
        {
            plans.push(self.plan_as_now(&f, read_only)?);
        }
        plans.push(self.plan_as_now(node, read_only)?);
        self.reopen_apply(plans)
    }

    /// A plan that reopens `node` with its options and children as they are now,
    /// except `read-only`.
    fn plan_as_now(&self, node: &Arc<Node>, read_only: bool) -> Result<Plan> {
        let name = node.name().to_string();
        let mut opts = self
            .options
            .get(&name)
            .cloned()
            .ok_or_else(|| graph_err(format!("Node '{name}' cannot be reopened")))?;
        opts.common.node_name = Some(name.clone());
        opts.common.read_only = read_only;
        let child = |role: &str| {
            node.child(role)
                .map(|c| BlockdevRef::Reference(c.name().to_string()))
        };
        opts.driver.keep_children(&child);
        Ok(Plan {
            name,
            old: node.clone(),
            opts,
        })
    }

    /// Checks one entry against the node's options now, in QEMU's order and texts.
    fn reopen_check(&self, opts: &BlockdevOptions) -> Result<Plan> {
        let name = opts
            .common
            .node_name
            .clone()
            .ok_or_else(|| graph_err("node-name not specified"))?;
        let old = self
            .get(&name)
            .ok_or_else(|| graph_err(format!("Failed to find node with node-name='{name}'")))?;
        let stored = self
            .options
            .get(&name)
            .ok_or_else(|| graph_err(format!("Node '{name}' cannot be reopened")))?;
        for e in old.parents() {
            if let Parent::Job { kind, .. } = e.parent() {
                return Err(graph_err(format!(
                    "Node '{name}' is busy: block device is in use by block job: {kind}"
                )));
            }
        }
        if opts.driver.driver_name() != stored.driver.driver_name() {
            return Err(graph_err("Cannot change the option 'driver'"));
        }
        let new_json = opts.to_json();
        let old_json = stored.to_json();
        for key in CHILD_KEYS {
            if let Some(Value::Object(_)) = new_json.get(*key) {
                return Err(graph_err(format!(
                    "Cannot change the option '{key}.driver'"
                )));
            }
        }
        let mutable = crate::drivers::reopen_mutable(stored.driver.driver_name());
        let (Value::Object(old_map), Value::Object(new_map)) = (&old_json, &new_json) else {
            return Err(graph_err(format!("Node '{name}' cannot be reopened")));
        };
        let keys = old_map
            .keys()
            .chain(new_map.keys().filter(|k| !old_map.contains_key(*k)));
        for key in keys {
            let k = key.as_str();
            if COMMON_MUTABLE.contains(&k) || CHILD_KEYS.contains(&k) || mutable.contains(&k) {
                continue;
            }
            if old_map.get(k) != new_map.get(k) {
                return Err(graph_err(format!("Cannot change the option '{k}'")));
            }
        }
        let mut opts = opts.clone();
        if let Some(q) = opts.driver.downcast_mut::<Qcow2Options>() {
            match &q.backing {
                BackingRef::FromHeader => {
                    if old.backing().is_some() {
                        return Err(graph_err(format!("backing is missing for '{name}'")));
                    }
                    q.backing = BackingRef::None;
                }
                BackingRef::Node(BlockdevRef::Reference(b)) => {
                    let bn = self.lookup(b)?;
                    if bn.reaches(&old) {
                        return Err(graph_err(format!(
                            "Making '{b}' a backing child of '{name}' would create a cycle"
                        )));
                    }
                }
                _ => {}
            }
            let data_now = old.child("data-file").map(|c| c.name().to_string());
            let data_new = match &q.data_file {
                Some(BlockdevRef::Reference(d)) => Some(d.clone()),
                _ => None,
            };
            if q.data_file.is_some() && data_new != data_now {
                return Err(graph_err("Cannot change the option 'data-file'"));
            }
        }
        for child in opts.driver.children() {
            if let BlockdevRef::Reference(c) = child {
                let cn = self.lookup(c)?;
                if Arc::ptr_eq(&cn, &old) {
                    return Err(graph_err(format!(
                        "Making '{c}' a child of '{name}' would create a cycle"
                    )));
                }
            }
        }
        Ok(Plan { name, old, opts })
    }

    /// Inline children that inherit their options from a listed parent (QEMU reopens
    /// the children a node created itself along with it): a `file` child the monitor
    /// did not add follows its parent's read-only and cache options.
    fn add_implicit_children(&self, plans: &mut Vec<Plan>) {
        let mut extra = Vec::new();
        for p in plans.iter() {
            let Some(file) = p.old.child("file") else {
                continue;
            };
            let name = file.name().to_string();
            if self.owned.contains(&name)
                || plans.iter().any(|q| q.name == name)
                || file.parents().len() != 1
            {
                continue;
            }
            let refers = p
                .opts
                .driver
                .children()
                .iter()
                .any(|c| matches!(c, BlockdevRef::Reference(r) if *r == name));
            let Some(stored) = self.options.get(&name) else {
                continue;
            };
            let c = &p.opts.common;
            let mut opts = stored.clone();
            opts.common.node_name = Some(name.clone());
            opts.common.read_only = c.read_only;
            opts.common.cache_direct = c.cache_direct;
            opts.common.cache_no_flush = c.cache_no_flush;
            if refers && opts != *stored {
                extra.push(Plan {
                    name,
                    old: file,
                    opts,
                });
            }
        }
        plans.extend(extra);
    }

    /// A node that is to be writable needs writable data children (`file`, `image`,
    /// `data-file`; not `backing`), as they will be after the reopen.
    fn check_writable_children(&self, plans: &[Plan]) -> Result<()> {
        for p in plans.iter().filter(|p| !p.opts.common.read_only) {
            let mut data: Vec<&BlockdevRef> = p.opts.driver.child().into_iter().collect();
            if let Some(q) = p.opts.driver.downcast_ref::<Qcow2Options>() {
                data.extend(q.data_file.as_ref());
            }
            for c in data {
                let BlockdevRef::Reference(c) = c else {
                    continue;
                };
                let read_only = match plans.iter().find(|q| q.name == *c) {
                    Some(q) => q.opts.common.read_only,
                    None => self.lookup(c)?.is_read_only(),
                };
                if read_only {
                    return Err(graph_err("Block node is read-only"));
                }
            }
        }
        Ok(())
    }

    fn reopen_apply(&mut self, mut plans: Vec<Plan>) -> Result<()> {
        // Callers mostly hold a drained section on the nodes already; one of its own
        // makes sure that no request runs in a node closed and replaced here, nor in
        // its users while they are re-pointed (see `Edge::repoint`).
        let old: Vec<Arc<Node>> = plans.iter().map(|p| p.old.clone()).collect();
        let _drained = self.drain_all(&old, DRAIN_TIMEOUT)?;
        // Children first: a parent opens over the reopened child.
        let order: HashMap<String, usize> = self
            .nodes_parents_first()
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name().to_string(), i))
            .collect();
        plans.sort_by_key(|p| std::cmp::Reverse(order.get(&p.name).copied().unwrap_or(0)));
        let mut applied: Vec<Applied> = plans
            .into_iter()
            .map(|plan| Applied {
                plan,
                new: None,
                moved: Vec::new(),
                locks_released: false,
            })
            .collect();
        let saved: Vec<(String, Option<BlockdevOptions>)> = applied
            .iter()
            .map(|a| (a.plan.name.clone(), self.options.get(&a.plan.name).cloned()))
            .collect();
        let result = self.reopen_steps(&mut applied);
        if let Err(e) = result {
            self.reopen_undo(applied, saved);
            return Err(e);
        }
        for a in &applied {
            if let Some(n) = &a.new {
                n.quiesce_end();
            }
        }
        drop(applied);
        self.collect_unused();
        Ok(())
    }

    fn reopen_steps(&mut self, applied: &mut [Applied]) -> Result<()> {
        for a in applied.iter_mut() {
            let name = a.plan.name.clone();
            // The old instance writes its metadata back before the new one reads it,
            // its persistent bitmaps too (the new one marks them in use again if it
            // writes).
            a.plan.old.store_persistent_bitmaps()?;
            a.plan.old.driver().close()?;
            let Some(old) = self.nodes.remove(&name) else {
                return Err(graph_err(format!("Node '{name}' cannot be reopened")));
            };
            // rbd: `close` above closed the image, and with it its exclusive lock.
            if matches!(old.driver_name(), "file" | "host_device" | "rbd") {
                old.driver().release_locks();
                a.locks_released = true;
            }
            match self.open_node(&a.plan.opts) {
                Ok(n) => {
                    n.quiesce_begin();
                    a.new = Some(n);
                }
                Err(e) => {
                    self.nodes.insert(name, old);
                    return Err(e);
                }
            }
        }
        let mut ro_reopened = Vec::new();
        for a in applied.iter_mut() {
            let new = a.new.as_ref().expect("opened above");
            new.inherit_state_from(&a.plan.old);
            new.persistent_bitmaps_reopened();
            for e in a.plan.old.parents() {
                e.repoint(new);
                a.moved.push(e);
            }
            if new.is_read_only() && !a.plan.old.is_read_only() {
                ro_reopened.push(a.plan.name.clone());
            }
        }
        self.refresh_perms_reopening(&ro_reopened)
    }

    /// Puts the old nodes back after a failed reopen.
    fn reopen_undo(
        &mut self,
        applied: Vec<Applied>,
        saved: Vec<(String, Option<BlockdevOptions>)>,
    ) {
        // Parents last opened are undone first.
        for a in applied.iter().rev() {
            for e in &a.moved {
                e.repoint(&a.plan.old);
            }
        }
        for a in applied.iter().rev() {
            if let Some(new) = &a.new {
                new.quiesce_end();
                if self
                    .nodes
                    .get(&a.plan.name)
                    .is_some_and(|n| Arc::ptr_eq(n, new))
                {
                    self.nodes.remove(&a.plan.name);
                }
            }
        }
        let mut olds = Vec::new();
        for a in applied {
            let Applied {
                plan,
                new,
                locks_released,
                ..
            } = a;
            drop(new);
            self.nodes.insert(plan.name.clone(), plan.old.clone());
            if locks_released {
                if let Err(e) = plan.old.driver().retake_locks() {
                    log::warn!("reopen: taking the image locks back failed: {e}");
                }
            }
            // The old instance stored its bitmaps: they are in use again.
            if let Err(e) = plan.old.driver().mark_bitmaps_in_use() {
                log::warn!("reopen: marking the bitmaps in use again failed: {e}");
            }
            olds.push(plan.old);
        }
        for (name, opts) in saved {
            match opts {
                Some(o) => {
                    self.options.insert(name, o);
                }
                None => {
                    self.options.remove(&name);
                }
            }
        }
        self.collect_unused();
        if let Err(e) = self.refresh_perms() {
            log::warn!("reopen: permissions after undoing a reopen: {e}");
        }
        drop(olds);
    }
}

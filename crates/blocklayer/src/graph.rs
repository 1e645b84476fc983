//! The node graph: every node by its unique node-name, opening nodes from options
//! (children given inline or by reference, as QEMU accepts), removing them, and the
//! node information `query-named-block-nodes` reports.

use crate::drivers::OpenCtx;
use crate::edge::{Edge, Parent, Role};
use crate::error::{BlockError, Result};
use crate::info::{BlockDeviceInfo, BlockdevCacheInfo, ImageInfo};
use crate::node::{Node, NodeFlags};
use crate::options::{BlockdevOptions, BlockdevRef, DetectZeroes, DiscardMode};
use crate::perm::Perm;
use crate::secret::Secrets;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest backing chain opened from image headers.
pub const MAX_BACKING_DEPTH: usize = 16;

/// The format of an image file, from its first bytes: qcow2 or raw.
pub fn probe_format(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|source| BlockError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let n = f.read(&mut magic).unwrap_or(0);
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        "qcow2".into()
    } else {
        "raw".into()
    })
}

#[derive(Default)]
pub struct Graph {
    pub(crate) nodes: BTreeMap<String, Arc<Node>>,
    /// Backing files being opened from qcow2 headers, outermost first.
    chain: Vec<PathBuf>,
    /// Nodes added by `--blockdev`/`blockdev-add` themselves (not inline children):
    /// only these may be removed by `blockdev-del`, as QEMU's monitor-owned nodes.
    pub(crate) owned: BTreeSet<String>,
    /// The options each node was opened with (what `blockdev-reopen` compares with).
    pub(crate) options: HashMap<String, BlockdevOptions>,
    anon: u64,
    /// The `throttle-group` objects, by id, that `throttle` nodes join.
    pub throttle_groups: BTreeMap<String, Arc<crate::throttle::ThrottleGroup>>,
    /// The secret objects drivers look keys up in (shared with the object layer).
    secrets: Secrets,
    /// The TLS credential objects (`tls-creds` of the nbd driver names them).
    tls_creds: crate::tls::TlsCredsTable,
}

impl Graph {
    pub fn new() -> Self {
        Graph::default()
    }

    /// The secret objects (`key-secret` and the like name them).
    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    /// The TLS credential objects.
    pub fn tls_creds(&self) -> &crate::tls::TlsCredsTable {
        &self.tls_creds
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
        let node = self.add_implicit(opts)?;
        self.owned.insert(node.name().to_string());
        Ok(node)
    }

    /// As [`Graph::add`] for a node the monitor does not own (the overlay of
    /// `blockdev-snapshot-sync`): it goes away with its last user.
    pub fn add_implicit(&mut self, opts: &BlockdevOptions) -> Result<Arc<Node>> {
        self.check_names(opts)?;
        let node = self.open(opts)?;
        if let Err(e) = self.refresh_perms() {
            let name = node.name().to_string();
            drop(node);
            self.remove_unused(&name);
            return Err(e);
        }
        Ok(node)
    }

    /// Recomputes the permissions of every node-to-child edge from the users down
    /// (QEMU's `bdrv_refresh_perms`) and checks every node's users against each
    /// other. Nothing changes when it fails: the error is QEMU's text for the first
    /// conflict found.
    pub fn refresh_perms(&self) -> Result<()> {
        self.refresh_perms_reopening(&[])
    }

    /// [`Graph::refresh_perms`] while the nodes `ro_reopened` are being reopened
    /// read-only: a writer of one of them is refused with QEMU's reopen text.
    pub(crate) fn refresh_perms_reopening(&self, ro_reopened: &[String]) -> Result<()> {
        let order = self.nodes_parents_first();
        let mut computed: HashMap<*const Edge, (Perm, Perm)> = HashMap::new();
        for node in &order {
            let parents = node.parents();
            let perms: Vec<(Perm, Perm)> = parents
                .iter()
                .map(|e| match e.parent() {
                    Parent::Node(_) => computed
                        .get(&e.ptr())
                        .copied()
                        .unwrap_or((Perm::NONE, Perm::ALL)),
                    _ => (e.perm(), e.shared()),
                })
                .collect();
            // Newest users first, as QEMU lists a node's parents.
            for a in (0..parents.len()).rev() {
                for b in (0..parents.len()).rev() {
                    if a == b {
                        continue;
                    }
                    let missing = perms[b].0 & !perms[a].1;
                    if !missing.is_empty() {
                        let n = node.name();
                        return Err(BlockError::Graph(format!(
                            "Permission conflict on node '{n}': permissions '{}' are both required by {} (uses node '{n}' as '{}' child) and unshared by {} (uses node '{n}' as '{}' child).",
                            missing.text(),
                            parents[b].parent().describe(),
                            parents[b].name(),
                            parents[a].parent().describe(),
                            parents[a].name(),
                        )));
                    }
                }
            }
            let (mut perm, mut shared) = (Perm::NONE, Perm::ALL);
            for (p, s) in &perms {
                perm |= *p;
                shared &= *s;
            }
            if perm.intersects(Perm::WRITE | Perm::WRITE_UNCHANGED) && node.is_read_only() {
                if ro_reopened.iter().any(|n| n == node.name()) {
                    return Err(BlockError::Graph(format!(
                        "Read-only block node '{}' cannot support read-write users",
                        node.name()
                    )));
                }
                return Err(BlockError::Graph("Block node is read-only".into()));
            }
            for c in node.children() {
                let p = node
                    .driver()
                    .child_perm(&c, !node.is_read_only(), perm, shared);
                computed.insert(c.ptr(), p);
            }
        }
        for node in &order {
            for c in node.children() {
                if let Some((p, s)) = computed.get(&c.ptr()) {
                    c.set_perms(*p, *s);
                }
            }
        }
        Ok(())
    }

    /// Attaches a user (a backend or a job) to `node` with the permissions it takes
    /// and shares; refused, with nothing attached, when another user conflicts.
    pub fn attach_user(
        &self,
        parent: Parent,
        name: &'static str,
        node: &Arc<Node>,
        perm: Perm,
        shared: Perm,
    ) -> Result<Arc<Edge>> {
        let e = Edge::attach(parent, name, Role::Root, node, perm, shared);
        match self.refresh_perms() {
            Ok(()) => Ok(e),
            Err(err) => {
                drop(e);
                Err(err)
            }
        }
    }

    /// Re-points every user of `from` (except `keep`, and except edges of `to`
    /// itself) at `to` (QEMU's `bdrv_replace_node`). The caller holds drained
    /// sections on both nodes; on a permission conflict every edge points back.
    pub fn replace_node(
        &self,
        from: &Arc<Node>,
        to: &Arc<Node>,
        keep: Option<&Arc<Edge>>,
    ) -> Result<()> {
        let to_name = Parent::Node(to.name().to_string());
        let moved: Vec<Arc<Edge>> = from
            .parents()
            .into_iter()
            .filter(|e| keep.is_none_or(|k| !Arc::ptr_eq(k, e)) && *e.parent() != to_name)
            .collect();
        for e in &moved {
            e.repoint(to);
        }
        if let Err(err) = self.refresh_perms() {
            for e in &moved {
                e.repoint(from);
            }
            let _ = self.refresh_perms();
            return Err(err);
        }
        Ok(())
    }

    /// Sets (or removes) the backing child of `node`, drained by the caller; the
    /// image header is not changed. Refused on a permission conflict.
    pub fn set_backing(&self, node: &Arc<Node>, backing: Option<&Arc<Node>>) -> Result<()> {
        let old = node.children().into_iter().find(|c| c.name() == "backing");
        let new = backing.map(|b| Edge::child_of(node.name(), "backing", Role::Backing, b));
        node.driver().set_backing(new)?;
        if let Err(e) = self.refresh_perms() {
            node.driver().set_backing(old)?;
            let _ = self.refresh_perms();
            return Err(e);
        }
        Ok(())
    }

    /// Opens the backing file `node`'s image header names and makes it the node's
    /// backing child (QEMU's `bdrv_open_backing_file` for a node opened without
    /// one); nothing when the node has a backing child or its header names none.
    pub fn open_header_backing(&mut self, node: &Arc<Node>) -> Result<()> {
        if node.backing().is_some() {
            return Ok(());
        }
        let info = node.driver().image_info();
        let Some(name) = info.backing_filename.as_deref() else {
            return Ok(());
        };
        let format = info.backing_filename_format.as_deref();
        let image = node
            .child("file")
            .map(|f| f.driver().filename())
            .unwrap_or_default();
        let backing = self.open_backing_file(&image, name, format)?;
        let r = self.set_backing(node, Some(&backing));
        drop(backing);
        if r.is_err() {
            self.collect_unused();
        }
        r
    }

    /// Reopens a node read-write or read-only (QEMU's `bdrv_reopen_set_read_only`,
    /// which commit uses on its base), with its `file` child if that must change too;
    /// every other option stays. The caller has drained the node. Returns the node
    /// that now has the name (see [`Graph::reopen_multiple`]).
    pub fn reopen(&mut self, node: &Arc<Node>, writable: bool) -> Result<Arc<Node>> {
        let name = node.name().to_string();
        self.reopen_read_only(node, !writable)?;
        self.get(&name)
            .ok_or_else(|| BlockError::Graph(format!("Node '{name}' vanished in a reopen")))
    }

    /// Removes the nodes nothing uses any more that the monitor did not add
    /// (backing files dropped from a chain, inline children of removed nodes).
    pub fn collect_unused(&mut self) {
        loop {
            let unused: Vec<String> = self
                .nodes
                .values()
                .filter(|n| !self.owned.contains(n.name()) && n.parents().is_empty())
                .map(|n| n.name().to_string())
                .collect();
            if unused.is_empty() {
                return;
            }
            for n in unused {
                self.remove_unused(&n);
            }
        }
    }

    /// `node`, the nodes above it (its parents, theirs...) and below it.
    fn drain_set(&self, node: &Arc<Node>) -> Vec<Arc<Node>> {
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut out = Vec::new();
        let mut todo = vec![node.clone()];
        // Upwards.
        while let Some(n) = todo.pop() {
            if !seen.insert(n.name().to_string()) {
                continue;
            }
            for p in n.parents() {
                if let Parent::Node(name) = p.parent() {
                    if let Some(pn) = self.get(name) {
                        todo.push(pn);
                    }
                }
            }
            out.push(n);
        }
        // Downwards from the node.
        let mut todo: Vec<Arc<Node>> = node.children().iter().map(|c| c.node_arc()).collect();
        let mut throttles: Vec<Arc<Node>> = Vec::new();
        while let Some(n) = todo.pop() {
            if !seen.insert(n.name().to_string()) {
                continue;
            }
            todo.extend(n.children().iter().map(|c| c.node_arc()));
            throttles.extend(self.throttle_parents(&n));
            out.push(n);
        }
        // The throttle nodes above those: a request a backend admitted into one runs
        // in its child counted only in the backend's edge (see the throttle driver's
        // `admitted`), so a drain of the child waits for it there (through the
        // throttle node's users, which `drain_all` adds).
        for t in throttles {
            if seen.insert(t.name().to_string()) {
                out.push(t);
            }
        }
        out
    }

    /// The throttle nodes that are parents of `node`.
    fn throttle_parents(&self, node: &Node) -> Vec<Arc<Node>> {
        node.parents()
            .iter()
            .filter_map(|p| match p.parent() {
                Parent::Node(name) => self.get(name),
                _ => None,
            })
            .filter(|pn| pn.driver().as_throttle().is_some())
            .collect()
    }

    /// Opens a drained section on `node` (QEMU's `bdrv_drained_begin`): every user
    /// above it and of it holds new requests, and this returns once the requests in
    /// flight in it, above and below it have finished; the section ends when the
    /// guard is dropped. Fails if requests are still in flight after `timeout`.
    pub fn drain(&self, node: &Arc<Node>, timeout: Duration) -> Result<Drained> {
        self.drain_all(std::slice::from_ref(node), timeout)
    }

    /// [`Graph::drain`] for several nodes at once.
    pub fn drain_all(&self, nodes: &[Arc<Node>], timeout: Duration) -> Result<Drained> {
        let mut set: Vec<Arc<Node>> = Vec::new();
        for n in nodes {
            for m in self.drain_set(n) {
                if !set.iter().any(|x| Arc::ptr_eq(x, &m)) {
                    set.push(m);
                }
            }
        }
        // The users' edges of those nodes: a backend counts its requests in its
        // root edge, not in the node (see `Edge::activity`).
        let mut users: Vec<Arc<Edge>> = Vec::new();
        for n in &set {
            for e in n.parents() {
                if !matches!(e.parent(), Parent::Node(_))
                    && !users.iter().any(|u| Arc::ptr_eq(u, &e))
                {
                    users.push(e);
                }
            }
        }
        for n in &set {
            n.quiesce_begin();
            n.driver().drain_begin();
        }
        for u in &users {
            u.activity().quiesce_begin();
        }
        let drained = Drained { nodes: set, users };
        let deadline = Instant::now() + timeout;
        for u in &drained.users {
            if !u.activity().wait_idle(deadline) {
                return Err(BlockError::Graph(format!(
                    "Node {} still has requests in flight",
                    u.node().name()
                )));
            }
        }
        for n in &drained.nodes {
            if !n.wait_idle(deadline) {
                return Err(BlockError::Graph(format!(
                    "Node {} still has requests in flight",
                    n.name()
                )));
            }
        }
        Ok(drained)
    }

    /// A generated name for a node the user did not name (`#block001`, ...).
    pub(crate) fn anon_name(&mut self) -> String {
        self.anon += 1;
        format!("#block{:03}", self.anon)
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
        for child in opts.driver.children() {
            if let BlockdevRef::Inline(child) = child {
                self.check_names(child)?;
            }
        }
        Ok(())
    }

    pub(crate) fn child(&mut self, r: &BlockdevRef) -> Result<Arc<Node>> {
        match r {
            BlockdevRef::Reference(name) => self.lookup(name),
            BlockdevRef::Inline(opts) => self.open(opts),
        }
    }

    pub(crate) fn open(&mut self, opts: &BlockdevOptions) -> Result<Arc<Node>> {
        let node = self.open_node(opts)?;
        // A new node gets the bitmaps its image keeps (a reopened one keeps its own).
        if let Err(e) = node.load_persistent_bitmaps() {
            let name = node.name().to_string();
            drop(node);
            self.remove_unused(&name);
            return Err(e);
        }
        Ok(node)
    }

    /// [`Graph::open`] without loading the image's persistent bitmaps (a reopen).
    pub(crate) fn open_node(&mut self, opts: &BlockdevOptions) -> Result<Arc<Node>> {
        let common = &opts.common;
        let name = match &common.node_name {
            Some(n) => n.clone(),
            None => self.anon_name(),
        };
        let driver = opts.driver.open(&mut OpenCtx::new(self, &name, common))?;
        let flags = NodeFlags {
            read_only: common.read_only,
            discard_unmap: common.discard == DiscardMode::Unmap,
            detect_zeroes: common.detect_zeroes,
            no_flush: common.cache_no_flush,
            cache_direct: common.cache_direct,
        };
        let node = Arc::new(Node::new(name.clone(), driver, flags));
        let mut stored = opts.clone();
        stored.common.node_name = Some(name.clone());
        self.options.insert(name.clone(), stored);
        self.nodes.insert(name, node.clone());
        Ok(node)
    }

    /// Opens the backing file a qcow2 header names (relative to the image's own
    /// directory), read-only, with the format the header gives or probed; the chain
    /// is at most [`MAX_BACKING_DEPTH`] deep and may not loop.
    pub(crate) fn open_backing_file(
        &mut self,
        image: &str,
        name: &str,
        format: Option<&str>,
    ) -> Result<Arc<Node>> {
        let path = match Path::new(image).parent() {
            Some(dir) if Path::new(name).is_relative() => dir.join(name),
            _ => PathBuf::from(name),
        };
        let canonical = std::fs::canonicalize(&path).map_err(|source| BlockError::Open {
            path: path.display().to_string(),
            source,
        })?;
        if self.chain.len() >= MAX_BACKING_DEPTH {
            return Err(BlockError::Graph(format!(
                "backing chain of '{image}' is deeper than {MAX_BACKING_DEPTH} images"
            )));
        }
        if self.chain.contains(&canonical)
            || std::fs::canonicalize(image).ok() == Some(canonical.clone())
        {
            return Err(BlockError::Graph(format!(
                "backing chain of '{image}' loops back to '{}'",
                canonical.display()
            )));
        }
        let format = match format {
            Some(f) => f.to_string(),
            None => probe_format(&canonical)?,
        };
        if format != "qcow2" && format != "raw" {
            return Err(BlockError::Graph(format!(
                "backing file '{}' has format '{format}', which vubd cannot open",
                path.display()
            )));
        }
        let opts = BlockdevOptions::from_json(&json!({
            "driver": format,
            "read-only": true,
            "file": {
                "driver": "file",
                "filename": canonical.display().to_string(),
                "read-only": true,
            },
        }))?;
        self.chain.push(canonical);
        let r = self.open(&opts);
        self.chain.pop();
        r
    }

    /// Every node, each after all the nodes that have it as a child (the order in
    /// which to close images: a format node writes into its children as it closes).
    pub fn nodes_parents_first(&self) -> Vec<Arc<Node>> {
        let mut parents: BTreeMap<&str, usize> =
            self.nodes.keys().map(|k| (k.as_str(), 0)).collect();
        for n in self.nodes.values() {
            for c in n.children() {
                if let Some(count) = parents.get_mut(c.node().name()) {
                    *count += 1;
                }
            }
        }
        let mut ready: Vec<&str> = parents
            .iter()
            .filter(|(_, &n)| n == 0)
            .map(|(&k, _)| k)
            .collect();
        let mut out = Vec::with_capacity(self.nodes.len());
        while let Some(name) = ready.pop() {
            let node = &self.nodes[name];
            out.push(node.clone());
            for c in node.children() {
                if let Some((&k, count)) = parents.get_key_value(c.node().name()) {
                    let left = count - 1;
                    parents.insert(k, left);
                    if left == 0 {
                        ready.push(k);
                    }
                }
            }
        }
        out
    }

    /// The nodes that have `name` as a child, with the child's name for them.
    pub fn parents(&self, name: &str) -> Vec<(String, &'static str)> {
        let Some(node) = self.nodes.get(name) else {
            return Vec::new();
        };
        node.parents()
            .iter()
            .filter_map(|e| match e.parent() {
                Parent::Node(p) => Some((p.clone(), e.name())),
                _ => None,
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
    pub(crate) fn remove_unused(&mut self, name: &str) {
        let Some(node) = self.nodes.remove(name) else {
            return;
        };
        self.options.remove(name);
        // A clean close: the persistent bitmaps go back into the image.
        if let Err(e) = node.store_persistent_bitmaps() {
            log::error!("node '{name}': storing its persistent bitmaps failed: {e}");
        }
        let children: Vec<Arc<Node>> = node.children().iter().map(|c| c.node_arc()).collect();
        drop(node);
        for c in children {
            let child = c.name().to_string();
            drop(c);
            if !self.owned.contains(&child) && self.parents(&child).is_empty() {
                self.remove_unused(&child);
            }
        }
    }

    /// QEMU's `ImageInfo` of a node; `flat` leaves out the backing chain.
    fn image_info(&self, node: &Node, flat: bool) -> ImageInfo {
        let backing = backing_of(node);
        ImageInfo {
            filename: node.driver().filename(),
            format: node.driver_name().to_string(),
            virtual_size: node.size(),
            dirty_flag: false,
            actual_size: node.driver().actual_size(),
            driver: node.driver().image_info(),
            full_backing_filename: backing.as_ref().map(|b| b.driver().filename()),
            backing_image: backing
                .filter(|_| !flat)
                .map(|b| Box::new(self.image_info(&b, flat))),
            // As QEMU: listed when the driver keeps internal snapshots and has some.
            snapshots: node.driver().snapshot_list().ok().filter(|s| !s.is_empty()),
        }
    }

    /// Whether no node of the graph has `node` as a child (QEMU's root nodes: only
    /// exports, or nothing, use them).
    pub fn is_root(&self, node: &Node) -> bool {
        self.parents(node.name()).is_empty()
    }

    /// QEMU's `BlockDeviceInfo` of a node (`query-named-block-nodes`).
    pub fn node_info(&self, node: &Node, flat: bool) -> BlockDeviceInfo {
        let flags = node.flags();
        let detect_zeroes = match flags.detect_zeroes {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        };
        let mut depth = 0;
        let mut next = backing_of(node);
        let backing_file = next.as_ref().map(|b| b.driver().filename());
        // As QEMU, the depth is counted only for the full (not flat) answer.
        while let Some(b) = next.filter(|_| !flat) {
            depth += 1;
            next = backing_of(&b);
        }
        BlockDeviceInfo {
            file: node.driver().filename(),
            node_name: node.name().to_string(),
            ro: node.is_read_only(),
            drv: node.driver_name().to_string(),
            backing_file_depth: depth,
            encrypted: node.driver().is_encrypted(),
            detect_zeroes,
            bps: 0,
            bps_rd: 0,
            bps_wr: 0,
            iops: 0,
            iops_rd: 0,
            iops_wr: 0,
            image: self.image_info(node, flat),
            cache: BlockdevCacheInfo {
                writeback: true,
                direct: flags.cache_direct,
                no_flush: flags.no_flush,
            },
            write_threshold: node.write_threshold(),
            backing_file,
            dirty_bitmaps: node.dirty_bitmaps_info(),
        }
    }

    /// Every node's `BlockDeviceInfo`, in node-name order.
    pub fn query_named_block_nodes(&self, flat: bool) -> Vec<BlockDeviceInfo> {
        self.nodes
            .values()
            .map(|n| self.node_info(n, flat))
            .collect()
    }
}

/// The node's `backing` child, if it has one.
fn backing_of(node: &Node) -> Option<Arc<Node>> {
    node.backing()
}

/// A drained section on a set of nodes (see [`Graph::drain`]); dropping it ends the
/// section and lets the held requests go.
pub struct Drained {
    nodes: Vec<Arc<Node>>,
    /// The users' edges of the nodes (see [`Edge::activity`]).
    users: Vec<Arc<Edge>>,
}

impl Drop for Drained {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.driver().drain_end();
            n.quiesce_end();
        }
        for u in &self.users {
            u.activity().quiesce_end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: serde_json::Value) -> BlockdevOptions {
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
    fn parents_come_before_their_children() {
        let mut g = Graph::new();
        g.add(&opts(json!({"driver": "null-co", "node-name": "a-base"})))
            .unwrap();
        g.add(&opts(
            json!({"driver": "raw", "node-name": "m-mid", "file": "a-base"}),
        ))
        .unwrap();
        g.add(&opts(
            json!({"driver": "raw", "node-name": "z-top", "file": "m-mid"}),
        ))
        .unwrap();
        g.add(&opts(
            json!({"driver": "raw", "node-name": "b-other", "file": "a-base"}),
        ))
        .unwrap();
        let order: Vec<String> = g
            .nodes_parents_first()
            .iter()
            .map(|n| n.name().to_string())
            .collect();
        assert_eq!(order.len(), 4);
        let at = |n: &str| order.iter().position(|o| o == n).unwrap();
        assert!(
            at("z-top") < at("m-mid") && at("m-mid") < at("a-base"),
            "{order:?}"
        );
        assert!(at("b-other") < at("a-base"), "{order:?}");
    }

    /// Which users may share a node, as QEMU decides (texts checked against
    /// qemu-storage-daemon 7.2 where they are QEMU's).
    #[test]
    fn permission_table() {
        let rw = Perm::CONSISTENT_READ | Perm::WRITE;
        let dir = std::env::temp_dir().join(format!("vubd-perm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("f.qcow2");
        qcow::block_on(async {
            let io = qcow::FileIo::create(&img).unwrap();
            qcow::create(io, &qcow::CreateOptions::new(1 << 20))
                .await
                .unwrap();
        });
        let mut g = Graph::new();
        let f = g
            .add(&opts(json!({"driver": "file", "node-name": "f",
                "filename": img.display().to_string()})))
            .unwrap();
        let export = |g: &Graph, n: &Arc<Node>, p: Perm| {
            g.attach_user(Parent::Backend(None), "root", n, p, Perm::ALL)
        };
        // Two writable exports of one node: allowed (QEMU's exports share all).
        let e1 = export(&g, &f, rw).unwrap();
        let e2 = export(&g, &f, rw).unwrap();
        drop(e2);
        // A qcow2 node over a file an export writes: the format unshares write.
        let err = g
            .add(&opts(
                json!({"driver": "qcow2", "node-name": "q", "file": "f"}),
            ))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "Permission conflict on node 'f': permissions 'write' are both required by an unnamed block device (uses node 'f' as 'root' child) and unshared by node 'q' (uses node 'f' as 'file' child)."
        );
        assert!(g.get("q").is_none());
        // A job that writes and unshares write (commit's base) next to a writer.
        let job = Parent::Job {
            kind: "commit",
            id: "j".into(),
        };
        let base_perm = Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE;
        let base_shared = Perm::CONSISTENT_READ | Perm::GRAPH_MOD | Perm::WRITE_UNCHANGED;
        let err = g
            .attach_user(job.clone(), "base", &f, base_perm, base_shared)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("Permission conflict on node 'f': permissions 'write' are both required by an unnamed block device"), "{err}");
        drop(e1);
        // With only a reader, the job may write.
        let reader = export(&g, &f, Perm::CONSISTENT_READ).unwrap();
        let j = g
            .attach_user(job, "base", &f, base_perm, base_shared)
            .unwrap();
        // ...and then a writer is refused.
        assert!(export(&g, &f, rw).is_err());
        drop((j, reader));
        // A resize of a node whose format parent unshares resize.
        g.add(&opts(
            json!({"driver": "raw", "node-name": "r", "file": "f"}),
        ))
        .unwrap();
        export(&g, &f, Perm::RESIZE).unwrap();
        // Writers of a read-only node.
        let ro = g
            .add(&opts(
                json!({"driver": "null-co", "node-name": "n", "read-only": true}),
            ))
            .unwrap();
        assert_eq!(
            export(&g, &ro, rw).unwrap_err().to_string(),
            "Block node is read-only"
        );
        export(&g, &ro, Perm::CONSISTENT_READ).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn node_info_shape() {
        let mut g = Graph::new();
        let n = g
            .add(&opts(
                json!({"driver": "null-co", "node-name": "n", "size": 4096}),
            ))
            .unwrap();
        let info = crate::info::to_json(&g.node_info(&n, true));
        assert_eq!(info["drv"], "null-co");
        assert_eq!(info["image"]["virtual-size"], 4096);
        assert_eq!(info["file"], "null-co://");
        assert_eq!(info["cache"]["no-flush"], false);
    }
}

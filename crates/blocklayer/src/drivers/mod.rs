//! The drivers, one folder each (its options, opening and, where it has one, image
//! creation), and [`DRIVERS`], the one table of them that option parsing, opening,
//! `blockdev-create` and the error texts naming drivers go through. A new driver is
//! a new folder and one row here.
//!
//! Protocols: `file`/`host_device`, `null-co`/`null-aio`, `nbd`, `rbd` (Ceph); formats:
//! `raw`, `qcow2`, `luks`; filters: `blkdebug`, `copy-on-read`, `copy-before-write`,
//! `throttle`; `snapshot-access`, which
//! reads the view a `copy-before-write` filter keeps. [`lock`] is QEMU's image locking of host
//! files, which `file` and the image tools share.

pub mod blkdebug;
pub mod copy_before_write;
pub mod copy_on_read;
pub mod file;
pub mod forward;
pub mod job_filter;
pub mod lock;
pub mod luks;
pub mod nbd;
pub mod null;
pub mod qcow2;
pub mod raw;
pub mod rbd;
pub mod snapshot_access;
pub mod throttle;

use crate::edge::{Edge, Role};
use crate::error::{BlockError, Result};
use crate::graph::{Drained, Graph};
use crate::node::Node;
use crate::options::coerce::Fields;
use crate::options::{self, BlockdevOptions, BlockdevRef, CommonOptions, DriverOptions};
use std::sync::Arc;
use std::time::Duration;

/// What a driver is to the graph (QEMU: protocol drivers, formats, and filters, whose
/// one child holds the same data as the node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Protocol,
    Format,
    Filter,
}

/// Parses a driver's own options from what the common options left (`name`: the
/// driver name the options gave, one of the entry's names).
pub type ParseFn = fn(
    f: &mut Fields,
    common: &CommonOptions,
    name: &'static str,
) -> options::Result<Box<dyn DriverOptions>>;

/// The work of a `blockdev-create` job, run once the options were checked.
pub type CreateWork = Box<dyn FnOnce() -> Result<()> + Send>;

/// Checks `blockdev-create` options (`f`: the `options` object after `driver`) against
/// the graph and returns the work that creates the image.
pub type CreateFn = fn(f: Fields, graph: &Graph) -> Result<CreateWork>;

/// One row of the driver table.
pub struct DriverEntry {
    /// The QEMU driver names the row opens (`null-co` and `null-aio` are one driver).
    pub names: &'static [&'static str],
    pub kind: Kind,
    pub parse: ParseFn,
    /// `blockdev-create` support, if the driver creates images.
    pub create: Option<CreateFn>,
    /// The driver's options that `blockdev-reopen` may change (those QEMU's
    /// `bdrv_reopen_prepare` of the driver takes over); every other one must keep
    /// its value.
    pub reopen_mutable: &'static [&'static str],
}

/// Every driver vubd has, in the order error texts list them.
pub static DRIVERS: &[DriverEntry] = &[
    file::ENTRY,
    file::HOST_DEVICE_ENTRY,
    raw::ENTRY,
    null::ENTRY,
    nbd::ENTRY,
    blkdebug::ENTRY,
    qcow2::ENTRY,
    luks::ENTRY,
    copy_on_read::ENTRY,
    copy_before_write::ENTRY,
    snapshot_access::ENTRY,
    throttle::ENTRY,
    rbd::ENTRY,
];

/// The table row for the driver name `name`, and the name as the table spells it.
pub fn find(name: &str) -> Option<(&'static DriverEntry, &'static str)> {
    DRIVERS
        .iter()
        .find_map(|e| e.names.iter().find(|n| **n == name).map(|n| (e, *n)))
}

/// The options of the driver named `name` that `blockdev-reopen` may change.
pub fn reopen_mutable(name: &str) -> &'static [&'static str] {
    find(name).map_or(&[], |(e, _)| e.reopen_mutable)
}

/// The kind of the driver named `name`, if vubd has it.
pub fn kind(name: &str) -> Option<Kind> {
    find(name).map(|(e, _)| e.kind)
}

/// The names of the drivers whose rows `pick` selects, as a list in prose ("a, b and
/// c").
pub fn names_text(pick: impl Fn(&DriverEntry) -> bool) -> String {
    let names: Vec<&str> = DRIVERS
        .iter()
        .filter(|e| pick(e))
        .flat_map(|e| e.names.iter().copied())
        .collect();
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

/// The `blockdev-create` function of the driver named `name`, or the error QMP
/// answers for a driver that creates no images.
pub fn create_fn(name: &str) -> Result<CreateFn> {
    find(name).and_then(|(e, _)| e.create).ok_or_else(|| {
        BlockError::Graph(format!(
            "Driver '{name}' does not support image creation in vubd ({} do)",
            names_text(|e| e.create.is_some())
        ))
    })
}

/// What a driver's options get to open the driver: the graph, for the children
/// (given inline or by reference), the new node's name and its common options.
pub struct OpenCtx<'a> {
    pub(crate) graph: &'a mut Graph,
    /// The name of the node being opened.
    pub name: &'a str,
    pub common: &'a CommonOptions,
}

impl<'a> OpenCtx<'a> {
    pub(crate) fn new(graph: &'a mut Graph, name: &'a str, common: &'a CommonOptions) -> Self {
        OpenCtx {
            graph,
            name,
            common,
        }
    }

    /// The child `r` names, opened first if it is given inline.
    pub fn child(&mut self, r: &BlockdevRef) -> Result<Arc<Node>> {
        self.graph.child(r)
    }

    /// Opens a node of its own (a file the image header names).
    pub fn open(&mut self, opts: &BlockdevOptions) -> Result<Arc<Node>> {
        self.graph.open(opts)
    }

    /// Opens the backing file an image header names (see
    /// [`Graph::open_backing_file`]).
    pub fn open_backing_file(
        &mut self,
        image: &str,
        name: &str,
        format: Option<&str>,
    ) -> Result<Arc<Node>> {
        self.graph.open_backing_file(image, name, format)
    }

    /// The edge from the new node to `child` under the child name `name`.
    pub fn edge(&self, name: &'static str, role: Role, child: &Arc<Node>) -> Arc<Edge> {
        Edge::child_of(self.name, name, role, child)
    }

    /// The secret objects (for `key-secret` and the like).
    pub fn secrets(&self) -> &crate::secret::Secrets {
        self.graph.secrets()
    }

    /// The TLS credential objects.
    pub fn tls_creds(&self) -> &crate::tls::TlsCredsTable {
        self.graph.tls_creds()
    }

    /// The node `node_name` of the graph, if it exists.
    pub fn lookup(&self, node_name: &str) -> Option<Arc<Node>> {
        self.graph.get(node_name)
    }

    /// Opens a drained section on `node` (see [`Graph::drain`]).
    pub fn drain(&self, node: &Arc<Node>, timeout: Duration) -> Result<Drained> {
        self.graph.drain(node, timeout)
    }

    /// The `throttle-group` object `id`, if it exists.
    pub fn throttle_group(&self, id: &str) -> Option<Arc<crate::throttle::ThrottleGroup>> {
        self.graph.throttle_groups.get(id).cloned()
    }

    /// Drops `child` again if `r` opened it inline (the node that wanted it failed to
    /// open).
    pub fn forget_inline(&mut self, r: &BlockdevRef, child: &Node) {
        if matches!(r, BlockdevRef::Inline(_)) {
            self.graph.remove_unused(child.name());
        }
    }
}

//! Edges of the block graph (QEMU: BdrvChild): a parent's use of a child node, with
//! the child's role for the parent and the permissions the parent takes and shares.
//!
//! The parent holds its edges; the child lists them (weakly) as its parents. An
//! edge's node can be re-pointed (node replacement, snapshots, pivots) while the
//! graph is drained: the request path reads the pointer with one lock-free load.

use crate::node::{Activity, Node};
use crate::perm::Perm;
use arc_swap::{ArcSwap, Guard};
use std::sync::atomic::{AtomicPtr, AtomicU8, Ordering};
use std::sync::{Arc, Weak};

/// A node read through an edge, valid for one operation.
pub type NodeRef = Guard<Arc<Node>>;

/// What a child is to its parent (QEMU's `BdrvChildRole`, reduced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A format driver's metadata and data (`file` of qcow2).
    File,
    /// The copy-on-write source of a format driver.
    Backing,
    /// An external data file (qcow2 `data-file`).
    DataFile,
    /// A filter's or raw's child: what the parent reads and writes is the child's.
    Filtered,
    /// The root of a user: an export's or a job's node.
    Root,
}

/// Who uses the node through an edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parent {
    /// A node of the graph (by node-name).
    Node(String),
    /// A block backend: an export or another monitor-level user. QEMU describes
    /// unnamed ones as "an unnamed block device".
    Backend(Option<String>),
    /// A block job (`stream`, `commit`, ...) by id.
    Job { kind: &'static str, id: String },
}

impl Parent {
    /// QEMU's description of a parent in permission errors.
    pub fn describe(&self) -> String {
        match self {
            Parent::Node(n) => format!("node '{n}'"),
            Parent::Backend(Some(n)) => format!("block device '{n}'"),
            Parent::Backend(None) => "an unnamed block device".to_string(),
            Parent::Job { kind, id } => format!("{kind} job '{id}'"),
        }
    }
}

pub struct Edge {
    /// The child's name for the parent (`file`, `backing`, `root`...).
    name: &'static str,
    role: Role,
    parent: Parent,
    node: ArcSwap<Node>,
    /// The node `node` holds, for [`Edge::node_while_admitted`].
    node_ptr: AtomicPtr<Node>,
    /// A user's requests and the drained sections of its node (backends' and jobs'
    /// edges; unused on a node's edges to its children): see [`Edge::activity`].
    activity: Activity,
    perm: AtomicU8,
    shared: AtomicU8,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("name", &self.name)
            .field("parent", &self.parent)
            .field("node", &self.node.load().name())
            .finish()
    }
}

impl Edge {
    /// A new edge to `node`, registered as one of its parents. Node parents get their
    /// permissions from the graph's next permission update; other users state theirs.
    pub fn attach(
        parent: Parent,
        name: &'static str,
        role: Role,
        node: &Arc<Node>,
        perm: Perm,
        shared: Perm,
    ) -> Arc<Edge> {
        let e = Arc::new(Edge {
            name,
            role,
            parent,
            node: ArcSwap::new(node.clone()),
            node_ptr: AtomicPtr::new(Arc::as_ptr(node).cast_mut()),
            activity: Activity::default(),
            perm: AtomicU8::new(perm.bits()),
            shared: AtomicU8::new(shared.bits()),
        });
        node.add_parent(Arc::downgrade(&e));
        e
    }

    /// An edge from a node-to-be (its name known, the node not built yet) to `node`.
    pub fn child_of(
        name_of_parent: &str,
        name: &'static str,
        role: Role,
        node: &Arc<Node>,
    ) -> Arc<Edge> {
        Edge::attach(
            Parent::Node(name_of_parent.to_string()),
            name,
            role,
            node,
            Perm::NONE,
            Perm::ALL,
        )
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn parent(&self) -> &Parent {
        &self.parent
    }

    /// The child node, for the duration of one operation.
    #[inline]
    pub fn node(&self) -> Guard<Arc<Node>> {
        self.node.load()
    }

    /// The requests of a user (a block backend) of the edge's node and the drained
    /// sections open on that node: a backend counts its requests here rather than
    /// in the node, and every drained section that includes the node includes the
    /// activities of its users' edges ([`crate::graph::Graph::drain`]), so that it
    /// waits for them and holds new ones (QEMU counts a BlockBackend's requests in
    /// the BlockBackend, and a drain polls the node's parents).
    #[inline]
    pub(crate) fn activity(&self) -> &Activity {
        &self.activity
    }

    /// The child node for a request counted in the edge's parent, without
    /// [`Edge::node`]'s guard (a backend's requests, and those of a throttle node
    /// at a backend's root: see the throttle driver's `admitted`).
    ///
    /// # Safety
    /// The caller holds a request counted in the edge's parent (the parent node's
    /// requests in flight, or for a user's edge [`Edge::activity`]), admitted while
    /// no drained section was open on it, for as long as it uses the reference. The
    /// edge is only re-pointed inside a drained section of its old node
    /// ([`Edge::repoint`]), which includes the node's parents and its users' edges
    /// and so waits for the request: until then the edge points at the same node,
    /// and keeps it.
    #[inline]
    pub(crate) unsafe fn node_while_admitted(&self) -> &Node {
        // SAFETY: the pointer is the node the edge's `ArcSwap` holds (set with it
        // at attach and re-point); by the caller's contract it is neither
        // re-pointed nor dropped while the reference is used.
        unsafe { &*self.node_ptr.load(Ordering::Acquire) }
    }

    /// The child node, as a reference of its own.
    pub fn node_arc(&self) -> Arc<Node> {
        self.node.load_full()
    }

    pub fn perm(&self) -> Perm {
        Perm::from_bits(self.perm.load(Ordering::Acquire))
    }

    pub fn shared(&self) -> Perm {
        Perm::from_bits(self.shared.load(Ordering::Acquire))
    }

    pub(crate) fn set_perms(&self, perm: Perm, shared: Perm) {
        self.perm.store(perm.bits(), Ordering::Release);
        self.shared.store(shared.bits(), Ordering::Release);
    }

    /// Re-points the edge at `node` (the caller has drained both nodes and checks the
    /// permissions afterwards). Returns the node it pointed at.
    pub(crate) fn repoint(self: &Arc<Self>, node: &Arc<Node>) -> Arc<Node> {
        debug_assert!(
            self.node.load().is_quiesced(),
            "edge {} re-pointed outside a drained section",
            self.name
        );
        let old = self.node.swap(node.clone());
        self.node_ptr
            .store(Arc::as_ptr(node).cast_mut(), Ordering::Release);
        old.remove_parent(Arc::as_ptr(self));
        node.add_parent(Arc::downgrade(self));
        old
    }

    pub(crate) fn ptr(self: &Arc<Self>) -> *const Edge {
        Arc::as_ptr(self)
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.node.load().remove_parent(self as *const Edge);
    }
}

/// A parent list entry: a weak reference to an edge.
pub(crate) type ParentRef = Weak<Edge>;

//! Block backends (QEMU: BlockBackend): one handle per user of a node, an export or a
//! job. A backend holds its root edge (with the permissions it takes and shares) and
//! is where drained sections stop new requests: a request arriving while its root
//! node is drained waits, without spinning, until the section ends.
//!
//! The root can be re-pointed under the backend (an external snapshot, the pivot of
//! an active commit): requests already admitted finish on the node they started on,
//! because the graph changes only inside drained sections.

use crate::aio::iovec::IoVec;
use crate::edge::{Edge, Parent};
use crate::error::Result;
use crate::graph::Graph;
use crate::node::Node;
use crate::perm::Perm;
use arc_swap::Guard;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

pub struct BlockBackend {
    root: Arc<Edge>,
}

impl std::fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBackend")
            .field("root", &self.root)
            .finish()
    }
}

/// A request admitted into the root node: counted in its in-flight requests until
/// dropped, so that a drain waits for it (the node's `*_entered` operations do not
/// count it again).
struct Admitted {
    node: Guard<Arc<Node>>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.node.leave();
    }
}

/// Waits until no drained section is open on the node.
struct WaitUnquiesced<'a>(&'a Node);

impl Future for WaitUnquiesced<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.wait_unquiesced(cx.waker()) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

impl BlockBackend {
    /// Attaches a backend to `node`, refused (QEMU's texts) when its permissions
    /// conflict with the node's other users.
    pub fn new(
        graph: &Graph,
        parent: Parent,
        node: &Arc<Node>,
        perm: Perm,
        shared: Perm,
    ) -> Result<Self> {
        Self::with_edge_name(graph, parent, "root", node, perm, shared)
    }

    /// As [`BlockBackend::new`] with another name for the edge (a job's edges are
    /// "main node", "intermediate node", "base", ... as in QEMU).
    pub fn with_edge_name(
        graph: &Graph,
        parent: Parent,
        edge: &'static str,
        node: &Arc<Node>,
        perm: Perm,
        shared: Perm,
    ) -> Result<Self> {
        let root = graph.attach_user(parent, edge, node, perm, shared)?;
        Ok(BlockBackend { root })
    }

    /// The root node now.
    #[inline]
    pub fn node(&self) -> Guard<Arc<Node>> {
        self.root.node()
    }

    pub fn node_arc(&self) -> Arc<Node> {
        self.root.node_arc()
    }

    /// Admits a request: waits while the root node is drained.
    async fn admit(&self) -> Admitted {
        loop {
            let node = self.root.node();
            // Count the request in first, then look: a drain that starts meanwhile
            // either sees it counted or is seen here.
            node.enter_raw();
            if !node.is_quiesced() {
                return Admitted { node };
            }
            node.leave();
            WaitUnquiesced(&node).await;
        }
    }

    pub async fn read(&self, offset: u64, iov: IoVec) -> Result<()> {
        let a = self.admit().await;
        a.node.read_entered(offset, iov).await
    }

    pub async fn write(&self, offset: u64, iov: IoVec, fua: bool) -> Result<()> {
        let a = self.admit().await;
        a.node.write_entered(offset, iov, fua).await
    }

    pub async fn flush(&self) -> Result<()> {
        let a = self.admit().await;
        a.node.flush_entered().await
    }

    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let a = self.admit().await;
        a.node.discard_entered(offset, len).await
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<()> {
        let a = self.admit().await;
        a.node
            .write_zeroes_entered(offset, len, may_unmap, fua)
            .await
    }

    /// Whether `offset..` is allocated in the root node itself (see
    /// [`crate::driver::Driver::is_allocated`]).
    pub async fn is_allocated(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        let a = self.admit().await;
        a.node.driver().is_allocated(offset, len).await
    }

    /// Runs `f` on the root node as one admitted request (a job's chunk).
    pub async fn with_node<T, F: Future<Output = T>>(&self, f: impl FnOnce(Arc<Node>) -> F) -> T {
        let a = self.admit().await;
        f(Arc::clone(&a.node)).await
    }
}

//! Block backends (QEMU: BlockBackend): one handle per user of a node, an export or a
//! job. A backend holds its root edge (with the permissions it takes and shares) and
//! is where drained sections stop new requests: a request arriving while its root
//! node is drained waits, without spinning, until the section ends.
//!
//! A backend also carries what belongs to its user rather than to the node: the error
//! policies (`rerror`/`werror`, see [`crate::error_policy`]) with the I/O status and
//! stop state they leave, the write cache mode, and the I/O statistics of what the
//! user asked for (`query-blockstats`). The user accounts its own requests (it knows
//! what one request is: a virtio-blk discard of several ranges counts once).
//!
//! The root can be re-pointed under the backend (an external snapshot, the pivot of
//! an active commit): requests already admitted finish on the node they started on,
//! because the graph changes only inside drained sections.

use crate::aio::iovec::IoVec;
use crate::drivers::throttle::ThrottleDriver;
use crate::edge::{Edge, Parent};
use crate::error::Result;
use crate::error_policy::ErrorState;
pub use crate::error_policy::{ErrorAction, IoStatus, OnError};
use crate::events::{IoError, IoOperation};
use crate::graph::Graph;
use crate::node::{Activity, Node};
use crate::perm::Perm;
use crate::stats::{IoKind, IoStats};
use crate::throttle::Direction;
use arc_swap::Guard;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

pub struct BlockBackend {
    root: Arc<Edge>,
    /// `rerror`: the policy for failed reads.
    on_read_error: OnError,
    /// `werror`: the policy for failed writes, flushes, discards and write-zeroes.
    on_write_error: OnError,
    errors: ErrorState,
    /// The write cache mode: off means every write is stable before it completes
    /// (written with FUA).
    write_cache: AtomicBool,
    /// The statistics of what the user asked for (QEMU keeps them on the
    /// BlockBackend; the nodes keep their own).
    stats: StatsLines,
}

/// The statistics on cache lines of their own: every request of every iothread
/// writes them, and every request reads the root edge beside them. Two lines, as
/// x86's adjacent-line prefetcher moves pairs.
#[repr(align(128))]
struct StatsLines(IoStats);

impl std::fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBackend")
            .field("root", &self.root)
            .finish()
    }
}

/// A request admitted by a backend: counted in its root edge's activity until
/// dropped, so that a drain of the root node (or of a node above or below it) waits
/// for it, and the root node, which the edge cannot re-point meanwhile.
struct Admitted<'a> {
    node: &'a Node,
    activity: &'a Activity,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.activity.leave();
    }
}

/// Waits until no drained section is open on the backend's node. It keeps no
/// reference to the node: the section may re-point the edge (a job's filter taken
/// out), and a waiting request must not keep the old node, and so its edges to its
/// children, alive once the section has ended (as QEMU's requests waiting in
/// `blk_wait_while_drained`, which hold no node).
struct WaitUnquiesced<'a>(&'a Activity);

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
    /// conflict with the node's other users. It starts as QEMU's `blk_new`:
    /// `rerror=report`, `werror=enospc`, the write cache on.
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
        Ok(BlockBackend {
            root,
            on_read_error: OnError::Report,
            on_write_error: OnError::Enospc,
            errors: ErrorState::default(),
            write_cache: AtomicBool::new(true),
            stats: StatsLines(IoStats::with_idle_time()),
        })
    }

    /// Sets the error policies (`rerror`, `werror`).
    pub fn set_on_error(&mut self, rerror: OnError, werror: OnError) {
        self.on_read_error = rerror;
        self.on_write_error = werror;
    }

    /// The policy for failed reads (`read`) or for failed write-like requests.
    pub fn on_error(&self, read: bool) -> OnError {
        if read {
            self.on_read_error
        } else {
            self.on_write_error
        }
    }

    /// What to do with a request that failed with `errno`: `read` or write-like
    /// (writes, flushes, discards, write-zeroes), as QEMU's `blk_get_error_action`.
    #[inline]
    pub fn error_action(&self, read: bool, errno: i32) -> ErrorAction {
        self.on_error(read).action(errno)
    }

    /// Takes `action` for a request that failed with `errno` (QEMU's
    /// `blk_error_action`): with `stop` the backend stops and sets its I/O status
    /// first, then `BLOCK_IO_ERROR` is raised. Returns whether this error stopped the
    /// backend (the first since `cont`).
    pub fn apply_error_action(&self, read: bool, errno: i32, action: ErrorAction) -> bool {
        let data = self.io_error_event(read, errno, action);
        let stopped = action == ErrorAction::Stop && self.errors.stop(errno);
        crate::events::emit(crate::events::BlockEvent::IoError(data));
        stopped
    }

    /// The data of `BLOCK_IO_ERROR` (the backend has no name: `device` is empty).
    fn io_error_event(&self, read: bool, errno: i32, action: ErrorAction) -> IoError {
        IoError {
            device: String::new(),
            node_name: self.node().name().to_string(),
            operation: if read {
                IoOperation::Read
            } else {
                IoOperation::Write
            },
            action: action.name(),
            nospace: self.iostatus_enabled().then_some(errno == libc::ENOSPC),
            reason: std::io::Error::from_raw_os_error(errno).to_string(),
        }
    }

    /// Whether an error with action `stop` stopped the backend (until `cont`); its
    /// user takes no new requests meanwhile.
    #[inline]
    pub fn is_error_stopped(&self) -> bool {
        self.errors.is_stopped()
    }

    /// The `cont` generation (see [`ErrorState::resume_gen`]).
    #[inline]
    pub fn resume_gen(&self) -> u64 {
        self.errors.resume_gen()
    }

    /// `cont`: no longer stopped, the I/O status reset, held requests let retry (their
    /// user wakes them). Returns whether the backend was stopped.
    pub fn cont(&self) -> bool {
        self.errors.cont()
    }

    /// Whether the backend reports an I/O status: its policies can stop it.
    pub fn iostatus_enabled(&self) -> bool {
        crate::error_policy::iostatus_enabled(self.on_read_error, self.on_write_error)
    }

    pub fn iostatus(&self) -> IoStatus {
        self.errors.iostatus()
    }

    pub fn iostatus_reset(&self) {
        self.errors.iostatus_reset();
    }

    /// The write cache mode.
    #[inline]
    pub fn write_cache(&self) -> bool {
        self.write_cache.load(Ordering::Acquire)
    }

    /// Changes the write cache mode; returns the old one.
    pub fn set_write_cache(&self, on: bool) -> bool {
        self.write_cache.swap(on, Ordering::AcqRel)
    }

    /// The statistics of the backend's requests.
    #[inline]
    pub fn stats(&self) -> &IoStats {
        &self.stats.0
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
    async fn admit(&self) -> Admitted<'_> {
        loop {
            if let Some(a) = self.try_admit() {
                return a;
            }
            WaitUnquiesced(self.root.activity()).await;
        }
    }

    /// Admits a request at once unless the root node is drained: the request path's
    /// admission, without a future of its own.
    #[inline(always)]
    fn try_admit(&self) -> Option<Admitted<'_>> {
        let activity = self.root.activity();
        // Count the request in first, then look: a drain that starts meanwhile
        // either sees it counted or is seen here.
        activity.enter();
        if activity.is_quiesced() {
            // Out again, to wait without being counted.
            activity.leave();
            return None;
        }
        // SAFETY: the request is counted in the root edge's activity and was admitted
        // while no drained section was open on the root node; the `Admitted` guard
        // keeps it counted while the reference is used.
        let node = unsafe { self.root.node_while_admitted() };
        Some(Admitted { node, activity })
    }

    /// Reads. A throttle node at the root is passed here rather than through its
    /// generic path (see [`crate::drivers::throttle`]'s `admitted`), so that a group
    /// far above the load costs the request next to nothing.
    pub async fn read(&self, offset: u64, iov: IoVec) -> Result<()> {
        let a = match self.try_admit() {
            Some(a) => a,
            None => self.admit().await,
        };
        let Some(t) = a.node.driver().as_throttle() else {
            return a.node.read_entered(offset, iov).await;
        };
        let len = iov.len();
        let acct = IoStats::start(IoKind::Read, len);
        if !t.try_pass(Direction::Read, len) {
            t.wait_turn(Direction::Read, len).await;
        }
        // SAFETY: `a` holds the request admitted into the throttle node.
        let child = unsafe { t.child_of_admitted() };
        let r = child.read_entered(offset, iov).await;
        a.node.account(acct, &r, 0);
        r
    }

    /// Writes; with the write cache off every write is FUA. A throttle node at the
    /// root is passed as for reads, keeping what is the node's own: its
    /// serialisation against a job's copies, its write generation, statistics,
    /// dirty bitmaps and write threshold.
    pub async fn write(&self, offset: u64, iov: IoVec, fua: bool) -> Result<()> {
        let fua = fua || !self.write_cache();
        let a = match self.try_admit() {
            Some(a) => a,
            None => self.admit().await,
        };
        let t = match a.node.driver().as_throttle() {
            Some(t) if ThrottleDriver::passes_writes(a.node) => t,
            _ => return a.node.write_entered(offset, iov, fua).await,
        };
        let len = iov.len();
        let _serial = a.node.track_write(offset, len).await;
        let acct = IoStats::start(IoKind::Write, len);
        if !t.try_pass(Direction::Write, len) {
            t.wait_turn(Direction::Write, len).await;
        }
        // SAFETY: `a` holds the request admitted into the throttle node.
        let child = unsafe { t.child_of_admitted() };
        let r = child.write_entered(offset, iov, fua).await;
        a.node.note_write();
        a.node.account(acct, &r, offset.saturating_add(len));
        a.node.written(&r, offset, len);
        r
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
        let fua = fua || !self.write_cache();
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

    /// The block status of `offset..` in the root node, through its children (see
    /// [`crate::block_status::block_status`]).
    pub async fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<(crate::block_status::Extent, u64)> {
        let _a = self.admit().await;
        crate::block_status::block_status(&self.root.node_arc(), offset, len).await
    }

    /// Runs `f` on the root node as one admitted request (a job's chunk).
    pub async fn with_node<T, F: Future<Output = T>>(&self, f: impl FnOnce(Arc<Node>) -> F) -> T {
        let _a = self.admit().await;
        f(self.root.node_arc()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::BlockdevOptions;
    use serde_json::json;

    fn backend(g: &mut Graph) -> BlockBackend {
        let opts =
            BlockdevOptions::from_json(&json!({"driver": "null-co", "node-name": "n"})).unwrap();
        let n = g.add(&opts).unwrap();
        BlockBackend::new(
            g,
            Parent::Backend(None),
            &n,
            Perm::CONSISTENT_READ,
            Perm::ALL,
        )
        .unwrap()
    }

    #[test]
    fn defaults_are_qemus() {
        let mut g = Graph::new();
        let blk = backend(&mut g);
        assert_eq!(blk.on_error(true), OnError::Report);
        assert_eq!(blk.on_error(false), OnError::Enospc);
        assert!(blk.write_cache());
        assert!(blk.iostatus_enabled());
        assert_eq!(blk.iostatus(), IoStatus::Ok);
        assert!(!blk.is_error_stopped());
    }

    /// The direction chooses the policy: `rerror` for reads, `werror` for the rest.
    #[test]
    fn direction_chooses_the_policy() {
        let mut g = Graph::new();
        let mut blk = backend(&mut g);
        blk.set_on_error(OnError::Ignore, OnError::Enospc);
        assert_eq!(blk.error_action(true, libc::ENOSPC), ErrorAction::Ignore);
        assert_eq!(blk.error_action(false, libc::ENOSPC), ErrorAction::Stop);
        assert_eq!(blk.error_action(false, libc::EIO), ErrorAction::Report);
        blk.set_on_error(OnError::Stop, OnError::Report);
        assert_eq!(blk.error_action(true, libc::EIO), ErrorAction::Stop);
        assert_eq!(blk.error_action(false, libc::ENOSPC), ErrorAction::Report);
        assert!(blk.iostatus_enabled());
        blk.set_on_error(OnError::Report, OnError::Ignore);
        assert!(!blk.iostatus_enabled());
    }

    #[test]
    fn stop_sets_iostatus_and_cont_resets_it() {
        let mut g = Graph::new();
        let mut blk = backend(&mut g);
        blk.set_on_error(OnError::Report, OnError::Stop);
        let gen = blk.resume_gen();
        // Report and ignore leave the backend running.
        assert!(!blk.apply_error_action(false, libc::EIO, ErrorAction::Report));
        assert!(!blk.apply_error_action(false, libc::EIO, ErrorAction::Ignore));
        assert!(!blk.is_error_stopped());
        assert!(blk.apply_error_action(false, libc::ENOSPC, ErrorAction::Stop));
        assert!(!blk.apply_error_action(false, libc::EIO, ErrorAction::Stop));
        assert!(blk.is_error_stopped());
        assert_eq!(blk.iostatus(), IoStatus::Nospace);
        assert!(blk.cont());
        assert!(!blk.is_error_stopped());
        assert_eq!(blk.iostatus(), IoStatus::Ok);
        assert_ne!(blk.resume_gen(), gen);
    }

    #[test]
    fn io_error_event_data() {
        let mut g = Graph::new();
        let mut blk = backend(&mut g);
        blk.set_on_error(OnError::Report, OnError::Report);
        let v = crate::info::to_json(&blk.io_error_event(true, libc::EIO, ErrorAction::Report));
        assert_eq!(
            v,
            json!({"device": "", "node-name": "n", "operation": "read", "action": "report",
                "reason": std::io::Error::from_raw_os_error(libc::EIO).to_string()})
        );
        // With an I/O status, the event says whether the disk is full.
        blk.set_on_error(OnError::Report, OnError::Enospc);
        let v = crate::info::to_json(&blk.io_error_event(false, libc::ENOSPC, ErrorAction::Stop));
        assert_eq!(v["operation"], "write");
        assert_eq!(v["action"], "stop");
        assert_eq!(v["nospace"], true);
    }

    /// A request held by a drained section keeps no reference to the root node:
    /// once the section re-pointed the backend and ended, the old node (and with it
    /// its edges to its children) is gone before the request runs again.
    #[test]
    fn a_held_request_keeps_no_old_root() {
        let mut g = Graph::new();
        let blk = backend(&mut g);
        let m = g
            .add(
                &BlockdevOptions::from_json(&json!({"driver": "null-co", "node-name": "m"}))
                    .unwrap(),
            )
            .unwrap();
        let n = g.lookup("n").unwrap();
        let old = Arc::downgrade(&n);
        let mut req = Box::pin(blk.flush());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        {
            let _d = g
                .drain_all(&[n.clone(), m.clone()], std::time::Duration::from_secs(5))
                .unwrap();
            assert!(req.as_mut().poll(&mut cx).is_pending());
            g.replace_node(&n, &m, None).unwrap();
        }
        drop(n);
        g.remove("n").unwrap();
        // Not polled since the section ended: the node went with the graph's own
        // reference.
        assert!(old.upgrade().is_none());
        assert!(req.as_mut().poll(&mut cx).is_ready());
        assert_eq!(blk.node().name(), "m");
    }

    #[test]
    fn write_cache_mode() {
        let mut g = Graph::new();
        let blk = backend(&mut g);
        assert!(blk.set_write_cache(false));
        assert!(!blk.write_cache());
        assert!(!blk.set_write_cache(true));
        assert!(blk.write_cache());
    }
}

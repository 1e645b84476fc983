//! The filters block jobs put above the node they work on (QEMU's `commit_top` and
//! `mirror_top`): every request passes through unchanged; what they change is the
//! permissions. A filter takes on its child only what the job allows its users
//! (nothing for commit, write for an active commit that forwards guest writes), and
//! never consistent read, so that the job may refuse other readers of the nodes it is
//! about to drop from the chain without refusing the users of the chain above them.
//!
//! These nodes are implicit: the job inserts one with [`crate::Graph::insert_filter`]
//! inside a drained section and removes it when it ends; users cannot add them.

pub mod active;

pub use active::ActiveMirror;

use crate::aio::iovec::IoVec;
use crate::aio::LocalBoxFuture;
use crate::driver::Driver;
use crate::drivers::forward;
use crate::edge::Edge;
use crate::error::Result;
use crate::perm::Perm;
use std::sync::Arc;

/// Which job filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobFilterKind {
    /// Above the top of an intermediate commit: takes nothing on it.
    CommitTop,
    /// Above the source of an active commit (and of a mirror): takes write on it
    /// when its own users write, to forward their writes.
    MirrorTop,
}

pub struct JobFilter {
    kind: JobFilterKind,
    child: Arc<Edge>,
    /// A write-blocking mirror's way to its target.
    active: Option<Arc<ActiveMirror>>,
}

impl JobFilter {
    /// `child` is the filter's `backing` edge to the node it sits on.
    pub fn new(kind: JobFilterKind, child: Arc<Edge>) -> Self {
        JobFilter {
            kind,
            child,
            active: None,
        }
    }

    /// A `mirror_top` filter that also writes to a write-blocking mirror's target.
    pub fn with_active(child: Arc<Edge>, active: Arc<ActiveMirror>) -> Self {
        JobFilter {
            kind: JobFilterKind::MirrorTop,
            child,
            active: Some(active),
        }
    }
}

impl Driver for JobFilter {
    fn driver_name(&self) -> &'static str {
        match self.kind {
            JobFilterKind::CommitTop => "commit_top",
            JobFilterKind::MirrorTop => "mirror_top",
        }
    }

    fn size(&self) -> u64 {
        self.child.node().size()
    }

    fn children(&self) -> Vec<Arc<Edge>> {
        vec![self.child.clone()]
    }

    fn child_perm(
        &self,
        _child: &Edge,
        _writable: bool,
        perm: Perm,
        _shared: Perm,
    ) -> (Perm, Perm) {
        match self.kind {
            JobFilterKind::CommitTop => (Perm::NONE, Perm::ALL),
            JobFilterKind::MirrorTop => (perm & Perm::WRITE, Perm::ALL),
        }
    }

    fn supports_fua(&self) -> bool {
        true
    }

    fn is_read_only(&self) -> bool {
        self.child.node().is_read_only()
    }

    fn filename(&self) -> String {
        self.child.node().driver().filename()
    }

    fn is_allocated(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<(bool, u64)>> {
        Box::pin(async move { self.child.node().driver().is_allocated(offset, len).await })
    }

    fn read<'a>(&'a self, offset: u64, iov: IoVec) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move { self.child.node().read(offset, iov).await })
    }

    fn write<'a>(&'a self, offset: u64, iov: IoVec, fua: bool) -> LocalBoxFuture<'a, Result<()>> {
        match &self.active {
            Some(a) => Box::pin(a.write(&self.child, offset, iov, fua)),
            None => forward::write(&self.child, offset, iov, fua),
        }
    }

    fn flush(&self) -> LocalBoxFuture<'_, Result<()>> {
        forward::flush(&self.child)
    }

    fn discard(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        forward::discard(&self.child, offset, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        forward::allocate(&self.child, offset, len)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> LocalBoxFuture<'_, Result<()>> {
        forward::write_zeroes(&self.child, offset, len, may_unmap)
    }
}

//! The `throttle` filter driver (QEMU's block/throttle.c): requests pass to `file`
//! once the node's throttle group lets them (see [`crate::throttle::group`]).
//! Reads count as reads; writes, write-zeroes and discards as writes, by their
//! length. Flushes are not throttled, as in QEMU, so a guest's flush never waits
//! behind a storm of writes. A drained section lifts the limits of the node (the
//! requests queued go at once), so that draining never waits for the budget.

use crate::aio::iovec::IoVec;
use crate::aio::LocalBoxFuture;
use crate::driver::Driver;
use crate::drivers::forward;
use crate::edge::Edge;
use crate::error::Result;
use crate::throttle::{Direction, Member, ThrottleGroup};
use std::sync::Arc;

mod admitted;
mod options;

pub use options::ThrottleOptions;

/// The table row of `throttle`.
pub(crate) const ENTRY: super::DriverEntry = super::DriverEntry {
    names: &["throttle"],
    kind: super::Kind::Filter,
    parse: options::parse,
    create: None,
    reopen_mutable: &["throttle-group"],
};

pub struct ThrottleDriver {
    file: Arc<Edge>,
    member: Arc<Member>,
}

impl ThrottleDriver {
    pub(super) fn new(file: Arc<Edge>, member: Arc<Member>) -> Self {
        ThrottleDriver { file, member }
    }

    /// The group the node belongs to.
    pub fn group(&self) -> &Arc<ThrottleGroup> {
        self.member.group()
    }
}

impl Driver for ThrottleDriver {
    fn driver_name(&self) -> &'static str {
        "throttle"
    }

    fn size(&self) -> u64 {
        self.file.node().size()
    }

    fn children(&self) -> Vec<Arc<Edge>> {
        vec![self.file.clone()]
    }

    /// QEMU's `throttle_co_drain_begin`: no limits while drained.
    fn drain_begin(&self) {
        self.member.bypass_begin();
    }

    fn drain_end(&self) {
        self.member.bypass_end();
    }

    fn supports_fua(&self) -> bool {
        true
    }

    fn as_throttle(&self) -> Option<&ThrottleDriver> {
        Some(self)
    }

    fn truncate(&self, size: u64) -> Result<()> {
        self.file.node().resize(size)
    }

    fn filename(&self) -> String {
        self.file.node().driver().filename()
    }

    fn read<'a>(&'a self, offset: u64, iov: IoVec) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.member.intercept(Direction::Read, iov.len()).await;
            self.file.node().read(offset, iov).await
        })
    }

    fn write<'a>(&'a self, offset: u64, iov: IoVec, fua: bool) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.member.intercept(Direction::Write, iov.len()).await;
            self.file.node().write(offset, iov, fua).await
        })
    }

    fn flush(&self) -> LocalBoxFuture<'_, Result<()>> {
        forward::flush(&self.file)
    }

    fn discard(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.member.intercept(Direction::Write, len).await;
            self.file.node().discard(offset, len).await
        })
    }

    fn allocate(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        forward::allocate(&self.file, offset, len)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.member.intercept(Direction::Write, len).await;
            self.file
                .node()
                .write_zeroes(offset, len, may_unmap, false)
                .await
        })
    }
}

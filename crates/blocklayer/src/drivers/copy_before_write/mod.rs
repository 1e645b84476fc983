//! The `copy-before-write` filter driver (QEMU's block/copy-before-write.c): it sits
//! above a node (`file`) and, before a write, write-zeroes or discard reaches an area
//! of it whose old data is not yet on `target`, copies that data there
//! ([`BlockCopy`]). The target then holds the disk as it was when the filter was
//! opened, wherever the disk has changed since: with the source for the rest, that
//! is a point-in-time view, which the `snapshot-access` driver serves
//! ([`Driver::read_snapshot`]) and the backup job completes into a full copy.
//!
//! Snapshot reads: a cluster a guest write has touched (after its copy) is read from
//! the target; any other from the source, while guest writes to it wait ("frozen"
//! reads), so that what is read is still the old data. With `on-cbw-error` set to
//! `break-snapshot`, a failed copy lets the guest write go ahead and fails every
//! later snapshot read instead; `cbw-timeout` bounds the time a guest write waits
//! for its copy (the copy goes on in the background).

use crate::aio::iovec::IoVec;
use crate::aio::uring::sleep_ns;
use crate::aio::LocalBoxFuture;
use crate::block_copy::{BlockCopy, ClusterBits, CopyFailure};
use crate::driver::{default_child_perm, Driver};
use crate::drivers::forward;
use crate::edge::{Edge, Role};
use crate::error::{BlockError, Result};
use crate::perm::Perm;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

mod options;

pub use options::{CbwOptions, OnCbwError};

/// The table row of `copy-before-write`.
pub(crate) const ENTRY: super::DriverEntry = super::DriverEntry {
    names: &["copy-before-write"],
    kind: super::Kind::Filter,
    parse: options::parse,
    create: None,
    reopen_mutable: &[],
};

/// How long a guest write waits before it looks again at snapshot reads of its
/// range (they are one read each).
const FROZEN_RETRY_NS: u64 = 20_000;

fn eacces(op: &'static str) -> BlockError {
    BlockError::io(op, std::io::Error::from_raw_os_error(libc::EACCES))
}

/// What snapshot reads need to know, under one lock.
struct Snapshot {
    /// Clusters a guest write has touched (their old data is on the target).
    done: ClusterBits,
    /// Clusters the snapshot may be read at (`discard` on the snapshot drops them).
    access: ClusterBits,
    /// Snapshot reads of the source in progress (byte ranges).
    frozen: Vec<(u64, u64)>,
    /// The first failed copy with `break-snapshot`: the snapshot is gone.
    error: Option<i32>,
}

pub struct CbwDriver {
    file: Arc<Edge>,
    target: Arc<Edge>,
    bcs: Arc<BlockCopy>,
    on_error: OnCbwError,
    /// `cbw-timeout` in seconds (0: none).
    timeout: u32,
    snap: Mutex<Snapshot>,
}

impl CbwDriver {
    fn new(
        file: Arc<Edge>,
        target: Arc<Edge>,
        on_error: OnCbwError,
        timeout: u32,
        access: Option<ClusterBits>,
    ) -> Self {
        let cluster = BlockCopy::cluster_size_for(&target.node());
        let bcs = Arc::new(BlockCopy::new(file.clone(), target.clone(), cluster));
        let bits = bcs.size().div_ceil(cluster);
        if let Some(a) = &access {
            bcs.set_dirty(a.clone());
        }
        file.node().list_copy_bitmap(&bcs);
        CbwDriver {
            file,
            target,
            bcs,
            on_error,
            timeout,
            snap: Mutex::new(Snapshot {
                done: ClusterBits::new(bits, false),
                access: access.unwrap_or_else(|| ClusterBits::new(bits, true)),
                frozen: Vec::new(),
                error: None,
            }),
        }
    }

    fn snap(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.snap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The copy a guest write needs, bounded by `cbw-timeout` if set.
    async fn copy_bounded(&self, off: u64, len: u64) -> std::result::Result<(), BlockError> {
        if self.timeout == 0 {
            return self
                .bcs
                .copy(off, len, None)
                .await
                .map(|_| ())
                .map_err(|f| f.error);
        }
        // The copy runs as a task of its own, which goes on after a timeout.
        let slot: Arc<Mutex<Slot>> = Arc::default();
        let (bcs, s) = (self.bcs.clone(), slot.clone());
        crate::aio::executor::spawn(async move {
            let r = bcs.copy(off, len, None).await;
            let mut s = s.lock().unwrap_or_else(|p| p.into_inner());
            s.result = Some(r);
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        });
        let timer = Box::pin(sleep_ns(u64::from(self.timeout) * 1_000_000_000));
        match (Race { slot, timer }).await {
            Some(r) => r.map(|_| ()).map_err(|f| f.error),
            None => Err(BlockError::io(
                "copy-before-write",
                std::io::Error::from_raw_os_error(libc::ETIMEDOUT),
            )),
        }
    }

    /// QEMU's `cbw_do_copy_before_write`: copies the old data of the clusters of
    /// `offset..+len` before a guest changes them.
    async fn before_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.snap().error.is_some() {
            return Ok(());
        }
        let cluster = self.bcs.cluster_size();
        let off = offset - offset % cluster;
        let end = (offset + len).div_ceil(cluster) * cluster;
        let r = self.copy_bounded(off, end - off).await;
        if let Err(e) = &r {
            if self.on_error == OnCbwError::BreakGuestWrite {
                return Err(r.unwrap_err());
            }
            log::warn!("copy-before-write: the snapshot is broken: {e}");
        }
        loop {
            {
                let mut s = self.snap();
                match &r {
                    Err(e) => {
                        s.error.get_or_insert(e.errno());
                    }
                    Ok(()) => s.done.set_range(off / cluster, end / cluster, true),
                }
                // Snapshot reads of the old data still in the source finish first.
                if !s.frozen.iter().any(|f| f.0 < end && off < f.0 + f.1) {
                    return Ok(());
                }
            }
            sleep_ns(FROZEN_RETRY_NS).await;
        }
    }
}

/// The outcome of a background copy.
#[derive(Default)]
struct Slot {
    result: Option<std::result::Result<u64, CopyFailure>>,
    waker: Option<Waker>,
}

/// Waits for a background copy or its timeout, whichever comes first (`None`: the
/// timeout).
struct Race<T: Future<Output = ()>> {
    slot: Arc<Mutex<Slot>>,
    timer: Pin<Box<T>>,
}

impl<T: Future<Output = ()>> Future for Race<T> {
    type Output = Option<std::result::Result<u64, CopyFailure>>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        {
            let mut s = self.slot.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = s.result.take() {
                return Poll::Ready(Some(r));
            }
            s.waker = Some(cx.waker().clone());
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Driver for CbwDriver {
    /// QEMU's filter keeps two anonymous bitmaps, listed in this order: the
    /// clusters the snapshot may be read at, and those a guest write has copied.
    fn own_bitmaps_info(&self) -> Vec<crate::info::BlockDirtyInfo> {
        let cluster = self.bcs.cluster_size();
        let s = self.snap();
        [&s.access, &s.done]
            .iter()
            .map(|b| crate::info::BlockDirtyInfo::anonymous(false, cluster, b.count() * cluster))
            .collect()
    }

    fn driver_name(&self) -> &'static str {
        "copy-before-write"
    }

    fn size(&self) -> u64 {
        self.file.node().size()
    }

    fn children(&self) -> Vec<Arc<Edge>> {
        vec![self.file.clone(), self.target.clone()]
    }

    /// QEMU's `cbw_child_perm`: the target is written, and shared but for resize;
    /// the source passes the parents' permissions through, reads consistently where
    /// they write (to copy the old data), and lets no one else write or resize it
    /// (a parent taking nothing and sharing all counts as none).
    fn child_perm(&self, child: &Edge, writable: bool, perm: Perm, shared: Perm) -> (Perm, Perm) {
        if child.role() != Role::Filtered {
            return (Perm::WRITE, Perm::ALL & !Perm::RESIZE);
        }
        let (mut p, mut s) = default_child_perm(Role::Filtered, writable, perm, shared);
        if perm != Perm::NONE || shared != Perm::ALL {
            if perm.contains(Perm::WRITE) {
                p |= Perm::CONSISTENT_READ;
            }
            s &= !(Perm::WRITE | Perm::RESIZE);
        }
        (p, s)
    }

    fn supports_fua(&self) -> bool {
        true
    }

    fn is_read_only(&self) -> bool {
        self.file.node().is_read_only()
    }

    fn filename(&self) -> String {
        self.file.node().driver().filename()
    }

    fn block_copy(&self) -> Option<Arc<BlockCopy>> {
        Some(self.bcs.clone())
    }

    fn is_allocated(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<(bool, u64)>> {
        Box::pin(async move { self.file.node().driver().is_allocated(offset, len).await })
    }

    fn read<'a>(&'a self, offset: u64, iov: IoVec) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move { self.file.node().read(offset, iov).await })
    }

    fn write<'a>(&'a self, offset: u64, iov: IoVec, fua: bool) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.before_write(offset, iov.len()).await?;
            forward::write(&self.file, offset, iov, fua).await
        })
    }

    fn flush(&self) -> LocalBoxFuture<'_, Result<()>> {
        forward::flush(&self.file)
    }

    fn discard(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.before_write(offset, len).await?;
            forward::discard(&self.file, offset, len).await
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
            self.before_write(offset, len).await?;
            forward::write_zeroes(&self.file, offset, len, may_unmap).await
        })
    }

    /// QEMU's `cbw_co_preadv_snapshot`: cluster by cluster, from the target where a
    /// guest write has touched it, else from the source with guest writes held.
    fn read_snapshot<'a>(&'a self, offset: u64, iov: IoVec) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let cluster = self.bcs.cluster_size();
            let len = iov.len();
            let mut pos = 0;
            while pos < len {
                let at = offset + pos;
                let first = at / cluster;
                // The run of clusters with the same "done" state, within the request.
                let (done, n) = {
                    let mut s = self.snap();
                    if s.error.is_some() || !s.access.all(first, (offset + len).div_ceil(cluster)) {
                        return Err(eacces("snapshot read"));
                    }
                    let done = s.done.get(first);
                    let mut c = first + 1;
                    while c * cluster < offset + len && s.done.get(c) == done {
                        c += 1;
                    }
                    let n = (c * cluster).min(offset + len) - at;
                    if !done {
                        s.frozen.push((at, n));
                    }
                    (done, n)
                };
                let piece = iov.slice(pos, n);
                let r = if done {
                    self.target.node().read(at, piece).await
                } else {
                    let r = self.file.node().read(at, piece).await;
                    let mut s = self.snap();
                    if let Some(i) = s.frozen.iter().position(|f| *f == (at, n)) {
                        s.frozen.swap_remove(i);
                    }
                    r
                };
                r?;
                pos += n;
            }
            Ok(())
        })
    }

    /// QEMU's `cbw_co_pdiscard_snapshot`: the whole clusters of the range are no
    /// longer part of the snapshot: not copied any more, dropped from the target.
    fn discard_snapshot(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let cluster = self.bcs.cluster_size();
            let start = offset.div_ceil(cluster) * cluster;
            let end = ((offset + len) / cluster * cluster).max(start);
            if end == start {
                return Ok(());
            }
            self.snap()
                .access
                .set_range(start / cluster, end / cluster, false);
            self.bcs.reset(start, end - start);
            self.target.node().discard(start, end - start).await
        })
    }
}

#[cfg(test)]
mod tests;

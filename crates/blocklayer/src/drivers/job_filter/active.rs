//! Write-blocking mirror (QEMU's `copy-mode=write-blocking`, its "active mirror"):
//! while it is on, every guest write that passes the `mirror_top` filter goes to
//! the source, then to the mirror's target, before it completes. What it wrote is
//! then in sync: it leaves no dirty bit (a granule it wrote in part keeps the bit it
//! had before), so that the job converges however fast the guest writes.
//!
//! The job's background copies of a range and the guest's writes to it are
//! serialised on the filter node (the job holds [`crate::Node::copy_lock`] over each
//! copy, and the filter node serialises writes while the job runs). Two guest
//! writes in flight over the same range at once may reach the two sides in
//! different orders: those ranges stay dirty, and the job copies them again.
//!
//! A guest write the target fails still succeeds for the guest (the source took
//! it); its range stays dirty and its error waits for the job
//! ([`ActiveMirror::take_target_error`]), which meets `on-target-error` with it
//! as QEMU's does for the write itself, not for a later copy of the range.

use crate::aio::iovec::IoVec;
use crate::bitmap::DirtyBitmap;
use crate::edge::Edge;
use crate::error::Result;
use crate::node::Node;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A guest write on its way to both sides.
#[derive(Debug)]
struct Op {
    id: u64,
    start: u64,
    end: u64,
    /// Another write overlapped this one while both were in flight.
    overlapped: bool,
}

pub struct ActiveMirror {
    target: Arc<Node>,
    dirty: Arc<DirtyBitmap>,
    on: AtomicBool,
    ops: Mutex<Vec<Op>>,
    next: AtomicU64,
    /// The errnos of guest writes the target failed, oldest first, until the job
    /// takes them (their ranges stay dirty).
    target_errors: Mutex<Vec<i32>>,
}

impl std::fmt::Debug for ActiveMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveMirror")
            .field("target", &self.target.name())
            .field("on", &self.is_on())
            .finish()
    }
}

impl ActiveMirror {
    /// Off until [`ActiveMirror::start`]: writes only mark `dirty` (on the source).
    pub fn new(target: Arc<Node>, dirty: Arc<DirtyBitmap>) -> Arc<ActiveMirror> {
        Arc::new(ActiveMirror {
            target,
            dirty,
            on: AtomicBool::new(false),
            ops: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            target_errors: Mutex::new(Vec::new()),
        })
    }

    pub fn start(&self) {
        self.on.store(true, Ordering::Release);
    }

    /// Guest writes go to the source alone from now on (the job ends).
    pub fn stop(&self) {
        self.on.store(false, Ordering::Release);
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// Takes the oldest target error of a guest write not yet taken: the job meets
    /// its `on-target-error` with it (as QEMU's active write does at once).
    pub fn take_target_error(&self) -> Option<i32> {
        let mut v = self.target_errors.lock().unwrap_or_else(|p| p.into_inner());
        (!v.is_empty()).then(|| v.remove(0))
    }

    /// Registers a write over `start..end`, widened to whole granules (two writes
    /// into one granule count as overlapping: neither knows what the other did to
    /// its bit).
    fn register(&self, start: u64, end: u64) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let mut overlapped = false;
        for o in ops.iter_mut() {
            if o.start < end && start < o.end {
                o.overlapped = true;
                overlapped = true;
            }
        }
        ops.push(Op {
            id,
            start,
            end,
            overlapped,
        });
        id
    }

    /// Ends write `id` over the granules `start..end`: if both sides took it and no
    /// other write shared a granule with it, its granules are in sync, but for a
    /// partly written one that was dirty before (`keep_head`, `keep_tail`); otherwise
    /// they stay dirty.
    fn finish(&self, id: u64, synced: bool, keep_head: bool, keep_tail: bool) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = ops.iter().position(|o| o.id == id) else {
            return;
        };
        let op = ops.swap_remove(i);
        if !synced || op.overlapped {
            self.dirty.set(op.start, op.end - op.start);
            return;
        }
        let g = self.dirty.granularity();
        let lo = op.start + if keep_head { g } else { 0 };
        let hi = op.end.saturating_sub(if keep_tail { g } else { 0 });
        if hi > lo {
            self.dirty.reset(lo, hi - lo);
        }
    }

    /// A guest write through the filter: to the source (`child`), then, while the
    /// mirror is on, to the target. The guest sees the source's outcome.
    pub(crate) async fn write(
        &self,
        child: &Edge,
        offset: u64,
        iov: IoVec,
        fua: bool,
    ) -> Result<()> {
        if !self.is_on() {
            return child.node().write(offset, iov, fua).await;
        }
        let end = offset.saturating_add(iov.len());
        let g = self.dirty.granularity();
        let (lo, hi) = (offset - offset % g, end.div_ceil(g).saturating_mul(g));
        let id = self.register(lo, hi);
        // A granule the write covers only in part keeps the bit it had: its other
        // bytes may differ between the two sides.
        let keep_head = !offset.is_multiple_of(g) && self.dirty.get(lo);
        let keep_tail = !end.is_multiple_of(g) && self.dirty.get(end - end % g);
        let r = child.node().write(offset, iov.clone(), fua).await;
        let synced = match r {
            Ok(()) if self.is_on() => match self.target.write(offset, iov, fua).await {
                Ok(()) => true,
                Err(e) => {
                    self.target_errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(e.errno());
                    log::warn!(
                        "mirror target '{}': write at {offset} failed: {e}",
                        self.target.name()
                    );
                    false
                }
            },
            _ => false,
        };
        self.finish(id, synced, keep_head, keep_tail);
        r
    }
}

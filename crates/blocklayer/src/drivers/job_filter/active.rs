//! Write-blocking mirror (QEMU's `copy-mode=write-blocking`, its "active mirror"):
//! while it is on, every guest write that passes the `mirror_top` filter goes to
//! the source, then to the mirror's target, before it completes. Granules the
//! write covered wholly are then in sync, and their dirty bits are cleared, so that
//! the job converges however fast the guest writes.
//!
//! The job's background copies of a range and the guest's writes to it are
//! serialised on the filter node (the job holds [`crate::Node::copy_lock`] over each
//! copy, and the filter node serialises writes while the job runs). Two guest
//! writes in flight over the same range at once may reach the two sides in
//! different orders: those ranges stay dirty, and the job copies them again.

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
    /// Writes the target failed (they stay dirty; the job's copy reports the error).
    target_errors: AtomicU64,
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
            target_errors: AtomicU64::new(0),
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

    pub fn target_errors(&self) -> u64 {
        self.target_errors.load(Ordering::Acquire)
    }

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

    /// Ends write `id`: its granules are in sync if both sides took it and no
    /// other write overlapped it; otherwise the range stays dirty.
    fn finish(&self, id: u64, synced: bool) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = ops.iter().position(|o| o.id == id) else {
            return;
        };
        let op = ops.swap_remove(i);
        let len = op.end - op.start;
        if synced && !op.overlapped {
            // The granules wholly inside the write (the last one if the write ends
            // at the disk's end).
            let g = self.dirty.granularity();
            let end = if op.end >= self.dirty.size() {
                op.end
            } else {
                op.end - op.end % g
            };
            let lo = op.start.div_ceil(g) * g;
            if end > lo {
                self.dirty.reset(lo, end - lo);
            }
        } else {
            self.dirty.set(op.start, len);
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
        let id = self.register(offset, offset.saturating_add(iov.len()));
        let r = child.node().write(offset, iov.clone(), fua).await;
        let synced = match r {
            Ok(()) if self.is_on() => match self.target.write(offset, iov, fua).await {
                Ok(()) => true,
                Err(e) => {
                    self.target_errors.fetch_add(1, Ordering::AcqRel);
                    log::warn!(
                        "mirror target '{}': write at {offset} failed: {e}",
                        self.target.name()
                    );
                    false
                }
            },
            _ => false,
        };
        self.finish(id, synced);
        r
    }
}

//! The `mirror` job (QEMU's blockdev-mirror and drive-mirror), and the part of it
//! that active commit is: copying a source's dirty ranges to a target until they
//! converge (ready), then, on `block-job-complete`, the pivot on the control thread.
//!
//! A dirty bitmap on the source records what was written since it was copied. It
//! starts with what the job must copy ([`Seed`]: what the source's chain holds above
//! a base, or nothing for `sync=none`); the job takes dirty ranges out and copies
//! them until none is left, then reports ready and keeps copying what the guest
//! writes. Progress counts the bytes copied, its length what is copied plus what is
//! still dirty, as QEMU's.
//!
//! With `copy-mode=write-blocking` the `mirror_top` filter also writes every guest
//! write to the target ([`ActiveMirror`]); the job's copies hold the filter node's
//! copy lock over their range, so that a guest write and a copy of the same range
//! do not cross.

use super::copy::{allocated_above, copy_range, CopyBuf, CopyError, JobCtx, CANCELLED, CHUNK};
use super::core::{JobCore, RateLimit};
use super::Cancel;
use blocklayer::backend::BlockBackend;
use blocklayer::bitmap::DirtyBitmap;
use blocklayer::drivers::job_filter::ActiveMirror;
use blocklayer::Node;
use std::sync::Arc;
use std::time::Duration;

/// How often a ready job looks for new dirty ranges.
const READY_POLL: Duration = Duration::from_millis(10);

/// What is dirty when the job starts.
pub enum Seed {
    /// What the source's chain holds above `base` (the whole chain if `None`);
    /// with `zero_target`, the rest is written as zeroes to the target (its old
    /// contents must not show through).
    Allocated {
        base: Option<Arc<Node>>,
        zero_target: bool,
    },
    /// `sync=none`: only what the guest writes from now on.
    Nothing,
}

pub struct Mirror {
    pub ctx: JobCtx,
    /// The job's reader of the source: a user of the `mirror_top` filter.
    pub source: BlockBackend,
    /// The job's writer of the target.
    pub target: BlockBackend,
    /// Users the job keeps on other nodes while it runs.
    pub holds: Vec<BlockBackend>,
    pub dirty: Arc<DirtyBitmap>,
    pub seed: Seed,
    /// Write-blocking mode: guest writes reach the target through the filter.
    pub active: Option<Arc<ActiveMirror>>,
}

impl Mirror {
    pub async fn run(self) -> Result<(), String> {
        let ctx = &self.ctx;
        let core = &ctx.core;
        let mut rl = RateLimit::default();
        if let Some(a) = &self.active {
            a.start();
        }
        self.seed().await?;
        let mut ready = false;
        loop {
            core.pause_point(ready)
                .await
                .map_err(|_| CANCELLED.to_string())?;
            if ready && (core.complete_requested() || core.cancel_requested() != Cancel::None) {
                return Ok(());
            }
            core.set_len(core.offset() + self.dirty.dirty_bytes());
            match self.dirty.take_next(0, CHUNK) {
                Some((off, n)) => {
                    if let Err(e) = self.copy(off, n).await {
                        // Not copied: it stays dirty, unless the error is ignored.
                        self.dirty.set(off, n);
                        if !ctx.on_error(e).await? {
                            self.dirty.take_next(off, n);
                        }
                        continue;
                    }
                    core.progress(n);
                    ctx.throttle(&mut rl, n).await;
                }
                None if !ready => {
                    // In sync: what was copied is made stable before the job says so.
                    if let Err(e) = self.target.flush().await {
                        if ctx.on_error(CopyError::write(e)).await? {
                            continue;
                        }
                    }
                    ready = true;
                    ctx.ready();
                }
                None => core.sleep(READY_POLL).await,
            }
        }
    }

    /// Marks dirty what the job must copy (and zeroes the rest of the target if
    /// asked to).
    async fn seed(&self) -> Result<(), String> {
        let Seed::Allocated { base, zero_target } = &self.seed else {
            return Ok(());
        };
        let size = self.source.node().size();
        if *zero_target && !self.target.node().flags().discard_unmap {
            // QEMU: a target that cannot unmap zeroes is copied in full.
            self.dirty.set(0, size);
            return Ok(());
        }
        let mut offset = 0;
        while offset < size {
            self.ctx
                .core
                .pause_point(false)
                .await
                .map_err(|_| CANCELLED.to_string())?;
            let want = (size - offset).min(CHUNK);
            let b = base.clone();
            let (above, n) = self
                .source
                .with_node(|s| async move { allocated_above(&s, b.as_ref(), offset, want).await })
                .await
                .map_err(|e| e.to_string())?;
            if above {
                self.dirty.set(offset, n);
            } else if *zero_target {
                if let Err(e) = self.target.write_zeroes(offset, n, true, false).await {
                    // As QEMU, a failure here ends the job.
                    return Err(CopyError::write(e).message);
                }
            }
            offset += n;
        }
        Ok(())
    }

    /// Copies one dirty range from the source to the target (under the filter's
    /// copy lock in write-blocking mode).
    async fn copy(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        let (target, buf, locked) = (&self.target, &self.ctx.buf, self.active.is_some());
        self.source
            .with_node(|src| async move {
                let _lock = if locked {
                    Some(src.copy_lock(offset, len).await)
                } else {
                    None
                };
                let s = src.clone();
                target
                    .with_node(|t| async move { copy_range(buf, &s, &t, offset, len).await })
                    .await
            })
            .await
    }
}

/// The last step before a mirror-like job's pivot (or its completion without one),
/// on the control thread with the source and target drained: copies the ranges
/// still dirty (counted in the job's progress, as QEMU's job copies them itself)
/// and flushes the target.
pub async fn copy_remaining(
    core: Arc<JobCore>,
    source: Arc<Node>,
    target: Arc<Node>,
    dirty: Arc<DirtyBitmap>,
) -> Result<(), String> {
    let buf = CopyBuf::default();
    while let Some((off, n)) = dirty.take_next(0, CHUNK) {
        copy_range(&buf, &source, &target, off, n)
            .await
            .map_err(|e| e.message)?;
        core.progress(n);
    }
    core.set_len(core.offset());
    target.flush().await.map_err(|e| e.to_string())
}

//! The `commit` job (QEMU's block-commit): copies what the layers from the top down
//! to (not including) the base hold into the base.
//!
//! - Intermediate commit (the top is below the active layer): nobody writes the
//!   committed layers, so one pass suffices; at finalization the top's overlay
//!   takes the base as its backing.
//! - Active commit (the top is the node the exports use): the guest keeps writing
//!   the top, so a dirty bitmap on the top records what changed after it was
//!   copied; the job copies those ranges again until none is left (ready), and on
//!   `block-job-complete` the control thread drains, copies the last dirty ranges
//!   and re-points the top's users at the base (the pivot).

use super::copy::{allocated_above, copy_range, CopyBuf, CopyError, JobCtx, CANCELLED, CHUNK};
use super::core::RateLimit;
use super::Cancel;
use blocklayer::backend::BlockBackend;
use blocklayer::bitmap::DirtyBitmap;
use blocklayer::Node;
use std::sync::Arc;
use std::time::Duration;

/// How often a ready active commit looks for new dirty ranges.
const READY_POLL: Duration = Duration::from_millis(10);

pub struct Commit {
    pub ctx: JobCtx,
    /// The job's handle on the top (reads through the chain).
    pub top: BlockBackend,
    /// The job's handle on the base (writes).
    pub base: BlockBackend,
    /// Users the job keeps on the nodes between the top and the base.
    pub holds: Vec<BlockBackend>,
    /// Active commit: the bitmap of what the guest wrote to the top meanwhile.
    pub dirty: Option<Arc<DirtyBitmap>>,
}

impl Commit {
    pub async fn run(self) -> Result<(), String> {
        let ctx = &self.ctx;
        let core = &ctx.core;
        let mut rl = RateLimit::default();
        let size = self.top.node().size();
        let Some(dirty) = self.dirty.clone() else {
            return ctx.pass(size, &mut rl, true, |o, l| self.chunk(o, l)).await;
        };
        // Active commit (QEMU's mirror): what the layers above the base hold is dirty
        // from the start, and so is what the guest writes meanwhile; the job copies
        // dirty ranges until none is left. Progress counts only those bytes.
        self.mark_allocated(&dirty, size).await?;
        let mut ready = false;
        loop {
            core.pause_point(ready)
                .await
                .map_err(|_| CANCELLED.to_string())?;
            if ready && (core.complete_requested() || core.cancel_requested() != Cancel::None) {
                return Ok(());
            }
            core.set_len(core.offset() + dirty.dirty_bytes());
            match dirty.take_next(0, CHUNK) {
                Some((off, n)) => {
                    if let Err(e) = self.copy(off, n).await {
                        // Not copied: it stays dirty, unless the error is ignored.
                        dirty.set(off, n);
                        if !ctx.on_error(e).await? {
                            dirty.take_next(off, n);
                        }
                        continue;
                    }
                    core.progress(n);
                    ctx.throttle(&mut rl, n).await;
                }
                None if !ready => {
                    ready = true;
                    ctx.ready();
                }
                None => core.sleep(READY_POLL).await,
            }
        }
    }

    /// Marks dirty every range that the layers from the top down to the base hold.
    async fn mark_allocated(&self, dirty: &DirtyBitmap, size: u64) -> Result<(), String> {
        let base = self.base.node_arc();
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
                .top
                .with_node(|top| async move { allocated_above(&top, Some(&b), offset, want).await })
                .await
                .map_err(|e| e.to_string())?;
            if above {
                dirty.set(offset, n);
            }
            offset += n;
        }
        Ok(())
    }

    /// Commits one range if a committed layer holds it: bytes looked at and copied.
    async fn chunk(&self, offset: u64, len: u64) -> Result<(u64, u64), CopyError> {
        let base = self.base.node_arc();
        let (above, n) = self
            .top
            .with_node(|top| async move { allocated_above(&top, Some(&base), offset, len).await })
            .await
            .map_err(CopyError::read)?;
        if !above {
            return Ok((n, 0));
        }
        self.copy(offset, n).await?;
        Ok((n, n))
    }

    async fn copy(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        let (base, buf) = (&self.base, &self.ctx.buf);
        self.top
            .with_node(|top| async move {
                base.with_node(|b| async move { copy_range(buf, &top, &b, offset, len).await })
                    .await
            })
            .await
    }
}

/// The last step of an active commit's pivot, on the control thread with the top
/// and base drained: copies the ranges still dirty.
pub async fn copy_remaining(
    top: Arc<Node>,
    base: Arc<Node>,
    dirty: Arc<DirtyBitmap>,
) -> Result<(), String> {
    let buf = CopyBuf::default();
    while let Some((off, n)) = dirty.take_next(0, CHUNK) {
        copy_range(&buf, &top, &base, off, n)
            .await
            .map_err(|e| e.message)?;
    }
    base.flush().await.map_err(|e| e.to_string())
}

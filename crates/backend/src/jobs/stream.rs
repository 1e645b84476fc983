//! The `stream` job (QEMU's block-stream): copies into the top node every range
//! that the layers between it and the base provide, so that the top no longer
//! needs them; at finalization the top's backing becomes the base.
//!
//! Each copy is serialised against the top's other writers (a guest write to the
//! range waits for it, and the copy skips a range the guest has meanwhile written),
//! as QEMU's copy-on-read does.

use super::copy::{allocated_above, copy_range_unchanged, CopyError, JobCtx};
use super::core::RateLimit;
use blocklayer::backend::BlockBackend;
use blocklayer::Node;
use std::sync::Arc;

pub struct Stream {
    pub ctx: JobCtx,
    /// The job's handle on the top node (write-unchanged taken).
    pub blk: BlockBackend,
    /// Users the job keeps on the intermediate nodes (resize not shared).
    pub holds: Vec<BlockBackend>,
    /// The layer that stays (streaming stops above it); `None`: the whole chain.
    pub base: Option<Arc<Node>>,
}

impl Stream {
    pub async fn run(self) -> Result<(), String> {
        let top = self.blk.node_arc();
        let below = top.backing();
        if below.is_none()
            || below
                .as_ref()
                .zip(self.base.as_ref())
                .is_some_and(|(b, base)| Arc::ptr_eq(b, base))
        {
            // Nothing between the top and the base: QEMU's stream ends at once,
            // without progress.
            return Ok(());
        }
        let size = top.size();
        self.ctx
            .pass(size, &mut RateLimit::default(), false, |o, l| {
                self.chunk(o, l)
            })
            .await?;
        drop(self.holds);
        Ok(())
    }

    /// Streams one range: returns the bytes looked at and those copied.
    async fn chunk(&self, offset: u64, len: u64) -> Result<(u64, u64), CopyError> {
        let base = self.base.clone();
        let buf = &self.ctx.buf;
        self.blk
            .with_node(|top| async move {
                let (alloc, n) = top
                    .driver()
                    .is_allocated(offset, len)
                    .await
                    .map_err(CopyError::read)?;
                if alloc {
                    return Ok((n, 0));
                }
                let Some(below) = top.backing() else {
                    return Ok((n, 0));
                };
                let (above, n) = allocated_above(&below, base.as_ref(), offset, n)
                    .await
                    .map_err(CopyError::read)?;
                if !above {
                    return Ok((n, 0));
                }
                let _lock = top.copy_lock(offset, n).await;
                // The guest may have written the range meanwhile: its data stays.
                let (alloc, m) = top
                    .driver()
                    .is_allocated(offset, n)
                    .await
                    .map_err(CopyError::read)?;
                if alloc {
                    return Ok((m, 0));
                }
                copy_range_unchanged(buf, &top, offset, m).await?;
                Ok((m, m))
            })
            .await
    }
}

//! The `commit` job (QEMU's block-commit): copies what the layers from the top down
//! to (not including) the base hold into the base.
//!
//! - Intermediate commit (the top is below the active layer): nobody writes the
//!   committed layers, so one pass suffices; at finalization the top's overlay
//!   takes the base as its backing. That is this job.
//! - Active commit (the top is the node the exports use) is a mirror of the top
//!   into the base ([`super::mirror::Mirror`]): the guest keeps writing the top, the
//!   job copies what it writes until it converges (ready), and on
//!   `block-job-complete` the top's users are re-pointed at the base (the pivot).

use super::copy::{allocated_above, copy_range, CopyError, JobCtx};
use super::core::RateLimit;
use blocklayer::backend::BlockBackend;

pub struct Commit {
    pub ctx: JobCtx,
    /// The job's handle on the top (reads through the chain).
    pub top: BlockBackend,
    /// The job's handle on the base (writes).
    pub base: BlockBackend,
    /// Users the job keeps on the nodes between the top and the base.
    pub holds: Vec<BlockBackend>,
}

impl Commit {
    pub async fn run(self) -> Result<(), String> {
        let size = self.top.node().size();
        self.ctx
            .pass(size, &mut RateLimit::default(), true, |o, l| {
                self.chunk(o, l)
            })
            .await
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

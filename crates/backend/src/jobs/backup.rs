//! The `backup` job (QEMU's block/backup.c): copies the disk as it was when the job
//! started to a target. A `copy-before-write` filter above the source (inserted by
//! the control thread) copies the old data of any area a guest write reaches first;
//! the job copies the rest through the same block-copy state, so that no cluster is
//! copied twice and none is missed.
//!
//! - `full`: every cluster; `top`: the clusters the source has itself (not its
//!   backing chain), found by a first pass before the copy; `none`: only what guest
//!   writes change, until the job is cancelled; `bitmap` (and `incremental`): the
//!   clusters a dirty bitmap marks.
//! - Progress counts the bytes copied by the job and by the filter alike; the length
//!   is those plus the bytes still to copy (QEMU's progress meter of block-copy).
//! - An error of a read of the source goes by `on-source-error`, one of a write of
//!   the target by `on-target-error`; `ignore` and `stop` (once resumed) retry.

use super::copy::{CopyError, JobCtx, CANCELLED};
use super::core::RateLimit;
use crate::config::OnError;
use blocklayer::aio::iovec::AlignedBuf;
use blocklayer::backend::BlockBackend;
use blocklayer::block_copy::{BlockCopy, CopyFailure};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Bytes one copy of the job takes at most (block-copy's largest buffer in QEMU).
pub const CHUNK: u64 = 1 << 20;

/// How often a `sync=none` job updates its progress from the filter's copies.
const NONE_TICK: Duration = Duration::from_millis(100);

/// How long the job waits before it retries after an ignored error.
const IGNORED_RETRY: Duration = Duration::from_millis(100);

/// QEMU's `MirrorSyncMode` as backup takes it (`incremental` is `bitmap` by then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    Full,
    Top,
    None,
    /// The clusters a bitmap marks (set up by the control thread).
    Bitmap,
}

pub struct Backup {
    pub ctx: JobCtx,
    /// The job's user of the filter node (QEMU's "main node": takes nothing).
    pub blk: BlockBackend,
    /// The job's user of the target (takes nothing; resize is not shared).
    pub hold: BlockBackend,
    pub bcs: Arc<BlockCopy>,
    pub sync: SyncMode,
    pub on_source_error: OnError,
    pub on_target_error: OnError,
    /// Copies in flight at once (`x-perf` `max-workers`, at most [`MAX_WORKERS`]).
    pub workers: usize,
    /// Bytes one copy takes at most (a multiple of the cluster size).
    pub chunk: u64,
}

/// The most copies a job has in flight (each with a buffer of its own).
pub const MAX_WORKERS: usize = 8;

/// Why a pass ended early.
enum PassEnd {
    Cancelled,
    Failed(CopyFailure),
}

/// Completes when every future has (QEMU's block-copy runs its tasks the same way,
/// as coroutines of one thread).
struct JoinAll<'a>(Vec<Pin<Box<dyn Future<Output = ()> + 'a>>>);

impl Future for JoinAll<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if self.0.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Backup {
    pub async fn run(mut self) -> Result<(), String> {
        let r = self.work().await;
        drop(self.hold);
        r
    }

    async fn work(&mut self) -> Result<(), String> {
        let size = self.bcs.size();
        if self.sync == SyncMode::Top {
            // Clusters the source does not have itself are not copied; until this
            // pass is through, the filter checks for itself.
            self.bcs.set_skip_unallocated(true);
            let cluster = self.bcs.cluster_size();
            let mut off = 0;
            while off < size {
                self.pause_point().await?;
                let bcs = self.bcs.clone();
                let n = self
                    .blk
                    .with_node(|_| async move { bcs.reset_unallocated(off).await })
                    .await
                    .map_err(|e| e.to_string())?;
                off += n.max(cluster);
                self.sync_progress();
            }
            self.bcs.set_skip_unallocated(false);
        }
        if self.sync == SyncMode::None {
            // The filter does the copies; the job waits for its cancel.
            loop {
                self.pause_point().await?;
                self.sync_progress();
                self.ctx.core.sleep(NONE_TICK).await;
            }
        }
        let bufs: Vec<Arc<AlignedBuf>> = (0..self.workers)
            .map(|_| Arc::new(AlignedBuf::zeroed(self.chunk as usize, 4096)))
            .collect();
        let rl = RefCell::new(RateLimit::default());
        loop {
            // Every pass copies what is still to copy; a failed run went back into
            // the bitmap and is copied by the next pass.
            match self.pass(&bufs, &rl).await {
                Ok(()) => return Ok(()),
                Err(PassEnd::Cancelled) => return Err(CANCELLED.to_string()),
                Err(PassEnd::Failed(f)) => {
                    if !self.on_error(f).await? {
                        self.ctx.core.sleep(IGNORED_RETRY).await;
                    }
                }
            }
        }
    }

    /// One pass over the disk by `bufs.len()` workers at once, each taking the next
    /// chunk; ends at the first failure (the other workers finish their chunk).
    async fn pass(&self, bufs: &[Arc<AlignedBuf>], rl: &RefCell<RateLimit>) -> Result<(), PassEnd> {
        let size = self.bcs.size();
        let next = Cell::new(0u64);
        let failed: RefCell<Option<PassEnd>> = RefCell::new(None);
        let worker = |buf: &Arc<AlignedBuf>| {
            let buf = buf.clone();
            let (next, failed) = (&next, &failed);
            async move {
                loop {
                    if failed.borrow().is_some() {
                        return;
                    }
                    if self.ctx.core.pause_point(false).await.is_err() {
                        failed.borrow_mut().get_or_insert(PassEnd::Cancelled);
                        return;
                    }
                    let off = next.get();
                    if off >= size {
                        return;
                    }
                    let n = (size - off).min(self.chunk);
                    next.set(off + n);
                    let (bcs, b) = (self.bcs.clone(), &buf);
                    let r = self
                        .blk
                        .with_node(|_| async move { bcs.copy(off, n, Some(b)).await })
                        .await;
                    self.sync_progress();
                    match r {
                        Ok(copied) => {
                            let d = rl.borrow_mut().account(self.ctx.core.speed(), copied);
                            if !d.is_zero() {
                                self.ctx.core.sleep(d).await;
                            }
                        }
                        Err(f) => {
                            failed.borrow_mut().get_or_insert(PassEnd::Failed(f));
                            return;
                        }
                    }
                }
            }
        };
        // A rate-limited job copies one chunk at a time (as QEMU's block-copy, which
        // starts no new task while the limit says wait).
        let n = if self.ctx.core.speed() != 0 {
            1
        } else {
            bufs.len()
        };
        JoinAll(bufs[..n].iter().map(|b| Box::pin(worker(b)) as _).collect()).await;
        match failed.into_inner() {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    async fn pause_point(&self) -> Result<(), String> {
        self.ctx
            .core
            .pause_point(false)
            .await
            .map_err(|_| CANCELLED.to_string())
    }

    /// The job's progress from the block-copy state's.
    fn sync_progress(&self) {
        let core = &self.ctx.core;
        let copied = self.bcs.copied();
        let now = core.offset();
        if copied > now {
            core.progress(copied - now);
        }
        core.set_len(copied.max(now) + self.bcs.remaining());
    }

    /// A failed copy by the error policy of its side: `Ok(true)` retry after a stop,
    /// `Ok(false)` retry an ignored error, `Err` end the job.
    async fn on_error(&mut self, f: CopyFailure) -> Result<bool, String> {
        let (policy, e) = if f.read {
            (self.on_source_error, CopyError::read(f.error))
        } else {
            (self.on_target_error, CopyError::write(f.error))
        };
        // JobCtx picks its policy by the error's side.
        self.ctx.on_error = policy;
        self.ctx.on_write_error = policy;
        self.ctx.on_error(e).await
    }
}

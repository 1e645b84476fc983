//! The `mirror` job (QEMU's blockdev-mirror and drive-mirror), and the part of it
//! that active commit is: copying a source's dirty ranges to a target until they
//! converge (ready), then, on `block-job-complete`, the pivot on the control thread.
//!
//! A dirty bitmap on the source records what was written since it was copied. It
//! starts with what the job must copy ([`Seed`]: what the source's chain holds above
//! a base, or nothing for `sync=none`); the job takes dirty ranges out and copies
//! them until none is left, then reports ready and keeps copying what the guest
//! writes. Progress counts the bytes copied, its length what is copied plus what is
//! still dirty, as QEMU's. Up to [`IN_FLIGHT`] chunks are copied at once (one at a
//! time under a speed limit); a range dirtied again while its copy is in flight
//! waits for that copy, so the two never land on the target out of order.
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
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
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
        let mut copies = Copies::default();
        let mut bufs: Vec<CopyBuf> = Vec::new();
        // Where the next dirty range is looked for: the copies go round the disk.
        let mut cursor = 0;
        loop {
            if core.is_pause_requested() || core.cancel_requested() != Cancel::None {
                // No copy waits in flight (holding its range) while the job is paused.
                self.settle(&mut copies, &mut bufs, None).await?;
            }
            core.pause_point(ready)
                .await
                .map_err(|_| CANCELLED.to_string())?;
            if ready && (core.complete_requested() || core.cancel_requested() != Cancel::None) {
                self.settle(&mut copies, &mut bufs, None).await?;
                return Ok(());
            }
            core.set_len(core.offset() + self.dirty.dirty_bytes() + copies.bytes());
            // Rate-limited jobs copy one range at a time, the others keep several
            // in flight (as QEMU's mirror).
            let most = if core.speed() > 0 { 1 } else { IN_FLIGHT };
            if copies.len() >= most {
                let done = copies.next().await;
                self.settle(&mut copies, &mut bufs, Some(done)).await?;
                continue;
            }
            let next = self.dirty.take_next(cursor, MIRROR_CHUNK).or_else(|| {
                cursor = 0;
                self.dirty.take_next(0, MIRROR_CHUNK)
            });
            match next {
                Some((off, n)) if copies.overlaps(off, n) => {
                    // Dirtied again while its copy is in flight: copied again after it.
                    self.dirty.set(off, n);
                    cursor = 0;
                    let done = copies.next().await;
                    self.settle(&mut copies, &mut bufs, Some(done)).await?;
                }
                Some((off, n)) => {
                    cursor = off + n;
                    let buf = bufs.pop().unwrap_or_else(|| CopyBuf::sized(MIRROR_CHUNK));
                    copies.start(off, n, Box::pin(self.copy(buf, off, n)));
                    if most == 1 {
                        let done = copies.next().await;
                        self.settle(&mut copies, &mut bufs, Some(done)).await?;
                        ctx.throttle(&mut rl, n).await;
                    }
                }
                None if !copies.is_empty() => {
                    let done = copies.next().await;
                    self.settle(&mut copies, &mut bufs, Some(done)).await?;
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

    /// Accounts a finished copy (`done`, or every copy in flight if `None`): copied
    /// bytes are progress; a failed copy stays dirty and, once no other copy is in
    /// flight, meets `on-error` (an ignored error drops the range).
    async fn settle<'a>(
        &'a self,
        copies: &mut Copies<'a>,
        bufs: &mut Vec<CopyBuf>,
        done: Option<Copied>,
    ) -> Result<(), String> {
        let mut failed: Option<(u64, u64, CopyError)> = None;
        let mut account = |c: Copied, bufs: &mut Vec<CopyBuf>| {
            bufs.push(c.buf);
            match c.result {
                Ok(()) => self.ctx.core.progress(c.len),
                Err(e) => {
                    self.dirty.set(c.offset, c.len);
                    failed.get_or_insert((c.offset, c.len, e));
                }
            }
        };
        match done {
            Some(c) => account(c, bufs),
            None => {
                while !copies.is_empty() {
                    let c = copies.next().await;
                    account(c, bufs);
                }
            }
        }
        let Some((off, n, e)) = failed else {
            return Ok(());
        };
        while !copies.is_empty() {
            let c = copies.next().await;
            bufs.push(c.buf);
            match c.result {
                Ok(()) => self.ctx.core.progress(c.len),
                Err(_) => self.dirty.set(c.offset, c.len),
            }
        }
        if !self.ctx.on_error(e).await? {
            self.dirty.take_next(off, n);
        }
        Ok(())
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
    /// copy lock in write-blocking mode), with a buffer of its own.
    async fn copy(&self, buf: CopyBuf, offset: u64, len: u64) -> Copied {
        let (target, locked) = (&self.target, self.active.is_some());
        let b = &buf;
        let result = self
            .source
            .with_node(|src| async move {
                let _lock = if locked {
                    Some(src.copy_lock(offset, len).await)
                } else {
                    None
                };
                let s = src.clone();
                target
                    .with_node(|t| async move { copy_range(b, &s, &t, offset, len).await })
                    .await
            })
            .await;
        Copied {
            offset,
            len,
            buf,
            result,
        }
    }
}

/// Copies a mirror keeps in flight at most, and their size (QEMU's: 16 of 1 MiB).
const IN_FLIGHT: usize = 16;
const MIRROR_CHUNK: u64 = 1 << 20;

/// A finished copy.
struct Copied {
    offset: u64,
    len: u64,
    buf: CopyBuf,
    result: Result<(), CopyError>,
}

/// A copy on its way.
type CopyFuture<'a> = Pin<Box<dyn Future<Output = Copied> + 'a>>;

/// The copies in flight (range and future), polled together.
#[derive(Default)]
struct Copies<'a> {
    flying: Vec<(u64, u64, CopyFuture<'a>)>,
}

impl<'a> Copies<'a> {
    fn start(&mut self, offset: u64, len: u64, f: CopyFuture<'a>) {
        self.flying.push((offset, len, f));
    }

    fn len(&self) -> usize {
        self.flying.len()
    }

    fn is_empty(&self) -> bool {
        self.flying.is_empty()
    }

    fn bytes(&self) -> u64 {
        self.flying.iter().map(|(_, n, _)| n).sum()
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.flying
            .iter()
            .any(|&(o, n, _)| o < offset + len && offset < o + n)
    }

    /// The next copy to finish (there must be one in flight).
    fn next(&mut self) -> NextCopy<'_, 'a> {
        debug_assert!(!self.flying.is_empty());
        NextCopy(self)
    }
}

struct NextCopy<'b, 'a>(&'b mut Copies<'a>);

impl Future for NextCopy<'_, '_> {
    type Output = Copied;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Copied> {
        let flying = &mut self.0.flying;
        for i in 0..flying.len() {
            if let Poll::Ready(c) = flying[i].2.as_mut().poll(cx) {
                drop(flying.swap_remove(i));
                return Poll::Ready(c);
            }
        }
        Poll::Pending
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

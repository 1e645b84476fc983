//! The `mirror` job (QEMU's blockdev-mirror and drive-mirror), and the part of it
//! that active commit is: copying a source's dirty ranges to a target until they
//! converge (ready), then, on `block-job-complete`, the pivot on the control thread.
//!
//! A dirty bitmap on the source records what was written since it was copied. It
//! starts with what the job must copy ([`Seed`]: what the source's chain holds above
//! a base, or nothing for `sync=none`); the job takes dirty ranges out and copies
//! them until none is left, then reports ready and keeps copying what the guest
//! writes. Progress counts the bytes copied, its length what is copied plus what is
//! still dirty, as QEMU's. Up to [`IN_FLIGHT`] copies are in flight at once (one at
//! a time under a speed limit), together at most `buf-size` bytes ([`Budget`]); a
//! range dirtied again while its copy is in flight waits for that copy, so the two
//! never land on the target out of order.
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

/// How long a job waits before it copies again a range whose error was ignored.
const IGNORED_RETRY: Duration = Duration::from_millis(100);

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
    /// The bytes the copies in flight may hold together (`buf-size`, rounded up
    /// to the granularity; see [`Budget`]).
    pub buf_size: u64,
    /// Zeroes written to the target may unmap (QEMU's `unmap`).
    pub unmap: bool,
    /// The target's cluster size (1 if it has none): zeroes are written as such
    /// only over whole clusters.
    pub target_cluster: u64,
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
        let budget = Budget::new(self.buf_size, self.dirty.granularity());
        // Where the next dirty range is looked for: the copies go round the disk.
        let mut cursor = 0;
        loop {
            self.target_write_errors().await?;
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
            let piece = budget.piece();
            let next = self.dirty.take_next(cursor, piece).or_else(|| {
                cursor = 0;
                self.dirty.take_next(0, piece)
            });
            match next {
                Some((off, n))
                    if copies.overlaps(off, n) || !budget.admits(copies.held(&budget), n) =>
                {
                    // Dirtied again while its copy is in flight (copied again after
                    // it), or no room left in the buffer: wait for a copy to end.
                    self.dirty.set(off, n);
                    cursor = 0;
                    let done = copies.next().await;
                    self.settle(&mut copies, &mut bufs, Some(done)).await?;
                }
                Some((off, n)) => {
                    cursor = off + n;
                    let buf = bufs.pop().unwrap_or_else(|| CopyBuf::sized(piece));
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

    /// Meets `on-target-error` for every guest write the target failed in
    /// write-blocking mode since the last look (their ranges are dirty already).
    async fn target_write_errors(&self) -> Result<(), String> {
        let Some(a) = &self.active else {
            return Ok(());
        };
        while let Some(errno) = a.take_target_error() {
            let e = CopyError {
                read: false,
                errno,
                message: blocklayer::error::strerror(errno),
            };
            // Stop pauses the job and ignore goes on: either way the range is copied
            // again later.
            self.ctx.on_error(e).await?;
        }
        Ok(())
    }

    /// Accounts a finished copy (`done`, or every copy in flight if `None`): copied
    /// bytes are progress; a failed copy stays dirty and, once no other copy is in
    /// flight, meets `on-error`.
    async fn settle<'a>(
        &'a self,
        copies: &mut Copies<'a>,
        bufs: &mut Vec<CopyBuf>,
        done: Option<Copied>,
    ) -> Result<(), String> {
        let mut failed: Option<CopyError> = None;
        let mut account = |c: Copied, bufs: &mut Vec<CopyBuf>| {
            bufs.push(c.buf);
            match c.result {
                Ok(()) => self.ctx.core.progress(c.len),
                Err(e) => {
                    self.dirty.set(c.offset, c.len);
                    failed.get_or_insert(e);
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
        let Some(e) = failed else {
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
        // The range stays dirty whatever the policy: copied again after a stop,
        // and after an ignored error too, as QEMU's (not in a tight loop while the
        // error lasts).
        if !self.ctx.on_error(e).await? {
            self.ctx.core.sleep(IGNORED_RETRY).await;
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
                if let Err(e) = self.target.write_zeroes(offset, n, self.unmap, false).await {
                    // As QEMU, a failure here ends the job.
                    return Err(CopyError::write(e).message);
                }
            }
            offset += n;
        }
        Ok(())
    }

    /// Copies one dirty range from the source to the target (under the filter's
    /// copy lock in write-blocking mode), with a buffer of its own. What the
    /// source's chain holds as zeroes (zero clusters, or nothing down to its last
    /// layer) is written to the target as zeroes, unmapped if `unmap`, when it
    /// spans whole target clusters, as QEMU's `MIRROR_METHOD_ZERO`; the rest is
    /// read and written.
    async fn copy(&self, buf: CopyBuf, offset: u64, len: u64) -> Copied {
        let (target, locked) = (&self.target, self.active.is_some());
        let (unmap, tc) = (self.unmap, self.target_cluster.max(1));
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
                    .with_node(|t| async move {
                        let (mut at, end) = (offset, offset + len);
                        while at < end {
                            let (zero, n) = reads_zero(&s, at, end - at)
                                .await
                                .map_err(CopyError::read)?;
                            let n = n.clamp(1, end - at);
                            if zero && at % tc == 0 && n % tc == 0 {
                                t.write_zeroes(at, n, unmap, false)
                                    .await
                                    .map_err(CopyError::write)?;
                            } else {
                                copy_range(b, &s, &t, at, n).await?;
                            }
                            at += n;
                        }
                        Ok(())
                    })
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

/// Whether `offset..` of `top`'s chain reads as zeroes without holding data there
/// (a zero cluster, or nothing allocated down to a layer without backing), and for
/// how many bytes (QEMU's block status of the whole chain, as its mirror uses it).
async fn reads_zero(top: &Arc<Node>, offset: u64, len: u64) -> blocklayer::Result<(bool, u64)> {
    use blocklayer::block_status::Status;
    let (mut layer, mut offset, mut n) = (top.clone(), offset, len);
    loop {
        if offset >= layer.size() {
            // Past the end of a shorter backing file: zeroes.
            return Ok((true, n));
        }
        let name = layer.driver_name();
        if matches!(name, "mirror_top" | "commit_top")
            || blocklayer::drivers::kind(name) == Some(blocklayer::drivers::Kind::Filter)
        {
            // A filter (the job's own above the source, or the user's) holds
            // nothing itself.
            let below = layer
                .primary_child()
                .or_else(|| layer.children().first().map(|c| c.node_arc()));
            match below {
                Some(c) => {
                    layer = c;
                    continue;
                }
                None => return Ok((false, n)),
            }
        }
        n = n.min(layer.size() - offset);
        let (status, m) = layer.driver().block_status(offset, n).await?;
        let m = m.clamp(1, n);
        match status {
            Status::Data => return Ok((false, m)),
            Status::Zero => return Ok((true, m)),
            Status::Unallocated => {
                n = m;
                match layer.backing() {
                    Some(b) => layer = b,
                    None => return Ok((true, n)),
                }
            }
            // `raw` (possibly at an offset) and filters: the child answers.
            Status::Below(child, at) => {
                n = m;
                layer = child;
                offset = at;
            }
        }
    }
}

/// Copies a mirror keeps in flight at most (QEMU's `MAX_IN_FLIGHT`).
const IN_FLIGHT: usize = 16;
/// The smallest size a copy is cut to (QEMU's `MAX_IO_BYTES`), and the default
/// `buf-size` (16 copies of it).
const MIN_PIECE: u64 = 1 << 20;
pub const DEFAULT_BUF_SIZE: u64 = IN_FLIGHT as u64 * MIN_PIECE;
/// Granules one copy spans at most (QEMU's bound by the I/O vector's length).
const MAX_IOV: u64 = 1024;

/// A mirror's copy buffer, as QEMU's: `buf-size` bytes (rounded up to whole
/// granules) shared by the copies in flight, each taking the granules its range
/// spans; a copy waits until its granules are free. Copies are cut to pieces of
/// `buf-size / 16` (at least 1 MiB, at most `buf-size`, whole granules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    size: u64,
    granularity: u64,
}

impl Budget {
    /// `buf_size` 0 is the default.
    pub fn new(buf_size: u64, granularity: u64) -> Budget {
        let want = if buf_size == 0 {
            DEFAULT_BUF_SIZE
        } else {
            buf_size
        };
        Budget {
            size: want.div_ceil(granularity).saturating_mul(granularity),
            granularity,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The most one copy takes.
    pub fn piece(&self) -> u64 {
        let g = self.granularity;
        let p = (self.size / IN_FLIGHT as u64)
            .max(MIN_PIECE)
            .min(self.size)
            .min(g.saturating_mul(MAX_IOV));
        (p - p % g).max(g)
    }

    /// The granules `len` bytes take in the buffer.
    fn granules(&self, len: u64) -> u64 {
        len.div_ceil(self.granularity) * self.granularity
    }

    /// Whether a copy of `len` bytes fits beside copies holding `held` bytes of
    /// the buffer.
    pub fn admits(&self, held: u64, len: u64) -> bool {
        held + self.granules(len) <= self.size
    }
}

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

    /// The bytes in flight.
    fn bytes(&self) -> u64 {
        self.flying.iter().map(|(_, n, _)| n).sum()
    }

    /// The buffer's bytes the copies in flight hold.
    fn held(&self, b: &Budget) -> u64 {
        self.flying.iter().map(|(_, n, _)| b.granules(*n)).sum()
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
/// and flushes the target, one copy at a time within the job's `buf-size`.
pub async fn copy_remaining(
    core: Arc<JobCore>,
    source: Arc<Node>,
    target: Arc<Node>,
    dirty: Arc<DirtyBitmap>,
    budget: Budget,
) -> Result<(), String> {
    let piece = budget.piece().min(CHUNK);
    let buf = CopyBuf::sized(piece);
    while let Some((off, n)) = dirty.take_next(0, piece) {
        copy_range(&buf, &source, &target, off, n)
            .await
            .map_err(|e| e.message)?;
        core.progress(n);
    }
    core.set_len(core.offset());
    target.flush().await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 65536;

    #[test]
    fn budget_defaults_and_rounds_as_qemu() {
        let b = Budget::new(0, G);
        assert_eq!((b.size(), b.piece()), (16 << 20, 1 << 20));
        // Rounded up to whole granules; a single granule is enough.
        assert_eq!(Budget::new(1, G).size(), G);
        assert_eq!(Budget::new(G + 1, 4096).size(), G + 4096);
        // Pieces: buf-size / 16, at least 1 MiB, at most buf-size.
        assert_eq!(Budget::new(64 << 20, G).piece(), 4 << 20);
        assert_eq!(Budget::new(4 << 20, G).piece(), 1 << 20);
        assert_eq!(Budget::new(G, G).piece(), G);
        assert_eq!(Budget::new(3 * G, G).piece(), 3 * G);
        // A granule larger than the piece: one granule.
        assert_eq!(Budget::new(64 << 20, 64 << 20).piece(), 64 << 20);
        // 512-byte granules: 1024 of them at most.
        assert_eq!(Budget::new(0, 512).piece(), 512 * 1024);
    }

    #[test]
    fn budget_bounds_the_bytes_in_flight() {
        let b = Budget::new(G, G);
        assert!(b.admits(0, G));
        assert!(!b.admits(G, 4096));
        let b = Budget::new(4 * G, G);
        assert!(b.admits(2 * G, 2 * G));
        assert!(!b.admits(3 * G, G + 1));
        // A short copy at the disk's end still takes a whole granule.
        assert!(!b.admits(4 * G - 1, 1));
    }
}

//! Copying the old data of a node to a target before it changes (QEMU's
//! block/block-copy.c), shared by the `copy-before-write` filter and the backup job.
//!
//! The state is one bit per cluster ("still to copy") and the list of runs being
//! copied. Any number of callers copy at once: the filter for a guest write, the job
//! for its pass over the disk. A caller takes the dirty clusters of a run out of the
//! bitmap and registers the run in flight in one step under the lock; a caller whose
//! range meets a run in flight waits for it. So every cluster is copied once, and
//! when [`BlockCopy::copy`] returns, every cluster of its range is on the target: a
//! guest write that waits for it can go ahead. A run that fails goes back into the
//! bitmap, and a caller waiting for it copies it itself.

use crate::aio::bounce::Budget;
use crate::aio::iovec::{AlignedBuf, IoVec};
use crate::aio::uring::sleep_ns;
use crate::bitmap::DirtyBitmap;
use crate::edge::Edge;
use crate::error::{BlockError, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// QEMU's default block-copy cluster size (`BLOCK_COPY_CLUSTER_SIZE_DEFAULT`).
pub const DEFAULT_CLUSTER: u64 = 64 * 1024;

/// The largest run one caller copies at once.
const MAX_RUN: u64 = 1 << 20;

/// How long a caller waits before it looks again at a run in flight that overlaps
/// its range (runs are short; the same pattern as the nodes' serialised ranges).
const RETRY_NS: u64 = 20_000;

/// A failed copy: whether reading the source or writing the target failed, and how.
#[derive(Debug)]
pub struct CopyFailure {
    pub read: bool,
    pub error: BlockError,
}

/// One bit per cluster.
#[derive(Debug, Clone)]
pub struct ClusterBits {
    words: Vec<u64>,
    bits: u64,
}

impl ClusterBits {
    /// `bits` bits, all set or all clear.
    pub fn new(bits: u64, set: bool) -> Self {
        let mut b = ClusterBits {
            words: vec![0; bits.div_ceil(64) as usize],
            bits,
        };
        if set {
            b.set_range(0, bits, true);
        }
        b
    }

    pub fn get(&self, bit: u64) -> bool {
        bit < self.bits && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// Sets or clears bits `from..to` (clipped to the bitmap).
    pub fn set_range(&mut self, from: u64, to: u64, on: bool) {
        for bit in from..to.min(self.bits) {
            let w = &mut self.words[(bit / 64) as usize];
            if on {
                *w |= 1 << (bit % 64);
            } else {
                *w &= !(1 << (bit % 64));
            }
        }
    }

    /// Whether every bit of `from..to` is set.
    pub fn all(&self, from: u64, to: u64) -> bool {
        (from..to.min(self.bits)).all(|b| self.get(b))
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The clusters of `cluster` bytes (`bits` of them) that hold a dirty granule of
    /// `dirty` (QEMU merges a bitmap into block-copy's this way).
    pub fn from_dirty(dirty: &DirtyBitmap, cluster: u64, bits: u64) -> Self {
        let mut b = ClusterBits::new(bits, false);
        let mut at = 0;
        while let Some((off, len)) = dirty.next_dirty(at, u64::MAX) {
            b.set_range(off / cluster, (off + len).div_ceil(cluster), true);
            at = off + len;
        }
        b
    }

    /// Sets in `dirty` every cluster of `cluster` bytes set here.
    pub fn mark_into(&self, dirty: &DirtyBitmap, cluster: u64) {
        let mut bit = 0;
        while let Some(b) = self.next_set(bit) {
            dirty.set(b * cluster, cluster);
            bit = b + 1;
        }
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        (from..self.bits).find(|b| self.get(*b))
    }
}

struct State {
    /// Clusters still to copy.
    dirty: ClusterBits,
    /// Byte ranges being copied now.
    in_flight: Vec<(u64, u64)>,
}

pub struct BlockCopy {
    source: Arc<Edge>,
    target: Arc<Edge>,
    cluster: u64,
    size: u64,
    state: Mutex<State>,
    /// Clusters the source does not have itself are dropped, not copied (the
    /// backup job's `sync=top` while it has not looked at the whole disk yet).
    skip_unallocated: AtomicBool,
    /// Bytes copied so far, by anyone (the job's progress counts them all).
    copied: AtomicU64,
    /// Copies are written compressed, a cluster at a time (backup's `compress`).
    compress: AtomicBool,
}

impl std::fmt::Debug for BlockCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCopy")
            .field("cluster", &self.cluster)
            .field("size", &self.size)
            .finish()
    }
}

/// Whether two byte ranges overlap.
fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

impl BlockCopy {
    /// Copies from the node of `source` to that of `target`, `cluster` bytes at a
    /// time; every cluster is still to copy.
    pub fn new(source: Arc<Edge>, target: Arc<Edge>, cluster: u64) -> BlockCopy {
        let size = source.node().size();
        BlockCopy {
            source,
            target,
            cluster,
            size,
            state: Mutex::new(State {
                dirty: ClusterBits::new(size.div_ceil(cluster), true),
                in_flight: Vec::new(),
            }),
            skip_unallocated: AtomicBool::new(false),
            copied: AtomicU64::new(0),
            compress: AtomicBool::new(false),
        }
    }

    /// Writes every copy compressed from now on (the target must support it).
    pub fn set_compress(&self, on: bool) {
        self.compress.store(on, Ordering::Release);
    }

    /// The cluster size a copy to `target` uses (QEMU's
    /// `block_copy_calculate_cluster_size`): the target's cluster size, at least
    /// 64 KiB; 64 KiB when the target does not say.
    pub fn cluster_size_for(target: &crate::Node) -> u64 {
        target
            .driver()
            .image_info()
            .cluster_size
            .map_or(DEFAULT_CLUSTER, |c| c.max(DEFAULT_CLUSTER))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes copied so far (by the filter and the job).
    pub fn copied(&self) -> u64 {
        self.copied.load(Ordering::Acquire)
    }

    /// Bytes of the clusters still to copy and not in flight (the count of QEMU's
    /// block-copy bitmap).
    pub fn dirty_bytes(&self) -> u64 {
        self.lock().dirty.count() * self.cluster
    }

    /// Bytes still to copy, counting the runs in flight.
    pub fn remaining(&self) -> u64 {
        let s = self.lock();
        let dirty = (s.dirty.count() * self.cluster).min(self.size);
        dirty + s.in_flight.iter().map(|r| r.1).sum::<u64>()
    }

    pub fn set_skip_unallocated(&self, on: bool) {
        self.skip_unallocated.store(on, Ordering::Release);
    }

    /// Marks `offset..+len` (whole clusters inside it) as not to be copied.
    pub fn reset(&self, offset: u64, len: u64) {
        let first = offset.div_ceil(self.cluster);
        let end = (offset + len) / self.cluster;
        self.lock().dirty.set_range(first, end, false);
    }

    /// Sets the clusters to copy to exactly `dirty` (one bit per cluster).
    pub fn set_dirty(&self, dirty: ClusterBits) {
        self.lock().dirty = dirty;
    }

    /// The clusters still to copy.
    pub fn dirty(&self) -> ClusterBits {
        self.lock().dirty.clone()
    }

    /// The offset of the first cluster still to copy at or after `from`.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        let s = self.lock();
        s.dirty
            .next_set(from / self.cluster)
            .map(|b| b * self.cluster)
    }

    /// Whether any byte of the cluster at `offset` is the source's own (not read
    /// from its backing chain).
    async fn cluster_allocated(&self, offset: u64) -> Result<bool> {
        let src = self.source.node_arc();
        let end = (offset + self.cluster).min(self.size);
        let mut pos = offset;
        while pos < end {
            let (alloc, n) = src.driver().is_allocated(pos, end - pos).await?;
            if alloc {
                return Ok(true);
            }
            pos += n.max(1);
        }
        Ok(false)
    }

    /// `sync=top`'s first look at the cluster at `offset` (cluster aligned): drops
    /// it if the source does not have it. Returns the bytes looked at.
    pub async fn reset_unallocated(&self, offset: u64) -> Result<u64> {
        if !self.cluster_allocated(offset).await? {
            let bit = offset / self.cluster;
            self.lock().dirty.set_range(bit, bit + 1, false);
        }
        Ok(self.cluster.min(self.size - offset))
    }

    /// Makes sure that the old data of every cluster of `offset..+len` is on the
    /// target: copies the clusters still to copy and waits for those being copied.
    /// `buf`, if given, is the caller's own buffer (the job's); otherwise bounce
    /// memory is leased from the iothread's budget. Returns the bytes this call
    /// copied.
    pub async fn copy(
        &self,
        offset: u64,
        len: u64,
        buf: Option<&Arc<AlignedBuf>>,
    ) -> std::result::Result<u64, CopyFailure> {
        let end = offset.saturating_add(len).min(self.size);
        let mut pos = offset - offset % self.cluster;
        let max_run = buf.map_or(MAX_RUN, |b| b.len() as u64).max(self.cluster);
        let mut done = 0;
        while pos < end {
            let run = {
                let mut s = self.lock();
                let here = (pos, self.cluster);
                if s.in_flight.iter().any(|r| overlaps(*r, here)) {
                    None
                } else if !s.dirty.get(pos / self.cluster) {
                    Some((pos, 0))
                } else {
                    // A run of dirty clusters nobody copies, taken out at once.
                    let mut n = self.cluster;
                    while pos + n < end
                        && n + self.cluster <= max_run
                        && s.dirty.get((pos + n) / self.cluster)
                        && !s
                            .in_flight
                            .iter()
                            .any(|r| overlaps(*r, (pos + n, self.cluster)))
                    {
                        n += self.cluster;
                    }
                    let n = n.min(self.size - pos);
                    let bit = pos / self.cluster;
                    s.dirty
                        .set_range(bit, bit + n.div_ceil(self.cluster), false);
                    s.in_flight.push((pos, n));
                    Some((pos, n))
                }
            };
            let Some((at, n)) = run else {
                sleep_ns(RETRY_NS).await;
                continue;
            };
            if n == 0 {
                pos += self.cluster;
                continue;
            }
            let r = self.copy_run(at, n, buf).await;
            {
                let mut s = self.lock();
                if let Some(i) = s.in_flight.iter().position(|r| *r == (at, n)) {
                    s.in_flight.swap_remove(i);
                }
                if r.is_err() {
                    let bit = at / self.cluster;
                    s.dirty.set_range(bit, bit + n.div_ceil(self.cluster), true);
                }
            }
            let copied = r?;
            self.copied.fetch_add(n, Ordering::AcqRel);
            done += copied;
            pos = at + n;
        }
        Ok(done)
    }

    /// Copies the run `at..+n`, which this caller holds. Returns the bytes copied
    /// (0 when the source does not have them and they are skipped).
    async fn copy_run(
        &self,
        at: u64,
        n: u64,
        buf: Option<&Arc<AlignedBuf>>,
    ) -> std::result::Result<u64, CopyFailure> {
        let read_err = |error| CopyFailure { read: true, error };
        if self.skip_unallocated.load(Ordering::Acquire) {
            let mut any = false;
            let mut c = at;
            while c < at + n && !any {
                any = self.cluster_allocated(c).await.map_err(read_err)?;
                c += self.cluster;
            }
            if !any {
                return Ok(0);
            }
        }
        let src = self.source.node_arc();
        let dst = self.target.node_arc();
        let lease;
        let iov = match buf {
            Some(b) => IoVec::from_buf(b.clone()).slice(0, n),
            None => {
                let align = src.limits().mem_alignment.max(512);
                lease = Budget::current().lease(n as usize).await;
                let b = lease.alloc(n as usize, align).ok_or_else(|| CopyFailure {
                    read: true,
                    error: BlockError::io(
                        "copy-before-write",
                        std::io::Error::from_raw_os_error(libc::ENOMEM),
                    ),
                })?;
                IoVec::from_buf(Arc::new(b))
            }
        };
        src.read(at, iov.clone()).await.map_err(read_err)?;
        let w = if self.compress.load(Ordering::Acquire) {
            // One cluster at a time, each compressed on its own (QEMU's
            // COPY_WRITE_COMPRESSED method).
            let mut data = vec![0u8; n as usize];
            iov.copy_to_slice(0, &mut data);
            let mut r = Ok(());
            for (i, piece) in data.chunks(self.cluster as usize).enumerate() {
                let off = at + i as u64 * self.cluster;
                r = dst.write_compressed(off, piece.to_vec()).await;
                if r.is_err() {
                    break;
                }
            }
            r
        } else if iov.is_zero() {
            dst.write_zeroes(at, n, true, false).await
        } else {
            dst.write(at, iov, false).await
        };
        w.map_err(|error| CopyFailure { read: false, error })?;
        Ok(n)
    }
}

impl crate::Node {
    /// Reads the node's point-in-time view (see
    /// [`crate::driver::Driver::read_snapshot`]), counted in flight on the node.
    pub async fn read_snapshot(&self, offset: u64, iov: IoVec) -> Result<()> {
        let _g = crate::node::InFlight::enter(self);
        self.driver().read_snapshot(offset, iov).await
    }

    /// Drops `offset..+len` from the node's point-in-time view.
    pub async fn discard_snapshot(&self, offset: u64, len: u64) -> Result<()> {
        let _g = crate::node::InFlight::enter(self);
        self.driver().discard_snapshot(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_bits() {
        let mut b = ClusterBits::new(130, false);
        assert_eq!(b.count(), 0);
        b.set_range(62, 66, true);
        assert_eq!(b.count(), 4);
        assert!(b.all(62, 66) && !b.all(61, 66));
        assert_eq!(b.next_set(0), Some(62));
        assert_eq!(b.next_set(66), None);
        b.set_range(63, 64, false);
        assert_eq!(b.next_set(63), Some(64));
        let full = ClusterBits::new(130, true);
        assert_eq!(full.count(), 130);
        assert!(!full.get(130));
    }

    /// Callers copying overlapping ranges at once (as the job and guest writes do)
    /// copy every cluster exactly once, and the target ends up equal to the source.
    #[test]
    fn concurrent_copies_copy_each_cluster_once() {
        use crate::edge::Role;
        use crate::graph::Graph;
        use crate::options::BlockdevOptions;
        use serde_json::json;
        use std::future::Future;
        use std::pin::Pin;

        const SIZE: u64 = 2 << 20;
        let dir = std::env::temp_dir();
        let (src, tgt) = (
            dir.join(format!("vubd-bc-src-{}", std::process::id())),
            dir.join(format!("vubd-bc-tgt-{}", std::process::id())),
        );
        let data: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 251) as u8 + 1).collect();
        std::fs::write(&src, &data).unwrap();
        std::fs::write(&tgt, vec![0u8; SIZE as usize]).unwrap();
        let mut g = Graph::new();
        let mut add = |name: &str, path: &std::path::Path| {
            g.add(
                &BlockdevOptions::from_json(
                    &json!({"driver": "file", "node-name": name, "filename": path.to_str()}),
                )
                .unwrap(),
            )
            .unwrap()
        };
        let (s, t) = (add("s", &src), add("t", &tgt));
        let bcs = Arc::new(BlockCopy::new(
            Edge::child_of("test", "file", Role::Filtered, &s),
            Edge::child_of("test", "target", Role::DataFile, &t),
            DEFAULT_CLUSTER,
        ));
        let b = bcs.clone();
        let copied = crate::aio::uring::block_on(async move {
            let buf = Arc::new(AlignedBuf::zeroed(512 * 1024, 4096));
            let ranges = [
                (0, SIZE, Some(buf)),
                (3 * DEFAULT_CLUSTER + 100, 200_000, None),
                (SIZE / 2, SIZE / 2, None),
                (4096, 8192, None),
                (SIZE - 1, 1, None),
            ];
            let mut futs: Vec<Pin<Box<dyn Future<Output = u64> + '_>>> = ranges
                .iter()
                .map(|(o, l, buf)| {
                    let b = &b;
                    Box::pin(async move { b.copy(*o, *l, buf.as_ref()).await.unwrap() }) as _
                })
                .collect();
            let mut total = 0;
            std::future::poll_fn(|cx| {
                futs.retain_mut(|f| match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(n) => {
                        total += n;
                        false
                    }
                    std::task::Poll::Pending => true,
                });
                if futs.is_empty() {
                    std::task::Poll::Ready(total)
                } else {
                    std::task::Poll::Pending
                }
            })
            .await
        });
        assert_eq!(copied, SIZE, "bytes copied by all the callers together");
        assert_eq!((bcs.copied(), bcs.remaining()), (SIZE, 0));
        assert_eq!(std::fs::read(&tgt).unwrap(), data);
        drop((bcs, s, t, g));
        let _ = std::fs::remove_file(src);
        let _ = std::fs::remove_file(tgt);
    }
}

//! The generic request path every node goes through (QEMU's block/io.c): range and
//! permission checks, alignment by read-modify-write through bounce buffers, splitting
//! at the node's limits, FUA emulation, flush elision, zero detection and the
//! write-zeroes fallback. Drivers only see requests that fit their limits.

use crate::aio::bounce::{Budget, Lease, BOUNCE_CHUNK};
use crate::aio::iovec::{AlignedBuf, IoVec};
use crate::aio::uring::sleep_ns;
use crate::error::{BlockError, Result};
use crate::node::{InFlight, Node, Serial, Tracked};
use crate::options::DetectZeroes;
use crate::stats::{Acct, IoKind, IoStats};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

/// Largest zero buffer the write-zeroes fallback writes at once.
const ZERO_CHUNK: u64 = 1 << 20;

fn is_aligned(v: u64, align: u32) -> bool {
    v.is_multiple_of(u64::from(align))
}

fn align_down(v: u64, align: u32) -> u64 {
    v - v % u64::from(align)
}

fn align_up(v: u64, align: u32) -> u64 {
    align_down(v + u64::from(align) - 1, align)
}

/// The length of the next chunk starting at `pos` of `iov` that respects the byte and
/// segment limits and stays a multiple of `align` (0 if no aligned chunk fits).
fn next_chunk(iov: &IoVec, pos: u64, max_bytes: u64, max_iov: usize, align: u32) -> u64 {
    let mut len = 0u64;
    let mut skip = pos;
    let mut segs = 0usize;
    for s in iov.segments() {
        let slen = s.iov_len as u64;
        if skip >= slen {
            skip -= slen;
            continue;
        }
        if segs == max_iov {
            break;
        }
        segs += 1;
        len += slen - skip;
        skip = 0;
        if len >= max_bytes {
            break;
        }
    }
    align_down(len.min(max_bytes), align)
}

/// A zero-filled buffer shared by every write-zeroes fallback.
fn zero_buffer() -> Arc<AlignedBuf> {
    static ZEROES: OnceLock<Arc<AlignedBuf>> = OnceLock::new();
    ZEROES
        .get_or_init(|| Arc::new(AlignedBuf::zeroed(ZERO_CHUNK as usize, 4096)))
        .clone()
}

/// How a write reaches [`Node::write_accounted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    Plain,
    /// May end past the node's end (a file growing under a format driver).
    Growing,
    /// Leaves what the node reads unchanged (copy-on-read): no dirty bitmap marks,
    /// no write threshold.
    Unchanged,
}

/// Removes a serialised range (see [`Tracked`]) when its request finishes.
pub struct TrackGuard<'a> {
    node: &'a Node,
    entry: Tracked,
}

impl Drop for TrackGuard<'_> {
    fn drop(&mut self) {
        let mut t = self.node.tracked.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = t.iter().position(|r| *r == self.entry) {
            t.swap_remove(i);
        }
    }
}

impl Node {
    /// Accounts a finished request in this node's statistics.
    #[inline(always)]
    pub(crate) fn account(&self, acct: Acct, r: &Result<()>, end: u64) {
        match r {
            Err(BlockError::OutOfRange { .. }) => self.stats.invalid(acct.kind()),
            r => {
                self.stats.done(acct, r.is_ok(), end);
            }
        }
    }

    /// Reads `iov.len()` bytes at `offset` into `iov`.
    pub async fn read(&self, offset: u64, iov: IoVec) -> Result<()> {
        let _g = InFlight::enter(self);
        self.read_entered(offset, iov).await
    }

    /// [`Node::read`] of a request already counted in flight (admitted by a block
    /// backend, which counts it before it looks for a drained section).
    pub(crate) async fn read_entered(&self, offset: u64, iov: IoVec) -> Result<()> {
        let acct = IoStats::start(IoKind::Read, iov.len());
        // The usual request goes to the driver as it is, without the futures of the
        // generic path (which would hand it on unchanged).
        let r = if !iov.is_empty()
            && self.in_range(offset, iov.len())
            && self.in_one_piece(offset, &iov)
        {
            self.driver().read(offset, iov).await
        } else {
            self.read_checked(offset, iov).await
        };
        self.account(acct, &r, 0);
        r
    }

    /// Writes `iov` at `offset`; with `fua` the data is stable when this returns.
    pub async fn write(&self, offset: u64, iov: IoVec, fua: bool) -> Result<()> {
        let _g = InFlight::enter(self);
        self.write_entered(offset, iov, fua).await
    }

    /// Writes a cluster compressed (see [`crate::driver::Driver::write_compressed`]),
    /// accounted and marked like a write.
    pub async fn write_compressed(&self, offset: u64, data: Vec<u8>) -> Result<()> {
        let _g = InFlight::enter(self);
        let len = data.len() as u64;
        let acct = IoStats::start(IoKind::Write, len);
        let r = match self
            .check_writable()
            .and_then(|()| self.check_range(offset, len))
        {
            Err(e) => Err(e),
            Ok(()) => match self.driver().write_compressed(offset, data) {
                Some(f) => f.await,
                None => Err(BlockError::io(
                    "write_compressed",
                    std::io::Error::from_raw_os_error(libc::ENOTSUP),
                )),
            },
        };
        self.account(acct, &r, offset.saturating_add(len));
        self.written(&r, offset, len);
        r
    }

    /// [`Node::write`] of a request already counted in flight.
    pub(crate) async fn write_entered(&self, offset: u64, iov: IoVec, fua: bool) -> Result<()> {
        let _t = self.track_write(offset, iov.len()).await;
        self.write_accounted(offset, iov, fua, Write::Plain).await
    }

    /// A job's write of data it copied (stream's copy-on-read, commit): like
    /// [`Node::write`], but not serialised against the job's own copy range, which
    /// the job holds (see [`Node::copy_lock`]).
    pub async fn write_copied(&self, offset: u64, iov: IoVec) -> Result<()> {
        let _g = InFlight::enter(self);
        self.write_accounted(offset, iov, false, Write::Plain).await
    }

    /// A copy-on-read's write of data read through the node (stream, the
    /// `copy-on-read` filter): like [`Node::write_copied`], but what the node reads
    /// does not change, so neither dirty bitmaps nor the write threshold see it (QEMU
    /// writes these straight to the driver). The writes it makes below (a format
    /// driver's into its file) are plain writes there.
    pub async fn write_unchanged(&self, offset: u64, iov: IoVec) -> Result<()> {
        let _g = InFlight::enter(self);
        self.write_accounted(offset, iov, false, Write::Unchanged)
            .await
    }

    /// Writes `iov` at `offset`, growing the node when the write ends past its end
    /// (a format driver writing new clusters into its file). Only for nodes whose
    /// driver [grows on write](crate::driver::Driver::grows_on_write).
    pub async fn write_growing(&self, offset: u64, iov: IoVec) -> Result<()> {
        debug_assert!(self.driver().grows_on_write());
        let _g = InFlight::enter(self);
        let _t = self.track_write(offset, iov.len()).await;
        self.write_accounted(offset, iov, false, Write::Growing)
            .await
    }

    /// A write with its statistics, dirty bitmaps and write threshold.
    async fn write_accounted(&self, offset: u64, iov: IoVec, fua: bool, kind: Write) -> Result<()> {
        let len = iov.len();
        let acct = IoStats::start(IoKind::Write, len);
        let grow = kind == Write::Growing;
        let r = self.write_checked(offset, iov, fua, grow).await;
        self.account(acct, &r, offset.saturating_add(len));
        if grow {
            self.grow_bitmaps();
        }
        if kind != Write::Unchanged {
            self.written(&r, offset, len);
        }
        r
    }

    /// After a write-like request (done or failed: the data may have changed, as in
    /// QEMU; not when it was refused before any I/O): dirty bitmaps and the write
    /// threshold.
    #[inline]
    pub(crate) fn written(&self, r: &Result<()>, offset: u64, len: u64) {
        if matches!(
            r,
            Err(BlockError::OutOfRange { .. } | BlockError::ReadOnly(_))
        ) {
            return;
        }
        self.mark_dirty(offset, len);
        self.check_write_threshold(offset, len);
    }

    /// While a job serialises copies into this node, registers a write's range,
    /// waiting while it overlaps a range being copied. Nothing to do otherwise.
    #[inline]
    pub(crate) async fn track_write(&self, offset: u64, len: u64) -> Option<TrackGuard<'_>> {
        if self.serialising.load(Ordering::SeqCst) == 0 {
            return None;
        }
        Some(
            self.track(offset, offset.saturating_add(len), Serial::Write)
                .await,
        )
    }

    /// Serialises a job's copy of `offset..offset+len` against writes: waits for
    /// overlapping writes to finish and holds new ones until the guard is dropped.
    /// Only while [`Node::serialise_begin`] is in effect (writes are tracked).
    pub async fn copy_lock(&self, offset: u64, len: u64) -> TrackGuard<'_> {
        self.track(offset, offset.saturating_add(len), Serial::Copy)
            .await
    }

    /// Starts tracking writes for a job's serialised copies. The caller drains the
    /// node around this call, so that no untracked write is in flight afterwards.
    pub fn serialise_begin(&self) {
        self.serialising.fetch_add(1, Ordering::SeqCst);
    }

    pub fn serialise_end(&self) {
        self.serialising.fetch_sub(1, Ordering::SeqCst);
    }

    /// Registers `start..end` as serialised request of kind `kind`, waiting while it
    /// overlaps one it must not run beside (see [`Serial::waits_for`]). Overlaps are
    /// rare and short (sub-block pieces of one block written at once; a guest write
    /// meeting a job's copy of one chunk): the wait looks again shortly.
    async fn track(&self, start: u64, end: u64, kind: Serial) -> TrackGuard<'_> {
        loop {
            {
                let mut t = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
                let blocked = t
                    .iter()
                    .any(|r| r.start < end && start < r.end && kind.waits_for(r.kind));
                if !blocked {
                    let entry = Tracked { start, end, kind };
                    t.push(entry);
                    return TrackGuard { node: self, entry };
                }
            }
            sleep_ns(20_000).await;
        }
    }

    /// Flushes written data to stable storage (elided if nothing was written since the
    /// last flush).
    pub async fn flush(&self) -> Result<()> {
        let _g = InFlight::enter(self);
        self.flush_entered().await
    }

    /// [`Node::flush`] of a request already counted in flight.
    pub(crate) async fn flush_entered(&self) -> Result<()> {
        let acct = IoStats::start(IoKind::Flush, 0);
        let r = self.flush_inner().await;
        self.account(acct, &r, 0);
        r
    }

    /// [`Node::flush`] through [`Driver::flush_unchecked`]: for a format driver's
    /// own ordering flushes where QEMU's has none, which blkdebug rules do not see.
    pub async fn flush_unchecked(&self) -> Result<()> {
        let _g = InFlight::enter(self);
        let acct = IoStats::start(IoKind::Flush, 0);
        let r = self.flush_inner_as(false).await;
        self.account(acct, &r, 0);
        r
    }

    /// Discards a range if this node has `discard=unmap`; otherwise does nothing.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _g = InFlight::enter(self);
        self.discard_entered(offset, len).await
    }

    /// [`Node::discard`] of a request already counted in flight.
    pub(crate) async fn discard_entered(&self, offset: u64, len: u64) -> Result<()> {
        let _t = self.track_write(offset, len).await;
        let acct = IoStats::start(IoKind::Unmap, len);
        let r = self.discard_checked(offset, len).await;
        self.account(acct, &r, 0);
        // As QEMU: a discard the node ignores (no `discard=unmap`) marks nothing.
        let refused = matches!(
            r,
            Err(BlockError::OutOfRange { .. } | BlockError::ReadOnly(_))
        );
        if self.flags().discard_unmap && !refused {
            self.mark_dirty(offset, len);
        }
        r
    }

    /// Makes `offset..offset+len` read as zeroes; `may_unmap` lets the node deallocate
    /// (only honoured with `discard=unmap`). Accounted as a write, as QEMU does.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<()> {
        let _g = InFlight::enter(self);
        self.write_zeroes_entered(offset, len, may_unmap, fua).await
    }

    /// [`Node::write_zeroes`] of a request already counted in flight.
    pub(crate) async fn write_zeroes_entered(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<()> {
        let _t = self.track_write(offset, len).await;
        let acct = IoStats::start(IoKind::Write, len);
        let r = self.write_zeroes_checked(offset, len, may_unmap, fua).await;
        self.account(acct, &r, offset.saturating_add(len));
        self.written(&r, offset, len);
        r
    }

    /// Reserves host space for `offset..offset+len` (image preallocation): holes in
    /// the range read as zeroes afterwards and take space on the host; data already
    /// there may stay, or be zeroed where the driver cannot reserve space and zero
    /// buffers are written instead. Accounted as a write.
    pub async fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        let _g = InFlight::enter(self);
        let _t = self.track_write(offset, len).await;
        let acct = IoStats::start(IoKind::Write, len);
        let r = self.allocate_checked(offset, len).await;
        self.account(acct, &r, offset.saturating_add(len));
        self.written(&r, offset, len);
        r
    }

    #[inline]
    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.size())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if self.in_range(offset, len) {
            return Ok(());
        }
        Err(BlockError::OutOfRange {
            node: self.name().to_string(),
            offset,
            len,
            size: self.size(),
        })
    }

    /// Whether a read or write of `iov` at `offset` goes to the driver in one piece,
    /// as it is: aligned, and within the node's limits.
    #[inline]
    fn in_one_piece(&self, offset: u64, iov: &IoVec) -> bool {
        let l = self.limits();
        self.is_aligned_for(offset, iov)
            && iov.len() <= l.transfer_cap()
            && iov.segments().len() <= l.max_iov
    }

    /// Whether a read or write of `iov` at `offset` meets the node's request and
    /// memory alignment (else it is bounced).
    #[inline]
    fn is_aligned_for(&self, offset: u64, iov: &IoVec) -> bool {
        let l = self.limits();
        is_aligned(offset, l.request_alignment)
            && is_aligned(iov.len(), l.request_alignment)
            && iov.is_aligned(l.mem_alignment)
    }

    fn check_writable(&self) -> Result<()> {
        if self.is_read_only() {
            Err(BlockError::ReadOnly(self.name().to_string()))
        } else {
            Ok(())
        }
    }

    pub(crate) fn note_write(&self) {
        self.write_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// Reads `iov.len()` bytes at `offset` into `iov`.
    async fn read_checked(&self, offset: u64, iov: IoVec) -> Result<()> {
        self.check_range(offset, iov.len())?;
        if iov.is_empty() {
            return Ok(());
        }
        if self.is_aligned_for(offset, &iov) {
            self.read_split(offset, iov).await
        } else {
            self.read_bounced(offset, iov).await
        }
    }

    /// Reads an aligned request, split at the limits.
    async fn read_split(&self, offset: u64, iov: IoVec) -> Result<()> {
        let l = self.limits();
        if iov.len() <= l.transfer_cap() && iov.segments().len() <= l.max_iov {
            return self.driver().read(offset, iov).await;
        }
        let mut pos = 0;
        while pos < iov.len() {
            let n = next_chunk(&iov, pos, l.transfer_cap(), l.max_iov, l.request_alignment);
            if n == 0 {
                // Segment lengths defeat aligned splitting: bounce the rest.
                let rest = iov.slice(pos, iov.len() - pos);
                return Box::pin(self.read_bounced(offset + pos, rest)).await;
            }
            self.driver().read(offset + pos, iov.slice(pos, n)).await?;
            pos += n;
        }
        Ok(())
    }

    /// The pieces a bounced request of `offset..offset+len` is processed in: at most
    /// [`BOUNCE_CHUNK`] bytes of aligned range each, so that bounce memory does not
    /// follow the request's size (the guest's choice). Yields (offset, length) pairs
    /// relative to the request.
    fn bounce_pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
        let align = self.limits().request_alignment;
        let chunk = align_up(BOUNCE_CHUNK, align).max(u64::from(align));
        let mut pos = 0;
        std::iter::from_fn(move || {
            if pos >= len {
                return None;
            }
            let at = offset + pos;
            let piece_end = (align_down(at, align) + chunk).min(offset + len);
            let piece = (pos, piece_end - at);
            pos += piece.1;
            Some(piece)
        })
    }

    /// Leases and allocates a bounce buffer for the aligned range around
    /// `offset..offset+len` (one piece of [`Node::bounce_pieces`]).
    async fn bounce_for(&self, offset: u64, len: u64) -> Result<(u64, Arc<AlignedBuf>, Lease)> {
        let l = self.limits();
        let start = align_down(offset, l.request_alignment);
        let end = align_up(offset + len, l.request_alignment);
        let size = (end - start) as usize;
        let lease = Budget::current().lease(size).await;
        let buf = lease.alloc(size, l.mem_alignment.max(512)).ok_or_else(|| {
            BlockError::io("bounce", std::io::Error::from_raw_os_error(libc::ENOMEM))
        })?;
        Ok((start, Arc::new(buf), lease))
    }

    async fn read_bounced(&self, offset: u64, iov: IoVec) -> Result<()> {
        for (pos, n) in self.bounce_pieces(offset, iov.len()) {
            self.read_bounced_piece(offset + pos, iov.slice(pos, n))
                .await?;
        }
        Ok(())
    }

    async fn read_bounced_piece(&self, offset: u64, iov: IoVec) -> Result<()> {
        let (start, buf, _lease) = self.bounce_for(offset, iov.len()).await?;
        self.read_split(start, IoVec::from_buf(buf.clone())).await?;
        let skip = (offset - start) as usize;
        iov.copy_from_slice(0, &buf.as_slice()[skip..skip + iov.len() as usize]);
        Ok(())
    }

    /// Writes `iov` at `offset`; with `fua` the data is stable when this returns.
    async fn write_checked(&self, offset: u64, iov: IoVec, fua: bool, grow: bool) -> Result<()> {
        self.check_writable()?;
        if grow {
            if offset.checked_add(iov.len()).is_none() {
                return self.check_range(offset, iov.len());
            }
        } else {
            self.check_range(offset, iov.len())?;
        }
        if iov.is_empty() {
            return Ok(());
        }
        let flags = self.flags();
        if flags.detect_zeroes != DetectZeroes::Off && iov.is_zero() {
            let unmap = flags.detect_zeroes == DetectZeroes::Unmap && flags.discard_unmap;
            return self.zeroes_locked(offset, iov.len(), unmap, fua).await;
        }
        let native_fua = fua && self.driver().supports_fua();
        let r = if self.in_one_piece(offset, &iov) {
            self.driver().write(offset, iov, native_fua).await
        } else if self.is_aligned_for(offset, &iov) {
            self.write_split(offset, iov, native_fua).await
        } else {
            self.write_bounced(offset, iov, native_fua).await
        };
        self.note_write();
        r?;
        if fua && !native_fua {
            self.flush_inner().await?;
        }
        Ok(())
    }

    async fn write_split(&self, offset: u64, iov: IoVec, fua: bool) -> Result<()> {
        let l = self.limits();
        if iov.len() <= l.transfer_cap() && iov.segments().len() <= l.max_iov {
            return self.driver().write(offset, iov, fua).await;
        }
        let mut pos = 0;
        while pos < iov.len() {
            let n = next_chunk(&iov, pos, l.transfer_cap(), l.max_iov, l.request_alignment);
            if n == 0 {
                let rest = iov.slice(pos, iov.len() - pos);
                return Box::pin(self.write_bounced(offset + pos, rest, fua)).await;
            }
            self.driver()
                .write(offset + pos, iov.slice(pos, n), fua)
                .await?;
            pos += n;
        }
        Ok(())
    }

    /// Read-modify-write of the aligned range around an unaligned write, in bounded
    /// pieces.
    async fn write_bounced(&self, offset: u64, iov: IoVec, fua: bool) -> Result<()> {
        for (pos, n) in self.bounce_pieces(offset, iov.len()) {
            self.write_bounced_piece(offset + pos, iov.slice(pos, n), fua)
                .await?;
        }
        Ok(())
    }

    async fn write_bounced_piece(&self, offset: u64, iov: IoVec, fua: bool) -> Result<()> {
        let (start, buf, _lease) = self.bounce_for(offset, iov.len()).await?;
        let end = start + buf.len() as u64;
        let _lock = self.track(start, end, Serial::Rmw).await;
        let align = u64::from(self.limits().request_alignment);
        let bounce = IoVec::from_buf(buf.clone());
        // Read the partial head and tail blocks; the middle is overwritten anyway.
        let data_end = offset + iov.len();
        let (head, tail) = (offset != start, data_end != end);
        let merged = end - start == align;
        let padded = self
            .read_padding(start, end, &bounce, head, tail, merged)
            .await;
        if let Err(e) = padded {
            // QEMU 7.2's bdrv_co_pwritev_part and bdrv_co_do_zero_pwritev drop the
            // error of their padding read and write the block with whatever the
            // read left in the buffer (here: zeroes or part of the old data).
            log::debug!("write at {offset}: padding read failed, written anyway: {e}");
        }
        bounce.copy_from_iov(offset - start, &iov);
        self.write_split(start, bounce, fua).await
    }

    /// The padding reads of [`Node::write_bounced_piece`] (QEMU's
    /// `bdrv_padding_rmw_read`): the partial head and tail blocks of
    /// `start..end`, one read if a single block (`merged`); stops at the first
    /// error. The blkdebug events are QEMU's (on the node that pads): one read of
    /// a single block raises those of the sides it completes.
    async fn read_padding(
        &self,
        start: u64,
        end: u64,
        bounce: &IoVec,
        head: bool,
        tail: bool,
        merged: bool,
    ) -> Result<()> {
        let align = u64::from(self.limits().request_alignment);
        if head {
            self.debug_event("pwritev_rmw_head");
            if merged && tail {
                self.debug_event("pwritev_rmw_tail");
            }
            self.read_split(start, bounce.slice(0, align)).await?;
            self.debug_event("pwritev_rmw_after_head");
            if merged && tail {
                self.debug_event("pwritev_rmw_after_tail");
            }
        }
        if tail && (!merged || !head) {
            self.debug_event("pwritev_rmw_tail");
            self.read_split(end - align, bounce.slice(end - align - start, align))
                .await?;
            self.debug_event("pwritev_rmw_after_tail");
        }
        Ok(())
    }

    /// Flushes written data to stable storage (elided if nothing was written since the
    /// last flush).
    async fn flush_inner(&self) -> Result<()> {
        self.flush_inner_as(true).await
    }

    /// [`Node::flush_inner`]; through [`Driver::flush_unchecked`] unless `checked`.
    async fn flush_inner_as(&self, checked: bool) -> Result<()> {
        let primary = if self.debug_events_below() {
            self.primary_child()
        } else {
            None
        };
        if let Some(p) = &primary {
            p.debug_event("flush_to_os");
        }
        if self.flags().no_flush {
            return Ok(());
        }
        if let Some(p) = &primary {
            p.debug_event("flush_to_disk");
        }
        let gen = self.write_gen.load(Ordering::Acquire);
        if gen == self.flushed_gen.load(Ordering::Acquire) {
            return Ok(());
        }
        if checked {
            self.driver().flush().await?;
        } else {
            self.driver().flush_unchecked().await?;
        }
        self.flushed_gen.fetch_max(gen, Ordering::AcqRel);
        Ok(())
    }

    /// Discards a range if this node has `discard=unmap`; otherwise does nothing.
    async fn discard_checked(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if !self.flags().discard_unmap || len == 0 {
            return Ok(());
        }
        let l = self.limits();
        let cap = if l.max_discard == 0 {
            u64::MAX
        } else {
            l.max_discard
        };
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(cap);
            match self.driver().discard(offset + pos, n).await {
                Ok(()) => {}
                // Discard is advisory: a driver that cannot do it has done nothing wrong.
                Err(e) if e.is_unsupported() => return Ok(()),
                Err(e) => return Err(e),
            }
            pos += n;
        }
        self.note_write();
        Ok(())
    }

    /// Makes `offset..offset+len` read as zeroes; `may_unmap` lets the node deallocate
    /// (only honoured with `discard=unmap`).
    async fn write_zeroes_checked(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let unmap = may_unmap && self.flags().discard_unmap;
        self.zeroes_locked(offset, len, unmap, fua).await
    }

    async fn zeroes_locked(&self, offset: u64, len: u64, unmap: bool, fua: bool) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let l = self.limits();
        let aligned =
            is_aligned(offset, l.request_alignment) && is_aligned(len, l.request_alignment);
        let mut done = false;
        if aligned {
            let cap = if l.max_write_zeroes == 0 {
                u64::MAX
            } else {
                l.max_write_zeroes
            };
            let mut pos = 0;
            let mut unsupported = false;
            while pos < len {
                let n = (len - pos).min(cap);
                match self.driver().write_zeroes(offset + pos, n, unmap).await {
                    Ok(()) => pos += n,
                    Err(e) if e.is_unsupported() && pos == 0 => {
                        unsupported = true;
                        break;
                    }
                    Err(e) => {
                        self.note_write();
                        return Err(e);
                    }
                }
            }
            done = !unsupported;
        }
        if !done {
            self.write_zero_buffers(offset, len).await?;
        }
        self.note_write();
        if fua {
            self.flush_inner().await?;
        }
        Ok(())
    }

    async fn allocate_checked(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let r = match self.driver().allocate(offset, len).await {
            // Zero buffers are data: they take space wherever they land.
            Err(e) if e.is_unsupported() => self.write_zero_buffers(offset, len).await,
            r => r,
        };
        self.note_write();
        r
    }

    /// The write-zeroes fallback: writes a shared zero buffer over the range.
    async fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        let zeroes = IoVec::from_buf(zero_buffer());
        let l = self.limits();
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(ZERO_CHUNK);
            let start = offset + pos;
            let chunk = zeroes.slice(0, n);
            if is_aligned(start, l.request_alignment) && is_aligned(n, l.request_alignment) {
                self.write_split(start, chunk, false).await?;
            } else {
                self.write_bounced(start, chunk, false).await?;
            }
            pos += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_helpers() {
        assert_eq!(align_down(4097, 4096), 4096);
        assert_eq!(align_up(4097, 4096), 8192);
        assert_eq!(align_up(4096, 4096), 4096);
        assert!(is_aligned(8192, 512));
        assert!(!is_aligned(8193, 512));
    }

    #[test]
    fn chunks_respect_segments_and_alignment() {
        let bufs: Vec<_> = (0..4)
            .map(|_| Arc::new(AlignedBuf::zeroed(1536, 512)))
            .collect();
        let mut iov = IoVec::new(None);
        for b in &bufs {
            let v = IoVec::from_buf(b.clone());
            let s = v.segments()[0];
            // SAFETY: the buffers outlive `iov` in this test.
            unsafe { iov.push_raw(s.iov_base.cast(), s.iov_len) };
        }
        // Two segments of 1536 = 3072, rounded down to 1024-byte alignment: 3072.
        assert_eq!(next_chunk(&iov, 0, u64::MAX, 2, 1024), 3072);
        // Byte cap.
        assert_eq!(next_chunk(&iov, 0, 2000, 8, 512), 1536);
        // From the middle of a segment.
        assert_eq!(next_chunk(&iov, 512, u64::MAX, 1, 512), 1024);
        // Alignment larger than what fits: no chunk.
        assert_eq!(next_chunk(&iov, 0, u64::MAX, 1, 4096), 0);
    }

    #[test]
    fn large_unaligned_requests_bounce_in_bounded_pieces() {
        use crate::graph::Graph;
        use crate::options::BlockdevOptions;
        use serde_json::json;
        let path = std::env::temp_dir().join(format!("vubd-io-bounce-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(32 << 20).unwrap();
        drop(file);
        let mut g = Graph::new();
        let node = g
            .add(
                &BlockdevOptions::from_json(&json!({
                    "driver": "blkdebug", "node-name": "dbg", "align": 4096,
                    "image": {"driver": "file", "node-name": "f",
                              "filename": path.to_str().unwrap()}
                }))
                .unwrap(),
            )
            .unwrap();
        // 12 MiB at a 512-byte offset: every piece is read-modify-written.
        let len = 12usize << 20;
        let data: Vec<u8> = (0..len).map(|i| (i / 512 % 251) as u8).collect();
        let src = Arc::new(AlignedBuf::zeroed(len, 4096));
        IoVec::from_buf(src.clone()).copy_from_slice(0, &data);
        let dst = Arc::new(AlignedBuf::zeroed(len, 4096));
        let (n, d) = (node.clone(), dst.clone());
        let peak = crate::aio::uring::block_on(async move {
            n.write(512, IoVec::from_buf(src), false).await.unwrap();
            n.read(512, IoVec::from_buf(d)).await.unwrap();
            Budget::current().peak()
        });
        assert!(dst.as_slice() == &data[..], "data read back differs");
        assert!(
            peak <= BOUNCE_CHUNK as usize + 8192,
            "bounce memory peaked at {peak} bytes for one request"
        );
        assert_eq!(Budget::current().in_use(), 0);
        drop(g);
        let _ = std::fs::remove_file(path);
    }
}

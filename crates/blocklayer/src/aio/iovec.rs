//! I/O vectors: lists of memory segments (guest memory or bounce buffers) that a request
//! reads into or writes from, with a keepalive that holds the memory mapped until the
//! last operation using the segments has completed.

use std::alloc::{self, Layout};
use std::any::Any;
use std::sync::Arc;

/// Something that keeps the memory behind an [`IoVec`] valid (a guest memory mapping,
/// a bounce buffer). The io_uring engine holds a clone until the kernel is done.
pub type Keepalive = Arc<dyn Any + Send + Sync>;

/// One segment: a host pointer and a length (the same layout as `struct iovec`).
pub type Segment = libc::iovec;

/// The segments of one vector. Most requests have one (a 4 KiB read into one guest
/// buffer): it is kept inline, so that building, cloning and dropping such a vector
/// allocates nothing.
enum Segments {
    One(Segment),
    Many(Vec<Segment>),
}

impl Segments {
    /// No segments, with room for `n` (allocated only beyond one).
    #[inline]
    fn with_capacity(n: usize) -> Self {
        Segments::Many(if n > 1 {
            Vec::with_capacity(n)
        } else {
            Vec::new()
        })
    }

    #[inline]
    fn push(&mut self, s: Segment) {
        match self {
            Segments::Many(v) if v.is_empty() && v.capacity() == 0 => *self = Segments::One(s),
            Segments::Many(v) => v.push(s),
            Segments::One(first) => *self = Segments::Many(vec![*first, s]),
        }
    }

    #[inline]
    fn as_slice(&self) -> &[Segment] {
        match self {
            Segments::One(s) => std::slice::from_ref(s),
            Segments::Many(v) => v,
        }
    }
}

impl Clone for Segments {
    #[inline]
    fn clone(&self) -> Self {
        match self {
            Segments::One(s) => Segments::One(*s),
            Segments::Many(v) => Segments::Many(v.clone()),
        }
    }
}

impl std::ops::Deref for Segments {
    type Target = [Segment];
    #[inline]
    fn deref(&self) -> &[Segment] {
        self.as_slice()
    }
}

impl<'a> IntoIterator for &'a Segments {
    type Item = &'a Segment;
    type IntoIter = std::slice::Iter<'a, Segment>;
    #[inline]
    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

/// A list of segments plus the keepalive of their memory.
#[derive(Clone)]
pub struct IoVec {
    segs: Segments,
    len: u64,
    keep: Option<Keepalive>,
}

impl std::fmt::Debug for IoVec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoVec")
            .field("segments", &self.segs.len())
            .field("len", &self.len)
            .finish()
    }
}

impl IoVec {
    /// An empty vector whose memory is kept alive by `keep`.
    pub fn new(keep: Option<Keepalive>) -> Self {
        IoVec {
            segs: Segments::with_capacity(0),
            len: 0,
            keep,
        }
    }

    /// An empty vector with room for `n` segments, whose memory is kept alive by
    /// `keep`.
    pub fn with_capacity(keep: Option<Keepalive>, n: usize) -> Self {
        IoVec {
            segs: Segments::with_capacity(n),
            len: 0,
            keep,
        }
    }

    /// Appends a segment.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid for reads and writes for as long as this vector's
    /// keepalive (or, without one, the vector itself) lives.
    pub unsafe fn push_raw(&mut self, ptr: *mut u8, len: usize) {
        if len == 0 {
            return;
        }
        self.segs.push(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        });
        self.len += len as u64;
    }

    /// A vector covering a whole bounce buffer.
    pub fn from_buf(buf: Arc<AlignedBuf>) -> Self {
        let (ptr, len) = (buf.ptr, buf.len);
        let mut v = IoVec::new(Some(buf));
        // SAFETY: the buffer is `len` bytes long and the Arc stored as keepalive keeps
        // it allocated for as long as the vector or any op holding its keepalive lives.
        unsafe { v.push_raw(ptr, len) };
        v
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segments. The slice lies in the vector while it has one segment (kept
    /// inline): an iovec array handed to the kernel or a library must be taken from
    /// where the vector stays until the operation completes.
    pub fn segments(&self) -> &[Segment] {
        &self.segs
    }

    pub fn keepalive(&self) -> Option<&Keepalive> {
        self.keep.as_ref()
    }

    /// The sub-range `offset..offset+len` as a new vector sharing the keepalive.
    pub fn slice(&self, offset: u64, len: u64) -> IoVec {
        assert!(offset + len <= self.len, "IoVec::slice out of range");
        let mut out = IoVec::new(self.keep.clone());
        let (mut skip, mut want) = (offset, len);
        for s in &self.segs {
            if want == 0 {
                break;
            }
            let slen = s.iov_len as u64;
            if skip >= slen {
                skip -= slen;
                continue;
            }
            let take = (slen - skip).min(want);
            // SAFETY: the new segment lies inside an existing one, valid under the
            // same keepalive, which `out` shares.
            unsafe { out.push_raw((s.iov_base as *mut u8).add(skip as usize), take as usize) };
            skip = 0;
            want -= take;
        }
        out
    }

    /// Whether every segment's address and length is a multiple of `align`.
    #[inline]
    pub fn is_aligned(&self, align: usize) -> bool {
        align <= 1
            || self.segs.iter().all(|s| {
                (s.iov_base as usize).is_multiple_of(align) && s.iov_len.is_multiple_of(align)
            })
    }

    /// Copies `dst.len()` bytes starting at `offset` of this vector into `dst`.
    pub fn copy_to_slice(&self, offset: u64, dst: &mut [u8]) {
        let part = self.slice(offset, dst.len() as u64);
        let mut pos = 0;
        for s in &part.segs {
            // SAFETY: the segment is valid for reads (keepalive held by `part`); `dst`
            // is a distinct Rust slice with room for the copy. Guest memory may change
            // concurrently; like any DMA device we copy whatever bytes are there.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    s.iov_base as *const u8,
                    dst.as_mut_ptr().add(pos),
                    s.iov_len,
                )
            };
            pos += s.iov_len;
        }
    }

    /// Copies `src` into this vector starting at `offset`.
    pub fn copy_from_slice(&self, offset: u64, src: &[u8]) {
        let part = self.slice(offset, src.len() as u64);
        let mut pos = 0;
        for s in &part.segs {
            // SAFETY: the segment is valid for writes (keepalive held by `part`) and
            // does not overlap `src`, a Rust slice in daemon memory.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.as_ptr().add(pos),
                    s.iov_base as *mut u8,
                    s.iov_len,
                )
            };
            pos += s.iov_len;
        }
    }

    /// Copies all of `src` into this vector starting at `offset` (segment by segment,
    /// without an intermediate buffer). The two must not overlap.
    pub fn copy_from_iov(&self, offset: u64, src: &IoVec) {
        let mut pos = offset;
        for s in &src.segs {
            // SAFETY: the segment is valid for reads of `iov_len` bytes while `src`
            // (and its keepalive) lives, which outlasts this call; the caller
            // guarantees it does not overlap the destination.
            let bytes = unsafe { std::slice::from_raw_parts(s.iov_base as *const u8, s.iov_len) };
            self.copy_from_slice(pos, bytes);
            pos += s.iov_len as u64;
        }
    }

    /// Fills the whole vector with zeroes.
    pub fn fill_zero(&self) {
        for s in &self.segs {
            // SAFETY: each segment is valid for writes of `iov_len` bytes.
            unsafe { std::ptr::write_bytes(s.iov_base as *mut u8, 0, s.iov_len) };
        }
    }

    /// Whether every byte is zero (for `detect-zeroes`).
    pub fn is_zero(&self) -> bool {
        self.segs.iter().all(|s| {
            // SAFETY: each segment is valid for reads of `iov_len` bytes for the
            // lifetime of `self`; the slice does not outlive this closure.
            let bytes = unsafe { std::slice::from_raw_parts(s.iov_base as *const u8, s.iov_len) };
            bytes.iter().all(|b| *b == 0)
        })
    }
}

/// Buffers from this size up are mapped directly (and unmapped when dropped). The C
/// allocator would keep freed ones (glibc raises its mmap threshold to the largest
/// chunk freed), so memory a burst of large bounced requests took would stay with
/// the process.
const MMAP_FROM: usize = 128 << 10;
const PAGE: usize = 4096;

/// A heap buffer with a chosen alignment (for O_DIRECT bounce buffers).
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    layout: Layout,
    /// Mapped with mmap (else from the global allocator with `layout`).
    mapped: bool,
}

// SAFETY: the buffer is plain heap memory owned by this value; access goes through
// `&mut self`/IoVec pointers whose users synchronise by the request lifecycle.
unsafe impl Send for AlignedBuf {}
// SAFETY: see above; shared references only hand out raw pointers.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes aligned to `align` (a power of two).
    /// For sizes the daemon chooses; sizes a guest influences go through
    /// [`AlignedBuf::try_zeroed`].
    pub fn zeroed(len: usize, align: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), align.max(1))
            .expect("bounce buffer layout (power-of-two alignment)");
        AlignedBuf::try_zeroed(len, align).unwrap_or_else(|| alloc::handle_alloc_error(layout))
    }

    /// A zero-filled buffer of `len` bytes aligned to `align`, or `None` if the
    /// allocator cannot provide it (or the size and alignment make no layout).
    pub fn try_zeroed(len: usize, align: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), align.max(1)).ok()?;
        if len >= MMAP_FROM && layout.align() <= PAGE {
            // SAFETY: a new private anonymous mapping (zero-filled by the kernel); no
            // existing memory is affected; the result is checked.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            return (p != libc::MAP_FAILED).then_some(AlignedBuf {
                ptr: p.cast(),
                len,
                layout,
                mapped: true,
            });
        }
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(AlignedBuf {
            ptr,
            len,
            layout,
            mapped: false,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes, initialised (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: the mapping made in `try_zeroed`, of `len` bytes, unmapped once;
            // no reference into it outlives the buffer.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        } else {
            // SAFETY: ptr was allocated with this layout and is freed once.
            unsafe { alloc::dealloc(self.ptr, self.layout) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three_segments() -> (Vec<Arc<AlignedBuf>>, IoVec) {
        let bufs: Vec<_> = (0..3).map(|_| Arc::new(AlignedBuf::zeroed(8, 8))).collect();
        let mut v = IoVec::new(None);
        for b in &bufs {
            // SAFETY: the buffers outlive `v` in these tests.
            unsafe { v.push_raw(b.ptr, b.len) };
        }
        (bufs, v)
    }

    #[test]
    fn slice_spans_segments() {
        let (_bufs, v) = three_segments();
        assert_eq!(v.len(), 24);
        let s = v.slice(6, 12);
        assert_eq!(s.len(), 12);
        let lens: Vec<usize> = s.segments().iter().map(|s| s.iov_len).collect();
        assert_eq!(lens, vec![2, 8, 2]);
    }

    #[test]
    fn copy_round_trip() {
        let (_bufs, v) = three_segments();
        let src: Vec<u8> = (0..20).collect();
        v.copy_from_slice(3, &src);
        let mut dst = vec![0u8; 20];
        v.copy_to_slice(3, &mut dst);
        assert_eq!(src, dst);
        assert!(!v.is_zero());
        v.fill_zero();
        assert!(v.is_zero());
    }

    #[test]
    fn alignment_check() {
        let (_bufs, v) = three_segments();
        assert!(v.is_aligned(8));
        assert!(!v.slice(1, 8).is_aligned(8));
    }
}

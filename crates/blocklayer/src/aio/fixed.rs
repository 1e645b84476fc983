//! Memory registered with an iothread's io_uring as fixed buffers (guest memory, when
//! an export asks for it).
//!
//! A read or write with `O_DIRECT` makes the kernel pin the pages of its buffers for
//! every request and release them at completion (`get_user_pages` and friends): on a
//! block device that is a quarter to a third of an iothread's time at 256 KiB
//! (docs/performance.md). Memory registered once with `IORING_REGISTER_BUFFERS2` is
//! pinned once: `READ_FIXED`/`WRITE_FIXED` (and, from Linux 6.15, their vectored forms)
//! take their pages from the registration.
//!
//! The price, and why it is opt-in: registering pins (and so allocates) every page of
//! the range at once, and the pin holds the page that was there at registration. A
//! frontend that later gives pages back to the host (a balloon, virtio-mem, punching
//! holes in its memory file) and faults in new ones at the same addresses would see
//! I/O land in the old pages. So only memory whose owner does none of that may be
//! registered.
//!
//! The table is thread-local, like the ring. Each [`Table`] entry covers at most
//! [`MAX_BUFFER`] bytes (the kernel's limit per buffer) and holds a keepalive of the
//! mapping (the newest memory table that registered it): while it is registered its
//! addresses cannot be mapped to anything else, so an address found in the table means
//! the registered pages. One exception, the frontend's own doing: when it truncates
//! its memory file under the daemon, the SIGBUS guard maps a zero page over the
//! faulting page of the daemon's mapping while the registration keeps the old one;
//! that frontend's I/O then reads and writes pages it gave up. Entries are shared by
//! every holder of the same range on the thread (several rings of one export) and
//! unregistered when the last [`Pinned`] handle goes.
//!
//! Pinning takes time in proportion to the memory (about 50 ms for 512 MiB here), and
//! a ring's registration holds the ring's lock meanwhile, so an iothread that pinned a
//! guest's memory itself would stop serving its other exports for as long. [`Staged`]
//! pins on any thread, in a ring of its own; the iothread then takes the buffers into
//! its table with `IORING_REGISTER_CLONE_BUFFERS` ([`Table::adopt`]; where
//! [`can_clone`] finds the kernel does that right), which shares the pinned pages
//! instead of pinning them again.

use super::iovec::{Keepalive, Segment};
use io_uring::{opcode, IoUring, Probe};
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

/// Slots of the sparse buffer table of each ring that registers anything.
pub const TABLE_SLOTS: u32 = 1024;

/// The kernel's largest fixed buffer (`SZ_1G`); longer ranges take several slots.
pub const MAX_BUFFER: usize = 1 << 30;

/// Bytes registered by all threads of the process (a range registered on two threads
/// counts twice), against [`pin_limit`].
static PINNED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Why memory could not be registered.
#[derive(Debug)]
pub enum FixedError {
    /// The range would take the process over [`pin_limit`].
    OverLimit { len: u64, pinned: u64, limit: u64 },
    /// The range overlaps a registered one of other bounds.
    Overlap,
    /// Every slot of this thread's table is taken.
    TableFull,
    /// The kernel refused (an old kernel, `RLIMIT_MEMLOCK`, memory it cannot pin).
    Kernel(io::Error),
    /// A staging was given up before it came to the range.
    Cancelled,
    /// No such range in the staging, or it was taken already.
    NotStaged,
}

impl fmt::Display for FixedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FixedError::OverLimit { len, pinned, limit } => write!(
                f,
                "registering {} MiB would pin more than the process may ({} MiB pinned, \
                 limit {} MiB: half of the host's or the cgroup's memory, or \
                 RLIMIT_MEMLOCK without CAP_IPC_LOCK)",
                len >> 20,
                pinned >> 20,
                limit >> 20
            ),
            FixedError::Overlap => write!(f, "the range overlaps a registered one"),
            FixedError::TableFull => {
                write!(
                    f,
                    "all {TABLE_SLOTS} fixed-buffer slots of the ring are taken"
                )
            }
            FixedError::Kernel(e) => write!(f, "io_uring refused the buffers: {e}"),
            FixedError::Cancelled => write!(f, "given up"),
            FixedError::NotStaged => write!(f, "not in the staging, or taken already"),
        }
    }
}

impl std::error::Error for FixedError {}

impl FixedError {
    /// Whether the same range may well be accepted a little later: the process's limit
    /// (other registrations go), or the kernel's count of pinned pages, which lags
    /// behind ours (a closed ring's buffers are let go on a kernel work queue, a
    /// cleared slot's pages when the I/O using them completes) and is shared by every
    /// process of the user.
    pub fn is_transient(&self) -> bool {
        match self {
            FixedError::OverLimit { .. } => true,
            FixedError::Kernel(e) => {
                matches!(e.raw_os_error(), Some(libc::ENOMEM) | Some(libc::EAGAIN))
            }
            _ => false,
        }
    }
}

/// How many buffers (table slots) a range of `len` bytes takes.
pub fn buffers_for(len: usize) -> usize {
    len.div_ceil(MAX_BUFFER)
}

/// How much memory the process may register: half of the host's memory and half of
/// its cgroup's `memory.max` (registering allocates the pages, charged to the daemon),
/// and no more than `RLIMIT_MEMLOCK` unless it has `CAP_IPC_LOCK` (the kernel would pin
/// the pages before it refused).
pub fn pin_limit() -> u64 {
    static LIMIT: OnceLock<u64> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let mut limit = mem_total().unwrap_or(0) / 2;
        if let Some(max) = cgroup_memory_max() {
            limit = limit.min(max / 2);
        }
        if !has_cap_ipc_lock() {
            limit = limit.min(memlock_limit());
        }
        limit
    })
}

fn mem_total() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = s.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    kib.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

/// The `memory.max` of the process's cgroup (v2), if it has one.
fn cgroup_memory_max() -> Option<u64> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    let max = std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.max", path.trim())).ok()?;
    max.trim().parse().ok()
}

fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

fn memlock_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limits into the local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return 0;
    }
    if r.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        r.rlim_cur
    }
}

struct Entry {
    start: usize,
    end: usize,
    slot: u16,
    refs: u32,
    keep: Keepalive,
}

/// This thread's registered ranges.
#[derive(Default)]
pub struct Table {
    /// Sorted by `start`, not overlapping.
    entries: Vec<Entry>,
    free: Vec<u16>,
    /// The sparse table is registered with the ring.
    ready: bool,
    /// The kernel has READV_FIXED and WRITEV_FIXED.
    vectored: bool,
    /// Operations that used a fixed buffer.
    pub ops: u64,
    /// Bytes registered now.
    pub bytes: u64,
}

impl Table {
    /// Whether nothing is registered (the common case: one comparison per operation).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn entry_of(&self, addr: usize) -> Option<&Entry> {
        let i = self.entries.partition_point(|e| e.start <= addr);
        let e = self.entries.get(i.checked_sub(1)?)?;
        (addr < e.end).then_some(e)
    }

    /// The slot whose buffer holds `addr..addr+len`, if any.
    #[inline]
    pub fn find(&mut self, addr: usize, len: usize) -> Option<u16> {
        if self.entries.is_empty() {
            return None;
        }
        let e = self.entry_of(addr)?;
        let end = addr.checked_add(len)?;
        let slot = (end <= e.end).then_some(e.slot)?;
        self.ops += 1;
        Some(slot)
    }

    /// The one slot whose buffer holds every segment, if the kernel can take a vector
    /// of them.
    #[inline]
    pub fn find_all(&mut self, segs: &[Segment]) -> Option<u16> {
        if self.entries.is_empty() || !self.vectored {
            return None;
        }
        let first = segs.first()?;
        let e = self.entry_of(first.iov_base as usize)?;
        let (lo, hi, slot) = (e.start, e.end, e.slot);
        let inside = |s: &Segment| {
            let a = s.iov_base as usize;
            a >= lo && a.checked_add(s.iov_len).is_some_and(|end| end <= hi)
        };
        if !segs.iter().all(inside) {
            return None;
        }
        self.ops += 1;
        Some(slot)
    }

    /// Registers `ptr..ptr+len` (in slots of at most [`MAX_BUFFER`]), or takes another
    /// reference to it if it is registered already; `keep` keeps it mapped.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be mapped, readable and writable, for as long as `keep`
    /// lives.
    pub unsafe fn pin(
        &mut self,
        ring: &IoUring,
        ptr: *mut u8,
        len: usize,
        keep: &Keepalive,
    ) -> Result<Pinned, FixedError> {
        let chunks = chunks_of(ptr, len);
        // Ranges registered already (the same mapping, through another ring of the
        // same memory) only gain a reference.
        if let Some(p) = self.share(&chunks, keep) {
            return Ok(p);
        }
        if self.overlaps(&chunks) {
            return Err(FixedError::Overlap);
        }
        let total = len as u64;
        reserve(total)?;
        // SAFETY: forwarded from the caller.
        let r = unsafe { self.register_chunks(ring, &chunks, keep) };
        if r.is_err() {
            PINNED_BYTES.fetch_sub(total, Ordering::Relaxed);
        }
        r
    }

    /// # Safety
    /// As [`Table::pin`].
    unsafe fn register_chunks(
        &mut self,
        ring: &IoUring,
        chunks: &[(usize, usize)],
        keep: &Keepalive,
    ) -> Result<Pinned, FixedError> {
        self.ensure_ready(ring)?;
        if self.free.len() < chunks.len() {
            return Err(FixedError::TableFull);
        }
        let mut done: Vec<(usize, u16)> = Vec::with_capacity(chunks.len());
        for &(a, n) in chunks {
            let slot = self.free.pop().expect("free slots counted above");
            let iov = libc::iovec {
                iov_base: a as *mut libc::c_void,
                iov_len: n,
            };
            // SAFETY: the caller guarantees the range stays mapped while `keep`
            // lives; the entry below holds `keep` until the slot is cleared again.
            let r = unsafe {
                ring.submitter()
                    .register_buffers_update(u32::from(slot), &[iov], None)
            };
            if let Err(e) = r {
                self.free.push(slot);
                for (_, s) in done {
                    clear_slot(ring, s);
                    self.free.push(s);
                }
                return Err(FixedError::Kernel(e));
            }
            done.push((a, slot));
        }
        for (&(a, n), &(_, slot)) in chunks.iter().zip(&done) {
            self.insert(a, n, slot, keep);
        }
        Ok(Pinned {
            starts: chunks.iter().map(|c| c.0).collect(),
            _thread: std::marker::PhantomData,
        })
    }

    /// Slots not taken: buffers this table can still register or adopt.
    pub fn free_slots(&self) -> usize {
        if self.ready {
            self.free.len()
        } else {
            TABLE_SLOTS as usize
        }
    }

    /// The sparse table registered with `ring`, on first use.
    fn ensure_ready(&mut self, ring: &IoUring) -> Result<(), FixedError> {
        if self.ready {
            return Ok(());
        }
        ring.submitter()
            .register_buffers_sparse(TABLE_SLOTS)
            .map_err(FixedError::Kernel)?;
        self.free = (0..TABLE_SLOTS as u16).rev().collect();
        let mut probe = Probe::new();
        self.vectored = ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::ReadvFixed::CODE)
            && probe.is_supported(opcode::WritevFixed::CODE);
        self.ready = true;
        Ok(())
    }

    /// Another reference to `ptr..ptr+len` if it is registered already, as [`Table::pin`]
    /// would give, but never registering anything (no time spent pinning).
    ///
    /// # Safety
    /// As [`Table::pin`]: `keep` becomes what keeps the range mapped.
    pub unsafe fn share_range(
        &mut self,
        ptr: *mut u8,
        len: usize,
        keep: &Keepalive,
    ) -> Option<Pinned> {
        self.share(&chunks_of(ptr, len), keep)
    }

    /// Another reference to each of `chunks`, if every one is registered already
    /// (kept from now on by `keep`, the newest table: an older one may hold regions
    /// the frontend has removed since).
    fn share(&mut self, chunks: &[(usize, usize)], keep: &Keepalive) -> Option<Pinned> {
        let known = chunks
            .iter()
            .all(|&(a, n)| self.entries.iter().any(|e| e.start == a && e.end == a + n));
        if !known {
            return None;
        }
        for &(a, _) in chunks {
            if let Some(e) = self.entries.iter_mut().find(|e| e.start == a) {
                e.refs += 1;
                e.keep = keep.clone();
            }
        }
        Some(Pinned {
            starts: chunks.iter().map(|c| c.0).collect(),
            _thread: std::marker::PhantomData,
        })
    }

    fn overlaps(&self, chunks: &[(usize, usize)]) -> bool {
        chunks
            .iter()
            .any(|&(a, n)| self.entries.iter().any(|e| a < e.end && e.start < a + n))
    }

    fn insert(&mut self, start: usize, len: usize, slot: u16, keep: &Keepalive) {
        let i = self.entries.partition_point(|e| e.start < start);
        self.entries.insert(
            i,
            Entry {
                start,
                end: start + len,
                slot,
                refs: 1,
                keep: keep.clone(),
            },
        );
        self.bytes += len as u64;
    }

    /// Takes range `i` of `staged` (pinned on another thread) into this thread's
    /// table, kept mapped by `keep` (the staging's own keepalive, or a newer table that
    /// holds the same mapping: while the staging holds its mapping, no other can be at
    /// its addresses), without pinning its pages again; or another reference to it, if
    /// the range is registered already. The buffers are cloned into free slots
    /// (`IORING_REGISTER_CLONE_BUFFERS`); call only where [`can_clone`] says the kernel
    /// does that right.
    ///
    /// # Safety
    /// `keep` must keep the range mapped, as for [`Table::pin`].
    pub unsafe fn adopt(
        &mut self,
        ring: &IoUring,
        staged: &mut Staged,
        i: usize,
        keep: &Keepalive,
    ) -> Result<Pinned, FixedError> {
        let Some(r) = staged.ranges.get_mut(i).filter(|r| !r.taken) else {
            return Err(FixedError::NotStaged);
        };
        r.taken = true;
        if let Some(e) = r.error.take() {
            return Err(e);
        }
        if let Some(p) = self.share(&r.chunks, keep) {
            return Ok(p);
        }
        if self.overlaps(&r.chunks) {
            return Err(FixedError::Overlap);
        }
        self.ensure_ready(ring)?;
        if self.free.len() < r.chunks.len() {
            return Err(FixedError::TableFull);
        }
        let mut done: Vec<u16> = Vec::with_capacity(r.chunks.len());
        for j in 0..r.chunks.len() {
            let slot = self.free.pop().expect("free slots counted above");
            if let Err(e) = clone_buffer(ring, &staged.ring, r.first + j as u32, u32::from(slot)) {
                self.free.push(slot);
                for s in done {
                    clear_slot(ring, s);
                    self.free.push(s);
                }
                return Err(FixedError::Kernel(e));
            }
            done.push(slot);
        }
        for (&(a, n), &slot) in r.chunks.iter().zip(&done) {
            self.insert(a, n, slot, keep);
        }
        // The table accounts for the bytes from now on.
        r.counted = 0;
        Ok(Pinned {
            starts: r.chunks.iter().map(|c| c.0).collect(),
            _thread: std::marker::PhantomData,
        })
    }

    /// Drops one reference to each range of `pinned`; the last one clears the slot.
    pub fn unpin(&mut self, ring: &IoUring, pinned: &mut Pinned) {
        // Operations still queued look their buffer up when the kernel takes them:
        // hand them over before a slot they use goes.
        if let Err(e) = ring.submit() {
            log::error!("io_uring: cannot submit before clearing fixed buffers: {e}");
        }
        for a in pinned.starts.drain(..) {
            let Some(i) = self.entries.iter().position(|e| e.start == a) else {
                continue;
            };
            let e = &mut self.entries[i];
            e.refs -= 1;
            if e.refs > 0 {
                continue;
            }
            let e = self.entries.remove(i);
            // Operations in flight keep the buffer's pages until they complete (the
            // kernel holds a reference of its own); new ones no longer find it.
            clear_slot(ring, e.slot);
            self.free.push(e.slot);
            let n = (e.end - e.start) as u64;
            self.bytes -= n;
            PINNED_BYTES.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        // The ring closes with the engine, and the kernel lets go of every buffer.
        PINNED_BYTES.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Counts `len` more bytes pinned by the process, if that stays within [`pin_limit`].
fn reserve(len: u64) -> Result<(), FixedError> {
    let limit = pin_limit();
    // Added only if it fits: a reservation that is refused never shows in the count
    // (another thread reserving meanwhile is not refused for it).
    PINNED_BYTES
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |pinned| {
            pinned.checked_add(len).filter(|&total| total <= limit)
        })
        .map(|_| ())
        .map_err(|pinned| FixedError::OverLimit { len, pinned, limit })
}

/// `ptr..ptr+len` in buffers of at most [`MAX_BUFFER`] bytes.
fn chunks_of(ptr: *mut u8, len: usize) -> Vec<(usize, usize)> {
    let start = ptr as usize;
    let end = start.saturating_add(len);
    (start..end)
        .step_by(MAX_BUFFER)
        .map(|at| (at, (end - at).min(MAX_BUFFER)))
        .collect()
}

/// Ranges pinned by a ring of their own, on whatever thread made it, for an iothread
/// to take into its table with [`Table::adopt`]. Dropped, its ring closes and the pages
/// of what no table took are let go.
pub struct Staged {
    ring: IoUring,
    ranges: Vec<StagedRange>,
    /// Keeps the ranges mapped while their pages are pinned.
    _keep: Keepalive,
}

struct StagedRange {
    start: usize,
    len: usize,
    /// Slot of the range's first buffer in the staging's ring; the others follow.
    first: u32,
    /// The range in buffers of at most [`MAX_BUFFER`].
    chunks: Vec<(usize, usize)>,
    /// Bytes it holds in the process's count (0 once a table took them over, or if it
    /// failed).
    counted: u64,
    /// Why it could not be pinned.
    error: Option<FixedError>,
    /// [`Table::adopt`] was called for it (it is not adopted twice).
    taken: bool,
}

impl Staged {
    /// Pins `ranges` (start, length) in one new ring; the time it takes is spent here,
    /// on the calling thread. Each range is pinned within the process's [`pin_limit`],
    /// or fails alone. `cancel` has a flag per range: once a range's flag is set, what
    /// is not pinned of it yet is given up (checked before each buffer); a range
    /// without a flag is never given up.
    ///
    /// # Safety
    /// Each range must be mapped, readable and writable, for as long as `keep` lives.
    pub unsafe fn new(
        ranges: &[(usize, usize)],
        keep: Keepalive,
        cancel: &[AtomicBool],
    ) -> io::Result<Staged> {
        let mut first = 0u32;
        let ranges: Vec<StagedRange> = ranges
            .iter()
            .map(|&(start, len)| {
                let chunks = chunks_of(start as *mut u8, len);
                let r = StagedRange {
                    start,
                    len,
                    first,
                    counted: 0,
                    error: None,
                    taken: false,
                    chunks,
                };
                first += r.chunks.len() as u32;
                r
            })
            .collect();
        let ring = IoUring::new(1)?;
        if first > 0 {
            ring.submitter().register_buffers_sparse(first)?;
        }
        let mut staged = Staged {
            ring,
            ranges,
            _keep: keep,
        };
        for (i, r) in staged.ranges.iter_mut().enumerate() {
            let cancelled = || cancel.get(i).is_some_and(|c| c.load(Ordering::Relaxed));
            if cancelled() {
                r.error = Some(FixedError::Cancelled);
                continue;
            }
            let total = r.len as u64;
            if let Err(e) = reserve(total) {
                r.error = Some(e);
                continue;
            }
            // One buffer per call: a call of several reports success once the first
            // is registered, whatever became of the others.
            let mut failed = None;
            for (j, &(a, n)) in r.chunks.iter().enumerate() {
                if cancelled() {
                    failed = Some((j, FixedError::Cancelled));
                    break;
                }
                let iov = libc::iovec {
                    iov_base: a as *mut libc::c_void,
                    iov_len: n,
                };
                // SAFETY: the caller guarantees the range stays mapped while `keep`
                // lives, which the staging holds as long as its ring (and a table that
                // adopts the buffer holds a keepalive of the mapping in its entry).
                let res = unsafe {
                    staged.ring.submitter().register_buffers_update(
                        r.first + j as u32,
                        &[iov],
                        None,
                    )
                };
                if let Err(e) = res {
                    failed = Some((j, FixedError::Kernel(e)));
                    break;
                }
            }
            match failed {
                None => r.counted = total,
                Some((j, e)) => {
                    for k in 0..j {
                        clear_slot(&staged.ring, (r.first + k as u32) as u16);
                    }
                    PINNED_BYTES.fetch_sub(total, Ordering::Relaxed);
                    r.error = Some(e);
                }
            }
        }
        Ok(staged)
    }

    /// The ranges, in the order given, with whether each was pinned.
    pub fn ranges(&self) -> Vec<((usize, usize), bool)> {
        self.ranges
            .iter()
            .map(|r| ((r.start, r.len), r.error.is_none()))
            .collect()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let counted: u64 = self.ranges.iter().map(|r| r.counted).sum();
        PINNED_BYTES.fetch_sub(counted, Ordering::Relaxed);
    }
}

/// Whether this kernel clones buffers between rings at an offset, and right: before
/// Linux 6.13 it cannot (EINVAL), and until a fix of late 2025 ("io_uring/rsrc: fix lost
/// entries after cloned range", in 6.18.3 and the stable kernels) a clone into a slot
/// dropped the occupied slots above it. Found out once per process on two scratch
/// rings: a buffer in slot 1, another cloned into slot 0, then a read into each.
pub fn can_clone() -> bool {
    static CAN: OnceLock<bool> = OnceLock::new();
    *CAN.get_or_init(|| match probe_clone() {
        Ok(()) => true,
        Err(e) => {
            log::info!(
                "io_uring cannot clone registered buffers here ({e}): guest memory is \
                 pinned on the iothreads themselves"
            );
            false
        }
    })
}

fn probe_clone() -> io::Result<()> {
    const PAGE: usize = 4096;
    struct Map(*mut libc::c_void);
    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: unmaps the two pages mapped below, which nothing uses any more
            // (the rings that registered them are dropped first).
            unsafe { libc::munmap(self.0, 2 * PAGE) };
        }
    }
    // SAFETY: a new private anonymous mapping of two pages.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            2 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let map = Map(p);
    let page = |i: usize| (map.0 as usize + i * PAGE) as *mut u8;
    // SAFETY: both pages are mapped read-write.
    unsafe { std::ptr::write_bytes(page(0), 0xAA, 2 * PAGE) };
    let iov = |i: usize| libc::iovec {
        iov_base: page(i).cast(),
        iov_len: PAGE,
    };
    let dst = IoUring::new(2)?;
    dst.submitter().register_buffers_sparse(2)?;
    // SAFETY: the pages stay mapped until `map` drops, after both rings.
    unsafe {
        dst.submitter()
            .register_buffers_update(1, &[iov(1)], None)?
    };
    {
        let src = IoUring::new(1)?;
        // SAFETY: as above.
        unsafe { src.submitter().register_buffers(&[iov(0)])? };
        clone_buffer(&dst, &src, 0, 0)?;
    }
    let zero = std::fs::File::open("/dev/zero")?;
    let mut dst = dst;
    for slot in 0..2u16 {
        let sqe = opcode::ReadFixed::new(
            io_uring::types::Fd(zero.as_raw_fd()),
            page(usize::from(slot)),
            PAGE as u32,
            slot,
        )
        .build();
        // SAFETY: the buffer is registered and mapped; the read completes before
        // `submit_and_wait` returns (its result is awaited below).
        unsafe {
            dst.submission()
                .push(&sqe)
                .map_err(|_| io::Error::other("submission queue full"))?
        };
        loop {
            match dst.submit_and_wait(1) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => {
                    r?;
                    break;
                }
            }
        }
        let res = dst
            .completion()
            .next()
            .map(|c| c.result())
            .ok_or_else(|| io::Error::other("no completion"))?;
        if res != PAGE as i32 {
            return Err(io::Error::other(format!(
                "a read into fixed buffer {slot} after a clone gave {res}: the kernel \
                 lost it (fixed in Linux 6.18.3)"
            )));
        }
    }
    // SAFETY: both pages are mapped, and the reads are done.
    let all = unsafe { std::slice::from_raw_parts(page(0), 2 * PAGE) };
    if all.iter().any(|&b| b != 0) {
        return Err(io::Error::other("cloned buffers read the wrong memory"));
    }
    drop(dst);
    drop(map);
    Ok(())
}

/// `IORING_REGISTER_CLONE_BUFFERS` (not in the io-uring crate): buffer `src_off` of
/// `src` into slot `dst_off` of `dst`, replacing what the slot held. Both rings then
/// hold the same pinned pages.
fn clone_buffer(dst: &IoUring, src: &IoUring, src_off: u32, dst_off: u32) -> io::Result<()> {
    const IORING_REGISTER_CLONE_BUFFERS: libc::c_uint = 30;
    const IORING_REGISTER_DST_REPLACE: u32 = 1 << 1;
    #[repr(C)]
    struct CloneBuffers {
        src_fd: u32,
        flags: u32,
        src_off: u32,
        dst_off: u32,
        nr: u32,
        pad: [u32; 3],
    }
    let arg = CloneBuffers {
        src_fd: src.as_raw_fd() as u32,
        flags: IORING_REGISTER_DST_REPLACE,
        src_off,
        dst_off,
        nr: 1,
        pad: [0; 3],
    };
    // SAFETY: io_uring_register reads one `struct io_uring_clone_buffers` from `arg`,
    // which lives across the call; both descriptors are open rings.
    let r = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            dst.as_raw_fd(),
            IORING_REGISTER_CLONE_BUFFERS,
            &arg as *const CloneBuffers,
            1,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn clear_slot(ring: &IoUring, slot: u16) {
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    // SAFETY: an empty buffer (no memory) clears the slot.
    if let Err(e) = unsafe {
        ring.submitter()
            .register_buffers_update(u32::from(slot), &[empty], None)
    } {
        log::error!("io_uring: cannot clear fixed buffer {slot}: {e}");
    }
}

/// References to registered ranges of this thread's ring; [`crate::aio::uring::unpin`]
/// gives them back (dropping the handle does too).
/// It stays on the thread that registered (the table is thread-local).
#[derive(Debug, Default)]
pub struct Pinned {
    starts: Vec<usize>,
    _thread: std::marker::PhantomData<*const ()>,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if !self.starts.is_empty() {
            super::uring::unpin(self);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::aio::iovec::{AlignedBuf, IoVec, Keepalive};
    use crate::aio::uring::{self, block_on};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::Arc;

    const LEN: usize = 64 << 10;

    /// The tests that pin run one at a time: they look at the process's count.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A vector of `segs` (offset, length) inside `buf`.
    fn vec_of(buf: &Arc<AlignedBuf>, segs: &[(usize, usize)]) -> IoVec {
        let keep: Keepalive = buf.clone();
        let mut v = IoVec::new(Some(keep));
        for &(off, len) in segs {
            assert!(off + len <= buf.len());
            // SAFETY: inside the buffer, which the vector's keepalive holds.
            unsafe { v.push_raw(buf.as_slice().as_ptr().add(off).cast_mut(), len) };
        }
        v
    }

    /// `n` buffers of `LEN` bytes, buffer i filled with `first + i`.
    fn filled(n: u8, first: u8) -> Vec<Arc<AlignedBuf>> {
        (0..n)
            .map(|i| {
                let mut b = AlignedBuf::zeroed(LEN, 4096);
                b.as_mut_slice().fill(first + i);
                Arc::new(b)
            })
            .collect()
    }

    fn ops() -> u64 {
        uring::fixed_stats().0
    }

    #[test]
    fn direct_io_through_registered_memory_and_its_release() {
        let _serial = serial();
        let file = tempfile_direct();
        let fd = file.as_raw_fd();
        let mut b = AlignedBuf::zeroed(2 * LEN, 4096);
        for (i, x) in b.as_mut_slice()[..LEN].iter_mut().enumerate() {
            *x = (i / 4096 * 7 + i % 251) as u8;
        }
        let buf = Arc::new(b);
        let keep: Keepalive = buf.clone();
        // SAFETY: the buffer lives as long as `keep`, which the table holds.
        let pinned =
            unsafe { uring::pin(buf.as_slice().as_ptr().cast_mut(), 2 * LEN, &keep) }.unwrap();
        assert_eq!(uring::fixed_stats().1, (2 * LEN) as u64);
        let before = ops();
        // One segment, then two, written from the first half.
        let w1 = vec_of(&buf, &[(0, LEN / 2)]);
        let w2 = vec_of(&buf, &[(LEN / 2, 4096), (LEN / 2 + 4096, LEN / 2 - 4096)]);
        let vectored = block_on(async move {
            uring::writev(fd, 0, w1, 0).await.unwrap();
            let before2 = ops();
            uring::writev(fd, (LEN / 2) as u64, w2, 0).await.unwrap();
            ops() > before2
        });
        assert!(
            ops() > before,
            "a one-segment write did not use the fixed buffer"
        );
        // Read back into the second half, in two segments of one slot.
        let r = vec_of(&buf, &[(LEN, 8192), (LEN + 8192, LEN - 8192)]);
        let n = block_on(async move { uring::readv(fd, 0, r).await.unwrap() });
        assert_eq!(n, LEN as i32);
        assert_eq!(buf.as_slice()[LEN..], buf.as_slice()[..LEN]);
        let expected = before + 1 + 2 * u64::from(vectored);
        assert_eq!(ops(), expected, "vectored fixed I/O: {vectored}");

        // Memory outside the registration goes the usual way.
        let other = Arc::new(AlignedBuf::zeroed(LEN, 4096));
        let r = vec_of(&other, &[(0, LEN)]);
        block_on(async move { uring::readv(fd, 0, r).await.unwrap() });
        assert_eq!(other.as_slice(), &buf.as_slice()[..LEN]);
        assert_eq!(ops(), expected);

        // A second holder of the range: registered until both have let go.
        // SAFETY: as above.
        let again =
            unsafe { uring::pin(buf.as_slice().as_ptr().cast_mut(), 2 * LEN, &keep) }.unwrap();
        drop(pinned);
        let r = vec_of(&buf, &[(LEN, 4096)]);
        block_on(async move { uring::readv(fd, 0, r).await.unwrap() });
        assert_eq!(ops(), expected + 1);
        drop(again);
        assert_eq!(uring::fixed_stats().1, 0);
        let r = vec_of(&buf, &[(LEN, 4096)]);
        block_on(async move { uring::readv(fd, 0, r).await.unwrap() });
        assert_eq!(
            ops(),
            expected + 1,
            "an unregistered range was used as fixed"
        );
        drop(keep);
        // The table let go of its keepalive.
        assert_eq!(Arc::strong_count(&buf), 1);
    }

    /// Buffers pinned on another thread and cloned into this thread's ring: direct I/O
    /// goes through them (a wrong slot or a clone that shares nothing gives EFAULT or
    /// wrong data), also through a buffer registered in a slot above the one cloned
    /// into (which kernels before 6.18.3 lost); the bytes count once; a staging of a
    /// range registered already only adds a reference; a cancelled staging pins
    /// nothing; the last release lets go of the pages and the keepalives.
    #[test]
    fn buffers_pinned_elsewhere_are_adopted_without_pinning_again() {
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        let _serial = serial();
        if !super::can_clone() {
            eprintln!("skipped: this kernel cannot clone io_uring buffers");
            return;
        }
        let file = tempfile_direct();
        let fd = file.as_raw_fd();
        let bufs = filled(3, 0x40);
        let keeps: Vec<Keepalive> = bufs.iter().map(|b| b.clone() as Keepalive).collect();
        let at = |i: usize| bufs[i].as_slice().as_ptr() as usize;
        let stage = |i: usize, cancel: bool| {
            let (p, keep) = (at(i), keeps[i].clone());
            std::thread::spawn(move || {
                // SAFETY: the buffer lives as long as `keep`, which the staging holds.
                unsafe { super::Staged::new(&[(p, LEN)], keep, &[AtomicBool::new(cancel)]) }
                    .unwrap()
            })
            .join()
            .unwrap()
        };
        let base = super::PINNED_BYTES.load(Relaxed);
        // Buffers 0 and 1 in slots 0 and 1, then slot 0 freed again: the adopted
        // buffer goes there, below buffer 1.
        // SAFETY: the buffers live as long as their keepalives, which the table holds.
        let first = unsafe { uring::pin(at(0) as *mut u8, LEN, &keeps[0]) }.unwrap();
        // SAFETY: as above.
        let second = unsafe { uring::pin(at(1) as *mut u8, LEN, &keeps[1]) }.unwrap();
        drop(first);
        let mut staged = stage(2, false);
        assert_eq!(staged.ranges(), vec![((at(2), LEN), true)]);
        // SAFETY: `keeps[2]` keeps buffer 2 mapped.
        let adopted = unsafe { uring::adopt(&mut staged, 0, &keeps[2]) }.unwrap();
        drop(staged);
        assert_eq!(uring::fixed_stats().1, (2 * LEN) as u64);
        assert_eq!(
            super::PINNED_BYTES.load(Relaxed) - base,
            (2 * LEN) as u64,
            "the adopted bytes count once"
        );
        let before = ops();
        for i in [2usize, 1] {
            let w = vec_of(&bufs[i], &[(0, LEN)]);
            block_on(async move { uring::writev(fd, (i * LEN) as u64, w, 0).await.unwrap() });
        }
        assert_eq!(ops(), before + 2, "both writes used fixed buffers");
        // Read back through memory outside the registration.
        let check = Arc::new(AlignedBuf::zeroed(3 * LEN, 4096));
        let r = vec_of(&check, &[(0, 3 * LEN)]);
        block_on(async move { uring::readv(fd, 0, r).await.unwrap() });
        assert!(check.as_slice()[LEN..2 * LEN].iter().all(|&x| x == 0x41));
        assert!(
            check.as_slice()[2 * LEN..].iter().all(|&x| x == 0x42),
            "the adopted buffer's data"
        );
        // Reads into the adopted buffer land in it.
        let r = vec_of(&bufs[2], &[(LEN / 2, LEN / 2)]);
        block_on(async move { uring::readv(fd, LEN as u64, r).await.unwrap() });
        assert_eq!(ops(), before + 3);
        assert!(bufs[2].as_slice()[LEN / 2..].iter().all(|&x| x == 0x41));
        // The same range staged again: one more reference, nothing pinned twice.
        let mut again = stage(2, false);
        // SAFETY: as above.
        let shared = unsafe { uring::adopt(&mut again, 0, &keeps[2]) }.unwrap();
        drop(again);
        assert_eq!(uring::fixed_stats().1, (2 * LEN) as u64);
        drop(adopted);
        let r = vec_of(&bufs[2], &[(0, 4096)]);
        block_on(async move { uring::readv(fd, 0, r).await.unwrap() });
        assert_eq!(ops(), before + 4, "still registered for the second holder");
        // A cancelled staging pins nothing, and says so.
        let mut cancelled = stage(0, true);
        assert_eq!(cancelled.ranges(), vec![((at(0), LEN), false)]);
        // SAFETY: as above.
        let r = unsafe { uring::adopt(&mut cancelled, 0, &keeps[0]) };
        assert!(matches!(r, Err(super::FixedError::Cancelled)));
        drop(cancelled);
        // One flag per range: only the range whose flag is set is given up, and the
        // pinned one counts until the staging goes.
        let both: Keepalive = Arc::new((keeps[0].clone(), keeps[1].clone()));
        let (p0, p1) = (at(0), at(1));
        let partial = std::thread::spawn(move || {
            let flags = [AtomicBool::new(false), AtomicBool::new(true)];
            // SAFETY: both buffers live as long as `both`, which the staging holds.
            unsafe { super::Staged::new(&[(p0, LEN), (p1, LEN)], both, &flags) }.unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(
            partial.ranges(),
            vec![((p0, LEN), true), ((p1, LEN), false)]
        );
        assert_eq!(
            super::PINNED_BYTES.load(Relaxed) - base,
            (3 * LEN) as u64,
            "the staged range counts, the given-up one does not"
        );
        drop(partial);
        drop(shared);
        drop(second);
        assert_eq!(uring::fixed_stats().1, 0);
        assert_eq!(super::PINNED_BYTES.load(Relaxed), base);
        drop(keeps);
        assert!(
            bufs.iter().all(|b| Arc::strong_count(b) == 1),
            "keepalives let go"
        );
    }

    /// Errors worth a later try: the process's limit and the kernel's lagging count
    /// of pinned pages; not a refusal for good.
    #[test]
    fn what_is_tried_again_later() {
        let over = super::FixedError::OverLimit {
            len: 1,
            pinned: 2,
            limit: 2,
        };
        assert!(over.is_transient());
        for errno in [libc::ENOMEM, libc::EAGAIN] {
            let e = super::FixedError::Kernel(std::io::Error::from_raw_os_error(errno));
            assert!(e.is_transient());
        }
        for errno in [libc::EFAULT, libc::EINVAL, libc::EOPNOTSUPP] {
            let e = super::FixedError::Kernel(std::io::Error::from_raw_os_error(errno));
            assert!(!e.is_transient());
        }
        assert!(!super::FixedError::TableFull.is_transient());
        assert_eq!(super::buffers_for(0), 0);
        assert_eq!(super::buffers_for(1), 1);
        assert_eq!(super::buffers_for(super::MAX_BUFFER), 1);
        assert_eq!(super::buffers_for(super::MAX_BUFFER + 1), 2);
    }

    /// A reservation over the limit leaves the count as it was, also for the
    /// moment it is refused (the check is part of the update): one that fits is never
    /// refused because another thread's refused one showed in the count meanwhile
    /// (adding first and taking back after, this failed within 200,000 tries).
    #[test]
    fn a_refused_reservation_never_shows_in_the_count() {
        use std::sync::atomic::Ordering::Relaxed;
        let _serial = serial();
        let limit = super::pin_limit();
        let base = super::PINNED_BYTES.load(Relaxed);
        let r = super::reserve(limit - base + 1);
        assert!(matches!(r, Err(super::FixedError::OverLimit { pinned, .. }) if pinned == base));
        assert_eq!(super::PINNED_BYTES.load(Relaxed), base);
        super::reserve(1).unwrap();
        assert_eq!(super::PINNED_BYTES.load(Relaxed), base + 1);
        super::PINNED_BYTES.fetch_sub(1, Relaxed);
        // A reservation up to the limit, while another thread keeps asking for more
        // than the limit: it is never refused for the other's refused request.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let other = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    assert!(super::reserve(limit - base + 1).is_err());
                }
            })
        };
        let mut refused = 0;
        for _ in 0..200_000 {
            match super::reserve(limit - base) {
                Ok(()) => {
                    super::PINNED_BYTES.fetch_sub(limit - base, Relaxed);
                }
                Err(_) => refused += 1,
            }
        }
        stop.store(true, Relaxed);
        other.join().unwrap();
        assert_eq!(
            refused, 0,
            "refused for another thread's refused reservation"
        );
        assert_eq!(super::PINNED_BYTES.load(Relaxed), base);
    }

    #[test]
    fn each_buffer_is_written_from_its_own_slot() {
        let _serial = serial();
        let file = tempfile_direct();
        let fd = file.as_raw_fd();
        let bufs = filled(3, 0x10);
        let pins: Vec<_> = bufs
            .iter()
            .map(|b| {
                let keep: Keepalive = b.clone();
                // SAFETY: the buffer lives as long as `keep`, which the table holds.
                unsafe { uring::pin(b.as_slice().as_ptr().cast_mut(), LEN, &keep) }.unwrap()
            })
            .collect();
        let before = ops();
        // Backwards, so that no buffer sits at the slot of its index.
        for (i, b) in bufs.iter().enumerate().rev() {
            let w = vec_of(b, &[(4096, LEN - 8192)]);
            block_on(async move { uring::writev(fd, (i * LEN) as u64, w, 0).await.unwrap() });
        }
        assert_eq!(ops(), before + 3);
        // O_DIRECT: an aligned buffer.
        let mut back = AlignedBuf::zeroed(3 * LEN, 4096);
        let back = back.as_mut_slice();
        // SAFETY: pread into a buffer of that length.
        let n = unsafe { libc::pread(fd, back.as_mut_ptr().cast(), back.len(), 0) };
        assert_eq!(n, (3 * LEN - 8192) as isize);
        for i in 0..3 {
            let part = &back[i * LEN..i * LEN + LEN - 8192];
            assert!(part.iter().all(|&x| x == 0x10 + i as u8), "buffer {i}");
        }
        drop(pins);
    }

    /// An unlinked `O_DIRECT` file in the temporary directory.
    fn tempfile_direct() -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "vubd-fixed-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    #[test]
    fn a_range_overlapping_a_registered_one_is_refused() {
        let _serial = serial();
        let buf = Arc::new(AlignedBuf::zeroed(4 * 4096, 4096));
        let keep: Keepalive = buf.clone();
        let p = buf.as_slice().as_ptr().cast_mut();
        // SAFETY: inside the buffer, held by `keep`.
        let whole = unsafe { uring::pin(p, 4 * 4096, &keep) }.unwrap();
        // SAFETY: as above.
        let part = unsafe { uring::pin(p.wrapping_add(4096), 4096, &keep) };
        assert!(part.is_err());
        drop(whole);
        // SAFETY: as above.
        let part = unsafe { uring::pin(p.wrapping_add(4096), 4096, &keep) };
        assert!(part.is_ok());
    }
}

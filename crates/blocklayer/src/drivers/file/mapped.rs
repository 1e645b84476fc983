//! Large reads and writes on a tmpfs image as plain memory copies through a shared
//! mapping of the file.
//!
//! A `write()` to a tmpfs file copies under the file's inode lock, one writer at a
//! time, and walks the page cache page by page; a `read()` takes no lock but walks the
//! same way. Copying through a `MAP_SHARED` mapping touches the very same pages (the
//! data is in the page cache the moment the copy ends, exactly as after `pwrite`), with
//! no system call, no inode lock, and the C library's copy over whole runs of pages:
//! on this project's VM, 1 MiB took 105 us that way against 200 us by `pwrite` and
//! 153 us by `pread`, and two threads writing one file copied in parallel where
//! `pwrite` serialises them (docs/performance.md, "Mapped copies on tmpfs").
//!
//! The danger of a shared file mapping is SIGBUS: touching a page past the end of the
//! file, or a hole whose allocation fails (tmpfs full), kills the process. So a copy
//! only touches pages that are allocated and inside the file:
//! - `allocated` has one bit per [`CHUNK`] of the file, set once the chunk is found
//!   to have no hole (every page in the page cache, `mincore`; a tmpfs page is there
//!   once written) and to lie wholly inside the file. A request on a chunk without
//!   its bit copies only if its own range has no hole (`mincore` again). Anything else goes the system-call
//!   way: a read of a hole returns zeroes without allocating it (a read fault on the
//!   mapping would allocate it), and a write allocates its pages or reports ENOSPC to
//!   the guest as it always did. (A first version allocated them by
//!   `MADV_POPULATE_WRITE` ahead of the copy, which fails with an error instead of a
//!   signal; but a fault clears every page it allocates, which `pwrite` fills without
//!   clearing.) `mincore` answers "resident" for every page of a file the caller
//!   neither owns nor may write, so a file is mapped only if the daemon owns it or
//!   holds CAP_FOWNER; otherwise a read-only image of another user would be read
//!   through its holes.
//! - Only this driver makes holes (discard, write zeroes) or moves the end of the file
//!   (truncate, a write past the end), and it does so holding `punch` for writing,
//!   after clearing the bits of the chunks concerned; copies hold it for reading. The
//!   driver maps a file only when its image locks keep every other writer out
//!   (locking on, no `force-share`), and assumes one driver per file; a program that
//!   ignores the locks and cuts the image under a running daemon is outside the
//!   threat model (docs/design.md).
//! - What remains: a page of the image swapped out and unreadable from swap (an I/O
//!   error on the swap device, or memory poisoned by a hardware error) faults with
//!   SIGBUS on the copy where `pread` would have returned EIO.
//!
//! Guest memory on the other side of the copy is covered by the vhost-user SIGBUS
//! handler, as for every other access the daemon makes to it.

use crate::aio::iovec::IoVec;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// Granularity of the allocation bits: a copy touching a chunk whose bit is clear pays
/// one `mincore` (and one `madvise` to enter its pages) before its bit can be set.
pub(super) const CHUNK: u64 = 64 * 1024;

/// Requests at least this large are copied through the mapping. Smaller ones stay
/// system calls: their copy is short next to the read-write lock's shared cache line.
pub(super) const MAPPED_MIN: u64 = 64 * 1024;

/// A writable file is mapped this far past its end, so that copies follow it as it
/// grows (a qcow2 image allocating clusters) without moving the mapping under copies
/// in flight. Address space only: nothing is touched past the end of the file.
const GROWTH: u64 = 16 << 30;

pub(super) struct Mapping {
    base: *mut u8,
    /// Length of the mapping (the file's size at open, rounded up to a chunk, and
    /// [`GROWTH`] if writable).
    map_len: u64,
    /// Copies stay below this (the file's size, at most `map_len`).
    valid_len: AtomicU64,
    /// One bit per chunk: every page of the chunk is allocated.
    allocated: Box<[AtomicU64]>,
    /// Held for reading by copies, for writing by whatever makes holes or moves the
    /// end of the file.
    punch: RwLock<()>,
    writable: bool,
    /// The driver's descriptor of the file (it outlives the mapping's users: the
    /// driver's requests, and copy helper jobs, which end before their requests do and
    /// use only the memory and the bits; [`super::copier`]).
    fd: RawFd,
    /// The second of the last modification time given by [`Mapping::touch`].
    touched: AtomicU64,
}

// SAFETY: the mapping is shared memory owned by this value until drop; every access
// goes through raw-pointer copies whose safety the bits and `punch` establish, from
// any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; the bits are atomics and `punch` a lock.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `size` bytes of `fd`; `None` for an empty file or if mmap fails (the
    /// driver then simply keeps to system calls).
    pub(super) fn new(fd: RawFd, size: u64, writable: bool) -> Option<Mapping> {
        if size == 0 || !mincore_honest(fd) {
            return None;
        }
        let map_len = size.div_ceil(CHUNK) * CHUNK + if writable { GROWTH } else { 0 };
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new shared mapping of a descriptor we own, at an address of the
        // kernel's choice; nothing is touched until the bits say so.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                usize::try_from(map_len).ok()?,
                prot,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            log::debug!(
                "file: no mapping for copies: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        let chunks = map_len.div_ceil(CHUNK);
        let words = chunks.div_ceil(64) as usize;
        Some(Mapping {
            base: base.cast(),
            map_len,
            valid_len: AtomicU64::new(size),
            allocated: (0..words).map(|_| AtomicU64::new(0)).collect(),
            punch: RwLock::new(()),
            writable,
            fd,
            touched: AtomicU64::new(0),
        })
    }

    fn bit(&self, chunk: u64) -> (&AtomicU64, u64) {
        (&self.allocated[(chunk / 64) as usize], 1u64 << (chunk % 64))
    }

    fn is_allocated(&self, chunk: u64) -> bool {
        let (w, m) = self.bit(chunk);
        w.load(Ordering::Acquire) & m != 0
    }

    /// Whether `[start, end)` (inside the file) has no hole: every page it touches is
    /// in the page cache (`mincore`; a tmpfs page there is the file's data). Honest
    /// only for a file we own or may change the owner's way ([`mincore_honest`]).
    /// (`lseek(SEEK_HOLE)` would ask the file directly, but it walks on to the next
    /// hole, the end of a fully written image: milliseconds per chunk.)
    fn data(&self, start: u64, end: u64) -> bool {
        const PAGE: u64 = 4096;
        let (start, end) = (start / PAGE * PAGE, end.div_ceil(PAGE) * PAGE);
        let pages = ((end - start) / PAGE) as usize;
        let mut vec = [0u8; (CHUNK / 4096) as usize];
        if pages > vec.len() {
            return false;
        }
        // SAFETY: `start` is page-aligned inside our mapping and `end` at most a
        // chunk further, inside it too; mincore writes one byte per page into `vec`,
        // which has room for a chunk.
        let r = unsafe {
            libc::mincore(
                self.base.add(start as usize).cast(),
                (end - start) as usize,
                vec.as_mut_ptr(),
            )
        };
        r == 0 && vec[..pages].iter().all(|b| b & 1 != 0)
    }

    /// Enters the (allocated) pages of `[start, end)` in our page tables in one call,
    /// rather than by a fault per page on the first copy. Only a saving: a failure
    /// leaves the faults to the copy.
    fn map_in(&self, start: u64, end: u64) {
        let advice = if self.writable {
            libc::MADV_POPULATE_WRITE
        } else {
            libc::MADV_POPULATE_READ
        };
        // SAFETY: a page-aligned range inside our mapping and the file, whose pages
        // are all allocated (`data`): populating allocates nothing and cannot
        // fault fatally; it only fills in page table entries.
        unsafe {
            libc::madvise(
                self.base.add(start as usize).cast(),
                (end - start) as usize,
                advice,
            )
        };
    }

    /// Whether every page of `[offset, offset + len)` is allocated, setting the bits of
    /// the whole chunks found so on the way (never of the chunk holding the end of the
    /// file: it would stop being whole when the file grows). Called with `punch` held
    /// for reading.
    fn allocated(&self, offset: u64, len: u64) -> bool {
        let valid = self.valid_len.load(Ordering::Acquire);
        let end = offset + len;
        let mut chunk = offset / CHUNK;
        while chunk * CHUNK < end {
            if !self.is_allocated(chunk) {
                let c_start = chunk * CHUNK;
                let c_end = (chunk + 1) * CHUNK;
                if c_end <= valid && self.data(c_start, c_end) {
                    self.map_in(c_start, c_end);
                    let (w, m) = self.bit(chunk);
                    w.fetch_or(m, Ordering::AcqRel);
                } else if !self.data(offset.max(c_start), end.min(c_end)) {
                    // Holes in this request's own part of the chunk.
                    return false;
                }
            }
            chunk += 1;
        }
        true
    }

    /// Copies `iov` into the file at `offset`. `false`: not done (outside the file, or
    /// some of its pages are holes); the caller writes by system call, which allocates
    /// them (or reports ENOSPC), and the next write there finds them allocated.
    pub(super) fn write(&self, offset: u64, iov: &IoVec) -> bool {
        let done = self.copy(offset, iov, true);
        if done {
            self.touch();
        }
        done
    }

    /// Copies from the file at `offset` into `iov`. `false`: not done (some page may be
    /// a hole); the caller reads by system call.
    pub(super) fn read(&self, offset: u64, iov: &IoVec) -> bool {
        self.copy(offset, iov, false)
    }

    fn copy(&self, offset: u64, iov: &IoVec, into_file: bool) -> bool {
        let _copying = self.punch.read().unwrap_or_else(|e| e.into_inner());
        if !self.fits(offset, iov.len()) || !self.allocated(offset, iov.len()) {
            return false;
        }
        let mut at = offset as usize;
        for s in iov.segments() {
            let (file, seg) = (self.base.wrapping_add(at), s.iov_base as *mut u8);
            let (src, dst) = if into_file { (seg, file) } else { (file, seg) };
            // SAFETY: every page of the file's side is allocated and inside the file
            // (`allocated`, under `punch`), so the copy cannot fault fatally; the
            // segment is valid for reads and writes while `iov` lives (guest memory,
            // whose own faults the vhost-user SIGBUS handler covers, or a bounce
            // buffer). They do not overlap: the file mapping is ours alone.
            unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst, s.iov_len) };
            at += s.iov_len;
        }
        true
    }

    fn fits(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.valid_len.load(Ordering::Acquire))
    }

    /// The file now reaches at least `end` (a write by system call past its end).
    /// Alone (rare: only when a write extends the file), and from the file's own
    /// size rather than `end`, which a truncate may have undone meanwhile.
    pub(super) fn grown(&self, end: u64) {
        if end <= self.valid_len.load(Ordering::Acquire) {
            return;
        }
        let _alone = self.punch.write().unwrap_or_else(|e| e.into_inner());
        // SAFETY: fstat writes into the zeroed stat buffer we own; the descriptor is
        // the driver's, open while this mapping lives.
        let (r, st) = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            (libc::fstat(self.fd, &mut st), st)
        };
        if r == 0 {
            self.valid_len
                .store((st.st_size as u64).min(self.map_len), Ordering::Release);
        }
    }

    /// Gives the file a new modification time at most once a second while copies
    /// write it: a store through the mapping changes it only at the first write fault
    /// of each page, and the pages stay writable in our page tables after that.
    fn touch(&self) {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into `now`, which we own.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut now) };
        let sec = now.tv_sec as u64;
        if self.touched.load(Ordering::Relaxed) == sec
            || self.touched.swap(sec, Ordering::Relaxed) == sec
        {
            return;
        }
        let times = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
        ];
        // SAFETY: futimens reads the two timespecs; the descriptor is the driver's.
        unsafe { libc::futimens(self.fd, times.as_ptr()) };
    }

    /// Clears the bits of the chunks that `[offset, end)` touches. Bits are only ever
    /// set below the end of the file, so nothing past it needs clearing: a file that
    /// grows by `truncate` at every qcow2 cluster allocation must not pay for the
    /// mapping's whole growth room each time.
    fn forget(&self, offset: u64, end: u64) {
        let valid = self.valid_len.load(Ordering::Acquire);
        let (first, last) = (offset / CHUNK, end.min(valid).div_ceil(CHUNK));
        let mut chunk = first;
        while chunk < last {
            let (word, bit) = ((chunk / 64) as usize, chunk % 64);
            let n = (64 - bit).min(last - chunk);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            if self.allocated[word].load(Ordering::Relaxed) & mask != 0 {
                self.allocated[word].fetch_and(!mask, Ordering::AcqRel);
            }
            chunk += n;
        }
    }

    /// Runs `f`, which may make holes in `[offset, offset + len)`, with no copy in
    /// flight, and forgets that those chunks were allocated.
    pub(super) fn punching<R>(&self, offset: u64, len: u64, f: impl FnOnce() -> R) -> R {
        let _alone = self.punch.write().unwrap_or_else(|e| e.into_inner());
        self.forget(offset, offset.saturating_add(len));
        f()
    }

    /// Runs `f`, which moves the end of the file to `size`, with no copy in flight;
    /// copies then stay below both the new end (once `f` succeeded) and the mapping's.
    pub(super) fn resizing<E>(
        &self,
        size: u64,
        f: impl FnOnce() -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let _alone = self.punch.write().unwrap_or_else(|e| e.into_inner());
        // Pages past the new end go; past the old one a grown file has holes, also in
        // the chunk that held the old end.
        let old = self.valid_len.load(Ordering::Acquire);
        self.forget(size.min(old) / CHUNK * CHUNK, u64::MAX);
        f()?;
        self.valid_len
            .store(size.min(self.map_len), Ordering::Release);
        Ok(())
    }
}

/// Whether `mincore` tells the truth about `fd`'s pages: only for a file the caller
/// owns or has CAP_FOWNER over, or may open for writing (which a `chmod` can take
/// away); for any other it answers "resident" for every page. The owner and the
/// capability do not change under a running daemon.
fn mincore_honest(fd: RawFd) -> bool {
    // SAFETY: fstat writes into the zeroed stat buffer we own.
    let (r, st) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(fd, &mut st), st)
    };
    // SAFETY: geteuid has no preconditions.
    if r == 0 && st.st_uid == unsafe { libc::geteuid() } {
        return true;
    }
    const CAP_FOWNER: u32 = 3;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_FOWNER) != 0)
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `new`; no copy can be running,
        // as they all borrow `self`.
        unsafe { libc::munmap(self.base.cast(), self.map_len as usize) };
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::aio::iovec::AlignedBuf;
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    const K: u64 = 1024;

    /// A file on /dev/shm (tmpfs), removed on drop.
    pub(in crate::drivers::file) struct ShmFile {
        path: std::path::PathBuf,
        pub(in crate::drivers::file) file: File,
    }

    impl ShmFile {
        pub(in crate::drivers::file) fn new(name: &str, size: u64) -> ShmFile {
            let path = std::path::PathBuf::from(format!(
                "/dev/shm/vubd-mapped-{name}-{}",
                std::process::id()
            ));
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .expect("create a file on /dev/shm");
            file.set_len(size).expect("size it");
            ShmFile { path, file }
        }

        pub(in crate::drivers::file) fn fd(&self) -> RawFd {
            self.file.as_raw_fd()
        }

        pub(in crate::drivers::file) fn blocks(&self) -> u64 {
            use std::os::unix::fs::MetadataExt;
            self.file.metadata().expect("stat").blocks()
        }

        fn read(&self, offset: u64, len: u64) -> Vec<u8> {
            let mut v = vec![0u8; len as usize];
            self.file.read_exact_at(&mut v, offset).expect("pread");
            v
        }
    }

    impl Drop for ShmFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    pub(in crate::drivers::file) fn pattern(len: u64, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// A vector over a buffer holding `data`.
    pub(in crate::drivers::file) fn iov_of(data: &[u8]) -> IoVec {
        let mut buf = AlignedBuf::zeroed(data.len(), 4096);
        buf.as_mut_slice().copy_from_slice(data);
        IoVec::from_buf(Arc::new(buf))
    }

    pub(in crate::drivers::file) fn contents(iov: &IoVec) -> Vec<u8> {
        let mut v = vec![0u8; iov.len() as usize];
        iov.copy_to_slice(0, &mut v);
        v
    }

    #[test]
    fn copies_match_what_system_calls_see() {
        // Not a whole number of chunks or pages: the last page is partly the file's.
        let size = MIB + 4 * K + 512;
        let f = ShmFile::new("match", size);
        let old = pattern(size, 1);
        f.file.write_all_at(&old, 0).unwrap();
        let m = Mapping::new(f.fd(), size, true).expect("map");

        let got = iov_of(&vec![0u8; (192 * K) as usize]);
        assert!(m.read(64 * K + 512, &got), "an allocated range is copied");
        assert_eq!(
            contents(&got),
            old[(64 * K + 512) as usize..][..(192 * K) as usize]
        );

        let new = pattern(256 * K + 512, 7);
        assert!(
            m.write(size - new.len() as u64, &iov_of(&new)),
            "write up to the end"
        );
        assert_eq!(f.read(size - new.len() as u64, new.len() as u64), new);

        // Several segments, one request.
        let mut many = IoVec::new(None);
        let parts: Vec<Arc<AlignedBuf>> = [4 * K, 60 * K, 8 * K]
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let mut b = AlignedBuf::zeroed(l as usize, 4096);
                b.as_mut_slice().fill(0xa0 + i as u8);
                Arc::new(b)
            })
            .collect();
        for p in &parts {
            let seg = IoVec::from_buf(p.clone());
            for s in seg.segments() {
                // SAFETY: `parts` keeps every buffer alive for the whole test.
                unsafe { many.push_raw(s.iov_base.cast(), s.iov_len) };
            }
        }
        assert!(m.write(128 * K, &many));
        let back = f.read(128 * K, 72 * K);
        assert!(back[..4096].iter().all(|&b| b == 0xa0));
        assert!(back[4096..64 * 1024].iter().all(|&b| b == 0xa1));
        assert!(back[64 * 1024..].iter().all(|&b| b == 0xa2));

        // Past the end: refused, nothing touched.
        assert!(!m.write(size - 64 * K + 512, &iov_of(&[1u8; 65536])));
        assert!(!m.read(u64::MAX - 10, &iov_of(&[0u8; 65536])));
    }

    #[test]
    fn holes_are_left_to_system_calls() {
        let f = ShmFile::new("holes", 2 * MIB);
        let m = Mapping::new(f.fd(), 2 * MIB, true).expect("map");
        let buf = iov_of(&[0xffu8; 65536]);
        assert!(!m.read(0, &buf), "a hole is not read through the mapping");
        assert!(!m.write(0, &iov_of(&[1u8; 65536])), "nor written");
        assert_eq!(f.blocks(), 0, "looking allocated nothing");

        // Written by system call, the pages are there: 1.5 chunks.
        let data = pattern(96 * K, 3);
        f.file.write_all_at(&data, 64 * K).unwrap();
        assert!(m.read(64 * K, &iov_of(&[0u8; 65536])), "a whole chunk");
        let part = iov_of(&[0u8; 32768]);
        assert!(m.read(128 * K, &part), "the written part of a chunk");
        assert_eq!(contents(&part), data[(64 * K) as usize..]);
        assert!(!m.read(128 * K, &iov_of(&[0u8; 65536])), "not its hole");
        let new = pattern(96 * K, 8);
        assert!(m.write(64 * K, &iov_of(&new)), "rewriting allocated pages");
        assert!(
            !m.write(64 * K, &iov_of(&pattern(128 * K, 1))),
            "not the hole"
        );
        assert_eq!(f.read(64 * K, 96 * K), new);
        assert_eq!(f.blocks() * 512, 96 * K, "the mapping allocated nothing");
    }

    #[test]
    fn punched_chunks_are_forgotten() {
        let f = ShmFile::new("punch", MIB);
        f.file.write_all_at(&pattern(MIB, 5), 0).unwrap();
        let m = Mapping::new(f.fd(), MIB, true).expect("map");
        assert!(m.write(0, &iov_of(&pattern(MIB, 6))));
        let r = m.punching(64 * K, 64 * K, || {
            // SAFETY: punching a hole in a file we own.
            unsafe {
                libc::fallocate(
                    f.fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (64 * K) as i64,
                    (64 * K) as i64,
                )
            }
        });
        assert_eq!(r, 0);
        assert!(m.read(0, &iov_of(&[0u8; 65536])), "the chunk before stays");
        assert!(
            !m.read(64 * K, &iov_of(&[0u8; 65536])),
            "the hole is not read"
        );
        assert!(!m.write(64 * K, &iov_of(&[0u8; 65536])), "nor written");
        assert_eq!(f.blocks() * 512, MIB - 64 * K, "nor filled in by looking");
        assert!(f.read(64 * K, 64 * K).iter().all(|&b| b == 0));
        // Written again, it is known whole again.
        f.file.write_all_at(&pattern(64 * K, 9), 64 * K).unwrap();
        assert!(m.write(64 * K, &iov_of(&pattern(64 * K, 10))));
        assert_eq!(f.read(64 * K, 64 * K), pattern(64 * K, 10));
    }

    #[test]
    fn copies_stay_inside_a_resized_file() {
        let f = ShmFile::new("resize", MIB);
        f.file.write_all_at(&pattern(MIB, 2), 0).unwrap();
        let m = Mapping::new(f.fd(), MIB, true).expect("map");
        assert!(m.write(0, &iov_of(&pattern(MIB, 3))));
        let to = |size: u64| m.resizing(size, || f.file.set_len(size).map_err(|e| e.to_string()));
        to(512 * K).unwrap();
        assert!(
            !m.write(512 * K, &iov_of(&[1u8; 65536])),
            "past the new end"
        );
        assert!(!m.read(448 * K + 512, &iov_of(&[1u8; 65536])), "across it");
        assert!(m.read(448 * K, &iov_of(&[1u8; 65536])), "up to it");
        // Grown again, past the size at open: the regrown part is a hole.
        to(2 * MIB).unwrap();
        assert!(!m.read(768 * K, &iov_of(&[1u8; 65536])));
        assert!(!m.write(768 * K, &iov_of(&[1u8; 65536])));
        f.file.write_all_at(&[2u8; 65536], MIB).unwrap();
        assert!(
            m.write(MIB, &iov_of(&[3u8; 65536])),
            "past the size at open"
        );
        assert!(!m.write(2 * MIB, &iov_of(&[1u8; 65536])), "past the end");
        assert_eq!(f.read(MIB, 64 * K), vec![3u8; 65536]);
        // Grown by a write past the end (the driver's system-call path).
        f.file.write_all_at(&[4u8; 65536], 2 * MIB).unwrap();
        assert!(!m.read(2 * MIB, &iov_of(&[0u8; 65536])), "not told yet");
        m.grown(2 * MIB + 64 * K);
        let got = iov_of(&[0u8; 65536]);
        assert!(m.read(2 * MIB, &got));
        assert_eq!(contents(&got), vec![4u8; 65536]);
        // A resize that fails leaves the end where it was.
        assert!(m
            .resizing(0, || Err::<(), _>("refused".to_string()))
            .is_err());
        assert!(m.write(2 * MIB, &iov_of(&[5u8; 65536])));
    }

    #[test]
    fn a_chunk_whole_up_to_the_end_is_not_whole_once_the_file_grows() {
        for by_write in [false, true] {
            let f = ShmFile::new("grow", 100 * K);
            f.file.write_all_at(&pattern(100 * K, 1), 0).unwrap();
            let m = Mapping::new(f.fd(), 100 * K, true).expect("map");
            assert!(m.read(36 * K, &iov_of(&[0u8; 65536])), "up to the end");
            if by_write {
                f.file.write_all_at(&[1u8; 4096], 188 * K).unwrap();
                m.grown(192 * K);
            } else {
                m.resizing(192 * K, || f.file.set_len(192 * K)).unwrap();
            }
            assert!(
                !m.read(64 * K, &iov_of(&[0u8; 65536])),
                "a hole past the old end"
            );
            assert!(
                !m.write(64 * K, &iov_of(&[0u8; 65536])),
                "a hole past the old end"
            );
            let blocks = if by_write { 104 * K } else { 100 * K };
            assert_eq!(f.blocks() * 512, blocks, "nothing allocated by the mapping");
        }
    }

    #[test]
    fn a_read_only_mapping_ends_at_the_file() {
        let f = ShmFile::new("ro", MIB);
        f.file.write_all_at(&pattern(MIB, 4), 0).unwrap();
        let m = Mapping::new(f.fd(), MIB, false).expect("map");
        let got = iov_of(&[0u8; 65536]);
        assert!(m.read(MIB - 64 * K, &got));
        assert_eq!(contents(&got), pattern(MIB, 4)[(MIB - 64 * K) as usize..]);
        f.file.set_len(2 * MIB).unwrap();
        m.grown(2 * MIB);
        assert!(
            !m.read(MIB, &got),
            "nothing is mapped past the size at open"
        );
    }

    #[test]
    fn copies_move_the_modification_time() {
        use std::os::unix::fs::MetadataExt;
        let f = ShmFile::new("mtime", MIB);
        f.file.write_all_at(&pattern(MIB, 1), 0).unwrap();
        let m = Mapping::new(f.fd(), MIB, true).expect("map");
        let past = libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 0,
        };
        for round in 0..2 {
            // SAFETY: futimens reads the two timespecs; the descriptor is ours.
            assert_eq!(unsafe { libc::futimens(f.fd(), [past, past].as_ptr()) }, 0);
            assert!(m.write(0, &iov_of(&pattern(64 * K, round))));
            let mtime = f.file.metadata().unwrap().mtime();
            assert!(
                mtime > 1_000_000_000,
                "round {round}: mtime {mtime} not moved"
            );
            // The next second's copies move it again.
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
    }

    const MIB: u64 = 1024 * K;
}

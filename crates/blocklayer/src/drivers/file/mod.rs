//! The `file` and `host_device` protocol drivers: a regular file or block device on the
//! host, accessed through the iothread's io_uring, with data moving straight between
//! the request's buffers (guest memory) and the kernel.

use crate::aio::iovec::{AlignedBuf, IoVec};
use crate::aio::{uring, LocalBoxFuture};
use crate::driver::Driver;
use crate::drivers::lock::{
    lock_image, unlock_image, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED,
};
use crate::error::{BlockError, Result};
use crate::limits::Limits;
use crate::options::CommonOptions;
use crate::stats::{BlockStatsSpecific, BlockStatsSpecificFile};
use qcow::sync::AsyncLock;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

mod copier;
pub mod create;
mod mapped;
mod options;

pub use options::{AioMode, FileOptions, LockingMode};

/// The table rows of `file` and `host_device`: one driver, one folder.
pub(crate) const ENTRY: super::DriverEntry = super::DriverEntry {
    names: &["file"],
    kind: super::Kind::Protocol,
    parse: options::parse,
    create: Some(create::blockdev_create),
    reopen_mutable: &["drop-cache", "x-check-cache-dropped"],
};

pub(crate) const HOST_DEVICE_ENTRY: super::DriverEntry = super::DriverEntry {
    names: &["host_device"],
    kind: super::Kind::Protocol,
    parse: options::parse,
    create: None,
    reopen_mutable: &["drop-cache", "x-check-cache-dropped"],
};

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

/// How the driver issues its system calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Submission {
    /// Through the iothread's io_uring.
    Uring,
    /// Directly on the iothread. Only for memory-backed file systems (tmpfs, ramfs,
    /// hugetlbfs): they never wait for a device, but they lack FMODE_NOWAIT, so
    /// io_uring would hand every request to an io-wq worker thread and wake the
    /// iothread back with task work: two thread hops per request for a memory copy.
    /// Large reads are the exception ([`offload_read`]).
    Inline,
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// The file system type of `fd` (`f_type`), if fstatfs answers.
fn fs_type(fd: RawFd) -> Option<i64> {
    // SAFETY: statfs is plain data, filled in by fstatfs, which only writes into it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable statfs.
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 {
        return None;
    }
    Some(st.f_type as i64)
}

/// Whether `fd` is on tmpfs, whose holes and allocation failures [`mapped`] knows.
fn is_tmpfs(fd: RawFd) -> bool {
    fs_type(fd) == Some(TMPFS_MAGIC)
}

/// Whether `fd` lives on a memory-backed file system.
fn memory_backed(fd: RawFd) -> bool {
    matches!(
        fs_type(fd),
        Some(TMPFS_MAGIC | RAMFS_MAGIC | HUGETLBFS_MAGIC)
    )
}

/// Reads at least this large are split between the iothread and io_uring on
/// memory-backed files (see [`offload_read`]).
const OFFLOAD_READ_MIN: u64 = 64 * 1024;

/// Inline writes at least this large take turns at the driver's `write_gate` rather
/// than on the file's inode lock in the kernel. tmpfs takes that lock for every
/// write, and a second iothread writing the same file spins on it (rwsem optimistic
/// spinning) for the whole of the first one's copy; at the gate the second request
/// waits as a pending future instead, while its iothread serves other work or
/// sleeps. The gate is held across one system call only. Smaller writes hold the
/// lock for too short a time: gated, 64 KiB and 256 KiB writes from two iothreads
/// lost 15-25% of their IOPS (the lock sat idle while the next writer's thread woke),
/// where 1 MiB writes kept theirs at 40% less CPU per write (docs/performance.md).
const GATED_WRITE_MIN: u64 = 512 * 1024;

thread_local! {
    static OFFLOAD_NEXT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a read on a memory-backed file that no mapped copy could serve (a hole,
/// a file other than tmpfs, [`mapped`]) goes through io_uring rather than inline:
/// every other read of [`OFFLOAD_READ_MIN`] or more. io_uring hands such
/// reads to io-wq worker threads, so large copies run in parallel with the
/// iothread's own (page-cache reads take no inode lock), where inline they would
/// run one after another; small reads stay inline, where the thread hops would
/// cost more than the copy. Writes always stay inline: tmpfs serialises writers
/// on the inode lock, so offloading them only adds the hops (measured: 64 KiB
/// rewrites 0.9x and 1.7x the CPU per I/O).
fn offload_read(len: u64) -> bool {
    len >= OFFLOAD_READ_MIN
        && OFFLOAD_NEXT.with(|t| {
            let v = !t.get();
            t.set(v);
            v
        })
}

/// `ret` of a system call as a byte count or the errno.
fn sys_result(ret: isize) -> std::io::Result<i32> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret as i32)
    }
}

pub struct FileDriver {
    file: File,
    submission: Submission,
    path: String,
    size: AtomicU64,
    read_only: bool,
    block_device: bool,
    request_alignment: u32,
    mem_alignment: usize,
    stats: FileStats,
    /// The image locks taken at open (permissions held, shared), if locking.
    locks: Option<(u32, u32)>,
    /// Large inline writes, one at a time ([`GATED_WRITE_MIN`]).
    write_gate: AsyncLock,
    /// tmpfs only: large copies through a shared mapping ([`mapped`]).
    mapping: Option<Arc<mapped::Mapping>>,
}

/// The file driver's own statistics (`driver-specific` in `query-blockstats`).
#[derive(Default)]
struct FileStats {
    discard_nb_ok: AtomicU64,
    discard_nb_failed: AtomicU64,
    discard_bytes_ok: AtomicU64,
    /// Writes made stable on the host: fdatasync calls plus RWF_DSYNC writes.
    syncs: AtomicU64,
}

fn ioctl_u64(fd: RawFd, req: libc::c_ulong) -> std::io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: the request writes one u64 (BLKGETSIZE64) into `v`, which we own.
    let r = unsafe { libc::ioctl(fd, req, &mut v as *mut u64) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong) -> std::io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the request writes one int (BLKSSZGET) into `v`, which we own.
    let r = unsafe { libc::ioctl(fd, req, &mut v as *mut libc::c_int) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(v as u32)
    }
}

fn pread_at(fd: RawFd, buf: *mut u8, len: usize, offset: i64) -> isize {
    // SAFETY: callers pass a buffer valid for `len` bytes of writes.
    unsafe { libc::pread(fd, buf.cast(), len, offset) }
}

/// Finds the O_DIRECT request and memory alignment as QEMU does: the smallest size
/// (and buffer alignment) for which a read does not fail with EINVAL.
fn probe_direct_alignment(fd: RawFd, size: u64) -> (u32, usize) {
    const CANDIDATES: [usize; 4] = [512, 1024, 2048, 4096];
    if size < 4096 {
        return (4096, 4096);
    }
    let buf = AlignedBuf::zeroed(8192, 4096);
    let base = buf.as_slice().as_ptr() as *mut u8;
    let req = CANDIDATES
        .iter()
        .copied()
        .find(|&n| pread_at(fd, base, n, 0) >= 0)
        .unwrap_or(4096);
    let mem = CANDIDATES
        .iter()
        .copied()
        // SAFETY: `base + a + req` stays inside the 8192-byte buffer.
        .find(|&a| pread_at(fd, unsafe { base.add(a) }, req, 0) >= 0)
        .unwrap_or(4096);
    (req as u32, mem)
}

impl FileDriver {
    pub fn open(opts: &FileOptions, common: &CommonOptions) -> Result<FileDriver> {
        let path = opts.filename.display().to_string();
        let open_err = |source| BlockError::Open {
            path: path.clone(),
            source,
        };
        let mut oo = OpenOptions::new();
        oo.read(true).write(!common.read_only);
        let mut flags = libc::O_CLOEXEC;
        if common.cache_direct {
            flags |= libc::O_DIRECT;
        }
        oo.custom_flags(flags);
        let file = oo.open(&opts.filename).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let fd = file.as_raw_fd();
        let block_device = meta.file_type().is_block_device();
        if opts.host_device && !block_device {
            return Err(BlockError::Graph(format!(
                "'host_device' driver requires '{path}' to be a block device"
            )));
        }
        if !block_device && !meta.file_type().is_file() {
            return Err(BlockError::Graph(format!(
                "'{path}' is not a regular file or a block device"
            )));
        }
        let size = if block_device {
            ioctl_u64(fd, BLKGETSIZE64).map_err(open_err)?
        } else {
            meta.len()
        };
        let (request_alignment, mem_alignment) = if !common.cache_direct {
            (1, 1)
        } else if block_device {
            let lbs = ioctl_int(fd, BLKSSZGET).unwrap_or(512).max(512);
            (lbs, lbs as usize)
        } else {
            probe_direct_alignment(fd, size)
        };
        let locking = match opts.locking {
            LockingMode::Off => false,
            LockingMode::On | LockingMode::Auto => true,
        };
        if locking {
            let perm = if common.read_only {
                PERM_CONSISTENT_READ
            } else {
                PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE
            };
            let shared = if common.force_share {
                PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE
            } else {
                PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED
            };
            lock_image(fd, &path, perm, shared)?;
        }
        let locks = locking.then(|| {
            let perm = if common.read_only {
                PERM_CONSISTENT_READ
            } else {
                PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE
            };
            let shared = if common.force_share {
                PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE
            } else {
                PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED
            };
            (perm, shared)
        });
        let submission = if !block_device && memory_backed(fd) {
            Submission::Inline
        } else {
            Submission::Uring
        };
        // Copies through a mapping rely on this driver being the only one to make
        // holes in the file: the image locks must keep other writers out.
        let sole_writer = locking && !common.force_share;
        let mapping = (submission == Submission::Inline && is_tmpfs(fd) && sole_writer)
            .then(|| mapped::Mapping::new(fd, size, !common.read_only))
            .flatten()
            .map(Arc::new);
        Ok(FileDriver {
            file,
            submission,
            path,
            size: AtomicU64::new(size),
            read_only: common.read_only,
            block_device,
            request_alignment,
            mem_alignment,
            stats: FileStats::default(),
            locks,
            write_gate: AsyncLock::default(),
            mapping,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    async fn read_at(&self, offset: u64, iov: IoVec) -> Result<()> {
        let mut done = 0u64;
        while done < iov.len() {
            let part = iov.slice(done, iov.len() - done);
            let n = self
                .readv(offset + done, part.clone())
                .await
                .map_err(|e| BlockError::io("read", e))? as u64;
            if n == 0 {
                // End of file (an image whose size is not block-aligned): zeroes.
                part.fill_zero();
                return Ok(());
            }
            done += n;
        }
        Ok(())
    }

    async fn write_at(&self, offset: u64, iov: IoVec, fua: bool) -> Result<()> {
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        let mut done = 0u64;
        while done < iov.len() {
            let part = iov.slice(done, iov.len() - done);
            let n = self
                .writev(offset + done, part, flags)
                .await
                .map_err(|e| BlockError::io("write", e))? as u64;
            if n == 0 {
                return Err(BlockError::io(
                    "write",
                    std::io::Error::from_raw_os_error(libc::ENOSPC),
                ));
            }
            done += n;
        }
        if !self.block_device {
            let end = offset + iov.len();
            if self.size.fetch_max(end, Ordering::AcqRel) < end {
                if let Some(m) = &self.mapping {
                    m.grown(end);
                }
            }
        }
        if fua {
            self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn readv(&self, offset: u64, iov: IoVec) -> std::io::Result<i32> {
        if self.submission == Submission::Uring {
            return uring::readv(self.fd(), offset, iov).await;
        }
        // A mapped copy first: half the CPU of an io-wq worker's pread (64k reads on
        // one queue 2.17x -> 2.73x QSD at 12.7 -> 5.2 us per read), on this thread or,
        // from 256 KiB, on the copy helper when it is idle ([`copier`]).
        if self.copied_in(offset, &iov).await {
            return Ok(iov.len() as i32);
        }
        if offload_read(iov.len()) {
            return uring::readv(self.fd(), offset, iov).await;
        }
        let segs = iov.segments();
        // SAFETY: the segments are valid for writes while `iov` (and its keepalive)
        // lives, which covers this synchronous call.
        sys_result(unsafe {
            libc::preadv(self.fd(), segs.as_ptr(), segs.len() as i32, offset as i64)
        })
    }

    async fn writev(&self, offset: u64, iov: IoVec, rw_flags: i32) -> std::io::Result<i32> {
        match self.submission {
            Submission::Uring => uring::writev(self.fd(), offset, iov, rw_flags).await,
            Submission::Inline if self.copied_out(offset, &iov) => Ok(iov.len() as i32),
            Submission::Inline => {
                // Held across the system call only.
                let _inside = if iov.len() >= GATED_WRITE_MIN {
                    Some(self.write_gate.lock().await)
                } else {
                    None
                };
                let segs = iov.segments();
                // SAFETY: the segments are valid for reads while `iov` lives, which
                // covers this synchronous call.
                sys_result(unsafe {
                    libc::pwritev2(
                        self.fd(),
                        segs.as_ptr(),
                        segs.len() as i32,
                        offset as i64,
                        rw_flags,
                    )
                })
            }
        }
    }

    /// A large read done as a copy from the file's mapping (tmpfs), if it could be:
    /// by the copy helper if it is idle ([`copier`]), else on this thread.
    async fn copied_in(&self, offset: u64, iov: &IoVec) -> bool {
        let Some(m) = &self.mapping else {
            return false;
        };
        if !(mapped::MAPPED_MIN..=i32::MAX as u64).contains(&iov.len()) {
            return false;
        }
        match copier::offer(m, offset, iov) {
            Some(copy) => copy.await,
            None => m.read(offset, iov),
        }
    }

    /// A large write done as a copy into the file's mapping (tmpfs), if it could be.
    /// (RWF_DSYNC asks nothing more of tmpfs than the copy.)
    fn copied_out(&self, offset: u64, iov: &IoVec) -> bool {
        (mapped::MAPPED_MIN..=i32::MAX as u64).contains(&iov.len())
            && self.mapping.as_ref().is_some_and(|m| m.write(offset, iov))
    }

    async fn fdatasync(&self) -> std::io::Result<i32> {
        match self.submission {
            Submission::Uring => uring::fdatasync(self.fd()).await,
            Submission::Inline => {
                // SAFETY: plain system call on a file descriptor we own; no memory.
                let r = unsafe { libc::fdatasync(self.fd()) };
                sys_result(r as isize)
            }
        }
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u64, op: &'static str) -> Result<()> {
        match self.submission {
            Submission::Uring => uring::fallocate(self.fd(), mode, offset, len).await,
            Submission::Inline => {
                let call = || {
                    // SAFETY: plain system call on a file descriptor we own; no memory.
                    let r = unsafe { libc::fallocate(self.fd(), mode, offset as i64, len as i64) };
                    sys_result(r as isize)
                };
                let holes = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
                match &self.mapping {
                    Some(m) if mode & holes != 0 => m.punching(offset, len, call),
                    _ => call(),
                }
            }
        }
        .map(|_| ())
        .map_err(|e| BlockError::io(op, e))
    }
}

impl FileDriver {
    /// Data or hole at `offset` by SEEK_DATA/SEEK_HOLE (as QEMU's file-posix, on the
    /// calling thread), for how many bytes; data where the file system cannot say.
    fn seek_status(&self, offset: u64, len: u64) -> (crate::block_status::Status, u64) {
        use crate::block_status::Status;
        if self.block_device {
            return (Status::Data, len);
        }
        let fd = self.file.as_raw_fd();
        let Ok(at) = i64::try_from(offset) else {
            return (Status::Data, len);
        };
        // SAFETY: lseek only moves the offset of our own descriptor (every read and
        // write gives its own offset, so nothing depends on it).
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            return match std::io::Error::last_os_error().raw_os_error() {
                // No data after `offset`: a hole up to the end.
                Some(libc::ENXIO) => (Status::Zero, len),
                _ => (Status::Data, len),
            };
        }
        if data as u64 > offset {
            return (Status::Zero, (data as u64 - offset).min(len));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, at, libc::SEEK_HOLE) };
        if hole <= at {
            return (Status::Data, len);
        }
        (Status::Data, (hole as u64 - offset).min(len))
    }
}

impl Driver for FileDriver {
    fn release_locks(&self) {
        if self.locks.is_some() {
            unlock_image(self.file.as_raw_fd());
        }
    }

    fn retake_locks(&self) -> Result<()> {
        match self.locks {
            Some((perm, shared)) => lock_image(self.file.as_raw_fd(), &self.path, perm, shared),
            None => Ok(()),
        }
    }

    fn driver_name(&self) -> &'static str {
        if self.block_device {
            "host_device"
        } else {
            "file"
        }
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'_, Result<(crate::block_status::Status, u64)>> {
        Box::pin(std::future::ready(Ok(self.seek_status(offset, len))))
    }

    fn own_limits(&self) -> Limits {
        Limits {
            request_alignment: self.request_alignment,
            mem_alignment: self.mem_alignment,
            discard_alignment: 4096,
            ..Limits::default()
        }
    }

    fn supports_fua(&self) -> bool {
        true
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn grows_on_write(&self) -> bool {
        !self.block_device
    }

    fn truncate(&self, size: u64) -> Result<()> {
        let current = self.size.load(Ordering::Acquire);
        if self.block_device {
            // A device cannot grow; shrinking only narrows what is used of it.
            if size > current {
                return Err(BlockError::Graph(format!(
                    "Cannot grow device files ({size} > {current})"
                )));
            }
        } else {
            let len = i64::try_from(size)
                .map_err(|_| BlockError::Graph(format!("size {size} is too large")))?;
            let call = || {
                // SAFETY: ftruncate on a descriptor this driver owns; no memory is passed.
                let r = unsafe { libc::ftruncate(self.fd(), len) };
                if r < 0 {
                    return Err(BlockError::Graph(format!(
                        "Failed to resize file '{}': {}",
                        self.path(),
                        std::io::Error::last_os_error()
                    )));
                }
                Ok(())
            };
            match &self.mapping {
                Some(m) => m.resizing(size, call)?,
                None => call()?,
            }
        }
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    fn filename(&self) -> String {
        self.path().to_string()
    }

    fn actual_size(&self) -> Option<u64> {
        // SAFETY: fstat writes into the zeroed stat buffer we own; the descriptor is ours.
        let (r, st) = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            (libc::fstat(self.fd(), &mut st), st)
        };
        (r == 0 && !self.block_device).then(|| st.st_blocks as u64 * 512)
    }

    fn read<'a>(&'a self, offset: u64, iov: IoVec) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(self.read_at(offset, iov))
    }

    fn write<'a>(&'a self, offset: u64, iov: IoVec, fua: bool) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(self.write_at(offset, iov, fua))
    }

    fn flush(&self) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.fdatasync()
                .await
                .map_err(|e| BlockError::io("flush", e))?;
            self.stats.syncs.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let r = self
                .fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                    "discard",
                )
                .await;
            if r.is_ok() {
                self.stats.discard_nb_ok.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .discard_bytes_ok
                    .fetch_add(len, Ordering::Relaxed);
            } else {
                self.stats.discard_nb_failed.fetch_add(1, Ordering::Relaxed);
            }
            r
        })
    }

    fn allocate(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.block_device {
                // A device's blocks always exist; reserving them means making the
                // range read as zeroes without deallocating it.
                return self
                    .fallocate(
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                        "allocate",
                    )
                    .await;
            }
            // Inside the file: the generic path checked the range.
            self.fallocate(0, offset, len, "allocate").await
        })
    }

    fn driver_specific_stats(&self) -> Option<BlockStatsSpecific> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = BlockStatsSpecificFile {
            discard_nb_ok: get(&self.stats.discard_nb_ok),
            discard_nb_failed: get(&self.stats.discard_nb_failed),
            discard_bytes_ok: get(&self.stats.discard_bytes_ok),
            x_sync_operations: get(&self.stats.syncs),
        };
        Some(if self.block_device {
            BlockStatsSpecific::HostDevice(s)
        } else {
            BlockStatsSpecific::File(s)
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if may_unmap {
                // Punching a hole reads back as zeroes on files and block devices.
                let r = self
                    .fallocate(
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                        "write zeroes",
                    )
                    .await;
                if !matches!(&r, Err(e) if e.is_unsupported()) {
                    return r;
                }
            }
            self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
                "write zeroes",
            )
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aio::uring::block_on;
    use std::sync::atomic::AtomicUsize;

    /// The write gate as the driver uses it: held by one thread at a time, and a
    /// waiter on another thread woken when it is left (no wake-up lost).
    #[test]
    fn write_gate_one_writer_inside_at_a_time_and_no_wake_up_lost() {
        let gate = Arc::new(AsyncLock::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let entries = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (gate, inside, entries) = (gate.clone(), inside.clone(), entries.clone());
                std::thread::spawn(move || {
                    block_on(async move {
                        for _ in 0..2000 {
                            let g = gate.lock().await;
                            assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                            // Long enough inside for the others to find it busy.
                            for _ in 0..100 {
                                std::hint::spin_loop();
                            }
                            std::thread::yield_now();
                            inside.fetch_sub(1, Ordering::SeqCst);
                            entries.fetch_add(1, Ordering::Relaxed);
                            drop(g);
                        }
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a thread failed");
        }
        assert_eq!(entries.load(Ordering::Relaxed), 8000);
    }
}

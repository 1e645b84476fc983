//! The crate's own asynchronous I/O trait, and two implementations.
//!
//! The qcow2 code reads and writes its image file (and nothing else) through
//! [`QcowIo`]. The block layer implements it on top of its `file` child; tests
//! and the fuzzer use [`MemIo`]; tools use [`FileIo`].

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// Declares [`DebugEvent`] from one list of `Variant => "qemu_name"` rows: the
/// enum, its [`DebugEvent::name`] table and [`DebugEvent::ALL`].
macro_rules! debug_events {
    ($($(#[doc = $doc:literal])* $variant:ident => $name:literal,)*) => {
        /// A point in the qcow2 code where QEMU raises a blkdebug event on the
        /// image file (`BLKDBG_EVENT(bs->file, ...)`), so that a `blkdebug` node
        /// below can arm its `inject-error` rules there
        /// ([`QcowIo::debug_event`]). Each is raised just before the I/O it
        /// names, or at the step it names when that step may do no I/O (a cache
        /// hit, a reserved cluster).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum DebugEvent {
            $($(#[doc = $doc])* $variant,)*
        }

        impl DebugEvent {
            /// The event's name in QEMU's `BlkdebugEvent` (what `inject-error`
            /// rules name).
            pub fn name(self) -> &'static str {
                match self {
                    $(DebugEvent::$variant => $name,)*
                }
            }

            /// Every event, in declaration order.
            pub const ALL: [DebugEvent; [$($name),*].len()] = [$(DebugEvent::$variant),*];
        }
    };
}

debug_events! {
    /// An L1 entry is written (an L2 table was allocated or dropped).
    L1Update => "l1_update",
    /// Growing the L1 table: clusters for the new table are allocated,
    L1GrowAllocTable => "l1_grow_alloc_table",
    /// the new table is written,
    L1GrowWriteTable => "l1_grow_write_table",
    /// and the header switches to it.
    L1GrowActivateTable => "l1_grow_activate_table",
    /// Shrinking: L1 entries past the new end are cleared,
    L1ShrinkWriteTable => "l1_shrink_write_table",
    /// and the L2 tables they pointed to are freed.
    L1ShrinkFreeL2Clusters => "l1_shrink_free_l2_clusters",
    /// An L2 table is read into the cache (a miss).
    L2Load => "l2_load",
    /// A cached L2 table (or some of its entries) is written back.
    L2Update => "l2_update",
    /// An L2 entry is pointed at compressed data.
    L2UpdateCompressed => "l2_update_compressed",
    /// A copied L2 table's old content is read (the old table was shared).
    L2AllocCowRead => "l2_alloc_cow_read",
    /// A new L2 table is written.
    L2AllocWrite => "l2_alloc_write",
    /// Guest data is read from the image file (here: the old content of a
    /// cluster being copied on write).
    ReadAio => "read_aio",
    /// Guest data is read from the backing file (here: for copy on write).
    ReadBackingAio => "read_backing_aio",
    /// A compressed cluster is read.
    ReadCompressed => "read_compressed",
    /// Compressed guest data is written.
    WriteCompressed => "write_compressed",
    /// The old content around a partial write is read for copy on write,
    CowRead => "cow_read",
    /// and written to the new cluster.
    CowWrite => "cow_write",
    /// The refcount table is read (at open).
    ReftableLoad => "reftable_load",
    /// The refcount table is replaced by a larger one.
    ReftableGrow => "reftable_grow",
    /// A refcount block is looked up to change a refcount (QEMU raises it on
    /// cache hits too).
    RefblockLoad => "refblock_load",
    /// The changed part of a cached refcount block is written back.
    RefblockUpdatePart => "refblock_update_part",
    /// A refcount is about to change: its refcount block is found, or a new
    /// one is needed (QEMU raises it either way),
    RefblockAlloc => "refblock_alloc",
    /// is written,
    RefblockAllocWrite => "refblock_alloc_write",
    /// and is hooked up in the refcount table.
    RefblockAllocHookup => "refblock_alloc_hookup",
    /// Growing the refcount table: its new refcount blocks are written,
    RefblockAllocWriteBlocks => "refblock_alloc_write_blocks",
    /// the new table is written,
    RefblockAllocWriteTable => "refblock_alloc_write_table",
    /// and the header switches to it.
    RefblockAllocSwitchTable => "refblock_alloc_switch_table",
    /// Host clusters are allocated.
    ClusterAlloc => "cluster_alloc",
    /// Bytes for compressed data are allocated.
    ClusterAllocBytes => "cluster_alloc_bytes",
    /// Host clusters are freed.
    ClusterFree => "cluster_free",
    /// The space of a new cluster is zeroed instead of copying zeroes.
    ClusterAllocSpace => "cluster_alloc_space",
}

/// Positioned asynchronous I/O on an image file.
///
/// Futures need not be `Send`. Reads past the end of the file return zeroes
/// for the part beyond the end.
#[allow(clippy::len_without_is_empty)]
pub trait QcowIo {
    /// Reads `buf.len()` bytes at `offset`; bytes past the end read as zero.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = io::Result<()>>;
    /// Writes all of `buf` at `offset`, growing the file if needed.
    fn write_at(&self, offset: u64, buf: &[u8]) -> impl Future<Output = io::Result<()>>;
    /// Makes every completed write stable.
    fn flush(&self) -> impl Future<Output = io::Result<()>>;
    /// A flush that this crate adds for its own crash safety at a point where
    /// QEMU's qcow2 flushes nothing (an allocating write's reservation or
    /// commit). The default is [`QcowIo::flush`]; the block layer passes it
    /// by `blkdebug` rules, so that a rule meant for QEMU's flushes fails the
    /// same guest request.
    fn flush_unchecked(&self) -> impl Future<Output = io::Result<()>> {
        self.flush()
    }
    /// The current length of the file.
    fn len(&self) -> impl Future<Output = io::Result<u64>>;
    /// Truncates or extends the file (extension reads as zeroes).
    fn set_len(&self, len: u64) -> impl Future<Output = io::Result<()>>;
    /// Gives the host back the space of `offset..offset + len`, which nothing
    /// references any more (its content becomes unspecified). Advisory; the
    /// default does nothing.
    fn discard(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> {
        let _ = (offset, len);
        std::future::ready(Ok(()))
    }
    /// Writes `len` zero bytes at `offset`. The default writes a zero buffer;
    /// implementations may use fallocate instead.
    fn write_zeroes(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> {
        write_zero_buffers(self, offset, len)
    }
    /// Reserves host space for `offset..offset+len` (QEMU's
    /// `preallocation=falloc`), growing the file if the range ends past it.
    /// Afterwards holes in the range and the part past the old end read as
    /// zeroes and take space on the host. Data already in the range may be
    /// kept (fallocate) or zeroed (the default, which writes zero buffers),
    /// so callers use it only on ranges whose content does not matter.
    fn allocate(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> {
        write_zero_buffers(self, offset, len)
    }
    /// Whether something below sees each request (a `blkdebug` node): then
    /// the image code also makes the write-zeroes requests QEMU's qcow2 makes
    /// where it has a cheaper way (see [`QcowIo::write_zeroes_request`]). The
    /// default is false.
    fn watches_requests(&self) -> bool {
        false
    }
    /// Writes `len` zero bytes at `offset` as one write-zeroes request on the
    /// file (QEMU's `bdrv_co_pwrite_zeroes`), growing it if needed. The
    /// default is [`QcowIo::write_zeroes`].
    fn write_zeroes_request(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> {
        self.write_zeroes(offset, len)
    }
    /// The image code reached `event` (see [`DebugEvent`]); the block layer
    /// passes it to a `blkdebug` node below. The default does nothing.
    #[inline]
    fn debug_event(&self, event: DebugEvent) {
        let _ = event;
    }
}

/// Writes `len` zero bytes at `offset` as data (never as holes): the default
/// of [`QcowIo::write_zeroes`] and [`QcowIo::allocate`], and what
/// `preallocation=full` does.
pub async fn write_zero_buffers<I: QcowIo + ?Sized>(
    io: &I,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; len.min(CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        io.write_at(offset + done, &zeroes[..n as usize]).await?;
        done += n;
    }
    Ok(())
}

impl<T: QcowIo> QcowIo for &T {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = io::Result<()>> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> impl Future<Output = io::Result<()>> {
        (**self).write_at(offset, buf)
    }
    fn flush(&self) -> impl Future<Output = io::Result<()>> {
        (**self).flush()
    }
    fn flush_unchecked(&self) -> impl Future<Output = io::Result<()>> {
        (**self).flush_unchecked()
    }
    fn len(&self) -> impl Future<Output = io::Result<u64>> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> impl Future<Output = io::Result<()>> {
        (**self).set_len(len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> {
        (**self).write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> {
        (**self).discard(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> {
        (**self).allocate(offset, len)
    }
    fn debug_event(&self, event: DebugEvent) {
        (**self).debug_event(event)
    }
    fn watches_requests(&self) -> bool {
        (**self).watches_requests()
    }
    fn write_zeroes_request(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> {
        (**self).write_zeroes_request(offset, len)
    }
}

/// Largest file [`MemIo`] accepts, so that a hostile image cannot make a
/// test allocate without bound.
pub const MEM_IO_LIMIT: u64 = 1 << 30;

/// An in-memory file, for tests and fuzzing.
#[derive(Debug, Default)]
pub struct MemIo {
    data: Mutex<Vec<u8>>,
    flushes: std::sync::atomic::AtomicU64,
}

impl MemIo {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }
    /// A file holding `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        MemIo {
            data: Mutex::new(data),
            flushes: Default::default(),
        }
    }
    /// A copy of the file's content.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
    /// How many times `flush` was called.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn check(offset: u64, len: usize) -> io::Result<usize> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= MEM_IO_LIMIT)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "MemIo: offset too large")
            })?;
        Ok(end as usize)
    }
}

impl QcowIo for MemIo {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.data.lock().unwrap();
        buf.fill(0);
        if offset < d.len() as u64 {
            let start = offset as usize;
            let n = buf.len().min(d.len() - start);
            buf[..n].copy_from_slice(&d[start..start + n]);
        }
        Ok(())
    }
    async fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let end = Self::check(offset, buf.len())?;
        let mut d = self.data.lock().unwrap();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    async fn len(&self) -> io::Result<u64> {
        Ok(self.data.lock().unwrap().len() as u64)
    }
    async fn set_len(&self, len: u64) -> io::Result<()> {
        let end = Self::check(len, 0)?;
        self.data.lock().unwrap().resize(end, 0);
        Ok(())
    }
}

/// A host file accessed with `pread`/`pwrite`; its futures complete at once.
#[derive(Debug)]
pub struct FileIo {
    file: std::fs::File,
}

impl FileIo {
    /// Wraps an open file.
    pub fn new(file: std::fs::File) -> Self {
        FileIo { file }
    }
    /// Opens `path` for reading, and for writing when `writable`.
    pub fn open(path: impl AsRef<std::path::Path>, writable: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)?;
        Ok(FileIo { file })
    }
    /// Creates (or truncates) `path`.
    pub fn create(path: impl AsRef<std::path::Path>) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(FileIo { file })
    }
    /// The underlying file.
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }
}

impl QcowIo for FileIo {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    async fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    async fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    async fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    async fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    async fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        };
        // SAFETY: fallocate on a descriptor this object owns; no memory is passed.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, off, n) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // The file system cannot reserve space: write zeroes, as
            // posix_fallocate does.
            Some(libc::EOPNOTSUPP) => write_zero_buffers(self, offset, len).await,
            _ => Err(e),
        }
    }
    async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        };
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a descriptor this object owns; no memory is passed.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Runs a future whose I/O completes at once (MemIo, FileIo) to completion
/// on the current thread. For tests and tools; panics if the future stays
/// pending after many polls with nothing that could wake it.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Flag(std::sync::atomic::AtomicBool, std::thread::Thread);
    impl Wake for Flag {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            self.1.unpark();
        }
    }
    let flag = std::sync::Arc::new(Flag(false.into(), std::thread::current()));
    let waker = Waker::from(flag.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        while !flag.0.swap(false, std::sync::atomic::Ordering::SeqCst) {
            std::thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_io_reads_zeroes_past_end() {
        let m = MemIo::new();
        block_on(m.write_at(4, &[1, 2, 3])).unwrap();
        let mut b = [9u8; 10];
        block_on(m.read_at(2, &mut b)).unwrap();
        assert_eq!(b, [0, 0, 1, 2, 3, 0, 0, 0, 0, 0]);
        assert_eq!(block_on(m.len()).unwrap(), 7);
        block_on(m.write_zeroes(5, 1)).unwrap();
        assert_eq!(m.to_vec(), [0, 0, 0, 0, 1, 0, 3]);
        assert!(block_on(m.write_at(MEM_IO_LIMIT, &[1])).is_err());
    }

    #[test]
    fn file_io_round_trip() {
        let dir = std::env::temp_dir().join(format!("qcow-fileio-{}", std::process::id()));
        let f = FileIo::create(&dir).unwrap();
        block_on(f.write_at(100, b"abc")).unwrap();
        let mut b = [7u8; 6];
        block_on(f.read_at(101, &mut b)).unwrap();
        assert_eq!(&b, b"bc\0\0\0\0");
        block_on(f.set_len(4096)).unwrap();
        assert_eq!(block_on(f.len()).unwrap(), 4096);
        block_on(f.flush()).unwrap();
        std::fs::remove_file(&dir).unwrap();
    }
}

//! An open qcow2 image: state, metadata caches, and the read path (`map`).

use crate::bitmaps::{BitmapError, Slot};
use crate::cache::{CacheEntry, TableCache};
use crate::compress::{self, CompressError};
use crate::header::{self, autoclear, compat, incompat, Header, HeaderError};
use crate::io::{DebugEvent, QcowIo};
use crate::layout::{self, Geometry, L2Entry, COPIED, OFFSET_MASK};
use crate::snapshot::{self, Snapshot, SnapshotError};
use crate::sync::{AsyncLock, WaitList};
use crate::view::{Published, ReadView, ViewState, READ_VIEWS};
use std::sync::{Mutex, MutexGuard};
use thiserror::Error;

/// Errors of image operations.
#[derive(Debug, Error)]
pub enum Error {
    /// I/O on the image file failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The header is invalid or unsupported.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The snapshot table is invalid.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A compressed cluster could not be decompressed.
    #[error(transparent)]
    Compress(#[from] CompressError),
    /// Metadata corruption was found; the image is now marked corrupt and read-only.
    #[error("qcow2 image is corrupt: {0}; further writes are refused")]
    Corrupt(String),
    /// The image is read-only (opened so, or marked corrupt).
    #[error("qcow2 image is read-only")]
    ReadOnly,
    /// A feature this crate does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A request outside the virtual disk.
    #[error("request {offset:#x}+{len:#x} beyond the virtual size {size:#x}")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Virtual size.
        size: u64,
    },
    /// A request is not aligned as the operation requires.
    #[error("request {offset:#x}+{len:#x} not aligned to {align:#x}")]
    Unaligned {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Required alignment.
        align: u64,
    },
    /// A metadata structure would exceed its limits.
    #[error("no space: {0}")]
    NoSpace(String),
    /// No internal snapshot has this id or name.
    #[error("snapshot not found: {0}")]
    SnapshotNotFound(String),
    /// An internal snapshot of this name exists already.
    #[error("a snapshot named {0:?} exists already")]
    SnapshotExists(String),
    /// The bitmaps extension is invalid, or a bitmap operation is refused.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The errno a block layer should report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::Header(_) | Error::Snapshot(_) | Error::Compress(_) | Error::Corrupt(_) => {
                libc::EIO
            }
            Error::ReadOnly => libc::EROFS,
            Error::Unsupported(_) | Error::Unaligned { .. } => libc::ENOTSUP,
            Error::OutOfRange { .. } => libc::EINVAL,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::SnapshotNotFound(_) => libc::ENOENT,
            Error::SnapshotExists(_) => libc::EEXIST,
            Error::Bitmap(BitmapError::NotFound(_)) => libc::ENOENT,
            Error::Bitmap(_) => libc::EINVAL,
        }
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io(e) => e,
            other => std::io::Error::from_raw_os_error(other.errno()),
        }
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open for writing.
    pub writable: bool,
    /// L2 cache size in bytes (QEMU's `l2-cache-size`); default: enough to
    /// map the whole disk, at most 32 MiB.
    pub l2_cache_size: Option<u64>,
    /// Refcount block cache size in bytes (`refcount-cache-size`).
    pub refcount_cache_size: Option<u64>,
    /// Use lazy refcounts when the image allows them (`lazy-refcounts`);
    /// default: the image's compatible bit.
    pub lazy_refcounts: Option<bool>,
    /// Repair refcounts of an image with the dirty bit when opened writable.
    pub repair_dirty: bool,
    /// Punch the host clusters that deleting (or reverting to) a snapshot
    /// frees (QEMU's `pass-discard-snapshot`, default on).
    pub pass_discard_snapshot: bool,
    /// Punch host clusters freed otherwise: copy-on-write replacing a cluster,
    /// overwritten compressed clusters, shrinking (`pass-discard-other`,
    /// default off). Guest discards are the caller's (`pass-discard-request`).
    pub pass_discard_other: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            l2_cache_size: None,
            refcount_cache_size: None,
            lazy_refcounts: None,
            repair_dirty: true,
            pass_discard_snapshot: true,
            pass_discard_other: false,
        }
    }
}

impl OpenOptions {
    /// Read-only defaults.
    pub fn read_only() -> Self {
        Self::default()
    }
    /// Read-write defaults.
    pub fn read_write() -> Self {
        OpenOptions {
            writable: true,
            ..Self::default()
        }
    }
}

/// What a guest range maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Stored at `host_offset` in the image file; read it there.
    Data {
        /// Host offset of the extent's first byte.
        host_offset: u64,
    },
    /// Reads as zeroes.
    Zero,
    /// Not allocated: read from the backing file, or zeroes without one.
    Unallocated,
    /// Inside a compressed cluster; use [`Qcow2::read_compressed`].
    Compressed {
        /// Host offset of the compressed data.
        host_offset: u64,
        /// Bytes to read from there (may include trailing bytes of the last sector).
        compressed_size: u64,
    },
}

/// The extents of a mapped range: inline for the usual handful.
pub type Extents = smallvec::SmallVec<[Extent; 4]>;

/// A guest range with one kind of mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Where its data is.
    pub kind: ExtentKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableKind {
    L2,
    Refcount,
}

/// A locked guest cluster range (see `lock_range`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RangeLock {
    pub start: u64,
    pub end: u64,
    pub shared: bool,
    pub id: u64,
}

#[derive(Debug)]
pub(crate) struct State {
    pub hdr: Header,
    pub l1: Vec<u64>,
    pub rt: Vec<u64>,
    pub l2: TableCache,
    pub rc: TableCache,
    pub writable: bool,
    pub corrupt: bool,
    pub locks: Vec<RangeLock>,
    pub next_lock_id: u64,
    /// Refcount decreases waiting for the flush that makes the removal of
    /// their references durable: (host offset, length, freed by other than a
    /// guest discard).
    pub pending_frees: Vec<(u64, u64, bool)>,
    /// While a snapshot operation runs: the clusters whose refcount reached 0.
    pub freed_clusters: Option<Vec<u64>>,
    pub pass_discard_snapshot: bool,
    pub pass_discard_other: bool,
    pub free_hint: u64,
    pub high_water: u64,
    pub dirty_marked: bool,
    pub lazy: bool,
    pub epoch: u64,
    pub snapshots: Vec<Snapshot>,
    pub snapshot_table_len: u64,
    /// Host offsets of known L2 tables and refcount blocks, so that the
    /// allocator never hands out a metadata cluster whose refcount is
    /// (wrongly) zero.
    pub meta_clusters: std::collections::HashSet<u64>,
    /// Where the next compressed cluster may go (inside a host cluster that
    /// already holds compressed data), 0 if nowhere.
    pub free_byte_offset: u64,
    /// Calls of `clean_unused_cache_entries`.
    pub cleans: u64,
    /// Dirty L2 entries map host ranges whose guest data must be stable
    /// before the tables are written (see `Allocation::needs_data_sync`).
    pub l2_needs_data_sync: bool,
    /// Refcount metadata was written since the last sync: an entry that
    /// references a cluster may depend on it (see `Qcow2::sync`).
    pub rc_unsynced: bool,
    /// Clusters were handed out of a reservation since the last refcount
    /// write-back that raised `RefblockUpdatePart`: QEMU would hold their
    /// refcount changes dirty in its cache until then, so that write-back
    /// raises the event even with nothing left to write (see
    /// `Qcow2::write_dirty_refcounts`).
    pub rc_event_owed: bool,
    /// Clusters reserved for guest data and not handed out yet (indices):
    /// their refcounts are 1 and stable, the file covers them, they read as
    /// zeroes (see "Reservations" in `alloc.rs`).
    pub reserved: std::ops::Range<u64>,
    /// Clusters the next reservation takes (it doubles up to a limit).
    pub reserve_next: u64,
    /// The bitmap directory, as it is in the image.
    pub bitmaps: Vec<Slot>,
}

impl State {
    pub fn cache(&mut self, k: TableKind) -> &mut TableCache {
        match k {
            TableKind::L2 => &mut self.l2,
            TableKind::Refcount => &mut self.rc,
        }
    }
    /// Host ranges of the fixed metadata (header, L1, refcount table,
    /// snapshot table) for overlap checks.
    pub fn fixed_ranges(&self, cs: u64) -> [(u64, u64); 4] {
        [
            (0, cs),
            (self.hdr.l1_table_offset, self.l1.len() as u64 * 8),
            (
                self.hdr.refcount_table_offset,
                self.hdr.refcount_table_clusters as u64 * cs,
            ),
            (self.hdr.snapshots_offset, self.snapshot_table_len),
        ]
    }
    pub fn overlaps_fixed(&self, cs: u64, off: u64, len: u64) -> bool {
        self.fixed_ranges(cs)
            .iter()
            .any(|&(o, l)| l > 0 && off < o + l && o < off + len)
    }
    /// What is wrong with `off` as the host offset of an L2 table, if anything.
    pub fn l2_offset_problem(&self, g: &Geometry, off: u64) -> Option<&'static str> {
        self.map_limits(g.cluster_size).l2_offset_problem(g, off)
    }
    /// What mapped entries are checked against now.
    pub fn map_limits(&self, cs: u64) -> MapLimits {
        MapLimits {
            size: self.hdr.size,
            high_water: self.high_water,
            fixed: self.fixed_ranges(cs),
        }
    }
}

/// What a mapping is checked against: the virtual size, the end of the file and
/// the fixed metadata ranges.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MapLimits {
    pub size: u64,
    pub high_water: u64,
    pub fixed: [(u64, u64); 4],
}

impl MapLimits {
    /// What is wrong with `off` as the host offset of an L2 table, if anything.
    pub fn l2_offset_problem(&self, g: &Geometry, off: u64) -> Option<&'static str> {
        let cs = g.cluster_size;
        if !g.aligned(off) {
            Some("unaligned")
        } else if off >= self.high_water {
            Some("past the end of the file")
        } else if self
            .fixed
            .iter()
            .any(|&(o, l)| l > 0 && off < o + l && o < off + cs)
        {
            Some("overlapping other metadata")
        } else {
            None
        }
    }
}

/// Where [`Qcow2::map_in`] finds the L2 tables of a range.
pub(crate) trait MapSource {
    /// Whether the L2 table offsets it gives were checked already (against the
    /// limits the mapping is checked against).
    const CHECKED: bool;
    /// The L2 table offset of L1 index `l1_index` (0: none) and, with one, the
    /// table if at hand; `None`: not known here.
    fn l2_table(&mut self, l1_index: u64) -> Option<(u64, Option<&[u8]>)>;
}

impl MapSource for CacheGuard<'_> {
    const CHECKED: bool = false;
    fn l2_table(&mut self, l1_index: u64) -> Option<(u64, Option<&[u8]>)> {
        let st = &mut *self.0;
        let off = st.l1.get(l1_index as usize).copied().unwrap_or(0) & OFFSET_MASK;
        if off == 0 {
            return Some((0, None));
        }
        Some((off, st.l2.try_get(off).map(|e| &e.data[..])))
    }
}

/// A view copies only tables a mapping under the lock found valid.
impl MapSource for ViewState {
    const CHECKED: bool = true;
    #[inline]
    fn l2_table(&mut self, l1_index: u64) -> Option<(u64, Option<&[u8]>)> {
        self.table(l1_index).map(|(off, t)| (off, Some(t)))
    }
}

/// The state lock held by a caller that may change the state: releasing it
/// publishes a new mapping generation (see [`crate::view`]).
pub(crate) struct StateGuard<'a> {
    guard: MutexGuard<'a, State>,
    published: &'a Published,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.guard
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.guard
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        // Still under the lock: a view copied after this sees the new generation.
        self.published.release(self.guard.hdr.size);
    }
}

/// The state lock held by a caller that reads the state and looks tables up in
/// the metadata caches, or loads clean tables from the file into them: what the
/// metadata maps does not change, so releasing it publishes no new generation (see
/// "Generations" in [`crate::view`]). It gives no mutable access to the state
/// beyond those cache operations.
pub(crate) struct CacheGuard<'a>(MutexGuard<'a, State>);

impl std::ops::Deref for CacheGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.0
    }
}

impl CacheGuard<'_> {
    /// The cache statistics and the cache clean counter.
    fn stats(&self) -> CacheStats {
        let one = |c: &TableCache| TableCacheStats {
            entries: c.len() as u64,
            capacity: c.capacity() as u64,
            hits: c.hits,
            misses: c.misses,
            cleaned: c.cleaned,
        };
        CacheStats {
            l2: one(&self.l2),
            refcount: one(&self.rc),
            cleans: self.cleans,
        }
    }
}

/// An open qcow2 image.
///
/// All methods take `&self`; the image may be shared between threads when
/// `I` allows it. Internal locks are never held across an await.
pub struct Qcow2<I: QcowIo> {
    pub(crate) io: I,
    /// The external data file, if the image has one.
    pub(crate) data: Option<I>,
    pub(crate) g: Geometry,
    pub(crate) st: Mutex<State>,
    pub(crate) meta: AsyncLock,
    pub(crate) waits: WaitList,
    /// The cipher of guest data, for encrypted images (see [`crate::crypt`]).
    pub(crate) cipher: Option<std::sync::Arc<dyn crate::crypt::DataCipher>>,
    /// The mapping generation and size that lock-free readers look at.
    pub(crate) published: Published,
    /// The read views of the threads that map reads ([`Qcow2::map_cached_on`]).
    pub(crate) views: Box<[ReadView]>,
}

impl<I: QcowIo> Drop for Qcow2<I> {
    fn drop(&mut self) {
        let st = self.st.get_mut().unwrap_or_else(|p| p.into_inner());
        if st.writable
            && (!st.l2.dirty().is_empty()
                || !st.rc.dirty().is_empty()
                || !st.pending_frees.is_empty())
        {
            log::warn!(
                "qcow2: image dropped with unwritten metadata; call flush() or close() first"
            );
        }
    }
}

impl<I: QcowIo> std::fmt::Debug for Qcow2<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("geometry", &self.g)
            .finish_non_exhaustive()
    }
}

/// The statistics of one metadata cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableCacheStats {
    /// Tables cached now.
    pub entries: u64,
    /// Tables it holds at most (dirty ones may exceed it briefly).
    pub capacity: u64,
    /// Lookups that found their table.
    pub hits: u64,
    /// Lookups that had to read it.
    pub misses: u64,
    /// Tables dropped by periodic cleaning.
    pub cleaned: u64,
}

/// The statistics of the L2 and refcount block caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// The L2 table cache.
    pub l2: TableCacheStats,
    /// The refcount block cache.
    pub refcount: TableCacheStats,
    /// Periodic cleaning passes so far.
    pub cleans: u64,
}

/// Information about an open image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// 2 or 3.
    pub version: u32,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Lazy refcounts in use.
    pub lazy_refcounts: bool,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing file format.
    pub backing_format: Option<String>,
    /// Marked corrupt.
    pub corrupt: bool,
    /// Writable now.
    pub writable: bool,
    /// Compression type.
    pub compression: header::CompressionType,
    /// External data file name from the header.
    pub data_file: Option<String>,
    /// The data file is a consistent raw image.
    pub data_file_raw: bool,
    /// Where the LUKS header of an encrypted image is (offset, length).
    pub crypto_header: Option<(u64, u64)>,
}

impl<I: QcowIo> Qcow2<I> {
    /// Opens an image. Images with an external data file need
    /// [`Qcow2::open_with_data_file`].
    pub async fn open(io: I, opts: OpenOptions) -> Result<Self> {
        Self::open_with_data_file(io, None, opts).await
    }

    /// Opens an image whose guest data lives in an external data file
    /// (`data`, the file named by [`Header::data_file`] or given explicitly).
    /// `Data` extents then refer to offsets in that file.
    pub async fn open_with_data_file(io: I, data: Option<I>, opts: OpenOptions) -> Result<Self> {
        let file_len = io.len().await?;
        let mut first = vec![0u8; 4096];
        io.read_at(0, &mut first).await?;
        let cb = Header::peek_cluster_bits(&first)?;
        let cs = 1u64 << cb;
        if cs > first.len() as u64 {
            first.resize(cs as usize, 0);
            io.read_at(0, &mut first).await?;
        }
        let hdr = Header::parse(&first[..(cs.min(file_len.max(72))) as usize], file_len)?;
        let has_data_file = hdr.incompatible_features & incompat::DATA_FILE != 0;
        if has_data_file && data.is_none() {
            return Err(Error::Unsupported(format!(
                "the image keeps its data in an external data file ({}); open it with the data file",
                hdr.data_file.as_deref().unwrap_or("name not recorded")
            )));
        }
        if has_data_file && hdr.crypt_method != 0 {
            return Err(Error::Unsupported(
                "encrypted images with an external data file are not supported".into(),
            ));
        }
        let data = if has_data_file { data } else { None };
        if has_data_file && hdr.nb_snapshots > 0 {
            return Err(Error::Corrupt(
                "internal snapshots in an image with an external data file".into(),
            ));
        }
        let corrupt = hdr.incompatible_features & incompat::CORRUPT != 0;
        if corrupt && opts.writable {
            return Err(Error::Corrupt(
                "the image has the corrupt bit set; open it read-only or repair it".into(),
            ));
        }
        let g = Geometry::new(&hdr);
        // L1 table (bounded and inside the file by header validation).
        let mut l1b = vec![0u8; hdr.l1_size as usize * 8];
        io.read_at(hdr.l1_table_offset, &mut l1b).await?;
        let l1: Vec<u64> = l1b
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        let mut rtb = vec![0u8; (hdr.refcount_table_clusters as u64 * cs) as usize];
        io.debug_event(DebugEvent::ReftableLoad);
        io.read_at(hdr.refcount_table_offset, &mut rtb).await?;
        let rt: Vec<u64> = rtb
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        // Snapshot table.
        let (snapshots, snapshot_table_len) = if hdr.nb_snapshots > 0 {
            let max = snapshot::MAX_TABLE_BYTES.min(file_len - hdr.snapshots_offset);
            let mut sb = vec![0u8; max as usize];
            io.read_at(hdr.snapshots_offset, &mut sb).await?;
            let (s, used) = snapshot::parse_table(&sb, hdr.nb_snapshots, cs)?;
            (s, used as u64)
        } else {
            (Vec::new(), 0)
        };
        // Bitmaps: a stale extension (autoclear bit clear) is dropped, as QEMU
        // does; its clusters leak until `check -r leaks`.
        let mut hdr = hdr;
        let mut drop_stale_bitmaps = false;
        if hdr.bitmaps.is_some() && hdr.autoclear_features & autoclear::BITMAPS == 0 {
            log::warn!(
                "qcow2: a program lacking bitmap support modified this image, so all \
                 bitmaps are now considered inconsistent; some clusters may be leaked \
                 (run check -r leaks)"
            );
            hdr.bitmaps = None;
            drop_stale_bitmaps = true;
        }
        let bitmaps = match &hdr.bitmaps {
            Some(ext) => Self::read_bitmap_directory(&io, ext, cs, hdr.size, file_len)
                .await?
                .into_iter()
                .map(|entry| Slot {
                    inconsistent: entry.in_use(),
                    entry,
                })
                .collect(),
            None => Vec::new(),
        };
        let l2_bytes = opts.l2_cache_size.unwrap_or_else(|| {
            let need = hdr.size.div_ceil(g.l2_span()).max(1) * cs;
            need.min(32 << 20)
        });
        let rc_bytes = opts.refcount_cache_size.unwrap_or((4 * cs).max(256 << 10));
        let lazy = opts
            .lazy_refcounts
            .unwrap_or(hdr.compatible_features & compat::LAZY_REFCOUNTS != 0)
            && hdr.version >= 3;
        let dirty = hdr.incompatible_features & incompat::DIRTY != 0;
        let mut meta_clusters = std::collections::HashSet::new();
        for &e in l1.iter().chain(rt.iter()) {
            if e & OFFSET_MASK != 0 {
                meta_clusters.insert(e & OFFSET_MASK);
            }
        }
        for s in &snapshots {
            for c in 0..(s.l1_size as u64 * 8).div_ceil(cs) {
                meta_clusters.insert(s.l1_table_offset + c * cs);
            }
        }
        let st = State {
            l2_needs_data_sync: false,
            rc_unsynced: false,
            rc_event_owed: false,
            reserved: 0..0,
            reserve_next: 0,
            cleans: 0,
            free_byte_offset: 0,
            meta_clusters,
            l1,
            rt,
            l2: TableCache::new((l2_bytes / cs) as usize),
            rc: TableCache::new((rc_bytes / cs) as usize),
            writable: opts.writable,
            corrupt,
            locks: Vec::new(),
            next_lock_id: 1,
            pending_frees: Vec::new(),
            freed_clusters: None,
            pass_discard_snapshot: opts.pass_discard_snapshot,
            pass_discard_other: opts.pass_discard_other,
            free_hint: 0,
            high_water: file_len.div_ceil(cs) * cs,
            dirty_marked: dirty,
            lazy,
            epoch: 0,
            snapshots,
            snapshot_table_len,
            hdr,
            bitmaps,
        };
        let img = Qcow2 {
            io,
            data,
            g,
            published: Published::new(st.hdr.size),
            st: Mutex::new(st),
            meta: AsyncLock::default(),
            waits: WaitList::default(),
            cipher: None,
            views: (0..READ_VIEWS).map(|_| ReadView::default()).collect(),
        };
        if opts.writable {
            if dirty {
                if !opts.repair_dirty {
                    return Err(Error::Unsupported(
                        "image is dirty and repair was not allowed".into(),
                    ));
                }
                log::info!("qcow2: image was not closed cleanly; repairing refcounts");
                img.check(crate::check::Repair::All).await?;
                let _g = img.meta.lock().await;
                img.st().hdr.incompatible_features &= !incompat::DIRTY;
                img.write_header().await?;
                img.io.flush().await?;
                img.st().dirty_marked = false;
            }
            // Clear the autoclear bits we do not maintain (unknown ones, and
            // bitmaps' when there is no valid extension).
            let changed = {
                let mut st = img.st();
                let mut keep = autoclear::DATA_FILE_RAW;
                if st.hdr.bitmaps.is_some() {
                    keep |= autoclear::BITMAPS;
                }
                let old = st.hdr.autoclear_features;
                st.hdr.autoclear_features &= keep;
                old != st.hdr.autoclear_features
            };
            if changed || drop_stale_bitmaps {
                img.write_header().await?;
                img.io.flush().await?;
            }
            // Bitmaps being used by this open are in use in the image until
            // they are stored (or released).
            if !img.st().corrupt {
                img.check_bitmap_tables().await?;
                img.claim_bitmaps().await?;
            }
        }
        Ok(img)
    }

    /// The state, to change it (or to read it on a path that may also change it).
    pub(crate) fn st(&self) -> StateGuard<'_> {
        StateGuard {
            guard: self.st.lock().unwrap(),
            published: &self.published,
        }
    }

    /// The state, to read it and to look tables up in (or load them into) the
    /// caches: releasing it publishes nothing (see [`CacheGuard`]).
    pub(crate) fn st_read(&self) -> CacheGuard<'_> {
        CacheGuard(self.st.lock().unwrap())
    }

    /// The image's geometry.
    pub fn geometry(&self) -> Geometry {
        self.g
    }

    /// The I/O object of the image file.
    pub fn io(&self) -> &I {
        &self.io
    }

    /// Where `Data` extents live: the external data file if there is one,
    /// else the image file.
    pub fn data_io(&self) -> &I {
        self.data.as_ref().unwrap_or(&self.io)
    }

    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.data.is_some()
    }

    /// Whether the external data file is a consistent raw image (`data_file_raw`).
    pub fn data_file_raw(&self) -> bool {
        self.data.is_some() && self.st_read().hdr.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.published
            .size
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.st_read().hdr.clone()
    }

    /// Internal snapshots.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.st_read().snapshots.clone()
    }

    /// Summary information.
    pub fn info(&self) -> ImageInfo {
        let st = self.st_read();
        ImageInfo {
            size: st.hdr.size,
            cluster_size: self.g.cluster_size,
            version: st.hdr.version,
            refcount_bits: st.hdr.refcount_bits(),
            extended_l2: self.g.extended,
            lazy_refcounts: st.lazy,
            backing_file: st.hdr.backing_file.clone(),
            backing_format: st.hdr.backing_format.clone(),
            corrupt: st.corrupt,
            writable: st.writable && !st.corrupt,
            compression: st.hdr.compression_type,
            data_file: st.hdr.data_file.clone(),
            data_file_raw: st.hdr.autoclear_features & autoclear::DATA_FILE_RAW != 0,
            crypto_header: st.hdr.crypto_header,
        }
    }

    /// Drops the clean L2 and refcount cache entries that were not used since
    /// the previous call (QEMU's `cache-clean-interval`: the caller calls this
    /// from a timer). Dirty entries stay until they are written. Returns how
    /// many entries were dropped.
    ///
    /// The read views' copies are dropped too (see [`crate::view`]).
    pub fn clean_unused_cache_entries(&self) -> usize {
        for v in self.views.iter() {
            v.lock().reset(0, MapLimits::default());
        }
        let mut st = self.st();
        st.cleans += 1;
        st.l2.clean_unused() + st.rc.clean_unused()
    }

    /// The metadata caches' statistics.
    pub fn cache_stats(&self) -> CacheStats {
        let view_hits: u64 = self.views.iter().map(|v| v.lock().hits).sum();
        let mut stats = self.st_read().stats();
        stats.l2.hits += view_hits;
        stats
    }

    /// Marks the image corrupt (and read-only), writing the corrupt bit when
    /// the image was writable, and returns the error to report.
    pub(crate) async fn corrupt(&self, msg: String) -> Error {
        log::error!("qcow2: metadata corruption: {msg}; image marked corrupt");
        let write = {
            let mut st = self.st();
            let w = st.writable && !st.corrupt && st.hdr.version >= 3;
            st.corrupt = true;
            if w {
                st.hdr.incompatible_features |= incompat::CORRUPT;
            }
            w
        };
        if write {
            if let Err(e) = self.write_header().await {
                log::error!("qcow2: could not set the corrupt bit: {e}");
            }
            let _ = self.io.flush().await;
        }
        Error::Corrupt(msg)
    }

    /// Changes the backing file name and format the header records (QEMU's
    /// `bdrv_change_backing_file`: stream, commit and `change-backing-file`), and
    /// makes the header stable. `None` leaves the image without a backing file.
    pub async fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        let old = {
            let mut st = self.st();
            if !st.writable || st.corrupt {
                return Err(Error::ReadOnly);
            }
            let old = (st.hdr.backing_file.clone(), st.hdr.backing_format.clone());
            st.hdr.backing_file = name.map(str::to_owned);
            st.hdr.backing_format = format.filter(|_| name.is_some()).map(str::to_owned);
            if let Err(e) = st.hdr.to_bytes() {
                (st.hdr.backing_file, st.hdr.backing_format) = old;
                return Err(e.into());
            }
            old
        };
        let r = async {
            self.write_header().await?;
            self.io.flush().await?;
            Ok(())
        }
        .await;
        if r.is_err() {
            let mut st = self.st();
            (st.hdr.backing_file, st.hdr.backing_format) = old;
        }
        r
    }

    /// Rewrites the header cluster from the in-memory header.
    pub(crate) async fn write_header(&self) -> Result<()> {
        let b = self.st_read().hdr.to_bytes()?;
        self.io.write_at(0, &b).await?;
        Ok(())
    }

    /// Runs `f` on a cached table, loading it first if needed; `f` may change the
    /// table (releasing the lock then publishes a new generation).
    pub(crate) async fn with_table<R>(
        &self,
        kind: TableKind,
        off: u64,
        f: impl FnOnce(&mut CacheEntry) -> R,
    ) -> Result<R> {
        self.table_op(kind, off, || self.st(), f).await
    }

    /// [`with_table`](Self::with_table) for an `f` that only reads the table: the
    /// lookup and the load change no mapping, so they publish no new generation
    /// and leave the read views current (see "Generations" in [`crate::view`]).
    pub(crate) async fn read_table<R>(
        &self,
        kind: TableKind,
        off: u64,
        f: impl FnOnce(&CacheEntry) -> R,
    ) -> Result<R> {
        // The raw lock, as `CacheGuard` holds it: only the caches' counters, LRU
        // stamps and a clean load change under it.
        self.table_op(kind, off, || self.st.lock().unwrap(), |e| f(e))
            .await
    }

    /// Runs `f` on a cached table under `lock()`, loading it first if needed.
    async fn table_op<G: std::ops::DerefMut<Target = State>, R>(
        &self,
        kind: TableKind,
        off: u64,
        lock: impl Fn() -> G,
        f: impl FnOnce(&mut CacheEntry) -> R,
    ) -> Result<R> {
        let mut f = Some(f);
        loop {
            let epoch = {
                let mut st = lock();
                if let Some(e) = st.cache(kind).get(off) {
                    return Ok((f.take().unwrap())(e));
                }
                st.epoch
            };
            let mut buf = vec![0u8; self.g.cluster_size as usize];
            if kind == TableKind::L2 {
                self.io.debug_event(DebugEvent::L2Load);
            }
            self.io.read_at(off, &mut buf).await?;
            let mut st = lock();
            if st.cache(kind).contains(off) || st.epoch != epoch {
                continue;
            }
            let e = st.cache(kind).insert(off, buf, false);
            return Ok((f.take().unwrap())(e));
        }
    }

    /// Validates an L2 table offset from an L1 entry.
    pub(crate) async fn check_l2_offset(&self, l1_index: u64, l1e: u64) -> Result<u64> {
        let off = l1e & OFFSET_MASK;
        let bad = self.st_read().l2_offset_problem(&self.g, off);
        match bad {
            None => Ok(off),
            Some(why) => Err(self
                .corrupt(format!(
                    "L1 entry {l1_index} points to an L2 table {why} ({off:#x})"
                ))
                .await),
        }
    }

    /// Reads the (raw entry, bitmap) of guest cluster `gc` from a loaded L2
    /// table at `l2off`.
    pub(crate) async fn l2_get(&self, l2off: u64, idx: u64) -> Result<(u64, u64)> {
        let ext = self.g.extended;
        self.read_table(TableKind::L2, l2off, |e| {
            layout::l2_entry(&e.data, idx as usize, ext)
        })
        .await
    }

    /// The limits entries are validated against: the end of the file and the
    /// fixed metadata ranges.
    pub(crate) fn entry_limits(&self) -> (u64, [(u64, u64); 4]) {
        let st = self.st_read();
        (st.high_water, st.fixed_ranges(self.g.cluster_size))
    }

    /// Decodes and validates an L2 entry.
    pub(crate) async fn decode_entry(&self, guest: u64, raw: u64, bitmap: u64) -> Result<L2Entry> {
        let (hw, fixed) = self.entry_limits();
        match validate_entry(&self.g, guest, raw, bitmap, hw, &fixed) {
            Ok(e) => Ok(e),
            Err(why) => Err(self.corrupt(why).await),
        }
    }

    /// Maps a guest range to extents, split at cluster (or subcluster)
    /// boundaries where the kind changes and merged where contiguous.
    pub async fn map(&self, offset: u64, len: u64) -> Result<Extents> {
        match self.map_cached(offset, len) {
            Some(out) => Ok(out),
            None => self.map_loading(offset, len).await,
        }
    }

    /// [`map`](Self::map), loading L2 tables as needed and validating what it
    /// reads.
    pub(crate) async fn map_loading(&self, offset: u64, len: u64) -> Result<Extents> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        let mut out = Extents::new();
        let end = offset + len;
        let cs = self.g.cluster_size;
        let span = self.g.l2_span();
        let mut pos = offset;
        while pos < end {
            let l1i = pos / span;
            let chunk_end = end.min((l1i + 1) * span);
            let l1e = self.st_read().l1.get(l1i as usize).copied().unwrap_or(0);
            if l1e & OFFSET_MASK == 0 {
                push_extent(
                    &mut out,
                    Extent {
                        offset: pos,
                        len: chunk_end - pos,
                        kind: ExtentKind::Unallocated,
                    },
                );
                pos = chunk_end;
                continue;
            }
            let l2off = self.check_l2_offset(l1i, l1e).await?;
            // Copy the needed entries out under one lock.
            let first = (pos % span) / cs;
            let last = ((chunk_end - 1) % span) / cs;
            let ext = self.g.extended;
            let entries: Vec<(u64, u64)> = self
                .read_table(TableKind::L2, l2off, |e| {
                    (first..=last)
                        .map(|i| layout::l2_entry(&e.data, i as usize, ext))
                        .collect()
                })
                .await?;
            let (hw, fixed) = self.entry_limits();
            for (raw, bm) in entries {
                let cstart = self.g.cluster_start(pos);
                let cend = (cstart + cs).min(chunk_end);
                let entry = match validate_entry(&self.g, pos, raw, bm, hw, &fixed) {
                    Ok(e) => e,
                    Err(why) => return Err(self.corrupt(why).await),
                };
                self.push_cluster(&mut out, entry, pos, cend);
                pos = cend;
            }
        }
        Ok(out)
    }

    /// [`map`](Self::map) in one critical section, without waiting: `None` unless
    /// the range is in bounds and every L2 table it needs is cached and valid
    /// (then `map` loads the tables, or reports what is wrong).
    pub fn map_cached(&self, offset: u64, len: u64) -> Option<Extents> {
        let mut st = self.st_read();
        let limits = st.map_limits(self.g.cluster_size);
        self.map_in(&limits, &mut st, offset, len)
    }

    /// [`map_cached`](Self::map_cached) for a thread that has read view `view` (a
    /// slot below [`READ_VIEWS`] that no other thread uses meanwhile; `None`: it
    /// has none): answered from the view's copies without the state lock while no
    /// change was made since they were taken (see [`crate::view`]).
    pub fn map_cached_on(&self, view: Option<usize>, offset: u64, len: u64) -> Option<Extents> {
        let Some(view) = view.and_then(|i| self.views.get(i)) else {
            return self.map_cached(offset, len);
        };
        let mut v = view.lock();
        if v.is_current(self.published.gen()) {
            let limits = v.limits();
            if let Some(out) = self.map_in(&limits, &mut *v, offset, len) {
                v.hits += 1;
                return Some(out);
            }
        }
        let mut st = self.st_read();
        let limits = st.map_limits(self.g.cluster_size);
        let out = self.map_in(&limits, &mut st, offset, len)?;
        self.fill_view(&mut v, &st, offset, len);
        Some(out)
    }

    /// [`map`](Self::map) for a thread that has read view `view` (as
    /// [`map_cached_on`](Self::map_cached_on)): a range whose tables are not cached
    /// is mapped by loading them, and the view then copies them, so that a view
    /// fills also when the L2 cache is smaller than what the reads use.
    pub async fn map_on(&self, view: Option<usize>, offset: u64, len: u64) -> Result<Extents> {
        if let Some(out) = self.map_cached_on(view, offset, len) {
            return Ok(out);
        }
        let out = self.map_loading(offset, len).await?;
        if let Some(view) = view.and_then(|i| self.views.get(i)) {
            let mut v = view.lock();
            let st = self.st_read();
            self.fill_view(&mut v, &st, offset, len);
        }
        Ok(out)
    }

    /// Copies into view `v` the cached, valid L2 tables that map
    /// `offset..offset + len`, under the state lock `st`, if the view belongs to
    /// the current generation; else it starts at the current one and copies
    /// nothing (it copies tables only once the generation held still between two
    /// lookups).
    fn fill_view(&self, v: &mut ViewState, st: &State, offset: u64, len: u64) {
        // Generations change only under the lock.
        let gen = self.published.gen();
        let limits = st.map_limits(self.g.cluster_size);
        if !v.is_current(gen) {
            v.reset(gen, limits);
            return;
        }
        let span = self.g.l2_span();
        let l1_range = if len == 0 {
            1..1
        } else {
            offset / span..(offset + len - 1) / span + 1
        };
        for l1i in l1_range {
            if v.has(l1i) {
                continue;
            }
            let off = st.l1.get(l1i as usize).copied().unwrap_or(0) & OFFSET_MASK;
            if off == 0 {
                v.add(l1i, 0, &[]);
            } else if limits.l2_offset_problem(&self.g, off).is_none() {
                // Valid, as `MapSource::CHECKED` says of a view's tables.
                if let Some(e) = st.l2.peek(off) {
                    v.add(l1i, off, &e.data);
                }
            }
        }
    }

    /// The mapping of `offset..offset + len` from `src`, checked against `limits`:
    /// `None` unless it is in bounds and every L2 table it needs is at hand and
    /// valid.
    fn map_in<S: MapSource>(
        &self,
        limits: &MapLimits,
        src: &mut S,
        offset: u64,
        len: u64,
    ) -> Option<Extents> {
        let end = offset.checked_add(len)?;
        if end > limits.size {
            return None;
        }
        let cs = self.g.cluster_size;
        let span = self.g.l2_span();
        // Powers of two: shifts and masks rather than divisions.
        let (cluster_bits, span_bits) = (self.g.cluster_bits, span.trailing_zeros());
        let ext = self.g.extended;
        let mut out = Extents::new();
        let mut pos = offset;
        while pos < end {
            let l1i = pos >> span_bits;
            let chunk_end = end.min((l1i + 1) << span_bits);
            let (l2off, table) = src.l2_table(l1i)?;
            if l2off == 0 {
                push_extent(
                    &mut out,
                    Extent {
                        offset: pos,
                        len: chunk_end - pos,
                        kind: ExtentKind::Unallocated,
                    },
                );
                pos = chunk_end;
                continue;
            }
            if !S::CHECKED && limits.l2_offset_problem(&self.g, l2off).is_some() {
                return None;
            }
            let table = table?;
            while pos < chunk_end {
                let i = ((pos & (span - 1)) >> cluster_bits) as usize;
                let (raw, bm) = layout::l2_entry(table, i, ext);
                let entry =
                    validate_entry(&self.g, pos, raw, bm, limits.high_water, &limits.fixed).ok()?;
                let cend = (self.g.cluster_start(pos) + cs).min(chunk_end);
                self.push_cluster(&mut out, entry, pos, cend);
                pos = cend;
            }
        }
        Some(out)
    }

    fn push_cluster(&self, out: &mut Extents, entry: L2Entry, from: u64, to: u64) {
        let cstart = self.g.cluster_start(from);
        match entry {
            L2Entry::Compressed { raw } => {
                let (off, len, _, _) = self.g.compressed_range(raw);
                out.push(Extent {
                    offset: from,
                    len: to - from,
                    kind: ExtentKind::Compressed {
                        host_offset: off,
                        compressed_size: len,
                    },
                });
            }
            L2Entry::Normal {
                host, alloc, zero, ..
            } => {
                let ss = self.g.subcluster_size;
                let ss_bits = ss.trailing_zeros();
                let mut p = from;
                while p < to {
                    let sc = ((p - cstart) >> ss_bits) as u32;
                    let send = (cstart + (sc as u64 + 1) * ss).min(to);
                    let kind = if alloc >> sc & 1 != 0 {
                        ExtentKind::Data {
                            host_offset: host + (p - cstart),
                        }
                    } else if zero >> sc & 1 != 0 {
                        ExtentKind::Zero
                    } else {
                        ExtentKind::Unallocated
                    };
                    push_extent(
                        out,
                        Extent {
                            offset: p,
                            len: send - p,
                            kind,
                        },
                    );
                    p = send;
                }
            }
        }
    }

    /// Decompresses the cluster behind a `Compressed` extent and copies the
    /// extent's bytes into `buf` (`buf.len()` must equal `extent.len`).
    pub async fn read_compressed(&self, extent: &Extent, buf: &mut [u8]) -> Result<()> {
        let ExtentKind::Compressed {
            host_offset,
            compressed_size,
        } = extent.kind
        else {
            return Err(Error::Unsupported(
                "read_compressed on a non-compressed extent".into(),
            ));
        };
        let cluster = self
            .decompress_cluster(host_offset, compressed_size)
            .await?;
        let s = self.g.in_cluster(extent.offset) as usize;
        buf.copy_from_slice(&cluster[s..s + buf.len()]);
        Ok(())
    }

    pub(crate) async fn decompress_cluster(&self, host: u64, csize: u64) -> Result<Vec<u8>> {
        let cs = self.g.cluster_size;
        // A compressed cluster never needs more than cluster_size + 2 sectors.
        let csize = csize.min(cs + 1024);
        let mut input = vec![0u8; csize as usize];
        self.io.debug_event(DebugEvent::ReadCompressed);
        self.io.read_at(host, &mut input).await?;
        let mut out = vec![0u8; cs as usize];
        compress::decompress(self.g.compression, &input, &mut out)?;
        Ok(out)
    }

    /// Reads guest data into `buf` (copying; for tools and tests). Unallocated
    /// ranges come from `backing`.
    pub async fn read<B: crate::Backing>(
        &self,
        offset: u64,
        buf: &mut [u8],
        backing: &B,
    ) -> Result<()> {
        let cipher = self.data_cipher()?;
        for e in self.map(offset, buf.len() as u64).await? {
            let s = (e.offset - offset) as usize;
            let b = &mut buf[s..s + e.len as usize];
            match e.kind {
                ExtentKind::Data { host_offset } => match cipher {
                    None => self.data_io().read_at(host_offset, b).await?,
                    Some(c) => {
                        // Whole sectors (guest and host offsets agree within a
                        // cluster, so both are sector aligned together).
                        let sector = crate::crypt::SECTOR;
                        let start = host_offset - host_offset % sector;
                        let lead = (host_offset - start) as usize;
                        let end = (host_offset + e.len).next_multiple_of(sector);
                        let mut tmp = vec![0u8; (end - start) as usize];
                        self.data_io().read_at(start, &mut tmp).await?;
                        c.decrypt(start, &mut tmp)?;
                        b.copy_from_slice(&tmp[lead..lead + b.len()]);
                    }
                },
                ExtentKind::Zero => b.fill(0),
                ExtentKind::Unallocated => backing.read(e.offset, b).await?,
                ExtentKind::Compressed { .. } => self.read_compressed(&e, b).await?,
            }
        }
        Ok(())
    }
}

/// Appends an extent, merging it with the previous one when contiguous.
fn push_extent(out: &mut Extents, e: Extent) {
    if let Some(last) = out.last_mut() {
        if last.offset + last.len == e.offset {
            let merge = match (last.kind, e.kind) {
                (ExtentKind::Zero, ExtentKind::Zero)
                | (ExtentKind::Unallocated, ExtentKind::Unallocated) => true,
                (ExtentKind::Data { host_offset: a }, ExtentKind::Data { host_offset: b }) => {
                    a + last.len == b
                }
                _ => false,
            };
            if merge {
                last.len += e.len;
                return;
            }
        }
    }
    out.push(e);
}

/// Decodes an L2 entry and checks it against the end of the file and the
/// fixed metadata; the error says what is wrong.
pub(crate) fn validate_entry(
    g: &Geometry,
    guest: u64,
    raw: u64,
    bitmap: u64,
    hw: u64,
    fixed: &[(u64, u64); 4],
) -> std::result::Result<L2Entry, String> {
    let cs = g.cluster_size;
    let e = L2Entry::decode(g, raw, bitmap)
        .map_err(|err| format!("L2 entry for guest offset {guest:#x} is invalid: {err}"))?;
    let overlaps = |off: u64, len: u64| {
        fixed
            .iter()
            .any(|&(o, l)| l > 0 && off < o + l && o < off + len)
    };
    if g.data_file {
        return match e {
            L2Entry::Compressed { .. } => Err(format!("guest offset {guest:#x}: compressed cluster with an external data file")),
            L2Entry::Normal { host, .. } if e.is_mapped(g) && host != g.cluster_start(guest) => {
                Err(format!("guest offset {guest:#x}: data file offset {host:#x} differs from the guest offset"))
            }
            _ => Ok(e),
        };
    }
    match e {
        L2Entry::Normal { host, .. } if host != 0 => {
            if host >= hw {
                Err(format!(
                    "guest offset {guest:#x}: data cluster {host:#x} past the end of the file"
                ))
            } else if overlaps(host, cs) {
                Err(format!(
                    "guest offset {guest:#x}: data cluster {host:#x} overlaps metadata"
                ))
            } else {
                Ok(e)
            }
        }
        L2Entry::Compressed { raw } => {
            let (off, len, _, _) = g.compressed_range(raw);
            if raw & COPIED != 0 {
                Err(format!(
                    "guest offset {guest:#x}: compressed cluster with the COPIED flag"
                ))
            } else if off + len > hw + 512 || off < cs {
                Err(format!(
                    "guest offset {guest:#x}: compressed cluster at {off:#x} out of the file"
                ))
            } else {
                Ok(e)
            }
        }
        _ => Ok(e),
    }
}

//! The `qcow2` format driver: the `qcow` crate's image (metadata) over the `file`
//! child, with a `backing` child for unallocated ranges.
//!
//! Guest data of allocated clusters moves zero-copy: the driver asks the image where
//! a range lives ([`qcow::Qcow2::map`]) and reads the guest's own buffers straight
//! from the file node at those host offsets. Zero extents are filled here, unallocated
//! ones come from the backing node (or read as zeroes), compressed clusters are
//! inflated through a bounce buffer.
//!
//! Writes ask the image for host clusters ([`qcow::Qcow2::allocate`]: reserved with
//! their refcounts, copy-on-write of partial clusters done by the image), write the
//! guest's buffers straight to the file node there, then link the clusters
//! ([`qcow::Qcow2::commit`]). Flushes write the image's dirty metadata in dependency
//! order and then flush the file.
//!
//! Encrypted images (`encrypt.format=luks`, [`encryption`]) are the exception to
//! zero-copy: their data goes through bounce buffers, decrypted after reads and
//! encrypted before writes, with sector IVs from host offsets.

use crate::aio::iovec::{AlignedBuf, IoVec};
use crate::aio::LocalBoxFuture;
use crate::driver::Driver;
use crate::drivers::luks;
use crate::edge::Edge;
use crate::error::{BlockError, Result};
use crate::format_info::{DriverImageInfo, ImageInfoSpecific, Qcow2Info};
use crate::node::Node;
use crate::periodic::{self, Periodic};
use crate::persistent_bitmaps::{le_to_words, words_to_le, PersistentBitmap};
use crate::snapshot::{NewSnapshot, SnapshotInfo};
use crate::stats::{BlockStatsSpecific, BlockStatsSpecificQcow2};
use arc_swap::ArcSwapOption;
use qcow::io::QcowIo;
use qcow::{Backing, Extent, ExtentKind, Extents, OpenOptions, Qcow2};
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod create;
pub mod encryption;
mod options;

use encryption::SECTOR;

pub use create::create;
pub use options::{Qcow2Options, DEFAULT_CACHE_CLEAN_INTERVAL};

/// The table row of `qcow2`.
pub(crate) const ENTRY: super::DriverEntry = super::DriverEntry {
    names: &["qcow2"],
    kind: super::Kind::Format,
    parse: options::parse,
    create: Some(create::blockdev_create),
    reopen_mutable: &[
        "lazy-refcounts",
        "l2-cache-size",
        "l2-cache-entry-size",
        "refcount-cache-size",
        "cache-size",
        "cache-clean-interval",
        "pass-discard-request",
        "pass-discard-snapshot",
        "pass-discard-other",
        "overlap-check",
    ],
};

/// The qcow crate's I/O on the `file` child node.
pub struct NodeIo {
    node: Arc<Node>,
    /// Serialises growing the file, so that concurrent writers never shrink it.
    grow: Arc<Mutex<()>>,
}

impl NodeIo {
    pub fn new(node: Arc<Node>) -> Self {
        NodeIo {
            node,
            grow: Arc::new(Mutex::new(())),
        }
    }

    /// Makes the file at least `end` bytes long.
    fn ensure_len(&self, end: u64) -> std::result::Result<(), BlockError> {
        if end <= self.node.size() {
            return Ok(());
        }
        let _g = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        if end > self.node.size() {
            self.node.resize(end)?;
        }
        Ok(())
    }

    /// Writes `iov` at `offset`, past the end of the file if need be: files grow
    /// by the write itself (no truncate, which would take the inode lock on the
    /// iothread for every new cluster); other nodes are resized first.
    async fn write(&self, offset: u64, iov: IoVec) -> std::result::Result<(), BlockError> {
        if self.node.driver().grows_on_write() {
            self.node.write_growing(offset, iov).await
        } else {
            self.ensure_len(offset + iov.len())?;
            self.node.write(offset, iov, false).await
        }
    }
}

/// Reads `buf.len()` bytes of `node` at `offset` through an owned bounce buffer
/// (the kernel may still write into it if the future is dropped); zeroes past the
/// end.
async fn read_node(node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let n = (buf.len() as u64).min(node.size().saturating_sub(offset)) as usize;
    if n > 0 {
        let iov = IoVec::from_buf(Arc::new(AlignedBuf::zeroed(n, 4096)));
        node.read(offset, iov.clone()).await.map_err(to_io)?;
        iov.copy_to_slice(0, &mut buf[..n]);
    }
    buf[n..].fill(0);
    Ok(())
}

/// The backing node as the image's copy-on-write source.
struct NodeBacking(Option<Arc<Node>>);

impl Backing for NodeBacking {
    async fn read(&self, guest_offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match &self.0 {
            Some(node) => read_node(node, guest_offset, buf).await,
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn present(&self) -> bool {
        self.0.is_some()
    }

    /// Nothing allocated in `guest_offset..+len` anywhere down the chain.
    async fn reads_as_zero(&self, guest_offset: u64, len: u64) -> bool {
        let Some(mut node) = self.0.clone() else {
            return true;
        };
        loop {
            match node.driver().is_allocated(guest_offset, len).await {
                Ok((false, n)) if n >= len => {}
                _ => return false,
            }
            match node.backing() {
                Some(b) => node = b,
                None => return true,
            }
        }
    }
}

fn to_io(e: BlockError) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl QcowIo for NodeIo {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = io::Result<()>> {
        read_node(&self.node, offset, buf)
    }

    async fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let bounce = Arc::new(AlignedBuf::zeroed(buf.len(), 4096));
        let iov = IoVec::from_buf(bounce);
        iov.copy_from_slice(0, buf);
        self.write(offset, iov).await.map_err(to_io)
    }

    async fn flush(&self) -> io::Result<()> {
        self.node.flush().await.map_err(to_io)
    }

    async fn flush_unchecked(&self) -> io::Result<()> {
        self.node.flush_unchecked().await.map_err(to_io)
    }

    fn len(&self) -> impl Future<Output = io::Result<u64>> {
        std::future::ready(Ok(self.node.size()))
    }

    fn set_len(&self, len: u64) -> impl Future<Output = io::Result<()>> {
        let _g = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        std::future::ready(self.node.resize(len).map_err(to_io))
    }

    async fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.ensure_len(offset + len).map_err(to_io)?;
        self.node.allocate(offset, len).await.map_err(to_io)
    }

    /// Through the file node, which passes it on only with `discard=unmap`, as
    /// QEMU's file nodes do.
    async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.node.discard(offset, len).await.map_err(to_io)
    }

    /// A blkdebug file node sees every request.
    fn watches_requests(&self) -> bool {
        self.node.driver().takes_debug_events()
    }

    async fn write_zeroes_request(&self, offset: u64, len: u64) -> io::Result<()> {
        self.ensure_len(offset + len).map_err(to_io)?;
        self.node
            .write_zeroes(offset, len, false, false)
            .await
            .map_err(to_io)
    }

    /// On the file node, as QEMU's qcow2 raises its events on `bs->file`
    /// (one branch unless a blkdebug node is there).
    #[inline]
    fn debug_event(&self, event: qcow::DebugEvent) {
        self.node.debug_event(event.name());
    }
}

/// The driver's own options (what the image itself does not take).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qcow2DriverOptions {
    /// Punch the host ranges that discards free (`pass-discard-request`).
    pub pass_discard: bool,
    /// Drop metadata cache entries unused for this long (`cache-clean-interval`);
    /// zero: never.
    pub cache_clean_interval: Duration,
}

pub struct Qcow2Driver {
    image: Arc<Qcow2<NodeIo>>,
    /// The `file` child (the image's own I/O holds its node too).
    file_edge: Arc<Edge>,
    file: Arc<Node>,
    /// The external data file, if the image has one.
    data_edge: Option<Arc<Edge>>,
    data: Option<Arc<Node>>,
    /// The `backing` child; replaced by stream, commit and snapshots.
    backing: ArcSwapOption<Edge>,
    writable: bool,
    /// Unit of zero writes the image can do without data (a subcluster).
    zero_align: u64,
    /// Punch the host ranges that discards free (`pass-discard-request`).
    pass_discard: bool,
    /// The periodic cache cleaning, if `cache-clean-interval` is not 0.
    cache_cleaner: Option<Periodic>,
    node_name: String,
    /// `BLOCK_IMAGE_CORRUPTED` was raised (once per open, as QEMU).
    corrupt_reported: AtomicBool,
    /// The data cipher of an encrypted image, and its `encrypt` info.
    crypt: Option<encryption::Unlocked>,
}

/// A failed snapshot operation: the image's message, with its errno (ENOENT,
/// EEXIST, ENOTSUP...) for the caller's policy and texts.
fn snapshot_error(e: qcow::Error) -> BlockError {
    log::warn!("qcow2: snapshot: {e}");
    BlockError::Snapshot {
        errno: e.errno(),
        message: format!("qcow2: {e}"),
    }
}

fn image_error(e: qcow::Error) -> BlockError {
    match e {
        qcow::Error::Io(source) => BlockError::io("qcow2", source),
        qcow::Error::Unsupported(what) => {
            log::debug!("qcow2: unsupported: {what}");
            BlockError::Unsupported("this qcow2 operation")
        }
        other => BlockError::Graph(format!("qcow2: {other}")),
    }
}

/// A refused or failed bitmap operation: the image's message.
fn bitmap_error(e: qcow::Error) -> BlockError {
    match e {
        qcow::Error::Io(source) => BlockError::io("qcow2", source),
        other => BlockError::Graph(other.to_string()),
    }
}

impl Qcow2Driver {
    /// What `classify` says of the extent at `offset`, and for how many bytes it says
    /// the same (the following extents merged), from a map of at most [`MAX_MAP`]
    /// bytes (`empty` when the map is empty).
    async fn map_run<T: PartialEq>(
        &self,
        offset: u64,
        len: u64,
        empty: T,
        classify: impl Fn(&ExtentKind) -> T,
    ) -> Result<(T, u64)> {
        let len = len.min(MAX_MAP);
        let extents = self
            .image
            .map(offset, len)
            .await
            .map_err(|e| self.io_error(e))?;
        let Some(first) = extents.first() else {
            return Ok((empty, len));
        };
        let answer = classify(&first.kind);
        let n: u64 = extents
            .iter()
            .take_while(|e| classify(&e.kind) == answer)
            .map(|e| e.len)
            .sum();
        Ok((answer, n.max(1).min(len)))
    }

    /// An image error during I/O: the request fails with the error's errno (ENOSPC,
    /// EROFS, EIO...), so that error policies see what happened; ENOTSUP lets the
    /// generic path fall back (zero writes become data writes). The first
    /// corruption found raises `BLOCK_IMAGE_CORRUPTED`, as QEMU does.
    fn io_error(&self, e: qcow::Error) -> BlockError {
        let errno = e.errno();
        if errno == libc::ENOTSUP {
            log::debug!("qcow2: unsupported: {e}");
            return BlockError::Unsupported("this qcow2 operation");
        }
        log::warn!("qcow2: {e}");
        if let qcow::Error::Corrupt(msg) = &e {
            if !self.corrupt_reported.swap(true, Ordering::Relaxed) {
                crate::events::emit(crate::events::BlockEvent::ImageCorrupted(
                    crate::events::ImageCorrupted {
                        device: String::new(),
                        node_name: self.node_name.clone(),
                        msg: format!("{msg}; further corruption events will be suppressed"),
                        fatal: true,
                    },
                ));
            }
        }
        BlockError::io("qcow2", io::Error::from_raw_os_error(errno))
    }

    /// Names the node, for the events it raises.
    pub fn set_node_name(&mut self, name: &str) {
        self.node_name = name.to_string();
    }

    /// The external data file name the image header gives, if any.
    pub fn header_data_file(file: &Arc<Node>) -> Result<Option<String>> {
        let io = NodeIo::new(file.clone());
        let size = file.size();
        let header = crate::aio::uring::block_on(async move {
            let mut buf = vec![0u8; (size as usize).clamp(512, 65536)];
            io.read_at(0, &mut buf).await.map(|()| buf)
        })
        .map_err(|e| BlockError::io("qcow2 header", e))?;
        Ok(qcow::Header::parse(&header, size)
            .ok()
            .and_then(|h| h.data_file))
    }

    /// Opens the image on `file` (from the control thread: it waits for the header
    /// and tables it reads).
    pub fn open(
        file_edge: Arc<Edge>,
        data_edge: Option<Arc<Edge>>,
        opts: OpenOptions,
        driver_opts: Qcow2DriverOptions,
        encrypt: Option<&encryption::EncryptOptions>,
        secrets: &crate::secret::Secrets,
    ) -> Result<Qcow2Driver> {
        let file = file_edge.node_arc();
        let data = data_edge.as_ref().map(|e| e.node_arc());
        let io = NodeIo::new(file.clone());
        let data_io = data.clone().map(NodeIo::new);
        let writable = opts.writable;
        let mut image = crate::aio::uring::block_on(Qcow2::open_with_data_file(io, data_io, opts))
            .map_err(image_error)?;
        let crypt = match encryption::unlock(&file, image.crypto_header(), encrypt, secrets) {
            Ok(c) => c,
            Err(e) => {
                // Nothing was written through the image: close it quietly.
                let image = Arc::new(image);
                let _ = crate::aio::uring::block_on(async move { image.close().await });
                return Err(e);
            }
        };
        if let Some(c) = &crypt {
            image.set_cipher(c.cipher.clone());
        }
        let image = Arc::new(image);
        let info = image.info();
        let zero_align = if info.extended_l2 {
            info.cluster_size / 32
        } else {
            info.cluster_size
        };
        let interval = driver_opts.cache_clean_interval;
        // The timer holds the image weakly: it never keeps a closed image alive.
        let cache_cleaner = (!interval.is_zero()).then(|| {
            let weak = Arc::downgrade(&image);
            periodic::every(interval, move || {
                if let Some(image) = weak.upgrade() {
                    let n = image.clean_unused_cache_entries();
                    if n > 0 {
                        log::debug!("qcow2: dropped {n} idle metadata cache entries");
                    }
                }
            })
        });
        Ok(Qcow2Driver {
            image,
            file_edge,
            file,
            data_edge,
            data,
            backing: ArcSwapOption::empty(),
            writable: writable && info.writable,
            zero_align,
            pass_discard: driver_opts.pass_discard,
            cache_cleaner,
            node_name: String::new(),
            corrupt_reported: AtomicBool::new(false),
            crypt,
        })
    }

    /// The data cipher, if the image is encrypted.
    fn cipher(&self) -> Option<&encryption::LuksCipher> {
        self.crypt.as_ref().map(|c| &*c.cipher)
    }

    async fn write_data(&self, offset: u64, iov: IoVec) -> Result<()> {
        let backing = NodeBacking(self.backing_node());
        let alloc = self
            .image
            .allocate(offset, iov.len(), &backing)
            .await
            .map_err(|e| self.io_error(e))?;
        self.file.debug_event("write_aio");
        for r in alloc.ranges() {
            let part = iov.slice(r.guest_offset - offset, r.len);
            let written = match self.cipher() {
                // Sector IVs from host offsets, as QEMU.
                Some(c) => {
                    let io = self.image.data_io();
                    luks::write_encrypted(r.host_offset / SECTOR, c.sectors(), &part, |pos, buf| {
                        io.write(r.host_offset + pos, buf)
                    })
                    .await
                }
                None => self.image.data_io().write(r.host_offset, part).await,
            };
            if let Err(e) = written {
                self.image.abort(alloc).await;
                return Err(e);
            }
        }
        self.image.commit(alloc).await.map_err(|e| self.io_error(e))
    }

    /// Where guest data lives: the external data file, or the image file.
    fn data_node(&self) -> &Arc<Node> {
        self.data.as_ref().unwrap_or(&self.file)
    }

    async fn zero(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let end = offset + len;
        let aligned = offset.is_multiple_of(self.zero_align)
            && (end.is_multiple_of(self.zero_align) || end == self.image.size());
        if !aligned {
            // The generic path writes a zero buffer instead.
            return Err(BlockError::Unsupported("unaligned qcow2 zero writes"));
        }
        self.image
            .write_zeroes(offset, len, may_unmap)
            .await
            .map_err(|e| self.io_error(e))
    }

    async fn discard_range(&self, offset: u64, len: u64) -> Result<()> {
        let freed = self.image.discard(offset, len).await.map_err(image_error)?;
        if self.pass_discard {
            for (host, n) in freed {
                // Advisory, as discard itself.
                let _ = self.file.discard(host, n).await;
            }
        }
        Ok(())
    }

    /// The backing file name and format the image header names.
    pub fn header_backing(&self) -> (Option<String>, Option<String>) {
        let info = self.image.info();
        (info.backing_file, info.backing_format)
    }

    /// The backing node now, if any.
    fn backing_node(&self) -> Option<Arc<Node>> {
        self.backing.load().as_ref().map(|e| e.node_arc())
    }

    /// Reads one unallocated extent from the backing node (zeroes beyond its end or
    /// without one).
    async fn read_backing(&self, e: &Extent, part: IoVec) -> Result<()> {
        let Some(b) = self.backing_node() else {
            part.fill_zero();
            return Ok(());
        };
        self.file.debug_event("read_backing_aio");
        let avail = b.size().saturating_sub(e.offset).min(e.len);
        if avail < e.len {
            part.slice(avail, e.len - avail).fill_zero();
        }
        if avail > 0 {
            b.read(e.offset, part.slice(0, avail)).await?;
        }
        Ok(())
    }

    /// Reads through the extents `offset..+iov.len()` maps to: `mapped` if the
    /// caller has them already (so that the cache counts one lookup per read).
    /// Tables loaded here go into the thread's read view too.
    async fn read_extents(&self, offset: u64, iov: IoVec, mapped: Option<Extents>) -> Result<()> {
        let extents = match mapped {
            Some(extents) => extents,
            None => self
                .image
                .map_on(crate::stats::own_shard(), offset, iov.len())
                .await
                .map_err(|e| self.io_error(e))?,
        };
        for e in extents {
            let part = iov.slice(e.offset - offset, e.len);
            match e.kind {
                ExtentKind::Data { host_offset } => {
                    self.file.debug_event("read_aio");
                    match self.cipher() {
                        Some(c) => {
                            let node = self.data_node();
                            let sector = host_offset / SECTOR;
                            luks::read_decrypted(node, host_offset, sector, c.sectors(), &part)
                                .await?
                        }
                        None => self.data_node().read(host_offset, part).await?,
                    }
                }
                ExtentKind::Zero => part.fill_zero(),
                ExtentKind::Unallocated => self.read_backing(&e, part).await?,
                ExtentKind::Compressed { .. } => {
                    let mut buf = vec![0u8; e.len as usize];
                    self.image
                        .read_compressed(&e, &mut buf)
                        .await
                        .map_err(|e| self.io_error(e))?;
                    part.copy_from_slice(0, &buf);
                }
            }
        }
        Ok(())
    }
}

// Each thread with a statistics shard of its own has a read view of its own.
const _: () = assert!(crate::stats::OWN_SHARDS <= qcow::READ_VIEWS);

/// The most a block-status or allocation query maps per call: callers ask again from
/// where the answer ends, so mapping all of a long range each time would be
/// quadratic on a fragmented image.
const MAX_MAP: u64 = 256 << 20;

impl Driver for Qcow2Driver {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }

    fn size(&self) -> u64 {
        self.image.size()
    }

    fn children(&self) -> Vec<Arc<Edge>> {
        let mut c = vec![self.file_edge.clone()];
        if let Some(b) = &*self.backing.load() {
            c.push(b.clone());
        }
        if let Some(d) = &self.data_edge {
            c.push(d.clone());
        }
        c
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn set_backing(&self, backing: Option<Arc<Edge>>) -> Result<()> {
        self.backing.store(backing);
        Ok(())
    }

    fn change_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        let image = self.image.clone();
        let (name, format) = (name.map(str::to_owned), format.map(str::to_owned));
        crate::aio::uring::block_on(async move {
            image
                .set_backing_file(name.as_deref(), format.as_deref())
                .await
        })
        .map_err(|e| match e {
            qcow::Error::ReadOnly => BlockError::Graph("Image is read-only".into()),
            e => image_error(e),
        })
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'_, Result<(crate::block_status::Status, u64)>> {
        use crate::block_status::Status;
        #[derive(PartialEq)]
        enum Kind {
            Data,
            Zero,
            Unallocated,
        }
        Box::pin(async move {
            let (kind, n) = self
                .map_run(offset, len, Kind::Data, |kind| match kind {
                    ExtentKind::Data { .. } | ExtentKind::Compressed { .. } => Kind::Data,
                    ExtentKind::Zero => Kind::Zero,
                    ExtentKind::Unallocated => Kind::Unallocated,
                })
                .await?;
            let status = match kind {
                Kind::Data => Status::Data,
                Kind::Zero => Status::Zero,
                Kind::Unallocated => Status::Unallocated,
            };
            Ok((status, n))
        })
    }

    fn is_allocated(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<(bool, u64)>> {
        Box::pin(self.map_run(offset, len, true, |kind| {
            !matches!(kind, ExtentKind::Unallocated)
        }))
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }

    fn truncate(&self, size: u64) -> Result<()> {
        if !size.is_multiple_of(512) {
            return Err(BlockError::Graph(
                "The new size must be a multiple of 512".into(),
            ));
        }
        let image = self.image.clone();
        crate::aio::uring::block_on(async move { image.resize(size).await }).map_err(|e| match e {
            // QEMU's text for a bitmap that cannot follow the resize.
            qcow::Error::Bitmap(b) => BlockError::Graph(b.to_string()),
            other => image_error(other),
        })
    }

    fn filename(&self) -> String {
        self.file.driver().filename()
    }

    fn close(&self) -> Result<()> {
        self.close_image()
    }

    fn actual_size(&self) -> Option<u64> {
        self.file.driver().actual_size()
    }

    fn driver_specific_stats(&self) -> Option<BlockStatsSpecific> {
        // QEMU has no qcow2 statistics; these are vubd's own (`x-`).
        let s = self.image.cache_stats();
        Some(BlockStatsSpecific::Qcow2(BlockStatsSpecificQcow2 {
            x_l2_cache_entries: s.l2.entries,
            x_l2_cache_hits: s.l2.hits,
            x_l2_cache_misses: s.l2.misses,
            x_l2_cache_cleaned: s.l2.cleaned,
            x_refcount_cache_entries: s.refcount.entries,
            x_refcount_cache_hits: s.refcount.hits,
            x_refcount_cache_misses: s.refcount.misses,
            x_refcount_cache_cleaned: s.refcount.cleaned,
            x_cache_cleans: s.cleans,
        }))
    }

    fn image_info(&self) -> DriverImageInfo {
        let info = self.image.info();
        let encrypt = self
            .crypt
            .as_ref()
            .map(|c| c.info.lock().unwrap_or_else(|e| e.into_inner()).clone());
        let specific = Qcow2Info::new(&info, &self.image.bitmaps(), encrypt);
        DriverImageInfo {
            cluster_size: Some(info.cluster_size),
            encrypted: self.crypt.is_some(),
            format_specific: Some(ImageInfoSpecific::Qcow2(specific)),
            backing_filename: info.backing_file,
            backing_filename_format: info.backing_format,
        }
    }

    fn load_persistent_bitmaps(&self) -> Result<Vec<PersistentBitmap>> {
        let image = self.image.clone();
        let loaded = crate::aio::uring::block_on(async move { image.load_bitmaps().await })
            .map_err(image_error)?;
        Ok(loaded
            .into_iter()
            .map(|b| PersistentBitmap {
                name: b.name,
                granularity: b.granularity,
                enabled: b.enabled,
                inconsistent: b.inconsistent,
                bits: words_to_le(&b.words),
            })
            .collect())
    }

    fn store_persistent_bitmaps(&self, list: &[PersistentBitmap]) -> Result<()> {
        if list.is_empty() {
            return Ok(());
        }
        let size = self.image.size();
        let owned: Vec<(String, u64, bool, Vec<u64>)> = list
            .iter()
            .map(|b| {
                let mut w = le_to_words(&b.bits);
                w.resize(size.div_ceil(b.granularity).div_ceil(64) as usize, 0);
                (b.name.clone(), b.granularity, b.enabled, w)
            })
            .collect();
        let image = self.image.clone();
        crate::aio::uring::block_on(async move {
            let stores: Vec<qcow::StoreBitmap<'_>> = owned
                .iter()
                .map(|(name, granularity, enabled, words)| qcow::StoreBitmap {
                    name,
                    granularity: *granularity,
                    enabled: *enabled,
                    words,
                })
                .collect();
            image.store_bitmaps(&stores).await
        })
        .map_err(bitmap_error)
    }

    fn remove_persistent_bitmap(&self, name: &str) -> Result<()> {
        if !self.image.bitmaps().iter().any(|b| b.name == name) {
            return Ok(());
        }
        let image = self.image.clone();
        let name = name.to_string();
        crate::aio::uring::block_on(async move { image.remove_bitmap(&name).await })
            .map_err(bitmap_error)
    }

    fn mark_bitmaps_in_use(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let image = self.image.clone();
        crate::aio::uring::block_on(async move { image.claim_bitmaps().await })
            .map_err(bitmap_error)
    }

    fn can_store_new_bitmap(&self, name: &str, granularity: u64) -> Result<()> {
        let info = self.image.info();
        if info.version < 3 {
            return Err(BlockError::Graph(
                "Cannot store dirty bitmaps in qcow2 v2 files".into(),
            ));
        }
        qcow::bitmaps::check_new(name, granularity, info.size, info.cluster_size).map_err(|e| {
            match e {
                qcow::BitmapError::Store { why, .. } => BlockError::Graph(why),
                other => BlockError::Graph(other.to_string()),
            }
        })?;
        let n = self.image.bitmaps().len();
        if n + 1 > qcow::bitmaps::MAX_BITMAPS as usize {
            return Err(BlockError::Graph(
                "Maximum number of persistent bitmaps is already reached".into(),
            ));
        }
        Ok(())
    }

    fn snapshot_list(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(self
            .image
            .snapshots()
            .iter()
            .map(SnapshotInfo::from)
            .collect())
    }

    fn snapshot_create(&self, new: &NewSnapshot) -> Result<SnapshotInfo> {
        let image = self.image.clone();
        let new = new.clone();
        crate::aio::uring::block_on(async move { image.snapshot_create_with(new).await })
            .map(|s| SnapshotInfo::from(&s))
            .map_err(snapshot_error)
    }

    fn snapshot_delete(&self, id: Option<&str>, name: Option<&str>) -> Result<SnapshotInfo> {
        let image = self.image.clone();
        let (id, name) = (id.map(str::to_owned), name.map(str::to_owned));
        crate::aio::uring::block_on(async move {
            image
                .snapshot_delete_matching(id.as_deref(), name.as_deref())
                .await
        })
        .map(|s| SnapshotInfo::from(&s))
        .map_err(snapshot_error)
    }

    fn read<'a>(&'a self, offset: u64, iov: IoVec) -> LocalBoxFuture<'a, Result<()>> {
        // The usual case, a range in one run of host clusters whose L2 table is
        // cached: straight to the file, as a raw image would. The thread's own read
        // view answers without the image's lock while the metadata stays unchanged.
        let mapped = self
            .image
            .map_cached_on(crate::stats::own_shard(), offset, iov.len());
        if let Some(extents) = &mapped {
            match &extents[..] {
                [Extent {
                    kind: ExtentKind::Data { host_offset },
                    ..
                }] if self.crypt.is_none() => {
                    self.file.debug_event("read_aio");
                    return Box::pin(self.data_node().read(*host_offset, iov));
                }
                // Unallocated within the backing node: the backing node's read.
                [Extent {
                    kind: ExtentKind::Unallocated,
                    ..
                }] => {
                    if let Some(b) = self.backing.load().as_ref() {
                        if offset + iov.len() <= b.node().size() {
                            let b = b.node_arc();
                            self.file.debug_event("read_backing_aio");
                            return Box::pin(async move { b.read(offset, iov).await });
                        }
                    }
                }
                _ => {}
            }
        }
        Box::pin(self.read_extents(offset, iov, mapped))
    }

    fn write<'a>(&'a self, offset: u64, iov: IoVec, _fua: bool) -> LocalBoxFuture<'a, Result<()>> {
        // FUA is emulated by the generic path (a flush after the write), which also
        // makes the metadata of the write stable.
        Box::pin(self.write_data(offset, iov))
    }

    fn flush(&self) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move { self.image.flush().await.map_err(|e| self.io_error(e)) })
    }

    fn write_compressed<'a>(
        &'a self,
        offset: u64,
        data: Vec<u8>,
    ) -> Option<LocalBoxFuture<'a, Result<()>>> {
        Some(Box::pin(async move {
            self.image
                .write_compressed(offset, &data)
                .await
                .map_err(|e| self.io_error(e))
        }))
    }

    /// Not on encrypted images (QEMU's compressed clusters are never encrypted).
    fn supports_compressed_writes(&self) -> bool {
        self.crypt.is_none()
    }

    fn is_encrypted(&self) -> bool {
        self.crypt.is_some()
    }

    fn amend_encryption(
        &self,
        request: &luks::keyslots::AmendRequest,
        secrets: &crate::secret::Secrets,
        force: bool,
    ) -> Result<()> {
        let Some(c) = &self.crypt else {
            return Err(BlockError::Graph(
                "image is not encrypted, can't amend".into(),
            ));
        };
        c.amend(&self.file, request, secrets, force)
    }

    /// Encrypted data goes by whole sectors, as QEMU's `request_alignment` says.
    fn own_limits(&self) -> crate::limits::Limits {
        match self.crypt {
            Some(_) => crate::limits::Limits {
                request_alignment: SECTOR as u32,
                ..Default::default()
            },
            None => Default::default(),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(self.discard_range(offset, len))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(self.zero(offset, len, may_unmap))
    }
}

impl Qcow2Driver {
    /// A clean close: metadata written back (refcounts too), the dirty bit cleared.
    fn close_image(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let image = self.image.clone();
        crate::aio::uring::block_on(async move { image.close().await }).map_err(image_error)
    }
}

impl Drop for Qcow2Driver {
    fn drop(&mut self) {
        // Stop the cleaning first (waiting for a pass in progress), so that this is
        // the last owner of the image.
        self.cache_cleaner.take();
        if let Err(e) = self.close_image() {
            log::error!("qcow2: closing the image failed: {e}");
        }
    }
}

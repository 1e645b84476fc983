//! The `luks` format driver: a LUKS1 header and key slots ([`header`], [`volume`])
//! over data encrypted per 512-byte sector ([`crypto`]), as QEMU's `block/crypto.c`
//! with `crypto/block-luks.c`.
//!
//! Data path: requests run on the iothread that submits them. A read goes into a
//! bounce buffer leased from the thread's bounded budget and is decrypted there, the
//! cipher's last pass writing the plaintext to the caller's memory; a write is
//! encrypted from the caller's memory into a bounce buffer (read once) and written
//! from there. Guest memory never holds ciphertext, and the budget bounds the memory
//! encryption takes per thread.

use crate::aio::bounce::{recycle, Budget, Lease};
use crate::aio::iovec::{AlignedBuf, IoVec};
use crate::aio::LocalBoxFuture;
use crate::driver::Driver;
use crate::edge::Edge;
use crate::error::{BlockError, Result};
use crate::format_info::{DriverImageInfo, ImageInfoSpecific};
use crate::limits::Limits;
use crate::node::Node;
use std::sync::Arc;

pub mod create;
pub mod crypto;
pub mod fuzzing;
pub mod header;
pub mod info;
pub mod keyslots;
mod options;
pub mod volume;

use info::LuksInfo;
pub use options::LuksOptions;
use volume::Volume;

/// The table row of `luks`.
pub(crate) const ENTRY: super::DriverEntry = super::DriverEntry {
    names: &["luks"],
    kind: super::Kind::Format,
    parse: options::parse,
    create: Some(create::blockdev_create),
    reopen_mutable: &[],
};

/// The largest piece encrypted at once (one bounce buffer).
const CHUNK: u64 = 256 << 10;
const SECTOR: u64 = 512;

pub struct LuksDriver {
    file: Arc<Edge>,
    volume: Volume,
    payload: u64,
    /// The secret the volume was opened with (it unlocks it again to amend it).
    key_secret: String,
    /// `format-specific` data: the header's info, changed by amending the key slots.
    info: std::sync::Mutex<LuksInfo>,
    /// Held while the key slots are amended (one amendment at a time).
    amending: std::sync::Mutex<()>,
}

/// Reads `len` bytes at `offset` of `node` (from the control thread).
pub(crate) fn read_bytes(node: &Arc<Node>, offset: u64, len: usize) -> Result<Vec<u8>> {
    let node = node.clone();
    let buf = AlignedBuf::try_zeroed(len.max(1), 4096).ok_or_else(|| {
        BlockError::io(
            "luks header",
            std::io::Error::from_raw_os_error(libc::ENOMEM),
        )
    })?;
    let buf = Arc::new(buf);
    let iov = IoVec::from_buf(buf.clone()).slice(0, len as u64);
    crate::aio::uring::block_on(async move { node.read(offset, iov).await })?;
    Ok(buf.as_slice()[..len].to_vec())
}

/// Unlocks the LUKS volume whose header and key material lie in `node` at
/// `base..base + area` (a whole `luks` file, or the crypto header clusters of a
/// qcow2 image) with `password`; QEMU's texts for every failure.
pub(crate) fn unlock_at(node: &Arc<Node>, base: u64, area: u64, password: &[u8]) -> Result<Volume> {
    let head = read_bytes(node, base, (header::HEADER_LEN as u64).min(area) as usize)?;
    Volume::open(&head, password, |off, len| {
        if off.checked_add(len as u64).is_none_or(|end| end > area) {
            return Err(BlockError::Graph(format!(
                "key material at {off}+{len} is past the end of the LUKS header area ({area} bytes)"
            )));
        }
        read_bytes(node, base + off, len)
    })
    .map_err(|e| BlockError::Graph(e.to_string()))
}

/// Writes `bytes` at `offset` of `node` (from the control thread or a job's).
fn write_bytes(node: &Arc<Node>, offset: u64, bytes: &[u8]) -> Result<()> {
    let node = node.clone();
    let mut buf = AlignedBuf::try_zeroed(bytes.len().max(1), 4096).ok_or_else(|| {
        BlockError::io(
            "luks header",
            std::io::Error::from_raw_os_error(libc::ENOMEM),
        )
    })?;
    buf.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
    let iov = IoVec::from_buf(Arc::new(buf)).slice(0, bytes.len() as u64);
    crate::aio::uring::block_on(async move { node.write(offset, iov, false).await })
}

/// Amends the key slots of the LUKS volume at `base..base + area` of `node` (QEMU's
/// `x-blockdev-amend` of `luks` and of `qcow2`'s `encrypt`): the secrets of `request`
/// are looked up in `secrets`, the volume unlocked with `request.secret` or
/// `key_secret` (the secret the node was opened with); returns the new header info.
pub(crate) fn amend_at(
    node: &Arc<Node>,
    base: u64,
    area: u64,
    key_secret: &str,
    request: &keyslots::AmendRequest,
    secrets: &crate::secret::Secrets,
    force: bool,
) -> Result<LuksInfo> {
    let (password, opts) = request
        .resolve(secrets, key_secret)
        .map_err(|e| BlockError::Graph(e.to_string()))?;
    let info = keyslots::amend_area(
        area,
        password.as_deref(),
        &opts,
        force,
        |off, len| read_bytes(node, base + off, len),
        |off, bytes| write_bytes(node, base + off, bytes),
    )?;
    let n = node.clone();
    crate::aio::uring::block_on(async move { n.flush().await })?;
    Ok(info)
}

/// A bounce buffer of `len` bytes leased from this thread's budget (waits while
/// the budget is spent), for data on its way through the cipher; possibly a recycled
/// one with an earlier request's bytes, which the caller overwrites.
async fn bounce(len: u64) -> Result<(AlignedBuf, Lease)> {
    let lease = Budget::current().lease(len as usize).await;
    let buf = lease.alloc_reused(len as usize, 4096).ok_or_else(|| {
        BlockError::io(
            "encryption bounce",
            std::io::Error::from_raw_os_error(libc::ENOMEM),
        )
    })?;
    Ok((buf, lease))
}

/// A cipher failure as an I/O error of the request.
fn crypt_error(e: crypto::CryptoError) -> BlockError {
    BlockError::io(
        "luks",
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    )
}

/// Whether every segment of `part` is a whole number of sectors (the usual case:
/// guests hand over pages or sectors), so that the cipher can run segment by segment.
fn whole_sectors(part: &IoVec) -> bool {
    part.segments()
        .iter()
        .all(|s| s.iov_len.is_multiple_of(SECTOR as usize))
}

/// Reads `iov.len()` bytes of `node` at `at` and decrypts them into `iov` (the first
/// sector's number `sector`), piece by piece through bounce buffers: the ciphertext
/// is read into the bounce buffer and decrypted there, and only the plaintext reaches
/// the caller's memory (written by the cipher's last pass where the segments are whole
/// sectors, else copied).
pub(crate) async fn read_decrypted(
    node: &Node,
    at: u64,
    sector: u64,
    cipher: &crypto::SectorCipher,
    iov: &IoVec,
) -> Result<()> {
    let mut pos = 0;
    while pos < iov.len() {
        let n = (iov.len() - pos).min(CHUNK);
        let (buf, _lease) = bounce(n).await?;
        let mut buf = Arc::new(buf);
        node.read(at + pos, IoVec::from_buf(buf.clone())).await?;
        // The read is complete: nothing else holds the buffer.
        let bytes = Arc::get_mut(&mut buf)
            .ok_or_else(|| BlockError::Graph("encryption bounce buffer still in use".into()))?
            .as_mut_slice();
        let part = iov.slice(pos, n);
        let first = sector + pos / SECTOR;
        if whole_sectors(&part) {
            let mut off = 0;
            for s in part.segments() {
                let len = s.iov_len;
                // SAFETY: the segment is valid for writes of `iov_len` bytes while
                // `part` (its keepalive) lives, and is the caller's memory, distinct
                // from the bounce buffer; the slice lives for this one call. Guest
                // memory may change concurrently: like a DMA device we overwrite it.
                let seg = unsafe { std::slice::from_raw_parts_mut(s.iov_base as *mut u8, len) };
                cipher
                    .decrypt_to(first + off as u64 / SECTOR, &mut bytes[off..off + len], seg)
                    .map_err(crypt_error)?;
                off += len;
            }
        } else {
            cipher.decrypt(first, bytes).map_err(crypt_error)?;
            part.copy_from_slice(0, bytes);
        }
        if let Ok(buf) = Arc::try_unwrap(buf) {
            recycle(buf);
        }
        pos += n;
    }
    Ok(())
}

/// Encrypts `iov` (the first sector's number `sector`) piece by piece into bounce
/// buffers (the cipher reads the caller's memory once, where its segments are whole
/// sectors, else it is copied first), and hands each piece to `write` with its offset
/// in `iov`.
pub(crate) async fn write_encrypted<F, Fut>(
    sector: u64,
    cipher: &crypto::SectorCipher,
    iov: &IoVec,
    mut write: F,
) -> Result<()>
where
    F: FnMut(u64, IoVec) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut pos = 0;
    while pos < iov.len() {
        let n = (iov.len() - pos).min(CHUNK);
        let (mut buf, _lease) = bounce(n).await?;
        let bytes = buf.as_mut_slice();
        let part = iov.slice(pos, n);
        let first = sector + pos / SECTOR;
        if whole_sectors(&part) {
            let mut off = 0;
            for s in part.segments() {
                let len = s.iov_len;
                // SAFETY: the segment is valid for reads of `iov_len` bytes while `part`
                // (its keepalive) lives, and is distinct from the bounce buffer; the
                // cipher reads each byte once, so concurrent guest changes only change
                // what is written, as with a DMA device.
                let seg = unsafe { std::slice::from_raw_parts(s.iov_base as *const u8, len) };
                cipher
                    .encrypt_to(first + off as u64 / SECTOR, seg, &mut bytes[off..off + len])
                    .map_err(crypt_error)?;
                off += len;
            }
        } else {
            part.copy_to_slice(0, bytes);
            cipher.encrypt(first, bytes).map_err(crypt_error)?;
        }
        let buf = Arc::new(buf);
        write(pos, IoVec::from_buf(buf.clone())).await?;
        if let Ok(buf) = Arc::try_unwrap(buf) {
            recycle(buf);
        }
        pos += n;
    }
    Ok(())
}

impl LuksDriver {
    /// Unlocks the volume on `file` with `password`, the data of secret `key_secret`
    /// (QEMU's texts for every failure).
    pub fn open(file: Arc<Edge>, key_secret: &str, password: &[u8]) -> Result<LuksDriver> {
        let node = file.node_arc();
        let size = node.size();
        let volume = unlock_at(&node, 0, size, password)?;
        let payload = volume.header.payload_bytes();
        if payload > size {
            return Err(BlockError::Graph(format!(
                "LUKS payload offset {payload} is past the end of the file ({size} bytes)"
            )));
        }
        Ok(LuksDriver {
            file,
            info: std::sync::Mutex::new(LuksInfo::of_header(&volume.header, &volume.algs)),
            volume,
            payload,
            key_secret: key_secret.to_string(),
            amending: std::sync::Mutex::new(()),
        })
    }
}

impl Driver for LuksDriver {
    fn driver_name(&self) -> &'static str {
        "luks"
    }

    fn size(&self) -> u64 {
        self.file.node().size().saturating_sub(self.payload)
    }

    fn own_limits(&self) -> Limits {
        Limits {
            request_alignment: SECTOR as u32,
            ..Limits::default()
        }
    }

    fn children(&self) -> Vec<Arc<Edge>> {
        vec![self.file.clone()]
    }

    fn supports_fua(&self) -> bool {
        true
    }

    fn is_read_only(&self) -> bool {
        self.file.node().is_read_only()
    }

    fn is_encrypted(&self) -> bool {
        true
    }

    fn amend_encryption(
        &self,
        request: &keyslots::AmendRequest,
        secrets: &crate::secret::Secrets,
        force: bool,
    ) -> Result<()> {
        let _one = self.amending.lock().unwrap_or_else(|e| e.into_inner());
        let node = self.file.node_arc();
        let info = amend_at(
            &node,
            0,
            node.size(),
            &self.key_secret,
            request,
            secrets,
            force,
        )?;
        *self.info.lock().unwrap_or_else(|e| e.into_inner()) = info;
        Ok(())
    }

    fn truncate(&self, size: u64) -> Result<()> {
        let end = self
            .payload
            .checked_add(size)
            .ok_or_else(|| BlockError::Graph("Disk size too large for the chosen offset".into()))?;
        self.file.node().resize(end)
    }

    fn filename(&self) -> String {
        self.file.node().driver().filename()
    }

    fn actual_size(&self) -> Option<u64> {
        self.file.node().driver().actual_size()
    }

    fn image_info(&self) -> DriverImageInfo {
        let info = self.info.lock().unwrap_or_else(|e| e.into_inner()).clone();
        DriverImageInfo {
            encrypted: true,
            format_specific: Some(ImageInfoSpecific::Luks(info)),
            ..Default::default()
        }
    }

    fn read<'a>(&'a self, offset: u64, iov: IoVec) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let file = self.file.node();
            read_decrypted(
                &file,
                self.payload + offset,
                offset / SECTOR,
                &self.volume.cipher,
                &iov,
            )
            .await
        })
    }

    fn write<'a>(&'a self, offset: u64, iov: IoVec, fua: bool) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let file = self.file.node();
            write_encrypted(offset / SECTOR, &self.volume.cipher, &iov, |pos, buf| {
                file.write(self.payload + offset + pos, buf, fua)
            })
            .await
        })
    }

    fn flush(&self) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move { self.file.node().flush().await })
    }

    /// Accepted and dropped, as QEMU's crypto driver (it has no discard of its own, so
    /// its block layer completes discards without passing them down): the file keeps
    /// its ciphertext, and which blocks the guest freed stays hidden.
    fn discard(&self, _offset: u64, _len: u64) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn write_zeroes(
        &self,
        _offset: u64,
        _len: u64,
        _may_unmap: bool,
    ) -> LocalBoxFuture<'_, Result<()>> {
        // Zeroes must be encrypted: the generic path writes zero buffers through
        // `write`, as QEMU's crypto driver has no write-zeroes of its own.
        Box::pin(std::future::ready(Err(BlockError::Unsupported(
            "write zeroes on encrypted data",
        ))))
    }
}

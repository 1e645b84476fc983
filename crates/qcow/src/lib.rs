//! The qcow2 image format: on-disk structures, metadata caches, cluster
//! allocation with copy-on-write, zero writes and discard, crash-safe
//! metadata ordering, image creation, and check/repair.
//!
//! This crate handles metadata and tells its caller where guest data lives
//! ([`Qcow2::map`] for reads, [`Qcow2::allocate`] + [`Qcow2::commit`] for
//! writes), so that the caller can move data between guest memory and the
//! image file without copies. It touches data itself only for copy-on-write,
//! compressed clusters and zero-filling. All file I/O goes through the
//! crate's own [`QcowIo`] trait.

pub mod bitmaps;
pub mod cache;
pub mod check;
pub mod compress;
pub mod create;
pub mod crypt;
#[doc(hidden)]
pub mod fuzzing;
pub mod header;
pub mod image;
pub mod io;
pub mod layout;
pub mod snapshot;
pub mod sync;
pub mod view;

mod alloc;
mod write;

pub use bitmaps::{BitmapError, BitmapInfo, LoadedBitmap, StoreBitmap};
pub use check::{CheckReport, Repair};
pub use create::{
    create, create_with_data_file, Compat, CreateError, CreateOptions, Preallocation,
};
pub use crypt::DataCipher;
pub use header::{CompressionType, Header, HeaderError};
pub use image::{
    CacheStats, Error, Extent, ExtentKind, Extents, ImageInfo, OpenOptions, Qcow2, Result,
    TableCacheStats,
};
pub use io::{block_on, DebugEvent, FileIo, MemIo, QcowIo};
pub use snapshot::{NewSnapshot, Snapshot};
pub use view::READ_VIEWS;
pub use write::{Allocation, HostRange};

use std::future::Future;

/// Where copy-on-write gets the content of unallocated ranges: the backing
/// file, supplied by the caller.
pub trait Backing {
    /// Reads guest data of the backing chain (zeroes past its end).
    fn read(&self, guest_offset: u64, buf: &mut [u8]) -> impl Future<Output = std::io::Result<()>>;
    /// Whether there is a backing file at all (when false, unallocated
    /// ranges read as zeroes and `read` is never called).
    fn present(&self) -> bool {
        true
    }
    /// Whether the chain is known to read zeroes in `guest_offset..+len`
    /// (nothing allocated there), as QEMU's `bdrv_co_is_zero_fast` tells;
    /// false when unsure (the default).
    fn reads_as_zero(&self, guest_offset: u64, len: u64) -> impl Future<Output = bool> {
        let _ = (guest_offset, len);
        std::future::ready(!self.present())
    }
}

/// No backing file: unallocated ranges read as zeroes.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoBacking;

impl Backing for NoBacking {
    async fn read(&self, _off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn present(&self) -> bool {
        false
    }
}

/// A backing file held in memory (tests).
impl Backing for Vec<u8> {
    async fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        buf.fill(0);
        if off < self.len() as u64 {
            let n = buf.len().min(self.len() - off as usize);
            buf[..n].copy_from_slice(&self[off as usize..off as usize + n]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

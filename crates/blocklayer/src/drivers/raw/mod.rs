//! The `raw` format driver: the child's bytes as they are, optionally a window of them
//! (`offset`, `size`).

use crate::aio::iovec::IoVec;
use crate::aio::LocalBoxFuture;
use crate::driver::Driver;
use crate::edge::Edge;
use crate::error::{BlockError, Result};
use std::sync::Arc;

mod options;

pub use options::RawOptions;

/// The table row of `raw`.
pub(crate) const ENTRY: super::DriverEntry = super::DriverEntry {
    names: &["raw"],
    kind: super::Kind::Format,
    parse: options::parse,
    create: None,
    reopen_mutable: &["offset", "size"],
};

pub struct RawDriver {
    file: Arc<Edge>,
    offset: u64,
    /// Fixed window size, or `None` for "the rest of the child".
    size: Option<u64>,
}

impl RawDriver {
    pub fn new(file: Arc<Edge>, offset: u64, size: Option<u64>) -> Result<Self> {
        let child = file.node().size();
        let end = offset.checked_add(size.unwrap_or(0));
        match end {
            Some(end) if offset <= child && end <= child => {}
            _ => {
                return Err(BlockError::Graph(format!(
                    "The sum of offset ({offset}) and size ({}) has to be smaller or equal to the actual size of the containing file ({child})",
                    size.unwrap_or(0)
                )))
            }
        }
        Ok(RawDriver { file, offset, size })
    }
}

impl Driver for RawDriver {
    fn driver_name(&self) -> &'static str {
        "raw"
    }

    fn size(&self) -> u64 {
        self.size
            .unwrap_or_else(|| self.file.node().size().saturating_sub(self.offset))
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

    fn truncate(&self, size: u64) -> Result<()> {
        if self.size.is_some() {
            return Err(BlockError::Graph(
                "Cannot resize fixed-size raw disks".into(),
            ));
        }
        let end = self
            .offset
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

    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'_, Result<(crate::block_status::Status, u64)>> {
        let below = crate::block_status::Status::Below(self.file.node_arc(), self.offset + offset);
        Box::pin(std::future::ready(Ok((below, len))))
    }

    fn read<'a>(&'a self, offset: u64, iov: IoVec) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let file = self.file.node();
            file.debug_event("read_aio");
            file.read(self.offset + offset, iov).await
        })
    }

    fn write<'a>(&'a self, offset: u64, iov: IoVec, fua: bool) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let file = self.file.node();
            file.debug_event("write_aio");
            file.write(self.offset + offset, iov, fua).await
        })
    }

    fn flush(&self) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move { self.file.node().flush().await })
    }

    fn discard(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move { self.file.node().discard(self.offset + offset, len).await })
    }

    fn allocate(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move { self.file.node().allocate(self.offset + offset, len).await })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.file
                .node()
                .write_zeroes(self.offset + offset, len, may_unmap, false)
                .await
        })
    }
}

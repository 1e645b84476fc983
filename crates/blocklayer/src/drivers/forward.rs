//! Requests a filter passes to its child unchanged (the same offset and length):
//! the methods of `copy-on-read`, the job filters and `blkdebug` that have nothing of
//! their own to do.

use crate::aio::iovec::IoVec;
use crate::aio::LocalBoxFuture;
use crate::edge::Edge;
use crate::error::Result;

pub fn write(child: &Edge, offset: u64, iov: IoVec, fua: bool) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move { child.node().write(offset, iov, fua).await })
}

pub fn flush(child: &Edge) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move { child.node().flush().await })
}

pub fn discard(child: &Edge, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move { child.node().discard(offset, len).await })
}

pub fn allocate(child: &Edge, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move { child.node().allocate(offset, len).await })
}

pub fn write_zeroes(
    child: &Edge,
    offset: u64,
    len: u64,
    may_unmap: bool,
) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        child
            .node()
            .write_zeroes(offset, len, may_unmap, false)
            .await
    })
}

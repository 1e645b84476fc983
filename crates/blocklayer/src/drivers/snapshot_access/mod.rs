//! The `snapshot-access` driver (QEMU's block/snapshot-access.c): reads the
//! point-in-time view its `file` node keeps (a `copy-before-write` filter, see
//! [`Driver::read_snapshot`]), so that an export can serve it read-only while the
//! disk under the filter keeps changing (image fleecing, pull-mode backup).
//! Discards drop areas from the view (the reader has them); writes are refused.

use crate::aio::iovec::IoVec;
use crate::aio::LocalBoxFuture;
use crate::driver::Driver;
use crate::drivers::OpenCtx;
use crate::edge::{Edge, Role};
use crate::error::{BlockError, Result};
use crate::options::coerce::Fields;
use crate::options::{BlockdevRef, CommonOptions, DriverOptions};
use crate::perm::Perm;
use serde_json::{Map, Value};
use std::sync::Arc;

/// The table row of `snapshot-access`.
pub(crate) const ENTRY: super::DriverEntry = super::DriverEntry {
    names: &["snapshot-access"],
    kind: super::Kind::Format,
    parse,
    create: None,
    reopen_mutable: &[],
};

/// QEMU's `BlockdevOptionsGenericFormat` of `snapshot-access`.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotAccessOptions {
    pub file: BlockdevRef,
}

impl DriverOptions for SnapshotAccessOptions {
    fn driver_name(&self) -> &'static str {
        "snapshot-access"
    }

    fn child(&self) -> Option<&BlockdevRef> {
        Some(&self.file)
    }

    fn keep_children(&mut self, now: &dyn Fn(&str) -> Option<BlockdevRef>) {
        if let Some(f) = now("file") {
            self.file = f;
        }
    }

    fn write_json(&self, m: &mut Map<String, Value>) {
        m.insert("file".into(), self.file.to_json());
    }

    fn open(&self, ctx: &mut OpenCtx<'_>) -> Result<Box<dyn Driver>> {
        let file = ctx.child(&self.file)?;
        Ok(Box::new(SnapshotAccess {
            file: ctx.edge("file", Role::File, &file),
        }))
    }
}

fn parse(
    f: &mut Fields,
    common: &CommonOptions,
    _name: &'static str,
) -> crate::options::Result<Box<dyn DriverOptions>> {
    Ok(Box::new(SnapshotAccessOptions {
        file: BlockdevRef::take_from(f, "file", common)?,
    }))
}

pub struct SnapshotAccess {
    file: Arc<Edge>,
}

fn not_supported() -> BlockError {
    BlockError::io(
        "snapshot-access",
        std::io::Error::from_raw_os_error(libc::ENOTSUP),
    )
}

impl Driver for SnapshotAccess {
    fn driver_name(&self) -> &'static str {
        "snapshot-access"
    }

    fn size(&self) -> u64 {
        self.file.node().size()
    }

    fn children(&self) -> Vec<Arc<Edge>> {
        vec![self.file.clone()]
    }

    /// QEMU's `snapshot_access_child_perm`: nothing taken, everything shared.
    fn child_perm(&self, _c: &Edge, _w: bool, _perm: Perm, _shared: Perm) -> (Perm, Perm) {
        (Perm::NONE, Perm::ALL)
    }

    fn filename(&self) -> String {
        self.file.node().driver().filename()
    }

    fn read<'a>(&'a self, offset: u64, iov: IoVec) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let file = self.file.node_arc();
            file.read_snapshot(offset, iov).await
        })
    }

    fn write<'a>(&'a self, _o: u64, _iov: IoVec, _fua: bool) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(std::future::ready(Err(not_supported())))
    }

    fn flush(&self) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn discard(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let file = self.file.node_arc();
            file.discard_snapshot(offset, len).await
        })
    }

    fn write_zeroes(&self, _o: u64, _l: u64, _u: bool) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(std::future::ready(Err(not_supported())))
    }
}

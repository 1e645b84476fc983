//! The interface every driver implements. Drivers do only their own work: the generic
//! request path in `io.rs` has already checked ranges, permissions and alignment, and
//! split requests at the node's limits, before a driver sees them.

use crate::aio::{iovec::IoVec, LocalBoxFuture};
use crate::edge::{Edge, Role};
use crate::error::{BlockError, Result};
use crate::limits::Limits;
use crate::perm::Perm;
use crate::persistent_bitmaps::PersistentBitmap;
use crate::snapshot::{NewSnapshot, SnapshotInfo};
use std::sync::Arc;

/// The error of the snapshot methods of drivers without internal snapshots.
fn no_snapshots<T>() -> Result<T> {
    Err(BlockError::Unsupported("internal snapshots"))
}

/// The permissions a node takes on a child and shares with the child's other users,
/// given what the node's own parents take and share (QEMU's `bdrv_default_perms`):
/// filters pass their parents' permissions through; a format takes write and resize
/// on its file whenever it is writable and lets no one else write or resize it;
/// backing files are only read, and may change underneath when the parents allow
/// writes themselves.
pub fn default_child_perm(role: Role, writable: bool, perm: Perm, shared: Perm) -> (Perm, Perm) {
    let pass_perm = perm & Perm::PASSTHROUGH;
    let pass_shared = (shared & Perm::PASSTHROUGH) | !Perm::PASSTHROUGH;
    match role {
        Role::Filtered | Role::Root => (pass_perm, pass_shared),
        Role::File | Role::DataFile => {
            let mut p = pass_perm | Perm::CONSISTENT_READ;
            if writable {
                p |= Perm::WRITE;
                if role == Role::File {
                    p |= Perm::RESIZE;
                }
            }
            (p, pass_shared & !(Perm::WRITE | Perm::RESIZE))
        }
        Role::Backing => {
            let p = perm & Perm::CONSISTENT_READ;
            let mut s = Perm::CONSISTENT_READ | Perm::GRAPH_MOD | Perm::WRITE_UNCHANGED;
            if shared.contains(Perm::WRITE) {
                s |= Perm::WRITE | Perm::RESIZE;
            }
            (p, s)
        }
    }
}

pub trait Driver: Send + Sync {
    /// QEMU's driver name (`file`, `raw`, `null-co`, ...).
    fn driver_name(&self) -> &'static str;

    /// Current size in bytes.
    fn size(&self) -> u64;

    /// The driver's own limits; the node merges them with its children's.
    fn own_limits(&self) -> Limits {
        Limits::default()
    }

    /// The node's child edges.
    fn children(&self) -> Vec<Arc<Edge>> {
        Vec::new()
    }

    /// The permissions the node takes on `child` (see [`default_child_perm`]).
    fn child_perm(&self, child: &Edge, writable: bool, perm: Perm, shared: Perm) -> (Perm, Perm) {
        default_child_perm(child.role(), writable, perm, shared)
    }

    /// A blkdebug event that a parent raises on this node before it does the I/O the
    /// event names (QEMU's `BLKDBG_EVENT(child, ...)`); only blkdebug reacts. Called
    /// only for nodes whose driver says [`Driver::takes_debug_events`].
    fn debug_event(&self, _event: &'static str) {}

    /// Whether [`Driver::debug_event`] does anything (checked once, at open, so that
    /// raising an event on any other node costs one branch).
    fn takes_debug_events(&self) -> bool {
        false
    }

    /// A drained section begins on the node (QEMU's `bdrv_co_drain_begin`): a driver
    /// that holds requests back on its own (the throttle filter) lets them go, so
    /// that the section can wait for them.
    fn drain_begin(&self) {}

    /// The drained section [`Driver::drain_begin`] announced ends.
    fn drain_end(&self) {}

    /// Drops the image locks the driver holds on its file (before the image is
    /// reopened with other permissions by a new node of this process).
    fn release_locks(&self) {}

    /// Takes the locks back after [`Driver::release_locks`] (a reopen that failed).
    fn retake_locks(&self) -> Result<()> {
        Ok(())
    }

    /// Whether the driver can have a backing child (QEMU's `supports_backing`).
    fn supports_backing(&self) -> bool {
        false
    }

    /// Replaces the backing child (`None`: no backing), from the control thread while
    /// the node is drained. The image header is not changed (see
    /// [`Driver::change_backing_file`]).
    fn set_backing(&self, _backing: Option<Arc<Edge>>) -> Result<()> {
        Err(BlockError::Graph(
            "Driver does not support backing files".into(),
        ))
    }

    /// Rewrites the backing file name and format the image header records (QEMU's
    /// `bdrv_change_backing_file`), from the control thread while drained.
    fn change_backing_file(&self, _name: Option<&str>, _format: Option<&str>) -> Result<()> {
        Err(BlockError::Unsupported("changing the backing file"))
    }

    /// Whether `offset..` is allocated in this node itself (data or zeroes), rather
    /// than read from its backing child, and for how many bytes (at most `len`) the
    /// answer holds. Nodes without a backing child have everything allocated.
    fn is_allocated(&self, _offset: u64, len: u64) -> LocalBoxFuture<'_, Result<(bool, u64)>> {
        Box::pin(std::future::ready(Ok((true, len))))
    }

    /// What `offset..` holds in this node itself, and for how many bytes (at most
    /// `len`) the answer holds (QEMU's `bdrv_co_block_status` of one driver); see
    /// [`crate::block_status`]. By default a filter's child answers, and any other
    /// node holds data.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'_, Result<(crate::block_status::Status, u64)>> {
        let status = crate::block_status::default_status(&self.children(), offset);
        Box::pin(std::future::ready(Ok((status, len))))
    }

    /// Whether writes with FUA are stable on completion without a separate flush.
    fn supports_fua(&self) -> bool {
        false
    }

    /// The `throttle` filter, which a block backend whose root it is passes at the
    /// request's admission rather than through the node's generic path (see
    /// [`crate::drivers::throttle::ThrottleDriver::read_admitted`]).
    fn as_throttle(&self) -> Option<&crate::drivers::throttle::ThrottleDriver> {
        None
    }

    /// Whether a write past the end grows the node (a regular file), so that format
    /// drivers may write new clusters without resizing first.
    fn grows_on_write(&self) -> bool {
        false
    }

    /// Whether the node's data is encrypted (`encrypted` in QEMU's BlockDeviceInfo).
    fn is_encrypted(&self) -> bool {
        false
    }

    /// Changes the key slots of an encrypted image (QEMU's `x-blockdev-amend` of
    /// `luks`, and of `qcow2` with `encrypt`), from a job's thread; `secrets` holds
    /// the secrets `request` names. Drivers without encryption keep the default.
    fn amend_encryption(
        &self,
        _request: &crate::drivers::luks::keyslots::AmendRequest,
        _secrets: &crate::secret::Secrets,
        _force: bool,
    ) -> Result<()> {
        Err(BlockError::Graph(
            "Driver does not support x-blockdev-amend".into(),
        ))
    }

    /// Whether the driver's storage itself is read-only (e.g. opened O_RDONLY).
    fn is_read_only(&self) -> bool {
        false
    }

    /// Changes the size (QEMU's `bdrv_co_truncate`), called from the control thread
    /// while the node is drained. Drivers that cannot resize keep the default.
    fn truncate(&self, _size: u64) -> Result<()> {
        Err(BlockError::Graph(
            "Image format driver does not support resize".into(),
        ))
    }

    /// Writes back everything the driver keeps in memory and marks the image clean,
    /// before the process exits (QEMU's inactivation at exit): the qcow2 driver writes
    /// its metadata caches, refcounts included, and clears the dirty bit. Called from
    /// the control thread once the node's users are quiesced, parents before
    /// children. The node stays usable; a later write makes the image dirty again.
    fn close(&self) -> Result<()> {
        Ok(())
    }

    /// The persistent dirty bitmaps the image keeps (qcow2), with their bits, read
    /// when the node opens. Drivers without them keep the default (none).
    fn load_persistent_bitmaps(&self) -> Result<Vec<PersistentBitmap>> {
        Ok(Vec::new())
    }

    /// Stores bitmaps in the image (each replaces the one of its name; the image's
    /// others stay), not in use any more (QEMU's
    /// `bdrv_store_persistent_dirty_bitmaps`).
    fn store_persistent_bitmaps(&self, list: &[PersistentBitmap]) -> Result<()> {
        if list.is_empty() {
            return Ok(());
        }
        Err(BlockError::Unsupported("persistent bitmaps"))
    }

    /// Deletes a bitmap from the image; absence is not an error (QEMU's
    /// `bdrv_remove_persistent_dirty_bitmap`).
    fn remove_persistent_bitmap(&self, _name: &str) -> Result<()> {
        Ok(())
    }

    /// Marks the image's bitmaps in use again after they were stored while the
    /// image stays open for writing (a reopen that was undone).
    fn mark_bitmaps_in_use(&self) -> Result<()> {
        Ok(())
    }

    /// Whether a new bitmap of this name and granularity could be stored in the
    /// image (QEMU's `bdrv_can_store_new_dirty_bitmap`); `Err` says why not.
    fn can_store_new_bitmap(&self, _name: &str, _granularity: u64) -> Result<()> {
        Err(BlockError::Unsupported("persistent bitmaps"))
    }

    /// The `dirty-bitmaps` entries of bitmaps the driver keeps itself (QEMU's
    /// anonymous bitmaps of the node: the copy-before-write filter's).
    fn own_bitmaps_info(&self) -> Vec<crate::info::BlockDirtyInfo> {
        Vec::new()
    }

    /// The file name QEMU reports for the node (`file` in `BlockDeviceInfo`).
    fn filename(&self) -> String {
        String::new()
    }

    /// The driver's own statistics (`driver-specific` in QEMU's `BlockStats`).
    fn driver_specific_stats(&self) -> Option<crate::stats::BlockStatsSpecific> {
        None
    }

    /// Members of QEMU's `ImageInfo` that only a format knows (`cluster-size`,
    /// `encrypted`, `format-specific`, `backing-filename`,
    /// `backing-filename-format`), merged into the node's image information.
    fn image_info(&self) -> crate::format_info::DriverImageInfo {
        Default::default()
    }

    /// Bytes the image takes on the host (`actual-size`), when known.
    fn actual_size(&self) -> Option<u64> {
        None
    }

    /// The image's internal snapshots (QEMU's `bdrv_snapshot_list`). Drivers without
    /// internal snapshots keep the default, which fails with ENOTSUP; that failure is
    /// also how callers learn that a driver cannot take snapshots.
    fn snapshot_list(&self) -> Result<Vec<SnapshotInfo>> {
        no_snapshots()
    }

    /// Takes an internal snapshot of the current disk state. Called from the control
    /// thread while the node is drained and the exports above it are paused.
    fn snapshot_create(&self, _new: &NewSnapshot) -> Result<SnapshotInfo> {
        no_snapshots()
    }

    /// Deletes the first internal snapshot whose id is `id` (if given) and whose name
    /// is `name` (if given), and returns it; drained as `snapshot_create`.
    fn snapshot_delete(&self, _id: Option<&str>, _name: Option<&str>) -> Result<SnapshotInfo> {
        no_snapshots()
    }

    /// Reads the point-in-time view the node keeps (QEMU's `bdrv_co_preadv_snapshot`:
    /// only `copy-before-write` has one, for `snapshot-access`); ENOTSUP elsewhere.
    fn read_snapshot<'a>(&'a self, _offset: u64, _iov: IoVec) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(std::future::ready(Err(BlockError::Unsupported(
            "snapshot access",
        ))))
    }

    /// Drops a range from the point-in-time view (QEMU's `bdrv_co_pdiscard_snapshot`).
    fn discard_snapshot(&self, _offset: u64, _len: u64) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(std::future::ready(Err(BlockError::Unsupported(
            "snapshot access",
        ))))
    }

    /// The copy state of a `copy-before-write` filter, which the backup job shares.
    fn block_copy(&self) -> Option<Arc<crate::block_copy::BlockCopy>> {
        None
    }

    fn read<'a>(&'a self, offset: u64, iov: IoVec) -> LocalBoxFuture<'a, Result<()>>;

    fn write<'a>(&'a self, offset: u64, iov: IoVec, fua: bool) -> LocalBoxFuture<'a, Result<()>>;

    /// Writes one whole cluster compressed (`offset` cluster aligned, `data` a
    /// cluster long, shorter only at the end of the disk), for backups with
    /// `compress=true` (QEMU's BDRV_REQ_WRITE_COMPRESSED). `None`: the driver
    /// cannot.
    fn write_compressed<'a>(
        &'a self,
        _offset: u64,
        _data: Vec<u8>,
    ) -> Option<LocalBoxFuture<'a, Result<()>>> {
        None
    }

    /// Whether [`Driver::write_compressed`] works.
    fn supports_compressed_writes(&self) -> bool {
        false
    }

    fn flush(&self) -> LocalBoxFuture<'_, Result<()>>;

    /// A flush that a format above adds where QEMU's driver flushes nothing
    /// (see `qcow::QcowIo::flush_unchecked`): [`Driver::flush`], except that
    /// blkdebug passes it on without checking its rules.
    fn flush_unchecked(&self) -> LocalBoxFuture<'_, Result<()>> {
        self.flush()
    }

    /// Deallocates a range; reads may return anything afterwards (zeroes for files).
    fn discard(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>>;

    /// Reserves host space for a range (QEMU's `preallocation=falloc`): holes in it
    /// read as zeroes afterwards and take space; data already there may stay. The
    /// default is unsupported: the generic path then writes zero buffers.
    fn allocate(&self, _offset: u64, _len: u64) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(std::future::ready(Err(BlockError::Unsupported(
            "allocating space",
        ))))
    }

    /// Makes a range read as zeroes without a data buffer; `may_unmap` allows
    /// deallocation. `Err` with ENOTSUP lets the generic path write a zero buffer.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> LocalBoxFuture<'_, Result<()>>;
}

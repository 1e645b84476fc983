//! `blockdev-backup` and `drive-backup` (QEMU 7.2's `blockdev_backup_prepare`,
//! `drive_backup_prepare`, `do_backup_common` and `backup_job_create`): the checks
//! and texts in QEMU's order, the `copy-before-write` filter put above the source,
//! and the job (see [`crate::jobs::backup`]).

use super::jobs::{check_busy, JobOpts};
use super::{generic, Control, OpResult, DRAIN_TIMEOUT};
use crate::config::OnError;
use crate::control::error::ControlError;
use crate::jobs::backup::{Backup, SyncMode, CHUNK, MAX_WORKERS};
use crate::jobs::copy::JobCtx;
use crate::jobs::{Job, JobCore};
use blocklayer::bitmap::DirtyBitmap;
use blocklayer::block_copy::ClusterBits;
use blocklayer::drivers::file::create::{create_file, FilePrealloc};
use blocklayer::named_bitmap::{Check, NamedBitmap};
use blocklayer::options::BlockdevOptions;
use blocklayer::perm::Perm;
use blocklayer::Node;
use serde_json::json;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// QEMU's `BackupPerf` (`x-perf`).
#[derive(Debug, Clone, Copy)]
pub struct BackupPerf {
    pub use_copy_range: bool,
    pub max_workers: i64,
    pub max_chunk: i64,
}

impl Default for BackupPerf {
    fn default() -> Self {
        BackupPerf {
            use_copy_range: false,
            max_workers: 64,
            max_chunk: 0,
        }
    }
}

/// QEMU's `BackupCommon`, with the target (`blockdev-backup`: a node; `drive-backup`:
/// an image file).
#[derive(Debug)]
pub struct BackupArgs {
    pub device: String,
    pub target: String,
    /// `full`, `top`, `none`, `incremental` or `bitmap`.
    pub sync: &'static str,
    pub bitmap: Option<String>,
    pub bitmap_mode: Option<&'static str>,
    pub compress: bool,
    pub on_source_error: OnError,
    pub on_target_error: OnError,
    pub filter_node_name: Option<String>,
    pub perf: BackupPerf,
}

/// `drive-backup`'s own members.
#[derive(Debug)]
pub struct DriveTarget {
    pub format: Option<String>,
    pub existing: bool,
}

impl Control {
    /// `blockdev-backup`
    pub fn blockdev_backup(&mut self, a: BackupArgs, o: JobOpts) -> OpResult<()> {
        self.drain_all_pauses_jobs();
        let source = self.lookup_device(&a.device)?;
        let target = self.lookup_device(&a.target)?;
        self.backup_common(a, o, source, target)
    }

    /// `drive-backup`: creates the target image (unless `mode=existing`), opens it
    /// (as QEMU, with discard=unmap and detect-zeroes=unmap) and backs up to it.
    pub fn drive_backup(&mut self, mut a: BackupArgs, o: JobOpts, d: DriveTarget) -> OpResult<()> {
        self.drain_all_pauses_jobs();
        let source = self.lookup_device(&a.device)?;
        check_busy(&source)?;
        let format = d
            .format
            .clone()
            .or_else(|| (!d.existing).then(|| source.driver_name().to_string()));
        // The layer a `top` target sits on (the source's backing); `none` reads
        // through to the source itself.
        let mut backing: Option<Arc<Node>> = None;
        if a.sync == "top" {
            backing = skip_filters(&source).backing();
            if backing.is_none() {
                a.sync = "full";
            }
        }
        let set_backing = a.sync == "none";
        if set_backing {
            backing = Some(source.clone());
        }
        let path = Path::new(&a.target);
        if !d.existing {
            let fmt = format.as_deref().unwrap_or("raw");
            self.create_backup_image(path, fmt, source.size(), backing.as_ref())?;
        } else if !path.exists() {
            return Err(ControlError::generic(format!(
                "Could not open '{}': No such file or directory",
                a.target
            )));
        }
        let mut opts = json!({
            "driver": format.as_deref().unwrap_or("raw"),
            "file": {"driver": "file", "filename": a.target},
            "discard": "unmap",
            "detect-zeroes": "unmap",
        });
        if set_backing && opts["driver"] == "qcow2" {
            opts["backing"] = json!(null);
        }
        let target = self
            .graph
            .add_implicit(&BlockdevOptions::from_json(&opts).map_err(generic)?)
            .map_err(generic)?;
        let r = (|| {
            if set_backing {
                let _d = self.graph.drain(&target, DRAIN_TIMEOUT).map_err(generic)?;
                self.graph
                    .set_backing(&target, Some(&source))
                    .map_err(generic)?;
            }
            self.backup_common(a, o, source, target.clone())
        })();
        drop(target);
        // A target nothing uses (the backup was refused) goes at once.
        self.graph.collect_unused();
        r
    }

    /// Creates a `drive-backup` target image of `size` bytes.
    fn create_backup_image(
        &mut self,
        path: &Path,
        format: &str,
        size: u64,
        backing: Option<&Arc<Node>>,
    ) -> OpResult<()> {
        match format {
            "raw" => create_file(path, size, FilePrealloc::Off)
                .map_err(|e| super::graph_ops::create_error(path, e)),
            "qcow2" => self.create_qcow2(path, size, backing),
            f if BlockdevOptions::is_qemu_driver(f) => Err(ControlError::generic(format!(
                "vubd creates backup targets in the qcow2 and raw formats only, not '{f}'"
            ))),
            f => Err(ControlError::generic(format!("Unknown file format '{f}'"))),
        }
    }

    /// QEMU's `do_backup_common` and `backup_job_create`.
    fn backup_common(
        &mut self,
        a: BackupArgs,
        o: JobOpts,
        source: Arc<Node>,
        target: Arc<Node>,
    ) -> OpResult<()> {
        let mut sync = a.sync;
        let mut bitmap_mode = a.bitmap_mode;
        if matches!(sync, "bitmap" | "incremental") && a.bitmap.is_none() {
            return Err(ControlError::generic(format!(
                "must provide a valid bitmap name for '{sync}' sync mode"
            )));
        }
        if sync == "incremental" {
            if bitmap_mode.is_some_and(|m| m != "on-success") {
                return Err(ControlError::generic(format!(
                    "Bitmap sync mode must be 'on-success' when using sync mode '{sync}'"
                )));
            }
            sync = "bitmap";
            bitmap_mode = Some("on-success");
        }
        let mut sync_bitmap = None;
        if let Some(name) = &a.bitmap {
            let bm = source.named_bitmap(name).ok_or_else(|| {
                ControlError::generic(format!("Bitmap '{name}' could not be found"))
            })?;
            let Some(mode) = bitmap_mode else {
                return Err(ControlError::generic(
                    "Bitmap sync mode must be given when providing a bitmap",
                ));
            };
            bm.check(Check::ALLOW_RO).map_err(generic)?;
            if sync == "none" {
                return Err(ControlError::generic(format!(
                    "sync mode '{sync}' does not produce meaningful bitmap outputs"
                )));
            }
            if mode == "never" && sync != "bitmap" {
                return Err(ControlError::generic(format!(
                    "Bitmap sync mode '{mode}' has no meaningful effect when combined with \
                     sync mode '{sync}'"
                )));
            }
            sync_bitmap = Some((bm, mode));
        } else if bitmap_mode.is_some() {
            return Err(ControlError::generic(
                "Cannot specify bitmap sync mode without a bitmap",
            ));
        }
        let sync = match sync {
            "full" => SyncMode::Full,
            "top" => SyncMode::Top,
            "bitmap" => SyncMode::Bitmap,
            _ => SyncMode::None,
        };
        if Arc::ptr_eq(&source, &target) {
            return Err(ControlError::generic(
                "Source and target cannot be the same",
            ));
        }
        if a.compress && !skip_filters(&target).driver().supports_compressed_writes() {
            // QEMU names the target's device, which a node of the storage daemon
            // does not have.
            return Err(ControlError::generic(
                "Compression is not supported for this drive ",
            ));
        }
        check_busy(&source)?;
        check_busy(&target)?;
        if let Some((bm, mode)) = &sync_bitmap {
            // The job writes the bitmap at its end, unless it never does.
            if *mode != "never" {
                bm.check(Check::DEFAULT).map_err(generic)?;
            }
        }
        if a.perf.max_workers < 1 || a.perf.max_workers > i64::from(i32::MAX) {
            return Err(ControlError::generic(format!(
                "max-workers must be between 1 and {}",
                i32::MAX
            )));
        }
        if a.perf.max_chunk < 0 {
            return Err(ControlError::generic(
                "max-chunk must be zero (which means no limit) or positive",
            ));
        }
        if source.size() != target.size() {
            return Err(ControlError::generic(
                "Source and target image have different sizes",
            ));
        }
        // The filter above the source (QEMU's `bdrv_cbw_append`).
        let mut cbw_opts = json!({
            "driver": "copy-before-write",
            "file": source.name(),
            "target": target.name(),
        });
        if let Some(n) = &a.filter_node_name {
            cbw_opts["node-name"] = json!(n);
        }
        let cbw_opts = BlockdevOptions::from_json(&cbw_opts).map_err(generic)?;
        let cbw = {
            let _d = self.graph.drain(&source, DRAIN_TIMEOUT).map_err(generic)?;
            self.graph
                .insert_node(&source, &cbw_opts)
                .map_err(|e| ControlError::generic(format!("Could not create node: {e}")))?
        };
        let Some(bcs) = cbw.driver().block_copy() else {
            self.drop_job_filter(&cbw);
            return Err(ControlError::generic("copy-before-write has no copy state"));
        };
        bcs.set_compress(a.compress);
        let cluster = bcs.cluster_size();
        if a.perf.max_chunk != 0 && (a.perf.max_chunk as u64) < cluster {
            self.drop_job_filter(&cbw);
            return Err(ControlError::generic(format!(
                "Required max-chunk ({}) is less than backup cluster size ({cluster})",
                a.perf.max_chunk
            )));
        }
        let id = match self.job_id(&o) {
            Ok(id) => id,
            Err(e) => {
                self.drop_job_filter(&cbw);
                return Err(e);
            }
        };
        let users = self
            .job_user(&id, "backup", "main node", &cbw, Perm::NONE, Perm::ALL)
            .and_then(|blk| {
                let hold =
                    self.job_user(&id, "backup", "target", &target, Perm::NONE, Perm::ALL)?;
                Ok((blk, hold))
            });
        let (blk, hold) = match users {
            Ok(u) => u,
            Err(e) => {
                self.drop_job_filter(&cbw);
                return Err(e);
            }
        };
        // With a bitmap: what it marks is what the job copies, and a successor
        // records the writes from now on, both at one point in time.
        let sync_bitmap = match sync_bitmap {
            None => None,
            Some((bm, mode)) => match self.graph.drain(&source, DRAIN_TIMEOUT) {
                Ok(_d) => {
                    let bits = bcs.size().div_ceil(cluster);
                    bcs.set_dirty(ClusterBits::from_dirty(&bm.bits(), cluster, bits));
                    Some(SyncBitmap::begin(&source, bm, mode))
                }
                Err(e) => {
                    self.drop_job_filter(&cbw);
                    return Err(generic(e));
                }
            },
        };
        let core = Arc::new(JobCore::new(&id, o.speed as u64));
        core.set_len(bcs.remaining());
        let mut job = Job::new(&id, "backup", core.clone(), true);
        job.auto_finalize = o.auto_finalize;
        job.auto_dismiss = o.auto_dismiss;
        let succeeded = Arc::new(AtomicBool::new(false));
        let ok = succeeded.clone();
        job.finish = Some(Box::new(move |_ctl: &mut Control| {
            ok.store(true, Ordering::Release);
            Ok(())
        }));
        let f = cbw.clone();
        let job_bcs = bcs.clone();
        job.cleanup = Some(Box::new(move |ctl: &mut Control| {
            if let Some(sb) = sync_bitmap {
                let uncopied = job_bcs.dirty();
                let _d = ctl.graph.drain(&sb.node, DRAIN_TIMEOUT);
                sb.end(succeeded.load(Ordering::Acquire), &uncopied, cluster);
            }
            drop(job_bcs);
            ctl.drop_job_filter(&f);
            // The filter's edges go with it, and a drive-backup target with them.
            drop(f);
            ctl.graph.collect_unused();
        }));
        let backup = Backup {
            ctx: JobCtx::new(core, a.on_source_error, self.tx.clone()),
            blk,
            hold,
            bcs,
            sync,
            on_source_error: a.on_source_error,
            on_target_error: a.on_target_error,
            workers: (a.perf.max_workers as usize).min(MAX_WORKERS),
            chunk: match a.perf.max_chunk as u64 {
                0 => CHUNK.max(cluster),
                m => (m.min(CHUNK) / cluster * cluster).max(cluster),
            },
        };
        let iothread = self.node_iothread(&cbw);
        // Started when the transaction commits, in its drained section: the new
        // job pauses at once and resumes as the section ends (see `start_job`).
        self.start_job(job, Some(iothread), move || backup.run())?;
        Ok(())
    }

    /// QEMU runs these commands as transactions, which begin by draining every node
    /// (`bdrv_drain_all`): every running job pauses at its next pause point and
    /// resumes when the drained section ends, with the status changes that go with
    /// it, even when the command then fails.
    fn drain_all_pauses_jobs(&mut self) {
        for id in self.jobs.unfinished() {
            self.pause_blip(&id);
        }
    }

    /// A job that is running or ready (and not paused by the user) is paused and
    /// resumed, as a drained section does.
    pub(super) fn pause_blip(&mut self, id: &str) {
        let events = self.events.clone();
        let Some(j) = self.jobs.get(id) else {
            return;
        };
        if j.user_paused {
            return;
        }
        if let (Some(paused), status) = (j.status.paused(), j.status) {
            self.jobs.transition(&events, id, paused);
            self.jobs.transition(&events, id, status);
        }
    }
}

/// The node below the filters on top of `node` (QEMU's `bdrv_skip_filters`).
fn skip_filters(node: &Arc<Node>) -> Arc<Node> {
    let mut n = node.clone();
    while blocklayer::drivers::kind(n.driver_name()) == Some(blocklayer::drivers::Kind::Filter) {
        match n.primary_child() {
            Some(c) => n = c,
            None => break,
        }
    }
    n
}

/// The bitmap of a `sync=bitmap` backup while the job runs (QEMU's frozen bitmap and
/// its successor): the bitmap is busy and records nothing; an anonymous successor
/// records the writes instead, if the bitmap did.
struct SyncBitmap {
    node: Arc<Node>,
    bitmap: Arc<NamedBitmap>,
    successor: Arc<DirtyBitmap>,
    was_enabled: bool,
    /// `bitmap-mode`: `on-success`, `always` or `never`.
    mode: &'static str,
}

impl SyncBitmap {
    /// QEMU's `bdrv_dirty_bitmap_create_successor` (the caller has drained `node`).
    fn begin(node: &Arc<Node>, bitmap: Arc<NamedBitmap>, mode: &'static str) -> SyncBitmap {
        let was_enabled = bitmap.enabled();
        let successor = Arc::new(DirtyBitmap::new(bitmap.size(), bitmap.granularity()));
        node.disable_bitmap(&bitmap);
        bitmap.set_busy(true);
        if was_enabled {
            node.add_bitmap(successor.clone());
            bitmap.set_successor_recording(true);
        }
        SyncBitmap {
            node: node.clone(),
            bitmap,
            successor,
            was_enabled,
            mode,
        }
    }

    /// QEMU's `backup_cleanup_sync_bitmap` (the caller has drained the node): after a
    /// success (or always, but never with `never`) the bitmap becomes its successor
    /// (`bdrv_dirty_bitmap_abdicate`); otherwise the successor's bits are merged
    /// back in (`bdrv_reclaim_dirty_bitmap`). A failed `always` job also marks the
    /// clusters it did not copy (`uncopied`, one bit per `cluster` bytes).
    fn end(self, ok: bool, uncopied: &ClusterBits, cluster: u64) {
        let take_successor = (ok || self.mode == "always") && self.mode != "never";
        let bits = self.bitmap.bits();
        if take_successor {
            bits.clear();
        }
        bits.merge_from(&self.successor);
        if !ok && self.mode == "always" {
            uncopied.mark_into(&bits, cluster);
        }
        if self.was_enabled {
            self.node.remove_bitmap(&self.successor);
            self.node.enable_bitmap(&self.bitmap);
            self.bitmap.set_successor_recording(false);
        }
        self.bitmap.set_busy(false);
    }
}

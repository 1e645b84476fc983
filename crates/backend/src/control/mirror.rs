//! `blockdev-mirror` and `drive-mirror` on the control thread: QEMU 7.2's argument
//! checks in its order and with its texts, the `mirror_top` filter, the job's users
//! and its end (the pivot, or the last copy of a soft cancel), which active commit
//! shares ([`Control::run_mirror`]).

use super::graph_ops::create_error;
use super::jobs::{check_busy, JobOpts};
use super::{generic, Control, OpResult, DRAIN_TIMEOUT};
use crate::config::OnError;
use crate::control::error::ControlError;
use crate::jobs::copy::JobCtx;
use crate::jobs::mirror::{copy_remaining, Budget, Mirror, Seed};
use crate::jobs::{Cleanup, Job, JobCore};
use blocklayer::aio::uring::block_on;
use blocklayer::backend::BlockBackend;
use blocklayer::bitmap::DirtyBitmap;
use blocklayer::drivers::file::create::{create_file, FilePrealloc};
use blocklayer::drivers::job_filter::{ActiveMirror, JobFilterKind};
use blocklayer::edge::Role;
use blocklayer::options::BlockdevOptions;
use blocklayer::perm::Perm;
use blocklayer::Node;
use serde_json::json;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// QEMU's default granularity of a mirror's dirty bitmap (a target that reports
/// no cluster size).
const DEFAULT_GRANULARITY: u64 = 65536;

/// What `blockdev-mirror` and `drive-mirror` share (QEMU 7.2 names).
pub struct MirrorCommon {
    pub replaces: Option<String>,
    /// `full`, `top`, `none`, `incremental` or `bitmap`.
    pub sync: &'static str,
    pub granularity: Option<u64>,
    pub buf_size: Option<i64>,
    /// drive-mirror's `unmap` (blockdev-mirror always unmaps).
    pub unmap: bool,
    pub on_target_error: OnError,
    pub filter_node_name: Option<String>,
    /// `copy-mode=write-blocking`.
    pub write_blocking: bool,
}

/// `drive-mirror`'s own arguments.
pub struct DriveMirror {
    pub device: String,
    pub target: String,
    pub format: Option<String>,
    pub node_name: Option<String>,
    /// `mode=existing` (else `absolute-paths`: the image is created).
    pub existing: bool,
}

/// How a mirror-like job ends, for [`Control::run_mirror`].
pub(super) struct MirrorRun {
    pub kind: &'static str,
    /// The node under the `mirror_top` filter.
    pub source: Arc<Node>,
    pub filter: Arc<Node>,
    pub target: Arc<Node>,
    /// The node the target takes the place of at the pivot.
    pub replaced: Arc<Node>,
    pub source_blk: BlockBackend,
    pub target_blk: BlockBackend,
    pub holds: Vec<BlockBackend>,
    pub dirty: Arc<DirtyBitmap>,
    pub seed: Seed,
    pub active: Option<Arc<ActiveMirror>>,
    /// The backing node the target takes when the job ends (drive-mirror's new
    /// image of `sync=top` or `none`).
    pub target_backing: Option<Arc<Node>>,
    /// drive-mirror `mode=existing`: the target was opened without the backing
    /// file its header names, which is opened when the job ends (QEMU's
    /// MIRROR_OPEN_BACKING_CHAIN).
    pub open_target_backing: bool,
    pub on_target_error: OnError,
    /// The job's copy buffer (`buf-size`, 0: the default), and whether zeroes
    /// written to the target may unmap.
    pub buf_size: u64,
    pub unmap: bool,
    /// Set once the pivot is made.
    pub pivoted: Arc<AtomicBool>,
    /// What the caller undoes when the job ends either way.
    pub cleanup: Option<Cleanup>,
}

/// Whether `to_replace` is `source` or below it through filters only (QEMU's
/// `bdrv_recurse_can_replace`): replacing it then changes nothing the guest sees.
fn can_replace(source: &Arc<Node>, to_replace: &Arc<Node>) -> bool {
    let mut n = source.clone();
    loop {
        if Arc::ptr_eq(&n, to_replace) {
            return true;
        }
        let children = n.children();
        match children.as_slice() {
            [c] if c.role() == Role::Filtered => n = c.node_arc(),
            _ => return false,
        }
    }
}

impl Control {
    /// `blockdev-mirror`
    pub fn blockdev_mirror(
        &mut self,
        device: &str,
        target: &str,
        a: MirrorCommon,
        o: JobOpts,
    ) -> OpResult<()> {
        let source = self.mirror_source(device)?;
        let target = self.lookup_device(target)?;
        // QEMU zeroes (or copies in full) what the target holds beyond the source's
        // data: an existing image may hold anything.
        self.mirror_common(source, target, a, o, TargetEnd::default(), ZeroTarget(true))
    }

    /// `drive-mirror`: creates the target image (unless `mode=existing`), opens it
    /// and mirrors to it; with `sync=top` the new image's backing file is the
    /// source's backing file, with `sync=none` the source itself.
    pub fn drive_mirror(
        &mut self,
        d: DriveMirror,
        mut a: MirrorCommon,
        o: JobOpts,
    ) -> OpResult<()> {
        let source = self.mirror_source(&d.device)?;
        check_busy(&source)?;
        // An existing image without a format given is probed, as QEMU does.
        let mut format = d.format.clone().unwrap_or_else(|| {
            if d.existing {
                String::new()
            } else {
                source.driver_name().to_string()
            }
        });
        let mut backing = match a.sync {
            "top" => source.backing(),
            "none" => Some(source.clone()),
            _ => None,
        };
        if a.sync == "top" && backing.is_none() {
            a.sync = "full";
        }
        if a.replaces.is_some() && d.node_name.is_none() {
            return Err(ControlError::generic(
                "a node-name must be provided when replacing a named node of the graph",
            ));
        }
        let path = Path::new(&d.target);
        if !d.existing {
            if a.sync == "full" {
                backing = None;
            }
            match format.as_str() {
                "qcow2" => self.create_qcow2(path, source.size(), backing.as_ref())?,
                "raw" if backing.is_some() => {
                    return Err(ControlError::generic(
                        "Backing file not supported for file format 'raw'",
                    ))
                }
                "raw" => create_file(path, source.size(), FilePrealloc::Off)
                    .map_err(|e| create_error(path, e))?,
                f if BlockdevOptions::is_qemu_driver(f) => {
                    return Err(ControlError::generic(format!(
                        "vubd creates mirror targets in the qcow2 and raw formats only, not '{f}'"
                    )))
                }
                f => return Err(ControlError::generic(format!("Unknown file format '{f}'"))),
            }
        } else {
            // QEMU opens an existing image without its backing file, and opens the
            // one its header names when the job ends (see `TargetEnd`).
            backing = None;
            if !path.exists() {
                return Err(ControlError::generic(format!(
                    "Could not open '{}': No such file or directory",
                    d.target
                )));
            }
            if format.is_empty() {
                format = blocklayer::graph::probe_format(path).map_err(generic)?;
            }
        }
        if let Some(n) = &d.node_name {
            if blocklayer::options::coerce::check_node_name("node-name", n).is_err() {
                return Err(ControlError::generic(format!("Invalid node-name: '{n}'")));
            }
        }
        let mut opts = json!({
            "driver": if format.is_empty() { "raw" } else { format.as_str() },
            "file": {"driver": "file", "filename": d.target},
        });
        if let Some(n) = &d.node_name {
            opts["node-name"] = json!(n);
        }
        if format == "qcow2" {
            // Opened without its backing file: the job attaches the source's to a
            // new image, an existing one's own when it ends.
            opts["backing"] = serde_json::Value::Null;
        }
        // The target is opened with the source's discard mode, as QEMU opens it with
        // the source's flags.
        if source.flags().discard_unmap {
            opts["discard"] = json!("unmap");
        }
        let target = self
            .graph
            .add_implicit(&BlockdevOptions::from_json(&opts).map_err(generic)?)
            .map_err(generic)?;
        let zero = a.sync == "full" && d.existing;
        let ends = TargetEnd {
            backing,
            open_backing: d.existing,
        };
        let r = self.mirror_common(source, target, a, o, ends, ZeroTarget(zero));
        // A target no job took is closed again, as QEMU's reference goes away.
        self.graph.collect_unused();
        r
    }

    /// The source of a mirror: a root node (QEMU's `qmp_get_root_bs`).
    fn mirror_source(&self, device: &str) -> OpResult<Arc<Node>> {
        let node = self.lookup_device(device)?;
        if !self.graph.is_root(&node) {
            return Err(ControlError::generic("Need a root block node"));
        }
        Ok(node)
    }

    /// QEMU's `blockdev_mirror_common`, `mirror_start` and `mirror_start_job`.
    fn mirror_common(
        &mut self,
        source: Arc<Node>,
        target: Arc<Node>,
        mut a: MirrorCommon,
        o: JobOpts,
        ends: TargetEnd,
        zero_target: ZeroTarget,
    ) -> OpResult<()> {
        let granularity = a.granularity.unwrap_or(0);
        if granularity != 0 && !(512..=64 << 20).contains(&granularity) {
            return Err(ControlError::generic(
                "Parameter 'granularity' expects a value in range [512B, 64MB]",
            ));
        }
        if !granularity.is_power_of_two() && granularity != 0 {
            return Err(ControlError::generic(
                "Parameter 'granularity' expects a power of 2",
            ));
        }
        check_busy(&source)?;
        Self::snapshot_blocked(&target)?;
        if a.sync == "top" && source.backing().is_none() {
            a.sync = "full";
        }
        let replaced = match &a.replaces {
            Some(r) => {
                let node = self.graph.get(r).ok_or_else(|| {
                    ControlError::generic(format!("Failed to find node with node-name='{r}'"))
                })?;
                Self::snapshot_blocked(&node)?;
                if !can_replace(&source, &node) {
                    return Err(ControlError::generic(format!(
                        "Cannot replace '{r}' by a node mirrored from '{}', because it cannot \
                         be guaranteed that doing so would not lead to an abrupt change of \
                         visible data",
                        source.name()
                    )));
                }
                if node.size() != source.size() {
                    return Err(ControlError::generic(
                        "cannot replace image with a mirror image of different size",
                    ));
                }
                node
            }
            None => source.clone(),
        };
        if matches!(a.sync, "incremental" | "bitmap") {
            return Err(ControlError::generic(format!(
                "Sync mode '{}' not supported",
                a.sync
            )));
        }
        if a.buf_size.is_some_and(|b| b < 0) {
            return Err(ControlError::generic("Invalid parameter 'buf-size'"));
        }
        if Arc::ptr_eq(&source, &target) {
            return Err(ControlError::generic("Can't mirror node into itself"));
        }
        if let Some(n) = &a.filter_node_name {
            if blocklayer::options::coerce::check_node_name("node-name", n).is_err() {
                return Err(ControlError::generic(format!("Invalid node-name: '{n}'")));
            }
        }
        let granularity = if granularity == 0 {
            DEFAULT_GRANULARITY
        } else {
            granularity
        };
        let dirty = Arc::new(DirtyBitmap::new(source.size(), granularity));
        let active = a
            .write_blocking
            .then(|| ActiveMirror::new(target.clone(), dirty.clone()));
        let filter = {
            let _d = self.graph.drain(&source, DRAIN_TIMEOUT).map_err(generic)?;
            let f = self
                .graph
                .insert_job_filter(
                    &source,
                    JobFilterKind::MirrorTop,
                    a.filter_node_name.as_deref(),
                    active.clone(),
                )
                .map_err(generic)?;
            source.add_job_bitmap(dirty.clone(), !a.write_blocking);
            if active.is_some() {
                f.serialise_begin();
            }
            f
        };
        let undo = |ctl: &mut Control| {
            if active.is_some() {
                filter.serialise_end();
            }
            source.remove_bitmap(&dirty);
            ctl.drop_job_filter(&filter);
        };
        let id = match self.job_id(&o) {
            Ok(id) => id,
            Err(e) => {
                undo(self);
                return Err(e);
            }
        };
        let users = self.mirror_users(&id, &source, &filter, &target);
        let (source_blk, target_blk, holds) = match users {
            Ok(u) => u,
            Err(e) => {
                undo(self);
                return Err(e);
            }
        };
        let seed = match a.sync {
            "none" => Seed::Nothing,
            "top" => Seed::Allocated {
                base: source.backing(),
                zero_target: false,
            },
            _ => Seed::Allocated {
                base: None,
                zero_target: zero_target.0,
            },
        };
        let core = Arc::new(JobCore::new(&id, o.speed as u64));
        let mut job = Job::new(&id, "mirror", core, true);
        job.auto_finalize = o.auto_finalize;
        job.auto_dismiss = o.auto_dismiss;
        self.run_mirror(
            job,
            o.on_error,
            MirrorRun {
                kind: "mirror",
                source,
                filter,
                target,
                replaced,
                source_blk,
                target_blk,
                holds,
                dirty,
                seed,
                active,
                target_backing: ends.backing,
                open_target_backing: ends.open_backing,
                on_target_error: a.on_target_error,
                buf_size: a.buf_size.unwrap_or(0) as u64,
                unmap: a.unmap,
                pivoted: Arc::new(AtomicBool::new(false)),
                cleanup: None,
            },
        )
    }

    /// QEMU's users of a mirror: the job reads the source through the filter and
    /// lets nobody resize it, writes the target (growing it to the source's size
    /// first) and lets others only write it unchanged, and blocks other jobs on
    /// the target.
    fn mirror_users(
        &mut self,
        id: &str,
        source: &Arc<Node>,
        filter: &Arc<Node>,
        target: &Arc<Node>,
    ) -> OpResult<(BlockBackend, BlockBackend, Vec<BlockBackend>)> {
        let source_blk = self.job_user(
            id,
            "mirror",
            "main node",
            filter,
            Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::WRITE,
        )?;
        let grow = target.size() < source.size();
        let mut perm = Perm::WRITE;
        if grow {
            perm |= Perm::RESIZE;
        }
        let target_blk = self.job_backend(target, perm, Perm::WRITE_UNCHANGED)?;
        if grow {
            let _d = self.graph.drain(target, DRAIN_TIMEOUT).map_err(generic)?;
            target.resize(source.size()).map_err(generic)?;
        }
        let holds = vec![self.job_user(id, "mirror", "target", target, Perm::NONE, Perm::ALL)?];
        Ok((source_blk, target_blk, holds))
    }

    /// Starts a mirror-like job (mirror, active commit) whose filter, users and
    /// bitmap are in place: at completion the last dirty ranges are copied with
    /// the source and target drained and the target takes the replaced node's
    /// place; a soft cancel in ready copies them without the pivot; either way the
    /// filter and the bitmap go.
    pub(super) fn run_mirror(
        &mut self,
        mut job: Job,
        on_error: OnError,
        r: MirrorRun,
    ) -> OpResult<()> {
        let end = {
            let (s, t, bm) = (r.source.clone(), r.target.clone(), r.dirty.clone());
            let (active, backing) = (r.active.clone(), r.target_backing.clone());
            let open_backing = r.open_target_backing;
            let core = job.core.clone();
            let budget = Budget::new(r.buf_size, r.dirty.granularity());
            move |ctl: &mut Control, pivot: Option<(Arc<Node>, Arc<AtomicBool>)>| {
                let _d = ctl
                    .graph
                    .drain_all(&[s.clone(), t.clone()], DRAIN_TIMEOUT)
                    .map_err(|e| e.to_string())?;
                if let Some(a) = &active {
                    a.stop();
                }
                block_on(copy_remaining(
                    core.clone(),
                    s.clone(),
                    t.clone(),
                    bm.clone(),
                    budget,
                ))?;
                if let Some(b) = &backing {
                    ctl.graph
                        .set_backing(&t, Some(b))
                        .map_err(|e| e.to_string())?;
                }
                // As QEMU's, a backing file that cannot be opened fails the job
                // (EINVAL) but does not hold back the pivot.
                let mut failed = None;
                if open_backing {
                    if let Err(e) = ctl.graph.open_header_backing(&t) {
                        log::error!("Could not open backing file: {e}");
                        failed = Some(blocklayer::error::strerror(libc::EINVAL));
                    }
                }
                if let Some((replaced, pivoted)) = pivot {
                    ctl.graph
                        .replace_node(&replaced, &t, None)
                        .map_err(|e| e.to_string())?;
                    pivoted.store(true, Ordering::Release);
                }
                failed.map_or(Ok(()), Err)
            }
        };
        let end2 = end.clone();
        let (replaced, pivoted) = (r.replaced.clone(), r.pivoted.clone());
        job.finish = Some(Box::new(move |ctl: &mut Control| {
            end(ctl, Some((replaced, pivoted)))
        }));
        job.soft_finish = Some(Box::new(move |ctl: &mut Control| end2(ctl, None)));
        let (s, f, bm, active, extra) = (
            r.source.clone(),
            r.filter.clone(),
            r.dirty.clone(),
            r.active.clone(),
            r.cleanup,
        );
        job.cleanup = Some(Box::new(move |ctl: &mut Control| {
            if let Some(a) = &active {
                a.stop();
                f.serialise_end();
            }
            s.remove_bitmap(&bm);
            ctl.drop_job_filter(&f);
            if let Some(c) = extra {
                c(ctl);
            }
            ctl.graph.collect_unused();
        }));
        let mut ctx = JobCtx::new(job.core.clone(), on_error, self.tx.clone());
        ctx.on_write_error = r.on_target_error;
        let m = Mirror {
            ctx,
            source: r.source_blk,
            target: r.target_blk,
            holds: r.holds,
            dirty: r.dirty,
            seed: r.seed,
            active: r.active,
            buf_size: r.buf_size,
            unmap: r.unmap,
            target_cluster: r.target.driver().image_info().cluster_size.unwrap_or(1),
        };
        log::info!(
            "{} job '{}': '{}' -> '{}'",
            r.kind,
            job.id,
            r.source.name(),
            r.target.name()
        );
        let iothread = self.node_iothread(&r.source);
        self.start_job(job, Some(iothread), move || m.run())
    }
}

/// What the target's backing becomes when the job ends: `backing` (drive-mirror's
/// new image), or with `open_backing` the one its header names.
#[derive(Default)]
struct TargetEnd {
    backing: Option<Arc<Node>>,
    open_backing: bool,
}

/// Whether a full mirror makes the target read as zeroes where the source has no
/// data (QEMU's `zero_target`).
#[derive(Clone, Copy)]
struct ZeroTarget(bool);

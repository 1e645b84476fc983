//! Block jobs on the control thread: starting stream and commit (checks, QEMU's
//! texts, permissions), the job verbs, the messages of job threads, and
//! finalization, where a job's graph change is made inside a drained section.

use super::mirror::MirrorRun;
use super::{generic, Control, OpResult, DRAIN_TIMEOUT};
use crate::config::OnError;
use crate::control::error::{ControlError, ErrorKind};
use crate::jobs::commit::Commit;
use crate::jobs::copy::{JobCtx, CANCELLED};
use crate::jobs::info::{BlockJobError, BlockJobPending, JobStatusChange};
use crate::jobs::mirror::Seed;
use crate::jobs::stream::Stream;
use crate::jobs::{Cancel, Job, JobCore, JobMsg, Status, Verb};
use blocklayer::backend::BlockBackend;
use blocklayer::drivers::job_filter::JobFilterKind;
use blocklayer::edge::Parent;
use blocklayer::error_policy::IoStatus;
use blocklayer::events::IoOperation;
use blocklayer::perm::Perm;
use blocklayer::Node;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What starts a job whose start waits for its transaction to commit.
pub(super) type DeferredStart = Box<dyn FnOnce(&mut Control) + Send>;

/// Arguments common to block jobs.
#[derive(Debug)]
pub struct JobOpts {
    pub job_id: Option<String>,
    pub speed: i64,
    pub on_error: OnError,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
}

/// `block-stream` arguments (QEMU 7.2 names).
pub struct StreamArgs {
    pub device: String,
    pub base: Option<String>,
    pub base_node: Option<String>,
    pub bottom: Option<String>,
    pub backing_file: Option<String>,
}

/// `block-commit` arguments.
pub struct CommitArgs {
    pub device: String,
    pub base_node: Option<String>,
    pub base: Option<String>,
    pub top_node: Option<String>,
    pub top: Option<String>,
    pub backing_file: Option<String>,
}

/// The image a node stands for in its chain: its filename.
fn filename(n: &Node) -> String {
    n.driver().filename()
}

/// QEMU's op blocker of a node a block job uses.
pub(super) fn check_busy(node: &Node) -> OpResult<()> {
    for e in node.parents() {
        if let Parent::Job { kind, .. } = e.parent() {
            return Err(ControlError::generic(format!(
                "Node '{}' is busy: block device is in use by block job: {kind}",
                node.name()
            )));
        }
    }
    Ok(())
}

impl Control {
    /// A node named where QEMU looks the name up as a device and as a node
    /// (`bdrv_lookup_bs(name, name)`), with QEMU's text.
    pub(super) fn lookup_device(&self, name: &str) -> OpResult<Arc<Node>> {
        self.graph.get(name).ok_or_else(|| {
            ControlError::generic(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            ))
        })
    }

    pub(super) fn job_id(&self, opts: &JobOpts) -> OpResult<String> {
        let Some(id) = &opts.job_id else {
            // QEMU takes the device's name, which a node of qemu-storage-daemon
            // does not have.
            return Err(ControlError::generic("Invalid job ID ''"));
        };
        self.jobs.check_id(id)?;
        if opts.speed < 0 {
            // QEMU creates the job before it sets the speed: the job appears and is
            // gone at once.
            for status in [Status::Created, Status::Null] {
                self.events
                    .emit_data("JOB_STATUS_CHANGE", &JobStatusChange { id, status });
            }
            return Err(ControlError::generic(
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        Ok(id.clone())
    }

    /// A user of `node` for job `id`, its edge named as QEMU names the job's edges.
    pub(super) fn job_user(
        &self,
        id: &str,
        kind: &'static str,
        edge: &'static str,
        node: &Arc<Node>,
        perm: Perm,
        shared: Perm,
    ) -> OpResult<BlockBackend> {
        BlockBackend::with_edge_name(
            &self.graph,
            Parent::Job {
                kind,
                id: id.to_string(),
            },
            edge,
            node,
            perm,
            shared,
        )
        .map_err(generic)
    }

    /// A block backend a job opens for itself (QEMU's `s->base`, `s->top`): an
    /// unnamed user of `node`.
    pub(super) fn job_backend(
        &self,
        node: &Arc<Node>,
        perm: Perm,
        shared: Perm,
    ) -> OpResult<BlockBackend> {
        BlockBackend::new(&self.graph, Parent::Backend(None), node, perm, shared).map_err(generic)
    }

    /// Registers a job and starts it: on `iothread`'s event loop, or on a thread of
    /// its own if none is given.
    pub(super) fn start_job<Fut>(
        &mut self,
        mut job: Job,
        iothread: Option<Arc<crate::iothread::IoThread>>,
        work: impl FnOnce() -> Fut + Send + 'static,
    ) -> OpResult<()>
    where
        Fut: std::future::Future<Output = Result<(), String>> + 'static,
    {
        let id = job.id.clone();
        job.auto_dismiss = job.auto_dismiss && job.block;
        job.txn = self.job_txn;
        let events = self.events.clone();
        self.jobs.insert(&events, job);
        if let Some(deferred) = &mut self.deferred_starts {
            // Created now, started when the transaction commits, still in its
            // drained section: it pauses at once and resumes as the section ends.
            let key = id.clone();
            let start: DeferredStart = Box::new(move |ctl: &mut Control| {
                ctl.run_job(&id, iothread, work);
                ctl.pause_blip(&id);
            });
            deferred.push((key, start));
            return Ok(());
        }
        self.run_job(&id, iothread, work);
        Ok(())
    }

    /// Starts a created job's work: running.
    fn run_job<Fut>(
        &mut self,
        id: &str,
        iothread: Option<Arc<crate::iothread::IoThread>>,
        work: impl FnOnce() -> Fut + Send + 'static,
    ) where
        Fut: std::future::Future<Output = Result<(), String>> + 'static,
    {
        let id = id.to_string();
        let events = self.events.clone();
        self.jobs.transition(&events, &id, Status::Running);
        let running = match iothread {
            Some(t) => Ok(crate::jobs::spawn_on(&id, self.tx.clone(), t, work)),
            None => crate::jobs::spawn_thread(&id, self.tx.clone(), work),
        };
        match running {
            Ok(r) => {
                if let Some(j) = self.jobs.get_mut(&id) {
                    j.running = Some(r);
                }
            }
            Err(e) => self.job_msg(JobMsg::Done {
                id,
                result: Err(e.to_string()),
            }),
        }
    }

    /// Defers the start of the jobs created from now on until
    /// [`Control::end_deferring`] (a transaction being prepared).
    pub(super) fn defer_job_starts(&mut self) {
        self.deferred_starts = Some(Vec::new());
    }

    /// Starts the deferred jobs (`start`: the transaction commits), or cancels them
    /// before they ever ran (it is undone).
    pub(super) fn end_deferring(&mut self, start: bool) {
        for (id, run) in self.deferred_starts.take().unwrap_or_default() {
            if start {
                run(self);
            } else if let Err(e) = self.job_cancel(&id, true, false) {
                log::error!("job {id}: cancelling a job never started: {}", e.desc);
            }
        }
    }

    /// On the way out (QEMU's `job_cancel_sync_all`): every job not yet concluded
    /// is cancelled, waited for, and its cleanup run (filters taken out,
    /// nodes reopened read-only), so that no job writes into an image being closed.
    pub(super) fn cancel_all_jobs(&mut self) {
        let ids = self.jobs.unfinished();
        self.cancel_jobs_sync(&ids);
    }

    /// Cancels jobs `ids` (forced) and waits for them to end, cleanup included
    /// (QEMU's `job_cancel_sync`).
    pub(super) fn cancel_jobs_sync(&mut self, ids: &[String]) {
        for id in ids {
            if let Some(j) = self.jobs.get_mut(id) {
                j.user_paused = false;
                j.core.request_cancel(Cancel::Force);
            }
        }
        let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
        for id in ids {
            let Some(t) = self.jobs.get_mut(id).and_then(|j| j.running.take()) else {
                continue;
            };
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if !t.is_finished() {
                log::error!("job {id}: still running at shutdown");
                continue;
            }
            t.join();
            self.job_done(id, Err(CANCELLED.to_string()));
        }
    }

    /// `block-stream`
    pub fn block_stream(&mut self, a: StreamArgs, o: JobOpts) -> OpResult<()> {
        let top = self.lookup_device(&a.device)?;
        if a.base.is_some() && a.base_node.is_some() {
            return Err(ControlError::generic(
                "'base' and 'base-node' cannot be specified at the same time",
            ));
        }
        if a.base.is_some() && a.bottom.is_some() {
            return Err(ControlError::generic(
                "'base' and 'bottom' cannot be specified at the same time",
            ));
        }
        if a.base_node.is_some() && a.bottom.is_some() {
            return Err(ControlError::generic(
                "'bottom' and 'base-node' cannot be specified at the same time",
            ));
        }
        let layers = top.backing_chain();
        let base: Option<Arc<Node>> = if let Some(f) = &a.base {
            Some(
                layers
                    .iter()
                    .skip(1)
                    .find(|n| filename(n) == *f)
                    .cloned()
                    .ok_or_else(|| {
                        ControlError::generic(format!("Can't find '{f}' in the backing chain"))
                    })?,
            )
        } else if let Some(b) = &a.base_node {
            let node = self.graph.lookup(b).map_err(generic)?;
            if !layers.iter().skip(1).any(|n| Arc::ptr_eq(n, &node)) {
                return Err(ControlError::generic(format!(
                    "Node '{b}' is not a backing image of '{}'",
                    a.device
                )));
            }
            Some(node)
        } else if let Some(b) = &a.bottom {
            let node = self.graph.lookup(b).map_err(generic)?;
            let Some(i) = layers.iter().position(|n| Arc::ptr_eq(n, &node)) else {
                return Err(ControlError::generic(format!(
                    "Node '{b}' is not in a chain starting from '{}'",
                    a.device
                )));
            };
            layers.get(i + 1).cloned()
        } else {
            None
        };
        // As QEMU: a backing file name needs `base` or `base-node` (with `bottom`
        // the base is worked out later, and the check sees none).
        if a.backing_file.is_some() && a.base.is_none() && a.base_node.is_none() {
            return Err(ControlError::generic(
                "backing file specified, but streaming the entire chain",
            ));
        }
        for n in &layers {
            if base.as_ref().is_some_and(|b| Arc::ptr_eq(b, n)) {
                break;
            }
            check_busy(n)?;
        }
        let id = self.job_id(&o)?;
        // The data is written into the top: a read-only top is reopened read-write
        // for the job, and read-only again when it ends (as QEMU does).
        let top_ro = top.is_read_only();
        let top = if top_ro {
            self.reopen_for_job(&top, true)?
        } else {
            top
        };
        let users = self.stream_users(&id, &top, &layers, base.as_ref());
        let (blk, holds) = match users {
            Ok(u) => u,
            Err(e) => {
                if top_ro {
                    let _ = self.reopen_for_job(&top, false);
                }
                return Err(e);
            }
        };
        // From now on guest writes to the top are serialised against the copies;
        // the drained section makes sure none is in flight untracked.
        {
            let _d = self.graph.drain(&top, DRAIN_TIMEOUT).map_err(generic)?;
            top.serialise_begin();
        }
        let core = Arc::new(JobCore::new(&id, o.speed as u64));
        // Known before the job's thread runs: a query right after `running` sees it.
        // (A stream with nothing between the top and the base has nothing to do.)
        let work = match (top.backing(), &base) {
            (None, _) => false,
            (Some(next), Some(b)) => !Arc::ptr_eq(&next, b),
            (Some(_), None) => true,
        };
        if work {
            core.set_len(top.size());
        }
        let mut job = Job::new(&id, "stream", core.clone(), true);
        job.auto_finalize = o.auto_finalize;
        job.auto_dismiss = o.auto_dismiss;
        let (t, b, backing_file) = (top.clone(), base.clone(), a.backing_file.clone());
        job.finish = Some(Box::new(move |ctl: &mut Control| {
            if !work {
                // Nothing was between the top and the base.
                return Ok(());
            }
            let _d = ctl
                .graph
                .drain(&t, DRAIN_TIMEOUT)
                .map_err(|e| e.to_string())?;
            let name = backing_file.or_else(|| b.as_ref().map(|b| filename(b)));
            let fmt = b.as_ref().map(|b| b.driver_name());
            t.driver()
                .change_backing_file(name.as_deref(), fmt)
                .map_err(|e| e.to_string())?;
            ctl.graph
                .set_backing(&t, b.as_ref())
                .map_err(|e| e.to_string())
        }));
        let t = top.clone();
        job.cleanup = Some(Box::new(move |ctl: &mut Control| {
            t.serialise_end();
            if top_ro {
                if let Err(e) = ctl.reopen_for_job(&t, false) {
                    log::warn!("stream: node '{}' stays read-write: {e:?}", t.name());
                }
            }
            ctl.graph.collect_unused();
        }));
        let stream = Stream {
            ctx: JobCtx::new(core, o.on_error, self.tx.clone()),
            blk,
            holds,
            base,
        };
        // The job's handles move to its iothread.
        let iothread = self.node_iothread(&top);
        self.start_job(job, Some(iothread), move || stream.run())
    }

    /// `block-commit`
    pub fn block_commit(&mut self, a: CommitArgs, o: JobOpts) -> OpResult<()> {
        let device = self.graph.get(&a.device).ok_or_else(|| {
            ControlError::new(
                ErrorKind::DeviceNotFound,
                format!("Device '{}' not found", a.device),
            )
        })?;
        // QEMU's root nodes: used by block backends only (a job is not one).
        if device
            .parents()
            .iter()
            .any(|e| !matches!(e.parent(), Parent::Backend(_)))
        {
            return Err(ControlError::generic("Need a root block node"));
        }
        check_busy(&device)?;
        if a.top_node.is_some() && a.top.is_some() {
            return Err(ControlError::generic(
                "'top-node' and 'top' are mutually exclusive",
            ));
        }
        if a.base_node.is_some() && a.base.is_some() {
            return Err(ControlError::generic(
                "'base-node' and 'base' are mutually exclusive",
            ));
        }
        let layers = device.backing_chain();
        let top = if let Some(t) = &a.top_node {
            let node = self.graph.lookup(t).map_err(generic)?;
            if !layers.iter().any(|n| Arc::ptr_eq(n, &node)) {
                return Err(ControlError::generic(format!(
                    "'{t}' is not in this backing file chain"
                )));
            }
            node
        } else if let Some(f) = &a.top {
            layers
                .iter()
                .find(|n| filename(n) == *f)
                .cloned()
                .ok_or_else(|| ControlError::generic(format!("Top image file {f} not found")))?
        } else {
            device.clone()
        };
        let below = top.backing_chain();
        let base = if let Some(b) = &a.base_node {
            let node = self.graph.lookup(b).map_err(generic)?;
            if !below.iter().any(|n| Arc::ptr_eq(n, &node)) {
                return Err(ControlError::generic(format!(
                    "'{b}' is not in this backing file chain"
                )));
            }
            node
        } else if let Some(f) = &a.base {
            below
                .iter()
                .skip(1)
                .find(|n| filename(n) == *f)
                .cloned()
                .ok_or_else(|| {
                    ControlError::generic(format!("Can't find '{f}' in the backing chain"))
                })?
        } else {
            // The bottom of the chain (the top itself when it has no backing file).
            below.last().cloned().unwrap_or_else(|| top.clone())
        };
        if Arc::ptr_eq(&top, &base) {
            return Err(ControlError::generic("cannot commit an image into itself"));
        }
        if Arc::ptr_eq(&top, &device) && a.backing_file.is_some() {
            return Err(ControlError::generic(
                "'backing-file' specified, but 'top' is the active layer",
            ));
        }
        let active = Arc::ptr_eq(&top, &device);
        for n in &below {
            check_busy(n)?;
        }
        let id = self.job_id(&o)?;
        // The base is written: reopen it read-write if it is a read-only backing file
        // (and read-only again when the job ends, unless an active commit pivoted
        // to it).
        let base_ro = base.is_read_only();
        let base = if base_ro {
            self.reopen_for_job(&base, true)?
        } else {
            base
        };
        if base.size() < top.size() {
            let _d = self.graph.drain(&base, DRAIN_TIMEOUT).map_err(generic)?;
            base.resize(top.size()).map_err(generic)?;
        }
        // As QEMU, a filter goes over the top (`commit_top`; `mirror_top` for an
        // active commit, through which guest writes reach it). It takes no read
        // permission below, so that the job can refuse other readers of the nodes it
        // drops from the chain while the chain above still reads through them.
        let kind = if active {
            JobFilterKind::MirrorTop
        } else {
            JobFilterKind::CommitTop
        };
        // The overlay of the top, whose backing the job changes at the end.
        let overlay = layers
            .iter()
            .position(|n| Arc::ptr_eq(n, &top))
            .and_then(|i| i.checked_sub(1))
            .map(|i| layers[i].clone());
        let filter = {
            let _d = self.graph.drain(&top, DRAIN_TIMEOUT).map_err(generic)?;
            self.graph.insert_filter(&top, kind).map_err(generic)?
        };
        let users = self.commit_users(&id, &device, &top, &base, &filter, overlay.as_ref(), active);
        let (top_blk, base_blk, holds) = match users {
            Ok(u) => u,
            Err(e) => {
                self.drop_job_filter(&filter);
                return Err(e);
            }
        };
        let core = Arc::new(JobCore::new(&id, o.speed as u64));
        if !active {
            core.set_len(top.size());
        }
        let mut job = Job::new(&id, "commit", core.clone(), true);
        job.auto_finalize = o.auto_finalize;
        job.auto_dismiss = o.auto_dismiss;
        // A base that was read-only goes back to read-only when the job ends, unless
        // an active commit pivoted to it.
        let pivoted = Arc::new(AtomicBool::new(false));
        let restore_base = {
            let (b, pivoted) = (base.clone(), pivoted.clone());
            move |ctl: &mut Control| {
                if base_ro && !pivoted.load(Ordering::Acquire) {
                    if let Err(e) = ctl.reopen_for_job(&b, false) {
                        log::warn!("commit: node '{}' stays read-write: {e:?}", b.name());
                    }
                }
            }
        };
        if active {
            // QEMU's active commit is a mirror of the top into the base.
            let dirty = Arc::new(blocklayer::bitmap::DirtyBitmap::new(top.size(), 65536));
            match self.graph.drain(&top, DRAIN_TIMEOUT) {
                Ok(_d) => top.add_job_bitmap(dirty.clone(), true),
                Err(e) => {
                    self.drop_job_filter(&filter);
                    return Err(generic(e));
                }
            }
            let run = MirrorRun {
                kind: "commit",
                source: top.clone(),
                filter,
                target: base.clone(),
                replaced: top.clone(),
                source_blk: top_blk,
                target_blk: base_blk,
                holds,
                dirty,
                seed: Seed::Allocated {
                    base: Some(base.clone()),
                    zero_target: false,
                },
                active: None,
                target_backing: None,
                open_target_backing: false,
                on_target_error: o.on_error,
                buf_size: 0,
                unmap: true,
                pivoted,
                cleanup: Some(Box::new(restore_base)),
            };
            return self.run_mirror(job, o.on_error, run);
        }
        // The overlay of the top takes the base as its backing.
        let (b, backing_file) = (base.clone(), a.backing_file.clone());
        job.finish = Some(Box::new(move |ctl: &mut Control| {
            let Some(ov) = overlay else {
                return Ok(());
            };
            let _d = ctl
                .graph
                .drain(&ov, DRAIN_TIMEOUT)
                .map_err(|e| e.to_string())?;
            let name = backing_file.unwrap_or_else(|| filename(&b));
            ov.driver()
                .change_backing_file(Some(&name), Some(b.driver_name()))
                .map_err(|e| e.to_string())?;
            ctl.graph
                .set_backing(&ov, Some(&b))
                .map_err(|e| e.to_string())
        }));
        job.cleanup = Some(Box::new(move |ctl: &mut Control| {
            ctl.drop_job_filter(&filter);
            restore_base(ctl);
            ctl.graph.collect_unused();
        }));
        let commit = Commit {
            ctx: JobCtx::new(core, o.on_error, self.tx.clone()),
            top: top_blk,
            base: base_blk,
            holds,
        };
        let iothread = self.node_iothread(&top);
        self.start_job(job, Some(iothread), move || commit.run())
    }

    /// QEMU's stream edges: the main node (its copy-on-read filter there), the
    /// active node, whose other users may write, and the intermediate nodes, which no
    /// one may write while their data moves up.
    fn stream_users(
        &self,
        id: &str,
        top: &Arc<Node>,
        layers: &[Arc<Node>],
        base: Option<&Arc<Node>>,
    ) -> OpResult<(BlockBackend, Vec<BlockBackend>)> {
        let blk = self.job_user(
            id,
            "stream",
            "main node",
            top,
            Perm::WRITE_UNCHANGED,
            Perm::ALL,
        )?;
        let basic = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
        let mut holds = vec![self.job_user(
            id,
            "stream",
            "active node",
            top,
            Perm::NONE,
            basic | Perm::WRITE,
        )?];
        for n in layers.iter().skip(1) {
            if base.is_some_and(|b| Arc::ptr_eq(b, n)) {
                break;
            }
            holds.push(self.job_user(id, "stream", "intermediate node", n, Perm::NONE, basic)?);
        }
        Ok((blk, holds))
    }

    /// Reopens a node a job writes read-write, or read-only again when the job is
    /// over (QEMU's `bdrv_reopen_set_read_only` in stream and commit); returns the
    /// node that now has the name.
    pub(super) fn reopen_for_job(
        &mut self,
        node: &Arc<Node>,
        writable: bool,
    ) -> OpResult<Arc<Node>> {
        let _d = self.graph.drain(node, DRAIN_TIMEOUT).map_err(generic)?;
        self.graph.reopen(node, writable).map_err(generic)
    }

    /// The users a commit takes, with QEMU's permissions and edge names: the main
    /// node (the device; the filter for an active commit, which reads through it),
    /// a reader of the top, the base written through its own backend, the nodes
    /// that leave the chain, and the overlay of the top, whose backing changes.
    #[allow(clippy::too_many_arguments)]
    fn commit_users(
        &self,
        id: &str,
        device: &Arc<Node>,
        top: &Arc<Node>,
        base: &Arc<Node>,
        filter: &Arc<Node>,
        overlay: Option<&Arc<Node>>,
        active: bool,
    ) -> OpResult<(BlockBackend, BlockBackend, Vec<BlockBackend>)> {
        let mut holds = Vec::new();
        let top_blk = if active {
            self.job_user(
                id,
                "commit",
                "main node",
                filter,
                Perm::CONSISTENT_READ,
                Perm::ALL,
            )?
        } else {
            holds.push(self.job_user(id, "commit", "main node", device, Perm::NONE, Perm::ALL)?);
            self.job_backend(top, Perm::NONE, Perm::ALL)?
        };
        let mut shared = Perm::CONSISTENT_READ | Perm::GRAPH_MOD | Perm::WRITE_UNCHANGED;
        if active {
            // The base is the backing of the source: its other users may write.
            shared |= Perm::WRITE;
        }
        let base_blk = self.job_backend(
            base,
            Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
            shared,
        )?;
        holds.push(self.job_user(id, "commit", "base", base, Perm::NONE, Perm::ALL)?);
        let leaving = top.backing_chain();
        let first = if active { 1 } else { 0 };
        for n in leaving.iter().skip(first) {
            if Arc::ptr_eq(n, base) {
                break;
            }
            holds.push(self.job_user(
                id,
                "commit",
                "intermediate node",
                n,
                Perm::NONE,
                Perm::WRITE_UNCHANGED | Perm::WRITE,
            )?);
        }
        if let Some(ov) = overlay.filter(|ov| !Arc::ptr_eq(ov, device)) {
            holds.push(self.job_user(id, "commit", "overlay of top", ov, Perm::NONE, Perm::ALL)?);
        }
        Ok((top_blk, base_blk, holds))
    }

    /// Takes a job's filter out of the graph again.
    pub(super) fn drop_job_filter(&mut self, filter: &Arc<Node>) {
        let r = self
            .graph
            .drain(filter, DRAIN_TIMEOUT)
            .and_then(|_d| self.graph.remove_filter(filter));
        if let Err(e) = r {
            log::error!("removing the job filter '{}': {e}", filter.name());
        }
    }

    /// A message from a job's thread.
    pub(super) fn job_msg(&mut self, msg: JobMsg) {
        let events = self.events.clone();
        match msg {
            JobMsg::Ready(id, at) => {
                let Some(j) = self.jobs.get_mut(&id) else {
                    return;
                };
                match j.status {
                    Status::Running => {
                        self.jobs.transition(&events, &id, Status::Ready);
                        self.jobs.ready_event(&events, &id, Some(at));
                    }
                    Status::Paused => j.ready_on_resume = true,
                    _ => {}
                }
            }
            JobMsg::Error {
                id,
                read,
                action,
                nospace,
            } => {
                let operation = if read {
                    IoOperation::Read
                } else {
                    IoOperation::Write
                };
                events.emit_data(
                    "BLOCK_JOB_ERROR",
                    &BlockJobError {
                        device: &id,
                        operation,
                        action,
                    },
                );
                if action != "stop" {
                    return;
                }
                if let Some(j) = self.jobs.get_mut(&id) {
                    j.user_paused = true;
                    j.io_status = if nospace {
                        IoStatus::Nospace
                    } else {
                        IoStatus::Failed
                    };
                    if let Some(to) = j.status.paused() {
                        self.jobs.transition(&events, &id, to);
                    }
                }
            }
            JobMsg::Done { id, result } => self.job_done(&id, result),
        }
    }

    fn job_done(&mut self, id: &str, result: Result<(), String>) {
        let events = self.events.clone();
        let Some(j) = self.jobs.get_mut(id) else {
            return;
        };
        let cancel = j.core.cancel_requested();
        if cancel == Cancel::Soft {
            // A ready mirror-like job cancelled softly completes without its pivot.
            j.finish = j.soft_finish.take();
        }
        let forced = cancel == Cancel::Force || result.as_ref().is_err_and(|e| e == CANCELLED);
        let txn = j.txn;
        match result {
            Ok(()) if !forced && txn.is_some() => {
                // Its transaction's jobs go on together once all have done their work.
                self.jobs.transition(&events, id, Status::Waiting);
                let t = txn.unwrap_or_default();
                let members = self.jobs.txn_members(t);
                if members.iter().all(|(_, s)| *s == Status::Waiting) {
                    for (m, _) in members {
                        self.job_go_pending(&m);
                    }
                }
            }
            Ok(()) if !forced => {
                let auto = j.auto_finalize;
                let kind = j.kind;
                self.jobs.transition(&events, id, Status::Waiting);
                self.jobs.transition(&events, id, Status::Pending);
                if auto {
                    self.finalize(id);
                } else {
                    events.emit_data("BLOCK_JOB_PENDING", &BlockJobPending { kind, id });
                }
            }
            r => {
                j.error = match (r, forced) {
                    (Err(e), false) => Some(e),
                    // As QEMU's job->ret of a cancelled job.
                    _ => Some("Operation canceled".to_string()),
                };
                self.jobs.transition(&events, id, Status::Aborting);
                self.finalize_single(id);
                if let Some(t) = txn {
                    self.abort_job_txn(t);
                }
            }
        }
    }

    /// A job of a grouped transaction whose work is done goes to pending, and is
    /// finalized if it finalizes on its own.
    fn job_go_pending(&mut self, id: &str) {
        let events = self.events.clone();
        let Some(j) = self.jobs.get(id) else {
            return;
        };
        let (auto, kind) = (j.auto_finalize, j.kind);
        self.jobs.transition(&events, id, Status::Pending);
        if auto {
            self.finalize(id);
        } else {
            events.emit_data("BLOCK_JOB_PENDING", &BlockJobPending { kind, id });
        }
    }

    /// One job of job transaction `t` failed or was cancelled: the others are
    /// cancelled (QEMU's `job_completed_txn_abort`). Those still working end through
    /// their own cancellation; those that finished their work end here.
    fn abort_job_txn(&mut self, t: u64) {
        let events = self.events.clone();
        for (m, status) in self.jobs.txn_members(t) {
            let Some(j) = self.jobs.get_mut(&m) else {
                continue;
            };
            j.core.request_cancel(Cancel::Force);
            j.user_paused = false;
            if matches!(status, Status::Waiting | Status::Pending) {
                j.finish = None;
                j.error = Some("Operation canceled".to_string());
                self.jobs.transition(&events, &m, Status::Aborting);
                self.finalize_single(&m);
            }
        }
    }

    /// Runs a pending job's graph change, then concludes it.
    fn finalize(&mut self, id: &str) {
        let events = self.events.clone();
        let finish = self.jobs.get_mut(id).and_then(|j| j.finish.take());
        if let Some(f) = finish {
            if let Err(e) = f(self) {
                log::error!("job {id}: finalization failed: {e}");
                if let Some(j) = self.jobs.get_mut(id) {
                    j.error = Some(e);
                }
                self.jobs.transition(&events, id, Status::Aborting);
            }
        }
        self.finalize_single(id);
    }

    fn finalize_single(&mut self, id: &str) {
        let events = self.events.clone();
        let cleanup = self.jobs.get_mut(id).and_then(|j| j.cleanup.take());
        if let Some(c) = cleanup {
            c(self);
        }
        self.jobs.completion_event(&events, id);
        self.jobs.transition(&events, id, Status::Concluded);
        if self.jobs.get(id).is_some_and(|j| j.auto_dismiss) {
            self.jobs.transition(&events, id, Status::Null);
        }
    }

    // ---- verbs -------------------------------------------------------------------

    pub fn job_pause(&mut self, id: &str, block: bool) -> OpResult<()> {
        let events = self.events.clone();
        self.jobs.pause(&events, id, block)
    }

    pub fn job_resume(&mut self, id: &str, block: bool) -> OpResult<()> {
        let events = self.events.clone();
        self.jobs.resume(&events, id, block)?;
        let ready = self
            .jobs
            .get_mut(id)
            .map(|j| std::mem::take(&mut j.ready_on_resume));
        if ready == Some(true)
            && self
                .jobs
                .get(id)
                .is_some_and(|j| j.status == Status::Running)
        {
            self.jobs.transition(&events, id, Status::Ready);
            self.jobs.ready_event(&events, id, None);
        }
        Ok(())
    }

    pub fn job_cancel(&mut self, id: &str, force: bool, block: bool) -> OpResult<()> {
        let events = self.events.clone();
        let status = if block {
            self.jobs.find_block(id)?.status
        } else {
            self.jobs.find(id)?.status
        };
        self.jobs.cancel(&events, id, force, block)?;
        // A job that has not started or has finished its work ends here.
        if matches!(status, Status::Created | Status::Pending | Status::Waiting) {
            if let Some(j) = self.jobs.get_mut(id) {
                j.finish = None;
                j.error = Some("Operation canceled".to_string());
            }
            self.jobs.transition(&events, id, Status::Aborting);
            self.finalize_single(id);
        }
        Ok(())
    }

    pub fn job_complete(&mut self, id: &str, block: bool) -> OpResult<()> {
        let job = self.jobs.check_verb(id, Verb::Complete, block)?;
        if job.core.cancel_requested() != Cancel::None || !matches!(job.kind, "commit" | "mirror") {
            return Err(ControlError::generic(format!(
                "The active block job '{id}' cannot be completed"
            )));
        }
        job.core.request_complete();
        Ok(())
    }

    pub fn job_finalize(&mut self, id: &str, block: bool) -> OpResult<()> {
        self.jobs.check_verb(id, Verb::Finalize, block)?;
        self.finalize(id);
        Ok(())
    }

    pub fn job_dismiss(&mut self, id: &str, block: bool) -> OpResult<()> {
        let events = self.events.clone();
        self.jobs.check_verb(id, Verb::Dismiss, block)?;
        self.jobs.transition(&events, id, Status::Null);
        Ok(())
    }

    pub fn job_set_speed(&mut self, id: &str, speed: i64) -> OpResult<()> {
        self.jobs.set_speed(id, speed)
    }

    pub fn query_block_jobs(&self) -> Vec<crate::jobs::info::BlockJobInfo> {
        self.jobs.query_block()
    }
}

//! The control plane: the daemon's graph, iothreads and exports, and every operation
//! that changes them. The command line (at start) and QMP commands (at run time) go
//! through the same operations, on the control thread, one at a time.
//!
//! An operation quiesces only what it touches: it pauses the exports on the nodes it
//! changes and drains those nodes; other exports keep serving.

use crate::config::{ExportConfig, IoThreadConfig, ObjectConfig};
use crate::export::{self, BlockExportDeleted, BlockExportInfo, Export, ExportError};
use crate::iothread::IoThread;
use crate::qmp::events::EventBus;
use crate::qmp::wire::QmpResult;
use blocklayer::aio::uring::block_on;
use blocklayer::backend::BlockBackend;
use blocklayer::edge::Parent;
use blocklayer::info::BlockDeviceInfo;
use blocklayer::options::BlockdevOptions;
use blocklayer::perm::Perm;
use blocklayer::stats::{BlockDeviceStats, BlockStats};
use blocklayer::{Graph, Node};
pub use error::ControlError;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

mod backup;
pub mod bitmaps;
pub mod error;
pub use backup::{BackupArgs, BackupPerf, DriveTarget};
pub mod graph_ops;
pub mod jobs;
pub mod mirror;
pub mod nbd;
mod qom;
mod snapshot;
pub mod transaction;

/// How long an operation waits for requests in flight to finish.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `block-export-del` waits for the export to stop (see
/// [`Control::del_export`]).
const EXPORT_DEL_WAIT: Duration = Duration::from_secs(1);

/// Messages to the control thread.
pub enum ControlMsg {
    /// A QMP command (after capabilities negotiation) and where its result goes.
    Execute {
        name: String,
        arguments: Value,
        reply: Sender<QmpResult>,
    },
    /// An export's serving thread has ended (after `block-export-del`).
    ExportGone(String),
    /// A block-layer event raised off the control thread (an iothread's
    /// `BLOCK_IO_ERROR`, a driver's `BLOCK_IMAGE_CORRUPTED`).
    BlockEvent(blocklayer::events::BlockEvent),
    /// A block job's thread reports.
    Job(crate::jobs::JobMsg),
    /// Shut the daemon down, then acknowledge.
    Shutdown(Sender<()>),
    /// A metrics scrape wants the figures ([`Control::metrics_snapshot`]).
    Metrics(std::sync::mpsc::SyncSender<crate::metrics::snapshot::Snapshot>),
}

pub(crate) use error::OpResult;

/// A [`ErrorKind::GenericError`](error::ErrorKind) reporting a lower-level error.
pub(crate) fn generic(e: impl std::error::Error + Send + Sync + 'static) -> ControlError {
    ControlError::from_source(e)
}

/// Whether `node` is `name` or has it below it in the graph.
fn depends_on(node: &Node, name: &str) -> bool {
    node.name() == name || node.children().iter().any(|c| depends_on(&c.node(), name))
}

struct ExportEntry {
    export: Arc<dyn Export>,
    shutting_down: bool,
}

/// The daemon's state, owned by the control thread.
pub struct Control {
    pub graph: Graph,
    iothreads: BTreeMap<String, Arc<IoThread>>,
    exports: BTreeMap<String, ExportEntry>,
    pub events: Arc<EventBus>,
    pub(crate) tx: Sender<ControlMsg>,
    pub pidfile: Option<PathBuf>,
    /// Files to remove at shutdown (monitor sockets).
    pub cleanup: Vec<PathBuf>,
    pub(crate) jobs: crate::jobs::Jobs,
    /// The iothread of nodes no export serves (QEMU's main loop), started when a job
    /// first needs it.
    main_loop: Option<Arc<IoThread>>,
    /// The NBD server (`nbd-server-start`, `--nbd-server`), if started.
    pub(crate) nbd_server: Option<Arc<crate::export::nbd::NbdServer>>,
    /// The job transaction new jobs join (a `completion-mode=grouped` transaction
    /// being prepared), and the next one's number.
    job_txn: Option<u64>,
    next_job_txn: u64,
    /// While a transaction is prepared: the jobs it created, each with what
    /// starts it (QEMU starts them when the transaction commits).
    deferred_starts: Option<Vec<(String, jobs::DeferredStart)>>,
}

impl Control {
    pub fn new(tx: Sender<ControlMsg>, events: Arc<EventBus>) -> Control {
        Control {
            graph: Graph::new(),
            iothreads: BTreeMap::new(),
            exports: BTreeMap::new(),
            events,
            tx,
            pidfile: None,
            cleanup: Vec::new(),
            jobs: crate::jobs::Jobs::default(),
            main_loop: None,
            nbd_server: None,
            job_txn: None,
            next_job_txn: 1,
            deferred_starts: None,
        }
    }

    /// The iothread a node's jobs run on: that of the first export whose node has it
    /// in its subtree, else the main loop.
    pub(crate) fn node_iothread(&mut self, node: &Arc<Node>) -> Arc<IoThread> {
        for e in self.exports.values() {
            if e.export.node().reaches(node) {
                if let Some(t) = e.export.iothreads().first() {
                    return t.clone();
                }
            }
        }
        if let Some(t) = &self.main_loop {
            return t.clone();
        }
        let cfg = crate::config::IoThreadConfig {
            id: "main-loop".into(),
            poll_max_ns: 0,
            poll_grow: 0,
            poll_shrink: 0,
            aio_max_batch: 0,
        };
        let t = IoThread::new(cfg, false).expect("the main loop's thread starts");
        self.main_loop = Some(t.clone());
        t
    }

    /// Runs the control loop until [`ControlMsg::Shutdown`].
    pub fn run(mut self, rx: Receiver<ControlMsg>) {
        for msg in rx {
            match msg {
                ControlMsg::Execute {
                    name,
                    arguments,
                    reply,
                } => {
                    log::info!("QMP {name} {arguments}");
                    let result = crate::qmp::commands::execute(&mut self, &name, &arguments);
                    if let Err(e) = &result {
                        log::info!("QMP {name} failed: {}", e.desc);
                    }
                    // The client may be gone; the command has had its effect anyway.
                    let _ = reply.send(result);
                }
                ControlMsg::ExportGone(id) => self.export_gone(&id),
                ControlMsg::BlockEvent(e) => self.events.emit_data(e.name(), &e),
                ControlMsg::Job(msg) => self.job_msg(msg),
                ControlMsg::Metrics(reply) => {
                    let _ = reply.send(self.metrics_snapshot());
                }
                ControlMsg::Shutdown(done) => {
                    self.shutdown();
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    // ---- iothreads -------------------------------------------------------------

    /// Adds an object; ids are one namespace across object types, as in QEMU.
    pub fn add_object(&mut self, object: ObjectConfig) -> OpResult<()> {
        if self.object_exists(object.id()) {
            return Err(ControlError::generic(format!(
                "attempt to add duplicate property '{}' to object (type 'container')",
                object.id()
            )));
        }
        match object {
            ObjectConfig::IoThread(cfg) => self.add_iothread(cfg),
            ObjectConfig::ThrottleGroup(cfg) => self.add_throttle_group(cfg),
            ObjectConfig::Secret(opts) => self.graph.secrets().add(&opts).map_err(generic),
            ObjectConfig::TlsCredsX509(opts) => self.graph.tls_creds().add(&opts).map_err(generic),
        }
    }

    /// Whether an object `id` exists (of any type: ids share QEMU's `/objects`).
    fn object_exists(&self, id: &str) -> bool {
        self.iothreads.contains_key(id)
            || self.graph.throttle_groups.contains_key(id)
            || self.graph.secrets().contains(id)
            || self.graph.tls_creds().contains(id)
    }

    fn duplicate_object(id: &str) -> ControlError {
        ControlError::generic(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        ))
    }

    fn add_throttle_group(&mut self, cfg: crate::config::ThrottleGroupConfig) -> OpResult<()> {
        if self.object_exists(&cfg.id) {
            return Err(Self::duplicate_object(&cfg.id));
        }
        let config = cfg.to_config().map_err(ControlError::generic)?;
        let group = blocklayer::throttle::ThrottleGroup::new(&cfg.id, config);
        self.graph.throttle_groups.insert(cfg.id, group);
        Ok(())
    }

    fn add_iothread(&mut self, cfg: IoThreadConfig) -> OpResult<()> {
        if self.object_exists(&cfg.id) {
            return Err(Self::duplicate_object(&cfg.id));
        }
        let t = IoThread::new(cfg, true).map_err(generic)?;
        self.iothreads.insert(t.id.clone(), t);
        Ok(())
    }

    /// The export an iothread object serves, if any.
    fn iothread_user(&self, id: &str) -> Option<&str> {
        self.exports.iter().find_map(|(eid, e)| {
            e.export
                .iothreads()
                .iter()
                .any(|t| t.is_object && t.id == id)
                .then_some(eid.as_str())
        })
    }

    pub fn del_object(&mut self, id: &str) -> OpResult<()> {
        if let Some(g) = self.graph.throttle_groups.get(id) {
            // Held by the registry and by every throttle node that joined it.
            if std::sync::Arc::strong_count(g) > 1 {
                return Err(ControlError::generic(format!(
                    "object '{id}' is in use, can not be deleted"
                )));
            }
            self.graph.throttle_groups.remove(id);
            return Ok(());
        }
        // Drivers keep what they derived from a secret: it may go at any time.
        if self.graph.secrets().remove(id) {
            return Ok(());
        }
        // A server or connection that took the credentials keeps them (as in QEMU).
        if self.graph.tls_creds().remove(id) {
            return Ok(());
        }
        if !self.iothreads.contains_key(id) {
            return Err(ControlError::generic(format!("object '{id}' not found")));
        }
        if self.iothread_user(id).is_some() {
            return Err(ControlError::generic(format!(
                "object '{id}' is in use, can not be deleted"
            )));
        }
        self.iothreads.remove(id);
        Ok(())
    }

    pub fn query_iothreads(&self) -> Vec<crate::iothread::IoThreadInfo> {
        self.iothreads.values().map(|t| t.info()).collect()
    }

    // ---- nodes -----------------------------------------------------------------

    pub fn add_blockdev(&mut self, opts: &BlockdevOptions) -> OpResult<()> {
        self.graph.add(opts).map(|_| ()).map_err(generic)
    }

    /// Exports (also those shutting down) whose root is `node`.
    fn exports_of(&self, node: &str) -> Vec<&ExportEntry> {
        self.exports
            .values()
            .filter(|e| e.export.node().name() == node)
            .collect()
    }

    pub fn del_blockdev(&mut self, name: &str) -> OpResult<()> {
        let Some(node) = self.graph.get(name) else {
            return Err(ControlError::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        if !self.exports_of(name).is_empty() {
            return Err(ControlError::generic(format!("Node {name} is in use")));
        }
        let drained = self.graph.drain(&node, DRAIN_TIMEOUT).map_err(generic)?;
        drop(node);
        let r = self.graph.remove(name).map_err(generic);
        // The drained section held the node: its inline children go only now.
        drop(drained);
        self.graph.collect_unused();
        r
    }

    /// Runs `op` inside a drained section of `node` (QEMU's `bdrv_drained_begin/end`):
    /// the users above and of the node hold new requests (exports keep their
    /// frontends' requests waiting), and those in flight have finished. Returns
    /// `op`'s result and the exports above the node.
    fn drained<T>(
        &self,
        node: &Arc<Node>,
        op: impl FnOnce() -> OpResult<T>,
    ) -> (OpResult<T>, Vec<Arc<dyn Export>>) {
        let name = node.name();
        let exports: Vec<_> = self
            .exports
            .values()
            .filter(|e| depends_on(&e.export.node(), name))
            .map(|e| e.export.clone())
            .collect();
        let r = match self.graph.drain(node, DRAIN_TIMEOUT) {
            Ok(_drained) => op(),
            Err(e) => Err(generic(e)),
        };
        (r, exports)
    }

    /// `block_resize`: resizes a node; the exports above it are paused meanwhile and
    /// then tell their frontends the new capacity.
    pub fn resize(&mut self, name: &str, size: u64) -> OpResult<()> {
        let node = self.graph.lookup(name).map_err(generic)?;
        // QEMU's op blockers: a backing node, and a node a job uses, may not be
        // resized. QEMU names the device, which is NULL for a node-name ("(null)").
        let blocked = node.parents().iter().any(|e| {
            e.role() == blocklayer::edge::Role::Backing || matches!(e.parent(), Parent::Job { .. })
        });
        if blocked {
            return Err(ControlError::generic("Device '(null)' is in use"));
        }
        // As QEMU, the resize is a user of the node that takes the resize
        // permission: refused when another user does not share it.
        let _user = BlockBackend::new(
            &self.graph,
            Parent::Backend(None),
            &node,
            Perm::RESIZE,
            Perm::ALL,
        )
        .map_err(generic)?;
        let (r, exports) = self.drained(&node, || node.resize(size).map_err(generic));
        r?;
        for e in &exports {
            e.notify_resize();
        }
        Ok(())
    }

    pub fn query_named_block_nodes(&self, flat: bool) -> Vec<BlockDeviceInfo> {
        self.graph.query_named_block_nodes(flat)
    }

    /// QEMU's `BlockStats` of a node, with its `file` child as `parent` and its
    /// `backing` child as `backing`.
    fn node_stats(node: &Node, stats: BlockDeviceStats) -> BlockStats {
        let child_stats = |name: &str| {
            node.children()
                .into_iter()
                .find(|c| c.name() == name)
                .map(|c| Box::new(Self::node_stats(&c.node(), c.node().stats.snapshot())))
        };
        BlockStats {
            node_name: Some(node.name().to_string()),
            stats,
            driver_specific: node.driver().driver_specific_stats(),
            parent: child_stats("file"),
            backing: child_stats("backing"),
            device: None,
            qdev: None,
        }
    }

    /// `query-blockstats`: one entry per export (the statistics of what its frontend
    /// asked for), or with `query_nodes` one per node.
    pub fn query_blockstats(&self, query_nodes: bool) -> Vec<BlockStats> {
        if query_nodes {
            return self
                .graph
                .nodes()
                .map(|n| Self::node_stats(n, n.stats.snapshot()))
                .collect();
        }
        self.exports
            .values()
            .map(|e| {
                let ex = &e.export;
                BlockStats {
                    device: Some(String::new()),
                    qdev: Some(ex.id().to_string()),
                    ..Self::node_stats(&ex.node(), ex.blk().stats().snapshot())
                }
            })
            .collect()
    }

    /// The figures a metrics scrape shows: every export's request counters, every
    /// iothread (with the implicit ones and the main loop), every node's statistics.
    pub fn metrics_snapshot(&self) -> crate::metrics::snapshot::Snapshot {
        use crate::metrics::snapshot::{ExportSample, IoThreadSample, NodeSample, Snapshot};
        let mut loops: BTreeMap<String, Arc<IoThread>> = self.iothreads.clone();
        for e in self.exports.values() {
            for t in e.export.iothreads() {
                loops.entry(t.id.clone()).or_insert(t);
            }
        }
        if let Some(t) = &self.main_loop {
            loops.entry(t.id.clone()).or_insert_with(|| t.clone());
        }
        Snapshot {
            exports: self
                .exports
                .values()
                .filter_map(|e| {
                    let queues = e.export.queue_samples()?;
                    Some(ExportSample {
                        id: e.export.id().to_string(),
                        queues,
                        per_queue: e.export.queue_series(),
                    })
                })
                .collect(),
            iothreads: loops
                .into_iter()
                .map(|(id, t)| IoThreadSample {
                    id,
                    counters: t.event_loop().counters().sample(),
                })
                .collect(),
            nodes: self
                .graph
                .nodes()
                .map(|n| NodeSample::of(n.name(), &n.stats))
                .collect(),
        }
    }

    // ---- exports ---------------------------------------------------------------

    /// The iothreads an export asks for (its own implicit one if none).
    fn export_iothreads(&self, cfg: &ExportConfig) -> OpResult<Vec<Arc<IoThread>>> {
        if cfg.iothreads.is_empty() {
            return Ok(vec![IoThread::implicit(&cfg.id).map_err(generic)?]);
        }
        let mut threads: Vec<Arc<IoThread>> = Vec::new();
        for id in &cfg.iothreads {
            let t = self
                .iothreads
                .get(id)
                .ok_or_else(|| ControlError::generic(format!("iothread \"{id}\" not found")))?;
            if threads.iter().any(|x| x.id == *id) {
                return Err(ControlError::generic(format!(
                    "iothread '{id}' is listed twice"
                )));
            }
            threads.push(t.clone());
        }
        if cfg.nbd.is_none() && threads.len() > usize::from(cfg.num_queues) {
            return Err(ControlError::generic(format!(
                "num-queues ({}) is smaller than the number of iothreads ({}); each iothread \
                 needs a queue",
                cfg.num_queues,
                threads.len()
            )));
        }
        Ok(threads)
    }

    pub fn add_export(&mut self, cfg: &ExportConfig) -> OpResult<()> {
        if self.exports.contains_key(&cfg.id) {
            return Err(ControlError::generic(format!(
                "Block export id '{}' is already in use",
                cfg.id
            )));
        }
        let node = self.graph.lookup(&cfg.node_name).map_err(generic)?;
        // As in QEMU, exports share their node with every other user (a second export
        // of a node is how a VM migrates between two QEMUs on one host: each attaches
        // to its own socket, and QEMU starts the destination's rings only after the
        // source stopped its own). Image locks still keep other processes out.
        if let Some(other) = self.exports_of(node.name()).first() {
            log::info!(
                "export {}: node '{}' is also exported by '{}'",
                cfg.id,
                node.name(),
                other.export.id()
            );
        }
        let nbd = match &cfg.nbd {
            Some(n) => Some(self.nbd_export_params(cfg, n, &node)?),
            None => None,
        };
        if let Some(e) = self
            .exports
            .values()
            .filter(|_| cfg.nbd.is_none())
            .find(|e| e.export.socket_path() == Some(cfg.socket_path.as_path()))
        {
            return Err(ControlError::generic(format!(
                "socket '{}' is used by export '{}'",
                cfg.socket_path.display(),
                e.export.id()
            )));
        }
        let threads = self.export_iothreads(cfg)?;
        if cfg.writable && node.is_read_only() {
            return Err(generic(ExportError::ReadOnlyNode(node.name().to_string())));
        }
        // As QEMU's exports: consistent reads (and writes), everything shared.
        let mut perm = Perm::CONSISTENT_READ;
        if cfg.writable {
            perm |= Perm::WRITE;
        }
        let blk = BlockBackend::new(&self.graph, Parent::Backend(None), &node, perm, Perm::ALL)
            .map_err(generic)?;
        let tx = self.tx.clone();
        let id = cfg.id.clone();
        let export = export::create(cfg, blk, threads, nbd, move || {
            let _ = tx.send(ControlMsg::ExportGone(id));
        })
        .map_err(generic)?;
        match export.nbd() {
            Some(n) => log::info!(
                "export {} serving node '{}' over NBD as '{}'",
                cfg.id,
                cfg.node_name,
                n.name()
            ),
            None => log::info!(
                "export {} serving node '{}' on {}",
                cfg.id,
                cfg.node_name,
                match &cfg.socket_fd {
                    Some(fd) => format!("inherited socket {fd}"),
                    None => cfg.socket_path.display().to_string(),
                }
            ),
        }
        self.exports.insert(
            cfg.id.clone(),
            ExportEntry {
                export,
                shutting_down: false,
            },
        );
        Ok(())
    }

    /// `block-export-del`: starts removing an export; `BLOCK_EXPORT_DELETED` follows
    /// once its serving thread has ended. As in QEMU, a vhost-user-blk frontend does
    /// not hold the export: `mode=safe` and `mode=hard` both drop a connected frontend
    /// (after its requests in flight finish).
    pub fn del_export(&mut self, id: &str, hard: bool) -> OpResult<()> {
        let Some(entry) = self.exports.get_mut(id) else {
            return Err(ControlError::generic(format!("Export '{id}' is not found")));
        };
        // An NBD client holds its export: `mode=safe` refuses to drop it (QEMU's
        // text).
        if !hard && entry.export.nbd().is_some_and(|n| n.in_use()) {
            return Err(ControlError::generic(format!("export '{id}' still in use")));
        }
        if entry.shutting_down {
            return Err(ControlError::generic(format!(
                "Export '{id}' is already shutting down"
            )));
        }
        entry.shutting_down = true;
        entry.export.stop();
        // An export without a frontend stops at once. Waiting for it here queues its
        // removal (ExportGone) before the client's next command, which then finds
        // its node free, as after QEMU's block-export-del; the event still follows
        // the reply.
        entry.export.wait_stopped(EXPORT_DEL_WAIT);
        Ok(())
    }

    fn export_gone(&mut self, id: &str) {
        if let Some(entry) = self.exports.remove(id) {
            if let Some(path) = entry.export.socket_path() {
                let _ = std::fs::remove_file(path);
            }
            log::info!("export {id} deleted");
            self.events
                .emit_data("BLOCK_EXPORT_DELETED", &BlockExportDeleted { id });
        }
    }

    pub fn query_block_exports(&self) -> Vec<BlockExportInfo> {
        self.exports
            .values()
            .map(|e| {
                let ex = &e.export;
                BlockExportInfo {
                    id: ex.id().to_string(),
                    kind: ex.type_name(),
                    node_name: ex.node().name().to_string(),
                    shutting_down: e.shutting_down,
                    iostatus: ex.blk().iostatus_enabled().then(|| ex.blk().iostatus()),
                }
            })
            .collect()
    }

    /// `x-blockdev-set-iothread`: moves the exports of a node to another iothread
    /// (`None`: an iothread of their own), pausing each while it moves.
    pub fn set_iothread(
        &mut self,
        name: &str,
        iothread: Option<&str>,
        force: bool,
    ) -> OpResult<()> {
        if self.graph.get(name).is_none() {
            return Err(ControlError::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        }
        let exports: Vec<_> = self
            .exports_of(name)
            .into_iter()
            .filter(|e| !e.shutting_down)
            .map(|e| e.export.clone())
            .collect();
        if !exports.is_empty() && !force {
            return Err(ControlError::generic(format!(
                "Node {name} is associated with a BlockBackend and could be in use (use \
                 force=true to override this check)"
            )));
        }
        let target = match iothread {
            Some(id) => Some(
                self.iothreads
                    .get(id)
                    .cloned()
                    .ok_or_else(|| ControlError::generic(format!("Cannot find iothread {id}")))?,
            ),
            None => None,
        };
        for e in &exports {
            if e.fixed_iothread() {
                return Err(ControlError::generic(format!(
                    "Cannot change iothread of export '{}' (fixed-iothread=on)",
                    e.id()
                )));
            }
            if e.iothreads().len() != 1 {
                return Err(ControlError::generic(format!(
                    "export '{}' runs on {} iothreads; only a single-iothread export can \
                     be moved",
                    e.id(),
                    e.iothreads().len()
                )));
            }
        }
        for e in &exports {
            let t = match &target {
                Some(t) => t.clone(),
                None => IoThread::implicit(e.id()).map_err(generic)?,
            };
            if !e.move_to_iothread(t, DRAIN_TIMEOUT) {
                return Err(ControlError::generic(format!(
                    "export '{}' still has requests in flight",
                    e.id()
                )));
            }
        }
        Ok(())
    }

    /// `cont`: resumes every export stopped by an I/O error (QEMU resumes the VM);
    /// `x-block-export-cont`: one export.
    pub fn cont(&mut self, id: Option<&str>) -> OpResult<()> {
        match id {
            Some(id) => {
                let e = self
                    .exports
                    .get(id)
                    .ok_or_else(|| ControlError::generic(format!("Export '{id}' is not found")))?;
                e.export.cont();
            }
            None => {
                for e in self.exports.values() {
                    e.export.cont();
                }
            }
        }
        Ok(())
    }

    // ---- jobs ------------------------------------------------------------------

    /// `blockdev-create`: formats a node (`driver: qcow2`, `file` an existing node)
    /// or creates a host file (`driver: file`), as a job on its own thread: the
    /// monitor answers meanwhile (a full preallocation can take long).
    pub fn blockdev_create(&mut self, job_id: &str, options: &Value) -> OpResult<()> {
        use crate::jobs::{Job, JobCore};
        self.jobs.check_id(job_id)?;
        let work = self.create_work(options)?;
        let core = Arc::new(JobCore::new(job_id, 0));
        core.set_len(1);
        let mut job = Job::new(job_id, "create", core.clone(), false);
        job.auto_dismiss = false;
        self.start_job(job, None, move || async move {
            let r = work();
            // QEMU's create jobs count their one step done either way.
            core.progress(1);
            r
        })
    }

    /// `x-blockdev-amend`: changes format options of an open image, as a job. What
    /// vubd amends is the key slots of LUKS headers: of `luks` nodes, and of qcow2
    /// images with `encrypt` (other qcow2 options have nothing to amend and succeed
    /// without a change, as in QEMU). The change runs in the job, whose errors carry
    /// QEMU's texts.
    pub fn blockdev_amend(
        &mut self,
        job_id: &str,
        node: &str,
        options: &Value,
        force: bool,
    ) -> OpResult<()> {
        use crate::jobs::{Job, JobCore};
        let plan = amend_options(options)?;
        let node = self.graph.lookup(node).map_err(generic)?;
        let driver = options["driver"].as_str().unwrap_or_default();
        if driver != node.driver_name() {
            return Err(ControlError::generic(
                "x-blockdev-amend doesn't support changing the block driver",
            ));
        }
        if driver != "qcow2" && driver != "luks" {
            return Err(ControlError::generic(
                "Driver does not support x-blockdev-amend",
            ));
        }
        // (QEMU 7.2 says so for luks; on a read-only qcow2 node it aborts.)
        if node.is_read_only() {
            return Err(ControlError::generic("Block node is read-only"));
        }
        self.jobs.check_id(job_id)?;
        let core = Arc::new(JobCore::new(job_id, 0));
        core.set_len(1);
        let mut job = Job::new(job_id, "amend", core.clone(), false);
        job.auto_dismiss = false;
        let secrets = self.graph.secrets().clone();
        self.start_job(job, None, move || async move {
            let r = match plan {
                AmendPlan::Nothing => Ok(()),
                AmendPlan::OtherFormat if node.driver().is_encrypted() => {
                    Err("Amend can't be used to change the qcow2 encryption format".to_string())
                }
                AmendPlan::OtherFormat => Err("image is not encrypted, can't amend".to_string()),
                AmendPlan::Keys(request) => node
                    .driver()
                    .amend_encryption(&request, &secrets, force)
                    .map_err(|e| e.to_string()),
            };
            core.progress(1);
            r
        })
    }

    /// Checks the creation options now (QMP errors) and returns the work to run in
    /// the job (whose errors end up in the job).
    fn create_work(
        &self,
        options: &Value,
    ) -> OpResult<Box<dyn FnOnce() -> std::result::Result<(), String> + Send>> {
        use blocklayer::options::coerce::Fields;
        let e = ControlError::from_source;
        let mut f = Fields::new_strict(options, "options").map_err(e)?;
        let driver = f.required_string("driver").map_err(e)?;
        let create = blocklayer::drivers::create_fn(&driver).map_err(generic)?;
        let work = create(f, &self.graph).map_err(generic)?;
        Ok(Box::new(move || work().map_err(|e| e.to_string())))
    }

    pub fn dismiss_job(&mut self, id: &str) -> OpResult<()> {
        self.job_dismiss(id, false)
    }

    pub fn query_jobs(&self) -> Vec<crate::jobs::info::JobInfo> {
        self.jobs.query()
    }

    // ---- shutdown --------------------------------------------------------------

    /// Drains every export, closes the images (qcow2: metadata written, the dirty bit
    /// cleared) and flushes every writable node, removes the sockets and the pidfile.
    fn shutdown(&mut self) {
        self.cancel_all_jobs();
        if let Some(server) = self.nbd_server.take() {
            server.stop();
        }
        for e in self.exports.values() {
            if !e.export.quiesce(DRAIN_TIMEOUT) {
                log::error!(
                    "export {}: requests still in flight after 30 s",
                    e.export.id()
                );
            }
        }
        // Exports may keep nodes alive past the graph, so their images are closed
        // here rather than when the nodes are dropped.
        for node in self.graph.nodes_parents_first() {
            if node.is_read_only() {
                continue;
            }
            // A clean close stores the persistent bitmaps, not in use any more.
            if let Err(e) = node.store_persistent_bitmaps() {
                log::error!(
                    "node '{}': storing its persistent bitmaps failed: {e}",
                    node.name()
                );
            }
            if let Err(e) = node.driver().close() {
                log::error!("closing node '{}' failed: {e}", node.name());
            }
        }
        for node in self.graph.nodes() {
            if node.is_read_only() {
                continue;
            }
            let n = node.clone();
            if let Err(e) = block_on(async move { n.flush().await }) {
                log::error!("flushing node '{}' failed: {e}", node.name());
            }
        }
        for (id, e) in &self.exports {
            if let Some(path) = e.export.socket_path() {
                let _ = std::fs::remove_file(path);
            }
            // As qemu-storage-daemon, which deletes its exports on the way out.
            self.events
                .emit_data("BLOCK_EXPORT_DELETED", &BlockExportDeleted { id });
        }
        for p in self.cleanup.iter().chain(self.pidfile.iter()) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What `x-blockdev-amend` asks.
enum AmendPlan {
    /// Nothing to change (qcow2 without `encrypt`).
    Nothing,
    /// A qcow2 `encrypt` of another format than `luks`.
    OtherFormat,
    /// A key-slot change of a LUKS header.
    Keys(blocklayer::drivers::luks::keyslots::AmendRequest),
}

/// Checks `x-blockdev-amend`'s `options` (QEMU's `BlockdevAmendOptions`: a `driver`,
/// and members for `luks` and `qcow2` only) with QEMU's texts.
fn amend_options(options: &Value) -> OpResult<AmendPlan> {
    use blocklayer::drivers::luks::keyslots::AmendRequest;
    use blocklayer::options::coerce::Fields;
    let e = ControlError::from_source;
    let mut f = Fields::new_strict(options, "options").map_err(e)?;
    let driver = f.required_string("driver").map_err(e)?;
    if !BlockdevOptions::is_qemu_driver(&driver) && blocklayer::drivers::find(&driver).is_none() {
        // (QEMU names the member without its path here.)
        return Err(ControlError::generic(format!(
            "Parameter 'driver' does not accept value '{driver}'"
        )));
    }
    let mut plan = AmendPlan::Nothing;
    match driver.as_str() {
        "luks" => plan = AmendPlan::Keys(AmendRequest::take_from(&mut f).map_err(e)?),
        "qcow2" => {
            if let Some(mut c) = f.object("encrypt").map_err(e)? {
                let format = c.required_string("format").map_err(e)?;
                plan = match format.as_str() {
                    "luks" => AmendPlan::Keys(AmendRequest::take_from(&mut c).map_err(e)?),
                    "qcow" => AmendPlan::OtherFormat,
                    other => {
                        return Err(ControlError::generic(format!(
                            "Parameter 'options.encrypt.format' does not accept value '{other}'"
                        )))
                    }
                };
                c.finish().map_err(e)?;
            }
        }
        _ => {}
    }
    f.finish().map_err(e)?;
    Ok(plan)
}

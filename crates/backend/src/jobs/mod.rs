//! Jobs as QMP sees them: QEMU's job state machine (`JobStatus`, the transition and
//! verb tables of job.c), `JOB_STATUS_CHANGE` and the `BLOCK_JOB_*` events, and the
//! registry the control thread keeps.
//!
//! A block job (stream, commit) runs as a task of its node's iothread
//! ([`spawn_on`]), as in QEMU; blockdev-create and x-blockdev-amend, whose work
//! blocks, run on a thread of their own ([`spawn_thread`]). A job's I/O goes through block backends, so drained
//! sections hold it like any other user. It tells the control thread when it is
//! ready or done ([`JobMsg`]); the control thread moves the state machine, raises
//! the events and, at finalization, makes the job's graph changes. `blockdev-create`
//! runs on the control thread within the command, through the same states.

pub mod backup;
pub mod commit;
pub mod copy;
pub mod core;
pub mod info;
pub mod mirror;
pub mod stream;

use crate::control::error::{ControlError, ErrorKind};
use crate::iothread::IoThread;
use crate::qmp::events::EventBus;
use blocklayer::error_policy::IoStatus;
use info::{BlockJobEvent, BlockJobInfo, JobInfo, JobStatusChange};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use self::core::{Cancel, Cancelled, JobCore, RateLimit};

/// QEMU's `JobStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created = 1,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Ready => "ready",
            Status::Standby => "standby",
            Status::Waiting => "waiting",
            Status::Pending => "pending",
            Status::Aborting => "aborting",
            Status::Concluded => "concluded",
            Status::Null => "null",
        }
    }

    /// Where a pause takes a job in this state (running -> paused, ready -> standby).
    pub fn paused(self) -> Option<Status> {
        match self {
            Status::Running => Some(Status::Paused),
            Status::Ready => Some(Status::Standby),
            _ => None,
        }
    }

    /// Where a resume takes a job in this state (the reverse of [`Status::paused`]).
    pub fn resumed(self) -> Option<Status> {
        match self {
            Status::Paused => Some(Status::Running),
            Status::Standby => Some(Status::Ready),
            _ => None,
        }
    }

    /// QEMU's transition table (JobSTT).
    pub fn may_become(self, to: Status) -> bool {
        use Status::*;
        matches!(
            (self, to),
            (Created, Running | Aborting | Null)
                | (Running, Paused | Ready | Waiting | Aborting)
                | (Paused, Running)
                | (Ready, Standby | Waiting | Aborting)
                | (Standby, Ready)
                | (Waiting, Pending | Aborting)
                | (Pending, Aborting | Concluded)
                | (Aborting, Aborting | Concluded)
                | (Concluded, Null)
        )
    }
}

/// QEMU's `JobVerb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Complete,
    Finalize,
    Dismiss,
}

impl Verb {
    pub fn name(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::SetSpeed => "set-speed",
            Verb::Complete => "complete",
            Verb::Finalize => "finalize",
            Verb::Dismiss => "dismiss",
        }
    }

    /// QEMU's verb table (JobVerbTable).
    pub fn allowed_in(self, s: Status) -> bool {
        use Status::*;
        match self {
            Verb::Cancel => matches!(
                s,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            Verb::Pause | Verb::Resume | Verb::SetSpeed => {
                matches!(s, Created | Running | Paused | Ready | Standby)
            }
            // A paused ready job (standby) takes it too, and completes once resumed.
            Verb::Complete => matches!(s, Ready | Standby),
            Verb::Finalize => s == Pending,
            Verb::Dismiss => s == Concluded,
        }
    }
}

/// What a job's thread tells the control thread.
#[derive(Debug)]
pub enum JobMsg {
    /// The job has converged (mirror-like jobs): running -> ready. With the bytes
    /// copied by then (BLOCK_JOB_READY's `len` and `offset`: the job goes on
    /// copying before the control thread reads its progress).
    Ready(String, u64),
    /// An I/O error, and what `on-error` makes of it (BLOCK_JOB_ERROR's `action`:
    /// `report`, `ignore`, or `stop`, for which the job paused itself).
    Error {
        id: String,
        read: bool,
        action: &'static str,
        /// The error was ENOSPC (the job's io-status: nospace rather than failed).
        nospace: bool,
    },
    /// The job's work has ended (successfully, failed, or cancelled).
    Done {
        id: String,
        result: Result<(), String>,
    },
}

/// The graph change a job makes when it is finalized successfully.
pub type Finish = Box<dyn FnOnce(&mut crate::control::Control) -> Result<(), String> + Send>;
/// What a job undoes when it ends either way (serialisation, bitmaps).
pub type Cleanup = Box<dyn FnOnce(&mut crate::control::Control) + Send>;

pub struct Job {
    pub id: String,
    /// QMP's `JobType`: `create`, `stream`, `commit`.
    pub kind: &'static str,
    pub status: Status,
    pub core: Arc<JobCore>,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    pub user_paused: bool,
    /// QEMU's `BlockDeviceIoStatus` of the job: set when an error stops it, reset
    /// when it is resumed.
    pub io_status: IoStatus,
    /// The job converged while paused: it becomes ready when resumed.
    pub ready_on_resume: bool,
    pub error: Option<String>,
    /// Whether this is a block job (listed by query-block-jobs, with BLOCK_JOB_*).
    pub block: bool,
    pub finish: Option<Finish>,
    /// What a mirror-like job does instead of `finish` when it was cancelled softly
    /// in ready (the last copy without the pivot).
    pub soft_finish: Option<Finish>,
    pub cleanup: Option<Cleanup>,
    /// Where the job runs, waited for when the daemon shuts down.
    pub running: Option<Running>,
    /// The job transaction it belongs to (QEMU's `JobTxn`, from a transaction with
    /// `completion-mode=grouped`): its jobs complete together or fail together.
    pub txn: Option<u64>,
}

impl Job {
    pub fn new(id: &str, kind: &'static str, core: Arc<JobCore>, block: bool) -> Job {
        Job {
            id: id.to_string(),
            kind,
            status: Status::Created,
            core,
            auto_finalize: true,
            auto_dismiss: block,
            user_paused: false,
            io_status: IoStatus::Ok,
            ready_on_resume: false,
            error: None,
            block,
            finish: None,
            soft_finish: None,
            cleanup: None,
            running: None,
            txn: None,
        }
    }

    /// Whether the job was abandoned (a soft cancel completes the job instead).
    fn cancelled(&self) -> bool {
        self.core.cancel_requested() == Cancel::Force
    }

    /// QEMU's `BlockJobInfo` (query-block-jobs).
    pub fn block_info(&self) -> BlockJobInfo {
        BlockJobInfo {
            kind: self.kind,
            device: self.id.clone(),
            len: self.core.len(),
            offset: self.core.offset(),
            busy: self.core.is_busy() && matches!(self.status, Status::Running | Status::Ready),
            paused: self.user_paused,
            speed: self.core.speed(),
            io_status: self.io_status,
            ready: matches!(self.status, Status::Ready | Status::Standby),
            status: self.status,
            auto_finalize: self.auto_finalize,
            auto_dismiss: self.auto_dismiss,
            error: self.error.clone(),
        }
    }

    /// QEMU's `JobInfo` (query-jobs).
    pub fn info(&self) -> JobInfo {
        let total = if self.block {
            self.core.len()
        } else {
            self.core.len().max(1)
        };
        JobInfo {
            id: self.id.clone(),
            kind: self.kind,
            status: self.status,
            current_progress: self.core.offset(),
            total_progress: total,
            error: self.error.clone(),
        }
    }

    /// The data of BLOCK_JOB_COMPLETED, _CANCELLED and _READY.
    fn event_data(&self) -> BlockJobEvent<'_> {
        BlockJobEvent {
            kind: self.kind,
            device: &self.id,
            len: self.core.len(),
            offset: self.core.offset(),
            speed: self.core.speed(),
            error: None,
        }
    }
}

/// The error of a verb the job's state does not accept (QEMU's text).
fn verb_error(job: &Job, verb: Verb) -> ControlError {
    ControlError::generic(format!(
        "Job '{}' in state '{}' cannot accept command verb '{}'",
        job.id,
        job.status.name(),
        verb.name()
    ))
}

#[derive(Default)]
pub struct Jobs {
    jobs: BTreeMap<String, Job>,
}

impl Jobs {
    /// Checks a new job's id (QEMU's texts).
    pub fn check_id(&self, id: &str) -> Result<(), ControlError> {
        if self.jobs.contains_key(id) {
            return Err(ControlError::generic(format!(
                "Job ID '{id}' already in use"
            )));
        }
        if !blocklayer::options::coerce::is_valid_id(id) {
            return Err(ControlError::generic(format!("Invalid job ID '{id}'")));
        }
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<&Job> {
        self.jobs.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Job> {
        self.jobs.get_mut(id)
    }

    /// Finds a job for a `job-*` command (QEMU: "Job not found").
    pub fn find(&mut self, id: &str) -> Result<&mut Job, ControlError> {
        self.jobs
            .get_mut(id)
            .ok_or_else(|| ControlError::generic("Job not found"))
    }

    /// Finds a block job for a `block-job-*` command.
    pub fn find_block(&mut self, id: &str) -> Result<&mut Job, ControlError> {
        match self.jobs.get_mut(id) {
            Some(j) if j.block => Ok(j),
            _ => Err(ControlError::new(
                ErrorKind::DeviceNotActive,
                format!("Block job '{id}' not found"),
            )),
        }
    }

    /// Registers a new job (created) and announces it.
    pub fn insert(&mut self, events: &EventBus, job: Job) {
        events.emit_data(
            "JOB_STATUS_CHANGE",
            &JobStatusChange {
                id: &job.id,
                status: Status::Created,
            },
        );
        self.jobs.insert(job.id.clone(), job);
    }

    /// Moves a job to `to`, with its JOB_STATUS_CHANGE.
    pub fn transition(&mut self, events: &EventBus, id: &str, to: Status) {
        let Some(j) = self.jobs.get_mut(id) else {
            return;
        };
        if !j.status.may_become(to) {
            log::warn!(
                "job {id}: no transition from {} to {}",
                j.status.name(),
                to.name()
            );
            return;
        }
        j.status = to;
        events.emit_data("JOB_STATUS_CHANGE", &JobStatusChange { id, status: to });
        if to == Status::Null {
            self.jobs.remove(id);
        }
    }

    /// Applies a verb's state check.
    pub fn check_verb(
        &mut self,
        id: &str,
        verb: Verb,
        block: bool,
    ) -> Result<&mut Job, ControlError> {
        let job = if block {
            self.find_block(id)?
        } else {
            self.find(id)?
        };
        if !verb.allowed_in(job.status) {
            return Err(verb_error(job, verb));
        }
        Ok(job)
    }

    /// `job-pause` / `block-job-pause`.
    pub fn pause(&mut self, events: &EventBus, id: &str, block: bool) -> Result<(), ControlError> {
        let job = self.check_verb(id, Verb::Pause, block)?;
        if job.user_paused {
            return Err(ControlError::generic("Job is already paused"));
        }
        job.user_paused = true;
        job.core.set_paused(true);
        if let Some(to) = job.status.paused() {
            self.transition(events, id, to);
        }
        Ok(())
    }

    /// `job-resume` / `block-job-resume`.
    pub fn resume(&mut self, events: &EventBus, id: &str, block: bool) -> Result<(), ControlError> {
        // As QEMU, whether the job is paused at all comes before the verb check.
        let job = if block {
            self.find_block(id)?
        } else {
            self.find(id)?
        };
        if !job.user_paused {
            return Err(ControlError::generic(
                "Can't resume a job that was not paused",
            ));
        }
        let job = self.check_verb(id, Verb::Resume, block)?;
        job.user_paused = false;
        job.io_status = IoStatus::Ok;
        job.core.set_paused(false);
        if let Some(to) = job.status.resumed() {
            self.transition(events, id, to);
        }
        Ok(())
    }

    /// `job-set-speed` / `block-job-set-speed`.
    pub fn set_speed(&mut self, id: &str, speed: i64) -> Result<(), ControlError> {
        let job = self.check_verb(id, Verb::SetSpeed, true)?;
        if speed < 0 {
            return Err(ControlError::generic(
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        job.core.set_speed(speed as u64);
        Ok(())
    }

    /// Marks a job cancelled. A paused job resumes so that it can see it.
    pub fn cancel(
        &mut self,
        events: &EventBus,
        id: &str,
        force: bool,
        block: bool,
    ) -> Result<(), ControlError> {
        let job = self.check_verb(id, Verb::Cancel, block)?;
        let ready = matches!(job.status, Status::Ready | Status::Standby);
        job.core.request_cancel(if force || !ready {
            Cancel::Force
        } else {
            Cancel::Soft
        });
        if job.user_paused {
            job.user_paused = false;
            if let Some(to) = job.status.resumed() {
                self.transition(events, id, to);
            }
        }
        Ok(())
    }

    /// Raises the BLOCK_JOB_* event for a finalized job.
    pub fn completion_event(&self, events: &EventBus, id: &str) {
        let Some(j) = self.jobs.get(id) else {
            return;
        };
        if !j.block {
            return;
        }
        let data = j.event_data();
        if j.cancelled() {
            events.emit_data("BLOCK_JOB_CANCELLED", &data);
        } else {
            let data = BlockJobEvent {
                error: j.error.as_deref(),
                ..data
            };
            events.emit_data("BLOCK_JOB_COMPLETED", &data);
        }
    }

    /// Raises BLOCK_JOB_READY; `at`: the progress when the job converged.
    pub fn ready_event(&self, events: &EventBus, id: &str, at: Option<u64>) {
        if let Some(j) = self.jobs.get(id) {
            let mut data = j.event_data();
            if let Some(n) = at {
                data.len = n;
                data.offset = n;
            }
            events.emit_data("BLOCK_JOB_READY", &data);
        }
    }

    /// The jobs of job transaction `txn` not yet concluded, with their states.
    pub fn txn_members(&self, txn: u64) -> Vec<(String, Status)> {
        self.jobs
            .values()
            .filter(|j| j.txn == Some(txn) && !matches!(j.status, Status::Concluded | Status::Null))
            .map(|j| (j.id.clone(), j.status))
            .collect()
    }

    /// `query-jobs`
    /// The ids of the jobs not yet concluded.
    pub fn unfinished(&self) -> Vec<String> {
        self.jobs
            .values()
            .filter(|j| !matches!(j.status, Status::Concluded | Status::Null))
            .map(|j| j.id.clone())
            .collect()
    }

    pub fn query(&self) -> Vec<JobInfo> {
        self.jobs.values().map(Job::info).collect()
    }

    /// `query-block-jobs`
    pub fn query_block(&self) -> Vec<BlockJobInfo> {
        self.jobs
            .values()
            .filter(|j| j.block)
            .map(Job::block_info)
            .collect()
    }
}

/// Where a job's work runs.
pub enum Running {
    /// On a thread of its own (blockdev-create and x-blockdev-amend, whose work
    /// blocks).
    Thread(std::thread::JoinHandle<()>),
    /// As a task of an iothread's event loop (block jobs: the iothread of their
    /// node, as in QEMU); the iothread lives while the job does.
    Loop {
        iothread: Arc<IoThread>,
        finished: Arc<AtomicBool>,
    },
}

impl Running {
    pub fn is_finished(&self) -> bool {
        match self {
            Running::Thread(t) => t.is_finished(),
            Running::Loop { finished, .. } => finished.load(Ordering::Acquire),
        }
    }

    /// Waits for a finished job's thread.
    pub fn join(self) {
        if let Running::Thread(t) = self {
            let _ = t.join();
        }
    }
}

/// Runs a job's work on a thread of its own (with its own executor and io_uring);
/// its outcome goes to the control thread as [`JobMsg::Done`].
pub fn spawn_thread<F, Fut>(
    id: &str,
    tx: std::sync::mpsc::Sender<crate::control::ControlMsg>,
    work: F,
) -> std::io::Result<Running>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + 'static,
{
    let id = id.to_string();
    std::thread::Builder::new()
        .name(format!("job-{id}"))
        .spawn(move || {
            let result = blocklayer::aio::uring::block_on(work());
            let _ = tx.send(crate::control::ControlMsg::Job(JobMsg::Done { id, result }));
        })
        .map(Running::Thread)
}

/// Runs a job's work as a task of `iothread`'s event loop; its outcome goes to the
/// control thread as [`JobMsg::Done`].
pub fn spawn_on<F, Fut>(
    id: &str,
    tx: std::sync::mpsc::Sender<crate::control::ControlMsg>,
    iothread: Arc<IoThread>,
    work: F,
) -> Running
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + 'static,
{
    let id = id.to_string();
    let finished = Arc::new(AtomicBool::new(false));
    let done = finished.clone();
    iothread.event_loop().post(move || {
        blocklayer::aio::executor::spawn(async move {
            let result = work().await;
            let _ = tx.send(crate::control::ControlMsg::Job(JobMsg::Done { id, result }));
            done.store(true, Ordering::Release);
        });
    });
    Running::Loop { iothread, finished }
}

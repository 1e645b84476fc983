//! Iothread objects (`--object iothread` / `object-add qom-type=iothread`).
//!
//! An iothread is the identity and polling parameters of one event-loop thread. The
//! thread that runs an export's queues is a vhost-user worker thread (spawned per
//! frontend connection by vhost-user-backend); while an export uses the iothread,
//! that worker thread *is* the iothread and `query-iothreads` reports its thread id.
//! An iothread no export uses keeps a parked thread of its own, so that it always has
//! a real thread id, as in QEMU.

use crate::config::IoThreadConfig;
use blocklayer::aio::poll::PollParams;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};

/// The kernel thread id of the calling thread.
pub fn current_tid() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

pub struct IoThread {
    pub id: String,
    /// `false` for the implicit iothread of an export given none (not a QOM object:
    /// `query-iothreads` does not list it).
    pub is_object: bool,
    pub config: IoThreadConfig,
    /// Thread id of the worker thread serving this iothread now (0: none).
    worker_tid: AtomicI32,
    /// The parked thread that stands in while no worker serves the iothread.
    idle_tid: AtomicI32,
    idle_stop: Mutex<Option<Sender<()>>>,
}

impl IoThread {
    /// A new iothread with its parked stand-in thread.
    pub fn new(config: IoThreadConfig, is_object: bool) -> std::io::Result<Arc<IoThread>> {
        let t = Arc::new(IoThread {
            id: config.id.clone(),
            is_object,
            config,
            worker_tid: AtomicI32::new(0),
            idle_tid: AtomicI32::new(0),
            idle_stop: Mutex::new(None),
        });
        if is_object {
            let (stop_tx, stop_rx) = mpsc::channel::<()>();
            let (tid_tx, tid_rx) = mpsc::channel();
            std::thread::Builder::new()
                .name(format!("iothread-{}", t.id))
                .spawn(move || {
                    let _ = tid_tx.send(current_tid());
                    // Parked until the object is deleted (the sender dropped).
                    let _ = stop_rx.recv();
                })?;
            t.idle_tid
                .store(tid_rx.recv().unwrap_or(0), Ordering::Release);
            *t.idle_stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(stop_tx);
        }
        Ok(t)
    }

    /// An implicit iothread for an export that names none.
    pub fn implicit(export_id: &str) -> Arc<IoThread> {
        let config = IoThreadConfig {
            id: format!("{export_id}-iothread"),
            poll_max_ns: crate::config::DEFAULT_POLL_MAX_NS,
            poll_grow: 0,
            poll_shrink: 0,
            aio_max_batch: 0,
        };
        IoThread::new(config, false).expect("an implicit iothread spawns no thread")
    }

    pub fn poll_params(&self) -> PollParams {
        PollParams {
            max_ns: self.config.poll_max_ns,
            grow: self.config.poll_grow,
            shrink: self.config.poll_shrink,
        }
    }

    /// Called by a worker thread when it starts serving this iothread.
    pub fn attach_worker(&self, tid: i32) {
        self.worker_tid.store(tid, Ordering::Release);
    }

    /// Called when the worker thread `tid` stops serving this iothread.
    pub fn detach_worker(&self, tid: i32) {
        let _ = self
            .worker_tid
            .compare_exchange(tid, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether a worker thread serves this iothread now.
    pub fn has_worker(&self) -> bool {
        self.worker_tid.load(Ordering::Acquire) != 0
    }

    /// The thread id `query-iothreads` reports.
    pub fn thread_id(&self) -> i32 {
        match self.worker_tid.load(Ordering::Acquire) {
            0 => self.idle_tid.load(Ordering::Acquire),
            tid => tid,
        }
    }

    /// QEMU's `IOThreadInfo`.
    pub fn info(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "thread-id": self.thread_id(),
            "poll-max-ns": self.config.poll_max_ns,
            "poll-grow": self.config.poll_grow,
            "poll-shrink": self.config.poll_shrink,
            "aio-max-batch": self.config.aio_max_batch,
        })
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        // Dropping the sender ends the parked thread.
        self.idle_stop
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

//! Iothread objects (`--object iothread` / `object-add qom-type=iothread`).
//!
//! An iothread is an event-loop thread ([`event_loop::EventLoop`]) that serves the
//! rings of any number of exports, their I/O and the jobs on their nodes. An export
//! that names no iothread gets an implicit one of its own, which `query-iothreads`
//! does not list.

pub mod event_loop;

use crate::config::IoThreadConfig;
use blocklayer::aio::poll::PollParams;
use event_loop::EventLoop;
use std::sync::Arc;

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
    event_loop: Arc<EventLoop>,
}

impl IoThread {
    /// A new iothread and its thread.
    pub fn new(config: IoThreadConfig, is_object: bool) -> std::io::Result<Arc<IoThread>> {
        let params = PollParams {
            max_ns: config.poll_max_ns,
            grow: config.poll_grow,
            shrink: config.poll_shrink,
        };
        let event_loop = EventLoop::start(&format!("iothread-{}", config.id), params)?;
        Ok(Arc::new(IoThread {
            id: config.id.clone(),
            is_object,
            config,
            event_loop,
        }))
    }

    /// An implicit iothread for an export that names none.
    pub fn implicit(export_id: &str) -> std::io::Result<Arc<IoThread>> {
        let config = IoThreadConfig {
            id: format!("{export_id}-iothread"),
            poll_max_ns: crate::config::DEFAULT_POLL_MAX_NS,
            poll_grow: 0,
            poll_shrink: 0,
            aio_max_batch: 0,
        };
        IoThread::new(config, false)
    }

    /// The iothread's event loop.
    pub fn event_loop(&self) -> &Arc<EventLoop> {
        &self.event_loop
    }

    /// The thread id `query-iothreads` reports.
    pub fn thread_id(&self) -> i32 {
        self.event_loop.tid()
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
        self.event_loop.stop();
    }
}

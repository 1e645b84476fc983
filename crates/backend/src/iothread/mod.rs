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
    /// The properties, changed live by `qom-set` (from the control thread).
    config: Mutex<IoThreadConfig>,
    /// QEMU's `thread-pool-min` and `thread-pool-max` (of its event loop base):
    /// kept and reported; vubd has no thread pool they would size.
    thread_pool: Mutex<(i64, i64)>,
    event_loop: Arc<EventLoop>,
}

/// QEMU's `IOThreadInfo` (`query-iothreads`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct IoThreadInfo {
    pub id: String,
    pub thread_id: i32,
    pub poll_max_ns: u64,
    pub poll_grow: u64,
    pub poll_shrink: u64,
    pub aio_max_batch: u64,
}

/// QEMU's default `thread-pool-max`.
const THREAD_POOL_MAX: i64 = 64;

/// The properties an iothread object has (QEMU 7.2's `iothread` and its parent
/// `event-loop-base`), all `int`.
pub const PROPERTIES: &[&str] = &[
    "thread-pool-min",
    "aio-max-batch",
    "thread-pool-max",
    "poll-max-ns",
    "poll-grow",
    "poll-shrink",
];

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
            config: Mutex::new(config),
            thread_pool: Mutex::new((0, THREAD_POOL_MAX)),
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

    pub fn config(&self) -> IoThreadConfig {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// QEMU's `IOThreadInfo`.
    pub fn info(&self) -> IoThreadInfo {
        let c = self.config();
        IoThreadInfo {
            id: self.id.clone(),
            thread_id: self.thread_id(),
            poll_max_ns: c.poll_max_ns,
            poll_grow: c.poll_grow,
            poll_shrink: c.poll_shrink,
            aio_max_batch: c.aio_max_batch,
        }
    }

    /// The value of the property `name` (one of [`PROPERTIES`]).
    pub fn property(&self, name: &str) -> Option<i64> {
        let c = self.config();
        let pool = *self.thread_pool.lock().unwrap_or_else(|p| p.into_inner());
        let v = match name {
            "poll-max-ns" => c.poll_max_ns,
            "poll-grow" => c.poll_grow,
            "poll-shrink" => c.poll_shrink,
            "aio-max-batch" => c.aio_max_batch,
            "thread-pool-min" => return Some(pool.0),
            "thread-pool-max" => return Some(pool.1),
            _ => return None,
        };
        Some(i64::try_from(v).unwrap_or(i64::MAX))
    }

    /// Sets the property `name` (one of [`PROPERTIES`]) live, as QEMU's
    /// `iothread_set_param`/`event_loop_base_set_param`: the polling parameters
    /// reach the event loop at its next pass. `Err`: QEMU's text.
    pub fn set_property(&self, name: &str, value: i64) -> Result<(), String> {
        if value < 0 {
            return Err(format!("{name} value must be in range [0, {}]", i64::MAX));
        }
        let v = value as u64;
        if name.starts_with("thread-pool-") {
            let mut pool = self.thread_pool.lock().unwrap_or_else(|p| p.into_inner());
            let mut new = *pool;
            if name == "thread-pool-min" {
                new.0 = value;
            } else {
                new.1 = value;
            }
            if new.0 > new.1 || new.1 < 1 || new.1 > i64::from(i32::MAX) {
                return Err("bad thread-pool-min/thread-pool-max values".into());
            }
            *pool = new;
            return Ok(());
        }
        let mut c = self.config.lock().unwrap_or_else(|p| p.into_inner());
        match name {
            "poll-max-ns" => c.poll_max_ns = v,
            "poll-grow" => c.poll_grow = v,
            "poll-shrink" => c.poll_shrink = v,
            "aio-max-batch" => c.aio_max_batch = v,
            _ => return Err(format!("Property 'iothread.{name}' not found")),
        }
        self.event_loop.set_poll_params(PollParams {
            max_ns: c.poll_max_ns,
            grow: c.poll_grow,
            shrink: c.poll_shrink,
        });
        Ok(())
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.event_loop.stop();
    }
}

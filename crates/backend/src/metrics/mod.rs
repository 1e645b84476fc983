//! `--metrics`: the Prometheus text format (0.0.4) over HTTP/1.1 `GET /metrics`, on a
//! UNIX socket or a loopback TCP address.
//!
//! - [`counters`]: what the request path and the event loops count, per queue and per
//!   iothread, on cache lines their own thread writes;
//! - [`snapshot`]: the figures of one scrape, and their text;
//! - [`exposition`]: the text format;
//! - [`http`]: the bounded HTTP responder.
//!
//! Threads: `metrics` accepts connections; each connection is served by a thread of
//! its own, at most [`MAX_SCRAPES`] at once (further clients wait in the listen
//! backlog). A scrape asks the control thread, which owns the exports, iothreads and
//! nodes, for a [`snapshot::Snapshot`]: it sums the counters there (relaxed loads, no
//! lock the request path takes) and the scrape's thread renders the text. Should the
//! control thread be busy with a long operation for [`SNAPSHOT_TIMEOUT`], the scrape
//! gets 503.

pub mod counters;
pub mod exposition;
pub mod http;
pub mod snapshot;

use crate::config::MetricsConfig;
use crate::control::ControlMsg;
use crate::listen::{ListenError, Listener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;

/// Connections served at once, at most.
pub const MAX_SCRAPES: u32 = 4;
/// How long a scrape waits for the control thread's snapshot.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);
/// The stack of a scrape's thread.
const SCRAPE_STACK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot start the metrics thread: {0}")]
    Thread(std::io::Error),
}

/// The running endpoint.
pub struct MetricsServer {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    unix_path: Option<PathBuf>,
}

struct Shared {
    control: Sender<ControlMsg>,
    scrapes: AtomicU32,
    stop: AtomicBool,
    wake: EventFd,
}

impl MetricsServer {
    /// Listens on `cfg`'s address and serves scrapes with snapshots from the control
    /// thread (`control`).
    pub fn start(
        cfg: &MetricsConfig,
        control: Sender<ControlMsg>,
    ) -> Result<MetricsServer, MetricsError> {
        let listener = Listener::bind_unshared(&cfg.addr)?;
        let unix_path = listener.unix_path().map(PathBuf::from);
        let shared = Arc::new(Shared {
            control,
            scrapes: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(MetricsError::Thread)?,
        });
        let me = shared.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || me.accept_loop(listener))
            .map_err(MetricsError::Thread)?;
        Ok(MetricsServer {
            shared,
            thread: Mutex::new(Some(thread)),
            unix_path,
        })
    }

    /// Stops accepting and removes the UNIX socket (scrapes being served finish on
    /// their own, within their timeouts).
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn accept_loop(self: Arc<Self>, listener: Listener) {
        let mut fds = [
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: listener.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        while !self.stop.load(Ordering::Acquire) {
            // With MAX_SCRAPES being served the listener is not watched: new clients
            // wait in its backlog.
            let full = self.scrapes.load(Ordering::Acquire) >= MAX_SCRAPES;
            let n = if full { 1 } else { 2 };
            fds[1].revents = 0;
            // SAFETY: `fds[..n]` are initialised pollfd structures that outlive the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), n, -1) };
            if fds[0].revents != 0 {
                let _ = self.wake.read();
            }
            if r <= 0 || full || fds[1].revents == 0 {
                continue;
            }
            let Ok(stream) = listener.accept() else {
                continue;
            };
            self.scrapes.fetch_add(1, Ordering::AcqRel);
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-scrape".into())
                .stack_size(SCRAPE_STACK)
                .spawn(move || {
                    http::serve(stream, || me.scrape());
                    me.scrapes.fetch_sub(1, Ordering::AcqRel);
                    let _ = me.wake.write(1);
                });
            if let Err(e) = spawned {
                log::warn!("metrics: cannot start a thread for a scrape: {e}");
                self.scrapes.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// The metrics text, from a snapshot the control thread takes.
    fn scrape(&self) -> Result<String, String> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.control
            .send(ControlMsg::Metrics(tx))
            .map_err(|_| "the daemon is shutting down".to_string())?;
        let snapshot = rx.recv_timeout(SNAPSHOT_TIMEOUT).map_err(|_| {
            format!(
                "the control thread did not answer within {} s (a long operation is \
                 running)",
                SNAPSHOT_TIMEOUT.as_secs()
            )
        })?;
        Ok(snapshot.render())
    }
}

//! The NBD export: the daemon's NBD server (`nbd-server-start`, `--nbd-server`) and
//! the exports it serves (`nbd-server-add`, `block-export-add type=nbd`).
//!
//! - [`proto`]: the wire format (the block layer's, shared with the `nbd` driver)
//! - [`handshake`]: option negotiation
//! - [`conn`]: the transmission phase of one connection
//! - [`acct`]: the accounting of its requests (`query-blockstats`, `--metrics`)
//! - [`server`]: the listening socket and the table of exports by name
//! - [`stream`]: UNIX and TCP connections alike
//!
//! Threads: the server has one accepting thread; each client has a thread that reads
//! its requests and a thread that writes its replies (blocking socket I/O, so that a
//! slow client never holds an iothread). The I/O itself runs on the export's
//! iothreads, as tasks of their executors, like vhost-user-blk requests; a client's
//! connections go round-robin over the export's iothreads.

pub mod acct;
pub mod conn;
pub mod handshake;
pub mod server;

pub use blocklayer::nbd_proto as proto;

use super::Export;
use crate::iothread::event_loop::EventLoop;
use crate::iothread::IoThread;
use crate::metrics::counters::{QueueCounters, QueueSample};
use blocklayer::backend::BlockBackend;
use blocklayer::named_bitmap::NamedBitmap;
use blocklayer::nbd_stream::Stream;
pub use server::NbdServer;
use std::net::Shutdown;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD server already has export named '{0}'")]
    NameInUse(String),
    #[error("export name '{0}' too long")]
    NameTooLong(String),
    #[error("description '{0}' too long")]
    DescriptionTooLong(String),
    #[error("{0}")]
    Listen(String),
    #[error("{0}")]
    Thread(std::io::Error),
}

/// What an NBD export's connections share.
pub struct NbdShared {
    pub id: String,
    /// The name clients ask for.
    pub name: String,
    pub description: Option<String>,
    pub writable: bool,
    /// Offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
    /// The bitmaps offered as `qemu:dirty-bitmap:NAME` (busy while exported).
    pub bitmaps: Vec<Arc<NamedBitmap>>,
    pub blk: BlockBackend,
    /// The request counters of `--metrics`, of all connections (an NBD export runs
    /// on one iothread).
    pub counters: QueueCounters,
    fixed_iothread: bool,
    iothreads: Mutex<Vec<Arc<IoThread>>>,
    state: Mutex<State>,
    cv: Condvar,
    on_exit: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

#[derive(Default)]
struct State {
    /// Connected clients (a handle each, to drop them).
    clients: Vec<(u64, Stream)>,
    next_client: u64,
    in_flight: u64,
    stopping: bool,
    stopped: bool,
}

impl NbdShared {
    pub fn size(&self) -> u64 {
        self.blk.node().size()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The event loop of the iothread that serves connection `index`.
    pub fn event_loop(&self, index: usize) -> Option<Arc<EventLoop>> {
        let t = self.iothreads.lock().unwrap_or_else(|p| p.into_inner());
        if t.is_empty() {
            return None;
        }
        Some(t[index % t.len()].event_loop().clone())
    }

    pub fn request_begin(&self) {
        self.lock().in_flight += 1;
    }

    pub fn request_end(&self) {
        self.lock().in_flight -= 1;
        self.cv.notify_all();
    }

    /// Adds a client; `None` if the export is going away.
    pub fn add_client(&self, s: Stream) -> Option<u64> {
        let mut st = self.lock();
        if st.stopping {
            return None;
        }
        st.next_client += 1;
        let id = st.next_client;
        st.clients.push((id, s));
        Some(id)
    }

    pub fn remove_client(&self, id: u64) {
        let mut st = self.lock();
        st.clients.retain(|(c, _)| *c != id);
        let finish = st.stopping && st.clients.is_empty() && !st.stopped;
        drop(st);
        if finish {
            self.finish();
        }
    }

    pub fn client_count(&self) -> usize {
        self.lock().clients.len()
    }

    /// The export has stopped: its bitmaps are free again and `on_exit` runs.
    fn finish(&self) {
        for b in &self.bitmaps {
            b.set_busy(false);
        }
        let f = self
            .on_exit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(f) = f {
            f();
        }
        self.lock().stopped = true;
        self.cv.notify_all();
    }

    /// Waits until `done` holds of the state, at most until `deadline`.
    fn wait(&self, deadline: Instant, done: impl Fn(&State) -> bool) -> bool {
        let mut st = self.lock();
        while !done(&st) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// What `block-export-add type=nbd` / `nbd-server-add` give beyond the common
/// export options.
pub struct NbdExportParams {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub writable: bool,
    pub fixed_iothread: bool,
    pub allocation_depth: bool,
    pub bitmaps: Vec<Arc<NamedBitmap>>,
}

pub struct NbdExport {
    shared: Arc<NbdShared>,
    server: Arc<NbdServer>,
}

impl NbdExport {
    /// Adds the export to `server`'s table; clients may connect from now on.
    pub fn start(
        params: NbdExportParams,
        mut blk: BlockBackend,
        iothreads: Vec<Arc<IoThread>>,
        server: Arc<NbdServer>,
        on_exit: impl FnOnce() + Send + 'static,
    ) -> Result<NbdExport, NbdError> {
        if params.name.len() > proto::MAX_STRING {
            return Err(NbdError::NameTooLong(params.name));
        }
        if let Some(d) = &params.description {
            if d.len() > proto::MAX_STRING {
                return Err(NbdError::DescriptionTooLong(d.clone()));
            }
        }
        // Errors go to the client: the backend never stops (QEMU's NBD server uses
        // the default policies, and reports no I/O status).
        blk.set_on_error(
            blocklayer::backend::OnError::Report,
            blocklayer::backend::OnError::Report,
        );
        let shared = Arc::new(NbdShared {
            id: params.id,
            name: params.name,
            description: params.description,
            writable: params.writable,
            allocation_depth: params.allocation_depth,
            bitmaps: params.bitmaps,
            blk,
            counters: QueueCounters::default(),
            fixed_iothread: params.fixed_iothread,
            iothreads: Mutex::new(iothreads),
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            on_exit: Mutex::new(Some(Box::new(on_exit))),
        });
        server.register(shared.clone())?;
        for b in &shared.bitmaps {
            b.set_busy(true);
        }
        Ok(NbdExport { shared, server })
    }

    /// The name clients ask for.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Whether a client is connected (`mode=safe` removal refuses then).
    pub fn in_use(&self) -> bool {
        self.shared.client_count() > 0
    }
}

impl Export for NbdExport {
    fn id(&self) -> &str {
        &self.shared.id
    }

    fn type_name(&self) -> &'static str {
        "nbd"
    }

    fn blk(&self) -> &BlockBackend {
        &self.shared.blk
    }

    fn socket_path(&self) -> Option<&Path> {
        None
    }

    fn nbd(&self) -> Option<&NbdExport> {
        Some(self)
    }

    fn iothreads(&self) -> Vec<Arc<IoThread>> {
        self.shared
            .iothreads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn queue_samples(&self) -> Option<Vec<QueueSample>> {
        let in_flight = self.shared.lock().in_flight;
        Some(vec![self.shared.counters.sample(in_flight)])
    }

    fn queue_series(&self) -> bool {
        // The counters of all connections, not of a queue.
        false
    }

    fn fixed_iothread(&self) -> bool {
        self.shared.fixed_iothread
    }

    fn move_to_iothread(&self, thread: Arc<IoThread>, timeout: Duration) -> bool {
        // New requests go to the new thread; the old ones stay alive until the
        // requests they run have finished.
        let old = std::mem::replace(
            &mut *self
                .shared
                .iothreads
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
            vec![thread],
        );
        let ok = self
            .shared
            .wait(Instant::now() + timeout, |st| st.in_flight == 0);
        if !ok {
            *self
                .shared
                .iothreads
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = old;
        }
        ok
    }

    fn notify_resize(&self) {
        // NBD has no way to tell a connected client; new clients see the new size.
    }

    fn cont(&self) {
        // Failed requests are reported to the client at once, never held.
    }

    fn stop(&self) {
        self.server.unregister(&self.shared.name);
        let mut st = self.shared.lock();
        if st.stopping {
            return;
        }
        st.stopping = true;
        // Requests in flight still get their replies; the clients' readers end.
        for (_, s) in &st.clients {
            s.shutdown(Shutdown::Read);
        }
        let finish = st.clients.is_empty();
        drop(st);
        if finish {
            self.shared.finish();
        }
    }

    fn wait_stopped(&self, timeout: Duration) -> bool {
        self.shared.wait(Instant::now() + timeout, |st| st.stopped)
    }

    fn quiesce(&self, timeout: Duration) -> bool {
        self.stop();
        self.shared
            .wait(Instant::now() + timeout, |st| st.in_flight == 0)
    }
}

//! The NBD server: one listening socket, a thread accepting clients on it, and the
//! table of exports by name.

use super::handshake::{self, Exports};
use super::{conn, NbdError, NbdShared};
use crate::config::NbdServerConfig;
use crate::listen::Listener;
use blocklayer::nbd_stream::Stream;
use std::collections::BTreeMap;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;

/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct NbdServer {
    exports: Mutex<BTreeMap<String, Arc<NbdShared>>>,
    max_connections: u32,
    connections: AtomicU32,
    next_index: AtomicUsize,
    stop: AtomicBool,
    wake: EventFd,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    unix_path: Option<PathBuf>,
    /// `tls-creds`: clients must start TLS.
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Whether clients are accepted yet (until then they wait in the listen
    /// backlog: at start-up, until the command line's exports exist).
    accepting: AtomicBool,
}

impl Exports for NbdServer {
    fn find(&self, name: &str) -> Option<Arc<NbdShared>> {
        self.lock().get(name).cloned()
    }

    fn list(&self) -> Vec<Arc<NbdShared>> {
        self.lock().values().cloned().collect()
    }
}

impl NbdServer {
    /// Listens on the configured address (with `tls`, clients must start TLS
    /// first); clients are accepted from [`NbdServer::accept_clients`] on.
    pub fn start(
        cfg: &NbdServerConfig,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Arc<NbdServer>, NbdError> {
        let listener = Listener::bind(&cfg.addr).map_err(|e| NbdError::Listen(e.to_string()))?;
        let unix_path = listener.unix_path().map(PathBuf::from);
        let wake =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(NbdError::Thread)?;
        let server = Arc::new(NbdServer {
            exports: Mutex::new(BTreeMap::new()),
            max_connections: cfg.max_connections,
            connections: AtomicU32::new(0),
            next_index: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            wake,
            thread: Mutex::new(None),
            unix_path,
            tls,
            accepting: AtomicBool::new(false),
        });
        let me = server.clone();
        let t = std::thread::Builder::new()
            .name("nbd-server".into())
            .spawn(move || me.accept_loop(listener))
            .map_err(NbdError::Thread)?;
        *server.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        Ok(server)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<NbdShared>>> {
        self.exports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an export to the table.
    pub fn register(&self, e: Arc<NbdShared>) -> Result<(), NbdError> {
        let mut t = self.lock();
        if t.contains_key(&e.name) {
            return Err(NbdError::NameInUse(e.name.clone()));
        }
        t.insert(e.name.clone(), e);
        Ok(())
    }

    /// Removes an export from the table (new clients no longer find it).
    pub fn unregister(&self, name: &str) {
        self.lock().remove(name);
    }

    /// Whether an export of this name is served.
    pub fn has_export(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Starts accepting clients.
    pub fn accept_clients(&self) {
        self.accepting.store(true, Ordering::Release);
        let _ = self.wake.write(1);
    }

    /// Stops listening (exports and their clients are the caller's to remove).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }

    fn accept_loop(self: Arc<Self>, listener: Listener) {
        let mut fds = [
            libc::pollfd {
                fd: listener.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        while !self.stop.load(Ordering::Acquire) {
            // At max-connections the listener is not watched: new clients wait in its
            // backlog until one leaves (as QEMU's server does).
            let limit = self.max_connections;
            let full = !self.accepting.load(Ordering::Acquire)
                || limit > 0 && self.connections.load(Ordering::Acquire) >= limit;
            let (first, n) = if full { (1, 1) } else { (0, 2) };
            // SAFETY: `fds[first..first + n]` are initialised pollfd structures that
            // outlive the call.
            let r = unsafe { libc::poll(fds[first..].as_mut_ptr(), n, -1) };
            if fds[1].revents != 0 {
                let _ = self.wake.read();
            }
            if r < 0 || full || fds[0].revents == 0 {
                continue;
            }
            let Ok(stream) = listener.accept() else {
                continue;
            };
            self.connections.fetch_add(1, Ordering::AcqRel);
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("nbd-conn".into())
                .spawn(move || {
                    me.client(stream);
                    me.connections.fetch_sub(1, Ordering::AcqRel);
                    let _ = me.wake.write(1);
                });
            if spawned.is_err() {
                self.connections.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    fn client(&self, mut stream: Stream) {
        let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
        let neg = match handshake::negotiate(&mut stream, self, self.tls.as_ref()) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("nbd: handshake ended: {e}");
                stream.shutdown(Shutdown::Both);
                return;
            }
        };
        let _ = stream.set_read_timeout(None);
        let export = neg.export.clone();
        let id = neg.client;
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        conn::serve(stream, neg, index);
        export.remove_client(id);
    }
}

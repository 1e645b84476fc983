//! The vhost-user control plane of every export: one daemon-wide thread
//! ("vhost-user") that accepts frontends on the exports' sockets and handles their
//! protocol messages. The rings themselves are served by the iothreads' event loops;
//! an idle export costs a listening socket and a little memory, no thread.
//!
//! Each export serves one frontend at a time: while one is connected its listening
//! socket is not watched, and the next frontend waits in the backlog. Messages are
//! read without blocking ([`MessageReader`]): a frontend that sends half a message
//! holds up nobody. Replies are sent with a bounded wait ([`SEND_STALL`]): a frontend
//! that stops reading them loses its connection.
//!
//! Some messages wait for the data plane (GET_VRING_BASE lets the requests being
//! worked on finish; the end of a connection waits for its requests); meanwhile the
//! other exports' messages wait too, while their I/O goes on.

use super::device::BlkDevice;
use super::request::Memory;
use super::vhost_user::wire::{MessageReader, WireError};
use super::vhost_user::Session;
use super::ExportShared;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// How long a reply may wait for room in the frontend's socket.
pub const SEND_STALL: Duration = Duration::from_secs(1);
/// How long the end of a connection waits for its requests.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Tokens: an export's key for its listening socket, with this bit for its connection.
const CONN_BIT: u64 = 1 << 63;
/// The token of the wake eventfd.
const WAKE_TOKEN: u64 = 0;

/// One export as the control plane sees it.
struct Endpoint {
    shared: Arc<ExportShared>,
    listener: UnixListener,
    on_exit: Option<Box<dyn FnOnce() + Send>>,
    finished: Arc<AtomicBool>,
    conn: Option<Connection>,
}

struct Connection {
    session: Session<BlkDevice>,
    device: Arc<BlkDevice>,
    reader: MessageReader,
}

pub struct Server {
    epoll: Epoll,
    wake: EventFd,
    /// Exports by key. An endpoint is taken out while the thread works on it.
    endpoints: Mutex<HashMap<u64, Endpoint>>,
    /// Keys whose export is stopping, to look at.
    poked: Mutex<VecDeque<u64>>,
    next_key: AtomicU64,
}

static SERVER: OnceLock<Arc<Server>> = OnceLock::new();

/// The control-plane thread, started on first use.
pub fn server() -> io::Result<&'static Arc<Server>> {
    if let Some(s) = SERVER.get() {
        return Ok(s);
    }
    let epoll = Epoll::new()?;
    let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
    epoll.ctl(
        ControlOperation::Add,
        wake.as_raw_fd(),
        EpollEvent::new(EventSet::IN, WAKE_TOKEN),
    )?;
    let s = Arc::new(Server {
        epoll,
        wake,
        endpoints: Mutex::new(HashMap::new()),
        poked: Mutex::new(VecDeque::new()),
        next_key: AtomicU64::new(1),
    });
    if SERVER.set(s.clone()).is_ok() {
        let me = s;
        std::thread::Builder::new()
            .name("vhost-user".into())
            .spawn(move || me.run())?;
    }
    Ok(SERVER.get().expect("set above"))
}

/// An export served by the control-plane thread.
pub struct Served {
    key: u64,
    finished: Arc<AtomicBool>,
}

impl Served {
    /// Whether the export has stopped (its `on_exit` has run).
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Has the thread look at a stopping export.
    pub fn poke(&self) {
        if let Some(s) = SERVER.get() {
            s.poked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_back(self.key);
            let _ = s.wake.write(1);
        }
    }
}

impl Server {
    /// Serves `listener` for `shared`; `on_exit` runs on the thread once the export has
    /// stopped.
    pub fn add(
        &self,
        shared: Arc<ExportShared>,
        listener: UnixListener,
        on_exit: Box<dyn FnOnce() + Send>,
    ) -> io::Result<Served> {
        listener.set_nonblocking(true)?;
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let finished = Arc::new(AtomicBool::new(false));
        let fd = listener.as_raw_fd();
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                key,
                Endpoint {
                    shared,
                    listener,
                    on_exit: Some(on_exit),
                    finished: finished.clone(),
                    conn: None,
                },
            );
        if let Err(e) = self.watch(fd, key) {
            self.endpoints
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            return Err(e);
        }
        Ok(Served { key, finished })
    }

    fn watch(&self, fd: i32, token: u64) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    }

    fn unwatch(&self, fd: i32) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    fn take(&self, key: u64) -> Option<Endpoint> {
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key)
    }

    fn put_back(&self, key: u64, ep: Endpoint) {
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, ep);
    }

    fn run(&self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("vhost-user: epoll_wait: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    WAKE_TOKEN => {
                        let _ = self.wake.read();
                        let poked: Vec<u64> = self
                            .poked
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .drain(..)
                            .collect();
                        for key in poked {
                            self.on_listener(key);
                        }
                    }
                    t if t & CONN_BIT != 0 => self.on_connection(t & !CONN_BIT),
                    key => self.on_listener(key),
                }
            }
        }
    }

    /// The listening socket is readable (a frontend, or the export stopping).
    fn on_listener(&self, key: u64) {
        let Some(mut ep) = self.take(key) else {
            return;
        };
        if ep.conn.is_some() {
            // A connection's end notices the stop.
            self.put_back(key, ep);
            return;
        }
        if ep.shared.is_stopping() {
            self.finish(ep);
            return;
        }
        match ep.listener.accept() {
            Ok((sock, _)) => match self.connect(&ep.shared, sock) {
                Ok(conn) => {
                    self.unwatch(ep.listener.as_raw_fd());
                    if let Err(e) = self.watch(conn.session.socket().as_raw_fd(), key | CONN_BIT) {
                        log::error!("export {}: cannot watch the connection: {e}", ep.shared.id);
                    }
                    ep.conn = Some(conn);
                }
                Err(e) => log::error!("export {}: {e}", ep.shared.id),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log::error!("export {}: accept: {e}", ep.shared.id);
                // Not a busy loop on a persistent error (out of descriptors).
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        self.put_back(key, ep);
    }

    /// Sets up a frontend connection: its device and session.
    fn connect(&self, shared: &Arc<ExportShared>, sock: UnixStream) -> io::Result<Connection> {
        sock.set_nonblocking(false)?;
        sock.set_write_timeout(Some(SEND_STALL))?;
        let mem = GuestMemoryAtomic::new(Memory::new());
        let device = BlkDevice::new(shared.clone(), mem.clone());
        let session = Session::new(device.clone(), sock, mem)?;
        let handle = session.shutdown_handle()?;
        shared.set_connection(&device, handle);
        if shared.is_stopping() {
            // Removed while this frontend was being accepted.
            shared.disconnect_frontend();
        }
        log::info!("export {}: frontend connected", shared.id);
        Ok(Connection {
            session,
            device,
            reader: MessageReader::default(),
        })
    }

    /// The connection is readable: messages, or its end.
    fn on_connection(&self, key: u64) {
        let Some(mut ep) = self.take(key) else {
            return;
        };
        let Some(conn) = ep.conn.as_mut() else {
            self.put_back(key, ep);
            return;
        };
        match conn.session.serve_available(&mut conn.reader) {
            Ok(()) => {
                self.put_back(key, ep);
                return;
            }
            Err(WireError::Closed) => {}
            Err(e) => log::warn!("export {}: connection ended: {e}", ep.shared.id),
        }
        let conn = ep.conn.take().expect("checked above");
        self.unwatch(conn.session.socket().as_raw_fd());
        self.disconnect(&ep.shared, conn);
        if ep.shared.is_stopping() {
            self.finish(ep);
            return;
        }
        if let Err(e) = self.watch(ep.listener.as_raw_fd(), key) {
            log::error!("export {}: cannot watch its socket: {e}", ep.shared.id);
        }
        self.put_back(key, ep);
    }

    /// The frontend has gone: lets the iothreads finish what they took from its rings,
    /// then stops serving them.
    fn disconnect(&self, shared: &Arc<ExportShared>, mut conn: Connection) {
        log::info!("export {}: frontend disconnected", shared.id);
        let device = &conn.device;
        device.disconnect();
        log::info!(
            "export {}: {:?} request(s) in flight per queue after disconnect",
            shared.id,
            device.queue_in_flight()
        );
        if !shared.wait_idle(|| device.queue_in_flight().iter().sum(), DISCONNECT_TIMEOUT) {
            log::error!(
                "export {}: requests of the old frontend still in flight after {} s: {:?}",
                shared.id,
                DISCONNECT_TIMEOUT.as_secs(),
                device.queue_in_flight()
            );
        }
        shared.clear_connection();
        conn.session.close();
    }

    /// The export has stopped: its socket closes and its `on_exit` runs.
    fn finish(&self, mut ep: Endpoint) {
        self.unwatch(ep.listener.as_raw_fd());
        let on_exit = ep.on_exit.take();
        let finished = ep.finished.clone();
        // The export (and its backend's edge) goes as soon as the control thread hears
        // of it: this thread holds it no longer.
        drop(ep);
        if let Some(f) = on_exit {
            f();
        }
        finished.store(true, Ordering::Release);
    }
}

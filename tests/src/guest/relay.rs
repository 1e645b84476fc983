//! A vhost-user relay between QEMU and a backend, to show what a protocol feature
//! changes with the same backend and the same guest.
//!
//! QEMU connects to the relay's socket; for each connection the relay connects to the
//! backend's socket and passes every message on, both ways, with its file descriptors
//! (SCM_RIGHTS), except for what its [`Rules`] change:
//! * protocol feature bits hidden from the frontend (cleared in the
//!   GET_PROTOCOL_FEATURES reply). Without INFLIGHT_SHMFD, QEMU keeps no inflight region
//!   and, when it reconnects, rewinds every ring to its used index;
//! * with INFLIGHT_SHMFD hidden, the relay may still negotiate it with the backend and
//!   ask it for an inflight region ([`Rules::keep_inflight`]), which it keeps to itself:
//!   the frontend goes on without tracking, and a test can see what the backend had in
//!   flight ([`Relay::inflight_region`]), e.g. at the moment it was killed;
//! * dirty-page logging withheld from the backend while the frontend believes it is on:
//!   `VHOST_F_LOG_ALL` cleared from SET_FEATURES, `VHOST_VRING_F_LOG` from
//!   SET_VRING_ADDR, and SET_LOG_BASE / SET_LOG_FD answered by the relay instead of
//!   passed on. A migration then copies guest RAM with no record of the pages the
//!   backend writes.
//!
//! When either side closes, the relay closes the other: a backend that is killed drops
//! QEMU's connection, and QEMU (with `reconnect=`) comes back; the relay then connects
//! to the backend's socket again, waiting for the daemon to be restarted.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SET_FEATURES: u32 = 2;
const SET_LOG_BASE: u32 = 6;
const SET_LOG_FD: u32 = 7;
const SET_VRING_ADDR: u32 = 9;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_INFLIGHT_FD: u32 = 31;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const HEADER_LEN: usize = 12;
/// No vhost-user message is this large; a larger size means a broken stream.
const MAX_PAYLOAD: usize = 1 << 20;
/// File descriptors one message may carry (SET_MEM_TABLE has up to 8).
const MAX_FDS: usize = 16;
/// `VHOST_F_LOG_ALL`
pub const F_LOG_ALL: u64 = 1 << 26;
/// `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`
pub const PF_INFLIGHT_SHMFD: u64 = 1 << 12;
/// `VHOST_VRING_F_LOG` in the flags of SET_VRING_ADDR.
const VRING_F_LOG: u32 = 1;
/// How long the relay waits for the backend's socket to accept (a daemon restart).
const BACKEND_WAIT: Duration = Duration::from_secs(30);

/// What the relay changes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules {
    /// Protocol feature bits cleared from the backend's GET_PROTOCOL_FEATURES reply.
    pub hide_protocol_features: u64,
    /// Keep dirty-page logging from the backend (see the module documentation).
    pub withhold_log: bool,
    /// With INFLIGHT_SHMFD in `hide_protocol_features`: negotiate it with the backend
    /// all the same (when the backend offers it) and, on each connection, ask the
    /// backend for an inflight region of this geometry (GET_INFLIGHT_FD), kept by the
    /// relay and never handed back (no SET_INFLIGHT_FD): the backend records what it
    /// takes and returns, the frontend knows nothing of it and, on a reconnect, still
    /// rewinds its rings to their used index.
    pub keep_inflight: Option<InflightGeometry>,
}

/// The geometry of an inflight region (GET_INFLIGHT_FD's `num_queues`, `queue_size`).
#[derive(Debug, Clone, Copy)]
pub struct InflightGeometry {
    pub num_queues: u16,
    pub queue_size: u16,
}

/// What the relay has done, for tests to check that it took part.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frontend connections accepted.
    pub connections: AtomicU64,
    /// GET_PROTOCOL_FEATURES replies with bits cleared.
    pub protocol_replies_changed: AtomicU64,
    /// SET_FEATURES messages that asked for VHOST_F_LOG_ALL (cleared on the way).
    pub log_all_cleared: AtomicU64,
    /// SET_LOG_BASE and SET_LOG_FD messages answered by the relay.
    pub log_messages_withheld: AtomicU64,
    /// Inflight regions the backend gave the relay ([`Rules::keep_inflight`]).
    pub inflight_regions_kept: AtomicU64,
}

/// A running relay; stops (and closes its connections) on drop.
pub struct Relay {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    accept: Option<JoinHandle<()>>,
    pub counters: Arc<Counters>,
    /// The inflight region of the latest connection ([`Rules::keep_inflight`]).
    inflight: Arc<Mutex<Option<OwnedFd>>>,
}

impl Relay {
    /// Listens on `path` and relays each connection to `backend`.
    pub fn start(path: &Path, backend: &Path, rules: Rules) -> Relay {
        let listener = UnixListener::bind(path)
            .unwrap_or_else(|e| panic!("relay: cannot listen on {}: {e}", path.display()));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let counters = Arc::new(Counters::default());
        let inflight = Arc::new(Mutex::new(None));
        let accept = {
            let shared = Shared {
                rules,
                counters: counters.clone(),
                inflight: inflight.clone(),
            };
            let (stop, conns) = (stop.clone(), conns.clone());
            let backend = backend.to_path_buf();
            std::thread::spawn(move || accept_loop(listener, backend, shared, stop, conns))
        };
        Relay {
            path: path.to_path_buf(),
            stop,
            conns,
            accept: Some(accept),
            counters,
            inflight,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the inflight region of the latest connection holds now
    /// ([`Rules::keep_inflight`]); `None` before the backend gave one. It stays
    /// readable after the backend died.
    pub fn inflight_region(&self) -> Option<Vec<u8>> {
        let guard = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let file = std::fs::File::from(guard.as_ref()?.try_clone().ok()?);
        let mut bytes = vec![0u8; usize::try_from(file.metadata().ok()?.len()).ok()?];
        file.read_exact_at(&mut bytes, 0).ok()?;
        Some(bytes)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What every connection of a relay shares.
#[derive(Clone)]
struct Shared {
    rules: Rules,
    counters: Arc<Counters>,
    inflight: Arc<Mutex<Option<OwnedFd>>>,
}

/// What the two directions of one connection share.
#[derive(Default)]
struct ConnState {
    /// The backend offered INFLIGHT_SHMFD (before the relay hid it).
    backend_has_inflight: AtomicBool,
}

fn accept_loop(
    listener: UnixListener,
    backend: PathBuf,
    shared: Shared,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let front = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(_) => return,
        };
        let _ = front.set_nonblocking(false);
        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
        let Some(back) = connect_backend(&backend, &stop) else {
            continue;
        };
        {
            let mut c = conns.lock().unwrap_or_else(|e| e.into_inner());
            c.retain(|s| s.peer_addr().is_ok());
            for s in [&front, &back] {
                if let Ok(s) = s.try_clone() {
                    c.push(s);
                }
            }
        }
        let (Ok(front_rd), Ok(back_rd)) = (front.try_clone(), back.try_clone()) else {
            continue;
        };
        let front = Arc::new(Mutex::new(front));
        let back = Arc::new(Mutex::new(back));
        let conn = Arc::new(ConnState::default());
        {
            let (front, back, shared, conn) =
                (front.clone(), back.clone(), shared.clone(), conn.clone());
            std::thread::spawn(move || frontend_to_backend(front_rd, front, back, &shared, &conn));
        }
        {
            let shared = shared.clone();
            std::thread::spawn(move || backend_to_frontend(back_rd, front, &shared, &conn));
        }
    }
}

/// Connects to the backend, waiting (up to [`BACKEND_WAIT`]) while it is restarted.
fn connect_backend(path: &Path, stop: &AtomicBool) -> Option<UnixStream> {
    let deadline = Instant::now() + BACKEND_WAIT;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        if let Ok(s) = UnixStream::connect(path) {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// One message as it travels.
struct Msg {
    request: u32,
    flags: u32,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Msg {
    fn u64_at(&self, off: usize) -> Option<u64> {
        let b = self.payload.get(off..off + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    fn set_u64_at(&mut self, off: usize, v: u64) {
        if let Some(b) = self.payload.get_mut(off..off + 8) {
            b.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// A reply of the relay's own to this request: a u64 (an ack of 0 means success).
    fn reply_u64(&self, v: u64) -> Msg {
        Msg {
            request: self.request,
            flags: FLAG_VERSION | FLAG_REPLY,
            payload: v.to_le_bytes().to_vec(),
            fds: Vec::new(),
        }
    }
}

fn close_both(a: &Mutex<UnixStream>, b: &Mutex<UnixStream>) {
    for s in [a, b] {
        let _ = s
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown(std::net::Shutdown::Both);
    }
}

/// The relay's own GET_INFLIGHT_FD: `mmap_size`, `mmap_offset` (0, filled in by the
/// reply), `num_queues`, `queue_size`, padding.
fn get_inflight_fd(g: InflightGeometry) -> Msg {
    let mut payload = vec![0u8; 24];
    payload[16..18].copy_from_slice(&g.num_queues.to_le_bytes());
    payload[18..20].copy_from_slice(&g.queue_size.to_le_bytes());
    Msg {
        request: GET_INFLIGHT_FD,
        flags: FLAG_VERSION,
        payload,
        fds: Vec::new(),
    }
}

fn frontend_to_backend(
    rd: UnixStream,
    front: Arc<Mutex<UnixStream>>,
    back: Arc<Mutex<UnixStream>>,
    shared: &Shared,
    conn: &ConnState,
) {
    let (rules, counters) = (shared.rules, &*shared.counters);
    while let Ok(Some(mut m)) = recv_msg(&rd) {
        // The frontend acks the protocol features without INFLIGHT_SHMFD: the relay
        // acks it for itself, then asks for the region it keeps.
        let mut own_request = None;
        if let Some(g) = rules.keep_inflight {
            if m.request == SET_PROTOCOL_FEATURES
                && conn.backend_has_inflight.load(Ordering::SeqCst)
            {
                if let Some(f) = m.u64_at(0) {
                    m.set_u64_at(0, f | PF_INFLIGHT_SHMFD);
                    own_request = Some(get_inflight_fd(g));
                }
            }
        }
        if rules.withhold_log {
            match m.request {
                SET_FEATURES => {
                    if let Some(f) = m.u64_at(0).filter(|f| f & F_LOG_ALL != 0) {
                        m.set_u64_at(0, f & !F_LOG_ALL);
                        counters.log_all_cleared.fetch_add(1, Ordering::Relaxed);
                    }
                }
                SET_VRING_ADDR => {
                    if let Some(b) = m.payload.get_mut(4..8) {
                        let flags = u32::from_le_bytes(b.try_into().expect("4 bytes"));
                        b.copy_from_slice(&(flags & !VRING_F_LOG).to_le_bytes());
                    }
                }
                SET_LOG_BASE | SET_LOG_FD => {
                    counters
                        .log_messages_withheld
                        .fetch_add(1, Ordering::Relaxed);
                    // SET_LOG_BASE always has a reply with LOG_SHMFD; SET_LOG_FD only
                    // when an ack was asked for.
                    if m.request == SET_LOG_BASE || m.flags & FLAG_NEED_REPLY != 0 {
                        let r = m.reply_u64(0);
                        let w = front.lock().unwrap_or_else(|e| e.into_inner());
                        if send_msg(&w, &r).is_err() {
                            break;
                        }
                    }
                    continue;
                }
                _ => {}
            }
        }
        let w = back.lock().unwrap_or_else(|e| e.into_inner());
        if send_msg(&w, &m).is_err() {
            break;
        }
        if let Some(own) = own_request {
            if send_msg(&w, &own).is_err() {
                break;
            }
        }
    }
    close_both(&front, &back);
}

fn backend_to_frontend(
    rd: UnixStream,
    front: Arc<Mutex<UnixStream>>,
    shared: &Shared,
    conn: &ConnState,
) {
    let (rules, counters) = (shared.rules, &*shared.counters);
    while let Ok(Some(mut m)) = recv_msg(&rd) {
        let reply = m.flags & FLAG_REPLY != 0;
        // The frontend never asks for a region (the feature is hidden from it): this
        // reply answers the relay's own request.
        if reply && m.request == GET_INFLIGHT_FD && rules.keep_inflight.is_some() {
            if let Some(fd) = m.fds.pop() {
                *shared.inflight.lock().unwrap_or_else(|e| e.into_inner()) = Some(fd);
                counters
                    .inflight_regions_kept
                    .fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        if m.request == GET_PROTOCOL_FEATURES && reply && rules.hide_protocol_features != 0 {
            if let Some(f) = m.u64_at(0) {
                let offered = f & rules.hide_protocol_features & PF_INFLIGHT_SHMFD != 0;
                conn.backend_has_inflight.store(offered, Ordering::SeqCst);
                m.set_u64_at(0, f & !rules.hide_protocol_features);
                counters
                    .protocol_replies_changed
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        // GET_FEATURES replies pass unchanged: the frontend must go on seeing LOG_ALL.
        let w = front.lock().unwrap_or_else(|e| e.into_inner());
        if send_msg(&w, &m).is_err() {
            break;
        }
    }
    let _ = front
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .shutdown(std::net::Shutdown::Both);
    let _ = rd.shutdown(std::net::Shutdown::Both);
}

/// Reads one message; `None` at end of stream.
fn recv_msg(sock: &UnixStream) -> io::Result<Option<Msg>> {
    let mut fds = Vec::new();
    let mut h = [0u8; HEADER_LEN];
    if !recv_exact(sock, &mut h, &mut fds)? {
        return Ok(None);
    }
    let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let (request, flags, size) = (word(0), word(4), word(8) as usize);
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message {request} announces {size} bytes"),
        ));
    }
    let mut payload = vec![0u8; size];
    if !recv_exact(sock, &mut payload, &mut fds)? {
        return Ok(None);
    }
    Ok(Some(Msg {
        request,
        flags,
        payload,
        fds,
    }))
}

/// Fills `buf`, collecting file descriptors; `false` at end of stream.
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let mut iov = libc::iovec {
            iov_base: buf[got..].as_mut_ptr().cast(),
            iov_len: buf.len() - got,
        };
        // u64 elements keep the buffer aligned for cmsghdr.
        let mut control = [0u64; MAX_FDS / 2 + 4];
        // SAFETY: msghdr is plain data; the fields used are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: msg points at a live iovec over the unfilled part of `buf` and at a
        // control buffer of msg_controllen bytes; both outlive the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: the kernel wrote well-formed cmsghdrs into `control` up to
        // msg_controllen; CMSG_FIRSTHDR/CMSG_NXTHDR stay inside it, and an SCM_RIGHTS
        // payload is an array of ints (read unaligned). Each fd is new to this
        // process and owned from here on.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c);
                    let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned(data.add(i * 4).cast::<RawFd>());
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if n == 0 {
            return Ok(false);
        }
        got += n as usize;
    }
    Ok(true)
}

/// Writes one message, its file descriptors with the first bytes.
fn send_msg(sock: &UnixStream, m: &Msg) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + m.payload.len());
    bytes.extend_from_slice(&m.request.to_le_bytes());
    bytes.extend_from_slice(&m.flags.to_le_bytes());
    bytes.extend_from_slice(&(m.payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&m.payload);
    let raw: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = 0;
    while sent < bytes.len() {
        let fds: &[RawFd] = if sent == 0 { &raw } else { &[] };
        let mut iov = libc::iovec {
            iov_base: bytes[sent..].as_ptr() as *mut libc::c_void,
            iov_len: bytes.len() - sent,
        };
        let fd_bytes = std::mem::size_of_val(fds) as u32;
        let mut control = [0u64; MAX_FDS / 2 + 4];
        // SAFETY: msghdr is plain data; the fields used are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            // SAFETY: CMSG_SPACE only computes a size.
            let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
            assert!(space <= std::mem::size_of_val(&control), "too many fds");
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: the control buffer holds `space` bytes (checked above), aligned
            // for cmsghdr; CMSG_FIRSTHDR points at its start and CMSG_DATA inside it,
            // with room for `fd_bytes` bytes of descriptors.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(c),
                    fd_bytes as usize,
                );
            }
        }
        // SAFETY: msg points at a live iovec over the unsent bytes and, with fds, at the
        // filled control buffer; both outlive the call. MSG_NOSIGNAL: EPIPE, no signal.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

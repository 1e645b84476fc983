//! The NBD client connection of an `nbd` node.
//!
//! Requests are issued from iothreads: each is entered in the table of requests in
//! flight and its header (and a write's payload) written to the socket under the
//! table's lock. One thread of the node reads the replies, fills read buffers and
//! completes the requests (waking their iothread's executor). When the connection
//! drops, that thread reconnects (every [`RETRY`]) and sends every request still
//! waiting again; a request that waited longer than `reconnect-delay` for the
//! connection fails with EIO.

use crate::aio::iovec::IoVec;
use crate::nbd_proto::*;
use crate::nbd_stream::Stream;
use std::collections::HashMap;
use std::future::Future;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::options::NbdServerAddr;

/// How often a lost connection is tried again.
const RETRY: Duration = Duration::from_millis(200);
/// How long the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest structured reply chunk accepted.
const MAX_CHUNK: u32 = MAX_BUFFER + 4096;

/// What the server told about the export.
#[derive(Debug, Clone, Copy)]
pub struct Info {
    pub size: u64,
    pub flags: u16,
    /// The id of `base:allocation`, if the server has it.
    pub alloc_ctx: Option<u32>,
    pub min_block: u32,
    pub max_block: u32,
}

/// Where a node's connections go.
#[derive(Clone)]
pub struct Target {
    pub addr: NbdServerAddr,
    pub export: String,
    /// `tls-creds`: TLS is started before anything else.
    pub tls: Option<crate::tls::ClientTls>,
}

/// A refusal of the server that trying again does not change (reported as it is).
fn refused(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, msg)
}

/// Connects to the server's socket (TCP: bounded per address).
fn connect_stream(addr: &NbdServerAddr) -> io::Result<Stream> {
    Ok(match addr {
        NbdServerAddr::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
        NbdServerAddr::Inet { host, port } => {
            let port: u16 = port
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad port"))?;
            // Bounded, so that an unreachable host fails blockdev-add in time.
            let mut last = io::Error::new(io::ErrorKind::NotConnected, "no address");
            let mut found = None;
            for a in (host.as_str(), port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&a, HANDSHAKE_TIMEOUT) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = found.ok_or(last)?;
            let _ = s.set_nodelay(true);
            Stream::Tcp(s)
        }
    })
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u32(s: &mut Stream) -> io::Result<u32> {
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Reads one option reply: (type, payload). A server that wants TLS first is a
/// refusal (QEMU's text).
fn option_reply_of(s: &mut Stream, option: u32) -> io::Result<(u32, Vec<u8>)> {
    let (kind, data) = option_reply_raw(s, option)?;
    if kind == REP_ERR_TLS_REQD {
        return Err(refused(format!(
            "TLS negotiation required before option {option} ({})",
            option_name(option)
        )));
    }
    Ok((kind, data))
}

fn option_reply_raw(s: &mut Stream, option: u32) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0; 20];
    s.read_exact(&mut h)?;
    if be64(&h[0..8]) != REPLY_MAGIC || be32(&h[8..12]) != option {
        return Err(protocol("unexpected option reply"));
    }
    let len = be32(&h[16..20]);
    if len > MAX_OPTION {
        return Err(protocol("option reply too long"));
    }
    let mut data = vec![0; len as usize];
    s.read_exact(&mut data)?;
    Ok((be32(&h[12..16]), data))
}

/// Connects and negotiates up to transmission.
fn connect(target: &Target) -> io::Result<(Stream, Info)> {
    let export = target.export.as_str();
    let mut s = connect_stream(&target.addr)?;
    let _ = s.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let mut h = [0; 18];
    s.read_exact(&mut h)?;
    if be64(&h[0..8]) != NBDMAGIC || be64(&h[8..16]) != IHAVEOPT {
        return Err(protocol("not an NBD newstyle server"));
    }
    let sflags = be16(&h[16..18]);
    if sflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol("the server is not fixed newstyle"));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if sflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())?;

    if let Some(tls) = &target.tls {
        s.write_all(&option_request(OPT_STARTTLS, &[]))?;
        let (kind, data) = option_reply_raw(&mut s, OPT_STARTTLS)?;
        if kind != REP_ACK {
            let msg = String::from_utf8_lossy(&data);
            return Err(refused(format!(
                "Server don't support STARTTLS option\nserver reported: {msg}"
            )));
        }
        s = s.start_tls_client(tls)?;
    }

    s.write_all(&option_request(OPT_STRUCTURED_REPLY, &[]))?;
    let structured = option_reply_of(&mut s, OPT_STRUCTURED_REPLY)?.0 == REP_ACK;

    let name = export.as_bytes();
    let mut alloc_ctx = None;
    if structured {
        let q = b"base:allocation";
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
        s.write_all(&option_request(OPT_SET_META_CONTEXT, &d))?;
        loop {
            let (kind, data) = option_reply_of(&mut s, OPT_SET_META_CONTEXT)?;
            if kind == REP_META_CONTEXT && data.len() >= 4 && &data[4..] == q {
                alloc_ctx = Some(be32(&data[0..4]));
            }
            if kind == REP_ACK || kind & (1 << 31) != 0 {
                break;
            }
        }
    }

    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    s.write_all(&option_request(OPT_GO, &d))?;
    let mut info = Info {
        size: 0,
        flags: 0,
        alloc_ctx,
        min_block: 1,
        max_block: MAX_BUFFER,
    };
    let mut have_export = false;
    loop {
        let (kind, data) = option_reply_of(&mut s, OPT_GO)?;
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => match be16(&data[0..2]) {
                INFO_EXPORT if data.len() >= 12 => {
                    info.size = be64(&data[2..10]);
                    info.flags = be16(&data[10..12]);
                    have_export = true;
                }
                INFO_BLOCK_SIZE if data.len() >= 14 => {
                    info.min_block = be32(&data[2..6]).max(1);
                    info.max_block = be32(&data[10..14]).clamp(info.min_block, MAX_BUFFER);
                }
                _ => {}
            },
            k if k & (1 << 31) != 0 => {
                let msg = String::from_utf8_lossy(&data).into_owned();
                let what = if k == REP_ERR_UNKNOWN {
                    "Requested export not available"
                } else {
                    "The server refused the export"
                };
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{what}\nserver reported: {msg}"),
                ));
            }
            _ => {}
        }
    }
    if !have_export {
        return Err(protocol("the server sent no export information"));
    }
    let _ = s.set_read_timeout(None);
    Ok((s, info))
}

/// A request's result: success, or a local errno.
pub type Outcome = std::result::Result<Option<(u32, u32)>, i32>;

#[derive(Default)]
struct SlotState {
    result: Option<Outcome>,
    waker: Option<Waker>,
}

/// Where a request's completion goes.
#[derive(Default)]
struct Slot(Mutex<SlotState>);

impl Slot {
    fn complete(&self, r: Outcome) {
        let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        st.result = Some(r);
        if let Some(w) = st.waker.take() {
            w.wake();
        }
    }
}

/// The future of a request.
pub struct Completion(Arc<Slot>);

impl Future for Completion {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut st = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        match st.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                st.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// An I/O vector that the reply thread fills or the sender writes from.
struct Buffer(IoVec);

// SAFETY: the vector's segments point into memory that its keepalive (or the
// request's issuer, which waits for the completion) keeps valid; the reader thread
// is the only one that touches the memory of a read while the request is in flight,
// and a write's payload is only read.
unsafe impl Send for Buffer {}

struct Pending {
    req: Request,
    payload: Option<Buffer>,
    dest: Option<Buffer>,
    slot: Arc<Slot>,
    issued: Instant,
    status: Option<(u32, u32)>,
    error: Option<u32>,
}

struct State {
    /// A handle on the connection to shut it down (the writer is [`Client::send`]).
    ctl: Option<Stream>,
    pending: HashMap<u64, Pending>,
    next: u64,
    down_since: Option<Instant>,
    closing: bool,
}

/// Locks: [`Client::send`] before [`Client::st`]. A request is sent under `send`, and
/// leaves the table (and completes) only under `send` too, or from the reply thread
/// once the server answered it, which it cannot do before it has read all of it:
/// no request's memory is freed while it is being written.
pub struct Client {
    target: Target,
    reconnect_delay: Duration,
    pub info: Info,
    /// The socket requests are written to; `None` while the connection is down.
    send: Mutex<Option<Stream>>,
    st: Mutex<State>,
    cv: Condvar,
}

fn send(sock: &mut Stream, req: &Request, payload: Option<&Buffer>) -> io::Result<()> {
    let head = req.encode();
    let mut slices = vec![IoSlice::new(&head)];
    if let Some(p) = payload {
        for seg in p.0.segments() {
            // SAFETY: each segment is valid for reads of its length while the
            // request is in the table (see `Buffer` and the lock order of `Client`).
            let s = unsafe { std::slice::from_raw_parts(seg.iov_base as *const u8, seg.iov_len) };
            slices.push(IoSlice::new(s));
        }
    }
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        let n = sock.write_vectored(bufs)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

impl Client {
    /// Connects (retrying for `open_timeout`) and starts the reply thread.
    pub fn open(
        target: Target,
        reconnect_delay: Duration,
        open_timeout: Duration,
    ) -> io::Result<Arc<Client>> {
        let deadline = Instant::now() + open_timeout;
        let (sock, info) = loop {
            match connect(&target) {
                Ok(c) => break c,
                Err(e) if Instant::now() >= deadline || e.kind() == io::ErrorKind::NotFound => {
                    return Err(e)
                }
                Err(_) => std::thread::sleep(RETRY),
            }
        };
        let reader = sock.try_clone()?;
        let ctl = sock.try_clone()?;
        let client = Arc::new(Client {
            target,
            reconnect_delay,
            info,
            send: Mutex::new(Some(sock)),
            st: Mutex::new(State {
                ctl: Some(ctl),
                pending: HashMap::new(),
                next: 1,
                down_since: None,
                closing: false,
            }),
            cv: Condvar::new(),
        });
        let c = client.clone();
        std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || c.run(reader))?;
        Ok(client)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_send(&self) -> MutexGuard<'_, Option<Stream>> {
        self.send.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Issues a request; `dest` receives a read's data.
    pub fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<IoVec>,
        dest: Option<IoVec>,
    ) -> Completion {
        let slot = Arc::new(Slot::default());
        let mut w = self.lock_send();
        let mut st = self.lock();
        if st.closing {
            slot.complete(Err(libc::ESHUTDOWN));
            return Completion(slot);
        }
        if w.is_none() && self.reconnect_delay.is_zero() {
            slot.complete(Err(libc::EIO));
            return Completion(slot);
        }
        let handle = st.next;
        st.next += 1;
        let req = Request {
            flags,
            kind,
            handle,
            offset,
            len,
        };
        let payload = payload.map(Buffer);
        // The segments to send, taken before the request enters the table (their
        // memory stays valid until it leaves it).
        let segs = payload.as_ref().map(|p| Buffer(p.0.clone()));
        st.pending.insert(
            handle,
            Pending {
                req,
                payload,
                dest: dest.map(Buffer),
                slot: slot.clone(),
                issued: Instant::now(),
                status: None,
                error: None,
            },
        );
        drop(st);
        if let Some(sock) = w.as_mut() {
            // On failure the reply thread sees the connection end; the request is
            // sent again once it is back.
            if send(sock, &req, segs.as_ref()).is_err() {
                sock.shutdown(Shutdown::Both);
            }
        }
        Completion(slot)
    }

    /// Stops the connection: requests still waiting fail.
    pub fn close(&self) {
        let mut w = self.lock_send();
        let mut st = self.lock();
        st.closing = true;
        if let Some(sock) = w.as_mut() {
            let disc = Request {
                flags: 0,
                kind: CMD_DISC,
                handle: 0,
                offset: 0,
                len: 0,
            };
            let _ = sock.write_all(&disc.encode());
            sock.shutdown(Shutdown::Both);
        }
        *w = None;
        if let Some(c) = st.ctl.take() {
            c.shutdown(Shutdown::Both);
        }
        for (_, p) in st.pending.drain() {
            p.slot.complete(Err(libc::ESHUTDOWN));
        }
        drop(st);
        drop(w);
        self.cv.notify_all();
    }

    fn run(self: Arc<Self>, mut reader: Stream) {
        loop {
            let err = loop {
                if let Err(e) = self.read_reply(&mut reader) {
                    break e;
                }
            };
            // Unblock a writer first (it holds `send`), then take the connection down.
            if let Some(c) = self.lock().ctl.as_ref() {
                c.shutdown(Shutdown::Both);
            }
            let mut w = self.lock_send();
            let mut st = self.lock();
            if st.closing {
                return;
            }
            log::warn!(
                "nbd export '{}': connection lost ({err}); reconnecting",
                self.target.export
            );
            *w = None;
            st.ctl = None;
            st.down_since = Some(Instant::now());
            for p in st.pending.values_mut() {
                p.status = None;
                p.error = None;
            }
            drop(st);
            drop(w);
            let Some((r, again)) = self.reconnect() else {
                return;
            };
            reader = r;
            // Sent by another thread while this one reads the replies (the server
            // may stop reading before its replies are read).
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("nbd-resend".into())
                .spawn(move || me.resend(&again));
            if spawned.is_err() {
                if let Some(c) = self.lock().ctl.as_ref() {
                    c.shutdown(Shutdown::Both);
                }
            }
        }
    }

    /// Sends the requests still waiting from before a reconnection.
    fn resend(&self, handles: &[u64]) {
        let mut w = self.lock_send();
        for h in handles {
            let Some(sock) = w.as_mut() else {
                return;
            };
            let item = {
                let st = self.lock();
                st.pending
                    .get(h)
                    .map(|p| (p.req, p.payload.as_ref().map(|b| Buffer(b.0.clone()))))
            };
            if let Some((req, payload)) = item {
                if send(sock, &req, payload.as_ref()).is_err() {
                    sock.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    }

    /// Fails the requests that waited longer than `reconnect-delay` (the connection is
    /// down: none is being sent).
    fn expire(&self, st: &mut State, now: Instant) {
        let Some(down) = st.down_since else {
            return;
        };
        let delay = self.reconnect_delay;
        let expired: Vec<u64> = st
            .pending
            .iter()
            .filter(|(_, p)| p.issued.max(down) + delay <= now)
            .map(|(h, _)| *h)
            .collect();
        for h in expired {
            if let Some(p) = st.pending.remove(&h) {
                p.slot.complete(Err(libc::EIO));
            }
        }
    }

    /// Connects again; the new connection's reader and the requests to send again.
    fn reconnect(&self) -> Option<(Stream, Vec<u64>)> {
        loop {
            {
                let _w = self.lock_send();
                let mut st = self.lock();
                if st.closing {
                    return None;
                }
                self.expire(&mut st, Instant::now());
            }
            match connect(&self.target) {
                Ok((sock, info))
                    if info.size == self.info.size && info.flags == self.info.flags =>
                {
                    let (Ok(reader), Ok(ctl)) = (sock.try_clone(), sock.try_clone()) else {
                        continue;
                    };
                    let mut w = self.lock_send();
                    let mut st = self.lock();
                    if st.closing {
                        return None;
                    }
                    let mut again: Vec<u64> = st.pending.keys().copied().collect();
                    again.sort_unstable();
                    *w = Some(sock);
                    st.ctl = Some(ctl);
                    st.down_since = None;
                    log::warn!("nbd export '{}': reconnected", self.target.export);
                    return Some((reader, again));
                }
                Ok(_) => log::warn!(
                    "nbd export '{}': the server came back with another export",
                    self.target.export
                ),
                Err(_) => {}
            }
            let st = self.lock();
            if st.closing {
                return None;
            }
            let _ = self.cv.wait_timeout(st, RETRY);
        }
    }

    /// Reads one reply (or one chunk) and completes its request when it is done.
    fn read_reply(&self, r: &mut Stream) -> io::Result<()> {
        match read_u32(r)? {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0; 12];
                r.read_exact(&mut h)?;
                let (error, handle) = (be32(&h[0..4]), be64(&h[4..12]));
                let p = self.lock().pending.remove(&handle);
                let Some(p) = p else {
                    return Err(protocol("a reply to no request"));
                };
                if p.req.kind == CMD_READ && error == 0 {
                    let mut data = vec![0; p.req.len as usize];
                    if let Err(e) = r.read_exact(&mut data) {
                        self.lock().pending.insert(handle, p);
                        return Err(e);
                    }
                    if let Some(d) = &p.dest {
                        d.0.copy_from_slice(0, &data);
                    }
                }
                p.slot.complete(if error == 0 {
                    Ok(None)
                } else {
                    Err(local_errno(error))
                });
                Ok(())
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0; 16];
                r.read_exact(&mut h)?;
                let flags = be16(&h[0..2]);
                let kind = be16(&h[2..4]);
                let handle = be64(&h[4..12]);
                let len = be32(&h[12..16]);
                if len > MAX_CHUNK {
                    return Err(protocol("a reply chunk too long"));
                }
                let mut data = vec![0; len as usize];
                r.read_exact(&mut data)?;
                let mut st = self.lock();
                let Some(p) = st.pending.get_mut(&handle) else {
                    return Err(protocol("a reply to no request"));
                };
                chunk(p, kind, &data)?;
                if flags & REPLY_FLAG_DONE != 0 {
                    let p = st.pending.remove(&handle);
                    drop(st);
                    if let Some(p) = p {
                        p.slot.complete(match p.error {
                            Some(e) => Err(local_errno(e)),
                            None => Ok(p.status),
                        });
                    }
                }
                Ok(())
            }
            _ => Err(protocol("a bad reply magic")),
        }
    }
}

/// Applies one structured reply chunk to its request.
fn chunk(p: &mut Pending, kind: u16, data: &[u8]) -> io::Result<()> {
    let req_end = p.req.offset + u64::from(p.req.len);
    let range = |off: u64, n: u64| -> io::Result<u64> {
        if off < p.req.offset || off + n > req_end {
            return Err(protocol("a reply chunk outside its request"));
        }
        Ok(off - p.req.offset)
    };
    match kind {
        REPLY_TYPE_NONE => {}
        REPLY_TYPE_OFFSET_DATA if data.len() >= 8 => {
            let at = range(be64(&data[0..8]), data.len() as u64 - 8)?;
            if let Some(d) = &p.dest {
                d.0.copy_from_slice(at, &data[8..]);
            }
        }
        REPLY_TYPE_OFFSET_HOLE if data.len() >= 12 => {
            let n = u64::from(be32(&data[8..12]));
            let at = range(be64(&data[0..8]), n)?;
            if let Some(d) = &p.dest {
                d.0.slice(at, n).fill_zero();
            }
        }
        REPLY_TYPE_BLOCK_STATUS if data.len() >= 12 => {
            if p.status.is_none() {
                p.status = Some((be32(&data[4..8]), be32(&data[8..12])));
            }
        }
        k if k & (1 << 15) != 0 && data.len() >= 4 => {
            p.error = Some(be32(&data[0..4]).max(1));
        }
        _ => return Err(protocol("a bad reply chunk")),
    }
    Ok(())
}

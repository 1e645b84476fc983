//! The transmission phase of one connection.
//!
//! Three parties: the connection's thread reads and checks requests (and the payload
//! of writes); the export's iothread does the I/O, as a task on its executor, like
//! every other request of the daemon; a writer thread of the connection sends the
//! replies in the order they complete. At most [`MAX_REQUESTS`] requests of a
//! connection are in flight, which bounds what a client can make the server hold.
//! Every request is accounted ([`super::acct`]).

use super::acct;
use super::handshake::{Context, Negotiated};
use super::proto::*;
use super::NbdShared;
use blocklayer::aio::executor;
use blocklayer::aio::iovec::{AlignedBuf, IoVec};
use blocklayer::nbd_stream::Stream;
use blocklayer::BlockError;
use std::io::{IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

/// Requests of one connection in flight, at most (QEMU's `MAX_NBD_REQUESTS`).
const MAX_REQUESTS: usize = 16;
/// Block status extents in one reply, at most (per context).
const MAX_EXTENTS: usize = 1 << 16;
/// The longest extent described (a multiple of 4 KiB that fits the 32-bit length).
const MAX_EXTENT_LEN: u64 = 0xffff_f000;
/// Buffers are aligned for O_DIRECT.
const BUF_ALIGN: usize = 4096;

/// A reply ready to send: a header and, for reads, the data.
struct Reply {
    head: Vec<u8>,
    data: Option<(Arc<AlignedBuf>, usize)>,
}

/// What the requests of a connection know of its negotiation.
struct Session {
    export: Arc<NbdShared>,
    structured: bool,
    contexts: Vec<Context>,
    /// The connection's index (which of the export's iothreads serves it).
    index: usize,
    /// Read buffers the writer is done with, for the next reads (a fresh buffer of
    /// megabytes costs a mapping and its page faults).
    pool: Mutex<Vec<AlignedBuf>>,
}

impl Session {
    /// A buffer of at least `len` bytes (the data is not cleared).
    fn buffer(&self, len: usize) -> Option<AlignedBuf> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = pool
            .iter()
            .position(|b| b.len() >= len && b.len() <= 2 * len.max(4096))
        {
            return Some(pool.swap_remove(i));
        }
        drop(pool);
        AlignedBuf::try_zeroed(len, BUF_ALIGN)
    }

    /// Takes a buffer back once its reply is sent.
    fn recycle(&self, buf: AlignedBuf) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < MAX_REQUESTS {
            pool.push(buf);
        }
    }
}

/// A request the server refuses: its error, a message, and whether the connection
/// cannot go on (the stream is out of step).
struct Refusal {
    errno: u32,
    msg: String,
    fatal: bool,
}

fn refuse(errno: u32, msg: impl Into<String>) -> Refusal {
    Refusal {
        errno,
        msg: msg.into(),
        fatal: false,
    }
}

/// Counts a connection's requests in flight.
struct Slots {
    n: Mutex<usize>,
    cv: Condvar,
}

impl Slots {
    fn take(&self) {
        let mut n = self.n.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= MAX_REQUESTS {
            n = self.cv.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
    }

    fn give(&self) {
        *self.n.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.cv.notify_all();
    }
}

/// Serves a negotiated connection until the client disconnects, breaks the protocol
/// or the export drops it. `index` spreads the connections over the export's
/// iothreads.
pub fn serve(mut stream: Stream, neg: Negotiated, index: usize) {
    let writer_stream = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            log::warn!("nbd: cannot serve a client: {e}");
            return;
        }
    };
    let session = Arc::new(Session {
        export: neg.export,
        structured: neg.structured,
        contexts: neg.contexts,
        index,
        pool: Mutex::new(Vec::new()),
    });
    let slots = Arc::new(Slots {
        n: Mutex::new(0),
        cv: Condvar::new(),
    });
    let (tx, rx) = mpsc::channel::<Reply>();
    let writer = {
        let (slots, session) = (slots.clone(), session.clone());
        std::thread::Builder::new()
            .name("nbd-writer".into())
            .spawn(move || write_replies(writer_stream, rx, &slots, &session))
    };
    let writer = match writer {
        Ok(w) => w,
        Err(e) => {
            log::warn!("nbd: cannot start a writer thread: {e}");
            return;
        }
    };
    read_requests(&mut stream, &session, &slots, &tx);
    drop(tx);
    let _ = writer.join();
    stream.shutdown(Shutdown::Both);
}

fn write_replies(mut s: Stream, rx: mpsc::Receiver<Reply>, slots: &Slots, session: &Session) {
    let mut broken = false;
    for r in rx {
        if !broken {
            let data = r
                .data
                .as_ref()
                .map_or(&[][..], |(b, n)| &b.as_slice()[..*n]);
            if write_all2(&mut s, &r.head, data).is_err() {
                // The reader sees the connection end; keep counting replies off.
                s.shutdown(Shutdown::Both);
                broken = true;
            }
        }
        // A buffer nothing else holds any more (no I/O op keeps it) is reused.
        if let Some(buf) = r.data.and_then(|(b, _)| Arc::try_unwrap(b).ok()) {
            session.recycle(buf);
        }
        slots.give();
    }
}

/// Writes a header and its data, with as few system calls as the socket allows.
fn write_all2(s: &mut Stream, mut a: &[u8], mut b: &[u8]) -> std::io::Result<()> {
    while !a.is_empty() {
        let n = s.write_vectored(&[IoSlice::new(a), IoSlice::new(b)])?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        if n < a.len() {
            a = &a[n..];
        } else {
            b = &b[n - a.len()..];
            a = &[];
        }
    }
    s.write_all(b)
}

fn read_requests(s: &mut Stream, session: &Arc<Session>, slots: &Slots, tx: &mpsc::Sender<Reply>) {
    let export = &session.export;
    loop {
        let mut head = [0u8; REQUEST_LEN];
        if s.read_exact(&mut head).is_err() {
            return;
        }
        let Some(req) = Request::parse(&head) else {
            log::warn!(
                "nbd export {}: bad request magic, dropping the client",
                export.id
            );
            return;
        };
        if req.kind == CMD_DISC {
            return;
        }
        let payload = match read_payload(s, &req) {
            Ok(p) => p,
            Err(r) => {
                slots.take();
                let _ = tx.send(refused(session, &req, &r));
                return;
            }
        };
        // A refused request is answered from the iothread too: its accounting then
        // writes the iothread's statistics shard, as the requests that run do (this
        // thread would hold a shard of its own for as long as the client stays).
        let checked = check(session, &req);
        slots.take();
        let Some(lp) = export.event_loop(session.index) else {
            let r = refuse(ESHUTDOWN, "server shutting down");
            let _ = tx.send(refused(session, &req, &r));
            return;
        };
        export.request_begin();
        let (sess, tx2) = (session.clone(), tx.clone());
        let posted = lp.post(move || {
            executor::spawn(async move {
                let reply = match checked {
                    Ok(()) => execute(&sess, req, payload).await,
                    Err(r) => refused(&sess, &req, &r),
                };
                sess.export.request_end();
                let _ = tx2.send(reply);
            })
        });
        if !posted {
            export.request_end();
            let r = refuse(ESHUTDOWN, "server shutting down");
            let _ = tx.send(refused(session, &req, &r));
            return;
        }
    }
}

/// Reads a write's payload; a payload that cannot be read ends the connection.
fn read_payload(s: &mut Stream, req: &Request) -> Result<Option<Arc<AlignedBuf>>, Refusal> {
    if req.kind != CMD_WRITE {
        return Ok(None);
    }
    let fatal = |errno, msg: String| Refusal {
        errno,
        msg,
        fatal: true,
    };
    if req.len > MAX_BUFFER {
        return Err(fatal(
            EINVAL,
            format!("len ({}) is larger than max len ({MAX_BUFFER})", req.len),
        ));
    }
    let Some(mut buf) = AlignedBuf::try_zeroed(req.len as usize, BUF_ALIGN) else {
        return Err(fatal(ENOMEM, "out of memory".into()));
    };
    if s.read_exact(buf.as_mut_slice()).is_err() {
        return Err(fatal(EIO, "short write payload".into()));
    }
    Ok(Some(Arc::new(buf)))
}

/// Checks a request against the export and the negotiation (QEMU's
/// `nbd_co_receive_request`).
fn check(session: &Session, req: &Request) -> Result<(), Refusal> {
    let export = &session.export;
    let mut valid = CMD_FLAG_FUA;
    match req.kind {
        CMD_READ => {
            if session.structured {
                valid |= CMD_FLAG_DF;
            }
            if req.len > MAX_BUFFER {
                return Err(refuse(
                    EINVAL,
                    format!("len ({}) is larger than max len ({MAX_BUFFER})", req.len),
                ));
            }
        }
        CMD_WRITE | CMD_FLUSH | CMD_TRIM => {}
        CMD_WRITE_ZEROES => valid |= CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => {
            valid |= CMD_FLAG_REQ_ONE;
            if session.contexts.is_empty() {
                return Err(refuse(EINVAL, "CMD_BLOCK_STATUS not negotiated"));
            }
        }
        k => return Err(refuse(EINVAL, format!("unsupported command {k}"))),
    }
    if req.flags & !valid != 0 {
        return Err(refuse(
            EINVAL,
            format!(
                "unsupported flags 0x{:x} (got 0x{:x})",
                req.flags & !valid,
                req.flags
            ),
        ));
    }
    // EINVAL, as QEMU 7.2's server answers (the specification suggests EPERM and
    // ENOSPC for the first two).
    if matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) && !export.writable {
        return Err(refuse(EINVAL, "Export is read-only"));
    }
    if req.kind != CMD_FLUSH {
        let size = export.size();
        if req.offset > size || u64::from(req.len) > size - req.offset {
            return Err(refuse(
                EINVAL,
                format!(
                    "operation past EOF; From: {}, Len: {}, Size: {size}",
                    req.offset, req.len
                ),
            ));
        }
    }
    if req.kind == CMD_BLOCK_STATUS && req.len == 0 {
        return Err(refuse(EINVAL, "need non-zero length"));
    }
    Ok(())
}

fn error_reply(session: &Session, req: &Request, r: &Refusal) -> Reply {
    let head = if session.structured && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS) {
        error_chunk(req.handle, r.errno, &r.msg)
    } else {
        simple_reply(req.handle, r.errno)
    };
    if r.fatal {
        log::warn!(
            "nbd export {}: {}; dropping the client",
            session.export.id,
            r.msg
        );
    }
    Reply { head, data: None }
}

/// Accounts a request refused before it ran and makes its error reply. Refusals
/// with EINVAL are the client's invalid requests.
fn refused(session: &Session, req: &Request, r: &Refusal) -> Reply {
    acct::refused(&session.export, req, r.errno == EINVAL);
    error_reply(session, req, r)
}

fn io_refusal(e: BlockError) -> Refusal {
    refuse(wire_errno(e.errno()), e.to_string())
}

async fn execute(s: &Session, req: Request, payload: Option<Arc<AlignedBuf>>) -> Reply {
    let started = acct::Started::new(&req);
    let result = run(s, &req, payload).await;
    started.finish(&s.export, result.is_ok());
    match result {
        Ok(r) => r,
        Err(r) => error_reply(s, &req, &r),
    }
}

fn done(s: &Session, req: &Request) -> Reply {
    let head = if s.structured && req.kind == CMD_READ {
        chunk_header(req.handle, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
    } else {
        simple_reply(req.handle, 0)
    };
    Reply { head, data: None }
}

async fn run(
    s: &Session,
    req: &Request,
    payload: Option<Arc<AlignedBuf>>,
) -> Result<Reply, Refusal> {
    let blk = &s.export.blk;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len = u64::from(req.len);
    if len == 0 && req.kind != CMD_FLUSH {
        return Ok(done(s, req));
    }
    match req.kind {
        CMD_READ => {
            let Some(buf) = s.buffer(req.len as usize) else {
                return Err(refuse(ENOMEM, "out of memory"));
            };
            let buf = Arc::new(buf);
            blk.read(req.offset, IoVec::from_buf(buf.clone()).slice(0, len))
                .await
                .map_err(io_refusal)?;
            let head = if s.structured {
                let mut h = chunk_header(
                    req.handle,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    8 + req.len,
                );
                h.extend_from_slice(&req.offset.to_be_bytes());
                h
            } else {
                simple_reply(req.handle, 0)
            };
            Ok(Reply {
                head,
                data: Some((buf, req.len as usize)),
            })
        }
        CMD_WRITE => {
            let Some(buf) = payload else {
                return Err(refuse(EINVAL, "no payload"));
            };
            blk.write(req.offset, IoVec::from_buf(buf), fua)
                .await
                .map_err(io_refusal)?;
            Ok(done(s, req))
        }
        CMD_FLUSH => {
            blk.flush().await.map_err(io_refusal)?;
            Ok(done(s, req))
        }
        CMD_TRIM => {
            blk.discard(req.offset, len).await.map_err(io_refusal)?;
            if fua {
                blk.flush().await.map_err(io_refusal)?;
            }
            Ok(done(s, req))
        }
        CMD_WRITE_ZEROES => {
            let may_unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
            blk.write_zeroes(req.offset, len, may_unmap, fua)
                .await
                .map_err(io_refusal)?;
            Ok(done(s, req))
        }
        CMD_BLOCK_STATUS => block_status(s, req).await,
        _ => Err(refuse(EINVAL, "unsupported command")),
    }
}

/// Extents of one context: (length, flags), merged where the flags are equal.
struct Extents {
    v: Vec<(u32, u32)>,
    max: usize,
}

impl Extents {
    /// Adds an extent; whether more fit.
    fn push(&mut self, mut len: u64, flags: u32) -> bool {
        if let Some(last) = self.v.last_mut() {
            if last.1 == flags {
                let room = MAX_EXTENT_LEN - u64::from(last.0);
                let n = room.min(len);
                last.0 += n as u32;
                len -= n;
            }
        }
        while len > 0 {
            if self.v.len() >= self.max {
                return false;
            }
            let n = len.min(MAX_EXTENT_LEN);
            self.v.push((n as u32, flags));
            len -= n;
        }
        self.v.len() < self.max
    }
}

async fn block_status(s: &Session, req: &Request) -> Result<Reply, Refusal> {
    let export = &s.export;
    let end = req.offset + u64::from(req.len);
    let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_EXTENTS
    };
    let mut head = Vec::new();
    for (id, ctx) in s.contexts.iter().enumerate() {
        let mut ex = Extents { v: Vec::new(), max };
        let mut pos = req.offset;
        match ctx {
            Context::BaseAllocation | Context::AllocationDepth => {
                while pos < end {
                    let (e, n) = export
                        .blk
                        .block_status(pos, end - pos)
                        .await
                        .map_err(io_refusal)?;
                    let flags = if *ctx == Context::AllocationDepth {
                        e.depth
                    } else {
                        (if e.data { 0 } else { STATE_HOLE })
                            | (if e.zero { STATE_ZERO } else { 0 })
                    };
                    pos += n;
                    if !ex.push(n, flags) {
                        break;
                    }
                }
            }
            Context::DirtyBitmap(i) => {
                let bits = export.bitmaps[*i].bits();
                let limit = end.min(bits.size().max(pos));
                while pos < end {
                    let (n, flags) = if pos >= limit {
                        (end - pos, 0)
                    } else if bits.get(pos) {
                        let run_end = bits
                            .next_dirty(pos, limit - pos)
                            .map_or(pos + 1, |(o, l)| o + l);
                        (run_end.min(limit).max(pos + 1) - pos, STATE_DIRTY)
                    } else {
                        let next = bits.next_dirty(pos, limit - pos).map_or(limit, |(o, _)| o);
                        (next.min(limit).max(pos + 1) - pos, 0)
                    };
                    pos += n;
                    if !ex.push(n, flags) {
                        break;
                    }
                }
            }
        }
        let last = id + 1 == s.contexts.len();
        let flags = if last { REPLY_FLAG_DONE } else { 0 };
        let len = 4 + 8 * ex.v.len() as u32;
        head.extend(chunk_header(
            req.handle,
            flags,
            REPLY_TYPE_BLOCK_STATUS,
            len,
        ));
        head.extend_from_slice(&(id as u32).to_be_bytes());
        for (l, f) in &ex.v {
            head.extend_from_slice(&l.to_be_bytes());
            head.extend_from_slice(&f.to_be_bytes());
        }
    }
    Ok(Reply { head, data: None })
}

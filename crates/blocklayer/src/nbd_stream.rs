//! An NBD connection's socket, UNIX or TCP, plain or TLS (after `NBD_OPT_STARTTLS`):
//! the server's client connections and the `nbd` driver's connections to its server.
//!
//! A TLS stream is shared by its clones (one thread reads, another writes, a third
//! may shut it down), so the rustls connection sits behind a lock that is never held
//! over socket I/O: a writer encrypts under it and sends outside it (under a lock of
//! its own that keeps records in order), a reader receives outside it and decrypts
//! under it. Reading and writing thus never wait for each other on the socket, as
//! with a plain socket (what the reader must send, such as an answer to a key update,
//! goes out with the next record written when a writer is busy).

use rustls::{ClientConnection, Connection, ServerConnection};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// A connected UNIX or TCP socket, or a TLS session over one.
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(Arc<TlsStream>),
}

/// The largest ciphertext read from the socket at once.
const RX_CHUNK: usize = 64 * 1024;

/// A TLS session over a plain socket.
pub struct TlsStream {
    /// The plain socket (never a TLS stream itself).
    sock: Stream,
    conn: Mutex<Connection>,
    /// Held while records are encrypted and sent, so that they leave in order.
    send: Mutex<()>,
    /// Ciphertext received but not yet taken by rustls.
    rx: Mutex<RxBuf>,
}

/// A receive buffer: `buf[start..end]` is waiting for rustls.
struct RxBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl RxBuf {
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Tls(t) => Stream::Tls(t.clone()),
        })
    }

    pub fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Tls(t) => {
                t.sock.shutdown(how);
                Ok(())
            }
        };
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Tls(s) => s.sock.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Tls(s) => s.sock.set_write_timeout(t),
        }
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Tls(t) => t.sock.raw_fd(),
        }
    }

    /// Whether the stream is a TLS session.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Runs the server side of a TLS handshake on this (plain) socket; the stream
    /// of the session. Its errors say `TLS handshake failed: ...`.
    pub fn start_tls_server(self, config: Arc<rustls::ServerConfig>) -> io::Result<Stream> {
        let conn = ServerConnection::new(config).map_err(tls_error)?;
        self.handshake(conn.into())
    }

    /// Runs the client side of a TLS handshake with a server of `name`.
    pub fn start_tls_client(self, tls: &crate::tls::ClientTls) -> io::Result<Stream> {
        let conn =
            ClientConnection::new(tls.config.clone(), tls.name.clone()).map_err(tls_error)?;
        self.handshake(conn.into())
    }

    fn handshake(mut self, mut conn: Connection) -> io::Result<Stream> {
        if self.is_tls() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TLS already enabled",
            ));
        }
        while conn.is_handshaking() {
            conn.complete_io(&mut self).map_err(|e| {
                let why = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(t) => describe(t),
                    None => e.to_string(),
                };
                io::Error::new(e.kind(), format!("TLS handshake failed: {why}"))
            })?;
        }
        // What the handshake left queued (TLS 1.3 session tickets).
        while conn.wants_write() {
            conn.write_tls(&mut self)?;
        }
        Ok(Stream::Tls(Arc::new(TlsStream {
            sock: self,
            conn: Mutex::new(conn),
            send: Mutex::new(()),
            rx: Mutex::new(RxBuf {
                buf: vec![0; RX_CHUNK].into_boxed_slice(),
                start: 0,
                end: 0,
            }),
        })))
    }
}

/// A handshake failure in words (GnuTLS's, as QEMU reports them, for the common
/// certificate problems).
fn describe(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "The certificate hasn't got a known issuer".into(),
            C::NotValidForNameContext { expected, .. } => format!(
                "Certificate does not match the hostname {}",
                expected.to_str()
            ),
            C::NotValidForName => "Certificate does not match the hostname".into(),
            C::Expired | C::ExpiredContext { .. } => "The certificate has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "The certificate is not yet activated".into()
            }
            C::Revoked => "The certificate has been revoked".into(),
            other => format!("invalid peer certificate: {other}"),
        },
        rustls::Error::NoCertificatesPresented => "No certificate was found".into(),
        other => other.to_string(),
    }
}

impl TlsStream {
    /// Sends what rustls has queued (alerts, an answer to a key update), unless a
    /// writer is sending: it takes the queue with its next record. The reader never
    /// waits for a writer that a peer not reading may block.
    fn flush_tls(&self) -> io::Result<()> {
        let _order = match self.send.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        };
        let mut out = Vec::new();
        {
            let mut c = lock(&self.conn);
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
        }
        (&self.sock).write_all(&out)
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let mut rx = lock(&self.rx);
            let mut c = lock(&self.conn);
            // Hand over the ciphertext rustls has room for, and decrypt it.
            let mut result = Ok(());
            while !rx.is_empty() {
                // An error: its buffers are full, the plaintext is read first.
                let n = c.read_tls(&mut rx.pending()).unwrap_or_default();
                rx.start += n;
                if let Err(e) = c.process_new_packets() {
                    result = Err(tls_error(e));
                    break;
                }
                if n == 0 {
                    break;
                }
            }
            let wants_write = c.wants_write();
            let got = match result {
                Ok(()) => match c.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                    // The peer closed without close_notify (as most NBD peers do).
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        Some(Err(io::ErrorKind::UnexpectedEof.into()))
                    }
                    r => Some(r),
                },
                Err(e) => Some(Err(e)),
            };
            drop(c);
            if wants_write {
                let _ = self.flush_tls();
            }
            if let Some(r) = got {
                return r;
            }
            if !rx.is_empty() {
                // rustls takes no more and has nothing to give: it cannot go on.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS records rustls cannot take",
                ));
            }
            // Nothing to decrypt: wait for the peer (outside the session's lock).
            let n = (&self.sock).read(&mut rx.buf)?;
            (rx.start, rx.end) = (0, n);
            if n == 0 {
                // The end of the stream: rustls tells a clean close (close_notify
                // seen: 0) from a truncated one (an error).
                let mut c = lock(&self.conn);
                let _ = c.read_tls(&mut &[][..]);
                let _ = c.process_new_packets();
                return match c.reader().read(buf) {
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::UnexpectedEof
                        ) =>
                    {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    }
                    r => r,
                };
            }
        }
    }

    fn write(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let _order = lock(&self.send);
        let mut out = Vec::new();
        let n = {
            let mut c = lock(&self.conn);
            let n = c.writer().write_vectored(bufs)?;
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
            n
        };
        (&self.sock).write_all(&out)?;
        Ok(n)
    }
}

impl Drop for TlsStream {
    fn drop(&mut self) {
        // A clean end for the peer (close_notify), if the socket takes it at once.
        let mut out = Vec::new();
        {
            let mut c = lock(&self.conn);
            c.send_close_notify();
            while c.wants_write() {
                if c.write_tls(&mut out).is_err() {
                    break;
                }
            }
        }
        // SAFETY: the fd is the live socket this stream owns; the buffer is valid for
        // reads of its length. MSG_DONTWAIT: never blocks a dropping thread.
        unsafe {
            libc::send(
                self.sock.raw_fd(),
                out.as_ptr().cast(),
                out.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Stream::Unix(s) => (&*s).write(buf),
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Tls(t) => t.write(&[io::IoSlice::new(buf)]),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match *self {
            Stream::Unix(s) => (&*s).write_vectored(bufs),
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
            Stream::Tls(t) => t.write(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

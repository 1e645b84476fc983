//! The `nbd` driver: a node whose data lives on an NBD server (qemu-nbd, nbdkit,
//! another vubd), over a UNIX or TCP socket ([`client`]). Structured replies and
//! `base:allocation` block status are used when the server has them, and several
//! connections when it allows multi-conn (a flush on one then covers the writes
//! completed on all, as the protocol promises); a lost
//! connection is re-established and the requests waiting on it are sent again,
//! for `reconnect-delay` seconds. With `tls-creds`, each connection starts TLS
//! (`NBD_OPT_STARTTLS`) before anything else.

mod client;
mod options;

pub use options::{NbdOptions, NbdServerAddr};

use crate::aio::iovec::IoVec;
use crate::aio::LocalBoxFuture;
use crate::block_status::Status;
use crate::driver::Driver;
use crate::error::{BlockError, Result};
use crate::limits::Limits;
use crate::nbd_proto::*;
use client::{Client, Target};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The table row of `nbd`.
pub(crate) const ENTRY: super::DriverEntry = super::DriverEntry {
    names: &["nbd"],
    kind: super::Kind::Protocol,
    parse: options::parse,
    create: None,
    reopen_mutable: &[],
};

/// Connections a node opens to a server that allows multi-conn (one otherwise).
const MULTI_CONN: usize = 4;

pub struct NbdDriver {
    opts: NbdOptions,
    /// The first connection (what the server told about the export), then more
    /// where the server allows multi-conn; requests go round-robin over them.
    client: Arc<Client>,
    conns: Vec<Arc<Client>>,
    next: AtomicUsize,
}

fn io_error(op: &'static str, errno: i32) -> BlockError {
    BlockError::io(op, std::io::Error::from_raw_os_error(errno))
}

impl NbdDriver {
    pub fn open(
        opts: NbdOptions,
        tls: Option<crate::tls::ClientTls>,
        read_only: bool,
    ) -> Result<NbdDriver> {
        let target = Target {
            addr: opts.server.clone(),
            export: opts.export.clone().unwrap_or_default(),
            tls,
        };
        let client = Client::open(
            target.clone(),
            Duration::from_secs(opts.reconnect_delay),
            Duration::from_secs(opts.open_timeout),
        )
        .map_err(|e| {
            // QEMU's texts: the server's refusal as it is, a connection failure with
            // the C library's text.
            if e.kind() == std::io::ErrorKind::NotFound && e.raw_os_error().is_none() {
                return BlockError::Graph(e.to_string());
            }
            let target = match &opts.server {
                NbdServerAddr::Unix(p) => p.clone(),
                NbdServerAddr::Inet { host, port } => format!("{host}:{port}"),
            };
            let why = match e.raw_os_error() {
                Some(errno) => crate::error::strerror(errno),
                None => e.to_string(),
            };
            BlockError::Graph(format!("Failed to connect to '{target}': {why}"))
        })?;
        if !read_only && client.info.flags & FLAG_READ_ONLY != 0 {
            client.close();
            return Err(BlockError::Graph("NBD export is read-only".into()));
        }
        let mut conns = vec![client.clone()];
        if client.info.flags & FLAG_CAN_MULTI_CONN != 0 {
            // More connections are a bonus: a server that refuses them leaves one.
            while conns.len() < MULTI_CONN {
                match Client::open(
                    target.clone(),
                    Duration::from_secs(opts.reconnect_delay),
                    Duration::ZERO,
                ) {
                    Ok(c)
                        if c.info.size == client.info.size && c.info.flags == client.info.flags =>
                    {
                        conns.push(c)
                    }
                    Ok(c) => {
                        c.close();
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        Ok(NbdDriver {
            opts,
            client,
            conns,
            next: AtomicUsize::new(0),
        })
    }

    /// The connection for the next request.
    fn conn(&self) -> &Client {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        &self.conns[i]
    }

    fn has(&self, flag: u16) -> bool {
        self.client.info.flags & flag != 0
    }

    async fn call(
        &self,
        op: &'static str,
        cmd: Cmd,
        payload: Option<IoVec>,
        dest: Option<IoVec>,
    ) -> Result<Option<(u32, u32)>> {
        let len = u32::try_from(cmd.len).map_err(|_| io_error(op, libc::EINVAL))?;
        self.conn()
            .request(cmd.kind, cmd.flags, cmd.offset, len, payload, dest)
            .await
            .map_err(|e| io_error(op, e))
    }
}

/// A command to send: its type, flags and range.
struct Cmd {
    kind: u16,
    flags: u16,
    offset: u64,
    len: u64,
}

fn cmd(kind: u16, flags: u16, offset: u64, len: u64) -> Cmd {
    Cmd {
        kind,
        flags,
        offset,
        len,
    }
}

impl Drop for NbdDriver {
    fn drop(&mut self) {
        for c in &self.conns {
            c.close();
        }
    }
}

/// The largest zeroing or trimming request (a 32-bit length, block aligned).
const MAX_RANGE: u64 = 1 << 30;

impl Driver for NbdDriver {
    fn driver_name(&self) -> &'static str {
        "nbd"
    }

    fn size(&self) -> u64 {
        self.client.info.size
    }

    fn own_limits(&self) -> Limits {
        let info = &self.client.info;
        Limits {
            request_alignment: info.min_block,
            max_transfer: u64::from(info.max_block),
            max_discard: MAX_RANGE,
            max_write_zeroes: MAX_RANGE,
            ..Limits::default()
        }
    }

    fn filename(&self) -> String {
        let export = self.opts.export.as_deref().unwrap_or("");
        match &self.opts.server {
            NbdServerAddr::Unix(p) => format!("nbd+unix:///{export}?socket={p}"),
            NbdServerAddr::Inet { host, port } => format!("nbd://{host}:{port}/{export}"),
        }
    }

    fn supports_fua(&self) -> bool {
        self.has(FLAG_SEND_FUA)
    }

    fn is_read_only(&self) -> bool {
        self.has(FLAG_READ_ONLY)
    }

    fn block_status(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<(Status, u64)>> {
        Box::pin(async move {
            if self.client.info.alloc_ctx.is_none() {
                return Ok((Status::Data, len));
            }
            let n = len.min(MAX_RANGE);
            let r = self
                .call(
                    "block status",
                    cmd(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, offset, n),
                    None,
                    None,
                )
                .await?;
            let Some((elen, flags)) = r else {
                return Ok((Status::Data, len));
            };
            let n = u64::from(elen).clamp(1, len);
            // A hole that does not read as zeroes holds data as far as readers know.
            let status = if flags & STATE_HOLE != 0 && flags & STATE_ZERO != 0 {
                Status::Zero
            } else {
                Status::Data
            };
            Ok((status, n))
        })
    }

    fn read<'a>(&'a self, offset: u64, iov: IoVec) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let len = iov.len();
            self.call("read", cmd(CMD_READ, 0, offset, len), None, Some(iov))
                .await
                .map(|_| ())
        })
    }

    fn write<'a>(&'a self, offset: u64, iov: IoVec, fua: bool) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let len = iov.len();
            let flags = if fua { CMD_FLAG_FUA } else { 0 };
            self.call("write", cmd(CMD_WRITE, flags, offset, len), Some(iov), None)
                .await
                .map(|_| ())
        })
    }

    fn flush(&self) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if !self.has(FLAG_SEND_FLUSH) {
                return Ok(());
            }
            self.call("flush", cmd(CMD_FLUSH, 0, 0, 0), None, None)
                .await
                .map(|_| ())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if !self.has(FLAG_SEND_TRIM) {
                return Ok(());
            }
            self.call("discard", cmd(CMD_TRIM, 0, offset, len), None, None)
                .await
                .map(|_| ())
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if !self.has(FLAG_SEND_WRITE_ZEROES) {
                return Err(BlockError::Unsupported("write zeroes"));
            }
            let flags = if may_unmap { 0 } else { CMD_FLAG_NO_HOLE };
            self.call(
                "write zeroes",
                cmd(CMD_WRITE_ZEROES, flags, offset, len),
                None,
                None,
            )
            .await
            .map(|_| ())
        })
    }
}

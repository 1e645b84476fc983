//! The NBD handshake: fixed newstyle negotiation up to `NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`. A client that breaks the framing (wrong magic, unknown
//! client flags, an option too long to skip) is dropped; a bad option gets an error
//! reply and the negotiation goes on. A server with TLS credentials takes only
//! `NBD_OPT_STARTTLS` until its client has started TLS.

use super::proto::*;
use super::NbdShared;
use blocklayer::nbd_stream::Stream;
use std::io::{self, Read, Write};
use std::sync::Arc;

/// A block status context the client selected (its id is its index in the
/// negotiated list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Context {
    BaseAllocation,
    AllocationDepth,
    /// The export's bitmap of this index.
    DirtyBitmap(usize),
}

/// What the export offers to find and list.
pub trait Exports {
    fn find(&self, name: &str) -> Option<Arc<NbdShared>>;
    fn list(&self) -> Vec<Arc<NbdShared>>;
}

/// The outcome of a handshake that reached the transmission phase.
pub struct Negotiated {
    pub export: Arc<NbdShared>,
    /// The connection's registration with the export ([`NbdShared::add_client`]),
    /// made before the client hears that `NBD_OPT_GO` succeeded: from then on the
    /// export counts as in use.
    pub client: u64,
    pub structured: bool,
    pub contexts: Vec<Context>,
}

/// Why a handshake ended without transmission.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("client sent {0}")]
    Protocol(&'static str),
    #[error("client aborted the handshake")]
    Aborted,
}

type Result<T> = std::result::Result<T, HandshakeError>;

/// The transmission flags of an export.
pub fn transmission_flags(export: &NbdShared, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN;
    if export.writable {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    } else {
        f |= FLAG_READ_ONLY;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    f
}

struct Handshake<'a> {
    s: &'a mut Stream,
    exports: &'a dyn Exports,
    /// `tls-creds` of the server: no option but `NBD_OPT_STARTTLS` until TLS runs.
    tls: Option<&'a Arc<rustls::ServerConfig>>,
    no_zeroes: bool,
    structured: bool,
    /// Contexts selected by `NBD_OPT_SET_META_CONTEXT`, and for which export.
    contexts: Vec<Context>,
    contexts_for: Option<String>,
}

/// Runs the handshake on a new connection; with `tls`, the client must start TLS
/// first (the connection in `s` becomes the TLS session).
pub fn negotiate(
    s: &mut Stream,
    exports: &dyn Exports,
    tls: Option<&Arc<rustls::ServerConfig>>,
) -> Result<Negotiated> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    let client_flags = u32::from_be_bytes(b);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol("unknown client flags"));
    }
    let mut h = Handshake {
        s,
        exports,
        tls,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        contexts: Vec::new(),
        contexts_for: None,
    };
    loop {
        if let Some(n) = h.option()? {
            return Ok(n);
        }
    }
}

impl Handshake<'_> {
    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> Result<()> {
        self.s.write_all(&option_reply(option, kind, data))?;
        Ok(())
    }

    fn error(&mut self, option: u32, kind: u32, msg: &str) -> Result<()> {
        self.reply(option, kind, msg.as_bytes())
    }

    /// Reads and answers one option; `Some` once transmission begins.
    fn option(&mut self) -> Result<Option<Negotiated>> {
        let mut head = [0; 16];
        self.s.read_exact(&mut head)?;
        if be64(&head[0..8]) != IHAVEOPT {
            return Err(HandshakeError::Protocol("a bad option magic"));
        }
        let option = be32(&head[8..12]);
        let len = be32(&head[12..16]);
        if len > MAX_OPTION {
            if len > MAX_OPTION_SKIP || option == OPT_EXPORT_NAME {
                return Err(HandshakeError::Protocol("an option too long"));
            }
            io::copy(&mut (&mut *self.s).take(u64::from(len)), &mut io::sink())?;
            self.error(option, REP_ERR_TOO_BIG, "option too long")?;
            return Ok(None);
        }
        let mut data = vec![0; len as usize];
        self.s.read_exact(&mut data)?;
        if self.tls.is_some() && !self.s.is_tls() {
            return self.before_tls(option, &data).map(|()| None);
        }
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = self.exports.find(&name) else {
                    return Err(HandshakeError::Protocol("an unknown export name"));
                };
                let mut v = Vec::with_capacity(10 + 124);
                v.extend_from_slice(&export.size().to_be_bytes());
                v.extend_from_slice(&transmission_flags(&export, self.structured).to_be_bytes());
                if !self.no_zeroes {
                    v.extend_from_slice(&[0; 124]);
                }
                let Some(client) = self.s.try_clone().ok().and_then(|c| export.add_client(c))
                else {
                    return Err(HandshakeError::Protocol("an export that is going away"));
                };
                if let Err(e) = self.s.write_all(&v) {
                    export.remove_client(client);
                    return Err(e.into());
                }
                return Ok(Some(self.negotiated(export, &name, client)));
            }
            OPT_ABORT => {
                let _ = self.reply(option, REP_ACK, &[]);
                return Err(HandshakeError::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.error(option, REP_ERR_INVALID, "no payload expected")?;
                } else {
                    for e in self.exports.list() {
                        let mut v = Vec::new();
                        v.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                        v.extend_from_slice(e.name.as_bytes());
                        if let Some(d) = &e.description {
                            v.extend_from_slice(d.as_bytes());
                        }
                        self.reply(option, REP_SERVER, &v)?;
                    }
                    self.reply(option, REP_ACK, &[])?;
                }
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    self.error(option, REP_ERR_INVALID, "no payload expected")?;
                } else if self.tls.is_some() {
                    self.error(option, REP_ERR_INVALID, "TLS already enabled")?;
                } else {
                    self.error(option, REP_ERR_POLICY, "TLS not configured")?;
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.error(option, REP_ERR_INVALID, "no payload expected")?;
                } else if self.structured {
                    self.error(
                        option,
                        REP_ERR_INVALID,
                        "structured reply already negotiated",
                    )?;
                } else {
                    self.structured = true;
                    self.reply(option, REP_ACK, &[])?;
                }
            }
            OPT_INFO | OPT_GO => return self.info(option, &data),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta(option, &data)?,
            _ => self.error(option, REP_ERR_UNSUP, "unsupported option")?,
        }
        Ok(None)
    }

    /// An option before TLS on a server that requires it: only `NBD_OPT_STARTTLS`
    /// goes on (as in QEMU's server: the others are refused with
    /// `NBD_REP_ERR_TLS_REQD`, `NBD_OPT_EXPORT_NAME` drops the connection).
    fn before_tls(&mut self, option: u32, data: &[u8]) -> Result<()> {
        match option {
            OPT_STARTTLS => {
                if !data.is_empty() {
                    let _ = self.error(option, REP_ERR_INVALID, "no payload expected");
                    return Err(HandshakeError::Protocol("STARTTLS with a payload"));
                }
                self.reply(option, REP_ACK, &[])?;
                let config = self.tls.expect("TLS configured").clone();
                let plain = self.s.try_clone()?;
                *self.s = plain.start_tls_server(config)?;
                Ok(())
            }
            OPT_EXPORT_NAME => Err(HandshakeError::Protocol("NBD_OPT_EXPORT_NAME before TLS")),
            OPT_ABORT => {
                let _ = self.error(option, REP_ERR_TLS_REQD, "TLS required");
                Err(HandshakeError::Aborted)
            }
            _ => self.error(
                option,
                REP_ERR_TLS_REQD,
                &format!("Option 0x{option:x} not permitted before TLS"),
            ),
        }
    }

    fn negotiated(&mut self, export: Arc<NbdShared>, name: &str, client: u64) -> Negotiated {
        let contexts = if self.contexts_for.as_deref() == Some(name) {
            std::mem::take(&mut self.contexts)
        } else {
            Vec::new()
        };
        Negotiated {
            export,
            client,
            structured: self.structured,
            contexts,
        }
    }

    fn info(&mut self, option: u32, data: &[u8]) -> Result<Option<Negotiated>> {
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u16()?;
            let mut wanted = Vec::new();
            for _ in 0..n {
                wanted.push(c.u16()?);
            }
            (c.remaining() == 0).then_some((name, wanted))
        })();
        let Some((name, wanted)) = parsed else {
            self.error(option, REP_ERR_INVALID, "invalid request length")?;
            return Ok(None);
        };
        let Some(export) = self.exports.find(&name) else {
            self.error(
                option,
                REP_ERR_UNKNOWN,
                &format!("export '{name}' not present"),
            )?;
            return Ok(None);
        };
        if wanted.contains(&INFO_NAME) {
            let mut v = INFO_NAME.to_be_bytes().to_vec();
            v.extend_from_slice(export.name.as_bytes());
            self.reply(option, REP_INFO, &v)?;
        }
        if wanted.contains(&INFO_DESCRIPTION) {
            if let Some(d) = &export.description {
                let mut v = INFO_DESCRIPTION.to_be_bytes().to_vec();
                v.extend_from_slice(d.as_bytes());
                self.reply(option, REP_INFO, &v)?;
            }
        }
        // Sizes: any byte granularity (the block layer reads, modifies and writes
        // around unaligned requests), 4 KiB preferred, the payload limit.
        let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        v.extend_from_slice(&1u32.to_be_bytes());
        v.extend_from_slice(&4096u32.to_be_bytes());
        v.extend_from_slice(&MAX_BUFFER.to_be_bytes());
        self.reply(option, REP_INFO, &v)?;
        let mut v = INFO_EXPORT.to_be_bytes().to_vec();
        v.extend_from_slice(&export.size().to_be_bytes());
        v.extend_from_slice(&transmission_flags(&export, self.structured).to_be_bytes());
        self.reply(option, REP_INFO, &v)?;
        if option != OPT_GO {
            self.reply(option, REP_ACK, &[])?;
            return Ok(None);
        }
        let Some(client) = self.s.try_clone().ok().and_then(|c| export.add_client(c)) else {
            // The export is going away.
            self.error(
                option,
                REP_ERR_UNKNOWN,
                &format!("export '{name}' not present"),
            )?;
            return Ok(None);
        };
        if let Err(e) = self.reply(option, REP_ACK, &[]) {
            export.remove_client(client);
            return Err(e);
        }
        Ok(Some(self.negotiated(export, &name, client)))
    }

    fn meta(&mut self, option: u32, data: &[u8]) -> Result<()> {
        if !self.structured {
            return self.error(option, REP_ERR_INVALID, "request structured replies first");
        }
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u32()? as usize;
            // Each query takes at least its 4-byte length.
            if n > c.remaining() / 4 {
                return None;
            }
            let mut queries = Vec::with_capacity(n);
            for _ in 0..n {
                queries.push(c.string()?);
            }
            (c.remaining() == 0).then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            return self.error(option, REP_ERR_INVALID, "invalid request length");
        };
        let Some(export) = self.exports.find(&name) else {
            return self.error(
                option,
                REP_ERR_UNKNOWN,
                &format!("export '{name}' not present"),
            );
        };
        let list = option == OPT_LIST_META_CONTEXT;
        let all = all_contexts(&export);
        let mut chosen: Vec<Context> = Vec::new();
        if list && queries.is_empty() {
            chosen = all.clone();
        }
        for q in &queries {
            for ctx in &all {
                let full = context_name(&export, ctx);
                let hit = *q == full
                    || (list
                        && (q == "base:" && *ctx == Context::BaseAllocation
                            || q == "qemu:" && *ctx != Context::BaseAllocation
                            || q == "qemu:dirty-bitmap:"
                                && matches!(ctx, Context::DirtyBitmap(_))));
                if hit && !chosen.contains(ctx) {
                    chosen.push(ctx.clone());
                }
            }
        }
        for (id, ctx) in chosen.iter().enumerate() {
            let mut v = (id as u32).to_be_bytes().to_vec();
            v.extend_from_slice(context_name(&export, ctx).as_bytes());
            self.reply(option, REP_META_CONTEXT, &v)?;
        }
        if !list {
            self.contexts = chosen;
            self.contexts_for = Some(name);
        }
        self.reply(option, REP_ACK, &[])
    }
}

/// Every context the export offers.
fn all_contexts(export: &NbdShared) -> Vec<Context> {
    let mut v = vec![Context::BaseAllocation];
    if export.allocation_depth {
        v.push(Context::AllocationDepth);
    }
    v.extend((0..export.bitmaps.len()).map(Context::DirtyBitmap));
    v
}

/// A context's name on the wire.
pub fn context_name(export: &NbdShared, ctx: &Context) -> String {
    match ctx {
        Context::BaseAllocation => "base:allocation".into(),
        Context::AllocationDepth => "qemu:allocation-depth".into(),
        Context::DirtyBitmap(i) => format!("qemu:dirty-bitmap:{}", export.bitmaps[*i].name()),
    }
}

//! The options of `nbd` (QEMU's `BlockdevOptionsNbd`).

use super::NbdDriver;
use crate::driver::Driver;
use crate::drivers::OpenCtx;
use crate::options::coerce::Fields;
use crate::options::{CommonOptions, DriverOptions, OptionsError, Result};
use serde_json::{json, Map, Value};

/// Where the server listens (QEMU's `SocketAddress`, unix or inet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdServerAddr {
    Unix(String),
    Inet { host: String, port: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdOptions {
    pub server: NbdServerAddr,
    /// `export` (default: the empty name)
    pub export: Option<String>,
    /// `reconnect-delay` in seconds: how long requests wait for a lost connection to
    /// come back before they fail (0: they fail at once).
    pub reconnect_delay: u64,
    /// `open-timeout` in seconds: how long the first connection may be retried.
    pub open_timeout: u64,
    /// `tls-creds`: the id of a `tls-creds-x509` object with a client endpoint.
    pub tls_creds: Option<String>,
    /// `tls-hostname`: the name the server's certificate must carry (default: an
    /// inet server's host; none for a UNIX socket, whose certificate's name is then
    /// not checked, as in QEMU).
    pub tls_hostname: Option<String>,
}

impl NbdOptions {
    fn take_from(f: &mut Fields) -> Result<Self> {
        let server = f.object("server")?;
        let mut server = f.required("server", server)?;
        let kind = server.required_string("type")?;
        let addr = match kind.as_str() {
            "unix" => NbdServerAddr::Unix(server.required_string("path")?),
            "inet" => NbdServerAddr::Inet {
                host: server.required_string("host")?,
                port: server.required_string("port")?,
            },
            _ => {
                return Err(OptionsError::BadValue {
                    name: server.name("type"),
                    reason: format!(
                        "'{kind}' is not supported (vubd connects to unix and inet sockets)"
                    ),
                })
            }
        };
        server.finish()?;
        Ok(NbdOptions {
            server: addr,
            export: f.string("export")?,
            reconnect_delay: f.uint("reconnect-delay")?.unwrap_or(0),
            open_timeout: f.uint("open-timeout")?.unwrap_or(0),
            tls_creds: f.string("tls-creds")?,
            tls_hostname: f.string("tls-hostname")?,
        })
    }
}

impl DriverOptions for NbdOptions {
    fn driver_name(&self) -> &'static str {
        "nbd"
    }

    fn write_json(&self, m: &mut Map<String, Value>) {
        let server = match &self.server {
            NbdServerAddr::Unix(p) => json!({"type": "unix", "path": p}),
            NbdServerAddr::Inet { host, port } => {
                json!({"type": "inet", "host": host, "port": port})
            }
        };
        m.insert("server".into(), server);
        if let Some(e) = &self.export {
            m.insert("export".into(), json!(e));
        }
        m.insert("reconnect-delay".into(), json!(self.reconnect_delay));
        m.insert("open-timeout".into(), json!(self.open_timeout));
        if let Some(t) = &self.tls_creds {
            m.insert("tls-creds".into(), json!(t));
        }
        if let Some(h) = &self.tls_hostname {
            m.insert("tls-hostname".into(), json!(h));
        }
    }

    fn open(&self, ctx: &mut OpenCtx<'_>) -> crate::Result<Box<dyn Driver>> {
        let tls = match &self.tls_creds {
            Some(id) => {
                let hostname = match (&self.tls_hostname, &self.server) {
                    (Some(h), _) => Some(h.as_str()),
                    (None, NbdServerAddr::Inet { host, .. }) => Some(host.as_str()),
                    (None, NbdServerAddr::Unix(_)) => None,
                };
                let creds = ctx
                    .tls_creds()
                    .get(id)
                    .map_err(|e| crate::error::BlockError::Graph(e.to_string()))?;
                Some(
                    creds
                        .client(hostname)
                        .map_err(|e| crate::error::BlockError::Graph(e.to_string()))?,
                )
            }
            None => None,
        };
        Ok(Box::new(NbdDriver::open(
            self.clone(),
            tls,
            ctx.common.read_only,
        )?))
    }
}

pub(super) fn parse(
    f: &mut Fields,
    _common: &CommonOptions,
    _name: &'static str,
) -> Result<Box<dyn DriverOptions>> {
    Ok(Box::new(NbdOptions::take_from(f)?))
}

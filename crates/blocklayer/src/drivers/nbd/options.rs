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
        if let Some(t) = f.string("tls-creds")? {
            return Err(OptionsError::BadValue {
                name: "tls-creds".into(),
                reason: format!("TLS is not supported yet (no credentials '{t}')"),
            });
        }
        Ok(NbdOptions {
            server: addr,
            export: f.string("export")?,
            reconnect_delay: f.uint("reconnect-delay")?.unwrap_or(0),
            open_timeout: f.uint("open-timeout")?.unwrap_or(0),
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
    }

    fn open(&self, ctx: &mut OpenCtx<'_>) -> crate::Result<Box<dyn Driver>> {
        Ok(Box::new(NbdDriver::open(
            self.clone(),
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

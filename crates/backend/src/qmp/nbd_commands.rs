//! `nbd-server-start`'s arguments: QEMU's `SocketAddressLegacy` (`{"type": "unix",
//! "data": {"path": ...}}` or `{"type": "inet", "data": {"host": ..., "port": ...}}`),
//! `max-connections`, `tls-creds` and `tls-authz`.

use super::args::Args;
use super::wire::QmpError;
use crate::config::{NbdAddr, NbdServerConfig};

pub fn server_start(a: &mut Args) -> Result<NbdServerConfig, QmpError> {
    let addr = a.object("addr")?;
    let mut addr = Args::nested(&addr, "addr");
    let kind = addr
        .opt_enum("type", &["inet", "unix", "vsock", "fd"])?
        .ok_or_else(|| QmpError::generic("Parameter 'addr.type' is missing"))?;
    let data = addr.object("data")?;
    addr.finish()?;
    let mut data = Args::nested(&data, "addr.data");
    let addr = match kind {
        "unix" => {
            let path = data.str("path")?;
            data.opt_bool("abstract")?;
            data.opt_bool("tight")?;
            NbdAddr::Unix(path.into())
        }
        "inet" => {
            let host = data.str("host")?;
            let port = data.str("port")?;
            for b in ["numeric", "to", "ipv4", "ipv6", "keep-alive"] {
                data.take(b);
            }
            NbdAddr::Inet { host, port }
        }
        "fd" => NbdAddr::Fd(data.str("str")?),
        other => {
            return Err(QmpError::generic(format!(
                "vubd's NBD server listens on unix and inet sockets, not {other}"
            )))
        }
    };
    data.finish()?;
    let max = a.opt_uint("max-connections")?.unwrap_or(0);
    let max_connections = u32::try_from(max)
        .map_err(|_| QmpError::generic("Parameter 'max-connections' expects uint32_t"))?;
    let tls_creds = a.opt_str("tls-creds")?;
    let tls_authz = a.opt_str("tls-authz")?;
    Ok(NbdServerConfig {
        addr,
        max_connections,
        tls_creds,
        tls_authz,
    })
}

//! The NBD server and its exports on the control thread: `nbd-server-start`,
//! `nbd-server-stop`, `nbd-server-add`, `nbd-server-remove`, and the NBD part of
//! `block-export-add type=nbd` (QEMU 7.2's `blockdev-nbd.c` and `nbd/server.c`
//! checks, with their texts).

use super::{generic, Control, OpResult};
use crate::config::{
    ExportConfig, NbdExportConfig, NbdServerConfig, OnError, DEFAULT_LOGICAL_BLOCK_SIZE,
};
use crate::control::error::ControlError;
use crate::export::nbd::{NbdExportParams, NbdServer};
use blocklayer::named_bitmap::{Check, NamedBitmap};
use blocklayer::Node;
use std::path::PathBuf;
use std::sync::Arc;

/// `nbd-server-add`'s arguments.
pub struct NbdServerAdd {
    pub device: String,
    pub name: Option<String>,
    pub description: Option<String>,
    pub writable: bool,
    pub bitmap: Option<String>,
}

fn not_running() -> ControlError {
    ControlError::generic("NBD server not running")
}

impl Control {
    /// `nbd-server-start`: listens and accepts clients at once.
    pub fn nbd_server_start(&mut self, cfg: &NbdServerConfig) -> OpResult<()> {
        self.nbd_server_listen(cfg)?;
        self.nbd_server_accept();
        Ok(())
    }

    /// Clients of the server [`Control::nbd_server_listen`] started are accepted
    /// from now on.
    pub fn nbd_server_accept(&self) {
        if let Some(s) = &self.nbd_server {
            s.accept_clients();
        }
    }

    /// `--nbd-server`: listens; clients wait in the backlog until
    /// [`Control::nbd_server_accept`] (once the command line's exports exist, as
    /// qemu-storage-daemon serves none before its main loop runs).
    pub fn nbd_server_listen(&mut self, cfg: &NbdServerConfig) -> OpResult<()> {
        if self.nbd_server.is_some() {
            return Err(ControlError::generic("NBD server already running"));
        }
        let tls = match &cfg.tls_creds {
            // Clients would have to pass an authorization vubd cannot check: refused
            // rather than let every client with a certificate of the CA in.
            Some(_) if cfg.tls_authz.is_some() => {
                return Err(ControlError::generic(
                    "'tls-authz' is not supported (vubd has no authz objects)",
                ))
            }
            Some(id) => {
                if !self.graph.tls_creds().contains(id) && self.object_exists(id) {
                    return Err(ControlError::generic(format!(
                        "Object with id '{id}' is not TLS credentials"
                    )));
                }
                let creds = self.graph.tls_creds().get(id).map_err(generic)?;
                Some(creds.server().map_err(generic)?)
            }
            None => None,
        };
        let server = NbdServer::start(cfg, tls).map_err(generic)?;
        self.nbd_server = Some(server);
        Ok(())
    }

    /// `nbd-server-stop`: removes every NBD export (dropping their clients) and
    /// stops listening.
    pub fn nbd_server_stop(&mut self) -> OpResult<()> {
        let Some(server) = self.nbd_server.take() else {
            return Err(not_running());
        };
        let ids: Vec<String> = self
            .exports
            .iter()
            .filter(|(_, e)| e.export.nbd().is_some() && !e.shutting_down)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.del_export(&id, true)?;
        }
        server.stop();
        Ok(())
    }

    /// `nbd-server-add`: an NBD export whose id is its name.
    pub fn nbd_server_add(&mut self, a: NbdServerAdd) -> OpResult<()> {
        if self.nbd_server.is_none() {
            return Err(not_running());
        }
        let name = a.name.unwrap_or_else(|| a.device.clone());
        let cfg = ExportConfig {
            id: name.clone(),
            node_name: a.device,
            writable: a.writable,
            writethrough: false,
            socket_path: PathBuf::new(),
            socket_fd: None,
            num_queues: 1,
            iothreads: Vec::new(),
            fixed_iothread: false,
            logical_block_size: DEFAULT_LOGICAL_BLOCK_SIZE,
            serial: None,
            queue_size: 0,
            write_cache: None,
            rerror: OnError::Report,
            werror: OnError::Report,
            pin_guest_memory: false,
            nbd: Some(NbdExportConfig {
                name: Some(name),
                description: a.description,
                bitmaps: a.bitmap.into_iter().map(|b| (None, b)).collect(),
                allocation_depth: false,
            }),
        };
        self.add_export(&cfg)
    }

    /// `nbd-server-remove`: removes an NBD export (by its export id, which is its
    /// name for exports `nbd-server-add` made, as in QEMU).
    pub fn nbd_server_remove(&mut self, id: &str, hard: bool) -> OpResult<()> {
        if let Some(e) = self.exports.get(id) {
            if e.export.nbd().is_none() {
                return Err(ControlError::generic(format!(
                    "Export '{id}' is not an NBD export"
                )));
            }
        }
        self.del_export(id, hard)
    }

    /// Checks an NBD export's options against the server and the node, and finds
    /// its bitmaps.
    pub(super) fn nbd_export_params(
        &self,
        cfg: &ExportConfig,
        n: &NbdExportConfig,
        node: &Arc<Node>,
    ) -> OpResult<(Arc<NbdServer>, NbdExportParams)> {
        let server = self.nbd_server.clone().ok_or_else(not_running)?;
        let name = n.name.clone().unwrap_or_else(|| cfg.node_name.clone());
        if server.has_export(&name) {
            return Err(ControlError::generic(format!(
                "NBD server already has export named '{name}'"
            )));
        }
        let mut bitmaps = Vec::new();
        for (bnode, bname) in &n.bitmaps {
            let b = match bnode {
                Some(bn) => {
                    let bn = self.graph.lookup(bn).map_err(generic)?;
                    bn.named_bitmap(bname)
                }
                None => find_in_chain(node, bname),
            };
            let b =
                b.ok_or_else(|| ControlError::generic(format!("Bitmap '{bname}' is not found")))?;
            b.check(Check::ALLOW_RO).map_err(generic)?;
            if !cfg.writable && !node.is_read_only() && b.enabled() {
                return Err(ControlError::generic(format!(
                    "Enabled bitmap '{bname}' incompatible with readonly export"
                )));
            }
            bitmaps.push(b);
        }
        Ok((
            server,
            NbdExportParams {
                id: cfg.id.clone(),
                name,
                description: n.description.clone(),
                writable: cfg.writable,
                fixed_iothread: cfg.fixed_iothread,
                allocation_depth: n.allocation_depth,
                bitmaps,
            },
        ))
    }
}

/// A bitmap of `node`, or of the first node below it through filters and backing
/// files that has one of this name (QEMU's search for an export's bitmap).
fn find_in_chain(node: &Arc<Node>, name: &str) -> Option<Arc<NamedBitmap>> {
    let mut n = Some(node.clone());
    while let Some(cur) = n {
        if let Some(b) = cur.named_bitmap(name) {
            return Some(b);
        }
        n = cur.backing().or_else(|| {
            cur.children()
                .into_iter()
                .find(|c| c.role() == blocklayer::edge::Role::Filtered)
                .map(|c| c.node_arc())
        });
    }
    None
}

//! Exports: what serves a node to a client, one [`BlockBackend`] each. The control
//! plane knows an export only through the [`Export`] trait; each kind of export is a
//! folder of its own:
//!
//! - [`vhost_user_blk`]: a virtio-blk device for a QEMU or cloud-hypervisor guest,
//!   over a vhost-user UNIX socket.
//! - [`nbd`]: an NBD export of the daemon's NBD server.

pub mod nbd;
pub mod vhost_user_blk;

use crate::config::ExportConfig;
use crate::iothread::IoThread;
use blocklayer::backend::BlockBackend;
use blocklayer::edge::NodeRef;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("node '{0}' is read-only but the export is writable")]
    ReadOnlyNode(String),
    #[error(transparent)]
    VhostUserBlk(#[from] vhost_user_blk::VhostUserBlkError),
    #[error(transparent)]
    Nbd(#[from] nbd::NbdError),
    #[error("NBD server not running")]
    NbdServerNotRunning,
}

pub type Result<T> = std::result::Result<T, ExportError>;

/// QEMU's `BlockExportInfo` (`query-block-exports`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportInfo {
    pub id: String,
    /// QEMU's `BlockExportType` ([`Export::type_name`]).
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub node_name: String,
    pub shutting_down: bool,
    /// vubd's: the export's I/O status while it has an error policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iostatus: Option<blocklayer::error_policy::IoStatus>,
}

/// `BLOCK_EXPORT_DELETED`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BlockExportDeleted<'a> {
    pub id: &'a str,
}

/// What the control plane needs of an export, whatever its protocol. An export
/// serves from threads of its own; these calls come from the control thread.
pub trait Export: Send + Sync {
    /// The export's id (`block-export-add`'s `id`).
    fn id(&self) -> &str;

    /// The QMP name of the export's type (QEMU's `BlockExportType`).
    fn type_name(&self) -> &'static str;

    /// The export's handle on its node: permissions, error policies and I/O status,
    /// write cache mode, statistics.
    fn blk(&self) -> &BlockBackend;

    /// The export's node now (the root of its backend, which a snapshot or the pivot
    /// of a job may change).
    fn node(&self) -> NodeRef {
        self.blk().node()
    }

    /// The UNIX socket the export listens on, if it has one of its own: no two
    /// exports may use one, and it is removed once the export is gone.
    fn socket_path(&self) -> Option<&Path>;

    /// The export as an NBD export, if it is one.
    fn nbd(&self) -> Option<&nbd::NbdExport> {
        None
    }

    /// The iothreads serving the export.
    fn iothreads(&self) -> Vec<Arc<IoThread>>;

    /// The request counters of the export's queues (`--metrics`), if it keeps them.
    fn queue_samples(&self) -> Option<Vec<crate::metrics::counters::QueueSample>> {
        None
    }

    /// Whether each of [`Export::queue_samples`] is a queue with series of its own
    /// (`vubd_queue_*`), rather than a shard of the export's counters.
    fn queue_series(&self) -> bool {
        true
    }

    /// Whether the export must stay on its iothreads (`fixed-iothread=on`).
    fn fixed_iothread(&self) -> bool;

    /// Moves the export to `thread`, holding its requests meanwhile. `false` (and the
    /// export left where it was) if its requests in flight did not finish within
    /// `timeout`.
    fn move_to_iothread(&self, thread: Arc<IoThread>, timeout: Duration) -> bool;

    /// The node's size changed: tells the client, if the protocol can.
    fn notify_resize(&self);

    /// `cont`: after its backend was stopped by an I/O error, the export retries the
    /// requests it holds and takes new ones again.
    fn cont(&self);

    /// Starts removing the export: no new client and no new request; a client is
    /// dropped once its requests in flight finish. The export's `on_exit` (given when
    /// it was created) runs once it has stopped.
    fn stop(&self);

    /// After [`Export::stop`]: waits (at most `timeout`) until the export has stopped
    /// and its `on_exit` has run; whether it has.
    fn wait_stopped(&self, timeout: Duration) -> bool;

    /// Stops taking requests and waits until those in flight are done (at most
    /// `timeout`), for the daemon's shutdown.
    fn quiesce(&self, timeout: Duration) -> bool;
}

/// Creates the export `cfg` describes on `blk` and starts serving; `on_exit` runs on
/// the export's thread once it has stopped (after [`Export::stop`]). An NBD export
/// (`nbd` given) joins the daemon's NBD server.
pub fn create(
    cfg: &ExportConfig,
    blk: BlockBackend,
    iothreads: Vec<Arc<IoThread>>,
    nbd: Option<(Arc<nbd::NbdServer>, nbd::NbdExportParams)>,
    on_exit: impl FnOnce() + Send + 'static,
) -> Result<Arc<dyn Export>> {
    if cfg.nbd.is_some() {
        let Some((server, params)) = nbd else {
            return Err(ExportError::NbdServerNotRunning);
        };
        let export = nbd::NbdExport::start(params, blk, iothreads, server, on_exit)?;
        return Ok(Arc::new(export));
    }
    let export = vhost_user_blk::VhostUserBlkExport::start(cfg, blk, iothreads, on_exit)?;
    Ok(Arc::new(export))
}

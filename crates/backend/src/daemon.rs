//! Bringing the daemon up from its configuration and taking it down cleanly.

use crate::config::{DaemonConfig, ObjectConfig};
use crate::export::{Export, ExportError, IoThreadSpec};
use blocklayer::aio::poll::PollParams;
use blocklayer::aio::uring::block_on;
use blocklayer::{BlockError, Graph, Node};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("--blockdev node-name={node}: {source}")]
    Blockdev { node: String, source: BlockError },
    #[error("--export id={id}: {source}")]
    Export { id: String, source: ExportError },
    #[error("--export id={id}: {message}")]
    ExportConfig { id: String, message: String },
    #[error("--pidfile {path}: {source}")]
    Pidfile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

pub type Result<T> = std::result::Result<T, DaemonError>;

/// The running daemon: its graph and exports.
pub struct Daemon {
    pub graph: Graph,
    pub exports: Vec<Export>,
    pidfile: Option<PathBuf>,
}

impl Daemon {
    /// Opens every node and binds every socket; nothing is served yet, so a bad
    /// configuration fails before any frontend can connect.
    pub fn start(cfg: &DaemonConfig) -> Result<Daemon> {
        let mut iothreads: HashMap<String, PollParams> = HashMap::new();
        for obj in &cfg.objects {
            match obj {
                ObjectConfig::IoThread(t) => {
                    iothreads.insert(
                        t.id.clone(),
                        PollParams {
                            max_ns: t.poll_max_ns,
                            grow: t.poll_grow,
                            shrink: t.poll_shrink,
                        },
                    );
                }
            }
        }
        let mut graph = Graph::new();
        for b in &cfg.blockdevs {
            graph.add(b).map_err(|source| DaemonError::Blockdev {
                node: b.common.node_name.clone().unwrap_or_default(),
                source,
            })?;
        }
        let mut exports = Vec::new();
        let mut listeners = Vec::new();
        for e in &cfg.exports {
            let node: Arc<Node> =
                graph
                    .lookup(&e.node_name)
                    .map_err(|source| DaemonError::Export {
                        id: e.id.clone(),
                        source: ExportError::Daemon(source.to_string()),
                    })?;
            let specs = if e.iothreads.is_empty() {
                vec![IoThreadSpec {
                    id: format!("{}-iothread", e.id),
                    poll: PollParams::default(),
                }]
            } else {
                e.iothreads
                    .iter()
                    .map(|id| {
                        iothreads
                            .get(id)
                            .map(|p| IoThreadSpec {
                                id: id.clone(),
                                poll: *p,
                            })
                            .ok_or_else(|| DaemonError::ExportConfig {
                                id: e.id.clone(),
                                message: format!("iothread '{id}' does not exist"),
                            })
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            let (export, listener) =
                Export::bind(e, node, specs).map_err(|source| DaemonError::Export {
                    id: e.id.clone(),
                    source,
                })?;
            exports.push(export);
            listeners.push(listener);
        }
        if let Some(p) = &cfg.pidfile {
            std::fs::write(p, format!("{}\n", std::process::id())).map_err(|source| {
                DaemonError::Pidfile {
                    path: p.clone(),
                    source,
                }
            })?;
        }
        for (export, listener) in exports.iter().zip(listeners) {
            export.serve(listener).map_err(DaemonError::Thread)?;
            log::info!(
                "export {} serving node '{}' on {}",
                export.shared.id,
                export.shared.node.name(),
                export.socket_path.display()
            );
        }
        Ok(Daemon {
            graph,
            exports,
            pidfile: cfg.pidfile.clone(),
        })
    }

    /// Drains in-flight requests, flushes every node, removes the sockets.
    pub fn shutdown(self) {
        for e in &self.exports {
            if !e.quiesce(Duration::from_secs(30)) {
                log::error!(
                    "export {}: requests still in flight after 30 s",
                    e.shared.id
                );
            }
        }
        for node in self.graph.nodes() {
            if node.is_read_only() {
                continue;
            }
            let n = node.clone();
            if let Err(e) = block_on(async move { n.flush().await }) {
                log::error!("flushing node '{}' failed: {e}", node.name());
            }
        }
        for e in &self.exports {
            let _ = std::fs::remove_file(&e.socket_path);
        }
        if let Some(p) = &self.pidfile {
            let _ = std::fs::remove_file(p);
        }
    }
}

//! Bringing the daemon up from its configuration and taking it down cleanly.
//!
//! Everything the configuration asks for is set up through the control plane's
//! operations (the same ones QMP commands use) before the control thread starts
//! taking commands; a bad configuration fails before any frontend or QMP client can
//! connect.

use crate::config::{ChardevEndpoint, DaemonConfig};
use crate::control::{Control, ControlMsg};
use crate::metrics::MetricsServer;
use crate::qmp::events::EventBus;
use crate::qmp::server::{self, MonitorSocket, ServerError};
use std::path::PathBuf;
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("--object id={id}: {message}")]
    Object { id: String, message: String },
    #[error("--blockdev node-name={node}: {message}")]
    Blockdev { node: String, message: String },
    #[error("--export id={id}: {message}")]
    Export { id: String, message: String },
    #[error("--nbd-server: {0}")]
    NbdServer(String),
    #[error("--monitor chardev={chardev}: {source}")]
    Monitor {
        chardev: String,
        source: ServerError,
    },
    #[error("--pidfile {path}: {source}")]
    Pidfile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--metrics: {0}")]
    Metrics(crate::metrics::MetricsError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, DaemonError>;

/// The running daemon: a handle on its control thread.
pub struct Daemon {
    control: Sender<ControlMsg>,
    thread: JoinHandle<()>,
    metrics: Option<MetricsServer>,
}

impl Daemon {
    /// Opens every node, binds every socket and starts serving.
    pub fn start(cfg: &DaemonConfig) -> Result<Daemon> {
        let (tx, rx) = mpsc::channel();
        let events = EventBus::new();
        let mut ctl = Control::new(tx.clone(), events.clone());
        // Block-layer events (BLOCK_IMAGE_CORRUPTED) reach the monitor through the
        // control thread, like the exports' BLOCK_IO_ERROR.
        let sink = tx.clone();
        blocklayer::events::set_sink(move |event| {
            let _ = sink.send(ControlMsg::BlockEvent(event));
        });
        for obj in &cfg.objects {
            ctl.add_object(obj.clone())
                .map_err(|e| DaemonError::Object {
                    id: obj.id().to_string(),
                    message: e.desc,
                })?;
        }
        for b in &cfg.blockdevs {
            ctl.add_blockdev(b).map_err(|e| DaemonError::Blockdev {
                node: b.common.node_name.clone().unwrap_or_default(),
                message: e.desc,
            })?;
        }
        let mut monitors = Vec::new();
        let monitor_configs = cfg
            .monitor_sockets()
            .map_err(|e| DaemonError::Config(e.to_string()))?;
        for m in &monitor_configs {
            let monitor_error = |source| DaemonError::Monitor {
                chardev: m.chardev.clone(),
                source,
            };
            let mut socket = match &m.endpoint {
                ChardevEndpoint::Path(path) => {
                    let socket = MonitorSocket::bind(path, m.pretty).map_err(monitor_error)?;
                    ctl.cleanup.push(path.clone());
                    socket
                }
                ChardevEndpoint::Fd(fd) => {
                    MonitorSocket::inherit(fd, m.pretty).map_err(monitor_error)?
                }
                ChardevEndpoint::Stdio
                | ChardevEndpoint::Pipe(_)
                | ChardevEndpoint::FdConnected(_) => continue,
            };
            if m.wait {
                log::info!("waiting for a QMP client on chardev {}", m.chardev);
                socket.accept_first().map_err(monitor_error)?;
            }
            monitors.push(socket);
        }
        if let Some(n) = &cfg.nbd_server {
            ctl.nbd_server_listen(n)
                .map_err(|err| DaemonError::NbdServer(err.desc))?;
        }
        for e in &cfg.exports {
            ctl.add_export(e).map_err(|err| DaemonError::Export {
                id: e.id.clone(),
                message: err.desc,
            })?;
        }
        // Scrapes wait in the control thread's queue until it runs.
        let metrics = match &cfg.metrics {
            Some(m) => Some(MetricsServer::start(m, tx.clone()).map_err(DaemonError::Metrics)?),
            None => None,
        };
        ctl.nbd_server_accept();
        if let Some(p) = &cfg.pidfile {
            std::fs::write(p, format!("{}\n", std::process::id())).map_err(|source| {
                DaemonError::Pidfile {
                    path: p.clone(),
                    source,
                }
            })?;
            ctl.pidfile = Some(p.clone());
        }
        for m in monitors {
            m.serve(tx.clone(), events.clone())
                .map_err(|source| DaemonError::Monitor {
                    chardev: String::new(),
                    source,
                })?;
        }
        for m in &monitor_configs {
            let started = match &m.endpoint {
                ChardevEndpoint::Stdio => server::serve_stdio(m.pretty, tx.clone(), events.clone()),
                ChardevEndpoint::Pipe(path) => {
                    server::serve_pipe(path, m.pretty, tx.clone(), events.clone())
                }
                ChardevEndpoint::FdConnected(fd) => {
                    server::serve_connected(fd, m.pretty, tx.clone(), events.clone())
                }
                ChardevEndpoint::Path(_) | ChardevEndpoint::Fd(_) => continue,
            };
            started.map_err(|source| DaemonError::Monitor {
                chardev: m.chardev.clone(),
                source,
            })?;
        }
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || ctl.run(rx))
            .map_err(DaemonError::Thread)?;
        Ok(Daemon {
            control: tx,
            thread,
            metrics,
        })
    }

    /// Drains in-flight requests, flushes every node, removes the sockets.
    pub fn shutdown(self) {
        if let Some(m) = &self.metrics {
            m.stop();
        }
        let (done_tx, done_rx) = mpsc::channel();
        if self.control.send(ControlMsg::Shutdown(done_tx)).is_ok() {
            let _ = done_rx.recv();
        }
        let _ = self.thread.join();
    }
}

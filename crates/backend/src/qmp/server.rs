//! The monitor sockets: accepting QMP clients, the greeting and capabilities
//! negotiation, and handing commands to the control thread.
//!
//! Each client has a thread of its own that reads and parses its input; commands are
//! executed one at a time by the control thread (like QEMU's main loop), so a slow
//! or vanished client never holds up another one.

use super::events::{ClientWriter, EventBus};
use super::wire::{self, Command, ErrorClass, QmpError, QmpResult};
use crate::control::ControlMsg;
use serde_json::{json, Value};
use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on monitor socket '{path}': {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("monitor socket '{0}' is in use by another process")]
    InUse(PathBuf),
    #[error("cannot start a monitor thread: {0}")]
    Thread(std::io::Error),
}

/// A bound monitor socket.
pub struct MonitorSocket {
    listener: UnixListener,
    pub path: PathBuf,
    pretty: bool,
    /// A client accepted before serving began (`wait=on`).
    first: Option<UnixStream>,
}

impl MonitorSocket {
    /// Binds `path` (a stale socket file left by a dead process is replaced).
    pub fn bind(path: &Path, pretty: bool) -> Result<MonitorSocket, ServerError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|source| ServerError::Listen {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(MonitorSocket {
            listener,
            path: path.to_path_buf(),
            pretty,
            first: None,
        })
    }

    /// Waits for the first client (`wait=on`); it is greeted once serving begins.
    pub fn accept_first(&mut self) -> Result<(), ServerError> {
        let (stream, _) = self
            .listener
            .accept()
            .map_err(|source| ServerError::Listen {
                path: self.path.clone(),
                source,
            })?;
        self.first = Some(stream);
        Ok(())
    }

    /// Accepts clients on a thread of its own, for the life of the process.
    pub fn serve(
        self,
        control: Sender<ControlMsg>,
        events: Arc<EventBus>,
    ) -> Result<(), ServerError> {
        std::thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || {
                let first = self.first.map(Ok);
                for stream in first.into_iter().chain(self.listener.incoming()) {
                    match stream {
                        Ok(stream) => {
                            let control = control.clone();
                            let events = events.clone();
                            let pretty = self.pretty;
                            let spawned = std::thread::Builder::new()
                                .name("qmp-client".into())
                                .spawn(move || {
                                    if let Err(e) = Client::run(stream, pretty, control, events) {
                                        log::debug!("QMP client ended: {e}");
                                    }
                                });
                            if let Err(e) = spawned {
                                log::error!("cannot start a QMP client thread: {e}");
                            }
                        }
                        Err(e) => {
                            log::error!("monitor accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .map_err(ServerError::Thread)?;
        Ok(())
    }
}

/// The commands a client may use with `exec-oob` (none of vubd's commands).
fn allows_oob(_name: &str) -> bool {
    false
}

/// One client connection.
struct Client {
    writer: Arc<ClientWriter>,
    control: Sender<ControlMsg>,
    events: Arc<EventBus>,
    negotiated: bool,
    oob: bool,
    subscription: Option<u64>,
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(id) = self.subscription.take() {
            self.events.unsubscribe(id);
        }
    }
}

impl Client {
    fn run(
        mut stream: UnixStream,
        pretty: bool,
        control: Sender<ControlMsg>,
        events: Arc<EventBus>,
    ) -> std::io::Result<()> {
        // A client that stops reading must not block replies and events for long.
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let writer = Arc::new(ClientWriter::new(stream.try_clone()?, pretty));
        let mut client = Client {
            writer,
            control,
            events,
            negotiated: false,
            oob: false,
            subscription: None,
        };
        client.writer.send(&wire::greeting())?;
        let mut splitter = wire::Splitter::default();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            for input in splitter.feed(&buf[..n]) {
                let (reply, id, quit) = client.handle(input);
                if let Some(reply) = reply {
                    client.writer.send(&wire::response(&reply, id.as_ref()))?;
                }
                if quit {
                    // The reply is out: now let the main thread shut the daemon down.
                    // SAFETY: kill with our own pid and a valid signal number.
                    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                }
            }
        }
    }

    /// Handles one input value: the reply (if any), its `id`, and whether the daemon
    /// should now quit.
    fn handle(
        &mut self,
        input: Result<Value, QmpError>,
    ) -> (Option<QmpResult>, Option<Value>, bool) {
        let cmd = match input.map_err(|e| (e, None)).and_then(wire::parse_command) {
            Ok(cmd) => cmd,
            Err((e, id)) => return (Some(Err(e)), id, false),
        };
        let id = cmd.id.clone();
        if cmd.oob && !(self.oob && allows_oob(&cmd.name)) {
            let e = if self.oob {
                QmpError::generic(format!("The command {} does not support OOB", cmd.name))
            } else {
                QmpError::generic("QMP input member 'exec-oob' is unexpected")
            };
            return (Some(Err(e)), id, false);
        }
        if cmd.name == "qmp_capabilities" {
            return (Some(self.capabilities(&cmd)), id, false);
        }
        if !self.negotiated {
            let e = QmpError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
            return (Some(Err(e)), id, false);
        }
        let quit = cmd.name == "quit";
        let result = self.execute(cmd);
        let quit = quit && result.is_ok();
        (Some(result), id, quit)
    }

    fn capabilities(&mut self, cmd: &Command) -> QmpResult {
        if self.negotiated {
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        let mut args = super::args::Args::new(&cmd.arguments);
        let enable = args.opt_str_list("enable")?.unwrap_or_default();
        args.finish()?;
        let mut oob = false;
        for (i, cap) in enable.iter().enumerate() {
            match cap.as_str() {
                "oob" => oob = true,
                other => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'enable[{i}]' does not accept value '{other}'"
                    )))
                }
            }
        }
        self.oob = oob;
        self.negotiated = true;
        self.subscription = Some(self.events.subscribe(self.writer.clone()));
        Ok(json!({}))
    }

    /// Runs a command on the control thread and waits for its result.
    fn execute(&self, cmd: Command) -> QmpResult {
        let (tx, rx) = mpsc::channel();
        let gone = || QmpError::generic("the daemon is shutting down");
        self.control
            .send(ControlMsg::Execute {
                name: cmd.name,
                arguments: cmd.arguments,
                reply: tx,
            })
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

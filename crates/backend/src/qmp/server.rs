//! The monitor sockets: accepting QMP clients, the greeting and capabilities
//! negotiation, and handing commands to the control thread.
//!
//! Each client has two threads of its own: a reader that splits and checks its input
//! and waits for each command's result, and a writer that sends its output queue
//! ([`Outbox`]). Commands are executed one at a time by the control thread (like
//! QEMU's main loop). Nothing a client does or fails to do (sending huge, deep or
//! broken input, never reading) makes anyone else wait, and what it can make the
//! daemon hold is bounded: its input by the splitter's limits, its output by the
//! outbox's, and the number of clients by [`MAX_CLIENTS`].

use super::events::EventBus;
use super::outbox::{Outbox, WRITE_STALL};
use super::splitter::Splitter;
use super::wire::{self, Command, ErrorClass, QmpError, QmpResult};
use crate::control::ControlMsg;
use serde_json::{json, Value};
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Clients one monitor socket serves at once. Further ones wait in the socket's
/// listen backlog until a client leaves, as all but one do with QEMU's monitor.
pub const MAX_CLIENTS: usize = 64;

/// Bytes read from a client's socket at a time.
const READ_CHUNK: usize = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Fd(#[from] crate::listen_fd::FdError),
    #[error("Could not open '{}': {message}", path.display())]
    Open { path: PathBuf, message: String },
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

/// The client slots of one monitor socket.
#[derive(Default)]
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}

/// A client slot, given back when dropped (once both of the client's threads have
/// ended).
struct Slot(Arc<Slots>);

impl Slots {
    /// Waits for a free slot.
    fn acquire(self: &Arc<Self>) -> Slot {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if *used >= MAX_CLIENTS {
            log::warn!("QMP: {MAX_CLIENTS} clients connected; the next waits for one to leave");
        }
        while *used >= MAX_CLIENTS {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += 1;
        Slot(self.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *self.0.used.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.0.freed.notify_one();
    }
}

/// A bound monitor socket.
pub struct MonitorSocket {
    listener: UnixListener,
    /// The socket's path, if vubd bound it (not an inherited socket).
    pub path: Option<PathBuf>,
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
            path: Some(path.to_path_buf()),
            pretty,
            first: None,
        })
    }

    /// An inherited listening socket, by number or systemd name (`fd=`).
    pub fn inherit(fd: &str, pretty: bool) -> Result<MonitorSocket, ServerError> {
        let listener = crate::listen_fd::take_unix_listener(fd)?;
        // The accept loop blocks; systemd may pass a non-blocking socket.
        listener
            .set_nonblocking(false)
            .map_err(|source| ServerError::Listen {
                path: PathBuf::from(format!("fd {fd}")),
                source,
            })?;
        Ok(MonitorSocket {
            listener,
            path: None,
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
                path: self.path.clone().unwrap_or_default(),
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
                let slots = Arc::new(Slots::default());
                let mut first = self.first;
                loop {
                    let slot = slots.acquire();
                    let accepted = match first.take() {
                        Some(stream) => Ok(stream),
                        None => self.listener.accept().map(|(stream, _)| stream),
                    };
                    let stream = match accepted {
                        Ok(stream) => stream,
                        Err(e) => {
                            log::error!("monitor accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    };
                    let started = Client::start(
                        Peer::Socket(stream),
                        self.pretty,
                        control.clone(),
                        events.clone(),
                        slot,
                    );
                    if let Err(e) = started {
                        log::error!("cannot start a QMP client: {e}");
                    }
                }
            })
            .map_err(ServerError::Thread)?;
        Ok(())
    }
}

/// One QMP session on standard input and output (`--chardev stdio`). It ends at the
/// end of input; the daemon goes on (as qemu-storage-daemon).
pub fn serve_stdio(
    pretty: bool,
    control: Sender<ControlMsg>,
    events: Arc<EventBus>,
) -> Result<(), ServerError> {
    let input = dup_stdio(libc::STDIN_FILENO)?;
    let output = dup_stdio(libc::STDOUT_FILENO)?;
    serve_pipe_session(input, output, pretty, control, events)
}

/// One QMP session on a pipe (`--chardev pipe,path=P`): reads `P.in` and writes
/// `P.out`, or reads and writes `P` if either of those cannot be opened (QEMU's
/// rule, and its open modes: the input read-write, so that opening a FIFO does not
/// wait for a writer).
pub fn serve_pipe(
    path: &Path,
    pretty: bool,
    control: Sender<ControlMsg>,
    events: Arc<EventBus>,
) -> Result<(), ServerError> {
    let with_suffix = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    let rw = || std::fs::OpenOptions::new().read(true).write(true).clone();
    let pair = rw().open(with_suffix(".in")).and_then(|input| {
        let output = std::fs::OpenOptions::new()
            .write(true)
            .open(with_suffix(".out"))?;
        Ok((input, output))
    });
    let (input, output) = match pair {
        Ok(pair) => pair,
        Err(_) => {
            let both = rw().open(path).map_err(|e| ServerError::Open {
                path: path.to_path_buf(),
                message: blocklayer::error::io_error_text(&e),
            })?;
            let output = both.try_clone().map_err(ServerError::Thread)?;
            (both, output)
        }
    };
    serve_pipe_session(input, output, pretty, control, events)
}

/// One QMP session on an inherited connected socket (`--chardev socket,fd=S`
/// without `server=on`). It ends when the peer closes; the daemon goes on.
pub fn serve_connected(
    fd: &str,
    pretty: bool,
    control: Sender<ControlMsg>,
    events: Arc<EventBus>,
) -> Result<(), ServerError> {
    let stream = crate::listen_fd::take_unix_stream(fd)?;
    serve_session(Peer::Socket(stream), pretty, control, events)
}

fn serve_pipe_session(
    input: File,
    output: File,
    pretty: bool,
    control: Sender<ControlMsg>,
    events: Arc<EventBus>,
) -> Result<(), ServerError> {
    serve_session(Peer::Pipe { input, output }, pretty, control, events)
}

/// A monitor of one session (no socket to accept clients on).
fn serve_session(
    peer: Peer,
    pretty: bool,
    control: Sender<ControlMsg>,
    events: Arc<EventBus>,
) -> Result<(), ServerError> {
    let slot = Arc::new(Slots::default()).acquire();
    Client::start(peer, pretty, control, events, slot).map_err(ServerError::Thread)
}

/// A descriptor of our own on standard input or output (the session closes it, not
/// fd 0 or 1, which a later open() would otherwise reuse).
fn dup_stdio(fd: RawFd) -> Result<File, ServerError> {
    // SAFETY: F_DUPFD_CLOEXEC on a standard descriptor returns a new descriptor or -1.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(ServerError::Open {
            path: PathBuf::from(if fd == 0 { "stdin" } else { "stdout" }),
            message: blocklayer::error::io_error_text(&std::io::Error::last_os_error()),
        });
    }
    // SAFETY: `dup` is a fresh descriptor owned by nobody else.
    Ok(unsafe { File::from_raw_fd(dup) })
}

/// A client's two ends.
enum Peer {
    Socket(UnixStream),
    Pipe { input: File, output: File },
}

/// The commands a client may use with `exec-oob` (none of vubd's commands).
fn allows_oob(_name: &str) -> bool {
    false
}

/// What the reader does once a reply is queued.
enum Then {
    Nothing,
    /// Negotiation is complete: events follow from now on (after its reply).
    Subscribe,
    /// `quit` succeeded: the daemon shuts down once the reply is out.
    Quit,
}

/// One client connection, as its reader thread sees it.
struct Client {
    outbox: Arc<Outbox>,
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
        // The writer sends what is queued (a client that has closed only its
        // sending side still gets its replies), then ends.
        self.outbox.finish();
    }
}

impl Client {
    /// Starts the client's writer and reader threads; each holds the slot.
    fn start(
        peer: Peer,
        pretty: bool,
        control: Sender<ControlMsg>,
        events: Arc<EventBus>,
        slot: Slot,
    ) -> std::io::Result<()> {
        let slot = Arc::new(slot);
        type Writer = Box<dyn FnOnce(&Outbox) + Send>;
        let (outbox, stream, writer): (Arc<Outbox>, Box<dyn Read + Send>, Writer) = match peer {
            Peer::Socket(stream) => {
                let outbox = Outbox::new(stream.try_clone()?, pretty);
                let writer_stream = stream.try_clone()?;
                let writer = Box::new(move |ob: &Outbox| ob.run_writer(writer_stream));
                (outbox, Box::new(stream), writer)
            }
            Peer::Pipe { input, output } => {
                let writer = Box::new(move |ob: &Outbox| ob.run_pipe_writer(output));
                (Outbox::for_pipe(pretty), Box::new(input), writer)
            }
        };
        let (ob, writer_slot) = (outbox.clone(), slot.clone());
        std::thread::Builder::new()
            .name("qmp-writer".into())
            .spawn(move || {
                writer(&ob);
                drop(writer_slot);
            })?;
        let ob = outbox.clone();
        let spawned = std::thread::Builder::new()
            .name("qmp-client".into())
            .spawn(move || {
                let _slot = slot;
                let mut client = Client {
                    outbox,
                    control,
                    events,
                    negotiated: false,
                    oob: false,
                    subscription: None,
                };
                if let Err(e) = client.run(stream) {
                    log::debug!("QMP client ended: {e}");
                }
            });
        if let Err(e) = spawned {
            ob.close();
            return Err(e);
        }
        Ok(())
    }

    fn run(&mut self, mut stream: impl Read) -> std::io::Result<()> {
        self.outbox.reply(&wire::greeting());
        let mut splitter = Splitter::default();
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut input = &buf[..n];
            while let Some(text) = splitter.next(&mut input) {
                // A client that leaves its replies unread gets no further command
                // run until it reads (or is disconnected).
                if !self.outbox.wait_room() {
                    return Ok(());
                }
                let (reply, id, then) = self.handle(text);
                if !self.outbox.reply(&wire::response(&reply, id.as_ref())) {
                    return Ok(());
                }
                match then {
                    Then::Nothing => {}
                    Then::Subscribe => {
                        self.subscription = Some(self.events.subscribe(self.outbox.clone()));
                    }
                    Then::Quit => {
                        // The reply goes out before the daemon shuts down.
                        self.outbox.wait_written(WRITE_STALL);
                        // SAFETY: kill with our own pid and a valid signal number.
                        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                    }
                }
            }
        }
    }

    /// Handles one input value: the reply, its `id`, and what follows the reply.
    fn handle(&mut self, input: Result<Value, QmpError>) -> (QmpResult, Option<Value>, Then) {
        let cmd = match input.map_err(|e| (e, None)).and_then(wire::parse_command) {
            Ok(cmd) => cmd,
            Err((e, id)) => return (Err(e), id, Then::Nothing),
        };
        let id = cmd.id.clone();
        if cmd.oob && !(self.oob && allows_oob(&cmd.name)) {
            let e = if self.oob {
                QmpError::generic(format!("The command {} does not support OOB", cmd.name))
            } else {
                QmpError::generic("QMP input member 'exec-oob' is unexpected")
            };
            return (Err(e), id, Then::Nothing);
        }
        if cmd.name == "qmp_capabilities" {
            let result = self.capabilities(&cmd);
            let then = if result.is_ok() {
                Then::Subscribe
            } else {
                Then::Nothing
            };
            return (result, id, then);
        }
        if !self.negotiated {
            let e = QmpError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
            return (Err(e), id, Then::Nothing);
        }
        let quit = cmd.name == "quit";
        let result = self.execute(cmd);
        let then = if quit && result.is_ok() {
            Then::Quit
        } else {
            Then::Nothing
        };
        (result, id, then)
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

//! Real QEMU guests on vubd: boots `qemu-system-x86_64` (TCG) with a tiny Linux built by
//! `scripts/build-guest.sh` (kernel + busybox initramfs with fio, blkdiscard, fstrim,
//! mkfs.ext4), attached to vhost-user-blk sockets, runs shell commands in it over the
//! serial console, and live-migrates it to a second QEMU.
//!
//! Console protocol (the guest side is the `/init` written by `build-guest.sh`):
//! * the guest prints `@@VUBD-READY@@` once its modules are loaded and echo is off;
//! * the host sends one line per command: `<id> <base64 of the script>`; base64 keeps
//!   quoting, control characters and the line discipline out of the way, and with echo
//!   off the markers below never appear in what the host sends;
//! * the guest answers `@@VUBD-BEGIN-<id>@@`, the script's stdout and stderr (a pipe,
//!   not a tty: no progress output), then `\n@@VUBD-END-<id>-<exit status>@@`. Kernel
//!   messages reach the console only at KERN_EMERG; [`Guest::dmesg`] reads the rest.
//!
//! The serial console is QEMU's stdio by default. With [`GuestOpts::console_socket`] it
//! is a UNIX socket chardev instead (`server=on,wait=on`: QEMU starts the guest only
//! once the harness is connected, so no output is lost). Every QEMU also has a QMP
//! monitor on a UNIX socket ([`Guest::qmp`]).
//!
//! [`Guest::boot_external`] runs the same guest on a QEMU that something else starts
//! (libvirt: [`crate::libvirt`]): the harness listens on the console socket, QEMU's
//! serial port connects to it, and the same console protocol drives the guest.
//!
//! Migration ([`Guest::start_migration`], [`Guest::finish_migration`]) needs the socket
//! console. A destination QEMU is started with the same machine and devices, its
//! vhost-user disks on other sockets, and `-incoming unix:<path>`; the harness connects
//! to its console at once and feeds what it prints into the same console buffer, so a
//! command whose answer straddles the switch-over reads as one answer. Once the
//! migration has completed and the destination runs, commands go to the destination,
//! the source QEMU quits and the destination is the guest from then on.
//!
//! The whole console output, with the commands sent and the harness's notes, goes to a
//! transcript file. It is kept, and its path and tail printed, when a test fails
//! (panics) with a guest alive.
//!
//! [`fio`] runs verified fio rounds in the background; [`jobs_rig`] sets up what the
//! guest job tests share; [`relay`] sits between QEMU and
//! a vhost-user backend and hides features from either side (tests that show what a
//! feature changes).

pub mod fio;
pub mod jobs_rig;
pub mod relay;

use crate::qmp::Qmp;
use serde_json::{json, Value};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Time for the guest to reach its command loop. About 5-15 s under TCG here; CI
/// machines are slower.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Time for QEMU to exit after `poweroff -f`.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// A default for quick commands (cat, ls, small dd).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for a destination QEMU to come up (its QMP answering) and for the source to
/// quit after a migration.
pub const QEMU_START_TIMEOUT: Duration = Duration::from_secs(30);

const READY: &str = "@@VUBD-READY@@";
const INSMOD_FAILED: &str = "@@VUBD-INSMOD-FAILED";
/// The kernel's line discipline takes at most 4095 characters per line.
const MAX_LINE: usize = 4000;

/// One vhost-user-blk disk: `-chardev socket,path=<socket>[,reconnect=<s>] -device
/// vhost-user-blk-pci,num-queues=<num_queues><extra>`. Disks appear in the guest in the
/// order given (vda, vdb, ...).
#[derive(Debug, Clone)]
pub struct GuestDisk {
    pub socket: PathBuf,
    pub num_queues: usize,
    /// Appended to the `-device` option (starts with a comma when non-empty).
    pub extra: String,
    /// `reconnect=<seconds>` on the chardev: QEMU connects again by itself after the
    /// backend went away (a daemon killed and restarted), instead of dropping the disk.
    pub reconnect: Option<u32>,
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleKind {
    /// QEMU's stdin and stdout (`-serial stdio`).
    Stdio,
    /// A UNIX socket chardev the harness connects to; a migration can move it.
    Socket,
}

#[derive(Debug, Clone)]
pub struct GuestOpts {
    /// Names the transcript directory (e.g. the test name).
    pub name: String,
    /// vCPUs. Linux uses at most one virtqueue per vCPU: `cpus >= num_queues` to see them all.
    pub cpus: usize,
    pub mem_mib: u64,
    pub disks: Vec<GuestDisk>,
    pub boot_timeout: Duration,
    /// Appended to the kernel command line.
    pub append: String,
    pub console: ConsoleKind,
    /// All vCPUs on one host thread (`-accel tcg,thread=single`): QEMU 7.2's
    /// multi-threaded TCG loses guest pages in live migration now and then, whichever
    /// backend logs (the destination guest dies in its page or slab allocator; 2 of 6
    /// runs with qemu-storage-daemon as the backend; docs/operations.md).
    pub single_thread_tcg: bool,
}

impl GuestOpts {
    pub fn new(name: &str) -> GuestOpts {
        GuestOpts {
            name: name.to_string(),
            cpus: 1,
            mem_mib: 512,
            disks: Vec::new(),
            boot_timeout: BOOT_TIMEOUT,
            append: String::new(),
            console: ConsoleKind::Stdio,
            single_thread_tcg: false,
        }
    }

    /// Runs the vCPUs on one host thread (see [`GuestOpts::single_thread_tcg`]).
    pub fn single_thread_tcg(mut self) -> GuestOpts {
        self.single_thread_tcg = true;
        self
    }

    /// Add a vhost-user-blk disk on `socket` with `num_queues` queues.
    pub fn disk(mut self, socket: &Path, num_queues: usize) -> GuestOpts {
        self.disks.push(GuestDisk {
            socket: socket.to_path_buf(),
            num_queues,
            extra: String::new(),
            reconnect: None,
        });
        self
    }

    /// Add a disk whose chardev reconnects every second while the backend is away
    /// (`reconnect=1`), as a daemon restart needs.
    pub fn reconnecting_disk(mut self, socket: &Path, num_queues: usize) -> GuestOpts {
        self.disks.push(GuestDisk {
            socket: socket.to_path_buf(),
            num_queues,
            extra: String::new(),
            reconnect: Some(1),
        });
        self
    }

    pub fn cpus(mut self, n: usize) -> GuestOpts {
        self.cpus = n;
        self
    }

    pub fn mem_mib(mut self, mib: u64) -> GuestOpts {
        self.mem_mib = mib;
        self
    }

    /// The serial console on a UNIX socket (required by [`Guest::start_migration`]).
    pub fn console_socket(mut self) -> GuestOpts {
        self.console = ConsoleKind::Socket;
        self
    }
}

/// `$QEMU_BIN`, else `qemu-system-x86_64` from `PATH`.
pub fn qemu_bin() -> PathBuf {
    std::env::var_os("QEMU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// The guest's kernel and initramfs.
#[derive(Debug, Clone)]
pub struct GuestImages {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// `$VUBD_GUEST_DIR` if set (used as is), else `<target>/guest`, built (or found up to
/// date) by `scripts/build-guest.sh` once per process.
pub fn guest_images() -> GuestImages {
    static IMAGES: OnceLock<Result<GuestImages, String>> = OnceLock::new();
    IMAGES
        .get_or_init(build_images)
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn build_images() -> Result<GuestImages, String> {
    let in_dir = |d: &Path| GuestImages {
        kernel: d.join("vmlinuz"),
        initrd: d.join("initramfs.gz"),
    };
    if let Some(d) = std::env::var_os("VUBD_GUEST_DIR") {
        let imgs = in_dir(Path::new(&d));
        if !imgs.kernel.is_file() || !imgs.initrd.is_file() {
            return Err(format!(
                "VUBD_GUEST_DIR={}: no vmlinuz and initramfs.gz there \
                 (scripts/build-guest.sh <dir> makes them)",
                Path::new(&d).display()
            ));
        }
        return Ok(imgs);
    }
    let out = target_dir()?.join("guest");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-guest.sh");
    let t0 = Instant::now();
    let res = Command::new("bash")
        .arg(&script)
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !res.status.success() {
        return Err(format!(
            "{} {} failed ({}); run scripts/setup.sh to install the guest's packages\n{}{}",
            script.display(),
            out.display(),
            res.status,
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        ));
    }
    eprintln!(
        "guest images in {} ({:.1} s)",
        out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(in_dir(&out))
}

/// The Cargo target directory of the running test binary
/// (`<target>/<profile>/deps/<test binary>`): a place for what outlives a test run.
pub fn target_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name() == Some(std::ffi::OsStr::new("deps")) {
        dir.pop();
    }
    dir.pop();
    Ok(dir)
}

/// How many guests may run at once in this process: `$VUBD_GUEST_JOBS`, else one per two
/// host CPUs. TCG guests are CPU-bound: more would only make every test's timing worse.
fn max_guests() -> usize {
    if let Some(n) = std::env::var("VUBD_GUEST_JOBS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    {
        return n.max(1);
    }
    std::thread::available_parallelism()
        .map(|n| (n.get() / 2).max(1))
        .unwrap_or(1)
}

static SLOTS: Mutex<usize> = Mutex::new(0);
static SLOT_FREED: Condvar = Condvar::new();

struct Slot;

impl Slot {
    fn acquire() -> Slot {
        let max = max_guests();
        let mut n = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= max {
            n = SLOT_FREED.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut n = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        SLOT_FREED.notify_one();
    }
}

/// Console output not yet consumed by a command, shared with the reader threads.
#[derive(Default)]
struct Console {
    buf: Vec<u8>,
    /// The active QEMU's console reached end of file (QEMU exited).
    eof: bool,
    /// The reader whose end of file counts: the QEMU that runs the guest. A source QEMU
    /// closing its console after a migration is not the guest going away.
    active: u64,
}

struct Shared {
    console: Mutex<Console>,
    changed: Condvar,
    transcript: Mutex<File>,
    started: Instant,
}

impl Shared {
    fn note(&self, what: &str) {
        let mut t = self.transcript.lock().unwrap_or_else(|e| e.into_inner());
        let _ = write!(
            t,
            "\n#### [{:7.2}s host] {}\n",
            self.started.elapsed().as_secs_f64(),
            what.replace('\n', "\n#### ")
        );
        let _ = t.flush();
    }
}

/// Copies one QEMU's console output into the transcript and the console buffer.
fn spawn_reader(
    shared: Arc<Shared>,
    id: u64,
    mut src: impl Read + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            let n = match src.read(&mut chunk) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            {
                let mut t = shared.transcript.lock().unwrap_or_else(|e| e.into_inner());
                let _ = t.write_all(&chunk[..n]);
                let _ = t.flush();
            }
            let mut c = shared.console.lock().unwrap_or_else(|e| e.into_inner());
            if n == 0 {
                if c.active == id {
                    c.eof = true;
                }
                shared.changed.notify_all();
                return;
            }
            c.buf.extend_from_slice(&chunk[..n]);
            shared.changed.notify_all();
        }
    })
}

/// A new directory for a guest, its console transcript and the state the console
/// readers share.
fn guest_dir(opts: &GuestOpts) -> (PathBuf, PathBuf, Arc<Shared>) {
    let dir = std::env::temp_dir().join(crate::unique_name(&format!(
        "vubd-guest-{}",
        opts.name.replace(['/', ' ', ':'], "_")
    )));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let transcript = dir.join("console.log");
    let log = File::create(&transcript)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", transcript.display()));
    let shared = Arc::new(Shared {
        console: Mutex::new(Console::default()),
        changed: Condvar::new(),
        transcript: Mutex::new(log),
        started: Instant::now(),
    });
    (dir, transcript, shared)
}

/// Files of one QEMU process, in the guest's directory.
struct QemuFiles {
    stderr: PathBuf,
    qmp: PathBuf,
    /// The console socket (socket consoles only).
    serial: PathBuf,
}

impl QemuFiles {
    fn new(dir: &Path, role: &str) -> QemuFiles {
        QemuFiles {
            stderr: dir.join(format!("{role}.stderr")),
            qmp: dir.join(format!("{role}-qmp.sock")),
            serial: dir.join(format!("{role}-serial.sock")),
        }
    }
}

/// The guest kernel's command line: the console on the first serial port, the options
/// below, and `opts.append`.
pub fn kernel_cmdline(opts: &GuestOpts) -> String {
    // no_timer_check: under TCG on a loaded host the kernel's early IO-APIC timer check
    // can time out and panic ("IO-APIC + timer doesn't work!"), as seen in CI; virtual
    // machines commonly skip it.
    format!(
        "console=ttyS0 quiet panic=-1 no_timer_check {}",
        opts.append
    )
    .trim_end()
    .to_string()
}

/// The command line of a QEMU running the guest described by `opts`, with `disks` (the
/// guest's disks, possibly on other sockets) and, for a migration destination,
/// `-incoming unix:<incoming>`.
fn qemu_args(
    opts: &GuestOpts,
    images: &GuestImages,
    disks: &[GuestDisk],
    files: &QemuFiles,
    incoming: Option<&Path>,
) -> Vec<String> {
    let mem = format!("{}M", opts.mem_mib);
    let mut args: Vec<String> = vec![
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-accel".into(),
        if opts.single_thread_tcg {
            "tcg,thread=single".into()
        } else {
            "tcg".into()
        },
        "-smp".into(),
        opts.cpus.to_string(),
        "-m".into(),
        mem.clone(),
        // vhost-user: the backend maps guest memory, so it must be shared.
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        "-numa".into(),
        "node,memdev=mem".into(),
        "-kernel".into(),
        images.kernel.display().to_string(),
        "-initrd".into(),
        images.initrd.display().to_string(),
        "-append".into(),
        kernel_cmdline(opts),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-chardev".into(),
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            files.qmp.display()
        ),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
    ];
    match opts.console {
        ConsoleKind::Stdio => {
            args.push("-serial".into());
            args.push("stdio".into());
        }
        ConsoleKind::Socket => {
            args.push("-chardev".into());
            args.push(format!(
                "socket,id=ser0,path={},server=on,wait=on",
                files.serial.display()
            ));
            args.push("-serial".into());
            args.push("chardev:ser0".into());
        }
    }
    for (i, d) in disks.iter().enumerate() {
        let reconnect = d
            .reconnect
            .map(|s| format!(",reconnect={s}"))
            .unwrap_or_default();
        args.push("-chardev".into());
        args.push(format!(
            "socket,id=vub{i},path={}{reconnect}",
            d.socket.display()
        ));
        args.push("-device".into());
        args.push(format!(
            "vhost-user-blk-pci,id=vblk{i},chardev=vub{i},num-queues={}{}",
            d.num_queues, d.extra
        ));
    }
    if let Some(p) = incoming {
        args.push("-incoming".into());
        args.push(format!("unix:{}", p.display()));
    }
    args
}

/// A QEMU that something other than the harness started and owns (libvirt, through
/// [`Guest::boot_external`]): how the harness watches and stops it.
pub trait ExternalQemu: Send {
    /// QEMU's process id.
    fn pid(&self) -> u32;
    /// `None` while QEMU runs; once it has exited, how. QEMU is not the harness's child,
    /// so the status is what its owner reports (see the implementation).
    fn try_wait(&mut self) -> Option<ExitStatus>;
    /// Stops QEMU now (libvirt: `virsh destroy`).
    fn kill(&mut self);
    /// One line for the transcript and failure messages: what runs QEMU.
    fn describe(&self) -> String;
    /// The file with QEMU's command line and stderr (libvirt's domain log).
    fn log(&self) -> PathBuf;
}

/// What [`Guest::boot_external`] gives the code that starts QEMU.
pub struct ExternalStart<'a> {
    pub opts: &'a GuestOpts,
    pub images: &'a GuestImages,
    /// The kernel command line (the same as the harness's own QEMUs get).
    pub cmdline: String,
    /// The UNIX socket the harness listens on: QEMU's first serial port (the guest's
    /// console) must connect to it as a client.
    pub console: &'a Path,
    /// The guest's directory (the transcript is there; kept when a test fails).
    pub dir: &'a Path,
}

/// How the harness holds a QEMU process.
enum Process {
    /// Started by the harness: its child.
    Child(Child),
    /// Started by something else.
    External(Box<dyn ExternalQemu>),
}

/// One QEMU process.
struct Qemu {
    process: Process,
    exited: Option<ExitStatus>,
    command_line: String,
    files: QemuFiles,
    qmp: Option<Qmp>,
}

impl Qemu {
    /// Starts QEMU; with a stdio console, returns its stdin and stdout too.
    fn spawn(
        args: &[String],
        files: QemuFiles,
        console: ConsoleKind,
        transcript: &Shared,
    ) -> (Qemu, Option<(ChildStdin, ChildStdout)>) {
        let bin = qemu_bin();
        let command_line = crate::daemon::shell_words(&bin, args);
        transcript.note(&command_line);
        let mut cmd = Command::new(&bin);
        cmd.args(args)
            .stderr(File::create(&files.stderr).expect("create qemu stderr file"));
        match console {
            ConsoleKind::Stdio => cmd.stdin(Stdio::piped()).stdout(Stdio::piped()),
            ConsoleKind::Socket => cmd.stdin(Stdio::null()).stdout(Stdio::null()),
        };
        // SIGKILLed when the thread that started it dies (a test binary killed by a
        // timeout would otherwise leave guests behind; `Drop` handles normal exits).
        crate::daemon::kill_with_parent(&mut cmd);
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (install qemu-system-x86: scripts/setup.sh, or set QEMU_BIN)",
                bin.display()
            )
        });
        let stdio = match console {
            ConsoleKind::Stdio => Some((
                child.stdin.take().expect("piped stdin"),
                child.stdout.take().expect("piped stdout"),
            )),
            ConsoleKind::Socket => None,
        };
        let q = Qemu {
            process: Process::Child(child),
            exited: None,
            command_line,
            files,
            qmp: None,
        };
        (q, stdio)
    }

    /// A QEMU started by something else, its console connecting to `console`.
    fn external(vm: Box<dyn ExternalQemu>, console: &Path) -> Qemu {
        Qemu {
            command_line: vm.describe(),
            files: QemuFiles {
                stderr: vm.log(),
                qmp: PathBuf::new(),
                serial: console.to_path_buf(),
            },
            process: Process::External(vm),
            exited: None,
            qmp: None,
        }
    }

    fn pid(&self) -> u32 {
        match &self.process {
            Process::Child(c) => c.id(),
            Process::External(vm) => vm.pid(),
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = match &mut self.process {
                Process::Child(c) => c.try_wait().expect("waitpid"),
                Process::External(vm) => vm.try_wait(),
            };
        }
        self.exited
    }

    /// Connects to the console socket (QEMU waits for it), retrying while QEMU is
    /// starting.
    fn connect_console(&mut self, timeout: Duration) -> Result<UnixStream, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Err(format!("QEMU exited ({st}) before its console accepted"));
            }
            match UnixStream::connect(&self.files.serial) {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "cannot connect to QEMU's console {}: {e}",
                        self.files.serial.display()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn qmp(&mut self) -> &mut Qmp {
        if let Process::External(vm) = &self.process {
            panic!(
                "QEMU's QMP monitor belongs to what started it ({})",
                vm.describe()
            );
        }
        if self.qmp.is_none() {
            self.qmp = Some(Qmp::connect(&self.files.qmp));
        }
        self.qmp.as_mut().expect("connected above")
    }

    fn kill(&mut self) {
        if self.try_wait().is_none() {
            match &mut self.process {
                Process::Child(c) => {
                    let _ = c.kill();
                    self.exited = c.wait().ok();
                }
                Process::External(vm) => {
                    vm.kill();
                    self.exited = vm.try_wait();
                }
            }
        }
    }

    /// Waits up to `timeout` for QEMU to exit.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A migration in progress: the destination QEMU and its console.
struct Migration {
    dest: Qemu,
    writer: UnixStream,
    reader_id: u64,
    uri: String,
    started: Instant,
}

/// A running guest. Killed on drop (and by the kernel if the thread that booted it dies).
pub struct Guest {
    /// The QEMU that runs the guest (the destination, after a migration).
    vm: Qemu,
    /// QEMUs the guest has left by migrating: their command lines and stderr files.
    retired: Vec<(String, PathBuf)>,
    migration: Option<Migration>,
    writer: Option<Box<dyn Write + Send>>,
    shared: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
    next_reader: u64,
    next_id: u64,
    /// A command timed out: the console is out of step, no more commands.
    broken: bool,
    /// A panic message already carried [`Guest::failure_context`].
    context_shown: bool,
    dir: PathBuf,
    transcript: PathBuf,
    opts: GuestOpts,
    images: GuestImages,
    migrations: u32,
    _slot: Slot,
}

impl Guest {
    /// Boot a guest and wait for its command loop. Panics with the console transcript's
    /// path (and tail) if it does not come up within `opts.boot_timeout`, or if the guest
    /// does not see exactly `opts.disks.len()` virtio disks.
    pub fn boot(opts: &GuestOpts) -> Guest {
        let images = guest_images();
        let slot = Slot::acquire();
        let (dir, transcript, shared) = guest_dir(opts);
        let files = QemuFiles::new(&dir, "qemu");
        let args = qemu_args(opts, &images, &opts.disks, &files, None);
        let (vm, stdio) = Qemu::spawn(&args, files, opts.console, &shared);
        let mut g = Guest::new(vm, dir, transcript, shared, opts, images, slot);
        match stdio {
            Some((stdin, stdout)) => g.attach_console(Box::new(stdin), stdout),
            None => {
                let sock = match g.vm.connect_console(QEMU_START_TIMEOUT) {
                    Ok(s) => s,
                    Err(e) => {
                        g.broken = true;
                        panic!("guest console: {e}\n{}", g.failure_context());
                    }
                };
                let rd = sock.try_clone().expect("clone console socket");
                g.attach_console(Box::new(sock), rd);
            }
        }
        g.wait_for_boot()
    }

    /// Like [`Guest::boot`], with QEMU started by something else (libvirt): `start`
    /// gets the guest's description, its kernel command line and the console socket
    /// (the harness listens there; QEMU's serial port connects to it), starts QEMU and
    /// returns the handle the harness watches and stops it with. `opts.console` is not
    /// used, and migration and [`Guest::qmp`] are not available.
    pub fn boot_external(
        opts: &GuestOpts,
        start: impl FnOnce(&ExternalStart) -> Box<dyn ExternalQemu>,
    ) -> Guest {
        let images = guest_images();
        let slot = Slot::acquire();
        let (dir, transcript, shared) = guest_dir(opts);
        let console = dir.join("console.sock");
        let listener = UnixListener::bind(&console)
            .unwrap_or_else(|e| panic!("cannot listen on {}: {e}", console.display()));
        listener
            .set_nonblocking(true)
            .expect("non-blocking console listener");
        let ext = start(&ExternalStart {
            opts,
            images: &images,
            cmdline: kernel_cmdline(opts),
            console: &console,
            dir: &dir,
        });
        shared.note(&format!("QEMU: {}", ext.describe()));
        let vm = Qemu::external(ext, &console);
        let mut g = Guest::new(vm, dir, transcript, shared, opts, images, slot);
        let deadline = Instant::now() + QEMU_START_TIMEOUT;
        let sock = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    g.broken = true;
                    panic!("guest console: accept: {e}\n{}", g.failure_context());
                }
            }
            let problem = if let Some(st) = g.vm.try_wait() {
                Some(format!("QEMU exited ({st}) before connecting its console"))
            } else if Instant::now() > deadline {
                Some(format!(
                    "QEMU did not connect to {} within {QEMU_START_TIMEOUT:?}",
                    console.display()
                ))
            } else {
                None
            };
            if let Some(p) = problem {
                g.broken = true;
                panic!("guest console: {p}\n{}", g.failure_context());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        sock.set_nonblocking(false)
            .expect("blocking console socket");
        let rd = sock.try_clone().expect("clone console socket");
        g.attach_console(Box::new(sock), rd);
        g.wait_for_boot()
    }

    fn new(
        vm: Qemu,
        dir: PathBuf,
        transcript: PathBuf,
        shared: Arc<Shared>,
        opts: &GuestOpts,
        images: GuestImages,
        slot: Slot,
    ) -> Guest {
        Guest {
            vm,
            retired: Vec::new(),
            migration: None,
            writer: None,
            shared,
            readers: Vec::new(),
            next_reader: 1,
            next_id: 1,
            broken: false,
            context_shown: false,
            dir,
            transcript,
            opts: opts.clone(),
            images,
            migrations: 0,
            _slot: slot,
        }
    }

    /// The first QEMU's console: commands go to `writer`, `reader` feeds the buffer.
    fn attach_console(
        &mut self,
        writer: Box<dyn Write + Send>,
        reader: impl Read + Send + 'static,
    ) {
        let id = self.new_reader_id();
        self.shared
            .console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .active = id;
        self.writer = Some(writer);
        self.readers
            .push(spawn_reader(Arc::clone(&self.shared), id, reader));
    }

    /// Waits for the guest's command loop and checks its disks (see [`Guest::boot`]).
    fn wait_for_boot(mut self) -> Guest {
        let g = &mut self;
        let opts = g.opts.clone();
        let t0 = Instant::now();
        let ready = g.wait_console(opts.boot_timeout, |buf| {
            find(buf, READY.as_bytes()).map(|i| i + READY.len())
        });
        let boot_log = match ready {
            Ok(text) => text,
            Err(e) => {
                g.broken = true;
                panic!("guest did not boot: {e}\n{}", g.failure_context());
            }
        };
        if boot_log.contains(INSMOD_FAILED) {
            g.broken = true;
            panic!(
                "guest: a kernel module did not load:\n{}\n{}",
                boot_log
                    .lines()
                    .filter(|l| l.contains(INSMOD_FAILED))
                    .collect::<Vec<_>>()
                    .join("\n"),
                g.failure_context()
            );
        }
        g.shared
            .note(&format!("booted in {:.2} s", t0.elapsed().as_secs_f64()));
        eprintln!(
            "guest {}: booted in {:.1} s (console: {})",
            opts.name,
            t0.elapsed().as_secs_f64(),
            g.transcript.display()
        );
        let disks = g.check("ls /sys/block | grep '^vd' || true", CMD_TIMEOUT);
        let disks: Vec<&str> = disks.split_whitespace().collect();
        if disks.len() != opts.disks.len() {
            let dmesg = g.dmesg();
            panic!(
                "guest sees {} virtio disks ({disks:?}), expected {}\ndmesg:\n{dmesg}\n{}",
                disks.len(),
                opts.disks.len(),
                g.failure_context()
            );
        }
        self
    }

    fn new_reader_id(&mut self) -> u64 {
        let id = self.next_reader;
        self.next_reader += 1;
        id
    }

    /// The console transcript file.
    pub fn transcript(&self) -> &Path {
        &self.transcript
    }

    /// Writes a line of the test's own into the transcript (what the host did, and
    /// when, next to what the guest printed).
    pub fn note(&self, what: &str) {
        self.shared.note(what);
    }

    /// The process id of the QEMU that runs the guest.
    pub fn qemu_pid(&self) -> u32 {
        self.vm.pid()
    }

    /// QEMU's own QMP monitor (of the QEMU that runs the guest; connected on first use).
    pub fn qmp(&mut self) -> &mut Qmp {
        self.vm.qmp()
    }

    /// Run `cmd` with `sh` in the guest; returns its exit status and its output (stdout
    /// and stderr interleaved, `\r` removed). Panics if it does not finish within
    /// `timeout` or if QEMU exits.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> (i32, String) {
        self.try_run(cmd, timeout)
            .unwrap_or_else(|e| panic!("guest command {cmd:?}: {e}\n{}", self.failure_context()))
    }

    /// [`Guest::run`], and panic (with the output and the kernel log's tail) unless the
    /// exit status is 0. Returns the output.
    #[track_caller]
    pub fn check(&mut self, cmd: &str, timeout: Duration) -> String {
        let (rc, out) = self.run(cmd, timeout);
        if rc != 0 {
            let dmesg = self.dmesg();
            let tail: Vec<&str> = dmesg.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "guest command {cmd:?} failed with exit status {rc}\noutput:\n{out}\n\
                 kernel log (tail):\n{}\nconsole transcript: {}",
                tail.join("\n"),
                self.transcript.display()
            );
        }
        out
    }

    /// The guest's kernel log.
    pub fn dmesg(&mut self) -> String {
        match self.try_run("dmesg", Duration::from_secs(30)) {
            Ok((_, out)) => out,
            Err(e) => format!("(dmesg failed: {e})"),
        }
    }

    /// The contents of a (sysfs) file, trimmed.
    #[track_caller]
    pub fn read_file(&mut self, path: &str) -> String {
        self.check(&format!("cat {path}"), CMD_TIMEOUT)
            .trim()
            .to_string()
    }

    /// Like [`Guest::run`], with errors (timeout, QEMU gone) returned instead of panicking.
    pub fn try_run(&mut self, cmd: &str, timeout: Duration) -> Result<(i32, String), String> {
        if self.broken {
            return Err("an earlier command timed out: the guest console is out of step".into());
        }
        let id = self.next_id;
        self.next_id += 1;
        let line = format!("{id} {}\n", base64(cmd.as_bytes()));
        if line.len() > MAX_LINE {
            return Err(format!(
                "command too long for the console ({} bytes encoded, at most {MAX_LINE})",
                line.len()
            ));
        }
        self.shared
            .note(&format!("run #{id} (timeout {timeout:?}): {cmd}"));
        self.send(&line)?;
        let begin = format!("@@VUBD-BEGIN-{id}@@");
        let end = format!("@@VUBD-END-{id}-");
        let t0 = Instant::now();
        let text = self.wait_console(timeout, |buf| {
            let e = find(buf, end.as_bytes())?;
            let rest = &buf[e + end.len()..];
            let close = find(rest, b"@@")?;
            Some(e + end.len() + close + 2)
        });
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                self.broken = true;
                self.shared.note(&format!("run #{id}: {e}"));
                return Err(e);
            }
        };
        let b = text
            .find(&begin)
            .ok_or_else(|| format!("no {begin} marker before the end marker"))?;
        let e = text.rfind(&end).expect("end marker found by wait_console");
        let status: i32 = text[e + end.len()..text.len() - 2]
            .parse()
            .map_err(|_| format!("bad end marker {:?}", &text[e..]))?;
        let mut out = &text[b + begin.len()..e];
        out = out.strip_prefix('\n').unwrap_or(out);
        out = out.strip_suffix('\n').unwrap_or(out);
        self.shared.note(&format!(
            "run #{id}: exit status {status} after {:.2} s",
            t0.elapsed().as_secs_f64()
        ));
        Ok((status, out.to_string()))
    }

    fn send(&mut self, line: &str) -> Result<(), String> {
        let w = self
            .writer
            .as_mut()
            .ok_or("the guest's console is closed")?;
        w.write_all(line.as_bytes())
            .and_then(|()| w.flush())
            .map_err(|e| format!("cannot write to the guest's serial console: {e}"))
    }

    /// Wait until `done(console buffer)` returns the length of a complete answer; remove
    /// and return that prefix (as text, `\r` removed).
    fn wait_console(
        &mut self,
        timeout: Duration,
        done: impl Fn(&[u8]) -> Option<usize>,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let shared = Arc::clone(&self.shared);
        let mut c = shared.console.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(n) = done(&c.buf) {
                let taken: Vec<u8> = c.buf.drain(..n).collect();
                return Ok(String::from_utf8_lossy(&taken).replace('\r', ""));
            }
            if c.eof {
                drop(c);
                let st = self.vm.wait_exit(Duration::from_secs(5));
                return Err(format!(
                    "QEMU exited ({}) before the guest answered",
                    st.map(|s| s.to_string()).unwrap_or_else(|| "?".into())
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("no answer from the guest within {timeout:?}"));
            }
            c = shared
                .changed
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Starts a live migration of this guest to a new QEMU on this host: the same
    /// machine and devices, disk `i` on `dest_sockets[i]` (with the source's chardev
    /// and device options), waiting on `-incoming unix:<path>`. `parameters` (a JSON
    /// object, or null) go to `migrate-set-parameters` on the source first (e.g.
    /// `max-bandwidth`, `downtime-limit`). Returns once the source has accepted
    /// `migrate`; the guest keeps running on the source, and commands may still be
    /// sent, until [`Guest::finish_migration`].
    pub fn start_migration(&mut self, dest_sockets: &[PathBuf], parameters: Value) {
        if let Process::External(vm) = &self.vm.process {
            panic!(
                "migration of a QEMU the harness did not start: {}",
                vm.describe()
            );
        }
        assert_eq!(
            self.opts.console,
            ConsoleKind::Socket,
            "migration needs GuestOpts::console_socket()"
        );
        assert!(self.migration.is_none(), "a migration is already running");
        assert_eq!(
            dest_sockets.len(),
            self.opts.disks.len(),
            "one destination socket per disk"
        );
        self.migrations += 1;
        let n = self.migrations;
        let disks: Vec<GuestDisk> = self
            .opts
            .disks
            .iter()
            .zip(dest_sockets)
            .map(|(d, s)| GuestDisk {
                socket: s.clone(),
                ..d.clone()
            })
            .collect();
        let incoming = self.dir.join(format!("migrate{n}.sock"));
        let files = QemuFiles::new(&self.dir, &format!("dest{n}"));
        let args = qemu_args(&self.opts, &self.images, &disks, &files, Some(&incoming));
        self.shared.note(&format!("migration {n}: destination"));
        let (mut dest, _) = Qemu::spawn(&args, files, ConsoleKind::Socket, &self.shared);
        let sock = match dest.connect_console(QEMU_START_TIMEOUT) {
            Ok(s) => s,
            Err(e) => {
                let stderr = std::fs::read_to_string(&dest.files.stderr).unwrap_or_default();
                dest.kill();
                panic!(
                    "migration destination: {e}\ndestination QEMU: {}\nits stderr:\n{stderr}\n{}",
                    dest.command_line,
                    self.failure_context()
                );
            }
        };
        let reader_id = self.new_reader_id();
        let rd = sock.try_clone().expect("clone console socket");
        self.readers
            .push(spawn_reader(Arc::clone(&self.shared), reader_id, rd));
        // QMP answers once QEMU's main loop runs, which is after `-incoming` listens.
        let status = dest.qmp().ok("query-status", json!({}));
        assert_eq!(
            status["status"], "inmigrate",
            "destination QEMU is not waiting for a migration: {status}"
        );
        let uri = format!("unix:{}", incoming.display());
        self.migration = Some(Migration {
            dest,
            writer: sock,
            reader_id,
            uri: uri.clone(),
            started: Instant::now(),
        });
        if !parameters.is_null() {
            self.set_migration_parameters(parameters);
        }
        self.shared.note(&format!("migration {n}: migrate {uri}"));
        if let Err(e) = self.vm.qmp().execute("migrate", json!({ "uri": uri })) {
            panic!("migrate {uri}: {e:?}\n{}", self.failure_context());
        }
    }

    /// `migrate-set-parameters` on the source QEMU (e.g. to let a throttled migration
    /// converge).
    pub fn set_migration_parameters(&mut self, parameters: Value) {
        self.shared
            .note(&format!("migrate-set-parameters {parameters}"));
        if let Err(e) = self
            .vm
            .qmp()
            .execute("migrate-set-parameters", parameters.clone())
        {
            panic!(
                "migrate-set-parameters {parameters}: {e:?}\n{}",
                self.failure_context()
            );
        }
    }

    /// `query-migrate` on the source QEMU.
    pub fn migration_info(&mut self) -> Value {
        if let Some(st) = self.vm.try_wait() {
            panic!(
                "the source QEMU exited ({st}) during the migration\n{}",
                self.failure_context()
            );
        }
        self.vm.qmp().ok("query-migrate", json!({}))
    }

    /// Waits for the migration to complete and the destination to run the guest; from
    /// then on the destination is this guest (commands go to it) and the source QEMU has
    /// quit. Returns the source's last `query-migrate`. Panics if the migration fails or
    /// does not complete within `timeout`.
    pub fn finish_migration(&mut self, timeout: Duration) -> Value {
        let started = self
            .migration
            .as_ref()
            .expect("no migration was started")
            .started;
        let deadline = Instant::now() + timeout;
        let info = loop {
            let info = self.migration_info();
            match info["status"].as_str().unwrap_or("") {
                "completed" => break info,
                "failed" | "cancelled" => {
                    panic!(
                        "migration {}: {info}\n{}",
                        info["status"],
                        self.failure_context()
                    )
                }
                _ => {}
            }
            if Instant::now() > deadline {
                panic!(
                    "migration not complete within {timeout:?}: {info}\n{}",
                    self.failure_context()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let run_deadline = Instant::now() + QEMU_START_TIMEOUT;
        loop {
            let m = self.migration.as_mut().expect("checked above");
            if let Some(st) = m.dest.try_wait() {
                panic!(
                    "the destination QEMU exited ({st}) after the migration completed\n{}",
                    self.failure_context()
                );
            }
            let st = m.dest.qmp().ok("query-status", json!({}));
            if st["status"] == "running" {
                break;
            }
            if Instant::now() > run_deadline {
                panic!(
                    "the destination does not run the guest after the migration: {st}\n{}",
                    self.failure_context()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let m = self.migration.take().expect("checked above");
        self.shared.note(&format!(
            "migration to {} completed in {:.2} s: {info}",
            m.uri,
            started.elapsed().as_secs_f64()
        ));
        // The destination's console is the guest's from here on.
        self.shared
            .console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .active = m.reader_id;
        self.writer = Some(Box::new(m.writer));
        let mut source = std::mem::replace(&mut self.vm, m.dest);
        let _ = source.qmp().execute("quit", json!({}));
        if source.wait_exit(QEMU_START_TIMEOUT).is_none() {
            source.kill();
        }
        self.retired
            .push((source.command_line.clone(), source.files.stderr.clone()));
        info
    }

    /// `sync; poweroff -f` and wait for QEMU to exit; returns its exit status (panics if
    /// it does not exit within [`SHUTDOWN_TIMEOUT`]).
    pub fn shutdown(mut self) -> ExitStatus {
        let id = self.next_id;
        self.next_id += 1;
        self.shared.note("shutdown: sync; poweroff -f");
        if let Err(e) = self.send(&format!("{id} {}\n", base64(b"sync; poweroff -f"))) {
            panic!("guest shutdown: {e}\n{}", self.failure_context());
        }
        match self.vm.wait_exit(SHUTDOWN_TIMEOUT) {
            Some(st) => {
                self.shared.note(&format!("QEMU exited: {st}"));
                st
            }
            None => {
                self.broken = true;
                panic!(
                    "QEMU did not exit within {SHUTDOWN_TIMEOUT:?} of poweroff\n{}",
                    self.failure_context()
                );
            }
        }
    }

    /// Is QEMU still running?
    pub fn is_running(&mut self) -> bool {
        self.vm.try_wait().is_none()
    }

    /// What a failure message should show: the transcript's path and tail, QEMU's
    /// command line and stderr (of every QEMU the guest ran on).
    pub fn failure_context(&mut self) -> String {
        self.context_shown = true;
        let text = std::fs::read(&self.transcript)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        let mut qemus = String::new();
        if let Some(st) = self.vm.try_wait() {
            qemus.push_str(&format!("QEMU has exited: {st}\n"));
        }
        let current = (self.vm.command_line.clone(), self.vm.files.stderr.clone());
        let pending = self
            .migration
            .as_ref()
            .map(|m| (m.dest.command_line.clone(), m.dest.files.stderr.clone()));
        for (what, (cmd, stderr)) in self
            .retired
            .iter()
            .map(|q| ("QEMU (migrated away)", q.clone()))
            .chain(std::iter::once(("QEMU", current)))
            .chain(pending.map(|q| ("QEMU (migration destination)", q)))
        {
            let err = std::fs::read_to_string(&stderr).unwrap_or_default();
            qemus.push_str(&format!("{what}: {cmd}\n{what} stderr:\n{err}"));
        }
        format!(
            "{qemus}--- console transcript {} (last 40 lines) ---\n{tail}\n\
             --- end of console transcript ---",
            self.transcript.display()
        )
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking && !self.broken && self.is_running() {
            // Put the kernel log into the transcript: it usually says what went wrong.
            let _ = self.try_run("dmesg", Duration::from_secs(15));
        }
        if let Some(mut m) = self.migration.take() {
            m.dest.kill();
        }
        self.vm.kill();
        self.writer = None;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        if panicking {
            let context = if self.context_shown {
                format!("console transcript: {}", self.transcript.display())
            } else {
                self.failure_context()
            };
            eprintln!(
                "--- guest (failing test): kept {} ---\n{context}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether `path` is a UNIX socket that a process listens on (from /proc/net/unix; a
/// socket file left behind by a killed process is not).
pub fn socket_listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Num RefCount Protocol Flags Type St Inode Path; Flags has __SO_ACCEPTCON
        // (0x10000) for a listening socket.
        f.len() >= 8
            && f[7] == want
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// Waits until [`socket_listening`] for every path; returns how long that took, or
/// `None` after `timeout`.
pub fn wait_listening(paths: &[PathBuf], timeout: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    loop {
        if paths.iter().all(|p| is_socket(p) && socket_listening(p)) {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Standard base64 with padding (what busybox `base64 -d` reads).
pub fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                s.push(ABC[((n >> shift) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o, "base64({i:?})");
        }
    }
}

//! Real QEMU guests on vubd: boots `qemu-system-x86_64` (TCG) with a tiny Linux built by
//! `scripts/build-guest.sh` (kernel + busybox initramfs with fio, blkdiscard, fstrim,
//! mkfs.ext4), attached to vhost-user-blk sockets, and runs shell commands in it over the
//! serial console.
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
//! The whole console output, with the commands sent, goes to a transcript file. It is
//! kept, and its path and tail printed, when a test fails (panics) with a guest alive.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
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

const READY: &str = "@@VUBD-READY@@";
const INSMOD_FAILED: &str = "@@VUBD-INSMOD-FAILED";
/// The kernel's line discipline takes at most 4095 characters per line.
const MAX_LINE: usize = 4000;

/// One vhost-user-blk disk: `-chardev socket,path=<socket> -device
/// vhost-user-blk-pci,num-queues=<num_queues><extra>`. Disks appear in the guest in the
/// order given (vda, vdb, ...).
#[derive(Debug, Clone)]
pub struct GuestDisk {
    pub socket: PathBuf,
    pub num_queues: usize,
    /// Appended to the `-device` option (starts with a comma when non-empty).
    pub extra: String,
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
        }
    }

    /// Add a vhost-user-blk disk on `socket` with `num_queues` queues.
    pub fn disk(mut self, socket: &Path, num_queues: usize) -> GuestOpts {
        self.disks.push(GuestDisk {
            socket: socket.to_path_buf(),
            num_queues,
            extra: String::new(),
        });
        self
    }

    pub fn cpus(mut self, n: usize) -> GuestOpts {
        self.cpus = n;
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
    // <target>/<profile>/deps/<test binary> -> <target>/guest
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name() == Some(std::ffi::OsStr::new("deps")) {
        dir.pop();
    }
    dir.pop();
    let out = dir.join("guest");
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

/// Console output not yet consumed by a command, shared with the reader thread.
#[derive(Default)]
struct Console {
    buf: Vec<u8>,
    eof: bool,
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

/// A running guest. Killed on drop (and by the kernel if the thread that booted it dies).
pub struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    exited: Option<ExitStatus>,
    next_id: u64,
    /// A command timed out: the console is out of step, no more commands.
    broken: bool,
    /// A panic message already carried [`Guest::failure_context`].
    context_shown: bool,
    dir: PathBuf,
    transcript: PathBuf,
    qemu_stderr: PathBuf,
    command_line: String,
    _slot: Slot,
}

impl Guest {
    /// Boot a guest and wait for its command loop. Panics with the console transcript's
    /// path (and tail) if it does not come up within `opts.boot_timeout`, or if the guest
    /// does not see exactly `opts.disks.len()` virtio disks.
    pub fn boot(opts: &GuestOpts) -> Guest {
        let images = guest_images();
        let slot = Slot::acquire();
        let dir = std::env::temp_dir().join(crate::unique_name(&format!(
            "vubd-guest-{}",
            opts.name.replace(['/', ' ', ':'], "_")
        )));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let transcript = dir.join("console.log");
        let qemu_stderr = dir.join("qemu.stderr");

        let mem = format!("{}M", opts.mem_mib);
        let mut args: Vec<String> = vec![
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-accel".into(),
            "tcg".into(),
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
            format!("console=ttyS0 quiet panic=-1 {}", opts.append)
                .trim_end()
                .to_string(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            "stdio".into(),
            "-no-reboot".into(),
        ];
        for (i, d) in opts.disks.iter().enumerate() {
            args.push("-chardev".into());
            args.push(format!("socket,id=vub{i},path={}", d.socket.display()));
            args.push("-device".into());
            args.push(format!(
                "vhost-user-blk-pci,chardev=vub{i},num-queues={}{}",
                d.num_queues, d.extra
            ));
        }
        let bin = qemu_bin();
        let command_line = crate::daemon::shell_words(&bin, &args);

        let mut log = File::create(&transcript)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", transcript.display()));
        let _ = writeln!(log, "#### {command_line}");
        let mut cmd = Command::new(&bin);
        cmd.args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&qemu_stderr).expect("create qemu stderr file"));
        kill_with_parent(&mut cmd);
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (install qemu-system-x86: scripts/setup.sh, or set QEMU_BIN)",
                bin.display()
            )
        });
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().expect("piped stdout");
        let shared = Arc::new(Shared {
            console: Mutex::new(Console::default()),
            changed: Condvar::new(),
            transcript: Mutex::new(log),
            started: Instant::now(),
        });
        let sh = Arc::clone(&shared);
        let reader = std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                let n = match stdout.read(&mut chunk) {
                    Ok(0) | Err(_) => 0,
                    Ok(n) => n,
                };
                {
                    let mut t = sh.transcript.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = t.write_all(&chunk[..n]);
                    let _ = t.flush();
                }
                let mut c = sh.console.lock().unwrap_or_else(|e| e.into_inner());
                if n == 0 {
                    c.eof = true;
                    sh.changed.notify_all();
                    return;
                }
                c.buf.extend_from_slice(&chunk[..n]);
                sh.changed.notify_all();
            }
        });
        let mut g = Guest {
            child,
            stdin,
            shared,
            reader: Some(reader),
            exited: None,
            next_id: 1,
            broken: false,
            context_shown: false,
            dir,
            transcript,
            qemu_stderr,
            command_line,
            _slot: slot,
        };

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
        g
    }

    /// The console transcript file.
    pub fn transcript(&self) -> &Path {
        &self.transcript
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
        let stdin = self.stdin.as_mut().ok_or("QEMU's stdin is closed")?;
        stdin
            .write_all(line.as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("cannot write to QEMU's serial console: {e}"))
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
                let st = self.child.wait().ok();
                self.exited = st;
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

    /// `sync; poweroff -f` and wait for QEMU to exit; returns its exit status (panics if
    /// it does not exit within [`SHUTDOWN_TIMEOUT`]).
    pub fn shutdown(mut self) -> ExitStatus {
        let id = self.next_id;
        self.next_id += 1;
        self.shared.note("shutdown: sync; poweroff -f");
        if let Err(e) = self.send(&format!("{id} {}\n", base64(b"sync; poweroff -f"))) {
            panic!("guest shutdown: {e}\n{}", self.failure_context());
        }
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait().expect("waitpid") {
                self.exited = Some(st);
                self.shared.note(&format!("QEMU exited: {st}"));
                return st;
            }
            if Instant::now() > deadline {
                self.broken = true;
                panic!(
                    "QEMU did not exit within {SHUTDOWN_TIMEOUT:?} of poweroff\n{}",
                    self.failure_context()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Is QEMU still running?
    pub fn is_running(&mut self) -> bool {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("waitpid");
        }
        self.exited.is_none()
    }

    /// What a failure message should show: the transcript's path and tail, QEMU's
    /// command line and stderr.
    pub fn failure_context(&mut self) -> String {
        self.context_shown = true;
        let text = std::fs::read(&self.transcript)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        let stderr = std::fs::read_to_string(&self.qemu_stderr).unwrap_or_default();
        format!(
            "QEMU: {}\nQEMU stderr:\n{stderr}--- console transcript {} (last 40 lines) ---\n{tail}\n\
             --- end of console transcript ---",
            self.command_line,
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
        if self.is_running() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
        self.stdin = None;
        if let Some(r) = self.reader.take() {
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

/// SIGKILL QEMU when the thread that started it dies (a test binary killed by a timeout
/// would otherwise leave guests behind; `Drop` handles normal exits).
fn kill_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
    // which is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
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

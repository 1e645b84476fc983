//! Starting and stopping the daemon under test (vubd, or qemu-storage-daemon: same options).

use crate::image::TempDir;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a daemon may take to create its socket, or to exit after SIGTERM.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The vubd binary: `$VUBD_BIN`, else `vubd` in the target directory of the running
/// executable (`target/<profile>/deps/<test>` or `target/<profile>/<bin>`).
pub fn vubd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VUBD_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "VUBD_BIN={} does not exist or is not a file",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("executable has a directory")
        .to_path_buf();
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.pop();
    }
    let cand = dir.join("vubd");
    assert!(
        cand.is_file(),
        "vubd binary not found at {} (next to {}): build it first with `cargo build -p vubd` \
         (or `--release` for the benchmark), or set VUBD_BIN=/path/to/vubd",
        cand.display(),
        exe.display()
    );
    cand
}

/// `$QSD_BIN`, else /usr/bin/qemu-storage-daemon.
pub fn qsd_bin() -> PathBuf {
    std::env::var_os("QSD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/qemu-storage-daemon"))
}

/// The daemon the block job tests run and its name: vubd, or qemu-storage-daemon
/// (the reference for their expectations) with `VUBD_JOBS_DAEMON=qsd`.
pub fn jobs_daemon() -> (&'static str, PathBuf) {
    match std::env::var("VUBD_JOBS_DAEMON").as_deref() {
        Ok("qsd") => ("qemu-storage-daemon", qsd_bin()),
        Ok("vubd") | Err(_) => ("vubd", vubd_bin()),
        Ok(other) => panic!("VUBD_JOBS_DAEMON={other}: expected vubd or qsd"),
    }
}

/// Socket paths named in `addr.path=` of `--export` and `--nbd-server` options
/// (key=value syntax), and in `"path"` of JSON `--export` options.
pub fn socket_paths_in(args: &[String]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for w in args.windows(2) {
        if w[0] != "--export" && w[0] != "--nbd-server" {
            continue;
        }
        let opt = &w[1];
        if opt.trim_start().starts_with('{') {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(opt) {
                if let Some(p) = v.pointer("/addr/path").and_then(|p| p.as_str()) {
                    out.push(PathBuf::from(p));
                }
            }
            continue;
        }
        // Values may contain ",," (an escaped comma); socket paths in tests never do.
        for kv in opt.split(',') {
            if let Some(p) = kv.strip_prefix("addr.path=") {
                out.push(PathBuf::from(p));
            }
        }
    }
    out
}

/// Has the child inherit `fd` as descriptor number `target` (and as nothing else):
/// a listening socket handed over as systemd or a sandbox would.
pub fn pass_fd(cmd: &mut Command, fd: std::os::fd::RawFd, target: std::os::fd::RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls dup2 or
    // fcntl, which are async-signal-safe; dup2 leaves the copy without FD_CLOEXEC.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Have the kernel SIGKILL the daemon when the thread that started it dies (a test binary
/// killed by a timeout would otherwise leave daemons behind; `Drop` handles normal exits).
pub(crate) fn kill_with_parent(cmd: &mut Command) {
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

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

fn read_lossy(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => format!("{status}"),
    }
}

/// A running daemon. Killed with SIGKILL on drop if still running; its stderr is printed
/// then if the thread is panicking (a failing test), so failures show the daemon's side.
pub struct Daemon {
    child: Child,
    exited: Option<ExitStatus>,
    bin: PathBuf,
    args: Vec<String>,
    sockets: Vec<PathBuf>,
    stderr_path: PathBuf,
    stdout_path: PathBuf,
    // Last: the directory holding the output files is removed after the child is gone.
    _dir: TempDir,
}

impl Daemon {
    /// Start vubd with `args`; wait for the sockets named in `addr.path=` to appear.
    /// Panics (with the daemon's stderr) if it does not come up.
    pub fn start<S: AsRef<str>>(args: &[S]) -> Daemon {
        Daemon::start_bin(&vubd_bin(), args)
    }

    /// Like [`Daemon::start`] with another binary (e.g. [`qsd_bin`]).
    pub fn start_bin<S: AsRef<str>>(bin: &Path, args: &[S]) -> Daemon {
        let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
        let sockets = socket_paths_in(&args);
        Daemon::try_start(bin, &args, &sockets).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start `bin args`, wait until every path in `sockets` exists as a socket. If it
    /// exits first or the sockets do not appear within [`START_TIMEOUT`], returns a message
    /// with its exit status and stderr.
    pub fn try_start(bin: &Path, args: &[String], sockets: &[PathBuf]) -> Result<Daemon, String> {
        Daemon::try_start_with(bin, args, sockets, |_| {})
    }

    /// As [`Daemon::try_start`], with `setup` adjusting the command first (to pass
    /// descriptors or environment variables).
    pub fn try_start_with(
        bin: &Path,
        args: &[String],
        sockets: &[PathBuf],
        setup: impl FnOnce(&mut Command),
    ) -> Result<Daemon, String> {
        for s in sockets {
            if s.exists() {
                return Err(format!(
                    "socket path {} exists before starting {}: stale socket or a path clash",
                    s.display(),
                    bin.display()
                ));
            }
        }
        let dir = TempDir::new("vubd-daemon");
        let stderr_path = dir.join("stderr");
        let stdout_path = dir.join("stdout");
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).expect("create stdout file"))
            .stderr(File::create(&stderr_path).expect("create stderr file"))
            .env("RUST_BACKTRACE", "1");
        kill_with_parent(&mut cmd);
        setup(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let mut d = Daemon {
            child,
            exited: None,
            bin: bin.to_path_buf(),
            args: args.to_vec(),
            sockets: sockets.to_vec(),
            stderr_path,
            stdout_path,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(st) = d.try_wait() {
                return Err(format!(
                    "daemon exited during startup with {}\ncommand: {}\nstderr:\n{}",
                    describe(st),
                    d.command_line(),
                    d.stderr()
                ));
            }
            if d.sockets.iter().all(|s| is_socket(s)) {
                return Ok(d);
            }
            if Instant::now() > deadline {
                let msg = format!(
                    "daemon did not create {:?} within {START_TIMEOUT:?}\ncommand: {}\n\
                     stderr:\n{}",
                    d.sockets,
                    d.command_line(),
                    d.stderr()
                );
                d.kill();
                return Err(msg);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first socket path (from `addr.path=`).
    pub fn socket(&self) -> &Path {
        self.sockets.first().expect("daemon has no socket path")
    }

    pub fn socket_str(&self) -> &str {
        self.socket().to_str().expect("UTF-8 socket path")
    }

    pub fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// The command line, shell-quoted where needed, for messages and reports.
    pub fn command_line(&self) -> String {
        shell_words(&self.bin, &self.args)
    }

    /// Non-blocking: Some(status) once the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("waitpid");
        }
        self.exited
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Panic with the daemon's stderr if it is not running (e.g. after a bad request).
    #[track_caller]
    pub fn assert_running(&mut self, context: &str) {
        if let Some(st) = self.try_wait() {
            panic!(
                "{context}: daemon is not running any more ({})\nstderr:\n{}",
                describe(st),
                self.stderr()
            );
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        if self.exited.is_some() {
            return;
        }
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child,
        // not yet reaped (exited is None), so it cannot have been reused.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// Wait for exit up to `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Send SIGTERM and wait for the exit status (panics, after SIGKILL, if the daemon is
    /// still running after [`EXIT_TIMEOUT`]).
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_timeout(EXIT_TIMEOUT) {
            Some(st) => st,
            None => {
                self.kill();
                panic!(
                    "daemon did not exit within {EXIT_TIMEOUT:?} of SIGTERM\nstderr:\n{}",
                    self.stderr()
                );
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// Total CPU time (user + system, all threads) consumed so far, from /proc/<pid>/stat.
    pub fn cpu_time(&self) -> Duration {
        cpu_time_of(self.child.id()).unwrap_or_default()
    }

    /// Total CPU time in clock ticks (see [`cpu_ticks_of`]).
    pub fn cpu_ticks(&self) -> u64 {
        cpu_ticks_of(self.child.id()).expect("daemon's /proc/<pid>/stat")
    }

    /// Names of the daemon's threads (one entry per thread).
    pub fn thread_names(&self) -> Vec<String> {
        thread_names_of(self.child.id())
    }

    /// Resident memory in KiB.
    pub fn vm_rss_kib(&self) -> u64 {
        vm_rss_kib_of(self.child.id())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let was_running = self.try_wait().is_none();
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- daemon ({}; {}) stderr ---\n{}--- end of daemon stderr ---",
                self.command_line(),
                if was_running {
                    "was still running, killed".to_string()
                } else {
                    describe(self.exited.expect("reaped"))
                },
                self.stderr()
            );
        }
        // Leave no stale sockets after a SIGKILL (the daemon cannot clean up).
        for s in &self.sockets {
            if is_socket(s) {
                let _ = std::fs::remove_file(s);
            }
        }
    }
}

/// utime + stime of a process from /proc/<pid>/stat.
pub fn cpu_time_of(pid: u32) -> Option<Duration> {
    let ticks = cpu_ticks_of(pid)?;
    Some(Duration::from_nanos(
        ticks * 1_000_000_000 / clock_ticks_per_sec(),
    ))
}

/// Clock ticks per second (the unit of the CPU times in /proc/<pid>/stat).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

/// utime + stime in clock ticks of a process: all its threads, also the ended ones.
pub fn cpu_ticks_of(pid: u32) -> Option<u64> {
    ticks_in_stat(&format!("/proc/{pid}/stat"))
}

/// utime + stime in clock ticks of thread `tid` of process `pid` (/proc/<tid>/stat would
/// be the whole process's).
pub fn thread_cpu_ticks_of(pid: u32, tid: u32) -> Option<u64> {
    ticks_in_stat(&format!("/proc/{pid}/task/{tid}/stat"))
}

fn ticks_in_stat(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the ")" closing the command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Names (`comm`) of the threads of a process, from /proc/<pid>/task.
pub fn thread_names_of(pid: u32) -> Vec<String> {
    let dir = format!("/proc/{pid}/task");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
        .filter_map(|t| {
            let t = t.ok()?;
            // A thread may end between the listing and the read.
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            Some(comm.trim_end().to_string())
        })
        .collect()
}

/// Resident memory (VmRSS of /proc/<pid>/status) in KiB.
pub fn vm_rss_kib_of(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS line in {path}:\n{status}"))
}

/// Quote for display in a shell.
pub fn shell_words(bin: &Path, args: &[String]) -> String {
    let mut s = bin.display().to_string();
    for a in args {
        s.push(' ');
        if !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_=.,/:+@%".contains(c))
        {
            s.push_str(a);
        } else {
            s.push('\'');
            s.push_str(&a.replace('\'', "'\\''"));
            s.push('\'');
        }
    }
    s
}

/// Result of running a daemon that is expected to exit by itself (bad configuration).
#[derive(Debug)]
pub struct Exited {
    /// None if it was still running after the timeout (it was then killed).
    pub status: Option<ExitStatus>,
    pub stderr: String,
    pub stdout: String,
    pub command: String,
}

impl Exited {
    /// Assert: exited with status 1 and printed exactly one non-empty line on stderr
    /// that contains every string in `mentions` (case-insensitive). Returns the line.
    #[track_caller]
    pub fn assert_config_error(&self, mentions: &[&str]) -> String {
        let st = self.status.unwrap_or_else(|| {
            panic!(
                "expected a configuration error, but the daemon was still running (killed)\n\
                 command: {}\nstderr:\n{}",
                self.command, self.stderr
            )
        });
        assert_eq!(
            st.code(),
            Some(1),
            "expected exit status 1, got {}\ncommand: {}\nstderr:\n{}",
            describe(st),
            self.command,
            self.stderr
        );
        let trimmed = self.stderr.trim_end_matches('\n');
        assert!(
            !trimmed.is_empty() && !trimmed.contains('\n'),
            "expected a single-line error message on stderr, got {} lines:\n{}\ncommand: {}",
            trimmed.lines().count(),
            self.stderr,
            self.command
        );
        let lower = trimmed.to_lowercase();
        for m in mentions {
            assert!(
                lower.contains(&m.to_lowercase()),
                "error message does not mention {m:?}: {trimmed:?}\ncommand: {}",
                self.command
            );
        }
        trimmed.to_string()
    }
}

/// Run `bin args` expecting it to exit by itself within `timeout`; kill it otherwise.
pub fn run_to_exit<S: AsRef<str>>(bin: &Path, args: &[S], timeout: Duration) -> Exited {
    run_to_exit_with(bin, args, timeout, |_| {})
}

/// As [`run_to_exit`], with `setup` adjusting the command first.
pub fn run_to_exit_with<S: AsRef<str>>(
    bin: &Path,
    args: &[S],
    timeout: Duration,
    setup: impl FnOnce(&mut Command),
) -> Exited {
    let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
    let dir = TempDir::new("vubd-run");
    let stderr_path = dir.join("stderr");
    let stdout_path = dir.join("stdout");
    let mut cmd = Command::new(bin);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).expect("create stdout file"))
        .stderr(File::create(&stderr_path).expect("create stderr file"));
    kill_with_parent(&mut cmd);
    setup(&mut cmd);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("waitpid") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Exited {
        status,
        stderr: read_lossy(&stderr_path),
        stdout: read_lossy(&stdout_path),
        command: shell_words(bin, &args),
    }
}

//! libvirt as a client of vubd: Debian's libvirtd (its QEMU driver) starts the test
//! guest of [`crate::guest`] from a domain whose disks are `<disk type='vhostuser'>`
//! on vubd's sockets (docs/libvirt.md has the XML and the notes).
//!
//! Each [`Libvirtd`] is a private daemon: it runs as root (the "system" driver, as
//! deployments run it) in a mount namespace of its own, where a fresh directory is bound
//! over `/etc/libvirt`, `/run`, `/var/lib/libvirt` and `/var/log/libvirt`. Its
//! configuration (no authentication on its socket; QEMU as root, without DAC relabelling,
//! cgroups or a mount namespace of QEMU's own; QEMU's output to a file instead of
//! virtlogd) and every file it writes stay in that directory, so nothing global is
//! changed and two test binaries each run their own daemon side by side. Clients reach
//! it with `qemu:///system?socket=<dir>/run/libvirt/libvirt-sock`. Only
//! `/var/cache/libvirt` (the QEMU capabilities, probed in about 8 s by a fresh daemon)
//! is shared between runs: it is `<target>/libvirt-cache`.
//!
//! The guest's QEMU is libvirt's, not the harness's child: [`Domain`] is how
//! [`Guest::boot_external`](crate::guest::Guest::boot_external) watches and stops it.

use crate::daemon::{run_to_exit_with, Daemon};
use crate::guest::{self, ExternalQemu, ExternalStart, GuestDisk};
use crate::image::TempDir;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// Time for one virsh command (defining, starting or destroying a domain, probing QEMU
/// on a fresh capabilities cache).
pub const VIRSH_TIMEOUT: Duration = Duration::from_secs(120);
/// Time for libvirtd to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for libvirt to record a QEMU exit, or for QEMU to go after `virsh destroy`.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where Debian's packages put what the daemon's namespace binds over; all must exist.
const BOUND: [&str; 4] = [
    "/etc/libvirt",
    "/var/lib/libvirt",
    "/var/cache/libvirt",
    "/var/log/libvirt",
];

const INSTALL_HINT: &str = "libvirt is not installed: scripts/setup.sh installs Debian's \
                            libvirt-daemon-system and libvirt-clients";

/// `libvirtd.conf`: the socket is root's only (mode 0700), so no authentication.
const LIBVIRTD_CONF: &str = r#"auth_unix_ro = "none"
auth_unix_rw = "none"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"#;

/// `qemu.conf`: QEMU as root, reaching the test's files and vubd's sockets as they
/// are; no cgroups (there may be no cgroup hierarchy to use), no private /dev for QEMU,
/// its output to a file (no virtlogd).
const QEMU_CONF: &str = r#"user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"#;

/// Binds the daemon's directories and starts libvirtd; `$1` is the root directory, `$2`
/// the capabilities cache, `$3` the libvirtd binary.
const NAMESPACE_SCRIPT: &str = r#"set -e
mount --bind "$1/etc" /etc/libvirt
mount --bind "$1/run" /run
mount --bind "$1/lib" /var/lib/libvirt
mount --bind "$1/log" /var/log/libvirt
mount --bind "$2" /var/cache/libvirt
exec "$3" -f /etc/libvirt/libvirtd.conf -p /run/libvirtd.pid
"#;

/// A program on `PATH` or in /usr/sbin, /sbin.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether `pid` is a process that has not exited (a zombie has).
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // pid (comm) state ...; comm may contain spaces and parentheses.
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

/// `s` with the characters XML gives a meaning to escaped (text and attribute values).
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// The domain XML for the guest `s` describes, named `name`: TCG, shared memfd memory
/// (vhost-user), direct kernel boot, the console on the first serial port connecting to
/// `s.console`, one `<disk type='vhostuser'>` per disk (vda, vdb, ...), and nothing else
/// (no USB, no balloon). Panics on what libvirt cannot express (extra `-device`
/// options, single-threaded TCG).
pub fn domain_xml(name: &str, s: &ExternalStart) -> String {
    let o = s.opts;
    assert!(
        !o.single_thread_tcg,
        "libvirt has no setting for single-threaded TCG"
    );
    let disks: String = o
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| indent(&disk_xml(i, d), "    "))
        .collect();
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>{cpus}</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
{disks}    <serial type='unix'>
      <source mode='connect' path='{console}'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
",
        name = xml_escape(name),
        mem = o.mem_mib,
        cpus = o.cpus,
        kernel = xml_escape(&s.images.kernel.display().to_string()),
        initrd = xml_escape(&s.images.initrd.display().to_string()),
        cmdline = xml_escape(&s.cmdline),
        emulator = xml_escape(&emulator().display().to_string()),
        console = xml_escape(&s.console.display().to_string()),
    )
}

/// The `<disk type='vhostuser'>` element for `d` as the guest's disk `i` (vda, vdb,
/// ...). Panics on extra `-device` options (libvirt has no equivalent).
pub fn disk_xml(i: usize, d: &GuestDisk) -> String {
    assert!(
        d.extra.is_empty(),
        "disk {i}: extra -device options ({:?}) have no libvirt equivalent",
        d.extra
    );
    assert!(i < 26, "at most 26 disks (vda..vdz)");
    let reconnect = match d.reconnect {
        Some(t) => format!("\n    <reconnect enabled='yes' timeout='{t}'/>\n  </source>"),
        None => "</source>".to_string(),
    };
    format!(
        "<disk type='vhostuser' device='disk'>
  <driver name='qemu' type='raw' queues='{q}'/>
  <source type='unix' path='{path}'>{reconnect}
  <target dev='vd{letter}' bus='virtio'/>
</disk>
",
        q = d.num_queues,
        path = xml_escape(&d.socket.display().to_string()),
        letter = (b'a' + i as u8) as char,
    )
}

/// Every line of `text` with `prefix` in front.
fn indent(text: &str, prefix: &str) -> String {
    text.lines().map(|l| format!("{prefix}{l}\n")).collect()
}

/// The QEMU binary for the domain's `<emulator>`: [`guest::qemu_bin`], made absolute.
fn emulator() -> PathBuf {
    let bin = guest::qemu_bin();
    if bin.is_absolute() {
        return bin;
    }
    find_program(&bin.to_string_lossy()).unwrap_or_else(|| {
        panic!(
            "{} not found on PATH (install qemu-system-x86: scripts/setup.sh, or set QEMU_BIN)",
            bin.display()
        )
    })
}

/// Runs virsh on one daemon.
#[derive(Debug, Clone)]
pub struct Virsh {
    bin: PathBuf,
    uri: String,
}

impl Virsh {
    /// `virsh -c <uri> -q <args>`: its stdout, or a message with its exit status and
    /// output.
    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-c", self.uri.as_str(), "-q"];
        all.extend_from_slice(args);
        let r = run_to_exit_with(&self.bin, &all, VIRSH_TIMEOUT, |c| {
            c.env("LC_ALL", "C");
        });
        match r.status {
            Some(st) if st.success() => Ok(r.stdout),
            Some(st) => Err(format!(
                "`{}` failed ({st}):\n{}{}",
                r.command, r.stdout, r.stderr
            )),
            None => Err(format!(
                "`{}` did not finish within {VIRSH_TIMEOUT:?}:\n{}{}",
                r.command, r.stdout, r.stderr
            )),
        }
    }

    /// [`Virsh::run`], panicking on failure.
    #[track_caller]
    pub fn check(&self, args: &[&str]) -> String {
        self.run(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }
}

/// A private libvirtd (see the module documentation). Killed on drop, with any QEMU it
/// still runs.
pub struct Libvirtd {
    daemon: Daemon,
    virsh: Virsh,
    // Last: removed once the daemon is gone.
    root: TempDir,
}

impl Libvirtd {
    /// Starts the daemon and waits for its socket. Panics, saying what to install, if
    /// libvirt is not installed.
    pub fn start() -> Libvirtd {
        let libvirtd = find_program("libvirtd").unwrap_or_else(|| panic!("{INSTALL_HINT}"));
        let virsh = find_program("virsh").unwrap_or_else(|| panic!("{INSTALL_HINT}"));
        for d in BOUND {
            assert!(Path::new(d).is_dir(), "{d} does not exist: {INSTALL_HINT}");
        }
        let root = TempDir::new("vubd-libvirt");
        for d in ["etc", "run", "lib", "log"] {
            std::fs::create_dir(root.join(d))
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", root.join(d).display()));
        }
        std::fs::write(root.join("etc/libvirtd.conf"), LIBVIRTD_CONF).expect("libvirtd.conf");
        std::fs::write(root.join("etc/qemu.conf"), QEMU_CONF).expect("qemu.conf");
        let cache = guest::target_dir()
            .map(|t| t.join("libvirt-cache"))
            .unwrap_or_else(|_| root.join("cache"));
        std::fs::create_dir_all(&cache)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", cache.display()));
        let socket = root.join("run/libvirt/libvirt-sock");
        let args: Vec<String> = vec![
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            "--".into(),
            "sh".into(),
            "-c".into(),
            NAMESPACE_SCRIPT.into(),
            "sh".into(),
            root.path().display().to_string(),
            cache.display().to_string(),
            libvirtd.display().to_string(),
        ];
        let unshare = find_program("unshare").expect("unshare (util-linux) not found");
        let daemon = Daemon::try_start(&unshare, &args, std::slice::from_ref(&socket))
            .unwrap_or_else(|e| panic!("libvirtd: {e}"));
        let d = Libvirtd {
            daemon,
            virsh: Virsh {
                bin: virsh,
                uri: format!("qemu:///system?socket={}", socket.display()),
            },
            root,
        };
        // The socket exists; it accepts once libvirtd listens (/proc/net/unix cannot
        // tell: it shows the path inside the daemon's namespace).
        let deadline = Instant::now() + START_TIMEOUT;
        while let Err(e) = std::os::unix::net::UnixStream::connect(&socket) {
            if Instant::now() > deadline {
                panic!(
                    "libvirtd does not accept on {}: {e}\n{}",
                    socket.display(),
                    d.failure_context()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub fn virsh(&self) -> &Virsh {
        &self.virsh
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// The daemon's log (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("log/libvirtd.log")).unwrap_or_default()
    }

    /// The names of the domains libvirt knows (running or not).
    pub fn domains(&self) -> Vec<String> {
        self.virsh
            .check(&["list", "--all", "--name"])
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    /// Defines the domain for the guest `s` describes ([`domain_xml`], also written to
    /// `<guest dir>/domain.xml`) and starts it; for [`guest::Guest::boot_external`].
    pub fn start_domain(&self, s: &ExternalStart) -> Box<dyn ExternalQemu> {
        for p in [&s.images.kernel, &s.images.initrd, &s.console.to_path_buf()]
            .into_iter()
            .chain(s.opts.disks.iter().map(|d| &d.socket))
        {
            assert!(
                [
                    "/run",
                    "/etc/libvirt",
                    "/var/lib/libvirt",
                    "/var/log/libvirt"
                ]
                .iter()
                .all(|h| !p.starts_with(h)),
                "{}: libvirtd's own directories hide this path from QEMU",
                p.display()
            );
        }
        let name = crate::unique_name(&format!(
            "vubd-{}",
            s.opts
                .name
                .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
        ));
        let xml = domain_xml(&name, s);
        let file = s.dir.join("domain.xml");
        std::fs::write(&file, &xml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
        let file = file.display().to_string();
        if let Err(e) = self.virsh.run(&["define", &file]) {
            panic!("{e}\ndomain XML:\n{xml}\n{}", self.failure_context());
        }
        let mut dom = Domain {
            virsh: self.virsh.clone(),
            log: self.root.path().join(format!("log/qemu/{name}.log")),
            name,
            pid: 0,
            exited: None,
        };
        if let Err(e) = self.virsh.run(&["start", &dom.name]) {
            let qemu_log = std::fs::read_to_string(&dom.log).unwrap_or_default();
            panic!(
                "{e}\nQEMU's log ({}):\n{qemu_log}\n{}",
                dom.log.display(),
                self.failure_context()
            );
        }
        let pidfile = self
            .root
            .path()
            .join(format!("run/libvirt/qemu/{}.pid", dom.name));
        dom.pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "domain {} started, but {} holds no QEMU pid",
                    dom.name,
                    pidfile.display()
                )
            });
        Box::new(dom)
    }

    /// Hot-plugs `d` into the running `domain` as its disk `i` ([`disk_xml`]; `virsh
    /// attach-device --live`).
    pub fn attach_disk(&self, domain: &str, i: usize, d: &GuestDisk) {
        let file = self.disk_file(domain, i, d);
        self.virsh
            .run(&["attach-device", domain, &file, "--live"])
            .unwrap_or_else(|e| panic!("{e}\n{}", self.failure_context()));
    }

    /// Unplugs the disk [`Libvirtd::attach_disk`] added (`virsh detach-device --live`);
    /// the guest may take a moment to let it go.
    pub fn detach_disk(&self, domain: &str, i: usize, d: &GuestDisk) {
        let file = self.disk_file(domain, i, d);
        self.virsh
            .run(&["detach-device", domain, &file, "--live"])
            .unwrap_or_else(|e| panic!("{e}\n{}", self.failure_context()));
    }

    /// Writes [`disk_xml`] into the daemon's directory; returns the file's path.
    fn disk_file(&self, domain: &str, i: usize, d: &GuestDisk) -> String {
        let file = self.root.path().join(format!("{domain}-disk{i}.xml"));
        std::fs::write(&file, disk_xml(i, d))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
        file.display().to_string()
    }

    /// Stops the daemon with SIGTERM; returns its exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.daemon.terminate()
    }

    /// The daemon's stderr and log, for failure messages.
    pub fn failure_context(&self) -> String {
        format!(
            "libvirtd: {}\nits stderr:\n{}\nits log ({}):\n{}",
            self.daemon.command_line(),
            self.daemon.stderr(),
            self.root.join("log/libvirtd.log").display(),
            self.log()
        )
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        // QEMUs still running (a test failed before its guest was gone) are not the
        // daemon's children: they would outlive it.
        let dir = self.root.join("run/libvirt/qemu");
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.path().extension() != Some(std::ffi::OsStr::new("pid")) {
                continue;
            }
            let Some(pid) = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if process_alive(pid as u32) && String::from_utf8_lossy(&cmdline).contains("qemu") {
                // SAFETY: kill(2) has no memory-safety preconditions; the pid is a QEMU
                // of this daemon's (its pid file, and the process is alive and is QEMU).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- libvirtd (failing test) ---\n{}",
                self.failure_context()
            );
        }
    }
}

/// A domain of a [`Libvirtd`], running the guest's QEMU. Undefined on drop.
pub struct Domain {
    virsh: Virsh,
    name: String,
    pid: u32,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Domain {
    /// How QEMU ended, from libvirt's reason once it has recorded the exit: `shut off
    /// (shutdown)` (the guest powered off, QEMU exits 0) reads as exit status 0,
    /// `shut off (destroyed)` as killed by SIGKILL, anything else as exit status 1.
    fn stopped_status(&self) -> ExitStatus {
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let state = self.virsh.run(&["domstate", "--reason", &self.name]);
            match state.as_deref().map(str::trim) {
                Ok("shut off (shutdown)") => return ExitStatus::from_raw(0),
                Ok("shut off (destroyed)") => return ExitStatus::from_raw(libc::SIGKILL),
                Ok(s) if s.starts_with("shut off") => return ExitStatus::from_raw(1 << 8),
                _ if Instant::now() > deadline => return ExitStatus::from_raw(1 << 8),
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl ExternalQemu for Domain {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() && !process_alive(self.pid) {
            self.exited = Some(self.stopped_status());
        }
        self.exited
    }

    fn kill(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        let r = self.virsh.run(&["destroy", &self.name]);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while process_alive(self.pid) {
            if Instant::now() > deadline {
                // SAFETY: kill(2) has no memory-safety preconditions; the pid is this
                // domain's QEMU, still alive.
                unsafe {
                    libc::kill(self.pid as i32, libc::SIGKILL);
                }
                eprintln!("virsh destroy {} left QEMU running: {r:?}", self.name);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.try_wait();
    }

    fn describe(&self) -> String {
        format!(
            "libvirt domain {} (virsh -c '{}'), QEMU pid {}",
            self.name,
            self.virsh.uri(),
            self.pid
        )
    }

    fn log(&self) -> PathBuf {
        self.log.clone()
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        if let Err(e) = self.virsh.run(&["undefine", &self.name]) {
            eprintln!("domain {}: {e}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::xml_escape;

    #[test]
    fn xml_escape_escapes_markup_and_quotes() {
        assert_eq!(
            xml_escape("/tmp/a&b/<c>'d\"e"),
            "/tmp/a&amp;b/&lt;c&gt;&apos;d&quot;e"
        );
        assert_eq!(xml_escape("plain/path.sock"), "plain/path.sock");
    }
}

//! Deployment: sockets handed over as file descriptors (`addr.type=fd`, systemd
//! socket activation), `--daemonize` and `-T` trace events, each driven through a
//! real libblkio frontend.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vubd_tests::{
    pass_fd, run_to_exit_with, vubd_bin, Client, Daemon, Qmp, Rng, TempDir, TempImage, MIB,
};

/// Writes a random pattern through a libblkio client on `sock` and reads it back.
fn io_round_trip(sock: &Path) {
    let mut client = Client::connect(sock, 1);
    let mut data = vec![0u8; 64 * 1024];
    Rng::with_seed(7).fill(&mut data);
    client.q().write(MIB, &data).expect("write");
    client.q().flush().expect("flush");
    assert_eq!(client.q().read(MIB, data.len()).expect("read"), data);
}

fn export_args(img: &TempImage, addr: &str) -> Vec<String> {
    [
        "--blockdev".to_string(),
        format!("file,node-name=f,filename={}", img.path().display()),
        "--blockdev".into(),
        "raw,node-name=d,file=f".into(),
        "--export".into(),
        format!("vhost-user-blk,id=e,node-name=d,writable=on,{addr}"),
    ]
    .to_vec()
}

#[test]
fn inherited_listening_socket_serves_io() {
    let dir = TempDir::new("vubd-fd");
    let img = TempImage::new(16 * MIB);
    let sock = dir.join("exp.sock");
    // The test listens, as systemd or a sandbox would; vubd gets the descriptor as 3.
    let listener = UnixListener::bind(&sock).unwrap();
    let mut args = export_args(&img, "addr.type=fd,addr.str=3");
    let qmp_sock = dir.join("qmp.sock");
    args.extend([
        "--chardev".into(),
        format!("socket,id=m,path={},server=on,wait=off", qmp_sock.display()),
        "--monitor".into(),
        "m".into(),
    ]);
    let fd = listener.as_raw_fd();
    let mut daemon =
        Daemon::try_start_with(&vubd_bin(), &args, std::slice::from_ref(&qmp_sock), |cmd| {
            pass_fd(cmd, fd, 3)
        })
        .unwrap();
    io_round_trip(&sock);
    let mut qmp = Qmp::connect(&qmp_sock);
    let exports = qmp.ok("query-block-exports", serde_json::json!({}));
    assert_eq!(exports[0]["id"], "e", "{exports}");
    daemon.terminate();
    // vubd did not create the socket file, so it leaves it alone.
    assert!(sock.exists(), "vubd removed a socket path it was not given");
    // The socket still listens (it is shared with whoever passed it): a restarted
    // vubd serves it again, as after `systemctl restart` with socket activation.
    let mut daemon =
        Daemon::try_start_with(&vubd_bin(), &args, std::slice::from_ref(&qmp_sock), |cmd| {
            pass_fd(cmd, fd, 3)
        })
        .unwrap();
    io_round_trip(&sock);
    // Removing the export leaves the socket listening too.
    let mut qmp = Qmp::connect(&qmp_sock);
    qmp.ok("block-export-del", serde_json::json!({"id": "e"}));
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
    daemon.terminate();
}

#[test]
fn inherited_socket_through_qmp_and_nbd_server() {
    let dir = TempDir::new("vubd-fd-qmp");
    let img = TempImage::new(16 * MIB);
    let sock = dir.join("late.sock");
    let nbd_sock = dir.join("nbd.sock");
    let qmp_sock = dir.join("qmp.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let nbd_listener = UnixListener::bind(&nbd_sock).unwrap();
    let (fd, nbd_fd) = (listener.as_raw_fd(), nbd_listener.as_raw_fd());
    let args: Vec<String> = [
        "--chardev".to_string(),
        format!("socket,id=m,path={},server=on,wait=off", qmp_sock.display()),
        "--monitor".into(),
        "m".into(),
        "--blockdev".into(),
        format!("file,node-name=f,filename={}", img.path().display()),
    ]
    .to_vec();
    let mut daemon =
        Daemon::try_start_with(&vubd_bin(), &args, std::slice::from_ref(&qmp_sock), |cmd| {
            pass_fd(cmd, fd, 3);
            pass_fd(cmd, nbd_fd, 4);
        })
        .unwrap();
    let mut qmp = Qmp::connect(&qmp_sock);
    // A descriptor that is not a socket, one the daemon did not inherit, a name
    // nobody passed: QEMU's texts.
    for (s, expected) in [
        ("1", "File descriptor '1' is not a socket"),
        ("999", "File descriptor '999' is not a socket"),
        ("nope", "File descriptor named 'nope' has not been found"),
    ] {
        let e = qmp
            .execute(
                "block-export-add",
                serde_json::json!({"type": "vhost-user-blk", "id": "x", "node-name": "f",
                    "addr": {"type": "fd", "str": s}}),
            )
            .unwrap_err();
        assert!(e.desc.contains(expected), "{s}: {}", e.desc);
    }
    qmp.ok(
        "block-export-add",
        serde_json::json!({"type": "vhost-user-blk", "id": "e", "node-name": "f",
            "writable": true, "addr": {"type": "fd", "str": "3"}}),
    );
    io_round_trip(&sock);
    // Claimed once: a second export cannot take the same descriptor.
    let e = qmp
        .execute(
            "block-export-add",
            serde_json::json!({"type": "vhost-user-blk", "id": "e2", "node-name": "f",
                "addr": {"type": "fd", "str": "3"}}),
        )
        .unwrap_err();
    assert!(e.desc.contains("already in use"), "{}", e.desc);
    // The NBD server listens on descriptor 4 (QMP's legacy address form): qemu-img
    // reads through it.
    qmp.ok(
        "nbd-server-start",
        serde_json::json!({"addr": {"type": "fd", "data": {"str": "4"}}}),
    );
    qmp.ok(
        "block-export-add",
        serde_json::json!({"type": "nbd", "id": "n", "node-name": "f"}),
    );
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(format!("nbd+unix:///f?socket={}", nbd_sock.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], 16 * MIB, "{info}");
    daemon.terminate();
}

#[test]
fn bad_descriptors_are_refused_with_qemus_texts() {
    let dir = TempDir::new("vubd-fd-bad");
    let img = TempImage::new(MIB);
    let file = std::fs::File::open(img.path()).unwrap();
    let unbound = std::os::unix::net::UnixDatagram::unbound().unwrap();
    // A stream socket that is neither bound nor listening: listen() fails.
    let stream = socket2_unbound_stream();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cases: [(std::os::fd::RawFd, &str); 4] = [
        (file.as_raw_fd(), "File descriptor '3' is not a socket"),
        (
            stream.as_raw_fd(),
            "Failed to listen on fd socket: Invalid argument",
        ),
        (
            unbound.as_raw_fd(),
            "Failed to listen on fd socket: Operation not supported",
        ),
        (tcp.as_raw_fd(), "File descriptor '3' is not a UNIX socket"),
    ];
    for (fd, expected) in cases {
        let out = run_to_exit_with(
            &vubd_bin(),
            &export_args(&img, "addr.type=fd,addr.str=3"),
            Duration::from_secs(10),
            |cmd| pass_fd(cmd, fd, 3),
        );
        let line = out.assert_config_error(&[expected]);
        assert!(line.starts_with("vubd: --export id=e: "), "{line}");
    }
    let out = run_to_exit_with(
        &vubd_bin(),
        &export_args(&img, "addr.type=fd,addr.str=exp0"),
        Duration::from_secs(10),
        |_| {},
    );
    out.assert_config_error(&["File descriptor named 'exp0' has not been found"]);
    // The monitor's chardev too.
    let out = run_to_exit_with(
        &vubd_bin(),
        &[
            "--chardev",
            "socket,id=m,fd=3,server=on,wait=off",
            "--monitor",
            "m",
        ],
        Duration::from_secs(10),
        |cmd| pass_fd(cmd, file.as_raw_fd(), 3),
    );
    out.assert_config_error(&["chardev=m", "File descriptor '3' is not a socket"]);
    drop(dir);
}

/// An AF_UNIX stream socket, neither bound nor listening.
fn socket2_unbound_stream() -> std::os::fd::OwnedFd {
    // SAFETY: socket() returns a new descriptor or -1; the OwnedFd takes it.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        std::os::fd::FromRawFd::from_raw_fd(fd)
    }
}

/// `systemd-socket-activate` (from systemd) listens, names the sockets and execs
/// vubd with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, as a `.socket` unit does.
#[test]
fn systemd_socket_activation_by_name() {
    let activate = which("systemd-socket-activate")
        .expect("systemd-socket-activate is missing: run scripts/setup.sh (package systemd)");
    let dir = TempDir::new("vubd-sd");
    let img = TempImage::new(16 * MIB);
    let sock = dir.join("exp0.sock");
    let qmp_sock = dir.join("qmp.sock");
    let pidfile = dir.join("env");
    let mut args: Vec<String> = vec![
        "-l".into(),
        sock.display().to_string(),
        "-l".into(),
        qmp_sock.display().to_string(),
        "--fdname=exp0:qmp0".into(),
        vubd_bin().display().to_string(),
    ];
    args.extend(export_args(&img, "addr.type=fd,addr.str=exp0"));
    args.extend([
        "--chardev".into(),
        "socket,id=m,fd=qmp0,server=on,wait=off".into(),
        "--monitor".into(),
        "m".into(),
        "--pidfile".into(),
        pidfile.display().to_string(),
    ]);
    let sockets = [sock.clone(), qmp_sock.clone()];
    let mut daemon = Daemon::try_start_with(&activate, &args, &sockets, |_| {}).unwrap();
    // systemd-socket-activate waits for the first connection before it execs vubd:
    // the frontend connects to a socket nobody serves yet, as with systemd.
    io_round_trip(&sock);
    let mut qmp = Qmp::connect(&qmp_sock);
    let exports = qmp.ok("query-block-exports", serde_json::json!({}));
    assert_eq!(exports[0]["id"], "e", "{exports}");
    // Inherited descriptors are close-on-exec (the activation variables are unset
    // too, which /proc/PID/environ, a copy made at exec, cannot show).
    let pid: u32 = wait_for_file(&pidfile).trim().parse().unwrap();
    for fd in [3, 4] {
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        assert_ne!(flags & libc::O_CLOEXEC as u32, 0, "fd {fd}: {info}");
    }
    daemon.terminate();
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn wait_for_file(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if s.ends_with('\n') {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills a daemonized vubd (not our child) when the test ends, however it ends.
struct KillOnDrop(Option<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill with a pid and a valid signal number.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[test]
fn daemonize_returns_once_ready() {
    let dir = TempDir::new("vubd-daemonize");
    let img = TempImage::new(16 * MIB);
    let sock = dir.join("exp.sock");
    let pidfile = dir.join("vubd.pid");
    // Relative paths: the daemon moves to `/` but still removes them on the way out.
    let mut args = export_args(&img, "addr.type=unix,addr.path=exp.sock");
    args.extend(["--daemonize".into(), "--pidfile".into(), "vubd.pid".into()]);
    let out = Command::new(vubd_bin())
        .args(&args)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // Ready means listening: the socket and the pid file exist when the parent exits.
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid file written before the parent exits")
        .trim()
        .parse()
        .unwrap();
    let _guard = KillOnDrop(Some(pid));
    assert!(sock.exists(), "socket not there when --daemonize returned");
    // A session of its own, not led by it (it can never get a terminal), not our
    // child; standard streams on /dev/null.
    let stat_fields = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let rest = stat.rsplit_once(") ").unwrap().1.to_string();
        rest.split(' ').map(String::from).collect::<Vec<_>>()
    };
    let (daemon, me) = (stat_fields(pid as u32), stat_fields(std::process::id()));
    assert_ne!(daemon[3], me[3], "same session as the test");
    assert_ne!(daemon[3], pid.to_string(), "the daemon leads its session");
    assert_ne!(daemon[1], std::process::id().to_string());
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(target, Path::new("/dev/null"));
    }
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    assert_eq!(cwd, Path::new("/"));
    io_round_trip(&sock);
    // SAFETY: kill with the daemon's pid and a valid signal number.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!sock.exists() && !pidfile.exists());
}

#[test]
fn daemonize_reports_startup_failure() {
    let dir = TempDir::new("vubd-daemonize-fail");
    let missing = dir.join("missing.img");
    let started = Instant::now();
    let out = Command::new(vubd_bin())
        .args([
            "--daemonize",
            "--blockdev",
            &format!("file,node-name=f,filename={}", missing.display()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--blockdev node-name=f") && stderr.contains("No such file"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn trace_patterns_enable_module_logs() {
    let dir = TempDir::new("vubd-trace");
    let img = TempImage::new(16 * MIB);
    let sock = dir.join("exp.sock");
    let mut args = export_args(
        &img,
        &format!("addr.type=unix,addr.path={}", sock.display()),
    );
    args.extend([
        "-T".into(),
        "vhost_user_blk*".into(),
        "--trace".into(),
        "enable=no_such_event".into(),
    ]);
    let mut daemon =
        Daemon::try_start_with(&vubd_bin(), &args, std::slice::from_ref(&sock), |cmd| {
            // RUST_LOG alone would show warnings only.
            cmd.env("RUST_LOG", "warn");
        })
        .unwrap();
    io_round_trip(&sock);
    daemon.terminate();
    let stderr = daemon.stderr();
    assert!(
        stderr.contains(
            "vubd: --trace enable=no_such_event: warning: trace event \
                         'no_such_event' does not exist"
        ),
        "{stderr}"
    );
    // Info lines of the traced modules, and of no other.
    assert!(stderr.contains("frontend connected"), "{stderr}");
    assert!(
        !stderr.contains("vubd::control] "),
        "an untraced module logged below warn: {stderr}"
    );
    // `-T help` lists the events, one a line, as qemu-storage-daemon does.
    let out = Command::new(vubd_bin())
        .args(["-T", "help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let names = String::from_utf8(out.stdout).unwrap();
    assert!(
        names.lines().any(|l| l == "vhost_user_blk_server"),
        "{names}"
    );
    assert!(names.lines().any(|l| l == "qcow2"), "{names}");
}

/// `key=value` lines of a unit file section, in order.
fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_string())
        .collect()
}

/// configs/vubd.service, vubd.socket and vubd-qmp.socket, with the paths they name
/// moved into a scratch directory and nothing else changed: systemd-analyze accepts
/// them, and systemd-socket-activate runs the service's ExecStart with the sockets'
/// ListenStream and FileDescriptorName as systemd would.
#[test]
fn shipped_unit_files_work() {
    let activate = which("systemd-socket-activate")
        .expect("systemd-socket-activate is missing: run scripts/setup.sh (package systemd)");
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let read = |name: &str| std::fs::read_to_string(configs.join(name)).unwrap();
    let dir = TempDir::new("vubd-units");
    let img = TempImage::new(16 * MIB);
    let bin = vubd_bin().display().to_string();
    let toml_path = dir.join("vubd.toml");
    let moved = |text: &str| {
        text.replace("/usr/local/bin/vubd", &bin)
            .replace("/etc/vubd/vubd.toml", &toml_path.display().to_string())
            .replace("/run/vubd/", &format!("{}/", dir.path().display()))
            .replace("/var/lib/vubd/disk0.img", &img.path().display().to_string())
    };
    std::fs::write(&toml_path, moved(&read("socket-activated.toml"))).unwrap();
    let units = ["vubd.service", "vubd.socket", "vubd-qmp.socket"];
    for unit in units {
        std::fs::write(dir.join(unit), moved(&read(unit))).unwrap();
    }
    let analyze = which("systemd-analyze").expect("systemd-analyze is missing (package systemd)");
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .args(units.iter().map(|u| dir.join(u)))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
    let service = std::fs::read_to_string(dir.join("vubd.service")).unwrap();
    let exec: Vec<String> = unit_values(&service, "ExecStart")[0]
        .split_whitespace()
        .map(String::from)
        .collect();
    let mut args = Vec::new();
    let mut sockets = Vec::new();
    let mut names = Vec::new();
    for unit in ["vubd.socket", "vubd-qmp.socket"] {
        let text = std::fs::read_to_string(dir.join(unit)).unwrap();
        let path = PathBuf::from(&unit_values(&text, "ListenStream")[0]);
        args.extend(["-l".to_string(), path.display().to_string()]);
        names.push(unit_values(&text, "FileDescriptorName")[0].clone());
        sockets.push(path);
    }
    args.push(format!("--fdname={}", names.join(":")));
    args.extend(exec);
    let mut daemon = Daemon::try_start_with(&activate, &args, &sockets, |_| {}).unwrap();
    io_round_trip(&sockets[0]);
    let mut qmp = Qmp::connect(&sockets[1]);
    let exports = qmp.ok("query-block-exports", serde_json::json!({}));
    assert_eq!(exports[0]["id"], "exp0", "{exports}");
    daemon.terminate();
    // The sockets are systemd's: vubd leaves their files for the next start.
    assert!(sockets.iter().all(|s| s.exists()));
}

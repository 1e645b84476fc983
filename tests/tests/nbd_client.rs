//! The `nbd` driver: vubd serves a guest (here libblkio) a disk whose data lives on
//! qemu-nbd or `nbdkit memory`; data written through vubd is on the server, data on
//! the server reads back through vubd, and a server killed and restarted during I/O
//! costs no request an error (reconnect-delay). Over TLS (tls-creds): to qemu-nbd and
//! to vubd's own NBD export, with certificates of scripts/tls-certs.sh.

use blkio::ReqFlags;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vubd_tests::{assert_same_data, Client, Daemon, DaemonArgs, Rng, TempDir, TempImage, MIB};

/// A server process (qemu-nbd or nbdkit) on a UNIX socket, killed when dropped.
struct Server {
    child: Child,
}

impl Server {
    fn start(cmd: &mut Command, sock: &Path) -> Server {
        let _ = std::fs::remove_file(sock);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        wait_unix(sock, &format!("{cmd:?}"));
        Server { child }
    }

    fn qemu_nbd(img: &Path, sock: &Path) -> Server {
        Server::qemu_nbd_tls(img, sock, None)
    }

    /// qemu-nbd, with TLS when `tls` names server credentials.
    fn qemu_nbd_tls(img: &Path, sock: &Path, tls: Option<&Path>) -> Server {
        let mut cmd = Command::new("qemu-nbd");
        if let Some(dir) = tls {
            cmd.arg("--object")
                .arg(tls_object("tls0", dir, "server"))
                .args(["--tls-creds", "tls0"]);
        }
        Server::start(
            cmd.args(["-f", "raw", "-t", "-x", "disk", "--cache=writeback", "-k"])
                .arg(sock)
                .arg(img),
            sock,
        )
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something accepts connections on `sock` (the file exists from bind(2)
/// on, before listen(2)).
fn wait_unix(sock: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {sock:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// vubd with an `nbd` node on `sock` and a vhost-user-blk export of it.
fn vubd_on(dir: &TempDir, sock: &Path, export: &str, reconnect_delay: u32) -> (Daemon, PathBuf) {
    vubd_on_tls(dir, sock, export, reconnect_delay, None)
}

/// `vubd_on`, over TLS when `tls` names client credentials (the server's certificate
/// is checked for `localhost`).
fn vubd_on_tls(
    dir: &TempDir,
    sock: &Path,
    export: &str,
    reconnect_delay: u32,
    tls: Option<&Path>,
) -> (Daemon, PathBuf) {
    let vsock = dir.join("vubd.sock");
    let tls_opts = if tls.is_some() {
        r#","tls-creds":"t","tls-hostname":"localhost""#
    } else {
        ""
    };
    let node = format!(
        r#"{{"driver":"nbd","node-name":"n","server":{{"type":"unix","path":"{}"}},"export":"{export}","reconnect-delay":{reconnect_delay}{tls_opts}}}"#,
        sock.display()
    );
    let mut args = DaemonArgs::new();
    if let Some(t) = tls {
        args = args.object(&tls_object("t", t, "client"));
    }
    let args = args
        .iothread("io0")
        .blockdev(&node)
        .vhost_user_blk("n", &vsock, ",writable=on,iothread=io0")
        .build();
    (Daemon::start(&args), vsock)
}

/// The whole disk, read in pieces that fit the client's buffer.
fn read_disk(client: &mut Client, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(size as usize);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(4 * MIB);
        out.extend(client.q().read(off, n as usize).expect("read"));
        off += n;
    }
    out
}

#[test]
fn qemu_nbd_data_reads_back_and_writes_land() {
    let dir = TempDir::new("vubd-nbd");
    let mut rng = Rng::new("nbd-qemu");
    let (img, mut model) = TempImage::new_random(16 * MIB, &mut rng);
    let nsock = dir.join("qemu-nbd.sock");
    let _server = Server::qemu_nbd(img.path(), &nsock);
    let (daemon, vsock) = vubd_on(&dir, &nsock, "disk", 5);
    let mut client = Client::connect(&vsock, 1);
    assert_eq!(client.capacity(), 16 * MIB);
    // qemu-nbd does not allow multi-conn on a writable export: one connection.
    let conns = daemon
        .thread_names()
        .iter()
        .filter(|n| *n == "nbd-client")
        .count();
    assert_eq!(
        conns,
        1,
        "connections to qemu-nbd: {:?}",
        daemon.thread_names()
    );
    let got = read_disk(&mut client, 16 * MIB);
    assert_same_data("the image through qemu-nbd and vubd", &got, &model);
    for _ in 0..32 {
        let off = rng.range(0, 16 * MIB - 256 * 1024) & !511;
        let n = rng.range_usize(1, 512) * 512;
        let data = rng.bytes(n);
        client.q().write(off, &data).expect("write");
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    client.q().flush().expect("flush");
    let got = read_disk(&mut client, 16 * MIB);
    assert_same_data("written data read back", &got, &model);
    assert_same_data("the image file after the writes", &img.read_all(), &model);
}

#[test]
fn nbdkit_memory_serves_a_disk() {
    let dir = TempDir::new("vubd-nbd");
    let nsock = dir.join("nbdkit.sock");
    let _server = Server::start(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&nsock)
            .args(["memory", "32M"]),
        &nsock,
    );
    let (daemon, vsock) = vubd_on(&dir, &nsock, "", 0);
    let mut client = Client::connect(&vsock, 1);
    assert_eq!(client.capacity(), 32 * MIB);
    // nbdkit allows multi-conn: the node opens four connections (a reply thread each).
    let conns = daemon
        .thread_names()
        .iter()
        .filter(|n| *n == "nbd-client")
        .count();
    assert_eq!(
        conns,
        4,
        "connections to nbdkit: {:?}",
        daemon.thread_names()
    );
    let mut rng = Rng::new("nbd-nbdkit");
    let data = rng.bytes(4 * MIB as usize);
    client.q().write(MIB, &data).expect("write");
    assert_same_data(
        "nbdkit memory",
        &client.q().read(MIB, data.len()).expect("read"),
        &data,
    );
    client
        .q()
        .write_zeroes(2 * MIB, MIB, ReqFlags::empty())
        .expect("write zeroes");
    client.q().discard(4 * MIB, MIB).expect("discard");
    let got = client.q().read(2 * MIB, MIB as usize).expect("read");
    assert!(got.iter().all(|&b| b == 0), "zeroed range reads zeroes");
    assert!(
        client
            .q()
            .read(0, 4096)
            .expect("read")
            .iter()
            .all(|&b| b == 0),
        "never written: zeroes"
    );
}

#[test]
fn qemu_nbd_restart_during_io_costs_no_error() {
    restart_during_io(false);
}

#[test]
fn qemu_nbd_restart_during_io_over_tls_costs_no_error() {
    restart_during_io(true);
}

/// qemu-nbd killed and started again while vubd's frontend writes and reads; with
/// `tls`, every connection (the reconnection too) starts TLS.
fn restart_during_io(tls: bool) {
    let dir = TempDir::new("vubd-nbd");
    let pki = tls.then(|| make_pki(&dir, "pki"));
    let server_creds = pki.as_ref().map(|p| p.join("server"));
    let client_creds = pki.as_ref().map(|p| p.join("client"));
    let mut rng = Rng::new("nbd-restart");
    let (img, mut model) = TempImage::new_random(8 * MIB, &mut rng);
    let nsock = dir.join("qemu-nbd.sock");
    let server = Server::qemu_nbd_tls(img.path(), &nsock, server_creds.as_deref());
    let (daemon, vsock) = vubd_on_tls(&dir, &nsock, "disk", 20, client_creds.as_deref());
    let restarted = Arc::new(AtomicBool::new(false));
    let done = restarted.clone();
    let io = std::thread::spawn(move || {
        let mut client = Client::connect(&vsock, 1);
        let mut rng = Rng::new("nbd-restart-io");
        let mut after = 0u64;
        // Writes and verified reads while the server goes down and comes back, and a
        // few more once it is back.
        while after < 50 {
            if done.load(Ordering::Acquire) {
                after += 1;
            }
            let off = rng.range(0, 8 * MIB - 64 * 1024) & !511;
            let n = rng.range_usize(1, 128) * 512;
            let data = rng.bytes(n);
            client
                .q()
                .write(off, &data)
                .unwrap_or_else(|e| panic!("write at {off} failed: {e}"));
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
            let got = client
                .q()
                .read(off, data.len())
                .unwrap_or_else(|e| panic!("read at {off} failed: {e}"));
            assert_same_data("read after write", &got, &data);
        }
        client.q().flush().expect("flush");
        let all = read_disk(&mut client, 8 * MIB);
        assert_same_data("the whole disk", &all, &model);
        model
    });
    std::thread::sleep(Duration::from_millis(500));
    server.kill();
    std::thread::sleep(Duration::from_millis(700));
    let _server = Server::qemu_nbd_tls(img.path(), &nsock, server_creds.as_deref());
    restarted.store(true, Ordering::Release);
    let model = io.join().expect("I/O without errors");
    assert_same_data("the image file", &img.read_all(), &model);
    let log = daemon.stderr();
    assert!(
        log.contains("connection lost"),
        "the outage went unnoticed:\n{log}"
    );
}

#[test]
fn unreachable_server_fails_blockdev_add() {
    let dir = TempDir::new("vubd-nbd");
    let sock = dir.join("nobody.sock");
    let node = format!(
        r#"{{"driver":"nbd","node-name":"n","server":{{"type":"unix","path":"{}"}}}}"#,
        sock.display()
    );
    let args = DaemonArgs::new().blockdev(&node).build();
    let exited = vubd_tests::run_to_exit(&vubd_tests::vubd_bin(), &args, Duration::from_secs(30));
    exited.assert_config_error(&["Failed to connect to", "nobody.sock"]);
}

#[test]
fn guest_fio_verifies_through_a_qemu_nbd_restart() {
    use vubd_tests::guest::{Guest, GuestOpts};
    let dir = TempDir::new("vubd-nbd");
    let img = TempImage::new(64 * MIB);
    let nsock = dir.join("qemu-nbd.sock");
    let server = Server::qemu_nbd(img.path(), &nsock);
    let (daemon, vsock) = vubd_on(&dir, &nsock, "disk", 30);
    let mut g = Guest::boot(&GuestOpts::new("nbd-fio").disk(&vsock, 1));
    // qemu-nbd is gone when fio starts, and comes back while fio's first requests
    // wait for it.
    server.kill();
    let img_path = img.path().to_path_buf();
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(2500));
        Server::qemu_nbd(&img_path, &nsock)
    });
    let out = g.check(
        "fio --name=nbd --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite \
         --bs=4k --size=48M --iodepth=8 --verify=crc32c --verify_fatal=1 --do_verify=1 \
         --eta=never",
        Duration::from_secs(300),
    );
    let _server = restarter.join().expect("restart qemu-nbd");
    assert!(out.contains("err= 0"), "fio reported an error:\n{out}");
    assert!(
        !out.contains("verify: bad") && !out.contains("verify failed"),
        "fio printed verification failures:\n{out}"
    );
    let dmesg = g.dmesg();
    assert!(
        !dmesg.contains("I/O error"),
        "the guest saw I/O errors:\n{dmesg}"
    );
    let log = daemon.stderr();
    assert!(
        log.contains("connection lost"),
        "the outage went unnoticed:\n{log}"
    );
    g.shutdown();
}

/// A CA with server and client certificates (scripts/tls-certs.sh) under `dir/name`.
fn make_pki(dir: &TempDir, name: &str) -> PathBuf {
    let pki = dir.join(name);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/tls-certs.sh");
    vubd_tests::tools::run_ok(Command::new(script).arg(&pki));
    pki
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("address").port()
}

/// Waits until something listens on 127.0.0.1:`port`.
fn wait_tcp(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn tls_object(id: &str, dir: &Path, endpoint: &str) -> String {
    format!(
        "tls-creds-x509,id={id},dir={},endpoint={endpoint}",
        dir.display()
    )
}

/// Reads the whole disk through vubd, writes through it, and checks both against
/// `model` and the file that holds the data at the far end.
fn check_disk(vsock: &Path, size: u64, model: &mut [u8], backing: &TempImage, rng: &mut Rng) {
    let mut client = Client::connect(vsock, 1);
    assert_eq!(client.capacity(), size);
    assert_same_data("the image over TLS", &read_disk(&mut client, size), model);
    for _ in 0..16 {
        let off = rng.range(0, size - 256 * 1024) & !511;
        let n = rng.range_usize(1, 512) * 512;
        let data = rng.bytes(n);
        client.q().write(off, &data).expect("write");
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    client.q().flush().expect("flush");
    assert_same_data("written over TLS", &read_disk(&mut client, size), model);
    assert_same_data("the image file", &backing.read_all(), model);
}

#[test]
fn tls_to_qemu_nbd_and_to_a_vubd_export() {
    let dir = TempDir::new("vubd-nbd-tls");
    let pki = make_pki(&dir, "pki");
    let mut rng = Rng::new("nbd-tls");

    // qemu-nbd with TLS on 127.0.0.1: the node's host is the certificate's name.
    let (img, mut model) = TempImage::new_random(8 * MIB, &mut rng);
    let port = free_port();
    let child = Command::new("qemu-nbd")
        .arg("--object")
        .arg(tls_object("tls0", &pki.join("server"), "server"))
        .args([
            "--tls-creds",
            "tls0",
            "-f",
            "raw",
            "-t",
            "-e",
            "8",
            "-x",
            "disk",
        ])
        .args(["-b", "127.0.0.1", "-p", &port.to_string()])
        .arg(img.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    let _qemu_nbd = Server { child };
    wait_tcp(port, "qemu-nbd");
    let vsock = dir.join("a.sock");
    let node = format!(
        r#"{{"driver":"nbd","node-name":"n","server":{{"type":"inet","host":"127.0.0.1","port":"{port}"}},"export":"disk","tls-creds":"t"}}"#
    );
    let args = DaemonArgs::new()
        .object(&tls_object("t", &pki.join("client"), "client"))
        .iothread("io0")
        .blockdev(&node)
        .vhost_user_blk("n", &vsock, ",writable=on,iothread=io0")
        .build();
    let _a = Daemon::start(&args);
    check_disk(&vsock, 8 * MIB, &mut model, &img, &mut rng);

    // vubd's TLS export on a UNIX socket, and a vubd whose nbd node reaches it
    // (tls-hostname: a UNIX socket has no host name).
    let (img2, mut model2) = TempImage::new_random(8 * MIB, &mut rng);
    let nsock = dir.join("nbd.sock");
    let server_args = DaemonArgs::new()
        .object(&tls_object("s", &pki.join("server"), "server"))
        .file_raw("d", &img2, "", "")
        .arg("--nbd-server")
        .arg(&format!(
            "addr.type=unix,addr.path={},tls-creds=s",
            nsock.display()
        ))
        .export("nbd,id=e,node-name=d,name=disk,writable=on")
        .build();
    let _server = Daemon::start(&server_args);
    wait_unix(&nsock, "vubd's NBD server");
    let vsock2 = dir.join("c.sock");
    let node = format!(
        r#"{{"driver":"nbd","node-name":"n","server":{{"type":"unix","path":"{}"}},"export":"disk","tls-creds":"t","tls-hostname":"localhost"}}"#,
        nsock.display()
    );
    let args = DaemonArgs::new()
        .object(&tls_object("t", &pki.join("client"), "client"))
        .iothread("io0")
        .blockdev(&node)
        .vhost_user_blk("n", &vsock2, ",writable=on,iothread=io0")
        .build();
    let _c = Daemon::start(&args);
    check_disk(&vsock2, 8 * MIB, &mut model2, &img2, &mut rng);
}

#[test]
fn tls_failures_fail_blockdev_add_clearly() {
    let dir = TempDir::new("vubd-nbd-tls");
    let pki = make_pki(&dir, "pki");
    let other = make_pki(&dir, "other");
    let img = TempImage::new(4 * MIB);
    let nsock = dir.join("nbd.sock");
    let server_args = DaemonArgs::new()
        .object(&tls_object("s", &pki.join("server"), "server"))
        .file_raw("d", &img, "", "")
        .arg("--nbd-server")
        .arg(&format!(
            "addr.type=unix,addr.path={},tls-creds=s",
            nsock.display()
        ))
        .export("nbd,id=e,node-name=d,name=disk")
        .build();
    let _server = Daemon::start(&server_args);
    wait_unix(&nsock, "vubd's NBD server");
    let client = |creds: Option<&Path>, extra: &str, mentions: &[&str]| {
        let node = format!(
            r#"{{"driver":"nbd","node-name":"n","server":{{"type":"unix","path":"{}"}},"export":"disk"{extra}}}"#,
            nsock.display()
        );
        let mut a = DaemonArgs::new();
        if let Some(c) = creds {
            a = a.object(&tls_object("t", c, "client"));
        }
        let args = a.blockdev(&node).build();
        let exited =
            vubd_tests::run_to_exit(&vubd_tests::vubd_bin(), &args, Duration::from_secs(30));
        exited.assert_config_error(mentions);
    };
    let hostname = r#","tls-creds":"t","tls-hostname":"localhost""#;
    // A CA that did not sign the server's certificate.
    client(
        Some(&other.join("client")),
        hostname,
        &[
            "TLS handshake failed",
            "The certificate hasn't got a known issuer",
        ],
    );
    // A name the certificate does not carry.
    client(
        Some(&pki.join("client")),
        r#","tls-creds":"t","tls-hostname":"example.com""#,
        &["Certificate does not match the hostname example.com"],
    );
    // No host name to check the certificate against (a UNIX socket).
    client(
        Some(&pki.join("client")),
        r#","tls-creds":"t""#,
        &["No hostname for certificate validation"],
    );
    // Plain NBD to a server that requires TLS.
    client(
        None,
        "",
        &["TLS negotiation required before option 8 (structured reply)"],
    );
    // Credentials that do not exist.
    client(None, hostname, &["No TLS credentials with id 't'"]);
}

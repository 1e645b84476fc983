//! Bad configuration: exit status 1 and a one-line message on stderr naming the culprit,
//! before serving (no socket left behind); image locking against a second daemon.

use std::path::Path;
use std::time::Duration;
use vubd_tests::{
    qsd_bin, run_to_exit, simple_file_export, unique_name, vubd_bin, Client, Daemon, DaemonArgs,
    Exited, TempDir, TempImage, MIB,
};

const TIMEOUT: Duration = Duration::from_secs(10);

fn run(args: &[String]) -> Exited {
    run_to_exit(&vubd_bin(), args, TIMEOUT)
}

/// Expect a config error mentioning all of `mentions`, and no socket left at `sock`.
#[track_caller]
fn expect_error(args: &[String], sock: &Path, mentions: &[&str]) -> String {
    let out = run(args);
    let line = out.assert_config_error(mentions);
    assert!(
        !sock.exists(),
        "socket {} exists after a configuration error (served before validating?)",
        sock.display()
    );
    eprintln!("ok: {line}");
    line
}

struct Env {
    dir: TempDir,
    img: TempImage,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: TempDir::new("vubd-t"),
            img: TempImage::new(4 * MIB),
        }
    }
    fn sock(&self) -> std::path::PathBuf {
        self.dir.join("vubd.sock")
    }
    fn args_with_export(&self, export_extra: &str) -> Vec<String> {
        simple_file_export(&self.img, &self.sock(), 1, "", export_extra)
    }
}

#[test]
fn unknown_export_option() {
    let e = Env::new();
    expect_error(
        &e.args_with_export(",bogus-option=1"),
        &e.sock(),
        &["bogus-option"],
    );
}

#[test]
fn unknown_blockdev_option() {
    let e = Env::new();
    let args = simple_file_export(&e.img, &e.sock(), 1, ",frobnicate=on", "");
    expect_error(&args, &e.sock(), &["frobnicate"]);
}

#[test]
fn unknown_command_line_option() {
    let e = Env::new();
    let mut args = e.args_with_export("");
    args.push("--bogus-flag".into());
    expect_error(&args, &e.sock(), &["bogus-flag"]);
}

#[test]
fn unknown_driver() {
    let e = Env::new();
    let args = DaemonArgs::new()
        .blockdev("driver=nosuchdriver,node-name=disk0")
        .vhost_user_blk("disk0", &e.sock(), ",writable=on")
        .build();
    expect_error(&args, &e.sock(), &["nosuchdriver"]);
}

#[test]
fn missing_image_file() {
    let dir = TempDir::new("vubd-t");
    let sock = dir.join("vubd.sock");
    let missing = format!("/dev/shm/{}-missing.img", unique_name("vubd-test"));
    let args = DaemonArgs::new()
        .blockdev(&format!(
            "driver=file,node-name=file0,filename={missing},cache.direct=off"
        ))
        .blockdev("driver=raw,node-name=disk0,file=file0")
        .vhost_user_blk("disk0", &sock, ",writable=on")
        .build();
    expect_error(&args, &sock, &[&missing]);
}

#[test]
fn node_name_clash() {
    let e = Env::new();
    let img2 = TempImage::new(MIB);
    let args = DaemonArgs::new()
        .blockdev(&format!(
            "driver=file,node-name=dup0,filename={},cache.direct=off",
            e.img.path_str()
        ))
        .blockdev(&format!(
            "driver=file,node-name=dup0,filename={},cache.direct=off",
            img2.path_str()
        ))
        .vhost_user_blk("dup0", &e.sock(), ",writable=on")
        .build();
    expect_error(&args, &e.sock(), &["dup0"]);
}

#[test]
fn export_names_missing_node() {
    let e = Env::new();
    let args = DaemonArgs::new()
        .file_raw("disk0", &e.img, "", "")
        .vhost_user_blk("nosuchnode", &e.sock(), ",writable=on")
        .build();
    expect_error(&args, &e.sock(), &["nosuchnode"]);
}

#[test]
fn export_names_missing_iothread() {
    let e = Env::new();
    let args = DaemonArgs::new()
        .file_raw("disk0", &e.img, "", "")
        .vhost_user_blk("disk0", &e.sock(), ",writable=on,iothread=nosuchthread")
        .build();
    expect_error(&args, &e.sock(), &["nosuchthread"]);
}

#[test]
fn bad_logical_block_size() {
    let e = Env::new();
    expect_error(
        &e.args_with_export(",logical-block-size=1000"),
        &e.sock(),
        &["logical-block-size"],
    );
}

#[test]
fn bad_num_queues() {
    let e = Env::new();
    let args = DaemonArgs::new()
        .file_raw("disk0", &e.img, "", "")
        .vhost_user_blk("disk0", &e.sock(), ",writable=on,num-queues=0")
        .build();
    expect_error(&args, &e.sock(), &["num-queues"]);
}

#[test]
fn duplicate_export_id() {
    let e = Env::new();
    let sock2 = e.dir.join("vubd2.sock");
    let img2 = TempImage::new(MIB);
    let args = DaemonArgs::new()
        .file_raw("disk0", &e.img, "", "")
        .file_raw("disk1", &img2, "", "")
        .export(&format!(
            "type=vhost-user-blk,id=sameid,node-name=disk0,addr.type=unix,addr.path={}",
            e.sock().display()
        ))
        .export(&format!(
            "type=vhost-user-blk,id=sameid,node-name=disk1,addr.type=unix,addr.path={}",
            sock2.display()
        ))
        .build();
    expect_error(&args, &e.sock(), &["sameid"]);
    assert!(!sock2.exists());
}

#[test]
fn raw_window_beyond_file() {
    let e = Env::new();
    let args = DaemonArgs::new()
        .file_raw(
            "disk0",
            &e.img,
            "",
            &format!(",offset={},size={}", 3 * MIB, 2 * MIB),
        )
        .vhost_user_blk("disk0", &e.sock(), ",writable=on")
        .build();
    expect_error(&args, &e.sock(), &[]);
}

#[test]
fn writable_export_of_read_only_node() {
    let e = Env::new();
    let args = DaemonArgs::new()
        .file_raw("disk0", &e.img, ",read-only=on", ",read-only=on")
        .vhost_user_blk("disk0", &e.sock(), ",writable=on")
        .build();
    expect_error(&args, &e.sock(), &[]);
}

#[test]
fn missing_config_file() {
    let dir = TempDir::new("vubd-t");
    let cfg = dir.join("nonexistent.toml");
    let args = vec!["--config".to_string(), cfg.display().to_string()];
    expect_error(&args, &dir.join("x.sock"), &[&cfg.display().to_string()]);
}

#[test]
fn socket_in_use_by_another_daemon() {
    let e = Env::new();
    let mut first = Daemon::start(&e.args_with_export(""));
    let img2 = TempImage::new(MIB);
    let args = simple_file_export(&img2, &e.sock(), 1, "", "");
    let out = run(&args);
    let line = out.assert_config_error(&[]);
    let sock = e.sock().display().to_string();
    assert!(
        line.contains(&sock) || line.contains("addr.path"),
        "error does not name the socket path or addr.path: {line}"
    );
    // The first daemon still owns and serves the socket.
    first.assert_running("first daemon after the clash");
    assert!(
        e.sock().exists(),
        "the second daemon removed the first one's socket"
    );
    let mut c = Client::connect(first.socket(), 1);
    c.q()
        .write(0, &[7u8; 4096])
        .expect("first daemon still serves");
    assert_eq!(c.q().read(0, 4096).expect("read"), vec![7u8; 4096]);
}

#[test]
fn image_locked_by_another_vubd() {
    let e = Env::new();
    let mut first = Daemon::start(&e.args_with_export(""));
    let sock2 = e.dir.join("second.sock");
    let args = simple_file_export(&e.img, &sock2, 1, "", "");
    let out = run(&args);
    out.assert_config_error(&[]);
    assert!(!sock2.exists());
    first.assert_running("first daemon after the lock clash");
    let mut c = Client::connect(first.socket(), 1);
    c.q()
        .write(0, &[9u8; 512])
        .expect("first daemon still serves");

    // Read-only opens of the same image by a second daemon are a different matter: QEMU
    // refuses them too while a writer holds the image without share-rw; not tested here.
}

#[test]
fn image_locking_is_compatible_with_qemu() {
    let qsd = qsd_bin();
    if !qsd.exists() {
        eprintln!("skipped: {} not found", qsd.display());
        return;
    }
    // qemu-storage-daemon holds the image: vubd must refuse it.
    let e = Env::new();
    let mut q = Daemon::start_bin(&qsd, &e.args_with_export(""));
    let sock2 = e.dir.join("vubd.sock2");
    let out = run(&simple_file_export(&e.img, &sock2, 1, "", ""));
    out.assert_config_error(&[]);
    q.assert_running("qsd");
    drop(q);

    // vubd holds the image: qemu-storage-daemon must refuse it.
    let e = Env::new();
    let mut v = Daemon::start(&e.args_with_export(""));
    let sock2 = e.dir.join("qsd.sock");
    let out = run_to_exit(
        &qsd,
        &simple_file_export(&e.img, &sock2, 1, "", ""),
        TIMEOUT,
    );
    assert_eq!(
        out.status.and_then(|s| s.code()),
        Some(1),
        "qemu-storage-daemon opened an image vubd holds writable\nstderr: {}",
        out.stderr
    );
    v.assert_running("vubd");
}

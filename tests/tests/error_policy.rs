//! Error policies (`werror`/`rerror`) through libblkio, with failures injected by a
//! `blkdebug` node, observed through QMP (BLOCK_IO_ERROR, iostatus, `cont`).

use serde_json::json;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;
use vubd_tests::{assert_same_data, Client, Daemon, DaemonArgs, Qmp, TempDir, TempImage, MIB};

const EIO: i32 = 5;
const ENOSPC: i32 = 28;

/// A daemon with a monitor, an export `e0` of raw-over-blkdebug-over-file with the
/// given blkdebug rules and export options, and a plain second export `e1`.
struct Setup {
    daemon: Daemon,
    qmp: Qmp,
    dir: TempDir,
    img: TempImage,
    other: TempImage,
}

impl Setup {
    fn new(rules: &str, export_extra: &str) -> Setup {
        let dir = TempDir::new("vubd-errpol");
        let img = TempImage::new(16 * MIB);
        let other = TempImage::new(4 * MIB);
        let args = DaemonArgs::new()
            .monitor(&dir.join("qmp.sock"))
            .blockdev(&format!(
                "driver=file,node-name=f0,filename={}",
                img.path().display()
            ))
            .blockdev(&format!("driver=blkdebug,node-name=dbg0,image=f0{rules}"))
            .blockdev("driver=raw,node-name=d0,file=dbg0")
            .file_raw("d1", &other, "", "")
            .export(&format!(
                "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},\
                 writable=on{export_extra}",
                dir.join("e0.sock").display()
            ))
            .export(&format!(
                "type=vhost-user-blk,id=e1,node-name=d1,addr.type=unix,addr.path={},writable=on",
                dir.join("e1.sock").display()
            ))
            .build();
        let daemon = Daemon::start(&args);
        let qmp = Qmp::connect(dir.join("qmp.sock"));
        Setup {
            daemon,
            qmp,
            dir,
            img,
            other,
        }
    }

    fn sock(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }

    fn iostatus(&mut self, id: &str) -> Option<String> {
        let exports = self.qmp.ok("query-block-exports", json!({}));
        exports
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id)
            .unwrap_or_else(|| panic!("no export {id} in {exports}"))
            .get("iostatus")
            .map(|s| s.as_str().unwrap().to_string())
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes `data` at `offset` from a thread of its own; the result arrives on the
/// returned channel.
fn write_in_thread(sock: &Path, offset: u64, data: Vec<u8>) -> mpsc::Receiver<Result<(), i32>> {
    let (tx, rx) = mpsc::channel();
    let sock = sock.to_path_buf();
    std::thread::spawn(move || {
        let mut c = Client::connect(&sock, 1);
        let r = c.q().write(offset, &data);
        let _ = tx.send(r);
        // Keep the connection until the test has seen the result.
        std::thread::sleep(Duration::from_millis(200));
    });
    rx
}

#[test]
fn werror_stop_holds_the_write_until_cont() {
    let mut s = Setup::new(
        &format!(
            ",inject-error.0.event=write_aio,inject-error.0.errno={EIO},inject-error.0.once=on"
        ),
        ",werror=stop",
    );
    assert_eq!(s.iostatus("e0").as_deref(), Some("ok"));
    let data = pattern(7, 64 * 1024);
    let done = write_in_thread(&s.sock("e0.sock"), MIB, data.clone());

    let ev = s
        .qmp
        .wait_event("BLOCK_IO_ERROR", Duration::from_secs(20))
        .expect("BLOCK_IO_ERROR");
    assert_eq!(ev["data"]["node-name"], "d0");
    assert_eq!(ev["data"]["operation"], "write");
    assert_eq!(ev["data"]["action"], "stop");
    assert_eq!(ev["data"]["nospace"], false);
    assert!(ev["data"]["reason"]
        .as_str()
        .unwrap()
        .contains("Input/output error"));
    assert!(ev["timestamp"]["seconds"].as_u64().is_some());
    assert_eq!(s.iostatus("e0").as_deref(), Some("failed"));

    // The write is held, not failed.
    assert!(
        done.recv_timeout(Duration::from_millis(500)).is_err(),
        "the failed write completed while the export was stopped"
    );
    // Other exports keep serving.
    let mut other = Client::connect(s.sock("e1.sock"), 1);
    other.q().write(0, &pattern(3, 8192)).expect("write to e1");
    assert_same_data("e1", &other.q().read(0, 8192).unwrap(), &pattern(3, 8192));
    drop(other);
    // New requests on the stopped export wait too.
    let later = write_in_thread(&s.sock("e0.sock"), 4 * MIB, pattern(9, 4096));
    assert!(later.recv_timeout(Duration::from_millis(300)).is_err());

    // `cont`: the held write is retried (the once-rule is gone) and succeeds.
    s.qmp.ok("cont", json!({}));
    done.recv_timeout(Duration::from_secs(20))
        .expect("the held write did not complete after cont")
        .expect("the held write failed after cont");
    later
        .recv_timeout(Duration::from_secs(20))
        .expect("a write queued during the stop did not complete")
        .expect("a write queued during the stop failed");
    assert_eq!(s.iostatus("e0").as_deref(), Some("ok"));
    assert_same_data("image after cont", &s.img.read_at(MIB, data.len()), &data);
    assert_same_data(
        "second write",
        &s.img.read_at(4 * MIB, 4096),
        &pattern(9, 4096),
    );
    let stats = s.qmp.ok("query-blockstats", json!({}));
    let e0 = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["qdev"] == "e0")
        .unwrap();
    assert_eq!(e0["stats"]["failed_wr_operations"], 0);
    assert!(e0["stats"]["wr_operations"].as_u64().unwrap() >= 2);
    assert!(s.daemon.try_wait().is_none());
}

#[test]
fn per_export_cont_and_enospc() {
    // werror=enospc (the default): ENOSPC stops, with nospace set.
    let mut s = Setup::new(
        &format!(
            ",inject-error.0.event=write_aio,inject-error.0.errno={ENOSPC},\
             inject-error.0.once=on,inject-error.0.sector=2048"
        ),
        "",
    );
    // Writes elsewhere are not affected by the sector-bound rule.
    let mut c = Client::connect(s.sock("e0.sock"), 1);
    c.q().write(0, &pattern(1, 4096)).expect("unaffected write");
    drop(c);
    let done = write_in_thread(&s.sock("e0.sock"), 2048 * 512, pattern(5, 4096));
    let ev = s
        .qmp
        .wait_event("BLOCK_IO_ERROR", Duration::from_secs(20))
        .expect("BLOCK_IO_ERROR");
    assert_eq!(ev["data"]["action"], "stop");
    assert_eq!(ev["data"]["nospace"], true);
    assert_eq!(s.iostatus("e0").as_deref(), Some("nospace"));
    let e = s
        .qmp
        .execute("x-block-export-cont", json!({"id": "nope"}))
        .unwrap_err();
    assert_eq!(e.desc, "Export 'nope' is not found");
    s.qmp.ok("x-block-export-cont", json!({"id": "e0"}));
    done.recv_timeout(Duration::from_secs(20))
        .expect("held write after cont")
        .expect("held write failed");
    assert_same_data("image", &s.img.read_at(2048 * 512, 4096), &pattern(5, 4096));
    assert_eq!(s.iostatus("e0").as_deref(), Some("ok"));
}

#[test]
fn report_ignore_and_enospc_report_eio() {
    // rerror=report: the read error reaches the frontend; werror=ignore: the write
    // "succeeds"; werror=enospc with EIO reports.
    let mut s = Setup::new(
        &format!(
            ",inject-error.0.event=read_aio,inject-error.0.errno={EIO},inject-error.0.sector=8,\
             inject-error.1.event=write_aio,inject-error.1.errno={EIO},inject-error.1.sector=16"
        ),
        ",rerror=report,werror=ignore",
    );
    let mut c = Client::connect(s.sock("e0.sock"), 1);
    assert!(
        c.q().read(0, 8192).is_err(),
        "read of the bad sector succeeded"
    );
    c.q().read(8192, 4096).expect("read elsewhere");
    c.q()
        .write(16 * 512, &pattern(2, 4096))
        .expect("werror=ignore must complete the write successfully");
    drop(c);
    let events = s.qmp.take_events();
    let actions: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "BLOCK_IO_ERROR")
        .map(|e| (e["data"]["operation"].clone(), e["data"]["action"].clone()))
        .collect();
    assert!(
        actions.contains(&(json!("read"), json!("report"))),
        "{events:?}"
    );
    assert!(
        actions.contains(&(json!("write"), json!("ignore"))),
        "{events:?}"
    );
    // Neither can stop the export, so it has no I/O status (as QEMU's
    // iostatus_enabled).
    assert_eq!(s.iostatus("e0"), None);
    assert_eq!(s.iostatus("e1").as_deref(), Some("ok"));
    let stats = s.qmp.ok("query-blockstats", json!({}));
    let e0 = &stats.as_array().unwrap()[0];
    assert_eq!(e0["qdev"], "e0");
    assert_eq!(e0["stats"]["failed_rd_operations"], 1);
    let _ = &s.other;
}

#[test]
fn held_requests_give_up_when_the_frontend_goes() {
    // A once-rule: whether `cont` below comes before the old connection is torn down
    // (the held write retries and succeeds) or after (it gave up), the export must
    // serve the next frontend.
    let mut s = Setup::new(
        &format!(
            ",inject-error.0.event=write_aio,inject-error.0.errno={EIO},inject-error.0.once=on"
        ),
        ",werror=stop",
    );
    let sock = s.sock("e0.sock");
    // A frontend process whose write is held; then it is killed.
    let io = vubd_tests::vubd_bin().with_file_name("vubd-io");
    let mut child = std::process::Command::new(&io)
        .args(["write", "--socket", sock.to_str().unwrap()])
        .args(["--offset", "0", "--len", "4096", "--seed", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", io.display()));
    s.qmp
        .wait_event("BLOCK_IO_ERROR", Duration::from_secs(20))
        .expect("BLOCK_IO_ERROR");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the held write completed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    // The held request gave up with the frontend; after cont the export takes the
    // next frontend.
    s.qmp.ok("cont", json!({}));
    let mut c = Client::connect(&sock, 1);
    c.q().read(0, 4096).expect("read after reconnect");
    assert!(s.daemon.try_wait().is_none());
}

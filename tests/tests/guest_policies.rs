//! A real QEMU guest on vubd: the write cache mode the guest switches
//! (VIRTIO_BLK_F_CONFIG_WCE) and the error policies (`werror`/`rerror`) with
//! BLOCK_IO_ERROR, iostatus and `cont`, with failures injected by `blkdebug` or a
//! tmpfs that fills up.

use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use vubd_tests::guest::{Guest, GuestOpts, CMD_TIMEOUT};
use vubd_tests::{Daemon, DaemonArgs, Qmp, SmallTmpfs, TempDir, TempImage, MIB};

const FIO_TIMEOUT: Duration = Duration::from_secs(300);

fn monitor(args: DaemonArgs, sock: &Path) -> DaemonArgs {
    args.arg("--chardev")
        .arg(&format!(
            "socket,id=mon0,path={},server=on,wait=off",
            sock.display()
        ))
        .arg("--monitor")
        .arg("chardev=mon0")
}

/// The file node's count of host syncs (fdatasync calls and RWF_DSYNC writes).
fn host_syncs(qmp: &mut Qmp, file_node: &str) -> u64 {
    let node = qmp.node_blockstats(file_node);
    node["driver-specific"]["x-sync-operations"]
        .as_u64()
        .unwrap_or_else(|| panic!("no x-sync-operations in {node}"))
}

fn iostatus(qmp: &mut Qmp, id: &str) -> Option<String> {
    let exports = qmp.ok("query-block-exports", json!({}));
    exports
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id)
        .and_then(|e| e.get("iostatus"))
        .map(|s| s.as_str().unwrap().to_string())
}

/// Writes 64 4k blocks with O_DIRECT and no flush.
fn direct_writes(g: &mut Guest, dev: &str, seek: u64) {
    g.check(
        &format!("dd if=/dev/urandom of={dev} bs=4k count=64 seek={seek} oflag=direct 2>&1"),
        CMD_TIMEOUT,
    );
}

#[test]
fn guest_switches_the_write_cache_and_rerror_report_reaches_it() {
    let dir = TempDir::new("vubd-guest-wce");
    let (sa, sb, qs) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("qmp.sock"));
    let img_a = TempImage::new(32 * MIB);
    let img_b = TempImage::new(16 * MIB);
    let args = monitor(DaemonArgs::new(), &qs)
        .file_raw("a", &img_a, "", "")
        .vhost_user_blk("a", &sa, ",writable=on")
        // b: reads of sector 4096 fail with EIO, reported to the guest.
        .blockdev(&format!(
            "driver=file,node-name=b-file,filename={}",
            img_b.path().display()
        ))
        .blockdev(
            "driver=blkdebug,node-name=b-dbg,image=b-file,inject-error.0.event=read_aio,\
             inject-error.0.errno=5,inject-error.0.sector=4096",
        )
        .blockdev("driver=raw,node-name=b,file=b-dbg")
        .vhost_user_blk("b", &sb, ",writable=on,rerror=report");
    let mut daemon = Daemon::start(&args.build());
    let mut qmp = Qmp::connect(&qs);
    let mut g = Guest::boot(&GuestOpts::new("wce").disk(&sa, 1).disk(&sb, 1));

    // Write-back (the default): the guest sees a volatile cache, O_DIRECT writes are
    // not synced on the host.
    assert_eq!(
        g.read_file("/sys/block/vda/cache_type").trim(),
        "write back"
    );
    assert_eq!(
        g.read_file("/sys/block/vda/queue/write_cache").trim(),
        "write back"
    );
    let s0 = host_syncs(&mut qmp, "a-file");
    direct_writes(&mut g, "/dev/vda", 0);
    let s1 = host_syncs(&mut qmp, "a-file");
    assert!(
        s1 - s0 <= 2,
        "write-back: {} host syncs for 64 writes without a flush",
        s1 - s0
    );
    // A flush from the guest reaches the host.
    g.check(
        "sync /dev/vda 2>/dev/null || blockdev --flushbufs /dev/vda",
        CMD_TIMEOUT,
    );

    // The guest turns the cache off (this writes the config space's writeback byte):
    // every write is stable on the host before it completes.
    g.check(
        "echo 'write through' > /sys/block/vda/cache_type",
        CMD_TIMEOUT,
    );
    assert_eq!(
        g.read_file("/sys/block/vda/queue/write_cache").trim(),
        "write through"
    );
    let s2 = host_syncs(&mut qmp, "a-file");
    direct_writes(&mut g, "/dev/vda", 64);
    let s3 = host_syncs(&mut qmp, "a-file");
    assert!(
        s3 - s2 >= 64,
        "write-through not honoured: {} host syncs for 64 writes",
        s3 - s2
    );

    // And back to write-back.
    g.check("echo 'write back' > /sys/block/vda/cache_type", CMD_TIMEOUT);
    let s4 = host_syncs(&mut qmp, "a-file");
    direct_writes(&mut g, "/dev/vda", 128);
    let s5 = host_syncs(&mut qmp, "a-file");
    assert!(s5 - s4 <= 2, "write-back again: {} host syncs", s5 - s4);

    // rerror=report: the guest's read of the bad sector fails with an I/O error, the
    // rest of the disk reads, and the export does not stop.
    let (rc, out) = g.run(
        "dd if=/dev/vdb of=/dev/null bs=4k skip=512 count=1 iflag=direct 2>&1",
        CMD_TIMEOUT,
    );
    assert_ne!(rc, 0, "read of the failing sector succeeded: {out}");
    assert!(
        out.contains("I/O error") || out.contains("Input/output error"),
        "{out}"
    );
    g.check(
        "dd if=/dev/vdb of=/dev/null bs=4k skip=0 count=64 iflag=direct 2>&1",
        CMD_TIMEOUT,
    );
    let ev = qmp
        .wait_event("BLOCK_IO_ERROR", Duration::from_secs(10))
        .expect("BLOCK_IO_ERROR for the failed read");
    assert_eq!(ev["data"]["node-name"], "b");
    assert_eq!(ev["data"]["operation"], "read");
    assert_eq!(ev["data"]["action"], "report");
    // Not stopped (werror=enospc, the default, gives the export an I/O status).
    assert_eq!(iostatus(&mut qmp, "b-exp").as_deref(), Some("ok"));
    g.shutdown();
    assert!(daemon.try_wait().is_none(), "vubd exited");
}

/// Starts fio in the background in the guest: random 4k writes over `size_mib`, then
/// verification; its output goes to /tmp/fio-<tag>.out.
fn start_fio(g: &mut Guest, dev: &str, size_mib: u64, tag: &str) {
    g.check(
        &format!(
            "fio --name={tag} --filename={dev} --direct=1 --ioengine=libaio --rw=randwrite \
             --bs=4k --size={size_mib}M --iodepth=8 --verify=crc32c --verify_fatal=1 \
             --do_verify=1 --randseed=7 >/tmp/fio-{tag}.out 2>&1 </dev/null & \
             echo $! >/tmp/fio-{tag}.pid"
        ),
        CMD_TIMEOUT,
    );
}

fn fio_running(g: &mut Guest, tag: &str) -> bool {
    g.run(&format!("kill -0 $(cat /tmp/fio-{tag}.pid)"), CMD_TIMEOUT)
        .0
        == 0
}

/// Waits for fio to end; returns its output.
fn fio_result(g: &mut Guest, tag: &str) -> String {
    let deadline = Instant::now() + FIO_TIMEOUT;
    while fio_running(g, tag) {
        assert!(Instant::now() < deadline, "fio {tag} still running");
        std::thread::sleep(Duration::from_millis(500));
    }
    g.read_file(&format!("/tmp/fio-{tag}.out"))
}

fn assert_fio_verified(out: &str, tag: &str) {
    assert!(out.contains("err= 0"), "fio {tag} failed:\n{out}");
    assert!(!out.contains("verify:"), "fio {tag} verify errors:\n{out}");
    assert!(
        out.contains("READ:") && out.contains("WRITE:"),
        "fio {tag}:\n{out}"
    );
}

fn wait_stop_event(qmp: &mut Qmp, node: &str) -> Value {
    loop {
        let ev = qmp
            .wait_event("BLOCK_IO_ERROR", Duration::from_secs(120))
            .unwrap_or_else(|| panic!("no BLOCK_IO_ERROR for {node}"));
        if ev["data"]["node-name"] == node {
            return ev;
        }
    }
}

#[test]
fn guest_io_stops_on_errors_and_resumes_on_cont() {
    let dir = TempDir::new("vubd-guest-werror");
    let (sa, sb, qs) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("qmp.sock"));
    let img_a = TempImage::new(32 * MIB);
    // b lives on a 40 MiB tmpfs that a 24 MiB filler leaves too small for fio's 24 MiB
    // of writes.
    let small = SmallTmpfs::mount(dir.path(), 40);
    let img_b = small.dir.join("b.img");
    let filler = small.dir.join("filler");
    std::fs::File::create(&img_b)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    std::fs::write(&filler, vec![0x5au8; 24 * MIB as usize]).unwrap();

    let args = monitor(DaemonArgs::new(), &qs)
        // a: the first write fails once with EIO; werror=stop.
        .blockdev(&format!(
            "driver=file,node-name=a-file,filename={}",
            img_a.path().display()
        ))
        .blockdev(
            "driver=blkdebug,node-name=a-dbg,image=a-file,inject-error.0.event=write_aio,\
             inject-error.0.iotype=write,inject-error.0.errno=5,inject-error.0.once=on",
        )
        .blockdev("driver=raw,node-name=a,file=a-dbg")
        .vhost_user_blk("a", &sa, ",writable=on,werror=stop")
        // b: werror=enospc (the default).
        .blockdev(&format!(
            "driver=file,node-name=b-file,filename={}",
            img_b.display()
        ))
        .blockdev("driver=raw,node-name=b,file=b-file")
        .vhost_user_blk("b", &sb, ",writable=on");
    let mut daemon = Daemon::start(&args.build());
    let mut qmp = Qmp::connect(&qs);
    let mut g = Guest::boot(&GuestOpts::new("werror").disk(&sa, 1).disk(&sb, 1));

    // werror=stop with an injected EIO: the guest's writes hang, the event arrives,
    // other exports keep serving; after cont fio's verification passes.
    start_fio(&mut g, "/dev/vda", 16, "a");
    let ev = wait_stop_event(&mut qmp, "a");
    assert_eq!(ev["data"]["operation"], "write");
    assert_eq!(ev["data"]["action"], "stop");
    assert_eq!(ev["data"]["nospace"], false);
    assert_eq!(iostatus(&mut qmp, "a-exp").as_deref(), Some("failed"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        fio_running(&mut g, "a"),
        "fio ended while the export was stopped"
    );
    assert_eq!(iostatus(&mut qmp, "a-exp").as_deref(), Some("failed"));
    g.check(
        "dd if=/dev/zero of=/dev/vdb bs=4k count=16 oflag=direct 2>&1",
        CMD_TIMEOUT,
    );
    qmp.ok("cont", json!({}));
    let out = fio_result(&mut g, "a");
    assert_fio_verified(&out, "a");
    assert_eq!(iostatus(&mut qmp, "a-exp").as_deref(), Some("ok"));

    // werror=enospc on a tmpfs that fills up: the export stops with nospace; space is
    // freed; cont resumes; the written data verifies.
    start_fio(&mut g, "/dev/vdb", 24, "b");
    let ev = wait_stop_event(&mut qmp, "b");
    assert_eq!(ev["data"]["action"], "stop");
    assert_eq!(ev["data"]["nospace"], true, "{ev}");
    assert_eq!(iostatus(&mut qmp, "b-exp").as_deref(), Some("nospace"));
    assert!(
        fio_running(&mut g, "b"),
        "fio ended while the export was stopped"
    );
    // Export a still serves.
    g.check(
        "dd if=/dev/vda of=/dev/null bs=4k count=16 iflag=direct 2>&1",
        CMD_TIMEOUT,
    );
    std::fs::remove_file(&filler).unwrap();
    qmp.ok("cont", json!({}));
    let out = fio_result(&mut g, "b");
    assert_fio_verified(&out, "b");
    assert_eq!(iostatus(&mut qmp, "b-exp").as_deref(), Some("ok"));
    let stats = qmp.ok("query-blockstats", json!({}));
    for e in stats.as_array().unwrap() {
        assert_eq!(
            e["stats"]["failed_wr_operations"], 0,
            "a stopped request was failed: {e}"
        );
    }
    g.shutdown();
    assert!(daemon.try_wait().is_none(), "vubd exited");
}

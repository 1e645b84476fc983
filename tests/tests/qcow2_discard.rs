//! QEMU's `pass-discard-snapshot` and `pass-discard-other` on a served qcow2 image:
//! clusters that deleting a snapshot frees, or that overwriting compressed clusters
//! frees, are given back to the host (the file's allocated size drops) only when the
//! option is on, and only through a file node with `discard=unmap`. `qemu-img check`
//! finds the image clean and the guest data intact either way.

use serde_json::json;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use vubd_tests::{assert_same_data, Client, Daemon, DaemonArgs, Qmp, TempDir, MIB};

use vubd_tests::tools::{qemu_io, run_ok as run};

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Serves `img` with a monitor; `opts` are extra qcow2 node options.
fn serve(dir: &TempDir, img: &Path, tag: &str, opts: &str) -> (Daemon, Qmp, Client) {
    let qs = dir.join(&format!("{tag}.qmp"));
    let sock = dir.join(&format!("{tag}.sock"));
    let args = DaemonArgs::new()
        .monitor(&qs)
        .blockdev(&format!(
            "driver=file,node-name=f,filename={},discard=unmap",
            img.display()
        ))
        .blockdev(&format!("driver=qcow2,node-name=q,file=f{opts}"))
        .export(&format!(
            "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .build();
    let daemon = Daemon::start(&args);
    let q = Qmp::connect(&qs);
    let c = Client::connect(&sock, 1);
    (daemon, q, c)
}

fn check_clean(img: &Path) {
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors") && !text.contains("leaked"),
        "{}: {text}",
        img.display()
    );
}

/// A snapshot holds 8 MiB that the guest then overwrites; deleting the snapshot
/// frees those 8 MiB of host clusters.
fn snapshot_delete_space(dir: &TempDir, tag: &str, opts: &str) -> (u64, u64) {
    let img = dir.join(&format!("{tag}.qcow2"));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M"));
    qemu_io(&img, "qcow2", &["write -P 0x21 0 8M"]);
    let (mut daemon, mut q, mut c) = serve(dir, &img, tag, opts);
    q.ok(
        "blockdev-snapshot-internal-sync",
        json!({"device": "q", "name": "s1"}),
    );
    let data = vec![0x42u8; MIB as usize];
    for i in 0..8 {
        c.q().write(i * MIB, &data).expect("write");
    }
    c.q().flush().expect("flush");
    let before = allocated(&img);
    q.ok(
        "blockdev-snapshot-delete-internal-sync",
        json!({"device": "q", "name": "s1"}),
    );
    let after = allocated(&img);
    for i in 0..8 {
        assert_same_data(tag, &c.q().read(i * MIB, data.len()).unwrap(), &data);
    }
    drop(c);
    assert_eq!(daemon.terminate().code(), Some(0));
    check_clean(&img);
    (before, after)
}

#[test]
fn deleting_a_snapshot_gives_its_clusters_back_with_pass_discard_snapshot() {
    let dir = TempDir::new("vubd-qcow2-discard");
    let (before, after) = snapshot_delete_space(&dir, "on", "");
    assert!(
        before - after >= 7 * MIB,
        "default pass-discard-snapshot=on: {before} -> {after} bytes allocated"
    );
    let (before, after) = snapshot_delete_space(&dir, "off", ",pass-discard-snapshot=off");
    assert!(
        after + MIB / 2 >= before,
        "pass-discard-snapshot=off: {before} -> {after} bytes allocated"
    );
}

/// Compressed clusters overwritten by the guest are freed at the next flush;
/// with `pass-discard-other=on` their host space is given back. Returns the
/// image's allocated bytes afterwards.
fn overwrite_compressed_space(dir: &TempDir, tag: &str, opts: &str) -> u64 {
    let img = dir.join(&format!("{tag}.qcow2"));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M"));
    // Random bytes with runs: compressed to roughly half.
    let raw = dir.join(&format!("{tag}.src"));
    let mut rng = vubd_tests::Rng::new(tag);
    let pattern: Vec<u8> = (0..8 * MIB / 2)
        .flat_map(|_| {
            let b = rng.next_u64() as u8;
            [b, b]
        })
        .collect();
    std::fs::write(&raw, &pattern).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&img));
    let (mut daemon, _q, mut c) = serve(dir, &img, tag, opts);
    let data = vec![0x37u8; MIB as usize];
    for i in 0..8 {
        c.q().write(i * MIB, &data).expect("write");
    }
    c.q().flush().expect("flush");
    let after = allocated(&img);
    drop(c);
    assert_eq!(daemon.terminate().code(), Some(0));
    check_clean(&img);
    after
}

#[test]
fn overwritten_compressed_clusters_are_given_back_with_pass_discard_other() {
    let dir = TempDir::new("vubd-qcow2-discard-other");
    let on = overwrite_compressed_space(&dir, "on", ",pass-discard-other=on");
    let off = overwrite_compressed_space(&dir, "off", "");
    // About 4 MiB of compressed clusters were freed.
    assert!(
        on + 2 * MIB <= off,
        "allocated afterwards: {on} bytes with pass-discard-other=on, {off} without"
    );
}

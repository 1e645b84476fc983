//! The qcow2 tools, checked against qemu-img 7.2 both ways:
//! - `vubd img snapshot` (-l, -c, -a, -d) and the snapshots in `vubd img info`;
//! - `vubd img convert` (raw, qcow2 chains, compressed clusters with zlib and zstd);
//! - QMP `blockdev-snapshot-internal-sync` on a live export while a libblkio client
//!   writes and verifies, then the snapshots applied with qemu-img.

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vubd_tests::{assert_same_data, Client, Daemon, DaemonArgs, Qmp, TempDir, MIB};

/// Runs a command; returns (exit code, stdout, stderr).
fn output(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

use vubd_tests::tools::{qemu_img, qemu_io, run_ok as run};

fn vubd_img(args: &[&str]) -> String {
    run(Command::new(vubd_tests::vubd_bin()).arg("img").args(args))
}

/// `vubd img ARGS` that must fail: returns its stderr.
fn vubd_img_fails(args: &[&str]) -> String {
    let (rc, out, err) = output(Command::new(vubd_tests::vubd_bin()).arg("img").args(args));
    assert_ne!(rc, 0, "vubd img {args:?} succeeded:\n{out}");
    assert!(
        err.starts_with("vubd img: "),
        "vubd img {args:?}: no one-line cause:\n{err}"
    );
    err
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
}

/// The guest-visible content, as qemu-img reads it (`snapshot`: of that snapshot).
fn content(img: &Path, dir: &TempDir, snapshot: Option<&str>) -> Vec<u8> {
    let raw = dir.join("content.raw");
    let mut args = vec!["convert"];
    let l = snapshot.map(|n| format!("snapshot.name={n}"));
    if let Some(l) = &l {
        args.extend(["-l", l]);
    }
    args.extend(["-O", "raw", s(img), s(&raw)]);
    qemu_img(&args);
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    data
}

/// A daemon serving `img` (qcow2 over a file node) writable as export `e` on `sock`.
fn qcow2_export(img: &Path, sock: &Path) -> DaemonArgs {
    DaemonArgs::new()
        .blockdev(&format!("driver=file,node-name=f,filename={}", s(img)))
        .blockdev("driver=qcow2,node-name=q,file=f")
        .export(&format!(
            "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={},writable=on",
            s(sock)
        ))
}

/// `qemu-img check`: no corruptions and no leaks.
fn check_clean(img: &Path) {
    let (rc, out, err) =
        output(Command::new("qemu-img").args(["check", "-U", "--output=json", s(img)]));
    let v: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("qemu-img check ({rc}): {e}\n{out}\n{err}"));
    assert_eq!(rc, 0, "qemu-img check: {v}\n{err}");
    assert_eq!(
        v.get("corruptions").map_or(0, |c| c.as_u64().unwrap()),
        0,
        "{v}"
    );
    assert_eq!(v.get("leaks").map_or(0, |c| c.as_u64().unwrap()), 0, "{v}");
}

fn qemu_info(img: &Path) -> Value {
    serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", s(img)])).unwrap()
}

/// Snapshot names as `qemu-img info` lists them.
fn qemu_snapshot_names(img: &Path) -> Vec<String> {
    qemu_info(img)["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// `vubd img snapshot -l` prints what `qemu-img snapshot -l` prints, byte for byte,
/// and `vubd img info` the same snapshots as `qemu-img info`.
fn lists_agree(img: &Path) {
    let theirs = qemu_img(&["snapshot", "-U", "-l", s(img)]);
    let ours = vubd_img(&["snapshot", "-U", "-l", s(img)]);
    assert_eq!(ours, theirs, "snapshot -l");
    let ours: Value = serde_json::from_str(&vubd_img(&["info", "-U", "--output=json", s(img)]))
        .expect("vubd img info JSON");
    assert_eq!(ours["snapshots"], qemu_info(img)["snapshots"], "info");
    let text = vubd_img(&["info", "-U", s(img)]);
    assert!(
        text.ends_with(&theirs),
        "vubd img info:\n{text}\nqemu-img:\n{theirs}"
    );
}

#[test]
fn img_snapshot_create_list_apply_delete_agree_with_qemu_img() {
    let dir = TempDir::new("vubd-img-snap");
    let img = dir.join("s.qcow2");
    vubd_img(&["create", "-f", "qcow2", s(&img), "16M"]);
    assert_eq!(vubd_img(&["snapshot", "-l", s(&img)]), "", "no snapshots");
    qemu_io(
        &img,
        "qcow2",
        &["write -P 0xa1 0 3M", "write -P 0xa2 8M 64k"],
    );
    let a = content(&img, &dir, None);

    // vubd makes "one"; qemu-img sees it and makes "two".
    vubd_img(&["snapshot", "-c", "one", s(&img)]);
    check_clean(&img);
    qemu_io(
        &img,
        "qcow2",
        &["write -P 0xb1 1M 2M", "write -z 8M 64k", "discard 0 64k"],
    );
    let b = content(&img, &dir, None);
    qemu_img(&["snapshot", "-c", "two", s(&img)]);
    qemu_io(&img, "qcow2", &["write -P 0xc1 5M 1M"]);
    let c = content(&img, &dir, None);
    assert_eq!(qemu_snapshot_names(&img), ["one", "two"]);
    lists_agree(&img);
    assert_same_data(
        "one as qemu reads it",
        &content(&img, &dir, Some("one")),
        &a,
    );

    // Apply each tool's snapshot with the other tool.
    vubd_img(&["snapshot", "-a", "two", s(&img)]);
    check_clean(&img);
    assert_same_data("vubd applied two", &content(&img, &dir, None), &b);
    qemu_img(&["snapshot", "-a", "one", s(&img)]);
    check_clean(&img);
    assert_same_data("qemu-img applied one", &content(&img, &dir, None), &a);
    // By id: snapshot 1 is "one".
    qemu_io(&img, "qcow2", &["write -P 0xd1 0 1M"]);
    vubd_img(&["snapshot", "-a", "1", s(&img)]);
    assert_same_data("vubd applied id 1", &content(&img, &dir, None), &a);
    assert_ne!(a, c);

    // A snapshot qemu-storage-daemon takes over QMP: a host clock as VM clock, no
    // icount; listed alike.
    qsd_snapshot(&dir, &img, "by-qsd");
    lists_agree(&img);

    // Delete by name and by id, with either tool.
    vubd_img(&["snapshot", "-d", "two", s(&img)]);
    check_clean(&img);
    assert_eq!(qemu_snapshot_names(&img), ["one", "by-qsd"]);
    qemu_img(&["snapshot", "-d", "by-qsd", s(&img)]);
    vubd_img(&["snapshot", "-d", "1", s(&img)]);
    check_clean(&img);
    assert!(qemu_snapshot_names(&img).is_empty());
    assert_eq!(vubd_img(&["snapshot", "-l", s(&img)]), "");
    assert_same_data("after deletes", &content(&img, &dir, None), &a);
    let info: Value = serde_json::from_str(&vubd_img(&["info", "--output=json", s(&img)])).unwrap();
    assert!(info.get("snapshots").is_none(), "{info}");
}

/// Takes a snapshot over qemu-storage-daemon's QMP.
fn qsd_snapshot(dir: &TempDir, img: &Path, name: &str) {
    let qs = dir.join("qsd-qmp.sock");
    let sock = dir.join("qsd.sock");
    let args = DaemonArgs::new()
        .monitor(&qs)
        .blockdev(&format!("driver=file,node-name=f,filename={}", s(img)))
        .blockdev("driver=qcow2,node-name=q,file=f")
        .export(&format!(
            "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={}",
            s(&sock)
        ))
        .build();
    let mut qsd = Daemon::start_bin(&vubd_tests::qsd_bin(), &args);
    let mut q = Qmp::connect(&qs);
    q.ok(
        "blockdev-snapshot-internal-sync",
        json!({"device": "q", "name": name}),
    );
    assert_eq!(qsd.terminate().code(), Some(0));
}

#[test]
fn img_snapshot_errors_are_clear() {
    let dir = TempDir::new("vubd-img-snap-err");
    let img = dir.join("e.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "4M"]);
    vubd_img(&["snapshot", "-c", "x", s(&img)]);
    let err = vubd_img_fails(&["snapshot", "-c", "x", s(&img)]);
    assert!(
        err.contains("Could not create snapshot 'x'") && err.contains("exists"),
        "{err}"
    );
    for op in ["-a", "-d"] {
        let err = vubd_img_fails(&["snapshot", op, "nope", s(&img)]);
        assert!(
            err.contains("'nope'") && err.contains("no snapshot"),
            "{err}"
        );
    }
    let err = vubd_img_fails(&["snapshot", "-l", "-d", "x", s(&img)]);
    assert!(err.contains("cannot mix"), "{err}");
    let err = vubd_img_fails(&["snapshot", s(&img)]);
    assert!(err.contains("-l"), "{err}");
    let err = vubd_img_fails(&["snapshot", "-l", s(&dir.join("missing.qcow2"))]);
    assert!(
        err.contains("missing.qcow2") && err.contains("No such file"),
        "{err}"
    );
    // Not qcow2.
    let raw = dir.join("r.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    for args in [
        vec!["snapshot", "-l", s(&raw)],
        vec!["snapshot", "-c", "x", s(&raw)],
    ] {
        let err = vubd_img_fails(&args);
        assert!(err.contains("not a qcow2 image"), "{err}");
    }
    let err = vubd_img_fails(&["snapshot", "-f", "raw", "-l", s(&img)]);
    assert!(err.contains("raw"), "{err}");
    // An image marked corrupt is listed but not changed (qemu-img agrees).
    let bad = dir.join("corrupt.qcow2");
    std::fs::copy(&img, &bad).unwrap();
    let mut h = std::fs::read(&bad).unwrap();
    h[79] |= 2; // incompatible feature bit 1: corrupt
    std::fs::write(&bad, &h).unwrap();
    assert!(vubd_img(&["snapshot", "-l", s(&bad)]).contains(" x "));
    let err = vubd_img_fails(&["snapshot", "-c", "y", s(&bad)]);
    assert!(err.contains("corrupt"), "{err}");
    let (rc, _, _) = output(Command::new("qemu-img").args(["snapshot", "-c", "y", s(&bad)]));
    assert_ne!(rc, 0);
    // Locked by a writer: refused, as qemu-img refuses; -U lists anyway.
    let sock = dir.join("lock.sock");
    let args = qcow2_export(&img, &sock).build();
    let mut d = Daemon::start(&args);
    let err = vubd_img_fails(&["snapshot", "-c", "y", s(&img)]);
    assert!(err.contains("lock"), "{err}");
    assert!(vubd_img_fails(&["snapshot", "-l", s(&img)]).contains("lock"));
    assert!(vubd_img(&["snapshot", "-U", "-l", s(&img)]).contains(" x "));
    assert_eq!(d.terminate().code(), Some(0));
    // A read-only file (as an unprivileged user: root may write anyway).
    if is_root() && Path::new("/usr/bin/setpriv").exists() {
        let ro = dir.join("ro.qcow2");
        std::fs::copy(&img, &ro).unwrap();
        let perm = |p: &Path, mode: u32| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        perm(dir.path(), 0o755);
        perm(&ro, 0o444);
        let (rc, out, err) = output(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(vubd_tests::vubd_bin())
                .args(["img", "snapshot", "-c", "y", s(&ro)]),
        );
        assert_ne!(rc, 0, "{out}");
        assert!(err.contains("Permission denied"), "{err}");
        let (rc, out, err) = output(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(vubd_tests::vubd_bin())
                .args(["img", "snapshot", "-l", s(&ro)]),
        );
        assert_eq!(rc, 0, "{err}");
        assert!(out.contains(" x "), "{out}");
    }
    check_clean(&img);
    assert_eq!(qemu_snapshot_names(&img), ["x"]);
}

/// Whether this process runs as root.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|st| {
            st.lines()
                .find(|l| l.starts_with("Uid:"))
                .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

// ---- QMP snapshots of a live export ----------------------------------------------

const BLOCK: u64 = 4096;

/// The content of a block at a version (0: zeroes).
fn version_data(block: u64, version: u32) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK as usize];
    if version == 0 {
        return v;
    }
    for (i, chunk) in v.chunks_mut(8).enumerate() {
        let x = (block << 32 | u64::from(version)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    v
}

/// One acknowledged write, with the phase of the test when it was submitted and when
/// it completed.
#[derive(Debug, Clone, Copy)]
struct Write {
    block: u64,
    version: u32,
    submitted: u32,
    completed: u32,
}

/// The disk after the first `k` writes of `log`.
fn disk_after(blocks: u64, log: &[Write], k: usize) -> Vec<u8> {
    let mut versions = vec![0u32; blocks as usize];
    for w in &log[..k] {
        versions[w.block as usize] = w.version;
    }
    let mut out = Vec::with_capacity((blocks * BLOCK) as usize);
    for (b, &v) in versions.iter().enumerate() {
        out.extend(version_data(b as u64, v));
    }
    out
}

/// Which prefix of the write log `data` is: the snapshot must equal the disk after
/// some `k` writes, where every write completed before the command was sent is in and
/// none submitted after its reply came is.
fn snapshot_point(blocks: u64, log: &[Write], sent: u32, data: &[u8], what: &str) -> usize {
    let lo = log.iter().take_while(|w| w.completed < sent).count();
    let hi = log.iter().take_while(|w| w.submitted <= sent).count();
    let mut versions = vec![0u32; blocks as usize];
    for w in &log[..lo] {
        versions[w.block as usize] = w.version;
    }
    let holds =
        |b: u64, v: u32| data[(b * BLOCK) as usize..][..BLOCK as usize] == version_data(b, v);
    // Blocks the writes in question do not touch must hold the same for every k.
    let touched: std::collections::BTreeSet<u64> = log[lo..hi].iter().map(|w| w.block).collect();
    for b in (0..blocks).filter(|b| !touched.contains(b)) {
        assert!(
            holds(b, versions[b as usize]),
            "{what}: block {b} does not hold version {}",
            versions[b as usize]
        );
    }
    for k in lo..=hi {
        if k > lo {
            let w = log[k - 1];
            versions[w.block as usize] = w.version;
        }
        if touched.iter().all(|&b| holds(b, versions[b as usize])) {
            return k;
        }
    }
    panic!("{what}: the snapshot is not the disk after any of writes {lo}..={hi}");
}

#[test]
fn qmp_internal_snapshots_of_a_live_export() {
    let dir = TempDir::new("vubd-qmp-snap");
    let img = dir.join("live.qcow2");
    let size = 32 * MIB;
    let blocks = size / BLOCK;
    qemu_img(&["create", "-f", "qcow2", s(&img), &size.to_string()]);
    let qs = dir.join("qmp.sock");
    let sock = dir.join("e.sock");
    let args = qcow2_export(&img, &sock).monitor(&qs).build();
    let mut daemon = Daemon::start(&args);
    let mut q = Qmp::connect(&qs);

    // The writer: random 4 KiB writes, each read back now and then, against a model.
    let phase = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::<Write>::new()));
    let writer = {
        let (phase, stop, log, sock) = (phase.clone(), stop.clone(), log.clone(), sock.clone());
        let mut rng = vubd_tests::Rng::new("qmp-snapshot-writer");
        std::thread::spawn(move || {
            let mut c = Client::connect(&sock, 1);
            let mut current = vec![0u32; blocks as usize];
            let mut version = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let block = rng.range(0, blocks);
                version += 1;
                let submitted = phase.load(Ordering::SeqCst);
                c.q()
                    .write(block * BLOCK, &version_data(block, version))
                    .expect("write during snapshots");
                let completed = phase.load(Ordering::SeqCst);
                current[block as usize] = version;
                log.lock().unwrap().push(Write {
                    block,
                    version,
                    submitted,
                    completed,
                });
                if version.is_multiple_of(4) {
                    let b = rng.range(0, blocks);
                    let got = c.q().read(b * BLOCK, BLOCK as usize).expect("read");
                    assert!(
                        got == version_data(b, current[b as usize]),
                        "block {b} reads wrong during snapshots"
                    );
                }
            }
            c.q().flush().expect("flush");
            version
        })
    };
    let names = ["live-1", "live-2", "live-3"];
    let mut sent_at = Vec::new();
    for name in names {
        std::thread::sleep(Duration::from_millis(300));
        let sent = phase.fetch_add(1, Ordering::SeqCst) + 1;
        q.ok(
            "blockdev-snapshot-internal-sync",
            json!({"device": "q", "name": name}),
        );
        phase.fetch_add(1, Ordering::SeqCst);
        sent_at.push(sent);
    }
    std::thread::sleep(Duration::from_millis(200));
    let nodes = q.ok("query-named-block-nodes", json!({"flat": true}));
    let qnode = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "q")
        .unwrap();
    let listed: Vec<&str> = qnode["image"]["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, names);
    // Deleting under I/O works too.
    let gone = q.ok(
        "blockdev-snapshot-delete-internal-sync",
        json!({"device": "q", "name": "live-2"}),
    );
    assert_eq!(gone["id"], "2", "{gone}");
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().expect("the writer failed");
    assert!(
        writes > 50,
        "only {writes} writes: no I/O under the snapshots"
    );
    drop(q);
    assert_eq!(daemon.terminate().code(), Some(0));

    let log = log.lock().unwrap().clone();
    check_clean(&img);
    assert_eq!(qemu_snapshot_names(&img), ["live-1", "live-3"]);
    let end = content(&img, &dir, None);
    assert_same_data("final disk", &end, &disk_after(blocks, &log, log.len()));
    for (i, name) in names.iter().enumerate() {
        if *name == "live-2" {
            continue;
        }
        let data = content(&img, &dir, Some(name));
        let k = snapshot_point(blocks, &log, sent_at[i], &data, name);
        eprintln!("{name}: the disk after {k} of {} writes", log.len());
        // Applied with qemu-img, the disk is what it was then.
        qemu_img(&["snapshot", "-a", name, s(&img)]);
        check_clean(&img);
        assert_same_data(name, &content(&img, &dir, None), &data);
    }
}

// ---- vubd img convert --------------------------------------------------------------

/// `qemu-img check --output=json` of an image that must be clean.
fn check_json(img: &Path) -> Value {
    check_clean(img);
    let (_, out, _) =
        output(Command::new("qemu-img").args(["check", "-U", "--output=json", s(img)]));
    serde_json::from_str(&out).unwrap()
}

/// Clusters of `cluster` bytes in `data` that are not all zero.
fn nonzero_clusters(data: &[u8], cluster: usize) -> u64 {
    data.chunks(cluster)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64
}

fn compare(a: &Path, b: &Path) {
    qemu_img(&["compare", "-U", s(a), s(b)]);
}

/// A three-image chain like the one tests/tests/qcow2.rs serves: a raw base (with 64
/// KiB of random data at 13 MiB, which does not compress), a qcow2 with zeroes and
/// compressed clusters, a larger qcow2 top with unaligned writes and an area past the
/// end of its backing file.
fn chain(dir: &TempDir) -> std::path::PathBuf {
    let base = dir.join("base.raw");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-f", "raw", s(&base), "16M"]);
    qemu_io(&base, "raw", &["write -P 0x11 0 12M", "write -z 4M 2M"]);
    {
        use std::os::unix::fs::FileExt;
        let noise = vubd_tests::Rng::new("noise").bytes(65536);
        let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
        f.write_all_at(&noise, 13 * MIB).unwrap();
    }
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
        "16M",
    ]);
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0x22 1M 2M",
            "write -z 5M 1M",
            "write -c -P 0x23 8M 128k",
            "discard 9M 64k",
        ],
    );
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "24M",
    ]);
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x33 2M 64k",
            "write -P 0x44 10M 12345",
            "write -P 0x55 17M 1M",
            "write -z 0 64k",
        ],
    );
    top
}

#[test]
fn img_convert_raw_and_qcow2_agree_with_qemu_img() {
    let dir = TempDir::new("vubd-img-convert");
    let top = chain(&dir);
    let reference = content(&top, &dir, None);

    // qcow2 chain -> raw: equal, and sparse where the guest sees zeroes.
    let raw = dir.join("flat.raw");
    vubd_img(&["convert", "-f", "qcow2", "-O", "raw", s(&top), s(&raw)]);
    compare(&raw, &top);
    assert_same_data("chain -> raw", &std::fs::read(&raw).unwrap(), &reference);
    // (The file system may add a block or two of its own metadata.)
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&raw).unwrap().blocks() * 512
    };
    let data = nonzero_clusters(&reference, 4096) * 4096;
    assert!(
        allocated <= data + 64 * 1024,
        "the raw copy is not sparse: {allocated} bytes allocated for {data} of data"
    );

    // raw -> qcow2 (the format probed), with an allocated all-zero range in the raw
    // file: it stays unallocated.
    let src = dir.join("src.raw");
    {
        use std::os::unix::fs::FileExt;
        let mut rng = vubd_tests::Rng::new("convert-raw");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(8 * MIB + 1000).unwrap();
        f.write_all_at(&rng.bytes(300_000), 100_000).unwrap();
        f.write_all_at(&vec![0u8; 1 << 20], 2 * MIB).unwrap();
        f.write_all_at(&vec![0x5au8; 70_000], 7 * MIB).unwrap();
    }
    let q = dir.join("from-raw.qcow2");
    vubd_img(&["convert", "-O", "qcow2", s(&src), s(&q)]);
    let info = qemu_info(&q);
    assert_eq!(
        info["virtual-size"],
        8 * MIB + 1024,
        "rounded up to a sector"
    );
    compare(&src, &q);
    let check = check_json(&q);
    let want = nonzero_clusters(&content(&q, &dir, None), 65536);
    assert_eq!(check["allocated-clusters"], want, "{check}");

    // qcow2 -> qcow2 with other creation options, both ways through the chain.
    for (tag, opts) in [
        ("small", "cluster_size=4k,refcount_bits=1"),
        ("v2", "compat=0.10,cluster_size=128k"),
        ("l2ext", "extended_l2=on,cluster_size=64k,lazy_refcounts=on"),
    ] {
        let out = dir.join(&format!("{tag}.qcow2"));
        vubd_img(&["convert", "-O", "qcow2", "-o", opts, s(&top), s(&out)]);
        compare(&out, &top);
        let check = check_json(&out);
        let cs = qemu_info(&out)["cluster-size"].as_u64().unwrap() as usize;
        assert_eq!(
            check["allocated-clusters"],
            nonzero_clusters(&reference, cs),
            "{tag}: {check}"
        );
        assert!(qemu_info(&out).get("backing-filename").is_none(), "{tag}");
        // And back: the copy is a source too.
        let again = dir.join(&format!("{tag}.raw"));
        vubd_img(&["convert", s(&out), s(&again)]);
        assert_same_data(tag, &std::fs::read(&again).unwrap(), &reference);
    }
}

#[test]
fn img_convert_compressed_zlib_and_zstd() {
    let dir = TempDir::new("vubd-img-convert-c");
    let top = chain(&dir);
    let reference = content(&top, &dir, None);
    for (tag, opts, ctype) in [
        ("zlib", None, "zlib"),
        ("zstd", Some("compression_type=zstd"), "zstd"),
        (
            "zstd-4k",
            Some("compression_type=zstd,cluster_size=4k"),
            "zstd",
        ),
    ] {
        let out = dir.join(&format!("{tag}.qcow2"));
        let mut args = vec!["convert", "-c", "-O", "qcow2"];
        if let Some(o) = opts {
            args.extend(["-o", o]);
        }
        args.extend([s(&top), s(&out)]);
        vubd_img(&args);
        compare(&out, &top);
        let info = qemu_info(&out);
        assert_eq!(
            info["format-specific"]["data"]["compression-type"], ctype,
            "{tag}: {info}"
        );
        let cs = info["cluster-size"].as_u64().unwrap() as usize;
        let check = check_json(&out);
        let data = nonzero_clusters(&reference, cs);
        let compressed = check["compressed-clusters"].as_u64().unwrap_or(0);
        // Zero clusters stay unallocated, the noise is stored plainly, the rest
        // compressed.
        assert_eq!(check["allocated-clusters"], data, "{tag}: {check}");
        let noise_clusters = (65536 / cs) as u64;
        assert_eq!(compressed, data - noise_clusters, "{tag}: {check}");
        assert_same_data(tag, &content(&out, &dir, None), &reference);
        // Smaller than the plain copy.
        let plain = dir.join(&format!("{tag}-plain.qcow2"));
        let mut args = vec!["convert", "-O", "qcow2"];
        if let Some(o) = opts {
            args.extend(["-o", o]);
        }
        args.extend([s(&top), s(&plain)]);
        vubd_img(&args);
        let len = |p: &Path| std::fs::metadata(p).unwrap().len();
        assert!(len(&out) * 4 < len(&plain), "{tag}: not compressed");
    }
}

#[test]
fn img_convert_errors_are_clear() {
    let dir = TempDir::new("vubd-img-convert-err");
    let top = chain(&dir);
    let out = dir.join("out.qcow2");
    let err = vubd_img_fails(&["convert", "-c", s(&top), s(&dir.join("x.raw"))]);
    assert!(err.contains("compression"), "{err}");
    let err = vubd_img_fails(&["convert", "-O", "vmdk", s(&top), s(&out)]);
    assert!(err.contains("vmdk"), "{err}");
    let err = vubd_img_fails(&["convert", "-O", "qcow2", s(&top), s(&top)]);
    assert!(err.contains("source"), "{err}");
    // The backing file under another name.
    let err = vubd_img_fails(&["convert", s(&top), s(&dir.join("mid.qcow2"))]);
    assert!(err.contains("source"), "{err}");
    let err = vubd_img_fails(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=3k",
        s(&top),
        s(&out),
    ]);
    assert!(err.contains("cluster_size"), "{err}");
    assert!(
        !out.exists(),
        "a failed convert left its destination behind"
    );
    let err = vubd_img_fails(&["convert", "-O", "qcow2", "-o", "bogus=1", s(&top), s(&out)]);
    assert!(err.contains("bogus"), "{err}");
    let err = vubd_img_fails(&["convert", s(&dir.join("none.qcow2")), s(&out)]);
    assert!(err.contains("none.qcow2"), "{err}");
    let err = vubd_img_fails(&["convert", "-f", "qcow2", s(&dir.join("base.raw")), s(&out)]);
    assert!(err.contains("not a qcow2 image"), "{err}");
    // A chain with a missing link names it.
    std::fs::rename(dir.join("base.raw"), dir.join("gone.raw")).unwrap();
    let err = vubd_img_fails(&["convert", s(&top), s(&dir.join("y.raw"))]);
    assert!(err.contains("base.raw"), "{err}");
    std::fs::rename(dir.join("gone.raw"), dir.join("base.raw")).unwrap();
    // A source a daemon writes to is refused, unless -U says to read it anyway.
    let sock = dir.join("w.sock");
    let args = qcow2_export(&top, &sock).build();
    let mut d = Daemon::start(&args);
    let err = vubd_img_fails(&["convert", s(&top), s(&dir.join("z.raw"))]);
    assert!(err.contains("lock"), "{err}");
    vubd_img(&["convert", "-U", s(&top), s(&dir.join("z.raw"))]);
    assert_eq!(d.terminate().code(), Some(0));
    // Unchanged sources.
    check_clean(&top);
    check_clean(&dir.join("mid.qcow2"));
    compare(&top, &dir.join("z.raw"));
}

/// A daemon killed while it wrote a fresh qcow2 image leaves the dirty bit and the
/// clusters it had reserved ahead (leaks, never corruption). `vubd img check` reports
/// the leaks; `vubd img check -r all` rebuilds the refcounts, as QEMU's writable open
/// does, and the image is clean for qemu-img afterwards, with the data written.
#[test]
fn img_check_repairs_an_image_left_by_a_killed_daemon() {
    let dir = TempDir::new("vubd-img-check-kill");
    let img = dir.join("fresh.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "64M"]);
    let sock = dir.join("e.sock");
    let args = qcow2_export(&img, &sock).build();
    let mut daemon = Daemon::start(&args);
    let data = version_data(3, 7);
    {
        let mut c = Client::connect(&sock, 1);
        c.q().write(3 * BLOCK, &data).expect("write");
    }
    daemon.kill();
    assert_eq!(qemu_info(&img)["dirty-flag"], true, "{}", qemu_info(&img));
    // Exit status 3, as qemu-img's: leaks, no corruption.
    let (rc, report, err) = output(Command::new(vubd_tests::vubd_bin()).arg("img").args([
        "check",
        "--output=json",
        s(&img),
    ]));
    assert_eq!(rc, 3, "{report}{err}");
    let v: Value = serde_json::from_str(&report).expect("check --output=json");
    assert_eq!(v["corruptions"], 0, "{v}");
    assert!(
        v["leaks"].as_u64().unwrap() > 0,
        "the reservation is leaked: {v}"
    );
    vubd_img(&["check", "-r", "all", s(&img)]);
    assert_eq!(qemu_info(&img)["dirty-flag"], false);
    check_clean(&img);
    let raw = dir.join("fresh.raw");
    qemu_img(&["convert", "-O", "raw", s(&img), s(&raw)]);
    let got = std::fs::read(&raw).expect("read raw");
    let at = (3 * BLOCK) as usize;
    assert_same_data("after the repair", &got[at..at + data.len()], &data);
}

/// `vubd img info IMG | head` and the like: output into a pipe whose reader has gone
/// ends the tool by SIGPIPE, as qemu-img ends, not with a panic message.
#[test]
fn img_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = TempDir::new("vubd-img-pipe");
    let img = dir.join("a.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "64M"]);
    for cmd in ["info", "map"] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(vubd_tests::vubd_bin())
            .args(["img", cmd, s(&img)])
            .stdout(writer)
            .output()
            .expect("run vubd img");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "vubd img {cmd}: {err}");
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "vubd img {cmd}: {:?}, {err}",
            out.status
        );
    }
}

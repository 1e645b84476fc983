//! Persistent dirty bitmaps in qcow2 images, against the real tools both ways:
//! - bitmaps qemu-img and qemu-io made (QEMU set their bits) are shown by
//!   `vubd img info` as `qemu-img info` shows them, pass `vubd img check`, and stay
//!   valid for QEMU after `vubd img check -r` and `vubd img snapshot`;
//! - bitmaps `vubd img bitmap` stores pass `qemu-img check`, and qemu-storage-daemon
//!   loads them with the bits they should have (count and
//!   `x-debug-block-dirty-bitmap-sha256` over QEMU's layout).

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use vubd_tests::tools::{qemu_img, qemu_io, run_ok};
use vubd_tests::{qsd_bin, Daemon, DaemonArgs, Qmp, TempDir, MIB};

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
}

fn vubd_img(args: &[&str]) -> String {
    run_ok(Command::new(vubd_tests::vubd_bin()).arg("img").args(args))
}

/// The bitmaps `qemu-img info` lists: its JSON `format-specific` member.
fn qemu_info_bitmaps(img: &Path) -> Value {
    let v: Value =
        serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", s(img)])).unwrap();
    v["format-specific"]["data"]["bitmaps"].clone()
}

fn vubd_info_bitmaps(img: &Path) -> Value {
    let v: Value = serde_json::from_str(&vubd_img(&["info", "--output", "json", s(img)])).unwrap();
    v["bitmaps"].clone()
}

fn qemu_check_clean(img: &Path) {
    let out = qemu_img(&["check", s(img)]);
    assert!(
        out.contains("No errors were found"),
        "qemu-img check: {out}"
    );
}

/// SHA-256 (hex) of `data`, by sha256sum.
fn sha256(data: &[u8], dir: &TempDir) -> String {
    let f = dir.join("sha-input");
    std::fs::write(&f, data).unwrap();
    let out = run_ok(Command::new("sha256sum").arg(&f));
    out.split_whitespace().next().unwrap().to_string()
}

/// A bitmap of `size` bytes at `granularity` with `ranges` (offset, len) dirty, in
/// QEMU's layout (bit k of the little-endian 64-bit words: granule k), and its
/// count as QEMU reports it (dirty granules × granularity).
fn expected(size: u64, granularity: u64, ranges: &[(u64, u64)]) -> (Vec<u8>, u64) {
    let bits = size.div_ceil(granularity);
    let mut words = vec![0u64; bits.div_ceil(64) as usize];
    for &(off, len) in ranges {
        for g in off / granularity..(off + len).div_ceil(granularity) {
            words[(g / 64) as usize] |= 1 << (g % 64);
        }
    }
    let count = words.iter().map(|w| w.count_ones() as u64).sum::<u64>() * granularity;
    (words.iter().flat_map(|w| w.to_le_bytes()).collect(), count)
}

#[test]
fn vubd_img_shows_and_keeps_qemu_bitmaps() {
    let dir = TempDir::new("qcow2-bitmaps-img");
    let img = dir.join("a.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "64M"]);
    qemu_img(&["bitmap", "--add", "-g", "64k", s(&img), "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "128k", "--disable", s(&img), "b1"]);
    qemu_io(&img, "qcow2", &["write 0 1M", "write 10M 64k"]);
    let want = json!([
        {"flags": ["auto"], "name": "b0", "granularity": 65536},
        {"flags": [], "name": "b1", "granularity": 131072},
    ]);
    assert_eq!(qemu_info_bitmaps(&img), want);
    assert_eq!(vubd_info_bitmaps(&img), want);
    let human = vubd_img(&["info", s(&img)]);
    assert!(
        human.contains("bitmaps:\n    [0]:\n        flags:\n            [0]: auto\n        name: b0\n        granularity: 65536\n"),
        "{human}"
    );
    // vubd's check counts the bitmap clusters: no leak, no corruption.
    let out = vubd_img(&["check", s(&img)]);
    assert!(out.contains("No errors were found"), "{out}");
    // A repair and snapshot operations change no guest data: the bitmaps stay valid
    // for QEMU (not left in use).
    vubd_img(&["check", "-r", "all", s(&img)]);
    vubd_img(&["snapshot", "-c", "s1", s(&img)]);
    assert_eq!(qemu_info_bitmaps(&img), want);
    qemu_check_clean(&img);
    qemu_img(&["bitmap", "--add", s(&img), "copy"]);
    qemu_img(&["bitmap", "--merge", "b0", s(&img), "copy"]);
}

#[test]
fn qsd_loads_bitmaps_vubd_img_stored() {
    let dir = TempDir::new("qcow2-bitmaps-qsd");
    let img = dir.join("a.qcow2");
    let size = 64 * MIB;
    qemu_img(&["create", "-f", "qcow2", s(&img), "64M"]);
    qemu_img(&["bitmap", "--add", "-g", "64k", s(&img), "src"]);
    let writes = [(0u64, MIB), (10 * MIB, 4096), (63 * MIB, MIB)];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l)| format!("write {o} {l}"))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&img, "qcow2", &cmds);
    // vubd stores: a finer copy, a disabled copy, an empty one; removes src.
    vubd_img(&[
        "bitmap",
        "--add",
        "-g",
        "4k",
        "--merge",
        "src",
        s(&img),
        "fine",
    ]);
    vubd_img(&[
        "bitmap",
        "--add",
        "--merge",
        "src",
        "--disable",
        s(&img),
        "off",
    ]);
    vubd_img(&["bitmap", "--add", "-g", "512", s(&img), "empty"]);
    vubd_img(&["bitmap", "--remove", s(&img), "src"]);
    qemu_check_clean(&img);
    assert_eq!(
        qemu_info_bitmaps(&img),
        json!([
            {"flags": ["auto"], "name": "fine", "granularity": 4096},
            {"flags": [], "name": "off", "granularity": 65536},
            {"flags": ["auto"], "name": "empty", "granularity": 512},
        ])
    );

    let mon = dir.join("qsd.qmp");
    let sock = dir.join("qsd.sock");
    let args = DaemonArgs::new()
        .blockdev(&format!(
            "driver=file,node-name=f,filename={},cache.direct=off",
            s(&img)
        ))
        .blockdev("driver=qcow2,node-name=q,file=f")
        .vhost_user_blk("q", &sock, ",writable=on")
        .monitor(&mon)
        .build();
    let mut qsd = Daemon::start_bin(&qsd_bin(), &args);
    let mut qmp = Qmp::connect(&mon);
    let nodes = qmp.ok("query-named-block-nodes", json!({"flat": true}));
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "q")
        .unwrap();
    let mut got: Vec<(String, u64, u64, bool, bool)> = node["dirty-bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            assert!(b.get("inconsistent").is_none(), "{b}");
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                b["count"].as_u64().unwrap(),
                b["recording"].as_bool().unwrap(),
                b["persistent"].as_bool().unwrap(),
            )
        })
        .collect();
    got.sort();
    // Merged from a 64 KiB bitmap: whole 64 KiB granules.
    let coarse: Vec<(u64, u64)> = writes
        .iter()
        .map(|&(o, l)| {
            let start = o / 65536 * 65536;
            (start, (o + l).div_ceil(65536) * 65536 - start)
        })
        .collect();
    let (fine, fine_count) = expected(size, 4096, &coarse);
    let (off, off_count) = expected(size, 65536, &writes);
    let (empty, _) = expected(size, 512, &[]);
    assert_eq!(
        got,
        [
            ("empty".to_string(), 512, 0, true, true),
            ("fine".to_string(), 4096, fine_count, true, true),
            ("off".to_string(), 65536, off_count, false, true),
        ]
    );
    for (name, data) in [("fine", &fine), ("off", &off), ("empty", &empty)] {
        let r = qmp.ok(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "q", "name": name}),
        );
        assert_eq!(r["sha256"], sha256(data, &dir), "bitmap {name}");
    }
    qmp.ok("quit", json!({}));
    qsd.wait_timeout(std::time::Duration::from_secs(10))
        .expect("qemu-storage-daemon quits");
    // QSD stored them back (enabled ones recorded nothing: no writes).
    qemu_check_clean(&img);
    assert_eq!(vubd_info_bitmaps(&img), qemu_info_bitmaps(&img));
}

/// A daemon (`bin`) serving `img` as qcow2 node `q` on an export and a monitor.
fn serve(bin: &Path, img: &Path, dir: &TempDir, tag: &str) -> (Daemon, Qmp, std::path::PathBuf) {
    let mon = dir.join(&format!("{tag}.qmp"));
    let sock = dir.join(&format!("{tag}.sock"));
    let args = DaemonArgs::new()
        .blockdev(&format!(
            "driver=file,node-name=f,filename={},cache.direct=off",
            s(img)
        ))
        .blockdev("driver=qcow2,node-name=q,file=f")
        .vhost_user_blk("q", &sock, ",writable=on")
        .monitor(&mon)
        .build();
    let d = Daemon::start_bin(bin, &args);
    let q = Qmp::connect(&mon);
    (d, q, sock)
}

/// The `dirty-bitmaps` of node `q`, by name.
fn node_bitmaps(qmp: &mut Qmp) -> Vec<Value> {
    let nodes = qmp.ok("query-named-block-nodes", json!({"flat": true}));
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "q")
        .unwrap()
        .clone();
    let mut v: Vec<Value> = node["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    v.sort_by_key(|b| b["name"].as_str().unwrap().to_string());
    v
}

fn quit(d: &mut Daemon, qmp: &mut Qmp) {
    qmp.ok("quit", json!({}));
    d.wait_timeout(std::time::Duration::from_secs(10))
        .expect("the daemon quits");
}

/// Writes `ranges` through the export on `sock` (a libblkio client).
fn write_through(sock: &Path, ranges: &[(u64, u64)]) {
    let mut c = vubd_tests::Client::connect(sock, 1);
    for &(o, l) in ranges {
        c.q().write(o, &vec![0x5a; l as usize]).expect("write");
    }
    c.q().flush().expect("flush");
}

#[test]
fn persistent_bitmaps_survive_vubd_restarts_and_reach_qsd() {
    let dir = TempDir::new("qcow2-bitmaps-restart");
    let img = dir.join("a.qcow2");
    let size = 64 * MIB;
    qemu_img(&["create", "-f", "qcow2", s(&img), "64M"]);
    // One QEMU made and set bits in; vubd continues it.
    qemu_img(&["bitmap", "--add", "-g", "64k", s(&img), "q"]);
    let by_qemu = [(0u64, 128 * 1024)];
    qemu_io(&img, "qcow2", &["write 0 128k"]);

    let vubd = vubd_tests::vubd_bin();
    let (mut d, mut qmp, sock) = serve(&vubd, &img, &dir, "v1");
    let b = node_bitmaps(&mut qmp);
    assert_eq!(b.len(), 1);
    assert_eq!(
        (b[0]["name"].as_str(), b[0]["count"].as_u64()),
        (Some("q"), Some(131072))
    );
    assert_eq!(b[0]["persistent"], true);
    assert_eq!(b[0]["recording"], true);
    // In use in the image while vubd has it.
    assert_eq!(
        qemu_info_bitmaps(&img),
        json!([{"flags": ["in-use", "auto"], "name": "q", "granularity": 65536}])
    );
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "v", "granularity": 4096, "persistent": true}),
    );
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "temp", "persistent": false}),
    );
    let first = [(MIB, 4096u64), (5 * MIB + 512, 1024)];
    write_through(&sock, &first);
    quit(&mut d, &mut qmp);
    qemu_check_clean(&img);
    assert_eq!(
        qemu_info_bitmaps(&img),
        json!([
            {"flags": ["auto"], "name": "q", "granularity": 65536},
            {"flags": ["auto"], "name": "v", "granularity": 4096},
        ])
    );

    // Restart: both come back with their bits; more writes; disable one.
    let (mut d, mut qmp, sock) = serve(&vubd, &img, &dir, "v2");
    let b = node_bitmaps(&mut qmp);
    let names: Vec<&str> = b.iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["q", "v"]);
    let (_, q_count) = expected(size, 65536, &[by_qemu[0], first[0], first[1]]);
    let (_, v_count) = expected(size, 4096, &first);
    assert_eq!(b[0]["count"].as_u64(), Some(q_count));
    assert_eq!(b[1]["count"].as_u64(), Some(v_count));
    let second = [(30 * MIB, 64 * 1024u64)];
    write_through(&sock, &second);
    qmp.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "q", "name": "v"}),
    );
    write_through(&sock, &[(40 * MIB, 4096)]);
    quit(&mut d, &mut qmp);
    qemu_check_clean(&img);

    // qemu-storage-daemon reads what vubd stored: the same counts and bits.
    let all_q = [by_qemu[0], first[0], first[1], second[0], (40 * MIB, 4096)];
    let all_v = [first[0], first[1], second[0]];
    let (q_bits, q_count) = expected(size, 65536, &all_q);
    let (v_bits, v_count) = expected(size, 4096, &all_v);
    let (mut qsd, mut qmp, _) = serve(&qsd_bin(), &img, &dir, "qsd");
    let b = node_bitmaps(&mut qmp);
    assert_eq!(
        b.iter()
            .map(|x| (
                x["name"].as_str().unwrap().to_string(),
                x["count"].as_u64().unwrap(),
                x["recording"].as_bool().unwrap(),
                x.get("inconsistent").is_some()
            ))
            .collect::<Vec<_>>(),
        [
            ("q".to_string(), q_count, true, false),
            ("v".to_string(), v_count, false, false)
        ]
    );
    for (name, bits) in [("q", &q_bits), ("v", &v_bits)] {
        let r = qmp.ok(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "q", "name": name}),
        );
        assert_eq!(r["sha256"], sha256(bits, &dir), "bitmap {name}");
    }
    quit(&mut qsd, &mut qmp);
    // And qemu-img can use them.
    qemu_img(&["bitmap", "--add", s(&img), "copy"]);
    qemu_img(&["bitmap", "--merge", "v", s(&img), "copy"]);
}

#[test]
fn sigkill_leaves_bitmaps_in_use_then_inconsistent() {
    let dir = TempDir::new("qcow2-bitmaps-kill");
    let img = dir.join("a.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "64M"]);
    let vubd = vubd_tests::vubd_bin();
    let (mut d, mut qmp, _) = serve(&vubd, &img, &dir, "v1");
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "b", "persistent": true}),
    );
    quit(&mut d, &mut qmp);
    let (mut d, _qmp, sock) = serve(&vubd, &img, &dir, "v2");
    write_through(&sock, &[(0, 65536)]);
    d.kill();
    // Left in use, as QEMU leaves it.
    assert_eq!(
        qemu_info_bitmaps(&img),
        json!([{"flags": ["in-use", "auto"], "name": "b", "granularity": 65536}])
    );
    // QEMU finds it inconsistent, and so does vubd; it stays in use through a
    // clean close of either.
    for (bin, tag) in [(qsd_bin(), "qsd"), (vubd.clone(), "v3")] {
        let (mut d, mut qmp, _) = serve(&bin, &img, &dir, tag);
        let b = node_bitmaps(&mut qmp);
        assert_eq!(b.len(), 1, "{tag}");
        assert_eq!(b[0]["inconsistent"], true, "{tag}: {}", b[0]);
        assert_eq!(b[0]["recording"], false, "{tag}");
        assert_eq!(b[0]["count"], 0, "{tag}");
        let e = qmp
            .execute(
                "block-dirty-bitmap-clear",
                json!({"node": "q", "name": "b"}),
            )
            .unwrap_err();
        assert_eq!(
            e.desc, "Bitmap 'b' is inconsistent and cannot be used",
            "{tag}"
        );
        quit(&mut d, &mut qmp);
        assert_eq!(
            qemu_info_bitmaps(&img),
            json!([{"flags": ["in-use", "auto"], "name": "b", "granularity": 65536}]),
            "{tag}"
        );
    }
    // Removing it deletes it from the image.
    let (mut d, mut qmp, _) = serve(&vubd, &img, &dir, "v4");
    qmp.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "q", "name": "b"}),
    );
    assert_eq!(qemu_info_bitmaps(&img), Value::Null);
    quit(&mut d, &mut qmp);
    qemu_check_clean(&img);
    assert_eq!(qemu_info_bitmaps(&img), Value::Null);
}

/// Active commit into a base with a persistent bitmap: the base is reopened
/// read-write for the job, the commit's writes mark its bitmap, and it is stored
/// at quit; vubd and qemu-storage-daemon end with the same image.
#[test]
fn commit_marks_and_stores_the_base_bitmap() {
    let dir = TempDir::new("qcow2-bitmaps-commit");
    let size = 64 * MIB;
    let writes = [(MIB, 65536u64), (5 * MIB, 4096)];
    let (bits, count) = expected(size, 65536, &writes);
    for (bin, tag) in [(vubd_tests::vubd_bin(), "vubd"), (qsd_bin(), "qsd")] {
        let base = dir.join(&format!("{tag}-base.qcow2"));
        let top = dir.join(&format!("{tag}-top.qcow2"));
        qemu_img(&["create", "-f", "qcow2", s(&base), "64M"]);
        qemu_img(&["bitmap", "--add", "-g", "64k", s(&base), "bb"]);
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "qcow2",
            s(&top),
        ]);
        qemu_io(&top, "qcow2", &["write 1M 64k", "write 5M 4k"]);
        let mon = dir.join(&format!("{tag}.qmp"));
        let sock = dir.join(&format!("{tag}.sock"));
        let args = DaemonArgs::new()
            .blockdev(&format!("driver=file,node-name=f,filename={}", s(&top)))
            .blockdev("driver=qcow2,node-name=top,file=f")
            .vhost_user_blk("top", &sock, "")
            .monitor(&mon)
            .build();
        let mut d = Daemon::start_bin(&bin, &args);
        let mut qmp = Qmp::connect(&mon);
        qmp.ok("block-commit", json!({"device": "top", "job-id": "j"}));
        let t0 = std::time::Instant::now();
        while qmp.ok("query-jobs", json!({}))[0]["status"] != "ready" {
            assert!(t0.elapsed().as_secs() < 30, "{tag}: commit not ready");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let nodes = qmp.ok("query-named-block-nodes", json!({"flat": true}));
        let with_bitmap: Vec<&Value> = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| {
                n["dirty-bitmaps"]
                    .as_array()
                    .is_some_and(|b| b.iter().any(|x| x["name"] == "bb"))
            })
            .collect();
        assert_eq!(with_bitmap.len(), 1, "{tag}");
        let node = with_bitmap[0]["node-name"].as_str().unwrap().to_string();
        let b = &with_bitmap[0]["dirty-bitmaps"][0];
        assert_eq!(
            (b["count"].as_u64(), &b["persistent"]),
            (Some(count), &json!(true)),
            "{tag}"
        );
        let r = qmp.ok(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": node, "name": "bb"}),
        );
        assert_eq!(r["sha256"], sha256(&bits, &dir), "{tag}");
        quit(&mut d, &mut qmp);
        qemu_check_clean(&base);
        assert_eq!(
            qemu_info_bitmaps(&base),
            json!([{"flags": ["auto"], "name": "bb", "granularity": 65536}]),
            "{tag}"
        );
        // What the other daemon stored reads back the same here.
        let (mut q, mut qmp, _) = serve(&qsd_bin(), &base, &dir, &format!("{tag}-check"));
        let b = node_bitmaps(&mut qmp);
        assert_eq!(b[0]["count"].as_u64(), Some(count), "{tag}");
        quit(&mut q, &mut qmp);
    }
}

//! Persistent bitmaps against qemu-img / qemu-io 7.2: bitmaps QEMU made (and set
//! bits in) read back through this crate, bitmaps this crate stores are accepted
//! by `qemu-img check`, `info` and `bitmap`, the in-use flag while open, and a
//! stale extension (autoclear bit cleared) is dropped as QEMU drops it.

use qcow::{block_on, FileIo, OpenOptions, Qcow2, Repair, StoreBitmap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("qcow-bitmaps-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("qemu-img not installed: skipping");
    }
    ok
}

fn run_status(cmd: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(cmd).args(args).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), out)
}

fn run(cmd: &str, args: &[&str]) -> String {
    let (ok, out) = run_status(cmd, args);
    assert!(ok, "{cmd} {args:?} failed: {out}");
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn open(p: &Path, writable: bool) -> Qcow2<FileIo> {
    let opts = if writable {
        OpenOptions::read_write()
    } else {
        OpenOptions::read_only()
    };
    block_on(Qcow2::open(FileIo::open(p, writable).unwrap(), opts)).unwrap()
}

/// `qemu-img info --output=json`'s bitmaps: (name, granularity, flags).
fn qemu_bitmaps(p: &Path) -> Vec<(String, u64, Vec<String>)> {
    let out = run("qemu-img", &["info", "-U", "--output=json", s(p)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let Some(list) = v["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                b["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

fn qemu_check_clean(p: &Path) {
    let out = run("qemu-img", &["check", s(p)]);
    assert!(
        out.contains("No errors were found"),
        "qemu-img check: {out}"
    );
}

/// The granules set in `words`.
fn set_bits(words: &[u64]) -> Vec<u64> {
    let mut v = Vec::new();
    for (i, &w) in words.iter().enumerate() {
        for b in 0..64 {
            if w >> b & 1 != 0 {
                v.push(i as u64 * 64 + b);
            }
        }
    }
    v
}

#[test]
fn reads_bitmaps_qemu_wrote() {
    if !have_qemu() {
        return;
    }
    let d = TempDir::new("read");
    let img = d.path("a.qcow2");
    // 4 KiB clusters and 512 B granularity: 2 Mi bits, 64 data clusters, so
    // the bitmap table spans many entries.
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            s(&img),
            "1G",
        ],
    );
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "512", s(&img), "fine"],
    );
    run("qemu-img", &["bitmap", "--add", "-g", "64k", s(&img), "b0"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "64k", "--disable", s(&img), "off"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write 0 1M",
            "-c",
            "write 700M 4k",
            "-c",
            "write 1023M 4k",
            s(&img),
        ],
    );
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "64k", s(&img), "merged"],
    );
    run("qemu-img", &["bitmap", "--merge", "b0", s(&img), "merged"]);
    run("qemu-img", &["bitmap", "--disable", s(&img), "merged"]);

    let q = open(&img, false);
    let info = q.bitmaps();
    let names: Vec<(&str, u64, bool, bool)> = info
        .iter()
        .map(|b| (b.name.as_str(), b.granularity, b.auto, b.in_use))
        .collect();
    assert_eq!(
        names,
        [
            ("fine", 512, true, false),
            ("b0", 65536, true, false),
            ("off", 65536, false, false),
            ("merged", 65536, false, false),
        ]
    );
    let loaded = block_on(q.load_bitmaps()).unwrap();
    let mb = 1u64 << 20;
    let fine: Vec<u64> = (0..2048)
        .chain((700 * mb / 512)..(700 * mb + 4096) / 512)
        .chain((1023 * mb / 512)..(1023 * mb + 4096) / 512)
        .collect();
    assert_eq!(set_bits(&loaded[0].words), fine);
    let coarse: Vec<u64> = (0..16)
        .chain([700 * mb / 65536, 1023 * mb / 65536])
        .collect();
    assert_eq!(set_bits(&loaded[1].words), coarse);
    assert!(set_bits(&loaded[2].words).is_empty());
    assert_eq!(set_bits(&loaded[3].words), coarse);
    assert!(loaded.iter().all(|b| !b.inconsistent));
    assert_eq!(loaded[0].words.len(), (1 << 21) / 64);
    // The crate's check counts the bitmap clusters: nothing leaked.
    let r = block_on(q.check(Repair::None)).unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
}

#[test]
fn qemu_accepts_bitmaps_the_crate_stores() {
    if !have_qemu() {
        return;
    }
    let d = TempDir::new("store");
    let img = d.path("a.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", s(&img), "100M"]);
    let q = open(&img, true);
    // 100 MiB at 512 B: 204800 bits, 50 clusters' worth of words... in 64 KiB
    // clusters (524288 bits each) one data cluster.
    let nbits = (100u64 << 20) / 512;
    let mut a = vec![0u64; nbits.div_ceil(64) as usize];
    for k in [0u64, 1, 63, 64, 1000, nbits - 1] {
        a[(k / 64) as usize] |= 1 << (k % 64);
    }
    // 4 KiB granularity, all ones: stored as an all-ones table entry.
    let nb = (100u64 << 20) / 4096;
    let mut ones = vec![u64::MAX; nb.div_ceil(64) as usize];
    if !nb.is_multiple_of(64) {
        *ones.last_mut().unwrap() = (1 << (nb % 64)) - 1;
    }
    let empty = vec![0u64; ((100u64 << 20) / 65536).div_ceil(64) as usize];
    block_on(q.store_bitmaps(&[
        StoreBitmap {
            name: "fine",
            granularity: 512,
            enabled: true,
            words: &a,
        },
        StoreBitmap {
            name: "ones",
            granularity: 4096,
            enabled: false,
            words: &ones,
        },
        StoreBitmap {
            name: "empty",
            granularity: 65536,
            enabled: true,
            words: &empty,
        },
    ]))
    .unwrap();
    block_on(q.close()).unwrap();
    drop(q);
    qemu_check_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        [
            ("fine".to_string(), 512, vec!["auto".to_string()]),
            ("ones".to_string(), 4096, vec![]),
            ("empty".to_string(), 65536, vec!["auto".to_string()]),
        ]
    );
    // QEMU uses them: a merge of consistent bitmaps succeeds, and a write
    // through qemu-io sets bits in the enabled ones.
    run("qemu-img", &["bitmap", "--add", s(&img), "copy"]);
    run("qemu-img", &["bitmap", "--merge", "fine", s(&img), "copy"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write 50M 64k", s(&img)]);
    qemu_check_clean(&img);
    let q = open(&img, false);
    let l = block_on(q.load_bitmaps()).unwrap();
    assert_eq!(l[0].name, "fine");
    let mut want: Vec<u64> = vec![0, 1, 63, 64, 1000, nbits - 1];
    want.extend((50 << 20) / 512..((50 << 20) + 65536) / 512);
    want.sort();
    assert_eq!(set_bits(&l[0].words), want);
    assert_eq!(set_bits(&l[1].words).len() as u64, nb);
    assert_eq!(set_bits(&l[2].words), vec![(50 << 20) / 65536]);
    // The merge made in QEMU from the crate's bitmap: the same bits at 64 KiB.
    assert_eq!(l[3].name, "copy");
    let mut merged: Vec<u64> = [0u64, 1000, nbits - 1]
        .iter()
        .map(|k| k * 512 / 65536)
        .collect();
    merged.push((50 << 20) / 65536);
    merged.sort();
    assert_eq!(set_bits(&l[3].words), merged);

    // Replacing and removing free the old clusters.
    let q = open(&img, true);
    let zero = vec![0u64; nbits.div_ceil(64) as usize];
    block_on(q.store_bitmaps(&[StoreBitmap {
        name: "fine",
        granularity: 512,
        enabled: false,
        words: &zero,
    }]))
    .unwrap();
    block_on(q.remove_bitmap("ones")).unwrap();
    block_on(q.release_bitmaps()).unwrap();
    let r = block_on(q.check(Repair::None)).unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
    block_on(q.close()).unwrap();
    drop(q);
    qemu_check_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        [
            ("fine".to_string(), 512, vec![]),
            ("empty".to_string(), 65536, vec!["auto".to_string()]),
            ("copy".to_string(), 65536, vec!["auto".to_string()]),
        ]
    );
    // Removing the last ones drops the extension and its autoclear bit.
    let q = open(&img, true);
    for n in ["fine", "empty", "copy"] {
        block_on(q.remove_bitmap(n)).unwrap();
    }
    assert!(q.header().bitmaps.is_none());
    assert_eq!(q.header().autoclear_features & 1, 0);
    block_on(q.close()).unwrap();
    drop(q);
    qemu_check_clean(&img);
    assert!(qemu_bitmaps(&img).is_empty());
}

#[test]
fn in_use_while_open_and_inconsistent_after_a_crash() {
    if !have_qemu() {
        return;
    }
    let d = TempDir::new("inuse");
    let img = d.path("a.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", s(&img), "64M"]);
    run("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write 0 64k", s(&img)]);
    // A writable open marks it in use in the image, the autoclear bit stays.
    let q = open(&img, true);
    assert_eq!(q.header().autoclear_features & 1, 1);
    assert!(q.bitmaps()[0].in_use && !q.bitmaps()[0].inconsistent);
    assert_eq!(
        qemu_bitmaps(&img),
        [(
            "b0".to_string(),
            65536,
            vec!["in-use".to_string(), "auto".to_string()]
        )]
    );
    // Stored back on a clean close: QEMU sees it consistent with its bits.
    let l = block_on(q.load_bitmap("b0")).unwrap();
    assert_eq!(set_bits(&l.words), vec![0]);
    let mut w = l.words.clone();
    w[0] |= 1 << 5;
    block_on(q.store_bitmaps(&[StoreBitmap {
        name: "b0",
        granularity: 65536,
        enabled: true,
        words: &w,
    }]))
    .unwrap();
    block_on(q.close()).unwrap();
    drop(q);
    assert_eq!(
        qemu_bitmaps(&img),
        [("b0".to_string(), 65536, vec!["auto".to_string()])]
    );
    run("qemu-img", &["bitmap", "--add", s(&img), "copy"]);
    run("qemu-img", &["bitmap", "--merge", "b0", s(&img), "copy"]);
    qemu_check_clean(&img);

    // A crash: open writable, never store nor release.
    let q = open(&img, true);
    drop(q);
    let q = open(&img, false);
    assert!(q.bitmaps().iter().all(|b| b.in_use && b.inconsistent));
    let l = block_on(q.load_bitmap("b0")).unwrap();
    assert!(l.inconsistent && set_bits(&l.words).is_empty());
    drop(q);
    // QEMU agrees: the bitmap is inconsistent and cannot be used.
    let (ok, out) = run_status("qemu-img", &["bitmap", "--merge", "b0", s(&img), "copy"]);
    assert!(!ok && out.contains("inconsistent"), "{out}");
    // An inconsistent bitmap stays in use across a writable open and a
    // release (only the ones this open claimed are released) ...
    let q = open(&img, true);
    block_on(q.release_bitmaps()).unwrap();
    assert!(q.bitmaps().iter().all(|b| b.in_use && b.inconsistent));
    // ... and can be removed.
    block_on(q.remove_bitmap("b0")).unwrap();
    block_on(q.close()).unwrap();
    drop(q);
    qemu_check_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        [(
            "copy".to_string(),
            65536,
            vec!["in-use".to_string(), "auto".to_string()]
        )]
    );
}

#[test]
fn stale_extension_is_dropped_and_its_clusters_repaired() {
    if !have_qemu() {
        return;
    }
    let d = TempDir::new("stale");
    let img = d.path("a.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", s(&img), "64M"]);
    run("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write 0 64k", s(&img)]);
    // A program without bitmap support clears the autoclear bit.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut ac = [0u8; 8];
    f.read_exact_at(&mut ac, 88).unwrap();
    assert_eq!(u64::from_be_bytes(ac) & 1, 1);
    f.write_all_at(&0u64.to_be_bytes(), 88).unwrap();
    drop(f);
    let q = open(&img, false);
    assert!(q.bitmaps().is_empty());
    drop(q);
    let q = open(&img, true);
    assert!(q.header().bitmaps.is_none());
    // The directory, table and data cluster leak; -r leaks frees them.
    let r = block_on(q.check(Repair::Leaks)).unwrap();
    assert_eq!(
        (r.leaks, r.leaks_fixed, r.corruptions),
        (3, 3, 0),
        "{:?}",
        r.messages
    );
    block_on(q.close()).unwrap();
    drop(q);
    qemu_check_clean(&img);
    assert!(qemu_bitmaps(&img).is_empty());
}

type Mutation = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn broken_directories_are_refused() {
    if !have_qemu() {
        return;
    }
    let d = TempDir::new("broken");
    let img = d.path("a.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", s(&img), "64M"]);
    run("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write 0 64k", s(&img)]);
    let q = open(&img, false);
    let ext = q.header().bitmaps.unwrap();
    drop(q);
    let data = std::fs::read(&img).unwrap();
    let dir = ext.directory_offset as usize;
    // (what, whether qemu-img info refuses it too: it reads no table)
    let cases: Vec<(&str, bool, Mutation)> = vec![
        (
            "granularity bits 40",
            true,
            Box::new(move |b| b[dir + 17] = 40),
        ),
        ("type 0", true, Box::new(move |b| b[dir + 16] = 0)),
        (
            "reserved flag",
            true,
            Box::new(move |b| b[dir + 15] |= 0x10),
        ),
        (
            "table past the end",
            false,
            Box::new(move |b| b[dir..dir + 8].copy_from_slice(&(1u64 << 40).to_be_bytes())),
        ),
        (
            "name past the directory",
            true,
            Box::new(move |b| b[dir + 18..dir + 20].copy_from_slice(&1000u16.to_be_bytes())),
        ),
    ];
    for (what, qemu_refuses, f) in cases {
        let mut b = data.clone();
        f(&mut b);
        let p = d.path("bad.qcow2");
        std::fs::write(&p, &b).unwrap();
        let r = block_on(Qcow2::open(
            FileIo::open(&p, false).unwrap(),
            OpenOptions::read_only(),
        ));
        assert!(r.is_err(), "{what}: opened");
        // QEMU refuses these images too.
        if qemu_refuses {
            let (ok, _) = run_status("qemu-img", &["info", "-U", s(&p)]);
            assert!(!ok, "{what}: qemu-img info accepted it");
        }
    }
    // A table entry with reserved bits: the open succeeds, loading and check fail.
    let q = open(&img, false);
    drop(q);
    let mut b = data.clone();
    let toff = u64::from_be_bytes(b[dir..dir + 8].try_into().unwrap()) as usize;
    b[toff + 7] |= 0x02;
    let p = d.path("badtable.qcow2");
    std::fs::write(&p, &b).unwrap();
    let q = open(&p, false);
    assert!(block_on(q.load_bitmap("b0")).is_err());
    let r = block_on(q.check(Repair::None)).unwrap();
    assert_eq!(r.corruptions, 1, "{:?}", r.messages);
    drop(q);
    // A writable open fails before it marks anything in use, as QEMU's does.
    let r = block_on(Qcow2::open(
        FileIo::open(&p, true).unwrap(),
        OpenOptions::read_write(),
    ));
    assert!(r.is_err(), "a writable open accepted a bad bitmap table");
    assert_eq!(
        std::fs::read(&p).unwrap(),
        b,
        "the failed open changed the image"
    );
    let (ok, _) = run_status("qemu-io", &["-f", "qcow2", "-c", "read 0 512", s(&p)]);
    assert!(!ok, "qemu-io opened it writable");
}

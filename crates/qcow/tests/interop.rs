//! Interoperability with qemu-img / qemu-io 7.2: images written by QEMU read
//! back identically through this crate, and images this crate writes pass
//! `qemu-img check` and compare equal.

use qcow::{
    block_on, Backing, CompressionType, CreateOptions, FileIo, NoBacking, OpenOptions, Qcow2,
    Repair,
};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("qcow-interop-{}-{name}", std::process::id()));
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

fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{cmd} {args:?} failed: {out}");
    out
}

fn qemu_io(img: &Path, cmds: &[String]) {
    let mut args = vec!["-f".to_string(), "qcow2".into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(img.to_str().unwrap().into());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = run("qemu-io", &a);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io: {out}"
    );
}

fn to_raw(img: &Path, dir: &TempDir) -> Vec<u8> {
    let raw = dir.path("converted.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    std::fs::read(raw).unwrap()
}

struct RawBacking(std::fs::File, u64);
impl Backing for RawBacking {
    async fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        buf.fill(0);
        if off < self.1 {
            let n = (buf.len() as u64).min(self.1 - off) as usize;
            self.0.read_exact_at(&mut buf[..n], off)?;
        }
        Ok(())
    }
}

/// Reads a whole image through map + file reads + read_compressed.
fn read_through_crate<B: Backing>(img: &Qcow2<FileIo>, backing: &B) -> Vec<u8> {
    let size = img.size();
    let mut out = vec![0u8; size as usize];
    let chunk = 1 << 20;
    let mut pos = 0;
    while pos < size {
        let n = chunk.min(size - pos);
        for e in block_on(img.map(pos, n)).unwrap() {
            let b = &mut out[e.offset as usize..(e.offset + e.len) as usize];
            match e.kind {
                qcow::ExtentKind::Data { host_offset } => {
                    img.io().file().read_exact_at(b, host_offset).unwrap()
                }
                qcow::ExtentKind::Zero => b.fill(0),
                qcow::ExtentKind::Unallocated => block_on(backing.read(e.offset, b)).unwrap(),
                qcow::ExtentKind::Compressed { .. } => {
                    block_on(img.read_compressed(&e, b)).unwrap()
                }
            }
        }
        pos += n;
    }
    out
}

#[track_caller]
fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at {i:#x}: {} != {}", a[i], b[i]);
    }
}

fn qemu_check_clean(img: &Path) {
    let o = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", img.to_str().unwrap()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && out.contains("No errors were found"),
        "qemu-img check: {out}"
    );
    assert!(!out.contains("leaked"), "qemu-img check found leaks: {out}");
}

/// qemu-img check finds no corruption (leaks allowed).
fn qemu_check_no_corruption(img: &Path) {
    let o = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", img.to_str().unwrap()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        matches!(o.status.code(), Some(0 | 3)) && !out.contains("ERROR"),
        "qemu-img check: {out}"
    );
}

/// Images made by qemu-img with many options and written by qemu-io read
/// back through the crate identical to `qemu-img convert -O raw`.
#[test]
fn reads_images_written_by_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("read");
    let cases: &[(&str, u64)] = &[
        ("cluster_size=512", 512),
        ("cluster_size=65536", 65536),
        ("cluster_size=2M", 2 << 20),
        ("refcount_bits=1", 65536),
        ("refcount_bits=64,cluster_size=4096", 4096),
        ("compat=0.10", 65536),
        ("compat=0.10,cluster_size=512", 512),
        ("extended_l2=on", 65536),
        ("extended_l2=on,cluster_size=2M", 2 << 20),
        ("extended_l2=on,cluster_size=16k", 16384),
        ("lazy_refcounts=on", 65536),
        ("compression_type=zstd", 65536),
        (
            "compression_type=zstd,extended_l2=on,cluster_size=32k",
            32768,
        ),
        ("preallocation=metadata", 65536),
        ("preallocation=full,cluster_size=4096", 4096),
    ];
    for &(o, cs) in cases {
        let img = dir.path("img.qcow2");
        let size = 8u64 << 20;
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                o,
                img.to_str().unwrap(),
                &size.to_string(),
            ],
        );
        let mut cmds = vec![
            "write -P 0xab 0 64k".to_string(),
            "write -P 0x12 100000 3000".into(),
            "write -P 0x34 1000001 77777".into(),
            "write -z 200k 64k".into(),
            "write -P 0x56 3M 1M".into(),
            "discard 3M 256k".into(),
            "write -z 3200k 5000".into(),
            "write -P 0x78 8388000 608".into(),
        ];
        // Compressed writes: whole clusters (not with preallocation).
        if !o.contains("prealloc") {
            let c = cs.max(65536);
            cmds.push(format!("write -c -P 0x9a {} {c}", 4 << 20));
            if cs <= 1 << 20 {
                cmds.push(format!("write -c -P 0xbc {} {cs}", 5 << 20));
            }
        }
        qemu_io(&img, &cmds);
        let expect = to_raw(&img, &dir);
        let q = block_on(Qcow2::open(
            FileIo::open(&img, false).unwrap(),
            OpenOptions::read_only(),
        ))
        .unwrap();
        let got = read_through_crate(&q, &NoBacking);
        assert_same(&got, &expect, o);
        let r = block_on(q.check(Repair::None)).unwrap();
        assert!(r.is_clean(), "{o}: {:?}", r.messages);
    }
}

/// Images created and written by the crate pass qemu-img check and compare
/// equal to the expected raw content.
#[test]
fn qemu_accepts_images_written_by_crate() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("write");
    let size = 6u64 << 20;
    let mut variants: Vec<(&str, CreateOptions)> = Vec::new();
    let mk = |f: &dyn Fn(&mut CreateOptions)| {
        let mut o = CreateOptions::new(size);
        f(&mut o);
        o
    };
    variants.push(("default", mk(&|_| {})));
    variants.push(("512", mk(&|o| o.cluster_size = 512)));
    variants.push(("2M", mk(&|o| o.cluster_size = 2 << 20)));
    variants.push(("rc1", mk(&|o| o.refcount_bits = 1)));
    variants.push((
        "rc64-4k",
        mk(&|o| {
            o.refcount_bits = 64;
            o.cluster_size = 4096
        }),
    ));
    variants.push(("v2", mk(&|o| o.compat = qcow::Compat::V2)));
    variants.push(("extl2", mk(&|o| o.extended_l2 = true)));
    variants.push(("lazy", mk(&|o| o.lazy_refcounts = true)));
    variants.push(("zstd", mk(&|o| o.compression_type = CompressionType::Zstd)));
    variants.push((
        "prealloc-metadata",
        mk(&|o| o.preallocation = qcow::Preallocation::Metadata),
    ));
    variants.push((
        "prealloc-full",
        mk(&|o| {
            o.preallocation = qcow::Preallocation::Full;
            o.cluster_size = 16384
        }),
    ));
    for (name, o) in variants {
        let img = dir.path("mine.qcow2");
        let q = block_on(qcow::create(FileIo::create(&img).unwrap(), &o)).unwrap();
        let mut model = vec![0u8; size as usize];
        let mut w = |off: u64, len: usize, v: u8| {
            block_on(q.write(off, &vec![v; len], &NoBacking)).unwrap();
            model[off as usize..off as usize + len].fill(v);
        };
        w(0, 65536, 1);
        w(100_000, 3000, 2);
        w(1_000_001, 200_000, 3);
        w(size - 300, 300, 4);
        let al = q.geometry().subcluster_size.max(65536);
        block_on(q.write_zeroes(al, al, true)).unwrap();
        model[al as usize..(al * 2) as usize].fill(0);
        block_on(q.write_zeroes(size - al, al, false)).unwrap();
        model[(size - al) as usize..].fill(0);
        // Compressed clusters (packed several to a host cluster), one of
        // them then partly overwritten.
        let cs = q.geometry().cluster_size;
        let cbase = (size / 2) / cs * cs;
        for i in 0..3u64.min(size / 2 / cs) {
            let data: Vec<u8> = (0..cs)
                .map(|b| ((b / 1000) as u8).wrapping_add(i as u8))
                .collect();
            block_on(q.write_compressed(cbase + i * cs, &data)).unwrap();
            model[(cbase + i * cs) as usize..(cbase + (i + 1) * cs) as usize]
                .copy_from_slice(&data);
        }
        block_on(q.write(cbase + 10, &[0xcc; 100], &NoBacking)).unwrap();
        model[cbase as usize + 10..cbase as usize + 110].fill(0xcc);
        block_on(q.discard(0, 65536 * 2)).unwrap();
        let d_end = (65536u64 * 2) / cs * cs;
        model[..d_end as usize].fill(0);
        block_on(q.close()).unwrap();
        let r = block_on(q.check(Repair::None)).unwrap();
        assert!(r.is_clean(), "{name}: {:?}", r.messages);
        drop(q);
        eprintln!("variant {name}");
        qemu_check_clean(&img);
        let raw = dir.path("ref.raw");
        std::fs::write(&raw, &model).unwrap();
        run(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                img.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
    }
}

/// Copy-on-write from a raw backing file; qemu-img agrees on the content.
#[test]
fn backing_file_cow_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("backing");
    let size = 4u64 << 20;
    let base = dir.path("base.raw");
    let base_data: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(&base, &base_data).unwrap();
    for ext in [false, true] {
        let img = dir.path("top.qcow2");
        let mut o = CreateOptions::new(size);
        o.backing_file = Some(base.to_str().unwrap().into());
        o.backing_fmt = Some("raw".into());
        o.extended_l2 = ext;
        let q = block_on(qcow::create(FileIo::create(&img).unwrap(), &o)).unwrap();
        let b = RawBacking(std::fs::File::open(&base).unwrap(), size);
        let mut model = base_data.clone();
        for (off, len, v) in [
            (5u64, 100usize, 1u8),
            (70000, 3000, 2),
            (200_000, 300_000, 3),
            (size - 10, 10, 4),
        ] {
            block_on(q.write(off, &vec![v; len], &b)).unwrap();
            model[off as usize..off as usize + len].fill(v);
        }
        block_on(q.discard(1 << 20, 1 << 20)).unwrap();
        model[1 << 20..2 << 20].fill(0);
        block_on(q.close()).unwrap();
        assert_same(&read_through_crate(&q, &b), &model, "through the crate");
        drop(q);
        qemu_check_clean(&img);
        assert_same(
            &to_raw(&img, &dir),
            &model,
            &format!("qemu-img convert ext {ext}"),
        );
    }
}

/// Random writes, zero writes and discards through the crate and on a byte
/// vector; compared, and checked by qemu-img, after every flush.
#[test]
fn random_differential_with_qemu_check() {
    if !have_qemu() {
        return;
    }
    let seed: u64 = std::env::var("QCOW_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("random_differential_with_qemu_check: QCOW_SEED={seed}");
    eprintln!("random_differential_with_qemu_check: QCOW_SEED={seed}");
    let dir = TempDir::new("random");
    let mut x = seed | 1;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for (cs, ext, rb) in [
        (65536u64, false, 16u32),
        (4096, false, 2),
        (32768, true, 16),
    ] {
        let size = 8u64 << 20;
        let mut o = CreateOptions::new(size);
        o.cluster_size = cs;
        o.extended_l2 = ext;
        o.refcount_bits = rb;
        let img = dir.path("rand.qcow2");
        let q = block_on(qcow::create(FileIo::create(&img).unwrap(), &o)).unwrap();
        let al = q.geometry().subcluster_size;
        let mut model = vec![0u8; size as usize];
        for round in 0..4 {
            for _ in 0..60 {
                let off = rnd(size);
                let len = (rnd(4 * cs) + 1).min(size - off);
                match rnd(10) {
                    0..=5 => {
                        let v = rnd(256) as u8;
                        block_on(q.write(off, &vec![v; len as usize], &NoBacking)).unwrap();
                        model[off as usize..(off + len) as usize].fill(v);
                    }
                    6 | 7 => {
                        let s = off / al * al;
                        let e = ((off + len).div_ceil(al) * al).min(size);
                        block_on(q.write_zeroes(s, e - s, rnd(2) == 0)).unwrap();
                        model[s as usize..e as usize].fill(0);
                    }
                    _ => {
                        block_on(q.discard(off, len)).unwrap();
                        let s = off.div_ceil(cs) * cs;
                        let e = if off + len == size {
                            size
                        } else {
                            (off + len) / cs * cs
                        };
                        if s < e {
                            model[s as usize..e as usize].fill(0);
                        }
                    }
                }
            }
            // After a flush, the clusters reserved and not used yet count
            // as leaks for qemu-img (they would be after a crash); after a
            // clean close (which gives them back), the image is clean. The
            // image stays open and takes more writes after both.
            block_on(q.flush()).unwrap();
            let what = format!("seed {seed} cs {cs} ext {ext} round {round}");
            assert_same(&read_through_crate(&q, &NoBacking), &model, &what);
            qemu_check_no_corruption(&img);
            block_on(q.close()).unwrap();
            qemu_check_clean(&img);
        }
        block_on(q.close()).unwrap();
        drop(q);
        let raw = dir.path("ref.raw");
        std::fs::write(&raw, &model).unwrap();
        run(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                img.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
    }
}

/// Internal snapshots made by qemu-img: the active layer reads right, the
/// checker counts snapshot references, and writes through the crate copy
/// shared clusters so that the snapshot keeps its content.
#[test]
fn images_with_snapshots() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("snap");
    let img = dir.path("s.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"],
    );
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 1M".into(),
            "write -c -P 0x22 2M 64k".into(),
        ],
    );
    run(
        "qemu-img",
        &["snapshot", "-c", "snap1", img.to_str().unwrap()],
    );
    qemu_io(&img, &["write -P 0x33 64k 64k".into()]);
    let before_snapshot = {
        let raw = dir.path("snap.raw");
        run(
            "qemu-img",
            &[
                "convert",
                "-l",
                "snapshot.name=snap1",
                "-O",
                "raw",
                img.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        std::fs::read(raw).unwrap()
    };
    let q = block_on(Qcow2::open(
        FileIo::open(&img, true).unwrap(),
        OpenOptions::read_write(),
    ))
    .unwrap();
    assert_eq!(q.snapshots().len(), 1);
    assert_eq!(q.snapshots()[0].name, "snap1");
    let r = block_on(q.check(Repair::None)).unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
    let mut model = to_raw(&img, &dir);
    assert_same(&read_through_crate(&q, &NoBacking), &model, "active layer");
    // Overwrite shared clusters (normal and compressed) partially.
    for (off, len) in [(1000u64, 100usize), (2 << 20, 5000), (900_000, 200_000)] {
        block_on(q.write(off, &vec![0x44; len], &NoBacking)).unwrap();
        model[off as usize..off as usize + len].fill(0x44);
    }
    block_on(q.discard(512 << 10, 64 << 10)).unwrap();
    model[512 << 10..576 << 10].fill(0);
    block_on(q.close()).unwrap();
    drop(q);
    qemu_check_clean(&img);
    assert_same(&to_raw(&img, &dir), &model, "after writes");
    let raw = dir.path("snap2.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-l",
            "snapshot.name=snap1",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert_same(
        &std::fs::read(raw).unwrap(),
        &before_snapshot,
        "snapshot kept",
    );
}

fn corrupt_copy(src: &Path, dst: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut d = std::fs::read(src).unwrap();
    f(&mut d);
    std::fs::write(dst, d).unwrap();
}

/// Hostile images give a clear error or the corrupt flag, never a panic.
#[test]
fn hostile_images() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("hostile");
    let good = dir.path("good.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", good.to_str().unwrap(), "16M"],
    );
    qemu_io(&good, &["write -P 0x11 0 256k".into()]);
    let be64 = |d: &[u8], o: usize| u64::from_be_bytes(d[o..o + 8].try_into().unwrap());
    let put64 = |d: &mut Vec<u8>, o: usize, v: u64| d[o..o + 8].copy_from_slice(&v.to_be_bytes());
    let hdr = std::fs::read(&good).unwrap();
    let l1 = be64(&hdr, 40) as usize;
    let rt = be64(&hdr, 48) as usize;
    let l2 = (be64(&hdr, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let rb = be64(&hdr, rt) as usize;
    type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mutation, bool)> = vec![
        (
            "truncated L1",
            Box::new(move |d: &mut Vec<u8>| d.truncate(l1 + 4)),
            false,
        ),
        (
            "L1 larger than the file",
            Box::new(|d: &mut Vec<u8>| d[36..40].copy_from_slice(&0x0100_0000u32.to_be_bytes())),
            false,
        ),
        (
            "L1 past the end of the file",
            Box::new(|d: &mut Vec<u8>| d[36..40].copy_from_slice(&100_000u32.to_be_bytes())),
            false,
        ),
        (
            "huge size",
            Box::new(|d: &mut Vec<u8>| d[24..32].copy_from_slice(&u64::MAX.to_be_bytes())),
            false,
        ),
        (
            "refcount table huge",
            Box::new(|d: &mut Vec<u8>| d[56..60].copy_from_slice(&u32::MAX.to_be_bytes())),
            false,
        ),
        (
            "L2 entry past EOF",
            Box::new(move |d: &mut Vec<u8>| put64(d, l2, (1u64 << 40) | (1 << 63))),
            true,
        ),
        (
            "L2 entry into the L1 table",
            Box::new(move |d: &mut Vec<u8>| put64(d, l2 + 8, l1 as u64 | (1 << 63))),
            true,
        ),
        (
            "L2 entry unaligned",
            Box::new(move |d: &mut Vec<u8>| put64(d, l2 + 16, 0x50200 | (1 << 63))),
            true,
        ),
        (
            "L1 entry into the refcount table",
            Box::new(move |d: &mut Vec<u8>| put64(d, l1, rt as u64 | (1 << 63))),
            true,
        ),
        (
            "refcount zero for used clusters",
            Box::new(move |d: &mut Vec<u8>| d[rb..rb + 64].fill(0)),
            true,
        ),
        (
            "unknown incompatible bit",
            Box::new(|d: &mut Vec<u8>| d[79] |= 1 << 6),
            false,
        ),
        ("LUKS", Box::new(|d: &mut Vec<u8>| d[35] = 2), false),
    ];
    for (name, mutate, opens) in cases {
        let p = dir.path("bad.qcow2");
        corrupt_copy(&good, &p, mutate);
        let r = block_on(Qcow2::open(
            FileIo::open(&p, true).unwrap(),
            OpenOptions::read_write(),
        ));
        match r {
            Err(e) => {
                assert!(!opens, "{name}: refused to open: {e}");
                eprintln!("{name}: {e}");
            }
            Ok(q) => {
                assert!(opens, "{name}: opened");
                let mut buf = vec![0u8; 1 << 20];
                let read = block_on(q.read(0, &mut buf, &NoBacking));
                let write = block_on(q.write(4096, &[1u8; 4096], &NoBacking));
                let check = block_on(q.check(Repair::None));
                eprintln!(
                    "{name}: read {read:?} write {:?} check {:?}",
                    write.is_ok(),
                    check.as_ref().map(|c| (c.corruptions, c.leaks))
                );
                let found =
                    read.is_err() || write.is_err() || check.is_ok_and(|c| c.corruptions > 0);
                assert!(found, "{name}: nothing noticed");
            }
        }
    }
}

/// Snapshots made by the crate are seen by qemu-img, and snapshots made by
/// qemu-img are reverted and deleted by the crate.
#[test]
fn snapshot_operations_agree_with_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("snapops");
    let img = dir.path("s.qcow2");
    let o = CreateOptions::new(4 << 20);
    let q = block_on(qcow::create(FileIo::create(&img).unwrap(), &o)).unwrap();
    block_on(q.write(0, &vec![0x21u8; 300_000], &NoBacking)).unwrap();
    let first = read_through_crate(&q, &NoBacking);
    block_on(q.snapshot_create("mine")).unwrap();
    block_on(q.write(100_000, &vec![0x22u8; 300_000], &NoBacking)).unwrap();
    block_on(q.close()).unwrap();
    drop(q);
    qemu_check_clean(&img);
    let list = run("qemu-img", &["snapshot", "-l", img.to_str().unwrap()]);
    assert!(list.contains("mine"), "{list}");
    let raw = dir.path("snap.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-l",
            "snapshot.name=mine",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert_same(
        &std::fs::read(&raw).unwrap(),
        &first,
        "crate snapshot read by qemu",
    );
    // qemu-img makes a snapshot; the crate reverts to it and deletes both.
    run(
        "qemu-img",
        &["snapshot", "-c", "theirs", img.to_str().unwrap()],
    );
    let theirs = to_raw(&img, &dir);
    qemu_io(&img, &["write -P 0x23 0 1M".into()]);
    let q = block_on(Qcow2::open(
        FileIo::open(&img, true).unwrap(),
        OpenOptions::read_write(),
    ))
    .unwrap();
    block_on(q.snapshot_revert("theirs")).unwrap();
    assert_same(&read_through_crate(&q, &NoBacking), &theirs, "reverted");
    block_on(q.snapshot_delete("mine")).unwrap();
    block_on(q.close()).unwrap();
    drop(q);
    qemu_check_clean(&img);
    assert_same(&to_raw(&img, &dir), &theirs, "after delete");
    let list = run("qemu-img", &["snapshot", "-l", img.to_str().unwrap()]);
    assert!(list.contains("theirs") && !list.contains("mine"), "{list}");
}

/// External data files both ways: qemu-img's images read through the crate,
/// the crate's images accepted by qemu-img.
#[test]
fn external_data_files() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("datafile");
    for raw in [false, true] {
        let img = dir.path("meta.qcow2");
        let data = dir.path("data.raw");
        let _ = std::fs::remove_file(&data);
        let o = format!(
            "data_file={},data_file_raw={}",
            data.display(),
            if raw { "on" } else { "off" }
        );
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &o,
                img.to_str().unwrap(),
                "4M",
            ],
        );
        qemu_io(
            &img,
            &[
                "write -P 0x61 0 100k".into(),
                "write -P 0x62 1000000 5000".into(),
                "write -z 64k 64k".into(),
                "discard 2M 64k".into(),
            ],
        );
        let expect = to_raw(&img, &dir);
        let q = block_on(Qcow2::open_with_data_file(
            FileIo::open(&img, false).unwrap(),
            Some(FileIo::open(&data, false).unwrap()),
            OpenOptions::read_only(),
        ))
        .unwrap();
        assert_eq!(q.info().data_file.as_deref(), Some(data.to_str().unwrap()));
        assert_same(
            &read_through_data_file(&q),
            &expect,
            &format!("qemu's data file image, raw {raw}"),
        );
        assert!(block_on(q.check(Repair::None)).unwrap().is_clean());
        drop(q);

        let mut co = CreateOptions::new(4 << 20);
        co.data_file = Some(data.to_str().unwrap().into());
        co.data_file_raw = raw;
        let _ = std::fs::remove_file(&data);
        let q = block_on(qcow::create_with_data_file(
            FileIo::create(&img).unwrap(),
            FileIo::create(&data).unwrap(),
            &co,
        ))
        .unwrap();
        let mut model = vec![0u8; 4 << 20];
        for (off, len, v) in [
            (5u64, 100usize, 1u8),
            (70000, 200_000, 2),
            ((4 << 20) - 10, 10, 3),
        ] {
            block_on(q.write(off, &vec![v; len], &NoBacking)).unwrap();
            model[off as usize..off as usize + len].fill(v);
        }
        if !raw {
            block_on(q.discard(65536 * 2, 65536)).unwrap();
            model[65536 * 2..65536 * 3].fill(0);
        }
        block_on(q.close()).unwrap();
        drop(q);
        qemu_check_clean(&img);
        assert_same(
            &to_raw(&img, &dir),
            &model,
            &format!("crate's data file image, raw {raw}"),
        );
        if raw {
            assert_same(
                &std::fs::read(&data).unwrap(),
                &model,
                "raw data file content",
            );
        }
    }
}

fn read_through_data_file(q: &Qcow2<FileIo>) -> Vec<u8> {
    let mut out = vec![0u8; q.size() as usize];
    block_on(q.read(0, &mut out, &NoBacking)).unwrap();
    out
}

/// Growing and shrinking through the crate; qemu-img agrees.
#[test]
fn resize_agrees_with_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("resize");
    let img = dir.path("r.qcow2");
    let q = block_on(qcow::create(
        FileIo::create(&img).unwrap(),
        &CreateOptions::new(1 << 20),
    ))
    .unwrap();
    block_on(q.write(1000, &[1u8; 5000], &NoBacking)).unwrap();
    block_on(q.resize(3 << 30)).unwrap();
    block_on(q.write((3 << 30) - 70000, &[2u8; 70000], &NoBacking)).unwrap();
    block_on(q.write((1 << 30) + 12345, &[3u8; 200_000], &NoBacking)).unwrap();
    block_on(q.resize((1 << 30) + 65536)).unwrap();
    block_on(q.close()).unwrap();
    drop(q);
    qemu_check_clean(&img);
    let info = run("qemu-img", &["info", img.to_str().unwrap()]);
    assert!(
        info.contains(&format!("{} bytes", (1u64 << 30) + 65536)),
        "{info}"
    );
    let mut model = vec![0u8; (1 << 30) + 65536];
    model[1000..6000].fill(1);
    model[(1 << 30) + 12345..].fill(3);
    let raw = dir.path("ref.raw");
    std::fs::write(&raw, &model).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
}

//! The `qcow2_meta` fuzz target (`qcow::fuzzing`) on stable Rust: the committed
//! corpus (`fuzz/corpus/qcow2_meta/`) replayed, then a deterministic mutation
//! fuzzer that knows the format a little (it aims at the header and the first
//! clusters, where the tables are, and writes boundary values as 8-byte fields).
//!
//! `corpus_replays` and `fuzz_smoke` run with every `cargo test`. The long run is
//! ignored by default:
//!
//! ```text
//! FUZZ_SECS=300 FUZZ_SEED=1 cargo test -p qcow --release --test fuzz -- --ignored --nocapture
//! ```
//!
//! Inputs that panic or take longer than the per-case guard are saved under the temp
//! directory and reported (a case that hangs aborts the process after saving its
//! input); `FUZZ_INPUT=<file> cargo test -p qcow --test fuzz corpus_replays` replays
//! one. docs/fuzzing.md has the cargo-fuzz runs.

use qcow::fuzzing::Rng;
use qcow::fuzzing::{qcow2_meta, CONTROL_LEN};
use qcow::{
    block_on, create, CompressionType, CreateOptions, MemIo, NoBacking, OpenOptions, Qcow2, Repair,
};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest one case may take (debug build) before it counts as a hang.
const CASE_LIMIT: Duration = Duration::from_secs(20);

/// Small valid images covering the format's variants.
fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    type Variant = Box<dyn Fn(&mut CreateOptions)>;
    let variants: Vec<Variant> = vec![
        Box::new(|o| o.cluster_size = 512),
        Box::new(|o| {
            o.cluster_size = 512;
            o.refcount_bits = 1
        }),
        Box::new(|o| {
            o.cluster_size = 4096;
            o.refcount_bits = 64
        }),
        Box::new(|o| o.compat = qcow::Compat::V2),
        Box::new(|o| {
            o.cluster_size = 16384;
            o.extended_l2 = true
        }),
        Box::new(|o| {
            o.cluster_size = 4096;
            o.backing_file = Some("base.img".into());
            o.backing_fmt = Some("raw".into());
            o.lazy_refcounts = true;
            o.compression_type = CompressionType::Zstd
        }),
    ];
    // An image with an external data file (opened with an empty one).
    {
        let mut o = CreateOptions::new(1 << 20);
        o.cluster_size = 4096;
        o.data_file = Some("data.raw".into());
        let img = block_on(qcow::create_with_data_file(MemIo::new(), MemIo::new(), &o)).unwrap();
        block_on(img.write(5000, &[3u8; 30000], &NoBacking)).unwrap();
        block_on(img.close()).unwrap();
        out.push(img.io().to_vec());
    }
    for (i, v) in variants.iter().enumerate() {
        let mut o = CreateOptions::new(1 << 20);
        o.cluster_size = 4096;
        v(&mut o);
        let img = block_on(create(MemIo::new(), &o)).unwrap();
        let mut r = Rng(i as u64 + 7);
        for _ in 0..12 {
            let off = r.below(1 << 20);
            let len = (r.below(20000) + 1).min((1 << 20) - off);
            block_on(img.write(off, &vec![r.next_u64() as u8; len as usize], &NoBacking)).unwrap();
        }
        let al = img.geometry().subcluster_size;
        block_on(img.write_zeroes(al * 4, al, true)).unwrap();
        block_on(img.discard(0, 65536)).unwrap();
        let cs = img.geometry().cluster_size as usize;
        for k in 0..3 {
            let data: Vec<u8> = (0..cs).map(|b| (b / 100 + k) as u8).collect();
            block_on(img.write_compressed((256 << 10) + (k * cs) as u64, &data)).unwrap();
        }
        block_on(img.close()).unwrap();
        out.push(img.io().to_vec());
    }
    out
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    7,
    0x200,
    0x1000,
    0x10000,
    0x8000_0000,
    0xffff_ffff,
    1 << 40,
    1 << 62,
    u64::MAX,
    0x7fff_ffff_ffff_fe00,
];

fn mutate(r: &mut Rng, d: &mut Vec<u8>) {
    let n = r.below(4) + 1;
    for _ in 0..n {
        let len = d.len().max(1) as u64;
        // Most mutations hit the first clusters (header and tables).
        let hot = if r.below(3) == 0 {
            len
        } else {
            len.min(4 * 4096)
        };
        let pos = r.below(hot) as usize;
        match r.below(8) {
            0 => {
                if pos < d.len() {
                    d[pos] ^= 1 << r.below(8);
                }
            }
            1 => {
                if pos < d.len() {
                    d[pos] = r.next_u64() as u8;
                }
            }
            2 | 3 => {
                let p = pos & !7;
                if p + 8 <= d.len() {
                    let v = INTERESTING[r.below(INTERESTING.len() as u64) as usize];
                    let v = if r.below(2) == 0 {
                        v
                    } else {
                        v.wrapping_add(r.below(3)).wrapping_sub(1)
                    };
                    d[p..p + 8].copy_from_slice(&v.to_be_bytes());
                }
            }
            4 => {
                let p = pos & !3;
                if p + 4 <= d.len() {
                    let v = INTERESTING[r.below(INTERESTING.len() as u64) as usize] as u32;
                    d[p..p + 4].copy_from_slice(&v.to_be_bytes());
                }
            }
            5 => d.truncate(pos),
            6 => {
                // Header fields specifically.
                let f = [
                    4usize, 8, 16, 20, 24, 32, 36, 40, 48, 56, 60, 64, 72, 80, 88, 96, 100, 104,
                ];
                let p = f[r.below(f.len() as u64) as usize];
                if p + 8 <= d.len() {
                    let v = INTERESTING[r.below(INTERESTING.len() as u64) as usize];
                    d[p..p + 8].copy_from_slice(&v.to_be_bytes());
                }
            }
            _ => {
                // Copy an 8-byte entry somewhere else (valid-looking offsets).
                let a = r.below(len) as usize & !7;
                if a + 8 <= d.len() && pos + 8 <= d.len() {
                    let v: [u8; 8] = d[a..a + 8].try_into().unwrap();
                    let p = pos & !7;
                    d[p..p + 8].copy_from_slice(&v);
                }
            }
        }
    }
}

/// Exercises one image with operations chosen by `r`, through the fuzz target;
/// returns whether it opened.
fn exercise(data: Vec<u8>, r: &mut Rng) -> bool {
    let flags = r.next_u64() as u8;
    qcow::fuzzing::exercise(data, flags, r.next_u64())
}

/// The input of the fuzz target for an image (the control bytes in front).
fn target_input(image: &[u8], flags: u8, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; CONTROL_LEN];
    v[0] = flags;
    v[8..16].copy_from_slice(&seed.to_le_bytes());
    v.extend_from_slice(image);
    v
}

/// The case running now: when it started, where its input goes, its bytes.
type Running = Arc<Mutex<Option<(Instant, PathBuf, Vec<u8>)>>>;

/// Aborts the process when the case in `current` has run longer than `limit`,
/// after saving its input (a hang cannot be interrupted from inside).
fn watchdog(current: Running, limit: Duration) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(100));
        let guard = current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((start, path, data)) = guard.as_ref() {
            if start.elapsed() > limit {
                let _ = std::fs::write(path, data);
                eprintln!(
                    "case ran longer than {limit:?}; input in {}",
                    path.display()
                );
                std::process::abort();
            }
        }
    });
}

fn run(iterations: u64, secs: u64, seed: u64) -> (u64, u64, Vec<String>) {
    let seeds = seeds();
    let mut r = Rng(seed | 1);
    let start = std::time::Instant::now();
    let mut crashes = Vec::new();
    let mut i = 0;
    let mut opened = 0;
    let current: Running = Arc::default();
    watchdog(Arc::clone(&current), CASE_LIMIT);
    while i < iterations && start.elapsed().as_secs() < secs {
        let mut d = seeds[r.below(seeds.len() as u64) as usize].clone();
        mutate(&mut r, &mut d);
        let mut r2 = Rng(r.next_u64() | 1);
        // What the cargo-fuzz target would take to do the same.
        let mut r3 = Rng(r2.0);
        let (flags, seed) = (r3.next_u64() as u8, r3.next_u64());
        let input = target_input(&d, flags, seed);
        let hang = std::env::temp_dir().join(format!("qcow-fuzz-hang-{seed}-{i}.bin"));
        *current.lock().unwrap() = Some((Instant::now(), hang, input.clone()));
        let t = std::time::Instant::now();
        let res = catch_unwind(AssertUnwindSafe(|| exercise(d, &mut r2)));
        *current.lock().unwrap() = None;
        if matches!(res, Ok(true)) {
            opened += 1;
        }
        if res.is_err() {
            let p = std::env::temp_dir().join(format!("qcow-fuzz-crash-{seed}-{i}.bin"));
            std::fs::write(&p, &input).unwrap();
            crashes.push(p.display().to_string());
        }
        if t.elapsed().as_secs() >= 5 {
            let p = std::env::temp_dir().join(format!("qcow-fuzz-slow-{seed}-{i}.bin"));
            std::fs::write(&p, &input).unwrap();
            crashes.push(format!("slow ({:?}): {}", t.elapsed(), p.display()));
        }
        i += 1;
    }
    (i, opened, crashes)
}

/// The corpus of the cargo-fuzz target, in name order.
fn corpus() -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/qcow2_meta");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let d = std::fs::read(&p).unwrap();
            (p, d)
        })
        .collect()
}

#[test]
fn corpus_replays() {
    if let Ok(file) = std::env::var("FUZZ_INPUT") {
        qcow2_meta(&std::fs::read(file).unwrap());
        return;
    }
    let corpus = corpus();
    assert!(corpus.len() >= 10, "{} corpus files", corpus.len());
    let current: Running = Arc::default();
    watchdog(Arc::clone(&current), CASE_LIMIT);
    let mut failures = Vec::new();
    for (path, data) in &corpus {
        *current.lock().unwrap() = Some((Instant::now(), path.clone(), data.clone()));
        if catch_unwind(AssertUnwindSafe(|| qcow2_meta(data))).is_err() {
            failures.push(path.display().to_string());
        }
        *current.lock().unwrap() = None;
    }
    assert!(failures.is_empty(), "failing corpus files: {failures:?}");
}

#[test]
fn library_seeds_are_valid() {
    let seeds = qcow::fuzzing::seeds();
    assert!(seeds.len() >= 10);
    for (name, s) in seeds {
        let img = block_on(Qcow2::open_with_data_file(
            MemIo::from_vec(s[CONTROL_LEN..].to_vec()),
            Some(MemIo::from_vec(vec![0; 1 << 20])),
            OpenOptions::read_write(),
        ))
        .unwrap();
        let r = block_on(img.check(Repair::None)).unwrap();
        assert!(r.is_clean(), "seed {name}: {:?}", r.messages);
    }
}

/// Writes the library's seeds into `fuzz/corpus/qcow2_meta` (run after changing
/// the input layout).
#[test]
#[ignore]
fn write_seed_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/qcow2_meta");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in qcow::fuzzing::seeds() {
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    }
}

#[test]
fn seeds_are_valid() {
    for (i, s) in seeds().into_iter().enumerate() {
        let img = block_on(Qcow2::open_with_data_file(
            MemIo::from_vec(s),
            Some(MemIo::from_vec(vec![0; 1 << 20])),
            OpenOptions::read_write(),
        ))
        .unwrap();
        let m = block_on(img.map(0, img.size())).unwrap();
        assert!(m.len() >= 3, "seed {i}: {m:?}");
        let r = block_on(img.check(Repair::None)).unwrap();
        assert!(r.is_clean(), "seed {i}: {:?}", r.messages);
    }
}

#[test]
fn fuzz_smoke() {
    let (n, opened, crashes) = run(10_000, 20, 42);
    assert!(crashes.is_empty(), "{n} iterations, crashes: {crashes:?}");
    eprintln!("fuzz_smoke: {n} iterations, {opened} opened");
    assert!(opened > n / 4, "only {opened} of {n} mutated images opened");
}

#[test]
#[ignore]
fn fuzz() {
    let secs = std::env::var("FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let (n, opened, crashes) = run(u64::MAX, secs, seed);
    println!(
        "fuzz: seed {seed}: {n} iterations ({opened} opened) in {secs} s, {} problems",
        crashes.len()
    );
    assert!(crashes.is_empty(), "crashes: {crashes:?}");
}

/// Found by cargo-fuzz (`fuzz/corpus/qcow2_meta/crash-header-length-104`): a version
/// 3 image with the 104-byte header of QEMU before 5.1 panicked when its header was
/// written back (a snapshot, a resize).
#[test]
fn v3_image_with_104_byte_header_is_writable() {
    let o = CreateOptions::new(1 << 20);
    let img = block_on(create(MemIo::new(), &o)).unwrap();
    block_on(img.close()).unwrap();
    let mut d = img.io().to_vec();
    // header_length = 104: the extensions then start at byte 104, where the
    // compression type and padding (zeroes) read as the end of the extensions.
    d[100..104].copy_from_slice(&104u32.to_be_bytes());
    d[104..112].fill(0);
    let img = block_on(Qcow2::open(MemIo::from_vec(d), OpenOptions::read_write())).unwrap();
    block_on(img.write(4096, &[9u8; 4096], &NoBacking)).unwrap();
    // Both rewrite the header.
    block_on(img.snapshot_create("s")).unwrap();
    block_on(img.resize(2 << 20)).unwrap();
    block_on(img.close()).unwrap();
    let img = block_on(Qcow2::open(
        MemIo::from_vec(img.io().to_vec()),
        OpenOptions::default(),
    ))
    .unwrap();
    let mut buf = [0u8; 4096];
    block_on(img.read(4096, &mut buf, &NoBacking)).unwrap();
    assert_eq!(buf, [9u8; 4096]);
}

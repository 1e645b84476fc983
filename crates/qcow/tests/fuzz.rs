//! A deterministic mutation fuzzer for header and table parsing, mapping,
//! reading, writing and checking (stable Rust, no cargo-fuzz).
//!
//! `fuzz_smoke` runs a few hundred iterations with every `cargo test`.
//! The long run is ignored by default:
//!
//! ```text
//! FUZZ_SECS=300 FUZZ_SEED=1 cargo test -p qcow --release --test fuzz -- --ignored --nocapture
//! ```
//!
//! Inputs that panic are saved under the temp directory and reported.

use qcow::{
    block_on, create, CompressionType, CreateOptions, MemIo, NoBacking, OpenOptions, Qcow2, Repair,
};
use std::panic::{catch_unwind, AssertUnwindSafe};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

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
            block_on(img.write(off, &vec![r.next() as u8; len as usize], &NoBacking)).unwrap();
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
                    d[pos] = r.next() as u8;
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

/// Exercises one input; must not panic.
fn exercise(data: Vec<u8>, r: &mut Rng) -> bool {
    let writable = r.below(2) == 0;
    let opts = OpenOptions {
        writable,
        l2_cache_size: Some(8192),
        ..Default::default()
    };
    let data_file = Some(MemIo::from_vec(vec![0x77; 1 << 16]));
    let Ok(img) = block_on(Qcow2::open_with_data_file(
        MemIo::from_vec(data),
        data_file,
        opts,
    )) else {
        return false;
    };
    let size = img.size();
    let span = size.min(4 << 20);
    if span > 0 {
        let _ = block_on(img.map(0, span));
        for _ in 0..4 {
            let off = r.below(span);
            let len = (r.below(70000) + 1).min(span - off);
            let mut buf = vec![0u8; len as usize];
            let _ = block_on(img.read(off, &mut buf, &NoBacking));
        }
        if writable {
            for _ in 0..4 {
                let off = r.below(span);
                let len = (r.below(20000) + 1).min(span - off);
                match r.below(4) {
                    0 | 1 => {
                        let _ = block_on(img.write(off, &vec![1u8; len as usize], &NoBacking));
                    }
                    2 => {
                        let _ = block_on(img.discard(off, len));
                    }
                    _ => {
                        let al = img.geometry().subcluster_size;
                        let s = off / al * al;
                        let _ = block_on(img.write_zeroes(s, al.min(size - s), r.below(2) == 0));
                    }
                }
            }
            if r.below(8) == 0 {
                let _ = block_on(img.resize(r.below(8 << 20)));
            }
            if r.below(8) == 0 {
                let _ = block_on(img.snapshot_create("s"));
                let _ = block_on(img.write(0, &[2u8; 5000], &NoBacking));
                let _ = block_on(img.snapshot_revert("s"));
                let _ = block_on(img.snapshot_delete("s"));
            }
            let _ = block_on(img.flush());
        }
    }
    let _ = block_on(img.check(if writable && r.below(2) == 0 {
        Repair::All
    } else {
        Repair::None
    }));
    let _ = block_on(img.close());
    true
}

fn run(iterations: u64, secs: u64, seed: u64) -> (u64, u64, Vec<String>) {
    let seeds = seeds();
    let mut r = Rng(seed | 1);
    let start = std::time::Instant::now();
    let mut crashes = Vec::new();
    let mut i = 0;
    let mut opened = 0;
    std::panic::set_hook(Box::new(|_| {}));
    while i < iterations && start.elapsed().as_secs() < secs {
        let mut d = seeds[r.below(seeds.len() as u64) as usize].clone();
        mutate(&mut r, &mut d);
        let mut r2 = Rng(r.next() | 1);
        let input = d.clone();
        let t = std::time::Instant::now();
        let res = catch_unwind(AssertUnwindSafe(|| exercise(d, &mut r2)));
        if matches!(res, Ok(true)) {
            opened += 1;
        }
        if res.is_err() {
            let p = std::env::temp_dir().join(format!("qcow-fuzz-crash-{seed}-{i}.qcow2"));
            std::fs::write(&p, &input).unwrap();
            crashes.push(p.display().to_string());
        }
        if t.elapsed().as_secs() >= 5 {
            let p = std::env::temp_dir().join(format!("qcow-fuzz-slow-{seed}-{i}.qcow2"));
            std::fs::write(&p, &input).unwrap();
            crashes.push(format!("slow ({:?}): {}", t.elapsed(), p.display()));
        }
        i += 1;
    }
    let _ = std::panic::take_hook();
    (i, opened, crashes)
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
    let (n, opened, crashes) = run(300, 20, 42);
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

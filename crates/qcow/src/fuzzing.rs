//! The `qcow2_meta` fuzz target, shared by the cargo-fuzz crate (`fuzz/`) and the
//! stable harness (`tests/fuzz.rs`): an image from fuzz bytes is opened, mapped,
//! read, written, discarded, resized, snapshotted, checked and repaired. None of it
//! may panic, hang, or allocate without bound, whatever the header and tables say.
//!
//! Input layout: 16 control bytes, then the image file.
//!
//! | bytes | meaning |
//! |-------|---------|
//! | 0     | bit 0 open writable, bit 1 repair in `check`, bit 2 resize, bit 3 snapshot create/revert/delete, bit 4 store and remove persistent bitmaps |
//! | 1..8  | unused |
//! | 8..16 | seed (little endian) for the offsets and lengths of the operations |
//! | 16..  | the image; an external data file, if the image names one, is 64 KiB of 0x77 |

use crate::{
    block_on, create, create_with_data_file, CompressionType, CreateOptions, MemIo, NoBacking,
    OpenOptions, Qcow2, Repair,
};

/// Bytes before the image.
pub const CONTROL_LEN: usize = 16;

/// Most bytes of guest data an input touches (reads, writes, resizes stay below).
const SPAN: u64 = 4 << 20;

/// xorshift64*, for the operations' offsets and lengths (and the stable harness's
/// mutations).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// Runs one input.
pub fn qcow2_meta(data: &[u8]) {
    if data.len() < CONTROL_LEN {
        return;
    }
    let flags = data[0];
    let seed = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    exercise(data[CONTROL_LEN..].to_vec(), flags, seed);
}

/// Opens `image` and works on it; returns whether it opened.
pub fn exercise(image: Vec<u8>, flags: u8, seed: u64) -> bool {
    let mut r = Rng(seed | 1);
    let writable = flags & 1 != 0;
    let opts = OpenOptions {
        writable,
        l2_cache_size: Some(8192),
        ..Default::default()
    };
    let data_file = Some(MemIo::from_vec(vec![0x77; 1 << 16]));
    let Ok(img) = block_on(Qcow2::open_with_data_file(
        MemIo::from_vec(image),
        data_file,
        opts,
    )) else {
        return false;
    };
    let size = img.size();
    let span = size.min(SPAN);
    // Persistent bitmaps: their directory was parsed at open; tables and data
    // are read here.
    let _ = block_on(img.load_bitmaps());
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
            if flags & 4 != 0 {
                let _ = block_on(img.resize(r.below(2 * SPAN)));
            }
            if flags & 16 != 0 {
                let size = img.size();
                let words: Vec<u64> = (0..size.div_ceil(512).div_ceil(64))
                    .map(|_| r.next_u64() & r.next_u64())
                    .collect();
                let b = crate::StoreBitmap {
                    name: "f",
                    granularity: 512,
                    enabled: true,
                    words: &words,
                };
                let _ = block_on(img.store_bitmaps(&[b]));
                if let Some(first) = img.bitmaps().first() {
                    let _ = block_on(img.remove_bitmap(&first.name));
                }
                let _ = block_on(img.release_bitmaps());
            }
            if flags & 8 != 0 {
                let _ = block_on(img.snapshot_create("s"));
                let _ = block_on(img.write(0, &[2u8; 5000], &NoBacking));
                let _ = block_on(img.snapshot_revert("s"));
                let _ = block_on(img.snapshot_delete("s"));
            }
            let _ = block_on(img.flush());
        }
    }
    let repair = if writable && flags & 2 != 0 {
        Repair::All
    } else {
        Repair::None
    };
    let _ = block_on(img.check(repair));
    let _ = block_on(img.close());
    true
}

/// Small valid images covering the format's variants (each a few KiB: 512-byte
/// clusters, 64 KiB of guest data), with the control bytes in front.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    type Variant = (&'static str, fn(&mut CreateOptions));
    let variants: [Variant; 9] = [
        ("plain", |_| {}),
        ("refcount1", |o| o.refcount_bits = 1),
        ("refcount64", |o| o.refcount_bits = 64),
        ("v2", |o| o.compat = crate::Compat::V2),
        ("extended-l2", |o| {
            o.cluster_size = 16384;
            o.extended_l2 = true
        }),
        ("backing-lazy-zstd", |o| {
            // The header extensions need more than 512 bytes.
            o.cluster_size = 1024;
            o.backing_file = Some("base.img".into());
            o.backing_fmt = Some("raw".into());
            o.lazy_refcounts = true;
            o.compression_type = CompressionType::Zstd
        }),
        ("cluster4k", |o| o.cluster_size = 4096),
        ("empty", |_| {}),
        // The bitmaps extension needs more than 512 bytes of header cluster.
        ("bitmaps", |o| o.cluster_size = 1024),
    ];
    let mut out = Vec::new();
    for (i, (name, v)) in variants.iter().enumerate() {
        let mut o = CreateOptions::new(64 << 10);
        o.cluster_size = 512;
        v(&mut o);
        let Ok(img) = block_on(create(MemIo::new(), &o)) else {
            continue;
        };
        // Large clusters make large images: fewer writes there.
        let writes = if o.cluster_size > 512 { 1 } else { 4 };
        if *name != "empty" {
            let mut r = Rng(i as u64 + 7);
            for _ in 0..writes {
                let off = r.below(64 << 10);
                let len = (r.below(3000) + 1).min((64 << 10) - off);
                let off = if writes == 1 { 0 } else { off };
                let _ =
                    block_on(img.write(off, &vec![r.next_u64() as u8; len as usize], &NoBacking));
            }
            let al = img.geometry().subcluster_size;
            let _ = block_on(img.write_zeroes(al * 4, al, true));
            let _ = block_on(img.discard(0, al.max(4096)));
            let cs = img.geometry().cluster_size as usize;
            let data: Vec<u8> = (0..cs).map(|b| (b / 100) as u8).collect();
            if writes > 1 {
                let _ = block_on(img.write_compressed(32 << 10, &data));
            }
            if *name == "bitmaps" {
                let ones = vec![u64::MAX; 2];
                let some = vec![0x0f0f_0000_ffff_0001u64, 1 << 63];
                let _ = block_on(img.store_bitmaps(&[
                    crate::StoreBitmap {
                        name: "ones",
                        granularity: 512,
                        enabled: true,
                        words: &ones,
                    },
                    crate::StoreBitmap {
                        name: "some",
                        granularity: 512,
                        enabled: false,
                        words: &some,
                    },
                ]));
            }
            if *name == "plain" {
                let _ = block_on(img.snapshot_create("snap"));
                let _ = block_on(img.write(0, &[5u8; 1024], &NoBacking));
            }
        }
        let _ = block_on(img.close());
        let image = img.io().to_vec();
        for (flags, suffix) in [(0u8, "-ro"), (1 | 2 | 4 | 8 | 16, "-rw")] {
            // Large images once only (they make the corpus large).
            if flags == 0 && image.len() > 20 << 10 {
                continue;
            }
            let mut v = vec![0u8; CONTROL_LEN];
            v[0] = flags;
            v[8] = i as u8 + 1;
            v.extend_from_slice(&image);
            out.push((format!("{name}{suffix}"), v));
        }
    }
    // An image with an external data file.
    let mut o = CreateOptions::new(64 << 10);
    o.cluster_size = 1024;
    o.data_file = Some("data.raw".into());
    if let Ok(img) = block_on(create_with_data_file(MemIo::new(), MemIo::new(), &o)) {
        let _ = block_on(img.write(5000, &[3u8; 3000], &NoBacking));
        let _ = block_on(img.close());
        let mut v = vec![0u8; CONTROL_LEN];
        v[0] = 1 | 2;
        v.extend_from_slice(&img.io().to_vec());
        out.push(("data-file-rw".into(), v));
    }
    out
}

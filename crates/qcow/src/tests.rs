//! Unit tests of the image object on MemIo.

use crate::check::Repair;
use crate::create::{create, Compat, CreateOptions};
use crate::image::{ExtentKind, Extents, OpenOptions, Qcow2};
use crate::io::{block_on, MemIo};
use crate::{Error, NoBacking};

/// A small deterministic generator (xorshift64*).
pub(crate) struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn opts(size: u64, cs: u64) -> CreateOptions {
    let mut o = CreateOptions::new(size);
    o.cluster_size = cs;
    o
}

fn read_all<B: crate::Backing>(img: &Qcow2<MemIo>, backing: &B) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    block_on(img.read(0, &mut v, backing)).unwrap();
    v
}

#[track_caller]
pub(crate) fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at {i:#x}: {} != {}", a[i], b[i]);
    }
}

fn assert_clean(img: &Qcow2<MemIo>) {
    let r = block_on(img.check(Repair::None)).unwrap();
    assert!(r.is_clean(), "{:#?}", r.messages);
}

fn reopen(img: Qcow2<MemIo>, writable: bool) -> Qcow2<MemIo> {
    block_on(img.close()).unwrap();
    let data = img.io().to_vec();
    block_on(Qcow2::open(
        MemIo::from_vec(data),
        OpenOptions {
            writable,
            ..Default::default()
        },
    ))
    .unwrap()
}

#[test]
fn write_read_partial_clusters() {
    for (cs, ext) in [
        (512, false),
        (4096, false),
        (65536, false),
        (16384, true),
        (65536, true),
    ] {
        let mut o = opts(1 << 20, cs);
        o.extended_l2 = ext;
        let img = block_on(create(MemIo::new(), &o)).unwrap();
        let mut model = vec![0u8; 1 << 20];
        for (off, len, pat) in [
            (100u64, 1000usize, 1u8),
            (cs - 7, 20, 2),
            (70000, 200000, 3),
            (1000, 10, 4),
            ((1 << 20) - 5, 5, 5),
        ] {
            let data = vec![pat; len];
            block_on(img.write(off, &data, &NoBacking)).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        assert_same(
            &read_all(&img, &NoBacking),
            &model,
            &format!("cs {cs} ext {ext}"),
        );
        block_on(img.flush()).unwrap();
        assert_clean(&img);
        let img = reopen(img, false);
        assert_same(&read_all(&img, &NoBacking), &model, "content");
    }
}

/// A read view (`map_cached_on`) answers from its copies only while nothing
/// changed: after a write, a zeroing, a resize or a clean it answers what the
/// locked path answers, and its hits count as L2 cache hits.
#[test]
fn read_views_follow_every_change() {
    let img = block_on(create(MemIo::new(), &opts(8 << 20, 65536))).unwrap();
    let img = reopen(img, true);
    block_on(img.write(0, &vec![1u8; 3 * 65536], &NoBacking)).unwrap();
    let view = Some(0);
    let same = |off: u64, len: u64| {
        let fast = img.map_cached_on(view, off, len);
        assert_eq!(fast, img.map_cached(off, len), "{off:#x}+{len:#x}");
        fast
    };
    let view_hits = || img.views[0].lock().hits;
    // A new generation, then the copy (both under the lock), then the view.
    for _ in 0..3 {
        same(0, 4096);
    }
    assert_eq!(view_hits(), 1);
    assert!(img.views[0].lock().bytes() >= 65536);
    let hits = img.cache_stats().l2.hits;
    assert!(same(65536, 8192).is_some());
    assert_eq!(view_hits(), 2);
    // One hit of the view, one of the locked comparison.
    assert_eq!(img.cache_stats().l2.hits, hits + 2);
    // Unallocated now; a write maps it.
    let kind = |m: Option<Extents>| m.unwrap()[0].kind;
    assert_eq!(kind(same(5 * 65536, 4096)), ExtentKind::Unallocated);
    block_on(img.write(5 * 65536, &[2u8; 4096], &NoBacking)).unwrap();
    assert!(matches!(
        kind(same(5 * 65536, 4096)),
        ExtentKind::Data { .. }
    ));
    // Zeroed.
    same(0, 4096);
    same(0, 4096);
    block_on(img.write_zeroes(0, 65536, false)).unwrap();
    assert_eq!(kind(same(0, 4096)), ExtentKind::Zero);
    // Beyond the old end after a resize: the view knows the new size.
    same(0, 4096);
    assert!(same(8 << 20, 4096).is_none());
    block_on(img.resize(16 << 20)).unwrap();
    assert_eq!(img.size(), 16 << 20);
    assert_eq!(kind(same(8 << 20, 4096)), ExtentKind::Unallocated);
    // A clean drops the copies.
    same(65536, 4096);
    same(65536, 4096);
    assert!(img.views[0].lock().bytes() > 0);
    img.clean_unused_cache_entries();
    assert_eq!(img.views[0].lock().bytes(), 0);
    same(65536, 4096);
    // No view: the locked path.
    assert_eq!(
        img.map_cached_on(None, 65536, 4096),
        img.map_cached(65536, 4096)
    );
    block_on(img.flush()).unwrap();
    assert_clean(&img);
}

/// An image of 4k clusters (a table maps 2 MiB) with an L2 cache of two tables:
/// tables 0..12 allocated (one cluster of data each), 12..16 not.
fn small_cache_image() -> Qcow2<MemIo> {
    let img = block_on(create(MemIo::new(), &opts(32 << 20, 4096))).unwrap();
    for t in 0..12u64 {
        let data = vec![t as u8 + 1; 8192];
        block_on(img.write(t * (2 << 20) + 4096 * t, &data, &NoBacking)).unwrap();
    }
    block_on(img.close()).unwrap();
    let img = block_on(Qcow2::open(
        MemIo::from_vec(img.io().to_vec()),
        OpenOptions {
            writable: true,
            l2_cache_size: Some(2 * 4096),
            ..Default::default()
        },
    ))
    .unwrap();
    assert_eq!(img.cache_stats().l2.capacity, 2);
    img
}

/// Maps `off..+len` through view `view` (`map_on`, then `map_cached_on`) and
/// checks both against the loading path.
#[track_caller]
fn view_agrees(img: &Qcow2<MemIo>, view: usize, off: u64, len: u64) {
    let slow = block_on(img.map_loading(off, len)).unwrap();
    let viewed = block_on(img.map_on(Some(view), off, len)).unwrap();
    assert_eq!(viewed, slow, "map_on {off:#x}+{len:#x}");
    if let Some(fast) = img.map_cached_on(Some(view), off, len) {
        assert_eq!(fast, slow, "map_cached_on {off:#x}+{len:#x}");
    }
}

/// An L2 cache miss (a table loaded, another evicted) changes no mapping, so it
/// publishes no new generation: with a cache of two tables and reads over sixteen,
/// the views stay current, fill through `map_on` and then answer every lookup,
/// while the cache keeps missing.
#[test]
fn read_views_survive_l2_cache_misses() {
    let img = small_cache_image();
    let span = 2u64 << 20;
    let gen = img.published.gen();
    let misses = img.cache_stats().l2.misses;
    let mut rng = Rng(99);
    // Two passes over every table fill views 0 and 1 (a copy after the second
    // lookup at one generation, which a load no longer ends).
    for _ in 0..2 {
        for t in 0..16 {
            for view in [0, 1] {
                view_agrees(&img, view, t * span + 4096 * t, 4096);
            }
        }
    }
    let hits = |v: usize| img.views[v].lock().hits;
    let before = (hits(0), hits(1));
    for _ in 0..500 {
        let off = rng.below(32 << 20) & !511;
        let len = (rng.below(64 << 10) + 512).min((32 << 20) - off) & !511;
        for view in [0, 1] {
            view_agrees(&img, view, off, len.max(512));
        }
    }
    // Each iteration: map_on and map_cached_on from the view, per view.
    assert_eq!(hits(0) - before.0, 1000, "view 0 missed");
    assert_eq!(hits(1) - before.1, 1000, "view 1 missed");
    // The loading path missed the cache all along, and published nothing.
    let missed = img.cache_stats().l2.misses - misses;
    assert!(missed > 250, "only {missed} misses");
    assert_eq!(img.published.gen(), gen);
    // Nor does a flush with nothing to write back.
    block_on(img.flush()).unwrap();
    assert_eq!(img.published.gen(), gen, "a flush with nothing to write");
    let before = hits(0);
    view_agrees(&img, 0, 3 * span, 4096);
    assert_eq!(hits(0), before + 2);
    assert_clean(&img);
}

/// With a cache of two tables, views answer what the locked path answers across
/// writes, allocations in new tables, zeroings, discards and resizes interleaved
/// with reads over every table; after each change they fill again and answer.
#[test]
fn read_views_with_a_small_cache_follow_every_change() {
    let img = small_cache_image();
    let mut size = img.size();
    let mut rng = Rng(7);
    let mut view_hits = 0;
    for round in 0..60u64 {
        let off = rng.below(size) & !4095;
        let len = (rng.below(32 << 10) + 4096).min(size - off) & !4095;
        match round % 5 {
            0 => block_on(img.write(off, &vec![round as u8; len as usize], &NoBacking)).unwrap(),
            1 => block_on(img.write_zeroes(off, len, rng.below(2) == 0)).unwrap(),
            2 => {
                block_on(img.discard(off, len)).unwrap();
            }
            3 if size < (40 << 20) => {
                size += 2 << 20;
                block_on(img.resize(size)).unwrap();
            }
            // A new table (the L1 entry changes).
            _ => block_on(img.write(size - 4096, &[9u8; 4096], &NoBacking)).unwrap(),
        }
        if round % 3 == 0 {
            block_on(img.flush()).unwrap();
        }
        let before = img.views[0].lock().hits;
        for _ in 0..3 {
            for t in 0..size / (2 << 20) {
                let o = t * (2 << 20) + (rng.below(2 << 20) & !511);
                view_agrees(&img, 0, o, 512.min(size - o));
            }
        }
        assert_eq!(img.size(), size);
        view_hits += img.views[0].lock().hits - before;
        // Beyond the end: every path says so.
        assert!(img.map_cached_on(Some(0), size, 512).is_none());
        assert!(block_on(img.map_on(Some(0), size, 512)).is_err());
    }
    assert!(
        view_hits > 60 * 16 * 3,
        "the view answered only {view_hits}"
    );
    block_on(img.flush()).unwrap();
    assert_clean(&img);
}

/// The lock-only fast path agrees with the loading path wherever it answers,
/// on a mix of data, zero, unallocated and subcluster ranges, and declines
/// when a table is not cached.
#[test]
fn cached_map_agrees_with_loading_map() {
    for extended in [false, true] {
        let mut o = opts(8 << 20, 65536);
        o.extended_l2 = extended;
        let img = block_on(create(MemIo::new(), &o)).unwrap();
        block_on(img.write(0, &vec![1u8; 3 * 65536], &NoBacking)).unwrap();
        block_on(img.write(5 * 65536 + 4096, &[2u8; 8192], &NoBacking)).unwrap();
        block_on(img.write_zeroes(8 * 65536, 65536, true)).unwrap();
        block_on(img.write(6 << 20, &[3u8; 4096], &NoBacking)).unwrap();
        let mut x: u64 = 12345;
        let mut answered = 0;
        let mut mapped = Vec::new();
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (8 << 20)) & !511;
            let len = (((x >> 32) % (256 << 10)) & !511).clamp(512, (8 << 20) - off);
            let slow = block_on(img.map_loading(off, len)).unwrap();
            if let Some(fast) = img.map_cached(off, len) {
                assert_eq!(fast, slow, "extended {extended}: {off:#x}+{len:#x}");
                answered += 1;
            }
            mapped.push((off, len, slow));
        }
        assert!(answered > 1000, "the fast path answered only {answered}");
        // A read view agrees too (nothing changes between these lookups, so it
        // fills and then answers).
        for (off, len, slow) in &mapped {
            if let Some(viewed) = img.map_cached_on(Some(1), *off, *len) {
                assert_eq!(
                    &viewed, slow,
                    "view, extended {extended}: {off:#x}+{len:#x}"
                );
            }
        }
        let hits = img.views[1].lock().hits;
        assert!(hits > 1000, "the view answered only {hits}");
        assert!(img.map_cached(8 << 20, 512).is_none(), "out of range");
        // Two cleans with no use between them drop every clean table (the flush
        // writes the dirty ones back first).
        block_on(img.flush()).unwrap();
        img.clean_unused_cache_entries();
        img.clean_unused_cache_entries();
        assert_eq!(img.cache_stats().l2.entries, 0);
        let misses = img.cache_stats().l2.misses;
        assert!(img.map_cached(0, 4096).is_none(), "L2 table not cached");
        // Declining is not a miss: the loading map that follows counts it.
        assert_eq!(img.cache_stats().l2.misses, misses);
        assert_eq!(block_on(img.map(0, 4096)).unwrap().len(), 1);
        assert_eq!(img.cache_stats().l2.misses, misses + 1);
        // The loading map cached the table: the fast path answers again.
        assert_eq!(img.map_cached(0, 4096).map(|m| m.len()), Some(1));
    }
}

#[test]
fn map_reports_kinds_and_merges() {
    let img = block_on(create(MemIo::new(), &opts(4 << 20, 65536))).unwrap();
    block_on(img.write(0, &vec![1u8; 3 * 65536], &NoBacking)).unwrap();
    block_on(img.write_zeroes(4 * 65536, 65536, true)).unwrap();
    let m = block_on(img.map(0, 6 * 65536)).unwrap();
    assert_eq!(m.len(), 4, "{m:?}");
    assert!(matches!(m[0].kind, ExtentKind::Data { .. }) && m[0].len == 3 * 65536);
    assert_eq!(m[1].kind, ExtentKind::Unallocated);
    assert_eq!((m[2].offset, m[2].kind), (4 * 65536, ExtentKind::Zero));
    assert_eq!(m[3].kind, ExtentKind::Unallocated);
    assert!(matches!(
        block_on(img.map(4 << 20, 1)),
        Err(Error::OutOfRange { .. })
    ));
}

#[test]
fn backing_copy_on_write() {
    let size = 1u64 << 20;
    let base: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    for ext in [false, true] {
        let mut o = opts(size, 32768);
        o.extended_l2 = ext;
        o.backing_file = Some("base.raw".into());
        o.backing_fmt = Some("raw".into());
        let img = block_on(create(MemIo::new(), &o)).unwrap();
        let mut model = base.clone();
        for (off, len) in [(10u64, 100usize), (40000, 5000), (65536 + 1024, 1024)] {
            block_on(img.write(off, &vec![0xee; len], &base)).unwrap();
            model[off as usize..off as usize + len].fill(0xee);
        }
        assert_same(&read_all(&img, &base), &model, &format!("ext {ext}"));
        // Discard with a backing file gives zero clusters (v3).
        block_on(img.discard(0, 32768)).unwrap();
        model[..32768].fill(0);
        // Zero a subcluster-aligned range.
        let al = img.geometry().subcluster_size;
        block_on(img.write_zeroes(3 * 32768, al, false)).unwrap();
        model[3 * 32768..(3 * 32768 + al) as usize].fill(0);
        assert_same(&read_all(&img, &base), &model, &format!("ext {ext}"));
        block_on(img.flush()).unwrap();
        assert_clean(&img);
    }
}

#[test]
fn zeroes_discard_and_reuse() {
    let cs = 65536u64;
    let img = block_on(create(MemIo::new(), &opts(8 << 20, cs))).unwrap();
    block_on(img.write(0, &vec![7u8; 8 << 20], &NoBacking)).unwrap();
    block_on(img.flush()).unwrap();
    let len_before = img.io().to_vec().len();
    let freed = block_on(img.discard(cs / 2, 4 * cs)).unwrap();
    // Partial clusters at both ends are kept: 3 whole clusters freed.
    assert_eq!(freed.iter().map(|r| r.1).sum::<u64>(), 3 * cs);
    block_on(img.write_zeroes(6 * cs, cs, true)).unwrap();
    block_on(img.write_zeroes(7 * cs, cs, false)).unwrap();
    assert!(matches!(
        block_on(img.write_zeroes(5, 10, true)),
        Err(Error::Unaligned { .. })
    ));
    block_on(img.flush()).unwrap();
    assert_clean(&img);
    let mut model = vec![7u8; 8 << 20];
    model[cs as usize..4 * cs as usize].fill(0);
    model[6 * cs as usize..8 * cs as usize].fill(0);
    assert_same(&read_all(&img, &NoBacking), &model, "content");
    // Freed clusters are reused after the flush: the file does not grow.
    block_on(img.write(cs, &vec![9u8; 3 * cs as usize], &NoBacking)).unwrap();
    block_on(img.flush()).unwrap();
    assert_eq!(img.io().to_vec().len(), len_before);
    assert_clean(&img);
}

#[test]
fn refcount_table_grows() {
    // 512-byte clusters with 64-bit refcounts: 64 clusters per refcount
    // block, 64 blocks per table cluster: the table must grow.
    for rb in [64u32, 1, 2, 32] {
        let mut o = opts(16 << 20, 512);
        o.refcount_bits = rb;
        let img = block_on(create(MemIo::new(), &o)).unwrap();
        let mut rng = Rng(rb as u64 + 1);
        let mut model = vec![0u8; 16 << 20];
        for i in 0..300 {
            let off = rng.below(16 << 20) & !511;
            let len = (rng.below(64) + 1) * 512;
            let len = len.min((16 << 20) - off) as usize;
            block_on(img.write(off, &vec![i as u8; len], &NoBacking)).unwrap();
            model[off as usize..off as usize + len].fill(i as u8);
        }
        block_on(img.flush()).unwrap();
        assert!(img.header().refcount_table_clusters > 1 || rb < 64);
        assert_clean(&img);
        let img = reopen(img, true);
        assert_same(
            &read_all(&img, &NoBacking),
            &model,
            &format!("refcount_bits {rb}"),
        );
    }
}

#[test]
fn grow_image() {
    let img = block_on(create(MemIo::new(), &opts(1 << 20, 512))).unwrap();
    block_on(img.write(1000, &[5u8; 100], &NoBacking)).unwrap();
    block_on(img.resize(64 << 20)).unwrap();
    block_on(img.write((64 << 20) - 100, &[6u8; 100], &NoBacking)).unwrap();
    // Shrink below the last write, then grow again: the tail reads zero.
    block_on(img.write((3 << 20) + 7, &[8u8; 70000], &NoBacking)).unwrap();
    block_on(img.resize((3 << 20) + 4096)).unwrap();
    assert_clean(&img);
    block_on(img.resize(64 << 20)).unwrap();
    let mut t = vec![0u8; 70000];
    block_on(img.read((3 << 20) + 7, &mut t, &NoBacking)).unwrap();
    assert!(t[..4089].iter().all(|&x| x == 8));
    assert!(
        t[4089 + 512..].iter().all(|&x| x == 0),
        "freed clusters read zero"
    );
    block_on(img.flush()).unwrap();
    assert_clean(&img);
    let img = reopen(img, false);
    let mut b = [0u8; 100];
    block_on(img.read((64 << 20) - 100, &mut b, &NoBacking)).unwrap();
    assert_eq!(b, [0u8; 100], "discarded by the shrink");
    block_on(img.read(1000, &mut b, &NoBacking)).unwrap();
    assert_eq!(b, [5u8; 100]);
}

#[test]
fn lazy_refcounts_dirty_and_repair() {
    let mut o = opts(4 << 20, 65536);
    o.lazy_refcounts = true;
    let img = block_on(create(MemIo::new(), &o)).unwrap();
    let img = reopen(img, true);
    block_on(img.write(0, &[1u8; 200000], &NoBacking)).unwrap();
    block_on(img.flush()).unwrap();
    assert!(img.header().incompatible_features & crate::header::incompat::DIRTY != 0);
    // Simulate a crash: take the file without a clean close, and zero the
    // refcount block so that the repair has work to do.
    let mut data = img.io().to_vec();
    let h = img.header();
    let rt_entry = u64::from_be_bytes(
        data[h.refcount_table_offset as usize..][..8]
            .try_into()
            .unwrap(),
    );
    data[rt_entry as usize + 8..rt_entry as usize + 64].fill(0);
    let img2 = block_on(Qcow2::open(
        MemIo::from_vec(data),
        OpenOptions::read_write(),
    ))
    .unwrap();
    assert_eq!(
        img2.header().incompatible_features & crate::header::incompat::DIRTY,
        0
    );
    assert_clean(&img2);
    let mut b = vec![0u8; 200000];
    block_on(img2.read(0, &mut b, &NoBacking)).unwrap();
    assert!(b.iter().all(|&x| x == 1));
    // A clean close clears the dirty bit.
    block_on(img.close()).unwrap();
    assert_eq!(
        img.header().incompatible_features & crate::header::incompat::DIRTY,
        0
    );
}

#[test]
fn corruption_marks_image_corrupt() {
    let img = block_on(create(MemIo::new(), &opts(1 << 20, 65536))).unwrap();
    block_on(img.write(0, &[1u8; 512], &NoBacking)).unwrap();
    block_on(img.close()).unwrap();
    let mut data = img.io().to_vec();
    let h = img.header();
    let l1 = u64::from_be_bytes(data[h.l1_table_offset as usize..][..8].try_into().unwrap())
        & crate::layout::OFFSET_MASK;
    // Point the first L2 entry at the L1 table.
    let e = h.l1_table_offset | crate::layout::COPIED;
    data[l1 as usize..l1 as usize + 8].copy_from_slice(&e.to_be_bytes());
    let img = block_on(Qcow2::open(
        MemIo::from_vec(data.clone()),
        OpenOptions::read_write(),
    ))
    .unwrap();
    assert!(matches!(block_on(img.map(0, 512)), Err(Error::Corrupt(_))));
    assert!(img.info().corrupt);
    assert!(matches!(
        block_on(img.write(70000, &[1], &NoBacking)),
        Err(Error::Corrupt(_))
    ));
    // The corrupt bit reached the file: a read-write open is refused.
    let again = img.io().to_vec();
    assert!(matches!(
        block_on(Qcow2::open(
            MemIo::from_vec(again.clone()),
            OpenOptions::read_write()
        )),
        Err(Error::Corrupt(_))
    ));
    assert!(block_on(Qcow2::open(
        MemIo::from_vec(again),
        OpenOptions::read_only()
    ))
    .is_ok());
    // The checker counts it too.
    let ro = block_on(Qcow2::open(MemIo::from_vec(data), OpenOptions::read_only())).unwrap();
    assert!(block_on(ro.check(Repair::None)).unwrap().corruptions > 0);
}

#[test]
fn leaks_are_found_and_repaired() {
    let img = block_on(create(MemIo::new(), &opts(1 << 20, 512))).unwrap();
    block_on(img.write(0, &[1u8; 4096], &NoBacking)).unwrap();
    // Reserve clusters and never commit them: leaked.
    let a = block_on(img.allocate(8192, 4096, &NoBacking)).unwrap();
    drop(a);
    block_on(img.flush()).unwrap();
    let r = block_on(img.check(Repair::None)).unwrap();
    assert_eq!((r.leaks, r.corruptions), (8, 0), "{:?}", r.messages);
    let r = block_on(img.check(Repair::Leaks)).unwrap();
    assert_eq!(r.leaks_fixed, 8);
    assert_clean(&img);
}

#[test]
fn v2_images() {
    let mut o = opts(2 << 20, 65536);
    o.compat = Compat::V2;
    let img = block_on(create(MemIo::new(), &o)).unwrap();
    block_on(img.write(5000, &[3u8; 200000], &NoBacking)).unwrap();
    block_on(img.write_zeroes(0, 65536, true)).unwrap();
    block_on(img.write_zeroes(65536, 65536, false)).unwrap();
    let mut model = vec![0u8; 2 << 20];
    model[131072..205000].fill(3);
    assert_same(&read_all(&img, &NoBacking), &model, "content");
    block_on(img.flush()).unwrap();
    assert_clean(&img);
}

#[test]
fn concurrent_allocations_serialise_per_cluster() {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};
    let img = block_on(create(MemIo::new(), &opts(1 << 20, 65536))).unwrap();
    let a = block_on(img.allocate(0, 512, &NoBacking)).unwrap();
    // A second allocation on the same cluster waits...
    let mut f = pin!(img.allocate(1024, 512, &NoBacking));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(f.as_mut().poll(&mut cx).is_pending());
    // ...while one on another cluster proceeds.
    let b = block_on(img.allocate(65536, 512, &NoBacking)).unwrap();
    block_on(img.commit(a)).unwrap();
    let Poll::Ready(Ok(c)) = f.as_mut().poll(&mut cx) else {
        panic!("still waiting")
    };
    // The first commit linked the cluster: the second writes in place.
    assert!(!c.needs_commit());
    block_on(img.commit(c)).unwrap();
    block_on(img.commit(b)).unwrap();
    block_on(img.flush()).unwrap();
    assert_clean(&img);
}

#[test]
fn random_differential() {
    let seed = std::env::var("QCOW_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64);
    eprintln!("random_differential seed {seed}");
    for (cs, ext, rb) in [
        (512u64, false, 16u32),
        (65536, false, 16),
        (16384, true, 4),
        (65536, true, 64),
    ] {
        let size = 4u64 << 20;
        let mut o = opts(size, cs);
        o.extended_l2 = ext;
        o.refcount_bits = rb;
        let img = block_on(create(MemIo::new(), &o)).unwrap();
        let mut rng = Rng(seed ^ cs ^ rb as u64);
        let mut model = vec![0u8; size as usize];
        let al = img.geometry().subcluster_size;
        for step in 0..200 {
            let op = rng.below(10);
            let off = rng.below(size);
            let len = (rng.below(3 * cs) + 1).min(size - off);
            match op {
                0..=5 => {
                    let v = rng.next() as u8;
                    block_on(img.write(off, &vec![v; len as usize], &NoBacking)).unwrap();
                    model[off as usize..(off + len) as usize].fill(v);
                }
                6 | 7 => {
                    let s = off / al * al;
                    let e = ((off + len).div_ceil(al) * al).min(size);
                    block_on(img.write_zeroes(s, e - s, op == 6)).unwrap();
                    model[s as usize..e as usize].fill(0);
                }
                _ => {
                    block_on(img.discard(off, len)).unwrap();
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
            if std::env::var("QCOW_DEBUG").is_ok() {
                eprintln!("step {step} op {op} off {off:#x} len {len:#x}");
                assert_same(
                    &read_all(&img, &NoBacking),
                    &model,
                    &format!("cs {cs} ext {ext} step {step} seed {seed}"),
                );
            }
            if step % 40 == 39 {
                block_on(img.flush()).unwrap();
                assert_same(
                    &read_all(&img, &NoBacking),
                    &model,
                    &format!("cs {cs} ext {ext} step {step} seed {seed}"),
                );
                assert_clean(&img);
            }
        }
    }
}

#[test]
fn interop_sequence_has_no_leaks() {
    let size = 6u64 << 20;
    let img = block_on(create(MemIo::new(), &opts(size, 65536))).unwrap();
    let w =
        |off: u64, len: usize, v: u8| block_on(img.write(off, &vec![v; len], &NoBacking)).unwrap();
    w(0, 65536, 1);
    w(100_000, 3000, 2);
    w(1_000_001, 200_000, 3);
    w(size - 300, 300, 4);
    assert_clean(&img);
    block_on(img.write_zeroes(65536, 65536, true)).unwrap();
    assert_clean(&img);
    block_on(img.write_zeroes(size - 65536, 65536, false)).unwrap();
    assert_clean(&img);
    block_on(img.discard(0, 65536 * 2)).unwrap();
    block_on(img.close()).unwrap();
    assert_clean(&img);
}

#[test]
fn compressed_clusters_round_trip() {
    for (ct, ext) in [
        (crate::CompressionType::Zlib, false),
        (crate::CompressionType::Zstd, true),
    ] {
        let mut o = opts(1 << 20, 65536);
        o.compression_type = ct;
        o.extended_l2 = ext;
        let img = block_on(create(MemIo::new(), &o)).unwrap();
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        block_on(img.write_compressed(65536, &data)).unwrap();
        block_on(img.write_compressed(3 * 65536, &data)).unwrap();
        let m = block_on(img.map(65536, 65536)).unwrap();
        assert!(matches!(m[0].kind, ExtentKind::Compressed { .. }), "{m:?}");
        let mut model = vec![0u8; 1 << 20];
        model[65536..131072].copy_from_slice(&data);
        model[3 * 65536..4 * 65536].copy_from_slice(&data);
        assert_same(&read_all(&img, &NoBacking), &model, "compressed");
        // Partial overwrite of a compressed cluster copies the rest.
        block_on(img.write(65536 + 100, &[9u8; 50], &NoBacking)).unwrap();
        model[65636..65686].fill(9);
        // Overwrite a compressed cluster with another compressed one.
        block_on(img.write_compressed(3 * 65536, &vec![1u8; 65536])).unwrap();
        model[3 * 65536..4 * 65536].fill(1);
        block_on(img.flush()).unwrap();
        assert_same(&read_all(&img, &NoBacking), &model, "after overwrite");
        assert_clean(&img);
    }
}

#[test]
fn image_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Qcow2<MemIo>>();
    assert_send_sync::<Qcow2<crate::FileIo>>();
}

#[test]
fn refcount_zero_metadata_is_not_reallocated() {
    let img = block_on(create(MemIo::new(), &opts(1 << 20, 65536))).unwrap();
    block_on(img.write(0, &[1u8; 512], &NoBacking)).unwrap();
    block_on(img.close()).unwrap();
    let mut data = img.io().to_vec();
    // Zero the refcounts of everything: the allocator must notice the L2
    // table rather than hand its cluster out.
    let h = img.header();
    let rb = u64::from_be_bytes(
        data[h.refcount_table_offset as usize..][..8]
            .try_into()
            .unwrap(),
    ) as usize;
    data[rb..rb + 32].fill(0);
    let img = block_on(Qcow2::open(
        MemIo::from_vec(data),
        OpenOptions::read_write(),
    ))
    .unwrap();
    let r = block_on(img.write(65536, &[2u8; 512], &NoBacking));
    assert!(matches!(r, Err(Error::Corrupt(_))), "{r:?}");
    assert!(img.info().corrupt);
}

#[test]
fn internal_snapshots() {
    let img = block_on(create(MemIo::new(), &opts(2 << 20, 4096))).unwrap();
    block_on(img.write(0, &vec![1u8; 100_000], &NoBacking)).unwrap();
    block_on(img.write_compressed(512 << 10, &vec![2u8; 4096])).unwrap();
    let s1 = read_all(&img, &NoBacking);
    let snap = block_on(img.snapshot_create("one")).unwrap();
    assert_eq!(snap.id, "1");
    assert_clean(&img);
    block_on(img.write(50_000, &vec![3u8; 100_000], &NoBacking)).unwrap();
    block_on(img.write(512 << 10, &[4u8; 10], &NoBacking)).unwrap();
    block_on(img.discard(0, 8192)).unwrap();
    block_on(img.flush()).unwrap();
    assert_clean(&img);
    let s2 = read_all(&img, &NoBacking);
    block_on(img.snapshot_create("two")).unwrap();
    assert_eq!(img.snapshots().len(), 2);
    block_on(img.snapshot_revert("one")).unwrap();
    assert_same(&read_all(&img, &NoBacking), &s1, "reverted to one");
    assert_clean(&img);
    block_on(img.write(0, &[5u8; 10], &NoBacking)).unwrap();
    block_on(img.snapshot_delete("one")).unwrap();
    assert_clean(&img);
    block_on(img.snapshot_revert("2")).unwrap();
    assert_same(&read_all(&img, &NoBacking), &s2, "reverted to two");
    block_on(img.snapshot_delete("two")).unwrap();
    assert!(img.snapshots().is_empty());
    block_on(img.flush()).unwrap();
    assert_clean(&img);
    let img = reopen(img, true);
    assert_same(&read_all(&img, &NoBacking), &s2, "reopened");
    assert!(matches!(
        block_on(img.snapshot_delete("nope")),
        Err(Error::SnapshotNotFound(_))
    ));
}

#[test]
fn snapshot_selection_dates_and_icount() {
    use crate::NewSnapshot;
    let img = block_on(create(MemIo::new(), &opts(1 << 20, 4096))).unwrap();
    let new = |name: &str, icount| NewSnapshot {
        name: name.into(),
        date_sec: 1_700_000_000,
        date_nsec: 5,
        vm_clock_nsec: 3_600_000_000_123,
        icount,
    };
    block_on(img.snapshot_create_with(new("a", Some(0)))).unwrap();
    // A name that is another snapshot's id.
    block_on(img.snapshot_create_with(new("1", None))).unwrap();
    block_on(img.snapshot_create_with(new("c", Some(42)))).unwrap();
    assert!(matches!(
        block_on(img.snapshot_create("a")),
        Err(Error::SnapshotExists(_))
    ));
    let img = reopen(img, true);
    let s = img.snapshots();
    assert_eq!(
        s.iter()
            .map(|s| (s.id.as_str(), s.name.as_str(), s.icount))
            .collect::<Vec<_>>(),
        [("1", "a", Some(0)), ("2", "1", None), ("3", "c", Some(42))]
    );
    assert_eq!((s[0].date_sec, s[0].date_nsec), (1_700_000_000, 5));
    assert_eq!(s[0].vm_clock_nsec, 3_600_000_000_123);
    // Both given: both must match.
    assert!(matches!(
        block_on(img.snapshot_delete_matching(Some("1"), Some("c"))),
        Err(Error::SnapshotNotFound(_))
    ));
    assert!(block_on(img.snapshot_delete_matching(None, None)).is_err());
    // A name alone matches names only.
    let d = block_on(img.snapshot_delete_matching(None, Some("1"))).unwrap();
    assert_eq!((d.id.as_str(), d.name.as_str()), ("2", "1"));
    let d = block_on(img.snapshot_delete_matching(Some("3"), Some("c"))).unwrap();
    assert_eq!(d.icount, Some(42));
    // An id or name: the id first.
    let d = block_on(img.snapshot_delete("1")).unwrap();
    assert_eq!(d.name, "a");
    assert!(img.snapshots().is_empty());
    block_on(img.flush()).unwrap();
    assert_clean(&img);
}

#[test]
fn external_data_file() {
    for raw in [false, true] {
        let mut o = opts(1 << 20, 65536);
        o.data_file = Some("data.raw".into());
        o.data_file_raw = raw;
        let img = block_on(crate::create_with_data_file(MemIo::new(), MemIo::new(), &o)).unwrap();
        assert!(img.has_data_file());
        let mut model = vec![0u8; 1 << 20];
        for (off, len, v) in [(100u64, 1000usize, 1u8), (65536 * 3 + 5, 70000, 2)] {
            block_on(img.write(off, &vec![v; len], &NoBacking)).unwrap();
            model[off as usize..off as usize + len].fill(v);
        }
        let freed = block_on(img.discard(0, 65536)).unwrap();
        if raw {
            assert!(freed.is_empty());
            assert!(block_on(img.write_zeroes(0, 65536, true)).is_err());
        } else {
            assert_eq!(freed, vec![(0, 65536)]);
            model[..65536].fill(0);
            block_on(img.write_zeroes(65536 * 4, 65536, true)).unwrap();
            model[65536 * 4..65536 * 5].fill(0);
        }
        assert_same(&read_all(&img, &NoBacking), &model, &format!("raw {raw}"));
        let m = block_on(img.map(65536 * 3, 65536)).unwrap();
        assert_eq!(
            m[0].kind,
            ExtentKind::Data {
                host_offset: 65536 * 3
            }
        );
        block_on(img.flush()).unwrap();
        assert_clean(&img);
        if raw {
            // The data file alone is the raw image.
            assert_same(&img.data_io().to_vec()[..1 << 20], &model, "raw data file");
        }
        assert!(block_on(img.snapshot_create("x")).is_err());
        // Opening without the data file fails clearly.
        let meta = img.io().to_vec();
        let e = block_on(Qcow2::open(MemIo::from_vec(meta), OpenOptions::read_only())).unwrap_err();
        assert!(e.to_string().contains("data.raw"), "{e}");
    }
}

/// Records every write and flush so that crashes can be replayed.
#[derive(Default)]
struct CrashIo {
    inner: std::sync::Mutex<(Vec<u8>, Vec<CrashOp>)>,
}

#[derive(Clone)]
enum CrashOp {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Flush,
}

impl crate::QcowIo for CrashIo {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let g = self.inner.lock().unwrap();
        buf.fill(0);
        if offset < g.0.len() as u64 {
            let n = buf.len().min(g.0.len() - offset as usize);
            buf[..n].copy_from_slice(&g.0[offset as usize..offset as usize + n]);
        }
        Ok(())
    }
    async fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        let mut g = self.inner.lock().unwrap();
        apply(&mut g.0, &CrashOp::Write(offset, buf.to_vec()));
        g.1.push(CrashOp::Write(offset, buf.to_vec()));
        Ok(())
    }
    async fn flush(&self) -> std::io::Result<()> {
        self.inner.lock().unwrap().1.push(CrashOp::Flush);
        Ok(())
    }
    async fn len(&self) -> std::io::Result<u64> {
        Ok(self.inner.lock().unwrap().0.len() as u64)
    }
    async fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut g = self.inner.lock().unwrap();
        apply(&mut g.0, &CrashOp::SetLen(len));
        g.1.push(CrashOp::SetLen(len));
        Ok(())
    }
}

fn apply(d: &mut Vec<u8>, op: &CrashOp) {
    match op {
        CrashOp::Write(off, data) => {
            let end = *off as usize + data.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[*off as usize..end].copy_from_slice(data);
        }
        CrashOp::SetLen(l) => d.resize(*l as usize, 0),
        CrashOp::Flush => {}
    }
}

/// Crashes at every point of a random workload, keeping a random subset of
/// the writes issued since the last flush: the image must never be corrupt
/// (leaks are fine) and data flushed before the crash must be there.
#[test]
fn crash_consistency() {
    for (cs, ext, lazy, rb) in [
        (4096u64, false, false, 16u32),
        (16384, true, false, 16),
        (4096, false, true, 16),
        (16384, true, true, 16),
        (512, false, false, 64),
    ] {
        let size = 1u64 << 20;
        let mut o = opts(size, cs);
        o.extended_l2 = ext;
        o.lazy_refcounts = lazy;
        o.refcount_bits = rb;
        let img = block_on(create(CrashIo::default(), &o)).unwrap();
        block_on(img.close()).unwrap();
        let base = img.io().inner.lock().unwrap().0.clone();
        drop(img);
        let io = CrashIo::default();
        io.inner.lock().unwrap().0 = base.clone();
        let img = block_on(Qcow2::open(io, OpenOptions::read_write())).unwrap();
        let seed: u64 = std::env::var("QCOW_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut rng = Rng(cs + ext as u64 * 7 + lazy as u64 * 13 + seed * 1000);
        let mut model = vec![0u8; size as usize];
        // (number of ops logged when a guest flush completed, model then)
        let mut flushed: Vec<(usize, Vec<u8>)> = vec![(0, model.clone())];
        // (ops logged when a guest operation started, range it changed)
        let mut touched: Vec<(usize, u64, u64)> = Vec::new();
        for step in 0..100 {
            let off = rng.below(size);
            let len = (rng.below(3 * cs) + 1).min(size - off);
            let pos = img.io().inner.lock().unwrap().1.len();
            match rng.below(8) {
                0..=4 => {
                    let v = (step % 250 + 1) as u8;
                    block_on(img.write(off, &vec![v; len as usize], &NoBacking)).unwrap();
                    model[off as usize..(off + len) as usize].fill(v);
                    touched.push((pos, off, off + len));
                }
                5 => {
                    let al = img.geometry().subcluster_size;
                    let s = off / al * al;
                    let e = ((off + len).div_ceil(al) * al).min(size);
                    block_on(img.write_zeroes(s, e - s, rng.below(2) == 0)).unwrap();
                    model[s as usize..e as usize].fill(0);
                    touched.push((pos, s, e));
                }
                6 => {
                    block_on(img.discard(off, len)).unwrap();
                    let s = off.div_ceil(cs) * cs;
                    let e = if off + len == size {
                        size
                    } else {
                        (off + len) / cs * cs
                    };
                    if s < e {
                        model[s as usize..e as usize].fill(0);
                    }
                    touched.push((pos, off, off + len));
                }
                7 if step % 3 == 0 => {
                    // Metadata-heavy operations: snapshots (which share
                    // clusters, so later writes copy them) and growth.
                    match rng.below(3) {
                        0 => {
                            block_on(img.snapshot_create(&format!("s{step}"))).unwrap();
                        }
                        1 => {
                            if let Some(sn) = img.snapshots().first() {
                                block_on(img.snapshot_delete(&sn.id)).unwrap();
                            }
                        }
                        _ => {
                            let new = img.size() + cs * 7;
                            block_on(img.resize(new)).unwrap();
                        }
                    }
                }
                _ => {
                    block_on(img.flush()).unwrap();
                    let n = img.io().inner.lock().unwrap().1.len();
                    flushed.push((n, model.clone()));
                }
            }
        }
        let log = img.io().inner.lock().unwrap().1.clone();
        let mut crashes = 0;
        for k in (0..=log.len()).step_by((log.len() / 30).max(1)) {
            // The last flush (of any kind) completed before op k.
            let last_flush = log[..k]
                .iter()
                .rposition(|o| matches!(o, CrashOp::Flush))
                .map_or(0, |p| p + 1);
            for variant in [0, 2] {
                let mut d = base.clone();
                for op in &log[..last_flush] {
                    apply(&mut d, op);
                }
                for op in &log[last_flush..k] {
                    // Writes after the last flush may or may not have landed.
                    if variant == 0 || (variant == 2 && rng.below(2) == 0) {
                        apply(&mut d, op);
                    }
                }
                let what = format!(
                    "cs {cs} ext {ext} lazy {lazy} rb {rb} crash at {k}/{} variant {variant}",
                    log.len()
                );
                // Lazy refcounts: the image may be dirty; a read-write open repairs it.
                let opts = OpenOptions {
                    writable: lazy,
                    ..Default::default()
                };
                let img2 = block_on(Qcow2::open(MemIo::from_vec(d), opts)).expect(&what);
                let r = block_on(img2.check(Repair::None)).unwrap();
                // Only harmless COPIED flag errors (a crash inside a
                // snapshot operation) are allowed.
                assert_eq!(
                    r.corruptions, r.harmless_flag_errors,
                    "{what}: {:?}",
                    r.messages
                );
                // What the last completed guest flush covered reads back,
                // except ranges that guest operations after it changed.
                let (gf, at_flush) = flushed.iter().rev().find(|(n, _)| *n <= k).unwrap();
                let mut exempt = vec![false; size as usize];
                for &(p, s, e) in &touched {
                    if p >= *gf {
                        exempt[s as usize..e as usize].fill(true);
                    }
                }
                let mut now = vec![0u8; size as usize];
                block_on(img2.read(0, &mut now, &NoBacking)).unwrap();
                if let Some(i) = (0..size as usize).find(|&i| !exempt[i] && now[i] != at_flush[i]) {
                    panic!(
                        "{what}: flushed byte {i:#x} is {} not {}",
                        now[i], at_flush[i]
                    );
                }
                if crashes % 4 == 0 {
                    // Writing on after the crash (a dirty image repaired first):
                    // the allocator must not trip over what the crash left,
                    // such as refcounts past the end of the file.
                    let d = img2.io().to_vec();
                    drop(img2);
                    let img3 = block_on(Qcow2::open(MemIo::from_vec(d), OpenOptions::read_write()))
                        .expect(&what);
                    let off = rng.below(size - 2 * cs);
                    let v = vec![0xeeu8; 2 * cs as usize];
                    block_on(img3.write(off, &v, &NoBacking)).expect(&what);
                    block_on(img3.flush()).expect(&what);
                    let r = block_on(img3.check(Repair::None)).unwrap();
                    assert_eq!(
                        r.corruptions, r.harmless_flag_errors,
                        "{what}, written on: {:?}",
                        r.messages
                    );
                    let mut back = vec![0u8; v.len()];
                    block_on(img3.read(off, &mut back, &NoBacking)).unwrap();
                    assert!(back == v, "{what}: written on, read back differs");
                    block_on(img3.close()).expect(&what);
                }
                crashes += 1;
            }
        }
        assert!(crashes > 50);
    }
}

/// Threads writing different bytes of the same clusters at once: the
/// allocations serialise per cluster, nothing is lost, the image is clean.
#[test]
fn threads_share_clusters() {
    use std::sync::Arc;
    let cs = 16384u64;
    let size = 64 * cs;
    let img = Arc::new(block_on(create(MemIo::new(), &opts(size, cs))).unwrap());
    let threads = 4u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(t + 99);
                let mut mine = vec![0u8; size as usize];
                let slot = cs / threads;
                for i in 0..300u64 {
                    let c = rng.below(64);
                    let off = rng.below(slot - 1);
                    let len = rng.below(slot - off) + 1;
                    let start = c * cs + t * slot + off;
                    let v = (i % 250 + 1) as u8;
                    block_on(img.write(start, &vec![v; len as usize], &NoBacking)).unwrap();
                    mine[start as usize..(start + len) as usize].fill(v);
                    if i % 50 == 0 {
                        block_on(img.flush()).unwrap();
                    }
                    if i % 70 == 0 {
                        let mut b = vec![0u8; len as usize];
                        block_on(img.read(start, &mut b, &NoBacking)).unwrap();
                        assert!(b.iter().all(|&x| x == v));
                    }
                }
                mine
            })
        })
        .collect();
    let mut model = vec![0u8; size as usize];
    for (t, h) in handles.into_iter().enumerate() {
        let mine = h.join().unwrap();
        let slot = (cs / threads) as usize;
        for c in 0..64usize {
            let s = c * cs as usize + t * slot;
            model[s..s + slot].copy_from_slice(&mine[s..s + slot]);
        }
    }
    block_on(img.flush()).unwrap();
    assert_same(&read_all(&img, &NoBacking), &model, "threads");
    assert_clean(&img);
}

#[test]
fn compressed_clusters_are_packed() {
    let img = block_on(create(MemIo::new(), &opts(4 << 20, 65536))).unwrap();
    let mut model = vec![0u8; 4 << 20];
    for i in 0..40u64 {
        let data: Vec<u8> = (0..65536u64)
            .map(|b| ((b / 3000) as u8) ^ i as u8)
            .collect();
        block_on(img.write_compressed(i * 65536, &data)).unwrap();
        model[(i * 65536) as usize..((i + 1) * 65536) as usize].copy_from_slice(&data);
    }
    block_on(img.flush()).unwrap();
    // 40 compressed clusters take far fewer host clusters.
    assert!(
        img.io().to_vec().len() < 12 * 65536,
        "{}",
        img.io().to_vec().len()
    );
    assert_clean(&img);
    // Free some (overwrite, discard) and add more: refcounts stay right.
    block_on(img.write(5 * 65536 + 7, &[1u8; 10], &NoBacking)).unwrap();
    model[5 * 65536 + 7..5 * 65536 + 17].fill(1);
    block_on(img.discard(10 * 65536, 20 * 65536)).unwrap();
    model[10 * 65536..30 * 65536].fill(0);
    block_on(img.flush()).unwrap();
    for i in 40..50u64 {
        let data = vec![i as u8; 65536];
        block_on(img.write_compressed(i * 65536, &data)).unwrap();
        model[(i * 65536) as usize..((i + 1) * 65536) as usize].copy_from_slice(&data);
    }
    block_on(img.flush()).unwrap();
    assert_same(&read_all(&img, &NoBacking), &model, "packed");
    assert_clean(&img);
}

#[test]
fn partial_zeroing_of_compressed_cluster_is_refused_cleanly() {
    let mut o = opts(1 << 20, 65536);
    o.extended_l2 = true;
    let img = block_on(create(MemIo::new(), &o)).unwrap();
    let data: Vec<u8> = (0..65536u32).map(|i| (i / 500) as u8).collect();
    block_on(img.write(0, &[3u8; 65536], &NoBacking)).unwrap();
    block_on(img.write_compressed(65536, &data)).unwrap();
    // The first cluster is zeroed whole, then the compressed one refuses:
    // nothing is freed that is still referenced.
    let r = block_on(img.write_zeroes(0, 65536 + 2048, true));
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    block_on(img.flush()).unwrap();
    assert_clean(&img);
    let mut b = vec![0u8; 65536];
    block_on(img.read(65536, &mut b, &NoBacking)).unwrap();
    assert_same(&b, &data, "compressed cluster intact");
}

#[test]
fn autoclear_bits_and_unknown_extensions() {
    let img = block_on(create(MemIo::new(), &opts(1 << 20, 65536))).unwrap();
    block_on(img.close()).unwrap();
    let mut h = img.header();
    h.autoclear_features |= 1 << 5 | crate::header::autoclear::BITMAPS;
    h.unknown_extensions
        .push((0x1234_abcd, b"keep me".to_vec()));
    // (A bitmaps bit without the extension: fine for this test, as the
    // header validation does not insist on it.)
    let mut data = img.io().to_vec();
    let hb = h.to_bytes().unwrap();
    data[..hb.len()].copy_from_slice(&hb);
    let ro = block_on(Qcow2::open(
        MemIo::from_vec(data.clone()),
        OpenOptions::read_only(),
    ))
    .unwrap();
    assert_eq!(ro.header().autoclear_features & (1 << 5), 1 << 5);
    let rw = block_on(Qcow2::open(
        MemIo::from_vec(data),
        OpenOptions::read_write(),
    ))
    .unwrap();
    assert_eq!(rw.header().autoclear_features, 0);
    block_on(rw.close()).unwrap();
    let again = block_on(Qcow2::open(
        MemIo::from_vec(rw.io().to_vec()),
        OpenOptions::read_only(),
    ))
    .unwrap();
    assert_eq!(again.header().autoclear_features, 0);
    assert_eq!(
        again.header().unknown_extensions,
        vec![(0x1234_abcd, b"keep me".to_vec())]
    );
}

#[test]
fn repair_rebuilds_missing_refcount_blocks() {
    for (bad, rb) in [(0u64, 16u32), (1 << 40, 16), (0, 64)] {
        let mut o = opts(4 << 20, 4096);
        o.refcount_bits = rb;
        let img = block_on(create(MemIo::new(), &o)).unwrap();
        block_on(img.write(0, &vec![1u8; 3 << 20], &NoBacking)).unwrap();
        block_on(img.close()).unwrap();
        let mut data = img.io().to_vec();
        let model = read_all(&img, &NoBacking);
        let rt = img.header().refcount_table_offset as usize;
        // Break the first refcount block pointer.
        data[rt..rt + 8].copy_from_slice(&bad.to_be_bytes());
        let img = block_on(Qcow2::open(
            MemIo::from_vec(data),
            OpenOptions::read_write(),
        ))
        .unwrap();
        let r = block_on(img.check(Repair::None)).unwrap();
        assert!(r.corruptions > 0);
        let r = block_on(img.check(Repair::All)).unwrap();
        assert!(
            r.is_consistent_now() || r.corruptions_fixed > 0,
            "{:?}",
            r.messages
        );
        assert_clean(&img);
        assert_same(&read_all(&img, &NoBacking), &model, "after repair");
        // And it stays writable and clean.
        block_on(img.write(3 << 20, &[2u8; 100_000], &NoBacking)).unwrap();
        block_on(img.flush()).unwrap();
        assert_clean(&img);
    }
}

/// `cache-clean-interval`: each clean drops the clean tables unused since the
/// previous one; tables in use and dirty tables stay.
#[test]
fn periodic_clean_drops_idle_cache_entries() {
    // 4 KiB clusters: one L2 table maps 2 MiB, so 8 MiB need 4.
    let img = block_on(create(MemIo::new(), &opts(8 << 20, 4096))).unwrap();
    let img = reopen(img, true);
    for i in 0..4u64 {
        block_on(img.write(i * (2 << 20), &[i as u8 + 1; 4096], &NoBacking)).unwrap();
    }
    block_on(img.flush()).unwrap();
    let s = img.cache_stats();
    assert_eq!(s.l2.entries, 4);
    assert!(s.refcount.entries >= 1);
    // Everything was used since the image was opened: the first clean keeps it.
    assert_eq!(img.clean_unused_cache_entries(), 0);
    // The first L2 table is used again; the others and the refcount block idle.
    let mut b = [0u8; 512];
    block_on(img.read(0, &mut b, &NoBacking)).unwrap();
    let rc = img.cache_stats().refcount.entries;
    assert_eq!(img.clean_unused_cache_entries() as u64, 3 + rc);
    let s = img.cache_stats();
    assert_eq!((s.l2.entries, s.refcount.entries), (1, 0));
    assert_eq!(s.l2.cleaned, 3);
    assert_eq!(s.cleans, 2);
    // Reading a dropped table again misses and brings it back.
    let misses = s.l2.misses;
    block_on(img.read(2 << 20, &mut b, &NoBacking)).unwrap();
    assert_eq!(b, [2u8; 512]);
    assert_eq!(img.cache_stats().l2.misses, misses + 1);
    // Dirty tables survive any number of cleans until written back (a new
    // cluster: its L2 entry and refcount change).
    let at = (6 << 20) + 65536;
    block_on(img.write(at, &[9u8; 4096], &NoBacking)).unwrap();
    img.clean_unused_cache_entries();
    img.clean_unused_cache_entries();
    let s = img.cache_stats();
    // (The refcount block was written at the write, before the L2 entry: it
    // is clean and may go.)
    assert!(s.l2.entries >= 1, "{s:?}");
    block_on(img.flush()).unwrap();
    img.clean_unused_cache_entries();
    img.clean_unused_cache_entries();
    let s = img.cache_stats();
    assert_eq!((s.l2.entries, s.refcount.entries), (0, 0), "{s:?}");
    // Nothing was lost.
    assert_eq!(read_all(&img, &NoBacking)[at as usize], 9);
    assert_clean(&img);
}

/// MemIo that counts writes and the flushes that had writes to make stable
/// (what a block layer's flush elision lets reach the disk).
#[derive(Default)]
struct CountingIo {
    mem: MemIo,
    writes: std::sync::atomic::AtomicU64,
    pending: std::sync::atomic::AtomicBool,
    syncs: std::sync::atomic::AtomicU64,
}

impl CountingIo {
    fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::SeqCst;
        (self.writes.load(SeqCst), self.syncs.load(SeqCst))
    }
}

impl crate::QcowIo for CountingIo {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.mem.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        self.writes.fetch_add(1, SeqCst);
        self.pending.store(true, SeqCst);
        self.mem.write_at(offset, buf).await
    }
    async fn flush(&self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.pending.swap(false, SeqCst) {
            self.syncs.fetch_add(1, SeqCst);
        }
        Ok(())
    }
    async fn len(&self) -> std::io::Result<u64> {
        self.mem.len().await
    }
    async fn set_len(&self, len: u64) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        self.pending.store(true, SeqCst);
        self.mem.set_len(len).await
    }
}

/// Allocating writes each followed by a flush, on an image with and without
/// lazy refcounts: (writes, syncs) it took, and the image file afterwards
/// (not closed: as after a crash).
fn flushed_allocations(lazy: bool) -> ((u64, u64), Vec<u8>) {
    let mut o = opts(8 << 20, 65536);
    o.lazy_refcounts = lazy;
    let img = block_on(create(MemIo::new(), &o)).unwrap();
    block_on(img.close()).unwrap();
    let io = CountingIo {
        mem: MemIo::from_vec(img.io().to_vec()),
        ..Default::default()
    };
    let img = block_on(Qcow2::open(io, OpenOptions::read_write())).unwrap();
    let before = img.io().counts();
    // Whole clusters: no copy-on-write or tail zeroing adds writes.
    for i in 0..32u64 {
        block_on(img.write(i * 65536, &[i as u8 + 1; 65536], &NoBacking)).unwrap();
        block_on(img.flush()).unwrap();
    }
    let after = img.io().counts();
    let data = img.io().mem.to_vec();
    // Dropped without close: the warning about unwritten metadata is expected
    // with lazy refcounts.
    ((after.0 - before.0, after.1 - before.1), data)
}

/// Lazy refcounts: allocations write L2 tables only, with one sync per guest
/// flush; the refcounts reach the file at close, and a crash before that is
/// repaired on open. Strict refcounts come close with reserved clusters.
#[test]
fn lazy_refcounts_save_refcount_writes_and_syncs() {
    let ((w, s), _) = flushed_allocations(false);
    let ((lw, ls), crashed) = flushed_allocations(true);
    // The first write also creates the L2 table: the table, its refcount and
    // the L1 entry (3 writes), with a sync before the L1 entry. Data clusters
    // come from reservations (1 MiB, then 2 MiB): each writes the refcounts
    // (the first also the dirty bit) and syncs. Then each write puts its data
    // and its L2 entry in the file with no sync (the refcount is stable
    // already); each flush writes the L2 table whole, with one sync.
    assert_eq!((w, s), (3 + 2 + 1 + 3 * 32, 1 + 2 + 32), "strict refcounts");
    // Lazy: the new L2 table, the dirty bit and the L1 entry, with one sync
    // before the L1 entry; then each flush writes the data and the L2 table,
    // with one sync (new clusters past the end need no sync before their L2
    // entries, once the reservations' syncs made the file's growth stable).
    // The L2 entry also reaches the file at the write (no sync: the refcounts
    // may lag behind with the dirty bit set, and the clusters are new).
    assert_eq!((lw, ls), (3 + 3 * 32, 1 + 2 + 32), "lazy refcounts");
    // The file after that "crash" has the dirty bit and stale refcounts; a
    // read-only look sees the data, a writable open repairs.
    let h = Qcow2::open(MemIo::from_vec(crashed.clone()), OpenOptions::read_only());
    let img = block_on(h).unwrap();
    assert_ne!(
        img.header().incompatible_features & crate::header::incompat::DIRTY,
        0
    );
    let r = block_on(img.check(Repair::None)).unwrap();
    assert!(r.corruptions > 0, "refcounts were written: {r:?}");
    let img = block_on(Qcow2::open(
        MemIo::from_vec(crashed),
        OpenOptions::read_write(),
    ))
    .unwrap();
    assert_eq!(
        img.header().incompatible_features & crate::header::incompat::DIRTY,
        0
    );
    assert_clean(&img);
    let mut b = [0u8; 4096];
    for i in 0..32u64 {
        block_on(img.read(i * 65536 + 4096, &mut b, &NoBacking)).unwrap();
        assert_eq!(b, [i as u8 + 1; 4096]);
    }
    // A clean close writes the refcounts and clears the dirty bit.
    let mut o = opts(8 << 20, 65536);
    o.lazy_refcounts = true;
    let img = block_on(create(MemIo::new(), &o)).unwrap();
    let img = reopen(img, true);
    block_on(img.write(0, &[7u8; 4096], &NoBacking)).unwrap();
    block_on(img.flush()).unwrap();
    let img = reopen(img, false);
    assert_eq!(
        img.header().incompatible_features & crate::header::incompat::DIRTY,
        0
    );
    assert_clean(&img);
}

/// Lazy refcounts still make guest data stable before an L2 entry maps a
/// reused cluster (which holds older data until the new data lands): that
/// flush costs two syncs, where new clusters past the end cost one.
#[test]
fn lazy_refcounts_sync_data_before_mapping_reused_clusters() {
    let mut o = opts(8 << 20, 65536);
    o.lazy_refcounts = true;
    let img = block_on(create(MemIo::new(), &o)).unwrap();
    block_on(img.close()).unwrap();
    let io = CountingIo {
        mem: MemIo::from_vec(img.io().to_vec()),
        ..Default::default()
    };
    let img = block_on(Qcow2::open(io, OpenOptions::read_write())).unwrap();
    let cluster = [5u8; 65536];
    for i in 0..4u64 {
        block_on(img.write(i * 65536, &cluster, &NoBacking)).unwrap();
    }
    block_on(img.flush()).unwrap();
    let host_of = |guest: u64| match block_on(img.map(guest, 512)).unwrap()[0].kind {
        ExtentKind::Data { host_offset } => host_offset,
        k => panic!("{k:?}"),
    };
    let old = host_of(65536);
    let syncs = |img: &Qcow2<CountingIo>| img.io().counts().1;
    // A new cluster past the end: one sync.
    let s0 = syncs(&img);
    block_on(img.write(7 << 20, &cluster, &NoBacking)).unwrap();
    block_on(img.flush()).unwrap();
    assert_eq!(syncs(&img) - s0, 1);
    // Freed at the flush after the discard (its L2 update stable first).
    block_on(img.discard(0, 4 * 65536)).unwrap();
    block_on(img.flush()).unwrap();
    // A reused cluster: the data is synced before the L2 table is written.
    let s0 = syncs(&img);
    block_on(img.write(6 << 20, &[6u8; 65536], &NoBacking)).unwrap();
    let reused = host_of(6 << 20);
    assert!(reused <= old, "not reused: {reused:#x} > {old:#x}");
    block_on(img.flush()).unwrap();
    assert_eq!(syncs(&img) - s0, 2);
    block_on(img.close()).unwrap();
    let file = MemIo::from_vec(img.io().mem.to_vec());
    let img = block_on(Qcow2::open(file, OpenOptions::read_only())).unwrap();
    assert_eq!(
        img.header().incompatible_features & crate::header::incompat::DIRTY,
        0
    );
    assert_clean(&img);
}

fn is_dirty<I: crate::QcowIo>(img: &Qcow2<I>) -> bool {
    img.header().incompatible_features & crate::header::incompat::DIRTY != 0
}

fn host_of<I: crate::QcowIo>(img: &Qcow2<I>, guest: u64) -> u64 {
    match block_on(img.map(guest, 512)).unwrap()[0].kind {
        ExtentKind::Data { host_offset } => host_offset,
        k => panic!("guest {guest:#x}: {k:?}"),
    }
}

/// Strict refcounts: allocating writes take clusters reserved in batches,
/// whose refcounts one sync made stable, so they need no sync each. A clean
/// close gives the rest back: no leak, no dirty bit, and the file ends at the
/// last cluster used.
#[test]
fn reserved_clusters_save_a_sync_per_allocating_write() {
    let cs = 65536;
    let img = block_on(create(MemIo::new(), &opts(64 << 20, cs))).unwrap();
    block_on(img.close()).unwrap();
    let io = CountingIo {
        mem: MemIo::from_vec(img.io().to_vec()),
        ..Default::default()
    };
    let img = block_on(Qcow2::open(io, OpenOptions::read_write())).unwrap();
    let s0 = img.io().counts().1;
    // 200 clusters in random order, 4 KiB of each (the rest reads as zeroes
    // with no copy-on-write written: the clusters are new).
    let mut order: Vec<u64> = (0..200).collect();
    let mut rng = Rng(7);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for (i, &c) in order.iter().enumerate() {
        let v = (i % 250 + 1) as u8;
        block_on(img.write(c * cs + 4096, &[v; 4096], &NoBacking)).unwrap();
    }
    // The L2 table (one sync), then reservations of 1, 2, 4 and 8 MiB (240
    // clusters): one sync each. Without them: one per write.
    assert_eq!(img.io().counts().1 - s0, 1 + 4);
    assert!(is_dirty(&img), "no dirty bit while clusters are reserved");
    block_on(img.close()).unwrap();
    assert!(!is_dirty(&img));
    let last = (0..200).map(|c| host_of(&img, c * cs)).max().unwrap();
    let file = img.io().mem.to_vec();
    assert_eq!(
        file.len() as u64,
        last + cs,
        "the reservation's tail is cut"
    );
    let img = block_on(Qcow2::open(MemIo::from_vec(file), OpenOptions::read_only())).unwrap();
    assert!(!is_dirty(&img));
    assert_clean(&img);
    let mut b = [0u8; 8192];
    for (i, &c) in order.iter().enumerate() {
        block_on(img.read(c * cs, &mut b, &NoBacking)).unwrap();
        assert_eq!(b[..4096], [0u8; 4096], "cluster {c}");
        assert_eq!(b[4096..], [(i % 250 + 1) as u8; 4096], "cluster {c}");
    }
}

/// A crash leaves the reserved clusters not handed out leaked, never more
/// (refcounts too high, none too low); the image has the dirty bit, so the
/// next writable open rebuilds the refcounts and reclaims them.
#[test]
fn a_crash_leaks_the_reservation_until_the_next_writable_open() {
    let cs = 65536;
    let img = block_on(create(MemIo::new(), &opts(64 << 20, cs))).unwrap();
    let img = reopen(img, true);
    for c in 0..3u64 {
        block_on(img.write(c * cs, &[c as u8 + 1; 65536], &NoBacking)).unwrap();
    }
    block_on(img.flush()).unwrap();
    // No close: the file as a SIGKILL leaves it.
    let crashed = img.io().to_vec();
    let ro = block_on(Qcow2::open(
        MemIo::from_vec(crashed.clone()),
        OpenOptions::read_only(),
    ))
    .unwrap();
    assert!(is_dirty(&ro));
    let r = block_on(ro.check(Repair::None)).unwrap();
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
    // A 1 MiB batch, 3 clusters of it used.
    assert_eq!(r.leaks, 16 - 3, "{:?}", r.messages);
    let rw = block_on(Qcow2::open(
        MemIo::from_vec(crashed),
        OpenOptions::read_write(),
    ))
    .unwrap();
    assert!(!is_dirty(&rw));
    assert_clean(&rw);
    let mut b = vec![0u8; 65536];
    for c in 0..3u64 {
        block_on(rw.read(c * cs, &mut b, &NoBacking)).unwrap();
        assert!(b.iter().all(|&x| x == c as u8 + 1), "cluster {c}");
    }
    block_on(rw.close()).unwrap();
}

/// Replays a SIGKILL at every point of `session` (every write that completed
/// before the kill landed, nothing after it), on the file `base`, and opens the
/// result writable: what the image still holds then (leaks, corruptions).
fn kills_not_repaired(
    base: &[u8],
    what: &str,
    session: impl FnOnce(&Qcow2<CrashIo>),
) -> Vec<String> {
    let io = CrashIo::default();
    io.inner.lock().unwrap().0 = base.to_vec();
    let img = block_on(Qcow2::open(io, OpenOptions::read_write())).unwrap();
    session(&img);
    let log = img.io().inner.lock().unwrap().1.clone();
    drop(img);
    let mut found = Vec::new();
    for k in 0..=log.len() {
        let mut d = base.to_vec();
        for op in &log[..k] {
            apply(&mut d, op);
        }
        let rw = block_on(Qcow2::open(MemIo::from_vec(d), OpenOptions::read_write()))
            .unwrap_or_else(|e| panic!("{what}: killed after {k}/{} ops: {e}", log.len()));
        let r = block_on(rw.check(Repair::None)).unwrap();
        if !r.is_clean() {
            found.push(format!(
                "{what}: killed after {k}/{} ops, then opened writable: {:?}",
                log.len(),
                r.messages
            ));
        }
    }
    found
}

/// Leaks that a kill leaves outside reservations: a new L2 table (its refcount
/// stable before the L1 entry), a freed cluster reused (its refcount stable before
/// the L2 entry, as the clusters a repair freed at the end of the file are reused
/// before a new reservation), a cluster whose reference a discard dropped (its
/// refcount decreased only after the L2 update is stable). With the dirty bit set
/// before the first such change, the next writable open reclaims them all.
#[test]
fn a_kill_at_any_point_leaves_no_leak_after_the_next_writable_open() {
    let cs = 65536;
    let img = block_on(create(MemIo::new(), &opts(64 << 20, cs))).unwrap();
    block_on(img.close()).unwrap();
    let fresh = img.io().to_vec();
    drop(img);
    // A fresh image: the L2 table, then a reservation.
    let mut found = kills_not_repaired(&fresh, "fresh image", |img| {
        block_on(img.write(0, &[1u8; 4096], &NoBacking)).unwrap();
    });
    // A killed session that reserved 16 clusters and used 2; the repair at the
    // next open frees the other 14, which stay in the file (not cut).
    let img = block_on(Qcow2::open(
        MemIo::from_vec(fresh),
        OpenOptions::read_write(),
    ))
    .unwrap();
    for c in 0..2u64 {
        block_on(img.write(c * cs, &[c as u8 + 1; 4096], &NoBacking)).unwrap();
    }
    let killed = img.io().to_vec();
    drop(img);
    let img = block_on(Qcow2::open(
        MemIo::from_vec(killed),
        OpenOptions::read_write(),
    ))
    .unwrap();
    block_on(img.close()).unwrap();
    assert!(!is_dirty(&img));
    let repaired = img.io().to_vec();
    drop(img);
    found.extend(kills_not_repaired(
        &repaired,
        "reusing freed clusters",
        |img| {
            for c in 2..5u64 {
                block_on(img.write(c * cs, &[c as u8 + 1; 4096], &NoBacking)).unwrap();
            }
        },
    ));
    found.extend(kills_not_repaired(&repaired, "discarding", |img| {
        block_on(img.discard(0, cs)).unwrap();
        block_on(img.flush()).unwrap();
    }));
    assert!(found.is_empty(), "{found:#?}");
}

/// Refcounts of clusters past the end of the file, as a crash leaves them
/// when a reservation's refcounts reached the disk and the file's growth did
/// not (or when QEMU allocated clusters whose data never landed): the
/// allocator skips them as leaks instead of finding them in use and calling
/// the image corrupt.
#[test]
fn refcounts_past_the_end_of_the_file_are_skipped_as_leaks() {
    let cs = 65536;
    for compat in [Compat::V3, Compat::V2] {
        let mut o = opts(64 << 20, cs);
        o.compat = compat;
        let img = block_on(create(MemIo::new(), &o)).unwrap();
        let img = reopen(img, true);
        block_on(img.write(0, &[1u8; 65536], &NoBacking)).unwrap();
        block_on(img.close()).unwrap();
        let end = img.io().to_vec().len() as u64 / cs;
        let img = reopen(img, true);
        for c in end..end + 4 {
            block_on(img.rc_add(c, 1)).unwrap();
        }
        // Closed: no dirty bit (a v3 image gets one with the first refcount
        // increase), as QEMU's allocator leaves such refcounts.
        block_on(img.close()).unwrap();
        let file = img.io().to_vec();
        assert_eq!(file.len() as u64, end * cs);
        drop(img);
        let img = block_on(Qcow2::open(
            MemIo::from_vec(file),
            OpenOptions::read_write(),
        ))
        .unwrap();
        for c in 1..40u64 {
            block_on(img.write(c * cs, &[c as u8 + 1; 65536], &NoBacking)).unwrap();
        }
        let img = reopen(img, false);
        let r = block_on(img.check(Repair::None)).unwrap();
        assert_eq!(r.corruptions, 0, "{compat:?}: {:?}", r.messages);
        assert_eq!(r.leaks, 4, "{compat:?}: {:?}", r.messages);
        let mut b = vec![0u8; 65536];
        for c in 0..40u64 {
            block_on(img.read(c * cs, &mut b, &NoBacking)).unwrap();
            assert!(
                b.iter().all(|&x| x == c as u8 + 1),
                "{compat:?} cluster {c}"
            );
        }
    }
}

#[test]
fn check_finds_and_repairs_refcounts_past_the_end_of_the_file() {
    // A crash between a refcount write and the write that would grow the file
    // leaves refcounts past its end; a repair must clear them (qemu-img check
    // counts them as leaks once the file grows over them).
    let cs = 65536;
    let img = block_on(create(MemIo::new(), &opts(64 << 20, cs))).unwrap();
    let img = reopen(img, true);
    block_on(img.write(0, &[1u8; 65536], &NoBacking)).unwrap();
    block_on(img.close()).unwrap();
    let end = img.io().to_vec().len() as u64 / cs;
    let img = reopen(img, true);
    for c in end + 1..end + 3 {
        block_on(img.rc_add(c, 1)).unwrap();
    }
    // No dirty bit, else the writable open below would repair first.
    block_on(img.close()).unwrap();
    let file = img.io().to_vec();
    drop(img);
    let ro = block_on(Qcow2::open(
        MemIo::from_vec(file.clone()),
        OpenOptions::read_only(),
    ))
    .unwrap();
    let r = block_on(ro.check(Repair::None)).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 2), "{:?}", r.messages);
    let img = block_on(Qcow2::open(
        MemIo::from_vec(file),
        OpenOptions::read_write(),
    ))
    .unwrap();
    let r = block_on(img.check(Repair::Leaks)).unwrap();
    assert_eq!((r.leaks, r.leaks_fixed), (2, 2), "{:?}", r.messages);
    let r = block_on(img.check(Repair::None)).unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
    // Space past the end is free again: new clusters go right after the data.
    block_on(img.write(cs, &[2u8; 65536], &NoBacking)).unwrap();
    let r = block_on(img.check(Repair::None)).unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
}

/// A file that records the blkdebug events raised on it, with a mark for each
/// write, in order.
#[derive(Default)]
struct EventIo {
    mem: MemIo,
    log: std::sync::Mutex<Vec<&'static str>>,
}

impl EventIo {
    fn take(&self) -> Vec<&'static str> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl crate::QcowIo for EventIo {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.mem.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.log.lock().unwrap().push("(write)");
        self.mem.write_at(offset, buf).await
    }
    async fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    async fn len(&self) -> std::io::Result<u64> {
        self.mem.len().await
    }
    async fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.mem.set_len(len).await
    }
    fn debug_event(&self, event: crate::DebugEvent) {
        self.log.lock().unwrap().push(event.name());
    }
}

#[test]
fn debug_events_come_where_qemu_raises_them() {
    let img = block_on(create(MemIo::new(), &opts(8 << 20, 65536))).unwrap();
    block_on(img.write(0, &[1u8; 65536], &crate::NoBacking)).unwrap();
    block_on(img.close()).unwrap();
    let io = EventIo {
        mem: MemIo::from_vec(img.io().to_vec()),
        ..Default::default()
    };
    let img = block_on(Qcow2::open(io, OpenOptions::read_write())).unwrap();
    assert_eq!(img.io().take(), ["reftable_load"]);
    // An L2 table is loaded on a miss only.
    block_on(img.map(0, 4096)).unwrap();
    assert_eq!(img.io().take(), ["l2_load"]);
    block_on(img.map(4096, 4096)).unwrap();
    assert_eq!(img.io().take(), Vec::<&str>::new());
    // An overwrite in place raises nothing.
    block_on(img.write(0, &[2u8; 65536], &crate::NoBacking)).unwrap();
    let ev = img.io().take();
    assert!(ev.iter().all(|e| *e == "(write)"), "{ev:?}");
    // A partial write to a new cluster allocates it, zeroes what it does not
    // cover, and the flush writes the L2 table back.
    block_on(img.write(2 * 65536, &[3u8; 4096], &crate::NoBacking)).unwrap();
    let ev = img.io().take();
    assert_eq!(ev.first(), Some(&"cluster_alloc"), "{ev:?}");
    assert!(ev.contains(&"refblock_load"), "{ev:?}");
    assert!(!ev.contains(&"l2_update"), "{ev:?}");
    block_on(img.flush()).unwrap();
    let ev = img.io().take();
    let at = ev
        .iter()
        .position(|e| *e == "l2_update")
        .expect("l2_update");
    assert_eq!(ev[at + 1], "(write)", "{ev:?}");
    // The first write to a fresh image allocates an L2 table, writes it, then
    // the L1 entry.
    let img2 = block_on(create(MemIo::new(), &opts(8 << 20, 65536))).unwrap();
    block_on(img2.close()).unwrap();
    let io = EventIo {
        mem: MemIo::from_vec(img2.io().to_vec()),
        ..Default::default()
    };
    let img2 = block_on(Qcow2::open(io, OpenOptions::read_write())).unwrap();
    img2.io().take();
    block_on(img2.write(0, &[4u8; 65536], &crate::NoBacking)).unwrap();
    let ev = img2.io().take();
    let pos = |name: &str| ev.iter().position(|e| *e == name);
    let (alloc, write, l1) = (
        pos("cluster_alloc"),
        pos("l2_alloc_write"),
        pos("l1_update"),
    );
    assert!(alloc < write && write < l1 && alloc.is_some(), "{ev:?}");
    assert_eq!(ev[l1.unwrap() + 1], "(write)", "{ev:?}");
}

/// A toy cipher for the encryption plumbing: each byte XORed with its sector's
/// host offset (so a sector decrypted or encrypted with the wrong offset shows).
struct XorCipher;
impl XorCipher {
    fn run(host_offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if !host_offset.is_multiple_of(512) || !buf.len().is_multiple_of(512) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        for (i, s) in buf.chunks_mut(512).enumerate() {
            let k = (host_offset / 512 + i as u64).to_le_bytes();
            for (j, b) in s.iter_mut().enumerate() {
                *b ^= k[j % 8] ^ 0x5a;
            }
        }
        Ok(())
    }
}
impl crate::crypt::DataCipher for XorCipher {
    fn encrypt(&self, host_offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        Self::run(host_offset, buf)
    }
    fn decrypt(&self, host_offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        Self::run(host_offset, buf)
    }
}

/// Encrypted data: the header area is counted by check, COW re-encrypts what it
/// copies for the new host cluster (from the old cluster of a snapshot, from the
/// backing file, zeroes), zero clusters read as zeroes, and without the cipher
/// data is refused rather than served as ciphertext.
#[test]
fn encrypted_cow_and_check() {
    let cs = 4096;
    let size = 64 * cs;
    let mut o = opts(size, cs);
    o.encryption = Some(vec![0xee; 3 * cs as usize + 100]);
    let mut img = block_on(create(MemIo::new(), &o)).unwrap();
    let (hoff, hlen) = img.crypto_header().unwrap();
    assert_eq!(hlen, 3 * cs + 100);
    assert!(img.is_encrypted());
    // No cipher yet: data is refused.
    assert!(block_on(img.write(0, &[1; 512], &NoBacking)).is_err());
    img.set_cipher(std::sync::Arc::new(XorCipher));
    let backing: Vec<u8> = (0..size).map(|i| (i / 7) as u8).collect();
    let mut model = backing.clone();
    let w = |img: &Qcow2<MemIo>, model: &mut Vec<u8>, off: u64, len: usize, v: u8| {
        block_on(img.write(off, &vec![v; len], &backing)).unwrap();
        model[off as usize..off as usize + len].fill(v);
    };
    w(&img, &mut model, 512, 1024, 1); // COW from the backing file
    w(&img, &mut model, 5 * cs + 1536, 512, 2);
    assert_same(&read_all(&img, &backing), &model, "after writes");
    // Unaligned writes are refused (the cipher works on whole sectors).
    assert!(block_on(img.write(100, &[1; 512], &backing)).is_err());
    block_on(img.snapshot_create("s")).unwrap();
    // COW from the shared cluster: decrypted with its offset, encrypted for the new.
    w(&img, &mut model, 1024, 512, 3);
    assert_same(&read_all(&img, &backing), &model, "after the snapshot COW");
    block_on(img.write_zeroes(8 * cs, cs, false)).unwrap();
    model[8 * cs as usize..9 * cs as usize].fill(0);
    w(&img, &mut model, 8 * cs + 512, 512, 4); // COW of a zero cluster: encrypted zeroes
    assert_same(&read_all(&img, &backing), &model, "after zero COW");
    // Ciphertext on disk, and the header untouched.
    let raw = img.io().to_vec();
    assert!(!raw.windows(512).any(|w| w.iter().all(|&b| b == 3)));
    assert!(raw[hoff as usize..(hoff + hlen) as usize]
        .iter()
        .all(|&b| b == 0xee));
    assert_clean(&img);
    let r = block_on(img.check(Repair::All)).unwrap();
    assert!(r.is_clean(), "{:#?}", r.messages);
    let mut img = reopen(img, true);
    assert!(block_on(img.read(0, &mut [0; 512], &backing)).is_err());
    img.set_cipher(std::sync::Arc::new(XorCipher));
    assert_same(&read_all(&img, &backing), &model, "reopened");
    assert_eq!(img.crypto_header(), Some((hoff, hlen)));
    block_on(img.close()).unwrap();
}

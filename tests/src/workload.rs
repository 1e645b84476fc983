//! Randomised I/O against a model of the disk ("shadow"), shared by several tests.

use crate::client::{IoQueue, Req};
use crate::util::{assert_same_data, Rng};
use blkio::ReqFlags;
use std::ops::Range;

/// Parameters of [`exercise`].
#[derive(Debug, Clone)]
pub struct ExerciseOpts {
    /// Rounds; each round is one batch of writes then one batch of reads.
    pub rounds: usize,
    /// Requests per batch: 1..=max_batch, submitted together (queue depth).
    pub max_batch: usize,
    /// Offset and length granularity in bytes (512, or 4096 for a 4k export).
    pub align: u64,
    /// Maximum request length in bytes (a multiple of align).
    pub max_len: u64,
    /// Maximum segments per request (libblkio `max-segments` caps this).
    pub max_segs: usize,
    /// Maximum bytes per segment (libblkio `max-segment-len`; 0 = no limit).
    pub max_seg_len: usize,
    /// Allow segment boundaries and buffer addresses that are not 512-byte aligned (valid
    /// virtio-blk: only the total must be a multiple of the sector size).
    pub byte_granular: bool,
    /// Use FUA on some writes.
    pub fua: bool,
}

impl Default for ExerciseOpts {
    fn default() -> Self {
        ExerciseOpts {
            rounds: 100,
            max_batch: 8,
            align: 512,
            max_len: 256 * 512,
            max_segs: 4,
            max_seg_len: 0,
            byte_granular: true,
            fua: true,
        }
    }
}

/// Split `total` bytes into 1..=max_segs segments; boundaries at multiples of `gran`
/// (1 for byte granularity); no segment longer than `max_seg_len` (0 = unlimited).
pub fn random_segments(
    rng: &mut Rng,
    total: usize,
    max_segs: usize,
    max_seg_len: usize,
    gran: usize,
) -> Vec<usize> {
    let units = total / gran;
    let n = rng.range_usize(1, max_segs.min(units).max(1) + 1);
    let mut segs: Vec<usize> = rng.split(units, n).into_iter().map(|u| u * gran).collect();
    if max_seg_len > 0 {
        let mut out = Vec::new();
        for s in segs {
            let mut left = s;
            while left > max_seg_len {
                out.push(max_seg_len);
                left -= max_seg_len;
            }
            out.push(left);
        }
        segs = out;
    }
    segs
}

/// Place segments of `lens` in a buffer from `start`, with gaps and (if `unaligned`)
/// odd start addresses. Returns the ranges and the end of the used area.
fn place(
    rng: &mut Rng,
    start: usize,
    lens: &[usize],
    unaligned: bool,
) -> (Vec<Range<usize>>, usize) {
    let mut pos = start;
    let mut out = Vec::with_capacity(lens.len());
    for &l in lens {
        pos = pos.div_ceil(512) * 512 + 64;
        if unaligned && rng.range(0, 2) == 0 {
            pos += rng.range_usize(1, 64);
        }
        out.push(pos..pos + l);
        pos += l;
    }
    (out, pos + 64)
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Random batches of writes (non-overlapping within a batch) and reads in
/// `base..base + shadow.len()` of the disk, through `q`; every read is compared with the
/// model, and read buffers are checked for writes outside the segments. `shadow` must hold
/// the current contents of that range and is kept up to date.
pub fn exercise(q: &mut IoQueue, rng: &mut Rng, base: u64, shadow: &mut [u8], o: &ExerciseOpts) {
    let region = shadow.len() as u64;
    let align = o.align;
    assert!(region >= o.max_len && o.max_len / align * align == o.max_len);
    assert_eq!(base / align * align, base, "base must be aligned");
    let gran = if o.byte_granular { 1 } else { 512 };
    const POISON: u8 = 0x5A;
    for round in 0..o.rounds {
        // Writes.
        let n = rng.range_usize(1, o.max_batch + 1);
        let mut reqs = Vec::new();
        let mut ranges: Vec<Range<u64>> = Vec::new();
        let mut cursor = 0usize;
        for _ in 0..n {
            let len = align * rng.range(1, o.max_len / align + 1);
            let off = align * rng.range(0, (region - len) / align + 1);
            let r = off..off + len;
            if ranges.iter().any(|x| overlaps(x, &r)) {
                continue;
            }
            let lens = random_segments(rng, len as usize, o.max_segs, o.max_seg_len, gran);
            let (segs, end) = place(rng, cursor, &lens, o.byte_granular);
            assert!(end <= q.buf_len(), "queue buffer too small for the batch");
            cursor = end;
            let mut sh = off as usize;
            for s in &segs {
                let buf = &mut q.buf()[s.clone()];
                rng.fill(buf);
                shadow[sh..sh + s.len()].copy_from_slice(buf);
                sh += s.len();
            }
            let flags = if o.fua && rng.range(0, 8) == 0 {
                ReqFlags::FUA
            } else {
                ReqFlags::empty()
            };
            let offset = base + off;
            reqs.push(if segs.len() == 1 && rng.range(0, 2) == 0 {
                Req::Write {
                    offset,
                    buf: segs[0].clone(),
                    flags,
                }
            } else {
                Req::Writev {
                    offset,
                    segs,
                    flags,
                }
            });
            ranges.push(r);
        }
        let rets = q.submit(&reqs);
        for (r, ret) in reqs.iter().zip(&rets) {
            assert_eq!(*ret, 0, "round {round}: write failed: {r:?}");
        }

        // Reads (may overlap each other).
        let n = rng.range_usize(1, o.max_batch + 1);
        let mut reqs = Vec::new();
        let mut cursor = 0usize;
        let mut expect: Vec<(Vec<Range<usize>>, Range<usize>)> = Vec::new();
        for _ in 0..n {
            let len = align * rng.range(1, o.max_len / align + 1);
            let off = align * rng.range(0, (region - len) / align + 1);
            let lens = random_segments(rng, len as usize, o.max_segs, o.max_seg_len, gran);
            let (segs, end) = place(rng, cursor, &lens, o.byte_granular);
            cursor = end;
            let offset = base + off;
            reqs.push(if segs.len() == 1 && rng.range(0, 2) == 0 {
                Req::Read {
                    offset,
                    buf: segs[0].clone(),
                }
            } else {
                Req::Readv {
                    offset,
                    segs: segs.clone(),
                }
            });
            expect.push((segs, off as usize..(off + len) as usize));
        }
        q.buf()[..cursor].fill(POISON);
        let rets = q.submit(&reqs);
        let buf = q.buf();
        let mut covered = vec![false; cursor];
        for ((req, ret), (segs, range)) in reqs.iter().zip(&rets).zip(&expect) {
            assert_eq!(*ret, 0, "round {round}: read failed: {req:?}");
            let mut got = Vec::with_capacity(range.len());
            for s in segs {
                got.extend_from_slice(&buf[s.clone()]);
                covered[s.clone()].iter_mut().for_each(|c| *c = true);
            }
            assert_same_data(
                &format!("round {round}: {req:?} (disk bytes {range:?} from base {base})"),
                &got,
                &shadow[range.clone()],
            );
        }
        if let Some(i) = (0..cursor).find(|&i| !covered[i] && buf[i] != POISON) {
            panic!(
                "round {round}: a read wrote outside its segments (buffer byte {i}); \
                 requests: {reqs:?}"
            );
        }
    }
}

/// Read `base..base + shadow.len()` back in 1 MiB chunks and compare with the model.
pub fn verify_all(q: &mut IoQueue, base: u64, shadow: &[u8], what: &str) {
    let chunk = (1usize << 20).min(q.buf_len());
    let mut off = 0usize;
    while off < shadow.len() {
        let n = chunk.min(shadow.len() - off);
        let got = q
            .read_poisoned(base + off as u64, n, 0x5A)
            .unwrap_or_else(|e| panic!("{what}: read at {} failed: {e}", base + off as u64));
        assert_same_data(
            &format!(
                "{what}: disk bytes {}..{}",
                base + off as u64,
                base + (off + n) as u64
            ),
            &got,
            &shadow[off..off + n],
        );
        off += n;
    }
}

/// [`exercise`] on every queue at once, each on its own thread and its own equal
/// slice of the disk (queue `i` on slice `i` of `shadow`), with its own seed.
pub fn exercise_queues(queues: &mut [IoQueue], shadow: &mut [u8], o: &ExerciseOpts, seeds: &[u64]) {
    let region = shadow.len() / queues.len();
    std::thread::scope(|s| {
        for ((q, sh), &seed) in queues.iter_mut().zip(shadow.chunks_mut(region)).zip(seeds) {
            s.spawn(move || {
                let base = (q.index() * region) as u64;
                exercise(q, &mut Rng::with_seed(seed), base, sh, o);
            });
        }
    });
}

//! Dirty bitmaps: which ranges of a node were written, at a power-of-two
//! granularity (QEMU's HBitmap, reduced to its last level). Writers set bits
//! lock-free (one atomic OR per 64 granules, skipped when they are set already); a job takes dirty ranges out (find and
//! clear) to copy them.
//!
//! A bitmap's size is fixed: a node that changes size gives its named bitmaps
//! resized copies ([`DirtyBitmap::resized`]; see `Node::mark_dirty` for how writes
//! racing that copy are not lost).

use std::sync::atomic::{AtomicU64, Ordering};

/// The mask of bits `lo..hi` of a word (`lo < hi <= 64`).
fn mask(lo: u64, hi: u64) -> u64 {
    if hi - lo == 64 {
        u64::MAX
    } else {
        ((1u64 << (hi - lo)) - 1) << lo
    }
}

/// Applies `f(word, mask)` to the words holding bits `b..e`.
#[inline]
fn for_bits(words: &[AtomicU64], mut b: u64, e: u64, f: impl Fn(&AtomicU64, u64)) {
    while b < e {
        let lo = b % 64;
        let hi = (e - (b - lo)).min(64);
        f(&words[(b / 64) as usize], mask(lo, hi));
        b = b - lo + 64;
    }
}

pub struct DirtyBitmap {
    granularity: u64,
    /// Bytes covered.
    size: u64,
    /// Bit `i` (word `i / 64`, bit `i % 64`) covers bytes `i * g .. (i + 1) * g`; at
    /// least one word, as in QEMU.
    words: Box<[AtomicU64]>,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("granularity", &self.granularity)
            .field("size", &self.size)
            .field("count", &self.count())
            .finish()
    }
}

impl DirtyBitmap {
    /// A clear bitmap covering `size` bytes; `granularity` is a power of two.
    pub fn new(size: u64, granularity: u64) -> DirtyBitmap {
        assert!(granularity.is_power_of_two());
        let words = size.div_ceil(granularity).div_ceil(64).max(1);
        DirtyBitmap {
            granularity,
            size,
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Bytes covered.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn nbits(&self) -> u64 {
        self.size.div_ceil(self.granularity)
    }

    /// The granules `offset..offset+len` touches, cut at the size.
    fn bit_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = offset.saturating_add(len).min(self.size);
        (offset / self.granularity, end.div_ceil(self.granularity))
    }

    /// Marks `offset..offset+len` dirty (a write happened there); bytes past the
    /// bitmap's size are ignored.
    #[inline]
    pub fn set(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let (b, e) = self.bit_range(offset, len);
        for_bits(&self.words, b, e, |w, m| {
            // Granules already dirty (most, once a bitmap has seen a while of
            // writes) cost a plain load: no locked instruction, no cache line taken
            // from the other iothreads.
            if w.load(Ordering::SeqCst) & m != m {
                w.fetch_or(m, Ordering::SeqCst);
            }
        });
    }

    /// Marks `offset..offset+len` clean.
    pub fn reset(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let (b, e) = self.bit_range(offset, len);
        for_bits(&self.words, b, e, |w, m| {
            w.fetch_and(!m, Ordering::SeqCst);
        });
    }

    /// Clears every bit.
    pub fn clear(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::SeqCst);
        }
    }

    /// Whether the granule holding `offset` is dirty.
    pub fn get(&self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        let b = offset / self.granularity;
        self.words[(b / 64) as usize].load(Ordering::Acquire) & (1 << (b % 64)) != 0
    }

    /// Number of dirty granules times the granularity (QEMU's count: a dirty last
    /// granule counts whole, even where it ends past the size).
    pub fn count(&self) -> u64 {
        let bits: u64 = self
            .words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum();
        bits * self.granularity
    }

    /// Dirty bytes, the last granule cut at the size (what a job has to copy).
    pub fn dirty_bytes(&self) -> u64 {
        let size = self.size;
        let mut n = self.count();
        if self.get(size.saturating_sub(1)) && !size.is_multiple_of(self.granularity) {
            n -= self.granularity - size % self.granularity;
        }
        n
    }

    /// The first dirty range at or after `from` (whole granules, contiguous, cut at
    /// the size and at `max` bytes), without clearing it.
    pub fn next_dirty(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let nbits = self.nbits();
        let max_bits = (max / self.granularity).max(1);
        let start = self.first_set(from / self.granularity, nbits)?;
        let mut end = start + 1;
        while end < nbits && end - start < max_bits {
            let w = self.words[(end / 64) as usize].load(Ordering::Acquire);
            if w & (1 << (end % 64)) == 0 {
                break;
            }
            end += 1;
        }
        let off = start * self.granularity;
        Some((off, (end * self.granularity).min(self.size) - off))
    }

    fn first_set(&self, mut b: u64, nbits: u64) -> Option<u64> {
        while b < nbits {
            let w = self.words[(b / 64) as usize].load(Ordering::Acquire) >> (b % 64);
            if w == 0 {
                b = (b / 64 + 1) * 64;
                continue;
            }
            let found = b + u64::from(w.trailing_zeros());
            return (found < nbits).then_some(found);
        }
        None
    }

    /// Takes the first dirty range at or after `from` of at most `max` bytes (whole
    /// granules, contiguous): its bits are cleared and it is returned.
    pub fn take_next(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let max_bits = (max / self.granularity).max(1);
        let nbits = self.nbits();
        let mut from_bit = from / self.granularity;
        loop {
            let start = self.first_set(from_bit, nbits)?;
            let mut end = start;
            while end < nbits && end - start < max_bits {
                let word = &self.words[(end / 64) as usize];
                let bit = 1u64 << (end % 64);
                if word.fetch_and(!bit, Ordering::AcqRel) & bit == 0 {
                    break;
                }
                end += 1;
            }
            if end == start {
                // Cleared by someone else meanwhile: look again after it.
                from_bit = start + 1;
                continue;
            }
            let off = start * self.granularity;
            return Some((off, (end * self.granularity).min(self.size) - off));
        }
    }

    /// Whether `other` can be merged into this bitmap: both cover the same size
    /// (granularities may differ, as in QEMU).
    pub fn can_merge(&self, other: &DirtyBitmap) -> bool {
        self.size() == other.size()
    }

    /// Sets every range dirty in `other` (same size; see [`DirtyBitmap::can_merge`]).
    pub fn merge_from(&self, other: &DirtyBitmap) {
        if self.granularity == other.granularity {
            for (d, s) in self.words.iter().zip(other.words.iter()) {
                let v = s.load(Ordering::Acquire);
                if v != 0 {
                    d.fetch_or(v, Ordering::SeqCst);
                }
            }
            return;
        }
        let mut at = 0;
        while let Some((off, len)) = other.next_dirty(at, u64::MAX) {
            self.set(off, len);
            at = off + len;
        }
    }

    /// A copy covering `size` bytes: bits past a smaller size are dropped, the bytes
    /// a larger one adds are clean (QEMU's `hbitmap_truncate`).
    pub fn resized(&self, size: u64) -> DirtyBitmap {
        let new = DirtyBitmap::new(size, self.granularity);
        let nbits = new.nbits();
        for (i, (d, s)) in new.words.iter().zip(self.words.iter()).enumerate() {
            let first = i as u64 * 64;
            let keep = if nbits >= first + 64 {
                u64::MAX
            } else if nbits > first {
                mask(0, nbits - first)
            } else {
                0
            };
            d.fetch_or(s.load(Ordering::SeqCst) & keep, Ordering::SeqCst);
        }
        new
    }

    /// The bits serialised as QEMU keeps them in memory on a little-endian host:
    /// 64-bit words, least significant bit first, at least one word. This is what
    /// `x-debug-block-dirty-bitmap-sha256` hashes, and, cut to whole bytes, the bit
    /// order of qcow2's bitmap clusters.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.words
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect()
    }

    /// Sets the bits that are set in `bytes` (the layout of
    /// [`DirtyBitmap::to_le_bytes`], starting with granule `first_bit`, a multiple of
    /// 8); bits past the size are ignored (loading a stored bitmap).
    pub fn set_from_le_bytes(&self, first_bit: u64, bytes: &[u8]) {
        assert!(first_bit.is_multiple_of(8));
        let nbits = self.nbits();
        for (i, &byte) in bytes.iter().enumerate() {
            let b = first_bit + i as u64 * 8;
            if b >= nbits {
                break;
            }
            let mut v = u64::from(byte);
            if nbits - b < 8 {
                v &= (1 << (nbits - b)) - 1;
            }
            if v != 0 {
                // A byte never straddles two words: `b` is a multiple of 8.
                self.words[(b / 64) as usize].fetch_or(v << (b % 64), Ordering::SeqCst);
            }
        }
    }

    /// SHA-256 of [`DirtyBitmap::to_le_bytes`], in lower-case hex (QEMU's
    /// `x-debug-block-dirty-bitmap-sha256`).
    pub fn sha256_hex(&self) -> String {
        use sha2::{Digest, Sha256};
        Sha256::digest(self.to_le_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_take_count() {
        let b = DirtyBitmap::new(1 << 20, 4096);
        assert_eq!(b.count(), 0);
        b.set(4095, 2);
        assert_eq!(b.count(), 8192);
        b.set(64 * 4096 - 10, 20);
        assert_eq!(b.take_next(0, 1 << 20), Some((0, 8192)));
        assert_eq!(b.take_next(0, 4096), Some((63 * 4096, 4096)));
        assert_eq!(b.take_next(0, 1 << 20), Some((64 * 4096, 4096)));
        assert_eq!(b.take_next(0, 1 << 20), None);
        b.set(0, 1 << 20);
        assert_eq!(b.count(), 1 << 20);
        let mut n = 0;
        while let Some((_, l)) = b.take_next(0, 65536) {
            n += l;
        }
        assert_eq!(n, 1 << 20);
    }

    #[test]
    fn odd_size_and_bounds() {
        let b = DirtyBitmap::new(10_000, 4096);
        b.set(9_999, 100);
        // QEMU counts the last granule whole.
        assert_eq!(b.count(), 4096);
        assert_eq!(b.dirty_bytes(), 10_000 - 8192);
        assert_eq!(b.take_next(0, 1 << 20), Some((8192, 10_000 - 8192)));
        b.set(20_000, 5);
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn next_dirty_reset_get() {
        let b = DirtyBitmap::new(1 << 20, 512);
        b.set(1024, 4096);
        b.set(65536, 512);
        assert!(b.get(1024) && b.get(5119) && !b.get(5120));
        assert_eq!(b.next_dirty(0, u64::MAX), Some((1024, 4096)));
        assert_eq!(b.next_dirty(0, 1024), Some((1024, 1024)));
        assert_eq!(b.next_dirty(5120, u64::MAX), Some((65536, 512)));
        assert_eq!(b.count(), 4608);
        b.reset(2048, 1024);
        assert_eq!(b.count(), 3584);
        b.clear();
        assert_eq!(b.next_dirty(0, u64::MAX), None);
    }

    #[test]
    fn merge_across_granularities() {
        let a = DirtyBitmap::new(1 << 20, 65536);
        let b = DirtyBitmap::new(1 << 20, 512);
        b.set(70_000, 1);
        b.set(0, 512);
        a.merge_from(&b);
        assert_eq!(a.count(), 2 * 65536);
        let c = DirtyBitmap::new(1 << 20, 65536);
        c.merge_from(&a);
        assert_eq!(c.to_le_bytes(), a.to_le_bytes());
        assert!(!a.can_merge(&DirtyBitmap::new(1 << 19, 65536)));
    }

    #[test]
    fn resized_copies_keep_and_drop_bits() {
        let b = DirtyBitmap::new(1 << 20, 4096);
        b.set(0, 4096);
        b.set((1 << 20) - 4096, 4096);
        let b = b.resized(2 << 20);
        assert_eq!(b.size(), 2 << 20);
        assert_eq!(b.count(), 8192);
        b.set((2 << 20) - 1, 1);
        assert_eq!(b.count(), 12288);
        let b = b.resized(4096 * 3);
        assert_eq!(b.count(), 4096);
        assert_eq!(b.to_le_bytes(), 1u64.to_le_bytes());
    }

    #[test]
    fn serialisation_layout() {
        // 10 granules: one word, even for a tiny bitmap; bit i is granule i.
        let b = DirtyBitmap::new(10 * 512, 512);
        assert_eq!(b.to_le_bytes(), vec![0; 8]);
        b.set(512, 512);
        b.set(9 * 512, 1);
        assert_eq!(b.to_le_bytes(), (0b10_0000_0010u64).to_le_bytes());
        let c = DirtyBitmap::new(10 * 512, 512);
        c.set_from_le_bytes(0, &b.to_le_bytes());
        assert_eq!(c.to_le_bytes(), b.to_le_bytes());
        // Bits past the size are dropped; a later byte lands in its own word.
        let d = DirtyBitmap::new(100 * 512, 512);
        d.set_from_le_bytes(64, &[0xff, 0x01, 0x80, 0xff, 0xff, 0xff]);
        assert_eq!(d.count(), (8 + 1 + 1 + 8 + 4) * 512);
        assert!(d.get(64 * 512) && d.get(72 * 512) && d.get(87 * 512) && d.get(99 * 512));
        let empty = DirtyBitmap::new(0, 65536);
        assert_eq!(empty.to_le_bytes().len(), 8);
        // SHA-256 of eight zero bytes.
        assert_eq!(
            empty.sha256_hex(),
            "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
        );
    }
}

//! Dirty bitmaps: which ranges of a node were written, at a power-of-two
//! granularity. Writers set bits lock-free (one atomic OR per 64 granules); a job
//! takes dirty ranges out (find and clear) to copy them.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct DirtyBitmap {
    granularity: u64,
    size: u64,
    words: Vec<AtomicU64>,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("granularity", &self.granularity)
            .field("count", &self.count())
            .finish()
    }
}

impl DirtyBitmap {
    /// A clear bitmap covering `size` bytes; `granularity` is a power of two.
    pub fn new(size: u64, granularity: u64) -> DirtyBitmap {
        assert!(granularity.is_power_of_two());
        let bits = size.div_ceil(granularity);
        let words = (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        DirtyBitmap {
            granularity,
            size,
            words,
        }
    }

    fn bit_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = offset.saturating_add(len).min(self.size);
        (offset / self.granularity, end.div_ceil(self.granularity))
    }

    /// Marks `offset..offset+len` dirty (a write happened there).
    pub fn set(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let (mut b, e) = self.bit_range(offset, len);
        while b < e {
            let w = (b / 64) as usize;
            let lo = b % 64;
            let hi = (e - (b - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            self.words[w].fetch_or(mask, Ordering::AcqRel);
            b = b - lo + 64;
        }
    }

    /// Number of dirty bytes (granules × granularity, the last one cut at the size).
    pub fn count(&self) -> u64 {
        let bits: u64 = self
            .words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum();
        (bits * self.granularity).min(self.size)
    }

    /// Takes the first dirty range at or after `from` of at most `max` bytes (whole
    /// granules, contiguous): its bits are cleared and it is returned.
    pub fn take_next(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let max_bits = (max / self.granularity).max(1);
        let nbits = self.size.div_ceil(self.granularity);
        let mut b = from / self.granularity;
        // Find the first set bit.
        let start = loop {
            if b >= nbits {
                return None;
            }
            let w = self.words[(b / 64) as usize].load(Ordering::Acquire) >> (b % 64);
            if w == 0 {
                b = (b / 64 + 1) * 64;
                continue;
            }
            break b + u64::from(w.trailing_zeros());
        };
        if start >= nbits {
            return None;
        }
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
            return self.take_next((start + 1) * self.granularity, max);
        }
        let off = start * self.granularity;
        let len = (end * self.granularity).min(self.size) - off;
        Some((off, len))
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
        assert_eq!(b.take_next(0, 1 << 20), Some((8192, 10_000 - 8192)));
        b.set(20_000, 5);
        assert_eq!(b.count(), 0);
    }
}

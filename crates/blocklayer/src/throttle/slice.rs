//! Each thread's slice of a throttle group's buckets: budget the thread has already
//! charged to the group's shared buckets, which its next requests spend without
//! touching them.
//!
//! Charging the shared buckets is a compare-and-swap on a cache line that every
//! iothread of the group writes; a thread that takes a millisecond's worth of each
//! limited bucket at once (never more than a sixteenth of a bucket) charges them
//! once per slice instead of once per request. A slice is taken only when the
//! buckets have room, as a request would be admitted, so what passes over time is
//! still the group's rate: a slice moves budget between requests of one thread,
//! and holds back at most a slice of it from the others. Slices die with the
//! limits they were taken under (each installation of limits has a generation of
//! its own).
//!
//! A group keeps one slice per thread that has a statistics shard of its own
//! ([`crate::stats::own_shard`]): only that thread reads and writes it, so plain
//! loads and stores do. Threads beyond those charge the shared buckets themselves.

use super::config::BUCKETS;
use std::sync::atomic::{AtomicU64, Ordering};

/// The most a thread takes from a bucket at once, in the bucket's nanoseconds: a
/// millisecond of its rate.
pub(super) const SLICE_MAX_NS: u64 = 1_000_000;

/// A sixteenth of a bucket at most, so that a group's threads cannot hold back
/// much of it between them.
pub(super) const SLICE_PER_BUCKET: u64 = 16;

/// One thread's slice.
#[derive(Default)]
#[repr(align(64))]
pub(super) struct Slice {
    /// The generation of limits it was taken under.
    gen: AtomicU64,
    /// What is left per bucket, in the bucket's nanoseconds.
    left: [AtomicU64; BUCKETS],
}

/// The buckets of `mask` (bit `i`: bucket `i`).
#[inline(always)]
fn each(mut mask: u8, mut f: impl FnMut(usize)) {
    while mask != 0 {
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        f(i % BUCKETS);
    }
}

impl Slice {
    /// Spends a request's cost (`cost(i)` nanoseconds of bucket `i`, for the buckets
    /// of `mask`) from the slice if it was taken under generation `gen` and can pay
    /// all of it; false, spending nothing, otherwise. Only the slice's thread calls it.
    #[inline(always)]
    pub(super) fn spend(&self, gen: u64, mask: u8, cost: impl Fn(usize) -> u64) -> bool {
        if self.gen.load(Ordering::Relaxed) != gen {
            return false;
        }
        let mut left = [0u64; BUCKETS];
        let mut ok = true;
        each(mask, |i| {
            let l = self.left[i].load(Ordering::Relaxed);
            ok &= l >= cost(i);
            left[i] = l.wrapping_sub(cost(i));
        });
        if ok {
            each(mask, |i| self.left[i].store(left[i], Ordering::Relaxed));
        }
        ok
    }

    /// Adds `slice_ns` of each bucket of `mask`, just charged to the shared buckets;
    /// what is left of a slice taken under other limits is dropped first.
    pub(super) fn refill(&self, gen: u64, mask: u8, slice_ns: u64) {
        if self.gen.load(Ordering::Relaxed) != gen {
            for l in &self.left {
                l.store(0, Ordering::Relaxed);
            }
            self.gen.store(gen, Ordering::Relaxed);
        }
        each(mask, |i| {
            let left = self.left[i].load(Ordering::Relaxed);
            self.left[i].store(left.saturating_add(slice_ns), Ordering::Relaxed);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_pays_until_it_runs_out() {
        let s = Slice::default();
        assert!(!s.spend(1, 0b1000, |_| 10));
        s.refill(1, 0b1001, 25);
        assert!(s.spend(1, 0b1001, |_| 10));
        assert!(s.spend(1, 0b1001, |_| 10));
        // 5 left in each: not enough, and nothing is spent.
        assert!(!s.spend(1, 0b1001, |i| if i == 0 { 1 } else { 10 }));
        assert!(s.spend(1, 0b1001, |_| 5));
        // Another generation has nothing.
        s.refill(1, 0b1001, 25);
        assert!(!s.spend(2, 0b1001, |_| 1));
        // New limits: the old slice is dropped, not added to.
        s.refill(2, 0b1001, 3);
        assert!(!s.spend(2, 0b1001, |_| 4));
        assert!(s.spend(2, 0b1001, |_| 3));
    }
}

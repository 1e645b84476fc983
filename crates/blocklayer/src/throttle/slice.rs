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
//! and holds back at most two slices of it from the others. Slices die with the
//! limits they were taken under (each installation of limits has a generation of
//! its own).
//!
//! A slice holds, per direction, operations and bytes rather than the buckets'
//! times, so that a request spends it with two compares and two subtractions: the
//! group turns the slice into each limited bucket's time when it charges it.
//!
//! A group keeps one slice per thread that has a statistics shard of its own
//! ([`crate::stats::own_shard`]): only that thread reads and writes it, so plain
//! loads and stores do. Threads beyond those charge the shared buckets themselves.

use std::sync::atomic::{AtomicU64, Ordering};

/// The most a thread takes from a bucket at once, in the bucket's nanoseconds: a
/// millisecond of its rate.
pub(super) const SLICE_MAX_NS: u64 = 1_000_000;

/// A sixteenth of a bucket at most, so that a group's threads cannot hold back
/// much of it between them.
pub(super) const SLICE_PER_BUCKET: u64 = 16;

/// Fractional bits of a slice's operations (a request above `iops-size` counts as a
/// fraction of operations more than one).
pub(super) const OP_FRAC: u32 = 16;

/// One operation, in a slice's fixed point.
pub(super) const OP: u64 = 1 << OP_FRAC;

/// What a slice of one direction holds, or what a request of it costs: operations
/// in fixed point ([`OP`]) and bytes. A kind the direction does not limit is
/// `u64::MAX`, which the thread's requests never run out of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Units {
    pub ops: u64,
    pub bytes: u64,
}

impl Units {
    /// Whether `self` fits in `other`.
    #[inline(always)]
    pub(super) fn within(self, other: Units) -> bool {
        self.ops <= other.ops && self.bytes <= other.bytes
    }
}

/// One thread's slice.
#[derive(Default)]
#[repr(align(64))]
pub(super) struct Slice {
    /// The generation of limits it was taken under.
    gen: AtomicU64,
    /// What is left, per direction: operations (fixed point) and bytes.
    ops: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
}

impl Slice {
    /// Spends `cost` in direction `d` from the slice if it was taken under
    /// generation `gen` and can pay all of it; false, spending nothing, otherwise.
    /// Only the slice's thread calls it.
    #[inline(always)]
    pub(super) fn spend(&self, gen: u64, d: usize, cost: Units) -> bool {
        let (ops, bytes) = (&self.ops[d % 2], &self.bytes[d % 2]);
        let (o, b) = (ops.load(Ordering::Relaxed), bytes.load(Ordering::Relaxed));
        if self.gen.load(Ordering::Relaxed) != gen || o < cost.ops || b < cost.bytes {
            return false;
        }
        ops.store(o - cost.ops, Ordering::Relaxed);
        bytes.store(b - cost.bytes, Ordering::Relaxed);
        true
    }

    /// Adds `grant`, just charged to the shared buckets, to direction `d`. What is
    /// left of a slice taken under other limits is dropped first; of one taken
    /// under these, at most one grant is kept (a kind that did not run out would
    /// otherwise pile up, and with it what the thread holds back).
    pub(super) fn refill(&self, gen: u64, d: usize, grant: Units) {
        if self.gen.load(Ordering::Relaxed) != gen {
            for l in self.ops.iter().chain(&self.bytes) {
                l.store(0, Ordering::Relaxed);
            }
            self.gen.store(gen, Ordering::Relaxed);
        }
        for (left, add) in [
            (&self.ops[d % 2], grant.ops),
            (&self.bytes[d % 2], grant.bytes),
        ] {
            let kept = left.load(Ordering::Relaxed).min(add);
            left.store(kept.saturating_add(add), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(ops: u64, bytes: u64) -> Units {
        Units { ops, bytes }
    }

    #[test]
    fn a_slice_pays_until_it_runs_out() {
        let s = Slice::default();
        assert!(!s.spend(1, 0, u(0, 0)), "another generation has nothing");
        s.refill(1, 0, u(25, u64::MAX));
        assert!(s.spend(1, 0, u(10, 4096)));
        assert!(s.spend(1, 0, u(10, 4096)));
        // 5 operations left: not enough, and nothing is spent.
        assert!(!s.spend(1, 0, u(10, 1)));
        assert!(s.spend(1, 0, u(5, 1)));
        // The other direction has a slice of its own.
        assert!(!s.spend(1, 1, u(1, 1)));
        // Another generation has nothing.
        s.refill(1, 0, u(25, 25));
        assert!(!s.spend(2, 0, u(1, 1)));
        // New limits: the old slice is dropped, not added to.
        s.refill(2, 0, u(3, 3));
        assert!(!s.spend(2, 0, u(4, 1)));
        assert!(s.spend(2, 0, u(3, 3)));
    }

    /// What a thread holds back stays bounded: of a kind that does not run out, at
    /// most one grant is kept at each refill.
    #[test]
    fn what_is_left_is_kept_up_to_one_grant() {
        let s = Slice::default();
        for _ in 0..100 {
            s.refill(1, 0, u(10, 100));
            // The bytes run out first, the operations pile up no further than two
            // grants.
            while s.spend(1, 0, u(1, 50)) {}
        }
        assert!(!s.spend(1, 0, u(21, 0)));
        assert!(s.spend(1, 0, u(18, 0)));
    }
}

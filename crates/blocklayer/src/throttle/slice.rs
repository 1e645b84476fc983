//! Each thread's slices of its throttle groups' buckets: budget a thread has
//! already charged to a group's shared buckets, which its next requests spend
//! without touching them.
//!
//! Charging the shared buckets is a compare-and-swap on a cache line that every
//! iothread of the group writes; a thread that takes a millisecond's worth of each
//! limited bucket at once (never more than a sixteenth of a bucket) charges them
//! once per slice instead of once per request. A slice is taken only when the
//! buckets have room, as a request would be admitted, so what passes over time is
//! still the group's rate: a slice moves budget between requests of one thread,
//! and holds back at most a slice of it from the others. Slices die with the
//! limits they were taken under (each installation of limits has a generation of
//! its own) and are kept per group and direction.

use super::config::BUCKETS;
use super::Direction;
use std::cell::RefCell;

/// The most a thread takes from a bucket at once, in the bucket's nanoseconds: a
/// millisecond of its rate.
pub(super) const SLICE_MAX_NS: u64 = 1_000_000;

/// A sixteenth of a bucket at most, so that a group's threads cannot hold back
/// much of it between them.
pub(super) const SLICE_PER_BUCKET: u64 = 16;

/// Slices kept per thread before the oldest is dropped (a thread serves few groups).
const KEPT: usize = 32;

struct Slice {
    /// The group's address, only compared: with `gen`, which no other group or
    /// installation of limits shares, it names the group.
    group: usize,
    dir: Direction,
    gen: u64,
    /// What is left per bucket, in the bucket's nanoseconds.
    left: [u64; BUCKETS],
}

thread_local! {
    static SLICES: RefCell<Vec<Slice>> = const { RefCell::new(Vec::new()) };
}

/// The limited buckets of `mask` (bit `i`: bucket `i`).
#[inline(always)]
fn each(mut mask: u8, mut f: impl FnMut(usize)) {
    while mask != 0 {
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        f(i % BUCKETS);
    }
}

/// Spends a request's cost (`cost(i)` nanoseconds of bucket `i`, for the buckets
/// of `mask`) from this thread's slice of `group`'s buckets of `dir` taken under
/// generation `gen`; false, spending nothing, if the slice cannot pay all of it.
#[inline(always)]
pub(super) fn spend(
    group: usize,
    dir: Direction,
    gen: u64,
    mask: u8,
    cost: impl Fn(usize) -> u64,
) -> bool {
    SLICES.with(|s| {
        let mut s = s.borrow_mut();
        let Some(sl) = s.iter_mut().find(|x| x.group == group && x.dir == dir) else {
            return false;
        };
        if sl.gen != gen {
            return false;
        }
        let mut ok = true;
        each(mask, |i| ok &= cost(i) <= sl.left[i]);
        if ok {
            each(mask, |i| sl.left[i] -= cost(i));
        }
        ok
    })
}

/// Adds `slice_ns` of each bucket of `mask`, just charged to the shared buckets, to
/// this thread's slice of `group`'s buckets of `dir` (a new one if the thread has
/// none under generation `gen`).
pub(super) fn refill(group: usize, dir: Direction, gen: u64, mask: u8, slice_ns: u64) {
    SLICES.with(|s| {
        let mut s = s.borrow_mut();
        let i = match s.iter().position(|x| x.group == group && x.dir == dir) {
            Some(i) => i,
            None => {
                if s.len() == KEPT {
                    s.remove(0);
                }
                s.push(Slice {
                    group,
                    dir,
                    gen,
                    left: [0; BUCKETS],
                });
                s.len() - 1
            }
        };
        let sl = &mut s[i];
        if sl.gen != gen {
            *sl = Slice {
                group,
                dir,
                gen,
                left: [0; BUCKETS],
            };
        }
        each(mask, |b| sl.left[b] = sl.left[b].saturating_add(slice_ns));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_pays_until_it_runs_out() {
        let g = 0x1000;
        assert!(!spend(g, Direction::Read, 1, 0b1000, |_| 10));
        refill(g, Direction::Read, 1, 0b1001, 25);
        assert!(spend(g, Direction::Read, 1, 0b1001, |_| 10));
        assert!(spend(g, Direction::Read, 1, 0b1001, |_| 10));
        // 5 left in each: not enough, and nothing is spent.
        assert!(!spend(g, Direction::Read, 1, 0b1001, |i| if i == 0 {
            1
        } else {
            10
        }));
        assert!(spend(g, Direction::Read, 1, 0b1001, |_| 5));
        // Another direction, another generation or another group has nothing.
        refill(g, Direction::Read, 1, 0b1001, 25);
        assert!(!spend(g, Direction::Write, 1, 0b1001, |_| 1));
        assert!(!spend(g, Direction::Read, 2, 0b1001, |_| 1));
        assert!(!spend(g + 8, Direction::Read, 1, 0b1001, |_| 1));
        // New limits: the old slice is dropped, not added to.
        refill(g, Direction::Read, 2, 0b1001, 3);
        assert!(!spend(g, Direction::Read, 2, 0b1001, |_| 4));
        assert!(spend(g, Direction::Read, 2, 0b1001, |_| 3));
    }
}

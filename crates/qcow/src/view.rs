//! Read views: per-thread copies of the metadata that maps guest reads, so that
//! mapped reads on several threads share no lock and write no shared cache line.
//!
//! A view holds copies of L2 tables (and the L1 entries and limits that validate
//! them) taken under the state lock at one mapping generation; it answers a lookup
//! without the lock while the generation is still that one, and else the lookup
//! takes the lock and the view starts again at the new generation. A view copies a
//! table only when it missed it at an unchanged generation, so that a mixed load,
//! whose writes bump the generation all the time, does not copy tables it would
//! drop at once.
//!
//! # Generations
//!
//! The state lock comes in two kinds. [`Qcow2::st`](crate::image), the default,
//! is for anything that may change the state: its guard bumps the generation when
//! it is released (still under the lock). A `CacheGuard`
//! ([`Qcow2::st_read`](crate::image)) gives read access to the state and nothing
//! else; loading a table into a cache and reading it (`Qcow2::read_table`) also
//! publish nothing: they change the caches' counters, LRU stamps and contents, but
//! not what the metadata maps. A cache miss (the table loaded, another one evicted)
//! therefore leaves every view current, and so does a flush with nothing to write
//! back (it only reads the state, and takes the default guard only to clear a flag
//! that is set or to evict from a cache over its capacity).
//!
//! Why a copy stays right: let a view copy table T (for L1 index i) from the cache
//! under the lock while the generation is g. The *content* of T is what the cache
//! holds while T is cached, and else what the file holds. It changes only (1) when
//! a writer changes the cached T, the L1 or the limits, under a default guard, or
//! (2) when a load puts other bytes than that content into the cache. (1) bumps the
//! generation before anyone else can take the lock, so the view is no longer
//! current. (2) does not happen: the cache drops a table only while it is clean
//! (the file holds the same bytes) or under a default guard (a freed cluster);
//! writers write live tables to the file only from the cache; a load whose file
//! read overlapped a write-back is refused (the load's `epoch` check), and one that
//! finds T cached meanwhile is dropped. So while the generation is g, T's content
//! is the copy, and the view answers what the locked path answers. The copy of
//! the limits and of the L1 entry is taken in the same critical section and
//! changes only under (1).
//!
//! # Size
//!
//! A view holds at most [`VIEW_ENTRIES`] L1 entries and [`VIEW_BYTES`] of tables.
//! When it is full and a lookup misses it, it copies the missed table only if the
//! table missed it recently already (one of the last [`MISS_MEMORY`] misses that
//! were not copied) and it copied none in its last [`ADMIT_EVERY`] lookups,
//! evicting the least recently used copies to make room: a working set that fits
//! moves in after second misses, while reads spread over more tables than fit copy
//! at most one table per [`ADMIT_EVERY`] lookups (under the state lock, which those
//! misses take anyway).
//!
//! A view belongs to one thread of the caller's choosing (a slot below
//! [`READ_VIEWS`]); its mutex is only ever contended by the periodic cache clean
//! and statistics queries. The periodic clean drops every view's copies (and
//! bumps the generation): a view fills again through lookups under the lock,
//! which mark the tables it uses in the cache, so that what a view uses is never
//! idle to the clean.

use crate::image::MapLimits;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Views an image keeps: callers pass their thread's slot below this.
pub const READ_VIEWS: usize = 8;

/// L2 table bytes one view copies at most (it holds at least one table).
const VIEW_BYTES: u64 = 1 << 20;
/// L1 entries one view holds at most (unallocated ones copy no table), so that its
/// linear search stays short.
const VIEW_ENTRIES: usize = 32;
/// Misses a full view remembers, to copy a table that misses again.
const MISS_MEMORY: usize = 8;
/// Lookups between two tables a full view copies.
const ADMIT_EVERY: u64 = 64;

/// What the state lock's writers change and lock-free readers look at, on a cache
/// line of its own.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Published {
    /// Bumped when a state guard that may have changed the state is released.
    pub gen: AtomicU64,
    /// The virtual size, as of the last release.
    pub size: AtomicU64,
}

impl Published {
    pub fn new(size: u64) -> Self {
        Published {
            gen: AtomicU64::new(1),
            size: AtomicU64::new(size),
        }
    }

    #[inline]
    pub fn gen(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    /// A writer's guard is being released (the lock is still held).
    pub fn release(&self, size: u64) {
        self.size.store(size, Ordering::Relaxed);
        self.gen.fetch_add(1, Ordering::Release);
    }
}

/// One L1 entry's mapping as a view holds it.
#[derive(Debug)]
struct ViewTable {
    l1_index: u64,
    /// The L2 table's host offset (0: none, the range is unallocated).
    l2_offset: u64,
    /// A copy of the table (empty without one).
    data: Box<[u8]>,
    /// The view's lookup count at its last use.
    used: u64,
}

/// A view's content.
#[derive(Debug, Default)]
pub(crate) struct ViewState {
    /// The generation the copies belong to (0: none yet).
    gen: u64,
    limits: MapLimits,
    tables: Vec<ViewTable>,
    bytes: u64,
    /// Lookups of copied tables so far (stamps their use).
    tick: u64,
    /// L1 indices + 1 that missed while the view was full and were not copied (0:
    /// none), the oldest replaced first.
    missed: [u64; MISS_MEMORY],
    next_missed: usize,
    /// `tick` when the view last replaced a table (since the reset).
    admitted: Option<u64>,
    /// Lookups answered from the copies.
    pub hits: u64,
}

impl ViewState {
    /// Whether the copies belong to generation `gen`.
    #[inline]
    pub fn is_current(&self, gen: u64) -> bool {
        self.gen == gen
    }

    pub fn limits(&self) -> MapLimits {
        self.limits
    }

    /// The (L2 offset, table) of L1 index `l1_index`, if copied (marked used).
    #[inline]
    pub fn table(&mut self, l1_index: u64) -> Option<(u64, &[u8])> {
        self.tick += 1;
        let tick = self.tick;
        self.tables
            .iter_mut()
            .find(|t| t.l1_index == l1_index)
            .map(|t| {
                t.used = tick;
                (t.l2_offset, &t.data[..])
            })
    }

    pub fn has(&self, l1_index: u64) -> bool {
        self.tables.iter().any(|t| t.l1_index == l1_index)
    }

    /// Drops the copies and starts at generation `gen` with `limits`.
    pub fn reset(&mut self, gen: u64, limits: MapLimits) {
        self.gen = gen;
        self.limits = limits;
        self.tables = Vec::new();
        self.bytes = 0;
        self.missed = [0; MISS_MEMORY];
        self.admitted = None;
    }

    /// Whether a table of `len` bytes fits without evicting one.
    fn fits(&self, len: u64) -> bool {
        self.tables.len() < VIEW_ENTRIES
            && (self.tables.is_empty() || self.bytes + len <= VIEW_BYTES)
    }

    /// Keeps a copy of L1 index `l1_index`'s table, which a lookup missed. A full
    /// view copies it only if it missed recently already, evicting its least
    /// recently used copies (see "Size" above); else lookups of it take the lock.
    pub fn add(&mut self, l1_index: u64, l2_offset: u64, table: &[u8]) {
        let len = table.len() as u64;
        if !self.fits(len) {
            let key = l1_index + 1;
            let Some(i) = self.missed.iter().position(|&k| k == key) else {
                self.missed[self.next_missed] = key;
                self.next_missed = (self.next_missed + 1) % MISS_MEMORY;
                return;
            };
            if self.admitted.is_some_and(|a| self.tick < a + ADMIT_EVERY) {
                return;
            }
            self.missed[i] = 0;
            self.admitted = Some(self.tick);
            while !self.fits(len) {
                let Some(lru) = (0..self.tables.len()).min_by_key(|&i| self.tables[i].used) else {
                    break;
                };
                let gone = self.tables.swap_remove(lru);
                self.bytes -= gone.data.len() as u64;
            }
        }
        self.bytes += len;
        self.tables.push(ViewTable {
            l1_index,
            l2_offset,
            data: table.into(),
            used: self.tick,
        });
    }

    /// Bytes of tables copied.
    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// One thread's view, on cache lines of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct ReadView(pub Mutex<ViewState>);

impl ReadView {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, ViewState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_holds_a_bounded_number_of_entries_and_bytes() {
        let mut v = ViewState::default();
        v.reset(7, MapLimits::default());
        assert!(v.is_current(7) && !v.is_current(8));
        // Unallocated L1 entries copy nothing but still count.
        for i in 0..100 {
            v.add(i, 0, &[]);
        }
        assert_eq!(v.tables.len(), VIEW_ENTRIES);
        assert!(v.has(VIEW_ENTRIES as u64 - 1) && !v.has(VIEW_ENTRIES as u64));
        assert_eq!(v.table(3), Some((0, &[][..])));
        // Tables up to the byte bound; the first one always fits.
        v.reset(8, MapLimits::default());
        let big = vec![1u8; (VIEW_BYTES as usize) * 2];
        v.add(0, 1 << 20, &big);
        assert_eq!(v.bytes(), VIEW_BYTES * 2);
        v.add(1, 2 << 20, &[2u8; 512]);
        assert!(!v.has(1));
        v.reset(9, MapLimits::default());
        let table = vec![3u8; 65536];
        for i in 0..100 {
            v.add(i, (i + 1) << 20, &table);
        }
        assert_eq!(v.bytes(), VIEW_BYTES);
        assert_eq!(
            v.table(0).map(|(o, t)| (o, t.len())),
            Some((1 << 20, 65536))
        );
    }

    #[test]
    fn a_full_view_evicts_its_least_recently_used_table_for_one_that_missed_twice() {
        let mut v = ViewState::default();
        v.reset(1, MapLimits::default());
        let table = vec![3u8; 65536];
        let fit = VIEW_BYTES / 65536;
        for i in 0..fit {
            v.add(i, (i + 1) << 20, &table);
        }
        // Use every table but 5, so that 5 is the least recently used.
        for i in (0..fit).filter(|&i| i != 5) {
            assert!(v.table(i).is_some());
        }
        // A first miss is only remembered; a second one takes 5's place.
        v.add(100, 7 << 30, &table);
        assert!(!v.has(100) && v.has(5));
        v.add(100, 7 << 30, &table);
        assert!(v.has(100) && !v.has(5));
        assert_eq!(v.table(100).map(|(o, _)| o), Some(7 << 30));
        assert_eq!(v.bytes(), VIEW_BYTES);
        // The next copy waits for ADMIT_EVERY lookups.
        let lookups = |v: &mut ViewState, n: u64| {
            for _ in 0..n {
                let _ = v.table(1);
            }
        };
        v.add(101, 8 << 30, &table);
        // One lookup (of 100) was made since 100 was copied.
        lookups(&mut v, ADMIT_EVERY - 2);
        v.add(101, 8 << 30, &table);
        assert!(!v.has(101));
        lookups(&mut v, 1);
        v.add(101, 8 << 30, &table);
        assert!(v.has(101) && v.has(1) && v.has(100));
        // Misses spread over more tables than the view remembers copy nothing.
        lookups(&mut v, ADMIT_EVERY);
        for i in 200..200 + 2 * MISS_MEMORY as u64 {
            v.add(i, 0, &table);
        }
        for i in 200..200 + 2 * MISS_MEMORY as u64 {
            v.add(i, 0, &table);
        }
        assert!((200..200 + 2 * MISS_MEMORY as u64).all(|i| !v.has(i)));
        // Entries: unallocated ones fill the entry bound and are replaced alike.
        v.reset(2, MapLimits::default());
        lookups(&mut v, ADMIT_EVERY);
        for i in 0..VIEW_ENTRIES as u64 {
            v.add(i, 0, &[]);
        }
        v.add(1000, 0, &[]);
        v.add(1000, 0, &[]);
        assert!(v.has(1000) && !v.has(0));
        assert_eq!(v.tables.len(), VIEW_ENTRIES);
        // A reset forgets the misses.
        v.reset(3, MapLimits::default());
        assert_eq!(v.missed, [0; MISS_MEMORY]);
    }
}

//! Read views: per-thread copies of the metadata that maps guest reads, so that
//! mapped reads on several threads share no lock and write no shared cache line.
//!
//! Every change of the image state goes through [`Qcow2::st`](crate::image),
//! whose guard bumps the image's mapping generation when it is released. A view
//! holds copies of L2 tables (and the L1 entries and limits that validate them)
//! taken under the state lock at one generation; it answers a lookup without the
//! lock while the generation is still that one, and else the lookup takes the lock
//! and the view starts again at the new generation. A view copies a table only
//! when it missed it at an unchanged generation, so that a mixed load, whose writes
//! bump the generation all the time, does not copy tables it would drop at once.
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
}

/// A view's content.
#[derive(Debug, Default)]
pub(crate) struct ViewState {
    /// The generation the copies belong to (0: none yet).
    gen: u64,
    limits: MapLimits,
    tables: Vec<ViewTable>,
    bytes: u64,
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

    /// The (L2 offset, table) of L1 index `l1_index`, if copied.
    #[inline]
    pub fn table(&self, l1_index: u64) -> Option<(u64, &[u8])> {
        self.tables
            .iter()
            .find(|t| t.l1_index == l1_index)
            .map(|t| (t.l2_offset, &t.data[..]))
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
    }

    /// Keeps a copy of L1 index `l1_index`'s table, if there is room (else lookups
    /// of it keep taking the lock).
    pub fn add(&mut self, l1_index: u64, l2_offset: u64, table: &[u8]) {
        let len = table.len() as u64;
        if self.tables.len() >= VIEW_ENTRIES
            || (!self.tables.is_empty() && self.bytes + len > VIEW_BYTES)
        {
            return;
        }
        self.bytes += len;
        self.tables.push(ViewTable {
            l1_index,
            l2_offset,
            data: table.into(),
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
}

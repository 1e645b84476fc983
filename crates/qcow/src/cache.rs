//! A bounded LRU cache of metadata tables (L2 tables, refcount blocks),
//! keyed by host offset.
//!
//! Every lookup and insertion stamps the entry with a counter; a periodic
//! clean ([`TableCache::clean_unused`], QEMU's `cache-clean-interval`) drops
//! the clean entries whose stamp is not newer than the counter at the
//! previous clean: those unused for a whole interval. Dirty entries stay
//! until they are written back.

use std::collections::HashMap;

/// One cached table.
#[derive(Debug)]
pub struct CacheEntry {
    /// The table's bytes (one cluster).
    pub data: Vec<u8>,
    /// Modified since last written.
    pub dirty: bool,
    /// Bumped on every modification, so a writeback can tell whether the
    /// entry changed while it was being written.
    pub gen: u64,
    /// While dirty: the bytes changed since the entry was last written, when every
    /// change recorded its range ([`CacheEntry::touch`]); `None`: the whole table.
    pub dirty_bytes: Option<(usize, usize)>,
    used: u64,
}

impl CacheEntry {
    /// Records a change of bytes `lo..hi`.
    pub fn touch(&mut self, lo: usize, hi: usize) {
        self.dirty_bytes = if self.dirty {
            self.dirty_bytes.map(|(a, b)| (a.min(lo), b.max(hi)))
        } else {
            Some((lo, hi))
        };
        self.dirty = true;
        self.gen += 1;
    }
}

/// The cache.
#[derive(Debug)]
pub struct TableCache {
    cap: usize,
    map: HashMap<u64, CacheEntry>,
    tick: u64,
    /// `tick` at the previous [`TableCache::clean_unused`].
    clean_mark: u64,
    /// Lookups that hit.
    pub hits: u64,
    /// Lookups that missed.
    pub misses: u64,
    /// Entries dropped by [`TableCache::clean_unused`] so far.
    pub cleaned: u64,
}

impl TableCache {
    /// A cache of at most `cap` clean tables (at least 2).
    pub fn new(cap: usize) -> Self {
        TableCache {
            cap: cap.max(2),
            map: HashMap::new(),
            tick: 0,
            clean_mark: 0,
            hits: 0,
            misses: 0,
            cleaned: 0,
        }
    }
    /// Capacity in tables.
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// Number of cached tables.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// Looks a table up, marking it recently used.
    pub fn get(&mut self, off: u64) -> Option<&mut CacheEntry> {
        self.tick += 1;
        let t = self.tick;
        match self.map.get_mut(&off) {
            Some(e) => {
                self.hits += 1;
                e.used = t;
                Some(e)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }
    /// [`get`](Self::get) for a lookup that falls back to one that loads: a hit
    /// counts and marks the table used, a miss is left for the fallback's `get`
    /// to count (so that one table read from disk is one miss).
    pub fn try_get(&mut self, off: u64) -> Option<&mut CacheEntry> {
        let e = self.map.get_mut(&off)?;
        self.tick += 1;
        self.hits += 1;
        e.used = self.tick;
        Some(e)
    }
    /// A cached table, without counting the lookup or touching its LRU position.
    pub fn peek(&self, off: u64) -> Option<&CacheEntry> {
        self.map.get(&off)
    }
    /// Whether a table is cached (without touching its LRU position).
    pub fn contains(&self, off: u64) -> bool {
        self.map.contains_key(&off)
    }
    /// Inserts a table, evicting clean least recently used ones while full.
    /// Dirty tables are never evicted here (the cache may then exceed its
    /// capacity until the owner writes them back).
    pub fn insert(&mut self, off: u64, data: Vec<u8>, dirty: bool) -> &mut CacheEntry {
        self.evict_clean(self.cap.saturating_sub(1));
        self.tick += 1;
        self.map.insert(
            off,
            CacheEntry {
                data,
                dirty,
                gen: 1,
                dirty_bytes: None,
                used: self.tick,
            },
        );
        self.map.get_mut(&off).unwrap()
    }
    /// Evicts clean tables, least recently used first, until at most
    /// `target` remain or none is clean.
    pub fn evict_clean(&mut self, target: usize) {
        while self.map.len() > target {
            let victim = self
                .map
                .iter()
                .filter(|(_, e)| !e.dirty)
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| *k);
            match victim {
                Some(k) => {
                    self.map.remove(&k);
                }
                None => break,
            }
        }
    }
    /// Drops the clean tables not used since the previous call, and returns
    /// how many it dropped. Called periodically, this frees what has been idle
    /// for a whole period while keeping the working set.
    pub fn clean_unused(&mut self) -> usize {
        let mark = self.clean_mark;
        let before = self.map.len();
        self.map.retain(|_, e| e.dirty || e.used > mark);
        self.clean_mark = self.tick;
        let dropped = before - self.map.len();
        self.cleaned += dropped as u64;
        dropped
    }
    /// Whether the cache holds more tables than its capacity.
    pub fn over_capacity(&self) -> bool {
        self.map.len() > self.cap
    }
    /// Offsets of dirty tables, in ascending order.
    pub fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }
    /// Drops a table whatever its state (used when its cluster is freed).
    pub fn remove(&mut self, off: u64) {
        self.map.remove(&off);
    }
    /// Drops every table.
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_drops_what_was_unused_for_a_whole_period() {
        let mut c = TableCache::new(8);
        c.insert(1, vec![1], false);
        c.insert(2, vec![2], false);
        c.insert(3, vec![3], true);
        // Everything was used since the (implicit) previous clean at start.
        assert_eq!(c.clean_unused(), 0);
        assert_eq!(c.len(), 3);
        // 1 is used again in this period, 2 is not; 3 is dirty.
        c.get(1);
        assert_eq!(c.clean_unused(), 1);
        assert!(c.contains(1) && !c.contains(2) && c.contains(3));
        assert_eq!(c.cleaned, 1);
        // A miss does not keep anything alive; an entry inserted now survives one
        // clean.
        c.get(99);
        c.insert(4, vec![4], false);
        assert_eq!(c.clean_unused(), 1);
        assert!(!c.contains(1) && c.contains(4) && c.contains(3));
        // Dirty entries stay however old; once written back (clean) and still
        // unused, they go at the next clean.
        assert_eq!(c.clean_unused(), 1);
        assert_eq!(c.dirty(), vec![3]);
        c.map.get_mut(&3).unwrap().dirty = false;
        assert_eq!(c.clean_unused(), 1);
        assert!(c.is_empty());
        assert_eq!(c.cleaned, 4);
        // An empty cache cleans nothing.
        assert_eq!(c.clean_unused(), 0);
    }

    #[test]
    fn lru_evicts_clean_only() {
        let mut c = TableCache::new(2);
        c.insert(1, vec![1], false);
        c.insert(2, vec![2], true);
        c.get(1);
        c.insert(3, vec![3], false);
        // 1 was the only clean one: evicted even though more recent than 2.
        assert!(!c.contains(1) && c.contains(2) && c.contains(3));
        c.insert(4, vec![4], true);
        assert!(c.contains(2) && c.contains(4) && !c.contains(3));
        c.insert(5, vec![5], true);
        assert!(c.over_capacity());
        assert_eq!(c.dirty(), vec![2, 4, 5]);
    }
}

//! A bounded LRU cache of metadata tables (L2 tables, refcount blocks),
//! keyed by host offset.

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
    used: u64,
}

/// The cache.
#[derive(Debug)]
pub struct TableCache {
    cap: usize,
    map: HashMap<u64, CacheEntry>,
    tick: u64,
    /// Lookups that hit.
    pub hits: u64,
    /// Lookups that missed.
    pub misses: u64,
}

impl TableCache {
    /// A cache of at most `cap` clean tables (at least 2).
    pub fn new(cap: usize) -> Self {
        TableCache {
            cap: cap.max(2),
            map: HashMap::new(),
            tick: 0,
            hits: 0,
            misses: 0,
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

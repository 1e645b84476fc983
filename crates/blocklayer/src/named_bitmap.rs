//! Named dirty bitmaps of a node (QEMU's BdrvDirtyBitmap with a name): the bits
//! ([`DirtyBitmap`]) and the state the monitor and jobs see and change: enabled
//! (recording writes), busy (in use by a job), read-only, persistent, inconsistent.
//!
//! A node keeps its named bitmaps newest first (QEMU lists them in that order); the
//! enabled ones are also in the node's recording set, the list every write marks
//! without taking a lock (see `Node::mark_dirty`). Anonymous bitmaps that jobs add
//! with [`Node::add_bitmap`] are only in the recording set.
//!
//! The checks that QEMU's monitor commands make before they use a bitmap are
//! [`NamedBitmap::check`], with QEMU's texts.
//!
//! A format driver that loads stored bitmaps adds each with
//! [`Node::add_named_bitmap`], fills it with [`DirtyBitmap::set_from_le_bytes`]
//! (qcow2's bit order), and sets its flags (persistent, read-only, or
//! [`Node::set_bitmap_inconsistent`]); to store them it reads
//! [`DirtyBitmap::to_le_bytes`] or walks [`DirtyBitmap::next_dirty`].

use crate::bitmap::DirtyBitmap;
use crate::node::Node;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Longest bitmap name (QEMU's BDRV_BITMAP_MAX_NAME_SIZE).
pub const MAX_NAME_LEN: usize = 1023;

/// Granularity when none is asked for and the node has no cluster size.
pub const DEFAULT_GRANULARITY: u64 = 65536;

/// Refusals of bitmap operations, with QEMU's texts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    #[error("Bitmap already exists: {0}")]
    Exists(String),
    #[error("Bitmap name too long: {0}")]
    NameTooLong(String),
    #[error("Bitmap name cannot be empty")]
    EmptyName,
    #[error("Granularity must be power of 2 and at least 512")]
    Granularity,
    #[error("Bitmap '{0}' is currently in use by another operation and cannot be used")]
    Busy(String),
    #[error("Bitmap '{0}' is readonly and cannot be modified")]
    ReadOnly(String),
    #[error("Bitmap '{0}' is inconsistent and cannot be used")]
    Inconsistent(String),
    #[error(
        "Bitmaps are of different sizes (destination size is {dst}, source size is {src}) \
         and can't be merged"
    )]
    Sizes { dst: u64, src: u64 },
    #[error("Dirty bitmap '{0}' not found")]
    NotFound(String),
}

pub type Result<T> = std::result::Result<T, BitmapError>;

/// Which checks [`NamedBitmap::check`] makes (QEMU's BDRV_BITMAP_* flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    pub busy: bool,
    pub read_only: bool,
    pub inconsistent: bool,
}

impl Check {
    /// Modifying the bits (clear, merge target): busy, read-only, inconsistent.
    pub const DEFAULT: Check = Check {
        busy: true,
        read_only: true,
        inconsistent: true,
    };
    /// Using without modifying the bits (enable, disable, merge source): busy,
    /// inconsistent.
    pub const ALLOW_RO: Check = Check {
        busy: true,
        read_only: false,
        inconsistent: true,
    };
    /// Removing: busy, read-only (an inconsistent bitmap may be removed).
    pub const REMOVE: Check = Check {
        busy: true,
        read_only: true,
        inconsistent: false,
    };
}

pub struct NamedBitmap {
    name: String,
    /// Replaced by a resized copy when the node changes size.
    bits: ArcSwap<DirtyBitmap>,
    /// Recording writes (in the node's recording set); changed through the node.
    enabled: AtomicBool,
    busy: AtomicBool,
    read_only: AtomicBool,
    persistent: AtomicBool,
    inconsistent: AtomicBool,
    /// A job froze the bitmap and records the writes in a successor of its own
    /// (QEMU's `bdrv_dirty_bitmap_recording` counts the successor's recording).
    successor_recording: AtomicBool,
}

impl std::fmt::Debug for NamedBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedBitmap")
            .field("name", &self.name)
            .field("bits", &self.bits.load())
            .field("enabled", &self.enabled())
            .field("busy", &self.busy())
            .finish()
    }
}

impl NamedBitmap {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bits, for jobs that read or take dirty ranges. A resize of the node
    /// (refused while a job holds the bitmap busy) gives the bitmap new bits.
    pub fn bits(&self) -> Arc<DirtyBitmap> {
        self.bits.load_full()
    }

    /// Replaces the bits by a copy of `size` bytes; returns (old, new).
    pub(crate) fn resize(&self, size: u64) -> (Arc<DirtyBitmap>, Arc<DirtyBitmap>) {
        let old = self.bits.load_full();
        let new = Arc::new(old.resized(size));
        self.bits.store(new.clone());
        (old, new)
    }

    pub fn granularity(&self) -> u64 {
        self.bits.load().granularity()
    }

    pub fn size(&self) -> u64 {
        self.bits.load().size()
    }

    /// Dirty granules times the granularity (QEMU's `count`).
    pub fn count(&self) -> u64 {
        self.bits.load().count()
    }

    /// Whether writes to the node mark the bitmap (QEMU's `recording`).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// Marks the bitmap in use by a job (the monitor refuses to touch it).
    pub fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Release);
    }

    /// Whether a successor a job gave the (frozen) bitmap records writes: the
    /// bitmap then reports `recording` as QEMU's does.
    pub fn set_successor_recording(&self, on: bool) {
        self.successor_recording.store(on, Ordering::Release);
    }

    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// A bitmap loaded from a read-only image: it can be read, not changed.
    pub fn set_read_only(&self, v: bool) {
        self.read_only.store(v, Ordering::Release);
    }

    pub fn persistent(&self) -> bool {
        self.persistent.load(Ordering::Acquire)
    }

    /// Whether the format driver stores the bitmap in the image (qcow2).
    pub fn set_persistent(&self, v: bool) {
        self.persistent.store(v, Ordering::Release);
    }

    pub fn inconsistent(&self) -> bool {
        self.inconsistent.load(Ordering::Acquire)
    }

    /// Marks a stored bitmap found in use (not stored cleanly): unusable except for
    /// removal. [`Node::set_bitmap_inconsistent`] also stops its recording, as QEMU.
    pub fn set_inconsistent(&self) {
        self.inconsistent.store(true, Ordering::Release);
    }

    /// QEMU's `bdrv_dirty_bitmap_check`: refuses a busy, read-only or inconsistent
    /// bitmap, as `what` asks, in that order.
    pub fn check(&self, what: Check) -> Result<()> {
        if what.busy && self.busy() {
            return Err(BitmapError::Busy(self.name.clone()));
        }
        if what.read_only && self.read_only() {
            return Err(BitmapError::ReadOnly(self.name.clone()));
        }
        if what.inconsistent && self.inconsistent() {
            return Err(BitmapError::Inconsistent(self.name.clone()));
        }
        Ok(())
    }

    /// Clears every bit (no checks: see [`NamedBitmap::check`]).
    pub fn clear(&self) {
        self.bits.load().clear();
    }

    /// Merges the bits of `sources` into this bitmap, all or nothing: every source
    /// must pass [`Check::ALLOW_RO`] and cover the same size, and this bitmap
    /// [`Check::DEFAULT`], in QEMU's order (sources first, into a scratch bitmap).
    pub fn merge(&self, sources: &[Arc<NamedBitmap>]) -> Result<()> {
        let scratch = DirtyBitmap::new(self.size(), self.granularity());
        for s in sources {
            self.merge_check_source(s)?;
            scratch.merge_from(&s.bits.load());
        }
        self.check(Check::DEFAULT)?;
        let bits = self.bits.load();
        if !bits.can_merge(&scratch) {
            return Err(BitmapError::Sizes {
                dst: self.size(),
                src: scratch.size(),
            });
        }
        bits.merge_from(&scratch);
        Ok(())
    }

    /// QEMU's `BlockDirtyInfo` of the bitmap (`inconsistent` only when set).
    pub fn info(&self) -> crate::info::BlockDirtyInfo {
        crate::info::BlockDirtyInfo {
            name: Some(self.name.clone()),
            recording: self.enabled() || self.successor_recording.load(Ordering::Acquire),
            persistent: self.persistent(),
            busy: self.busy(),
            granularity: self.granularity(),
            count: self.count(),
            inconsistent: self.inconsistent(),
        }
    }

    /// The checks [`NamedBitmap::merge`] makes of one source: [`Check::ALLOW_RO`],
    /// then the same size as this bitmap.
    pub fn merge_check_source(&self, s: &NamedBitmap) -> Result<()> {
        s.check(Check::ALLOW_RO)?;
        if self.size() != s.size() {
            return Err(BitmapError::Sizes {
                dst: self.size(),
                src: s.size(),
            });
        }
        Ok(())
    }

    /// SHA-256 of the serialised bits, hex (QEMU's `x-debug-block-dirty-bitmap-sha256`).
    pub fn sha256(&self) -> String {
        self.bits.load().sha256_hex()
    }
}

/// The default granularity of a new bitmap on `node` (QEMU's
/// `bdrv_get_default_bitmap_granularity`): the node's cluster size clamped to
/// 4 KiB..64 KiB, where the node (or the node a filter passes to) has one; else 64 KiB.
pub fn default_granularity(node: &Arc<Node>) -> u64 {
    let mut n = node.clone();
    loop {
        let cluster = n.driver().image_info().cluster_size.filter(|&c| c > 0);
        if let Some(c) = cluster {
            return c.clamp(4096, 65536);
        }
        let filtered = n
            .children()
            .into_iter()
            .find(|c| c.role() == crate::edge::Role::Filtered);
        match filtered {
            Some(e) => n = e.node_arc(),
            None => return DEFAULT_GRANULARITY,
        }
    }
}

/// Whether `g` is a granularity QEMU accepts (a power of two, 512 to 2^31).
pub fn valid_granularity(g: u64) -> bool {
    g.is_power_of_two() && (512..=1 << 31).contains(&g)
}

impl Node {
    /// Adds a named bitmap covering the node's current size (QEMU's
    /// `bdrv_create_dirty_bitmap`): refused when the name is taken or too long. An
    /// enabled one records every write that completes from now on.
    pub fn add_named_bitmap(
        &self,
        name: &str,
        granularity: u64,
        enabled: bool,
    ) -> Result<Arc<NamedBitmap>> {
        if !valid_granularity(granularity) {
            return Err(BitmapError::Granularity);
        }
        let mut named = self.named_lock();
        if named.iter().any(|b| b.name == name) {
            return Err(BitmapError::Exists(name.to_string()));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(BitmapError::NameTooLong(name.to_string()));
        }
        if name.is_empty() {
            return Err(BitmapError::EmptyName);
        }
        let b = Arc::new(NamedBitmap {
            name: name.to_string(),
            bits: ArcSwap::from_pointee(DirtyBitmap::new(self.size(), granularity)),
            enabled: AtomicBool::new(enabled),
            busy: AtomicBool::new(false),
            read_only: AtomicBool::new(false),
            persistent: AtomicBool::new(false),
            inconsistent: AtomicBool::new(false),
            successor_recording: AtomicBool::new(false),
        });
        named.insert(0, b.clone());
        self.named_count
            .store(named.len() as u32, Ordering::Release);
        if enabled {
            self.recording_add(b.bits());
        }
        Ok(b)
    }

    /// The named bitmap `name`, if the node has one.
    pub fn named_bitmap(&self, name: &str) -> Option<Arc<NamedBitmap>> {
        self.named_lock().iter().find(|b| b.name == name).cloned()
    }

    /// The named bitmaps, newest first (QEMU's order).
    pub fn named_bitmaps(&self) -> Vec<Arc<NamedBitmap>> {
        self.named_lock().clone()
    }

    /// Removes the named bitmap `name` (no checks: see [`NamedBitmap::check`]); it
    /// records nothing from now on.
    pub fn remove_named_bitmap(&self, name: &str) -> Option<Arc<NamedBitmap>> {
        let mut named = self.named_lock();
        let i = named.iter().position(|b| b.name == name)?;
        let b = named.remove(i);
        self.named_count
            .store(named.len() as u32, Ordering::Release);
        if b.enabled() {
            self.recording_remove(&b.bits());
        }
        b.enabled.store(false, Ordering::Release);
        Some(b)
    }

    /// The `dirty-bitmaps` member of the node's `BlockDeviceInfo`: jobs' bitmaps
    /// (no name: the driver's own, then those jobs keep on the node) and named
    /// ones; absent (None) when the node has none, as QEMU's.
    pub fn dirty_bitmaps_info(&self) -> Option<Vec<crate::info::BlockDirtyInfo>> {
        let named = self.named_lock();
        let jobs = self.job_bitmaps_lock();
        let list: Vec<crate::info::BlockDirtyInfo> = self
            .driver()
            .own_bitmaps_info()
            .into_iter()
            .chain(jobs.iter().filter_map(|b| b.info()))
            .chain(named.iter().map(|b| b.info()))
            .collect();
        (!list.is_empty()).then_some(list)
    }

    /// Starts recording writes in `b` (a bitmap of this node).
    pub fn enable_bitmap(&self, b: &NamedBitmap) {
        let named = self.named_lock();
        if named.iter().any(|x| std::ptr::eq(&**x, b)) && !b.enabled() {
            b.enabled.store(true, Ordering::Release);
            self.recording_add(b.bits());
        }
    }

    /// Marks `b` (a persistent bitmap of this node) inconsistent and stops its
    /// recording (QEMU's `bdrv_dirty_bitmap_set_inconsistent`).
    pub fn set_bitmap_inconsistent(&self, b: &NamedBitmap) {
        b.set_inconsistent();
        self.disable_bitmap(b);
    }

    /// Stops recording writes in `b` (a bitmap of this node).
    pub fn disable_bitmap(&self, b: &NamedBitmap) {
        let _named = self.named_lock();
        if b.enabled() {
            b.enabled.store(false, Ordering::Release);
            self.recording_remove(&b.bits());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aio::iovec::{AlignedBuf, IoVec};
    use crate::aio::uring::block_on;
    use crate::graph::Graph;
    use crate::options::BlockdevOptions;
    use serde_json::json;

    fn null_node(g: &mut Graph, name: &str, size: u64) -> Arc<Node> {
        g.add(
            &BlockdevOptions::from_json(&json!({
                "driver": "null-co", "node-name": name, "size": size
            }))
            .unwrap(),
        )
        .unwrap()
    }

    fn write(n: &Arc<Node>, offset: u64, len: usize) {
        let n = n.clone();
        block_on(async move {
            let buf = Arc::new(AlignedBuf::zeroed(len, 4096));
            let iov = IoVec::from_buf(buf);
            iov.copy_from_slice(0, &vec![1u8; len]);
            n.write(offset, iov, false).await.unwrap();
        });
    }

    #[test]
    fn add_find_list_remove() {
        let mut g = Graph::new();
        let n = null_node(&mut g, "n", 1 << 20);
        assert_eq!(default_granularity(&n), DEFAULT_GRANULARITY);
        let a = n.add_named_bitmap("a", 65536, true).unwrap();
        let b = n.add_named_bitmap("b", 512, false).unwrap();
        assert_eq!(
            n.add_named_bitmap("a", 4096, true).unwrap_err().to_string(),
            "Bitmap already exists: a"
        );
        let long = "x".repeat(1024);
        assert_eq!(
            n.add_named_bitmap(&long, 4096, true).unwrap_err(),
            BitmapError::NameTooLong(long.clone())
        );
        assert!(n.add_named_bitmap(&long[..1023], 4096, true).is_ok());
        assert!(n.remove_named_bitmap(&long[..1023]).is_some());
        assert_eq!(
            n.add_named_bitmap("c", 1000, true).unwrap_err(),
            BitmapError::Granularity
        );
        let names: Vec<_> = n
            .named_bitmaps()
            .iter()
            .map(|b| b.name().to_string())
            .collect();
        assert_eq!(names, ["b", "a"]);
        assert!(Arc::ptr_eq(&n.named_bitmap("a").unwrap(), &a));
        assert_eq!(
            (a.granularity(), a.size(), b.granularity()),
            (65536, 1 << 20, 512)
        );
        assert!(a.enabled() && !b.enabled());
        assert!(n.remove_named_bitmap("a").is_some());
        assert!(n.remove_named_bitmap("a").is_none());
        assert!(n.named_bitmap("a").is_none());
    }

    #[test]
    fn writes_mark_enabled_bitmaps_only() {
        let mut g = Graph::new();
        let n = null_node(&mut g, "n", 1 << 20);
        let on = n.add_named_bitmap("on", 65536, true).unwrap();
        let off = n.add_named_bitmap("off", 65536, false).unwrap();
        write(&n, 4096, 4096);
        assert_eq!((on.count(), off.count()), (65536, 0));
        n.enable_bitmap(&off);
        n.disable_bitmap(&on);
        write(&n, 131072, 512);
        assert_eq!((on.count(), off.count()), (65536, 65536));
        let nn = n.clone();
        block_on(async move {
            nn.write_zeroes(262144, 65536, false, false).await.unwrap();
            // Ignored without discard=unmap: nothing changed, nothing marked.
            nn.discard(524288, 4096).await.unwrap();
        });
        assert_eq!(off.count(), 2 * 65536);
        let u = g
            .add(
                &BlockdevOptions::from_json(&json!({
                    "driver": "null-co", "node-name": "u", "size": 1 << 20,
                    "discard": "unmap"
                }))
                .unwrap(),
            )
            .unwrap();
        let ub = u.add_named_bitmap("ub", 65536, true).unwrap();
        block_on(async move { u.discard(524288, 4096).await.unwrap() });
        assert_eq!(ub.count(), 65536);
        let removed = n.remove_named_bitmap("off").unwrap();
        write(&n, 0, 512);
        assert_eq!(removed.count(), 2 * 65536);
        assert!(!removed.enabled());
    }

    #[test]
    fn checks_and_merge() {
        let mut g = Graph::new();
        let n = null_node(&mut g, "n", 1 << 20);
        let m = null_node(&mut g, "m", 1 << 19);
        let a = n.add_named_bitmap("a", 65536, true).unwrap();
        let b = n.add_named_bitmap("b", 512, true).unwrap();
        let small = m.add_named_bitmap("s", 65536, true).unwrap();
        b.bits().set(1000, 1);
        a.merge(std::slice::from_ref(&b)).unwrap();
        assert_eq!(a.count(), 65536);
        assert_eq!(
            a.merge(&[small]).unwrap_err().to_string(),
            "Bitmaps are of different sizes (destination size is 1048576, source size is \
             524288) and can't be merged"
        );
        b.set_busy(true);
        assert_eq!(
            a.merge(std::slice::from_ref(&b)).unwrap_err().to_string(),
            "Bitmap 'b' is currently in use by another operation and cannot be used"
        );
        assert_eq!(b.check(Check::ALLOW_RO), Err(BitmapError::Busy("b".into())));
        b.set_busy(false);
        b.set_read_only(true);
        assert!(b.check(Check::ALLOW_RO).is_ok());
        assert_eq!(
            b.check(Check::DEFAULT).unwrap_err().to_string(),
            "Bitmap 'b' is readonly and cannot be modified"
        );
        // The target is checked after the sources, and stays unchanged.
        b.set_read_only(false);
        a.clear();
        a.set_persistent(true);
        n.set_bitmap_inconsistent(&a);
        assert!(!a.enabled());
        assert!(a.info().inconsistent);
        assert!(!b.info().inconsistent);
        assert_eq!(
            a.merge(std::slice::from_ref(&b)).unwrap_err().to_string(),
            "Bitmap 'a' is inconsistent and cannot be used"
        );
        assert_eq!(a.count(), 0);
        assert!(a.check(Check::REMOVE).is_ok());
    }

    #[test]
    fn bitmaps_follow_reopen_and_resize() {
        let path = std::env::temp_dir().join(format!("vubd-named-bm-{}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let opts = json!({"driver": "file", "node-name": "f", "filename": path.to_str().unwrap()});
        let mut g = Graph::new();
        let n = g.add(&BlockdevOptions::from_json(&opts).unwrap()).unwrap();
        let a = n.add_named_bitmap("a", 65536, true).unwrap();
        let off = n.add_named_bitmap("off", 4096, false).unwrap();
        g.reopen_multiple(&[BlockdevOptions::from_json(&opts).unwrap()])
            .unwrap();
        let n2 = g.get("f").unwrap();
        assert!(!Arc::ptr_eq(&n, &n2), "reopen made a new node object");
        assert!(Arc::ptr_eq(&n2.named_bitmap("a").unwrap(), &a));
        assert_eq!(n2.named_bitmaps().len(), 2);
        write(&n2, 0, 512);
        assert_eq!((a.count(), off.count()), (65536, 0));
        n2.resize(2 << 20).unwrap();
        assert_eq!((a.size(), off.size()), (2 << 20, 2 << 20));
        write(&n2, (2 << 20) - 512, 512);
        assert_eq!(a.count(), 2 * 65536);
        // A file written past its end grows, and its bitmaps with it.
        let nn = n2.clone();
        block_on(async move {
            let buf = Arc::new(AlignedBuf::zeroed(4096, 4096));
            nn.write_growing(3 << 20, IoVec::from_buf(buf))
                .await
                .unwrap();
        });
        assert_eq!(a.size(), (3 << 20) + 4096);
        assert_eq!(a.count(), 3 * 65536);
        drop(g);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn marks_racing_resizes_are_kept() {
        use std::sync::atomic::AtomicBool;
        let mut g = Graph::new();
        let n = null_node(&mut g, "n", 64 << 20);
        let a = n.add_named_bitmap("a", 65536, true).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let w = {
            let (n, done) = (n.clone(), done.clone());
            std::thread::spawn(move || {
                for i in 0..1024u64 {
                    n.mark_dirty(i * 65536, 1);
                    for _ in 0..2000 {
                        std::hint::spin_loop();
                    }
                }
                done.store(true, Ordering::SeqCst);
            })
        };
        let mut k = 0u64;
        while !done.load(Ordering::SeqCst) {
            k += 1;
            n.resize_bitmaps((64 << 20) + (k % 2) * 65536);
        }
        w.join().unwrap();
        assert!(k > 10, "only {k} resizes raced the marks");
        assert_eq!(a.count(), 1024 * 65536);
    }
}

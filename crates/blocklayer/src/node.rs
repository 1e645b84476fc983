//! A node of the block graph (QEMU: BlockDriverState): a driver instance with a unique
//! node-name, its parents (the edges that use it), merged limits, flags, in-flight
//! accounting, its quiesce counter (drained sections) and its dirty bitmaps.

use crate::bitmap::DirtyBitmap;
use crate::driver::Driver;
use crate::edge::{Edge, ParentRef};
use crate::limits::Limits;
use crate::named_bitmap::NamedBitmap;
use crate::options::DetectZeroes;
use crate::stats::IoStats;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::Waker;

/// Per-node flags that the generic request path applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeFlags {
    pub read_only: bool,
    /// `discard=unmap`: discard requests reach the driver (else they are ignored).
    pub discard_unmap: bool,
    pub detect_zeroes: DetectZeroes,
    /// `cache.no-flush`: flushes are ignored.
    pub no_flush: bool,
    /// `cache.direct`: the file is opened with O_DIRECT (reported only).
    pub cache_direct: bool,
}

/// What a serialised range is (QEMU's serialising requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Serial {
    /// The aligned range around an unaligned write, being read-modify-written.
    Rmw,
    /// A write while a job serialises copies into the node.
    Write,
    /// A job's copy (stream's copy-on-read).
    Copy,
}

impl Serial {
    /// Whether a range of this kind waits for an overlapping one of kind `other`:
    /// read-modify-writes wait for each other, writes for copies, copies for all.
    pub(crate) fn waits_for(self, other: Serial) -> bool {
        match self {
            Serial::Rmw => other != Serial::Write,
            Serial::Write => other == Serial::Copy,
            Serial::Copy => true,
        }
    }
}

/// A serialised range in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tracked {
    pub start: u64,
    pub end: u64,
    pub kind: Serial,
}

/// A job's bitmap that a node lists in `dirty-bitmaps`.
pub(crate) enum JobBitmap {
    /// Marked by every write, shown with this `recording`.
    Recording(Arc<DirtyBitmap>, bool),
    /// What a block copy from the node has still to copy, while it exists.
    Copy(std::sync::Weak<crate::block_copy::BlockCopy>),
}

impl JobBitmap {
    /// QEMU's `BlockDirtyInfo` of an anonymous bitmap (None: gone).
    pub(crate) fn info(&self) -> Option<crate::info::BlockDirtyInfo> {
        let (recording, granularity, count) = match self {
            JobBitmap::Recording(b, r) => (*r, b.granularity(), b.count()),
            JobBitmap::Copy(w) => {
                let bcs = w.upgrade()?;
                (false, bcs.cluster_size(), bcs.dirty_bytes())
            }
        };
        Some(crate::info::BlockDirtyInfo::anonymous(
            recording,
            granularity,
            count,
        ))
    }
}

pub struct Node {
    name: String,
    driver: Box<dyn Driver>,
    limits: Limits,
    flags: NodeFlags,
    /// The edges that use this node (parents' children, backends' roots).
    parents: Mutex<Vec<ParentRef>>,
    /// Its requests and drained sections (see [`Activity`]).
    activity: Activity,
    /// Bumped when a write-like request completes; a flush covers generation `n` once
    /// it has been started after generation `n` was reached.
    pub(crate) write_gen: AtomicU64,
    pub(crate) flushed_gen: AtomicU64,
    /// Jobs copying into this node that need writes serialised against their copies
    /// (stream); while non-zero, writes register in `tracked`.
    pub(crate) serialising: AtomicU32,
    /// Serialised ranges in progress: read-modify-writes, and copies and writes
    /// while a job serialises.
    pub(crate) tracked: Mutex<Vec<Tracked>>,
    /// The recording set: the dirty bitmaps every completed write marks, read
    /// without a lock (`bitmap_count` skips even that when it is empty); changed
    /// under the `named` lock.
    bitmaps: ArcSwap<Vec<Arc<DirtyBitmap>>>,
    bitmap_count: AtomicU32,
    /// Odd while named bitmaps are being replaced by resized copies; bumped twice
    /// per resize (see [`Node::mark_dirty`]).
    bitmap_gen: AtomicU64,
    /// Named bitmaps, newest first (see [`crate::named_bitmap`]).
    named: Mutex<Vec<Arc<NamedBitmap>>>,
    /// How many `named` holds (kept under its lock), read without it.
    pub(crate) named_count: AtomicU32,
    /// Jobs' own (anonymous) bitmaps, newest first, which `dirty-bitmaps` lists
    /// (changed under the `named` lock).
    pub(crate) job_bitmaps: Mutex<Vec<JobBitmap>>,
    /// `block-set-write-threshold`: the first write ending past it raises
    /// `BLOCK_WRITE_THRESHOLD` and clears it (0: none).
    write_threshold: AtomicU64,
    /// Requests that went through this node.
    pub stats: IoStats,
    /// The driver reacts to blkdebug events (see [`Node::debug_event`]).
    debug_events: bool,
    /// A child did, when the node was opened: flushes raise events on it.
    debug_child: bool,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver.driver_name())
            .finish()
    }
}

impl Node {
    /// Builds a node around an opened driver, merging its children's limits.
    pub fn new(name: String, driver: Box<dyn Driver>, mut flags: NodeFlags) -> Node {
        let mut limits = driver.own_limits();
        let mut debug_child = false;
        let debug_events = driver.takes_debug_events();
        for child in driver.children() {
            limits = limits.merge(child.node().limits);
            debug_child |= child.node().debug_events;
        }
        flags.read_only |= driver.is_read_only();
        Node {
            name,
            driver,
            limits,
            flags,
            parents: Mutex::new(Vec::new()),
            activity: Activity::default(),
            write_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
            serialising: AtomicU32::new(0),
            tracked: Mutex::new(Vec::new()),
            bitmaps: ArcSwap::from_pointee(Vec::new()),
            bitmap_count: AtomicU32::new(0),
            bitmap_gen: AtomicU64::new(0),
            named: Mutex::new(Vec::new()),
            named_count: AtomicU32::new(0),
            job_bitmaps: Mutex::new(Vec::new()),
            write_threshold: AtomicU64::new(0),
            stats: IoStats::new(),
            debug_events,
            debug_child,
        }
    }

    /// Whether a child of the node (as opened) takes blkdebug events.
    #[inline]
    pub(crate) fn debug_events_below(&self) -> bool {
        self.debug_child
    }

    /// Raises a blkdebug event on this node (QEMU's `BLKDBG_EVENT`): a format or
    /// filter driver calls it on its child before the I/O the event names.
    #[inline]
    pub fn debug_event(&self, event: &'static str) {
        if self.debug_events {
            self.driver.debug_event(event);
        }
    }

    /// The child that holds the node's data (QEMU's primary child): `file`, or the
    /// filtered child of a filter.
    pub fn primary_child(&self) -> Option<Arc<Node>> {
        self.children()
            .into_iter()
            .find(|c| {
                matches!(
                    c.role(),
                    crate::edge::Role::File | crate::edge::Role::Filtered
                )
            })
            .map(|c| c.node_arc())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn driver(&self) -> &dyn Driver {
        self.driver.as_ref()
    }

    pub fn driver_name(&self) -> &'static str {
        self.driver.driver_name()
    }

    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn flags(&self) -> NodeFlags {
        self.flags
    }

    pub fn is_read_only(&self) -> bool {
        self.flags.read_only
    }

    /// The node's child edges (`file`, `backing`, ...).
    pub fn children(&self) -> Vec<Arc<Edge>> {
        self.driver.children()
    }

    /// The node's `backing` child, if it has one.
    pub fn backing(&self) -> Option<Arc<Node>> {
        self.child("backing")
    }

    /// The node's child of that name (`file`, `backing`, `data-file`, ...).
    pub fn child(&self, name: &str) -> Option<Arc<Node>> {
        self.children()
            .into_iter()
            .find(|c| c.name() == name)
            .map(|c| c.node_arc())
    }

    /// Whether `target` is this node or below it (through any child edge).
    pub fn reaches(self: &Arc<Self>, target: &Arc<Node>) -> bool {
        let mut todo = vec![self.clone()];
        let mut seen: std::collections::BTreeSet<String> = Default::default();
        while let Some(n) = todo.pop() {
            if Arc::ptr_eq(&n, target) {
                return true;
            }
            if seen.insert(n.name().to_string()) {
                todo.extend(n.children().iter().map(|c| c.node_arc()));
            }
        }
        false
    }

    /// This node and the backing chain below it, this node first.
    pub fn backing_chain(self: &Arc<Self>) -> Vec<Arc<Node>> {
        let mut v = vec![self.clone()];
        while let Some(b) = v.last().and_then(|n| n.backing()) {
            v.push(b);
        }
        v
    }

    /// The edges that use this node, oldest first.
    pub fn parents(&self) -> Vec<Arc<Edge>> {
        let mut p = self.parents.lock().unwrap_or_else(|p| p.into_inner());
        p.retain(|w| w.strong_count() > 0);
        p.iter().filter_map(|w| w.upgrade()).collect()
    }

    pub(crate) fn add_parent(&self, e: ParentRef) {
        self.parents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
    }

    pub(crate) fn remove_parent(&self, e: *const Edge) {
        self.parents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|w| w.as_ptr() != e && w.strong_count() > 0);
    }

    /// Resizes the node (QEMU's `bdrv_truncate`); the caller drains it first.
    /// Counts as a write for flush elision (as in QEMU): the new size reaches
    /// stable storage with the next flush.
    pub fn resize(&self, size: u64) -> crate::Result<()> {
        if self.is_read_only() {
            return Err(crate::BlockError::Graph("Image is read-only".into()));
        }
        let r = self.driver.truncate(size);
        self.write_gen.fetch_add(1, Ordering::AcqRel);
        if r.is_ok() {
            self.resize_bitmaps(self.size());
        }
        r
    }

    /// Requests currently in this node's generic path.
    pub fn in_flight(&self) -> u64 {
        self.activity.in_flight()
    }

    // ---- drained sections ------------------------------------------------------

    /// Whether a drained section is open on the node.
    #[inline]
    pub fn is_quiesced(&self) -> bool {
        self.activity.is_quiesced()
    }

    pub(crate) fn quiesce_begin(&self) {
        self.activity.quiesce_begin();
    }

    /// Ends one drained section.
    pub(crate) fn quiesce_end(&self) {
        self.activity.quiesce_end();
    }

    /// Waits until no request is in flight in the node, or `deadline` passes.
    pub(crate) fn wait_idle(&self, deadline: std::time::Instant) -> bool {
        self.activity.wait_idle(deadline)
    }

    // ---- dirty bitmaps and write notifications ---------------------------------

    /// Adds an anonymous bitmap that every later write marks (a job's).
    pub fn add_bitmap(&self, b: Arc<DirtyBitmap>) {
        let _named = self.named_lock();
        self.recording_add(b);
    }

    /// [`Node::add_bitmap`] for a job's own bitmap, which `dirty-bitmaps` lists
    /// without a name (as QEMU lists its jobs' anonymous bitmaps), `recording` as
    /// QEMU shows it (a write-blocking mirror's is not: the mirror keeps it).
    pub fn add_job_bitmap(&self, b: Arc<DirtyBitmap>, recording: bool) {
        let _named = self.named_lock();
        self.job_bitmaps_lock()
            .insert(0, JobBitmap::Recording(b.clone(), recording));
        self.recording_add(b);
    }

    /// Lists the clusters a block copy from this node has still to copy (QEMU's
    /// block-copy bitmap on its source) while the copy exists.
    pub(crate) fn list_copy_bitmap(&self, bcs: &Arc<crate::block_copy::BlockCopy>) {
        let _named = self.named_lock();
        let mut v = self.job_bitmaps_lock();
        v.retain(|b| !matches!(b, JobBitmap::Copy(w) if w.strong_count() == 0));
        v.insert(0, JobBitmap::Copy(Arc::downgrade(bcs)));
    }

    /// Stops marking `b` (and no longer lists it, if it is a job's).
    pub fn remove_bitmap(&self, b: &Arc<DirtyBitmap>) {
        let _named = self.named_lock();
        self.job_bitmaps_lock()
            .retain(|x| !matches!(x, JobBitmap::Recording(y, _) if Arc::ptr_eq(y, b)));
        self.recording_remove(b);
    }

    pub(crate) fn job_bitmaps_lock(&self) -> MutexGuard<'_, Vec<JobBitmap>> {
        self.job_bitmaps.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn named_lock(&self) -> MutexGuard<'_, Vec<Arc<NamedBitmap>>> {
        self.named.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `b` to the recording set; the caller holds the `named` lock.
    pub(crate) fn recording_add(&self, b: Arc<DirtyBitmap>) {
        let mut v = Vec::clone(&self.bitmaps.load());
        v.push(b);
        self.bitmap_count.store(v.len() as u32, Ordering::Release);
        self.bitmaps.store(Arc::new(v));
    }

    /// Removes `b` from the recording set; the caller holds the `named` lock.
    pub(crate) fn recording_remove(&self, b: &Arc<DirtyBitmap>) {
        let mut v = Vec::clone(&self.bitmaps.load());
        v.retain(|x| !Arc::ptr_eq(x, b));
        self.bitmap_count.store(v.len() as u32, Ordering::Release);
        self.bitmaps.store(Arc::new(v));
    }

    /// Marks a written range in every recording bitmap: no lock, one atomic OR per
    /// 64 granules of each. A pass counts only if no resize of the node's bitmaps
    /// began or ended during it (the generation was even and unchanged); otherwise
    /// the range is marked again in the set in place then. A resize publishes the
    /// resized copies and copies the old bits into them between its two generation
    /// bumps, so a bit set in an old copy after it was copied is set again in the
    /// new one.
    #[inline]
    pub(crate) fn mark_dirty(&self, offset: u64, len: u64) {
        if self.bitmap_count.load(Ordering::Acquire) == 0 {
            return;
        }
        loop {
            let gen = self.bitmap_gen.load(Ordering::SeqCst);
            for b in self.bitmaps.load().iter() {
                b.set(offset, len);
            }
            if gen.is_multiple_of(2) && self.bitmap_gen.load(Ordering::SeqCst) == gen {
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// After a write that may have grown the node (a file written past its end):
    /// named bitmaps grow with it, as QEMU's do.
    pub(crate) fn grow_bitmaps(&self) {
        if self.named_count.load(Ordering::Acquire) == 0 {
            return;
        }
        let size = self.size();
        if self.named_lock().iter().any(|b| b.size() < size) {
            self.resize_bitmaps(size);
        }
    }

    /// Gives every named bitmap of the node a copy of its bits resized to `size`
    /// (QEMU's `bdrv_dirty_bitmap_truncate`), the recording set the new copies.
    /// Jobs' anonymous bitmaps keep their size (jobs do not let their nodes resize).
    pub(crate) fn resize_bitmaps(&self, size: u64) {
        let named = self.named_lock();
        if named.iter().all(|b| b.size() == size) {
            return;
        }
        self.bitmap_gen.fetch_add(1, Ordering::SeqCst);
        let mut set = Vec::clone(&self.bitmaps.load());
        for b in named.iter() {
            let (old, new) = b.resize(size);
            for x in set.iter_mut().filter(|x| Arc::ptr_eq(x, &old)) {
                *x = new.clone();
            }
            self.bitmaps.store(Arc::new(set.clone()));
            // Bits set in `old` since the copy was taken.
            new.merge_from(&old.resized(size));
        }
        self.bitmap_gen.fetch_add(1, Ordering::SeqCst);
    }

    pub fn write_threshold(&self) -> u64 {
        self.write_threshold.load(Ordering::Acquire)
    }

    pub fn set_write_threshold(&self, t: u64) {
        self.write_threshold.store(t, Ordering::Release);
    }

    /// Takes over what belongs to the node rather than to its driver instance (dirty
    /// bitmaps, the write threshold) from the node it replaces in a reopen.
    pub(crate) fn inherit_state_from(&self, old: &Node) {
        let old_named = old.named_lock();
        let mut named = self.named_lock();
        *named = old_named.clone();
        self.named_count
            .store(named.len() as u32, Ordering::Release);
        for b in old.bitmaps.load().iter() {
            self.recording_add(b.clone());
        }
        drop(named);
        let size = self.size();
        if size != old.size() {
            self.resize_bitmaps(size);
        }
        self.set_write_threshold(old.write_threshold());
    }

    /// Raises `BLOCK_WRITE_THRESHOLD` (once) when a write ends past the threshold.
    #[inline]
    pub(crate) fn check_write_threshold(&self, offset: u64, len: u64) {
        let t = self.write_threshold.load(Ordering::Acquire);
        let end = offset.saturating_add(len);
        if t == 0 || end <= t {
            return;
        }
        if self
            .write_threshold
            .compare_exchange(t, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            crate::events::emit(crate::events::BlockEvent::WriteThreshold(
                crate::events::WriteThreshold {
                    node_name: self.name.clone(),
                    amount_exceeded: end - t,
                    write_threshold: t,
                },
            ));
        }
    }
}

impl Node {
    pub(crate) fn enter_raw(&self) {
        self.activity.enter();
    }

    pub(crate) fn leave(&self) {
        self.activity.leave();
    }
}

/// What a drain looks at: the requests in a node (or in a user's edge, see
/// [`crate::edge::Edge::activity`]) and the drained sections open on it.
#[derive(Default)]
pub(crate) struct Activity {
    /// Requests in it right now.
    in_flight: AtomicU64,
    /// Drained sections open on it: while non-zero, backends hold new requests.
    quiesce: AtomicU32,
    /// Signalled when `in_flight` drops to zero while it is quiesced.
    idle: (Mutex<()>, Condvar),
    /// Backend requests waiting for the drained sections to end.
    wakers: Mutex<Vec<Waker>>,
}

impl Activity {
    /// Counts a request in, before it is known to be allowed in (a backend's
    /// admission, see [`crate::backend`]: count, then look for a drained section).
    #[inline]
    pub(crate) fn enter(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    /// Counts a request out, waking a drain that waits for the last one.
    #[inline]
    pub(crate) fn leave(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 && self.is_quiesced() {
            let (lock, cv) = &self.idle;
            let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
            cv.notify_all();
        }
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    #[inline]
    pub(crate) fn is_quiesced(&self) -> bool {
        self.quiesce.load(Ordering::SeqCst) > 0
    }

    pub(crate) fn quiesce_begin(&self) {
        self.quiesce.fetch_add(1, Ordering::SeqCst);
    }

    /// Ends one drained section; the last one wakes the held requests.
    pub(crate) fn quiesce_end(&self) {
        if self.quiesce.fetch_sub(1, Ordering::SeqCst) == 1 {
            let wakers =
                std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|p| p.into_inner()));
            wakers.into_iter().for_each(Waker::wake);
        }
    }

    /// Registers `waker` to run when the drained sections end; false if none is
    /// open (checked under the same lock as the wake, so no wake is lost).
    pub(crate) fn wait_unquiesced(&self, waker: &Waker) -> bool {
        let mut w = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if !self.is_quiesced() {
            return false;
        }
        if !w.iter().any(|x| x.will_wake(waker)) {
            w.push(waker.clone());
        }
        true
    }

    /// Waits until no request is in flight, or `deadline` passes.
    pub(crate) fn wait_idle(&self, deadline: std::time::Instant) -> bool {
        let (lock, cv) = &self.idle;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.in_flight() == 0 {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            g = cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Decrements a node's in-flight counter when a request leaves the generic path,
/// waking a drain that waits for the node to go idle.
pub(crate) struct InFlight<'a>(&'a Node);

impl<'a> InFlight<'a> {
    pub(crate) fn enter(node: &'a Node) -> Self {
        node.enter_raw();
        InFlight(node)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

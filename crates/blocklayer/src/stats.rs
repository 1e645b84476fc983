//! I/O accounting (QEMU's `BlockAcctStats`): operations, bytes, total latency, failed and
//! invalid requests per kind, as `query-blockstats` reports them in `BlockDeviceStats`.
//! A request's start and end times are those of the event-loop passes that start and
//! complete it ([`clock::now`]): the loop reads the clock a few times per wake-up, and
//! statistics read none per request. Times are thus measured at the granularity of a
//! pass (a request started and finished in one pass counts 0 ns).
//!
//! Counters are relaxed atomics in per-thread shards (each on cache lines of its own):
//! the iothreads that account requests of one node or export do not write the same
//! cache lines, and a query sums the shards. A thread owns its shard while it lives
//! (up to seven threads at once; the rest share the eighth), so it updates its
//! counters with plain loads and stores, no locked instructions. Each counter is
//! exact; a reader sees a snapshot that may be a request apart between fields, as
//! QEMU's stats are.

use crate::aio::clock;
use serde::Serialize;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The kinds QEMU accounts separately (write-zeroes counts as a write, as in QEMU's
/// virtio-blk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Read = 0,
    Write = 1,
    Flush = 2,
    Unmap = 3,
}

const KINDS: usize = 4;

#[derive(Default)]
struct KindStats {
    operations: AtomicU64,
    bytes: AtomicU64,
    total_time_ns: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
}

/// The counters one thread writes (threads beyond [`SHARDS`] share shards).
#[derive(Default)]
#[repr(align(128))]
struct Shard {
    kinds: [KindStats; KINDS],
    wr_highest_offset: AtomicU64,
    /// Nanoseconds since [`clock::epoch`] at which the last request completed, plus one
    /// (0: never).
    last_done_ns: AtomicU64,
}

/// Shards per statistics record (and per record of other per-thread counters, such
/// as the backend crate's metrics, which use [`thread_shard`] and [`shard_add`]).
pub const SHARDS: usize = 8;
/// The shard of the threads beyond the first `SHARDS - 1`: the others each have one of
/// their own, which only that thread writes.
const SHARED: usize = SHARDS - 1;

thread_local! {
    /// This thread's shard, once known (`usize::MAX` before): const-initialised and
    /// without a destructor, so reading it costs no first-use or teardown check.
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The shards that threads have each to themselves.
pub(crate) const OWN_SHARDS: usize = SHARED;

/// This thread's own shard, if it has one (`None`: it shares the last): per-thread
/// state indexed by it is only ever touched by this thread.
#[inline(always)]
pub(crate) fn own_shard() -> Option<usize> {
    Some(shard_index()).filter(|i| *i < OWN_SHARDS)
}

/// This thread's shard: one of its own while one is free (it is given back when the
/// thread exits), else the shared one.
#[inline]
fn shard_index() -> usize {
    match SHARD.with(Cell::get) {
        usize::MAX => shard_index_slow(),
        i => i,
    }
}

/// [`shard_index`] on a thread's first statistics update: takes its shard.
#[cold]
fn shard_index_slow() -> usize {
    /// Bit i: own shard i is free.
    static FREE: AtomicU64 = AtomicU64::new((1 << SHARED) - 1);
    struct Slot(usize);
    impl Drop for Slot {
        fn drop(&mut self) {
            // What the thread accounts from now on (its other thread-locals' teardown)
            // goes to the shared shard.
            SHARD.with(|s| s.set(SHARED));
            if self.0 < SHARED {
                // Release: the next owner sees this thread's last counts.
                FREE.fetch_or(1 << self.0, Ordering::Release);
            }
        }
    }
    fn take() -> usize {
        let mut free = FREE.load(Ordering::Relaxed);
        loop {
            if free == 0 {
                return SHARED;
            }
            let bit = free.trailing_zeros();
            match FREE.compare_exchange_weak(
                free,
                free & !(1 << bit),
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return bit as usize,
                Err(now) => free = now,
            }
        }
    }
    thread_local! {
        static SLOT: Slot = Slot(take());
    }
    match SLOT.try_with(|s| s.0) {
        Ok(i) => {
            SHARD.with(|s| s.set(i));
            i
        }
        // The thread is exiting.
        Err(_) => SHARED,
    }
}

/// This thread's shard index (below [`SHARDS`]) and whether the thread owns it (no
/// other thread writes a counter of that index), for counters kept in per-thread
/// shards and updated with [`shard_add`].
#[inline]
pub fn thread_shard() -> (usize, bool) {
    let i = shard_index();
    (i, i != SHARED)
}

/// Adds `v` to a counter of a shard: a plain load and store in a shard this thread
/// owns (no other thread writes it, so no update is lost, and no locked instruction
/// is paid per request), an atomic add in the shared one.
#[inline]
pub fn shard_add(c: &AtomicU64, v: u64, own: bool) {
    if own {
        c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
    } else {
        c.fetch_add(v, Ordering::Relaxed);
    }
}

/// The statistics of one node or export.
#[derive(Default)]
pub struct IoStats {
    shards: [Shard; SHARDS],
    /// Whether `idle_time_ns` is kept (exports, as QEMU's BlockBackends).
    track_idle: bool,
}

/// A request being accounted: started at [`IoStats::start`], finished with
/// [`IoStats::done`].
pub struct Acct {
    kind: IoKind,
    bytes: u64,
    /// [`clock::now_ns`] when it started.
    start: u64,
}

impl Acct {
    pub fn kind(&self) -> IoKind {
        self.kind
    }

    /// The bytes the request moves (counted if it succeeds).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// One kind's counters, summed over the shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindTotals {
    pub operations: u64,
    pub bytes: u64,
    pub total_time_ns: u64,
    pub failed: u64,
    pub invalid: u64,
}

impl IoStats {
    /// Statistics of a node.
    pub fn new() -> Self {
        let _ = clock::epoch();
        IoStats::default()
    }

    /// Statistics of an export: also `idle_time_ns`.
    pub fn with_idle_time() -> Self {
        IoStats {
            track_idle: true,
            ..IoStats::new()
        }
    }

    /// Starts accounting a request, at the time of the current loop pass.
    #[inline]
    pub fn start(kind: IoKind, bytes: u64) -> Acct {
        Acct {
            kind,
            bytes,
            start: clock::now_ns(),
        }
    }

    /// This thread's shard, and whether it is the thread's own.
    fn shard(&self) -> (&Shard, bool) {
        let (i, own) = thread_shard();
        (&self.shards[i], own)
    }

    fn note_done(&self, shard: &Shard, now_ns: u64) {
        if self.track_idle {
            shard
                .last_done_ns
                .store(now_ns.saturating_add(1), Ordering::Relaxed);
        }
    }

    /// Accounts a finished request; `end` is the byte after a write's range (for
    /// `wr_highest_offset`). Returns the request's latency in nanoseconds, from the
    /// loop pass that started it to the one that finished it (for the latency
    /// histograms of `crate`'s users, which thus read no clock of their own).
    #[inline]
    pub fn done(&self, acct: Acct, ok: bool, end: u64) -> u64 {
        let (shard, own) = self.shard();
        let k = &shard.kinds[acct.kind as usize];
        // The start and the end are loop passes' times (the loop reads the clock when
        // it wakes, when a pass takes new requests and when it reaps completions).
        let now = clock::now_ns();
        let t = now.saturating_sub(acct.start);
        if ok {
            shard_add(&k.operations, 1, own);
            shard_add(&k.bytes, acct.bytes, own);
            if t > 0 {
                shard_add(&k.total_time_ns, t, own);
            }
            if acct.kind == IoKind::Write && end > shard.wr_highest_offset.load(Ordering::Relaxed) {
                if own {
                    shard.wr_highest_offset.store(end, Ordering::Relaxed);
                } else {
                    shard.wr_highest_offset.fetch_max(end, Ordering::Relaxed);
                }
            }
        } else {
            shard_add(&k.failed, 1, own);
        }
        self.note_done(shard, now);
        t
    }

    /// Accounts a request refused before it started (out of range, malformed).
    pub fn invalid(&self, kind: IoKind) {
        let (shard, own) = self.shard();
        shard_add(&shard.kinds[kind as usize].invalid, 1, own);
        self.note_done(shard, clock::now_ns());
    }

    /// The sum of one counter over the shards.
    fn sum(&self, kind: IoKind, f: fn(&KindStats) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .map(|s| f(&s.kinds[kind as usize]).load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    pub fn operations(&self, kind: IoKind) -> u64 {
        self.sum(kind, |k| &k.operations)
    }

    /// One kind's counters, summed over the shards.
    pub fn totals(&self, kind: IoKind) -> KindTotals {
        KindTotals {
            operations: self.sum(kind, |k| &k.operations),
            bytes: self.sum(kind, |k| &k.bytes),
            total_time_ns: self.sum(kind, |k| &k.total_time_ns),
            failed: self.sum(kind, |k| &k.failed),
            invalid: self.sum(kind, |k| &k.invalid),
        }
    }

    fn max(&self, f: fn(&Shard) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .map(|s| f(s).load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// The byte after the highest range written (`wr_highest_offset`).
    pub fn wr_highest_offset(&self) -> u64 {
        self.max(|s| &s.wr_highest_offset)
    }

    /// Nanoseconds since the last request completed (`idle_time_ns`): exports only,
    /// once one has.
    pub fn idle_time_ns(&self) -> Option<u64> {
        let last = self.max(|s| &s.last_done_ns);
        (last > 0).then(|| clock::ns_since_epoch(Instant::now()).saturating_sub(last - 1))
    }

    /// QEMU's `BlockDeviceStats`, summed over the shards now.
    pub fn snapshot(&self) -> BlockDeviceStats {
        let [rd, wr, flush, unmap] =
            [IoKind::Read, IoKind::Write, IoKind::Flush, IoKind::Unmap].map(|k| self.totals(k));
        BlockDeviceStats {
            rd_bytes: rd.bytes,
            wr_bytes: wr.bytes,
            unmap_bytes: unmap.bytes,
            rd_operations: rd.operations,
            wr_operations: wr.operations,
            flush_operations: flush.operations,
            unmap_operations: unmap.operations,
            rd_total_time_ns: rd.total_time_ns,
            wr_total_time_ns: wr.total_time_ns,
            flush_total_time_ns: flush.total_time_ns,
            unmap_total_time_ns: unmap.total_time_ns,
            wr_highest_offset: self.wr_highest_offset(),
            rd_merged: 0,
            wr_merged: 0,
            unmap_merged: 0,
            idle_time_ns: self.idle_time_ns(),
            failed_rd_operations: rd.failed,
            failed_wr_operations: wr.failed,
            failed_flush_operations: flush.failed,
            failed_unmap_operations: unmap.failed,
            invalid_rd_operations: rd.invalid,
            invalid_wr_operations: wr.invalid,
            invalid_flush_operations: flush.invalid,
            invalid_unmap_operations: unmap.invalid,
            account_invalid: true,
            account_failed: true,
            timed_stats: [],
        }
    }
}

/// QEMU's `BlockDeviceStats` (qapi/block-core.json), what `query-blockstats` reports
/// for a node or an export. vubd does not merge requests (`*_merged` are 0) and keeps
/// no timed statistics intervals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDeviceStats {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub unmap_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub unmap_operations: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
    pub flush_total_time_ns: u64,
    pub unmap_total_time_ns: u64,
    pub wr_highest_offset: u64,
    pub rd_merged: u64,
    pub wr_merged: u64,
    pub unmap_merged: u64,
    /// Since the last request completed (exports only, once one has).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_time_ns: Option<u64>,
    pub failed_rd_operations: u64,
    pub failed_wr_operations: u64,
    pub failed_flush_operations: u64,
    pub failed_unmap_operations: u64,
    pub invalid_rd_operations: u64,
    pub invalid_wr_operations: u64,
    pub invalid_flush_operations: u64,
    pub invalid_unmap_operations: u64,
    pub account_invalid: bool,
    pub account_failed: bool,
    /// QEMU's `BlockDeviceTimedStats` intervals: none.
    pub timed_stats: [u64; 0],
}

/// QEMU's `BlockStats`: the statistics of an export (`device`, `qdev`) or a node
/// (`node-name`), with those of the node's `file` child (`parent`) and `backing`
/// child. The members are in the order vubd has always written them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockStats {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    pub stats: BlockDeviceStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver_specific: Option<BlockStatsSpecific>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<Box<BlockStats>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing: Option<Box<BlockStats>>,
    /// The backend's name: empty for an export (vubd's backends have none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The export's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qdev: Option<String>,
}

/// QEMU's `BlockStatsSpecific`, a union on `driver` (the node's driver).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "driver")]
pub enum BlockStatsSpecific {
    #[serde(rename = "file")]
    File(BlockStatsSpecificFile),
    #[serde(rename = "host_device")]
    HostDevice(BlockStatsSpecificFile),
    /// vubd's own (QEMU has no qcow2 statistics).
    #[serde(rename = "qcow2")]
    Qcow2(BlockStatsSpecificQcow2),
}

/// QEMU's `BlockStatsSpecificFile` (`file` and `host_device`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockStatsSpecificFile {
    pub discard_nb_ok: u64,
    pub discard_nb_failed: u64,
    pub discard_bytes_ok: u64,
    /// vubd's own: fsync/fdatasync calls.
    pub x_sync_operations: u64,
}

/// vubd's `BlockStatsSpecificQcow2`: the qcow2 metadata caches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockStatsSpecificQcow2 {
    pub x_l2_cache_entries: u64,
    pub x_l2_cache_hits: u64,
    pub x_l2_cache_misses: u64,
    pub x_l2_cache_cleaned: u64,
    pub x_refcount_cache_entries: u64,
    pub x_refcount_cache_hits: u64,
    pub x_refcount_cache_misses: u64,
    pub x_refcount_cache_cleaned: u64,
    pub x_cache_cleans: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_kind() {
        let s = IoStats::with_idle_time();
        s.done(IoStats::start(IoKind::Write, 4096), true, 8192);
        s.done(IoStats::start(IoKind::Write, 512), true, 1024);
        s.done(IoStats::start(IoKind::Read, 4096), false, 0);
        s.invalid(IoKind::Unmap);
        s.done(IoStats::start(IoKind::Flush, 0), true, 0);
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(v["wr_operations"], 2);
        assert_eq!(v["wr_bytes"], 4608);
        assert_eq!(v["wr_highest_offset"], 8192);
        assert_eq!(v["rd_operations"], 0);
        assert_eq!(v["failed_rd_operations"], 1);
        assert_eq!(v["invalid_unmap_operations"], 1);
        assert_eq!(v["flush_operations"], 1);
        assert!(v["idle_time_ns"].is_u64());
        assert!(serde_json::to_value(IoStats::new().snapshot())
            .unwrap()
            .get("idle_time_ns")
            .is_none());
    }

    #[test]
    fn threads_account_into_their_shards_and_queries_sum_them() {
        let s = std::sync::Arc::new(IoStats::with_idle_time());
        // All twelve live at once (a thread that exits gives its shard back).
        let alive = std::sync::Arc::new(std::sync::Barrier::new(12));
        let threads: Vec<_> = (0..12u64)
            .map(|t| {
                let s = s.clone();
                let alive = alive.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        s.done(
                            IoStats::start(IoKind::Write, 512),
                            true,
                            (t * 1000 + i) * 512,
                        );
                    }
                    s.done(IoStats::start(IoKind::Read, 4096), true, 0);
                    alive.wait();
                })
            })
            .collect();
        for t in threads {
            t.join().expect("accounting thread");
        }
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(v["wr_operations"], 12_000);
        assert_eq!(v["wr_bytes"], 12_000 * 512);
        assert_eq!(v["rd_operations"], 12);
        assert_eq!(v["wr_highest_offset"], 11_999 * 512);
        assert!(
            s.shards
                .iter()
                .filter(|sh| sh.kinds[1].operations.load(Ordering::Relaxed) > 0)
                .count()
                > 1
        );
    }

    #[test]
    fn shards_of_exited_threads_are_reused_without_losing_counts() {
        let s = std::sync::Arc::new(IoStats::new());
        for _ in 0..3 * SHARDS {
            let s = s.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    s.done(IoStats::start(IoKind::Read, 512), true, 0);
                }
            })
            .join()
            .expect("accounting thread");
        }
        assert_eq!(s.operations(IoKind::Read), 300 * SHARDS as u64);
    }

    /// The wire shape of `BlockStats` and `BlockStatsSpecific`, pinned.
    #[test]
    fn block_stats_as_vubd_writes_them() {
        let file = BlockStatsSpecific::File(BlockStatsSpecificFile {
            discard_nb_ok: 1,
            discard_nb_failed: 2,
            discard_bytes_ok: 3,
            x_sync_operations: 4,
        });
        assert_eq!(
            serde_json::to_string(&file).unwrap(),
            r#"{"driver":"file","discard-nb-ok":1,"discard-nb-failed":2,"discard-bytes-ok":3,"x-sync-operations":4}"#
        );
        let host = BlockStatsSpecific::HostDevice(BlockStatsSpecificFile::default());
        assert_eq!(
            serde_json::to_value(&host).unwrap()["driver"],
            "host_device"
        );
        let qcow2 = BlockStatsSpecific::Qcow2(BlockStatsSpecificQcow2 {
            x_l2_cache_entries: 1,
            x_l2_cache_hits: 2,
            x_l2_cache_misses: 3,
            x_l2_cache_cleaned: 4,
            x_refcount_cache_entries: 5,
            x_refcount_cache_hits: 6,
            x_refcount_cache_misses: 7,
            x_refcount_cache_cleaned: 8,
            x_cache_cleans: 9,
        });
        assert_eq!(
            serde_json::to_string(&qcow2).unwrap(),
            r#"{"driver":"qcow2","x-l2-cache-entries":1,"x-l2-cache-hits":2,"x-l2-cache-misses":3,"x-l2-cache-cleaned":4,"x-refcount-cache-entries":5,"x-refcount-cache-hits":6,"x-refcount-cache-misses":7,"x-refcount-cache-cleaned":8,"x-cache-cleans":9}"#
        );
        let stats = IoStats::new().snapshot();
        let leaf = BlockStats {
            node_name: Some("f".into()),
            stats: stats.clone(),
            driver_specific: Some(file),
            parent: None,
            backing: None,
            device: None,
            qdev: None,
        };
        let export = BlockStats {
            node_name: Some("q".into()),
            stats,
            driver_specific: Some(qcow2),
            parent: Some(Box::new(leaf)),
            backing: None,
            device: Some(String::new()),
            qdev: Some("e0".into()),
        };
        let v = serde_json::to_value(&export).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "node-name",
                "stats",
                "driver-specific",
                "parent",
                "device",
                "qdev"
            ]
        );
        assert_eq!(v["parent"]["driver-specific"]["discard-nb-ok"], 1);
        assert!(v["parent"].get("qdev").is_none());
    }
}

//! The counters the request path and the event loops write for `--metrics`, and the
//! plain samples a scrape reads from them.
//!
//! An NBD export keeps one [`QueueCounters`] for all its connections, written by the
//! export's iothread (and, for requests refused before they run, by the connections'
//! threads). Each vhost-user-blk queue has a [`QueueCounters`], written by the
//! iothread that serves the queue.
//!
//! The counters are kept in per-thread shards, as [`blocklayer::stats`] keeps its own
//! ([`thread_shard`]): a thread owns its shard and updates it with plain loads and
//! stores, and a scrape sums the shards. A request costs three or four such updates
//! and a bucket index computed with `leading_zeros`, and no locked instruction; its
//! latency is the one the export's statistics already measured
//! ([`blocklayer::stats::IoStats::done`], loop-pass clock), so no clock is read for
//! it. Each event loop has a [`LoopCounters`], written once per wake-up by its
//! thread.

use blocklayer::stats::{shard_add, thread_shard, SHARDS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What a virtio-blk or NBD request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read = 0,
    Write = 1,
    Flush = 2,
    /// virtio-blk DISCARD, NBD TRIM.
    Discard = 3,
    WriteZeroes = 4,
    /// virtio-blk only.
    GetId = 5,
    /// NBD only (`NBD_CMD_BLOCK_STATUS`).
    BlockStatus = 6,
    /// An unknown request type, or a request whose header could not be read.
    Other = 7,
}

/// The number of [`RequestKind`]s.
pub const KINDS: usize = 8;

impl RequestKind {
    pub const ALL: [RequestKind; KINDS] = [
        RequestKind::Read,
        RequestKind::Write,
        RequestKind::Flush,
        RequestKind::Discard,
        RequestKind::WriteZeroes,
        RequestKind::GetId,
        RequestKind::BlockStatus,
        RequestKind::Other,
    ];

    /// The value of the `kind` label.
    pub fn name(self) -> &'static str {
        match self {
            RequestKind::Read => "read",
            RequestKind::Write => "write",
            RequestKind::Flush => "flush",
            RequestKind::Discard => "discard",
            RequestKind::WriteZeroes => "write-zeroes",
            RequestKind::GetId => "get-id",
            RequestKind::BlockStatus => "block-status",
            RequestKind::Other => "other",
        }
    }
}

/// The first latency bucket's upper bound is 2^FIRST_BUCKET_LOG2 ns (1.024 us); each
/// next one doubles it.
pub const FIRST_BUCKET_LOG2: u32 = 10;
/// Finite latency buckets: up to 2^33 ns (8.6 s); one more counts the rest (`+Inf`).
pub const BUCKETS: usize = 24;

/// The bucket of a latency of `ns` nanoseconds: the first whose bound `2^(10 + i)` is at
/// least `ns`, or [`BUCKETS`] (`+Inf`) past the last.
#[inline]
pub fn bucket(ns: u64) -> usize {
    // ceil(log2(ns)) for ns >= 2, 0 for 0 and 1.
    let log = u64::BITS - ns.saturating_sub(1).leading_zeros();
    (log.saturating_sub(FIRST_BUCKET_LOG2) as usize).min(BUCKETS)
}

/// The upper bound of finite bucket `i`, in nanoseconds.
pub fn bucket_bound_ns(i: usize) -> u64 {
    1 << (FIRST_BUCKET_LOG2 as usize + i)
}

#[derive(Default)]
struct KindCounters {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// The counters of one queue that one thread writes.
#[derive(Default)]
#[repr(align(128))]
struct Shard {
    kinds: [KindCounters; KINDS],
    /// Requests per latency bucket (not cumulative).
    buckets: [AtomicU64; BUCKETS + 1],
    latency_ns: AtomicU64,
}

/// The counters of one queue (or of an NBD export), in per-thread shards: a thread
/// updates its own with plain loads and stores, so a request pays no locked
/// instruction for them, and every count is exact even while requests taken before
/// a queue moved to another iothread still finish on the old one. A sample sums the
/// shards.
#[derive(Default)]
pub struct QueueCounters {
    shards: Box<[Shard; SHARDS]>,
}

impl QueueCounters {
    /// Counts a finished request: `bytes` moved if `ok`, an error otherwise, and its
    /// latency.
    #[inline]
    pub fn record(&self, kind: RequestKind, bytes: u64, ok: bool, latency_ns: u64) {
        let (i, own) = thread_shard();
        let s = &self.shards[i];
        let k = &s.kinds[kind as usize];
        shard_add(&k.requests, 1, own);
        if !ok {
            shard_add(&k.errors, 1, own);
        } else if bytes > 0 {
            shard_add(&k.bytes, bytes, own);
        }
        shard_add(&s.buckets[bucket(latency_ns)], 1, own);
        if latency_ns > 0 {
            shard_add(&s.latency_ns, latency_ns, own);
        }
    }

    /// What the counters hold now (the sum of the shards); `in_flight` from the
    /// connected device.
    pub fn sample(&self, in_flight: u64) -> QueueSample {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = QueueSample {
            in_flight,
            ..QueueSample::default()
        };
        for shard in self.shards.iter() {
            for (k, c) in s.kinds.iter_mut().zip(&shard.kinds) {
                k.requests = k.requests.wrapping_add(load(&c.requests));
                k.bytes = k.bytes.wrapping_add(load(&c.bytes));
                k.errors = k.errors.wrapping_add(load(&c.errors));
            }
            for (b, c) in s.latency.buckets.iter_mut().zip(&shard.buckets) {
                *b = b.wrapping_add(load(c));
            }
            s.latency.sum_ns = s.latency.sum_ns.wrapping_add(load(&shard.latency_ns));
        }
        s
    }
}

/// The counters of an export's queues; they live as long as the export (a new
/// frontend connection counts on).
pub struct ExportCounters {
    queues: Box<[QueueCounters]>,
}

impl ExportCounters {
    pub fn new(num_queues: usize) -> Self {
        ExportCounters {
            queues: (0..num_queues).map(|_| QueueCounters::default()).collect(),
        }
    }

    /// Queue `q`'s counters (`q` is below the export's queue count: the device pops
    /// from no other).
    #[inline]
    pub fn queue(&self, q: usize) -> &QueueCounters {
        &self.queues[q]
    }

    /// A sample of every queue; `in_flight[q]` (missing: 0) from the device.
    pub fn samples(&self, in_flight: &[u64]) -> Vec<QueueSample> {
        self.queues
            .iter()
            .enumerate()
            .map(|(q, c)| c.sample(in_flight.get(q).copied().unwrap_or(0)))
            .collect()
    }
}

/// One kind's requests, bytes and errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindSample {
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
}

/// A latency histogram: requests per bucket (not cumulative; the last is `+Inf`) and
/// the sum of their latencies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Histogram {
    pub buckets: [u64; BUCKETS + 1],
    pub sum_ns: u64,
}

impl Histogram {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// What one queue's counters held when sampled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueSample {
    pub kinds: [KindSample; KINDS],
    pub latency: Histogram,
    /// Requests popped and not yet completed.
    pub in_flight: u64,
}

impl QueueSample {
    /// Adds `other`'s figures to this one's (an export's total over its queues).
    pub fn add(&mut self, other: &QueueSample) {
        for (a, b) in self.kinds.iter_mut().zip(&other.kinds) {
            a.requests += b.requests;
            a.bytes += b.bytes;
            a.errors += b.errors;
        }
        for (a, b) in self.latency.buckets.iter_mut().zip(&other.latency.buckets) {
            *a += b;
        }
        self.latency.sum_ns += other.latency.sum_ns;
        self.in_flight += other.in_flight;
    }
}

/// An event loop's counters, written by its thread at the end of each wake-up, and
/// every 100 ms of one that lasts.
#[derive(Default)]
#[repr(align(128))]
pub struct LoopCounters {
    wakeups: AtomicU64,
    busy_ns: AtomicU64,
    poll_ns: AtomicU64,
    /// Copies of the loop's io_uring figures ([`blocklayer::aio::uring::fixed_stats`]).
    fixed_ops: AtomicU64,
    pinned_bytes: AtomicU64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl LoopCounters {
    /// Counts a wake-up that ends: `busy` since the wake-up (or since the busy time
    /// it last published, [`LoopCounters::busy_for`]) to going back to sleep, of which
    /// `poll` after the last work (the polling window and the final look).
    pub fn woke_up(&self, busy: Duration, poll: Duration) {
        self.wakeups.fetch_add(1, Ordering::Relaxed);
        self.busy_ns.fetch_add(nanos(busy), Ordering::Relaxed);
        self.poll_ns.fetch_add(nanos(poll), Ordering::Relaxed);
    }

    /// Counts `busy` time of a wake-up that goes on (published every
    /// [`crate::iothread::event_loop`] `PUBLISH_EVERY`, so that a loop that never
    /// sleeps under load does not show frozen figures); its end counts the rest.
    pub fn busy_for(&self, busy: Duration) {
        self.busy_ns.fetch_add(nanos(busy), Ordering::Relaxed);
    }

    /// Publishes the loop's fixed-buffer figures: operations so far, bytes registered.
    pub fn set_fixed(&self, ops: u64, pinned_bytes: u64) {
        self.fixed_ops.store(ops, Ordering::Relaxed);
        self.pinned_bytes.store(pinned_bytes, Ordering::Relaxed);
    }

    pub fn sample(&self) -> LoopSample {
        LoopSample {
            wakeups: self.wakeups.load(Ordering::Relaxed),
            busy_ns: self.busy_ns.load(Ordering::Relaxed),
            poll_ns: self.poll_ns.load(Ordering::Relaxed),
            fixed_ops: self.fixed_ops.load(Ordering::Relaxed),
            pinned_bytes: self.pinned_bytes.load(Ordering::Relaxed),
        }
    }
}

/// What an event loop's counters held when sampled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopSample {
    pub wakeups: u64,
    pub busy_ns: u64,
    pub poll_ns: u64,
    pub fixed_ops: u64,
    pub pinned_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_the_first_bound_at_or_above_the_latency() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 0);
        assert_eq!(bucket(1024), 0);
        assert_eq!(bucket(1025), 1);
        assert_eq!(bucket(2048), 1);
        assert_eq!(bucket(bucket_bound_ns(BUCKETS - 1)), BUCKETS - 1);
        assert_eq!(bucket(bucket_bound_ns(BUCKETS - 1) + 1), BUCKETS);
        assert_eq!(bucket(u64::MAX), BUCKETS);
        for i in 0..BUCKETS {
            let b = bucket_bound_ns(i);
            assert_eq!(bucket(b), i);
            assert!(b / 2 < 1024 || bucket(b / 2 + 1) == i);
        }
    }

    #[test]
    fn counts_from_many_threads_at_once_are_all_kept() {
        // More threads than own shards: the last ones share the shared shard.
        let c = QueueCounters::default();
        let threads = 2 * SHARDS;
        std::thread::scope(|s| {
            for _ in 0..threads {
                let c = &c;
                s.spawn(move || {
                    for _ in 0..10_000 {
                        c.record(RequestKind::Write, 512, true, 2000);
                    }
                });
            }
        });
        let s = c.sample(0);
        let n = 10_000 * threads as u64;
        assert_eq!(s.kinds[RequestKind::Write as usize].requests, n);
        assert_eq!(s.kinds[RequestKind::Write as usize].bytes, 512 * n);
        assert_eq!(s.latency.buckets[bucket(2000)], n);
        assert_eq!(s.latency.sum_ns, 2000 * n);
    }

    #[test]
    fn a_queue_counts_requests_bytes_errors_and_latency() {
        let c = QueueCounters::default();
        c.record(RequestKind::Read, 4096, true, 0);
        c.record(RequestKind::Read, 4096, true, 3000);
        c.record(RequestKind::Write, 512, false, 5_000_000);
        c.record(RequestKind::GetId, 20, true, 0);
        let s = c.sample(2);
        let k = |r: RequestKind| s.kinds[r as usize];
        assert_eq!(
            k(RequestKind::Read),
            KindSample {
                requests: 2,
                bytes: 8192,
                errors: 0
            }
        );
        assert_eq!(
            k(RequestKind::Write),
            KindSample {
                requests: 1,
                bytes: 0,
                errors: 1
            }
        );
        assert_eq!(k(RequestKind::GetId).requests, 1);
        assert_eq!(s.latency.count(), 4);
        assert_eq!(s.latency.buckets[0], 2);
        assert_eq!(s.latency.buckets[bucket(3000)], 1);
        assert_eq!(s.latency.sum_ns, 5_003_000);
        assert_eq!(s.in_flight, 2);
        let mut total = QueueSample::default();
        total.add(&s);
        total.add(&s);
        assert_eq!(total.kinds[0].bytes, 16384);
        assert_eq!(total.latency.count(), 8);
        assert_eq!(total.in_flight, 4);
    }
}

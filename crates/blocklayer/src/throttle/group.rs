//! A throttle group's state on the request path: its leaky buckets as lock-free
//! atomics shared by every member node on every iothread, and each member's queues
//! of requests waiting for budget.
//!
//! A bucket is kept as the time at which it would be empty ("theoretical arrival
//! time", `tat`), in nanoseconds since `aio::clock`'s epoch. The level QEMU keeps
//! (units) is `(tat - now) / ns_per_unit`; leaking is implicit in time passing, so
//! no request has to update a shared "last leak" timestamp. A request may go when
//! every bucket of its direction is at most full (`tat - now <= capacity_ns`, QEMU's
//! `throttle_compute_wait`), and then pushes each bucket's `tat` forward by its
//! cost. The check and the charge are separate atomic steps: requests admitted at
//! the same moment on several iothreads may each overshoot a full bucket by their
//! own cost, as QEMU's check-then-account does for one request.
//!
//! A request that must wait joins its member node's queue for its direction (a
//! short lock, taken only then). The queue's head sleeps on its own iothread's
//! timer (an io_uring timeout) for the computed wait, checks again, and when it goes
//! wakes the next in line. Reads and writes queue apart, so reads keep flowing while
//! writes pile up, and the heads of both queues compete for the shared buckets as
//! QEMU's two timers do.

use super::config::{buckets_of, BucketType, Direction, ThrottleConfig, BUCKETS};
use super::slice::{self, Units, OP, OP_FRAC};
use crate::aio::clock;
use crate::aio::uring::sleep_ns;
use crate::aio::LocalBoxFuture;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

const NS_PER_SEC: f64 = 1e9;

/// Fractional bits of the fixed-point nanoseconds per unit: a byte at 100 TB/s is
/// 1e-5 ns, still 42,950 in this scale; a unit at one per second, 1e9 ns, fits with
/// room to spare.
const FRAC: u32 = 32;

/// `units` of `ns_per_unit` (fixed point), in nanoseconds.
#[inline(always)]
fn units_ns(units: u64, ns_per_unit: u64) -> u64 {
    let ns = (u128::from(units) * u128::from(ns_per_unit)) >> FRAC;
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// `ns_per_unit` in fixed point with [`FRAC`] fractional bits.
fn fixed(ns_per_unit: f64) -> u64 {
    (ns_per_unit * (1u64 << FRAC) as f64).min(u64::MAX as f64) as u64
}

/// What a request costs a bucket: its bytes, or its operations (QEMU's
/// `throttle_account`: a request above `iops-size` counts as `bytes / iops-size`
/// operations).
#[derive(Clone, Copy)]
struct Cost {
    bytes: u64,
    /// `iops-size`, or 0.
    op_size: u64,
}

impl Cost {
    #[inline(always)]
    fn ns(self, is_ops: bool, ns_per_unit: u64) -> u64 {
        if !is_ops {
            units_ns(self.bytes, ns_per_unit)
        } else if self.op_size != 0 && self.bytes > self.op_size {
            units_ns(self.bytes, ns_per_unit) / self.op_size
        } else {
            ns_per_unit >> FRAC
        }
    }

    /// The request in a slice's units: one operation (more above `iops-size`, in
    /// fixed point) and its bytes.
    #[inline(always)]
    fn units(self) -> Units {
        let ops = if self.op_size != 0 && self.bytes > self.op_size {
            let ops = (u128::from(self.bytes) << OP_FRAC) / u128::from(self.op_size);
            u64::try_from(ops).unwrap_or(u64::MAX)
        } else {
            OP
        };
        Units {
            ops,
            bytes: self.bytes,
        }
    }
}

/// What `grant` (a thread's new slice) adds to a bucket of `ns_per_unit`, of
/// operations if `is_ops`, in nanoseconds.
#[inline(always)]
fn grant_ns(grant: Units, is_ops: bool, ns_per_unit: u64) -> u64 {
    if is_ops {
        let ns = (u128::from(grant.ops) * u128::from(ns_per_unit)) >> (FRAC + OP_FRAC);
        u64::try_from(ns).unwrap_or(u64::MAX)
    } else {
        units_ns(grant.bytes, ns_per_unit)
    }
}

/// One leaky bucket: its limits, precomputed as times, and its state.
#[derive(Default)]
struct Bucket {
    /// Nanoseconds one unit adds to the main bucket, fixed point with [`FRAC`]
    /// fractional bits (0: unlimited).
    ns_per_unit: AtomicU64,
    /// The main bucket's size, as the time it takes to drain.
    capacity_ns: AtomicU64,
    /// As `ns_per_unit` for the burst bucket, at the burst rate (0: none).
    burst_ns_per_unit: AtomicU64,
    burst_capacity_ns: AtomicU64,
    tat: AtomicU64,
    burst_tat: AtomicU64,
}

/// How far past `capacity` the bucket of `tat` is at `now`: the wait before it has
/// room (0: it has).
#[inline(always)]
fn over(tat: &AtomicU64, capacity: &AtomicU64, now: u64) -> u64 {
    tat.load(Ordering::Relaxed)
        .saturating_sub(now)
        .saturating_sub(capacity.load(Ordering::Relaxed))
}

/// Pushes the bucket of `tat` forward by `cost` nanoseconds from `now` at least.
#[inline(always)]
fn push(tat: &AtomicU64, now: u64, cost: u64) {
    let _ = tat.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
        Some(t.max(now).saturating_add(cost))
    });
}

impl Bucket {
    /// Sets the limits from QEMU's `LeakyBucket` fields and empties the bucket
    /// (QEMU's `throttle_config` zeroes the levels).
    fn configure(&self, avg: u64, max: u64, burst_length: u64) {
        let (npu, cap, bnpu, bcap) = if avg == 0 {
            (0.0, 0, 0.0, 0)
        } else {
            let npu = NS_PER_SEC / avg as f64;
            // Without a burst rate a tenth of a second of the average may pass at
            // once; with one, `burst_length` seconds at the burst rate.
            let size = if max == 0 {
                avg as f64 / 10.0
            } else {
                max as f64 * burst_length as f64
            };
            let (bnpu, bcap) = if burst_length > 1 {
                let bnpu = NS_PER_SEC / max as f64;
                (bnpu, (max as f64 / 10.0 * bnpu) as u64)
            } else {
                (0.0, 0)
            };
            (npu, (size * npu).min(u64::MAX as f64) as u64, bnpu, bcap)
        };
        self.ns_per_unit.store(fixed(npu), Ordering::Relaxed);
        self.capacity_ns.store(cap, Ordering::Relaxed);
        self.burst_ns_per_unit.store(fixed(bnpu), Ordering::Relaxed);
        self.burst_capacity_ns.store(bcap, Ordering::Relaxed);
        self.tat.store(0, Ordering::Relaxed);
        self.burst_tat.store(0, Ordering::Relaxed);
    }

    /// How long a request must wait for this bucket (0: it may go).
    #[inline(always)]
    fn wait_ns(&self, now: u64) -> u64 {
        if self.ns_per_unit.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        let w = over(&self.tat, &self.capacity_ns, now);
        if w > 0 || self.burst_ns_per_unit.load(Ordering::Relaxed) == 0 {
            return w;
        }
        over(&self.burst_tat, &self.burst_capacity_ns, now)
    }

    /// Charges a request of `cost` to the bucket (of operations if `is_ops`), and
    /// `grant` more to the main bucket (a thread's new slice, see [`super::slice`]).
    #[inline(always)]
    fn charge(&self, now: u64, cost: Cost, is_ops: bool, grant: Units) {
        let npu = self.ns_per_unit.load(Ordering::Relaxed);
        if npu == 0 {
            return;
        }
        push(
            &self.tat,
            now,
            cost.ns(is_ops, npu)
                .saturating_add(grant_ns(grant, is_ops, npu)),
        );
        let bnpu = self.burst_ns_per_unit.load(Ordering::Relaxed);
        if bnpu != 0 {
            push(&self.burst_tat, now, cost.ns(is_ops, bnpu));
        }
    }
}

/// A `throttle-group` object's shared state.
pub struct ThrottleGroup {
    name: String,
    /// Whether any limit is set: the one load an unlimited group costs a request.
    enabled: AtomicBool,
    /// Per direction, which of its four buckets ([`buckets_of`]) set a limit (bit
    /// `i`: the bucket of [`BucketType`] `i`), so that a request looks at those only.
    limited: [AtomicU8; 2],
    /// Per direction, the slice a thread takes at once: operations (fixed point,
    /// 0: no slices, a request charges the buckets itself) and bytes.
    grant_ops: [AtomicU64; 2],
    grant_bytes: [AtomicU64; 2],
    /// The installation of limits, unique among all groups' (slices taken under
    /// others are void).
    gen: AtomicU64,
    /// The slices of the threads with a statistics shard of their own, by shard.
    slices: [slice::Slice; crate::stats::OWN_SHARDS],
    op_size: AtomicU64,
    buckets: [Bucket; BUCKETS],
    /// The limits as set (read by the monitor, changed by `qom-set`).
    config: Mutex<ThrottleConfig>,
    /// The member nodes' queues, woken when the limits change.
    members: Mutex<Vec<Weak<Member>>>,
}

impl ThrottleGroup {
    /// A group with limits `config`, which the caller has validated.
    pub fn new(name: &str, config: ThrottleConfig) -> Arc<Self> {
        let g = ThrottleGroup {
            name: name.to_string(),
            enabled: AtomicBool::new(false),
            limited: Default::default(),
            grant_ops: Default::default(),
            grant_bytes: Default::default(),
            gen: AtomicU64::new(0),
            slices: Default::default(),
            op_size: AtomicU64::new(0),
            buckets: Default::default(),
            config: Mutex::new(config),
            members: Mutex::new(Vec::new()),
        };
        g.install(&config);
        Arc::new(g)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> ThrottleConfig {
        *self.config.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the limits (validated by the caller) with empty buckets, and wakes
    /// the requests waiting in every member so that they go by the new limits at
    /// once.
    pub fn set_config(&self, config: ThrottleConfig) {
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = config;
        self.install(&config);
        let members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        for m in members.iter().filter_map(Weak::upgrade) {
            m.kick_heads();
        }
    }

    fn install(&self, c: &ThrottleConfig) {
        self.enabled.store(false, Ordering::Release);
        for (b, cfg) in self.buckets.iter().zip(c.buckets.iter()) {
            b.configure(cfg.avg, cfg.max, cfg.burst_length);
        }
        for dir in [Direction::Read, Direction::Write] {
            let mask = buckets_of(dir)
                .iter()
                .filter(|(b, _)| c.buckets[*b as usize].avg != 0)
                .fold(0u8, |m, (b, _)| m | 1 << *b as u8);
            self.limited[dir as usize].store(mask, Ordering::Relaxed);
            let grant = self.grant_of(mask, self.slice_of(mask));
            self.grant_ops[dir as usize].store(grant.ops, Ordering::Relaxed);
            self.grant_bytes[dir as usize].store(grant.bytes, Ordering::Relaxed);
        }
        static GENERATIONS: AtomicU64 = AtomicU64::new(1);
        self.gen.store(
            GENERATIONS.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.op_size.store(c.op_size, Ordering::Relaxed);
        self.enabled.store(c.enabled(), Ordering::Release);
    }

    /// A new member (a throttle node) with queues of its own.
    pub fn join(self: &Arc<Self>) -> Arc<Member> {
        let m = Arc::new(Member {
            group: self.clone(),
            queues: [Queue::default(), Queue::default()],
            bypass: AtomicUsize::new(0),
        });
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        members.retain(|w| w.strong_count() > 0);
        members.push(Arc::downgrade(&m));
        m
    }

    /// The number of member nodes.
    pub fn member_count(&self) -> usize {
        let members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        members.iter().filter(|w| w.strong_count() > 0).count()
    }

    /// What a thread's slice of the buckets of `mask` is: a millisecond at most,
    /// and a sixteenth of the smallest bucket; none while a burst bucket is set
    /// (bursts are charged request by request).
    fn slice_of(&self, mask: u8) -> u64 {
        if mask == 0 {
            return 0;
        }
        let mut slice = slice::SLICE_MAX_NS;
        for (i, b) in self.buckets.iter().enumerate() {
            if mask & (1 << i) == 0 {
                continue;
            }
            if b.burst_ns_per_unit.load(Ordering::Relaxed) != 0 {
                return 0;
            }
            slice = slice.min(b.capacity_ns.load(Ordering::Relaxed) / slice::SLICE_PER_BUCKET);
        }
        slice
    }

    /// A slice of `slice_ns` of each bucket of `mask` in units: the operations and
    /// bytes that cost no bucket more than `slice_ns`; no slice (zeros) if that is
    /// not even one unit.
    fn grant_of(&self, mask: u8, slice_ns: u64) -> Units {
        if slice_ns == 0 {
            return Units::default();
        }
        let mut g = Units {
            ops: u64::MAX,
            bytes: u64::MAX,
        };
        for (i, b) in self.buckets.iter().enumerate() {
            let npu = b.ns_per_unit.load(Ordering::Relaxed);
            if mask & (1 << i) == 0 || npu == 0 {
                continue;
            }
            let is_ops = i >= BucketType::OpsTotal as usize;
            let frac = if is_ops { FRAC + OP_FRAC } else { FRAC };
            let units = (u128::from(slice_ns) << frac) / u128::from(npu);
            let units = u64::try_from(units).unwrap_or(u64::MAX);
            if is_ops {
                g.ops = g.ops.min(units);
            } else {
                g.bytes = g.bytes.min(units);
            }
        }
        if g.ops < OP || g.bytes == 0 {
            return Units::default();
        }
        g
    }

    /// The slice a thread takes in direction `d`.
    #[inline(always)]
    fn grant(&self, d: usize) -> Units {
        Units {
            ops: self.grant_ops[d].load(Ordering::Relaxed),
            bytes: self.grant_bytes[d].load(Ordering::Relaxed),
        }
    }

    /// Runs `f` on each limited bucket of `dir`, with whether it counts operations.
    #[inline(always)]
    fn each_limited(&self, dir: Direction, mut f: impl FnMut(&Bucket, bool)) {
        let mut mask = self.limited[dir as usize].load(Ordering::Relaxed);
        while mask != 0 {
            let i = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            f(
                &self.buckets[i % BUCKETS],
                i >= BucketType::OpsTotal as usize,
            );
        }
    }

    /// How long a request of `dir` must wait (QEMU's `throttle_compute_wait_for`).
    #[inline(always)]
    fn wait_ns(&self, dir: Direction, now: u64) -> u64 {
        let mut wait = 0;
        self.each_limited(dir, |b, _| wait = wait.max(b.wait_ns(now)));
        wait
    }

    /// Charges the request if it may go now.
    #[inline(always)]
    fn try_admit(&self, dir: Direction, bytes: u64) -> Result<(), u64> {
        // The time of this thread's loop pass (one clock read per pass, in the
        // clock's epoch, which every iothread shares), read only if the slice does
        // not pay.
        self.admit_with(dir, bytes, clock::now_ns)
    }

    /// [`ThrottleGroup::try_admit`] at the time `now` in nanoseconds.
    #[cfg(test)]
    fn admit_at(&self, dir: Direction, bytes: u64, now: u64) -> Result<(), u64> {
        self.admit_with(dir, bytes, || now)
    }

    /// Admits a request of `bytes` in `dir` if the buckets let it go at the time
    /// `now()`, and charges it: to this thread's slice if it can pay, else to the
    /// shared buckets, with a new slice taken at the same time when the request
    /// fits one.
    #[inline(always)]
    fn admit_with(&self, dir: Direction, bytes: u64, now: impl FnOnce() -> u64) -> Result<(), u64> {
        let cost = Cost {
            bytes,
            op_size: self.op_size.load(Ordering::Relaxed),
        };
        let d = dir as usize;
        // The thread's slot only where slices are taken: no thread-local read else.
        let own = if self.grant_ops[d].load(Ordering::Relaxed) != 0 {
            crate::stats::own_shard().map(|i| (&self.slices[i], self.gen.load(Ordering::Relaxed)))
        } else {
            None
        };
        if let Some((slice, gen)) = own {
            if slice.spend(gen, d, cost.units()) {
                return Ok(());
            }
        }
        self.admit_shared(dir, cost, now(), own)
    }

    /// [`ThrottleGroup::admit_with`] through the shared buckets; with `own` (the
    /// thread's slice and the generation of limits), a new slice is taken at the
    /// same time when the request fits one.
    fn admit_shared(
        &self,
        dir: Direction,
        cost: Cost,
        now: u64,
        own: Option<(&slice::Slice, u64)>,
    ) -> Result<(), u64> {
        let w = self.wait_ns(dir, now);
        if w != 0 {
            return Err(w);
        }
        let d = dir as usize;
        let grant = self.grant(d);
        let own = own.filter(|_| cost.units().within(grant));
        let extra = if own.is_some() {
            grant
        } else {
            Units::default()
        };
        self.each_limited(dir, |b, is_ops| b.charge(now, cost, is_ops, extra));
        if let Some((slice, gen)) = own {
            slice.refill(gen, d, grant);
        }
        Ok(())
    }
}

/// A request waiting in a queue.
#[derive(Default)]
struct Slot {
    kicked: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Slot {
    fn kick(&self) {
        self.kicked.store(true, Ordering::Release);
        if let Some(w) = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.wake();
        }
    }
}

/// Completes when the slot is kicked (and clears the kick).
struct Kicked<'a>(&'a Slot);

impl Future for Kicked<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.kicked.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        *self.0.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        if self.0.kicked.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// The first of a timer and a kick.
struct TimerOrKick<'a, T> {
    timer: Pin<Box<T>>,
    kick: Kicked<'a>,
}

impl<T: Future> Future for TimerOrKick<'_, T> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        Pin::new(&mut self.kick).poll(cx)
    }
}

/// One direction's queue of a member.
#[derive(Default)]
struct Queue {
    /// The queue's length, read without the lock by requests that might pass.
    len: AtomicUsize,
    slots: Mutex<VecDeque<Arc<Slot>>>,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Takes a slot out of its queue when the request leaves it (went, or was
/// dropped), and wakes the next head.
struct InQueue<'a> {
    queue: &'a Queue,
    slot: Arc<Slot>,
}

impl Drop for InQueue<'_> {
    fn drop(&mut self) {
        let mut q = self.queue.lock();
        let was_head = q.front().is_some_and(|s| Arc::ptr_eq(s, &self.slot));
        q.retain(|s| !Arc::ptr_eq(s, &self.slot));
        self.queue.len.store(q.len(), Ordering::Release);
        if was_head {
            if let Some(next) = q.front() {
                next.kick();
            }
        }
    }
}

/// A throttle node's membership of its group: its read and write queues.
pub struct Member {
    group: Arc<ThrottleGroup>,
    queues: [Queue; 2],
    /// Drained sections open on the node: its requests go unthrottled meanwhile.
    bypass: AtomicUsize,
}

impl Member {
    pub fn group(&self) -> &Arc<ThrottleGroup> {
        &self.group
    }

    /// Lets every request through, those waiting included, until
    /// [`Member::bypass_end`].
    pub fn bypass_begin(&self) {
        self.bypass.fetch_add(1, Ordering::AcqRel);
        self.kick_heads();
    }

    pub fn bypass_end(&self) {
        let _ = self
            .bypass
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| b.checked_sub(1));
    }

    #[inline(always)]
    fn bypassed(&self) -> bool {
        !self.group.enabled.load(Ordering::Acquire) || self.bypass.load(Ordering::Acquire) > 0
    }

    fn kick_heads(&self) {
        for q in &self.queues {
            if let Some(head) = q.lock().front() {
                head.kick();
            }
        }
    }

    /// Whether a request of `bytes` in direction `dir` may go at once, charged if
    /// so: the group sets no limit or the node is drained, or no request of the
    /// direction waits in the node's queue and the buckets have room. The request
    /// path of every throttled request, kept to a few loads when the group is far
    /// above the load.
    #[inline(always)]
    pub fn try_pass(&self, dir: Direction, bytes: u64) -> bool {
        self.bypassed()
            || (self.queues[dir as usize].len.load(Ordering::Acquire) == 0
                && self.group.try_admit(dir, bytes).is_ok())
    }

    /// Waits until a request of `bytes` in direction `dir` may go by the group's
    /// limits, and charges it (QEMU's `throttle_group_co_io_limits_intercept`).
    pub async fn intercept(&self, dir: Direction, bytes: u64) {
        if !self.try_pass(dir, bytes) {
            self.wait_turn(dir, bytes).await;
        }
    }

    /// A request that may not go at once: queued behind those of its direction
    /// already waiting, the head sleeping until the buckets have room. Boxed, so
    /// that the futures of the requests that pass at once stay small.
    pub fn wait_turn(&self, dir: Direction, bytes: u64) -> LocalBoxFuture<'_, ()> {
        Box::pin(async move {
            let queue = &self.queues[dir as usize];
            let slot = Arc::new(Slot::default());
            let head = {
                let mut q = queue.lock();
                q.push_back(slot.clone());
                queue.len.store(q.len(), Ordering::Release);
                q.len() == 1
            };
            let _in_queue = InQueue {
                queue,
                slot: slot.clone(),
            };
            if !head {
                Kicked(&slot).await;
            }
            loop {
                if self.bypassed() {
                    return;
                }
                match self.group.try_admit(dir, bytes) {
                    Ok(()) => return,
                    Err(wait) => {
                        TimerOrKick {
                            timer: Box::pin(sleep_ns(wait)),
                            kick: Kicked(&slot),
                        }
                        .await
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::throttle::config::BucketType;

    fn group(set: &[(BucketType, u64, u64, u64)], op_size: u64) -> Arc<ThrottleGroup> {
        let mut c = ThrottleConfig::default();
        for (b, avg, max, len) in set {
            c.buckets[*b as usize].avg = *avg;
            c.buckets[*b as usize].max = *max;
            c.buckets[*b as usize].burst_length = *len;
        }
        c.op_size = op_size;
        c.validate().unwrap();
        ThrottleGroup::new("g", c)
    }

    /// Requests admitted at one instant before the first must wait, and that wait.
    fn burst(g: &ThrottleGroup, dir: Direction, bytes: u64, now: u64) -> (u32, u64) {
        let mut n = 0;
        loop {
            match g.admit_at(dir, bytes, now) {
                Ok(()) => n += 1,
                Err(w) => return (n, w),
            }
        }
    }

    #[test]
    fn a_tenth_of_a_second_passes_at_once_then_the_average_rate() {
        let g = group(&[(BucketType::OpsTotal, 100, 0, 1)], 0);
        // The bucket holds 10 operations; QEMU lets a request go while the level is
        // at most the bucket size, so the 11th still goes.
        assert_eq!(burst(&g, Direction::Read, 4096, 0), (11, 10_000_000));
        // 10 ms later one more operation has leaked out.
        assert_eq!(
            burst(&g, Direction::Write, 4096, 10_000_000),
            (1, 10_000_000)
        );
    }

    #[test]
    fn bursts_at_the_burst_rate_for_the_burst_length() {
        // 10 IOPS sustained, 100 IOPS for 2 s.
        let g = group(&[(BucketType::OpsTotal, 10, 100, 2)], 0);
        // The burst bucket holds a tenth of a second at 100 IOPS.
        assert_eq!(burst(&g, Direction::Read, 512, 0), (11, 10_000_000));
        let mut sent = 11;
        let mut now = 0;
        while now < 4_000_000_000 {
            now += 10_000_000;
            sent += burst(&g, Direction::Read, 512, now).0;
            if now == 1_000_000_000 {
                // A second in, the burst rate still holds.
                assert!((105..=115).contains(&sent), "{sent}");
            }
        }
        // The main bucket (200 operations) filled: after that 10 IOPS.
        assert!((200..=260).contains(&sent), "{sent}");
    }

    /// With slices, a thread charges the shared bucket once per millisecond's worth,
    /// and over a second what passes is still the rate plus the bucket, within
    /// one slice.
    #[test]
    fn slices_keep_the_rate() {
        // 1M IOPS: 1 us per operation, a bucket of 100,000, slices of 1 ms (1,000).
        let g = group(&[(BucketType::OpsTotal, 1_000_000, 0, 1)], 0);
        // Slices are kept for the threads with a statistics shard of their own, as
        // the test threads (at most the machine's CPUs at once) are.
        assert!(crate::stats::own_shard().is_some());
        assert_eq!(
            g.grant(Direction::Read as usize),
            Units {
                ops: 1000 * OP,
                bytes: u64::MAX
            }
        );
        let tat = || {
            g.buckets[BucketType::OpsTotal as usize]
                .tat
                .load(Ordering::Relaxed)
        };
        assert!(g.admit_at(Direction::Read, 4096, 0).is_ok());
        // The first request charged itself and a slice.
        assert_eq!(tat(), 1_001_000);
        for _ in 0..1000 {
            assert!(g.admit_at(Direction::Read, 4096, 0).is_ok());
        }
        assert_eq!(tat(), 1_001_000, "paid from the slice");
        assert!(g.admit_at(Direction::Read, 4096, 0).is_ok());
        assert_eq!(tat(), 2_002_000, "a new slice");
        let mut sent = 1002u64;
        let mut now = 0;
        while now < 1_000_000_000 {
            now += 10_000;
            sent += u64::from(burst(&g, Direction::Read, 4096, now).0);
        }
        let want = 1_000_000 + 100_000;
        assert!((want..=want + 2_001).contains(&sent), "{sent}");
        // Writes count against the same total bucket, through a slice of their own.
        assert!(g.admit_at(Direction::Write, 4096, now).is_err());
    }

    /// A group with a burst rate charges request by request: no slices.
    #[test]
    fn no_slices_with_a_burst() {
        let g = group(&[(BucketType::OpsTotal, 1_000_000, 2_000_000, 2)], 0);
        assert_eq!(g.grant(Direction::Read as usize), Units::default());
        let g = group(&[(BucketType::BpsRead, 1 << 30, 0, 1)], 0);
        assert_eq!(g.grant(Direction::Write as usize), Units::default());
        // A millisecond of 1 GiB/s, and any number of operations.
        let read = g.grant(Direction::Read as usize);
        assert_eq!(read.ops, u64::MAX);
        assert!((1_073_740..=1_073_742).contains(&read.bytes), "{read:?}");
    }

    #[test]
    fn iops_size_counts_large_requests_as_several() {
        let g = group(&[(BucketType::OpsRead, 100, 0, 1)], 4096);
        // 64 KiB reads count 16 each: one fills the bucket of 10.
        assert_eq!(burst(&g, Direction::Read, 65536, 0).0, 1);
        // Writes are not limited.
        assert_eq!(g.admit_at(Direction::Write, 65536, 0), Ok(()));
    }

    #[test]
    fn new_limits_empty_the_buckets() {
        let g = group(&[(BucketType::BpsWrite, 1 << 20, 0, 1)], 0);
        assert!(g.admit_at(Direction::Write, 1 << 20, 0).is_ok());
        assert!(g.admit_at(Direction::Write, 1, 0).is_err());
        assert!(g.admit_at(Direction::Read, 1 << 30, 0).is_ok());
        g.set_config(ThrottleConfig::default());
        assert!(!g.enabled.load(Ordering::Relaxed));
        let mut c = ThrottleConfig::default();
        c.buckets[BucketType::BpsWrite as usize].avg = 1 << 20;
        g.set_config(c);
        assert!(g.admit_at(Direction::Write, 1, 0).is_ok());
    }
}

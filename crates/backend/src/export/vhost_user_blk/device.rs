//! The vhost-user-blk device of one frontend connection, served by the event loops of
//! the export's iothreads.
//!
//! The device's queues are spread over the iothreads (queue `q` on iothread
//! `q % n`); on each, a [`RingSet`] is a source of that iothread's loop
//! ([`crate::iothread::event_loop`]): it pops and parses chains and spawns their
//! requests on the loop's executor, then pushes used elements and notifies the
//! frontend in batches. Many exports' ring sets share one loop.

use super::config_space::BlkConfig;
use super::guest_pins::GuestPins;
use super::request::{self, DeviceLimits, Memory, Op, Request, RequestError};
use super::vhost_user::chain;
use super::vhost_user::dirty_log::DirtyLog;
use super::vhost_user::inflight::InflightRegion;
use super::vhost_user::vring::{UsedRing, Vring, VringState};
use super::vhost_user::{pf, BackendChannel, QueueDevice, F_LOG_ALL, F_PROTOCOL_FEATURES};
use super::{ExportShared, PopGate};
use crate::iothread::event_loop::{EventLoop, Source, WAKE_SUB};
use crate::metrics::counters::RequestKind;
use blocklayer::aio::{executor, uring};
use blocklayer::backend::ErrorAction;
use blocklayer::stats::{Acct, IoKind, IoStats};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

/// Offset of `writeback` in `struct virtio_blk_config`.
const WRITEBACK_OFFSET: u32 = 32;

/// A request finished on an iothread, waiting to be pushed to its used ring.
struct Completion {
    queue: usize,
    head: u16,
    len: u32,
    /// The ring's generation when the request was popped: a request whose ring has
    /// been stopped since is not pushed (the frontend took the ring back).
    gen: u64,
}

/// Where a ring set's requests put their completions (on its loop's thread).
type Sink = RefCell<Vec<Completion>>;

/// What a ring set's requests share, on its loop's thread: one reference count that
/// only that thread touches, rather than the export's, per request.
struct SetCtx {
    shared: Arc<ExportShared>,
    queues: Arc<QueueStates>,
    /// Where requests put their completions.
    sink: Sink,
}

/// A value on cache lines of its own: counters that different iothreads write (one
/// per queue) do not share lines.
#[derive(Default)]
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Per-queue state shared by the vhost-user handler thread and the iothreads.
pub struct QueueStates {
    /// Requests popped and not yet pushed to the used ring (or dropped); written by
    /// the queue's iothread only, read by the control plane.
    in_flight: Vec<Padded<AtomicU64>>,
    /// Of those, requests held by an error stop (`werror`/`rerror=stop`).
    held: Vec<AtomicU64>,
    /// Bumped whenever the frontend stops the ring (GET_VRING_BASE).
    gen: Vec<AtomicU64>,
    /// Set when the frontend broke the ring (an available index beyond the queue
    /// size, an unreadable ring): nothing more is taken from it until the frontend
    /// stops and restarts it.
    broken: Vec<AtomicBool>,
    /// The fetch order of the next head taken (inflight tracking).
    counter: Vec<Padded<AtomicU64>>,
    /// Heads to run again before new ones: requests a previous backend (or a stopped
    /// ring) left in flight, from the inflight region, in their original order.
    resubmit: Vec<Mutex<std::collections::VecDeque<u16>>>,
    /// The frontend's dirty log, and whether writes to guest memory are logged now
    /// (during live migration).
    dirty_log: RwLock<Option<Arc<DirtyLog>>>,
    logging: AtomicBool,
    /// Set while a ring is being stopped without an inflight region: its held
    /// requests complete with an error instead of waiting for `cont`.
    fail_held: Vec<AtomicBool>,
}

impl QueueStates {
    fn new(n: usize) -> Self {
        QueueStates {
            in_flight: (0..n).map(|_| Padded::default()).collect(),
            held: (0..n).map(|_| AtomicU64::new(0)).collect(),
            gen: (0..n).map(|_| AtomicU64::new(0)).collect(),
            broken: (0..n).map(|_| AtomicBool::new(false)).collect(),
            counter: (0..n).map(|_| Padded::default()).collect(),
            resubmit: (0..n).map(|_| Mutex::new(Default::default())).collect(),
            dirty_log: RwLock::new(None),
            logging: AtomicBool::new(false),
            fail_held: (0..n).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn gen(&self, q: usize) -> u64 {
        self.gen[q].load(Ordering::Acquire)
    }

    fn is_broken(&self, q: usize) -> bool {
        self.broken[q].load(Ordering::Acquire)
    }

    /// The dirty log, while writes are being logged (one relaxed load otherwise).
    fn dirty_log(&self) -> Option<Arc<DirtyLog>> {
        if !self.logging.load(Ordering::Relaxed) {
            return None;
        }
        self.dirty_log
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The entries of a split ring's available ring (virtio 1.2, 2.7.6), read from the
/// host mapping when the ring lies in one region (always, in practice), else through
/// vm-memory's bounds-checked reads. The index was read first (with acquire), so the
/// entries it covers are visible.
enum AvailRing {
    Mapped(*const u16),
    Guest(u64),
}

impl AvailRing {
    /// The available ring at `addr` of a queue of `size` entries in `mem`.
    fn new(mem: &Memory, addr: u64, size: u16) -> AvailRing {
        // flags, idx, ring[size]
        let len = 4 + 2 * u64::from(size);
        match request::host_range(mem, addr, len) {
            Some(p) if addr.is_multiple_of(2) => AvailRing::Mapped(p.cast::<u16>()),
            _ => AvailRing::Guest(addr),
        }
    }

    /// The head index in the entry for the `next`th chain (modulo the ring's size,
    /// `size`, which the caller's queue has; `mem` is the table [`AvailRing::new`] was
    /// given).
    fn entry(&self, mem: &Memory, next: u16, size: u16) -> Option<u16> {
        let slot = next % size;
        match *self {
            // SAFETY: `new` found the ring's `2 + size` u16 words in one mapped region
            // of `mem`, which the caller holds; `slot < size`; the address is 2-byte
            // aligned. Volatile: the driver writes the ring.
            AvailRing::Mapped(p) => Some(u16::from_le(unsafe {
                p.add(2 + usize::from(slot)).read_volatile()
            })),
            AvailRing::Guest(addr) => {
                let at = addr.checked_add(4 + 2 * u64::from(slot))?;
                mem.read_obj::<u16>(GuestAddress(at)).ok().map(u16::from_le)
            }
        }
    }
}

/// Marks the used ring of a vring dirty (used elements, the used index, avail_event).
fn log_used_ring(log: &DirtyLog, st: &VringState) {
    let q = st.get_queue();
    log.mark(q.used_ring(), 6 + 8 * u64::from(q.size()));
}

/// How long stopping a ring waits for requests that are being worked on (not for
/// requests held by an error stop, which are let go at once).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Most chains taken from one ring per pass, and the used elements a ring collects
/// before the frontend is notified while the pass goes on. Notifying as soon as a pass
/// has pushed anything keeps a busy frontend from going to sleep: a notification it is
/// not waiting for costs little (EVENT_IDX suppresses what it did not ask for), while
/// waking a sleeping thread is what costs. The pop batch bounds how long one ring can
/// keep a pass from the iothread's other rings; it is a queue depth's worth, so that a
/// frontend that made a whole burst available gets all of it done, and hears of it
/// once, in one pass. Measured on null-co at queue depth 32 (docs/performance.md):
/// pop batches of 8 took 4 passes and up to 4 wake-ups per burst; 32 gave 1.4x-3x the
/// IOPS of 8 at 0.3 instead of 0.5 us of daemon CPU per I/O (interleaved runs, same
/// binary). Earlier: 4 and 4 gave 1q 1.5x QSD and 4q/1iothread 0.45x; 8 and 1 gave
/// 1.7x and 0.85x.
const POP_BATCH: usize = 32;
const NOTIFY_BATCH: usize = 1;

/// Where the device's rings are served: one ring set per iothread.
struct Serving {
    loops: Vec<Arc<EventLoop>>,
    /// The ring set on each loop (its source id).
    sets: Vec<u64>,
    vrings: Vec<Arc<Vring>>,
    /// The kick eventfd each queue's loop watches.
    kicks: Vec<Option<RawFd>>,
}

impl Serving {
    /// The loop of queue `q` and the ring's index in that loop's ring set.
    fn place(&self, q: usize) -> (usize, usize) {
        let n = self.loops.len().max(1);
        (q % n, q / n)
    }
}

/// One frontend connection's device.
pub struct BlkDevice {
    me: Weak<BlkDevice>,
    shared: Arc<ExportShared>,
    mem: GuestMemoryAtomic<Memory>,
    /// Bumped (release) each time the session publishes a new memory table in `mem`
    /// (before it replies to the frontend): the ring sets compare it with the one
    /// their copy of the table came from, instead of loading `mem` on every pass.
    mem_gen: AtomicU64,
    /// Per queue: requests in flight, held requests, ring generations.
    queues: Arc<QueueStates>,
    /// The loops and ring sets serving the rings, once the session started them.
    serving: Mutex<Option<Serving>>,
    /// Set once the frontend is gone: no more requests are popped.
    disconnected: AtomicBool,
    /// Our own handle on the backend channel, for CONFIG_CHANGE_MSG.
    channel: Mutex<Option<BackendChannel>>,
    /// The inflight region, when the frontend negotiated INFLIGHT_SHMFD.
    inflight: RwLock<Option<Arc<InflightRegion>>>,
}

impl BlkDevice {
    pub fn new(shared: Arc<ExportShared>, mem: GuestMemoryAtomic<Memory>) -> Arc<Self> {
        let queues = Arc::new(QueueStates::new(usize::from(shared.num_queues)));
        shared.frontend_gone.store(false, Ordering::SeqCst);
        Arc::new_cyclic(|me| BlkDevice {
            me: me.clone(),
            shared,
            mem,
            mem_gen: AtomicU64::new(0),
            queues,
            serving: Mutex::new(None),
            disconnected: AtomicBool::new(false),
            channel: Mutex::new(None),
            inflight: RwLock::new(None),
        })
    }

    fn serving(&self) -> std::sync::MutexGuard<'_, Option<Serving>> {
        self.serving.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every loop serving the device for one pass (held requests look again).
    pub fn wake_all(&self) {
        if let Some(s) = self.serving().as_ref() {
            for l in &s.loops {
                l.wake();
            }
        }
    }

    /// Attaches a ring set for every loop in `loops`, and watches the kicks.
    fn attach(
        &self,
        loops: Vec<Arc<EventLoop>>,
        vrings: Vec<Arc<Vring>>,
        kicks: Vec<Option<RawFd>>,
    ) -> io::Result<Serving> {
        let n = loops.len().max(1);
        let mut serving = Serving {
            loops,
            sets: Vec::new(),
            vrings,
            kicks,
        };
        for (t, l) in serving.loops.iter().enumerate() {
            let queues: Vec<usize> = (t..serving.vrings.len()).step_by(n).collect();
            let mine: Vec<Arc<Vring>> = queues.iter().map(|&q| serving.vrings[q].clone()).collect();
            let dev = self
                .me
                .upgrade()
                .ok_or_else(|| io::Error::other("the device is gone"))?;
            let lp = Arc::downgrade(l);
            let id = l.attach(move || {
                Rc::new(RingSet::new(dev, t, queues, mine, lp)) as Rc<dyn Source>
            })?;
            serving.sets.push(id);
        }
        for q in 0..serving.kicks.len() {
            if let Some(fd) = serving.kicks[q] {
                let (t, local) = serving.place(q);
                serving.loops[t].register(fd, serving.sets[t], local as u32)?;
            }
        }
        // One pass each: rings may already hold requests.
        for l in &serving.loops {
            l.wake();
        }
        Ok(serving)
    }

    /// Stops watching the kicks and detaches the ring sets.
    fn detach(serving: &Serving) {
        for q in 0..serving.kicks.len() {
            if let Some(fd) = serving.kicks[q] {
                let (t, _) = serving.place(q);
                serving.loops[t].unregister(fd);
            }
        }
        for (l, &id) in serving.loops.iter().zip(&serving.sets) {
            l.detach(id);
        }
    }

    /// Moves the rings to the export's iothreads now (after `x-blockdev-set-iothread`;
    /// the export is paused and nothing is in flight).
    pub fn rehome(&self) -> io::Result<()> {
        let mut guard = self.serving();
        let Some(old) = guard.take() else {
            return Ok(());
        };
        Self::detach(&old);
        let loops = self.shared.loops();
        let new = self.attach(loops, old.vrings, old.kicks)?;
        *guard = Some(new);
        Ok(())
    }

    /// The frontend is gone: iothread passes stop popping from its rings.
    pub fn disconnect(&self) {
        self.disconnected.store(true, Ordering::SeqCst);
        self.shared.frontend_gone.store(true, Ordering::SeqCst);
        // Requests held by an error stop give up.
        self.wake_all();
    }

    /// Whether new requests are taken from the rings.
    fn accepting(&self) -> bool {
        self.shared.is_accepting() && !self.disconnected.load(Ordering::SeqCst)
    }

    /// Requests in flight per queue.
    pub fn queue_in_flight(&self) -> Vec<u64> {
        self.queues
            .in_flight
            .iter()
            .map(|c| c.load(Ordering::Acquire))
            .collect()
    }

    fn limits(&self) -> DeviceLimits {
        self.shared.device_limits()
    }

    /// Marks a ring as broken by the frontend: nothing more is taken from it (and no
    /// time is spent on it) until the frontend stops and restarts it.
    fn break_ring(&self, vring: &Vring, queue: usize, why: std::fmt::Arguments<'_>) {
        if !self.queues.broken[queue].swap(true, Ordering::AcqRel) {
            // The vhost-user way to say "this ring needs a reset".
            vring.lock().signal_error();
            crate::limited_log!(
                self.shared.log_limits.ring,
                log::Level::Error,
                "export {}: queue {queue}: {why}; the queue is stopped until the frontend \
                 resets it",
                self.shared.id
            );
        }
    }

    /// Pops up to [`POP_BATCH`] available chains of one vring and spawns their
    /// requests. `memory` gives the current memory table.
    fn pop_requests(
        &self,
        vring: &Vring,
        queue: usize,
        memory: &dyn Fn() -> Arc<Memory>,
        lim: &DeviceLimits,
        ctx: &Rc<SetCtx>,
    ) -> usize {
        if self.queues.is_broken(queue) {
            return 0;
        }
        let mut state = vring.lock();
        if !state.is_live() {
            return 0;
        }
        let gen = self.queues.gen(queue);
        let q = state.get_queue_mut();
        // The driver may make at most a ring's worth of chains available beyond those
        // taken; anything else is a broken (or hostile) driver (virtio 1.2, 2.7.6).
        // Any table holds the ring itself (a live ring's memory stays mapped).
        let avail = match q.avail_idx(memory().as_ref(), Ordering::Acquire) {
            Ok(i) => i,
            Err(e) => {
                drop(state);
                self.break_ring(
                    vring,
                    queue,
                    format_args!("cannot read the available ring: {e}"),
                );
                return 0;
            }
        };
        let pending = avail - std::num::Wrapping(q.next_avail());
        if pending.0 > q.size() {
            let (next, size) = (q.next_avail(), q.size());
            drop(state);
            self.break_ring(
                vring,
                queue,
                format_args!(
                    "available index {} is {} entries past the next one ({next}) on a \
                     ring of {size}",
                    avail.0, pending.0
                ),
            );
            return 0;
        }
        // The chains up to `avail` may use a region the frontend added just before it
        // made them available: it waits for our reply to ADD_MEM_REG or SET_MEM_TABLE,
        // which comes after the new table is published. So the table is loaded after
        // the index was read: one loaded before (at the start of the pass, while the
        // message was being handled) could lack that region and fail the request.
        let mem = &memory();
        let max_descs = request::max_chain_descriptors(lim);
        let inflight = self.inflight();
        let track = inflight.as_ref().and_then(|r| r.queue(queue));
        let mut n = 0;
        // Requests left in flight by a previous backend or a stopped ring go first,
        // in the order they were first taken.
        let (table, size) = (q.desc_table(), q.size());
        let mut walked = chain::Walked::default();
        while n < POP_BATCH {
            let Some(head) = self.queues.resubmit[queue]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()
            else {
                break;
            };
            // A head the frontend's region holds that makes no chain is returned
            // unprocessed (which also clears its mark).
            let req = match chain::walk(mem, table, size, head, max_descs, &mut walked) {
                Ok(()) => chain::request(head, &walked, mem, lim),
                Err(e) => request::Request::refused(head, RequestError::BadChain(e.to_string())),
            };
            log::info!(
                "export {}: queue {queue}: resubmitting request {head} left in flight",
                self.shared.id
            );
            n += 1;
            self.spawn_request(req, queue, gen, mem, ctx);
        }
        let pending = usize::from(pending.0) + n;
        let ring = AvailRing::new(mem, q.avail_ring(), size);
        // The descriptor table, resolved once for the pass.
        let descs = chain::Table::new(mem, table, size);
        // The chains about to be taken, hinted to the cache together.
        let batch = POP_BATCH.saturating_sub(n).min(pending.saturating_sub(n));
        if batch > 1 {
            let next = state.get_queue().next_avail();
            let mut heads = [0u16; POP_BATCH];
            for (j, h) in heads[..batch].iter_mut().enumerate() {
                *h = ring
                    .entry(mem, next.wrapping_add(j as u16), size)
                    .unwrap_or(size);
            }
            chain::prefetch_chains(mem, descs, size, &heads[..batch]);
        }
        while n < POP_BATCH && pending > n {
            let q = state.get_queue_mut();
            let next = q.next_avail();
            let Some(head) = ring.entry(mem, next, size) else {
                // Entries are available but the head could not be read.
                drop(state);
                self.break_ring(
                    vring,
                    queue,
                    format_args!("cannot read an available ring entry"),
                );
                break;
            };
            q.set_next_avail(next.wrapping_add(1));
            // A chain that is not one (a loop, a bad index or indirect table, memory
            // that cannot be read) means a broken driver: as QEMU, the device stops
            // the ring until it is reset, and returns nothing for it.
            if let Err(e) = chain::walk_in(mem, descs, size, head, max_descs, &mut walked) {
                drop(state);
                self.break_ring(
                    vring,
                    queue,
                    format_args!("descriptor chain at {head}: {e}"),
                );
                break;
            }
            let req = chain::request(head, &walked, mem, lim);
            if let Some(t) = &track {
                // Recorded before anything of the request happens.
                let c = self.queues.counter[queue].fetch_add(1, Ordering::Relaxed);
                t.mark(head, c);
            }
            n += 1;
            self.spawn_request(req, queue, gen, mem, ctx);
        }
        n
    }

    fn spawn_request(
        &self,
        req: Request,
        queue: usize,
        gen: u64,
        mem: &Arc<Memory>,
        ctx: &Rc<SetCtx>,
    ) {
        self.queues.in_flight[queue].fetch_add(1, Ordering::AcqRel);
        executor::spawn_with(|| execute(ctx.clone(), mem.clone(), req, queue, gen));
    }

    /// The inflight region, if the frontend gave one.
    fn inflight(&self) -> Option<Arc<InflightRegion>> {
        self.inflight
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The frontend stops ring `q` (GET_VRING_BASE): lets the requests that are being
    /// worked on finish first, so that no used element is pushed after the frontend
    /// took the ring back. Requests held by an error stop are not waited for: they
    /// could wait for `cont` forever, and the frontend (QEMU stopping the VM, the
    /// guest resetting the device) waits for the reply.
    fn stop_ring(&self, q: usize) {
        let (Some(in_flight), Some(held)) = (self.queues.in_flight.get(q), self.queues.held.get(q))
        else {
            return;
        };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let n = in_flight.load(Ordering::Acquire);
            if n == 0 || n <= held.load(Ordering::Acquire) {
                break;
            }
            if Instant::now() > deadline {
                log::error!(
                    "export {}: queue {q} still has {n} request(s) in flight after {} s; \
                     their completions are dropped",
                    self.shared.id,
                    STOP_TIMEOUT.as_secs()
                );
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let n = held.load(Ordering::Acquire);
        if n > 0 && self.inflight().is_none() {
            // Without an inflight region the frontend cannot get a held request back
            // after the stop: complete it with an error now, while the ring is ours,
            // rather than leave the guest waiting for it forever.
            log::warn!(
                "export {}: queue {q} stopped with {n} request(s) held by an I/O error and \
                 no inflight tracking; they complete with an error",
                self.shared.id
            );
            self.queues.fail_held[q].store(true, Ordering::Release);
            self.wake_all();
            let deadline = Instant::now() + Duration::from_secs(1);
            while in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(100));
            }
            self.queues.fail_held[q].store(false, Ordering::Release);
        } else if n > 0 {
            log::info!(
                "export {}: queue {q} stopped with {n} request(s) held by an I/O error; they \
                 stay in the inflight region and run again when the ring restarts",
                self.shared.id
            );
        }
        // From here on nothing is pushed to the old ring: held requests give up, and
        // stragglers complete into nothing. A broken ring gets a fresh start.
        self.queues.gen[q].fetch_add(1, Ordering::AcqRel);
        self.queues.broken[q].store(false, Ordering::Release);
        if held.load(Ordering::Acquire) > 0 {
            self.wake_all();
        }
    }

    /// Sends a config-change notification (capacity changed) to the frontend, if it
    /// gave us a backend channel (QEMU does; libblkio re-reads GET_CONFIG itself).
    pub fn notify_config_change(&self) {
        let channel = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = channel.as_ref() {
            if let Err(e) = ch.send_config_change() {
                log::warn!("export {}: {e}", self.shared.id);
            }
        }
    }
}

/// The statistics kind of a virtio-blk request type (GET_ID and unknown types are not
/// accounted, as in QEMU).
fn io_kind(req_type: u32) -> Option<IoKind> {
    match req_type {
        VIRTIO_BLK_T_IN => Some(IoKind::Read),
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_WRITE_ZEROES => Some(IoKind::Write),
        VIRTIO_BLK_T_FLUSH => Some(IoKind::Flush),
        VIRTIO_BLK_T_DISCARD => Some(IoKind::Unmap),
        _ => None,
    }
}

/// The metrics kind of a parsed request.
fn request_kind(op: &Op) -> RequestKind {
    match op {
        Op::Read { .. } => RequestKind::Read,
        Op::Write { .. } => RequestKind::Write,
        Op::Flush => RequestKind::Flush,
        Op::Discard(_) => RequestKind::Discard,
        Op::WriteZeroes(_) => RequestKind::WriteZeroes,
        Op::GetId { .. } => RequestKind::GetId,
    }
}

/// The metrics kind of a request that could not be parsed, from its type (if its
/// header could be read).
fn type_kind(req_type: Option<u32>) -> RequestKind {
    match req_type {
        Some(VIRTIO_BLK_T_IN) => RequestKind::Read,
        Some(VIRTIO_BLK_T_OUT) => RequestKind::Write,
        Some(VIRTIO_BLK_T_FLUSH) => RequestKind::Flush,
        Some(VIRTIO_BLK_T_DISCARD) => RequestKind::Discard,
        Some(VIRTIO_BLK_T_WRITE_ZEROES) => RequestKind::WriteZeroes,
        Some(VIRTIO_BLK_T_GET_ID) => RequestKind::GetId,
        _ => RequestKind::Other,
    }
}

/// The data a request without statistics (GET_ID) moves.
fn op_data_len(op: &Op) -> u64 {
    match op {
        Op::GetId { iov } => iov.len(),
        _ => 0,
    }
}

/// Starts accounting a request: its record and, for writes, the end of its range.
#[inline]
fn op_acct(op: &Op) -> Option<(Acct, u64)> {
    let sum = |ranges: &[request::Range]| ranges.iter().map(|r| r.len).sum::<u64>();
    let end = |ranges: &[request::Range]| {
        ranges
            .iter()
            .map(|r| r.offset.saturating_add(r.len))
            .max()
            .unwrap_or(0)
    };
    Some(match op {
        Op::Read { iov, .. } => (IoStats::start(IoKind::Read, iov.len()), 0),
        Op::Write { offset, iov } => (
            IoStats::start(IoKind::Write, iov.len()),
            offset.saturating_add(iov.len()),
        ),
        Op::Flush => (IoStats::start(IoKind::Flush, 0), 0),
        Op::Discard(ranges) => (IoStats::start(IoKind::Unmap, sum(ranges)), 0),
        Op::WriteZeroes(ranges) => (IoStats::start(IoKind::Write, sum(ranges)), end(ranges)),
        Op::GetId { .. } => return None,
    })
}

/// Runs an operation once.
async fn perform(shared: &ExportShared, op: &Op) -> blocklayer::Result<()> {
    match op {
        Op::Read { offset, iov } => shared.blk.read(*offset, iov.clone()).await,
        // virtio-blk has no FUA: with the guest's write cache off, the backend
        // makes every write stable.
        Op::Write { offset, iov } => shared.blk.write(*offset, iov.clone(), false).await,
        Op::Flush => shared.blk.flush().await,
        Op::GetId { iov } => {
            let id = shared.serial;
            let n = iov.len() as usize;
            iov.copy_from_slice(0, &id[..n]);
            Ok(())
        }
        Op::Discard(ranges) => {
            for rg in ranges {
                shared.blk.discard(rg.offset, rg.len).await?;
            }
            Ok(())
        }
        Op::WriteZeroes(ranges) => {
            for rg in ranges {
                shared
                    .blk
                    .write_zeroes(rg.offset, rg.len, rg.unmap, false)
                    .await?;
            }
            Ok(())
        }
    }
}

thread_local! {
    /// Requests of this iothread held by an error stop, waiting for `cont`.
    static HELD: RefCell<Vec<Waker>> = const { RefCell::new(Vec::new()) };
}

/// Wakes this iothread's held requests (they check whether to retry or give up).
fn wake_held() {
    for w in HELD.with(|h| std::mem::take(&mut *h.borrow_mut())) {
        w.wake();
    }
}

/// Where a request came from: its queue and that ring's generation when it was popped.
struct Origin<'a> {
    queues: &'a QueueStates,
    queue: usize,
    gen: u64,
}

impl Origin<'_> {
    /// Whether the frontend has stopped the ring since the request was popped.
    fn ring_stopped(&self) -> bool {
        self.queues.gen(self.queue) != self.gen
    }
}

/// Waits for `cont` after an error stop: `true` to retry, `false` to give up because
/// the export is going away, its frontend has gone or stopped the request's ring.
struct Resumed<'a> {
    shared: &'a ExportShared,
    origin: &'a Origin<'a>,
    gen: u64,
}

impl Future for Resumed<'_> {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let shared = self.shared;
        if shared.is_stopping()
            || shared.frontend_gone.load(Ordering::SeqCst)
            || self.origin.ring_stopped()
            || self.origin.queues.fail_held[self.origin.queue].load(Ordering::Acquire)
        {
            return Poll::Ready(false);
        }
        if shared.blk.resume_gen() != self.gen {
            return Poll::Ready(true);
        }
        HELD.with(|h| h.borrow_mut().push(cx.waker().clone()));
        Poll::Pending
    }
}

/// Counts a request as held (for [`BlkDevice::stop_vring`]) while it lives.
struct Held<'a>(&'a AtomicU64);

impl<'a> Held<'a> {
    fn enter(c: &'a AtomicU64) -> Self {
        c.fetch_add(1, Ordering::AcqRel);
        Held(c)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs an operation under the export's error policy (`rerror`/`werror`): whether
/// it completes successfully for the guest.
async fn perform_with_policy(shared: &ExportShared, origin: &Origin<'_>, op: &Op) -> bool {
    let mut gen = shared.blk.resume_gen();
    // The first attempt of a read or write in this future itself, without the
    // layer of `perform`'s (the request path's usual case).
    let mut r = match op {
        Op::Read { offset, iov } => shared.blk.read(*offset, iov.clone()).await,
        Op::Write { offset, iov } => shared.blk.write(*offset, iov.clone(), false).await,
        _ => perform(shared, op).await,
    };
    loop {
        let Err(e) = r else {
            return true;
        };
        let read = matches!(op, Op::Read { .. });
        let errno = e.errno();
        let action = shared.blk.error_action(read, errno);
        crate::limited_log!(
            shared.log_limits.io_error,
            log::Level::Debug,
            "export {}: request failed ({}): {e}",
            shared.id,
            action.name()
        );
        // Stopped (and the I/O status set) before anyone hears of it.
        if shared.blk.apply_error_action(read, errno, action) {
            log::warn!(
                "export {}: stopped by an I/O error ({})",
                shared.id,
                std::io::Error::from_raw_os_error(errno)
            );
        }
        match action {
            ErrorAction::Report => return false,
            ErrorAction::Ignore => return true,
            ErrorAction::Stop => {
                let _held = Held::enter(&origin.queues.held[origin.queue]);
                if !(Resumed {
                    shared,
                    origin,
                    gen,
                })
                .await
                {
                    return false;
                }
            }
        }
        gen = shared.blk.resume_gen();
        r = perform(shared, op).await;
    }
}

/// Performs one request and queues its completion on this iothread.
async fn execute(ctx: Rc<SetCtx>, mem: Arc<Memory>, req: Request, queue: usize, gen: u64) {
    let shared = &*ctx.shared;
    let origin = Origin {
        queues: &ctx.queues,
        queue,
        gen,
    };
    let Request {
        head,
        status_addr,
        data_in_len,
        req_type,
        op,
    } = req;
    let status = match &op {
        Ok(op) => {
            let acct = op_acct(op);
            let ok = perform_with_policy(shared, &origin, op).await;
            let (counters, kind) = (shared.counters.queue(queue), request_kind(op));
            match acct {
                Some((acct, end)) => {
                    let bytes = acct.bytes();
                    let latency = shared.blk.stats().done(acct, ok, end);
                    counters.record(kind, bytes, ok, latency);
                }
                // GET_ID: answered in the pass that took it.
                None => counters.record(kind, op_data_len(op), ok, 0),
            }
            if ok {
                VIRTIO_BLK_S_OK as u8
            } else {
                VIRTIO_BLK_S_IOERR as u8
            }
        }
        Err(e) => {
            crate::limited_log!(
                shared.log_limits.request,
                log::Level::Debug,
                "export {}: queue {queue}: invalid request: {e}",
                shared.id
            );
            if let Some(kind) = req_type.and_then(io_kind) {
                shared.blk.stats().invalid(kind);
            }
            shared
                .counters
                .queue(queue)
                .record(type_kind(req_type), 0, false, 0);
            e.status()
        }
    };
    let len = match status_addr {
        // The ring was taken back meanwhile: the buffers are the driver's again.
        _ if origin.ring_stopped() => 0,
        Some(addr) => {
            let written = request::write_status(&mem, addr, status);
            // Whether writes are logged is looked at after the last write to guest
            // memory: logging that starts between the two still sees the write. (No
            // fence between the store and the load: the frontend copies a page no
            // sooner than a message round trip after logging starts, long after a
            // store still in this CPU's buffer has become visible.)
            if let Some(log) = origin.queues.dirty_log() {
                // A failed read may have written part of its buffers too.
                for (gpa, len) in op.iter().flat_map(|o| o.data_in(&mem)) {
                    log.mark(gpa, len);
                }
                if written.is_ok() {
                    log.mark(addr.0, 1);
                }
            }
            if let Err(e) = written {
                crate::limited_log!(
                    shared.log_limits.request,
                    log::Level::Warn,
                    "export {}: queue {queue}: cannot write the status: {e}",
                    shared.id
                );
            }
            if status == VIRTIO_BLK_S_OK as u8 {
                data_in_len + 1
            } else {
                1
            }
        }
        None => 0,
    };
    ctx.sink.borrow_mut().push(Completion {
        queue,
        head,
        len,
        gen: origin.gen,
    });
}

/// The rings of one device that one iothread serves: a source of its event loop.
struct RingSet {
    device: Arc<BlkDevice>,
    /// Global queue index of each ring.
    queues: Vec<usize>,
    vrings: Vec<Arc<Vring>>,
    /// The context of its requests (with their finished ones, waiting to be pushed).
    ctx: Rc<SetCtx>,
    /// The memory table the rings were last read with: the device's `mem_gen` it
    /// came from (to notice a new one) and this set's own copy of it, whose reference
    /// count only this thread touches (each request holds one).
    mem: RefCell<Option<(u64, Arc<Memory>)>>,
    /// The device's limits, taken at each wake-up.
    lim: Cell<Option<DeviceLimits>>,
    /// Used elements pushed but not yet notified, and the rings (bits) they are on.
    /// Per ring: used elements pushed but not yet notified.
    unsignalled: Vec<Cell<u32>>,
    /// The export's pop-gate counter this set uses (its iothread's index).
    slot: usize,
    /// With `pin-guest-memory=on`: the frontend's memory registered with this
    /// iothread's io_uring (let go with the set, or replaced with the table).
    pins: GuestPins,
}

impl RingSet {
    fn new(
        device: Arc<BlkDevice>,
        slot: usize,
        queues: Vec<usize>,
        vrings: Vec<Arc<Vring>>,
        event_loop: Weak<EventLoop>,
    ) -> Self {
        let ctx = Rc::new(SetCtx {
            shared: device.shared.clone(),
            queues: device.queues.clone(),
            sink: RefCell::new(Vec::new()),
        });
        let unsignalled = (0..vrings.len()).map(|_| Cell::new(0)).collect();
        let pins = GuestPins::new(device.shared.id.clone(), event_loop);
        RingSet {
            device,
            slot,
            queues,
            vrings,
            ctx,
            mem: RefCell::new(None),
            lim: Cell::new(None),
            unsignalled,
            pins,
        }
    }

    /// With `pin-guest-memory=on`: brings the registrations up to date with the
    /// current memory table ([`GuestPins::refresh`]). Called at the top of each pass,
    /// before any ring is locked, and whether or not the export takes requests, so
    /// that a replaced table's registrations never outlive it.
    fn refresh_pins(&self) {
        if !self.device.shared.pin_guest_memory {
            return;
        }
        let gen = self.device.mem_gen.load(Ordering::Acquire);
        self.pins.refresh(gen, || self.memory_gen());
    }

    /// This set's copy of the current memory table (a new one after the frontend
    /// changed the table).
    fn memory(&self) -> Arc<Memory> {
        self.memory_gen().1
    }

    /// [`RingSet::memory`], with the generation it is kept under.
    fn memory_gen(&self) -> (u64, Arc<Memory>) {
        let gen = self.device.mem_gen.load(Ordering::Acquire);
        let mut cache = self.mem.borrow_mut();
        match cache.as_ref() {
            Some((g, ours)) if *g == gen => (gen, ours.clone()),
            _ => {
                // Loaded after the generation: at least as new as it.
                let theirs = self.device.mem.memory();
                let ours = Arc::new((*theirs).clone());
                *cache = Some((gen, ours.clone()));
                (gen, ours)
            }
        }
    }

    /// Notifies the frontend of the used elements pushed to ring `i` since the last
    /// notification (if the driver asked for one).
    fn notify_ring(&self, i: usize) {
        self.unsignalled[i].set(0);
        let mut st = self.vrings[i].lock();
        if st.needs_notification().unwrap_or(true) {
            if let Err(e) = st.signal_used_queue() {
                crate::limited_log!(
                    self.device.shared.log_limits.ring,
                    log::Level::Warn,
                    "export {}: cannot notify queue {}: {e}",
                    self.device.shared.id,
                    self.queues[i]
                );
            }
        }
    }

    /// The ring index of a global queue index, if it is one of this set's.
    fn local(&self, queue: usize) -> Option<usize> {
        self.queues.iter().position(|&q| q == queue)
    }

    /// Pushes finished requests to their used rings; notification is left to
    /// [`RingSet::notify`]. Returns how many were pushed.
    fn push_completions(&self) -> usize {
        let done = std::mem::take(&mut *self.ctx.sink.borrow_mut());
        let n = done.len();
        if n == 0 {
            return 0;
        }
        let dev = &self.device;
        let mut dirty = 0u64;
        let inflight = dev.inflight();
        // The current memory table, loaded once for the batch (the rings' state is
        // only valid in it), and the ring last pushed to, kept locked while the
        // completions that follow are for it too (they come in runs).
        let mem = self.memory();
        // With the lock, where its used ring lies in `mem` (resolved once per lock).
        let mut held: Option<(usize, std::sync::MutexGuard<'_, VringState>, UsedRing)> = None;
        for c in &done {
            // A ring stopped since the request was popped belongs to the frontend again:
            // the request is not pushed (it stays in the inflight region, if there is
            // one, and is resubmitted when the ring starts again).
            let current = dev.queues.gen(c.queue) == c.gen;
            let local = self.local(c.queue);
            if let (true, Some(i)) = (current, local) {
                let track = inflight.as_ref().and_then(|r| r.queue(c.queue));
                if held.as_ref().is_none_or(|(h, ..)| *h != i) {
                    // One ring lock at a time.
                    drop(held.take());
                    let st = self.vrings[i].lock();
                    let ring = st.used_ring(&mem);
                    held = Some((i, st, ring));
                }
                let (_, st, ring) = held.as_mut().expect("locked above");
                if let Some(t) = &track {
                    t.pre_put(c.head);
                }
                let r = st.add_used_to(*ring, &mem, c.head, c.len);
                if let (Some(t), Ok(())) = (&track, &r) {
                    t.post_put(c.head, st.get_queue().next_used());
                }
                if let Err(e) = r {
                    crate::limited_log!(
                        dev.shared.log_limits.ring,
                        log::Level::Error,
                        "export {}: queue {}: cannot return descriptor {}: {e}",
                        dev.shared.id,
                        c.queue,
                        c.head
                    );
                }
                dirty |= 1 << i;
                self.unsignalled[i].set(self.unsignalled[i].get() + 1);
            }
        }
        drop(held);
        if let Some(log) = dev.queues.dirty_log() {
            for (i, v) in self.vrings.iter().enumerate() {
                if dirty & (1 << i) != 0 {
                    log_used_ring(&log, &v.lock());
                }
            }
        }
        // Only now are the requests done: a GET_VRING_BASE waiting for them returns
        // after their used elements are in the dirty log, which the frontend reads
        // once the ring is stopped (the last pass of a migration).
        for c in &done {
            dev.queues.in_flight[c.queue].fetch_sub(1, Ordering::AcqRel);
        }
        // Keep the buffer's allocation for the next round.
        let mut sink = self.ctx.sink.borrow_mut();
        if sink.is_empty() {
            let mut v = done;
            v.clear();
            *sink = v;
        }
        n
    }
}

impl Source for RingSet {
    fn event(&self, sub: u32) {
        if sub == WAKE_SUB {
            wake_held();
        } else if let Some(v) = self.vrings.get(sub as usize) {
            v.read_kick();
        }
    }

    fn begin(&self) {
        self.lim.set(Some(self.device.limits()));
        // Let go of a copy of a memory table the frontend has replaced.
        let gen = self.device.mem_gen.load(Ordering::Acquire);
        let mut cache = self.mem.borrow_mut();
        if cache.as_ref().is_some_and(|(g, _)| *g != gen) {
            *cache = None;
        }
    }

    fn poll(&self) -> usize {
        self.refresh_pins();
        let dev = &self.device;
        // The memory table is looked at on every pass (in `pop_requests`, after each
        // ring's index): the frontend may add regions (VHOST_USER_ADD_MEM_REG) at any
        // time, and new requests may use them.
        let _gate = PopGate::enter(&dev.shared, self.slot);
        if !dev.accepting() {
            return 0;
        }
        let lim = match self.lim.get() {
            Some(l) => l,
            None => {
                let l = dev.limits();
                self.lim.set(Some(l));
                l
            }
        };
        let memory = || self.memory();
        let mut popped = 0;
        for (v, &q) in self.vrings.iter().zip(&self.queues) {
            popped += dev.pop_requests(v, q, &memory, &lim, &self.ctx);
        }
        popped
    }

    fn complete(&self, idle: bool) -> usize {
        let n = self.push_completions();
        for i in 0..self.vrings.len() {
            let pending = self.unsignalled[i].get() as usize;
            if pending > 0 && (idle || pending >= NOTIFY_BATCH) {
                self.notify_ring(i);
            }
        }
        n
    }

    fn notify(&self) {
        for i in 0..self.vrings.len() {
            if self.unsignalled[i].get() > 0 {
                self.notify_ring(i);
            }
        }
    }
    fn set_notifications(&self, on: bool) -> bool {
        let dev = &self.device;
        let mut waiting = false;
        for (v, &q) in self.vrings.iter().zip(&self.queues) {
            if dev.queues.is_broken(q) {
                continue;
            }
            // Whether the ring may be touched, and the touch, under one lock.
            let mut st = v.lock();
            if !st.is_live() {
                continue;
            }
            if on {
                waiting |= st.enable_notification().unwrap_or(false);
            } else {
                let _ = st.disable_notification();
            }
            // After the write (avail_event), as for completions.
            if let Some(log) = dev.queues.dirty_log() {
                log_used_ring(&log, &st);
            }
        }
        // Entries left in a ring only count as work while requests are taken; a
        // stopped or disconnected device leaves them where they are.
        waiting && dev.accepting()
    }

    fn detached(&self) {
        // Requests still running on this loop give up where they wait (the frontend
        // is gone); what they finish afterwards is counted, not pushed.
        wake_held();
        let _ = executor::run_ready();
        self.push_completions_dropped();
    }
}

impl RingSet {
    /// Counts requests that finished after the set was detached as done, without
    /// touching the rings.
    fn push_completions_dropped(&self) {
        let done = std::mem::take(&mut *self.ctx.sink.borrow_mut());
        for c in done {
            self.device.queues.in_flight[c.queue].fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl QueueDevice for BlkDevice {
    fn num_queues(&self) -> usize {
        usize::from(self.shared.num_queues)
    }

    fn max_queue_size(&self) -> u16 {
        self.shared.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE)
            | F_LOG_ALL
            | F_PROTOCOL_FEATURES;
        if self.shared.is_writable() {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        } else {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn protocol_features(&self) -> u64 {
        pf::CONFIG
            | pf::MQ
            | pf::REPLY_ACK
            | pf::BACKEND_REQ
            | pf::CONFIGURE_MEM_SLOTS
            | pf::INFLIGHT_SHMFD
            | pf::LOG_SHMFD
    }

    fn config_space(&self) -> Vec<u8> {
        let cfg: BlkConfig = self.shared.config_space();
        cfg.to_bytes().to_vec()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the write cache mode is writable (VIRTIO_BLK_F_CONFIG_WCE).
        if offset != WRITEBACK_OFFSET || buf.len() != 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "only the 1-byte writeback field (offset {WRITEBACK_OFFSET}) is \
                     writable, not {} byte(s) at {offset}",
                    buf.len()
                ),
            ));
        }
        let on = buf[0] != 0;
        if !on && self.shared.blk.write_cache() && self.shared.is_writable() {
            // From now on the guest takes every completed write as stable: make the
            // ones it wrote in write-back mode stable too.
            let shared = self.shared.clone();
            if let Err(e) = uring::block_on(async move { shared.blk.flush().await }) {
                log::error!(
                    "export {}: flush on write-through switch: {e}",
                    self.shared.id
                );
            }
        }
        self.shared.set_write_cache(on);
        Ok(())
    }

    fn stop_vring(&self, queue: usize) {
        self.stop_ring(queue);
    }

    fn queue_started(&self, queue: usize) {
        // The ring may already hold requests (a reconnect, a late enable): look.
        if let Some(s) = self.serving().as_ref() {
            let (t, _) = s.place(queue);
            s.loops[t].wake();
        }
    }

    fn set_inflight(&self, region: Option<Arc<InflightRegion>>) {
        *self.inflight.write().unwrap_or_else(|p| p.into_inner()) = region;
    }

    fn resubmit(&self, queue: usize, heads: Vec<u16>, next_counter: u64) {
        if let Some(c) = self.queues.counter.get(queue) {
            c.store(next_counter, Ordering::Relaxed);
        }
        if let Some(r) = self.queues.resubmit.get(queue) {
            if !heads.is_empty() {
                log::info!(
                    "export {}: queue {queue}: {} request(s) left in flight will run again",
                    self.shared.id,
                    heads.len()
                );
            }
            *r.lock().unwrap_or_else(|p| p.into_inner()) = heads.into();
        }
    }

    fn set_dirty_log(&self, log: Option<Arc<DirtyLog>>) {
        *self
            .queues
            .dirty_log
            .write()
            .unwrap_or_else(|p| p.into_inner()) = log;
    }

    fn set_logging(&self, on: bool) {
        if self.queues.logging.swap(on, Ordering::AcqRel) != on {
            log::info!(
                "export {}: dirty page logging {}",
                self.shared.id,
                if on { "on" } else { "off" }
            );
        }
    }

    fn set_backend_channel(&self, channel: Option<BackendChannel>) {
        *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = channel;
    }

    fn start_serving(&self, vrings: &[Arc<Vring>]) -> io::Result<()> {
        let loops = self.shared.loops();
        let serving = self.attach(loops, vrings.to_vec(), vec![None; vrings.len()])?;
        *self.serving() = Some(serving);
        Ok(())
    }

    fn watch_kick(&self, queue: usize, fd: RawFd) -> io::Result<()> {
        let mut guard = self.serving();
        let s = guard
            .as_mut()
            .ok_or_else(|| io::Error::other("the rings are not served"))?;
        let (t, local) = s.place(queue);
        s.loops[t].register(fd, s.sets[t], local as u32)?;
        s.kicks[queue] = Some(fd);
        Ok(())
    }

    fn unwatch_kick(&self, queue: usize, fd: RawFd) {
        if let Some(s) = self.serving().as_mut() {
            let (t, _) = s.place(queue);
            s.loops[t].unregister(fd);
            if s.kicks.get(queue) == Some(&Some(fd)) {
                s.kicks[queue] = None;
            }
        }
    }

    fn memory_changed(&self) {
        self.mem_gen.fetch_add(1, Ordering::Release);
        // The loops look at the new table (and drop their copies of the old one).
        self.wake_all();
    }

    fn stop_serving(&self) {
        if let Some(s) = self.serving().take() {
            Self::detach(&s);
        }
    }
}

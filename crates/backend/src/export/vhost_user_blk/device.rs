//! The vhost-user-blk device of one frontend connection, served by the worker threads
//! of its vhost-user session (one per iothread of the export).
//!
//! Each worker thread runs the iothread loop in [`BlkDevice::handle_event`]:
//! pop and parse chains, spawn their requests on the thread's executor, drive the
//! thread's io_uring, push used elements and notify the frontend; then poll adaptively
//! before returning to epoll. The thread's io_uring completion eventfd sits in the same
//! epoll set as the queue kicks, so a completion wakes the thread like a kick does.

use super::config_space::BlkConfig;
use super::request::{self, DeviceLimits, Memory, Op, Request, RequestError};
use super::vhost_user::chain;
use super::vhost_user::dirty_log::DirtyLog;
use super::vhost_user::inflight::InflightRegion;
use super::vhost_user::vring::{Vring, VringState};
use super::vhost_user::{pf, BackendChannel, QueueDevice, F_LOG_ALL, F_PROTOCOL_FEATURES};
use super::{ExportShared, PopGate};
use crate::iothread::{current_tid, IoThread};
use blocklayer::aio::poll::{PollParams, PollState};
use blocklayer::aio::{clock, executor, uring};
use blocklayer::backend::ErrorAction;
use blocklayer::stats::{Acct, IoKind, IoStats};
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;

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

/// Per-queue state shared by the vhost-user handler thread and the iothreads.
pub struct QueueStates {
    /// Requests popped and not yet pushed to the used ring (or dropped).
    in_flight: Vec<AtomicU64>,
    /// Of those, requests held by an error stop (`werror`/`rerror=stop`).
    held: Vec<AtomicU64>,
    /// Bumped whenever the frontend stops the ring (GET_VRING_BASE).
    gen: Vec<AtomicU64>,
    /// Set when the frontend broke the ring (an available index beyond the queue
    /// size, an unreadable ring): nothing more is taken from it until the frontend
    /// stops and restarts it.
    broken: Vec<AtomicBool>,
    /// The fetch order of the next head taken (inflight tracking).
    counter: Vec<AtomicU64>,
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
            in_flight: (0..n).map(|_| AtomicU64::new(0)).collect(),
            held: (0..n).map(|_| AtomicU64::new(0)).collect(),
            gen: (0..n).map(|_| AtomicU64::new(0)).collect(),
            broken: (0..n).map(|_| AtomicBool::new(false)).collect(),
            counter: (0..n).map(|_| AtomicU64::new(0)).collect(),
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

/// Marks the used ring of a vring dirty (used elements, the used index, avail_event).
fn log_used_ring(log: &DirtyLog, st: &VringState) {
    let q = st.get_queue();
    log.mark(q.used_ring(), 6 + 8 * u64::from(q.size()));
}

#[derive(Default)]
struct LoopState {
    poll: Option<PollState>,
    /// The iothread this worker thread is, and the `iothread_gen` it was taken at.
    iothread: Option<Arc<IoThread>>,
    iothread_gen: u64,
    completions: Vec<Completion>,
    slept_at: Option<Instant>,
    /// Used elements pushed but not yet notified, and the thread-local queues they are on.
    unsignalled: usize,
    unsignalled_queues: u64,
}

/// How long stopping a ring waits for requests that are being worked on (not for
/// requests held by an error stop, which are let go at once).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Most chains taken from one ring per pass, and most used elements pushed before the
/// frontend is notified while it keeps adding requests. Small batches let the
/// frontend reap completions and refill the ring while the iothread works on the rest
/// (a pipeline across two CPUs instead of a lock-step exchange of whole rings): on
/// null-co at queue depth 32 this doubled throughput over one notification per
/// drained ring (docs/performance.md).
const POP_BATCH: usize = 4;
const NOTIFY_BATCH: usize = 4;

thread_local! {
    static LOOP: RefCell<LoopState> = RefCell::new(LoopState::default());
}

impl Drop for LoopState {
    fn drop(&mut self) {
        // The worker thread exits: the iothread falls back to its parked thread.
        if let Some(t) = &self.iothread {
            t.detach_worker(current_tid());
        }
    }
}

/// One frontend connection's device.
pub struct BlkDevice {
    shared: Arc<ExportShared>,
    mem: GuestMemoryAtomic<Memory>,
    /// Worker threads (one per iothread of the export when the connection began).
    threads: usize,
    /// Per worker thread: an eventfd that wakes it (resume, iothread change).
    wake: Vec<EventFd>,
    /// Per queue: requests in flight, held requests, ring generations.
    queues: Arc<QueueStates>,
    /// Set once the frontend is gone: no more requests are popped.
    disconnected: AtomicBool,
    /// Our own handle on the backend channel, for CONFIG_CHANGE_MSG.
    channel: Mutex<Option<BackendChannel>>,
    /// The inflight region, when the frontend negotiated INFLIGHT_SHMFD.
    inflight: RwLock<Option<Arc<InflightRegion>>>,
}

impl BlkDevice {
    pub fn new(shared: Arc<ExportShared>, mem: GuestMemoryAtomic<Memory>) -> io::Result<Self> {
        let threads = shared.iothreads().len().max(1);
        let wake = (0..threads)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<io::Result<Vec<_>>>()?;
        let queues = Arc::new(QueueStates::new(usize::from(shared.num_queues)));
        shared.frontend_gone.store(false, Ordering::SeqCst);
        Ok(BlkDevice {
            shared,
            mem,
            threads,
            wake,
            queues,
            disconnected: AtomicBool::new(false),
            channel: Mutex::new(None),
            inflight: RwLock::new(None),
        })
    }

    /// Wakes every worker thread for one pass.
    pub fn wake_all(&self) {
        for fd in &self.wake {
            let _ = fd.write(1);
        }
    }

    /// The epoll token of the wake eventfds (kick tokens are below the queue count).
    fn wake_event(&self) -> u64 {
        u64::from(self.shared.num_queues) + 2
    }

    /// Takes the iothread identity and polling parameters this worker thread has now
    /// (at the first pass, and after `x-blockdev-set-iothread`).
    fn sync_iothread(&self, thread: usize) {
        let gen = self.shared.iothread_gen.load(Ordering::Acquire);
        let current = LOOP.with(|l| {
            let l = l.borrow();
            l.iothread.is_some() && l.iothread_gen == gen
        });
        if current {
            return;
        }
        let Some(t) = self.shared.iothreads().get(thread).cloned() else {
            return;
        };
        let tid = current_tid();
        LOOP.with(|l| {
            let mut l = l.borrow_mut();
            if let Some(old) = l.iothread.take() {
                old.detach_worker(tid);
            }
            t.attach_worker(tid);
            l.poll = Some(PollState::new(t.poll_params()));
            l.iothread = Some(t);
            l.iothread_gen = gen;
        });
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

    /// The epoll token of the io_uring eventfd.
    fn uring_event(&self) -> u64 {
        u64::from(self.shared.num_queues) + 1
    }

    /// Global queue index of the thread's `i`-th vring.
    fn queue_index(&self, thread: usize, i: usize) -> usize {
        i * self.threads + thread
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
    /// requests.
    fn pop_requests(
        &self,
        vring: &Vring,
        queue: usize,
        mem: &Arc<Memory>,
        lim: &DeviceLimits,
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
        let avail = match q.avail_idx(mem.as_ref(), Ordering::Acquire) {
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
            self.spawn_request(req, queue, gen, mem);
        }
        let pending = usize::from(pending.0) + n;
        while n < POP_BATCH && pending > n {
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.as_ref()) else {
                // Entries are available but the head could not be read.
                drop(state);
                self.break_ring(
                    vring,
                    queue,
                    format_args!("cannot read an available ring entry"),
                );
                break;
            };
            let head = chain.head_index();
            // A chain that is not one (a loop, a bad index or indirect table, memory
            // that cannot be read) means a broken driver: as QEMU, the device stops
            // the ring until it is reset, and returns nothing for it.
            if let Err(e) = chain::walk(mem, table, size, head, max_descs, &mut walked) {
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
            self.spawn_request(req, queue, gen, mem);
        }
        n
    }

    fn spawn_request(&self, req: Request, queue: usize, gen: u64, mem: &Arc<Memory>) {
        self.queues.in_flight[queue].fetch_add(1, Ordering::AcqRel);
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        executor::spawn(execute(
            self.shared.clone(),
            self.queues.clone(),
            mem.clone(),
            req,
            queue,
            gen,
        ));
    }

    /// The inflight region, if the frontend gave one.
    fn inflight(&self) -> Option<Arc<InflightRegion>> {
        self.inflight
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Pushes finished requests to their used rings; notification is left to
    /// [`BlkDevice::notify`]. Returns how many were pushed.
    fn complete(&self, vrings: &[Arc<Vring>]) -> usize {
        let done = LOOP.with(|l| std::mem::take(&mut l.borrow_mut().completions));
        let n = done.len();
        if n == 0 {
            return 0;
        }
        let mut dirty = 0u64;
        let inflight = self.inflight();
        for c in &done {
            let local = c.queue / self.threads;
            // A ring stopped since the request was popped belongs to the frontend again:
            // the request is not pushed (it stays in the inflight region, if there is
            // one, and is resubmitted when the ring starts again).
            let current = self.queues.gen(c.queue) == c.gen;
            if let (true, Some(v)) = (current, vrings.get(local)) {
                let track = inflight.as_ref().and_then(|r| r.queue(c.queue));
                let mut st = v.lock();
                if let Some(t) = &track {
                    t.pre_put(c.head);
                }
                let r = st.add_used(c.head, c.len);
                if let (Some(t), Ok(())) = (&track, &r) {
                    t.post_put(c.head, st.get_queue().next_used());
                }
                drop(st);
                if let Err(e) = r {
                    crate::limited_log!(
                        self.shared.log_limits.ring,
                        log::Level::Error,
                        "export {}: queue {}: cannot return descriptor {}: {e}",
                        self.shared.id,
                        c.queue,
                        c.head
                    );
                }
                dirty |= 1 << local;
            }
            self.queues.in_flight[c.queue].fetch_sub(1, Ordering::AcqRel);
            self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(log) = self.queues.dirty_log() {
            for (i, v) in vrings.iter().enumerate() {
                if dirty & (1 << i) != 0 {
                    log_used_ring(&log, &v.lock());
                }
            }
        }
        LOOP.with(|l| {
            let mut l = l.borrow_mut();
            l.unsignalled_queues |= dirty;
            l.unsignalled += n;
            // Keep the buffer's allocation for the next round.
            if l.completions.is_empty() {
                let mut v = done;
                v.clear();
                l.completions = v;
            }
        });
        n
    }

    /// Notifies the frontend of used elements pushed since the last notification.
    fn notify(&self, vrings: &[Arc<Vring>], thread: usize) {
        let dirty = LOOP.with(|l| {
            let mut l = l.borrow_mut();
            l.unsignalled = 0;
            std::mem::take(&mut l.unsignalled_queues)
        });
        for (i, v) in vrings.iter().enumerate() {
            if dirty & (1 << i) == 0 {
                continue;
            }
            let mut st = v.lock();
            if st.needs_notification().unwrap_or(true) {
                if let Err(e) = st.signal_used_queue() {
                    crate::limited_log!(
                        self.shared.log_limits.ring,
                        log::Level::Warn,
                        "export {}: cannot notify queue {}: {e}",
                        self.shared.id,
                        self.queue_index(thread, i)
                    );
                }
            }
        }
    }

    /// One pass of the iothread loop; returns whether anything happened.
    ///
    /// Each pass takes at most [`POP_BATCH`] chains per ring. The frontend is notified
    /// once [`NOTIFY_BATCH`] used elements are waiting, or when a pass finds the rings
    /// empty; a frontend that waits for completions thus hears at once, and a busy one
    /// is woken per small batch rather than per request.
    fn iterate(&self, vrings: &[Arc<Vring>], thread: usize, lim: &DeviceLimits) -> bool {
        // Load the memory table on every pass: the frontend may add regions
        // (VHOST_USER_ADD_MEM_REG) at any time, and new requests may use them.
        let mem = &self.mem.memory().into_inner();
        let mut popped = 0;
        {
            let _gate = PopGate::enter(&self.shared);
            if self.accepting() {
                for (i, v) in vrings.iter().enumerate() {
                    popped += self.pop_requests(v, self.queue_index(thread, i), mem, lim);
                }
            }
        }
        if popped > 0 {
            // The new requests start (and are accounted from) this pass's time; an
            // idle polling pass reads no clock.
            clock::tick();
        }
        let mut progress = popped + executor::run_ready();
        if let Err(e) = uring::submit() {
            log::error!("io_uring submit failed: {e}");
        }
        let reaped = uring::reap();
        if reaped > 0 {
            // Completions found now are accounted at this time.
            clock::tick();
        }
        progress += reaped;
        progress += executor::run_ready();
        let _ = uring::submit();
        progress += self.complete(vrings);
        let pending = LOOP.with(|l| l.borrow().unsignalled);
        if pending > 0 && (popped == 0 || pending >= NOTIFY_BATCH) {
            self.notify(vrings, thread);
        }
        progress > 0
    }

    /// Enables or disables the frontend's kicks on the thread's live, unbroken rings;
    /// when enabling, returns whether any of them has entries waiting.
    fn set_notifications(&self, vrings: &[Arc<Vring>], thread: usize, on: bool) -> bool {
        let mut waiting = false;
        let log = self.queues.dirty_log();
        for (i, v) in vrings.iter().enumerate() {
            if self.queues.is_broken(self.queue_index(thread, i)) {
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
            if let Some(log) = &log {
                log_used_ring(log, &st);
            }
        }
        waiting
    }

    /// The iothread loop body: run until idle, polling adaptively before sleeping.
    fn run(&self, vrings: &[Arc<Vring>], thread: usize) {
        let now = Instant::now();
        let window = LOOP.with(|l| {
            let mut l = l.borrow_mut();
            let slept = l.slept_at.take();
            let poll = l
                .poll
                .get_or_insert_with(|| PollState::new(PollParams::default()));
            if let Some(t) = slept {
                poll.after_sleep(now.duration_since(t).as_nanos() as u64);
            }
            poll.window()
        });
        let lim = self.limits();
        self.set_notifications(vrings, thread, false);
        uring::set_eventfd_enabled(false);
        let mut last = now;
        loop {
            if self.iterate(vrings, thread, &lim) {
                last = Instant::now();
                continue;
            }
            if window > Duration::ZERO && last.elapsed() < window {
                std::hint::spin_loop();
                continue;
            }
            // Going to sleep: re-arm notifications, then look once more so that nothing
            // that arrived in between is left without a wake-up.
            uring::set_eventfd_enabled(true);
            let mut again = self.iterate(vrings, thread, &lim);
            // Entries left in a ring only count as work while requests are taken; a
            // stopped or disconnected device leaves them where they are.
            if self.set_notifications(vrings, thread, true) && self.accepting() {
                again = true;
            }
            if !again {
                break;
            }
            self.set_notifications(vrings, thread, false);
            uring::set_eventfd_enabled(false);
            last = Instant::now();
        }
        self.notify(vrings, thread);
        LOOP.with(|l| l.borrow_mut().slept_at = Some(last));
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

/// Starts accounting a request: its record and, for writes, the end of its range.
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
struct Origin {
    queues: Arc<QueueStates>,
    queue: usize,
    gen: u64,
}

impl Origin {
    /// Whether the frontend has stopped the ring since the request was popped.
    fn ring_stopped(&self) -> bool {
        self.queues.gen(self.queue) != self.gen
    }
}

/// Waits for `cont` after an error stop: `true` to retry, `false` to give up because
/// the export is going away, its frontend has gone or stopped the request's ring.
struct Resumed<'a> {
    shared: &'a ExportShared,
    origin: &'a Origin,
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
async fn perform_with_policy(shared: &ExportShared, origin: &Origin, op: &Op) -> bool {
    loop {
        let gen = shared.blk.resume_gen();
        let Err(e) = perform(shared, op).await else {
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
    }
}

/// Performs one request and queues its completion on this iothread.
async fn execute(
    shared: Arc<ExportShared>,
    queues: Arc<QueueStates>,
    mem: Arc<Memory>,
    req: Request,
    queue: usize,
    gen: u64,
) {
    let origin = Origin { queues, queue, gen };
    let Request {
        head,
        status_addr,
        data_in_len,
        data_in,
        req_type,
        op,
    } = req;
    let status = match op {
        Ok(op) => {
            let acct = op_acct(&op);
            let ok = perform_with_policy(&shared, &origin, &op).await;
            if let Some((acct, end)) = acct {
                shared.blk.stats().done(acct, ok, end);
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
            e.status()
        }
    };
    let len = match status_addr {
        // The ring was taken back meanwhile: the buffers are the driver's again.
        _ if origin.ring_stopped() => 0,
        Some(addr) => {
            let log = origin.queues.dirty_log();
            if let (Some(log), true) = (&log, status == VIRTIO_BLK_S_OK as u8) {
                for &(gpa, len) in &data_in {
                    log.mark(gpa, len);
                }
            }
            let written = request::write_status(&mem, addr, status);
            if let (Some(log), Ok(())) = (&log, &written) {
                log.mark(addr.0, 1);
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
    LOOP.with(|l| {
        l.borrow_mut().completions.push(Completion {
            queue,
            head,
            len,
            gen: origin.gen,
        })
    });
}

impl QueueDevice for BlkDevice {
    fn num_queues(&self) -> usize {
        usize::from(self.shared.num_queues)
    }

    fn max_queue_size(&self) -> u16 {
        self.shared.queue_size
    }

    fn threads(&self) -> usize {
        self.threads
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
        if let Some(fd) = self.wake.get(queue % self.threads) {
            let _ = fd.write(1);
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

    fn thread_fds(&self, thread: usize) -> io::Result<Vec<(RawFd, u64)>> {
        let wake = self
            .wake
            .get(thread)
            .ok_or_else(|| io::Error::other(format!("no worker thread {thread}")))?;
        // Creates this thread's io_uring.
        let uring = uring::eventfd()?;
        // One pass at the start: take the iothread identity before the first request.
        let _ = wake.write(1);
        Ok(vec![
            (uring, self.uring_event()),
            (wake.as_raw_fd(), self.wake_event()),
        ])
    }

    fn handle_event(&self, thread: usize, token: u64, vrings: &[Arc<Vring>]) {
        if token == self.uring_event() {
            uring::clear_eventfd();
        } else if token == self.wake_event() {
            if let Some(fd) = self.wake.get(thread) {
                let _ = fd.read();
            }
            wake_held();
        }
        self.sync_iothread(thread);
        self.run(vrings, thread);
    }

    fn thread_exit(&self, _thread: usize) {
        // Requests this thread still runs give up where they wait (the frontend is
        // gone); the thread's io_uring then waits for what the kernel still does.
        wake_held();
        let _ = executor::run_ready();
    }
}

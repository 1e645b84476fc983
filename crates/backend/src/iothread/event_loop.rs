//! The event loop of an iothread: one thread that serves every source attached to it
//! (the vrings of any number of exports), its io_uring completions and timers, and the
//! tasks of its executor (requests, jobs).
//!
//! The loop sleeps in epoll on:
//! - its wake eventfd: mail from other threads (attach, detach, tasks to spawn) and
//!   wake-ups of its sources (`cont`, a ring started);
//! - the io_uring completion eventfd, which is also the executor's remote wake-up;
//! - the descriptors sources register (the kick eventfds of rings).
//!
//! A wake-up runs passes until the loop is idle: each pass lets every source take new
//! work, runs ready tasks, submits and reaps io_uring operations, and lets every source
//! finish its work (push used elements, notify in batches). Before it sleeps the loop
//! polls all of its sources and completions for one adaptive window
//! ([`PollState`]): one window per wake-up, whatever woke it and however many sources
//! it serves; the window yields the CPU every [`POLL_YIELD_EVERY`] to any thread
//! waiting for it, and is skipped while [`DEEP_IN_FLIGHT`] io_uring operations are in
//! flight. Sources' own notifications (ring kicks) and the completion eventfd
//! are off while the loop polls, and re-armed, then looked at once more, before it
//! sleeps.
//!
//! Sources live on the loop thread only (`Rc`); other threads reach the loop through
//! [`EventLoop::call`] and [`EventLoop::post`].

use crate::metrics::counters::LoopCounters;
use blocklayer::aio::poll::{PollParams, PollState};
use blocklayer::aio::{clock, executor, uring};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// The `sub` a source's [`Source::event`] gets when the loop was woken for it.
pub const WAKE_SUB: u32 = u32::MAX;

/// Epoll tokens of the loop's own descriptors (source tokens have a nonzero id above
/// bit 32).
const WAKE_TOKEN: u64 = 1;
const URING_TOKEN: u64 = 2;

/// A polling window gives the CPU away this often, if another thread is waiting for
/// it. The kernel's own busy polling (NAPI) stops when the scheduler wants the CPU
/// (`need_resched`); a user thread cannot see that, and `sched_yield` is the nearest
/// it has: it returns at once when nothing else is runnable on the CPU. Where clients
/// and iothreads share few cores, a window that holds on to its CPU delays the very
/// client thread whose next request it is waiting for (docs/performance.md, "Polling
/// that yields": null-co qd1 on 4 queues / 2 iothreads, about 25% less CPU per I/O
/// and more IOPS).
const POLL_YIELD_EVERY: Duration = Duration::from_micros(2);

/// With this many io_uring reads and writes in flight the loop does not poll before it
/// sleeps (whichever of its exports they belong to: a queue-depth-1 export beside a
/// deep one waits for a wake-up too): the device has queued work, so a completion
/// noticed a few microseconds later (on the completion eventfd) costs no throughput,
/// whereas spinning until it comes costs a core. On a loop device at 256 KiB and queue depth 16 the window took a third
/// of the daemon's CPU per request for the same IOPS (docs/performance.md, "Guest memory
/// registered with io_uring"); at queue depth 1 and 2 (one or two operations per
/// iothread) polling is what makes requests fast, and stays.
const DEEP_IN_FLIGHT: usize = 8;

/// A wake-up that lasts (a loop that never sleeps under load) publishes its busy time
/// and io_uring figures this often, so that the metrics move while it runs.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// Source ids, unique for the life of the process (a late event for a detached source
/// finds nothing).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Something an event loop serves.
pub trait Source {
    /// A descriptor the source registered with `sub` is readable, or the loop was woken
    /// for its sources ([`WAKE_SUB`]).
    fn event(&self, sub: u32);
    /// A wake-up begins (before its first pass).
    fn begin(&self) {}
    /// Takes new work (pops requests); returns how much.
    fn poll(&self) -> usize;
    /// Finishes work done in this pass (pushes completions; notifies when enough are
    /// waiting, or when `idle`: no source took new work in this pass). Returns how much.
    fn complete(&self, idle: bool) -> usize;
    /// Sends the notifications still owed (the loop is going to sleep).
    fn notify(&self);
    /// Turns the source's own wake-ups (ring kicks) on or off. Turning them on returns
    /// whether work is already waiting.
    fn set_notifications(&self, on: bool) -> bool;
    /// The source is detached from the loop.
    fn detached(&self) {}
}

type Mail = Box<dyn FnOnce() + Send>;

/// What other threads hold of a loop.
pub struct EventLoop {
    name: String,
    epoll: Epoll,
    wake: EventFd,
    /// Mail for the loop's thread; `None` once the thread has exited (mail posted then
    /// is dropped, so a caller waiting for its answer hears that it will not come).
    mail: Mutex<Option<Vec<Mail>>>,
    has_mail: AtomicBool,
    /// Set by [`EventLoop::wake`]: the sources get a [`WAKE_SUB`] event.
    woken: AtomicBool,
    stop: AtomicBool,
    tid: AtomicI32,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Wake-ups, busy and polling time (`--metrics`), written by the loop's thread.
    counters: LoopCounters,
}

/// The loop thread's own state.
struct Local {
    sources: HashMap<u64, Rc<dyn Source>>,
    /// The same sources, for passes (rebuilt when one is attached or detached).
    list: Rc<[Rc<dyn Source>]>,
    poll: PollState,
    slept_at: Option<Instant>,
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
}

fn with_local<R>(f: impl FnOnce(&mut Local) -> R) -> Option<R> {
    LOCAL.with(|l| l.borrow_mut().as_mut().map(f))
}

/// The epoll token of a source's descriptor.
fn token(id: u64, sub: u32) -> u64 {
    (id << 32) | u64::from(sub)
}

impl EventLoop {
    /// Starts a loop on a thread named `name`, polling with `params`.
    pub fn start(name: &str, params: PollParams) -> io::Result<Arc<EventLoop>> {
        let epoll = Epoll::new()?;
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE_TOKEN),
        )?;
        let lp = Arc::new(EventLoop {
            name: name.to_string(),
            epoll,
            wake,
            mail: Mutex::new(Some(Vec::new())),
            has_mail: AtomicBool::new(false),
            woken: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            tid: AtomicI32::new(0),
            thread: Mutex::new(None),
            counters: LoopCounters::default(),
        });
        let (tx, rx) = mpsc::channel();
        let me = lp.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || me.run(params, tx))?;
        match rx.recv() {
            Ok(Ok(tid)) => lp.tid.store(tid, Ordering::Release),
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(io::Error::other(format!("iothread {name} did not start")));
            }
        }
        *lp.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
        Ok(lp)
    }

    /// The kernel thread id of the loop's thread.
    pub fn tid(&self) -> i32 {
        self.tid.load(Ordering::Acquire)
    }

    /// The loop's wake-up counters.
    pub fn counters(&self) -> &LoopCounters {
        &self.counters
    }

    /// Whether the caller runs on this loop's thread.
    pub fn is_current(&self) -> bool {
        crate::iothread::current_tid() == self.tid()
    }

    /// Runs `f` on the loop's thread at its next wake-up (or pass), without waiting.
    /// Returns `false` (and drops `f`) if the loop has stopped.
    pub fn post(&self, f: impl FnOnce() + Send + 'static) -> bool {
        let mut mail = self.mail.lock().unwrap_or_else(|p| p.into_inner());
        let Some(m) = mail.as_mut() else {
            return false;
        };
        m.push(Box::new(f));
        drop(mail);
        self.has_mail.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        true
    }

    /// Runs `f` on the loop's thread and returns its result (at once when called on
    /// that thread); `None` if the loop has stopped.
    pub fn call<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
        if self.is_current() {
            return Some(f());
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.post(move || {
            let _ = tx.send(f());
        });
        rx.recv().ok()
    }

    /// Replaces the loop's polling parameters (QEMU's `aio_context_set_poll_params`:
    /// the adaptive window starts again from zero).
    pub fn set_poll_params(&self, params: PollParams) -> bool {
        self.post(move || {
            with_local(|l| l.poll = PollState::new(params));
        })
    }

    /// Wakes the loop: each of its sources gets a [`WAKE_SUB`] event, then a pass runs.
    pub fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        let _ = self.wake.write(1);
    }

    /// Attaches the source `make` builds on the loop's thread; returns its id, for
    /// [`EventLoop::register`] and [`EventLoop::detach`].
    pub fn attach(
        &self,
        make: impl FnOnce() -> Rc<dyn Source> + Send + 'static,
    ) -> io::Result<u64> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        self.call(move || {
            let src = make();
            with_local(|l| {
                l.sources.insert(id, src);
                l.rebuild();
            });
        })
        .ok_or_else(|| io::Error::other(format!("{} has stopped", self.name)))?;
        Ok(id)
    }

    /// Detaches source `id` (its descriptors should be unregistered first). Returns
    /// once the loop no longer serves it; its [`Source::detached`] has run.
    pub fn detach(&self, id: u64) {
        self.call(move || {
            let src = with_local(|l| {
                let s = l.sources.remove(&id);
                l.rebuild();
                s
            })
            .flatten();
            if let Some(s) = src {
                s.detached();
            }
        });
    }

    /// Has the loop watch `fd` for source `id`, which gets `sub` in its events.
    pub fn register(&self, fd: RawFd, id: u64, sub: u32) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token(id, sub)),
        )
    }

    /// Stops watching `fd` (before it is closed).
    pub fn unregister(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    /// Stops the loop and waits for its thread (which first waits for its io_uring
    /// operations). Sources still attached are detached.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            if t.thread().id() == std::thread::current().id() {
                return;
            }
            if t.join().is_err() {
                log::error!("iothread {} panicked", self.name);
            }
        }
    }

    fn run(self: Arc<Self>, params: PollParams, started: mpsc::Sender<io::Result<i32>>) {
        // Creates the thread's io_uring; its eventfd is also the executor's remote
        // wake-up.
        let setup = uring::eventfd().and_then(|fd| {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, URING_TOKEN),
            )
        });
        if let Err(e) = setup {
            let _ = started.send(Err(e));
            return;
        }
        LOCAL.with(|l| {
            *l.borrow_mut() = Some(Local {
                sources: HashMap::new(),
                list: Rc::from(Vec::new()),
                poll: PollState::new(params),
                slept_at: None,
            })
        });
        let _running = blocklayer::aio::LoopRunning::enter();
        let _ = started.send(Ok(crate::iothread::current_tid()));
        let mut events = vec![EpollEvent::default(); 64];
        while !self.stop.load(Ordering::Acquire) {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("iothread {}: epoll_wait: {e}", self.name);
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let now = clock::tick();
            with_local(|l| {
                if let Some(t) = l.slept_at.take() {
                    l.poll.after_sleep(now.duration_since(t).as_nanos() as u64);
                }
            });
            for ev in &events[..n] {
                match ev.data() {
                    WAKE_TOKEN => {
                        let _ = self.wake.read();
                    }
                    URING_TOKEN => uring::clear_eventfd(),
                    t => {
                        let (id, sub) = (t >> 32, t as u32);
                        if let Some(s) = with_local(|l| l.sources.get(&id).cloned()).flatten() {
                            s.event(sub);
                        }
                    }
                }
            }
            self.mail_and_wakes();
            self.passes(now);
        }
        // Detach what is left; tasks see their sources gone, and the io_uring waits
        // for its operations when the thread's engine is dropped.
        let left = with_local(|l| {
            let v: Vec<_> = l.sources.drain().map(|(_, s)| s).collect();
            l.rebuild();
            v
        })
        .unwrap_or_default();
        for s in left {
            s.detached();
        }
        let left = self.mail.lock().unwrap_or_else(|p| p.into_inner()).take();
        for m in left.unwrap_or_default() {
            m();
        }
        let _ = executor::run_ready();
        LOCAL.with(|l| l.borrow_mut().take());
    }

    /// Runs the mail, and the sources' wake-up events.
    fn mail_and_wakes(&self) {
        if self.has_mail.swap(false, Ordering::AcqRel) {
            let mail = self
                .mail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
                .map(std::mem::take)
                .unwrap_or_default();
            for m in mail {
                m();
            }
        }
        if self.woken.swap(false, Ordering::AcqRel) {
            for s in self.sources().iter() {
                s.event(WAKE_SUB);
            }
        }
    }

    fn sources(&self) -> Rc<[Rc<dyn Source>]> {
        with_local(|l| l.list.clone()).unwrap_or_else(|| Rc::from(Vec::new()))
    }

    /// Runs passes until idle, polling for one window before re-arming wake-ups;
    /// the loop woke at `woke`.
    fn passes(&self, woke: Instant) {
        let mut srcs = self.sources();
        let window = with_local(|l| l.poll.window()).unwrap_or_default();
        for s in srcs.iter() {
            s.begin();
            s.set_notifications(false);
        }
        uring::set_eventfd_enabled(false);
        let mut last = Instant::now();
        let mut yielded = last;
        let mut published = woke;
        loop {
            if self.has_mail.load(Ordering::Acquire) || self.woken.load(Ordering::Acquire) {
                self.mail_and_wakes();
                let now = self.sources();
                if !Rc::ptr_eq(&now, &srcs) {
                    srcs = now;
                    for s in srcs.iter() {
                        s.begin();
                        s.set_notifications(false);
                    }
                }
            }
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if pass(&srcs) {
                last = Instant::now();
                if last.saturating_duration_since(published) >= PUBLISH_EVERY {
                    self.counters
                        .busy_for(last.saturating_duration_since(published));
                    published = last;
                    let (fixed_ops, pinned) = uring::fixed_stats();
                    self.counters.set_fixed(fixed_ops, pinned);
                }
                continue;
            }
            if window > Duration::ZERO && uring::io_in_flight() < DEEP_IN_FLIGHT {
                let now = Instant::now();
                if now.saturating_duration_since(last) < window {
                    if now.saturating_duration_since(yielded) >= POLL_YIELD_EVERY {
                        // SAFETY: plain system call without arguments.
                        unsafe { libc::sched_yield() };
                        yielded = Instant::now();
                    }
                    std::hint::spin_loop();
                    continue;
                }
            }
            // Going to sleep: re-arm wake-ups, then look once more so that nothing that
            // arrived in between is left without one.
            uring::set_eventfd_enabled(true);
            let mut again = pass(&srcs);
            for s in srcs.iter() {
                again |= s.set_notifications(true);
            }
            if !again {
                break;
            }
            for s in srcs.iter() {
                s.set_notifications(false);
            }
            uring::set_eventfd_enabled(false);
            last = Instant::now();
        }
        uring::set_eventfd_enabled(true);
        for s in srcs.iter() {
            s.notify();
        }
        with_local(|l| l.slept_at = Some(last));
        // One clock read per wake-up, for the metrics.
        let end = Instant::now();
        self.counters.woke_up(
            end.saturating_duration_since(published),
            end.saturating_duration_since(last),
        );
        let (fixed_ops, pinned) = uring::fixed_stats();
        self.counters.set_fixed(fixed_ops, pinned);
    }
}

/// One pass over the loop's sources, tasks and io_uring; whether anything happened.
fn pass(srcs: &[Rc<dyn Source>]) -> bool {
    let mut popped = 0;
    for s in srcs {
        popped += s.poll();
    }
    if popped > 0 {
        // New requests start (and are accounted from) this pass's time; an idle
        // polling pass reads no clock.
        clock::tick();
    }
    let mut progress = popped + executor::run_ready();
    if let Err(e) = uring::submit() {
        log::error!("io_uring submit failed: {e}");
    }
    let reaped = uring::reap();
    if reaped > 0 {
        clock::tick();
    }
    progress += reaped;
    progress += executor::run_ready();
    let _ = uring::submit();
    for s in srcs {
        progress += s.complete(popped == 0);
    }
    progress > 0
}

impl Local {
    fn rebuild(&mut self) {
        self.list = self.sources.values().cloned().collect::<Vec<_>>().into();
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

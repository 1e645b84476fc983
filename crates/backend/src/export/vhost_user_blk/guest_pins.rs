//! `pin-guest-memory=on`: the frontend's memory regions registered with the io_uring of
//! each iothread that serves the export's rings ([`blocklayer::aio::fixed`]).
//!
//! Pinning a region takes time in proportion to its size (seconds for a fresh 2 GiB
//! memfd on a loaded development machine), so it is not done on the iothread, whose
//! other exports would wait that long. When the memory table changes, the iothread
//! keeps the regions it has registered already (another reference, kept alive by the
//! new table; nothing pinned) and lets go of the rest at once; a helper thread pins
//! the new regions in a ring of its own and wakes the iothread, which takes the
//! buffers over by cloning them into its ring ([`fixed::can_clone`]; on a kernel that
//! cannot, it registers them itself, as before). Until then requests into the new
//! regions pin their pages per request, as without the option.
//!
//! One staging runs at a time per ring set. What it pinned is matched to the table
//! current when it ends, by address and length (a staging keeps its table's mappings,
//! so a region of the current table at the same address is the same mapping): a table
//! that changed meanwhile loses nothing that is still in it, and what is left is staged
//! next. A region over the process's limit, or whose staging failed, is tried again at
//! the first pass a second or more later; one the kernel refuses is not, until the
//! table changes. A staging stops before its next buffer when its ring set goes away,
//! or when the table no longer has any of its regions.

use super::request::Memory;
use crate::iothread::event_loop::EventLoop;
use blocklayer::aio::fixed::{self, FixedError, Pinned, Staged};
use blocklayer::aio::iovec::Keepalive;
use blocklayer::aio::{affinity, uring};
use std::cell::{Cell, RefCell};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// How long a region over the process's limit (or whose staging failed) waits before
/// it is tried again.
const RETRY_LATER: Duration = Duration::from_secs(1);

/// A region: host address and length.
type Range = (usize, usize);

/// One ring set's registrations (lives on its iothread).
pub struct GuestPins {
    export: String,
    /// Woken when a staging is done.
    event_loop: Weak<EventLoop>,
    /// The registrations of the current table's regions.
    pinned: RefCell<Vec<(Range, Pinned)>>,
    /// The table they are for, and its generation.
    gen: Cell<Option<u64>>,
    mem: RefCell<Option<Arc<Memory>>>,
    /// Regions of the table may need registering (it changed, a staging ended).
    dirty: Cell<bool>,
    /// A staging runs: its regions, what it leaves (and whether it has), its stop
    /// flag.
    staging: RefCell<Option<Vec<Range>>>,
    done: Arc<Mutex<Option<io::Result<Staged>>>>,
    ready: Arc<AtomicBool>,
    cancel: RefCell<Arc<AtomicBool>>,
    /// Regions of this table the kernel refused: not tried again.
    given_up: RefCell<Vec<Range>>,
    /// Regions over the process's limit, or whose staging failed: tried again at the
    /// first pass after `retry_at`.
    deferred: RefCell<Vec<Range>>,
    retry_at: Cell<Option<Instant>>,
    /// A failure was logged.
    failed: Cell<bool>,
}

/// Regions of `mem`.
fn ranges(mem: &Memory) -> Vec<Range> {
    mem.iter()
        .map(|r| {
            (
                r.as_ptr() as usize,
                usize::try_from(r.len()).unwrap_or(usize::MAX),
            )
        })
        .collect()
}

impl GuestPins {
    pub fn new(export: String, event_loop: Weak<EventLoop>) -> Self {
        GuestPins {
            export,
            event_loop,
            pinned: RefCell::new(Vec::new()),
            gen: Cell::new(None),
            mem: RefCell::new(None),
            dirty: Cell::new(false),
            staging: RefCell::new(None),
            done: Arc::new(Mutex::new(None)),
            ready: Arc::new(AtomicBool::new(false)),
            cancel: RefCell::new(Arc::new(AtomicBool::new(false))),
            given_up: RefCell::new(Vec::new()),
            deferred: RefCell::new(Vec::new()),
            retry_at: Cell::new(None),
            failed: Cell::new(false),
        }
    }

    /// Brings the registrations up to date with table `gen` (`memory` gives the
    /// current table and the generation it is, at least `gen`), and takes over what a
    /// helper thread has pinned. Called at the top of each pass: with nothing to do it
    /// costs a few loads.
    pub fn refresh(&self, gen: u64, memory: impl FnOnce() -> (u64, Arc<Memory>)) {
        if self.ready.load(Ordering::Acquire) {
            self.ready.store(false, Ordering::Relaxed);
            let done = self.done.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(d) = done {
                let regions = self.staging.borrow_mut().take().unwrap_or_default();
                self.dirty.set(true);
                self.take_over(d, regions);
            }
        }
        if self.gen.get() != Some(gen) {
            let (g, mem) = memory();
            self.new_table(g, mem);
        }
        if !self.dirty.get() {
            match self.retry_at.get() {
                Some(t) if Instant::now() >= t => {
                    self.retry_at.set(None);
                    self.deferred.borrow_mut().clear();
                }
                _ => return,
            }
        }
        if self.staging.borrow().is_some() {
            // Looked at again when it ends.
            return;
        }
        self.dirty.set(false);
        let Some(mem) = self.mem.borrow().clone() else {
            return;
        };
        let todo: Vec<Range> = {
            let pinned = self.pinned.borrow();
            let (given_up, deferred) = (self.given_up.borrow(), self.deferred.borrow());
            ranges(&mem)
                .into_iter()
                .filter(|r| {
                    !pinned.iter().any(|(p, _)| p == r)
                        && !given_up.contains(r)
                        && !deferred.contains(r)
                })
                .collect()
        };
        if todo.is_empty() {
            return;
        }
        if fixed::can_clone() {
            self.stage(mem, todo);
        } else {
            self.pin_here(&mem, &todo);
        }
    }

    /// Regions of the current table are tried again a while from now.
    fn defer(&self, r: Range) {
        self.deferred.borrow_mut().push(r);
        if self.retry_at.get().is_none() {
            self.retry_at.set(Some(Instant::now() + RETRY_LATER));
        }
    }

    /// The frontend's table is now `mem`: keeps the registrations of the regions in
    /// it (kept mapped by `mem` from now on), lets go of the others.
    fn new_table(&self, gen: u64, mem: Arc<Memory>) {
        let keep: Keepalive = mem.clone();
        let mut kept = Vec::new();
        for r in ranges(&mem) {
            // SAFETY: the region is a shared read-write mapping of `mem`, which the
            // registration keeps from now on.
            if let Some(p) = unsafe { uring::share(r.0 as *mut u8, r.1, &keep) } {
                kept.push((r, p));
            }
        }
        // The previous table's registrations go (ranges in both stay, through `kept`).
        *self.pinned.borrow_mut() = kept;
        self.given_up.borrow_mut().clear();
        self.deferred.borrow_mut().clear();
        self.retry_at.set(None);
        // A staging of nothing the new table has is of no use.
        let now = ranges(&mem);
        if let Some(staged) = self.staging.borrow().as_ref() {
            if !staged.iter().any(|r| now.contains(r)) {
                self.cancel.borrow().store(true, Ordering::Relaxed);
            }
        }
        *self.mem.borrow_mut() = Some(mem);
        self.gen.set(Some(gen));
        self.dirty.set(true);
    }

    /// Has a helper thread pin `todo`, regions of `mem`.
    fn stage(&self, mem: Arc<Memory>, todo: Vec<Range>) {
        /// Leaves the staging's outcome and wakes the iothread, also if the pinning
        /// panicked (the ring set would otherwise wait for it forever).
        struct Finish {
            done: Arc<Mutex<Option<io::Result<Staged>>>>,
            ready: Arc<AtomicBool>,
            event_loop: Weak<EventLoop>,
            result: Option<io::Result<Staged>>,
        }
        impl Drop for Finish {
            fn drop(&mut self) {
                let r = self
                    .result
                    .take()
                    .unwrap_or_else(|| Err(io::Error::other("the pinning thread panicked")));
                *self.done.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                self.ready.store(true, Ordering::Release);
                if let Some(l) = self.event_loop.upgrade() {
                    l.wake();
                }
            }
        }
        let cancel = Arc::new(AtomicBool::new(false));
        *self.cancel.borrow_mut() = cancel.clone();
        let finish = Finish {
            done: self.done.clone(),
            ready: self.ready.clone(),
            event_loop: self.event_loop.clone(),
            result: None,
        };
        let keep: Keepalive = mem.clone();
        let regions = todo.clone();
        let spawned = std::thread::Builder::new()
            .name("vubd-pin".into())
            .spawn(move || {
                // The whole guard moves here (not only the field set below).
                let mut finish = finish;
                affinity::use_process_cpus();
                let t0 = Instant::now();
                // SAFETY: the regions lie in `keep`'s mappings (regions of the table it
                // is), which the staging holds while their pages are pinned;
                // `pin-guest-memory=on` is the operator's word that the frontend never
                // replaces the pages behind them.
                let r = unsafe { Staged::new(&regions, keep, &cancel) };
                log::debug!(
                    "{} region(s) of {} MiB pinned by a helper thread in {:?}",
                    regions.len(),
                    regions.iter().map(|r| r.1).sum::<usize>() >> 20,
                    t0.elapsed()
                );
                finish.result = Some(r);
            });
        match spawned {
            Ok(_) => *self.staging.borrow_mut() = Some(todo),
            Err(e) => {
                // The outcome the dropped closure left is not one.
                self.done.lock().unwrap_or_else(|p| p.into_inner()).take();
                self.ready.store(false, Ordering::Relaxed);
                log::warn!(
                    "export {}: cannot start a thread to pin guest memory ({e}); pinning on \
                     the iothread",
                    self.export
                );
                self.pin_here(&mem, &todo);
            }
        }
    }

    /// Takes over what a staging pinned of the current table's regions; the rest goes
    /// with it.
    fn take_over(&self, done: io::Result<Staged>, regions: Vec<Range>) {
        let mut staged = match done {
            Ok(s) => s,
            Err(e) => {
                self.failure(&FixedError::Kernel(e));
                for r in regions {
                    self.defer(r);
                }
                return;
            }
        };
        let Some(mem) = self.mem.borrow().clone() else {
            return;
        };
        let current = ranges(&mem);
        let keep: Keepalive = mem;
        let (mut bytes, mut n) = (0u64, 0);
        for (i, (r, _)) in staged.ranges().into_iter().enumerate() {
            if !current.contains(&r) || self.pinned.borrow().iter().any(|(p, _)| *p == r) {
                continue;
            }
            // SAFETY: the staging keeps the region's mapping while it lives, so the
            // current table's region at the same address and of the same length is
            // that mapping, which `keep` (the current table) keeps from now on.
            if self.record(r, unsafe { uring::adopt(&mut staged, i, &keep) }) {
                bytes += r.1 as u64;
                n += 1;
            }
        }
        // Whatever no table took is let go now, before anything is staged again.
        drop(staged);
        self.report(bytes, n);
    }

    /// Registers `regions` of `mem` from this thread (the iothread waits meanwhile).
    fn pin_here(&self, mem: &Arc<Memory>, regions: &[Range]) {
        let t0 = Instant::now();
        let keep: Keepalive = mem.clone();
        let (mut bytes, mut n) = (0u64, 0);
        for &r in regions {
            // SAFETY: a region of `mem`, which the registration keeps.
            if self.record(r, unsafe { uring::pin(r.0 as *mut u8, r.1, &keep) }) {
                bytes += r.1 as u64;
                n += 1;
            }
        }
        log::debug!(
            "export {}: {} region(s) registered on the iothread in {:?}",
            self.export,
            regions.len(),
            t0.elapsed()
        );
        self.report(bytes, n);
    }

    /// Keeps the registration of region `r`, or notes why there is none: a region
    /// over the process's limit is tried again a second later (at the first pass
    /// after), one the kernel refused is not
    /// (until the table changes), one a cancelled staging did not reach is staged
    /// again. Whether it is registered.
    fn record(&self, r: Range, result: Result<Pinned, FixedError>) -> bool {
        match result {
            Ok(p) => {
                self.pinned.borrow_mut().push((r, p));
                return true;
            }
            Err(FixedError::Cancelled) => {}
            Err(e @ FixedError::OverLimit { .. }) => {
                self.failure(&e);
                self.defer(r);
            }
            Err(e) => {
                self.failure(&e);
                self.given_up.borrow_mut().push(r);
            }
        }
        false
    }

    fn failure(&self, e: &FixedError) {
        if !self.failed.replace(true) {
            log::warn!(
                "export {}: cannot pin a guest memory region for I/O ({e}); requests into \
                 it pin their pages themselves",
                self.export
            );
        }
    }

    fn report(&self, bytes: u64, n: usize) {
        if n > 0 {
            log::info!(
                "export {}: {} MiB of guest memory in {n} region(s) pinned for I/O on this \
                 iothread",
                self.export,
                bytes >> 20
            );
        }
    }
}

impl Drop for GuestPins {
    fn drop(&mut self) {
        // A staging still running stops at its next region; what it pinned goes with it.
        self.cancel.borrow().store(true, Ordering::Relaxed);
    }
}

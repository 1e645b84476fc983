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
//! next. A region over the process's limit, refused for want of memory (the kernel's
//! count of pinned pages lags behind the daemon's), or whose staging failed, is tried
//! again at the first pass a second or more later; one the kernel refuses otherwise,
//! or that needs more buffers than the iothread's table has free, is not, until the
//! table changes. A staging gives a region up before its next buffer when the table no
//! longer has it, and all of them when its ring set goes away. At most
//! [`MAX_STAGINGS`] stagings run in the process at once (a frontend that reconnects in
//! a loop leaves helpers finishing a buffer behind it): a ring set that finds them all
//! taken waits as for the limit.

use super::request::Memory;
use crate::iothread::event_loop::EventLoop;
use blocklayer::aio::fixed::{self, FixedError, Pinned, Staged};
use blocklayer::aio::iovec::Keepalive;
use blocklayer::aio::{affinity, uring};
use std::cell::{Cell, RefCell};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// How long a region over the process's limit (or whose staging failed) waits before
/// it is tried again.
const RETRY_LATER: Duration = Duration::from_secs(1);

/// Helper threads pinning at once, in the whole process.
const MAX_STAGINGS: usize = 4;

/// Helper threads pinning now.
static STAGINGS: AtomicUsize = AtomicUsize::new(0);

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
    /// A staging runs: its regions, what it leaves (and whether it has), a stop flag
    /// per region.
    staging: RefCell<Option<Vec<Range>>>,
    done: Arc<Mutex<Option<io::Result<Staged>>>>,
    ready: Arc<AtomicBool>,
    cancel: RefCell<Arc<[AtomicBool]>>,
    /// Regions of this table the kernel refused, or too large for the free slots:
    /// not tried again.
    given_up: RefCell<Vec<Range>>,
    /// Regions refused for a while (over the process's limit, the kernel short of
    /// memory, every staging taken) or whose staging failed: tried again at the first
    /// pass after `retry_at`.
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
            cancel: RefCell::new(Arc::new([])),
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
        // The table first: a staging that ends takes nothing the new table lacks.
        if self.gen.get() != Some(gen) {
            let (g, mem) = memory();
            self.new_table(g, mem);
        }
        if self.ready.load(Ordering::Acquire) {
            self.ready.store(false, Ordering::Relaxed);
            let done = self.done.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(d) = done {
                let regions = self.staging.borrow_mut().take().unwrap_or_default();
                self.dirty.set(true);
                self.take_over(d, regions);
            }
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
        let todo = self.fitting(todo);
        if todo.is_empty() {
            return;
        }
        if fixed::can_clone() {
            self.stage(mem, todo);
        } else {
            self.pin_here(&mem, &todo);
        }
    }

    /// The regions of `todo` that this iothread's table has the slots for, in order;
    /// the others are given up until the table changes (pinning a region to find no
    /// room for it would take as long as pinning it for use, each time).
    fn fitting(&self, todo: Vec<Range>) -> Vec<Range> {
        let mut free = uring::fixed_free_slots();
        let mut fit = Vec::with_capacity(todo.len());
        for r in todo {
            let n = fixed::buffers_for(r.1);
            if n <= free {
                free -= n;
                fit.push(r);
            } else {
                self.failure(&FixedError::TableFull);
                self.given_up.borrow_mut().push(r);
            }
        }
        fit
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
        // A region of the staging that the new table lacks is of no use: what is not
        // pinned of it yet is given up.
        let now = ranges(&mem);
        if let Some(staged) = self.staging.borrow().as_ref() {
            let cancel = self.cancel.borrow();
            for (r, c) in staged.iter().zip(cancel.iter()) {
                if !now.contains(r) {
                    c.store(true, Ordering::Relaxed);
                }
            }
        }
        *self.mem.borrow_mut() = Some(mem);
        self.gen.set(Some(gen));
        self.dirty.set(true);
    }

    /// Has a helper thread pin `todo`, regions of `mem` (or defers them while
    /// [`MAX_STAGINGS`] run).
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
                STAGINGS.fetch_sub(1, Ordering::AcqRel);
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
        let started = STAGINGS.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_STAGINGS).then_some(n + 1)
        });
        if started.is_err() {
            log::debug!(
                "export {}: {MAX_STAGINGS} stagings of guest memory run; {} region(s) wait",
                self.export,
                todo.len()
            );
            for r in todo {
                self.defer(r);
            }
            return;
        }
        // Counted from here: the guard, made before anything else, gives it back.
        let finish = Finish {
            done: self.done.clone(),
            ready: self.ready.clone(),
            event_loop: self.event_loop.clone(),
            result: None,
        };
        let cancel: Arc<[AtomicBool]> = todo.iter().map(|_| AtomicBool::new(false)).collect();
        *self.cancel.borrow_mut() = cancel.clone();
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
    /// refused for a while ([`FixedError::is_transient`]) is tried again a second
    /// later (at the first pass after), one refused otherwise is not (until the table
    /// changes), one a cancelled staging did not reach is staged again if the table
    /// still has it. Whether it is registered.
    fn record(&self, r: Range, result: Result<Pinned, FixedError>) -> bool {
        match result {
            Ok(p) => {
                self.pinned.borrow_mut().push((r, p));
                return true;
            }
            Err(FixedError::Cancelled) => {}
            Err(e) if e.is_transient() => {
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
        // A staging still running stops at its next buffer; what it pinned goes with it.
        for c in self.cancel.borrow().iter() {
            c.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn pins() -> GuestPins {
        GuestPins::new("test".into(), Weak::new())
    }

    /// Regions are staged only while the table has slots for all their buffers (1 GiB
    /// each); one that does not fit is given up, the next that fits is still taken.
    #[test]
    fn regions_beyond_the_free_slots_are_not_pinned() {
        let p = pins();
        let gib = fixed::MAX_BUFFER;
        let free = uring::fixed_free_slots();
        assert_eq!(
            free,
            fixed::TABLE_SLOTS as usize,
            "no engine: every slot free"
        );
        let big = (0x1000_0000, (free - 10) * gib);
        let too_big = (0x2000_0000, 11 * gib);
        let small = (0x3000_0000, 10 * gib - 1);
        let fit = p.fitting(vec![big, too_big, small]);
        assert_eq!(fit, vec![big, small]);
        assert_eq!(*p.given_up.borrow(), vec![too_big]);
        assert!(p.failed.get(), "the refusal is logged");
        let huge = (0x4000_0000, (free + 1) * gib);
        assert!(p.fitting(vec![huge]).is_empty());
    }

    /// With every staging of the process taken, a ring set starts no helper: its
    /// regions wait a second, as over the pin limit. (It sets the process's count: no
    /// other unit test of this crate starts a staging.)
    #[test]
    fn regions_wait_while_every_staging_is_taken() {
        let p = pins();
        let mem = Arc::new(Memory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        let todo = ranges(&mem);
        let before = STAGINGS.swap(MAX_STAGINGS, Ordering::AcqRel);
        p.stage(mem, todo.clone());
        let after = STAGINGS.swap(before, Ordering::AcqRel);
        assert_eq!(after, MAX_STAGINGS, "no helper counted");
        assert!(p.staging.borrow().is_none(), "no helper started");
        assert_eq!(*p.deferred.borrow(), todo);
        assert!(p.retry_at.get().is_some_and(|t| t > Instant::now()));
    }
}

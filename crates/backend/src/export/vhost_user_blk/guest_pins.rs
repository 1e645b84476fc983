//! `pin-guest-memory=on`: the frontend's memory regions registered with the io_uring of
//! each iothread that serves the export's rings ([`blocklayer::aio::fixed`]).
//!
//! Pinning a region takes time in proportion to its size (about 50 ms for 512 MiB on
//! the development machine), so it is not done on the iothread, whose other exports
//! would wait that long: when the memory table changes, the iothread keeps the regions
//! it has registered already (another reference, no pinning) and lets go of the rest at
//! once; a helper thread pins the new regions in a ring of its own and wakes the
//! iothread, which takes the buffers over by cloning them into its ring (Linux 6.13+;
//! on a kernel without that, it registers them itself, as before). Until then requests
//! into the new regions pin their pages per request, as without the option. One
//! staging runs at a time per ring set; a table that changes meanwhile is staged after
//! it.

use super::request::Memory;
use crate::iothread::event_loop::EventLoop;
use blocklayer::aio::fixed::{FixedError, Pinned, Staged};
use blocklayer::aio::iovec::Keepalive;
use blocklayer::aio::uring;
use std::cell::{Cell, RefCell};
use std::sync::{Arc, Mutex, Weak};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Regions of a memory table generation to be pinned: their start and length.
struct Wanted {
    gen: u64,
    mem: Arc<Memory>,
    regions: Vec<(usize, usize)>,
}

/// Regions a helper thread pinned for a memory table generation.
struct Done {
    gen: u64,
    mem: Arc<Memory>,
    staged: Vec<Result<Staged, FixedError>>,
}

/// One ring set's registrations (lives on its iothread).
pub struct GuestPins {
    export: String,
    /// Woken when a staging is done.
    event_loop: Weak<EventLoop>,
    /// The registrations of the current table's regions.
    pinned: RefCell<Vec<Pinned>>,
    /// The generation `pinned` was last brought up to date for.
    gen: Cell<Option<u64>>,
    /// A staging runs.
    staging: Cell<bool>,
    /// Regions of a newer table that wait for the running staging to end.
    wanted: RefCell<Option<Wanted>>,
    /// Where a helper thread leaves its work.
    done: Arc<Mutex<Option<Done>>>,
    /// A failure was logged.
    failed: Cell<bool>,
    /// The kernel cannot clone buffers between rings: register on the iothread.
    no_clone: Cell<bool>,
}

impl GuestPins {
    pub fn new(export: String, event_loop: Weak<EventLoop>) -> Self {
        GuestPins {
            export,
            event_loop,
            pinned: RefCell::new(Vec::new()),
            gen: Cell::new(None),
            staging: Cell::new(false),
            wanted: RefCell::new(None),
            done: Arc::new(Mutex::new(None)),
            failed: Cell::new(false),
            no_clone: Cell::new(false),
        }
    }

    /// Brings the registrations up to date with table `gen` (`memory` gives it), and
    /// takes over what a helper thread has pinned. Called at the top of each pass.
    pub fn refresh(&self, gen: u64, memory: impl FnOnce() -> Arc<Memory>) {
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(d) = done {
            self.staging.set(false);
            if d.gen == gen && self.gen.get() == Some(gen) {
                self.adopt(&d.mem, d.staged);
            }
            // A stale one is dropped: its pages are let go with its rings.
            let wanted = self.wanted.borrow_mut().take();
            if let Some(w) = wanted.filter(|w| w.gen == gen) {
                self.stage(w.gen, w.mem, w.regions);
            }
        }
        if self.gen.get() == Some(gen) {
            return;
        }
        let mem = memory();
        self.gen.set(Some(gen));
        let keep: Keepalive = mem.clone();
        let mut kept = Vec::new();
        let mut new = Vec::new();
        for r in mem.iter() {
            let len = usize::try_from(r.len()).unwrap_or(usize::MAX);
            // SAFETY: the region is a shared read-write mapping that lives as long as
            // `mem`, which the registration keeps from now on.
            match unsafe { uring::share(r.as_ptr(), len, &keep) } {
                Some(p) => kept.push(p),
                None => new.push((r.as_ptr() as usize, len)),
            }
        }
        // The previous table's registrations go (ranges in both stay, through `kept`).
        *self.pinned.borrow_mut() = kept;
        if new.is_empty() {
            return;
        }
        if self.no_clone.get() {
            self.pin_here(&mem, &new);
        } else if self.staging.get() {
            *self.wanted.borrow_mut() = Some(Wanted {
                gen,
                mem,
                regions: new,
            });
        } else {
            self.stage(gen, mem, new);
        }
    }

    /// Has a helper thread pin `regions` of `mem` (table `gen`).
    fn stage(&self, gen: u64, mem: Arc<Memory>, regions: Vec<(usize, usize)>) {
        let done = self.done.clone();
        let event_loop = self.event_loop.clone();
        let keep: Keepalive = mem.clone();
        let table = mem.clone();
        let todo = regions.clone();
        let spawned = std::thread::Builder::new()
            .name("vubd-pin".into())
            .spawn(move || {
                let t0 = std::time::Instant::now();
                let staged: Vec<_> = todo
                    .iter()
                    .map(|&(at, len)| {
                        // SAFETY: the region lies in `keep`'s mappings (a region of
                        // the table it is), which the staging holds while the pages
                        // are pinned; `pin-guest-memory=on` is the operator's word that
                        // the frontend never replaces the pages behind it.
                        unsafe { Staged::new(at as *mut u8, len, keep.clone()) }
                    })
                    .collect();
                log::debug!(
                    "{} region(s) of {} MiB pinned by a helper thread in {:?}",
                    todo.len(),
                    todo.iter().map(|r| r.1).sum::<usize>() >> 20,
                    t0.elapsed()
                );
                *done.lock().unwrap_or_else(|p| p.into_inner()) = Some(Done {
                    gen,
                    mem: table,
                    staged,
                });
                if let Some(l) = event_loop.upgrade() {
                    l.wake();
                }
            });
        match spawned {
            Ok(_) => self.staging.set(true),
            Err(e) => {
                log::warn!(
                    "export {}: cannot start a thread to pin guest memory ({e}); pinning on \
                     the iothread",
                    self.export
                );
                self.pin_here(&mem, &regions);
            }
        }
    }

    /// Takes over what a helper thread pinned of `mem`.
    fn adopt(&self, mem: &Arc<Memory>, staged: Vec<Result<Staged, FixedError>>) {
        let (mut bytes, mut n) = (0u64, 0);
        let mut here = Vec::new();
        for s in staged {
            let s = match s {
                Ok(s) => s,
                Err(e) => {
                    self.failure(&e);
                    continue;
                }
            };
            let range = s.range();
            match uring::adopt(s) {
                Ok(p) => {
                    bytes += range.1 as u64;
                    n += 1;
                    self.pinned.borrow_mut().push(p);
                }
                Err(FixedError::Kernel(e)) => {
                    // Clone is refused as an invalid argument by kernels before 6.13.
                    if e.raw_os_error() == Some(libc::EINVAL) && !self.no_clone.replace(true) {
                        log::info!(
                            "export {}: this kernel cannot clone io_uring buffers ({e});                              guest memory is pinned on the iothread",
                            self.export
                        );
                    }
                    here.push(range);
                }
                Err(e) => self.failure(&e),
            }
        }
        self.report(bytes, n);
        if !here.is_empty() {
            self.pin_here(mem, &here);
        }
    }

    /// Registers `regions` of `mem` from this thread (the iothread waits meanwhile).
    fn pin_here(&self, mem: &Arc<Memory>, regions: &[(usize, usize)]) {
        let t0 = std::time::Instant::now();
        let keep: Keepalive = mem.clone();
        let (mut bytes, mut n) = (0u64, 0);
        for &(at, len) in regions {
            // SAFETY: as in `stage`: a region of `mem`, which the registration keeps.
            match unsafe { uring::pin(at as *mut u8, len, &keep) } {
                Ok(p) => {
                    bytes += len as u64;
                    n += 1;
                    self.pinned.borrow_mut().push(p);
                }
                Err(e) => self.failure(&e),
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

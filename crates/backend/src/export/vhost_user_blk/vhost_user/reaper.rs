//! Guest memory let go off the iothreads.
//!
//! A frontend's memory region is a shared mapping of its file (usually a memfd). Once
//! the frontend has exited, the daemon's mapping is the last reference to that file,
//! and dropping it frees every page of the file: about 0.8 s for 2 GiB on this
//! machine under load (docs/performance.md, "A frontend's memory freed off the
//! iothread"). Without care that happens on whichever thread drops the last
//! reference to the region: often an iothread (a request, or a registration of
//! `pin-guest-memory=on`, still holding the table), whose other exports wait as long;
//! or the vhost-user thread, which every frontend's messages wait for.
//!
//! So a connection keeps a reference to each region it mapped, with the region's
//! SIGBUS guard ([`super::sigbus`]). When the region leaves the memory table, or the
//! connection ends, both are handed here: a helper thread holds them until it has
//! the last reference, then drops them; the unmapping and the freeing of the pages
//! happen there. The guard goes with the mapping, not before it: a request still
//! using an old region is guarded against the frontend truncating it.
//!
//! The helper looks at what it holds every [`LOOK_EVERY`] (less often as nothing
//! goes) while it holds anything, and sleeps on a condition variable otherwise (an
//! idle daemon has no wake-ups).

use super::sigbus;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use vm_memory::GuestRegionMmap;

/// How often the helper looks whether what it holds is used elsewhere still, at first;
/// the wait doubles while nothing goes, up to [`LOOK_AT_MOST`] (a request stuck in a
/// hung backend may hold a table for long).
const LOOK_EVERY: Duration = Duration::from_millis(20);
const LOOK_AT_MOST: Duration = Duration::from_secs(1);

/// A mapped region of guest memory and its SIGBUS guard.
pub struct Held {
    region: Arc<GuestRegionMmap>,
    // Dropped after the region (fields drop in order): the guard outlives the mapping.
    _guard: Option<sigbus::Registration>,
}

impl Held {
    /// Guards `region` against truncation while it exists.
    pub fn new(region: &Arc<GuestRegionMmap>) -> Held {
        Held {
            region: region.clone(),
            _guard: sigbus::register(region.as_ptr(), region.size()),
        }
    }

    /// Whether this is `region`.
    pub fn is(&self, region: &GuestRegionMmap) -> bool {
        std::ptr::eq(&*self.region, region)
    }

    /// Whether nothing else holds the region any more.
    fn alone(&self) -> bool {
        Arc::strong_count(&self.region) == 1
    }
}

/// What the helper holds, and whether it runs.
struct Reaper {
    held: Mutex<Vec<Held>>,
    more: Condvar,
    started: Mutex<bool>,
}

static REAPER: Reaper = Reaper {
    held: Mutex::new(Vec::new()),
    more: Condvar::new(),
    started: Mutex::new(false),
};

/// Lets go of `regions`: a helper thread drops each once nothing else holds it. Where
/// the helper cannot be started, they are kept (guarded, mapped) until a later call
/// starts it.
pub fn release(regions: impl IntoIterator<Item = Held>) {
    let mut regions = regions.into_iter().peekable();
    if regions.peek().is_none() {
        return;
    }
    REAPER
        .held
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(regions);
    REAPER.more.notify_one();
    let mut started = REAPER.started.lock().unwrap_or_else(|p| p.into_inner());
    if !*started {
        match std::thread::Builder::new()
            .name("vubd-unmap".into())
            .spawn(run)
        {
            Ok(_) => *started = true,
            Err(e) => log::warn!(
                "cannot start the thread that unmaps guest memory ({e}); the regions a \
                 frontend let go of stay mapped until it can be started"
            ),
        }
    }
}

fn run() {
    let r = &REAPER;
    let mut wait = LOOK_EVERY;
    let mut held = r.held.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if held.is_empty() {
            wait = LOOK_EVERY;
            held = r.more.wait(held).unwrap_or_else(|p| p.into_inner());
            continue;
        }
        let (done, kept): (Vec<Held>, Vec<Held>) = held.drain(..).partition(Held::alone);
        *held = kept;
        if !done.is_empty() {
            // Unmapped (and freed, where the frontend has gone) without the lock held.
            drop(held);
            drop(done);
            wait = LOOK_EVERY;
            held = r.held.lock().unwrap_or_else(|p| p.into_inner());
            continue;
        }
        let (h, timeout) = r
            .more
            .wait_timeout(held, wait)
            .unwrap_or_else(|p| p.into_inner());
        held = h;
        // New regions look soon; old ones less and less often.
        wait = if timeout.timed_out() {
            (wait * 2).min(LOOK_AT_MOST)
        } else {
            LOOK_EVERY
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::GuestAddress;

    fn region() -> Arc<GuestRegionMmap> {
        let m = MmapRegionBuilder::new(4096).build().unwrap();
        Arc::new(GuestRegionMmap::new(m, GuestAddress(0)).unwrap())
    }

    /// A region handed over is dropped by the helper once nothing else holds it, and
    /// not before.
    #[test]
    fn regions_go_once_nobody_else_holds_them() {
        let (a, b) = (region(), region());
        let weak_a = Arc::downgrade(&a);
        let weak_b = Arc::downgrade(&b);
        assert!(Held::new(&a).is(&a) && !Held::new(&a).is(&b));
        release([Held::new(&a), Held::new(&b)]);
        drop(a);
        let wait = |w: &std::sync::Weak<GuestRegionMmap>| {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while w.strong_count() > 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            w.strong_count() == 0
        };
        assert!(wait(&weak_a), "a region nobody else holds is let go");
        std::thread::sleep(LOOK_EVERY * 5);
        assert_eq!(weak_b.strong_count(), 2, "a region still used is kept");
        drop(b);
        assert!(wait(&weak_b), "and let go once its last user has");
    }
}

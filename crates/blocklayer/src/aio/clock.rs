//! The iothread's clock for I/O accounting: the event loop reads the time once per
//! pass ([`tick`]) and every request started or completed in that pass uses it, so
//! statistics cost no clock read per request. Times are therefore measured at the
//! granularity of a loop pass (microseconds). A thread that never ticks (the control
//! thread) reads the real clock.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::Instant;

thread_local! {
    /// The pass's time, and the same as nanoseconds since [`epoch`].
    static NOW: Cell<Option<(Instant, u64)>> = const { Cell::new(None) };
}

/// The fixed point in time that [`now_ns`] counts from (the first use of the clock).
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds from [`epoch`] to `t` (0 before it).
pub fn ns_since_epoch(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// Reads the clock for this pass of the event loop and returns it.
pub fn tick() -> Instant {
    let now = Instant::now();
    let ns = ns_since_epoch(now);
    NOW.with(|n| n.set(Some((now, ns))));
    now
}

/// The time of this thread's current loop pass (the real time if it has none).
pub fn now() -> Instant {
    NOW.with(|n| n.get()).map_or_else(Instant::now, |(t, _)| t)
}

/// [`now`] as nanoseconds since [`epoch`]: what request accounting uses, so that a
/// request's time is one subtraction.
pub fn now_ns() -> u64 {
    NOW.with(|n| n.get())
        .map_or_else(|| ns_since_epoch(Instant::now()), |(_, ns)| ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_until_the_next_tick() {
        let t = tick();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(now(), t);
        assert_eq!(now_ns(), ns_since_epoch(t));
        assert!(tick() > t);
        assert!(now_ns() > ns_since_epoch(t));
        let other = std::thread::spawn(now).join().unwrap();
        assert!(other >= t);
    }
}

//! The iothread's clock for I/O accounting: the event loop reads the time once per
//! pass ([`tick`]) and every request started or completed in that pass uses it, so
//! statistics cost no clock read per request. Times are therefore measured at the
//! granularity of a loop pass (microseconds). A thread that never ticks (the control
//! thread) reads the real clock.

use std::cell::Cell;
use std::time::Instant;

thread_local! {
    static NOW: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Reads the clock for this pass of the event loop and returns it.
pub fn tick() -> Instant {
    let now = Instant::now();
    NOW.with(|n| n.set(Some(now)));
    now
}

/// The time of this thread's current loop pass (the real time if it has none).
pub fn now() -> Instant {
    NOW.with(|n| n.get()).unwrap_or_else(Instant::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_until_the_next_tick() {
        let t = tick();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(now(), t);
        assert!(tick() > t);
        let other = std::thread::spawn(now).join().unwrap();
        assert!(other >= t);
    }
}

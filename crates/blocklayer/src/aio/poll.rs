//! Adaptive polling of an iothread (QEMU's `poll-max-ns`, `poll-grow`, `poll-shrink`).
//!
//! Before going to sleep, an iothread keeps polling its queues and its io_uring
//! completions for up to `poll_ns`. The window adapts to how long the thread then
//! actually sleeps: if the next event came later than the window but within
//! `poll-max-ns`, polling a little longer would have caught it, so the window grows;
//! if it came later than `poll-max-ns`, polling is wasted CPU, so the window shrinks.
//! An idle iothread thus converges to a zero window and uses no CPU.
//!
//! One addition to QEMU's rule: the gap is measured from the last work done to the
//! next event, and a sleeping thread's gap includes the time it takes to be woken,
//! which in a VM (a halted vCPU woken by an IPI) can alone exceed `poll-max-ns`. A
//! window that only grows on gaps shorter than `poll-max-ns` then never opens. So when
//! the window is zero and the gap is still short (under [`PROBE_FACTOR`] times the
//! maximum: the thread is busy, not idle), the window is opened to the maximum as a
//! probe; if polling does not catch the next event, the usual shrink closes it again.

use std::time::Duration;

/// First window when growing from zero (QEMU starts at 4 us).
const INITIAL_NS: u64 = 4_000;

/// Gaps up to this many times `poll-max-ns` count as "busy" for probing.
pub const PROBE_FACTOR: u64 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollParams {
    /// 0 disables polling.
    pub max_ns: u64,
    /// Growth factor; 0 means 2.
    pub grow: u64,
    /// Shrink divisor; 0 means "drop to zero".
    pub shrink: u64,
}

impl Default for PollParams {
    fn default() -> Self {
        PollParams {
            max_ns: 32_768,
            grow: 0,
            shrink: 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct PollState {
    params: PollParams,
    poll_ns: u64,
}

impl PollState {
    pub fn new(params: PollParams) -> Self {
        PollState { params, poll_ns: 0 }
    }

    /// The current polling window.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.poll_ns)
    }

    pub fn window_ns(&self) -> u64 {
        self.poll_ns
    }

    /// Adapts the window to an idle gap of `block_ns` (from the last work done to the
    /// event that ended it).
    pub fn after_sleep(&mut self, block_ns: u64) {
        let p = self.params;
        if p.max_ns == 0 {
            self.poll_ns = 0;
        } else if block_ns <= self.poll_ns {
            // Polling would have caught it: the window is right.
        } else if block_ns > p.max_ns {
            self.poll_ns = if self.poll_ns == 0 && block_ns <= p.max_ns.saturating_mul(PROBE_FACTOR)
            {
                p.max_ns
            } else {
                self.poll_ns.checked_div(p.shrink).unwrap_or(0)
            };
        } else if self.poll_ns < p.max_ns {
            let grow = if p.grow == 0 { 2 } else { p.grow };
            self.poll_ns = if self.poll_ns == 0 {
                INITIAL_NS
            } else {
                self.poll_ns.saturating_mul(grow)
            }
            .min(p.max_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_within_max_and_shrinks_when_idle() {
        let mut s = PollState::new(PollParams::default());
        assert_eq!(s.window_ns(), 0);
        s.after_sleep(10_000);
        assert_eq!(s.window_ns(), 4_000);
        s.after_sleep(10_000);
        assert_eq!(s.window_ns(), 8_000);
        s.after_sleep(10_000);
        assert_eq!(s.window_ns(), 16_000);
        // Caught within the window: unchanged.
        s.after_sleep(9_000);
        assert_eq!(s.window_ns(), 16_000);
        s.after_sleep(30_000);
        assert_eq!(s.window_ns(), 32_000);
        s.after_sleep(32_700);
        assert_eq!(s.window_ns(), 32_768);
        // An idle period: drop to zero.
        s.after_sleep(5_000_000);
        assert_eq!(s.window_ns(), 0);
    }

    #[test]
    fn a_busy_thread_that_wakes_slowly_probes_with_the_full_window() {
        let mut s = PollState::new(PollParams::default());
        // 60 us gaps: over the maximum, but the thread is busy.
        s.after_sleep(60_000);
        assert_eq!(s.window_ns(), 32_768);
        // The probe did not catch the next event: closed again.
        s.after_sleep(60_000);
        assert_eq!(s.window_ns(), 0);
        // Idle gaps never probe.
        s.after_sleep(1_000_000);
        assert_eq!(s.window_ns(), 0);
    }

    #[test]
    fn shrink_divides_and_zero_max_disables() {
        let mut s = PollState::new(PollParams {
            max_ns: 100_000,
            grow: 4,
            shrink: 2,
        });
        s.after_sleep(50_000);
        s.after_sleep(50_000);
        assert_eq!(s.window_ns(), 16_000);
        s.after_sleep(1_000_000);
        assert_eq!(s.window_ns(), 8_000);
        let mut off = PollState::new(PollParams {
            max_ns: 0,
            ..PollParams::default()
        });
        off.after_sleep(1_000);
        assert_eq!(off.window_ns(), 0);
    }
}

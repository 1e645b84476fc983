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
//! Probes that fail in a row are spaced out (after the `n`-th, `2^n` busy gaps pass
//! without one, up to 64): a thread whose events come just later than the window
//! would otherwise spin a whole window for every other event, for nothing.

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

/// The most busy gaps skipped between two probes after probes kept failing.
const MAX_PROBE_SKIP: u32 = 64;

#[derive(Debug, Clone, Copy)]
pub struct PollState {
    params: PollParams,
    poll_ns: u64,
    /// The window is open as a probe, not grown into.
    probing: bool,
    /// Probes that failed in a row (no gap since was short enough to grow on).
    failed_probes: u32,
    /// Busy gaps still to pass before the next probe.
    probe_skip: u32,
}

impl PollState {
    pub fn new(params: PollParams) -> Self {
        PollState {
            params,
            poll_ns: 0,
            probing: false,
            failed_probes: 0,
            probe_skip: 0,
        }
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
            let busy = block_ns <= p.max_ns.saturating_mul(PROBE_FACTOR);
            if self.poll_ns == 0 && busy {
                self.probe();
            } else {
                if std::mem::take(&mut self.probing) {
                    // The probe polled for the whole window in vain: the next ones
                    // wait for more and more busy gaps, so that a thread whose events
                    // come just too late does not spin a window for every other one.
                    self.failed_probes = self.failed_probes.saturating_add(1);
                    self.probe_skip = 1u32
                        .checked_shl(self.failed_probes)
                        .unwrap_or(MAX_PROBE_SKIP)
                        .min(MAX_PROBE_SKIP);
                }
                self.poll_ns = self.poll_ns.checked_div(p.shrink).unwrap_or(0);
            }
        } else if self.poll_ns < p.max_ns {
            self.probing = false;
            self.failed_probes = 0;
            self.probe_skip = 0;
            let grow = if p.grow == 0 { 2 } else { p.grow };
            self.poll_ns = if self.poll_ns == 0 {
                INITIAL_NS
            } else {
                self.poll_ns.saturating_mul(grow)
            }
            .min(p.max_ns);
        }
    }

    /// Polling caught work that arrived while the thread spun in its window: the
    /// window pays, a probe included.
    pub fn caught(&mut self) {
        self.probing = false;
        self.failed_probes = 0;
        self.probe_skip = 0;
    }

    /// Opens the window to the maximum for a busy thread whose gaps are over it,
    /// unless recent probes failed and gaps are still to be skipped.
    fn probe(&mut self) {
        if self.probe_skip > 0 {
            self.probe_skip -= 1;
            return;
        }
        self.poll_ns = self.params.max_ns;
        self.probing = true;
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
    fn failed_probes_are_spaced_out() {
        let mut s = PollState::new(PollParams::default());
        // Gaps of 60 us, always just over the window: each failed probe doubles the
        // busy gaps skipped before the next, up to 64.
        let mut probes = Vec::new();
        for i in 0..200 {
            s.after_sleep(60_000);
            if s.window_ns() != 0 {
                probes.push(i);
            }
        }
        // Probe, failure, 2^n skipped gaps, probe...
        assert_eq!(&probes[..6], &[0, 4, 10, 20, 38, 72]);
        let gaps: Vec<_> = probes.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().skip(5).all(|g| *g == 66), "{gaps:?}");
        // A probe that catches work ends the series.
        while s.window_ns() == 0 {
            s.after_sleep(60_000);
        }
        s.caught();
        s.after_sleep(60_000);
        assert_eq!(s.window_ns(), 0);
        s.after_sleep(60_000);
        assert_eq!(s.window_ns(), 32_768);
        // This one fails: two busy gaps to skip. A gap short enough to grow on
        // ends the series too: the next probe is at once.
        s.after_sleep(60_000);
        assert_eq!(s.window_ns(), 0);
        s.after_sleep(10_000);
        assert_eq!(s.window_ns(), 4_000);
        s.after_sleep(100_000);
        assert_eq!(s.window_ns(), 0);
        s.after_sleep(60_000);
        assert_eq!(s.window_ns(), 32_768);
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

//! The part of a job its own thread and the control thread share: progress, speed,
//! and the requests (pause, cancel, complete) the job honours at its pause points.

use blocklayer::aio::clock;
use blocklayer::aio::uring::sleep_ns;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
/// QEMU's rate-limit slice: a job copies at most `speed / 10` bytes per 100 ms.
const SLICE: Duration = Duration::from_millis(100);

/// What cancellation was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    None = 0,
    /// `block-job-cancel force=false` on a ready mirror-like job: finish without
    /// the pivot (the job completes).
    Soft = 1,
    /// Abandon the job.
    Force = 2,
}

/// The job stopped at a pause point because it was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

#[derive(Debug)]
pub struct JobCore {
    pub id: String,
    offset: AtomicU64,
    len: AtomicU64,
    speed: AtomicU64,
    pause: AtomicBool,
    cancel: AtomicU8,
    complete: AtomicBool,
    busy: AtomicBool,
    /// The job's task while it waits at a pause point or in a sleep: every request
    /// from the control thread wakes it (no polling).
    waiter: Mutex<Option<Waker>>,
}

impl JobCore {
    pub fn new(id: &str, speed: u64) -> JobCore {
        JobCore {
            id: id.to_string(),
            offset: AtomicU64::new(0),
            len: AtomicU64::new(0),
            speed: AtomicU64::new(speed),
            pause: AtomicBool::new(false),
            cancel: AtomicU8::new(Cancel::None as u8),
            complete: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            waiter: Mutex::new(None),
        }
    }

    pub fn offset(&self) -> u64 {
        self.offset.load(Ordering::Acquire)
    }

    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    pub fn set_len(&self, len: u64) {
        self.len.store(len, Ordering::Release);
    }

    pub fn progress(&self, n: u64) {
        self.offset.fetch_add(n, Ordering::AcqRel);
    }

    pub fn speed(&self) -> u64 {
        self.speed.load(Ordering::Acquire)
    }

    pub fn set_speed(&self, s: u64) {
        self.speed.store(s, Ordering::Release);
        self.notify();
    }

    pub fn set_paused(&self, on: bool) {
        self.pause.store(on, Ordering::Release);
        self.notify();
    }

    /// Wakes the job if it waits (after a request changed what it waits for).
    fn notify(&self) {
        let w = self.waiter.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Waits until `done()` holds, re-checking only when the control thread makes a
    /// request (see [`JobCore::notify`]).
    async fn until(&self, done: impl Fn() -> bool) {
        Until { core: self, done }.await
    }

    pub fn is_pause_requested(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }

    pub fn request_cancel(&self, how: Cancel) {
        self.cancel.fetch_max(how as u8, Ordering::AcqRel);
        self.pause.store(false, Ordering::Release);
        self.notify();
    }

    pub fn cancel_requested(&self) -> Cancel {
        match self.cancel.load(Ordering::Acquire) {
            0 => Cancel::None,
            1 => Cancel::Soft,
            _ => Cancel::Force,
        }
    }

    pub fn request_complete(&self) {
        self.complete.store(true, Ordering::Release);
        self.notify();
    }

    pub fn complete_requested(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Whether the job is working now (not sleeping or paused): QMP's `busy`.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// QEMU's `job_pause_point`: waits while the job is paused; fails once a forced
    /// cancel (or any cancel, unless `soft_ok`) was asked for.
    pub async fn pause_point(&self, soft_ok: bool) -> Result<(), Cancelled> {
        loop {
            match self.cancel_requested() {
                Cancel::Force => return Err(Cancelled),
                Cancel::Soft if !soft_ok => return Err(Cancelled),
                _ => {}
            }
            if !self.is_pause_requested() {
                self.busy.store(true, Ordering::Release);
                return Ok(());
            }
            self.busy.store(false, Ordering::Release);
            self.until(|| self.cancel_requested() != Cancel::None || !self.is_pause_requested())
                .await;
        }
    }

    /// Sleeps `d` (the job is not busy meanwhile), waking early for a cancel, a
    /// pause, a completion request or a new speed (QEMU re-enters a job whose speed
    /// is set).
    pub async fn sleep(&self, d: Duration) {
        self.busy.store(false, Ordering::Release);
        let speed = self.speed();
        let timer = Box::pin(sleep_ns(d.as_nanos().min(u64::MAX as u128) as u64));
        let woken = Box::pin(self.until(|| {
            self.cancel_requested() != Cancel::None
                || self.is_pause_requested()
                || self.complete_requested()
                || self.speed() != speed
        }));
        First(timer, woken).await;
        self.busy.store(true, Ordering::Release);
    }
}

/// See [`JobCore::until`].
struct Until<'a, F: Fn() -> bool> {
    core: &'a JobCore,
    done: F,
}

impl<F: Fn() -> bool> Future for Until<'_, F> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if (self.done)() {
            return Poll::Ready(());
        }
        *self.core.waiter.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        // A request made before the waker was stored has not woken it: look again.
        if (self.done)() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Completes when the first of two futures does (the other is dropped: an io_uring
/// timer in flight is left to the engine, which keeps it until it completes).
struct First<A, B>(Pin<Box<A>>, Pin<Box<B>>);

impl<A: Future, B: Future> Future for First<A, B> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.1.as_mut().poll(cx).is_ready() || self.0.as_mut().poll(cx).is_ready() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// QEMU's job rate limit: `speed` bytes per second, accounted in slices of 100 ms.
#[derive(Debug)]
pub struct RateLimit {
    slice_end: Instant,
    dispatched: u64,
    /// The speed the slice was accounted at: a new speed starts a new slice.
    speed: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            slice_end: clock::now(),
            dispatched: 0,
            speed: 0,
        }
    }
}

impl RateLimit {
    /// Accounts `bytes` just copied at `speed` bytes/s (0: unlimited) and returns how
    /// long to wait before the next copy.
    pub fn account(&mut self, speed: u64, bytes: u64) -> Duration {
        if speed == 0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let quota = (speed / 10).max(1);
        if now >= self.slice_end || speed != self.speed {
            self.speed = speed;
            self.slice_end = now + SLICE;
            self.dispatched = 0;
        }
        self.dispatched += bytes;
        if self.dispatched < quota {
            return Duration::ZERO;
        }
        // Whole slices' worth of quota used up: wait for that many slices.
        let slices = self.dispatched / quota;
        let until = self.slice_end + SLICE * (slices.saturating_sub(1).min(u32::MAX as u64) as u32);
        self.slice_end = until + SLICE;
        self.dispatched = 0;
        until.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_spreads_copies_over_time() {
        let mut r = RateLimit::default();
        // 1 MiB/s: 104857 bytes per slice; a 64 KiB chunk passes, two do not.
        assert_eq!(r.account(1 << 20, 65536), Duration::ZERO);
        let d = r.account(1 << 20, 65536);
        assert!(d > Duration::ZERO && d <= SLICE, "{d:?}");
        // 10 MiB at 1 MiB/s: about ten seconds.
        let mut r = RateLimit::default();
        let d = r.account(1 << 20, 10 << 20);
        assert!(d >= Duration::from_millis(9_000), "{d:?}");
        assert_eq!(RateLimit::default().account(0, 1 << 30), Duration::ZERO);
    }
}

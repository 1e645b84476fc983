//! One large inline write at a time per memory-backed file.
//!
//! tmpfs takes the file's inode lock for every write, so two iothreads that write one
//! file inline run one after the other anyway. The kernel makes the second one wait
//! by spinning on the lock while the first copies (rwsem optimistic spinning): with
//! 1 MiB writes from two iothreads, about 110 us of CPU per write went into the spin.
//! The gate makes the second request wait in userspace instead, as a pending future:
//! its iothread goes on serving its other work, or sleeps, and the thread that
//! leaves the gate wakes it.
//!
//! The gate is held only across one synchronous system call, never across an await,
//! so a holder always makes progress and leaves it.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::{Poll, Waker};

#[derive(Debug, Default)]
pub(super) struct WriteGate {
    busy: AtomicBool,
    /// Requests waiting to enter; woken all at once when the holder leaves.
    waiters: Mutex<Vec<Waker>>,
}

/// Inside the gate until dropped.
pub(super) struct Entered<'a>(&'a WriteGate);

impl WriteGate {
    fn try_enter(&self) -> bool {
        self.busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Waits until no other write is inside, and enters.
    pub(super) async fn enter(&self) -> Entered<'_> {
        poll_fn(|cx| {
            if self.try_enter() {
                return Poll::Ready(());
            }
            let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            if !w.iter().any(|x| x.will_wake(cx.waker())) {
                w.push(cx.waker().clone());
            }
            drop(w);
            // The holder may have left between the failed attempt and the
            // registration, without seeing this waker: try once more.
            if self.try_enter() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        Entered(self)
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
        let woken = std::mem::take(&mut *self.0.waiters.lock().unwrap_or_else(|p| p.into_inner()));
        for w in woken {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aio::uring::block_on;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn one_writer_inside_at_a_time_and_no_wake_up_lost() {
        let gate = Arc::new(WriteGate::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let entries = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (gate, inside, entries) = (gate.clone(), inside.clone(), entries.clone());
                std::thread::spawn(move || {
                    block_on(async move {
                        for _ in 0..2000 {
                            let g = gate.enter().await;
                            assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                            // Long enough inside for the others to find it busy.
                            for _ in 0..100 {
                                std::hint::spin_loop();
                            }
                            std::thread::yield_now();
                            inside.fetch_sub(1, Ordering::SeqCst);
                            entries.fetch_add(1, Ordering::Relaxed);
                            drop(g);
                        }
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a thread failed");
        }
        assert_eq!(entries.load(Ordering::Relaxed), 8000);
        assert!(!gate.busy.load(Ordering::Relaxed));
    }
}

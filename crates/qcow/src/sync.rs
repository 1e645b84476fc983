//! Small runtime-independent synchronisation: an async mutex and a wait list.

use std::future::poll_fn;
use std::sync::Mutex;
use std::task::{Poll, Waker};

/// A list of wakers to wake when some shared condition may have changed.
#[derive(Debug, Default)]
pub struct WaitList {
    wakers: Mutex<Vec<Waker>>,
}

impl WaitList {
    /// Registers a waker.
    pub fn register(&self, w: &Waker) {
        let mut v = self.wakers.lock().unwrap();
        if !v.iter().any(|x| x.will_wake(w)) {
            v.push(w.clone());
        }
    }
    /// Wakes every registered waker.
    pub fn wake_all(&self) {
        let v = std::mem::take(&mut *self.wakers.lock().unwrap());
        for w in v {
            w.wake();
        }
    }
}

/// An async mutex without data: held across awaits by metadata updates.
#[derive(Debug, Default)]
pub struct AsyncLock {
    locked: Mutex<bool>,
    waiters: WaitList,
}

/// Holds an [`AsyncLock`] until dropped.
#[derive(Debug)]
pub struct AsyncLockGuard<'a> {
    lock: &'a AsyncLock,
}

impl AsyncLock {
    /// Waits for and takes the lock.
    pub async fn lock(&self) -> AsyncLockGuard<'_> {
        poll_fn(|cx| {
            let mut l = self.locked.lock().unwrap();
            if *l {
                self.waiters.register(cx.waker());
                Poll::Pending
            } else {
                *l = true;
                Poll::Ready(())
            }
        })
        .await;
        AsyncLockGuard { lock: self }
    }
}

impl Drop for AsyncLockGuard<'_> {
    fn drop(&mut self) {
        *self.lock.locked.lock().unwrap() = false;
        self.lock.waiters.wake_all();
    }
}

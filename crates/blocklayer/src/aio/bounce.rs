//! Bounce memory: a hard bound per thread on the buffers that requests copy through
//! (alignment read-modify-write on O_DIRECT files, guest buffers at unaligned
//! addresses).
//!
//! A guest controls request sizes and buffer addresses, so the bytes it can make the
//! daemon allocate must not follow from them. The request path bounces in pieces of
//! at most [`BOUNCE_CHUNK`] bytes, one piece at a time per request, and every piece
//! takes a lease on its thread's budget of [`BOUNCE_BUDGET`] bytes first; when the
//! budget is spent, requests wait (asynchronously, woken by the lease that frees
//! room). Allocation is fallible: a failed allocation fails the request with ENOMEM
//! instead of aborting the process.
//!
//! A lease larger than the whole budget (a node whose alignment exceeds it) is granted
//! when nothing else is leased, so such a request waits but never deadlocks.

use super::iovec::AlignedBuf;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// The largest piece a request bounces at once.
pub const BOUNCE_CHUNK: u64 = 1 << 20;
/// Bounce bytes leased at once per thread, at most.
pub const BOUNCE_BUDGET: usize = 64 << 20;

#[derive(Default)]
struct State {
    in_use: usize,
    peak: usize,
    waiters: Vec<Waker>,
}

/// One thread's budget. Leases point back to it, so a lease dropped on another
/// thread still returns its bytes to the right budget.
pub struct Budget {
    limit: usize,
    state: Mutex<State>,
}

/// Bytes of spare buffers kept per thread for reuse (see [`recycle`]), at most.
const SPARE_BYTES: usize = 1 << 20;

thread_local! {
    static BUDGET: RefCell<Option<Arc<Budget>>> = const { RefCell::new(None) };
    static SPARE: RefCell<Vec<AlignedBuf>> = const { RefCell::new(Vec::new()) };
}

/// Keeps `buf` for reuse by [`Lease::alloc_reused`] on this thread, or drops it if
/// the thread's spares already hold [`SPARE_BYTES`]. Reuse spares the zeroing of a
/// fresh buffer: a pass over its memory, as costly as a cipher pass for encrypted
/// requests that overwrite the whole buffer anyway.
pub fn recycle(buf: AlignedBuf) {
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        let held: usize = s.iter().map(AlignedBuf::len).sum();
        if held + buf.len() <= SPARE_BYTES {
            s.push(buf);
        }
    })
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            state: Mutex::new(State::default()),
        })
    }

    /// This thread's budget.
    pub fn current() -> Arc<Budget> {
        BUDGET.with(|b| {
            b.borrow_mut()
                .get_or_insert_with(|| Budget::new(BOUNCE_BUDGET))
                .clone()
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `len` bytes fit in the budget and leases them.
    pub fn lease(self: &Arc<Self>, len: usize) -> LeaseFuture {
        LeaseFuture {
            budget: self.clone(),
            len,
        }
    }

    /// Bytes leased now.
    pub fn in_use(&self) -> usize {
        self.lock().in_use
    }

    /// The most bytes ever leased at once.
    pub fn peak(&self) -> usize {
        self.lock().peak
    }
}

/// The future of [`Budget::lease`].
pub struct LeaseFuture {
    budget: Arc<Budget>,
    len: usize,
}

impl Future for LeaseFuture {
    type Output = Lease;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Lease> {
        let mut st = self.budget.lock();
        let fits = st.in_use == 0 || st.in_use.saturating_add(self.len) <= self.budget.limit;
        if fits {
            st.in_use += self.len;
            st.peak = st.peak.max(st.in_use);
            Poll::Ready(Lease {
                budget: self.budget.clone(),
                len: self.len,
            })
        } else {
            st.waiters.push(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// Bytes of a budget held until dropped.
pub struct Lease {
    budget: Arc<Budget>,
    len: usize,
}

impl Lease {
    /// A zeroed buffer of `len` bytes (at most the leased size) aligned to `align`;
    /// `None` if the allocator has no memory for it.
    pub fn alloc(&self, len: usize, align: usize) -> Option<AlignedBuf> {
        debug_assert!(len <= self.len);
        AlignedBuf::try_zeroed(len, align)
    }

    /// Like [`Lease::alloc`], but the buffer may be a spare one given back with
    /// [`recycle`] on this thread, holding the bytes of an earlier request: for callers
    /// that overwrite all of it before reading it.
    pub fn alloc_reused(&self, len: usize, align: usize) -> Option<AlignedBuf> {
        debug_assert!(len <= self.len);
        let spare = SPARE.with(|s| {
            let mut s = s.borrow_mut();
            let i = s.iter().position(|b| {
                b.len() == len && (b.as_slice().as_ptr() as usize).is_multiple_of(align.max(1))
            })?;
            Some(s.swap_remove(i))
        });
        spare.or_else(|| self.alloc(len, align))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let waiters = {
            let mut st = self.budget.lock();
            st.in_use -= self.len;
            std::mem::take(&mut st.waiters)
        };
        // Every waiter looks again; those that still do not fit queue up anew.
        for w in waiters {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aio::executor;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn leases_wait_for_room_and_wake_in_turn() {
        let budget = Budget::new(3 << 20);
        let done = Rc::new(Cell::new(0));
        let b = budget.clone();
        let d = done.clone();
        crate::aio::uring::block_on(async move {
            let first = b.lease(2 << 20).await;
            let second = b.lease(1 << 20).await;
            assert_eq!(b.in_use(), 3 << 20);
            // A third lease must wait for room.
            let b2 = b.clone();
            let d2 = d.clone();
            executor::spawn(async move {
                let _l = b2.lease(2 << 20).await;
                d2.set(d2.get() + 1);
            });
            executor::run_ready();
            assert_eq!(d.get(), 0, "leased beyond the budget");
            drop(second);
            executor::run_ready();
            assert_eq!(d.get(), 0, "1 MiB free is not room for 2 MiB");
            drop(first);
            executor::run_ready();
            assert_eq!(d.get(), 1);
        });
        assert_eq!(budget.in_use(), 0);
        assert_eq!(budget.peak(), 3 << 20);
    }

    #[test]
    fn an_oversized_lease_is_granted_alone() {
        let budget = Budget::new(1 << 20);
        let b = budget.clone();
        crate::aio::uring::block_on(async move {
            let l = b.lease(4 << 20).await;
            let buf = l.alloc(4 << 20, 4096).expect("4 MiB");
            assert_eq!(buf.len(), 4 << 20);
        });
        assert_eq!(budget.in_use(), 0);
    }
}

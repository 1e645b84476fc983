//! The iothread's asynchronous machinery: a single-threaded executor and an io_uring
//! engine, both thread-local. A request is a future polled on the iothread that
//! started it; io_uring completions wake it. Nothing here is shared between threads.

pub mod affinity;
pub mod bounce;
pub mod clock;
pub mod executor;
pub mod fixed;
pub mod iovec;
pub mod poll;
pub mod task_box;
pub mod uring;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};

static EVENT_LOOPS: AtomicUsize = AtomicUsize::new(0);

/// Held by an iothread's event loop while it runs: [`event_loops`] counts them.
pub struct LoopRunning(());

impl LoopRunning {
    pub fn enter() -> LoopRunning {
        EVENT_LOOPS.fetch_add(1, Ordering::Relaxed);
        LoopRunning(())
    }
}

impl Drop for LoopRunning {
    fn drop(&mut self) {
        EVENT_LOOPS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many iothread event loops this process runs (each one may keep a core busy).
pub fn event_loops() -> usize {
    EVENT_LOOPS.load(Ordering::Relaxed)
}

/// A boxed future that stays on its iothread (the unit of recursion across graph edges).
pub type LocalBoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

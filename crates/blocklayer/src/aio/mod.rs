//! The iothread's asynchronous machinery: a single-threaded executor and an io_uring
//! engine, both thread-local. A request is a future polled on the iothread that
//! started it; io_uring completions wake it. Nothing here is shared between threads.

pub mod bounce;
pub mod clock;
pub mod executor;
pub mod iovec;
pub mod poll;
pub mod task_box;
pub mod uring;

use std::future::Future;
use std::pin::Pin;

/// A boxed future that stays on its iothread (the unit of recursion across graph edges).
pub type LocalBoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

//! A single-threaded executor, one per iothread (thread-local).
//!
//! Tasks are `!Send` futures. A waker carries only the task's slot number; waking pushes
//! that number on the thread's ready list. Wakers are only ever woken on the thread that
//! owns the task (io_uring completions are reaped there), and a wake for a finished or
//! reused slot merely causes one spurious poll, which futures tolerate.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

type Task = Pin<Box<dyn Future<Output = ()>>>;

#[derive(Default)]
struct Executor {
    /// Task slots; `None` while the task is being polled or when the slot is free.
    tasks: Vec<Option<Task>>,
    /// Whether a slot holds a live task (also true while it is being polled).
    live: Vec<bool>,
    free: Vec<usize>,
    ready: VecDeque<usize>,
}

thread_local! {
    static EXECUTOR: RefCell<Executor> = RefCell::new(Executor::default());
}

fn raw_waker(id: usize) -> RawWaker {
    // The data pointer is not a pointer: it is the task's slot number.
    RawWaker::new(id as *const (), &VTABLE)
}

fn waker_clone(data: *const ()) -> RawWaker {
    raw_waker(data as usize)
}

fn waker_wake(data: *const ()) {
    let id = data as usize;
    // `try_with`: a wake during thread teardown is dropped.
    let _ = EXECUTOR.try_with(|e| {
        if let Ok(mut e) = e.try_borrow_mut() {
            e.ready.push_back(id);
        } else {
            log::error!("executor: wake while the executor is borrowed");
        }
    });
}

fn waker_drop(_: *const ()) {}

static VTABLE: RawWakerVTable =
    RawWakerVTable::new(waker_clone, waker_wake, waker_wake, waker_drop);

fn waker_for(id: usize) -> Waker {
    // SAFETY: the vtable functions never dereference the data pointer (it is an integer)
    // and are safe to call from any thread, as the RawWaker contract requires.
    unsafe { Waker::from_raw(raw_waker(id)) }
}

/// Spawns a task on this thread's executor. It is polled on the next `run_ready`.
pub fn spawn(fut: impl Future<Output = ()> + 'static) {
    EXECUTOR.with(|e| {
        let mut e = e.borrow_mut();
        let task: Task = Box::pin(fut);
        let id = match e.free.pop() {
            Some(id) => {
                e.tasks[id] = Some(task);
                e.live[id] = true;
                id
            }
            None => {
                e.tasks.push(Some(task));
                e.live.push(true);
                e.tasks.len() - 1
            }
        };
        e.ready.push_back(id);
    });
}

/// Polls every ready task until none is ready. Returns how many polls were made.
pub fn run_ready() -> usize {
    let mut polls = 0;
    loop {
        let next = EXECUTOR.with(|e| {
            let mut e = e.borrow_mut();
            while let Some(id) = e.ready.pop_front() {
                if let Some(task) = e.tasks.get_mut(id).and_then(Option::take) {
                    return Some((id, task));
                }
            }
            None
        });
        let Some((id, mut task)) = next else {
            return polls;
        };
        polls += 1;
        let waker = waker_for(id);
        let mut cx = Context::from_waker(&waker);
        let done = task.as_mut().poll(&mut cx).is_ready();
        EXECUTOR.with(|e| {
            let mut e = e.borrow_mut();
            if done {
                e.live[id] = false;
                e.free.push(id);
            } else {
                e.tasks[id] = Some(task);
            }
        });
    }
}

/// Number of live tasks on this thread.
pub fn live_tasks() -> usize {
    EXECUTOR.with(|e| e.borrow().live.iter().filter(|l| **l).count())
}

/// Whether any task is ready to be polled.
pub fn has_ready() -> bool {
    EXECUTOR.with(|e| !e.borrow().ready.is_empty())
}

/// A future that yields once (lets other ready tasks run).
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn spawned_tasks_run_and_yield() {
        let count = Rc::new(Cell::new(0));
        for _ in 0..3 {
            let c = count.clone();
            spawn(async move {
                c.set(c.get() + 1);
                yield_now().await;
                c.set(c.get() + 10);
            });
        }
        run_ready();
        assert_eq!(count.get(), 33);
        assert_eq!(live_tasks(), 0);
        assert!(!has_ready());
    }
}

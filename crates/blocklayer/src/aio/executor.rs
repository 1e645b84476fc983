//! A single-threaded executor, one per iothread (thread-local).
//!
//! Tasks are `!Send` futures, polled only on the thread that spawned them. A waker
//! carries the owning executor's number and the task's slot number. Waking on the
//! owning thread pushes the slot on its ready list; waking from another thread (an
//! image's metadata lock released by another iothread, for example) queues the slot
//! on the owner's remote list and writes the owner's notification eventfd, so that a
//! sleeping owner wakes up. A wake for a finished or reused slot merely causes one
//! spurious poll, which futures tolerate.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

use super::task_box::TaskBox as Task;

#[derive(Default)]
struct Executor {
    /// Task slots; `None` while the task is being polled or when the slot is free.
    tasks: Vec<Option<Task>>,
    /// Whether a slot holds a live task (also true while it is being polled).
    live: Vec<bool>,
    free: Vec<usize>,
    ready: VecDeque<usize>,
}

/// The part of an executor other threads reach: wakes queued for its tasks.
struct Remote {
    queue: Mutex<Vec<usize>>,
    /// Set when `queue` may be non-empty (checked without the lock).
    pending: AtomicBool,
    /// Written (eventfd semantics) after queueing, to wake the owner; -1: none.
    notify_fd: AtomicI32,
}

impl Remote {
    fn new() -> Self {
        Remote {
            queue: Mutex::new(Vec::new()),
            pending: AtomicBool::new(false),
            notify_fd: AtomicI32::new(-1),
        }
    }
}

/// Every executor's remote part, by executor number; numbers of exited threads are
/// reused (a late wake for them is a spurious poll on the new owner).
#[derive(Default)]
struct Registry {
    remotes: Vec<Arc<Remote>>,
    free: Vec<usize>,
}

static REGISTRY: RwLock<Registry> = RwLock::new(Registry {
    remotes: Vec::new(),
    free: Vec::new(),
});

/// This thread's executor number, registered on first use and released when the
/// thread exits.
struct Membership {
    index: usize,
    remote: Arc<Remote>,
}

impl Membership {
    fn join() -> Self {
        let mut reg = REGISTRY.write().unwrap_or_else(|p| p.into_inner());
        let remote = Arc::new(Remote::new());
        let index = match reg.free.pop() {
            Some(i) => {
                reg.remotes[i] = remote.clone();
                i
            }
            None => {
                reg.remotes.push(remote.clone());
                reg.remotes.len() - 1
            }
        };
        Membership { index, remote }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        {
            let _q = self.remote.queue.lock().unwrap_or_else(|p| p.into_inner());
            self.remote.notify_fd.store(-1, Ordering::Release);
        }
        let mut reg = REGISTRY.write().unwrap_or_else(|p| p.into_inner());
        reg.free.push(self.index);
    }
}

thread_local! {
    // Const-initialised: no first-use check on every access.
    static EXECUTOR: RefCell<Executor> = const {
        RefCell::new(Executor {
            tasks: Vec::new(),
            live: Vec::new(),
            free: Vec::new(),
            ready: VecDeque::new(),
        })
    };
    static MEMBERSHIP: Membership = Membership::join();
    /// This thread's executor number (cached; `usize::MAX` until known).
    static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Bits of the waker data that hold the slot number; the executor number is above.
const SLOT_BITS: u32 = 32;

fn this_index() -> usize {
    INDEX.with(|i| {
        if i.get() == usize::MAX {
            i.set(MEMBERSHIP.with(|m| m.index));
        }
        i.get()
    })
}

/// Has `fd` written (eventfd: add 1) when another thread wakes a task of this
/// thread, so that a thread sleeping in epoll or io_uring wakes up; -1 stops it, and
/// once this returns the old descriptor is not written again (it may be closed).
pub fn set_remote_notify(fd: RawFd) {
    let _ = MEMBERSHIP.try_with(|m| {
        let _q = m.remote.queue.lock().unwrap_or_else(|p| p.into_inner());
        m.remote.notify_fd.store(fd, Ordering::Release);
    });
}

fn raw_waker(data: usize) -> RawWaker {
    // The data pointer is not a pointer: it is (executor << SLOT_BITS) | slot.
    RawWaker::new(data as *const (), &VTABLE)
}

fn waker_clone(data: *const ()) -> RawWaker {
    raw_waker(data as usize)
}

fn waker_wake(data: *const ()) {
    let data = data as usize;
    let (owner, id) = (data >> SLOT_BITS, data & ((1 << SLOT_BITS) - 1));
    // `try_with`: a wake during thread teardown is handled as a remote one.
    let local = INDEX.try_with(|i| i.get() == owner).unwrap_or(false) || {
        // First use on this thread: learn its number.
        MEMBERSHIP.try_with(|m| m.index == owner).unwrap_or(false)
    };
    if local {
        let _ = EXECUTOR.try_with(|e| {
            if let Ok(mut e) = e.try_borrow_mut() {
                e.ready.push_back(id);
            } else {
                log::error!("executor: wake while the executor is borrowed");
            }
        });
    } else {
        wake_remote(owner, id);
    }
}

/// Queues a wake for a task of another thread's executor and wakes that thread.
fn wake_remote(owner: usize, id: usize) {
    let remote = {
        let reg = REGISTRY.read().unwrap_or_else(|p| p.into_inner());
        match reg.remotes.get(owner) {
            Some(r) => r.clone(),
            None => return,
        }
    };
    // The queue lock also orders this write before the owner's unregistering of the
    // descriptor (see `set_remote_notify`), so a closed descriptor is never written.
    let mut q = remote.queue.lock().unwrap_or_else(|p| p.into_inner());
    q.push(id);
    // Only the wake that makes the queue pending rings the eventfd: until the owner
    // takes the queue (clearing `pending` first, then locking), later wakes land in the
    // same batch, which that ring already announced. Saves a write per wake, and the
    // owner a spurious wake-up, when completions arrive in bursts (librbd's threads).
    if remote.pending.swap(true, Ordering::AcqRel) {
        return;
    }
    let fd = remote.notify_fd.load(Ordering::Acquire);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local u64 to the eventfd the owner registered;
        // it stays open while registered, and unregistering takes the lock held here.
        let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Moves wakes other threads queued for this executor onto its ready list.
fn take_remote_wakes(e: &mut Executor) {
    let _ = MEMBERSHIP.try_with(|m| {
        if m.remote.pending.swap(false, Ordering::AcqRel) {
            let mut q = m.remote.queue.lock().unwrap_or_else(|p| p.into_inner());
            e.ready.extend(q.drain(..));
        }
    });
}

fn waker_drop(_: *const ()) {}

static VTABLE: RawWakerVTable =
    RawWakerVTable::new(waker_clone, waker_wake, waker_wake, waker_drop);

/// The waker of task `id` of executor `index`.
fn waker_of(index: usize, id: usize) -> Waker {
    let data = (index << SLOT_BITS) | id;
    // SAFETY: the vtable functions never dereference the data pointer (it is an integer)
    // and are safe to call from any thread, as the RawWaker contract requires.
    unsafe { Waker::from_raw(raw_waker(data)) }
}

/// Spawns a task on this thread's executor. It is polled on the next `run_ready`.
pub fn spawn(fut: impl Future<Output = ()> + 'static) {
    push(Task::new(move || fut));
}

/// Spawns the task `make` builds, built straight into its heap block: only the fields
/// `make` sets are written, where `Box::pin(make())` builds the whole future (a request's
/// is about 2 KiB) on the stack and copies all of it.
#[inline(always)]
pub fn spawn_with<F: Future<Output = ()> + 'static>(make: impl FnOnce() -> F) {
    push(Task::new(make));
}

/// Spawns a task already on the heap. Large futures are best built straight into
/// their box by the caller (`spawn_boxed(Box::pin(f(args)))`): moving one into
/// [`spawn`] copies all of it, whatever state it is in.
pub fn spawn_boxed(task: Pin<Box<dyn Future<Output = ()>>>) {
    push(Task::from_box(task));
}

/// Queues a new task as ready.
#[inline(always)]
fn push(task: Task) {
    EXECUTOR.with(|e| {
        let mut e = e.borrow_mut();
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
    let index = this_index();
    loop {
        let next = EXECUTOR.with(|e| {
            let mut e = e.borrow_mut();
            if e.ready.is_empty() {
                take_remote_wakes(&mut e);
            }
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
        let waker = waker_of(index, id);
        let mut cx = Context::from_waker(&waker);
        let done = task.poll(&mut cx).is_ready();
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

/// Whether another thread has woken a task of this thread that is not on the ready
/// list yet.
pub fn has_remote_wakes() -> bool {
    MEMBERSHIP
        .try_with(|m| m.remote.pending.load(Ordering::Acquire))
        .unwrap_or(false)
}

/// Whether any task is ready to be polled.
pub fn has_ready() -> bool {
    EXECUTOR.with(|e| !e.borrow().ready.is_empty())
        || MEMBERSHIP
            .try_with(|m| m.remote.pending.load(Ordering::Acquire))
            .unwrap_or(false)
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

    /// A task parked on one thread and woken from another (as an image lock released
    /// by another iothread) runs again on its own thread, and a thread sleeping on
    /// its notification eventfd is woken.
    #[test]
    fn wakes_from_other_threads_reach_the_owner() {
        use std::sync::mpsc;
        use std::time::Duration;
        let slot: Arc<Mutex<(bool, Option<Waker>)>> = Arc::default();
        let (tx, rx) = mpsc::channel();
        let s2 = slot.clone();
        let owner = std::thread::spawn(move || {
            let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
            set_remote_notify(std::os::fd::AsRawFd::as_raw_fd(&efd));
            let done = Rc::new(Cell::new(false));
            let d2 = done.clone();
            spawn(async move {
                std::future::poll_fn(|cx| {
                    let mut g = s2.lock().unwrap();
                    if g.0 {
                        Poll::Ready(())
                    } else {
                        g.1 = Some(cx.waker().clone());
                        Poll::Pending
                    }
                })
                .await;
                d2.set(true);
            });
            run_ready();
            assert!(!done.get());
            tx.send(()).unwrap();
            // Sleep until the other thread's wake rings the eventfd.
            efd.read().unwrap();
            assert!(has_ready());
            run_ready();
            set_remote_notify(-1);
            done.get()
        });
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let waker = {
            let mut g = slot.lock().unwrap();
            g.0 = true;
            g.1.take().unwrap()
        };
        // Woken from this thread, which has an executor of its own.
        spawn(async {});
        run_ready();
        waker.wake();
        assert!(!has_ready(), "the wake went to the waking thread");
        assert!(owner.join().unwrap(), "the task did not run on its owner");
    }

    /// Wakes from another thread that arrive before the owner took the queue ring its
    /// eventfd once.
    #[test]
    fn a_batch_of_remote_wakes_rings_once() {
        use std::sync::mpsc;
        let (tx, rx) = mpsc::channel::<Vec<Waker>>();
        let (back_tx, back_rx) = mpsc::channel::<()>();
        let owner = std::thread::spawn(move || {
            let efd =
                vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
            set_remote_notify(std::os::fd::AsRawFd::as_raw_fd(&efd));
            let polls = Rc::new(Cell::new(0));
            let mut wakers = Vec::new();
            for _ in 0..3 {
                let slot: Rc<Cell<Option<Waker>>> = Rc::default();
                let (s2, p2) = (slot.clone(), polls.clone());
                spawn(async move {
                    std::future::poll_fn(|cx| {
                        p2.set(p2.get() + 1);
                        if p2.get() > 3 {
                            Poll::Ready(())
                        } else {
                            s2.set(Some(cx.waker().clone()));
                            Poll::Pending
                        }
                    })
                    .await;
                });
                run_ready();
                wakers.push(slot.take().unwrap());
            }
            tx.send(wakers).unwrap();
            back_rx.recv().unwrap();
            let rings = efd.read().unwrap();
            run_ready();
            set_remote_notify(-1);
            (rings, polls.get())
        });
        let wakers = rx.recv().unwrap();
        for w in wakers {
            w.wake();
        }
        back_tx.send(()).unwrap();
        let (rings, polls) = owner.join().unwrap();
        assert_eq!(
            rings, 1,
            "three queued wakes rang the eventfd {rings} times"
        );
        assert_eq!(polls, 6, "every woken task ran once more");
    }

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

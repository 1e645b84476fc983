//! Periodic housekeeping off the request path: one shared thread runs every registered
//! task at its interval (the qcow2 driver's `cache-clean-interval`). Requests pay
//! nothing for it. The thread starts with the first task and sleeps while there is
//! nothing to do; it is never joined, so it cannot delay the daemon's exit.
//!
//! A task is registered with [`every`] and runs until its [`Periodic`] handle is
//! dropped. Dropping the handle waits for a run in progress to finish, so that after
//! the drop the task holds nothing of its owner: a node being deleted is gone when its
//! driver is. Tasks must be short (they run one after another).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

type TaskFn = Arc<dyn Fn() + Send + Sync>;

struct Task {
    id: u64,
    interval: Duration,
    next: Instant,
    run: TaskFn,
}

#[derive(Default)]
struct Schedule {
    tasks: Vec<Task>,
    /// The task running now.
    running: Option<u64>,
    next_id: u64,
    /// The housekeeping thread, once started.
    thread: Option<ThreadId>,
}

struct Scheduler {
    state: Mutex<Schedule>,
    /// Signalled when the task list changes and when a run ends.
    changed: Condvar,
}

fn scheduler() -> &'static Scheduler {
    static SCHEDULER: OnceLock<Scheduler> = OnceLock::new();
    SCHEDULER.get_or_init(|| Scheduler {
        state: Mutex::new(Schedule::default()),
        changed: Condvar::new(),
    })
}

impl Scheduler {
    fn lock(&self) -> MutexGuard<'_, Schedule> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The housekeeping thread's loop.
    fn run(&self) {
        let mut s = self.lock();
        loop {
            let now = Instant::now();
            if let Some(t) = s.tasks.iter_mut().find(|t| t.next <= now) {
                // A late run does not bunch up the next ones.
                t.next = (t.next + t.interval).max(now);
                let (id, run) = (t.id, t.run.clone());
                s.running = Some(id);
                drop(s);
                if catch_unwind(AssertUnwindSafe(|| run())).is_err() {
                    log::error!("periodic task {id} panicked");
                }
                drop(run);
                s = self.lock();
                s.running = None;
                self.changed.notify_all();
                continue;
            }
            s = match s.tasks.iter().map(|t| t.next).min() {
                Some(next) => {
                    self.changed
                        .wait_timeout(s, next.saturating_duration_since(now))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.changed.wait(s).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}

/// A registered periodic task; dropping it stops the task.
pub struct Periodic {
    id: u64,
}

impl std::fmt::Debug for Periodic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Periodic").field("id", &self.id).finish()
    }
}

/// Runs `task` every `interval` (first after one interval) on the housekeeping thread
/// until the returned handle is dropped.
pub fn every(interval: Duration, task: impl Fn() + Send + Sync + 'static) -> Periodic {
    let sched = scheduler();
    let mut s = sched.lock();
    s.next_id += 1;
    let id = s.next_id;
    let interval = interval.max(Duration::from_millis(1));
    s.tasks.push(Task {
        id,
        interval,
        next: Instant::now() + interval,
        run: Arc::new(task),
    });
    if s.thread.is_none() {
        match std::thread::Builder::new()
            .name("vubd-housekeeping".into())
            .spawn(|| scheduler().run())
        {
            Ok(h) => s.thread = Some(h.thread().id()),
            Err(e) => log::error!("cannot start the housekeeping thread: {e}"),
        }
    }
    sched.changed.notify_all();
    Periodic { id }
}

impl Drop for Periodic {
    fn drop(&mut self) {
        let sched = scheduler();
        let mut s = sched.lock();
        s.tasks.retain(|t| t.id != self.id);
        // A task that drops its own handle must not wait for itself.
        let on_thread = s.thread == Some(std::thread::current().id());
        while s.running == Some(self.id) && !on_thread {
            s = sched.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        sched.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn runs_at_its_interval_until_dropped() {
        let fast = Arc::new(AtomicU64::new(0));
        let slow = Arc::new(AtomicU64::new(0));
        let f = fast.clone();
        let p_fast = every(Duration::from_millis(10), move || {
            f.fetch_add(1, Ordering::SeqCst);
        });
        let s = slow.clone();
        let p_slow = every(Duration::from_secs(3600), move || {
            s.fetch_add(1, Ordering::SeqCst);
        });
        let start = Instant::now();
        while fast.load(Ordering::SeqCst) < 5 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "task does not run"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(slow.load(Ordering::SeqCst), 0);
        // Dropping a handle is immediate even for a task an hour away.
        let t = Instant::now();
        drop(p_slow);
        assert!(t.elapsed() < Duration::from_millis(500));
        drop(p_fast);
        let n = fast.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            fast.load(Ordering::SeqCst),
            n,
            "ran after its handle was dropped"
        );
    }

    #[test]
    fn drop_waits_for_a_run_in_progress() {
        let entered = Arc::new(AtomicU64::new(0));
        let finished = Arc::new(AtomicU64::new(0));
        let (e, f) = (entered.clone(), finished.clone());
        let p = every(Duration::from_millis(1), move || {
            e.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
            f.fetch_add(1, Ordering::SeqCst);
        });
        while entered.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(p);
        assert_eq!(
            entered.load(Ordering::SeqCst),
            finished.load(Ordering::SeqCst)
        );
    }
}

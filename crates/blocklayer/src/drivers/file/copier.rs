//! A helper thread that does some of the iothreads' large mapped reads.
//!
//! A large read on a tmpfs image is a `memcpy` from the file's mapping ([`mapped`])
//! on the iothread that took the request. One iothread serving one busy queue of
//! 1 MiB reads thus copies on one core, while qemu-storage-daemon's thread pool
//! runs its `preadv` calls on every core: at 1 MiB, one queue stayed at 1.25x-1.54x
//! QSD with half its CPU per read. So a read of [`OFFLOAD_MIN`] or more is handed to
//! this process's one helper thread when the helper is idle, and copied by the
//! iothread itself otherwise: with requests queued, the iothread and the helper
//! copy two of them at once, and the helper never holds a queue of work that the
//! iothread could have done sooner itself. Only while the process runs fewer
//! iothreads than it has CPUs ([`spare_core`]): otherwise the cores are the iothreads'.
//!
//! The job owns everything the copy touches: the mapping (an `Arc`), and the
//! request's vector with its keepalive (only vectors that have one are handed over).
//! A request future dropped while its job runs also waits for the copy to end, so a
//! job never outlives its request: guest memory stays guarded against a frontend's
//! truncation (the vhost-user SIGBUS registrations end with the connection, which
//! waits for its requests) for as long as the helper writes into it.
//!
//! The helper is started on the first large mapped read and lives as long as the
//! process: one thread, named `copy`, whatever the number of exports and iothreads.
//! It runs on the CPUs of the process's main thread rather than those of the iothread
//! that happened to start it (which a manager may have pinned to one core).
//!
//! [`mapped`]: super::mapped

use super::mapped::Mapping;
use crate::aio::iovec::IoVec;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

/// Reads at least this large may be copied by the helper. Below it, the hand-over
/// (a condition variable's wake-up, then the iothread's) costs as much as the copy.
pub(super) const OFFLOAD_MIN: u64 = 256 * 1024;

const PENDING: u8 = 0;
const COPIED: u8 = 1;
const NOT_COPIED: u8 = 2;

/// The outcome of one job, shared by the helper and the request's future.
struct Outcome {
    state: AtomicU8,
    waker: Mutex<Option<Waker>>,
}

impl Outcome {
    fn finish(&self, copied: bool) {
        let state = if copied { COPIED } else { NOT_COPIED };
        self.state.store(state, Ordering::Release);
        // Taken under the lock after the store: a poll that registered its waker
        // before the store is woken here; one that registers after it sees the state.
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

struct Job {
    mapping: Arc<Mapping>,
    offset: u64,
    iov: IoVec,
    outcome: Arc<Outcome>,
}

// SAFETY: the vector's segments are raw pointers into memory that its keepalive (an
// `Arc<dyn Any + Send + Sync>`, required by `offer`) keeps valid wherever it is
// dropped; the request's side does not touch that memory until the outcome is set,
// so the helper's writes into it race with nothing. The mapping is Send and Sync.
unsafe impl Send for Job {}

struct Helper {
    /// A job is being copied or waits in `slot`: iothreads copy for themselves.
    busy: AtomicBool,
    slot: Mutex<Option<Job>>,
    posted: Condvar,
}

impl Helper {
    fn run(&self) {
        crate::aio::affinity::use_process_cpus();
        loop {
            let job = {
                let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(job) = slot.take() {
                        break job;
                    }
                    slot = self.posted.wait(slot).unwrap_or_else(|p| p.into_inner());
                }
            };
            let Job {
                mapping,
                offset,
                iov,
                outcome,
            } = job;
            #[cfg(test)]
            let gate = tests::GATE.lock().unwrap_or_else(|p| p.into_inner());
            // A panic must not leave the request waiting forever: it reads by system
            // call instead, over whatever the copy wrote.
            let copied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                mapping.read(offset, &iov)
            }))
            .unwrap_or_else(|_| {
                log::error!("file: the copy helper panicked; the read falls back to pread");
                false
            });
            #[cfg(test)]
            drop(gate);
            drop((iov, mapping));
            // Free before the wake-up, so that the woken iothread may post its next
            // read at once.
            self.busy.store(false, Ordering::Release);
            outcome.finish(copied);
        }
    }
}

/// The helper, started on first use; `None` if the thread could not be spawned
/// (reads then stay on the iothreads).
fn helper() -> Option<&'static Helper> {
    static HELPER: OnceLock<Option<&'static Helper>> = OnceLock::new();
    *HELPER.get_or_init(|| {
        let helper: &'static Helper = Box::leak(Box::new(Helper {
            busy: AtomicBool::new(false),
            slot: Mutex::new(None),
            posted: Condvar::new(),
        }));
        match std::thread::Builder::new()
            .name("copy".into())
            .spawn(move || helper.run())
        {
            Ok(_) => Some(helper),
            Err(e) => {
                log::warn!("file: no copy helper thread: {e}");
                None
            }
        }
    })
}

/// Whether the iothreads leave a core to the helper: fewer event loops than CPUs this
/// process may run on. Where every core has its iothread, a copy moved to the helper
/// only adds a hand-over and a thread switch: on 2 CPUs with 2 busy iothreads, 256 KiB
/// reads lost 10-25% of their rate and took 25% more CPU each.
fn spare_core() -> bool {
    static CPUS: OnceLock<usize> = OnceLock::new();
    let cpus = *CPUS.get_or_init(|| match crate::aio::affinity::process_cpus() {
        // SAFETY: counts the bits of a valid cpu_set_t.
        Some(set) => unsafe { libc::CPU_COUNT(&set) as usize },
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    });
    crate::aio::event_loops() < cpus
}

/// Hands the read of `iov.len()` bytes at `offset` to the helper if it is idle.
/// `None`: the helper is busy (or the read is not for it); copy on this thread.
pub(super) fn offer(mapping: &Arc<Mapping>, offset: u64, iov: &IoVec) -> Option<HelperCopy> {
    if iov.len() < OFFLOAD_MIN || iov.keepalive().is_none() || !spare_core() {
        return None;
    }
    let helper = helper()?;
    if helper
        .busy
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return None;
    }
    let outcome = Arc::new(Outcome {
        state: AtomicU8::new(PENDING),
        waker: Mutex::new(None),
    });
    let job = Job {
        mapping: mapping.clone(),
        offset,
        iov: iov.clone(),
        outcome: outcome.clone(),
    };
    *helper.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(job);
    helper.posted.notify_one();
    Some(HelperCopy { outcome })
}

/// A read handed to the helper: `true` once copied, `false` if the mapping could not
/// serve it (a hole: the caller reads by system call).
pub(super) struct HelperCopy {
    outcome: Arc<Outcome>,
}

impl HelperCopy {
    fn state(&self) -> Option<bool> {
        match self.outcome.state.load(Ordering::Acquire) {
            PENDING => None,
            s => Some(s == COPIED),
        }
    }
}

impl Drop for HelperCopy {
    /// A request dropped before its copy ended (its iothread stopping) waits for it:
    /// the helper must not write into guest memory after the request is gone
    /// (module documentation). At most one copy's time, and only in that case.
    fn drop(&mut self) {
        while self.state().is_none() {
            std::thread::yield_now();
        }
    }
}

impl Future for HelperCopy {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        if let Some(copied) = self.state() {
            return Poll::Ready(copied);
        }
        {
            let mut waker = self.outcome.waker.lock().unwrap_or_else(|p| p.into_inner());
            match &*waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
        }
        match self.state() {
            Some(copied) => Poll::Ready(copied),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::mapped::tests::{contents, iov_of, ShmFile};
    use super::*;
    use crate::aio::iovec::AlignedBuf;
    use crate::aio::uring::block_on;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    const MIB: u64 = 1 << 20;

    /// Held by the helper across each copy in tests: a test holding it keeps a job
    /// pending.
    pub(super) static GATE: Mutex<()> = Mutex::new(());

    /// Bytes that differ from page to page (a copy from the wrong page shows).
    fn pattern(len: u64, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ ((i >> 12) as u8).wrapping_mul(7) ^ seed)
            .collect()
    }

    /// A file on /dev/shm of `size` bytes starting with `data`, and its mapping.
    fn mapped_file(name: &str, size: u64, data: &[u8], writable: bool) -> (ShmFile, Arc<Mapping>) {
        let f = ShmFile::new(name, size);
        f.file.write_all_at(data, 0).unwrap();
        let m = Arc::new(Mapping::new(f.fd(), size, writable).expect("map"));
        (f, m)
    }

    /// A read of `len` bytes at `offset` the way the driver does it: by the helper if
    /// it is idle, else in place. Returns whether it was copied and by the helper.
    async fn read(m: &Arc<Mapping>, offset: u64, iov: &IoVec) -> (bool, bool) {
        match offer(m, offset, iov) {
            Some(copy) => (copy.await, true),
            None => (m.read(offset, iov), false),
        }
    }

    /// Hands a read to the helper, waiting for it to be free (other tests use it).
    fn offer_when_free(m: &Arc<Mapping>, offset: u64, iov: &IoVec) -> HelperCopy {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(copy) = offer(m, offset, iov) {
                return copy;
            }
            assert!(Instant::now() < deadline, "the helper never became free");
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    #[test]
    fn reads_from_several_threads_match_the_file() {
        let size = 16 * MIB;
        let f = ShmFile::new("copier-match", size);
        let data = Arc::new(pattern(size, 3));
        f.file.write_all_at(&data, 0).unwrap();
        let m = Arc::new(Mapping::new(f.fd(), size, false).expect("map"));
        let helped = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..3u64)
            .map(|t| {
                let (m, data, helped) = (m.clone(), data.clone(), helped.clone());
                std::thread::spawn(move || {
                    block_on(async move {
                        for i in 0..150u64 {
                            let len = OFFLOAD_MIN << (i % 3);
                            let offset = ((i * 7 + t * 13) * 4096) % (size - len);
                            let iov = iov_of(&vec![0u8; len as usize]);
                            let (copied, by_helper) = read(&m, offset, &iov).await;
                            assert!(copied, "an allocated range is copied");
                            if by_helper {
                                helped.fetch_add(1, Ordering::Relaxed);
                            }
                            assert!(
                                contents(&iov) == data[offset as usize..][..len as usize],
                                "thread {t}, read {i}: {len} bytes at {offset} differ"
                            );
                        }
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().expect("reader");
        }
        assert!(helped.load(Ordering::Relaxed) > 0, "the helper took none");
    }

    #[test]
    fn a_hole_is_left_to_the_caller_and_stays_a_hole() {
        let size = 4 * MIB;
        let (f, m) = mapped_file("copier-hole", size, &pattern(MIB, 5), true);
        let blocks = f.blocks();
        let iov = iov_of(&vec![0u8; MIB as usize]);
        let copy = offer_when_free(&m, MIB + 512 * 1024, &iov);
        assert!(!block_on(copy), "a range with a hole is not copied");
        assert_eq!(f.blocks(), blocks, "looking allocated nothing");
        let copy = offer_when_free(&m, 0, &iov);
        assert!(block_on(copy), "the written MiB is copied");
        assert_eq!(contents(&iov), pattern(MIB, 5));
    }

    #[test]
    fn only_large_reads_with_a_keepalive_are_offered() {
        let size = 2 * MIB;
        let (_f, m) = mapped_file("copier-offered", size, &pattern(size, 9), false);
        let small = iov_of(&vec![0u8; (OFFLOAD_MIN - 4096) as usize]);
        assert!(offer(&m, 0, &small).is_none(), "too small for the helper");
        let mut buf = vec![0u8; MIB as usize];
        let mut bare = IoVec::new(None);
        // SAFETY: `buf` outlives `bare` and any copy into it (were one handed over by
        // mistake, dropping its `HelperCopy` waits for the copy).
        unsafe { bare.push_raw(buf.as_mut_ptr(), buf.len()) };
        assert!(
            offer(&m, 0, &bare).is_none(),
            "memory nothing keeps alive is never handed over"
        );
    }

    #[test]
    fn a_job_keeps_its_memory_until_copied_and_then_lets_it_go() {
        let size = 2 * MIB;
        let (_f, m) = mapped_file("copier-dropped", size, &pattern(size, 11), false);
        let buf = Arc::new(AlignedBuf::zeroed(MIB as usize, 4096));
        let weak = Arc::downgrade(&buf);
        let iov = IoVec::from_buf(buf);
        let copy = {
            // The helper cannot start the copy while the gate is held (taken before
            // each attempt and let go between them: a busy helper may be waiting for
            // it with another test's job).
            let deadline = Instant::now() + Duration::from_secs(20);
            let (_gate, copy) = loop {
                let gate = GATE.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(copy) = offer(&m, 0, &iov) {
                    break (gate, copy);
                }
                drop(gate);
                assert!(Instant::now() < deadline, "the helper never became free");
                std::thread::sleep(Duration::from_micros(100));
            };
            drop(iov);
            assert!(
                weak.upgrade().is_some(),
                "a pending job owns the memory it copies into"
            );
            assert!(copy.state().is_none(), "still pending behind the gate");
            copy
        };
        // Dropped before it was polled: the drop waits for the copy to end.
        drop(copy);
        let deadline = Instant::now() + Duration::from_secs(20);
        while weak.upgrade().is_some() {
            assert!(Instant::now() < deadline, "the helper kept the buffer");
            std::thread::sleep(Duration::from_millis(1));
        }
        // And it is free for the next one.
        let iov = iov_of(&vec![0u8; MIB as usize]);
        assert!(block_on(offer_when_free(&m, MIB, &iov)));
        assert_eq!(contents(&iov), pattern(size, 11)[MIB as usize..]);
    }
}

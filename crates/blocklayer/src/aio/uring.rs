//! The io_uring engine of an iothread (thread-local).
//!
//! Every operation owns a slot that holds its I/O vector (with the keepalive of the
//! memory behind it) until the kernel's completion has been reaped, even if the future
//! that started it is dropped first: no caller can free memory the kernel still uses.
//! Submissions are batched: ops are queued on the submission ring and handed to the
//! kernel by [`submit`], which the iothread loop calls after running ready tasks.

use super::fixed::{self, FixedError, Pinned, Staged};
use super::iovec::{IoVec, Keepalive};
use io_uring::{opcode, types, IoUring};
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Ring size of each iothread.
pub const RING_ENTRIES: u32 = 1024;

enum Slot {
    Free,
    /// Submitted (or queued); the future is waiting.
    Waiting {
        waker: Option<Waker>,
        _iov: Option<IoVec>,
        _ts: Option<Box<types::Timespec>>,
    },
    /// The future was dropped before completion: keep the buffers until the CQE.
    Orphan {
        _iov: Option<IoVec>,
        _ts: Option<Box<types::Timespec>>,
    },
    Done(i32),
}

struct Engine {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<u32>,
    eventfd: EventFd,
    in_flight: usize,
    /// Of `in_flight`, the reads and writes (operations with an I/O vector).
    io_in_flight: usize,
    /// Declared after `ring`: dropped once the ring (and its registrations) is gone.
    fixed: fixed::Table,
}

thread_local! {
    static ENGINE: RefCell<Option<Engine>> = const { RefCell::new(None) };
}

/// `user_data` of the cancellation requests [`Engine::cancel_all`] sends.
const CANCEL_USER_DATA: u64 = u64::MAX;

impl Drop for Engine {
    fn drop(&mut self) {
        // Before the eventfd closes: no other thread may write it afterwards.
        super::executor::set_remote_notify(-1);
        // The kernel may still read or write the buffers of operations in flight (guest
        // memory among them): cancel what can be cancelled and wait for every
        // completion before the slots, and the keepalives in them, are dropped.
        self.cancel_all();
    }
}

impl Engine {
    fn new() -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .build(RING_ENTRIES)
            .or_else(|_| IoUring::new(RING_ENTRIES))?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        // Wakes from other threads ring the same eventfd: the iothread loop waits on
        // it, and handles it by running ready tasks.
        super::executor::set_remote_notify(eventfd.as_raw_fd());
        Ok(Engine {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            eventfd,
            in_flight: 0,
            io_in_flight: 0,
            fixed: fixed::Table::default(),
        })
    }

    fn alloc(&mut self, iov: Option<IoVec>, ts: Option<Box<types::Timespec>>) -> u32 {
        let slot = Slot::Waiting {
            waker: None,
            _iov: iov,
            _ts: ts,
        };
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        }
    }

    fn push(&mut self, sqe: io_uring::squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every pointer in `sqe` (iovec arrays, buffers, timespecs) is owned
            // by the op's slot, which keeps them alive until the completion is reaped.
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_ok() {
                self.in_flight += 1;
                return Ok(());
            }
            // Ring full: hand what is queued to the kernel and retry.
            self.ring.submit()?;
        }
    }

    /// Cancels every operation in flight and waits until the kernel has posted the
    /// completion of each (and of each cancellation request).
    fn cancel_all(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        log::info!(
            "io_uring: cancelling {} operation(s) in flight before the thread exits",
            self.in_flight
        );
        let pending: Vec<u64> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Slot::Waiting { .. } | Slot::Orphan { .. }))
            .map(|(i, _)| i as u64)
            .collect();
        for user_data in pending {
            let sqe = opcode::AsyncCancel::new(user_data)
                .build()
                .user_data(CANCEL_USER_DATA);
            if let Err(e) = self.push(sqe) {
                log::error!("io_uring: cannot queue a cancellation: {e}");
                break;
            }
        }
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    // The ring cannot be waited on: keep the buffers alive for good
                    // rather than free memory the kernel may still write.
                    log::error!(
                        "io_uring: waiting for {} operation(s) failed: {e}; leaking their buffers",
                        self.in_flight
                    );
                    std::mem::forget(std::mem::take(&mut self.slots));
                    return;
                }
            }
            // No wakes: the thread's executor may already be gone.
            self.reap_completions(false);
        }
    }

    fn reap(&mut self) -> usize {
        self.reap_completions(true)
    }

    fn reap_completions(&mut self, wake: bool) -> usize {
        let mut n = 0;
        for cqe in self.ring.completion() {
            n += 1;
            self.in_flight -= 1;
            if cqe.user_data() == CANCEL_USER_DATA {
                continue;
            }
            let i = cqe.user_data() as usize;
            let Some(slot) = self.slots.get_mut(i) else {
                log::error!("io_uring completion for unknown slot {i}");
                continue;
            };
            let done = std::mem::replace(slot, Slot::Done(cqe.result()));
            if let Slot::Waiting { _iov: Some(_), .. } | Slot::Orphan { _iov: Some(_), .. } = &done
            {
                self.io_in_flight -= 1;
            }
            match done {
                // Waking only queues the task on this thread's executor (it does not
                // touch the engine), so it is safe while the engine is borrowed.
                Slot::Waiting { waker, .. } => {
                    if let Some(w) = waker.filter(|_| wake) {
                        w.wake();
                    }
                }
                Slot::Orphan { .. } => {
                    *slot = Slot::Free;
                    self.free.push(i as u32);
                }
                Slot::Free | Slot::Done(_) => {
                    log::error!("io_uring completion for idle slot {i}");
                }
            }
        }
        n
    }
}

fn with_engine<R>(f: impl FnOnce(&mut Engine) -> R) -> io::Result<R> {
    ENGINE.with(|cell| {
        let mut e = cell.borrow_mut();
        if e.is_none() {
            *e = Some(Engine::new()?);
        }
        Ok(f(e.as_mut().expect("engine initialised above")))
    })
}

/// This thread's completion eventfd (creates the engine if needed): it becomes readable
/// when completions are posted while eventfd notification is enabled.
pub fn eventfd() -> io::Result<RawFd> {
    with_engine(|e| e.eventfd.as_raw_fd())
}

/// Clears the completion eventfd.
pub fn clear_eventfd() {
    let _ = with_engine(|e| {
        let _ = e.eventfd.read();
    });
}

/// Enables or disables eventfd notification (disabled while the iothread polls).
pub fn set_eventfd_enabled(enabled: bool) {
    let _ = with_engine(|e| {
        let cq = e.ring.completion();
        if enabled {
            cq.enable_eventfd();
        } else {
            cq.disable_eventfd();
        }
    });
}

/// Hands queued submissions to the kernel.
pub fn submit() -> io::Result<usize> {
    with_engine(|e| {
        if e.ring.submission().is_empty() {
            Ok(0)
        } else {
            e.ring.submit()
        }
    })?
}

/// Submits and waits until at least one completion is available.
pub fn submit_and_wait() -> io::Result<usize> {
    with_engine(|e| e.ring.submit_and_wait(1))?
}

/// Reaps available completions and wakes their futures; returns how many.
pub fn reap() -> usize {
    with_engine(Engine::reap).unwrap_or(0)
}

/// Operations submitted and not yet reaped on this thread.
pub fn in_flight() -> usize {
    with_engine(|e| e.in_flight).unwrap_or(0)
}

/// Reads and writes submitted and not yet reaped on this thread (no timers, syncs or
/// cancellations).
pub fn io_in_flight() -> usize {
    with_engine(|e| e.io_in_flight).unwrap_or(0)
}

/// The future of one io_uring operation; resolves to the CQE result (negative errno on
/// failure).
pub struct Op {
    slot: Option<u32>,
    early: Option<io::Error>,
}

impl Future for Op {
    type Output = io::Result<i32>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(err) = self.early.take() {
            return Poll::Ready(Err(err));
        }
        let Some(i) = self.slot else {
            return Poll::Ready(Err(io::Error::other("io_uring op polled after completion")));
        };
        let res = with_engine(|e| {
            let slot = &mut e.slots[i as usize];
            match slot {
                Slot::Done(r) => {
                    let r = *r;
                    *slot = Slot::Free;
                    e.free.push(i);
                    Poll::Ready(r)
                }
                Slot::Waiting { waker, .. } => {
                    match waker {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => *waker = Some(cx.waker().clone()),
                    }
                    Poll::Pending
                }
                Slot::Free | Slot::Orphan { .. } => Poll::Ready(-libc::EIO),
            }
        });
        match res {
            Ok(Poll::Ready(r)) => {
                self.slot = None;
                Poll::Ready(if r < 0 {
                    Err(io::Error::from_raw_os_error(-r))
                } else {
                    Ok(r)
                })
            }
            Ok(Poll::Pending) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        let Some(i) = self.slot else { return };
        let _ = ENGINE.try_with(|cell| {
            let Ok(mut e) = cell.try_borrow_mut() else {
                return;
            };
            let Some(e) = e.as_mut() else { return };
            let slot = &mut e.slots[i as usize];
            match std::mem::replace(slot, Slot::Free) {
                Slot::Waiting { _iov, _ts, .. } => *slot = Slot::Orphan { _iov, _ts },
                _ => e.free.push(i),
            }
        });
    }
}

fn start(
    build: impl FnOnce(
        &Option<IoVec>,
        &Option<Box<types::Timespec>>,
        &mut fixed::Table,
    ) -> io_uring::squeue::Entry,
    iov: Option<IoVec>,
    ts: Option<Box<types::Timespec>>,
) -> Op {
    let r = with_engine(|e| {
        let sqe = build(&iov, &ts, &mut e.fixed);
        let io = iov.is_some();
        let i = e.alloc(iov, ts);
        match e.push(sqe.user_data(u64::from(i))) {
            Ok(()) => {
                e.io_in_flight += usize::from(io);
                Ok(i)
            }
            Err(err) => {
                e.slots[i as usize] = Slot::Free;
                e.free.push(i);
                Err(err)
            }
        }
    })
    .and_then(|r| r);
    match r {
        Ok(i) => Op {
            slot: Some(i),
            early: None,
        },
        Err(err) => Op {
            slot: None,
            early: Some(err),
        },
    }
}

/// The buffers of a read or write: one segment is passed as a plain buffer (its
/// address is guest or bounce memory, which the keepalive holds, whereas a
/// one-segment vector keeps its segment inline, where the slot moves it); several as
/// their iovec array, on the heap, which stays put while the slot holds the vector.
///
/// Buffers inside memory registered with the ring ([`pin`]) are passed as fixed
/// buffers, with their slot.
enum Buffers {
    One(*mut u8, u32),
    Many(*const libc::iovec, u32),
    OneFixed(*mut u8, u32, u16),
    ManyFixed(*const libc::iovec, u32, u16),
}

fn buffers(iov: &Option<IoVec>, fixed: &mut fixed::Table) -> Buffers {
    let segs = iov.as_ref().map_or(&[][..], |v| v.segments());
    match segs {
        // The kernel caps one read or write at MAX_RW_COUNT (just under 2 GiB), as it
        // does a readv's total: a longer buffer is short either way.
        [s] => {
            let n = s.iov_len.min(u32::MAX as usize) as u32;
            match fixed.find(s.iov_base as usize, n as usize) {
                Some(slot) => Buffers::OneFixed(s.iov_base.cast(), n, slot),
                None => Buffers::One(s.iov_base.cast(), n),
            }
        }
        _ => match fixed.find_all(segs) {
            Some(slot) => Buffers::ManyFixed(segs.as_ptr(), segs.len() as u32, slot),
            None => Buffers::Many(segs.as_ptr(), segs.len() as u32),
        },
    }
}

/// `preadv(fd, iov, offset)`.
pub fn readv(fd: RawFd, offset: u64, iov: IoVec) -> Op {
    let fd = types::Fd(fd);
    start(
        |iov, _, fixed| match buffers(iov, fixed) {
            Buffers::One(p, n) => opcode::Read::new(fd, p, n).offset(offset).build(),
            Buffers::Many(p, n) => opcode::Readv::new(fd, p, n).offset(offset).build(),
            Buffers::OneFixed(p, n, i) => {
                opcode::ReadFixed::new(fd, p, n, i).offset(offset).build()
            }
            Buffers::ManyFixed(p, n, i) => {
                opcode::ReadvFixed::new(fd, p, n, i).offset(offset).build()
            }
        },
        Some(iov),
        None,
    )
}

/// `pwritev2(fd, iov, offset, rw_flags)`; `RWF_DSYNC` gives FUA semantics.
pub fn writev(fd: RawFd, offset: u64, iov: IoVec, rw_flags: i32) -> Op {
    let fd = types::Fd(fd);
    start(
        |iov, _, fixed| match buffers(iov, fixed) {
            Buffers::One(p, n) => opcode::Write::new(fd, p, n)
                .offset(offset)
                .rw_flags(rw_flags)
                .build(),
            Buffers::Many(p, n) => opcode::Writev::new(fd, p, n)
                .offset(offset)
                .rw_flags(rw_flags)
                .build(),
            Buffers::OneFixed(p, n, i) => opcode::WriteFixed::new(fd, p, n, i)
                .offset(offset)
                .rw_flags(rw_flags)
                .build(),
            Buffers::ManyFixed(p, n, i) => opcode::WritevFixed::new(fd, p, n, i)
                .offset(offset)
                .rw_flags(rw_flags)
                .build(),
        },
        Some(iov),
        None,
    )
}

/// Registers `ptr..ptr+len` with this thread's ring as fixed buffers (see
/// [`fixed`]): reads and writes whose buffers lie inside it use them from now on.
/// The range stays registered until the returned handle (and any other for the same
/// range on this thread) is dropped, on this thread.
///
/// # Safety
/// `ptr..ptr+len` must stay mapped, readable and writable, for as long as `keep`
/// lives, and must not be memory whose pages its owner replaces (see [`fixed`]).
pub unsafe fn pin(ptr: *mut u8, len: usize, keep: &Keepalive) -> Result<Pinned, FixedError> {
    // SAFETY: forwarded from the caller.
    with_engine(|e| unsafe { e.fixed.pin(&e.ring, ptr, len, keep) }).map_err(FixedError::Kernel)?
}

/// Another reference to `ptr..ptr+len` if this thread has it registered:
/// [`Table::share_range`](super::fixed::Table::share_range).
///
/// # Safety
/// As [`pin`].
pub unsafe fn share(ptr: *mut u8, len: usize, keep: &Keepalive) -> Option<Pinned> {
    // SAFETY: forwarded from the caller.
    with_engine(|e| unsafe { e.fixed.share_range(ptr, len, keep) })
        .ok()
        .flatten()
}

/// Takes range `i` of `staged` (pinned on another thread) into this thread's ring,
/// kept mapped by `keep`: [`Table::adopt`](super::fixed::Table::adopt).
///
/// # Safety
/// As [`Table::adopt`](super::fixed::Table::adopt).
pub unsafe fn adopt(staged: &mut Staged, i: usize, keep: &Keepalive) -> Result<Pinned, FixedError> {
    // SAFETY: forwarded from the caller.
    with_engine(|e| unsafe { e.fixed.adopt(&e.ring, staged, i, keep) })
        .map_err(FixedError::Kernel)?
}

/// Gives back the ranges of `pinned` (called by its `Drop`). Nothing to do once the
/// thread's engine is gone: its ring took the registrations with it.
pub(super) fn unpin(pinned: &mut Pinned) {
    let _ = ENGINE.try_with(|cell| match cell.try_borrow_mut() {
        Ok(mut e) => {
            if let Some(e) = e.as_mut() {
                let Engine { ring, fixed, .. } = e;
                fixed.unpin(ring, pinned);
            }
        }
        // No caller drops a handle from inside the engine; should one, its ranges stay
        // registered (and mapped) until the thread ends.
        Err(_) => log::error!("io_uring: fixed buffers released while the engine is busy: kept"),
    });
}

/// `f` of this thread's engine, if it has one and it is not in use.
fn peek<T>(f: impl FnOnce(&Engine) -> T) -> Option<T> {
    ENGINE
        .try_with(|cell| cell.try_borrow().ok().and_then(|e| e.as_ref().map(f)))
        .ok()
        .flatten()
}

/// Fixed-buffer slots this thread's table has free (all of them before its first
/// use).
pub fn fixed_free_slots() -> usize {
    peek(|e| e.fixed.free_slots()).unwrap_or(fixed::TABLE_SLOTS as usize)
}

/// This thread's operations that used fixed buffers, and the bytes registered.
pub fn fixed_stats() -> (u64, u64) {
    peek(|e| (e.fixed.ops, e.fixed.bytes)).unwrap_or((0, 0))
}

/// `fdatasync(fd)`.
pub fn fdatasync(fd: RawFd) -> Op {
    start(
        |_, _, _| {
            opcode::Fsync::new(types::Fd(fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build()
        },
        None,
        None,
    )
}

/// `fallocate(fd, mode, offset, len)`.
pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> Op {
    start(
        |_, _, _| {
            opcode::Fallocate::new(types::Fd(fd), len)
                .offset(offset)
                .mode(mode)
                .build()
        },
        None,
        None,
    )
}

/// Completes after `ns` nanoseconds.
pub async fn sleep_ns(ns: u64) {
    let ts = Box::new(
        types::Timespec::new()
            .sec(ns / 1_000_000_000)
            .nsec((ns % 1_000_000_000) as u32),
    );
    let op = start(
        |_, ts, _| {
            let p: *const types::Timespec = ts.as_deref().expect("timespec given");
            opcode::Timeout::new(p).build()
        },
        None,
        Some(ts),
    );
    // A timeout completes with -ETIME: that is its success.
    let _ = op.await;
}

/// Runs `fut` to completion on this thread, driving the executor and the engine
/// (for control-plane work outside iothreads, job threads, and tests).
///
/// When nothing is ready it sleeps on the engine's eventfd, which both completions
/// (the eventfd is registered with the ring) and wakes from other threads (the
/// executor's remote notification) write: a future waiting for another thread (a
/// drained section ending, a job request from the control thread) costs no CPU.
pub fn block_on<T: 'static>(fut: impl Future<Output = T> + 'static) -> T {
    let out = std::rc::Rc::new(RefCell::new(None));
    let out2 = out.clone();
    super::executor::spawn(async move {
        let v = fut.await;
        *out2.borrow_mut() = Some(v);
    });
    set_eventfd_enabled(true);
    loop {
        super::executor::run_ready();
        if let Some(v) = out.borrow_mut().take() {
            return v;
        }
        if super::executor::has_ready() {
            continue;
        }
        if let Err(e) = submit() {
            log::error!("io_uring submit failed: {e}");
        }
        if reap() > 0 || super::executor::has_remote_wakes() {
            continue;
        }
        wait_eventfd();
    }
}

/// Sleeps until the engine's eventfd is written (a completion or a remote wake), then
/// clears it.
fn wait_eventfd() {
    let Ok(fd) = eventfd() else {
        std::thread::yield_now();
        return;
    };
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd that lives across the call.
    let r = unsafe { libc::poll(&mut pfd, 1, -1) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            log::error!("poll on the io_uring eventfd failed: {e}");
        }
    }
    clear_eventfd();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aio::iovec::AlignedBuf;
    use std::sync::Arc;

    #[test]
    fn write_then_read_a_temp_file() {
        let path = std::env::temp_dir().join(format!("vubd-uring-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let fd = file.as_raw_fd();
        let mut wbuf = AlignedBuf::zeroed(4096, 4096);
        wbuf.as_mut_slice().fill(0xab);
        let wbuf = Arc::new(wbuf);
        let rbuf = Arc::new(AlignedBuf::zeroed(4096, 4096));
        let r2 = rbuf.clone();
        let n = block_on(async move {
            writev(fd, 8192, IoVec::from_buf(wbuf), 0).await.unwrap();
            fdatasync(fd).await.unwrap();
            sleep_ns(1000).await;
            readv(fd, 8192, IoVec::from_buf(r2)).await.unwrap()
        });
        assert_eq!(n, 4096);
        assert!(rbuf.as_slice().iter().all(|b| *b == 0xab));
        let err = block_on(async move { readv(-1, 0, IoVec::new(None)).await });
        assert!(err.is_err());
        drop(file);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn thread_exit_cancels_and_waits_for_operations_in_flight() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the local array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let buf = Arc::new(AlignedBuf::zeroed(4096, 4096));
        let b2 = buf.clone();
        let reader = fds[0];
        let t = std::thread::spawn(move || {
            // A read of an empty pipe stays in flight until cancelled.
            let op = readv(reader, 0, IoVec::from_buf(b2));
            submit().unwrap();
            assert_eq!(in_flight(), 1);
            // The future goes away first (its slot keeps the buffer), then the thread.
            drop(op);
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(t.join().is_ok()).unwrap());
        let joined = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(joined, Ok(true), "the thread did not exit");
        // The kernel is done with the buffer: the engine released its keepalive.
        assert_eq!(Arc::strong_count(&buf), 1);
        // Nothing was left reading the pipe: data written now stays in it.
        // SAFETY: fcntl, write and read on the pipe we own, from and into locals.
        unsafe {
            // A read left behind would take the byte; fail rather than block then.
            libc::fcntl(fds[0], libc::F_SETFL, libc::O_NONBLOCK);
            assert_eq!(libc::write(fds[1], [7u8].as_ptr().cast(), 1), 1);
            let mut b = [0u8; 1];
            assert_eq!(libc::read(fds[0], b.as_mut_ptr().cast(), 1), 1);
            assert_eq!(b[0], 7);
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }
}

//! Worker threads: each runs an epoll loop over the kick eventfds of its queues and
//! the descriptors its device asks for (the io_uring completion eventfd, a wake
//! eventfd), and hands every event to the device.

use super::vring::Vring;
use super::QueueDevice;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// The epoll token of the exit eventfd.
const EXIT_TOKEN: u64 = u64::MAX;

/// One worker thread and what it waits on.
pub struct Worker {
    epoll: Arc<Epoll>,
    exit: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts worker `index` serving `vrings` (global queue indexes `queues`).
    pub fn spawn<D: QueueDevice>(
        name: String,
        index: usize,
        device: Arc<D>,
        vrings: Vec<Arc<Vring>>,
    ) -> io::Result<Worker> {
        let epoll = Arc::new(Epoll::new()?);
        let exit = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
        epoll.ctl(
            ControlOperation::Add,
            exit.as_raw_fd(),
            EpollEvent::new(EventSet::IN, EXIT_TOKEN),
        )?;
        let (ep, ex) = (epoll.clone(), exit.clone());
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(index, &*device, &vrings, &ep, &ex))?;
        Ok(Worker {
            epoll,
            exit,
            thread: Some(thread),
        })
    }

    /// Starts waiting on `fd` with `token` (a kick: the thread-local vring index).
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    }

    /// Stops waiting on `fd` (before it is closed).
    pub fn remove(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    /// Asks the thread to exit and waits for it. The device's `thread_exit` runs on
    /// the thread first; the thread's io_uring waits for its operations in flight.
    pub fn stop(&mut self) {
        let _ = self.exit.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("a vhost-user worker thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run<D: QueueDevice>(
    index: usize,
    device: &D,
    vrings: &[Arc<Vring>],
    epoll: &Epoll,
    exit: &EventFd,
) {
    match device.thread_fds(index) {
        Ok(fds) => {
            for (fd, token) in fds {
                if let Err(e) = epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                ) {
                    log::error!("vhost-user worker {index}: cannot wait on fd {fd}: {e}");
                }
            }
        }
        Err(e) => log::error!("vhost-user worker {index}: {e}"),
    }
    let mut events = vec![EpollEvent::default(); 64];
    'outer: loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("vhost-user worker {index}: epoll_wait: {e}");
                break;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == EXIT_TOKEN {
                let _ = exit.read();
                break 'outer;
            }
            if let Some(v) = usize::try_from(token).ok().and_then(|t| vrings.get(t)) {
                v.read_kick();
            }
            device.handle_event(index, token, vrings);
        }
    }
    device.thread_exit(index);
}

//! One virtqueue of a vhost-user connection: the split ring (virtio-queue's `Queue`)
//! with the eventfds the frontend gave for it, and whether the frontend has started
//! and enabled it.
//!
//! The vhost-user handler thread configures a vring; the worker thread that owns the
//! queue pops chains and pushes used elements. A mutex serialises the two; the worker
//! takes it once per batch, the handler only while the frontend reconfigures.

use super::super::request::Memory;
use std::io;
use std::sync::{Mutex, MutexGuard};
use virtio_queue::{Error as QueueError, Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;

/// The state behind a [`Vring`]'s lock.
pub struct VringState {
    queue: Queue,
    kick: Option<EventFd>,
    call: Option<EventFd>,
    err: Option<EventFd>,
    /// SET_VRING_ENABLE (or enabled at start when protocol features are off).
    enabled: bool,
    /// Started by SET_VRING_KICK and stopped by GET_VRING_BASE.
    started: bool,
    mem: GuestMemoryAtomic<Memory>,
}

impl VringState {
    /// Whether the device may read and write this ring: started, enabled, and its
    /// addresses valid in the current memory table.
    pub fn is_live(&self) -> bool {
        self.started && self.enabled && self.queue.ready()
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    pub fn is_started(&self) -> bool {
        self.started
    }

    pub fn get_queue(&self) -> &Queue {
        &self.queue
    }

    pub fn get_queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    pub fn kick(&self) -> Option<&EventFd> {
        self.kick.as_ref()
    }

    pub(super) fn set_kick(&mut self, fd: Option<EventFd>) -> Option<EventFd> {
        std::mem::replace(&mut self.kick, fd)
    }

    pub(super) fn set_call(&mut self, fd: Option<EventFd>) {
        self.call = fd;
    }

    pub(super) fn set_err(&mut self, fd: Option<EventFd>) {
        self.err = fd;
    }

    pub(super) fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
    }

    pub(super) fn set_started(&mut self, on: bool) {
        self.started = on;
    }

    /// Signals the frontend's call eventfd (an interrupt for the guest).
    pub fn signal_used_queue(&self) -> io::Result<()> {
        match &self.call {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }

    /// Signals the error eventfd, if the frontend gave one (a broken ring).
    pub fn signal_error(&self) {
        if let Some(fd) = &self.err {
            let _ = fd.write(1);
        }
    }

    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        let mem = self.mem.memory();
        self.queue.add_used(&*mem, head, len)
    }

    /// [`VringState::add_used`] with a memory table the caller loaded (once for a
    /// batch): the current one, as the ring's state is only valid in it.
    pub fn add_used_in(&mut self, mem: &Memory, head: u16, len: u32) -> Result<(), QueueError> {
        self.queue.add_used(mem, head, len)
    }

    pub fn enable_notification(&mut self) -> Result<bool, QueueError> {
        let mem = self.mem.memory();
        self.queue.enable_notification(&*mem)
    }

    pub fn disable_notification(&mut self) -> Result<(), QueueError> {
        let mem = self.mem.memory();
        self.queue.disable_notification(&*mem)
    }

    pub fn needs_notification(&mut self) -> Result<bool, QueueError> {
        let mem = self.mem.memory();
        self.queue.needs_notification(&*mem)
    }

    /// Resets the ring to its state before the frontend set it up (RESET_DEVICE,
    /// RESET_OWNER, a new connection).
    pub(super) fn reset(&mut self) {
        self.queue.reset();
        self.kick = None;
        self.call = None;
        self.err = None;
        self.enabled = false;
        self.started = false;
    }
}

/// A virtqueue shared by the handler thread and a worker thread.
pub struct Vring {
    state: Mutex<VringState>,
}

impl Vring {
    pub fn new(mem: GuestMemoryAtomic<Memory>, max_size: u16) -> Result<Vring, QueueError> {
        Ok(Vring {
            state: Mutex::new(VringState {
                queue: Queue::new(max_size)?,
                kick: None,
                call: None,
                err: None,
                enabled: false,
                started: false,
                mem,
            }),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, VringState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Consumes the kick eventfd's count (after epoll reported it readable).
    pub fn read_kick(&self) {
        if let Some(k) = self.lock().kick() {
            let _ = k.read();
        }
    }
}

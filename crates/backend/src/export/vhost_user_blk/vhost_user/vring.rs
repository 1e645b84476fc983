//! One virtqueue of a vhost-user connection: the split ring (virtio-queue's `Queue`)
//! with the eventfds the frontend gave for it, and whether the frontend has started
//! and enabled it.
//!
//! The vhost-user handler thread configures a vring; the worker thread that owns the
//! queue pops chains and pushes used elements. A mutex serialises the two; the worker
//! takes it once per batch, the handler only while the frontend reconfigures.

use super::super::request::{self, Memory};
use std::io;
use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::{Mutex, MutexGuard};
use virtio_queue::{Error as QueueError, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

/// Bytes of a used ring element (id, len).
const USED_ELEM_LEN: u64 = 8;
use vmm_sys_util::eventfd::EventFd;

/// Where a used ring lies ([`VringState::used_ring`]): its host address when the
/// whole ring is in one region, 4-byte aligned; else written through vm-memory.
#[derive(Clone, Copy)]
pub enum UsedRing {
    Mapped(*mut u8),
    Guest,
}

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
    /// Used elements added (by [`VringState::add_used_to`]) since the last
    /// [`VringState::needs_notification`], as virtio-queue's `num_added` for its own
    /// `add_used`.
    added: u16,
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
        self.added = 0;
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

    /// Where the used ring lies in `mem` (a memory table the caller loaded, once for
    /// a batch: the current one, as the ring's state is only valid in it), for a
    /// batch of [`VringState::add_used_to`] under one lock of the ring.
    pub fn used_ring(&self, mem: &Memory) -> UsedRing {
        let q = &self.queue;
        let used = q.used_ring();
        // flags, idx, ring[size] of (id: u32, len: u32)
        let ring_len = 4 + USED_ELEM_LEN * u64::from(q.size());
        match request::host_range(mem, used, ring_len) {
            Some(p) if used.is_multiple_of(4) => UsedRing::Mapped(p),
            _ => UsedRing::Guest,
        }
    }

    /// Adds a used element, with the used ring resolved by [`VringState::used_ring`]
    /// in `mem` under this lock of the ring.
    ///
    /// Virtio 1.2, 2.7.8: the element goes to the used ring's next slot, then the
    /// index moves past it with release semantics, so a driver that sees the index
    /// sees the element. Written through the host mapping when the ring lies in one
    /// region (always, in practice), else through vm-memory's checked accesses.
    #[inline(always)]
    pub fn add_used_to(
        &mut self,
        ring: UsedRing,
        mem: &Memory,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        let q = &mut self.queue;
        let size = q.size();
        if head >= size {
            return Err(QueueError::InvalidDescriptorIndex);
        }
        let used = q.used_ring();
        let next = q.next_used();
        let slot = u64::from(next % size);
        let new = next.wrapping_add(1);
        match ring {
            UsedRing::Mapped(p) => {
                // SAFETY: `used_ring` found the whole used ring of this queue (whose
                // address and size cannot change while the caller holds the ring's
                // lock) inside one mapped region of `mem`, which the caller holds;
                // `slot < size`, so the element's 8 bytes and the index at offset 2 are
                // inside it; the ring is 4-byte aligned, so both u32 words and the u16
                // index are aligned. Volatile and atomic: the driver reads the ring
                // concurrently.
                unsafe {
                    let elem = p.add(4 + (USED_ELEM_LEN * slot) as usize).cast::<u32>();
                    elem.write_volatile(u32::from(head).to_le());
                    elem.add(1).write_volatile(len.to_le());
                    AtomicU16::from_ptr(p.add(2).cast::<u16>())
                        .store(new.to_le(), Ordering::Release);
                }
            }
            UsedRing::Guest => {
                let at = used
                    .checked_add(4 + USED_ELEM_LEN * slot)
                    .ok_or(QueueError::AddressOverflow)?;
                let elem = (u64::from(len) << 32 | u64::from(head)).to_le();
                mem.write_obj(elem, GuestAddress(at))
                    .map_err(QueueError::GuestMemory)?;
                let idx = used.checked_add(2).ok_or(QueueError::AddressOverflow)?;
                mem.store(new.to_le(), GuestAddress(idx), Ordering::Release)
                    .map_err(QueueError::GuestMemory)?;
            }
        }
        q.set_next_used(new);
        self.added = self.added.wrapping_add(1);
        Ok(())
    }

    pub fn enable_notification(&mut self) -> Result<bool, QueueError> {
        let mem = self.mem.memory();
        self.queue.enable_notification(&*mem)
    }

    pub fn disable_notification(&mut self) -> Result<(), QueueError> {
        let mem = self.mem.memory();
        self.queue.disable_notification(&*mem)
    }

    /// Whether the used elements added since the last call need a notification
    /// (virtio 1.2, 2.7.10): always without VIRTIO_F_EVENT_IDX; with it, when the
    /// driver's `used_event` lies among them (the Linux driver's `vring_need_event`).
    pub fn needs_notification(&mut self) -> Result<bool, QueueError> {
        let used_idx = Wrapping(self.queue.next_used());
        let added = Wrapping(std::mem::take(&mut self.added));
        // The used index is written before the driver's event index is read; the
        // driver writes its event index before it reads the used index.
        fence(Ordering::SeqCst);
        if !self.queue.event_idx_enabled() {
            return Ok(true);
        }
        let mem = self.mem.memory();
        let at = self
            .queue
            .avail_ring()
            .checked_add(4 + 2 * u64::from(self.queue.size()))
            .ok_or(QueueError::AddressOverflow)?;
        let used_event: u16 = mem
            .load(GuestAddress(at), Ordering::Relaxed)
            .map_err(QueueError::GuestMemory)?;
        let used_event = Wrapping(u16::from_le(used_event));
        Ok(used_idx - used_event - Wrapping(1) < added)
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
        self.added = 0;
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
                added: 0,
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

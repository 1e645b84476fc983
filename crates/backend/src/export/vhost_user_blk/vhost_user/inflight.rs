//! In-flight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) for split rings.
//!
//! The backend keeps, in shared memory the frontend holds on to, which descriptor
//! heads it has taken from each ring and not yet returned. When the backend dies and a
//! new one connects, the frontend hands the region back (SET_INFLIGHT_FD) and the new
//! backend resubmits exactly those requests, in the order they were taken, and none
//! of those that completed; without it, a reconnect can only rewind to the used index,
//! which is wrong as soon as requests complete out of order.
//!
//! Layout, per queue (the vhost-user specification's split-ring format, as QEMU's
//! libvhost-user and SPDK use it), each queue's part aligned to 64 bytes:
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];
//! ```
//!
//! Updates are ordered so that a SIGKILL between any two stores leaves a state the
//! next backend repairs: a head is marked (counter, then flag) before its request
//! starts; before its used element is published `last_batch_head` names it; after the
//! used index is published the flag is cleared and `used_idx` follows. If the saved
//! `used_idx` differs from the ring's, the kill fell between publishing the used
//! element and clearing the flag, and `last_batch_head` says which flag to clear.

use super::shm::{SharedMap, ShmError};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};

/// Each queue's part starts on this alignment.
const ALIGNMENT: u64 = 64;
const QUEUE_HEADER: u64 = 16;
const DESC_STATE: u64 = 16;
/// The region format version.
const VERSION: u16 = 1;

/// Bytes of one queue's part for a ring of `queue_size` entries.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (QUEUE_HEADER + DESC_STATE * u64::from(queue_size)).next_multiple_of(ALIGNMENT)
}

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("bad inflight region geometry: {0}")]
    Geometry(String),
    #[error("cannot create the inflight region: {0}")]
    Create(io::Error),
    #[error("cannot map the inflight region: {0}")]
    Map(#[from] ShmError),
}

/// A mapped inflight region (all queues).
pub struct InflightRegion {
    map: SharedMap,
    num_queues: u16,
    queue_size: u16,
    fd: OwnedFd,
}

impl InflightRegion {
    /// A new, zeroed region (GET_INFLIGHT_FD) in a memfd.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<InflightRegion, InflightError> {
        if num_queues == 0 || queue_size == 0 || !queue_size.is_power_of_two() {
            return Err(InflightError::Geometry(format!(
                "{num_queues} queues of {queue_size}"
            )));
        }
        let len = queue_region_size(queue_size) * u64::from(num_queues);
        // SAFETY: memfd_create with a static NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"vubd-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(InflightError::Create(io::Error::last_os_error()));
        }
        // SAFETY: a descriptor memfd_create just returned, owned from here on.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: ftruncate on the memfd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(InflightError::Create(io::Error::last_os_error()));
        }
        Self::map(fd, 0, len, num_queues, queue_size)
    }

    /// Maps a region the frontend handed back (SET_INFLIGHT_FD).
    pub fn open(
        fd: OwnedFd,
        offset: u64,
        len: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        if num_queues == 0 || queue_size == 0 {
            return Err(InflightError::Geometry(format!(
                "{num_queues} queues of {queue_size}"
            )));
        }
        let need = queue_region_size(queue_size) * u64::from(num_queues);
        if len < need {
            return Err(InflightError::Geometry(format!(
                "{len} bytes for {num_queues} queues of {queue_size} (need {need})"
            )));
        }
        Self::map(fd, offset, need, num_queues, queue_size)
    }

    fn map(
        fd: OwnedFd,
        offset: u64,
        len: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        Ok(InflightRegion {
            map: SharedMap::map(&fd, offset, len)?,
            num_queues,
            queue_size,
            fd,
        })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The part of queue `q`, if the region has one.
    pub fn queue(&self, q: usize) -> Option<QueueInflight<'_>> {
        (q < usize::from(self.num_queues)).then(|| QueueInflight {
            region: self,
            base: queue_region_size(self.queue_size) as usize * q,
        })
    }
}

/// One queue's part of the region.
#[derive(Clone, Copy)]
pub struct QueueInflight<'a> {
    region: &'a InflightRegion,
    base: usize,
}

impl<'a> QueueInflight<'a> {
    fn at<T>(&self, off: usize) -> &'a T {
        debug_assert!(self.base + off + std::mem::size_of::<T>() <= self.region.map.len());
        // SAFETY: the offset lies inside the mapping (queue parts are laid out by
        // `queue_region_size`, fields inside a part by the format above), is aligned
        // for T (parts are 64-byte aligned, fields naturally aligned), and T is an
        // atomic type, valid for any bit pattern and safe to share with another
        // process writing the same memory.
        unsafe { &*self.region.map.ptr().add(self.base + off).cast::<T>() }
    }

    fn version(&self) -> &'a AtomicU16 {
        self.at(8)
    }

    fn desc_num(&self) -> &'a AtomicU16 {
        self.at(10)
    }

    fn last_batch_head(&self) -> &'a AtomicU16 {
        self.at(12)
    }

    fn used_idx(&self) -> &'a AtomicU16 {
        self.at(14)
    }

    fn flag(&self, head: u16) -> &'a AtomicU8 {
        self.at(QUEUE_HEADER as usize + DESC_STATE as usize * usize::from(head))
    }

    fn counter(&self, head: u16) -> &'a AtomicU64 {
        self.at(QUEUE_HEADER as usize + DESC_STATE as usize * usize::from(head) + 8)
    }

    fn valid_head(&self, head: u16) -> bool {
        head < self.region.queue_size
    }

    /// Marks `head` as taken (before its request starts), with its fetch order.
    pub fn mark(&self, head: u16, counter: u64) {
        if !self.valid_head(head) {
            return;
        }
        self.counter(head).store(counter, Ordering::Relaxed);
        // The counter is in place before the flag says the entry counts.
        self.flag(head).store(1, Ordering::Release);
    }

    /// Before `head`'s used element is published.
    pub fn pre_put(&self, head: u16) {
        if self.valid_head(head) {
            self.last_batch_head().store(head, Ordering::Release);
            fence(Ordering::SeqCst);
        }
    }

    /// After the used index `used_idx` (which includes `head`) was published.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        fence(Ordering::SeqCst);
        if self.valid_head(head) {
            self.flag(head).store(0, Ordering::Release);
        }
        fence(Ordering::SeqCst);
        self.used_idx().store(used_idx, Ordering::Release);
    }

    /// Forgets every entry (the device was reset; its rings start anew).
    pub fn clear(&self) {
        for h in 0..self.region.queue_size {
            self.flag(h).store(0, Ordering::Relaxed);
        }
        self.used_idx().store(0, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// When the ring starts: repairs a kill between publishing a used element and
    /// clearing its flag (given the ring's real used index), and returns the heads
    /// still in flight in the order they were taken, with the next counter value.
    /// A fresh region is initialised and has none.
    pub fn recover(&self, ring_used_idx: u16) -> (Vec<u16>, u64) {
        if self.version().load(Ordering::Acquire) == 0 {
            self.version().store(VERSION, Ordering::Relaxed);
            self.desc_num()
                .store(self.region.queue_size, Ordering::Relaxed);
            self.used_idx().store(ring_used_idx, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            return (Vec::new(), 0);
        }
        if self.used_idx().load(Ordering::Acquire) != ring_used_idx {
            let h = self.last_batch_head().load(Ordering::Acquire);
            if self.valid_head(h) {
                self.flag(h).store(0, Ordering::Release);
            }
            fence(Ordering::SeqCst);
            self.used_idx().store(ring_used_idx, Ordering::Release);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.region.queue_size)
            .filter(|&h| self.flag(h).load(Ordering::Acquire) == 1)
            .map(|h| (self.counter(h).load(Ordering::Acquire), h))
            .collect();
        heads.sort_unstable();
        let next = heads.last().map_or(0, |&(c, _)| c + 1);
        (heads.into_iter().map(|(_, h)| h).collect(), next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_the_specification() {
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(1024), 16448);
        assert!(InflightRegion::create(2, 100).is_err());
        let r = InflightRegion::create(2, 128).unwrap();
        assert_eq!(r.len(), 2 * 2112);
        assert!(r.queue(1).is_some() && r.queue(2).is_none());
    }

    #[test]
    fn tracks_out_of_order_completions_and_survives_a_reopen() {
        let r = InflightRegion::create(1, 16).unwrap();
        let q = r.queue(0).unwrap();
        assert_eq!(q.recover(0), (vec![], 0));
        // Heads 5, 3, 9 taken in that order; 3 completes first.
        q.mark(5, 0);
        q.mark(3, 1);
        q.mark(9, 2);
        q.pre_put(3);
        q.post_put(3, 1);
        // A new backend maps the same memory (through a duplicate of the fd).
        let fd = r.fd().try_clone().unwrap();
        let again = InflightRegion::open(fd, 0, r.len(), 1, 16).unwrap();
        let (heads, next) = again.queue(0).unwrap().recover(1);
        assert_eq!(heads, vec![5, 9]);
        assert_eq!(next, 3);
    }

    #[test]
    fn a_kill_between_used_index_and_flag_is_repaired() {
        let r = InflightRegion::create(1, 8).unwrap();
        let q = r.queue(0).unwrap();
        q.recover(0);
        q.mark(2, 0);
        q.mark(4, 1);
        // 4 completed: its used element and the ring's used index (1) were published,
        // then the process died before clearing the flag.
        q.pre_put(4);
        let (heads, _) = q.recover(1);
        assert_eq!(heads, vec![2]);
        // Nothing was completed: the saved and real used indexes agree.
        let (heads, _) = q.recover(1);
        assert_eq!(heads, vec![2]);
    }

    #[test]
    fn short_regions_and_bad_offsets_are_refused() {
        let r = InflightRegion::create(1, 8).unwrap();
        let fd = r.fd().try_clone().unwrap();
        assert!(InflightRegion::open(fd, 0, 10, 1, 8).is_err());
        let fd = r.fd().try_clone().unwrap();
        assert!(InflightRegion::open(fd, 100, r.len(), 1, 8).is_err());
    }
}

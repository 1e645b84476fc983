//! Shared mappings of descriptors the frontend holds too (the dirty log, the inflight
//! region): mapped read-write and shared, guarded against truncation (see
//! [`super::sigbus`]), unmapped when dropped. Their users access them only through
//! atomics.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("offset {0} is not page-aligned")]
    Offset(u64),
    #[error("size {0} cannot be mapped")]
    Size(u64),
    #[error("{0}")]
    Mmap(io::Error),
}

/// A shared read-write mapping of `len` bytes of a descriptor.
pub struct SharedMap {
    ptr: *mut u8,
    len: usize,
    _guard: Option<super::sigbus::Registration>,
}

// SAFETY: plain shared memory; the users of the mapping access it through atomics
// only, and the pointer stays valid until Drop unmaps it.
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Maps `len` bytes at `offset` (page-aligned) of `fd`.
    pub fn map(fd: &OwnedFd, offset: u64, len: u64) -> Result<SharedMap, ShmError> {
        let off = libc::off_t::try_from(offset)
            .ok()
            .filter(|o| o % 4096 == 0)
            .ok_or(ShmError::Offset(offset))?;
        let len_usize = usize::try_from(len)
            .ok()
            .filter(|&l| l > 0)
            .ok_or(ShmError::Size(len))?;
        // SAFETY: a new shared mapping of a descriptor we hold (it may be closed
        // afterwards; the mapping stays); no existing memory is affected, and the
        // result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(ShmError::Mmap(io::Error::last_os_error()));
        }
        Ok(SharedMap {
            ptr: ptr.cast(),
            len: len_usize,
            // The frontend keeps the file and could shrink it under us.
            _guard: super::sigbus::register(ptr.cast(), len_usize),
        })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; its users borrow the
        // value that owns it, so no reference into it outlives it.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

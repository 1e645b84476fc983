//! Dirty-page logging for live migration (VHOST_F_LOG_ALL with
//! VHOST_USER_PROTOCOL_F_LOG_SHMFD).
//!
//! While the frontend migrates the VM's RAM, it must learn of every guest page the
//! device writes behind its back: data read from disk into guest buffers, status
//! bytes, used-ring updates. The frontend shares a bitmap (SET_LOG_BASE), one bit per
//! 4 KiB page of guest physical memory, bit `page % 8` of byte `page / 8`; the
//! device sets bits with atomic ORs after each write (a page marked after its write
//! is copied again even if the frontend copied it in between).

use super::shm::{SharedMap, ShmError};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU8, Ordering};

/// `VHOST_LOG_PAGE`
pub const LOG_PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("cannot map the log: {0}")]
    Map(#[from] ShmError),
}

/// The frontend's dirty bitmap, mapped.
pub struct DirtyLog {
    map: SharedMap,
    /// Pages the log covers (marks beyond are dropped, with one warning).
    pages: u64,
    warned: std::sync::atomic::AtomicBool,
}

impl DirtyLog {
    /// Maps `size` bytes at `offset` of the frontend's log descriptor.
    pub fn map(fd: OwnedFd, offset: u64, size: u64) -> Result<DirtyLog, DirtyLogError> {
        Ok(DirtyLog {
            map: SharedMap::map(&fd, offset, size)?,
            pages: size.saturating_mul(8),
            warned: Default::default(),
        })
    }

    /// Marks the pages of guest physical `gpa..gpa+len` dirty.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        if last >= self.pages {
            if !self.warned.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "vhost-user: a write at {gpa:#x}+{len} is beyond the dirty log ({} \
                     pages); not logged",
                    self.pages
                );
            }
            if first >= self.pages {
                return;
            }
        }
        for page in first..=last.min(self.pages - 1) {
            let byte = (page / 8) as usize;
            // SAFETY: `byte` < the mapping's length because page < self.pages = 8 *
            // len; the byte is accessed atomically, as the frontend does.
            let b = unsafe { &*self.map.ptr().add(byte).cast::<AtomicU8>() };
            b.fetch_or(1 << (page % 8), Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};

    fn memfd(len: u64) -> OwnedFd {
        // SAFETY: memfd_create with a static name; ftruncate on the new descriptor.
        unsafe {
            let fd = libc::memfd_create(c"vubd-log-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
            OwnedFd::from_raw_fd(fd)
        }
    }

    #[test]
    fn marks_the_bits_of_every_page_touched() {
        let fd = memfd(4096);
        let check = fd.try_clone().unwrap();
        let log = DirtyLog::map(fd, 0, 16).unwrap();
        // Page 0, pages 9..=10 (crossing a page boundary), page 127 (the last one).
        log.mark(100, 1);
        log.mark(9 * 4096 + 4000, 200);
        log.mark(127 * 4096, 4096);
        // Beyond the log: dropped, no crash.
        log.mark(128 * 4096, 1);
        let mut bytes = [0u8; 16];
        // SAFETY: pread into a local buffer from the memfd we own.
        let n = unsafe { libc::pread(check.as_raw_fd(), bytes.as_mut_ptr().cast(), 16, 0) };
        assert_eq!(n, 16);
        assert_eq!(bytes[0], 0b0000_0001);
        assert_eq!(bytes[1], 0b0000_0110);
        assert_eq!(bytes[15], 0b1000_0000);
        assert!(bytes[2..15].iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_geometry_is_refused() {
        assert!(DirtyLog::map(memfd(4096), 0, 0).is_err());
        assert!(DirtyLog::map(memfd(8192), 100, 16).is_err());
    }
}

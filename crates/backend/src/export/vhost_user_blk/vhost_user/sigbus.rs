//! Surviving a frontend that shrinks shared memory it handed over.
//!
//! Guest memory, the dirty log and the inflight region are files (usually memfds) that
//! the frontend shares with the daemon. vubd checks their size when it maps them, but
//! the frontend keeps its descriptor and may truncate the file afterwards. Touching a
//! page of a shared mapping past the new end of its file raises SIGBUS, whose default
//! action would end the whole daemon and every other VM's disk with it.
//!
//! vubd registers each such mapping here. A SIGBUS handler looks the faulting address
//! up. If it lies in a registered mapping, the handler maps a private zero page over
//! the faulting page and returns, so the access is retried and succeeds. The frontend
//! that did this sees garbage in its own memory, nothing else does. Any other SIGBUS
//! goes back to the default action: it is a real bug, and the process must not carry
//! on.
//!
//! Everything the handler touches is async-signal-safe: fixed arrays of atomics and
//! the `mmap`/`sigaction` system calls.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

/// Mappings registered at once, at most (guest regions of every connection, logs,
/// inflight regions). A mapping that finds no slot is served unprotected.
const SLOTS: usize = 4096;

static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static LENS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// Pages the handler replaced so far (reported by [`take_recovered`]).
static RECOVERED: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

/// A registered mapping; dropping it unregisters it. Drop it only once the mapping
/// is gone or no longer accessed.
#[derive(Debug)]
pub struct Registration {
    slot: usize,
}

impl Drop for Registration {
    fn drop(&mut self) {
        LENS[self.slot].store(0, Ordering::Release);
        STARTS[self.slot].store(0, Ordering::Release);
    }
}

/// Registers `start..start+len` (a shared file mapping the frontend controls).
pub fn register(start: *const u8, len: usize) -> Option<Registration> {
    INSTALL.call_once(install);
    if len == 0 {
        return None;
    }
    for slot in 0..SLOTS {
        // A slot is taken by writing its start first (0 marks it free).
        if STARTS[slot]
            .compare_exchange(0, start as usize, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            LENS[slot].store(len, Ordering::Release);
            return Some(Registration { slot });
        }
    }
    log::warn!("vhost-user: no free slot to guard a shared mapping against truncation");
    None
}

/// Pages replaced by zero pages since the last call (for a log line).
pub fn take_recovered() -> u64 {
    RECOVERED.swap(0, Ordering::AcqRel)
}

fn install() {
    // SAFETY: a sigaction struct zeroed and then filled; the handler has the
    // SA_SIGINFO signature; installing it affects only SIGBUS.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
            log::warn!(
                "vhost-user: cannot install the SIGBUS handler: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Whether `addr` lies in a registered mapping.
fn registered(addr: usize) -> bool {
    (0..SLOTS).any(|s| {
        let start = STARTS[s].load(Ordering::Acquire);
        let len = LENS[s].load(Ordering::Acquire);
        start != 0 && addr >= start && addr - start < len
    })
}

/// Maps a private zero page (of `size` bytes, aligned down) over `addr`.
///
/// # Safety
/// `addr` must lie in a registered mapping: the page belongs to shared memory the
/// frontend gave, which the daemon only reads and writes as guest data.
unsafe fn replace_page(addr: usize, size: usize) -> bool {
    let page = addr & !(size - 1);
    // SAFETY: per the contract the page lies inside a mapping of ours, so MAP_FIXED
    // replaces only (part of) that mapping.
    let p = unsafe {
        libc::mmap(
            page as *mut libc::c_void,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    p != libc::MAP_FAILED
}

extern "C" fn handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; si_addr is
    // the faulting address for SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    if registered(addr) {
        // A 4 KiB page; a hugetlbfs mapping only splits at its page size.
        // SAFETY: `addr` lies in a registered mapping (checked above).
        if unsafe { replace_page(addr, 4096) || replace_page(addr, 2 << 20) } {
            RECOVERED.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    // Not ours, or not repairable: the default action (the fault recurs on return).
    // SAFETY: resetting SIGBUS to its default disposition with a zeroed sigaction.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    #[test]
    fn a_truncated_registered_mapping_reads_zeroes_instead_of_killing() {
        // SAFETY: memfd_create/ftruncate/mmap on a new descriptor we own; the mapping
        // is used only below and unmapped at the end.
        unsafe {
            let fd = libc::memfd_create(c"vubd-sigbus-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            let fd = OwnedFd::from_raw_fd(fd);
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), 8192), 0);
            let p = libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let p = p.cast::<u8>();
            p.add(4096).write_volatile(7);
            let reg = register(p, 8192).expect("a slot");
            // The "frontend" shrinks the file under us.
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), 4096), 0);
            assert_eq!(p.add(4096).read_volatile(), 0);
            p.add(4100).write_volatile(9);
            assert_eq!(p.add(4100).read_volatile(), 9);
            assert!(take_recovered() >= 1);
            drop(reg);
            libc::munmap(p.cast(), 8192);
        }
    }
}

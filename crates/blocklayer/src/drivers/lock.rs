//! Image locking compatible with QEMU's file-posix driver: open file description (OFD)
//! byte-range locks on bytes 100+bit ("this opener holds permission bit") and
//! 200+bit ("this opener does not share permission bit"). Because vubd uses the same
//! bytes and bits as QEMU, vubd, qemu-storage-daemon and qemu-img see each other's
//! locks: two writers can never open one image.

use crate::error::{BlockError, Result};
use std::os::fd::RawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// QEMU's permission bits (BLK_PERM_*).
pub const PERM_CONSISTENT_READ: u32 = 0x01;
pub const PERM_WRITE: u32 = 0x02;
pub const PERM_WRITE_UNCHANGED: u32 = 0x04;
pub const PERM_RESIZE: u32 = 0x08;
const PERM_BITS: u32 = 4;

fn perm_name(bit: u32) -> &'static str {
    match 1 << bit {
        PERM_CONSISTENT_READ => "consistent read",
        PERM_WRITE => "write",
        PERM_WRITE_UNCHANGED => "write unchanged",
        _ => "resize",
    }
}

fn flock(kind: i32, byte: i64) -> libc::flock {
    // SAFETY: `flock` is plain data; all-zero is a valid value that we then fill in.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn set_lock(fd: RawFd, kind: i32, byte: i64) -> std::io::Result<()> {
    let fl = flock(kind, byte);
    // SAFETY: fcntl with F_OFD_SETLK reads a valid `flock` we own.
    let r = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether another open file description holds a lock on `byte`.
fn locked_by_other(fd: RawFd, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: fcntl with F_OFD_GETLK reads and writes a valid `flock` we own.
    let r = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }
}

/// Takes the locks for holding `perm` while sharing only `shared` with other openers,
/// failing (like QEMU) if another opener's locks conflict.
pub fn lock_image(fd: RawFd, path: &str, perm: u32, shared: u32) -> Result<()> {
    let err = |e: std::io::Error| BlockError::Lock(format!("Failed to lock '{path}': {e}"));
    for bit in 0..PERM_BITS {
        if perm & (1 << bit) != 0 {
            set_lock(fd, libc::F_RDLCK, PERM_BASE + i64::from(bit)).map_err(err)?;
        }
        if shared & (1 << bit) == 0 {
            set_lock(fd, libc::F_RDLCK, SHARED_BASE + i64::from(bit)).map_err(err)?;
        }
    }
    for bit in 0..PERM_BITS {
        if perm & (1 << bit) != 0
            && locked_by_other(fd, SHARED_BASE + i64::from(bit)).map_err(err)?
        {
            return Err(BlockError::Lock(format!(
                "Failed to get \"{}\" lock on '{path}': is another process using the image?",
                perm_name(bit)
            )));
        }
        if shared & (1 << bit) == 0
            && locked_by_other(fd, PERM_BASE + i64::from(bit)).map_err(err)?
        {
            return Err(BlockError::Lock(format!(
                "Failed to get shared \"{}\" lock on '{path}': is another process using the image?",
                perm_name(bit)
            )));
        }
    }
    Ok(())
}

/// Drops every lock this opener holds (before the image is reopened by a new
/// opener of this process, whose locks would otherwise conflict with these).
pub fn unlock_image(fd: RawFd) {
    for bit in 0..PERM_BITS {
        let _ = set_lock(fd, libc::F_UNLCK, PERM_BASE + i64::from(bit));
        let _ = set_lock(fd, libc::F_UNLCK, SHARED_BASE + i64::from(bit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn two_writers_conflict_two_readers_do_not() {
        let path = std::env::temp_dir().join(format!("vubd-lock-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let p = path.to_str().unwrap();
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap()
        };
        let rw_perm = PERM_CONSISTENT_READ | PERM_WRITE;
        let shared = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;
        let a = open();
        lock_image(a.as_raw_fd(), p, rw_perm, shared).unwrap();
        // A failed opener closes its file, dropping whatever locks it took.
        assert!(lock_image(open().as_raw_fd(), p, rw_perm, shared).is_err());
        assert!(lock_image(open().as_raw_fd(), p, PERM_CONSISTENT_READ, shared).is_err());
        drop(a);
        let d = open();
        lock_image(d.as_raw_fd(), p, PERM_CONSISTENT_READ, shared).unwrap();
        let e = open();
        lock_image(e.as_raw_fd(), p, PERM_CONSISTENT_READ, shared).unwrap();
        std::fs::remove_file(path).unwrap();
    }
}

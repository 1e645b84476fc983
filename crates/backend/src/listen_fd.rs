//! Listening sockets handed to vubd as file descriptors: `addr.type=fd,addr.str=S`
//! (exports, the NBD server) and `--chardev socket,fd=S` (a monitor).
//!
//! `S` is either a descriptor number the daemon inherited (QEMU's reading of
//! `addr.str` on its command line) or the name of a socket passed by systemd socket
//! activation (`LISTEN_FDS`, named by `FileDescriptorName=`, which arrive in
//! `LISTEN_FDNAMES`), as QEMU's `addr.str` names a descriptor passed with `getfd`.
//!
//! [`init`] runs first thing in `main`, while the process has one thread: it reads
//! and unsets the activation variables, marks every inherited descriptor (3 and up)
//! close-on-exec and remembers them. Only a remembered descriptor can be claimed, and
//! each only once ([`take_listener`]): `addr.str=7` never takes over a descriptor the
//! daemon opened itself (an image, a client's connection).
//!
//! As QEMU (`socket_listen()` for `fd`), a socket that is bound but not yet listening
//! is made to listen; anything else is refused with QEMU's texts.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Mutex;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;
/// The listen backlog asked for (as QEMU's socket listeners).
const BACKLOG: libc::c_int = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FdError {
    #[error("File descriptor '{0}' is not a socket")]
    NotSocket(String),
    #[error("File descriptor named '{0}' has not been found")]
    NoSuchName(String),
    #[error("File descriptor '{0}' was not passed to vubd at start-up, or is already in use")]
    NotInherited(String),
    #[error("Failed to listen on fd socket: {0}")]
    Listen(String),
    #[error("File descriptor '{fd}' is not a {expected} socket")]
    WrongFamily { fd: String, expected: &'static str },
}

/// The address family of a claimed socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Unix,
    Inet,
}

/// What [`init`] found.
#[derive(Debug, Default)]
struct Inherited {
    /// Inherited descriptors nobody has claimed yet.
    fds: BTreeSet<RawFd>,
    /// Sockets passed by systemd, by name (the first of a name wins).
    names: HashMap<String, RawFd>,
}

static INHERITED: Mutex<Option<Inherited>> = Mutex::new(None);

fn lock() -> std::sync::MutexGuard<'static, Option<Inherited>> {
    INHERITED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes stock of the inherited descriptors and of systemd's socket activation, and
/// unsets `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` (children must not think
/// the sockets are theirs). Call once, before any thread starts and before the
/// daemon opens anything.
pub fn init() {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let mut inherited = Inherited {
        fds: open_fds(),
        names: HashMap::new(),
    };
    for &fd in &inherited.fds {
        set_cloexec(fd);
    }
    let ours = pid.and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    if let (true, Some(n)) = (ours, count.and_then(|n| n.parse::<RawFd>().ok())) {
        inherited.names = activation_names(n, names.as_deref());
        inherited.names.retain(|_, fd| inherited.fds.contains(fd));
    }
    *lock() = Some(inherited);
}

/// The names of systemd's `n` sockets: `LISTEN_FDNAMES` is a colon-separated list,
/// one per socket in order; a socket without a name (or with the name `unknown`,
/// systemd's default for `sd_listen_fds_with_names`) gets none.
fn activation_names(n: RawFd, names: Option<&str>) -> HashMap<String, RawFd> {
    let mut out = HashMap::new();
    let Some(names) = names else {
        return out;
    };
    for (i, name) in names.split(':').enumerate().take(n.max(0) as usize) {
        if name.is_empty() || name == "unknown" {
            continue;
        }
        out.entry(name.to_string())
            .or_insert(LISTEN_FDS_START + i as RawFd);
    }
    out
}

/// The process's open descriptors from 3 up.
fn open_fds() -> BTreeSet<RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return BTreeSet::new();
    };
    let listing: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= LISTEN_FDS_START)
        .collect();
    // The directory's own descriptor was open while it was read and is closed now.
    listing.into_iter().filter(|&fd| is_open(fd)).collect()
}

fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

fn set_cloexec(fd: RawFd) {
    // SAFETY: F_GETFD/F_SETFD only read and change the descriptor's flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}

/// Claims the listening socket `addr.str` names (a number, or the name of a socket
/// passed by systemd), UNIX or TCP, makes it listen if it only was bound, and returns
/// it with its family. The descriptor is the caller's from now on.
pub fn take_listener(s: &str) -> Result<(OwnedFd, Family), FdError> {
    claim(s, true, true)
}

/// As [`take_listener`], for a UNIX socket only (vhost-user and the monitor pass
/// descriptors over it).
pub fn take_unix_listener(s: &str) -> Result<UnixListener, FdError> {
    claim(s, false, true).map(|(fd, _)| UnixListener::from(fd))
}

/// Claims a connected UNIX socket (`--chardev socket,fd=S` without `server=on`).
pub fn take_unix_stream(s: &str) -> Result<UnixStream, FdError> {
    claim(s, false, false).map(|(fd, _)| UnixStream::from(fd))
}

fn claim(s: &str, allow_inet: bool, listen: bool) -> Result<(OwnedFd, Family), FdError> {
    let mut guard = lock();
    let inherited = guard.get_or_insert_with(Inherited::default);
    let fd = match s.parse::<RawFd>() {
        Ok(fd) => fd,
        Err(_) => *inherited
            .names
            .get(s)
            .ok_or_else(|| FdError::NoSuchName(s.to_string()))?,
    };
    if fd < 0 || !is_open(fd) || !is_socket(fd) {
        return Err(FdError::NotSocket(s.to_string()));
    }
    if !inherited.fds.contains(&fd) {
        return Err(FdError::NotInherited(s.to_string()));
    }
    let family = match socket_domain(fd) {
        Some(libc::AF_UNIX) => Family::Unix,
        Some(libc::AF_INET | libc::AF_INET6) if allow_inet => Family::Inet,
        _ => {
            return Err(FdError::WrongFamily {
                fd: s.to_string(),
                expected: if allow_inet { "UNIX or TCP" } else { "UNIX" },
            })
        }
    };
    // SAFETY: listen() on a socket descriptor; an unbound or connected socket fails
    // with EINVAL and is left as it was.
    if listen && unsafe { libc::listen(fd, BACKLOG) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(FdError::Listen(blocklayer::error::io_error_text(&e)));
    }
    inherited.fds.remove(&fd);
    inherited.names.retain(|_, named| *named != fd);
    // SAFETY: `fd` is open, was inherited and was claimed by nobody before (it is
    // now out of the table): this OwnedFd is its only owner.
    Ok((unsafe { OwnedFd::from_raw_fd(fd) }, family))
}

fn is_socket(fd: RawFd) -> bool {
    // SAFETY: fstat writes into the zeroed stat structure we own.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
    }
}

fn socket_domain(fd: RawFd) -> Option<libc::c_int> {
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_DOMAIN writes one c_int into `domain`, whose size `len` gives.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_names_follow_systemd() {
        let names = activation_names(3, Some("exp0:unknown:qmp"));
        assert_eq!(names.get("exp0"), Some(&3));
        assert_eq!(names.get("qmp"), Some(&5));
        assert_eq!(names.len(), 2);
        // More names than sockets: the extra ones mean nothing.
        assert_eq!(activation_names(1, Some("a:b")).len(), 1);
        assert!(activation_names(2, None).is_empty());
        // A repeated name is the first socket's.
        assert_eq!(activation_names(2, Some("a:a")).get("a"), Some(&3));
    }
}

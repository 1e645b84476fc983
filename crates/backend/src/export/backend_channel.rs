//! Sending VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the backend channel.
//!
//! The frontend hands the backend a socket for backend-initiated messages
//! (VHOST_USER_SET_BACKEND_REQ_FD). vhost 0.18 wraps it in a `Backend` that cannot
//! send CONFIG_CHANGE_MSG (its `handle_config_change` is the trait's ENOSYS default)
//! and does not expose the socket. So when the channel arrives, vubd finds that socket
//! among its own descriptors and keeps a duplicate to send the message itself.
//!
//! The channel is one end of a socketpair the frontend made: an AF_UNIX stream socket
//! with no address. Every other AF_UNIX socket of vubd is bound or accepted on a
//! named path (export and monitor sockets), so the unclaimed unnamed ones are backend
//! channels. Frontends send SET_BACKEND_REQ_FD during device set-up, one device at a
//! time, so a new channel is normally the only unclaimed one; should two arrive at
//! once, the newest descriptor is taken, and the worst outcome is a frontend told to
//! re-read its configuration for nothing.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("no backend channel socket found among the open descriptors")]
    NotFound,
    #[error("cannot read /proc/self/fd: {0}")]
    ListFds(io::Error),
    #[error("cannot duplicate the backend channel socket: {0}")]
    Dup(io::Error),
    #[error("sending CONFIG_CHANGE_MSG failed: {0}")]
    Send(io::Error),
}

/// Inodes of the channel sockets already claimed by a device.
static CLAIMED: Mutex<Option<HashSet<u64>>> = Mutex::new(None);

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`
const CONFIG_CHANGE_MSG: u32 = 2;
/// Message header flags: protocol version 1.
const VERSION_1: u32 = 0x1;

/// The backend channel of one frontend connection.
pub struct BackendChannel {
    fd: OwnedFd,
    inode: u64,
}

/// The inode of a descriptor, if it is an AF_UNIX stream socket without a local
/// address.
fn unnamed_unix_stream(fd: RawFd) -> Option<u64> {
    // SAFETY: fstat/getsockopt/getsockname write only into the zeroed local buffers
    // whose sizes are passed; `fd` may be any number (errors are checked).
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return None;
        }
        let mut ty: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        if libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        ) != 0
            || ty != libc::SOCK_STREAM
        {
            return None;
        }
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        let mut alen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut alen) != 0
            || addr.sun_family != libc::AF_UNIX as libc::sa_family_t
        {
            return None;
        }
        // Unnamed: the address is only the family.
        let family_len = std::mem::size_of::<libc::sa_family_t>() as libc::socklen_t;
        (alen <= family_len).then_some(st.st_ino)
    }
}

impl BackendChannel {
    /// Claims the backend channel socket the frontend has just sent.
    pub fn claim_new() -> Result<BackendChannel, ChannelError> {
        let mut claimed = CLAIMED.lock().unwrap_or_else(|p| p.into_inner());
        let claimed = claimed.get_or_insert_with(HashSet::new);
        let mut best: Option<(RawFd, u64)> = None;
        for entry in std::fs::read_dir("/proc/self/fd").map_err(ChannelError::ListFds)? {
            let Ok(entry) = entry else { continue };
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<RawFd>().ok())
            else {
                continue;
            };
            if let Some(inode) = unnamed_unix_stream(fd) {
                if !claimed.contains(&inode) && best.is_none_or(|(b, _)| fd > b) {
                    best = Some((fd, inode));
                }
            }
        }
        let (fd, inode) = best.ok_or(ChannelError::NotFound)?;
        // SAFETY: duplicating a descriptor that is open (just checked); the duplicate
        // is owned by the OwnedFd below.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(ChannelError::Dup(io::Error::last_os_error()));
        }
        claimed.insert(inode);
        Ok(BackendChannel {
            // SAFETY: `dup` is a fresh descriptor nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(dup) },
            inode,
        })
    }

    /// Tells the frontend that the configuration space changed (it re-reads it with
    /// GET_CONFIG). No reply is asked for, so the caller never waits on the frontend.
    pub fn send_config_change(&self) -> Result<(), ChannelError> {
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        // size (bytes 8..12): no payload
        // SAFETY: sending from a local buffer of the given length on a socket we own;
        // MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n == msg.len() as isize {
            Ok(())
        } else if n < 0 {
            Err(ChannelError::Send(io::Error::last_os_error()))
        } else {
            Err(ChannelError::Send(io::Error::other("short send")))
        }
    }
}

impl Drop for BackendChannel {
    fn drop(&mut self) {
        if let Some(set) = CLAIMED.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            set.remove(&self.inode);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn finds_the_socketpair_end_and_sends_the_message() {
        let (mut frontend, backend) = UnixStream::pair().unwrap();
        let ch = BackendChannel::claim_new().expect("channel found");
        // The claimed socket is one of the pair: the message reaches the other end.
        ch.send_config_change().unwrap();
        let mut got = [0u8; 12];
        let mut other = if ch.inode == unnamed_unix_stream(backend.as_raw_fd()).unwrap() {
            frontend.try_clone().unwrap()
        } else {
            backend.try_clone().unwrap()
        };
        other.read_exact(&mut got).unwrap();
        assert_eq!(u32::from_le_bytes(got[0..4].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(got[4..8].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(got[8..12].try_into().unwrap()), 0);
        let _ = &mut frontend;
    }
}

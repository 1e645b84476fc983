//! Listening sockets of the daemon's own servers (the NBD server, the metrics
//! endpoint): a UNIX or TCP listener bound from a [`ListenAddr`] or inherited
//! ([`crate::listen_fd`]), whose clients are [`Stream`]s.

use crate::config::NbdAddr as ListenAddr;
use crate::listen_fd::Family;
use blocklayer::nbd_stream::Stream;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("Failed to bind socket to {path}: {source}")]
    BindUnix {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Failed to bind socket: {0}")]
    BindInet(std::io::Error),
    #[error("Service '{0}' is not a valid port")]
    Port(String),
    #[error("socket '{0}' is in use by another process")]
    InUse(PathBuf),
    #[error(transparent)]
    Fd(#[from] crate::listen_fd::FdError),
}

pub enum Listener {
    /// With the path the daemon bound (removed when the server stops); none for an
    /// inherited socket, whose file belongs to whoever made it.
    Unix(UnixListener, Option<PathBuf>),
    Tcp(TcpListener),
}

impl Listener {
    /// Listens on `addr`. A stale UNIX socket of an earlier process is replaced, as
    /// QEMU does.
    pub fn bind(addr: &ListenAddr) -> Result<Listener, ListenError> {
        match addr {
            ListenAddr::Unix(path) => {
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    let _ = std::fs::remove_file(path);
                }
                let l = UnixListener::bind(path).map_err(|source| ListenError::BindUnix {
                    path: path.clone(),
                    source,
                })?;
                Ok(Listener::Unix(l, Some(path.clone())))
            }
            ListenAddr::Inet { host, port } => {
                let port: u16 = port.parse().map_err(|_| ListenError::Port(port.clone()))?;
                let l = TcpListener::bind((host.as_str(), port)).map_err(ListenError::BindInet)?;
                Ok(Listener::Tcp(l))
            }
            ListenAddr::Fd(name) => {
                let (fd, family) = crate::listen_fd::take_listener(name)?;
                Ok(match family {
                    Family::Unix => Listener::Unix(UnixListener::from(fd), None),
                    Family::Inet => Listener::Tcp(TcpListener::from(fd)),
                })
            }
        }
    }

    /// Like [`Listener::bind`], but a UNIX socket another process still listens on is
    /// refused rather than replaced.
    pub fn bind_unshared(addr: &ListenAddr) -> Result<Listener, ListenError> {
        if let ListenAddr::Unix(path) = addr {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::InUse(path.clone()));
            }
        }
        Listener::bind(addr)
    }

    pub fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    /// The UNIX socket's path (removed when the server stops).
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            Listener::Unix(_, p) => p.as_deref(),
            Listener::Tcp(_) => None,
        }
    }

    pub fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
    }
}

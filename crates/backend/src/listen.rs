//! Listening UNIX sockets that appear on the filesystem only once they accept.
//!
//! `bind(2)` creates the socket's file and `listen(2)` follows: a client that waits
//! for the file (as QEMU's test harnesses, libvirt and our own tests do) and connects
//! in between gets ECONNREFUSED. So the socket is bound and put to listening under a
//! temporary name in the same directory, then renamed into place (rename is atomic,
//! and a listening socket keeps working under its new name).

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The longest path a `sockaddr_un` holds (Linux: 108 bytes with the terminating NUL).
const SUN_PATH_MAX: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{0} is in use by another process")]
    InUse(PathBuf),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Listens on `path`. A stale socket file left there by a process that died is
/// replaced; one that still accepts is refused ([`ListenError::InUse`]).
pub fn unix_listener(path: &Path) -> Result<UnixListener, ListenError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ListenError::InUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let Some(tmp) = temporary_name(path) else {
        // No room for a longer name: bind in place (the short window remains).
        return Ok(UnixListener::bind(path)?);
    };
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    Ok(listener)
}

/// A name beside `path` for the socket until it listens, if one fits a socket address.
fn temporary_name(path: &Path) -> Option<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name()?.to_str()?;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.{}.{n}", std::process::id()));
    (tmp.as_os_str().len() <= SUN_PATH_MAX).then_some(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_under_its_name_and_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("vubd-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let l = unix_listener(&path).unwrap();
        UnixStream::connect(&path).unwrap();
        assert!(l.accept().is_ok());
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["s.sock"]);
        // Still accepting: a second listener is refused; once gone, the stale file is
        // replaced.
        assert!(matches!(unix_listener(&path), Err(ListenError::InUse(_))));
        drop(l);
        let l = unix_listener(&path).unwrap();
        UnixStream::connect(&path).unwrap();
        drop(l);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

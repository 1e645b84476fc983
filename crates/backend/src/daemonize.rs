//! `--daemonize`, as QEMU's: the process forks, the child starts a new session and
//! forks again, and the original process waits on a pipe. It exits 0 once the
//! daemon reports that it is ready (every socket listening, the pid file written)
//! or 1 if the daemon exits first (the daemon has printed its error on the standard
//! error it inherited). Once ready, the daemon's working directory is `/`, its
//! standard input, output and error are `/dev/null`, and its umask is 027.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum DaemonizeError {
    #[error("cannot daemonize: {0}")]
    Fork(std::io::Error),
    #[error("cannot finish daemonizing: {0}")]
    Ready(std::io::Error),
}

/// The daemon's end of the pipe its first parent waits on.
pub struct Readiness {
    pipe: File,
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Forks into the background. Must run while the process has a single thread.
/// Returns in the daemon; the original process exits when the daemon is ready or
/// gone.
pub fn daemonize() -> Result<Readiness, DaemonizeError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(DaemonizeError::Fork(last_error()));
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    let (read_end, write_end) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: the process has one thread (the caller's promise), so the child may go
    // on running Rust code.
    match unsafe { libc::fork() } {
        -1 => return Err(DaemonizeError::Fork(last_error())),
        0 => {}
        _ => {
            drop(write_end);
            std::process::exit(wait_for_daemon(read_end));
        }
    }
    drop(read_end);
    // SAFETY: setsid and fork take no pointers; one thread still.
    unsafe {
        if libc::setsid() < 0 {
            return Err(DaemonizeError::Fork(last_error()));
        }
        match libc::fork() {
            -1 => return Err(DaemonizeError::Fork(last_error())),
            0 => {}
            // The session leader goes: the daemon can never acquire a terminal.
            _ => libc::_exit(0),
        }
        libc::umask(0o027);
        libc::signal(libc::SIGTSTP, libc::SIG_IGN);
        libc::signal(libc::SIGTTOU, libc::SIG_IGN);
        libc::signal(libc::SIGTTIN, libc::SIG_IGN);
    }
    Ok(Readiness { pipe: write_end })
}

/// The original process: 0 if the daemon wrote its one zero byte, 1 otherwise.
fn wait_for_daemon(mut pipe: File) -> i32 {
    let mut status = [1u8; 1];
    match pipe.read(&mut status) {
        Ok(1) if status[0] == 0 => 0,
        _ => 1,
    }
}

impl Readiness {
    /// The daemon is up: detaches from the directory and the terminal and lets the
    /// original process exit 0.
    pub fn ready(mut self) -> Result<(), DaemonizeError> {
        std::env::set_current_dir("/").map_err(DaemonizeError::Ready)?;
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(DaemonizeError::Ready)?;
        let null = OwnedFd::from(null);
        for target in [libc::STDIN_FILENO, libc::STDOUT_FILENO, libc::STDERR_FILENO] {
            // SAFETY: dup2 onto a standard descriptor; `null` stays open meanwhile.
            if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), target) } < 0 {
                return Err(DaemonizeError::Ready(last_error()));
            }
        }
        self.pipe.write_all(&[0]).map_err(DaemonizeError::Ready)
    }
}

//! What a block backend does with a failed request (QEMU's `rerror`/`werror`,
//! `BlockdevOnError`, `blk_get_error_action`) and the I/O status it keeps
//! (`BlockDeviceIoStatus`).
//!
//! The decision is a pure function of the policy, the errno and the direction. The
//! state a `stop` leaves behind ([`ErrorState`]) is: stopped until `cont`, the I/O
//! status of the first error, and a generation that `cont` bumps so that requests
//! held by the stop know to retry.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

/// A policy for failed requests (QEMU's `BlockdevOnError`, without `auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// The error goes to the user (the guest).
    Report,
    /// The request completes as if it had succeeded.
    Ignore,
    /// The user stops; the request is held and retried on `cont`.
    Stop,
    /// Stop on ENOSPC, report anything else.
    Enospc,
}

impl OnError {
    pub fn name(self) -> &'static str {
        match self {
            OnError::Report => "report",
            OnError::Ignore => "ignore",
            OnError::Stop => "stop",
            OnError::Enospc => "enospc",
        }
    }

    /// What this policy does with a request that failed with `errno`.
    #[inline]
    pub fn action(self, errno: i32) -> ErrorAction {
        match self {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc if errno == libc::ENOSPC => ErrorAction::Stop,
            OnError::Enospc => ErrorAction::Report,
        }
    }
}

/// What happens to a failed request (QEMU's `BlockErrorAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    Report,
    Ignore,
    Stop,
}

impl ErrorAction {
    pub fn name(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

/// QEMU's `BlockDeviceIoStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    Ok = 0,
    Failed = 1,
    Nospace = 2,
}

impl IoStatus {
    pub fn name(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        }
    }

    /// The status a stopping error leaves.
    fn of_errno(errno: i32) -> IoStatus {
        if errno == libc::ENOSPC {
            IoStatus::Nospace
        } else {
            IoStatus::Failed
        }
    }
}

/// Whether a backend with these policies reports an I/O status (it can be stopped by
/// an error), as QEMU's `blk_iostatus_is_enabled` for a device that enabled it.
pub fn iostatus_enabled(rerror: OnError, werror: OnError) -> bool {
    matches!(werror, OnError::Stop | OnError::Enospc) || rerror == OnError::Stop
}

/// The stop state of one backend, shared by the threads that run its requests and
/// the control thread.
#[derive(Debug, Default)]
pub struct ErrorState {
    /// Set by an error with action `stop`, cleared by `cont`.
    stopped: AtomicBool,
    iostatus: AtomicU8,
    /// Bumped by `cont`: held requests retry.
    resume_gen: AtomicU64,
}

impl ErrorState {
    /// Whether an error stopped the backend (and no `cont` came since).
    #[inline]
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    pub fn iostatus(&self) -> IoStatus {
        match self.iostatus.load(Ordering::Acquire) {
            1 => IoStatus::Failed,
            2 => IoStatus::Nospace,
            _ => IoStatus::Ok,
        }
    }

    /// The `cont` generation: a request held by a stop read it before it ran, and
    /// retries once it has changed.
    #[inline]
    pub fn resume_gen(&self) -> u64 {
        self.resume_gen.load(Ordering::Acquire)
    }

    /// A request failed with action `stop`. The first error since `cont` stops the
    /// backend and sets the I/O status (QEMU keeps the first error too); returns
    /// whether this one did.
    pub fn stop(&self, errno: i32) -> bool {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.iostatus
            .store(IoStatus::of_errno(errno) as u8, Ordering::Release);
        true
    }

    /// Sets the I/O status back to `ok` (QEMU's `blk_iostatus_reset`).
    pub fn iostatus_reset(&self) {
        self.iostatus.store(IoStatus::Ok as u8, Ordering::Release);
    }

    /// `cont`: no longer stopped, the I/O status reset, held requests let retry.
    /// Returns whether the backend was stopped.
    pub fn cont(&self) -> bool {
        let was = self.stopped.swap(false, Ordering::SeqCst);
        self.iostatus_reset();
        self.resume_gen.fetch_add(1, Ordering::AcqRel);
        was
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ErrorAction::{Ignore as I, Report as R, Stop as S};

    const POLICIES: [OnError; 4] = [
        OnError::Report,
        OnError::Ignore,
        OnError::Stop,
        OnError::Enospc,
    ];

    /// QEMU's `blk_get_error_action`, for each policy and errno (the direction only
    /// chooses the policy, see `backend::tests`).
    #[test]
    fn action_table() {
        let errnos = [libc::EIO, libc::ENOSPC, libc::EACCES, libc::ENOTSUP];
        // Rows: policies in `POLICIES` order; columns: `errnos`.
        let want = [
            [R, R, R, R], // report
            [I, I, I, I], // ignore
            [S, S, S, S], // stop
            [R, S, R, R], // enospc
        ];
        for (p, row) in POLICIES.iter().zip(want) {
            for (errno, action) in errnos.iter().zip(row) {
                assert_eq!(p.action(*errno), action, "{} errno {errno}", p.name());
            }
        }
    }

    #[test]
    fn iostatus_enabled_by_policies_that_stop() {
        for r in POLICIES {
            for w in POLICIES {
                let want = r == OnError::Stop || w == OnError::Stop || w == OnError::Enospc;
                assert_eq!(iostatus_enabled(r, w), want, "{} {}", r.name(), w.name());
            }
        }
    }

    #[test]
    fn first_stop_sets_iostatus_until_cont() {
        let s = ErrorState::default();
        assert!(!s.is_stopped());
        assert_eq!(s.iostatus(), IoStatus::Ok);
        let gen = s.resume_gen();
        assert!(s.stop(libc::ENOSPC));
        assert!(s.is_stopped());
        assert_eq!(s.iostatus(), IoStatus::Nospace);
        // A later error keeps the first one's status.
        assert!(!s.stop(libc::EIO));
        assert_eq!(s.iostatus(), IoStatus::Nospace);
        assert_eq!(s.resume_gen(), gen);
        assert!(s.cont());
        assert!(!s.is_stopped());
        assert_eq!(s.iostatus(), IoStatus::Ok);
        assert_ne!(s.resume_gen(), gen);
        // `cont` without a stop: nothing was stopped, held requests still retry.
        let gen = s.resume_gen();
        assert!(!s.cont());
        assert_ne!(s.resume_gen(), gen);
        assert!(s.stop(libc::EIO));
        assert_eq!(s.iostatus(), IoStatus::Failed);
        s.iostatus_reset();
        assert_eq!(s.iostatus(), IoStatus::Ok);
        assert!(s.is_stopped());
    }

    #[test]
    fn names_are_qemus() {
        let names: Vec<_> = POLICIES.iter().map(|p| p.name()).collect();
        assert_eq!(names, ["report", "ignore", "stop", "enospc"]);
        assert_eq!(
            [R, I, S].map(ErrorAction::name),
            ["report", "ignore", "stop"]
        );
        assert_eq!(
            [IoStatus::Ok, IoStatus::Failed, IoStatus::Nospace].map(IoStatus::name),
            ["ok", "failed", "nospace"]
        );
    }
}

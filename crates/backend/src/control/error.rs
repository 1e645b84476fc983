//! The control plane's error: what went wrong ([`ErrorKind`], QEMU's error classes),
//! its description, and the error that caused it. The monitor turns it into a QMP
//! error reply in one place (`impl From<ControlError> for ControlError` in
//! [`crate::qmp::wire`]); the control plane knows nothing of the wire format.

use std::error::Error;
use std::fmt::Display;

/// The kind of failure, one per QEMU error class (`QapiErrorClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Anything else (QEMU's `GenericError`).
    GenericError,
    /// The operation does not exist.
    CommandNotFound,
    /// A block job that is not there (QEMU's `DeviceNotActive`).
    DeviceNotActive,
    /// An object or job that is not there (QEMU's `DeviceNotFound`).
    DeviceNotFound,
}

/// A failed control-plane operation.
#[derive(Debug, thiserror::Error)]
#[error("{desc}")]
pub struct ControlError {
    pub kind: ErrorKind,
    /// The description the user sees (QEMU's texts).
    pub desc: String,
    /// The lower-level error this one reports, if any.
    #[source]
    pub source: Option<Box<dyn Error + Send + Sync + 'static>>,
}

impl ControlError {
    pub fn new(kind: ErrorKind, desc: impl Into<String>) -> Self {
        ControlError {
            kind,
            desc: desc.into(),
            source: None,
        }
    }

    /// A [`ErrorKind::GenericError`] with a description.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorKind::GenericError, desc)
    }

    /// A [`ErrorKind::GenericError`] reporting `source` (its text is the description).
    pub fn from_source(source: impl Error + Send + Sync + 'static) -> Self {
        ControlError {
            kind: ErrorKind::GenericError,
            desc: source.to_string(),
            source: Some(Box::new(source)),
        }
    }

    /// A [`ErrorKind::GenericError`] from anything displayable (a message built
    /// elsewhere, with no error value to keep).
    pub fn msg(desc: impl Display) -> Self {
        Self::generic(desc.to_string())
    }
}

pub type OpResult<T> = std::result::Result<T, ControlError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_its_source() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let e = ControlError::from_source(io);
        assert_eq!(e.kind, ErrorKind::GenericError);
        assert!(e.desc.contains("No such file"));
        assert!(e.source().is_some());
        assert!(ControlError::generic("x").source().is_none());
    }
}

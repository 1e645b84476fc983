//! Errors of the block layer's request path and graph.

use std::io;

/// A failed block request or graph operation.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("{op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("request {offset}+{len} is beyond the end of node '{node}' ({size} bytes)")]
    OutOfRange {
        node: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("node '{0}' is read-only")]
    ReadOnly(String),
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    #[error("could not open '{path}': {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Lock(String),
    #[error("{0}")]
    Graph(String),
    #[error(transparent)]
    Options(#[from] crate::options::OptionsError),
    /// An internal snapshot operation failed; `errno` says how (ENOENT: no such
    /// snapshot, EEXIST: the name is taken, ENOTSUP, EIO...).
    #[error("{message}")]
    Snapshot { errno: i32, message: String },
}

pub type Result<T> = std::result::Result<T, BlockError>;

impl BlockError {
    pub fn io(op: &'static str, source: io::Error) -> Self {
        BlockError::Io { op, source }
    }

    /// The errno that best describes the failure (drives error policies and the status
    /// a frontend sees).
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::Io { source, .. } | BlockError::Open { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            BlockError::OutOfRange { .. } => libc::EIO,
            BlockError::ReadOnly(_) => libc::EACCES,
            BlockError::Unsupported(_) => libc::ENOTSUP,
            BlockError::Lock(_) => libc::EAGAIN,
            BlockError::Graph(_) | BlockError::Options(_) => libc::EINVAL,
            BlockError::Snapshot { errno, .. } => *errno,
        }
    }

    /// Whether the failure means "the driver cannot do this" (a fallback may apply).
    pub fn is_unsupported(&self) -> bool {
        self.errno() == libc::EOPNOTSUPP
    }
}

/// The C library's text for an errno ("Operation not supported"), as QEMU's
/// `error_setg_errno` appends it to messages.
pub fn strerror(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// An I/O error as QEMU (glib) words it: the C library's text, without Rust's
/// "(os error N)".
pub fn io_error_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(errno) => strerror(errno),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_texts() {
        assert_eq!(strerror(libc::ENOTSUP), "Operation not supported");
        assert_eq!(strerror(libc::EPERM), "Operation not permitted");
    }
}

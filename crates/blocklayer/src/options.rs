//! Typed blockdev options, QEMU's `BlockdevOptions` reduced to the drivers vubd has.
//!
//! The command line (`--blockdev`), the TOML file and (later) QMP `blockdev-add` all
//! produce a `serde_json::Value` in QEMU's shape; [`BlockdevOptions::from_json`] turns it
//! into these types. Values may be native JSON types or strings (the key=value syntax
//! yields strings only), as QEMU's keyval input visitor accepts.

use std::path::PathBuf;

/// Error parsing blockdev options; the message names the offending parameter the way
/// QEMU does ("Parameter 'x' is unexpected", "Parameter 'size' expects a size").
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("Parameter '{0}' is missing")]
    Missing(String),
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
    #[error("Parameter '{name}' expects {expected}")]
    Invalid { name: String, expected: String },
    #[error("Invalid parameter value for '{name}': {reason}")]
    BadValue { name: String, reason: String },
}

pub type Result<T> = std::result::Result<T, OptionsError>;

/// `discard=ignore|unmap` (QEMU also accepts `off`/`on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiscardMode {
    #[default]
    Ignore,
    Unmap,
}

/// `detect-zeroes=off|on|unmap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    #[default]
    Off,
    On,
    Unmap,
}

/// `locking=auto|on|off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockingMode {
    #[default]
    Auto,
    On,
    Off,
}

/// `aio=threads|native|io_uring`: accepted for compatibility; vubd always uses io_uring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AioMode {
    Threads,
    Native,
    #[default]
    IoUring,
}

/// Options every driver takes (QEMU's BlockdevOptions base).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommonOptions {
    /// `node-name`; required by vubd for top-level blockdevs (as qemu-storage-daemon).
    pub node_name: Option<String>,
    /// `discard`
    pub discard: DiscardMode,
    /// `cache.direct`
    pub cache_direct: bool,
    /// `cache.no-flush`
    pub cache_no_flush: bool,
    /// `read-only`
    pub read_only: bool,
    /// `auto-read-only`
    pub auto_read_only: bool,
    /// `force-share`
    pub force_share: bool,
    /// `detect-zeroes`
    pub detect_zeroes: DetectZeroes,
}

/// A child given either inline (a full options object) or by node-name reference.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockdevRef {
    Reference(String),
    Inline(Box<BlockdevOptions>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOptions {
    pub filename: PathBuf,
    /// `aio`
    pub aio: AioMode,
    /// `locking`
    pub locking: LockingMode,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawOptions {
    pub file: BlockdevRef,
    /// `offset` in bytes (default 0)
    pub offset: u64,
    /// `size` in bytes (default: the rest of the child)
    pub size: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NullOptions {
    /// `size` in bytes (QEMU's default is 1 GiB)
    pub size: u64,
    /// `read-zeroes` (QEMU's default is off: reads leave the buffer as it is)
    pub read_zeroes: bool,
    /// `latency-ns`
    pub latency_ns: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DriverOptions {
    File(FileOptions),
    /// `host_device`: the file driver on a block device
    HostDevice(FileOptions),
    Raw(RawOptions),
    /// `null-co` (and `null-aio`, handled alike)
    Null(NullOptions),
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockdevOptions {
    pub common: CommonOptions,
    pub driver: DriverOptions,
}

impl DriverOptions {
    /// The QEMU driver name.
    pub fn driver_name(&self) -> &'static str {
        match self {
            DriverOptions::File(_) => "file",
            DriverOptions::HostDevice(_) => "host_device",
            DriverOptions::Raw(_) => "raw",
            DriverOptions::Null(_) => "null-co",
        }
    }
}

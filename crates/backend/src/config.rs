//! The daemon's typed configuration: what `--object`, `--blockdev`, `--export` on the
//! command line and the sections of a `--config` TOML file are parsed into.
//! (QMP commands will take the same structures.)

use blocklayer::options::BlockdevOptions;
use std::path::PathBuf;

/// Error turning options into typed configuration; messages name the option and parameter.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{option}: {source}")]
    Options {
        option: String,
        source: blocklayer::options::OptionsError,
    },
    #[error("{option}: {message}")]
    Invalid { option: String, message: String },
    #[error("{0}")]
    Usage(String),
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Toml { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, ConfigError>;

/// `--object iothread,id=io0,poll-max-ns=..,poll-grow=..,poll-shrink=..,aio-max-batch=..`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoThreadConfig {
    pub id: String,
    /// QEMU default 32768 (32 us); 0 disables polling.
    pub poll_max_ns: u64,
    /// 0 means the default factor (2).
    pub poll_grow: u64,
    /// 0 means the default (halve on shrink... QEMU: reset to 0).
    pub poll_shrink: u64,
    /// 0 means the default batch.
    pub aio_max_batch: u64,
}

/// `--object ...`; only iothread objects exist so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectConfig {
    IoThread(IoThreadConfig),
}

/// `--export type=vhost-user-blk,...` (QEMU's BlockExportOptions + vhost-user-blk part).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    pub id: String,
    pub node_name: String,
    /// `writable` (default off, as QEMU)
    pub writable: bool,
    /// `writethrough` (default off): flush after every write before completing it
    pub writethrough: bool,
    /// `addr.type=unix,addr.path=...`: the vhost-user socket path
    pub socket_path: PathBuf,
    /// `num-queues` (default 1)
    pub num_queues: u16,
    /// `iothread` (a string) or `iothread.0=..,iothread.1=..` / a JSON array; empty means
    /// the export gets one iothread of its own with default polling properties.
    pub iothreads: Vec<String>,
    /// `fixed-iothread` (accepted; vubd never moves an export implicitly)
    pub fixed_iothread: bool,
    /// `logical-block-size`: 512 or 4096 (default 512)
    pub logical_block_size: u32,
    /// `serial` (vubd extension; default: the export id), at most 20 bytes
    pub serial: Option<String>,
    /// `queue-size` (vubd extension; max descriptors per queue, default 1024)
    pub queue_size: u16,
}

/// Everything the daemon is told to set up, in the order given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DaemonConfig {
    pub objects: Vec<ObjectConfig>,
    pub blockdevs: Vec<BlockdevOptions>,
    pub exports: Vec<ExportConfig>,
    /// `--pidfile`
    pub pidfile: Option<PathBuf>,
}

//! Events the block layer raises for the monitor (QEMU's `BLOCK_IMAGE_CORRUPTED`,
//! `BLOCK_IO_ERROR`, `BLOCK_WRITE_THRESHOLD`), typed: [`BlockEvent`].
//!
//! Drivers run on iothreads and know nothing of QMP; the daemon installs a sink
//! that forwards each event (its QMP name and data) to its monitor. Without a sink
//! (tools, unit tests) events are only logged.

use serde::Serialize;
use serde_json::Value;
use std::sync::{Arc, RwLock};

/// `BLOCK_WRITE_THRESHOLD`: a write ended past a node's threshold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct WriteThreshold {
    pub node_name: String,
    pub amount_exceeded: u64,
    pub write_threshold: u64,
}

/// `BLOCK_IMAGE_CORRUPTED`: an image's metadata is corrupt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageCorrupted {
    /// The backend's name: empty (vubd's backends have none).
    pub device: String,
    pub node_name: String,
    pub msg: String,
    pub fatal: bool,
}

/// `IoOperationType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoOperation {
    Read,
    Write,
}

/// `BLOCK_IO_ERROR`: a request failed and its error policy acted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct IoError {
    /// The backend's name: empty (vubd's backends have none).
    pub device: String,
    pub node_name: String,
    pub operation: IoOperation,
    /// `BlockErrorAction`: `ignore`, `report` or `stop`.
    pub action: &'static str,
    /// Whether the error was ENOSPC; only when the backend keeps an I/O status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nospace: Option<bool>,
    pub reason: String,
}

/// An event of the block layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockEvent {
    WriteThreshold(WriteThreshold),
    ImageCorrupted(ImageCorrupted),
    IoError(IoError),
}

impl BlockEvent {
    /// The QMP event name.
    pub fn name(&self) -> &'static str {
        match self {
            BlockEvent::WriteThreshold(_) => "BLOCK_WRITE_THRESHOLD",
            BlockEvent::ImageCorrupted(_) => "BLOCK_IMAGE_CORRUPTED",
            BlockEvent::IoError(_) => "BLOCK_IO_ERROR",
        }
    }

    /// The QMP event data.
    pub fn data(&self) -> Value {
        match self {
            BlockEvent::WriteThreshold(e) => crate::info::to_json(e),
            BlockEvent::ImageCorrupted(e) => crate::info::to_json(e),
            BlockEvent::IoError(e) => crate::info::to_json(e),
        }
    }
}

type Sink = Arc<dyn Fn(&'static str, Value) + Send + Sync>;

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

/// Sends every later event to `sink` (replacing any earlier one).
pub fn set_sink(sink: impl Fn(&'static str, Value) + Send + Sync + 'static) {
    *SINK.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(sink));
}

/// Raises an event.
pub fn emit(event: BlockEvent) {
    let (name, data) = (event.name(), event.data());
    let sink = SINK.read().unwrap_or_else(|p| p.into_inner()).clone();
    match sink {
        Some(sink) => sink(name, data),
        None => log::info!("event {name}: {data}"),
    }
}

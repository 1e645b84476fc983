//! Events the block layer raises for the monitor (QEMU's `BLOCK_IMAGE_CORRUPTED`,
//! `BLOCK_IO_ERROR`, `BLOCK_WRITE_THRESHOLD`), typed: [`BlockEvent`].
//!
//! Drivers run on iothreads and know nothing of QMP; the daemon installs a sink
//! that forwards each event to its monitor, which serialises it (its QMP name,
//! [`BlockEvent::name`], and its data, the event serialised). Without a sink (tools,
//! unit tests) events are only logged.

use serde::Serialize;
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

/// An event of the block layer; it serialises as its QMP data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
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
}

type Sink = Arc<dyn Fn(BlockEvent) + Send + Sync>;

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

/// Sends every later event to `sink` (replacing any earlier one).
pub fn set_sink(sink: impl Fn(BlockEvent) + Send + Sync + 'static) {
    *SINK.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(sink));
}

/// Raises an event.
pub fn emit(event: BlockEvent) {
    let sink = SINK.read().unwrap_or_else(|p| p.into_inner()).clone();
    match sink {
        Some(sink) => sink(event),
        None => log::info!(
            "event {}: {}",
            event.name(),
            serde_json::to_string(&event).unwrap_or_default()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events' data serialise as QEMU writes them.
    #[test]
    fn event_data_as_vubd_writes_it() {
        let e = BlockEvent::WriteThreshold(WriteThreshold {
            node_name: "n".into(),
            amount_exceeded: 1,
            write_threshold: 2,
        });
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"node-name":"n","amount-exceeded":1,"write-threshold":2}"#
        );
        let e = BlockEvent::IoError(IoError {
            device: String::new(),
            node_name: "n".into(),
            operation: IoOperation::Write,
            action: "stop",
            nospace: None,
            reason: "r".into(),
        });
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"device":"","node-name":"n","operation":"write","action":"stop","reason":"r"}"#
        );
    }
}

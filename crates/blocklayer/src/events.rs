//! Events the block layer raises for the monitor (QEMU's `BLOCK_IMAGE_CORRUPTED`).
//!
//! Drivers run on iothreads and know nothing of QMP; the daemon installs a sink
//! that forwards each event to its monitor. Without a sink (tools, unit tests)
//! events are only logged.

use serde_json::Value;
use std::sync::{Arc, RwLock};

type Sink = Arc<dyn Fn(&'static str, Value) + Send + Sync>;

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

/// Sends every later event to `sink` (replacing any earlier one).
pub fn set_sink(sink: impl Fn(&'static str, Value) + Send + Sync + 'static) {
    *SINK.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(sink));
}

/// Raises an event.
pub fn emit(name: &'static str, data: Value) {
    let sink = SINK.read().unwrap_or_else(|p| p.into_inner()).clone();
    match sink {
        Some(sink) => sink(name, data),
        None => log::info!("event {name}: {data}"),
    }
}

//! Delivery of QMP events to every client that has completed capabilities
//! negotiation.

use super::wire;
use serde_json::Value;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The sending half of one client connection, shared by its reader thread (replies)
/// and the event bus (events), so that messages never interleave.
pub struct ClientWriter {
    stream: Mutex<UnixStream>,
    pretty: bool,
}

impl ClientWriter {
    pub fn new(stream: UnixStream, pretty: bool) -> Self {
        ClientWriter {
            stream: Mutex::new(stream),
            pretty,
        }
    }

    /// Writes one message; an error means the client is gone.
    pub fn send(&self, v: &Value) -> std::io::Result<()> {
        let bytes = wire::encode(v, self.pretty);
        let mut s = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        s.write_all(&bytes)?;
        s.flush()
    }
}

#[derive(Default)]
pub struct EventBus {
    clients: Mutex<Vec<(u64, Arc<ClientWriter>)>>,
    next: AtomicU64,
}

impl EventBus {
    pub fn new() -> Arc<EventBus> {
        Arc::new(EventBus::default())
    }

    /// Starts sending events to a client; returns its registration for
    /// [`EventBus::unsubscribe`].
    pub fn subscribe(&self, client: Arc<ClientWriter>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, client));
        id
    }

    pub fn unsubscribe(&self, id: u64) {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(i, _)| *i != id);
    }

    /// Sends an event to every subscribed client; clients that cannot take it are
    /// dropped from the list (their reader thread notices the closed socket).
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let msg = wire::event(name, data);
        log::info!("event {name}: {msg}");
        let clients = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (id, c) in clients {
            if c.send(&msg).is_err() {
                self.unsubscribe(id);
            }
        }
    }
}

//! Delivery of QMP events to every client that has completed capabilities
//! negotiation. Emitting only queues the event in each client's [`Outbox`]: it never
//! waits for a client, so a client that does not read cannot hold up the control
//! thread (which emits most events) or the other clients.

use super::outbox::{Message, Outbox};
use super::wire;
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

type Subscribers = Vec<(u64, Arc<Outbox>)>;

#[derive(Default)]
pub struct EventBus {
    clients: Mutex<Subscribers>,
    next: AtomicU64,
}

impl EventBus {
    pub fn new() -> Arc<EventBus> {
        Arc::new(EventBus::default())
    }

    fn lock(&self) -> MutexGuard<'_, Subscribers> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts sending events to a client; returns its registration for
    /// [`EventBus::unsubscribe`].
    pub fn subscribe(&self, client: Arc<Outbox>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().push((id, client));
        id
    }

    pub fn unsubscribe(&self, id: u64) {
        self.lock().retain(|(i, _)| *i != id);
    }

    /// Queues an event for every subscribed client. Clients that are gone, or that
    /// have left too much output unread (see [`Outbox::event`]), are dropped from
    /// the list.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let msg = wire::event(name, data);
        log::info!("event {name}: {msg}");
        let mut compact: Option<Message> = None;
        let mut pretty: Option<Message> = None;
        self.lock().retain(|(_, c)| {
            let slot = if c.pretty() {
                &mut pretty
            } else {
                &mut compact
            };
            let bytes = slot.get_or_insert_with(|| wire::encode(&msg, c.pretty()).into());
            c.event(bytes)
        });
    }

    /// [`EventBus::emit`] with the data `data` serialises as.
    pub fn emit_data(&self, name: &str, data: &impl serde::Serialize) {
        self.emit(name, Some(blocklayer::info::to_json(data)));
    }
}

//! The QMP monitor: QEMU's management protocol on UNIX sockets
//! (`--chardev socket,id=..,path=..,server=on,wait=off --monitor chardev=..`).
//!
//! - [`wire`]: framing, envelopes, replies and events as QEMU writes them
//! - [`args`]: strict argument reading with QEMU's messages
//! - [`server`]: sockets, client threads, capabilities negotiation
//! - [`commands`]: the command table
//! - [`events`]: event delivery

pub mod args;
pub mod commands;
pub mod events;
pub mod server;
pub mod wire;

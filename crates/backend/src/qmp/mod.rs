//! The QMP monitor: QEMU's management protocol on UNIX sockets
//! (`--chardev socket,id=..,path=..,server=on,wait=off --monitor chardev=..`).
//!
//! - [`wire`]: envelopes, replies and events as QEMU writes them
//! - [`splitter`]: the input stream cut into JSON texts, within limits
//! - [`args`]: strict argument reading with QEMU's messages
//! - [`server`]: sockets, client threads, capabilities negotiation
//! - [`outbox`]: each client's bounded output queue and its writer
//! - [`commands`]: the command table (names, argument and return types, handlers),
//!   which drives dispatch, argument checks, `query-commands` and
//!   `query-qmp-schema`; [`schema`]: the QAPI types and events, and introspection;
//!   [`bitmap_commands`], [`nbd_commands`], [`qom_commands`]: handlers' argument
//!   reading for those commands; [`transaction`]: `transaction` and the commands
//!   that are one
//! - [`events`]: event delivery

pub mod args;
pub mod bitmap_commands;
pub mod commands;
pub mod events;
pub mod nbd_commands;
pub mod outbox;
pub mod qom_commands;
pub mod schema;
pub mod server;
pub mod splitter;
pub mod transaction;
pub mod wire;

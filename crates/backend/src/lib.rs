//! vubd: a vhost-user-blk storage daemon. The binary's pieces live here so that tests
//! and the `vubd` binary share them.

pub mod allocator;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod daemonize;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod img;
pub mod iothread;
pub mod jobs;
pub mod keyval;
pub mod listen;
pub mod listen_fd;
pub mod logging;
pub mod metrics;
pub mod qmp;
pub mod trace;

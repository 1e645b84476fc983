//! Drivers: protocol (`file`, `host_device`, `null-co`) and format (`raw`).

pub mod file;
pub mod lock;
pub mod null;
pub mod raw;

//! Drivers: protocol (`file`, `host_device`, `null-co`), format (`raw`) and filter
//! (`blkdebug`).

pub mod blkdebug;
pub mod file;
pub mod lock;
pub mod null;
pub mod qcow2;
pub mod raw;

//! Drivers: protocol (`file`, `host_device`, `null-co`), format (`raw`, `qcow2`) and
//! filter (`blkdebug`), and host file creation (`file_create`).

pub mod blkdebug;
pub mod file;
pub mod file_create;
pub mod job_filter;
pub mod lock;
pub mod null;
pub mod qcow2;
pub mod raw;

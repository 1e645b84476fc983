//! End-to-end test harness for vubd: starts the daemon (or `qemu-storage-daemon`, which
//! takes the same options), makes throw-away images, and drives the export through real
//! vhost-user frontends:
//!
//! * [`Client`]: libblkio's `virtio-blk-vhost-user` driver (what QEMU-less applications use);
//! * [`RawClient`]: libblkio's lower layer (`virtio-driver`) used directly, to send virtio-blk
//!   requests libblkio cannot produce (GET_ID, unknown types, unusual descriptor chains);
//! * [`vu_frontend::Frontend`]: a vhost-user frontend written by hand (messages, guest
//!   memory, split rings), for the hostile-frontend tests and their harness ([`hostile`]).
//!
//! Everything panics with a descriptive message on failure: this is test code.

pub mod args;
pub mod ceph;
pub mod client;
pub mod daemon;
pub mod guest;
pub mod hostile;
pub mod image;
pub mod libvirt;
pub mod placement;
pub mod qmp;
pub mod raw;
pub mod tools;
pub mod util;
pub mod vu_frontend;
pub mod workload;

pub use args::{simple_file_export, DaemonArgs};
pub use client::{Client, ClientOptions, IoQueue, Req};
pub use daemon::{
    jobs_daemon, pass_fd, qsd_bin, run_to_exit, run_to_exit_with, vubd_bin, Daemon, Exited,
};
pub use image::{SmallTmpfs, TempDir, TempImage};
pub use qmp::Qmp;
pub use raw::{RawClient, RawDesc};
pub use util::{assert_same_data, unique_name, Rng};
pub use workload::{exercise, exercise_queues, verify_all, ExerciseOpts};

/// Sector size of the virtio-blk protocol (offsets are always in 512-byte units).
pub const SECTOR: usize = 512;
pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * 1024 * 1024;

//! The vubd block layer: a graph of driver nodes and the shared request path.
//!
//! - [`aio`]: the iothread machinery (executor, io_uring engine, I/O vectors)
//! - [`node`], [`driver`], [`limits`]: nodes, the driver interface, merged limits
//! - [`io`]: the generic request path every node goes through
//! - [`drivers`]: the driver table and one folder per driver (`file`/`host_device`,
//!   `raw`, `null-co`, `qcow2`, `blkdebug`, `copy-on-read`)
//! - [`graph`]: node-names and opening nodes from [`options`]; [`reopen`]: new options
//!   for open nodes
//! - [`bitmap`], [`named_bitmap`]: dirty bitmaps, the named ones the monitor manages
//! - [`periodic`]: the housekeeping thread for periodic driver tasks
//! - [`secret`]: secret objects (passphrases and keys) that drivers look up by id
//! - [`snapshot`]: internal snapshots as drivers report them
//! - [`nbd_proto`]: the NBD wire format, and [`nbd_stream`] its sockets, which the
//!   `nbd` driver and the daemon's NBD server share
//! - [`throttle`]: throttle groups (limits, leaky buckets) for the `throttle` filter

pub mod aio;
pub mod backend;
pub mod bitmap;
pub mod block_copy;
pub mod block_status;
pub mod driver;
pub mod drivers;
pub mod edge;
pub mod error;
pub mod error_policy;
pub mod events;
pub mod filter;
pub mod format_info;
pub mod graph;
pub mod info;
pub mod io;
pub mod limits;
pub mod named_bitmap;
pub mod nbd_proto;
pub mod nbd_stream;
pub mod node;
pub mod options;
pub mod periodic;
pub mod perm;
pub mod persistent_bitmaps;
pub mod reopen;
pub mod secret;
pub mod snapshot;
pub mod stats;
pub mod throttle;
pub mod tls;

pub use error::{BlockError, Result};
pub use graph::Graph;
pub use node::Node;

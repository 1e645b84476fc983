//! I/O throttling as QEMU does it: `throttle-group` objects hold limits (leaky
//! buckets of operations and bytes, per direction and in total, with bursts) that
//! the `throttle` filter nodes joined to a group obey together.
//!
//! - [`config`]: the limits, `ThrottleLimits` and the `x-*` properties, validation
//! - [`group`]: the buckets and the queues of waiting requests on the request path
//! - [`slice`]: each thread's slices of its groups' buckets

pub mod config;
pub mod group;
mod slice;

pub use config::{Direction, ThrottleConfig};
pub use group::{Member, ThrottleGroup};

//! A node of the block graph (QEMU: BlockDriverState): a driver instance with a unique
//! node-name, its children, merged limits, flags and in-flight accounting.

use crate::driver::{Child, Driver};
use crate::limits::Limits;
use crate::options::DetectZeroes;
use crate::stats::IoStats;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Per-node flags that the generic request path applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeFlags {
    pub read_only: bool,
    /// `discard=unmap`: discard requests reach the driver (else they are ignored).
    pub discard_unmap: bool,
    pub detect_zeroes: DetectZeroes,
    /// `cache.no-flush`: flushes are ignored.
    pub no_flush: bool,
    /// `cache.direct`: the file is opened with O_DIRECT (reported only).
    pub cache_direct: bool,
}

pub struct Node {
    name: String,
    driver: Box<dyn Driver>,
    limits: Limits,
    flags: NodeFlags,
    /// Requests in the generic path right now.
    pub(crate) in_flight: AtomicU64,
    /// Bumped when a write-like request completes; a flush covers generation `n` once
    /// it has been started after generation `n` was reached.
    pub(crate) write_gen: AtomicU64,
    pub(crate) flushed_gen: AtomicU64,
    /// Aligned ranges being read-modify-written (serialised against each other).
    pub(crate) rmw_ranges: Mutex<Vec<(u64, u64)>>,
    pub(crate) rmw_count: AtomicUsize,
    /// Requests that went through this node.
    pub stats: IoStats,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver.driver_name())
            .finish()
    }
}

impl Node {
    /// Builds a node around an opened driver, merging its children's limits.
    pub fn new(name: String, driver: Box<dyn Driver>, mut flags: NodeFlags) -> Node {
        let mut limits = driver.own_limits();
        for child in driver.children() {
            limits = limits.merge(child.node.limits);
        }
        flags.read_only |= driver.is_read_only();
        Node {
            name,
            driver,
            limits,
            flags,
            in_flight: AtomicU64::new(0),
            write_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
            rmw_ranges: Mutex::new(Vec::new()),
            rmw_count: AtomicUsize::new(0),
            stats: IoStats::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn driver(&self) -> &dyn Driver {
        self.driver.as_ref()
    }

    pub fn driver_name(&self) -> &'static str {
        self.driver.driver_name()
    }

    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn flags(&self) -> NodeFlags {
        self.flags
    }

    pub fn is_read_only(&self) -> bool {
        self.flags.read_only
    }

    pub fn children(&self) -> Vec<Child> {
        self.driver.children()
    }

    /// Resizes the node (QEMU's `bdrv_truncate`); the caller drains it first.
    pub fn resize(&self, size: u64) -> crate::Result<()> {
        if self.is_read_only() {
            return Err(crate::BlockError::Graph("Image is read-only".into()));
        }
        self.driver.truncate(size)
    }

    /// Requests currently in this node's generic path.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Waits (from a control thread) until no request is in flight in this node or its
    /// children, or the timeout passes. Returns whether the node drained.
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.in_flight() == 0 && self.children().iter().all(|c| c.node.in_flight() == 0) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Decrements a node's in-flight counter when a request leaves the generic path.
pub(crate) struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    pub(crate) fn enter(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

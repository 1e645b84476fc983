//! The `blkdebug` filter driver: passes requests to its `image` child and fails those
//! that match an `inject-error` rule, so that error handling can be tested
//! reproducibly. Options are QEMU's.
//!
//! As in QEMU, events arm rules and requests check the armed ones: an event that some
//! rules wait for arms exactly those, until the next such event; a request fails if
//! an armed rule is of its `iotype` (default: any but block-status) and, when
//! `sector` is given, covers that sector. QEMU 7.2 accepts a rule on every one of its
//! events ([`BLKDEBUG_EVENTS`]), and so does vubd; events come from where QEMU raises
//! them ([`BLKDEBUG_NEVER_RAISED`] lists those that occur in neither daemon):
//! - `read_aio`/`write_aio` from the format above (raw, qcow2) before guest data
//!   I/O, not before metadata I/O; `read_backing_aio` from qcow2 on its file before
//!   it reads from its backing node;
//! - the qcow2 metadata events (`l1_*`, `l2_*`, `reftable_*`, `refblock_*`,
//!   `cluster_*`, `cow_*`, `read_compressed`, `write_compressed`) from the qcow
//!   crate (`qcow::DebugEvent`) on the image's file, at the steps QEMU's qcow2
//!   raises them (table loads are raised on cache misses only, as QEMU; refcount
//!   block lookups on hits too; `refblock_update_part` where QEMU writes its cached
//!   refcount blocks back, so at the flush after an allocating write);
//! - `none` once, when the node is opened;
//! - (no event) the ordering flushes qcow2 adds to an allocating write, which QEMU
//!   does not have, reach the image without a rule check (`flush_unchecked`);
//! - `flush_to_os`/`flush_to_disk` from the parent's flush;
//! - `pwritev`/`pwritev_zero` before and `pwritev_done` after blkdebug's own writes
//!   and write-zeroes; `pwritev_rmw_*` around the padding reads of a write that is
//!   not aligned to the node's `align` (a failed padding read does not fail the
//!   write, as in QEMU 7.2); `cor_write` from a `copy-on-read` filter before it
//!   writes a copy into this node.
//!
//! Discards check no rule; block-status queries (the allocation a `copy-on-read`
//! filter or a job asks for) check the `block-status` ones. Rules with `state` apply in state 1 (vubd has no
//! `set-state` rules). A `once` rule is removed after it fired.

use crate::aio::iovec::IoVec;
use crate::aio::LocalBoxFuture;
use crate::driver::Driver;
use crate::drivers::forward;
use crate::edge::Edge;
use crate::error::{BlockError, Result};
use crate::limits::Limits;
use std::sync::{Arc, Mutex};

mod options;

pub use options::{
    BlkdebugIoType, BlkdebugOptions, InjectErrorOptions, BLKDEBUG_EVENTS, BLKDEBUG_NEVER_RAISED,
};

/// The table row of `blkdebug`.
pub(crate) const ENTRY: super::DriverEntry = super::DriverEntry {
    names: &["blkdebug"],
    kind: super::Kind::Filter,
    parse: options::parse,
    create: None,
    reopen_mutable: &[],
};

pub struct BlkdebugDriver {
    image: Arc<Edge>,
    align: Option<u32>,
    max_transfer: Option<u32>,
    rules: Mutex<Rules>,
}

/// The `inject-error` rules, and which of them the last event that had any armed.
struct Rules {
    all: Vec<InjectErrorOptions>,
    /// Parallel to `all`.
    active: Vec<bool>,
}

/// The state blkdebug is in (it starts in 1 and vubd has no rules that change it).
const STATE: i64 = 1;

impl BlkdebugDriver {
    /// The node, after the `none` event that QEMU raises once when it opens one (so
    /// that a rule on `none` is armed from the start).
    pub fn new(image: Arc<Edge>, opts: &BlkdebugOptions) -> Self {
        let d = BlkdebugDriver {
            image,
            align: opts.align,
            max_transfer: opts.max_transfer,
            rules: Mutex::new(Rules {
                active: vec![false; opts.inject_error.len()],
                all: opts.inject_error.clone(),
            }),
        };
        d.event("none");
        d
    }

    /// An event: if rules wait for it, they (and only they) are armed from now on,
    /// until the next such event (QEMU's `blkdebug_debug_event`).
    fn event(&self, event: &str) {
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        let Rules { all, active } = &mut *rules;
        let hit = |r: &InjectErrorOptions| r.event == event && r.state.is_none_or(|s| s == STATE);
        if all.iter().any(hit) {
            for (r, a) in all.iter().zip(active.iter_mut()) {
                *a = hit(r);
            }
        }
    }

    /// Fails the request if an armed rule matches it (QEMU's `rule_check`).
    fn check(&self, kind: BlkdebugIoType, op: &'static str, offset: u64, len: u64) -> Result<()> {
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        let Rules { all, active } = &mut *rules;
        let hit = all.iter().zip(active.iter()).position(|(r, &armed)| {
            armed
                && r.iotype
                    .map_or(kind != BlkdebugIoType::BlockStatus, |t| t == kind)
                && (r.sector < 0 || {
                    let at = (r.sector as u64).saturating_mul(512);
                    len > 0 && at >= offset && at - offset < len
                })
        });
        let Some(i) = hit else {
            return Ok(());
        };
        let errno = all[i].errno;
        if all[i].once {
            all.remove(i);
            active.remove(i);
        }
        log::debug!("blkdebug: failing {op} at {offset}+{len} with errno {errno}");
        Err(BlockError::io(op, std::io::Error::from_raw_os_error(errno)))
    }
}

impl Driver for BlkdebugDriver {
    fn driver_name(&self) -> &'static str {
        "blkdebug"
    }

    fn size(&self) -> u64 {
        self.image.node().size()
    }

    fn own_limits(&self) -> Limits {
        let mut l = Limits::default();
        if let Some(a) = self.align {
            l.request_alignment = a;
        }
        if let Some(t) = self.max_transfer {
            l.max_transfer = u64::from(t);
        }
        l
    }

    fn children(&self) -> Vec<Arc<Edge>> {
        vec![self.image.clone()]
    }

    fn debug_event(&self, event: &'static str) {
        self.event(event);
    }

    fn takes_debug_events(&self) -> bool {
        true
    }

    fn supports_fua(&self) -> bool {
        true
    }

    fn is_read_only(&self) -> bool {
        self.image.node().is_read_only()
    }

    fn truncate(&self, size: u64) -> Result<()> {
        self.image.node().resize(size)
    }

    fn filename(&self) -> String {
        self.image.node().driver().filename()
    }

    fn actual_size(&self) -> Option<u64> {
        self.image.node().driver().actual_size()
    }

    /// Through to the image (QEMU's filter block status), after the rules of
    /// iotype `block-status`.
    fn is_allocated(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<(bool, u64)>> {
        Box::pin(async move {
            self.check(BlkdebugIoType::BlockStatus, "block status", offset, len)?;
            self.image.node().driver().is_allocated(offset, len).await
        })
    }

    fn read<'a>(&'a self, offset: u64, iov: IoVec) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check(BlkdebugIoType::Read, "read", offset, iov.len())?;
            self.image.node().read(offset, iov).await
        })
    }

    fn write<'a>(&'a self, offset: u64, iov: IoVec, fua: bool) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move {
            // Raised on every node's own write path in QEMU.
            self.event("pwritev");
            let r = match self.check(BlkdebugIoType::Write, "write", offset, iov.len()) {
                Ok(()) => self.image.node().write(offset, iov, fua).await,
                Err(e) => Err(e),
            };
            // After the request, failed or not, as QEMU.
            self.event("pwritev_done");
            r
        })
    }

    fn flush(&self) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.check(BlkdebugIoType::Flush, "flush", 0, 0)?;
            self.image.node().flush().await
        })
    }

    /// The format above's own ordering flush (no QEMU equivalent): no rule sees it.
    fn flush_unchecked(&self) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move { self.image.node().flush().await })
    }

    fn discard(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        forward::discard(&self.image, offset, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        forward::allocate(&self.image, offset, len)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> LocalBoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.event("pwritev_zero");
            let r = match self.check(BlkdebugIoType::WriteZeroes, "write zeroes", offset, len) {
                Ok(()) => {
                    self.image
                        .node()
                        .write_zeroes(offset, len, may_unmap, false)
                        .await
                }
                Err(e) => Err(e),
            };
            self.event("pwritev_done");
            r
        })
    }
}

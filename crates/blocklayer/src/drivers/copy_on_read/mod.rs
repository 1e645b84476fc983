//! The `copy-on-read` filter driver (QEMU's block/copy-on-read.c): reads through it
//! that find a range its `file` node does not have (read from the backing chain)
//! write what they read into `file`, so that later reads no longer need the chain.
//! With `bottom`, only data from the layers down to and including `bottom` is
//! copied; ranges below it are read as they are. Writes, discards and flushes pass
//! through.
//!
//! The copy is a write of unchanged data (the filter takes write-unchanged on its
//! child, as QEMU's `cor_child_perm`), serialised against the file node's writers
//! through the node's serialised ranges: a write overlapping a copy waits for it,
//! and a copy re-checks the allocation once it holds its range, so that data a
//! guest wrote meanwhile is never overwritten with older data from the chain.
//! Copies go through a bounce buffer leased from the iothread's budget, never
//! through the guest's buffer (which the guest may change while the copy runs).

use crate::aio::bounce::Budget;
use crate::aio::iovec::IoVec;
use crate::aio::LocalBoxFuture;
use crate::driver::Driver;
use crate::drivers::forward;
use crate::edge::Edge;
use crate::error::{BlockError, Result};
use crate::node::Node;
use crate::perm::Perm;
use std::sync::{Arc, Mutex, Weak};

mod options;

pub use options::CorOptions;

/// The table row of `copy-on-read`.
pub(crate) const ENTRY: super::DriverEntry = super::DriverEntry {
    names: &["copy-on-read"],
    kind: super::Kind::Filter,
    parse: options::parse,
    create: None,
    reopen_mutable: &[],
};

/// Bytes copied up at once (one bounce buffer).
const COPY_CHUNK: u64 = 1 << 20;

/// What the filter passes from its parents to its child (QEMU's `PERM_PASSTHROUGH`
/// of copy-on-read: not write-unchanged, which the filter takes itself).
const PASSTHROUGH: Perm =
    Perm::from_bits(Perm::CONSISTENT_READ.bits() | Perm::WRITE.bits() | Perm::RESIZE.bits());

fn align_down(v: u64, align: u64) -> u64 {
    v - v % align
}

fn align_up(v: u64, align: u64) -> u64 {
    align_down(v.saturating_add(align - 1), align)
}

pub struct CorDriver {
    file: Arc<Edge>,
    /// The lowest layer copied from (`None`: every layer).
    bottom: Option<Weak<Node>>,
    /// The nodes this filter has writes serialised on: its file node from the open,
    /// and any node the file edge has been re-pointed to since. Released when the
    /// filter closes.
    serialised: Mutex<Vec<Weak<Node>>>,
}

impl CorDriver {
    /// A filter over `file`, on whose node (`serialised`) the caller has begun
    /// serialising writes.
    pub(super) fn new(file: Arc<Edge>, bottom: Option<Arc<Node>>, serialised: &Arc<Node>) -> Self {
        CorDriver {
            file,
            bottom: bottom.as_ref().map(Arc::downgrade),
            serialised: Mutex::new(vec![Arc::downgrade(serialised)]),
        }
    }

    /// Makes sure that writes to `top` are serialised against copies: true from the
    /// open for the first file node; a node the file edge was re-pointed to (in a
    /// drained section) starts serialising with the first copy into it.
    fn serialise(&self, top: &Arc<Node>) {
        let mut s = self.serialised.lock().unwrap_or_else(|p| p.into_inner());
        if !s.iter().any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(top))) {
            top.serialise_begin();
            s.push(Arc::downgrade(top));
        }
    }

    /// Whether a read of `offset..+len`, which `top` does not have, copies the data
    /// up, and for how many bytes (at most `len`) that holds: always without a
    /// bottom; with one, when a layer from `top`'s backing down to the bottom has
    /// the range (QEMU's `bdrv_is_allocated_above` with the base included).
    async fn copies(&self, top: &Node, offset: u64, len: u64) -> Result<(bool, u64)> {
        let Some(bottom) = self.bottom.as_ref().and_then(Weak::upgrade) else {
            return Ok((true, len));
        };
        let mut n = len;
        let mut layer = top.backing();
        while let Some(l) = layer {
            if offset >= l.size() {
                break;
            }
            let (alloc, m) = l.driver().is_allocated(offset, n).await?;
            let m = m.clamp(1, n);
            if alloc {
                return Ok((true, m));
            }
            n = m;
            if Arc::ptr_eq(&l, &bottom) {
                break;
            }
            layer = l.backing();
        }
        Ok((false, n))
    }

    /// Reads `offset..+iov.len()` of `top` into `iov` and writes what it read into
    /// `top`, chunk by chunk, each chunk holding its range against `top`'s writers.
    async fn copy_up(&self, top: &Arc<Node>, offset: u64, iov: IoVec) -> Result<()> {
        self.serialise(top);
        let mem_align = top.limits().mem_alignment.max(512);
        let mut pos = 0;
        while pos < iov.len() {
            let n = (iov.len() - pos).min(COPY_CHUNK);
            let at = offset + pos;
            let lease = Budget::current().lease(n as usize).await;
            let buf = lease.alloc(n as usize, mem_align).ok_or_else(|| {
                BlockError::io(
                    "copy-on-read",
                    std::io::Error::from_raw_os_error(libc::ENOMEM),
                )
            })?;
            let bounce = IoVec::from_buf(Arc::new(buf));
            {
                let _range = top.copy_lock(at, n).await;
                top.read(at, bounce.clone()).await?;
                // A write that ended while this waited for the range may have
                // allocated it: then what was read is that write's data, and stays.
                let (alloc, m) = top.driver().is_allocated(at, n).await?;
                if !alloc || m < n {
                    // On the node read, as QEMU (only a blkdebug node reacts).
                    top.debug_event("cor_write");
                    top.write_unchanged(at, bounce.clone()).await?;
                }
            }
            iov.slice(pos, n).copy_from_iov(0, &bounce);
            pos += n;
        }
        Ok(())
    }
}

impl Drop for CorDriver {
    fn drop(&mut self) {
        let s = self.serialised.get_mut().unwrap_or_else(|p| p.into_inner());
        for node in s.drain(..).filter_map(|w| w.upgrade()) {
            node.serialise_end();
        }
    }
}

impl Driver for CorDriver {
    fn driver_name(&self) -> &'static str {
        "copy-on-read"
    }

    fn size(&self) -> u64 {
        self.file.node().size()
    }

    fn children(&self) -> Vec<Arc<Edge>> {
        vec![self.file.clone()]
    }

    /// QEMU's `cor_child_perm`: the parents' read, write and resize pass through,
    /// write-unchanged is taken for the copies, and everything but what passes
    /// through is shared.
    fn child_perm(&self, _child: &Edge, _writable: bool, perm: Perm, shared: Perm) -> (Perm, Perm) {
        (
            (perm & PASSTHROUGH) | Perm::WRITE_UNCHANGED,
            (shared & PASSTHROUGH) | (Perm::ALL & !PASSTHROUGH),
        )
    }

    fn supports_fua(&self) -> bool {
        true
    }

    fn truncate(&self, size: u64) -> Result<()> {
        self.file.node().resize(size)
    }

    fn filename(&self) -> String {
        self.file.node().driver().filename()
    }

    fn read<'a>(&'a self, offset: u64, iov: IoVec) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let top = self.file.node_arc();
            let align = u64::from(top.limits().request_alignment).max(1);
            let len = iov.len();
            let mut pos = 0;
            while pos < len {
                let at = offset + pos;
                let left = len - pos;
                let (alloc, n) = top.driver().is_allocated(at, left).await?;
                let n = n.clamp(1, left);
                if alloc && n >= align {
                    let n = align_down(n, align);
                    top.read(at, iov.slice(pos, n)).await?;
                    pos += n;
                    continue;
                }
                // Whole blocks of the node's alignment that `top` does not have (a
                // block it has in part is copied whole: its own part unchanged).
                let n = align_up(n, align).min(left);
                let (copy, m) = self.copies(&top, at, n).await?;
                let m = align_up(m, align).min(n);
                let piece = iov.slice(pos, m);
                if copy {
                    self.copy_up(&top, at, piece).await?;
                } else {
                    top.read(at, piece).await?;
                }
                pos += m;
            }
            Ok(())
        })
    }

    fn write<'a>(&'a self, offset: u64, iov: IoVec, fua: bool) -> LocalBoxFuture<'a, Result<()>> {
        forward::write(&self.file, offset, iov, fua)
    }

    fn flush(&self) -> LocalBoxFuture<'_, Result<()>> {
        forward::flush(&self.file)
    }

    fn discard(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        forward::discard(&self.file, offset, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        forward::allocate(&self.file, offset, len)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> LocalBoxFuture<'_, Result<()>> {
        forward::write_zeroes(&self.file, offset, len, may_unmap)
    }
}

#[cfg(test)]
mod tests {
    use super::PASSTHROUGH;
    use crate::edge::Parent;
    use crate::graph::Graph;
    use crate::node::Node;
    use crate::options::BlockdevOptions;
    use crate::perm::Perm;
    use serde_json::{json, Value};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    fn add(g: &mut Graph, v: Value) -> crate::Result<Arc<Node>> {
        g.add(&BlockdevOptions::from_json(&v).unwrap())
    }

    fn err(g: &mut Graph, v: Value) -> String {
        add(g, v).unwrap_err().to_string()
    }

    #[test]
    fn permissions_as_qemus_cor_child_perm() {
        let mut g = Graph::new();
        let n = add(&mut g, json!({"driver": "null-co", "node-name": "n"})).unwrap();
        let c = add(
            &mut g,
            json!({"driver": "copy-on-read", "node-name": "c", "file": "n"}),
        )
        .unwrap();
        let edge = c.children().remove(0);
        assert_eq!(
            (edge.perm(), edge.shared()),
            (Perm::WRITE_UNCHANGED, Perm::ALL)
        );
        // A user that writes: passed through, write-unchanged added.
        let rw = Perm::CONSISTENT_READ | Perm::WRITE;
        let user = g
            .attach_user(Parent::Backend(None), "root", &c, rw, Perm::ALL)
            .unwrap();
        assert_eq!(edge.perm(), rw | Perm::WRITE_UNCHANGED);
        drop(user);
        // A user that lets nobody else write: the filter unshares write on its child.
        let _reader = g
            .attach_user(
                Parent::Backend(None),
                "root",
                &c,
                Perm::CONSISTENT_READ,
                Perm::CONSISTENT_READ,
            )
            .unwrap();
        assert_eq!(
            edge.shared(),
            Perm::CONSISTENT_READ | (Perm::ALL & !PASSTHROUGH)
        );
        let e = g
            .attach_user(Parent::Backend(None), "root", &n, rw, Perm::ALL)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "Permission conflict on node 'n': permissions 'write' are both required by an \
             unnamed block device (uses node 'n' as 'root' child) and unshared by node 'c' \
             (uses node 'n' as 'file' child)."
        );
    }

    #[test]
    fn bottom_checks_and_write_serialisation_for_the_filters_life() {
        let mut g = Graph::new();
        let n = add(&mut g, json!({"driver": "null-co", "node-name": "n"})).unwrap();
        add(&mut g, json!({"driver": "null-co", "node-name": "m"})).unwrap();
        add(
            &mut g,
            json!({"driver": "null-co", "node-name": "ro", "read-only": true}),
        )
        .unwrap();
        let cor = |bottom: &str| json!({"driver": "copy-on-read", "node-name": "c", "file": "n", "bottom": bottom});
        assert_eq!(err(&mut g, cor("nosuch")), "Bottom node 'nosuch' not found");
        assert_eq!(
            err(&mut g, cor("m")),
            "Bottom node 'm' is not in the backing chain of node 'n'"
        );
        assert_eq!(
            err(
                &mut g,
                json!({"driver": "copy-on-read", "node-name": "c", "file": "ro"})
            ),
            "Block node is read-only"
        );
        assert_eq!(n.serialising.load(Ordering::SeqCst), 0);
        add(&mut g, cor("n")).unwrap();
        assert_eq!(
            err(
                &mut g,
                json!({"driver": "copy-on-read", "node-name": "c2", "file": "c",
                       "bottom": "c"})
            ),
            "Bottom node 'c' is a filter"
        );
        assert_eq!(n.serialising.load(Ordering::SeqCst), 1);
        g.remove("c").unwrap();
        assert_eq!(n.serialising.load(Ordering::SeqCst), 0);
        assert!(g.get("c2").is_none());
    }
}

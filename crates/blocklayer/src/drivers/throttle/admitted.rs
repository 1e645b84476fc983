//! A throttle node at the root of a block backend (an export's or a job's), passed
//! at the request's admission: the backend has counted the request in the node and
//! looked for a drained section, and here it waits for the group's budget and goes
//! straight to the node's child, through the child's generic path.
//!
//! What the node's own generic path would add is nothing the child does not do: the
//! filter has its child's size and limits, so the range check, the alignment and the
//! split happen once, below. What belongs to the node itself is kept: its
//! statistics, and for writes its serialisation against a job's copies, its write
//! generation (which its flushes compare), its dirty bitmaps and its write
//! threshold. Writes that the node would change on the way (`detect-zeroes`) or
//! refuse (read-only) take the generic path instead; so do flushes, which are not
//! throttled, discards and write-zeroes.

use super::ThrottleDriver;
use crate::aio::iovec::IoVec;
use crate::error::Result;
use crate::node::Node;
use crate::options::DetectZeroes;
use crate::stats::{IoKind, IoStats};
use crate::throttle::Direction;

impl ThrottleDriver {
    /// Whether a write to `node` (this driver's node) may pass at admission.
    #[inline]
    pub(crate) fn passes_writes(node: &Node) -> bool {
        let f = node.flags();
        !f.read_only && f.detect_zeroes == DetectZeroes::Off
    }

    /// Reads through `node`, a request the caller admitted into it.
    pub(crate) async fn read_admitted(&self, node: &Node, offset: u64, iov: IoVec) -> Result<()> {
        let len = iov.len();
        let acct = IoStats::start(IoKind::Read, len);
        if !self.member.try_pass(Direction::Read, len) {
            self.member.wait_turn(Direction::Read, len).await;
        }
        let r = self.file.node().read(offset, iov).await;
        node.account(acct, &r, 0);
        r
    }

    /// Writes through `node`, a request the caller admitted into it and checked
    /// with [`ThrottleDriver::passes_writes`].
    pub(crate) async fn write_admitted(
        &self,
        node: &Node,
        offset: u64,
        iov: IoVec,
        fua: bool,
    ) -> Result<()> {
        let len = iov.len();
        let _t = node.track_write(offset, len).await;
        let acct = IoStats::start(IoKind::Write, len);
        if !self.member.try_pass(Direction::Write, len) {
            self.member.wait_turn(Direction::Write, len).await;
        }
        let r = self.file.node().write(offset, iov, fua).await;
        node.note_write();
        node.account(acct, &r, offset.saturating_add(len));
        node.written(&r, offset, len);
        r
    }
}

#[cfg(test)]
mod tests {
    use crate::aio::iovec::{AlignedBuf, IoVec};
    use crate::aio::uring::block_on;
    use crate::backend::BlockBackend;
    use crate::bitmap::DirtyBitmap;
    use crate::edge::Parent;
    use crate::graph::Graph;
    use crate::options::BlockdevOptions;
    use crate::perm::Perm;
    use crate::stats::IoKind;
    use crate::throttle::config::BucketType;
    use crate::throttle::{ThrottleConfig, ThrottleGroup};
    use serde_json::json;
    use std::sync::Arc;

    fn add(g: &mut Graph, v: serde_json::Value) -> Arc<crate::node::Node> {
        g.add(&BlockdevOptions::from_json(&v).unwrap()).unwrap()
    }

    /// Requests passed at admission keep what belongs to the throttle node: its
    /// statistics, its dirty bitmaps, and its write generation, without which the
    /// node's flush would be elided and never reach the disk below.
    #[test]
    fn the_node_keeps_its_statistics_bitmaps_and_flushes() {
        let mut g = Graph::new();
        let mut c = ThrottleConfig::default();
        c.buckets[BucketType::OpsTotal as usize].avg = 100_000_000;
        g.throttle_groups
            .insert("tg".into(), ThrottleGroup::new("tg", c));
        let n = add(&mut g, json!({"driver": "null-co", "node-name": "n"}));
        let t = add(
            &mut g,
            json!({"driver": "throttle", "node-name": "t", "file": "n", "throttle-group": "tg"}),
        );
        let bitmap = Arc::new(DirtyBitmap::new(t.size(), 65536));
        t.add_bitmap(bitmap.clone());
        let blk = Arc::new(
            BlockBackend::new(
                &g,
                Parent::Backend(None),
                &t,
                Perm::CONSISTENT_READ | Perm::WRITE,
                Perm::ALL,
            )
            .unwrap(),
        );
        let buf = Arc::new(AlignedBuf::zeroed(4096, 4096));
        let b = blk.clone();
        block_on(async move {
            b.write(1 << 20, IoVec::from_buf(buf.clone()), false)
                .await
                .unwrap();
            b.read(0, IoVec::from_buf(buf)).await.unwrap();
            b.flush().await.unwrap();
        });
        for node in [&t, &n] {
            for kind in [IoKind::Read, IoKind::Write, IoKind::Flush] {
                assert_eq!(node.stats.operations(kind), 1, "{} {kind:?}", node.name());
            }
        }
        assert_eq!(bitmap.count(), 65536);
        assert!(bitmap.get(1 << 20));
    }
}

//! A throttle node at the root of a block backend (an export's or a job's), passed
//! at the request's admission: the backend has counted the request (in its root
//! edge) and looked for a drained section; it waits for the group's budget and goes straight
//! to the node's child, with the child's own statistics and checks
//! ([`crate::backend::BlockBackend::read`]).
//!
//! What the node's own generic path would add is nothing the child does not do: the
//! filter has its child's size and limits, so the range check, the alignment and the
//! split happen once, below. What belongs to the node itself is kept: its
//! statistics, and for writes its serialisation against a job's copies, its write
//! generation (which its flushes compare), its dirty bitmaps and its write
//! threshold. Writes that the node would change on the way (`detect-zeroes`) or
//! refuse (read-only) take the generic path instead; so do flushes, which are not
//! throttled, discards and write-zeroes.
//!
//! The request is not counted again in the child's requests in flight: it is
//! counted in the backend's root edge, and every drained section that includes the
//! child includes this node and its users' edges too ([`crate::graph::Graph::drain`]
//! adds the throttle nodes above the nodes it drains), so it waits for the request
//! there.

use super::ThrottleDriver;
use crate::aio::LocalBoxFuture;
use crate::node::Node;
use crate::options::DetectZeroes;
use crate::throttle::Direction;

impl ThrottleDriver {
    /// Whether a write to `node` (this driver's node) may pass at admission.
    #[inline]
    pub(crate) fn passes_writes(node: &Node) -> bool {
        let f = node.flags();
        !f.read_only && f.detect_zeroes == DetectZeroes::Off
    }

    /// Whether a request of `bytes` in direction `dir` may go at once, charged if
    /// so; else it waits with [`ThrottleDriver::wait_turn`].
    #[inline(always)]
    pub(crate) fn try_pass(&self, dir: Direction, bytes: u64) -> bool {
        self.member.try_pass(dir, bytes)
    }

    /// Waits until a request that did not pass at once may go, and charges it.
    pub(crate) fn wait_turn(&self, dir: Direction, bytes: u64) -> LocalBoxFuture<'_, ()> {
        self.member.wait_turn(dir, bytes)
    }

    /// The child a request admitted into this node goes on to, with the child's
    /// `*_entered` operations (see the module's text for why it is not counted in
    /// the child).
    ///
    /// # Safety
    /// The caller holds a request a backend admitted into this driver's node
    /// (counted in the backend's root edge while no drained section was open on the
    /// node) for as long as it uses the reference.
    #[inline]
    pub(crate) unsafe fn child_of_admitted(&self) -> &Node {
        // SAFETY: the caller's contract is the edge's.
        unsafe { self.file.node_while_admitted() }
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

    /// A request admitted into a throttle node runs in its child without being
    /// counted there (nor in the throttle node: in the backend's edge); a drain of another parent of the child (another throttle node
    /// over the same node) still waits for it.
    #[test]
    fn a_drain_of_the_child_waits_for_requests_admitted_above() {
        let mut g = Graph::new();
        let mut c = ThrottleConfig::default();
        c.buckets[BucketType::OpsTotal as usize].avg = 100_000_000;
        g.throttle_groups
            .insert("tg".into(), ThrottleGroup::new("tg", c));
        let n = add(
            &mut g,
            json!({"driver": "null-co", "node-name": "n", "latency-ns": 300_000_000}),
        );
        let t1 = add(
            &mut g,
            json!({"driver": "throttle", "node-name": "t1", "file": "n", "throttle-group": "tg"}),
        );
        let t2 = add(
            &mut g,
            json!({"driver": "throttle", "node-name": "t2", "file": "n", "throttle-group": "tg"}),
        );
        let blk = Arc::new(
            BlockBackend::new(
                &g,
                Parent::Backend(None),
                &t1,
                Perm::CONSISTENT_READ,
                Perm::ALL,
            )
            .unwrap(),
        );
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (blk, done, started) = (blk.clone(), done.clone(), started.clone());
            std::thread::spawn(move || {
                block_on(async move {
                    let buf = Arc::new(AlignedBuf::zeroed(4096, 4096));
                    started.store(true, std::sync::atomic::Ordering::SeqCst);
                    blk.read(0, IoVec::from_buf(buf)).await.unwrap();
                });
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        };
        // Not from the thread's start (on a loaded machine that alone can take longer
        // than a fixed sleep), but from the read's: it is admitted on its first poll,
        // right after, and is in the null-co node's latency by the end of this sleep.
        while !started.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!done.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(n.stats.operations(IoKind::Read), 0);
        let drained = g.drain(&t2, std::time::Duration::from_secs(5)).unwrap();
        // The child counts the read as done before it returns to the backend, whose
        // count the drain waits for; the reader thread's own flag may come later.
        assert_eq!(
            n.stats.operations(IoKind::Read),
            1,
            "the drain of t2 returned while a request admitted into t1 ran in n"
        );
        drop(drained);
        reader.join().unwrap();
    }
}

//! Block status through the graph (QEMU's `bdrv_co_block_status_above`): whether a
//! range of a node reads as data or as zeroes, and at which depth of its backing chain
//! it is allocated. Each driver answers for itself ([`Driver::block_status`]); this
//! module follows filters, `raw` and backing children down to the answer.

use crate::edge::Edge;
use crate::error::Result;
use crate::node::Node;
use std::sync::Arc;

/// One driver's answer for the start of a range.
#[derive(Debug, Clone)]
pub enum Status {
    /// Holds data (reads may return anything).
    Data,
    /// Reads as zeroes, allocated in this node.
    Zero,
    /// Not allocated here: read from the backing child (zeroes without one).
    Unallocated,
    /// What the child node has at the given offset (filters, `raw`).
    Below(Arc<Node>, u64),
}

/// What a node's range holds, following its children (QEMU's `BDRV_BLOCK_DATA`,
/// `BDRV_BLOCK_ZERO`, and the allocation depth of `qemu:allocation-depth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub data: bool,
    pub zero: bool,
    /// 0: unallocated in the whole chain; 1: in the node itself; 2: in its backing
    /// node, and so on.
    pub depth: u32,
}

/// The most nodes followed for one answer (a guard against a cyclic graph).
const MAX_DEPTH: u32 = 4096;

/// The status of `offset..` in `node` and for how many bytes (at least 1, at most
/// `len`; `len` is not 0 and the range lies within the node).
pub async fn block_status(node: &Arc<Node>, offset: u64, len: u64) -> Result<(Extent, u64)> {
    let mut node = node.clone();
    let mut offset = offset;
    let mut len = len;
    let mut depth = 1;
    for _ in 0..MAX_DEPTH {
        let size = node.size();
        if offset >= size {
            // Past the end of a shorter backing node: zeroes.
            return Ok((
                Extent {
                    data: false,
                    zero: true,
                    depth: 0,
                },
                len,
            ));
        }
        len = len.min(size - offset);
        let (status, n) = node.driver().block_status(offset, len).await?;
        let n = n.clamp(1, len);
        match status {
            Status::Data => {
                let e = Extent {
                    data: true,
                    zero: false,
                    depth,
                };
                return Ok((e, n));
            }
            Status::Zero => {
                let e = Extent {
                    data: false,
                    zero: true,
                    depth,
                };
                return Ok((e, n));
            }
            Status::Unallocated => {
                len = n;
                match node.backing() {
                    Some(b) => {
                        node = b;
                        depth += 1;
                    }
                    None => {
                        let e = Extent {
                            data: false,
                            zero: true,
                            depth: 0,
                        };
                        return Ok((e, n));
                    }
                }
            }
            Status::Below(child, at) => {
                len = n;
                node = child;
                offset = at;
            }
        }
    }
    Ok((
        Extent {
            data: true,
            zero: false,
            depth,
        },
        len,
    ))
}

/// The default answer of a driver: a filter's (or `raw`'s) child decides; any other
/// node holds data everywhere.
pub fn default_status(children: &[Arc<Edge>], offset: u64) -> Status {
    children
        .iter()
        .find(|c| c.role() == crate::edge::Role::Filtered)
        .map_or(Status::Data, |c| Status::Below(c.node_arc(), offset))
}

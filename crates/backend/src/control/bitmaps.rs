//! Named dirty bitmaps from the monitor (QEMU's block/monitor/bitmap-qmp-cmds.c):
//! `block-dirty-bitmap-add/remove/clear/enable/disable/merge` and
//! `x-debug-block-dirty-bitmap-sha256`, with QEMU's checks in its order and its texts.
//! The bitmaps themselves are the block layer's ([`blocklayer::named_bitmap`]).

use super::{Control, OpResult};
use crate::control::error::ControlError;
use blocklayer::format_info::Qcow2Compat;
use blocklayer::named_bitmap::{self, Check, NamedBitmap};
use blocklayer::Node;
use std::sync::Arc;

/// Largest bitmap qcow2 stores, in bytes of bits (QEMU's BME_MAX_PHYS_SIZE).
const QCOW2_MAX_BITMAP_BYTES: u64 = 0x2000_0000;
/// Longest bitmap name qcow2 stores (QEMU's BME_MAX_NAME_SIZE).
const QCOW2_MAX_NAME: usize = 1023;

/// A source of `block-dirty-bitmap-merge`: a bitmap of the target's node, or of any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeSource {
    Local(String),
    External { node: String, name: String },
}

/// The arguments of `block-dirty-bitmap-add`.
#[derive(Debug, Clone, Default)]
pub struct BitmapAdd {
    pub node: String,
    pub name: String,
    pub granularity: Option<u64>,
    pub persistent: bool,
    pub disabled: bool,
}

/// A dirty bitmap command, its arguments read.
#[derive(Debug)]
pub enum BitmapCmd {
    Add(BitmapAdd),
    Remove {
        node: String,
        name: String,
    },
    Clear {
        node: String,
        name: String,
    },
    Enable {
        node: String,
        name: String,
    },
    Disable {
        node: String,
        name: String,
    },
    Merge {
        node: String,
        target: String,
        sources: Vec<MergeSource>,
    },
    Sha256 {
        node: String,
        name: String,
    },
}

fn err(e: impl std::fmt::Display) -> ControlError {
    ControlError::msg(e)
}

/// Whether `node`'s driver can store a new persistent bitmap (QEMU's
/// `bdrv_can_store_new_dirty_bitmap`): only qcow2 v3 can, within qcow2's limits.
fn can_store_new(node: &Node, name: &str, granularity: u64) -> OpResult<()> {
    if node.driver_name() != "qcow2" {
        return Err(ControlError::generic(format!(
            "Can't store persistent bitmaps to {}: Operation not supported",
            node.name()
        )));
    }
    let refuse = |why: &str| {
        Err(ControlError::generic(format!(
            "Can't make bitmap '{name}' persistent in '{}': {why}",
            node.name()
        )))
    };
    let info = node.driver().image_info();
    let compat = info
        .format_specific
        .as_ref()
        .and_then(|s| s.qcow2())
        .map(|q| q.compat);
    if compat == Some(Qcow2Compat::V2) {
        return refuse("Cannot store dirty bitmaps in qcow2 v2 files");
    }
    let bytes = node.size().div_ceil(granularity).div_ceil(8);
    if bytes > QCOW2_MAX_BITMAP_BYTES {
        return refuse("Too much space will be occupied by the bitmap. Use larger granularity");
    }
    if name.len() > QCOW2_MAX_NAME {
        return refuse(&format!(
            "Name length exceeds maximum ({QCOW2_MAX_NAME} characters)"
        ));
    }
    // The image's own limits (granularity, bitmap count).
    node.driver()
        .can_store_new_bitmap(name, granularity)
        .or_else(|e| refuse(&e.to_string()))
}

impl Control {
    /// QEMU's `block_dirty_bitmap_lookup`.
    pub(super) fn bitmap_lookup(
        &self,
        node: &str,
        name: &str,
    ) -> OpResult<(Arc<Node>, Arc<NamedBitmap>)> {
        let n = self
            .graph
            .get(node)
            .ok_or_else(|| ControlError::generic(format!("Node '{node}' not found")))?;
        let b = n
            .named_bitmap(name)
            .ok_or_else(|| ControlError::generic(format!("Dirty bitmap '{name}' not found")))?;
        Ok((n, b))
    }

    pub fn bitmap_add(&mut self, a: &BitmapAdd) -> OpResult<()> {
        if a.name.is_empty() {
            return Err(err(named_bitmap::BitmapError::EmptyName));
        }
        let node = self.graph.get(&a.node).ok_or_else(|| {
            ControlError::generic(format!(
                "Cannot find device='{0}' nor node-name='{0}'",
                a.node
            ))
        })?;
        let granularity = match a.granularity {
            Some(g) if !named_bitmap::valid_granularity(g) => {
                return Err(err(named_bitmap::BitmapError::Granularity))
            }
            Some(g) => g,
            None => named_bitmap::default_granularity(&node),
        };
        if a.persistent {
            can_store_new(&node, &a.name, granularity)?;
        }
        let b = node
            .add_named_bitmap(&a.name, granularity, !a.disabled)
            .map_err(err)?;
        b.set_persistent(a.persistent);
        Ok(())
    }

    pub fn bitmap_remove(&mut self, node: &str, name: &str) -> OpResult<()> {
        let (n, b) = self.bitmap_lookup(node, name)?;
        b.check(Check::REMOVE).map_err(err)?;
        // A persistent bitmap leaves the image at once (absent there: not stored yet).
        if b.persistent() {
            n.driver().remove_persistent_bitmap(name).map_err(|e| {
                ControlError::generic(format!("Failed to update bitmap extension: {e}"))
            })?;
        }
        n.remove_named_bitmap(name);
        Ok(())
    }

    pub fn bitmap_clear(&mut self, node: &str, name: &str) -> OpResult<()> {
        let (_, b) = self.bitmap_lookup(node, name)?;
        b.check(Check::DEFAULT).map_err(err)?;
        b.clear();
        Ok(())
    }

    pub fn bitmap_enable(&mut self, node: &str, name: &str, enable: bool) -> OpResult<()> {
        let (n, b) = self.bitmap_lookup(node, name)?;
        b.check(Check::ALLOW_RO).map_err(err)?;
        if enable {
            n.enable_bitmap(&b);
        } else {
            n.disable_bitmap(&b);
        }
        Ok(())
    }

    /// Merges `sources` into `target` of `node`, all or nothing (QEMU's
    /// `block_dirty_bitmap_merge`): the target is looked up first, then each source
    /// in turn (a local name on the target's node), then the target's own checks.
    pub fn bitmap_merge(
        &mut self,
        node: &str,
        target: &str,
        sources: &[MergeSource],
    ) -> OpResult<()> {
        let (n, dst) = self.bitmap_lookup(node, target)?;
        let mut srcs = Vec::with_capacity(sources.len());
        for s in sources {
            let b = match s {
                MergeSource::Local(name) => n.named_bitmap(name).ok_or_else(|| {
                    ControlError::generic(format!("Dirty bitmap '{name}' not found"))
                })?,
                MergeSource::External { node, name } => self.bitmap_lookup(node, name)?.1,
            };
            // Each source is checked as QEMU merges it, before the next is looked up.
            dst.merge_check_source(&b).map_err(err)?;
            srcs.push(b);
        }
        dst.merge(&srcs).map_err(err)
    }

    pub fn bitmap_sha256(&self, node: &str, name: &str) -> OpResult<String> {
        Ok(self.bitmap_lookup(node, name)?.1.sha256())
    }
}

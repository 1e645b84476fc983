//! The options of `copy-before-write` (QEMU's `BlockdevOptionsCbw`): `file`, the
//! node filtered; `target`, where old data goes; `bitmap`, the areas to copy (all
//! without it); `on-cbw-error` and `cbw-timeout`.

use super::CbwDriver;
use crate::driver::Driver;
use crate::drivers::OpenCtx;
use crate::edge::Role;
use crate::error::{BlockError, Result as BlockResult};
use crate::options::coerce::Fields;
use crate::options::{choice_name, BlockdevRef, CommonOptions, DriverOptions, Result};
use serde_json::{json, Map, Value};

/// QEMU's `OnCbwError`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCbwError {
    /// A failed copy fails the guest write (the default).
    BreakGuestWrite,
    /// A failed copy lets the guest write go ahead and breaks the snapshot.
    BreakSnapshot,
}

const ON_CBW_ERROR: &[(&str, OnCbwError)] = &[
    ("break-guest-write", OnCbwError::BreakGuestWrite),
    ("break-snapshot", OnCbwError::BreakSnapshot),
];

/// QEMU's `BlockDirtyBitmap`: a bitmap by node and name.
#[derive(Debug, Clone, PartialEq)]
pub struct BitmapRef {
    pub node: String,
    pub name: String,
}

/// QEMU's `BlockdevOptionsCbw`.
#[derive(Debug, Clone, PartialEq)]
pub struct CbwOptions {
    pub file: BlockdevRef,
    pub target: BlockdevRef,
    pub bitmap: Option<BitmapRef>,
    pub on_cbw_error: Option<OnCbwError>,
    /// Seconds (QAPI `uint32`).
    pub cbw_timeout: Option<u32>,
}

impl CbwOptions {
    fn take_from(f: &mut Fields, common: &CommonOptions) -> Result<Self> {
        let file = BlockdevRef::take_from(f, "file", common)?;
        let target = BlockdevRef::take_from(f, "target", common)?;
        let bitmap = match f.object("bitmap")? {
            Some(mut b) => {
                let node = b.required_string("node")?;
                let name = b.required_string("name")?;
                b.finish()?;
                Some(BitmapRef { node, name })
            }
            None => None,
        };
        let on_cbw_error = f.enumeration("on-cbw-error", ON_CBW_ERROR)?;
        let cbw_timeout = match f.unsigned("cbw-timeout")? {
            Some(t) => {
                Some(
                    u32::try_from(t).map_err(|_| crate::options::OptionsError::Invalid {
                        name: f.name("cbw-timeout"),
                        expected: "uint32".into(),
                    })?,
                )
            }
            None => None,
        };
        Ok(CbwOptions {
            file,
            target,
            bitmap,
            on_cbw_error,
            cbw_timeout,
        })
    }

    fn open_on(
        &self,
        ctx: &mut OpenCtx<'_>,
        file: &std::sync::Arc<crate::Node>,
        target: &std::sync::Arc<crate::Node>,
    ) -> BlockResult<CbwDriver> {
        // QEMU's `block_dirty_bitmap_lookup`: the areas its bits mark are those to
        // copy, and those the snapshot may be read at.
        let access = match &self.bitmap {
            None => None,
            Some(b) => {
                let node = ctx
                    .lookup(&b.node)
                    .ok_or_else(|| BlockError::Graph(format!("Node '{}' not found", b.node)))?;
                let bm = node.named_bitmap(&b.name).ok_or_else(|| {
                    BlockError::Graph(format!("Dirty bitmap '{}' not found", b.name))
                })?;
                bm.check(crate::named_bitmap::Check::ALLOW_RO)
                    .map_err(|e| BlockError::Graph(e.to_string()))?;
                let cluster = crate::block_copy::BlockCopy::cluster_size_for(target);
                let bits = file.size().div_ceil(cluster);
                Some(crate::block_copy::ClusterBits::from_dirty(
                    &bm.bits(),
                    cluster,
                    bits,
                ))
            }
        };
        let file_edge = ctx.edge("file", Role::Filtered, file);
        let target_edge = ctx.edge("target", Role::DataFile, target);
        Ok(CbwDriver::new(
            file_edge,
            target_edge,
            self.on_cbw_error.unwrap_or(OnCbwError::BreakGuestWrite),
            self.cbw_timeout.unwrap_or(0),
            access,
        ))
    }
}

impl DriverOptions for CbwOptions {
    fn driver_name(&self) -> &'static str {
        "copy-before-write"
    }

    fn child(&self) -> Option<&BlockdevRef> {
        Some(&self.file)
    }

    fn children(&self) -> Vec<&BlockdevRef> {
        vec![&self.file, &self.target]
    }

    fn keep_children(&mut self, now: &dyn Fn(&str) -> Option<BlockdevRef>) {
        if let Some(f) = now("file") {
            self.file = f;
        }
        if let Some(t) = now("target") {
            self.target = t;
        }
    }

    fn write_json(&self, m: &mut Map<String, Value>) {
        m.insert("file".into(), self.file.to_json());
        m.insert("target".into(), self.target.to_json());
        if let Some(b) = &self.bitmap {
            m.insert("bitmap".into(), json!({"node": b.node, "name": b.name}));
        }
        if let Some(e) = self.on_cbw_error {
            m.insert("on-cbw-error".into(), json!(choice_name(ON_CBW_ERROR, e)));
        }
        if let Some(t) = self.cbw_timeout {
            m.insert("cbw-timeout".into(), json!(t));
        }
    }

    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Box<dyn Driver>> {
        let file = ctx.child(&self.file)?;
        let target = match ctx.child(&self.target) {
            Ok(t) => t,
            Err(e) => {
                ctx.forget_inline(&self.file, &file);
                return Err(e);
            }
        };
        if file.size() != target.size() {
            // QEMU's block-copy takes the smaller size; a target of another size
            // is refused by the backup job before it comes here.
            log::warn!(
                "copy-before-write: target '{}' is {} bytes, source '{}' {}",
                target.name(),
                target.size(),
                file.name(),
                file.size()
            );
        }
        match self.open_on(ctx, &file, &target) {
            Ok(d) => Ok(Box::new(d)),
            Err(e) => {
                ctx.forget_inline(&self.target, &target);
                ctx.forget_inline(&self.file, &file);
                Err(e)
            }
        }
    }
}

/// The table's parse function of `copy-before-write`.
pub(super) fn parse(
    f: &mut Fields,
    common: &CommonOptions,
    _name: &'static str,
) -> Result<Box<dyn DriverOptions>> {
    Ok(Box::new(CbwOptions::take_from(f, common)?))
}

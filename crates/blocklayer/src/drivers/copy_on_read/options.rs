//! The options of `copy-on-read` (QEMU's `BlockdevOptionsCor`) and how they open the
//! filter: `file`, the node read through, and `bottom`, the lowest layer whose data
//! is copied.

use super::CorDriver;
use crate::driver::Driver;
use crate::drivers::{Kind, OpenCtx};
use crate::edge::Role;
use crate::error::{BlockError, Result as BlockResult};
use crate::node::Node;
use crate::options::coerce::Fields;
use crate::options::{BlockdevRef, CommonOptions, DriverOptions, Result};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

/// How long opening the filter waits for the requests in flight on its file node.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// QEMU's `BlockdevOptionsCor`.
#[derive(Debug, Clone, PartialEq)]
pub struct CorOptions {
    pub file: BlockdevRef,
    /// `bottom`: the node-name of the lowest layer (of `file`'s backing chain) whose
    /// data reads copy up; without it, every range `file` does not have is copied.
    pub bottom: Option<String>,
}

impl CorOptions {
    fn take_from(f: &mut Fields, common: &CommonOptions) -> Result<Self> {
        Ok(CorOptions {
            file: BlockdevRef::take_from(f, "file", common)?,
            bottom: f.string("bottom")?,
        })
    }

    /// The bottom node, checked as QEMU does (it exists and is no filter), and
    /// moreover in `file`'s backing chain (QEMU 7.2 hangs when it is not).
    fn bottom_node(&self, ctx: &OpenCtx<'_>, file: &Arc<Node>) -> BlockResult<Option<Arc<Node>>> {
        let Some(name) = &self.bottom else {
            return Ok(None);
        };
        let bottom = ctx
            .lookup(name)
            .ok_or_else(|| BlockError::Graph(format!("Bottom node '{name}' not found")))?;
        if crate::drivers::kind(bottom.driver_name()) == Some(Kind::Filter) {
            return Err(BlockError::Graph(format!(
                "Bottom node '{name}' is a filter"
            )));
        }
        if !file.backing_chain().iter().any(|n| Arc::ptr_eq(n, &bottom)) {
            return Err(BlockError::Graph(format!(
                "Bottom node '{name}' is not in the backing chain of node '{}'",
                file.name()
            )));
        }
        Ok(Some(bottom))
    }

    fn open_on(&self, ctx: &mut OpenCtx<'_>, file: &Arc<Node>) -> BlockResult<CorDriver> {
        let bottom = self.bottom_node(ctx, file)?;
        // Writes to the file node register from now on, so that copies are
        // serialised against them; the drained section makes sure that none is in
        // flight unregistered.
        {
            let _drained = ctx.drain(file, DRAIN_TIMEOUT)?;
            file.serialise_begin();
        }
        let edge = ctx.edge("file", Role::Filtered, file);
        Ok(CorDriver::new(edge, bottom, file))
    }
}

impl DriverOptions for CorOptions {
    fn driver_name(&self) -> &'static str {
        "copy-on-read"
    }

    fn child(&self) -> Option<&BlockdevRef> {
        Some(&self.file)
    }

    fn keep_children(&mut self, now: &dyn Fn(&str) -> Option<BlockdevRef>) {
        if let Some(f) = now("file") {
            self.file = f;
        }
    }

    fn write_json(&self, m: &mut Map<String, Value>) {
        m.insert("file".into(), self.file.to_json());
        if let Some(b) = &self.bottom {
            m.insert("bottom".into(), json!(b));
        }
    }

    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Box<dyn Driver>> {
        let file = ctx.child(&self.file)?;
        match self.open_on(ctx, &file) {
            Ok(d) => Ok(Box::new(d)),
            Err(e) => {
                ctx.forget_inline(&self.file, &file);
                Err(e)
            }
        }
    }
}

/// The table's parse function of `copy-on-read`.
pub(super) fn parse(
    f: &mut Fields,
    common: &CommonOptions,
    _name: &'static str,
) -> Result<Box<dyn DriverOptions>> {
    Ok(Box::new(CorOptions::take_from(f, common)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::BlockdevOptions;

    #[test]
    fn keyval_and_json_forms_agree() {
        let a = BlockdevOptions::from_json(&json!({"driver": "copy-on-read",
            "node-name": "cor", "file": "top", "bottom": "mid"}))
        .unwrap();
        assert_eq!(
            a.driver.downcast_ref::<CorOptions>(),
            Some(&CorOptions {
                file: BlockdevRef::Reference("top".into()),
                bottom: Some("mid".into()),
            })
        );
        assert_eq!(a.references(), vec!["top"]);
        assert_eq!(BlockdevOptions::from_json(&a.to_json()).unwrap(), a);
        let e = BlockdevOptions::from_json(&json!({"driver": "copy-on-read"})).unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'file' is missing");
        let e = BlockdevOptions::from_json(&json!({"driver": "copy-on-read", "file": "t",
            "bottom": 3}))
        .unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'bottom' expects a string");
    }
}

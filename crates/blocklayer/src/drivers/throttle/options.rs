//! The options of `throttle` (QEMU's `BlockdevOptionsThrottle`): `file`, the node
//! throttled, and `throttle-group`, the id of the `throttle-group` object whose
//! limits apply.

use super::ThrottleDriver;
use crate::driver::Driver;
use crate::drivers::OpenCtx;
use crate::edge::Role;
use crate::error::{BlockError, Result as BlockResult};
use crate::options::coerce::Fields;
use crate::options::{BlockdevRef, CommonOptions, DriverOptions, Result};
use serde_json::{json, Map, Value};

/// QEMU's `BlockdevOptionsThrottle`.
#[derive(Debug, Clone, PartialEq)]
pub struct ThrottleOptions {
    pub file: BlockdevRef,
    pub group: String,
}

impl ThrottleOptions {
    fn take_from(f: &mut Fields, common: &CommonOptions) -> Result<Self> {
        let group = f.string("throttle-group")?;
        let file = BlockdevRef::take_from(f, "file", common)?;
        Ok(ThrottleOptions {
            file,
            group: f.required("throttle-group", group)?,
        })
    }
}

impl DriverOptions for ThrottleOptions {
    fn driver_name(&self) -> &'static str {
        "throttle"
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
        m.insert("throttle-group".into(), json!(self.group));
    }

    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Box<dyn Driver>> {
        // QEMU looks the group up before it opens the child.
        let Some(group) = ctx.throttle_group(&self.group) else {
            return Err(BlockError::Graph(format!(
                "Throttle group '{}' does not exist",
                self.group
            )));
        };
        let file = ctx.child(&self.file)?;
        let edge = ctx.edge("file", Role::Filtered, &file);
        Ok(Box::new(ThrottleDriver::new(edge, group.join())))
    }
}

/// The table's parse function of `throttle`.
pub(super) fn parse(
    f: &mut Fields,
    common: &CommonOptions,
    _name: &'static str,
) -> Result<Box<dyn DriverOptions>> {
    Ok(Box::new(ThrottleOptions::take_from(f, common)?))
}

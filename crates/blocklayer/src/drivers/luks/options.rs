//! The options of `luks` (QEMU's `BlockdevOptionsLUKS`) and how they open the node.

use super::LuksDriver;
use crate::driver::Driver;
use crate::drivers::OpenCtx;
use crate::edge::Role;
use crate::error::BlockError;
use crate::options::coerce::Fields;
use crate::options::{BlockdevRef, CommonOptions, DriverOptions, Result};
use serde_json::{json, Map, Value};

/// QEMU's `BlockdevOptionsLUKS`.
#[derive(Debug, Clone, PartialEq)]
pub struct LuksOptions {
    pub file: BlockdevRef,
    /// `key-secret`: the secret object holding the passphrase (required to open).
    pub key_secret: Option<String>,
}

impl DriverOptions for LuksOptions {
    fn driver_name(&self) -> &'static str {
        "luks"
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
        if let Some(k) = &self.key_secret {
            m.insert("key-secret".into(), json!(k));
        }
    }

    fn open(&self, ctx: &mut OpenCtx<'_>) -> crate::Result<Box<dyn Driver>> {
        // The passphrase first, as QEMU: no child is opened for a node without one.
        let Some(id) = &self.key_secret else {
            return Err(BlockError::Graph(
                "Parameter 'key-secret' is required for cipher".into(),
            ));
        };
        let password = ctx
            .secrets()
            .lookup_utf8(id)
            .map_err(|e| BlockError::Graph(e.to_string()))?;
        let file = ctx.child(&self.file)?;
        let opened = (|| {
            if !ctx.common.read_only && file.is_read_only() {
                return Err(BlockError::Graph(format!(
                    "Node '{}' is read-only: open the luks node with read-only=on",
                    file.name()
                )));
            }
            let edge = ctx.edge("file", Role::File, &file);
            LuksDriver::open(edge, id, password.as_bytes())
        })();
        match opened {
            Ok(d) => Ok(Box::new(d)),
            Err(e) => {
                ctx.forget_inline(&self.file, &file);
                Err(e)
            }
        }
    }
}

/// The table's parse function of `luks`.
pub(super) fn parse(
    f: &mut Fields,
    common: &CommonOptions,
    _name: &'static str,
) -> Result<Box<dyn DriverOptions>> {
    Ok(Box::new(LuksOptions {
        file: BlockdevRef::take_from(f, "file", common)?,
        key_secret: f.string("key-secret")?,
    }))
}

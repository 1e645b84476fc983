//! The options of `raw` (QEMU's `BlockdevOptionsRaw`) and how they open the node.

use super::RawDriver;
use crate::driver::Driver;
use crate::drivers::OpenCtx;
use crate::edge::Role;
use crate::error::BlockError;
use crate::options::coerce::Fields;
use crate::options::{bad_value, BlockdevRef, CommonOptions, DriverOptions, Result};
use serde_json::{json, Map, Value};

/// QEMU's `BlockdevOptionsRaw`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawOptions {
    pub file: BlockdevRef,
    /// `offset` in bytes (default 0)
    pub offset: u64,
    /// `size` in bytes (default: the rest of the child)
    pub size: Option<u64>,
}

impl RawOptions {
    fn take_from(f: &mut Fields, common: &CommonOptions) -> Result<Self> {
        let options = RawOptions {
            file: BlockdevRef::take_from(f, "file", common)?,
            offset: f.size("offset")?.unwrap_or(0),
            size: f.size("size")?,
        };
        if options.size.is_some_and(|size| !size.is_multiple_of(512)) {
            return Err(bad_value(
                &f.name("size"),
                "Specified size is not multiple of 512",
            ));
        }
        Ok(options)
    }
}

impl DriverOptions for RawOptions {
    fn driver_name(&self) -> &'static str {
        "raw"
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
        m.insert("offset".into(), json!(self.offset));
        if let Some(size) = self.size {
            m.insert("size".into(), json!(size));
        }
    }

    fn open(&self, ctx: &mut OpenCtx<'_>) -> crate::Result<Box<dyn Driver>> {
        let file = ctx.child(&self.file)?;
        let raw = (|| {
            if !ctx.common.read_only && file.is_read_only() {
                return Err(BlockError::Graph(format!(
                    "Node '{}' is read-only: open the raw node with read-only=on",
                    file.name()
                )));
            }
            let edge = ctx.edge("file", Role::Filtered, &file);
            RawDriver::new(edge, self.offset, self.size)
        })();
        match raw {
            Ok(raw) => Ok(Box::new(raw)),
            Err(e) => {
                // An inline child opened for this node goes with it.
                ctx.forget_inline(&self.file, &file);
                Err(e)
            }
        }
    }
}

/// The table's parse function of `raw`.
pub(super) fn parse(
    f: &mut Fields,
    common: &CommonOptions,
    _name: &'static str,
) -> Result<Box<dyn DriverOptions>> {
    Ok(Box::new(RawOptions::take_from(f, common)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::{BlockdevOptions, DiscardMode};
    use serde_json::json;

    fn parse(v: Value) -> BlockdevOptions {
        BlockdevOptions::from_json(&v).unwrap()
    }

    fn raw(o: &BlockdevOptions) -> &RawOptions {
        o.driver.downcast_ref().expect("raw options")
    }

    #[test]
    fn by_reference() {
        let keyval = json!({"driver": "raw", "node-name": "disk0", "file": "file0",
                            "offset": "1M", "size": "2G"});
        let native = json!({"driver": "raw", "node-name": "disk0", "file": "file0",
                            "offset": 1048576, "size": 2147483648u64});
        let a = parse(keyval);
        assert_eq!(a, parse(native));
        assert_eq!(
            raw(&a),
            &RawOptions {
                file: BlockdevRef::Reference("file0".into()),
                offset: 1 << 20,
                size: Some(2 << 30),
            }
        );
        assert_eq!(a.references(), vec!["file0"]);
        assert_eq!(a.node_names(), vec!["disk0"]);
        assert_eq!(parse(a.to_json()), a);
    }

    #[test]
    fn with_inline_file() {
        let keyval = json!({"driver": "raw", "node-name": "disk0", "read-only": "on",
                            "cache": {"direct": "on"},
                            "file": {"driver": "file", "filename": "/img", "node-name": "f0"}});
        let a = parse(keyval);
        let BlockdevRef::Inline(child) = &raw(&a).file else {
            panic!("not inline: {a:?}");
        };
        // Inherited from the parent, discard=unmap on the lower layer.
        assert!(child.common.read_only);
        assert!(child.common.cache_direct);
        assert!(!child.common.cache_no_flush);
        assert_eq!(child.common.discard, DiscardMode::Unmap);
        assert_eq!(child.common.node_name.as_deref(), Some("f0"));
        assert_eq!(a.node_names(), vec!["disk0", "f0"]);
        assert!(a.references().is_empty());
        assert_eq!(parse(a.to_json()), a);

        // The child's own settings win; node-name is optional in the child.
        let b = parse(json!({"driver": "raw", "read-only": true,
                             "file": {"driver": "file", "filename": "/img",
                                      "read-only": false, "discard": "ignore"}}));
        let BlockdevRef::Inline(child) = &raw(&b).file else {
            panic!("not inline raw: {b:?}");
        };
        assert!(!child.common.read_only);
        assert_eq!(child.common.discard, DiscardMode::Ignore);
        assert_eq!(child.common.node_name, None);
    }
}

//! The options of `qcow2` (QEMU's `BlockdevOptionsQcow2`, as far as vubd implements
//! it) and how they open the node: the image on its `file` child, the data file and
//! the backing node given or named by the header.

use super::encryption::EncryptOptions;
use super::{Qcow2Driver, Qcow2DriverOptions};
use crate::driver::Driver;
use crate::drivers::OpenCtx;
use crate::edge::Role;
use crate::error::BlockError;
use crate::options::coerce::Fields;
use crate::options::{
    bad_value, BackingRef, BlockdevOptions, BlockdevRef, CommonOptions, DiscardMode, DriverOptions,
    Result,
};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// QEMU's default `cache-clean-interval` on Linux, in seconds.
pub const DEFAULT_CACHE_CLEAN_INTERVAL: u64 = 600;

/// QEMU's `BlockdevOptionsQcow2`, as far as vubd implements it.
#[derive(Debug, Clone, PartialEq)]
pub struct Qcow2Options {
    pub file: BlockdevRef,
    pub backing: BackingRef,
    /// `data-file`: the external data file (default: the one the header names)
    pub data_file: Option<BlockdevRef>,
    /// `lazy-refcounts` (default: the image's compatible bit)
    pub lazy_refcounts: Option<bool>,
    /// `l2-cache-size` in bytes
    pub l2_cache_size: Option<u64>,
    /// `refcount-cache-size` in bytes
    pub refcount_cache_size: Option<u64>,
    /// `cache-size`: the two caches together
    pub cache_size: Option<u64>,
    /// `cache-clean-interval` in seconds: drop metadata cache entries unused for
    /// that long (0: never; default: 600, QEMU's on Linux)
    pub cache_clean_interval: Option<u64>,
    /// `pass-discard-request` (default on with discard=unmap), `pass-discard-snapshot`
    /// (default on), `pass-discard-other` (default off)
    pub pass_discard_request: Option<bool>,
    pub pass_discard_snapshot: bool,
    pub pass_discard_other: bool,
    /// `encrypt`: the format and passphrase of an encrypted image
    pub encrypt: Option<EncryptOptions>,
}

impl Qcow2Options {
    fn take_from(f: &mut Fields, common: &CommonOptions) -> Result<Self> {
        let file = BlockdevRef::take_from(f, "file", common)?;
        let backing = BackingRef::take_from(f, common)?;
        let data_file = if f.contains("data-file") {
            Some(BlockdevRef::take_from(f, "data-file", common)?)
        } else {
            None
        };
        let options = Qcow2Options {
            file,
            backing,
            data_file,
            lazy_refcounts: f.bool("lazy-refcounts")?,
            l2_cache_size: f.size("l2-cache-size")?,
            refcount_cache_size: f.size("refcount-cache-size")?,
            cache_size: f.size("cache-size")?,
            cache_clean_interval: f.uint("cache-clean-interval")?,
            pass_discard_request: f.bool("pass-discard-request")?,
            pass_discard_snapshot: f.bool("pass-discard-snapshot")?.unwrap_or(true),
            pass_discard_other: f.bool("pass-discard-other")?.unwrap_or(false),
            encrypt: EncryptOptions::take_from(f)?,
        };
        // Accepted and without effect: vubd checks every metadata write against the
        // metadata ranges.
        let _ = f.take("overlap-check");
        if options
            .cache_clean_interval
            .is_some_and(|v| v > u64::from(u32::MAX))
        {
            return Err(bad_value(
                &f.name("cache-clean-interval"),
                "Cache clean interval too big",
            ));
        }
        for key in ["l2-cache-entry-size"] {
            if f.contains(key) {
                return Err(bad_value(
                    &f.name(key),
                    "this qcow2 option is not supported by vubd yet",
                ));
            }
        }
        Ok(options)
    }
}

impl DriverOptions for Qcow2Options {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }

    fn child(&self) -> Option<&BlockdevRef> {
        Some(&self.file)
    }

    fn children(&self) -> Vec<&BlockdevRef> {
        let mut out = vec![&self.file];
        out.extend(self.backing.node());
        out.extend(self.data_file.as_ref());
        out
    }

    fn keep_children(&mut self, now: &dyn Fn(&str) -> Option<BlockdevRef>) {
        if let Some(f) = now("file") {
            self.file = f;
        }
        self.data_file = now("data-file");
        self.backing = match now("backing") {
            Some(b) => BackingRef::Node(b),
            None => BackingRef::None,
        };
    }

    fn write_json(&self, m: &mut Map<String, Value>) {
        m.insert("file".into(), self.file.to_json());
        if let Some(d) = &self.data_file {
            m.insert("data-file".into(), d.to_json());
        }
        self.backing.write_json(m);
        let opt = |m: &mut Map<String, Value>, k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        };
        opt(m, "lazy-refcounts", self.lazy_refcounts.map(Value::Bool));
        opt(m, "l2-cache-size", self.l2_cache_size.map(|v| json!(v)));
        opt(
            m,
            "refcount-cache-size",
            self.refcount_cache_size.map(|v| json!(v)),
        );
        opt(m, "cache-size", self.cache_size.map(|v| json!(v)));
        opt(
            m,
            "cache-clean-interval",
            self.cache_clean_interval.map(|v| json!(v)),
        );
        opt(
            m,
            "pass-discard-request",
            self.pass_discard_request.map(Value::Bool),
        );
        m.insert(
            "pass-discard-snapshot".into(),
            json!(self.pass_discard_snapshot),
        );
        m.insert("pass-discard-other".into(), json!(self.pass_discard_other));
        if let Some(e) = &self.encrypt {
            e.write_json(m);
        }
    }

    fn open(&self, ctx: &mut OpenCtx<'_>) -> crate::Result<Box<dyn Driver>> {
        let mut drv = self.open_driver(ctx)?;
        drv.set_node_name(ctx.name);
        Ok(Box::new(drv))
    }
}

impl Qcow2Options {
    /// Opens the image on its `file` child, with the data file and backing node the
    /// options give or the header names.
    fn open_driver(&self, ctx: &mut OpenCtx<'_>) -> crate::Result<Qcow2Driver> {
        let q = self;
        let common = ctx.common;
        let file = ctx.child(&q.file)?;
        if !common.read_only && file.is_read_only() {
            return Err(BlockError::Graph(format!(
                "Node '{}' is read-only: open the qcow2 node with read-only=on",
                file.name()
            )));
        }
        let opts = qcow::OpenOptions {
            writable: !common.read_only,
            l2_cache_size: q.l2_cache_size.or(q.cache_size),
            refcount_cache_size: q.refcount_cache_size,
            lazy_refcounts: q.lazy_refcounts,
            pass_discard_snapshot: q.pass_discard_snapshot,
            pass_discard_other: q.pass_discard_other,
            ..qcow::OpenOptions::read_only()
        };
        let pass_discard = q
            .pass_discard_request
            .unwrap_or(common.discard == DiscardMode::Unmap);
        let data = match &q.data_file {
            Some(r) => Some(ctx.child(r)?),
            None => match Qcow2Driver::header_data_file(&file)? {
                None => None,
                Some(name) => {
                    let image = file.driver().filename();
                    let path = match Path::new(&image).parent() {
                        Some(dir) if Path::new(&name).is_relative() => dir.join(&name),
                        _ => PathBuf::from(&name),
                    };
                    let opts = BlockdevOptions::from_json(&json!({
                        "driver": "file",
                        "filename": path.display().to_string(),
                        "read-only": common.read_only,
                    }))?;
                    Some(ctx.open(&opts)?)
                }
            },
        };
        let driver_opts = Qcow2DriverOptions {
            pass_discard,
            cache_clean_interval: Duration::from_secs(
                q.cache_clean_interval
                    .unwrap_or(DEFAULT_CACHE_CLEAN_INTERVAL),
            ),
        };
        let file_edge = ctx.edge("file", Role::File, &file);
        let data_edge = data.map(|d| ctx.edge("data-file", Role::DataFile, &d));
        let drv = Qcow2Driver::open(
            file_edge,
            data_edge,
            opts,
            driver_opts,
            q.encrypt.as_ref(),
            ctx.secrets(),
        )?;
        let backing = match &q.backing {
            BackingRef::None => None,
            BackingRef::Node(r) => Some(ctx.child(r)?),
            BackingRef::FromHeader => match drv.header_backing() {
                (None, _) => None,
                (Some(name), fmt) => {
                    let image = file.driver().filename();
                    Some(ctx.open_backing_file(&image, &name, fmt.as_deref())?)
                }
            },
        };
        if let Some(b) = backing {
            drv.set_backing(Some(ctx.edge("backing", Role::Backing, &b)))?;
        }
        Ok(drv)
    }
}

/// The table's parse function of `qcow2`.
pub(super) fn parse(
    f: &mut Fields,
    common: &CommonOptions,
    _name: &'static str,
) -> Result<Box<dyn DriverOptions>> {
    Ok(Box::new(Qcow2Options::take_from(f, common)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> crate::options::Result<BlockdevOptions> {
        BlockdevOptions::from_json(&v)
    }

    #[test]
    fn cache_clean_interval() {
        let keyval = json!({"driver": "qcow2", "node-name": "q", "file": "f",
                            "cache-clean-interval": "30"});
        let a = parse(keyval).unwrap();
        let q = a.driver.downcast_ref::<Qcow2Options>().unwrap();
        assert_eq!(q.cache_clean_interval, Some(30));
        assert_eq!(parse(a.to_json()).unwrap(), a);
        let b = parse(json!({"driver": "qcow2", "node-name": "q", "file": "f"})).unwrap();
        let q = b.driver.downcast_ref::<Qcow2Options>().unwrap();
        assert_eq!(q.cache_clean_interval, None);
        let e = parse(json!({"driver": "qcow2", "node-name": "q", "file": "f",
                             "cache-clean-interval": 1u64 << 32}))
        .unwrap_err()
        .to_string();
        assert!(e.contains("Cache clean interval too big"), "{e}");
    }

    #[test]
    fn encrypt_options() {
        use super::super::encryption::EncryptFormat;
        // The command line's dotted keys and QMP's nested object.
        let a = parse(json!({"driver": "qcow2", "node-name": "q", "file": "f",
                             "encrypt": {"format": "luks", "key-secret": "sec0"}}))
        .unwrap();
        let q = a.driver.downcast_ref::<Qcow2Options>().unwrap();
        let e = q.encrypt.as_ref().unwrap();
        assert_eq!(e.format, EncryptFormat::Luks);
        assert_eq!(e.key_secret.as_deref(), Some("sec0"));
        assert_eq!(parse(a.to_json()).unwrap(), a);
        let e = parse(json!({"driver": "qcow2", "node-name": "q", "file": "f",
                             "encrypt": {"key-secret": "sec0"}}))
        .unwrap_err()
        .to_string();
        assert_eq!(e, "Parameter 'encrypt.format' is missing");
        let e = parse(json!({"driver": "qcow2", "node-name": "q", "file": "f",
                             "encrypt": {"format": "luks", "bogus": 1}}))
        .unwrap_err()
        .to_string();
        assert!(e.contains("encrypt.bogus"), "{e}");
    }
}

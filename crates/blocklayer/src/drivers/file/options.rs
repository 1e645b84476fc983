//! The options of `file` and `host_device` (QEMU's `BlockdevOptionsFile`).

use super::FileDriver;
use crate::driver::Driver;
use crate::drivers::OpenCtx;
use crate::options::coerce::Fields;
use crate::options::{choice_name, CommonOptions, DriverOptions, Result};
use serde_json::{json, Map, Value};
use std::path::PathBuf;

/// `locking=auto|on|off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockingMode {
    #[default]
    Auto,
    On,
    Off,
}

/// `aio=threads|native|io_uring`: accepted for compatibility; vubd always uses io_uring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AioMode {
    Threads,
    Native,
    #[default]
    IoUring,
}

/// QEMU's `BlockdevOptionsFile`, for `file` and `host_device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOptions {
    /// Opened as `host_device` (the same driver, for block devices only).
    pub host_device: bool,
    pub filename: PathBuf,
    /// `aio`
    pub aio: AioMode,
    /// `locking`
    pub locking: LockingMode,
}

const LOCKING_CHOICES: &[(&str, LockingMode)] = &[
    ("auto", LockingMode::Auto),
    ("on", LockingMode::On),
    ("off", LockingMode::Off),
];

const AIO_CHOICES: &[(&str, AioMode)] = &[
    ("threads", AioMode::Threads),
    ("native", AioMode::Native),
    ("io_uring", AioMode::IoUring),
];

impl FileOptions {
    fn take_from(f: &mut Fields, host_device: bool) -> Result<Self> {
        let filename = f.required_string("filename")?;
        let options = FileOptions {
            host_device,
            filename: PathBuf::from(filename),
            aio: f.enumeration("aio", AIO_CHOICES)?.unwrap_or_default(),
            locking: f
                .enumeration("locking", LOCKING_CHOICES)?
                .unwrap_or_default(),
        };
        // Accepted for compatibility and ignored: vubd sizes its own io_uring batches.
        f.uint("aio-max-batch")?;
        Ok(options)
    }
}

impl DriverOptions for FileOptions {
    fn driver_name(&self) -> &'static str {
        if self.host_device {
            "host_device"
        } else {
            "file"
        }
    }

    fn write_json(&self, m: &mut Map<String, Value>) {
        m.insert("filename".into(), json!(self.filename.to_string_lossy()));
        m.insert("aio".into(), json!(choice_name(AIO_CHOICES, self.aio)));
        m.insert(
            "locking".into(),
            json!(choice_name(LOCKING_CHOICES, self.locking)),
        );
    }

    fn open(&self, ctx: &mut OpenCtx<'_>) -> crate::Result<Box<dyn Driver>> {
        Ok(Box::new(FileDriver::open(self, ctx.common)?))
    }
}

/// The table's parse function of `file` and `host_device`.
pub(super) fn parse(
    f: &mut Fields,
    _common: &CommonOptions,
    name: &'static str,
) -> Result<Box<dyn DriverOptions>> {
    Ok(Box::new(FileOptions::take_from(f, name == "host_device")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::{BlockdevOptions, DetectZeroes, DiscardMode};
    use serde_json::json;

    #[test]
    fn keyval_and_json_forms_agree() {
        let keyval = json!({
            "driver": "file", "node-name": "file0", "filename": "/tmp/disk.img",
            "cache": {"direct": "on", "no-flush": "off"}, "aio": "native",
            "locking": "off", "discard": "on", "read-only": "yes", "force-share": "on",
            "auto-read-only": "false", "detect-zeroes": "unmap", "aio-max-batch": "32",
        });
        let native = json!({
            "driver": "file", "node-name": "file0", "filename": "/tmp/disk.img",
            "cache": {"direct": true, "no-flush": false}, "aio": "native",
            "locking": "off", "discard": "unmap", "read-only": true, "force-share": true,
            "auto-read-only": false, "detect-zeroes": "unmap", "aio-max-batch": 32,
        });
        let a = BlockdevOptions::from_json(&keyval).unwrap();
        assert_eq!(a, BlockdevOptions::from_json(&native).unwrap());
        assert_eq!(
            a,
            BlockdevOptions {
                common: CommonOptions {
                    node_name: Some("file0".into()),
                    discard: DiscardMode::Unmap,
                    cache_direct: true,
                    cache_no_flush: false,
                    read_only: true,
                    auto_read_only: false,
                    force_share: true,
                    detect_zeroes: DetectZeroes::Unmap,
                },
                driver: Box::new(FileOptions {
                    host_device: false,
                    filename: "/tmp/disk.img".into(),
                    aio: AioMode::Native,
                    locking: LockingMode::Off,
                }),
            }
        );
        assert_eq!(BlockdevOptions::from_json(&a.to_json()).unwrap(), a);
    }

    #[test]
    fn host_device_defaults() {
        let v = json!({"driver": "host_device", "filename": "/dev/sdb"});
        let file = BlockdevOptions::from_json(&v).unwrap();
        assert_eq!(file.common, CommonOptions::default());
        assert_eq!(
            file.driver.downcast_ref::<FileOptions>(),
            Some(&FileOptions {
                host_device: true,
                filename: "/dev/sdb".into(),
                aio: AioMode::IoUring,
                locking: LockingMode::Auto,
            })
        );
        assert_eq!(file.to_json()["driver"], "host_device");
    }
}

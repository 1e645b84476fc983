//! The options of `null-co` and `null-aio` (QEMU's `BlockdevOptionsNull`).

use super::NullDriver;
use crate::driver::Driver;
use crate::drivers::OpenCtx;
use crate::options::coerce::Fields;
use crate::options::{CommonOptions, DriverOptions, Result};
use serde_json::{json, Map, Value};

/// QEMU's `BlockdevOptionsNull`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NullOptions {
    /// `size` in bytes (QEMU's default is 1 GiB)
    pub size: u64,
    /// `read-zeroes` (QEMU's default is off: reads leave the buffer as it is)
    pub read_zeroes: bool,
    /// `latency-ns`
    pub latency_ns: u64,
    /// Opened as `null-aio` (the same driver; only the name differs).
    pub aio: bool,
}

/// QEMU's default size of a null-co/null-aio node: 1 GiB.
pub const NULL_DEFAULT_SIZE: u64 = 1 << 30;

impl NullOptions {
    fn take_from(f: &mut Fields, aio: bool) -> Result<Self> {
        Ok(NullOptions {
            size: f.size("size")?.unwrap_or(NULL_DEFAULT_SIZE),
            read_zeroes: f.bool("read-zeroes")?.unwrap_or(false),
            latency_ns: f.unsigned("latency-ns")?.unwrap_or(0),
            aio,
        })
    }
}

impl DriverOptions for NullOptions {
    fn driver_name(&self) -> &'static str {
        if self.aio {
            "null-aio"
        } else {
            "null-co"
        }
    }

    fn write_json(&self, m: &mut Map<String, Value>) {
        m.insert("size".into(), json!(self.size));
        m.insert("read-zeroes".into(), json!(self.read_zeroes));
        m.insert("latency-ns".into(), json!(self.latency_ns));
    }

    fn open(&self, _ctx: &mut OpenCtx<'_>) -> crate::Result<Box<dyn Driver>> {
        Ok(Box::new(NullDriver::new(self.clone())))
    }
}

/// The table's parse function of `null-co` and `null-aio`.
pub(super) fn parse(
    f: &mut Fields,
    _common: &CommonOptions,
    name: &'static str,
) -> Result<Box<dyn DriverOptions>> {
    Ok(Box::new(NullOptions::take_from(f, name == "null-aio")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::BlockdevOptions;
    use serde_json::json;

    fn parse(v: Value) -> BlockdevOptions {
        BlockdevOptions::from_json(&v).unwrap()
    }

    #[test]
    fn defaults() {
        let null = parse(json!({"driver": "null-aio"}));
        assert_eq!(
            null.driver.downcast_ref::<NullOptions>(),
            Some(&NullOptions {
                size: 1073741824,
                read_zeroes: false,
                latency_ns: 0,
                aio: true,
            })
        );
        assert_eq!(null.driver.driver_name(), "null-aio");
    }

    #[test]
    fn keyval_and_json_forms_agree() {
        let keyval = json!({"driver": "null-co", "node-name": "n", "size": "1G",
                            "read-zeroes": "on", "latency-ns": "0x10"});
        let native = json!({"driver": "null-co", "node-name": "n", "size": 1073741824u64,
                            "read-zeroes": true, "latency-ns": 16});
        let a = parse(keyval);
        assert_eq!(a, parse(native));
        assert_eq!(parse(a.to_json()), a);
    }
}

//! What the block layer reports of its nodes, typed: QEMU's `BlockDeviceInfo`
//! (`query-named-block-nodes`), `ImageInfo` and `BlockDirtyInfo`, serialised with
//! QEMU's member names and in QEMU's order. The driver-specific members of
//! `ImageInfo` (`format-specific`, `cluster-size`, ...) each driver gives
//! ([`crate::driver::Driver::image_info`], [`crate::format_info`]).

use crate::format_info::DriverImageInfo;
use crate::snapshot::SnapshotInfo;
use serde::Serialize;
use serde_json::Value;

/// QEMU's `BlockDeviceInfo`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockDeviceInfo {
    pub file: String,
    #[serde(rename = "node-name")]
    pub node_name: String,
    pub ro: bool,
    pub drv: String,
    pub backing_file_depth: u64,
    pub encrypted: bool,
    pub detect_zeroes: &'static str,
    /// The legacy throttling figures (vubd throttles with a `throttle` node: 0).
    pub bps: u64,
    pub bps_rd: u64,
    pub bps_wr: u64,
    pub iops: u64,
    pub iops_rd: u64,
    pub iops_wr: u64,
    pub image: ImageInfo,
    pub cache: BlockdevCacheInfo,
    pub write_threshold: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Absent when the node has no bitmap, as in QEMU.
    #[serde(rename = "dirty-bitmaps", skip_serializing_if = "Option::is_none")]
    pub dirty_bitmaps: Option<Vec<BlockDirtyInfo>>,
}

/// QEMU's `BlockdevCacheInfo`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevCacheInfo {
    pub writeback: bool,
    pub direct: bool,
    #[serde(rename = "no-flush")]
    pub no_flush: bool,
}

/// QEMU's `ImageInfo`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub filename: String,
    pub format: String,
    pub virtual_size: u64,
    pub dirty_flag: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    /// The driver's own members (`cluster-size`, `encrypted`, `format-specific`,
    /// `backing-filename`, ...).
    #[serde(flatten)]
    pub driver: DriverImageInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_image: Option<Box<ImageInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<SnapshotInfo>>,
}

/// QEMU's `BlockDirtyInfo`: a named bitmap, or a job's (no name, never persistent
/// nor busy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub recording: bool,
    pub persistent: bool,
    pub busy: bool,
    pub granularity: u64,
    pub count: u64,
    /// Only when set, as in QEMU.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inconsistent: bool,
}

impl BlockDirtyInfo {
    /// A job's bitmap (no name).
    pub fn anonymous(recording: bool, granularity: u64, count: u64) -> Self {
        BlockDirtyInfo {
            name: None,
            recording,
            persistent: false,
            busy: false,
            granularity,
            count,
            inconsistent: false,
        }
    }
}

/// Implements `Serialize` for enums with a `name(self) -> &'static str` (QEMU's
/// name of the value): they serialise as that name.
#[macro_export]
macro_rules! serialize_by_name {
    ($($t:ty),*) => {$(
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }
    )*};
}

crate::serialize_by_name!(crate::error_policy::IoStatus);

/// A value as JSON (serialising these types cannot fail: their maps have string
/// keys).
pub fn to_json(v: &impl Serialize) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_info_as_qemu_writes_it() {
        let a = to_json(&BlockDirtyInfo::anonymous(true, 65536, 0));
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"recording":true,"persistent":false,"busy":false,"granularity":65536,"count":0}"#
        );
        let n = BlockDirtyInfo {
            name: Some("b".into()),
            inconsistent: true,
            ..BlockDirtyInfo::anonymous(false, 512, 1024)
        };
        let v = to_json(&n);
        assert_eq!(v["name"], "b");
        assert_eq!(v["inconsistent"], true);
    }
}

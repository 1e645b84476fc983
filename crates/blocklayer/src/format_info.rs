//! What only a driver knows of its image, typed: the members of QEMU's `ImageInfo`
//! a driver gives ([`DriverImageInfo`]: `cluster-size`, `encrypted`,
//! `format-specific`, `backing-filename`, `backing-filename-format`) and QEMU's
//! `ImageInfoSpecific` union ([`ImageInfoSpecific`]) with its `qcow2`, `luks` and
//! `rbd` variants. Serialised with QEMU's member names, in the order vubd writes
//! them.

use crate::drivers::luks::info::LuksInfo;
use serde::Serialize;

crate::serialize_by_name!(Qcow2BitmapFlag, Qcow2EncryptionFormat);

/// The members of QEMU's `ImageInfo` that only the driver knows
/// ([`crate::driver::Driver::image_info`]); flattened into [`crate::info::ImageInfo`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DriverImageInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// Only when set, as vubd has always written it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<ImageInfoSpecific>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
}

/// QEMU's `ImageInfoSpecific`: `{"type": KIND, "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum ImageInfoSpecific {
    Qcow2(Qcow2Info),
    Luks(LuksInfo),
    Rbd(RbdInfo),
}

impl ImageInfoSpecific {
    /// The qcow2 data, if this is a qcow2 image's.
    pub fn qcow2(&self) -> Option<&Qcow2Info> {
        match self {
            ImageInfoSpecific::Qcow2(q) => Some(q),
            _ => None,
        }
    }
}

/// QEMU's `ImageInfoSpecificQCow2`. The optional members follow QEMU's
/// `qcow2_get_specific_info`: a version 3 image has `lazy-refcounts`, `corrupt`,
/// `extended-l2` (and `bitmaps` when it has any, `data-file` when it has one); a
/// version 2 image only the mandatory members (and `encrypt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Info {
    pub compat: Qcow2Compat,
    pub compression_type: Qcow2CompressionType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<Qcow2BitmapInfo>>,
    pub refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<Qcow2Encryption>,
}

impl Qcow2Info {
    /// The info of a qcow2 image with header info `i`, persistent bitmaps `bitmaps`
    /// and LUKS encryption info `encrypt` (QEMU's `qcow2_get_specific_info`).
    pub fn new(
        i: &qcow::ImageInfo,
        bitmaps: &[qcow::BitmapInfo],
        encrypt: Option<LuksInfo>,
    ) -> Self {
        let v3 = i.version >= 3;
        Qcow2Info {
            compat: if v3 { Qcow2Compat::V3 } else { Qcow2Compat::V2 },
            // As QEMU: a version 2 image reports zlib (the only type it can have).
            compression_type: i.compression.into(),
            lazy_refcounts: v3.then_some(i.lazy_refcounts),
            // As QEMU: the list only when there are bitmaps.
            bitmaps: (v3 && !bitmaps.is_empty())
                .then(|| bitmaps.iter().map(Qcow2BitmapInfo::from).collect()),
            refcount_bits: i.refcount_bits,
            corrupt: v3.then_some(i.corrupt),
            extended_l2: v3.then_some(i.extended_l2),
            data_file: i.data_file.clone().filter(|_| v3),
            data_file_raw: (v3 && i.data_file.is_some()).then_some(i.data_file_raw),
            encrypt: encrypt.map(Qcow2Encryption::luks),
        }
    }
}

/// `compat` of QEMU's `ImageInfoSpecificQCow2`: the image version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Qcow2Compat {
    #[serde(rename = "0.10")]
    V2,
    #[serde(rename = "1.1")]
    V3,
}

/// QEMU's `Qcow2CompressionType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Qcow2CompressionType {
    Zlib,
    Zstd,
}

impl From<qcow::CompressionType> for Qcow2CompressionType {
    fn from(c: qcow::CompressionType) -> Self {
        match c {
            qcow::CompressionType::Zlib => Qcow2CompressionType::Zlib,
            qcow::CompressionType::Zstd => Qcow2CompressionType::Zstd,
        }
    }
}

/// QEMU's `Qcow2BitmapInfo`: the flags as the image has them (`in-use` while a
/// program has the bitmap, or after it crashed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Qcow2BitmapInfo {
    pub flags: Vec<Qcow2BitmapFlag>,
    pub name: String,
    pub granularity: u64,
}

/// QEMU's `Qcow2BitmapInfoFlags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qcow2BitmapFlag {
    InUse,
    Auto,
}

impl Qcow2BitmapFlag {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            Qcow2BitmapFlag::InUse => "in-use",
            Qcow2BitmapFlag::Auto => "auto",
        }
    }
}

impl From<&qcow::BitmapInfo> for Qcow2BitmapInfo {
    fn from(b: &qcow::BitmapInfo) -> Self {
        let mut flags = Vec::new();
        if b.in_use {
            flags.push(Qcow2BitmapFlag::InUse);
        }
        if b.auto {
            flags.push(Qcow2BitmapFlag::Auto);
        }
        Qcow2BitmapInfo {
            flags,
            name: b.name.clone(),
            granularity: b.granularity,
        }
    }
}

/// QEMU's `ImageInfoSpecificQCow2Encryption`, a union on `format` of which vubd
/// has the `luks` variant only (it refuses QEMU's legacy `aes` images). The tag
/// comes after the LUKS members, where vubd has always written it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Qcow2Encryption {
    #[serde(flatten)]
    pub luks: LuksInfo,
    pub format: Qcow2EncryptionFormat,
}

impl Qcow2Encryption {
    pub fn luks(luks: LuksInfo) -> Self {
        Qcow2Encryption {
            luks,
            format: Qcow2EncryptionFormat::Luks,
        }
    }
}

/// QEMU's `BlockdevQcow2EncryptionFormat` (of which vubd opens `luks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qcow2EncryptionFormat {
    Luks,
}

impl Qcow2EncryptionFormat {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            Qcow2EncryptionFormat::Luks => "luks",
        }
    }
}

/// QEMU's `ImageInfoSpecificRbd`: vubd has none of its optional members
/// (`encryption-format`: vubd opens no encrypted rbd image), so it is `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RbdInfo {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::luks::info::example as luks_example;

    fn qcow2_header(version: u32) -> qcow::ImageInfo {
        qcow::ImageInfo {
            size: 1 << 30,
            cluster_size: 65536,
            version,
            refcount_bits: 16,
            extended_l2: false,
            lazy_refcounts: false,
            backing_file: None,
            backing_format: None,
            corrupt: false,
            writable: true,
            compression: qcow::CompressionType::Zlib,
            data_file: None,
            data_file_raw: false,
            crypto_header: None,
        }
    }

    fn json(v: &impl Serialize) -> String {
        serde_json::to_string(v).unwrap()
    }

    /// The wire shape of a qcow2 image's `format-specific` and its `ImageInfo`
    /// members, pinned.
    #[test]
    fn qcow2_as_vubd_writes_it() {
        let mut h = qcow2_header(3);
        h.data_file = Some("d.raw".into());
        h.data_file_raw = true;
        let bitmaps = [qcow::BitmapInfo {
            name: "b0".into(),
            granularity: 65536,
            in_use: true,
            auto: true,
            inconsistent: false,
            unusable: false,
        }];
        let info = DriverImageInfo {
            cluster_size: Some(65536),
            format_specific: Some(ImageInfoSpecific::Qcow2(Qcow2Info::new(&h, &bitmaps, None))),
            backing_filename: Some("base.qcow2".into()),
            backing_filename_format: Some("qcow2".into()),
            ..Default::default()
        };
        assert_eq!(
            json(&info),
            r#"{"cluster-size":65536,"format-specific":{"type":"qcow2","data":{"compat":"1.1","compression-type":"zlib","lazy-refcounts":false,"bitmaps":[{"flags":["in-use","auto"],"name":"b0","granularity":65536}],"refcount-bits":16,"corrupt":false,"extended-l2":false,"data-file":"d.raw","data-file-raw":true}},"backing-filename":"base.qcow2","backing-filename-format":"qcow2"}"#
        );
        // Version 2: the mandatory members only.
        let v2 = Qcow2Info::new(&qcow2_header(2), &bitmaps, None);
        assert_eq!(
            json(&v2),
            r#"{"compat":"0.10","compression-type":"zlib","refcount-bits":16}"#
        );
    }

    #[test]
    fn encrypted_qcow2_as_vubd_writes_it() {
        let info = DriverImageInfo {
            cluster_size: Some(65536),
            encrypted: true,
            format_specific: Some(ImageInfoSpecific::Qcow2(Qcow2Info::new(
                &qcow2_header(3),
                &[],
                Some(luks_example()),
            ))),
            ..Default::default()
        };
        let s = json(&info);
        assert!(
            s.starts_with(
                r#"{"cluster-size":65536,"encrypted":true,"format-specific":{"type":"qcow2","data":{"compat":"1.1","compression-type":"zlib","lazy-refcounts":false,"refcount-bits":16,"corrupt":false,"extended-l2":false,"encrypt":{"cipher-alg":"aes-256","#
            ),
            "{s}"
        );
        assert!(
            s.ends_with(r#""ivgen-hash-alg":"sha256","format":"luks"}}}}"#),
            "{s}"
        );
    }

    #[test]
    fn luks_and_rbd_as_vubd_writes_them() {
        let luks = DriverImageInfo {
            encrypted: true,
            format_specific: Some(ImageInfoSpecific::Luks(luks_example())),
            ..Default::default()
        };
        let s = json(&luks);
        assert!(
            s.starts_with(
                r#"{"encrypted":true,"format-specific":{"type":"luks","data":{"cipher-alg":"aes-256","#
            ),
            "{s}"
        );
        assert_eq!(
            serde_json::to_value(&luks).unwrap()["format-specific"]["data"],
            serde_json::to_value(luks_example()).unwrap()
        );
        let rbd = DriverImageInfo {
            cluster_size: Some(4 << 20),
            format_specific: Some(ImageInfoSpecific::Rbd(RbdInfo {})),
            ..Default::default()
        };
        assert_eq!(
            json(&rbd),
            r#"{"cluster-size":4194304,"format-specific":{"type":"rbd","data":{}}}"#
        );
        assert_eq!(json(&DriverImageInfo::default()), "{}");
    }
}

//! The qcow2 header and its extensions: parsing, validation and serialisation.
//!
//! All numbers are big-endian. The header, its extensions and the backing file
//! name all live in the first cluster.

use thiserror::Error;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Where a version 3 header holds its incompatible feature bits (big endian).
pub const INCOMPATIBLE_FEATURES_OFFSET: u64 = 72;
/// Length of the fixed part of a version 3 header (through `header_length`).
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// The version 3 header length this crate writes (with `compression_type`).
pub const V3_HEADER_LEN: u32 = 112;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be inconsistent (lazy refcounts).
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata may be corrupt: do not write.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// The `compression_type` field is not zlib.
    pub const COMPRESSION: u64 = 1 << 3;
    /// L2 entries are 128 bits with subcluster bitmaps.
    pub const EXTL2: u64 = 1 << 4;
    /// Every bit this crate understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts may be used.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a consistent raw image.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// Every bit this crate understands.
    pub const KNOWN: u64 = BITMAPS | DATA_FILE_RAW;
}

/// Header extension types.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Bitmaps directory.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// `crypt_method`: guest data is not encrypted.
pub const CRYPT_NONE: u32 = 0;
/// `crypt_method`: the old AES-CBC encryption (refused).
pub const CRYPT_AES: u32 = 1;
/// `crypt_method`: LUKS, its header in the clusters the crypto header extension
/// points to.
pub const CRYPT_LUKS: u32 = 2;
/// Largest LUKS header area accepted (QEMU's LUKS headers with 8 slots of 64-byte
/// keys take about 2 MiB).
pub const MAX_CRYPTO_HEADER: u64 = 64 << 20;

/// Largest L1 table accepted (QEMU's limit), in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted (QEMU's limit), in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most snapshots accepted (QEMU's limit).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Errors in the header.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    /// Not a qcow2 file.
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    /// The file is shorter than its header.
    #[error("image too short for its header")]
    Truncated,
    /// Only versions 2 and 3 exist.
    #[error("unsupported qcow2 version {0}")]
    Version(u32),
    /// A field is out of range or inconsistent.
    #[error("invalid header: {0}")]
    Invalid(String),
    /// An incompatible feature we do not know.
    #[error("unsupported incompatible qcow2 feature bit {bit}{}", .name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default())]
    UnknownIncompatible {
        /// The bit number.
        bit: u32,
        /// Its name from the image's feature name table, if any.
        name: Option<String>,
    },
    /// The old AES encryption is refused rather than served as ciphertext.
    #[error(
        "{0}-encrypted qcow2 images are not supported (as QEMU's system emulators, \
             which refuse them; convert them to LUKS encryption with qemu-img)"
    )]
    Encrypted(&'static str),
    /// A header extension is malformed.
    #[error("invalid header extension {kind:#010x}: {why}")]
    Extension {
        /// Extension type.
        kind: u32,
        /// What is wrong.
        why: String,
    },
    /// The header with its extensions does not fit in the first cluster.
    #[error("header and extensions do not fit in one cluster")]
    TooLarge,
}

fn invalid(s: impl Into<String>) -> HeaderError {
    HeaderError::Invalid(s.into())
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name (at most 46 bytes).
    pub name: String,
}

/// The bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps.
    pub nb_bitmaps: u32,
    /// Size of the directory in bytes.
    pub directory_size: u64,
    /// Offset of the directory.
    pub directory_offset: u64,
}

/// Compression types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate (the default).
    #[default]
    Zlib,
    /// Zstandard.
    Zstd,
}

/// A parsed header with its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length (72 for v2).
    pub header_length: u32,
    /// Compression type of compressed clusters.
    pub compression_type: CompressionType,
    /// Bytes of unknown additional header fields past offset 105, kept on rewrite.
    pub extra_fields: Vec<u8>,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing file format.
    pub backing_format: Option<String>,
    /// External data file name.
    pub data_file: Option<String>,
    /// Feature name table.
    pub feature_names: Vec<FeatureName>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// Full disk encryption header pointer (offset, length).
    pub crypto_header: Option<(u64, u64)>,
    /// Unknown extensions (type, data), preserved on rewrite.
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Whether L2 entries are extended (subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTL2 != 0
    }
    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Reads the cluster size from the start of a header, validating only
    /// what is needed for that (so that the caller knows how much to read).
    pub fn peek_cluster_bits(buf: &[u8]) -> Result<u32, HeaderError> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(HeaderError::Truncated);
        }
        if be32(buf, 0) != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let bits = be32(buf, 20);
        if !(9..=21).contains(&bits) {
            return Err(invalid(format!("cluster_bits {bits} out of range 9..=21")));
        }
        Ok(bits)
    }

    /// Parses and validates a header from the first cluster of an image
    /// (`buf` may be shorter if the file is). `file_len` bounds the tables.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        let cluster_bits = Self::peek_cluster_bits(buf)?;
        let cs = 1u64 << cluster_bits;
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::Version(version));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            extra_fields: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            crypto_header: None,
            unknown_extensions: Vec::new(),
        };
        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16);
        let mut compression_raw = 0u8;
        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LEN as usize {
                return Err(HeaderError::Truncated);
            }
            h.incompatible_features = be64(buf, INCOMPATIBLE_FEATURES_OFFSET as usize);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_MIN_HEADER_LEN || !h.header_length.is_multiple_of(8) {
                return Err(invalid(format!(
                    "header_length {} invalid",
                    h.header_length
                )));
            }
            if h.header_length as u64 > cs || h.header_length as usize > buf.len() {
                return Err(invalid("header_length exceeds the first cluster"));
            }
            if h.header_length > 104 {
                compression_raw = buf[104];
            }
            if h.header_length > 105 {
                h.extra_fields = buf[105..h.header_length as usize].to_vec();
            }
        }
        // Extensions: between the header and the backing file name (or the
        // end of the first cluster).
        let ext_end = if backing_file_offset != 0 {
            if backing_file_offset > cs
                || backing_file_size > MAX_BACKING_NAME
                || backing_file_offset + backing_file_size as u64 > cs
            {
                return Err(invalid(
                    "backing file name outside the first cluster or too long",
                ));
            }
            backing_file_offset as usize
        } else {
            cs as usize
        }
        .min(buf.len());
        h.parse_extensions(&buf[..ext_end], h.header_length as usize)?;
        if backing_file_offset != 0 {
            let s = backing_file_offset as usize;
            let e = s + backing_file_size as usize;
            if e > buf.len() {
                return Err(HeaderError::Truncated);
            }
            h.backing_file = Some(
                String::from_utf8(buf[s..e].to_vec())
                    .map_err(|_| invalid("backing file name is not UTF-8"))?,
            );
        }
        h.compression_type = match compression_raw {
            0 => CompressionType::Zlib,
            1 => CompressionType::Zstd,
            n => return Err(invalid(format!("unknown compression type {n}"))),
        };
        h.validate(file_len)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8], start: usize) -> Result<(), HeaderError> {
        let mut off = start;
        let mut seen = Vec::new();
        loop {
            if off + 8 > buf.len() {
                // No end marker before the end of the area: treat as end
                // (QEMU does the same when the area is exhausted).
                return Ok(());
            }
            let kind = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            off += 8;
            if kind == ext::END {
                return Ok(());
            }
            let bad = |why: &str| HeaderError::Extension {
                kind,
                why: why.to_string(),
            };
            if len > buf.len() - off {
                return Err(bad("length exceeds the header area"));
            }
            let data = &buf[off..off + len];
            off += len.div_ceil(8) * 8;
            if kind != 0 && seen.contains(&kind) && kind != ext::FEATURE_TABLE {
                return Err(bad("appears twice"));
            }
            seen.push(kind);
            let string =
                |d: &[u8]| String::from_utf8(d.to_vec()).map_err(|_| bad("string is not UTF-8"));
            match kind {
                ext::BACKING_FORMAT => {
                    if len > 1023 {
                        return Err(bad("backing format name too long"));
                    }
                    self.backing_format = Some(string(data)?)
                }
                ext::DATA_FILE => {
                    if len > 1023 {
                        return Err(bad("data file name too long"));
                    }
                    self.data_file = Some(string(data)?)
                }
                ext::FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name_bytes = &e[2..];
                        let n = name_bytes.iter().position(|&c| c == 0).unwrap_or(46);
                        self.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&name_bytes[..n]).into_owned(),
                        });
                    }
                }
                ext::BITMAPS => {
                    if len != 24 {
                        return Err(bad("invalid bitmaps extension length"));
                    }
                    if be32(data, 4) != 0 {
                        return Err(bad("bitmaps extension reserved field is not zero"));
                    }
                    self.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    });
                }
                ext::CRYPTO => {
                    if len < 16 {
                        return Err(bad("encryption header pointer too short"));
                    }
                    self.crypto_header = Some((be64(data, 0), be64(data, 8)));
                }
                _ => self.unknown_extensions.push((kind, data.to_vec())),
            }
        }
    }

    /// The name the feature table gives a bit, if any.
    pub fn feature_name(&self, kind: u8, bit: u32) -> Option<String> {
        self.feature_names
            .iter()
            .find(|f| f.kind == kind && f.bit as u32 == bit)
            .map(|f| f.name.clone())
    }

    fn validate(&self, file_len: u64) -> Result<(), HeaderError> {
        let cs = self.cluster_size();
        match self.crypt_method {
            CRYPT_NONE | CRYPT_LUKS => {}
            CRYPT_AES => return Err(HeaderError::Encrypted("AES")),
            n => return Err(invalid(format!("unknown crypt_method {n}"))),
        }
        match (self.crypt_method, self.crypto_header) {
            (CRYPT_LUKS, None) => {
                return Err(invalid("LUKS encryption method without a crypto header"))
            }
            (CRYPT_LUKS, Some((off, len))) => {
                if !off.is_multiple_of(cs) {
                    return Err(invalid(format!(
                        "Encryption header offset '{off}' is not a multiple of cluster size '{cs}'"
                    )));
                }
                if len == 0
                    || len > MAX_CRYPTO_HEADER
                    || off.checked_add(len).is_none_or(|e| e > file_len)
                {
                    return Err(invalid(format!(
                        "Encryption header length '{len}' is too large or past the end of the file"
                    )));
                }
            }
            (_, Some(_)) => {
                return Err(invalid(
                    "CRYPTO header extension only expected with LUKS encryption method",
                ))
            }
            _ => {}
        }
        let unknown = self.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            return Err(HeaderError::UnknownIncompatible {
                bit,
                name: self.feature_name(0, bit),
            });
        }
        if self.refcount_order > 6 {
            return Err(invalid(format!(
                "refcount_order {} > 6",
                self.refcount_order
            )));
        }
        if self.version == 2 && self.refcount_order != 4 {
            return Err(invalid("version 2 images have 16-bit refcounts"));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(invalid(
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        let has_ctype_bit = self.incompatible_features & incompat::COMPRESSION != 0;
        match (has_ctype_bit, self.compression_type) {
            (true, CompressionType::Zlib) => {
                return Err(invalid(
                    "compression type bit set but compression_type is zlib",
                ))
            }
            (false, CompressionType::Zstd) => {
                return Err(invalid(
                    "compression_type is not zlib but its feature bit is clear",
                ))
            }
            _ => {}
        }
        if self.autoclear_features & autoclear::DATA_FILE_RAW != 0
            && self.incompatible_features & incompat::DATA_FILE == 0
        {
            return Err(invalid("data_file_raw set without an external data file"));
        }
        if self.size > i64::MAX as u64 {
            return Err(invalid("virtual size too large"));
        }
        let aligned = |o: u64| o.is_multiple_of(cs);
        let within = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= file_len);
        // L1 table.
        let l1_bytes = self.l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(invalid(format!(
                "L1 table too large ({} entries)",
                self.l1_size
            )));
        }
        if self.l1_size > 0 && (!aligned(self.l1_table_offset) || self.l1_table_offset == 0) {
            return Err(invalid("L1 table offset is not cluster aligned"));
        }
        if self.l1_size > 0 && !within(self.l1_table_offset, l1_bytes) {
            return Err(invalid("L1 table extends past the end of the file"));
        }
        let need = l1_entries_for(self.size, self.cluster_bits, self.extended_l2());
        if need > self.l1_size as u64 {
            return Err(invalid(format!(
                "L1 table too small for the virtual size ({} < {need} entries)",
                self.l1_size
            )));
        }
        // Refcount table.
        if self.refcount_table_clusters == 0 {
            return Err(invalid("refcount table is empty"));
        }
        let rt_bytes = self.refcount_table_clusters as u64 * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(invalid("refcount table too large"));
        }
        if !aligned(self.refcount_table_offset) || self.refcount_table_offset == 0 {
            return Err(invalid("refcount table offset is not cluster aligned"));
        }
        if !within(self.refcount_table_offset, rt_bytes) {
            return Err(invalid("refcount table extends past the end of the file"));
        }
        // Snapshot table.
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid("too many snapshots"));
        }
        if self.nb_snapshots > 0
            && (!aligned(self.snapshots_offset)
                || !within(self.snapshots_offset, 40 * self.nb_snapshots as u64))
        {
            return Err(invalid(
                "snapshot table offset invalid or past the end of the file",
            ));
        }
        // A bitmaps extension without its autoclear bit is stale (a program
        // without bitmap support wrote the image): it is dropped at open,
        // whatever it says.
        let bitmaps_valid = self.autoclear_features & autoclear::BITMAPS != 0;
        if let Some(b) = self.bitmaps.as_ref().filter(|_| bitmaps_valid) {
            if b.nb_bitmaps == 0 || b.nb_bitmaps > 65535 {
                return Err(invalid("bitmaps extension: bad bitmap count"));
            }
            if b.directory_size == 0
                || b.directory_size > 1024 * 65535
                || !aligned(b.directory_offset)
                || !within(b.directory_offset, b.directory_size)
            {
                return Err(invalid("bitmaps extension: directory out of range"));
            }
        }
        Ok(())
    }

    /// Serialises the header, its extensions and the backing file name into
    /// a buffer of at most one cluster.
    pub fn to_bytes(&self) -> Result<Vec<u8>, HeaderError> {
        let mut b = vec![0u8; self.header_length as usize];
        let put32 =
            |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version >= 3 {
            put64(
                &mut b,
                INCOMPATIBLE_FEATURES_OFFSET as usize,
                self.incompatible_features,
            );
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, self.header_length);
            if self.header_length > 104 {
                b[104] = match self.compression_type {
                    CompressionType::Zlib => 0,
                    CompressionType::Zstd => 1,
                };
            }
            // A 104-byte header (QEMU before 5.1) has neither the compression type
            // nor anything after it.
            if let Some(rest) = b.get_mut(105..) {
                let n = self.extra_fields.len().min(rest.len());
                rest[..n].copy_from_slice(&self.extra_fields[..n]);
            }
        }
        let push_ext = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        };
        if let Some(f) = &self.backing_format {
            push_ext(&mut b, ext::BACKING_FORMAT, f.as_bytes());
        }
        if let Some(f) = &self.data_file {
            push_ext(&mut b, ext::DATA_FILE, f.as_bytes());
        }
        if !self.feature_names.is_empty() {
            let mut t = Vec::new();
            for f in &self.feature_names {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                t.extend_from_slice(&e);
            }
            push_ext(&mut b, ext::FEATURE_TABLE, &t);
        }
        if let Some(bm) = &self.bitmaps {
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&bm.nb_bitmaps.to_be_bytes());
            d.extend_from_slice(&0u32.to_be_bytes());
            d.extend_from_slice(&bm.directory_size.to_be_bytes());
            d.extend_from_slice(&bm.directory_offset.to_be_bytes());
            push_ext(&mut b, ext::BITMAPS, &d);
        }
        if let Some((o, l)) = self.crypto_header {
            let mut d = o.to_be_bytes().to_vec();
            d.extend_from_slice(&l.to_be_bytes());
            push_ext(&mut b, ext::CRYPTO, &d);
        }
        for (k, d) in &self.unknown_extensions {
            push_ext(&mut b, *k, d);
        }
        push_ext(&mut b, ext::END, &[]);
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME as usize {
                return Err(invalid("backing file name too long"));
            }
            let off = b.len() as u64;
            put64(&mut b, 8, off);
            put32(&mut b, 16, name.len() as u32);
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(HeaderError::TooLarge);
        }
        Ok(b)
    }

    /// The feature name table this crate writes into new images.
    pub fn default_feature_names() -> Vec<FeatureName> {
        let f = |kind, bit, name: &str| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        };
        vec![
            f(0, 0, "dirty bit"),
            f(0, 1, "corrupt bit"),
            f(0, 2, "external data file"),
            f(0, 3, "compression type"),
            f(0, 4, "extended L2 entries"),
            f(1, 0, "lazy refcounts"),
            f(2, 0, "bitmaps"),
            f(2, 1, "raw external data"),
        ]
    }
}

/// Number of L1 entries needed for a virtual size.
pub fn l1_entries_for(size: u64, cluster_bits: u32, extended_l2: bool) -> u64 {
    let l2_bits = cluster_bits - if extended_l2 { 4 } else { 3 };
    let per_l1 = 1u128 << (cluster_bits + l2_bits);
    (size as u128).div_ceil(per_l1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: compat::LAZY_REFCOUNTS,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            extra_fields: vec![0; 7],
            backing_file: Some("base.img".into()),
            backing_format: Some("raw".into()),
            data_file: None,
            feature_names: Header::default_feature_names(),
            bitmaps: None,
            crypto_header: None,
            unknown_extensions: vec![(0x1234_5678, vec![1, 2, 3])],
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let b = h.to_bytes().unwrap();
        let p = Header::parse(&b, 1 << 20).unwrap();
        assert_eq!(p, h);
    }

    #[test]
    fn rejects_bad_fields() {
        let h = sample();
        let b = h.to_bytes().unwrap();
        let mut bad = b.clone();
        bad[0] = 0;
        assert_eq!(Header::parse(&bad, 1 << 20), Err(HeaderError::BadMagic));
        let mut bad = b.clone();
        bad[23] = 30;
        assert!(matches!(
            Header::parse(&bad, 1 << 20),
            Err(HeaderError::Invalid(_))
        ));
        let mut bad = b.clone();
        bad[72 + 7] |= 1 << 5; // unknown incompatible bit 5
        assert_eq!(
            Header::parse(&bad, 1 << 20),
            Err(HeaderError::UnknownIncompatible { bit: 5, name: None })
        );
        let mut h2 = sample();
        h2.incompatible_features = 1 << 9;
        h2.feature_names.push(FeatureName {
            kind: 0,
            bit: 9,
            name: "future thing".into(),
        });
        let e = Header::parse(&h2.to_bytes().unwrap(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("bit 9 (future thing)"), "{e}");
        let mut h2 = sample();
        h2.crypt_method = CRYPT_AES;
        assert_eq!(
            Header::parse(&h2.to_bytes().unwrap(), 1 << 20),
            Err(HeaderError::Encrypted("AES"))
        );
        // LUKS needs its header pointer, inside the file and cluster aligned.
        h2.crypt_method = CRYPT_LUKS;
        assert!(Header::parse(&h2.to_bytes().unwrap(), 1 << 20).is_err());
        h2.crypto_header = Some((0x40000, 0x1000));
        assert_eq!(Header::parse(&h2.to_bytes().unwrap(), 1 << 20).unwrap(), h2);
        for bad in [
            (0x40200, 0x1000),
            (0x40000, 0),
            (0xff000, 0x2000),
            (0x40000, u64::MAX),
        ] {
            h2.crypto_header = Some(bad);
            assert!(
                Header::parse(&h2.to_bytes().unwrap(), 1 << 20).is_err(),
                "{bad:?}"
            );
        }
        // The pointer without LUKS.
        h2.crypt_method = CRYPT_NONE;
        h2.crypto_header = Some((0x40000, 0x1000));
        assert!(Header::parse(&h2.to_bytes().unwrap(), 1 << 20).is_err());
        // L1 past the end of the file.
        assert!(Header::parse(&b, 0x30000).is_err());
        // Huge L1.
        let mut h2 = sample();
        h2.l1_size = u32::MAX;
        assert!(Header::parse(&h2.to_bytes().unwrap(), u64::MAX).is_err());
        // Extension length past the end.
        let mut bad = b.clone();
        bad[112 + 4..112 + 8].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&bad, 1 << 20),
            Err(HeaderError::Extension { .. })
        ));
    }

    #[test]
    fn v2_header() {
        let mut h = sample();
        h.version = 2;
        h.header_length = V2_HEADER_LEN;
        h.compatible_features = 0;
        h.extra_fields.clear();
        let b = h.to_bytes().unwrap();
        assert_eq!(Header::parse(&b, 1 << 20).unwrap(), h);
    }
}

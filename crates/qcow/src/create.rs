//! Image creation with QEMU's options.

use crate::header::{self, compat, incompat, CompressionType, Header};
use crate::image::{OpenOptions, Qcow2};
use crate::io::{self, QcowIo};
use crate::layout;
use crate::NoBacking;
use thiserror::Error;

/// Errors of image creation.
#[derive(Debug, Error)]
pub enum CreateError {
    /// An option is invalid or options conflict.
    #[error("invalid create option: {0}")]
    Invalid(String),
    /// An option this crate does not implement yet.
    #[error("unsupported create option: {0}")]
    Unsupported(String),
    /// Writing the image failed.
    #[error(transparent)]
    Image(#[from] crate::image::Error),
    /// I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// `compat`: 0.10 (version 2) or 1.1 (version 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compat {
    /// compat=0.10
    V2,
    /// compat=1.1
    #[default]
    V3,
}

/// `preallocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing preallocated.
    #[default]
    Off,
    /// L2 tables and data cluster mappings allocated; the file covers the
    /// data clusters but is sparse.
    Metadata,
    /// Like metadata, with the host space of every data cluster reserved
    /// ([`QcowIo::allocate`]: fallocate), reading as zeroes.
    Falloc,
    /// Like metadata, with every data cluster written with zeroes.
    Full,
}

/// Creation options, named as QEMU's.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size (512 B to 2 MiB, a power of two).
    pub cluster_size: u64,
    /// Version.
    pub compat: Compat,
    /// Set the lazy refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// Refcount width (1, 2, 4, 8, 16, 32, 64).
    pub refcount_bits: u32,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing file format.
    pub backing_fmt: Option<String>,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Compression type.
    pub compression_type: CompressionType,
    /// External data file name recorded in the header (use
    /// [`create_with_data_file`]).
    pub data_file: Option<String>,
    /// The data file is kept a consistent raw image (implies at least
    /// metadata preallocation, as in QEMU).
    pub data_file_raw: bool,
    /// Encrypt guest data: the formatted LUKS header (with its key material) to
    /// store in the image's crypto header clusters (`crypt_method` 2). The
    /// caller keeps the volume key for the data it writes.
    pub encryption: Option<Vec<u8>>,
}

impl CreateOptions {
    /// QEMU's defaults for a given size.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            cluster_size: 65536,
            compat: Compat::V3,
            lazy_refcounts: false,
            refcount_bits: 16,
            extended_l2: false,
            backing_file: None,
            backing_fmt: None,
            preallocation: Preallocation::Off,
            compression_type: CompressionType::Zlib,
            data_file: None,
            data_file_raw: false,
            encryption: None,
        }
    }

    /// Checks the options without creating anything (creation checks them too).
    pub fn validate(&self) -> Result<(), CreateError> {
        let bad = |s: &str| Err(CreateError::Invalid(s.into()));
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return bad("cluster_size must be a power of two between 512 and 2M");
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return bad("refcount_bits must be a power of two up to 64");
        }
        if self.compat == Compat::V2 {
            if self.refcount_bits != 16 {
                return bad("compat=0.10 only supports refcount_bits=16");
            }
            if self.lazy_refcounts {
                return bad("lazy_refcounts need compat=1.1");
            }
            if self.extended_l2 {
                return bad("extended_l2 needs compat=1.1");
            }
            if self.compression_type != CompressionType::Zlib {
                return bad("compression_type other than zlib needs compat=1.1");
            }
        }
        if self.extended_l2 && cs < 16384 {
            return bad("extended_l2 needs a cluster size of at least 16k");
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return bad("backing_fmt needs backing_file");
        }
        if self.data_file.is_some() && self.compat == Compat::V2 {
            return bad("data_file needs compat=1.1");
        }
        if self.data_file_raw && self.data_file.is_none() {
            return bad("data_file_raw needs data_file");
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return bad("data_file_raw cannot be used with a backing file");
        }
        // Preallocated clusters of an encrypted image hold plaintext zeroes (or
        // nothing), which read back as whatever they decrypt to, as in QEMU.
        if self.encryption.is_some() && self.data_file.is_some() {
            return bad("encrypted images with a data_file are not supported by vubd");
        }
        if self.size > i64::MAX as u64 {
            return bad("size too large");
        }
        if !self.size.is_multiple_of(512) {
            return bad("Image size must be a multiple of 512 bytes");
        }
        Ok(())
    }

    /// The header of a new image before its L1 table exists.
    fn initial_header(&self) -> Header {
        let cb = self.cluster_size.trailing_zeros();
        let v3 = self.compat == Compat::V3;
        let mut incompatible = 0;
        if self.extended_l2 {
            incompatible |= incompat::EXTL2;
        }
        if self.compression_type != CompressionType::Zlib {
            incompatible |= incompat::COMPRESSION;
        }
        if self.data_file.is_some() {
            incompatible |= incompat::DATA_FILE;
        }
        Header {
            version: if v3 { 3 } else { 2 },
            cluster_bits: cb,
            size: 0,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: self.cluster_size,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompatible,
            compatible_features: if self.lazy_refcounts {
                compat::LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: if self.data_file_raw {
                header::autoclear::DATA_FILE_RAW
            } else {
                0
            },
            refcount_order: self.refcount_bits.trailing_zeros(),
            header_length: if v3 {
                header::V3_HEADER_LEN
            } else {
                header::V2_HEADER_LEN
            },
            compression_type: self.compression_type,
            extra_fields: if v3 { vec![0; 7] } else { Vec::new() },
            backing_file: self.backing_file.clone(),
            backing_format: self.backing_fmt.clone(),
            data_file: self.data_file.clone(),
            feature_names: if v3 {
                Header::default_feature_names()
            } else {
                Vec::new()
            },
            bitmaps: None,
            crypto_header: None,
            unknown_extensions: Vec::new(),
        }
    }

    #[cfg(test)]
    pub(crate) fn header_for_test(&self) -> Header {
        self.initial_header()
    }
}

/// Creates an image on `io` (whose content is replaced) and returns it
/// opened read-write.
pub async fn create<I: QcowIo>(io: I, opts: &CreateOptions) -> Result<Qcow2<I>, CreateError> {
    if opts.data_file.is_some() {
        return Err(CreateError::Invalid(
            "an image with data_file needs create_with_data_file".into(),
        ));
    }
    create_inner(io, None, opts).await
}

/// Creates an image whose guest data lives in the external data file
/// `data` (named `opts.data_file` in the header; its content is kept).
pub async fn create_with_data_file<I: QcowIo>(
    io: I,
    data: I,
    opts: &CreateOptions,
) -> Result<Qcow2<I>, CreateError> {
    if opts.data_file.is_none() {
        return Err(CreateError::Invalid(
            "create_with_data_file needs opts.data_file".into(),
        ));
    }
    if opts.data_file_raw && data.len().await? < opts.size {
        data.set_len(opts.size).await?;
    }
    create_inner(io, Some(data), opts).await
}

async fn create_inner<I: QcowIo>(
    io: I,
    data: Option<I>,
    opts: &CreateOptions,
) -> Result<Qcow2<I>, CreateError> {
    opts.validate()?;
    let cs = opts.cluster_size;
    let h = opts.initial_header();
    let hb = h
        .to_bytes()
        .map_err(|e| CreateError::Invalid(e.to_string()))?;
    io.set_len(0).await?;
    let mut first = vec![0u8; cs as usize];
    first[..hb.len()].copy_from_slice(&hb);
    io.write_at(0, &first).await?;
    let mut rt = vec![0u8; cs as usize];
    layout::put_u64(&mut rt, 0, 2 * cs);
    io.write_at(cs, &rt).await?;
    let mut rb = vec![0u8; cs as usize];
    for i in 0..3 {
        layout::rc_set(&mut rb, h.refcount_order, i, 1);
    }
    io.write_at(2 * cs, &rb).await?;
    io.flush().await?;
    let img = Qcow2::open_with_data_file(
        io,
        data,
        OpenOptions {
            lazy_refcounts: Some(false),
            ..OpenOptions::read_write()
        },
    )
    .await?;
    img.resize(opts.size).await?;
    let prealloc = if opts.data_file_raw && opts.preallocation == Preallocation::Off {
        Preallocation::Metadata
    } else {
        opts.preallocation
    };
    if prealloc != Preallocation::Off && opts.size > 0 {
        let chunk = img.geometry().l2_span().min(64 << 20);
        let mut pos = 0;
        while pos < opts.size {
            let n = chunk.min(opts.size - pos);
            let a = img.allocate(pos, n, &NoBacking).await?;
            for r in a.ranges() {
                let done = match prealloc {
                    Preallocation::Falloc => img.data_io().allocate(r.host_offset, r.len).await,
                    Preallocation::Full => {
                        io::write_zero_buffers(img.data_io(), r.host_offset, r.len).await
                    }
                    Preallocation::Off | Preallocation::Metadata => Ok(()),
                };
                if let Err(e) = done {
                    img.abort(a).await;
                    return Err(e.into());
                }
            }
            img.commit(a).await?;
            pos += n;
        }
    }
    // Encryption last: preallocation writes no guest data (the clusters hold
    // zeroes or nothing, and read as what that decrypts to, as in QEMU).
    if let Some(luks) = &opts.encryption {
        img.set_up_encryption(luks).await?;
    }
    // Clears the dirty bit that the metadata writes set: the file is clean even
    // if the caller drops the image without closing it (it stays usable).
    img.close().await?;
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{block_on, MemIo};

    #[test]
    fn option_validation() {
        let mut o = CreateOptions::new(1 << 20);
        o.cluster_size = 1000;
        assert!(block_on(create(MemIo::new(), &o)).is_err());
        let mut o = CreateOptions::new(1 << 20);
        o.compat = Compat::V2;
        o.lazy_refcounts = true;
        assert!(block_on(create(MemIo::new(), &o)).is_err());
        let mut o = CreateOptions::new(1 << 20);
        o.extended_l2 = true;
        o.cluster_size = 4096;
        assert!(block_on(create(MemIo::new(), &o)).is_err());
    }

    /// MemIo that records what `allocate` was asked for and does it by
    /// growing the file only (as fallocate leaves holes reading as zeroes).
    #[derive(Default)]
    struct Recording {
        mem: MemIo,
        allocated: std::sync::Mutex<Vec<(u64, u64)>>,
    }

    impl QcowIo for Recording {
        async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.mem.read_at(offset, buf).await
        }
        async fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
            self.mem.write_at(offset, buf).await
        }
        async fn flush(&self) -> std::io::Result<()> {
            self.mem.flush().await
        }
        async fn len(&self) -> std::io::Result<u64> {
            self.mem.len().await
        }
        async fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.mem.set_len(len).await
        }
        async fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.allocated.lock().unwrap().push((offset, len));
            if self.mem.len().await? < offset + len {
                self.mem.set_len(offset + len).await?;
            }
            Ok(())
        }
    }

    /// The host ranges of the image's data extents, merged.
    fn data_ranges<I: QcowIo>(img: &Qcow2<I>) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for e in block_on(img.map(0, img.size())).unwrap() {
            let crate::ExtentKind::Data { host_offset } = e.kind else {
                panic!("not data: {e:?}");
            };
            match out.last_mut() {
                Some(l) if l.0 + l.1 == host_offset => l.1 += e.len,
                _ => out.push((host_offset, e.len)),
            }
        }
        out
    }

    #[test]
    fn falloc_reserves_exactly_the_data_clusters() {
        let mut o = CreateOptions::new(5 << 20);
        o.cluster_size = 4096;
        o.preallocation = Preallocation::Falloc;
        let img = block_on(create(Recording::default(), &o)).unwrap();
        let mut asked = img.io().allocated.lock().unwrap().clone();
        asked.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (off, len) in asked {
            match merged.last_mut() {
                Some(l) if l.0 + l.1 == off => l.1 += len,
                _ => merged.push((off, len)),
            }
        }
        let mut data = data_ranges(&img);
        data.sort_unstable();
        assert_eq!(merged, data);
        assert_eq!(data.iter().map(|r| r.1).sum::<u64>(), 5 << 20);
        let r = block_on(img.check(crate::check::Repair::None)).unwrap();
        assert!(r.is_clean(), "{r:?}");
        // Metadata and off never reserve data space.
        for mode in [Preallocation::Off, Preallocation::Metadata] {
            o.preallocation = mode;
            let img = block_on(create(Recording::default(), &o)).unwrap();
            assert!(img.io().allocated.lock().unwrap().is_empty(), "{mode:?}");
        }
    }

    #[test]
    fn preallocated_host_files_take_their_space() {
        use std::os::unix::fs::MetadataExt;
        let size = 8u64 << 20;
        for mode in [
            Preallocation::Off,
            Preallocation::Metadata,
            Preallocation::Falloc,
            Preallocation::Full,
        ] {
            let path = std::env::temp_dir().join(format!(
                "qcow-prealloc-{}-{mode:?}.qcow2",
                std::process::id()
            ));
            let mut o = CreateOptions::new(size);
            o.preallocation = mode;
            let img = block_on(create(crate::FileIo::create(&path).unwrap(), &o)).unwrap();
            block_on(img.close()).unwrap();
            let mut buf = vec![1u8; 1 << 20];
            block_on(img.read(size - (1 << 20), &mut buf, &NoBacking)).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "{mode:?}");
            let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
            let len = std::fs::metadata(&path).unwrap().len();
            drop(img);
            std::fs::remove_file(&path).unwrap();
            match mode {
                Preallocation::Off => assert!(len < 1 << 20, "{mode:?}: {len}"),
                _ => assert!(len > size, "{mode:?}: {len}"),
            }
            match mode {
                Preallocation::Off | Preallocation::Metadata => {
                    assert!(allocated < 1 << 20, "{mode:?}: {allocated}")
                }
                _ => assert!(allocated >= size, "{mode:?}: {allocated}"),
            }
        }
    }

    #[test]
    fn creates_openable_images() {
        for (cs, rb, v2, ext) in [
            (65536, 16, false, false),
            (512, 1, false, false),
            (512, 16, true, false),
            (1 << 21, 64, false, true),
            (16384, 8, false, true),
        ] {
            let mut o = CreateOptions::new(100 << 20);
            o.cluster_size = cs;
            o.refcount_bits = rb;
            o.extended_l2 = ext;
            if v2 {
                o.compat = Compat::V2;
            }
            let img = block_on(create(MemIo::new(), &o)).unwrap();
            assert_eq!(img.size(), 100 << 20);
            let r = block_on(img.check(crate::check::Repair::None)).unwrap();
            assert!(r.is_clean(), "{cs} {rb}: {r:?}");
        }
    }
}

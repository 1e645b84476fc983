//! Persistent dirty bitmaps: qcow2's bitmaps extension.
//!
//! The header extension points at a bitmap directory: one entry per bitmap
//! with its name, granularity, flags and the offset of its bitmap table. The
//! table has one 64-bit entry per cluster of bitmap data: the data cluster's
//! host offset, or 0 for a cluster of zero bits (bit 0 set: of one bits).
//! Bit `k` of a bitmap (granule `k` of the disk) is bit `k % 8` of byte
//! `k / 8` of its data.
//!
//! The autoclear bit `BITMAPS` vouches for the extension: a program that does
//! not know bitmaps clears it when it opens the image for writing, and the
//! bitmaps are then dropped. A bitmap that is `in_use` was being changed by a
//! program that did not store it back (it crashed): its content is unusable
//! ("inconsistent"). A writable open sets `in_use` on every bitmap; storing a
//! bitmap writes it with the flag clear.
//!
//! Changing the directory follows QEMU's protocol: a new directory is written
//! to new clusters, then the header points at it, then the old clusters are
//! freed; flags only are changed in place, with the autoclear bit cleared
//! around the write, so that a crash in between leaves the bitmaps dropped
//! rather than wrong.

use crate::header::{autoclear, BitmapsExt};
use crate::image::{Error, Qcow2, Result};
use crate::io::QcowIo;
use thiserror::Error;

/// Most bitmaps in an image.
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory, in bytes.
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Most entries of one bitmap table.
pub const MAX_TABLE_SIZE: u32 = 0x800_0000;
/// Most bytes of data of one bitmap (table entries × cluster size).
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Smallest granularity, as log2 of bytes.
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity, as log2 of bytes.
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest bitmap name, in bytes.
pub const MAX_NAME_SIZE: usize = 1023;
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;

/// Flags of a directory entry.
pub mod flags {
    /// Being changed by a program that has not stored it: content unusable.
    pub const IN_USE: u32 = 1 << 0;
    /// Enabled: tracks writes while the image is in use.
    pub const AUTO: u32 = 1 << 1;
    /// The extra data may be ignored (the bitmap is usable without it).
    pub const EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
    /// Every flag defined.
    pub const KNOWN: u32 = IN_USE | AUTO | EXTRA_DATA_COMPATIBLE;
}

/// Bits of a table entry that must be zero.
const ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Host offset bits of a table entry.
const ENTRY_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
/// A table entry without an offset: the cluster's bits are all ones.
const ENTRY_ALL_ONES: u64 = 1;

/// Length of a directory entry before its extra data and name.
const ENTRY_HEADER_LEN: usize = 24;

/// Errors in the bitmaps extension.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BitmapError {
    /// The directory as a whole is malformed.
    #[error("bitmap directory: {0}")]
    Directory(String),
    /// One entry breaks the format's constraints.
    #[error("bitmap '{name}' doesn't satisfy the constraints: {why}")]
    Entry {
        /// The bitmap's name (lossy).
        name: String,
        /// What is wrong.
        why: String,
    },
    /// A bitmap's table or data is malformed.
    #[error("could not read bitmap '{name}' from the image: {why}")]
    Table {
        /// The bitmap's name.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// A bitmap to store breaks the format's constraints.
    #[error("can't store bitmap '{name}': {why}")]
    Store {
        /// The bitmap's name.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// No bitmap of this name.
    #[error("bitmap '{0}' not found in the image")]
    NotFound(String),
    /// A resize is refused while this bitmap cannot follow it (QEMU's text).
    #[error("{0}")]
    Resize(String),
    /// Version 2 images cannot keep bitmaps (no autoclear bits).
    #[error("cannot store dirty bitmaps in qcow2 v2 files")]
    Version2,
}

/// One entry of the bitmap directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Bitmap name (unique in the image).
    pub name: String,
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
    /// [`flags`].
    pub flags: u32,
    /// log2 of the granularity in bytes.
    pub granularity_bits: u8,
    /// Extra data (kept as found).
    pub extra_data: Vec<u8>,
}

impl DirEntry {
    /// Granularity in bytes.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }
    /// The `in_use` flag.
    pub fn in_use(&self) -> bool {
        self.flags & flags::IN_USE != 0
    }
    /// The `auto` flag (enabled).
    pub fn auto(&self) -> bool {
        self.flags & flags::AUTO != 0
    }
    /// Whether the bitmap may be used: no extra data, or extra data that may
    /// be ignored. An unusable bitmap is left in the image as it is.
    pub fn usable(&self) -> bool {
        self.extra_data.is_empty() || self.flags & flags::EXTRA_DATA_COMPATIBLE != 0
    }
    /// Bytes the entry takes in the directory.
    pub fn encoded_len(&self) -> usize {
        entry_len(self.name.len(), self.extra_data.len())
    }
}

fn entry_len(name: usize, extra: usize) -> usize {
    (ENTRY_HEADER_LEN + name + extra).div_ceil(8) * 8
}

/// Bits of a bitmap of `granularity` over `disk_size` bytes.
pub fn bit_count(disk_size: u64, granularity: u64) -> u64 {
    disk_size.div_ceil(granularity)
}

/// Entries of the table of a bitmap of `granularity` over `disk_size` bytes.
pub fn table_size_for(disk_size: u64, granularity: u64, cluster_size: u64) -> u64 {
    bit_count(disk_size, granularity).div_ceil(cluster_size * 8)
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// What is wrong with a bitmap table entry, if anything.
pub fn table_entry_problem(entry: u64, cluster_size: u64) -> Option<&'static str> {
    let off = entry & ENTRY_OFFSET;
    if entry & ENTRY_RESERVED != 0 {
        Some("reserved bits set")
    } else if off != 0 && entry & ENTRY_ALL_ONES != 0 {
        Some("all-ones flag with a data offset")
    } else if !off.is_multiple_of(cluster_size) {
        Some("data offset not cluster aligned")
    } else {
        None
    }
}

/// What is wrong with an entry's geometry (table size, granularity) for a disk
/// of `disk_size` bytes, if anything.
fn geometry_problem(e: &DirEntry, cluster_size: u64, disk_size: u64) -> Option<String> {
    if e.table_size == 0 {
        return Some("empty bitmap table".into());
    }
    if e.table_offset == 0 || !e.table_offset.is_multiple_of(cluster_size) {
        return Some(format!("bitmap table offset {:#x} invalid", e.table_offset));
    }
    if e.table_size > MAX_TABLE_SIZE {
        return Some(format!("bitmap table of {} entries", e.table_size));
    }
    if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&e.granularity_bits) {
        return Some(format!("granularity bits {}", e.granularity_bits));
    }
    let phys = e.table_size as u64 * cluster_size;
    if phys > MAX_PHYS_SIZE {
        return Some(format!("{phys} bytes of bitmap data"));
    }
    // A bitmap in use may have a stale size (the disk was resized since).
    if !e.in_use() && (disk_size as u128) > ((phys as u128 * 8) << e.granularity_bits) {
        return Some("bitmap table too small for the disk".into());
    }
    None
}

/// Parses and validates a bitmap directory of `nb_bitmaps` entries. Tables
/// must lie inside a file of `file_len` bytes.
pub fn parse_directory(
    dir: &[u8],
    nb_bitmaps: u32,
    cluster_size: u64,
    disk_size: u64,
    file_len: u64,
) -> std::result::Result<Vec<DirEntry>, BitmapError> {
    let broken = |why: &str| BitmapError::Directory(why.to_string());
    if dir.is_empty() {
        return Err(broken("size is zero"));
    }
    if dir.len() as u64 > MAX_DIRECTORY_SIZE {
        return Err(broken("too large"));
    }
    if nb_bitmaps == 0 || nb_bitmaps > MAX_BITMAPS {
        return Err(broken("bad bitmap count"));
    }
    let mut out: Vec<DirEntry> = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        if dir.len() - pos < ENTRY_HEADER_LEN {
            return Err(broken("broken (truncated entry)"));
        }
        if out.len() as u32 >= nb_bitmaps {
            return Err(broken("more bitmaps found than the header extension says"));
        }
        let d = &dir[pos..];
        let name_size = be16(d, 18) as usize;
        let extra = be32(d, 20) as usize;
        let len = entry_len(name_size, extra);
        if len > d.len() {
            return Err(broken("broken (entry past the end)"));
        }
        let raw_name = &d[ENTRY_HEADER_LEN + extra..ENTRY_HEADER_LEN + extra + name_size];
        let lossy = String::from_utf8_lossy(raw_name).into_owned();
        let bad = |why: String| BitmapError::Entry {
            name: lossy.clone(),
            why,
        };
        let e = DirEntry {
            name: String::new(),
            table_offset: be64(d, 0),
            table_size: be32(d, 8),
            flags: be32(d, 12),
            granularity_bits: d[17],
            extra_data: d[ENTRY_HEADER_LEN..ENTRY_HEADER_LEN + extra].to_vec(),
        };
        if d[16] != TYPE_DIRTY_TRACKING {
            return Err(bad(format!("unknown type {}", d[16])));
        }
        if e.flags & !flags::KNOWN != 0 {
            return Err(bad(format!("reserved flags {:#x}", e.flags)));
        }
        if name_size > MAX_NAME_SIZE {
            return Err(bad(format!("name of {name_size} bytes")));
        }
        if let Some(why) = geometry_problem(&e, cluster_size, disk_size) {
            return Err(bad(why));
        }
        if e.table_offset
            .checked_add(e.table_size as u64 * 8)
            .is_none_or(|end| end > file_len)
        {
            return Err(bad("bitmap table past the end of the file".into()));
        }
        let name =
            String::from_utf8(raw_name.to_vec()).map_err(|_| bad("name is not UTF-8".into()))?;
        if name.contains('\0') {
            return Err(bad("name contains a NUL byte".into()));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(bad("name appears twice".into()));
        }
        out.push(DirEntry { name, ..e });
        pos += len;
    }
    if out.len() as u32 != nb_bitmaps {
        return Err(broken("fewer bitmaps found than the header extension says"));
    }
    Ok(out)
}

/// Serialises a bitmap directory.
pub fn serialize_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.iter().map(DirEntry::encoded_len).sum());
    for e in entries {
        let start = b.len();
        b.extend_from_slice(&e.table_offset.to_be_bytes());
        b.extend_from_slice(&e.table_size.to_be_bytes());
        b.extend_from_slice(&e.flags.to_be_bytes());
        b.push(TYPE_DIRTY_TRACKING);
        b.push(e.granularity_bits);
        b.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&(e.extra_data.len() as u32).to_be_bytes());
        b.extend_from_slice(&e.extra_data);
        b.extend_from_slice(e.name.as_bytes());
        b.resize(start + e.encoded_len(), 0);
    }
    b
}

/// Checks that a bitmap of this name and granularity can be kept in an image
/// with clusters of `cluster_size` over a disk of `disk_size` bytes (QEMU's
/// constraints, with its messages).
pub fn check_new(
    name: &str,
    granularity: u64,
    disk_size: u64,
    cluster_size: u64,
) -> std::result::Result<(), BitmapError> {
    let bad = |why: String| BitmapError::Store {
        name: name.to_string(),
        why,
    };
    if !granularity.is_power_of_two() {
        return Err(bad("Granularity must be a power of 2".into()));
    }
    let bits = granularity.trailing_zeros();
    if bits > MAX_GRANULARITY_BITS as u32 {
        return Err(bad(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << MAX_GRANULARITY_BITS
        )));
    }
    if bits < MIN_GRANULARITY_BITS as u32 {
        return Err(bad(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << MIN_GRANULARITY_BITS
        )));
    }
    let bytes = bit_count(disk_size, granularity).div_ceil(8);
    if bytes > MAX_PHYS_SIZE || bytes > MAX_TABLE_SIZE as u64 * cluster_size {
        return Err(bad(
            "Too much space will be occupied by the bitmap. Use larger granularity".into(),
        ));
    }
    if name.len() > MAX_NAME_SIZE {
        return Err(bad(format!(
            "Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
        )));
    }
    Ok(())
}

/// What a bitmap of the image is, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Granularity in bytes.
    pub granularity: u64,
    /// `in_use` in the image now.
    pub in_use: bool,
    /// `auto` (enabled).
    pub auto: bool,
    /// Its content is unusable: it was `in_use` when the image was opened
    /// (the program that had it open did not store it back).
    pub inconsistent: bool,
    /// Extra data that must not be ignored: the bitmap is kept, not used.
    pub unusable: bool,
}

/// A bitmap's content read from the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedBitmap {
    /// Name.
    pub name: String,
    /// Granularity in bytes.
    pub granularity: u64,
    /// Enabled (the `auto` flag).
    pub enabled: bool,
    /// Its content is unusable (`words` are then all zero).
    pub inconsistent: bool,
    /// Bit `k` (granule `k`) is bit `k % 64` of word `k / 64`; one bit per
    /// granule of the current disk size.
    pub words: Vec<u64>,
}

/// A bitmap to store.
#[derive(Debug, Clone, Copy)]
pub struct StoreBitmap<'a> {
    /// Name.
    pub name: &'a str,
    /// Granularity in bytes.
    pub granularity: u64,
    /// Enabled (stored with the `auto` flag).
    pub enabled: bool,
    /// As [`LoadedBitmap::words`], for the current disk size.
    pub words: &'a [u64],
}

/// A bitmap of the open image.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub entry: DirEntry,
    /// It was `in_use` at open, or its table could not be used.
    pub inconsistent: bool,
}

/// Extracts bits `first..first+n` of `words` into bytes (bit `k` of the run is
/// bit `k % 8` of byte `k / 8`), into `out` (zeroed beyond).
fn words_to_bytes(words: &[u64], first: u64, n: u64, out: &mut [u8]) {
    out.fill(0);
    // `first` is a multiple of 64 (a cluster's worth of bits is).
    let w0 = (first / 64) as usize;
    let nw = n.div_ceil(64) as usize;
    for i in 0..nw {
        let mut w = words.get(w0 + i).copied().unwrap_or(0);
        let left = n - i as u64 * 64;
        if left < 64 {
            w &= (1u64 << left) - 1;
        }
        out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
}

impl<I: QcowIo> Qcow2<I> {
    /// Reads and validates the bitmap directory the header names (at open).
    pub(crate) async fn read_bitmap_directory(
        io: &I,
        ext: &BitmapsExt,
        cluster_size: u64,
        disk_size: u64,
        file_len: u64,
    ) -> Result<Vec<DirEntry>> {
        if ext.directory_size == 0 || ext.directory_size > MAX_DIRECTORY_SIZE {
            return Err(BitmapError::Directory("size out of range".into()).into());
        }
        let mut dir = vec![0u8; ext.directory_size as usize];
        io.read_at(ext.directory_offset, &mut dir).await?;
        Ok(parse_directory(
            &dir,
            ext.nb_bitmaps,
            cluster_size,
            disk_size,
            file_len,
        )?)
    }

    /// The image's bitmaps, in directory order.
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        self.st()
            .bitmaps
            .iter()
            .map(|s| BitmapInfo {
                name: s.entry.name.clone(),
                granularity: s.entry.granularity(),
                in_use: s.entry.in_use(),
                auto: s.entry.auto(),
                inconsistent: s.inconsistent,
                unusable: !s.entry.usable(),
            })
            .collect()
    }

    /// Reads the content of every usable bitmap (an inconsistent one comes back
    /// empty, marked so), in directory order.
    pub async fn load_bitmaps(&self) -> Result<Vec<LoadedBitmap>> {
        let names: Vec<String> = self
            .st()
            .bitmaps
            .iter()
            .filter(|s| s.entry.usable())
            .map(|s| s.entry.name.clone())
            .collect();
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            out.push(self.load_bitmap(&n).await?);
        }
        Ok(out)
    }

    /// Reads the content of one bitmap.
    pub async fn load_bitmap(&self, name: &str) -> Result<LoadedBitmap> {
        let (slot, disk_size, file_len) = {
            let st = self.st();
            let s = st
                .bitmaps
                .iter()
                .find(|s| s.entry.name == name)
                .cloned()
                .ok_or_else(|| BitmapError::NotFound(name.to_string()))?;
            (s, st.hdr.size, st.high_water)
        };
        let e = &slot.entry;
        let bad = |why: String| -> Error {
            BitmapError::Table {
                name: name.to_string(),
                why,
            }
            .into()
        };
        if !e.usable() {
            return Err(bad("its extra data is not understood".into()));
        }
        let gran = e.granularity();
        let nbits = bit_count(disk_size, gran);
        let mut words = vec![0u64; nbits.div_ceil(64) as usize];
        let mut out = LoadedBitmap {
            name: name.to_string(),
            granularity: gran,
            enabled: e.auto(),
            inconsistent: slot.inconsistent,
            words: Vec::new(),
        };
        if slot.inconsistent {
            out.words = words;
            return Ok(out);
        }
        let cs = self.g.cluster_size;
        let want = table_size_for(disk_size, gran, cs);
        if want != e.table_size as u64 {
            return Err(bad(format!(
                "bitmap table has {} entries, the disk needs {want}",
                e.table_size
            )));
        }
        let mut tb = vec![0u8; e.table_size as usize * 8];
        self.io.read_at(e.table_offset, &mut tb).await?;
        let per_cluster = cs * 8;
        let mut buf = vec![0u8; cs as usize];
        for i in 0..e.table_size as u64 {
            let t = be64(&tb, i as usize * 8);
            if let Some(why) = table_entry_problem(t, cs) {
                return Err(bad(format!("table entry {i}: {why}")));
            }
            let first = i * per_cluster;
            let n = per_cluster.min(nbits - first);
            let off = t & ENTRY_OFFSET;
            if off == 0 {
                if t & ENTRY_ALL_ONES != 0 {
                    set_ones(&mut words, first, n);
                }
                continue;
            }
            if off + cs > file_len {
                return Err(bad(format!(
                    "data cluster {off:#x} past the end of the file"
                )));
            }
            self.io.read_at(off, &mut buf).await?;
            let w0 = (first / 64) as usize;
            for j in 0..n.div_ceil(64) as usize {
                let mut w = u64::from_le_bytes(buf[j * 8..j * 8 + 8].try_into().unwrap());
                let left = n - j as u64 * 64;
                if left < 64 {
                    w &= (1u64 << left) - 1;
                }
                words[w0 + j] = w;
            }
        }
        out.words = words;
        Ok(out)
    }

    /// Stores bitmaps in the image: each replaces the bitmap of its name or is
    /// added, with `in_use` clear and `auto` as enabled; the others stay as
    /// they are. Old tables and data are freed once the new directory is
    /// stable.
    pub async fn store_bitmaps(&self, list: &[StoreBitmap<'_>]) -> Result<()> {
        if list.is_empty() {
            return Ok(());
        }
        let _meta = self.meta.lock().await;
        self.check_writable_pub()?;
        let (disk_size, version, mut entries) = {
            let st = self.st();
            let e: Vec<DirEntry> = st.bitmaps.iter().map(|s| s.entry.clone()).collect();
            (st.hdr.size, st.hdr.version, e)
        };
        if version < 3 {
            return Err(BitmapError::Version2.into());
        }
        let cs = self.g.cluster_size;
        for (i, b) in list.iter().enumerate() {
            check_new(b.name, b.granularity, disk_size, cs)?;
            let nbits = bit_count(disk_size, b.granularity);
            if b.words.len() as u64 != nbits.div_ceil(64) {
                return Err(BitmapError::Store {
                    name: b.name.to_string(),
                    why: format!("{} words for {nbits} bits", b.words.len()),
                }
                .into());
            }
            if list[..i].iter().any(|o| o.name == b.name) {
                return Err(BitmapError::Store {
                    name: b.name.to_string(),
                    why: "given twice".into(),
                }
                .into());
            }
        }
        self.check_header_room()?;
        let added = list
            .iter()
            .filter(|b| !entries.iter().any(|e| e.name == b.name))
            .count();
        if entries.len() + added > MAX_BITMAPS as usize {
            return Err(BitmapError::Store {
                name: list[0].name.to_string(),
                why: "Too many persistent bitmaps".into(),
            }
            .into());
        }
        let mut allocated: Vec<(u64, u64)> = Vec::new();
        let mut drop_tables: Vec<(u64, u32)> = Vec::new();
        let r = async {
            for b in list {
                let (off, size) = self.write_bitmap_data(b, disk_size, &mut allocated).await?;
                let new = DirEntry {
                    name: b.name.to_string(),
                    table_offset: off,
                    table_size: size,
                    flags: if b.enabled { flags::AUTO } else { 0 },
                    granularity_bits: b.granularity.trailing_zeros() as u8,
                    extra_data: Vec::new(),
                };
                match entries.iter_mut().find(|e| e.name == b.name) {
                    Some(e) => {
                        drop_tables.push((e.table_offset, e.table_size));
                        let keep = e.flags & flags::EXTRA_DATA_COMPATIBLE;
                        *e = DirEntry {
                            flags: new.flags | keep,
                            extra_data: std::mem::take(&mut e.extra_data),
                            ..new
                        };
                    }
                    None => entries.push(new),
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = r {
            self.free_ranges(&allocated).await;
            return Err(e);
        }
        if let Err(e) = self.replace_directory(entries, list).await {
            self.free_ranges(&allocated).await;
            return Err(e);
        }
        for (off, size) in drop_tables {
            self.free_bitmap_table(off, size).await?;
        }
        self.flush_locked().await
    }

    /// Deletes a bitmap from the image (consistent or not) and frees its
    /// clusters.
    pub async fn remove_bitmap(&self, name: &str) -> Result<()> {
        let _meta = self.meta.lock().await;
        self.check_writable_pub()?;
        let mut entries: Vec<DirEntry> =
            self.st().bitmaps.iter().map(|s| s.entry.clone()).collect();
        let i = entries
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| BitmapError::NotFound(name.to_string()))?;
        let old = entries.remove(i);
        self.replace_directory(entries, &[]).await?;
        self.free_bitmap_table(old.table_offset, old.table_size)
            .await?;
        self.flush_locked().await
    }

    /// Clears `in_use` on the bitmaps this open set it on and that were not
    /// stored since: for a program that changed no guest data (a check, a
    /// snapshot operation), so that their content stays valid. A program that
    /// wrote guest data stores its bitmaps instead; those it does not store
    /// stay `in_use` (inconsistent).
    pub async fn release_bitmaps(&self) -> Result<()> {
        let _meta = self.meta.lock().await;
        let changed = {
            let mut st = self.st();
            if !st.writable || st.corrupt {
                return Ok(());
            }
            let mut changed = false;
            for s in st.bitmaps.iter_mut() {
                if s.entry.in_use() && !s.inconsistent && s.entry.usable() {
                    s.entry.flags &= !flags::IN_USE;
                    changed = true;
                }
            }
            changed
        };
        if changed {
            self.rewrite_directory_in_place().await?;
        }
        Ok(())
    }

    /// Sets `in_use` on every usable bitmap that does not have it (done by a
    /// writable open; again after [`Qcow2::store_bitmaps`] or
    /// [`Qcow2::release_bitmaps`] when the image stays in use for writing).
    pub async fn claim_bitmaps(&self) -> Result<()> {
        if !self.st().writable {
            return Err(Error::ReadOnly);
        }
        let _meta = self.meta.lock().await;
        let changed = {
            let mut st = self.st();
            let mut changed = false;
            for s in st.bitmaps.iter_mut() {
                if !s.entry.in_use() && s.entry.usable() {
                    s.entry.flags |= flags::IN_USE;
                    changed = true;
                }
            }
            changed
        };
        if changed {
            self.rewrite_directory_in_place().await?;
        }
        Ok(())
    }

    /// Refuses a resize while a bitmap of the image cannot follow it (QEMU's
    /// check): one not in use by this open (its extra data is not understood) or
    /// an inconsistent one. The bitmaps in use are stored at the new size by
    /// their owner.
    pub(crate) fn bitmaps_allow_resize(&self) -> Result<()> {
        let st = self.st();
        if let Some(s) = st
            .bitmaps
            .iter()
            .find(|s| s.inconsistent || !s.entry.in_use())
        {
            return Err(BitmapError::Resize(if s.inconsistent {
                format!(
                    "Bitmap '{}' is inconsistent and cannot be used",
                    s.entry.name
                )
            } else {
                "Cannot resize qcow2 with persistent bitmaps that were not loaded into memory"
                    .into()
            })
            .into());
        }
        Ok(())
    }

    /// Fails if the header cluster has no room for a bitmaps extension.
    fn check_header_room(&self) -> Result<()> {
        let mut h = self.st().hdr.clone();
        h.bitmaps = Some(BitmapsExt {
            nb_bitmaps: 1,
            directory_size: 0,
            directory_offset: 0,
        });
        h.to_bytes()?;
        Ok(())
    }

    /// Checks the tables of the bitmaps a writable open is about to mark in use
    /// (QEMU loads them all before it marks any): a table of the wrong size, a bad
    /// entry or a data cluster past the end fails the open and leaves the image as
    /// it was.
    pub(crate) async fn check_bitmap_tables(&self) -> Result<()> {
        let (slots, disk_size, file_len) = {
            let st = self.st();
            (st.bitmaps.clone(), st.hdr.size, st.high_water)
        };
        let cs = self.g.cluster_size;
        for s in slots.iter().filter(|s| s.entry.usable() && !s.inconsistent) {
            let e = &s.entry;
            let bad = |why: String| -> Error {
                BitmapError::Table {
                    name: e.name.clone(),
                    why,
                }
                .into()
            };
            let want = table_size_for(disk_size, e.granularity(), cs);
            if want != e.table_size as u64 {
                return Err(bad(format!(
                    "bitmap table has {} entries, the disk needs {want}",
                    e.table_size
                )));
            }
            let mut tb = vec![0u8; e.table_size as usize * 8];
            self.io.read_at(e.table_offset, &mut tb).await?;
            for i in 0..e.table_size as usize {
                let t = be64(&tb, i * 8);
                if let Some(why) = table_entry_problem(t, cs) {
                    return Err(bad(format!("table entry {i}: {why}")));
                }
                let off = t & ENTRY_OFFSET;
                if off != 0 && off + cs > file_len {
                    return Err(bad(format!(
                        "data cluster {off:#x} past the end of the file"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Rewrites the directory where it is (flags changed only), with the
    /// autoclear bit clear while it is written.
    async fn rewrite_directory_in_place(&self) -> Result<()> {
        let (dir, off) = {
            let st = self.st();
            let entries: Vec<DirEntry> = st.bitmaps.iter().map(|s| s.entry.clone()).collect();
            let Some(ext) = st.hdr.bitmaps else {
                return Ok(());
            };
            let dir = serialize_directory(&entries);
            if dir.len() as u64 != ext.directory_size {
                return Err(Error::Corrupt("bitmap directory changed size".into()));
            }
            (dir, ext.directory_offset)
        };
        self.st().hdr.autoclear_features &= !autoclear::BITMAPS;
        self.write_header().await?;
        self.io.flush().await?;
        self.io.write_at(off, &dir).await?;
        self.io.flush().await?;
        self.st().hdr.autoclear_features |= autoclear::BITMAPS;
        self.write_header().await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Writes a bitmap's data clusters and table; returns the table's offset
    /// and size. Clusters allocated are added to `allocated`.
    async fn write_bitmap_data(
        &self,
        b: &StoreBitmap<'_>,
        disk_size: u64,
        allocated: &mut Vec<(u64, u64)>,
    ) -> Result<(u64, u32)> {
        let cs = self.g.cluster_size;
        let nbits = bit_count(disk_size, b.granularity);
        let per_cluster = cs * 8;
        let size = nbits.div_ceil(per_cluster).max(1);
        let mut table = vec![0u8; size as usize * 8];
        let mut buf = vec![0u8; cs as usize];
        for i in 0..size {
            let first = i * per_cluster;
            let n = per_cluster.min(nbits.saturating_sub(first));
            let w0 = (first / 64) as usize;
            let ws =
                &b.words[w0.min(b.words.len())..(w0 + n.div_ceil(64) as usize).min(b.words.len())];
            let full_last = if n.is_multiple_of(64) {
                u64::MAX
            } else {
                (1u64 << (n % 64)) - 1
            };
            let count = ws.len();
            let zero = ws.iter().enumerate().all(|(j, &w)| {
                let m = if j + 1 == count { full_last } else { u64::MAX };
                w & m == 0
            });
            let ones = count > 0
                && ws.iter().enumerate().all(|(j, &w)| {
                    let m = if j + 1 == count { full_last } else { u64::MAX };
                    w & m == m
                });
            let entry = if zero {
                0
            } else if ones {
                ENTRY_ALL_ONES
            } else {
                words_to_bytes(b.words, first, n, &mut buf);
                let off = self.alloc_clusters(1).await?;
                allocated.push((off, cs));
                self.io.write_at(off, &buf).await?;
                off
            };
            table[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&entry.to_be_bytes());
        }
        let tclusters = (size * 8).div_ceil(cs);
        let toff = self.alloc_clusters(tclusters).await?;
        allocated.push((toff, tclusters * cs));
        self.io.write_at(toff, &table).await?;
        Ok((toff, size as u32))
    }

    /// Writes `entries` as a new directory (none: the extension goes) and
    /// points the header at it, then frees the old directory. The bitmaps in
    /// `stored` become consistent.
    async fn replace_directory(
        &self,
        entries: Vec<DirEntry>,
        stored: &[StoreBitmap<'_>],
    ) -> Result<()> {
        let cs = self.g.cluster_size;
        let dir = serialize_directory(&entries);
        if dir.len() as u64 > MAX_DIRECTORY_SIZE {
            return Err(BitmapError::Directory("too large".into()).into());
        }
        let new_ext = if entries.is_empty() {
            None
        } else {
            let k = (dir.len() as u64).div_ceil(cs);
            let off = self.alloc_clusters(k).await?;
            if let Err(e) = self.io.write_at(off, &dir).await {
                self.free_ranges(&[(off, k * cs)]).await;
                return Err(e.into());
            }
            Some(BitmapsExt {
                nb_bitmaps: entries.len() as u32,
                directory_size: dir.len() as u64,
                directory_offset: off,
            })
        };
        // The new clusters' refcounts and contents are stable before the
        // header points at them.
        let r = async {
            self.write_dirty_refcounts().await?;
            self.io.flush().await?;
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = r {
            if let Some(n) = new_ext {
                self.free_ranges(&[(n.directory_offset, n.directory_size)])
                    .await;
            }
            return Err(e);
        }
        let (old_ext, old_autoclear) = {
            let mut st = self.st();
            let old = (st.hdr.bitmaps, st.hdr.autoclear_features);
            st.hdr.bitmaps = new_ext;
            if new_ext.is_some() {
                st.hdr.autoclear_features |= autoclear::BITMAPS;
            } else {
                st.hdr.autoclear_features &= !autoclear::BITMAPS;
            }
            old
        };
        let r = async {
            self.write_header().await?;
            self.io.flush().await?;
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = r {
            {
                let mut st = self.st();
                st.hdr.bitmaps = old_ext;
                st.hdr.autoclear_features = old_autoclear;
            }
            if let Some(n) = new_ext {
                self.free_ranges(&[(n.directory_offset, n.directory_size)])
                    .await;
            }
            return Err(e);
        }
        {
            let mut st = self.st();
            let old: Vec<Slot> = std::mem::take(&mut st.bitmaps);
            st.bitmaps = entries
                .into_iter()
                .map(|entry| {
                    let was = old.iter().find(|s| s.entry.name == entry.name);
                    let inconsistent = !stored.iter().any(|b| b.name == entry.name)
                        && was.is_some_and(|s| s.inconsistent);
                    Slot {
                        entry,
                        inconsistent,
                    }
                })
                .collect();
        }
        if let Some(o) = old_ext {
            self.free_ranges(&[(o.directory_offset, o.directory_size)])
                .await;
        }
        Ok(())
    }

    /// Frees a bitmap table and the data clusters it points at.
    async fn free_bitmap_table(&self, off: u64, size: u32) -> Result<()> {
        let cs = self.g.cluster_size;
        let mut tb = vec![0u8; size as usize * 8];
        self.io.read_at(off, &mut tb).await?;
        let high = self.st().high_water;
        let mut ranges = Vec::new();
        for i in 0..size as usize {
            let t = be64(&tb, i * 8);
            let d = t & ENTRY_OFFSET;
            if d != 0 && table_entry_problem(t, cs).is_none() && d + cs <= high {
                ranges.push((d, cs));
            }
        }
        ranges.push((off, size as u64 * 8));
        self.free_ranges(&ranges).await;
        Ok(())
    }

    /// Drops one reference from each cluster of each range (best effort:
    /// a failure leaks, which `check -r leaks` repairs).
    async fn free_ranges(&self, ranges: &[(u64, u64)]) {
        let cs = self.g.cluster_size;
        for &(off, len) in ranges {
            if len == 0 {
                continue;
            }
            for c in off / cs..(off + len).div_ceil(cs) {
                if let Err(e) = self.rc_add(c, -1).await {
                    log::warn!("qcow2: could not free bitmap cluster {c}: {e}");
                }
            }
        }
    }
}

/// Sets bits `first..first+n` of `words`.
fn set_ones(words: &mut [u64], first: u64, n: u64) {
    for k in first..first + n {
        let (w, b) = ((k / 64) as usize, k % 64);
        if let Some(x) = words.get_mut(w) {
            *x |= 1 << b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, size: u32) -> DirEntry {
        DirEntry {
            name: name.into(),
            table_offset: 0x30000,
            table_size: size,
            flags: flags::AUTO,
            granularity_bits: 16,
            extra_data: Vec::new(),
        }
    }

    #[test]
    fn directory_round_trip() {
        let mut e2 = entry("second one", 1);
        e2.extra_data = vec![1, 2, 3];
        e2.flags |= flags::EXTRA_DATA_COMPATIBLE | flags::IN_USE;
        let v = vec![entry("b0", 1), e2];
        let d = serialize_directory(&v);
        assert_eq!(d.len(), 32 + 40);
        let p = parse_directory(&d, 2, 65536, 1 << 30, 1 << 20).unwrap();
        assert_eq!(p, v);
    }

    #[test]
    fn directory_rejects() {
        let d = serialize_directory(&[entry("b0", 1)]);
        let parse = |d: &[u8], n| parse_directory(d, n, 65536, 1 << 30, 1 << 20);
        assert!(parse(&d, 2).is_err(), "fewer than the count");
        assert!(parse(&d[..20], 1).is_err(), "truncated");
        assert!(parse(&[], 1).is_err());
        let two = serialize_directory(&[entry("b0", 1), entry("b0", 1)]);
        assert!(parse(&two, 2).is_err(), "duplicate name");
        assert!(parse(&two, 1).is_err(), "more than the count");
        let mut bad = d.clone();
        bad[17] = 8; // granularity bits
        assert!(parse(&bad, 1).is_err());
        bad[17] = 32;
        assert!(parse(&bad, 1).is_err());
        let mut bad = d.clone();
        bad[15] |= 8; // reserved flag
        assert!(parse(&bad, 1).is_err());
        let mut bad = d.clone();
        bad[16] = 2; // type
        assert!(parse(&bad, 1).is_err());
        let mut bad = d.clone();
        bad[0..8].copy_from_slice(&0x30001u64.to_be_bytes());
        assert!(parse(&bad, 1).is_err(), "unaligned table");
        bad[0..8].copy_from_slice(&(1u64 << 20).to_be_bytes());
        assert!(parse(&bad, 1).is_err(), "table past the end");
        let mut bad = d.clone();
        bad[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse(&bad, 1).is_err(), "extra data past the end");
        // A table too small for the disk: 1 cluster of 64 KiB at 64 KiB
        // granularity covers 32 GiB.
        assert!(parse_directory(&d, 1, 65536, 33 << 30, 1 << 20).is_err());
        // ... unless in use (stale after a resize).
        let mut e = entry("b0", 1);
        e.flags |= flags::IN_USE;
        let d = serialize_directory(&[e]);
        assert!(parse_directory(&d, 1, 65536, 33 << 30, 1 << 20).is_ok());
    }

    /// The directory parser on 200,000 mutations of a valid directory (byte
    /// flips, boundary values in the length fields, truncation): no panic, and
    /// whatever it accepts serialises to a directory that parses the same (padding
    /// bytes are written as zeroes).
    #[test]
    fn directory_parser_survives_mutations() {
        let mut e2 = entry("second", 2);
        e2.extra_data = vec![7; 5];
        e2.flags |= flags::EXTRA_DATA_COMPATIBLE;
        let good = serialize_directory(&[entry("b0", 1), e2, entry("x", 1)]);
        let mut r = crate::fuzzing::Rng(0x9e37_79b9_7f4a_7c15);
        let mut accepted = 0;
        for _ in 0..200_000 {
            let mut d = good.clone();
            for _ in 0..=r.below(3) {
                if d.is_empty() {
                    break;
                }
                let i = r.below(d.len() as u64) as usize;
                match r.below(4) {
                    0 => d[i] ^= 1 << r.below(8),
                    1 => d[i] = [0, 1, 0x7f, 0x80, 0xff][r.below(5) as usize],
                    2 => {
                        // A length or size field set to a boundary value.
                        let f = [8usize, 18, 20][r.below(3) as usize];
                        let v = [0u32, 1, 0xffff, 0x7fff_ffff, u32::MAX][r.below(5) as usize];
                        if f + 4 <= d.len() {
                            d[f..f + 4].copy_from_slice(&v.to_be_bytes());
                        }
                    }
                    _ => d.truncate(i),
                }
            }
            let n = 1 + r.below(4) as u32;
            if let Ok(p) = parse_directory(&d, n, 65536, 1 << 30, 1 << 22) {
                accepted += 1;
                let again = serialize_directory(&p);
                assert_eq!(again.len(), d.len());
                assert_eq!(parse_directory(&again, n, 65536, 1 << 30, 1 << 22), Ok(p));
            }
        }
        assert!(accepted > 0);
    }

    #[test]
    fn table_entries() {
        assert_eq!(table_entry_problem(0, 65536), None);
        assert_eq!(table_entry_problem(1, 65536), None);
        assert_eq!(table_entry_problem(0x10000, 65536), None);
        assert!(table_entry_problem(0x10001, 65536).is_some());
        assert!(table_entry_problem(0x10200, 65536).is_some());
        assert!(table_entry_problem(2, 65536).is_some());
        assert!(table_entry_problem(1 << 63, 65536).is_some());
    }

    #[test]
    fn constraints() {
        assert!(check_new("a", 65536, 1 << 30, 65536).is_ok());
        assert!(check_new("a", 256, 1 << 30, 65536).is_err());
        assert!(check_new("a", 1 << 32, 1 << 30, 65536).is_err());
        assert!(check_new("a", 3 << 12, 1 << 30, 65536).is_err());
        assert!(check_new(&"x".repeat(1024), 65536, 1 << 30, 65536).is_err());
        // 2^62 bytes at 512 B granularity: far too many bits.
        assert!(check_new("a", 512, 1 << 62, 65536).is_err());
    }
}

#[cfg(test)]
mod image_tests {
    use super::*;
    use crate::{block_on, create, CreateOptions, MemIo, NoBacking, Repair};

    #[test]
    fn resize_refused_with_an_inconsistent_bitmap() {
        let mut o = CreateOptions::new(1 << 20);
        o.cluster_size = 4096;
        let img = block_on(create(MemIo::new(), &o)).unwrap();
        let w = vec![0u64; 32];
        let b = StoreBitmap {
            name: "b",
            granularity: 512,
            enabled: true,
            words: &w,
        };
        block_on(img.store_bitmaps(&[b])).unwrap();
        block_on(img.close()).unwrap();
        // Reopened writable: in use, consistent; a resize is allowed.
        let reopen = |img: &Qcow2<MemIo>| {
            block_on(Qcow2::open(
                MemIo::from_vec(img.io().to_vec()),
                crate::OpenOptions::read_write(),
            ))
            .unwrap()
        };
        let img = reopen(&img);
        block_on(img.resize(2 << 20)).unwrap();
        block_on(img.close()).unwrap();
        // Not stored: in use at the next open, inconsistent; no resize.
        let img = reopen(&img);
        assert!(img.bitmaps()[0].inconsistent);
        assert_eq!(
            block_on(img.resize(4 << 20)).unwrap_err().to_string(),
            "Bitmap 'b' is inconsistent and cannot be used"
        );
        block_on(img.remove_bitmap("b")).unwrap();
        block_on(img.resize(4 << 20)).unwrap();
        block_on(img.close()).unwrap();
    }

    #[test]
    fn store_after_writes_leaks_nothing() {
        let mut o = CreateOptions::new(64 << 10);
        o.cluster_size = 512;
        let img = block_on(create(MemIo::new(), &o)).unwrap();
        block_on(img.write(0, &[1u8; 3000], &NoBacking)).unwrap();
        let ones = vec![u64::MAX; 2];
        let some = vec![0x0f0f_0000_ffff_0001u64, 1 << 63];
        let one = [StoreBitmap {
            name: "ones",
            granularity: 512,
            enabled: true,
            words: &ones,
        }];
        // 512-byte clusters: no room for the extension next to the feature
        // table. Refused before anything is allocated.
        let e = block_on(img.store_bitmaps(&one)).unwrap_err();
        assert!(matches!(e, Error::Header(_)), "{e}");
        let r = block_on(img.check(Repair::None)).unwrap();
        assert!(r.is_clean(), "{:?}", r.messages);
        block_on(img.close()).unwrap();
        o.cluster_size = 1024;
        let img = block_on(create(MemIo::new(), &o)).unwrap();
        block_on(img.write(0, &[1u8; 3000], &NoBacking)).unwrap();
        block_on(img.store_bitmaps(&[
            StoreBitmap {
                name: "ones",
                granularity: 512,
                enabled: true,
                words: &ones,
            },
            StoreBitmap {
                name: "some",
                granularity: 512,
                enabled: false,
                words: &some,
            },
        ]))
        .unwrap();
        let r = block_on(img.check(Repair::None)).unwrap();
        assert!(r.is_clean(), "{:?}", r.messages);
        block_on(img.close()).unwrap();
        let img = block_on(Qcow2::open(
            MemIo::from_vec(img.io().to_vec()),
            crate::OpenOptions::read_only(),
        ))
        .unwrap();
        let l = block_on(img.load_bitmaps()).unwrap();
        assert_eq!(
            (l[0].words.as_slice(), l[1].words.as_slice()),
            (&ones[..], &some[..])
        );
        assert_eq!(
            l.iter().map(|b| b.enabled).collect::<Vec<_>>(),
            [true, false]
        );
        let r = block_on(img.check(Repair::None)).unwrap();
        assert!(r.is_clean(), "{:?}", r.messages);
    }
}

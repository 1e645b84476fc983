//! Geometry derived from the header, and the encoding of L1/L2 entries and
//! refcount block entries.

use crate::header::{CompressionType, Header};

/// Bits 9..=55 of an L1/L2/refcount table entry: a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "Refcount is exactly one" flag of L1 and L2 entries.
pub const COPIED: u64 = 1 << 63;
/// Compressed cluster flag of L2 entries.
pub const COMPRESSED: u64 = 1 << 62;
/// "Reads as zeroes" flag of standard L2 entries (v3, no extended L2).
pub const ZERO: u64 = 1;

/// Sizes and shifts of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// Whether entries are 128-bit with subclusters.
    pub extended: bool,
    /// Subclusters per cluster (1 without extended L2).
    pub subclusters: u32,
    /// Subcluster size in bytes.
    pub subcluster_size: u64,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// Refcount entries per refcount block.
    pub rc_per_block: u64,
    /// Largest refcount value.
    pub rc_max: u64,
    /// Shift of the sector count in a compressed descriptor.
    pub csize_shift: u32,
    /// Mask of the sector count after shifting.
    pub csize_mask: u64,
    /// Mask of the host offset of a compressed descriptor.
    pub coffset_mask: u64,
    /// Version 3 or later (zero flags available).
    pub v3: bool,
    /// Compression type.
    pub compression: CompressionType,
    /// Guest data lives in an external data file (host offset = guest
    /// offset, not refcounted; offset 0 is valid with COPIED).
    pub data_file: bool,
}

impl Geometry {
    /// Geometry of a (validated) header.
    pub fn new(h: &Header) -> Self {
        let cb = h.cluster_bits;
        let cs = 1u64 << cb;
        let extended = h.extended_l2();
        let subclusters = if extended { 32 } else { 1 };
        let csize_shift = 62 - (cb - 8);
        let rc_bits = 1u64 << h.refcount_order;
        Geometry {
            cluster_bits: cb,
            cluster_size: cs,
            l2_entries: cs / if extended { 16 } else { 8 },
            extended,
            subclusters,
            subcluster_size: cs / subclusters as u64,
            refcount_order: h.refcount_order,
            rc_per_block: cs * 8 / rc_bits,
            rc_max: if rc_bits == 64 {
                u64::MAX
            } else {
                (1 << rc_bits) - 1
            },
            csize_shift,
            csize_mask: (1 << (cb - 8)) - 1,
            coffset_mask: (1 << csize_shift) - 1,
            v3: h.version >= 3,
            compression: h.compression_type,
            data_file: h.incompatible_features & crate::header::incompat::DATA_FILE != 0,
        }
    }
    /// Bytes of guest data one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        self.l2_entries * self.cluster_size
    }
    /// Bytes per L2 entry.
    pub fn l2_entry_bytes(&self) -> usize {
        if self.extended {
            16
        } else {
            8
        }
    }
    /// Offset within a cluster.
    pub fn in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size - 1)
    }
    /// Start of the cluster holding `off`.
    pub fn cluster_start(&self, off: u64) -> u64 {
        off & !(self.cluster_size - 1)
    }
    /// Whether `off` is cluster aligned.
    pub fn aligned(&self, off: u64) -> bool {
        self.in_cluster(off) == 0
    }
    /// Host byte range of a compressed descriptor: (offset, bytes to read,
    /// sector-aligned start, sector-aligned length for refcounting).
    pub fn compressed_range(&self, entry: u64) -> (u64, u64, u64, u64) {
        let off = entry & self.coffset_mask;
        let sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1;
        let start = off & !511;
        (off, sectors * 512 - (off & 511), start, sectors * 512)
    }
    /// Encodes a compressed descriptor (without the COMPRESSED flag check).
    pub fn compressed_entry(&self, host: u64, len: u64) -> u64 {
        let sectors = (host + len).div_ceil(512) - host / 512;
        COMPRESSED | ((sectors - 1) << self.csize_shift) | host
    }
}

/// What one L2 entry says about its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// A standard cluster: host offset (0 if none), COPIED flag, and the
    /// per-subcluster allocation and zero bitmaps (bit 0 only without
    /// extended L2).
    Normal {
        /// Host cluster offset, 0 if none.
        host: u64,
        /// Refcount is exactly one.
        copied: bool,
        /// Allocated subclusters.
        alloc: u32,
        /// Subclusters reading as zeroes.
        zero: u32,
    },
    /// A compressed cluster.
    Compressed {
        /// Raw descriptor.
        raw: u64,
    },
}

/// Why an L2 entry is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryError {
    /// Host offset not cluster aligned.
    Unaligned(u64),
    /// Subcluster bits set without a host cluster, or allocated and zero at once.
    BadBitmap(u64),
}

impl std::fmt::Display for EntryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EntryError::Unaligned(o) => write!(f, "host offset {o:#x} is not cluster aligned"),
            EntryError::BadBitmap(b) => write!(f, "invalid subcluster bitmap {b:#018x}"),
        }
    }
}

impl L2Entry {
    /// Decodes a raw entry (and its bitmap with extended L2).
    pub fn decode(g: &Geometry, raw: u64, bitmap: u64) -> Result<L2Entry, EntryError> {
        if raw & COMPRESSED != 0 {
            return Ok(L2Entry::Compressed { raw });
        }
        let host = raw & OFFSET_MASK;
        if !g.aligned(host) {
            return Err(EntryError::Unaligned(host));
        }
        let copied = raw & COPIED != 0;
        // With an external data file, offset 0 is a valid mapping when COPIED is set.
        let mapped = host != 0 || (g.data_file && copied);
        if g.extended {
            let alloc = bitmap as u32;
            let zero = (bitmap >> 32) as u32;
            if alloc & zero != 0 || (!mapped && alloc != 0) {
                return Err(EntryError::BadBitmap(bitmap));
            }
            Ok(L2Entry::Normal {
                host,
                copied,
                alloc,
                zero,
            })
        } else if g.v3 && raw & ZERO != 0 {
            Ok(L2Entry::Normal {
                host,
                copied,
                alloc: 0,
                zero: 1,
            })
        } else {
            Ok(L2Entry::Normal {
                host,
                copied,
                alloc: mapped as u32,
                zero: 0,
            })
        }
    }

    /// Whether the entry maps a host cluster.
    pub fn is_mapped(&self, g: &Geometry) -> bool {
        match *self {
            L2Entry::Normal { host, copied, .. } => host != 0 || (g.data_file && copied),
            L2Entry::Compressed { .. } => true,
        }
    }

    /// Encodes a normal entry into (raw, bitmap). `copied` means "mapped,
    /// refcount one"; with a data file it marks host offset 0 as mapped.
    pub fn encode_normal(
        g: &Geometry,
        host: u64,
        copied: bool,
        alloc: u32,
        zero: u32,
    ) -> (u64, u64) {
        let c = if copied && (host != 0 || g.data_file) {
            COPIED
        } else {
            0
        };
        if g.extended {
            (host | c, alloc as u64 | (zero as u64) << 32)
        } else if zero & 1 != 0 {
            (host | c | ZERO, 0)
        } else {
            (host | c, 0)
        }
    }
}

/// Mask with the low `n` bits set (n <= 32).
pub fn low_bits(n: u32) -> u32 {
    if n >= 32 {
        u32::MAX
    } else {
        (1u32 << n) - 1
    }
}

/// Reads entry `idx` of a refcount block.
pub fn rc_get(block: &[u8], order: u32, idx: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            let byte = block[idx / per];
            ((byte >> ((idx % per) * bits)) & ((1u16 << bits) - 1) as u8) as u64
        }
        3 => block[idx] as u64,
        4 => u16::from_be_bytes([block[2 * idx], block[2 * idx + 1]]) as u64,
        5 => u32::from_be_bytes(block[4 * idx..4 * idx + 4].try_into().unwrap()) as u64,
        _ => u64::from_be_bytes(block[8 * idx..8 * idx + 8].try_into().unwrap()),
    }
}

/// Writes entry `idx` of a refcount block (`v` must fit).
pub fn rc_set(block: &mut [u8], order: u32, idx: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            let shift = (idx % per) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[idx / per];
            *b = (*b & !mask) | (((v as u8) << shift) & mask);
        }
        3 => block[idx] = v as u8,
        4 => block[2 * idx..2 * idx + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => block[4 * idx..4 * idx + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => block[8 * idx..8 * idx + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

/// Reads a big-endian u64 at index `i` of a table.
pub fn get_u64(t: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(t[8 * i..8 * i + 8].try_into().unwrap())
}

/// The (raw entry, subcluster bitmap) of entry `i` of an L2 table; the bitmap is
/// 0 without extended L2 entries.
pub fn l2_entry(t: &[u8], i: usize, extended: bool) -> (u64, u64) {
    if extended {
        (get_u64(t, 2 * i), get_u64(t, 2 * i + 1))
    } else {
        (get_u64(t, i), 0)
    }
}

/// Writes a big-endian u64 at index `i` of a table.
pub fn put_u64(t: &mut [u8], i: usize, v: u64) {
    t[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 512];
            let n = (512 * 8) >> order;
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            for i in 0..n {
                rc_set(&mut b, order, i, (i as u64 * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(
                    rc_get(&b, order, i),
                    (i as u64 * 7 + 3) & max,
                    "order {order} idx {i}"
                );
            }
        }
        // Sub-byte widths: entry 0 in the least significant bits.
        let mut b = [0u8; 1];
        rc_set(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        rc_set(&mut b, 2, 1, 0xa);
        assert_eq!(b[0], 0xa1);
    }

    #[test]
    fn compressed_descriptor() {
        let h = crate::create::CreateOptions::new(1 << 20).header_for_test();
        let g = Geometry::new(&h);
        let e = g.compressed_entry(0x12345, 1000);
        let (off, len, start, alen) = g.compressed_range(e);
        assert_eq!(off, 0x12345);
        assert_eq!(start, 0x12200);
        assert!(len >= 1000 && off + len == start + alen);
    }
}

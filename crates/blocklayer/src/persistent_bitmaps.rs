//! Persistent dirty bitmaps: the bitmaps a format driver keeps in its image (qcow2's
//! bitmaps extension), as the node's named bitmaps see them.
//!
//! A writable qcow2 image marks its bitmaps in use when it opens; the node loads them
//! as persistent named bitmaps (enabled as the image says, inconsistent if they were
//! in use already: a program had them and did not store them back) and stores the
//! persistent ones back, in use no more, when it closes cleanly.

/// A bitmap as the image stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistentBitmap {
    pub name: String,
    /// Bytes per bit, a power of two.
    pub granularity: u64,
    /// Recording writes (qcow2's `auto` flag).
    pub enabled: bool,
    /// Found in use at open: its content is unusable (and `bits` is all zeroes).
    pub inconsistent: bool,
    /// QEMU's layout: bit `k % 8` of byte `k / 8` is granule `k`, for the node's
    /// current size, padded with zero bits to whole 64-bit words.
    pub bits: Vec<u8>,
}

/// Words (bit `k % 64` of word `k / 64`) as QEMU's little-endian bytes.
pub fn words_to_le(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// QEMU's little-endian bytes as words (a short tail is zero-padded).
pub fn le_to_words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_round_trip() {
        let w = vec![1u64, 0x8000_0000_0000_0001, 0xdead_beef];
        let b = words_to_le(&w);
        assert_eq!(b[0], 1);
        assert_eq!(b[8], 1);
        assert_eq!(b[15], 0x80);
        assert_eq!(le_to_words(&b), w);
        assert_eq!(le_to_words(&[0xff, 1]), vec![0x1ff]);
    }
}

//! Persistent dirty bitmaps: the bitmaps a format driver keeps in its image (qcow2's
//! bitmaps extension), as the node's named bitmaps see them.
//!
//! A writable qcow2 image marks its bitmaps in use when it opens; the node loads them
//! as persistent named bitmaps (enabled as the image says, inconsistent if they were
//! in use already: a program had them and did not store them back) and stores the
//! persistent ones back, in use no more, when it closes cleanly.

use crate::error::{BlockError, Result};
use crate::node::Node;

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

impl Node {
    /// Adds the image's persistent bitmaps as named bitmaps of the node (a fresh
    /// open; a reopened node keeps the bitmaps it had): persistent, enabled as the
    /// image says, inconsistent (and disabled, empty) if found in use, read-only on a
    /// read-only node (QEMU's `qcow2_load_dirty_bitmaps`).
    pub fn load_persistent_bitmaps(&self) -> Result<()> {
        for p in self.driver().load_persistent_bitmaps()? {
            if self.named_bitmap(&p.name).is_some() {
                continue;
            }
            let b = self
                .add_named_bitmap(&p.name, p.granularity, false)
                .map_err(|e| {
                    BlockError::Graph(format!("Could not load bitmap '{}': {e}", p.name))
                })?;
            b.set_persistent(true);
            if p.inconsistent {
                b.set_inconsistent();
            } else {
                b.bits().set_from_le_bytes(0, &p.bits);
                if p.enabled {
                    self.enable_bitmap(&b);
                }
            }
            b.set_read_only(self.is_read_only());
        }
        Ok(())
    }

    /// Stores the node's persistent bitmaps in its image, not in use any more (a
    /// clean close: blockdev-del, quit, a reopen read-only). Inconsistent and
    /// read-only ones stay as the image has them, as in QEMU.
    pub fn store_persistent_bitmaps(&self) -> Result<()> {
        if self.is_read_only() {
            return Ok(());
        }
        // In the node's order, newest first: the image's new entries follow its
        // old ones in that order, as QEMU appends them.
        let list: Vec<PersistentBitmap> = self
            .named_bitmaps()
            .iter()
            .filter(|b| b.persistent() && !b.inconsistent() && !b.read_only())
            .map(|b| PersistentBitmap {
                name: b.name().to_string(),
                granularity: b.granularity(),
                enabled: b.enabled(),
                inconsistent: false,
                bits: b.bits().to_le_bytes(),
            })
            .collect();
        self.driver().store_persistent_bitmaps(&list)
    }

    /// After a reopen: the persistent bitmaps are read-only exactly when the node
    /// is (QEMU's `qcow2_reopen_bitmaps_ro` / `_rw`).
    pub(crate) fn persistent_bitmaps_reopened(&self) {
        let ro = self.is_read_only();
        for b in self.named_bitmaps() {
            if b.persistent() {
                b.set_read_only(ro);
            }
        }
    }
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

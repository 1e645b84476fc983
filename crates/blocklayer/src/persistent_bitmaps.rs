//! Persistent dirty bitmaps: the bitmaps a format driver keeps in its image (qcow2's
//! bitmaps extension), as the node's named bitmaps see them.
//!
//! A writable qcow2 image marks its bitmaps in use when it opens; the node loads them
//! as persistent named bitmaps (enabled as the image says, inconsistent if they were
//! in use already: a program had them and did not store them back) and stores the
//! persistent ones back, in use no more, when it closes cleanly.

use crate::bitmap::DirtyBitmap;
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
                set_runs(&b.bits(), &le_to_words(&p.bits));
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

/// Sets the granules set in `words` (bit `k % 64` of word `k / 64`: granule `k`),
/// one range per run of set bits: a dense bitmap loads in a few calls rather than
/// one per bit.
fn set_runs(bits: &DirtyBitmap, words: &[u64]) {
    let g = bits.granularity();
    let mut run: Option<(u64, u64)> = None; // granules start..end
    let flush = |r: &mut Option<(u64, u64)>| {
        if let Some((s, e)) = r.take() {
            bits.set(s * g, (e - s) * g);
        }
    };
    for (i, &w) in words.iter().enumerate() {
        let base = i as u64 * 64;
        let mut w = w;
        let mut pos = 0u64;
        while w != 0 {
            let zeros = w.trailing_zeros() as u64;
            w >>= zeros;
            pos += zeros;
            let ones = w.trailing_ones() as u64;
            let (s, e) = (base + pos, base + pos + ones);
            match run {
                Some((rs, re)) if re == s => run = Some((rs, e)),
                _ => {
                    flush(&mut run);
                    run = Some((s, e));
                }
            }
            pos += ones;
            w = if ones == 64 { 0 } else { w >> ones };
        }
    }
    flush(&mut run);
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
    fn runs_set_the_same_bits() {
        let size = 64 * 4096 * 5;
        let mut r = 0x1234_5678_9abc_def1u64;
        let mut words = vec![u64::MAX, 0, 0x8000_0000_0000_0001, 0, 0];
        for w in words.iter_mut().skip(3) {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            *w = r;
        }
        let b = DirtyBitmap::new(size, 4096);
        set_runs(&b, &words);
        let want = DirtyBitmap::new(size, 4096);
        want.set_from_le_bytes(0, &words_to_le(&words));
        assert_eq!(b.to_le_bytes(), want.to_le_bytes());
        assert_eq!(le_to_words(&b.to_le_bytes()), words);
    }

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

//! Walking a descriptor chain from a known head (virtio 1.2, 2.7.5), for requests the
//! device resubmits from the inflight region: their heads come from that region, not
//! from the available ring, so virtio-queue's iterator cannot produce them.
//!
//! The same rules as on the normal path: at most one level of indirection, no loops
//! (a chain visits at most as many descriptors as its table holds), every descriptor
//! read from guest memory with bounds checks.

use super::super::request::{Desc, Memory};
use vm_memory::{Bytes, GuestAddress};

const F_NEXT: u16 = 0x1;
const F_WRITE: u16 = 0x2;
const F_INDIRECT: u16 = 0x4;
const DESC_LEN: u64 = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor {0} is outside the table")]
    BadIndex(u16),
    #[error("cannot read a descriptor at {0:#x}")]
    Unreadable(u64),
    #[error("the chain is longer than its table (a loop)")]
    Loop,
    #[error("bad indirect table")]
    BadIndirect,
}

struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc(mem: &Memory, table: u64, i: u16) -> Result<RawDesc, ChainError> {
    let at = table
        .checked_add(u64::from(i) * DESC_LEN)
        .ok_or(ChainError::Unreadable(table))?;
    let mut b = [0u8; 16];
    mem.read_slice(&mut b, GuestAddress(at))
        .map_err(|_| ChainError::Unreadable(at))?;
    Ok(RawDesc {
        addr: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
        len: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
        flags: u16::from_le_bytes(b[12..14].try_into().expect("2 bytes")),
        next: u16::from_le_bytes(b[14..16].try_into().expect("2 bytes")),
    })
}

/// The descriptors of the chain at `head` of the table at `table` (`size` entries),
/// at most `max` of them (more is reported as a loop).
pub fn walk(
    mem: &Memory,
    table: u64,
    size: u16,
    head: u16,
    max: usize,
) -> Result<Vec<Desc>, ChainError> {
    if head >= size {
        return Err(ChainError::BadIndex(head));
    }
    let mut out = Vec::new();
    let (mut table, mut size, mut i) = (table, size, head);
    let mut indirect = false;
    let mut visited = 0u32;
    loop {
        visited += 1;
        if visited > u32::from(size) || out.len() >= max {
            return Err(ChainError::Loop);
        }
        let d = read_desc(mem, table, i)?;
        if d.flags & F_INDIRECT != 0 {
            // Only as the (sole) top-level descriptor's kind, and never nested.
            if indirect || d.flags & F_NEXT != 0 || d.len == 0 || u64::from(d.len) % DESC_LEN != 0 {
                return Err(ChainError::BadIndirect);
            }
            let n = u64::from(d.len) / DESC_LEN;
            size = u16::try_from(n).map_err(|_| ChainError::BadIndirect)?;
            table = d.addr;
            i = 0;
            indirect = true;
            visited = 0;
            continue;
        }
        out.push(Desc {
            addr: d.addr,
            len: d.len,
            write: d.flags & F_WRITE != 0,
        });
        if d.flags & F_NEXT == 0 {
            return Ok(out);
        }
        if d.next >= size {
            return Err(ChainError::BadIndex(d.next));
        }
        i = d.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(mem: &Memory, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&b, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }

    #[test]
    fn direct_indirect_loops_and_bad_indexes() {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        put(&mem, 0, 3, 0x1000, 16, F_NEXT, 5);
        put(&mem, 0, 5, 0x2000, 512, F_NEXT | F_WRITE, 1);
        put(&mem, 0, 1, 0x3000, 1, F_WRITE, 0);
        let c = walk(&mem, 0, 8, 3, 64).unwrap();
        assert_eq!(c.len(), 3);
        assert!(!c[0].write && c[1].write && c[2].write);
        // A loop: 1 -> 5 -> 1.
        put(&mem, 0, 1, 0x3000, 1, F_WRITE | F_NEXT, 5);
        assert_eq!(walk(&mem, 0, 8, 3, 64), Err(ChainError::Loop));
        // Out of the table.
        assert_eq!(walk(&mem, 0, 8, 9, 64), Err(ChainError::BadIndex(9)));
        put(&mem, 0, 2, 0x3000, 1, F_NEXT, 12);
        assert_eq!(walk(&mem, 0, 8, 2, 64), Err(ChainError::BadIndex(12)));
        // Indirect: a table of two at 0x4000.
        put(&mem, 0, 0, 0x4000, 32, F_INDIRECT, 0);
        put(&mem, 0x4000, 0, 0x1000, 16, F_NEXT, 1);
        put(&mem, 0x4000, 1, 0x3000, 1, F_WRITE, 0);
        assert_eq!(walk(&mem, 0, 8, 0, 64).unwrap().len(), 2);
        // Nested indirect.
        put(&mem, 0x4000, 1, 0x5000, 16, F_INDIRECT, 0);
        assert_eq!(walk(&mem, 0, 8, 0, 64), Err(ChainError::BadIndirect));
        // Indirect table outside memory.
        put(&mem, 0, 0, 0xFFFF_0000, 32, F_INDIRECT, 0);
        assert!(matches!(
            walk(&mem, 0, 8, 0, 64),
            Err(ChainError::Unreadable(_))
        ));
        // The collection limit.
        put(&mem, 0, 3, 0x1000, 16, F_NEXT, 5);
        put(&mem, 0, 5, 0x2000, 512, F_NEXT | F_WRITE, 1);
        put(&mem, 0, 1, 0x3000, 1, F_WRITE, 0);
        assert_eq!(walk(&mem, 0, 8, 3, 2), Err(ChainError::Loop));
    }
}

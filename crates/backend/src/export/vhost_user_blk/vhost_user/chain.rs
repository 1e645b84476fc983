//! Walking a descriptor chain from its head (virtio 1.2, 2.7.5 and 2.7.7).
//!
//! Every chain goes through here: those popped from the available ring (virtio-queue
//! pops the head) and those resubmitted from the inflight region. virtio-queue's own
//! chain iterator ends a chain silently at a loop, a bad index or a bad indirect
//! table, and what is left looks like a real, shorter chain; here each of those is an
//! error, which the device treats as QEMU does (the ring needs a reset).
//!
//! Rules: at most one level of indirection, an indirect descriptor alone in its chain
//! and its table a whole number of descriptors, no loops (a chain visits at most as
//! many descriptors as its table holds), every index inside its table, every
//! descriptor read from guest memory with bounds checks. Past `max` descriptors the
//! walk goes on (bounded by the table) without storing them, so that the chain's last
//! descriptor, where the status byte is, is still known.

use super::super::request::{self, Desc, DeviceLimits, Memory, Request, RequestError};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

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
    #[error("an indirect descriptor in an indirect table")]
    NestedIndirect,
    #[error("bad indirect table")]
    BadIndirect,
}

struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A descriptor table, resolved once (for a ring's table: once per pass over the
/// ring, [`Table::new`], then [`walk_in`] for each chain): where the whole table lies
/// in one region, 8-byte aligned (as every driver places it: virtio asks for 16),
/// descriptors are read with two volatile loads each from the host mapping; anywhere
/// else, through vm-memory's bounds-checked reads, one region lookup per descriptor.
#[derive(Clone, Copy)]
pub enum Table<'a> {
    Mapped {
        /// Host address of descriptor 0; the table's `size` descriptors follow.
        ptr: *const u64,
        /// The mapping stays while the memory table is borrowed.
        _mem: std::marker::PhantomData<&'a Memory>,
    },
    Guest {
        mem: &'a Memory,
        addr: u64,
    },
}

impl<'a> Table<'a> {
    /// The table of `size` descriptors at guest address `addr` of `mem`.
    pub fn new(mem: &'a Memory, addr: u64, size: u16) -> Table<'a> {
        let len = usize::from(size) * DESC_LEN as usize;
        if addr.is_multiple_of(8) {
            if let Some(p) = request::host_range(mem, addr, len as u64) {
                return Table::Mapped {
                    ptr: p.cast::<u64>(),
                    _mem: std::marker::PhantomData,
                };
            }
        }
        Table::Guest { mem, addr }
    }

    /// Descriptor `i`, which the caller checked is below the table's size.
    fn read(&self, i: u16) -> Result<RawDesc, ChainError> {
        let (w0, w1) = match *self {
            Table::Mapped { ptr, .. } => {
                // SAFETY: `host_range` checked that the table's `size` descriptors lie in
                // one mapped region, which stays mapped while the memory table is
                // borrowed ('a); `i < size`, so both words are inside it; the table is
                // 8-byte aligned. Volatile: the guest may write the table meanwhile.
                unsafe {
                    let d = ptr.add(2 * usize::from(i));
                    (d.read_volatile(), d.add(1).read_volatile())
                }
            }
            Table::Guest { mem, addr } => {
                let at = addr
                    .checked_add(u64::from(i) * DESC_LEN)
                    .ok_or(ChainError::Unreadable(addr))?;
                let mut b = [0u8; 16];
                mem.read_slice(&mut b, GuestAddress(at))
                    .map_err(|_| ChainError::Unreadable(at))?;
                (
                    u64::from_ne_bytes(b[0..8].try_into().expect("8 bytes")),
                    u64::from_ne_bytes(b[8..16].try_into().expect("8 bytes")),
                )
            }
        };
        // Little-endian in guest memory (virtio 1.x): addr, then len, flags, next.
        let (w0, w1) = (u64::from_le(w0), u64::from_le(w1));
        Ok(RawDesc {
            addr: w0,
            len: w1 as u32,
            flags: (w1 >> 32) as u16,
            next: (w1 >> 48) as u16,
        })
    }
}

/// A walked chain: its first descriptors and how many it has in all.
#[derive(Debug, Default)]
pub struct Walked {
    /// The first `max` descriptors.
    pub descs: Vec<Desc>,
    /// The number of descriptors in the chain.
    pub total: usize,
    /// The chain's last descriptor.
    pub last: Option<Desc>,
}

/// Walks the chain at `head` of the table at `table` (`size` entries) into `out`
/// (cleared first), storing at most `max` descriptors.
pub fn walk(
    mem: &Memory,
    table: u64,
    size: u16,
    head: u16,
    max: usize,
    out: &mut Walked,
) -> Result<(), ChainError> {
    walk_in(mem, Table::new(mem, table, size), size, head, max, out)
}

/// [`walk`] in a table resolved beforehand (`table`, of `size` entries, in `mem`).
/// After an error, `out` holds nothing of use.
pub fn walk_in(
    mem: &Memory,
    table: Table<'_>,
    size: u16,
    head: u16,
    max: usize,
    out: &mut Walked,
) -> Result<(), ChainError> {
    out.descs.clear();
    out.total = 0;
    out.last = None;
    if head >= size {
        return Err(ChainError::BadIndex(head));
    }
    let ring_size = size;
    let (mut table, mut size, mut i) = (table, size, head);
    let mut indirect = false;
    let mut visited = 0u32;
    // Kept in locals, stored in `out` at the end.
    let mut total = 0usize;
    loop {
        visited += 1;
        if visited > u32::from(size) {
            return Err(ChainError::Loop);
        }
        let d = table.read(i)?;
        if d.flags & F_INDIRECT != 0 {
            if indirect {
                return Err(ChainError::NestedIndirect);
            }
            // The last descriptor of its chain (virtio 2.7.5.3: after zero or more
            // direct ones), pointing at a whole table, all of it in guest memory (as
            // QEMU maps it whole), of at most a ring's worth of descriptors or as
            // many as a request may have: drivers size indirect tables by the
            // device's seg_max, which may exceed the ring the frontend chose (Linux
            // does, under QEMU's 128-entry vhost-user-blk rings).
            let limit = u64::from(ring_size).max(max as u64);
            if d.flags & F_NEXT != 0
                || d.len == 0
                || u64::from(d.len) % DESC_LEN != 0
                || u64::from(d.len) / DESC_LEN > limit
            {
                return Err(ChainError::BadIndirect);
            }
            if !mem.check_range(GuestAddress(d.addr), d.len as usize) {
                return Err(ChainError::Unreadable(d.addr));
            }
            let n = u64::from(d.len) / DESC_LEN;
            size = u16::try_from(n).map_err(|_| ChainError::BadIndirect)?;
            table = Table::new(mem, d.addr, size);
            i = 0;
            indirect = true;
            visited = 0;
            continue;
        }
        let desc = Desc {
            addr: d.addr,
            len: d.len,
            write: d.flags & F_WRITE != 0,
        };
        if out.descs.len() < max {
            out.descs.push(desc);
        }
        total += 1;
        if d.flags & F_NEXT == 0 {
            out.total = total;
            out.last = Some(desc);
            return Ok(());
        }
        if d.next >= size {
            return Err(ChainError::BadIndex(d.next));
        }
        i = d.next;
    }
}

/// Cache hints for the chains at `heads` of `table` (of `size` entries), given before
/// any of them is walked: first every head descriptor, then what each points at (the
/// request header, or an indirect table), then the header of each indirect table's
/// first descriptor. The frontend wrote all of these on another CPU, so each is a cache
/// miss that costs far more where that CPU is far away (about 250 ns a line, against
/// 60, on this machine's slower vCPU placement); hinted together, the misses of a
/// batch overlap instead of coming one after another as the chains are parsed
/// (docs/performance.md, "Prefetching a batch's chains"). Nothing is read that the
/// walk does not read anyway, nothing is checked, and nothing here can fail: a bad
/// chain is found by [`walk_in`]. Only a table mapped whole is looked at.
pub fn prefetch_chains(mem: &Memory, table: Table<'_>, size: u16, heads: &[u16]) {
    hint_chains(mem, table, size, heads, prefetch);
}

/// [`prefetch_chains`] with `hint` given each address in turn.
fn hint_chains(
    mem: &Memory,
    table: Table<'_>,
    size: u16,
    heads: &[u16],
    mut hint: impl FnMut(*const u8),
) {
    const MAX: usize = 64;
    let Table::Mapped { ptr, .. } = table else {
        return;
    };
    let heads = &heads[..heads.len().min(MAX)];
    for &h in heads {
        if h < size {
            // SAFETY: `h < size`, and the table's `size` descriptors are mapped.
            hint(unsafe { ptr.add(2 * usize::from(h)) }.cast());
        }
    }
    let mut indirect: [Option<Table<'_>>; MAX] = [None; MAX];
    for (&h, slot) in heads.iter().zip(indirect.iter_mut()) {
        if h >= size {
            continue;
        }
        let Ok(d) = table.read(h) else {
            continue;
        };
        if d.flags & F_INDIRECT == 0 {
            if let Some(p) = request::host_range(mem, d.addr, 1) {
                hint(p);
            }
            continue;
        }
        let Ok(n) = u16::try_from(u64::from(d.len) / DESC_LEN) else {
            continue;
        };
        if n == 0 || !d.addr.is_multiple_of(8) {
            continue;
        }
        let t = Table::new(mem, d.addr, n);
        if let Table::Mapped { ptr, .. } = t {
            hint(ptr.cast());
            *slot = Some(t);
        }
    }
    for t in indirect.iter().flatten() {
        if let Ok(d) = t.read(0) {
            if d.flags & F_INDIRECT == 0 {
                if let Some(p) = request::host_range(mem, d.addr, 1) {
                    hint(p);
                }
            }
        }
    }
}

/// Asks the CPU to bring the cache line at `p` into its caches. A hint: it reads
/// nothing the program sees and cannot fault, whatever `p` is.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 has no architectural effect and does not fault on any address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The request of a walked chain: parsed, or refused when the chain has more
/// descriptors than a request may (IOERR in its last byte, when that is writable).
pub fn request(head: u16, walked: &Walked, mem: &Arc<Memory>, lim: &DeviceLimits) -> Request {
    if walked.total > walked.descs.len() {
        Request::refused_at(
            head,
            RequestError::TooManySegments(walked.total),
            walked.last,
        )
    } else {
        request::parse(head, &walked.descs, mem, lim)
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

    fn w(
        mem: &Memory,
        table: u64,
        size: u16,
        head: u16,
        max: usize,
    ) -> Result<Vec<Desc>, ChainError> {
        let mut out = Walked::default();
        walk(mem, table, size, head, max, &mut out).map(|()| out.descs)
    }

    #[test]
    fn direct_indirect_loops_and_bad_indexes() {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        put(&mem, 0, 3, 0x1000, 16, F_NEXT, 5);
        put(&mem, 0, 5, 0x2000, 512, F_NEXT | F_WRITE, 1);
        put(&mem, 0, 1, 0x3000, 1, F_WRITE, 0);
        let c = w(&mem, 0, 8, 3, 64).unwrap();
        assert_eq!(c.len(), 3);
        assert!(!c[0].write && c[1].write && c[2].write);
        // A loop: 1 -> 5 -> 1.
        put(&mem, 0, 1, 0x3000, 1, F_WRITE | F_NEXT, 5);
        assert_eq!(w(&mem, 0, 8, 3, 64), Err(ChainError::Loop));
        // Out of the table.
        assert_eq!(w(&mem, 0, 8, 9, 64), Err(ChainError::BadIndex(9)));
        put(&mem, 0, 2, 0x3000, 1, F_NEXT, 12);
        assert_eq!(w(&mem, 0, 8, 2, 64), Err(ChainError::BadIndex(12)));
        // Indirect: a table of two at 0x4000.
        put(&mem, 0, 0, 0x4000, 32, F_INDIRECT, 0);
        put(&mem, 0x4000, 0, 0x1000, 16, F_NEXT, 1);
        put(&mem, 0x4000, 1, 0x3000, 1, F_WRITE, 0);
        assert_eq!(w(&mem, 0, 8, 0, 64).unwrap().len(), 2);
        // Nested indirect.
        put(&mem, 0x4000, 1, 0x5000, 16, F_INDIRECT, 0);
        assert_eq!(w(&mem, 0, 8, 0, 64), Err(ChainError::NestedIndirect));
        // Indirect table outside memory.
        put(&mem, 0, 0, 0xFFFF_0000, 32, F_INDIRECT, 0);
        assert!(matches!(
            w(&mem, 0, 8, 0, 64),
            Err(ChainError::Unreadable(_))
        ));
        // The collection limit: the walk goes on and knows the last descriptor.
        put(&mem, 0, 3, 0x1000, 16, F_NEXT, 5);
        put(&mem, 0, 5, 0x2000, 512, F_NEXT | F_WRITE, 1);
        put(&mem, 0, 1, 0x3000, 1, F_WRITE, 0);
        let mut out = Walked::default();
        walk(&mem, 0, 8, 3, 2, &mut out).unwrap();
        assert_eq!((out.descs.len(), out.total), (2, 3));
        assert_eq!(out.last.unwrap().addr, 0x3000);
        // An indirect descriptor after a direct one is valid (virtio 2.7.5.3.2).
        put(&mem, 0x4000, 0, 0x2000, 512, F_NEXT | F_WRITE, 1);
        put(&mem, 0x4000, 1, 0x3000, 1, F_WRITE, 0);
        put(&mem, 0, 6, 0x1000, 16, F_NEXT, 7);
        put(&mem, 0, 7, 0x4000, 32, F_INDIRECT, 0);
        assert_eq!(w(&mem, 0, 8, 6, 64).unwrap().len(), 3);
        // A table larger than the ring and than a request, or crossing the end of
        // memory. (Larger than the ring but within a request's limit is fine.)
        put(&mem, 0, 7, 0x4000, 16 * 9, F_INDIRECT, 0);
        assert_eq!(w(&mem, 0, 8, 6, 8), Err(ChainError::BadIndirect));
        assert!(!matches!(
            w(&mem, 0, 8, 6, 64),
            Err(ChainError::BadIndirect)
        ));
        put(&mem, 0, 7, 0xFFF0, 32, F_INDIRECT, 0);
        assert_eq!(w(&mem, 0, 8, 6, 64), Err(ChainError::Unreadable(0xFFF0)));
        // An indirect table whose length is not a whole number of descriptors.
        put(&mem, 0, 0, 0x4000, 56, F_INDIRECT, 0);
        assert_eq!(w(&mem, 0, 8, 0, 64), Err(ChainError::BadIndirect));
    }

    /// Tables read through vm-memory rather than the host mapping (unaligned, or across
    /// two regions) give the same chains.
    #[test]
    fn unaligned_and_split_tables() {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x8000), (GuestAddress(0x8000), 0x8000)])
            .unwrap();
        for table in [0x1004u64, 0x7ff0] {
            put(&mem, table, 0, 0x1000, 16, F_NEXT, 1);
            put(&mem, table, 1, 0x9000, 512, F_NEXT | F_WRITE, 2);
            put(&mem, table, 2, 0x3000, 1, F_WRITE, 0);
            let c = w(&mem, table, 3, 0, 64).unwrap();
            assert_eq!(
                c.iter()
                    .map(|d| (d.addr, d.len, d.write))
                    .collect::<Vec<_>>(),
                [(0x1000, 16, false), (0x9000, 512, true), (0x3000, 1, true)],
                "table at {table:#x}"
            );
            put(&mem, table, 2, 0x3000, 1, F_WRITE | F_NEXT, 0);
            assert_eq!(w(&mem, table, 3, 0, 64), Err(ChainError::Loop));
        }
        // The same chain in one region, aligned: read from the host mapping.
        put(&mem, 0x2000, 0, 0x1000, 16, F_NEXT, 1);
        put(&mem, 0x2000, 1, 0x9000, 512, F_NEXT | F_WRITE, 2);
        put(&mem, 0x2000, 2, 0x3000, 1, F_WRITE, 0);
        assert!(matches!(Table::new(&mem, 0x2000, 3), Table::Mapped { .. }));
        assert!(matches!(Table::new(&mem, 0x7ff0, 3), Table::Guest { .. }));
        assert!(matches!(Table::new(&mem, 0x1004, 3), Table::Guest { .. }));
        assert_eq!(w(&mem, 0x2000, 3, 0, 64).unwrap().len(), 3);
    }

    /// The lines hinted for a batch: each head descriptor, then the header of a direct
    /// chain or the table of an indirect one, then the header of that table's first
    /// descriptor; nothing for a head outside the table, an indirect table outside
    /// memory or of no descriptors, or an address outside memory.
    #[test]
    fn prefetch_hints_what_the_walk_reads_first() {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let host = |a: u64| request::host_range(&mem, a, 1).unwrap() as usize;
        put(&mem, 0, 0, 0x1000, 16, F_NEXT, 1);
        put(&mem, 0, 1, 0x3000, 1, F_WRITE, 0);
        put(&mem, 0, 2, 0x4000, 32, F_INDIRECT, 0);
        put(&mem, 0x4000, 0, 0x1800, 16, F_NEXT, 1);
        put(&mem, 0x4000, 1, 0x3001, 1, F_WRITE, 0);
        put(&mem, 0, 3, 0xFFFF_0000, 32, F_INDIRECT, 0);
        put(&mem, 0, 4, 0x4000, 0, F_INDIRECT, 0);
        put(&mem, 0, 5, 0x2_0000, 16, F_NEXT, 1);
        let table = Table::new(&mem, 0, 8);
        let mut hinted = Vec::new();
        hint_chains(&mem, table, 8, &[0, 2, 9, 3, 4, 5], |p| {
            hinted.push(p as usize)
        });
        let descs = [0u64, 2, 3, 4, 5].map(|i| host(16 * i));
        let mut want = descs.to_vec();
        want.extend([host(0x1000), host(0x4000), host(0x1800)]);
        assert_eq!(hinted, want);
        // A table read through vm-memory is not hinted at all.
        hinted.clear();
        hint_chains(&mem, Table::Guest { mem: &mem, addr: 0 }, 8, &[0], |p| {
            hinted.push(p as usize)
        });
        assert!(hinted.is_empty());
    }
}

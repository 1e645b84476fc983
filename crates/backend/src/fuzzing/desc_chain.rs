//! `desc_chain`: a split virtqueue in guest memory built from fuzz bytes, popped
//! with virtio-queue as the iothread loop (`export/vhost_user_blk/device.rs`) pops it, each chain
//! walked by vubd's chain walker and parsed, its status written and its used element pushed.
//!
//! Input layout (little endian; missing bytes read as zero):
//!
//! | bytes | meaning |
//! |-------|---------|
//! | 0     | queue size: `1 << (b % 9)`; with bit 7 set, bytes 16..18 are the raw size instead |
//! | 1     | bit 0 EVENT_IDX, bit 1 writable device, bit 2 4096-byte logical blocks, bit 3 ring addresses from bytes 8..14, bit 4 `size_max` 4096 (else 1 MiB) |
//! | 2..4  | `next_avail` the device starts from |
//! | 4..8  | capacity in 512-byte sectors |
//! | 8..14 | descriptor table / 16, avail ring / 2, used ring / 4 (with bit 3 of byte 1) |
//! | 14    | most discard and write-zeroes segments |
//! | 15    | most chains popped (0: twice the queue size) |
//! | 16..  | guest memory, from guest address 0x1000 on (see [`REGIONS`]) |
//!
//! Besides not panicking, every parsed request must keep to what the protocol
//! allows: a status byte inside a device-writable descriptor of its chain, data
//! buffers inside guest memory, ranges inside the capacity.

use super::input::Input;
use crate::export::vhost_user_blk::request::{self, Desc, DeviceLimits, Memory, Op, Request};
use crate::export::vhost_user_blk::vhost_user::chain;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Guest memory: two adjacent regions (buffers may span them), a gap, and a third
/// region. Addresses below 0x1000 are unmapped, so an unset ring address (0) misses.
pub const REGIONS: [(u64, usize); 3] = [(0x1000, 0x5000), (0x6000, 0x3000), (0x1_0000, 0x1000)];

/// Where the rings go unless the input places them.
pub const DESC_TABLE: u64 = 0x1000;
pub const AVAIL_RING: u64 = 0x1800;
pub const USED_RING: u64 = 0x1c00;
/// Free memory for buffers in the default layout.
pub const DATA: u64 = 0x2000;

/// Bytes of the header before the memory image.
pub const HEADER_LEN: usize = 16;

/// Largest queue the device offers here (the export default is larger, but 256
/// descriptors already fill the first region's table).
const MAX_QUEUE_SIZE: u16 = 256;

/// The guest address of byte `offset` of the memory image.
pub fn image_to_guest(offset: u64) -> Option<u64> {
    let mut at = offset;
    for (base, len) in REGIONS {
        if at < len as u64 {
            return Some(base + at);
        }
        at -= len as u64;
    }
    None
}

/// Zeroes to clear the largest region with.
static ZEROES: [u8; 0x5000] = [0; 0x5000];

thread_local! {
    static MEMORY: Arc<Memory> = Arc::new(
        Memory::from_ranges(
            &REGIONS
                .iter()
                .map(|&(a, l)| (GuestAddress(a), l))
                .collect::<Vec<_>>(),
        )
        .expect("fixed regions map"),
    );
}

/// Runs one input.
pub fn desc_chain(data: &[u8]) {
    let mut input = Input::new(data);
    let size_sel = input.u8();
    let flags = input.u8();
    let next_avail = input.u16();
    let capacity_sectors = input.u32();
    let desc_at = u64::from(input.u16()) * 16;
    let avail_at = u64::from(input.u16()) * 2;
    let used_at = u64::from(input.u16()) * 4;
    let max_seg = u32::from(input.u8());
    let budget = input.u8();
    let image = input.rest();

    // One mapping per thread, cleared for each input: mapping three regions per input
    // costs more than the rest of the target under AddressSanitizer.
    let mem = MEMORY.with(Arc::clone);
    for (base, len) in REGIONS {
        mem.write_slice(&ZEROES[..len], GuestAddress(base))
            .expect("inside a region");
    }
    let mut offset = 0u64;
    for chunk in image.chunks(0x1000) {
        // Chunks never straddle a region boundary (every region is a whole number
        // of pages); past the last region the image is ignored.
        let Some(gpa) = image_to_guest(offset) else {
            break;
        };
        mem.write_slice(chunk, GuestAddress(gpa))
            .expect("inside a region");
        offset += chunk.len() as u64;
    }

    let lbs = if flags & 4 != 0 { 4096 } else { 512 };
    let lim = DeviceLimits {
        capacity_bytes: u64::from(capacity_sectors) * 512 / lbs * lbs,
        logical_block_size: lbs as u32,
        writable: flags & 2 != 0,
        max_segments: usize::from(MAX_QUEUE_SIZE) - 2,
        size_max: 4 << 20,
        max_discard_sectors: 1 << 22,
        max_discard_seg: max_seg,
        max_write_zeroes_sectors: 1 << 22,
        max_write_zeroes_seg: max_seg,
    };

    // Set up the queue as export/vhost_user_blk/vhost_user does on SET_VRING_NUM, SET_VRING_ADDR,
    // SET_VRING_BASE and the start of the ring: invalid values are refused by
    // virtio-queue and leave the previous ones.
    let mut queue = Queue::new(MAX_QUEUE_SIZE).expect("valid maximum size");
    let size = if size_sel & 0x80 != 0 {
        u16::from_le_bytes([
            image.first().copied().unwrap_or(0),
            image.get(1).copied().unwrap_or(0),
        ])
    } else {
        1 << (size_sel % 9)
    };
    queue.set_size(size);
    let (d, a, u) = if flags & 8 != 0 {
        (desc_at, avail_at, used_at)
    } else {
        (DESC_TABLE, AVAIL_RING, USED_RING)
    };
    let _ = queue.try_set_desc_table_address(GuestAddress(d));
    let _ = queue.try_set_avail_ring_address(GuestAddress(a));
    let _ = queue.try_set_used_ring_address(GuestAddress(u));
    queue.set_next_avail(next_avail);
    queue.set_event_idx(flags & 1 != 0);
    queue.set_ready(true);

    let budget = if budget == 0 {
        2 * usize::from(queue.size())
    } else {
        usize::from(budget)
    };
    let mut popped = 0;
    let mut descs: Vec<Desc> = Vec::new();
    let mut walked = chain::Walked::default();
    // The iothread's loop: disable notifications, pop, complete, re-arm and look again.
    // Each round is bounded here; how often a real loop goes round is the device's
    // business (a frontend that makes `enable_notification` return true forever must
    // not make it spin).
    for _round in 0..4 {
        let _ = queue.disable_notification(mem.as_ref());
        while popped < budget {
            let Some(chain) = queue.pop_descriptor_chain(mem.as_ref()) else {
                break;
            };
            popped += 1;
            let head = chain.head_index();
            // As device.rs: every chain is walked by vubd's walker; one that is not a
            // chain stops the ring (nothing is pushed), one longer than a request can
            // be is refused with its rest walked but not stored.
            let max_descs = request::max_chain_descriptors(&lim);
            let (table, size) = (queue.desc_table(), queue.size());
            if chain::walk(&mem, table, size, head, max_descs, &mut walked).is_err() {
                return;
            }
            let req = chain::request(head, &walked, &mem, &lim);
            descs.clear();
            descs.extend_from_slice(&walked.descs);
            descs.extend(walked.last);
            let len = check(&req, &descs, &mem, &lim);
            let _ = queue.add_used(mem.as_ref(), head, len);
        }
        let _ = queue.needs_notification(mem.as_ref());
        if !queue.enable_notification(mem.as_ref()).unwrap_or(false) || popped >= budget {
            break;
        }
    }
}

/// Checks a parsed request against its chain and completes it as `device.rs` would
/// (status byte written, used length returned).
fn check(req: &Request, descs: &[Desc], mem: &Arc<Memory>, lim: &DeviceLimits) -> u32 {
    // Whether `n` bytes at `a` lie inside one device-writable descriptor (which may
    // end at the very top of the address space).
    let writable = |a: u64, n: u64| {
        descs.iter().any(|d| {
            d.write
                && a >= d.addr
                && (a - d.addr)
                    .checked_add(n)
                    .is_some_and(|end| end <= u64::from(d.len))
        })
    };
    let Some(status) = req.status_addr else {
        assert!(
            descs.iter().all(|d| !d.write || d.len == 0) || req.op.is_err(),
            "a request without a status byte was accepted: {descs:?}"
        );
        return 0;
    };
    assert!(
        writable(status.0, 1),
        "status byte {status:?} outside the chain's writable descriptors {descs:?}"
    );
    let writable_bytes: u64 = descs
        .iter()
        .filter(|d| d.write)
        .map(|d| u64::from(d.len))
        .sum();
    assert!(u64::from(req.data_in_len) < writable_bytes.max(1));
    let in_memory = |iov: &blocklayer::aio::iovec::IoVec| {
        for seg in iov.segments() {
            let start = seg.iov_base as usize;
            let inside = mem.iter().any(|r| {
                let base = r.as_ptr() as usize;
                start >= base && start + seg.iov_len <= base + r.len() as usize
            });
            assert!(inside, "segment {seg:?} outside guest memory");
        }
    };
    let in_range = |offset: u64, len: u64| {
        assert!(offset.is_multiple_of(u64::from(lim.logical_block_size)));
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|e| e <= lim.capacity_bytes),
            "{offset}+{len} beyond {}",
            lim.capacity_bytes
        );
    };
    let status_byte = match &req.op {
        Ok(op) => {
            match op {
                Op::Read { offset, iov } => {
                    assert_eq!(iov.len(), u64::from(req.data_in_len));
                    in_range(*offset, iov.len());
                    in_memory(iov);
                }
                Op::Write { offset, iov } => {
                    assert!(lim.writable);
                    assert_eq!(req.data_in_len, 0);
                    in_range(*offset, iov.len());
                    in_memory(iov);
                }
                Op::GetId { iov } => {
                    assert!(iov.len() <= request::ID_BYTES as u64);
                    assert_eq!(iov.len(), u64::from(req.data_in_len));
                    in_memory(iov);
                }
                Op::Flush => {}
                Op::Discard(ranges) | Op::WriteZeroes(ranges) => {
                    assert!(lim.writable);
                    assert!(
                        !ranges.is_empty() && ranges.len() as u64 <= u64::from(lim.max_discard_seg)
                    );
                    for r in ranges {
                        in_range(r.offset, r.len);
                    }
                }
            }
            0
        }
        Err(e) => e.status(),
    };
    if request::write_status(mem, status, status_byte).is_err() {
        return 0;
    }
    if status_byte == 0 {
        req.data_in_len + 1
    } else {
        1
    }
}

/// Seed inputs: well-formed and malformed chains of every request type.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use virtio_bindings::virtio_blk::*;
    let mut out = Vec::new();
    // (name, type, sector, chain as (guest address, length, device-writable))
    type Chain = Vec<(u64, u32, bool)>;
    let hdr = DATA;
    let buf = DATA + 0x100;
    let st = DATA + 0x80;
    let cases: Vec<(&str, u32, u64, Chain)> = vec![
        (
            "read",
            VIRTIO_BLK_T_IN,
            8,
            vec![(hdr, 16, false), (buf, 1024, true), (st, 1, true)],
        ),
        (
            "read-any-layout",
            VIRTIO_BLK_T_IN,
            0,
            vec![(hdr, 16, false), (buf, 513, true)],
        ),
        (
            "write",
            VIRTIO_BLK_T_OUT,
            2,
            vec![(hdr, 16, false), (buf, 512, false), (st, 1, true)],
        ),
        (
            "write-one-desc",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(hdr, 16 + 512, false), (st, 1, true)],
        ),
        (
            "flush",
            VIRTIO_BLK_T_FLUSH,
            0,
            vec![(hdr, 16, false), (st, 1, true)],
        ),
        (
            "get-id",
            VIRTIO_BLK_T_GET_ID,
            0,
            vec![(hdr, 16, false), (buf, 20, true), (st, 1, true)],
        ),
        (
            "discard",
            VIRTIO_BLK_T_DISCARD,
            0,
            vec![(hdr, 32, false), (st, 1, true)],
        ),
        (
            "write-zeroes",
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            vec![(hdr, 32, false), (st, 1, true)],
        ),
        ("unknown-type", 77, 0, vec![(hdr, 16, false), (st, 1, true)]),
        (
            "short-header",
            VIRTIO_BLK_T_IN,
            0,
            vec![(hdr, 8, false), (st, 1, true)],
        ),
        (
            "split-header",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                (hdr, 5, false),
                (hdr + 5, 11, false),
                (buf, 512, true),
                (st, 1, true),
            ],
        ),
        ("no-status", VIRTIO_BLK_T_IN, 0, vec![(hdr, 16, false)]),
        (
            "bad-order",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                (hdr, 16, false),
                (buf, 512, true),
                (hdr, 16, false),
                (st, 1, true),
            ],
        ),
        (
            "zero-length",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                (hdr, 16, false),
                (buf, 0, true),
                (buf, 512, true),
                (st, 1, true),
            ],
        ),
        (
            "misaligned",
            VIRTIO_BLK_T_IN,
            0,
            vec![(hdr, 16, false), (buf, 100, true), (st, 1, true)],
        ),
        (
            "past-end",
            VIRTIO_BLK_T_IN,
            u64::MAX / 512,
            vec![(hdr, 16, false), (buf, 512, true), (st, 1, true)],
        ),
        (
            "unmapped",
            VIRTIO_BLK_T_IN,
            0,
            vec![(hdr, 16, false), (0x20_0000, 512, true), (st, 1, true)],
        ),
        (
            "spans-regions",
            VIRTIO_BLK_T_IN,
            0,
            vec![(hdr, 16, false), (0x5f00, 512, true), (st, 1, true)],
        ),
        (
            "in-gap",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(hdr, 16, false), (0x8f00, 512, false), (st, 1, true)],
        ),
        (
            "high-address",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                (hdr, 16, false),
                (buf, 512, true),
                (u64::MAX - 0x10, 0x100, true),
            ],
        ),
        (
            "status-readable",
            VIRTIO_BLK_T_FLUSH,
            0,
            vec![(hdr, 16, false), (st, 1, false)],
        ),
    ];
    for (name, kind, sector, chain) in cases {
        for (variant, size_sel, flags) in [("", 4u8, 2u8), ("-eventidx-ro", 3, 1 | 4)] {
            let mut mem = vec![0u8; 0x4000];
            let put = |mem: &mut Vec<u8>, gpa: u64, bytes: &[u8]| {
                let o = (gpa - 0x1000) as usize;
                mem[o..o + bytes.len()].copy_from_slice(bytes);
            };
            // Descriptors 0.. in table order, chained; one available entry.
            for (i, &(addr, len, write)) in chain.iter().enumerate() {
                let mut d = [0u8; 16];
                d[0..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&len.to_le_bytes());
                let mut f = if write { 2u16 } else { 0 };
                if i + 1 < chain.len() {
                    f |= 1;
                }
                d[12..14].copy_from_slice(&f.to_le_bytes());
                d[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
                put(&mut mem, DESC_TABLE + 16 * i as u64, &d);
            }
            put(&mut mem, AVAIL_RING + 2, &1u16.to_le_bytes());
            let mut h = [0u8; 32];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            // One discard/write-zeroes segment: sector 8, 8 sectors, unmap.
            h[16..24].copy_from_slice(&8u64.to_le_bytes());
            h[24..28].copy_from_slice(&8u32.to_le_bytes());
            h[28..32].copy_from_slice(&1u32.to_le_bytes());
            put(&mut mem, hdr, &h);
            let mut header = [0u8; HEADER_LEN];
            header[0] = size_sel;
            header[1] = flags;
            header[4..8].copy_from_slice(&2048u32.to_le_bytes());
            header[14] = 4;
            let mut v = header.to_vec();
            v.extend_from_slice(trim(&mem));
            out.push((format!("{name}{variant}"), v));
        }
    }
    // An indirect table with three descriptors, and a loop through `next`.
    out.push(("indirect".into(), indirect_seed(false)));
    out.push(("loop".into(), indirect_seed(true)));
    out
}

fn indirect_seed(looped: bool) -> Vec<u8> {
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
    let mut mem = vec![0u8; 0x4000];
    let mut put = |gpa: u64, bytes: &[u8]| {
        let o = (gpa - 0x1000) as usize;
        mem[o..o + bytes.len()].copy_from_slice(bytes);
    };
    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        d
    };
    let table = DATA + 0x40;
    if looped {
        put(DESC_TABLE, &desc(DATA, 16, 1, 1));
        put(DESC_TABLE + 16, &desc(DATA + 0x100, 512, 3, 0));
    } else {
        // VIRTQ_DESC_F_INDIRECT = 4
        put(DESC_TABLE, &desc(table, 48, 4, 0));
        put(table, &desc(DATA, 16, 1, 1));
        put(table + 16, &desc(DATA + 0x100, 512, 3, 2));
        put(table + 32, &desc(DATA + 0x80, 1, 2, 0));
    }
    put(AVAIL_RING + 2, &1u16.to_le_bytes());
    put(DATA, &VIRTIO_BLK_T_IN.to_le_bytes());
    let mut v = vec![0u8; HEADER_LEN];
    v[0] = 4;
    v[1] = 2;
    v[4..8].copy_from_slice(&2048u32.to_le_bytes());
    v.extend_from_slice(trim(&mem));
    v
}

/// The image without its trailing zeroes (memory past the input reads as zero).
fn trim(mem: &[u8]) -> &[u8] {
    let end = mem.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    &mem[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_offsets_map_across_regions() {
        assert_eq!(image_to_guest(0), Some(0x1000));
        assert_eq!(image_to_guest(0x5000), Some(0x6000));
        assert_eq!(image_to_guest(0x8000), Some(0x1_0000));
        assert_eq!(image_to_guest(0x9000), None);
    }
}

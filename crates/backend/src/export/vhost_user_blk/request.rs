//! Parsing a virtio-blk descriptor chain into a validated request (virtio 1.2 5.2.6).
//!
//! Parsing does no I/O: it checks directions, lengths, sector ranges, alignment and
//! segment counts, and maps the data buffers to host addresses in guest memory. A chain
//! that fails a check becomes a request that completes at once with IOERR or UNSUPP.
//! The layout is not assumed (VIRTIO_F_ANY_LAYOUT is implied by virtio 1.0): the header
//! is the first 16 device-readable bytes and the status the last device-writable byte,
//! wherever descriptor boundaries fall.

use blocklayer::aio::iovec::{IoVec, Keepalive};
use smallvec::SmallVec;
use std::sync::Arc;
use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

pub type Memory = GuestMemoryMmap<()>;

pub const SECTOR: u64 = 512;
const HEADER_LEN: u64 = 16;
const SEGMENT_LEN: u64 = 16;
/// `VIRTIO_BLK_ID_BYTES`
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// What the device accepts; derived from the export and its node.
#[derive(Debug, Clone, Copy)]
pub struct DeviceLimits {
    pub capacity_bytes: u64,
    pub logical_block_size: u32,
    pub writable: bool,
    /// Data descriptors a request may have (`seg_max` in the config space).
    pub max_segments: usize,
    /// Bytes of data one descriptor may carry (`size_max` in the config space).
    pub size_max: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

/// One descriptor of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A discard or write-zeroes range in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

#[derive(Debug)]
pub enum Op {
    Read { offset: u64, iov: IoVec },
    Write { offset: u64, iov: IoVec },
    Flush,
    GetId { iov: IoVec },
    Discard(Vec<Range>),
    WriteZeroes(Vec<Range>),
}

impl Op {
    /// Where in guest memory (guest physical addresses) a read or GET_ID puts its
    /// data: the ranges of its buffers in `mem`, the memory table it was parsed in
    /// (each buffer lies in one region of it); the pages a dirty log must mark.
    pub fn data_in<'a>(&'a self, mem: &'a Memory) -> impl Iterator<Item = (u64, u64)> + 'a {
        let iov = match self {
            Op::Read { iov, .. } | Op::GetId { iov } => Some(iov),
            _ => None,
        };
        iov.into_iter()
            .flat_map(|v| v.segments())
            .filter_map(move |s| Some((guest_addr(mem, s.iov_base.cast())?, s.iov_len as u64)))
    }
}

/// Why a chain was refused; the status it completes with follows from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("chain has no device-writable status byte")]
    NoStatus,
    #[error("chain is shorter than the request header")]
    ShortHeader,
    #[error("device-readable descriptor after a device-writable one")]
    BadOrder,
    #[error("too many segments ({0})")]
    TooManySegments(usize),
    #[error("data segment of {0} bytes is larger than size_max")]
    SegmentTooLarge(u64),
    #[error("request of {0} bytes is larger than a used element can report")]
    TooLarge(u64),
    #[error("buffer {addr:#x}+{len} is not in guest memory")]
    BadAddress { addr: u64, len: u64 },
    #[error("data length {0} is not a multiple of the logical block size")]
    Misaligned(u64),
    #[error("request {offset}+{len} is beyond the capacity")]
    OutOfRange { offset: u64, len: u64 },
    #[error("unexpected data for this request type")]
    UnexpectedData,
    #[error("write to a read-only device")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    #[error("unsupported flags {0:#x}")]
    UnsupportedFlags(u32),
    #[error("bad discard/write-zeroes segment list")]
    BadSegments,
    #[error("bad descriptor chain: {0}")]
    BadChain(String),
}

impl RequestError {
    /// The virtio status byte this failure completes with.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::UnsupportedType(_) | RequestError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A parsed chain: where its status goes and what to do.
#[derive(Debug)]
pub struct Request {
    pub head: u16,
    /// Guest address of the status byte (`None`: the chain has none; it is returned
    /// to the driver with nothing written).
    pub status_addr: Option<GuestAddress>,
    /// Bytes of device-writable data the request fills on success (reads, GET_ID;
    /// where they go in guest memory: [`Op::data_in`]).
    pub data_in_len: u32,
    /// The request type from the header, once it was read.
    pub req_type: Option<u32>,
    pub op: Result<Op, RequestError>,
}

impl Request {
    /// A chain refused before parsing (nothing of it is written: no status).
    pub fn refused(head: u16, e: RequestError) -> Request {
        Request {
            head,
            status_addr: None,
            data_in_len: 0,
            req_type: None,
            op: Err(e),
        }
    }
}

impl Request {
    /// A chain refused before parsing whose last descriptor is known: the status goes
    /// to its last byte if it is device-writable.
    pub fn refused_at(head: u16, e: RequestError, last: Option<Desc>) -> Request {
        let mut r = Request::refused(head, e);
        r.status_addr = last
            .filter(|d| d.write)
            .and_then(|d| last_byte(d.addr, u64::from(d.len)));
        r
    }
}

/// Guest memory segments (address, length); most chains have few, kept inline.
pub type Segs = SmallVec<[(u64, u64); 4]>;

/// Segments of guest memory in chain order, split into device-readable and -writable.
struct Split {
    readable: Segs,
    writable: Segs,
}

fn split(descs: &[Desc]) -> Result<Split, RequestError> {
    let mut s = Split {
        readable: Segs::new(),
        writable: Segs::new(),
    };
    for d in descs {
        if d.len == 0 {
            continue;
        }
        if d.addr.checked_add(u64::from(d.len)).is_none() {
            return Err(RequestError::BadAddress {
                addr: d.addr,
                len: u64::from(d.len),
            });
        }
        if d.write {
            s.writable.push((d.addr, u64::from(d.len)));
        } else if s.writable.is_empty() {
            s.readable.push((d.addr, u64::from(d.len)));
        } else {
            return Err(RequestError::BadOrder);
        }
    }
    Ok(s)
}

fn total(segs: &[(u64, u64)]) -> u64 {
    segs.iter().map(|s| s.1).sum()
}

/// The host address of the guest range `addr..addr+len`, if it lies inside one region
/// (the regions are few: a linear look, cheaper than vm-memory's general lookup, which
/// every request made several times).
#[inline(always)]
pub fn host_range(mem: &Memory, addr: u64, len: u64) -> Option<*mut u8> {
    for r in mem.iter() {
        let Some(off) = addr.checked_sub(r.start_addr().0) else {
            continue;
        };
        let size = r.len();
        if off < size && len <= size - off {
            // SAFETY: `off` is inside the region's mapping of `size` bytes.
            return Some(unsafe { r.as_ptr().add(off as usize) });
        }
    }
    None
}

/// The guest address of the host address `host` in a region of `mem` (the inverse
/// of [`host_range`]).
fn guest_addr(mem: &Memory, host: *const u8) -> Option<u64> {
    let host = host as usize;
    mem.iter().find_map(|r| {
        let off = host.checked_sub(r.as_ptr() as usize)?;
        (off < r.len() as usize).then(|| r.start_addr().0 + off as u64)
    })
}

/// The sub-list covering `offset..offset+len` of `segs`.
fn sub(segs: &[(u64, u64)], offset: u64, len: u64) -> Segs {
    let mut out = Segs::new();
    let (mut skip, mut want) = (offset, len);
    for &(addr, slen) in segs {
        if want == 0 {
            break;
        }
        if skip >= slen {
            skip -= slen;
            continue;
        }
        let take = (slen - skip).min(want);
        out.push((addr + skip, take));
        skip = 0;
        want -= take;
    }
    out
}

fn read_bytes(mem: &Memory, segs: &[(u64, u64)], buf: &mut [u8]) -> Result<(), RequestError> {
    let mut pos = 0usize;
    for &(addr, len) in segs {
        let n = len as usize;
        let dst = &mut buf[pos..pos + n];
        // Fast path: the bytes lie in one region (always, for a header in one
        // descriptor); vm-memory's general read walks an iterator of regions.
        let copied = mem
            .get_slice(GuestAddress(addr), n)
            .map(|slice| slice.copy_to(dst))
            .unwrap_or(0);
        if copied != n {
            mem.read_slice(dst, GuestAddress(addr))
                .map_err(|_| RequestError::BadAddress { addr, len })?;
        }
        pos += n;
    }
    Ok(())
}

/// Writes one byte of guest memory (the status byte).
pub fn write_status(mem: &Memory, addr: GuestAddress, status: u8) -> Result<(), RequestError> {
    if let Some(p) = host_range(mem, addr.0, 1) {
        // SAFETY: `host_range` found the byte inside a mapped region of `mem`, which
        // the caller holds. Volatile: guest memory.
        unsafe { p.write_volatile(status) };
        return Ok(());
    }
    mem.get_slice(addr, 1)
        .and_then(|slice| slice.write_obj(status, 0).map_err(Into::into))
        .map_err(|_| RequestError::BadAddress {
            addr: addr.0,
            len: 1,
        })
}

/// Maps guest segments to an I/O vector pointing into guest memory (zero-copy).
fn map_iov(mem: &Arc<Memory>, segs: &[(u64, u64)]) -> Result<IoVec, RequestError> {
    let keep: Keepalive = mem.clone();
    let mut iov = IoVec::with_capacity(Some(keep), segs.len());
    for &(addr, len) in segs {
        if let Some(ptr) = host_range(mem, addr, len) {
            // SAFETY: `host_range` found the whole buffer inside one mapped region; the
            // mapping stays alive while the IoVec's keepalive (an Arc of this memory)
            // exists, and the io_uring engine holds that keepalive until the kernel
            // has finished with the buffer.
            unsafe { iov.push_raw(ptr, len as usize) };
            continue;
        }
        // A buffer may span adjacent memory regions: one segment per region.
        for slice in mem.get_slices(GuestAddress(addr), len as usize) {
            let slice = slice.map_err(|_| RequestError::BadAddress { addr, len })?;
            let ptr = slice.ptr_guard_mut().as_ptr();
            // SAFETY: `get_slices` checked that the slice lies inside a mapped region;
            // the mapping stays alive while the IoVec's keepalive (an Arc of this
            // memory) exists, and the io_uring engine holds that keepalive until the
            // kernel has finished with the buffer.
            unsafe { iov.push_raw(ptr, slice.len()) };
        }
    }
    Ok(iov)
}

/// The request header: the first [`HEADER_LEN`] device-readable bytes (`readable`
/// holds at least that many).
fn read_header(mem: &Memory, readable: &[(u64, u64)]) -> Result<[u8; 16], RequestError> {
    let (addr, len) = readable[0];
    if len >= HEADER_LEN {
        if let Some(p) = host_range(mem, addr, HEADER_LEN) {
            // SAFETY: `host_range` found the 16 bytes inside a mapped region of `mem`,
            // which the caller holds; a byte array needs no alignment. Volatile: the
            // guest may write its memory meanwhile.
            return Ok(unsafe { p.cast::<[u8; 16]>().read_volatile() });
        }
    }
    let mut header = [0u8; HEADER_LEN as usize];
    read_bytes(mem, &sub(readable, 0, HEADER_LEN), &mut header)?;
    Ok(header)
}

fn check_range(lim: &DeviceLimits, sector: u64, len: u64) -> Result<u64, RequestError> {
    let lbs = u64::from(lim.logical_block_size);
    let offset = sector.checked_mul(SECTOR).ok_or(RequestError::OutOfRange {
        offset: u64::MAX,
        len,
    })?;
    if !offset.is_multiple_of(lbs) || !len.is_multiple_of(lbs) {
        return Err(RequestError::Misaligned(len));
    }
    match offset.checked_add(len) {
        Some(end) if end <= lim.capacity_bytes => Ok(offset),
        _ => Err(RequestError::OutOfRange { offset, len }),
    }
}

fn parse_ranges(
    mem: &Memory,
    data: &[(u64, u64)],
    lim: &DeviceLimits,
    write_zeroes: bool,
) -> Result<Vec<Range>, RequestError> {
    let len = total(data);
    let (max_seg, max_sectors) = if write_zeroes {
        (lim.max_write_zeroes_seg, lim.max_write_zeroes_sectors)
    } else {
        (lim.max_discard_seg, lim.max_discard_sectors)
    };
    if len == 0 || !len.is_multiple_of(SEGMENT_LEN) {
        return Err(RequestError::BadSegments);
    }
    let n = len / SEGMENT_LEN;
    if n > u64::from(max_seg) {
        return Err(RequestError::UnsupportedFlags(0));
    }
    let mut raw = vec![0u8; len as usize];
    read_bytes(mem, data, &mut raw)?;
    let mut out = Vec::with_capacity(n as usize);
    for seg in raw.chunks_exact(SEGMENT_LEN as usize) {
        let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
        let num = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
        let allowed = if write_zeroes {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(RequestError::UnsupportedFlags(flags));
        }
        if num > max_sectors {
            return Err(RequestError::BadSegments);
        }
        let blen = u64::from(num) * SECTOR;
        let offset = check_range(lim, sector, blen)?;
        out.push(Range {
            offset,
            len: blen,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(out)
}

/// The guest address of the last byte of a device-writable descriptor (where the
/// status goes), if the descriptor has one.
fn last_byte(addr: u64, len: u64) -> Option<GuestAddress> {
    len.checked_sub(1)
        .and_then(|n| addr.checked_add(n))
        .map(GuestAddress)
}

/// The most descriptors of one chain worth collecting: a header, `max_segments` data
/// descriptors and a status, plus one to tell that a chain is too long.
pub fn max_chain_descriptors(lim: &DeviceLimits) -> usize {
    lim.max_segments + 3
}

/// Parses one chain.
pub fn parse(head: u16, descs: &[Desc], mem: &Arc<Memory>, lim: &DeviceLimits) -> Request {
    match parse_usual(head, descs, mem, lim) {
        Some(req) => req,
        None => parse_any(head, descs, mem, lim),
    }
}

/// Parses any chain (see [`parse_usual`] for the common one).
fn parse_any(head: u16, descs: &[Desc], mem: &Arc<Memory>, lim: &DeviceLimits) -> Request {
    let mut req = Request {
        head,
        status_addr: None,
        data_in_len: 0,
        req_type: None,
        op: Err(RequestError::NoStatus),
    };
    let s = match split(descs) {
        Ok(s) => s,
        Err(e) => {
            // Still report through the last writable byte if there is one.
            if let Some(d) = descs.iter().rev().find(|d| d.write && d.len > 0) {
                req.status_addr = last_byte(d.addr, u64::from(d.len));
            }
            req.op = Err(e);
            return req;
        }
    };
    let Some(&(last_addr, last_len)) = s.writable.last() else {
        return req;
    };
    req.status_addr = last_byte(last_addr, last_len);
    req.op = parse_op(&s, mem, lim, &mut req.data_in_len, &mut req.req_type);
    if req.op.is_err() {
        req.data_in_len = 0;
    }
    req
}

/// The usual chain of a read or a write (a 16-byte header descriptor, one data
/// descriptor, a 1-byte status descriptor; header and data each in one memory region)
/// parsed in a straight line, with the checks [`parse_op`] makes of it. `None` for any
/// other chain and for one that fails a check: [`parse`] then parses it in full, and
/// gives the same request for the chains accepted here.
#[inline]
fn parse_usual(
    head: u16,
    descs: &[Desc],
    mem: &Arc<Memory>,
    lim: &DeviceLimits,
) -> Option<Request> {
    let [h, d, s] = descs else {
        return None;
    };
    let len = u64::from(d.len);
    if h.write
        || u64::from(h.len) != HEADER_LEN
        || !s.write
        || s.len != 1
        || s.addr == u64::MAX
        || len == 0
        || len > u64::from(lim.size_max)
        || len + HEADER_LEN >= u64::from(u32::MAX)
        || lim.max_segments == 0
    {
        return None;
    }
    let header = host_range(mem, h.addr, HEADER_LEN)?;
    // SAFETY: `host_range` found the 16 bytes inside a mapped region of `mem`, which
    // the caller holds; a byte array needs no alignment. Volatile: the guest may write
    // its memory meanwhile.
    let header = unsafe { header.cast::<[u8; 16]>().read_volatile() };
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let read = match kind {
        VIRTIO_BLK_T_IN if d.write => true,
        VIRTIO_BLK_T_OUT if !d.write && lim.writable => false,
        _ => return None,
    };
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let offset = check_range(lim, sector, len).ok()?;
    let data = host_range(mem, d.addr, len)?;
    let mut iov = IoVec::with_capacity(Some(mem.clone()), 1);
    // SAFETY: `host_range` found the whole buffer inside one mapped region; the mapping
    // stays alive while the IoVec's keepalive (an Arc of this memory) exists, and the
    // io_uring engine holds that keepalive until the kernel has finished with it.
    unsafe { iov.push_raw(data, len as usize) };
    let (op, data_in_len) = if read {
        (Op::Read { offset, iov }, len as u32)
    } else {
        (Op::Write { offset, iov }, 0)
    };
    Some(Request {
        head,
        status_addr: Some(GuestAddress(s.addr)),
        data_in_len,
        req_type: Some(kind),
        op: Ok(op),
    })
}

fn parse_op(
    s: &Split,
    mem: &Arc<Memory>,
    lim: &DeviceLimits,
    data_in_len: &mut u32,
    req_type: &mut Option<u32>,
) -> Result<Op, RequestError> {
    if s.readable.len() + s.writable.len() > lim.max_segments + 2 {
        return Err(RequestError::TooManySegments(
            s.readable.len() + s.writable.len(),
        ));
    }
    let readable_len = total(&s.readable);
    if readable_len < HEADER_LEN {
        return Err(RequestError::ShortHeader);
    }
    let writable_len = total(&s.writable);
    for len in [readable_len, writable_len] {
        // The used element reports the bytes written as a u32.
        if len >= u64::from(u32::MAX) {
            return Err(RequestError::TooLarge(len));
        }
    }
    let header = read_header(mem, &s.readable)?;
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    *req_type = Some(kind);
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    // The usual layout (a header descriptor of its own, a status descriptor of its
    // own) needs no copies: the data lists are the chain's lists without those.
    let (out_owned, in_owned);
    let out_data: &[(u64, u64)] = if s.readable[0].1 == HEADER_LEN {
        &s.readable[1..]
    } else {
        out_owned = sub(&s.readable, HEADER_LEN, readable_len - HEADER_LEN);
        &out_owned
    };
    let in_data: &[(u64, u64)] = match s.writable.split_last() {
        Some((&(_, 1), rest)) => rest,
        _ => {
            in_owned = sub(&s.writable, 0, writable_len - 1);
            &in_owned
        }
    };
    // What the config space promises the driver (and what bounds the work and memory
    // one request may take): at most seg_max data segments (header and status bytes
    // apart, wherever descriptor boundaries fall) of at most size_max bytes each.
    if out_data.len() + in_data.len() > lim.max_segments {
        return Err(RequestError::TooManySegments(
            out_data.len() + in_data.len(),
        ));
    }
    if let Some(&(_, len)) = out_data
        .iter()
        .chain(in_data.iter())
        .find(|&&(_, len)| len > u64::from(lim.size_max))
    {
        return Err(RequestError::SegmentTooLarge(len));
    }
    let in_len = writable_len - 1;
    let is_write = matches!(
        kind,
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
    );
    if is_write && !lim.writable {
        return Err(RequestError::ReadOnly);
    }
    match kind {
        VIRTIO_BLK_T_IN => {
            if !out_data.is_empty() {
                return Err(RequestError::UnexpectedData);
            }
            let offset = check_range(lim, sector, in_len)?;
            let iov = map_iov(mem, in_data)?;
            *data_in_len = in_len as u32;
            Ok(Op::Read { offset, iov })
        }
        VIRTIO_BLK_T_OUT => {
            if in_len != 0 {
                return Err(RequestError::UnexpectedData);
            }
            let len = readable_len - HEADER_LEN;
            let offset = check_range(lim, sector, len)?;
            Ok(Op::Write {
                offset,
                iov: map_iov(mem, out_data)?,
            })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Op::Flush),
        VIRTIO_BLK_T_GET_ID => {
            let n = in_len.min(ID_BYTES as u64);
            *data_in_len = n as u32;
            Ok(Op::GetId {
                iov: map_iov(mem, &sub(in_data, 0, n))?,
            })
        }
        VIRTIO_BLK_T_DISCARD => Ok(Op::Discard(parse_ranges(mem, out_data, lim, false)?)),
        VIRTIO_BLK_T_WRITE_ZEROES => Ok(Op::WriteZeroes(parse_ranges(mem, out_data, lim, true)?)),
        other => Err(RequestError::UnsupportedType(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x10_000;

    fn memory() -> Arc<Memory> {
        Arc::new(Memory::from_ranges(&[(GuestAddress(BASE), 0x10_0000)]).unwrap())
    }

    fn limits() -> DeviceLimits {
        DeviceLimits {
            capacity_bytes: 1 << 20,
            logical_block_size: 512,
            writable: true,
            max_segments: 126,
            size_max: 1 << 20,
            max_discard_sectors: 1 << 16,
            max_discard_seg: 4,
            max_write_zeroes_sectors: 1 << 16,
            max_write_zeroes_seg: 4,
        }
    }

    fn header(mem: &Memory, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn rd(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            write: false,
        }
    }

    fn wr(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            write: true,
        }
    }

    #[test]
    fn read_request_maps_data_and_status() {
        let mem = memory();
        header(&mem, BASE, VIRTIO_BLK_T_IN, 8);
        let d = [
            rd(BASE, 16),
            wr(BASE + 0x1000, 1024),
            wr(BASE + 0x2000, 512),
            wr(BASE + 0x3000, 1),
        ];
        let r = parse(3, &d, &mem, &limits());
        assert_eq!(r.status_addr, Some(GuestAddress(BASE + 0x3000)));
        assert_eq!(r.data_in_len, 1536);
        let data_in: Vec<_> = r.op.as_ref().unwrap().data_in(&mem).collect();
        assert_eq!(data_in, [(BASE + 0x1000, 1024), (BASE + 0x2000, 512)]);
        match r.op.unwrap() {
            Op::Read { offset, iov } => {
                assert_eq!(offset, 4096);
                assert_eq!(iov.len(), 1536);
                assert_eq!(iov.segments().len(), 2);
            }
            other => panic!("{other:?}"),
        }
    }

    /// A buffer across two regions is read as one segment per region, and the guest
    /// ranges a dirty log marks are the buffer's.
    #[test]
    fn data_in_across_two_regions() {
        let mem = Arc::new(
            Memory::from_ranges(&[
                (GuestAddress(BASE), 0x1000),
                (GuestAddress(BASE + 0x1000), 0x4000),
            ])
            .unwrap(),
        );
        header(&mem, BASE + 0x2000, VIRTIO_BLK_T_IN, 0);
        let d = [
            rd(BASE + 0x2000, 16),
            wr(BASE + 0x800, 0x1000),
            wr(BASE + 0x3000, 1),
        ];
        let r = parse(0, &d, &mem, &limits());
        let op = r.op.unwrap();
        assert!(matches!(&op, Op::Read { iov, .. } if iov.segments().len() == 2));
        let data_in: Vec<_> = op.data_in(&mem).collect();
        assert_eq!(data_in, [(BASE + 0x800, 0x800), (BASE + 0x1000, 0x800)]);
        assert_eq!(r.data_in_len, 0x1000);
    }

    #[test]
    fn any_layout_header_and_data_in_one_descriptor() {
        let mem = memory();
        header(&mem, BASE, VIRTIO_BLK_T_OUT, 0);
        let d = [rd(BASE, 16 + 512), wr(BASE + 0x3000, 1)];
        match parse(0, &d, &mem, &limits()).op.unwrap() {
            Op::Write { offset, iov } => {
                assert_eq!(offset, 0);
                assert_eq!(iov.len(), 512);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn limits_and_address_overflow_are_refused() {
        let mem = memory();
        let mut lim = limits();
        lim.capacity_bytes = 1 << 30;
        lim.size_max = 4096;
        lim.max_segments = 2;
        header(&mem, BASE, VIRTIO_BLK_T_IN, 0);
        // One data descriptor beyond size_max.
        let r = parse(
            0,
            &[rd(BASE, 16), wr(BASE + 0x1000, 8192), wr(BASE + 0x3000, 1)],
            &mem,
            &lim,
        );
        assert_eq!(r.op.unwrap_err(), RequestError::SegmentTooLarge(8192));
        // Header and data in one descriptor: only the data counts against size_max.
        header(&mem, BASE, VIRTIO_BLK_T_OUT, 0);
        let r = parse(0, &[rd(BASE, 16 + 4096), wr(BASE + 0x3000, 1)], &mem, &lim);
        assert!(r.op.is_ok(), "{:?}", r.op);
        // More data segments than seg_max.
        header(&mem, BASE, VIRTIO_BLK_T_IN, 0);
        let r = parse(
            0,
            &[
                rd(BASE, 16),
                wr(BASE + 0x1000, 512),
                wr(BASE + 0x2000, 512),
                wr(BASE + 0x4000, 512),
                wr(BASE + 0x3000, 1),
            ],
            &mem,
            &lim,
        );
        assert_eq!(r.op.unwrap_err(), RequestError::TooManySegments(5));
        // A descriptor whose end overflows the address space: refused, no panic, and
        // no status address computed from it.
        let r = parse(
            0,
            &[rd(BASE, 16), wr(u64::MAX - 10, 512), wr(u64::MAX, 1)],
            &mem,
            &lim,
        );
        assert!(matches!(r.op, Err(RequestError::BadAddress { .. })));
        let r = parse(0, &[rd(BASE, 16), wr(u64::MAX, u32::MAX)], &mem, &lim);
        assert!(r.status_addr.is_none());
        assert!(r.op.is_err());
    }

    #[test]
    fn malformed_chains_are_refused_with_the_right_status() {
        let mem = memory();
        let lim = limits();
        header(&mem, BASE, VIRTIO_BLK_T_IN, 0);
        // No writable byte at all: no status.
        let r = parse(0, &[rd(BASE, 16)], &mem, &lim);
        assert!(r.status_addr.is_none());
        // Header too short.
        let r = parse(0, &[rd(BASE, 8), wr(BASE + 0x3000, 1)], &mem, &lim);
        assert_eq!(r.op.unwrap_err(), RequestError::ShortHeader);
        // Readable after writable.
        let r = parse(
            0,
            &[
                rd(BASE, 16),
                wr(BASE + 0x1000, 512),
                rd(BASE + 0x2000, 16),
                wr(BASE + 0x3000, 1),
            ],
            &mem,
            &lim,
        );
        assert_eq!(r.op.unwrap_err(), RequestError::BadOrder);
        assert!(r.status_addr.is_some());
        // Not a multiple of 512.
        let r = parse(
            0,
            &[rd(BASE, 16), wr(BASE + 0x1000, 100), wr(BASE + 0x3000, 1)],
            &mem,
            &lim,
        );
        assert_eq!(r.op.unwrap_err().status(), VIRTIO_BLK_S_IOERR as u8);
        // Past the end.
        header(&mem, BASE, VIRTIO_BLK_T_IN, (1 << 20) / 512);
        let r = parse(
            0,
            &[rd(BASE, 16), wr(BASE + 0x1000, 512), wr(BASE + 0x3000, 1)],
            &mem,
            &lim,
        );
        assert!(matches!(r.op.unwrap_err(), RequestError::OutOfRange { .. }));
        // Sector overflow.
        header(&mem, BASE, VIRTIO_BLK_T_IN, u64::MAX);
        let r = parse(
            0,
            &[rd(BASE, 16), wr(BASE + 0x1000, 512), wr(BASE + 0x3000, 1)],
            &mem,
            &lim,
        );
        assert!(matches!(r.op.unwrap_err(), RequestError::OutOfRange { .. }));
        // Buffer outside guest memory.
        header(&mem, BASE, VIRTIO_BLK_T_IN, 0);
        let r = parse(
            0,
            &[rd(BASE, 16), wr(0x1_0000_0000, 512), wr(BASE + 0x3000, 1)],
            &mem,
            &lim,
        );
        assert!(matches!(r.op.unwrap_err(), RequestError::BadAddress { .. }));
        // Unknown type.
        header(&mem, BASE, 77, 0);
        let r = parse(0, &[rd(BASE, 16), wr(BASE + 0x3000, 1)], &mem, &lim);
        assert_eq!(r.op.unwrap_err().status(), VIRTIO_BLK_S_UNSUPP as u8);
        // Write on a read-only device.
        header(&mem, BASE, VIRTIO_BLK_T_OUT, 0);
        let ro = DeviceLimits {
            writable: false,
            ..lim
        };
        let r = parse(0, &[rd(BASE, 16 + 512), wr(BASE + 0x3000, 1)], &mem, &ro);
        assert_eq!(r.op.unwrap_err(), RequestError::ReadOnly);
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let mem = memory();
        let lim = limits();
        let seg = |sector: u64, num: u32, flags: u32| {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&sector.to_le_bytes());
            b[8..12].copy_from_slice(&num.to_le_bytes());
            b[12..16].copy_from_slice(&flags.to_le_bytes());
            b
        };
        header(&mem, BASE, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        mem.write_slice(&seg(8, 16, 1), GuestAddress(BASE + 16))
            .unwrap();
        let d = [rd(BASE, 32), wr(BASE + 0x3000, 1)];
        match parse(0, &d, &mem, &lim).op.unwrap() {
            Op::WriteZeroes(r) => assert_eq!(
                r,
                vec![Range {
                    offset: 4096,
                    len: 8192,
                    unmap: true
                }]
            ),
            other => panic!("{other:?}"),
        }
        // The unmap flag is not allowed on discard.
        header(&mem, BASE, VIRTIO_BLK_T_DISCARD, 0);
        let r = parse(0, &d, &mem, &lim);
        assert_eq!(r.op.unwrap_err().status(), VIRTIO_BLK_S_UNSUPP as u8);
        // Out of range discard.
        mem.write_slice(&seg(2048, 8, 0), GuestAddress(BASE + 16))
            .unwrap();
        let r = parse(0, &d, &mem, &lim);
        assert!(matches!(r.op.unwrap_err(), RequestError::OutOfRange { .. }));
        // Not a whole number of segments.
        let r = parse(0, &[rd(BASE, 24), wr(BASE + 0x3000, 1)], &mem, &lim);
        assert_eq!(r.op.unwrap_err(), RequestError::BadSegments);
    }

    /// What a parsed request amounts to, for comparing two parses.
    fn summary(r: &Request, mem: &Memory) -> String {
        let op = match &r.op {
            Ok(Op::Read { offset, iov }) => format!("read {offset} {:?}", segs(iov)),
            Ok(Op::Write { offset, iov }) => format!("write {offset} {:?}", segs(iov)),
            other => format!("{other:?}"),
        };
        let data_in: Vec<_> = r.op.iter().flat_map(|o| o.data_in(mem)).collect();
        format!(
            "{} {:?} {} {data_in:?} {:?} {op}",
            r.head, r.status_addr, r.data_in_len, r.req_type
        )
    }

    fn segs(iov: &IoVec) -> Vec<(usize, usize)> {
        iov.segments()
            .iter()
            .map(|s| (s.iov_base as usize, s.iov_len))
            .collect()
    }

    /// The straight-line parse of the usual read and write chains gives what the full
    /// parse gives, and leaves every other chain (and every failed check) to it.
    #[test]
    fn usual_chains_parse_as_any_chain_does() {
        let mem = memory();
        let lim = limits();
        let ro = DeviceLimits {
            writable: false,
            ..lim
        };
        let no_segs = DeviceLimits {
            max_segments: 0,
            ..lim
        };
        let small = DeviceLimits {
            size_max: 512,
            ..lim
        };
        let end = BASE + 0x10_0000;
        let mut accepted = 0;
        for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, 77] {
            for sector in [0, 8, 3, (1 << 20) / 512 - 8, (1 << 20) / 512, u64::MAX] {
                header(&mem, BASE, kind, sector);
                for (addr, len) in [
                    (BASE + 0x1000, 4096),
                    (BASE + 0x1000, 100),
                    (BASE + 0x1000, 0),
                    (BASE + 0x1000, 1024),
                    (end - 512, 4096),
                    (u64::MAX - 10, 512),
                    (0x1_0000_0000, 512),
                ] {
                    for (write, status, status_len) in [
                        (true, BASE + 0x3000, 1),
                        (false, BASE + 0x3000, 1),
                        (true, BASE + 0x3000, 2),
                        (true, u64::MAX, 1),
                        (true, end, 1),
                    ] {
                        for header_desc in
                            [rd(BASE, 16), rd(BASE, 24), wr(BASE, 16), rd(end - 8, 16)]
                        {
                            let d = [
                                header_desc,
                                Desc { addr, len, write },
                                wr(status, status_len),
                            ];
                            for l in [&lim, &ro, &no_segs, &small] {
                                let any = parse_any(7, &d, &mem, l);
                                if let Some(usual) = parse_usual(7, &d, &mem, l) {
                                    accepted += 1;
                                    assert_eq!(summary(&usual, &mem), summary(&any, &mem), "{d:?}");
                                }
                            }
                        }
                    }
                }
            }
        }
        // Reads and writes of 4096 or 1024 bytes at 4 sectors in range: reads on both
        // devices, to either status byte (one outside memory: that write fails later,
        // whichever way the chain was parsed); writes on the writable one.
        assert_eq!(accepted, 2 * 4 * 2 * 2 + 2 * 4, "accepted chains");
    }

    #[test]
    fn get_id_fills_at_most_twenty_bytes() {
        let mem = memory();
        header(&mem, BASE, VIRTIO_BLK_T_GET_ID, 0);
        let r = parse(
            0,
            &[rd(BASE, 16), wr(BASE + 0x1000, 512), wr(BASE + 0x3000, 1)],
            &mem,
            &limits(),
        );
        assert_eq!(r.data_in_len, 20);
        assert!(matches!(r.op.unwrap(), Op::GetId { .. }));
    }
}

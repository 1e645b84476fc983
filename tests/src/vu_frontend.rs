//! A raw vhost-user frontend, written by hand, for hostile tests.
//!
//! Unlike [`crate::raw::RawClient`] (built on `virtio-driver`, which drives the protocol and
//! the rings itself), everything here is under the test's control:
//!
//! * **Messages** ([`VuConn`]): the 12-byte header (request code, flags with version 1 and
//!   the NEED_REPLY bit, payload size), payloads as little-endian bytes, file descriptors as
//!   `SCM_RIGHTS` ancillary data. [`VuConn::send_raw`] sends any bytes with any fds
//!   (oversized, truncated, wrong fd count, unknown codes); [`VuConn::recv`] reads one
//!   message with a timeout.
//! * **Operations** ([`Frontend`]): one method per message a vhost-user-blk frontend sends
//!   (features, protocol features, owner, queue count, memory table, memory slots, vring
//!   setup, enable, GET_VRING_BASE, config space). Nothing is sent implicitly except in
//!   [`Frontend::handshake`] and [`Frontend::start_queue`], which are conveniences built
//!   from the single-message methods.
//! * **Guest memory** ([`MemRegion`], [`GuestMemory`]): memfd regions at guest physical
//!   addresses the test chooses (GPA 0 included), mapped on our side too, so the test can
//!   lay out rings, descriptors and buffers and check what the daemon wrote.
//! * **Split rings** ([`SplitQueue`], virtio 1.2 section 2.7): descriptors, the avail ring
//!   and `avail.idx` are written directly (a test may put any value anywhere: loops,
//!   INDIRECT tables, zero lengths, addresses outside memory, `avail.idx` far ahead), the
//!   kick eventfd is written by hand, and the used ring is read back.
//!
//! Layout of the rings in guest memory ([`RingLayout`]): the descriptor table (16 bytes per
//! entry: le64 addr, le32 len, le16 flags, le16 next), the avail ring (le16 flags, le16 idx,
//! le16 ring[size], le16 used_event) and the used ring (le16 flags, le16 idx,
//! {le32 id, le32 len}[size], le16 avail_event).
//!
//! Concurrency: the daemon reads and writes guest memory while the test does. All our
//! accesses go through raw copies of the shared mapping (never references), and the ring
//! indices through atomics with release/acquire ordering, as a driver does.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// vhost-user request codes (front-end to back-end), from QEMU's docs/interop/vhost-user.rst.
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const RESET_DEVICE: u32 = 34;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
}

/// Header flags: the version (always 1), REPLY (set by the back-end on replies) and
/// NEED_REPLY (ask for an ack, with VHOST_USER_PROTOCOL_F_REPLY_ACK).
pub const FLAG_VERSION_1: u32 = 0x1;
pub const FLAG_REPLY: u32 = 0x4;
pub const FLAG_NEED_REPLY: u32 = 0x8;
/// Bytes of the message header.
pub const HEADER_LEN: usize = 12;
/// Largest reply payload [`VuConn::recv`] accepts (vhost-user payloads are small; a larger
/// size field is a protocol error, not a reason to allocate).
pub const MAX_REPLY_PAYLOAD: usize = 64 * 1024;
/// The vring index bit of SET_VRING_KICK/CALL/ERR meaning "no file descriptor".
pub const VRING_NOFD: u64 = 0x100;

/// Feature bits (virtio 1.2 section 6 and 5.2.3; vhost-user's PROTOCOL_FEATURES).
pub mod feat {
    pub const BLK_SIZE_MAX: u64 = 1 << 1;
    pub const BLK_SEG_MAX: u64 = 1 << 2;
    pub const BLK_RO: u64 = 1 << 5;
    pub const BLK_BLK_SIZE: u64 = 1 << 6;
    pub const BLK_FLUSH: u64 = 1 << 9;
    pub const BLK_TOPOLOGY: u64 = 1 << 10;
    pub const BLK_CONFIG_WCE: u64 = 1 << 11;
    pub const BLK_MQ: u64 = 1 << 12;
    pub const BLK_DISCARD: u64 = 1 << 13;
    pub const BLK_WRITE_ZEROES: u64 = 1 << 14;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// VHOST_USER_F_PROTOCOL_FEATURES
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    pub const VERSION_1: u64 = 1 << 32;
}

/// vhost-user protocol feature bits.
pub mod proto {
    pub const MQ: u64 = 1 << 0;
    pub const REPLY_ACK: u64 = 1 << 3;
    pub const BACKEND_REQ: u64 = 1 << 5;
    pub const CONFIG: u64 = 1 << 9;
    pub const INFLIGHT_SHMFD: u64 = 1 << 12;
    pub const RESET_DEVICE: u64 = 1 << 13;
    pub const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
}

/// Descriptor flags (virtio 1.2 2.7.5).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Used ring flag: the device does not want kicks.
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;
/// Bytes of one descriptor.
pub const DESC_LEN: u64 = 16;

/// What went wrong talking to the back-end.
#[derive(Debug)]
pub enum VuError {
    /// A system call failed.
    Io(io::Error),
    /// The back-end closed the connection (EOF, ECONNRESET or EPIPE).
    Closed,
    /// Nothing arrived (or could be sent) within the timeout.
    Timeout(String),
    /// A REPLY_ACK with a non-zero value: the back-end refused the request.
    Nack(u64),
    /// A reply that does not fit the request.
    BadReply(String),
}

impl fmt::Display for VuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VuError::Io(e) => write!(f, "I/O error: {e}"),
            VuError::Closed => write!(f, "the back-end closed the connection"),
            VuError::Timeout(what) => write!(f, "timed out: {what}"),
            VuError::Nack(v) => write!(f, "the back-end refused the request (ack {v})"),
            VuError::BadReply(what) => write!(f, "bad reply: {what}"),
        }
    }
}

impl std::error::Error for VuError {}

impl From<io::Error> for VuError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EPIPE) | Some(libc::ECONNRESET) => VuError::Closed,
            _ => VuError::Io(e),
        }
    }
}

pub type VuResult<T> = Result<T, VuError>;

/// One vhost-user message as received.
#[derive(Debug)]
pub struct Message {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    /// File descriptors that came with it (closed on drop).
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// The payload as one le64 (GET_FEATURES, acks, GET_QUEUE_NUM...).
    pub fn u64(&self) -> VuResult<u64> {
        let b: [u8; 8] = self.payload.as_slice().try_into().map_err(|_| {
            VuError::BadReply(format!(
                "request {}: expected an 8-byte payload, got {} bytes",
                self.request,
                self.payload.len()
            ))
        })?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Encodes a header.
pub fn header(request: u32, flags: u32, size: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&request.to_le_bytes());
    h[4..8].copy_from_slice(&flags.to_le_bytes());
    h[8..12].copy_from_slice(&size.to_le_bytes());
    h
}

/// A whole message (header + payload) as bytes, with version 1 and `extra_flags`.
pub fn encode(request: u32, extra_flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = header(request, FLAG_VERSION_1 | extra_flags, payload.len() as u32).to_vec();
    v.extend_from_slice(payload);
    v
}

/// The payload of SET_VRING_NUM/BASE/ENABLE and GET_VRING_BASE: le32 index, le32 num.
pub fn vring_state(index: u32, num: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0..4].copy_from_slice(&index.to_le_bytes());
    b[4..8].copy_from_slice(&num.to_le_bytes());
    b
}

/// One entry of SET_MEM_TABLE, or the region of ADD_MEM_REG/REM_MEM_REG: guest physical
/// address, size, the front-end's virtual address, offset into the fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionDesc {
    pub gpa: u64,
    pub size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
}

impl RegionDesc {
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&self.gpa.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.user_addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.mmap_offset.to_le_bytes());
        b
    }
}

/// The payload of SET_MEM_TABLE: le32 count, le32 padding, then the regions.
pub fn mem_table_payload(regions: &[RegionDesc]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 32 * regions.len());
    v.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    for r in regions {
        v.extend_from_slice(&r.to_bytes());
    }
    v
}

/// The payload of ADD_MEM_REG/REM_MEM_REG: le64 padding, then one region.
pub fn single_region_payload(r: &RegionDesc) -> Vec<u8> {
    let mut v = vec![0u8; 8];
    v.extend_from_slice(&r.to_bytes());
    v
}

/// The payload of GET_CONFIG/SET_CONFIG: le32 offset, le32 size, le32 flags, then `data`
/// (GET_CONFIG sends `size` bytes of zeroes).
pub fn config_payload(offset: u32, size: u32, flags: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + data.len());
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(&size.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(data);
    v
}

fn poll_fd(fd: RawFd, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    loop {
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(r > 0);
    }
}

/// A vhost-user connection: framing, fds and timeouts, no protocol logic.
pub struct VuConn {
    sock: UnixStream,
    /// How long [`VuConn::recv`] waits for a reply by default, and how long a send may
    /// block (a back-end that stops reading).
    pub timeout: Duration,
}

impl VuConn {
    /// Connects to `path`, retrying for up to `connect_timeout` while the socket does not
    /// exist or refuses (the daemon may be between bind and listen, or busy with the
    /// previous frontend).
    pub fn connect(path: &Path, connect_timeout: Duration) -> VuResult<VuConn> {
        let deadline = Instant::now() + connect_timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(sock) => {
                    let c = VuConn {
                        sock,
                        timeout: Duration::from_secs(5),
                    };
                    c.set_send_timeout(Some(c.timeout))?;
                    return Ok(c);
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.sock
    }

    /// How long a send may block before it fails with [`VuError::Timeout`] (`None`:
    /// forever).
    pub fn set_send_timeout(&self, t: Option<Duration>) -> VuResult<()> {
        self.sock.set_write_timeout(t)?;
        Ok(())
    }

    /// Sends `bytes` as they are, with `fds` attached to the first chunk (SCM_RIGHTS).
    /// Blocks until everything is sent or the send timeout expires; returns the number of
    /// bytes sent (all of them on success).
    pub fn send_raw(&self, bytes: &[u8], fds: &[RawFd]) -> VuResult<usize> {
        let mut sent = 0usize;
        let mut first = true;
        while sent < bytes.len() || (first && !fds.is_empty()) {
            let n = self.sendmsg_once(&bytes[sent..], if first { fds } else { &[] })?;
            first = false;
            sent += n;
            if n == 0 && sent < bytes.len() {
                return Err(VuError::Closed);
            }
        }
        Ok(sent)
    }

    fn sendmsg_once(&self, bytes: &[u8], fds: &[RawFd]) -> VuResult<usize> {
        // An empty message cannot carry ancillary data over a stream socket: send one
        // zero byte in that (hostile) case.
        let zero = [0u8; 1];
        let data: &[u8] = if bytes.is_empty() { &zero } else { bytes };
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let fd_bytes = std::mem::size_of_val(fds) as u32;
        let space = if fds.is_empty() {
            0
        } else {
            // SAFETY: CMSG_SPACE is a pure computation on its argument.
            unsafe { libc::CMSG_SPACE(fd_bytes) as usize }
        };
        // u64 elements keep the control buffer aligned for cmsghdr.
        let mut control = vec![0u64; space.div_ceil(8)];
        // SAFETY: msghdr is plain data; every field we rely on is set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points at `space` bytes (CMSG_SPACE of the fd array),
            // enough for one cmsghdr followed by the fds; CMSG_FIRSTHDR returns a pointer
            // inside that buffer, which is aligned for cmsghdr (u64 elements).
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    fd_bytes as usize,
                );
            }
        }
        loop {
            // SAFETY: msg points at a live iovec over `data` and (if any) the control
            // buffer; both outlive the call. MSG_NOSIGNAL: a closed peer gives EPIPE.
            let r = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if r >= 0 {
                return Ok(if bytes.is_empty() { 0 } else { r as usize });
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    return Err(VuError::Timeout(format!(
                        "send blocked for {:?} (the back-end does not read)",
                        self.sock.write_timeout().ok().flatten().unwrap_or_default()
                    )))
                }
                _ => return Err(e.into()),
            }
        }
    }

    /// Sends one message: version 1 plus `extra_flags` (e.g. [`FLAG_NEED_REPLY`]).
    pub fn send(
        &self,
        request: u32,
        extra_flags: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> VuResult<()> {
        self.send_raw(&encode(request, extra_flags, payload), fds)?;
        Ok(())
    }

    /// Reads up to `buf.len()` bytes (at least one) within `deadline`, collecting fds.
    fn recv_some(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        deadline: Instant,
    ) -> VuResult<usize> {
        let left = deadline.saturating_duration_since(Instant::now());
        if !poll_fd(self.sock.as_raw_fd(), libc::POLLIN, left)? {
            return Err(VuError::Timeout(format!(
                "no reply from the back-end within {:?}",
                self.timeout
            )));
        }
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // Room for up to 16 fds.
        let mut control = [0u64; 16];
        // SAFETY: msghdr is plain data; the fields used are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = loop {
            // SAFETY: msg points at a live iovec over `buf` and a control buffer of
            // msg_controllen bytes, both valid for the call.
            let r = unsafe {
                libc::recvmsg(
                    self.sock.as_raw_fd(),
                    &mut msg,
                    libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
                )
            };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            return Err(e.into());
        };
        // SAFETY: the kernel filled `control` up to msg_controllen with well-formed
        // cmsghdrs; CMSG_FIRSTHDR/NXTHDR walk them within that length, and SCM_RIGHTS
        // payloads are arrays of ints, read unaligned.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / 4 {
                        let fd = std::ptr::read_unaligned(data.add(i * 4).cast::<RawFd>());
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if n == 0 {
            return Err(VuError::Closed);
        }
        Ok(n)
    }

    fn recv_exact(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        deadline: Instant,
    ) -> VuResult<()> {
        let mut got = 0;
        while got < buf.len() {
            got += self.recv_some(&mut buf[got..], fds, deadline)?;
        }
        Ok(())
    }

    /// Receives one message within `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> VuResult<Message> {
        let deadline = Instant::now() + timeout;
        let mut fds = Vec::new();
        let mut h = [0u8; HEADER_LEN];
        self.recv_exact(&mut h, &mut fds, deadline)?;
        let request = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        let size = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")) as usize;
        if size > MAX_REPLY_PAYLOAD {
            return Err(VuError::BadReply(format!(
                "reply to request {request} announces {size} bytes of payload"
            )));
        }
        let mut payload = vec![0u8; size];
        self.recv_exact(&mut payload, &mut fds, deadline)?;
        Ok(Message {
            request,
            flags,
            payload,
            fds,
        })
    }

    /// Receives one message within the connection's timeout.
    pub fn recv(&self) -> VuResult<Message> {
        self.recv_timeout(self.timeout)
    }

    /// Whether the back-end has closed the connection within `timeout`: reads and drops
    /// whatever it still sends until EOF. `false` if it is still open at the deadline.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        let mut fds = Vec::new();
        loop {
            match self.recv_some(&mut buf, &mut fds, deadline) {
                Ok(_) => fds.clear(),
                Err(VuError::Closed) => return true,
                Err(VuError::Io(_)) => return true,
                Err(_) => return false,
            }
        }
    }

    /// Half-closes our sending side (the back-end sees EOF after what was sent).
    pub fn shutdown_write(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
    }
}

/// A memfd region of guest memory at a guest physical address, mapped on our side.
pub struct MemRegion {
    gpa: u64,
    size: u64,
    fd: OwnedFd,
    base: *mut u8,
}

// SAFETY: `base` is a MAP_SHARED mapping of `size` bytes owned by this struct (unmapped in
// Drop only). All accesses through GuestMemory use raw copies and atomics, which tolerate
// concurrent writers (other threads, and the daemon through its own mapping), so sharing
// the region between threads adds no aliasing hazard.
unsafe impl Send for MemRegion {}
// SAFETY: as for Send.
unsafe impl Sync for MemRegion {}

impl MemRegion {
    /// A zero-filled region of `size` bytes (a multiple of 4096) at `gpa`. Pages are only
    /// allocated when touched (by us or the daemon).
    pub fn new(gpa: u64, size: u64) -> Arc<MemRegion> {
        assert!(
            size > 0 && size.is_multiple_of(4096),
            "region size {size:#x}"
        );
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let raw = unsafe { libc::memfd_create(c"vubd-hostile-mem".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        let r = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
        assert_eq!(r, 0, "ftruncate: {}", io::Error::last_os_error());
        // SAFETY: a new shared mapping of our memfd; it overlaps no existing memory.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            base,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        Arc::new(MemRegion {
            gpa,
            size,
            fd,
            base: base.cast(),
        })
    }

    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Our virtual address of the region's start (the `user_addr` we announce).
    pub fn user_addr(&self) -> u64 {
        self.base as u64
    }

    /// The region as announced in SET_MEM_TABLE / ADD_MEM_REG.
    pub fn desc(&self) -> RegionDesc {
        RegionDesc {
            gpa: self.gpa,
            size: self.size,
            user_addr: self.user_addr(),
            mmap_offset: 0,
        }
    }

    fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.gpa && gpa.checked_add(len).is_some_and(|end| end <= self.end())
    }
}

impl Drop for MemRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping created in `new`, unmapped exactly once; no pointer into it
        // outlives the region (GuestMemory hands out copies only).
        unsafe {
            libc::munmap(self.base.cast(), self.size as usize);
        }
    }
}

/// The guest's memory as the test sees it: a set of regions. Cloning shares the regions.
#[derive(Clone, Default)]
pub struct GuestMemory {
    regions: Vec<Arc<MemRegion>>,
}

impl GuestMemory {
    pub fn new(regions: &[Arc<MemRegion>]) -> GuestMemory {
        GuestMemory {
            regions: regions.to_vec(),
        }
    }

    pub fn regions(&self) -> &[Arc<MemRegion>] {
        &self.regions
    }

    pub fn add(&mut self, r: Arc<MemRegion>) {
        self.regions.push(r);
    }

    /// Forgets the region at `gpa` (our mapping stays while someone holds the Arc).
    pub fn remove(&mut self, gpa: u64) -> Option<Arc<MemRegion>> {
        let i = self.regions.iter().position(|r| r.gpa == gpa)?;
        Some(self.regions.remove(i))
    }

    /// Pointer to `len` bytes at `gpa`, which must lie in one region (panics otherwise:
    /// the test addressed memory it does not have).
    fn ptr(&self, gpa: u64, len: u64) -> *mut u8 {
        let r = self
            .regions
            .iter()
            .find(|r| r.contains(gpa, len))
            .unwrap_or_else(|| panic!("test bug: {gpa:#x}+{len:#x} is not inside one region"));
        // SAFETY: gpa - r.gpa + len <= r.size (contains), so the offset stays inside the
        // mapping.
        unsafe { r.base.add((gpa - r.gpa) as usize) }
    }

    /// Whether `gpa..gpa+len` lies inside one region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.regions.iter().any(|r| r.contains(gpa, len))
    }

    /// Our virtual address for `gpa` (for SET_VRING_ADDR), if mapped.
    pub fn user_addr(&self, gpa: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| r.contains(gpa, 1))
            .map(|r| r.user_addr() + (gpa - r.gpa))
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        let p = self.ptr(gpa, data.len() as u64);
        // SAFETY: `p` covers data.len() bytes of our mapping (ptr checked the range); a
        // raw copy does not create references to memory the daemon may write.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let p = self.ptr(gpa, len as u64);
        let mut v = vec![0u8; len];
        // SAFETY: as in write, in the other direction.
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len) };
        v
    }

    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        let p = self.ptr(gpa, len as u64);
        // SAFETY: `p` covers len bytes of our mapping.
        unsafe { std::ptr::write_bytes(p, byte, len) };
    }

    pub fn read_u8(&self, gpa: u64) -> u8 {
        self.read(gpa, 1)[0]
    }

    pub fn write_u16(&self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes());
    }

    pub fn write_u32(&self, gpa: u64, v: u32) {
        self.write(gpa, &v.to_le_bytes());
    }

    pub fn write_u64(&self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes());
    }

    pub fn read_u16(&self, gpa: u64) -> u16 {
        u16::from_le_bytes(self.read(gpa, 2).try_into().expect("2 bytes"))
    }

    pub fn read_u32(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.read(gpa, 4).try_into().expect("4 bytes"))
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        u64::from_le_bytes(self.read(gpa, 8).try_into().expect("8 bytes"))
    }

    /// A ring index shared with the daemon, accessed atomically (`gpa` 2-byte aligned).
    fn atomic_u16(&self, gpa: u64) -> &AtomicU16 {
        assert_eq!(gpa % 2, 0, "unaligned ring index at {gpa:#x}");
        let p = self.ptr(gpa, 2);
        // SAFETY: `p` is 2-byte aligned (gpa is, and regions start page-aligned) and
        // inside a mapping that lives as long as `self` holds its region; AtomicU16 has
        // the size and alignment of u16 and tolerates concurrent access by others.
        unsafe { &*p.cast::<AtomicU16>() }
    }

    pub fn load_u16_acquire(&self, gpa: u64) -> u16 {
        u16::from_le(self.atomic_u16(gpa).load(Ordering::Acquire))
    }

    pub fn store_u16_release(&self, gpa: u64, v: u16) {
        self.atomic_u16(gpa).store(v.to_le(), Ordering::Release);
    }
}

/// One split-ring descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    /// A device-readable buffer.
    pub fn readable(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }

    /// A device-writable buffer.
    pub fn writable(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: VIRTQ_DESC_F_WRITE,
            next: 0,
        }
    }

    /// A descriptor referring to an indirect table of `entries` descriptors at `addr`.
    pub fn indirect(addr: u64, entries: u32) -> Desc {
        Desc {
            addr,
            len: entries * DESC_LEN as u32,
            flags: VIRTQ_DESC_F_INDIRECT,
            next: 0,
        }
    }

    /// The same descriptor chained to `next` (sets NEXT).
    pub fn then(mut self, next: u16) -> Desc {
        self.flags |= VIRTQ_DESC_F_NEXT;
        self.next = next;
        self
    }

    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Desc {
        Desc {
            addr: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            flags: u16::from_le_bytes(b[12..14].try_into().expect("2 bytes")),
            next: u16::from_le_bytes(b[14..16].try_into().expect("2 bytes")),
        }
    }
}

/// Writes `descs` as a table at `gpa` (entry i at gpa + 16 i), links untouched: for
/// indirect tables, or to place a whole table by hand.
pub fn write_table(mem: &GuestMemory, gpa: u64, descs: &[Desc]) {
    let mut bytes = Vec::with_capacity(descs.len() * 16);
    for d in descs {
        bytes.extend_from_slice(&d.to_bytes());
    }
    mem.write(gpa, &bytes);
}

/// Links `descs` with NEXT in order (entry i points to `first + i + 1`; the last one
/// has no NEXT), for a table whose entries start at index `first`.
pub fn linked(descs: &[Desc], first: u16) -> Vec<Desc> {
    let n = descs.len();
    descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if i + 1 < n {
                d.then(first + i as u16 + 1)
            } else {
                *d
            }
        })
        .collect()
}

/// Where a split ring's parts lie in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl RingLayout {
    /// The three parts one after another from `gpa` (16-byte aligned), each aligned as
    /// virtio 1.x requires (16, 2, 4).
    pub fn contiguous(gpa: u64, size: u16) -> RingLayout {
        assert_eq!(gpa % 16, 0, "descriptor table must be 16-byte aligned");
        let n = u64::from(size);
        let desc = gpa;
        let avail = desc + DESC_LEN * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        RingLayout {
            size,
            desc,
            avail,
            used,
        }
    }

    /// Bytes from `desc` to the end of the used ring (for contiguous layouts).
    pub fn total_len(&self) -> u64 {
        self.used + 6 + 8 * u64::from(self.size) - self.desc
    }

    /// Guest address of `used.idx`.
    pub fn used_idx_addr(&self) -> u64 {
        self.used + 2
    }

    /// Guest address of `avail.idx`.
    pub fn avail_idx_addr(&self) -> u64 {
        self.avail + 2
    }
}

/// One element of the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}

/// A non-blocking eventfd (for kick/call/err, or as a stray fd in hostile messages).
pub fn new_eventfd() -> OwnedFd {
    // SAFETY: eventfd has no memory-safety preconditions.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Reads and resets an eventfd; the counter, 0 if it was not signalled.
fn drain_eventfd(fd: &OwnedFd) -> u64 {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a u64 we own from a non-blocking eventfd.
    let r = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    if r == 8 {
        v
    } else {
        0
    }
}

/// One split virtqueue the test drives by hand: its layout, its eventfds and our
/// shadow of `avail.idx`.
pub struct SplitQueue {
    pub index: u32,
    pub layout: RingLayout,
    pub mem: GuestMemory,
    pub kick: OwnedFd,
    pub call: OwnedFd,
    pub err: OwnedFd,
    next_avail: u16,
    used_seen: u16,
    unclaimed: Vec<UsedElem>,
}

impl SplitQueue {
    /// A queue at `layout`, with fresh eventfds; the rings are zeroed. Nothing is sent
    /// (see [`Frontend::start_queue`]).
    pub fn new(index: u32, layout: RingLayout, mem: &GuestMemory) -> SplitQueue {
        let n = u64::from(layout.size);
        mem.fill(layout.desc, (DESC_LEN * n) as usize, 0);
        mem.fill(layout.avail, (6 + 2 * n) as usize, 0);
        mem.fill(layout.used, (6 + 8 * n) as usize, 0);
        SplitQueue {
            index,
            layout,
            mem: mem.clone(),
            kick: new_eventfd(),
            call: new_eventfd(),
            err: new_eventfd(),
            next_avail: 0,
            used_seen: 0,
            unclaimed: Vec::new(),
        }
    }

    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// Writes descriptor `i` of the table (any index: a test may write past the table).
    pub fn write_desc(&self, i: u16, d: Desc) {
        self.mem
            .write(self.layout.desc + DESC_LEN * u64::from(i), &d.to_bytes());
    }

    pub fn read_desc(&self, i: u16) -> Desc {
        Desc::from_bytes(
            &self
                .mem
                .read(self.layout.desc + DESC_LEN * u64::from(i), 16),
        )
    }

    /// The whole descriptor table as bytes (to check it was not corrupted).
    pub fn desc_table_bytes(&self) -> Vec<u8> {
        self.mem.read(
            self.layout.desc,
            (DESC_LEN * u64::from(self.layout.size)) as usize,
        )
    }

    /// Writes `descs` at indices `first..`, linked with NEXT; returns the head (`first`).
    pub fn write_chain(&self, first: u16, descs: &[Desc]) -> u16 {
        for (i, d) in linked(descs, first).into_iter().enumerate() {
            self.write_desc(first + i as u16, d);
        }
        first
    }

    /// Puts `head` in the next avail ring slot and publishes it (avail.idx + 1, release).
    pub fn push_avail(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % self.layout.size);
        self.mem.write_u16(self.layout.avail + 4 + 2 * slot, head);
        fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem
            .store_u16_release(self.layout.avail_idx_addr(), self.next_avail);
    }

    /// Writes avail ring slot `slot` (mod nothing: any slot index the test likes).
    pub fn write_avail_slot(&self, slot: u16, head: u16) {
        self.mem
            .write_u16(self.layout.avail + 4 + 2 * u64::from(slot), head);
    }

    /// Sets `avail.idx` to any value (and our shadow with it).
    pub fn set_avail_idx(&mut self, idx: u16) {
        fence(Ordering::SeqCst);
        self.next_avail = idx;
        self.mem
            .store_u16_release(self.layout.avail_idx_addr(), idx);
    }

    /// Our `avail.idx`.
    pub fn avail_idx(&self) -> u16 {
        self.next_avail
    }

    /// Sets `avail.flags` (1 = VIRTQ_AVAIL_F_NO_INTERRUPT).
    pub fn set_avail_flags(&self, flags: u16) {
        self.mem.write_u16(self.layout.avail, flags);
    }

    /// Notifies the device (writes the kick eventfd).
    pub fn kick(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a u64 we own to our eventfd.
        let r = unsafe { libc::write(self.kick.as_raw_fd(), (&one as *const u64).cast(), 8) };
        assert_eq!(r, 8, "kick: {}", io::Error::last_os_error());
    }

    /// Pushes `head` and kicks.
    pub fn submit(&mut self, head: u16) {
        self.push_avail(head);
        self.kick();
    }

    /// The device's `used.idx` (acquire).
    pub fn used_idx(&self) -> u16 {
        self.mem.load_u16_acquire(self.layout.used_idx_addr())
    }

    /// `used.flags`.
    pub fn used_flags(&self) -> u16 {
        self.mem.read_u16(self.layout.used)
    }

    /// Used ring element in slot `i % size`.
    pub fn used_elem(&self, i: u16) -> UsedElem {
        let at = self.layout.used + 4 + 8 * u64::from(i % self.layout.size);
        UsedElem {
            id: self.mem.read_u32(at),
            len: self.mem.read_u32(at + 4),
        }
    }

    /// Moves elements the device pushed since the last look into our list of unclaimed
    /// ones.
    fn collect_used(&mut self) {
        let idx = self.used_idx();
        while self.used_seen != idx {
            let e = self.used_elem(self.used_seen);
            self.unclaimed.push(e);
            self.used_seen = self.used_seen.wrapping_add(1);
        }
    }

    /// Every used element not claimed yet (by this or [`SplitQueue::wait_for_head`]), in
    /// ring order.
    pub fn take_used(&mut self) -> Vec<UsedElem> {
        self.collect_used();
        std::mem::take(&mut self.unclaimed)
    }

    /// Waits until `used.idx` reaches `target` (wrapping compare); false on timeout.
    pub fn wait_used_idx(&self, target: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let idx = self.used_idx();
            // `target` lies within the next 32768 entries after idx: not yet.
            if target.wrapping_sub(idx) == 0 || target.wrapping_sub(idx) > 0x8000 {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Waits until the used ring holds an unclaimed element for `head`; claims and
    /// returns it, or None on timeout. Elements of other heads stay unclaimed.
    pub fn wait_for_head(&mut self, head: u16, timeout: Duration) -> Option<UsedElem> {
        let deadline = Instant::now() + timeout;
        loop {
            self.collect_used();
            if let Some(i) = self.unclaimed.iter().position(|e| e.id == u32::from(head)) {
                return Some(self.unclaimed.remove(i));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Whether the device signalled the call eventfd since the last check (resets it).
    pub fn take_call(&self) -> bool {
        drain_eventfd(&self.call) > 0
    }

    /// Whether the device signalled the error eventfd (VHOST_USER_SET_VRING_ERR) since
    /// the last check (resets it).
    pub fn take_err(&self) -> bool {
        drain_eventfd(&self.err) > 0
    }
}

/// What [`Frontend::handshake`] asks for.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeOpts {
    /// Virtio features to accept (intersected with what the device offers).
    pub features: u64,
    /// Protocol features to accept (intersected with what the device offers).
    pub protocol: u64,
}

impl Default for HandshakeOpts {
    /// virtio-blk features a simple driver uses, INDIRECT_DESC but no EVENT_IDX (every
    /// request is kicked), and the protocol features for acks, multiqueue, the config space
    /// and memory slots.
    fn default() -> Self {
        HandshakeOpts {
            features: feat::VERSION_1
                | feat::PROTOCOL_FEATURES
                | feat::RING_INDIRECT_DESC
                | feat::BLK_SIZE_MAX
                | feat::BLK_SEG_MAX
                | feat::BLK_BLK_SIZE
                | feat::BLK_FLUSH
                | feat::BLK_TOPOLOGY
                | feat::BLK_CONFIG_WCE
                | feat::BLK_MQ
                | feat::BLK_DISCARD
                | feat::BLK_WRITE_ZEROES,
            protocol: proto::MQ | proto::REPLY_ACK | proto::CONFIG | proto::CONFIGURE_MEM_SLOTS,
        }
    }
}

/// A vhost-user frontend: a connection, the guest memory it announced, and what was
/// negotiated. Every method sends exactly the message it is named after.
pub struct Frontend {
    pub conn: VuConn,
    /// The guest memory the back-end was told about.
    pub mem: GuestMemory,
    /// Features offered by the device (GET_FEATURES) and acked (SET_FEATURES).
    pub offered: u64,
    pub acked: u64,
    /// Protocol features acked (SET_PROTOCOL_FEATURES).
    pub protocol: u64,
}

impl Frontend {
    /// Connects (retrying up to 10 s while the socket is not there or refuses).
    pub fn connect(path: &Path) -> VuResult<Frontend> {
        Ok(Frontend {
            conn: VuConn::connect(path, Duration::from_secs(10))?,
            mem: GuestMemory::default(),
            offered: 0,
            acked: 0,
            protocol: 0,
        })
    }

    /// Whether acks can be requested (REPLY_ACK negotiated).
    pub fn reply_ack(&self) -> bool {
        self.protocol & proto::REPLY_ACK != 0
    }

    /// Sends a request that has a reply and returns the reply (checked to be a REPLY to
    /// the same request code).
    pub fn call(&self, request: u32, payload: &[u8]) -> VuResult<Message> {
        self.conn.send(request, 0, payload, &[])?;
        self.expect_reply(request)
    }

    /// Reads the reply to `request`.
    pub fn expect_reply(&self, request: u32) -> VuResult<Message> {
        let m = self.conn.recv()?;
        if m.request != request || m.flags & FLAG_REPLY == 0 {
            return Err(VuError::BadReply(format!(
                "expected a reply to request {request}, got request {} flags {:#x}",
                m.request, m.flags
            )));
        }
        Ok(m)
    }

    /// Sends a request without a reply of its own; with REPLY_ACK, asks for an ack and
    /// returns `Err(Nack)` if the back-end refused.
    pub fn send_acked(&self, request: u32, payload: &[u8], fds: &[RawFd]) -> VuResult<()> {
        if self.reply_ack() {
            self.conn.send(request, FLAG_NEED_REPLY, payload, fds)?;
            match self.expect_reply(request)?.u64()? {
                0 => Ok(()),
                v => Err(VuError::Nack(v)),
            }
        } else {
            self.conn.send(request, 0, payload, fds)
        }
    }

    pub fn get_features(&mut self) -> VuResult<u64> {
        let f = self.call(req::GET_FEATURES, &[])?.u64()?;
        self.offered = f;
        Ok(f)
    }

    pub fn set_features(&mut self, features: u64) -> VuResult<()> {
        // Sent before REPLY_ACK applies in the usual order; ask for an ack only if it
        // does already.
        self.send_acked(req::SET_FEATURES, &features.to_le_bytes(), &[])?;
        self.acked = features;
        Ok(())
    }

    pub fn get_protocol_features(&self) -> VuResult<u64> {
        self.call(req::GET_PROTOCOL_FEATURES, &[])?.u64()
    }

    pub fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.conn
            .send(req::SET_PROTOCOL_FEATURES, 0, &features.to_le_bytes(), &[])?;
        self.protocol = features;
        Ok(())
    }

    pub fn set_owner(&self) -> VuResult<()> {
        self.send_acked(req::SET_OWNER, &[], &[])
    }

    pub fn get_queue_num(&self) -> VuResult<u64> {
        self.call(req::GET_QUEUE_NUM, &[])?.u64()
    }

    pub fn get_max_mem_slots(&self) -> VuResult<u64> {
        self.call(req::GET_MAX_MEM_SLOTS, &[])?.u64()
    }

    /// The usual opening: GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER,
    /// SET_FEATURES (what `opts` asks for and the device offers).
    pub fn handshake(path: &Path, opts: HandshakeOpts) -> VuResult<Frontend> {
        let mut fe = Frontend::connect(path)?;
        let offered = fe.get_features()?;
        if offered & feat::PROTOCOL_FEATURES != 0 {
            let p = fe.get_protocol_features()?;
            fe.set_protocol_features(p & opts.protocol)?;
        }
        fe.set_owner()?;
        fe.set_features(offered & opts.features)?;
        Ok(fe)
    }

    /// SET_MEM_TABLE with `regions` (one fd each); on success they become [`Frontend::mem`].
    pub fn set_mem_table(&mut self, regions: &[Arc<MemRegion>]) -> VuResult<()> {
        let descs: Vec<RegionDesc> = regions.iter().map(|r| r.desc()).collect();
        let fds: Vec<RawFd> = regions.iter().map(|r| r.fd()).collect();
        self.send_acked(req::SET_MEM_TABLE, &mem_table_payload(&descs), &fds)?;
        self.mem = GuestMemory::new(regions);
        Ok(())
    }

    /// ADD_MEM_REG of one region; on success it joins [`Frontend::mem`].
    pub fn add_mem_reg(&mut self, region: &Arc<MemRegion>) -> VuResult<()> {
        self.send_acked(
            req::ADD_MEM_REG,
            &single_region_payload(&region.desc()),
            &[region.fd()],
        )?;
        self.mem.add(region.clone());
        Ok(())
    }

    /// REM_MEM_REG of one region (no fd); on success it leaves [`Frontend::mem`] (our
    /// mapping stays while the caller holds the region).
    pub fn rem_mem_reg(&mut self, region: &Arc<MemRegion>) -> VuResult<()> {
        self.send_acked(
            req::REM_MEM_REG,
            &single_region_payload(&region.desc()),
            &[],
        )?;
        self.mem.remove(region.gpa());
        Ok(())
    }

    pub fn set_vring_num(&self, index: u32, num: u32) -> VuResult<()> {
        self.send_acked(req::SET_VRING_NUM, &vring_state(index, num), &[])
    }

    pub fn set_vring_base(&self, index: u32, base: u32) -> VuResult<()> {
        self.send_acked(req::SET_VRING_BASE, &vring_state(index, base), &[])
    }

    /// SET_VRING_ADDR with our virtual addresses as they are (le32 index, le32 flags,
    /// le64 desc, le64 used, le64 avail, le64 log).
    pub fn set_vring_addr_va(&self, index: u32, desc: u64, used: u64, avail: u64) -> VuResult<()> {
        let mut p = Vec::with_capacity(40);
        p.extend_from_slice(&index.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&desc.to_le_bytes());
        p.extend_from_slice(&used.to_le_bytes());
        p.extend_from_slice(&avail.to_le_bytes());
        p.extend_from_slice(&0u64.to_le_bytes());
        self.send_acked(req::SET_VRING_ADDR, &p, &[])
    }

    /// SET_VRING_ADDR for a ring at guest addresses `layout` (translated to our virtual
    /// addresses, as a VMM does; panics if the layout is outside our memory).
    pub fn set_vring_addr(&self, index: u32, layout: &RingLayout) -> VuResult<()> {
        let va = |gpa: u64| {
            self.mem
                .user_addr(gpa)
                .unwrap_or_else(|| panic!("test bug: ring address {gpa:#x} is not in memory"))
        };
        self.set_vring_addr_va(index, va(layout.desc), va(layout.used), va(layout.avail))
    }

    fn vring_fd(&self, request: u32, index: u32, fd: Option<RawFd>) -> VuResult<()> {
        let v = u64::from(index) | if fd.is_none() { VRING_NOFD } else { 0 };
        let fds: Vec<RawFd> = fd.into_iter().collect();
        self.send_acked(request, &v.to_le_bytes(), &fds)
    }

    pub fn set_vring_kick(&self, index: u32, fd: Option<RawFd>) -> VuResult<()> {
        self.vring_fd(req::SET_VRING_KICK, index, fd)
    }

    pub fn set_vring_call(&self, index: u32, fd: Option<RawFd>) -> VuResult<()> {
        self.vring_fd(req::SET_VRING_CALL, index, fd)
    }

    pub fn set_vring_err(&self, index: u32, fd: Option<RawFd>) -> VuResult<()> {
        self.vring_fd(req::SET_VRING_ERR, index, fd)
    }

    pub fn set_vring_enable(&self, index: u32, enable: bool) -> VuResult<()> {
        self.send_acked(
            req::SET_VRING_ENABLE,
            &vring_state(index, u32::from(enable)),
            &[],
        )
    }

    /// GET_VRING_BASE (stops the ring); returns the index of the next avail entry the
    /// back-end would have processed.
    pub fn get_vring_base(&self, index: u32) -> VuResult<u32> {
        let m = self.call(req::GET_VRING_BASE, &vring_state(index, 0))?;
        if m.payload.len() != 8 {
            return Err(VuError::BadReply(format!(
                "GET_VRING_BASE: {}-byte payload",
                m.payload.len()
            )));
        }
        Ok(u32::from_le_bytes(
            m.payload[4..8].try_into().expect("4 bytes"),
        ))
    }

    /// GET_CONFIG of `size` bytes at `offset`: the bytes returned (empty if the back-end
    /// refused: it answers with a zero size then).
    pub fn get_config(&self, offset: u32, size: u32) -> VuResult<Vec<u8>> {
        let zeroes = vec![0u8; size as usize];
        let m = self.call(req::GET_CONFIG, &config_payload(offset, size, 0, &zeroes))?;
        if m.payload.len() < 12 {
            return Err(VuError::BadReply(format!(
                "GET_CONFIG reply of {} bytes",
                m.payload.len()
            )));
        }
        let got = u32::from_le_bytes(m.payload[4..8].try_into().expect("4 bytes")) as usize;
        let data = m.payload[12..].to_vec();
        if got != data.len() {
            return Err(VuError::BadReply(format!(
                "GET_CONFIG reply says {got} bytes but carries {}",
                data.len()
            )));
        }
        Ok(data)
    }

    /// SET_CONFIG of `data` at `offset` (acked if REPLY_ACK was negotiated).
    pub fn set_config(&self, offset: u32, data: &[u8]) -> VuResult<()> {
        self.send_acked(
            req::SET_CONFIG,
            &config_payload(offset, data.len() as u32, 0, data),
            &[],
        )
    }

    /// Sets up and starts queue `index` at `layout`, as QEMU does: SET_VRING_NUM,
    /// SET_VRING_BASE 0, SET_VRING_ADDR, SET_VRING_CALL, SET_VRING_ERR, SET_VRING_KICK,
    /// then SET_VRING_ENABLE 1 if protocol features were negotiated. The rings are
    /// zeroed first.
    pub fn start_queue(&self, index: u32, layout: RingLayout) -> VuResult<SplitQueue> {
        let q = SplitQueue::new(index, layout, &self.mem);
        self.setup_queue(&q, 0)?;
        Ok(q)
    }

    /// The messages of [`Frontend::start_queue`] for a queue that exists already (a
    /// restart after GET_VRING_BASE, or after a reconnect), with SET_VRING_BASE `base`;
    /// the rings are left as they are.
    pub fn setup_queue(&self, q: &SplitQueue, base: u32) -> VuResult<()> {
        let index = q.index;
        self.set_vring_num(index, u32::from(q.layout.size))?;
        self.set_vring_base(index, base)?;
        self.set_vring_addr(index, &q.layout)?;
        self.set_vring_call(index, Some(q.call.as_raw_fd()))?;
        self.set_vring_err(index, Some(q.err.as_raw_fd()))?;
        self.set_vring_kick(index, Some(q.kick.as_raw_fd()))?;
        if self.acked & feat::PROTOCOL_FEATURES != 0 {
            self.set_vring_enable(index, true)?;
        }
        Ok(())
    }

    /// GET_INFLIGHT_FD: the back-end creates the in-flight tracking region for
    /// `num_queues` queues of `queue_size` entries and hands it over; it is mapped here.
    pub fn get_inflight_fd(&self, num_queues: u16, queue_size: u16) -> VuResult<InflightRegion> {
        let p = inflight_payload(0, 0, num_queues, queue_size);
        let mut m = self.call(req::GET_INFLIGHT_FD, &p)?;
        if m.payload.len() < 20 || m.fds.len() != 1 {
            return Err(VuError::BadReply(format!(
                "GET_INFLIGHT_FD: {} payload bytes, {} fds",
                m.payload.len(),
                m.fds.len()
            )));
        }
        let u64_at = |o: usize| u64::from_le_bytes(m.payload[o..o + 8].try_into().expect("8"));
        let (size, offset) = (u64_at(0), u64_at(8));
        let nq = u16::from_le_bytes([m.payload[16], m.payload[17]]);
        let qs = u16::from_le_bytes([m.payload[18], m.payload[19]]);
        InflightRegion::map(m.fds.remove(0), size, offset, nq, qs)
    }

    /// SET_INFLIGHT_FD: hands `region` (back) to the back-end.
    pub fn set_inflight_fd(&self, region: &InflightRegion) -> VuResult<()> {
        let p = inflight_payload(
            region.size,
            region.offset,
            region.num_queues,
            region.queue_size,
        );
        self.send_acked(req::SET_INFLIGHT_FD, &p, &[region.fd.as_raw_fd()])
    }
}

/// The payload of GET/SET_INFLIGHT_FD as QEMU sends it: le64 mmap_size, le64
/// mmap_offset, le16 num_queues, le16 queue_size, 4 bytes of padding.
pub fn inflight_payload(size: u64, offset: u64, num_queues: u16, queue_size: u16) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[0..8].copy_from_slice(&size.to_le_bytes());
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b[16..18].copy_from_slice(&num_queues.to_le_bytes());
    b[18..20].copy_from_slice(&queue_size.to_le_bytes());
    b
}

/// The in-flight tracking region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), split-ring
/// format of the vhost-user specification. Per queue, 64-byte aligned:
/// `le64 features; le16 version; le16 desc_num; le16 last_batch_head; le16 used_idx;`
/// then per descriptor `u8 inflight; u8 padding[5]; le16 next; le64 counter`.
pub struct InflightRegion {
    fd: OwnedFd,
    base: *mut u8,
    /// Bytes mapped (from `offset` in the fd).
    pub size: u64,
    pub offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

// SAFETY: `base` is a shared mapping of `size` bytes owned by this struct; it is only
// accessed through raw copies (see MemRegion).
unsafe impl Send for InflightRegion {}

impl InflightRegion {
    /// Bytes of one queue's part for `queue_size` entries.
    pub fn queue_bytes(queue_size: u16) -> u64 {
        (16 + 16 * u64::from(queue_size)).next_multiple_of(64)
    }

    fn map(
        fd: OwnedFd,
        size: u64,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> VuResult<Self> {
        if size == 0 || size < Self::queue_bytes(queue_size) * u64::from(num_queues) {
            return Err(VuError::BadReply(format!(
                "inflight region of {size} bytes for {num_queues} queues of {queue_size}"
            )));
        }
        // SAFETY: a new shared mapping of the fd the back-end sent; it overlaps no
        // existing memory.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(VuError::Io(io::Error::last_os_error()));
        }
        Ok(InflightRegion {
            fd,
            base: base.cast(),
            size,
            offset,
            num_queues,
            queue_size,
        })
    }

    fn check(&self, at: u64, len: usize) {
        assert!(
            at + len as u64 <= self.size,
            "test bug: {at:#x}+{len} is outside the {}-byte inflight region",
            self.size
        );
    }

    /// Reads `len` bytes at byte `at` of the region.
    pub fn read(&self, at: u64, len: usize) -> Vec<u8> {
        self.check(at, len);
        let mut v = vec![0u8; len];
        // SAFETY: at + len <= size (checked), inside our mapping; a raw copy.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(at as usize), v.as_mut_ptr(), len) };
        v
    }

    /// Writes `data` at byte `at` of the region (to corrupt it, for instance).
    pub fn write(&self, at: u64, data: &[u8]) {
        self.check(at, data.len());
        // SAFETY: at + len <= size (checked), inside our mapping; a raw copy.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(at as usize), data.len())
        };
    }

    /// Byte offset of queue `q`'s part.
    pub fn queue_offset(&self, q: u16) -> u64 {
        Self::queue_bytes(self.queue_size) * u64::from(q)
    }

    /// Whether descriptor `head` of queue `q` is marked in flight.
    pub fn is_inflight(&self, q: u16, head: u16) -> bool {
        self.read(self.queue_offset(q) + 16 + 16 * u64::from(head), 1)[0] != 0
    }

    /// The `used_idx` the back-end saved for queue `q`.
    pub fn used_idx(&self, q: u16) -> u16 {
        let b = self.read(self.queue_offset(q) + 14, 2);
        u16::from_le_bytes([b[0], b[1]])
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; no pointer into it escapes.
        unsafe {
            libc::munmap(self.base.cast(), self.size as usize);
        }
    }
}

/// virtio-blk request header (`struct virtio_blk_outhdr`): le32 type, le32 reserved,
/// le64 sector.
pub fn blk_header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// The fields of `struct virtio_blk_config` (virtio 1.2 5.2.4) a test needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub writeback: u8,
    pub num_queues: u16,
}

/// Offset of `writeback` in the config space (the only field a driver may write).
pub const BLK_CONFIG_WRITEBACK: u32 = 32;

impl BlkConfig {
    /// Parses the first 36 bytes of a GET_CONFIG answer.
    pub fn parse(b: &[u8]) -> Option<BlkConfig> {
        if b.len() < 36 {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        Some(BlkConfig {
            capacity: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            writeback: b[32],
            num_queues: u16::from_le_bytes(b[34..36].try_into().expect("2 bytes")),
        })
    }
}

/// A bump allocator over a range of guest memory, for laying out buffers by hand.
#[derive(Debug, Clone)]
pub struct Bump {
    next: u64,
    end: u64,
}

impl Bump {
    pub fn new(start: u64, end: u64) -> Bump {
        Bump { next: start, end }
    }

    /// `len` bytes aligned to `align` (a power of two); panics when the range is full.
    pub fn alloc(&mut self, len: u64, align: u64) -> u64 {
        let at = self.next.next_multiple_of(align);
        assert!(
            at + len <= self.end,
            "test bug: bump allocator full ({len:#x} bytes at {at:#x}, end {:#x})",
            self.end
        );
        self.next = at + len;
        at
    }

    /// Everything handed out so far is free again from `start`.
    pub fn reset(&mut self, start: u64) {
        self.next = start;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_encoding() {
        let l = RingLayout::contiguous(0x1000, 16);
        assert_eq!(l.avail, 0x1000 + 256);
        assert_eq!(l.used, (0x1000 + 256 + 6 + 32u64).next_multiple_of(4));
        let h = encode(req::GET_FEATURES, FLAG_NEED_REPLY, &[1, 2]);
        assert_eq!(&h[..12], &[1, 0, 0, 0, 9, 0, 0, 0, 2, 0, 0, 0]);
        let d = Desc::writable(0x1234, 512).then(7);
        assert_eq!(Desc::from_bytes(&d.to_bytes()), d);
        assert_eq!(d.flags, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT);
    }

    #[test]
    fn guest_memory_round_trip() {
        let r = MemRegion::new(0, 8192);
        let r2 = MemRegion::new(0x10_0000, 4096);
        let mem = GuestMemory::new(&[r, r2]);
        mem.write(4090, b"hello");
        assert_eq!(mem.read(4090, 5), b"hello");
        mem.store_u16_release(0x10_0002, 0xBEEF);
        assert_eq!(mem.load_u16_acquire(0x10_0002), 0xBEEF);
        assert_eq!(mem.read_u16(0x10_0002), 0xBEEF);
        assert!(mem.contains(0x10_0000, 4096));
        assert!(!mem.contains(0x10_0000, 4097));
        assert!(mem.user_addr(0x10_0010).is_some());
    }
}

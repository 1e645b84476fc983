//! The vhost-user backend protocol, as vubd speaks it to one frontend connection
//! (docs/interop/vhost-user.rst in QEMU).
//!
//! vubd handles the protocol itself, on top of virtio-queue (the rings) and
//! vm-memory (guest memory), rather than through vhost-user-backend: it needs the
//! backend channel's socket (to announce resizes), exact control over when a ring is
//! started, enabled and stopped, and protocol features that crate does not offer.
//!
//! - [`wire`]: the message format, with bounded reads and checked descriptor counts;
//! - [`vring`]: a virtqueue and its eventfds;
//! - the device serves the rings on its iothreads' event loops
//!   ([`crate::iothread::event_loop`]);
//! - [`Session`] (here): the protocol state machine: features, the memory table, ring
//!   set-up and teardown, the configuration space, the backend channel.
//!
//! Rules the session keeps for an untrusted frontend: a malformed message is refused
//! (an error reply when the frontend asked for one) and the connection goes on; only
//! a stream that cannot be parsed any more (bad header, oversized or truncated
//! payload) ends the connection. A ring is read or written only between its start
//! (SET_VRING_KICK) and its stop (GET_VRING_BASE), while enabled, and only at
//! addresses that translate into the current memory table.

pub mod chain;
pub mod dirty_log;
pub mod inflight;
pub mod reaper;
pub mod shm;
pub mod sigbus;
pub mod vring;
pub mod wire;

use super::request::Memory;
use dirty_log::DirtyLog;
use inflight::InflightRegion;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use virtio_queue::QueueT;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryRegion, GuestRegionMmap,
};
use vmm_sys_util::eventfd::EventFd;
use vring::Vring;
use wire::{req, Message, WireError};

/// `VHOST_USER_F_PROTOCOL_FEATURES`
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VIRTIO_RING_F_EVENT_IDX`
const F_EVENT_IDX: u64 = 1 << 29;
/// `VHOST_F_LOG_ALL`: the frontend wants every write to guest memory logged.
pub const F_LOG_ALL: u64 = 1 << 26;

/// Protocol feature bits (`VHOST_USER_PROTOCOL_F_*`).
pub mod pf {
    pub const MQ: u64 = 1 << 0;
    pub const LOG_SHMFD: u64 = 1 << 1;
    pub const REPLY_ACK: u64 = 1 << 3;
    pub const BACKEND_REQ: u64 = 1 << 5;
    pub const CONFIG: u64 = 1 << 9;
    pub const INFLIGHT_SHMFD: u64 = 1 << 12;
    pub const RESET_DEVICE: u64 = 1 << 13;
    pub const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
}

/// Memory regions a frontend may add (QEMU's limit for vhost-user).
pub const MAX_MEM_SLOTS: u64 = 509;
/// Regions in one SET_MEM_TABLE.
const MAX_TABLE_REGIONS: usize = 8;
/// The largest configuration space read or write (QEMU's VHOST_USER_MAX_CONFIG_SIZE).
const MAX_CONFIG_SIZE: usize = 256;
/// SET_VRING_KICK/CALL/ERR: the index is in the low byte; this bit says "no fd".
const VRING_NOFD_MASK: u64 = 0x100;

/// What the session needs from the device it serves.
pub trait QueueDevice: Send + Sync + 'static {
    fn num_queues(&self) -> usize;
    fn max_queue_size(&self) -> u16;
    fn features(&self) -> u64;
    fn protocol_features(&self) -> u64;
    /// The configuration space (the session checks offsets against its length).
    fn config_space(&self) -> Vec<u8>;
    /// A write to the configuration space inside its bounds; the device decides
    /// which fields are writable.
    fn set_config(&self, offset: u32, data: &[u8]) -> io::Result<()>;
    /// The frontend stops ring `queue` (GET_VRING_BASE): return once no used element
    /// will be pushed to it any more.
    fn stop_vring(&self, queue: usize);
    /// Ring `queue` started or was enabled: look at it.
    fn queue_started(&self, queue: usize);
    /// The inflight region the device records taken heads in (INFLIGHT_SHMFD).
    fn set_inflight(&self, region: Option<Arc<InflightRegion>>);
    /// Heads of ring `queue` to run again before taking new ones, in order, and the
    /// fetch counter to continue from.
    fn resubmit(&self, queue: usize, heads: Vec<u16>, next_counter: u64);
    /// The dirty log (SET_LOG_BASE), and whether logging is on (VHOST_F_LOG_ALL).
    fn set_dirty_log(&self, log: Option<Arc<DirtyLog>>);
    fn set_logging(&self, on: bool);
    /// The backend channel the frontend gave (SET_BACKEND_REQ_FD).
    fn set_backend_channel(&self, channel: Option<BackendChannel>);
    /// Starts serving `vrings` (on the device's iothreads).
    fn start_serving(&self, vrings: &[Arc<Vring>]) -> io::Result<()>;
    /// Watches `fd`, the kick eventfd of ring `queue`.
    fn watch_kick(&self, queue: usize, fd: RawFd) -> io::Result<()>;
    /// Stops watching `fd` (before it is closed).
    fn unwatch_kick(&self, queue: usize, fd: RawFd);
    /// Stops serving the rings (the connection is over; nothing is in flight).
    fn stop_serving(&self);
    /// The memory table changed: whoever keeps a copy of the old one lets it go (its
    /// regions are unmapped once no request uses them).
    fn memory_changed(&self);
}

/// The backend channel: backend-initiated messages to the frontend.
pub struct BackendChannel {
    sock: UnixStream,
}

impl BackendChannel {
    /// Tells the frontend that the configuration space changed. No reply is asked
    /// for, and the socket does not block: a frontend that stops reading loses the
    /// notification, never the daemon's time.
    pub fn send_config_change(&self) -> std::result::Result<(), WireError> {
        wire::send_message(
            &self.sock,
            wire::backend_req::CONFIG_CHANGE_MSG,
            0,
            &[],
            &[],
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("{name}: {message}")]
    Refused { name: &'static str, message: String },
}

type Result<T> = std::result::Result<T, SessionError>;

fn refused(m: &Message, message: impl Into<String>) -> SessionError {
    SessionError::Refused {
        name: m.name(),
        message: message.into(),
    }
}

/// A guest memory region as the frontend described it.
#[derive(Debug, Clone, Copy)]
struct RegionInfo {
    gpa: u64,
    size: u64,
    user_addr: u64,
}

/// Reads a `VhostUserMemoryRegion` (gpa, size, user address, mmap offset).
fn region_at(b: &[u8], off: usize) -> (RegionInfo, u64) {
    (
        RegionInfo {
            gpa: wire::u64_at(b, off),
            size: wire::u64_at(b, off + 8),
            user_addr: wire::u64_at(b, off + 16),
        },
        wire::u64_at(b, off + 24),
    )
}

/// Checks that `offset..offset+size` lies inside the regular file (or memfd) behind
/// `fd`: touching a shared mapping past the end of its file raises SIGBUS, which
/// would take the whole daemon down. (A frontend that shrinks the file after handing
/// it over can still do that, as with every vhost-user backend; QEMU seals its memfds
/// against shrinking.)
pub fn check_file_range(fd: &OwnedFd, offset: u64, size: u64) -> io::Result<()> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    // SAFETY: fstat writes into the zeroed local struct; the descriptor is ours.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        st
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(bad("the descriptor is not a regular file or memfd".into()));
    }
    let end = offset
        .checked_add(size)
        .ok_or_else(|| bad(format!("{offset:#x}+{size:#x} overflows")))?;
    if end > st.st_size as u64 {
        return Err(bad(format!(
            "{offset:#x}+{size:#x} is beyond the end of the file ({:#x} bytes)",
            st.st_size
        )));
    }
    Ok(())
}

/// Maps one region of guest memory from the frontend's descriptor.
fn map_region(info: &RegionInfo, offset: u64, fd: OwnedFd) -> io::Result<Arc<GuestRegionMmap>> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
    if info.size == 0 {
        return Err(bad("empty memory region"));
    }
    let size = usize::try_from(info.size).map_err(|_| bad("region too large"))?;
    if info.gpa.checked_add(info.size).is_none()
        || info.user_addr.checked_add(info.size).is_none()
        || offset.checked_add(info.size).is_none()
    {
        return Err(bad("region wraps around the address space"));
    }
    check_file_range(&fd, offset, info.size)?;
    let file = std::fs::File::from(fd);
    let mapping = MmapRegionBuilder::new(size)
        .with_file_offset(FileOffset::new(file, offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| io::Error::other(format!("cannot map the region: {e}")))?;
    GuestRegionMmap::new(mapping, GuestAddress(info.gpa))
        .map(Arc::new)
        .ok_or_else(|| bad("region wraps around the guest address space"))
}

/// One frontend connection.
pub struct Session<D: QueueDevice> {
    device: Arc<D>,
    sock: UnixStream,
    mem: GuestMemoryAtomic<Memory>,
    regions: Vec<RegionInfo>,
    vrings: Vec<Arc<Vring>>,
    acked_features: u64,
    acked_protocol: u64,
    inflight: Option<Arc<InflightRegion>>,
    /// Ring addresses as frontend virtual addresses, translated at start.
    ring_addrs: Vec<Option<[u64; 3]>>,
    /// The regions of the current memory table, each with its SIGBUS guard; those
    /// that leave it go to [`reaper`], which unmaps them off the iothreads.
    held: Vec<reaper::Held>,
}

impl<D: QueueDevice> Drop for Session<D> {
    fn drop(&mut self) {
        // The connection's regions go to the reaper; it drops them once the rings
        // (and this session's table, dropped after this) have let go of them.
        reaper::release(std::mem::take(&mut self.held));
    }
}

impl<D: QueueDevice> Session<D> {
    /// Sets up the session for a connected frontend; its device serves the rings.
    pub fn new(
        device: Arc<D>,
        sock: UnixStream,
        mem: GuestMemoryAtomic<Memory>,
    ) -> io::Result<Session<D>> {
        let n = device.num_queues();
        let vrings = (0..n)
            .map(|_| {
                Vring::new(mem.clone(), device.max_queue_size())
                    .map(Arc::new)
                    .map_err(|e| io::Error::other(format!("vring: {e:?}")))
            })
            .collect::<io::Result<Vec<_>>>()?;
        device.start_serving(&vrings)?;
        Ok(Session {
            device,
            sock,
            mem,
            regions: Vec::new(),
            vrings,
            acked_features: 0,
            acked_protocol: 0,
            inflight: None,
            ring_addrs: vec![None; n],
            held: Vec::new(),
        })
    }

    /// A handle that ends the connection from another thread (shutting it down makes
    /// the socket readable, at its end).
    pub fn shutdown_handle(&self) -> io::Result<UnixStream> {
        self.sock.try_clone()
    }

    /// The connection's socket.
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Handles every complete message the frontend has sent, without waiting for
    /// more. Returns the error that ended the stream ([`WireError::Closed`] at its
    /// end).
    pub fn serve_available(
        &mut self,
        reader: &mut wire::MessageReader,
    ) -> std::result::Result<(), WireError> {
        while let Some(msg) = reader.read(&self.sock)? {
            let code = msg.request;
            let need_reply = msg.needs_reply();
            match self.handle(msg) {
                Ok(Handled::Replied) => {}
                Ok(Handled::Done) => self.ack(code, need_reply, true)?,
                Err(SessionError::Wire(e @ WireError::Io(_))) => return Err(e),
                Err(e) => {
                    log::warn!("vhost-user: {e}");
                    self.ack(code, need_reply, false)?;
                }
            }
        }
        Ok(())
    }

    /// Stops every ring and the device's serving of them (the connection is over).
    pub fn close(&mut self) {
        for q in 0..self.vrings.len() {
            self.stop_ring(q);
        }
        self.device.stop_serving();
        self.device.set_backend_channel(None);
    }

    fn reply(&self, code: u32, payload: &[u8], fds: &[RawFd]) -> Result<Handled> {
        wire::send_message(&self.sock, code, wire::FLAG_REPLY, payload, fds)?;
        Ok(Handled::Replied)
    }

    /// The REPLY_ACK answer to a message without a reply of its own.
    fn ack(&self, code: u32, need_reply: bool, ok: bool) -> std::result::Result<(), WireError> {
        if need_reply && self.acked_protocol & pf::REPLY_ACK != 0 {
            let status: u64 = if ok { 0 } else { 1 };
            wire::send_message(
                &self.sock,
                code,
                wire::FLAG_REPLY,
                &status.to_le_bytes(),
                &[],
            )?;
        }
        Ok(())
    }

    fn vring_index(&self, m: &Message, raw: u64) -> Result<usize> {
        let q = usize::try_from(raw).unwrap_or(usize::MAX);
        if q < self.vrings.len() {
            Ok(q)
        } else {
            Err(refused(m, format!("no queue {raw}")))
        }
    }

    fn handle(&mut self, mut m: Message) -> Result<Handled> {
        let code = m.request;
        log::debug!(
            "vhost-user: {} {:02x?} ({} fd(s))",
            m.name(),
            &m.payload[..m.payload.len().min(16)],
            m.fds.len()
        );
        // Only these carry descriptors; any other message with some is refused.
        if !matches!(
            code,
            req::SET_MEM_TABLE
                | req::ADD_MEM_REG
                | req::SET_VRING_KICK
                | req::SET_VRING_CALL
                | req::SET_VRING_ERR
                | req::SET_BACKEND_REQ_FD
                | req::SET_LOG_BASE
                | req::SET_LOG_FD
                | req::SET_INFLIGHT_FD
                | req::GET_INFLIGHT_FD
        ) {
            m.expect_no_fds()?;
        }
        match code {
            req::GET_FEATURES => {
                m.expect_size(0)?;
                self.reply(code, &self.device.features().to_le_bytes(), &[])
            }
            req::SET_FEATURES => {
                m.expect_size(8)?;
                let f = m.u64_at(0);
                let offered = self.device.features();
                if f & !offered != 0 {
                    return Err(refused(&m, format!("features {f:#x} were not offered")));
                }
                self.acked_features = f;
                if f & F_LOG_ALL != 0 && self.acked_protocol & pf::LOG_SHMFD == 0 {
                    log::warn!("vhost-user: VHOST_F_LOG_ALL without LOG_SHMFD: no log to write");
                }
                self.device.set_logging(f & F_LOG_ALL != 0);
                for v in &self.vrings {
                    v.lock().get_queue_mut().set_event_idx(f & F_EVENT_IDX != 0);
                }
                Ok(Handled::Done)
            }
            req::GET_PROTOCOL_FEATURES => {
                m.expect_size(0)?;
                let pf = self.device.protocol_features();
                self.reply(code, &pf.to_le_bytes(), &[])
            }
            req::SET_PROTOCOL_FEATURES => {
                m.expect_size(8)?;
                let f = m.u64_at(0);
                if f & !self.device.protocol_features() != 0 {
                    return Err(refused(&m, format!("protocol features {f:#x} not offered")));
                }
                self.acked_protocol = f;
                Ok(Handled::Done)
            }
            req::SET_OWNER => {
                m.expect_size(0)?;
                Ok(Handled::Done)
            }
            req::RESET_OWNER | req::RESET_DEVICE => {
                m.expect_size(0)?;
                for q in 0..self.vrings.len() {
                    self.stop_ring(q);
                    self.vrings[q].lock().reset();
                    self.ring_addrs[q] = None;
                }
                self.acked_features = 0;
                self.device.set_logging(false);
                self.device.set_dirty_log(None);
                Ok(Handled::Done)
            }
            req::GET_QUEUE_NUM => {
                m.expect_size(0)?;
                let n = self.vrings.len() as u64;
                self.reply(code, &n.to_le_bytes(), &[])
            }
            req::GET_MAX_MEM_SLOTS => {
                m.expect_size(0)?;
                self.reply(code, &MAX_MEM_SLOTS.to_le_bytes(), &[])
            }
            req::SET_MEM_TABLE => self.set_mem_table(m),
            req::ADD_MEM_REG => self.add_mem_region(m),
            req::REM_MEM_REG => self.remove_mem_region(m),
            req::SET_VRING_NUM => {
                m.expect_size(8)?;
                let q = self.vring_index(&m, u64::from(m.u32_at(0)))?;
                let num = m.u32_at(4);
                let max = u32::from(self.device.max_queue_size());
                if num == 0 || num > max || !num.is_power_of_two() {
                    return Err(refused(&m, format!("queue size {num} (max {max})")));
                }
                self.not_started(&m, q)?;
                self.vrings[q].lock().get_queue_mut().set_size(num as u16);
                Ok(Handled::Done)
            }
            req::SET_VRING_ADDR => {
                m.expect_size(40)?;
                let q = self.vring_index(&m, u64::from(m.u32_at(0)))?;
                // desc, used, avail (frontend virtual addresses). The flags' LOG bit and
                // the log address are not needed: vubd logs the used ring at the guest
                // address it translated itself.
                let addrs = [m.u64_at(8), m.u64_at(16), m.u64_at(24)];
                let old = self.ring_addrs[q].replace(addrs);
                if self.vrings[q].lock().is_started() && old != Some(addrs) {
                    // QEMU resends the addresses of running rings when it turns
                    // logging on for a migration (and aborts if that fails); new
                    // addresses on a running ring take effect at once.
                    self.set_ring_addresses(q)
                        .map_err(|e| refused(&m, format!("queue {q}: {e}")))?;
                }
                Ok(Handled::Done)
            }
            req::SET_VRING_BASE => {
                m.expect_size(8)?;
                let q = self.vring_index(&m, u64::from(m.u32_at(0)))?;
                let base = m.u32_at(4);
                let Ok(base) = u16::try_from(base) else {
                    return Err(refused(
                        &m,
                        format!("base {base} is not a split-ring index"),
                    ));
                };
                self.not_started(&m, q)?;
                self.vrings[q].lock().get_queue_mut().set_next_avail(base);
                Ok(Handled::Done)
            }
            req::GET_VRING_BASE => {
                m.expect_size(8)?;
                let q = self.vring_index(&m, u64::from(m.u32_at(0)))?;
                self.stop_ring(q);
                let (next, used) = {
                    let v = self.vrings[q].lock();
                    (v.get_queue().next_avail(), v.get_queue().next_used())
                };
                log::debug!("vhost-user: queue {q} stopped at available {next}, used {used}");
                let mut out = [0u8; 8];
                out[0..4].copy_from_slice(&(q as u32).to_le_bytes());
                out[4..8].copy_from_slice(&u32::from(next).to_le_bytes());
                self.reply(code, &out, &[])
            }
            req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => {
                m.expect_size(8)?;
                let raw = m.u64_at(0);
                let q = self.vring_index(&m, raw & 0xff)?;
                let fd = if raw & VRING_NOFD_MASK != 0 {
                    m.expect_no_fds()?;
                    None
                } else {
                    Some(eventfd_from(m.take_one_fd()?))
                };
                match code {
                    req::SET_VRING_KICK => self.set_kick(q, fd),
                    req::SET_VRING_CALL => {
                        let mut v = self.vrings[q].lock();
                        v.set_call(fd);
                        // A frontend that reconnects may have missed the interrupt for
                        // completions the previous daemon pushed just before it died:
                        // signal once, as libvhost-user does.
                        let _ = v.signal_used_queue();
                        Ok(Handled::Done)
                    }
                    _ => {
                        self.vrings[q].lock().set_err(fd);
                        Ok(Handled::Done)
                    }
                }
            }
            req::SET_VRING_ENABLE => {
                m.expect_size(8)?;
                if self.acked_features & F_PROTOCOL_FEATURES == 0 {
                    return Err(refused(&m, "protocol features were not negotiated"));
                }
                let q = self.vring_index(&m, u64::from(m.u32_at(0)))?;
                let on = match m.u32_at(4) {
                    0 => false,
                    1 => true,
                    v => return Err(refused(&m, format!("enable value {v}"))),
                };
                self.vrings[q].lock().set_enabled(on);
                if on {
                    self.device.queue_started(q);
                }
                Ok(Handled::Done)
            }
            req::GET_CONFIG => {
                m.expect_min_size(12)?;
                let (offset, size, flags) = (m.u32_at(0), m.u32_at(4), m.u32_at(8));
                let space = self.device.config_space();
                let range = config_range(offset, size, space.len(), m.payload.len());
                let mut out = Vec::with_capacity(12 + MAX_CONFIG_SIZE);
                out.extend_from_slice(&offset.to_le_bytes());
                match range {
                    Some(r) => {
                        out.extend_from_slice(&size.to_le_bytes());
                        out.extend_from_slice(&flags.to_le_bytes());
                        out.extend_from_slice(&space[r]);
                    }
                    None => {
                        // A reply whose size does not match the request: QEMU takes
                        // it as the failure it is.
                        log::warn!(
                            "vhost-user: GET_CONFIG of {size} bytes at {offset} is outside \
                             the {}-byte configuration space",
                            space.len()
                        );
                        out.extend_from_slice(&0u32.to_le_bytes());
                        out.extend_from_slice(&flags.to_le_bytes());
                    }
                }
                self.reply(code, &out, &[])
            }
            req::SET_CONFIG => {
                m.expect_min_size(12)?;
                let (offset, size) = (m.u32_at(0), m.u32_at(4));
                let len = self.device.config_space().len();
                let Some(r) = config_range(offset, size, len, m.payload.len()) else {
                    return Err(refused(
                        &m,
                        format!("{size} bytes at {offset} outside the {len}-byte space"),
                    ));
                };
                let data = &m.payload[12..12 + r.len()];
                self.device
                    .set_config(offset, data)
                    .map_err(|e| refused(&m, e.to_string()))?;
                Ok(Handled::Done)
            }
            req::GET_INFLIGHT_FD | req::SET_INFLIGHT_FD => self.inflight_fd(m),
            req::SET_LOG_BASE => {
                if self.acked_protocol & pf::LOG_SHMFD == 0 {
                    return Err(refused(&m, "LOG_SHMFD was not negotiated"));
                }
                m.expect_size(16)?;
                let (size, offset) = (m.u64_at(0), m.u64_at(8));
                let fd = m.take_one_fd()?;
                check_file_range(&fd, offset, size).map_err(|e| refused(&m, e.to_string()))?;
                let log =
                    DirtyLog::map(fd, offset, size).map_err(|e| refused(&m, e.to_string()))?;
                self.device.set_dirty_log(Some(Arc::new(log)));
                // The frontend waits for this reply (a u64 of zero) before it relies
                // on the new log.
                self.reply(code, &0u64.to_le_bytes(), &[])
            }
            req::SET_LOG_FD => {
                // An eventfd to signal log updates with; vubd marks the log
                // synchronously and has nothing to signal.
                m.expect_size(0)?;
                drop(m.take_one_fd()?);
                Ok(Handled::Done)
            }
            req::SET_BACKEND_REQ_FD => {
                m.expect_size(0)?;
                let fd = m.take_one_fd()?;
                let sock = UnixStream::from(fd);
                // A frontend that never reads the channel must not block the daemon.
                sock.set_nonblocking(true)
                    .map_err(|e| refused(&m, e.to_string()))?;
                self.device
                    .set_backend_channel(Some(BackendChannel { sock }));
                Ok(Handled::Done)
            }
            _ => Err(refused(&m, format!("unsupported request {code}"))),
        }
    }

    /// GET_INFLIGHT_FD (a new region) and SET_INFLIGHT_FD (the region back after a
    /// reconnect or a restart of the rings).
    fn inflight_fd(&mut self, mut m: Message) -> Result<Handled> {
        if self.acked_protocol & pf::INFLIGHT_SHMFD == 0 {
            return Err(refused(&m, "INFLIGHT_SHMFD was not negotiated"));
        }
        m.expect_size(24)?;
        let (size, offset) = (m.u64_at(0), m.u64_at(8));
        let num_queues = u16::from_le_bytes([m.payload[16], m.payload[17]]);
        let queue_size = u16::from_le_bytes([m.payload[18], m.payload[19]]);
        if usize::from(num_queues) > self.vrings.len() || queue_size > self.device.max_queue_size()
        {
            return Err(refused(
                &m,
                format!("{num_queues} queues of {queue_size} entries"),
            ));
        }
        if m.request == req::GET_INFLIGHT_FD {
            m.expect_no_fds()?;
            let region = InflightRegion::create(num_queues, queue_size)
                .map_err(|e| refused(&m, e.to_string()))?;
            let mut out = [0u8; 24];
            out[0..8].copy_from_slice(&region.len().to_le_bytes());
            out[16..18].copy_from_slice(&num_queues.to_le_bytes());
            out[18..20].copy_from_slice(&queue_size.to_le_bytes());
            let fd = region.fd().as_raw_fd();
            self.reply(m.request, &out, &[fd])?;
            // The frontend keeps the region; this connection uses it from now on.
            let region = Arc::new(region);
            self.device.set_inflight(Some(region.clone()));
            self.inflight = Some(region);
            return Ok(Handled::Replied);
        }
        let fd = m.take_one_fd()?;
        let need = inflight::queue_region_size(queue_size) * u64::from(num_queues);
        check_file_range(&fd, offset, need.min(size)).map_err(|e| refused(&m, e.to_string()))?;
        let region = InflightRegion::open(fd, offset, size, num_queues, queue_size)
            .map_err(|e| refused(&m, e.to_string()))?;
        let region = Arc::new(region);
        self.device.set_inflight(Some(region.clone()));
        self.inflight = Some(region);
        Ok(Handled::Done)
    }

    fn not_started(&self, m: &Message, q: usize) -> Result<()> {
        if self.vrings[q].lock().is_started() {
            Err(refused(m, format!("queue {q} is running")))
        } else {
            Ok(())
        }
    }

    /// Translates a frontend virtual address to a guest physical one.
    fn vva_to_gpa(&self, vva: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = vva.checked_sub(r.user_addr)?;
            (off.checked_add(len)? <= r.size).then(|| r.gpa + off)
        })
    }

    /// SET_VRING_KICK: a new kick eventfd; the ring starts.
    fn set_kick(&mut self, q: usize, fd: Option<EventFd>) -> Result<Handled> {
        // The ring's lock is not held while the device (re)registers the descriptor
        // with an iothread: the iothread takes ring locks.
        let raw = fd.as_ref().map(|f| f.as_raw_fd());
        let old = self.vrings[q].lock().set_kick(fd);
        if let Some(old) = &old {
            self.device.unwatch_kick(q, old.as_raw_fd());
        }
        drop(old);
        if let Some(raw) = raw {
            if let Err(e) = self.device.watch_kick(q, raw) {
                drop(self.vrings[q].lock().set_kick(None));
                return Err(SessionError::Refused {
                    name: "SET_VRING_KICK",
                    message: format!("cannot wait on the kick descriptor: {e}"),
                });
            }
        }
        self.start_ring(q);
        Ok(Handled::Done)
    }

    /// Starts ring `q` if its addresses translate and fit its size in guest memory.
    fn start_ring(&mut self, q: usize) {
        if self.ring_addrs[q].is_none() {
            log::warn!("vhost-user: queue {q} kicked before its addresses were set");
            return;
        }
        let protocol = self.acked_features & F_PROTOCOL_FEATURES != 0;
        if let Err(e) = self.set_ring_addresses(q) {
            log::warn!("vhost-user: queue {q}: {e}");
            return;
        }
        let mut v = self.vrings[q].lock();
        let queue = v.get_queue_mut();
        let mem = self.mem.memory();
        // Continue where the used ring stands: after a reconnect the frontend rewinds
        // the available index to it.
        let used_idx = queue
            .used_idx(&*mem, std::sync::atomic::Ordering::Acquire)
            .map(|w| w.0)
            .unwrap_or(0);
        queue.set_next_used(used_idx);
        // With inflight tracking, exactly the heads taken and not returned run again,
        // and the available index continues past them: every head taken since the
        // used index is either returned (counted in it) or in flight.
        let track = self.inflight.as_ref().and_then(|r| {
            (usize::from(r.queue_size()) == usize::from(queue.size()))
                .then(|| r.queue(q))
                .flatten()
        });
        if let Some(t) = track {
            let (heads, next) = t.recover(used_idx);
            queue.set_next_avail(used_idx.wrapping_add(heads.len() as u16));
            self.device.resubmit(q, heads, next);
        } else {
            self.device.resubmit(q, Vec::new(), 0);
        }
        log::debug!(
            "vhost-user: queue {q} starts at available {}, used {used_idx}",
            v.get_queue().next_avail()
        );
        v.set_started(true);
        if !protocol {
            v.set_enabled(true);
        }
        drop(v);
        self.device.queue_started(q);
    }

    /// Translates ring `q`'s addresses into guest physical ones and gives them to its
    /// queue, which becomes ready if they fit its size in guest memory.
    fn set_ring_addresses(&self, q: usize) -> std::result::Result<(), String> {
        let [desc, used, avail] = self.ring_addrs[q].ok_or("no ring addresses")?;
        let mut v = self.vrings[q].lock();
        let size = u64::from(v.get_queue().size());
        let gpas = (
            self.vva_to_gpa(desc, 16 * size),
            self.vva_to_gpa(avail, 6 + 2 * size),
            self.vva_to_gpa(used, 6 + 8 * size),
        );
        let (Some(d), Some(a), Some(u)) = gpas else {
            v.signal_error();
            return Err("ring addresses are outside guest memory".into());
        };
        let queue = v.get_queue_mut();
        queue.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
        queue.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
        queue.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
        let mem = self.mem.memory();
        queue.set_ready(true);
        if !queue.is_valid(&*mem) {
            queue.set_ready(false);
            v.signal_error();
            return Err("the ring does not fit in guest memory".into());
        }
        Ok(())
    }

    /// Stops ring `q`: no more reads or writes of it; the device lets go of it.
    fn stop_ring(&mut self, q: usize) {
        let was = {
            let mut v = self.vrings[q].lock();
            let was = v.is_started();
            v.set_started(false);
            v.get_queue_mut().set_ready(false);
            was
        };
        if was {
            self.device.stop_vring(q);
        }
        let old = {
            let mut v = self.vrings[q].lock();
            v.set_call(None);
            v.set_kick(None)
        };
        if let Some(old) = &old {
            self.device.unwatch_kick(q, old.as_raw_fd());
        }
    }

    fn set_mem_table(&mut self, mut m: Message) -> Result<Handled> {
        m.expect_min_size(8)?;
        let n = m.u32_at(0) as usize;
        if n == 0 || n > MAX_TABLE_REGIONS {
            return Err(refused(&m, format!("{n} regions")));
        }
        m.expect_size(8 + 32 * n)?;
        if m.fds.len() != n {
            return Err(WireError::BadFds {
                name: m.name(),
                got: m.fds.len(),
                want: "one per region",
            }
            .into());
        }
        let fds = std::mem::take(&mut m.fds);
        let mut infos = Vec::with_capacity(n);
        let mut regions = Vec::with_capacity(n);
        // Kept only once the table is taken: a refused one is unmapped at once (the
        // frontend still has its files; nothing was published).
        let mut fresh = Vec::with_capacity(n);
        for (i, fd) in fds.into_iter().enumerate() {
            let (info, offset) = region_at(&m.payload, 8 + 32 * i);
            let r = map_region(&info, offset, fd).map_err(|e| refused(&m, e.to_string()))?;
            fresh.push(reaper::Held::new(&r));
            infos.push(info);
            regions.push(r);
        }
        regions.sort_by_key(|r| r.start_addr());
        let mem = Memory::from_arc_regions(regions)
            .map_err(|e| refused(&m, format!("bad memory table: {e}")))?;
        self.held.append(&mut fresh);
        self.replace_memory(mem, infos);
        Ok(Handled::Done)
    }

    fn add_mem_region(&mut self, mut m: Message) -> Result<Handled> {
        m.expect_size(40)?;
        let fd = m.take_one_fd()?;
        let (info, offset) = region_at(&m.payload, 8);
        if self.regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(refused(&m, "no free memory slot"));
        }
        let r = map_region(&info, offset, fd).map_err(|e| refused(&m, e.to_string()))?;
        let fresh = reaper::Held::new(&r);
        let current = self.mem.memory();
        let mem = if self.regions.is_empty() {
            Memory::from_arc_regions(vec![r])
        } else {
            current.insert_region(r)
        }
        .map_err(|e| refused(&m, format!("cannot add the region: {e}")))?;
        drop(current);
        self.held.push(fresh);
        let mut infos = self.regions.clone();
        infos.push(info);
        self.replace_memory(mem, infos);
        Ok(Handled::Done)
    }

    fn remove_mem_region(&mut self, mut m: Message) -> Result<Handled> {
        m.expect_size(40)?;
        // QEMU sends the region's descriptor along; it is not needed.
        m.fds.clear();
        let (info, _) = region_at(&m.payload, 8);
        let Some(i) = self
            .regions
            .iter()
            .position(|r| r.gpa == info.gpa && r.size == info.size)
        else {
            return Err(refused(&m, format!("no region at {:#x}", info.gpa)));
        };
        let current = self.mem.memory();
        let (mem, _) = current
            .remove_region(GuestAddress(info.gpa), info.size)
            .map_err(|e| refused(&m, format!("cannot remove the region: {e}")))?;
        drop(current);
        let mut infos = self.regions.clone();
        infos.remove(i);
        self.replace_memory(mem, infos);
        Ok(Handled::Done)
    }

    /// Publishes a new memory table. Requests in flight keep the old mappings alive
    /// (each holds the table it was parsed against); rings that no longer translate
    /// are stopped.
    fn replace_memory(&mut self, mem: Memory, infos: Vec<RegionInfo>) {
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(mem);
        self.device.memory_changed();
        self.regions = infos;
        // Regions no longer in the table go once no request or registration holds
        // them, unmapped by the reaper (freeing a departed frontend's memory can take
        // long), guarded until then.
        let mem = self.mem.memory();
        let (kept, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| mem.iter().any(|r| h.is(r)));
        self.held = kept;
        reaper::release(gone);
        let n = sigbus::take_recovered();
        if n > 0 {
            log::warn!(
                "vhost-user: the frontend truncated shared memory under the daemon; {n} \
                 page(s) were replaced by zero pages"
            );
        }
        for (q, v) in self.vrings.iter().enumerate() {
            let mut v = v.lock();
            if v.is_started() && !v.get_queue().is_valid(&*mem) {
                log::warn!("vhost-user: queue {q}: its ring is no longer in guest memory");
                v.get_queue_mut().set_ready(false);
                v.signal_error();
            }
        }
    }
}

/// The byte range of the configuration space a GET/SET_CONFIG addresses, if valid:
/// inside the space, at most 256 bytes, and matching the payload's length.
fn config_range(
    offset: u32,
    size: u32,
    space: usize,
    payload: usize,
) -> Option<std::ops::Range<usize>> {
    let (offset, size) = (offset as usize, size as usize);
    let end = offset.checked_add(size)?;
    (size <= MAX_CONFIG_SIZE && end <= space && payload == 12 + size).then_some(offset..end)
}

fn eventfd_from(fd: OwnedFd) -> EventFd {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the descriptor is ours (received from the frontend) and EventFd takes
    // ownership of it; should it not be an eventfd, reads and writes on it fail
    // harmlessly.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

/// How a message was answered.
enum Handled {
    /// It had a reply of its own, sent.
    Replied,
    /// Done; a REPLY_ACK answer follows if the frontend asked for one.
    Done,
}

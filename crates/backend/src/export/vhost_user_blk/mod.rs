//! The vhost-user-blk export: one UNIX socket each, serving one node to one frontend
//! at a time; when the frontend goes away the export waits for the next one.
//!
//! - [`device`]: the virtio-blk device of one connection and its iothread loop
//! - [`request`]: parsing a descriptor chain into a validated request
//! - [`config_space`]: `struct virtio_blk_config`
//! - [`vhost_user`]: the vhost-user protocol (messages, vrings, inflight, dirty log)
//! - [`server`]: the one thread that accepts frontends and handles their messages
//!
//! The error policies (`rerror`/`werror`, virtio-blk device properties in QEMU), the
//! write cache mode and the statistics are the export's [`BlockBackend`]'s.

pub mod config_space;
pub mod device;
pub mod guest_pins;
pub mod request;
pub mod server;
pub mod vhost_user;

use super::Export;
use crate::config::ExportConfig;
use crate::iothread::IoThread;
use crate::logging::RateLimiter;
use crate::metrics::counters::{ExportCounters, QueueSample};
use blocklayer::backend::BlockBackend;
use blocklayer::edge::NodeRef;
use config_space::BlkConfig;
use device::BlkDevice;
use request::{DeviceLimits, ID_BYTES, SECTOR};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Largest data segment the guest may use (`size_max`), at most.
const SIZE_MAX: u32 = 4 << 20;

/// `size_max` for a given `seg_max`: some frontends (libblkio) compute the largest
/// transfer as `size_max * seg_max` in an i32, so keep the product below 2^31.
fn size_max_for(seg_max: u32) -> u32 {
    let cap = (i32::MAX as u32 / seg_max.max(1)) & !4095;
    SIZE_MAX.min(cap.max(4096))
}
/// Discard/write-zeroes limits advertised in the config space.
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
const MAX_DISCARD_SEG: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum VhostUserBlkError {
    #[error("socket '{0}' is in use by another process")]
    SocketInUse(PathBuf),
    #[error("cannot listen on '{path}': {message}")]
    Listen { path: PathBuf, message: String },
    #[error("{0}")]
    Fd(#[from] crate::listen_fd::FdError),
    #[error("cannot start the vhost-user daemon: {0}")]
    Daemon(String),
    /// The thread that serves the socket could not start.
    #[error("{0}")]
    Thread(std::io::Error),
}

pub type Result<T> = std::result::Result<T, VhostUserBlkError>;

/// What every connection of an export shares, including requests in flight.
pub struct ExportShared {
    pub id: String,
    /// The export's handle on its node (QEMU's BlockBackend): its root edge, with
    /// consistent-read (and write, if writable) taken and everything shared; the
    /// error policies, the I/O status and stop state they leave (while stopped by an
    /// error no new requests are taken and failed ones are held until `cont`), the
    /// guest's write cache mode (`writeback` in the config space, which the guest may
    /// change) and the I/O statistics.
    pub blk: BlockBackend,
    pub num_queues: u16,
    pub queue_size: u16,
    pub writable: bool,
    pub fixed_iothread: bool,
    /// `pin-guest-memory=on`: register the frontend's memory with the iothreads'
    /// io_uring ([`blocklayer::aio::fixed`]).
    pub pin_guest_memory: bool,
    /// Set while no frontend is connected (held requests give up).
    pub frontend_gone: AtomicBool,
    pub logical_block_size: u32,
    pub serial: [u8; ID_BYTES],
    /// The iothreads that serve the export's queues (queue `q` on `q % n`); changed
    /// by `x-blockdev-set-iothread`.
    iothreads: Mutex<Vec<Arc<IoThread>>>,
    stopping: AtomicBool,
    /// Set while a control command works on the export: no new requests are taken.
    paused: AtomicBool,
    /// Iothread passes currently inside their pop section (see [`PopGate`]), one
    /// counter per iothread slot, each on cache lines of its own.
    poppers: [PaddedCount; POP_SLOTS],
    /// The connected frontend, if any: its device and a handle that drops it.
    connection: Mutex<Option<(Weak<BlkDevice>, Option<UnixStream>)>>,
    /// Log budgets per kind of event, so that a frontend cannot flood the log.
    pub log_limits: ExportLogLimits,
    /// Request counters per queue (`--metrics`), for the life of the export.
    pub counters: ExportCounters,
}

/// Lines per second an export logs of one kind of event, at most.
const EXPORT_LINES_PER_SEC: u32 = 5;

/// An export's log budgets (see [`crate::logging`]).
pub struct ExportLogLimits {
    /// Broken rings, failed used-ring updates and notifications.
    pub ring: RateLimiter,
    /// Invalid requests, status bytes that cannot be written.
    pub request: RateLimiter,
    /// Failed I/O.
    pub io_error: RateLimiter,
}

impl ExportLogLimits {
    fn new() -> Self {
        ExportLogLimits {
            ring: RateLimiter::new(EXPORT_LINES_PER_SEC),
            request: RateLimiter::new(EXPORT_LINES_PER_SEC),
            io_error: RateLimiter::new(EXPORT_LINES_PER_SEC),
        }
    }
}

/// Marks an iothread pass that may pop new requests. Whoever stops an export or a
/// connection first raises its flag, then waits until no pass is inside the gate and
/// nothing is in flight: a pass either saw the flag (and popped nothing) or is counted
/// here until its pops are counted in flight. Both sides use SeqCst so that one of the
/// two always sees the other.
pub struct PopGate<'a>(&'a AtomicUsize);

/// Pop-gate counters per export (iothreads beyond this share them).
const POP_SLOTS: usize = 8;

#[derive(Default)]
#[repr(align(128))]
pub struct PaddedCount(AtomicUsize);

impl<'a> PopGate<'a> {
    /// Enters the gate as the export's iothread number `slot`.
    pub fn enter(shared: &'a ExportShared, slot: usize) -> Self {
        let c = &shared.poppers[slot % POP_SLOTS].0;
        c.fetch_add(1, Ordering::SeqCst);
        PopGate(c)
    }
}

impl Drop for PopGate<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ExportShared {
    /// The export's node now (the root of its backend, which a snapshot or the
    /// pivot of a job may change).
    pub fn node(&self) -> NodeRef {
        self.blk.node()
    }

    pub fn is_writable(&self) -> bool {
        self.writable && !self.node().is_read_only()
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Whether iothread passes may take new requests from the rings.
    pub fn is_accepting(&self) -> bool {
        !self.stopping.load(Ordering::SeqCst)
            && !self.paused.load(Ordering::SeqCst)
            && !self.blk.is_error_stopped()
    }

    /// The guest changed its write cache mode (VIRTIO_BLK_F_CONFIG_WCE).
    pub fn set_write_cache(&self, on: bool) {
        let old = self.blk.set_write_cache(on);
        if old != on {
            log::info!(
                "export {}: guest turned the write cache {}",
                self.id,
                if on { "on" } else { "off" }
            );
        }
    }

    /// `cont`: retries the held requests and takes new ones again. Returns whether the
    /// export was stopped.
    pub fn cont(&self) -> bool {
        let was = self.blk.cont();
        if let Some(d) = self.device() {
            d.wake_all();
        }
        was
    }

    /// The iothreads now serving the export.
    pub fn iothreads(&self) -> Vec<Arc<IoThread>> {
        self.iothreads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The event loops of the export's iothreads.
    pub fn loops(&self) -> Vec<Arc<crate::iothread::event_loop::EventLoop>> {
        self.iothreads()
            .iter()
            .map(|t| t.event_loop().clone())
            .collect()
    }

    /// Replaces the export's iothreads (the export is paused); a connected frontend's
    /// rings move at once.
    pub fn set_iothreads(&self, threads: Vec<Arc<IoThread>>) {
        // The old iothreads live until the rings have left them (an implicit one
        // stops when dropped).
        let _old = std::mem::replace(
            &mut *self.iothreads.lock().unwrap_or_else(|p| p.into_inner()),
            threads,
        );
        if let Some(d) = self.device() {
            if let Err(e) = d.rehome() {
                log::error!("export {}: cannot move to the new iothread: {e}", self.id);
            }
        }
    }

    fn connection(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<(Weak<BlkDevice>, Option<UnixStream>)>> {
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device of the connected frontend, if any.
    pub fn device(&self) -> Option<Arc<BlkDevice>> {
        self.connection().as_ref().and_then(|(d, _)| d.upgrade())
    }

    /// Records the connected frontend's device and a handle that drops it.
    fn set_connection(&self, device: &Arc<BlkDevice>, handle: UnixStream) {
        *self.connection() = Some((Arc::downgrade(device), Some(handle)));
    }

    /// The frontend has gone.
    fn clear_connection(&self) {
        *self.connection() = None;
    }

    /// Requests in flight (summed over the connected frontend's queues).
    pub fn in_flight(&self) -> u64 {
        self.device()
            .map(|d| d.queue_in_flight().iter().sum())
            .unwrap_or(0)
    }

    /// Whether a frontend is connected.
    pub fn is_connected(&self) -> bool {
        self.connection().as_ref().is_some_and(|(_, h)| h.is_some())
    }

    /// Drops the connected frontend, if any (`block-export-del mode=hard`).
    pub fn disconnect_frontend(&self) {
        if let Some((_, Some(h))) = self.connection().as_ref() {
            // The session's next read sees the end of the stream.
            let _ = h.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Stops taking new requests and waits until those in flight are done (at most
    /// `timeout`); [`ExportShared::resume`] undoes it. Other exports are untouched.
    pub fn pause(&self, timeout: Duration) -> bool {
        self.paused.store(true, Ordering::SeqCst);
        if self.wait_idle(|| self.in_flight(), timeout) {
            true
        } else {
            self.resume();
            false
        }
    }

    /// Takes requests again after [`ExportShared::pause`], waking the worker threads
    /// for what the frontend queued meanwhile.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        if let Some(d) = self.device() {
            d.wake_all();
        }
    }

    /// Tells the connected frontend that the capacity changed.
    pub fn notify_resize(&self) {
        if let Some(d) = self.device() {
            d.notify_config_change();
        }
    }

    /// Waits until no iothread pass can still pop requests and `in_flight()` is zero.
    /// Call after raising the flag that makes passes pop nothing.
    pub fn wait_idle(&self, in_flight: impl Fn() -> u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.poppers.iter().any(|c| c.0.load(Ordering::SeqCst) > 0) || in_flight() > 0 {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    fn capacity_bytes(&self) -> u64 {
        // Whole logical blocks only.
        let lbs = u64::from(self.logical_block_size);
        self.node().size() / lbs * lbs
    }

    /// Data segments per request (`seg_max`): the queue size less the header and
    /// status descriptors (the configuration keeps the queue size at 4 or more).
    fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    pub fn device_limits(&self) -> DeviceLimits {
        DeviceLimits {
            capacity_bytes: self.capacity_bytes(),
            logical_block_size: self.logical_block_size,
            writable: self.is_writable(),
            max_segments: self.seg_max() as usize,
            size_max: size_max_for(self.seg_max()),
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
        }
    }

    pub fn config_space(&self) -> BlkConfig {
        let lbs = self.logical_block_size;
        let phys = (self.node().limits().request_alignment).max(lbs);
        BlkConfig {
            capacity: self.capacity_bytes() / SECTOR,
            size_max: size_max_for(self.seg_max()),
            seg_max: self.seg_max(),
            blk_size: lbs,
            physical_block_exp: (phys / lbs).trailing_zeros() as u8,
            min_io_size: 1,
            opt_io_size: 0,
            writeback: u8::from(self.blk.write_cache()),
            num_queues: self.num_queues,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
            discard_sector_alignment: lbs / SECTOR as u32,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
            write_zeroes_may_unmap: 1,
        }
    }
}

/// A bound export: its socket, served by the control-plane thread ([`server`]).
pub struct VhostUserBlkExport {
    pub shared: Arc<ExportShared>,
    /// The socket's path, if vubd bound it (not with `addr.type=fd`).
    pub socket_path: Option<PathBuf>,
    /// A duplicate of the listening socket, shut down when the export stops so that
    /// no frontend connects any more. None for an inherited socket (`addr.type=fd`):
    /// it is shared with whoever passed it (systemd), and the next vubd that gets it
    /// must find it listening; a frontend that connects meanwhile waits in its
    /// backlog.
    listen_fd: Option<OwnedFd>,
    /// Its place on the control-plane thread, once served.
    served: Option<server::Served>,
}

/// Refuses a socket path another live process listens on; removes a stale one.
fn claim_socket(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(VhostUserBlkError::SocketInUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|e| VhostUserBlkError::Listen {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl VhostUserBlkExport {
    /// Binds the export's socket and serves it; `on_exit` runs once the export has
    /// stopped.
    pub fn start(
        cfg: &ExportConfig,
        blk: BlockBackend,
        iothreads: Vec<Arc<IoThread>>,
        on_exit: impl FnOnce() + Send + 'static,
    ) -> Result<VhostUserBlkExport> {
        let (mut export, listener) = VhostUserBlkExport::bind(cfg, blk, iothreads)?;
        export
            .serve(listener, on_exit)
            .map_err(VhostUserBlkError::Thread)?;
        Ok(export)
    }

    /// Binds the export's socket (nothing is served until
    /// [`VhostUserBlkExport::serve`]).
    pub fn bind(
        cfg: &ExportConfig,
        mut blk: BlockBackend,
        iothreads: Vec<Arc<IoThread>>,
    ) -> Result<(VhostUserBlkExport, UnixListener)> {
        let listener = match &cfg.socket_fd {
            Some(fd) => crate::listen_fd::take_unix_listener(fd)?,
            None => claim_socket(&cfg.socket_path)?,
        };
        let listen_fd = if cfg.socket_fd.is_some() {
            None
        } else {
            // SAFETY: dup of the listening socket we just created and own; the new
            // descriptor is owned by the OwnedFd.
            let dup = unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return Err(VhostUserBlkError::Listen {
                    path: cfg.socket_path.clone(),
                    message: std::io::Error::last_os_error().to_string(),
                });
            }
            // SAFETY: `dup` is a fresh descriptor nobody else owns.
            Some(unsafe { OwnedFd::from_raw_fd(dup) })
        };
        let mut serial = [0u8; ID_BYTES];
        let s = cfg.serial.as_deref().unwrap_or(&cfg.id).as_bytes();
        let n = s.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&s[..n]);
        blk.set_on_error(cfg.rerror, cfg.werror);
        blk.set_write_cache(cfg.initial_write_cache());
        let shared = Arc::new(ExportShared {
            id: cfg.id.clone(),
            blk,
            num_queues: cfg.num_queues,
            queue_size: cfg.queue_size,
            writable: cfg.writable,
            fixed_iothread: cfg.fixed_iothread,
            pin_guest_memory: cfg.pin_guest_memory,
            frontend_gone: AtomicBool::new(true),
            logical_block_size: cfg.logical_block_size,
            serial,
            iothreads: Mutex::new(iothreads),
            stopping: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            poppers: Default::default(),
            connection: Mutex::new(None),
            log_limits: ExportLogLimits::new(),
            counters: ExportCounters::new(usize::from(cfg.num_queues)),
        });
        Ok((
            VhostUserBlkExport {
                shared,
                socket_path: cfg.socket_fd.is_none().then(|| cfg.socket_path.clone()),
                listen_fd,
                served: None,
            },
            listener,
        ))
    }

    /// Serves frontends one after another, on the control-plane thread; `on_exit`
    /// runs there once the export has stopped (after [`Export::stop`]).
    pub fn serve(
        &mut self,
        listener: UnixListener,
        on_exit: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let served = server::server()?.add(self.shared.clone(), listener, Box::new(on_exit))?;
        self.served = Some(served);
        Ok(())
    }
}

impl Export for VhostUserBlkExport {
    fn id(&self) -> &str {
        &self.shared.id
    }

    fn type_name(&self) -> &'static str {
        "vhost-user-blk"
    }

    fn blk(&self) -> &BlockBackend {
        &self.shared.blk
    }

    fn socket_path(&self) -> Option<&Path> {
        self.socket_path.as_deref()
    }

    fn iothreads(&self) -> Vec<Arc<IoThread>> {
        self.shared.iothreads()
    }

    fn queue_samples(&self) -> Option<Vec<QueueSample>> {
        let in_flight = self
            .shared
            .device()
            .map(|d| d.queue_in_flight())
            .unwrap_or_default();
        Some(self.shared.counters.samples(&in_flight))
    }

    fn fixed_iothread(&self) -> bool {
        self.shared.fixed_iothread
    }

    fn move_to_iothread(&self, thread: Arc<IoThread>, timeout: Duration) -> bool {
        let shared = &self.shared;
        if !shared.pause(timeout) {
            return false;
        }
        shared.set_iothreads(vec![thread]);
        shared.resume();
        true
    }

    fn notify_resize(&self) {
        self.shared.notify_resize();
    }

    fn cont(&self) {
        self.shared.cont();
    }

    fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(d) = self.shared.device() {
            // Held requests give up.
            d.wake_all();
        }
        if let Some(fd) = &self.listen_fd {
            // SAFETY: shutdown on a descriptor we own; no frontend connects any more.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
        self.shared.disconnect_frontend();
        if let Some(s) = &self.served {
            s.poke();
        }
    }

    fn wait_stopped(&self, timeout: Duration) -> bool {
        let Some(served) = &self.served else {
            return false;
        };
        let deadline = Instant::now() + timeout;
        while !served.is_finished() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    fn quiesce(&self, timeout: Duration) -> bool {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(d) = self.shared.device() {
            d.wake_all();
        }
        let shared = &self.shared;
        shared.wait_idle(|| shared.in_flight(), timeout)
    }
}

//! A minimal virtio-blk driver on top of `virtio-driver` (libblkio's own transport layer)
//! for requests libblkio cannot produce: GET_ID, unknown request types, writes to a
//! read-only device without negotiating VIRTIO_BLK_F_RO, and descriptor chains with unusual
//! or wrong layouts (short header, missing status, wrong directions, unmapped addresses).
//!
//! One virtqueue (queue 0), no EVENT_IDX, completions by polling the used ring.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_driver::virtqueue::{Virtqueue, VirtqueueLayout};
use virtio_driver::{
    EventFd, QueueNotifier, VhostUser, VirtioBlkConfig, VirtioBlkFeatureFlags, VirtioFeatureFlags,
    VirtioTransport,
};

/// virtio-blk request types (VIRTIO 1.2, 5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_GET_LIFETIME: u32 = 10;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
pub const VIRTIO_BLK_T_SECURE_ERASE: u32 = 14;

/// Status values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// What we put in the status byte before submitting: a device that completes a request
/// without writing the status leaves this.
pub const STATUS_UNTOUCHED: u8 = 0xEE;

/// Bytes of the GET_ID answer.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// Per-request data in the virtqueue memory (mapped into the device).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct RawReq {
    /// struct virtio_blk_outhdr: le32 type, le32 reserved (ioprio), le64 sector.
    pub hdr: [u8; 16],
    /// Status byte, followed by spare bytes for oversized status descriptors.
    pub status: [u8; 8],
    /// 16 bytes of discard/write-zeroes segment (le64 sector, le32 num_sectors, le32 flags).
    pub dwz: [u8; 16],
}

/// One descriptor of a chain built by [`RawClient::submit`].
#[derive(Clone, Debug)]
pub enum RawDesc {
    /// The first `len` bytes (<= 16) of the request header, device-readable.
    Header { len: usize },
    /// The full header, wrongly marked device-writable.
    HeaderWritable,
    /// The discard/write-zeroes segment, device-readable.
    Dwz,
    /// A range of the shared data buffer; `from_dev`: device-writable (a read's data).
    Data { buf: Range<usize>, from_dev: bool },
    /// The status byte area (`len` <= 8 bytes); `writable` false is the wrong direction.
    Status { len: usize, writable: bool },
    /// An address no memory region covers.
    Unmapped {
        addr: u64,
        len: usize,
        from_dev: bool,
    },
}

impl RawDesc {
    /// A well-formed chain: header, data segments, status.
    pub fn chain(data: &[(Range<usize>, bool)]) -> Vec<RawDesc> {
        let mut v = vec![RawDesc::Header { len: 16 }];
        for (r, from_dev) in data {
            v.push(RawDesc::Data {
                buf: r.clone(),
                from_dev: *from_dev,
            });
        }
        v.push(RawDesc::Status {
            len: 1,
            writable: true,
        });
        v
    }
}

struct DataMem {
    addr: *mut u8,
    len: usize,
    fd: libc::c_int,
}

impl Drop for DataMem {
    fn drop(&mut self) {
        // SAFETY: addr/len is the mapping created in DataMem::new and fd the memfd it maps;
        // both are released exactly once, here. No references into the mapping outlive
        // RawClient, which owns this DataMem.
        unsafe {
            libc::munmap(self.addr.cast(), self.len);
            libc::close(self.fd);
        }
    }
}

impl DataMem {
    fn new(len: usize) -> DataMem {
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"vubd-test-raw".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: ftruncate on the fd we just created.
        let r = unsafe { libc::ftruncate(fd, len as libc::off_t) };
        assert_eq!(r, 0, "ftruncate: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh shared mapping of our memfd; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        DataMem {
            addr: addr.cast(),
            len,
            fd,
        }
    }
}

/// A raw virtio-blk frontend with one queue.
pub struct RawClient {
    // Drop order: the virtqueue (which points into the transport's ring memory) before the
    // transport.
    vq: Virtqueue<'static, RawReq>,
    notifier: Box<dyn QueueNotifier>,
    _call: Arc<EventFd>,
    vu: Box<VhostUser<VirtioBlkConfig, RawReq>>,
    data: DataMem,
    done: HashMap<u16, RawReq>,
    features: u64,
    pub timeout: Duration,
}

// The default feature set: everything vubd/QEMU offer that we can drive, except RO (so
// writes to a read-only export reach the device) and EVENT_IDX (always notify).
pub fn default_features() -> u64 {
    (VirtioBlkFeatureFlags::SIZE_MAX
        | VirtioBlkFeatureFlags::SEG_MAX
        | VirtioBlkFeatureFlags::BLK_SIZE
        | VirtioBlkFeatureFlags::FLUSH
        | VirtioBlkFeatureFlags::TOPOLOGY
        | VirtioBlkFeatureFlags::MQ
        | VirtioBlkFeatureFlags::DISCARD
        | VirtioBlkFeatureFlags::WRITE_ZEROES
        | VirtioBlkFeatureFlags::CONFIG_WCE)
        .bits()
        | VirtioFeatureFlags::VERSION_1.bits()
}

/// Bit of VIRTIO_BLK_F_RO.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;

impl RawClient {
    /// Connect and set up queue 0 with `default_features()` and a 1 MiB data buffer.
    pub fn connect(path: &Path) -> RawClient {
        RawClient::connect_with(path, default_features(), 1 << 20)
    }

    pub fn connect_with(path: &Path, features: u64, data_len: usize) -> RawClient {
        let path_str = path.to_str().expect("UTF-8 socket path").to_string();
        let mut vu = crate::client::with_hang_guard(
            &format!("raw vhost-user handshake with {}", path.display()),
            move || {
                let deadline = Instant::now() + crate::client::CONNECT_TIMEOUT;
                loop {
                    match VhostUser::<VirtioBlkConfig, RawReq>::new(&path_str, features) {
                        Ok(v) => break Ok(Box::new(v)),
                        Err(_) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => break Err(e),
                    }
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("raw vhost-user connect to {}: {e}", path.display()));
        let negotiated = vu.get_features();
        let vfeatures = VirtioFeatureFlags::from_bits_truncate(negotiated);
        let queue_size: u16 = 64;
        let layout = VirtqueueLayout::new::<RawReq>(1, queue_size.into(), vfeatures)
            .expect("virtqueue layout");
        let mem = vu.alloc_queue_mem(&layout).expect("alloc_queue_mem");
        // SAFETY: the ring memory is an mmap owned by the boxed transport `vu`; it is not
        // unmapped or moved until `vu` is dropped, and `vq` (the only user of this slice) is
        // declared before `vu` in RawClient so it is dropped first. Nothing else accesses the
        // slice from our side.
        let mem: &'static mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(mem.as_mut_ptr(), mem.len()) };
        let vq = Virtqueue::<RawReq>::new(vu.iova_translator(), mem, queue_size, vfeatures)
            .expect("virtqueue");
        vu.setup_queues(std::slice::from_ref(&vq))
            .expect("setup_queues");
        let data = DataMem::new(data_len);
        vu.map_mem_region(data.addr as usize, data.len, data.fd, 0)
            .expect("map data memory");
        let notifier = vu.get_submission_notifier(0);
        let call = vu.get_completion_fd(0);
        RawClient {
            vq,
            notifier,
            _call: call,
            vu,
            data,
            done: HashMap::new(),
            features: negotiated,
            timeout: crate::client::IO_TIMEOUT,
        }
    }

    /// Negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Device configuration space.
    pub fn config(&self) -> VirtioBlkConfig {
        self.vu.get_config().expect("get_config")
    }

    /// The shared data buffer.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: our own mapping of data.len bytes, alive as long as self; no request is in
        // flight while the caller holds this borrow (callers wait for completions through
        // &mut self methods before touching the buffer again, except in deliberately
        // abandoned requests, where the device writing concurrently only changes bytes).
        unsafe { std::slice::from_raw_parts_mut(self.data.addr, self.data.len) }
    }

    /// Put a request with header (type, sector) and the given descriptor chain in the ring
    /// and notify the device. Returns the request id for [`RawClient::wait`].
    pub fn submit(&mut self, req_type: u32, sector: u64, chain: &[RawDesc]) -> u16 {
        self.submit_full(req_type, sector, None, chain)
    }

    /// Like submit, also filling the discard/write-zeroes segment (sector, sectors, flags).
    pub fn submit_full(
        &mut self,
        req_type: u32,
        sector: u64,
        dwz: Option<(u64, u32, u32)>,
        chain: &[RawDesc],
    ) -> u16 {
        let data_base = self.data.addr;
        let data_len = self.data.len;
        let id = self
            .vq
            .add_request(|req, add_desc| {
                req.hdr[0..4].copy_from_slice(&req_type.to_le_bytes());
                req.hdr[4..8].copy_from_slice(&0u32.to_le_bytes());
                req.hdr[8..16].copy_from_slice(&sector.to_le_bytes());
                req.status = [STATUS_UNTOUCHED; 8];
                req.dwz = [0; 16];
                if let Some((s, n, f)) = dwz {
                    req.dwz[0..8].copy_from_slice(&s.to_le_bytes());
                    req.dwz[8..12].copy_from_slice(&n.to_le_bytes());
                    req.dwz[12..16].copy_from_slice(&f.to_le_bytes());
                }
                for d in chain {
                    let (base, len, from_dev): (*mut u8, usize, bool) = match d {
                        RawDesc::Header { len } => {
                            assert!(*len <= 16);
                            (req.hdr.as_mut_ptr(), *len, false)
                        }
                        RawDesc::HeaderWritable => (req.hdr.as_mut_ptr(), 16, true),
                        RawDesc::Dwz => (req.dwz.as_mut_ptr(), 16, false),
                        RawDesc::Data { buf, from_dev } => {
                            assert!(buf.start <= buf.end && buf.end <= data_len);
                            // SAFETY: in bounds of our data mapping (asserted).
                            (unsafe { data_base.add(buf.start) }, buf.len(), *from_dev)
                        }
                        RawDesc::Status { len, writable } => {
                            assert!(*len <= 8);
                            (req.status.as_mut_ptr(), *len, *writable)
                        }
                        RawDesc::Unmapped {
                            addr,
                            len,
                            from_dev,
                        } => (*addr as usize as *mut u8, *len, *from_dev),
                    };
                    add_desc(
                        libc::iovec {
                            iov_base: base.cast(),
                            iov_len: len,
                        },
                        from_dev,
                    )?;
                }
                Ok(())
            })
            .expect("add_request (ring full?)");
        self.notifier.notify().expect("kick");
        id
    }

    fn reap(&mut self) {
        for c in self.vq.completions() {
            self.done.insert(c.id, c.req);
        }
    }

    /// Wait up to `timeout` for request `id`; returns its request data (status etc.), or
    /// None if it did not complete in time.
    pub fn wait_timeout(&mut self, id: u16, timeout: Duration) -> Option<RawReq> {
        let deadline = Instant::now() + timeout;
        loop {
            self.reap();
            if let Some(r) = self.done.remove(&id) {
                return Some(r);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Wait for request `id` (panics after the hang-guard timeout); returns its status byte.
    pub fn wait(&mut self, id: u16) -> u8 {
        let t = self.timeout;
        self.wait_timeout(id, t)
            .unwrap_or_else(|| panic!("raw request {id} did not complete within {t:?}"))
            .status[0]
    }

    /// Submit and wait; returns the status byte.
    pub fn request(&mut self, req_type: u32, sector: u64, chain: &[RawDesc]) -> u8 {
        let id = self.submit(req_type, sector, chain);
        self.wait(id)
    }

    /// VIRTIO_BLK_T_GET_ID into a 20-byte buffer: Ok(id bytes) or Err(status).
    pub fn get_id(&mut self) -> Result<[u8; VIRTIO_BLK_ID_BYTES], u8> {
        self.buf()[..VIRTIO_BLK_ID_BYTES].fill(0xCC);
        let st = self.request(
            VIRTIO_BLK_T_GET_ID,
            0,
            &RawDesc::chain(&[(0..VIRTIO_BLK_ID_BYTES, true)]),
        );
        if st != VIRTIO_BLK_S_OK {
            return Err(st);
        }
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        id.copy_from_slice(&self.buf()[..VIRTIO_BLK_ID_BYTES]);
        Ok(id)
    }

    /// Read `len` bytes at byte `offset` (must be sector-aligned) in one data descriptor.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, u8> {
        let st = self.request(
            VIRTIO_BLK_T_IN,
            offset / 512,
            &RawDesc::chain(&[(0..len, true)]),
        );
        if st != VIRTIO_BLK_S_OK {
            return Err(st);
        }
        Ok(self.buf()[..len].to_vec())
    }

    /// Write `data` at byte `offset` (sector-aligned) in one data descriptor.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u8> {
        self.buf()[..data.len()].copy_from_slice(data);
        let st = self.request(
            VIRTIO_BLK_T_OUT,
            offset / 512,
            &RawDesc::chain(&[(0..data.len(), false)]),
        );
        if st != VIRTIO_BLK_S_OK {
            return Err(st);
        }
        Ok(())
    }
}

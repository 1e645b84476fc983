//! A vhost-user-blk frontend built on libblkio's `virtio-blk-vhost-user` driver.
//!
//! vhost-user backends can only access memory the frontend has shared with them, so all I/O
//! buffers live in one libblkio memory region (memfd-backed, mapped into the daemon with
//! `map_mem_region`), split into a fixed-size area per queue. Each [`IoQueue`] owns a
//! libblkio queue and its buffer area, so queues can be lent to threads (see
//! [`Client::queues_mut`] and `std::thread::scope`).

use blkio::{Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags};
use std::mem::MaybeUninit;
use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long to wait for completions before declaring the daemon hung (a hang guard, not a
/// performance assertion).
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `connect` retries while the socket refuses connections.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Number of queues to set up (libblkio `num-queues`, or `num-poll-queues` if `poll`).
    pub num_queues: usize,
    /// Use poll queues (busy-poll the used ring; no completion eventfd).
    pub poll: bool,
    /// libblkio `read-only`: required to start on a device offering VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Descriptors per virtqueue (libblkio default 256).
    pub queue_size: Option<i32>,
    /// Bytes of shared buffer memory per queue.
    pub buf_per_queue: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            num_queues: 1,
            poll: false,
            read_only: false,
            queue_size: None,
            buf_per_queue: 8 << 20,
        }
    }
}

/// One request for [`IoQueue::submit`]. Buffer ranges are byte ranges in the queue's
/// shared buffer ([`IoQueue::buf`]).
#[derive(Debug, Clone)]
pub enum Req {
    Read {
        offset: u64,
        buf: Range<usize>,
    },
    Write {
        offset: u64,
        buf: Range<usize>,
        flags: ReqFlags,
    },
    Readv {
        offset: u64,
        segs: Vec<Range<usize>>,
    },
    Writev {
        offset: u64,
        segs: Vec<Range<usize>>,
        flags: ReqFlags,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        flags: ReqFlags,
    },
}

/// A libblkio queue plus the part of the shared buffer memory that belongs to it.
pub struct IoQueue {
    q: Blkioq,
    buf: *mut u8,
    len: usize,
    index: usize,
    poll: bool,
    timeout: Duration,
    /// The device's `size_max` (libblkio `max-segment-len`; 0 = no limit): longer
    /// buffers are sent as several segments, as a driver must.
    max_seg_len: usize,
}

// SAFETY: `buf..buf+len` is a part of the client's memory region that only this IoQueue
// ever accesses (areas of different queues are disjoint); the region stays mapped while the
// `Blkioq` inside lives (it holds a reference to libblkio's memory region registry). Blkioq
// itself is Send.
unsafe impl Send for IoQueue {}

impl IoQueue {
    /// This queue's shared buffer (the daemon can access it).
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: see the `Send` impl: the range is mapped, exclusively ours, and no request
        // is in flight while `&mut self` is borrowed here (submit() waits for completions).
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.len) }
    }

    pub fn buf_len(&self) -> usize {
        self.len
    }

    /// Index of the queue in the client (0-based).
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn is_poll(&self) -> bool {
        self.poll
    }

    /// Change the hang-guard timeout used while waiting for completions.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// The raw libblkio queue and buffer (base pointer, length) for custom loops (benchmark).
    /// The buffer pointer is valid for `len` bytes while this IoQueue lives.
    pub fn raw(&mut self) -> (&mut Blkioq, *mut u8, usize) {
        (&mut self.q, self.buf, self.len)
    }

    #[track_caller]
    fn check_range(&self, r: &Range<usize>) {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "buffer range {r:?} outside the queue's {}-byte buffer",
            self.len
        );
    }

    /// `buf` as segments of at most `max_seg_len` bytes, if it needs splitting.
    fn split_buf(&self, buf: &Range<usize>) -> Option<Vec<Range<usize>>> {
        let m = self.max_seg_len;
        (m > 0 && buf.len() > m).then(|| {
            (buf.start..buf.end)
                .step_by(m)
                .map(|s| s..(s + m).min(buf.end))
                .collect()
        })
    }

    fn iovecs(&self, segs: &[Range<usize>]) -> Vec<libc::iovec> {
        segs.iter()
            .map(|r| {
                self.check_range(r);
                libc::iovec {
                    // SAFETY: r.start <= len (checked above), so the pointer stays inside
                    // (or one past the end of) the buffer.
                    iov_base: unsafe { self.buf.add(r.start) }.cast(),
                    iov_len: r.len(),
                }
            })
            .collect()
    }

    /// Submit all `reqs` at once (queue depth = reqs.len(), beyond the ring size libblkio
    /// backlogs them) and wait for all completions. Returns each request's `ret`
    /// (0 or a negative errno), in the order of `reqs`.
    ///
    /// Panics if the completions do not arrive within the timeout (daemon hung).
    pub fn submit(&mut self, reqs: &[Req]) -> Vec<i32> {
        // The iovec arrays must stay valid until the requests are in the ring (libblkio
        // may backlog requests and read the arrays later): keep them until all complete.
        let mut iovs: Vec<Vec<libc::iovec>> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            match r {
                Req::Read { offset, buf } if self.split_buf(buf).is_some() => {
                    let v = self.iovecs(&self.split_buf(buf).expect("split"));
                    self.q
                        .readv(*offset, v.as_ptr(), v.len() as u32, i, ReqFlags::empty());
                    iovs.push(v);
                }
                Req::Write { offset, buf, flags } if self.split_buf(buf).is_some() => {
                    let v = self.iovecs(&self.split_buf(buf).expect("split"));
                    self.q
                        .writev(*offset, v.as_ptr(), v.len() as u32, i, *flags);
                    iovs.push(v);
                }
                Req::Read { offset, buf } => {
                    self.check_range(buf);
                    // SAFETY: range checked to be within our buffer, which stays mapped
                    // and untouched by us until the completion is reaped below.
                    let p = unsafe { self.buf.add(buf.start) };
                    self.q.read(*offset, p, buf.len(), i, ReqFlags::empty());
                }
                Req::Write { offset, buf, flags } => {
                    self.check_range(buf);
                    // SAFETY: as for Read.
                    let p = unsafe { self.buf.add(buf.start) };
                    self.q.write(*offset, p, buf.len(), i, *flags);
                }
                Req::Readv { offset, segs } => {
                    let v = self.iovecs(segs);
                    self.q
                        .readv(*offset, v.as_ptr(), v.len() as u32, i, ReqFlags::empty());
                    iovs.push(v);
                }
                Req::Writev {
                    offset,
                    segs,
                    flags,
                } => {
                    let v = self.iovecs(segs);
                    self.q
                        .writev(*offset, v.as_ptr(), v.len() as u32, i, *flags);
                    iovs.push(v);
                }
                Req::Flush => self.q.flush(i, ReqFlags::empty()),
                Req::Discard { offset, len } => self.q.discard(*offset, *len, i, ReqFlags::empty()),
                Req::WriteZeroes { offset, len, flags } => {
                    self.q.write_zeroes(*offset, *len, i, *flags)
                }
            }
        }
        let mut rets: Vec<Option<i32>> = vec![None; reqs.len()];
        let mut done = 0;
        let mut completions: Vec<MaybeUninit<Completion>> = (0..reqs.len().max(1))
            .map(|_| MaybeUninit::uninit())
            .collect();
        let deadline = Instant::now() + self.timeout;
        while done < reqs.len() {
            let mut remaining = deadline.saturating_duration_since(Instant::now());
            let n = match self.q.do_io(
                &mut completions,
                reqs.len() - done,
                Some(&mut remaining),
                None,
            ) {
                Ok(n) => n,
                Err(e) if e.errno() == Errno::INTR => continue,
                Err(e) if e.errno() == Errno::TIME => panic!(
                    "queue {}: {} of {} requests did not complete within {:?}: daemon hung? \
                     requests: {reqs:?}",
                    self.index,
                    reqs.len() - done,
                    reqs.len(),
                    self.timeout
                ),
                Err(e) => panic!("queue {}: do_io failed: {e} ({:?})", self.index, e.errno()),
            };
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first n elements.
                let c = unsafe { c.assume_init_ref() };
                let slot = rets
                    .get_mut(c.user_data)
                    .unwrap_or_else(|| panic!("completion with unknown user_data {c:?}"));
                assert!(
                    slot.is_none(),
                    "request {} completed twice: {c:?}",
                    c.user_data
                );
                *slot = Some(c.ret);
            }
            done += n;
        }
        drop(iovs);
        rets.into_iter().map(|r| r.expect("completed")).collect()
    }

    /// Submit one request and return its ret as a Result (Err = negative errno).
    pub fn submit1(&mut self, req: Req) -> Result<(), i32> {
        match self.submit(std::slice::from_ref(&req))[0] {
            0 => Ok(()),
            e => Err(e),
        }
    }

    /// Read `len` bytes at `offset` (through the shared buffer, from its start).
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        self.submit1(Req::Read {
            offset,
            buf: 0..len,
        })?;
        Ok(self.buf()[..len].to_vec())
    }

    /// Read after filling the buffer with `poison`, so stale buffer contents can't pass for
    /// data the daemon did not write.
    pub fn read_poisoned(&mut self, offset: u64, len: usize, poison: u8) -> Result<Vec<u8>, i32> {
        self.buf()[..len].fill(poison);
        self.read(offset, len)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), i32> {
        self.write_flags(offset, data, ReqFlags::empty())
    }

    pub fn write_flags(&mut self, offset: u64, data: &[u8], flags: ReqFlags) -> Result<(), i32> {
        self.buf()[..data.len()].copy_from_slice(data);
        self.submit1(Req::Write {
            offset,
            buf: 0..data.len(),
            flags,
        })
    }

    /// Buffer ranges for segments of the given lengths, spaced with a gap after each (so a
    /// daemon writing past a segment end clobbers the gap, not the next segment) and with
    /// unaligned starts when `lens` are unaligned.
    pub fn seg_ranges(lens: &[usize], gap: usize) -> Vec<Range<usize>> {
        let mut pos = 0;
        lens.iter()
            .map(|&l| {
                let r = pos..pos + l;
                pos += l + gap;
                r
            })
            .collect()
    }

    /// Scatter read into segments of `seg_lens` bytes; returns the data concatenated.
    /// Gaps between the segments are poisoned and checked to be untouched.
    pub fn readv(&mut self, offset: u64, seg_lens: &[usize]) -> Result<Vec<u8>, i32> {
        const GAP: usize = 64;
        const POISON: u8 = 0xA5;
        let segs = Self::seg_ranges(seg_lens, GAP);
        let end = segs.last().map_or(0, |r| r.end + GAP);
        self.buf()[..end].fill(POISON);
        self.submit1(Req::Readv {
            offset,
            segs: segs.clone(),
        })?;
        let buf = self.buf();
        let mut out = Vec::with_capacity(seg_lens.iter().sum());
        for r in &segs {
            out.extend_from_slice(&buf[r.clone()]);
            let gap = &buf[r.end..r.end + GAP];
            assert!(
                gap.iter().all(|&b| b == POISON),
                "readv wrote past the end of a segment (segments {seg_lens:?})"
            );
        }
        Ok(out)
    }

    /// Gather write from the given segments.
    pub fn writev(&mut self, offset: u64, segs: &[&[u8]], flags: ReqFlags) -> Result<(), i32> {
        let lens: Vec<usize> = segs.iter().map(|s| s.len()).collect();
        let ranges = Self::seg_ranges(&lens, 64);
        let buf = self.buf();
        for (r, s) in ranges.iter().zip(segs) {
            buf[r.clone()].copy_from_slice(s);
        }
        self.submit1(Req::Writev {
            offset,
            segs: ranges,
            flags,
        })
    }

    pub fn flush(&mut self) -> Result<(), i32> {
        self.submit1(Req::Flush)
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), i32> {
        self.submit1(Req::Discard { offset, len })
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, flags: ReqFlags) -> Result<(), i32> {
        self.submit1(Req::WriteZeroes { offset, len, flags })
    }
}

/// How long the vhost-user handshake may block before the daemon is declared hung (a
/// hang guard: libblkio's connect has no timeout of its own).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Run `f` on a helper thread and wait for it up to [`HANDSHAKE_TIMEOUT`]. On timeout the
/// thread is left blocked (it ends when the daemon goes away) and Err describes the hang.
pub fn with_hang_guard<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANDSHAKE_TIMEOUT).map_err(|_| {
        format!("{what} did not complete within {HANDSHAKE_TIMEOUT:?}: the daemon is not answering")
    })
}

/// Create a libblkio instance and connect it (retrying briefly while the socket refuses
/// connections: the socket file exists between bind() and listen()).
fn connect_blkio(path: &str, read_only: bool) -> Result<Blkio, (&'static str, blkio::Error)> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| ("new", e))?;
        b.set_str("path", path).map_err(|e| ("set path", e))?;
        if read_only {
            b.set_bool("read-only", true)
                .map_err(|e| ("set read-only", e))?;
        }
        match b.connect() {
            Ok(()) => return Ok(b),
            Err(e)
                if (e.errno() == Errno::CONNREFUSED || e.errno() == Errno::NOENT)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(("connect", e)),
        }
    }
}

/// A connected and started libblkio `virtio-blk-vhost-user` instance.
pub struct Client {
    // Field order matters for drop: queues first, then the Blkio instance (whose driver
    // owns the vhost-user connection and the virtqueue memory the queues point into).
    queues: Vec<IoQueue>,
    region: MemoryRegion,
    blkio: Blkio,
}

fn blkio_err(what: &str, e: blkio::Error) -> String {
    format!("{what}: {e} ({:?})", e.errno())
}

impl Client {
    /// Connect with `num_queues` (non-poll) queues; panics on failure.
    pub fn connect(path: impl AsRef<Path>, num_queues: usize) -> Client {
        let opts = ClientOptions {
            num_queues,
            ..Default::default()
        };
        Client::connect_with(path, &opts).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Connect, configure and start; Err describes the libblkio failure (see
    /// [`Client::try_connect`] to get at the errno).
    pub fn connect_with(path: impl AsRef<Path>, opts: &ClientOptions) -> Result<Client, String> {
        Client::try_connect(path.as_ref(), opts).map_err(|(what, e)| {
            blkio_err(&format!("libblkio {what} ({})", path.as_ref().display()), e)
        })
    }

    /// Like [`Client::connect_with`], returning the failing step and the libblkio error.
    pub fn try_connect(
        path: &Path,
        opts: &ClientOptions,
    ) -> Result<Client, (&'static str, blkio::Error)> {
        let path_str = path.to_str().expect("UTF-8 socket path").to_string();
        let read_only = opts.read_only;
        let mut blkio = with_hang_guard(
            &format!("vhost-user handshake with {}", path.display()),
            move || connect_blkio(&path_str, read_only),
        )
        .map_err(|msg| ("connect", blkio::Error::new(Errno::TIMEDOUT, msg)))??;
        assert!(
            blkio.get_bool("needs-mem-regions").unwrap_or(true),
            "virtio-blk-vhost-user is expected to need memory regions"
        );
        let nq = i32::try_from(opts.num_queues).expect("num_queues");
        if opts.poll {
            blkio
                .set_i32("num-queues", 0)
                .map_err(|e| ("set num-queues", e))?;
            blkio
                .set_i32("num-poll-queues", nq)
                .map_err(|e| ("set num-poll-queues", e))?;
        } else {
            blkio
                .set_i32("num-queues", nq)
                .map_err(|e| ("set num-queues", e))?;
        }
        if let Some(qs) = opts.queue_size {
            blkio
                .set_i32("queue-size", qs)
                .map_err(|e| ("set queue-size", e))?;
        }
        let started = blkio.start().map_err(|e| ("start", e))?;
        let bqs = if opts.poll {
            started.poll_queues
        } else {
            started.queues
        };
        assert_eq!(
            bqs.len(),
            opts.num_queues,
            "libblkio started a wrong number of queues"
        );

        let align = blkio.get_u64("mem-region-alignment").unwrap_or(1).max(4096) as usize;
        let per_queue = opts.buf_per_queue.div_ceil(align) * align;
        let total = per_queue * opts.num_queues.max(1);
        let region = blkio
            .alloc_mem_region(total)
            .map_err(|e| ("alloc_mem_region", e))?;
        blkio
            .map_mem_region(&region)
            .map_err(|e| ("map_mem_region", e))?;

        let max_seg_len = blkio
            .get_i32("max-segment-len")
            .map(|v| v.max(0) as usize)
            .or_else(|_| blkio.get_u64("max-segment-len").map(|v| v as usize))
            .unwrap_or(0);
        let queues = bqs
            .into_iter()
            .enumerate()
            .map(|(i, q)| IoQueue {
                q,
                // In bounds: i < num_queues, total = per_queue * num_queues; the address is
                // only turned into references by IoQueue::buf.
                buf: (region.addr + i * per_queue) as *mut u8,
                len: per_queue,
                index: i,
                poll: opts.poll,
                timeout: IO_TIMEOUT,
                max_seg_len,
            })
            .collect();
        Ok(Client {
            queues,
            region,
            blkio,
        })
    }

    pub fn blkio(&self) -> &Blkio {
        &self.blkio
    }

    /// Device capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity")
    }

    /// libblkio `request-alignment` (the device's logical block size).
    pub fn request_alignment(&self) -> i32 {
        self.blkio
            .get_i32("request-alignment")
            .expect("request-alignment")
    }

    pub fn prop_i32(&self, name: &str) -> i32 {
        self.blkio
            .get_i32(name)
            .unwrap_or_else(|e| panic!("property {name}: {e}"))
    }

    pub fn prop_u64(&self, name: &str) -> u64 {
        self.blkio
            .get_u64(name)
            .unwrap_or_else(|e| panic!("property {name}: {e}"))
    }

    pub fn prop_bool(&self, name: &str) -> bool {
        self.blkio
            .get_bool(name)
            .unwrap_or_else(|e| panic!("property {name}: {e}"))
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn queue(&mut self, i: usize) -> &mut IoQueue {
        &mut self.queues[i]
    }

    /// Queue 0.
    pub fn q(&mut self) -> &mut IoQueue {
        &mut self.queues[0]
    }

    /// All queues, to hand one to each thread of a `std::thread::scope`.
    pub fn queues_mut(&mut self) -> &mut [IoQueue] {
        &mut self.queues
    }

    /// The shared memory region (all queues' buffers).
    pub fn mem_region(&self) -> &MemoryRegion {
        &self.region
    }

    /// Disconnect without waiting for anything (requests in flight are abandoned).
    pub fn disconnect(self) {
        drop(self)
    }

    /// Submit `reqs` on queue `q` without waiting, then drop the connection with them in
    /// flight (exercises the daemon's handling of a frontend vanishing mid-I/O).
    pub fn abandon_in_flight(mut self, q: usize, reqs: &[Req]) {
        let ioq = &mut self.queues[q];
        for (i, r) in reqs.iter().enumerate() {
            match r {
                Req::Read { offset, buf } => {
                    ioq.check_range(buf);
                    // SAFETY: in bounds (checked); the memory stays mapped on our side until
                    // the Blkio is dropped, and the daemon has its own mapping.
                    let p = unsafe { ioq.buf.add(buf.start) };
                    ioq.q.read(*offset, p, buf.len(), i, ReqFlags::empty());
                }
                Req::Write { offset, buf, flags } => {
                    ioq.check_range(buf);
                    // SAFETY: as for Read.
                    let p = unsafe { ioq.buf.add(buf.start) };
                    ioq.q.write(*offset, p, buf.len(), i, *flags);
                }
                Req::Flush => ioq.q.flush(i, ReqFlags::empty()),
                other => panic!("abandon_in_flight supports Read/Write/Flush only, not {other:?}"),
            }
        }
        // Kick the device: do_io with min_completions = 0 submits without waiting.
        let mut c: Vec<MaybeUninit<Completion>> = (0..reqs.len().max(1))
            .map(|_| MaybeUninit::uninit())
            .collect();
        let mut zero = Duration::ZERO;
        let _ = ioq.q.do_io(&mut c, 0, Some(&mut zero), None);
        drop(self);
    }
}

//! `vubd-io`: a small vhost-user-blk frontend (libblkio) for the Python QMP tests
//! (`tests/qmp/`). Each subcommand attaches to one export socket, does its work and prints
//! exactly one JSON object on stdout: `{"ok": true, ...}` on success, or
//! `{"ok": false, "error": "..."}` (also on stderr) with exit status 1 on any I/O error,
//! data mismatch or timeout. Bad usage exits with status 2.
//!
//! ```text
//! vubd-io capacity       --socket S
//! vubd-io write          --socket S --offset O --len L --seed N
//! vubd-io verify         --socket S --offset O --len L --seed N
//! vubd-io zeroes         --socket S --offset O --len L
//! vubd-io stress         --socket S --seconds T --seed N [--queues Q] [--span BYTES]
//!                        [--ready-file PATH]
//! vubd-io watch-capacity --socket S --expect BYTES --timeout-secs T [--ready-file PATH]
//! ```
//!
//! `write`/`verify` use a pattern that depends only on the seed and the absolute byte
//! offset, so a region written in pieces (or by another process) verifies as one.
//! `stress` keeps a model of the tag each block was last written with, and checks every
//! read against it. `--ready-file` is created once the frontend is connected (stress: and
//! the first requests completed), so a test can act on the daemon while this frontend is
//! known to be attached. Numbers accept a K/M/G suffix (powers of 1024).

use blkio::ReqFlags;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vubd_tests::{Client, ClientOptions, IoQueue, Req, Rng};

const USAGE: &str = "usage:
  vubd-io capacity       --socket S
  vubd-io write          --socket S --offset O --len L --seed N
  vubd-io verify         --socket S --offset O --len L --seed N [--read-only on]
  vubd-io zeroes         --socket S --offset O --len L
  vubd-io stress         --socket S --seconds T --seed N [--queues Q] [--span BYTES] [--ready-file P]
  vubd-io watch-capacity --socket S --expect BYTES --timeout-secs T [--ready-file P]";

/// Hang guard for each batch of requests (the daemon is declared hung after this).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Bytes of shared buffer per queue; also bounds one write/verify chunk.
const BUF_PER_QUEUE: usize = 4 << 20;
/// Largest stress request, in bytes.
const STRESS_MAX_LEN: u64 = 128 << 10;
/// Most requests in flight at once per queue in `stress`.
const STRESS_MAX_BATCH: usize = 16;

// ---------------------------------------------------------------------------------------
// Output

/// Escape `s` as a JSON string.
fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("vubd-io: {msg}");
    println!("{{\"ok\":false,\"error\":{}}}", json_str(msg));
    ExitCode::from(1)
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    let msg = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    format!("panic: {msg}")
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("vubd-io: {msg}\n{USAGE}");
    ExitCode::from(2)
}

// ---------------------------------------------------------------------------------------
// Arguments

struct Args {
    cmd: String,
    opts: BTreeMap<String, String>,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut it = std::env::args().skip(1);
        let cmd = it.next().ok_or("no subcommand")?;
        if cmd == "-h" || cmd == "--help" {
            return Err("help".into());
        }
        let mut opts = BTreeMap::new();
        while let Some(k) = it.next() {
            let Some(name) = k.strip_prefix("--") else {
                return Err(format!("unexpected argument {k:?}"));
            };
            let v = it.next().ok_or(format!("--{name} needs a value"))?;
            if opts.insert(name.to_string(), v).is_some() {
                return Err(format!("--{name} given twice"));
            }
        }
        Ok(Args { cmd, opts })
    }

    /// Fail on options the subcommand does not take.
    fn allow(&self, known: &[&str]) -> Result<(), String> {
        for k in self.opts.keys() {
            if !known.contains(&k.as_str()) {
                return Err(format!("{}: unknown option --{k}", self.cmd));
            }
        }
        Ok(())
    }

    fn str(&self, name: &str) -> Result<String, String> {
        self.opts
            .get(name)
            .cloned()
            .ok_or_else(|| format!("{}: --{name} is required", self.cmd))
    }

    fn num(&self, name: &str) -> Result<u64, String> {
        parse_num(&self.str(name)?).map_err(|e| format!("--{name}: {e}"))
    }

    fn num_or(&self, name: &str, default: u64) -> Result<u64, String> {
        match self.opts.get(name) {
            Some(v) => parse_num(v).map_err(|e| format!("--{name}: {e}")),
            None => Ok(default),
        }
    }

    fn secs(&self, name: &str) -> Result<Duration, String> {
        let v = self.str(name)?;
        let s: f64 = v
            .parse()
            .map_err(|_| format!("--{name}: {v:?} is not a number of seconds"))?;
        if !(0.0..=3600.0).contains(&s) {
            return Err(format!("--{name}: {s} is out of range (0..3600)"));
        }
        Ok(Duration::from_secs_f64(s))
    }

    fn path(&self, name: &str) -> Option<PathBuf> {
        self.opts.get(name).map(PathBuf::from)
    }
}

fn parse_num(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

// ---------------------------------------------------------------------------------------
// Data pattern

/// splitmix64 finaliser: a well-mixed 64-bit value from any input.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The 8 bytes at absolute device offset `word_off` (a multiple of 8) for `seed`.
fn word(seed: u64, word_off: u64) -> [u8; 8] {
    mix(mix(seed) ^ word_off).to_le_bytes()
}

/// Fill `buf` with the pattern of `seed` for device bytes `dev_off..dev_off+buf.len()`
/// (`dev_off` a multiple of 8).
fn fill_pattern(buf: &mut [u8], seed: u64, dev_off: u64) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let w = word(seed, dev_off + 8 * i as u64);
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

/// First offset (relative to `buf`) where `buf` differs from the pattern.
fn check_pattern(buf: &[u8], seed: u64, dev_off: u64) -> Option<usize> {
    buf.chunks(8).enumerate().find_map(|(i, chunk)| {
        let w = word(seed, dev_off + 8 * i as u64);
        (chunk != &w[..chunk.len()])
            .then(|| i * 8 + chunk.iter().zip(w).position(|(a, b)| *a != b).unwrap_or(0))
    })
}

// ---------------------------------------------------------------------------------------
// Connecting

fn connect(socket: &str, queues: usize) -> Result<Client, String> {
    connect_with(socket, queues, false)
}

/// [`connect`], read-only if asked (libblkio's `read-only`, which a device offering
/// VIRTIO_BLK_F_RO requires).
fn connect_with(socket: &str, queues: usize, read_only: bool) -> Result<Client, String> {
    let opts = ClientOptions {
        num_queues: queues,
        read_only,
        buf_per_queue: BUF_PER_QUEUE,
        ..Default::default()
    };
    let mut c = Client::connect_with(socket, &opts)?;
    for q in c.queues_mut() {
        q.set_timeout(REQUEST_TIMEOUT);
    }
    Ok(c)
}

fn touch(path: &Option<PathBuf>) -> Result<(), String> {
    if let Some(p) = path {
        std::fs::write(p, b"ready\n").map_err(|e| format!("cannot create {}: {e}", p.display()))?;
    }
    Ok(())
}

fn errno_name(ret: i32) -> String {
    format!("{} ({})", ret, std::io::Error::from_raw_os_error(-ret))
}

/// Check `offset..offset+len` against the alignment and the capacity.
fn check_range(c: &Client, offset: u64, len: u64) -> Result<(), String> {
    let align = c.request_alignment().max(512) as u64;
    if !offset.is_multiple_of(align) || !len.is_multiple_of(align) {
        return Err(format!(
            "offset {offset} and length {len} must be multiples of the logical block size \
             {align}"
        ));
    }
    let cap = c.capacity();
    if offset.checked_add(len).is_none_or(|end| end > cap) {
        return Err(format!(
            "range {offset}+{len} extends past the capacity {cap}"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Subcommands

fn cmd_capacity(a: &Args) -> Result<String, String> {
    a.allow(&["socket"])?;
    let c = connect(&a.str("socket")?, 1)?;
    Ok(format!(
        "\"capacity\":{},\"logical_block_size\":{}",
        c.capacity(),
        c.request_alignment()
    ))
}

fn cmd_write(a: &Args) -> Result<String, String> {
    a.allow(&["socket", "offset", "len", "seed"])?;
    let (offset, len, seed) = (a.num("offset")?, a.num("len")?, a.num("seed")?);
    let mut c = connect(&a.str("socket")?, 1)?;
    check_range(&c, offset, len)?;
    let q = c.q();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(BUF_PER_QUEUE as u64) as usize;
        let off = offset + done;
        fill_pattern(&mut q.buf()[..n], seed, off);
        q.submit1(Req::Write {
            offset: off,
            buf: 0..n,
            flags: ReqFlags::empty(),
        })
        .map_err(|e| format!("write of {n} bytes at {off} failed: {}", errno_name(e)))?;
        done += n as u64;
    }
    q.flush()
        .map_err(|e| format!("flush failed: {}", errno_name(e)))?;
    Ok(format!("\"written\":{len}"))
}

/// One write-zeroes request (no flush): `"zeroed"` on success.
fn cmd_zeroes(a: &Args) -> Result<String, String> {
    a.allow(&["socket", "offset", "len"])?;
    let (offset, len) = (a.num("offset")?, a.num("len")?);
    let mut c = connect(&a.str("socket")?, 1)?;
    check_range(&c, offset, len)?;
    c.q()
        .submit1(Req::WriteZeroes {
            offset,
            len,
            flags: ReqFlags::empty(),
        })
        .map_err(|e| {
            format!(
                "write-zeroes of {len} bytes at {offset} failed: {}",
                errno_name(e)
            )
        })?;
    Ok(format!("\"zeroed\":{len}"))
}

fn cmd_verify(a: &Args) -> Result<String, String> {
    a.allow(&["socket", "offset", "len", "seed", "read-only"])?;
    let (offset, len, seed) = (a.num("offset")?, a.num("len")?, a.num("seed")?);
    let read_only = match a.opts.get("read-only").map(String::as_str) {
        None | Some("off") => false,
        Some("on") => true,
        Some(v) => return Err(format!("--read-only {v:?}: must be on or off")),
    };
    let mut c = connect_with(&a.str("socket")?, 1, read_only)?;
    check_range(&c, offset, len)?;
    let q = c.q();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(BUF_PER_QUEUE as u64) as usize;
        let off = offset + done;
        // Poison first so stale buffer contents cannot pass for data.
        q.buf()[..n].fill(0x5A);
        q.submit1(Req::Read {
            offset: off,
            buf: 0..n,
        })
        .map_err(|e| format!("read of {n} bytes at {off} failed: {}", errno_name(e)))?;
        if let Some(i) = check_pattern(&q.buf()[..n], seed, off) {
            let at = off + i as u64;
            let got = &q.buf()[i..(i + 8).min(n)];
            return Err(format!(
                "data mismatch at byte {at} (seed {seed}): got {got:02x?}, expected {:02x?}",
                word(seed, at & !7)
            ));
        }
        done += n as u64;
    }
    Ok(format!("\"verified\":{len}"))
}

fn cmd_watch_capacity(a: &Args) -> Result<String, String> {
    a.allow(&["socket", "expect", "timeout-secs", "ready-file"])?;
    let expect = a.num("expect")?;
    let timeout = a.secs("timeout-secs")?;
    let c = connect(&a.str("socket")?, 1)?;
    let initial = c
        .blkio()
        .get_u64("capacity")
        .map_err(|e| format!("capacity property: {e}"))?;
    touch(&a.path("ready-file"))?;
    let start = Instant::now();
    let mut polls = 0u64;
    loop {
        polls += 1;
        let last = c
            .blkio()
            .get_u64("capacity")
            .map_err(|e| format!("capacity property: {e}"))?;
        if last == expect {
            return Ok(format!(
                "\"capacity\":{last},\"initial\":{initial},\"polls\":{polls},\
                 \"waited_ms\":{}",
                start.elapsed().as_millis()
            ));
        }
        if start.elapsed() >= timeout {
            return Err(format!(
                "capacity still {last} (initially {initial}) after {:?} and {polls} reads; \
                 expected {expect}",
                timeout
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// stress

#[derive(Default)]
struct Counts {
    writes: AtomicU64,
    reads: AtomicU64,
    flushes: AtomicU64,
    bytes_written: AtomicU64,
    bytes_read: AtomicU64,
    verified_blocks: AtomicU64,
}

/// One queue's share of the stress test: a block range of its own and the model of it.
struct Worker<'a> {
    q: &'a mut IoQueue,
    rng: Rng,
    align: u64,
    /// Device byte range this worker owns.
    area: Range<u64>,
    /// Tag each block (of `align` bytes) in `area` was last written with; 0 = unknown
    /// (never written by us: any content is accepted).
    tags: Vec<u64>,
    next_tag: u64,
    counts: &'a Counts,
    stop: &'a AtomicBool,
}

impl Worker<'_> {
    fn block_of(&self, dev_off: u64) -> usize {
        ((dev_off - self.area.start) / self.align) as usize
    }

    /// Verify the read data in buffer range `buf` for device offset `off` against the model.
    /// Returns the number of blocks checked (blocks never written by us are skipped).
    fn check(&mut self, off: u64, buf: Range<usize>) -> Result<u64, String> {
        let (align, area_start, tags) = (self.align, self.area.start, &self.tags);
        let data = &self.q.buf()[buf];
        let mut checked = 0;
        for (i, blk) in data.chunks(align as usize).enumerate() {
            let dev = off + i as u64 * align;
            let tag = tags[((dev - area_start) / align) as usize];
            if tag == 0 {
                continue;
            }
            if let Some(j) = check_pattern(blk, tag, dev) {
                let at = dev + j as u64;
                return Err(format!(
                    "data mismatch at byte {at} (block at {dev} last written with tag {tag}): \
                     got {:02x?}, expected {:02x?}",
                    &blk[j..(j + 8).min(blk.len())],
                    word(tag, at & !7)
                ));
            }
            checked += 1;
        }
        Ok(checked)
    }

    /// A random request range inside the area that does not overlap any of `taken`.
    fn pick_range(&mut self, taken: &[Range<u64>]) -> Option<Range<u64>> {
        let blocks = (self.area.end - self.area.start) / self.align;
        let max_blocks = (STRESS_MAX_LEN / self.align).clamp(1, blocks);
        for _ in 0..8 {
            // Mostly small requests, sometimes large ones.
            let n = if self.rng.range(0, 4) == 0 {
                self.rng.range(1, max_blocks + 1)
            } else {
                self.rng.range(1, max_blocks.min(8) + 1)
            };
            let first = self.rng.range(0, blocks - n + 1);
            let r =
                self.area.start + first * self.align..self.area.start + (first + n) * self.align;
            if taken.iter().all(|t| t.end <= r.start || r.end <= t.start) {
                return Some(r);
            }
        }
        None
    }

    fn run(mut self, deadline: Instant) -> Result<(), String> {
        let mut batches = 0u64;
        while Instant::now() < deadline && !self.stop.load(Ordering::Relaxed) {
            let n = self.rng.range_usize(1, STRESS_MAX_BATCH + 1);
            let mut ranges: Vec<Range<u64>> = Vec::new();
            let mut reqs = Vec::new();
            // (request index, device offset, buffer range, tag) of writes; reads keep tag 0.
            let mut meta: Vec<(u64, Range<usize>, u64)> = Vec::new();
            let mut buf_pos = 0usize;
            for _ in 0..n {
                let Some(r) = self.pick_range(&ranges) else {
                    break;
                };
                let len = (r.end - r.start) as usize;
                if buf_pos + len > self.q.buf_len() {
                    break;
                }
                let b = buf_pos..buf_pos + len;
                buf_pos += len;
                if self.rng.range(0, 100) < 65 {
                    let tag = self.next_tag;
                    self.next_tag += 1;
                    fill_pattern(&mut self.q.buf()[b.clone()], tag, r.start);
                    let flags = if self.rng.range(0, 10) == 0 {
                        ReqFlags::FUA
                    } else {
                        ReqFlags::empty()
                    };
                    reqs.push(Req::Write {
                        offset: r.start,
                        buf: b.clone(),
                        flags,
                    });
                    meta.push((r.start, b, tag));
                } else {
                    self.q.buf()[b.clone()].fill(0x5A);
                    reqs.push(Req::Read {
                        offset: r.start,
                        buf: b.clone(),
                    });
                    meta.push((r.start, b, 0));
                }
                ranges.push(r);
            }
            batches += 1;
            let flush = batches.is_multiple_of(16);
            if flush {
                reqs.push(Req::Flush);
            }
            let rets = self.q.submit(&reqs);
            for (i, ret) in rets.iter().enumerate() {
                if *ret != 0 {
                    return Err(format!(
                        "queue {}: request {:?} failed: {}",
                        self.q.index(),
                        reqs[i],
                        errno_name(*ret)
                    ));
                }
            }
            // Reads did not overlap the writes of the same batch: check them against the
            // model as it was before the batch, then record the writes.
            for (off, b, tag) in &meta {
                if *tag == 0 {
                    let v = self.check(*off, b.clone())?;
                    self.counts.verified_blocks.fetch_add(v, Ordering::Relaxed);
                    self.counts.reads.fetch_add(1, Ordering::Relaxed);
                    self.counts
                        .bytes_read
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                }
            }
            for (off, b, tag) in &meta {
                if *tag != 0 {
                    let first = self.block_of(*off);
                    let nblk = b.len() / self.align as usize;
                    self.tags[first..first + nblk].fill(*tag);
                    self.counts.writes.fetch_add(1, Ordering::Relaxed);
                    self.counts
                        .bytes_written
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                }
            }
            if flush {
                self.counts.flushes.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Final pass: flush, then read the whole area back and verify every block.
        self.q.flush().map_err(|e| {
            format!(
                "queue {}: final flush failed: {}",
                self.q.index(),
                errno_name(e)
            )
        })?;
        self.counts.flushes.fetch_add(1, Ordering::Relaxed);
        let chunk = (self.q.buf_len() as u64 / self.align * self.align).max(self.align);
        let mut off = self.area.start;
        while off < self.area.end {
            let len = chunk.min(self.area.end - off) as usize;
            self.q.buf()[..len].fill(0x5A);
            self.q
                .submit1(Req::Read {
                    offset: off,
                    buf: 0..len,
                })
                .map_err(|e| {
                    format!(
                        "queue {}: verification read of {len} bytes at {off} failed: {}",
                        self.q.index(),
                        errno_name(e)
                    )
                })?;
            let v = self.check(off, 0..len)?;
            self.counts.verified_blocks.fetch_add(v, Ordering::Relaxed);
            off += len as u64;
        }
        Ok(())
    }
}

fn cmd_stress(a: &Args) -> Result<String, String> {
    a.allow(&["socket", "seconds", "seed", "queues", "span", "ready-file"])?;
    let seconds = a.secs("seconds")?;
    let seed = a.num("seed")?;
    let queues = a.num_or("queues", 1)?;
    if !(1..=64).contains(&queues) {
        return Err(format!("--queues {queues}: must be 1..64"));
    }
    let queues = queues as usize;
    let mut c = connect(&a.str("socket")?, queues)?;
    let align = c.request_alignment().max(512) as u64;
    let cap = c.capacity();
    let span = a.num_or("span", cap.min(32 << 20))?;
    if span > cap {
        return Err(format!("--span {span} exceeds the capacity {cap}"));
    }
    let per_queue = span / queues as u64 / align * align;
    if per_queue < align {
        return Err(format!(
            "--span {span} is too small for {queues} queue(s) of {align}-byte blocks"
        ));
    }
    let counts = Counts::default();
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<String>> = Mutex::new(None);
    let ready = a.path("ready-file");
    let start = Instant::now();
    let deadline = start + seconds;
    std::thread::scope(|s| {
        for (i, q) in c.queues_mut().iter_mut().enumerate() {
            let w = Worker {
                q,
                rng: Rng::with_seed(mix(seed ^ (i as u64 + 1))),
                align,
                area: i as u64 * per_queue..(i as u64 + 1) * per_queue,
                tags: vec![0; (per_queue / align) as usize],
                // Tags differ per seed and per queue, never 0.
                next_tag: (mix(seed).wrapping_add(i as u64) << 24) | 1,
                counts: &counts,
                stop: &stop,
            };
            let (stop, first_error) = (&stop, &first_error);
            s.spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run(deadline)))
                    .unwrap_or_else(|p| Err(panic_message(&p)));
                if let Err(e) = r {
                    stop.store(true, Ordering::Relaxed);
                    first_error.lock().unwrap().get_or_insert(e);
                }
            });
        }
        // Ready once some requests have completed (or the run already ended).
        while counts.writes.load(Ordering::Relaxed) + counts.reads.load(Ordering::Relaxed) == 0
            && !stop.load(Ordering::Relaxed)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Err(e) = touch(&ready) {
            stop.store(true, Ordering::Relaxed);
            first_error.lock().unwrap().get_or_insert(e);
        }
    });
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let summary = format!(
        "\"writes\":{},\"reads\":{},\"flushes\":{},\"bytes_written\":{},\"bytes_read\":{},\
         \"verified_blocks\":{},\"queues\":{queues},\"span\":{},\"block\":{align},\
         \"elapsed_ms\":{}",
        ld(&counts.writes),
        ld(&counts.reads),
        ld(&counts.flushes),
        ld(&counts.bytes_written),
        ld(&counts.bytes_read),
        ld(&counts.verified_blocks),
        per_queue * queues as u64,
        start.elapsed().as_millis()
    );
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(format!("{e} (after {{{summary}}})"));
    }
    if ld(&counts.writes) == 0 {
        return Err(format!("no write completed ({{{summary}}})"));
    }
    Ok(summary)
}

fn main() -> ExitCode {
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) if e == "help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => return usage_error(&e),
    };
    let cmd: fn(&Args) -> Result<String, String> = match args.cmd.as_str() {
        "capacity" => cmd_capacity,
        "write" => cmd_write,
        "verify" => cmd_verify,
        "zeroes" => cmd_zeroes,
        "stress" => cmd_stress,
        "watch-capacity" => cmd_watch_capacity,
        other => return usage_error(&format!("unknown subcommand {other:?}")),
    };
    // The client library panics on hangs and protocol violations: report those as
    // failures too (the panic message is also on stderr).
    let r = std::panic::catch_unwind(|| cmd(&args)).unwrap_or_else(|p| Err(panic_message(&p)));
    match r {
        Ok(fields) => {
            println!("{{\"ok\":true,{fields}}}");
            ExitCode::SUCCESS
        }
        Err(e) if e.contains(": unknown option --") || e.contains(" is required") => {
            usage_error(&e)
        }
        Err(e) => fail(&e),
    }
}

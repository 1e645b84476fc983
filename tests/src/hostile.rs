//! The harness of the hostile-frontend tests (tests/tests/hostile_frontend.rs).
//!
//! Each case starts one vubd with two exports on separate iothreads:
//! * export A (`a`, iothread `ioA`), which the test attacks with the raw frontend of
//!   [`crate::vu_frontend`] (see [`Dev`]);
//! * export B (`b`, iothread `ioB`), a raw file in /dev/shm that a libblkio client reads
//!   4 KiB at random offsets at queue depth [`LOAD_QD`] the whole time ([`Load`]), but
//!   for the control's windows and the CPU measurement below.
//!
//! A second vubd with one export like B (the control, [`Control`]), which no attack
//! reaches, is read by the same kind of load during each IOPS measurement, in short
//! windows that alternate with B's (B's load pauses in the control's windows, and the
//! control's in B's). Other processes on the machine slow both alike; an attack on A
//! that holds B back inside the daemon slows only B. So B's IOPS are measured relative
//! to the control's.
//!
//! The harness measures B's relative IOPS before the attack (baseline) and during it,
//! samples vubd's anonymous memory (RssAnon: guest memory the daemon touches is shared,
//! not anonymous), its open file descriptors and its stderr, and measures its CPU time
//! while nothing legitimate runs (a daemon that spins on A's input takes CPU from B and
//! the control alike: this check, not the IOPS one, catches it). [`Harness::finish`]
//! then asserts what every case must keep:
//! * the daemon is alive and nothing panicked;
//! * B keeps at least [`Limits::min_iops_ratio`] of its baseline IOPS relative to the
//!   control: the best pair of windows during the attack against the median pair of
//!   the baseline (an attack that holds B back does so in every pair; on a busy
//!   machine another process can take most of any one window); when the figure looks
//!   low, more pairs, and a second baseline after the attack;
//! * vubd's CPU use once the attack input is sent stays below [`Limits::max_cpu_cores`];
//! * RssAnon grows by at most [`Limits::max_rss_growth`];
//! * no kind of log line (the message with numbers masked) appears more than
//!   [`Limits::max_log_lines_per_sec`] times in any second;
//! * the file descriptors and threads the attack made the daemon open or start are
//!   gone again once the frontend is.
//!
//! What the guest sees (status bytes, used ring) is checked by each test, with the
//! helpers of [`Dev`] ([`Dev::observe`], [`assert_refused`]).
//!
//! Cases run one at a time (a process-wide lock), so that one case's daemon does not eat
//! into another case's IOPS figures.

use crate::args::DaemonArgs;
use crate::client::{Client, ClientOptions};
use crate::daemon::Daemon;
use crate::image::{TempDir, TempImage};
use crate::qmp::Qmp;
use crate::raw::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_IN};
use crate::util::Rng;
use crate::vu_frontend::{
    blk_header, BlkConfig, Bump, Desc, Frontend, HandshakeOpts, MemRegion, RingLayout, SplitQueue,
    UsedElem, VuError, VuResult,
};
use crate::MIB;
use blkio::{Completion, ReqFlags};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Queue depth of the load on export B.
pub const LOAD_QD: usize = 8;
/// Size of export B.
const B_SIZE: u64 = 64 * MIB;
/// Length of one IOPS window, and how many windows a measurement takes the best of.
const IOPS_WINDOW: Duration = Duration::from_millis(250);
/// Pairs of windows (one of B's load, one of the control's) of a baseline.
const BASELINE_WINDOWS: usize = 5;
/// Pairs of windows of an attack figure; up to [`MAX_ATTACK_WINDOWS`] while it looks
/// low (other processes on a small machine come and go; an attack that holds B back
/// does so all along).
const ATTACK_WINDOWS: usize = 5;
const MAX_ATTACK_WINDOWS: usize = 13;
/// How long vubd's CPU use is measured while idle (attack sent, load paused).
const CPU_WINDOW: Duration = Duration::from_millis(800);
/// How often the sampler looks at /proc and stderr.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// Status byte value our requests start with: a device that does not write the status
/// leaves it.
pub const STATUS_CANARY: u8 = 0xEE;
/// How long [`Dev::observe`] waits for a request, and then for the follow-up.
pub const OBSERVE_WAIT: Duration = Duration::from_millis(500);

/// What every case must keep (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub min_iops_ratio: f64,
    pub max_cpu_cores: f64,
    pub max_rss_growth: u64,
    pub max_log_lines_per_sec: usize,
    /// Open fds of the daemon after the attack, beyond those it had before.
    pub max_fd_growth: usize,
    /// Threads of the daemon after the attack, beyond those it had before.
    pub max_thread_growth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            min_iops_ratio: 0.8,
            // An idle vubd uses no CPU (polling stops when there is no work); a third
            // of a core leaves room for a slow machine and still catches a spinning
            // thread.
            max_cpu_cores: 0.3,
            max_rss_growth: 48 * MIB,
            // vubd lets 10 lines per second through per call site; a line seen near the
            // end of one of its windows and the next window's lines can fall into the
            // same second here.
            max_log_lines_per_sec: 20,
            max_fd_growth: 16,
            max_thread_growth: 4,
        }
    }
}

static SERIAL: Mutex<()> = Mutex::new(());

/// The node behind export A.
#[derive(Debug, Clone)]
pub enum ANode {
    /// A raw file in /dev/shm, filled with [`pattern`].
    ShmFile { size: u64 },
    /// A raw file on a disk file system (/var/tmp) with `cache.direct=on`, filled with
    /// [`pattern`].
    DirectFile { size: u64 },
    /// `null-co` with `read-zeroes=on` and the given latency (a slow device: requests
    /// stay in flight).
    Null { size: u64, latency_ns: u64 },
    /// raw over `blkdebug` (with `rules`, e.g. ",inject-error.0.event=write_aio,...") over
    /// a file in /dev/shm filled with [`pattern`].
    Blkdebug { size: u64, rules: String },
}

/// Deterministic image contents: the byte at absolute offset `offset + i`.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut p = offset;
    while v.len() < len {
        let w = (p / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5A5A_0F0F_3C3C_A5A5;
        let bytes = w.to_le_bytes();
        let start = (p % 8) as usize;
        let take = (8 - start).min(len - v.len());
        v.extend_from_slice(&bytes[start..start + take]);
        p += take as u64;
    }
    v
}

fn pattern_image(img: &TempImage) {
    let chunk = 4 * MIB;
    let mut off = 0;
    while off < img.size() {
        let n = chunk.min(img.size() - off);
        img.write_at(off, &pattern(off, n as usize));
        off += n;
    }
}

/// RssAnon of a process in bytes (/proc/<pid>/status).
pub fn rss_anon(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Number of threads of a process.
pub fn thread_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.count())
}

/// Number of open file descriptors of a process.
pub fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// A log line's kind: the message without env_logger's `[time level target]` prefix,
/// with numbers masked and vubd's "(N similar messages suppressed)" note removed.
pub fn log_kind(line: &str) -> String {
    let msg = match line.strip_prefix('[') {
        Some(rest) => rest.split_once("] ").map_or(rest, |(_, m)| m),
        None => line,
    };
    let mut out = String::with_capacity(msg.len());
    let mut in_num = false;
    for c in msg.chars() {
        if c.is_ascii_hexdigit() && (c.is_ascii_digit() || in_num) {
            if !in_num {
                out.push('#');
                in_num = true;
            }
        } else if in_num && (c == 'x' || c == 'X') && out.ends_with('#') {
            // 0x prefix of a hex number
        } else {
            in_num = false;
            out.push(c);
        }
    }
    if let Some(i) = out.find(" (# similar") {
        out.truncate(i);
    }
    out.chars().take(100).collect()
}

/// What the sampler thread saw.
#[derive(Debug, Default)]
struct Samples {
    rss_max: u64,
    fd_max: usize,
    /// (seconds since the harness started, line)
    lines: Vec<(u64, String)>,
}

struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Samples>>,
    handle: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32, t0: Instant) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Samples::default()));
        let (s2, st2) = (samples.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            // The daemon's stderr is a file: read it through its fd, from where we were.
            let mut err = std::fs::File::open(format!("/proc/{pid}/fd/2")).ok();
            let mut partial = String::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let done = st2.load(Ordering::SeqCst);
                let rss = rss_anon(pid).unwrap_or(0);
                let fds = fd_count(pid).unwrap_or(0);
                let mut new_lines = Vec::new();
                if let Some(f) = err.as_mut() {
                    while let Ok(n) = f.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        partial.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                    while let Some(i) = partial.find('\n') {
                        let line: String = partial.drain(..=i).collect();
                        new_lines.push(line.trim_end().to_string());
                    }
                }
                {
                    let mut s = s2.lock().unwrap_or_else(|p| p.into_inner());
                    s.rss_max = s.rss_max.max(rss);
                    s.fd_max = s.fd_max.max(fds);
                    let sec = t0.elapsed().as_secs();
                    s.lines.extend(new_lines.into_iter().map(|l| (sec, l)));
                }
                if done {
                    break;
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
            if let Some(f) = err.as_mut() {
                let _ = f.seek(SeekFrom::End(0));
            }
        });
        Sampler {
            stop,
            samples,
            handle: Some(handle),
        }
    }

    fn reset_rss_max(&self, v: u64) {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .rss_max = v;
    }

    fn finish(&mut self) -> Samples {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The legitimate load on export B: 4 KiB random reads at queue depth [`LOAD_QD`].
pub struct Load {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
    handle: Option<JoinHandle<()>>,
}

impl Load {
    pub fn start(sock: &Path) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(Mutex::new(None));
        let (st, pa, pd, dn, er, fl) = (
            stop.clone(),
            pause.clone(),
            paused.clone(),
            done.clone(),
            errors.clone(),
            failure.clone(),
        );
        let sock = sock.to_path_buf();
        let handle = std::thread::spawn(move || {
            if let Err(e) = load_loop(&sock, &st, &pa, &pd, &dn, &er) {
                *fl.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
            pd.store(true, Ordering::SeqCst);
        });
        Load {
            stop,
            pause,
            paused,
            done,
            errors,
            failure,
            handle: Some(handle),
        }
    }

    /// Completed requests so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::SeqCst)
    }

    /// Stops submitting and waits until nothing is in flight.
    pub fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.paused.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the load on export B did not drain within 10 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    /// Stops the load; returns its error if it failed.
    pub fn stop(&mut self) -> Option<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.pause.store(false, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let failed = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let errors = self.errors.load(Ordering::SeqCst);
        failed.or_else(|| (errors > 0).then(|| format!("{errors} reads on export B failed")))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The control: a vubd of its own with one export like B, which no attack reaches,
/// read by a [`Load`] only while IOPS are measured (see the module documentation).
struct Control {
    // Drop order: the load ends before the daemon.
    load: Load,
    _daemon: Daemon,
    _img: TempImage,
    _dir: TempDir,
}

impl Control {
    fn start() -> Control {
        let dir = TempDir::new("vubd-hostile-control");
        let sock = dir.join("control.sock");
        let img = TempImage::new_filled(B_SIZE, 0x43);
        let args = DaemonArgs::new()
            .iothread("ioC")
            .file_raw("c", &img, "", "")
            .vhost_user_blk("c", &sock, ",writable=on,iothread=ioC")
            .build();
        let daemon = Daemon::start(&args);
        let load = Load::start(&sock);
        load.pause();
        Control {
            load,
            _daemon: daemon,
            _img: img,
            _dir: dir,
        }
    }
}

/// B's and the control's IOPS over windows that alternate between the two.
#[derive(Debug, Default, Clone)]
pub struct Iops {
    /// Sums of B's and of the control's IOPS over their windows.
    pub b_sum: f64,
    pub control_sum: f64,
    /// B's IOPS over the control's in each pair of neighbouring windows (0 when the
    /// control completed nothing).
    pub pairs: Vec<f64>,
}

impl Iops {
    /// B's mean IOPS over its windows.
    pub fn b_iops(&self) -> f64 {
        self.b_sum / self.pairs.len().max(1) as f64
    }

    /// The best pair's B's IOPS over the control's: an attack that holds B back does
    /// so in every pair, while other processes on a busy machine can take most of any
    /// one window from B or from the control.
    pub fn best(&self) -> f64 {
        self.pairs.iter().copied().fold(0.0, f64::max)
    }

    /// The median of the pairs' B's IOPS over the control's (a window that another
    /// process on the machine took most of weighs no more than any other).
    pub fn median(&self) -> f64 {
        let mut v = self.pairs.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    /// The pairs' figures, for a message.
    pub fn pairs_text(&self) -> String {
        let v: Vec<String> = self.pairs.iter().map(|r| format!("{r:.2}")).collect();
        v.join(" ")
    }
}

/// One window of [`IOPS_WINDOW`] with `run`'s load alone (`other`'s paused): its IOPS.
fn load_window(run: &Load, other: &Load) -> f64 {
    other.pause();
    run.resume();
    // The queue fills up again.
    std::thread::sleep(Duration::from_millis(30));
    let (c0, t0) = (run.done(), Instant::now());
    std::thread::sleep(IOPS_WINDOW);
    let (c1, t1) = (run.done(), Instant::now());
    (c1 - c0) as f64 / t1.duration_since(t0).as_secs_f64()
}

/// Windows of B's load and of the control's, alternately and never at the same time
/// (two loads on two daemons that compete for a small machine do not share it evenly):
/// B, control, control, B, B, ... (in pairs B-control and control-B, so that a load on
/// the machine that rises or falls steadily weighs on both alike). At least `min`
/// pairs, then more while `more` says so, up to `max`. B's load runs again afterwards.
fn measure_iops(
    b: &Load,
    control: &Load,
    min: usize,
    max: usize,
    more: impl Fn(&Iops) -> bool,
) -> Iops {
    let mut m = Iops::default();
    while m.pairs.len() < min || (m.pairs.len() < max && more(&m)) {
        let (bi, ci) = if m.pairs.len() % 2 == 0 {
            let bi = load_window(b, control);
            (bi, load_window(control, b))
        } else {
            let ci = load_window(control, b);
            (load_window(b, control), ci)
        };
        m.b_sum += bi;
        m.control_sum += ci;
        m.pairs.push(if ci > 0.0 { bi / ci } else { 0.0 });
    }
    control.pause();
    b.resume();
    m
}

fn load_loop(
    sock: &Path,
    stop: &AtomicBool,
    pause: &AtomicBool,
    paused: &AtomicBool,
    done: &AtomicU64,
    errors: &AtomicU64,
) -> Result<(), String> {
    const BS: usize = 4096;
    let opts = ClientOptions {
        num_queues: 1,
        buf_per_queue: LOAD_QD * BS,
        ..Default::default()
    };
    let mut client = Client::connect_with(sock, &opts)?;
    let q = client.q();
    let (bq, buf, buf_len) = q.raw();
    assert!(LOAD_QD * BS <= buf_len);
    let mut rng = Rng::with_seed(0x10AD);
    let blocks = B_SIZE / BS as u64;
    let submit = |bq: &mut blkio::Blkioq, slot: usize, rng: &mut Rng| {
        // SAFETY: slot < LOAD_QD and LOAD_QD * BS <= buf_len, so the slot's 4 KiB lie in
        // the queue's shared buffer, which outlives this loop; a slot has at most one
        // request in flight.
        let p = unsafe { buf.add(slot * BS) };
        bq.read(
            rng.range(0, blocks) * BS as u64,
            p,
            BS,
            slot,
            ReqFlags::empty(),
        );
    };
    let mut in_flight = 0usize;
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..LOAD_QD).map(|_| MaybeUninit::uninit()).collect();
    let mut idle_slots: Vec<usize> = (0..LOAD_QD).collect();
    let mut last_progress = Instant::now();
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let pausing = pause.load(Ordering::SeqCst);
        if !stopping && !pausing {
            paused.store(false, Ordering::SeqCst);
            if in_flight == 0 {
                last_progress = Instant::now();
            }
            while let Some(slot) = idle_slots.pop() {
                submit(bq, slot, &mut rng);
                in_flight += 1;
            }
        }
        if in_flight == 0 {
            if stopping {
                return Ok(());
            }
            paused.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        // Short waits, so that a stop request is seen even if the daemon hangs.
        let mut timeout = Duration::from_millis(100);
        let n = match bq.do_io(&mut completions, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) if e.errno() == blkio::Errno::INTR => continue,
            Err(e) if e.errno() == blkio::Errno::TIME => 0,
            Err(e) => return Err(format!("export B: do_io failed: {e}")),
        };
        if n > 0 {
            last_progress = Instant::now();
        } else if stop.load(Ordering::SeqCst) {
            // Abandon what is in flight (the client's memory stays valid until it is
            // dropped, after the daemon has let go of the connection or died).
            return Ok(());
        } else if last_progress.elapsed() > Duration::from_secs(30) {
            // (The clock restarts when reads are submitted with none in flight: a
            // long pause is no lack of progress.)
            return Err(format!(
                "export B: {in_flight} reads got no completion within 30 s (daemon hung?)"
            ));
        }
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            if c.ret == 0 {
                done.fetch_add(1, Ordering::SeqCst);
            } else {
                errors.fetch_add(1, Ordering::SeqCst);
            }
            idle_slots.push(c.user_data);
            in_flight -= 1;
        }
    }
}

/// Figures of one case, printed by [`Harness::finish`].
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// B's IOPS before the attack.
    pub baseline: Iops,
    /// B's IOPS after the attack, measured only when the attack figure looked low.
    pub baseline_after: Option<Iops>,
    pub attack: Option<Iops>,
    pub quiet_cpu_cores: Option<f64>,
    pub rss_baseline: u64,
    pub rss_max: u64,
    pub fd_baseline: usize,
    pub fd_after: usize,
    pub threads_baseline: usize,
    pub threads_after: usize,
    pub log_lines: usize,
    pub worst_log_kind: Option<(String, usize)>,
}

impl Report {
    /// B's IOPS relative to the control without an attack: the lower of the figures
    /// before and after it (a low attack figure may come from a baseline that caught
    /// B at a good moment).
    pub fn baseline_relative(&self) -> f64 {
        let before = self.baseline.median();
        self.baseline_after
            .as_ref()
            .map_or(before, |a| before.min(a.median()))
    }
}

/// One hostile-frontend case: the daemon, the load on B, the samplers.
pub struct Harness {
    // Drop order: the load and the sampler end before the daemon is killed (a load
    // waiting on a dead daemon would wait for its timeout).
    load: Load,
    sampler: Sampler,
    control: Control,
    pub name: String,
    pub limits: Limits,
    pub daemon: Daemon,
    pub dir: TempDir,
    pub sock_a: PathBuf,
    pub sock_b: PathBuf,
    /// The image behind A (None for null-co).
    pub img_a: Option<TempImage>,
    pub qmp: Option<Qmp>,
    report: Report,
    t0: Instant,
    _img_b: TempImage,
    _serial: MutexGuard<'static, ()>,
}

impl Harness {
    /// Starts the daemon with export A on `node` (`a_extra` appended to its export
    /// options, e.g. ",num-queues=2"), export B, and the load on B; measures the
    /// baseline. `monitor`: open a QMP monitor ([`Harness::qmp`]).
    pub fn start(name: &str, node: ANode, a_extra: &str, monitor: bool) -> Harness {
        Harness::start_with(name, node, a_extra, monitor, &[])
    }

    /// [`Harness::start`] with `daemon_args` added to the daemon's command line (trace
    /// events, say).
    pub fn start_with(
        name: &str,
        node: ANode,
        a_extra: &str,
        monitor: bool,
        daemon_args: &[&str],
    ) -> Harness {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        eprintln!("=== {name}");
        let dir = TempDir::new("vubd-hostile");
        let sock_a = dir.join("a.sock");
        let sock_b = dir.join("b.sock");
        let img_b = TempImage::new_filled(B_SIZE, 0x4B);
        let mut args = DaemonArgs::new().iothread("ioA").iothread("ioB");
        let mut img_a = None;
        match &node {
            ANode::ShmFile { size } => {
                let img = TempImage::new(*size);
                pattern_image(&img);
                args = args.file_raw("a", &img, "", "");
                img_a = Some(img);
            }
            ANode::DirectFile { size } => {
                let img = TempImage::new_in(Path::new("/var/tmp"), *size);
                pattern_image(&img);
                args = args.file_raw("a", &img, ",cache.direct=on", "");
                img_a = Some(img);
            }
            ANode::Null { size, latency_ns } => {
                args = args.blockdev(&format!(
                    "driver=null-co,node-name=a,size={size},read-zeroes=on,latency-ns={latency_ns}"
                ));
            }
            ANode::Blkdebug { size, rules } => {
                let img = TempImage::new(*size);
                pattern_image(&img);
                args = args
                    .blockdev(&format!(
                        "driver=file,node-name=a-file,filename={},cache.direct=off",
                        img.path().display()
                    ))
                    .blockdev(&format!(
                        "driver=blkdebug,node-name=a-dbg,image=a-file{rules}"
                    ))
                    .blockdev("driver=raw,node-name=a,file=a-dbg");
                img_a = Some(img);
            }
        }
        if monitor {
            args = args.monitor(&dir.join("qmp.sock"));
        }
        let mut args = args
            .file_raw("b", &img_b, "", "")
            .vhost_user_blk("a", &sock_a, &format!(",writable=on,iothread=ioA{a_extra}"))
            .vhost_user_blk("b", &sock_b, ",writable=on,iothread=ioB");
        for a in daemon_args {
            args = args.arg(a);
        }
        let daemon = Daemon::start(&args.build());
        let qmp = monitor.then(|| Qmp::connect(dir.join("qmp.sock")));
        let control = Control::start();
        let t0 = Instant::now();
        let sampler = Sampler::start(daemon.pid(), t0);
        let load = Load::start(&sock_b);
        // Warm up, then the baseline.
        std::thread::sleep(Duration::from_millis(300));
        let baseline = measure_iops(&load, &control.load, BASELINE_WINDOWS, 0, |_| false);
        let rss = rss_anon(daemon.pid()).unwrap_or(0);
        sampler.reset_rss_max(rss);
        let fds = fd_count(daemon.pid()).unwrap_or(0);
        let daemon_pid = daemon.pid();
        let mut h = Harness {
            name: name.to_string(),
            limits: Limits::default(),
            daemon,
            dir,
            sock_a,
            sock_b,
            img_a,
            qmp,
            load,
            sampler,
            control,
            report: Report {
                baseline,
                rss_baseline: rss,
                fd_baseline: fds,
                threads_baseline: thread_count(daemon_pid).unwrap_or(0),
                ..Report::default()
            },
            t0,
            _img_b: img_b,
            _serial: serial,
        };
        if let Some(e) = h.load_failure() {
            panic!("{name}: the load on export B failed before the attack: {e}");
        }
        assert!(
            h.report.baseline.b_sum > 0.0,
            "{name}: export B completed no requests in the baseline"
        );
        assert!(
            h.report.baseline.control_sum > 0.0,
            "{name}: the control export completed no requests in the baseline"
        );
        h.daemon.assert_running("after the baseline");
        h
    }

    fn load_failure(&self) -> Option<String> {
        self.load
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// B's baseline relative IOPS times the ratio it must keep.
    fn min_relative(&self) -> f64 {
        self.report.baseline_relative() * self.limits.min_iops_ratio
    }

    /// Connects a raw frontend to export A ([`Dev::connect`]).
    pub fn dev(&self, opts: &DevOpts) -> Dev {
        Dev::connect(&self.sock_a, opts)
            .unwrap_or_else(|e| panic!("{}: raw frontend setup on export A: {e}", self.name))
    }

    /// B's IOPS now, relative to the control (best of a few windows, more if those
    /// look low): call while the attack is in effect. Returns B's IOPS.
    pub fn measure_attack(&mut self) -> f64 {
        let min = self.min_relative();
        let m = measure_iops(
            &self.load,
            &self.control.load,
            ATTACK_WINDOWS,
            MAX_ATTACK_WINDOWS,
            |m| m.best() < min,
        );
        let iops = m.b_iops();
        self.report.attack = Some(match self.report.attack.take() {
            // Several calls: the worst phase counts.
            Some(prev) if prev.best() < m.best() => prev,
            _ => m,
        });
        iops
    }

    /// Pauses the load on B and measures vubd's CPU use over a short window: call once
    /// the attack input is sent. The load stays paused until [`Harness::resume_load`].
    pub fn measure_quiet_cpu(&mut self) -> f64 {
        self.load.pause();
        std::thread::sleep(Duration::from_millis(100));
        let (c0, t0) = (self.daemon.cpu_time(), Instant::now());
        std::thread::sleep(CPU_WINDOW);
        let (c1, t1) = (self.daemon.cpu_time(), Instant::now());
        let cores = (c1 - c0).as_secs_f64() / t1.duration_since(t0).as_secs_f64();
        self.report.quiet_cpu_cores = Some(match self.report.quiet_cpu_cores {
            Some(prev) => prev.max(cores),
            None => cores,
        });
        cores
    }

    pub fn resume_load(&self) {
        self.load.resume();
    }

    /// Waits for a QMP event (the harness must have been started with a monitor).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Option<serde_json::Value> {
        self.qmp
            .as_mut()
            .expect("started without a monitor")
            .wait_event(name, timeout)
    }

    /// Asserts that export A serves a fresh libblkio frontend (a 4 KiB read within
    /// `timeout`): the attack left the export usable. Call after the hostile frontend
    /// disconnected.
    pub fn assert_a_serves(&mut self, timeout: Duration) {
        let sock = self.sock_a.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = (|| {
                let opts = ClientOptions {
                    num_queues: 1,
                    buf_per_queue: MIB as usize,
                    ..Default::default()
                };
                let mut c = Client::connect_with(&sock, &opts)?;
                c.q()
                    .read_poisoned(0, 4096, 0x33)
                    .map_err(|e| format!("read failed: {e}"))
            })();
            let _ = tx.send(r);
        });
        match rx.recv_timeout(timeout) {
            Ok(Ok(data)) => {
                if let Some(img) = &self.img_a {
                    let want = img.read_at(0, 4096);
                    assert!(
                        data == want,
                        "{}: export A returned wrong data to a fresh frontend",
                        self.name
                    );
                }
            }
            Ok(Err(e)) => panic!(
                "{}: export A does not serve a fresh frontend after the attack: {e}",
                self.name
            ),
            Err(_) => panic!(
                "{}: a fresh frontend on export A got no answer within {timeout:?} after \
                 the attack (export wedged?)",
                self.name
            ),
        }
        self.daemon
            .assert_running("after a fresh frontend on export A");
    }

    /// The checks every case must pass (see the module documentation); prints the
    /// figures. Call at the end, after the hostile frontend is gone.
    pub fn finish(mut self) -> Report {
        let mut failures: Vec<String> = Vec::new();
        if self.report.attack.is_none() {
            self.measure_attack();
        }
        if self.report.quiet_cpu_cores.is_none() {
            self.measure_quiet_cpu();
        }
        // A low figure may also come from a baseline that caught B at a good moment:
        // a second one now, with the hostile frontend gone; compare with the lower of
        // the two.
        let attack = self.report.attack.clone().unwrap_or_default();
        if attack.best() < self.min_relative() {
            let after = measure_iops(&self.load, &self.control.load, BASELINE_WINDOWS, 0, |_| {
                false
            });
            self.report.baseline_after = Some(after);
        }
        let load_err = self.load.stop();
        let control_err = self.control.load.stop();
        // The daemon closes what the attack made it open, and ends the threads it
        // started, once the frontend is gone.
        let pid = self.daemon.pid();
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            self.report.fd_after = fd_count(pid).unwrap_or(0);
            self.report.threads_after = thread_count(pid).unwrap_or(0);
            let settled = self.report.fd_after
                <= self.report.fd_baseline + self.limits.max_fd_growth
                && self.report.threads_after
                    <= self.report.threads_baseline + self.limits.max_thread_growth;
            if settled || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let samples = self.sampler.finish();
        self.report.rss_max = samples.rss_max;
        self.report.log_lines = samples.lines.len();

        let alive = self.daemon.is_running();
        if !alive {
            failures.push("the daemon is not running".into());
        }
        let stderr = self.daemon.stderr();
        if stderr.contains("panicked at") {
            failures.push("a thread of the daemon panicked (see its stderr)".into());
        }
        if let Some(e) = load_err {
            failures.push(format!("the load on export B failed: {e}"));
        }
        if let Some(e) = control_err {
            failures.push(format!("the load on the control export failed: {e}"));
        }
        let r = &self.report;
        let l = self.limits;
        let attack = r.attack.clone().unwrap_or_default();
        let ratio = attack.best() / r.baseline_relative();
        if attack.control_sum == 0.0 {
            failures.push("the control export completed no requests during the attack".into());
        } else if ratio < l.min_iops_ratio {
            failures.push(format!(
                "export B dropped to {:.0}% of its baseline IOPS relative to the control \
                 export (B's IOPS over the control's in window pairs: best {:.2} under \
                 attack [{}], median {:.2} before [{}]{}; B's IOPS {:.0} under attack, {:.0} \
                 before; at least {:.0}% required)",
                ratio * 100.0,
                attack.best(),
                attack.pairs_text(),
                r.baseline.median(),
                r.baseline.pairs_text(),
                r.baseline_after
                    .as_ref()
                    .map(|a| format!(", median {:.2} after [{}]", a.median(), a.pairs_text()))
                    .unwrap_or_default(),
                attack.b_iops(),
                r.baseline.b_iops(),
                l.min_iops_ratio * 100.0
            ));
        }
        let cpu = r.quiet_cpu_cores.unwrap_or(0.0);
        if cpu > l.max_cpu_cores {
            failures.push(format!(
                "vubd used {cpu:.2} cores after the attack input was sent, with nothing \
                 legitimate running (at most {:.2} allowed)",
                l.max_cpu_cores
            ));
        }
        let growth = r.rss_max.saturating_sub(r.rss_baseline);
        if growth > l.max_rss_growth {
            failures.push(format!(
                "vubd's RssAnon grew by {} MiB (from {} MiB to {} MiB; at most {} MiB allowed)",
                growth / MIB,
                r.rss_baseline / MIB,
                r.rss_max / MIB,
                l.max_rss_growth / MIB
            ));
        }
        if alive && r.fd_after > r.fd_baseline + l.max_fd_growth {
            failures.push(format!(
                "vubd has {} open fds after the attack, {} before (leak?)",
                r.fd_after, r.fd_baseline
            ));
        }
        if alive && r.threads_after > r.threads_baseline + l.max_thread_growth {
            failures.push(format!(
                "vubd has {} threads after the attack, {} before (leak?)",
                r.threads_after, r.threads_baseline
            ));
        }
        let mut per: BTreeMap<(u64, String), usize> = BTreeMap::new();
        for (sec, line) in &samples.lines {
            *per.entry((*sec, log_kind(line))).or_default() += 1;
        }
        let worst = per
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|((_, k), n)| (k.clone(), *n));
        self.report.worst_log_kind = worst.clone();
        if let Some((kind, n)) = &worst {
            if *n > l.max_log_lines_per_sec {
                failures.push(format!(
                    "vubd logged {n} lines of one kind in one second (at most {} allowed): \
                     {kind:?}",
                    l.max_log_lines_per_sec
                ));
            }
        }
        let r = &self.report;
        eprintln!(
            "{}: B IOPS baseline {:.0} ({:.2} of the control's, median), under attack {:.0} \
             ({:.2} of the control's, best of {} window pairs): {:.0}%; vubd CPU after the attack {:.3} cores; RssAnon {:.1} -> max {:.1} MiB; fds {} -> {}; threads {} -> {}; \
             {} log lines, \
             worst {}/s: {:?}; {:.1} s",
            self.name,
            r.baseline.b_iops(),
            r.baseline_relative(),
            attack.b_iops(),
            attack.best(),
            attack.pairs.len(),
            ratio * 100.0,
            cpu,
            r.rss_baseline as f64 / MIB as f64,
            r.rss_max as f64 / MIB as f64,
            r.fd_baseline,
            r.fd_after,
            r.threads_baseline,
            r.threads_after,
            r.log_lines,
            worst.as_ref().map_or(0, |w| w.1),
            worst.as_ref().map_or("", |w| w.0.as_str()),
            self.t0.elapsed().as_secs_f64(),
        );
        if !failures.is_empty() {
            let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "{}: {}\nlast lines of the daemon's stderr:\n{}",
                self.name,
                failures.join("\n"),
                tail.join("\n")
            );
        }
        self.report.clone()
    }
}

/// How [`Dev::connect`] sets up the raw frontend.
#[derive(Debug, Clone)]
pub struct DevOpts {
    pub handshake: HandshakeOpts,
    /// Guest memory regions (gpa, size); the first one holds the ring of queue 0 at its
    /// start, then the bump allocator's range.
    pub regions: Vec<(u64, u64)>,
    /// Entries of queue 0's ring.
    pub queue_size: u16,
    /// Start queue 0 (false: the test starts queues itself).
    pub start_queue: bool,
}

impl Default for DevOpts {
    fn default() -> Self {
        DevOpts {
            handshake: HandshakeOpts::default(),
            regions: vec![(MIB, 16 * MIB)],
            queue_size: 16,
            start_queue: true,
        }
    }
}

/// What became of a request the test submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The device put it in the used ring; `status` is the byte at the test's status
    /// address afterwards.
    Completed { used: UsedElem, status: u8 },
    /// Neither it nor a valid request submitted after it completed, and the used ring
    /// is as it was: the device stopped the queue.
    Stopped { err_signalled: bool },
    /// It never completed although a later valid request did: the device dropped it
    /// silently (a guest would wait for it forever).
    Dropped,
}

/// Collects the verdicts on the sub-cases of a test, so that one failing sub-case does
/// not hide what the others do; [`Checks::assert_all`] fails the test at the end.
#[derive(Debug, Default)]
pub struct Checks {
    failures: Vec<String>,
}

impl Checks {
    /// `what` must hold; `detail` describes what happened.
    pub fn expect(&mut self, what: &str, ok: bool, detail: String) {
        if ok {
            eprintln!("  ok: {what}: {detail}");
        } else {
            eprintln!("  FAILED: {what}: {detail}");
            self.failures.push(format!("{what}: {detail}"));
        }
    }

    /// The request was refused: IOERR or UNSUPP in its status byte, or a stopped queue.
    pub fn refused(&mut self, what: &str, o: Outcome) {
        let ok = match o {
            Outcome::Completed { status, .. } => {
                status == VIRTIO_BLK_S_IOERR || status == VIRTIO_BLK_S_UNSUPP
            }
            Outcome::Stopped { .. } => true,
            Outcome::Dropped => false,
        };
        let detail = if ok {
            format!("{o:?}")
        } else {
            format!(
                "expected IOERR/UNSUPP in the status byte or a stopped queue, got {o:?} \
                 (status {STATUS_CANARY:#x} = not written, 0 = OK)"
            )
        };
        self.expect(what, ok, detail);
    }

    /// The request completed with `status`.
    pub fn status(&mut self, what: &str, o: Outcome, status: u8) {
        let ok = matches!(o, Outcome::Completed { status: st, .. } if st == status);
        self.expect(what, ok, format!("expected status {status}, got {o:?}"));
    }

    /// Fails the test if any check failed, listing them all.
    #[track_caller]
    pub fn assert_all(self) {
        assert!(
            self.failures.is_empty(),
            "{} check(s) failed:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

/// Asserts a refused request: IOERR or UNSUPP in its status byte, or a stopped queue.
#[track_caller]
pub fn assert_refused(what: &str, o: Outcome) {
    match o {
        Outcome::Completed { status, .. }
            if status == VIRTIO_BLK_S_IOERR || status == VIRTIO_BLK_S_UNSUPP => {}
        Outcome::Stopped { .. } => {}
        other => panic!(
            "{what}: expected IOERR/UNSUPP in the status byte or a stopped queue, got \
             {other:?} (status {STATUS_CANARY:#x} = not written, 0 = OK)"
        ),
    }
    eprintln!("  {what}: {o:?}");
}

/// A raw frontend on export A with queue 0 running, guest memory, and a bump allocator
/// for headers, status bytes and buffers.
pub struct Dev {
    pub fe: Frontend,
    pub q: SplitQueue,
    pub heap: Bump,
    pub cfg: BlkConfig,
    next_desc: u16,
}

impl Dev {
    /// Connects with fresh guest memory ([`DevOpts::regions`]).
    pub fn connect(sock: &Path, opts: &DevOpts) -> VuResult<Dev> {
        let regions: Vec<Arc<MemRegion>> = opts
            .regions
            .iter()
            .map(|&(gpa, size)| MemRegion::new(gpa, size))
            .collect();
        Dev::connect_mem(sock, opts, regions)
    }

    /// Connects with the given guest memory (e.g. that of a previous connection; the
    /// first region holds the ring). [`DevOpts::regions`] is not used.
    pub fn connect_mem(sock: &Path, opts: &DevOpts, regions: Vec<Arc<MemRegion>>) -> VuResult<Dev> {
        let mut fe = Frontend::connect(sock)?;
        // The daemon answers once it is done with the previous frontend.
        fe.conn.timeout = Duration::from_secs(15);
        let offered = fe.get_features()?;
        fe.conn.timeout = Duration::from_secs(5);
        let p = fe.get_protocol_features()?;
        fe.set_protocol_features(p & opts.handshake.protocol)?;
        fe.set_owner()?;
        fe.set_features(offered & opts.handshake.features)?;
        let cfg_bytes = fe.get_config(0, 60)?;
        let cfg = BlkConfig::parse(&cfg_bytes)
            .ok_or_else(|| VuError::BadReply(format!("config space: {cfg_bytes:?}")))?;
        let r0 = regions[0].clone();
        // The table in address order, as VMMs send it (vubd refuses unsorted tables).
        let mut sorted = regions.clone();
        sorted.sort_by_key(|r| r.gpa());
        fe.set_mem_table(&sorted)?;
        let layout = RingLayout::contiguous(r0.gpa(), opts.queue_size);
        let heap_start = (r0.gpa() + layout.total_len()).next_multiple_of(4096);
        let q = if opts.start_queue {
            fe.start_queue(0, layout)?
        } else {
            SplitQueue::new(0, layout, &fe.mem)
        };
        Ok(Dev {
            heap: Bump::new(heap_start, r0.end()),
            fe,
            q,
            cfg,
            next_desc: 0,
        })
    }

    pub fn mem(&self) -> &crate::vu_frontend::GuestMemory {
        &self.fe.mem
    }

    /// Starts queue 0 at its layout (when [`DevOpts::start_queue`] was false).
    pub fn start_queue(&mut self) -> VuResult<()> {
        self.q = self.fe.start_queue(0, self.q.layout)?;
        Ok(())
    }

    /// A 16-byte request header in guest memory.
    pub fn header(&mut self, kind: u32, sector: u64) -> u64 {
        let at = self.heap.alloc(16, 16);
        self.fe.mem.write(at, &blk_header(kind, sector));
        at
    }

    /// A status byte (8 bytes reserved) preset to [`STATUS_CANARY`].
    pub fn status(&mut self) -> u64 {
        let at = self.heap.alloc(8, 8);
        self.fe.mem.fill(at, 8, STATUS_CANARY);
        at
    }

    /// A buffer of `len` bytes at an address `align`-aligned plus `misalign`, filled with
    /// `fill`.
    pub fn buffer(&mut self, len: u64, align: u64, misalign: u64, fill: u8) -> u64 {
        let at = self.heap.alloc(len + misalign, align) + misalign;
        self.fe.mem.fill(at, len as usize, fill);
        at
    }

    /// `n` consecutive descriptor indices (wrapping to 0 when the table is used up; every
    /// request submitted before must have completed then).
    pub fn desc_slots(&mut self, n: u16) -> u16 {
        assert!(
            n <= self.q.size(),
            "test bug: {n} descriptors in a ring of {}",
            self.q.size()
        );
        if self.next_desc + n > self.q.size() {
            assert_eq!(
                self.q.used_idx(),
                self.q.avail_idx(),
                "test bug: descriptor slots wrap around while requests are in flight (use a \
                 larger queue)"
            );
            self.next_desc = 0;
        }
        let first = self.next_desc;
        self.next_desc += n;
        first
    }

    /// Writes `descs` as a linked chain in fresh slots, publishes it and kicks; returns
    /// the head.
    pub fn submit_chain(&mut self, descs: &[Desc]) -> u16 {
        let first = self.desc_slots(descs.len() as u16);
        let head = self.q.write_chain(first, descs);
        self.q.submit(head);
        head
    }

    /// Writes descriptors at explicit indices (`(index, desc)`, links as given),
    /// publishes `head` and kicks.
    pub fn submit_table(&mut self, entries: &[(u16, Desc)], head: u16) {
        for &(i, d) in entries {
            self.q.write_desc(i, d);
        }
        self.q.submit(head);
    }

    /// A valid read of `len` bytes at `sector` (header, one data buffer, status);
    /// returns (head, data gpa, status gpa).
    pub fn read(&mut self, sector: u64, len: u32) -> (u16, u64, u64) {
        let h = self.header(VIRTIO_BLK_T_IN, sector);
        let d = self.buffer(u64::from(len), 512, 0, 0x99);
        let s = self.status();
        let head = self.submit_chain(&[
            Desc::readable(h, 16),
            Desc::writable(d, len),
            Desc::writable(s, 1),
        ]);
        (head, d, s)
    }

    /// Waits for `head` (up to `timeout`); its used element and status byte.
    pub fn wait(
        &mut self,
        head: u16,
        status_gpa: u64,
        timeout: Duration,
    ) -> Option<(UsedElem, u8)> {
        let e = self.q.wait_for_head(head, timeout);
        e.map(|e| (e, self.fe.mem.read_u8(status_gpa)))
    }

    /// What became of the request at `head` whose status byte is at `status_gpa`: waits
    /// for it; if it does not complete, submits a valid read to tell a stopped queue from
    /// a dropped request.
    pub fn observe(&mut self, head: u16, status_gpa: u64) -> Outcome {
        let used_before = self.q.used_idx();
        if let Some((used, status)) = self.wait(head, status_gpa, OBSERVE_WAIT) {
            return Outcome::Completed { used, status };
        }
        let (h2, _, _) = self.read(0, 512);
        let e = self.q.wait_for_head(h2, OBSERVE_WAIT);
        if e.is_some() {
            return Outcome::Dropped;
        }
        assert_eq!(
            self.q.used_idx(),
            used_before,
            "used.idx moved but neither request completed"
        );
        Outcome::Stopped {
            err_signalled: self.q.take_err(),
        }
    }

    /// Submits `descs` as a linked chain and observes it (see [`Dev::observe`]).
    pub fn probe_chain(&mut self, descs: &[Desc], status_gpa: u64) -> Outcome {
        let head = self.submit_chain(descs);
        self.observe(head, status_gpa)
    }

    /// A valid read through this frontend: OK and the image's data (checked against
    /// [`pattern`] when `check` is set).
    #[track_caller]
    pub fn assert_read_ok(&mut self, sector: u64, len: u32, check: bool) {
        let (head, data, status) = self.read(sector, len);
        let (used, st) = self
            .wait(head, status, Duration::from_secs(5))
            .unwrap_or_else(|| {
                panic!("a valid read (sector {sector}, {len} bytes) did not complete")
            });
        assert_eq!(
            st, VIRTIO_BLK_S_OK,
            "a valid read failed: status {st}, {used:?}"
        );
        assert_eq!(used.len, len + 1, "used length of a valid read");
        if check {
            let got = self.fe.mem.read(data, len as usize);
            crate::util::assert_same_data("valid read", &got, &pattern(sector * 512, len as usize));
        }
    }
}

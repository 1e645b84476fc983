//! vubd-bench: vubd vs qemu-storage-daemon through libblkio, same backing, same options.
//!
//! For every (backend, workload, config) case the two daemons run alternately
//! (vubd, qsd, vubd, qsd, ...) `--reps` times; each run starts a fresh daemon, connects a
//! libblkio client, warms up, measures for `--runtime` seconds, and stops the daemon.
//! Medians over the repetitions are printed as a markdown table.

use blkio::{Completion, ReqFlags};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vubd_tests::daemon::shell_words;
use vubd_tests::{qsd_bin, vubd_bin, Client, ClientOptions, Daemon, DaemonArgs, Rng, GIB};

const USAGE: &str = "usage: vubd-bench [--quick] [--runtime SECS] [--reps N] [--filter SUBSTR]... \
[--vubd PATH] [--qsd PATH] [--poll-max-ns N] [--client block|poll] [--no-idle] [--dir DIR]";

#[derive(Debug, Clone)]
struct Opts {
    runtime: f64,
    warmup: f64,
    reps: usize,
    filters: Vec<String>,
    vubd: PathBuf,
    qsd: PathBuf,
    poll_max_ns: Option<u64>,
    poll_client: bool,
    idle: bool,
    dir: PathBuf,
    quick: bool,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        runtime: 3.0,
        warmup: 0.5,
        reps: 3,
        filters: Vec::new(),
        vubd: PathBuf::new(),
        qsd: qsd_bin(),
        poll_max_ns: None,
        poll_client: false,
        idle: true,
        dir: PathBuf::from("/dev/shm"),
        quick: false,
    };
    let mut vubd = None;
    let mut runtime_set = false;
    let mut args = std::env::args().skip(1);
    let need = |a: &Option<String>, name: &str| -> String {
        a.clone().unwrap_or_else(|| {
            eprintln!("{name} needs a value\n{USAGE}");
            std::process::exit(2)
        })
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--runtime" => {
                o.runtime = need(&args.next(), &a).parse().expect("--runtime SECS");
                runtime_set = true;
            }
            "--reps" => o.reps = need(&args.next(), &a).parse().expect("--reps N"),
            "--filter" => o.filters.push(need(&args.next(), &a)),
            "--vubd" => vubd = Some(PathBuf::from(need(&args.next(), &a))),
            "--qsd" => o.qsd = PathBuf::from(need(&args.next(), &a)),
            "--poll-max-ns" => {
                o.poll_max_ns = Some(need(&args.next(), &a).parse().expect("--poll-max-ns N"))
            }
            "--client" => match need(&args.next(), &a).as_str() {
                "block" => o.poll_client = false,
                "poll" => o.poll_client = true,
                v => {
                    eprintln!("--client block|poll, not {v}");
                    std::process::exit(2)
                }
            },
            "--no-idle" => o.idle = false,
            "--dir" => o.dir = PathBuf::from(need(&args.next(), &a)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0)
            }
            _ => {
                eprintln!("unknown argument {a}\n{USAGE}");
                std::process::exit(2)
            }
        }
    }
    if o.quick {
        if !runtime_set {
            o.runtime = 1.0;
        }
        o.warmup = 0.25;
    }
    o.vubd = vubd.unwrap_or_else(vubd_bin);
    assert!(o.reps >= 1 && o.runtime > 0.0);
    o
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    Null,
    File,
    /// qcow2 on a fresh (empty) image for every run: writes allocate.
    Qcow2Fresh,
    /// qcow2, every cluster allocated (converted from the raw bench image).
    Qcow2,
    /// an empty qcow2 over an empty qcow2 over the raw bench image: reads go
    /// through a backing chain of three.
    Qcow2Chain,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Null => "null-co",
            Backend::File => "file",
            Backend::Qcow2Fresh => "qcow2-fresh",
            Backend::Qcow2 => "qcow2",
            Backend::Qcow2Chain => "qcow2-chain3",
        }
    }

    /// The image file the daemon opens, next to the raw bench image.
    fn image(self, raw: &Path) -> PathBuf {
        let ext = match self {
            Backend::Null | Backend::File => return raw.to_path_buf(),
            Backend::Qcow2Fresh => "fresh.qcow2",
            Backend::Qcow2 => "full.qcow2",
            Backend::Qcow2Chain => "top.qcow2",
        };
        raw.with_extension(ext)
    }

    /// Which workloads a backend is measured with (qcow2: the issue's cases).
    fn runs(self, w: &Workload, cfg: &Config) -> bool {
        match self {
            Backend::Null | Backend::File => true,
            Backend::Qcow2Fresh => cfg.queues == 1 && w.write && w.qd == 32,
            // Multiqueue on qcow2: 4k random I/O, where the image's metadata lock
            // is shared by the iothreads.
            Backend::Qcow2 => w.qd == 32 && (cfg.queues == 1 || (w.random && w.bs == 4096)),
            Backend::Qcow2Chain => cfg.queues == 1 && !w.write && w.qd == 32,
        }
    }
}

fn qemu_img(args: &[&str]) {
    let st = std::process::Command::new("qemu-img")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run qemu-img");
    assert!(st.success(), "qemu-img {args:?} failed");
}

/// Makes the qcow2 images a backend needs from the raw bench image.
fn prepare_qcow2(backend: Backend, raw: &Path) {
    let img = backend.image(raw);
    let p = |x: &Path| x.to_str().expect("utf-8 path").to_string();
    let size = DEV_SIZE.to_string();
    match backend {
        Backend::Qcow2Fresh => qemu_img(&["create", "-f", "qcow2", &p(&img), &size]),
        Backend::Qcow2 => qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &p(raw), &p(&img)]),
        Backend::Qcow2Chain => {
            let mid = raw.with_extension("mid.qcow2");
            qemu_img(&[
                "create",
                "-f",
                "qcow2",
                "-b",
                &p(raw),
                "-F",
                "raw",
                &p(&mid),
                &size,
            ]);
            qemu_img(&[
                "create",
                "-f",
                "qcow2",
                "-b",
                &p(&mid),
                "-F",
                "qcow2",
                &p(&img),
                &size,
            ]);
        }
        Backend::Null | Backend::File => {}
    }
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    bs: usize,
    qd: usize,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "randread-4k-qd1",
        write: false,
        random: true,
        bs: 4096,
        qd: 1,
    },
    Workload {
        name: "randread-4k-qd32",
        write: false,
        random: true,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "randwrite-4k-qd1",
        write: true,
        random: true,
        bs: 4096,
        qd: 1,
    },
    Workload {
        name: "randwrite-4k-qd32",
        write: true,
        random: true,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "seqread-64k-qd32",
        write: false,
        random: false,
        bs: 65536,
        qd: 32,
    },
    Workload {
        name: "seqwrite-64k-qd32",
        write: true,
        random: false,
        bs: 65536,
        qd: 32,
    },
];

#[derive(Debug, Clone, Copy)]
struct Config {
    name: &'static str,
    queues: usize,
    iothreads: usize,
}

const CONFIGS: &[Config] = &[
    Config {
        name: "1q/1iothread",
        queues: 1,
        iothreads: 1,
    },
    Config {
        name: "4q/2iothreads",
        queues: 4,
        iothreads: 2,
    },
];

const DEV_SIZE: u64 = GIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Vubd,
    Qsd,
}

/// The daemon command line. Both get the same options, except that qemu-storage-daemon
/// (10.x) accepts only one iothread per export: it gets the first one.
fn daemon_args(
    o: &Opts,
    which: Which,
    backend: Backend,
    cfg: Config,
    image: &Path,
    sock: &Path,
) -> Vec<String> {
    let poll = o
        .poll_max_ns
        .map(|n| format!(",poll-max-ns={n}"))
        .unwrap_or_default();
    let nthreads = if which == Which::Qsd {
        1
    } else {
        cfg.iothreads
    };
    let mut a = DaemonArgs::new();
    for i in 0..nthreads {
        a = a.object(&format!("iothread,id=io{i}{poll}"));
    }
    a = match backend {
        Backend::Null => a.blockdev(&format!(
            "driver=null-co,node-name=disk0,size={DEV_SIZE},read-zeroes=off"
        )),
        Backend::File => a.file_raw_path("disk0", image, ",cache.direct=off", ""),
        Backend::Qcow2Fresh | Backend::Qcow2 | Backend::Qcow2Chain => a
            .blockdev(&format!(
                "driver=file,node-name=disk0-file,filename={},cache.direct=off",
                backend.image(image).display()
            ))
            .blockdev("driver=qcow2,node-name=disk0,file=disk0-file"),
    };
    let iothreads = if nthreads == 1 {
        ",iothread=io0".to_string()
    } else {
        (0..nthreads)
            .map(|i| format!(",iothread.{i}=io{i}"))
            .collect()
    };
    a.vhost_user_blk(
        "disk0",
        sock,
        &format!(",writable=on,num-queues={}{iothreads}", cfg.queues),
    )
    .build()
}

/// One measured run.
#[derive(Debug, Clone, Default)]
struct RunResult {
    ios: u64,
    errors: u64,
    secs: f64,
    lat_mean_us: f64,
    lat_p99_us: f64,
    cpu_us_per_io: f64,
    bs: usize,
}

impl RunResult {
    fn iops(&self) -> f64 {
        self.ios as f64 / self.secs
    }
    fn mib_s(&self) -> f64 {
        self.iops() * self.bs as f64 / (1024.0 * 1024.0)
    }
}

/// Per-thread I/O loop on one queue; returns (ios, errors, latencies in ns) for completions
/// inside start..end.
fn io_loop(
    q: &mut vubd_tests::IoQueue,
    w: Workload,
    region: (u64, u64),
    seed: u64,
    start: Instant,
    end: Instant,
) -> (u64, u64, Vec<u32>) {
    let (bq, buf, buf_len) = q.raw();
    assert!(w.qd * w.bs <= buf_len, "queue buffer too small");
    let mut rng = Rng::with_seed(seed);
    let (base, len) = region;
    let blocks = len / w.bs as u64;
    let mut seq_next = 0u64;
    let mut next_offset = |rng: &mut Rng| -> u64 {
        if w.random {
            base + rng.range(0, blocks) * w.bs as u64
        } else {
            let o = base + (seq_next % blocks) * w.bs as u64;
            seq_next += 1;
            o
        }
    };
    let mut t0 = vec![Instant::now(); w.qd];
    let submit = |bq: &mut blkio::Blkioq, slot: usize, off: u64| {
        // SAFETY: slot < qd and qd * bs <= buf_len (asserted), so the slot's buffer is in
        // the queue's shared buffer, which outlives this loop; each slot has one request
        // in flight at a time.
        let p = unsafe { buf.add(slot * w.bs) };
        if w.write {
            bq.write(off, p, w.bs, slot, ReqFlags::empty());
        } else {
            bq.read(off, p, w.bs, slot, ReqFlags::empty());
        }
    };
    for (slot, t) in t0.iter_mut().enumerate() {
        *t = Instant::now();
        submit(bq, slot, next_offset(&mut rng));
    }
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..w.qd).map(|_| MaybeUninit::uninit()).collect();
    let mut in_flight = w.qd;
    let (mut ios, mut errors) = (0u64, 0u64);
    let mut lats: Vec<u32> = Vec::with_capacity(1 << 20);
    while in_flight > 0 {
        let n = match bq.do_io(&mut completions, 1, None, None) {
            Ok(n) => n,
            Err(e) if e.errno() == blkio::Errno::INTR => continue,
            Err(e) => panic!("do_io: {e}"),
        };
        let now = Instant::now();
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            if now >= start && now < end {
                if c.ret == 0 {
                    ios += 1;
                    let ns = now.duration_since(t0[slot]).as_nanos();
                    lats.push(ns.min(u128::from(u32::MAX)) as u32);
                } else {
                    errors += 1;
                }
            }
            if now < end {
                t0[slot] = Instant::now();
                submit(bq, slot, next_offset(&mut rng));
            } else {
                in_flight -= 1;
            }
        }
    }
    (ios, errors, lats)
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

struct Prepared {
    daemon: Daemon,
    client: Client,
}

fn start(
    o: &Opts,
    which: Which,
    backend: Backend,
    cfg: Config,
    image: &Path,
    sock: &Path,
) -> Result<Prepared, String> {
    let bin = match which {
        Which::Vubd => &o.vubd,
        Which::Qsd => &o.qsd,
    };
    let args = daemon_args(o, which, backend, cfg, image, sock);
    let daemon = Daemon::try_start(bin, &args, &[sock.to_path_buf()])?;
    let copts = ClientOptions {
        num_queues: cfg.queues,
        poll: o.poll_client,
        buf_per_queue: 4 << 20,
        ..Default::default()
    };
    let client = Client::connect_with(sock, &copts)?;
    if client.capacity() != DEV_SIZE {
        return Err(format!("capacity {} != {DEV_SIZE}", client.capacity()));
    }
    Ok(Prepared { daemon, client })
}

/// One benchmark case.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    backend: Backend,
    cfg: Config,
    w: Workload,
}

fn run_once(
    o: &Opts,
    which: Which,
    case: &Case,
    image: &Path,
    sock: &Path,
    seed: u64,
) -> Result<RunResult, String> {
    let (backend, cfg, w) = (case.backend, case.cfg, case.w);
    if backend == Backend::Qcow2Fresh {
        // Every run allocates from an empty image.
        prepare_qcow2(backend, image);
    }
    let Prepared {
        mut daemon,
        mut client,
    } = start(o, which, backend, cfg, image, sock)?;
    let nq = cfg.queues as u64;
    let region_len = DEV_SIZE / nq;
    let t_start = Instant::now() + Duration::from_secs_f64(o.warmup);
    let t_end = t_start + Duration::from_secs_f64(o.runtime);
    let pid = daemon.pid();
    let mut cpu0 = Duration::ZERO;
    let mut cpu1 = Duration::ZERO;
    let results: Vec<(u64, u64, Vec<u32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = client
            .queues_mut()
            .iter_mut()
            .enumerate()
            .map(|(i, q)| {
                let region = if w.random {
                    (0, DEV_SIZE)
                } else {
                    (i as u64 * region_len, region_len)
                };
                let seed = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                s.spawn(move || io_loop(q, w, region, seed, t_start, t_end))
            })
            .collect();
        sleep_until(t_start);
        cpu0 = vubd_tests::daemon::cpu_time_of(pid).unwrap_or_default();
        sleep_until(t_end);
        cpu1 = vubd_tests::daemon::cpu_time_of(pid).unwrap_or_default();
        handles
            .into_iter()
            .map(|h| h.join().expect("I/O thread panicked"))
            .collect()
    });
    drop(client);
    stop_daemon(&mut daemon, which);
    let ios: u64 = results.iter().map(|r| r.0).sum();
    let errors: u64 = results.iter().map(|r| r.1).sum();
    let mut lats: Vec<u32> = results.into_iter().flat_map(|r| r.2).collect();
    lats.sort_unstable();
    let mean = if lats.is_empty() {
        0.0
    } else {
        lats.iter().map(|&l| f64::from(l)).sum::<f64>() / lats.len() as f64 / 1000.0
    };
    let p99 = if lats.is_empty() {
        0.0
    } else {
        f64::from(lats[((lats.len() as f64 * 0.99) as usize).min(lats.len() - 1)]) / 1000.0
    };
    let cpu = cpu1.saturating_sub(cpu0);
    Ok(RunResult {
        ios,
        errors,
        secs: o.runtime,
        lat_mean_us: mean,
        lat_p99_us: p99,
        cpu_us_per_io: if ios > 0 {
            cpu.as_secs_f64() * 1e6 / ios as f64
        } else {
            f64::NAN
        },
        bs: w.bs,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Debug, Clone, Default)]
struct Summary {
    iops: f64,
    mib_s: f64,
    lat_mean: f64,
    lat_p99: f64,
    cpu_per_io: f64,
    errors: u64,
    failed: Option<String>,
}

fn summarize(runs: &[Result<RunResult, String>]) -> Summary {
    let ok: Vec<&RunResult> = runs.iter().filter_map(|r| r.as_ref().ok()).collect();
    let failed = runs.iter().find_map(|r| r.as_ref().err().cloned());
    if ok.is_empty() {
        return Summary {
            iops: f64::NAN,
            mib_s: f64::NAN,
            lat_mean: f64::NAN,
            lat_p99: f64::NAN,
            cpu_per_io: f64::NAN,
            errors: 0,
            failed,
        };
    }
    Summary {
        iops: median(ok.iter().map(|r| r.iops()).collect()),
        mib_s: median(ok.iter().map(|r| r.mib_s()).collect()),
        lat_mean: median(ok.iter().map(|r| r.lat_mean_us).collect()),
        lat_p99: median(ok.iter().map(|r| r.lat_p99_us).collect()),
        cpu_per_io: median(ok.iter().map(|r| r.cpu_us_per_io).collect()),
        errors: ok.iter().map(|r| r.errors).sum(),
        failed,
    }
}

fn fmt_num(v: f64, prec: usize) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v >= 10000.0 {
        format!("{:.0}", v)
    } else {
        format!("{v:.prec$}")
    }
}

/// Stops a daemon with SIGTERM. qemu-storage-daemon 7.2 sometimes hangs on SIGTERM
/// after multiqueue runs: a daemon that does not exit is killed and reported, not
/// fatal to the benchmark.
fn stop_daemon(daemon: &mut Daemon, which: Which) {
    daemon.signal(libc::SIGTERM);
    match daemon.wait_timeout(Duration::from_secs(10)) {
        Some(st) if st.code() == Some(0) => {}
        Some(st) => eprintln!(
            "warning: {which:?} exited with {st:?} after SIGTERM; stderr:\n{}",
            daemon.stderr()
        ),
        None => {
            daemon.kill();
            eprintln!("warning: {which:?} did not exit within 10 s of SIGTERM; killed");
        }
    }
}

/// CPU % of a daemon with a connected, idle client over `secs`.
fn idle_cpu(o: &Opts, which: Which, cfg: Config, sock: &Path) -> Result<f64, String> {
    let Prepared { mut daemon, client } = start(o, which, Backend::Null, cfg, Path::new(""), sock)?;
    let secs = 2.0;
    std::thread::sleep(Duration::from_millis(200));
    let c0 = daemon.cpu_time();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let c1 = daemon.cpu_time();
    drop(client);
    stop_daemon(&mut daemon, which);
    Ok(c1.saturating_sub(c0).as_secs_f64() / secs * 100.0)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn version_of(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_default()
}

fn main() {
    let o = parse_args();
    for (name, bin) in [("vubd", &o.vubd), ("qemu-storage-daemon", &o.qsd)] {
        if !bin.is_file() {
            eprintln!("{name} not found at {}", bin.display());
            std::process::exit(1);
        }
    }
    let dir = vubd_tests::TempDir::new("vubd-bench");
    let image = o
        .dir
        .join(format!("{}.img", vubd_tests::unique_name("vubd-bench")));
    let mut seed_rng = Rng::with_seed(0x5eed);

    let mut cases = Vec::new();
    for backend in [
        Backend::Null,
        Backend::File,
        Backend::Qcow2Fresh,
        Backend::Qcow2,
        Backend::Qcow2Chain,
    ] {
        for cfg in CONFIGS {
            for w in WORKLOADS {
                let name = format!("{}/{}/{}", backend.name(), w.name, cfg.name);
                if !backend.runs(w, cfg) {
                    continue;
                }
                if o.filters.is_empty() || o.filters.iter().any(|f| name.contains(f.as_str())) {
                    cases.push(Case {
                        name,
                        backend,
                        cfg: *cfg,
                        w: *w,
                    });
                }
            }
        }
    }
    if cases.is_empty() {
        eprintln!("no case matches the filter(s) {:?}", o.filters);
        std::process::exit(1);
    }

    // Preallocate the image: every page written, so reads hit real memory.
    let _image_guard = if cases.iter().any(|c| c.backend != Backend::Null) {
        eprintln!(
            "preparing {} ({} GiB, fully written)...",
            image.display(),
            DEV_SIZE / GIB
        );
        let f = std::fs::File::create(&image).expect("create bench image");
        let chunk: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7 + 3) as u8).collect();
        let mut off = 0u64;
        use std::os::unix::fs::FileExt;
        while off < DEV_SIZE {
            f.write_all_at(&chunk, off).expect("write bench image");
            off += chunk.len() as u64;
        }
        for b in [Backend::Qcow2, Backend::Qcow2Chain] {
            if cases.iter().any(|c| c.backend == b) {
                eprintln!("preparing {}...", b.image(&image).display());
                prepare_qcow2(b, &image);
            }
        }
        Some(ImageGuard(image.clone()))
    } else {
        None
    };

    let total_runs = cases.len() * o.reps * 2;
    eprintln!(
        "{} cases x {} reps x 2 daemons = {total_runs} runs of {}s (+{}s warm-up)",
        cases.len(),
        o.reps,
        o.runtime,
        o.warmup
    );
    let mut rows = Vec::new();
    let mut example_cmds: Vec<(String, String)> = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let (name, backend, cfg) = (&case.name, &case.backend, &case.cfg);
        let mut runs_v = Vec::new();
        let mut runs_q = Vec::new();
        for rep in 0..o.reps {
            for which in [Which::Vubd, Which::Qsd] {
                let sock = dir.join(&format!("{}.sock", vubd_tests::unique_name("b")));
                let seed = seed_rng.next_u64();
                let r = run_once(&o, which, case, &image, &sock, seed);
                match &r {
                    Ok(r) => eprintln!(
                        "[{}/{}] {name} {which:?} rep {rep}: {:.0} IOPS, {:.1} us mean, {:.1} us p99, \
                         {:.2} us CPU/IO{}",
                        i + 1,
                        cases.len(),
                        r.iops(),
                        r.lat_mean_us,
                        r.lat_p99_us,
                        r.cpu_us_per_io,
                        if r.errors > 0 {
                            format!(", {} ERRORS", r.errors)
                        } else {
                            String::new()
                        }
                    ),
                    Err(e) => eprintln!("[{}/{}] {name} {which:?} rep {rep}: FAILED: {e}", i + 1, cases.len()),
                }
                if which == Which::Vubd {
                    runs_v.push(r);
                } else {
                    runs_q.push(r);
                }
            }
        }
        let ex_key = format!("{}/{}", backend.name(), cfg.name);
        if !example_cmds.iter().any(|(k, _)| *k == ex_key) {
            let sock = dir.join("vubd.sock");
            for (which, bin) in [(Which::Vubd, &o.vubd), (Which::Qsd, &o.qsd)] {
                let args = daemon_args(&o, which, *backend, *cfg, &image, &sock);
                example_cmds.push((ex_key.clone(), shell_words(bin, &args)));
            }
        }
        rows.push((name.clone(), summarize(&runs_v), summarize(&runs_q)));
    }

    let mut idle_rows = Vec::new();
    if o.idle {
        for cfg in CONFIGS {
            let mut row = Vec::new();
            for which in [Which::Vubd, Which::Qsd] {
                let sock = dir.join(&format!("{}.sock", vubd_tests::unique_name("idle")));
                row.push(idle_cpu(&o, which, *cfg, &sock));
            }
            idle_rows.push((cfg.name, row));
        }
    }

    // Report.
    let cmdline: Vec<String> = std::env::args().collect();
    println!("## vubd vs qemu-storage-daemon (libblkio virtio-blk-vhost-user client)\n");
    println!("Command: `{}`\n", cmdline.join(" "));
    // SAFETY: sysconf has no memory-safety preconditions.
    let ncpu = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    println!(
        "Host: {} ({ncpu} CPUs); vubd: {}; qsd: {}",
        cpu_model(),
        o.vubd.display(),
        version_of(&o.qsd)
    );
    println!(
        "Runs: {} reps per daemon, alternating vubd/qsd, {}s measured after {}s warm-up, \
         fresh daemon per run; medians shown. Client: libblkio {} queues, one thread per \
         queue, queue depth per queue as named (4q: 4 threads x QD). Devices: null-co \
         1 GiB read-zeroes=off; file = raw on a fully written 1 GiB file in {} \
         (cache.direct=off). poll-max-ns: {}.",
        o.reps,
        o.runtime,
        o.warmup,
        if o.poll_client {
            "poll"
        } else {
            "blocking (eventfd)"
        },
        o.dir.display(),
        o.poll_max_ns
            .map(|n| n.to_string())
            .unwrap_or_else(|| "daemon default".into())
    );
    println!(
        "Note: qemu-storage-daemon 10 accepts a single `iothread` per vhost-user-blk export, so \
         in the 4q/2iothreads config it runs all 4 queues on one iothread.\n"
    );
    println!(
        "| case | vubd IOPS | qsd IOPS | vubd/qsd | vubd MiB/s | qsd MiB/s | vubd lat mean/p99 us \
         | qsd lat mean/p99 us | vubd CPU us/IO | qsd CPU us/IO |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, v, q) in &rows {
        let ratio = if v.iops.is_nan() || q.iops.is_nan() || q.iops == 0.0 {
            "n/a".to_string()
        } else {
            format!("{:.2}", v.iops / q.iops)
        };
        println!(
            "| {name} | {} | {} | {ratio} | {} | {} | {} / {} | {} / {} | {} | {} |",
            fmt_num(v.iops, 0),
            fmt_num(q.iops, 0),
            fmt_num(v.mib_s, 1),
            fmt_num(q.mib_s, 1),
            fmt_num(v.lat_mean, 1),
            fmt_num(v.lat_p99, 1),
            fmt_num(q.lat_mean, 1),
            fmt_num(q.lat_p99, 1),
            fmt_num(v.cpu_per_io, 2),
            fmt_num(q.cpu_per_io, 2),
        );
    }
    for (name, v, q) in &rows {
        for (who, s) in [("vubd", v), ("qsd", q)] {
            if s.errors > 0 {
                println!(
                    "\n**{name}: {who} completed {} requests with errors**",
                    s.errors
                );
            }
            if let Some(e) = &s.failed {
                println!(
                    "\n**{name}: a {who} run failed:** `{}`",
                    e.replace('\n', " ")
                );
            }
        }
    }
    if !idle_rows.is_empty() {
        println!("\nIdle CPU (null-co, client connected, no I/O, 2 s):\n");
        println!("| config | vubd CPU % | qsd CPU % |");
        println!("|---|---:|---:|");
        for (name, row) in &idle_rows {
            let f = |r: &Result<f64, String>| match r {
                Ok(v) => format!("{v:.1}"),
                Err(_) => "failed".into(),
            };
            println!("| {name} | {} | {} |", f(&row[0]), f(&row[1]));
        }
    }
    println!("\nDaemon command lines (socket path varies per run):\n");
    println!("```");
    for (_, c) in &example_cmds {
        println!("{c}");
    }
    println!("```");
}

/// Removes the bench image on exit.
struct ImageGuard(PathBuf);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        for ext in ["fresh.qcow2", "full.qcow2", "mid.qcow2", "top.qcow2"] {
            let _ = std::fs::remove_file(self.0.with_extension(ext));
        }
    }
}

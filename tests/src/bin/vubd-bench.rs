//! vubd-bench: vubd vs qemu-storage-daemon through libblkio, same backing, same options.
//!
//! For every (backend, workload, config) case the two daemons run alternately
//! (vubd, qsd, vubd, qsd, ...) `--reps` times; each run starts a fresh daemon, connects a
//! libblkio client, warms up, measures for `--runtime` seconds, and stops the daemon.
//! Medians over the repetitions are printed as a markdown table.
//!
//! Cases are (backend, workload, config); a config is one export with 1, 2 or 4 queues
//! on 1 or 2 iothreads, or `--exports N` exports of one queue each spread over 2
//! iothreads, each driven by its own client (the aggregate is reported). Two idle
//! tables follow: CPU with a connected client and no I/O, and the density of
//! `--idle-exports N` exports with no frontend (threads, idle CPU, resident memory per
//! export).

use blkio::{Completion, ReqFlags};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vubd_tests::daemon::shell_words;
use vubd_tests::{qsd_bin, vubd_bin, Client, ClientOptions, Daemon, DaemonArgs, Qmp, Rng, GIB};

const USAGE: &str = "usage: vubd-bench [--quick] [--runtime SECS] [--warmup SECS] [--reps N] \
[--filter SUBSTR]... [--exports N] [--vubd PATH] [--qsd PATH] [--poll-max-ns N] \
[--client block|poll] [--no-idle | --idle-only] [--idle-exports N] [--bitmap GRAN] [--throttle PROPS] \
[--dir DIR] [--list]
  --filter SUBSTR   run the cases whose name contains SUBSTR (repeatable: any of them);
                    names are BACKEND/WORKLOAD/CONFIG, e.g. null-co/randread-4k-qd32/2q/1iothread
                    or file/randwrite-4k-qd32/8 exports/2iothreads
  --exports N       exports in the multi-export cases (default 8)
  --no-idle         skip the idle tables (idle CPU per config, idle density)
  --idle-only       run only the idle tables
  --idle-exports N  exports of the idle density table (default 200)
  --bitmap GRAN     an enabled dirty bitmap of granularity GRAN on every exported node
                    (block-dirty-bitmap-add over QMP before the run), in both daemons
  --throttle PROPS  export every node through a throttle filter node whose group (one for
                    all exports) has the properties PROPS (e.g. '' for no limits, or
                    'x-iops-total=100000000,x-bps-total=100000000000000' for limits far
                    above the load), in both daemons
  --list            print the names of the selected cases and exit";

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
    idle_only: bool,
    idle_exports: usize,
    exports: usize,
    dir: PathBuf,
    quick: bool,
    list: bool,
    bitmap: Option<u64>,
    throttle: Option<String>,
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
        idle_only: false,
        idle_exports: 200,
        exports: 8,
        dir: PathBuf::from("/dev/shm"),
        quick: false,
        list: false,
        bitmap: None,
        throttle: None,
    };
    let mut vubd = None;
    let mut runtime_set = false;
    let mut warmup_set = false;
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
            "--warmup" => {
                o.warmup = need(&args.next(), &a).parse().expect("--warmup SECS");
                warmup_set = true;
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
            "--idle-only" => o.idle_only = true,
            "--list" => o.list = true,
            "--idle-exports" => {
                o.idle_exports = need(&args.next(), &a).parse().expect("--idle-exports N")
            }
            "--exports" => o.exports = need(&args.next(), &a).parse().expect("--exports N"),
            "--dir" => o.dir = PathBuf::from(need(&args.next(), &a)),
            "--throttle" => o.throttle = Some(need(&args.next(), &a)),
            "--bitmap" => o.bitmap = Some(need(&args.next(), &a).parse().expect("--bitmap GRAN")),
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
        if !warmup_set {
            o.warmup = 0.25;
        }
    }
    o.vubd = vubd.unwrap_or_else(vubd_bin);
    assert!(o.reps >= 1 && o.runtime > 0.0 && o.warmup >= 0.0);
    if o.exports < 2 || o.idle_exports < 2 {
        eprintln!("--exports and --idle-exports need at least 2\n{USAGE}");
        std::process::exit(2)
    }
    if o.idle_only && !o.idle {
        eprintln!("--idle-only and --no-idle exclude each other\n{USAGE}");
        std::process::exit(2)
    }
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
    /// qcow2 of 16k clusters (32 L2 tables of 16 KiB), every cluster allocated, opened
    /// with `l2-cache-size=64k` (4 tables): 4k random reads over the disk miss the L2
    /// cache 7 times in 8.
    Qcow2SmallCache,
    /// an empty qcow2 over an empty qcow2 over the raw bench image: reads go
    /// through a backing chain of three.
    Qcow2Chain,
    /// an RBD image (the raw bench image, `rbd import`ed) on the single-node Ceph
    /// cluster of `$CEPH_CONF`, or one started for the run (scripts/ceph.sh).
    Rbd,
    /// a LUKS volume (QEMU's default aes-256-xts-plain64) holding the raw bench
    /// image's data: every request is en/decrypted.
    Luks,
    /// a block device: a loop device in direct-I/O mode over the raw bench image,
    /// opened with `cache.direct=on` (`host_device`; qemu-storage-daemon with
    /// `aio=io_uring`). Every request is O_DIRECT I/O on guest memory, which the
    /// kernel pins, then the loop driver's copy from tmpfs.
    Loop,
    /// the same loop device, vubd's export with `pin-guest-memory=on` (its guest
    /// memory registered with io_uring once, not pinned per request);
    /// qemu-storage-daemon as for `loop`.
    LoopPinned,
    /// qcow2 with LUKS encryption (QEMU's defaults), every cluster allocated with the
    /// raw bench image's data.
    Qcow2Luks,
}

/// The loop device of the loop cases, once set up.
static LOOP_DEV: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The RBD image of the rbd cases (pool `rbd`), once imported.
static RBD_IMAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The passphrase of the bench's LUKS volume (a `secret` object on both daemons).
const LUKS_SECRET: &str = "secret,id=bench-key,data=vubd-bench";

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Null => "null-co",
            Backend::File => "file",
            Backend::Qcow2Fresh => "qcow2-fresh",
            Backend::Qcow2 => "qcow2",
            Backend::Qcow2SmallCache => "qcow2-smallcache",
            Backend::Qcow2Chain => "qcow2-chain3",
            Backend::Rbd => "rbd",
            Backend::Luks => "luks",
            Backend::Qcow2Luks => "qcow2-luks",
            Backend::Loop => "loop",
            Backend::LoopPinned => "loop-pinned",
        }
    }

    /// The image file the daemon opens, next to the raw bench image.
    fn image(self, raw: &Path) -> PathBuf {
        let ext = match self {
            Backend::Null | Backend::File | Backend::Rbd | Backend::Loop | Backend::LoopPinned => {
                return raw.to_path_buf()
            }
            Backend::Qcow2Fresh => "fresh.qcow2",
            Backend::Qcow2 => "full.qcow2",
            Backend::Qcow2SmallCache => "smallcache.qcow2",
            Backend::Qcow2Chain => "top.qcow2",
            Backend::Luks => "luks",
            Backend::Qcow2Luks => "luks.qcow2",
        };
        raw.with_extension(ext)
    }

    /// Which workloads a backend is measured with in a config. Every workload runs on
    /// null-co and file with 1 queue and with 4 queues on 2 iothreads; 2 and 4 queues on
    /// one iothread take 4k random reads at qd1 and qd32, 4k random writes at qd32 and
    /// 64k sequential reads; several exports take 4k random I/O at qd32. qcow2: the
    /// issue's cases (see below). Sequential I/O of 64k, 256k and 1M: file and qcow2
    /// on 1 queue and on 4 queues on 2 iothreads. This keeps the default run near 32
    /// minutes.
    fn runs(self, w: &Workload, cfg: &Config) -> bool {
        let rand4k = w.random && w.bs == 4096;
        if cfg.exports > 1 {
            return matches!(self, Backend::Null | Backend::File) && rand4k && w.qd == 32;
        }
        let one_queue = cfg.queues == 1;
        let full_mq = cfg.queues == 4 && cfg.iothreads == 2;
        let file_or_qcow2 = matches!(
            self,
            Backend::File | Backend::Qcow2 | Backend::Loop | Backend::LoopPinned
        );
        // Large sequential I/O (issue 16): file, qcow2 and the block device at 64k,
        // 256k and 1M, one queue and 4 queues on 2 iothreads.
        if file_or_qcow2 && !w.random && w.bs >= 65536 && full_mq {
            return true;
        }
        if w.bs > 65536 {
            return file_or_qcow2 && one_queue;
        }
        match self {
            // The block device: every workload on one queue and on 4 queues / 2
            // iothreads.
            Backend::Loop | Backend::LoopPinned => one_queue || full_mq,
            Backend::Null | Backend::File => {
                one_queue
                    || full_mq
                    || (rand4k && (w.qd == 32 || !w.write))
                    || (!w.random && !w.write && w.bs == 65536)
            }
            Backend::Qcow2Fresh => one_queue && w.write && w.qd == 32,
            // Multiqueue on qcow2: 4k random I/O, where the image's metadata lock is
            // shared by the iothreads (4q/2iothreads), and reads on one iothread.
            Backend::Qcow2 => w.qd == 32 && (one_queue || (rand4k && (full_mq || !w.write))),
            // Reads whose L2 tables are mostly not cached: one queue, and 4 queues on 2
            // iothreads (the read views of issue 16).
            Backend::Qcow2SmallCache => rand4k && !w.write && w.qd == 32 && (one_queue || full_mq),
            Backend::Qcow2Chain => one_queue && !w.write && w.qd == 32,
            // The issue's cases: 4k random and 64k sequential at qd32, one queue.
            Backend::Rbd => one_queue && w.qd == 32 && (rand4k || (!w.random && w.bs == 65536)),
            // The issue's cases: 4k random reads and writes, 64k sequential; and the
            // 64k rows on 4 queues over 2 iothreads, where the cipher runs on both cores.
            Backend::Luks | Backend::Qcow2Luks => {
                let seq64k = !w.random && w.bs == 65536;
                w.qd == 32
                    && ((one_queue && (rand4k || seq64k))
                        || (full_mq && seq64k && self == Backend::Luks))
            }
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

/// Makes the images a backend needs (qcow2, LUKS) from the raw bench image.
fn prepare_image(backend: Backend, raw: &Path) {
    let img = backend.image(raw);
    let p = |x: &Path| x.to_str().expect("utf-8 path").to_string();
    let size = DEV_SIZE.to_string();
    match backend {
        Backend::Qcow2Fresh => qemu_img(&["create", "-f", "qcow2", &p(&img), &size]),
        Backend::Qcow2 => qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &p(raw), &p(&img)]),
        Backend::Qcow2SmallCache => qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=16384",
            &p(raw),
            &p(&img),
        ]),
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
        Backend::Luks | Backend::Qcow2Luks => {
            let object = format!("--object={LUKS_SECRET}");
            let (fmt, opts) = match backend {
                Backend::Luks => ("luks", "key-secret=bench-key,iter-time=10"),
                _ => (
                    "qcow2",
                    "encrypt.format=luks,encrypt.key-secret=bench-key,encrypt.iter-time=10",
                ),
            };
            // qemu-img sometimes cannot time its key derivation on a loaded machine
            // ("Unable to get accurate CPU usage"): try again.
            let ok = (0..vubd_tests::tools::PBKDF2_ATTEMPTS).any(|_| {
                std::process::Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", fmt, &object])
                    .args(["-o", opts, &p(raw), &p(&img)])
                    .stdout(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
            assert!(ok, "qemu-img convert -O {fmt} failed");
        }
        Backend::Null | Backend::File | Backend::Rbd | Backend::Loop | Backend::LoopPinned => {}
    }
}

/// Attaches `raw` to a free loop device in direct-I/O mode and returns its path.
fn setup_loop(raw: &Path) -> Result<String, String> {
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(raw)
        .output()
        .map_err(|e| format!("cannot run losetup (util-linux): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "losetup --direct-io=on {} failed (root and loop devices are needed): {}",
            raw.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
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
    // Large requests: the same 4 MiB in flight per queue as 64k at qd32 (the client's
    // buffer per queue).
    Workload {
        name: "seqread-256k-qd16",
        write: false,
        random: false,
        bs: 256 << 10,
        qd: 16,
    },
    Workload {
        name: "seqwrite-256k-qd16",
        write: true,
        random: false,
        bs: 256 << 10,
        qd: 16,
    },
    Workload {
        name: "seqread-1m-qd4",
        write: false,
        random: false,
        bs: 1 << 20,
        qd: 4,
    },
    Workload {
        name: "seqwrite-1m-qd4",
        write: true,
        random: false,
        bs: 1 << 20,
        qd: 4,
    },
];

/// Exports, queues per export and iothreads of a daemon. A single export with several
/// queues is given every iothread (vubd; qemu-storage-daemon takes one iothread per
/// export, so it gets the first); otherwise export `e` runs on iothread `e % iothreads`
/// in both daemons.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Config {
    queues: usize,
    iothreads: usize,
    exports: usize,
}

impl Config {
    const fn single(queues: usize, iothreads: usize) -> Config {
        Config {
            queues,
            iothreads,
            exports: 1,
        }
    }

    /// `exports` exports of one queue each on 2 iothreads.
    fn multi(exports: usize) -> Config {
        Config {
            queues: 1,
            iothreads: 2,
            exports,
        }
    }

    fn name(&self) -> String {
        let threads = format!(
            "{}iothread{}",
            self.iothreads,
            if self.iothreads == 1 { "" } else { "s" }
        );
        if self.exports == 1 {
            format!("{}q/{threads}", self.queues)
        } else {
            assert_eq!(
                self.queues, 1,
                "multi-export configs have one queue per export"
            );
            format!("{} exports/{threads}", self.exports)
        }
    }

    /// Whether the single export spreads its queues over all the iothreads.
    fn spread(&self) -> bool {
        self.exports == 1 && self.queues > 1 && self.iothreads > 1
    }
}

/// The single-export configs, in table order; the multi-export config follows them.
const CONFIGS: &[Config] = &[
    Config::single(1, 1),
    Config::single(2, 1),
    Config::single(4, 1),
    Config::single(4, 2),
];

const DEV_SIZE: u64 = GIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Vubd,
    Qsd,
}

/// The raw file behind export `e` of a multi-export file case: `DEV_SIZE / exports`
/// bytes (whole MiB) next to the main bench image, so that the memory used does not grow
/// with the number of exports.
fn part_image(image: &Path, e: usize) -> PathBuf {
    image.with_extension(format!("part{e}.img"))
}

/// The size of each export's device.
fn export_size(backend: Backend, cfg: Config) -> u64 {
    if backend == Backend::File && cfg.exports > 1 {
        DEV_SIZE / cfg.exports as u64 / (1 << 20) * (1 << 20)
    } else {
        DEV_SIZE
    }
}

/// The daemon command line, one export per socket in `socks` (`cfg.exports` of them).
/// Both daemons get the same options, except that qemu-storage-daemon (7.2 to 10.x)
/// accepts only one iothread per export: for a single export spread over several
/// iothreads it gets the first one only.
fn daemon_args(
    o: &Opts,
    which: Which,
    backend: Backend,
    cfg: Config,
    image: &Path,
    socks: &[PathBuf],
) -> Vec<String> {
    assert_eq!(socks.len(), cfg.exports, "one socket per export");
    let poll = o
        .poll_max_ns
        .map(|n| format!(",poll-max-ns={n}"))
        .unwrap_or_default();
    let nthreads = if which == Which::Qsd && cfg.spread() {
        1
    } else {
        cfg.iothreads
    };
    let size = export_size(backend, cfg);
    let mut a = DaemonArgs::new();
    if o.bitmap.is_some() {
        a = a.monitor(&monitor_path(socks));
    }
    for i in 0..nthreads {
        a = a.object(&format!("iothread,id=io{i}{poll}"));
    }
    if let Some(props) = &o.throttle {
        let props = if props.is_empty() {
            String::new()
        } else {
            format!(",{props}")
        };
        a = a.object(&format!("throttle-group,id=tg0{props}"));
    }
    for (e, sock) in socks.iter().enumerate() {
        let node = format!("disk{e}");
        a = match backend {
            Backend::Null => a.blockdev(&format!(
                "driver=null-co,node-name={node},size={size},read-zeroes=off"
            )),
            Backend::File if cfg.exports > 1 => {
                a.file_raw_path(&node, &part_image(image, e), ",cache.direct=off", "")
            }
            Backend::File => a.file_raw_path(&node, image, ",cache.direct=off", ""),
            Backend::Luks => {
                assert_eq!(cfg.exports, 1, "luks cases have one export");
                a.object(LUKS_SECRET)
                    .blockdev(&format!(
                        "driver=file,node-name={node}-file,filename={},cache.direct=off",
                        backend.image(image).display()
                    ))
                    .blockdev(&format!(
                        "driver=luks,node-name={node},file={node}-file,key-secret=bench-key"
                    ))
            }
            Backend::Qcow2Luks => {
                assert_eq!(cfg.exports, 1, "qcow2-luks cases have one export");
                a.object(LUKS_SECRET)
                    .blockdev(&format!(
                        "driver=file,node-name={node}-file,filename={},cache.direct=off",
                        backend.image(image).display()
                    ))
                    .blockdev(&format!(
                        "driver=qcow2,node-name={node},file={node}-file,\
                         encrypt.format=luks,encrypt.key-secret=bench-key"
                    ))
            }
            Backend::Qcow2Fresh
            | Backend::Qcow2
            | Backend::Qcow2Chain
            | Backend::Qcow2SmallCache => {
                assert_eq!(cfg.exports, 1, "qcow2 cases have one export");
                let cache = if backend == Backend::Qcow2SmallCache {
                    ",l2-cache-size=65536"
                } else {
                    ""
                };
                a.blockdev(&format!(
                    "driver=file,node-name={node}-file,filename={},cache.direct=off",
                    backend.image(image).display()
                ))
                .blockdev(&format!(
                    "driver=qcow2,node-name={node},file={node}-file{cache}"
                ))
            }
            Backend::Loop | Backend::LoopPinned => {
                let aio = if which == Which::Qsd {
                    ",aio=io_uring"
                } else {
                    ""
                };
                a.blockdev(&format!(
                    "driver=host_device,node-name={node}-file,filename={},cache.direct=on{aio}",
                    LOOP_DEV.get().expect("loop device set up")
                ))
                .blockdev(&format!("driver=raw,node-name={node},file={node}-file"))
            }
            Backend::Rbd => a.blockdev(&format!(
                "driver=rbd,node-name={node},pool=rbd,image={},conf={}",
                RBD_IMAGE.get().expect("rbd image imported"),
                vubd_tests::ceph::conf()
            )),
        };
        let iothreads = if cfg.spread() && nthreads > 1 {
            (0..nthreads)
                .map(|i| format!(",iothread.{i}=io{i}"))
                .collect()
        } else {
            format!(",iothread=io{}", e % nthreads)
        };
        let node = if o.throttle.is_some() {
            a = a.blockdev(&format!(
                "driver=throttle,node-name={node}-t,file={node},throttle-group=tg0"
            ));
            format!("{node}-t")
        } else {
            node
        };
        let pin = if backend == Backend::LoopPinned && which == Which::Vubd {
            ",pin-guest-memory=on"
        } else {
            ""
        };
        a = a.vhost_user_blk(
            &node,
            sock,
            &format!(",writable=on,num-queues={}{iothreads}{pin}", cfg.queues),
        );
    }
    a.build()
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

/// How long a queue may go without any completion before its run is given up as failed
/// (instead of waiting forever for a hung daemon).
const STALL_TIMEOUT: Duration = Duration::from_secs(20);

/// What one queue completed inside the measured window.
struct QueueResult {
    ios: u64,
    errors: u64,
    /// Latency of each successful request, ns.
    lats: Vec<u32>,
}

/// Per-thread I/O loop on one queue; returns what completed inside start..end, or Err if
/// the queue stalled for [`STALL_TIMEOUT`].
fn io_loop(
    q: &mut vubd_tests::IoQueue,
    w: Workload,
    region: (u64, u64),
    seed: u64,
    start: Instant,
    end: Instant,
) -> Result<QueueResult, String> {
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
        let mut timeout = STALL_TIMEOUT;
        let n = match bq.do_io(&mut completions, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) if e.errno() == blkio::Errno::INTR => continue,
            Err(e) if e.errno() == blkio::Errno::TIME => {
                return Err(format!(
                    "no completion within {STALL_TIMEOUT:?} with {in_flight} requests in flight"
                ))
            }
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
    Ok(QueueResult { ios, errors, lats })
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

struct Prepared {
    daemon: Daemon,
    /// One client per export, in export order.
    clients: Vec<Client>,
}

fn bin_of(o: &Opts, which: Which) -> &Path {
    match which {
        Which::Vubd => &o.vubd,
        Which::Qsd => &o.qsd,
    }
}

/// Fresh socket paths in `dir`, one per export of `cfg`.
fn sockets(dir: &Path, prefix: &str, exports: usize) -> Vec<PathBuf> {
    (0..exports)
        .map(|_| dir.join(format!("{}.sock", vubd_tests::unique_name(prefix))))
        .collect()
}

/// The QMP socket of a daemon started with `--bitmap`.
fn monitor_path(socks: &[PathBuf]) -> PathBuf {
    let mut p = socks[0].clone().into_os_string();
    p.push(".qmp");
    PathBuf::from(p)
}

/// `--bitmap`: an enabled dirty bitmap on every exported node.
fn add_bitmaps(o: &Opts, socks: &[PathBuf]) -> Result<(), String> {
    let Some(gran) = o.bitmap else {
        return Ok(());
    };
    let mut qmp = Qmp::connect(monitor_path(socks));
    for e in 0..socks.len() {
        qmp.execute(
            "block-dirty-bitmap-add",
            serde_json::json!({"node": format!("disk{e}"), "name": "bench", "granularity": gran}),
        )
        .map_err(|e| format!("block-dirty-bitmap-add: {}", e.desc))?;
    }
    Ok(())
}

/// Starts the daemon and connects a client to each of its exports.
fn start(
    o: &Opts,
    which: Which,
    backend: Backend,
    cfg: Config,
    image: &Path,
    socks: &[PathBuf],
) -> Result<Prepared, String> {
    let args = daemon_args(o, which, backend, cfg, image, socks);
    let daemon = Daemon::try_start(bin_of(o, which), &args, socks)?;
    add_bitmaps(o, socks)?;
    let copts = ClientOptions {
        num_queues: cfg.queues,
        poll: o.poll_client,
        buf_per_queue: 4 << 20,
        ..Default::default()
    };
    let size = export_size(backend, cfg);
    let mut clients = Vec::with_capacity(socks.len());
    for sock in socks {
        let client = Client::connect_with(sock, &copts)?;
        if client.capacity() != size {
            return Err(format!(
                "{}: capacity {} != {size}",
                sock.display(),
                client.capacity()
            ));
        }
        clients.push(client);
    }
    Ok(Prepared { daemon, clients })
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
    socks: &[PathBuf],
    seed: u64,
) -> Result<RunResult, String> {
    let (backend, cfg, w) = (case.backend, case.cfg, case.w);
    if backend == Backend::Qcow2Fresh {
        // Every run allocates from an empty image.
        prepare_image(backend, image);
    }
    let Prepared {
        mut daemon,
        mut clients,
    } = start(o, which, backend, cfg, image, socks)?;
    let size = export_size(backend, cfg);
    let nq = cfg.queues as u64;
    let region_len = size / nq;
    let t_start = Instant::now() + Duration::from_secs_f64(o.warmup);
    let t_end = t_start + Duration::from_secs_f64(o.runtime);
    let pid = daemon.pid();
    let mut cpu0 = Duration::ZERO;
    let mut cpu1 = Duration::ZERO;
    let results: Vec<Result<QueueResult, String>> = std::thread::scope(|s| {
        // One thread per queue of every client; sequential workloads split each
        // export between its queues.
        let handles: Vec<_> = clients
            .iter_mut()
            .flat_map(|c| c.queues_mut().iter_mut().enumerate())
            .enumerate()
            .map(|(k, (i, q))| {
                let region = if w.random {
                    (0, size)
                } else {
                    (i as u64 * region_len, region_len)
                };
                let seed = seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
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
    drop(clients);
    stop_daemon(&mut daemon, which);
    let results = results.into_iter().collect::<Result<Vec<_>, String>>()?;
    let ios: u64 = results.iter().map(|r| r.ios).sum();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    let mut lats: Vec<u32> = results.into_iter().flat_map(|r| r.lats).collect();
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
/// after multiqueue and multi-export runs: a daemon that does not exit is killed and
/// reported, not fatal to the benchmark. qemu-storage-daemon gets 3 s (a hang would
/// otherwise add 10 s to many runs), vubd 10 s.
fn stop_daemon(daemon: &mut Daemon, which: Which) {
    let grace = match which {
        Which::Vubd => Duration::from_secs(10),
        Which::Qsd => Duration::from_secs(3),
    };
    daemon.signal(libc::SIGTERM);
    match daemon.wait_timeout(grace) {
        Some(st) if st.code() == Some(0) => {}
        Some(st) => eprintln!(
            "warning: {which:?} exited with {st:?} after SIGTERM; stderr:\n{}",
            daemon.stderr()
        ),
        None => {
            daemon.kill();
            eprintln!("warning: {which:?} did not exit within {grace:?} of SIGTERM; killed");
        }
    }
}

/// How long the idle tables measure CPU, after a settling time.
const IDLE_SECS: f64 = 2.0;
const IDLE_SETTLE: Duration = Duration::from_millis(200);

/// CPU % of `daemon` over [`IDLE_SECS`], after [`IDLE_SETTLE`].
fn idle_cpu_of(daemon: &Daemon) -> f64 {
    std::thread::sleep(IDLE_SETTLE);
    let c0 = daemon.cpu_time();
    std::thread::sleep(Duration::from_secs_f64(IDLE_SECS));
    let c1 = daemon.cpu_time();
    c1.saturating_sub(c0).as_secs_f64() / IDLE_SECS * 100.0
}

/// CPU % of a daemon with a connected, idle client on each export.
fn idle_cpu(o: &Opts, which: Which, cfg: Config, dir: &Path) -> Result<f64, String> {
    let socks = sockets(dir, "idle", cfg.exports);
    let Prepared {
        mut daemon,
        clients,
    } = start(o, which, Backend::Null, cfg, Path::new(""), &socks)?;
    let cpu = idle_cpu_of(&daemon);
    drop(clients);
    stop_daemon(&mut daemon, which);
    Ok(cpu)
}

/// Threads and resident memory of a process.
#[derive(Debug, Clone, Copy, Default)]
struct Footprint {
    threads: usize,
    rss_kib: u64,
}

fn footprint_of(pid: u32) -> Result<Footprint, String> {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("/proc/{pid}/task: {e}"))?
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))?;
    Ok(Footprint { threads, rss_kib })
}

/// A daemon with idle exports and no frontend: its footprint and idle CPU %.
#[derive(Debug, Clone, Copy)]
struct Idle {
    fp: Footprint,
    cpu_pct: f64,
}

/// Starts a daemon with `exports` null-co exports on 2 iothreads, connects nothing,
/// measures its idle CPU, then its threads and resident memory.
fn idle_exports(o: &Opts, which: Which, exports: usize, dir: &Path) -> Result<Idle, String> {
    let cfg = Config::multi(exports);
    let socks = sockets(dir, "dens", exports);
    let args = daemon_args(o, which, Backend::Null, cfg, Path::new(""), &socks);
    let mut daemon = Daemon::try_start(bin_of(o, which), &args, &socks)?;
    let cpu_pct = idle_cpu_of(&daemon);
    let fp = footprint_of(daemon.pid());
    stop_daemon(&mut daemon, which);
    Ok(Idle { fp: fp?, cpu_pct })
}

/// The density table's row of one daemon: with 1 export and with `n`.
#[derive(Debug, Clone, Copy)]
struct Density {
    one: Idle,
    many: Idle,
    n: usize,
}

impl Density {
    /// Resident memory per export beyond the first, KiB (negative if it shrank).
    fn rss_per_export_kib(&self) -> f64 {
        (self.many.fp.rss_kib as f64 - self.one.fp.rss_kib as f64) / (self.n - 1) as f64
    }
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

/// Writes `size` bytes of a pattern to a new file, so that every page is backed.
fn fill_file(path: &Path, size: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create bench image");
    let chunk: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7 + 3) as u8).collect();
    let mut off = 0u64;
    while off < size {
        let n = chunk.len().min((size - off) as usize);
        f.write_all_at(&chunk[..n], off).expect("write bench image");
        off += n as u64;
    }
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

    let configs: Vec<Config> = CONFIGS
        .iter()
        .copied()
        .chain([Config::multi(o.exports)])
        .collect();
    let mut cases = Vec::new();
    for backend in [
        Backend::Null,
        Backend::File,
        Backend::Qcow2Fresh,
        Backend::Qcow2,
        Backend::Qcow2SmallCache,
        Backend::Qcow2Chain,
        Backend::Rbd,
        Backend::Luks,
        Backend::Qcow2Luks,
        Backend::Loop,
        Backend::LoopPinned,
    ] {
        for cfg in &configs {
            for w in WORKLOADS {
                let name = format!("{}/{}/{}", backend.name(), w.name, cfg.name());
                if !backend.runs(w, cfg) || o.idle_only {
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
    if cases.is_empty() && !o.idle_only {
        eprintln!("no case matches the filter(s) {:?}", o.filters);
        std::process::exit(1);
    }
    if o.list {
        for c in &cases {
            println!("{}", c.name);
        }
        return;
    }

    // Preallocate the images: every page written, so reads hit real memory.
    let _image_guard = ImageGuard {
        image: image.clone(),
        parts: o.exports,
    };
    if cases
        .iter()
        .any(|c| c.backend != Backend::Null && c.cfg.exports == 1)
    {
        eprintln!(
            "preparing {} ({} GiB, fully written)...",
            image.display(),
            DEV_SIZE / GIB
        );
        fill_file(&image, DEV_SIZE);
        for b in [
            Backend::Qcow2,
            Backend::Qcow2SmallCache,
            Backend::Qcow2Chain,
            Backend::Luks,
            Backend::Qcow2Luks,
        ] {
            if cases.iter().any(|c| c.backend == b) {
                eprintln!("preparing {}...", b.image(&image).display());
                prepare_image(b, &image);
            }
        }
        let is_loop = |b: Backend| matches!(b, Backend::Loop | Backend::LoopPinned);
        if cases.iter().any(|c| is_loop(c.backend)) {
            match setup_loop(&image) {
                Ok(dev) => {
                    eprintln!("{} on {dev} (direct I/O)", image.display());
                    let _ = LOOP_DEV.set(dev);
                }
                Err(e) => {
                    eprintln!("skipping the loop cases: {e}");
                    cases.retain(|c| !is_loop(c.backend));
                }
            }
        }
        if cases.iter().any(|c| c.backend == Backend::Rbd) {
            let name = vubd_tests::unique_name("vubd-bench");
            eprintln!(
                "importing {} into rbd/{name} (cluster {})...",
                image.display(),
                vubd_tests::ceph::conf()
            );
            vubd_tests::ceph::rbd(&[
                "import",
                "--no-progress",
                &image.to_string_lossy(),
                &format!("rbd/{name}"),
            ]);
            let _ = RBD_IMAGE.set(name);
        }
    }
    if let Some(c) = cases
        .iter()
        .find(|c| c.backend == Backend::File && c.cfg.exports > 1)
    {
        let size = export_size(c.backend, c.cfg);
        eprintln!(
            "preparing {} x {} ({} MiB each, fully written)...",
            c.cfg.exports,
            part_image(&image, 0).display(),
            size >> 20
        );
        for e in 0..c.cfg.exports {
            fill_file(&part_image(&image, e), size);
        }
    }

    let total_runs = cases.len() * o.reps * 2;
    if !cases.is_empty() {
        eprintln!(
            "{} cases x {} reps x 2 daemons = {total_runs} runs of {}s (+{}s warm-up)",
            cases.len(),
            o.reps,
            o.runtime,
            o.warmup
        );
    }
    let mut rows = Vec::new();
    let mut round_trips: Vec<f64> = Vec::new();
    let mut example_cmds: Vec<(String, String)> = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let (name, backend, cfg) = (&case.name, case.backend, case.cfg);
        let mut runs_v = Vec::new();
        let mut runs_q = Vec::new();
        for rep in 0..o.reps {
            for which in [Which::Vubd, Which::Qsd] {
                let socks = sockets(dir.path(), "b", cfg.exports);
                let seed = seed_rng.next_u64();
                let rt = placement_probe();
                round_trips.extend(rt);
                let r = run_once(&o, which, case, &image, &socks, seed);
                match &r {
                    Ok(r) => eprintln!(
                        "[{}/{}] {name} {which:?} rep {rep}: {:.0} IOPS, {:.1} us mean, {:.1} us p99, \
                         {:.2} us CPU/IO, CPU 0-1 round trip {} ns{}",
                        i + 1,
                        cases.len(),
                        r.iops(),
                        r.lat_mean_us,
                        r.lat_p99_us,
                        r.cpu_us_per_io,
                        rt.map(|t| format!("{t:.0}")).unwrap_or_else(|| "n/a".into()),
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
        let ex_key = format!("{}/{}", backend.name(), cfg.name());
        if !example_cmds.iter().any(|(k, _)| *k == ex_key) {
            let socks: Vec<PathBuf> = (0..cfg.exports)
                .map(|e| dir.join(&format!("vubd{e}.sock")))
                .collect();
            for which in [Which::Vubd, Which::Qsd] {
                let args = daemon_args(&o, which, backend, cfg, &image, &socks);
                example_cmds.push((ex_key.clone(), shell_words(bin_of(&o, which), &args)));
            }
        }
        rows.push((name.clone(), summarize(&runs_v), summarize(&runs_q)));
    }

    let mut idle_rows = Vec::new();
    let mut density_rows = Vec::new();
    if o.idle {
        for cfg in CONFIGS {
            eprintln!("idle CPU, {}...", cfg.name());
            let mut row = Vec::new();
            for which in [Which::Vubd, Which::Qsd] {
                row.push(idle_cpu(&o, which, *cfg, dir.path()));
            }
            idle_rows.push((cfg.name(), row));
        }
        for which in [Which::Vubd, Which::Qsd] {
            eprintln!(
                "idle density, {which:?}: 1 and {} exports...",
                o.idle_exports
            );
            let d = idle_exports(&o, which, 1, dir.path()).and_then(|one| {
                let many = idle_exports(&o, which, o.idle_exports, dir.path())?;
                Ok(Density {
                    one,
                    many,
                    n: o.idle_exports,
                })
            });
            if let Err(e) = &d {
                eprintln!("idle density, {which:?}: FAILED: {e}");
            }
            density_rows.push((which, d));
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
    if let Some(g) = o.bitmap {
        println!("\nEvery exported node has an enabled dirty bitmap of granularity {g}.");
    }
    if let Some(t) = &o.throttle {
        println!("\nEvery export goes through a throttle node of one group with properties '{t}'.");
    }
    if !rows.is_empty() {
        print_io_table(&o, &rows);
        print_placement(&mut round_trips);
    }
    if !idle_rows.is_empty() {
        println!("\nIdle CPU (null-co, client connected, no I/O, {IDLE_SECS} s):\n");
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
    if !density_rows.is_empty() {
        print_density_table(&o, &density_rows);
    }
    if !example_cmds.is_empty() {
        println!("\nDaemon command lines (socket path varies per run):\n");
        println!("```");
        for (_, c) in &example_cmds {
            println!("{c}");
        }
        println!("```");
    }
}

fn print_io_table(o: &Opts, rows: &[(String, Summary, Summary)]) {
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
        "Note: qemu-storage-daemon (7.2 to 10.x) accepts a single `iothread` per vhost-user-blk \
         export, so in the 4q/2iothreads config it runs all 4 queues on one iothread."
    );
    println!(
        "N exports/2iothreads: N exports of one queue each, export e on iothread e mod 2 in \
         both daemons, each driven by its own libblkio client and thread; IOPS, MiB/s and \
         CPU us/IO are the sum over the exports, latency is over all their requests. file: \
         one raw file of 1 GiB/N per export.\n"
    );
    println!(
        "| case | vubd IOPS | qsd IOPS | vubd/qsd | vubd MiB/s | qsd MiB/s | vubd lat mean/p99 us \
         | qsd lat mean/p99 us | vubd CPU us/IO | qsd CPU us/IO |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, v, q) in rows {
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
    for (name, v, q) in rows {
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
}

/// The cache-line round trip between CPUs 0 and 1 (vubd_tests::placement), measured
/// just before a run; `None` on a machine of one CPU.
fn placement_probe() -> Option<f64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ncpu = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if ncpu < 2 {
        return None;
    }
    vubd_tests::placement::round_trip_ns(0, 1, 100_000)
}

/// What the probes before the runs saw: the spread of the machine's CPU placement.
fn print_placement(samples: &mut [f64]) {
    if samples.is_empty() {
        return;
    }
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    let q = |p: usize| samples[(n - 1) * p / 100];
    println!(
        "\nCPU placement: the round trip of one cache line between CPUs 0 and 1, measured \
         before each of the {n} runs (vubd-bench's stderr has each run's): min {:.0}, \
         quartiles {:.0} / {:.0} / {:.0}, max {:.0} ns. Where the vCPUs are far apart, every \
         ring shared by a client thread and an iothread costs more (docs/performance.md, \
         \"Prefetching a batch's chains\").",
        q(0),
        q(25),
        q(50),
        q(75),
        q(100)
    );
}

fn print_density_table(o: &Opts, rows: &[(Which, Result<Density, String>)]) {
    let n = o.idle_exports;
    println!(
        "\nIdle density: {n} null-co exports (one queue each) on 2 iothreads, export e on \
         iothread e mod 2, no frontend connected; threads = entries of /proc/PID/task, idle \
         CPU over {IDLE_SECS} s, then VmRSS; per export = (RSS with {n} exports - RSS with \
         1) / {}:\n",
        n - 1
    );
    println!(
        "| daemon | threads, 1 / {n} exports | idle CPU %, 1 / {n} exports | RSS KiB, 1 / {n} \
         exports | RSS KiB per export |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (which, d) in rows {
        let who = match which {
            Which::Vubd => "vubd",
            Which::Qsd => "qsd",
        };
        match d {
            Ok(d) => println!(
                "| {who} | {} / {} | {:.1} / {:.1} | {} / {} | {:.1} |",
                d.one.fp.threads,
                d.many.fp.threads,
                d.one.cpu_pct,
                d.many.cpu_pct,
                d.one.fp.rss_kib,
                d.many.fp.rss_kib,
                d.rss_per_export_kib()
            ),
            Err(e) => println!("| {who} | failed: `{}` | | | |", e.replace('\n', " ")),
        }
    }
}

/// Removes the bench images on exit.
struct ImageGuard {
    image: PathBuf,
    /// Per-export files of the multi-export cases that may exist.
    parts: usize,
}

impl Drop for ImageGuard {
    fn drop(&mut self) {
        if let Some(dev) = LOOP_DEV.get() {
            let _ = std::process::Command::new("losetup")
                .args(["-d", dev])
                .status();
        }
        if let Some(name) = RBD_IMAGE.get() {
            let _ = std::process::Command::new("rbd")
                .args(["-c", vubd_tests::ceph::conf(), "rm", "--no-progress"])
                .arg(format!("rbd/{name}"))
                .status();
        }
        let _ = std::fs::remove_file(&self.image);
        for ext in [
            "fresh.qcow2",
            "full.qcow2",
            "smallcache.qcow2",
            "mid.qcow2",
            "top.qcow2",
            "luks",
            "luks.qcow2",
        ] {
            let _ = std::fs::remove_file(self.image.with_extension(ext));
        }
        for e in 0..self.parts {
            let _ = std::fs::remove_file(part_image(&self.image, e));
        }
    }
}

//! vubd killed with SIGKILL under a real guest's load, and restarted with the same
//! command line: the guest (QEMU with `reconnect=1` on the disk's chardev) must see no
//! error and lose no acknowledged write.
//!
//! * Raw, qcow2 and preallocated qcow2 images on 4 queues: 5 kills at random moments
//!   while fio writes and verifies; every fio round verifies clean, the kernel log shows
//!   no I/O error, `qemu-img check` is clean, and each restart listens within a second.
//! * Requests that complete out of order at the kill: a slow read (a qcow2 overlay whose
//!   backing node is a `null-co` with 2 s latency) on the same queue as fast writes. The
//!   inflight region QEMU holds is read after the kill to show that the read was taken
//!   before writes that had completed, i.e. that rewinding the ring to its used index
//!   (all a frontend can do without VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) would lose the
//!   read and run completed writes again; vubd must resubmit exactly the requests left
//!   in flight. A second disk of the same guest runs the same workload through a relay
//!   that hides INFLIGHT_SHMFD from QEMU: it must go wrong, which shows the difference
//!   the tracking makes. The relay keeps an inflight region of its own for that disk
//!   (QEMU never sees it), so that the kill waits for, and the test checks, the same
//!   out-of-order moment on both disks.
//! * A write held by `werror=stop` (a blkdebug error) at the kill stays in flight: the
//!   restarted vubd runs it again, it stops again on the same rule, and `cont` on the new
//!   vubd's monitor completes it.

use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};
use vubd_tests::guest::fio::{disk_errors_in_dmesg, round_problems, FioRounds};
use vubd_tests::guest::relay::{InflightGeometry, Relay, Rules, PF_INFLIGHT_SHMFD};
use vubd_tests::guest::{wait_listening, Guest, GuestOpts, CMD_TIMEOUT};
use vubd_tests::tools::qemu_img;
use vubd_tests::{vubd_bin, Daemon, DaemonArgs, Qmp, Rng, TempDir, MIB};

/// How long fio may take to finish its current round after the last restart.
const FIO_TIMEOUT: Duration = Duration::from_secs(300);
/// Kills per run of the 4-queue tests.
const KILLS: usize = 5;
/// A restarted vubd must listen again within this.
const RESTART_LIMIT: Duration = Duration::from_secs(1);
/// Time for QEMU (reconnect=1) to be served by the restarted vubd.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// vubd logs connections and resubmissions at info level; the tests read them.
fn log_info() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RUST_LOG").is_none() {
            std::env::set_var("RUST_LOG", "info");
        }
    });
}

/// vubd, killed with SIGKILL and started again with the same command line, as an
/// operator (or a supervisor) would: the socket files the killed process leaves stay
/// where they are, and the new process must take them over.
struct Restarts {
    args: Vec<String>,
    /// Sockets vubd listens on (exports and monitor).
    sockets: Vec<PathBuf>,
    daemon: Daemon,
    /// stderr of the daemons killed so far, in order.
    earlier: Vec<String>,
    /// For each restart: time until every socket listened.
    listen_times: Vec<Duration>,
}

impl Restarts {
    fn start(args: Vec<String>, sockets: Vec<PathBuf>) -> Restarts {
        log_info();
        let (daemon, _) = Self::spawn(&args, &sockets);
        Restarts {
            args,
            sockets,
            daemon,
            earlier: Vec::new(),
            listen_times: Vec::new(),
        }
    }

    /// Starts vubd without the harness's socket bookkeeping (which refuses a path that
    /// exists, and removes sockets on drop); waits until it listens.
    fn spawn(args: &[String], sockets: &[PathBuf]) -> (Daemon, Duration) {
        let t0 = Instant::now();
        let mut d = Daemon::try_start(&vubd_bin(), args, &[]).unwrap_or_else(|e| panic!("{e}"));
        let Some(_) = wait_listening(sockets, Duration::from_secs(30)) else {
            d.kill();
            panic!(
                "vubd did not listen on {sockets:?} within 30 s\ncommand: {}\nstderr:\n{}",
                d.command_line(),
                d.stderr()
            );
        };
        (d, t0.elapsed())
    }

    fn kill(&mut self) {
        self.daemon.signal(libc::SIGKILL);
        let st = self.daemon.wait_timeout(Duration::from_secs(10));
        assert!(st.is_some(), "vubd did not die of SIGKILL");
    }

    /// Starts vubd again; returns how long it took to listen.
    fn restart(&mut self) -> Duration {
        let (d, t) = Self::spawn(&self.args, &self.sockets);
        let old = std::mem::replace(&mut self.daemon, d);
        self.earlier.push(old.stderr());
        self.listen_times.push(t);
        t
    }

    /// Waits until the running vubd's log says that `n` frontends have connected;
    /// returns how long that took.
    fn wait_connected(&mut self, n: usize, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            let log = self.daemon.stderr();
            if log.matches("frontend connected").count() >= n {
                return t0.elapsed();
            }
            self.daemon.assert_running("waiting for QEMU to reconnect");
            assert!(
                t0.elapsed() < timeout,
                "QEMU did not reconnect to the restarted vubd within {timeout:?}\nvubd log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every daemon's log, oldest first.
    fn all_logs(&self) -> String {
        let mut s = String::new();
        for (i, l) in self.earlier.iter().enumerate() {
            s.push_str(&format!("--- vubd #{} (killed) ---\n{l}", i + 1));
        }
        s.push_str(&format!(
            "--- vubd #{} (running) ---\n{}",
            self.earlier.len() + 1,
            self.daemon.stderr()
        ));
        s
    }
}

/// The format under test, with how to make its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Raw,
    Qcow2,
    Qcow2Prealloc,
}

impl Format {
    fn driver(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 | Format::Qcow2Prealloc => "qcow2",
        }
    }

    fn create(self, path: &Path, size: u64) {
        let size = size.to_string();
        let p = path.to_str().expect("UTF-8 path");
        match self {
            Format::Raw => qemu_img(&["create", "-f", "raw", p, &size]),
            Format::Qcow2 => qemu_img(&["create", "-f", "qcow2", p, &size]),
            Format::Qcow2Prealloc => qemu_img(&[
                "create",
                "-f",
                "qcow2",
                "-o",
                "preallocation=metadata",
                p,
                &size,
            ]),
        };
    }
}

/// fio rounds that failed (after asking every set of rounds to stop), for a message.
fn fio_problems(g: &mut Guest, fio: &[&FioRounds], timeout: Duration) -> Vec<String> {
    let mut problems = Vec::new();
    for f in fio {
        match f.stop(g, timeout) {
            Ok(rounds) => {
                eprintln!("fio {} on {}: {} round(s)", f.tag, f.dev, rounds.len());
                problems.extend(
                    round_problems(&rounds)
                        .into_iter()
                        .map(|p| format!("{} ({}): {p}", f.dev, f.tag)),
                );
            }
            Err(e) => problems.push(e),
        }
    }
    problems
}

/// Kernel log lines about disk trouble, for a message.
fn kernel_problems(g: &mut Guest) -> Vec<String> {
    disk_errors_in_dmesg(&g.dmesg())
        .into_iter()
        .map(|l| format!("kernel: {l}"))
        .collect()
}

/// fio on 4 queues of each of `formats` (one disk each, one vubd) while vubd is killed
/// [`KILLS`] times at random moments.
fn kill_under_fio(name: &str, formats: &[Format]) {
    let t_start = Instant::now();
    let mut rng = Rng::new(name);
    let dir = TempDir::new_in(Path::new("/dev/shm"), "vubd-crash");
    let mut args = DaemonArgs::new();
    let mut opts = GuestOpts::new(name).cpus(4);
    let mut disks = Vec::new();
    for (i, f) in formats.iter().enumerate() {
        let img = dir.join(&format!("disk{i}.{}", f.driver()));
        let sock = dir.join(&format!("vub{i}.sock"));
        f.create(&img, 256 * MIB);
        args = args
            .iothread(&format!("io{i}a"))
            .iothread(&format!("io{i}b"))
            .blockdev(&format!(
                "driver=file,node-name=file{i},filename={},cache.direct=off",
                img.display()
            ))
            .blockdev(&format!(
                "driver={},node-name=d{i},file=file{i}",
                f.driver()
            ))
            .vhost_user_blk(
                &format!("d{i}"),
                &sock,
                &format!(",writable=on,num-queues=4,iothread.0=io{i}a,iothread.1=io{i}b"),
            );
        opts = opts.reconnecting_disk(&sock, 4);
        disks.push((*f, img, sock));
    }
    let sockets: Vec<PathBuf> = disks.iter().map(|d| d.2.clone()).collect();
    let mut vubd = Restarts::start(args.build(), sockets);
    let mut g = Guest::boot(&opts);
    let mut fio = Vec::new();
    for (i, (f, _, _)) in disks.iter().enumerate() {
        let dev = format!("/dev/vd{}", (b'a' + i as u8) as char);
        let mq = g.check(&format!("ls /sys/block/vd{}/mq", &dev[7..]), CMD_TIMEOUT);
        assert_eq!(mq.split_whitespace().count(), 4, "{dev} queues: {mq:?}");
        fio.push(FioRounds::new(&format!("{f:?}").to_lowercase(), &dev, 4, 4));
    }
    for f in &fio {
        f.start(&mut g);
    }
    std::thread::sleep(Duration::from_millis(rng.range(1000, 3000)));
    let mut reconnects = Vec::new();
    for k in 1..=KILLS {
        if fio.iter().any(|f| !f.running(&mut g)) {
            g.note(&format!("fio ended before kill {k}"));
            break;
        }
        g.note(&format!("SIGKILL vubd ({k} of {KILLS})"));
        vubd.kill();
        let listen = vubd.restart();
        g.note(&format!(
            "vubd restarted, listening after {:.1} ms",
            listen.as_secs_f64() * 1e3
        ));
        reconnects.push(vubd.wait_connected(formats.len(), RECONNECT_TIMEOUT));
        // A random moment within the next few seconds of I/O.
        std::thread::sleep(Duration::from_millis(rng.range(300, 3000)));
    }
    let fio_refs: Vec<&FioRounds> = fio.iter().collect();
    let mut problems = fio_problems(&mut g, &fio_refs, FIO_TIMEOUT);
    problems.extend(kernel_problems(&mut g));
    eprintln!(
        "{name}: {} kill(s); restarts listened after {:?}; QEMU served again after {:?}",
        vubd.listen_times.len(),
        vubd.listen_times,
        reconnects
    );
    assert!(
        problems.is_empty(),
        "{name}: after {} kill(s) of vubd:\n{}\n{}",
        vubd.listen_times.len(),
        problems.join("\n"),
        vubd.all_logs()
    );
    assert_eq!(vubd.listen_times.len(), KILLS, "kills done");
    for (i, t) in vubd.listen_times.iter().enumerate() {
        assert!(
            *t < RESTART_LIMIT,
            "restart {} listened after {t:?} (limit {RESTART_LIMIT:?})",
            i + 1
        );
    }
    let st = g.shutdown();
    assert!(st.success(), "QEMU exit status after poweroff: {st}");
    let st = vubd.daemon.terminate();
    assert!(st.success(), "vubd exit status after SIGTERM: {st}");
    for (f, img, _) in &disks {
        if *f != Format::Raw {
            let out = qemu_img(&["check", "-f", "qcow2", img.to_str().expect("UTF-8")]);
            assert!(
                out.contains("No errors were found"),
                "qemu-img check of the {f:?} image after the kills:\n{out}"
            );
        }
    }
    eprintln!("{name}: {:.1} s", t_start.elapsed().as_secs_f64());
}

/// Raw, qcow2 and qcow2 with preallocated metadata, each on 4 queues, in one guest
/// (one boot and one kill schedule for the three, to keep the run time down).
#[test]
fn sigkill_under_fio_raw_qcow2_and_preallocated_qcow2() {
    kill_under_fio(
        "crash-4q",
        &[Format::Raw, Format::Qcow2, Format::Qcow2Prealloc],
    );
}

/// QEMU's virtqueue size for the disks of the inflight tests (given explicitly: the
/// inflight region's layout depends on it).
const QUEUE_SIZE: u16 = 128;

/// One queue's part of a split-ring inflight region (the vhost-user specification,
/// "Inflight I/O tracking"): `u64 features; u16 version; u16 desc_num; u16
/// last_batch_head; u16 used_idx;` then per descriptor `u8 inflight; u8 pad[5]; u16
/// next; u64 counter`, each queue's part aligned to 64 bytes.
#[derive(Debug, Clone)]
struct QueueRegion {
    version: u16,
    used_idx: u16,
    /// Per head: in flight, and the order in which it was taken.
    descs: Vec<(bool, u64)>,
}

fn queue_region_size(queue_size: u16) -> usize {
    (16 + 16 * usize::from(queue_size)).next_multiple_of(64)
}

impl QueueRegion {
    fn parse(b: &[u8], queue_size: u16) -> QueueRegion {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let descs = (0..usize::from(queue_size))
            .map(|h| {
                let o = 16 + 16 * h;
                let counter = u64::from_le_bytes(b[o + 8..o + 16].try_into().expect("8 bytes"));
                (b[o] == 1, counter)
            })
            .collect();
        QueueRegion {
            version: u16_at(8),
            used_idx: u16_at(14),
            descs,
        }
    }

    /// Heads in flight, in the order they were taken.
    fn in_flight(&self) -> Vec<(u16, u64)> {
        let mut v: Vec<(u16, u64)> = self
            .descs
            .iter()
            .enumerate()
            .filter(|(_, d)| d.0)
            .map(|(h, d)| (h as u16, d.1))
            .collect();
        v.sort_by_key(|&(_, c)| c);
        v
    }

    /// What a frontend without inflight tracking would do on reconnect: rewind the ring
    /// to its used index and run again the last `in_flight().len()` requests taken.
    /// Valid while the counters are those of the first backend on a fresh region (one
    /// fetch counter value per ring position).
    fn rewind(&self) -> Rewind {
        let taken = self.descs.iter().map(|d| d.1 + 1).max().unwrap_or(0);
        let in_flight = self.in_flight();
        let first_rerun = taken - in_flight.len() as u64;
        let lost: Vec<u16> = in_flight
            .iter()
            .filter(|&&(_, c)| c < first_rerun)
            .map(|&(h, _)| h)
            .collect();
        Rewind {
            taken,
            in_flight: in_flight.iter().map(|&(h, _)| h).collect(),
            consistent: first_rerun as u16 == self.used_idx,
            lost,
        }
    }
}

#[derive(Debug)]
struct Rewind {
    /// Requests taken from the ring since it started.
    taken: u64,
    /// Heads in flight, oldest first.
    in_flight: Vec<u16>,
    /// The region's used index agrees with taken - in flight.
    consistent: bool,
    /// Heads in flight that a rewind to the used index would never run (as many
    /// completed requests would run a second time instead).
    lost: Vec<u16>,
}

/// The inflight regions QEMU holds for its vhost-user-blk disks (those that negotiated
/// INFLIGHT_SHMFD), read through /proc/<pid>/fd: memfds of the size of `num_queues`
/// queue parts (vubd names its memfd `vubd-inflight`).
fn inflight_regions(qemu_pid: u32, num_queues: usize) -> Vec<Vec<QueueRegion>> {
    let part = queue_region_size(QUEUE_SIZE);
    let len = part * num_queues;
    let mut out = Vec::new();
    let dir = format!("/proc/{qemu_pid}/fd");
    let mut fds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| e.ok())
        .collect();
    fds.sort_by_key(|e| e.file_name().to_string_lossy().parse::<u32>().unwrap_or(0));
    for e in fds {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("/memfd:") {
            continue;
        }
        // The size first: guest RAM is a memfd too, and reading it all takes long
        // (seconds on a busy machine, too slow to poll).
        if std::fs::metadata(e.path()).map(|m| m.len()).ok() != Some(len as u64) {
            continue;
        }
        let Ok(bytes) = std::fs::read(e.path()) else {
            continue;
        };
        if bytes.len() != len {
            continue;
        }
        out.push(
            (0..num_queues)
                .map(|q| QueueRegion::parse(&bytes[q * part..], QUEUE_SIZE))
                .collect(),
        );
    }
    out
}

/// Lines of vubd's log that say which requests of `export` it resubmitted.
fn resubmissions(log: &str, export: &str) -> (Vec<u64>, Vec<u16>) {
    let prefix = format!("export {export}: queue ");
    let mut counts = Vec::new();
    let mut heads = Vec::new();
    for l in log.lines() {
        let Some(i) = l.find(&prefix) else {
            continue;
        };
        let rest = &l[i + prefix.len()..];
        if let Some(j) = rest.find(" request(s) left in flight will run again") {
            let n = rest[..j].rsplit(' ').next().unwrap_or("");
            counts.push(n.parse().unwrap_or(u64::MAX));
        } else if let Some(j) = rest.find("resubmitting request ") {
            let h = rest[j + "resubmitting request ".len()..]
                .split_whitespace()
                .next()
                .unwrap_or("");
            heads.push(h.parse().unwrap_or(u16::MAX));
        }
    }
    (counts, heads)
}

/// What `resubmissions` finds once vubd has logged it: the frontend is connected before
/// its rings start, so the lines may come a little after `wait_connected`.
fn wait_resubmissions(vubd: &Restarts, export: &str) -> (Vec<u64>, Vec<u16>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (counts, heads) = resubmissions(&vubd.daemon.stderr(), export);
        let logged = !counts.is_empty() && heads.len() as u64 >= counts.iter().sum::<u64>();
        if logged || Instant::now() >= deadline {
            return (counts, heads);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A background reader of `dev` from `offset_mib` on, 4 KiB at a time with O_DIRECT
/// and one request at a time (fio with psync, its job a thread of the process whose pid
/// is returned, so that /proc/<pid>/io counts its reads).
fn start_reader(g: &mut Guest, dev: &str, offset_mib: u64) -> u32 {
    let out = g.check(
        &format!(
            "fio --name=slow --filename={dev} --direct=1 --ioengine=psync --rw=read --bs=4k \
             --offset={offset_mib}M --size=16M --thread --eta=never \
             </dev/null >/dev/null 2>&1 & echo $!"
        ),
        CMD_TIMEOUT,
    );
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("reader pid: {out:?}"))
}

/// Read system calls the reader has made.
fn reads_done(g: &mut Guest, pid: u32) -> Option<u64> {
    let (rc, out) = g.run(
        &format!("grep '^syscr' /proc/{pid}/io 2>/dev/null"),
        CMD_TIMEOUT,
    );
    if rc != 0 {
        return None;
    }
    out.split_whitespace().nth(1)?.parse().ok()
}

/// A qcow2 overlay whose first `fast_mib` MiB are allocated, served by vubd over a
/// `null-co` backing node with `latency_ms` of latency: writes there are fast, reads of
/// the rest go to the slow backing node.
fn slow_overlay(
    args: DaemonArgs,
    dir: &TempDir,
    node: &str,
    sock: &Path,
    fast_mib: u64,
    latency_ms: u64,
) -> DaemonArgs {
    let img = dir.join(&format!("{node}.qcow2"));
    let p = img.to_str().expect("UTF-8");
    qemu_img(&["create", "-f", "qcow2", p, "64M"]);
    vubd_tests::tools::qemu_io(&img, "qcow2", &[&format!("write -P 0x11 0 {fast_mib}M")]);
    args.iothread(&format!("{node}-io"))
        .blockdev(&format!(
            "driver=null-co,node-name={node}-slow,size=64M,read-zeroes=on,latency-ns={}",
            latency_ms * 1_000_000
        ))
        .blockdev(&format!(
            "driver=file,node-name={node}-file,filename={p},cache.direct=off"
        ))
        .blockdev(&format!(
            "driver=qcow2,node-name={node},file={node}-file,backing={node}-slow"
        ))
        .vhost_user_blk(
            node,
            sock,
            &format!(",writable=on,num-queues=1,iothread={node}-io"),
        )
}

/// The latency of the slow reads (of the overlays' `null-co` backing nodes).
const SLOW_READ: Duration = Duration::from_secs(2);
/// A request in flight this long is taken for a slow read (the writes take
/// milliseconds).
const SLOW_SEEN_FOR: Duration = Duration::from_millis(200);
/// The kill comes while each disk's slow read still has at least this long to run.
const KILL_MARGIN: Duration = Duration::from_millis(500);

/// Watches one queue's inflight region, polled again and again, for a slow read out of
/// order that the kill can still catch: in flight for at least [`SLOW_SEEN_FOR`],
/// taken before requests that have completed ([`Rewind::lost`]), and taken at most
/// [`SLOW_READ`] - [`KILL_MARGIN`] ago (it was not in flight at an earlier poll that
/// recent), so that it cannot complete before the kill.
#[derive(Default)]
struct SlowReadWatch {
    /// Each request (head, fetch counter) in flight at the last poll: when a poll first
    /// saw it, and the start of the poll before (it was taken after that; `None` when
    /// it was in flight at the first poll).
    seen: HashMap<(u16, u64), (Instant, Option<Instant>)>,
    last_poll: Option<Instant>,
}

impl SlowReadWatch {
    /// Takes in `region`, read from `polled` on; whether it shows such a slow read.
    fn ready(&mut self, region: &QueueRegion, polled: Instant) -> bool {
        let in_flight = region.in_flight();
        self.seen = in_flight
            .iter()
            .map(|&k| {
                let e = self.seen.get(&k).copied();
                (k, e.unwrap_or((polled, self.last_poll)))
            })
            .collect();
        self.last_poll = Some(polled);
        let lost = region.rewind().lost;
        let now = Instant::now();
        in_flight.iter().any(|k| {
            let (first_seen, taken_after) = self.seen[k];
            lost.contains(&k.0)
                && now.duration_since(first_seen) >= SLOW_SEEN_FOR
                && taken_after.is_some_and(|t| now.duration_since(t) + KILL_MARGIN <= SLOW_READ)
        })
    }
}

/// The queue of disk B's inflight region that the relay keeps.
fn relay_region(relay: &Relay) -> QueueRegion {
    let bytes = relay
        .inflight_region()
        .expect("the relay holds no inflight region of disk B");
    assert_eq!(
        bytes.len(),
        queue_region_size(QUEUE_SIZE),
        "size of disk B's inflight region (one queue of {QUEUE_SIZE})"
    );
    QueueRegion::parse(&bytes, QUEUE_SIZE)
}

/// Requests that complete out of order at the kill: on one queue, a slow read (2 s,
/// from the backing node) and fast writes. Disk A is served with inflight tracking;
/// disk B, with the same workload, through a relay that hides INFLIGHT_SHMFD from QEMU.
#[test]
fn sigkill_with_requests_completing_out_of_order() {
    let name = "crash-out-of-order";
    let t_start = Instant::now();
    let dir = TempDir::new_in(Path::new("/dev/shm"), "vubd-ooo");
    let (sa, sb, rb) = (
        dir.join("a.sock"),
        dir.join("b.sock"),
        dir.join("b-relay.sock"),
    );
    let slow_ms = SLOW_READ.as_millis() as u64;
    let mut args = slow_overlay(DaemonArgs::new(), &dir, "a", &sa, 16, slow_ms);
    args = slow_overlay(args, &dir, "b", &sb, 16, slow_ms);
    let mut vubd = Restarts::start(args.build(), vec![sa.clone(), sb.clone()]);
    let relay = Relay::start(
        &rb,
        &sb,
        Rules {
            hide_protocol_features: PF_INFLIGHT_SHMFD,
            // For the test's eyes only: what vubd had in flight on disk B at the kill.
            keep_inflight: Some(InflightGeometry {
                num_queues: 1,
                queue_size: QUEUE_SIZE,
            }),
            ..Rules::default()
        },
    );
    let mut opts = GuestOpts::new(name)
        .cpus(2)
        .reconnecting_disk(&sa, 1)
        .reconnecting_disk(&rb, 1);
    for d in &mut opts.disks {
        d.extra = format!(",queue-size={QUEUE_SIZE}");
    }
    let mut g = Guest::boot(&opts);
    assert!(
        relay
            .counters
            .protocol_replies_changed
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the relay did not see QEMU ask for the protocol features"
    );
    let qemu = g.qemu_pid();
    assert_eq!(
        inflight_regions(qemu, 1).len(),
        1,
        "QEMU should hold one inflight region (disk A's; B's relay hides the feature)"
    );
    assert!(
        relay
            .counters
            .inflight_regions_kept
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the relay did not get an inflight region of disk B from vubd"
    );
    // Fast writes on the allocated 16 MiB, slow reads beyond.
    let fio_a = FioRounds::new("fast-a", "/dev/vda", 1, 8);
    let fio_b = FioRounds::new("fast-b", "/dev/vdb", 1, 8);
    let reader_a = start_reader(&mut g, "/dev/vda", 32);
    let reader_b = start_reader(&mut g, "/dev/vdb", 32);
    fio_a.start(&mut g);
    fio_b.start(&mut g);
    std::thread::sleep(Duration::from_secs(3));

    // Kill when each disk has its slow read in flight, taken before requests that have
    // completed, and young enough to outlast the kill (the two readers' 2 s reads are
    // not in step: wait for a moment that suits both).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut watch_a, mut watch_b) = (SlowReadWatch::default(), SlowReadWatch::default());
    let (mut polls, mut longest_gap, mut last) = (0, Duration::ZERO, Instant::now());
    loop {
        let polled = Instant::now();
        polls += 1;
        longest_gap = longest_gap.max(polled.duration_since(last));
        last = polled;
        let (ra, rb) = (
            inflight_regions(qemu, 1)[0][0].clone(),
            relay_region(&relay),
        );
        let (ok_a, ok_b) = (watch_a.ready(&ra, polled), watch_b.ready(&rb, polled));
        if ok_a && ok_b {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no moment with a slow read out of order on both disks within 30 s ({polls} \
             polls, at most {longest_gap:?} apart): disk A {:?}, disk B {:?}",
            ra.rewind(),
            rb.rewind()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    vubd.kill();
    g.note("SIGKILL vubd with requests out of order on both disks");
    let region = inflight_regions(qemu, 1).remove(0).remove(0);
    let rewind = region.rewind();
    // What vubd had in flight on disk B when it died (QEMU knows nothing of it).
    let region_b = relay_region(&relay);
    let rewind_b = region_b.rewind();
    eprintln!(
        "{name}: at the kill, disk B's queue had taken {} requests; in flight (oldest \
         first): heads {:?}; QEMU's rewind to the used index will never run heads {:?}.",
        rewind_b.taken, rewind_b.in_flight, rewind_b.lost
    );
    eprintln!(
        "{name}: at the kill, disk A's queue had taken {} requests; in flight (oldest \
         first): heads {:?}; used index {}. A frontend rewinding to the used index would \
         never run heads {:?} and would run {} completed request(s) again.",
        rewind.taken,
        rewind.in_flight,
        region.used_idx,
        rewind.lost,
        rewind.lost.len()
    );
    assert_eq!(region.version, 1, "inflight region version");
    assert!(
        rewind.consistent,
        "used index {} does not match the region: {rewind:?}",
        region.used_idx
    );
    assert!(
        !rewind.lost.is_empty(),
        "the kill did not find requests completing out of order on disk A: {rewind:?}"
    );
    assert!(
        rewind_b.consistent,
        "disk B: used index {} does not match the region: {rewind_b:?}",
        region_b.used_idx
    );
    assert!(
        !rewind_b.lost.is_empty(),
        "the kill did not find requests completing out of order on disk B: {rewind_b:?}"
    );
    vubd.restart();
    vubd.wait_connected(2, RECONNECT_TIMEOUT);

    // Disk A: exactly the requests in flight were resubmitted, in their order.
    let (counts, heads) = wait_resubmissions(&vubd, "a-exp");
    assert_eq!(
        counts,
        vec![rewind.in_flight.len() as u64],
        "vubd's count of requests left in flight on disk A\n{}",
        vubd.all_logs()
    );
    assert_eq!(heads, rewind.in_flight, "heads vubd resubmitted on disk A");
    // Both readers should go on reading (2 s a read).
    let before = (reads_done(&mut g, reader_a), reads_done(&mut g, reader_b));
    std::thread::sleep(Duration::from_secs(7));
    let after = (reads_done(&mut g, reader_a), reads_done(&mut g, reader_b));
    // Kernel messages name the disk or its virtio device.
    let b_dev = g.check("basename $(readlink /sys/block/vdb/device)", CMD_TIMEOUT);
    let b_dev = b_dev.trim().to_string();
    let (kernel_b, kernel_a): (Vec<String>, Vec<String>) = kernel_problems(&mut g)
        .into_iter()
        .partition(|l| l.contains("vdb") || l.contains(&format!("{b_dev}:")));
    let a_problems = {
        let mut p = fio_problems(&mut g, &[&fio_a], FIO_TIMEOUT);
        p.extend(kernel_a);
        if after.0 <= before.0 {
            p.push(format!(
                "the slow reader on vda stopped: {before:?} -> {after:?} reads"
            ));
        }
        p
    };
    assert!(
        a_problems.is_empty(),
        "disk A (inflight tracking) after the kill:\n{}\n{}",
        a_problems.join("\n"),
        vubd.all_logs()
    );
    // Disk B: the rewind lost its slow read (the reader hangs) and ran completed
    // requests again (the guest's driver sees buffers it did not submit, or old data
    // comes back). Any of these shows the difference.
    let mut b_symptoms = Vec::new();
    if after.1 <= before.1 {
        b_symptoms.push(format!(
            "the slow reader on vdb is stuck ({before:?} -> {after:?} reads)"
        ));
    }
    match fio_b.stop(&mut g, Duration::from_secs(15)) {
        Ok(rounds) => b_symptoms.extend(round_problems(&rounds)),
        Err(e) => b_symptoms.push(e),
    }
    b_symptoms.extend(kernel_b);
    eprintln!(
        "{name}: disk B without inflight tracking:\n{}",
        b_symptoms.join("\n")
    );
    assert!(
        !b_symptoms.is_empty(),
        "disk B, without inflight tracking, came through the same kill unharmed: the test \
         does not show what the tracking changes"
    );
    drop(g);
    drop(relay);
    eprintln!("{name}: {:.1} s", t_start.elapsed().as_secs_f64());
}

/// The export's I/O status from `query-block-exports`.
fn iostatus(qmp: &mut Qmp, id: &str) -> String {
    let exports = qmp.ok("query-block-exports", json!({}));
    exports
        .as_array()
        .and_then(|a| a.iter().find(|e| e["id"] == id))
        .and_then(|e| e["iostatus"].as_str())
        .unwrap_or("?")
        .to_string()
}

/// A write held by `werror=stop` at the kill stays in flight: the restarted vubd runs it
/// again (it fails again on the same blkdebug rule, and stops the export again), and
/// `cont` on the new vubd's monitor completes it; fio verifies every block.
///
/// The held write shows the difference inflight tracking makes only if requests taken
/// after it completed before the kill. That depends on how the guest batched them, so
/// several rules (one per 2 MiB of fio's single round) each hold a write in turn, and
/// the test lets the held ones go with `cont` until one is out of order.
#[test]
fn sigkill_with_a_write_held_by_werror_stop() {
    let name = "crash-werror-stop";
    let t_start = Instant::now();
    let dir = TempDir::new_in(Path::new("/dev/shm"), "vubd-held");
    let (sock, mon) = (dir.join("a.sock"), dir.join("qmp.sock"));
    let img = dir.join("a.img");
    qemu_img(&["create", "-f", "raw", img.to_str().expect("UTF-8"), "64M"]);
    // The first write that covers each of these sectors fails with EIO. Without
    // iotype=write an armed rule would also fail a read of its sector (QEMU's rule), and
    // rules the killed process used are armed again in the new one.
    let rules: Vec<u64> = (1..8).map(|i| i * 2 * MIB / 512).collect();
    let mut blkdebug = "driver=blkdebug,node-name=a-dbg,image=a-file".to_string();
    for (i, sector) in rules.iter().enumerate() {
        blkdebug.push_str(&format!(
            ",inject-error.{i}.event=write_aio,inject-error.{i}.iotype=write,\
             inject-error.{i}.errno=5,inject-error.{i}.sector={sector},\
             inject-error.{i}.once=on"
        ));
    }
    let args = DaemonArgs::new()
        .monitor(&mon)
        .iothread("a-io")
        .blockdev(&format!(
            "driver=file,node-name=a-file,filename={},cache.direct=off",
            img.display()
        ))
        .blockdev(&blkdebug)
        .blockdev("driver=raw,node-name=a,file=a-dbg")
        .vhost_user_blk(
            "a",
            &sock,
            ",writable=on,num-queues=1,iothread=a-io,werror=stop",
        )
        .build();
    let mut vubd = Restarts::start(args, vec![sock.clone(), mon.clone()]);
    let mut qmp = Qmp::connect(&mon);
    let mut opts = GuestOpts::new(name).reconnecting_disk(&sock, 1);
    opts.disks[0].extra = format!(",queue-size={QUEUE_SIZE}");
    let mut g = Guest::boot(&opts);
    let qemu = g.qemu_pid();
    // Batches of 16 submitted at once: requests taken after a failing one, in the same
    // pass of vubd, complete while it is held.
    let mut fio = FioRounds::new("held", "/dev/vda", 1, 16);
    fio.extra = "--iodepth_batch_submit=16 --iodepth_batch_complete_max=16".into();
    fio.start(&mut g);
    let mut held_writes = 0;
    let (region, rewind) = loop {
        let ev = qmp
            .wait_event("BLOCK_IO_ERROR", Duration::from_secs(120))
            .unwrap_or_else(|| {
                panic!(
                    "no BLOCK_IO_ERROR from the blkdebug rules\n{}",
                    vubd.all_logs()
                )
            });
        held_writes += 1;
        assert_eq!(ev["data"]["action"], "stop", "{ev}");
        assert_eq!(iostatus(&mut qmp, "a-exp"), "failed");
        // Wait until only the held write is in flight.
        let deadline = Instant::now() + Duration::from_secs(20);
        let region = loop {
            let r = inflight_regions(qemu, 1).remove(0).remove(0);
            if r.in_flight().len() == 1 {
                break r;
            }
            assert!(
                Instant::now() < deadline,
                "requests other than the held one stay in flight: {:?}",
                r.rewind()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let rewind = region.rewind();
        if !rewind.lost.is_empty() || held_writes == rules.len() {
            break (region, rewind);
        }
        g.note(&format!(
            "held write {held_writes} was the last taken: cont"
        ));
        qmp.ok("cont", json!({}));
    };
    g.note("SIGKILL vubd with a write held by werror=stop");
    vubd.kill();
    // QEMU's copy, after the kill (the same memory; nothing changed while stopped).
    let after = inflight_regions(qemu, 1).remove(0).remove(0);
    assert_eq!(
        after.in_flight(),
        region.in_flight(),
        "inflight region after the kill"
    );
    let held = rewind.in_flight.clone();
    assert_eq!(held.len(), 1, "in flight at the kill: {rewind:?}");
    assert!(
        rewind.consistent,
        "used index {} vs {rewind:?}",
        region.used_idx
    );
    eprintln!(
        "{name}: at the kill, head {} was held (held write {held_writes}; {} requests \
         taken, used index {}); {}",
        held[0],
        rewind.taken,
        region.used_idx,
        if rewind.lost.is_empty() {
            "it was the last one taken, so a rewind to the used index would also run it"
        } else {
            "requests taken after it had completed, so a rewind to the used index would \
             never run it, and would run a completed request again instead"
        }
    );
    vubd.restart();
    let mut qmp = Qmp::connect(&mon);
    vubd.wait_connected(1, RECONNECT_TIMEOUT);
    // The resubmitted write meets the same rule in the new process and is held again.
    let ev = qmp
        .wait_event("BLOCK_IO_ERROR", Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "the restarted vubd did not run the held write again (no BLOCK_IO_ERROR)\n{}",
                vubd.all_logs()
            )
        });
    assert_eq!(ev["data"]["operation"], "write", "{ev}");
    assert_eq!(iostatus(&mut qmp, "a-exp"), "failed");
    let (counts, heads) = resubmissions(&vubd.daemon.stderr(), "a-exp");
    assert_eq!(
        counts,
        vec![1],
        "requests left in flight\n{}",
        vubd.all_logs()
    );
    assert_eq!(heads, held, "the resubmitted head");
    assert!(fio.running(&mut g), "fio ended while the write was held");
    // This round is the last. Rules not reached before the kill hold writes of the new
    // process too: let each go.
    g.check("touch /tmp/held.stop", CMD_TIMEOUT);
    qmp.ok("cont", json!({}));
    let deadline = Instant::now() + FIO_TIMEOUT;
    while fio.running(&mut g) {
        assert!(Instant::now() < deadline, "fio did not finish after cont");
        if qmp
            .take_events()
            .iter()
            .any(|e| e["event"] == "BLOCK_IO_ERROR")
        {
            qmp.ok("cont", json!({}));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut problems = round_problems(&fio.rounds(&mut g));
    problems.extend(kernel_problems(&mut g));
    assert!(
        problems.is_empty(),
        "{name}: after the kill and cont:\n{}\n{}",
        problems.join("\n"),
        vubd.all_logs()
    );
    assert_eq!(iostatus(&mut qmp, "a-exp"), "ok");
    let st = g.shutdown();
    assert!(st.success(), "QEMU exit status after poweroff: {st}");
    eprintln!("{name}: {:.1} s", t_start.elapsed().as_secs_f64());
}

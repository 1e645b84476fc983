//! The `throttle` filter through a real frontend (libblkio): a throttle group's IOPS
//! limit holds for two exports on two iothreads that share it, a `qom-set` of new
//! limits (IOPS, then bytes per second) applies to a running export at once, reads
//! keep completing while a write storm is throttled, a drained section lets
//! queued requests go, and writes and flushes through a throttle root (passed at
//! admission) reach the file and are counted at both nodes.
//!
//! Most rates are counted over windows of a couple of seconds and checked with wide
//! bounds that still fail when throttling does not happen (too many completions) or
//! stalls (too few): the leaky bucket lets the average plus its burst (a tenth of a
//! second's worth) through. One test holds the limits to 5% over 10 s, bursts
//! included, as the issue asks.

use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};
use vubd_tests::{Client, Daemon, DaemonArgs, IoQueue, Qmp, Req, TempDir, MIB};

const SIZE: u64 = 64 * MIB;
/// Requests in flight per queue.
const DEPTH: usize = 8;
const BLOCK: usize = 4096;

/// Keeps `DEPTH` reads (or writes) of 4 KiB in flight on `q` for `window`; returns
/// the requests completed and the time taken.
fn run(q: &mut IoQueue, window: Duration, write: bool) -> (u64, Duration) {
    run_bs(q, window, write, BLOCK)
}

/// [`run`] with requests of `bs` bytes.
fn run_bs(q: &mut IoQueue, window: Duration, write: bool, bs: usize) -> (u64, Duration) {
    let start = Instant::now();
    let mut done = 0u64;
    let mut off = 0u64;
    while start.elapsed() < window {
        let reqs: Vec<Req> = (0..DEPTH)
            .map(|i| {
                let offset = off % SIZE;
                off += bs as u64;
                let buf = i * bs..(i + 1) * bs;
                if write {
                    Req::Write {
                        offset,
                        buf,
                        flags: blkio::ReqFlags::empty(),
                    }
                } else {
                    Req::Read { offset, buf }
                }
            })
            .collect();
        for r in q.submit(&reqs) {
            assert_eq!(r, 0, "request failed");
        }
        done += DEPTH as u64;
    }
    (done, start.elapsed())
}

/// Checks `done` requests in `t` against a limit of `iops`: at most 1.5 times the
/// budget (the average over `t` plus the burst the bucket allows at once), and at
/// least half the average.
fn check_rate(what: &str, done: u64, t: Duration, iops: f64) {
    let secs = t.as_secs_f64();
    let budget = iops * secs + iops / 10.0 + 1.0;
    eprintln!("{what}: {done} requests in {secs:.2} s (limit {iops} IOPS, budget {budget:.0})");
    assert!(
        (done as f64) <= 1.5 * budget + DEPTH as f64,
        "{what}: {done} requests in {secs:.2} s exceed a limit of {iops} IOPS"
    );
    assert!(
        (done as f64) >= 0.5 * iops * secs,
        "{what}: only {done} requests in {secs:.2} s under a limit of {iops} IOPS"
    );
}

fn image(dir: &TempDir, name: &str) -> String {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create image");
    f.set_len(SIZE).expect("size image");
    p.to_str().expect("UTF-8 path").to_string()
}

/// A daemon with the group `group` (a `throttle-group` object) and one export `ta`
/// through it on iothread io0, its monitor and a one-queue frontend of the export.
fn one_export(group: &str) -> (TempDir, Daemon, Qmp, Client) {
    let dir = TempDir::new("throttle");
    let a = image(&dir, "a.img");
    let (sa, mon) = (dir.join("a.sock"), dir.join("qmp.sock"));
    let args = DaemonArgs::new()
        .monitor(&mon)
        .iothread("io0")
        .object(group);
    let daemon = Daemon::start(&export(args, "ta", &a, &sa, "io0").build());
    let qmp = Qmp::connect(&mon);
    let c = Client::connect(&sa, 1);
    (dir, daemon, qmp, c)
}

fn export(args: DaemonArgs, node: &str, file: &str, sock: &Path, iothread: &str) -> DaemonArgs {
    args.blockdev(&format!(
        "driver=file,node-name={node}-file,filename={file},cache.direct=off"
    ))
    .blockdev(&format!(
        "driver=throttle,node-name={node},file={node}-file,throttle-group=tg0"
    ))
    .vhost_user_blk(
        node,
        sock,
        &format!(",writable=on,iothread={iothread},num-queues=2"),
    )
}

#[test]
fn a_group_shared_across_iothreads_holds_its_limit_and_takes_new_limits_live() {
    let mut sh = shared_group("x-iops-total=200");

    // Two frontends on two iothreads share the group's 200 IOPS.
    let window = Duration::from_secs(2);
    let (done, t, least) = both_for(&sh, window, BLOCK);
    let (sa, qmp) = (sh.a.clone(), &mut sh.qmp);
    check_rate("two exports sharing 200 IOPS", done, t, 200.0);
    assert!(least > 0, "one export was starved");

    // New limits while a frontend runs: 500 IOPS (more than the old limit lets
    // through: the lower bound fails if the change did not apply), then 50.
    let mut c = Client::connect(&sa, 2);
    let (q0, _) = c.queues_mut().split_at_mut(1);
    let q0 = &mut q0[0];
    run(q0, Duration::from_millis(300), false);
    qmp.ok(
        "qom-set",
        json!({"path": "/objects/tg0", "property": "limits", "value": {"iops-total": 500}}),
    );
    let (done, t) = run(q0, window, false);
    check_rate("after qom-set to 500 IOPS", done, t, 500.0);
    qmp.ok(
        "qom-set",
        json!({"path": "tg0", "property": "limits", "value": {"iops-total": 50}}),
    );
    let (done, t) = run(q0, window, true);
    check_rate("after qom-set to 50 IOPS", done, t, 50.0);
    // 20 MB/s of 64 KiB reads, counted in requests: 305 per second.
    qmp.ok(
        "qom-set",
        json!({"path": "tg0", "property": "limits",
               "value": {"iops-total": 0, "bps-total": 20_000_000}}),
    );
    let (done, t) = run_bs(q0, window, false, 65536);
    check_rate("after qom-set to 20 MB/s", done, t, 20e6 / 65536.0);
    // No limit at all: far above 50 IOPS even on a loaded machine.
    qmp.ok(
        "qom-set",
        json!({"path": "tg0", "property": "limits", "value": {"bps-total": 0}}),
    );
    let (done, t) = run(q0, Duration::from_secs(1), false);
    assert!(
        done as f64 > 4.0 * 50.0 * t.as_secs_f64(),
        "unlimited: only {done} requests in {t:?}"
    );
}

/// A daemon with exports `ta` (socket `a`, iothread io0) and `tb` (socket `b`, io1)
/// whose throttle nodes share the group `tg0` of `group` (its properties), and its
/// monitor.
struct Shared {
    _dir: TempDir,
    _daemon: Daemon,
    qmp: Qmp,
    a: std::path::PathBuf,
    b: std::path::PathBuf,
}

fn shared_group(group: &str) -> Shared {
    let dir = TempDir::new("throttle");
    let (fa, fb) = (image(&dir, "a.img"), image(&dir, "b.img"));
    let (a, b, mon) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("qmp.sock"));
    let args = DaemonArgs::new()
        .monitor(&mon)
        .iothread("io0")
        .iothread("io1")
        .object(&format!("throttle-group,id=tg0,{group}"));
    let args = export(args, "ta", &fa, &a, "io0");
    let args = export(args, "tb", &fb, &b, "io1");
    let daemon = Daemon::start(&args.build());
    let qmp = Qmp::connect(&mon);
    Shared {
        _dir: dir,
        _daemon: daemon,
        qmp,
        a,
        b,
    }
}

/// Two frontends on the two exports of `sh`, both at `bs`-byte reads for `window`:
/// the requests they completed together, the time from the first start to the last
/// end (not counting the frontends' connections, which a loaded machine makes slow),
/// and the fewer of the two frontends' counts.
fn both_for(sh: &Shared, window: Duration, bs: usize) -> (u64, Duration, u64) {
    let runs: Vec<(u64, Instant, Instant)> = std::thread::scope(|s| {
        let h: Vec<_> = [&sh.a, &sh.b]
            .into_iter()
            .map(|sock| {
                s.spawn(move || {
                    let mut c = Client::connect(sock, 1);
                    let start = Instant::now();
                    let (done, t) = run_bs(c.q(), window, false, bs);
                    (done, start, start + t)
                })
            })
            .collect();
        h.into_iter().map(|h| h.join().expect("frontend")).collect()
    });
    let first = runs.iter().map(|r| r.1).min().expect("two runs");
    let last = runs.iter().map(|r| r.2).max().expect("two runs");
    let least = runs.iter().map(|r| r.0).min().unwrap_or(0);
    (runs.iter().map(|r| r.0).sum(), last - first, least)
}

/// The accuracy test: over 10 s, two exports on two iothreads sharing one
/// group get what QEMU's leaky bucket lets through within 5%: the average times the
/// time plus the bucket (a tenth of a second's worth without a burst rate; with one,
/// `max * max-length` units, taken at the burst rate first). Limits of 500 IOPS with a
/// burst of 1000 IOPS for 2 s, 500 IOPS, 5000 IOPS and 20 MB/s.
#[test]
fn limits_hold_within_5_percent_over_10_seconds() {
    let mut sh = shared_group("x-iops-total=500,x-iops-total-max=1000,x-iops-total-max-length=2");
    let window = Duration::from_secs(10);
    let check = |what: &str, done: u64, t: Duration, per_sec: f64, bucket: f64| {
        let want = per_sec * t.as_secs_f64() + bucket;
        let ratio = done as f64 / want;
        eprintln!("{what}: {done} requests in {t:.2?}, {want:.0} expected ({ratio:.3}x)");
        assert!(
            (0.95..=1.05).contains(&ratio),
            "{what}: {done} requests in {t:.2?}, not within 5% of {want:.0}"
        );
    };
    // The group is fresh: its bucket takes 2000 requests (1000 IOPS for 2 s) at up to
    // 1000 IOPS, on top of 500 IOPS.
    let (done, t, _) = both_for(&sh, window, BLOCK);
    check(
        "500 IOPS, bursts of 1000 IOPS for 2 s",
        done,
        t,
        500.0,
        2000.0,
    );
    for (what, limits, bs, per_sec) in [
        // `limits` changes only the members given (as in QEMU): the burst goes.
        (
            "500 IOPS",
            json!({"iops-total": 500, "iops-total-max": 0, "iops-total-max-length": 1}),
            BLOCK,
            500.0,
        ),
        ("5000 IOPS", json!({"iops-total": 5000}), BLOCK, 5000.0),
        (
            "20 MB/s",
            json!({"bps-total": 20_000_000}),
            65536,
            20e6 / 65536.0,
        ),
    ] {
        // New limits empty the buckets (as QEMU's throttle_config does).
        sh.qmp.ok(
            "qom-set",
            json!({"path": "/objects/tg0", "property": "limits", "value": limits}),
        );
        let (done, t, _) = both_for(&sh, window, bs);
        check(what, done, t, per_sec, per_sec / 10.0);
    }
}

#[test]
fn reads_and_flushes_complete_while_a_write_storm_is_throttled() {
    let dir = TempDir::new("throttle");
    let a = image(&dir, "a.img");
    let sa = dir.join("a.sock");
    let args = DaemonArgs::new()
        .iothread("io0")
        .object("throttle-group,id=tg0,x-iops-total=100");
    let _daemon = Daemon::start(&export(args, "ta", &a, &sa, "io0").build());
    let mut c = Client::connect(&sa, 2);
    let (qw, qr) = c.queues_mut().split_at_mut(1);
    let (qw, qr) = (&mut qw[0], &mut qr[0]);
    let window = Duration::from_secs(3);
    let (writes, reads, flushes, t) = std::thread::scope(|s| {
        // DEPTH writes always queued for the group's budget...
        let storm = s.spawn(move || run(qw, window + Duration::from_millis(500), true));
        std::thread::sleep(Duration::from_millis(300));
        // ...and one read at a time, with a flush after each.
        let start = Instant::now();
        let (mut reads, mut flushes) = (0u64, 0u64);
        while start.elapsed() < window {
            assert_eq!(
                qr.submit(&[Req::Read {
                    offset: 0,
                    buf: 0..BLOCK
                }]),
                [0]
            );
            reads += 1;
            assert_eq!(qr.submit(&[Req::Flush]), [0]);
            flushes += 1;
        }
        let t = start.elapsed();
        (storm.join().expect("storm"), reads, flushes, t)
    });
    let (writes, tw) = writes;
    let secs = t.as_secs_f64();
    eprintln!("{writes} writes; {reads} reads and {flushes} flushes in {secs:.2} s");
    // Reads queue apart from writes and compete with the head of the write queue
    // for the budget: about half of it. Behind the writes in one queue, a read (and
    // a throttled flush) would wait for DEPTH writes each time: 100 / 9 per second.
    assert!(
        reads as f64 >= 0.25 * 100.0 * secs,
        "reads starved by a throttled write storm: {reads} in {secs:.2} s"
    );
    // Together they stay within the group's budget over the storm's time.
    let budget = 100.0 * tw.as_secs_f64() + 11.0;
    assert!(
        ((writes + reads) as f64) <= 1.5 * budget + DEPTH as f64,
        "{writes} writes and {reads} reads in {tw:?} exceed 100 IOPS"
    );
}

/// Through an export whose root is a throttle node (passed at admission, far below
/// its limits), written data reads back, the guest's flush reaches the file (a host
/// sync), and `query-blockstats` counts the requests at the throttle node as at
/// its file.
#[test]
fn writes_and_flushes_through_a_throttle_root_reach_the_file() {
    let (_dir, _daemon, mut qmp, mut c) =
        one_export("throttle-group,id=tg0,x-iops-total=100000000,x-bps-total=100000000000000");
    let c = c.q();
    let syncs = |q: &mut Qmp| {
        q.node_blockstats("ta-file")["driver-specific"]["x-sync-operations"]
            .as_u64()
            .expect("x-sync-operations")
    };
    let synced = syncs(&mut qmp);
    for i in 0..16u8 {
        c.write(u64::from(i) * BLOCK as u64, &[i + 1; BLOCK])
            .expect("write");
    }
    c.flush().expect("flush");
    assert!(syncs(&mut qmp) > synced, "the flush did not reach the file");
    for i in 0..16u8 {
        let got = c
            .read_poisoned(u64::from(i) * BLOCK as u64, BLOCK, 0xee)
            .expect("read");
        assert!(
            got.iter().all(|b| *b == i + 1),
            "block {i} reads back wrong"
        );
    }
    for node in ["ta", "ta-file"] {
        let st = &qmp.node_blockstats(node)["stats"];
        assert_eq!(st["wr_operations"], 16, "{node}: {st}");
        assert_eq!(st["rd_operations"], 16, "{node}: {st}");
        assert_eq!(st["flush_operations"], 1, "{node}: {st}");
    }
}

#[test]
fn a_drained_section_lets_queued_requests_go() {
    // At 1 IOPS, 48 queued reads would hold a drain for longer than the control
    // plane waits (30 s); QEMU lifts the limits of a drained throttle node.
    let (_dir, _daemon, mut qmp, mut c) = one_export("throttle-group,id=tg0,x-iops-total=1");
    let q = c.q();
    q.set_timeout(Duration::from_secs(120));
    let n = 48;
    let reqs: Vec<Req> = (0..n)
        .map(|i| Req::Read {
            offset: (i * BLOCK) as u64,
            buf: 0..BLOCK,
        })
        .collect();
    std::thread::scope(|s| {
        let batch = s.spawn(move || q.submit(&reqs));
        std::thread::sleep(Duration::from_millis(500));
        // block_resize drains the throttle node (and fails if the reads stay queued).
        qmp.ok(
            "block_resize",
            json!({"node-name": "ta", "size": SIZE + MIB}),
        );
        assert!(batch.join().expect("reads").iter().all(|r| *r == 0));
    });
}

#[test]
fn invalid_limits_on_the_command_line_are_a_config_error() {
    let dir = TempDir::new("throttle");
    let a = image(&dir, "a.img");
    let sa = dir.join("a.sock");
    for (group, text) in [
        (
            "throttle-group,id=tg0,x-iops-size=4096",
            "iops size requires an iops value to be set",
        ),
        (
            "throttle-group,id=tg0,x-iops-total=10,x-iops-read=5",
            "bps/iops/max total values and read/write values cannot be used at the same time",
        ),
        ("throttle-group,id=tg0,x-iops-total=ten", "x-iops-total"),
        (
            "throttle-group,id=tg0,limits.iops-total=10,limits.iops-total-max=5",
            "bps_max/iops_max cannot be lower than bps/iops",
        ),
    ] {
        let args = DaemonArgs::new().iothread("io0").object(group);
        let args = export(args, "ta", &a, &sa, "io0").build();
        let out = vubd_tests::run_to_exit(&vubd_tests::vubd_bin(), &args, Duration::from_secs(10));
        out.assert_config_error(&[text]);
        assert!(!sa.exists(), "served despite a bad throttle group");
    }
    // The keyval form of `limits` works as well.
    let args = DaemonArgs::new()
        .iothread("io0")
        .object("throttle-group,id=tg0,limits.iops-total=10,limits.iops-total-max=20");
    let _daemon = Daemon::start(&export(args, "ta", &a, &sa, "io0").build());
    let mut c = Client::connect(&sa, 1);
    assert!(c.q().read(0, BLOCK).is_ok());
}

//! Many exports per iothread (issue 16): exports sharing an iothread are added, removed
//! and moved between iothreads while their neighbours do verified I/O; and 200 idle
//! exports on 2 iothreads, measured as numbers (threads, idle CPU ticks, resident memory
//! per export), not as a timed benchmark.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vubd_tests::daemon::{clock_ticks_per_sec, thread_cpu_ticks_of};
use vubd_tests::{
    assert_same_data, exercise, verify_all, Client, ClientOptions, Daemon, DaemonArgs,
    ExerciseOpts, Qmp, Rng, TempDir, TempImage, MIB,
};

/// How long a test waits for the writers to make progress before declaring a hang (a
/// hang guard, not a performance assertion).
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);

/// Rounds every live writer completes between two reconfigurations: each one proves
/// that all exports (the one just moved and its neighbours) serve verified I/O.
const ROUNDS_BETWEEN_STEPS: u64 = 3;

/// Rounds every live writer completes while the CPU time of the iothreads is compared.
const CPU_WINDOW_ROUNDS: u64 = 30;

/// CPU ticks a thread (or the daemon) may use while it has nothing to do: a couple, for
/// the tick-sampled accounting of a wake-up that happens to straddle a tick.
const IDLE_TICKS_MAX: u64 = 2;

/// One writer thread's shared state: the main thread reads its progress and tells it to
/// stop; the writer flags a failure before its panic reaches the scope.
#[derive(Default)]
struct Writer {
    stop: AtomicBool,
    rounds: AtomicU64,
    failed: AtomicBool,
}

/// Sets `failed` when the writer's thread unwinds, so waits in the main thread end.
struct FailFlag<'a>(&'a AtomicBool);

impl Drop for FailFlag<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// Tells every writer to stop when dropped: a failing main thread must not leave the
/// scope waiting for writers that run until told to stop.
struct StopAll<'a>(&'a [Writer]);

impl Drop for StopAll<'_> {
    fn drop(&mut self) {
        for w in self.0 {
            w.stop.store(true, Ordering::SeqCst);
        }
    }
}

/// The I/O of one export's frontend: libblkio, 2 queues (both rings of the export move
/// together), rounds alternating between the queues until told to stop (a round: twice
/// a batch of random writes then a batch of reads checked against the model); then a
/// full read back, a flush, and the model is returned. Any I/O error or data mismatch
/// panics the thread.
fn run_writer(sock: &Path, w: &Writer, mut shadow: Vec<u8>, seed: u64) -> Vec<u8> {
    let _flag = FailFlag(&w.failed);
    let mut rng = Rng::with_seed(seed);
    let opts = ClientOptions {
        num_queues: 2,
        buf_per_queue: 2 << 20,
        ..Default::default()
    };
    let mut client = Client::connect_with(sock, &opts).unwrap_or_else(|e| panic!("{e}"));
    let max_segs = client.prop_i32("max-segments").max(1) as usize;
    let max_seg_len = client.prop_i32("max-segment-len").max(0) as usize;
    let o = ExerciseOpts {
        rounds: 2,
        max_segs: max_segs.min(8),
        max_seg_len,
        ..Default::default()
    };
    let mut round = 0u64;
    while !w.stop.load(Ordering::SeqCst) {
        let q = client.queue((round % 2) as usize);
        exercise(q, &mut rng, 0, &mut shadow, &o);
        round += 1;
        w.rounds.store(round, Ordering::SeqCst);
    }
    verify_all(
        client.queue(1),
        0,
        &shadow,
        &format!("{}: read back", sock.display()),
    );
    client.q().flush().expect("flush");
    shadow
}

/// The daemon under reconfiguration and its writers: which exports are live, how far
/// each writer had got at the last check, and which iothread each export is on.
struct Rig<'a> {
    daemon: Daemon,
    qmp: Qmp,
    writers: &'a [Writer],
    live: Vec<usize>,
    seen: Vec<u64>,
    on: Vec<&'static str>,
    tids: BTreeMap<String, u32>,
}

impl Rig<'_> {
    /// Waits until every live writer has done `rounds` more rounds than at the last
    /// check. Panics if a writer failed or the daemon is gone.
    fn progress(&mut self, rounds: u64, what: &str) {
        let deadline = Instant::now() + PROGRESS_TIMEOUT;
        let done = |w: &Writer| w.rounds.load(Ordering::SeqCst);
        loop {
            if let Some(i) = self
                .writers
                .iter()
                .position(|w| w.failed.load(Ordering::SeqCst))
            {
                panic!("{what}: the writer of export e{i} failed (its panic follows)");
            }
            self.daemon.assert_running(what);
            if self
                .live
                .iter()
                .all(|&i| done(&self.writers[i]) >= self.seen[i] + rounds)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: writers made no progress within {PROGRESS_TIMEOUT:?}: rounds {:?}, \
                 waiting for {rounds} beyond {:?} on exports {:?}",
                self.writers.iter().map(done).collect::<Vec<_>>(),
                self.seen,
                self.live
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        for &i in &self.live {
            self.seen[i] = done(&self.writers[i]);
        }
    }

    /// Moves export `i`'s node to iothread `to` under I/O; every live export then does
    /// verified rounds.
    fn move_node(&mut self, i: usize, to: &'static str) {
        self.qmp.ok(
            "x-blockdev-set-iothread",
            json!({"node-name": format!("d{i}"), "iothread": to, "force": true}),
        );
        self.on[i] = to;
        self.progress(ROUNDS_BETWEEN_STEPS, &format!("after moving d{i} to {to}"));
    }

    fn thread_ticks(&self, iothread: &str) -> u64 {
        let (pid, tid) = (self.daemon.pid(), self.tids[iothread]);
        thread_cpu_ticks_of(pid, tid)
            .unwrap_or_else(|| panic!("no /proc/{pid}/task/{tid}/stat: {iothread} gone?"))
    }

    /// Counts the CPU ticks of iothreads `busy` and `idle` while every live writer does
    /// [`CPU_WINDOW_ROUNDS`] rounds, and asserts the work runs on `busy`: `idle`
    /// has no ring to serve.
    fn assert_work_on(&mut self, busy: &str, idle: &str) {
        let (b0, i0) = (self.thread_ticks(busy), self.thread_ticks(idle));
        let what = format!("all exports on {busy}");
        self.progress(CPU_WINDOW_ROUNDS, &what);
        let (b1, i1) = (self.thread_ticks(busy), self.thread_ticks(idle));
        eprintln!(
            "{what}: CPU ticks of {busy} +{}, of {idle} +{} ({} ticks/s)",
            b1 - b0,
            i1 - i0,
            clock_ticks_per_sec()
        );
        assert!(
            i1 - i0 <= IDLE_TICKS_MAX,
            "{what}: {idle} serves no ring but used {} CPU ticks ({busy}: {})",
            i1 - i0,
            b1 - b0
        );
        assert!(
            b1 - b0 > i1 - i0,
            "{what}: {busy} used {} CPU ticks, no more than {idle} ({}): the rings are \
             not served by {busy}",
            b1 - b0,
            i1 - i0
        );
    }
}

/// Thread id of each iothread, from `query-iothreads`.
fn iothread_tids(qmp: &mut Qmp) -> BTreeMap<String, u32> {
    qmp.ok("query-iothreads", json!({}))
        .as_array()
        .expect("query-iothreads returns an array")
        .iter()
        .map(|t| {
            let id = t["id"].as_str().expect("iothread id").to_string();
            let tid = t["thread-id"].as_u64().expect("thread-id") as u32;
            (id, tid)
        })
        .collect()
}

fn blockdev_add_raw(qmp: &mut Qmp, node: &str, img: &TempImage) {
    qmp.ok(
        "blockdev-add",
        json!({
            "driver": "raw",
            "node-name": node,
            "file": {"driver": "file", "filename": img.path_str(), "cache": {"direct": false}},
        }),
    );
}

fn export_add(qmp: &mut Qmp, id: &str, node: &str, sock: &Path, extra: Value) {
    let mut opts = json!({
        "type": "vhost-user-blk",
        "id": id,
        "node-name": node,
        "addr": {"type": "unix", "path": sock.to_str().expect("UTF-8 path")},
    });
    for (k, v) in extra.as_object().expect("extra options are an object") {
        opts[k] = v.clone();
    }
    qmp.ok("block-export-add", opts);
}

fn export_ids(qmp: &mut Qmp) -> Vec<String> {
    let mut ids: Vec<String> = qmp
        .ok("query-block-exports", json!({}))
        .as_array()
        .expect("query-block-exports returns an array")
        .iter()
        .map(|e| e["id"].as_str().expect("export id").to_string())
        .collect();
    ids.sort();
    ids
}

/// Exports e0..e3 share io0; e4 is added on io0 under I/O; e3's frontend finishes and e3
/// is deleted while the others keep going; nodes move between io0 and io1 (force=true)
/// under I/O, and each move is followed by verified rounds on every live export. With
/// all rings on one iothread, the other uses no CPU. At the end every export's data
/// reads back through a fresh frontend and is in its image file.
#[test]
fn exports_sharing_an_iothread_added_removed_and_moved_under_io() {
    const INITIAL: usize = 4;
    const ALL: usize = INITIAL + 1;
    const DOOMED: usize = 3;
    let mut rng = Rng::new("exports_sharing_an_iothread_added_removed_and_moved_under_io");
    let dir = TempDir::new("vubd-t");
    let qmp_sock = dir.join("qmp.sock");
    let size = 8 * MIB;
    let mut imgs = Vec::new();
    let mut contents = Vec::new();
    for _ in 0..ALL {
        let (img, data) = TempImage::new_random(size, &mut rng);
        imgs.push(img);
        contents.push(data);
    }
    let socks: Vec<_> = (0..ALL).map(|i| dir.join(&format!("e{i}.sock"))).collect();
    let mut args = DaemonArgs::new()
        .iothread("io0")
        .iothread("io1")
        .monitor(&qmp_sock);
    for i in 0..INITIAL {
        args = args
            .file_raw(&format!("d{i}"), &imgs[i], "", "")
            .export(&format!(
                "type=vhost-user-blk,id=e{i},node-name=d{i},addr.type=unix,addr.path={},\
             writable=on,num-queues=2,iothread=io0",
                socks[i].display()
            ));
    }
    let daemon = Daemon::start(&args.build());
    let mut qmp = Qmp::connect(&qmp_sock);
    let tids = iothread_tids(&mut qmp);
    assert_eq!(tids.len(), 2, "iothreads: {tids:?}");

    let writers: Vec<Writer> = (0..ALL).map(|_| Writer::default()).collect();
    let seeds: Vec<u64> = (0..ALL).map(|_| rng.next_u64()).collect();
    let mut rig = Rig {
        daemon,
        qmp,
        writers: &writers,
        live: (0..INITIAL).collect(),
        seen: vec![0; ALL],
        on: vec!["io0"; ALL],
        tids,
    };
    let mut results: Vec<Option<Vec<u8>>> = vec![None; ALL];

    std::thread::scope(|s| {
        let _stop_all = StopAll(&writers);
        let mut contents = contents.into_iter();
        let mut handles: Vec<_> = (0..ALL)
            .map(|i| {
                let (sock, w, seed) = (&socks[i], &writers[i], seeds[i]);
                let data = contents.next().expect("contents");
                // Writers wait for their export to exist: the 5th is added later.
                let spawn = move || {
                    while !sock.exists() {
                        if w.stop.load(Ordering::SeqCst) {
                            return data;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    run_writer(sock, w, data, seed)
                };
                Some(s.spawn(spawn))
            })
            .collect();
        rig.progress(1, "start");
        // Four exports' rings on io0, none on io1.
        rig.assert_work_on("io0", "io1");

        // A fifth export joins io0 while the others run.
        blockdev_add_raw(&mut rig.qmp, "d4", &imgs[4]);
        export_add(
            &mut rig.qmp,
            "e4",
            "d4",
            &socks[4],
            json!({"writable": true, "num-queues": 2, "iothread": "io0"}),
        );
        rig.live.push(4);
        rig.progress(ROUNDS_BETWEEN_STEPS, "after block-export-add e4");

        // Moves under I/O, the doomed export among them.
        for (i, to) in [
            (0, "io1"),
            (DOOMED, "io1"),
            (1, "io1"),
            (0, "io0"),
            (4, "io1"),
        ] {
            rig.move_node(i, to);
        }

        // e3's frontend finishes cleanly, then e3 goes while its neighbours run.
        writers[DOOMED].stop.store(true, Ordering::SeqCst);
        let shadow = handles[DOOMED]
            .take()
            .expect("handle")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        rig.live.retain(|&i| i != DOOMED);
        rig.qmp
            .ok("block-export-del", json!({"id": format!("e{DOOMED}")}));
        rig.qmp
            .wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(10))
            .expect("BLOCK_EXPORT_DELETED after block-export-del");
        rig.qmp
            .ok("blockdev-del", json!({"node-name": format!("d{DOOMED}")}));
        assert!(
            !socks[DOOMED].exists(),
            "socket of the deleted export is still there"
        );
        assert_same_data(
            "image of the deleted export",
            &imgs[DOOMED].read_all(),
            &shadow,
        );
        results[DOOMED] = Some(shadow);
        rig.progress(ROUNDS_BETWEEN_STEPS, "after block-export-del e3");

        // Everything onto io1: io0 goes quiet.
        for i in rig.live.clone() {
            if rig.on[i] != "io1" {
                rig.move_node(i, "io1");
            }
        }
        rig.assert_work_on("io1", "io0");
        // And back and forth a few more times.
        for (i, to) in [
            (2, "io0"),
            (4, "io0"),
            (1, "io0"),
            (2, "io1"),
            (0, "io0"),
            (4, "io1"),
        ] {
            rig.move_node(i, to);
        }

        for &i in &rig.live {
            writers[i].stop.store(true, Ordering::SeqCst);
        }
        for i in rig.live.clone() {
            let h = handles[i].take().expect("handle");
            results[i] = Some(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
    });
    let rounds: Vec<u64> = writers
        .iter()
        .map(|w| w.rounds.load(Ordering::SeqCst))
        .collect();
    eprintln!("verified rounds per export: {rounds:?}");

    assert_eq!(export_ids(&mut rig.qmp), ["e0", "e1", "e2", "e4"]);
    for i in (0..ALL).filter(|&i| i != DOOMED) {
        let shadow = results[i].as_ref().expect("writer result");
        let mut c = Client::connect(&socks[i], 1);
        verify_all(c.q(), 0, shadow, &format!("e{i}: fresh frontend"));
        drop(c);
        assert_same_data(&format!("image of e{i}"), &imgs[i].read_all(), shadow);
    }
    rig.daemon.assert_running("end");
}

/// Exports of the density test, and the iothreads they are spread over.
const DENSE_EXPORTS: usize = 200;
const DENSE_IOTHREADS: usize = 2;
/// How many of them get a frontend and verified I/O (raw files; the others are null-co).
const DENSE_BUSY: usize = 8;

/// Threads beyond the iothreads, whatever the number of exports (issue 16: 200 idle
/// exports on 2 iothreads run at most 2 + a small constant of threads): main, control,
/// QMP accept and connection, the daemon-wide vhost-user protocol thread.
const MAX_THREADS_BEYOND_IOTHREADS: usize = 8;

/// Resident memory an idle export may add (issue 16's target: under 64 KiB).
const MAX_RSS_KIB_PER_IDLE_EXPORT: u64 = 64;

/// How long the daemon is watched for idle CPU use.
const IDLE_WINDOW: Duration = Duration::from_secs(2);

/// Thread names with their instance part (after the last '-') folded, with counts:
/// `export-*: 200, iothread-*: 2, ...`.
fn thread_summary(names: &[String]) -> String {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for n in names {
        let kind = match n.rfind('-') {
            Some(i) => format!("{}-*", &n[..i]),
            None => n.clone(),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
        .iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The daemon's CPU ticks over [`IDLE_WINDOW`] with nothing to do.
fn idle_ticks(daemon: &Daemon) -> u64 {
    let t0 = daemon.cpu_ticks();
    std::thread::sleep(IDLE_WINDOW);
    daemon.cpu_ticks() - t0
}

/// Asserts the daemon runs at most [`MAX_THREADS_BEYOND_IOTHREADS`] threads besides its
/// iothreads. The kernel's io_uring workers ("iou-wrk-<tid>": io-wq threads made on
/// demand for I/O that cannot complete inline, ending after a few idle seconds) are
/// listed but not counted: their number follows the I/O just done.
#[track_caller]
fn assert_thread_bound(daemon: &Daemon, what: &str) {
    let names = daemon.thread_names();
    let own = names.iter().filter(|n| !n.starts_with("iou-wrk-")).count();
    let bound = DENSE_IOTHREADS + MAX_THREADS_BEYOND_IOTHREADS;
    eprintln!(
        "{what}: {own} threads (bound {bound}), {} with io_uring workers: {}",
        names.len(),
        thread_summary(&names)
    );
    assert!(
        own <= bound,
        "{what}: {own} threads besides io_uring workers, more than {bound}: {}",
        thread_summary(&names)
    );
}

/// 200 exports on 2 iothreads (issue 16), one on the command line and 199 added by QMP:
/// the number of threads, the CPU used while idle (with and without frontends
/// attached) and the resident memory per idle export are measured and bounded; 8 of the
/// exports get a frontend each and serve verified I/O at the same time.
#[test]
fn many_idle_exports_on_two_iothreads() {
    let mut rng = Rng::new("many_idle_exports_on_two_iothreads");
    let dir = TempDir::new("vubd-t");
    let qmp_sock = dir.join("qmp.sock");
    let size = 4 * MIB;
    let imgs: Vec<TempImage> = (0..DENSE_BUSY).map(|_| TempImage::new(size)).collect();
    let socks: Vec<_> = (0..DENSE_EXPORTS)
        .map(|i| dir.join(&format!("x{i}.sock")))
        .collect();
    let iothread = |i: usize| format!("io{}", i % DENSE_IOTHREADS);
    let mut args = DaemonArgs::new().monitor(&qmp_sock);
    for t in 0..DENSE_IOTHREADS {
        args = args.iothread(&format!("io{t}"));
    }
    let args = args
        .file_raw("n0", &imgs[0], "", "")
        .export(&format!(
            "type=vhost-user-blk,id=x0,node-name=n0,addr.type=unix,addr.path={},\
             writable=on,iothread={}",
            socks[0].display(),
            iothread(0)
        ))
        .build();
    let mut daemon = Daemon::start(&args);
    let mut qmp = Qmp::connect(&qmp_sock);
    assert_eq!(export_ids(&mut qmp), ["x0"]);
    let rss_one = daemon.vm_rss_kib();
    assert_thread_bound(&daemon, "1 export");

    for i in 1..DENSE_EXPORTS {
        let node = format!("n{i}");
        if i < DENSE_BUSY {
            blockdev_add_raw(&mut qmp, &node, &imgs[i]);
        } else {
            qmp.ok(
                "blockdev-add",
                json!({"driver": "null-co", "node-name": node, "size": 64 * MIB}),
            );
        }
        export_add(
            &mut qmp,
            &format!("x{i}"),
            &node,
            &socks[i],
            json!({"writable": i < DENSE_BUSY, "iothread": iothread(i)}),
        );
    }
    assert_eq!(export_ids(&mut qmp).len(), DENSE_EXPORTS);
    daemon.assert_running("after adding the exports");
    let rss_all = daemon.vm_rss_kib();
    let per_export = rss_all.saturating_sub(rss_one) as f64 / (DENSE_EXPORTS - 1) as f64;
    eprintln!(
        "VmRSS: {rss_one} KiB with 1 export, {rss_all} KiB with {DENSE_EXPORTS}: \
         {per_export:.1} KiB per idle export beyond the first"
    );
    assert!(
        per_export < MAX_RSS_KIB_PER_IDLE_EXPORT as f64,
        "{per_export:.1} KiB of resident memory per idle export (target: under \
         {MAX_RSS_KIB_PER_IDLE_EXPORT} KiB)"
    );
    assert_thread_bound(&daemon, "200 idle exports");
    let idle = idle_ticks(&daemon);
    eprintln!(
        "200 idle exports: {idle} CPU ticks in {IDLE_WINDOW:?} ({} ticks/s)",
        clock_ticks_per_sec()
    );
    assert!(
        idle <= IDLE_TICKS_MAX,
        "200 idle exports used {idle} CPU ticks in {IDLE_WINDOW:?}"
    );

    // 8 frontends at once, 4 on each iothread, verified I/O; they stay attached.
    let seeds: Vec<u64> = (0..DENSE_BUSY).map(|_| rng.next_u64()).collect();
    let mut clients: Vec<(Client, Vec<u8>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..DENSE_BUSY)
            .map(|i| {
                let (sock, seed) = (&socks[i], seeds[i]);
                s.spawn(move || {
                    let opts = ClientOptions {
                        buf_per_queue: 2 << 20,
                        ..Default::default()
                    };
                    let mut c = Client::connect_with(sock, &opts).unwrap_or_else(|e| panic!("{e}"));
                    let mut shadow = vec![0u8; size as usize];
                    let o = ExerciseOpts {
                        rounds: 20,
                        max_segs: (c.prop_i32("max-segments").max(1) as usize).min(8),
                        max_seg_len: c.prop_i32("max-segment-len").max(0) as usize,
                        ..Default::default()
                    };
                    exercise(c.q(), &mut Rng::with_seed(seed), 0, &mut shadow, &o);
                    c.q().flush().expect("flush");
                    (c, shadow)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    for (i, (c, shadow)) in clients.iter_mut().enumerate() {
        verify_all(c.q(), 0, shadow, &format!("x{i}: read back"));
        assert_same_data(&format!("image of x{i}"), &imgs[i].read_all(), shadow);
    }
    assert_thread_bound(&daemon, "200 exports, 8 frontends attached");
    let idle = idle_ticks(&daemon);
    eprintln!("200 exports, 8 idle frontends attached: {idle} CPU ticks in {IDLE_WINDOW:?}");
    assert!(
        idle <= IDLE_TICKS_MAX,
        "200 exports with 8 idle frontends used {idle} CPU ticks in {IDLE_WINDOW:?}"
    );
    drop(clients);
    daemon.assert_running("end");
}

//! The daemon killed with SIGKILL in the middle of a block job, while a frontend (libblkio)
//! writes to the export: what is left on disk must be a valid chain that holds the data.
//!
//! Scenarios (one test each):
//! * `block-stream` of `base <- top` into top;
//! * intermediate `block-commit` of mid into base in `base <- mid <- act`;
//! * active `block-commit` of act into base in `base <- act`, killed in the bulk phase;
//! * the same, killed in the ready state (the mirror copying the frontend's writes);
//! * `blockdev-mirror` (sync=full) of act in `base <- act` to a blank qcow2 image,
//!   killed while it copies, and in write-blocking mode, killed in the ready state.
//!
//! Each job runs with a `speed` limit (none for the ready case) so that the kill lands
//! mid-job: `query-block-jobs` just before the kill must show it running with offset <
//! len (or ready), and the test prints that offset and len.
//!
//! The layers hold generated 4 KiB blocks: 16 bytes of header (the seed of the write that
//! made the block, the block's index) and data derived from both, so every block read
//! back says which write it came from, and a torn or misplaced block is recognised. The
//! base is fully allocated (seed 1), the overlays have random runs of clusters (seeds 2
//! and 3). The frontend writes batches of 8 random blocks, each with a new seed, then
//! flushes; for each block the test knows the last write made durable by a completed
//! flush, and the writes since (acknowledged or in flight at the kill).
//!
//! After the kill, with the daemon gone:
//! * `qemu-img info --backing-chain` opens the chain, and it is still the chain of before
//!   the job (a job killed before it completes must not have changed the headers);
//! * `qemu-img check` of every file finds no corruption. Leaked clusters are accepted
//!   (qemu-img check's exit status 3): a cluster allocated (its refcount written) whose
//!   mapping was never written, because the process died in between, wastes space but
//!   breaks nothing, and QEMU's own qcow2 leaves such leaks after a crash by design
//!   (`qemu-img check -r leaks` reclaims them). A refcount lower than the references, or
//!   a broken table, is corruption and fails the test. Leaks are reported;
//! * the guest-visible content of the top of the chain (qemu-img convert, following the
//!   backing files) is, for every block, what the frontend last made durable (or the
//!   initial content if it never wrote the block), or one of its writes since: a stream
//!   or a commit does not change what the top reads;
//! * every block of each layer below the top reads as its state before the job or its
//!   state after it: stream leaves base unchanged; an intermediate commit writes mid's
//!   data over base (so base's block is base's or mid-over-base's) and leaves mid as it
//!   was; an active commit copies act's data into base (base's block is base's, act's
//!   initial one, or one the frontend wrote to act); a mirror leaves base as it was,
//!   and its target, a partial copy, must still check clean. The granularity is 4 KiB: a kill
//!   can cut a multi-cluster copy between pages, and each page is either copied or not.
//!
//! The daemon is vubd; `VUBD_JOBS_DAEMON=qsd` runs the same tests against
//! qemu-storage-daemon (the reference for the expectations).

use blkio::{Completion, Errno, ReqFlags};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vubd_tests::tools::{qemu_img, run_ok};
use vubd_tests::{Client, Daemon, DaemonArgs, IoQueue, Qmp, Rng, TempDir, KIB, MIB};

/// Virtual size of every layer.
const SIZE: u64 = 64 * MIB;
const BLOCK: usize = 4096;
const BLOCKS: usize = (SIZE as usize) / BLOCK;
const CLUSTER: u64 = 64 * KIB;
const CLUSTERS: u64 = SIZE / CLUSTER;
/// Blocks the frontend writes between flushes.
const BATCH: usize = 8;
/// The frontend's pause between batches (a few hundred writes a second): unpaced, it
/// would allocate every cluster of the top within a second, leaving a stream nothing to
/// copy.
const PACE: Duration = Duration::from_millis(10);
/// Hang guards.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
const IO_HANG: Duration = Duration::from_secs(60);
/// Seeds of the layers' initial data.
const BASE_SEED: u64 = 1;
const MID_SEED: u64 = 2;
const TOP_SEED: u64 = 3;
/// Seeds of the frontend's writes start here.
const FIRST_WRITE_SEED: u64 = 1000;

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
}

/// Block `block` as written by the write with `seed`.
fn block_data(seed: u64, block: usize) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(&seed.to_le_bytes());
    b[8..16].copy_from_slice(&(block as u64).to_le_bytes());
    Rng::with_seed(seed.wrapping_mul(0x1_0000_0001) ^ block as u64).fill(&mut b[16..]);
    b
}

/// Which write made this block: its seed, if the block is exactly `block_data(seed,
/// block)`; `Err` describes what it is instead.
fn decode(data: &[u8], block: usize) -> Result<u64, String> {
    if data.iter().all(|&b| b == 0) {
        return Err("zeroes".into());
    }
    let seed = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let idx = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    if idx != block as u64 {
        return Err(format!("block {idx}'s data (seed {seed})"));
    }
    if data != block_data(seed, block).as_slice() {
        return Err(format!("a torn or foreign block (header: seed {seed})"));
    }
    Ok(seed)
}

/// One layer of the initial chain.
#[derive(Debug, Clone)]
struct Layer {
    /// Node name; the file is `<node>.qcow2`.
    node: &'static str,
    seed: u64,
    /// Allocated clusters (all of them for the base).
    clusters: BTreeSet<u64>,
}

impl Layer {
    fn full(node: &'static str, seed: u64) -> Layer {
        Layer {
            node,
            seed,
            clusters: (0..CLUSTERS).collect(),
        }
    }

    /// Random runs of 1-16 clusters covering about `fraction` of the disk.
    fn runs(node: &'static str, seed: u64, fraction: f64, rng: &mut Rng) -> Layer {
        let mut clusters = BTreeSet::new();
        while (clusters.len() as f64) < fraction * CLUSTERS as f64 {
            let start = rng.range(0, CLUSTERS);
            let len = rng.range(1, 17);
            clusters.extend(start..(start + len).min(CLUSTERS));
        }
        Layer {
            node,
            seed,
            clusters,
        }
    }

    fn has_block(&self, block: usize) -> bool {
        self.clusters
            .contains(&(block as u64 * BLOCK as u64 / CLUSTER))
    }
}

/// Creates the images of `layers` (bottom first) in `dir`.
fn make_images(dir: &TempDir, layers: &[Layer]) {
    for (i, l) in layers.iter().enumerate() {
        let img = dir.join(&format!("{}.qcow2", l.node));
        if i == 0 {
            assert_eq!(l.clusters.len() as u64, CLUSTERS, "the base is full");
            let raw = dir.join("base.raw");
            let mut data = Vec::with_capacity(SIZE as usize);
            for b in 0..BLOCKS {
                data.extend_from_slice(&block_data(l.seed, b));
            }
            std::fs::write(&raw, data).expect("write base.raw");
            qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&img)]);
            std::fs::remove_file(&raw).expect("remove base.raw");
            continue;
        }
        let below = dir.join(&format!("{}.qcow2", layers[i - 1].node));
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            s(&below),
            "-F",
            "qcow2",
            s(&img),
            &SIZE.to_string(),
        ]);
        // Contiguous runs, each written by qemu-io from a file of its data.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &c in &l.clusters {
            match runs.last_mut() {
                Some((start, n)) if *start + *n == c => *n += 1,
                _ => runs.push((c, 1)),
            }
        }
        let mut io = Command::new("qemu-io");
        io.args(["-f", "qcow2"]);
        for (k, &(start, n)) in runs.iter().enumerate() {
            let f = dir.join(&format!("run{k}.bin"));
            let first = (start * CLUSTER) as usize / BLOCK;
            let blocks = (n * CLUSTER) as usize / BLOCK;
            let mut data = Vec::with_capacity(blocks * BLOCK);
            for b in first..first + blocks {
                data.extend_from_slice(&block_data(l.seed, b));
            }
            std::fs::write(&f, data).expect("write run file");
            io.arg("-c").arg(format!(
                "write -q -s {} {} {}",
                s(&f),
                start * CLUSTER,
                n * CLUSTER
            ));
        }
        io.arg(&img);
        run_ok(&mut io);
        for k in 0..runs.len() {
            std::fs::remove_file(dir.join(&format!("run{k}.bin"))).expect("remove run file");
        }
    }
}

/// The seed each block of the chain `layers[..=top]` reads as.
fn visible_seeds(layers: &[Layer], top: usize) -> Vec<u64> {
    (0..BLOCKS)
        .map(|b| {
            layers[..=top]
                .iter()
                .rev()
                .find(|l| l.has_block(b))
                .map_or(0, |l| l.seed)
        })
        .collect()
}

/// What the frontend wrote, block by block.
#[derive(Debug)]
struct Tracker {
    /// The seed of the last write made durable by a completed flush.
    durable: Vec<Option<u64>>,
    /// Writes since (acknowledged without a flush yet, or in flight).
    pending: Vec<Vec<u64>>,
    /// Every seed ever written to the block.
    history: Vec<Vec<u64>>,
    writes: u64,
    flushes: u64,
}

impl Tracker {
    fn new() -> Tracker {
        Tracker {
            durable: vec![None; BLOCKS],
            pending: vec![Vec::new(); BLOCKS],
            history: vec![Vec::new(); BLOCKS],
            writes: 0,
            flushes: 0,
        }
    }
}

/// Waits for `n` completions on `q`; `None` once `killed` is set and nothing more comes.
/// Panics on a failed request (the daemon must not fail I/O) or after [`IO_HANG`].
fn wait_completions(q: &mut IoQueue, n: usize, killed: &AtomicBool, what: &str) -> Option<()> {
    let (bq, _, _) = q.raw();
    let mut done = 0;
    let mut slots: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
    let t0 = Instant::now();
    while done < n {
        let mut t = Duration::from_millis(100);
        match bq.do_io(&mut slots, 1, Some(&mut t), None) {
            Ok(k) => {
                for c in &slots[..k] {
                    // SAFETY: do_io initialised the first k elements.
                    let c = unsafe { c.assume_init_ref() };
                    assert_eq!(c.ret, 0, "{what}: request {} failed: {c:?}", c.user_data);
                }
                done += k;
            }
            Err(e) if e.errno() == Errno::INTR => {}
            Err(e) => {
                if killed.load(Ordering::SeqCst) {
                    return None;
                }
                assert!(
                    e.errno() == Errno::TIME,
                    "{what}: do_io failed with the daemon alive: {e}"
                );
                assert!(
                    t0.elapsed() < IO_HANG,
                    "{what}: no completion within {IO_HANG:?}: daemon hung?"
                );
            }
        }
    }
    Some(())
}

/// Writes batches of [`BATCH`] random blocks and flushes after each, until `stop` or
/// `killed` (the daemon died under it); records everything in `tr`.
fn writer(q: &mut IoQueue, seed: u64, stop: &AtomicBool, killed: &AtomicBool, tr: &Mutex<Tracker>) {
    let mut rng = Rng::with_seed(seed);
    let mut next = FIRST_WRITE_SEED;
    while !stop.load(Ordering::SeqCst) && !killed.load(Ordering::SeqCst) {
        let mut blocks: Vec<usize> = Vec::with_capacity(BATCH);
        while blocks.len() < BATCH {
            let b = rng.range_usize(0, BLOCKS);
            if !blocks.contains(&b) {
                blocks.push(b);
            }
        }
        let seeds: Vec<u64> = (0..BATCH as u64).map(|i| next + i).collect();
        next += BATCH as u64;
        {
            let mut t = tr.lock().expect("tracker");
            for (&b, &sd) in blocks.iter().zip(&seeds) {
                t.pending[b].push(sd);
                t.history[b].push(sd);
            }
        }
        let buf = q.buf();
        for (i, (&b, &sd)) in blocks.iter().zip(&seeds).enumerate() {
            buf[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&block_data(sd, b));
        }
        let (bq, base, _) = q.raw();
        for (i, &b) in blocks.iter().enumerate() {
            // The buffer stays ours and unchanged until the completions are reaped.
            let p = base.wrapping_add(i * BLOCK);
            bq.write((b * BLOCK) as u64, p, BLOCK, i, ReqFlags::empty());
        }
        if wait_completions(q, BATCH, killed, "write").is_none() {
            return;
        }
        let (bq, _, _) = q.raw();
        bq.flush(BATCH, ReqFlags::empty());
        if wait_completions(q, 1, killed, "flush").is_none() {
            return;
        }
        let mut t = tr.lock().expect("tracker");
        for (&b, &sd) in blocks.iter().zip(&seeds) {
            t.durable[b] = Some(sd);
            t.pending[b].clear();
        }
        t.writes += BATCH as u64;
        t.flushes += 1;
        drop(t);
        std::thread::sleep(PACE);
    }
}

/// Runs a command; returns (exit code, stdout, stderr).
fn output(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `qemu-img check` of `img`: Err on corruption or failure; Ok(leaked clusters).
fn check_image(img: &Path) -> Result<u64, String> {
    let (rc, out, err) =
        output(Command::new("qemu-img").args(["check", "-f", "qcow2", "--output=json", s(img)]));
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    // 0: clean; 3: leaked clusters only.
    if (rc == 0 || rc == 3) && n("corruptions") == 0 && n("check-errors") == 0 {
        return Ok(n("leaks"));
    }
    Err(format!(
        "qemu-img check {}: exit status {rc}\n{out}{err}",
        img.display()
    ))
}

/// The backing chain qemu-img finds from `top`: file names, top first.
fn backing_chain(top: &Path) -> Result<Vec<PathBuf>, String> {
    let (rc, out, err) =
        output(Command::new("qemu-img").args(["info", "--backing-chain", "--output=json", s(top)]));
    if rc != 0 {
        return Err(format!("qemu-img info --backing-chain: {err}"));
    }
    let v: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    Ok(v.as_array()
        .ok_or_else(|| format!("not a list: {v}"))?
        .iter()
        .map(|i| PathBuf::from(i["filename"].as_str().unwrap_or("?")))
        .collect())
}

/// The content of `img` as qemu-img reads it: through its backing chain, or alone
/// (`alone`: without its backing file; unallocated blocks read as zeroes).
fn read_image(dir: &TempDir, img: &Path, alone: bool) -> Vec<u8> {
    let out = dir.join("read.raw");
    let src = if alone {
        json!({"driver": "qcow2", "backing": null,
               "file": {"driver": "file", "filename": s(img)}})
        .to_string()
    } else {
        s(img).to_string()
    };
    let src = if alone { format!("json:{src}") } else { src };
    qemu_img(&["convert", "-O", "raw", &src, s(&out)]);
    let data = std::fs::read(&out).expect("read converted image");
    std::fs::remove_file(&out).expect("remove read.raw");
    assert_eq!(data.len() as u64, SIZE, "size of {}", img.display());
    data
}

/// Blocks of `data` whose seed is not in `allowed(block)`: a message per block (at most
/// 20 shown) and the count.
fn check_blocks(
    what: &str,
    data: &[u8],
    allowed: impl Fn(usize) -> Vec<u64>,
) -> Result<(), String> {
    let mut bad = Vec::new();
    let mut count = 0;
    for b in 0..BLOCKS {
        let got = decode(&data[b * BLOCK..(b + 1) * BLOCK], b);
        let mut ok = allowed(b);
        ok.sort_unstable();
        ok.dedup();
        if got.as_ref().is_ok_and(|sd| ok.contains(sd)) {
            continue;
        }
        count += 1;
        if bad.len() < 20 {
            bad.push(format!(
                "  block {b} (offset {:#x}): {} (allowed seeds {ok:?})",
                b * BLOCK,
                match got {
                    Ok(sd) => format!("seed {sd}"),
                    Err(e) => e,
                }
            ));
        }
    }
    if count == 0 {
        return Ok(());
    }
    Err(format!(
        "{what}: {count} block(s) hold neither the state before nor after:\n{}",
        bad.join("\n")
    ))
}

/// Which job, and where to kill it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    /// block-stream of top (`base <- top`), killed while running.
    Stream,
    /// block-commit of mid into base (`base <- mid <- act`), killed while running.
    IntermediateCommit,
    /// block-commit of act into base (`base <- act`), killed in the bulk phase.
    ActiveCommit,
    /// The same, killed in the ready state.
    ActiveCommitReady,
    /// blockdev-mirror of act (`base <- act`) to `tgt`, killed while running.
    Mirror,
    /// The same in write-blocking mode, killed in the ready state.
    MirrorReady,
}

impl Job {
    fn ready(self) -> bool {
        matches!(self, Job::ActiveCommitReady | Job::MirrorReady)
    }

    fn mirror(self) -> bool {
        matches!(self, Job::Mirror | Job::MirrorReady)
    }
}

/// Job speed for the kills mid-job (bytes/s): a few seconds of copying at least.
const SPEED: u64 = 4 * MIB;

fn kill_during(name: &str, job: Job) {
    let (daemon_name, bin) = vubd_tests::jobs_daemon();
    let t0 = Instant::now();
    let mut rng = Rng::new(name);
    let dir = TempDir::new_in(Path::new("/dev/shm"), "vubd-jobcrash");
    let layers = match job {
        Job::Stream => vec![
            Layer::full("base", BASE_SEED),
            Layer::runs("top", TOP_SEED, 0.25, &mut rng),
        ],
        Job::IntermediateCommit => vec![
            Layer::full("base", BASE_SEED),
            Layer::runs("mid", MID_SEED, 0.4, &mut rng),
            Layer::runs("act", TOP_SEED, 0.25, &mut rng),
        ],
        // Much to copy: the mirror's first pass copies a whole buffer before the limit
        // applies.
        Job::ActiveCommit | Job::Mirror => vec![
            Layer::full("base", BASE_SEED),
            Layer::runs("act", TOP_SEED, 0.75, &mut rng),
        ],
        Job::ActiveCommitReady | Job::MirrorReady => vec![
            Layer::full("base", BASE_SEED),
            Layer::runs("act", TOP_SEED, 0.25, &mut rng),
        ],
    };
    make_images(&dir, &layers);
    let top = layers.last().expect("layers").node;
    let img = |node: &str| dir.join(&format!("{node}.qcow2"));
    let (sock, mon) = (dir.join("export.sock"), dir.join("qmp.sock"));
    let mut args = DaemonArgs::new().monitor(&mon).iothread("io0");
    for (i, l) in layers.iter().enumerate() {
        let backing = if i == 0 {
            String::new()
        } else {
            format!(",backing={}", layers[i - 1].node)
        };
        args = args
            .blockdev(&format!(
                "driver=file,node-name={}-file,filename={},cache.direct=off",
                l.node,
                s(&img(l.node))
            ))
            .blockdev(&format!(
                "driver=qcow2,node-name={n},file={n}-file{backing}",
                n = l.node
            ));
    }
    if job.mirror() {
        let tgt = img("tgt");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&tgt), &SIZE.to_string()]);
        args = args
            .blockdev(&format!(
                "driver=file,node-name=tgt-file,filename={},cache.direct=off",
                s(&tgt)
            ))
            .blockdev("driver=qcow2,node-name=tgt,file=tgt-file");
    }
    let args = args
        .export(&format!(
            "type=vhost-user-blk,id=exp,node-name={top},addr.type=unix,addr.path={},\
             writable=on,num-queues=1,iothread=io0",
            s(&sock)
        ))
        .build();
    let mut daemon = Daemon::start_bin(&bin, &args);
    let mut qmp = Qmp::connect(&mon);
    let mut client = Client::connect(&sock, 1);
    assert_eq!(client.capacity(), SIZE);

    let tracker = Mutex::new(Tracker::new());
    let (stop, killed) = (AtomicBool::new(false), AtomicBool::new(false));
    let writer_seed = rng.next_u64();
    let (at_kill, events) = std::thread::scope(|sc| {
        let q = client.q();
        let w = sc.spawn(|| writer(q, writer_seed, &stop, &killed, &tracker));
        // Some durable writes before the job.
        std::thread::sleep(Duration::from_millis(300));
        let mut arguments = match job {
            Job::Stream => json!({"device": "top"}),
            Job::IntermediateCommit => {
                json!({"device": "act", "top-node": "mid", "base-node": "base"})
            }
            Job::ActiveCommit | Job::ActiveCommitReady => {
                json!({"device": "act", "base-node": "base"})
            }
            Job::Mirror => json!({"device": "act", "target": "tgt", "sync": "full"}),
            Job::MirrorReady => json!({
                "device": "act", "target": "tgt", "sync": "full", "copy-mode": "write-blocking"
            }),
        };
        arguments["job-id"] = json!("job0");
        if !job.ready() {
            arguments["speed"] = json!(SPEED);
        }
        let command = match job {
            Job::Stream => "block-stream",
            Job::Mirror | Job::MirrorReady => "blockdev-mirror",
            _ => "block-commit",
        };
        if let Err(e) = qmp.execute(command, arguments.clone()) {
            stop.store(true, Ordering::SeqCst);
            panic!("{command} {arguments}: {e:?}\n{}", daemon.stderr());
        }
        let mut events = Vec::new();
        let deadline = Instant::now() + JOB_TIMEOUT;
        if job.ready() {
            loop {
                let evs = qmp.take_events();
                let ready = evs.iter().any(|e| e["event"] == "BLOCK_JOB_READY");
                events.extend(evs);
                if ready {
                    break;
                }
                assert!(Instant::now() < deadline, "no BLOCK_JOB_READY: {events:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
            // The frontend's writes are mirrored to base from now on.
            std::thread::sleep(Duration::from_millis(rng.range(300, 800)));
        } else {
            std::thread::sleep(Duration::from_millis(rng.range(500, 1500)));
        }
        assert!(!w.is_finished(), "the frontend stopped writing");
        let jobs = qmp.ok("query-block-jobs", json!({}));
        events.extend(qmp.take_events());
        daemon.signal(libc::SIGKILL);
        let st = daemon.wait_timeout(Duration::from_secs(10));
        killed.store(true, Ordering::SeqCst);
        assert!(st.is_some(), "the daemon did not die of SIGKILL");
        w.join().expect("writer thread");
        let j = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["device"] == "job0"))
            .cloned()
            .unwrap_or_else(|| panic!("job0 not in query-block-jobs: {jobs}\n{events:?}"));
        (j, events)
    });
    drop(client);
    let (off, len) = (
        at_kill["offset"].as_u64().unwrap_or(0),
        at_kill["len"].as_u64().unwrap_or(0),
    );
    let tr = tracker.into_inner().expect("tracker");
    eprintln!(
        "{name} ({daemon_name}): killed at offset {off} of {len} ({}, ready: {}); the \
         frontend had made {} writes durable with {} flushes",
        at_kill["status"], at_kill["ready"], tr.writes, tr.flushes
    );
    if job.ready() {
        assert_eq!(at_kill["ready"], true, "not ready at the kill: {at_kill}");
    } else {
        assert!(
            at_kill["status"] == "running" && off < len,
            "{name}: the job was not in progress at the kill (lower the speed): {at_kill}\n\
             events: {events:?}"
        );
    }

    let mut problems = Vec::new();
    // The chain opens, and is the chain of before the job.
    let want: Vec<PathBuf> = layers.iter().rev().map(|l| img(l.node)).collect();
    match backing_chain(&img(top)) {
        Ok(chain) if chain == want => {}
        Ok(chain) => problems.push(format!("backing chain {chain:?}, expected {want:?}")),
        Err(e) => problems.push(e),
    }
    for l in &layers {
        match check_image(&img(l.node)) {
            Ok(0) => {}
            Ok(leaks) => eprintln!("{name}: {}.qcow2: {leaks} leaked cluster(s)", l.node),
            Err(e) => problems.push(e),
        }
    }
    // The top reads as the frontend left it.
    let initial = visible_seeds(&layers, layers.len() - 1);
    let allowed_top = |b: usize| {
        let mut v = vec![tr.durable[b].unwrap_or(initial[b])];
        v.extend(&tr.pending[b]);
        v
    };
    let data = read_image(&dir, &img(top), false);
    problems.extend(check_blocks(&format!("{top} (through its chain)"), &data, allowed_top).err());
    // The layers below, each alone: before or after.
    match job {
        Job::Mirror | Job::MirrorReady => {
            let base = read_image(&dir, &img("base"), true);
            problems.extend(check_blocks("base", &base, |_| vec![BASE_SEED]).err());
            match check_image(&img("tgt")) {
                Ok(0) => {}
                Ok(leaks) => eprintln!("{name}: tgt.qcow2: {leaks} leaked cluster(s)"),
                Err(e) => problems.push(e),
            }
        }
        Job::Stream => {
            let base = read_image(&dir, &img("base"), true);
            problems.extend(check_blocks("base", &base, |_| vec![BASE_SEED]).err());
        }
        Job::IntermediateCommit => {
            let after = visible_seeds(&layers, 1);
            let base = read_image(&dir, &img("base"), true);
            problems.extend(check_blocks("base", &base, |b| vec![BASE_SEED, after[b]]).err());
            // mid, alone, is unchanged: its own clusters, and zeroes elsewhere.
            let mid = read_image(&dir, &img("mid"), true);
            let mut wrong = Vec::new();
            for b in 0..BLOCKS {
                let blk = &mid[b * BLOCK..(b + 1) * BLOCK];
                let ok = if layers[1].has_block(b) {
                    decode(blk, b) == Ok(MID_SEED)
                } else {
                    blk.iter().all(|&x| x == 0)
                };
                if !ok {
                    wrong.push(b);
                }
            }
            if !wrong.is_empty() {
                problems.push(format!(
                    "mid (alone) changed in {} block(s), the first: {:?}",
                    wrong.len(),
                    &wrong[..wrong.len().min(20)]
                ));
            }
        }
        Job::ActiveCommit | Job::ActiveCommitReady => {
            let base = read_image(&dir, &img("base"), true);
            problems.extend(
                check_blocks("base", &base, |b| {
                    let mut v = vec![BASE_SEED, initial[b]];
                    v.extend(&tr.history[b]);
                    v
                })
                .err(),
            );
        }
    }
    assert!(
        problems.is_empty(),
        "{name} ({daemon_name}) after SIGKILL at offset {off} of {len}:\n{}\ndaemon log:\n{}",
        problems.join("\n"),
        daemon.stderr()
    );
    eprintln!(
        "{name} ({daemon_name}): {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn sigkill_during_stream() {
    kill_during("kill-stream", Job::Stream);
}

#[test]
fn sigkill_during_intermediate_commit() {
    kill_during("kill-commit", Job::IntermediateCommit);
}

#[test]
fn sigkill_during_active_commit() {
    kill_during("kill-active-commit", Job::ActiveCommit);
}

#[test]
fn sigkill_during_active_commit_ready() {
    kill_during("kill-active-commit-ready", Job::ActiveCommitReady);
}

#[test]
fn sigkill_during_mirror() {
    kill_during("kill-mirror", Job::Mirror);
}

#[test]
fn sigkill_during_write_blocking_mirror_ready() {
    kill_during("kill-mirror-ready", Job::MirrorReady);
}

//! Block jobs under a real guest (QEMU 7.2, TCG): while fio writes and verifies on a
//! vhost-user-blk export of a qcow2 chain, the host, through the daemon's QMP monitor, in
//! order
//!
//! 1. takes an external snapshot: `blockdev-add` of an overlay made with `qemu-img
//!    create`, then `blockdev-snapshot` (base <- top <- s1);
//! 2. streams the whole backing chain into the overlay: `block-stream` (s1 alone), then
//!    `blockdev-del` of the two nodes the stream dropped (refused if still in use);
//! 3. builds a 3-layer chain with two `blockdev-snapshot-sync` (s1 <- s2 <- s3) and
//!    commits the intermediate layer: `block-commit` top-node=s2 base-node=s1 (s1 <- s3);
//! 4. commits the active layer: `block-commit` of s3 into s1, waits for
//!    BLOCK_JOB_READY, then `block-job-complete`: the export now writes to s1;
//! 5. reopens s1 twice with `blockdev-reopen` (detect-zeroes on, then off): its image
//!    is closed and opened again under the export while the guest writes.
//!
//! The stream and the intermediate commit run with a `speed` limit so that they last
//! while the guest writes (the test checks that it saw them in progress, and fio still
//! running when they ended); the active commit stays in its ready state, mirroring the
//! guest's writes, for a second before the pivot.
//!
//! After each step:
//! * the guest's writes are quiesced: fio finishes its current round (which writes every
//!   block of its region and reads each back with crc32c verification, after the step
//!   completed), and the guest flushes the disk (fsync of /dev/vda: a virtio-blk FLUSH);
//! * the reference: the guest copies its whole disk with O_DIRECT, through the daemon and
//!   the new graph, onto a second disk (a raw image, `ref.raw`). That is what the guest
//!   sees now;
//! * `qemu-img compare -U` of the chain on disk (opened from its top file, following the
//!   backing files named in the headers) against `ref.raw` must find them identical: the
//!   files hold what the guest sees, with the graph change written into the headers;
//! * `qemu-img info -U --backing-chain` must list the expected files, in order;
//! * the part of the disk fio does not write must still hold the initial data (known on
//!   the host): this catches a job that copies wrong data where the guest's own
//!   verification does not look (fio verifies its region);
//! * `qemu-img check -U` of every qcow2 file in the directory (the chain and the files
//!   dropped from it) must find no corruption (leaks are allowed while vubd has an image
//!   open: the clusters it reserved ahead; after it exits the image must be clean);
//! * the guest's kernel log shows no I/O error.
//!
//! Why this reference: a copy of the chain taken before the step could not be compared
//! after it, as the guest writes during the step. The guest's view after quiescing is the
//! only reference that includes those writes; fio's verification shows that view is
//! right in fio's region, and the host's initial data that it is right elsewhere.
//!
//! `qemu-img -U` reads files the daemon still has open. That is sound only once the
//! daemon has written its metadata out: the guest's flush reaches the export's node and
//! the nodes below it that it writes. qemu-storage-daemon 7.2 offers the guest a
//! write-through cache (wce=0) while it caches itself, so Linux never flushes; the test
//! switches the guest to write-back first (vubd's default). Without that, the compare
//! after the snapshot failed against qemu-storage-daemon (s1's L2 tables were still in
//! its cache), which shows the check can fail. At the end the daemon exits (SIGTERM)
//! and the final image is checked and compared once more without `-U`.
//!
//! The daemon is vubd; `VUBD_JOBS_DAEMON=qsd` runs the same test against
//! qemu-storage-daemon (the reference for the expectations).

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vubd_tests::guest::fio::{round_problems, FioRounds};
use vubd_tests::guest::{jobs_rig, Guest};
use vubd_tests::tools::{qemu_img, run_ok};
use vubd_tests::{Daemon, Qmp, Rng, TempDir, MIB};

/// The disk (virtual size of every layer).
const SIZE: u64 = 64 * MIB;
/// fio writes and verifies `[0, FIO_MIB)`; the rest keeps the initial data.
const FIO_MIB: u64 = 16;
/// Job speed limits (bytes/s): each job lasts a few seconds while the guest writes.
const STREAM_SPEED: u64 = 24 * MIB;
const COMMIT_SPEED: u64 = 8 * MIB;
/// Hang guards.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
const FIO_TIMEOUT: Duration = Duration::from_secs(120);
/// Runs of clusters allocated in the initial top layer (offset, length in MiB): one
/// inside fio's region, two outside.
const TOP_RUNS: &[(u64, u64)] = &[(4, 4), (24, 2), (50, 1)];

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
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

/// The backing chain qemu-img finds from `top`: file names, top first.
fn backing_chain(top: &Path) -> Vec<PathBuf> {
    let out = qemu_img(&["info", "-U", "--backing-chain", "--output=json", s(top)]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v.as_array()
        .unwrap_or_else(|| panic!("qemu-img info --backing-chain: not a list: {v}"))
        .iter()
        .map(|i| PathBuf::from(i["filename"].as_str().unwrap_or("?")))
        .collect()
}

/// `qemu-img check -U`: problems found (empty when clean: no corruption, no leak;
/// with `live`, leaks are no problem: vubd reserves clusters for a qcow2 image in
/// use, which count as leaked until it gives them back at its close).
fn check_problems(img: &Path, live: bool) -> Option<String> {
    let (rc, out, err) = output(Command::new("qemu-img").args([
        "check",
        "-U",
        "-f",
        "qcow2",
        "--output=json",
        s(img),
    ]));
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let leaks_ok = live && rc == 3;
    if (rc == 0 || leaks_ok)
        && n("corruptions") == 0
        && (n("leaks") == 0 || leaks_ok)
        && n("check-errors") == 0
    {
        return None;
    }
    Some(format!(
        "qemu-img check {}: exit status {rc}\n{out}{err}",
        img.display()
    ))
}

/// Random data of `len` bytes from `seed`, written to a new file.
fn random_file(path: &Path, len: usize, seed: u64) {
    let data = Rng::with_seed(seed).bytes(len);
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The initial chain `base <- top` in `dir`: base fully allocated with random data, top
/// with random data in [`TOP_RUNS`]. Returns the guest-visible content, as qemu-img reads
/// it.
fn make_chain(dir: &TempDir) -> Vec<u8> {
    let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
    let base_raw = dir.join("base.raw");
    random_file(&base_raw, SIZE as usize, 0xba5e);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&base_raw),
        s(&base),
    ]);
    std::fs::remove_file(&base_raw).expect("remove base.raw");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&top),
        &SIZE.to_string(),
    ]);
    let mut io = Command::new("qemu-io");
    io.args(["-f", "qcow2"]);
    for (i, &(off, len)) in TOP_RUNS.iter().enumerate() {
        let f = dir.join(&format!("run{i}.bin"));
        random_file(&f, (len * MIB) as usize, 0x7000 + i as u64);
        io.arg("-c")
            .arg(format!("write -q -s {} {}M {}M", s(&f), off, len));
    }
    io.arg(&top);
    run_ok(&mut io);
    for i in 0..TOP_RUNS.len() {
        std::fs::remove_file(dir.join(&format!("run{i}.bin"))).expect("remove run file");
    }
    let initial = dir.join("initial.raw");
    qemu_img(&["convert", "-O", "raw", s(&top), s(&initial)]);
    let data = std::fs::read(&initial).expect("read initial.raw");
    std::fs::remove_file(&initial).expect("remove initial.raw");
    assert_eq!(data.len() as u64, SIZE);
    data
}

/// Everything one run holds.
struct Run {
    name: String,
    daemon_name: &'static str,
    dir: TempDir,
    daemon: Daemon,
    qmp: Qmp,
    guest: Guest,
    /// The guest-visible content before the guest wrote anything.
    initial: Vec<u8>,
    /// The reference disk the guest copies its disk onto.
    ref_raw: PathBuf,
    /// fio in the current phase (phase numbers go up across steps).
    fio: FioRounds,
    phase: u64,
    /// Every QMP event seen, for failure messages.
    events: Vec<Value>,
    t0: Instant,
}

impl Run {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn note(&mut self, what: &str) {
        eprintln!(
            "{} ({}) [{:5.1} s]: {what}",
            self.name,
            self.daemon_name,
            self.t0.elapsed().as_secs_f64()
        );
        self.guest.note(what);
    }

    /// fio rounds of phase `n`: every round writes [0, FIO_MIB) and verifies it. fio's
    /// seed is `i * 7919 + 17` for round `i`; each phase starts again at `i = 1`, so the
    /// phase offsets it (a later `--randseed` overrides the first; the shell running the
    /// rounds expands `$i`): no two rounds of the run write the same data, and a block
    /// that kept an earlier round's data fails the verification.
    fn fio_phase(n: u64) -> FioRounds {
        let mut f = FioRounds::new(&format!("jobs{n}"), "/dev/vda", 1, FIO_MIB);
        f.extra = format!("--randseed=$(( (i + {}) * 7919 + 17 ))", n * 1000);
        f
    }

    fn start_fio(&mut self) {
        self.phase += 1;
        self.fio = Run::fio_phase(self.phase);
        self.fio.start(&mut self.guest);
    }

    /// Waits until fio of the current phase has finished `n` more rounds.
    fn wait_rounds(&mut self, n: usize) {
        let want = self.fio.finished_rounds(&mut self.guest) + n;
        let deadline = Instant::now() + FIO_TIMEOUT;
        while self.fio.finished_rounds(&mut self.guest) < want {
            if !self.fio.running(&mut self.guest) {
                let rounds = self.fio.rounds(&mut self.guest);
                panic!(
                    "fio stopped: {}\n{}",
                    round_problems(&rounds).join("\n"),
                    self.daemon.stderr()
                );
            }
            assert!(Instant::now() < deadline, "fio made no progress");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Events received so far, kept in `events`.
    fn poll_events(&mut self) -> Vec<Value> {
        let evs = self.qmp.take_events();
        self.events.extend(evs.iter().cloned());
        evs
    }

    fn events_text(&self) -> String {
        self.events
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Polls `query-block-jobs` until job `id` is seen in progress (running, offset <
    /// len); returns its entry. Panics if the job ends first.
    fn wait_in_progress(&mut self, id: &str) -> Value {
        let deadline = Instant::now() + JOB_TIMEOUT;
        loop {
            self.daemon.assert_running("during the job");
            let jobs = self.qmp.ok("query-block-jobs", json!({}));
            if let Some(j) = jobs
                .as_array()
                .and_then(|a| a.iter().find(|j| j["device"] == id))
            {
                let (off, len) = (j["offset"].as_u64(), j["len"].as_u64());
                if j["status"] == "running" && off < len {
                    self.note(&format!("{id} in progress: {j}"));
                    return j.clone();
                }
            }
            for ev in self.poll_events() {
                let name = ev["event"].as_str().unwrap_or("");
                if name.starts_with("BLOCK_JOB_") && ev["data"]["device"] == id {
                    panic!(
                        "job {id} was never seen in progress (raise the data or lower the \
                         speed): {ev}\nevents:\n{}",
                        self.events_text()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "job {id} not seen in progress within {JOB_TIMEOUT:?}\nevents:\n{}",
                self.events_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the job's event `until` (BLOCK_JOB_READY or BLOCK_JOB_COMPLETED);
    /// panics on another final event or an error. Returns the event.
    fn wait_job(&mut self, id: &str, until: &str) -> Value {
        let deadline = Instant::now() + JOB_TIMEOUT;
        loop {
            self.daemon.assert_running("during the job");
            for ev in self.poll_events() {
                let name = ev["event"].as_str().unwrap_or("");
                if !name.starts_with("BLOCK_JOB_") || ev["data"]["device"] != id {
                    continue;
                }
                if name == until {
                    assert!(
                        ev["data"].get("error").is_none(),
                        "job {id} failed: {ev}\nevents:\n{}\ndaemon log:\n{}",
                        self.events_text(),
                        self.daemon.stderr()
                    );
                    self.note(&format!("{until} for {id}: {}", ev["data"]));
                    return ev;
                }
                if name != "BLOCK_JOB_READY" && name != "BLOCK_JOB_PENDING" {
                    panic!(
                        "job {id}: {name} while waiting for {until}: {ev}\nevents:\n{}\n\
                         daemon log:\n{}",
                        self.events_text(),
                        self.daemon.stderr()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "job {id}: no {until} within {JOB_TIMEOUT:?}\nquery-block-jobs: {}\n\
                 events:\n{}",
                self.qmp.ok("query-block-jobs", json!({})),
                self.events_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// fio must still be running (the job ended while the guest wrote).
    fn assert_fio_running(&mut self, what: &str) {
        if !self.fio.running(&mut self.guest) {
            let rounds = self.fio.rounds(&mut self.guest);
            panic!(
                "{what}: fio is not running any more:\n{}\ndaemon log:\n{}",
                round_problems(&rounds).join("\n"),
                self.daemon.stderr()
            );
        }
    }

    /// Quiesces the guest and checks the files (see the module's documentation).
    /// `chain`: the expected backing chain, top first (file names in the directory).
    fn quiesce_and_check(&mut self, step: &str, chain: &[&str]) {
        let rounds = self
            .fio
            .quiesce_and_copy(&mut self.guest, "/dev/vdb", FIO_TIMEOUT)
            .unwrap_or_else(|e| {
                panic!(
                    "{step}: the guest saw errors:\n{e}\ndaemon log:\n{}",
                    self.daemon.stderr()
                )
            });
        let top = self.path(chain[0]);
        let want: Vec<PathBuf> = chain.iter().map(|f| self.path(f)).collect();
        assert_eq!(backing_chain(&top), want, "{step}: backing chain on disk");
        let (rc, out, err) = output(Command::new("qemu-img").args([
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            "raw",
            s(&top),
            s(&self.ref_raw),
        ]));
        assert_eq!(
            rc,
            0,
            "{step}: the chain from {} does not hold what the guest sees:\n{out}{err}\n\
             daemon log:\n{}",
            top.display(),
            self.daemon.stderr()
        );
        let seen = std::fs::read(&self.ref_raw).expect("read ref.raw");
        let from = (FIO_MIB * MIB) as usize;
        vubd_tests::assert_same_data(
            &format!("{step}: the guest's disk beyond fio's region (offset {from})"),
            &seen[from..],
            &self.initial[from..],
        );
        let mut bad = Vec::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .expect("read dir")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
            .collect();
        files.sort();
        for f in &files {
            bad.extend(check_problems(f, true));
        }
        assert!(
            bad.is_empty(),
            "{step}: qemu-img check:\n{}\ndaemon log:\n{}",
            bad.join("\n"),
            self.daemon.stderr()
        );
        self.note(&format!(
            "{step}: {rounds} fio round(s) verified; chain {chain:?} holds what the guest sees; \
             {} qcow2 file(s) check clean",
            files.len()
        ));
    }
}

#[test]
fn guest_writes_through_snapshot_stream_commits_and_reopen() {
    let name = "guest-jobs";
    let t0 = Instant::now();
    let dir = TempDir::new_in(Path::new("/dev/shm"), "vubd-gjobs");
    let initial = make_chain(&dir);
    let blockdevs = [
        jobs_rig::file_node(&dir, "base-file", "base.qcow2"),
        "driver=qcow2,node-name=base,file=base-file".to_string(),
        jobs_rig::file_node(&dir, "top-file", "top.qcow2"),
        "driver=qcow2,node-name=top,file=top-file,backing=base".to_string(),
    ];
    let rig = jobs_rig::start(name, &dir, SIZE, &blockdevs, "top");
    let daemon_name = rig.daemon_name;
    let mut r = Run {
        name: name.to_string(),
        daemon_name,
        dir,
        daemon: rig.daemon,
        qmp: rig.qmp,
        guest: rig.guest,
        initial,
        ref_raw: rig.ref_raw,
        fio: Run::fio_phase(0),
        phase: 0,
        events: Vec::new(),
        t0,
    };
    r.note("booted");

    // 1. External snapshot: base <- top <- s1.
    r.start_fio();
    r.wait_rounds(1);
    let s1 = r.path("s1.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        s(&r.path("top.qcow2")),
        "-F",
        "qcow2",
        s(&s1),
        &SIZE.to_string(),
    ]);
    r.qmp.ok(
        "blockdev-add",
        json!({
            "driver": "qcow2", "node-name": "s1", "backing": null,
            "file": {"driver": "file", "node-name": "s1-file", "filename": s(&s1)}
        }),
    );
    r.note("blockdev-snapshot node=top overlay=s1");
    r.qmp
        .ok("blockdev-snapshot", json!({"node": "top", "overlay": "s1"}));
    r.wait_rounds(1);
    r.assert_fio_running("after the snapshot");
    r.quiesce_and_check("snapshot", &["s1.qcow2", "top.qcow2", "base.qcow2"]);

    // 2. Stream everything below s1 into it: s1 alone.
    r.start_fio();
    r.note("block-stream device=s1");
    r.qmp.ok(
        "block-stream",
        json!({"job-id": "stream0", "device": "s1", "speed": STREAM_SPEED}),
    );
    r.wait_in_progress("stream0");
    r.wait_job("stream0", "BLOCK_JOB_COMPLETED");
    r.assert_fio_running("when the stream completed");
    r.quiesce_and_check("stream", &["s1.qcow2"]);
    // The stream dropped top and base from the graph: nothing uses them any more.
    for node in ["top", "top-file", "base", "base-file"] {
        r.qmp.ok("blockdev-del", json!({ "node-name": node }));
    }

    // 3. s1 <- s2 <- s3, then commit s2 into s1: s1 <- s3.
    r.start_fio();
    for (node, over) in [("s1", "s2"), ("s2", "s3")] {
        r.note(&format!(
            "blockdev-snapshot-sync node-name={node} -> {over}"
        ));
        r.qmp.ok(
            "blockdev-snapshot-sync",
            json!({
                "node-name": node,
                "snapshot-file": s(&r.path(&format!("{over}.qcow2"))),
                "snapshot-node-name": over,
                "format": "qcow2"
            }),
        );
        r.wait_rounds(1);
    }
    r.note("block-commit device=s3 top-node=s2 base-node=s1");
    r.qmp.ok(
        "block-commit",
        json!({
            "job-id": "commit0", "device": "s3", "top-node": "s2", "base-node": "s1",
            "speed": COMMIT_SPEED
        }),
    );
    r.wait_in_progress("commit0");
    r.wait_job("commit0", "BLOCK_JOB_COMPLETED");
    r.assert_fio_running("when the intermediate commit completed");
    r.quiesce_and_check("intermediate commit", &["s3.qcow2", "s1.qcow2"]);

    // 4. Active commit of s3 into s1, with the pivot: the export writes to s1.
    r.start_fio();
    r.wait_rounds(1);
    r.note("block-commit device=s3 base-node=s1 (active)");
    // No speed limit: the guest writes about as fast as a limit that keeps the bulk
    // phase visible, and the mirror must converge. What matters here is the ready
    // phase, where every guest write is mirrored to s1 (fio runs through it).
    r.qmp.ok(
        "block-commit",
        json!({"job-id": "commit1", "device": "s3", "base-node": "s1"}),
    );
    r.wait_job("commit1", "BLOCK_JOB_READY");
    // Guest writes in the ready state are mirrored to s1.
    std::thread::sleep(Duration::from_secs(1));
    r.assert_fio_running("when the active commit was ready");
    r.qmp.ok("block-job-complete", json!({"device": "commit1"}));
    r.wait_job("commit1", "BLOCK_JOB_COMPLETED");
    r.assert_fio_running("when the active commit completed");
    r.quiesce_and_check("active commit", &["s1.qcow2"]);

    // 5. blockdev-reopen of the exported node while the guest writes: its image is
    // closed and opened again under the export (detect-zeroes on, then back).
    r.start_fio();
    r.wait_rounds(1);
    for dz in ["on", "off"] {
        r.note(&format!("blockdev-reopen s1 detect-zeroes={dz}"));
        r.qmp.ok(
            "blockdev-reopen",
            json!({"options": [{
                "driver": "qcow2", "node-name": "s1", "file": "s1-file", "detect-zeroes": dz
            }]}),
        );
        r.wait_rounds(1);
        r.assert_fio_running(&format!("after the reopen with detect-zeroes={dz}"));
    }
    r.quiesce_and_check("reopen", &["s1.qcow2"]);

    // The guest now writes to s1 alone; one more verified round there, then shut down.
    r.start_fio();
    r.wait_rounds(1);
    r.quiesce_and_check("after the pivot", &["s1.qcow2"]);
    let events = r.events_text();
    let Run {
        guest,
        mut daemon,
        dir,
        ref_raw,
        ..
    } = r;
    let st = guest.shutdown();
    assert!(st.success(), "QEMU exit status after poweroff: {st}");
    let st = daemon.terminate();
    assert!(
        st.success(),
        "{daemon_name} exit status after SIGTERM: {st}"
    );
    // Closed by the daemon: no -U needed now.
    let s1 = dir.join("s1.qcow2");
    if let Some(p) = check_problems(&s1, false) {
        panic!("after the daemon exited: {p}");
    }
    let (rc, out, err) = output(Command::new("qemu-img").args([
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        s(&s1),
        s(&ref_raw),
    ]));
    assert_eq!(rc, 0, "after the daemon exited: {out}{err}");
    eprintln!(
        "{name} ({daemon_name}): {:.1} s, {} QMP events",
        t0.elapsed().as_secs_f64(),
        events.lines().count()
    );
}

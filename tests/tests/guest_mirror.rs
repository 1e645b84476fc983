//! Mirror under a real guest (QEMU 7.2, TCG): while fio writes and verifies on a
//! vhost-user-blk export of a qcow2 image, the host mirrors the disk to a new qcow2
//! image with `drive-mirror` (`sync=full`), waits for BLOCK_JOB_READY, lets the guest
//! write through the ready state for a second, and pivots with `block-job-complete`:
//! the export then writes to the new image. It does so twice in one boot, once in
//! each copy mode:
//!
//! 1. `disk.qcow2` -> `m1.qcow2`, `copy-mode=background`;
//! 2. `m1.qcow2` -> `m2.qcow2`, `copy-mode=write-blocking` (every guest write reaches
//!    both images before it completes).
//!
//! After each pivot the guest's writes are quiesced (fio ends its round: it writes
//! every block of its region and reads each back with crc32c verification; the guest
//! flushes the disk), the guest copies its whole disk onto a second exported disk
//! (`ref.raw`, the reference: what the guest sees), and `qemu-img compare -U` of the new
//! image against `ref.raw` must find them identical; the part fio does not write must
//! still hold the initial data; `qemu-img check -U` must find no corruption; the guest's
//! kernel log must show no I/O error. At the end the daemon exits and the last image
//! is compared and checked again without `-U`.
//!
//! `VUBD_JOBS_DAEMON=qsd` runs the same test against qemu-storage-daemon.

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use vubd_tests::guest::fio::{round_problems, FioRounds};
use vubd_tests::guest::{jobs_rig, Guest};
use vubd_tests::tools::qemu_img;
use vubd_tests::{Daemon, Qmp, Rng, TempDir, MIB};

/// The disk.
const SIZE: u64 = 32 * MIB;
/// fio writes and verifies `[0, FIO_MIB)`; the rest keeps the initial data.
const FIO_MIB: u64 = 8;
/// Hang guards.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
const FIO_TIMEOUT: Duration = Duration::from_secs(90);

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
}

/// `qemu-img` with `args`: (exit code, stdout and stderr).
fn qemu_img_status(args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

struct Run {
    daemon_name: &'static str,
    dir: TempDir,
    daemon: Daemon,
    qmp: Qmp,
    guest: Guest,
    initial: Vec<u8>,
    fio: FioRounds,
    t0: Instant,
}

impl Run {
    fn note(&mut self, what: &str) {
        eprintln!(
            "guest-mirror ({}) [{:5.1} s]: {what}",
            self.daemon_name,
            self.t0.elapsed().as_secs_f64()
        );
        self.guest.note(what);
    }

    /// fio rounds of phase `n` (seeds differ from phase to phase).
    fn start_fio(&mut self, n: u64) {
        let mut f = FioRounds::new(&format!("mirror{n}"), "/dev/vda", 1, FIO_MIB);
        f.extra = format!("--randseed=$(( (i + {}) * 7919 + 17 ))", n * 1000);
        f.start(&mut self.guest);
        self.fio = f;
    }

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

    /// Waits for the job's event `name`; panics on BLOCK_JOB_CANCELLED, an error or
    /// a timeout.
    fn wait_job(&mut self, id: &str, name: &str) -> Value {
        let deadline = Instant::now() + JOB_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            self.daemon.assert_running("during the mirror");
            for ev in self.qmp.take_events() {
                let e = ev["event"].as_str().unwrap_or("").to_string();
                if e == name && ev["data"]["device"] == id {
                    assert!(
                        ev["data"].get("error").is_none(),
                        "mirror {id} failed: {ev}\n{}",
                        self.daemon.stderr()
                    );
                    self.note(&format!("{name}: {}", ev["data"]));
                    return ev;
                }
                assert!(
                    e != "BLOCK_JOB_CANCELLED" && e != "BLOCK_JOB_ERROR",
                    "mirror {id}: {ev}\nevents: {seen:?}\n{}",
                    self.daemon.stderr()
                );
                seen.push(ev);
            }
            assert!(
                Instant::now() < deadline,
                "mirror {id}: no {name} within {JOB_TIMEOUT:?}: {}\nevents: {seen:?}",
                self.qmp.ok("query-block-jobs", json!({}))
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Mirrors the exported disk to the new image `to` in `mode` and pivots, while
    /// fio runs.
    fn mirror(&mut self, id: &str, to: &str, mode: &str) {
        let target = self.dir.join(&format!("{to}.qcow2"));
        self.note(&format!("drive-mirror -> {to} copy-mode={mode}"));
        let device = self.export_node();
        self.qmp.ok(
            "drive-mirror",
            json!({
                "job-id": id, "device": device, "target": s(&target),
                "format": "qcow2", "node-name": to, "sync": "full", "copy-mode": mode,
            }),
        );
        let ready = self.wait_job(id, "BLOCK_JOB_READY");
        // The guest writes on in the ready state: its writes are mirrored.
        std::thread::sleep(Duration::from_secs(1));
        self.assert_fio_running("in the ready state");
        self.qmp.ok("block-job-complete", json!({ "device": id }));
        let done = self.wait_job(id, "BLOCK_JOB_COMPLETED");
        assert_eq!(done["data"]["offset"], done["data"]["len"], "{done}");
        if mode == "write-blocking" {
            // Every guest write reached the target as it was made: nothing was left
            // for the job to copy again.
            assert_eq!(done["data"]["len"], ready["data"]["len"], "{ready} {done}");
        }
        self.assert_fio_running("after the pivot");
        assert_eq!(self.export_node(), to, "the export after the pivot");
    }

    fn export_node(&mut self) -> String {
        let e = self.qmp.ok("query-block-exports", json!({}));
        e.as_array()
            .and_then(|a| a.iter().find(|x| x["id"] == "disk"))
            .and_then(|x| x["node-name"].as_str())
            .unwrap_or_else(|| panic!("no export 'disk' in {e}"))
            .to_string()
    }

    /// Quiesces the guest and compares `img` with what it sees.
    fn quiesce_and_check(&mut self, step: &str, img: &str) {
        let rounds = self
            .fio
            .quiesce_and_copy(&mut self.guest, "/dev/vdb", FIO_TIMEOUT)
            .unwrap_or_else(|e| {
                panic!(
                    "{step}: the guest saw errors:\n{e}\ndaemon log:\n{}",
                    self.daemon.stderr()
                )
            });
        let (img, ref_raw) = (self.dir.join(img), self.dir.join("ref.raw"));
        let (rc, out) = qemu_img_status(&[
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            "raw",
            s(&img),
            s(&ref_raw),
        ]);
        assert_eq!(
            rc,
            0,
            "{step}: {} does not hold what the guest sees:\n{out}\ndaemon log:\n{}",
            img.display(),
            self.daemon.stderr()
        );
        let seen = std::fs::read(&ref_raw).expect("read ref.raw");
        let from = (FIO_MIB * MIB) as usize;
        vubd_tests::assert_same_data(
            &format!("{step}: the guest's disk beyond fio's region"),
            &seen[from..],
            &self.initial[from..],
        );
        let (rc, out) = qemu_img_status(&["check", "-U", "-f", "qcow2", s(&img)]);
        // Exit status 3: leaked clusters only (vubd reserves clusters ahead while the
        // image is open).
        assert!(rc == 0 || rc == 3, "{step}: qemu-img check:\n{out}");
        self.note(&format!(
            "{step}: {rounds} fio round(s) verified, {} holds what the guest sees",
            img.display()
        ));
    }
}

#[test]
fn guest_writes_through_mirror_pivots_in_both_copy_modes() {
    let t0 = Instant::now();
    let dir = TempDir::new_in(Path::new("/dev/shm"), "vubd-gmirror");
    let (disk, raw) = (dir.join("disk.qcow2"), dir.join("initial.raw"));
    let initial = Rng::with_seed(0x5eed).bytes(SIZE as usize);
    std::fs::write(&raw, &initial).expect("write initial.raw");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&disk)]);
    std::fs::remove_file(&raw).expect("remove initial.raw");
    let blockdevs = [
        jobs_rig::file_node(&dir, "disk-file", "disk.qcow2"),
        "driver=qcow2,node-name=disk,file=disk-file".to_string(),
    ];
    let rig = jobs_rig::start("guest-mirror", &dir, SIZE, &blockdevs, "disk");
    let daemon_name = rig.daemon_name;
    let mut r = Run {
        daemon_name,
        dir,
        daemon: rig.daemon,
        qmp: rig.qmp,
        guest: rig.guest,
        initial,
        fio: FioRounds::new("none", "/dev/vda", 1, FIO_MIB),
        t0,
    };
    r.note("booted");

    for (n, (id, to, mode)) in [("m1", "m1", "background"), ("m2", "m2", "write-blocking")]
        .into_iter()
        .enumerate()
    {
        r.start_fio(n as u64 + 1);
        r.mirror(id, to, mode);
        r.quiesce_and_check(&format!("mirror {mode}"), &format!("{to}.qcow2"));
    }

    let Run {
        guest,
        mut daemon,
        dir,
        t0,
        ..
    } = r;
    let st = guest.shutdown();
    assert!(st.success(), "QEMU exit status after poweroff: {st}");
    let st = daemon.terminate();
    assert!(
        st.success(),
        "{daemon_name} exit status after SIGTERM: {st}"
    );
    let m2 = dir.join("m2.qcow2");
    let (rc, out) = qemu_img_status(&["check", "-f", "qcow2", s(&m2)]);
    assert_eq!(rc, 0, "after the daemon exited: {out}");
    let (rc, out) = qemu_img_status(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        s(&m2),
        s(&dir.join("ref.raw")),
    ]);
    assert_eq!(rc, 0, "after the daemon exited: {out}");
    eprintln!(
        "guest-mirror ({daemon_name}): {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

//! Live migration of a real guest (QEMU 7.2, TCG) between two QEMU processes on this
//! host, its disk served by one daemon through two exports of the same node: the source
//! QEMU on one socket, the destination (`-incoming unix:<path>`) on the other.
//!
//! * Under load: fio writes and verifies while the VM migrates; the destination's guest
//!   finishes the round with 0 errors.
//! * Pages the backend writes: the guest reads known data from the disk into its page
//!   cache while RAM passes run (only the device writes those pages), and checks it on
//!   the destination from the cache. Without dirty-page logging by the backend those
//!   pages keep what the first pass copied. The same test through a relay that keeps
//!   the log from the backend (QEMU still believes it is on) must find wrong data, or a
//!   destination guest broken by ring pages that were not sent again: that shows the
//!   test can fail.
//!
//! The daemon is vubd; `VUBD_MIGRATION_DAEMON=qsd` runs the same tests against
//! qemu-storage-daemon (the reference: it logs through libvhost-user).

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vubd_tests::guest::fio::{disk_errors_in_dmesg, round_problems, FioRounds};
use vubd_tests::guest::relay::{Relay, Rules};
use vubd_tests::guest::{Guest, GuestOpts, CMD_TIMEOUT};
use vubd_tests::{qsd_bin, vubd_bin, Daemon, DaemonArgs, Rng, TempDir, TempImage, MIB};

/// Time for a migration to complete once it may.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
const FIO_TIMEOUT: Duration = Duration::from_secs(300);

/// The daemon under test and its binary.
fn daemon_bin() -> (&'static str, PathBuf) {
    match std::env::var("VUBD_MIGRATION_DAEMON").as_deref() {
        Ok("qsd") => ("qemu-storage-daemon", qsd_bin()),
        Ok("vubd") | Err(_) => ("vubd", vubd_bin()),
        Ok(other) => panic!("VUBD_MIGRATION_DAEMON={other}: expected vubd or qsd"),
    }
}

/// One daemon with two writable exports of the node of `img` (a raw image): `src` for
/// the source QEMU, `dst` for the destination.
fn start_daemon(img: &Path, src: &Path, dst: &Path, queues: usize) -> Daemon {
    let (_, bin) = daemon_bin();
    let args = DaemonArgs::new()
        .iothread("io-src")
        .iothread("io-dst")
        .file_raw_path("disk0", img, "", "")
        .export(&format!(
            "type=vhost-user-blk,id=src,node-name=disk0,addr.type=unix,addr.path={},\
             writable=on,num-queues={queues},iothread=io-src",
            src.display()
        ))
        .export(&format!(
            "type=vhost-user-blk,id=dst,node-name=disk0,addr.type=unix,addr.path={},\
             writable=on,num-queues={queues},iothread=io-dst",
            dst.display()
        ))
        .build();
    Daemon::start_bin(&bin, &args)
}

/// RAM migration statistics worth printing.
fn ram_summary(info: &Value) -> String {
    let ram = &info["ram"];
    format!(
        "{} ms total, {} ms downtime, {} MiB transferred, {} dirty syncs, {} pages dirtied \
         again",
        info["total-time"],
        info["downtime"],
        ram["transferred"].as_u64().unwrap_or(0) / MIB,
        ram["dirty-sync-count"],
        ram["dirty-pages-rate"],
    )
}

/// fio writes and verifies on 2 queues while the VM migrates; the destination's guest
/// finishes the round it was in, and one more, with 0 errors.
#[test]
fn migration_under_fio() {
    let (daemon_name, _) = daemon_bin();
    let name = "migrate-fio";
    let t_start = Instant::now();
    let mut rng = Rng::new(name);
    let dir = TempDir::new("vubd-mig");
    let img = TempImage::new(256 * MIB);
    let (src, dst) = (dir.join("src.sock"), dir.join("dst.sock"));
    let mut daemon = start_daemon(img.path(), &src, &dst, 2);
    let mut g = Guest::boot(
        &GuestOpts::new(name)
            .cpus(2)
            .single_thread_tcg()
            .mem_mib(384)
            .console_socket()
            .disk(&src, 2),
    );
    let fio = FioRounds::new("mig", "/dev/vda", 2, 8);
    fio.start(&mut g);
    std::thread::sleep(Duration::from_millis(rng.range(1000, 4000)));
    assert!(
        fio.running(&mut g),
        "fio ended early: {:?}",
        fio.rounds(&mut g)
    );
    g.start_migration(std::slice::from_ref(&dst), Value::Null);
    let info = g.finish_migration(MIGRATION_TIMEOUT);
    eprintln!("{name} ({daemon_name}): migrated: {}", ram_summary(&info));
    // The destination runs fio on; one more round starts there.
    let done = fio.finished_rounds(&mut g);
    let deadline = Instant::now() + FIO_TIMEOUT;
    while fio.finished_rounds(&mut g) < done + 1 && fio.running(&mut g) {
        assert!(
            Instant::now() < deadline,
            "fio made no progress after the migration"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let rounds = fio
        .stop(&mut g, FIO_TIMEOUT)
        .unwrap_or_else(|e| panic!("after the migration: {e}"));
    let mut problems = round_problems(&rounds);
    problems.extend(disk_errors_in_dmesg(&g.dmesg()));
    assert!(
        problems.is_empty(),
        "{name} ({daemon_name}): after the migration:\n{}\ndaemon log:\n{}",
        problems.join("\n"),
        daemon.stderr()
    );
    eprintln!(
        "{name} ({daemon_name}): {} fio rounds of 16 MiB verified, {done} finished by the \
         end of the migration",
        rounds.len()
    );
    let st = g.shutdown();
    assert!(st.success(), "QEMU exit status after poweroff: {st}");
    daemon.assert_running("after the migration");
    eprintln!("{name}: {:.1} s", t_start.elapsed().as_secs_f64());
}

/// md5 of the first `len` bytes of a file, with the host's md5sum.
fn host_md5(path: &Path, len: u64) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {len} '{}' | md5sum",
            path.display().to_string().replace('\'', "'\\''")
        ))
        .output()
        .expect("run md5sum");
    assert!(out.status.success(), "md5sum failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// What [`read_during_ram_passes`] found on the destination.
struct ReadCheck {
    expected: String,
    /// md5 of the disk read through the destination's page cache (filled by the
    /// device on the source, during the migration), or why the destination's guest
    /// could not answer (only when `rules` kept the log from the backend; see
    /// [`read_during_ram_passes`]).
    cached: Result<String, String>,
    /// md5 read with O_DIRECT on the destination (from the disk), when the guest
    /// answered.
    direct: Option<String>,
}

/// The destination's reads of the disk: through its page cache, and with O_DIRECT.
const CACHED_MD5: &str = "md5sum /dev/vda";
const DIRECT_MD5: &str = "dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | md5sum";

/// Signs on the console that the guest's kernel broke.
const KERNEL_FAULTS: [&str; 5] = [
    "BUG:",
    "Oops",
    "general protection fault",
    "Kernel panic",
    "list_del corruption",
];

/// Known data (pseudo-random, 64 MiB) on the disk; the guest drops its caches, the
/// migration starts (throttled, and kept from converging by a guest process that keeps
/// dirtying RAM), and once the first RAM pass is over the guest reads the whole disk
/// through its page cache: those pages are written by the device only. Then the
/// migration may converge. On the destination the guest reads the disk again, from the
/// cache, and with O_DIRECT.
fn read_during_ram_passes(name: &str, rules: Option<Rules>) -> ReadCheck {
    let (daemon_name, _) = daemon_bin();
    let t_start = Instant::now();
    let mut rng = Rng::new(name);
    let data_len = 64 * MIB;
    let (img, _) = TempImage::new_random(data_len, &mut rng);
    let expected = host_md5(img.path(), data_len);
    let dir = TempDir::new("vubd-mig");
    let (src, dst) = (dir.join("src.sock"), dir.join("dst.sock"));
    let daemon = start_daemon(img.path(), &src, &dst, 1);
    // Both QEMUs go through relays when a rule is given.
    let relays = rules.map(|r| {
        let (rs, rd) = (dir.join("src-relay.sock"), dir.join("dst-relay.sock"));
        (Relay::start(&rs, &src, r), Relay::start(&rd, &dst, r))
    });
    let (qemu_src, qemu_dst) = match &relays {
        Some((a, b)) => (a.path().to_path_buf(), b.path().to_path_buf()),
        None => (src.clone(), dst.clone()),
    };
    let mut opts = GuestOpts::new(name)
        .cpus(1)
        .mem_mib(384)
        .console_socket()
        .disk(&qemu_src, 1);
    // Debian's kernel zeroes every page it allocates (init_on_alloc): a CPU write just
    // before the device's, which would make QEMU send the page again anyway.
    opts.append = "init_on_alloc=0".into();
    let mut g = Guest::boot(&opts);
    // Linux drops a block device's page cache when its last user closes it: a process
    // keeps /dev/vda open, so that what `cat` reads stays cached for the check.
    g.check(
        "sleep 100000 </dev/vda >/dev/null 2>&1 & \
         blockdev --flushbufs /dev/vda && echo 3 >/proc/sys/vm/drop_caches",
        CMD_TIMEOUT,
    );
    // A RAM dirtier keeps the migration from converging until the test lets it: it
    // rewrites 24 MiB of tmpfs pages over and over (with data that is not zero, which
    // QEMU would send almost for free).
    g.check(
        "yes vubd-dirty-page | head -c 25165824 >/tmp/src && \
         ( while [ ! -e /tmp/stop-dirty ]; do \
         dd if=/tmp/src of=/tmp/dirty bs=1M conv=notrunc 2>/dev/null; done ) \
         </dev/null >/dev/null 2>&1 &",
        CMD_TIMEOUT,
    );
    g.start_migration(
        std::slice::from_ref(&qemu_dst),
        json!({"max-bandwidth": 64 * MIB, "downtime-limit": 5}),
    );
    // The first pass is over once the dirty bitmap has been synchronised twice.
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = g.migration_info();
        assert!(
            info["status"] == "setup" || info["status"] == "active",
            "the migration should still run: {info}"
        );
        if info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first RAM pass did not end: {info}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let syncs_before = g.migration_info()["ram"]["dirty-sync-count"]
        .as_u64()
        .unwrap_or(0);
    g.note("reading the disk into the page cache while RAM passes run");
    g.check("cat /dev/vda >/dev/null", CMD_TIMEOUT);
    // Let at least one more pass see the log (the final pass would too).
    loop {
        let info = g.migration_info();
        assert_eq!(
            info["status"], "active",
            "the migration ended before the test let it: {info}"
        );
        if info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) > syncs_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no RAM pass after the reads: {info}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    g.check("touch /tmp/stop-dirty", CMD_TIMEOUT);
    g.set_migration_parameters(json!({"max-bandwidth": 4096 * MIB, "downtime-limit": 2000}));
    let info = g.finish_migration(MIGRATION_TIMEOUT);
    eprintln!(
        "{name} ({daemon_name}{}): migrated: {}",
        if rules.is_some() {
            ", through relays"
        } else {
            ""
        },
        ram_summary(&info)
    );
    if let Some((a, _)) = &relays {
        let withheld = a.counters.log_messages_withheld.load(Ordering::Relaxed);
        let cleared = a.counters.log_all_cleared.load(Ordering::Relaxed);
        assert!(
            withheld > 0 && cleared > 0,
            "the relay saw no logging to withhold (SET_LOG_BASE/SET_LOG_FD {withheld}, \
             SET_FEATURES with LOG_ALL {cleared})"
        );
    }
    let first = |s: &str| s.split_whitespace().next().unwrap_or_default().to_string();
    let check = if rules.is_some_and(|r| r.withhold_log) {
        // Without the log, more than page-cache data is stale on the destination: the
        // used ring and the requests' status bytes are pages only the device wrote
        // too. A used index older than the one the guest's driver has reached makes
        // it complete requests it already completed, and the guest's kernel breaks
        // (seen here: slab and list corruption, a segfaulting shell). That is lost
        // pages as much as wrong data in the cache is.
        let answer = |g: &mut Guest, cmd: &str| -> Result<String, String> {
            match g.try_run(cmd, CMD_TIMEOUT) {
                Ok((0, out)) => Ok(out),
                Ok((rc, out)) => Err(format!("{cmd:?} exited with {rc}: {out}")),
                Err(e) => Err(format!("{cmd:?}: {e}")),
            }
        };
        let cached = answer(&mut g, CACHED_MD5).map(|s| first(&s));
        let direct = match &cached {
            Ok(_) => answer(&mut g, DIRECT_MD5).ok().map(|s| first(&s)),
            Err(_) => None,
        };
        let console = std::fs::read_to_string(g.transcript()).unwrap_or_default();
        let fault = KERNEL_FAULTS.iter().find(|f| console.contains(*f));
        let cached = match (cached, fault) {
            (Ok(md5), None) => Ok(md5),
            (Ok(_), Some(f)) => Err(format!("the guest's kernel reported {f:?}")),
            (Err(e), f) => Err(format!(
                "{e} (kernel fault on the console: {})",
                f.unwrap_or(&"none")
            )),
        };
        ReadCheck {
            expected,
            cached,
            direct,
        }
    } else {
        let cached = g.check(CACHED_MD5, CMD_TIMEOUT);
        let direct = g.check(DIRECT_MD5, CMD_TIMEOUT);
        ReadCheck {
            expected,
            cached: Ok(first(&cached)),
            direct: Some(first(&direct)),
        }
    };
    if check.cached.is_err() {
        // The guest may not answer a shutdown: its QEMU goes with `g`.
        drop(g);
    } else {
        g.shutdown();
    }
    drop(daemon);
    eprintln!("{name}: {:.1} s", t_start.elapsed().as_secs_f64());
    check
}

/// Runs [`read_during_ram_passes`], once more if the destination's guest died.
///
/// In about one run in four, with qemu-storage-daemon (2 of 6 here) as with vubd (5 of
/// 20), the destination's guest died soon after this migration when it had two vCPUs: a
/// kernel oops in the slab allocator or in virtblk_done, or a request that never
/// completed. QEMU 7.2 under multi-threaded TCG loses guest pages here now and then,
/// whichever backend logs; with one vCPU it is rare, but the source QEMU was still seen
/// to die once mid-migration. Such a run is tried once more; wrong data in the page
/// cache is never retried.
fn read_during_ram_passes_retried(name: &str, rules: Option<Rules>) -> ReadCheck {
    let (daemon_name, _) = daemon_bin();
    match std::panic::catch_unwind(|| read_during_ram_passes(name, rules)) {
        Ok(r) => r,
        Err(e) => {
            let why = e
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| e.downcast_ref::<&str>().copied())
                .unwrap_or("?")
                .to_string();
            let qemu_died = [
                "QEMU exited",
                "no answer from the guest",
                "Input/output error",
                "cannot write to the guest's serial console",
                "Broken pipe",
                "bad end marker",
            ]
            .iter()
            .any(|m| why.contains(m));
            if !qemu_died {
                std::panic::resume_unwind(e);
            }
            eprintln!(
                "{daemon_name}: QEMU or its guest died during or after the migration ({}); \
                 once more",
                why.lines().next().unwrap_or_default()
            );
            read_during_ram_passes(&format!("{name}-2"), rules)
        }
    }
}

/// Pages the device wrote while RAM passes ran reach the destination: the backend logs
/// them (VHOST_F_LOG_ALL with LOG_SHMFD) and QEMU sends them again.
#[test]
fn migration_carries_pages_the_backend_wrote() {
    let (daemon_name, _) = daemon_bin();
    let r = read_during_ram_passes_retried("migrate-read", None);
    assert_eq!(
        r.direct.as_deref(),
        Some(r.expected.as_str()),
        "{daemon_name}: the disk itself does not hold the data written by the host"
    );
    assert_eq!(
        r.cached.as_deref(),
        Ok(r.expected.as_str()),
        "{daemon_name}: the destination's page cache holds other data than the disk: pages \
         the device wrote during the migration were not sent again (dirty logging)"
    );
}

/// The same test with the dirty log kept from the backend by a relay (QEMU still
/// believes logging is on, so it migrates): the destination's page cache is wrong.
/// This shows that the test above can fail.
#[test]
fn migration_without_dirty_logging_loses_pages_the_backend_wrote() {
    let (daemon_name, _) = daemon_bin();
    let r = read_during_ram_passes_retried(
        "migrate-read-nolog",
        Some(Rules {
            withhold_log: true,
            ..Rules::default()
        }),
    );
    match &r.cached {
        Ok(cached) => {
            assert_eq!(
                r.direct.as_deref(),
                Some(r.expected.as_str()),
                "{daemon_name}: the disk itself does not hold the data written by the host"
            );
            assert_ne!(
                *cached, r.expected,
                "{daemon_name} without dirty logging: the destination's page cache was right \
                 anyway, so the read test would not notice missing logging"
            );
            eprintln!(
                "without dirty logging the destination read {cached} instead of {} from its \
                 page cache",
                r.expected
            );
        }
        // The read test fails on this too (a guest that dies twice is not retried).
        Err(why) => eprintln!(
            "without dirty logging the destination's guest broke after the migration: {why}"
        ),
    }
}

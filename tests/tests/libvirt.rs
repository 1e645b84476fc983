//! libvirt as a real client: Debian's libvirtd (QEMU driver, TCG) boots the test guest
//! from a domain whose disk is `<disk type='vhostuser'>` on a vubd export, the guest
//! runs fio with verification on it, vubd's `query-blockstats` shows that I/O, the guest
//! powers off and libvirt records a clean shutdown. The daemon is a private one
//! (tests/src/libvirt.rs); the domain XML is the one docs/libvirt.md shows.
//!
//! libvirt not installed is a failure, not a skip: scripts/setup.sh installs it.

use serde_json::json;
use std::time::{Duration, Instant};
use vubd_tests::guest::fio::{disk_errors_in_dmesg, round_problems, FioRounds};
use vubd_tests::guest::{Guest, GuestDisk, GuestOpts, CMD_TIMEOUT};
use vubd_tests::libvirt::Libvirtd;
use vubd_tests::{assert_same_data, Daemon, DaemonArgs, Qmp, TempDir, TempImage, MIB};

/// fio under TCG: a few seconds here, much more on a slow CI machine.
const FIO_TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn libvirt_domain_with_a_vhostuser_disk_runs_fio_on_vubd() {
    let t0 = Instant::now();
    let libvirt = Libvirtd::start();
    let virsh = libvirt.virsh().clone();
    eprintln!(
        "libvirtd {} up in {:.1} s: {}",
        libvirt.pid(),
        t0.elapsed().as_secs_f64(),
        virsh.uri()
    );

    let dir = TempDir::new("vubd-libvirt-test");
    let (sock, hp_sock, qmp_sock) = (
        dir.join("vubd.sock"),
        dir.join("hotplug.sock"),
        dir.join("qmp.sock"),
    );
    let img = TempImage::new(64 * MIB);
    let hp_img = TempImage::new(32 * MIB);
    let args = DaemonArgs::new()
        .iothread("io0")
        .file_raw("disk", &img, "", "")
        .vhost_user_blk("disk", &sock, ",iothread=io0,writable=on,num-queues=2")
        .file_raw("hp", &hp_img, "", "")
        .vhost_user_blk("hp", &hp_sock, ",iothread=io0,writable=on")
        .monitor(&qmp_sock)
        .build();
    let mut daemon = Daemon::start(&args);

    // Two vCPUs, so that the guest uses both queues; the chardev reconnects, so that
    // the disk survives a vubd restart.
    let opts = GuestOpts::new("libvirt")
        .cpus(2)
        .reconnecting_disk(&sock, 2);
    let mut g = Guest::boot_external(&opts, |s| libvirt.start_domain(s));
    let domains = libvirt.domains();
    assert_eq!(domains.len(), 1, "libvirt's domains: {domains:?}");
    let name = domains[0].clone();
    assert_eq!(
        virsh.check(&["domstate", &name]).trim(),
        "running",
        "domain state"
    );
    let xml = virsh.check(&["dumpxml", &name]);
    assert!(
        xml.contains("<domain type='qemu'") && xml.contains("<disk type='vhostuser'"),
        "libvirt's view of the domain:\n{xml}"
    );

    // The disk as the guest sees it: 64 MiB, two queues.
    assert_eq!(
        g.read_file("/sys/block/vda/size"),
        (64 * MIB / 512).to_string()
    );
    let mq = g.check("ls /sys/block/vda/mq", CMD_TIMEOUT);
    assert_eq!(mq.split_whitespace().count(), 2, "vda's queues: {mq:?}");

    // fio, and vubd's figures for it.
    fio_round(&mut g, &qmp_sock, "first vubd");

    // vubd dies and is started again: QEMU reconnects by itself (libvirt's
    // <reconnect>), the guest's I/O goes on, verified.
    daemon.signal(libc::SIGKILL);
    assert!(
        daemon.wait_timeout(Duration::from_secs(10)).is_some(),
        "vubd did not die of SIGKILL"
    );
    drop(daemon);
    let t_restart = Instant::now();
    let mut daemon = Daemon::start(&args);
    fio_round(&mut g, &qmp_sock, "restarted vubd");
    eprintln!(
        "vubd restarted; a verified fio round {:.1} s later",
        t_restart.elapsed().as_secs_f64()
    );

    // A second vhost-user disk, hot-plugged and unplugged with virsh.
    let hp = GuestDisk {
        socket: hp_sock.clone(),
        num_queues: 1,
        extra: String::new(),
        reconnect: None,
    };
    libvirt.attach_disk(&name, 1, &hp);
    wait_for(&mut g, "[ -e /sys/block/vdb ]", "vdb to appear");
    assert_eq!(
        g.read_file("/sys/block/vdb/size"),
        (32 * MIB / 512).to_string()
    );
    g.check(
        "yes vubd-hotplug | head -c 1048576 >/tmp/hp && \
         dd if=/tmp/hp of=/dev/vdb bs=64k seek=16 oflag=direct conv=fsync status=none && \
         dd if=/dev/vdb bs=64k skip=16 count=16 iflag=direct status=none | cmp - /tmp/hp",
        CMD_TIMEOUT,
    );
    let expected: Vec<u8> = b"vubd-hotplug\n"
        .iter()
        .copied()
        .cycle()
        .take(MIB as usize)
        .collect();
    assert_same_data(
        "the hot-plugged disk's host file at 1 MiB",
        &hp_img.read_at(MIB, MIB as usize),
        &expected,
    );
    libvirt.detach_disk(&name, 1, &hp);
    wait_for(&mut g, "[ ! -e /sys/block/vdb ]", "vdb to go");
    // libvirt drops the disk once QEMU reports the device deleted.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = virsh.check(&["domblklist", &name]);
        if !list.contains("vdb") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "libvirt still lists vdb 30 s after the unplug:\n{list}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.assert_running("after the hot-plug");

    // A clean power-off: QEMU exits, libvirt says the guest shut down ("shut off
    // (shutdown)" reads as a successful exit), and the domain is undefined.
    let st = g.shutdown();
    assert!(st.success(), "QEMU's end, as libvirt reports it: {st}");
    let left = libvirt.domains();
    assert!(left.is_empty(), "domains left after undefine: {left:?}");
    daemon.assert_running("after the guest powered off");
    let st = libvirt.stop();
    assert!(st.success(), "libvirtd's exit status after SIGTERM: {st}");
    eprintln!("libvirt test: {:.1} s", t0.elapsed().as_secs_f64());
}

/// Runs `cmd` in the guest until it succeeds (up to 30 s).
fn wait_for(g: &mut Guest, cmd: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while g.run(cmd, CMD_TIMEOUT).0 != 0 {
        assert!(Instant::now() < deadline, "waited 30 s for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One fio round on vda (two jobs, each writing 4 MiB at random and reading it back
/// verified); then vubd's `query-blockstats` for the export must show at least that
/// I/O, in 4 KiB requests, and no failed request.
fn fio_round(g: &mut Guest, qmp_sock: &std::path::Path, when: &str) {
    let fio = FioRounds::new("lv", "/dev/vda", 2, 4);
    let t = Instant::now();
    fio.start(g);
    let rounds = fio.stop(g, FIO_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let mut problems = round_problems(&rounds);
    problems.extend(disk_errors_in_dmesg(&g.dmesg()));
    assert!(
        problems.is_empty(),
        "fio on vda ({when}):\n{}",
        problems.join("\n")
    );
    eprintln!(
        "fio ({when}): {} verified round(s) in {:.1} s:\n{}",
        rounds.len(),
        t.elapsed().as_secs_f64(),
        rounds[0].output
    );
    let mut qmp = Qmp::connect(qmp_sock);
    let stats = qmp.ok("query-blockstats", json!({}));
    let e = stats
        .as_array()
        .and_then(|a| a.iter().find(|e| e["qdev"] == "disk-exp"))
        .unwrap_or_else(|| panic!("no disk-exp in query-blockstats: {stats}"))["stats"]
        .clone();
    for (key, min) in [
        ("wr_bytes", 8 * MIB),
        ("rd_bytes", 8 * MIB),
        ("wr_operations", 2 * 4 * MIB / 4096),
        ("rd_operations", 2 * 4 * MIB / 4096),
    ] {
        let v = e[key].as_u64().unwrap_or(0);
        assert!(
            v >= min,
            "{when}: query-blockstats {key} = {v}, expected >= {min}: {e}"
        );
    }
    for key in ["failed_wr_operations", "failed_rd_operations"] {
        assert_eq!(e[key], 0, "{when}: query-blockstats {key}: {e}");
    }
}

//! A real QEMU guest (Linux 6.1's virtio_blk driver, TCG) on vubd exports: what the guest
//! sees (size, block sizes, queues, serial, read-only), fio with verification, discard
//! and write-zeroes down to holes in the host file, fstrim on ext4, and a live resize
//! through QMP. The guest is built by scripts/build-guest.sh (see tests/src/guest.rs).

use std::time::{Duration, Instant};
use vubd_tests::guest::{Guest, GuestOpts, CMD_TIMEOUT};
use vubd_tests::{Daemon, DaemonArgs, Qmp, TempDir, TempImage, MIB};

/// fio under TCG: a few seconds here, much more on a slow CI machine.
const FIO_TIMEOUT: Duration = Duration::from_secs(300);

/// Parse a number printed by the guest.
#[track_caller]
fn num(s: &str, what: &str) -> u64 {
    s.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{what}: expected a number, guest printed {s:?}"))
}

/// Number of bytes in `dev[off..off+len]` (MiB units) that are not `byte`, counted in
/// the guest with O_DIRECT reads.
fn count_other_bytes(g: &mut Guest, dev: &str, off_mib: u64, len_mib: u64, byte: u8) -> u64 {
    let out = g.check(
        &format!(
            "dd if={dev} bs=1M skip={off_mib} count={len_mib} iflag=direct 2>/dev/null \
             | tr -d '\\{byte:03o}' | wc -c"
        ),
        CMD_TIMEOUT,
    );
    num(
        &out,
        &format!("non-{byte:#x} bytes in {dev} at {off_mib} MiB"),
    )
}

/// One writable export of a file node + raw node (both with `node_extra`), with
/// `export_extra` appended to the export options.
fn file_export(
    node: &str,
    img: &TempImage,
    sock: &std::path::Path,
    node_extra: &str,
    export_extra: &str,
) -> DaemonArgs {
    DaemonArgs::new()
        .iothread(&format!("{node}-io"))
        .file_raw(node, img, node_extra, node_extra)
        .vhost_user_blk(node, sock, &format!(",iothread={node}-io{export_extra}"))
}

fn append(mut a: DaemonArgs, b: DaemonArgs) -> DaemonArgs {
    for x in b.build() {
        a = a.arg(&x);
    }
    a
}

#[test]
fn guest_sees_size_block_sizes_queues_and_serial() {
    let dir = TempDir::new("vubd-guest");
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    // a: 512-byte blocks, default serial (the export id), 1 queue.
    let img_a = TempImage::new(64 * MIB);
    // b: 4096-byte blocks, an explicit serial, 4 queues; the size is not a multiple of
    // 4096, so the capacity rounds down to whole logical blocks.
    let img_b = TempImage::new(96 * MIB + 3 * 512);
    let args = append(
        file_export("a", &img_a, &sa, "", ",writable=on,num-queues=1"),
        file_export(
            "b",
            &img_b,
            &sb,
            "",
            ",writable=on,num-queues=4,logical-block-size=4096,serial=vubd-4k-disk",
        ),
    );
    let mut daemon = Daemon::start(&args.build());
    let mut g = Guest::boot(&GuestOpts::new("geometry").cpus(4).disk(&sa, 1).disk(&sb, 4));

    for (dev, img_bytes, lbs, serial, queues) in [
        ("vda", 64 * MIB, 512u64, "a-exp", 1usize),
        ("vdb", 96 * MIB, 4096, "vubd-4k-disk", 4),
    ] {
        let size = num(&g.read_file(&format!("/sys/block/{dev}/size")), "size");
        assert_eq!(
            size,
            img_bytes / 512,
            "{dev}: size in 512-byte sectors ({img_bytes} bytes exported)"
        );
        let l = num(
            &g.read_file(&format!("/sys/block/{dev}/queue/logical_block_size")),
            "logical_block_size",
        );
        assert_eq!(l, lbs, "{dev}: logical block size");
        // The image is on tmpfs with cache.direct=off: no alignment beyond the logical
        // block size, so the physical block size is the logical one.
        let p = num(
            &g.read_file(&format!("/sys/block/{dev}/queue/physical_block_size")),
            "physical_block_size",
        );
        assert_eq!(p, lbs, "{dev}: physical block size");
        assert_eq!(
            g.read_file(&format!("/sys/block/{dev}/serial")),
            serial,
            "{dev}: serial"
        );
        let mq = g.check(&format!("ls /sys/block/{dev}/mq"), CMD_TIMEOUT);
        assert_eq!(
            mq.split_whitespace().count(),
            queues,
            "{dev}: hardware queues (/sys/block/{dev}/mq: {mq:?})"
        );
        assert_eq!(
            g.read_file(&format!("/sys/block/{dev}/ro")),
            "0",
            "{dev}: ro"
        );
    }

    // 4 KiB I/O on the 4k disk lands at the right place in the host file; 512-byte
    // direct I/O is refused by the guest kernel.
    g.check(
        "yes vubd-4k-pattern | head -c 4096 >/tmp/p && \
         dd if=/tmp/p of=/dev/vdb bs=4096 seek=5 count=1 oflag=direct 2>&1 && \
         dd if=/dev/vdb bs=4096 skip=5 count=1 iflag=direct 2>/dev/null | cmp - /tmp/p",
        CMD_TIMEOUT,
    );
    let expected: Vec<u8> = b"vubd-4k-pattern\n"
        .iter()
        .copied()
        .cycle()
        .take(4096)
        .collect();
    assert_eq!(
        img_b.read_at(5 * 4096, 4096),
        expected,
        "host file at 20 KiB after the guest's 4 KiB write to block 5 of vdb"
    );
    let (rc, out) = g.run(
        "dd if=/dev/vdb of=/dev/null bs=512 count=1 iflag=direct",
        CMD_TIMEOUT,
    );
    assert_ne!(
        rc, 0,
        "a 512-byte O_DIRECT read of a 4096-byte-block disk should fail: {out}"
    );
    daemon.assert_running("after the geometry checks");
    let st = g.shutdown();
    assert!(st.success(), "QEMU exit status after poweroff: {st}");
    daemon.assert_running("after the guest powered off");
}

#[test]
fn guest_cannot_write_a_read_only_export() {
    let dir = TempDir::new("vubd-guest");
    let sock = dir.join("ro.sock");
    let img = TempImage::new_filled(32 * MIB, 0x5A);
    // No writable=on: a read-only export.
    let mut daemon = Daemon::start(&file_export("ro", &img, &sock, "", "").build());
    let mut g = Guest::boot(&GuestOpts::new("read-only").disk(&sock, 1));

    assert_eq!(g.read_file("/sys/block/vda/ro"), "1", "vda: ro");
    let (rc, out) = g.run(
        "dd if=/dev/zero of=/dev/vda bs=4096 count=16 oflag=direct",
        CMD_TIMEOUT,
    );
    assert_ne!(rc, 0, "a write to a read-only disk succeeded: {out}");
    eprintln!("write to the read-only disk: exit status {rc}: {out}");
    let (rc, out) = g.run(
        "dd if=/dev/zero of=/dev/vda bs=4096 seek=1000 count=1 oflag=direct,dsync",
        CMD_TIMEOUT,
    );
    assert_ne!(rc, 0, "a second write to a read-only disk succeeded: {out}");
    daemon.assert_running("after the guest's writes to a read-only export");

    // vubd keeps serving: the whole disk reads back unchanged.
    assert_eq!(
        count_other_bytes(&mut g, "/dev/vda", 0, 32, 0x5A),
        0,
        "the read-only disk's contents changed (as seen by the guest)"
    );
    assert!(
        img.read_all().iter().all(|&b| b == 0x5A),
        "the host file of a read-only export changed"
    );
    let st = g.shutdown();
    assert!(st.success(), "QEMU exit status after poweroff: {st}");
    daemon.assert_running("after the guest powered off");
}

/// fio in the guest: random 4 KiB writes with crc32c verification over 32 MiB, spread
/// over `jobs` jobs (each on its own vCPU, so each uses its own queue). `direct_pinned`:
/// the image on a disk file system with `cache.direct=on`, and the export with
/// `pin-guest-memory=on` (requests go through the guest memory registered with
/// io_uring).
fn fio_verify(name: &str, queues: usize, direct_pinned: bool) {
    let dir = TempDir::new("vubd-guest");
    let sock = dir.join("fio.sock");
    let disk = TempDir::new_in(&std::env::temp_dir(), "vubd-guest-img");
    let (img, node_extra, export_extra) = if direct_pinned {
        (
            TempImage::new_in(disk.path(), 64 * MIB),
            ",cache.direct=on",
            ",pin-guest-memory=on",
        )
    } else {
        (TempImage::new(64 * MIB), "", "")
    };
    let mut args = file_export(
        "fio",
        &img,
        &sock,
        node_extra,
        &format!(",writable=on,num-queues={queues}{export_extra}"),
    );
    if direct_pinned {
        // The log lines of the registration of guest memory.
        args = args.arg("--trace").arg("vhost_user_blk_guest_pins");
    }
    let mut daemon = Daemon::start(&args.build());
    let mut g = Guest::boot(&GuestOpts::new(name).cpus(queues).disk(&sock, queues));
    let mq = g.check("ls /sys/block/vda/mq", CMD_TIMEOUT);
    assert_eq!(mq.split_whitespace().count(), queues, "queues: {mq:?}");

    let jobs = queues;
    let region = 32 * MIB;
    let per_job = region / jobs as u64;
    let cmd = format!(
        "fio --name=vubd --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite \
         --bs=4k --size={per_job} --offset_increment={per_job} --numjobs={jobs} --iodepth=8 \
         --cpus_allowed=0-{last} --cpus_allowed_policy=split \
         --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting --eta=never",
        last = queues - 1
    );
    let t0 = Instant::now();
    let out = g.check(&cmd, FIO_TIMEOUT);
    let summary: Vec<&str> = out
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            t.starts_with("READ:") || t.starts_with("WRITE:") || t.contains("err=")
        })
        .collect();
    eprintln!(
        "{name}: fio took {:.1} s in the guest:\n{}",
        t0.elapsed().as_secs_f64(),
        summary.join("\n")
    );
    assert!(out.contains("err= 0"), "fio reported an error:\n{out}");
    assert!(
        !out.contains("verify: bad") && !out.contains("verify failed"),
        "fio printed verification failures:\n{out}"
    );
    // Everything written was read back for verification.
    for dir in ["WRITE:", "READ:"] {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(dir))
            .unwrap_or_else(|| panic!("no {dir} summary line in fio's output:\n{out}"));
        assert!(
            line.contains("io=32.0MiB"),
            "fio {dir} should have moved 32 MiB: {line}"
        );
    }
    // Every virtqueue carried requests: each has its own MSI-X vector, and vubd signals
    // completions on the queue the request came from.
    let irqs = g.check("grep -- '-req\\.' /proc/interrupts", CMD_TIMEOUT);
    let counts: Vec<u64> = irqs
        .lines()
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .take(queues)
                .map(|n| num(n, "interrupt count"))
                .sum()
        })
        .collect();
    assert_eq!(counts.len(), queues, "request queue interrupts:\n{irqs}");
    assert!(
        counts.iter().all(|&c| c > 0),
        "some virtqueue signalled no completion: {counts:?}\n{irqs}"
    );
    eprintln!("{name}: completion interrupts per virtqueue: {counts:?}");
    daemon.assert_running("after fio");
    if direct_pinned {
        // A registration the kernel refused is logged, and I/O goes the usual way.
        let log = daemon.stderr();
        assert!(
            !log.contains("cannot pin") && log.contains("pinned for I/O"),
            "the guest's memory was not pinned:\n{log}"
        );
    }
    let st = g.shutdown();
    assert!(st.success(), "QEMU exit status after poweroff: {st}");

    // The host file holds fio's blocks: each 4 KiB block of the region starts with a
    // verify header (magic 0xacca, length 4096, its own offset); the rest is untouched.
    let data = img.read_all();
    for off in (0..region as usize).step_by(4096) {
        let b = &data[off..off + 4096];
        let magic = u16::from_le_bytes([b[0], b[1]]);
        let len = u32::from_le_bytes(b[4..8].try_into().unwrap());
        let hoff = u64::from_le_bytes(b[16..24].try_into().unwrap());
        assert!(
            magic == 0xacca && len == 4096 && hoff == off as u64,
            "host file at {off}: no fio verify header for this block (magic {magic:#x}, \
             len {len}, offset {hoff})"
        );
    }
    assert!(
        data[region as usize..].iter().all(|&b| b == 0),
        "the host file changed beyond the region fio wrote"
    );
    daemon.assert_running("after the guest powered off");
}

#[test]
fn guest_fio_verify_one_queue() {
    fio_verify("fio-1q", 1, false);
}

#[test]
fn guest_fio_verify_four_queues() {
    fio_verify("fio-4q", 4, false);
}

#[test]
fn guest_fio_verify_on_pinned_memory_with_direct_io() {
    fio_verify("fio-pinned", 2, true);
}

#[test]
fn guest_discard_and_write_zeroes_reach_the_host_file() {
    let dir = TempDir::new("vubd-guest");
    let sock = dir.join("discard.sock");
    let img = TempImage::new_filled(64 * MIB, 0xAB);
    // discard=unmap on both nodes (it is per node, as in QEMU).
    let mut daemon =
        Daemon::start(&file_export("dz", &img, &sock, ",discard=unmap", ",writable=on").build());
    let mut g = Guest::boot(&GuestOpts::new("discard").disk(&sock, 1));
    let max = num(
        &g.read_file("/sys/block/vda/queue/discard_max_bytes"),
        "discard_max_bytes",
    );
    assert!(max >= MIB, "discard_max_bytes {max}: discard not offered");
    let wz = num(
        &g.read_file("/sys/block/vda/queue/write_zeroes_max_bytes"),
        "write_zeroes_max_bytes",
    );
    assert!(
        wz >= MIB,
        "write_zeroes_max_bytes {wz}: write-zeroes not offered"
    );
    assert_eq!(
        g.read_file("/sys/block/vda/queue/discard_granularity"),
        "512",
        "discard granularity (discard_sector_alignment of a 512-byte-block export)"
    );

    // Discard: zeroes for the guest, a hole in the host file.
    let before = img.allocated_bytes();
    g.check("blkdiscard -o 8M -l 8M /dev/vda", CMD_TIMEOUT);
    assert_eq!(
        count_other_bytes(&mut g, "/dev/vda", 8, 8, 0),
        0,
        "discarded range does not read back as zeroes"
    );
    assert!(
        img.is_hole(8 * MIB, 8 * MIB),
        "no hole in the host file at 8..16 MiB after blkdiscard: SEEK_DATA(8 MiB) = {:?}",
        img.seek_data(8 * MIB)
    );
    let after = img.allocated_bytes();
    assert!(
        before - after >= 8 * MIB,
        "host allocation shrank by {} bytes, expected 8 MiB",
        before as i64 - after as i64
    );

    // blkdiscard -z: write-zeroes without unmap. Zeroes on both sides.
    g.check("blkdiscard -z -o 24M -l 4M /dev/vda", CMD_TIMEOUT);
    assert_eq!(
        count_other_bytes(&mut g, "/dev/vda", 24, 4, 0),
        0,
        "blkdiscard -z range does not read back as zeroes"
    );
    assert!(
        img.read_at(24 * MIB, 4 * MIB as usize)
            .iter()
            .all(|&b| b == 0),
        "host file not zeroed at 24..28 MiB after blkdiscard -z"
    );

    // fallocate -p: write-zeroes that may unmap: zeroes, and a hole with discard=unmap.
    g.check("fallocate -p -o 40M -l 4M /dev/vda", CMD_TIMEOUT);
    assert_eq!(
        count_other_bytes(&mut g, "/dev/vda", 40, 4, 0),
        0,
        "fallocate -p range does not read back as zeroes"
    );
    assert!(
        img.is_hole(40 * MIB, 4 * MIB),
        "no hole in the host file at 40..44 MiB after fallocate -p (write-zeroes with \
         unmap): SEEK_DATA(40 MiB) = {:?}",
        img.seek_data(40 * MIB)
    );

    // Nothing else changed, as seen by the guest and in the host file.
    for (off, len) in [(0, 8), (16, 8), (28, 12), (44, 20)] {
        assert_eq!(
            count_other_bytes(&mut g, "/dev/vda", off, len, 0xAB),
            0,
            "data at {off}..{} MiB changed (guest view)",
            off + len
        );
        assert!(
            img.read_at(off * MIB, (len * MIB) as usize)
                .iter()
                .all(|&b| b == 0xAB),
            "host file changed at {off}..{} MiB",
            off + len
        );
    }
    daemon.assert_running("after discard and write-zeroes");
    let st = g.shutdown();
    assert!(st.success(), "QEMU exit status after poweroff: {st}");
}

#[test]
fn guest_fstrim_on_ext4_punches_holes() {
    let dir = TempDir::new("vubd-guest");
    let sock = dir.join("trim.sock");
    let img = TempImage::new_filled(64 * MIB, 0xAB);
    let mut daemon =
        Daemon::start(&file_export("trim", &img, &sock, ",discard=unmap", ",writable=on").build());
    let mut g = Guest::boot(&GuestOpts::new("fstrim").disk(&sock, 1));

    // No discard and no zeroing (which the guest sends as write-zeroes that may
    // unmap) at mkfs time or later by ext4's background inode table init, which
    // would punch holes at an unpredictable moment: the free space stays allocated
    // in the host file until fstrim.
    g.check(
        "mkfs.ext4 -q -F -b 4096 -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 \
         /dev/vda && mkdir -p /mnt && \
         mount -t ext4 -o noinit_itable /dev/vda /mnt && \
         yes vubd-keep | head -c 1048576 >/mnt/keep && \
         dd if=/dev/zero of=/mnt/junk bs=1M count=16 conv=fsync 2>&1 && \
         sync && rm /mnt/junk && sync",
        FIO_TIMEOUT,
    );
    let keep_sum = g.check("md5sum </mnt/keep", CMD_TIMEOUT);
    let before = img.allocated_bytes();
    assert_eq!(before, 64 * MIB, "host file should be fully allocated");
    let out = g.check("fstrim -v /mnt", FIO_TIMEOUT);
    // util-linux: "/mnt: 49.6 MiB (52002816 bytes) trimmed"
    let trimmed = out
        .split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("cannot parse fstrim's output: {out:?}"));
    assert!(
        trimmed >= 40 * MIB,
        "fstrim trimmed only {trimmed} bytes of a 64 MiB file system with ~60 MiB free"
    );
    let after = img.allocated_bytes();
    assert!(
        before - after >= trimmed - trimmed / 20,
        "fstrim trimmed {trimmed} bytes but the host file's allocation shrank by only {} \
         ({before} -> {after})",
        before - after
    );

    // The file system and the kept file survive.
    g.check("umount /mnt && mount -t ext4 /dev/vda /mnt", CMD_TIMEOUT);
    assert_eq!(
        g.check("md5sum </mnt/keep", CMD_TIMEOUT),
        keep_sum,
        "a file kept on the file system changed after fstrim and a remount"
    );
    g.check("umount /mnt", CMD_TIMEOUT);
    daemon.assert_running("after fstrim");
    let st = g.shutdown();
    assert!(st.success(), "QEMU exit status after poweroff: {st}");
}

#[test]
fn guest_sees_block_resize_from_qmp() {
    let dir = TempDir::new("vubd-guest");
    let sock = dir.join("resize.sock");
    let qmp_sock = dir.join("qmp.sock");
    let img = TempImage::new(64 * MIB);
    let args = file_export("rs", &img, &sock, "", ",writable=on")
        .arg("--chardev")
        .arg(&format!(
            "socket,id=mon0,path={},server=on,wait=off",
            qmp_sock.display()
        ))
        .arg("--monitor")
        .arg("chardev=mon0");
    let mut daemon = Daemon::start(&args.build());
    let mut qmp = Qmp::connect(&qmp_sock);
    let mut g = Guest::boot(&GuestOpts::new("resize").disk(&sock, 1));
    assert_eq!(
        num(&g.read_file("/sys/block/vda/size"), "size"),
        64 * MIB / 512
    );

    let new_size = 96 * MIB;
    qmp.ok(
        "block_resize",
        serde_json::json!({"node-name": "rs", "size": new_size}),
    );
    assert_eq!(
        img.file_len(),
        new_size,
        "host file length after block_resize"
    );

    // The guest learns of it through a config-change interrupt.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let size = num(&g.read_file("/sys/block/vda/size"), "size");
        if size == new_size / 512 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "guest still sees {size} sectors 30 s after block_resize to {new_size} bytes\n\
             dmesg:\n{}",
            g.dmesg()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // I/O beyond the old end works, and lands in the host file.
    g.check(
        "yes vubd-resized | head -c 65536 >/tmp/p && \
         dd if=/tmp/p of=/dev/vda bs=65536 seek=1280 count=1 oflag=direct 2>&1 && \
         dd if=/dev/vda bs=65536 skip=1280 count=1 iflag=direct 2>/dev/null | cmp - /tmp/p",
        CMD_TIMEOUT,
    );
    let expected: Vec<u8> = b"vubd-resized\n"
        .iter()
        .copied()
        .cycle()
        .take(65536)
        .collect();
    assert_eq!(
        img.read_at(80 * MIB, 65536),
        expected,
        "host file at 80 MiB (beyond the old end) after the guest's write"
    );
    // The last sector of the new size is readable; one past it is not.
    g.check(
        &format!(
            "dd if=/dev/vda of=/dev/null bs=512 skip={} count=1 iflag=direct",
            new_size / 512 - 1
        ),
        CMD_TIMEOUT,
    );
    daemon.assert_running("after block_resize");
    let st = g.shutdown();
    assert!(st.success(), "QEMU exit status after poweroff: {st}");
}

//! Data written through the export reads back identical, through the export and in the
//! host image file; single queue, several queues on several iothreads with concurrent
//! threads, FUA, flush, O_DIRECT, large requests at depth, buffers spanning two guest
//! memory regions.

use blkio::ReqFlags;
use vubd_tests::{
    assert_same_data, exercise, exercise_queues, simple_file_export, verify_all, Client,
    ClientOptions, Daemon, DaemonArgs, ExerciseOpts, Rng, TempDir, TempImage, MIB,
};

/// Options for `exercise` honouring the device limits libblkio reports.
fn opts_for(client: &Client, rounds: usize) -> ExerciseOpts {
    let max_segs = client.prop_i32("max-segments");
    let max_seg_len = client.prop_i32("max-segment-len");
    assert!(
        max_segs >= 1,
        "device reports max-segments {max_segs} (seg_max)"
    );
    ExerciseOpts {
        rounds,
        max_segs: (max_segs as usize).min(8),
        max_seg_len: max_seg_len.max(0) as usize,
        ..Default::default()
    }
}

#[test]
fn random_io_reads_back_and_lands_in_file() {
    let mut rng = Rng::new("random_io_reads_back_and_lands_in_file");
    let dir = TempDir::new("vubd-t");
    let sock = dir.join("vubd.sock");
    let size = 32 * MIB;
    let (img, mut shadow) = TempImage::new_random(size, &mut rng);
    let daemon = Daemon::start(&simple_file_export(&img, &sock, 1, "", ""));

    let mut client = Client::connect(daemon.socket(), 1);
    assert_eq!(client.capacity(), size, "capacity");
    let o = opts_for(&client, 200);
    exercise(client.q(), &mut rng, 0, &mut shadow, &o);
    verify_all(client.q(), 0, &shadow, "read back through the export");

    client.q().flush().expect("flush");
    assert_same_data("host image file after flush", &img.read_all(), &shadow);
}

#[test]
fn four_queues_two_iothreads_concurrent_threads() {
    let mut rng = Rng::new("four_queues_two_iothreads_concurrent_threads");
    let dir = TempDir::new("vubd-t");
    let sock = dir.join("vubd.sock");
    let size = 64 * MIB;
    let (img, mut shadow) = TempImage::new_random(size, &mut rng);
    let args = DaemonArgs::new()
        .iothread("io0")
        .iothread("io1")
        .file_raw("disk0", &img, "", "")
        .vhost_user_blk(
            "disk0",
            &sock,
            ",writable=on,num-queues=4,iothread.0=io0,iothread.1=io1",
        )
        .build();
    let daemon = Daemon::start(&args);

    let mut client = Client::connect(daemon.socket(), 4);
    assert_eq!(client.capacity(), size);
    let o = opts_for(&client, 150);
    let seeds: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
    exercise_queues(client.queues_mut(), &mut shadow, &o, &seeds);
    // Every queue reads back the whole disk (also what the other threads wrote).
    std::thread::scope(|s| {
        for q in client.queues_mut() {
            let shadow = &shadow;
            s.spawn(move || {
                let what = format!("full read back on queue {}", q.index());
                verify_all(q, 0, shadow, &what)
            });
        }
    });
    client.q().flush().expect("flush");
    assert_same_data("host image file after flush", &img.read_all(), &shadow);
}

#[test]
fn flush_and_fua_write() {
    let mut rng = Rng::new("flush_and_fua_write");
    let dir = TempDir::new("vubd-t");
    let sock = dir.join("vubd.sock");
    let img = TempImage::new(8 * MIB);
    let daemon = Daemon::start(&simple_file_export(&img, &sock, 1, "", ""));
    let mut client = Client::connect(daemon.socket(), 1);
    eprintln!("flush-needed: {}", client.prop_bool("flush-needed"));

    // Flush with nothing to flush, then after a write.
    client.q().flush().expect("flush on a clean disk");
    let a = rng.bytes(64 * 1024);
    client.q().write(MIB, &a).expect("write");
    client.q().flush().expect("flush after write");
    assert_same_data("file after write + flush", &img.read_at(MIB, a.len()), &a);

    // FUA write (libblkio sends a flush after it unless the device supports FUA natively).
    let b = rng.bytes(128 * 1024);
    client
        .q()
        .write_flags(3 * MIB, &b, ReqFlags::FUA)
        .expect("FUA write");
    assert_same_data("file after FUA write", &img.read_at(3 * MIB, b.len()), &b);
    let got = client.q().read_poisoned(3 * MIB, b.len(), 0).expect("read");
    assert_same_data("read after FUA write", &got, &b);

    // A flush submitted together with writes completes too.
    let c = rng.bytes(4096);
    let buf = client.q().buf();
    buf[..4096].copy_from_slice(&c);
    let rets = client.q().submit(&[
        vubd_tests::Req::Write {
            offset: 0,
            buf: 0..4096,
            flags: ReqFlags::empty(),
        },
        vubd_tests::Req::Flush,
        vubd_tests::Req::Write {
            offset: 4096,
            buf: 0..4096,
            flags: ReqFlags::FUA,
        },
    ]);
    assert_eq!(rets, vec![0, 0, 0]);
    client.q().flush().expect("flush");
    assert_same_data("file", &img.read_at(0, 4096), &c);
    assert_same_data("file", &img.read_at(4096, 4096), &c);
}

/// cache.direct=on needs a file system with O_DIRECT (not tmpfs): the image goes to /tmp.
/// Segments of any byte length at any address are valid virtio-blk, so a daemon using
/// O_DIRECT has to bounce or split them.
#[test]
fn cache_direct_on_with_unaligned_segments() {
    let mut rng = Rng::new("cache_direct_on_with_unaligned_segments");
    let dir = TempDir::new("vubd-t");
    let sock = dir.join("vubd.sock");
    let size = 16 * MIB;
    let img = TempImage::new_in(dir.path(), size);
    let mut shadow = rng.bytes(size as usize);
    img.write_at(0, &shadow);
    let daemon = Daemon::start(&simple_file_export(&img, &sock, 2, ",cache.direct=on", ""));

    let mut client = Client::connect(daemon.socket(), 2);
    let o = opts_for(&client, 100);
    let seeds: Vec<u64> = (0..2).map(|_| rng.next_u64()).collect();
    exercise_queues(client.queues_mut(), &mut shadow, &o, &seeds);
    verify_all(client.q(), 0, &shadow, "read back (cache.direct=on)");
    client.q().flush().expect("flush");
    assert_same_data("host file (cache.direct=on)", &img.read_all(), &shadow);
}

/// Large requests: up to the device's max transfer, many segments.
#[test]
fn large_multi_segment_requests() {
    let mut rng = Rng::new("large_multi_segment_requests");
    let dir = TempDir::new("vubd-t");
    let sock = dir.join("vubd.sock");
    let size = 16 * MIB;
    let img = TempImage::new(size);
    let daemon = Daemon::start(&simple_file_export(&img, &sock, 1, "", ""));
    let mut client = Client::connect(daemon.socket(), 1);
    let max_segs = client.prop_i32("max-segments").max(1) as usize;
    let max_transfer = client.prop_i32("max-transfer");
    let len: usize = if max_transfer > 0 {
        (max_transfer as usize).min(2 << 20) / 512 * 512
    } else {
        2 << 20
    };
    let nsegs = max_segs.min(len / 512).min(128);
    let seg = len / nsegs / 512 * 512;
    let total = seg * nsegs;
    let data = rng.bytes(total);
    let segs: Vec<&[u8]> = data.chunks(seg).collect();
    client
        .q()
        .writev(MIB, &segs, ReqFlags::empty())
        .unwrap_or_else(|e| panic!("writev of {nsegs} x {seg} bytes failed: {e}"));
    let lens = vec![seg; nsegs];
    let got = client.q().readv(MIB, &lens).expect("readv");
    assert_same_data("large readv", &got, &data);
    client.q().flush().expect("flush");
    assert_same_data("file", &img.read_at(MIB, total), &data);
}

/// Large requests at depth (up to 1 MiB, 8 in flight per queue, 2 queues on 2
/// iothreads, or one) read back and land in the file: on a memory-backed file, where
/// they are copies through the file's mapping (reads of 256 KiB or more on the copy
/// helper thread when the process has fewer iothreads than CPUs, as with one iothread
/// on this project's 2-CPU machines); on a disk file through io_uring; and with
/// O_DIRECT, where the kernel pins the guest's pages.
#[test]
fn large_requests_at_depth_on_memory_disk_and_direct_files() {
    let mut rng = Rng::new("large_requests_at_depth_on_memory_disk_and_direct_files");
    let dir = TempDir::new("vubd-t");
    let size = 32 * MIB;
    let shm = std::path::Path::new("/dev/shm");
    let two = ",iothread.0=io0,iothread.1=io1";
    for (where_, parent, extra, iothreads) in [
        ("/dev/shm", shm, "", two),
        ("/dev/shm, one iothread", shm, "", ",iothread=io0"),
        ("disk", dir.path(), "", two),
        ("disk, cache.direct=on", dir.path(), ",cache.direct=on", two),
    ] {
        let img = TempImage::new_in(parent, size);
        let mut shadow = rng.bytes(size as usize);
        img.write_at(0, &shadow);
        let sock = dir.join(&format!("vubd-{}.sock", rng.next_u64()));
        let mut args = DaemonArgs::new().iothread("io0");
        if iothreads == two {
            args = args.iothread("io1");
        }
        let args = args
            .file_raw("disk0", &img, extra, "")
            .vhost_user_blk(
                "disk0",
                &sock,
                &format!(",writable=on,num-queues=2{iothreads}"),
            )
            .build();
        let daemon = Daemon::start(&args);
        let copts = ClientOptions {
            num_queues: 2,
            buf_per_queue: 16 << 20,
            ..Default::default()
        };
        let mut client = Client::connect_with(daemon.socket(), &copts).expect("connect");
        let max_transfer = client.prop_i32("max-transfer");
        let mut o = opts_for(&client, 25);
        o.max_len = if max_transfer > 0 {
            (max_transfer as u64).min(MIB)
        } else {
            MIB
        };
        o.max_segs = o.max_segs.min(4);
        o.max_batch = 8;
        let seeds: Vec<u64> = (0..2).map(|_| rng.next_u64()).collect();
        exercise_queues(client.queues_mut(), &mut shadow, &o, &seeds);
        verify_all(client.q(), 0, &shadow, &format!("read back ({where_})"));
        client.q().flush().expect("flush");
        assert_same_data(&format!("host file ({where_})"), &img.read_all(), &shadow);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if iothreads != two && parent == shm && cpus >= 2 {
            assert!(
                thread_names(daemon.pid()).iter().any(|n| n == "copy"),
                "one iothread on {cpus} CPUs: the copy helper took large reads"
            );
        }
    }
}

/// The names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("list the daemon's threads")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// Data buffers that span two guest memory regions, adjacent in guest physical memory
/// but mapped separately (a raw vhost-user frontend with regions at 1 MiB and 17 MiB):
/// writes and reads of 64 KiB to 1 MiB across the boundary, each read done twice (on
/// tmpfs a large read is a copy through the file's mapping once its pages are known
/// allocated, a system call before), on /dev/shm and with O_DIRECT on a disk file.
#[test]
fn buffers_spanning_two_memory_regions() {
    use std::time::Duration;
    use vubd_tests::hostile::{Dev, DevOpts};
    use vubd_tests::raw::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use vubd_tests::vu_frontend::Desc;

    const BOUNDARY: u64 = 17 * MIB;
    let mut rng = Rng::new("buffers_spanning_two_memory_regions");
    let dir = TempDir::new("vubd-t");
    let size = 16 * MIB;
    for (where_, parent, extra) in [
        ("/dev/shm", std::path::Path::new("/dev/shm"), ""),
        ("disk, cache.direct=on", dir.path(), ",cache.direct=on"),
    ] {
        let img = TempImage::new_in(parent, size);
        let mut shadow = rng.bytes(size as usize);
        img.write_at(0, &shadow);
        let sock = dir.join(&format!("vubd-{}.sock", rng.next_u64()));
        let daemon = Daemon::start(&simple_file_export(&img, &sock, 1, extra, ""));
        let opts = DevOpts {
            regions: vec![(MIB, 16 * MIB), (BOUNDARY, 16 * MIB)],
            ..DevOpts::default()
        };
        let mut dev = Dev::connect(daemon.socket(), &opts).expect("vhost-user handshake");
        // Guest memory written or read in the two parts on either side of the boundary.
        let put = |dev: &Dev, gpa: u64, data: &[u8]| {
            let first = (BOUNDARY - gpa) as usize;
            dev.mem().write(gpa, &data[..first]);
            dev.mem().write(BOUNDARY, &data[first..]);
        };
        let get = |dev: &Dev, gpa: u64, len: usize| {
            let first = (BOUNDARY - gpa) as usize;
            let mut v = dev.mem().read(gpa, first);
            v.extend(dev.mem().read(BOUNDARY, len - first));
            v
        };
        let run = |dev: &mut Dev, kind: u32, sector: u64, gpa: u64, len: u32| {
            let h = dev.header(kind, sector);
            let s = dev.status();
            let data = if kind == VIRTIO_BLK_T_IN {
                Desc::writable(gpa, len)
            } else {
                Desc::readable(gpa, len)
            };
            let head = dev.submit_chain(&[Desc::readable(h, 16), data, Desc::writable(s, 1)]);
            let (_, st) = dev
                .wait(head, s, Duration::from_secs(10))
                .unwrap_or_else(|| panic!("{where_}: request of {len} bytes did not complete"));
            assert_eq!(
                st, VIRTIO_BLK_S_OK,
                "{where_}: status of {len} bytes at {gpa:#x}"
            );
        };
        for (i, len) in [64 << 10, 256 << 10, 1 << 20, 192 << 10]
            .into_iter()
            .enumerate()
        {
            let len: u32 = len;
            // The buffer starts below the boundary by a different share each time.
            let below = (u64::from(len) / (i as u64 + 2)).next_multiple_of(4096);
            let gpa = BOUNDARY - below;
            let off = (i as u64 * 3 + 1) * MIB + 4096;
            let data = rng.bytes(len as usize);
            put(&dev, gpa, &data);
            run(&mut dev, VIRTIO_BLK_T_OUT, off / 512, gpa, len);
            shadow[off as usize..off as usize + len as usize].copy_from_slice(&data);
            for round in 0..2 {
                let rgpa = BOUNDARY - (below / 2).next_multiple_of(4096);
                put(&dev, rgpa, &vec![0x5A; len as usize]);
                run(&mut dev, VIRTIO_BLK_T_IN, off / 512, rgpa, len);
                assert_same_data(
                    &format!("{where_}: read {round} of {len} bytes across the boundary"),
                    &get(&dev, rgpa, len as usize),
                    &data,
                );
            }
        }
        drop(dev);
        assert_same_data(&format!("host file ({where_})"), &img.read_all(), &shadow);
    }
}

/// Large requests on a tmpfs image go through the driver's shared mapping of the file.
/// On a tmpfs too small for the guest's writes, a write that finds no space must fail
/// with an I/O error (never SIGBUS in the daemon), the data written before it must
/// stay, and once space is freed the same write must succeed. Discarded ranges are holes
/// that read back as zeroes. Two queues on two iothreads; the host file is checked.
#[test]
fn large_writes_on_a_full_tmpfs_fail_cleanly_and_discards_read_as_zeroes() {
    use std::os::unix::fs::MetadataExt;
    use vubd_tests::SmallTmpfs;

    let mut rng = Rng::new("large_writes_on_a_full_tmpfs_fail_cleanly");
    let dir = TempDir::new("vubd-t");
    // 8 MiB of tmpfs, 4 MiB of it taken: a 16 MiB sparse image fills it up.
    let small = SmallTmpfs::mount(dir.path(), 8);
    let size = 16 * MIB;
    let img = TempImage::new_in(&small.dir, size);
    let filler = small.dir.join("filler");
    std::fs::write(&filler, vec![0x5au8; 4 * MIB as usize]).unwrap();
    let blocks = || std::fs::metadata(img.path()).unwrap().blocks() * 512;

    let sock = dir.join("vubd.sock");
    let args = DaemonArgs::new()
        .iothread("io0")
        .iothread("io1")
        .file_raw("disk0", &img, ",discard=unmap", ",discard=unmap")
        .vhost_user_blk(
            "disk0",
            &sock,
            ",writable=on,num-queues=2,iothread.0=io0,iothread.1=io1,werror=report",
        )
        .build();
    let mut daemon = Daemon::start(&args);
    let copts = ClientOptions {
        num_queues: 2,
        buf_per_queue: 4 << 20,
        ..Default::default()
    };
    let mut client = Client::connect_with(daemon.socket(), &copts).expect("connect");
    let mut shadow = vec![0u8; size as usize];
    let mut write = |client: &mut Client, shadow: &mut [u8], q: usize, at: u64| {
        let data = rng.bytes(MIB as usize);
        let r = client.queue(q).write(at, &data);
        if r.is_ok() {
            shadow[at as usize..][..MIB as usize].copy_from_slice(&data);
        }
        (r, data)
    };

    // Both iothreads write, each a 1 MiB request.
    for (q, at) in [(0, 0), (1, MIB), (0, 2 * MIB)] {
        write(&mut client, &mut shadow, q, at)
            .0
            .expect("write with space left");
    }
    verify_all(client.queue(1), 0, &shadow, "read back");
    assert_eq!(blocks(), 3 * MIB);
    // Rewrites of allocated pages are copies through the mapping, from both iothreads.
    for (q, at) in [(1, 0), (0, MIB), (1, 2 * MIB)] {
        write(&mut client, &mut shadow, q, at).0.expect("rewrite");
    }
    verify_all(client.queue(0), 0, &shadow, "read back the rewrites");
    assert_eq!(blocks(), 3 * MIB);
    assert_same_data("host file after the rewrites", &img.read_all(), &shadow);

    // A discard punches a hole: zeroes, and the space is given back.
    client.queue(1).discard(MIB, MIB).expect("discard");
    shadow[MIB as usize..][..MIB as usize].fill(0);
    verify_all(client.queue(0), 0, &shadow, "after the discard");
    assert_eq!(blocks(), 2 * MIB, "the discard freed its megabyte");

    // Fill the rest until a write fails for want of space (werror=report: the
    // default, enospc, would hold it, as tests/guest_policies.rs shows).
    let mut failed = None;
    for i in 3..16 {
        let (r, data) = write(&mut client, &mut shadow, (i % 2) as usize, i * MIB);
        if let Err(e) = r {
            failed = Some((i, (i % 2) as usize, data, e));
            break;
        }
    }
    let (i, q, data, e) = failed.expect("a 4 MiB tmpfs took 14 MiB of writes");
    assert_eq!(e, -libc::EIO, "a failed write is an I/O error to the guest");
    daemon.assert_running("after a write found the tmpfs full");
    // What was written before stays; the failed range is whatever the write managed.
    let good = (i * MIB) as usize;
    verify_all(
        client.queue(1 - q),
        0,
        &shadow[..good],
        "after the failed write",
    );

    // Space freed: the same write now succeeds, on both paths of the driver.
    std::fs::remove_file(&filler).unwrap();
    client
        .queue(q)
        .write(i * MIB, &data)
        .expect("write after space was freed");
    shadow[good..][..MIB as usize].copy_from_slice(&data);
    verify_all(client.queue(q), 0, &shadow, "after the retried write");
    client.q().flush().expect("flush");
    drop(client);
    daemon.assert_running("at the end");
    assert_same_data("host file", &img.read_all(), &shadow);
}

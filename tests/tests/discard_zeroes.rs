//! Discard and write-zeroes: data reads back as zeroes, holes appear in the host file
//! (tmpfs in /dev/shm supports hole punching and SEEK_HOLE/SEEK_DATA).

use blkio::ReqFlags;
use vubd_tests::{assert_same_data, Client, Daemon, Rng, TempDir, TempImage, MIB};

fn setup(file_extra: &str) -> (TempDir, TempImage, Daemon, Client) {
    let dir = TempDir::new("vubd-t");
    let sock = dir.join("vubd.sock");
    // Fully allocated: every block of the host file holds 0xAB.
    let img = TempImage::new_filled(16 * MIB, 0xAB);
    assert_eq!(
        img.allocated_bytes(),
        16 * MIB,
        "image should be fully allocated"
    );
    // `discard` is a per-node option (as in QEMU): give it to the raw node as well.
    let args = vubd_tests::DaemonArgs::new()
        .iothread("io0")
        .file_raw("disk0", &img, file_extra, file_extra)
        .vhost_user_blk("disk0", &sock, ",writable=on,iothread=io0")
        .build();
    let daemon = Daemon::start(&args);
    let client = Client::connect(daemon.socket(), 1);
    (dir, img, daemon, client)
}

#[test]
fn discard_unmap_punches_holes_and_reads_zeroes() {
    let (_dir, img, _daemon, mut client) = setup(",discard=unmap");
    let align = client.prop_i32("discard-alignment").max(512) as u64;
    let max = client.prop_u64("max-discard-len");
    assert!(
        max == 0 || max >= MIB,
        "max-discard-len {max} is unexpectedly small"
    );
    let before = img.allocated_bytes();

    // 2 MiB in the middle (aligned to anything sane).
    let (off, len) = (4 * MIB, 2 * MIB);
    assert_eq!(off % align, 0);
    client
        .q()
        .discard(off, len)
        .unwrap_or_else(|e| panic!("discard failed: {e}"));

    let got = client
        .q()
        .read_poisoned(off, len as usize, 0xEE)
        .expect("read");
    assert!(
        got.iter().all(|&b| b == 0),
        "discarded range (discard=unmap on a file) should read back as zeroes"
    );
    assert!(
        img.is_hole(off, len),
        "no hole in the host file at {off}..{}: SEEK_DATA({off}) = {:?}",
        off + len,
        img.seek_data(off)
    );
    let after = img.allocated_bytes();
    assert!(
        after <= before - len,
        "host file allocation did not shrink by the discarded length: {before} -> {after}"
    );
    // Data around the discarded range is untouched.
    let edge = client.q().read(off - 4096, 4096).expect("read before");
    assert!(
        edge.iter().all(|&b| b == 0xAB),
        "data before the discard changed"
    );
    let edge = client.q().read(off + len, 4096).expect("read after");
    assert!(
        edge.iter().all(|&b| b == 0xAB),
        "data after the discard changed"
    );
    assert!(!img.is_hole(off - 4096, 4096) && !img.is_hole(off + len, 4096));

    // Unaligned-to-4k but sector-aligned discard, and a write into a discarded range.
    client
        .q()
        .discard(9 * MIB + 512, 3 * 512)
        .expect("small discard");
    let d = vec![0x11u8; 8192];
    client.q().write(off + 8192, &d).expect("write into hole");
    client.q().flush().expect("flush");
    assert_same_data("write into hole", &img.read_at(off + 8192, 8192), &d);
    let got = client.q().read(off, 8192).expect("read");
    assert!(got.iter().all(|&b| b == 0));
}

#[test]
fn discard_ignore_keeps_blocks() {
    let (_dir, img, _daemon, mut client) = setup(",discard=ignore");
    let before = img.allocated_bytes();
    // The device may not offer DISCARD at all (libblkio then fails with -ENOTSUP locally);
    // if it does, the request succeeds and nothing is deallocated.
    match client.q().discard(4 * MIB, 2 * MIB) {
        Ok(()) => {}
        Err(e) if e == -libc::ENOTSUP || e == -libc::EOPNOTSUPP => {}
        Err(e) => panic!("discard with discard=ignore failed: {e}"),
    }
    assert_eq!(
        img.allocated_bytes(),
        before,
        "discard=ignore must not deallocate"
    );
    assert!(!img.is_hole(4 * MIB, 2 * MIB));
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let (_dir, img, _daemon, mut client) = setup(",discard=unmap");
    assert!(
        client.prop_u64("max-write-zeroes-len") > 0,
        "device should offer WRITE_ZEROES (max-write-zeroes-len is 0)"
    );

    // May unmap.
    let (off, len) = (2 * MIB, MIB);
    client
        .q()
        .write_zeroes(off, len, ReqFlags::empty())
        .unwrap_or_else(|e| panic!("write_zeroes (unmap allowed) failed: {e}"));
    let got = client
        .q()
        .read_poisoned(off, len as usize, 0xEE)
        .expect("read");
    assert!(got.iter().all(|&b| b == 0), "write_zeroes range not zero");
    assert!(
        img.read_at(off, len as usize).iter().all(|&b| b == 0),
        "host file not zero after write_zeroes"
    );

    // Must not unmap: the blocks stay allocated.
    // (Not SEEK_DATA: tmpfs reports fallocated but unwritten pages as holes.)
    let before = img.allocated_bytes();
    let (off, len) = (6 * MIB, MIB);
    client
        .q()
        .write_zeroes(off, len, ReqFlags::NO_UNMAP)
        .unwrap_or_else(|e| panic!("write_zeroes NO_UNMAP failed: {e}"));
    let got = client
        .q()
        .read_poisoned(off, len as usize, 0xEE)
        .expect("read");
    assert!(
        got.iter().all(|&b| b == 0),
        "write_zeroes NO_UNMAP range not zero"
    );
    assert!(img.read_at(off, len as usize).iter().all(|&b| b == 0));
    assert!(
        img.allocated_bytes() >= before,
        "write_zeroes with NO_UNMAP deallocated blocks ({before} -> {} bytes)",
        img.allocated_bytes()
    );

    // Small, sector-granular write_zeroes leaves neighbours intact.
    client
        .q()
        .write_zeroes(10 * MIB + 512, 512, ReqFlags::empty())
        .expect("small write_zeroes");
    let got = client.q().read(10 * MIB, 1536).expect("read");
    assert!(got[..512].iter().all(|&b| b == 0xAB));
    assert!(got[512..1024].iter().all(|&b| b == 0));
    assert!(got[1024..].iter().all(|&b| b == 0xAB));

    // FUA write_zeroes.
    client
        .q()
        .write_zeroes(12 * MIB, 4096, ReqFlags::FUA)
        .expect("write_zeroes FUA");
    assert!(img.read_at(12 * MIB, 4096).iter().all(|&b| b == 0));
}

#[test]
fn discard_and_write_zeroes_on_read_zeroes_null_device() {
    let dir = TempDir::new("vubd-t");
    let sock = dir.join("vubd.sock");
    let args = vubd_tests::DaemonArgs::new()
        .blockdev("driver=null-co,node-name=null0,size=67108864,read-zeroes=on")
        .vhost_user_blk("null0", &sock, ",writable=on")
        .build();
    let daemon = Daemon::start(&args);
    let mut client = Client::connect(daemon.socket(), 1);
    let mut rng = Rng::new("null discard");
    let d = rng.bytes(4096);
    client.q().write(0, &d).expect("write to null-co");
    client
        .q()
        .write_zeroes(0, MIB, ReqFlags::empty())
        .expect("write_zeroes");
    match client.q().discard(0, MIB) {
        Ok(()) => {}
        Err(e) if e == -libc::ENOTSUP => {}
        Err(e) => panic!("discard on null-co: {e}"),
    }
    let got = client.q().read_poisoned(0, 4096, 0xEE).expect("read");
    assert!(got.iter().all(|&b| b == 0));
}

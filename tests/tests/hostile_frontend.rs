//! A hostile or broken vhost-user frontend must not hurt vubd (issue 10).
//!
//! Every case runs in [`Harness`] (tests/src/hostile.rs): one vubd with export A, which a
//! hand-written frontend (tests/src/vu_frontend.rs) attacks, and export B, which a libblkio
//! client reads at random meanwhile. Besides the guest-visible result each test checks
//! itself (IOERR or UNSUPP in the status byte, or a stopped queue with the used ring
//! untouched), `Harness::finish` asserts that the daemon is alive, that B kept 80% of its
//! IOPS (relative to a control daemon, see tests/src/hostile.rs), that vubd's CPU use
//! after the attack is bounded, that its anonymous memory and open fds are bounded, and
//! that its log is rate-limited.
//!
//! Run with `cargo test -p vubd-tests --test hostile_frontend -- --nocapture` to see the
//! figures of each case.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vubd_tests::hostile::{pattern, ANode, Checks, Dev, DevOpts, Harness, Outcome, STATUS_CANARY};
use vubd_tests::raw::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vubd_tests::vu_frontend::{
    config_payload, encode, feat, header, mem_table_payload, new_eventfd, proto, req, vring_state,
    write_table, Desc, Frontend, HandshakeOpts, MemRegion, RegionDesc, VuError, DESC_LEN,
    FLAG_NEED_REPLY, FLAG_REPLY, VRING_NOFD,
};
use vubd_tests::{assert_same_data, run_to_exit, vubd_bin, Rng, TempDir, TempImage, MIB};

fn shm(size: u64) -> ANode {
    ANode::ShmFile { size }
}

fn r(addr: u64, len: u32) -> Desc {
    Desc::readable(addr, len)
}

fn w(addr: u64, len: u32) -> Desc {
    Desc::writable(addr, len)
}

/// Issue item 1: `avail.idx` 200 entries ahead of the device's position on a 16-entry
/// ring, then a kick. The device must not spin (nor log on every pass); the queue stops
/// with the used ring untouched.
#[test]
fn avail_idx_far_ahead() {
    let mut h = Harness::start("avail_idx_far_ahead", shm(16 * MIB), "", false);
    let mut dev = h.dev(&DevOpts::default());
    dev.assert_read_ok(0, 4096, true);
    let used = dev.q.used_idx();
    let ring_before = dev.mem().read(dev.q.layout.used + 4, 8 * 16);
    let idx = dev.q.avail_idx().wrapping_add(200);
    dev.q.set_avail_idx(idx);
    dev.q.kick();
    std::thread::sleep(Duration::from_millis(200));
    h.measure_attack();
    dev.q.kick();
    let cpu = h.measure_quiet_cpu();
    eprintln!(
        "  vubd CPU with avail.idx 200 ahead: {cpu:.2} cores; error eventfd signalled: {}",
        dev.q.take_err()
    );
    assert_eq!(
        dev.q.used_idx(),
        used,
        "the device used entries of a ring whose avail.idx is 200 ahead"
    );
    assert_eq!(
        dev.mem().read(dev.q.layout.used + 4, 8 * 16),
        ring_before,
        "the used ring changed"
    );
    drop(dev);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
}

/// Issue item 2: `num-queues=2`, the frontend starts only queue 0 and negotiates no
/// EVENT_IDX (as QEMU does for a guest that sets up fewer queues). Queue 1's ring
/// addresses are their defaults, guest physical 0: nothing may be read or written there.
/// A memory region at GPA 0 holds a canary; queue 0's descriptor table lies elsewhere
/// and must stay as the frontend wrote it; requests on queue 0 succeed.
#[test]
fn unstarted_queue_is_never_touched() {
    let mut h = Harness::start(
        "unstarted_queue_is_never_touched",
        shm(16 * MIB),
        ",num-queues=2",
        false,
    );
    let opts = DevOpts {
        regions: vec![(MIB, 16 * MIB), (0, 64 * 1024)],
        start_queue: false,
        ..DevOpts::default()
    };
    let mut dev = h.dev(&opts);
    assert_eq!(dev.fe.acked & feat::RING_EVENT_IDX, 0);
    assert_eq!(dev.cfg.num_queues, 2);
    dev.mem().fill(0, 64 * 1024, 0xA5);
    dev.start_queue().expect("start queue 0");
    let mut rng = Rng::new("unstarted_queue_is_never_touched");
    let mut written = Vec::new();
    for i in 0..6u64 {
        let data = rng.bytes(4096);
        let hd = dev.header(VIRTIO_BLK_T_OUT, 64 + i * 8);
        let d = dev.buffer(4096, 4096, 0, 0);
        dev.mem().write(d, &data);
        let s = dev.status();
        let head = dev.submit_chain(&[r(hd, 16), r(d, 4096), w(s, 1)]);
        let (_, st) = dev
            .wait(head, s, Duration::from_secs(5))
            .expect("a write on queue 0 did not complete");
        assert_eq!(st, VIRTIO_BLK_S_OK, "write {i} on queue 0: status {st}");
        written.push(data);
    }
    for i in 0..6u64 {
        let (head, d, s) = dev.read(64 + i * 8, 4096);
        let (_, st) = dev
            .wait(head, s, Duration::from_secs(5))
            .expect("a read on queue 0 did not complete");
        assert_eq!(st, VIRTIO_BLK_S_OK, "read {i} on queue 0: status {st}");
        assert_same_data("read back", &dev.mem().read(d, 4096), &written[i as usize]);
    }
    let table = dev.q.desc_table_bytes();
    dev.assert_read_ok(0, 512, true);
    let mut expected = table.clone();
    // The last read took three more slots; compare what the frontend wrote.
    let now = dev.q.desc_table_bytes();
    for (i, chunk) in now.chunks(16).enumerate() {
        let d = Desc::from_bytes(chunk);
        let was = Desc::from_bytes(&table[i * 16..i * 16 + 16]);
        if d != was {
            expected[i * 16..i * 16 + 16].copy_from_slice(chunk);
        }
    }
    h.measure_attack();
    h.measure_quiet_cpu();
    let canary = dev.mem().read(0, 64 * 1024);
    let bad = canary.iter().position(|&b| b != 0xA5);
    assert!(
        bad.is_none(),
        "the daemon wrote guest memory at GPA {:#x} (queue 1 was never started): {:02x?}",
        bad.unwrap_or(0),
        &canary[..16]
    );
    assert_eq!(expected, now, "queue 0's descriptor table changed");
    drop(dev);
    let img = h.img_a.as_ref().expect("image");
    for (i, data) in written.iter().enumerate() {
        assert_same_data("image", &img.read_at((64 + i as u64 * 8) * 512, 4096), data);
    }
    h.finish();
}

/// Issue item 3: eight 64 MiB reads into one guest buffer at an odd address on a
/// `cache.direct=on` file, all at once: vubd must bounce them through bounded memory
/// (64 MiB per iothread, in pieces of at most 1 MiB), and the data must read back right.
#[test]
fn misaligned_large_reads_have_bounded_memory() {
    const LEN: u64 = 64 * MIB;
    let mut h = Harness::start(
        "misaligned_large_reads_have_bounded_memory",
        ANode::DirectFile { size: LEN },
        "",
        false,
    );
    // The bounce bound, plus room for everything else.
    h.limits.max_rss_growth = 64 * MIB + 48 * MIB;
    let opts = DevOpts {
        regions: vec![(MIB, LEN + 16 * MIB)],
        queue_size: 512,
        ..DevOpts::default()
    };
    let mut dev = h.dev(&opts);
    let size_max = u64::from(dev.cfg.size_max) / 512 * 512;
    assert!(size_max >= 512, "size_max {}", dev.cfg.size_max);
    let pieces = LEN.div_ceil(size_max);
    assert!(
        pieces <= u64::from(dev.cfg.seg_max),
        "{pieces} segments of {size_max} bytes exceed seg_max {}",
        dev.cfg.seg_max
    );
    let buf = dev.buffer(LEN, 4096, 1, 0x99);
    let mut heads = Vec::new();
    for _ in 0..8 {
        let hd = dev.header(VIRTIO_BLK_T_IN, 0);
        let s = dev.status();
        let mut descs = vec![r(hd, 16)];
        let mut off = 0;
        while off < LEN {
            let n = size_max.min(LEN - off);
            descs.push(w(buf + off, n as u32));
            off += n;
        }
        descs.push(w(s, 1));
        heads.push((dev.submit_chain(&descs), s));
    }
    let t = Instant::now();
    h.measure_attack();
    for (head, s) in heads {
        let (used, st) = dev
            .wait(head, s, Duration::from_secs(60))
            .expect("a large read did not complete within 60 s");
        assert_eq!(st, VIRTIO_BLK_S_OK, "large misaligned read: status {st}");
        assert_eq!(u64::from(used.len), LEN + 1);
    }
    eprintln!(
        "  8 x 64 MiB misaligned reads in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let mut off = 0;
    while off < LEN {
        let n = (4 * MIB).min(LEN - off);
        assert_same_data(
            "large misaligned read",
            &dev.mem().read(buf + off, n as usize),
            &pattern(off, n as usize),
        );
        off += n;
    }
    drop(dev);
    h.finish();
}

/// Issue item 3: requests beyond the limits the config space advertises are refused with
/// IOERR: a data descriptor longer than `size_max`, more data segments than `seg_max`
/// (directly and in an indirect table). Requests exactly at the limits succeed.
#[test]
fn requests_beyond_advertised_limits() {
    let mut h = Harness::start(
        "requests_beyond_advertised_limits",
        shm(16 * MIB),
        ",queue-size=16",
        false,
    );
    let mut c = Checks::default();
    let mut dev = h.dev(&DevOpts {
        regions: vec![(MIB, 32 * MIB)],
        ..DevOpts::default()
    });
    let size_max = dev.cfg.size_max;
    let seg_max = dev.cfg.seg_max as u16;
    eprintln!("  size_max {size_max}, seg_max {seg_max}");
    assert!(
        size_max >= 4096 && size_max.is_multiple_of(512),
        "size_max {size_max}"
    );
    assert!(
        seg_max + 2 <= 16,
        "seg_max {seg_max} leaves no room for a chain with more segments on a 16-entry ring"
    );
    // Exactly size_max in one descriptor: fine.
    dev.assert_read_ok(0, size_max, true);
    // One descriptor longer than size_max.
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let d = dev.buffer(u64::from(size_max) + 512, 4096, 0, 0x99);
    let s = dev.status();
    let o = dev.probe_chain(&[r(hd, 16), w(d, size_max + 512), w(s, 1)], s);
    c.status(
        &format!(
            "a {}-byte data descriptor (size_max {size_max})",
            size_max + 512
        ),
        o,
        VIRTIO_BLK_S_IOERR,
    );
    // The same as a write: refused, the image unchanged.
    dev.mem().fill(d, size_max as usize + 512, 0xD7);
    let hd = dev.header(VIRTIO_BLK_T_OUT, 0);
    let s = dev.status();
    let o = dev.probe_chain(&[r(hd, 16), r(d, size_max + 512), w(s, 1)], s);
    c.status(
        &format!("a write with a {}-byte data descriptor", size_max + 512),
        o,
        VIRTIO_BLK_S_IOERR,
    );
    let img = h.img_a.as_ref().expect("image");
    assert_same_data(
        "image after a refused write",
        &img.read_at(0, size_max as usize + 512),
        &pattern(0, size_max as usize + 512),
    );
    // seg_max data segments (apart from each other): fine.
    let segs = |dev: &mut Dev, n: u16| -> Vec<u64> {
        (0..n).map(|_| dev.buffer(512, 4096, 0, 0x99)).collect()
    };
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let s = dev.status();
    let bufs = segs(&mut dev, seg_max);
    let mut descs = vec![r(hd, 16)];
    descs.extend(bufs.iter().map(|&b| w(b, 512)));
    descs.push(w(s, 1));
    let o = dev.probe_chain(&descs, s);
    c.status(
        &format!("{seg_max} data segments (= seg_max)"),
        o,
        VIRTIO_BLK_S_OK,
    );
    // seg_max + 1 data segments: the last one also carries the status byte, so that the
    // chain fits the ring.
    let build = |dev: &mut Dev| -> (Vec<Desc>, u64) {
        let hd = dev.header(VIRTIO_BLK_T_IN, 0);
        let bufs = segs(dev, seg_max);
        let last = dev.buffer(513, 4096, 0, 0x99);
        dev.mem().fill(last + 512, 1, STATUS_CANARY);
        let mut descs = vec![r(hd, 16)];
        descs.extend(bufs.iter().map(|&b| w(b, 512)));
        descs.push(w(last, 513));
        (descs, last + 512)
    };
    let (descs, s) = build(&mut dev);
    let o = dev.probe_chain(&descs, s);
    c.status(
        &format!("{} data segments (seg_max {seg_max})", seg_max + 1),
        o,
        VIRTIO_BLK_S_IOERR,
    );
    // The same chain in an indirect table.
    let (descs, s) = build(&mut dev);
    let table = dev.heap.alloc(DESC_LEN * descs.len() as u64, 16);
    write_table(
        dev.mem(),
        table,
        &vubd_tests::vu_frontend::linked(&descs, 0),
    );
    let o = dev.probe_chain(&[Desc::indirect(table, descs.len() as u32)], s);
    c.status(
        &format!(
            "{} data segments in an indirect table (seg_max {seg_max})",
            seg_max + 1
        ),
        o,
        VIRTIO_BLK_S_IOERR,
    );
    h.measure_attack();
    drop(dev);
    h.finish();
    c.assert_all();
}

/// Submits a 4 KiB write at `sector` that blkdebug fails once, waits until `werror=stop`
/// holds it, and stops the ring with GET_VRING_BASE, which must be answered within a
/// second. Returns (head, avail position, status address, base, whether it completed).
fn hold_write_and_stop_ring(
    h: &mut Harness,
    dev: &mut Dev,
    sector: u64,
    data: &[u8],
) -> (u16, u16, u64, u32, bool) {
    let pos = dev.q.avail_idx();
    let hd = dev.header(VIRTIO_BLK_T_OUT, sector);
    let d = dev.buffer(4096, 4096, 0, 0);
    dev.mem().write(d, data);
    let s = dev.status();
    let head = dev.submit_chain(&[r(hd, 16), r(d, 4096), w(s, 1)]);
    h.wait_event("BLOCK_IO_ERROR", Duration::from_secs(10))
        .expect("no BLOCK_IO_ERROR for the injected write error");
    assert!(
        dev.wait(head, s, Duration::from_millis(200)).is_none(),
        "the failed write completed although werror=stop"
    );
    dev.fe.conn.timeout = Duration::from_secs(1);
    let t = Instant::now();
    let base = dev.fe.get_vring_base(0);
    let took = t.elapsed();
    dev.fe.conn.timeout = Duration::from_secs(5);
    let base = base.unwrap_or_else(|e| {
        panic!("GET_VRING_BASE with a held write: {e} (after {took:?}; at most 1 s allowed)")
    });
    eprintln!("  GET_VRING_BASE answered in {took:?}: base {base}");
    assert!(
        took <= Duration::from_secs(1),
        "GET_VRING_BASE took {took:?}"
    );
    let done = match dev.wait(head, s, Duration::from_millis(50)) {
        Some((used, st)) => {
            eprintln!("  the held write completed before the reply: {used:?}, status {st}");
            assert!(
                st == VIRTIO_BLK_S_OK || st == VIRTIO_BLK_S_IOERR,
                "the held write completed with status {st}"
            );
            true
        }
        None => false,
    };
    (head, pos, s, base, done)
}

/// Issue item 4: `werror=stop` holds a failed write; GET_VRING_BASE on its queue (a guest
/// reset, QEMU stopping the device) must be answered within a second, and the write must
/// not be lost:
/// * without in-flight tracking, it completes (OK or IOERR) before the reply, or the
///   returned base hands it back (the frontend offers it again);
/// * with in-flight tracking (INFLIGHT_SHMFD, as QEMU uses it), it completes, or stays
///   marked in the inflight region; once `cont` is given and the ring restarts, the
///   daemon runs it again and the data reaches the image.
///
/// Nothing is pushed to a ring after it was stopped.
#[test]
fn held_write_does_not_block_get_vring_base() {
    let rules = ",inject-error.0.event=write_aio,inject-error.0.errno=5,inject-error.0.once=on,\
                 inject-error.0.sector=8,inject-error.0.iotype=write,\
                 inject-error.1.event=write_aio,inject-error.1.errno=5,inject-error.1.once=on,\
                 inject-error.1.sector=64,inject-error.1.iotype=write";
    let mut h = Harness::start(
        "held_write_does_not_block_get_vring_base",
        ANode::Blkdebug {
            size: 16 * MIB,
            rules: rules.into(),
        },
        ",werror=stop",
        true,
    );
    let mut rng = Rng::new("held_write_does_not_block_get_vring_base");
    // Without in-flight tracking.
    let mut dev = h.dev(&DevOpts::default());
    let data = rng.bytes(4096);
    let (_, pos, _, base, done) = hold_write_and_stop_ring(&mut h, &mut dev, 8, &data);
    // Checked at the end, so that the in-flight case below runs (and reports) too.
    let lost = (!done && base as u16 != pos).then(|| {
        format!(
            "without in-flight tracking, the held write neither completed nor was handed \
             back (GET_VRING_BASE returned {base}, the write was avail entry {pos}): it is \
             lost"
        )
    });
    let used = dev.q.used_idx();
    h.qmp
        .as_mut()
        .expect("monitor")
        .ok("cont", serde_json::json!({}));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        dev.q.used_idx(),
        used,
        "the device used a ring after GET_VRING_BASE"
    );
    drop(dev);

    // With in-flight tracking.
    let mut opts = DevOpts {
        start_queue: false,
        ..DevOpts::default()
    };
    opts.handshake.protocol |= proto::INFLIGHT_SHMFD;
    let mut dev = h.dev(&opts);
    assert!(
        dev.fe.protocol & proto::INFLIGHT_SHMFD != 0,
        "INFLIGHT_SHMFD is not offered"
    );
    let inflight = dev.fe.get_inflight_fd(1, 16).expect("GET_INFLIGHT_FD");
    dev.fe.set_inflight_fd(&inflight).expect("SET_INFLIGHT_FD");
    dev.start_queue().expect("start queue 0");
    let data = rng.bytes(4096);
    let (head, _, s, base, done) = hold_write_and_stop_ring(&mut h, &mut dev, 64, &data);
    if !done {
        assert!(
            inflight.is_inflight(0, head),
            "the held write neither completed nor is marked in the inflight region: it \
             is lost"
        );
        let used = dev.q.used_idx();
        h.qmp
            .as_mut()
            .expect("monitor")
            .ok("cont", serde_json::json!({}));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            dev.q.used_idx(),
            used,
            "the device used a ring after GET_VRING_BASE"
        );
        // Restart the ring: the daemon runs the held write again.
        dev.fe.setup_queue(&dev.q, base).expect("restart queue 0");
        let (used, st) = dev
            .wait(head, s, Duration::from_secs(5))
            .expect("the held write did not run after cont and a ring restart");
        assert_eq!(st, VIRTIO_BLK_S_OK, "the held write after cont: {used:?}");
        let img = h.img_a.as_ref().expect("image");
        assert_same_data("held write", &img.read_at(64 * 512, 4096), &data);
    } else {
        h.qmp
            .as_mut()
            .expect("monitor")
            .ok("cont", serde_json::json!({}));
    }
    h.measure_attack();
    drop(dev);
    drop(inflight);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
    if let Some(e) = lost {
        panic!("{e}");
    }
}

/// A frontend hands back a corrupt inflight region on reconnect (garbage; every
/// descriptor marked with loops in `next`; a bogus header), over a descriptor table of
/// garbage: the daemon resubmits nothing invalid, does not crash or spin, and serves the
/// next frontend.
#[test]
fn corrupt_inflight_region_on_reconnect() {
    let mut h = Harness::start(
        "corrupt_inflight_region_on_reconnect",
        shm(16 * MIB),
        "",
        false,
    );
    let mut opts = DevOpts {
        start_queue: false,
        ..DevOpts::default()
    };
    opts.handshake.protocol |= proto::INFLIGHT_SHMFD;
    let mut dev = h.dev(&opts);
    let regions = dev.mem().regions().to_vec();
    let inflight = dev.fe.get_inflight_fd(1, 16).expect("GET_INFLIGHT_FD");
    dev.fe.set_inflight_fd(&inflight).expect("SET_INFLIGHT_FD");
    dev.start_queue().expect("start queue 0");
    dev.assert_read_ok(0, 4096, true);
    drop(dev);
    let mut rng = Rng::with_seed(0x1F11);
    let len = inflight.size as usize;
    type Make = Box<dyn Fn(&mut Rng) -> Vec<u8>>;
    let variants: [(&str, Make); 3] = [
        ("random bytes", Box::new(move |rng| rng.bytes(len))),
        (
            "every descriptor in flight, next pointing at itself",
            Box::new(move |rng| {
                let mut b = vec![0u8; len];
                b[8..10].copy_from_slice(&1u16.to_le_bytes());
                b[10..12].copy_from_slice(&16u16.to_le_bytes());
                b[14..16].copy_from_slice(&(rng.next_u64() as u16).to_le_bytes());
                for i in 0..16usize {
                    let at = 16 + 16 * i;
                    b[at] = 1;
                    b[at + 6..at + 8].copy_from_slice(&(i as u16).to_le_bytes());
                    b[at + 8..at + 16].copy_from_slice(&7u64.to_le_bytes());
                }
                b
            }),
        ),
        (
            "bogus header",
            Box::new(move |_| {
                let mut b = vec![0xFFu8; len];
                b[0..16].copy_from_slice(&[0xFF; 16]);
                b
            }),
        ),
    ];
    for (what, make) in variants.iter() {
        inflight.write(0, &make(&mut rng));
        let dev = Dev::connect_mem(&h.sock_a, &opts, regions.clone())
            .unwrap_or_else(|e| panic!("{what}: reconnect: {e}"));
        // Garbage in the descriptor table and the available ring.
        for i in 0..16 {
            dev.q.write_desc(
                i,
                Desc {
                    addr: rng.next_u64() >> rng.range(0, 64),
                    len: rng.next_u64() as u32,
                    flags: rng.range(0, 8) as u16,
                    next: rng.range(0, 20) as u16,
                },
            );
        }
        let set = dev.fe.set_inflight_fd(&inflight);
        let start = dev.fe.setup_queue(&dev.q, rng.range(0, 65536) as u32);
        dev.q.kick();
        std::thread::sleep(Duration::from_millis(200));
        eprintln!(
            "  {what}: SET_INFLIGHT_FD {set:?}, queue start {start:?}, used.idx {}",
            dev.q.used_idx()
        );
        h.daemon.assert_running(what);
        drop(dev);
    }
    h.measure_attack();
    h.measure_quiet_cpu();
    drop(inflight);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
}

/// Loops: in the descriptor table (data and status pointing at each other, a status
/// pointing at itself, the last descriptor pointing back at the head) and inside an
/// indirect table. Each is refused (IOERR at the status byte, or the queue stops).
#[test]
fn descriptor_loops() {
    let mut h = Harness::start("descriptor_loops", shm(16 * MIB), "", false);
    let mut c = Checks::default();
    type Build = fn(u64, u64, u64, u16) -> Vec<(u16, Desc)>;
    let direct: [(&str, Build); 3] = [
        ("data and status loop", |hd, d, s, b| {
            vec![
                (b, r(hd, 16).then(b + 1)),
                (b + 1, w(d, 512).then(b + 2)),
                (b + 2, w(s, 1).then(b + 1)),
            ]
        }),
        ("status points at itself", |hd, d, s, b| {
            vec![
                (b, r(hd, 16).then(b + 1)),
                (b + 1, w(d, 512).then(b + 2)),
                (b + 2, w(s, 1).then(b + 2)),
            ]
        }),
        ("last points back at the head", |hd, d, s, b| {
            vec![
                (b, r(hd, 16).then(b + 1)),
                (b + 1, w(d, 512).then(b + 2)),
                (b + 2, w(s, 1).then(b)),
            ]
        }),
    ];
    for (what, build) in direct {
        let mut dev = h.dev(&DevOpts::default());
        let hd = dev.header(VIRTIO_BLK_T_IN, 0);
        let d = dev.buffer(512, 512, 0, 0x99);
        let s = dev.status();
        let b = dev.desc_slots(3);
        dev.submit_table(&build(hd, d, s, b), b);
        let o = dev.observe(b, s);
        c.refused(what, o);
    }
    // A loop inside an indirect table of three entries.
    let mut dev = h.dev(&DevOpts::default());
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let d = dev.buffer(512, 512, 0, 0x99);
    let s = dev.status();
    let table = dev.heap.alloc(3 * DESC_LEN, 16);
    write_table(
        dev.mem(),
        table,
        &[r(hd, 16).then(1), w(d, 512).then(2), w(s, 1).then(1)],
    );
    let o = dev.probe_chain(&[Desc::indirect(table, 3)], s);
    c.refused("loop in an indirect table", o);
    h.measure_attack();
    drop(dev);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
    c.assert_all();
}

/// Chains longer than the queue size, and a chain whose last `next` points past the
/// table. A chain of exactly the queue size is valid. So is an indirect table longer
/// than the ring but within the device's `seg_max`: Linux sizes its indirect tables by
/// `seg_max`, which exceeds QEMU's 128-entry vhost-user-blk rings, and QEMU's own
/// virtio devices accept them. A table longer than both the ring and what a request
/// may have is refused.
#[test]
fn chains_longer_than_the_queue() {
    let mut h = Harness::start("chains_longer_than_the_queue", shm(16 * MIB), "", false);
    let mut c = Checks::default();
    let mut dev = h.dev(&DevOpts::default());
    let chain = |dev: &mut Dev, data: u16| -> (Vec<Desc>, u64, Vec<u64>) {
        let hd = dev.header(VIRTIO_BLK_T_IN, 0);
        let bufs: Vec<u64> = (0..data).map(|_| dev.buffer(512, 512, 0, 0x99)).collect();
        let s = dev.status();
        let mut descs = vec![r(hd, 16)];
        descs.extend(bufs.iter().map(|&b| w(b, 512)));
        descs.push(w(s, 1));
        (descs, s, bufs)
    };
    // 16 descriptors on a 16-entry ring: valid.
    let (descs, s, bufs) = chain(&mut dev, 14);
    let o = dev.probe_chain(&descs, s);
    c.status("a chain of exactly the queue size", o, VIRTIO_BLK_S_OK);
    let got: Vec<u8> = bufs.iter().flat_map(|&b| dev.mem().read(b, 512)).collect();
    assert_same_data("16-descriptor read", &got, &pattern(0, 14 * 512));
    // 17 entries in an indirect table: within seg_max (1022 at the default
    // queue-size), served as QEMU serves it.
    let (descs, s, _) = chain(&mut dev, 15);
    let table = dev.heap.alloc(DESC_LEN * 17, 16);
    write_table(
        dev.mem(),
        table,
        &vubd_tests::vu_frontend::linked(&descs, 0),
    );
    let o = dev.probe_chain(&[Desc::indirect(table, 17)], s);
    c.status(
        "17-entry indirect table on a 16-entry ring, within seg_max",
        o,
        VIRTIO_BLK_S_OK,
    );
    // 2048 entries: more than the ring and than seg_max + 2 allow.
    let (descs, s, _) = chain(&mut dev, 15);
    let table = dev.heap.alloc(DESC_LEN * 2048, 16);
    write_table(
        dev.mem(),
        table,
        &vubd_tests::vu_frontend::linked(&descs, 0),
    );
    let o = dev.probe_chain(&[Desc::indirect(table, 2048)], s);
    c.refused("2048-entry indirect table", o);
    drop(dev);
    // The status descriptor has NEXT to index 200 of a 16-entry table.
    let mut dev = h.dev(&DevOpts::default());
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let d = dev.buffer(512, 512, 0, 0x99);
    let s = dev.status();
    let b = dev.desc_slots(3);
    dev.submit_table(
        &[
            (b, r(hd, 16).then(b + 1)),
            (b + 1, w(d, 512).then(b + 2)),
            (b + 2, w(s, 1).then(200)),
        ],
        b,
    );
    let o = dev.observe(b, s);
    c.refused("next index past the descriptor table", o);
    drop(dev);
    // The same inside an indirect table: next past the table's end.
    let mut dev = h.dev(&DevOpts::default());
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let d = dev.buffer(512, 512, 0, 0x99);
    let s = dev.status();
    let table = dev.heap.alloc(3 * DESC_LEN, 16);
    write_table(
        dev.mem(),
        table,
        &[r(hd, 16).then(1), w(d, 512).then(2), w(s, 1).then(3)],
    );
    let o = dev.probe_chain(&[Desc::indirect(table, 3)], s);
    c.refused("next index past an indirect table", o);
    h.measure_attack();
    drop(dev);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
    c.assert_all();
}

/// Zero-length descriptors. A zero-length data descriptor in an otherwise valid read
/// may be skipped (OK, right data) or refused; a chain whose header bytes are all in
/// zero-length descriptors is refused; a zero-length status descriptor cannot carry a
/// status, so the device must not claim data was transferred (used length at most 1)
/// or it stops the queue.
#[test]
fn zero_length_descriptors() {
    let mut h = Harness::start("zero_length_descriptors", shm(16 * MIB), "", false);
    let mut c = Checks::default();
    // A zero-length data descriptor between header and data.
    let mut dev = h.dev(&DevOpts::default());
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let z = dev.buffer(512, 512, 0, 0x99);
    let d = dev.buffer(512, 512, 0, 0x99);
    let s = dev.status();
    let o = dev.probe_chain(&[r(hd, 16), w(z, 0), w(d, 512), w(s, 1)], s);
    match o {
        Outcome::Completed {
            status: VIRTIO_BLK_S_OK,
            ..
        } => assert_same_data(
            "read around a zero-length descriptor",
            &dev.mem().read(d, 512),
            &pattern(0, 512),
        ),
        other => c.refused("zero-length data descriptor", other),
    }
    drop(dev);
    // The header in a zero-length descriptor.
    let mut dev = h.dev(&DevOpts::default());
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let d = dev.buffer(512, 512, 0, 0x99);
    let s = dev.status();
    let o = dev.probe_chain(&[r(hd, 0), w(d, 512), w(s, 1)], s);
    c.refused("zero-length header descriptor", o);
    drop(dev);
    // A zero-length status descriptor after a data buffer.
    let mut dev = h.dev(&DevOpts::default());
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let d = dev.buffer(512, 512, 0, 0x99);
    let s = dev.status();
    let o = dev.probe_chain(&[r(hd, 16), w(d, 512), w(s, 0)], s);
    eprintln!("  zero-length status descriptor");
    match o {
        Outcome::Completed { used, status } => {
            assert_eq!(
                status, STATUS_CANARY,
                "the device wrote a zero-length descriptor"
            );
            assert!(
                used.len <= 1,
                "zero-length status: the device claims {} bytes written",
                used.len
            );
        }
        Outcome::Stopped { .. } => {}
        Outcome::Dropped => panic!("a request with a zero-length status was dropped silently"),
    }
    drop(dev);
    // Every descriptor zero-length.
    let mut dev = h.dev(&DevOpts::default());
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let d = dev.buffer(512, 512, 0, 0x99);
    let s = dev.status();
    let o = dev.probe_chain(&[r(hd, 0), w(d, 0), w(s, 0)], s);
    eprintln!("  all descriptors zero-length");
    match o {
        Outcome::Completed { used, status } => {
            assert_eq!(status, STATUS_CANARY);
            assert_eq!(
                used.len, 0,
                "nothing could be written, yet used.len {}",
                used.len
            );
        }
        Outcome::Stopped { .. } => {}
        Outcome::Dropped => panic!("an all-zero-length chain was dropped silently"),
    }
    h.measure_attack();
    drop(dev);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
    c.assert_all();
}

/// Indirect tables that are malformed (length not a multiple of 16, zero length),
/// nested (INDIRECT inside a table), outside guest memory, crossing the end of guest
/// memory, or at an address that overflows: each refused. A table referred to by a
/// descriptor that also has WRITE set is valid (the device ignores that flag).
#[test]
fn malformed_indirect_tables() {
    let mut h = Harness::start("malformed_indirect_tables", shm(16 * MIB), "", false);
    let mut c = Checks::default();
    // (what, builds the head descriptor from (valid table of 3 at `t`, its status))
    type HeadFor = fn(u64, &Dev) -> Desc;
    let cases: [(&str, HeadFor); 6] = [
        ("length not a multiple of 16", |t, _| Desc {
            len: 3 * 16 + 8,
            ..Desc::indirect(t, 3)
        }),
        ("zero length", |t, _| Desc::indirect(t, 0)),
        ("outside guest memory", |_, _| {
            Desc::indirect(0x7fff_0000_0000, 3)
        }),
        ("crossing the end of guest memory", |_, dev| {
            let end = dev.mem().regions()[0].end();
            Desc::indirect(end - 16, 3)
        }),
        ("address overflows", |_, _| Desc::indirect(u64::MAX - 15, 3)),
        ("nested", |t, _| Desc::indirect(t + 3 * DESC_LEN, 2)),
    ];
    for (what, head) in cases {
        let mut dev = h.dev(&DevOpts::default());
        let hd = dev.header(VIRTIO_BLK_T_IN, 0);
        let d = dev.buffer(512, 512, 0, 0x99);
        let s = dev.status();
        let t = dev.heap.alloc(5 * DESC_LEN, 16);
        write_table(
            dev.mem(),
            t,
            &[r(hd, 16).then(1), w(d, 512).then(2), w(s, 1)],
        );
        // For "nested": a table whose second entry refers to the first table.
        write_table(
            dev.mem(),
            t + 3 * DESC_LEN,
            &[r(hd, 16).then(1), Desc::indirect(t + DESC_LEN, 2)],
        );
        let desc = head(t, &dev);
        let o = dev.probe_chain(&[desc], s);
        c.refused(&format!("indirect table: {what}"), o);
        drop(dev);
    }
    // WRITE on the descriptor that refers to the table: ignored, the read works.
    let mut dev = h.dev(&DevOpts::default());
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let d = dev.buffer(512, 512, 0, 0x99);
    let s = dev.status();
    let t = dev.heap.alloc(3 * DESC_LEN, 16);
    write_table(
        dev.mem(),
        t,
        &[r(hd, 16).then(1), w(d, 512).then(2), w(s, 1)],
    );
    let mut desc = Desc::indirect(t, 3);
    desc.flags |= vubd_tests::vu_frontend::VIRTQ_DESC_F_WRITE;
    let o = dev.probe_chain(&[desc], s);
    c.status("an indirect descriptor with WRITE set", o, VIRTIO_BLK_S_OK);
    assert_same_data("indirect read", &dev.mem().read(d, 512), &pattern(0, 512));
    h.measure_attack();
    drop(dev);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
    c.assert_all();
}

/// The status byte in a device-readable descriptor: the device must not write it (nor
/// claim data), and a write without any device-writable byte must not be performed.
#[test]
fn status_in_device_readable_descriptor() {
    let mut h = Harness::start(
        "status_in_device_readable_descriptor",
        shm(16 * MIB),
        "",
        false,
    );
    let mut dev = h.dev(&DevOpts::default());
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let d = dev.buffer(512, 512, 0, 0x99);
    let s = dev.status();
    let o = dev.probe_chain(&[r(hd, 16), w(d, 512), r(s, 1)], s);
    eprintln!("  read with a device-readable status");
    match o {
        Outcome::Completed { used, status } => {
            assert_eq!(
                status, STATUS_CANARY,
                "the device wrote a device-readable status byte"
            );
            assert!(
                used.len <= 1,
                "a read with a device-readable status claims {} bytes",
                used.len
            );
        }
        Outcome::Stopped { .. } => {}
        Outcome::Dropped => panic!("the request was dropped silently"),
    }
    drop(dev);
    // A write whose descriptors are all device-readable.
    let mut dev = h.dev(&DevOpts::default());
    let hd = dev.header(VIRTIO_BLK_T_OUT, 0);
    let d = dev.buffer(4096, 512, 0, 0xD7);
    let s = dev.status();
    let o = dev.probe_chain(&[r(hd, 16), r(d, 4096), r(s, 1)], s);
    eprintln!("  write without a writable byte");
    match o {
        Outcome::Completed { used, status } => {
            assert_eq!(status, STATUS_CANARY);
            assert_eq!(used.len, 0);
        }
        Outcome::Stopped { .. } => {}
        Outcome::Dropped => panic!("the request was dropped silently"),
    }
    let img = h.img_a.as_ref().expect("image");
    assert_same_data(
        "image after a write without a status byte",
        &img.read_at(0, 4096),
        &pattern(0, 4096),
    );
    h.measure_attack();
    drop(dev);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
}

/// A header split across descriptors is valid (VIRTIO_F_ANY_LAYOUT is implied by
/// virtio 1.0): reads and writes with the header in pieces, the header sharing a
/// descriptor with data, the status sharing one with data, and the same in an indirect
/// table, all succeed with the right data.
#[test]
fn header_split_across_descriptors() {
    let mut h = Harness::start("header_split_across_descriptors", shm(16 * MIB), "", false);
    let mut c = Checks::default();
    let mut dev = h.dev(&DevOpts::default());
    let mut rng = Rng::new("header_split_across_descriptors");
    // A read: header in three pieces at scattered addresses, data in two, status alone.
    let hdr = vubd_tests::vu_frontend::blk_header(VIRTIO_BLK_T_IN, 16);
    let p: Vec<u64> = [3u64, 5, 8]
        .iter()
        .map(|&n| dev.buffer(n, 64, 7, 0))
        .collect();
    dev.mem().write(p[0], &hdr[0..3]);
    dev.mem().write(p[1], &hdr[3..8]);
    dev.mem().write(p[2], &hdr[8..16]);
    let d1 = dev.buffer(1000, 64, 3, 0x99);
    let d2 = dev.buffer(3096, 64, 1, 0x99);
    let s = dev.status();
    let o = dev.probe_chain(
        &[
            r(p[0], 3),
            r(p[1], 5),
            r(p[2], 8),
            w(d1, 1000),
            w(d2, 3096),
            w(s, 1),
        ],
        s,
    );
    c.status("read with a split header", o, VIRTIO_BLK_S_OK);
    let mut got = dev.mem().read(d1, 1000);
    got.extend(dev.mem().read(d2, 3096));
    assert_same_data("read with a split header", &got, &pattern(16 * 512, 4096));
    // A write: 8 header bytes alone, the other 8 in the same descriptor as the data;
    // the status shares a descriptor with nothing.
    let data = rng.bytes(4096);
    let hdr = vubd_tests::vu_frontend::blk_header(VIRTIO_BLK_T_OUT, 64);
    let a = dev.buffer(8, 64, 0, 0);
    dev.mem().write(a, &hdr[0..8]);
    let b = dev.buffer(8 + 4096, 64, 0, 0);
    dev.mem().write(b, &hdr[8..16]);
    dev.mem().write(b + 8, &data);
    let s = dev.status();
    let o = dev.probe_chain(&[r(a, 8), r(b, 8 + 4096), w(s, 1)], s);
    c.status(
        "write with the header sharing a descriptor with data",
        o,
        VIRTIO_BLK_S_OK,
    );
    let img = h.img_a.as_ref().expect("image");
    assert_same_data("written data", &img.read_at(64 * 512, 4096), &data);
    // A read whose last data bytes and status share one descriptor.
    let hd = dev.header(VIRTIO_BLK_T_IN, 64);
    let ds = dev.buffer(4097, 64, 0, 0x99);
    dev.mem().fill(ds + 4096, 1, STATUS_CANARY);
    let o = dev.probe_chain(&[r(hd, 16), w(ds, 4097)], ds + 4096);
    c.status(
        "read with data and status in one descriptor",
        o,
        VIRTIO_BLK_S_OK,
    );
    assert_same_data("data+status read", &dev.mem().read(ds, 4096), &data);
    // The split-header read in an indirect table.
    let hdr = vubd_tests::vu_frontend::blk_header(VIRTIO_BLK_T_IN, 16);
    let q: Vec<u64> = [2u64, 14]
        .iter()
        .map(|&n| dev.buffer(n, 64, 5, 0))
        .collect();
    dev.mem().write(q[0], &hdr[0..2]);
    dev.mem().write(q[1], &hdr[2..16]);
    let d = dev.buffer(4096, 64, 9, 0x99);
    let s = dev.status();
    let t = dev.heap.alloc(4 * DESC_LEN, 16);
    write_table(
        dev.mem(),
        t,
        &[
            r(q[0], 2).then(1),
            r(q[1], 14).then(2),
            w(d, 4096).then(3),
            w(s, 1),
        ],
    );
    let o = dev.probe_chain(&[Desc::indirect(t, 4)], s);
    c.status("split header in an indirect table", o, VIRTIO_BLK_S_OK);
    assert_same_data(
        "indirect split read",
        &dev.mem().read(d, 4096),
        &pattern(16 * 512, 4096),
    );
    h.measure_attack();
    drop(dev);
    h.finish();
    c.assert_all();
}

/// Descriptors at addresses outside guest memory, including ones where address + length
/// overflows (a status at the top of the address space, data crossing into a hole, a
/// header nowhere, a length sum beyond 4 GiB): refused, and the daemon survives.
#[test]
fn descriptors_outside_guest_memory() {
    let mut h = Harness::start("descriptors_outside_guest_memory", shm(16 * MIB), "", false);
    let mut c = Checks::default();
    let fresh = |h: &Harness| h.dev(&DevOpts::default());
    // Data at the top of the address space.
    let mut dev = fresh(&h);
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let s = dev.status();
    let o = dev.probe_chain(&[r(hd, 16), w(u64::MAX - 255, 512), w(s, 1)], s);
    c.refused("data descriptor wrapping around the address space", o);
    drop(dev);
    // Data crossing the end of guest memory.
    let mut dev = fresh(&h);
    let end = dev.mem().regions()[0].end();
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let s = dev.status();
    let o = dev.probe_chain(&[r(hd, 16), w(end - 256, 512), w(s, 1)], s);
    c.refused("data crossing the end of guest memory", o);
    drop(dev);
    // The header outside guest memory.
    let mut dev = fresh(&h);
    let d = dev.buffer(512, 512, 0, 0x99);
    let s = dev.status();
    let o = dev.probe_chain(&[r(0x7fff_0000_0000, 16), w(d, 512), w(s, 1)], s);
    c.refused("header outside guest memory", o);
    drop(dev);
    // A data length of 4 GiB - 1.
    let mut dev = fresh(&h);
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let d = dev.buffer(512, 512, 0, 0x99);
    let s = dev.status();
    let o = dev.probe_chain(&[r(hd, 16), w(d, u32::MAX), w(s, 1)], s);
    c.refused("4 GiB data descriptor", o);
    drop(dev);
    // Lengths that add up to more than 4 GiB.
    let mut dev = fresh(&h);
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let d = dev.buffer(512, 512, 0, 0x99);
    let s = dev.status();
    let o = dev.probe_chain(
        &[r(hd, 16), w(d, 0x8000_0000), w(d, 0x8000_0000), w(s, 1)],
        s,
    );
    c.refused("data lengths adding up to 4 GiB", o);
    drop(dev);
    // The status byte at the top of the address space (address + length overflows):
    // there is nowhere to put a status; the daemon must survive.
    let mut dev = fresh(&h);
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let d = dev.buffer(512, 512, 0, 0x99);
    let head = dev.submit_chain(&[r(hd, 16), w(d, 512), w(u64::MAX - 7, 16)]);
    let e = dev.q.wait_for_head(head, Duration::from_millis(500));
    eprintln!("  status at the top of the address space: {e:?}");
    h.daemon
        .assert_running("after a status descriptor at the top of the address space");
    h.measure_attack();
    drop(dev);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
    c.assert_all();
}

/// The guest changes headers, data and descriptors while requests are in flight on a
/// slow device: results may be OK or an error, but the daemon must keep working. First
/// a deterministic case (header and data rewritten right after the kick), then a second
/// of random scribbling over in-flight buffers, then a second of random descriptors.
#[test]
fn guest_changes_buffers_in_flight() {
    let mut h = Harness::start(
        "guest_changes_buffers_in_flight",
        ANode::Null {
            size: 64 * MIB,
            latency_ns: 20_000_000,
        },
        "",
        false,
    );
    let mut dev = h.dev(&DevOpts {
        queue_size: 64,
        ..DevOpts::default()
    });
    // Header rewritten (type and sector) and data overwritten right after the kick.
    let hd = dev.header(VIRTIO_BLK_T_OUT, 8);
    let d = dev.buffer(4096, 4096, 0, 0x11);
    let s = dev.status();
    let head = dev.submit_chain(&[r(hd, 16), r(d, 4096), w(s, 1)]);
    std::thread::sleep(Duration::from_millis(2));
    dev.mem()
        .write(hd, &vubd_tests::vu_frontend::blk_header(99, u64::MAX));
    dev.mem().fill(d, 4096, 0x22);
    let (used, st) = dev
        .wait(head, s, Duration::from_secs(5))
        .expect("a request whose buffers changed in flight did not complete");
    // Which header the device sees depends on whether it read the chain before the
    // rewrite: the write as sent (OK), or type 99 (UNSUPP); IOERR is allowed too.
    assert!(
        st == VIRTIO_BLK_S_OK || st == VIRTIO_BLK_S_IOERR || st == VIRTIO_BLK_S_UNSUPP,
        "header rewritten in flight: status {st}, {used:?}"
    );
    // Descriptors rewritten right after the kick (to point outside guest memory).
    let (head, _, s) = dev.read(0, 4096);
    std::thread::sleep(Duration::from_millis(2));
    for i in 0..3 {
        dev.q.write_desc(
            head + i,
            Desc {
                addr: 0x7fff_0000_0000,
                len: u32::MAX,
                flags: 0x7,
                next: 999,
            },
        );
    }
    match dev.observe(head, s) {
        Outcome::Completed { used, status: st } => assert!(
            st == VIRTIO_BLK_S_OK || st == VIRTIO_BLK_S_IOERR,
            "descriptors rewritten in flight: status {st}, {used:?}"
        ),
        // The rewrite came before the device read the chain (2 ms is not always enough
        // on a loaded machine): it saw the bad descriptors and stopped the ring, as it
        // must for a broken chain. Go on with a fresh frontend.
        Outcome::Stopped {
            err_signalled: true,
        } => {
            drop(dev);
            dev = h.dev(&DevOpts {
                queue_size: 64,
                ..DevOpts::default()
            });
        }
        other => panic!("descriptors rewritten in flight: {other:?}"),
    }
    // A second of requests (8 in flight) with a thread scribbling over their headers and
    // data; then a second with random descriptors too.
    let worker = std::thread::spawn(move || {
        let mut rng = Rng::with_seed(10);
        let slots: Vec<(u64, u64, u64)> = (0..8)
            .map(|_| {
                (
                    dev.header(VIRTIO_BLK_T_IN, 0),
                    dev.buffer(4096, 512, 0, 0),
                    dev.status(),
                )
            })
            .collect();
        let mem = dev.mem().clone();
        let (mut completed, mut statuses) = (0u32, [0u32; 3]);
        let mut in_flight: Vec<Option<u16>> = vec![None; 8];
        let start = Instant::now();
        let mut garbage_descs = false;
        while start.elapsed() < Duration::from_millis(2000) {
            if !garbage_descs && start.elapsed() > Duration::from_millis(1000) {
                garbage_descs = true;
            }
            for (i, slot) in in_flight.iter_mut().enumerate() {
                let (hd, d, s) = slots[i];
                if slot.is_none() {
                    let kind = if rng.range(0, 2) == 0 {
                        VIRTIO_BLK_T_IN
                    } else {
                        VIRTIO_BLK_T_OUT
                    };
                    mem.write(
                        hd,
                        &vubd_tests::vu_frontend::blk_header(kind, rng.range(0, 1000)),
                    );
                    mem.fill(s, 1, STATUS_CANARY);
                    let data = if kind == VIRTIO_BLK_T_IN {
                        w(d, 4096)
                    } else {
                        r(d, 4096)
                    };
                    let first = (i * 3) as u16;
                    let head = dev.q.write_chain(first, &[r(hd, 16), data, w(s, 1)]);
                    dev.q.submit(head);
                    *slot = Some(head);
                }
                // Scribble over this request's header and data while it is in flight.
                let mut junk = [0u8; 16];
                rng.fill(&mut junk);
                mem.write(hd, &junk);
                mem.fill(d + rng.range(0, 4096), 1, junk[0]);
                if garbage_descs {
                    let i = rng.range(0, 64) as u16;
                    dev.q.write_desc(
                        i,
                        Desc {
                            addr: rng.next_u64() >> rng.range(0, 64),
                            len: rng.next_u64() as u32 >> rng.range(0, 32),
                            flags: rng.range(0, 8) as u16,
                            next: rng.range(0, 80) as u16,
                        },
                    );
                }
            }
            for e in dev.q.take_used() {
                completed += 1;
                if let Some(i) = in_flight.iter().position(|s| *s == Some(e.id as u16)) {
                    let st = mem.read_u8(slots[i].2);
                    if !garbage_descs {
                        assert!(
                            st == VIRTIO_BLK_S_OK
                                || st == VIRTIO_BLK_S_IOERR
                                || st == VIRTIO_BLK_S_UNSUPP,
                            "status {st} for a request whose buffers changed in flight"
                        );
                    }
                    if let Some(c) = statuses.get_mut(st as usize) {
                        *c += 1;
                    }
                    in_flight[i] = None;
                }
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        eprintln!("  scribbling: {completed} completions, statuses OK/IOERR/UNSUPP {statuses:?}");
        dev
    });
    std::thread::sleep(Duration::from_millis(100));
    h.measure_attack();
    let dev = worker.join().expect("the scribbling thread panicked");
    h.measure_quiet_cpu();
    drop(dev);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
}

/// SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG while requests are in flight on a slow
/// device: the requests complete (OK or IOERR) and the daemon keeps serving, also when a
/// new table drops the region that holds the rings.
#[test]
fn memory_table_changes_in_flight() {
    let mut h = Harness::start(
        "memory_table_changes_in_flight",
        ANode::Null {
            size: 64 * MIB,
            latency_ns: 300_000_000,
        },
        "",
        false,
    );
    let mut c = Checks::default();
    let mut dev = h.dev(&DevOpts {
        queue_size: 64,
        ..DevOpts::default()
    });
    let r0 = dev.mem().regions()[0].clone();
    let r1 = MemRegion::new(64 * MIB, 8 * MIB);
    dev.fe.add_mem_reg(&r1).expect("ADD_MEM_REG");
    let mut reqs = Vec::new();
    for i in 0..8u64 {
        let hd = dev.header(VIRTIO_BLK_T_IN, i * 8);
        let s = dev.status();
        let head = dev.submit_chain(&[r(hd, 16), w(r1.gpa() + i * 4096, 4096), w(s, 1)]);
        reqs.push((head, s));
    }
    std::thread::sleep(Duration::from_millis(50));
    let rem = dev.fe.rem_mem_reg(&r1);
    eprintln!("  REM_MEM_REG of a region with reads in flight: {rem:?}");
    let r2 = MemRegion::new(128 * MIB, 8 * MIB);
    dev.fe.add_mem_reg(&r2).expect("ADD_MEM_REG");
    dev.fe
        .set_mem_table(&[r0.clone(), r2.clone()])
        .expect("SET_MEM_TABLE with the same ring region");
    for (head, s) in reqs {
        let (used, st) = dev
            .wait(head, s, Duration::from_secs(5))
            .expect("a read in flight across memory table changes did not complete");
        assert!(
            st == VIRTIO_BLK_S_OK || st == VIRTIO_BLK_S_IOERR,
            "read in flight across memory table changes: status {st}, {used:?}"
        );
    }
    // The new table serves new requests.
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let s = dev.status();
    r2.gpa();
    let o = dev.probe_chain(&[r(hd, 16), w(r2.gpa(), 4096), w(s, 1)], s);
    c.status("a read into a region added in flight", o, VIRTIO_BLK_S_OK);
    // Requests in flight, then a table without the region that holds the rings.
    for i in 0..4u64 {
        let hd = dev.header(VIRTIO_BLK_T_IN, i);
        let s = dev.status();
        dev.submit_chain(&[r(hd, 16), w(r2.gpa() + i * 4096, 4096), w(s, 1)]);
    }
    std::thread::sleep(Duration::from_millis(50));
    let res = dev.fe.set_mem_table(std::slice::from_ref(&r2));
    eprintln!("  SET_MEM_TABLE without the ring region, requests in flight: {res:?}");
    std::thread::sleep(Duration::from_millis(500));
    h.measure_attack();
    h.daemon
        .assert_running("after SET_MEM_TABLE dropped the ring region");
    drop(dev);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
    c.assert_all();
}

/// The frontend goes away with requests in flight, in the middle of a message, and in
/// the middle of the setup; the export serves the next frontend.
#[test]
fn frontend_closes_mid_request() {
    let mut h = Harness::start(
        "frontend_closes_mid_request",
        ANode::Null {
            size: 64 * MIB,
            latency_ns: 300_000_000,
        },
        "",
        false,
    );
    let mut dev = h.dev(&DevOpts {
        queue_size: 64,
        ..DevOpts::default()
    });
    for i in 0..16u64 {
        let hd = dev.header(
            if i % 2 == 0 {
                VIRTIO_BLK_T_IN
            } else {
                VIRTIO_BLK_T_OUT
            },
            i * 8,
        );
        let d = dev.buffer(65536, 4096, 0, 0x77);
        let s = dev.status();
        let data = if i % 2 == 0 { w(d, 65536) } else { r(d, 65536) };
        dev.submit_chain(&[r(hd, 16), data, w(s, 1)]);
    }
    std::thread::sleep(Duration::from_millis(20));
    drop(dev);
    // Half a message, then gone.
    let dev = h.dev(&DevOpts::default());
    let msg = encode(req::SET_VRING_NUM, 0, &vring_state(0, 16));
    dev.fe.conn.send_raw(&msg[..7], &[]).expect("send");
    drop(dev);
    // Gone after SET_MEM_TABLE, before any queue started.
    let mut fe = Frontend::handshake(&h.sock_a, HandshakeOpts::default()).expect("handshake");
    fe.set_mem_table(&[MemRegion::new(MIB, 4 * MIB)])
        .expect("SET_MEM_TABLE");
    drop(fe);
    h.measure_attack();
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
}

/// A frontend that sends requests with NEED_REPLY and never reads the replies: the
/// daemon's replies fill the socket; it must not spin or buffer without bound, the other
/// export keeps serving, and once this frontend goes the export serves the next.
#[test]
fn frontend_never_reads_replies() {
    let mut h = Harness::start("frontend_never_reads_replies", shm(16 * MIB), "", false);
    let fe = Frontend::handshake(&h.sock_a, HandshakeOpts::default()).expect("handshake");
    fe.conn
        .set_send_timeout(Some(Duration::from_millis(300)))
        .expect("send timeout");
    let (mut sent, t) = (0u64, Instant::now());
    let why = loop {
        if t.elapsed() > Duration::from_secs(5) {
            break "still sending after 5 s".to_string();
        }
        // GET_FEATURES always has a reply; SET_OWNER with NEED_REPLY has an ack.
        let r = if sent % 2 == 0 {
            fe.conn.send(req::GET_FEATURES, FLAG_NEED_REPLY, &[], &[])
        } else {
            fe.conn.send(req::GET_QUEUE_NUM, FLAG_NEED_REPLY, &[], &[])
        };
        match r {
            Ok(()) => sent += 1,
            Err(e) => break e.to_string(),
        }
    };
    eprintln!("  sent {sent} requests without reading a reply: {why}");
    h.measure_attack();
    h.measure_quiet_cpu();
    drop(fe);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
}

/// What the daemon did with a bad message: answered, closed the connection, or nothing.
fn after_bad_message(fe: &Frontend) -> String {
    match fe.conn.recv_timeout(Duration::from_millis(500)) {
        Ok(m) => format!(
            "replied (request {}, flags {:#x}, {} payload bytes{})",
            m.request,
            m.flags,
            m.payload.len(),
            m.u64()
                .map(|v| format!(", value {v:#x}"))
                .unwrap_or_default()
        ),
        Err(VuError::Closed) => "closed the connection".into(),
        Err(VuError::Timeout(_)) => {
            if fe.conn.wait_closed(Duration::from_millis(200)) {
                "closed the connection".into()
            } else {
                "no answer".into()
            }
        }
        Err(e) => format!("{e}"),
    }
}

/// vhost-user messages that are oversized, truncated, carry the wrong number of fds, have
/// unknown codes or flags, or invalid vring and memory parameters. Each on a fresh
/// connection; the daemon may refuse or close the connection, but must stay up, not
/// leak what it was sent, and serve the next frontend.
#[test]
fn malformed_vhost_user_messages() {
    let mut h = Harness::start("malformed_vhost_user_messages", shm(16 * MIB), "", false);
    let efd1 = new_eventfd();
    let efd2 = new_eventfd();
    let mem4k = MemRegion::new(0, 4096);
    let mem1m = MemRegion::new(MIB, MIB);
    let e1 = efd1.as_raw_fd();
    let e2 = efd2.as_raw_fd();
    let region = |r: &Arc<MemRegion>| r.desc();
    let big_region = RegionDesc {
        size: 1 << 40,
        ..mem4k.desc()
    };
    let wrapping_region = RegionDesc {
        gpa: u64::MAX - 4095,
        size: 8192,
        ..mem4k.desc()
    };
    let many: Vec<RegionDesc> = (0..40u64)
        .map(|i| RegionDesc {
            gpa: i * MIB,
            ..mem4k.desc()
        })
        .collect();
    let many_fds: Vec<RawFd> = (0..40).map(|_| mem4k.fd()).collect();
    let mut junk = vec![0u8; 64 * 1024];
    Rng::with_seed(7).fill(&mut junk);
    let mut oversized = header(req::GET_FEATURES, 1, u32::MAX).to_vec();
    oversized.extend_from_slice(&junk);
    let mut above_max = header(req::SET_FEATURES, 1, 4097).to_vec();
    above_max.extend_from_slice(&junk[..4097]);
    let table2 = mem_table_payload(&[region(&mem4k), region(&mem1m)]);
    let mut truncated_table = header(req::SET_MEM_TABLE, 1, table2.len() as u32).to_vec();
    truncated_table.extend_from_slice(&table2[..20]);
    let single = |r: RegionDesc| {
        let mut v = vec![0u8; 8];
        v.extend_from_slice(&r.to_bytes());
        v
    };
    let addr = |idx: u32, va: u64| {
        let mut p = Vec::new();
        p.extend_from_slice(&idx.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for _ in 0..3 {
            p.extend_from_slice(&va.to_le_bytes());
        }
        p.extend_from_slice(&0u64.to_le_bytes());
        p
    };
    let nr = FLAG_NEED_REPLY;
    // (what, after the handshake, bytes, fds, half-close after sending)
    type Case<'a> = (&'a str, bool, Vec<u8>, Vec<RawFd>, bool);
    let cases: Vec<Case> = vec![
        ("size field 4 GiB", false, oversized, vec![], false),
        ("size field above 4 KiB", true, above_max, vec![], false),
        (
            "half a header",
            false,
            header(req::GET_FEATURES, 1, 0)[..6].to_vec(),
            vec![],
            true,
        ),
        (
            "header without its payload",
            true,
            header(req::SET_FEATURES, 1, 8).to_vec(),
            vec![],
            true,
        ),
        (
            "payload shorter than its size",
            true,
            truncated_table,
            vec![e1, e2],
            true,
        ),
        (
            "SET_MEM_TABLE: 2 regions, 1 fd",
            true,
            encode(req::SET_MEM_TABLE, nr, &table2),
            vec![mem4k.fd()],
            false,
        ),
        (
            "SET_MEM_TABLE: 1 region, 2 fds",
            true,
            encode(
                req::SET_MEM_TABLE,
                nr,
                &mem_table_payload(&[region(&mem4k)]),
            ),
            vec![mem4k.fd(), mem1m.fd()],
            false,
        ),
        (
            "SET_MEM_TABLE: no regions",
            true,
            encode(req::SET_MEM_TABLE, nr, &mem_table_payload(&[])),
            vec![],
            false,
        ),
        (
            "SET_MEM_TABLE: 40 regions and fds",
            true,
            encode(req::SET_MEM_TABLE, nr, &mem_table_payload(&many)),
            many_fds.clone(),
            false,
        ),
        (
            "SET_MEM_TABLE: 1 TiB region on a 4 KiB memfd",
            true,
            encode(req::SET_MEM_TABLE, nr, &mem_table_payload(&[big_region])),
            vec![mem4k.fd()],
            false,
        ),
        (
            "SET_MEM_TABLE: region wrapping around the address space",
            true,
            encode(
                req::SET_MEM_TABLE,
                nr,
                &mem_table_payload(&[wrapping_region]),
            ),
            vec![mem4k.fd()],
            false,
        ),
        (
            "SET_MEM_TABLE: overlapping regions",
            true,
            encode(
                req::SET_MEM_TABLE,
                nr,
                &mem_table_payload(&[region(&mem1m), region(&mem1m)]),
            ),
            vec![mem1m.fd(), mem1m.fd()],
            false,
        ),
        (
            "SET_VRING_KICK with two fds",
            true,
            encode(req::SET_VRING_KICK, nr, &0u64.to_le_bytes()),
            vec![e1, e2],
            false,
        ),
        (
            "SET_VRING_KICK: no-fd flag with an fd",
            true,
            encode(req::SET_VRING_KICK, nr, &VRING_NOFD.to_le_bytes()),
            vec![e1],
            false,
        ),
        (
            "SET_VRING_CALL without fd or no-fd flag",
            true,
            encode(req::SET_VRING_CALL, nr, &0u64.to_le_bytes()),
            vec![],
            false,
        ),
        (
            "SET_VRING_KICK for queue 99",
            true,
            encode(req::SET_VRING_KICK, nr, &99u64.to_le_bytes()),
            vec![e1],
            false,
        ),
        (
            "GET_FEATURES with an fd",
            false,
            encode(req::GET_FEATURES, 0, &[]),
            vec![e1],
            false,
        ),
        (
            "ADD_MEM_REG without an fd",
            true,
            encode(req::ADD_MEM_REG, nr, &single(region(&mem1m))),
            vec![],
            false,
        ),
        (
            "ADD_MEM_REG with two fds",
            true,
            encode(req::ADD_MEM_REG, nr, &single(region(&mem1m))),
            vec![mem1m.fd(), e1],
            false,
        ),
        (
            "REM_MEM_REG of a region never added",
            true,
            encode(req::REM_MEM_REG, nr, &single(region(&mem1m))),
            vec![],
            false,
        ),
        ("unknown request 0", true, encode(0, nr, &[]), vec![], false),
        (
            "unknown request 99",
            true,
            encode(99, nr, &[1, 2, 3]),
            vec![],
            false,
        ),
        (
            "unknown request 0x7fffffff",
            true,
            encode(0x7fff_ffff, nr, &[]),
            vec![],
            false,
        ),
        (
            "unknown request 0xffffffff",
            true,
            encode(u32::MAX, nr, &[0; 8]),
            vec![],
            false,
        ),
        (
            "version 2",
            true,
            {
                let mut v = header(req::GET_FEATURES, 2, 0).to_vec();
                v.truncate(12);
                v
            },
            vec![],
            false,
        ),
        (
            "REPLY flag from the frontend",
            true,
            encode(req::GET_FEATURES, FLAG_REPLY, &[]),
            vec![],
            false,
        ),
        (
            "SET_FEATURES with bits not offered",
            true,
            encode(req::SET_FEATURES, nr, &u64::MAX.to_le_bytes()),
            vec![],
            false,
        ),
        (
            "SET_VRING_NUM 0",
            true,
            encode(req::SET_VRING_NUM, nr, &vring_state(0, 0)),
            vec![],
            false,
        ),
        (
            "SET_VRING_NUM 65535",
            true,
            encode(req::SET_VRING_NUM, nr, &vring_state(0, 65535)),
            vec![],
            false,
        ),
        (
            "SET_VRING_NUM 3 (not a power of 2)",
            true,
            encode(req::SET_VRING_NUM, nr, &vring_state(0, 3)),
            vec![],
            false,
        ),
        (
            "SET_VRING_NUM for queue 99",
            true,
            encode(req::SET_VRING_NUM, nr, &vring_state(99, 16)),
            vec![],
            false,
        ),
        (
            "SET_VRING_ADDR outside the memory table",
            true,
            encode(req::SET_VRING_ADDR, nr, &addr(0, 0x1234_5678_0000)),
            vec![],
            false,
        ),
        (
            "SET_VRING_ADDR for queue 99",
            true,
            encode(req::SET_VRING_ADDR, nr, &addr(99, 0)),
            vec![],
            false,
        ),
        (
            "SET_VRING_ENABLE 2",
            true,
            encode(req::SET_VRING_ENABLE, nr, &vring_state(0, 2)),
            vec![],
            false,
        ),
        (
            "GET_VRING_BASE of queue 99",
            true,
            encode(req::GET_VRING_BASE, 0, &vring_state(99, 0)),
            vec![],
            false,
        ),
        (
            "GET_VRING_BASE of a queue never set up",
            true,
            encode(req::GET_VRING_BASE, 0, &vring_state(0, 0)),
            vec![],
            false,
        ),
        (
            "SET_CONFIG shorter than its header",
            true,
            encode(req::SET_CONFIG, nr, &[0; 6]),
            vec![],
            false,
        ),
        (
            "GET_CONFIG size field larger than the payload",
            true,
            encode(req::GET_CONFIG, 0, &config_payload(0, 4000, 0, &[0; 8])),
            vec![],
            false,
        ),
    ];
    for (what, handshake, bytes, fds, half_close) in cases {
        let fe = if handshake {
            Frontend::handshake(&h.sock_a, HandshakeOpts::default())
        } else {
            Frontend::connect(&h.sock_a)
        }
        .unwrap_or_else(|e| panic!("{what}: connecting: {e}"));
        fe.conn
            .set_send_timeout(Some(Duration::from_secs(1)))
            .expect("send timeout");
        let sent = fe.conn.send_raw(&bytes, &fds);
        if half_close {
            fe.conn.shutdown_write();
        }
        let result = after_bad_message(&fe);
        eprintln!(
            "  {what}: {}{result}",
            match sent {
                Ok(_) => String::new(),
                Err(e) => format!("(send: {e}) "),
            }
        );
        drop(fe);
        h.daemon.assert_running(what);
        // Give the daemon a moment to tear the connection down, then count its fds.
        std::thread::sleep(Duration::from_millis(20));
        eprintln!(
            "    daemon fds: {}",
            vubd_tests::hostile::fd_count(h.daemon.pid()).unwrap_or(0)
        );
    }
    h.measure_attack();
    // A normal frontend works afterwards.
    let mut dev = h.dev(&DevOpts::default());
    dev.assert_read_ok(0, 4096, true);
    drop(dev);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
}

/// SET_VRING_NUM with a size that is not a power of two (split rings need one): it is
/// refused, or the daemon uses exactly that size. It must not read or write past the
/// 3-entry ring the frontend laid out (bytes after it hold a canary), also once the ring
/// indices wrap.
#[test]
fn vring_size_not_a_power_of_two() {
    let mut h = Harness::start("vring_size_not_a_power_of_two", shm(16 * MIB), "", false);
    let mut dev = h.dev(&DevOpts {
        queue_size: 3,
        start_queue: false,
        ..DevOpts::default()
    });
    let layout = dev.q.layout;
    let after = layout.desc + layout.total_len();
    let canary_len = (after.next_multiple_of(4096) - after) as usize;
    dev.mem().fill(after, canary_len, 0xC5);
    match dev.start_queue() {
        Err(VuError::Nack(_)) | Err(VuError::Closed) => {
            eprintln!("  SET_VRING_NUM 3 refused");
        }
        Err(e) => panic!("queue setup: {e}"),
        Ok(()) => {
            eprintln!("  SET_VRING_NUM 3 accepted: the ring must work with 3 entries");
            for i in 0..8 {
                let (head, _, s) = dev.read(i, 512);
                match dev.wait(head, s, Duration::from_secs(1)) {
                    Some((_, st)) => assert!(
                        st == VIRTIO_BLK_S_OK || st == VIRTIO_BLK_S_IOERR,
                        "request {i} on a 3-entry ring: status {st}"
                    ),
                    None => {
                        eprintln!("  request {i} on a 3-entry ring did not complete");
                        break;
                    }
                }
                let c = dev.mem().read(after, canary_len);
                let bad = c.iter().position(|&b| b != 0xC5);
                assert!(
                    bad.is_none(),
                    "after request {i}: the daemon wrote {:#x} bytes past the end of a \
                     3-entry ring",
                    bad.unwrap_or(0) + 1
                );
            }
        }
    }
    h.measure_attack();
    drop(dev);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
}

/// A frontend that connects and goes away over and over (bare connections, and full
/// setups with a request): the daemon must not keep anything per connection (fds,
/// threads, memory).
#[test]
fn reconnecting_frontend_leaks_nothing() {
    let mut h = Harness::start(
        "reconnecting_frontend_leaks_nothing",
        shm(16 * MIB),
        "",
        false,
    );
    for _ in 0..150 {
        let mut fe = Frontend::connect(&h.sock_a).expect("connect");
        fe.conn.timeout = Duration::from_secs(10);
        fe.get_features().expect("GET_FEATURES");
    }
    for _ in 0..10 {
        let mut dev = h.dev(&DevOpts::default());
        dev.assert_read_ok(0, 4096, true);
    }
    h.measure_attack();
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
}

/// GET_CONFIG and SET_CONFIG outside the config space, and SET_CONFIG on fields other
/// than `writeback` (offset 32, one byte): nothing past the structure leaks (refused, or
/// zeroes), writes other than `writeback` are refused and change nothing, and
/// `writeback` itself works.
#[test]
fn config_space_out_of_bounds() {
    let mut h = Harness::start("config_space_out_of_bounds", shm(16 * MIB), "", false);
    let connect = |h: &Harness| {
        let fe = Frontend::handshake(&h.sock_a, HandshakeOpts::default()).expect("handshake");
        assert!(fe.reply_ack(), "REPLY_ACK not negotiated");
        fe
    };
    let mut fe = connect(&h);
    let cfg = fe.get_config(0, 60).expect("GET_CONFIG");
    assert_eq!(cfg.len(), 60);
    // virtio 1.2's struct virtio_blk_config is at most 96 bytes (with the zoned fields).
    const STRUCT_MAX: u64 = 96;
    for (offset, size) in [
        (56u32, 16u32),
        (60, 4),
        (0, 4096 - 12),
        (4000, 16),
        (u32::MAX - 3, 8),
        (u32::MAX, 1),
    ] {
        let got = match fe.get_config(offset, size) {
            Ok(got) => got,
            Err(VuError::Closed) => {
                // A protocol error (e.g. offset + size overflows): refused by closing.
                eprintln!("  GET_CONFIG {offset}+{size}: the connection was closed");
                fe = connect(&h);
                continue;
            }
            Err(e) => panic!("GET_CONFIG {offset}+{size}: {e}"),
        };
        eprintln!("  GET_CONFIG {offset}+{size}: {} bytes", got.len());
        if !got.is_empty() {
            assert_eq!(got.len(), size as usize);
            for (i, b) in got.iter().enumerate() {
                let at = u64::from(offset) + i as u64;
                if at >= STRUCT_MAX {
                    assert_eq!(*b, 0, "GET_CONFIG returned a non-zero byte at offset {at}");
                } else if at < 60 {
                    assert_eq!(*b, cfg[at as usize], "GET_CONFIG byte {at} differs");
                }
            }
        }
    }
    for (offset, data) in [
        (0u32, vec![0xFFu8; 8]),
        (8, vec![0xFF; 4]),
        (32, vec![0, 0]),
        (31, vec![0, 0]),
        (33, vec![0]),
        (34, vec![9, 0]),
        (60, vec![1]),
        (u32::MAX, vec![1]),
        (u32::MAX - 1, vec![1, 1, 1, 1]),
        (0, vec![0xAB; 4000]),
    ] {
        let res = fe.set_config(offset, &data);
        eprintln!("  SET_CONFIG {offset}+{}: {res:?}", data.len());
        match res {
            Err(VuError::Nack(_)) => {}
            Err(VuError::Closed) => fe = connect(&h),
            other => panic!(
                "SET_CONFIG of {} bytes at {offset} was not refused: {other:?}",
                data.len()
            ),
        }
    }
    assert_eq!(
        fe.get_config(0, 60).expect("GET_CONFIG"),
        cfg,
        "refused SET_CONFIGs changed the config space"
    );
    // `writeback` may be written.
    for v in [0u8, 1] {
        fe.set_config(32, &[v])
            .unwrap_or_else(|e| panic!("SET_CONFIG writeback={v}: {e}"));
        assert_eq!(fe.get_config(32, 1).expect("GET_CONFIG"), vec![v]);
    }
    h.measure_attack();
    drop(fe);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
}

/// A memory region announced larger than the file behind it: touching the part past the
/// end of the memfd would raise SIGBUS in the daemon. The table must be refused, or the
/// requests that use that part fail, and the daemon must survive.
#[test]
fn memory_region_larger_than_its_file() {
    let mut h = Harness::start(
        "memory_region_larger_than_its_file",
        shm(16 * MIB),
        "",
        false,
    );
    let mut c = Checks::default();
    let mut dev = h.dev(&DevOpts {
        start_queue: false,
        ..DevOpts::default()
    });
    let real = dev.mem().regions()[0].clone();
    // A second region: 64 KiB of memfd announced as 16 MiB.
    let small = MemRegion::new(64 * MIB, 64 * 1024);
    let announced = RegionDesc {
        size: 16 * MIB,
        ..small.desc()
    };
    let payload = mem_table_payload(&[real.desc(), announced]);
    let res = dev
        .fe
        .send_acked(req::SET_MEM_TABLE, &payload, &[real.fd(), small.fd()]);
    eprintln!("  SET_MEM_TABLE with a 16 MiB region on a 64 KiB memfd: {res:?}");
    if res.is_ok() {
        dev.start_queue().expect("start queue 0");
        // A status byte past the end of the memfd (the daemon writes it itself).
        let hd = dev.header(VIRTIO_BLK_T_IN, 0);
        let d = dev.buffer(512, 512, 0, 0x99);
        let head = dev.submit_chain(&[r(hd, 16), w(d, 512), w(small.gpa() + MIB, 1)]);
        let e = dev.q.wait_for_head(head, Duration::from_millis(500));
        eprintln!("  status past the end of the memfd: {e:?}");
        h.daemon
            .assert_running("after a status byte past the end of a memfd");
        // A header past the end of the memfd (the daemon reads it itself).
        let d = dev.buffer(512, 512, 0, 0x99);
        let s = dev.status();
        let o = dev.probe_chain(&[r(small.gpa() + 2 * MIB, 16), w(d, 512), w(s, 1)], s);
        eprintln!("  header past the end of the memfd");
        h.daemon
            .assert_running("after a header past the end of a memfd");
        c.refused("header past the end of the memfd", o);
    }
    h.measure_attack();
    drop(dev);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
    c.assert_all();
}

/// Queue sizes that are not a power of two, too small for a request (1), or above
/// virtio's 32768 are refused at startup with a one-line error naming the option.
#[test]
fn bad_queue_sizes_are_refused_at_startup() {
    let dir = TempDir::new("vubd-hostile-qs");
    let img = TempImage::new(4 * MIB);
    for qs in ["1", "100", "65536"] {
        let args = vubd_tests::simple_file_export(
            &img,
            &dir.join("q.sock"),
            1,
            "",
            &format!(",queue-size={qs}"),
        );
        let out = run_to_exit(&vubd_bin(), &args, Duration::from_secs(5));
        let line = out.assert_config_error(&["queue-size"]);
        eprintln!("  queue-size={qs}: {line}");
    }
}

/// The frontend shrinks its guest-memory memfd after handing it over (SET_MEM_TABLE
/// checked its size then). The daemon's next access to the lost pages raises SIGBUS,
/// which used to kill it and every other export with it: now the fault lands on a
/// zero page (the attacker's own memory reads as zeroes) and the daemon serves on.
#[test]
fn guest_memory_truncated_after_the_memory_table() {
    let mut h = Harness::start(
        "guest_memory_truncated_after_the_memory_table",
        shm(16 * MIB),
        "",
        false,
    );
    let mut dev = h.dev(&DevOpts::default());
    // A request ready in the ring, published but not yet kicked: once the memory is
    // gone the frontend must not touch it either.
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let d = dev.buffer(4096, 512, 0, 0x99);
    let s = dev.status();
    let first = dev.desc_slots(3);
    let head = dev.q.write_chain(first, &[r(hd, 16), w(d, 4096), w(s, 1)]);
    dev.q.push_avail(head);
    let region = dev.mem().regions()[0].clone();
    // SAFETY: ftruncate on the frontend's own memfd.
    let rc = unsafe { libc::ftruncate(region.fd(), 0) };
    assert_eq!(rc, 0, "ftruncate: {}", std::io::Error::last_os_error());
    dev.q.kick();
    std::thread::sleep(Duration::from_millis(300));
    h.daemon
        .assert_running("after the frontend truncated its guest memory");
    h.measure_attack();
    // The frontend's own mapping is gone too: drop it without touching it.
    drop(dev);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
}

/// Half a message header, then silence: one daemon-wide thread handles every export's
/// vhost-user messages, and it reads without blocking, so a frontend added on another
/// export meanwhile gets through its handshake and is served; A serves the next
/// frontend once this one goes.
#[test]
fn half_a_message_holds_up_no_other_export() {
    let mut h = Harness::start(
        "half_a_message_holds_up_no_other_export",
        shm(16 * MIB),
        "",
        true,
    );
    let fe = Frontend::connect(&h.sock_a).expect("connect");
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&req::GET_FEATURES.to_le_bytes());
    hdr.extend_from_slice(&1u32.to_le_bytes());
    hdr.truncate(7);
    fe.conn.send_raw(&hdr, &[]).expect("7 bytes of a header");
    std::thread::sleep(Duration::from_millis(200));
    let sock_c = h.dir.join("c.sock");
    let qmp = h.qmp.as_mut().expect("monitor");
    qmp.ok(
        "blockdev-add",
        serde_json::json!({"driver": "null-co", "node-name": "c", "size": MIB, "read-zeroes": true}),
    );
    qmp.ok(
        "block-export-add",
        serde_json::json!({"type": "vhost-user-blk", "id": "c", "node-name": "c", "writable": true,
                           "addr": {"type": "unix", "path": sock_c}}),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = (|| {
            let opts = vubd_tests::ClientOptions {
                num_queues: 1,
                buf_per_queue: MIB as usize,
                ..Default::default()
            };
            let mut c = vubd_tests::Client::connect_with(&sock_c, &opts)?;
            c.q()
                .read_poisoned(0, 4096, 0x5a)
                .map_err(|e| format!("read failed: {e}"))
        })();
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(data)) => assert!(data.iter().all(|&b| b == 0), "export c read non-zero data"),
        Ok(Err(e)) => panic!("a frontend of export c failed while A's message was half sent: {e}"),
        Err(_) => panic!("a frontend of export c got no answer while A's message was half sent"),
    }
    h.measure_attack();
    assert!(
        !fe.conn.wait_closed(Duration::from_millis(100)),
        "the daemon closed a connection that is merely slow"
    );
    drop(fe);
    h.assert_a_serves(Duration::from_secs(10));
    h.finish();
}

/// Mappings of the hostile frontend's memory regions in the daemon.
fn region_mappings(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| m.lines().filter(|l| l.contains("vubd-hostile-mem")).count())
        .unwrap_or(0)
}

/// A region the frontend removes (REM_MEM_REG) is unmapped as soon as no request uses
/// it, even if the export then stays idle: the iothread's copy of the memory table,
/// which held it, goes with the change.
#[test]
fn removed_memory_region_is_unmapped_while_idle() {
    let h = Harness::start(
        "removed_memory_region_is_unmapped_while_idle",
        ANode::Null {
            size: 16 * MIB,
            latency_ns: 0,
        },
        "",
        false,
    );
    let mut dev = h.dev(&DevOpts {
        queue_size: 64,
        ..DevOpts::default()
    });
    let pid = h.daemon.pid();
    let r1 = MemRegion::new(64 * MIB, 8 * MIB);
    dev.fe.add_mem_reg(&r1).expect("ADD_MEM_REG");
    // A read into the new region: the iothread now reads the rings with a table that
    // has it.
    let hd = dev.header(VIRTIO_BLK_T_IN, 0);
    let s = dev.status();
    let o = dev.probe_chain(&[r(hd, 16), w(r1.gpa(), 4096), w(s, 1)], s);
    assert_completed_ok("a read into the added region", o);
    remove_and_wait_unmapped(&mut dev, pid, &r1, "the removed region (the export idle)");
    drop(dev);
    h.finish();
}

/// Memory tables the daemon refuses (SET_MEM_TABLE with two regions at one address,
/// ADD_MEM_REG over a region it has) leave nothing mapped: repeated on one connection,
/// the daemon's mappings of the frontend's memory stay as they were, and the
/// connection goes on with its table.
#[test]
fn refused_memory_tables_leave_nothing_mapped() {
    let h = Harness::start(
        "refused_memory_tables_leave_nothing_mapped",
        ANode::Null {
            size: 16 * MIB,
            latency_ns: 0,
        },
        "",
        false,
    );
    let mut dev = h.dev(&DevOpts::default());
    let pid = h.daemon.pid();
    dev.assert_read_ok(0, 4096, false);
    let before = region_mappings(pid);
    assert!(before >= 1, "the daemon maps the frontend's memory");
    let extra = MemRegion::new(64 * MIB, MIB);
    let first = dev.fe.mem.regions()[0].clone();
    for i in 0..10 {
        assert!(
            dev.fe
                .set_mem_table(&[extra.clone(), extra.clone()])
                .is_err(),
            "overlapping regions accepted ({i})"
        );
        let over = MemRegion::new(first.gpa(), MIB);
        assert!(
            dev.fe.add_mem_reg(&over).is_err(),
            "a region over another accepted ({i})"
        );
    }
    let after = region_mappings(pid);
    assert_eq!(
        after,
        before,
        "refused tables left {} mapping(s) behind",
        after.saturating_sub(before)
    );
    dev.assert_read_ok(0, 4096, false);
    drop(dev);
    h.finish();
}

/// REM_MEM_REG of `region`, then waits up to 3 s for the daemon to unmap it: the
/// iothreads' copies of the memory table, and any io_uring registration of it, must
/// let go of a removed region as soon as no request uses it, even while idle.
fn remove_and_wait_unmapped(dev: &mut Dev, pid: u32, region: &Arc<MemRegion>, what: &str) {
    let before = region_mappings(pid);
    assert!(
        before >= 2,
        "{what}: the daemon maps {before} frontend region(s)"
    );
    dev.fe.rem_mem_reg(region).expect("REM_MEM_REG");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut now = region_mappings(pid);
    while now >= before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        now = region_mappings(pid);
    }
    assert!(
        now < before,
        "{what}: still mapped 3 s after REM_MEM_REG ({before} -> {now} mappings)"
    );
}

fn assert_completed_ok(what: &str, o: Outcome) {
    match o {
        Outcome::Completed { status, .. } => {
            assert_eq!(status, VIRTIO_BLK_S_OK, "{what}: status {status}")
        }
        Outcome::Stopped { err_signalled } => {
            panic!("{what}: the queue stopped (error signalled: {err_signalled})")
        }
        Outcome::Dropped => panic!("{what}: dropped"),
    }
}

/// `pin-guest-memory=on` on a `cache.direct=on` file: reads into a region added with
/// ADD_MEM_REG, into the first table's region, and into a region of a whole new table
/// (SET_MEM_TABLE) land in the right pages; a region the frontend removes is unmapped
/// once idle although it was registered with io_uring (the registration goes with the
/// table); the other export keeps serving.
#[test]
fn pinned_memory_follows_memory_table_changes() {
    // The registration's log lines say when the iothread has taken a region over.
    let h = Harness::start_with(
        "pinned_memory_follows_memory_table_changes",
        ANode::DirectFile { size: 16 * MIB },
        ",pin-guest-memory=on",
        false,
        &["-T", "vhost_user_blk_guest_pins"],
    );
    let mut dev = h.dev(&DevOpts {
        queue_size: 64,
        ..DevOpts::default()
    });
    let pid = h.daemon.pid();
    let read_into = |dev: &mut Dev, gpa: u64, sector: u64, what: &str| {
        let hd = dev.header(VIRTIO_BLK_T_IN, sector);
        let s = dev.status();
        dev.mem().fill(gpa, 65536, 0xEE);
        let o = dev.probe_chain(&[r(hd, 16), w(gpa, 65536), w(s, 1)], s);
        assert_completed_ok(what, o);
        assert_same_data(
            what,
            &dev.mem().read(gpa, 65536),
            &pattern(sector * 512, 65536),
        );
    };
    let r0 = dev.mem().regions()[0].clone();
    let d0 = dev.buffer(65536, 4096, 0, 0);
    read_into(&mut dev, d0, 8, "a read into the first region");
    let r1 = MemRegion::new(64 * MIB, 8 * MIB);
    dev.fe.add_mem_reg(&r1).expect("ADD_MEM_REG");
    read_into(
        &mut dev,
        r1.gpa() + 4096,
        1024,
        "a read into an added region",
    );
    read_into(&mut dev, d0, 2048, "a read into the first region again");
    assert_fully_allocated(&r1, "the added region");
    wait_registered(
        &h,
        2,
        "8 MiB of guest memory in 1 region(s)",
        "the added region",
    );
    remove_and_wait_unmapped(&mut dev, pid, &r1, "a region added alone");
    // A new table maps both regions anew: they are registered together.
    let r2 = MemRegion::new(128 * MIB, 8 * MIB);
    dev.fe
        .set_mem_table(&[r0.clone(), r2.clone()])
        .expect("SET_MEM_TABLE");
    read_into(
        &mut dev,
        r2.gpa(),
        4096,
        "a read into a region of a new table",
    );
    read_into(
        &mut dev,
        d0,
        16,
        "a read into the first region of the new table",
    );
    assert_fully_allocated(&r2, "a region of the new table");
    // The new table maps both regions anew (at new addresses): both are registered.
    wait_registered(
        &h,
        3,
        "24 MiB of guest memory in 2 region(s)",
        "the new table",
    );
    remove_and_wait_unmapped(
        &mut dev,
        pid,
        &r2,
        "a region registered with one that stays",
    );
    read_into(&mut dev, d0, 32, "a read into the region that stayed");
    drop(dev);
    h.finish();
}

/// Waits until the daemon has logged `n` registrations taken over by export A's
/// iothread (the first is the initial table's), the last of them `expect` ("8 MiB of
/// guest memory in 1 region(s)").
fn wait_registered(h: &Harness, n: usize, expect: &str, what: &str) {
    const LINE: &str = "pinned for I/O on this iothread";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = h.daemon.stderr();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(LINE)).collect();
        if lines.len() >= n {
            assert!(lines[n - 1].contains(expect), "{what}: {}", lines[n - 1]);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not taken over by the iothread after 10 s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Registering a region with io_uring pins, and so allocates, every page of it: the
/// frontend's memory file is allocated in full (this test's regions are sparse
/// memfds of which the reads touch a few pages only). A helper thread of the daemon
/// pins it after the table changed: within a few seconds.
fn assert_fully_allocated(region: &MemRegion, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: an all-zero `stat` is a valid value to be overwritten by fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on the region's own descriptor into a local struct.
        assert_eq!(unsafe { libc::fstat(region.fd(), &mut st) }, 0);
        let allocated = st.st_blocks as u64 * 512;
        if allocated >= region.size() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {allocated} of {} bytes allocated after 10 s: not registered with \
             io_uring",
            region.size()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

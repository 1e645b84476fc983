//! The vhost-user features vubd offers, read with a hand-written frontend
//! (vubd_tests::vu_frontend) and checked against the dependencies of the vhost-user
//! specification (docs/interop/vhost-user.rst in QEMU) and what QEMU's vhost-user-blk
//! requires of a backend; qemu-storage-daemon's offer is read in the same test, put
//! through the same checks and printed next to vubd's.
//!
//! Each offered protocol feature is also exercised once: REPLY_ACK acks, MQ answers
//! GET_QUEUE_NUM, CONFIG answers GET_CONFIG, CONFIGURE_MEM_SLOTS answers
//! GET_MAX_MEM_SLOTS, INFLIGHT_SHMFD hands out a region of the specification's size,
//! LOG_SHMFD answers SET_LOG_BASE. Live migration turns logging on while the rings
//! run: SET_VRING_ADDR with VHOST_VRING_F_LOG on a started ring must be accepted.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use vubd_tests::vu_frontend::{
    feat, proto, req, Frontend, MemRegion, RingLayout, FLAG_NEED_REPLY, FLAG_REPLY,
};
use vubd_tests::{qsd_bin, vubd_bin, Daemon, DaemonArgs, TempDir, TempImage, MIB};

/// `VHOST_F_LOG_ALL`
const LOG_ALL: u64 = 1 << 26;
/// `VIRTIO_F_IOMMU_PLATFORM` (ACCESS_PLATFORM)
const IOMMU_PLATFORM: u64 = 1 << 33;
/// `VHOST_VRING_F_LOG`
const VRING_F_LOG: u32 = 1;
/// Queues of the exports under test.
const QUEUES: u64 = 2;
const QUEUE_SIZE: u16 = 128;

/// Protocol feature bits of the specification, by bit number.
const PROTOCOL_BITS: &[&str] = &[
    "MQ",
    "LOG_SHMFD",
    "RARP",
    "REPLY_ACK",
    "MTU",
    "BACKEND_REQ",
    "CROSS_ENDIAN",
    "CRYPTO_SESSION",
    "PAGEFAULT",
    "CONFIG",
    "BACKEND_SEND_FD",
    "HOST_NOTIFIER",
    "INFLIGHT_SHMFD",
    "RESET_DEVICE",
    "INBAND_NOTIFICATIONS",
    "CONFIGURE_MEM_SLOTS",
    "STATUS",
];

fn pf(name: &str) -> u64 {
    let bit = PROTOCOL_BITS
        .iter()
        .position(|n| *n == name)
        .unwrap_or_else(|| panic!("no protocol feature {name}"));
    1 << bit
}

/// Names of the feature bits vhost-user-blk cares about.
fn feature_name(bit: u32) -> String {
    match bit {
        1 => "BLK_SIZE_MAX".into(),
        2 => "BLK_SEG_MAX".into(),
        4 => "BLK_GEOMETRY".into(),
        5 => "BLK_RO".into(),
        6 => "BLK_BLK_SIZE".into(),
        9 => "BLK_FLUSH".into(),
        10 => "BLK_TOPOLOGY".into(),
        11 => "BLK_CONFIG_WCE".into(),
        12 => "BLK_MQ".into(),
        13 => "BLK_DISCARD".into(),
        14 => "BLK_WRITE_ZEROES".into(),
        24 => "NOTIFY_ON_EMPTY".into(),
        26 => "LOG_ALL".into(),
        27 => "ANY_LAYOUT".into(),
        28 => "RING_INDIRECT_DESC".into(),
        29 => "RING_EVENT_IDX".into(),
        30 => "PROTOCOL_FEATURES".into(),
        32 => "VERSION_1".into(),
        33 => "ACCESS_PLATFORM".into(),
        34 => "RING_PACKED".into(),
        35 => "IN_ORDER".into(),
        36 => "ORDER_PLATFORM".into(),
        37 => "SR_IOV".into(),
        38 => "NOTIFICATION_DATA".into(),
        b => format!("bit {b}"),
    }
}

fn names(bits: u64, name: impl Fn(u32) -> String) -> String {
    (0..64)
        .filter(|b| bits & (1 << b) != 0)
        .map(name)
        .collect::<Vec<_>>()
        .join(" ")
}

fn protocol_name(bit: u32) -> String {
    PROTOCOL_BITS
        .get(bit as usize)
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("bit {bit}"))
}

/// What a backend offers.
#[derive(Debug, Clone, Copy)]
struct Offer {
    features: u64,
    protocol: u64,
}

impl Offer {
    fn has(&self, name: &str) -> bool {
        self.protocol & pf(name) != 0
    }
}

/// A daemon with one writable export of a 64 MiB raw image, `QUEUES` queues.
fn start(bin: &Path, dir: &TempDir, img: &TempImage, name: &str) -> Daemon {
    let sock = dir.join(&format!("{name}.sock"));
    let args = DaemonArgs::new()
        .file_raw(name, img, "", "")
        .vhost_user_blk(name, &sock, &format!(",writable=on,num-queues={QUEUES}"))
        .build();
    Daemon::start_bin(bin, &args)
}

fn read_offer(fe: &mut Frontend) -> Offer {
    let features = fe.get_features().expect("GET_FEATURES");
    let protocol = if features & feat::PROTOCOL_FEATURES != 0 {
        fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES")
    } else {
        0
    };
    Offer { features, protocol }
}

/// Violations of the specification's dependencies between the bits offered.
fn dependency_problems(o: &Offer) -> Vec<String> {
    let mut p = Vec::new();
    let mut need = |cond: bool, what: &str| {
        if !cond {
            p.push(what.to_string());
        }
    };
    let f = |bit: u64| o.features & bit != 0;
    need(
        o.protocol == 0 || f(feat::PROTOCOL_FEATURES),
        "protocol features offered without VHOST_USER_F_PROTOCOL_FEATURES",
    );
    // The log is shared memory only with LOG_SHMFD; QEMU refuses to migrate with
    // LOG_ALL but no LOG_SHMFD, and a log without LOG_ALL is never turned on.
    need(
        !f(LOG_ALL) || o.has("LOG_SHMFD"),
        "VHOST_F_LOG_ALL without LOG_SHMFD (no way to share the log)",
    );
    need(
        !o.has("LOG_SHMFD") || f(LOG_ALL),
        "LOG_SHMFD without VHOST_F_LOG_ALL (logging can never be turned on)",
    );
    // In-band notifications need the backend channel and acks (the specification:
    // "considered an error to negotiate this feature without").
    need(
        !o.has("INBAND_NOTIFICATIONS") || (o.has("BACKEND_REQ") && o.has("REPLY_ACK")),
        "INBAND_NOTIFICATIONS without BACKEND_REQ and REPLY_ACK",
    );
    // Descriptors travel over the backend channel.
    need(
        !o.has("BACKEND_SEND_FD") || o.has("BACKEND_REQ"),
        "BACKEND_SEND_FD without BACKEND_REQ",
    );
    need(
        !o.has("HOST_NOTIFIER") || (o.has("BACKEND_REQ") && o.has("BACKEND_SEND_FD")),
        "HOST_NOTIFIER without BACKEND_REQ and BACKEND_SEND_FD",
    );
    // IOTLB misses go over the backend channel and are acked (QEMU checks this).
    need(
        !f(IOMMU_PLATFORM) || (o.has("BACKEND_REQ") && o.has("REPLY_ACK")),
        "ACCESS_PLATFORM without BACKEND_REQ and REPLY_ACK",
    );
    // Bits the specification does not define.
    need(
        o.protocol >> PROTOCOL_BITS.len() == 0,
        "protocol feature bits the specification does not define",
    );
    // QEMU's vhost-user-blk needs the configuration space (realize fails without it);
    // a configuration change reaches QEMU only over the backend channel.
    need(
        f(feat::PROTOCOL_FEATURES),
        "no VHOST_USER_F_PROTOCOL_FEATURES",
    );
    need(
        o.has("CONFIG"),
        "no CONFIG (QEMU's vhost-user-blk requires it)",
    );
    need(
        !o.has("CONFIG") || o.has("BACKEND_REQ"),
        "CONFIG without BACKEND_REQ (no way to announce a resize)",
    );
    need(f(feat::VERSION_1), "no VIRTIO_F_VERSION_1");
    // The specification: back-ends should always implement MQ.
    need(o.has("MQ"), "no MQ");
    p
}

/// Exercises each offered protocol feature once; returns what went wrong.
fn behaviour_problems(fe: &mut Frontend, o: &Offer) -> Vec<String> {
    let mut p = Vec::new();
    fe.set_protocol_features(o.protocol)
        .expect("SET_PROTOCOL_FEATURES");
    if let Err(e) = fe.set_owner() {
        p.push(format!("SET_OWNER: {e}"));
    }
    // REPLY_ACK: SET_FEATURES is acked with 0 (set_features asks for it).
    let acked = o.features & !(feat::RING_EVENT_IDX | IOMMU_PLATFORM | (1 << 34));
    if let Err(e) = fe.set_features(acked) {
        p.push(format!("SET_FEATURES {acked:#x} with NEED_REPLY: {e}"));
    }
    if o.has("MQ") {
        match fe.get_queue_num() {
            Ok(n) if n >= QUEUES => {}
            r => p.push(format!("GET_QUEUE_NUM: {r:?}, expected at least {QUEUES}")),
        }
    }
    if o.has("CONFIG") {
        match fe.get_config(0, 60) {
            Ok(c) if c.len() == 60 => {
                let capacity = u64::from_le_bytes(c[0..8].try_into().expect("8 bytes"));
                if capacity != 64 * MIB / 512 {
                    p.push(format!("GET_CONFIG: capacity {capacity} sectors"));
                }
            }
            r => p.push(format!("GET_CONFIG of 60 bytes: {r:?}")),
        }
    }
    if o.has("CONFIGURE_MEM_SLOTS") {
        match fe.get_max_mem_slots() {
            Ok(n) if n > 0 => {}
            r => p.push(format!("GET_MAX_MEM_SLOTS: {r:?}")),
        }
    }
    if o.has("INFLIGHT_SHMFD") {
        match fe.get_inflight_fd(QUEUES as u16, QUEUE_SIZE) {
            Ok(r) => {
                let need = (16 + 16 * u64::from(QUEUE_SIZE)).next_multiple_of(64) * QUEUES;
                if r.size < need || r.num_queues != QUEUES as u16 || r.queue_size != QUEUE_SIZE {
                    p.push(format!(
                        "GET_INFLIGHT_FD: {} bytes for {} queues of {} (need {need} for \
                         {QUEUES} of {QUEUE_SIZE})",
                        r.size, r.num_queues, r.queue_size
                    ));
                }
                if r.read(0, r.size as usize).iter().any(|&b| b != 0) {
                    p.push("GET_INFLIGHT_FD: a new region is not zeroed".into());
                }
            }
            Err(e) => p.push(format!("GET_INFLIGHT_FD: {e}")),
        }
    }
    if o.has("LOG_SHMFD") {
        // A log for 64 MiB of guest memory: one bit per 4 KiB page.
        let log = memfd(64 * MIB / 4096 / 8);
        let mut payload = Vec::new();
        payload.extend_from_slice(&(64 * MIB / 4096 / 8).to_le_bytes());
        payload.extend_from_slice(&0u64.to_le_bytes());
        let r = fe
            .conn
            .send(req::SET_LOG_BASE, 0, &payload, &[log.as_raw_fd()])
            .and_then(|()| fe.conn.recv());
        match r {
            Ok(m) if m.request == req::SET_LOG_BASE && m.flags & FLAG_REPLY != 0 => {}
            r => p.push(format!(
                "SET_LOG_BASE with LOG_SHMFD: expected a reply, got {r:?}"
            )),
        }
    }
    p
}

/// A memfd of `len` bytes.
fn memfd(len: u64) -> OwnedFd {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vubd-test-log".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor memfd_create just returned, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on the memfd we own.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
    assert_eq!(r, 0, "ftruncate: {}", std::io::Error::last_os_error());
    fd
}

#[test]
fn offered_features_follow_the_specification_and_are_compared_with_qsd() {
    let dir = TempDir::new("vubd-proto");
    let mut results = Vec::new();
    for (who, bin) in [("vubd", vubd_bin()), ("qemu-storage-daemon", qsd_bin())] {
        // Each daemon gets an image of its own (image locks).
        let img = TempImage::new(64 * MIB);
        let mut d = start(&bin, &dir, &img, &who.replace('-', "_"));
        let mut fe = Frontend::connect(d.socket()).expect("connect");
        let offer = read_offer(&mut fe);
        let deps = dependency_problems(&offer);
        let behaviour = behaviour_problems(&mut fe, &offer);
        d.assert_running("after the protocol checks");
        eprintln!(
            "{who}:\n  features {:#018x}: {}\n  protocol features {:#x}: {}",
            offer.features,
            names(offer.features, feature_name),
            offer.protocol,
            names(offer.protocol, protocol_name)
        );
        for problem in deps.iter().chain(&behaviour) {
            eprintln!("  problem: {problem}");
        }
        results.push((who, offer, deps, behaviour));
    }
    let (vubd, qsd) = (results[0].1, results[1].1);
    eprintln!(
        "vubd offers, qemu-storage-daemon does not: features {}; protocol {}\n\
         qemu-storage-daemon offers, vubd does not: features {}; protocol {}",
        names(vubd.features & !qsd.features, feature_name),
        names(vubd.protocol & !qsd.protocol, protocol_name),
        names(qsd.features & !vubd.features, feature_name),
        names(qsd.protocol & !vubd.protocol, protocol_name),
    );
    let (_, _, deps, behaviour) = &results[0];
    assert!(
        deps.is_empty() && behaviour.is_empty(),
        "vubd: {}",
        deps.iter()
            .chain(behaviour)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ")
    );
    // What the issue asks of vubd beyond the dependencies: migration (LOG_ALL with
    // LOG_SHMFD), acks, and in-flight tracking for restarts.
    for (bit, name) in [
        (vubd.features & LOG_ALL != 0, "VHOST_F_LOG_ALL"),
        (vubd.has("LOG_SHMFD"), "LOG_SHMFD"),
        (vubd.has("REPLY_ACK"), "REPLY_ACK"),
        (vubd.has("INFLIGHT_SHMFD"), "INFLIGHT_SHMFD"),
        (vubd.has("BACKEND_REQ"), "BACKEND_REQ"),
    ] {
        assert!(bit, "vubd does not offer {name}");
    }
    // Every feature qemu-storage-daemon's vhost-user-blk offers that a drop-in
    // replacement needs: the virtio-blk bits QEMU passes to the guest.
    let blk_bits = feat::BLK_SIZE_MAX
        | feat::BLK_SEG_MAX
        | feat::BLK_BLK_SIZE
        | feat::BLK_FLUSH
        | feat::BLK_CONFIG_WCE
        | feat::BLK_MQ
        | feat::BLK_DISCARD
        | feat::BLK_WRITE_ZEROES;
    assert_eq!(
        qsd.features & blk_bits & !vubd.features,
        0,
        "virtio-blk features qemu-storage-daemon offers and vubd does not: {}",
        names(qsd.features & blk_bits & !vubd.features, feature_name)
    );
}

/// QEMU turns dirty logging on for a running device when a migration starts:
/// SET_FEATURES with VHOST_F_LOG_ALL, SET_LOG_BASE, then SET_VRING_ADDR with
/// VHOST_VRING_F_LOG on each started ring (vhost_dev_set_log). A backend that refuses
/// makes QEMU 7.2 abort. Checked on vubd and, for reference, qemu-storage-daemon.
#[test]
fn logging_is_turned_on_while_the_rings_run() {
    let dir = TempDir::new("vubd-proto");
    let mut problems = Vec::new();
    for (who, bin) in [("vubd", vubd_bin()), ("qemu-storage-daemon", qsd_bin())] {
        let img = TempImage::new(64 * MIB);
        let mut d = start(&bin, &dir, &img, &who.replace('-', "_"));
        let mut fe = Frontend::connect(d.socket()).expect("connect");
        let offer = read_offer(&mut fe);
        assert!(
            offer.features & LOG_ALL != 0 && offer.has("LOG_SHMFD"),
            "{who} does not offer dirty logging"
        );
        fe.set_protocol_features(offer.protocol & (proto::MQ | proto::REPLY_ACK | pf("LOG_SHMFD")))
            .expect("SET_PROTOCOL_FEATURES");
        fe.set_owner().expect("SET_OWNER");
        let features = feat::VERSION_1 | feat::PROTOCOL_FEATURES | feat::BLK_FLUSH;
        fe.set_features(features).expect("SET_FEATURES");
        let mem = MemRegion::new(0, 4 * MIB);
        fe.set_mem_table(std::slice::from_ref(&mem))
            .expect("SET_MEM_TABLE");
        let layout = RingLayout::contiguous(0x1000, QUEUE_SIZE);
        let _q = fe.start_queue(0, layout).expect("start queue 0");
        // Logging on, as QEMU does it.
        let log = memfd(4 * MIB / 4096 / 8);
        fe.set_features(features | LOG_ALL)
            .expect("SET_FEATURES with LOG_ALL");
        let mut payload = Vec::new();
        payload.extend_from_slice(&(4 * MIB / 4096 / 8).to_le_bytes());
        payload.extend_from_slice(&0u64.to_le_bytes());
        fe.conn
            .send(req::SET_LOG_BASE, 0, &payload, &[log.as_raw_fd()])
            .expect("send SET_LOG_BASE");
        fe.conn.recv().expect("SET_LOG_BASE reply");
        let va = |gpa: u64| fe.mem.user_addr(gpa).expect("ring in memory");
        let mut p = Vec::with_capacity(40);
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&VRING_F_LOG.to_le_bytes());
        p.extend_from_slice(&va(layout.desc).to_le_bytes());
        p.extend_from_slice(&va(layout.used).to_le_bytes());
        p.extend_from_slice(&va(layout.avail).to_le_bytes());
        p.extend_from_slice(&layout.used.to_le_bytes());
        fe.conn
            .send(req::SET_VRING_ADDR, FLAG_NEED_REPLY, &p, &[])
            .expect("send SET_VRING_ADDR");
        match fe.expect_reply(req::SET_VRING_ADDR).and_then(|m| m.u64()) {
            Ok(0) => {
                eprintln!("{who}: SET_VRING_ADDR with VHOST_VRING_F_LOG on a running ring: ok")
            }
            r => {
                eprintln!("{who}: SET_VRING_ADDR with VHOST_VRING_F_LOG on a running ring: {r:?}");
                problems.push(format!(
                    "{who} refuses SET_VRING_ADDR with VHOST_VRING_F_LOG on a running ring \
                     ({r:?}); QEMU aborts the migration's source when it does"
                ));
            }
        }
        d.assert_running("after turning logging on");
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

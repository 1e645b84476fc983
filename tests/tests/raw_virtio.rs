//! Requests libblkio cannot send, through the raw virtio-blk client: GET_ID, unsupported
//! request types, and descriptor chains with a wrong layout. A malformed chain must fail
//! with IOERR or UNSUPP, or the device stops the queue (the virtio spec allows either);
//! the daemon survives and serves the next frontend. (tests/tests/hostile_frontend.rs
//! goes further, with a frontend of our own that controls the rings directly.)

use std::time::Duration;
use vubd_tests::raw::{
    STATUS_UNTOUCHED, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_GET_LIFETIME, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_SECURE_ERASE,
};
use vubd_tests::{
    assert_same_data, simple_file_export, Client, Daemon, RawClient, RawDesc, Rng, TempDir,
    TempImage, MIB,
};

fn setup(export_extra: &str) -> (TempDir, TempImage, Daemon) {
    let dir = TempDir::new("vubd-t");
    let sock = dir.join("vubd.sock");
    let img = TempImage::new_filled(4 * MIB, 0x5C);
    let daemon = Daemon::start(&simple_file_export(&img, &sock, 1, "", export_extra));
    (dir, img, daemon)
}

#[test]
fn get_id_returns_serial() {
    let (_dir, _img, mut daemon) = setup(",serial=disk0-serial");
    let mut raw = RawClient::connect(daemon.socket());
    let id = raw
        .get_id()
        .unwrap_or_else(|s| panic!("GET_ID failed with status {s}"));
    let expected = b"disk0-serial";
    assert_eq!(&id[..expected.len()], expected, "GET_ID: {id:02x?}");
    // NUL-terminated (the spec says NUL-padded; QEMU writes one NUL and leaves the rest).
    assert_eq!(
        id[expected.len()],
        0,
        "GET_ID: no NUL after the serial: {id:02x?}"
    );

    // A 20-character serial fills the buffer without a terminator.
    drop(raw);
    daemon.assert_running("after GET_ID");
    let (_dir, _img, daemon) = setup(",serial=ABCDEFGHIJKLMNOPQRST");
    let mut raw = RawClient::connect(daemon.socket());
    assert_eq!(&raw.get_id().expect("GET_ID"), b"ABCDEFGHIJKLMNOPQRST");

    // A GET_ID buffer shorter than 20 bytes gets a truncated serial, not an overflow.
    raw.buf()[..32].fill(0xCC);
    let st = raw.request(VIRTIO_BLK_T_GET_ID, 0, &RawDesc::chain(&[(0..8, true)]));
    if st == VIRTIO_BLK_S_OK {
        assert_eq!(&raw.buf()[..8], b"ABCDEFGH");
    }
    assert!(
        raw.buf()[8..32].iter().all(|&b| b == 0xCC),
        "GET_ID wrote past an 8-byte buffer"
    );
}

#[test]
fn get_id_without_serial() {
    let (_dir, _img, daemon) = setup("");
    let mut raw = RawClient::connect(daemon.socket());
    let id = raw
        .get_id()
        .unwrap_or_else(|s| panic!("GET_ID failed with status {s}"));
    let len = id.iter().position(|&b| b == 0).unwrap_or(id.len());
    assert!(len > 0, "empty GET_ID answer: {id:02x?}");
    assert!(
        id[..len].iter().all(|b| b.is_ascii_graphic()),
        "GET_ID answer is not a printable string: {id:02x?}"
    );
    eprintln!("default serial: {:?}", String::from_utf8_lossy(&id[..len]));
}

#[test]
fn unsupported_request_types() {
    let (_dir, _img, mut daemon) = setup("");
    let mut raw = RawClient::connect(daemon.socket());
    for t in [
        VIRTIO_BLK_T_GET_LIFETIME,
        VIRTIO_BLK_T_SECURE_ERASE,
        3,
        99,
        0x7fff_ffff,
    ] {
        let st = raw.request(t, 0, &RawDesc::chain(&[(0..512, true)]));
        assert_eq!(st, VIRTIO_BLK_S_UNSUPP, "request type {t}: status {st}");
    }
    daemon.assert_running("after unsupported requests");
    assert_eq!(raw.read(0, 512).expect("read"), vec![0x5C; 512]);
}

#[test]
fn well_formed_raw_requests() {
    let (_dir, img, _daemon) = setup("");
    let mut raw = RawClient::connect(_daemon.socket());
    let mut rng = Rng::new("well_formed_raw_requests");
    // Header and data in separate descriptors, data split in odd pieces.
    let data = rng.bytes(4096);
    raw.buf()[..4096].copy_from_slice(&data);
    let st = raw.request(
        VIRTIO_BLK_T_OUT,
        8,
        &RawDesc::chain(&[(0..1, false), (1..1000, false), (1000..4096, false)]),
    );
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(
        raw.request(VIRTIO_BLK_T_FLUSH, 0, &RawDesc::chain(&[])),
        VIRTIO_BLK_S_OK
    );
    assert_same_data("file", &img.read_at(4096, 4096), &data);
    raw.buf()[..8192].fill(0);
    let st = raw.request(
        VIRTIO_BLK_T_IN,
        8,
        &RawDesc::chain(&[(0..3000, true), (5000..6096, true)]),
    );
    assert_eq!(st, VIRTIO_BLK_S_OK);
    let mut got = raw.buf()[..3000].to_vec();
    got.extend_from_slice(&raw.buf()[5000..6096]);
    assert_same_data("raw split read", &got, &data);
}

/// What a malformed chain completes with.
enum Expect {
    /// IOERR or UNSUPP in the status byte (virtio 1.2 5.2.6.1: the device fails a request
    /// it cannot carry out; vubd's parser refuses every chain below with one of them).
    Error,
    /// The chain has no device-writable byte where the driver put its status (none at
    /// all, only a device-readable one, a zero-length one, or one outside guest memory):
    /// the device cannot report there and must not write it.
    NoStatus,
}

fn expected_status(what: &str) -> Expect {
    match what {
        "header only"
        | "status device-readable"
        | "zero-length status"
        | "status in unmapped memory" => Expect::NoStatus,
        _ => Expect::Error,
    }
}

/// Each malformed request on its own connection: it fails with IOERR or UNSUPP (or,
/// where the chain has nowhere to put a status, leaves the status byte alone), or the
/// device stops the queue. After each, the daemon must still run and a fresh libblkio
/// client must get correct data.
#[test]
fn malformed_chains_do_not_kill_the_daemon() {
    let (_dir, img, mut daemon) = setup("");
    let unmapped = 0x7fff_dead_0000u64;
    let cases: Vec<(&str, u32, Vec<RawDesc>)> = vec![
        (
            "header only",
            VIRTIO_BLK_T_IN,
            vec![RawDesc::Header { len: 16 }],
        ),
        (
            "short header",
            VIRTIO_BLK_T_IN,
            vec![
                RawDesc::Header { len: 8 },
                RawDesc::Data {
                    buf: 0..512,
                    from_dev: true,
                },
                RawDesc::Status {
                    len: 1,
                    writable: true,
                },
            ],
        ),
        (
            "header device-writable",
            VIRTIO_BLK_T_IN,
            vec![
                RawDesc::HeaderWritable,
                RawDesc::Data {
                    buf: 0..512,
                    from_dev: true,
                },
                RawDesc::Status {
                    len: 1,
                    writable: true,
                },
            ],
        ),
        (
            "status device-readable",
            VIRTIO_BLK_T_IN,
            vec![
                RawDesc::Header { len: 16 },
                RawDesc::Data {
                    buf: 0..512,
                    from_dev: true,
                },
                RawDesc::Status {
                    len: 1,
                    writable: false,
                },
            ],
        ),
        (
            "zero-length status",
            VIRTIO_BLK_T_OUT,
            vec![
                RawDesc::Header { len: 16 },
                RawDesc::Data {
                    buf: 0..512,
                    from_dev: false,
                },
                RawDesc::Status {
                    len: 0,
                    writable: true,
                },
            ],
        ),
        (
            "read into device-readable buffer",
            VIRTIO_BLK_T_IN,
            vec![
                RawDesc::Header { len: 16 },
                RawDesc::Data {
                    buf: 0..512,
                    from_dev: false,
                },
                RawDesc::Status {
                    len: 1,
                    writable: true,
                },
            ],
        ),
        (
            "write from device-writable buffer",
            VIRTIO_BLK_T_OUT,
            vec![
                RawDesc::Header { len: 16 },
                RawDesc::Data {
                    buf: 0..512,
                    from_dev: true,
                },
                RawDesc::Status {
                    len: 1,
                    writable: true,
                },
            ],
        ),
        (
            "data length not a multiple of 512",
            VIRTIO_BLK_T_OUT,
            RawDesc::chain(&[(0..700, false)]),
        ),
        (
            "read into unmapped memory",
            VIRTIO_BLK_T_IN,
            vec![
                RawDesc::Header { len: 16 },
                RawDesc::Unmapped {
                    addr: unmapped,
                    len: 4096,
                    from_dev: true,
                },
                RawDesc::Status {
                    len: 1,
                    writable: true,
                },
            ],
        ),
        (
            "write from unmapped memory",
            VIRTIO_BLK_T_OUT,
            vec![
                RawDesc::Header { len: 16 },
                RawDesc::Unmapped {
                    addr: unmapped,
                    len: 4096,
                    from_dev: false,
                },
                RawDesc::Status {
                    len: 1,
                    writable: true,
                },
            ],
        ),
        (
            "data crossing the end of mapped memory",
            VIRTIO_BLK_T_IN,
            vec![
                RawDesc::Header { len: 16 },
                RawDesc::Data {
                    buf: (1 << 20) - 512..1 << 20,
                    from_dev: true,
                },
                RawDesc::Unmapped {
                    addr: unmapped,
                    len: 512,
                    from_dev: true,
                },
                RawDesc::Status {
                    len: 1,
                    writable: true,
                },
            ],
        ),
        (
            "status in unmapped memory",
            VIRTIO_BLK_T_IN,
            vec![
                RawDesc::Header { len: 16 },
                RawDesc::Data {
                    buf: 0..512,
                    from_dev: true,
                },
                RawDesc::Unmapped {
                    addr: unmapped,
                    len: 1,
                    from_dev: true,
                },
            ],
        ),
        (
            "huge data descriptor",
            VIRTIO_BLK_T_IN,
            vec![
                RawDesc::Header { len: 16 },
                RawDesc::Unmapped {
                    addr: unmapped,
                    len: 0xffff_f000,
                    from_dev: true,
                },
                RawDesc::Status {
                    len: 1,
                    writable: true,
                },
            ],
        ),
    ];
    for (what, t, chain) in cases {
        let mut raw = RawClient::connect(daemon.socket());
        raw.buf()[..4096].fill(0x99);
        let id = raw.submit(t, 0, &chain);
        // Follow with a valid read on the same queue: if the malformed request does not
        // complete, neither may this one (the device stopped the queue); a device that
        // drops a request silently and goes on would leave the guest waiting forever.
        let good = raw.submit(VIRTIO_BLK_T_IN, 0, &RawDesc::chain(&[(8192..8704, true)]));
        let bad = raw.wait_timeout(id, Duration::from_secs(2));
        let good = raw.wait_timeout(
            good,
            Duration::from_millis(if bad.is_some() { 2000 } else { 500 }),
        );
        match bad {
            Some(req) => {
                let st = req.status[0];
                match expected_status(what) {
                    Expect::Error => assert!(
                        st == VIRTIO_BLK_S_IOERR || st == VIRTIO_BLK_S_UNSUPP,
                        "'{what}': status {st:#x}, expected IOERR or UNSUPP"
                    ),
                    Expect::NoStatus => assert_eq!(
                        st, STATUS_UNTOUCHED,
                        "'{what}': the chain has no writable status byte there, but the \
                         device wrote {st:#x} into it"
                    ),
                }
                eprintln!("{what}: status {st:#x}");
            }
            None => {
                assert!(
                    good.is_none(),
                    "'{what}': the request never completed, but a later valid one did (the \
                     device dropped it silently)"
                );
                eprintln!("{what}: the device stopped the queue");
            }
        }
        if what == "read into device-readable buffer" {
            assert!(
                raw.buf()[..512].iter().all(|&b| b == 0x99),
                "the daemon wrote into a device-readable descriptor"
            );
        }
        drop(raw);
        daemon.assert_running(what);

        let mut c = Client::connect(daemon.socket(), 1);
        let got = c
            .q()
            .read_poisoned(0, 4096, 0)
            .unwrap_or_else(|e| panic!("read on a new connection after '{what}' failed: {e}"));
        assert!(
            got.iter().all(|&b| b == 0x5C),
            "after '{what}': the disk content changed"
        );
    }
    let whole = img.read_all();
    assert!(
        whole.iter().all(|&b| b == 0x5C),
        "a malformed request modified the image"
    );
}

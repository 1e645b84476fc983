//! Read-only exports: `writable=off` (the default) and a `read-only=on` node.
//!
//! A read-only export offers VIRTIO_BLK_F_RO. libblkio then refuses to start unless its
//! `read-only` property is set, and in read-only mode it fails writes itself (-EBADF)
//! without sending them. So the daemon's own rejection of writes is checked with the raw
//! client, which does not negotiate VIRTIO_BLK_F_RO and sends the write anyway.

use blkio::{Errno, ReqFlags};
use vubd_tests::raw::{VIRTIO_BLK_F_RO, VIRTIO_BLK_S_OK};
use vubd_tests::{
    assert_same_data, Client, ClientOptions, Daemon, DaemonArgs, RawClient, Rng, TempDir,
    TempImage, MIB,
};

fn check_read_only_export(args: &[String], img: &TempImage, contents: &[u8]) {
    let mut daemon = Daemon::start(args);

    // Without read-only, libblkio refuses to start on a RO device: this shows the daemon
    // offers VIRTIO_BLK_F_RO.
    let rw = ClientOptions::default();
    match Client::try_connect(daemon.socket(), &rw) {
        Err(("start", e)) if e.errno() == Errno::ROFS => {}
        Err((step, e)) => panic!("unexpected failure at {step}: {e} ({:?})", e.errno()),
        Ok(_) => panic!("read-only export did not offer VIRTIO_BLK_F_RO"),
    }

    let ro = ClientOptions {
        read_only: true,
        ..Default::default()
    };
    let mut client = Client::connect_with(daemon.socket(), &ro).expect("read-only connect");
    assert_eq!(client.capacity(), img.size());
    let got = client.q().read(MIB, 64 * 1024).expect("read");
    assert_same_data(
        "read",
        &got,
        &contents[MIB as usize..(MIB + 64 * 1024) as usize],
    );

    // Writes fail (here already in libblkio), the next read works.
    assert!(client.q().write(MIB, &[1u8; 4096]).is_err());
    assert!(client.q().write_zeroes(0, 4096, ReqFlags::empty()).is_err());
    assert!(client.q().discard(0, 4096).is_err());
    let got = client.q().read(0, 4096).expect("read after failed write");
    assert_same_data("read after failed write", &got, &contents[..4096]);
    drop(client);

    // The daemon itself rejects writes: raw frontend without VIRTIO_BLK_F_RO.
    let mut raw = RawClient::connect(daemon.socket());
    assert_eq!(raw.features() & VIRTIO_BLK_F_RO, 0);
    let r = raw.write(2 * MIB, &[0x99u8; 8192]);
    assert!(
        matches!(r, Err(s) if s != VIRTIO_BLK_S_OK),
        "the daemon accepted a write on a read-only export: {r:?}"
    );
    let got = raw
        .read(2 * MIB, 8192)
        .expect("raw read after rejected write");
    assert_same_data(
        "raw read after rejected write",
        &got,
        &contents[2 * MIB as usize..2 * MIB as usize + 8192],
    );
    let st = raw.request(
        vubd_tests::raw::VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &[
            vubd_tests::RawDesc::Header { len: 16 },
            vubd_tests::RawDesc::Dwz,
            vubd_tests::RawDesc::Status {
                len: 1,
                writable: true,
            },
        ],
    );
    assert_ne!(
        st, VIRTIO_BLK_S_OK,
        "write-zeroes accepted on a read-only export"
    );
    drop(raw);
    daemon.assert_running("after writes to a read-only export");
    assert_same_data("host file unchanged", &img.read_all(), contents);
}

#[test]
fn writable_off_export_is_read_only() {
    let mut rng = Rng::new("writable_off_export_is_read_only");
    let dir = TempDir::new("vubd-t");
    let sock = dir.join("vubd.sock");
    let (img, contents) = TempImage::new_random(4 * MIB, &mut rng);
    let args = DaemonArgs::new()
        .file_raw("disk0", &img, "", "")
        .vhost_user_blk("disk0", &sock, ",writable=off")
        .build();
    check_read_only_export(&args, &img, &contents);
}

#[test]
fn default_export_is_read_only() {
    let mut rng = Rng::new("default_export_is_read_only");
    let dir = TempDir::new("vubd-t");
    let sock = dir.join("vubd.sock");
    let (img, contents) = TempImage::new_random(4 * MIB, &mut rng);
    let args = DaemonArgs::new()
        .file_raw("disk0", &img, "", "")
        .vhost_user_blk("disk0", &sock, "")
        .build();
    check_read_only_export(&args, &img, &contents);
}

#[test]
fn read_only_node_export_is_read_only() {
    let mut rng = Rng::new("read_only_node_export_is_read_only");
    let dir = TempDir::new("vubd-t");
    let sock = dir.join("vubd.sock");
    let (img, contents) = TempImage::new_random(4 * MIB, &mut rng);
    let args = DaemonArgs::new()
        .file_raw("disk0", &img, ",read-only=on", ",read-only=on")
        .vhost_user_blk("disk0", &sock, "")
        .build();
    check_read_only_export(&args, &img, &contents);
}

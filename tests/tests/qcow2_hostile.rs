//! Corrupt and hostile qcow2 images added to a running daemon over QMP: each is
//! refused with a clear error, or opens and then fails the requests that reach the
//! damage with EIO, raises BLOCK_IMAGE_CORRUPTED and leaves the image marked
//! corrupt. Meanwhile another export keeps serving and verifying data.

use serde_json::json;
use std::time::Duration;
use vubd_tests::{assert_same_data, Client, Daemon, DaemonArgs, Qmp, TempDir, MIB};

use vubd_tests::tools::{qemu_img, qemu_io};

fn be64(d: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(d[o..o + 8].try_into().unwrap())
}

fn put64(d: &mut [u8], o: usize, v: u64) {
    d[o..o + 8].copy_from_slice(&v.to_be_bytes());
}

/// What a damaged image must lead to.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Expect {
    /// blockdev-add fails with an error naming the problem.
    Refused(&'static str),
    /// It opens; reading the first MiB fails, the event fires, the corrupt bit is set.
    CorruptOnRead,
    /// It opens and reads; the first write that would use the damage fails, the
    /// event fires, the corrupt bit is set.
    CorruptOnWrite,
}

#[test]
fn hostile_qcow2_images_over_qmp_leave_other_exports_serving() {
    let dir = TempDir::new("vubd-qcow2-hostile");
    let good = dir.join("good.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", good.to_str().unwrap(), "16M"]);
    qemu_io(&good, "qcow2", &["write -P 0x11 0 256k"]);
    let hdr = std::fs::read(&good).unwrap();
    let l1 = be64(&hdr, 40) as usize;
    let rt = be64(&hdr, 48) as usize;
    let l2 = (be64(&hdr, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let rb = be64(&hdr, rt) as usize;
    type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mutation, Expect)> = vec![
        (
            "truncated L1",
            Box::new(move |d| d.truncate(l1 + 4)),
            Expect::Refused("L1"),
        ),
        (
            "L1 larger than the file",
            Box::new(|d| d[36..40].copy_from_slice(&0x0100_0000u32.to_be_bytes())),
            Expect::Refused("L1"),
        ),
        (
            "huge size",
            Box::new(|d| d[24..32].copy_from_slice(&u64::MAX.to_be_bytes())),
            Expect::Refused("size"),
        ),
        (
            "refcount table huge",
            Box::new(|d| d[56..60].copy_from_slice(&u32::MAX.to_be_bytes())),
            Expect::Refused("refcount"),
        ),
        (
            "unknown incompatible bit",
            Box::new(|d| d[79] |= 1 << 6),
            Expect::Refused("feature"),
        ),
        ("LUKS", Box::new(|d| d[35] = 2), Expect::Refused("encrypt")),
        (
            "L2 entry past EOF",
            Box::new(move |d| put64(d, l2, (1u64 << 40) | (1 << 63))),
            Expect::CorruptOnRead,
        ),
        (
            "L2 entry into the L1 table",
            Box::new(move |d| put64(d, l2 + 8, l1 as u64 | (1 << 63))),
            Expect::CorruptOnRead,
        ),
        (
            "L1 entry into the refcount table",
            Box::new(move |d| put64(d, l1, rt as u64 | (1 << 63))),
            Expect::CorruptOnRead,
        ),
        (
            "refcount zero for used clusters",
            Box::new(move |d| d[rb..rb + 64].fill(0)),
            Expect::CorruptOnWrite,
        ),
    ];

    // The export that must keep working throughout.
    let qs = dir.join("qmp.sock");
    let other = dir.join("other.raw");
    std::fs::write(&other, vec![0u8; 4 * MIB as usize]).unwrap();
    let other_sock = dir.join("other.sock");
    let args = DaemonArgs::new()
        .monitor(&qs)
        .file_raw_path("other", &other, "", "")
        .vhost_user_blk("other", &other_sock, ",writable=on")
        .build();
    let mut daemon = Daemon::start(&args);
    let mut q = Qmp::connect(&qs);
    let mut keep = Client::connect(&other_sock, 1);

    for (i, (name, mutate, expect)) in cases.into_iter().enumerate() {
        let img = dir.join(&format!("bad{i}.qcow2"));
        let mut d = std::fs::read(&good).unwrap();
        mutate(&mut d);
        std::fs::write(&img, &d).unwrap();
        let (f, n) = (format!("f{i}"), format!("q{i}"));
        q.ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": f, "filename": img.to_str().unwrap()}),
        );
        let added = q.execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": n, "file": f}),
        );
        match expect {
            Expect::Refused(word) => {
                let e = added.expect_err(name);
                assert_eq!(e.class, "GenericError", "{name}");
                assert!(
                    e.desc.to_lowercase().contains(&word.to_lowercase()),
                    "{name}: error does not say what is wrong: {}",
                    e.desc
                );
                eprintln!("{name}: {}", e.desc);
            }
            Expect::CorruptOnRead | Expect::CorruptOnWrite => {
                added.unwrap_or_else(|e| panic!("{name}: refused: {}", e.desc));
                let sock = dir.join(&format!("bad{i}.sock"));
                q.ok(
                    "block-export-add",
                    json!({"type": "vhost-user-blk", "id": format!("e{i}"), "node-name": n,
                           "writable": true,
                           "addr": {"type": "unix", "path": sock.to_str().unwrap()}}),
                );
                let mut c = Client::connect(&sock, 1);
                let read = c.q().read(0, MIB as usize);
                // A write that allocates a new cluster, and one into existing data.
                let w1 = c.q().write(8 * MIB, &[0x22u8; 4096]);
                let w2 = c.q().write(4096, &[0x33u8; 4096]);
                let flushed = c.q().flush();
                eprintln!(
                    "{name}: read {:?} writes {w1:?} {w2:?} flush {flushed:?}",
                    read.as_ref().map(|_| ())
                );
                drop(c);
                let event = q.wait_event("BLOCK_IMAGE_CORRUPTED", Duration::from_secs(1));
                if expect == Expect::CorruptOnRead {
                    assert_eq!(read.err(), Some(-libc::EIO), "{name}: read");
                } else {
                    assert!(read.is_ok(), "{name}: read");
                    assert_eq!(w1, Err(-libc::EIO), "{name}: allocating write");
                }
                // Once corrupt, the image takes no more writes.
                assert_eq!(w2, Err(-libc::EIO), "{name}: write");
                let ev = event.unwrap_or_else(|| panic!("{name}: no event"));
                assert_eq!(ev["data"]["node-name"], n, "{ev}");
                assert_eq!(ev["data"]["fatal"], true, "{ev}");
                assert!(ev["data"]["msg"].as_str().unwrap().len() > 10, "{ev}");
                // Only the first corruption is reported.
                assert!(
                    q.wait_event("BLOCK_IMAGE_CORRUPTED", Duration::from_millis(200))
                        .is_none(),
                    "{name}: a second event"
                );
                q.ok("block-export-del", json!({"id": format!("e{i}")}));
                q.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(5))
                    .unwrap_or_else(|| panic!("{name}: export not deleted"));
                q.ok("blockdev-del", json!({"node-name": n}));
                {
                    let info = qemu_img(&["info", "-U", "--output=json", img.to_str().unwrap()]);
                    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
                    assert_eq!(
                        info["format-specific"]["data"]["corrupt"], true,
                        "{name}: {info}"
                    );
                }
            }
        }
        q.ok("blockdev-del", json!({"node-name": f}));
        // The other export still reads back what it wrote.
        let data = vec![i as u8 + 1; 64 * 1024];
        keep.q()
            .write(i as u64 * MIB / 4, &data)
            .expect("other export write");
        assert_same_data(
            name,
            &keep.q().read(i as u64 * MIB / 4, data.len()).unwrap(),
            &data,
        );
    }
    drop(keep);
    assert_eq!(daemon.terminate().code(), Some(0));
}

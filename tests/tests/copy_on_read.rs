//! The `copy-on-read` filter through a real frontend: a libblkio client reads a qcow2
//! chain (base <- mid <- top, made by qemu-img and qemu-io) through a copy-on-read
//! node over top. Afterwards `qemu-img map` finds the ranges that were read allocated
//! in top itself (only those the layers down to `bottom` had, when `bottom` is
//! given), `qemu-img compare` finds top equal to what the guest read and wrote,
//! `qemu-img check` finds no errors, and the lower images are untouched. Reads and
//! writes of the same ranges in one batch show that a copy never puts older data from
//! the chain over a guest write.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use vubd_tests::tools::{qemu_img, qemu_io};
use vubd_tests::{assert_same_data, Client, Daemon, DaemonArgs, Req, Rng, TempDir, MIB};

const SIZE: u64 = 8 * MIB;
const KIB: u64 = 1024;

struct Chain {
    base: PathBuf,
    mid: PathBuf,
    top: PathBuf,
    /// What the guest sees: base 0x11 everywhere, mid 0x22 at 2 MiB (1 MiB), top 0x33
    /// at 5 MiB (512 KiB).
    model: Vec<u8>,
}

fn make_chain(dir: &TempDir) -> Chain {
    let p = |n: &str| dir.join(&format!("{n}.qcow2"));
    let (base, mid, top) = (p("base"), p("mid"), p("top"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&base), "8M"]);
    qemu_io(&base, "qcow2", &["write -P 0x11 0 8M"]);
    for (img, backing) in [(&mid, &base), (&top, &mid)] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &s(backing),
            "-F",
            "qcow2",
            &s(img),
            "8M",
        ]);
    }
    qemu_io(&mid, "qcow2", &["write -P 0x22 2M 1M"]);
    qemu_io(&top, "qcow2", &["write -P 0x33 5M 512k"]);
    let mut model = vec![0x11u8; SIZE as usize];
    model[(2 * MIB) as usize..(3 * MIB) as usize].fill(0x22);
    model[(5 * MIB) as usize..(5 * MIB + 512 * KIB) as usize].fill(0x33);
    Chain {
        base,
        mid,
        top,
        model,
    }
}

/// Serves the chain (every layer a named node) through `copy-on-read` over top,
/// with `bottom` if given, as a writable export; `top_extra` is appended to the
/// options of top's file node.
fn serve(dir: &TempDir, c: &Chain, bottom: Option<&str>, top_extra: &str) -> (Daemon, Client) {
    let sock = dir.join("cor.sock");
    let bottom = bottom.map(|b| format!(",bottom={b}")).unwrap_or_default();
    let args = DaemonArgs::new()
        .blockdev(&format!(
            "driver=file,node-name=base-f,filename={},read-only=on",
            c.base.display()
        ))
        .blockdev("driver=qcow2,node-name=base,file=base-f,read-only=on,backing=null")
        .blockdev(&format!(
            "driver=file,node-name=mid-f,filename={},read-only=on",
            c.mid.display()
        ))
        .blockdev("driver=qcow2,node-name=mid,file=mid-f,read-only=on,backing=base")
        .blockdev(&format!(
            "driver=file,node-name=top-f,filename={}{top_extra}",
            c.top.display()
        ))
        .blockdev("driver=qcow2,node-name=top,file=top-f,backing=mid")
        .blockdev(&format!(
            "driver=copy-on-read,node-name=cor,file=top{bottom}"
        ))
        .export(&format!(
            "type=vhost-user-blk,id=e,node-name=cor,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .build();
    let daemon = Daemon::start(&args);
    let client = Client::connect(&sock, 1);
    (daemon, client)
}

fn read_all(c: &mut Client) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIZE as usize);
    let mut pos = 0;
    while pos < SIZE {
        let n = (SIZE - pos).min(256 * KIB) as usize;
        out.extend(c.q().read(pos, n).expect("read"));
        pos += n as u64;
    }
    out
}

/// The layers (`depth` in `qemu-img map`) that the data of `start..start+len` of
/// `img` comes from.
fn depths(img: &Path, start: u64, len: u64) -> BTreeSet<u64> {
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            s < start + len && start < s + l
        })
        .map(|e| e["depth"].as_u64().unwrap())
        .collect()
}

/// `qemu-img check` finds nothing and `qemu-img compare` finds `img` equal to `model`.
fn check_image(dir: &TempDir, img: &Path, model: &[u8]) {
    let out = Command::new("qemu-img")
        .args(["check", img.to_str().unwrap()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-img check:\n{text}");
    assert!(text.contains("No errors were found"), "{text}");
    assert!(!text.contains("leaked"), "{text}");
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
}

/// Reads everything through the filter (twice), stops vubd and checks the images.
fn read_through(dir: &TempDir, c: &Chain, bottom: Option<&str>, top_extra: &str) {
    let lower = (
        std::fs::read(&c.base).unwrap(),
        std::fs::read(&c.mid).unwrap(),
    );
    let (mut daemon, mut client) = serve(dir, c, bottom, top_extra);
    assert_same_data(
        "read through copy-on-read",
        &read_all(&mut client),
        &c.model,
    );
    // A second pass reads what the first copied.
    assert_same_data("second read", &read_all(&mut client), &c.model);
    drop(client);
    assert_eq!(daemon.terminate().code(), Some(0), "vubd exit");
    check_image(dir, &c.top, &c.model);
    assert_eq!(
        (
            std::fs::read(&c.base).unwrap(),
            std::fs::read(&c.mid).unwrap()
        ),
        lower,
        "the lower layers changed"
    );
}

#[test]
fn reads_copy_the_chain_into_top() {
    let dir = TempDir::new("vubd-cor-all");
    let c = make_chain(&dir);
    assert_eq!(depths(&c.top, 0, 2 * MIB), BTreeSet::from([2]));
    read_through(&dir, &c, None, "");
    assert_eq!(depths(&c.top, 0, SIZE), BTreeSet::from([0]));
}

/// The same with O_DIRECT on top's file: copies respect its request alignment.
#[test]
fn reads_copy_the_chain_into_top_with_direct_io() {
    let dir = TempDir::new("vubd-cor-direct");
    let c = make_chain(&dir);
    read_through(&dir, &c, None, ",cache.direct=on");
    assert_eq!(depths(&c.top, 0, SIZE), BTreeSet::from([0]));
}

#[test]
fn bottom_limits_the_copy_to_the_layers_down_to_it() {
    let dir = TempDir::new("vubd-cor-bottom");
    let c = make_chain(&dir);
    read_through(&dir, &c, Some("mid"), "");
    // From mid and top: in top now; from base (below the bottom): still in base.
    assert_eq!(depths(&c.top, 2 * MIB, MIB), BTreeSet::from([0]));
    assert_eq!(depths(&c.top, 5 * MIB, 512 * KIB), BTreeSet::from([0]));
    for (start, len) in [
        (0, 2 * MIB),
        (3 * MIB, 2 * MIB),
        (5 * MIB + 512 * KIB, 2560 * KIB),
    ] {
        assert_eq!(
            depths(&c.top, start, len),
            BTreeSet::from([2]),
            "{start}+{len}"
        );
    }
}

/// Each batch reads a range that top does not have, writes new data there and reads
/// it again, all in flight at once: the copy and the write are serialised, so the
/// write's data is what stays (a copy that read the chain before the write and wrote
/// after it would put the old data back).
#[test]
fn copies_never_overwrite_concurrent_writes() {
    let dir = TempDir::new("vubd-cor-race");
    let mut c = make_chain(&dir);
    let (mut daemon, mut client) = serve(&dir, &c, None, "");
    let mut rng = Rng::new("cor-race");
    let len = 64 * KIB;
    let n = len as usize;
    for i in 0..SIZE / len {
        let off = i * len;
        let data = rng.bytes(n);
        client.q().buf()[2 * n..3 * n].copy_from_slice(&data);
        let rets = client.q().submit(&[
            Req::Read {
                offset: off,
                buf: 0..n,
            },
            Req::Write {
                offset: off,
                buf: 2 * n..3 * n,
                flags: blkio::ReqFlags::empty(),
            },
            Req::Read {
                offset: off,
                buf: n..2 * n,
            },
        ]);
        assert_eq!(rets, vec![0, 0, 0], "batch at {off}");
        c.model[off as usize..off as usize + n].copy_from_slice(&data);
    }
    client.q().flush().expect("flush");
    assert_same_data("after the batches", &read_all(&mut client), &c.model);
    drop(client);
    assert_eq!(daemon.terminate().code(), Some(0), "vubd exit");
    check_image(&dir, &c.top, &c.model);
}

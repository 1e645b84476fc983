//! Named dirty bitmaps see the guest's writes, write-zeroes (with and without unmap)
//! and discards, sent through libblkio, and nothing else: the count and SHA-256 that
//! QMP reports match a model of the granules touched (the SHA-256 of the bits as
//! 64-bit little-endian words, QEMU's `x-debug-block-dirty-bitmap-sha256`, computed
//! here with `sha256sum`).

use blkio::ReqFlags;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use vubd_tests::{Client, Daemon, DaemonArgs, Qmp, TempDir, TempImage};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// The bits of a bitmap as QEMU keeps them.
struct Model {
    gran: u64,
    bits: BTreeSet<u64>,
}

impl Model {
    fn new(gran: u64) -> Model {
        Model {
            gran,
            bits: BTreeSet::new(),
        }
    }

    fn mark(&mut self, offset: u64, len: u64) {
        let end = (offset + len).min(SIZE);
        self.bits
            .extend(offset / self.gran..end.div_ceil(self.gran));
    }

    fn count(&self) -> u64 {
        self.bits.len() as u64 * self.gran
    }

    fn sha256(&self) -> String {
        let nwords = SIZE.div_ceil(self.gran).div_ceil(64).max(1);
        let mut words = vec![0u64; nwords as usize];
        for b in &self.bits {
            words[(b / 64) as usize] |= 1 << (b % 64);
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut child = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run sha256sum");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&bytes)
            .expect("feed sha256sum");
        let out = child.wait_with_output().expect("sha256sum output");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .expect("a digest")
            .to_string()
    }
}

fn info(qmp: &mut Qmp, node: &str, name: &str) -> Value {
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    let n = nodes
        .as_array()
        .expect("a list")
        .iter()
        .find(|n| n["node-name"] == node)
        .unwrap_or_else(|| panic!("no node {node}"))
        .clone();
    n["dirty-bitmaps"]
        .as_array()
        .and_then(|l| l.iter().find(|b| b["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no bitmap {name} on {node}: {n}"))
}

fn check(qmp: &mut Qmp, node: &str, name: &str, m: &Model, what: &str) {
    let i = info(qmp, node, name);
    assert_eq!(
        i["count"].as_u64(),
        Some(m.count()),
        "{what}: count of {node}/{name}"
    );
    assert_eq!(i["granularity"].as_u64(), Some(m.gran));
    let sha = qmp.ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": node, "name": name}),
    );
    assert_eq!(
        sha["sha256"].as_str(),
        Some(m.sha256().as_str()),
        "{what}: sha256 of {node}/{name}"
    );
}

fn add(qmp: &mut Qmp, node: &str, name: &str, gran: u64) {
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": node, "name": name, "granularity": gran}),
    );
}

#[test]
fn writes_zeroes_and_discards_mark_bitmaps() {
    let dir = TempDir::new("vubd-bitmaps");
    let (img0, img1) = (TempImage::new(SIZE), TempImage::new(SIZE));
    let (s0, s1) = (dir.join("e0.sock"), dir.join("e1.sock"));
    let args = DaemonArgs::new()
        .monitor(&dir.join("qmp.sock"))
        .iothread("io0")
        .file_raw("d0", &img0, ",discard=unmap", ",discard=unmap")
        .file_raw("d1", &img1, "", "")
        .vhost_user_blk("d0", &s0, ",writable=on,iothread=io0")
        .vhost_user_blk("d1", &s1, ",writable=on")
        .build();
    let _daemon = Daemon::start(&args);
    let mut qmp = Qmp::connect(dir.join("qmp.sock"));
    add(&mut qmp, "d0", "g64k", 65536);
    add(&mut qmp, "d0", "g4k", 4096);
    add(&mut qmp, "d0-file", "f", 65536);
    add(&mut qmp, "d1", "n", 4096);
    let (mut g64k, mut g4k, mut n) = (Model::new(65536), Model::new(4096), Model::new(4096));

    let mut c0 = Client::connect(&s0, 1);
    let mut both = |off: u64, len: u64| {
        g64k.mark(off, len);
        g4k.mark(off, len);
    };
    c0.q().write(0, &[0x5a; 4096]).expect("write");
    both(0, 4096);
    c0.q()
        .write_zeroes(MIB, 128 << 10, ReqFlags::NO_UNMAP)
        .expect("write-zeroes");
    both(MIB, 128 << 10);
    c0.q()
        .write_zeroes(3 * MIB + 4096, 8192, ReqFlags::empty())
        .expect("write-zeroes unmap");
    both(3 * MIB + 4096, 8192);
    c0.q().discard(8 * MIB, 64 << 10).expect("discard");
    both(8 * MIB, 64 << 10);
    c0.q()
        .write(SIZE - 512, &[1; 512])
        .expect("write at the end");
    both(SIZE - 512, 512);
    c0.q().flush().expect("flush");
    check(&mut qmp, "d0", "g64k", &g64k, "after writes");
    check(&mut qmp, "d0", "g4k", &g4k, "after writes");
    // The file node below sees the same ranges.
    check(&mut qmp, "d0-file", "f", &g64k, "file node");

    // A disabled bitmap sees nothing; enabled again, it records.
    qmp.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "d0", "name": "g4k"}),
    );
    c0.q().write(12 * MIB, &[2; 4096]).expect("write");
    g64k.mark(12 * MIB, 4096);
    check(&mut qmp, "d0", "g4k", &g4k, "while disabled");
    check(&mut qmp, "d0", "g64k", &g64k, "beside a disabled one");
    qmp.ok(
        "block-dirty-bitmap-enable",
        json!({"node": "d0", "name": "g4k"}),
    );
    c0.q()
        .write_zeroes(13 * MIB, 4096, ReqFlags::empty())
        .expect("write-zeroes");
    g64k.mark(13 * MIB, 4096);
    g4k.mark(13 * MIB, 4096);
    check(&mut qmp, "d0", "g4k", &g4k, "enabled again");

    // Without discard=unmap a discard is ignored: nothing changes, nothing is marked.
    let mut c1 = Client::connect(&s1, 1);
    c1.q().discard(0, 64 << 10).expect("discard");
    c1.q()
        .write_zeroes(4 * MIB, 4096, ReqFlags::empty())
        .expect("write-zeroes");
    n.mark(4 * MIB, 4096);
    check(&mut qmp, "d1", "n", &n, "node without discard=unmap");

    // Merge both granularities into a new bitmap; clear.
    add(&mut qmp, "d0", "all", 65536);
    qmp.ok(
        "block-dirty-bitmap-merge",
        json!({"node": "d0", "target": "all", "bitmaps": ["g4k", "g64k"]}),
    );
    check(&mut qmp, "d0", "all", &g64k, "merged");
    qmp.ok(
        "block-dirty-bitmap-clear",
        json!({"node": "d0", "name": "all"}),
    );
    check(&mut qmp, "d0", "all", &Model::new(65536), "cleared");
}

//! Block-layer cost of a 4 KiB random read through `raw` and through `qcow2`
//! over an inline (tmpfs) file node, without vhost-user in the way: ns per read.
//!
//! `cargo run --release -p blocklayer --example readpath -- RAW QCOW2 [READS]`
//! (both images on /dev/shm, the qcow2 fully allocated, e.g. from
//! `qemu-img convert -O qcow2 RAW QCOW2`).

use blocklayer::aio::iovec::{AlignedBuf, IoVec};
use blocklayer::aio::uring::block_on;
use blocklayer::graph::Graph;
use blocklayer::options::BlockdevOptions;
use std::sync::Arc;
use std::time::Instant;

fn open(g: &mut Graph, driver: &str, path: &str, name: &str) -> Arc<blocklayer::node::Node> {
    let v = serde_json::json!({
        "driver": driver, "node-name": name,
        "file": {"driver": "file", "filename": path, "node-name": format!("{name}-file")}
    });
    g.add(&BlockdevOptions::from_json(&v).expect("options"))
        .expect("open")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reads: u64 = args
        .get(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    let mut g = Graph::new();
    let nodes = [
        ("raw", open(&mut g, "raw", &args[1], "r")),
        ("qcow2", open(&mut g, "qcow2", &args[2], "q")),
    ];
    for round in 0..2 {
        for (label, node) in &nodes {
            let node = node.clone();
            let blocks = node.size() / 4096;
            let ns = block_on(async move {
                let iov = IoVec::from_buf(Arc::new(AlignedBuf::zeroed(4096, 4096)));
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
                let t = Instant::now();
                for _ in 0..reads {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    node.read((x % blocks) * 4096, iov.clone())
                        .await
                        .expect("read");
                }
                t.elapsed().as_nanos() as f64 / reads as f64
            });
            println!("round {round} {label}: {ns:.0} ns per 4k read");
        }
    }
}

//! What an enabled dirty bitmap costs a write in the block layer's request path:
//! 4 KiB writes at random offsets to a `null-co` node (the driver does nothing, so
//! the path itself is all there is to time), without a bitmap and with one or two
//! enabled bitmaps, in interleaved rounds. Prints ns per write for each setting (the
//! median over the rounds) and the difference to no bitmap.
//!
//! ```text
//! cargo run --release -p blocklayer --example bitmap_cost [-- WRITES ROUNDS]
//! ```

use blocklayer::aio::iovec::{AlignedBuf, IoVec};
use blocklayer::aio::uring::block_on;
use blocklayer::graph::Graph;
use blocklayer::options::BlockdevOptions;
use std::sync::Arc;
use std::time::Instant;

const SIZE: u64 = 1 << 30;

fn ns_per_write(node: &Arc<blocklayer::Node>, writes: u64, seed: u64) -> f64 {
    let node = node.clone();
    block_on(async move {
        let buf = Arc::new(AlignedBuf::zeroed(4096, 4096));
        let mut x = seed;
        let t = Instant::now();
        for _ in 0..writes {
            // xorshift: a random 4 KiB block of the node.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (SIZE / 4096)) * 4096;
            node.write(off, IoVec::from_buf(buf.clone()), false)
                .await
                .expect("write");
        }
        t.elapsed().as_nanos() as f64 / writes as f64
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let writes: u64 = args
        .next()
        .map_or(2_000_000, |a| a.parse().expect("WRITES"));
    let rounds: usize = args.next().map_or(7, |a| a.parse().expect("ROUNDS"));
    let mut g = Graph::new();
    let opts = serde_json::json!({
        "driver": "null-co", "node-name": "n", "size": SIZE, "read-zeroes": false
    });
    let node = g
        .add(&BlockdevOptions::from_json(&opts).expect("options"))
        .expect("null-co node");
    let settings: [(&str, &[u64]); 4] = [
        ("no bitmap", &[]),
        ("1 bitmap, 64 KiB", &[65536]),
        ("1 bitmap, 512 B", &[512]),
        ("2 bitmaps, 64 KiB + 4 KiB", &[65536, 4096]),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); settings.len()];
    ns_per_write(&node, writes / 4, 1); // warm-up
    for round in 0..rounds {
        for (i, (_, grans)) in settings.iter().enumerate() {
            let names: Vec<String> = (0..grans.len()).map(|k| format!("b{k}")).collect();
            for (name, &gran) in names.iter().zip(grans.iter()) {
                node.add_named_bitmap(name, gran, true).expect("bitmap");
            }
            results[i].push(ns_per_write(&node, writes, round as u64 * 7 + 1));
            for name in &names {
                node.remove_named_bitmap(name);
            }
        }
    }
    let base = median(results[0].clone());
    println!("| setting | ns/write (median of {rounds} rounds of {writes}) | vs no bitmap |");
    println!("|---|---:|---:|");
    for ((name, _), r) in settings.iter().zip(results) {
        let m = median(r);
        println!(
            "| {name} | {m:.1} | {:+.1} ns ({:+.2}%) |",
            m - base,
            (m - base) / base * 100.0
        );
    }
}

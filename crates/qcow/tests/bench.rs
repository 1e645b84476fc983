//! Rough per-operation costs of the metadata paths on MemIo (ignored by
//! default; prints figures):
//!
//! ```text
//! cargo test -p qcow --release --test bench -- --ignored --nocapture
//! ```

use qcow::{block_on, create, CreateOptions, FileIo, NoBacking};
use std::time::Instant;

#[test]
#[ignore]
fn metadata_path_costs() {
    let size = 1u64 << 30;
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm".into()
    } else {
        std::env::temp_dir()
    };
    let path = std::path::Path::new(&dir).join(format!("qcow-bench-{}.qcow2", std::process::id()));
    let img = block_on(create(
        FileIo::create(&path).unwrap(),
        &CreateOptions::new(size),
    ))
    .unwrap();
    let mut x = 12345u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let n = 20000;
    // Allocating 4k writes on a fresh image (allocate + commit; no data).
    let t = Instant::now();
    for _ in 0..n {
        let off = (rnd() % (size / 4096)) * 4096;
        let a = block_on(img.allocate(off, 4096, &NoBacking)).unwrap();
        block_on(img.commit(a)).unwrap();
    }
    let alloc = t.elapsed() / n;
    block_on(img.flush()).unwrap();
    // Fill 256 MiB so that rewrites and reads hit allocated clusters.
    for c in 0..4096u64 {
        let a = block_on(img.allocate(c * 65536, 65536, &NoBacking)).unwrap();
        block_on(img.commit(a)).unwrap();
    }
    block_on(img.flush()).unwrap();
    let t = Instant::now();
    for _ in 0..n {
        let off = (rnd() % (256 << 20) / 4096) * 4096;
        let a = block_on(img.allocate(off, 4096, &NoBacking)).unwrap();
        assert!(!a.needs_commit());
        block_on(img.commit(a)).unwrap();
    }
    let rewrite = t.elapsed() / n;
    let t = Instant::now();
    for _ in 0..n {
        let off = (rnd() % (256 << 20) / 4096) * 4096;
        let m = block_on(img.map(off, 4096)).unwrap();
        assert_eq!(m.len(), 1);
    }
    let map = t.elapsed() / n;
    let t = Instant::now();
    for _ in 0..n / 10 {
        let off = (rnd() % (256 << 20) / 65536) * 65536;
        block_on(img.map(off, 1 << 20)).unwrap();
    }
    let map1m = t.elapsed() / (n / 10);
    println!("allocating 4k write (allocate+commit): {alloc:?}");
    println!("in-place 4k write (allocate+commit): {rewrite:?}");
    println!("4k map: {map:?}; 1M map: {map1m:?}");
    drop(img);
    let _ = std::fs::remove_file(path);
}

//! `vubd-demo SOCKET`: attaches to a running vubd export as a real vhost-user-blk
//! frontend (libblkio), writes data at a few offsets, reads it back, compares and prints
//! what it did. Used by `scripts/demo.sh`, the README's first command.

use std::process::ExitCode;
use vubd_tests::Client;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn main() -> ExitCode {
    let Some(sock) = std::env::args().nth(1) else {
        eprintln!("usage: vubd-demo SOCKET");
        return ExitCode::from(2);
    };
    let mut client = match Client::connect_with(&sock, &Default::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vubd-demo: cannot attach to {sock}: {e}");
            return ExitCode::from(1);
        }
    };
    let capacity = client.capacity();
    println!("attached to {sock} through libblkio (virtio-blk-vhost-user)");
    println!(
        "  capacity {} bytes ({} MiB), logical block {} bytes, {} queue(s)",
        capacity,
        capacity >> 20,
        client.request_alignment(),
        client.num_queues()
    );
    let mut failures = 0;
    let cases: [(u64, usize); 4] = [
        (0, 4096),
        (1 << 20, 65536),
        (capacity / 2, 512),
        (capacity - 8192, 8192),
    ];
    for (i, &(offset, len)) in cases.iter().enumerate() {
        let data = pattern(i as u8 * 17 + 1, len);
        if let Err(e) = client.q().write(offset, &data) {
            println!("  write {len:>6} bytes at {offset:>12}: FAILED ({e})");
            failures += 1;
            continue;
        }
        match client.q().read(offset, len) {
            Ok(back) if back == data => {
                println!("  wrote and read back {len:>6} bytes at offset {offset:>12}: identical")
            }
            Ok(_) => {
                println!("  wrote {len} bytes at {offset}: read back DIFFERENT data");
                failures += 1;
            }
            Err(e) => {
                println!("  read {len} bytes at {offset}: FAILED ({e})");
                failures += 1;
            }
        }
    }
    match client.q().flush() {
        Ok(()) => println!("  flush: done (the data is on the host image)"),
        Err(e) => {
            println!("  flush: FAILED ({e})");
            failures += 1;
        }
    }
    if failures == 0 {
        println!("demo OK");
        ExitCode::SUCCESS
    } else {
        println!("demo FAILED: {failures} step(s)");
        ExitCode::from(1)
    }
}

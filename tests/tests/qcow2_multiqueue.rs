//! A qcow2 image served on four queues by two iothreads: the image's metadata and
//! cluster locks are shared by both threads, so a request on one iothread waits for
//! allocations the other one makes and is woken from there. Random writes and reads
//! against a model on every queue, on fresh images (every write allocates), must all
//! complete and read back; `qemu-img check` finds the image clean afterwards. With an
//! L2 cache of two tables, nearly every request misses it: the threads' read views
//! (which a cache miss leaves current) must answer what the image holds.

use std::process::Command;
use std::time::Duration;
use vubd_tests::workload::{exercise_queues, verify_all, ExerciseOpts};
use vubd_tests::{Client, Daemon, DaemonArgs, Rng, TempDir, MIB};

/// `qcow2_opts`: options appended to the qcow2 node's (",key=value...").
fn serve_and_exercise(dir: &TempDir, tag: &str, create_opts: &str, qcow2_opts: &str) {
    let img = dir.join(&format!("{tag}.qcow2"));
    let size = 16 * MIB;
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", create_opts])
        .arg(&img)
        .arg(size.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let sock = dir.join(&format!("{tag}.sock"));
    let args = DaemonArgs::new()
        .iothread("io0")
        .iothread("io1")
        .blockdev(&format!(
            "driver=file,node-name=f,filename={}",
            img.display()
        ))
        .blockdev(&format!("driver=qcow2,node-name=q,file=f{qcow2_opts}"))
        .export(&format!(
            "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={},writable=on,\
             num-queues=4,iothread.0=io0,iothread.1=io1",
            sock.display()
        ))
        .build();
    let mut daemon = Daemon::start(&args);
    let mut client = Client::connect(&sock, 4);
    let mut shadow = vec![0u8; size as usize];
    let o = ExerciseOpts {
        rounds: 150,
        max_batch: 16,
        max_segs: 4,
        ..Default::default()
    };
    let mut rng = Rng::new(tag);
    let seeds: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
    for q in client.queues_mut() {
        // A lost wake-up hangs a request: fail instead of waiting forever.
        q.set_timeout(Duration::from_secs(30));
    }
    exercise_queues(client.queues_mut(), &mut shadow, &o, &seeds);
    std::thread::scope(|s| {
        for q in client.queues_mut() {
            let shadow = &shadow;
            s.spawn(move || {
                let what = format!("{tag}: read back on queue {}", q.index());
                verify_all(q, 0, shadow, &what)
            });
        }
    });
    client.q().flush().expect("flush");
    drop(client);
    assert_eq!(daemon.terminate().code(), Some(0), "{tag}: vubd exit");
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(&img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors"),
        "{tag}: qemu-img check: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn qcow2_on_two_iothreads_allocates_and_reads_back() {
    let dir = TempDir::new("vubd-qcow2-mq");
    // Small clusters: many allocations and L2 tables, so the threads meet often.
    serve_and_exercise(&dir, "c4k", "cluster_size=4k", "");
    serve_and_exercise(&dir, "c64k-l2ext", "cluster_size=64k,extended_l2=on", "");
    // Eight L2 tables of 4 KiB, two of them cached.
    serve_and_exercise(&dir, "c4k-l2c8k", "cluster_size=4k", ",l2-cache-size=8192");
}

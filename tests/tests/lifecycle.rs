//! Frontend disconnect/reconnect, and daemon shutdown/restart.

use blkio::ReqFlags;
use vubd_tests::{
    assert_same_data, simple_file_export, verify_all, Client, ClientOptions, Daemon, Req, Rng,
    TempDir, TempImage, MIB,
};

#[test]
fn disconnect_and_reconnect() {
    let mut rng = Rng::new("disconnect_and_reconnect");
    let dir = TempDir::new("vubd-t");
    let sock = dir.join("vubd.sock");
    let img = TempImage::new(16 * MIB);
    let mut daemon = Daemon::start(&simple_file_export(&img, &sock, 4, "", ""));
    let mut shadow = vec![0u8; 16 * MIB as usize];

    // Connection 1: one queue.
    let a = rng.bytes(256 * 1024);
    {
        let mut c = Client::connect(daemon.socket(), 1);
        c.q().write(MIB, &a).expect("write 1");
        shadow[MIB as usize..MIB as usize + a.len()].copy_from_slice(&a);
    }
    daemon.assert_running("after the first frontend disconnected");

    // Connection 2: four queues; sees connection 1's data, writes more.
    let b = rng.bytes(512 * 1024);
    {
        let mut c = Client::connect(daemon.socket(), 4);
        let got = c.queue(3).read(MIB, a.len()).expect("read on reconnect");
        assert_same_data("data from the first connection", &got, &a);
        c.queue(2).write(5 * MIB, &b).expect("write 2");
        shadow[5 * MIB as usize..5 * MIB as usize + b.len()].copy_from_slice(&b);
    }
    daemon.assert_running("after the second frontend disconnected");

    // Connection 3: poll queues this time.
    let opts = ClientOptions {
        num_queues: 2,
        poll: true,
        ..Default::default()
    };
    let mut c = Client::connect_with(daemon.socket(), &opts).expect("connect 3");
    verify_all(c.queue(1), 0, &shadow, "third connection");
    c.q().flush().expect("flush");
    assert_same_data("host file", &img.read_all(), &shadow);

    // Many short connections in a row.
    drop(c);
    for i in 0..20u8 {
        let mut c = Client::connect(daemon.socket(), 1 + (i as usize % 4));
        let d = vec![i; 4096];
        c.q()
            .write(8 * MIB + u64::from(i) * 4096, &d)
            .expect("write");
        let got = c
            .q()
            .read(8 * MIB + u64::from(i) * 4096, 4096)
            .expect("read");
        assert_eq!(got, d);
    }
    daemon.assert_running("after 20 short connections");
}

#[test]
fn disconnect_with_requests_in_flight() {
    let mut rng = Rng::new("disconnect_with_requests_in_flight");
    let dir = TempDir::new("vubd-t");
    let sock = dir.join("vubd.sock");
    let (img, contents) = TempImage::new_random(32 * MIB, &mut rng);
    let mut daemon = Daemon::start(&simple_file_export(&img, &sock, 2, "", ""));
    for round in 0..10 {
        let c = Client::connect(daemon.socket(), 2);
        let reqs: Vec<Req> = (0..64u64)
            .map(|i| Req::Read {
                offset: i * 256 * 1024,
                buf: (i as usize * 128 * 1024)..((i as usize + 1) * 128 * 1024),
            })
            .collect();
        c.abandon_in_flight((round % 2) as usize, &reqs);
        daemon.assert_running("after a frontend vanished with requests in flight");
    }
    // Writes in flight, then a clean connection sees a consistent disk: every 64 KiB
    // block is either old or new data (we can't know which), never anything else.
    let newdata = vec![0xE1u8; 64 * 1024];
    for _ in 0..5 {
        let mut c = Client::connect(daemon.socket(), 1);
        c.q().buf()[..newdata.len()].copy_from_slice(&newdata);
        let reqs: Vec<Req> = (0..32u64)
            .map(|i| Req::Write {
                offset: i * MIB,
                buf: 0..64 * 1024,
                flags: ReqFlags::empty(),
            })
            .collect();
        c.abandon_in_flight(0, &reqs);
    }
    let mut c = Client::connect(daemon.socket(), 1);
    for i in 0..32u64 {
        let off = (i * MIB) as usize;
        let got = c
            .q()
            .read(i * MIB, 64 * 1024)
            .expect("read after abandoned writes");
        let old = &contents[off..off + 64 * 1024];
        for (j, (g, o)) in got.chunks(512).zip(old.chunks(512)).enumerate() {
            assert!(
                g == o || g == &newdata[..512],
                "sector {} holds neither old nor new data",
                (off / 512) + j
            );
        }
    }
    daemon.assert_running("end");
}

#[test]
fn data_survives_sigterm_and_restart() {
    let mut rng = Rng::new("data_survives_sigterm_and_restart");
    let dir = TempDir::new("vubd-t");
    let sock = dir.join("vubd.sock");
    let img = TempImage::new(16 * MIB);
    let args = simple_file_export(&img, &sock, 2, "", "");
    let mut shadow = vec![0u8; 16 * MIB as usize];

    let mut daemon = Daemon::start(&args);
    let mut c = Client::connect(daemon.socket(), 2);
    for i in 0..16u64 {
        let d = rng.bytes(64 * 1024 + 512 * (i as usize));
        c.queue((i % 2) as usize).write(i * MIB, &d).expect("write");
        shadow[(i * MIB) as usize..(i * MIB) as usize + d.len()].copy_from_slice(&d);
    }
    // No flush. SIGTERM while the frontend is still connected.
    let st = daemon.terminate();
    assert_eq!(
        st.code(),
        Some(0),
        "exit status after SIGTERM: {st:?}\n{}",
        daemon.stderr()
    );
    assert!(
        !sock.exists(),
        "socket {} not removed on SIGTERM",
        sock.display()
    );
    drop(c);
    assert_same_data("host file after SIGTERM", &img.read_all(), &shadow);

    // Restart on the same image: the data is there; write more; SIGINT this time, idle.
    let mut daemon = Daemon::start(&args);
    let mut c = Client::connect(daemon.socket(), 1);
    verify_all(c.q(), 0, &shadow, "after restart");
    let d = rng.bytes(MIB as usize);
    c.q().write(3 * MIB, &d).expect("write after restart");
    shadow[3 * MIB as usize..4 * MIB as usize].copy_from_slice(&d);
    drop(c);
    daemon.signal(libc::SIGINT);
    let st = daemon
        .wait_timeout(vubd_tests::daemon::EXIT_TIMEOUT)
        .expect("daemon did not exit after SIGINT");
    assert_eq!(
        st.code(),
        Some(0),
        "exit status after SIGINT: {st:?}\n{}",
        daemon.stderr()
    );
    assert!(!sock.exists(), "socket not removed on SIGINT");
    assert_same_data("host file after SIGINT", &img.read_all(), &shadow);

    // And a third time, with no frontend ever connected.
    let mut daemon = Daemon::start(&args);
    let st = daemon.terminate();
    assert_eq!(
        st.code(),
        Some(0),
        "exit status after SIGTERM (idle): {st:?}"
    );
    assert!(!sock.exists());
    let mut daemon = Daemon::start(&args);
    let mut c = Client::connect(daemon.socket(), 1);
    verify_all(c.q(), 0, &shadow, "after second restart");
    drop(c);
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn sigterm_with_cache_direct_on() {
    let mut rng = Rng::new("sigterm_with_cache_direct_on");
    let dir = TempDir::new("vubd-t");
    let sock = dir.join("vubd.sock");
    let img = TempImage::new_in(dir.path(), 8 * MIB);
    let args = simple_file_export(&img, &sock, 1, ",cache.direct=on", "");
    let mut daemon = Daemon::start(&args);
    let mut c = Client::connect(daemon.socket(), 1);
    let d = rng.bytes(2 * MIB as usize);
    c.q().write(MIB, &d).expect("write");
    assert_eq!(daemon.terminate().code(), Some(0));
    drop(c);
    assert_same_data("host file", &img.read_at(MIB, d.len()), &d);
}

//! The `rbd` driver against a real single-node Ceph cluster (scripts/ceph.sh; one per
//! test binary, or the run's `$CEPH_CONF`): images made and checked with the `rbd`
//! tool, served by vubd and driven through libblkio. The cephx test has a cluster
//! of its own with authentication on (`ceph.sh start --cephx`).

use blkio::ReqFlags;
use serde_json::json;
use std::time::Duration;
use vubd_tests::ceph::{self, image_size, rbd, rbd_on};
use vubd_tests::{assert_same_data, Client, Daemon, DaemonArgs, Qmp, Rng, TempDir, MIB};

/// vubd serving `rbd/<image>` as node `disk0` on an iothread, writable, with a monitor.
fn serve(dir: &TempDir, image: &str, extra: &str) -> (Daemon, Client, Qmp) {
    let sock = dir.join("vubd.sock");
    let mon = dir.join("qmp.sock");
    let args = DaemonArgs::new()
        .iothread("io0")
        .blockdev(&format!(
            "driver=rbd,node-name=disk0,pool=rbd,image={image},conf={}{extra}",
            ceph::conf()
        ))
        .vhost_user_blk("disk0", &sock, ",writable=on,iothread=io0")
        .monitor(&mon)
        .build();
    let daemon = Daemon::start(&args);
    let client = Client::connect(daemon.socket(), 1);
    let qmp = Qmp::connect(&mon);
    (daemon, client, qmp)
}

/// A new image filled with random data through `rbd import`; returns its name and data.
fn imported(dir: &TempDir, size: u64, rng: &mut Rng) -> (String, Vec<u8>) {
    let name = ceph::image_name("imp");
    let data = rng.bytes(size as usize);
    let file = dir.join("src.img");
    std::fs::write(&file, &data).unwrap();
    rbd(&[
        "create",
        "--size",
        &format!("{}M", size / MIB),
        &format!("rbd/{name}"),
    ]);
    // Into the existing image (`rbd import` would create it itself).
    rbd(&[
        "import",
        "--no-progress",
        file.to_str().unwrap(),
        &format!("rbd/{name}-i"),
    ]);
    rbd(&["rm", "--no-progress", &format!("rbd/{name}")]);
    rbd(&["mv", &format!("rbd/{name}-i"), &format!("rbd/{name}")]);
    (name, data)
}

fn exported(dir: &TempDir, image: &str) -> Vec<u8> {
    let out = dir.join(&format!("{image}.out"));
    let _ = std::fs::remove_file(&out);
    rbd(&[
        "export",
        "--no-progress",
        &format!("rbd/{image}"),
        out.to_str().unwrap(),
    ]);
    std::fs::read(&out).unwrap()
}

#[test]
fn imported_image_reads_back_and_writes_reach_rbd_export() {
    let dir = TempDir::new("vubd-rbd");
    let mut rng = Rng::new("rbd");
    let size = 32 * MIB;
    let (image, mut data) = imported(&dir, size, &mut rng);
    let (mut daemon, mut client, _qmp) = serve(&dir, &image, "");
    assert_eq!(client.prop_u64("capacity"), size);
    // Read back in unaligned-to-objects chunks of varied sizes.
    let mut off = 0u64;
    while off < size {
        let len = rng.range(1, 257).min((size - off) / 4096) * 4096;
        let got = client.q().read(off, len as usize).expect("read");
        assert_same_data(
            &format!("rbd read {off}+{len}"),
            &got,
            &data[off as usize..(off + len) as usize],
        );
        off += len;
    }
    // Writes, some straddling the 4 MiB objects, then a flush.
    for _ in 0..40 {
        let len = rng.range(1, 64) * 4096;
        let off = rng.range(0, (size - len) / 512) * 512;
        let buf = rng.bytes(len as usize);
        client.q().write(off, &buf).expect("write");
        data[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }
    client.q().flush().expect("flush");
    daemon.assert_running("after the writes");
    assert_same_data("rbd export after writes", &exported(&dir, &image), &data);
}

#[test]
fn discard_write_zeroes_and_flush() {
    let dir = TempDir::new("vubd-rbd");
    let mut rng = Rng::new("rbd-discard");
    let size = 16 * MIB;
    let (image, mut data) = imported(&dir, size, &mut rng);
    let (_daemon, mut client, _qmp) = serve(&dir, &image, ",discard=unmap");
    // A whole 4 MiB object discarded reads as zeroes (partial discards may keep data).
    client.q().discard(4 * MIB, 4 * MIB).expect("discard");
    data[(4 * MIB) as usize..(8 * MIB) as usize].fill(0);
    let got = client.q().read(4 * MIB, (4 * MIB) as usize).expect("read");
    assert!(got.iter().all(|&b| b == 0), "discarded object is not zero");
    // write-zeroes anywhere reads as zeroes, with and without unmap.
    client
        .q()
        .write_zeroes(9 * MIB + 4096, 300 * 1024, ReqFlags::empty())
        .expect("write zeroes");
    data[(9 * MIB + 4096) as usize..(9 * MIB + 4096 + 300 * 1024) as usize].fill(0);
    client
        .q()
        .write_zeroes(12 * MIB - 8192, 64 * 1024, ReqFlags::NO_UNMAP)
        .expect("write zeroes no-unmap");
    data[(12 * MIB - 8192) as usize..(12 * MIB - 8192 + 64 * 1024) as usize].fill(0);
    client.q().flush().expect("flush");
    let mut got = Vec::new();
    for off in (0..size).step_by((4 * MIB) as usize) {
        got.extend(client.q().read(off, (4 * MIB) as usize).expect("read"));
    }
    assert_same_data("read after discard/zeroes", &got, &data);
    assert_same_data(
        "rbd export after discard/zeroes",
        &exported(&dir, &image),
        &data,
    );
}

#[test]
fn block_resize_grows_the_rbd_image() {
    let dir = TempDir::new("vubd-rbd");
    let mut rng = Rng::new("rbd-resize");
    let (image, data) = imported(&dir, 8 * MIB, &mut rng);
    let (_daemon, mut client, mut qmp) = serve(&dir, &image, "");
    qmp.ok(
        "block_resize",
        json!({"node-name": "disk0", "size": 24 * MIB}),
    );
    assert_eq!(image_size(&format!("rbd/{image}")), 24 * MIB);
    let nodes = qmp.ok("query-named-block-nodes", json!({"flat": true}));
    let info = &nodes[0]["image"];
    assert_eq!(info["format"], "rbd", "{nodes}");
    assert_eq!(info["virtual-size"], 24 * MIB, "{nodes}");
    assert_eq!(info["cluster-size"], 4 * MIB, "{nodes}");
    // The old data is still there; the new space reads as zeroes.
    let got = client.q().read(0, (8 * MIB) as usize).expect("read");
    assert_same_data("data after resize", &got, &data);
    assert!(image_size(&format!("rbd/{image}")) > 8 * MIB);
    let ex = exported(&dir, &image);
    assert_eq!(ex.len() as u64, 24 * MIB);
    assert!(ex[(8 * MIB) as usize..].iter().all(|&b| b == 0));
}

#[test]
fn blockdev_create_makes_an_rbd_image() {
    let dir = TempDir::new("vubd-rbd");
    let mon = dir.join("qmp.sock");
    let args = DaemonArgs::new().monitor(&mon).build();
    let _daemon = Daemon::start(&args);
    let mut qmp = Qmp::connect(&mon);
    let image = ceph::image_name("new");
    let loc = json!({"pool": "rbd", "image": image, "conf": ceph::conf()});
    qmp.ok(
        "blockdev-create",
        json!({"job-id": "c1", "options": {"driver": "rbd", "location": loc,
               "size": 12 * MIB, "cluster-size": MIB}}),
    );
    let job = qmp.wait_job_concluded("c1", Duration::from_secs(60));
    assert!(job.get("error").is_none(), "{job}");
    assert_eq!(image_size(&format!("rbd/{image}")), 12 * MIB);
    let v: serde_json::Value =
        serde_json::from_slice(&rbd(&["info", "--format", "json", &format!("rbd/{image}")]))
            .unwrap();
    assert_eq!(v["object_size"], MIB, "{v}");
    // The same name again: QEMU's error, in the job.
    qmp.ok(
        "blockdev-create",
        json!({"job-id": "c2", "options": {"driver": "rbd", "location": loc,
               "size": 12 * MIB}}),
    );
    let job = qmp.wait_job_concluded("c2", Duration::from_secs(60));
    assert_eq!(job["error"], "error rbd create: File exists", "{job}");
    // The new image opens and serves I/O.
    qmp.ok(
        "blockdev-add",
        json!({"driver": "rbd", "node-name": "n", "pool": "rbd", "image": image,
               "conf": ceph::conf()}),
    );
    let nodes = qmp.ok("query-named-block-nodes", json!({"flat": true}));
    assert_eq!(nodes[0]["image"]["virtual-size"], 12 * MIB, "{nodes}");
}

/// A real guest (TCG) runs fio with crc32c verification on an RBD-backed export with
/// two queues; afterwards the guest's view of the disk and `rbd export` agree.
#[test]
fn guest_fio_verify_on_rbd() {
    use vubd_tests::guest::{Guest, GuestOpts, CMD_TIMEOUT};
    let dir = TempDir::new("vubd-rbd");
    let image = ceph::image_name("guest");
    rbd(&["create", "--size", "64M", &format!("rbd/{image}")]);
    let sock = dir.join("vubd.sock");
    let args = DaemonArgs::new()
        .iothread("io0")
        .blockdev(&format!(
            "driver=rbd,node-name=disk0,pool=rbd,image={image},conf={}",
            ceph::conf()
        ))
        .vhost_user_blk("disk0", &sock, ",writable=on,iothread=io0,num-queues=2")
        .build();
    let mut daemon = Daemon::start(&args);
    let mut g = Guest::boot(&GuestOpts::new("rbd-fio").cpus(2).disk(&sock, 2));
    let out = g.check(
        "fio --name=rbd --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite \
         --bs=4k --size=16M --offset_increment=16M --numjobs=2 --iodepth=8 \
         --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting --eta=never",
        Duration::from_secs(600),
    );
    assert!(out.contains("err= 0"), "fio reported an error:\n{out}");
    assert!(
        !out.contains("verify:") || !out.contains("bad"),
        "fio printed verification failures:\n{out}"
    );
    let guest_sum = g.check(
        "dd if=/dev/vda bs=1M count=64 iflag=direct 2>/dev/null | md5sum",
        CMD_TIMEOUT,
    );
    daemon.assert_running("after fio");
    let host = exported(&dir, &image);
    let file = dir.join("host.img");
    std::fs::write(&file, &host).unwrap();
    let host_sum = std::process::Command::new("md5sum")
        .arg(&file)
        .output()
        .expect("md5sum");
    let host_sum = String::from_utf8_lossy(&host_sum.stdout);
    assert_eq!(
        guest_sum.split_whitespace().next(),
        host_sum.split_whitespace().next(),
        "the guest's disk and rbd export differ"
    );
    assert!(host[..(32 * MIB) as usize].iter().any(|&b| b != 0));
}

/// vubd closes its images when it exits: the exclusive lock a write took and the
/// image's watch are gone at once, so the next client (a restarted vubd, or QEMU after
/// a migration) does not wait for a dead owner's watch to time out.
#[test]
fn exit_releases_the_exclusive_lock_and_watch() {
    let dir = TempDir::new("vubd-rbd");
    let image = ceph::image_name("lock");
    rbd(&["create", "--size", "8M", &format!("rbd/{image}")]);
    let (mut daemon, mut client, _qmp) = serve(&dir, &image, "");
    client.q().write(0, &[0x5a; 4096]).expect("write");
    let locks = String::from_utf8(rbd(&["lock", "ls", &format!("rbd/{image}")])).unwrap();
    assert!(
        locks.contains("exclusive lock"),
        "no lock while writing: {locks}"
    );
    drop(client);
    assert!(
        daemon.terminate().success(),
        "vubd exit: {}",
        daemon.stderr()
    );
    let locks: serde_json::Value = serde_json::from_slice(&rbd(&[
        "lock",
        "ls",
        "--format",
        "json",
        &format!("rbd/{image}"),
    ]))
    .unwrap();
    assert_eq!(locks, json!([]), "lock left after exit");
    let status: serde_json::Value = serde_json::from_slice(&rbd(&[
        "status",
        "--format",
        "json",
        &format!("rbd/{image}"),
    ]))
    .unwrap();
    assert_eq!(
        status["watchers"],
        json!([]),
        "watch left after exit: {status}"
    );
    assert_eq!(&exported(&dir, &image)[..4096], &[0x5a; 4096][..]);
}

/// A blockdev-reopen that fails after the old node closed its image (read-write on a
/// snapshot) puts the old node back with its image open again: reads go on.
#[test]
fn failed_reopen_keeps_the_image_open() {
    let dir = TempDir::new("vubd-rbd");
    let mut rng = Rng::new("rbd-reopen");
    let (image, data) = imported(&dir, 8 * MIB, &mut rng);
    rbd(&["snap", "create", &format!("rbd/{image}@s1")]);
    let sock = dir.join("vubd.sock");
    let mon = dir.join("qmp.sock");
    let args = DaemonArgs::new()
        .iothread("io0")
        .blockdev(&format!(
            "driver=rbd,node-name=disk0,pool=rbd,image={image},snapshot=s1,read-only=on,conf={}",
            ceph::conf()
        ))
        .vhost_user_blk("disk0", &sock, ",iothread=io0")
        .monitor(&mon)
        .build();
    let daemon = Daemon::start(&args);
    let ro = vubd_tests::ClientOptions {
        read_only: true,
        ..Default::default()
    };
    let mut client = Client::connect_with(&sock, &ro).expect("read-only connect");
    let mut qmp = Qmp::connect(&mon);
    let got = client.q().read(0, MIB as usize).expect("read");
    assert_same_data("snapshot read", &got, &data[..MIB as usize]);
    let e = qmp
        .execute(
            "blockdev-reopen",
            json!({"options": [{"driver": "rbd", "node-name": "disk0", "pool": "rbd",
                   "image": image, "snapshot": "s1", "conf": ceph::conf(),
                   "read-only": false}]}),
        )
        .expect_err("read-write reopen of a snapshot");
    assert!(e.desc.contains("read-only"), "{e:?}");
    let got = client
        .q()
        .read(MIB, MIB as usize)
        .unwrap_or_else(|e| panic!("read after the failed reopen: {e}\n{}", daemon.stderr()));
    assert_same_data(
        "read after the failed reopen",
        &got,
        &data[MIB as usize..(2 * MIB) as usize],
    );
}

/// The trimmed output of a command that must succeed.
fn output(cmd: &mut std::process::Command) -> String {
    vubd_tests::tools::run_ok(cmd).trim().to_string()
}

/// `key-secret` on a cluster that requires cephx: vubd opens an image as client.admin
/// with the key from a `secret` object (base64, as Ceph prints keys) and serves it
/// correctly; a user whose key no keyring holds opens it with key-secret only; a
/// wrong key and a missing one fail with librados's errors, the texts
/// qemu-storage-daemon's rbd driver gives.
#[test]
fn cephx_key_secret_opens_the_image_and_a_wrong_key_fails() {
    use std::process::Command;
    let cx = ceph::cephx();
    let dir = TempDir::new("vubd-rbd-cephx");
    let mut rng = Rng::new("rbd-cephx");
    let admin_key = output(
        Command::new("ceph-authtool")
            .args(["-p", "-n", "client.admin"])
            .arg(&cx.keyring),
    );
    let user_key = output(Command::new("ceph").args([
        "-c",
        &cx.conf,
        "auth",
        "get-or-create-key",
        "client.vubd",
        "mon",
        "profile rbd",
        "osd",
        "profile rbd pool=rbd",
    ]));
    let wrong_key = output(Command::new("ceph-authtool").arg("--gen-print-key"));
    assert_ne!(wrong_key, admin_key);

    let size = 8 * MIB;
    let image = ceph::image_name("cx");
    let mut data = rng.bytes(size as usize);
    let file = dir.join("src.img");
    std::fs::write(&file, &data).unwrap();
    let spec = format!("rbd/{image}");
    rbd_on(
        &cx.conf,
        &["import", "--no-progress", file.to_str().unwrap(), &spec],
    );

    let sock = dir.join("vubd.sock");
    let mon = dir.join("qmp.sock");
    let secrets = [
        ("admin", &admin_key),
        ("user", &user_key),
        ("wrong", &wrong_key),
    ];
    let mut args = DaemonArgs::new();
    for (id, key) in secrets {
        args = args.object(&format!("secret,id={id},data={key},format=base64"));
    }
    let args = args
        .iothread("io0")
        .blockdev(&format!(
            "driver=rbd,node-name=disk0,pool=rbd,image={image},conf={},user=admin,key-secret=admin",
            cx.conf
        ))
        .vhost_user_blk("disk0", &sock, ",writable=on,iothread=io0")
        .monitor(&mon)
        .build();
    let _daemon = Daemon::start(&args);
    let mut client = Client::connect(&sock, 1);
    assert_eq!(client.prop_u64("capacity"), size);
    let got = client.q().read(0, size as usize).expect("read");
    assert_same_data("the imported image through cephx", &got, &data);
    for _ in 0..16 {
        let off = rng.range(0, size - 128 * 1024) & !4095;
        let n = rng.range_usize(1, 32) * 4096;
        let chunk = rng.bytes(n);
        client.q().write(off, &chunk).expect("write");
        data[off as usize..off as usize + n].copy_from_slice(&chunk);
    }
    client.q().flush().expect("flush");
    let out = dir.join("export.img");
    rbd_on(
        &cx.conf,
        &["export", "--no-progress", &spec, out.to_str().unwrap()],
    );
    assert_same_data(
        "rbd export after writes",
        &std::fs::read(&out).unwrap(),
        &data,
    );

    // The same blockdev-adds on vubd and, where it is installed, qemu-storage-daemon.
    let node = |name: &str, user: &str, secret: Option<&str>| {
        let mut o = json!({"driver": "rbd", "node-name": name, "pool": "rbd",
                           "image": image, "conf": cx.conf, "user": user,
                           "read-only": true});
        if let Some(s) = secret {
            o["key-secret"] = json!(s);
        }
        o
    };
    let mut qmp = Qmp::connect(&mon);
    let outcomes = |qmp: &mut Qmp| -> Vec<Result<(), String>> {
        [
            node("u1", "vubd", Some("user")),
            node("u2", "vubd", None),
            node("u3", "admin", Some("wrong")),
            node("u4", "admin", Some("nosuch")),
        ]
        .into_iter()
        .map(|o| {
            qmp.execute("blockdev-add", o)
                .map(|_| ())
                .map_err(|e| e.desc)
        })
        .collect()
    };
    let got = outcomes(&mut qmp);
    assert_eq!(
        got,
        vec![
            Ok(()),
            // No keyring holds client.vubd's key.
            Err("error connecting: No such file or directory".to_string()),
            Err("error connecting: Permission denied".to_string()),
            Err("No secret with id 'nosuch'".to_string()),
        ]
    );
    let qsd = vubd_tests::qsd_bin();
    // QEMU's rbd module (qemu-block-extra, which scripts/setup.sh installs).
    let rbd_module = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.path().join("qemu/block-rbd.so").exists());
    if qsd.exists() && rbd_module {
        let qmon = dir.join("qsd-qmp.sock");
        let mut qargs = DaemonArgs::new();
        for (id, key) in secrets {
            qargs = qargs.object(&format!("secret,id={id},data={key},format=base64"));
        }
        let _qsd = Daemon::start_bin(&qsd, &qargs.monitor(&qmon).build());
        let mut q = Qmp::connect(&qmon);
        assert_eq!(outcomes(&mut q), got, "qemu-storage-daemon's outcomes");
    }
}

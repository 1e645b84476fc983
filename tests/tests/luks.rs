//! The luks driver through libblkio: discard is accepted and keeps the data (QEMU's
//! crypto driver has no discard: its block layer drops them), write-zeroes writes
//! encrypted zeroes (reads back as zeroes, the host file holds no plaintext zeroes).

use blkio::ReqFlags;
use std::process::Command;
use vubd_tests::tools::{run_ok, PBKDF2_ATTEMPTS};
use vubd_tests::{assert_same_data, Client, Daemon, DaemonArgs, Rng, TempDir, MIB};

const SECRET: &str = "secret,id=sec0,data=luks-test";

fn setup() -> (TempDir, std::path::PathBuf, Daemon, Client) {
    let dir = TempDir::new("vubd-luks");
    let img = dir.join("disk.luks");
    let mut made = false;
    for _ in 0..PBKDF2_ATTEMPTS {
        let out = Command::new("qemu-img")
            .args(["create", "-f", "luks", "--object", SECRET])
            .args(["-o", "key-secret=sec0,iter-time=10"])
            .arg(&img)
            .arg("8M")
            .output()
            .expect("run qemu-img");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        made = out.status.success();
        if made || !err.contains("Unable to get accurate CPU usage") {
            assert!(made, "qemu-img create: {err}");
            break;
        }
    }
    assert!(made, "qemu-img create -f luks kept failing");
    let sock = dir.join("luks.sock");
    let args = DaemonArgs::new()
        .iothread("io0")
        .object(SECRET)
        .blockdev(&format!(
            "file,node-name=f0,filename={},discard=unmap",
            img.display()
        ))
        .blockdev("luks,node-name=l0,file=f0,key-secret=sec0,discard=unmap")
        .vhost_user_blk("l0", &sock, ",writable=on,iothread=io0")
        .build();
    let daemon = Daemon::start(&args);
    let client = Client::connect(daemon.socket(), 1);
    (dir, img, daemon, client)
}

#[test]
fn luks_discard_keeps_data_and_write_zeroes_encrypts() {
    let (_dir, img, mut daemon, mut client) = setup();
    assert_eq!(client.capacity(), 8 * MIB);
    let data = Rng::new("luks").bytes(MIB as usize);
    client.q().write(MIB, &data).expect("write");
    client.q().discard(MIB, MIB).expect("discard");
    let got = client.q().read(MIB, MIB as usize).expect("read");
    assert_same_data("after discard (dropped, as QEMU)", &got, &data);

    client
        .q()
        .write_zeroes(MIB, 64 * 1024, ReqFlags::empty())
        .expect("write zeroes");
    let got = client.q().read(MIB, 64 * 1024).expect("read");
    assert!(
        got.iter().all(|&b| b == 0),
        "write-zeroes did not read back as zeroes"
    );
    client.q().flush().expect("flush");
    drop(client);
    daemon.terminate();

    // At rest: ciphertext, not zeroes, where the guest wrote zeroes.
    let host = std::fs::read(&img).expect("read the host file");
    let payload = u32::from_be_bytes(host[104..108].try_into().unwrap()) as usize * 512;
    let stored = &host[payload + MIB as usize..payload + MIB as usize + 64 * 1024];
    assert!(
        stored.iter().filter(|&&b| b == 0).count() < 4096,
        "write-zeroes left plaintext zeroes in the host file"
    );
    // qemu-img reads the same zeroes and data.
    let raw = img.with_extension("raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "--object", SECRET, "--image-opts"])
            .arg(format!(
                "driver=luks,key-secret=sec0,file.filename={}",
                img.display()
            ))
            .args(["-O", "raw"])
            .arg(&raw),
    );
    let plain = std::fs::read(&raw).expect("read the converted image");
    let at = MIB as usize;
    assert!(plain[at..at + 65536].iter().all(|&b| b == 0));
    assert_same_data(
        "qemu-img's view",
        &plain[at + 65536..at + MIB as usize],
        &data[65536..],
    );
}

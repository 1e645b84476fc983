//! A real QEMU guest (TCG) on an encrypted export: a LUKS volume qemu-img made, opened
//! by vubd with a `secret` object, where fio writes and verifies in the guest; qemu-img
//! then reads fio's blocks back through its own decryption, and the host file holds
//! only ciphertext.

use std::process::Command;
use std::time::Duration;
use vubd_tests::guest::{Guest, GuestOpts};
use vubd_tests::tools::{run_ok, PBKDF2_ATTEMPTS};
use vubd_tests::{Daemon, DaemonArgs, TempDir, MIB};

const FIO_TIMEOUT: Duration = Duration::from_secs(300);
const SECRET: &str = "secret,id=sec0,data=guest-pass";

/// A 64 MiB LUKS volume from qemu-img (QEMU's default aes-256-xts-plain64), retried
/// when qemu-img cannot time its key derivation on a loaded machine.
fn qemu_img_luks(path: &std::path::Path) {
    for _ in 0..PBKDF2_ATTEMPTS {
        let out = Command::new("qemu-img")
            .args(["create", "-f", "luks", "--object", SECRET, "-o"])
            .args(["key-secret=sec0,iter-time=10"])
            .arg(path)
            .arg("64M")
            .output()
            .expect("run qemu-img");
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Unable to get accurate CPU usage"),
            "qemu-img: {err}"
        );
    }
    panic!("qemu-img create -f luks kept failing");
}

#[test]
fn guest_fio_verify_on_luks() {
    let dir = TempDir::new("vubd-guest-luks");
    let img = dir.join("disk.luks");
    qemu_img_luks(&img);
    let sock = dir.join("luks.sock");
    let args = DaemonArgs::new()
        .iothread("io0")
        .object(SECRET)
        .blockdev(&format!("file,node-name=f0,filename={}", img.display()))
        .blockdev("luks,node-name=l0,file=f0,key-secret=sec0")
        .vhost_user_blk("l0", &sock, ",iothread=io0,writable=on")
        .build();
    let mut daemon = Daemon::start(&args);
    let mut g = Guest::boot(&GuestOpts::new("luks").disk(&sock, 1));
    let region = 16 * MIB;
    let out = g.check(
        &format!(
            "fio --name=vubd --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite \
             --bs=4k --size={region} --iodepth=8 --verify=crc32c --verify_fatal=1 \
             --do_verify=1 --eta=never"
        ),
        FIO_TIMEOUT,
    );
    assert!(out.contains("err= 0"), "fio reported an error:\n{out}");
    assert!(
        !out.contains("verify: bad") && !out.contains("verify failed"),
        "fio printed verification failures:\n{out}"
    );
    daemon.assert_running("after fio");
    let st = g.shutdown();
    assert!(st.success(), "QEMU exit status after poweroff: {st}");
    daemon.terminate();

    // qemu-img decrypts fio's blocks: each 4 KiB block starts with fio's verify header
    // (magic 0xacca, length 4096, its own offset).
    let raw = dir.join("plain.raw");
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
    let header = |b: &[u8]| {
        (
            u16::from_le_bytes([b[0], b[1]]),
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
            u64::from_le_bytes(b[16..24].try_into().unwrap()),
        )
    };
    for off in (0..region as usize).step_by(4096) {
        assert_eq!(
            header(&plain[off..off + 4096]),
            (0xacca, 4096, off as u64),
            "decrypted block at {off} is not fio's"
        );
    }
    // At rest the blocks are ciphertext: no verify header in the host file's payload
    // (its offset from the header: a big-endian sector count at byte 104). The whole
    // header is compared: its 16-bit magic alone turns up in about one ciphertext
    // block in 65536 by chance (it did, once, in session 13's CI).
    let host = std::fs::read(&img).expect("read the host file");
    let payload = u32::from_be_bytes(host[104..108].try_into().unwrap()) as usize * 512;
    let plaintext_blocks = (0..region as usize)
        .step_by(4096)
        .filter(|&off| header(&host[payload + off..]) == (0xacca, 4096, off as u64))
        .count();
    assert_eq!(plaintext_blocks, 0, "fio's blocks are stored unencrypted");
}

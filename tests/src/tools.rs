//! The host tools the qcow2 tests check vubd against: qemu-img and qemu-io.

use std::path::Path;
use std::process::Command;

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `qemu-img ARGS`, which must succeed; returns its stdout.
pub fn qemu_img(args: &[&str]) -> String {
    run_ok(Command::new("qemu-img").args(args))
}

/// Runs qemu-io commands (`-c` each) on an image of the given format.
pub fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(img);
    run_ok(&mut c);
}

/// How often to run a qemu-img command that times a LUKS key slot's PBKDF2: it fails
/// at random when the first round takes under a millisecond of CPU ("Unable to get
/// accurate CPU usage": 80-90% of the attempts with sha1 on a quiet machine here,
/// whatever iter-time is), so enough attempts that all failing is never seen.
pub const PBKDF2_ATTEMPTS: usize = 300;

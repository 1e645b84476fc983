//! The single-node Ceph cluster of the RBD tests: the one `$CEPH_CONF` names (started
//! by scripts/test.sh for the whole run), or else one this test process starts with
//! scripts/ceph.sh on first use and stops when it exits.

use crate::util::unique_name;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The cluster directory this process started (stopped at exit).
static STARTED: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn stop_at_exit() {
    if let Some(dir) = STARTED.get() {
        let _ = Command::new(repo_root().join("scripts/ceph.sh"))
            .arg("stop")
            .arg(dir)
            .status();
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The configuration file of the test cluster, starting it on first use.
pub fn conf() -> &'static str {
    static CONF: OnceLock<String> = OnceLock::new();
    CONF.get_or_init(|| {
        if let Ok(c) = std::env::var("CEPH_CONF") {
            if Path::new(&c).is_file() {
                return c;
            }
        }
        let dir = std::env::temp_dir().join(unique_name("vubd-ceph"));
        let out = Command::new(repo_root().join("scripts/ceph.sh"))
            .arg("start")
            .arg(&dir)
            .output()
            .expect("run scripts/ceph.sh");
        let _ = STARTED.set(dir.clone());
        // SAFETY: registers a plain function without arguments to run at exit.
        unsafe { libc::atexit(stop_at_exit) };
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "scripts/ceph.sh start failed (scripts/setup.sh installs Ceph): {}\n{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("CEPH_CONF="))
            .expect("ceph.sh printed CEPH_CONF")
            .to_string()
    })
}

/// Runs `rbd` against the test cluster; panics unless it succeeds. Returns stdout.
pub fn rbd(args: &[&str]) -> Vec<u8> {
    let out = Command::new("rbd")
        .arg("-c")
        .arg(conf())
        .args(args)
        .output()
        .expect("run rbd");
    assert!(
        out.status.success(),
        "rbd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The size of image `pool/image`, as `rbd info` reports it.
pub fn image_size(spec: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_slice(&rbd(&["info", "--format", "json", spec])).expect("rbd info json");
    v["size"].as_u64().expect("size in rbd info")
}

/// A new image name unique to this process.
pub fn image_name(prefix: &str) -> String {
    unique_name(prefix)
}

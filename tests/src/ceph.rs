//! The single-node Ceph cluster of the RBD tests: the one `$CEPH_CONF` names (started
//! by scripts/test.sh for the whole run), or else one this test process starts with
//! scripts/ceph.sh on first use and stops when it exits. The cephx tests get a
//! cluster of their own with authentication on ([`cephx`]), started the same way.

use crate::util::unique_name;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The cluster directories this process started (stopped at exit).
static STARTED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

extern "C" fn stop_at_exit() {
    let dirs = std::mem::take(&mut *STARTED.lock().unwrap_or_else(|p| p.into_inner()));
    for dir in dirs {
        let _ = Command::new(repo_root().join("scripts/ceph.sh"))
            .arg("stop")
            .arg(&dir)
            .status();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Starts a cluster with scripts/ceph.sh (`extra`: its options), stopped when this
/// process exits; the `NAME=value` lines it printed.
fn start(extra: &[&str], env: &[(&str, &str)]) -> Vec<(String, String)> {
    let dir = std::env::temp_dir().join(unique_name("vubd-ceph"));
    let out = Command::new(repo_root().join("scripts/ceph.sh"))
        .arg("start")
        .arg(&dir)
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .expect("run scripts/ceph.sh");
    let mut started = STARTED.lock().unwrap_or_else(|p| p.into_inner());
    if started.is_empty() {
        // SAFETY: registers a plain function without arguments to run at exit.
        unsafe { libc::atexit(stop_at_exit) };
    }
    started.push(dir);
    drop(started);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scripts/ceph.sh start failed (scripts/setup.sh installs Ceph): {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn value(vars: &[(String, String)], name: &str) -> String {
    vars.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("ceph.sh printed no {name}"))
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
        value(&start(&[], &[]), "CEPH_CONF")
    })
}

/// A cluster with cephx authentication (`ceph.sh start --cephx`).
pub struct Cephx {
    /// Its configuration file (client.admin's keyring is named there).
    pub conf: String,
    /// client.admin's keyring.
    pub keyring: String,
}

/// The cephx cluster of this process, started on first use (a small memory store:
/// the tests that use it write little).
pub fn cephx() -> &'static Cephx {
    static CLUSTER: OnceLock<Cephx> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let vars = start(&["--cephx"], &[("CEPH_OSD_BYTES", "536870912")]);
        Cephx {
            conf: value(&vars, "CEPH_CONF"),
            keyring: value(&vars, "CEPH_KEYRING"),
        }
    })
}

/// Runs `rbd` against the test cluster; panics unless it succeeds. Returns stdout.
pub fn rbd(args: &[&str]) -> Vec<u8> {
    rbd_on(conf(), args)
}

/// Runs `rbd` against the cluster of `conf`; panics unless it succeeds.
pub fn rbd_on(conf: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new("rbd")
        .arg("-c")
        .arg(conf)
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

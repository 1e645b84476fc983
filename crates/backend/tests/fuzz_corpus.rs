//! The fuzz targets on stable Rust, in every `cargo test`: each target replays its
//! committed corpus (`fuzz/corpus/<target>/`) and then a fixed number of cases
//! mutated from it with a fixed seed.
//!
//! A case fails the test by panicking, by taking longer than the per-case guard
//! (the whole process is aborted with the case's bytes written out), or, for the
//! vhost-user target, by leaving threads behind. Failing inputs are written to
//! `$TMPDIR/vubd-fuzz-<target>-<n>.bin`; replay one with
//! `FUZZ_INPUT=<file> cargo test -p vubd --test fuzz_corpus -- <target>`.
//!
//! `FUZZ_CASES=<n>` and `FUZZ_SEED=<n>` change the number of generated cases per
//! target and the seed (see docs/fuzzing.md for long runs with cargo-fuzz).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vubd::fuzzing::mutate::{mutate, Rng};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The corpus files of a target, in name order.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("corpus file"))
        })
        .collect()
}

/// The case running now: when it started, its name and its bytes.
type Running = Arc<Mutex<Option<(Instant, String, Vec<u8>)>>>;

/// Aborts the process if one case runs longer than `limit` (a hang cannot be
/// interrupted from inside the thread that hangs).
struct Watchdog {
    current: Running,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn new(target: &'static str, limit: Duration) -> Self {
        let current: Running = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (current.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                let guard = c.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((start, name, data)) = guard.as_ref() {
                    if start.elapsed() > limit {
                        let path = save(target, name, data);
                        eprintln!(
                            "{target}: case {name} ran longer than {limit:?} (hang); input in {}",
                            path.display()
                        );
                        std::process::abort();
                    }
                }
            }
        });
        Watchdog {
            current,
            stop,
            thread: Some(thread),
        }
    }

    fn start(&self, name: &str, data: &[u8]) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), name.to_string(), data.to_vec()));
    }

    fn done(&self) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn save(target: &str, name: &str, data: &[u8]) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let path = std::env::temp_dir().join(format!("vubd-fuzz-{target}-{safe}.bin"));
    let _ = std::fs::write(&path, data);
    path
}

/// Replays the corpus of `target` and `cases` mutations of it.
fn run(target: &'static str, f: fn(&[u8]), cases: u64, max_len: usize, limit: Duration) {
    if let Ok(file) = std::env::var("FUZZ_INPUT") {
        f(&std::fs::read(&file).expect("FUZZ_INPUT file"));
        return;
    }
    let corpus = corpus(target);
    assert!(!corpus.is_empty(), "no corpus for {target}");
    let cases = env_u64("FUZZ_CASES").unwrap_or(cases);
    let seed = env_u64("FUZZ_SEED").unwrap_or(1);
    let dog = Watchdog::new(target, limit);
    let started = Instant::now();
    let mut failures = Vec::new();
    let verbose = std::env::var_os("FUZZ_VERBOSE").is_some();
    let mut one = |name: String, data: &[u8]| {
        if verbose {
            eprintln!("{target}: {name}: {} bytes", data.len());
            save(target, "last", data);
        }
        dog.start(&name, data);
        if catch_unwind(AssertUnwindSafe(|| f(data))).is_err() {
            failures.push(format!("{name} ({})", save(target, &name, data).display()));
        }
        dog.done();
    };
    for (name, data) in &corpus {
        one(name.clone(), data);
    }
    let mut rng = Rng::new(seed);
    for i in 0..cases {
        let (_, base) = &corpus[rng.below(corpus.len())];
        let (_, other) = &corpus[rng.below(corpus.len())];
        let mut data = base.clone();
        mutate(&mut rng, &mut data, other, max_len);
        one(format!("seed{seed}-case{i}"), &data);
    }
    eprintln!(
        "{target}: {} corpus files and {cases} generated cases in {:.1?}",
        corpus.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{target}: failing inputs: {failures:?}"
    );
}

#[test]
fn desc_chain() {
    run(
        "desc_chain",
        vubd::fuzzing::desc_chain,
        100_000,
        40_000,
        Duration::from_secs(10),
    );
}

#[test]
fn keyval() {
    run(
        "keyval",
        vubd::fuzzing::keyval,
        200_000,
        4096,
        Duration::from_secs(10),
    );
}

/// Writes the seed inputs into `fuzz/corpus/` (run after changing an input layout).
#[test]
#[ignore]
fn write_seed_corpus() {
    use vubd::fuzzing::{desc_chain, options, vhost_user_msg};
    for (target, seeds) in [
        ("luks_header", blocklayer::drivers::luks::fuzzing::seeds()),
        ("desc_chain", desc_chain::seeds()),
        ("keyval", options::seeds()),
        ("vhost_user_msg", vhost_user_msg::seeds()),
    ] {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, data) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
        }
    }
}

#[test]
fn luks_header() {
    run(
        "luks_header",
        vubd::fuzzing::luks_header,
        400,
        1 << 20,
        Duration::from_secs(30),
    );
}

#[test]
fn vhost_user_msg() {
    run(
        "vhost_user_msg",
        vubd::fuzzing::vhost_user_msg,
        6000,
        16_384,
        Duration::from_secs(30),
    );
}

//! Trace events enabled at run time: `-T`/`--trace [enable=]PATTERN[,events=FILE]
//! [,file=FILE]`, as qemu-storage-daemon's.
//!
//! vubd's trace events are its log targets: every module that logs is one event,
//! named after its module path with the crate and the `export`/`drivers` levels left
//! out and `::` written `_` (`vubd::export::vhost_user_blk::server` is
//! `vhost_user_blk_server`, `blocklayer::drivers::qcow2` is `qcow2`). [`EVENTS`]
//! lists them. Enabling an event logs everything its module logs, debug and trace
//! lines included, whatever `RUST_LOG` says, without the per-call-site rate limit;
//! disabling it returns the module to `RUST_LOG`'s filter.
//!
//! Patterns are QEMU's: `*` and `?` wildcards; a leading `-` disables. QEMU's own
//! event names (`vu_*`, `nbd_*`...) are not vubd's: a pattern that names no event is
//! a warning, as in QEMU, and enables nothing.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

/// The modules that log, i.e. the trace events (their module paths). A unit test
/// checks that every source file that logs is one of them.
pub const EVENTS: &[&str] = &[
    "vubd",
    "vubd::control",
    "vubd::control::graph_ops",
    "vubd::control::jobs",
    "vubd::control::mirror",
    "vubd::control::snapshot",
    "vubd::control::transaction",
    "vubd::daemon",
    "vubd::export::nbd::conn",
    "vubd::export::nbd::server",
    "vubd::export::vhost_user_blk",
    "vubd::export::vhost_user_blk::device",
    "vubd::export::vhost_user_blk::guest_pins",
    "vubd::export::vhost_user_blk::server",
    "vubd::export::vhost_user_blk::vhost_user",
    "vubd::export::vhost_user_blk::vhost_user::dirty_log",
    "vubd::export::vhost_user_blk::vhost_user::reaper",
    "vubd::export::vhost_user_blk::vhost_user::sigbus",
    "vubd::iothread::event_loop",
    "vubd::jobs",
    "vubd::logging",
    "vubd::metrics",
    "vubd::metrics::http",
    "vubd::qmp::events",
    "vubd::qmp::outbox",
    "vubd::qmp::schema",
    "vubd::qmp::server",
    "blocklayer::aio::executor",
    "blocklayer::aio::fixed",
    "blocklayer::aio::uring",
    "blocklayer::drivers::blkdebug",
    "blocklayer::drivers::copy_before_write",
    "blocklayer::drivers::copy_before_write::options",
    "blocklayer::drivers::file::copier",
    "blocklayer::drivers::file::create",
    "blocklayer::drivers::file::mapped",
    "blocklayer::drivers::job_filter::active",
    "blocklayer::drivers::nbd::client",
    "blocklayer::drivers::qcow2",
    "blocklayer::events",
    "blocklayer::graph",
    "blocklayer::io",
    "blocklayer::periodic",
    "blocklayer::reopen",
    "qcow::alloc",
    "qcow::bitmaps",
    "qcow::image",
];

/// The trace event name of a module path.
pub fn event_name(module: &str) -> String {
    let rest = ["vubd::", "blocklayer::"]
        .iter()
        .find_map(|c| module.strip_prefix(c))
        .unwrap_or(module);
    let rest = ["export::", "drivers::"]
        .iter()
        .find_map(|c| rest.strip_prefix(c))
        .unwrap_or(rest);
    rest.replace("::", "_")
}

/// Whether any event is enabled (the logger's fast path).
static ANY: AtomicBool = AtomicBool::new(false);
/// The module paths of the enabled events.
static ENABLED: RwLock<Option<HashSet<&'static str>>> = RwLock::new(None);

/// Whether a log record of `target` belongs to an enabled event.
pub fn is_traced(target: &str) -> bool {
    if !ANY.load(Ordering::Relaxed) {
        return false;
    }
    let enabled = ENABLED.read().unwrap_or_else(|p| p.into_inner());
    enabled.as_ref().is_some_and(|set| set.contains(target))
}

/// Whether any event is enabled.
pub fn any_enabled() -> bool {
    ANY.load(Ordering::Relaxed)
}

/// Enables (or, with a leading `-`, disables) the events `pattern` matches; returns
/// how many it matched.
pub fn apply_pattern(pattern: &str) -> usize {
    let (pattern, enable) = match pattern.strip_prefix('-') {
        Some(p) => (p, false),
        None => (pattern, true),
    };
    let mut guard = ENABLED.write().unwrap_or_else(|p| p.into_inner());
    let set = guard.get_or_insert_with(HashSet::new);
    let mut matched = 0;
    for &module in EVENTS {
        if glob_match(pattern, &event_name(module)) {
            matched += 1;
            if enable {
                set.insert(module);
            } else {
                set.remove(module);
            }
        }
    }
    ANY.store(!set.is_empty(), Ordering::Relaxed);
    if !set.is_empty() {
        log::set_max_level(log::LevelFilter::Trace);
    }
    matched
}

/// QEMU's `g_pattern_match_simple`: `*` any run of characters, `?` one.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// One `--trace` option: its patterns (`enable` and the lines of `events`) and
/// `file`, where traced lines go instead of standard error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceOptions {
    pub patterns: Vec<String>,
    pub file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{0}")]
    Syntax(String),
    #[error("Invalid parameter '{0}'")]
    UnknownKey(String),
    #[error("cannot read trace events file '{path}': {source}")]
    EventsFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl TraceOptions {
    /// Parses the argument of `-T`/`--trace`: keyval with `enable` implied.
    pub fn parse(arg: &str) -> Result<TraceOptions, TraceError> {
        let v = crate::keyval::parse_option(arg, Some("enable"))
            .map_err(|e| TraceError::Syntax(e.to_string()))?;
        let mut out = TraceOptions::default();
        let serde_json::Value::Object(map) = v else {
            return Err(TraceError::Syntax("expected options".into()));
        };
        for (key, value) in map {
            let text = match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            match key.as_str() {
                "enable" => out.patterns.push(text),
                "events" => out.patterns.extend(read_events_file(&text)?),
                "file" => out.file = Some(PathBuf::from(text)),
                _ => return Err(TraceError::UnknownKey(key)),
            }
        }
        Ok(out)
    }
}

/// The patterns of an events file: one a line; blank lines and `#` comments skipped.
fn read_events_file(path: &str) -> Result<Vec<String>, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::EventsFile {
        path: PathBuf::from(path),
        source,
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect())
}

/// Whether `pattern` is a plain name (no wildcard): one that matches nothing is
/// worth a warning.
pub fn is_plain_name(pattern: &str) -> bool {
    !pattern.contains(['*', '?'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn names() {
        assert_eq!(
            event_name("vubd::export::vhost_user_blk::server"),
            "vhost_user_blk_server"
        );
        assert_eq!(event_name("blocklayer::drivers::qcow2"), "qcow2");
        assert_eq!(event_name("qcow::image"), "qcow_image");
        assert_eq!(event_name("vubd::qmp::server"), "qmp_server");
        assert_eq!(event_name("vubd"), "vubd");
        let names: HashSet<String> = EVENTS.iter().map(|m| event_name(m)).collect();
        assert_eq!(names.len(), EVENTS.len(), "event names are unique");
    }

    #[test]
    fn globs() {
        assert!(glob_match("vhost_user*", "vhost_user_blk_server"));
        assert!(glob_match("*", ""));
        assert!(glob_match("q?p_*", "qmp_server"));
        assert!(glob_match("*_server", "nbd_server"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(!glob_match("vhost_user", "vhost_user_blk"));
        assert!(glob_match("nbd_conn", "nbd_conn"));
    }

    #[test]
    fn options() {
        let o = TraceOptions::parse("vhost_user*").unwrap();
        assert_eq!(o.patterns, vec!["vhost_user*".to_string()]);
        let o = TraceOptions::parse("enable=qmp_*,file=/tmp/t").unwrap();
        assert_eq!(o.file, Some(PathBuf::from("/tmp/t")));
        assert!(TraceOptions::parse("foo=1").is_err());
        assert!(TraceOptions::parse("events=/nonexistent/x").is_err());
    }

    /// Every source file that logs is an event: the list cannot fall behind the code.
    #[test]
    fn every_logging_module_is_an_event() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut missing = Vec::new();
        for (dir, krate) in [
            ("backend/src", "vubd"),
            ("blocklayer/src", "blocklayer"),
            ("qcow/src", "qcow"),
        ] {
            let base = root.join(dir);
            let mut stack = vec![base.clone()];
            while let Some(d) = stack.pop() {
                for entry in std::fs::read_dir(&d).unwrap() {
                    let path = entry.unwrap().path();
                    if path.is_dir() {
                        stack.push(path);
                        continue;
                    }
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    // (Built, so that this file does not name them itself.)
                    let logs = ["trace!", "debug!", "info!", "warn!", "error!"]
                        .iter()
                        .map(|m| format!("log::{m}"))
                        .chain([format!("limited_{}!(", "log")])
                        .any(|m| text.contains(&m));
                    if !logs || path.extension().is_none_or(|e| e != "rs") {
                        continue;
                    }
                    let rel = path.strip_prefix(&base).unwrap().with_extension("");
                    let mut parts: Vec<String> = rel
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect();
                    if matches!(
                        parts.last().map(String::as_str),
                        Some("mod" | "lib" | "main")
                    ) {
                        parts.pop();
                    }
                    // Binaries other than vubd's main log under their own crate.
                    if parts.first().is_some_and(|p| p == "bin" || p == "fuzzing") {
                        continue;
                    }
                    let module = std::iter::once(krate.to_string())
                        .chain(parts)
                        .collect::<Vec<_>>()
                        .join("::");
                    if !EVENTS.contains(&module.as_str()) {
                        missing.push(module);
                    }
                }
            }
        }
        assert!(missing.is_empty(), "add to trace::EVENTS: {missing:?}");
    }
}

//! Rate-limited logging: a frontend or a monitor client that provokes the same
//! message over and over must not flood the log (and the disk behind it) or spend the
//! iothread's time formatting lines.
//!
//! Two layers:
//! - [`RateLimiter`]: a budget of lines per second for one key (an export and a kind
//!   of event). Messages beyond the budget are counted, and the next line that passes
//!   says how many were suppressed. Exports keep one per kind of event, so one
//!   attacked export never silences another.
//! - [`RateLimitedLogger`]: a `log::Log` around env_logger that applies the same
//!   budget per call site (file and line) to everything, including the libraries vubd
//!   builds on (virtio-queue and vhost-user-backend log per failed ring operation).
//!
//! Modules whose trace event is enabled (`--trace`, [`crate::trace`]) log everything,
//! unfiltered and unlimited, to standard error or the trace file.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lines per call site and second that [`RateLimitedLogger`] lets through.
pub const SITE_LINES_PER_SEC: u32 = 10;

/// The window of a budget.
const WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Window {
    start: Instant,
    passed: u32,
    suppressed: u64,
}

/// What a rate limiter decided about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` messages of this key were dropped since the last one that
    /// was logged (say so in the line).
    Log { suppressed: u64 },
    /// Drop it (counted).
    Drop,
}

/// A budget of `per_sec` messages per second for one key.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: u32,
    window: Mutex<Option<Window>>,
}

impl RateLimiter {
    pub const fn new(per_sec: u32) -> Self {
        RateLimiter {
            per_sec,
            window: Mutex::new(None),
        }
    }

    /// Decides about one message now.
    pub fn check(&self) -> Verdict {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        decide(&mut w, self.per_sec, Instant::now())
    }
}

fn decide(w: &mut Option<Window>, per_sec: u32, now: Instant) -> Verdict {
    let win = w.get_or_insert(Window {
        start: now,
        passed: 0,
        suppressed: 0,
    });
    if now.duration_since(win.start) >= WINDOW {
        win.start = now;
        win.passed = 0;
    }
    if win.passed < per_sec {
        win.passed += 1;
        Verdict::Log {
            suppressed: std::mem::take(&mut win.suppressed),
        }
    } else {
        win.suppressed += 1;
        Verdict::Drop
    }
}

/// The suffix a logged line gets when messages before it were suppressed.
pub fn suppressed_note(suppressed: u64) -> String {
    if suppressed == 0 {
        String::new()
    } else {
        format!(" ({suppressed} similar messages suppressed)")
    }
}

/// Logs through a [`RateLimiter`]: `limited_log!(limiter, log::Level::Warn, "...", args)`.
#[macro_export]
macro_rules! limited_log {
    ($limiter:expr, $level:expr, $($arg:tt)+) => {
        if log::log_enabled!($level) {
            if let $crate::logging::Verdict::Log { suppressed } = $limiter.check() {
                log::log!(
                    $level,
                    "{}{}",
                    format_args!($($arg)+),
                    $crate::logging::suppressed_note(suppressed)
                );
            }
        }
    };
}

/// Where the lines of enabled trace events go.
static TRACED: OnceLock<env_logger::Logger> = OnceLock::new();

fn traced_logger(file: Option<std::fs::File>) -> env_logger::Logger {
    let mut b = env_logger::Builder::new();
    b.filter_level(log::LevelFilter::Trace);
    if let Some(f) = file {
        b.target(env_logger::Target::Pipe(Box::new(f)));
    }
    b.build()
}

/// Sends the lines of enabled trace events to `file` (`--trace file=`); call before
/// enabling any. Returns false if they already go elsewhere.
pub fn set_trace_file(file: std::fs::File) -> bool {
    TRACED.set(traced_logger(Some(file))).is_ok()
}

/// A call site of a log line.
type Site = (&'static str, u32);

/// env_logger behind a per-call-site budget.
pub struct RateLimitedLogger {
    inner: env_logger::Logger,
    per_sec: u32,
    sites: Mutex<HashMap<Site, Window>>,
}

impl RateLimitedLogger {
    pub fn new(inner: env_logger::Logger, per_sec: u32) -> Self {
        RateLimitedLogger {
            inner,
            per_sec,
            sites: Mutex::new(HashMap::new()),
        }
    }

    /// Installs the logger (once per process).
    pub fn install(self) -> Result<(), log::SetLoggerError> {
        let max = self.inner.filter();
        log::set_boxed_logger(Box::new(self))?;
        log::set_max_level(max);
        Ok(())
    }

    fn site(record: &log::Record<'_>) -> Option<Site> {
        // Only call sites known for the program's lifetime are keys: the map stays as
        // small as the number of log statements.
        Some((record.file_static()?, record.line()?))
    }
}

impl log::Log for RateLimitedLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.inner.enabled(metadata) || crate::trace::is_traced(metadata.target())
    }

    fn log(&self, record: &log::Record<'_>) {
        if crate::trace::is_traced(record.target()) {
            TRACED.get_or_init(|| traced_logger(None)).log(record);
            return;
        }
        if !self.inner.matches(record) {
            return;
        }
        let Some(site) = Self::site(record) else {
            self.inner.log(record);
            return;
        };
        let verdict = {
            let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
            let mut w = sites.remove(&site);
            let v = decide(&mut w, self.per_sec, Instant::now());
            if let Some(w) = w {
                sites.insert(site, w);
            }
            v
        };
        match verdict {
            Verdict::Drop => {}
            Verdict::Log { suppressed: 0 } => self.inner.log(record),
            Verdict::Log { suppressed } => {
                let note = suppressed_note(suppressed);
                self.inner.log(
                    &log::Record::builder()
                        .args(format_args!("{}{note}", record.args()))
                        .level(record.level())
                        .target(record.target())
                        .module_path(record.module_path())
                        .file(record.file())
                        .line(record.line())
                        .build(),
                );
            }
        }
    }

    fn flush(&self) {
        self.inner.flush();
        if let Some(t) = TRACED.get() {
            t.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_per_window_and_suppressed_count() {
        let mut w = None;
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(decide(&mut w, 3, t0), Verdict::Log { suppressed: 0 });
        }
        for _ in 0..5 {
            assert_eq!(
                decide(&mut w, 3, t0 + Duration::from_millis(500)),
                Verdict::Drop
            );
        }
        // The next window reports what was dropped, once.
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!(decide(&mut w, 3, t1), Verdict::Log { suppressed: 5 });
        assert_eq!(decide(&mut w, 3, t1), Verdict::Log { suppressed: 0 });
    }

    #[test]
    fn limiter_counts_independently_per_instance() {
        let a = RateLimiter::new(1);
        let b = RateLimiter::new(1);
        assert_eq!(a.check(), Verdict::Log { suppressed: 0 });
        assert_eq!(a.check(), Verdict::Drop);
        assert_eq!(b.check(), Verdict::Log { suppressed: 0 });
        assert_eq!(suppressed_note(0), "");
        assert_eq!(suppressed_note(7), " (7 similar messages suppressed)");
    }
}

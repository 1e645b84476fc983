//! `vubd`: the vhost-user-blk storage daemon.

use std::process::ExitCode;
use vubd::cli::{self, CliAction};
use vubd::config::DaemonConfig;
use vubd::daemon::Daemon;
use vubd::daemonize;
use vubd::logging::{self, RateLimitedLogger, SITE_LINES_PER_SEC};
use vubd::trace;

#[global_allocator]
static ALLOCATOR: vubd::allocator::Allocator = vubd::allocator::Allocator;

/// Blocks the termination signals in this thread (and every thread it starts), so that
/// the main thread can wait for them synchronously.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; the calls
    // only read and write the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        // A peer closing a socket must not kill the daemon.
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is a valid initialised signal set and `sig` a valid out pointer.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// No transparent huge pages for the daemon's own memory. mimalloc's arenas are
/// committed eagerly on Linux, and with THP every thread's first touch of its part of
/// an arena faulted in 2 MiB: 50 QMP clients (a thread each) grew the RSS by 70 MiB
/// (tests/qmp/test_hostile.py `test_50_clients_at_once`; with this, as with glibc's
/// malloc, a few MiB). Guest memory is the frontend's mapping and not affected.
fn no_huge_pages() {
    // SAFETY: prctl(PR_SET_THP_DISABLE) takes plain integers and changes only a flag of
    // this process; failure (an old kernel) leaves THP as it was.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Applies the `--trace` options: where traced lines go, then the patterns in order.
/// A plain name that matches no event is a warning (as in QEMU), not an error.
fn start_tracing(cfg: &DaemonConfig) -> Result<(), String> {
    for (option, options) in &cfg.trace {
        if let Some(path) = &options.file {
            let file = std::fs::File::create(path)
                .map_err(|e| format!("{option}: cannot open '{}': {e}", path.display()))?;
            if !logging::set_trace_file(file) {
                return Err(format!("{option}: only one trace file can be given"));
            }
        }
        for pattern in &options.patterns {
            let name = pattern.strip_prefix('-').unwrap_or(pattern);
            if trace::apply_pattern(pattern) == 0 && trace::is_plain_name(name) {
                eprintln!("vubd: {option}: warning: trace event '{name}' does not exist");
            }
        }
    }
    Ok(())
}

/// Starts the daemon (in the background with `--daemonize`) and runs it until a
/// termination signal.
fn run(mut cfg: DaemonConfig) -> ExitCode {
    if let Err(e) = start_tracing(&cfg) {
        eprintln!("vubd: {e}");
        return ExitCode::from(1);
    }
    let readiness = if cfg.daemonize {
        // The daemon works in `/`: the paths it removes on the way out must not
        // depend on where it was started.
        if let Err(e) = cfg.make_paths_absolute() {
            eprintln!("vubd: {e}");
            return ExitCode::from(1);
        }
        match daemonize::daemonize() {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("vubd: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    let signals = block_signals();
    let daemon = match Daemon::start(&cfg) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vubd: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(r) = readiness {
        if let Err(e) = r.ready() {
            eprintln!("vubd: {e}");
            daemon.shutdown();
            return ExitCode::from(1);
        }
    }
    let sig = wait_for_signal(&signals);
    log::info!("signal {sig}: shutting down");
    daemon.shutdown();
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    // First, while nothing else is open and no thread runs: the inherited sockets
    // and systemd's activation variables (`addr.type=fd`).
    vubd::listen_fd::init();
    no_huge_pages();
    let logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).build();
    // A flood of one message (a hostile frontend, a broken ring) is cut to a few lines
    // per second and call site, with a count of what was suppressed.
    let _ = RateLimitedLogger::new(logger, SITE_LINES_PER_SEC).install();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("img") {
        return match vubd::img::main(&args[1..]) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("vubd img: {e}");
                ExitCode::from(1)
            }
        };
    }
    let cfg = match cli::parse_args(std::env::args().skip(1)) {
        Ok(CliAction::Run(cfg)) => *cfg,
        Ok(CliAction::Help) => {
            print!("{}", cli::usage());
            return ExitCode::SUCCESS;
        }
        Ok(CliAction::TraceHelp) => {
            for module in trace::EVENTS {
                println!("{}", trace::event_name(module));
            }
            return ExitCode::SUCCESS;
        }
        Ok(CliAction::Version) => {
            println!("vubd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vubd: {e}");
            return ExitCode::from(1);
        }
    };
    run(cfg)
}

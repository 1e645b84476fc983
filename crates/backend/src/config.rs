//! The daemon's typed configuration: what `--object`, `--blockdev`, `--export` on the
//! command line and the sections of a `--config` TOML file are parsed into.
//! (QMP commands will take the same structures.)

use blocklayer::options::coerce::{self, Fields};
use blocklayer::options::{BlockdevOptions, OptionsError};
use blocklayer::secret::SecretOptions;
use blocklayer::throttle::{self, ThrottleConfig};
use blocklayer::tls::TlsCredsOptions;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Error turning options into typed configuration; messages name the option and parameter.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{option}: {source}")]
    Options {
        option: String,
        source: blocklayer::options::OptionsError,
    },
    #[error("{option}: {message}")]
    Invalid { option: String, message: String },
    #[error("{0}")]
    Usage(String),
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Toml { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, ConfigError>;

/// `--object iothread,id=io0,poll-max-ns=..,poll-grow=..,poll-shrink=..,aio-max-batch=..`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoThreadConfig {
    pub id: String,
    /// QEMU default 32768 (32 us); 0 disables polling.
    pub poll_max_ns: u64,
    /// 0 means the default factor (2).
    pub poll_grow: u64,
    /// 0 means the default (halve on shrink... QEMU: reset to 0).
    pub poll_shrink: u64,
    /// 0 means the default batch.
    pub aio_max_batch: u64,
}

/// `--object throttle-group,id=tg0,x-iops-total=..` or `object-add` with `limits`
/// (QEMU's `ThrottleGroupProperties`): the values as given, checked when the group
/// is made ([`ThrottleGroupConfig::to_config`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleGroupConfig {
    pub id: String,
    /// The `x-*` properties given, by name.
    pub legacy: Vec<(String, i64)>,
    /// The members of `limits` given, by name.
    pub limits: Vec<(String, i64)>,
}

/// `--object ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectConfig {
    IoThread(IoThreadConfig),
    ThrottleGroup(ThrottleGroupConfig),
    /// `secret` (loaded when added; see [`blocklayer::secret`]).
    Secret(SecretOptions),
    /// `tls-creds-x509` (loaded when added; see [`blocklayer::tls`]).
    TlsCredsX509(TlsCredsOptions),
}

/// `--export type=vhost-user-blk,...` (QEMU's BlockExportOptions + vhost-user-blk part).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    pub id: String,
    pub node_name: String,
    /// `writable` (default off, as QEMU)
    pub writable: bool,
    /// `writethrough` (default off): flush after every write before completing it
    pub writethrough: bool,
    /// `addr.type=unix,addr.path=...`: the vhost-user socket path (empty with
    /// `addr.type=fd`)
    pub socket_path: PathBuf,
    /// `addr.type=fd,addr.str=...`: an inherited listening socket, by number or by
    /// systemd name ([`crate::listen_fd`])
    pub socket_fd: Option<String>,
    /// `num-queues` (default 1)
    pub num_queues: u16,
    /// `iothread` (a string) or `iothread.0=..,iothread.1=..` / a JSON array; empty means
    /// the export gets one iothread of its own with default polling properties.
    pub iothreads: Vec<String>,
    /// `fixed-iothread` (accepted; vubd never moves an export implicitly)
    pub fixed_iothread: bool,
    /// `logical-block-size`: 512 or 4096 (default 512)
    pub logical_block_size: u32,
    /// `serial` (vubd extension; default: the export id), at most 20 bytes
    pub serial: Option<String>,
    /// `queue-size` (vubd extension; max descriptors per queue, default 1024)
    pub queue_size: u16,
    /// `write-cache=on|off` (vubd extension, QEMU's virtio-blk property): the write
    /// cache mode the guest starts with; `None` follows `writethrough`.
    pub write_cache: Option<bool>,
    /// `rerror=report|ignore|stop` (vubd extension, default report, as QEMU's virtio-blk)
    pub rerror: OnError,
    /// `werror=report|ignore|stop|enospc` (vubd extension, default enospc)
    pub werror: OnError,
    /// `pin-guest-memory=on|off` (vubd extension, default off): register the
    /// frontend's memory with the iothreads' io_uring, so that `O_DIRECT` requests do
    /// not pin its pages one request at a time. Pins (and allocates) all of it while
    /// connected; only for frontends that never give pages back (no balloon, no
    /// virtio-mem).
    pub pin_guest_memory: bool,
    /// `type=nbd`: the NBD options (the vhost-user-blk ones above keep their
    /// defaults, `socket_path` empty).
    pub nbd: Option<NbdExportConfig>,
}

/// The NBD part of `block-export-add type=nbd` (QEMU's `BlockExportOptionsNbd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdExportConfig {
    /// `name` (default: the node name)
    pub name: Option<String>,
    pub description: Option<String>,
    /// `bitmaps`: names of bitmaps on the node or its backing chain, or
    /// (node, name) pairs.
    pub bitmaps: Vec<(Option<String>, String)>,
    /// `allocation-depth`
    pub allocation_depth: bool,
}

/// An NBD server's address (QEMU's `SocketAddress`, unix or inet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    Unix(PathBuf),
    Inet {
        host: String,
        port: String,
    },
    /// An inherited listening socket, by number or by systemd name
    /// ([`crate::listen_fd`]).
    Fd(String),
}

/// `--nbd-server` / `nbd-server-start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdServerConfig {
    pub addr: NbdAddr,
    /// `max-connections` (0: no limit)
    pub max_connections: u32,
    /// `tls-creds`: the id of a `tls-creds-x509` object
    pub tls_creds: Option<String>,
    /// `tls-authz`: the id of an authz object (vubd has none: refused with
    /// `tls-creds`, ignored without, as QEMU ignores it then)
    pub tls_authz: Option<String>,
}

impl NbdServerConfig {
    /// `--nbd-server addr.type=unix,addr.path=...` (a flat `SocketAddress`).
    pub fn from_json(v: &Value) -> OptionsResult<Self> {
        let mut f = Fields::new(v, "")?;
        let cfg = NbdServerConfig {
            addr: take_listen_addr(&mut f)?,
            max_connections: take_max_connections(&mut f)?,
            tls_creds: f.string("tls-creds")?,
            tls_authz: f.string("tls-authz")?,
        };
        f.finish()?;
        Ok(cfg)
    }
}

/// `addr`: where a server listens (QEMU's `SocketAddress`, unix or inet).
fn take_listen_addr(f: &mut Fields) -> OptionsResult<NbdAddr> {
    let addr = f.object("addr")?;
    let mut addr = f.required("addr", addr)?;
    let addr_type = addr.required_string("type")?;
    let a = match addr_type.as_str() {
        "unix" => NbdAddr::Unix(PathBuf::from(addr.required_string("path")?)),
        "inet" => NbdAddr::Inet {
            host: addr.required_string("host")?,
            port: addr.required_string("port")?,
        },
        "fd" => NbdAddr::Fd(addr.required_string("str")?),
        _ => {
            return Err(bad_value(
                &addr.name("type"),
                format!(
                    "'{addr_type}' is not supported (vubd listens on unix and inet sockets \
                     and on inherited ones, fd)"
                ),
            ))
        }
    };
    addr.finish()?;
    Ok(a)
}

/// `--metrics addr.type=unix,addr.path=P | addr.type=inet,addr.host=H,addr.port=N`:
/// the Prometheus endpoint (a vubd extension), on a UNIX socket or a loopback address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub addr: NbdAddr,
}

impl MetricsConfig {
    pub fn from_json(v: &Value) -> OptionsResult<Self> {
        let mut f = Fields::new(v, "")?;
        let addr = take_listen_addr(&mut f)?;
        f.finish()?;
        if let NbdAddr::Inet { host, .. } = &addr {
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(bad_value(
                    "addr.host",
                    format!(
                        "'{host}' is not a loopback address (metrics are served on a UNIX \
                         socket, 127.0.0.0/8, ::1 or localhost only)"
                    ),
                ));
            }
        }
        Ok(MetricsConfig { addr })
    }
}

fn take_max_connections(f: &mut Fields) -> OptionsResult<u32> {
    let n = f.uint("max-connections")?.unwrap_or(0);
    u32::try_from(n).map_err(|_| bad_value("max-connections", format!("{n} is too large")))
}

/// What a failed request does (QEMU's `BlockdevOnError`): the block layer's.
pub use blocklayer::backend::OnError;

impl ExportConfig {
    /// The write cache mode the guest starts with.
    pub fn initial_write_cache(&self) -> bool {
        self.write_cache.unwrap_or(!self.writethrough)
    }
}

/// Where a monitor's chardev talks (the chardevs vubd has).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChardevEndpoint {
    /// `socket,path=P,server=on`: a UNIX socket vubd binds.
    Path(PathBuf),
    /// `socket,fd=S,server=on`: an inherited listening UNIX socket, by number or by
    /// systemd name ([`crate::listen_fd`]).
    Fd(String),
    /// `socket,fd=S` (not a server): an inherited connected UNIX socket, one QMP
    /// session (a socketpair's end, say).
    FdConnected(String),
    /// `stdio`: one QMP session on standard input and output.
    Stdio,
    /// `pipe,path=P`: one QMP session reading `P.in` and writing `P.out`, or reading
    /// and writing `P` if those cannot be opened (as QEMU).
    Pipe(PathBuf),
}

/// `--chardev socket,id=<id>,path=<path>|fd=<fd>,server=on[,wait=off]`,
/// `--chardev socket,id=<id>,fd=<fd>` (connected),
/// `--chardev stdio,id=<id>` or `--chardev pipe,id=<id>,path=<path>`: what a QMP
/// monitor serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevConfig {
    pub id: String,
    pub endpoint: ChardevEndpoint,
    /// `wait=on` (QEMU's default for a server socket): start-up waits until the first
    /// client connects.
    pub wait: bool,
}

/// `--monitor [chardev=]<id>[,mode=control][,pretty=on|off]`: a QMP monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorConfig {
    pub chardev: String,
    pub pretty: bool,
}

/// A monitor with its chardev resolved: what the daemon binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorSocketConfig {
    pub chardev: String,
    pub endpoint: ChardevEndpoint,
    pub pretty: bool,
    pub wait: bool,
}

/// Everything the daemon is told to set up, in the order given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DaemonConfig {
    pub chardevs: Vec<ChardevConfig>,
    pub monitors: Vec<MonitorConfig>,
    pub objects: Vec<ObjectConfig>,
    pub blockdevs: Vec<BlockdevOptions>,
    pub exports: Vec<ExportConfig>,
    /// `--pidfile`
    pub pidfile: Option<PathBuf>,
    /// `--nbd-server`
    pub nbd_server: Option<Box<NbdServerConfig>>,
    /// `--metrics`
    pub metrics: Option<MetricsConfig>,
    /// `--daemonize`
    pub daemonize: bool,
    /// `-T`/`--trace`: the trace options given, in order, with the option as
    /// written (for messages)
    pub trace: Vec<(String, crate::trace::TraceOptions)>,
}

/// QEMU's default `poll-max-ns` of an iothread.
pub const DEFAULT_POLL_MAX_NS: u64 = 32768;
/// The most queues an export may have.
pub const MAX_NUM_QUEUES: u16 = 64;
/// The default `queue-size`.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;
/// The largest `queue-size` (virtio's limit).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// The smallest `queue-size`: a request takes a header and a status descriptor
/// besides its data, and `seg_max` is the queue size minus those two (QEMU's
/// virtio-blk also wants more than 2).
pub const MIN_QUEUE_SIZE: u16 = 4;
/// The default `logical-block-size`.
pub const DEFAULT_LOGICAL_BLOCK_SIZE: u32 = 512;
/// QEMU's block size limits (`check_block_size()`).
pub const MIN_BLOCK_SIZE: u64 = 512;
pub const MAX_BLOCK_SIZE: u64 = 32768;
/// virtio-blk's serial number (`VIRTIO_BLK_ID_BYTES`).
pub const MAX_SERIAL_LEN: usize = 20;
/// The longest unix socket path (`sun_path` holds 108 bytes with the terminating NUL).
const MAX_SOCKET_PATH_LEN: usize = 107;

type OptionsResult<T> = blocklayer::options::Result<T>;

fn bad_value(name: &str, reason: impl Into<String>) -> OptionsError {
    OptionsError::BadValue {
        name: name.to_string(),
        reason: reason.into(),
    }
}

/// QEMU 7.2 object types (`ObjectType`) a storage daemon could be given; other names
/// are refused as QEMU refuses them.
const QEMU_OBJECT_TYPES: &[&str] = &[
    "authz-list",
    "authz-listfile",
    "authz-pam",
    "authz-simple",
    "cryptodev-backend",
    "cryptodev-backend-builtin",
    "dbus-vmstate",
    "filter-buffer",
    "filter-dump",
    "filter-mirror",
    "filter-redirector",
    "filter-replay",
    "filter-rewriter",
    "input-barrier",
    "input-linux",
    "iothread",
    "main-loop",
    "memory-backend-epc",
    "memory-backend-file",
    "memory-backend-memfd",
    "memory-backend-ram",
    "pef-guest",
    "pr-manager-helper",
    "qtest",
    "rng-builtin",
    "rng-egd",
    "rng-random",
    "secret",
    "secret_keyring",
    "sev-guest",
    "thread-context",
    "s390-pv-guest",
    "throttle-group",
    "tls-creds-anon",
    "tls-creds-psk",
    "tls-creds-x509",
    "tls-cipher-suites",
    "x-remote-object",
    "x-vfio-user-server",
];

/// QEMU 7.2 export types (`BlockExportType`).
const QEMU_EXPORT_TYPES: &[&str] = &["nbd", "vhost-user-blk", "fuse"];

/// The required `id` of an object or export: a well-formed QEMU identifier.
fn take_id(f: &mut Fields) -> OptionsResult<String> {
    let id = f.required_string("id")?;
    if !coerce::is_valid_id(&id) {
        return Err(OptionsError::Invalid {
            name: f.name("id"),
            expected: "an identifier".into(),
        });
    }
    Ok(id)
}

/// The kinds of items the command line and the config file define.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    Chardev,
    Monitor,
    Object,
    Blockdev,
    Export,
}

impl ItemKind {
    /// The option (`--object`) and TOML table (`[[object]]`) name.
    pub fn name(self) -> &'static str {
        match self {
            ItemKind::Chardev => "chardev",
            ItemKind::Monitor => "monitor",
            ItemKind::Object => "object",
            ItemKind::Blockdev => "blockdev",
            ItemKind::Export => "export",
        }
    }

    /// The key a leading value without `key=` belongs to.
    pub fn implied_key(self) -> &'static str {
        match self {
            ItemKind::Chardev => "backend",
            ItemKind::Monitor => "chardev",
            ItemKind::Object => "qom-type",
            ItemKind::Blockdev => "driver",
            ItemKind::Export => "type",
        }
    }
}

impl ChardevConfig {
    /// Parses `--chardev` options: a server UNIX socket (by path or inherited), stdio
    /// or a pipe.
    pub fn from_json(v: &Value) -> OptionsResult<Self> {
        let mut f = Fields::new(v, "")?;
        let backend = f.required_string("backend")?;
        let id = take_id(&mut f)?;
        let (endpoint, wait) = match backend.as_str() {
            "socket" => socket_chardev(&mut f)?,
            "stdio" => {
                // signal=on|off (^C handling on a terminal) has no meaning here.
                f.bool("signal")?;
                (ChardevEndpoint::Stdio, false)
            }
            "pipe" => (ChardevEndpoint::Pipe(take_chardev_path(&mut f)?), false),
            _ => {
                return Err(bad_value(
                    "backend",
                    format!(
                        "'{backend}' is not supported (vubd's monitor needs a 'socket', \
                         'stdio' or 'pipe' chardev)"
                    ),
                ))
            }
        };
        f.finish()?;
        Ok(ChardevConfig { id, endpoint, wait })
    }
}

/// A socket chardev's endpoint and `wait`.
fn socket_chardev(f: &mut Fields) -> OptionsResult<(ChardevEndpoint, bool)> {
    let fd = f.string("fd")?;
    if let Some(fd) = &fd {
        if f.contains("path") {
            return Err(bad_value(
                "fd",
                format!("'fd={fd}' and 'path' are mutually exclusive"),
            ));
        }
    }
    let server = f.bool("server")?.unwrap_or(false);
    let wait = f.bool("wait")?.unwrap_or(true);
    let endpoint = match (fd, server) {
        (Some(fd), true) => ChardevEndpoint::Fd(fd),
        (Some(fd), false) => return Ok((ChardevEndpoint::FdConnected(fd), false)),
        (None, true) => ChardevEndpoint::Path(take_chardev_path(f)?),
        (None, false) => {
            return Err(bad_value(
                "server",
                "the monitor socket must be a listening socket (server=on)",
            ))
        }
    };
    Ok((endpoint, wait))
}

/// A chardev's `path`: a UNIX socket path, or a pipe's.
fn take_chardev_path(f: &mut Fields) -> OptionsResult<PathBuf> {
    let path = f.required_string("path")?;
    if path.is_empty() || path.len() > MAX_SOCKET_PATH_LEN {
        return Err(bad_value(
            "path",
            format!("'{path}' is not a usable UNIX socket path (1 to {MAX_SOCKET_PATH_LEN} bytes)"),
        ));
    }
    Ok(PathBuf::from(path))
}

impl MonitorConfig {
    /// Parses `--monitor` options.
    pub fn from_json(v: &Value) -> OptionsResult<Self> {
        let mut f = Fields::new(v, "")?;
        let chardev = f.required_string("chardev")?;
        // An `id` is accepted and has no further use.
        if f.string("id")?.is_some_and(|id| !coerce::is_valid_id(&id)) {
            return Err(OptionsError::Invalid {
                name: "id".into(),
                expected: "an identifier".into(),
            });
        }
        if let Some(mode) = f.string("mode")? {
            if mode != "control" {
                return Err(bad_value(
                    "mode",
                    format!("'{mode}' is not supported (vubd's monitor speaks QMP: mode=control)"),
                ));
            }
        }
        let pretty = f.bool("pretty")?.unwrap_or(false);
        f.finish()?;
        Ok(MonitorConfig { chardev, pretty })
    }
}

impl IoThreadConfig {
    fn take_from(f: &mut Fields) -> OptionsResult<Self> {
        Ok(IoThreadConfig {
            id: take_id(f)?,
            poll_max_ns: f.uint("poll-max-ns")?.unwrap_or(DEFAULT_POLL_MAX_NS),
            poll_grow: f.uint("poll-grow")?.unwrap_or(0),
            poll_shrink: f.uint("poll-shrink")?.unwrap_or(0),
            aio_max_batch: f.uint("aio-max-batch")?.unwrap_or(0),
        })
    }
}

impl ThrottleGroupConfig {
    fn take_from(f: &mut Fields) -> OptionsResult<Self> {
        let id = take_id(f)?;
        let mut legacy = Vec::new();
        for name in throttle::config::limit_names() {
            let key = format!("x-{name}");
            if let Some(v) = f.int(&key)? {
                legacy.push((key, v));
            }
        }
        let mut limits = Vec::new();
        if let Some(mut l) = f.object("limits")? {
            for name in throttle::config::limit_names() {
                if let Some(v) = l.int(name)? {
                    limits.push((name.to_string(), v));
                }
            }
            l.finish()?;
        }
        Ok(ThrottleGroupConfig { id, legacy, limits })
    }

    /// The group's limits: the `x-*` properties, then `limits` over them, checked as
    /// QEMU checks them (its texts).
    pub fn to_config(&self) -> std::result::Result<ThrottleConfig, String> {
        let mut c = ThrottleConfig::default();
        for (name, v) in &self.legacy {
            c.set_legacy(name, *v)?;
        }
        if self.limits.is_empty() {
            c.validate()?;
        } else {
            c.apply_limits(&self.limits)?;
        }
        Ok(c)
    }
}

impl ObjectConfig {
    /// Parses `--object` options (QEMU's `object-add` arguments, `qom-type` and `id`
    /// included).
    pub fn from_json(v: &Value) -> OptionsResult<Self> {
        Self::from_fields(Fields::new(v, "")?)
    }

    /// As [`ObjectConfig::from_json`] for QMP `object-add` (strict JSON types).
    pub fn from_qmp(v: &Value) -> OptionsResult<Self> {
        Self::from_fields(Fields::new_strict(v, "")?)
    }

    fn from_fields(mut f: Fields) -> OptionsResult<Self> {
        let qom_type = f.required_string("qom-type")?;
        let object = match qom_type.as_str() {
            "iothread" => ObjectConfig::IoThread(IoThreadConfig::take_from(&mut f)?),
            "throttle-group" => {
                ObjectConfig::ThrottleGroup(ThrottleGroupConfig::take_from(&mut f)?)
            }
            "secret" => {
                let id = take_id(&mut f)?;
                ObjectConfig::Secret(SecretOptions::take_from(&mut f, id)?)
            }
            "tls-creds-x509" => {
                let id = take_id(&mut f)?;
                ObjectConfig::TlsCredsX509(TlsCredsOptions::take_from(&mut f, id)?)
            }
            other if QEMU_OBJECT_TYPES.contains(&other) => {
                return Err(bad_value(
                    "qom-type",
                    format!(
                        "'{other}' is not supported (vubd has 'iothread', 'throttle-group', \
                         'secret' and 'tls-creds-x509' objects)"
                    ),
                ))
            }
            other => {
                return Err(OptionsError::BadEnum {
                    name: "qom-type".into(),
                    value: other.to_string(),
                })
            }
        };
        f.finish()?;
        Ok(object)
    }

    /// The object's `qom-type`.
    pub fn qom_type(&self) -> &'static str {
        match self {
            ObjectConfig::IoThread(_) => "iothread",
            ObjectConfig::ThrottleGroup(_) => "throttle-group",
            ObjectConfig::Secret(_) => "secret",
            ObjectConfig::TlsCredsX509(_) => "tls-creds-x509",
        }
    }

    pub fn id(&self) -> &str {
        match self {
            ObjectConfig::IoThread(iothread) => &iothread.id,
            ObjectConfig::ThrottleGroup(group) => &group.id,
            ObjectConfig::Secret(secret) => &secret.id,
            ObjectConfig::TlsCredsX509(creds) => &creds.id,
        }
    }
}

impl ExportConfig {
    /// Parses `--export` options (QEMU's `block-export-add` arguments for
    /// `type=vhost-user-blk`, plus vubd's `serial` and `queue-size`).
    pub fn from_json(v: &Value) -> OptionsResult<Self> {
        Self::from_fields(Fields::new(v, "")?)
    }

    /// As [`ExportConfig::from_json`] for QMP `block-export-add` (strict JSON types).
    pub fn from_qmp(v: &Value) -> OptionsResult<Self> {
        Self::from_fields(Fields::new_strict(v, "")?)
    }

    fn from_fields(mut f: Fields) -> OptionsResult<Self> {
        let export_type = f.required_string("type")?;
        if !QEMU_EXPORT_TYPES.contains(&export_type.as_str()) {
            return Err(OptionsError::BadEnum {
                name: "type".into(),
                value: export_type,
            });
        }
        if export_type == "nbd" {
            return Self::nbd_from_fields(f);
        }
        if export_type != "vhost-user-blk" {
            return Err(bad_value(
                "type",
                format!(
                    "'{export_type}' is not supported (vubd exports vhost-user-blk and nbd only)"
                ),
            ));
        }
        let export = ExportConfig {
            id: take_id(&mut f)?,
            node_name: f.required_string("node-name")?,
            writable: f.bool("writable")?.unwrap_or(false),
            writethrough: f.bool("writethrough")?.unwrap_or(false),
            socket_path: PathBuf::new(),
            socket_fd: None,
            num_queues: take_num_queues(&mut f)?,
            iothreads: take_iothreads(&mut f)?,
            fixed_iothread: f.bool("fixed-iothread")?.unwrap_or(false),
            logical_block_size: take_logical_block_size(&mut f)?,
            serial: take_serial(&mut f)?,
            queue_size: take_queue_size(&mut f)?,
            write_cache: f.bool("write-cache")?,
            rerror: f
                .enumeration(
                    "rerror",
                    &[
                        ("report", OnError::Report),
                        ("ignore", OnError::Ignore),
                        ("stop", OnError::Stop),
                    ],
                )?
                .unwrap_or(OnError::Report),
            werror: f
                .enumeration(
                    "werror",
                    &[
                        ("report", OnError::Report),
                        ("ignore", OnError::Ignore),
                        ("stop", OnError::Stop),
                        ("enospc", OnError::Enospc),
                    ],
                )?
                .unwrap_or(OnError::Enospc),
            pin_guest_memory: f.bool("pin-guest-memory")?.unwrap_or(false),
            nbd: None,
        };
        let mut export = export;
        match take_addr(&mut f)? {
            ListenAddr::Path(path) => export.socket_path = path,
            ListenAddr::Fd(fd) => export.socket_fd = Some(fd),
        }
        if export.write_cache == Some(true) && export.writethrough {
            return Err(bad_value(
                "write-cache",
                "write-cache=on contradicts writethrough=on",
            ));
        }
        f.finish()?;
        Ok(export)
    }
}

impl ExportConfig {
    /// `type=nbd`: QEMU's `BlockExportOptions` common part and `BlockExportOptionsNbd`.
    fn nbd_from_fields(mut f: Fields) -> OptionsResult<Self> {
        let id = take_id(&mut f)?;
        let node_name = f.required_string("node-name")?;
        let writable = f.bool("writable")?.unwrap_or(false);
        let writethrough = f.bool("writethrough")?.unwrap_or(false);
        let iothreads = take_iothreads(&mut f)?;
        let fixed_iothread = f.bool("fixed-iothread")?.unwrap_or(false);
        let name = f.string("name")?;
        let description = f.string("description")?;
        let allocation_depth = f.bool("allocation-depth")?.unwrap_or(false);
        let bitmaps = take_nbd_bitmaps(&mut f)?;
        f.finish()?;
        Ok(ExportConfig {
            id,
            node_name,
            writable,
            writethrough,
            socket_path: PathBuf::new(),
            socket_fd: None,
            num_queues: 1,
            iothreads,
            fixed_iothread,
            logical_block_size: DEFAULT_LOGICAL_BLOCK_SIZE,
            serial: None,
            queue_size: 0,
            write_cache: None,
            rerror: OnError::Report,
            werror: OnError::Report,
            pin_guest_memory: false,
            nbd: Some(NbdExportConfig {
                name,
                description,
                bitmaps,
                allocation_depth,
            }),
        })
    }
}

/// `bitmaps`: a list of bitmap names or `{node, name}` objects (QEMU's
/// `BlockDirtyBitmapOrStr`).
fn take_nbd_bitmaps(f: &mut Fields) -> OptionsResult<Vec<(Option<String>, String)>> {
    let name = f.name("bitmaps");
    let items = match f.take("bitmaps") {
        None => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(OptionsError::Invalid {
                name,
                expected: "array".into(),
            })
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Object(o) => {
                let node = o
                    .get("node")
                    .map(|v| coerce::to_string(&format!("{name}[{i}].node"), v));
                let bm = o
                    .get("name")
                    .map(|v| coerce::to_string(&format!("{name}[{i}].name"), v));
                match (node, bm) {
                    (Some(n), Some(b)) => Ok((Some(n?), b?)),
                    _ => Err(OptionsError::Invalid {
                        name: format!("{name}[{i}]"),
                        expected: "a bitmap name or {node, name}".into(),
                    }),
                }
            }
            v => Ok((None, coerce::to_string(&format!("{name}[{i}]"), v)?)),
        })
        .collect()
}

/// Where a vhost-user-blk export listens.
enum ListenAddr {
    Path(PathBuf),
    Fd(String),
}

/// `addr`: a unix socket address or an inherited socket (QEMU's `SocketAddress`
/// with `type=unix` or `type=fd`).
fn take_addr(f: &mut Fields) -> OptionsResult<ListenAddr> {
    let addr = f.object("addr")?;
    let mut addr = f.required("addr", addr)?;
    let addr_type = addr.required_string("type")?;
    if addr_type == "fd" {
        let fd = addr.required_string("str")?;
        addr.finish()?;
        return Ok(ListenAddr::Fd(fd));
    }
    if addr_type != "unix" {
        return Err(bad_value(
            &addr.name("type"),
            format!(
                "'{addr_type}' is not supported (vubd listens on unix sockets, or on an \
                 inherited one: fd)"
            ),
        ));
    }
    let path = addr.required_string("path")?;
    if path.is_empty() {
        return Err(bad_value(&addr.name("path"), "the socket path is empty"));
    }
    if path.len() > MAX_SOCKET_PATH_LEN {
        return Err(bad_value(
            &addr.name("path"),
            format!("UNIX socket path '{path}' is too long (at most {MAX_SOCKET_PATH_LEN} bytes)"),
        ));
    }
    addr.finish()?;
    Ok(ListenAddr::Path(PathBuf::from(path)))
}

fn take_num_queues(f: &mut Fields) -> OptionsResult<u16> {
    let num_queues = f.unsigned("num-queues")?.unwrap_or(1);
    if num_queues > u64::from(u16::MAX) {
        return Err(OptionsError::Invalid {
            name: f.name("num-queues"),
            expected: "uint16_t".into(),
        });
    }
    match u16::try_from(num_queues) {
        Ok(n @ 1..=MAX_NUM_QUEUES) => Ok(n),
        _ => Err(bad_value(
            "num-queues",
            format!("{num_queues} is out of range (1 to {MAX_NUM_QUEUES})"),
        )),
    }
}

/// `iothread`: one iothread id or a list of them.
fn take_iothreads(f: &mut Fields) -> OptionsResult<Vec<String>> {
    let name = f.name("iothread");
    match f.take("iothread") {
        None => Ok(Vec::new()),
        Some(Value::String(id)) => Ok(vec![id]),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| coerce::to_string(&format!("{name}.{i}"), item))
            .collect(),
        Some(_) => Err(OptionsError::Invalid {
            name,
            expected: "an iothread id or a list of iothread ids".into(),
        }),
    }
}

/// `logical-block-size`: a power of two from 512 to 32768, as QEMU's
/// `check_block_size()`.
fn take_logical_block_size(f: &mut Fields) -> OptionsResult<u32> {
    let Some(size) = (if f.is_strict() {
        f.unsigned("logical-block-size")?
    } else {
        f.size("logical-block-size")?
    }) else {
        return Ok(DEFAULT_LOGICAL_BLOCK_SIZE);
    };
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&size) {
        return Err(bad_value(
            "logical-block-size",
            format!(
                "{size} is out of range (minimum: {MIN_BLOCK_SIZE}, maximum: {MAX_BLOCK_SIZE})"
            ),
        ));
    }
    if !size.is_power_of_two() {
        return Err(bad_value(
            "logical-block-size",
            format!("{size} is not a power of 2"),
        ));
    }
    u32::try_from(size).map_err(|_| bad_value("logical-block-size", "out of range"))
}

fn take_serial(f: &mut Fields) -> OptionsResult<Option<String>> {
    let serial = f.string("serial")?;
    if let Some(serial) = &serial {
        if serial.len() > MAX_SERIAL_LEN {
            return Err(bad_value(
                "serial",
                format!("'{serial}' is longer than {MAX_SERIAL_LEN} bytes"),
            ));
        }
    }
    Ok(serial)
}

fn take_queue_size(f: &mut Fields) -> OptionsResult<u16> {
    let size = f
        .unsigned("queue-size")?
        .unwrap_or(u64::from(DEFAULT_QUEUE_SIZE));
    match u16::try_from(size) {
        Ok(n @ MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE) if n.is_power_of_two() => Ok(n),
        _ => Err(bad_value(
            "queue-size",
            format!("{size} is not a power of 2 from {MIN_QUEUE_SIZE} to {MAX_QUEUE_SIZE}"),
        )),
    }
}

fn invalid(option: String, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        option,
        message: message.into(),
    }
}

fn export_label(export: &ExportConfig) -> String {
    format!("--export id={}", export.id)
}

impl DaemonConfig {
    /// Adds one item given as QEMU-style JSON (from keyval, JSON or TOML).
    pub fn add_item(&mut self, kind: ItemKind, v: &Value) -> OptionsResult<()> {
        match kind {
            ItemKind::Chardev => self.chardevs.push(ChardevConfig::from_json(v)?),
            ItemKind::Monitor => self.monitors.push(MonitorConfig::from_json(v)?),
            ItemKind::Object => self.objects.push(ObjectConfig::from_json(v)?),
            ItemKind::Blockdev => self.blockdevs.push(BlockdevOptions::from_json_root(v)?),
            ItemKind::Export => self.exports.push(ExportConfig::from_json(v)?),
        }
        Ok(())
    }

    /// Appends `other`'s items after this one's; its pidfile and metrics, if any, win.
    pub fn append(&mut self, other: DaemonConfig) {
        self.chardevs.extend(other.chardevs);
        self.monitors.extend(other.monitors);
        self.objects.extend(other.objects);
        self.blockdevs.extend(other.blockdevs);
        self.exports.extend(other.exports);
        if other.pidfile.is_some() {
            self.pidfile = other.pidfile;
        }
        if other.metrics.is_some() {
            self.metrics = other.metrics;
        }
    }

    /// Makes the paths the daemon creates and removes (its sockets, pipes and pid
    /// file) absolute, against the current directory: `--daemonize` moves to `/`.
    pub fn make_paths_absolute(&mut self) -> Result<()> {
        let cwd = std::env::current_dir()
            .map_err(|e| ConfigError::Usage(format!("cannot read the current directory: {e}")))?;
        let fix = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = cwd.join(&*p);
            }
        };
        self.pidfile.iter_mut().for_each(fix);
        self.exports
            .iter_mut()
            .for_each(|e| fix(&mut e.socket_path));
        for c in &mut self.chardevs {
            if let ChardevEndpoint::Path(p) | ChardevEndpoint::Pipe(p) = &mut c.endpoint {
                fix(p);
            }
        }
        if let Some(NbdAddr::Unix(p)) = self.nbd_server.as_mut().map(|n| &mut n.addr) {
            fix(p);
        }
        if let Some(NbdAddr::Unix(p)) = self.metrics.as_mut().map(|m| &mut m.addr) {
            fix(p);
        }
        Ok(())
    }

    /// Reads a `--config` TOML file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, path)
    }

    /// Parses config file text: `[[object]]`, `[[blockdev]]` and `[[export]]` tables
    /// with QEMU's JSON keys, `pidfile`, and a `[metrics]` table (`--metrics`'s keys).
    /// `path` is for messages.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self> {
        let toml_error = |message: String| ConfigError::Toml {
            path: path.to_path_buf(),
            message,
        };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            toml_error(e.message().to_string() + &toml_location(text, e.span()))
        })?;
        let mut config = DaemonConfig::default();
        for kind in [
            ItemKind::Chardev,
            ItemKind::Monitor,
            ItemKind::Object,
            ItemKind::Blockdev,
            ItemKind::Export,
        ] {
            let Some(section) = table.remove(kind.name()) else {
                continue;
            };
            for (i, item) in toml_items(kind, section)
                .map_err(toml_error)?
                .iter()
                .enumerate()
            {
                config
                    .add_item(kind, item)
                    .map_err(|source| ConfigError::Options {
                        option: format!(
                            "config file {}: [[{}]] #{}",
                            path.display(),
                            kind.name(),
                            i + 1
                        ),
                        source,
                    })?;
            }
        }
        if let Some(pidfile) = table.remove("pidfile") {
            match pidfile {
                toml::Value::String(s) => config.pidfile = Some(PathBuf::from(s)),
                _ => return Err(toml_error("'pidfile' must be a string".into())),
            }
        }
        if let Some(metrics) = table.remove("metrics") {
            if !metrics.is_table() {
                return Err(toml_error("'metrics' must be a table ([metrics])".into()));
            }
            let v = toml_to_json(metrics).map_err(toml_error)?;
            config.metrics =
                Some(
                    MetricsConfig::from_json(&v).map_err(|source| ConfigError::Options {
                        option: format!("config file {}: [metrics]", path.display()),
                        source,
                    })?,
                );
        }
        if let Some(key) = table.keys().next() {
            return Err(toml_error(format!(
                "unknown key '{key}' (expected [[chardev]], [[monitor]], [[object]], [[blockdev]], \
                 [[export]], [metrics] or pidfile)"
            )));
        }
        Ok(config)
    }

    /// Checks the configuration as a whole (nothing that needs I/O): unique node names,
    /// export ids, iothread ids and socket paths; references to nodes and iothreads
    /// that exist; iothreads not shared between exports.
    pub fn validate(&self) -> Result<()> {
        self.monitor_sockets()?;
        if self.daemonize {
            if let Some(c) = self
                .chardevs
                .iter()
                .find(|c| c.endpoint == ChardevEndpoint::Stdio)
            {
                return Err(invalid(
                    format!("--chardev stdio,id={}", c.id),
                    "cannot use stdio with -daemonize",
                ));
            }
        }
        let iothreads = self.check_objects()?;
        let nodes = self.check_blockdevs()?;
        self.check_exports(&iothreads, &nodes)?;
        self.check_metrics()
    }

    /// The metrics socket is not another socket of the daemon.
    fn check_metrics(&self) -> Result<()> {
        let Some(MetricsConfig {
            addr: NbdAddr::Unix(path),
        }) = &self.metrics
        else {
            return Ok(());
        };
        let user = if let Some(e) = self
            .exports
            .iter()
            .find(|e| e.nbd.is_none() && e.socket_path == *path)
        {
            format!("export '{}'", e.id)
        } else if let Some(c) = self
            .chardevs
            .iter()
            .find(|c| matches!(&c.endpoint, ChardevEndpoint::Path(p) if p == path))
        {
            format!("chardev '{}'", c.id)
        } else if self
            .nbd_server
            .as_ref()
            .is_some_and(|n| n.addr == NbdAddr::Unix(path.clone()))
        {
            "the NBD server".to_string()
        } else {
            return Ok(());
        };
        Err(invalid(
            "--metrics".to_string(),
            format!("socket path '{}' is already used by {user}", path.display()),
        ))
    }

    /// The monitors with their chardevs resolved; chardev ids are unique, every
    /// monitor names a chardev, and no chardev serves two monitors.
    pub fn monitor_sockets(&self) -> Result<Vec<MonitorSocketConfig>> {
        let mut chardevs: HashMap<&str, &ChardevConfig> = HashMap::new();
        for c in &self.chardevs {
            if chardevs.insert(&c.id, c).is_some() {
                return Err(invalid(
                    format!("--chardev id={}", c.id),
                    format!("attempt to add duplicate chardev '{}'", c.id),
                ));
            }
        }
        let mut used = HashSet::new();
        let mut out = Vec::new();
        for m in &self.monitors {
            let label = format!("--monitor chardev={}", m.chardev);
            let Some(c) = chardevs.get(m.chardev.as_str()) else {
                return Err(invalid(
                    label,
                    format!("chardev \"{}\" not found", m.chardev),
                ));
            };
            if !used.insert(m.chardev.as_str()) {
                return Err(invalid(
                    label,
                    format!("chardev '{}' is already used by another monitor", m.chardev),
                ));
            }
            out.push(MonitorSocketConfig {
                chardev: c.id.clone(),
                endpoint: c.endpoint.clone(),
                pretty: m.pretty,
                wait: c.wait,
            });
        }
        Ok(out)
    }

    fn check_objects(&self) -> Result<HashSet<&str>> {
        let mut ids = HashSet::new();
        for object in &self.objects {
            if !ids.insert(object.id()) {
                return Err(invalid(
                    format!("--object {},id={}", object.qom_type(), object.id()),
                    format!("duplicate object id '{}'", object.id()),
                ));
            }
        }
        Ok(ids)
    }

    /// Node names are unique (inline children included), and a referenced node was
    /// defined by an earlier blockdev.
    fn check_blockdevs(&self) -> Result<HashSet<&str>> {
        let mut nodes = HashSet::new();
        for (i, blockdev) in self.blockdevs.iter().enumerate() {
            let Some(name) = blockdev.common.node_name.as_deref() else {
                return Err(invalid(
                    format!("--blockdev #{}", i + 1),
                    "'node-name' must be specified for the root node",
                ));
            };
            let label = format!("--blockdev node-name={name}");
            for reference in blockdev.references() {
                if !nodes.contains(reference) {
                    return Err(invalid(
                        label,
                        format!(
                            "no block node named '{reference}' (a referenced node must be \
                             defined by an earlier blockdev)"
                        ),
                    ));
                }
            }
            for node in blockdev.node_names() {
                if !nodes.insert(node) {
                    return Err(invalid(
                        label,
                        format!("Duplicate nodes with node-name='{node}'"),
                    ));
                }
            }
        }
        Ok(nodes)
    }

    fn check_exports(&self, iothreads: &HashSet<&str>, nodes: &HashSet<&str>) -> Result<()> {
        let mut ids = HashSet::new();
        let mut sockets: HashMap<&Path, &str> = HashMap::new();
        let mut fds: HashMap<&str, &str> = HashMap::new();
        for export in &self.exports {
            let label = export_label(export);
            if !ids.insert(export.id.as_str()) {
                return Err(invalid(
                    label,
                    format!("Block export id '{}' is already in use", export.id),
                ));
            }
            if !nodes.contains(export.node_name.as_str()) {
                return Err(invalid(
                    label,
                    format!("no block node named '{}'", export.node_name),
                ));
            }
            if export.nbd.is_some() {
                check_export_iothreads(export, iothreads)?;
                continue;
            }
            if let Some(fd) = &export.socket_fd {
                if let Some(other) = fds.insert(fd.as_str(), &export.id) {
                    return Err(invalid(
                        label,
                        format!("file descriptor '{fd}' is already used by export '{other}'"),
                    ));
                }
            } else if let Some(other) = sockets.insert(&export.socket_path, &export.id) {
                return Err(invalid(
                    label,
                    format!(
                        "socket path '{}' is already used by export '{other}'",
                        export.socket_path.display()
                    ),
                ));
            }
            check_export_iothreads(export, iothreads)?;
        }
        Ok(())
    }
}

/// An export's iothreads exist, are listed once and are no more than its queues (an
/// iothread may serve any number of exports).
fn check_export_iothreads(export: &ExportConfig, iothreads: &HashSet<&str>) -> Result<()> {
    let label = export_label(export);
    for (i, iothread) in export.iothreads.iter().enumerate() {
        if !iothreads.contains(iothread.as_str()) {
            return Err(invalid(
                label,
                format!("iothread '{iothread}' does not exist (define it with --object iothread,id={iothread})"),
            ));
        }
        if export.iothreads[..i].contains(iothread) {
            return Err(invalid(
                label,
                format!("iothread '{iothread}' is listed more than once"),
            ));
        }
    }
    if usize::from(export.num_queues) < export.iothreads.len() {
        return Err(invalid(
            label,
            format!(
                "num-queues ({}) is smaller than the number of iothreads ({}); each iothread \
                 needs a queue",
                export.num_queues,
                export.iothreads.len()
            ),
        ));
    }
    Ok(())
}

/// The items of one `[[kind]]` array of tables, as JSON.
fn toml_items(kind: ItemKind, section: toml::Value) -> std::result::Result<Vec<Value>, String> {
    let toml::Value::Array(items) = section else {
        return Err(format!(
            "'{0}' must be an array of tables ([[{0}]])",
            kind.name()
        ));
    };
    items
        .into_iter()
        .map(|item| match item {
            toml::Value::Table(_) => toml_to_json(item),
            _ => Err(format!(
                "'{0}' must be an array of tables ([[{0}]])",
                kind.name()
            )),
        })
        .collect()
}

/// A TOML value as JSON; date-times become strings.
fn toml_to_json(v: toml::Value) -> std::result::Result<Value, String> {
    Ok(match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(x) => serde_json::Number::from_f64(x)
            .map(Value::Number)
            .ok_or_else(|| format!("{x} is not a valid number here"))?,
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(toml_to_json)
                .collect::<std::result::Result<_, _>>()?,
        ),
        toml::Value::Table(table) => Value::Object(
            table
                .into_iter()
                .map(|(k, v)| Ok((k, toml_to_json(v)?)))
                .collect::<std::result::Result<_, String>>()?,
        ),
    })
}

/// " at line L, column C" for an error span, or nothing.
fn toml_location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |p| p + 1) + 1;
    format!(" at line {line}, column {column}")
}

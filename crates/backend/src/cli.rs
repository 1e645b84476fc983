//! The command line (qemu-storage-daemon compatible) and the TOML config file.
//!
//! `--object`, `--blockdev` and `--export` take QEMU's keyval syntax or JSON, exactly as
//! qemu-storage-daemon; `--config FILE.toml` (a vubd extension) adds the items of a
//! config file before those of the command line.

use crate::config::{ConfigError, DaemonConfig, ItemKind, MetricsConfig, NbdServerConfig, Result};
use crate::keyval;
use crate::trace::TraceOptions;
use std::path::PathBuf;

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum CliAction {
    Run(Box<DaemonConfig>),
    Help,
    Version,
    /// `-T help`: list the trace events.
    TraceHelp,
}

/// One option of the command line, before its argument is parsed.
enum CliOption {
    Item(ItemKind, String),
    Pidfile(PathBuf),
    NbdServer(String),
    Metrics(String),
    Daemonize,
    /// `-T`/`--trace`: the option as written and its argument.
    Trace(String, String),
    Config(PathBuf),
    Help,
    Version,
}

/// The help text.
pub fn usage() -> &'static str {
    r#"Usage: vubd [options]
vhost-user-blk storage daemon: a drop-in replacement for
qemu-storage-daemon --export vhost-user-blk

  -h, --help                display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                            enable trace events (vubd's modules, see
                            docs/operations.md); file: where their lines go
  -V, --version             output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,<driver options>]
                            configure a block node; drivers:
                              file, host_device: filename=<path>[,aio=threads|native|io_uring]
                                                 [,locking=auto|on|off]
                              raw: file=<node-name>|file.driver=<driver>,file.<key>=...
                                   [,offset=<bytes>][,size=<bytes>]
                              null-co, null-aio: [size=<bytes>][,read-zeroes=on|off]
                                                 [,latency-ns=<ns>]

  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,
           addr.type=unix,addr.path=<socket-path>|addr.type=fd,addr.str=<fd>
           [,writable=on|off][,writethrough=on|off][,num-queues=<n>]
           [,iothread=<id>|iothread.0=<id>,iothread.1=<id>...]
           [,fixed-iothread=on|off][,logical-block-size=<bytes>]
           [,serial=<string>][,queue-size=<n>][,write-cache=on|off]
           [,werror=report|ignore|stop|enospc][,rerror=report|ignore|stop]
           [,pin-guest-memory=on|off]
                            export a block node over vhost-user-blk (serial,
                            queue-size, write-cache, werror, rerror and
                            pin-guest-memory are vubd extensions); any number of
                            exports may share an iothread
  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,description=<text>][,writable=on|off][,allocation-depth=on|off]
           [,bitmaps.0=<name>...][,iothread=<id>]
                            export a block node on the NBD server

  --nbd-server addr.type=unix,addr.path=<socket-path>[,max-connections=<n>]
               [,tls-creds=<id>]
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>[,max-connections=<n>]
               [,tls-creds=<id>]
  --nbd-server addr.type=fd,addr.str=<fd>[,max-connections=<n>][,tls-creds=<id>]
                            start the NBD server (before the NBD exports); with
                            tls-creds, clients must start TLS

  --object [qom-type=]iothread,id=<id>[,poll-max-ns=<ns>][,poll-grow=<n>]
           [,poll-shrink=<n>][,aio-max-batch=<n>]
                            create an iothread
  --object [qom-type=]secret,id=<id>(,data=<text>|,file=<path>)
           [,format=raw|base64][,keyid=<secret-id>,iv=<base64>]
                            a secret (passphrase or key) that drivers name,
                            e.g. luks's key-secret; keyid/iv: AES-256-CBC
                            encrypted with the key secret keyid holds
  --object [qom-type=]tls-creds-x509,id=<id>,dir=<dir>[,endpoint=client|server]
           [,verify-peer=on|off]
                            TLS credentials (QEMU's PEM file names in dir) for
                            the NBD server and the nbd driver's tls-creds

  --chardev socket,id=<id>,path=<socket-path>|fd=<fd>,server=on[,wait=on|off]
                            a UNIX socket for a QMP monitor (wait=on, the
                            default, waits for the first client at start-up)
  --chardev socket,id=<id>,fd=<fd>
                            one QMP session on an inherited connected socket
  --chardev stdio,id=<id>   one QMP session on standard input and output
  --chardev pipe,id=<id>,path=<path>
                            one QMP session on <path>.in and <path>.out
                            (or <path> for both)
  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                            serve QMP on the chardev (docs/qmp.md)

  --metrics addr.type=unix,addr.path=<socket-path>
  --metrics addr.type=inet,addr.host=<loopback-host>,addr.port=<port>
                            serve Prometheus metrics (text format 0.0.4) over
                            HTTP GET /metrics (vubd extension; docs/operations.md)

  --daemonize               daemonize the process, and have the parent exit
                            once startup is complete
  --pidfile <path>          write the process id to a file after startup
  --config <file.toml>      read [[object]], [[blockdev]] and [[export]] items,
                            pidfile and [metrics] from a TOML file (vubd extension);
                            its items come before those of the command line

<fd> is a file descriptor number, or the name of a socket passed by systemd
socket activation (FileDescriptorName=).
--blockdev, --export and --object also take JSON: '{"driver": "file", ...}'.
Sizes take the suffixes K, M, G, T, P and E (powers of 1024).
"#
}

/// The text for `--version`.
pub fn version_text() -> String {
    format!("vubd {}", env!("CARGO_PKG_VERSION"))
}

/// Parses the arguments after the program name (`std::env::args().skip(1)`) into the
/// daemon's configuration, which it validates.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<CliAction> {
    let mut config_files = Vec::new();
    let mut items = Vec::new();
    let mut pidfile = None;
    let mut nbd_server = None;
    let mut metrics = None;
    let mut daemonize = false;
    let mut trace = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match next_option(&arg, &mut args)? {
            CliOption::Help => return Ok(CliAction::Help),
            CliOption::Version => return Ok(CliAction::Version),
            CliOption::Config(path) => config_files.push(path),
            CliOption::Pidfile(path) => pidfile = Some(path),
            CliOption::NbdServer(arg) => nbd_server = Some(arg),
            CliOption::Metrics(arg) => metrics = Some(arg),
            CliOption::Item(kind, arg) => items.push((kind, arg)),
            CliOption::Daemonize => daemonize = true,
            CliOption::Trace(_, arg) if arg == "help" || arg == "enable=help" => {
                return Ok(CliAction::TraceHelp)
            }
            CliOption::Trace(option, arg) => {
                let options = TraceOptions::parse(&arg).map_err(|e| ConfigError::Invalid {
                    option: format!("{option} {arg}"),
                    message: e.to_string(),
                })?;
                trace.push((format!("{option} {arg}"), options));
            }
        }
    }

    let mut config = DaemonConfig::default();
    for path in config_files {
        config.append(DaemonConfig::from_toml_file(&path)?);
    }
    for (kind, arg) in items {
        add_item(&mut config, kind, &arg)?;
    }
    if pidfile.is_some() {
        config.pidfile = pidfile;
    }
    config.daemonize = daemonize;
    config.trace = trace;
    if let Some(arg) = nbd_server {
        config.nbd_server = Some(Box::new(parse_server_option(
            "nbd-server",
            &arg,
            NbdServerConfig::from_json,
        )?));
    }
    if let Some(arg) = metrics {
        config.metrics = Some(parse_server_option(
            "metrics",
            &arg,
            MetricsConfig::from_json,
        )?);
    }
    config.validate()?;
    Ok(CliAction::Run(Box::new(config)))
}

/// Parses the keyval (or JSON) argument of `--name` with `from_json`.
fn parse_server_option<T>(
    name: &str,
    arg: &str,
    from_json: fn(&serde_json::Value) -> blocklayer::options::Result<T>,
) -> Result<T> {
    let option = format!("--{name} {arg}");
    let v = keyval::parse_option(arg, None).map_err(|e| ConfigError::Invalid {
        option: option.clone(),
        message: e.to_string(),
    })?;
    from_json(&v).map_err(|source| ConfigError::Options { option, source })
}

/// Parses one `--object`/`--blockdev`/`--export` argument into `config`.
fn add_item(config: &mut DaemonConfig, kind: ItemKind, arg: &str) -> Result<()> {
    let option = format!("--{} {arg}", kind.name());
    let value =
        keyval::parse_option(arg, Some(kind.implied_key())).map_err(|e| ConfigError::Invalid {
            option: option.clone(),
            message: e.to_string(),
        })?;
    config
        .add_item(kind, &value)
        .map_err(|source| ConfigError::Options { option, source })
}

/// Recognises the option `arg`, taking its argument from `rest` if needed.
fn next_option(arg: &str, rest: &mut impl Iterator<Item = String>) -> Result<CliOption> {
    if let Some(long) = arg.strip_prefix("--") {
        let (name, value) = match long.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (long, None),
        };
        return long_option(name, value, rest);
    }
    match arg {
        "-h" => Ok(CliOption::Help),
        "-V" => Ok(CliOption::Version),
        "-T" => match rest.next() {
            Some(value) => Ok(CliOption::Trace("-T".into(), value)),
            None => Err(ConfigError::Usage(
                "option '-T' requires an argument".into(),
            )),
        },
        _ if arg.starts_with("-T") => Ok(CliOption::Trace("-T".into(), arg[2..].to_string())),
        _ if arg.starts_with('-') && arg.len() > 1 => {
            Err(ConfigError::Usage(format!("unknown option '{arg}'")))
        }
        _ => Err(ConfigError::Usage(format!("unexpected argument '{arg}'"))),
    }
}

fn long_option(
    name: &str,
    value: Option<String>,
    rest: &mut impl Iterator<Item = String>,
) -> Result<CliOption> {
    let mut argument = || {
        value
            .clone()
            .or_else(|| rest.next())
            .ok_or_else(|| ConfigError::Usage(format!("option '--{name}' requires an argument")))
    };
    let option = match name {
        "help" | "version" if value.is_some() => {
            return Err(ConfigError::Usage(format!(
                "option '--{name}' doesn't allow an argument"
            )))
        }
        "help" => CliOption::Help,
        "version" => CliOption::Version,
        "chardev" => CliOption::Item(ItemKind::Chardev, argument()?),
        "monitor" => CliOption::Item(ItemKind::Monitor, argument()?),
        "object" => CliOption::Item(ItemKind::Object, argument()?),
        "blockdev" => CliOption::Item(ItemKind::Blockdev, argument()?),
        "export" => CliOption::Item(ItemKind::Export, argument()?),
        "pidfile" => CliOption::Pidfile(PathBuf::from(argument()?)),
        "nbd-server" => CliOption::NbdServer(argument()?),
        "metrics" => CliOption::Metrics(argument()?),
        "config" => CliOption::Config(PathBuf::from(argument()?)),
        "daemonize" if value.is_some() => {
            return Err(ConfigError::Usage(format!(
                "option '--{name}' doesn't allow an argument"
            )))
        }
        "daemonize" => CliOption::Daemonize,
        "trace" => CliOption::Trace("--trace".into(), argument()?),
        _ => return Err(ConfigError::Usage(format!("unknown option '--{name}'"))),
    };
    Ok(option)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ChardevEndpoint, ExportConfig, IoThreadConfig, ObjectConfig};
    use blocklayer::drivers::{null::NullOptions, raw::RawOptions};
    use blocklayer::options::BlockdevOptions;
    use std::path::Path;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    fn run(argv: Vec<String>) -> DaemonConfig {
        match parse_args(argv.clone()) {
            Ok(CliAction::Run(config)) => *config,
            other => panic!("{argv:?}: {other:?}"),
        }
    }

    fn error(argv: Vec<String>) -> String {
        match parse_args(argv.clone()) {
            Err(e) => e.to_string(),
            Ok(action) => panic!("{argv:?}: expected an error, got {action:?}"),
        }
    }

    fn configs_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs")
    }

    const EXAMPLE: &str = "--object iothread,id=io0 --object iothread,id=io1 \
        --blockdev driver=file,node-name=file0,filename=disk.img,cache.direct=on \
        --blockdev driver=raw,node-name=disk0,file=file0 \
        --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,\
addr.path=/tmp/vubd.sock,writable=on,num-queues=4,iothread.0=io0,iothread.1=io1,\
logical-block-size=512,serial=disk0";

    #[test]
    fn example_keyval_equals_json() {
        let keyval = run(args(EXAMPLE));
        let json = run(vec![
            "--object".into(),
            r#"{"qom-type": "iothread", "id": "io0"}"#.into(),
            "--object".into(),
            r#"{"qom-type": "iothread", "id": "io1"}"#.into(),
            "--blockdev".into(),
            r#"{"driver": "file", "node-name": "file0", "filename": "disk.img",
                "cache": {"direct": true}}"#
                .into(),
            "--blockdev".into(),
            r#"{"driver": "raw", "node-name": "disk0", "file": "file0"}"#.into(),
            "--export".into(),
            r#"{"type": "vhost-user-blk", "id": "exp0", "node-name": "disk0",
                "addr": {"type": "unix", "path": "/tmp/vubd.sock"}, "writable": true,
                "num-queues": 4, "iothread": ["io0", "io1"], "logical-block-size": 512,
                "serial": "disk0"}"#
                .into(),
        ]);
        assert_eq!(keyval, json);

        let iothread = |id: &str| {
            ObjectConfig::IoThread(IoThreadConfig {
                id: id.into(),
                poll_max_ns: 32768,
                poll_grow: 0,
                poll_shrink: 0,
                aio_max_batch: 0,
            })
        };
        assert_eq!(keyval.objects, vec![iothread("io0"), iothread("io1")]);
        assert_eq!(keyval.blockdevs.len(), 2);
        assert!(keyval.blockdevs[0].common.cache_direct);
        assert!(keyval.blockdevs[1]
            .driver
            .downcast_ref::<RawOptions>()
            .is_some());
        assert_eq!(
            keyval.exports,
            vec![ExportConfig {
                id: "exp0".into(),
                node_name: "disk0".into(),
                writable: true,
                writethrough: false,
                write_cache: None,
                rerror: crate::config::OnError::Report,
                werror: crate::config::OnError::Enospc,
                socket_path: "/tmp/vubd.sock".into(),
                socket_fd: None,
                num_queues: 4,
                iothreads: vec!["io0".into(), "io1".into()],
                fixed_iothread: false,
                logical_block_size: 512,
                serial: Some("disk0".into()),
                queue_size: 1024,
                pin_guest_memory: false,
                nbd: None,
            }]
        );
        assert_eq!(keyval.pidfile, None);
    }

    #[test]
    fn equals_form_and_pidfile() {
        let config = run(vec![
            "--object=iothread,id=io0".into(),
            "--blockdev=null-co,node-name=n0".into(),
            "--export=vhost-user-blk,id=e,node-name=n0,addr.type=unix,addr.path=/s,iothread=io0"
                .into(),
            "--pidfile=/run/a.pid".into(),
            "--pidfile".into(),
            "/run/b.pid".into(),
        ]);
        assert_eq!(config.pidfile, Some(PathBuf::from("/run/b.pid")));
        assert_eq!(config.exports[0].iothreads, vec!["io0".to_string()]);
        assert_eq!(config.exports[0].num_queues, 1);
        assert!(!config.exports[0].writable);
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse_args(args("-h")).unwrap(), CliAction::Help);
        assert_eq!(parse_args(args("--help")).unwrap(), CliAction::Help);
        assert_eq!(parse_args(args("-V")).unwrap(), CliAction::Version);
        assert_eq!(parse_args(args("--version")).unwrap(), CliAction::Version);
        assert_eq!(
            parse_args(args("--blockdev null-co,node-name=x --help")).unwrap(),
            CliAction::Help
        );
        assert_eq!(
            parse_args(Vec::<String>::new()).unwrap(),
            CliAction::Run(Box::default())
        );
        for option in [
            "--blockdev",
            "--export",
            "--object",
            "--pidfile",
            "--config",
        ] {
            assert!(usage().contains(option), "{option}");
        }
    }

    #[test]
    fn nbd_server_and_export() {
        let c = run(args(
            "--blockdev null-co,node-name=n --nbd-server addr.type=inet,addr.host=127.0.0.1,\
             addr.port=10809,max-connections=2 --export nbd,id=e,node-name=n,name=disk,\
             description=d,bitmaps.0=b,allocation-depth=on",
        ));
        let server = c.nbd_server.expect("the NBD server");
        assert_eq!(
            server.addr,
            crate::config::NbdAddr::Inet {
                host: "127.0.0.1".into(),
                port: "10809".into()
            }
        );
        assert_eq!(server.max_connections, 2);
        let nbd = c.exports[0].nbd.as_ref().expect("an NBD export");
        assert_eq!(nbd.name.as_deref(), Some("disk"));
        assert_eq!(nbd.description.as_deref(), Some("d"));
        assert_eq!(nbd.bitmaps, vec![(None, "b".to_string())]);
        assert!(nbd.allocation_depth);
        let c = run(args(
            "--nbd-server addr.type=unix,addr.path=/tmp/x.sock --blockdev null-co,node-name=n \
             --export nbd,id=a,node-name=n --export nbd,id=b,node-name=n,name=b",
        ));
        assert_eq!(c.exports.len(), 2);
    }

    #[test]
    fn metrics_on_a_unix_socket_or_a_loopback_address_only() {
        use crate::config::{MetricsConfig, NbdAddr};
        let c = run(args("--metrics addr.type=unix,addr.path=/run/m.sock"));
        assert_eq!(
            c.metrics,
            Some(MetricsConfig {
                addr: NbdAddr::Unix("/run/m.sock".into())
            })
        );
        for host in ["127.0.0.1", "127.1.2.3", "::1", "localhost"] {
            let c = run(args(&format!(
                "--metrics addr.type=inet,addr.host={host},addr.port=9100"
            )));
            assert!(c.metrics.is_some(), "{host}");
        }
        for (line, expected) in [
            (
                "--metrics addr.type=inet,addr.host=0.0.0.0,addr.port=9100",
                "'0.0.0.0' is not a loopback address",
            ),
            (
                "--metrics addr.type=inet,addr.host=example.com,addr.port=9100",
                "'example.com' is not a loopback address",
            ),
            ("--metrics addr.type=unix", "addr.path"),
            (
                "--metrics addr.type=vsock,addr.cid=3",
                "'vsock' is not supported",
            ),
            ("--metrics addr.type=unix,addr.path=/m,foo=1", "foo"),
            ("--metrics", "option '--metrics' requires an argument"),
            (
                "--blockdev null-co,node-name=n --export vhost-user-blk,id=e,node-name=n,\
                 addr.type=unix,addr.path=/s --metrics addr.type=unix,addr.path=/s",
                "--metrics: socket path '/s' is already used by export 'e'",
            ),
            (
                "--chardev socket,id=c,path=/q,server=on,wait=off --monitor c \
                 --metrics addr.type=unix,addr.path=/q",
                "--metrics: socket path '/q' is already used by chardev 'c'",
            ),
        ] {
            let e = error(args(line));
            assert!(e.contains(expected), "{line}: {e}");
        }
        let parse = |text: &str| DaemonConfig::from_toml_str(text, Path::new("t.toml"));
        let c =
            parse("[metrics]\naddr = { type = \"inet\", host = \"127.0.0.1\", port = \"9100\" }\n")
                .expect("a [metrics] table");
        assert_eq!(
            c.metrics.map(|m| m.addr),
            Some(NbdAddr::Inet {
                host: "127.0.0.1".into(),
                port: "9100".into()
            })
        );
        let e = parse("metrics = 1").expect_err("not a table").to_string();
        assert!(e.contains("'metrics' must be a table"), "{e}");
        let e = parse("[metrics]\naddr = { type = \"inet\", host = \"10.0.0.1\", port = \"1\" }\n")
            .expect_err("not loopback")
            .to_string();
        assert!(
            e.contains("[metrics]") && e.contains("not a loopback"),
            "{e}"
        );
    }

    #[test]
    fn usage_errors() {
        let cases = [
            ("--foo", "unknown option '--foo'"),
            ("--foo=bar", "unknown option '--foo'"),
            ("-x", "unknown option '-x'"),
            ("disk.img", "unexpected argument 'disk.img'"),
            ("--blockdev", "option '--blockdev' requires an argument"),
            ("--help=1", "option '--help' doesn't allow an argument"),
            (
                "--config /nonexistent/vubd.toml",
                "cannot read config file /nonexistent/vubd.toml: No such file or directory \
                 (os error 2)",
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(error(args(line)), expected, "{line}");
        }
    }

    #[test]
    fn item_errors() {
        let cases = [
            (
                "--blockdev file,node-name=x",
                "--blockdev file,node-name=x: Parameter 'filename' is missing",
            ),
            (
                "--blockdev file,filename=f",
                "--blockdev file,filename=f: 'node-name' must be specified for the root node",
            ),
            (
                "--blockdev null-co,node-name=x,a=1,a=2",
                "--blockdev null-co,node-name=x,a=1,a=2: Parameter 'a' is duplicate",
            ),
            (
                "--blockdev foo,node-name=x",
                "--blockdev foo,node-name=x: Parameter 'driver' does not accept value 'foo'",
            ),
            (
                "--blockdev {\"driver\":",
                "--blockdev {\"driver\":: JSON parse error: EOF while parsing a value at line 1 \
                 column 10",
            ),
            (
                "--object iothread",
                "--object iothread: Parameter 'id' is missing",
            ),
            (
                "--object iothread,id=0io",
                "--object iothread,id=0io: Parameter 'id' expects an identifier",
            ),
            (
                "--object memory-backend-ram,id=m",
                "--object memory-backend-ram,id=m: Invalid parameter value for 'qom-type': \
                 'memory-backend-ram' is not supported (vubd has 'iothread', \
                 'throttle-group', 'secret' and 'tls-creds-x509' objects)",
            ),
            (
                "--object iothread,id=io0,poll-max-ns=x",
                "--object iothread,id=io0,poll-max-ns=x: Parameter 'poll-max-ns' expects an \
                 integer",
            ),
            (
                "--object iothread,id=io0,thread-pool-max=4",
                "--object iothread,id=io0,thread-pool-max=4: Parameter 'thread-pool-max' is \
                 unexpected",
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(error(args(line)), expected, "{line}");
        }
    }

    fn export_error(export: &str) -> String {
        let line = format!(
            "--object iothread,id=io0 --object iothread,id=io1 --blockdev null-co,node-name=n \
             --export {export}"
        );
        let message = error(args(&line));
        let prefix = format!("--export {export}: ");
        message
            .strip_prefix(&prefix)
            .unwrap_or(&message)
            .to_string()
    }

    #[test]
    fn export_errors() {
        let base = "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/s";
        let cases = [
            ("nbd,id=e", "Parameter 'node-name' is missing"),
            ("vhost-user-blk,node-name=n", "Parameter 'id' is missing"),
            (
                "vhost-user-blk,id=e,addr.type=unix,addr.path=/s",
                "Parameter 'node-name' is missing",
            ),
            (
                "vhost-user-blk,id=e,node-name=n",
                "Parameter 'addr' is missing",
            ),
            (
                "vhost-user-blk,id=e,node-name=n,addr.path=/s",
                "Parameter 'addr.type' is missing",
            ),
            (
                "vhost-user-blk,id=e,node-name=n,addr.type=unix",
                "Parameter 'addr.path' is missing",
            ),
            (
                "vhost-user-blk,id=e,node-name=n,addr.type=fd",
                "Parameter 'addr.str' is missing",
            ),
            (
                "vhost-user-blk,id=e,node-name=n,addr.type=vsock,addr.cid=3",
                "Invalid parameter value for 'addr.type': 'vsock' is not supported (vubd \
                 listens on unix sockets, or on an inherited one: fd)",
            ),
            (
                "vhost-user-blk,id=e,node-name=n,addr.type=fd,addr.str=3,addr.path=/s",
                "Parameter 'addr.path' is unexpected",
            ),
            (
                &format!("{base},addr.abstract=on"),
                "Parameter 'addr.abstract' is unexpected",
            ),
            (&format!("{base},foo=1"), "Parameter 'foo' is unexpected"),
            (
                &format!("{base},writable=2"),
                "Parameter 'writable' expects 'on' or 'off'",
            ),
            (
                &format!("{base},pin-guest-memory=yes-please"),
                "Parameter 'pin-guest-memory' expects 'on' or 'off'",
            ),
            (
                &format!("{base},num-queues=0"),
                "Invalid parameter value for 'num-queues': 0 is out of range (1 to 64)",
            ),
            (
                &format!("{base},num-queues=65"),
                "Invalid parameter value for 'num-queues': 65 is out of range (1 to 64)",
            ),
            (
                &format!("{base},logical-block-size=256"),
                "Invalid parameter value for 'logical-block-size': 256 is out of range \
                 (minimum: 512, maximum: 32768)",
            ),
            (
                &format!("{base},logical-block-size=1000"),
                "Invalid parameter value for 'logical-block-size': 1000 is not a power of 2",
            ),
            (
                &format!("{base},serial=123456789012345678901"),
                "Invalid parameter value for 'serial': '123456789012345678901' is longer than \
                 20 bytes",
            ),
            (
                &format!("{base},queue-size=1000"),
                "Invalid parameter value for 'queue-size': 1000 is not a power of 2 from 4 to \
                 32768",
            ),
            (
                &format!("{base},queue-size=65536"),
                "Invalid parameter value for 'queue-size': 65536 is not a power of 2 from 4 to \
                 32768",
            ),
            (
                &format!("{base},queue-size=1"),
                "Invalid parameter value for 'queue-size': 1 is not a power of 2 from 4 to 32768",
            ),
            (
                &format!("{base},queue-size=2"),
                "Invalid parameter value for 'queue-size': 2 is not a power of 2 from 4 to 32768",
            ),
            (
                &format!("{base},iothread.1=io0"),
                "Parameter 'iothread.0' missing",
            ),
        ];
        for (export, expected) in cases {
            assert_eq!(export_error(export), expected, "{export}");
        }
        // Accepted extremes.
        let line = format!(
            "--blockdev null-co,node-name=n --export {base},logical-block-size=32k,\
             num-queues=64,queue-size=4,serial=12345678901234567890,writethrough=on,\
             fixed-iothread=on"
        );
        let export = &run(args(&line)).exports[0];
        assert_eq!(export.logical_block_size, 32768);
        assert_eq!(export.num_queues, 64);
        assert_eq!(export.queue_size, 4);
        assert!(export.writethrough && export.fixed_iothread);
    }

    #[test]
    fn validation_errors() {
        let objects = "--object iothread,id=io0 --object iothread,id=io1";
        let file = "--blockdev file,node-name=f,filename=/img";
        let export = "--export vhost-user-blk,addr.type=unix";
        let cases = [
            (
                format!("{objects} --object iothread,id=io0"),
                "--object iothread,id=io0: duplicate object id 'io0'",
            ),
            (
                format!("{file} --blockdev null-co,node-name=f"),
                "--blockdev node-name=f: Duplicate nodes with node-name='f'",
            ),
            (
                format!("{file} --blockdev raw,node-name=d,file.driver=file,file.filename=/x,file.node-name=f"),
                "--blockdev node-name=d: Duplicate nodes with node-name='f'",
            ),
            (
                "--blockdev raw,node-name=d,file=f --blockdev file,node-name=f,filename=/img"
                    .to_string(),
                "--blockdev node-name=d: no block node named 'f' (a referenced node must be \
                 defined by an earlier blockdev)",
            ),
            (
                format!("{file} {export},id=e,addr.path=/s,node-name=g"),
                "--export id=e: no block node named 'g'",
            ),
            (
                format!("{file} {export},node-name=f,id=e,addr.path=/s {export},node-name=f,id=e,addr.path=/t"),
                "--export id=e: Block export id 'e' is already in use",
            ),
            (
                format!("{file} {export},node-name=f,id=a,addr.path=/s {export},node-name=f,id=b,addr.path=/s"),
                "--export id=b: socket path '/s' is already used by export 'a'",
            ),
            (
                format!("{objects} {file} {export},node-name=f,id=a,addr.path=/s,iothread=io2"),
                "--export id=a: iothread 'io2' does not exist (define it with --object \
                 iothread,id=io2)",
            ),
            (
                format!(
                    "{objects} {file} {export},node-name=f,id=a,addr.path=/s,iothread.0=io0,iothread.1=io0,\
                     num-queues=2"
                ),
                "--export id=a: iothread 'io0' is listed more than once",
            ),
            (
                format!("{objects} {file} {export},node-name=f,id=a,addr.path=/s,iothread.0=io0,iothread.1=io1"),
                "--export id=a: num-queues (1) is smaller than the number of iothreads (2); \
                 each iothread needs a queue",
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(error(args(&line)), expected, "{line}");
        }
    }

    #[test]
    fn every_example_config_parses() {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(configs_dir())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
            .collect();
        paths.sort();
        assert!(paths.len() >= 3, "{paths:?}");
        for path in paths {
            let argv = vec!["--config".to_string(), path.display().to_string()];
            let config = run(argv);
            assert!(!config.exports.is_empty(), "{}", path.display());
        }
    }

    #[test]
    fn default_config_matches_command_line() {
        let path = configs_dir().join("default.toml");
        let from_file = run(vec!["--config".into(), path.display().to_string()]);
        let from_line = run(args(
            "--chardev socket,id=mon0,path=/tmp/vubd-qmp.sock,server=on,wait=off \
             --monitor chardev=mon0 \
             --object iothread,id=io0 \
             --blockdev file,node-name=file0,filename=/dev/shm/vubd-demo.img \
             --blockdev raw,node-name=disk0,file=file0 \
             --export vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,\
addr.path=/tmp/vubd.sock,writable=on,iothread=io0",
        ));
        assert_eq!(from_file, from_line);
    }

    #[test]
    fn multiqueue_and_null_configs() {
        let mq = run(vec![
            "--config".into(),
            configs_dir().join("multiqueue.toml").display().to_string(),
        ]);
        assert_eq!(mq.exports[0].num_queues, 4);
        assert_eq!(
            mq.exports[0].iothreads,
            vec!["io0".to_string(), "io1".to_string()]
        );
        assert_eq!(mq.objects.len(), 2);
        let null = run(vec![
            "--config".into(),
            configs_dir().join("null.toml").display().to_string(),
        ]);
        let Some(options) = null.blockdevs[0].driver.downcast_ref::<NullOptions>() else {
            panic!("{null:?}");
        };
        assert_eq!(options.size, 1 << 30);
        assert!(options.read_zeroes);
        assert_eq!(
            null.exports[0].socket_path,
            PathBuf::from("/tmp/vubd-null.sock")
        );
    }

    #[test]
    fn config_file_comes_first() {
        // The command line refers to the file's node and iothread, and adds its own.
        let path = configs_dir().join("null.toml");
        let config = run(vec![
            "--object".into(),
            "iothread,id=extra".into(),
            "--config".into(),
            path.display().to_string(),
            "--blockdev".into(),
            "raw,node-name=top,file=null0".into(),
            "--pidfile".into(),
            "/tmp/x.pid".into(),
        ]);
        let last = config.objects.last().map(ObjectConfig::id);
        assert_eq!(last, Some("extra"));
        assert_eq!(
            config
                .blockdevs
                .last()
                .and_then(|b| b.common.node_name.clone()),
            Some("top".into())
        );
        assert_eq!(config.pidfile, Some(PathBuf::from("/tmp/x.pid")));
    }

    #[test]
    fn monitor_options() {
        let cfg = run(args(
            "--chardev socket,id=mon0,path=/tmp/m.sock,server=on,wait=off \
             --monitor chardev=mon0,pretty=on",
        ));
        let sockets = cfg.monitor_sockets().unwrap();
        assert_eq!(sockets.len(), 1);
        assert_eq!(
            sockets[0].endpoint,
            ChardevEndpoint::Path(PathBuf::from("/tmp/m.sock"))
        );
        assert!(sockets[0].pretty && !sockets[0].wait);
        let cfg = run(args(
            "--chardev socket,id=c,path=/tmp/m.sock,server=on --monitor c",
        ));
        assert!(cfg.monitor_sockets().unwrap()[0].wait);
        let toml = DaemonConfig::from_toml_str(
            "[[chardev]]\nbackend = \"socket\"\nid = \"m\"\npath = \"/tmp/m.sock\"\n\
             server = true\nwait = false\n[[monitor]]\nchardev = \"m\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(toml.monitor_sockets().unwrap()[0].chardev, "m");
        for (line, expected) in [
            ("--monitor chardev=nope", "chardev \"nope\" not found"),
            (
                "--chardev socket,id=c,path=/tmp/m.sock",
                "the monitor socket must be a listening socket (server=on)",
            ),
            ("--chardev file,id=c,path=/x", "'file' is not supported"),
            (
                "--chardev socket,id=c,fd=3,path=/x,server=on",
                "'fd=3' and 'path' are mutually exclusive",
            ),
            (
                "--daemonize --chardev stdio,id=c --monitor c",
                "--chardev stdio,id=c: cannot use stdio with -daemonize",
            ),
            (
                "--daemonize=on",
                "option '--daemonize' doesn't allow an argument",
            ),
            ("--trace foo=1", "--trace foo=1: Invalid parameter 'foo'"),
            ("-T", "option '-T' requires an argument"),
            (
                "--chardev socket,id=c,path=/tmp/m.sock,server=on --monitor c,mode=readline",
                "'readline' is not supported",
            ),
            (
                "--chardev socket,id=c,path=/a,server=on --chardev socket,id=c,path=/b,server=on",
                "attempt to add duplicate chardev 'c'",
            ),
            (
                "--chardev socket,id=c,path=/a,server=on --monitor c --monitor c",
                "already used by another monitor",
            ),
            (
                "--chardev socket,id=c,path=/a,server=on,port=5",
                "Parameter 'port' is unexpected",
            ),
        ] {
            let e = error(args(line));
            assert!(e.contains(expected), "{line}: {e}");
        }
    }

    #[test]
    fn deployment_options() {
        let cfg = run(args(
            "-T qmp_* --trace enable=-qmp_outbox,file=/tmp/t \
             --chardev socket,id=m,fd=sock0,server=on,wait=off --monitor m \
             --chardev stdio,id=s --monitor s --chardev pipe,id=p,path=/tmp/q --monitor p \
             --chardev socket,id=c,fd=5 --monitor c \
             --nbd-server addr.type=fd,addr.str=4 --blockdev null-co,node-name=n \
             --export vhost-user-blk,id=e,node-name=n,addr.type=fd,addr.str=3 \
             --export vhost-user-blk,id=f,node-name=n,addr.type=fd,addr.str=exp1",
        ));
        assert!(!cfg.daemonize);
        assert!(run(args("--daemonize")).daemonize);
        assert_eq!(parse_args(args("-T help")).unwrap(), CliAction::TraceHelp);
        assert_eq!(cfg.trace[0].0, "-T qmp_*");
        assert_eq!(cfg.trace[1].1.patterns, vec!["-qmp_outbox".to_string()]);
        let endpoints: Vec<_> = cfg
            .monitor_sockets()
            .unwrap()
            .into_iter()
            .map(|m| m.endpoint)
            .collect();
        assert_eq!(
            endpoints,
            vec![
                ChardevEndpoint::Fd("sock0".into()),
                ChardevEndpoint::Stdio,
                ChardevEndpoint::Pipe("/tmp/q".into()),
                ChardevEndpoint::FdConnected("5".into()),
            ]
        );
        assert_eq!(
            cfg.nbd_server.unwrap().addr,
            crate::config::NbdAddr::Fd("4".into())
        );
        assert_eq!(cfg.exports[0].socket_fd.as_deref(), Some("3"));
        assert_eq!(cfg.exports[1].socket_fd.as_deref(), Some("exp1"));
        assert_eq!(cfg.exports[0].socket_path, PathBuf::new());
        let e = error(args(
            "--blockdev null-co,node-name=n \
             --export vhost-user-blk,id=e,node-name=n,addr.type=fd,addr.str=3 \
             --export vhost-user-blk,id=f,node-name=n,addr.type=fd,addr.str=3",
        ));
        assert_eq!(
            e,
            "--export id=f: file descriptor '3' is already used by export 'e'"
        );
    }

    #[test]
    fn toml_errors() {
        let parse = |text: &str| DaemonConfig::from_toml_str(text, Path::new("t.toml"));
        let message = |text: &str| match parse(text) {
            Err(e) => e.to_string(),
            Ok(c) => panic!("{text}: expected an error, got {c:?}"),
        };
        assert_eq!(
            message("foo = 1"),
            "config file t.toml: unknown key 'foo' (expected [[chardev]], [[monitor]], \
             [[object]], [[blockdev]], [[export]], [metrics] or pidfile)"
        );
        assert_eq!(
            message("[blockdev]\ndriver = \"null-co\""),
            "config file t.toml: 'blockdev' must be an array of tables ([[blockdev]])"
        );
        assert_eq!(
            message("pidfile = 3"),
            "config file t.toml: 'pidfile' must be a string"
        );
        assert!(message("[[blockdev]\n").starts_with("config file t.toml: "));
        assert_eq!(
            message(
                "[[blockdev]]\ndriver = \"null-co\"\nnode-name = \"a\"\n\
                     [[blockdev]]\ndriver = \"null-co\"\nnode-name = \"b\"\nsize = -1\n"
            ),
            "config file t.toml: [[blockdev]] #2: Parameter 'size' expects a size"
        );
        assert_eq!(
            message(
                "[[export]]\ntype = \"vhost-user-blk\"\nid = \"e\"\nnode-name = \"n\"\n\
                     num-queues = -1\naddr = { type = \"unix\", path = \"/s\" }\n"
            ),
            "config file t.toml: [[export]] #1: Parameter 'num-queues' expects a \
             non-negative integer"
        );

        // Native TOML types and strings both work; items are validated when run.
        let config = parse(
            "pidfile = \"/run/v.pid\"\n\
             [[object]]\nqom-type = \"iothread\"\nid = \"io0\"\npoll-max-ns = 0\n\
             [[blockdev]]\ndriver = \"raw\"\nnode-name = \"d\"\nsize = \"1G\"\n\
             file = { driver = \"file\", filename = \"/img\", cache = { direct = true } }\n",
        )
        .unwrap();
        assert_eq!(config.pidfile, Some(PathBuf::from("/run/v.pid")));
        assert_eq!(
            config.objects,
            vec![ObjectConfig::IoThread(IoThreadConfig {
                id: "io0".into(),
                poll_max_ns: 0,
                poll_grow: 0,
                poll_shrink: 0,
                aio_max_batch: 0,
            })]
        );
        let expected = BlockdevOptions::from_json(&serde_json::json!({
            "driver": "raw", "node-name": "d", "size": 1073741824u64,
            "file": {"driver": "file", "filename": "/img", "cache": {"direct": true}}
        }))
        .unwrap();
        assert_eq!(config.blockdevs, vec![expected]);
    }
}

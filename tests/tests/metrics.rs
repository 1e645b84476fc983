//! `--metrics`: the Prometheus endpoint through real clients. Known I/O through
//! libblkio shows up exactly in the per-queue and per-export request counters, the
//! latency histograms and the node figures (which equal `query-blockstats`); known
//! I/O of qemu-io through an NBD export in that export's counters (which equal its
//! `query-blockstats` entry); scrapes taken while I/O runs are valid and never go
//! backwards; malformed, huge, slow and idle HTTP clients get an error or wait their
//! turn, and the daemon keeps serving scrapes and I/O.
//!
//! Every scrape is parsed strictly against the text exposition format 0.0.4: HELP and
//! TYPE once per family before its samples, each sample line well formed and unique,
//! histograms cumulative with `+Inf` equal to `_count`.

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use vubd_tests::{
    run_to_exit, vubd_bin, Client, Daemon, DaemonArgs, Qmp, RawClient, RawDesc, Req, TempDir, MIB,
};

const BLOCK: usize = 4096;
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

// ---- a minimal HTTP client -----------------------------------------------------

/// Where the endpoint listens.
#[derive(Clone)]
enum Addr {
    Unix(std::path::PathBuf),
    Tcp(String),
}

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn open(addr: &Addr) -> Conn {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let c = match addr {
                Addr::Unix(p) => UnixStream::connect(p).map(Conn::Unix),
                Addr::Tcp(a) => TcpStream::connect(a).map(Conn::Tcp),
            };
            match c {
                Ok(c) => {
                    c.set_timeout(Duration::from_secs(15));
                    return c;
                }
                Err(e) if Instant::now() > deadline => panic!("cannot connect to metrics: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn set_timeout(&self, t: Duration) {
        match self {
            Conn::Unix(s) => {
                s.set_read_timeout(Some(t)).unwrap();
                s.set_write_timeout(Some(t)).unwrap();
            }
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(t)).unwrap();
                s.set_write_timeout(Some(t)).unwrap();
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.write_all(bytes),
            Conn::Tcp(s) => s.write_all(bytes),
        }
    }

    /// Everything until the server closes.
    fn read_all(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let r = match self {
            Conn::Unix(s) => s.read_to_end(&mut out),
            Conn::Tcp(s) => s.read_to_end(&mut out),
        };
        r.expect("read the answer");
        out
    }
}

/// An HTTP answer: status code, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

fn parse_answer(raw: &[u8]) -> Answer {
    let text = String::from_utf8(raw.to_vec()).expect("a UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("an answer head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status: u16 = parts.next().unwrap().parse().expect("a status code");
    let headers: HashMap<String, String> = lines
        .map(|l| {
            let (k, v) = l.split_once(": ").expect("a header");
            (k.to_ascii_lowercase(), v.to_string())
        })
        .collect();
    let len: usize = headers["content-length"].parse().unwrap();
    assert_eq!(headers.get("connection").map(String::as_str), Some("close"));
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
    .with_len(len)
}

impl Answer {
    fn with_len(self, len: usize) -> Answer {
        assert_eq!(self.body.len(), len, "Content-Length");
        self
    }
}

/// Sends `request` as it is and returns the answer.
fn http(addr: &Addr, request: &[u8]) -> Answer {
    let mut c = Conn::open(addr);
    c.send(request).expect("send the request");
    parse_answer(&c.read_all())
}

/// `GET /metrics`, parsed strictly.
fn scrape(addr: &Addr) -> Scrape {
    let a = http(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n",
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.headers["content-type"], CONTENT_TYPE);
    Scrape::parse(&a.body)
}

// ---- the text format, strictly ---------------------------------------------------

type Labels = BTreeMap<String, String>;

struct Scrape {
    types: HashMap<String, String>,
    samples: HashMap<(String, Labels), f64>,
}

fn is_metric_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

fn is_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// `{a="x",b="y"}` (without the braces) into labels; panics on anything malformed.
fn parse_labels(s: &str, line: &str) -> Labels {
    let mut out = Labels::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("label: {line}"));
        assert!(is_label_name(name), "label name {name:?}: {line}");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => panic!("bad escape {other:?}: {line}"),
                },
                Some((i, '"')) => break i,
                Some((_, '\n')) => panic!("newline in a label value: {line}"),
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value: {line}"),
            }
        };
        assert!(
            out.insert(name.to_string(), value).is_none(),
            "duplicate label {name}: {line}"
        );
        rest = &after[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else {
            assert!(rest.is_empty(), "junk after a label: {line}");
        }
    }
    out
}

fn parse_value(s: &str, line: &str) -> f64 {
    match s {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => s
            .parse()
            .unwrap_or_else(|_| panic!("bad value {s:?}: {line}")),
    }
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        assert!(text.ends_with('\n'), "the text ends with a newline");
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helps: HashSet<String> = HashSet::new();
        let mut done_families: HashSet<String> = HashSet::new();
        let mut current: Option<String> = None;
        let mut samples = HashMap::new();
        // Histogram state per (family, labels without le): last bucket count, +Inf.
        let mut buckets: HashMap<(String, Labels), (f64, Option<f64>, f64)> = HashMap::new();
        let mut counts: HashMap<(String, Labels), f64> = HashMap::new();
        for line in text.lines() {
            assert!(!line.is_empty(), "an empty line");
            if let Some(rest) = line.strip_prefix("# ") {
                let (kw, rest) = rest.split_once(' ').expect("a comment keyword");
                let (name, arg) = rest.split_once(' ').unwrap_or((rest, ""));
                assert!(is_metric_name(name), "{line}");
                if current.as_deref() != Some(name) {
                    if let Some(c) = current.take() {
                        done_families.insert(c);
                    }
                    assert!(!done_families.contains(name), "family {name} split: {line}");
                    current = Some(name.to_string());
                }
                match kw {
                    "HELP" => {
                        assert!(helps.insert(name.to_string()), "second HELP: {line}");
                        assert!(!arg.is_empty(), "empty HELP: {line}");
                    }
                    "TYPE" => {
                        assert!(
                            ["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg),
                            "{line}"
                        );
                        assert!(
                            types.insert(name.to_string(), arg.to_string()).is_none(),
                            "second TYPE: {line}"
                        );
                    }
                    _ => panic!("unexpected comment: {line}"),
                }
                continue;
            }
            assert!(!line.starts_with('#'), "{line}");
            let (series, value) = line.rsplit_once(' ').expect("a value");
            let value = parse_value(value, line);
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (
                    n,
                    parse_labels(l.strip_suffix('}').expect("a closing brace"), line),
                ),
                None => (series, Labels::new()),
            };
            assert!(is_metric_name(name), "{line}");
            let family = current.clone().unwrap_or_else(|| panic!("no TYPE: {line}"));
            let kind = types
                .get(&family)
                .unwrap_or_else(|| panic!("no TYPE: {line}"));
            assert!(helps.contains(&family), "no HELP: {line}");
            if kind == "histogram" {
                let suffix = name.strip_prefix(family.as_str()).unwrap_or("?");
                let mut base = labels.clone();
                let le = base.remove("le");
                let key = (family.clone(), base);
                match suffix {
                    "_bucket" => {
                        let le = parse_value(&le.expect("le"), line);
                        let e = buckets.entry(key).or_insert((f64::NEG_INFINITY, None, 0.0));
                        assert!(le > e.0, "le not increasing: {line}");
                        assert!(value >= e.2, "buckets not cumulative: {line}");
                        *e = (le, if le.is_infinite() { Some(value) } else { e.1 }, value);
                    }
                    "_sum" => assert!(le.is_none() && value >= 0.0, "{line}"),
                    "_count" => {
                        assert!(le.is_none(), "{line}");
                        counts.insert(key, value);
                    }
                    _ => panic!("{name} is not of histogram {family}: {line}"),
                }
            } else {
                assert_eq!(name, family, "a sample outside its family: {line}");
                if kind == "counter" {
                    assert!(value >= 0.0, "negative counter: {line}");
                }
            }
            assert!(
                samples.insert((name.to_string(), labels), value).is_none(),
                "duplicate series: {line}"
            );
        }
        assert_eq!(buckets.len(), counts.len(), "every histogram has a _count");
        for (key, (_, inf, _)) in &buckets {
            assert_eq!(
                Some(counts[key]),
                *inf,
                "+Inf bucket and _count of {key:?} differ"
            );
        }
        Scrape { types, samples }
    }

    /// The sample `name{labels}`; panics if missing.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let l: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let v = *self
            .samples
            .get(&(name.to_string(), l))
            .unwrap_or_else(|| panic!("no sample {name}{labels:?}"));
        assert!(v.fract() == 0.0 && v >= 0.0, "{name}{labels:?} = {v}");
        v as u64
    }

    fn seconds(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let l: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples[&(name.to_string(), l)]
    }

    /// Every counter sample (name and labels) with its value.
    fn counters(&self) -> impl Iterator<Item = (&(String, Labels), f64)> {
        self.samples.iter().filter_map(|(k, v)| {
            let family = k.0.strip_suffix("_bucket").unwrap_or(&k.0);
            let family = family.strip_suffix("_count").unwrap_or(family);
            let t = self.types.get(family).or_else(|| self.types.get(&k.0))?;
            (t == "counter" || t == "histogram").then_some((k, *v))
        })
    }
}

// ---- the daemon -------------------------------------------------------------------

/// Kinds of requests the counters have.
const KINDS: [&str; 8] = [
    "read",
    "write",
    "flush",
    "discard",
    "write-zeroes",
    "get-id",
    "block-status",
    "other",
];

struct Setup {
    daemon: Daemon,
    dir: TempDir,
    metrics: Addr,
}

/// A writable 2-queue export `e0` of a raw node `d0` over a blkdebug node `dbg` (reads
/// of the sector at 8 MiB fail) over null-co `n0`, on iothread `io0`, with a monitor.
fn start(metrics: impl Fn(&Path) -> (String, Addr)) -> Setup {
    let dir = TempDir::new("metrics");
    let (opt, addr) = metrics(&dir.join("metrics.sock"));
    let args = DaemonArgs::new()
        .monitor(&dir.join("qmp.sock"))
        .iothread("io0")
        .blockdev("driver=null-co,node-name=n0,size=64M")
        .blockdev(
            "driver=blkdebug,node-name=dbg,image=n0,inject-error.0.event=read_aio,\
             inject-error.0.errno=5,inject-error.0.sector=16384",
        )
        // blkdebug's read_aio event comes from the format above it.
        .blockdev("driver=raw,node-name=d0,file=dbg")
        .export(&format!(
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},\
             writable=on,num-queues=2,iothread=io0",
            dir.join("e0.sock").display()
        ))
        .arg("--metrics")
        .arg(&opt)
        .build();
    let daemon = Daemon::start(&args);
    Setup {
        daemon,
        dir,
        metrics: addr,
    }
}

fn unix_metrics(p: &Path) -> (String, Addr) {
    (
        format!("addr.type=unix,addr.path={}", p.display()),
        Addr::Unix(p.to_path_buf()),
    )
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    l.local_addr().unwrap().port()
}

fn reads(n: usize, offset: u64) -> Vec<Req> {
    (0..n)
        .map(|i| Req::Read {
            offset: offset + (i * BLOCK) as u64,
            buf: i * BLOCK..(i + 1) * BLOCK,
        })
        .collect()
}

fn writes(n: usize) -> Vec<Req> {
    (0..n)
        .map(|i| Req::Write {
            offset: (i * BLOCK) as u64,
            buf: i * BLOCK..(i + 1) * BLOCK,
            flags: blkio::ReqFlags::empty(),
        })
        .collect()
}

/// The export's and its queues' request figures of `s`, as `(queue or None, kind) ->
/// (requests, bytes, errors)`.
fn request_figures(s: &Scrape) -> BTreeMap<(Option<u32>, &'static str), (u64, u64, u64)> {
    let mut out = BTreeMap::new();
    for kind in KINDS {
        let fig = |prefix: &str, labels: &[(&str, &str)]| {
            (
                s.get(&format!("{prefix}_requests_total"), labels),
                s.get(&format!("{prefix}_request_bytes_total"), labels),
                s.get(&format!("{prefix}_request_errors_total"), labels),
            )
        };
        out.insert(
            (None, kind),
            fig("vubd_export", &[("export", "e0"), ("kind", kind)]),
        );
        for q in 0..2u32 {
            let qs = q.to_string();
            out.insert(
                (Some(q), kind),
                fig(
                    "vubd_queue",
                    &[("export", "e0"), ("queue", &qs), ("kind", kind)],
                ),
            );
        }
    }
    out
}

#[test]
fn known_io_is_counted_exactly_and_nodes_match_query_blockstats() {
    let s = start(unix_metrics);
    let mut qmp = Qmp::connect(s.dir.join("qmp.sock"));
    let before = scrape(&s.metrics);
    let mut c = Client::connect(s.dir.join("e0.sock"), 2);
    let before_figures = request_figures(&before);

    // Queue 0: 37 reads of 4 KiB and a flush; queue 1: 23 writes of 4 KiB, 5 reads
    // of which one covers the failing sector (8 MiB), a discard and a write-zeroes.
    let (n_reads, n_writes) = (37, 23);
    {
        let (q0, q1) = c.queues_mut().split_at_mut(1);
        let (q0, q1) = (&mut q0[0], &mut q1[0]);
        for chunk in reads(n_reads, 0).chunks(8) {
            assert!(q0.submit(chunk).iter().all(|&r| r == 0));
        }
        assert_eq!(q0.submit(&[Req::Flush]), [0]);
        for chunk in writes(n_writes).chunks(8) {
            assert!(q1.submit(chunk).iter().all(|&r| r == 0));
        }
        let r = q1.submit(&reads(5, 8 * MIB - 3 * BLOCK as u64));
        assert_eq!(r.iter().filter(|&&r| r != 0).count(), 1, "{r:?}");
        q1.discard(MIB, 64 * 1024).expect("discard");
        q1.write_zeroes(2 * MIB, 8192, blkio::ReqFlags::empty())
            .expect("write-zeroes");
    }
    drop(c);
    // GET_ID and an unknown request type, which libblkio cannot send (queue 0).
    let mut raw = RawClient::connect(&s.dir.join("e0.sock"));
    raw.get_id().expect("GET_ID");
    assert_ne!(
        raw.request(99, 0, &RawDesc::chain(&[(0..512, true)])),
        0,
        "an unknown request type succeeded"
    );
    drop(raw);
    // A real HTTP client too.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "10", "--unix-socket"])
        .arg(s.dir.join("metrics.sock"))
        .arg("http://localhost/metrics")
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_curl = Scrape::parse(&String::from_utf8(out.stdout).unwrap());
    let after = scrape(&s.metrics);

    let b = BLOCK as u64;
    let mut expected = before_figures.clone();
    let mut add = |q: u32, kind: &'static str, n: u64, bytes: u64, errors: u64| {
        for key in [(Some(q), kind), (None, kind)] {
            let e = expected.get_mut(&key).unwrap();
            *e = (e.0 + n, e.1 + bytes, e.2 + errors);
        }
    };
    add(0, "read", n_reads as u64, n_reads as u64 * b, 0);
    add(0, "flush", 1, 0, 0);
    add(1, "write", n_writes as u64, n_writes as u64 * b, 0);
    add(1, "read", 5, 4 * b, 1);
    add(1, "discard", 1, 64 * 1024, 0);
    add(1, "write-zeroes", 1, 8192, 0);
    add(0, "get-id", 1, 20, 0);
    add(0, "other", 1, 0, 1);
    assert_eq!(request_figures(&after), expected);
    assert_eq!(request_figures(&by_curl), expected);

    // Nothing in flight; the histograms count every request.
    for (prefix, labels) in [
        ("vubd_export", vec![("export", "e0")]),
        ("vubd_queue", vec![("export", "e0"), ("queue", "0")]),
        ("vubd_queue", vec![("export", "e0"), ("queue", "1")]),
    ] {
        assert_eq!(
            after.get(&format!("{prefix}_requests_in_flight"), &labels),
            0
        );
        let requests: u64 = KINDS
            .iter()
            .map(|k| {
                let mut l = labels.clone();
                l.push(("kind", k));
                after.get(&format!("{prefix}_requests_total"), &l)
            })
            .sum();
        let count = after.get(&format!("{prefix}_request_latency_seconds_count"), &labels);
        assert_eq!(count, requests, "{prefix}{labels:?}");
    }
    assert!(after.get("vubd_iothread_wakeups_total", &[("iothread", "io0")]) > 0);
    let busy = after.seconds("vubd_iothread_busy_seconds_total", &[("iothread", "io0")]);
    let poll = after.seconds("vubd_iothread_poll_seconds_total", &[("iothread", "io0")]);
    assert!(
        busy > 0.0 && poll >= 0.0 && poll <= busy,
        "busy {busy} poll {poll}"
    );

    // The node figures are query-blockstats' (nothing runs between the two).
    let stats = qmp.ok("query-blockstats", json!({"query-nodes": true}));
    let scraped = scrape(&s.metrics);
    let mut seen = 0;
    for entry in stats.as_array().expect("a list") {
        let node = entry["node-name"].as_str().expect("a node name");
        let st = &entry["stats"];
        let f = |v: &Value| v.as_u64().expect("a count");
        for (kind, qemu) in [
            ("read", "rd"),
            ("write", "wr"),
            ("flush", "flush"),
            ("unmap", "unmap"),
        ] {
            let l = [("node", node), ("kind", kind)];
            assert_eq!(
                scraped.get("vubd_node_operations_total", &l),
                f(&st[format!("{qemu}_operations")]),
                "{node} {kind}"
            );
            assert_eq!(
                scraped.get("vubd_node_failed_operations_total", &l),
                f(&st[format!("failed_{qemu}_operations")]),
                "{node} {kind}"
            );
            assert_eq!(
                scraped.get("vubd_node_invalid_operations_total", &l),
                f(&st[format!("invalid_{qemu}_operations")]),
                "{node} {kind}"
            );
            if kind != "flush" {
                assert_eq!(
                    scraped.get("vubd_node_bytes_total", &l),
                    f(&st[format!("{qemu}_bytes")]),
                    "{node} {kind}"
                );
            }
        }
        assert_eq!(
            scraped.get("vubd_node_write_highest_offset_bytes", &[("node", node)]),
            f(&st["wr_highest_offset"])
        );
        seen += 1;
    }
    assert_eq!(seen, 3, "{stats}");
    // The export's requests are its query-blockstats operations, failed and invalid
    // ones (write-zeroes counts as a write there, discard as unmap; GET_ID and unknown
    // types are not accounted).
    let stats = qmp.ok("query-blockstats", json!({}));
    let st = &stats[0]["stats"];
    assert_eq!(stats[0]["qdev"], "e0", "{stats}");
    let accounted = |qemu: &str| {
        [
            "{}_operations",
            "failed_{}_operations",
            "invalid_{}_operations",
        ]
        .iter()
        .map(|f| st[f.replace("{}", qemu)].as_u64().expect("a count"))
        .sum::<u64>()
    };
    let requests = |kind| {
        scraped.get(
            "vubd_export_requests_total",
            &[("export", "e0"), ("kind", kind)],
        )
    };
    assert_eq!(requests("read"), accounted("rd"));
    assert_eq!(
        requests("write") + requests("write-zeroes"),
        accounted("wr")
    );
    assert_eq!(requests("flush"), accounted("flush"));
    assert_eq!(requests("discard"), accounted("unmap"));
    let bytes = |kind| {
        scraped.get(
            "vubd_export_request_bytes_total",
            &[("export", "e0"), ("kind", kind)],
        )
    };
    assert_eq!(bytes("read"), st["rd_bytes"].as_u64().unwrap());
    assert_eq!(
        bytes("write") + bytes("write-zeroes"),
        st["wr_bytes"].as_u64().unwrap()
    );

    // And they saw the I/O: n0 below the failing filter got the reads that passed.
    let l = [("node", "n0"), ("kind", "read")];
    assert_eq!(
        scraped.get("vubd_node_operations_total", &l),
        n_reads as u64 + 4
    );
    assert_eq!(
        scraped.get(
            "vubd_node_failed_operations_total",
            &[("node", "dbg"), ("kind", "read")]
        ),
        1
    );
}

/// A queue's counters are kept in per-thread shards, written by the iothread that serves
/// the queue; when the export moves to another iothread, another shard counts on. No
/// count may be lost or counted twice: a frontend reads and writes on both queues while
/// the export moves back and forth, and the counters equal what it did.
#[test]
fn counts_stay_exact_while_the_export_moves_between_iothreads() {
    let dir = TempDir::new("metrics-move");
    let (opt, metrics) = unix_metrics(&dir.join("metrics.sock"));
    let sock = dir.join("e0.sock");
    let args = DaemonArgs::new()
        .monitor(&dir.join("qmp.sock"))
        .iothread("io0")
        .iothread("io1")
        .blockdev("driver=null-co,node-name=d0,size=64M")
        .export(&format!(
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},\
             writable=on,num-queues=2,iothread=io0",
            sock.display()
        ))
        .arg("--metrics")
        .arg(&opt)
        .build();
    let _daemon = Daemon::start(&args);
    let mut qmp = Qmp::connect(dir.join("qmp.sock"));
    let before = request_figures(&scrape(&metrics));

    let stop = std::sync::atomic::AtomicBool::new(false);
    // Per queue: (reads, writes) done.
    let done = std::thread::scope(|s| {
        let io = s.spawn(|| {
            let mut c = Client::connect(&sock, 2);
            let mut done = [(0u64, 0u64); 2];
            let mut round = 0usize;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let q = round % 2;
                let queue = &mut c.queues_mut()[q];
                let r = queue.submit(&reads(16, (round % 64) as u64 * MIB));
                assert!(r.iter().all(|&r| r == 0), "reads: {r:?}");
                let w = queue.submit(&writes(8));
                assert!(w.iter().all(|&r| r == 0), "writes: {w:?}");
                done[q].0 += r.len() as u64;
                done[q].1 += w.len() as u64;
                round += 1;
            }
            done
        });
        for i in 0..12 {
            std::thread::sleep(Duration::from_millis(40));
            let to = if i % 2 == 0 { "io1" } else { "io0" };
            qmp.ok(
                "x-blockdev-set-iothread",
                json!({"node-name": "d0", "iothread": to, "force": true}),
            );
        }
        std::thread::sleep(Duration::from_millis(40));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        io.join().expect("the frontend's thread failed")
    });
    let scraped = scrape(&metrics);
    // Both iothreads served the rings.
    for io in ["io0", "io1"] {
        assert!(
            scraped.get("vubd_iothread_wakeups_total", &[("iothread", io)]) > 0,
            "{io} never woke"
        );
    }
    let after = request_figures(&scraped);
    let b = BLOCK as u64;
    let (mut total_reads, mut total_writes) = (0, 0);
    for (q, &(reads, writes)) in done.iter().enumerate() {
        assert!(reads > 0 && writes > 0, "queue {q} did no I/O: {done:?}");
        let key = |kind| (Some(q as u32), kind);
        let delta = |kind| {
            let (a, z) = (after[&key(kind)], before[&key(kind)]);
            (a.0 - z.0, a.1 - z.1, a.2 - z.2)
        };
        assert_eq!(delta("read"), (reads, reads * b, 0), "queue {q} reads");
        assert_eq!(delta("write"), (writes, writes * b, 0), "queue {q} writes");
        total_reads += reads;
        total_writes += writes;
    }
    let export = |kind| after[&(None, kind)].0 - before[&(None, kind)].0;
    assert_eq!(export("read"), total_reads);
    assert_eq!(export("write"), total_writes);
}

#[test]
fn scrapes_while_io_runs_are_valid_and_never_go_backwards() {
    let s = start(unix_metrics);
    let sock = s.dir.join("e0.sock");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (done, scrapes) = std::thread::scope(|sc| {
        let io = sc.spawn(|| {
            let mut c = Client::connect(&sock, 2);
            let mut done = 0u64;
            let (q0, q1) = c.queues_mut().split_at_mut(1);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert!(q0[0].submit(&reads(8, 0)).iter().all(|&r| r == 0));
                assert!(q1[0].submit(&writes(8)).iter().all(|&r| r == 0));
                done += 16;
            }
            done
        });
        let mut last: Option<Scrape> = None;
        let mut n = 0;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            let now = scrape(&s.metrics);
            if let Some(prev) = &last {
                for (key, v) in prev.counters() {
                    let later = now.samples.get(key).copied().unwrap_or(-1.0);
                    assert!(later >= v, "{key:?} went from {v} to {later}");
                }
            }
            last = Some(now);
            n += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (io.join().expect("the I/O thread"), n)
    });
    assert!(scrapes >= 5, "only {scrapes} scrapes in 2 s");
    let after = scrape(&s.metrics);
    let l = |kind| [("export", "e0"), ("kind", kind)];
    let total = after.get("vubd_export_requests_total", &l("read"))
        + after.get("vubd_export_requests_total", &l("write"));
    assert_eq!(total, done, "requests counted against requests done");
    assert_eq!(
        after.get("vubd_export_request_bytes_total", &l("write")),
        done / 2 * BLOCK as u64
    );
    assert!(done > 100, "only {done} requests ran while scraping");
}

#[test]
fn hostile_http_clients_get_errors_and_the_daemon_keeps_serving() {
    let port = free_port();
    let s = start(|_| {
        (
            format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
            Addr::Tcp(format!("127.0.0.1:{port}")),
        )
    });
    let m = &s.metrics;
    let _ = scrape(m);

    // Four clients that connect and say nothing take every slot; a scrape waits for
    // one (bounded by the request timeout of 5 s), and they get 408.
    let idle: Vec<Conn> = (0..4).map(|_| Conn::open(m)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let _ = scrape(m);
    let waited = t.elapsed();
    assert!(
        waited > Duration::from_secs(3) && waited < Duration::from_secs(12),
        "a scrape behind four idle clients took {waited:?}"
    );
    for mut c in idle {
        let a = parse_answer(&c.read_all());
        assert_eq!(a.status, 408, "{}", a.body);
    }

    // A request head larger than 8 KiB, and one without its end.
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    while huge.len() < 20_000 {
        huge.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    assert_eq!(http(m, &huge).status, 431);
    let mut huge_line = b"GET /".to_vec();
    // Past the 8 KiB the server reads, within the 64 KiB it drains before closing
    // (more would reset the connection before the answer is read).
    huge_line.resize(50_000, b'a');
    let mut c = Conn::open(m);
    c.send(&huge_line).unwrap();
    assert_eq!(parse_answer(&c.read_all()).status, 431);

    for (request, status) in [
        (&b"\x00\x01\x02\r\n\r\n"[..], 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nno-colon\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
        (
            b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            405,
        ),
        (b"GET /other HTTP/1.1\r\n\r\n", 404),
    ] {
        let a = http(m, request);
        assert_eq!(
            a.status,
            status,
            "{:?}: {}",
            String::from_utf8_lossy(request),
            a.body
        );
    }
    // HEAD: the headers of a scrape, no body.
    let mut c = Conn::open(m);
    c.send(b"HEAD /metrics HTTP/1.0\r\n\r\n").unwrap();
    let raw = String::from_utf8(c.read_all()).unwrap();
    assert!(
        raw.starts_with("HTTP/1.1 200 OK\r\n") && raw.ends_with("\r\n\r\n"),
        "{raw}"
    );
    // Many clients that connect and leave at once.
    for _ in 0..100 {
        drop(Conn::open(m));
    }
    // Byte by byte, slowly but within the timeout.
    let mut c = Conn::open(m);
    for b in b"GET /metrics HTTP/1.1\r\n\r\n" {
        c.send(&[*b]).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let a = parse_answer(&c.read_all());
    assert_eq!(a.status, 200);
    Scrape::parse(&a.body);

    // The daemon still serves scrapes and I/O.
    let mut client = Client::connect(s.dir.join("e0.sock"), 1);
    assert_eq!(client.q().submit(&reads(4, 0)), [0; 4]);
    let after = scrape(m);
    assert_eq!(
        after.get(
            "vubd_export_requests_total",
            &[("export", "e0"), ("kind", "read")]
        ),
        4
    );
    let mut daemon = s.daemon;
    daemon.assert_running("after hostile HTTP clients");
}

#[test]
fn a_metrics_address_in_use_is_a_configuration_error() {
    let port = free_port();
    let s = start(unix_metrics);
    let tcp = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind a port");
    let sock = s.dir.join("metrics.sock");
    for (opt, mentions) in [
        (
            format!("addr.type=unix,addr.path={}", sock.display()),
            vec!["--metrics", "in use by another process"],
        ),
        (
            format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
            vec!["--metrics", "Failed to bind socket"],
        ),
        (
            format!("addr.type=inet,addr.host=192.0.2.1,addr.port={port}"),
            vec!["--metrics", "not a loopback address"],
        ),
    ] {
        let args = ["--blockdev", "null-co,node-name=n", "--metrics", &opt];
        run_to_exit(&vubd_bin(), &args, Duration::from_secs(20)).assert_config_error(&mentions);
    }
    drop(tcp);
    // The first daemon keeps its socket.
    let _ = scrape(&s.metrics);
}

/// `qemu-io -f raw CMDS URL`; whether it succeeded (a command that fails makes it
/// exit non-zero).
fn qemu_io_nbd(url: &str, read_only: bool, cmds: &[&str]) -> bool {
    let mut c = std::process::Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if read_only {
        c.arg("-r");
    }
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(url).output().expect("run qemu-io");
    out.status.success()
}

#[test]
fn nbd_export_requests_are_counted_exactly_and_match_query_blockstats() {
    let dir = TempDir::new("metrics-nbd");
    let nbd = dir.join("nbd.sock");
    let (opt, metrics) = unix_metrics(&dir.join("metrics.sock"));
    let args = DaemonArgs::new()
        .monitor(&dir.join("qmp.sock"))
        .iothread("io0")
        .blockdev("driver=null-co,node-name=n0,size=64M,read-zeroes=on")
        .blockdev(
            "driver=blkdebug,node-name=dbg,image=n0,inject-error.0.event=read_aio,\
             inject-error.0.errno=5,inject-error.0.sector=16384",
        )
        .blockdev("driver=raw,node-name=d0,file=dbg")
        .arg("--nbd-server")
        .arg(&format!("addr.type=unix,addr.path={}", nbd.display()))
        .export("type=nbd,id=nb,node-name=d0,name=nb,writable=on,iothread=io0")
        .arg("--metrics")
        .arg(&opt)
        .build();
    let _daemon = Daemon::start(&args);
    let mut qmp = Qmp::connect(dir.join("qmp.sock"));
    let url = format!("nbd+unix:///nb?socket={}", nbd.display());
    let figures = |s: &Scrape, kind: &str| {
        let l = [("export", "nb"), ("kind", kind)];
        (
            s.get("vubd_export_requests_total", &l),
            s.get("vubd_export_request_bytes_total", &l),
            s.get("vubd_export_request_errors_total", &l),
        )
    };
    let before = scrape(&metrics);
    for kind in KINDS {
        assert_eq!(figures(&before, kind), (0, 0, 0), "{kind}");
    }

    // Connection 1: a write, a write-zeroes, a discard, a read, two flushes (one asked
    // for, one when qemu-io closes the writable image).
    assert!(qemu_io_nbd(
        &url,
        false,
        &[
            "write -P 0x11 0 1M",
            "write -z 2M 128k",
            "discard 1M 64k",
            "read 0 64k",
            "flush",
        ]
    ));
    // Connection 2: 3 reads, of which the one of the sector at 8 MiB fails.
    assert!(!qemu_io_nbd(
        &url,
        true,
        &["read 4M 4k", "read 5M 8k", "read 8M 4k"]
    ));
    // Connection 3: block status (qemu-io's map asks the export for extents).
    assert!(qemu_io_nbd(&url, true, &["map"]));

    let after = scrape(&metrics);
    let k = 1024;
    assert_eq!(figures(&after, "read"), (4, 64 * k + 12 * k, 1));
    assert_eq!(figures(&after, "write"), (1, MIB, 0));
    assert_eq!(figures(&after, "write-zeroes"), (1, 128 * k, 0));
    assert_eq!(figures(&after, "discard"), (1, 64 * k, 0));
    assert_eq!(figures(&after, "flush"), (2, 0, 0));
    let (status, status_bytes, status_errors) = figures(&after, "block-status");
    assert!(
        status >= 1 && status_bytes == 0 && status_errors == 0,
        "block status {:?}",
        figures(&after, "block-status")
    );
    for kind in ["get-id", "other"] {
        assert_eq!(figures(&after, kind), (0, 0, 0), "{kind}");
    }
    let l = [("export", "nb")];
    assert_eq!(after.get("vubd_export_requests_in_flight", &l), 0);
    let requests: u64 = KINDS.iter().map(|k| figures(&after, k).0).sum();
    assert_eq!(
        after.get("vubd_export_request_latency_seconds_count", &l),
        requests
    );
    // An NBD export's counters are the export's only: no series per queue.
    assert!(
        !after
            .samples
            .keys()
            .any(|(name, labels)| name.starts_with("vubd_queue_")
                && labels.get("export").map(String::as_str) == Some("nb")),
        "queue series for an NBD export"
    );

    // The export's query-blockstats entry counts the same requests (write-zeroes as
    // writes, discards as unmaps; block status is not a blockstats kind).
    let stats = qmp.ok("query-blockstats", json!({}));
    assert_eq!(stats[0]["qdev"], "nb", "{stats}");
    let st = &stats[0]["stats"];
    let f = |field: &str| {
        st[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field}: {st}"))
    };
    let sum = |qemu: &str| {
        f(&format!("{qemu}_operations"))
            + f(&format!("failed_{qemu}_operations"))
            + f(&format!("invalid_{qemu}_operations"))
    };
    let scraped = scrape(&metrics);
    let n = |kind| figures(&scraped, kind).0;
    let b = |kind| figures(&scraped, kind).1;
    assert_eq!(n("read"), sum("rd"));
    assert_eq!(n("write") + n("write-zeroes"), sum("wr"));
    assert_eq!(n("flush"), sum("flush"));
    assert_eq!(n("discard"), sum("unmap"));
    assert_eq!(b("read"), f("rd_bytes"));
    assert_eq!(b("write") + b("write-zeroes"), f("wr_bytes"));
    assert_eq!(b("discard"), f("unmap_bytes"));
    assert_eq!(f("failed_rd_operations"), 1);
    assert_eq!(f("wr_highest_offset"), 2 * MIB + 128 * k);
}

/// `pin-guest-memory=on`: the frontend's memory is registered with the iothread's
/// io_uring while it is connected, and `O_DIRECT` reads and writes (one segment or
/// several) go through it with their data intact; an export without the option on the
/// same iothread does not use it, and the registration goes with the connection.
#[test]
fn pinned_guest_memory_carries_direct_io_and_goes_with_the_connection() {
    let dir = TempDir::new("metrics-pin");
    // O_DIRECT needs a file system with it: /tmp, not tmpfs.
    let disk = TempDir::new_in(&std::env::temp_dir(), "metrics-pin-img");
    let size = 32 * MIB;
    let (img, other) = (
        vubd_tests::TempImage::new_in(disk.path(), size),
        vubd_tests::TempImage::new_in(disk.path(), size),
    );
    let (opt, addr) = unix_metrics(&dir.join("metrics.sock"));
    let (pinned_sock, plain_sock) = (dir.join("e0.sock"), dir.join("e1.sock"));
    let args = DaemonArgs::new()
        .iothread("io0")
        .file_raw_path("d0", img.path(), ",cache.direct=on", "")
        .file_raw_path("d1", other.path(), ",cache.direct=on", "")
        .vhost_user_blk(
            "d0",
            &pinned_sock,
            ",writable=on,num-queues=2,iothread=io0,pin-guest-memory=on",
        )
        .vhost_user_blk("d1", &plain_sock, ",writable=on,num-queues=1,iothread=io0")
        .arg("--metrics")
        .arg(&opt)
        .build();
    let mut daemon = Daemon::start(&args);
    let figures = |s: &Scrape| {
        (
            s.get(
                "vubd_iothread_fixed_buffer_operations_total",
                &[("iothread", "io0")],
            ),
            s.get("vubd_iothread_pinned_bytes", &[("iothread", "io0")]),
        )
    };
    assert_eq!(
        figures(&scrape(&addr)),
        (0, 0),
        "nothing pinned before a frontend"
    );

    let mut c = Client::connect(&pinned_sock, 2);
    // A helper thread pins the client's memory, then the iothread takes it over:
    // requests before that pin their pages themselves.
    let region = c.mem_region().len as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while figures(&scrape(&addr)).1 < region {
        assert!(
            Instant::now() < deadline,
            "the client's {region} bytes not pinned after 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut rng = vubd_tests::Rng::new("pinned guest memory");
    let mut shadow = vec![0u8; size as usize];
    let mut single = 0u64;
    // Writes of 4k to 1M on both queues, one segment or four (page-aligned, apart).
    for round in 0..24usize {
        let q = round % 2;
        let len = 4096usize << rng.range(0, 9);
        let offset = (rng.range(0, (size as usize - len) as u64 / 4096) * 4096) as usize;
        let data = rng.bytes(len);
        let ioq = c.queue(q);
        let req = if round % 3 == 2 && len >= 16384 {
            let part = len / 4;
            let segs: Vec<_> = (0..4)
                .map(|i| i * (part + 4096)..i * (part + 4096) + part)
                .collect();
            for (i, r) in segs.iter().enumerate() {
                ioq.buf()[r.clone()].copy_from_slice(&data[i * part..(i + 1) * part]);
            }
            Req::Writev {
                offset: offset as u64,
                segs,
                flags: blkio::ReqFlags::empty(),
            }
        } else {
            ioq.buf()[..len].copy_from_slice(&data);
            single += 1;
            Req::Write {
                offset: offset as u64,
                buf: 0..len,
                flags: blkio::ReqFlags::empty(),
            }
        };
        assert_eq!(ioq.submit(&[req]), vec![0], "write {round}");
        shadow[offset..offset + len].copy_from_slice(&data);
    }
    // Read everything back in 1 MiB requests, then in scattered 64 KiB pieces.
    for (i, chunk) in shadow.chunks(MIB as usize).enumerate() {
        let ioq = c.queue(i % 2);
        let off = (i as u64) * MIB;
        assert_eq!(
            ioq.submit(&[Req::Read {
                offset: off,
                buf: 0..chunk.len(),
            }]),
            vec![0]
        );
        single += 1;
        assert!(ioq.buf()[..chunk.len()] == *chunk, "read back at {off}");
    }
    let ioq = c.queue(1);
    let segs: Vec<_> = (0..4).map(|i| i * 20480..i * 20480 + 16384).collect();
    assert_eq!(
        ioq.submit(&[Req::Readv {
            offset: 8 * MIB,
            segs: segs.clone()
        }]),
        vec![0]
    );
    for (i, r) in segs.iter().enumerate() {
        let at = 8 * MIB as usize + i * 16384;
        assert!(
            ioq.buf()[r.clone()] == shadow[at..at + 16384],
            "scattered read {i}"
        );
    }
    assert!(img.read_all() == shadow, "the image file holds other data");
    // The iothread publishes its figures when its wake-up ends, after its polling
    // window: once the client is idle they stay put.
    let (ops, pinned) = settled(&|| figures(&scrape(&addr)));
    assert!(
        ops >= single,
        "{ops} fixed-buffer operations for {single} one-segment requests"
    );
    assert!(
        pinned >= region,
        "{pinned} bytes pinned, the client's buffers alone are {region}"
    );

    // The export without the option, on the same iothread, pins nothing.
    let mut plain = Client::connect(&plain_sock, 1);
    let data = rng.bytes(256 << 10);
    plain.q().write(0, &data).unwrap();
    assert!(plain.q().read(0, data.len()).unwrap() == data);
    assert_eq!(
        settled(&|| figures(&scrape(&addr))),
        (ops, pinned),
        "the plain export used fixed buffers"
    );

    // Gone with the connection.
    c.disconnect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, now) = figures(&scrape(&addr));
        if now == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{now} bytes still pinned after the disconnect"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    plain.q().write(4096, &data[..4096]).unwrap();
    daemon.assert_running("after the pinned frontend left");
}

/// Pinning a frontend's memory (`pin-guest-memory=on`) takes time in proportion to its
/// size; it happens on a helper thread, so the other exports of the iothread keep
/// being served meanwhile: the longest wait of a request to a neighbour export while a
/// 2 GiB frontend is pinned stays well under the time the pinning takes (registering
/// on the iothread itself held every request of the neighbour for all of it).
#[test]
fn pinning_a_large_frontend_does_not_hold_up_its_iothread() {
    // The daemon may pin 2 GiB: half the host's memory at most, and without
    // CAP_IPC_LOCK no more than RLIMIT_MEMLOCK (tests run as root here).
    // SAFETY: geteuid has no preconditions.
    if mem_total_kib() < 8 << 20 || unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root and 8 GiB of memory to pin 2 GiB");
        return;
    }
    let dir = TempDir::new("metrics-pin-stall");
    // O_DIRECT needs a file system with it: /tmp, not tmpfs.
    let disk = TempDir::new_in(&std::env::temp_dir(), "metrics-pin-stall-img");
    let img = vubd_tests::TempImage::new_in(disk.path(), 16 * MIB);
    let (opt, addr) = unix_metrics(&dir.join("metrics.sock"));
    let (big_sock, busy_sock) = (dir.join("big.sock"), dir.join("busy.sock"));
    let args = DaemonArgs::new()
        .iothread("io0")
        .file_raw_path("n0", img.path(), ",cache.direct=on", "")
        .blockdev("driver=null-co,node-name=n1,size=1073741824")
        .vhost_user_blk(
            "n0",
            &big_sock,
            ",writable=on,iothread=io0,pin-guest-memory=on",
        )
        .vhost_user_blk("n1", &busy_sock, ",writable=on,iothread=io0")
        .arg("--metrics")
        .arg(&opt)
        .build();
    let mut daemon = Daemon::start(&args);
    let pinned = |s: &Scrape| s.get("vubd_iothread_pinned_bytes", &[("iothread", "io0")]);

    let busy = Neighbour::start(&busy_sock);

    let size = 2048 * MIB as usize;
    let t0 = Instant::now();
    let mut big = large_frontend(&big_sock, size);
    let deadline = Instant::now() + Duration::from_secs(60);
    while pinned(&scrape(&addr)) < size as u64 {
        assert!(Instant::now() < deadline, "2 GiB not pinned after 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = t0.elapsed();
    let worst = busy
        .finish()
        .into_iter()
        .filter(|&(t, _)| t >= t0)
        .map(|(_, d)| d)
        .max()
        .expect("the neighbour made requests meanwhile");
    eprintln!("pinning 2 GiB took {took:?}; the neighbour's longest wait meanwhile: {worst:?}");
    assert!(
        worst * 2 < took,
        "a request to the neighbour export waited {worst:?} while the pinning took {took:?}"
    );
    // The buffers the iothread took over carry direct I/O, at the far end of the
    // region too (its second buffer: the kernel's buffers are 1 GiB at most).
    let ops = |s: &Scrape| {
        s.get(
            "vubd_iothread_fixed_buffer_operations_total",
            &[("iothread", "io0")],
        )
    };
    let before = ops(&scrape(&addr));
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let ioq = big.queue(0);
    let end = size - 65536;
    ioq.buf()[end..].copy_from_slice(&data);
    let w = Req::Write {
        offset: 0,
        buf: end..size,
        flags: blkio::ReqFlags::empty(),
    };
    assert_eq!(ioq.submit(&[w]), vec![0]);
    ioq.buf()[..65536].fill(0);
    assert_eq!(
        ioq.submit(&[Req::Read {
            offset: 0,
            buf: 0..65536
        }]),
        vec![0]
    );
    assert!(
        ioq.buf()[..65536] == data[..],
        "read back through the first buffer"
    );
    // The iothread publishes its figures when its wake-up ends (after its polling
    // window), which may come after the scrape that follows the last reply.
    let deadline = Instant::now() + Duration::from_secs(5);
    while ops(&scrape(&addr)) < before + 2 {
        assert!(
            Instant::now() < deadline,
            "the adopted buffers were not used"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The frontend leaves; freeing its memory does not hold up the neighbour.
    let stall = leaving_stall(&mut daemon, &dir.join("busy.sock"), big);
    eprintln!("with pin-guest-memory=on: {stall}");
    stall.check();
}

/// A frontend with `size` bytes of memory (one queue's buffer).
fn large_frontend(sock: &Path, size: usize) -> Client {
    Client::connect_with(
        sock,
        &vubd_tests::ClientOptions {
            buf_per_queue: size,
            ..Default::default()
        },
    )
    .expect("connect the large frontend")
}

/// A client of a neighbour export: 4k reads one at a time, each one's start and wait
/// kept.
struct Neighbour {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    rx: std::sync::mpsc::Receiver<(Instant, Duration)>,
    thread: std::thread::JoinHandle<()>,
}

impl Neighbour {
    /// Starts reading on `sock`; returns once the first read is served.
    fn start(sock: &Path) -> Neighbour {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<(Instant, Duration)>();
        let thread = {
            let (stop, sock) = (stop.clone(), sock.to_path_buf());
            std::thread::spawn(move || {
                let mut c = Client::connect(&sock, 1);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = Instant::now();
                    c.q().read(0, 4096).unwrap();
                    let _ = tx.send((t, t.elapsed()));
                }
            })
        };
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the busy export serves");
        Neighbour { stop, rx, thread }
    }

    /// Stops reading: each read's start and wait since the first.
    fn finish(self) -> Vec<(Instant, Duration)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap();
        self.rx.try_iter().collect()
    }
}

/// What a neighbour export of the same iothread went through while a large frontend
/// left: how long the daemon took to let go of its memory, and the neighbour's longest
/// wait meanwhile.
struct LeavingStall {
    gone: Duration,
    worst: Duration,
}

impl std::fmt::Display for LeavingStall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the daemon let go of the frontend's memory in {:?}; the neighbour's longest \
             wait meanwhile: {:?}",
            self.gone, self.worst
        )
    }
}

impl LeavingStall {
    /// The neighbour waited for under half of it (when it takes long enough to tell:
    /// 100 ms, where the neighbour's own longest waits under a loaded machine are tens
    /// of milliseconds).
    fn check(&self) {
        if self.gone < Duration::from_millis(100) {
            eprintln!("released too fast to tell ({:?}): not checked", self.gone);
            return;
        }
        assert!(
            self.worst * 2 < self.gone,
            "a request to the neighbour export waited {:?} while the daemon let go of the \
             frontend's memory in {:?}",
            self.worst,
            self.gone
        );
    }
}

/// A figure once two reads 20 ms apart agree (an iothread publishes its figures when
/// its wake-up ends, which may come after the reply a client has seen).
fn settled<T: PartialEq>(read: &dyn Fn() -> T) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = read();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = read();
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// The machine's memory, in KiB.
fn mem_total_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
            l.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// The daemon's resident shared memory (its mappings of frontends' files), in bytes.
fn rss_shmem(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("RssShmem:"))?.to_string();
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib << 10)
}

/// Serves 4k reads one at a time on `busy_sock` while `big` (a frontend whose memory
/// the daemon has mapped and touched) disconnects and exits, until the daemon's
/// resident shared memory is under 256 MiB.
fn leaving_stall(daemon: &mut Daemon, busy_sock: &Path, big: Client) -> LeavingStall {
    let busy = Neighbour::start(busy_sock);
    assert!(
        rss_shmem(daemon.pid()) > 1024 * MIB,
        "the daemon has the frontend's memory mapped"
    );
    let t0 = Instant::now();
    drop(big);
    let deadline = t0 + Duration::from_secs(60);
    while rss_shmem(daemon.pid()) > 256 * MIB {
        assert!(Instant::now() < deadline, "memory not let go after 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    let gone = t0.elapsed();
    // The neighbour's request that straddles the end is counted too.
    std::thread::sleep(Duration::from_millis(50));
    let worst = busy
        .finish()
        .into_iter()
        .filter(|&(t, d)| t + d >= t0)
        .map(|(_, d)| d)
        .max()
        .expect("the neighbour made requests meanwhile");
    daemon.assert_running("after the large frontend left");
    LeavingStall { gone, worst }
}

/// A frontend that exits leaves its memory to the daemon's mapping alone, and
/// unmapping it then frees every page (about 0.8 s for 2 GiB on a loaded machine
/// here). That happens on a helper thread, not on the iothread that served the last
/// request into it, so the other exports of that iothread are served meanwhile.
#[test]
fn a_large_frontend_leaving_does_not_hold_up_its_iothread() {
    if mem_total_kib() < 8 << 20 {
        eprintln!("skipped: needs 8 GiB of memory for a 2 GiB frontend");
        return;
    }
    let dir = TempDir::new("metrics-leave-stall");
    let (big_sock, busy_sock) = (dir.join("big.sock"), dir.join("busy.sock"));
    let args = DaemonArgs::new()
        .iothread("io0")
        .blockdev("driver=null-co,node-name=n0,size=1073741824,read-zeroes=on")
        .blockdev("driver=null-co,node-name=n1,size=1073741824")
        .vhost_user_blk("n0", &big_sock, ",writable=on,iothread=io0")
        .vhost_user_blk("n1", &busy_sock, ",writable=on,iothread=io0")
        .build();
    let mut daemon = Daemon::start(&args);
    let size = 2048 * MIB as usize;
    let mut big = large_frontend(&big_sock, size);
    // Every page of the frontend's memory allocated, and a request into it served
    // (the iothread's last table holds it).
    let ioq = big.queue(0);
    ioq.buf().fill(1);
    let w = Req::Write {
        offset: 0,
        buf: size - 4096..size,
        flags: blkio::ReqFlags::empty(),
    };
    assert_eq!(ioq.submit(&[w]), vec![0]);
    // The daemon's mapping has the pages once it touches them: reads of zeroes into
    // all of it.
    for at in (0..size).step_by(1 << 20) {
        let r = Req::Read {
            offset: 0,
            buf: at..at + (1 << 20),
        };
        assert_eq!(ioq.submit(&[r]), vec![0]);
    }
    let stall = leaving_stall(&mut daemon, &busy_sock, big);
    eprintln!("{stall}");
    stall.check();
}

/// A frontend whose memory is over what the daemon may pin (`RLIMIT_MEMLOCK` without
/// `CAP_IPC_LOCK`) is served the usual way, the refusal is logged, and the iothread is
/// left alone: no staging tried again and again (a region over the limit waits a
/// second, and only for the iothread's next pass).
#[test]
fn a_frontend_over_the_pin_limit_is_served_and_its_iothread_rests() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to drop CAP_IPC_LOCK from the daemon");
        return;
    }
    let dir = TempDir::new("metrics-pin-limit");
    let disk = TempDir::new_in(&std::env::temp_dir(), "metrics-pin-limit-img");
    let img = vubd_tests::TempImage::new_in(disk.path(), 16 * MIB);
    let (opt, addr) = unix_metrics(&dir.join("metrics.sock"));
    let sock = dir.join("e0.sock");
    let args = DaemonArgs::new()
        .iothread("io0")
        .file_raw_path("d0", img.path(), ",cache.direct=on", "")
        .vhost_user_blk("d0", &sock, ",writable=on,iothread=io0,pin-guest-memory=on")
        .arg("--metrics")
        .arg(&opt)
        .build();
    let mut daemon = Daemon::try_start_with(
        &vubd_tests::vubd_bin(),
        &args,
        std::slice::from_ref(&sock),
        |cmd| {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec only async-signal-safe calls: setrlimit and
            // prctl, on plain values.
            unsafe {
                cmd.pre_exec(|| {
                    let lim = libc::rlimit {
                        rlim_cur: 8 << 20,
                        rlim_max: 8 << 20,
                    };
                    const CAP_IPC_LOCK: libc::c_ulong = 14;
                    if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0
                        || libc::prctl(libc::PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut c = Client::connect_with(
        &sock,
        &vubd_tests::ClientOptions {
            buf_per_queue: 64 * MIB as usize,
            ..Default::default()
        },
    )
    .expect("connect");
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
    c.q().write(0, &data).unwrap();
    assert!(c.q().read(0, data.len()).unwrap() == data);
    let wakeups = |s: &Scrape| s.get("vubd_iothread_wakeups_total", &[("iothread", "io0")]);
    std::thread::sleep(Duration::from_millis(1500));
    let w1 = wakeups(&scrape(&addr));
    std::thread::sleep(Duration::from_secs(2));
    let w2 = wakeups(&scrape(&addr));
    assert!(
        w2 - w1 < 20,
        "the idle iothread woke {} times in 2 s",
        w2 - w1
    );
    let log = daemon.stderr();
    assert!(
        log.contains("would pin more than the process may"),
        "the refusal is not logged:\n{log}"
    );
    c.q().write(65536, &data).unwrap();
    assert!(c.q().read(65536, data.len()).unwrap() == data);
    daemon.assert_running("after the refused registration");
}

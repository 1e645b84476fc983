//! `vhost_user_msg`: a whole vhost-user-blk export (its `serve_one` loop, the
//! vhost-user protocol layer in `export/vhost_user_blk/vhost_user` and the device's worker threads)
//! driven by a frontend whose messages come from fuzz bytes.
//!
//! Each input starts a fresh export of a 1 MiB `null-co` node on a UNIX socket,
//! connects, and plays the input as a list of records (at most [`MAX_RECORDS`]):
//!
//! | first byte | record |
//! |------------|--------|
//! | `0x00..=0xdf` | a message with request code `b & 0x3f` (so unknown codes too), see below |
//! | `0xe0..=0xef` | guest memory write: u32 offset (mod [`MEM_SIZE`]), u16 length (mod 4096), bytes |
//! | `0xf0..=0xf7` | kick queue `b & 7` (the eventfd last sent with SET_VRING_KICK for it) |
//! | `0xf8..=0xfb` | read the replies waiting |
//! | `0xfc` | sleep u8 × 10 µs (lets the iothread work) |
//! | `0xfd` | the frontend closes the connection at once (mid-request, perhaps) |
//! | `0xfe`, `0xff` | a message with a u32 request code |
//!
//! A message is: a flags byte (bits 0-1: header version `^ 1`, bit 2: the REPLY
//! flag, which a frontend must not set, bit 3: NEED_REPLY; bits 4-5: the header's
//! size field is the payload's length, that length plus a signed byte, or a u32;
//! bits 6-7: 0, 1, 2 or a counted number of descriptors), a descriptor-kind byte if
//! any are sent (two bits each: the guest memory memfd, a new eventfd, one end of a
//! new socketpair, `/dev/null`), a u16 payload length (mod 4352) and the payload.
//! Payloads carry what the frontend chooses (region addresses, ring addresses, queue
//! indices) verbatim.
//!
//! Afterwards the frontend shuts its side down. The daemon must then close the
//! connection within [`DEADLINE`], every reply it sent must be well-formed, the
//! export must stop within [`DEADLINE`], and none of its threads may be left.

use super::input::Input;
use crate::config::ExportConfig;
use crate::export::vhost_user_blk::VhostUserBlkExport;
use crate::export::Export;
use crate::iothread::IoThread;
use blocklayer::backend::BlockBackend;
use blocklayer::edge::Parent;
use blocklayer::graph::Graph;
use blocklayer::options::BlockdevOptions;
use blocklayer::perm::Perm;
use serde_json::json;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Size of the memfd the frontend offers as guest memory.
pub const MEM_SIZE: u64 = 256 << 10;
/// Most records played from one input.
pub const MAX_RECORDS: usize = 128;
/// How long the daemon may take to close the connection and stop the export.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// vhost-user header flags.
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// The largest payload of a reply (vhost-user's `MAX_MSG_SIZE`).
const MAX_PAYLOAD: u32 = 0x1000;
const HEADER_LEN: usize = 12;
/// Request codes used by the seeds and tracked by the player.
pub mod code {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const SET_LOG_BASE: u32 = 6;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const RESET_DEVICE: u32 = 34;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
}

/// Numbers the exports of one process (ids and socket names are unique).
static CASE: AtomicU64 = AtomicU64::new(0);

/// Runs one input.
pub fn vhost_user_msg(data: &[u8]) {
    run(data);
}

/// What a session left behind, for tests of the player itself.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes of replies received.
    pub reply_bytes: usize,
    /// The used index of each queue's ring at the seeds' ring addresses.
    pub used_idx: [u16; 4],
    /// The bytes at the seeds' status address.
    pub status: u8,
}

/// Runs one input and tells what the frontend saw.
pub fn run(data: &[u8]) -> Outcome {
    ignore_sigpipe();
    let n = CASE.fetch_add(1, Ordering::Relaxed);
    let mut input = Input::new(data);
    let setup = input.u8();
    let id = format!("fz{n}");
    let path = socket_dir().join(format!("{}-{id}.sock", std::process::id()));

    let mut graph = Graph::new();
    let opts = BlockdevOptions::from_json(&json!({
        "driver": "null-co", "node-name": id, "size": 1 << 20, "read-zeroes": true,
    }))
    .expect("null-co options");
    let node = graph.add(&opts).expect("null-co opens");
    // Bits 0-1 of the first byte: 1 to 4 queues; bit 2: two iothreads; bit 3:
    // read-only; bit 4: 4096-byte blocks.
    let num_queues = 1 + u16::from(setup & 3);
    let threads = if setup & 4 != 0 { 2 } else { 1 };
    let cfg = ExportConfig::from_json(&json!({
        "type": "vhost-user-blk", "id": id, "node-name": id,
        "addr": {"type": "unix", "path": path},
        "writable": setup & 8 == 0,
        "num-queues": num_queues,
        "queue-size": 256,
        "logical-block-size": if setup & 16 != 0 { 4096 } else { 512 },
    }))
    .expect("export options");
    let iothreads = (0..threads)
        .map(|i| IoThread::implicit(&format!("{id}-{i}")).expect("iothread starts"))
        .collect();
    let perm = if setup & 8 == 0 {
        Perm::CONSISTENT_READ | Perm::WRITE
    } else {
        Perm::CONSISTENT_READ
    };
    let blk = BlockBackend::new(&graph, Parent::Backend(None), &node, perm, Perm::ALL)
        .expect("the export's backend attaches");
    let (mut export, listener) =
        VhostUserBlkExport::bind(&cfg, blk, iothreads).expect("export binds");
    let (gone_tx, gone_rx) = mpsc::channel();
    export
        .serve(listener, move || {
            let _ = gone_tx.send(());
        })
        .expect("the export is served");

    let stream = UnixStream::connect(&path).expect("connect to the export");
    let _ = stream.set_write_timeout(Some(DEADLINE));
    let mut player = Player::new(stream);
    player.play(&mut input);

    // The frontend is done: the daemon must notice and close the connection.
    let mem = player.mem.try_clone().expect("memfd");
    let replies = player.finish();
    check_replies(&replies);
    export.stop();
    let stopped = gone_rx.recv_timeout(DEADLINE);
    assert!(
        stopped.is_ok(),
        "the export did not stop within {DEADLINE:?}"
    );
    drop(export);
    drop(graph);
    let _ = std::fs::remove_file(&path);
    // Everything the export started is joined by now; allow a moment for threads
    // that were told to exit.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let left = threads_named(&["export-fz", "iothread-fz"]);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "threads of the export left behind: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut used_idx = [0u16; 4];
    for (q, idx) in used_idx.iter_mut().enumerate() {
        let mut b = [0u8; 2];
        let _ = mem.read_at(&mut b, ring(q as u64).2 + 2);
        *idx = u16::from_le_bytes(b);
    }
    let mut status = [0u8; 1];
    let _ = mem.read_at(&mut status, 0x8100);
    Outcome {
        reply_bytes: replies.len(),
        used_idx,
        status: status[0],
    }
}

/// Ignores SIGPIPE, as vubd's `main` does (and Rust programs do by default): a write
/// to a connection the other side closed must fail with EPIPE, not end the process.
/// libFuzzer's `main` leaves SIGPIPE at its default.
fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs the SIG_IGN disposition, which involves no handler code;
        // done once, before this process's own threads write to sockets.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
}

/// Where the export sockets go.
fn socket_dir() -> PathBuf {
    std::env::var_os("VUBD_FUZZ_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// Threads of this process whose name starts with one of `prefixes`.
fn threads_named(prefixes: &[&str]) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_string())
        .filter(|name| prefixes.iter().any(|p| name.starts_with(p)))
        .collect()
}

/// The frontend side of one connection.
struct Player {
    stream: UnixStream,
    mem: File,
    /// The last eventfd sent as each queue's kick.
    kicks: [Option<EventFd>; 8],
    replies: Vec<u8>,
    /// Whether the frontend closed the connection itself.
    closed: bool,
}

impl Player {
    fn new(stream: UnixStream) -> Self {
        Player {
            stream,
            mem: guest_memory(),
            kicks: Default::default(),
            replies: Vec::new(),
            closed: false,
        }
    }

    fn play(&mut self, input: &mut Input) {
        for _ in 0..MAX_RECORDS {
            if input.is_empty() || self.closed {
                return;
            }
            let op = input.u8();
            match op {
                0x00..=0xdf => self.message(u32::from(op & 0x3f), input),
                0xe0..=0xef => {
                    let offset = u64::from(input.u32()) % MEM_SIZE;
                    let len = usize::from(input.u16() % 4096);
                    let bytes = input.bytes(len);
                    let n = bytes.len().min((MEM_SIZE - offset) as usize);
                    let _ = self.mem.write_at(&bytes[..n], offset);
                }
                0xf0..=0xf7 => {
                    if let Some(fd) = &self.kicks[usize::from(op & 7)] {
                        let _ = fd.write(1);
                    }
                }
                0xf8..=0xfb => self.read_replies(false),
                0xfc => std::thread::sleep(Duration::from_micros(10 * u64::from(input.u8()))),
                0xfd => {
                    let _ = self.stream.shutdown(std::net::Shutdown::Both);
                    self.closed = true;
                }
                0xfe | 0xff => {
                    let code = input.u32();
                    self.message(code, input);
                }
            }
        }
    }

    /// Sends one message; a send that fails (the daemon closed the connection, or
    /// stopped reading) ends the session.
    fn message(&mut self, code: u32, input: &mut Input) {
        let flags = input.u8();
        let mut hdr_flags = u32::from(flags & 3) ^ VERSION_1;
        if flags & 4 != 0 {
            hdr_flags |= REPLY;
        }
        if flags & 8 != 0 {
            hdr_flags |= NEED_REPLY;
        }
        let nfds = match flags >> 6 {
            3 => usize::from(input.u8() % 40),
            n => usize::from(n),
        };
        let kinds = if nfds > 0 { input.u8() } else { 0 };
        let len = usize::from(input.u16() % 4352);
        let payload = input.bytes(len);
        let size = match (flags >> 4) & 3 {
            1 => (payload.len() as u32).wrapping_add(input.u8() as i8 as u32),
            2 => input.u32(),
            _ => payload.len() as u32,
        };
        let mut fds: Vec<OwnedFd> = Vec::with_capacity(nfds);
        for i in 0..nfds {
            let kind = (kinds >> (2 * (i % 4))) & 3;
            let fd = match kind {
                0 => self.mem.try_clone().ok().map(OwnedFd::from),
                1 => EventFd::new(libc::EFD_NONBLOCK).ok().map(|e| {
                    if code == code::SET_VRING_KICK && i == 0 {
                        if let (Some(&q), Ok(dup)) = (payload.first(), e.try_clone()) {
                            self.kicks[usize::from(q & 7)] = Some(dup);
                        }
                    }
                    // SAFETY: `into_raw_fd` gives up the EventFd's ownership of a
                    // valid descriptor, which the OwnedFd takes.
                    unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(e)) }
                }),
                2 => UnixStream::pair().ok().map(|(a, _b)| OwnedFd::from(a)),
                _ => File::open("/dev/null").ok().map(OwnedFd::from),
            };
            fds.extend(fd);
        }
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&code.to_le_bytes());
        header[4..8].copy_from_slice(&hdr_flags.to_le_bytes());
        header[8..12].copy_from_slice(&size.to_le_bytes());
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let sent = self.stream.send_with_fds(&[&header[..]], &raw);
        if !matches!(sent, Ok(HEADER_LEN)) || self.stream.write_all(payload).is_err() {
            self.closed = true;
        }
    }

    /// Reads the replies that arrived; with `to_end`, until the daemon closes the
    /// connection (or [`DEADLINE`] passes, which fails the case).
    fn read_replies(&mut self, to_end: bool) {
        let _ = self.stream.set_nonblocking(!to_end);
        let _ = self
            .stream
            .set_read_timeout(Some(Duration::from_millis(100)));
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => self.replies.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if to_end
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                {
                    assert!(
                        start.elapsed() < DEADLINE,
                        "the daemon kept the connection open {DEADLINE:?} after the frontend \
                         shut its side down"
                    );
                }
                Err(_) => return,
            }
        }
    }

    /// Shuts the frontend's side down and collects every reply.
    fn finish(mut self) -> Vec<u8> {
        if !self.closed {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.read_replies(true);
        }
        self.replies
    }
}

/// The memfd offered as guest memory.
fn guest_memory() -> File {
    // SAFETY: the name is a NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vubd-fuzz-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE).expect("memfd size");
    file
}

/// Every reply must be a whole, well-formed vhost-user message.
fn check_replies(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        assert!(
            bytes.len() >= HEADER_LEN,
            "truncated reply header: {bytes:?}"
        );
        let flags = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        let size = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        assert_eq!(flags & 3, VERSION_1, "reply version: {flags:#x}");
        assert!(
            flags & REPLY != 0,
            "reply without the REPLY flag: {flags:#x}"
        );
        assert!(size <= MAX_PAYLOAD, "reply payload of {size} bytes");
        let end = HEADER_LEN + size as usize;
        assert!(bytes.len() >= end, "truncated reply payload");
        bytes = &bytes[end..];
    }
}

/// Builds inputs: records in the layout [`vhost_user_msg`] plays.
#[derive(Default)]
pub struct Script(Vec<u8>);

impl Script {
    /// A script for an export with `setup` (the first byte, see [`vhost_user_msg`]).
    pub fn new(setup: u8) -> Self {
        Script(vec![setup])
    }

    /// A message with `fds` descriptors of the given kinds (0 memfd, 1 eventfd,
    /// 2 socketpair, 3 /dev/null) and NEED_REPLY if `ack`.
    pub fn msg(mut self, code: u32, payload: &[u8], fds: &[u8], ack: bool) -> Self {
        let wide = code > 0x3f;
        self.0.push(if wide { 0xfe } else { code as u8 });
        if wide {
            self.0.extend_from_slice(&code.to_le_bytes());
        }
        let count = if fds.len() <= 2 { fds.len() as u8 } else { 3 };
        self.0.push((count << 6) | if ack { 8 } else { 0 });
        if count == 3 {
            self.0.push(fds.len() as u8);
        }
        if !fds.is_empty() {
            let kinds = fds
                .iter()
                .take(4)
                .enumerate()
                .fold(0u8, |k, (i, &f)| k | ((f & 3) << (2 * i)));
            self.0.push(kinds);
        }
        self.0
            .extend_from_slice(&(payload.len() as u16).to_le_bytes());
        self.0.extend_from_slice(payload);
        self
    }

    /// Writes guest memory at `offset` of the memfd.
    pub fn poke(mut self, offset: u32, bytes: &[u8]) -> Self {
        self.0.push(0xe0);
        self.0.extend_from_slice(&offset.to_le_bytes());
        self.0
            .extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        self.0.extend_from_slice(bytes);
        self
    }

    pub fn kick(mut self, queue: u8) -> Self {
        self.0.push(0xf0 | (queue & 7));
        self
    }

    pub fn read_replies(mut self) -> Self {
        self.0.push(0xf8);
        self
    }

    pub fn sleep(mut self, units_of_10us: u8) -> Self {
        self.0.extend_from_slice(&[0xfc, units_of_10us]);
        self
    }

    pub fn close(mut self) -> Self {
        self.0.push(0xfd);
        self
    }

    /// A raw record (for malformed messages).
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

fn state(index: u32, num: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0..4].copy_from_slice(&index.to_le_bytes());
    b[4..8].copy_from_slice(&num.to_le_bytes());
    b
}

fn u64s(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The frontend's address of the guest memory in the seeds (QEMU's virtual address).
const UADDR: u64 = 0x7f00_0000_0000;
/// Ring layout of queue `q` in guest memory, and a request area.
fn ring(q: u64) -> (u64, u64, u64) {
    let base = 0x1_0000 * q;
    (base + 0x1000, base + 0x2000, base + 0x3000)
}

/// Protocol features the seeds negotiate: CONFIG | MQ | REPLY_ACK | BACKEND_REQ |
/// CONFIGURE_MEM_SLOTS.
const PROTOCOL_FEATURES: u64 = (1 << 9) | 1 | (1 << 3) | (1 << 5) | (1 << 15);
/// INFLIGHT_SHMFD and LOG_SHMFD.
const INFLIGHT_SHMFD: u64 = 1 << 12;
const LOG_SHMFD: u64 = 1 << 1;

/// Negotiates features and sets up `queues` rings with `features` (EVENT_IDX etc.).
fn session(setup: u8, features: u64, queues: u32, add_mem_reg: bool) -> Script {
    session_with(
        setup,
        features,
        PROTOCOL_FEATURES,
        queues,
        add_mem_reg,
        |s| s,
    )
}

/// As [`session`], with protocol features and messages sent between the memory
/// table and the rings (`before_rings`).
fn session_with(
    setup: u8,
    features: u64,
    protocol_features: u64,
    queues: u32,
    add_mem_reg: bool,
    before_rings: impl FnOnce(Script) -> Script,
) -> Script {
    let mut s = Script::new(setup)
        .msg(code::GET_FEATURES, &[], &[], false)
        .msg(code::SET_FEATURES, &u64s(&[features]), &[], false)
        .msg(code::GET_PROTOCOL_FEATURES, &[], &[], false)
        // CONFIG | MQ | REPLY_ACK | BACKEND_REQ | CONFIGURE_MEM_SLOTS
        .msg(
            code::SET_PROTOCOL_FEATURES,
            &u64s(&[protocol_features]),
            &[],
            false,
        )
        .msg(code::SET_OWNER, &[], &[], false)
        .msg(code::GET_QUEUE_NUM, &[], &[], false)
        .msg(code::GET_MAX_MEM_SLOTS, &[], &[], false);
    let region = u64s(&[0, MEM_SIZE, UADDR, 0]);
    if add_mem_reg {
        let mut p = u64s(&[0]);
        p.extend_from_slice(&region);
        s = s.msg(code::ADD_MEM_REG, &p, &[0], true);
    } else {
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend_from_slice(&[0; 4]);
        p.extend_from_slice(&region);
        s = s.msg(code::SET_MEM_TABLE, &p, &[0], true);
    }
    s = before_rings(s);
    for q in 0..queues {
        let (d, a, u) = ring(u64::from(q));
        let mut addr = state(q, 0).to_vec();
        addr.extend_from_slice(&u64s(&[UADDR + d, UADDR + u, UADDR + a, 0]));
        s = s
            .msg(code::SET_VRING_NUM, &state(q, 16), &[], false)
            .msg(code::SET_VRING_ADDR, &addr, &[], false)
            .msg(code::SET_VRING_BASE, &state(q, 0), &[], false)
            .msg(code::SET_VRING_CALL, &u64s(&[u64::from(q)]), &[1], false)
            .msg(code::SET_VRING_KICK, &u64s(&[u64::from(q)]), &[1], false)
            .msg(code::SET_VRING_ENABLE, &state(q, 1), &[], true);
    }
    s
}

/// Puts a chain of `(guest address, length, writable)` at descriptor 0 of queue `q`
/// and makes it available as entry `slot`, with the header `kind`/`sector` at 0x8000.
fn request(
    mut s: Script,
    q: u64,
    slot: u16,
    kind: u32,
    sector: u64,
    chain: &[(u64, u32, bool)],
) -> Script {
    let (d, a, _) = ring(q);
    let first = u64::from(slot) * 4;
    for (i, &(addr, len, write)) in chain.iter().enumerate() {
        let mut desc = [0u8; 16];
        desc[0..8].copy_from_slice(&addr.to_le_bytes());
        desc[8..12].copy_from_slice(&len.to_le_bytes());
        let mut f = if write { 2u16 } else { 0 };
        if i + 1 < chain.len() {
            f |= 1;
        }
        desc[12..14].copy_from_slice(&f.to_le_bytes());
        desc[14..16].copy_from_slice(&((first + i as u64 + 1) as u16).to_le_bytes());
        s = s.poke((d + 16 * (first + i as u64)) as u32, &desc);
    }
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    s = s.poke(0x8000, &hdr);
    s.poke(
        (a + 4 + 2 * u64::from(slot)) as u32,
        &(first as u16).to_le_bytes(),
    )
    .poke((a + 2) as u32, &(slot + 1).to_le_bytes())
}

/// Seed inputs: ordinary sessions with I/O, and the malformed and hostile variants
/// the issue lists.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use virtio_bindings::virtio_blk::*;
    const VERSION_1_F: u64 = 1 << 32;
    const EVENT_IDX: u64 = 1 << 29;
    const PROTOCOL: u64 = 1 << 30;
    let base = VERSION_1_F | PROTOCOL;
    let read = [
        (0x8000u64, 16u32, false),
        (0x9000, 4096, true),
        (0x8100, 1, true),
    ];
    let write = [
        (0x8000u64, 16u32, false),
        (0x9000, 4096, false),
        (0x8100, 1, true),
    ];
    let mut out = Vec::new();
    let mut add = |name: &str, s: Script| out.push((name.to_string(), s.into_bytes()));

    add("negotiate-only", session(0, base, 0, false));
    let io = |s: Script| {
        let s = request(s, 0, 0, VIRTIO_BLK_T_IN, 0, &read)
            .kick(0)
            .sleep(50);
        let s = request(s, 0, 1, VIRTIO_BLK_T_OUT, 8, &write)
            .kick(0)
            .sleep(50);
        let s = request(
            s,
            0,
            2,
            VIRTIO_BLK_T_FLUSH,
            0,
            &[(0x8000, 16, false), (0x8100, 1, true)],
        );
        s.kick(0).sleep(50)
    };
    add("read-write-flush", io(session(0, base, 1, false)));
    add(
        "read-write-flush-eventidx",
        io(session(0, base | EVENT_IDX, 1, false)),
    );
    add("add-mem-reg", io(session(0, base, 1, true)));
    add(
        "get-vring-base-after-io",
        io(session(0, base, 1, false)).msg(code::GET_VRING_BASE, &state(0, 0), &[], false),
    );
    add(
        "four-queues-two-threads",
        request(
            session(3 | 4, base, 4, false),
            2,
            0,
            VIRTIO_BLK_T_IN,
            0,
            &read,
        )
        .kick(2)
        .sleep(50)
        .msg(code::GET_VRING_BASE, &state(2, 0), &[], false),
    );
    add(
        "some-queues-unstarted",
        request(session(1, base, 1, false), 0, 0, VIRTIO_BLK_T_IN, 0, &read)
            .kick(0)
            .sleep(50),
    );
    add(
        "read-only-write",
        request(
            session(8, base, 1, false),
            0,
            0,
            VIRTIO_BLK_T_OUT,
            0,
            &write,
        )
        .kick(0)
        .sleep(50),
    );
    add(
        "avail-idx-far-ahead",
        session(0, base, 1, false)
            .poke(0x2002, &200u16.to_le_bytes())
            .kick(0)
            .sleep(100),
    );
    add(
        "descriptor-loop",
        request(session(0, base, 1, false), 0, 0, VIRTIO_BLK_T_IN, 0, &read)
            .poke(0x1000 + 16 * 2 + 12, &[1, 0, 0, 0])
            .kick(0)
            .sleep(50),
    );
    add(
        "buffer-outside-memory",
        request(
            session(0, base, 1, false),
            0,
            0,
            VIRTIO_BLK_T_IN,
            0,
            &[
                (0x8000, 16, false),
                (0x100_0000, 512, true),
                (0x8100, 1, true),
            ],
        )
        .kick(0)
        .sleep(50),
    );
    add(
        "close-mid-request",
        request(session(0, base, 1, false), 0, 0, VIRTIO_BLK_T_IN, 0, &read)
            .kick(0)
            .close(),
    );
    add("mem-table-replaced-under-io", {
        let s = request(session(0, base, 1, false), 0, 0, VIRTIO_BLK_T_IN, 0, &read).kick(0);
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend_from_slice(&[0; 4]);
        p.extend_from_slice(&u64s(&[0, MEM_SIZE / 2, UADDR, 0]));
        s.msg(code::SET_MEM_TABLE, &p, &[0], true).kick(0).sleep(50)
    });
    add("rem-mem-reg-under-io", {
        let s = request(session(0, base, 1, true), 0, 0, VIRTIO_BLK_T_IN, 0, &read).kick(0);
        let mut p = u64s(&[0]);
        p.extend_from_slice(&u64s(&[0, MEM_SIZE, UADDR, 0]));
        s.msg(code::REM_MEM_REG, &p, &[], true).kick(0).sleep(50)
    });
    let get_config = |offset: u32, size: u32| {
        let mut p = offset.to_le_bytes().to_vec();
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend(std::iter::repeat_n(0u8, size.min(256) as usize));
        p
    };
    add(
        "config",
        session(0, base, 0, false)
            .msg(code::GET_CONFIG, &get_config(0, 60), &[], false)
            .msg(code::GET_CONFIG, &get_config(250, 60), &[], false)
            .msg(code::GET_CONFIG, &get_config(u32::MAX - 4, 8), &[], false)
            .msg(
                code::SET_CONFIG,
                &{
                    let mut p = get_config(32, 1);
                    p[12] = 1;
                    p
                },
                &[],
                true,
            )
            .msg(code::SET_CONFIG, &get_config(0, 8), &[], true),
    );
    add(
        "backend-channel",
        session(0, base, 0, false).msg(code::SET_BACKEND_REQ_FD, &[], &[2], true),
    );
    add(
        "wrong-fd-counts",
        session(0, base, 0, false)
            .msg(
                code::SET_MEM_TABLE,
                &{
                    let mut p = 2u32.to_le_bytes().to_vec();
                    p.extend_from_slice(&[0; 4]);
                    p.extend_from_slice(&u64s(&[
                        0,
                        4096,
                        UADDR,
                        0,
                        4096,
                        4096,
                        UADDR + 4096,
                        4096,
                    ]));
                    p
                },
                &[0],
                true,
            )
            .msg(code::SET_VRING_KICK, &u64s(&[0x100]), &[1, 1], false)
            .msg(code::SET_VRING_CALL, &u64s(&[0]), &[], false)
            .msg(
                code::GET_FEATURES,
                &[],
                &[1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                false,
            ),
    );
    add(
        "unknown-and-unsupported",
        session(0, base, 0, false)
            .msg(0, &[], &[], true)
            .msg(63, &[1, 2, 3], &[], true)
            .msg(0x1234_5678, &[], &[], false)
            .msg(code::GET_INFLIGHT_FD, &u64s(&[0, 0]), &[], true)
            .msg(code::RESET_DEVICE, &[], &[], true),
    );
    add(
        "oversized",
        session(0, base, 0, false).msg(code::SET_FEATURES, &vec![0u8; 4200], &[], false),
    );
    add(
        "size-lies",
        session(0, base, 0, false)
            // SET_FEATURES claiming 0xffffffff bytes of payload.
            .raw(&[
                code::SET_FEATURES as u8,
                0x20,
                8,
                0,
                1,
                2,
                3,
                4,
                5,
                6,
                7,
                8,
                0xff,
                0xff,
                0xff,
                0xff,
            ]),
    );
    add(
        "bad-version-and-reply-flag",
        Script::new(0)
            .raw(&[code::GET_FEATURES as u8, 0x01, 0, 0])
            .raw(&[code::GET_FEATURES as u8, 0x04, 0, 0]),
    );
    add(
        "before-set-owner",
        Script::new(0)
            .msg(code::SET_VRING_NUM, &state(0, 16), &[], false)
            .msg(code::SET_VRING_KICK, &u64s(&[0]), &[1], false)
            .kick(0),
    );
    add(
        "vring-index-out-of-range",
        session(0, base, 0, false)
            .msg(code::SET_VRING_NUM, &state(9, 16), &[], true)
            .msg(code::SET_VRING_NUM, &state(0, 0), &[], true)
            .msg(code::SET_VRING_NUM, &state(0, 1000), &[], true)
            .msg(code::SET_VRING_ADDR, &state(200, 0), &[], true)
            .msg(code::GET_VRING_BASE, &state(77, 0), &[], true)
            .msg(code::SET_VRING_ENABLE, &state(0, 7), &[], true),
    );
    add("never-reads", {
        let mut s = session(0, base, 0, false);
        for _ in 0..60 {
            s = s.msg(code::GET_CONFIG, &get_config(0, 60), &[], false);
        }
        s
    });
    // In-flight tracking: a fresh region, and a region handed back with head 0 in
    // flight, which the device resubmits when the ring starts.
    let inflight = |size: u64, offset: u64, queue_size: u16| {
        let mut p = u64s(&[size, offset]);
        p.extend_from_slice(&1u16.to_le_bytes());
        p.extend_from_slice(&queue_size.to_le_bytes());
        p.extend_from_slice(&[0; 4]);
        p
    };
    add(
        "inflight-new",
        io(session_with(
            0,
            base,
            PROTOCOL_FEATURES | INFLIGHT_SHMFD,
            1,
            false,
            |s| s.msg(code::GET_INFLIGHT_FD, &inflight(0, 0, 16), &[], false),
        )),
    );
    add("inflight-resubmit", {
        // Queue 0's part: features, version 1, 16 descriptors, last batch head 0,
        // used index 0; descriptor 0 in flight with counter 1.
        let mut part = u64s(&[0]);
        part.extend_from_slice(&1u16.to_le_bytes());
        part.extend_from_slice(&16u16.to_le_bytes());
        part.extend_from_slice(&[0; 4]);
        part.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        part.extend_from_slice(&1u64.to_le_bytes());
        let s = session_with(0, base, PROTOCOL_FEATURES | INFLIGHT_SHMFD, 0, false, |s| {
            let s = s.poke(0x2_0000, &part);
            s.msg(
                code::SET_INFLIGHT_FD,
                &inflight(320, 0x2_0000, 16),
                &[0],
                true,
            )
        });
        // The ring with the chain of head 0, taken before (avail and used index
        // 1 and 0), then started.
        let s = request(s, 0, 0, VIRTIO_BLK_T_IN, 0, &read);
        let (d, a, u) = ring(0);
        let mut addr = state(0, 0).to_vec();
        addr.extend_from_slice(&u64s(&[UADDR + d, UADDR + u, UADDR + a, 0]));
        s.msg(code::SET_VRING_NUM, &state(0, 16), &[], false)
            .msg(code::SET_VRING_ADDR, &addr, &[], false)
            .msg(code::SET_VRING_BASE, &state(0, 1), &[], false)
            .msg(code::SET_VRING_CALL, &u64s(&[0]), &[1], false)
            .msg(code::SET_VRING_KICK, &u64s(&[0]), &[1], false)
            .msg(code::SET_VRING_ENABLE, &state(0, 1), &[], true)
            .sleep(50)
    });
    add(
        "dirty-log",
        io(session_with(
            0,
            base | (1 << 26),
            PROTOCOL_FEATURES | LOG_SHMFD,
            1,
            false,
            |s| s.msg(code::SET_LOG_BASE, &u64s(&[0x1000, 0x3_0000]), &[0], true),
        )),
    );
    add("empty", Script::new(0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        seeds()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d)
            .expect("seed")
    }

    /// Runs a seed until `ok` holds for its outcome (the player gives the daemon fixed
    /// sleeps; on a loaded machine a run may end before the iothread got to it).
    fn run_until(name: &str, ok: impl Fn(&Outcome) -> bool) -> Outcome {
        let mut o = run(&seed(name));
        for _ in 0..4 {
            if ok(&o) {
                break;
            }
            o = run(&seed(name));
        }
        o
    }

    #[test]
    fn the_player_drives_real_io() {
        let o = run_until("read-write-flush", |o| o.used_idx[0] == 3);
        assert_eq!(o.used_idx[0], 3, "{o:?}");
        assert_eq!(o.status, 0, "{o:?}");
        assert!(o.reply_bytes >= 3 * HEADER_LEN, "{o:?}");
        // A write to a read-only export completes with IOERR.
        let o = run_until("read-only-write", |o| o.used_idx[0] == 1);
        assert_eq!((o.used_idx[0], o.status), (1, 1), "{o:?}");
        // The request left in flight in the handed-back region is resubmitted.
        let o = run_until("inflight-resubmit", |o| o.used_idx[0] == 1);
        assert_eq!((o.used_idx[0], o.status), (1, 0), "{o:?}");
        let o = run_until("dirty-log", |o| o.used_idx[0] == 3);
        assert_eq!(o.used_idx[0], 3, "{o:?}");
    }
}

//! What a client has yet to read: its replies and events wait in a bounded queue that
//! a writer thread of the client's own sends. Whoever produces output (the control
//! thread emitting an event, above all) only queues it and never waits for a client.
//!
//! A client that does not read is held in check three ways:
//! - its reader stops taking commands while more than [`REPLY_BACKLOG`] bytes wait,
//!   so replies pile up no further and the client's own writes block (it is its
//!   own flow control, as with any socket);
//! - an event that would leave more than [`EVENT_BACKLOG`] bytes waiting disconnects
//!   it (an event cannot be held back like a reply, and dropping it silently would
//!   leave a management client with a wrong picture of the daemon);
//! - if nothing it has been sent can be written for [`WRITE_STALL`], it is
//!   disconnected.

use super::wire;
use serde_json::Value;
use std::collections::VecDeque;
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes waiting to be read by a client beyond which its next command waits.
pub const REPLY_BACKLOG: usize = 256 << 10;

/// Bytes waiting beyond which an event disconnects a client instead of being queued.
pub const EVENT_BACKLOG: usize = 1 << 20;

/// How long a client may leave its output unread (no byte written) before it is
/// disconnected.
pub const WRITE_STALL: Duration = Duration::from_secs(10);

/// One message, encoded once and shared by every client it goes to.
pub type Message = Arc<[u8]>;

#[derive(Default)]
struct State {
    queue: VecDeque<Message>,
    /// Bytes in `queue` plus the message being written.
    bytes: usize,
    /// Messages queued and messages written, ever (for [`Outbox::wait_written`]).
    queued: u64,
    written: u64,
    /// No more replies will be queued: the writer ends once the queue is empty.
    finishing: bool,
    /// Disconnected: nothing more is queued or written.
    closed: bool,
}

/// A client's output queue.
pub struct Outbox {
    state: Mutex<State>,
    changed: Condvar,
    /// For [`Outbox::close`]: shutting the socket down wakes the client's threads
    /// (a session on pipes has none).
    socket: Option<UnixStream>,
    pretty: bool,
}

impl Outbox {
    /// An outbox for the client on `socket` (a handle of its own).
    pub fn new(socket: UnixStream, pretty: bool) -> Arc<Outbox> {
        Self::with_socket(Some(socket), pretty)
    }

    /// An outbox for a session on pipes (`--chardev stdio` or `pipe`).
    pub fn for_pipe(pretty: bool) -> Arc<Outbox> {
        Self::with_socket(None, pretty)
    }

    fn with_socket(socket: Option<UnixStream>, pretty: bool) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            socket,
            pretty,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|p| p.into_inner())
    }

    pub fn pretty(&self) -> bool {
        self.pretty
    }

    fn push(&self, st: &mut State, msg: Message) {
        st.bytes += msg.len();
        st.queued += 1;
        st.queue.push_back(msg);
        self.changed.notify_all();
    }

    /// Queues a reply (or the greeting); never blocks. Returns false if the client
    /// is gone.
    pub fn reply(&self, v: &Value) -> bool {
        let msg: Message = wire::encode(v, self.pretty).into();
        let mut st = self.lock();
        if st.closed {
            return false;
        }
        self.push(&mut st, msg);
        true
    }

    /// Queues an event, or disconnects the client if that would leave more than
    /// [`EVENT_BACKLOG`] bytes waiting. Never blocks. Returns false if the client is
    /// gone (now or before).
    pub fn event(&self, msg: &Message) -> bool {
        let mut st = self.lock();
        if st.closed {
            return false;
        }
        if st.bytes + msg.len() > EVENT_BACKLOG {
            let waiting = st.bytes;
            drop(st);
            log::warn!(
                "QMP client disconnected: it does not read its output ({waiting} bytes waiting)"
            );
            self.close();
            return false;
        }
        self.push(&mut st, msg.clone());
        true
    }

    /// Blocks while more than [`REPLY_BACKLOG`] bytes wait for the client; the
    /// reader calls this before it takes the next command. Returns false if the
    /// client has been disconnected.
    pub fn wait_room(&self) -> bool {
        let mut st = self.lock();
        while !st.closed && st.bytes > REPLY_BACKLOG {
            st = self.wait(st);
        }
        !st.closed
    }

    /// Waits until everything queued so far has been written (or the client is
    /// gone, or `timeout` has passed). Returns whether it was all written.
    pub fn wait_written(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        let target = st.queued;
        while !st.closed && st.written < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.written >= target
    }

    /// The client has stopped sending: the writer sends what is queued, then ends.
    pub fn finish(&self) {
        self.lock().finishing = true;
        self.changed.notify_all();
    }

    /// Disconnects the client: drops what is queued and shuts the socket down, which
    /// ends its reader (end of input) and its writer.
    pub fn close(&self) {
        {
            let mut st = self.lock();
            if st.closed {
                return;
            }
            st.closed = true;
            st.queue.clear();
            st.bytes = 0;
        }
        self.changed.notify_all();
        if let Some(socket) = &self.socket {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    /// The writer thread: sends queued messages in order until the client is
    /// disconnected or has finished and everything is sent. `stream` is the writer's
    /// own handle on the socket.
    pub fn run_writer(&self, stream: UnixStream) {
        if let Err(e) = stream.set_write_timeout(Some(WRITE_STALL)) {
            log::warn!("QMP client: cannot set a write timeout: {e}");
            self.close();
            return;
        }
        self.write_queue(stream);
    }

    /// As [`Outbox::run_writer`] for a session on a pipe (no write timeout: a pipe
    /// has none; [`EVENT_BACKLOG`] still bounds what waits).
    pub fn run_pipe_writer(&self, output: std::fs::File) {
        self.write_queue(output);
    }

    fn write_queue(&self, mut stream: impl Write) {
        loop {
            let msg = {
                let mut st = self.lock();
                loop {
                    if st.closed {
                        return;
                    }
                    if let Some(m) = st.queue.pop_front() {
                        break m;
                    }
                    if st.finishing {
                        drop(st);
                        self.close();
                        return;
                    }
                    st = self.wait(st);
                }
            };
            let result = stream.write_all(&msg);
            {
                let mut st = self.lock();
                if !st.closed {
                    st.bytes -= msg.len();
                    st.written += 1;
                }
            }
            self.changed.notify_all();
            if let Err(e) = result {
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) {
                    log::warn!(
                        "QMP client disconnected: it has not read its output for {} s",
                        WRITE_STALL.as_secs()
                    );
                } else {
                    log::debug!("QMP client gone: {e}");
                }
                self.close();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pair() -> (Arc<Outbox>, UnixStream, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let ob = Outbox::new(ours.try_clone().unwrap(), false);
        (ob, ours, theirs)
    }

    fn event_of(n: usize) -> Message {
        vec![b'e'; n].into()
    }

    #[test]
    fn replies_and_events_in_order() {
        let (ob, ours, mut theirs) = pair();
        let w = ob.clone();
        let t = std::thread::spawn(move || w.run_writer(ours));
        assert!(ob.reply(&serde_json::json!({"a": 1})));
        assert!(ob.event(&event_of(3)));
        assert!(ob.wait_written(Duration::from_secs(5)));
        ob.finish();
        t.join().unwrap();
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"{\"a\": 1}\r\neee");
    }

    #[test]
    fn an_event_beyond_the_backlog_disconnects() {
        // No writer: nothing is read, as with a client that never reads.
        let (ob, _ours, _theirs) = pair();
        let ev = event_of(1000);
        let fit = EVENT_BACKLOG / ev.len();
        for _ in 0..fit {
            assert!(ob.event(&ev));
        }
        assert!(!ob.event(&ev));
        // Disconnected: nothing more is queued, waiting for room ends.
        assert!(!ob.reply(&serde_json::json!({})));
        assert!(!ob.wait_room());
        assert_eq!(ob.lock().bytes, 0);
    }

    #[test]
    fn wait_room_blocks_until_the_client_reads() {
        let (ob, ours, mut theirs) = pair();
        let big = serde_json::json!("x".repeat(REPLY_BACKLOG));
        assert!(ob.reply(&big));
        let w = ob.clone();
        let waiter = std::thread::spawn(move || w.wait_room());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished());
        let w = ob.clone();
        let writer = std::thread::spawn(move || w.run_writer(ours));
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        while total < REPLY_BACKLOG {
            total += theirs.read(&mut buf).unwrap();
        }
        assert!(waiter.join().unwrap());
        ob.close();
        writer.join().unwrap();
    }
}

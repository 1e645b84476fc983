//! A small QMP client for the Rust end-to-end tests (the Python suite in tests/qmp
//! uses the real `qemu.qmp` library): greeting, negotiation, commands, and events
//! kept aside until a test asks for them.

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
    pub greeting: Value,
}

/// A QMP error reply: its class and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: String,
    pub desc: String,
}

impl Qmp {
    /// Connects (retrying for a few seconds while the socket appears) and negotiates
    /// capabilities.
    pub fn connect(path: impl AsRef<Path>) -> Qmp {
        let path = path.as_ref();
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    panic!("cannot connect to QMP socket {}: {e}", path.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let writer = stream.try_clone().expect("clone QMP stream");
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: VecDeque::new(),
            greeting: Value::Null,
        };
        q.greeting = q
            .read_message(Duration::from_secs(10))
            .expect("QMP greeting");
        assert!(
            q.greeting.get("QMP").is_some(),
            "bad greeting {}",
            q.greeting
        );
        q.execute("qmp_capabilities", json!({}))
            .expect("qmp_capabilities");
        q
    }

    fn read_message(&mut self, timeout: Duration) -> Option<Value> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .expect("set read timeout");
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!("QMP connection closed"),
            Ok(_) => Some(
                serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("QMP sent invalid JSON ({e}): {line}")),
            ),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                None
            }
            Err(e) => panic!("QMP read failed: {e}"),
        }
    }

    /// Runs a command; events that arrive meanwhile are kept for [`Qmp::wait_event`].
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let msg = json!({ "execute": command, "arguments": arguments });
        let mut bytes = serde_json::to_vec(&msg).expect("encode");
        bytes.push(b'\n');
        self.writer.write_all(&bytes).expect("QMP write");
        loop {
            let reply = self
                .read_message(Duration::from_secs(120))
                .unwrap_or_else(|| panic!("no reply to {command} within 120 s"));
            if reply.get("event").is_some() {
                self.events.push_back(reply);
                continue;
            }
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            let e = &reply["error"];
            return Err(QmpError {
                class: e["class"].as_str().unwrap_or_default().to_string(),
                desc: e["desc"].as_str().unwrap_or_default().to_string(),
            });
        }
    }

    /// Like [`Qmp::execute`], panicking on an error reply.
    pub fn ok(&mut self, command: &str, arguments: Value) -> Value {
        self.execute(command, arguments)
            .unwrap_or_else(|e| panic!("{command} failed: {e:?}"))
    }

    /// The `query-blockstats` entry (with `query-nodes`) of node `node`; panics if
    /// there is none.
    pub fn node_blockstats(&mut self, node: &str) -> Value {
        let stats = self.ok("query-blockstats", serde_json::json!({"query-nodes": true}));
        stats
            .as_array()
            .and_then(|a| a.iter().find(|n| n["node-name"] == node))
            .cloned()
            .unwrap_or_else(|| panic!("no node {node} in {stats}"))
    }

    /// Waits until job `id` is concluded (polling `query-jobs`) and returns its
    /// `JobInfo`; panics after `timeout`.
    pub fn wait_job_concluded(&mut self, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let jobs = self.ok("query-jobs", serde_json::json!({}));
            let job = jobs
                .as_array()
                .and_then(|a| a.iter().find(|j| j["id"] == id))
                .cloned()
                .unwrap_or_else(|| panic!("no job {id} in {jobs}"));
            if job["status"] == "concluded" {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} hangs: {job}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the next event called `name` (earlier ones of other names are
    /// dropped); `None` after `timeout`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(ev) = self.events.pop_front() {
                if ev["event"] == name {
                    return Some(ev);
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if let Some(msg) = self.read_message(left.max(Duration::from_millis(1))) {
                self.events.push_back(msg);
            }
        }
    }

    /// Events received so far (and not yet taken), without waiting.
    pub fn take_events(&mut self) -> Vec<Value> {
        while let Some(msg) = self.read_message(Duration::from_millis(1)) {
            self.events.push_back(msg);
        }
        self.events.drain(..).collect()
    }
}

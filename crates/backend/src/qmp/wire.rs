//! The QMP wire format: splitting the input stream into JSON values, checking a
//! command's envelope, and writing responses, errors and events the way QEMU does
//! (compact JSON with `": "` and `", "` separators, one message per line ending in
//! CRLF).

use serde_json::{json, Map, Value};
use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

/// QEMU's `QapiErrorClass`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
}

impl ErrorClass {
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        }
    }
}

/// A QMP error reply: its class and human-readable description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }
}

pub type QmpResult = std::result::Result<Value, QmpError>;

/// A command as the client sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub name: String,
    pub arguments: Value,
    pub id: Option<Value>,
    /// Sent with `exec-oob`.
    pub oob: bool,
}

/// Checks the envelope of one input value (QEMU's `qmp_dispatch_check_obj`). The
/// error carries the `id` when the input had one, for the reply.
pub fn parse_command(v: Value) -> Result<Command, (QmpError, Option<Value>)> {
    let Value::Object(map) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = map.get("id").cloned();
    let fail = |desc: String| Err((QmpError::generic(desc), id.clone()));
    let mut name = None;
    let mut oob = false;
    let mut arguments = Value::Object(Map::new());
    for (key, value) in &map {
        match key.as_str() {
            "execute" | "exec-oob" => {
                if name.is_some() {
                    return fail("QMP input must not contain both 'execute' and 'exec-oob'".into());
                }
                let Value::String(s) = value else {
                    return fail(format!("QMP input member '{key}' must be a string"));
                };
                name = Some(s.clone());
                oob = key == "exec-oob";
            }
            "arguments" => {
                if !value.is_object() {
                    return fail("QMP input member 'arguments' must be an object".into());
                }
                arguments = value.clone();
            }
            "id" => {}
            other => return fail(format!("QMP input member '{other}' is unexpected")),
        }
    }
    match name {
        Some(name) => Ok(Command {
            name,
            arguments,
            id,
            oob,
        }),
        None => fail("QMP input lacks member 'execute'".into()),
    }
}

/// The reply to a command.
pub fn response(result: &QmpResult, id: Option<&Value>) -> Value {
    let mut m = Map::new();
    match result {
        Ok(v) => {
            m.insert("return".into(), v.clone());
        }
        Err(e) => {
            m.insert(
                "error".into(),
                json!({ "class": e.class.name(), "desc": e.desc }),
            );
        }
    }
    if let Some(id) = id {
        m.insert("id".into(), id.clone());
    }
    Value::Object(m)
}

/// An event message with the current time.
pub fn event(name: &str, data: Option<Value>) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut m = Map::new();
    m.insert("event".into(), json!(name));
    if let Some(data) = data {
        m.insert("data".into(), data);
    }
    m.insert(
        "timestamp".into(),
        json!({ "seconds": now.as_secs(), "microseconds": now.subsec_micros() }),
    );
    Value::Object(m)
}

/// The greeting sent when a client connects.
pub fn greeting() -> Value {
    json!({
        "QMP": {
            "version": {
                "qemu": { "micro": QEMU_VERSION.2, "minor": QEMU_VERSION.1, "major": QEMU_VERSION.0 },
                "package": format!("vubd {}", env!("CARGO_PKG_VERSION")),
            },
            "capabilities": ["oob"],
        }
    })
}

/// The QEMU version whose QMP schema vubd follows (and reports).
pub const QEMU_VERSION: (u32, u32, u32) = (7, 2, 0);

/// QEMU's compact JSON style: `{"a": 1, "b": [1, 2]}`.
struct QemuFormatter;

impl serde_json::ser::Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }
}

/// One message as QEMU writes it: compact JSON, then CRLF (or pretty-printed with
/// `pretty=on`).
pub fn encode(v: &Value, pretty: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let written = if pretty {
        serde_json::to_writer_pretty(&mut out, v)
    } else {
        let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuFormatter);
        serde::Serialize::serialize(v, &mut ser)
    };
    // Serialising a Value into memory cannot fail.
    debug_assert!(written.is_ok());
    out.extend_from_slice(b"\r\n");
    out
}

/// Splits the input byte stream into JSON texts the way QEMU's JSON streamer does:
/// by counting braces and brackets outside strings. Each complete text is parsed;
/// a text that is not valid JSON yields a parse error and the stream goes on.
#[derive(Default)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: i64,
    /// The quote character of the string being read (QEMU's JSON also takes
    /// single-quoted strings).
    quote: Option<u8>,
    escaped: bool,
}

/// Largest JSON text accepted (QEMU's streamer limit is 64 MiB; QMP commands are small).
const MAX_TEXT: usize = 16 << 20;

impl Splitter {
    /// Feeds bytes; returns each complete input value (or its parse error).
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Value, QmpError>> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.buf.is_empty() && self.depth == 0 && b.is_ascii_whitespace() {
                continue;
            }
            self.buf.push(b);
            if let Some(q) = self.quote {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == q {
                    self.quote = None;
                }
                continue;
            }
            match b {
                b'"' | b'\'' => self.quote = Some(b),
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => self.depth -= 1,
                _ => {}
            }
            let complete = match b {
                b'}' | b']' => self.depth <= 0,
                // A scalar or stray text at the top level ends at a line end.
                b'\n' => self.depth == 0,
                _ => false,
            };
            if complete || self.buf.len() > MAX_TEXT {
                out.push(self.take());
            }
        }
        out
    }

    fn take(&mut self) -> Result<Value, QmpError> {
        let text = std::mem::take(&mut self.buf);
        let depth = self.depth;
        self.depth = 0;
        self.quote = None;
        self.escaped = false;
        if depth < 0 {
            return Err(QmpError::generic("JSON parse error, unbalanced brackets"));
        }
        serde_json::from_slice(&single_quotes_to_double(&text))
            .map_err(|e| QmpError::generic(format!("JSON parse error, {}", parse_reason(&e))))
    }
}

/// Rewrites QEMU's single-quoted strings (`'abc'`, where `\'` is a quote and `"`
/// needs no escape) as standard JSON strings; everything else is copied.
fn single_quotes_to_double(text: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !text.contains(&b'\'') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = Vec::with_capacity(text.len() + 8);
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    for &b in text {
        match quote {
            None => {
                if b == b'"' || b == b'\'' {
                    quote = Some(b);
                    out.push(b'"');
                } else {
                    out.push(b);
                }
            }
            Some(q) => {
                if escaped {
                    escaped = false;
                    if q == b'\'' && b == b'\'' {
                        // `\'` inside a single-quoted string is a plain quote.
                        out.pop();
                    }
                    out.push(b);
                } else if b == b'\\' {
                    escaped = true;
                    out.push(b);
                } else if b == q {
                    quote = None;
                    out.push(b'"');
                } else if q == b'\'' && b == b'"' {
                    out.extend_from_slice(b"\\\"");
                } else {
                    out.push(b);
                }
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

fn parse_reason(e: &serde_json::Error) -> String {
    let s = e.to_string();
    // serde_json appends " at line L column C"; keep only the reason.
    match s.find(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_and_recovers() {
        let mut s = Splitter::default();
        let out = s.feed(b"{\"execute\": \"a\"}{\"execute\":\n \"b}\"}\n");
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].as_ref().unwrap()["execute"], "b}");
        let out = s.feed(b"{\"execute\": }\n");
        assert!(out[0]
            .as_ref()
            .unwrap_err()
            .desc
            .starts_with("JSON parse error"));
        let out = s.feed(b"hello\n");
        assert!(out[0].is_err());
        let out = s.feed(b"[1, 2]");
        assert_eq!(out[0].as_ref().unwrap(), &json!([1, 2]));
        let out = s.feed(b"{'execute': 'it\\'s \"x\"', \"a\": ['b}']}");
        assert_eq!(out[0].as_ref().unwrap()["execute"], "it's \"x\"");
        assert_eq!(out[0].as_ref().unwrap()["a"][0], "b}");
        let out = s.feed(b"{\"execute\": \"q\\\"x\"");
        assert!(out.is_empty());
        let out = s.feed(b"}");
        assert_eq!(out[0].as_ref().unwrap()["execute"], "q\"x");
    }

    #[test]
    fn envelope_checks() {
        let err = |v: Value| parse_command(v).unwrap_err().0.desc;
        assert_eq!(err(json!([1])), "QMP input must be a JSON object");
        assert_eq!(err(json!({"id": 1})), "QMP input lacks member 'execute'");
        assert_eq!(
            err(json!({"execute": 1})),
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            err(json!({"execute": "x", "arguments": []})),
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            err(json!({"execute": "x", "foo": 1})),
            "QMP input member 'foo' is unexpected"
        );
        let (_, id) = parse_command(json!({"execute": 1, "id": "a"})).unwrap_err();
        assert_eq!(id, Some(json!("a")));
        let c = parse_command(json!({"execute": "x", "id": 7})).unwrap();
        assert_eq!(c.id, Some(json!(7)));
        assert!(c.arguments.as_object().unwrap().is_empty());
    }

    #[test]
    fn qemu_style_encoding() {
        let v = response(&Ok(json!({"a": [1, 2], "b": {}})), Some(&json!("x")));
        assert_eq!(
            String::from_utf8(encode(&v, false)).unwrap(),
            "{\"return\": {\"a\": [1, 2], \"b\": {}}, \"id\": \"x\"}\r\n"
        );
        let e = response(&Err(QmpError::generic("no")), None);
        assert_eq!(e["error"]["class"], "GenericError");
        let ev = event("X", Some(json!({"id": "e"})));
        assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 0);
    }
}

//! The QMP wire format: checking a command's envelope, and writing responses, errors
//! and events the way QEMU does (compact JSON with `": "` and `", "` separators, one
//! message per line ending in CRLF). Splitting the input into JSON texts is
//! [`super::splitter`]'s business.

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

/// The one place where the control plane's errors become QMP error classes.
impl From<crate::control::ControlError> for QmpError {
    fn from(e: crate::control::ControlError) -> Self {
        use crate::control::error::ErrorKind;
        let class = match e.kind {
            ErrorKind::GenericError => ErrorClass::GenericError,
            ErrorKind::CommandNotFound => ErrorClass::CommandNotFound,
            ErrorKind::DeviceNotActive => ErrorClass::DeviceNotActive,
            ErrorKind::DeviceNotFound => ErrorClass::DeviceNotFound,
        };
        QmpError::new(class, e.desc)
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

#[cfg(test)]
mod tests {
    use super::*;

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

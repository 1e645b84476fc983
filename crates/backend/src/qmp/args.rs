//! Command arguments read the way QEMU's QMP input visitor reads them: members in
//! schema order, strict JSON types, and leftovers refused, with QEMU's messages.

use super::schema::{self, member_name, Member, TypeDef};
use super::wire::QmpError;
use serde_json::{Map, Value};

pub struct Args {
    map: Map<String, Value>,
    /// Where the members sit in the whole input (`actions[0].data.`), for messages.
    prefix: String,
    /// The members the command table declares for these arguments: debug builds
    /// check that handlers read no other (the table and the handlers agree).
    declared: Option<&'static [Member]>,
}

/// Checks a command's arguments against its declared members, as QEMU's input
/// visitor does: members in schema order (a missing one, a JSON type or an enum
/// value that does not fit), then members nobody declared. What lies inside
/// objects, alternates and lists of objects, and the range of the narrow integer
/// types, is left to the handler's reading (with [`Args`]), whose messages for them
/// differ from type to type as QEMU's do.
pub fn check(members: &[Member], arguments: &Value) -> Result<(), QmpError> {
    let empty = Map::new();
    let map = arguments.as_object().unwrap_or(&empty);
    for m in members {
        let (name, optional) = member_name(m);
        match map.get(name) {
            None if optional => {}
            None => return Err(missing(name)),
            Some(v) => check_value(name, m.1, v)?,
        }
    }
    match map
        .keys()
        .find(|k| !members.iter().any(|m| member_name(m).0 == k.as_str()))
    {
        Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

fn check_value(name: &str, ty: &str, v: &Value) -> Result<(), QmpError> {
    match ty {
        "str" if !v.is_string() => Err(type_error(name, "string")),
        "bool" if !v.is_boolean() => Err(type_error(name, "boolean")),
        "number" if !v.is_number() => Err(type_error(name, "number")),
        "int" if v.as_i64().is_none() => Err(if v.is_u64() {
            QmpError::generic(format!("Parameter '{name}' expects int64"))
        } else {
            type_error(name, "integer")
        }),
        "uint64" | "size" if v.as_u64().is_none() => Err(QmpError::generic(format!(
            "Parameter '{name}' expects uint64"
        ))),
        t if t.starts_with('[') && !v.is_array() => Err(type_error(name, "array")),
        t => match schema::find(t) {
            Some(TypeDef::Enum { values, .. }) => match v {
                Value::String(s) if values.contains(&s.as_str()) => Ok(()),
                Value::String(s) => Err(QmpError::generic(format!(
                    "Parameter '{name}' does not accept value '{s}'"
                ))),
                _ => Err(type_error(name, "string")),
            },
            Some(TypeDef::Struct { .. } | TypeDef::Union { .. }) if !v.is_object() => {
                Err(type_error(name, "object"))
            }
            _ => Ok(()),
        },
    }
}

fn type_error(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

fn missing(name: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' is missing"))
}

impl Args {
    pub fn new(arguments: &Value) -> Args {
        Args {
            map: arguments.as_object().cloned().unwrap_or_default(),
            prefix: String::new(),
            declared: None,
        }
    }

    /// A command's arguments, checked by [`check`] against `members`.
    pub fn declared(arguments: &Value, members: &'static [Member]) -> Args {
        Args {
            declared: Some(members),
            ..Args::new(arguments)
        }
    }

    /// Removes member `name`, which the command table must declare.
    fn remove(&mut self, name: &str) -> Option<Value> {
        debug_assert!(
            self.declared
                .is_none_or(|d| d.iter().any(|m| member_name(m).0 == name)),
            "a handler reads '{name}', which its command's schema does not declare"
        );
        self.map.remove(name)
    }

    /// The members of an object nested at `path` in the input (`actions[0].data`):
    /// messages name members by their whole path, as QEMU's do (enum values aside).
    pub fn nested(object: &Value, path: &str) -> Args {
        Args {
            map: object.as_object().cloned().unwrap_or_default(),
            prefix: format!("{path}."),
            declared: None,
        }
    }

    pub fn full(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub fn opt_str(&mut self, name: &str) -> Result<Option<String>, QmpError> {
        match self.remove(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(type_error(&self.full(name), "string")),
        }
    }

    pub fn str(&mut self, name: &str) -> Result<String, QmpError> {
        self.opt_str(name)?.ok_or_else(|| missing(&self.full(name)))
    }

    pub fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, QmpError> {
        match self.remove(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(type_error(&self.full(name), "boolean")),
        }
    }

    pub fn opt_int(&mut self, name: &str) -> Result<Option<i64>, QmpError> {
        match self.remove(name) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(n) => Ok(Some(n)),
                None if v.is_u64() => Err(QmpError::generic(format!(
                    "Parameter '{}' expects int64",
                    self.full(name)
                ))),
                None => Err(type_error(&self.full(name), "integer")),
            },
        }
    }

    /// A `uint64` member; QEMU's input visitor answers any other value (a string, a
    /// negative number) with "expects uint64".
    pub fn opt_uint(&mut self, name: &str) -> Result<Option<u64>, QmpError> {
        match self.remove(name) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                QmpError::generic(format!("Parameter '{}' expects uint64", self.full(name)))
            }),
        }
    }

    pub fn uint(&mut self, name: &str) -> Result<u64, QmpError> {
        self.opt_uint(name)?
            .ok_or_else(|| missing(&self.full(name)))
    }

    pub fn int(&mut self, name: &str) -> Result<i64, QmpError> {
        self.opt_int(name)?.ok_or_else(|| missing(&self.full(name)))
    }

    /// An enum member: a string among `choices`.
    pub fn opt_enum(
        &mut self,
        name: &str,
        choices: &[&'static str],
    ) -> Result<Option<&'static str>, QmpError> {
        match self.opt_str(name)? {
            None => Ok(None),
            Some(s) => choices
                .iter()
                .find(|c| **c == s)
                .copied()
                .map(Some)
                .ok_or_else(|| {
                    QmpError::generic(format!("Parameter '{name}' does not accept value '{s}'"))
                }),
        }
    }

    /// A `StrOrNull` member: present as a string or as JSON null.
    pub fn str_or_null(&mut self, name: &str) -> Result<Option<String>, QmpError> {
        match self.remove(name) {
            None => Err(missing(&self.full(name))),
            Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(type_error(&self.full(name), "StrOrNull")),
        }
    }

    /// A required object member, as it is.
    pub fn object(&mut self, name: &str) -> Result<Value, QmpError> {
        match self.remove(name) {
            Some(v @ Value::Object(_)) => Ok(v),
            Some(_) => Err(type_error(&self.full(name), "object")),
            None => Err(missing(&self.full(name))),
        }
    }

    /// A list of strings.
    pub fn opt_str_list(&mut self, name: &str) -> Result<Option<Vec<String>>, QmpError> {
        match self.remove(name) {
            None => Ok(None),
            Some(Value::Array(items)) => {
                let prefix = &self.prefix;
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::String(s) => Ok(s),
                        _ => Err(type_error(&format!("{}{name}[{i}]", prefix), "string")),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some)
            }
            Some(_) => Err(type_error(&self.full(name), "array")),
        }
    }

    /// Removes and returns a member as it is.
    pub fn take(&mut self, name: &str) -> Option<Value> {
        self.remove(name)
    }

    /// Refuses members nobody read.
    pub fn finish(self) -> Result<(), QmpError> {
        match self.map.keys().next() {
            Some(key) => Err(QmpError::generic(format!(
                "Parameter '{}' is unexpected",
                self.full(key)
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strict_types_and_leftovers() {
        let mut a = Args::new(&json!({"node-name": 1, "size": "5", "x": true}));
        assert_eq!(
            a.str("node-name").unwrap_err().desc,
            "Invalid parameter type for 'node-name', expected: string"
        );
        assert_eq!(
            a.int("size").unwrap_err().desc,
            "Invalid parameter type for 'size', expected: integer"
        );
        assert_eq!(
            a.str("gone").unwrap_err().desc,
            "Parameter 'gone' is missing"
        );
        assert_eq!(a.finish().unwrap_err().desc, "Parameter 'x' is unexpected");
        let mut a = Args::new(&json!({"mode": "soft", "iothread": null}));
        assert_eq!(
            a.opt_enum("mode", &["safe", "hard"]).unwrap_err().desc,
            "Parameter 'mode' does not accept value 'soft'"
        );
        assert_eq!(a.str_or_null("iothread").unwrap(), None);
        a.finish().unwrap();
    }
}

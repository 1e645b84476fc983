//! QEMU keyval syntax (`driver=file,node-name=x,cache.direct=on`) into JSON.
//!
//! As QEMU's `util/keyval.c`: parameters are separated by `,`; a `,,` inside a value is
//! a literal comma; dotted keys build nested objects; an object whose keys are all
//! decimal indices `0..n` becomes an array; the first parameter may leave out `key=`
//! when there is an implied key (`--blockdev file,...` means `driver=file`). All values
//! are strings; typed parsing coerces them. Unlike QEMU, repeating a key is an error
//! (QEMU silently lets the last one win).

use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// QEMU's limit on a key fragment's length (its `key_in_cur[128]`).
const MAX_FRAGMENT_LEN: usize = 127;

/// Most fragments of one key: as deep as the JSON form of an option may nest
/// (serde_json's recursion limit). Parsing and dropping nested objects recurse, so
/// without a bound a long enough key (`a.a.a...`, 10,000 levels) overflows the stack.
const MAX_DEPTH: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyvalError {
    #[error("Invalid parameter '{0}': empty key fragment")]
    EmptyKey(String),
    #[error("Invalid parameter '{0}'")]
    InvalidKey(String),
    #[error("Parameter '{0}' is too long")]
    KeyTooLong(String),
    #[error("Parameter '{0}...' nests more than 128 levels deep")]
    TooDeep(String),
    #[error("Expected '=' after parameter '{0}'")]
    ExpectedEquals(String),
    #[error("Parameter '{0}' is duplicate")]
    Duplicate(String),
    #[error("Parameters '{0}.*' used inconsistently")]
    Inconsistent(String),
    #[error("Parameter '{0}' missing")]
    MissingIndex(String),
    #[error("Help is not available for this option")]
    HelpNotAvailable,
    #[error("JSON parse error: {0}")]
    Json(String),
    #[error("JSON argument must be an object")]
    JsonNotObject,
}

pub type Result<T> = std::result::Result<T, KeyvalError>;

/// A parsed value before arrays are recognised.
enum Node {
    Str(String),
    Obj(BTreeMap<String, Node>),
}

/// Parses keyval syntax into a JSON object of strings, objects and arrays.
pub fn parse(s: &str, implied_key: Option<&str>) -> Result<Value> {
    let mut root = BTreeMap::new();
    let mut rest = s;
    let mut implied_key = implied_key;
    while !rest.is_empty() {
        rest = parse_one(&mut root, rest, implied_key.take())?;
    }
    listify(root, "")
}

/// Parses an option argument: JSON if it starts with `{` (as qemu-storage-daemon),
/// keyval syntax otherwise.
pub fn parse_option(s: &str, implied_key: Option<&str>) -> Result<Value> {
    if !s.starts_with('{') {
        return parse(s, implied_key);
    }
    match serde_json::from_str(s) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(KeyvalError::JsonNotObject),
        Err(e) => Err(KeyvalError::Json(e.to_string())),
    }
}

/// Parses the first `key=value` (or implied-key value) of `params` into `root`;
/// returns what follows it.
fn parse_one<'a>(
    root: &mut BTreeMap<String, Node>,
    params: &'a str,
    implied_key: Option<&str>,
) -> Result<&'a str> {
    let key_len = params.find(['=', ',']).unwrap_or(params.len());
    let has_equals = params[key_len..].starts_with('=');
    if key_len > 0 && !has_equals {
        let word = &params[..key_len];
        if word == "help" || word == "?" {
            return Err(KeyvalError::HelpNotAvailable);
        }
        if let Some(key) = implied_key {
            // The implied key's value ends at the first comma: it cannot contain one.
            let rest = params[key_len..].strip_prefix(',').unwrap_or("");
            put(root, key, word.to_string())?;
            return Ok(rest);
        }
    }
    let key = &params[..key_len];
    check_key(key)?;
    if !has_equals {
        return Err(KeyvalError::ExpectedEquals(key.to_string()));
    }
    let (value, rest) = take_value(&params[key_len + 1..]);
    put(root, key, value)?;
    Ok(rest)
}

/// A value up to the next single comma (`,,` is a literal comma), and what follows.
fn take_value(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut rest = s;
    while let Some(pos) = rest.find(',') {
        value.push_str(&rest[..pos]);
        if rest[pos + 1..].starts_with(',') {
            value.push(',');
            rest = &rest[pos + 2..];
        } else {
            return (value, &rest[pos + 1..]);
        }
    }
    value.push_str(rest);
    (value, "")
}

/// Checks a dotted key: the first fragment is a QAPI name (a letter, then letters,
/// digits, `-` and `_`), later ones a QAPI name or a decimal index.
fn check_key(key: &str) -> Result<()> {
    if key.split('.').nth(MAX_DEPTH).is_some() {
        let shown: String = key.chars().take(40).collect();
        return Err(KeyvalError::TooDeep(shown));
    }
    for (i, fragment) in key.split('.').enumerate() {
        if fragment.is_empty() {
            return Err(KeyvalError::EmptyKey(key.to_string()));
        }
        let is_index = i > 0 && fragment.bytes().all(|b| b.is_ascii_digit());
        if !is_index && !is_qapi_name(fragment) {
            return Err(KeyvalError::InvalidKey(key.to_string()));
        }
        if fragment.len() > MAX_FRAGMENT_LEN {
            return Err(KeyvalError::KeyTooLong(fragment.to_string()));
        }
    }
    Ok(())
}

fn is_qapi_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A key fragment as stored: indices without leading zeros, so `01` and `1` collide.
fn normalize_fragment(fragment: &str) -> String {
    if fragment.bytes().all(|b| b.is_ascii_digit()) {
        let trimmed = fragment.trim_start_matches('0');
        if trimmed.is_empty() {
            "0".to_string()
        } else {
            trimmed.to_string()
        }
    } else {
        fragment.to_string()
    }
}

/// Stores `value` under the (checked) dotted `key`, creating objects on the way.
fn put(root: &mut BTreeMap<String, Node>, key: &str, value: String) -> Result<()> {
    let fragments: Vec<String> = key.split('.').map(normalize_fragment).collect();
    let Some((last, parents)) = fragments.split_last() else {
        return Err(KeyvalError::EmptyKey(key.to_string()));
    };
    let mut cur = root;
    let mut path = String::new();
    for fragment in parents {
        path = join(&path, fragment);
        let node = cur
            .entry(fragment.clone())
            .or_insert_with(|| Node::Obj(BTreeMap::new()));
        cur = match node {
            Node::Obj(map) => map,
            Node::Str(_) => return Err(KeyvalError::Inconsistent(path)),
        };
    }
    let path = join(&path, last);
    match cur.get(last) {
        Some(Node::Str(_)) => Err(KeyvalError::Duplicate(path)),
        Some(Node::Obj(_)) => Err(KeyvalError::Inconsistent(path)),
        None => {
            cur.insert(last.clone(), Node::Str(value));
            Ok(())
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Converts an object to JSON, turning objects keyed `0..n` into arrays.
fn listify(map: BTreeMap<String, Node>, path: &str) -> Result<Value> {
    let mut object = Map::new();
    for (key, node) in map {
        let value = match node {
            Node::Str(s) => Value::String(s),
            Node::Obj(child) => listify(child, &join(path, &key))?,
        };
        object.insert(key, value);
    }
    let indices = object
        .keys()
        .filter(|k| k.bytes().all(|b| b.is_ascii_digit()))
        .count();
    if indices == 0 {
        Ok(Value::Object(object))
    } else if indices < object.len() {
        Err(KeyvalError::Inconsistent(path.to_string()))
    } else {
        to_array(object, path)
    }
}

/// An object whose keys are all indices into an array; every index below the number
/// of members must be present.
fn to_array(mut object: Map<String, Value>, path: &str) -> Result<Value> {
    let len = object.len();
    let mut elements = Vec::with_capacity(len);
    for i in 0..len {
        let element = object
            .remove(&i.to_string())
            .ok_or_else(|| KeyvalError::MissingIndex(join(path, &i.to_string())))?;
        elements.push(element);
    }
    Ok(Value::Array(elements))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(s: &str, implied: Option<&str>) -> Value {
        match parse(s, implied) {
            Ok(v) => v,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    fn err(s: &str, implied: Option<&str>) -> String {
        match parse(s, implied) {
            Ok(v) => panic!("{s}: expected an error, got {v}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn deep_keys_are_refused_not_overflowing_the_stack() {
        let key = |depth: usize| vec!["a"; depth].join(".");
        assert!(ok(&format!("{}=1", key(128)), None).is_object());
        let e = err(&format!("{}=1", key(129)), None);
        assert!(e.contains("nests more than 128 levels"), "{e}");
        // Found while fuzzing: 10,000 levels overflowed the stack.
        let e = err(&format!("{}=1", key(10_000)), None);
        assert!(e.contains("nests more than 128 levels"), "{e}");
    }

    #[test]
    fn simple() {
        assert_eq!(ok("", None), json!({}));
        assert_eq!(ok("a=1", None), json!({"a": "1"}));
        assert_eq!(ok("a=1,b=two", None), json!({"a": "1", "b": "two"}));
        assert_eq!(ok("a=1,", None), json!({"a": "1"}));
        assert_eq!(ok("a=", None), json!({"a": ""}));
        assert_eq!(ok("a-b_c=x=y", None), json!({"a-b_c": "x=y"}));
    }

    #[test]
    fn escaped_commas() {
        assert_eq!(ok("a=x,,y,b=2", None), json!({"a": "x,y", "b": "2"}));
        assert_eq!(ok("a=,,,,", None), json!({"a": ",,"}));
        assert_eq!(ok("a=1,,", None), json!({"a": "1,"}));
        assert_eq!(
            ok("filename=/a,,b.img", None),
            json!({"filename": "/a,b.img"})
        );
    }

    #[test]
    fn nesting() {
        assert_eq!(
            ok("cache.direct=on,cache.no-flush=off,x=1", None),
            json!({"cache": {"direct": "on", "no-flush": "off"}, "x": "1"})
        );
        assert_eq!(
            ok("file.driver=file,file.cache.direct=on", None),
            json!({"file": {"driver": "file", "cache": {"direct": "on"}}})
        );
    }

    #[test]
    fn arrays() {
        assert_eq!(
            ok("iothread.0=a,iothread.1=b", None),
            json!({"iothread": ["a", "b"]})
        );
        assert_eq!(
            ok("iothread.1=b,iothread.0=a", None),
            json!({"iothread": ["a", "b"]})
        );
        assert_eq!(
            ok("l.0.x=1,l.1.x=2,l.1.y=3", None),
            json!({"l": [{"x": "1"}, {"x": "2", "y": "3"}]})
        );
        assert_eq!(
            ok(
                "a.0.0=x,a.0.1=y,a.10=z,a.1=b,a.2=b,a.3=b,a.4=b,a.5=b,a.6=b,a.7=b,a.8=b,a.9=b",
                None
            )["a"][10],
            json!("z")
        );
        assert_eq!(ok("a.00=x", None), json!({"a": ["x"]}));
        assert_eq!(err("a.1=x", None), "Parameter 'a.0' missing");
        assert_eq!(err("a.0=x,a.2=y", None), "Parameter 'a.1' missing");
        assert_eq!(
            err("a.0=x,a.b=y", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(err("a.0=x,a.00=y", None), "Parameter 'a.0' is duplicate");
    }

    #[test]
    fn implied_key() {
        assert_eq!(
            ok("file,node-name=x", Some("driver")),
            json!({"driver": "file", "node-name": "x"})
        );
        assert_eq!(
            ok("iothread,id=io0", Some("qom-type")),
            json!({"qom-type": "iothread", "id": "io0"})
        );
        assert_eq!(ok("file", Some("driver")), json!({"driver": "file"}));
        assert_eq!(ok("driver=file", Some("driver")), json!({"driver": "file"}));
        // Only the first parameter may omit the key.
        assert_eq!(
            err("a=1,file", Some("driver")),
            "Expected '=' after parameter 'file'"
        );
        // The implied value ends at the first comma.
        assert_eq!(
            err("a,,b", Some("driver")),
            "Invalid parameter '': empty key fragment"
        );
        assert_eq!(
            err("file,driver=raw", Some("driver")),
            "Parameter 'driver' is duplicate"
        );
        assert_eq!(
            err("help", Some("driver")),
            "Help is not available for this option"
        );
    }

    #[test]
    fn errors() {
        assert_eq!(err("a", None), "Expected '=' after parameter 'a'");
        assert_eq!(err("a.b", None), "Expected '=' after parameter 'a.b'");
        assert_eq!(err("=1", None), "Invalid parameter '': empty key fragment");
        assert_eq!(
            err(",a=1", None),
            "Invalid parameter '': empty key fragment"
        );
        assert_eq!(
            err("a..b=1", None),
            "Invalid parameter 'a..b': empty key fragment"
        );
        assert_eq!(
            err("a.=1", None),
            "Invalid parameter 'a.': empty key fragment"
        );
        assert_eq!(err("a b=1", None), "Invalid parameter 'a b'");
        assert_eq!(err("0=1", None), "Invalid parameter '0'");
        assert_eq!(err("a.0b=1", None), "Invalid parameter 'a.0b'");
        assert_eq!(err("é=1", None), "Invalid parameter 'é'");
        let long = "k".repeat(128);
        assert_eq!(
            err(&format!("{long}=1"), None),
            format!("Parameter '{long}' is too long")
        );
        assert_eq!(err("a=1,a=2", None), "Parameter 'a' is duplicate");
        assert_eq!(err("a.b=1,a.b=2", None), "Parameter 'a.b' is duplicate");
        assert_eq!(
            err("a=1,a.b=2", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            err("a.b=2,a=1", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            err("a.b.c=2,a.b=1", None),
            "Parameters 'a.b.*' used inconsistently"
        );
    }

    #[test]
    fn json_or_keyval() {
        assert_eq!(
            parse_option("{\"driver\": \"file\", \"size\": 5}", Some("driver")).unwrap(),
            json!({"driver": "file", "size": 5})
        );
        assert_eq!(
            parse_option("file,size=5", Some("driver")).unwrap(),
            json!({"driver": "file", "size": "5"})
        );
        assert!(matches!(
            parse_option("{\"driver\":", None),
            Err(KeyvalError::Json(_))
        ));
        assert_eq!(parse_option("{} ", None).unwrap(), json!({}));
        assert_eq!(
            parse_option("[1]", None).unwrap_err().to_string(),
            "Invalid parameter '[1]'"
        );
    }
}

//! QOM as vubd has it: the object tree QEMU's `qom-*` commands walk, with the
//! paths (`/objects/ID`), types, properties and error texts of QEMU 7.2.
//!
//! The tree is the root container with `objects` (the user-created objects:
//! iothreads, throttle groups, secrets and TLS credentials) and `chardevs`.
//! Properties read and write the live objects: an iothread's polling parameters
//! reach its event loop at its next pass, and a throttle group's new `limits` apply
//! to its nodes' requests at once. A secret's properties are the options it was
//! added with; as in QEMU, setting them later changes nothing but what they read.

use super::{Control, OpResult};
use crate::control::error::{ControlError, ErrorKind};
use crate::iothread::IoThread;
use blocklayer::options::coerce::Fields;
use blocklayer::throttle::{config::limit_names, ThrottleGroup};
use blocklayer::tls::TlsCreds;
use serde_json::{json, Value};
use std::sync::Arc;

/// A QOM type vubd has, with its own properties (name, type).
struct QomType {
    name: &'static str,
    parent: Option<&'static str>,
    is_abstract: bool,
    interfaces: &'static [&'static str],
    props: fn() -> Vec<(String, &'static str)>,
}

fn ints(names: &[&str]) -> Vec<(String, &'static str)> {
    names.iter().map(|n| (n.to_string(), "int")).collect()
}

/// The types, parents before children.
static TYPES: &[QomType] = &[
    QomType {
        name: "object",
        parent: None,
        is_abstract: true,
        interfaces: &[],
        props: || vec![("type".into(), "string")],
    },
    QomType {
        name: "user-creatable",
        parent: Some("interface"),
        is_abstract: true,
        interfaces: &[],
        props: Vec::new,
    },
    QomType {
        name: "container",
        parent: Some("object"),
        is_abstract: false,
        interfaces: &[],
        props: Vec::new,
    },
    QomType {
        name: "event-loop-base",
        parent: Some("object"),
        is_abstract: true,
        interfaces: &["user-creatable"],
        props: || ints(&["thread-pool-min", "aio-max-batch", "thread-pool-max"]),
    },
    QomType {
        name: "iothread",
        parent: Some("event-loop-base"),
        is_abstract: false,
        interfaces: &[],
        props: || ints(&["poll-max-ns", "poll-grow", "poll-shrink"]),
    },
    QomType {
        name: "throttle-group",
        parent: Some("object"),
        is_abstract: false,
        interfaces: &["user-creatable"],
        props: || {
            let mut v = vec![("limits".to_string(), "ThrottleLimits")];
            v.extend(limit_names().map(|n| (format!("x-{n}"), "int")));
            v
        },
    },
    QomType {
        name: "secret_common",
        parent: Some("object"),
        is_abstract: true,
        interfaces: &["user-creatable"],
        props: || {
            vec![
                ("loaded".into(), "bool"),
                ("format".into(), "QCryptoSecretFormat"),
                ("keyid".into(), "string"),
                ("iv".into(), "string"),
            ]
        },
    },
    QomType {
        name: "secret",
        parent: Some("secret_common"),
        is_abstract: false,
        interfaces: &[],
        props: || vec![("data".into(), "string"), ("file".into(), "string")],
    },
    QomType {
        name: "tls-creds",
        parent: Some("object"),
        is_abstract: true,
        interfaces: &["user-creatable"],
        props: || {
            vec![
                ("endpoint".into(), "QCryptoTLSCredsEndpoint"),
                ("dir".into(), "string"),
                ("verify-peer".into(), "bool"),
                ("priority".into(), "string"),
            ]
        },
    },
    QomType {
        name: "tls-creds-x509",
        parent: Some("tls-creds"),
        is_abstract: false,
        interfaces: &[],
        props: || {
            vec![
                ("sanity-check".into(), "bool"),
                ("passwordid".into(), "string"),
                ("loaded".into(), "bool"),
            ]
        },
    },
];

fn find_type(name: &str) -> Option<&'static QomType> {
    TYPES.iter().find(|t| t.name == name)
}

/// `t` and its ancestors, the root first.
fn lineage(t: &'static QomType) -> Vec<&'static QomType> {
    let mut v = vec![t];
    while let Some(p) = v.last().and_then(|t| t.parent).and_then(find_type) {
        v.push(p);
    }
    v.reverse();
    v
}

fn implements(t: &'static QomType, what: &str) -> bool {
    lineage(t)
        .iter()
        .any(|a| a.name == what || a.interfaces.contains(&what))
}

/// Every property of the type `name`, inherited ones first.
fn type_props(t: &'static QomType) -> Vec<(String, &'static str)> {
    lineage(t).iter().flat_map(|a| (a.props)()).collect()
}

fn prop_list(props: Vec<(String, String)>) -> Value {
    Value::Array(
        props
            .into_iter()
            .map(|(n, t)| json!({"name": n, "type": t}))
            .collect(),
    )
}

/// An object of the tree.
#[derive(Clone)]
enum Obj {
    Root,
    Container,
    IoThread(Arc<IoThread>),
    ThrottleGroup(Arc<ThrottleGroup>),
    /// A secret, by id (its properties live in the graph's secrets).
    Secret(String),
    TlsCreds(Arc<TlsCreds>),
}

impl Obj {
    fn type_name(&self) -> &'static str {
        match self {
            Obj::Root | Obj::Container => "container",
            Obj::IoThread(_) => "iothread",
            Obj::ThrottleGroup(_) => "throttle-group",
            Obj::Secret(_) => "secret",
            Obj::TlsCreds(_) => "tls-creds-x509",
        }
    }
}

fn not_found(prop: &str, t: &str) -> ControlError {
    ControlError::generic(format!("Property '{t}.{prop}' not found"))
}

fn int_value(prop: &str, v: &Value) -> OpResult<i64> {
    v.as_i64().ok_or_else(|| {
        ControlError::generic(format!(
            "Invalid parameter type for '{prop}', expected: integer"
        ))
    })
}

impl Control {
    /// The objects of the tree with their absolute paths.
    fn qom_objects(&self) -> Vec<(String, Obj)> {
        let mut v = vec![
            ("/".to_string(), Obj::Root),
            ("/objects".to_string(), Obj::Container),
            ("/chardevs".to_string(), Obj::Container),
        ];
        for (id, t) in self.iothreads.iter().filter(|(_, t)| t.is_object) {
            v.push((format!("/objects/{id}"), Obj::IoThread(t.clone())));
        }
        for (id, g) in &self.graph.throttle_groups {
            v.push((format!("/objects/{id}"), Obj::ThrottleGroup(g.clone())));
        }
        for id in self.graph.secrets().ids() {
            v.push((format!("/objects/{id}"), Obj::Secret(id)));
        }
        for c in self.graph.tls_creds().all() {
            v.push((format!("/objects/{}", c.opts.id), Obj::TlsCreds(c)));
        }
        v
    }

    /// The children of `path` (an object's child properties), by name.
    fn qom_children(&self, path: &str) -> Vec<(String, String)> {
        let prefix = if path == "/" {
            "/".to_string()
        } else {
            format!("{path}/")
        };
        self.qom_objects()
            .into_iter()
            .filter_map(|(p, o)| {
                let name = p.strip_prefix(&prefix)?;
                (!name.is_empty() && !name.contains('/'))
                    .then(|| (name.to_string(), format!("child<{}>", o.type_name())))
            })
            .collect()
    }

    /// Resolves a QOM path: absolute (`/objects/io0`) or partial (`io0`: the one
    /// object whose path ends so), with QEMU's errors.
    fn qom_resolve(&self, path: &str) -> OpResult<(String, Obj)> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let objects = self.qom_objects();
        let comps = |p: &str| -> Vec<String> {
            p.split('/')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect()
        };
        let mut found = objects.into_iter().filter(|(p, _)| {
            let c = comps(p);
            if path.starts_with('/') {
                c == parts
            } else {
                c.len() >= parts.len() && c[c.len() - parts.len()..] == parts[..]
            }
        });
        let first = found.next();
        if first.is_some() && found.next().is_some() {
            return Err(ControlError::generic(format!("Path '{path}' is ambiguous")));
        }
        first.ok_or_else(|| {
            ControlError::new(
                ErrorKind::DeviceNotFound,
                format!("Device '{path}' not found"),
            )
        })
    }

    /// `qom-list`.
    pub fn qom_list(&self, path: &str) -> OpResult<Value> {
        let (abs, obj) = self.qom_resolve(path)?;
        let t = find_type(obj.type_name()).expect("every object's type is in the table");
        let mut props: Vec<(String, String)> = type_props(t)
            .into_iter()
            .map(|(n, t)| (n, t.to_string()))
            .collect();
        props.extend(self.qom_children(&abs));
        Ok(prop_list(props))
    }

    /// `qom-get`.
    pub fn qom_get(&self, path: &str, prop: &str) -> OpResult<Value> {
        let (abs, obj) = self.qom_resolve(path)?;
        let t = obj.type_name();
        if prop == "type" {
            return Ok(json!(t));
        }
        match &obj {
            Obj::Root | Obj::Container => {
                if self.qom_children(&abs).iter().any(|(n, _)| n == prop) {
                    let base = if abs == "/" { "" } else { abs.as_str() };
                    return Ok(json!(format!("{base}/{prop}")));
                }
                Err(not_found(prop, t))
            }
            Obj::IoThread(io) => io
                .property(prop)
                .map(Value::from)
                .ok_or_else(|| not_found(prop, t)),
            Obj::ThrottleGroup(g) => {
                let c = g.config();
                if prop == "limits" {
                    return Ok(c.to_limits());
                }
                c.get_legacy(prop)
                    .map(Value::from)
                    .ok_or_else(|| not_found(prop, t))
            }
            Obj::Secret(id) => self
                .graph
                .secrets()
                .property(id, prop)
                .ok_or_else(|| not_found(prop, t)),
            Obj::TlsCreds(c) => tls_creds_property(c, prop).ok_or_else(|| not_found(prop, t)),
        }
    }

    /// `qom-set`.
    pub fn qom_set(&self, path: &str, prop: &str, value: &Value) -> OpResult<()> {
        let (abs, obj) = self.qom_resolve(path)?;
        let t = obj.type_name();
        let not_writable =
            || ControlError::generic(format!("Property '{t}.{prop}' is not writable"));
        if prop == "type" {
            return Err(not_writable());
        }
        match &obj {
            Obj::Root | Obj::Container => {
                if self.qom_children(&abs).iter().any(|(n, _)| n == prop) {
                    return Err(not_writable());
                }
                Err(not_found(prop, t))
            }
            Obj::IoThread(io) => {
                if io.property(prop).is_none() {
                    return Err(not_found(prop, t));
                }
                io.set_property(prop, int_value(prop, value)?)
                    .map_err(ControlError::generic)
            }
            Obj::ThrottleGroup(g) => {
                if prop == "limits" {
                    let mut c = g.config();
                    c.apply_limits(&parse_limits(value)?)
                        .map_err(ControlError::generic)?;
                    g.set_config(c);
                    return Ok(());
                }
                if g.config().get_legacy(prop).is_some() {
                    // QEMU takes the limits in one piece once the group exists.
                    return Err(ControlError::generic(
                        "Property cannot be set after initialization",
                    ));
                }
                Err(not_found(prop, t))
            }
            Obj::Secret(id) => {
                let secrets = self.graph.secrets();
                match secrets.property(id, prop) {
                    None => Err(not_found(prop, t)),
                    Some(_) if prop == "loaded" => Err(not_writable()),
                    Some(_) => {
                        let value = value.as_str().ok_or_else(|| {
                            ControlError::generic(format!(
                                "Invalid parameter type for '{prop}', expected: string"
                            ))
                        })?;
                        secrets
                            .set_property(id, prop, value)
                            .map_err(|e| ControlError::generic(e.to_string()))
                    }
                }
            }
            Obj::TlsCreds(c) => match tls_creds_property(c, prop) {
                // Loaded when added: later values would not apply.
                Some(_) => Err(ControlError::generic(
                    "Property cannot be set after initialization",
                )),
                None => Err(not_found(prop, t)),
            },
        }
    }

    /// `qom-list-types`.
    pub fn qom_list_types(&self, implements_: Option<&str>, with_abstract: bool) -> Value {
        let list = TYPES
            .iter()
            .filter(|t| t.parent != Some("interface") || with_abstract)
            .filter(|t| with_abstract || !t.is_abstract)
            .filter(|t| implements_.is_none_or(|i| implements(t, i)))
            .map(|t| {
                let mut m = serde_json::Map::new();
                m.insert("name".into(), json!(t.name));
                if t.is_abstract {
                    m.insert("abstract".into(), json!(true));
                }
                if let Some(p) = t.parent {
                    m.insert("parent".into(), json!(p));
                }
                Value::Object(m)
            })
            .collect();
        Value::Array(list)
    }

    /// `qom-list-properties`.
    pub fn qom_list_properties(&self, typename: &str) -> OpResult<Value> {
        let t = find_type(typename).ok_or_else(|| {
            ControlError::new(
                ErrorKind::DeviceNotFound,
                format!("Class '{typename}' not found"),
            )
        })?;
        Ok(prop_list(
            type_props(t)
                .into_iter()
                .map(|(n, t)| (n, t.to_string()))
                .collect(),
        ))
    }
}

/// A property of TLS credentials (QEMU's values: empty strings for unset ones).
fn tls_creds_property(c: &TlsCreds, prop: &str) -> Option<Value> {
    let o = &c.opts;
    let dir = o.dir.as_ref().map(|d| d.display().to_string());
    Some(match prop {
        "endpoint" => json!(o.endpoint.name()),
        "dir" => json!(dir.unwrap_or_default()),
        "verify-peer" => json!(o.verify_peer),
        "priority" => json!(o.priority.clone().unwrap_or_default()),
        "sanity-check" => json!(o.sanity_check),
        "passwordid" => json!(""),
        "loaded" => json!(true),
        _ => return None,
    })
}

/// A `ThrottleLimits` value, read as QEMU's input visitor reads it.
fn parse_limits(value: &Value) -> OpResult<Vec<(String, i64)>> {
    if !value.is_object() {
        return Err(ControlError::generic(
            "Invalid parameter type for 'limits', expected: object",
        ));
    }
    let generic = ControlError::from_source;
    let mut f = Fields::new_strict(value, "limits").map_err(generic)?;
    let mut out = Vec::new();
    for name in limit_names() {
        if let Some(v) = f.int(name).map_err(generic)? {
            out.push((name.to_string(), v));
        }
    }
    f.finish().map_err(generic)?;
    Ok(out)
}

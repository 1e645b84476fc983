//! The options of `rbd` (QEMU's `BlockdevOptionsRbd`), which `blockdev-create` takes
//! as its `location` too.

use super::RbdDriver;
use crate::driver::Driver;
use crate::drivers::OpenCtx;
use crate::options::coerce::Fields;
use crate::options::{choice_name, CommonOptions, DriverOptions, OptionsError, Result};
use serde_json::{json, Map, Value};

/// `RbdAuthMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Cephx,
    None,
}

const AUTH_CHOICES: &[(&str, AuthMode)] = &[("cephx", AuthMode::Cephx), ("none", AuthMode::None)];

/// QEMU's `BlockdevOptionsRbd` (without `encrypt`, which vubd refuses).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RbdLocation {
    pub pool: String,
    pub namespace: Option<String>,
    pub image: String,
    pub conf: Option<String>,
    /// Opens the image at this snapshot, read-only.
    pub snapshot: Option<String>,
    pub user: Option<String>,
    pub auth_client_required: Option<Vec<AuthMode>>,
    /// The id of a `secret` object holding the key.
    pub key_secret: Option<String>,
    /// Monitors to contact instead of the configuration's (`host`, `port`).
    pub server: Vec<(String, String)>,
}

/// The elements of the list `key`, each as `Fields` or a plain value.
fn list(f: &mut Fields, key: &str) -> Result<Option<Vec<Value>>> {
    match f.take(key) {
        None => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(_) => Err(OptionsError::Type {
            name: f.name(key),
            expected: "array",
        }),
    }
}

impl RbdLocation {
    pub(super) fn take_from(f: &mut Fields) -> Result<Self> {
        let pool = f.required_string("pool")?;
        let image = f.required_string("image")?;
        let mut loc = RbdLocation {
            pool,
            namespace: f.string("namespace")?,
            image,
            conf: f.string("conf")?,
            snapshot: f.string("snapshot")?,
            user: f.string("user")?,
            key_secret: f.string("key-secret")?,
            ..Default::default()
        };
        if let Some(items) = list(f, "auth-client-required")? {
            let name = f.name("auth-client-required");
            let mut modes = Vec::new();
            for (i, v) in items.iter().enumerate() {
                modes.push(crate::options::coerce::to_enum(
                    &format!("{name}[{i}]"),
                    v,
                    AUTH_CHOICES,
                )?);
            }
            loc.auth_client_required = Some(modes);
        }
        if let Some(items) = list(f, "server")? {
            let name = f.name("server");
            for (i, v) in items.iter().enumerate() {
                let mut s = f.nested(v, &format!("{name}[{i}]"))?;
                let host = s.required_string("host")?;
                let port = s.required_string("port")?;
                s.finish()?;
                loc.server.push((host, port));
            }
        }
        if f.contains("encrypt") {
            return Err(OptionsError::BadValue {
                name: f.name("encrypt"),
                reason: "RBD image encryption is not supported by vubd".into(),
            });
        }
        Ok(loc)
    }

    pub(super) fn write_json(&self, m: &mut Map<String, Value>) {
        m.insert("pool".into(), json!(self.pool));
        if let Some(ns) = &self.namespace {
            m.insert("namespace".into(), json!(ns));
        }
        m.insert("image".into(), json!(self.image));
        for (key, v) in [
            ("conf", &self.conf),
            ("snapshot", &self.snapshot),
            ("user", &self.user),
            ("key-secret", &self.key_secret),
        ] {
            if let Some(v) = v {
                m.insert(key.into(), json!(v));
            }
        }
        if let Some(modes) = &self.auth_client_required {
            let names: Vec<&str> = modes
                .iter()
                .map(|m| choice_name(AUTH_CHOICES, *m))
                .collect();
            m.insert("auth-client-required".into(), json!(names));
        }
        if !self.server.is_empty() {
            let list: Vec<Value> = self
                .server
                .iter()
                .map(|(h, p)| json!({"host": h, "port": p}))
                .collect();
            m.insert("server".into(), Value::Array(list));
        }
    }
}

/// The node options of `rbd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdOptions {
    pub location: RbdLocation,
}

impl DriverOptions for RbdOptions {
    fn driver_name(&self) -> &'static str {
        "rbd"
    }

    fn write_json(&self, m: &mut Map<String, Value>) {
        self.location.write_json(m);
    }

    fn open(&self, ctx: &mut OpenCtx<'_>) -> crate::Result<Box<dyn Driver>> {
        Ok(Box::new(RbdDriver::open(
            &self.location,
            ctx.common,
            ctx.secrets(),
        )?))
    }
}

/// The table's parse function of `rbd`.
pub(super) fn parse(
    f: &mut Fields,
    _common: &CommonOptions,
    _name: &'static str,
) -> Result<Box<dyn DriverOptions>> {
    Ok(Box::new(RbdOptions {
        location: RbdLocation::take_from(f)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::BlockdevOptions;

    #[test]
    fn keyval_and_json_forms_agree() {
        let keyval = json!({"driver": "rbd", "node-name": "r", "pool": "rbd", "image": "i",
            "namespace": "ns", "conf": "/etc/ceph/ceph.conf", "user": "admin",
            "auth-client-required": ["cephx", "none"],
            "server": [{"host": "127.0.0.1", "port": "6789"}]});
        let a = BlockdevOptions::from_json(&keyval).unwrap();
        let o = a.driver.downcast_ref::<RbdOptions>().unwrap();
        assert_eq!(o.location.server, vec![("127.0.0.1".into(), "6789".into())]);
        assert_eq!(
            o.location.auth_client_required,
            Some(vec![AuthMode::Cephx, AuthMode::None])
        );
        assert_eq!(BlockdevOptions::from_json(&a.to_json()).unwrap(), a);
    }

    #[test]
    fn pool_and_image_are_required() {
        let e = BlockdevOptions::from_json(&json!({"driver": "rbd", "node-name": "r",
            "image": "i"}))
        .unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'pool' is missing");
    }
}

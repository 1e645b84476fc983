//! A connection to a Ceph cluster and an I/O context on one pool (and namespace), set
//! up as QEMU's `qemu_rbd_connect` does, with its error texts.

use super::ffi::{self, IoCtx, Lib, Rados};
use super::options::{AuthMode, RbdLocation};
use crate::error::{strerror, BlockError, Result};
use crate::secret::Secrets;
use std::ffi::CString;

/// A connected cluster handle and an I/O context; dropping it disconnects.
pub struct Conn {
    pub lib: &'static Lib,
    pub rados: Rados,
    pub ioctx: IoCtx,
}

// SAFETY: librados handles may be used from any thread (librados is thread-safe); the
// handles are only destroyed in Drop, when nobody else holds them.
unsafe impl Send for Conn {}
// SAFETY: as above; every librados/librbd call taking them is thread-safe.
unsafe impl Sync for Conn {}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: both handles were created by `connect` and are destroyed once.
        unsafe {
            (self.lib.rados_ioctx_destroy)(self.ioctx);
            (self.lib.rados_shutdown)(self.rados);
        }
    }
}

fn graph_err(msg: String) -> BlockError {
    BlockError::Graph(msg)
}

/// `text: <strerror(-r)>` (QEMU's `error_setg_errno`).
fn errno_err(text: String, r: i32) -> BlockError {
    graph_err(format!("{text}: {}", strerror(-r)))
}

/// A C string of an option; option strings with NUL bytes are refused.
pub fn cstr(name: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| graph_err(format!("Parameter '{name}' contains a NUL byte")))
}

/// Connects to the cluster `loc` names and opens its pool and namespace. `cache`:
/// librbd's write-back cache (off with `cache.direct=on`, as in QEMU).
/// `secrets` resolves `key-secret`.
pub fn connect(loc: &RbdLocation, cache: bool, secrets: &Secrets) -> Result<Conn> {
    let lib = ffi::lib().map_err(graph_err)?;
    // librados takes the key as base64 text (its `key` option), as QEMU passes it.
    let key = match &loc.key_secret {
        Some(id) => Some(
            secrets
                .lookup(id)
                .map(|k| crate::secret::base64_encode(&k))
                .map_err(|e| graph_err(e.to_string()))?,
        ),
        None => None,
    };
    let user = loc.user.as_deref().map(|u| cstr("user", u)).transpose()?;
    let conf = loc.conf.as_deref().map(|c| cstr("conf", c)).transpose()?;
    let pool = cstr("pool", &loc.pool)?;
    let mut rados: Rados = std::ptr::null_mut();
    // SAFETY: out-pointer to a local; the id is NUL-terminated or NULL (the default).
    let r = unsafe {
        (lib.rados_create)(
            &mut rados,
            user.as_ref().map_or(std::ptr::null(), |u| u.as_ptr()),
        )
    };
    if r < 0 {
        return Err(errno_err("error initializing".into(), r));
    }
    // From here on the handle is shut down on every error path.
    let shutdown = |e: BlockError| {
        // SAFETY: `rados` was created above and is not used afterwards.
        unsafe { (lib.rados_shutdown)(rados) };
        e
    };
    // SAFETY: `rados` is a live handle; the path is NUL-terminated or NULL (Ceph's
    // default locations, whose absence is no error).
    let r = unsafe {
        (lib.rados_conf_read_file)(
            rados,
            conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        )
    };
    if r < 0 {
        if let Some(c) = &loc.conf {
            return Err(shutdown(errno_err(
                format!("error reading conf file {c}"),
                r,
            )));
        }
    }
    let set = |key: &str, value: &str| -> std::result::Result<(), i32> {
        let (k, v) = (
            CString::new(key).unwrap_or_default(),
            CString::new(value).unwrap_or_default(),
        );
        // SAFETY: `rados` is live; both strings are NUL-terminated.
        let r = unsafe { (lib.rados_conf_set)(rados, k.as_ptr(), v.as_ptr()) };
        if r < 0 {
            Err(r)
        } else {
            Ok(())
        }
    };
    if let Some(key) = &key {
        if let Err(r) = set("key", key) {
            return Err(shutdown(errno_err("Could not set 'key'".into(), r)));
        }
    }
    if !loc.server.is_empty() {
        let hosts: Vec<String> = loc
            .server
            .iter()
            .map(|(h, p)| {
                if h.contains(':') {
                    format!("[{h}]:{p}")
                } else {
                    format!("{h}:{p}")
                }
            })
            .collect();
        if let Err(r) = set("mon_host", &hosts.join(";")) {
            return Err(shutdown(errno_err("error setting mon_host".into(), r)));
        }
    }
    if let Some(modes) = &loc.auth_client_required {
        let list: Vec<&str> = modes
            .iter()
            .map(|m| match m {
                AuthMode::Cephx => "cephx",
                AuthMode::None => "none",
            })
            .collect();
        if let Err(r) = set("auth_client_required", &list.join(";")) {
            return Err(shutdown(errno_err(
                "Could not set 'auth_client_required'".into(),
                r,
            )));
        }
    }
    // As QEMU: only the option's absence (an old librbd) can fail; ignored.
    let _ = set("rbd_cache", if cache { "true" } else { "false" });
    // SAFETY: `rados` is a live, configured handle.
    let r = unsafe { (lib.rados_connect)(rados) };
    if r < 0 {
        return Err(shutdown(errno_err("error connecting".into(), r)));
    }
    let mut ioctx: IoCtx = std::ptr::null_mut();
    // SAFETY: connected handle, NUL-terminated pool name, out-pointer to a local.
    let r = unsafe { (lib.rados_ioctx_create)(rados, pool.as_ptr(), &mut ioctx) };
    if r < 0 {
        return Err(shutdown(errno_err(
            format!("error opening pool {}", loc.pool),
            r,
        )));
    }
    let conn = Conn { lib, rados, ioctx };
    if let Some(ns) = loc.namespace.as_deref().filter(|n| !n.is_empty()) {
        let c = cstr("namespace", ns)?;
        let mut exists = false;
        // SAFETY: live ioctx, NUL-terminated name, out-pointer to a local.
        let r = unsafe { (lib.rbd_namespace_exists)(conn.ioctx, c.as_ptr(), &mut exists) };
        if r < 0 {
            return Err(errno_err("error checking namespace".into(), r));
        }
        if !exists {
            return Err(graph_err(format!("namespace '{ns}' does not exist")));
        }
        // SAFETY: live ioctx; librados copies the name.
        unsafe { (lib.rados_ioctx_set_namespace)(conn.ioctx, c.as_ptr()) };
    }
    Ok(conn)
}

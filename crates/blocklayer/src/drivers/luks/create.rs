//! Creating LUKS volumes: `blockdev-create` with `driver: luks` (QEMU's
//! `BlockdevCreateOptionsLUKS`) formats an existing node; `vubd img create -f luks`
//! goes through [`create`] too.

use super::crypto::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
use super::header::Algorithms;
use super::volume::{self, CreateParams};
use crate::aio::iovec::{AlignedBuf, IoVec};
use crate::drivers::CreateWork;
use crate::error::{BlockError, Result};
use crate::graph::Graph;
use crate::node::Node;
use crate::options::coerce::Fields;
use crate::secret::Secrets;
use std::sync::Arc;

/// QEMU's default `iter-time` (ms).
pub const DEFAULT_ITER_TIME: u64 = 2000;

/// The creation options QEMU's `QCryptoBlockCreateOptionsLUKS` has.
#[derive(Debug, Clone)]
pub struct LuksCreateOptions {
    pub key_secret: Option<String>,
    pub algs: Algorithms,
    pub iter_time: u64,
}

impl LuksCreateOptions {
    /// Takes the options from `f` (`blockdev-create` arguments or `-o` options).
    pub fn take_from(f: &mut Fields) -> crate::options::Result<Self> {
        let mut algs = volume::default_algorithms();
        let key_secret = f.string("key-secret")?;
        if let Some(c) = f.string("cipher-alg")? {
            algs.cipher = CipherAlg::from_name(&c).ok_or_else(|| unsupported("cipher-alg", &c))?;
        }
        if let Some(m) = f.string("cipher-mode")? {
            algs.mode = CipherMode::from_name(&m)
                .filter(|m| matches!(m, CipherMode::Xts | CipherMode::Cbc))
                .ok_or_else(|| unsupported("cipher-mode", &m))?;
        }
        if let Some(g) = f.string("ivgen-alg")? {
            algs.ivgen = IvGenAlg::from_name(&g).ok_or_else(|| unsupported("ivgen-alg", &g))?;
        }
        if let Some(h) = f.string("ivgen-hash-alg")? {
            algs.ivgen_hash =
                Some(HashAlg::from_name(&h).ok_or_else(|| unsupported("ivgen-hash-alg", &h))?);
        }
        if let Some(h) = f.string("hash-alg")? {
            algs.hash = HashAlg::from_name(&h).ok_or_else(|| unsupported("hash-alg", &h))?;
        }
        let iter_time = f.uint("iter-time")?.unwrap_or(DEFAULT_ITER_TIME);
        Ok(LuksCreateOptions {
            key_secret,
            algs,
            iter_time,
        })
    }

    /// The passphrase and parameters, checked as QEMU checks them.
    pub fn params(&self, secrets: &Secrets) -> Result<CreateParams> {
        let Some(id) = &self.key_secret else {
            return Err(BlockError::Graph(
                "Parameter 'key-secret' is required for cipher".into(),
            ));
        };
        let password = secrets
            .lookup_utf8(id)
            .map_err(|e| BlockError::Graph(e.to_string()))?;
        let algs = self.algs;
        if algs.ivgen == IvGenAlg::Essiv {
            let h = algs.ivgen_hash.ok_or_else(|| {
                BlockError::Graph("Missing IV generator hash specification".into())
            })?;
            if CipherAlg::aes_for_key(h.digest_len()).is_none() {
                return Err(BlockError::Graph(format!(
                    "No AES cipher with key size {} available",
                    h.digest_len()
                )));
            }
        }
        Ok(CreateParams {
            algs,
            password: password.into_bytes(),
            iter_time_ms: self.iter_time,
        })
    }
}

fn unsupported(name: &str, value: &str) -> crate::options::OptionsError {
    crate::options::OptionsError::BadEnum {
        name: name.into(),
        value: value.into(),
    }
}

/// Formats `file` as a LUKS volume of `size` bytes of data.
pub fn create(file: Arc<Node>, size: u64, params: &CreateParams) -> Result<()> {
    if file.is_read_only() {
        return Err(BlockError::ReadOnly(file.name().to_string()));
    }
    let (bytes, v) = volume::format(params).map_err(|e| BlockError::Graph(e.to_string()))?;
    let end = v
        .header
        .payload_bytes()
        .checked_add(size)
        .ok_or_else(|| BlockError::Graph("Image size too large".into()))?;
    file.resize(end)?;
    let mut buf = AlignedBuf::try_zeroed(bytes.len(), 4096).ok_or_else(|| {
        BlockError::io(
            "luks create",
            std::io::Error::from_raw_os_error(libc::ENOMEM),
        )
    })?;
    buf.as_mut_slice().copy_from_slice(&bytes);
    let iov = IoVec::from_buf(Arc::new(buf));
    crate::aio::uring::block_on(async move {
        file.write(0, iov, false).await?;
        file.flush().await
    })
}

/// `blockdev-create` with `driver: luks`: `file` names an existing node.
pub(super) fn blockdev_create(mut f: Fields, graph: &Graph) -> Result<CreateWork> {
    let file = f.required_string("file").map_err(|_| {
        BlockError::Graph(
            "Parameter 'options.file' must name an existing node (inline definitions are \
             not supported by vubd)"
                .into(),
        )
    })?;
    let size = f.unsigned("size")?;
    let size = f.required("size", size)?;
    if let Some(p) = f.string("preallocation")? {
        if p != "off" {
            return Err(BlockError::Graph(format!(
                "Parameter 'preallocation={p}' is not supported by vubd for luks"
            )));
        }
    }
    let opts = LuksCreateOptions::take_from(&mut f)?;
    f.finish()?;
    let params = opts.params(graph.secrets())?;
    let node = graph.lookup(&file)?;
    Ok(Box::new(move || create(node, size, &params)))
}

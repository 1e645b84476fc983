//! Secret objects (QEMU's `secret`): passphrases and keys that drivers name by id
//! (`key-secret` of `luks`, later `rbd`). A secret is loaded once, when it is added
//! (from `data` or `file`, base64-decoded with `format=base64`, decrypted with
//! AES-256-CBC when `keyid` names the secret holding the key), and looked up by
//! drivers as bytes or UTF-8 text with QEMU's error texts.

use crate::options;
use crate::options::coerce::Fields;
use aes::cipher::{BlockModeDecrypt, KeyIvInit};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Why a secret cannot be loaded or looked up; the texts are QEMU's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("Either 'file' or 'data' must be provided")]
    NoSource,
    #[error("'file' and 'data' are mutually exclusive")]
    BothSources,
    #[error("Unable to read {path}: Failed to open file “{path}”: {reason}")]
    Read { path: String, reason: String },
    #[error("Base64 data contains invalid characters")]
    Base64,
    #[error("No secret with id '{0}'")]
    NotFound(String),
    #[error("Secret with id '{0}' has no data")]
    NoData(String),
    #[error("Data from secret {0} is not valid UTF-8")]
    NotUtf8(String),
    #[error("Key should be 32 bytes in length")]
    KeyLength,
    #[error("IV is required to decrypt secret")]
    NoIv,
    #[error("IV should be 16 bytes in length not {0}")]
    IvLength(usize),
    #[error("Length {0} must be a multiple of block size 16")]
    BlockSize(usize),
    #[error("Incorrect number of padding bytes ({0}) found on decrypted data")]
    Padding(u8),
}

pub type Result<T> = std::result::Result<T, SecretError>;

/// `format`: how `data` or the file's bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecretFormat {
    #[default]
    Raw,
    Base64,
}

/// The options of `--object secret,...` / `object-add qom-type=secret` (without
/// `qom-type` and `id`, which the object layer takes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretOptions {
    pub id: String,
    pub data: Option<String>,
    pub file: Option<PathBuf>,
    pub format: SecretFormat,
    /// The id of the secret holding the AES-256 key `data` is encrypted with.
    pub keyid: Option<String>,
    /// The base64 CBC initialisation vector of an encrypted secret.
    pub iv: Option<String>,
}

impl SecretOptions {
    /// Takes the secret's own options from `f`; `id` was taken already.
    pub fn take_from(f: &mut Fields, id: String) -> options::Result<Self> {
        let format = f
            .enumeration(
                "format",
                &[("raw", SecretFormat::Raw), ("base64", SecretFormat::Base64)],
            )?
            .unwrap_or_default();
        Ok(SecretOptions {
            id,
            data: f.string("data")?,
            file: f.string("file")?.map(PathBuf::from),
            format,
            keyid: f.string("keyid")?,
            iv: f.string("iv")?,
        })
    }
}

/// A secret's bytes; zeroed when the last user drops them.
struct SecretData(Vec<u8>);

impl Drop for SecretData {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference into the vector; a
            // volatile write keeps the compiler from eliding the wipe of dead memory.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl SecretFormat {
    pub fn name(self) -> &'static str {
        match self {
            SecretFormat::Raw => "raw",
            SecretFormat::Base64 => "base64",
        }
    }
}

/// A loaded secret: its bytes, and the options it was added with (its QOM
/// properties; `data` is wiped when the secret goes).
struct Entry {
    data: Arc<SecretData>,
    props: SecretOptions,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(d) = self.props.data.take() {
            drop(SecretData(d.into_bytes()));
        }
    }
}

/// The QOM properties of a `secret` (QEMU's `secret_common` and `secret`), with
/// QEMU's values for unset ones (empty strings).
pub const PROPERTIES: &[&str] = &["loaded", "format", "keyid", "iv", "data", "file"];

/// The loaded secrets, by id. Cheap to clone (all clones share the table); the object
/// layer adds and removes, drivers look up.
#[derive(Clone, Default)]
pub struct Secrets {
    map: Arc<Mutex<HashMap<String, Entry>>>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("ids", &self.lock().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Secrets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads the secret `opts` describes and adds it (the caller has checked that its id
    /// is not taken by any object).
    pub fn add(&self, opts: &SecretOptions) -> Result<()> {
        let data = self.load(opts)?;
        let entry = Entry {
            data: Arc::new(SecretData(data)),
            props: opts.clone(),
        };
        self.lock().insert(opts.id.clone(), entry);
        Ok(())
    }

    /// The ids of the secrets.
    pub fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// QOM property `prop` of secret `id` (QEMU's values: the options as given, empty
    /// strings for unset ones; `loaded` is true once added). `None` for an unknown
    /// secret or property.
    pub fn property(&self, id: &str, prop: &str) -> Option<serde_json::Value> {
        let map = self.lock();
        let o = &map.get(id)?.props;
        let text = |s: Option<&str>| serde_json::Value::from(s.unwrap_or_default());
        Some(match prop {
            "loaded" => true.into(),
            "format" => o.format.name().into(),
            "keyid" => text(o.keyid.as_deref()),
            "iv" => text(o.iv.as_deref()),
            "data" => text(o.data.as_deref()),
            "file" => text(o.file.as_ref().and_then(|p| p.to_str())),
            _ => return None,
        })
    }

    /// Sets QOM property `prop` of secret `id` to `value`. As in QEMU, the secret is
    /// loaded once: a new value shows in the property and changes nothing else.
    /// `loaded` is read-only (the caller says so).
    pub fn set_property(&self, id: &str, prop: &str, value: &str) -> options::Result<()> {
        let mut map = self.lock();
        let Some(e) = map.get_mut(id) else {
            return Ok(());
        };
        let o = &mut e.props;
        match prop {
            "format" => {
                o.format = options::coerce::to_enum(
                    "format",
                    &serde_json::Value::from(value),
                    &[("raw", SecretFormat::Raw), ("base64", SecretFormat::Base64)],
                )?
            }
            "keyid" => o.keyid = Some(value.to_string()),
            "iv" => o.iv = Some(value.to_string()),
            "data" => {
                if let Some(old) = o.data.replace(value.to_string()) {
                    drop(SecretData(old.into_bytes()));
                }
            }
            "file" => o.file = Some(PathBuf::from(value)),
            _ => {}
        }
        Ok(())
    }

    /// Removes a secret; whether it existed. Drivers that opened with it keep what they
    /// derived from it, as in QEMU.
    pub fn remove(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// The bytes of secret `id` (QEMU's `qcrypto_secret_lookup`).
    pub fn lookup(&self, id: &str) -> Result<Vec<u8>> {
        self.lock()
            .get(id)
            .map(|s| s.data.0.clone())
            .ok_or_else(|| SecretError::NotFound(id.to_string()))
    }

    /// The secret `id` as text (QEMU's `qcrypto_secret_lookup_as_utf8`).
    pub fn lookup_utf8(&self, id: &str) -> Result<String> {
        String::from_utf8(self.lookup(id)?).map_err(|_| SecretError::NotUtf8(id.to_string()))
    }

    fn load(&self, opts: &SecretOptions) -> Result<Vec<u8>> {
        let input = match (&opts.data, &opts.file) {
            (Some(_), Some(_)) => return Err(SecretError::BothSources),
            (None, None) => return Err(SecretError::NoSource),
            (Some(data), None) => data.as_bytes().to_vec(),
            (None, Some(path)) => std::fs::read(path).map_err(|e| SecretError::Read {
                path: path.display().to_string(),
                reason: crate::error::io_error_text(&e),
            })?,
        };
        match &opts.keyid {
            Some(keyid) => self.decrypt(opts, keyid, &input),
            None if opts.format == SecretFormat::Base64 => base64_decode(&input),
            None => Ok(input),
        }
    }

    /// AES-256-CBC decryption of an encrypted secret; the key is secret `keyid`, the
    /// plaintext carries PKCS#7-style padding (checked as QEMU checks it).
    fn decrypt(&self, opts: &SecretOptions, keyid: &str, input: &[u8]) -> Result<Vec<u8>> {
        let key = SecretData(self.lookup(keyid)?);
        if key.0.len() != 32 {
            return Err(SecretError::KeyLength);
        }
        let iv = opts.iv.as_deref().ok_or(SecretError::NoIv)?;
        let iv = base64_decode(iv.as_bytes())?;
        if iv.len() != 16 {
            return Err(SecretError::IvLength(iv.len()));
        }
        let mut buf = match opts.format {
            SecretFormat::Base64 => base64_decode(input)?,
            SecretFormat::Raw => input.to_vec(),
        };
        if buf.len() % 16 != 0 {
            return Err(SecretError::BlockSize(buf.len()));
        }
        let len = buf.len();
        if len == 0 {
            return Ok(Vec::new());
        }
        cbc::Decryptor::<aes::Aes256>::new_from_slices(&key.0, &iv)
            .map_err(|_| SecretError::KeyLength)?
            .decrypt_blocks_inout(
                aes::cipher::inout::InOutBuf::from(&mut buf[..])
                    .into_chunks::<aes::cipher::consts::U16>()
                    .0,
            );
        let pad = buf[buf.len() - 1];
        if pad > 16 || pad as usize > buf.len() {
            return Err(SecretError::Padding(pad));
        }
        buf.truncate(buf.len() - pad as usize);
        Ok(buf)
    }
}

/// Base64 as QEMU's `qbase64_decode` takes it: only the base64 alphabet and `=` are
/// allowed; groups of four characters give three bytes, a trailing partial group is
/// dropped, and each `=` among the last two characters drops one byte (glib's rules).
pub fn base64_decode(input: &[u8]) -> Result<Vec<u8>> {
    fn rank(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a') as u32 + 26,
            b'0'..=b'9' => (c - b'0') as u32 + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => 0,
            _ => return None,
        })
    }
    let mut out = Vec::with_capacity(input.len() / 4 * 3);
    let (mut acc, mut n) = (0u32, 0);
    for &c in input {
        acc = (acc << 6) | rank(c).ok_or(SecretError::Base64)?;
        n += 1;
        if n == 4 {
            out.extend_from_slice(&acc.to_be_bytes()[1..]);
            (acc, n) = (0, 0);
        }
    }
    let pad = input.iter().rev().take(2).filter(|&&c| c == b'=').count();
    out.truncate(out.len().saturating_sub(pad));
    Ok(out)
}

/// Standard base64 with padding (QEMU's `qcrypto_secret_lookup_as_base64` hands a
/// secret to librados this way).
pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let mut b = [0u8; 3];
        b[..chunk.len()].copy_from_slice(chunk);
        let v = u32::from_be_bytes([0, b[0], b[1], b[2]]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(v >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(id: &str) -> SecretOptions {
        SecretOptions {
            id: id.into(),
            data: None,
            file: None,
            format: SecretFormat::Raw,
            keyid: None,
            iv: None,
        }
    }

    #[test]
    fn base64_encode_round_trips() {
        assert_eq!(base64_encode(b"password"), "cGFzc3dvcmQ=");
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert_eq!(base64_encode(b"abc"), "YWJj");
        let all: Vec<u8> = (0..=255).collect();
        for n in 0..all.len() {
            assert_eq!(
                base64_decode(base64_encode(&all[..n]).as_bytes()).unwrap(),
                &all[..n]
            );
        }
    }

    #[test]
    fn base64_follows_glib() {
        assert_eq!(base64_decode(b"cGFzc3dvcmQ=").unwrap(), b"password");
        assert_eq!(base64_decode(b"YWI=").unwrap(), b"ab");
        assert_eq!(base64_decode(b"YQ==").unwrap(), b"a");
        assert_eq!(base64_decode(b"abc").unwrap(), b"");
        assert_eq!(base64_decode(b"ab!c"), Err(SecretError::Base64));
    }

    #[test]
    fn sources_and_lookup() {
        let s = Secrets::default();
        assert_eq!(s.add(&opts("a")), Err(SecretError::NoSource));
        let mut o = opts("a");
        o.data = Some("x".into());
        o.file = Some("/x".into());
        assert_eq!(s.add(&o), Err(SecretError::BothSources));
        o.file = None;
        s.add(&o).unwrap();
        assert_eq!(s.lookup_utf8("a").unwrap(), "x");
        assert_eq!(
            s.lookup("b").unwrap_err().to_string(),
            "No secret with id 'b'"
        );
        assert!(s.remove("a"));
        assert!(!s.contains("a"));
    }

    /// A secret encrypted as QEMU's documentation shows (`openssl enc -aes-256-cbc`
    /// with a 32-byte key and a 16-byte IV, PKCS#7 padding), decrypted back.
    #[test]
    fn encrypted_secret() {
        use aes::cipher::{block_padding::Pkcs7, BlockModeEncrypt};
        let key = [7u8; 32];
        let iv = [9u8; 16];
        let mut buf = [0u8; 32];
        let ct = cbc::Encryptor::<aes::Aes256>::new_from_slices(&key, &iv)
            .unwrap()
            .encrypt_padded_b2b::<Pkcs7>(b"letmein", &mut buf)
            .unwrap()
            .to_vec();
        let s = Secrets::default();
        let mut k = opts("k");
        k.data = Some(base64_encode(&key));
        k.format = SecretFormat::Base64;
        s.add(&k).unwrap();
        let mut o = opts("s");
        o.data = Some(base64_encode(&ct));
        o.format = SecretFormat::Base64;
        o.keyid = Some("k".into());
        assert_eq!(s.add(&o), Err(SecretError::NoIv));
        o.iv = Some("AAAA".into());
        assert_eq!(s.add(&o), Err(SecretError::IvLength(3)));
        o.iv = Some(base64_encode(&iv));
        s.add(&o).unwrap();
        assert_eq!(s.lookup_utf8("s").unwrap(), "letmein");
    }
}

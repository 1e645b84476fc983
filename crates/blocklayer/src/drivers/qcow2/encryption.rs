//! qcow2 with `encrypt.format=luks` (QEMU's `BlockdevQcow2Encryption`): the LUKS
//! header and key material live in the clusters the image's crypto header extension
//! points to, unlocked with the luks driver's code ([`crate::drivers::luks`]); guest
//! data clusters hold ciphertext whose sector IVs are the sectors' host offsets, as
//! QEMU writes them (`crypt_physical_offset`).
//!
//! The driver encrypts and decrypts guest data on the iothread in bounce buffers
//! leased from the thread's budget (guest memory never holds ciphertext); the image
//! itself uses the same cipher for the copy-on-write it does.

use crate::drivers::luks::crypto::SectorCipher;
use crate::drivers::luks::info::LuksInfo;
use crate::drivers::luks::keyslots::AmendRequest;
use crate::drivers::luks::volume::{CreateParams, Volume};
use crate::drivers::luks::{self, create::LuksCreateOptions};
use crate::error::{BlockError, Result};
use crate::node::Node;
use crate::options::coerce::Fields;
use crate::secret::Secrets;
use serde_json::{json, Map, Value};
use std::sync::{Arc, Mutex};

/// The encryption sector.
pub(super) const SECTOR: u64 = 512;

/// `encrypt.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncryptFormat {
    Aes,
    Luks,
}

impl EncryptFormat {
    pub fn name(self) -> &'static str {
        match self {
            EncryptFormat::Aes => "aes",
            EncryptFormat::Luks => "luks",
        }
    }
}

const FORMATS: &[(&str, EncryptFormat)] =
    &[("aes", EncryptFormat::Aes), ("luks", EncryptFormat::Luks)];

/// The `encrypt` options of opening a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptOptions {
    pub format: EncryptFormat,
    /// `encrypt.key-secret`: the secret holding the passphrase.
    pub key_secret: Option<String>,
}

impl EncryptOptions {
    /// Takes `encrypt` from `f` (a discriminated union in QEMU: `format` is required).
    pub fn take_from(f: &mut Fields) -> crate::options::Result<Option<Self>> {
        let Some(mut e) = f.object("encrypt")? else {
            return Ok(None);
        };
        let format = e.enumeration("format", FORMATS)?;
        let format = e.required("format", format)?;
        let key_secret = e.string("key-secret")?;
        e.finish()?;
        Ok(Some(EncryptOptions { format, key_secret }))
    }

    pub fn write_json(&self, m: &mut Map<String, Value>) {
        let mut e = json!({"format": self.format.name()});
        if let Some(k) = &self.key_secret {
            e["key-secret"] = json!(k);
        }
        m.insert("encrypt".into(), e);
    }
}

/// The unlocked volume's payload cipher, as the image's data cipher: a sector's IV
/// is its host offset in 512-byte units.
pub struct LuksCipher(SectorCipher);

impl LuksCipher {
    /// The sector cipher (sector numbers are host offsets / 512).
    pub fn sectors(&self) -> &SectorCipher {
        &self.0
    }
}

fn io_error(e: crate::drivers::luks::crypto::CryptoError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
}

impl qcow::DataCipher for LuksCipher {
    fn encrypt(&self, host_offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.encrypt(host_offset / SECTOR, buf).map_err(io_error)
    }

    fn decrypt(&self, host_offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.decrypt(host_offset / SECTOR, buf).map_err(io_error)
    }
}

/// An unlocked image: its cipher, its `format-specific` `encrypt` data (changed by
/// amending its key slots), and the secret it was opened with.
pub struct Unlocked {
    pub cipher: Arc<LuksCipher>,
    pub info: Mutex<LuksInfo>,
    pub key_secret: String,
    /// Where the LUKS header is (offset, length).
    pub area: (u64, u64),
    /// Held while the key slots are amended (one amendment at a time).
    amending: Mutex<()>,
}

impl Unlocked {
    /// Amends the key slots of the image's LUKS header in place, within its clusters
    /// (QEMU's `qcow2_co_amend` with `encrypt`).
    pub fn amend(
        &self,
        file: &Arc<Node>,
        request: &AmendRequest,
        secrets: &Secrets,
        force: bool,
    ) -> Result<()> {
        let _one = self.amending.lock().unwrap_or_else(|e| e.into_inner());
        let (offset, len) = self.area;
        let info = luks::amend_at(file, offset, len, &self.key_secret, request, secrets, force)?;
        *self.info.lock().unwrap_or_else(|e| e.into_inner()) = info;
        Ok(())
    }
}

/// What the header (`crypto_header`: where its LUKS header is, if encrypted) and the
/// `encrypt` options decide at open, with QEMU's texts: `None` for an unencrypted
/// image, the unlocked volume otherwise.
pub fn unlock(
    file: &Arc<Node>,
    crypto_header: Option<(u64, u64)>,
    opts: Option<&EncryptOptions>,
    secrets: &Secrets,
) -> Result<Option<Unlocked>> {
    let Some((offset, len)) = crypto_header else {
        if let Some(o) = opts {
            return Err(BlockError::Graph(format!(
                "No encryption in image header, but options specified format '{}'",
                o.format.name()
            )));
        }
        return Ok(None);
    };
    if let Some(o) = opts.filter(|o| o.format != EncryptFormat::Luks) {
        return Err(BlockError::Graph(format!(
            "Header reported 'luks' encryption format but options specify '{}'",
            o.format.name()
        )));
    }
    let Some(id) = opts.and_then(|o| o.key_secret.as_ref()) else {
        return Err(BlockError::Graph(
            "Parameter 'encrypt.key-secret' is required for cipher".into(),
        ));
    };
    let password = secrets
        .lookup_utf8(id)
        .map_err(|e| BlockError::Graph(e.to_string()))?;
    let volume = luks::unlock_at(file, offset, len, password.as_bytes())?;
    let info = LuksInfo::of_header(&volume.header, &volume.algs);
    // The volume key is wiped when the volume drops; only the cipher stays.
    let Volume { cipher, .. } = volume;
    Ok(Some(Unlocked {
        cipher: Arc::new(LuksCipher(cipher)),
        info: Mutex::new(info),
        key_secret: id.clone(),
        area: (offset, len),
        amending: Mutex::new(()),
    }))
}

/// The `encrypt` options of creating a qcow2 image (QEMU's
/// `QCryptoBlockCreateOptions`: `format` luks with the luks creation options),
/// checked as QEMU checks them.
pub fn create_params(mut e: Fields, secrets: &Secrets) -> Result<CreateParams> {
    let format = e.enumeration("format", &[("luks", EncryptFormat::Luks)])?;
    e.required("format", format)?;
    let lo = LuksCreateOptions::take_from(&mut e)?;
    e.finish()?;
    lo.params(secrets).map_err(|err| match err {
        // QEMU names the nested option.
        BlockError::Graph(m) if m == "Parameter 'key-secret' is required for cipher" => {
            BlockError::Graph("Parameter 'encrypt.key-secret' is required for cipher".into())
        }
        other => other,
    })
}

/// A new LUKS header with its key material, to store in a new image (PBKDF2 takes
/// `iter-time`: run it in the creation job).
pub fn format_header(params: &CreateParams) -> Result<Vec<u8>> {
    let (bytes, _volume) =
        luks::volume::format(params).map_err(|e| BlockError::Graph(e.to_string()))?;
    Ok(bytes)
}

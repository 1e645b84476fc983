//! Encrypted guest data (`crypt_method` 2): QEMU's qcow2 with `encrypt.format=luks`.
//!
//! The LUKS header and key material live in the clusters the crypto header
//! extension points to; the caller unlocks them and hands the image a
//! [`DataCipher`]. Every allocated data cluster then holds ciphertext, by
//! 512-byte sectors whose IV is the sector's *host* offset (QEMU's
//! `crypt_physical_offset` for LUKS; checked against images qemu-io wrote).
//! Zero and unallocated clusters read as zeroes without decryption. The crate
//! itself encrypts only what it writes on its own: copy-on-write (decrypting
//! what it copies from another host cluster and encrypting it for the new one).

use crate::image::{Error, Qcow2, Result};
use crate::io::QcowIo;
use std::io;

/// The encryption sector.
pub const SECTOR: u64 = 512;

/// The caller's cipher of guest data: `buf` is whole sectors, the first at
/// `host_offset` in the image file (which makes its IV).
pub trait DataCipher: Send + Sync {
    /// Encrypts `buf` in place.
    fn encrypt(&self, host_offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Decrypts `buf` in place.
    fn decrypt(&self, host_offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl<I: QcowIo> Qcow2<I> {
    /// Whether guest data is encrypted (the image has a LUKS header).
    pub fn is_encrypted(&self) -> bool {
        self.st().hdr.crypt_method != 0
    }

    /// Where the LUKS header is (offset, length), if the image is encrypted.
    pub fn crypto_header(&self) -> Option<(u64, u64)> {
        self.st().hdr.crypto_header
    }

    /// Gives the image the cipher of its data (after unlocking its LUKS header).
    pub fn set_cipher(&mut self, cipher: std::sync::Arc<dyn DataCipher>) {
        self.cipher = Some(cipher);
    }

    /// The cipher to use on guest data: `None` for unencrypted images; an error for
    /// encrypted ones opened without their key (metadata only).
    pub(crate) fn data_cipher(&self) -> Result<Option<&dyn DataCipher>> {
        match (&self.cipher, self.is_encrypted()) {
            (Some(c), _) => Ok(Some(c.as_ref())),
            (None, false) => Ok(None),
            (None, true) => Err(Error::Unsupported(
                "the image is encrypted and was opened without its key".into(),
            )),
        }
    }

    /// Checks that a data write on an encrypted image covers whole sectors.
    pub(crate) fn check_sectors(&self, offset: u64, len: u64) -> Result<()> {
        if self.cipher.is_some() && !(offset.is_multiple_of(SECTOR) && len.is_multiple_of(SECTOR)) {
            return Err(Error::Unaligned {
                offset,
                len,
                align: SECTOR,
            });
        }
        Ok(())
    }

    /// Stores `luks_header` (a formatted LUKS header with its key material, as
    /// QEMU's `qcow2_crypto_hdr_init_func` and `_write_func` store it) in new
    /// clusters and marks the image encrypted; for image creation, before any
    /// guest data is written.
    pub(crate) async fn set_up_encryption(&self, luks_header: &[u8]) -> Result<()> {
        let cs = self.g.cluster_size;
        let len = luks_header.len() as u64;
        if len == 0 || len > crate::header::MAX_CRYPTO_HEADER {
            return Err(Error::Unsupported(format!(
                "a LUKS header of {len} bytes cannot be stored"
            )));
        }
        let off = {
            let _meta = self.meta.lock().await;
            self.alloc_clusters(len.div_ceil(cs)).await?
        };
        let mut area = luks_header.to_vec();
        area.resize((len.div_ceil(cs) * cs) as usize, 0);
        self.io.write_at(off, &area).await?;
        self.io.flush().await?;
        {
            let mut st = self.st();
            st.hdr.crypt_method = crate::header::CRYPT_LUKS;
            st.hdr.crypto_header = Some((off, len));
        }
        let _meta = self.meta.lock().await;
        self.write_header().await?;
        self.flush_locked().await
    }
}

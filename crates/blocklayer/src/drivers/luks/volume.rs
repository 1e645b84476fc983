//! A LUKS volume's keys: unlocking a key slot with a passphrase (PBKDF2, key material
//! decryption, AF merge, master key digest check) and formatting a new volume (QEMU's
//! `qcrypto_block_luks_create`: slot 0 holds the passphrase).

use super::crypto::{af_merge, af_split, CipherAlg, CipherMode, HashAlg, SectorCipher, Suite};
use super::header::{
    Algorithms, Header, HeaderError, DIGEST_LEN, SALT_LEN, SECTOR, SLOT_ENABLED, STRIPES,
};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("{0}")]
    Crypto(#[from] super::crypto::CryptoError),
    #[error("Invalid password, cannot unlock any keyslot")]
    WrongPassword,
    #[error("Could not read {what}: {source}")]
    Read {
        what: String,
        source: crate::BlockError,
    },
    #[error("Unable to read random bytes: {0}")]
    Random(std::io::Error),
    #[error("PBKDF iterations {0} larger than {max}", max = u32::MAX)]
    Iterations(u64),
    /// A key slot change refused (QEMU's texts).
    #[error("{0}")]
    Amend(String),
}

pub type Result<T> = std::result::Result<T, VolumeError>;

impl Algorithms {
    pub fn suite(&self) -> Suite {
        Suite {
            cipher: self.cipher,
            mode: self.mode,
            ivgen: self.ivgen,
            ivgen_hash: self.ivgen_hash,
        }
    }

    pub fn key_bytes(&self) -> usize {
        self.suite().key_bytes()
    }
}

/// An unlocked volume: its header and the payload cipher.
pub struct Volume {
    pub header: Header,
    pub algs: Algorithms,
    pub cipher: SectorCipher,
    key: MasterKey,
}

impl Volume {
    /// Unlocks the volume whose header is `header_bytes` with `password`; `read`
    /// reads bytes of the image (key material).
    pub fn open(
        header_bytes: &[u8],
        password: &[u8],
        mut read: impl FnMut(u64, usize) -> std::result::Result<Vec<u8>, crate::BlockError>,
    ) -> Result<Volume> {
        let header = Header::parse(header_bytes)?;
        let algs = header.algorithms()?;
        // Check that vubd runs the mode before deriving any key.
        SectorCipher::new(&algs.suite(), &vec![0u8; algs.key_bytes()])?;
        for i in 0..header.slots.len() {
            if let Some(key) = unlock_slot(&header, &algs, i, password, &mut read)? {
                let cipher = SectorCipher::new(&algs.suite(), &key)?;
                return Ok(Volume {
                    header,
                    algs,
                    cipher,
                    key: MasterKey(key),
                });
            }
        }
        Err(VolumeError::WrongPassword)
    }

    /// The volume key (for adding key slots).
    pub fn master_key(&self) -> &[u8] {
        &self.key.0
    }
}

/// The volume key, wiped when dropped.
pub struct MasterKey(Vec<u8>);

impl Drop for MasterKey {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, exclusive reference into the vector; the volatile
            // write keeps the wipe of memory about to be freed from being elided.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// The volume key if key slot `i` is enabled and `password` unlocks it.
pub fn unlock_slot(
    header: &Header,
    algs: &Algorithms,
    i: usize,
    password: &[u8],
    read: &mut impl FnMut(u64, usize) -> std::result::Result<Vec<u8>, crate::BlockError>,
) -> Result<Option<Vec<u8>>> {
    let slot = &header.slots[i];
    if !slot.is_enabled() {
        return Ok(None);
    }
    let suite = algs.suite();
    let key_len = algs.key_bytes();
    // Bounded: key_len <= 64 and stripes == 4000 (checked by the header).
    let material_len = key_len * slot.stripes as usize;
    let mut material = read(slot.key_offset as u64 * SECTOR, material_len).map_err(|source| {
        VolumeError::Read {
            what: format!("LUKS keyslot {i}"),
            source,
        }
    })?;
    let mut slot_key = vec![0u8; key_len];
    algs.hash
        .pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);
    let padded = material_len.div_ceil(SECTOR as usize) * SECTOR as usize;
    material.resize(padded, 0);
    SectorCipher::new(&suite, &slot_key)?.decrypt(0, &mut material)?;
    let key = af_merge(algs.hash, key_len, slot.stripes as usize, &material);
    Ok((master_digest(algs, header, &key) == header.mk_digest).then_some(key))
}

fn master_digest(algs: &Algorithms, header: &Header, key: &[u8]) -> [u8; DIGEST_LEN] {
    let mut digest = [0u8; DIGEST_LEN];
    algs.hash
        .pbkdf2(key, &header.mk_salt, header.mk_iterations, &mut digest);
    digest
}

pub fn random_bytes(buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which is
        // valid for writes; getrandom writes at most that many bytes.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(VolumeError::Random(e));
        }
        done += n as usize;
    }
    Ok(())
}

/// A random version 4 UUID in its text form.
fn uuid() -> Result<String> {
    let mut b = [0u8; 16];
    random_bytes(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

/// PBKDF2 iterations per second of `hash` for keys of `key_len` bytes (QEMU's
/// `qcrypto_pbkdf2_count_iters`: runs growing counts until one takes 500 ms).
fn iterations_per_second(hash: HashAlg, key_len: usize) -> u64 {
    let mut out = vec![0u8; key_len];
    let mut iters: u32 = 1 << 10;
    loop {
        let t = Instant::now();
        hash.pbkdf2(b"vubd-pbkdf2-count", &[0u8; SALT_LEN], iters, &mut out);
        let took = t.elapsed();
        if took >= Duration::from_millis(500) || iters >= 1 << 30 {
            return (iters as u128 * 1000 / took.as_millis().max(1)) as u64;
        }
        iters = iters.saturating_mul(2);
    }
}

/// What creating a volume needs.
pub struct CreateParams {
    pub algs: Algorithms,
    pub password: Vec<u8>,
    /// Milliseconds PBKDF2 should take on this machine (QEMU's `iter-time`).
    pub iter_time_ms: u64,
}

/// The default algorithms QEMU 7.2 creates with: aes-256, xts, plain64, sha256.
pub fn default_algorithms() -> Algorithms {
    Algorithms {
        cipher: CipherAlg::Aes256,
        mode: CipherMode::Xts,
        ivgen: super::crypto::IvGenAlg::Plain64,
        ivgen_hash: None,
        hash: HashAlg::Sha256,
    }
}

/// A new volume: the header and key material to write at offset 0 (everything up to
/// the payload), and the payload cipher.
pub fn format(p: &CreateParams) -> Result<(Vec<u8>, Volume)> {
    let algs = p.algs;
    let key_len = algs.key_bytes();
    let mut key = vec![0u8; key_len];
    random_bytes(&mut key)?;
    let cipher = SectorCipher::new(&algs.suite(), &key)?;
    let mut h = Header::new_layout(&algs, &uuid()?);
    let rate = iterations_per_second(algs.hash, key_len);
    random_bytes(&mut h.mk_salt)?;
    // cryptsetup's and QEMU's eighth of the time for the digest.
    h.mk_iterations = scaled_iterations(rate, p.iter_time_ms, 8)?;
    h.mk_digest = master_digest(&algs, &h, &key);
    let (offset, material) = fill_slot(&mut h, &algs, 0, &key, &p.password, p.iter_time_ms)?;
    let mut out = vec![0u8; h.payload_bytes() as usize];
    out[..super::header::HEADER_LEN].copy_from_slice(&h.serialise());
    out[offset as usize..offset as usize + material.len()].copy_from_slice(&material);
    Ok((
        out,
        Volume {
            header: h,
            algs,
            cipher,
            key: MasterKey(key),
        },
    ))
}

/// PBKDF2 iterations for `iter_time_ms` at `rate` per second, divided by `div`, at
/// least QEMU's minimum of 1000.
fn scaled_iterations(rate: u64, iter_time_ms: u64, div: u64) -> Result<u32> {
    let iters = rate.saturating_mul(iter_time_ms) / 1000 / div;
    u32::try_from(iters.max(1000)).map_err(|_| VolumeError::Iterations(iters))
}

/// Makes key slot `i` of `h` hold `key` under `password` (new salt, iterations for
/// `iter_time_ms`, enabled); returns where its key material goes and the material.
pub fn fill_slot(
    h: &mut Header,
    algs: &Algorithms,
    i: usize,
    key: &[u8],
    password: &[u8],
    iter_time_ms: u64,
) -> Result<(u64, Vec<u8>)> {
    let key_len = key.len();
    let rate = iterations_per_second(algs.hash, key_len);
    let slot = &mut h.slots[i];
    random_bytes(&mut slot.salt)?;
    slot.iterations = scaled_iterations(rate, iter_time_ms, 1)?;
    slot.stripes = STRIPES;
    let mut slot_key = vec![0u8; key_len];
    algs.hash
        .pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);
    let mut random = vec![0u8; key_len * (STRIPES as usize - 1)];
    random_bytes(&mut random)?;
    let mut material = af_split(algs.hash, key, STRIPES as usize, &random);
    let len = material.len();
    material.resize(len.div_ceil(SECTOR as usize) * SECTOR as usize, 0);
    SectorCipher::new(&algs.suite(), &slot_key)?.encrypt(0, &mut material)?;
    material.truncate(len);
    slot.active = SLOT_ENABLED;
    Ok((slot.key_offset as u64 * SECTOR, material))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_then_open() {
        let p = CreateParams {
            algs: default_algorithms(),
            password: b"pw".to_vec(),
            iter_time_ms: 1,
        };
        let (bytes, v) = format(&p).unwrap();
        let read = |off: u64, len: usize| Ok(bytes[off as usize..off as usize + len].to_vec());
        let w = Volume::open(&bytes, b"pw", read).unwrap();
        assert_eq!(w.header, v.header);
        let mut a = vec![3u8; 1024];
        v.cipher.encrypt(9, &mut a).unwrap();
        w.cipher.decrypt(9, &mut a).unwrap();
        assert_eq!(a, vec![3u8; 1024]);
        assert!(matches!(
            Volume::open(&bytes, b"nope", read),
            Err(VolumeError::WrongPassword)
        ));
    }

    /// A volume qemu-img 7.2 made (`-o cipher-alg=aes-128,cipher-mode=cbc,
    /// ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1`, passphrase `vubd-vector`)
    /// and qemu-io wrote 512 bytes of 0xa5 to at offset 1536: its header, slot 0's key
    /// material (at 4096) and that sector's ciphertext. Unlocking checks PBKDF2-SHA1,
    /// the AES-CBC-ESSIV decryption of the key material and the AF merge against the
    /// master key digest; decrypting the sector checks the ESSIV IV of sector 3.
    #[test]
    fn qemu_img_vector() {
        let v = include_bytes!("testdata/qemu-aes128-cbc-essiv-sha1.bin");
        let (head, rest) = v.split_at(592);
        let (material, sector) = rest.split_at(16 * 4000);
        let read = |off: u64, len: usize| {
            assert_eq!((off, len), (4096, material.len()));
            Ok(material.to_vec())
        };
        let vol = Volume::open(head, b"vubd-vector", read).unwrap();
        assert_eq!(vol.header.payload_bytes(), 528384);
        assert_eq!(vol.algs.ivgen, super::super::crypto::IvGenAlg::Essiv);
        let mut data = sector.to_vec();
        vol.cipher.decrypt(3, &mut data).unwrap();
        assert_eq!(data, vec![0xa5; 512]);
        // Another sector's IV does not decrypt it.
        let mut data = sector.to_vec();
        vol.cipher.decrypt(4, &mut data).unwrap();
        assert_ne!(data[..16], [0xa5; 16]);
        assert!(matches!(
            Volume::open(head, b"vubd-vectoR", read),
            Err(VolumeError::WrongPassword)
        ));
    }
}

//! The LUKS1 on-disk header (592 bytes, big-endian, at offset 0): parsing with QEMU
//! 7.2's checks and texts, the algorithm names it carries, and serialising it back.
//!
//! QEMU 7.2 reads and writes LUKS version 1 only; version 2 headers are refused with
//! its text. Every size derived from a header field is bounded here, before anything
//! is allocated or derived: key length, stripes (4000, as QEMU requires), iteration
//! counts ([`MAX_ITERATIONS`]) and the key material and payload offsets.

use super::crypto::{CipherAlg, CipherMode, HashAlg, IvGenAlg};

pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
pub const HEADER_LEN: usize = 592;
pub const SECTOR: u64 = 512;
pub const NUM_SLOTS: usize = 8;
pub const STRIPES: u32 = 4000;
pub const SALT_LEN: usize = 32;
pub const DIGEST_LEN: usize = 20;
/// Key material starts after the first 4 KiB (in sectors).
pub const HEADER_SECTORS: u32 = 4096 / SECTOR as u32;
pub const SLOT_ENABLED: u32 = 0x00AC_71F3;
pub const SLOT_DISABLED: u32 = 0x0000_DEAD;
/// The most PBKDF2 iterations vubd runs for one key slot or the master key digest.
/// QEMU has no bound; an image claiming more (up to 2^32) would keep an open busy for
/// hours. cryptsetup and qemu-img choose counts for 1-2 s on the creating machine,
/// a few million at most today; this leaves a wide margin.
pub const MAX_ITERATIONS: u32 = 1 << 26;

/// What is wrong with a header; the texts are QEMU's, except where vubd is stricter
/// (iteration bound).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("Volume is not in LUKS format")]
    NotLuks,
    #[error("LUKS version {0} is not supported")]
    Version(u16),
    #[error("LUKS header {0} is not NUL terminated")]
    NotTerminated(&'static str),
    #[error("LUKS payload is overlapping with the header")]
    PayloadOverlapsHeader,
    #[error("LUKS key iteration count is zero")]
    MasterIterationsZero,
    #[error("Keyslot {0} is corrupted (stripes {1} != 4000)")]
    Stripes(usize, u32),
    #[error("Keyslot {0} state (active/disable) is corrupted")]
    SlotState(usize),
    #[error("Keyslot {0} iteration count is zero")]
    SlotIterationsZero(usize),
    #[error("Keyslot {0} is overlapping with the LUKS header")]
    SlotOverlapsHeader(usize),
    #[error("Keyslot {0} is overlapping with the encrypted payload")]
    SlotOverlapsPayload(usize),
    #[error("Keyslots {0} and {1} are overlapping in the header")]
    SlotsOverlap(usize, usize),
    #[error("Unexpected cipher mode string format '{0}'")]
    ModeFormat(String),
    #[error("{0} '{1}' not supported")]
    Unsupported(&'static str, String),
    #[error("Algorithm '{0}' with key size {1} bytes not supported")]
    KeySize(String, u32),
    #[error("Missing IV generator hash specification")]
    NoIvHash,
    #[error("No AES cipher with key size {0} available")]
    EssivKeySize(usize),
    #[error(
        "LUKS {what} iteration count {count} exceeds vubd's limit of {MAX_ITERATIONS} \
         (the image is corrupted or hostile)"
    )]
    TooManyIterations { what: String, count: u32 },
}

pub type Result<T> = std::result::Result<T, HeaderError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySlot {
    pub active: u32,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    /// In sectors.
    pub key_offset: u32,
    pub stripes: u32,
}

impl KeySlot {
    pub fn is_enabled(&self) -> bool {
        self.active == SLOT_ENABLED
    }
}

/// The raw fields of a LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub cipher_name: [u8; 32],
    pub cipher_mode: [u8; 32],
    pub hash_spec: [u8; 32],
    /// In sectors.
    pub payload_offset: u32,
    pub key_bytes: u32,
    pub mk_digest: [u8; DIGEST_LEN],
    pub mk_salt: [u8; SALT_LEN],
    pub mk_iterations: u32,
    pub uuid: [u8; 40],
    pub slots: [KeySlot; NUM_SLOTS],
}

/// The algorithms a header names, parsed and checked against what vubd can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Algorithms {
    pub cipher: CipherAlg,
    pub mode: CipherMode,
    pub ivgen: IvGenAlg,
    pub ivgen_hash: Option<HashAlg>,
    pub hash: HashAlg,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

/// A NUL-terminated string field (checked to be terminated already).
fn c_str(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn put_str(dst: &mut [u8; 32], s: &str) {
    *dst = [0; 32];
    dst[..s.len()].copy_from_slice(s.as_bytes());
}

/// Sectors of one key slot's material: the split key rounded up to sectors, then to
/// 4 KiB (QEMU's layout).
pub fn slot_sectors(key_bytes: u32, stripes: u32) -> u64 {
    let sectors = (key_bytes as u64 * stripes as u64).div_ceil(SECTOR);
    sectors.div_ceil(HEADER_SECTORS as u64) * HEADER_SECTORS as u64
}

impl Header {
    /// Parses and checks a header (`buf`: at least the first [`HEADER_LEN`] bytes of the
    /// image; fewer bytes is a file too short to be LUKS).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < HEADER_LEN || &buf[..6] != MAGIC {
            return Err(HeaderError::NotLuks);
        }
        let mut slots = [KeySlot {
            active: 0,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_offset: 0,
            stripes: 0,
        }; NUM_SLOTS];
        for (i, slot) in slots.iter_mut().enumerate() {
            let s = &buf[208 + 48 * i..208 + 48 * (i + 1)];
            *slot = KeySlot {
                active: be32(&s[0..]),
                iterations: be32(&s[4..]),
                salt: arr(&s[8..40]),
                key_offset: be32(&s[40..]),
                stripes: be32(&s[44..]),
            };
        }
        let h = Header {
            version: be16(&buf[6..]),
            cipher_name: arr(&buf[8..40]),
            cipher_mode: arr(&buf[40..72]),
            hash_spec: arr(&buf[72..104]),
            payload_offset: be32(&buf[104..]),
            key_bytes: be32(&buf[108..]),
            mk_digest: arr(&buf[112..132]),
            mk_salt: arr(&buf[132..164]),
            mk_iterations: be32(&buf[164..]),
            uuid: arr(&buf[168..208]),
            slots,
        };
        h.check()?;
        Ok(h)
    }

    /// QEMU's `qcrypto_block_luks_check_header`, plus vubd's iteration bound.
    fn check(&self) -> Result<()> {
        if self.version != 1 {
            return Err(HeaderError::Version(self.version));
        }
        for (name, field) in [
            ("cipher name", &self.cipher_name),
            ("cipher mode", &self.cipher_mode),
            ("hash spec", &self.hash_spec),
        ] {
            if !field.contains(&0) {
                return Err(HeaderError::NotTerminated(name));
            }
        }
        if self.payload_offset < HEADER_SECTORS {
            return Err(HeaderError::PayloadOverlapsHeader);
        }
        if self.mk_iterations == 0 {
            return Err(HeaderError::MasterIterationsZero);
        }
        if self.mk_iterations > MAX_ITERATIONS {
            return Err(HeaderError::TooManyIterations {
                what: "master key digest".into(),
                count: self.mk_iterations,
            });
        }
        // The key length is checked against the cipher later; bound it here so that
        // the slot sizes below cannot overflow (`algorithms` accepts at most 64).
        let key_bytes = self.key_bytes.min(1024);
        for (i, s) in self.slots.iter().enumerate() {
            if s.stripes != STRIPES {
                return Err(HeaderError::Stripes(i, s.stripes));
            }
            if s.active != SLOT_ENABLED && s.active != SLOT_DISABLED {
                return Err(HeaderError::SlotState(i));
            }
            if s.is_enabled() && s.iterations == 0 {
                return Err(HeaderError::SlotIterationsZero(i));
            }
            if s.is_enabled() && s.iterations > MAX_ITERATIONS {
                return Err(HeaderError::TooManyIterations {
                    what: format!("keyslot {i}"),
                    count: s.iterations,
                });
            }
            if s.key_offset < HEADER_SECTORS {
                return Err(HeaderError::SlotOverlapsHeader(i));
            }
            let (start, len) = (s.key_offset as u64, slot_sectors(key_bytes, s.stripes));
            if start + len > self.payload_offset as u64 {
                return Err(HeaderError::SlotOverlapsPayload(i));
            }
            for (j, t) in self.slots.iter().enumerate().skip(i + 1) {
                let (start2, len2) = (t.key_offset as u64, slot_sectors(key_bytes, t.stripes));
                if start < start2 + len2 && start2 < start + len {
                    return Err(HeaderError::SlotsOverlap(i, j));
                }
            }
        }
        Ok(())
    }

    /// The algorithms the header names (QEMU's `qcrypto_block_luks_parse_header`).
    pub fn algorithms(&self) -> Result<Algorithms> {
        let mode_spec = c_str(&self.cipher_mode);
        let Some((mode, ivgen_spec)) = mode_spec.split_once('-') else {
            return Err(HeaderError::ModeFormat(mode_spec));
        };
        let (ivgen, ivhash) = match ivgen_spec.split_once(':') {
            Some((g, h)) => (g, Some(h)),
            None => (ivgen_spec, None),
        };
        let ivgen_hash = ivhash.map(parse_hash).transpose()?;
        let mode = CipherMode::from_name(mode)
            .ok_or_else(|| HeaderError::Unsupported("Cipher mode", mode.into()))?;
        let name = c_str(&self.cipher_name);
        let cipher_key = if mode == CipherMode::Xts {
            self.key_bytes / 2
        } else {
            self.key_bytes
        };
        let cipher = CipherAlg::from_luks(&name, cipher_key)
            .filter(|c| {
                // An odd XTS key length halves to a valid one: the whole must match.
                let whole = c.key_bytes() * if mode == CipherMode::Xts { 2 } else { 1 };
                whole == self.key_bytes as usize
            })
            .ok_or(HeaderError::KeySize(name, cipher_key))?;
        let hash = parse_hash(&c_str(&self.hash_spec))?;
        let ivgen = IvGenAlg::from_name(ivgen)
            .ok_or_else(|| HeaderError::Unsupported("IV generator", ivgen.into()))?;
        if ivgen == IvGenAlg::Essiv {
            let h = ivgen_hash.ok_or(HeaderError::NoIvHash)?;
            if CipherAlg::aes_for_key(h.digest_len()).is_none() {
                return Err(HeaderError::EssivKeySize(h.digest_len()));
            }
        }
        Ok(Algorithms {
            cipher,
            mode,
            ivgen,
            ivgen_hash,
            hash,
        })
    }

    /// The data offset in bytes.
    pub fn payload_bytes(&self) -> u64 {
        self.payload_offset as u64 * SECTOR
    }

    pub fn uuid(&self) -> String {
        c_str(&self.uuid)
    }

    /// The header as it is stored.
    pub fn serialise(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..6].copy_from_slice(MAGIC);
        b[6..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..40].copy_from_slice(&self.cipher_name);
        b[40..72].copy_from_slice(&self.cipher_mode);
        b[72..104].copy_from_slice(&self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iterations.to_be_bytes());
        b[168..208].copy_from_slice(&self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let d = &mut b[208 + 48 * i..208 + 48 * (i + 1)];
            d[0..4].copy_from_slice(&s.active.to_be_bytes());
            d[4..8].copy_from_slice(&s.iterations.to_be_bytes());
            d[8..40].copy_from_slice(&s.salt);
            d[40..44].copy_from_slice(&s.key_offset.to_be_bytes());
            d[44..48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// A new header for `algs` with every slot disabled, laid out as QEMU lays it out
    /// (slot material from 4 KiB on, each slot 4 KiB aligned, the payload after the
    /// last slot); digest, salts and iteration counts are the creator's to fill.
    pub fn new_layout(algs: &Algorithms, uuid: &str) -> Header {
        let key_bytes = algs.key_bytes() as u32;
        let per_slot = slot_sectors(key_bytes, STRIPES) as u32;
        let mut h = Header {
            version: 1,
            cipher_name: [0; 32],
            cipher_mode: [0; 32],
            hash_spec: [0; 32],
            payload_offset: HEADER_SECTORS + NUM_SLOTS as u32 * per_slot,
            key_bytes,
            mk_digest: [0; DIGEST_LEN],
            mk_salt: [0; SALT_LEN],
            mk_iterations: 0,
            uuid: [0; 40],
            slots: [KeySlot {
                active: SLOT_DISABLED,
                iterations: 0,
                salt: [0; SALT_LEN],
                key_offset: 0,
                stripes: STRIPES,
            }; NUM_SLOTS],
        };
        for (i, s) in h.slots.iter_mut().enumerate() {
            s.key_offset = HEADER_SECTORS + i as u32 * per_slot;
        }
        put_str(&mut h.cipher_name, algs.cipher.luks_name());
        let mode = match algs.ivgen_hash {
            Some(hash) => format!("{}-{}:{}", algs.mode.name(), algs.ivgen.name(), hash.name()),
            None => format!("{}-{}", algs.mode.name(), algs.ivgen.name()),
        };
        put_str(&mut h.cipher_mode, &mode);
        put_str(&mut h.hash_spec, algs.hash.name());
        h.uuid[..uuid.len().min(39)].copy_from_slice(&uuid.as_bytes()[..uuid.len().min(39)]);
        h
    }
}

fn parse_hash(name: &str) -> Result<HashAlg> {
    HashAlg::from_name(name).ok_or_else(|| HeaderError::Unsupported("Hash algorithm", name.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let algs = Algorithms {
            cipher: CipherAlg::Aes256,
            mode: CipherMode::Xts,
            ivgen: IvGenAlg::Plain64,
            ivgen_hash: None,
            hash: HashAlg::Sha256,
        };
        let mut h = Header::new_layout(&algs, "59b4f953-cf0c-4745-ba8c-0c8d586048ac");
        h.mk_iterations = 1000;
        h.slots[0].active = SLOT_ENABLED;
        h.slots[0].iterations = 1000;
        h
    }

    fn corrupt(f: &dyn Fn(&mut Header)) -> String {
        let mut h = sample();
        f(&mut h);
        match Header::parse(&h.serialise()).and_then(|h| h.algorithms()) {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn layout_matches_qemu() {
        let h = sample();
        // qemu-img create -f luks (aes-256-xts-plain64): payload at 4040 sectors,
        // slot material at 8, 512, 1016, ... sectors.
        assert_eq!(h.payload_offset, 4040);
        assert_eq!(h.slots[1].key_offset, 512);
        assert_eq!(h.slots[7].key_offset, 8 + 7 * 504);
        let parsed = Header::parse(&h.serialise()).unwrap();
        assert_eq!(parsed, h);
        assert_eq!(c_str(&parsed.cipher_mode), "xts-plain64");
    }

    #[test]
    fn checks_and_texts() {
        assert_eq!(corrupt(&|_| {}), "ok");
        assert_eq!(
            corrupt(&|h| h.version = 2),
            "LUKS version 2 is not supported"
        );
        assert_eq!(
            corrupt(&|h| h.cipher_name = [b'a'; 32]),
            "LUKS header cipher name is not NUL terminated"
        );
        assert_eq!(
            corrupt(&|h| h.payload_offset = 2),
            "LUKS payload is overlapping with the header"
        );
        assert_eq!(
            corrupt(&|h| h.mk_iterations = 0),
            "LUKS key iteration count is zero"
        );
        assert_eq!(
            corrupt(&|h| h.slots[3].stripes = 5),
            "Keyslot 3 is corrupted (stripes 5 != 4000)"
        );
        assert_eq!(
            corrupt(&|h| h.slots[2].active = 1),
            "Keyslot 2 state (active/disable) is corrupted"
        );
        assert_eq!(
            corrupt(&|h| h.slots[0].iterations = 0),
            "Keyslot 0 iteration count is zero"
        );
        assert!(corrupt(&|h| h.slots[0].iterations = u32::MAX)
            .starts_with("LUKS keyslot 0 iteration count 4294967295 exceeds"));
        assert_eq!(
            corrupt(&|h| h.slots[0].key_offset = 1),
            "Keyslot 0 is overlapping with the LUKS header"
        );
        assert_eq!(
            corrupt(&|h| h.slots[7].key_offset = 4000),
            "Keyslot 7 is overlapping with the encrypted payload"
        );
        assert_eq!(
            corrupt(&|h| h.slots[5].key_offset = h.slots[4].key_offset),
            "Keyslots 4 and 5 are overlapping in the header"
        );
        assert_eq!(
            corrupt(&|h| put_str(&mut h.cipher_name, "foo")),
            "Algorithm 'foo' with key size 32 bytes not supported"
        );
        assert_eq!(
            corrupt(&|h| put_str(&mut h.hash_spec, "sha2566")),
            "Hash algorithm 'sha2566' not supported"
        );
        assert_eq!(
            corrupt(&|h| put_str(&mut h.cipher_mode, "xts")),
            "Unexpected cipher mode string format 'xts'"
        );
        assert_eq!(
            corrupt(&|h| put_str(&mut h.cipher_mode, "xts-essiv")),
            "Missing IV generator hash specification"
        );
        assert_eq!(
            corrupt(&|h| put_str(&mut h.cipher_mode, "xts-essiv:sha1")),
            "No AES cipher with key size 20 available"
        );
        assert_eq!(
            corrupt(&|h| h.key_bytes = 33),
            "Algorithm 'aes' with key size 16 bytes not supported"
        );
        assert_eq!(Header::parse(&[0u8; 100]), Err(HeaderError::NotLuks));
        let mut h = sample();
        h.key_bytes = u32::MAX;
        assert!(Header::parse(&h.serialise()).is_err());
    }
}

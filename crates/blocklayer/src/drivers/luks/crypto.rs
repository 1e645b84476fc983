//! The cryptography LUKS needs, over RustCrypto crates (`aes`, which uses AES-NI when
//! the CPU has it, `cbc`, `pbkdf2`, `sha1`, `sha2`): the algorithm names QEMU uses,
//! sector encryption with an IV generator (plain, plain64, essiv), PBKDF2, and the
//! anti-forensic splitter (AF split/merge) of the LUKS specification.
//!
//! XTS is composed here over `aes`'s multi-block calls ([`Xts`]) rather than taken
//! from the `xts-mode` crate, which encrypts one block at a time and so leaves
//! AES-NI's pipelining unused (464 MB/s against several GB/s); the tests check it
//! against `xts-mode` block for block.

use aes::cipher::{
    consts::U16, inout::InOutBuf, BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt,
    BlockModeEncrypt, KeyInit,
};
use aes::{Aes128, Aes192, Aes256};
use sha2::Digest;

/// Sector size of the encryption (IVs count 512-byte sectors).
pub const SECTOR: usize = 512;
/// AES block and IV size.
const BLOCK: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("Cipher mode '{0}' not supported by vubd (xts and cbc are)")]
    Mode(&'static str),
    #[error("Data length {0} is not a multiple of the sector size 512")]
    Length(usize),
    #[error("Invalid key length {0}")]
    KeyLength(usize),
}

pub type Result<T> = std::result::Result<T, CryptoError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherAlg {
    Aes128,
    Aes192,
    Aes256,
}

impl CipherAlg {
    /// QEMU's name (`cipher-alg`).
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256]
            .into_iter()
            .find(|a| a.name() == name)
    }

    /// The name in a LUKS header.
    pub fn luks_name(self) -> &'static str {
        "aes"
    }

    /// The header's cipher name and key length (per cipher, halved for XTS).
    pub fn from_luks(name: &str, key_bytes: u32) -> Option<Self> {
        if name != "aes" {
            return None;
        }
        Self::aes_for_key(key_bytes as usize)
    }

    pub fn aes_for_key(key_bytes: usize) -> Option<Self> {
        match key_bytes {
            16 => Some(CipherAlg::Aes128),
            24 => Some(CipherAlg::Aes192),
            32 => Some(CipherAlg::Aes256),
            _ => None,
        }
    }

    pub fn key_bytes(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }
}

/// QEMU's cipher modes; vubd runs xts and cbc (QEMU's defaults and the common ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    Ecb,
    Cbc,
    Xts,
    Ctr,
}

impl CipherMode {
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
            CipherMode::Ctr => "ctr",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            CipherMode::Ecb,
            CipherMode::Cbc,
            CipherMode::Xts,
            CipherMode::Ctr,
        ]
        .into_iter()
        .find(|m| m.name() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGenAlg {
    Plain,
    Plain64,
    Essiv,
}

impl IvGenAlg {
    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [IvGenAlg::Plain, IvGenAlg::Plain64, IvGenAlg::Essiv]
            .into_iter()
            .find(|g| g.name() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlg {
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            HashAlg::Sha1,
            HashAlg::Sha224,
            HashAlg::Sha256,
            HashAlg::Sha384,
            HashAlg::Sha512,
        ]
        .into_iter()
        .find(|h| h.name() == name)
    }

    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The digest of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            HashAlg::Sha1 => run::<sha1::Sha1>(parts),
            HashAlg::Sha224 => run::<sha2::Sha224>(parts),
            HashAlg::Sha256 => run::<sha2::Sha256>(parts),
            HashAlg::Sha384 => run::<sha2::Sha384>(parts),
            HashAlg::Sha512 => run::<sha2::Sha512>(parts),
        }
    }

    /// PBKDF2-HMAC with this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            HashAlg::Sha1 => pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, out),
            HashAlg::Sha224 => pbkdf2_hmac::<sha2::Sha224>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => pbkdf2_hmac::<sha2::Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, out),
        }
    }
}

/// The algorithms of one LUKS volume, as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suite {
    pub cipher: CipherAlg,
    pub mode: CipherMode,
    pub ivgen: IvGenAlg,
    pub ivgen_hash: Option<HashAlg>,
}

impl Suite {
    /// The length of the volume key (twice the cipher's for XTS).
    pub fn key_bytes(&self) -> usize {
        match self.mode {
            CipherMode::Xts => 2 * self.cipher.key_bytes(),
            _ => self.cipher.key_bytes(),
        }
    }
}

/// An AES block cipher of any key size.
#[derive(Clone)]
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    fn new(key: &[u8]) -> Result<Aes> {
        let bad = |_| CryptoError::KeyLength(key.len());
        Ok(match key.len() {
            16 => Aes::A128(Aes128::new_from_slice(key).map_err(bad)?),
            24 => Aes::A192(Aes192::new_from_slice(key).map_err(bad)?),
            32 => Aes::A256(Aes256::new_from_slice(key).map_err(bad)?),
            n => return Err(CryptoError::KeyLength(n)),
        })
    }

    /// Encrypts or decrypts `blocks` independently, several at a time where the CPU
    /// allows (AES-NI: 8 in flight).
    fn blocks(&self, encrypt: bool, blocks: InOutBuf<'_, '_, aes::Block>) {
        match (self, encrypt) {
            (Aes::A128(c), true) => c.encrypt_blocks_inout(blocks),
            (Aes::A128(c), false) => c.decrypt_blocks_inout(blocks),
            (Aes::A192(c), true) => c.encrypt_blocks_inout(blocks),
            (Aes::A192(c), false) => c.decrypt_blocks_inout(blocks),
            (Aes::A256(c), true) => c.encrypt_blocks_inout(blocks),
            (Aes::A256(c), false) => c.decrypt_blocks_inout(blocks),
        }
    }

    /// CBC over `buf` (a multiple of 16 bytes) starting from `iv`.
    fn cbc(&self, encrypt: bool, iv: &[u8; BLOCK], buf: &mut [u8]) {
        use cbc::cipher::InnerIvInit;
        let iv = aes::Block::from(*iv);
        macro_rules! run {
            ($c:expr) => {
                // Lengths are sector multiples: whole blocks, no padding.
                if encrypt {
                    cbc::Encryptor::inner_iv_init($c.clone(), &iv)
                        .encrypt_blocks_inout(as_blocks(buf));
                } else {
                    cbc::Decryptor::inner_iv_init($c.clone(), &iv)
                        .decrypt_blocks_inout(as_blocks(buf));
                }
            };
        }
        match self {
            Aes::A128(c) => run!(c),
            Aes::A192(c) => run!(c),
            Aes::A256(c) => run!(c),
        }
    }
}

enum Mode {
    Cbc(Box<Aes>),
    Xts(Box<Xts>),
}

/// Blocks per sector.
const SECTOR_BLOCKS: usize = SECTOR / BLOCK;

/// Sectors handled together: their IVs and tweaks are encrypted in one call to `aes`,
/// their data blocks in another (AES-NI keeps 8 blocks in flight), and the 4 KiB of
/// data and its tweaks stay in the L1 cache across the passes.
const BATCH: usize = 8;

/// `buf` (a multiple of 16 bytes) as AES blocks, without copying.
fn as_blocks(buf: &mut [u8]) -> InOutBuf<'_, '_, aes::Block> {
    InOutBuf::from(buf).into_chunks::<U16>().0
}

/// XTS-AES (IEEE 1619) for whole 512-byte sectors, as LUKS and QEMU use it: the data
/// key encrypts each block between two XORs with its tweak, the sector's IV encrypted
/// with the tweak key and multiplied by x once per block in GF(2^128). Whole sectors
/// need no ciphertext stealing. A batch of sectors goes to `aes` in one call.
struct Xts {
    data: Aes,
    tweak: Aes,
}

impl Xts {
    /// Runs XTS over the sectors whose IVs are `ivs` (at most [`BATCH`]; replaced by
    /// the encrypted IVs), with `tweaks` as scratch space. The input is `input`, or `work` itself when `None`; `work`
    /// holds the intermediate state; the result goes to `output`, or stays in `work`
    /// when `None`. `input` is read once, `output` only receives the result: guest
    /// memory there never sees an intermediate value.
    fn batch(
        &self,
        encrypt: bool,
        ivs: &mut [aes::Block],
        tweaks: &mut [u8; BATCH * SECTOR],
        input: Option<&[u8]>,
        work: &mut [u8],
        output: Option<&mut [u8]>,
    ) {
        debug_assert!(ivs.len() <= BATCH && work.len() == ivs.len() * SECTOR);
        self.tweak.blocks(true, as_blocks_of(ivs));
        let tweaks = &mut tweaks[..work.len()];
        #[cfg(target_arch = "x86_64")]
        sse2::whiten(ivs, tweaks, input, work);
        #[cfg(not(target_arch = "x86_64"))]
        whiten(ivs, tweaks, input, work);
        self.data.blocks(encrypt, as_blocks(work));
        match output {
            Some(output) => xor(output, work, tweaks),
            None => xor_in_place(work, tweaks),
        }
    }
}

/// Times x in GF(2^128): a shift, and the reduction polynomial x^128 + x^7 + x^2 + x
/// + 1 folded back in when a bit falls off the top.
fn double(t: u128) -> u128 {
    (t << 1) ^ if t >> 127 == 1 { 0x87 } else { 0 }
}

/// The first XOR of XTS, with the tweaks made on the way: for every block of the
/// sectors whose encrypted IVs are `ivs`, `work = input ^ tweak` (`input` is `work`
/// itself when `None`), and the tweak kept in `tweaks` (laid out as the data) for the
/// second XOR. A sector's first tweak is its encrypted IV, each next one the
/// previous times x. The sectors advance together, block by block, so that their
/// doubling chains (each step waits for the last) overlap instead of running one
/// after another; one pass over the data makes the tweaks and applies them.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn whiten(ivs: &[aes::Block], tweaks: &mut [u8], input: Option<&[u8]>, work: &mut [u8]) {
    let mut ts = [0u128; BATCH];
    let ts = &mut ts[..ivs.len()];
    for (t, iv) in ts.iter_mut().zip(ivs) {
        *t = u128::from_le_bytes((*iv).into());
    }
    let block = |buf: &[u8], o: usize| -> u128 {
        u128::from_le_bytes(buf[o..o + BLOCK].try_into().expect("a block"))
    };
    for j in 0..SECTOR_BLOCKS {
        for (s, t) in ts.iter_mut().enumerate() {
            let o = s * SECTOR + j * BLOCK;
            let data = block(input.unwrap_or(work), o);
            work[o..o + BLOCK].copy_from_slice(&(data ^ *t).to_le_bytes());
            tweaks[o..o + BLOCK].copy_from_slice(&t.to_le_bytes());
            *t = double(*t);
        }
    }
}

/// [`whiten`] in SSE2 registers (part of every x86-64 CPU): a tweak, its doubling and
/// its XOR stay in one register, with no split into 64-bit halves and no trip
/// through memory between the steps of a chain; a full batch keeps its 8 chains in 8
/// registers. The portable [`whiten`] and [`double`] are the reference the tests
/// compare this with.
#[cfg(target_arch = "x86_64")]
mod sse2 {
    use super::{BATCH, BLOCK, SECTOR, SECTOR_BLOCKS};
    use std::arch::x86_64::{
        __m128i, _mm_add_epi64, _mm_and_si128, _mm_loadu_si128, _mm_set_epi32, _mm_shuffle_epi32,
        _mm_srai_epi32, _mm_storeu_si128, _mm_xor_si128,
    };

    /// `t` times x in GF(2^128), `t` little-endian in the register: both 64-bit
    /// halves shifted left, the bit that leaves the low half carried into the high
    /// one, and the polynomial's low terms (0x87) folded in when the top bit leaves.
    #[inline(always)]
    pub(super) fn double(t: __m128i) -> __m128i {
        // SAFETY: SSE2 is part of the x86-64 baseline; these intrinsics only
        // compute on registers.
        unsafe {
            // Each 32-bit lane all ones where its top bit is set; lane 3 (the top
            // bit of the whole value) moves to lane 0, lane 1 (the top of the low
            // half) to lane 2.
            let signs = _mm_shuffle_epi32::<0x13>(_mm_srai_epi32::<31>(t));
            let carries = _mm_and_si128(signs, _mm_set_epi32(0, 1, 0, 0x87));
            _mm_xor_si128(_mm_add_epi64(t, t), carries)
        }
    }

    /// See [`super::whiten`].
    pub(super) fn whiten(
        ivs: &[aes::Block],
        tweaks: &mut [u8],
        input: Option<&[u8]>,
        work: &mut [u8],
    ) {
        let n = ivs.len();
        assert!(n <= BATCH && work.len() == n * SECTOR && tweaks.len() == work.len());
        assert!(input.is_none_or(|i| i.len() == work.len()));
        let src = input.map_or(work.as_ptr(), |i| i.as_ptr());
        let (dst, tw) = (work.as_mut_ptr(), tweaks.as_mut_ptr());
        let ivs = |s: usize| {
            // SAFETY: an AES block is 16 bytes; the load is unaligned.
            unsafe { _mm_loadu_si128(ivs[s].as_ptr().cast()) }
        };
        if n == BATCH {
            let mut ts: [__m128i; BATCH] = std::array::from_fn(ivs);
            for j in 0..SECTOR_BLOCKS {
                for (s, t) in ts.iter_mut().enumerate() {
                    // SAFETY: `s * SECTOR + j * BLOCK + BLOCK <= n * SECTOR`, the
                    // length of `work`, `tweaks` and `input` (asserted above).
                    unsafe { step(src, dst, tw, s * SECTOR + j * BLOCK, t) };
                }
            }
        } else {
            for s in 0..n {
                let mut t = ivs(s);
                for j in 0..SECTOR_BLOCKS {
                    // SAFETY: as above.
                    unsafe { step(src, dst, tw, s * SECTOR + j * BLOCK, &mut t) };
                }
            }
        }
    }

    /// One block at offset `o`: `dst = src ^ t`, `tw = t`, then `t` doubled.
    ///
    /// # Safety
    /// `o + 16` bytes must be valid to read at `src` and to write at `dst` and
    /// `tw` (`src` may equal `dst`).
    #[inline(always)]
    unsafe fn step(src: *const u8, dst: *mut u8, tw: *mut u8, o: usize, t: &mut __m128i) {
        // SAFETY: the caller guarantees the 16 bytes at `o`; unaligned accesses.
        unsafe {
            let d = _mm_loadu_si128(src.add(o).cast());
            _mm_storeu_si128(dst.add(o).cast(), _mm_xor_si128(d, *t));
            _mm_storeu_si128(tw.add(o).cast(), *t);
        }
        *t = double(*t);
    }
}

/// `dst = a ^ b` (equal lengths; the compiler vectorises this).
fn xor(dst: &mut [u8], a: &[u8], b: &[u8]) {
    for (d, (a, b)) in dst.iter_mut().zip(a.iter().zip(b)) {
        *d = a ^ b;
    }
}

/// `buf ^= b`.
fn xor_in_place(buf: &mut [u8], b: &[u8]) {
    for (d, b) in buf.iter_mut().zip(b) {
        *d ^= b;
    }
}

/// A slice of blocks as an in-place block buffer.
fn as_blocks_of(blocks: &mut [aes::Block]) -> InOutBuf<'_, '_, aes::Block> {
    InOutBuf::from(blocks)
}

enum IvGen {
    Plain,
    Plain64,
    /// The sector number encrypted with a key that is the hash of the volume key.
    Essiv(Box<Aes>),
}

impl IvGen {
    fn iv(&self, sector: u64) -> [u8; BLOCK] {
        let mut ivs = [aes::Block::default()];
        self.ivs(sector, &mut ivs);
        ivs[0].into()
    }

    /// The IVs of the sectors from `first` on, one per element of `ivs`.
    fn ivs(&self, first: u64, ivs: &mut [aes::Block]) {
        for (i, iv) in ivs.iter_mut().enumerate() {
            let sector = first.wrapping_add(i as u64);
            *iv = aes::Block::default();
            match self {
                IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
                IvGen::Plain64 | IvGen::Essiv(_) => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            }
        }
        if let IvGen::Essiv(c) = self {
            c.blocks(true, as_blocks_of(ivs));
        }
    }
}

/// Sector encryption with one key: QEMU's `qcrypto_block_cipher_{en,de}crypt_helper`
/// for 512-byte sectors.
pub struct SectorCipher {
    mode: Mode,
    ivgen: IvGen,
}

impl SectorCipher {
    pub fn new(suite: &Suite, key: &[u8]) -> Result<SectorCipher> {
        if key.len() != suite.key_bytes() {
            return Err(CryptoError::KeyLength(key.len()));
        }
        let mode = match suite.mode {
            CipherMode::Cbc => Mode::Cbc(Box::new(Aes::new(key)?)),
            CipherMode::Xts => {
                let (k1, k2) = key.split_at(key.len() / 2);
                Mode::Xts(Box::new(Xts {
                    data: Aes::new(k1)?,
                    tweak: Aes::new(k2)?,
                }))
            }
            m => return Err(CryptoError::Mode(m.name())),
        };
        let ivgen = match suite.ivgen {
            IvGenAlg::Plain => IvGen::Plain,
            IvGenAlg::Plain64 => IvGen::Plain64,
            IvGenAlg::Essiv => {
                let hash = suite.ivgen_hash.unwrap_or(HashAlg::Sha256);
                IvGen::Essiv(Box::new(Aes::new(&hash.digest(&[key]))?))
            }
        };
        Ok(SectorCipher { mode, ivgen })
    }

    /// The IV of sector `sector` (for tests against QEMU's).
    pub fn iv(&self, sector: u64) -> [u8; BLOCK] {
        self.ivgen.iv(sector)
    }

    /// Encrypts `buf` in place (its first sector's number `first_sector`).
    pub fn encrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<()> {
        self.run(true, first_sector, None, buf, None)
    }

    /// Decrypts `buf` in place.
    pub fn decrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<()> {
        self.run(false, first_sector, None, buf, None)
    }

    /// Encrypts `src` into `dst` (of the same length), reading `src` once: a copy
    /// and an encryption in one pass over the data.
    pub fn encrypt_to(&self, first_sector: u64, src: &[u8], dst: &mut [u8]) -> Result<()> {
        if src.len() != dst.len() {
            return Err(CryptoError::Length(src.len()));
        }
        self.run(true, first_sector, Some(src), dst, None)
    }

    /// Decrypts `buf` into `dst` (of the same length), using `buf` as the work space
    /// (its contents are lost): `dst` only ever receives plaintext.
    pub fn decrypt_to(&self, first_sector: u64, buf: &mut [u8], dst: &mut [u8]) -> Result<()> {
        if buf.len() != dst.len() {
            return Err(CryptoError::Length(dst.len()));
        }
        self.run(false, first_sector, None, buf, Some(dst))
    }

    /// Runs the cipher batch by batch; see [`Xts::batch`] for `input`, `work` and
    /// `output`.
    fn run(
        &self,
        encrypt: bool,
        first_sector: u64,
        mut input: Option<&[u8]>,
        work: &mut [u8],
        mut output: Option<&mut [u8]>,
    ) -> Result<()> {
        if !work.len().is_multiple_of(SECTOR) {
            return Err(CryptoError::Length(work.len()));
        }
        let mut sector = first_sector;
        let mut tweaks = [0u8; BATCH * SECTOR];
        for work in work.chunks_mut(BATCH * SECTOR) {
            let n = work.len();
            let (inp, rest) = input.map_or((None, None), |i| {
                let (a, b) = i.split_at(n);
                (Some(a), Some(b))
            });
            input = rest;
            let out = output.take().map(|o| o.split_at_mut(n));
            let (out, rest) = out.map_or((None, None), |(a, b)| (Some(a), Some(b)));
            output = rest;
            let mut ivs = [aes::Block::default(); BATCH];
            let ivs = &mut ivs[..n / SECTOR];
            self.ivgen.ivs(sector, ivs);
            match &self.mode {
                Mode::Xts(x) => x.batch(encrypt, ivs, &mut tweaks, inp, work, out),
                Mode::Cbc(c) => {
                    if let Some(inp) = inp {
                        work.copy_from_slice(inp);
                    }
                    for (iv, s) in ivs.iter().zip(work.chunks_exact_mut(SECTOR)) {
                        c.cbc(encrypt, &(*iv).into(), s);
                    }
                    if let Some(out) = out {
                        out.copy_from_slice(work);
                    }
                }
            }
            sector = sector.wrapping_add((n / SECTOR) as u64);
        }
        Ok(())
    }
}

/// The AF diffusion: each digest-sized piece of `buf` replaced by the hash of its
/// big-endian index and itself (the last piece truncated).
fn diffuse(hash: HashAlg, buf: &mut [u8]) {
    let ds = hash.digest_len();
    for (i, piece) in buf.chunks_mut(ds).enumerate() {
        let d = hash.digest(&[&(i as u32).to_be_bytes(), piece]);
        let n = piece.len();
        piece.copy_from_slice(&d[..n]);
    }
}

/// Joins the `stripes` stripes of `split` (each `key_len` bytes) into the key.
pub fn af_merge(hash: HashAlg, key_len: usize, stripes: usize, split: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; key_len];
    for (i, stripe) in split.chunks_exact(key_len).take(stripes).enumerate() {
        d.iter_mut().zip(stripe).for_each(|(a, b)| *a ^= b);
        if i + 1 < stripes {
            diffuse(hash, &mut d);
        }
    }
    d
}

/// Splits `key` into `stripes` stripes, all but the last from `random` (which must
/// hold `(stripes - 1) * key.len()` bytes).
pub fn af_split(hash: HashAlg, key: &[u8], stripes: usize, random: &[u8]) -> Vec<u8> {
    let n = key.len();
    let mut out = Vec::with_capacity(n * stripes);
    let mut d = vec![0u8; n];
    for stripe in random.chunks_exact(n).take(stripes - 1) {
        out.extend_from_slice(stripe);
        d.iter_mut().zip(stripe).for_each(|(a, b)| *a ^= b);
        diffuse(hash, &mut d);
    }
    out.extend(d.iter().zip(key).map(|(a, b)| a ^ b));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suite(mode: CipherMode, ivgen: IvGenAlg) -> Suite {
        Suite {
            cipher: CipherAlg::Aes256,
            mode,
            ivgen,
            ivgen_hash: (ivgen == IvGenAlg::Essiv).then_some(HashAlg::Sha256),
        }
    }

    #[test]
    fn plain_ivs() {
        let s = suite(CipherMode::Xts, IvGenAlg::Plain64);
        let c = SectorCipher::new(&s, &[1u8; 64]).unwrap();
        let mut want = [0u8; 16];
        want[..8].copy_from_slice(&0x1_0000_0002u64.to_le_bytes());
        assert_eq!(c.iv(0x1_0000_0002), want);
        let s = suite(CipherMode::Xts, IvGenAlg::Plain);
        let c = SectorCipher::new(&s, &[1u8; 64]).unwrap();
        let mut want = [0u8; 16];
        want[0] = 2;
        assert_eq!(c.iv(0x1_0000_0002), want, "plain keeps the low 32 bits");
    }

    #[test]
    fn round_trips() {
        for mode in [CipherMode::Xts, CipherMode::Cbc] {
            for ivgen in [IvGenAlg::Plain, IvGenAlg::Plain64, IvGenAlg::Essiv] {
                let s = suite(mode, ivgen);
                let c = SectorCipher::new(&s, &vec![7u8; s.key_bytes()]).unwrap();
                let plain: Vec<u8> = (0..2048).map(|i| i as u8).collect();
                let mut buf = plain.clone();
                c.encrypt(5, &mut buf).unwrap();
                assert_ne!(buf, plain);
                // Same data in two sectors encrypts differently (the IV differs).
                assert_ne!(buf[..512], buf[512..1024]);
                c.decrypt(5, &mut buf).unwrap();
                assert_eq!(buf, plain);
            }
        }
        let s = suite(CipherMode::Ecb, IvGenAlg::Plain64);
        assert!(SectorCipher::new(&s, &[0; 32]).is_err());
    }

    #[test]
    fn af_split_merge() {
        let key: Vec<u8> = (0..64).collect();
        let random: Vec<u8> = (0..64 * 3999).map(|i| (i * 7) as u8).collect();
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            let split = af_split(hash, &key, 4000, &random);
            assert_eq!(split.len(), 64 * 4000);
            assert_eq!(af_merge(hash, 64, 4000, &split), key);
        }
    }
}

#[cfg(test)]
mod xts_equivalence {
    use super::*;
    use xts_mode::Xts128;

    /// A xorshift generator of test data from `seed`.
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// Our XTS gives the `xts-mode` crate's output, sector for sector, for every key
    /// size, both ways, in place and out of place, over a length that is not a whole
    /// number of batches.
    #[test]
    fn matches_the_xts_mode_crate() {
        let mut rng = xorshift(0x9e37_79b9_7f4a_7c15);
        let mut next = || rng() as u8;
        for key_len in [32usize, 48, 64] {
            let key: Vec<u8> = (0..key_len).map(|_| next()).collect();
            let data: Vec<u8> = (0..(2 * BATCH + 3) * SECTOR).map(|_| next()).collect();
            let (k1, k2) = key.split_at(key_len / 2);
            let suite = Suite {
                cipher: CipherAlg::aes_for_key(key_len / 2).unwrap(),
                mode: CipherMode::Xts,
                ivgen: IvGenAlg::Plain64,
                ivgen_hash: None,
            };
            let ours = SectorCipher::new(&suite, &key).unwrap();
            let mut theirs = data.clone();
            macro_rules! crate_xts {
                ($t:ty) => {{
                    let x = Xts128::<$t>::new(
                        <$t>::new_from_slice(k1).unwrap(),
                        <$t>::new_from_slice(k2).unwrap(),
                    );
                    for (i, s) in theirs.chunks_exact_mut(SECTOR).enumerate() {
                        x.encrypt_sector(s, IvGen::Plain64.iv(1000 + i as u64).into());
                    }
                }};
            }
            match key_len {
                32 => crate_xts!(Aes128),
                48 => crate_xts!(Aes192),
                _ => crate_xts!(Aes256),
            }
            let mut mine = data.clone();
            ours.encrypt(1000, &mut mine).unwrap();
            assert_eq!(mine, theirs, "encryption, {key_len}-byte key");
            let mut copied = vec![0u8; data.len()];
            ours.encrypt_to(1000, &data, &mut copied).unwrap();
            assert_eq!(
                copied, theirs,
                "encryption out of place, {key_len}-byte key"
            );
            let mut plain = vec![0u8; data.len()];
            ours.decrypt_to(1000, &mut copied, &mut plain).unwrap();
            assert_eq!(plain, data, "decryption out of place, {key_len}-byte key");
            ours.decrypt(1000, &mut mine).unwrap();
            assert_eq!(mine, data, "decryption, {key_len}-byte key");
        }
    }

    /// The SSE2 doubling and whitening give the portable ones' results, for a full
    /// batch and a short one, in place and out of place.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sse2_matches_portable() {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_storeu_si128};
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for i in 0..10_000 {
            let t = match i {
                0 => 1u128 << 127,
                1 => u128::MAX,
                2 => 1u128 << 63,
                _ => (next() as u128) << 64 | next() as u128,
            };
            let bytes = t.to_le_bytes();
            // SAFETY: 16-byte unaligned load and store of local arrays.
            let got = unsafe {
                let r: __m128i = sse2::double(_mm_loadu_si128(bytes.as_ptr().cast()));
                let mut out = [0u8; 16];
                _mm_storeu_si128(out.as_mut_ptr().cast(), r);
                u128::from_le_bytes(out)
            };
            assert_eq!(got, double(t), "{t:#x}");
        }
        for n in [BATCH, 3] {
            let ivs: Vec<aes::Block> = (0..n)
                .map(|_| {
                    let mut b = aes::Block::default();
                    b.iter_mut().for_each(|x| *x = next() as u8);
                    b
                })
                .collect();
            let data: Vec<u8> = (0..n * SECTOR).map(|_| next() as u8).collect();
            let mut tweaks = [vec![0u8; n * SECTOR], vec![0u8; n * SECTOR]];
            let mut work = [data.clone(), data.clone()];
            whiten(&ivs, &mut tweaks[0], None, &mut work[0]);
            sse2::whiten(&ivs, &mut tweaks[1], None, &mut work[1]);
            assert_eq!(tweaks[0], tweaks[1], "in place, {n} sectors");
            assert_eq!(work[0], work[1], "in place, {n} sectors");
            let mut out = [vec![0u8; n * SECTOR], vec![1u8; n * SECTOR]];
            whiten(&ivs, &mut tweaks[0], Some(&data), &mut out[0]);
            sse2::whiten(&ivs, &mut tweaks[1], Some(&data), &mut out[1]);
            assert_eq!(out[0], out[1], "out of place, {n} sectors");
            assert_eq!(out[0], work[0], "out of place, {n} sectors");
        }
    }

    /// CBC and ESSIV give the same results in place and out of place.
    #[test]
    fn out_of_place_matches_in_place() {
        for ivgen in [IvGenAlg::Plain, IvGenAlg::Plain64, IvGenAlg::Essiv] {
            for mode in [CipherMode::Cbc, CipherMode::Xts] {
                let s = Suite {
                    cipher: CipherAlg::Aes256,
                    mode,
                    ivgen,
                    ivgen_hash: Some(HashAlg::Sha256),
                };
                let c = SectorCipher::new(&s, &vec![3u8; s.key_bytes()]).unwrap();
                let data: Vec<u8> = (0..(BATCH + 5) * SECTOR).map(|i| (i * 31) as u8).collect();
                let mut inplace = data.clone();
                c.encrypt(77, &mut inplace).unwrap();
                let mut out = vec![0u8; data.len()];
                c.encrypt_to(77, &data, &mut out).unwrap();
                assert_eq!(out, inplace, "{mode:?}/{ivgen:?}");
                let mut plain = vec![0u8; data.len()];
                c.decrypt_to(77, &mut out, &mut plain).unwrap();
                assert_eq!(plain, data, "{mode:?}/{ivgen:?}");
                assert!(c.encrypt_to(0, &data, &mut plain[..512]).is_err());
            }
        }
    }
}

#[cfg(test)]
mod throughput {
    use super::*;

    /// This thread's CPU time: throughput per CPU second, as `openssl speed` reports
    /// it, is not lowered by other processes taking turns on the CPU.
    fn cpu_time() -> f64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for the call to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    }

    /// MB per CPU second since `t` (a [`cpu_time`]).
    fn rate(bytes: f64, t: f64) -> f64 {
        bytes / (cpu_time() - t) / 1e6
    }

    /// Throughput of sector encryption on 64 KiB buffers per CPU second, against the
    /// bound of raw AES blocks from the same crate (run with `--release -- --ignored
    /// --nocapture`; compare `openssl speed -evp aes-256-xts -bytes 65536`).
    #[test]
    #[ignore]
    fn sector_cipher_throughput() {
        let n = 8000u64;
        let bytes = n as f64 * 65536.0;
        let mut buf = vec![1u8; 64 << 10];
        let mut dst = vec![0u8; 64 << 10];
        let raw = Aes::new(&[5u8; 32]).unwrap();
        for encrypt in [true, false] {
            let t = cpu_time();
            for _ in 0..n {
                raw.blocks(encrypt, as_blocks(&mut buf));
            }
            eprintln!(
                "raw aes-256 blocks, encrypt={encrypt}: {:.0} MB/s",
                rate(bytes, t)
            );
        }
        for (mode, ivgen) in [
            (CipherMode::Xts, IvGenAlg::Plain64),
            (CipherMode::Cbc, IvGenAlg::Essiv),
        ] {
            let s = Suite {
                cipher: CipherAlg::Aes256,
                mode,
                ivgen,
                ivgen_hash: Some(HashAlg::Sha256),
            };
            let c = SectorCipher::new(&s, &vec![5u8; s.key_bytes()]).unwrap();
            let t = cpu_time();
            for i in 0..n {
                c.encrypt(i * 128, &mut buf).unwrap();
            }
            eprintln!("{mode:?}/{ivgen:?} encrypt: {:.0} MB/s", rate(bytes, t));
            let t = cpu_time();
            for i in 0..n {
                c.decrypt(i * 128, &mut buf).unwrap();
            }
            eprintln!("{mode:?}/{ivgen:?} decrypt: {:.0} MB/s", rate(bytes, t));
            let t = cpu_time();
            for i in 0..n {
                c.encrypt_to(i * 128, &buf, &mut dst).unwrap();
            }
            eprintln!("{mode:?}/{ivgen:?} encrypt_to: {:.0} MB/s", rate(bytes, t));
            let t = cpu_time();
            for i in 0..n {
                c.decrypt_to(i * 128, &mut buf, &mut dst).unwrap();
            }
            eprintln!("{mode:?}/{ivgen:?} decrypt_to: {:.0} MB/s", rate(bytes, t));
        }
    }
}

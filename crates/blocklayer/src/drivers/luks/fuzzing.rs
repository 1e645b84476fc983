//! The `luks_header` fuzz target (run through `vubd::fuzzing` by the cargo-fuzz crate
//! and the stable corpus replay): the input is an image's first bytes.
//!
//! Every input is parsed as a LUKS header; a header that parses must serialise back
//! to the same fields and name algorithms or fail with a clear error. When every
//! iteration count is small (so that one case stays fast), the volume is unlocked
//! with a fixed passphrase, key material read from the input itself: key slot
//! decryption and AF merge run on hostile bytes, and must fail cleanly.

use super::header::Header;
use super::volume::Volume;

/// Iteration counts above this are parsed but not run (they are legal, only slow).
const RUN_ITERATIONS: u32 = 16;

pub fn luks_header(data: &[u8]) {
    let Ok(h) = Header::parse(data) else {
        return;
    };
    let again = Header::parse(&h.serialise()).expect("a parsed header parses again");
    assert_eq!(again, h);
    if h.algorithms().is_err() {
        return;
    }
    let cheap = h.mk_iterations <= RUN_ITERATIONS
        && h.slots
            .iter()
            .all(|s| !s.is_enabled() || s.iterations <= RUN_ITERATIONS);
    if !cheap {
        return;
    }
    let read = |off: u64, len: usize| {
        let start = usize::try_from(off).unwrap_or(usize::MAX);
        match data.get(start..start.saturating_add(len)) {
            Some(b) => Ok(b.to_vec()),
            None => Err(crate::BlockError::Graph("past the end".into())),
        }
    };
    let _ = Volume::open(data, b"vubd-fuzz", read);
}

/// Seed inputs: a header with one cheap key slot and its material, for each mode.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use super::crypto::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
    use super::header::Algorithms;
    use super::volume::{format, CreateParams};
    let mut out = Vec::new();
    for (name, mode, ivgen, hash) in [
        (
            "xts-plain64-sha256",
            CipherMode::Xts,
            IvGenAlg::Plain64,
            HashAlg::Sha256,
        ),
        (
            "cbc-essiv-sha1",
            CipherMode::Cbc,
            IvGenAlg::Essiv,
            HashAlg::Sha1,
        ),
        (
            "cbc-plain-sha512",
            CipherMode::Cbc,
            IvGenAlg::Plain,
            HashAlg::Sha512,
        ),
    ] {
        let algs = Algorithms {
            cipher: CipherAlg::Aes128,
            mode,
            ivgen,
            ivgen_hash: (ivgen == IvGenAlg::Essiv).then_some(HashAlg::Sha256),
            hash,
        };
        let params = CreateParams {
            algs,
            password: b"vubd-fuzz".to_vec(),
            iter_time_ms: 0,
        };
        let (mut bytes, v) = format(&params).expect("format");
        // Cheap counts (format's minimum is QEMU's 1000): rewrite them, then the
        // material no longer matches, which is also worth fuzzing; the digest check
        // fails cleanly.
        let mut h = v.header.clone();
        h.mk_iterations = 1;
        h.slots[0].iterations = 1;
        bytes[..super::header::HEADER_LEN].copy_from_slice(&h.serialise());
        // Up to the end of slot 0's material.
        let end = h.slots[0].key_offset as usize * 512 + algs.key_bytes() * 4000;
        bytes.truncate(end);
        out.push((name.to_string(), bytes));
    }
    out
}

//! QEMU's `QCryptoBlockInfoLUKS`, typed: what `format-specific` reports of a LUKS
//! header (a `luks` node's `data`, a qcow2 image's `encrypt`), read from the header
//! alone (no passphrase needed, as `qemu-img info`).

use super::crypto::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
use super::header::{Algorithms, Header, SECTOR};
use serde::Serialize;

/// QEMU's `QCryptoBlockInfoLUKS`. The members are in the order vubd has always
/// written them (`ivgen-hash-alg`, optional, last).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LuksInfo {
    pub cipher_alg: CipherAlg,
    pub cipher_mode: CipherMode,
    pub ivgen_alg: IvGenAlg,
    pub hash_alg: HashAlg,
    pub payload_offset: u64,
    pub master_key_iters: u32,
    pub uuid: String,
    pub slots: Vec<LuksSlotInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ivgen_hash_alg: Option<HashAlg>,
}

/// QEMU's `QCryptoBlockInfoLUKSSlot`: `iters` and `stripes` only for an active slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LuksSlotInfo {
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iters: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripes: Option<u32>,
    pub key_offset: u64,
}

impl LuksInfo {
    /// The info of header `h`, whose algorithms are `algs`.
    pub fn of_header(h: &Header, algs: &Algorithms) -> Self {
        let slots = h
            .slots
            .iter()
            .map(|s| {
                let active = s.is_enabled();
                LuksSlotInfo {
                    active,
                    iters: active.then_some(s.iterations),
                    stripes: active.then_some(s.stripes),
                    key_offset: s.key_offset as u64 * SECTOR,
                }
            })
            .collect();
        LuksInfo {
            cipher_alg: algs.cipher,
            cipher_mode: algs.mode,
            ivgen_alg: algs.ivgen,
            hash_alg: algs.hash,
            payload_offset: h.payload_bytes(),
            master_key_iters: h.mk_iterations,
            uuid: h.uuid(),
            slots,
            ivgen_hash_alg: algs.ivgen_hash,
        }
    }
}

// The algorithms serialise as their QEMU names (`QCryptoCipherAlgorithm`, ...).
crate::serialize_by_name!(CipherAlg, CipherMode, IvGenAlg, HashAlg);

/// An example (for tests pinning the wire shape).
#[cfg(test)]
pub(crate) fn example() -> LuksInfo {
    LuksInfo {
        cipher_alg: CipherAlg::Aes256,
        cipher_mode: CipherMode::Cbc,
        ivgen_alg: IvGenAlg::Essiv,
        hash_alg: HashAlg::Sha256,
        payload_offset: 2097152,
        master_key_iters: 1000,
        uuid: "6c0b4e1a-0000-4000-8000-000000000001".into(),
        slots: vec![
            LuksSlotInfo {
                active: true,
                iters: Some(2000),
                stripes: Some(4000),
                key_offset: 4096,
            },
            LuksSlotInfo {
                active: false,
                iters: None,
                stripes: None,
                key_offset: 262144,
            },
        ],
        ivgen_hash_alg: Some(HashAlg::Sha256),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire shape of `QCryptoBlockInfoLUKS`, pinned.
    #[test]
    fn luks_info_as_vubd_writes_it() {
        assert_eq!(
            serde_json::to_string(&example()).unwrap(),
            r#"{"cipher-alg":"aes-256","cipher-mode":"cbc","ivgen-alg":"essiv","hash-alg":"sha256","payload-offset":2097152,"master-key-iters":1000,"uuid":"6c0b4e1a-0000-4000-8000-000000000001","slots":[{"active":true,"iters":2000,"stripes":4000,"key-offset":4096},{"active":false,"key-offset":262144}],"ivgen-hash-alg":"sha256"}"#
        );
        let plain = LuksInfo {
            ivgen_hash_alg: None,
            slots: vec![],
            ..example()
        };
        let v = serde_json::to_value(&plain).unwrap();
        assert!(v.get("ivgen-hash-alg").is_none());
    }
}

//! Adding and erasing key slots of an unlocked volume (QEMU's LUKS amend:
//! `state=active` with `new-secret`, `state=inactive` with `keyslot` or `old-secret`),
//! with QEMU 7.2's rules and texts. The result is the list of writes to make: key
//! material first, the header last.

use super::create::DEFAULT_ITER_TIME;
use super::header::{Algorithms, Header, NUM_SLOTS, SLOT_DISABLED};
use super::volume::{fill_slot, random_bytes, unlock_slot, Volume, VolumeError};
use crate::options::coerce::Fields;
use crate::secret::{SecretError, Secrets};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Active,
    Inactive,
}

/// QEMU's `QCryptoBlockAmendOptionsLUKS`, the secrets already looked up.
#[derive(Debug, Clone)]
pub struct AmendOptions {
    pub state: SlotState,
    pub keyslot: Option<i64>,
    pub old_password: Option<Vec<u8>>,
    pub new_password: Option<Vec<u8>>,
    /// Milliseconds of PBKDF2 for a new slot (QEMU's default 2000).
    pub iter_time_ms: u64,
}

/// Writes to make, in order: (offset in the image, bytes).
pub type Writes = Vec<(u64, Vec<u8>)>;

fn generic(msg: impl Into<String>) -> VolumeError {
    VolumeError::Amend(msg.into())
}

/// Changes `header` as `o` asks; `force` allows erasing the last usable slots and
/// overwriting an active one, as in QEMU. Adding a slot needs the volume key
/// (`master_key`, from unlocking the volume); erasing does not.
pub fn amend(
    header: &mut Header,
    algs: &Algorithms,
    master_key: Option<&[u8]>,
    o: &AmendOptions,
    force: bool,
    mut read: impl FnMut(u64, usize) -> Result<Vec<u8>, crate::BlockError>,
) -> Result<Writes, VolumeError> {
    let slot = match o.keyslot {
        Some(k) if !(0..NUM_SLOTS as i64).contains(&k) => {
            // QEMU prints the slot unsigned.
            return Err(generic(format!(
                "Invalid keyslot {} specified, must be between 0 and {}",
                k as u32,
                NUM_SLOTS - 1
            )));
        }
        k => k.map(|k| k as usize),
    };
    let mut writes = Writes::new();
    match o.state {
        SlotState::Active => {
            let Some(new) = &o.new_password else {
                return Err(generic("'new-secret' is required to activate a keyslot"));
            };
            if o.old_password.is_some() {
                return Err(generic(
                    "'old-secret' must not be given when activating keyslots",
                ));
            }
            let i = match slot {
                Some(i) if header.slots[i].is_enabled() && !force => {
                    return Err(generic(format!(
                        "Refusing to overwrite active keyslot {i} - please erase it first"
                    )))
                }
                Some(i) => i,
                None => header
                    .slots
                    .iter()
                    .position(|s| !s.is_enabled())
                    .ok_or_else(|| generic("Can't add a keyslot - all keyslots are in use"))?,
            };
            let key = master_key.ok_or(VolumeError::WrongPassword)?;
            let (offset, material) = fill_slot(header, algs, i, key, new, o.iter_time_ms)?;
            writes.push((offset, material));
        }
        SlotState::Inactive => {
            let active: Vec<usize> = (0..NUM_SLOTS)
                .filter(|&i| header.slots[i].is_enabled())
                .collect();
            let erase: Vec<usize> = match (slot, &o.old_password) {
                (Some(i), _) => {
                    if !header.slots[i].is_enabled() {
                        return Err(generic(format!(
                            "Given keyslot {i} is already erased (inactive) "
                        )));
                    }
                    if active.len() == 1 && !force {
                        return Err(generic(format!(
                            "Attempt to erase the only active keyslot {i} which will erase \
                             all the data in the image irreversibly - refusing operation"
                        )));
                    }
                    if let Some(old) = &o.old_password {
                        let key = unlock_slot(header, algs, i, old, &mut read)?;
                        if key.is_none() {
                            return Err(generic(format!(
                                "Given keyslot {i} doesn't contain the given old password \
                                 for erase operation"
                            )));
                        }
                    }
                    vec![i]
                }
                (None, Some(old)) => {
                    let mut matching = Vec::new();
                    for &i in &active {
                        if unlock_slot(header, algs, i, old, &mut read)?.is_some() {
                            matching.push(i);
                        }
                    }
                    if matching.is_empty() {
                        return Err(generic(
                            "No keyslots match given (old) password for erase operation",
                        ));
                    }
                    if matching.len() == active.len() && !force {
                        return Err(generic(
                            "All the active keyslots match the (old) password that was given \
                             and erasing them will erase all the data in the image \
                             irreversibly - refusing operation",
                        ));
                    }
                    matching
                }
                (None, None) => {
                    return Err(generic(
                        "To erase keyslot(s), either explicit keyslot index or the password \
                         currently contained in them must be given",
                    ))
                }
            };
            let len = algs.key_bytes() * super::header::STRIPES as usize;
            for i in erase {
                // The material is overwritten with random bytes, then the slot disabled.
                let mut garbage = vec![0u8; len];
                random_bytes(&mut garbage)?;
                let s = &mut header.slots[i];
                writes.push((s.key_offset as u64 * super::header::SECTOR, garbage));
                s.active = SLOT_DISABLED;
                s.iterations = 0;
                s.salt = [0; super::header::SALT_LEN];
            }
        }
    }
    writes.push((0, header.serialise().to_vec()));
    Ok(writes)
}

/// QEMU's `QCryptoBlockAmendOptionsLUKS` as given: the secrets by id (the
/// `x-blockdev-amend` options of `luks`, `encrypt` of `qcow2`, and `qemu-img amend`'s
/// `-o`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmendRequest {
    pub state: SlotState,
    pub keyslot: Option<i64>,
    pub old_secret: Option<String>,
    pub new_secret: Option<String>,
    /// The secret that unlocks the volume for the change, instead of the one it was
    /// opened with.
    pub secret: Option<String>,
    pub iter_time: Option<u64>,
}

impl AmendRequest {
    /// Takes the members from `f` (`state` is required).
    pub fn take_from(f: &mut Fields) -> crate::options::Result<Self> {
        let state = f.enumeration(
            "state",
            &[
                ("active", SlotState::Active),
                ("inactive", SlotState::Inactive),
            ],
        )?;
        let state = f.required("state", state)?;
        Ok(AmendRequest {
            state,
            new_secret: f.string("new-secret")?,
            old_secret: f.string("old-secret")?,
            secret: f.string("secret")?,
            keyslot: f.int("keyslot")?,
            iter_time: f.uint("iter-time")?,
        })
    }

    /// Looks the secrets up: the passphrase that unlocks the volume to add a slot
    /// (`secret`, or `key_secret`, the one it was opened with, as QEMU; erasing
    /// needs none), and the options.
    pub fn resolve(
        &self,
        secrets: &Secrets,
        key_secret: &str,
    ) -> Result<(Option<Vec<u8>>, AmendOptions), SecretError> {
        let lookup = |id: &str| secrets.lookup_utf8(id).map(String::into_bytes);
        let unlock = match self.state {
            SlotState::Active => Some(lookup(self.secret.as_deref().unwrap_or(key_secret))?),
            SlotState::Inactive => None,
        };
        let opts = AmendOptions {
            state: self.state,
            keyslot: self.keyslot,
            old_password: self.old_secret.as_deref().map(lookup).transpose()?,
            new_password: self.new_secret.as_deref().map(lookup).transpose()?,
            iter_time_ms: self.iter_time.unwrap_or(DEFAULT_ITER_TIME),
        };
        Ok((unlock, opts))
    }
}

/// Amends the LUKS volume whose header and key material are the `area` bytes that
/// `read` and `write` reach (offsets relative to the header): unlocks it with
/// `password` to add a slot (erasing needs no unlocking, as in QEMU), changes the
/// key slots as `o` asks and writes the result, key material first and the header
/// last. Like QEMU, the change stays within the area (a LUKS1
/// header has room for the material of all its slots from creation on). Returns the
/// new header's info (QEMU's `QCryptoBlockInfoLUKS`).
pub fn amend_area(
    area: u64,
    password: Option<&[u8]>,
    o: &AmendOptions,
    force: bool,
    mut read: impl FnMut(u64, usize) -> Result<Vec<u8>, crate::BlockError>,
    mut write: impl FnMut(u64, &[u8]) -> Result<(), crate::BlockError>,
) -> Result<super::info::LuksInfo, crate::BlockError> {
    let graph = |e: VolumeError| crate::BlockError::Graph(e.to_string());
    let mut bounded = |off: u64, len: usize| {
        if off.checked_add(len as u64).is_none_or(|end| end > area) {
            return Err(crate::BlockError::Graph(format!(
                "key material at {off}+{len} is past the end of the LUKS header area \
                 ({area} bytes)"
            )));
        }
        read(off, len)
    };
    let head = bounded(0, (super::header::HEADER_LEN as u64).min(area) as usize)?;
    let unlocked = match password {
        Some(p) => Some(Volume::open(&head, p, &mut bounded).map_err(graph)?),
        None => None,
    };
    let mut header = match &unlocked {
        Some(v) => v.header.clone(),
        None => Header::parse(&head).map_err(|e| graph(e.into()))?,
    };
    let algs = match &unlocked {
        Some(v) => v.algs,
        None => header.algorithms().map_err(|e| graph(e.into()))?,
    };
    let key = unlocked.as_ref().map(Volume::master_key);
    let writes = amend(&mut header, &algs, key, o, force, &mut bounded).map_err(graph)?;
    for (off, bytes) in &writes {
        if off
            .checked_add(bytes.len() as u64)
            .is_none_or(|end| end > area)
        {
            return Err(crate::BlockError::Graph(
                "Request for data outside of extension header".into(),
            ));
        }
    }
    for (off, bytes) in writes {
        write(off, &bytes)?;
    }
    Ok(super::info::LuksInfo::of_header(&header, &algs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::luks::volume::{default_algorithms, format, CreateParams};
    use std::cell::RefCell;

    fn options(state: SlotState, new: Option<&[u8]>, old: Option<&[u8]>) -> AmendOptions {
        AmendOptions {
            state,
            keyslot: None,
            old_password: old.map(<[u8]>::to_vec),
            new_password: new.map(<[u8]>::to_vec),
            iter_time_ms: 1,
        }
    }

    /// Amends the in-memory volume `image` seen as an area of `area` bytes.
    fn amend_mem(
        image: &RefCell<Vec<u8>>,
        area: u64,
        password: Option<&[u8]>,
        o: &AmendOptions,
    ) -> Result<crate::drivers::luks::info::LuksInfo, crate::BlockError> {
        amend_area(
            area,
            password,
            o,
            false,
            |off, len| Ok(image.borrow()[off as usize..off as usize + len].to_vec()),
            |off, bytes| {
                image.borrow_mut()[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
                Ok(())
            },
        )
    }

    #[test]
    fn add_then_erase_in_place() {
        let p = CreateParams {
            algs: default_algorithms(),
            password: b"old".to_vec(),
            iter_time_ms: 1,
        };
        let (bytes, _) = format(&p).unwrap();
        let area = bytes.len() as u64;
        let image = RefCell::new(bytes);
        let info = amend_mem(
            &image,
            area,
            Some(b"old"),
            &options(SlotState::Active, Some(b"new"), None),
        )
        .unwrap();
        assert!(info.slots[1].active);
        assert_eq!(image.borrow().len() as u64, area);
        let info = amend_mem(
            &image,
            area,
            None,
            &options(SlotState::Inactive, None, Some(b"old")),
        )
        .unwrap();
        assert!(!info.slots[0].active);
        let read =
            |off: u64, len: usize| Ok(image.borrow()[off as usize..off as usize + len].to_vec());
        let head = image.borrow().clone();
        assert!(Volume::open(&head, b"new", read).is_ok());
        assert!(matches!(
            Volume::open(&head, b"old", read),
            Err(VolumeError::WrongPassword)
        ));
    }

    #[test]
    fn never_writes_past_the_area() {
        let p = CreateParams {
            algs: default_algorithms(),
            password: b"old".to_vec(),
            iter_time_ms: 1,
        };
        let (bytes, v) = format(&p).unwrap();
        // The area ends before slot 1's key material: the slot cannot be filled.
        let area = v.header.slots[1].key_offset as u64 * crate::drivers::luks::header::SECTOR;
        let before = bytes.clone();
        let image = RefCell::new(bytes);
        let mut o = options(SlotState::Active, Some(b"new"), None);
        o.keyslot = Some(1);
        let e = amend_mem(&image, area, Some(b"old"), &o).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Request for data outside of extension header"
        );
        assert_eq!(*image.borrow(), before);
    }
}

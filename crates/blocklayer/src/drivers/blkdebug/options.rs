//! The options of `blkdebug` (QEMU's `BlockdevOptionsBlkdebug`, the rules vubd can
//! fire).

use super::BlkdebugDriver;
use crate::driver::Driver;
use crate::drivers::OpenCtx;
use crate::edge::Role;
use crate::options::coerce::{self, Fields};
use crate::options::{
    bad_value, choice_name, BlockdevRef, CommonOptions, DriverOptions, OptionsError, Result,
};
use serde_json::{json, Map, Value};

/// The request kinds a blkdebug rule applies to (QEMU's `BlkdebugIOType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkdebugIoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

/// One `inject-error` rule of a blkdebug node (QEMU's `BlkdebugInjectErrorOptions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectErrorOptions {
    /// `event`: the request event that arms the rule (see the blkdebug driver).
    pub event: String,
    /// `state`: the rule applies only in this state (blkdebug starts in state 1).
    pub state: Option<i64>,
    /// `iotype`: the kind of request that fails (default: every kind but
    /// block-status).
    pub iotype: Option<BlkdebugIoType>,
    /// `errno` (default EIO)
    pub errno: i32,
    /// `sector`: only requests covering this sector fail (default -1: any).
    pub sector: i64,
    /// `once`: the rule is removed after it fired.
    pub once: bool,
    /// `immediately`: accepted (vubd always completes the failed request from the
    /// event loop).
    pub immediately: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlkdebugOptions {
    /// `image`: the child that requests go to.
    pub image: BlockdevRef,
    /// `align`: request alignment in bytes.
    pub align: Option<u32>,
    /// `max-transfer`: largest request in bytes.
    pub max_transfer: Option<u32>,
    pub inject_error: Vec<InjectErrorOptions>,
}

const IOTYPE_CHOICES: &[(&str, BlkdebugIoType)] = &[
    ("read", BlkdebugIoType::Read),
    ("write", BlkdebugIoType::Write),
    ("write-zeroes", BlkdebugIoType::WriteZeroes),
    ("discard", BlkdebugIoType::Discard),
    ("flush", BlkdebugIoType::Flush),
    ("block-status", BlkdebugIoType::BlockStatus),
];

/// QEMU 7.2's `BlkdebugEvent` names.
pub const BLKDEBUG_EVENTS: &[&str] = &[
    "l1_update",
    "l1_grow_alloc_table",
    "l1_grow_write_table",
    "l1_grow_activate_table",
    "l2_load",
    "l2_update",
    "l2_update_compressed",
    "l2_alloc_cow_read",
    "l2_alloc_write",
    "read_aio",
    "read_backing_aio",
    "read_compressed",
    "write_aio",
    "write_compressed",
    "vmstate_load",
    "vmstate_save",
    "cow_read",
    "cow_write",
    "reftable_load",
    "reftable_grow",
    "reftable_update",
    "refblock_load",
    "refblock_update",
    "refblock_update_part",
    "refblock_alloc",
    "refblock_alloc_hookup",
    "refblock_alloc_write",
    "refblock_alloc_write_blocks",
    "refblock_alloc_write_table",
    "refblock_alloc_switch_table",
    "cluster_alloc",
    "cluster_alloc_bytes",
    "cluster_free",
    "flush_to_os",
    "flush_to_disk",
    "pwritev_rmw_head",
    "pwritev_rmw_after_head",
    "pwritev_rmw_tail",
    "pwritev_rmw_after_tail",
    "pwritev",
    "pwritev_zero",
    "pwritev_done",
    "empty_image_prepare",
    "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters",
    "cor_write",
    "cluster_alloc_space",
    "none",
];

/// The events that never occur under a vubd node, as under a qemu-storage-daemon
/// one: a rule on them is accepted and never fires. `vmstate_load`/`vmstate_save`
/// come only from a VM's savevm/loadvm; `reftable_update` and
/// `empty_image_prepare` only from qcow2's make-empty (`qemu-img commit`, HMP
/// `commit`), which neither daemon has; `refblock_update` from nowhere in QEMU
/// 7.2. Every other event of [`BLKDEBUG_EVENTS`] is raised where QEMU 7.2 raises
/// it (see the driver).
pub const BLKDEBUG_NEVER_RAISED: &[&str] = &[
    "vmstate_load",
    "vmstate_save",
    "reftable_update",
    "empty_image_prepare",
    "refblock_update",
];

impl InjectErrorOptions {
    fn take_from(f: &mut Fields) -> Result<Self> {
        let event = f.required_string("event")?;
        if !BLKDEBUG_EVENTS.contains(&event.as_str()) {
            return Err(OptionsError::BadEnum {
                name: f.name("event"),
                value: event,
            });
        }
        let state = f.uint("state")?.map(|s| s as i64);
        let iotype = f.enumeration("iotype", IOTYPE_CHOICES)?;
        let errno = f.uint("errno")?.unwrap_or(libc::EIO as u64);
        let errno = i32::try_from(errno)
            .ok()
            .filter(|e| *e > 0)
            .ok_or_else(|| bad_value(&f.name("errno"), "not a valid errno"))?;
        let sector = match f.take("sector") {
            None => -1,
            Some(v) => match v.as_i64() {
                Some(n) if n >= -1 => n,
                _ => match coerce::to_uint(&f.name("sector"), &v) {
                    Ok(n) => i64::try_from(n)
                        .map_err(|_| bad_value(&f.name("sector"), "out of range"))?,
                    Err(_) if v.as_str() == Some("-1") => -1,
                    Err(e) => return Err(e),
                },
            },
        };
        Ok(InjectErrorOptions {
            event,
            state,
            iotype,
            errno,
            sector,
            once: f.bool("once")?.unwrap_or(false),
            immediately: f.bool("immediately")?.unwrap_or(false),
        })
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("event".into(), json!(self.event));
        if let Some(state) = self.state {
            m.insert("state".into(), json!(state));
        }
        if let Some(t) = self.iotype {
            m.insert("iotype".into(), json!(choice_name(IOTYPE_CHOICES, t)));
        }
        m.insert("errno".into(), json!(self.errno));
        m.insert("sector".into(), json!(self.sector));
        m.insert("once".into(), json!(self.once));
        m.insert("immediately".into(), json!(self.immediately));
        Value::Object(m)
    }
}

impl BlkdebugOptions {
    fn take_from(f: &mut Fields, common: &CommonOptions) -> Result<Self> {
        let image = BlockdevRef::take_from(f, "image", common)?;
        let pow2 = |f: &mut Fields, key: &str| -> Result<Option<u32>> {
            match f.size(key)? {
                None => Ok(None),
                Some(n) if n.is_power_of_two() && n <= u64::from(u32::MAX) => Ok(Some(n as u32)),
                Some(n) => Err(bad_value(
                    &f.name(key),
                    format!("{n} is not a power of two that fits in 32 bits"),
                )),
            }
        };
        let align = pow2(f, "align")?;
        let max_transfer = match f.size("max-transfer")? {
            None => None,
            Some(n) if n > 0 && n <= u64::from(u32::MAX) => Some(n as u32),
            Some(n) => {
                return Err(bad_value(
                    &f.name("max-transfer"),
                    format!("{n} is out of range"),
                ))
            }
        };
        let mut inject_error = Vec::new();
        let name = f.name("inject-error");
        match f.take("inject-error") {
            None => {}
            Some(Value::Array(rules)) => {
                for (i, rule) in rules.iter().enumerate() {
                    let mut rf = f.nested(rule, &format!("{name}.{i}"))?;
                    inject_error.push(InjectErrorOptions::take_from(&mut rf)?);
                    rf.finish()?;
                }
            }
            Some(_) => {
                return Err(OptionsError::Invalid {
                    name,
                    expected: "a list of rules".into(),
                })
            }
        }
        for key in [
            "config",
            "set-state",
            "opt-write-zero",
            "max-write-zero",
            "opt-discard",
            "max-discard",
            "take-child-perms",
            "unshare-child-perms",
        ] {
            if f.contains(key) {
                return Err(bad_value(
                    &f.name(key),
                    "this blkdebug option is not supported by vubd",
                ));
            }
        }
        Ok(BlkdebugOptions {
            image,
            align,
            max_transfer,
            inject_error,
        })
    }
}

impl DriverOptions for BlkdebugOptions {
    fn driver_name(&self) -> &'static str {
        "blkdebug"
    }

    fn child(&self) -> Option<&BlockdevRef> {
        Some(&self.image)
    }

    fn keep_children(&mut self, now: &dyn Fn(&str) -> Option<BlockdevRef>) {
        if let Some(i) = now("image") {
            self.image = i;
        }
    }

    fn write_json(&self, m: &mut Map<String, Value>) {
        m.insert("image".into(), self.image.to_json());
        if let Some(a) = self.align {
            m.insert("align".into(), json!(a));
        }
        if let Some(t) = self.max_transfer {
            m.insert("max-transfer".into(), json!(t));
        }
        m.insert(
            "inject-error".into(),
            Value::Array(self.inject_error.iter().map(|r| r.to_json()).collect()),
        );
    }

    fn open(&self, ctx: &mut OpenCtx<'_>) -> crate::Result<Box<dyn Driver>> {
        let image = ctx.child(&self.image)?;
        let edge = ctx.edge("image", Role::Filtered, &image);
        Ok(Box::new(BlkdebugDriver::new(edge, self)))
    }
}

/// The table's parse function of `blkdebug`.
pub(super) fn parse(
    f: &mut Fields,
    common: &CommonOptions,
    _name: &'static str,
) -> Result<Box<dyn DriverOptions>> {
    Ok(Box::new(BlkdebugOptions::take_from(f, common)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qcow2_events_are_qemus_and_never_raised_ones_are_not_among_them() {
        let names: Vec<&str> = qcow::DebugEvent::ALL.iter().map(|e| e.name()).collect();
        for (i, n) in names.iter().enumerate() {
            assert!(BLKDEBUG_EVENTS.contains(n), "{n} is not a QEMU 7.2 event");
            assert!(!names[..i].contains(n), "{n} is declared twice");
            assert!(
                !BLKDEBUG_NEVER_RAISED.contains(n),
                "{n} is raised by the qcow crate"
            );
        }
        for e in BLKDEBUG_NEVER_RAISED {
            assert!(BLKDEBUG_EVENTS.contains(e), "{e} is not a QEMU 7.2 event");
        }
    }
}

//! The dirty bitmap commands' arguments (QEMU 7.2's `BlockDirtyBitmapAdd`,
//! `BlockDirtyBitmap`, `BlockDirtyBitmapMerge`), read as QEMU's input visitor reads
//! them, and handed to [`crate::control::bitmaps`].

use super::args::Args;
use super::wire::{QmpError, QmpResult};
use crate::control::bitmaps::{BitmapAdd, MergeSource};
use crate::control::Control;
use serde_json::{json, Value};

/// The commands of this module, in the order `query-commands` lists them.
pub const NAMES: &[&str] = &[
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "x-debug-block-dirty-bitmap-sha256",
];

/// A `uint32` member (QEMU: a number that is no unsigned integer "expects uint64",
/// one past 32 bits "expects uint32_t").
fn opt_u32(a: &mut Args, name: &str) -> Result<Option<u64>, QmpError> {
    match a.take(name) {
        None => Ok(None),
        Some(v) => match (v.as_u64(), v.as_i64()) {
            (Some(n), _) if n <= u64::from(u32::MAX) => Ok(Some(n)),
            (Some(_), _) | (None, Some(_)) => Err(QmpError::generic(format!(
                "Parameter '{name}' expects uint32_t"
            ))),
            _ => Err(QmpError::generic(format!(
                "Parameter '{name}' expects uint64"
            ))),
        },
    }
}

/// One member of `bitmaps`: a name, or `{node, name}`.
fn merge_source(i: usize, v: Value) -> Result<MergeSource, QmpError> {
    match v {
        Value::String(s) => Ok(MergeSource::Local(s)),
        Value::Object(_) => {
            // Messages name the member by its path, as QEMU's do.
            let at = |m: &str| format!("bitmaps[{i}].{m}");
            let node = match v.get("node") {
                None => {
                    return Err(QmpError::generic(format!(
                        "Parameter '{}' is missing",
                        at("node")
                    )))
                }
                Some(Value::String(s)) => s.clone(),
                Some(_) => {
                    return Err(QmpError::generic(format!(
                        "Invalid parameter type for '{}', expected: string",
                        at("node")
                    )))
                }
            };
            let name = match v.get("name") {
                None => {
                    return Err(QmpError::generic(format!(
                        "Parameter '{}' is missing",
                        at("name")
                    )))
                }
                Some(Value::String(s)) => s.clone(),
                Some(_) => {
                    return Err(QmpError::generic(format!(
                        "Invalid parameter type for '{}', expected: string",
                        at("name")
                    )))
                }
            };
            if let Some(k) = v
                .as_object()
                .and_then(|m| m.keys().find(|k| *k != "node" && *k != "name"))
            {
                return Err(QmpError::generic(format!(
                    "Parameter '{}' is unexpected",
                    at(k)
                )));
            }
            Ok(MergeSource::External { node, name })
        }
        // QEMU's alternate visitor names no member here.
        _ => Err(QmpError::generic(
            "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
        )),
    }
}

/// Runs one of [`NAMES`].
pub fn execute(ctl: &mut Control, name: &str, mut a: Args) -> QmpResult {
    match name {
        "block-dirty-bitmap-add" => {
            let add = BitmapAdd {
                node: a.str("node")?,
                name: a.str("name")?,
                granularity: opt_u32(&mut a, "granularity")?,
                persistent: a.opt_bool("persistent")?.unwrap_or(false),
                disabled: a.opt_bool("disabled")?.unwrap_or(false),
            };
            a.finish()?;
            ctl.bitmap_add(&add)?;
            Ok(json!({}))
        }
        "block-dirty-bitmap-merge" => {
            let node = a.str("node")?;
            let target = a.str("target")?;
            let list = match a.take("bitmaps") {
                None => return Err(QmpError::generic("Parameter 'bitmaps' is missing")),
                Some(Value::Array(items)) => items,
                Some(_) => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'bitmaps', expected: array",
                    ))
                }
            };
            let sources = list
                .into_iter()
                .enumerate()
                .map(|(i, v)| merge_source(i, v))
                .collect::<Result<Vec<_>, _>>()?;
            a.finish()?;
            ctl.bitmap_merge(&node, &target, &sources)?;
            Ok(json!({}))
        }
        _ => {
            let node = a.str("node")?;
            let bitmap = a.str("name")?;
            a.finish()?;
            match name {
                "block-dirty-bitmap-remove" => ctl.bitmap_remove(&node, &bitmap)?,
                "block-dirty-bitmap-clear" => ctl.bitmap_clear(&node, &bitmap)?,
                "block-dirty-bitmap-enable" => ctl.bitmap_enable(&node, &bitmap, true)?,
                "block-dirty-bitmap-disable" => ctl.bitmap_enable(&node, &bitmap, false)?,
                _ => return Ok(json!({ "sha256": ctl.bitmap_sha256(&node, &bitmap)? })),
            }
            Ok(json!({}))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_sources_as_qemu_reads_them() {
        assert_eq!(
            merge_source(0, json!("a")).unwrap(),
            MergeSource::Local("a".into())
        );
        assert_eq!(
            merge_source(1, json!({"node": "n", "name": "b"})).unwrap(),
            MergeSource::External {
                node: "n".into(),
                name: "b".into()
            }
        );
        let e = |v| merge_source(2, v).unwrap_err().to_string();
        assert!(e(json!({"node": "n"})).contains("Parameter 'bitmaps[2].name' is missing"));
        assert!(e(json!({"node": 1, "name": "b"}))
            .contains("Invalid parameter type for 'bitmaps[2].node', expected: string"));
        assert!(e(json!({"node": "n", "name": "b", "z": 1}))
            .contains("Parameter 'bitmaps[2].z' is unexpected"));
        assert!(e(json!(3)).contains("expected: BlockDirtyBitmapOrStr"));
    }

    #[test]
    fn listed_in_the_command_table() {
        for n in NAMES {
            assert!(
                super::super::commands::COMMANDS.contains(n),
                "{n} not in COMMANDS"
            );
        }
    }

    #[test]
    fn uint32_members() {
        let mut a = Args::new(&json!({"g": 4096, "big": 4294967296u64, "neg": -1, "s": "x"}));
        assert_eq!(opt_u32(&mut a, "g").unwrap(), Some(4096));
        assert!(opt_u32(&mut a, "big")
            .unwrap_err()
            .to_string()
            .contains("expects uint32_t"));
        assert!(opt_u32(&mut a, "neg")
            .unwrap_err()
            .to_string()
            .contains("expects uint32_t"));
        assert!(opt_u32(&mut a, "s")
            .unwrap_err()
            .to_string()
            .contains("expects uint64"));
        assert_eq!(opt_u32(&mut a, "none").unwrap(), None);
    }
}

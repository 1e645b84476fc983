//! The dirty bitmap commands' arguments (QEMU 7.2's `BlockDirtyBitmapAdd`,
//! `BlockDirtyBitmap`, `BlockDirtyBitmapMerge`), read as QEMU's input visitor reads
//! them, and handed to [`crate::control::bitmaps`].

use super::args::Args;
use super::wire::{QmpError, QmpResult};
use crate::control::bitmaps::{BitmapAdd, BitmapCmd, MergeSource};
use crate::control::Control;
use serde_json::{json, Value};

/// A `uint32` member (QEMU: a number that is no unsigned integer "expects uint64",
/// one past 32 bits "expects uint32_t").
fn opt_u32(a: &mut Args, name: &str) -> Result<Option<u64>, QmpError> {
    let path = a.full(name);
    match a.take(name) {
        None => Ok(None),
        Some(v) => match (v.as_u64(), v.as_i64()) {
            (Some(n), _) if n <= u64::from(u32::MAX) => Ok(Some(n)),
            (Some(_), _) | (None, Some(_)) => Err(QmpError::generic(format!(
                "Parameter '{path}' expects uint32_t"
            ))),
            _ => Err(QmpError::generic(format!(
                "Parameter '{path}' expects uint64"
            ))),
        },
    }
}

/// One member of `bitmaps` (at `list`, its path in the input): a name, or
/// `{node, name}`.
fn merge_source(list: &str, i: usize, v: Value) -> Result<MergeSource, QmpError> {
    match v {
        Value::String(s) => Ok(MergeSource::Local(s)),
        Value::Object(_) => {
            // Messages name the member by its path, as QEMU's do.
            let at = |m: &str| format!("{list}[{i}].{m}");
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

/// Reads the arguments of a dirty bitmap command (also a transaction action's
/// `data`).
pub fn parse(name: &str, mut a: Args) -> Result<BitmapCmd, QmpError> {
    let cmd = match name {
        "block-dirty-bitmap-add" => BitmapCmd::Add(BitmapAdd {
            node: a.str("node")?,
            name: a.str("name")?,
            granularity: opt_u32(&mut a, "granularity")?,
            persistent: a.opt_bool("persistent")?.unwrap_or(false),
            disabled: a.opt_bool("disabled")?.unwrap_or(false),
        }),
        "block-dirty-bitmap-merge" => {
            let node = a.str("node")?;
            let target = a.str("target")?;
            let list = a.full("bitmaps");
            let items = match a.take("bitmaps") {
                None => return Err(QmpError::generic(format!("Parameter '{list}' is missing"))),
                Some(Value::Array(items)) => items,
                Some(_) => {
                    return Err(QmpError::generic(format!(
                        "Invalid parameter type for '{list}', expected: array"
                    )))
                }
            };
            let sources = items
                .into_iter()
                .enumerate()
                .map(|(i, v)| merge_source(&list, i, v))
                .collect::<Result<Vec<_>, _>>()?;
            BitmapCmd::Merge {
                node,
                target,
                sources,
            }
        }
        _ => {
            let node = a.str("node")?;
            let name_ = a.str("name")?;
            match name {
                "block-dirty-bitmap-remove" => BitmapCmd::Remove { node, name: name_ },
                "block-dirty-bitmap-clear" => BitmapCmd::Clear { node, name: name_ },
                "block-dirty-bitmap-enable" => BitmapCmd::Enable { node, name: name_ },
                "block-dirty-bitmap-disable" => BitmapCmd::Disable { node, name: name_ },
                _ => BitmapCmd::Sha256 { node, name: name_ },
            }
        }
    };
    a.finish()?;
    Ok(cmd)
}

/// Runs a dirty bitmap command (registered in [`super::commands::COMMANDS`]).
pub fn execute(ctl: &mut Control, name: &str, a: Args) -> QmpResult {
    match parse(name, a)? {
        BitmapCmd::Add(add) => ctl.bitmap_add(&add)?,
        BitmapCmd::Remove { node, name } => ctl.bitmap_remove(&node, &name)?,
        BitmapCmd::Clear { node, name } => ctl.bitmap_clear(&node, &name)?,
        BitmapCmd::Enable { node, name } => ctl.bitmap_enable(&node, &name, true)?,
        BitmapCmd::Disable { node, name } => ctl.bitmap_enable(&node, &name, false)?,
        BitmapCmd::Merge {
            node,
            target,
            sources,
        } => ctl.bitmap_merge(&node, &target, &sources)?,
        BitmapCmd::Sha256 { node, name } => {
            return Ok(json!({ "sha256": ctl.bitmap_sha256(&node, &name)? }))
        }
    }
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_sources_as_qemu_reads_them() {
        assert_eq!(
            merge_source("bitmaps", 0, json!("a")).unwrap(),
            MergeSource::Local("a".into())
        );
        assert_eq!(
            merge_source("bitmaps", 1, json!({"node": "n", "name": "b"})).unwrap(),
            MergeSource::External {
                node: "n".into(),
                name: "b".into()
            }
        );
        let e = |v| merge_source("bitmaps", 2, v).unwrap_err().to_string();
        assert!(e(json!({"node": "n"})).contains("Parameter 'bitmaps[2].name' is missing"));
        assert!(e(json!({"node": 1, "name": "b"}))
            .contains("Invalid parameter type for 'bitmaps[2].node', expected: string"));
        assert!(e(json!({"node": "n", "name": "b", "z": 1}))
            .contains("Parameter 'bitmaps[2].z' is unexpected"));
        assert!(e(json!(3)).contains("expected: BlockDirtyBitmapOrStr"));
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

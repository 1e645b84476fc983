//! The QOM commands (QEMU 7.2's `qom-list`, `qom-get`, `qom-set`, `qom-list-types`,
//! `qom-list-properties`): their arguments, handed to [`crate::control`]'s object
//! tree.

use super::args::Args;
use super::wire::{QmpError, QmpResult};
use crate::control::Control;
use serde_json::json;

/// Runs a QOM command (registered in [`super::commands::COMMANDS`]).
pub fn execute(ctl: &mut Control, name: &str, mut a: Args) -> QmpResult {
    match name {
        "qom-list" => {
            let path = a.str("path")?;
            a.finish()?;
            Ok(ctl.qom_list(&path)?)
        }
        "qom-get" => {
            let path = a.str("path")?;
            let prop = a.str("property")?;
            a.finish()?;
            Ok(ctl.qom_get(&path, &prop)?)
        }
        "qom-set" => {
            let path = a.str("path")?;
            let prop = a.str("property")?;
            let value = a
                .take("value")
                .ok_or_else(|| QmpError::generic("Parameter 'value' is missing"))?;
            a.finish()?;
            ctl.qom_set(&path, &prop, &value)?;
            Ok(json!({}))
        }
        "qom-list-types" => {
            let implements = a.opt_str("implements")?;
            let with_abstract = a.opt_bool("abstract")?.unwrap_or(false);
            a.finish()?;
            Ok(ctl.qom_list_types(implements.as_deref(), with_abstract))
        }
        _ => {
            let typename = a.str("typename")?;
            a.finish()?;
            Ok(ctl.qom_list_properties(&typename)?)
        }
    }
}

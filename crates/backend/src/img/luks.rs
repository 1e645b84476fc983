//! `vubd img create -f luks` and `vubd img info` of LUKS volumes, with qemu-img's
//! `--object secret,...` for the passphrase and its `-o` creation options
//! (`key-secret`, `cipher-alg`, `cipher-mode`, `ivgen-alg`, `ivgen-hash-alg`,
//! `hash-alg`, `iter-time`).

use super::create::new_file;
use super::{usage, ImgError, Result};
use crate::config::ObjectConfig;
use crate::keyval;
use blocklayer::drivers::file::create::{CREATE_PERM, CREATE_SHARED};
use blocklayer::drivers::luks::create::{header_info_json, LuksCreateOptions};
use blocklayer::drivers::luks::header::{Header, HEADER_LEN, MAGIC};
use blocklayer::drivers::luks::volume;
use blocklayer::options::coerce::Fields;
use blocklayer::secret::Secrets;
use serde_json::{json, Map, Value};
use std::io::{Read, Write};

/// The secrets of the `--object` options (other object types are refused).
pub(super) fn secrets(opts: &[(String, String)]) -> Result<Secrets> {
    let secrets = Secrets::default();
    for (k, v) in opts.iter().filter(|(k, _)| k == "--object") {
        let bad = |e: String| usage(format!("{k} {v}: {e}"));
        let j = keyval::parse_option(v, Some("qom-type")).map_err(|e| bad(e.to_string()))?;
        match ObjectConfig::from_json(&j).map_err(|e| bad(e.to_string()))? {
            ObjectConfig::Secret(s) => secrets.add(&s).map_err(|e| bad(e.to_string()))?,
            other => {
                return Err(bad(format!(
                    "'{}' objects are of no use here",
                    other.qom_type()
                )))
            }
        }
    }
    Ok(secrets)
}

fn image_error(file: &str, message: impl ToString) -> ImgError {
    ImgError::Image {
        path: file.into(),
        message: message.to_string(),
    }
}

pub(super) fn create(file: &str, size: Option<u64>, opts: &[(String, String)]) -> Result<()> {
    let secrets = secrets(opts)?;
    let mut map = Map::new();
    for (k, v) in opts {
        match k.as_str() {
            "-b" | "-F" => return Err(usage("format luks has no backing file")),
            "-o" => {
                let o = keyval::parse_option(v, None).map_err(|e| usage(format!("-o {v}: {e}")))?;
                if let Value::Object(o) = o {
                    map.extend(o);
                }
            }
            _ => {}
        }
    }
    let mut f = Fields::from_map(map, "");
    let o_size = f.size("size").map_err(|e| usage(e.to_string()))?;
    if let Some(p) = f
        .string("preallocation")
        .map_err(|e| usage(e.to_string()))?
    {
        if p != "off" {
            return Err(usage(format!(
                "-o preallocation={p}: vubd creates luks with off only"
            )));
        }
    }
    let lo = LuksCreateOptions::take_from(&mut f).map_err(|e| usage(e.to_string()))?;
    f.finish().map_err(|e| usage(e.to_string()))?;
    let size = size.or(o_size).ok_or_else(|| usage("missing SIZE"))?;
    // As qemu-img: whole sectors.
    let size = size.next_multiple_of(512);
    let params = lo.params(&secrets).map_err(|e| image_error(file, e))?;
    let (bytes, v) = volume::format(&params).map_err(|e| image_error(file, e))?;
    let mut out = new_file(file, CREATE_PERM, CREATE_SHARED)?;
    let err = |e: std::io::Error| image_error(file, e);
    out.write_all(&bytes).map_err(err)?;
    out.set_len(v.header.payload_bytes() + size).map_err(err)?;
    out.sync_all().map_err(err)
}

/// Whether `file` starts with the LUKS magic.
pub(super) fn is_luks(file: &str) -> bool {
    let mut magic = [0u8; 6];
    std::fs::File::open(file)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == MAGIC)
}

/// `info` of a LUKS volume: from the header, without the passphrase (as qemu-img).
pub(super) fn info(file: &str, json_out: bool) -> Result<()> {
    let mut head = vec![0u8; HEADER_LEN];
    let mut f = std::fs::File::open(file).map_err(|e| image_error(file, e))?;
    let meta = f.metadata().map_err(|e| image_error(file, e))?;
    f.read_exact(&mut head).map_err(|e| image_error(file, e))?;
    let h = Header::parse(&head).map_err(|e| image_error(file, e))?;
    let algs = h.algorithms().map_err(|e| image_error(file, e))?;
    let size = meta.len().saturating_sub(h.payload_bytes());
    let actual = {
        use std::os::unix::fs::MetadataExt;
        meta.blocks() * 512
    };
    let data = header_info_json(&h, &algs);
    let v = json!({
        "filename": file,
        "format": "luks",
        "virtual-size": size,
        "actual-size": actual,
        "encrypted": true,
        "format-specific": {"type": "luks", "data": data},
    });
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("image: {file}");
    println!("file format: luks");
    println!("virtual size: {size} bytes");
    println!("disk size: {actual} bytes");
    println!("encrypted: yes");
    println!("Format specific information:");
    for k in [
        "ivgen-alg",
        "ivgen-hash-alg",
        "hash-alg",
        "cipher-alg",
        "uuid",
        "cipher-mode",
    ] {
        if let Some(s) = data[k].as_str() {
            println!("    {}: {s}", k.replace('-', " "));
        }
    }
    println!("    slots:");
    for (i, s) in data["slots"].as_array().into_iter().flatten().enumerate() {
        println!("        [{i}]:");
        println!("            active: {}", s["active"]);
        if s["active"] == json!(true) {
            println!("            iters: {}", s["iters"]);
        }
        println!("            key offset: {}", s["key-offset"]);
        if s["active"] == json!(true) {
            println!("            stripes: {}", s["stripes"]);
        }
    }
    println!("    payload offset: {}", data["payload-offset"]);
    println!("    master key iters: {}", data["master-key-iters"]);
    Ok(())
}

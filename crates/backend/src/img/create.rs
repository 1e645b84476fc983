//! `vubd img create`, and the qcow2 creation options `-o` that `convert` takes too.

use super::{file_err, usage, ImgError, Parsed, Result};
use crate::keyval;
use blocklayer::options::coerce;
use qcow::{block_on, Compat, CompressionType, CreateOptions, FileIo, Preallocation};
use serde_json::Value;
use std::fs::OpenOptions as FsOpen;

/// Applies `-o key=value,...` (qemu-img's qcow2 creation options) to `o`.
pub(super) fn apply_o(o: &mut CreateOptions, text: &str) -> Result<()> {
    let v = keyval::parse_option(text, None).map_err(|e| usage(format!("-o {text}: {e}")))?;
    let Value::Object(map) = v else {
        return Err(usage(format!("-o {text}: expected key=value pairs")));
    };
    let bad = |k: &str, why: &str| usage(format!("-o {k}: {why}"));
    for (k, v) in map {
        let s = v.as_str().unwrap_or_default().to_string();
        match k.as_str() {
            "cluster_size" => {
                o.cluster_size = coerce::parse_size(&s).ok_or_else(|| bad(&k, "not a size"))?
            }
            "compat" => {
                o.compat = match s.as_str() {
                    "0.10" | "v2" => Compat::V2,
                    "1.1" | "v3" => Compat::V3,
                    _ => return Err(bad(&k, "expected 0.10 or 1.1")),
                }
            }
            "lazy_refcounts" => {
                o.lazy_refcounts = coerce::parse_bool(&s).ok_or_else(|| bad(&k, "on or off"))?
            }
            "extended_l2" => {
                o.extended_l2 = coerce::parse_bool(&s).ok_or_else(|| bad(&k, "on or off"))?
            }
            "refcount_bits" => {
                o.refcount_bits = coerce::parse_uint(&s)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| bad(&k, "not a number"))?
            }
            "backing_file" => o.backing_file = Some(s),
            "backing_fmt" => o.backing_fmt = Some(s),
            "preallocation" => {
                o.preallocation = match s.as_str() {
                    "off" => Preallocation::Off,
                    "metadata" => Preallocation::Metadata,
                    "falloc" => Preallocation::Falloc,
                    "full" => Preallocation::Full,
                    _ => return Err(bad(&k, "expected off, metadata, falloc or full")),
                }
            }
            "compression_type" => {
                o.compression_type = match s.as_str() {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    _ => return Err(bad(&k, "expected zlib or zstd")),
                }
            }
            "size" => o.size = coerce::parse_size(&s).ok_or_else(|| bad(&k, "not a size"))?,
            other => return Err(usage(format!("-o: unknown option '{other}'"))),
        }
    }
    Ok(())
}

/// Creates (or truncates) `file` for writing a new image into.
pub(super) fn new_file(file: &str) -> Result<std::fs::File> {
    FsOpen::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(file)
        .map_err(file_err(file))
}

pub(super) fn create(args: &[String]) -> Result<()> {
    let p = Parsed::new(args, &["-f", "-b", "-F", "-o"], &[])?;
    let fmt = p.last("-f").unwrap_or("qcow2");
    let (file, size) = match p.pos.as_slice() {
        [f, s] => (
            f.as_str(),
            Some(coerce::parse_size(s).ok_or_else(|| usage(format!("bad size '{s}'")))?),
        ),
        [f] => (f.as_str(), None),
        _ => return Err(usage("expected FILE [SIZE]")),
    };
    let mut o = CreateOptions::new(size.unwrap_or(0));
    for (k, v) in &p.opts {
        match k.as_str() {
            "-b" => o.backing_file = Some(v.clone()),
            "-F" => o.backing_fmt = Some(v.clone()),
            "-o" => apply_o(&mut o, v)?,
            _ => {}
        }
    }
    if size.is_none() && o.size == 0 {
        return Err(usage("missing SIZE"));
    }
    // As qemu-img: whole sectors.
    o.size = o.size.next_multiple_of(512);
    if !matches!(fmt, "raw" | "qcow2") {
        return Err(usage(format!("unknown format '{fmt}' (qcow2 or raw)")));
    }
    let f = new_file(file)?;
    match fmt {
        "raw" => f.set_len(o.size).map_err(file_err(file)),
        _ => {
            let img = block_on(qcow::create(FileIo::new(f), &o)).map_err(|e| ImgError::Image {
                path: file.into(),
                message: e.to_string(),
            })?;
            block_on(img.close()).map_err(super::image_err(file))
        }
    }
}

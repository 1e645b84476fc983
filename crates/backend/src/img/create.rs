//! `vubd img create`, and the qcow2 creation options `-o` that `convert` takes too.
//!
//! `-f raw` takes QEMU's file driver options instead: `preallocation` (off, falloc,
//! full). Files are created as QEMU creates them, emptied only under the image locks
//! (see `blocklayer::drivers::file::create`).

use super::{usage, ImgError, Parsed, Result};
use crate::keyval;
use blocklayer::drivers::file::create::{
    create_empty, create_file, FilePrealloc, CREATE_PERM, CREATE_SHARED,
};
use blocklayer::drivers::qcow2::encryption;
use blocklayer::options::coerce::{self, Fields};
use qcow::{block_on, Compat, CompressionType, CreateOptions, FileIo, Preallocation};
use serde_json::{Map, Value};
use std::path::Path;

/// Applies `-o key=value,...` (qemu-img's qcow2 creation options) to `o`; the
/// `encrypt.*` options go to `encrypt` (refused where there is none).
pub(super) fn apply_o(
    o: &mut CreateOptions,
    text: &str,
    mut encrypt: Option<&mut Map<String, Value>>,
) -> Result<()> {
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
            "data_file" => o.data_file = Some(s),
            "data_file_raw" => {
                o.data_file_raw = coerce::parse_bool(&s).ok_or_else(|| bad(&k, "on or off"))?
            }
            "encrypt" => match (v, encrypt.as_deref_mut()) {
                (Value::Object(e), Some(out)) => out.extend(e),
                (_, Some(_)) => return Err(bad(&k, "expected encrypt.format=luks,...")),
                (_, None) => return Err(bad(&k, "encryption is not supported here")),
            },
            other => return Err(usage(format!("-o: unknown option '{other}'"))),
        }
    }
    Ok(())
}

/// `-o` of `-f raw` (QEMU's file driver options): `size`, `preallocation`
/// (off|falloc|full); `nocow` and `extent_size_hint` are accepted, as hints.
fn apply_raw_o(size: &mut u64, prealloc: &mut FilePrealloc, text: &str) -> Result<()> {
    let v = keyval::parse_option(text, None).map_err(|e| usage(format!("-o {text}: {e}")))?;
    let Value::Object(map) = v else {
        return Err(usage(format!("-o {text}: expected key=value pairs")));
    };
    for (k, v) in map {
        let s = v.as_str().unwrap_or_default().to_string();
        match k.as_str() {
            "size" => {
                *size =
                    coerce::parse_size(&s).ok_or_else(|| usage(format!("-o {k}: not a size")))?
            }
            "preallocation" => {
                *prealloc =
                    FilePrealloc::from_name(&s).map_err(|e| usage(format!("-o {k}: {e}")))?
            }
            "nocow" | "extent_size_hint" => {}
            other => {
                return Err(usage(format!(
                    "-o: unknown option '{other}' for format raw"
                )))
            }
        }
    }
    Ok(())
}

/// Creates (or empties) `file` for writing a new image into, holding `perm` and
/// sharing `shared` (QEMU's image locks) for as long as the file is open; the file is
/// emptied only once the locks are held, so an image in use is never cut short.
pub(super) fn new_file(file: &str, perm: u32, shared: u32) -> Result<std::fs::File> {
    create_empty(Path::new(file), perm, shared).map_err(|e| ImgError::Image {
        path: file.into(),
        message: e.to_string(),
    })
}

pub(super) fn create(args: &[String]) -> Result<()> {
    let p = Parsed::new(args, &["-f", "-b", "-F", "-o", "--object"], &[])?;
    let fmt = p.last("-f").unwrap_or("qcow2");
    let (file, size) = match p.pos.as_slice() {
        [f, s] => (
            f.as_str(),
            Some(coerce::parse_size(s).ok_or_else(|| usage(format!("bad size '{s}'")))?),
        ),
        [f] => (f.as_str(), None),
        _ => return Err(usage("expected FILE [SIZE]")),
    };
    match fmt {
        "raw" => create_raw(file, size, &p.opts),
        "qcow2" => create_qcow2(file, size, &p.opts),
        "luks" => super::luks::create(file, size, &p.opts),
        other => Err(usage(format!(
            "unknown format '{other}' (qcow2, raw or luks)"
        ))),
    }
}

fn create_raw(file: &str, size: Option<u64>, opts: &[(String, String)]) -> Result<()> {
    no_objects(opts)?;
    let mut sz = size.unwrap_or(0);
    let mut prealloc = FilePrealloc::Off;
    for (k, v) in opts {
        match k.as_str() {
            "-b" | "-F" => return Err(usage("format raw has no backing file")),
            "-o" => apply_raw_o(&mut sz, &mut prealloc, v)?,
            _ => {}
        }
    }
    if size.is_none() && sz == 0 {
        return Err(usage("missing SIZE"));
    }
    // As qemu-img: whole sectors.
    let sz = sz.next_multiple_of(512);
    create_file(Path::new(file), sz, prealloc).map_err(|e| ImgError::Image {
        path: file.into(),
        message: e.to_string(),
    })
}

/// `--object` is for encrypted formats only (their secrets).
fn no_objects(opts: &[(String, String)]) -> Result<()> {
    match opts.iter().any(|(k, _)| k == "--object") {
        true => Err(usage("--object is of no use for this format")),
        false => Ok(()),
    }
}

fn create_qcow2(file: &str, size: Option<u64>, opts: &[(String, String)]) -> Result<()> {
    let secrets = super::luks::secrets(opts)?;
    let mut o = CreateOptions::new(size.unwrap_or(0));
    let mut encrypt = Map::new();
    for (k, v) in opts {
        match k.as_str() {
            "-b" => o.backing_file = Some(v.clone()),
            "-F" => o.backing_fmt = Some(v.clone()),
            "-o" => apply_o(&mut o, v, Some(&mut encrypt))?,
            _ => {}
        }
    }
    if size.is_none() && o.size == 0 {
        return Err(usage("missing SIZE"));
    }
    // As qemu-img: whole sectors.
    o.size = o.size.next_multiple_of(512);
    if !encrypt.is_empty() {
        let image_error = |e: blocklayer::BlockError| ImgError::Image {
            path: file.into(),
            message: e.to_string(),
        };
        let params = encryption::create_params(Fields::from_map(encrypt, "encrypt"), &secrets)
            .map_err(image_error)?;
        // Bad options leave no file behind: checked before PBKDF2 runs.
        o.encryption = Some(Vec::new());
        o.validate().map_err(|e| ImgError::Image {
            path: file.into(),
            message: e.to_string(),
        })?;
        o.encryption = Some(encryption::format_header(&params).map_err(image_error)?);
    } else {
        no_objects(opts)?;
    }
    // Bad options leave no file behind.
    o.validate().map_err(|e| ImgError::Image {
        path: file.into(),
        message: e.to_string(),
    })?;
    // As qemu-img: the creation locks, held until the image is written.
    let f = new_file(file, CREATE_PERM, CREATE_SHARED)?;
    let created = match &o.data_file {
        // The header keeps the name as given; as the daemon opens it relative to the
        // image's directory, it is created there.
        Some(name) => {
            let path = match std::path::Path::new(file).parent() {
                Some(dir) if std::path::Path::new(name).is_relative() => dir.join(name),
                _ => std::path::PathBuf::from(name),
            };
            let path = path.to_string_lossy().into_owned();
            let d = new_file(&path, CREATE_PERM, CREATE_SHARED)?;
            block_on(qcow::create_with_data_file(
                FileIo::new(f),
                FileIo::new(d),
                &o,
            ))
        }
        None => block_on(qcow::create(FileIo::new(f), &o)),
    };
    let img = created.map_err(|e| ImgError::Image {
        path: file.into(),
        message: e.to_string(),
    })?;
    block_on(img.close()).map_err(super::image_err(file))
}

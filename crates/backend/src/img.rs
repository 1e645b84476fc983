//! `vubd img`: create, inspect, check and map qcow2 images without qemu-img.
//!
//! ```text
//! vubd img create [-f qcow2|raw] [-b BACKING [-F FMT]] [-o OPTS] FILE SIZE
//! vubd img info [--output human|json] FILE
//! vubd img check [-r leaks|all] [--output human|json] FILE
//! vubd img map [--output human|json] FILE
//! ```
//!
//! `-o` takes qemu-img's qcow2 creation options: cluster_size, compat, lazy_refcounts,
//! refcount_bits, extended_l2, backing_file, backing_fmt, preallocation,
//! compression_type; with `-f raw`: preallocation (off, falloc, full). `check` exits like qemu-img check: 0 clean, 2 corruptions
//! found, 3 only leaks found, 1 on errors.

use crate::keyval;
use blocklayer::drivers::file_create::{create_file, FilePrealloc};
use blocklayer::drivers::lock::{
    lock_image, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED,
};
use blocklayer::options::coerce;
use qcow::{
    block_on, CheckReport, Compat, CompressionType, CreateOptions, ExtentKind, FileIo, OpenOptions,
    Preallocation, Qcow2, Repair,
};
use serde_json::{json, Value};
use std::fs::OpenOptions as FsOpen;
use std::os::fd::AsRawFd;

#[derive(Debug, thiserror::Error)]
pub enum ImgError {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Image { path: String, message: String },
}

type Result<T> = std::result::Result<T, ImgError>;

pub const USAGE: &str = "\
Usage: vubd img create [-f qcow2|raw] [-b BACKING [-F FMT]] [-o OPTIONS] FILE SIZE
       vubd img info [--output human|json] FILE
       vubd img check [-r leaks|all] [--output human|json] FILE
       vubd img map [--output human|json] FILE
";

fn usage(msg: impl Into<String>) -> ImgError {
    ImgError::Usage(format!("{}\n{USAGE}", msg.into()))
}

fn open_file(path: &str, writable: bool) -> Result<FileIo> {
    let file = FsOpen::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|source| ImgError::File {
            path: path.into(),
            source,
        })?;
    Ok(FileIo::new(file))
}

fn image_err(path: &str) -> impl Fn(qcow::Error) -> ImgError + '_ {
    move |e| ImgError::Image {
        path: path.into(),
        message: e.to_string(),
    }
}

/// Runs `vubd img ARGS`; returns the process exit status.
pub fn main(args: &[String]) -> Result<u8> {
    let Some((cmd, rest)) = args.split_first() else {
        return Err(usage("missing command"));
    };
    match cmd.as_str() {
        "create" => create(rest).map(|()| 0),
        "info" => info(rest).map(|()| 0),
        "check" => check(rest),
        "map" => map(rest).map(|()| 0),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(0)
        }
        other => Err(usage(format!("unknown command '{other}'"))),
    }
}

/// Splits `-x VALUE` options from positional arguments.
/// Options with their values, and the positional arguments.
type Parsed = (Vec<(String, String)>, Vec<String>);

fn options(args: &[String], with_value: &[&str]) -> Result<Parsed> {
    let mut opts = Vec::new();
    let mut pos = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if with_value.contains(&a.as_str()) {
            let v = it
                .next()
                .ok_or_else(|| usage(format!("option '{a}' needs a value")))?;
            opts.push((a.clone(), v.clone()));
        } else if a.starts_with('-') && a.len() > 1 {
            return Err(usage(format!("unknown option '{a}'")));
        } else {
            pos.push(a.clone());
        }
    }
    Ok((opts, pos))
}

fn output_json(opts: &[(String, String)]) -> Result<bool> {
    match opts.iter().rev().find(|(k, _)| k == "--output") {
        None => Ok(false),
        Some((_, v)) if v == "json" => Ok(true),
        Some((_, v)) if v == "human" => Ok(false),
        Some((_, v)) => Err(usage(format!("--output takes human or json, not '{v}'"))),
    }
}

fn one_file(pos: &[String]) -> Result<&str> {
    match pos {
        [f] => Ok(f),
        _ => Err(usage("expected one image file")),
    }
}

/// Applies `-o key=value,...` to the creation options.
fn apply_o(o: &mut CreateOptions, text: &str) -> Result<()> {
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

fn create(args: &[String]) -> Result<()> {
    let (opts, pos) = options(args, &["-f", "-b", "-F", "-o"])?;
    let fmt = opts
        .iter()
        .rev()
        .find(|(k, _)| k == "-f")
        .map_or("qcow2", |(_, v)| v.as_str());
    let (file, size) = match pos.as_slice() {
        [f, s] => (
            f.as_str(),
            Some(coerce::parse_size(s).ok_or_else(|| usage(format!("bad size '{s}'")))?),
        ),
        [f] => (f.as_str(), None),
        _ => return Err(usage("expected FILE [SIZE]")),
    };
    match fmt {
        "raw" => create_raw(file, size, &opts),
        "qcow2" => create_qcow2(file, size, &opts),
        other => Err(usage(format!("unknown format '{other}' (qcow2 or raw)"))),
    }
}

fn create_raw(file: &str, size: Option<u64>, opts: &[(String, String)]) -> Result<()> {
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
    // As qemu-img: the size of a raw image is whole sectors.
    let sz = sz.div_ceil(512) * 512;
    create_file(std::path::Path::new(file), sz, prealloc).map_err(|e| ImgError::Image {
        path: file.into(),
        message: e.to_string(),
    })
}

fn create_qcow2(file: &str, size: Option<u64>, opts: &[(String, String)]) -> Result<()> {
    let mut o = CreateOptions::new(size.unwrap_or(0));
    for (k, v) in opts {
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
    let f = FsOpen::new()
        .read(true)
        .write(true)
        .create(true)
        // Emptied once the locks are held.
        .truncate(false)
        .open(file)
        .map_err(|source| ImgError::File {
            path: file.into(),
            source,
        })?;
    // As qemu-img: never empty an image that another process has open; the locks
    // last as long as the descriptor.
    lock_image(
        f.as_raw_fd(),
        file,
        PERM_WRITE | PERM_RESIZE,
        PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED,
    )
    .map_err(|e| ImgError::Image {
        path: file.into(),
        message: e.to_string(),
    })?;
    // qcow::create empties the file.
    let img = block_on(qcow::create(FileIo::new(f), &o)).map_err(|e| ImgError::Image {
        path: file.into(),
        message: e.to_string(),
    })?;
    block_on(img.close()).map_err(image_err(file))
}

fn open_image(file: &str, writable: bool) -> Result<Qcow2<FileIo>> {
    let io = open_file(file, writable)?;
    let opts = OpenOptions {
        writable,
        repair_dirty: false,
        ..OpenOptions::read_only()
    };
    block_on(Qcow2::open(io, opts)).map_err(image_err(file))
}

fn info(args: &[String]) -> Result<()> {
    let (opts, pos) = options(args, &["--output"])?;
    let json = output_json(&opts)?;
    let file = one_file(&pos)?;
    let img = open_image(file, false)?;
    let i = img.info();
    let actual = std::fs::metadata(file)
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        })
        .unwrap_or(0);
    let v = json!({
        "filename": file,
        "format": "qcow2",
        "virtual-size": i.size,
        "actual-size": actual,
        "cluster-size": i.cluster_size,
        "compat": if i.version == 2 { "0.10" } else { "1.1" },
        "refcount-bits": i.refcount_bits,
        "extended-l2": i.extended_l2,
        "lazy-refcounts": i.lazy_refcounts,
        "compression-type": format!("{:?}", i.compression).to_lowercase(),
        "corrupt": i.corrupt,
        "backing-filename": i.backing_file,
        "backing-filename-format": i.backing_format,
        "snapshots": img.snapshots().len(),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!("image: {file}");
        println!("file format: qcow2");
        println!("virtual size: {} bytes", i.size);
        println!("disk size: {actual} bytes");
        println!("cluster_size: {}", i.cluster_size);
        println!("compat: {}", v["compat"].as_str().unwrap_or_default());
        println!("refcount bits: {}", i.refcount_bits);
        println!("extended l2: {}", i.extended_l2);
        println!("lazy refcounts: {}", i.lazy_refcounts);
        println!(
            "compression type: {}",
            v["compression-type"].as_str().unwrap_or_default()
        );
        println!("corrupt: {}", i.corrupt);
        if let Some(b) = &i.backing_file {
            println!("backing file: {b}");
        }
        if let Some(f) = &i.backing_format {
            println!("backing file format: {f}");
        }
        println!("snapshots: {}", img.snapshots().len());
    }
    Ok(())
}

fn check(args: &[String]) -> Result<u8> {
    let (opts, pos) = options(args, &["-r", "--output"])?;
    let json = output_json(&opts)?;
    let repair = match opts.iter().rev().find(|(k, _)| k == "-r") {
        None => Repair::None,
        Some((_, v)) if v == "leaks" => Repair::Leaks,
        Some((_, v)) if v == "all" => Repair::All,
        Some((_, v)) => return Err(usage(format!("-r takes leaks or all, not '{v}'"))),
    };
    let file = one_file(&pos)?;
    let img = open_image(file, repair != Repair::None)?;
    let r: CheckReport = block_on(img.check(repair)).map_err(image_err(file))?;
    if repair != Repair::None {
        block_on(img.close()).map_err(image_err(file))?;
    }
    if json {
        let v = json!({
            "filename": file,
            "format": "qcow2",
            "corruptions": r.corruptions,
            "leaks": r.leaks,
            "corruptions-fixed": r.corruptions_fixed,
            "leaks-fixed": r.leaks_fixed,
            "check-errors": 0,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for m in &r.messages {
            println!("{m}");
        }
        if r.leaks_fixed + r.corruptions_fixed > 0 {
            println!(
                "Repaired {} leaked clusters and {} corruptions.",
                r.leaks_fixed, r.corruptions_fixed
            );
        }
        let leaks = r.leaks - r.leaks_fixed.min(r.leaks);
        let corruptions = r.corruptions - r.corruptions_fixed.min(r.corruptions);
        if leaks == 0 && corruptions == 0 {
            println!("No errors were found on the image.");
        } else {
            if corruptions > 0 {
                println!("{corruptions} errors were found on the image.");
            }
            if leaks > 0 {
                println!("{leaks} leaked clusters were found on the image.");
            }
        }
    }
    let leaks = r.leaks - r.leaks_fixed.min(r.leaks);
    let corruptions = r.corruptions - r.corruptions_fixed.min(r.corruptions);
    Ok(if corruptions > 0 {
        2
    } else if leaks > 0 {
        3
    } else {
        0
    })
}

fn map(args: &[String]) -> Result<()> {
    let (opts, pos) = options(args, &["--output"])?;
    let json = output_json(&opts)?;
    let file = one_file(&pos)?;
    let img = open_image(file, false)?;
    let extents = block_on(img.map(0, img.size())).map_err(image_err(file))?;
    let mut out = Vec::new();
    for e in &extents {
        let (kind, host) = match e.kind {
            ExtentKind::Data { host_offset } => ("data", Some(host_offset)),
            ExtentKind::Zero => ("zero", None),
            ExtentKind::Unallocated => ("unallocated", None),
            ExtentKind::Compressed { .. } => ("compressed", None),
        };
        out.push(json!({ "start": e.offset, "length": e.len, "kind": kind, "offset": host }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        println!("{:<20}{:<20}{:<14}Mapped to", "Offset", "Length", "Kind");
        for e in &extents {
            let (kind, host) = match e.kind {
                ExtentKind::Data { host_offset } => ("data", format!("{host_offset:#x}")),
                ExtentKind::Zero => ("zero", String::new()),
                ExtentKind::Unallocated => ("unallocated", String::new()),
                ExtentKind::Compressed { host_offset, .. } => {
                    ("compressed", format!("{host_offset:#x}"))
                }
            };
            println!("{:<#20x}{:<#20x}{:<14}{host}", e.offset, e.len, kind);
        }
    }
    Ok(())
}

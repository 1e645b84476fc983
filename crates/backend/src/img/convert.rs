//! `vubd img convert`: copies what a guest sees of an image (through its backing
//! chain) into a new raw or qcow2 image, as `qemu-img convert` does.
//!
//! Ranges the source knows to read as zeroes are skipped without reading; what is read
//! is written only where it is not all zeroes, so the copy stays sparse: a raw file
//! keeps holes (4 KiB granularity), a qcow2 image leaves such clusters unallocated.
//! With `-c`, each qcow2 cluster is written compressed (zlib, or zstd with
//! `-o compression_type=zstd`); a cluster that does not shrink is stored as it is.

use super::create::{apply_o, new_file};
use super::source::Source;
use super::{file_err, image_err, usage, ImgError, Parsed, Result};
use blocklayer::drivers::lock::{PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE};
use qcow::{block_on, CreateOptions, FileIo, NoBacking, Qcow2};
use std::os::unix::fs::FileExt;

/// Bytes read from the source at a time (a whole number of clusters of any size).
const WINDOW: u64 = 4 << 20;
/// The granularity of zero detection in raw output.
const RAW_GRAIN: u64 = 4096;

/// Where the copy goes.
enum Target {
    Raw {
        path: String,
        file: std::fs::File,
    },
    Qcow2 {
        path: String,
        image: Box<Qcow2<FileIo>>,
        compress: bool,
    },
}

impl Target {
    /// The unit of zero detection: what is written, or left out, as a whole.
    fn grain(&self) -> u64 {
        match self {
            Target::Raw { .. } => RAW_GRAIN,
            Target::Qcow2 { image, .. } => image.geometry().cluster_size,
        }
    }

    /// Writes `data` at `offset`; `data` is one or more whole grains (or ends at the
    /// end of the disk) and holds no all-zero grain when compressing.
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        match self {
            Target::Raw { path, file } => file.write_all_at(data, offset).map_err(file_err(path)),
            Target::Qcow2 {
                path,
                image,
                compress: false,
            } => block_on(image.write(offset, data, &NoBacking)).map_err(image_err(path)),
            Target::Qcow2 { path, image, .. } => {
                let cs = image.geometry().cluster_size as usize;
                for (i, cluster) in data.chunks(cs).enumerate() {
                    let at = offset + (i * cs) as u64;
                    block_on(image.write_compressed(at, cluster)).map_err(image_err(path))?;
                }
                Ok(())
            }
        }
    }

    fn finish(self) -> Result<()> {
        match self {
            Target::Raw { path, file } => file.sync_data().map_err(file_err(&path)),
            Target::Qcow2 { path, image, .. } => block_on(image.close()).map_err(image_err(&path)),
        }
    }
}

pub(super) fn convert(args: &[String]) -> Result<()> {
    let p = Parsed::new(
        args,
        &["-f", "-O", "-o"],
        &["-c", "-q", "-p", "-U", "--force-share"],
    )?;
    let (src, dst) = match p.pos.as_slice() {
        [s, d] => (s.as_str(), d.as_str()),
        _ => return Err(usage("convert: expected SRC and DST")),
    };
    let out_fmt = p.last("-O").unwrap_or("raw");
    let compress = p.has("-c");
    let o_texts: Vec<&str> = p
        .opts
        .iter()
        .filter(|(k, _)| k == "-o")
        .map(|(_, v)| v.as_str())
        .collect();
    match out_fmt {
        "raw" if compress => {
            return Err(usage(
                "convert: compression is not supported for this file format (-O qcow2 is)",
            ))
        }
        "raw" if !o_texts.is_empty() => {
            return Err(usage("convert: -o: raw images take no creation options"))
        }
        "raw" | "qcow2" => {}
        other => {
            return Err(usage(format!(
                "convert: unknown format '{other}' (raw or qcow2)"
            )))
        }
    }
    let source = Source::open(src, p.last("-f"), p.read_access())?;
    // As qemu-img: whole sectors (a raw source may end inside one).
    let size = source.size().next_multiple_of(512);
    let mut o = CreateOptions::new(size);
    for text in &o_texts {
        apply_o(&mut o, text, None)?;
    }
    if o.size != size {
        return Err(usage(
            "convert: -o size: the copy has the size of the source",
        ));
    }
    if o.backing_file.is_some() || o.backing_fmt.is_some() {
        return Err(usage(
            "convert: -o backing_file: vubd img convert copies whole images only",
        ));
    }
    if let Ok(d) = std::fs::canonicalize(dst) {
        if source.paths().contains(&d) {
            return Err(ImgError::Image {
                path: dst.into(),
                message: "the destination is (part of) the source".into(),
            });
        }
    }
    let target = open_target(dst, out_fmt, &o, compress)?;
    let copied = copy(&source, &target, size);
    // Also after a failure: what was copied stays a valid image.
    let finished = target.finish();
    copied.and(finished)
}

/// Creates the destination, locked for writing before it is truncated (so that an
/// image in use, or the source under another name, is never cut short).
fn open_target(dst: &str, fmt: &str, o: &CreateOptions, compress: bool) -> Result<Target> {
    let existed = std::path::Path::new(dst).exists();
    let target = create_target(dst, fmt, o, compress);
    if target.is_err() && !existed {
        // Nothing to keep from a destination that could not be set up.
        let _ = std::fs::remove_file(dst);
    }
    target
}

fn create_target(dst: &str, fmt: &str, o: &CreateOptions, compress: bool) -> Result<Target> {
    // Held for the whole copy, shared with nobody.
    let file = new_file(dst, PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, 0)?;
    if fmt == "raw" {
        file.set_len(o.size).map_err(file_err(dst))?;
        return Ok(Target::Raw {
            path: dst.into(),
            file,
        });
    }
    let image = block_on(qcow::create(FileIo::new(file), o)).map_err(|e| ImgError::Image {
        path: dst.into(),
        message: e.to_string(),
    })?;
    Ok(Target::Qcow2 {
        path: dst.into(),
        image: Box::new(image),
        compress,
    })
}

fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().unwrap_or_default()) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// Copies `0..size` from `source` to `target`, window by window: windows the source
/// knows to be zero are skipped, and so is every all-zero grain of the rest.
fn copy(source: &Source, target: &Target, size: u64) -> Result<()> {
    let grain = target.grain();
    let window = WINDOW.max(grain) / grain * grain;
    let mut buf = vec![0u8; window as usize];
    let mut pos = 0;
    while pos < size {
        let len = window.min(size - pos);
        // The copy may end a partial sector past the source: zeroes there.
        let have = len.min(source.size().saturating_sub(pos));
        if have == 0 || !source.status(pos, have)?.iter().any(|s| s.data) {
            pos += len;
            continue;
        }
        let buf = &mut buf[..len as usize];
        source.read(pos, &mut buf[..have as usize])?;
        buf[have as usize..].fill(0);
        // Runs of grains with data, written as one piece.
        let mut run: Option<usize> = None;
        let grains = buf.len().div_ceil(grain as usize);
        for g in 0..=grains {
            let at = g * grain as usize;
            let zero = g == grains || is_zero(&buf[at..(at + grain as usize).min(buf.len())]);
            match (zero, run) {
                (false, None) => run = Some(at),
                (true, Some(start)) => {
                    target.write(pos + start as u64, &buf[start..at.min(buf.len())])?;
                    run = None;
                }
                _ => {}
            }
        }
        pos += len;
    }
    Ok(())
}

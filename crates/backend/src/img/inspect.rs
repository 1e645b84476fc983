//! `vubd img info`, `check` and `map`.

use super::{image_err, open_image, snapshot, Access, Parsed, Result};
use blocklayer::format_info::Qcow2BitmapInfo;
use blocklayer::info::to_json;
use blocklayer::snapshot::SnapshotInfo;
use qcow::{block_on, CheckReport, ExtentKind, Repair};
use serde_json::{json, Value};

pub(super) fn info(args: &[String]) -> Result<()> {
    let p = Parsed::new(args, &["--output"], &["-U", "--force-share"])?;
    let json = p.output_json()?;
    let file = p.one_file()?;
    if super::luks::is_luks(file) {
        return super::luks::info(file, json);
    }
    let img = open_image(file, p.read_access(), false)?;
    let i = img.info();
    let snaps = img.snapshots();
    let actual = std::fs::metadata(file)
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        })
        .unwrap_or(0);
    let mut v = json!({
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
    });
    let encrypt = match i.crypto_header {
        Some((offset, _)) => Some(super::luks::qcow2_encrypt_info(file, offset)?),
        None => None,
    };
    if let Some(e) = &encrypt {
        v["encrypted"] = json!(true);
        v["encrypt"] = to_json(e);
    }
    // As qemu-img: the flags as the image has them ("in-use" while a program has
    // them, or after it crashed), the list only when there are bitmaps.
    let bitmaps: Vec<Qcow2BitmapInfo> = img.bitmaps().iter().map(Qcow2BitmapInfo::from).collect();
    if !bitmaps.is_empty() {
        v["bitmaps"] = to_json(&bitmaps);
    }
    // As qemu-img: the list only when there are snapshots.
    if !snaps.is_empty() {
        let list: Vec<SnapshotInfo> = snaps.iter().map(SnapshotInfo::from).collect();
        v["snapshots"] = to_json(&list);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
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
    if !bitmaps.is_empty() {
        println!("bitmaps:");
        for (n, b) in bitmaps.iter().enumerate() {
            println!("    [{n}]:");
            println!("        flags:");
            for (k, f) in b.flags.iter().enumerate() {
                println!("            [{k}]: {}", f.name());
            }
            println!("        name: {}", b.name);
            println!("        granularity: {}", b.granularity);
        }
    }
    if let Some(e) = &encrypt {
        println!("encrypted: yes");
        println!("encrypt:");
        super::luks::print_info(&e.luks, Some(e.format.name()), "    ");
    }
    println!("corrupt: {}", i.corrupt);
    if let Some(b) = &i.backing_file {
        println!("backing file: {b}");
    }
    if let Some(f) = &i.backing_format {
        println!("backing file format: {f}");
    }
    print!("{}", snapshot::table(&snaps));
    Ok(())
}

pub(super) fn check(args: &[String]) -> Result<u8> {
    let p = Parsed::new(args, &["-r", "--output"], &["-U", "--force-share"])?;
    let json = p.output_json()?;
    let repair = match p.last("-r") {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(v) => return Err(super::usage(format!("-r takes leaks or all, not '{v}'"))),
    };
    let file = p.one_file()?;
    let access = if repair == Repair::None {
        p.read_access()
    } else {
        Access::Write
    };
    // An image left dirty (lazy refcounts, or clusters reserved ahead when the daemon
    // was killed) gets its refcounts rebuilt when opened for repair, as QEMU's
    // writable open does; a read-only check reports what it finds.
    let img = open_image(file, access, repair != Repair::None)?;
    let checked = block_on(img.check(repair));
    if repair != Repair::None {
        // A repair changes no guest data: the bitmaps stay valid (also when the
        // check failed).
        let released = block_on(img.release_bitmaps());
        let closed = block_on(img.close());
        released.map_err(image_err(file))?;
        closed.map_err(image_err(file))?;
    }
    let r: CheckReport = checked.map_err(image_err(file))?;
    let leaks = r.leaks - r.leaks_fixed.min(r.leaks);
    let corruptions = r.corruptions - r.corruptions_fixed.min(r.corruptions);
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
    Ok(if corruptions > 0 {
        2
    } else if leaks > 0 {
        3
    } else {
        0
    })
}

pub(super) fn map(args: &[String]) -> Result<()> {
    let p = Parsed::new(args, &["--output"], &["-U", "--force-share"])?;
    let json = p.output_json()?;
    let file = p.one_file()?;
    let img = open_image(file, p.read_access(), false)?;
    let extents = block_on(img.map(0, img.size())).map_err(image_err(file))?;
    if json {
        let out: Vec<Value> = extents
            .iter()
            .map(|e| {
                let (kind, host) = match e.kind {
                    ExtentKind::Data { host_offset } => ("data", Some(host_offset)),
                    ExtentKind::Zero => ("zero", None),
                    ExtentKind::Unallocated => ("unallocated", None),
                    ExtentKind::Compressed { .. } => ("compressed", None),
                };
                json!({ "start": e.offset, "length": e.len, "kind": kind, "offset": host })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(());
    }
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
    Ok(())
}

//! `vubd img bitmap`: add, remove, clear, enable, disable and merge the persistent
//! dirty bitmaps of a qcow2 image, with qemu-img's options; operations apply in the
//! order given, and the image is changed only if all of them succeed.

use super::{image_err, open_image, usage, Access, ImgError, Parsed, Result};
use blocklayer::options::coerce;
use qcow::{block_on, LoadedBitmap, StoreBitmap};

/// One operation of the command line.
enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Op {
    fn verb(&self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge(_) => "merge",
        }
    }
}

/// Sets in `dst` every granule that covers a byte dirty in `src` (the two may have
/// different granularities), over a disk of `size` bytes.
fn merge_into(dst: &mut LoadedBitmap, src: &LoadedBitmap, size: u64) {
    for (i, &w) in src.words.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            let b = w.trailing_zeros() as u64;
            w &= w - 1;
            let k = i as u64 * 64 + b;
            let start = k * src.granularity;
            if start >= size {
                continue;
            }
            let end = (start + src.granularity).min(size);
            for g in start / dst.granularity..end.div_ceil(dst.granularity) {
                if let Some(x) = dst.words.get_mut((g / 64) as usize) {
                    *x |= 1 << (g % 64);
                }
            }
        }
    }
}

pub(super) fn bitmap(args: &[String]) -> Result<()> {
    let p = Parsed::new(
        args,
        &["--merge", "-g", "-b", "-F", "-f"],
        &["--add", "--remove", "--clear", "--enable", "--disable"],
    )?;
    let (file, name) = match p.pos.as_slice() {
        [f, n] => (f.as_str(), n.as_str()),
        _ => return Err(usage("bitmap: expected an image file and a bitmap name")),
    };
    if p.has("-b") || p.has("-F") {
        return Err(usage(
            "bitmap: -b (merging from another image) is not supported",
        ));
    }
    if let Some(fmt) = p.last("-f").filter(|f| *f != "qcow2") {
        return Err(ImgError::Image {
            path: file.into(),
            message: format!("format '{fmt}' has no persistent bitmaps (qcow2 has)"),
        });
    }
    let ops: Vec<Op> = p
        .opts
        .iter()
        .filter_map(|(k, v)| match k.as_str() {
            "--add" => Some(Op::Add),
            "--remove" => Some(Op::Remove),
            "--clear" => Some(Op::Clear),
            "--enable" => Some(Op::Enable),
            "--disable" => Some(Op::Disable),
            "--merge" => Some(Op::Merge(v.clone())),
            _ => None,
        })
        .collect();
    if ops.is_empty() {
        return Err(usage(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    let add = ops.iter().any(|o| matches!(o, Op::Add));
    let granularity = match p.last("-g") {
        Some(_) if !add => return Err(usage("granularity only supported with --add")),
        Some(g) => Some(
            coerce::parse_size(g)
                .ok_or_else(|| usage(format!("Invalid granularity specified: '{g}'")))?,
        ),
        None => None,
    };
    let img = open_image(file, Access::Write, true)?;
    let size = img.size();
    let result = (|| -> std::result::Result<(Vec<LoadedBitmap>, Vec<String>), String> {
        let mut bms = block_on(img.load_bitmaps()).map_err(|e| e.to_string())?;
        let mut changed: Vec<String> = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        for op in &ops {
            let fail = |m: String| format!("Operation {} on bitmap {name} failed: {m}", op.verb());
            let find = |bms: &[LoadedBitmap], n: &str| bms.iter().position(|b| b.name == n);
            let usable = |bms: &[LoadedBitmap], n: &str| -> std::result::Result<usize, String> {
                let i = find(bms, n).ok_or_else(|| format!("Dirty bitmap '{n}' not found"))?;
                if bms[i].inconsistent {
                    return Err(format!(
                        "Bitmap '{n}' is inconsistent and cannot be used\n\
                         Try block-dirty-bitmap-remove to delete this bitmap from disk"
                    ));
                }
                Ok(i)
            };
            match op {
                Op::Add => {
                    if find(&bms, name).is_some() {
                        return Err(fail(format!("Bitmap already exists: {name}")));
                    }
                    let g = granularity.unwrap_or(img.geometry().cluster_size.max(4096));
                    qcow::bitmaps::check_new(name, g, size, img.geometry().cluster_size)
                        .map_err(|e| fail(e.to_string()))?;
                    bms.push(LoadedBitmap {
                        name: name.to_string(),
                        granularity: g,
                        // `--disable` in the same command applies next.
                        enabled: true,
                        inconsistent: false,
                        words: vec![0; size.div_ceil(g).div_ceil(64) as usize],
                    });
                    removed.retain(|r| r != name);
                }
                Op::Remove => {
                    let i = find(&bms, name)
                        .ok_or_else(|| fail(format!("Dirty bitmap '{name}' not found")))?;
                    bms.remove(i);
                    changed.retain(|c| c != name);
                    removed.push(name.to_string());
                    continue;
                }
                Op::Clear => {
                    let i = usable(&bms, name).map_err(fail)?;
                    bms[i].words.fill(0);
                }
                Op::Enable | Op::Disable => {
                    let i = usable(&bms, name).map_err(fail)?;
                    bms[i].enabled = matches!(op, Op::Enable);
                }
                Op::Merge(src) => {
                    let d = usable(&bms, name).map_err(fail)?;
                    let s = usable(&bms, src).map_err(fail)?;
                    let src = bms[s].clone();
                    merge_into(&mut bms[d], &src, size);
                }
            }
            if !changed.iter().any(|c| c == name) {
                changed.push(name.to_string());
            }
        }
        let keep: Vec<LoadedBitmap> = bms
            .into_iter()
            .filter(|b| changed.contains(&b.name))
            .collect();
        Ok((keep, removed))
    })();
    let done = match result {
        Err(m) => Err(m),
        Ok((store, removed)) => block_on(async {
            for r in &removed {
                // Added and removed in the same command: never in the image.
                if img.bitmaps().iter().any(|b| &b.name == r) {
                    img.remove_bitmap(r).await?;
                }
            }
            let list: Vec<StoreBitmap<'_>> = store
                .iter()
                .map(|b| StoreBitmap {
                    name: &b.name,
                    granularity: b.granularity,
                    enabled: b.enabled,
                    words: &b.words,
                })
                .collect();
            img.store_bitmaps(&list).await
        })
        .map_err(|e| e.to_string()),
    };
    // The bitmaps not changed stay as they were.
    let released = block_on(img.release_bitmaps());
    let closed = block_on(img.close());
    done.map_err(|message| ImgError::Image {
        path: file.into(),
        message,
    })?;
    released.map_err(image_err(file))?;
    closed.map_err(image_err(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_across_granularities() {
        let size = 1 << 20;
        let mut fine = LoadedBitmap {
            name: "f".into(),
            granularity: 512,
            enabled: true,
            inconsistent: false,
            words: vec![0; 2048 / 64],
        };
        let mut coarse = LoadedBitmap {
            name: "c".into(),
            granularity: 65536,
            enabled: true,
            inconsistent: false,
            words: vec![0; 1],
        };
        // Byte 70000 (fine granule 136) -> coarse granule 1.
        fine.words[136 / 64] |= 1 << (136 % 64);
        merge_into(&mut coarse, &fine, size);
        assert_eq!(coarse.words, [0b10]);
        // Coarse granule 1 -> fine granules 128..256.
        let mut f2 = LoadedBitmap {
            words: vec![0; 2048 / 64],
            ..fine.clone()
        };
        merge_into(&mut f2, &coarse, size);
        assert_eq!(f2.words[2..4], [u64::MAX, u64::MAX]);
        assert_eq!(f2.words.iter().map(|w| w.count_ones()).sum::<u32>(), 128);
    }
}

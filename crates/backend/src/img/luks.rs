//! `vubd img create -f luks` and `vubd img info` of LUKS volumes, with qemu-img's
//! `--object secret,...` for the passphrase and its `-o` creation options
//! (`key-secret`, `cipher-alg`, `cipher-mode`, `ivgen-alg`, `ivgen-hash-alg`,
//! `hash-alg`, `iter-time`).

use super::create::new_file;
use super::{usage, ImgError, Result};
use crate::config::ObjectConfig;
use crate::keyval;
use blocklayer::drivers::file::create::{CREATE_PERM, CREATE_SHARED};
use blocklayer::drivers::luks::create::LuksCreateOptions;
use blocklayer::drivers::luks::header::{Header, HEADER_LEN, MAGIC};
use blocklayer::drivers::luks::info::LuksInfo;
use blocklayer::drivers::luks::volume;
use blocklayer::format_info::Qcow2Encryption;
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

/// The LUKS header at `offset` of `file`, with its algorithms.
fn read_header(
    file: &str,
    offset: u64,
) -> Result<(Header, blocklayer::drivers::luks::header::Algorithms)> {
    use std::os::unix::fs::FileExt;
    let mut head = vec![0u8; HEADER_LEN];
    let f = std::fs::File::open(file).map_err(|e| image_error(file, e))?;
    f.read_exact_at(&mut head, offset)
        .map_err(|e| image_error(file, e))?;
    let h = Header::parse(&head).map_err(|e| image_error(file, e))?;
    let algs = h.algorithms().map_err(|e| image_error(file, e))?;
    Ok((h, algs))
}

/// The `encrypt` info of a qcow2 image whose LUKS header is at `offset` (QEMU's
/// `QCryptoBlockInfo`, read without the passphrase as qemu-img does).
pub(super) fn qcow2_encrypt_info(file: &str, offset: u64) -> Result<Qcow2Encryption> {
    let (h, algs) = read_header(file, offset)?;
    Ok(Qcow2Encryption::luks(LuksInfo::of_header(&h, &algs)))
}

/// Prints the LUKS info `info` indented by `indent` (qemu-img's human form), with
/// the `format` line of a qcow2 image's `encrypt`.
pub(super) fn print_info(info: &LuksInfo, format: Option<&str>, indent: &str) {
    let names = [
        ("ivgen alg", Some(info.ivgen_alg.name())),
        ("ivgen hash alg", info.ivgen_hash_alg.map(|h| h.name())),
        ("hash alg", Some(info.hash_alg.name())),
        ("cipher alg", Some(info.cipher_alg.name())),
        ("uuid", Some(info.uuid.as_str())),
        ("format", format),
        ("cipher mode", Some(info.cipher_mode.name())),
    ];
    for (k, v) in names {
        if let Some(v) = v {
            println!("{indent}{k}: {v}");
        }
    }
    println!("{indent}slots:");
    for (i, s) in info.slots.iter().enumerate() {
        println!("{indent}    [{i}]:");
        println!("{indent}        active: {}", s.active);
        if let Some(iters) = s.iters {
            println!("{indent}        iters: {iters}");
        }
        println!("{indent}        key offset: {}", s.key_offset);
        if let Some(stripes) = s.stripes {
            println!("{indent}        stripes: {stripes}");
        }
    }
    println!("{indent}payload offset: {}", info.payload_offset);
    println!("{indent}master key iters: {}", info.master_key_iters);
}

/// `info` of a LUKS volume: from the header, without the passphrase (as qemu-img).
pub(super) fn info(file: &str, json_out: bool) -> Result<()> {
    let f = std::fs::File::open(file).map_err(|e| image_error(file, e))?;
    let meta = f.metadata().map_err(|e| image_error(file, e))?;
    let (h, algs) = read_header(file, 0)?;
    let size = meta.len().saturating_sub(h.payload_bytes());
    let actual = {
        use std::os::unix::fs::MetadataExt;
        meta.blocks() * 512
    };
    let data = LuksInfo::of_header(&h, &algs);
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
    print_info(&data, None, "    ");
    Ok(())
}

/// `amend --image-opts [--object ...] [--force] -o OPTS SPEC`: adds
/// (`state=active,new-secret=ID[,keyslot=N][,iter-time=MS]`) or erases
/// (`state=inactive,keyslot=N` or `old-secret=ID`) key slots, as qemu-img amend does,
/// of a LUKS volume (`SPEC` `driver=luks,key-secret=ID,file.filename=FILE`) or of an
/// encrypted qcow2 image (`driver=qcow2,encrypt.key-secret=ID,file.filename=FILE`,
/// the options prefixed with `encrypt.`). The header is changed in place, within
/// the area it has (the qcow2 clusters the crypto header extension points to).
pub(super) fn amend(args: &[String]) -> Result<()> {
    use blocklayer::drivers::luks::keyslots::{self, AmendRequest};
    use std::os::unix::fs::FileExt;
    let p = super::Parsed::new(
        args,
        &["-o", "--object", "-f"],
        &["--image-opts", "--force"],
    )?;
    if !p.has("--image-opts") {
        return Err(usage(
            "amend takes --image-opts 'driver=luks,key-secret=ID,file.filename=FILE' or \
             'driver=qcow2,encrypt.key-secret=ID,file.filename=FILE' (the key to unlock \
             the volume is part of its open options, as in qemu-img)",
        ));
    }
    let secrets = secrets(&p.opts)?;
    let spec = p.one_file()?;
    let opt_err = |e: blocklayer::options::OptionsError| usage(e.to_string());
    let v = keyval::parse_option(spec, None).map_err(|e| usage(format!("{spec}: {e}")))?;
    let mut f = Fields::new(&v, "").map_err(opt_err)?;
    let driver = f.string("driver").map_err(opt_err)?;
    let qcow2 = match driver.as_deref() {
        Some("luks") => false,
        Some("qcow2") => true,
        _ => return Err(usage("amend works on driver=luks and driver=qcow2 images")),
    };
    let key_secret = if qcow2 {
        match f.object("encrypt").map_err(opt_err)? {
            Some(mut e) => {
                let k = e.string("key-secret").map_err(opt_err)?;
                e.string("format").map_err(opt_err)?;
                k
            }
            None => None,
        }
    } else {
        f.string("key-secret").map_err(opt_err)?
    };
    let file_opts = f.object("file").map_err(opt_err)?;
    let mut file_opts = file_opts.ok_or_else(|| usage("missing file.filename"))?;
    let file = file_opts.required_string("filename").map_err(opt_err)?;
    let file = file.as_str();

    let mut map = Map::new();
    for (k, v) in p.opts.iter().filter(|(k, _)| k == "-o") {
        let o = keyval::parse_option(v, None).map_err(|e| usage(format!("{k} {v}: {e}")))?;
        if let Value::Object(o) = o {
            map.extend(o);
        }
    }
    let mut o = Fields::from_map(map, "");
    let request = if qcow2 {
        let mut e = o
            .object("encrypt")
            .map_err(opt_err)?
            .ok_or_else(|| usage("-o encrypt.state=active|inactive is required"))?;
        if let Some(format) = e.string("format").map_err(opt_err)? {
            if format != "luks" {
                return Err(image_error(
                    file,
                    "Amend can't be used to change the qcow2 encryption format",
                ));
            }
        }
        let r = AmendRequest::take_from(&mut e).map_err(opt_err)?;
        e.finish().map_err(opt_err)?;
        r
    } else {
        AmendRequest::take_from(&mut o).map_err(opt_err)?
    };
    o.finish().map_err(opt_err)?;

    // Where the LUKS header is: the whole file, or the qcow2 crypto header area.
    let (base, area) = if qcow2 {
        let img = super::open_image(file, super::Access::Read, false)?;
        img.info()
            .crypto_header
            .ok_or_else(|| image_error(file, "image is not encrypted, can't amend"))?
    } else {
        (0, 0)
    };
    let Some(key_secret) = key_secret else {
        let name = if qcow2 {
            "encrypt.key-secret"
        } else {
            "key-secret"
        };
        return Err(image_error(
            file,
            format!("Parameter '{name}' is required for cipher"),
        ));
    };
    let (password, amend) = request
        .resolve(&secrets, &key_secret)
        .map_err(|e| image_error(file, e))?;
    // qemu-img opens the image with its key before amending it, erasing included.
    let password = match password {
        Some(p) => p,
        None => secrets
            .lookup_utf8(&key_secret)
            .map(String::into_bytes)
            .map_err(|e| image_error(file, e))?,
    };
    let fh = super::open_file(file, super::Access::Write)?;
    let len = fh.metadata().map_err(|e| image_error(file, e))?.len();
    let area = if qcow2 { area } else { len };
    let io_err = |what: &'static str| move |e| blocklayer::BlockError::io(what, e);
    keyslots::amend_area(
        area.min(len.saturating_sub(base)),
        Some(&password),
        &amend,
        p.has("--force"),
        |off, n| {
            let mut b = vec![0u8; n];
            fh.read_exact_at(&mut b, base + off)
                .map_err(io_err("read"))?;
            Ok(b)
        },
        |off, bytes| fh.write_all_at(bytes, base + off).map_err(io_err("write")),
    )
    .map_err(|e| image_error(file, e))?;
    fh.sync_all().map_err(|e| image_error(file, e))
}

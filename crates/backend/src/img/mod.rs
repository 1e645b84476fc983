//! `vubd img`: create, inspect, check, map, snapshot and convert images without
//! qemu-img, with qemu-img's options and output where it has them.
//!
//! ```text
//! vubd img create [-f qcow2|raw|luks] [--object secret,...] [-b BACKING [-F FMT]] [-o OPTS] FILE SIZE
//! vubd img info [-U] [--output human|json] FILE
//! vubd img check [-U] [-r leaks|all] [--output human|json] FILE
//! vubd img map [-U] [--output human|json] FILE
//! vubd img snapshot [-U] [-q] [-f qcow2] -l | -c NAME | -a NAME | -d NAME FILE
//! vubd img convert [-U] [-f FMT] [-O FMT] [-c] [-o OPTS] SRC DST
//! vubd img bitmap (--add [-g GRAN] | --remove | --clear | --enable | --disable |
//!                  --merge SRC)... [-f qcow2] FILE BITMAP
//! ```
//!
//! - [`create`]: `create` and the `-o` creation options (also `convert -o`)
//! - [`inspect`]: `info`, `check`, `map`
//! - [`luks`]: `create -f luks`, `info` and `amend` (key slots) of LUKS volumes,
//!   `--object secret`
//! - [`snapshot`]: `snapshot`, and the snapshot table `info` shows too
//! - [`source`]: reading an image through its backing chain, for `convert`
//! - [`convert`]: `convert`, copies of images
//! - [`bitmap`]: `bitmap`, the persistent dirty bitmaps of a qcow2 image
//!
//! Images are locked as QEMU locks them (see `blocklayer::drivers::lock`): a tool that
//! changes an image needs it for itself, one that reads it needs no writer on it;
//! `-U` (`--force-share`) reads without locks, as qemu-img's.

mod bitmap;
mod convert;
mod create;
mod inspect;
mod luks;
mod snapshot;
mod source;

use blocklayer::drivers::lock::{
    lock_image, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED,
};
use qcow::{block_on, FileIo, OpenOptions, Qcow2};
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
Usage: vubd img create [-f qcow2|raw|luks] [--object secret,...] [-b BACKING [-F FMT]]
                       [-o OPTIONS] FILE SIZE
       vubd img info [-U] [--output human|json] FILE
       vubd img check [-U] [-r leaks|all] [--output human|json] FILE
       vubd img map [-U] [--output human|json] FILE
       vubd img snapshot [-U] [-q] [-f qcow2] -l | -c NAME | -a NAME | -d NAME FILE
       vubd img convert [-U] [-q] [-f FMT] [-O FMT] [-c] [-o OPTIONS] SRC DST
       vubd img bitmap (--add [-g GRAN] | --remove | --clear | --enable | --disable
                        | --merge SOURCE)... [-f qcow2] FILE BITMAP
       vubd img amend [--object secret,...]... [--force] --image-opts -o OPTIONS
                      'driver=luks,key-secret=ID,file.filename=FILE'
                      | 'driver=qcow2,encrypt.key-secret=ID,file.filename=FILE'

  create -o takes qemu-img's qcow2 creation options (cluster_size, compat,
  lazy_refcounts, refcount_bits, extended_l2, backing_file, backing_fmt,
  preallocation, compression_type, data_file, data_file_raw), with -f raw:
  preallocation (off, falloc, full); with -f luks: key-secret (the id of a
  --object secret,id=ID,data=..|file=..), cipher-alg, cipher-mode, ivgen-alg,
  ivgen-hash-alg, hash-alg, iter-time (qemu-img's); with -f qcow2 the same
  as encrypt.format=luks,encrypt.key-secret=ID,encrypt.cipher-alg=... (an
  encrypted qcow2). info shows a LUKS header (of a luks volume or an encrypted
  qcow2) without its passphrase.
  snapshot -l lists, -c creates, -a applies (reverts to), -d deletes an internal
  snapshot (-a and -d take an id or a name).
  convert copies what the guest sees of SRC (through its backing chain) to a new
  image DST (-O raw, the default, or qcow2), leaving zeroes unallocated; -c writes
  compressed qcow2 clusters; -o takes the options of create.
  amend changes the key slots of a LUKS volume or an encrypted qcow2 as qemu-img
  amend: -o state=active,new-secret=ID[,keyslot=N][,iter-time=MS][,secret=ID] adds
  one, -o state=inactive,keyslot=N or old-secret=ID erases (--force: even the last
  one, or over an active slot); for qcow2 the options are encrypt.state=... .
  bitmap changes the persistent dirty bitmap BITMAP of FILE, in the order given:
  --add creates it (enabled, granularity GRAN, default the cluster size, at least
  4 KiB), --merge ORs the bitmap SOURCE of FILE into it.
";

fn usage(msg: impl Into<String>) -> ImgError {
    ImgError::Usage(format!("{}\n{USAGE}", msg.into()))
}

/// Runs `vubd img ARGS`; returns the process exit status.
pub fn main(args: &[String]) -> Result<u8> {
    // A command-line tool whose output goes into a pipe that closes (`vubd img map
    // ... | head`) ends quietly, as qemu-img does, instead of panicking in print!:
    // Rust ignores SIGPIPE by default, the daemon needs that, this tool does not.
    // SAFETY: restoring a signal's default disposition, before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let Some((cmd, rest)) = args.split_first() else {
        return Err(usage("missing command"));
    };
    match cmd.as_str() {
        "create" => create::create(rest).map(|()| 0),
        "info" => inspect::info(rest).map(|()| 0),
        "check" => inspect::check(rest),
        "map" => inspect::map(rest).map(|()| 0),
        "snapshot" => snapshot::snapshot(rest).map(|()| 0),
        "convert" => convert::convert(rest).map(|()| 0),
        "bitmap" => bitmap::bitmap(rest).map(|()| 0),
        "amend" => luks::amend(rest).map(|()| 0),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(0)
        }
        other => Err(usage(format!("unknown command '{other}'"))),
    }
}

/// A command line split into options (flags have an empty value) and positional
/// arguments.
struct Parsed {
    opts: Vec<(String, String)>,
    pos: Vec<String>,
}

impl Parsed {
    /// Splits `args`: `with_value` options take the next argument, `flags` none.
    fn new(args: &[String], with_value: &[&str], flags: &[&str]) -> Result<Parsed> {
        let mut opts = Vec::new();
        let mut pos = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            // `--long=value` as well as `--long value`.
            if let Some((k, v)) = a.split_once('=').filter(|(k, _)| k.starts_with("--")) {
                if !with_value.contains(&k) {
                    return Err(usage(format!("unknown option '{k}'")));
                }
                opts.push((k.to_string(), v.to_string()));
            } else if with_value.contains(&a.as_str()) {
                let v = it
                    .next()
                    .ok_or_else(|| usage(format!("option '{a}' needs a value")))?;
                opts.push((a.clone(), v.clone()));
            } else if flags.contains(&a.as_str()) {
                opts.push((a.clone(), String::new()));
            } else if a.starts_with('-') && a.len() > 1 {
                return Err(usage(format!("unknown option '{a}'")));
            } else {
                pos.push(a.clone());
            }
        }
        Ok(Parsed { opts, pos })
    }

    /// The value of the last `key` option.
    fn last(&self, key: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn has(&self, key: &str) -> bool {
        self.opts.iter().any(|(k, _)| k == key)
    }

    /// `--output human|json`: whether JSON was asked for.
    fn output_json(&self) -> Result<bool> {
        match self.last("--output") {
            None | Some("human") => Ok(false),
            Some("json") => Ok(true),
            Some(v) => Err(usage(format!("--output takes human or json, not '{v}'"))),
        }
    }

    /// How to open images for reading: `-U` shares them with writers.
    fn read_access(&self) -> Access {
        if self.has("-U") || self.has("--force-share") {
            Access::Shared
        } else {
            Access::Read
        }
    }

    fn one_file(&self) -> Result<&str> {
        match self.pos.as_slice() {
            [f] => Ok(f),
            _ => Err(usage("expected one image file")),
        }
    }
}

/// How a tool opens an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// To change it: nobody else may write or read it consistently meanwhile.
    Write,
    /// To read it: nobody may write it meanwhile.
    Read,
    /// To read it whatever others do (`-U`): no locks.
    Shared,
}

fn file_err(path: &str) -> impl Fn(std::io::Error) -> ImgError + '_ {
    move |source| ImgError::File {
        path: path.into(),
        source,
    }
}

/// Opens an image file and takes QEMU's image locks for `access`.
fn open_file(path: &str, access: Access) -> Result<std::fs::File> {
    let file = FsOpen::new()
        .read(true)
        .write(access == Access::Write)
        .open(path)
        .map_err(file_err(path))?;
    let all = PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE;
    let (perm, shared) = match access {
        Access::Write => (
            PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
            PERM_WRITE_UNCHANGED,
        ),
        Access::Read => (PERM_CONSISTENT_READ, all & !PERM_WRITE),
        Access::Shared => return Ok(file),
    };
    lock_image(file.as_raw_fd(), path, perm, shared).map_err(|e| ImgError::Image {
        path: path.into(),
        message: e.to_string(),
    })?;
    Ok(file)
}

fn image_err(path: &str) -> impl Fn(qcow::Error) -> ImgError + '_ {
    move |e| ImgError::Image {
        path: path.into(),
        message: e.to_string(),
    }
}

/// Opens a qcow2 image. Writers repair an image left dirty (lazy refcounts) first,
/// as qemu-img does; `check` opens with `repair` off to report what it finds.
fn open_image(file: &str, access: Access, repair_dirty: bool) -> Result<Qcow2<FileIo>> {
    let io = FileIo::new(open_file(file, access)?);
    let opts = OpenOptions {
        writable: access == Access::Write,
        repair_dirty,
        ..OpenOptions::read_only()
    };
    block_on(Qcow2::open(io, opts)).map_err(image_err(file))
}

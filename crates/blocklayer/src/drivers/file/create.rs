//! Creating host files: `blockdev-create` with `driver: file` and `vubd img create -f
//! raw`; [`create_empty`] also for the files `vubd img` writes qcow2 images into. As
//! QEMU's file driver does, the file is created or emptied under the write and resize
//! locks (so an image in use elsewhere is never truncated), then grown to its size
//! with the preallocation asked for:
//! - `off`: a sparse file;
//! - `falloc`: the whole size reserved with fallocate, reading as zeroes;
//! - `full`: the whole size written with zeroes, then synced.
//!
//! `off` and `falloc` also write the first block with zeroes, as QEMU does: an
//! O_DIRECT reader then finds real data at offset 0 when it probes the alignment
//! (reads of holes and unwritten extents succeed at any alignment).

use crate::drivers::lock::{
    lock_image, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED,
};
use crate::drivers::CreateWork;
use crate::error::{strerror, BlockError, Result};
use crate::graph::Graph;
use crate::options::coerce::Fields;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// The file driver's `preallocation` (QEMU's `PreallocMode` without `metadata`, which
/// only format drivers have).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FilePrealloc {
    #[default]
    Off,
    Falloc,
    Full,
}

impl FilePrealloc {
    /// Parses QEMU's name; `metadata` gets QEMU's error.
    pub fn from_name(name: &str) -> Result<FilePrealloc> {
        match name {
            "off" => Ok(FilePrealloc::Off),
            "falloc" => Ok(FilePrealloc::Falloc),
            "full" => Ok(FilePrealloc::Full),
            "metadata" => Err(BlockError::Graph(
                "Unsupported preallocation mode: metadata".into(),
            )),
            other => Err(BlockError::Graph(format!(
                "Invalid preallocation mode '{other}' (off, falloc or full)"
            ))),
        }
    }
}

/// Largest zero buffer written at once.
const CHUNK: u64 = 1 << 20;

/// Size of the block written at offset 0 (QEMU: the larger of 4 KiB and the page size).
const FIRST_BLOCK: u64 = 4096;

fn fail(what: &str, path: &Path, e: std::io::Error) -> BlockError {
    BlockError::Graph(format!("{what} '{}': {e}", path.display()))
}

fn write_zeroes(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let zeroes = vec![0u8; len.min(CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        file.write_all_at(&zeroes[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Reserves `0..size` of an empty file: fallocate, or zero writes where the file
/// system cannot reserve space (as posix_fallocate falls back).
fn reserve(file: &File, size: u64) -> std::io::Result<()> {
    let len = i64::try_from(size).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    file.set_len(size)?;
    write_zeroes(file, 0, size)
}

/// What a file's creator holds (QEMU's `raw_co_create`): write and resize.
pub const CREATE_PERM: u32 = PERM_WRITE | PERM_RESIZE;

/// What a file's creator shares: everything but resize, so that nobody can hold the
/// file with resize or unshare what the creator needs.
pub const CREATE_SHARED: u32 = PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED;

/// Opens the regular file at `path` (creating it if need be), takes QEMU's image locks
/// for holding `perm` while sharing `shared`, and only then empties it: a file another
/// process holds is never truncated. The locks last as long as the returned file.
///
/// Creators pass [`CREATE_PERM`] and [`CREATE_SHARED`]; a creator that goes on
/// writing the file (a copy) may hold and refuse more.
pub fn create_empty(path: &Path, perm: u32, shared: u32) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        // Emptied once the locks are held.
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| BlockError::Open {
            path: path.display().to_string(),
            source,
        })?;
    let meta = file
        .metadata()
        .map_err(|e| fail("Could not stat", path, e))?;
    if !meta.file_type().is_file() {
        return Err(BlockError::Graph(format!(
            "'{}' is not a regular file: the file driver creates regular files only",
            path.display()
        )));
    }
    // As QEMU: fail if anyone holds what we refuse to share or refuses to share what
    // we need.
    lock_image(file.as_raw_fd(), &path.display().to_string(), perm, shared)?;
    file.set_len(0)
        .map_err(|e| fail("Could not clear", path, e))?;
    Ok(file)
}

/// Creates (or empties) the regular file at `path` under the creation locks and makes
/// it `size` bytes long with `prealloc`.
pub fn create_file(path: &Path, size: u64, prealloc: FilePrealloc) -> Result<()> {
    let file = create_empty(path, CREATE_PERM, CREATE_SHARED)?;
    match prealloc {
        FilePrealloc::Off => file
            .set_len(size)
            .map_err(|e| fail("Could not resize file", path, e))?,
        FilePrealloc::Falloc => {
            if size > 0 {
                reserve(&file, size)
                    .map_err(|e| fail("Could not preallocate new data for", path, e))?;
            }
        }
        FilePrealloc::Full => {
            file.set_len(size)
                .map_err(|e| fail("Could not resize file", path, e))?;
            write_zeroes(&file, 0, size)
                .and_then(|()| file.sync_all())
                .map_err(|e| fail("Could not write zeros for preallocation to", path, e))?;
        }
    }
    if prealloc != FilePrealloc::Full && size > 0 {
        // Best effort, as in QEMU: only an optimisation for alignment probing.
        if let Err(e) = write_zeroes(&file, 0, size.min(FIRST_BLOCK)) {
            log::debug!("{}: could not write the first block: {e}", path.display());
        }
    }
    Ok(())
}

/// `blockdev-create` with `driver: file` (QEMU's `BlockdevCreateOptionsFile`): the
/// table's create function of `file`.
pub(super) fn blockdev_create(mut f: Fields, _graph: &Graph) -> Result<CreateWork> {
    let filename = f.required_string("filename")?;
    let size = f.unsigned("size")?;
    let size = f.required("size", size)?;
    let prealloc = match f.string("preallocation")? {
        Some(name) => FilePrealloc::from_name(&name)?,
        None => FilePrealloc::Off,
    };
    // Accepted as in QEMU, where both are best-effort hints; vubd does not apply them.
    f.bool("nocow")?;
    f.uint("extent-size-hint")?;
    f.finish()?;
    Ok(Box::new(move || {
        create_file(Path::new(&filename), size, prealloc).map_err(|e| match e {
            BlockError::Open { .. } => BlockError::Graph(format!(
                "Could not create '{filename}': {}",
                strerror(e.errno())
            )),
            e => e,
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn modes_take_the_space_they_promise() {
        let dir = std::env::temp_dir();
        let size = 4 << 20;
        for mode in [FilePrealloc::Off, FilePrealloc::Falloc, FilePrealloc::Full] {
            let p = dir.join(format!("vubd-file-create-{}-{mode:?}", std::process::id()));
            std::fs::write(&p, vec![7u8; 8192]).unwrap();
            create_file(&p, size, mode).unwrap();
            let m = std::fs::metadata(&p).unwrap();
            let data = std::fs::read(&p).unwrap();
            std::fs::remove_file(&p).unwrap();
            assert_eq!(m.len(), size, "{mode:?}");
            assert!(data.iter().all(|&b| b == 0), "{mode:?}: old content left");
            let allocated = m.blocks() * 512;
            if mode == FilePrealloc::Off {
                assert!(allocated <= 64 << 10, "{mode:?}: {allocated}");
            } else {
                assert!(allocated >= size, "{mode:?}: {allocated}");
            }
        }
        assert!(FilePrealloc::from_name("metadata")
            .unwrap_err()
            .to_string()
            .contains("Unsupported preallocation mode: metadata"));
    }
}

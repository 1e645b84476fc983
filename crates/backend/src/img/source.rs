//! An image as its guest sees it, for `vubd img convert`: a raw file, or a qcow2 image
//! over its backing chain (opened from the headers as the daemon opens them: relative
//! to the image's directory, read-only, the format from the header or probed, at most
//! `MAX_BACKING_DEPTH` deep, never looping). Besides reading, a source says where it
//! may hold data, so that a copy skips what reads as zeroes without reading it.

use super::{image_err, open_file, Access, ImgError, Result};
use blocklayer::graph::MAX_BACKING_DEPTH;
use qcow::{block_on, ExtentKind, FileIo, OpenOptions, Qcow2, QcowIo};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One image of a chain.
pub(super) enum Source {
    Raw {
        path: String,
        file: File,
        size: u64,
    },
    Qcow2 {
        path: String,
        image: Box<Qcow2<FileIo>>,
        /// What unallocated clusters read from; zeroes without it.
        backing: Option<Box<Source>>,
    },
}

/// Whether a range may hold data (`true`) or is known to read as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Status {
    pub offset: u64,
    pub len: u64,
    pub data: bool,
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// The format of an image file from its first bytes: qcow2 or raw.
pub(super) fn probe(path: &str) -> Result<&'static str> {
    let f = File::open(path).map_err(super::file_err(path))?;
    let mut magic = [0u8; 4];
    let n = f.read_at(&mut magic, 0).map_err(super::file_err(path))?;
    Ok(if n == 4 && &magic == QCOW2_MAGIC {
        "qcow2"
    } else {
        "raw"
    })
}

impl Source {
    /// Opens `path` as `format` (probed if `None`) with its backing chain; `access`
    /// says how every image of the chain is locked.
    pub(super) fn open(path: &str, format: Option<&str>, access: Access) -> Result<Source> {
        let mut chain = Vec::new();
        Self::open_in(path, format, access, &mut chain)
    }

    /// The canonical paths of the images of the chain, top first.
    pub(super) fn paths(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut s = Some(self);
        while let Some(layer) = s {
            let p = match layer {
                Source::Raw { path, .. } | Source::Qcow2 { path, .. } => path,
            };
            out.push(std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p)));
            s = match layer {
                Source::Qcow2 { backing, .. } => backing.as_deref(),
                Source::Raw { .. } => None,
            };
        }
        out
    }

    fn open_in(
        path: &str,
        format: Option<&str>,
        access: Access,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Source> {
        let format = match format {
            Some(f) => f,
            None => probe(path)?,
        };
        let file = open_file(path, access)?;
        match format {
            "raw" => {
                let size = file.metadata().map_err(super::file_err(path))?.len();
                Ok(Source::Raw {
                    path: path.into(),
                    file,
                    size,
                })
            }
            "qcow2" => Self::open_qcow2(path, file, access, chain),
            other => Err(ImgError::Image {
                path: path.into(),
                message: format!("unknown format '{other}' (qcow2 or raw)"),
            }),
        }
    }

    fn open_qcow2(
        path: &str,
        file: File,
        access: Access,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Source> {
        let io = FileIo::new(file);
        let header = read_header(path, &io)?;
        let beside = |name: &str| match Path::new(path).parent() {
            Some(dir) if Path::new(name).is_relative() => dir.join(name),
            _ => PathBuf::from(name),
        };
        let data = match &header.data_file {
            Some(name) => {
                let p = beside(name);
                let p = p.to_str().unwrap_or(name);
                Some(FileIo::new(open_file(p, access)?))
            }
            None => None,
        };
        let image = block_on(Qcow2::open_with_data_file(
            io,
            data,
            OpenOptions::read_only(),
        ))
        .map_err(image_err(path))?;
        // `vubd img` takes no secrets for reading: ciphertext is never copied out.
        if image.is_encrypted() {
            return Err(ImgError::Image {
                path: path.into(),
                message: "the image is encrypted: vubd img cannot read its data (use \
                          qemu-img with --object secret,... and --image-opts)"
                    .into(),
            });
        }
        let info = image.info();
        let backing = match &info.backing_file {
            None => None,
            Some(name) => {
                let p = beside(name);
                let canonical = std::fs::canonicalize(&p).map_err(|source| ImgError::File {
                    path: p.display().to_string(),
                    source,
                })?;
                chain.push(std::fs::canonicalize(path).unwrap_or_else(|_| path.into()));
                if chain.len() >= MAX_BACKING_DEPTH {
                    return Err(ImgError::Image {
                        path: path.into(),
                        message: format!("backing chain deeper than {MAX_BACKING_DEPTH} images"),
                    });
                }
                if chain.contains(&canonical) {
                    return Err(ImgError::Image {
                        path: path.into(),
                        message: format!("backing chain loops back to '{}'", canonical.display()),
                    });
                }
                let p = canonical.to_str().unwrap_or(name).to_string();
                let b = Self::open_in(&p, info.backing_format.as_deref(), access, chain)?;
                chain.pop();
                Some(Box::new(b))
            }
        };
        Ok(Source::Qcow2 {
            path: path.into(),
            image: Box::new(image),
            backing,
        })
    }

    /// The virtual size.
    pub(super) fn size(&self) -> u64 {
        match self {
            Source::Raw { size, .. } => *size,
            Source::Qcow2 { image, .. } => image.size(),
        }
    }

    fn path(&self) -> &str {
        match self {
            Source::Raw { path, .. } | Source::Qcow2 { path, .. } => path,
        }
    }

    /// Where `offset..offset+len` (inside the disk) may hold data, in order.
    pub(super) fn status(&self, offset: u64, len: u64) -> Result<Vec<Status>> {
        let mut out = Vec::new();
        self.status_into(offset, len, &mut out)?;
        Ok(out)
    }

    fn status_into(&self, offset: u64, len: u64, out: &mut Vec<Status>) -> Result<()> {
        let mut push = |offset: u64, len: u64, data: bool| match out.last_mut() {
            Some(l) if l.data == data && l.offset + l.len == offset => l.len += len,
            _ => out.push(Status { offset, len, data }),
        };
        match self {
            Source::Raw { path, file, .. } => {
                for (o, l, data) in raw_extents(file, offset, len).map_err(super::file_err(path))? {
                    push(o, l, data);
                }
            }
            Source::Qcow2 { image, backing, .. } => {
                let extents = block_on(image.map(offset, len)).map_err(image_err(self.path()))?;
                for e in extents {
                    match (e.kind, backing) {
                        (ExtentKind::Zero, _) | (ExtentKind::Unallocated, None) => {
                            push(e.offset, e.len, false)
                        }
                        (ExtentKind::Unallocated, Some(b)) => {
                            // Past the backing file's end reads as zeroes.
                            let end = (e.offset + e.len).min(b.size().max(e.offset));
                            let mut below = Vec::new();
                            if end > e.offset {
                                b.status_into(e.offset, end - e.offset, &mut below)?;
                            }
                            for s in below {
                                push(s.offset, s.len, s.data);
                            }
                            if end < e.offset + e.len {
                                push(end, e.offset + e.len - end, false);
                            }
                        }
                        _ => push(e.offset, e.len, true),
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads guest data (inside the disk).
    pub(super) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Source::Raw { path, file, size } => {
                let n = (buf.len() as u64).min(size.saturating_sub(offset)) as usize;
                file.read_exact_at(&mut buf[..n], offset)
                    .map_err(super::file_err(path))?;
                buf[n..].fill(0);
                Ok(())
            }
            Source::Qcow2 {
                path,
                image,
                backing,
            } => {
                let extents =
                    block_on(image.map(offset, buf.len() as u64)).map_err(image_err(path))?;
                for e in extents {
                    let part = &mut buf[(e.offset - offset) as usize..][..e.len as usize];
                    match e.kind {
                        ExtentKind::Data { host_offset } => {
                            block_on(image.data_io().read_at(host_offset, part))
                                .map_err(super::file_err(path))?
                        }
                        ExtentKind::Compressed { .. } => {
                            block_on(image.read_compressed(&e, part)).map_err(image_err(path))?
                        }
                        ExtentKind::Zero => part.fill(0),
                        ExtentKind::Unallocated => match backing {
                            None => part.fill(0),
                            Some(b) => {
                                let n = e.len.min(b.size().saturating_sub(e.offset)) as usize;
                                if n > 0 {
                                    b.read(e.offset, &mut part[..n])?;
                                }
                                part[n..].fill(0);
                            }
                        },
                    }
                }
                Ok(())
            }
        }
    }
}

/// Reads and parses the qcow2 header (for the name of an external data file, which
/// must be opened with the image).
fn read_header(path: &str, io: &FileIo) -> Result<qcow::Header> {
    let len = block_on(io.len()).map_err(super::file_err(path))?;
    let mut buf = vec![0u8; len.clamp(72, 2 << 20) as usize];
    block_on(io.read_at(0, &mut buf)).map_err(super::file_err(path))?;
    qcow::Header::parse(&buf, len).map_err(|e| ImgError::Image {
        path: path.into(),
        message: e.to_string(),
    })
}

/// `lseek` for `whence` (SEEK_DATA, SEEK_HOLE) from `offset`; `None` at ENXIO (no
/// more data), and for file systems that do not know (EINVAL).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor `file` keeps open for the call; it touches no
    // memory of ours.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(e),
    }
}

/// Data and hole ranges of a raw file within `offset..offset+len`: (offset, length,
/// whether it may hold data). Beyond the end of the file there is nothing; a file
/// system without SEEK_DATA reports all data.
fn raw_extents(file: &File, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u64, bool)>> {
    let end = offset + len;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let data = match seek(file, pos, libc::SEEK_DATA) {
            Ok(d) => d.unwrap_or(end).min(end),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => pos,
            Err(e) => return Err(e),
        };
        if data > pos {
            out.push((pos, data - pos, false));
            pos = data;
            continue;
        }
        let hole = match seek(file, pos, libc::SEEK_HOLE) {
            Ok(h) => h.unwrap_or(end).min(end),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => end,
            Err(e) => return Err(e),
        };
        let hole = hole.max(pos + 1).min(end);
        out.push((pos, hole - pos, true));
        pos = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_extents_find_holes() {
        let dir = std::env::temp_dir().join(format!("vubd-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r.raw");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 4 << 20).unwrap();
        let e = raw_extents(&f, 0, 8 << 20).unwrap();
        // Every byte once, in order; the written block is data.
        let mut pos = 0;
        for &(o, l, _) in &e {
            assert_eq!(o, pos);
            pos += l;
        }
        assert_eq!(pos, 8 << 20);
        assert!(e
            .iter()
            .any(|&(o, l, d)| d && o <= 4 << 20 && (4 << 20) + 4096 <= o + l));
        let src = Source::Raw {
            path: p.to_str().unwrap().into(),
            file: f,
            size: 8 << 20,
        };
        let mut buf = vec![0u8; 8192];
        src.read((4 << 20) - 4096, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 1));
        std::fs::remove_dir_all(dir).unwrap();
    }
}

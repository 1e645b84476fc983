//! Throw-away directories and image files, removed on drop.

use crate::util::{unique_name, Rng};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// A fresh directory (under /tmp unless told otherwise), removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        TempDir::new_in(Path::new("/tmp"), prefix)
    }

    pub fn new_in(parent: &Path, prefix: &str) -> TempDir {
        let path = parent.join(unique_name(prefix));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A raw image file, by default in /dev/shm (tmpfs: fast, supports hole punching and
/// SEEK_HOLE/SEEK_DATA, but not O_DIRECT: use `cache.direct=off` with it).
#[derive(Debug)]
pub struct TempImage {
    path: PathBuf,
    size: u64,
}

impl TempImage {
    /// A sparse image of `size` bytes (reads as zeroes) in /dev/shm.
    pub fn new(size: u64) -> TempImage {
        TempImage::new_in(Path::new("/dev/shm"), size)
    }

    /// A sparse image of `size` bytes in `dir`.
    pub fn new_in(dir: &Path, size: u64) -> TempImage {
        let path = dir.join(format!("{}.img", unique_name("vubd-test")));
        let f = File::create(&path)
            .unwrap_or_else(|e| panic!("cannot create image {}: {e}", path.display()));
        f.set_len(size)
            .unwrap_or_else(|e| panic!("cannot size image {}: {e}", path.display()));
        TempImage { path, size }
    }

    /// An image in /dev/shm fully written with pseudo-random data (every block allocated).
    /// Returns the image and its contents.
    pub fn new_random(size: u64, rng: &mut Rng) -> (TempImage, Vec<u8>) {
        let img = TempImage::new(size);
        let data = rng.bytes(size as usize);
        img.write_at(0, &data);
        (img, data)
    }

    /// An image in /dev/shm fully written with one byte value (every block allocated).
    pub fn new_filled(size: u64, byte: u8) -> TempImage {
        let img = TempImage::new(size);
        img.fill(byte);
        img
    }

    /// Write `byte` over the whole file (allocating every block).
    pub fn fill(&self, byte: u8) {
        let chunk = vec![byte; 1 << 20];
        let mut off = 0u64;
        while off < self.size {
            let n = (self.size - off).min(chunk.len() as u64) as usize;
            self.write_at(off, &chunk[..n]);
            off += n as u64;
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a string, for option strings.
    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("image paths are UTF-8")
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn open(&self, write: bool) -> File {
        OpenOptions::new()
            .read(true)
            .write(write)
            .open(&self.path)
            .unwrap_or_else(|e| panic!("cannot open image {}: {e}", self.path.display()))
    }

    /// Read the host file directly (through the page cache, which is what a daemon using
    /// buffered I/O writes to; with `cache.direct=on` the daemon bypasses it and the page
    /// cache is kept coherent by the kernel).
    pub fn read_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.open(false)
            .read_exact_at(&mut buf, offset)
            .unwrap_or_else(|e| panic!("read {}@{offset}: {e}", self.path.display()));
        buf
    }

    pub fn read_all(&self) -> Vec<u8> {
        let len = self.open(false).metadata().expect("stat").len();
        self.read_at(0, len as usize)
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) {
        self.open(true)
            .write_all_at(data, offset)
            .unwrap_or_else(|e| panic!("write {}@{offset}: {e}", self.path.display()));
    }

    /// Allocated size in bytes (st_blocks * 512).
    pub fn allocated_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).expect("stat image").blocks() * 512
    }

    /// Current file length.
    pub fn file_len(&self) -> u64 {
        std::fs::metadata(&self.path).expect("stat image").len()
    }

    /// `lseek(SEEK_DATA)` from `offset`: the next data offset, or None (ENXIO: only a hole
    /// up to the end of the file).
    pub fn seek_data(&self, offset: u64) -> Option<u64> {
        self.seek(offset, libc::SEEK_DATA)
    }

    /// `lseek(SEEK_HOLE)` from `offset`: the next hole offset (EOF counts as a hole).
    pub fn seek_hole(&self, offset: u64) -> Option<u64> {
        self.seek(offset, libc::SEEK_HOLE)
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        let f = self.open(false);
        // SAFETY: lseek on a file descriptor we own (kept open by `f` for the call); it has
        // no memory-safety preconditions.
        let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return None;
            }
            panic!("lseek {}: {e}", self.path.display());
        }
        Some(r as u64)
    }

    /// True if every byte of `offset..offset+len` lies in a hole of the host file.
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        match self.seek_data(offset) {
            None => true,
            Some(d) => d >= offset + len,
        }
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A size-limited tmpfs mounted for the test (unmounted on drop).
pub struct SmallTmpfs {
    pub dir: PathBuf,
}

impl SmallTmpfs {
    pub fn mount(parent: &Path, mib: u64) -> SmallTmpfs {
        let dir = parent.join("small-tmpfs");
        std::fs::create_dir_all(&dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}M"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "mounting a {mib} MiB tmpfs failed (the ENOSPC test needs root)"
        );
        SmallTmpfs { dir }
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

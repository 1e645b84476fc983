//! The `rbd` protocol driver: a Ceph RBD image through librbd (loaded at run time, see
//! [`ffi`]), with QEMU's options and error texts.
//!
//! Requests are librbd's asynchronous calls. librbd runs their completion callbacks
//! on its own threads; the callback only stores the result and wakes the waiting
//! request's task through the executor's cross-thread wake path (a queue plus the
//! owning iothread's eventfd, see `aio::executor`), so an iothread never blocks on
//! librbd. The request's I/O vector (and the keepalive of the guest memory or bounce
//! buffer behind it) is held by the completion's state until librbd is done, even if
//! the request's future is dropped first.
//!
//! No data is copied by vubd: reads land straight in the request's buffers and writes
//! are handed to librbd as they are. librbd itself copies write data into its own
//! buffers (its `rbd_disable_zero_copy_writes` default), as it may keep them past the
//! completion, and copies read data out of the messages it received.

mod conn;
mod create;
pub mod ffi;
mod options;

pub use options::{AuthMode, RbdLocation, RbdOptions};

use crate::aio::iovec::IoVec;
use crate::aio::LocalBoxFuture;
use crate::driver::Driver;
use crate::error::{strerror, BlockError, Result};
use crate::format_info::{DriverImageInfo, ImageInfoSpecific, RbdInfo};
use crate::options::CommonOptions;
use conn::{connect, cstr, Conn};
use ffi::{Completion, Image};
use std::ffi::{c_int, c_void};
use std::io;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

/// The table row of `rbd`.
pub(crate) const ENTRY: super::DriverEntry = super::DriverEntry {
    names: &["rbd"],
    kind: super::Kind::Protocol,
    parse: options::parse,
    create: Some(create::blockdev_create),
    reopen_mutable: &[],
};

/// An open image (null once closed) and its connection; dropping it closes the image,
/// then the connection.
struct OpenImage {
    image: AtomicPtr<c_void>,
    conn: Conn,
}

// SAFETY: librbd image handles are thread-safe; the handle is closed only by `close`,
// when no request is in flight.
unsafe impl Send for OpenImage {}
// SAFETY: as above.
unsafe impl Sync for OpenImage {}

impl OpenImage {
    /// The image handle; `ENXIO` once closed.
    fn get(&self) -> std::result::Result<Image, i32> {
        let p = self.image.load(Ordering::Acquire);
        if p.is_null() {
            Err(-libc::ENXIO)
        } else {
            Ok(p)
        }
    }

    /// Closes the image (flushing it first, as librbd does), which also releases its
    /// exclusive lock and watch at once: the next client to open it does not wait
    /// for a dead owner's watch to time out. Only with no request in flight.
    fn close(&self) -> i32 {
        let p = self.image.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if p.is_null() {
            return 0;
        }
        // SAFETY: the handle was opened by `RbdDriver::open`; the swap above makes
        // this the only close, and no request uses it any more.
        unsafe { (self.conn.lib.rbd_close)(p) }
    }
}

impl Drop for OpenImage {
    fn drop(&mut self) {
        self.close();
    }
}

pub struct RbdDriver {
    img: OpenImage,
    loc: RbdLocation,
    size: AtomicU64,
    object_size: u64,
    read_only: bool,
}

impl RbdDriver {
    pub fn open(
        loc: &RbdLocation,
        common: &CommonOptions,
        secrets: &crate::secret::Secrets,
    ) -> Result<Self> {
        let read_only = common.read_only || loc.snapshot.is_some();
        let conn = connect(loc, !common.cache_direct, secrets)?;
        let lib = conn.lib;
        let name = cstr("image", &loc.image)?;
        let snap = loc
            .snapshot
            .as_deref()
            .map(|s| cstr("snapshot", s))
            .transpose()?;
        let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut image: Image = std::ptr::null_mut();
        // SAFETY: live ioctx, NUL-terminated names (snapshot NULL: the head), and an
        // out-pointer to a local.
        let r = unsafe {
            if read_only {
                (lib.rbd_open_read_only)(conn.ioctx, name.as_ptr(), &mut image, snap_ptr)
            } else {
                (lib.rbd_open)(conn.ioctx, name.as_ptr(), &mut image, snap_ptr)
            }
        };
        if r < 0 {
            return Err(BlockError::Graph(format!(
                "error reading header from {}: {}",
                loc.image,
                strerror(-r)
            )));
        }
        let img = OpenImage {
            image: AtomicPtr::new(image),
            conn,
        };
        // As QEMU: checked once the snapshot opened.
        if loc.snapshot.is_some() && !common.read_only && !common.auto_read_only {
            return Err(BlockError::Graph("rbd snapshots are read-only".into()));
        }
        // SAFETY: an all-zero rbd_image_info_t is a valid value (integers and arrays).
        let mut info: ffi::ImageInfo = unsafe { std::mem::zeroed() };
        // SAFETY: open image, and a buffer of the size passed.
        let r = unsafe { (lib.rbd_stat)(image, &mut info, std::mem::size_of::<ffi::ImageInfo>()) };
        if r < 0 {
            return Err(BlockError::Graph(format!(
                "error getting image info from {}: {}",
                loc.image,
                strerror(-r)
            )));
        }
        Ok(RbdDriver {
            img,
            loc: loc.clone(),
            size: AtomicU64::new(info.size),
            object_size: info.obj_size,
            read_only,
        })
    }

    fn lib(&self) -> &'static ffi::Lib {
        self.img.conn.lib
    }

    /// Starts one asynchronous request (`start` gets the completion to pass to librbd
    /// and the segments of `iov`, where they stay) and waits for it without blocking
    /// the thread. `iov` is kept until librbd has completed the request. Returns
    /// librbd's result (bytes read for reads).
    fn aio(
        &self,
        op: &'static str,
        iov: Option<IoVec>,
        start: impl FnOnce(Completion, &[libc::iovec]) -> c_int,
    ) -> impl std::future::Future<Output = Result<i64>> + '_ {
        let lib = self.lib();
        let state = Arc::new(Pending {
            lib,
            slot: Mutex::new(Slot::default()),
            _iov: iov,
        });
        let mut c: Completion = std::ptr::null_mut();
        let arg = Arc::into_raw(state.clone()) as *mut c_void;
        // SAFETY: `arg` is a strong reference the callback takes back exactly once;
        // `c` is an out-pointer to a local.
        let r = unsafe { (lib.rbd_aio_create_completion)(arg, on_complete, &mut c) };
        let started = if r < 0 {
            // SAFETY: the callback will never run: take the reference back.
            drop(unsafe { Arc::from_raw(arg as *const Pending) });
            Err(r)
        } else {
            // The segments as they lie in the request's state (an IoVec keeps one
            // segment inline: a pointer taken before the move would dangle).
            let segs = state._iov.as_ref().map_or(&[][..], |v| v.segments());
            let r = start(c, segs);
            if r < 0 {
                // SAFETY: librbd refused the request, so the completion never fires:
                // release it and take the reference back.
                unsafe {
                    (lib.rbd_aio_release)(c);
                    drop(Arc::from_raw(arg as *const Pending));
                }
                Err(r)
            } else {
                Ok(())
            }
        };
        async move {
            if let Err(r) = started {
                return Err(errno(op, r as i64));
            }
            let ret = std::future::poll_fn(|cx| {
                let mut s = state.slot.lock().unwrap_or_else(|p| p.into_inner());
                match s.result {
                    Some(r) => Poll::Ready(r),
                    None => {
                        s.waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            })
            .await;
            if ret < 0 {
                Err(errno(op, ret))
            } else {
                Ok(ret)
            }
        }
    }
}

fn errno(op: &'static str, r: i64) -> BlockError {
    BlockError::io(op, io::Error::from_raw_os_error((-r) as i32))
}

#[derive(Default)]
struct Slot {
    result: Option<i64>,
    waker: Option<Waker>,
}

/// What one request's completion callback reaches.
struct Pending {
    lib: &'static ffi::Lib,
    slot: Mutex<Slot>,
    /// The request's buffers, held until librbd completes.
    _iov: Option<IoVec>,
}

// SAFETY: librbd's thread only drops the I/O vector, never reads through its segment
// pointers; its keepalive is `Send + Sync`, and the rest is plain data or a Mutex.
unsafe impl Send for Pending {}
// SAFETY: as above; shared access goes through the Mutex.
unsafe impl Sync for Pending {}

/// librbd's completion callback, on one of librbd's threads.
extern "C" fn on_complete(c: Completion, arg: *mut c_void) {
    // SAFETY: `arg` is the reference `RbdDriver::aio` leaked for this completion,
    // which fires once.
    let state = unsafe { Arc::from_raw(arg as *const Pending) };
    // SAFETY: `c` is this callback's completion; it is released once, here.
    let ret = unsafe {
        let r = (state.lib.rbd_aio_get_return_value)(c);
        (state.lib.rbd_aio_release)(c);
        r
    };
    let waker = {
        let mut s = state.slot.lock().unwrap_or_else(|p| p.into_inner());
        s.result = Some(ret as i64);
        s.waker.take()
    };
    // The executor queues the wake for the owning iothread and rings its eventfd.
    if let Some(w) = waker {
        w.wake();
    }
}

impl Driver for RbdDriver {
    fn driver_name(&self) -> &'static str {
        "rbd"
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn filename(&self) -> String {
        let mut m = serde_json::Map::new();
        m.insert("driver".into(), "rbd".into());
        self.loc.write_json(&mut m);
        format!("json:{}", serde_json::Value::Object(m))
    }

    fn image_info(&self) -> DriverImageInfo {
        DriverImageInfo {
            cluster_size: Some(self.object_size),
            format_specific: Some(ImageInfoSpecific::Rbd(RbdInfo {})),
            ..Default::default()
        }
    }

    /// Closes the image at exit (or when a reopen replaces the node): its exclusive
    /// lock is released at once instead of lingering until the watch times out. Later
    /// flushes succeed (everything was written back); other requests fail with ENXIO.
    fn close(&self) -> Result<()> {
        let r = self.img.close();
        if r < 0 {
            return Err(errno("rbd close", r as i64));
        }
        Ok(())
    }

    /// Opens the image again after [`Driver::close`] (a reopen that failed puts the
    /// old node back).
    fn retake_locks(&self) -> Result<()> {
        if self.img.get().is_ok() {
            return Ok(());
        }
        let lib = self.lib();
        let name = cstr("image", &self.loc.image)?;
        let snap = self
            .loc
            .snapshot
            .as_deref()
            .map(|s| cstr("snapshot", s))
            .transpose()?;
        let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut image: Image = std::ptr::null_mut();
        // SAFETY: as in `open`.
        let r = unsafe {
            if self.read_only {
                (lib.rbd_open_read_only)(self.img.conn.ioctx, name.as_ptr(), &mut image, snap_ptr)
            } else {
                (lib.rbd_open)(self.img.conn.ioctx, name.as_ptr(), &mut image, snap_ptr)
            }
        };
        if r < 0 {
            return Err(BlockError::Graph(format!(
                "error reading header from {}: {}",
                self.loc.image,
                strerror(-r)
            )));
        }
        self.img.image.store(image, Ordering::Release);
        Ok(())
    }

    fn truncate(&self, size: u64) -> Result<()> {
        // SAFETY: open image; a synchronous call from the control thread (drained).
        let image = self.img.get().map_err(|r| errno("rbd resize", r as i64))?;
        // SAFETY: as above.
        let r = unsafe { (self.lib().rbd_resize)(image, size) };
        if r < 0 {
            return Err(BlockError::Graph(format!(
                "Failed to resize file: {}",
                strerror(-r)
            )));
        }
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    fn read<'a>(&'a self, offset: u64, iov: IoVec) -> LocalBoxFuture<'a, Result<()>> {
        let lib = self.lib();
        let image = match self.img.get() {
            Ok(i) => i,
            Err(r) => return Box::pin(std::future::ready(Err(errno("rbd", r as i64)))),
        };
        let len = iov.len();
        let keep = iov.clone();
        let fut = self.aio("rbd read", Some(iov), move |c, segs| {
            // SAFETY: the segments and the array of them stay valid (held by the
            // completion state) until librbd completes the request.
            unsafe { (lib.rbd_aio_readv)(image, segs.as_ptr(), segs.len() as c_int, offset, c) }
        });
        Box::pin(async move {
            let got = fut.await? as u64;
            // librbd reads short past the end of the image: zeroes, as QEMU pads.
            if got < len {
                keep.slice(got, len - got).fill_zero();
            }
            Ok(())
        })
    }

    fn write<'a>(&'a self, offset: u64, iov: IoVec, _fua: bool) -> LocalBoxFuture<'a, Result<()>> {
        let lib = self.lib();
        let image = match self.img.get() {
            Ok(i) => i,
            Err(r) => return Box::pin(std::future::ready(Err(errno("rbd", r as i64)))),
        };
        let fut = self.aio("rbd write", Some(iov), move |c, segs| {
            // SAFETY: as in `read`.
            unsafe { (lib.rbd_aio_writev)(image, segs.as_ptr(), segs.len() as c_int, offset, c) }
        });
        Box::pin(async move { fut.await.map(|_| ()) })
    }

    fn flush(&self) -> LocalBoxFuture<'_, Result<()>> {
        let lib = self.lib();
        // Closed: rbd_close wrote everything back.
        let Ok(image) = self.img.get() else {
            return Box::pin(std::future::ready(Ok(())));
        };
        // SAFETY: open image and a fresh completion.
        let fut = self.aio("rbd flush", None, move |c, _| unsafe {
            (lib.rbd_aio_flush)(image, c)
        });
        Box::pin(async move { fut.await.map(|_| ()) })
    }

    fn discard(&self, offset: u64, len: u64) -> LocalBoxFuture<'_, Result<()>> {
        let lib = self.lib();
        let image = match self.img.get() {
            Ok(i) => i,
            Err(r) => return Box::pin(std::future::ready(Err(errno("rbd", r as i64)))),
        };
        let fut = self.aio("rbd discard", None, move |c, _| {
            // SAFETY: open image and a fresh completion.
            unsafe { (lib.rbd_aio_discard)(image, offset, len, c) }
        });
        Box::pin(async move { fut.await.map(|_| ()) })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> LocalBoxFuture<'_, Result<()>> {
        let lib = self.lib();
        let image = match self.img.get() {
            Ok(i) => i,
            Err(r) => return Box::pin(std::future::ready(Err(errno("rbd", r as i64)))),
        };
        let flags = if may_unmap {
            0
        } else {
            ffi::WRITE_ZEROES_FLAG_THICK_PROVISION
        };
        let fut = self.aio("rbd write zeroes", None, move |c, _| {
            // SAFETY: open image and a fresh completion.
            unsafe { (lib.rbd_aio_write_zeroes)(image, offset, len as usize, c, flags, 0) }
        });
        Box::pin(async move { fut.await.map(|_| ()) })
    }
}

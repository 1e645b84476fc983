//! The few librados/librbd functions the `rbd` driver calls, loaded at run time with
//! dlopen (as QEMU loads its rbd block module): vubd builds and runs on hosts without
//! Ceph's libraries, and only opening an `rbd` node needs them. `librbd.so.1` links
//! `librados.so.2`, so one handle resolves both libraries' symbols.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

pub type Rados = *mut c_void;
pub type IoCtx = *mut c_void;
pub type Image = *mut c_void;
pub type Completion = *mut c_void;
pub type Callback = extern "C" fn(c: Completion, arg: *mut c_void);

/// librbd's `rbd_image_info_t`.
#[repr(C)]
pub struct ImageInfo {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}

/// The resolved entry points (signatures as librbd.h and librados.h declare them).
pub struct Lib {
    pub rados_create: unsafe extern "C" fn(*mut Rados, *const c_char) -> c_int,
    pub rados_conf_read_file: unsafe extern "C" fn(Rados, *const c_char) -> c_int,
    pub rados_conf_set: unsafe extern "C" fn(Rados, *const c_char, *const c_char) -> c_int,
    pub rados_connect: unsafe extern "C" fn(Rados) -> c_int,
    pub rados_shutdown: unsafe extern "C" fn(Rados),
    pub rados_ioctx_create: unsafe extern "C" fn(Rados, *const c_char, *mut IoCtx) -> c_int,
    pub rados_ioctx_destroy: unsafe extern "C" fn(IoCtx),
    pub rados_ioctx_set_namespace: unsafe extern "C" fn(IoCtx, *const c_char),
    pub rbd_namespace_exists: unsafe extern "C" fn(IoCtx, *const c_char, *mut bool) -> c_int,
    pub rbd_create: unsafe extern "C" fn(IoCtx, *const c_char, u64, *mut c_int) -> c_int,
    pub rbd_open: unsafe extern "C" fn(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int,
    pub rbd_open_read_only:
        unsafe extern "C" fn(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int,
    pub rbd_close: unsafe extern "C" fn(Image) -> c_int,
    pub rbd_get_size: unsafe extern "C" fn(Image, *mut u64) -> c_int,
    pub rbd_stat: unsafe extern "C" fn(Image, *mut ImageInfo, usize) -> c_int,
    pub rbd_resize: unsafe extern "C" fn(Image, u64) -> c_int,
    pub rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, Callback, *mut Completion) -> c_int,
    pub rbd_aio_get_return_value: unsafe extern "C" fn(Completion) -> isize,
    pub rbd_aio_release: unsafe extern "C" fn(Completion),
    pub rbd_aio_readv:
        unsafe extern "C" fn(Image, *const libc::iovec, c_int, u64, Completion) -> c_int,
    pub rbd_aio_writev:
        unsafe extern "C" fn(Image, *const libc::iovec, c_int, u64, Completion) -> c_int,
    pub rbd_aio_flush: unsafe extern "C" fn(Image, Completion) -> c_int,
    pub rbd_aio_discard: unsafe extern "C" fn(Image, u64, u64, Completion) -> c_int,
    pub rbd_aio_write_zeroes:
        unsafe extern "C" fn(Image, u64, usize, Completion, c_int, c_int) -> c_int,
}

/// librbd's `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`: zeroes are written, not unmapped.
pub const WRITE_ZEROES_FLAG_THICK_PROVISION: c_int = 1;

const LIBRARY: &CStr = c"librbd.so.1";

/// The loaded library, or why it could not be loaded (the first caller loads it).
pub fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl*
    // call on this thread; it is copied at once.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

// The target type of each transmute is the field it initialises.
#[allow(clippy::missing_transmute_annotations)]
fn load() -> Result<Lib, String> {
    // SAFETY: dlopen of a NUL-terminated name; the handle is never closed, so the
    // symbols resolved below stay valid for the life of the process.
    let handle = unsafe { libc::dlopen(LIBRARY.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(format!(
            "Could not load librbd ({}); install Ceph's librbd1 to use the rbd driver",
            dlerror()
        ));
    }
    macro_rules! sym {
        ($name:ident) => {{
            let name = concat!(stringify!($name), "\0");
            // SAFETY: dlsym on the open handle with a NUL-terminated name.
            let p = unsafe { libc::dlsym(handle, name.as_ptr().cast()) };
            if p.is_null() {
                return Err(format!("librbd lacks {}: {}", stringify!($name), dlerror()));
            }
            // SAFETY: the symbol is the C function of that name, whose signature the
            // field's type spells as librbd.h/librados.h declare it.
            unsafe { std::mem::transmute::<*mut c_void, _>(p) }
        }};
    }
    Ok(Lib {
        rados_create: sym!(rados_create),
        rados_conf_read_file: sym!(rados_conf_read_file),
        rados_conf_set: sym!(rados_conf_set),
        rados_connect: sym!(rados_connect),
        rados_shutdown: sym!(rados_shutdown),
        rados_ioctx_create: sym!(rados_ioctx_create),
        rados_ioctx_destroy: sym!(rados_ioctx_destroy),
        rados_ioctx_set_namespace: sym!(rados_ioctx_set_namespace),
        rbd_namespace_exists: sym!(rbd_namespace_exists),
        rbd_create: sym!(rbd_create),
        rbd_open: sym!(rbd_open),
        rbd_open_read_only: sym!(rbd_open_read_only),
        rbd_close: sym!(rbd_close),
        rbd_get_size: sym!(rbd_get_size),
        rbd_stat: sym!(rbd_stat),
        rbd_resize: sym!(rbd_resize),
        rbd_aio_create_completion: sym!(rbd_aio_create_completion),
        rbd_aio_get_return_value: sym!(rbd_aio_get_return_value),
        rbd_aio_release: sym!(rbd_aio_release),
        rbd_aio_readv: sym!(rbd_aio_readv),
        rbd_aio_writev: sym!(rbd_aio_writev),
        rbd_aio_flush: sym!(rbd_aio_flush),
        rbd_aio_discard: sym!(rbd_aio_discard),
        rbd_aio_write_zeroes: sym!(rbd_aio_write_zeroes),
    })
}

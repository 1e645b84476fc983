//! The daemon's memory allocator: mimalloc, called the way the C library's allocator is
//! called by Rust's own `System` (plain `mi_malloc` for the alignments malloc already
//! guarantees, the aligned entry points only beyond them).
//!
//! Why not glibc's malloc: every request allocates its task (about 2 KiB: the request's
//! future, with the block layer's nested ones inside) and its I/O vector, and frees them
//! on a later pass of its iothread. Task-sized blocks are past glibc's per-thread cache
//! (1032 bytes), so each took its locked bins: in callgrind, a fifth of the iothread's
//! instructions per request on null-co. mimalloc serves them from per-thread free
//! lists. Why not the `mimalloc` crate's allocator: it sends every allocation through
//! `mi_malloc_aligned`, whose path for blocks over 1 KiB over-allocates and re-aligns
//! even for an alignment of 8. docs/performance.md ("Allocation") has the figures.

use libmimalloc_sys as mi;
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

/// The alignment every `mi_malloc` block has (as glibc's malloc on x86-64 and
/// aarch64): 16 bytes.
const MIN_ALIGN: usize = 16;

/// Whether plain malloc-style calls give `layout` its alignment.
fn plain(layout: &Layout) -> bool {
    layout.align() <= MIN_ALIGN && layout.align() <= layout.size()
}

/// The global allocator of the `vubd` binary.
pub struct Allocator;

// SAFETY: the calls below are mimalloc's malloc-family functions, which return null or
// a block of at least the requested size and alignment (plain calls only when
// `plain(layout)`, i.e. their guaranteed alignment suffices), free any block from any
// of them (`mi_free`), and keep a block's contents on reallocation as realloc does.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation functions accept any size and power-of-two
        // alignment (Layout guarantees both).
        unsafe {
            if plain(&layout) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if plain(&layout) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the caller passes a block this allocator returned (GlobalAlloc's
        // contract); mi_free takes any mimalloc block, aligned or not.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = Layout::from_size_align(new_size, layout.align());
        // SAFETY: `ptr` is a block of this allocator with `layout` (GlobalAlloc's
        // contract); the aligned variant keeps an alignment plain calls do not give.
        unsafe {
            match new {
                Ok(l) if plain(&l) => mi::mi_realloc(ptr.cast(), new_size).cast(),
                _ => mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_have_their_alignment_and_keep_their_contents() {
        let a = Allocator;
        for (size, align) in [(1, 1), (8, 8), (24, 16), (2200, 8), (100, 64), (5000, 4096)] {
            let l = Layout::from_size_align(size, align).unwrap();
            // SAFETY: a valid non-zero layout; the block is written within its size,
            // reallocated and freed once with the layout it has.
            unsafe {
                let p = a.alloc(l);
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "{size}/{align}");
                std::ptr::write_bytes(p, 0xa5, size);
                let q = a.realloc(p, l, size * 3);
                assert_eq!(q as usize % align, 0, "{size}/{align} after realloc");
                assert!(std::slice::from_raw_parts(q, size)
                    .iter()
                    .all(|&b| b == 0xa5));
                a.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
                let z = a.alloc_zeroed(l);
                assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                a.dealloc(z, l);
            }
        }
    }
}

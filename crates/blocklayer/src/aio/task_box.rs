//! Heap blocks of tasks, recycled on their thread.
//!
//! Every request is a task whose future (a couple of KiB for a vhost-user-blk request)
//! lives in a heap block from spawn to completion. With a queue depth of in-flight
//! requests per thread, mimalloc keeps emptying and retiring the pages of that size
//! class: callgrind counted its slow path (`_mi_malloc_generic`, a page search, page
//! retirement and a one-block extension) on every request of the 8-export benchmark,
//! about 400 instructions each, an eighth of the request path. A thread therefore keeps
//! the blocks of its finished tasks and hands them to the next task of the same layout:
//! a pop and a push, and a block that is still in the cache.

use std::alloc::Layout;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// Blocks smaller than this come from the allocator's fast path every time.
const MIN_POOLED: usize = 512;
/// Layouts a thread keeps blocks for (its request tasks and a few more).
const MAX_LAYOUTS: usize = 8;
/// Blocks kept per layout: more than a queue's depth of requests, bounded so that a
/// burst does not hold memory for good (about 0.5 MiB for 2 KiB tasks).
const MAX_BLOCKS: usize = 256;

/// A thread's free blocks, by layout.
#[derive(Default)]
struct Pool {
    classes: Vec<(Layout, Vec<NonNull<u8>>)>,
}

/// No pool class: the block goes back to the allocator.
const NO_CLASS: u8 = u8::MAX;

impl Pool {
    /// The class index of `layout`, made if there is room; [`NO_CLASS`] if the layout
    /// is not pooled.
    #[inline]
    fn class_of(&mut self, layout: Layout) -> u8 {
        if layout.size() < MIN_POOLED {
            return NO_CLASS;
        }
        // A thread has a few classes, its request tasks' first: a plain loop.
        let mut found = None;
        for (i, (l, _)) in self.classes.iter().enumerate() {
            if *l == layout {
                found = Some(i);
                break;
            }
        }
        match found {
            Some(i) => i as u8,
            None if self.classes.len() < MAX_LAYOUTS => {
                self.classes.push((layout, Vec::with_capacity(MAX_BLOCKS)));
                (self.classes.len() - 1) as u8
            }
            None => NO_CLASS,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (layout, blocks) in self.classes.drain(..) {
            for b in blocks {
                // SAFETY: pooled blocks came from the global allocator with `layout`
                // (non-zero size) and are owned by the pool alone.
                unsafe { std::alloc::dealloc(b.as_ptr(), layout) };
            }
        }
    }
}

thread_local! {
    // Const-initialised: no first-use check on every access.
    static POOL: RefCell<Pool> = const { RefCell::new(Pool { classes: Vec::new() }) };
}

/// A block for `layout`, a pooled one if there is, and its class.
#[inline(always)]
fn take(layout: Layout) -> (NonNull<u8>, u8) {
    if layout.size() == 0 {
        // A dangling, aligned pointer is a valid zero-sized allocation.
        let p = NonNull::new(std::ptr::without_provenance_mut(layout.align()));
        return (p.expect("alignments are non-zero"), NO_CLASS);
    }
    let (pooled, class) = POOL
        .try_with(|p| {
            let mut p = p.borrow_mut();
            let class = p.class_of(layout);
            let block = match class {
                NO_CLASS => None,
                c => p.classes[c as usize].1.pop(),
            };
            (block, class)
        })
        .unwrap_or((None, NO_CLASS));
    let block = pooled.unwrap_or_else(|| {
        // SAFETY: `layout` has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
    });
    (block, class)
}

/// Returns `block` (from the global allocator with `layout`, no longer used) to this
/// thread's pool class `class`, or to the allocator when there is none or it is full.
#[inline(always)]
fn give_back(block: NonNull<u8>, layout: Layout, class: u8) {
    if layout.size() == 0 {
        return;
    }
    let kept = class != NO_CLASS
        && POOL
            .try_with(|p| {
                let mut p = p.borrow_mut();
                match p.classes.get_mut(class as usize) {
                    Some((l, blocks)) if *l == layout && blocks.len() < MAX_BLOCKS => {
                        blocks.push(block);
                        true
                    }
                    _ => false,
                }
            })
            .unwrap_or(false);
    if !kept {
        // SAFETY: the caller hands over a block of the global allocator with `layout`.
        unsafe { std::alloc::dealloc(block.as_ptr(), layout) };
    }
}

/// A task's future in its own heap block (a pooled one when built by [`TaskBox::new`]),
/// owned like a `Box` and never moved: it is polled in place.
pub struct TaskBox {
    future: NonNull<dyn Future<Output = ()>>,
    layout: Layout,
    /// The pool class the block returns to (looked up once, when it was taken).
    class: u8,
}

impl TaskBox {
    /// Builds the future `make` returns straight into a block of this thread's pool:
    /// only the fields `make` sets are written, no copy of the whole future.
    #[inline(always)]
    pub fn new<F: Future<Output = ()> + 'static>(make: impl FnOnce() -> F) -> TaskBox {
        let layout = Layout::new::<F>();
        let (block, class) = take(layout);
        let block = block.cast::<F>();
        // SAFETY: `block` is valid for writes of an `F` (its layout) and unaliased.
        unsafe { block.as_ptr().write(make()) };
        TaskBox {
            future: block,
            layout,
            class,
        }
    }

    /// Takes over a boxed future; its block joins the pool when the task ends.
    pub fn from_box(task: Pin<Box<dyn Future<Output = ()>>>) -> TaskBox {
        let layout = Layout::for_value(&*task);
        let class = POOL
            .try_with(|p| p.borrow_mut().class_of(layout))
            .unwrap_or(NO_CLASS);
        // SAFETY: the future is only ever used pinned, in place, by `poll` and `drop`.
        let raw = Box::into_raw(unsafe { Pin::into_inner_unchecked(task) });
        TaskBox {
            // SAFETY: `Box::into_raw` never returns null.
            future: unsafe { NonNull::new_unchecked(raw) },
            layout,
            class,
        }
    }

    /// Polls the future in place.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: the future lives in its block until `drop` and is never moved out of
        // it, so pinning it is sound; `&mut self` makes this access exclusive.
        unsafe { Pin::new_unchecked(self.future.as_mut()) }.poll(cx)
    }
}

impl Drop for TaskBox {
    fn drop(&mut self) {
        // SAFETY: the future is initialised and owned by this box; it is dropped once,
        // in place, and its block then handed back with the layout it was made with.
        unsafe { std::ptr::drop_in_place(self.future.as_ptr()) };
        give_back(self.future.cast::<u8>(), self.layout, self.class);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::task::Waker;

    struct Counted {
        drops: Rc<Cell<u32>>,
        _payload: [u8; 2048],
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.drops.set(self.drops.get() + 1);
        }
    }

    /// A finished task's block is reused by the next task of the same layout, its
    /// future is dropped exactly once, and the pool stays within its bound.
    #[test]
    fn blocks_are_recycled_and_futures_dropped_once() {
        let drops = Rc::new(Cell::new(0));
        let make = |d: Rc<Cell<u32>>| {
            TaskBox::new(move || {
                let c = Counted {
                    drops: d,
                    _payload: [7; 2048],
                };
                async move {
                    let _c = c;
                }
            })
        };
        let mut cx = Context::from_waker(Waker::noop());
        let mut a = make(drops.clone());
        let first = a.future.cast::<u8>();
        assert_eq!(a.poll(&mut cx), Poll::Ready(()));
        assert_eq!(
            drops.get(),
            1,
            "the future's state is dropped when it completes"
        );
        drop(a);
        assert_eq!(drops.get(), 1, "a completed future is not dropped again");
        let b = make(drops.clone());
        assert_eq!(b.future.cast::<u8>(), first, "the block is reused");
        drop(b);
        assert_eq!(drops.get(), 2, "an unpolled future is dropped with its box");
        let many: Vec<TaskBox> = (0..MAX_BLOCKS + 10).map(|_| make(drops.clone())).collect();
        drop(many);
        let kept = POOL.with(|p| {
            let p = p.borrow();
            p.classes.iter().map(|(_, b)| b.len()).max().unwrap_or(0)
        });
        assert_eq!(
            kept, MAX_BLOCKS,
            "the pool keeps at most MAX_BLOCKS per layout"
        );
        assert_eq!(drops.get(), 2 + MAX_BLOCKS as u32 + 10);
    }

    /// Boxed futures and small or zero-sized ones go through the same path.
    #[test]
    fn boxed_and_small_futures() {
        let ran = Rc::new(Cell::new(false));
        let r = ran.clone();
        let mut cx = Context::from_waker(Waker::noop());
        let mut t = TaskBox::from_box(Box::pin(async move { r.set(true) }));
        assert_eq!(t.poll(&mut cx), Poll::Ready(()));
        assert!(ran.get());
        let mut z = TaskBox::new(|| std::future::ready(()));
        assert_eq!(z.poll(&mut cx), Poll::Ready(()));
    }
}

//! A global allocator wrapper that keeps, per thread, the bytes allocated minus the bytes
//! freed, so a transform call can be stopped once it has built more than its memory limit.
//!
//! Rhai measures a value only when it is assigned or returned, so a native function that
//! collects callback results (`array.map`) can build a whole array of large strings before
//! anything looks at it. The allocator sees every byte as it is taken; the sandbox's progress
//! hook compares the thread's count with the call's budget between operations, callbacks
//! included. Counting is a thread-local add per allocation (no locks, no atomics).

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;

thread_local! {
    /// Bytes allocated minus bytes freed on this thread since it started (wrapping: memory
    /// freed here that another thread allocated can take it below zero).
    static LIVE: Cell<i64> = const { Cell::new(0) };
}

/// Counts the live bytes of each thread, then delegates to `A`.
pub struct Metered<A>(pub A);

/// Bytes allocated minus bytes freed on the calling thread: only differences between two
/// readings on the same thread mean something.
pub fn live_bytes() -> i64 {
    LIVE.with(Cell::get)
}

fn add(bytes: usize) {
    // `try_with`: during thread teardown the slot may be gone; such bytes are not counted.
    let _ = LIVE.try_with(|live| live.set(live.get().wrapping_add(bytes as i64)));
}

fn sub(bytes: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().wrapping_sub(bytes as i64)));
}

// SAFETY: every method delegates to `A` with the caller's arguments unchanged; the counting
// around it neither allocates nor touches the memory.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Metered<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, passed on as is.
        let ptr = unsafe { self.0.alloc(layout) };
        if !ptr.is_null() {
            add(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { self.0.alloc_zeroed(layout) };
        if !ptr.is_null() {
            add(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds `dealloc`'s contract, passed on as is.
        unsafe { self.0.dealloc(ptr, layout) };
        sub(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `realloc`'s contract, passed on as is.
        let new = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            sub(layout.size());
            add(new_size);
        }
        new
    }
}

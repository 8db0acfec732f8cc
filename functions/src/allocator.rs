//! The allocator of every function runtime: the C library's, as QuickJS's own default,
//! metered against the runtime's memory limit.
//!
//! QuickJS's own limit only makes an allocation fail, and the engine then reports it as
//! an error it may have no memory left to build: it throws `null`, indistinguishable
//! from a function's `throw null`. The meter refuses the allocation itself and says so,
//! which is how an execution is known to have run out of memory.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use rquickjs::allocator::Allocator;

/// What one runtime holds, its limit, and whether an allocation was refused.
#[derive(Default)]
pub(crate) struct Meter {
    used: AtomicUsize,
    /// In bytes; 0 for none (while the prelude is set up).
    limit: AtomicUsize,
    refused: AtomicBool,
}

impl Meter {
    pub(crate) fn set_limit(&self, bytes: usize) {
        self.limit.store(bytes, Ordering::Relaxed);
    }

    /// Forgets an earlier refusal, before an execution.
    pub(crate) fn reset(&self) {
        self.refused.store(false, Ordering::Relaxed);
    }

    /// Whether an allocation was refused since the last [`Meter::reset`].
    pub(crate) fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    fn admit(&self, more: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit != 0 && self.used.load(Ordering::Relaxed).saturating_add(more) > limit {
            self.refused.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    // Only the runtime's own thread allocates: a load and a store, no locked instruction,
    // on a path QuickJS takes for every object.
    fn grew(&self, bytes: usize) {
        let used = self.used.load(Ordering::Relaxed);
        self.used.store(used + bytes, Ordering::Relaxed);
    }

    /// Counts a block just allocated (none when null).
    unsafe fn counted(&self, block: *mut u8) -> *mut u8 {
        if !block.is_null() {
            // SAFETY: a live block of the C library's allocator.
            self.grew(unsafe { libc::malloc_usable_size(block.cast()) });
        }
        block
    }

    fn shrank(&self, bytes: usize) {
        let used = self.used.load(Ordering::Relaxed);
        self.used.store(used.saturating_sub(bytes), Ordering::Relaxed);
    }
}

/// A runtime's allocator; the runtime owns it, the sandbox keeps the meter.
pub(crate) struct Metered(pub Arc<Meter>);

// SAFETY: every block comes from the C library's allocator, and is sized by it.
unsafe impl Allocator for Metered {
    fn alloc(&mut self, size: usize) -> *mut u8 {
        if !self.0.admit(size) {
            return std::ptr::null_mut();
        }
        // SAFETY: malloc has no precondition; a null answer is passed on.
        unsafe { self.0.counted(libc::malloc(size).cast()) }
    }

    fn calloc(&mut self, count: usize, size: usize) -> *mut u8 {
        let Some(total) = count.checked_mul(size) else {
            return std::ptr::null_mut();
        };
        if !self.0.admit(total) {
            return std::ptr::null_mut();
        }
        // SAFETY: as malloc.
        unsafe { self.0.counted(libc::calloc(count, size).cast()) }
    }

    unsafe fn dealloc(&mut self, block: *mut u8) {
        // SAFETY: QuickJS frees only blocks this allocator gave it.
        unsafe {
            self.0.shrank(Self::usable_size(block));
            libc::free(block.cast());
        }
    }

    unsafe fn realloc(&mut self, block: *mut u8, new_size: usize) -> *mut u8 {
        if block.is_null() {
            return self.alloc(new_size);
        }
        // SAFETY: a live block of this allocator.
        let old = unsafe { Self::usable_size(block) };
        if new_size > old && !self.0.admit(new_size - old) {
            // The old block stays valid, as realloc's contract says.
            return std::ptr::null_mut();
        }
        // SAFETY: as above; on failure realloc leaves the old block as it was.
        let moved: *mut u8 = unsafe { libc::realloc(block.cast(), new_size).cast() };
        if !moved.is_null() {
            self.0.shrank(old);
            // SAFETY: a live block.
            self.0.grew(unsafe { Self::usable_size(moved) });
        }
        moved
    }

    unsafe fn usable_size(block: *mut u8) -> usize {
        // SAFETY: a live block of the C library's allocator.
        unsafe { libc::malloc_usable_size(block.cast()) }
    }
}

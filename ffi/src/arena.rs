//! Heap buffers lent out as `'static` slices.
//!
//! The core's streaming aggregators and parsed uploads borrow caller buffers
//! (`StreamingFedCdd<'w, 'g>`, `Upload<'a>`). A C handle has to own both the buffer and the
//! borrower, which safe Rust cannot express, so the buffer is moved to the heap, lent out as
//! `&'static`, and freed when its [`Arena`] drops. Every owner keeps the borrowers in fields
//! declared *before* the arenas, so they are dropped first, and never hands them out.

/// Owns a boxed slice that was lent out as `'static` by [`Arena::lend`].
pub(crate) struct Arena<T> {
    raw: *mut [T],
}

impl<T> Arena<T> {
    /// Moves `v` to the heap and lends it out for `'static`.
    ///
    /// # Safety
    /// The returned slice (and everything borrowing from it) must not be used after the
    /// `Arena` is dropped.
    pub unsafe fn lend(v: Vec<T>) -> (Arena<T>, &'static mut [T]) {
        let raw = Box::into_raw(v.into_boxed_slice());
        // SAFETY: `raw` comes from a live Box; the slice is derived from it, so `raw` stays
        // valid for the `Box::from_raw` in `drop`; the lifetime is the caller's contract.
        let lent = unsafe { &mut *raw };
        (Arena { raw }, lent)
    }
}

impl<T> Drop for Arena<T> {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `Box::into_raw` and is freed exactly once, here; the
        // borrowers were dropped before (the owners' field order).
        drop(unsafe { Box::from_raw(self.raw) });
    }
}

//! Scratch buffers that outlive the op that used them: a few per calling thread are kept
//! for the next call, so large temporaries (attention's padded copies) are not handed back
//! to the OS and faulted in again on every call.
//!
//! Memory: each thread keeps at most [`KEEP`] buffers, the largest it has used; for
//! attention that is about 2x its activations (padded K and V, the output or dQ/dK/dV
//! before their final layout) on the calling thread plus one task's padded inputs per
//! worker. The ops run on the backend's own pool, so dropping the backend frees them.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Buffers kept per thread between calls (the largest ones).
const KEEP: usize = 16;

thread_local! {
    static FREE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A zeroed f32 buffer that returns to its thread's free list when dropped.
pub(crate) struct Scratch(Vec<f32>);

impl Scratch {
    /// `n` zeros, in the smallest kept buffer that holds them (or a new one).
    pub(crate) fn zeroed(n: usize) -> Self {
        let mut buf = Self::take(n);
        buf.clear();
        buf.resize(n, 0.0);
        Scratch(buf)
    }

    /// `n` floats with whatever values a reused buffer held (zeros where it was shorter),
    /// for callers that overwrite every element they read.
    pub(crate) fn reused(n: usize) -> Self {
        let mut buf = Self::take(n);
        buf.truncate(n);
        buf.resize(n, 0.0);
        Scratch(buf)
    }

    fn take(n: usize) -> Vec<f32> {
        let reused = FREE.with(|free| {
            let mut free = free.borrow_mut();
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= n)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        });
        reused.unwrap_or_default()
    }
}

impl Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        if buf.capacity() == 0 {
            return;
        }
        // `try_with`: during thread teardown the list may be gone; then the buffer is freed.
        let _ = FREE.try_with(|free| {
            let mut free = free.borrow_mut();
            free.push(buf);
            if free.len() > KEEP {
                let smallest = free
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, b)| b.capacity())
                    .map(|(i, _)| i)
                    .unwrap_or(0);
                free.swap_remove(smallest);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_zeroed_and_are_reused() {
        let ptr = {
            let mut a = Scratch::zeroed(1000);
            a.fill(7.0);
            a.as_ptr()
        };
        let b = Scratch::zeroed(500);
        assert_eq!(b.len(), 500);
        assert!(b.iter().all(|&x| x == 0.0));
        assert_eq!(b.as_ptr(), ptr);
        let c = Scratch::zeroed(2000);
        assert_eq!(c.len(), 2000);
        assert!(c.iter().all(|&x| x == 0.0));
        drop(c);
        let d = Scratch::reused(1500);
        assert_eq!(d.len(), 1500);
    }
}

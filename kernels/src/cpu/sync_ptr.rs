//! A raw pointer to one output buffer that parallel tasks share, each writing only its own
//! disjoint part (rows of a matrix, tiles of C) while the `&mut` it came from is borrowed.

#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: tasks only dereference it on disjoint ranges, while the buffer it points into is
// mutably borrowed by the call that made it (see each use).
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// `len` values from offset `off`.
    ///
    /// # Safety
    /// They exist and no other live reference touches them.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn at<'a>(&self, off: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(off), len) }
    }

    /// Rows `i0..i0+rows` of a row-major matrix with row stride `ld`.
    ///
    /// # Safety
    /// The rows exist and no other live reference touches them.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn rows<'a>(&self, i0: usize, rows: usize, ld: usize) -> &'a mut [f32] {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(i0 * ld), rows * ld) }
    }
}

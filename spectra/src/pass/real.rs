//! The arithmetic type of a pass ([`Real`]): what the kernels of each code path compute for it. The
//! implementations for float32 and float64, which pick the kernels, are in the parent module.

use super::layout::{Flavour, Prefetch, LANES, R};

/// The arithmetic type of a pass: float32 for f32/bf16/f16 matrices, float64 for f64 ones.
pub(crate) trait Real: Copy + Default + Send + Sync + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self> + 'static {
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    /// The rows' products with the packed block `q`, each folded into float64. Meanwhile `next` (the
    /// next group's rows, `n` elements of `next_size` bytes each) is prefetched into L2, so that reading
    /// memory overlaps the arithmetic instead of stalling the next group.
    ///
    /// # Safety
    /// Each `rows[i]` points at `n` readable values; `q` at `flavour.packed_len(n)`; `next[i]` at
    /// `n · next_size` bytes (prefetches of them never fault, but must stay inside the allocation).
    /// Columns from `live` on are zero in `q` (and come out zero); a path may skip them.
    unsafe fn dot(flavour: Flavour, rows: &[*const Self; R], n: usize, q: *const Self, live: usize, next: &Prefetch) -> [[f64; LANES]; R];
    /// `w[j] += Σ_i rows[i][j] · b[i]` over the packed block `w`; columns from `live` on are zero in
    /// `b` and may be left alone.
    ///
    /// # Safety
    /// As for [`Real::dot`], with `w` writable.
    unsafe fn axpy(flavour: Flavour, rows: &[*const Self; R], n: usize, b: &[[Self; LANES]; R], live: usize, w: *mut Self);
    /// [`Real::dot`], and `Σ x²` of each row (each square and the sum in float64) added to `squares`:
    /// the first pass's norm read from the same loads as the products, so that the read of W from memory
    /// overlaps the arithmetic (as a loop of its own before the products, it did not: one core waited a
    /// whole read of W for it). The default is the two one after the other.
    ///
    /// # Safety
    /// As for [`Real::dot`].
    unsafe fn dot_squares(flavour: Flavour, rows: &[*const Self; R], n: usize, q: *const Self, live: usize, next: &Prefetch, squares: &mut [f64; R]) -> [[f64; LANES]; R] {
        for (s, row) in squares.iter_mut().zip(rows) {
            *s += Self::sum_squares(flavour, *row, n);
        }
        Self::dot(flavour, rows, n, q, live, next)
    }
    /// `Σ x²` of one row, each square and the sum in float64.
    ///
    /// # Safety
    /// `row` points at `n` readable values.
    unsafe fn sum_squares(flavour: Flavour, row: *const Self, n: usize) -> f64;
    /// `fold += w` in float64, then `w = 0` (slices of one length).
    fn fold(flavour: Flavour, fold: &mut [f64], w: &mut [Self]);
}

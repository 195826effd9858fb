//! Whole-matrix reads in float64 besides the pass: `Σ x²`, `Σ (a − b)²`, finiteness, one row widened.

use super::layout::Flavour;
use super::matrix::{Elem, HostMatrix};
use super::real::Real;
use super::runner::for_each_part;

/// Widens row `i` of a bf16 or f16 matrix into `out`; returns its `Σ x²` in float64.
pub(crate) fn widen_row(a: &HostMatrix, i: usize, out: &mut [f32]) -> f64 {
    let p = a.row(i) as *const u16;
    let mut s = 0.0;
    for (j, o) in out.iter_mut().enumerate() {
        // SAFETY: the row holds a.cols 16-bit values.
        let bits = unsafe { p.add(j).read_unaligned() };
        let x = match a.elem {
            Elem::Bf16 => f32::from_bits((bits as u32) << 16),
            _ => half::f16::from_bits(bits).to_f32(),
        };
        *o = x;
        s += (x as f64) * (x as f64);
    }
    s
}

/// Row `i` of `a` in float64.
pub(crate) fn read_row_f64(a: &HostMatrix, i: usize, out: &mut [f64]) {
    let p = a.row(i);
    for (j, o) in out[..a.cols].iter_mut().enumerate() {
        // SAFETY: the row holds a.cols elements of a.elem, read unaligned.
        *o = unsafe {
            match a.elem {
                Elem::F32 => (p as *const f32).add(j).read_unaligned() as f64,
                Elem::F64 => (p as *const f64).add(j).read_unaligned(),
                Elem::Bf16 => f32::from_bits(((p as *const u16).add(j).read_unaligned() as u32) << 16) as f64,
                Elem::F16 => half::f16::from_bits((p as *const u16).add(j).read_unaligned()).to_f64(),
            }
        };
    }
}

/// Whether every element of a float64 matrix is finite (its sum of squares may overflow when they all
/// are; narrower types cannot, so for them a finite sum of squares already says so).
pub(crate) fn all_finite(a: &HostMatrix) -> bool {
    let mut row = vec![0f64; a.cols];
    (0..a.rows).all(|i| {
        read_row_f64(a, i, &mut row);
        row.iter().all(|x| x.is_finite())
    })
}

/// `Σ x²` in float64 of every element of `a`, with `threads` threads (one pass, no temporaries).
pub fn sum_squares(a: &HostMatrix, threads: usize) -> f64 {
    let flavour = Flavour::detect();
    let part = |r0: usize, r1: usize| -> f64 {
        let mut s = 0.0;
        let mut buf = Vec::new();
        for r in r0..r1 {
            s += unsafe {
                // SAFETY: each row holds a.cols elements of a.elem.
                match a.elem {
                    Elem::F32 => f32::sum_squares(flavour, a.row(r) as *const f32, a.cols),
                    Elem::F64 => f64::sum_squares(flavour, a.row(r) as *const f64, a.cols),
                    Elem::Bf16 | Elem::F16 => {
                        buf.resize(a.cols, 0.0);
                        widen_row(a, r, &mut buf)
                    }
                }
            };
        }
        s
    };
    split_rows(a.rows, threads, a.cols, part)
}

/// `Σ (a_ij − b_ij)²` in float64, one pass over both (same shape and element type).
pub fn distance_squares(a: &HostMatrix, b: &HostMatrix, threads: usize) -> f64 {
    debug_assert!(a.rows == b.rows && a.cols == b.cols && a.elem == b.elem);
    let part = |r0: usize, r1: usize| -> f64 {
        let mut s = 0.0;
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for r in r0..r1 {
            match a.elem {
                Elem::F32 | Elem::F64 => {
                    for j in 0..a.cols {
                        // SAFETY: j < cols of row r in both matrices.
                        let d = unsafe {
                            if a.elem == Elem::F32 {
                                (a.row(r) as *const f32).add(j).read_unaligned() as f64 - (b.row(r) as *const f32).add(j).read_unaligned() as f64
                            } else {
                                (a.row(r) as *const f64).add(j).read_unaligned() - (b.row(r) as *const f64).add(j).read_unaligned()
                            }
                        };
                        s += d * d;
                    }
                }
                Elem::Bf16 | Elem::F16 => {
                    x.resize(a.cols, 0.0);
                    y.resize(a.cols, 0.0);
                    widen_row(a, r, &mut x);
                    widen_row(b, r, &mut y);
                    s += x.iter().zip(&y).map(|(p, q)| (*p as f64 - *q as f64).powi(2)).sum::<f64>();
                }
            }
        }
        s
    };
    split_rows(a.rows, threads, a.cols, part)
}

/// Runs `part` over row ranges on up to `threads` threads (each at least 1 MiB of work) and sums.
fn split_rows(rows: usize, threads: usize, cols: usize, part: impl Fn(usize, usize) -> f64 + Sync) -> f64 {
    let threads = threads.clamp(1, (rows * cols / (1 << 18)).max(1)).min(rows);
    if threads == 1 {
        return part(0, rows);
    }
    let per = rows.div_ceil(threads);
    let mut sums = vec![0.0; threads];
    for_each_part(&mut sums, |i, out| *out = part((i * per).min(rows), ((i + 1) * per).min(rows)));
    sums.iter().sum()
}

//! The portable kernels: plain Rust for float64 matrices and for CPUs without AVX2 (float32 sums folded into
//! float64 every segment, as the SIMD kernels do).

use super::layout::{LANES, R, SEGMENT};
use super::real::Real;

pub(super) unsafe fn dot<T: Real>(rows: &[*const T; R], n: usize, q: *const T) -> [[f64; LANES]; R] {
    let mut out = [[0f64; LANES]; R];
    let mut j0 = 0;
    while j0 < n {
        let j1 = n.min(j0 + SEGMENT);
        let mut acc = [[T::default(); LANES]; R];
        for j in j0..j1 {
            let qj = q.add(j * LANES);
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let a = rows[i].add(j).read_unaligned();
                for (k, s) in acc_i.iter_mut().enumerate() {
                    *s = *s + a * *qj.add(k);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            for (x, y) in o.iter_mut().zip(a) {
                *x += y.to_f64();
            }
        }
        j0 = j1;
    }
    out
}

pub(super) unsafe fn axpy<T: Real>(rows: &[*const T; R], n: usize, b: &[[T; LANES]; R], w: *mut T) {
    for j in 0..n {
        let wj = w.add(j * LANES);
        let a: [T; R] = std::array::from_fn(|i| rows[i].add(j).read_unaligned());
        for k in 0..LANES {
            *wj.add(k) = *wj.add(k) + (a[0] * b[0][k] + a[1] * b[1][k]) + (a[2] * b[2][k] + a[3] * b[3][k]);
        }
    }
}

#[inline(always)]
pub(super) fn fold<T: Real>(fold: &mut [f64], w: &mut [T]) {
    for (f, x) in fold.iter_mut().zip(w.iter_mut()) {
        *f += x.to_f64();
        *x = T::default();
    }
}

pub(super) unsafe fn sum_squares<T: Real>(row: *const T, n: usize) -> f64 {
    let mut acc = [0f64; 4];
    let mut j = 0;
    while j + 4 <= n {
        for (k, s) in acc.iter_mut().enumerate() {
            let x = row.add(j + k).read_unaligned().to_f64();
            *s += x * x;
        }
        j += 4;
    }
    let mut s: f64 = acc.iter().sum();
    while j < n {
        let x = row.add(j).read_unaligned().to_f64();
        s += x * x;
        j += 1;
    }
    s
}

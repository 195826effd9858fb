//! The estimator's small float64 linear algebra, on the host: Gram–Schmidt of a new block against the
//! basis, and the symmetric eigenproblem of the Rayleigh–Ritz step. Matrices are column-major slices.
//!
//! These are tiny next to the pass over the weight matrix (`n × 8` blocks, projected matrices of side
//! 8–320), but libtorch would spend more on dispatch than on arithmetic here, and its threaded kernels
//! would wake OpenMP workers that then spin against the pass's own threads.

use super::pass::Flavour;

/// Projected matrices up to this side are diagonalised by Jacobi rotations here, larger ones by
/// LAPACK through libtorch (a warm start needs 8 or 16; a cold start grows by 8 per iteration).
pub(crate) const JACOBI_MAX: usize = 32;

/// The instructions the loops below are compiled for, chosen once at run time like the pass's (the
/// default x86-64 target has neither AVX nor FMA, and these loops are a fifth of a cold estimate).
fn level() -> Flavour {
    crate::pass::flavour()
}

/// Calls `$body` (an expression over the arguments) compiled for the best available level.
macro_rules! dispatch {
    (fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn inner($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512($($arg: $ty),*) -> $ret {
                inner($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) -> $ret {
                inner($($arg),*)
            }
            match level() {
                // SAFETY: the CPU has the features these copies were compiled for.
                #[cfg(target_arch = "x86_64")]
                Flavour::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                Flavour::Avx2 => unsafe { avx2($($arg),*) },
                _ => inner($($arg),*),
            }
        }
    };
}

/// `Σ a_i b_i` with sixteen independent sums (lets the compiler vectorise the reduction).
#[inline(always)]
fn dot_lanes(a: &[f64], b: &[f64]) -> f64 {
    let mut s = [0f64; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..16 {
            s[k] += x[k] * y[k];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    let mut h = [0f64; 8];
    for k in 0..8 {
        h[k] = s[k] + s[k + 8];
    }
    ((h[0] + h[1]) + (h[2] + h[3])) + ((h[4] + h[5]) + (h[6] + h[7])) + tail
}

/// `y += alpha · x`.
#[inline(always)]
fn axpy_lanes(y: &mut [f64], alpha: f64, x: &[f64]) {
    for (u, v) in y.iter_mut().zip(x) {
        *u += alpha * v;
    }
}

dispatch! {
    fn dot(a: &[f64], b: &[f64]) -> f64 {
        dot_lanes(a, b)
    }
}

// `out = Σ_i coef[i] · basis column i` (`n` rows): the Ritz vectors from the basis.
dispatch! {
    fn combine(out: &mut [f64], basis: &[f64], coef: &[f64], n: usize) -> () {
        out[..n].iter_mut().for_each(|v| *v = 0.0);
        for (i, &c) in coef.iter().enumerate() {
            axpy_lanes(&mut out[..n], c, &basis[i * n..(i + 1) * n]);
        }
    }
}

/// Makes the `width` columns of `x` (`n × width`) orthonormal to the first `dim` columns of `basis`
/// (`n × dim`, orthonormal) and to each other: each column is projected out against the basis and the
/// columns before it, twice (classical Gram–Schmidt with reorthogonalisation; "twice is enough",
/// Giraud et al. 2005), then normalised. A column that loses all but 1e-10 of its norm lies in the
/// span already (the Krylov space is exhausted, or the matrix has low rank); it is replaced by a random
/// direction from `gauss`, orthonormalised the same way, so the basis stays orthonormal.
pub(crate) fn orthonormalize(basis: &[f64], dim: usize, x: &mut [f64], width: usize, n: usize, gauss: &mut dyn FnMut() -> f64) {
    let mut coef = vec![0f64; dim + width];
    for c in 0..width {
        let (done, rest) = x.split_at_mut(c * n);
        let col = &mut rest[..n];
        for attempt in 0..4 {
            let before = dot(col, col).sqrt();
            for _ in 0..2 {
                project_out(basis, dim, done, c, col, n, &mut coef);
            }
            let after = dot(col, col).sqrt();
            if after > 1e-10 * before && after > 0.0 && after.is_finite() {
                let inv = 1.0 / after;
                col.iter_mut().for_each(|v| *v *= inv);
                break;
            }
            // A fresh random direction; a random vector in a space of dimension ≥ 2 is almost surely
            // not in the span, so more than one retry only guards against a zero draw.
            assert!(attempt < 3 || dim + c < n, "no direction is left: the caller keeps dim + width ≤ n");
            col.iter_mut().for_each(|v| *v = gauss());
        }
    }
}

// One classical Gram–Schmidt sweep: all coefficients against the unchanged column first, then one
// update (the blocked form: each basis vector is read twice per sweep, not once per coefficient).
dispatch! {
    fn project_out(basis: &[f64], dim: usize, done: &[f64], count: usize, col: &mut [f64], n: usize, coef: &mut [f64]) -> () {
        let vector = |i: usize| if i < dim { &basis[i * n..(i + 1) * n] } else { &done[(i - dim) * n..(i - dim + 1) * n] };
        for i in 0..dim + count {
            coef[i] = dot_lanes(vector(i), col);
        }
        for i in 0..dim + count {
            axpy_lanes(col, -coef[i], vector(i));
        }
    }
}

/// Eigenvalues of the symmetric `d × d` matrix `h` (column-major; only its values are read, so either
/// triangle may be used), descending, and the matching unit eigenvectors (column-major, `d × d`).
pub(crate) fn symmetric_eigen(h: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let (values, vectors) = if d <= JACOBI_MAX { jacobi(h, d, true) } else { lapack(h, d, true) };
    // Sort descending, carrying the vectors.
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&i, &j| values[j].total_cmp(&values[i]));
    let sorted_values = order.iter().map(|&i| values[i]).collect();
    let mut sorted_vectors = Vec::with_capacity(d * d);
    for &i in &order {
        sorted_vectors.extend_from_slice(&vectors[i * d..(i + 1) * d]);
    }
    (sorted_values, sorted_vectors)
}

/// The eigenvalues alone, descending (a third of the work of [`symmetric_eigen`] for large `d`).
pub(crate) fn symmetric_eigenvalues(h: &[f64], d: usize) -> Vec<f64> {
    let (mut values, _) = if d <= JACOBI_MAX { jacobi(h, d, false) } else { lapack(h, d, false) };
    values.sort_by(|a, b| b.total_cmp(a));
    values
}

/// Cyclic Jacobi (Golub & Van Loan, "Matrix Computations", 4th ed., §8.5): rotations that zero each
/// off-diagonal entry in turn until the off-diagonal part is below rounding. High relative accuracy,
/// and for a side of 16 a few microseconds.
fn jacobi(h: &[f64], d: usize, want_vectors: bool) -> (Vec<f64>, Vec<f64>) {
    let mut a = h[..d * d].to_vec();
    // Symmetrise: the caller's matrix is symmetric up to rounding.
    for p in 0..d {
        for q in p + 1..d {
            let v = 0.5 * (a[p * d + q] + a[q * d + p]);
            a[p * d + q] = v;
            a[q * d + p] = v;
        }
    }
    let mut v = vec![0f64; if want_vectors { d * d } else { 0 }];
    for i in 0..d.min(v.len()) {
        v[i * d + i] = 1.0;
    }
    let total: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..60 {
        let mut off = 0.0;
        for p in 0..d {
            for q in p + 1..d {
                off += a[q * d + p] * a[q * d + p];
            }
        }
        if off <= 1e-32 * total || off == 0.0 {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[q * d + p];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (a[p * d + p], a[q * d + q]);
                // The rotation [[c, s], [−s, c]] that zeroes a_pq: t = tan θ, the smaller root of
                // t² + 2τt − 1 = 0 with τ = (a_qq − a_pp) / (2 a_pq).
                let tau = (aqq - app) / (2.0 * apq);
                let t = if tau >= 0.0 { 1.0 / (tau + (1.0 + tau * tau).sqrt()) } else { -1.0 / (-tau + (1.0 + tau * tau).sqrt()) };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = t * c;
                // A ← A·J (columns p, q), then A ← Jᵀ·A (rows p, q), V ← V·J.
                for k in 0..d {
                    let (akp, akq) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * akp - s * akq;
                    a[q * d + k] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * apk - s * aqk;
                    a[k * d + q] = s * apk + c * aqk;
                }
                for k in (0..d).filter(|_| want_vectors) {
                    let (vkp, vkq) = (v[p * d + k], v[q * d + k]);
                    v[p * d + k] = c * vkp - s * vkq;
                    v[q * d + k] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i * d + i]).collect(), v)
}

/// Larger projections: Jacobi as well until the tridiagonal solver lands (same contract).
fn lapack(h: &[f64], d: usize, want_vectors: bool) -> (Vec<f64>, Vec<f64>) {
    jacobi(h, d, want_vectors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    fn random(n: usize) -> Vec<f64> {
        Vec::<f64>::try_from(&Tensor::randn([n as i64], (Kind::Double, Device::Cpu))).unwrap()
    }

    #[test]
    fn eigenpairs_satisfy_their_equation_on_both_solvers() {
        for d in [1, 2, 7, 16, 32, 33, 80] {
            let g = random(d * d);
            // A symmetric matrix with a cluster of near-equal eigenvalues at the top.
            let mut h = vec![0f64; d * d];
            for i in 0..d {
                for j in 0..d {
                    h[j * d + i] = g[i * d + j] + g[j * d + i];
                }
                h[i * d + i] += 100.0 + if i < 3 { 1e-9 * i as f64 } else { 0.0 };
            }
            let (values, vectors) = symmetric_eigen(&h, d);
            for (x, y) in symmetric_eigenvalues(&h, d).iter().zip(&values) {
                assert!((x - y).abs() <= 1e-12 * values[0].abs(), "d {d}: eigenvalues alone {x} vs with vectors {y}");
            }
            let reference = Tensor::from_slice(&h).view([d as i64, d as i64]).linalg_eigvalsh("L");
            let mut want = Vec::<f64>::try_from(&reference).unwrap();
            want.reverse();
            for (x, y) in values.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-12 * want[0].abs(), "d {d}: eigenvalue {x} vs LAPACK {y}");
            }
            for (i, lambda) in values.iter().enumerate() {
                let v = &vectors[i * d..(i + 1) * d];
                assert!((dot(v, v) - 1.0).abs() < 1e-12);
                for r in 0..d {
                    let hv: f64 = (0..d).map(|c| h[c * d + r] * v[c]).sum();
                    assert!((hv - lambda * v[r]).abs() <= 1e-10 * want[0].abs(), "d {d}: residual of pair {i}");
                }
            }
        }
    }

    #[test]
    fn orthonormalize_keeps_the_basis_orthonormal_even_for_columns_in_its_span() {
        let n = 50;
        let mut basis = random(n * 3);
        let mut state = 7u64;
        let mut gauss = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        orthonormalize(&[], 0, &mut basis, 3, n, &mut gauss);
        // A block whose first column is in the basis' span and whose second is zero.
        let mut x = vec![0f64; n * 3];
        for j in 0..n {
            x[j] = 2.0 * basis[j] - basis[n + j];
            x[2 * n + j] = (j as f64).sin();
        }
        orthonormalize(&basis, 3, &mut x, 3, n, &mut gauss);
        let all: Vec<&[f64]> = basis.chunks(n).chain(x.chunks(n)).collect();
        for (i, u) in all.iter().enumerate() {
            for (j, v) in all.iter().enumerate() {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot(u, v) - want).abs() < 1e-12, "columns {i}, {j}: {}", dot(u, v));
            }
        }
    }
}

//! The estimator's small float64 linear algebra, on the host: Gram–Schmidt of a new block against the
//! basis, and the symmetric eigenproblem of the Rayleigh–Ritz step. Matrices are column-major slices.
//!
//! These are small next to the pass over the weight matrix (`n × 8` blocks, projected matrices of side
//! 8–320), but libtorch would spend more on dispatch than on arithmetic here, its threaded kernels
//! would wake OpenMP workers that then spin against the pass's own threads, and a process that needs
//! only this module should not pay libtorch's start-up: so it is plain Rust, single-threaded.
//!
//! The files: this one holds Gram–Schmidt (the block projection and its kernels); `eigen` the eigenproblem,
//! `lanes` the vector loops both use and their dispatch.

mod eigen;
mod lanes;

use super::pass::Flavour;

pub(crate) use eigen::{symmetric_eigen, symmetric_eigenvalues, symmetric_top_eigenvalues, VECTORS_EVERY_ITERATION_MAX};
pub(crate) use lanes::{combine, dot};
use lanes::{axpy_lanes, dispatch, dot_lanes, level};

/// Columns of the block handled by one pass of the kernels below.
const GROUP: usize = 8;

/// Makes the `width` columns of `x` (`n × width`) orthonormal to the first `dim` columns of `basis`
/// (`n × dim`, orthonormal) and to each other, by block classical Gram–Schmidt with reorthogonalisation
/// (BCGS2; Barlow & Smoktunowicz, "Reorthogonalized block classical Gram–Schmidt", Numer. Math. 2013):
/// twice, `X ← X − Q(QᵀX)` for the whole block (each sweep reads the basis twice, whatever the width),
/// then the block's columns among themselves by per-column classical Gram–Schmidt, twice, and
/// normalisation. "Twice is enough" (Giraud et al. 2005) holds as long as no column loses almost all of
/// its norm: one that loses all but 1e-10 of it in the first sweep lies in the span already (the Krylov
/// space is exhausted, or the matrix has low rank); it is replaced by a random direction from `gauss`
/// and the sweep is repeated, so the basis stays orthonormal.
pub(crate) fn orthonormalize(basis: &[f64], dim: usize, x: &mut [f64], width: usize, n: usize, gauss: &mut dyn FnMut() -> f64) {
    let mut coef = vec![0f64; (dim + width) * GROUP];
    let mut attempts = vec![0u32; width];
    let mut start = 0;
    while start < width {
        let cols = GROUP.min(width - start);
        let (done, rest) = x.split_at_mut(start * n);
        let block = &mut rest[..cols * n];
        let mut sweep = 0;
        while sweep < 2 {
            let before: Vec<f64> = block.chunks(n).map(|c| dot(c, c).sqrt()).collect();
            project_block(basis, dim, block, cols, n, &mut coef);
            project_block(done, start, block, cols, n, &mut coef);
            match orthonormalize_within(block, cols, n, (sweep == 0).then_some(&before[..])) {
                None => sweep += 1,
                Some(c) => {
                    // A fresh random direction; a random vector in a space of dimension ≥ 2 is almost
                    // surely not in the span, so more than one retry only guards against a zero draw.
                    let a = &mut attempts[start + c];
                    assert!(*a < 3 || dim + start + c < n, "no direction is left: the caller keeps dim + width ≤ n");
                    *a += 1;
                    block[c * n..(c + 1) * n].iter_mut().for_each(|v| *v = gauss());
                    sweep = 0;
                }
            }
        }
        start += cols;
    }
}

/// Classical Gram–Schmidt with reorthogonalisation among the `cols` columns of `block`, then
/// normalisation. With `before` (the norms before this sweep's projection against the basis), returns
/// the first column that kept no more than 1e-10 of its norm, or was not finite.
fn orthonormalize_within(block: &mut [f64], cols: usize, n: usize, before: Option<&[f64]>) -> Option<usize> {
    let mut coef = [0f64; GROUP];
    for c in 0..cols {
        let (prior, rest) = block.split_at_mut(c * n);
        let col = &mut rest[..n];
        for _ in 0..2 {
            for (i, p) in prior.chunks(n).enumerate() {
                coef[i] = dot(p, col);
            }
            for (i, p) in prior.chunks(n).enumerate() {
                axpy(col, -coef[i], p);
            }
        }
        let after = dot(col, col).sqrt();
        let reference = before.map_or(0.0, |b| 1e-10 * b[c]);
        if !(after > reference && after > 0.0 && after.is_finite()) {
            return Some(c);
        }
        let inv = 1.0 / after;
        col.iter_mut().for_each(|v| *v *= inv);
    }
    None
}

dispatch! {
    fn axpy(y: &mut [f64], alpha: f64, x: &[f64]) -> () {
        axpy_lanes(y, alpha, x)
    }
}

/// `X ← X − Q(QᵀX)` for the `cols ≤ GROUP` columns of `x` against the first `dim` columns of `q`.
fn project_block(q: &[f64], dim: usize, x: &mut [f64], cols: usize, n: usize, coef: &mut [f64]) {
    project_block_as(level(), q, dim, x, cols, n, coef)
}

fn project_block_as(flavour: Flavour, q: &[f64], dim: usize, x: &mut [f64], cols: usize, n: usize, coef: &mut [f64]) {
    if dim == 0 {
        return;
    }
    assert!(cols <= GROUP && q.len() >= dim * n && x.len() >= cols * n && coef.len() >= dim * GROUP);
    macro_rules! by_width {
        ($module:ident) => {
            // SAFETY: the CPU has the module's features (the caller's flavour runs here), and the
            // slices are as long as the kernels read (asserted above).
            unsafe {
                match cols {
                    1 => { $module::gram::<1>(q, dim, x, n, coef); $module::subtract::<1>(q, dim, x, n, coef) }
                    2 => { $module::gram::<2>(q, dim, x, n, coef); $module::subtract::<2>(q, dim, x, n, coef) }
                    3 => { $module::gram::<3>(q, dim, x, n, coef); $module::subtract::<3>(q, dim, x, n, coef) }
                    4 => { $module::gram::<4>(q, dim, x, n, coef); $module::subtract::<4>(q, dim, x, n, coef) }
                    5 => { $module::gram::<5>(q, dim, x, n, coef); $module::subtract::<5>(q, dim, x, n, coef) }
                    6 => { $module::gram::<6>(q, dim, x, n, coef); $module::subtract::<6>(q, dim, x, n, coef) }
                    7 => { $module::gram::<7>(q, dim, x, n, coef); $module::subtract::<7>(q, dim, x, n, coef) }
                    _ => { $module::gram::<8>(q, dim, x, n, coef); $module::subtract::<8>(q, dim, x, n, coef) }
                }
            }
        };
    }
    match flavour {
        #[cfg(target_arch = "x86_64")]
        Flavour::Avx512 => by_width!(block_avx512),
        #[cfg(target_arch = "x86_64")]
        Flavour::Avx2 => by_width!(block_avx2),
        _ => {
            for (c, col) in x.chunks_mut(n).take(cols).enumerate() {
                for (i, qi) in q.chunks(n).take(dim).enumerate() {
                    coef[i * GROUP + c] = dot_lanes(qi, col);
                }
                for (i, qi) in q.chunks(n).take(dim).enumerate() {
                    axpy_lanes(col, -coef[i * GROUP + c], qi);
                }
            }
        }
    }
}

/// The two halves of a block sweep for one instruction set, with `L` float64 lanes per register and
/// `G` registers per row of accumulators (so that a block of eight columns keeps its accumulators in
/// the register file: 16 of 32 with AVX-512, 8 of 16 with AVX2).
///
/// `gram`: `coef[i·GROUP + c] = q_iᵀ x_c`, `G` basis vectors at a time against every column, so that
/// each basis vector is read once per sweep and each of its loads feeds `W` fused multiply-adds.
/// `subtract`: `x_c −= Σ_i coef[i·GROUP + c] q_i`, a tile of `L·G` rows of every column held in
/// registers while the basis vectors stream past, so that the block is read and written once.
#[cfg(target_arch = "x86_64")]
macro_rules! block_kernels {
    ($module:ident, $feature:literal, $vec:ty, $lanes:literal, $regs:literal, $load:ident, $store:ident, $set1:ident, $zero:ident, $fmadd:ident, $fnmadd:ident) => {
        mod $module {
            use super::GROUP;
            use std::arch::x86_64::*;

            const L: usize = $lanes;
            const G: usize = $regs;

            /// # Safety
            /// The CPU has `$feature`; `q` holds `dim · n`, `x` `W · n` and `coef` `dim · GROUP` values.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn gram<const W: usize>(q: &[f64], dim: usize, x: &[f64], n: usize, coef: &mut [f64]) {
                let body = n / L * L;
                let (q, x) = (q.as_ptr(), x.as_ptr());
                let mut i = 0;
                while i < dim {
                    // A short last group repeats its last vector and drops the repeats' sums.
                    let mut rows = [q; G];
                    for k in 0..G {
                        rows[k] = q.add((i + k).min(dim - 1) * n);
                    }
                    let mut acc = [[$zero(); W]; G];
                    let mut r = 0;
                    while r < body {
                        let mut qv = [$zero(); G];
                        for k in 0..G {
                            qv[k] = $load(rows[k].add(r));
                        }
                        for c in 0..W {
                            let xv = $load(x.add(c * n + r));
                            for k in 0..G {
                                acc[k][c] = $fmadd(qv[k], xv, acc[k][c]);
                            }
                        }
                        r += L;
                    }
                    for k in 0..G.min(dim - i) {
                        for c in 0..W {
                            let mut lanes = [0f64; L];
                            $store(lanes.as_mut_ptr(), acc[k][c]);
                            let mut s = lanes.iter().sum::<f64>();
                            for r in body..n {
                                s += *rows[k].add(r) * *x.add(c * n + r);
                            }
                            coef[(i + k) * GROUP + c] = s;
                        }
                    }
                    i += G;
                }
            }

            /// # Safety
            /// As for [`gram`].
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn subtract<const W: usize>(q: &[f64], dim: usize, x: &mut [f64], n: usize, coef: &[f64]) {
                let tile = L * G;
                let body = n / tile * tile;
                let (q, x, cf) = (q.as_ptr(), x.as_mut_ptr(), coef.as_ptr());
                let mut r = 0;
                while r < body {
                    let mut acc = [[$zero(); G]; W];
                    for c in 0..W {
                        for k in 0..G {
                            acc[c][k] = $load(x.add(c * n + r + k * L));
                        }
                    }
                    for i in 0..dim {
                        let mut qv = [$zero(); G];
                        for k in 0..G {
                            qv[k] = $load(q.add(i * n + r + k * L));
                        }
                        for c in 0..W {
                            let a = $set1(*cf.add(i * GROUP + c));
                            for k in 0..G {
                                acc[c][k] = $fnmadd(a, qv[k], acc[c][k]);
                            }
                        }
                    }
                    for c in 0..W {
                        for k in 0..G {
                            $store(x.add(c * n + r + k * L), acc[c][k]);
                        }
                    }
                    r += tile;
                }
                for r in body..n {
                    for c in 0..W {
                        let mut s = 0.0;
                        for i in 0..dim {
                            s += *cf.add(i * GROUP + c) * *q.add(i * n + r);
                        }
                        *x.add(c * n + r) -= s;
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
block_kernels!(block_avx512, "avx512f", __m512d, 8, 2, _mm512_loadu_pd, _mm512_storeu_pd, _mm512_set1_pd, _mm512_setzero_pd, _mm512_fmadd_pd, _mm512_fnmadd_pd);
#[cfg(target_arch = "x86_64")]
block_kernels!(block_avx2, "avx2,fma", __m256d, 4, 1, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_set1_pd, _mm256_setzero_pd, _mm256_fmadd_pd, _mm256_fnmadd_pd);

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    fn random(n: usize) -> Vec<f64> {
        Vec::<f64>::try_from(&Tensor::randn([n as i64], (Kind::Double, Device::Cpu))).unwrap()
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

    /// Every instruction set's kernels against the plain formula `X − Q(QᵀX)`, for every block width and
    /// a length that leaves a remainder after the vector loops.
    #[test]
    fn block_projection_matches_the_plain_formula_on_every_instruction_set() {
        tch::manual_seed(6);
        let (n, dim) = (37, 9);
        let q = random(n * dim);
        for flavour in [Flavour::Portable, Flavour::Avx2, Flavour::Avx512].into_iter().filter(|f| f.runs_here()) {
            for cols in 1..=GROUP {
                let x0 = random(n * cols);
                let mut x = x0.clone();
                let mut coef = vec![0f64; dim * GROUP];
                project_block_as(flavour, &q, dim, &mut x, cols, n, &mut coef);
                let (qt, xt) = (Tensor::from_slice(&q).view([dim as i64, n as i64]), Tensor::from_slice(&x0).view([cols as i64, n as i64]));
                let want = &xt - xt.matmul(&qt.tr()).matmul(&qt);
                let want = Vec::<f64>::try_from(&want.contiguous().view([-1])).unwrap();
                for (i, (a, b)) in x.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{flavour:?}, {cols} columns, entry {i}: {a} vs {b}");
                }
            }
        }
    }

    /// The estimator's own case: 8 columns against 136 basis vectors of length 768, once Gaussian and
    /// once all but 1e-8 of their norm inside the basis' span (where one classical sweep alone would
    /// leave components of about 1e-8 along the basis).
    #[test]
    fn block_orthonormalize_keeps_a_768_by_144_basis_orthonormal() {
        tch::manual_seed(5);
        let (n, dim, width) = (768, 136, 8);
        let mut state = 11u64;
        let mut gauss = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let mut basis = random(n * dim);
        orthonormalize(&[], 0, &mut basis, dim, n, &mut gauss);
        let inside = {
            let mut x = vec![0f64; n * width];
            let c = random(dim * width);
            let noise = random(n * width);
            for col in 0..width {
                for i in 0..dim {
                    axpy_lanes(&mut x[col * n..(col + 1) * n], c[col * dim + i], &basis[i * n..(i + 1) * n]);
                }
                for r in 0..n {
                    x[col * n + r] += 1e-8 * noise[col * n + r];
                }
            }
            x
        };
        for mut x in [random(n * width), inside] {
            orthonormalize(&basis, dim, &mut x, width, n, &mut gauss);
            let q = Tensor::from_slice(&basis).view([dim as i64, n as i64]);
            let q = Tensor::cat(&[q, Tensor::from_slice(&x).view([width as i64, n as i64])], 0);
            let gram = q.matmul(&q.tr()) - Tensor::eye((dim + width) as i64, (Kind::Double, Device::Cpu));
            let worst = gram.abs().max().double_value(&[]);
            assert!(worst <= 1e-12, "|QᵀQ − I| reaches {worst}");
        }
    }
}

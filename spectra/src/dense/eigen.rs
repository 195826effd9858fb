//! The symmetric eigenproblem of the Rayleigh–Ritz step: Householder tridiagonalisation, then implicit QL
//! for every eigenpair (or the values alone), or bisection on Sturm counts for the top few values.

use crate::pass::Flavour;

use super::lanes::{axpy_lanes, dispatch, dot_lanes, level};

/// Projected matrices up to this side get their eigenvectors at every iteration, with their eigenvalues:
/// there the vectors cost little more than the values (with [`symmetric_eigen`], 31 µs against 26 µs
/// for the values alone at a side of 32 on the development machine; a warm start needs 8 or 16, and a
/// cold start grows by 8 per iteration). A Jacobi solver served these sides until the tridiagonal QL
/// below proved faster at every side from 8 up (5 against 2.4 µs at 8, 250 against 31 µs at 32).
pub(crate) const VECTORS_EVERY_ITERATION_MAX: usize = 32;

/// Eigenvalues of the symmetric `d × d` matrix `h` (column-major; the mean of its two triangles is
/// used, since the caller's matrix is symmetric up to rounding), descending, and the matching unit
/// eigenvectors (column-major, `d × d`).
pub(crate) fn symmetric_eigen(h: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let (values, vectors) = tridiagonal_eigen(h, d, true);
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

/// The eigenvalues alone, descending (for large `d` a fraction of the work of [`symmetric_eigen`]:
/// the reduction without accumulating its reflections, and QL without rotating vectors).
pub(crate) fn symmetric_eigenvalues(h: &[f64], d: usize) -> Vec<f64> {
    let (mut values, _) = tridiagonal_eigen(h, d, false);
    values.sort_by(|a, b| b.total_cmp(a));
    values
}

/// The `count` largest eigenvalues alone, descending: the tridiagonal form as for
/// [`symmetric_eigenvalues`], then bisection on Sturm counts for just those (Golub & Van Loan §8.4.1;
/// LAPACK's `dstebz` does the same), O(count·d) per bisection step instead of QL sweeps over every
/// eigenvalue. This is what the estimator needs at every iteration: the top k Ritz values, to test
/// convergence. The `count` bisections advance together, so that their independent recurrences overlap
/// in the CPU's pipeline.
pub(crate) fn symmetric_top_eigenvalues(h: &[f64], d: usize, count: usize) -> Vec<f64> {
    let count = count.min(d);
    if count == 0 {
        return Vec::new();
    }
    let (_, scale, diagonal, off, _) = reduce(h, d);
    // Gershgorin's interval holds every eigenvalue of T.
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for i in 0..d {
        let r = off[i].abs() + if i > 0 { off[i - 1].abs() } else { 0.0 };
        lo = lo.min(diagonal[i] - r);
        hi = hi.max(diagonal[i] + r);
    }
    let pad = 1e-12 * (hi - lo).abs().max(f64::MIN_POSITIVE);
    let (lo, hi) = (lo - pad, hi + pad);
    // A pivot this small is replaced by −pivmin (LAPACK's guard against division by zero).
    let pivmin = f64::MIN_POSITIVE * off.iter().fold(1f64, |m, e| m.max(e * e));
    let squares: Vec<f64> = off.iter().map(|e| e * e).collect();
    // The j-th largest eigenvalue (j from 0) lies in [a_j, b_j]: at least j + 1 eigenvalues are ≥ a_j
    // and at most j are > b_j. 48 halvings take Gershgorin's interval (at most twice the spectral
    // radius wide) to 2^-48 of its width: 1e-14 of the top values, far below the estimator's 1e-4.
    let mut bounds: Vec<(f64, f64)> = vec![(lo, hi); count];
    let mut mids = vec![0f64; count];
    let mut below = vec![0usize; count];
    let mut q = vec![0f64; count];
    for _ in 0..48 {
        for (m, &(a, b)) in mids.iter_mut().zip(&bounds) {
            *m = 0.5 * (a + b);
        }
        // Sylvester's inertia of T − xI, for every x = mids[j] at once: the negative pivots of its
        // LDLᵀ factorisation, q_i = (d_i − x) − e_{i−1}² / q_{i−1}.
        below.iter_mut().for_each(|c| *c = 0);
        for i in 0..d {
            for j in 0..count {
                let mut p = diagonal[i] - mids[j];
                if i > 0 {
                    p -= squares[i - 1] / q[j];
                }
                if p.abs() < pivmin {
                    p = -pivmin;
                }
                below[j] += (p < 0.0) as usize;
                q[j] = p;
            }
        }
        for j in 0..count {
            if below[j] < d - j {
                bounds[j].0 = mids[j];
            } else {
                bounds[j].1 = mids[j];
            }
        }
    }
    bounds.iter().map(|&(a, b)| 0.5 * (a + b) * scale).collect()
}

/// The symmetrised, scaled copy of `h` reduced to tridiagonal form: `(reflections, scale, diagonal,
/// off, beta)` (see `tridiagonalize`); the eigenvalues of `h` are those of T times `scale`.
fn reduce(h: &[f64], d: usize) -> (Vec<f64>, f64, Vec<f64>, Vec<f64>, Vec<f64>) {
    // The mean of both triangles, in the lower one, scaled by a power of two (exact) so that the
    // entries are at most 1 and no square below overflows.
    let mut a = vec![0f64; d * d];
    let mut largest = 0f64;
    for j in 0..d {
        for i in j..d {
            let v = 0.5 * (h[j * d + i] + h[i * d + j]);
            a[j * d + i] = v;
            a[i * d + j] = v;
            largest = largest.max(v.abs());
        }
    }
    let scale = if largest > 0.0 && largest.is_finite() { (largest.log2().ceil()).exp2() } else { 1.0 };
    a.iter_mut().for_each(|v| *v /= scale);
    let mut diagonal = vec![0f64; d];
    let mut off = vec![0f64; d];
    let mut beta = vec![0f64; d];
    tridiagonalize(&mut a, d, &mut diagonal, &mut off, &mut beta);
    (a, scale, diagonal, off, beta)
}

/// The symmetric eigenproblem by Householder reduction to tridiagonal form and the implicit QL
/// algorithm with Wilkinson's shift (Golub & Van Loan, "Matrix Computations", 4th ed., §8.3; the QL
/// form chases the bulge upwards, Bowdler, Martin, Reinsch & Wilkinson, Numer. Math. 1968). Backward
/// stable: eigenvalues to a few units of rounding times ‖H‖. Unsorted.
fn tridiagonal_eigen(h: &[f64], d: usize, want_vectors: bool) -> (Vec<f64>, Vec<f64>) {
    if d == 0 {
        return (Vec::new(), Vec::new());
    }
    let (a, scale, mut diagonal, mut off, beta) = reduce(h, d);
    let mut z = Vec::new();
    if want_vectors {
        z = vec![0f64; d * d];
        accumulate_reflections(&a, d, &beta, &mut z);
    }
    tridiagonal_ql(&mut diagonal, &mut off, want_vectors.then_some(&mut z[..]), d);
    diagonal.iter_mut().for_each(|v| *v *= scale);
    (diagonal, z)
}

// Householder tridiagonalisation of the symmetric `a`: T = QᵀAQ, Q = P_0 ⋯ P_{d−3},
// P_k = I − β_k v_k v_kᵀ acting on rows k+1.. (GvL Algorithm 8.3.1). On return `diagonal` and `off`
// (off[k] = T[k+1, k], off[d−1] = 0) hold T, column k of `a` from row k+1 holds v_k (leading 1
// included) and `beta[k]` its β_k.
//
// The reflection that maps x = A[k+1.., k] to α e_1: α = −sign(x_1)‖x‖ (no cancellation in
// v_1 = x_1 − α), v = (x − α e_1)/v_1, β = 2 v_1² / ‖x − α e_1‖² = (‖x‖ + |x_1|) / ‖x‖.
// The trailing block then becomes A − v wᵀ − w vᵀ with p = βAv, w = p − (β pᵀv / 2) v.
dispatch! {
    fn tridiagonalize(a: &mut [f64], d: usize, diagonal: &mut [f64], off: &mut [f64], beta: &mut [f64]) -> () {
        let mut p = vec![0f64; d];
        for k in 0..d.saturating_sub(2) {
            diagonal[k] = a[k * d + k];
            let (head, tail) = a.split_at_mut((k + 1) * d);
            let x = &mut head[k * d + k + 1..];
            let x1 = x[0];
            let sigma = dot_lanes(&x[1..], &x[1..]);
            if sigma == 0.0 {
                off[k] = x1;
                beta[k] = 0.0;
                continue;
            }
            let norm = (x1 * x1 + sigma).sqrt();
            let alpha = if x1 >= 0.0 { -norm } else { norm };
            let v1 = x1 - alpha;
            let b = (norm + x1.abs()) / norm;
            x[0] = 1.0;
            let inv = 1.0 / v1;
            x[1..].iter_mut().for_each(|e| *e *= inv);
            off[k] = alpha;
            beta[k] = b;
            let v = &x[..];
            // p = β A v and the update over the whole trailing block (both triangles): twice the
            // arithmetic of one triangle, but every loop runs down a full column, which vectorises,
            // where a triangle's columns shorten to nothing.
            let m = d - k - 1;
            let p = &mut p[..m];
            p.iter_mut().for_each(|e| *e = 0.0);
            for j in 0..m {
                axpy_lanes(p, v[j], &tail[j * d + k + 1..(j + 1) * d]);
            }
            p.iter_mut().for_each(|e| *e *= b);
            let half = 0.5 * b * dot_lanes(p, v);
            axpy_lanes(p, -half, v);
            let w = &*p;
            for j in 0..m {
                let col = &mut tail[j * d + k + 1..(j + 1) * d];
                let (vj, wj) = (v[j], w[j]);
                for ((e, &vi), &wi) in col.iter_mut().zip(v).zip(w) {
                    *e -= vi * wj + wi * vj;
                }
            }
        }
        let last = d - 1;
        if d >= 2 {
            diagonal[last - 1] = a[(last - 1) * d + last - 1];
            off[last - 1] = a[(last - 1) * d + last];
        }
        diagonal[last] = a[last * d + last];
        off[last] = 0.0;
    }
}

// Q = P_0 ⋯ P_{d−3} into `z` (column-major, zeroed), applied backwards from the identity so that each
// P_k touches only the trailing block it acts on.
dispatch! {
    fn accumulate_reflections(a: &[f64], d: usize, beta: &[f64], z: &mut [f64]) -> () {
        for i in 0..d {
            z[i * d + i] = 1.0;
        }
        for k in (0..d.saturating_sub(2)).rev() {
            if beta[k] == 0.0 {
                continue;
            }
            let v = &a[k * d + k + 1..(k + 1) * d];
            for c in k + 1..d {
                let col = &mut z[c * d + k + 1..(c + 1) * d];
                let s = beta[k] * dot_lanes(v, col);
                axpy_lanes(col, -s, v);
            }
        }
    }
}

// Implicit QL with Wilkinson's shift on the tridiagonal (`diagonal`, `off`), in place: on return
// `diagonal` holds the eigenvalues. With `z`, every plane rotation is applied to its columns as well
// (z ← z·J), which turns Q into the eigenvectors of A.
//
// For the unreduced block l..=m, the shift μ is the eigenvalue of its leading 2×2 nearer d_l; the
// first rotation, at the bottom, zeroes (d_m − μ, e_{m−1}), and the bulge it makes is chased up to l,
// each rotation choosing c, s from the bulge and the running value g.
dispatch! {
    fn tridiagonal_ql(diagonal: &mut [f64], off: &mut [f64], z: Option<&mut [f64]>, d: usize) -> () {
        let mut z = z;
        for l in 0..d {
            let mut sweeps = 0;
            loop {
                // The first negligible off-diagonal entry at or below l (relative to its neighbours on
                // the diagonal, which keeps the small eigenvalues of a graded matrix).
                let mut m = l;
                while m + 1 < d && off[m].abs() > f64::EPSILON * (diagonal[m].abs() + diagonal[m + 1].abs()) {
                    m += 1;
                }
                if m == l {
                    break;
                }
                sweeps += 1;
                if sweeps > 60 {
                    // No convergence (only for non-finite input): give the block up as it stands.
                    off[l] = 0.0;
                    break;
                }
                let theta = (diagonal[l + 1] - diagonal[l]) / (2.0 * off[l]);
                let r = theta.hypot(1.0);
                let mut g = diagonal[m] - diagonal[l] + off[l] / (theta + r.copysign(theta));
                let (mut s, mut c, mut p) = (1f64, 1f64, 0f64);
                let mut vanished = false;
                for i in (l..m).rev() {
                    let f = s * off[i];
                    let b = c * off[i];
                    // The entries are at most d after the caller's scaling, so the plain square root
                    // cannot overflow; `hypot` (a libm call on the chase's critical path) only where the
                    // squares underflow.
                    let r = (f * f + g * g).sqrt();
                    let r = if r < 1e-150 { f.hypot(g) } else { r };
                    off[i + 1] = r;
                    if r == 0.0 {
                        // The bulge vanished: the block splits at i + 1; deflate there and start over.
                        diagonal[i + 1] -= p;
                        off[m] = 0.0;
                        vanished = true;
                        break;
                    }
                    let inv = 1.0 / r;
                    s = f * inv;
                    c = g * inv;
                    let t = diagonal[i + 1] - p;
                    let r = (diagonal[i] - t) * s + 2.0 * c * b;
                    p = s * r;
                    diagonal[i + 1] = t + p;
                    g = c * r - b;
                    if let Some(z) = z.as_deref_mut() {
                        let (left, right) = z.split_at_mut((i + 1) * d);
                        let zi = &mut left[i * d..];
                        let zj = &mut right[..d];
                        for (u, w) in zi.iter_mut().zip(zj.iter_mut()) {
                            let (a, b) = (*u, *w);
                            *w = s * a + c * b;
                            *u = c * a - s * b;
                        }
                    }
                }
                if vanished {
                    continue;
                }
                diagonal[l] -= p;
                off[l] = g;
                off[m] = 0.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::lanes::dot;
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

    /// `Q diag(values) Qᵀ` with Q orthogonal from LAPACK's QR of a Gaussian matrix.
    fn with_spectrum(values: &[f64]) -> Vec<f64> {
        let d = values.len() as i64;
        let (q, _) = Tensor::linalg_qr(&Tensor::randn([d, d], (Kind::Double, Device::Cpu)), "reduced");
        let l = Tensor::from_slice(values);
        let h = q.matmul(&l.diag_embed(0, -2, -1)).matmul(&q.tr());
        Vec::<f64>::try_from(&h.contiguous().view([-1])).unwrap()
    }

    fn symmetric_random(d: usize) -> Vec<f64> {
        let g = random(d * d);
        let mut h = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..d {
                h[j * d + i] = g[i * d + j] + g[j * d + i];
            }
        }
        h
    }

    /// Checks one solver's answer for `h` against LAPACK (`linalg_eigvalsh`, float64): eigenvalues to
    /// 1e-12·|λ_max|, residuals ‖Hv − λv‖ to 1e-10·|λ_max|, and VᵀV = I to 1e-12.
    fn check_against_lapack(name: &str, h: &[f64], d: usize, values: &[f64], vectors: Option<&[f64]>) {
        let reference = Tensor::from_slice(h).view([d as i64, d as i64]).linalg_eigvalsh("L");
        let mut want = Vec::<f64>::try_from(&reference).unwrap();
        want.sort_by(|a, b| b.total_cmp(a));
        let mut got = values.to_vec();
        got.sort_by(|a, b| b.total_cmp(a));
        let top = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(f64::MIN_POSITIVE);
        for (i, (x, y)) in got.iter().zip(&want).enumerate() {
            assert!((x - y).abs() <= 1e-12 * top, "{name}, d {d}: eigenvalue {i} is {x}, LAPACK {y}");
        }
        let Some(vectors) = vectors else { return };
        for (i, lambda) in values.iter().enumerate() {
            let v = &vectors[i * d..(i + 1) * d];
            let residual: f64 = (0..d)
                .map(|r| {
                    let hv: f64 = (0..d).map(|c| h[c * d + r] * v[c]).sum();
                    (hv - lambda * v[r]).powi(2)
                })
                .sum::<f64>()
                .sqrt();
            assert!(residual <= 1e-10 * top, "{name}, d {d}: ‖Hv − λv‖ = {residual} for pair {i}");
            for j in 0..=i {
                let want = if i == j { 1.0 } else { 0.0 };
                let got = dot(v, &vectors[j * d..(j + 1) * d]);
                assert!((got - want).abs() <= 1e-12, "{name}, d {d}: v_{i}ᵀv_{j} = {got}");
            }
        }
    }

    /// The solver with and without vectors, and both public entry points.
    fn check_every_solver(h: &[f64], d: usize) {
        for (name, want_vectors) in [("tridiagonal QL", true), ("tridiagonal QL, values", false)] {
            let (values, vectors) = tridiagonal_eigen(h, d, want_vectors);
            check_against_lapack(name, h, d, &values, want_vectors.then_some(&vectors[..]));
        }
        let (values, vectors) = symmetric_eigen(h, d);
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "d {d}: eigenvalues not descending");
        check_against_lapack("symmetric_eigen", h, d, &values, Some(&vectors));
        check_against_lapack("symmetric_eigenvalues", h, d, &symmetric_eigenvalues(h, d), None);
        for count in [1, 4, 8, d] {
            let top = symmetric_top_eigenvalues(h, d, count);
            assert_eq!(top.len(), count.min(d), "d {d}: top {count}");
            assert!(top.windows(2).all(|w| w[0] >= w[1]), "d {d}: top {count} not descending");
            check_against_lapack(&format!("top {count} by bisection"), h, d, &top, None);
        }
    }

    #[test]
    fn eigenvalues_of_random_symmetric_matrices_match_lapack() {
        tch::manual_seed(3);
        for d in [1, 2, 3, 8, 33, 136, 257] {
            check_every_solver(&symmetric_random(d), d);
        }
    }

    #[test]
    fn eigenvalues_of_hard_matrices_match_lapack() {
        tch::manual_seed(4);
        // A cluster of equal eigenvalues at the top and another in the middle.
        let cluster: Vec<f64> = (0..40).map(|i| if i < 6 { 3.0 } else if i < 20 { -0.5 } else { 1.0 / (1 + i) as f64 }).collect();
        check_every_solver(&with_spectrum(&cluster), 40);
        // Already diagonal (no reflection to make, nothing to chase), with repeated entries.
        for d in [5, 48] {
            let mut h = vec![0f64; d * d];
            for i in 0..d {
                h[i * d + i] = ((i % 7) as f64 - 3.0) * 0.25;
            }
            check_every_solver(&h, d);
        }
        // Rank one: u uᵀ, one eigenvalue ‖u‖², the rest zero.
        for d in [9, 70] {
            let u = random(d);
            let h: Vec<f64> = (0..d * d).map(|k| u[k / d] * u[k % d]).collect();
            check_every_solver(&h, d);
        }
        // Eigenvalues spread geometrically over 1e-12..1, and a zero matrix.
        for d in [20, 100] {
            let spread: Vec<f64> = (0..d).map(|i| 10f64.powf(-12.0 * i as f64 / (d - 1) as f64)).collect();
            check_every_solver(&with_spectrum(&spread), d);
        }
        check_every_solver(&vec![0.0; 36 * 36], 36);
    }
}

//! Singular-value spectra of weight matrices (issue 3).
//!
//! Two measurements, both on the tensor's own device and accumulated in fp32 (fp64 for fp64 weights),
//! whatever the storage dtype (bf16 and fp16 weights are widened first):
//!
//! - [`Estimator`]: the top-k singular values by **block Krylov iteration with Rayleigh–Ritz**
//!   (Musco & Musco, "Randomized block Krylov methods for stronger and faster approximate SVD",
//!   NeurIPS 2015). With `X` a block of `b = k + oversample` columns, the search space after `q`
//!   iterations is `span[X, (AᵀA)X, …, (AᵀA)^{q−1} X]`; the Ritz values of `AᵀA` on it are the estimates.
//!   Plain power (or subspace) iteration converges like `(σ_{b+1}/σ_1)^{2q}`, hopeless on a Gaussian
//!   matrix whose top spectrum has no gap (docs/design.md §6.2); the Krylov space converges like a Chebyshev
//!   polynomial, `exp(−4q·sqrt(gap))`, which is what makes cold starts reach 1e-3 in tens of
//!   iterations. The estimator keeps the right singular vectors of its last answer and starts the next
//!   call from them, so a matrix that moved a little (one optimizer step or a few) converges in two.
//!   Ritz values never exceed the true singular values (Cauchy interlacing), so `sigma_max` is a lower
//!   bound that tightens with every iteration.
//! - [`full_spectrum`]: every singular value (no vectors), with quantiles, stable rank, Frobenius norm
//!   and the entropy effective rank. On CUDA: `linalg_svdvals`. On CPU: the eigenvalues of the smaller
//!   Gram matrix in float64, because tch's `linalg_svdvals` always passes a driver string, which
//!   libtorch refuses on CPU (docs/design.md §5.3), and `svd(_, false)` allocates zero-filled m×m and n×n
//!   factors (8 GB for a 32000-row embedding).
//!
//! # Which matrix a tensor is
//! A 2-D tensor is itself. A tensor of higher rank is flattened as the classifier defines fan-in
//! ([`MatrixLayout`]): the columns are the fan-in dimension together with the non-width dimensions
//! that follow it (a conv kernel `[out, in, kh, kw]` becomes `[out, in·kh·kw]`), the rows are every
//! other dimension (stacked experts `[E, out, in]` become `[E·out, in]`). Singular values do not
//! depend on which side is rows.

use gainguard_daemon::events::SpectrumQuantiles;
use tch::{Device, Kind, Tensor};

use crate::plan::ParamDecision;

#[derive(Debug, thiserror::Error)]
pub enum SpectraError {
    #[error("tensor of shape {0:?} is not a matrix: it needs at least 2 dimensions, all non-empty")]
    NotAMatrix(Vec<i64>),
    #[error("tensor of shape {0:?} holds NaN or ±Inf")]
    NonFinite(Vec<i64>),
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
}

/// How a tensor of rank ≥ 2 is read as a matrix: which dimensions form the columns (fan-in side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatrixLayout {
    /// Dimensions that form the columns, in order; every other dimension forms the rows.
    pub col_dims: Vec<usize>,
}

impl MatrixLayout {
    /// PyTorch's own convention, for tensors with no base shape (e.g. `gainguard inspect`): rows are
    /// dimension 0, columns everything after it (`t.reshape([shape[0], -1])`).
    pub fn leading_rows(rank: usize) -> MatrixLayout {
        MatrixLayout { col_dims: (1..rank.max(2)).collect() }
    }

    /// The classifier's fan-in: the fan-in dimension (dimension 1 when the decision has none) plus the
    /// dimensions after it that are not width dimensions (kernel dimensions). None below rank 2.
    pub fn for_decision(d: &ParamDecision) -> Option<MatrixLayout> {
        let rank = d.shape.len();
        if rank < 2 {
            return None;
        }
        let fan_in = d.fan_in_dim.filter(|&f| f < rank).unwrap_or(1);
        let is_width = |i: usize| d.base_shape.get(i).map_or(false, |&b| b != d.shape[i]);
        let mut col_dims = vec![fan_in];
        col_dims.extend((fan_in + 1..rank).take_while(|&i| !is_width(i)));
        Some(MatrixLayout { col_dims })
    }

    /// `(rows, cols)` of the matrix a tensor of this shape becomes.
    pub fn matrix_shape(&self, shape: &[i64]) -> (i64, i64) {
        let cols: i64 = self.col_dims.iter().map(|&d| shape[d]).product();
        let rows: i64 = (0..shape.len()).filter(|d| !self.col_dims.contains(d)).map(|d| shape[d]).product();
        (rows, cols)
    }

    /// The tensor as a `[rows, cols]` matrix (a view when the permutation allows, else a copy).
    pub fn apply(&self, t: &Tensor) -> Result<Tensor, SpectraError> {
        let shape = t.size();
        if shape.len() < 2 || shape.iter().any(|&d| d <= 0) || self.col_dims.iter().any(|&d| d >= shape.len()) {
            return Err(SpectraError::NotAMatrix(shape));
        }
        if shape.len() == 2 && self.col_dims == [1] {
            return Ok(t.shallow_clone());
        }
        let mut perm: Vec<i64> = (0..shape.len()).filter(|d| !self.col_dims.contains(d)).map(|d| d as i64).collect();
        perm.extend(self.col_dims.iter().map(|&d| d as i64));
        let (rows, cols) = self.matrix_shape(&shape);
        Ok(t.f_permute(perm.as_slice())?.f_reshape([rows, cols])?)
    }
}

/// True when every element is finite. One reduction on the tensor's device.
pub fn all_finite(t: &Tensor) -> bool {
    if t.numel() == 0 {
        return true;
    }
    t.isfinite().all().int64_value(&[]) != 0
}

/// The compute dtype: fp64 stays fp64, everything else is widened to fp32.
fn compute_kind(t: &Tensor) -> Kind {
    if t.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Settings of the top-k estimator.
#[derive(Clone, Debug, PartialEq)]
pub struct EstimatorConfig {
    /// Singular values reported (`top_k`); the first is sigma_max.
    pub k: usize,
    /// Extra columns in the block; they speed convergence and absorb a near-degenerate k-th value.
    pub oversample: usize,
    /// Stop when `|sigma_max − previous| ≤ tol · sigma_max` between two iterations.
    pub tol: f64,
    /// Iteration cap; an estimate that hits it reports `converged: false`.
    pub max_iters: u32,
    /// Matrices whose smaller side is at most this are solved exactly (eigenvalues of the Gram matrix).
    pub exact_below: i64,
    /// Seed of the random start block. The estimator has its own generator: sampling never moves the
    /// trainer's libtorch RNG.
    pub seed: u64,
}

impl Default for EstimatorConfig {
    fn default() -> Self {
        EstimatorConfig { k: 4, oversample: 4, tol: 1e-5, max_iters: 40, exact_below: 32, seed: 0x5eed }
    }
}

/// The top singular values of one matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    pub sigma_max: f64,
    /// Descending; `min(k, rows, cols)` values.
    pub top_k: Vec<f64>,
    /// Block iterations (products with A and Aᵀ) the estimate took; 0 for an all-zero matrix.
    pub iterations: u32,
    pub converged: bool,
}

/// Per-parameter state of the top-k estimator: the last right singular vectors, for warm starts.
pub struct Estimator {
    config: EstimatorConfig,
    /// `[n', b]` basis in the space of the smaller side, on the matrix's device.
    warm: Option<Tensor>,
    rng: u64,
}

impl Estimator {
    pub fn new(config: EstimatorConfig) -> Estimator {
        let rng = config.seed ^ 0x9e37_79b9_7f4a_7c15;
        Estimator { config, warm: None, rng }
    }

    pub fn config(&self) -> &EstimatorConfig {
        &self.config
    }

    /// Forgets the warm start (after non-finite weights, or a shape change).
    pub fn reset(&mut self) {
        self.warm = None;
    }

    /// Whether the next call starts from the previous answer's singular vectors.
    pub fn is_warm(&self) -> bool {
        self.warm.is_some()
    }

    /// Top-k singular values of a 2-D tensor (use [`MatrixLayout::apply`] first for higher ranks).
    pub fn estimate(&mut self, a: &Tensor) -> Result<Estimate, SpectraError> {
        tch::no_grad(|| self.estimate_inner(a))
    }

    fn estimate_inner(&mut self, a: &Tensor) -> Result<Estimate, SpectraError> {
        let shape = a.size();
        if shape.len() != 2 || shape[0] <= 0 || shape[1] <= 0 {
            return Err(SpectraError::NotAMatrix(shape));
        }
        if !all_finite(a) {
            self.warm = None;
            return Err(SpectraError::NonFinite(shape));
        }
        let kind = compute_kind(a);
        let a = a.f_to_kind(kind)?.f_detach()?;
        // Work in the space of the smaller side: `op` is m' × n' with n' ≤ m'.
        let op = if shape[1] <= shape[0] { a } else { a.f_tr()? };
        let (_, n) = (op.size()[0], op.size()[1]);
        let k = self.config.k.max(1).min(n as usize);
        let b = (self.config.k.max(1) + self.config.oversample).min(n as usize) as i64;
        let fro2 = op.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
        if fro2 == 0.0 {
            return Ok(Estimate { sigma_max: 0.0, top_k: vec![0.0; k], iterations: 0, converged: true });
        }
        if n <= self.config.exact_below.max(b) {
            let sv = gram_singular_values(&op)?;
            self.warm = None;
            let top_k: Vec<f64> = sv.iter().take(k).copied().collect();
            return Ok(Estimate { sigma_max: top_k[0], top_k, iterations: 1, converged: true });
        }
        let device = op.device();
        let start = match self.warm.take() {
            Some(w) if w.size() == [n, b] && w.device() == device && w.kind() == kind => w,
            _ => self.random_block(n, b, kind, device)?,
        };
        let (mut q, _) = Tensor::f_linalg_qr(&start, "reduced")?;

        // Basis blocks Q_j, their images B_j = op·Q_j, and the f64 Gram matrices M = QᵀQ, G = BᵀB of
        // the whole basis, grown one block at a time. M stays ≈ I; carrying it makes the Ritz step
        // correct even where a rank-deficient block left a column that is not orthogonal.
        // ceil(n / b) blocks span the whole space: the last one is narrowed to what is left, so an
        // estimate that runs out of directions is exact rather than stopping a few columns short.
        let max_iters = self.config.max_iters.max(1).min(((n + b - 1) / b) as u32);
        let m_rows = op.size()[0];
        let width = (b * max_iters as i64).min(n);
        let q_buf = Tensor::f_empty([n, width], (kind, device))?;
        let b_buf = Tensor::f_empty([m_rows, width], (kind, device))?;
        let mut m_all = Tensor::zeros([0, 0], (Kind::Double, Device::Cpu));
        let mut g_all = Tensor::zeros([0, 0], (Kind::Double, Device::Cpu));
        let mut prev: Option<f64> = None;
        let mut result = None;
        let mut dim = 0;
        for it in 1..=max_iters {
            let bw = q.size()[1];
            let bj = op.f_matmul(&q)?;
            q_buf.f_narrow(1, dim, bw)?.f_copy_(&q)?;
            b_buf.f_narrow(1, dim, bw)?.f_copy_(&bj)?;
            dim += bw;
            let q_all = q_buf.f_narrow(1, 0, dim)?;
            let b_all = b_buf.f_narrow(1, 0, dim)?;
            // New column blocks [QᵀQ_j ; BᵀB_j], in one device→host transfer.
            let cols = Tensor::f_cat(&[q_all.f_tr()?.f_matmul(&q)?, b_all.f_tr()?.f_matmul(&bj)?], 0)?
                .f_to_kind(Kind::Double)?
                .f_to_device(Device::Cpu)?;
            m_all = grow_symmetric(&m_all, &cols.f_narrow(0, 0, dim)?)?;
            g_all = grow_symmetric(&g_all, &cols.f_narrow(0, dim, dim)?)?;
            let (sigmas, coeffs) = rayleigh_ritz(&m_all, &g_all, b)?;
            let sigma = sigmas[0];
            let exhausted = dim >= n;
            let converged = prev.is_some_and(|p| (sigma - p).abs() <= self.config.tol * sigma) || exhausted;
            if converged || it == max_iters {
                // Right singular vectors of the top b Ritz values, kept for the next call.
                if coeffs.size()[1] == b {
                    self.warm = Some(q_all.f_matmul(&coeffs.f_to_kind(kind)?.f_to_device(device)?)?);
                }
                let top_k = sigmas.iter().take(k).copied().collect();
                result = Some(Estimate { sigma_max: sigma, top_k, iterations: it, converged });
                break;
            }
            prev = Some(sigma);
            // Next Krylov block: AᵀA Q_j = opᵀ B_j, orthogonalized against the basis twice (CGS2),
            // no wider than the directions the basis does not span yet.
            let mut w = op.f_tr()?.f_matmul(&bj)?;
            for _ in 0..2 {
                w = w.f_sub(&q_all.f_matmul(&q_all.f_tr()?.f_matmul(&w)?)?)?;
            }
            let w = w.f_narrow(1, 0, bw.min(n - dim))?;
            q = Tensor::f_linalg_qr(&w, "reduced")?.0;
        }
        Ok(result.expect("the loop always sets a result on its last iteration"))
    }

    /// A Gaussian `[n, b]` block from the estimator's own generator (splitmix64 + Box–Muller).
    fn random_block(&mut self, n: i64, b: i64, kind: Kind, device: Device) -> Result<Tensor, SpectraError> {
        let len = (n * b) as usize;
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            let u1 = (splitmix64(&mut self.rng) >> 11) as f64 / (1u64 << 53) as f64;
            let u2 = (splitmix64(&mut self.rng) >> 11) as f64 / (1u64 << 53) as f64;
            let r = (-2.0 * (1.0 - u1).ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * u2;
            v.push(r * t.cos());
            v.push(r * t.sin());
        }
        v.truncate(len);
        Ok(Tensor::from_slice(&v).f_view([n, b])?.f_to_kind(kind)?.f_to_device(device)?)
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `[[old, c_top], [c_topᵀ, c_new]]` from the new columns `c` (`[dim, b]`, the last b rows being the
/// new block's own entries).
fn grow_symmetric(old: &Tensor, c: &Tensor) -> Result<Tensor, SpectraError> {
    let dim = c.size()[0];
    let b = c.size()[1];
    let prev = dim - b;
    let top = c.f_narrow(0, 0, prev)?;
    let corner = c.f_narrow(0, prev, b)?;
    let corner = (&corner + corner.f_tr()?) * 0.5;
    let upper = Tensor::f_cat(&[old.shallow_clone(), top.shallow_clone()], 1)?;
    let lower = Tensor::f_cat(&[top.f_tr()?, corner], 1)?;
    Ok(Tensor::f_cat(&[upper, lower], 0)?)
}

/// Ritz values of `AᵀA` on a basis with Gram matrix `m` and image Gram `g` (both f64, CPU):
/// the generalized problem `g y = λ m y`, solved by whitening `m` on its well-conditioned part.
/// Returns the singular values (descending) and the coefficients `[dim, ≤b]` of the top Ritz vectors.
fn rayleigh_ritz(m: &Tensor, g: &Tensor, b: i64) -> Result<(Vec<f64>, Tensor), SpectraError> {
    let (mu, u) = m.f_linalg_eigh("L")?;
    let mu_v: Vec<f64> = Vec::<f64>::try_from(&mu)?;
    let mu_max = mu_v.iter().cloned().fold(0.0, f64::max);
    // fp32 bases are orthonormal to ~1e-7; an eigenvalue of QᵀQ far below 1 marks a direction the
    // basis spans only by rounding, whose Rayleigh quotient rounding would inflate.
    let keep: Vec<i64> = mu_v.iter().enumerate().filter(|(_, &x)| x > 0.5 * mu_max).map(|(i, _)| i as i64).collect();
    let idx = Tensor::from_slice(&keep);
    let t = u.f_index_select(1, &idx)?.f_div(&mu.f_index_select(0, &idx)?.f_sqrt()?)?;
    let h = t.f_tr()?.f_matmul(g)?.f_matmul(&t)?;
    let h = (&h + h.f_tr()?) * 0.5;
    let (lam, z) = h.f_linalg_eigh("L")?;
    let r = lam.size()[0];
    let take = b.min(r);
    let lam = lam.f_flip([0])?;
    let z = z.f_flip([1])?.f_narrow(1, 0, take)?;
    let sigmas: Vec<f64> = Vec::<f64>::try_from(&lam)?.into_iter().map(|l| l.max(0.0).sqrt()).collect();
    let coeffs = t.f_matmul(&z)?;
    Ok((sigmas, coeffs))
}

/// Singular values, descending, from the eigenvalues of the smaller Gram matrix in float64.
fn gram_singular_values(a: &Tensor) -> Result<Vec<f64>, SpectraError> {
    let a = a.f_to_kind(Kind::Double)?;
    let (r, c) = (a.size()[0], a.size()[1]);
    let gram = if c <= r { a.f_tr()?.f_matmul(&a)? } else { a.f_matmul(&a.f_tr()?)? };
    let ev = gram.f_linalg_eigvalsh("L")?.f_to_device(Device::Cpu)?;
    let mut sv: Vec<f64> = Vec::<f64>::try_from(&ev)?.into_iter().map(|l| l.max(0.0).sqrt()).collect();
    sv.reverse();
    Ok(sv)
}

/// Every singular value of a matrix and the statistics the dashboards show.
#[derive(Clone, Debug, PartialEq)]
pub struct FullSpectrum {
    /// Descending, `min(rows, cols)` values.
    pub singular_values: Vec<f64>,
    pub sigma_max: f64,
    /// `‖W‖_F = sqrt(Σ σ_i²)`.
    pub frobenius_norm: f64,
    /// `‖W‖_F² / σ_max²`; 0 for the zero matrix.
    pub stable_rank: f64,
    /// `exp(H(p))` with `p_i = σ_i / Σσ` (Roy & Vetterli 2007); 0 for the zero matrix.
    pub effective_rank: f64,
    /// Quantiles of the singular values, linear interpolation between order statistics (NumPy's default).
    pub quantiles: SpectrumQuantiles,
}

/// How the full spectrum is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FullPrecision {
    /// fp32 on CUDA (`linalg_svdvals`), float64 Gram eigenvalues on CPU.
    Device,
    /// float64 everywhere: LAPACK's SVD on CPU (Gram eigenvalues where its zero-filled factors would
    /// exceed 512 MiB), `linalg_svdvals` in float64 on CUDA.
    Double,
}

/// All singular values of a 2-D tensor (flatten higher ranks with [`MatrixLayout::apply`] first).
pub fn full_spectrum(a: &Tensor, precision: FullPrecision) -> Result<FullSpectrum, SpectraError> {
    tch::no_grad(|| {
        let shape = a.size();
        if shape.len() != 2 || shape[0] <= 0 || shape[1] <= 0 {
            return Err(SpectraError::NotAMatrix(shape));
        }
        if !all_finite(a) {
            return Err(SpectraError::NonFinite(shape));
        }
        let (m, n) = (shape[0], shape[1]);
        let sv = match a.device() {
            // `svd(_, false)` still allocates zero-filled m×m and n×n factors; 512 MiB of them at most.
            Device::Cpu if precision == FullPrecision::Double && (m * m + n * n) * 8 <= 512 << 20 => {
                let (_, s, _) = a.f_to_kind(Kind::Double)?.f_svd(true, false)?;
                Vec::<f64>::try_from(&s)?
            }
            Device::Cpu => gram_singular_values(a)?,
            _ => {
                let kind = if precision == FullPrecision::Double { Kind::Double } else { compute_kind(a) };
                let x = a.f_to_kind(kind)?;
                // gesvdj is the fast CUDA driver; gesvd is the fallback when it does not converge.
                let mut s = Tensor::f_linalg_svdvals(&x, "gesvdj")?;
                if !all_finite(&s) {
                    s = Tensor::f_linalg_svdvals(&x, "gesvd")?;
                }
                Vec::<f64>::try_from(&s.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?)?
            }
        };
        Ok(spectrum_statistics(sv))
    })
}

/// Statistics of a descending list of singular values.
pub fn spectrum_statistics(mut sv: Vec<f64>) -> FullSpectrum {
    sv.sort_by(|a, b| b.total_cmp(a));
    let sigma_max = sv.first().copied().unwrap_or(0.0);
    let fro2: f64 = sv.iter().map(|s| s * s).sum();
    let stable_rank = if sigma_max > 0.0 { fro2 / (sigma_max * sigma_max) } else { 0.0 };
    let total: f64 = sv.iter().sum();
    let effective_rank = if total > 0.0 {
        let h: f64 = sv.iter().map(|s| s / total).filter(|&p| p > 0.0).map(|p| -p * p.ln()).sum();
        h.exp()
    } else {
        0.0
    };
    let ascending: Vec<f64> = sv.iter().rev().copied().collect();
    let q = |p: f64| quantile(&ascending, p);
    FullSpectrum {
        quantiles: SpectrumQuantiles { p10: q(0.10), p50: q(0.50), p90: q(0.90), p99: q(0.99) },
        singular_values: sv,
        sigma_max,
        frobenius_norm: fro2.sqrt(),
        stable_rank,
        effective_rank,
    }
}

/// Quantile `p` of ascending values, interpolating linearly at position `p·(n−1)`.
fn quantile(ascending: &[f64], p: f64) -> f64 {
    if ascending.is_empty() {
        return 0.0;
    }
    let pos = p * (ascending.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    ascending[lo] + (ascending[hi] - ascending[lo]) * (pos - lo as f64)
}

/// Elements converted to float64 at a time by [`frobenius_norm`]: at most 256 MiB of float64 temporaries
/// (a chunk's copy and its square).
const NORM_CHUNK: i64 = 1 << 24;

/// `‖W‖_F` of any tensor, squared and summed in float64 on the tensor's device. Squaring in float32
/// first would round every square (up to 3e-8 relative in the norm when the roundings do not cancel);
/// converting in chunks bounds the float64 copies of a large weight.
pub fn frobenius_norm(t: &Tensor) -> f64 {
    tch::no_grad(|| {
        let flat = t.reshape([-1]);
        let sum = flat
            .split(NORM_CHUNK, 0)
            .iter()
            .map(|c| c.to_kind(Kind::Double).square().sum(Kind::Double))
            .fold(Tensor::zeros([], (Kind::Double, t.device())), |acc, s| acc + s);
        sum.double_value(&[]).sqrt()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frobenius_norm_squares_in_float64() {
        // (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 rounds to 1 + 2^-11 in float32, the same way for every
        // element, so a float32 square would be 3e-8 low; in float64 it is exact.
        let x = 1.0 + 2f64.powi(-12);
        let n = 3000;
        let t = Tensor::full([n], x, (Kind::Float, Device::Cpu));
        let want = (n as f64).sqrt() * x;
        let got = frobenius_norm(&t);
        assert!((got - want).abs() / want <= 1e-15, "{got} vs {want}");
        // Several chunks and a 2-D, non-contiguous view give the same norm as one pass.
        let big = Tensor::randn([3, NORM_CHUNK / 2 + 7], (Kind::Float, Device::Cpu)).transpose(0, 1);
        let one = big.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]).sqrt();
        assert!((frobenius_norm(&big) - one).abs() / one <= 1e-13);
    }

    #[test]
    fn quantiles_interpolate_like_numpy() {
        // numpy.quantile([1, 2, 3, 4, 5], [0.1, 0.5, 0.9]) = [1.4, 3.0, 4.6]
        let s = spectrum_statistics(vec![5.0, 4.0, 3.0, 2.0, 1.0]);
        assert!((s.quantiles.p10 - 1.4).abs() < 1e-12 && (s.quantiles.p50 - 3.0).abs() < 1e-12 && (s.quantiles.p90 - 4.6).abs() < 1e-12);
        assert!((s.stable_rank - 55.0 / 25.0).abs() < 1e-12);
    }

    #[test]
    fn effective_rank_of_equal_singular_values_is_their_count() {
        let s = spectrum_statistics(vec![2.0; 7]);
        assert!((s.effective_rank - 7.0).abs() < 1e-12);
    }

    #[test]
    fn a_conv_kernel_keeps_its_kernel_dims_on_the_fan_in_side() {
        let d = ParamDecision {
            name: "conv".into(),
            shape: vec![64, 32, 3, 3],
            base_shape: vec![16, 8, 3, 3],
            class: crate::ParamClass::MatrixLike,
            layer: None,
            fan_in_dim: Some(1),
            width_multiplier: 4.0,
            lr: 1e-3,
            weight_decay: 0.1,
            tied_to: None,
            width_dims: vec![0, 1],
            role: None,
        };
        let l = MatrixLayout::for_decision(&d).unwrap();
        assert_eq!(l.col_dims, vec![1, 2, 3]);
        assert_eq!(l.matrix_shape(&d.shape), (64, 32 * 9));
        let experts = ParamDecision { shape: vec![8, 64, 32], base_shape: vec![8, 16, 8], fan_in_dim: Some(2), ..d };
        assert_eq!(MatrixLayout::for_decision(&experts).unwrap().matrix_shape(&experts.shape), (8 * 64, 32));
    }
}

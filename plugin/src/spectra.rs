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
//!   call from them, so a matrix that moved a little (one optimizer step or a few) converges in two. A warm
//!   start iterates with the top k of them only (no oversampling: they are already close to the new top k),
//!   which halves the arithmetic of the compute-bound warm path.
//!   Ritz values never exceed the true singular values (Cauchy interlacing), so `sigma_max` is a lower
//!   bound that tightens with every iteration. On the CPU each iteration is one fused pass over W in
//!   memory (`spectra/pass.rs`: `A·Q` and `Aᵀ·A·Q` from one read, the first pass also summing `‖W‖_F` in
//!   float64, which doubles as the finiteness check); the small float64 algebra of the Rayleigh–Ritz step
//!   runs on the host (`spectra/dense.rs`). On a GPU the products are libtorch's.
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

mod dense;
mod pass;

use std::cell::RefCell;
use std::sync::OnceLock;

use gainguard_protocol::events::SpectrumQuantiles;
use tch::{Device, Kind, Tensor};

use pass::{Elem, Flavour, HostMatrix, Mode, PassRequest, Workspace};

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

/// Threads of a pass over a CPU matrix: `configured`, or when 0 libtorch's intra-op setting for the
/// calling thread (an OpenMP per-thread value: 1 in the sampler's worker, see
/// `SamplerConfig::worker_threads`).
fn host_threads(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        tch::get_num_threads().max(1) as usize
    }
}

fn flavour() -> Flavour {
    static FLAVOUR: OnceLock<Flavour> = OnceLock::new();
    *FLAVOUR.get_or_init(Flavour::detect)
}

/// True when every element is finite. On the CPU one read without temporaries (the float64 sum of
/// squares is finite exactly when every element is, short of float64 overflow, which is checked
/// element-wise); elsewhere one reduction on the tensor's device.
pub fn all_finite(t: &Tensor) -> bool {
    if t.numel() == 0 {
        return true;
    }
    if let Some(h) = HostMatrix::flat(t) {
        if pass::sum_squares(&h, host_threads(0)).is_finite() {
            return true;
        }
        if h.elem != Elem::F64 {
            return false;
        }
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
    /// Extra columns in a cold start's block; they speed convergence and absorb a near-degenerate k-th
    /// value. A warm start uses k columns.
    pub oversample: usize,
    /// Stop when `|sigma_max − previous| ≤ tol · sigma_max` between two iterations (every top-k value,
    /// each relative to itself, with [`EstimatorConfig::tol_top_k`]).
    pub tol: f64,
    /// Iteration cap; an estimate that hits it reports `converged: false`.
    pub max_iters: u32,
    /// Matrices whose smaller side is at most this are solved exactly (eigenvalues of the Gram matrix).
    pub exact_below: i64,
    /// Seed of the random start block. The estimator has its own generator: sampling never moves the
    /// trainer's libtorch RNG.
    pub seed: u64,
    /// Threads of a pass over a CPU matrix; 0 takes libtorch's intra-op setting of the calling thread.
    pub threads: usize,
    /// Apply `tol` to every reported value, not only sigma_max (`gainguard inspect` does; the sampler
    /// exports top_k but pages on sigma_max).
    pub tol_top_k: bool,
    /// Keep the answer's singular vectors to start the next call from (the sampler does). A one-off
    /// estimate (`gainguard inspect`) skips them: after a cold start they cost a full eigensolve of the
    /// projected matrix, side up to a few hundred.
    pub warm_start: bool,
}

impl Default for EstimatorConfig {
    fn default() -> Self {
        EstimatorConfig { k: 4, oversample: 4, tol: 1e-5, max_iters: 40, exact_below: 32, seed: 0x5eed, threads: 0, tol_top_k: false, warm_start: true }
    }
}

/// The top singular values of one matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    pub sigma_max: f64,
    /// Descending; `min(k, rows, cols)` values.
    pub top_k: Vec<f64>,
    /// `‖W‖_F`, summed in float64 during the estimate's first pass over the matrix.
    pub frobenius_norm: f64,
    /// Block iterations (passes with a new block) the estimate took; 0 for an all-zero matrix.
    pub iterations: u32,
    pub converged: bool,
}

/// What a warm start is valid for: the same operand shape, side and device.
#[derive(Clone, Debug, PartialEq)]
struct WarmKey {
    device: Device,
    rows: usize,
    cols: usize,
    double: bool,
}

struct Warm {
    key: WarmKey,
    /// `cols × width`, column-major, orthonormal.
    vectors: Vec<f64>,
    width: usize,
}

/// Per-parameter state of the top-k estimator: the last right singular vectors, for warm starts.
pub struct Estimator {
    config: EstimatorConfig,
    warm: Option<Warm>,
    rng: u64,
}

/// The estimator's buffers, one set per thread (the sampler's worker estimates every parameter on one
/// thread), kept from call to call so that a warm estimate allocates nothing once they have grown.
#[derive(Default)]
struct Scratch {
    /// The basis, `n × dim`, column-major.
    q: Vec<f64>,
    /// `AᵀA` times each basis block, same layout.
    w: Vec<f64>,
    /// The projected matrix `QᵀAᵀAQ`, side `ld`.
    h: Vec<f64>,
    /// Its leading `dim × dim` part, compact, for the eigensolver.
    h_dim: Vec<f64>,
    bb: Vec<f64>,
    block: Vec<f64>,
    ws32: Option<Workspace<f32>>,
    ws64: Option<Workspace<f64>>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// The matrix a pass reads: in host memory (read in place by [`pass`]), or a device tensor (libtorch
/// products; `b` keeps `A·Q` between a forward and a backward pass).
enum Operand<'a> {
    Host(HostMatrix<'a>),
    Device { op: Tensor, b: Option<Tensor> },
}

impl Operand<'_> {
    /// `(rows, cols)`; the Krylov space lives in the columns' space.
    fn dims(&self) -> (usize, usize) {
        match self {
            Operand::Host(h) => (h.rows, h.cols),
            Operand::Device { op, .. } => (op.size()[0] as usize, op.size()[1] as usize),
        }
    }

    fn pass(
        &mut self,
        scratch_ws32: &mut Option<Workspace<f32>>,
        scratch_ws64: &mut Option<Workspace<f64>>,
        req: PassRequest,
        w_out: &mut [f64],
        bb_out: &mut [f64],
    ) -> Result<f64, SpectraError> {
        let PassRequest { q, width, mode, norm, .. } = req;
        match self {
            Operand::Host(a) if a.elem == Elem::F64 => {
                let ws = scratch_ws64.get_or_insert_with(|| Workspace::new(flavour()));
                Ok(ws.pass(a, req, w_out, bb_out))
            }
            Operand::Host(a) => {
                let ws = scratch_ws32.get_or_insert_with(|| Workspace::new(flavour()));
                Ok(ws.pass(a, req, w_out, bb_out))
            }
            Operand::Device { op, b } => {
                let n = op.size()[1];
                let fro2 = if norm { frobenius_norm(op).powi(2) } else { f64::NAN };
                if mode != Mode::Backward {
                    let qt = Tensor::f_from_slice(&q[..n as usize * width])?.f_view([width as i64, n])?.f_to_kind(op.kind())?.f_to_device(op.device())?;
                    let bj = op.f_matmul(&qt.f_tr()?)?;
                    let gram = bj.f_tr()?.f_matmul(&bj)?.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?.f_contiguous()?;
                    bb_out[..width * width].copy_from_slice(&Vec::<f64>::try_from(&gram.f_view([-1])?)?);
                    *b = Some(bj);
                }
                if mode != Mode::Forward {
                    let bj = b.as_ref().expect("a backward pass follows a forward pass");
                    // (Aᵀ·B)ᵀ = Bᵀ·A, row-major `width × n`: the column-major layout of `n × width`.
                    let wt = bj.f_tr()?.f_matmul(op)?.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?.f_contiguous()?;
                    w_out[..n as usize * width].copy_from_slice(&Vec::<f64>::try_from(&wt.f_view([-1])?)?);
                }
                Ok(fro2)
            }
        }
    }
}

/// Whether a sum of squares from a first pass means NaN/Inf in `a`: float32, bf16 and f16 squares
/// cannot overflow a float64 sum, float64 ones can, so those are checked element-wise.
fn sum_means_nonfinite(fro2: f64, a: &Tensor) -> bool {
    !fro2.is_finite() && (a.kind() != Kind::Double || !all_finite(a))
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

    /// One block-Krylov (Lanczos on AᵀA) run: set up the operand, grow the basis one fused pass at a time,
    /// solve the small projected problem after each and stop at convergence. Kept as one function (issue 15
    /// allows it for one algorithm): the loop's state (basis, projected matrix, block width, previous Ritz
    /// values) is shared by every step, and split functions would pass all of it back and forth.
    fn estimate_inner(&mut self, a: &Tensor) -> Result<Estimate, SpectraError> {
        let shape = a.size();
        if shape.len() != 2 || shape[0] <= 0 || shape[1] <= 0 {
            return Err(SpectraError::NotAMatrix(shape));
        }
        let threads = host_threads(self.config.threads);
        let small = shape[0].min(shape[1]);
        let k = self.config.k.max(1).min(small as usize);
        let block = (self.config.k.max(1) + self.config.oversample).min(small as usize);
        if small <= self.config.exact_below.max(block as i64) {
            return self.exact(a, k, threads);
        }
        // A CPU copy for the layouts and dtypes the pass does not read in place (strided views, ints).
        let owned: Tensor;
        let mut operand = match HostMatrix::of_tensor(a) {
            Some(h) => Operand::Host(h),
            None if a.device() == Device::Cpu => {
                owned = a.f_to_kind(compute_kind(a))?.f_contiguous()?;
                Operand::Host(HostMatrix::of_tensor(&owned).ok_or_else(|| SpectraError::NotAMatrix(shape.clone()))?)
            }
            None => {
                // On a device the products are libtorch's; there the smaller side is the Krylov side.
                let x = a.f_to_kind(compute_kind(a))?.f_detach()?;
                Operand::Device { op: if shape[1] <= shape[0] { x } else { x.f_tr()? }, b: None }
            }
        };
        let (m, n) = operand.dims();
        let key = WarmKey { device: a.device(), rows: m, cols: n, double: a.kind() == Kind::Double };
        // A warm start needs no oversampling: the last answer's top k Ritz vectors are already close to the
        // new top k, so its block is k columns, half the arithmetic per pass of a cold block of k + oversample
        // (the warm path is compute-bound: issue 18's floor).
        let warm_width = k.min(n);
        let warm = self.warm.take().filter(|w| w.key == key && w.width == warm_width);
        let b = if warm.is_some() { warm_width } else { block.min(n) };
        // The Krylov space of AᵀA beyond the first block lies in A's row space: rank ≤ min(m, n). With
        // more columns than rows (a wide matrix read row-major) the basis is complete at m + b vectors.
        let d_max = if m >= n { n } else { n.min(m + b) };
        let max_iters = (self.config.max_iters.max(1) as usize).min(d_max.div_ceil(b));
        let warm_started = warm.is_some();
        let tol = self.config.tol;
        let check = if self.config.tol_top_k { k } else { 1 };
        let keep_warm = self.config.warm_start;
        let rng = &mut self.rng;
        let outcome = SCRATCH.with(|cell| -> Result<Result<(Estimate, Option<Vec<f64>>), SpectraError>, SpectraError> {
            let mut guard = cell.borrow_mut();
            let Scratch { q, w, h, h_dim, bb, block: next_block, ws32, ws64 } = &mut *guard;
            q.clear();
            match warm {
                // Ritz vectors of the last answer: orthonormal already, used as they are.
                Some(wv) => q.extend_from_slice(&wv.vectors),
                None => {
                    q.extend((0..n * b).map(|_| gauss(rng)));
                    dense::orthonormalize(&[], 0, q, b, n, &mut || gauss(rng));
                }
            }
            w.clear();
            let ld = (b * max_iters).min(d_max);
            if h.len() < ld * ld {
                h.resize(ld * ld, 0.0);
            }
            let mut dim = 0;
            let mut width = b;
            let mut prev: Vec<f64> = Vec::new();
            let mut fro2 = f64::NAN;
            for it in 1..=max_iters {
                let mode = if warm_started && it == 2 { Mode::Forward } else { Mode::Full };
                bb.resize(width * width, 0.0);
                w.resize((dim + width) * n, 0.0);
                let req = PassRequest { q: &q[dim * n..(dim + width) * n], width, mode, norm: it == 1, threads };
                let s = operand.pass(ws32, ws64, req, &mut w[dim * n..(dim + width) * n], bb)?;
                if it == 1 {
                    fro2 = s;
                    if sum_means_nonfinite(fro2, a) {
                        return Ok(Err(SpectraError::NonFinite(shape.clone())));
                    }
                    if fro2 == 0.0 {
                        let e = Estimate { sigma_max: 0.0, top_k: vec![0.0; k], frobenius_norm: 0.0, iterations: 0, converged: true };
                        return Ok(Ok((e, None)));
                    }
                }
                // New entries of QᵀAᵀAQ: W_iᵀ Q_j against every earlier block, BᵀB on the diagonal block.
                for c in 0..width {
                    let qc = &q[(dim + c) * n..(dim + c + 1) * n];
                    for i in 0..dim {
                        let v = dense::dot(&w[i * n..(i + 1) * n], qc);
                        h[(dim + c) * ld + i] = v;
                        h[i * ld + dim + c] = v;
                    }
                    for c2 in 0..width {
                        h[(dim + c) * ld + dim + c2] = bb[c * width + c2];
                    }
                }
                dim += width;
                h_dim.clear();
                for col in 0..dim {
                    h_dim.extend_from_slice(&h[col * ld..col * ld + dim]);
                }
                // Small projections get their vectors at once (Jacobi gives them nearly free), large
                // ones only when the estimate stops.
                let (theta, vectors_now) = if dim <= dense::JACOBI_MAX {
                    let (values, z) = dense::symmetric_eigen(h_dim, dim);
                    (values, Some(z))
                } else {
                    (dense::symmetric_eigenvalues(h_dim, dim), None)
                };
                let sigmas: Vec<f64> = theta.iter().take(b).map(|l| l.max(0.0).sqrt()).collect();
                let floor = 1e-6 * sigmas[0];
                let converged = !prev.is_empty() && (0..check.min(sigmas.len())).all(|i| (sigmas[i] - prev[i]).abs() <= tol * sigmas[i].max(floor));
                let exhausted = dim >= d_max;
                if converged || exhausted || it == max_iters {
                    // The top k Ritz vectors, Q·z_i: the next call's warm block.
                    let vectors = (keep_warm && dim >= warm_width).then(|| {
                        let z = vectors_now.unwrap_or_else(|| dense::symmetric_eigen(h_dim, dim).1);
                        let mut v = vec![0f64; n * warm_width];
                        for i in 0..warm_width {
                            dense::combine(&mut v[i * n..(i + 1) * n], &q[..dim * n], &z[i * dim..(i + 1) * dim], n);
                        }
                        v
                    });
                    let top_k = sigmas.iter().take(k).copied().collect::<Vec<_>>();
                    let e = Estimate {
                        sigma_max: sigmas[0],
                        top_k,
                        frobenius_norm: fro2.sqrt(),
                        iterations: it as u32,
                        converged: converged || exhausted,
                    };
                    return Ok(Ok((e, vectors)));
                }
                prev = sigmas;
                if mode == Mode::Forward {
                    let j = dim - width;
                    let req = PassRequest { q: &[], width, mode: Mode::Backward, norm: false, threads };
                    operand.pass(ws32, ws64, req, &mut w[j * n..dim * n], bb)?;
                }
                // Next Krylov block: AᵀA·Q_j, orthonormalised against the basis, no wider than the
                // directions the basis does not span yet.
                let next = width.min(d_max - dim);
                next_block.clear();
                next_block.extend_from_slice(&w[(dim - width) * n..(dim - width + next) * n]);
                dense::orthonormalize(q, dim, next_block, next, n, &mut || gauss(rng));
                q.extend_from_slice(next_block);
                width = next;
            }
            unreachable!("the loop returns on its last iteration")
        })?;
        match outcome {
            Ok((e, vectors)) => {
                self.warm = vectors.map(|vectors| Warm { key, vectors, width: warm_width });
                Ok(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Matrices with a small side: every singular value, from the float64 Gram matrix.
    fn exact(&mut self, a: &Tensor, k: usize, threads: usize) -> Result<Estimate, SpectraError> {
        self.warm = None;
        let fro2 = match HostMatrix::of_tensor(a) {
            Some(h) => pass::sum_squares(&h, threads),
            None => frobenius_norm(a).powi(2),
        };
        if sum_means_nonfinite(fro2, a) {
            return Err(SpectraError::NonFinite(a.size()));
        }
        if fro2 == 0.0 {
            return Ok(Estimate { sigma_max: 0.0, top_k: vec![0.0; k], frobenius_norm: 0.0, iterations: 0, converged: true });
        }
        let sv = gram_singular_values(a)?;
        let top_k: Vec<f64> = sv.iter().take(k).copied().collect();
        Ok(Estimate { sigma_max: top_k[0], top_k, frobenius_norm: fro2.sqrt(), iterations: 1, converged: true })
    }
}

/// One standard normal draw from the estimator's own generator (splitmix64, Box–Muller).
fn gauss(state: &mut u64) -> f64 {
    let u1 = (splitmix64(state) >> 11) as f64 / (1u64 << 53) as f64;
    let u2 = (splitmix64(state) >> 11) as f64 / (1u64 << 53) as f64;
    (-2.0 * (1.0 - u1).ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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

/// Elements converted to float64 at a time by [`frobenius_norm`] off the CPU: at most 256 MiB of
/// float64 temporaries (a chunk's copy and its square).
const NORM_CHUNK: i64 = 1 << 24;

/// `‖W‖_F` of any tensor, each element squared and summed in float64. Squaring in float32 first would
/// round every square (up to 3e-8 relative in the norm when the roundings do not cancel). On the CPU one
/// read of a dense tensor, no temporaries; elsewhere on the tensor's device, converting in chunks to
/// bound the float64 copies of a large weight.
pub fn frobenius_norm(t: &Tensor) -> f64 {
    if let Some(h) = HostMatrix::flat(t) {
        return pass::sum_squares(&h, host_threads(0)).sqrt();
    }
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

/// `‖a − b‖_F` in float64 (the sampler's update size). On the CPU one read of each, no temporaries;
/// elsewhere on the device through float64 copies.
pub fn frobenius_distance(a: &Tensor, b: &Tensor) -> f64 {
    if a.size() == b.size() && a.kind() == b.kind() {
        if let (Some(x), Some(y)) = (HostMatrix::flat(a), HostMatrix::flat(b)) {
            return pass::distance_squares(&x, &y, host_threads(0)).sqrt();
        }
    }
    tch::no_grad(|| frobenius_norm(&(a.to_kind(Kind::Double) - b.to_kind(Kind::Double))))
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
    fn the_libtorch_pass_of_devices_computes_what_the_host_pass_does() {
        // The device branch runs libtorch's products; on a CPU tensor it must agree with the host pass.
        let a = Tensor::randn([90, 70], (Kind::Float, Device::Cpu));
        let q: Vec<f64> = Vec::try_from(&Tensor::randn([70 * 8], (Kind::Double, Device::Cpu))).unwrap();
        let run = |operand: &mut Operand, mode| {
            let (mut ws32, mut ws64) = (None, None);
            let (mut w, mut bb) = (vec![0.0; 70 * 8], vec![0.0; 64]);
            let req = PassRequest { q: &q, width: 8, mode, norm: true, threads: 1 };
            let s = operand.pass(&mut ws32, &mut ws64, req, &mut w, &mut bb).unwrap();
            (s, w, bb)
        };
        let host = run(&mut Operand::Host(HostMatrix::of_tensor(&a).unwrap()), Mode::Full);
        let mut device = Operand::Device { op: a.shallow_clone(), b: None };
        let full = run(&mut device, Mode::Full);
        assert!((host.0 - full.0).abs() <= 1e-12 * host.0, "sum of squares");
        let scale = host.1.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (x, y) in host.1.iter().zip(&full.1).chain(host.2.iter().zip(&full.2)) {
            assert!((x - y).abs() <= 1e-5 * scale, "{x} vs {y}");
        }
        // Forward then backward: the same W from the kept B.
        let forward = run(&mut device, Mode::Forward);
        assert_eq!(forward.2, full.2);
        let backward = run(&mut device, Mode::Backward);
        assert_eq!(backward.1, full.1);
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

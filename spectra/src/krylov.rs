//! The top-k estimator: block Krylov iteration with Rayleigh–Ritz (Musco & Musco, "Randomized block
//! Krylov methods for stronger and faster approximate SVD", NeurIPS 2015).
//!
//! With `X` a block of `b = k + oversample` columns, the search space after `q` iterations is
//! `span[X, (AᵀA)X, …, (AᵀA)^{q−1} X]`; the Ritz values of `AᵀA` on it are the estimates. Plain power (or
//! subspace) iteration converges like `(σ_{b+1}/σ_1)^{2q}`, hopeless on a Gaussian matrix whose top spectrum
//! has no gap (docs/design.md §6.2); the Krylov space converges like a Chebyshev polynomial,
//! `exp(−4q·sqrt(gap))`, which is what makes cold starts reach 1e-3 in tens of iterations. The estimator
//! keeps the right singular vectors of its last answer and starts the next call from them, so a matrix that
//! moved a little (one optimizer step or a few) converges in two. A warm start iterates with the top k of
//! them only (no oversampling: they are already close to the new top k), which halves the arithmetic of the
//! compute-bound warm path. Ritz values never exceed the true singular values (Cauchy interlacing), so
//! `sigma_max` is a lower bound that tightens with every iteration.
//!
//! The loop is generic over its [`Operand`]: a matrix in host memory ([`Krylov::estimate_host`], one fused
//! pass over it per iteration, `crate::pass`), or whatever a caller supplies (the plugin's libtorch
//! products on a GPU). The small float64 algebra of the Rayleigh–Ritz step runs on the host (`crate::dense`).
//!
//! A matrix whose rows are split over ranks (`A = [A_0; A_1; …]`, rank i holding `A_i`) has
//! `AᵀA = Σ_i A_iᵀA_i`: [`Krylov::run_sharded`] runs the same loop on the local shard, and after each pass sums
//! what the pass produced (`AᵀB`, `BᵀB`, `Σ a²`: an `n × width` block, `width²` and one value) over the ranks
//! with a reduction the trainer provides, its own collective (`all_reduce_sum` of torch.distributed, NCCL, MPI,
//! or an in-process one). A column-split matrix is the row split of its transpose, with the same singular
//! values: the caller hands the transposed shard. Every rank then holds the same reduced block, so every rank
//! takes the same decisions (another iteration, or stop) and calls the reduction the same number of times in
//! the same order; no rank holds the whole matrix, and an estimate moves `O(n·k)` values per pass.

use std::cell::RefCell;

use crate::dense;
use crate::pass::{self, flavour, Elem, HostMatrix, Mode, PassRequest, Workspace};

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
    /// Threads of a pass over a CPU matrix; 0 takes the caller's default (in the plugin, libtorch's
    /// intra-op setting of the calling thread).
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

impl Estimate {
    /// The all-zero matrix's estimate: k zeros, found without iterating.
    pub fn zero(k: usize) -> Estimate {
        Estimate { sigma_max: 0.0, top_k: vec![0.0; k], frobenius_norm: 0.0, iterations: 0, converged: true }
    }

    /// An exact answer (one "iteration"): the top `k` of every singular value, descending, and `‖W‖_F²`.
    pub fn exact(singular_values: &[f64], frobenius_squared: f64, k: usize) -> Estimate {
        let top_k: Vec<f64> = singular_values.iter().take(k).copied().collect();
        Estimate { sigma_max: top_k[0], top_k, frobenius_norm: frobenius_squared.sqrt(), iterations: 1, converged: true }
    }
}

/// What an estimate found: the values, or NaN/±Inf in the matrix (the estimator forgets its warm start).
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Done(Estimate),
    NonFinite,
}

/// What a warm start is valid for: the same operand shape, side, precision and place. `device` is the
/// caller's tag for where the operand lives ([`WarmKey::HOST`] for host memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WarmKey {
    pub device: i64,
    pub rows: usize,
    pub cols: usize,
    pub double: bool,
}

impl WarmKey {
    /// The `device` tag of host memory.
    pub const HOST: i64 = -1;
}

struct Warm {
    key: WarmKey,
    /// `cols × width`, column-major, orthonormal.
    vectors: Vec<f64>,
    width: usize,
}

/// The matrix a Krylov iteration multiplies by. A pass with the block `req.q` (`cols × width`,
/// column-major) computes, by `req.mode`: `B = A·Q` and `BᵀB` into `bb_out` (`width × width`) unless
/// [`Mode::Backward`]; `W = Aᵀ·B` into `w_out` (column-major, `cols × width`) unless [`Mode::Forward`]
/// (a backward pass reuses the `B` of the forward pass before it); and returns `Σ a_ij²` in float64 when
/// `req.norm` (NaN otherwise).
pub trait Operand {
    type Error;
    /// `(rows, cols)`; the Krylov space lives in the columns' space.
    fn dims(&self) -> (usize, usize);
    fn pass(&mut self, req: PassRequest, w_out: &mut [f64], bb_out: &mut [f64]) -> Result<f64, Self::Error>;
}

/// The sum over the ranks that hold shards of one matrix: the trainer's own collective (torch.distributed's
/// `all_reduce`, NCCL, MPI, or an in-process one). [`Krylov::run_sharded`] calls it once to agree on the row
/// count, then once per pass; every rank calls it the same number of times, in the same order, with buffers
/// of the same length. A closure `FnMut(&mut [f64]) -> Result<(), E>` is one; [`Local`] is the one of a
/// single rank.
pub trait Reduction {
    type Error;
    /// Replaces `buffer` by its elementwise sum over the ranks.
    fn all_reduce_sum(&mut self, buffer: &mut [f64]) -> Result<(), Self::Error>;
}

impl<E, F: FnMut(&mut [f64]) -> Result<(), E>> Reduction for F {
    type Error = E;
    fn all_reduce_sum(&mut self, buffer: &mut [f64]) -> Result<(), E> {
        self(buffer)
    }
}

/// One rank holding the whole matrix: the sum over the ranks is the buffer itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Local;

impl Reduction for Local {
    type Error = std::convert::Infallible;
    fn all_reduce_sum(&mut self, _: &mut [f64]) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// An operand over a row shard whose passes are summed over the ranks by `reduce`: one call per pass, on one
/// buffer holding the pass's outputs (`w_out` unless [`Mode::Forward`], `bb_out` unless [`Mode::Backward`], the
/// sum of squares when asked), which `reduce` replaces by their sum over the ranks.
struct Reduced<'r, O, R> {
    local: O,
    reduce: &'r mut R,
    buffer: Vec<f64>,
    /// The whole matrix's rows (the sum of the shards'): the loop's basis size and iteration cap follow from
    /// it, and must be the same on every rank.
    rows: usize,
}

impl<O: Operand, R: Reduction<Error = O::Error>> Operand for Reduced<'_, O, R> {
    type Error = O::Error;

    fn dims(&self) -> (usize, usize) {
        (self.rows, self.local.dims().1)
    }

    fn pass(&mut self, req: PassRequest, w_out: &mut [f64], bb_out: &mut [f64]) -> Result<f64, Self::Error> {
        let (mode, norm) = (req.mode, req.norm);
        let s = self.local.pass(req, w_out, bb_out)?;
        let buffer = &mut self.buffer;
        buffer.clear();
        if mode != Mode::Forward {
            buffer.extend_from_slice(w_out);
        }
        if mode != Mode::Backward {
            buffer.extend_from_slice(bb_out);
        }
        if norm {
            buffer.push(s);
        }
        self.reduce.all_reduce_sum(buffer)?;
        let mut at = 0;
        if mode != Mode::Forward {
            w_out.copy_from_slice(&buffer[..w_out.len()]);
            at = w_out.len();
        }
        if mode != Mode::Backward {
            bb_out.copy_from_slice(&buffer[at..at + bb_out.len()]);
            at += bb_out.len();
        }
        Ok(if norm { buffer[at] } else { s })
    }
}

/// A matrix in host memory, read in place by the fused pass.
struct HostOperand<'a> {
    a: HostMatrix<'a>,
}

thread_local! {
    /// The passes' buffers, one pair per thread, kept from call to call.
    static WORKSPACES: RefCell<(Option<Workspace<f32>>, Option<Workspace<f64>>)> = const { RefCell::new((None, None)) };
}

impl Operand for HostOperand<'_> {
    type Error = std::convert::Infallible;

    fn dims(&self) -> (usize, usize) {
        (self.a.rows, self.a.cols)
    }

    fn pass(&mut self, req: PassRequest, w_out: &mut [f64], bb_out: &mut [f64]) -> Result<f64, Self::Error> {
        Ok(WORKSPACES.with(|cell| {
            let (ws32, ws64) = &mut *cell.borrow_mut();
            if self.a.elem == Elem::F64 {
                ws64.get_or_insert_with(|| Workspace::new(flavour())).pass(&self.a, req, w_out, bb_out)
            } else {
                ws32.get_or_insert_with(|| Workspace::new(flavour())).pass(&self.a, req, w_out, bb_out)
            }
        }))
    }
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
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Per-matrix state of the top-k estimator: the settings, the last right singular vectors (for warm
/// starts) and the generator of random start blocks.
pub struct Krylov {
    config: EstimatorConfig,
    warm: Option<Warm>,
    rng: u64,
}

impl Krylov {
    pub fn new(config: EstimatorConfig) -> Krylov {
        let rng = config.seed ^ 0x9e37_79b9_7f4a_7c15;
        Krylov { config, warm: None, rng }
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

    /// `(k, cold block width)` for a matrix whose smaller side is `small`.
    fn widths(&self, small: usize) -> (usize, usize) {
        let k = self.config.k.max(1).min(small);
        let block = (self.config.k.max(1) + self.config.oversample).min(small);
        (k, block)
    }

    /// Whether a `rows × cols` matrix is solved exactly (every singular value of the Gram matrix) rather
    /// than iterated: a smaller side of at most `exact_below`, or no wider than the block.
    pub fn solves_exactly(&self, rows: usize, cols: usize) -> bool {
        let small = rows.min(cols);
        small as i64 <= self.config.exact_below.max(self.widths(small).1 as i64)
    }

    /// Top-k singular values of a matrix in host memory, on `threads` threads: exactly for a small side,
    /// else by the Krylov iteration with fused passes.
    pub fn estimate_host(&mut self, a: &HostMatrix, threads: usize) -> Outcome {
        let threads = threads.max(1);
        let nonfinite = |fro2: f64| !fro2.is_finite() && (a.elem != Elem::F64 || !pass::all_finite(a));
        if self.solves_exactly(a.rows, a.cols) {
            self.warm = None;
            let fro2 = pass::sum_squares(a, threads);
            if nonfinite(fro2) {
                return Outcome::NonFinite;
            }
            let k = self.widths(a.rows.min(a.cols)).0;
            if fro2 == 0.0 {
                return Outcome::Done(Estimate::zero(k));
            }
            return Outcome::Done(Estimate::exact(&gram_singular_values(a), fro2, k));
        }
        let key = WarmKey { device: WarmKey::HOST, rows: a.rows, cols: a.cols, double: a.elem == Elem::F64 };
        match self.run(&mut HostOperand { a: *a }, key, threads, &nonfinite) {
            Ok(outcome) => outcome,
            Err(never) => match never {},
        }
    }

    /// [`Krylov::run`] over a matrix whose rows are split over ranks, `operand` being this rank's rows (a
    /// column split: this rank's columns, transposed). After each pass `reduce` replaces the buffer it is
    /// given by its elementwise sum over the ranks (the trainer's all-reduce; the identity on one rank); every
    /// rank must call this with the same settings (`seed` included) and its shard of the same matrix, in the
    /// same order as the others. The reduced result is the unsharded estimate, up to the order of the sums. A
    /// reduction that fails (a rank gone, a deadline passed) ends the estimate with its error; the estimator
    /// then forgets its warm start, which the ranks no longer share.
    pub fn run_sharded<O: Operand, R: Reduction<Error = O::Error>>(
        &mut self,
        operand: O,
        key: WarmKey,
        threads: usize,
        nonfinite: &dyn Fn(f64) -> bool,
        reduce: &mut R,
    ) -> Result<Outcome, O::Error> {
        // One reduction first: the total row count, which sizes the loop alike on every rank.
        let mut rows = [operand.dims().0 as f64];
        let outcome = reduce.all_reduce_sum(&mut rows).and_then(|()| {
            let mut reduced = Reduced { local: operand, reduce, buffer: Vec::new(), rows: rows[0].round() as usize };
            self.run(&mut reduced, key, threads, nonfinite)
        });
        if outcome.is_err() {
            self.warm = None;
        }
        outcome
    }

    /// [`Krylov::run_sharded`] over this rank's rows in host memory (`local`: `rows_i × cols`), with the
    /// fused passes of [`Krylov::estimate_host`]. The iteration is used at every size: an exact solve of a
    /// small side would need the whole Gram matrix of the other side. A NaN or Inf on any rank makes every
    /// rank's outcome [`Outcome::NonFinite`] (the reduced sum of squares is not finite).
    pub fn estimate_host_sharded<R: Reduction>(
        &mut self,
        local: &HostMatrix,
        threads: usize,
        reduce: &mut R,
    ) -> Result<Outcome, R::Error> {
        let threads = threads.max(1);
        let key = WarmKey { device: WarmKey::HOST, rows: local.rows, cols: local.cols, double: local.elem == Elem::F64 };
        let mut reduce_infallible = |b: &mut [f64]| -> Result<(), ReduceFailed<R::Error>> { reduce.all_reduce_sum(b).map_err(ReduceFailed) };
        let operand = Fallible { inner: HostOperand { a: *local }, _e: std::marker::PhantomData };
        match self.run_sharded(operand, key, threads, &|fro2: f64| !fro2.is_finite(), &mut reduce_infallible) {
            Ok(outcome) => Ok(outcome),
            Err(ReduceFailed(e)) => Err(e),
        }
    }

    /// One block-Krylov (Lanczos on AᵀA) run over `operand`: grow the basis one pass at a time, solve the
    /// small projected problem after each and stop at convergence. `nonfinite(Σ a_ij²)` says whether the
    /// first pass's sum of squares means NaN/Inf in the matrix. The caller has sent matrices that
    /// [`Krylov::solves_exactly`] elsewhere.
    ///
    /// Kept as one function, the one algorithm of this file: the loop's state (basis, projected
    /// matrix, block width, previous Ritz values) is shared by every step, and split functions would pass
    /// all of it back and forth.
    pub fn run<O: Operand>(&mut self, operand: &mut O, key: WarmKey, threads: usize, nonfinite: &dyn Fn(f64) -> bool) -> Result<Outcome, O::Error> {
        let (m, n) = operand.dims();
        let (k, block) = self.widths(m.min(n));
        // A warm start needs no oversampling: the last answer's top k Ritz vectors are already close to the
        // new top k, so its block is k columns, half the arithmetic per pass of a cold block of k + oversample
        // (the warm path is compute-bound).
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
        let threads = threads.max(1);
        let rng = &mut self.rng;
        let outcome = SCRATCH.with(|cell| -> Result<(Outcome, Option<Vec<f64>>), O::Error> {
            let mut guard = cell.borrow_mut();
            let Scratch { q, w, h, h_dim, bb, block: next_block } = &mut *guard;
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
                let s = operand.pass(req, &mut w[dim * n..(dim + width) * n], bb)?;
                if it == 1 {
                    fro2 = s;
                    if nonfinite(fro2) {
                        return Ok((Outcome::NonFinite, None));
                    }
                    if fro2 == 0.0 {
                        return Ok((Outcome::Done(Estimate::zero(k)), None));
                    }
                }
                // New entries of QᵀAᵀAQ: W_iᵀ Q_new against the earlier blocks, BᵀB on the diagonal block.
                // Only the last block before the new one can give nonzeros: each block j + 1 was W_j
                // orthonormalised against every block before it, so W_j lies in the span of blocks 0..=j+1,
                // and the new block d, orthogonal to that span for every j < d − 1, has W_jᵀ Q_new = 0 up to
                // the basis' rounding (1e-16; the float32 error of W_j does not enter, since the basis was
                // built from that very W_j). H is block tridiagonal (block Lanczos); the zeros are written,
                // not computed. The last b columns hold the last block whatever its width (≤ b).
                let near = dim.saturating_sub(b);
                for c in 0..width {
                    let qc = &q[(dim + c) * n..(dim + c + 1) * n];
                    for i in 0..dim {
                        let v = if i < near { 0.0 } else { dense::dot(&w[i * n..(i + 1) * n], qc) };
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
                // Small projections get their vectors at once (they cost little more than the values), large
                // ones only when the estimate stops.
                let (theta, vectors_now) = if dim <= dense::VECTORS_EVERY_ITERATION_MAX {
                    let (values, z) = dense::symmetric_eigen(h_dim, dim);
                    (values, Some(z))
                } else {
                    (dense::symmetric_top_eigenvalues(h_dim, dim, b), None)
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
                    return Ok((Outcome::Done(e), vectors));
                }
                prev = sigmas;
                if mode == Mode::Forward {
                    let j = dim - width;
                    let req = PassRequest { q: &[], width, mode: Mode::Backward, norm: false, threads };
                    operand.pass(req, &mut w[j * n..dim * n], bb)?;
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
        let (outcome, vectors) = outcome;
        self.warm = vectors.map(|vectors| Warm { key, vectors, width: warm_width });
        Ok(outcome)
    }
}

/// A reduction's error, carried through an operand whose own passes cannot fail.
struct ReduceFailed<E>(E);

/// An infallible operand seen as one whose error type is `ReduceFailed<E>`.
struct Fallible<O, E> {
    inner: O,
    _e: std::marker::PhantomData<fn() -> E>,
}

impl<O: Operand<Error = std::convert::Infallible>, E> Operand for Fallible<O, E> {
    type Error = ReduceFailed<E>;

    fn dims(&self) -> (usize, usize) {
        self.inner.dims()
    }

    fn pass(&mut self, req: PassRequest, w_out: &mut [f64], bb_out: &mut [f64]) -> Result<f64, Self::Error> {
        match self.inner.pass(req, w_out, bb_out) {
            Ok(s) => Ok(s),
            Err(never) => match never {},
        }
    }
}

/// Singular values, descending, from the eigenvalues of the smaller Gram matrix, formed and solved in
/// float64 (for the small sides [`Krylov::solves_exactly`] takes).
fn gram_singular_values(a: &HostMatrix) -> Vec<f64> {
    let (m, n) = (a.rows, a.cols);
    let s = m.min(n);
    let mut gram = vec![0f64; s * s];
    let mut row = vec![0f64; n];
    if n <= m {
        // AᵀA: the sum of each row's outer product.
        for r in 0..m {
            pass::read_row_f64(a, r, &mut row);
            for x in 0..n {
                let rx = row[x];
                for y in x..n {
                    gram[x * n + y] += rx * row[y];
                }
            }
        }
    } else {
        // AAᵀ: dot products of the rows.
        let mut rows = vec![0f64; m * n];
        for r in 0..m {
            pass::read_row_f64(a, r, &mut rows[r * n..(r + 1) * n]);
        }
        for x in 0..m {
            for y in x..m {
                gram[x * m + y] = dense::dot(&rows[x * n..(x + 1) * n], &rows[y * n..(y + 1) * n]);
            }
        }
    }
    for x in 0..s {
        for y in x + 1..s {
            gram[y * s + x] = gram[x * s + y];
        }
    }
    dense::symmetric_eigenvalues(&gram, s).into_iter().map(|l| l.max(0.0).sqrt()).collect()
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

#[cfg(test)]
mod sharded_tests;

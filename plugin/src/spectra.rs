//! Singular-value spectra of weight matrices.
//!
//! Two measurements, both on the tensor's own device and accumulated in fp32 (fp64 for fp64 weights),
//! whatever the storage dtype (bf16 and fp16 weights are widened first):
//!
//! - [`Estimator`]: the top-k singular values by block Krylov iteration with Rayleigh–Ritz, warm-started
//!   from the last answer: `gainguard_spectra::Krylov` (the `spectra/` crate, no libtorch; its module doc
//!   gives the method, its convergence and why plain power iteration is not enough). On the CPU it reads
//!   the tensor in place, one fused pass over W per iteration (the first also summing `‖W‖_F` in float64,
//!   which doubles as the finiteness check); on a GPU the products are libtorch's, which [`Estimator`]
//!   supplies.
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

use std::sync::Once;

use gainguard_protocol::events::SpectrumQuantiles;
use gainguard_spectra::{Elem, HostMatrix, Krylov, Mode, Operand, Outcome, PassRequest, WarmKey};
use tch::{Device, Kind, Tensor};

pub use gainguard_spectra::{kernels, Estimate, EstimatorConfig};

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
/// `SamplerConfig::worker_threads`). Also installs libtorch's OpenMP pool as the passes' thread pool.
fn host_threads(configured: usize) -> usize {
    static RUNNER: Once = Once::new();
    RUNNER.call_once(|| {
        if let Some(runner) = crate::shim::parallel_runner() {
            gainguard_spectra::set_parallel_runner(runner);
        }
    });
    if configured > 0 {
        configured
    } else {
        tch::get_num_threads().max(1) as usize
    }
}

fn elem_of(kind: Kind) -> Option<Elem> {
    Some(match kind {
        Kind::Float => Elem::F32,
        Kind::Double => Elem::F64,
        Kind::BFloat16 => Elem::Bf16,
        Kind::Half => Elem::F16,
        _ => return None,
    })
}

/// A 2-D CPU tensor of f32, f64, bf16 or f16 whose elements are dense in memory, row-major
/// (contiguous) or column-major (the transpose of a contiguous tensor, which is then read as its
/// transpose: the singular values are the same). None for anything else.
fn host_matrix(t: &Tensor) -> Option<HostMatrix<'_>> {
    if t.device() != Device::Cpu || t.dim() != 2 {
        return None;
    }
    let elem = elem_of(t.kind())?;
    let size = t.size();
    let (r, c) = (size[0], size[1]);
    if r <= 0 || c <= 0 {
        return None;
    }
    let (rows, cols) = if t.is_contiguous() {
        (r, c)
    } else if t.stride() == [1, r] {
        (c, r)
    } else {
        return None;
    };
    // SAFETY: the tensor owns rows·cols dense elements from data_ptr() and is borrowed for the
    // matrix's lifetime; the estimator never writes to it.
    Some(unsafe { HostMatrix::from_raw(t.data_ptr() as *const u8, rows as usize, cols as usize, elem) })
}

/// Any contiguous CPU tensor of f32, f64, bf16 or f16 as the rows of its last dimension (a scalar is
/// one row of one): for sums over every element.
fn host_flat(t: &Tensor) -> Option<HostMatrix<'_>> {
    if t.device() != Device::Cpu || !t.is_contiguous() || t.numel() == 0 {
        return None;
    }
    let elem = elem_of(t.kind())?;
    let cols = t.size().last().map_or(1, |&c| c as usize);
    // SAFETY: as in `host_matrix`: numel dense elements from data_ptr(), borrowed, read only.
    Some(unsafe { HostMatrix::from_raw(t.data_ptr() as *const u8, t.numel() / cols, cols, elem) })
}

/// True when every element is finite. On the CPU one read without temporaries (the float64 sum of
/// squares is finite exactly when every element is, short of float64 overflow, which is checked
/// element-wise); elsewhere one reduction on the tensor's device.
pub fn all_finite(t: &Tensor) -> bool {
    if t.numel() == 0 {
        return true;
    }
    if let Some(h) = host_flat(t) {
        if gainguard_spectra::sum_squares(&h, host_threads(0)).is_finite() {
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

/// A matrix on a device: libtorch's products (`b` keeps `A·Q` between a forward and a backward pass).
struct DeviceOperand {
    op: Tensor,
    b: Option<Tensor>,
}

impl Operand for DeviceOperand {
    type Error = tch::TchError;

    fn dims(&self) -> (usize, usize) {
        (self.op.size()[0] as usize, self.op.size()[1] as usize)
    }

    fn pass(&mut self, req: PassRequest, w_out: &mut [f64], bb_out: &mut [f64]) -> Result<f64, tch::TchError> {
        let PassRequest { q, width, mode, norm, .. } = req;
        let op = &self.op;
        let n = op.size()[1];
        let fro2 = if norm { frobenius_norm(op).powi(2) } else { f64::NAN };
        if mode != Mode::Backward {
            let qt = Tensor::f_from_slice(&q[..n as usize * width])?.f_view([width as i64, n])?.f_to_kind(op.kind())?.f_to_device(op.device())?;
            let bj = op.f_matmul(&qt.f_tr()?)?;
            let gram = bj.f_tr()?.f_matmul(&bj)?.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?.f_contiguous()?;
            bb_out[..width * width].copy_from_slice(&Vec::<f64>::try_from(&gram.f_view([-1])?)?);
            self.b = Some(bj);
        }
        if mode != Mode::Forward {
            let bj = self.b.as_ref().expect("a backward pass follows a forward pass");
            // (Aᵀ·B)ᵀ = Bᵀ·A, row-major `width × n`: the column-major layout of `n × width`.
            let wt = bj.f_tr()?.f_matmul(op)?.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?.f_contiguous()?;
            w_out[..n as usize * width].copy_from_slice(&Vec::<f64>::try_from(&wt.f_view([-1])?)?);
        }
        Ok(fro2)
    }
}

/// Whether a sum of squares from a first pass means NaN/Inf in `a`: float32, bf16 and f16 squares
/// cannot overflow a float64 sum, float64 ones can, so those are checked element-wise.
fn sum_means_nonfinite(fro2: f64, a: &Tensor) -> bool {
    !fro2.is_finite() && (a.kind() != Kind::Double || !all_finite(a))
}

/// The warm-start key's tag of a device.
fn device_tag(d: Device) -> i64 {
    match d {
        Device::Cpu => WarmKey::HOST,
        Device::Cuda(i) => i as i64,
        Device::Mps => -2,
        Device::Vulkan => -3,
    }
}

/// Per-parameter state of the top-k estimator ([`gainguard_spectra::Krylov`]) for tensors on any device:
/// the last right singular vectors, for warm starts.
pub struct Estimator {
    krylov: Krylov,
}

impl Estimator {
    pub fn new(config: EstimatorConfig) -> Estimator {
        Estimator { krylov: Krylov::new(config) }
    }

    pub fn config(&self) -> &EstimatorConfig {
        self.krylov.config()
    }

    /// Forgets the warm start (after non-finite weights, or a shape change).
    pub fn reset(&mut self) {
        self.krylov.reset();
    }

    /// Whether the next call starts from the previous answer's singular vectors.
    pub fn is_warm(&self) -> bool {
        self.krylov.is_warm()
    }

    /// Top-k singular values of a 2-D tensor (use [`MatrixLayout::apply`] first for higher ranks).
    pub fn estimate(&mut self, a: &Tensor) -> Result<Estimate, SpectraError> {
        tch::no_grad(|| self.estimate_inner(a))
    }

    /// Host tensors go to the host estimator in place (a copy only for layouts and dtypes it does not
    /// read); device tensors to the same iteration over libtorch's products.
    fn estimate_inner(&mut self, a: &Tensor) -> Result<Estimate, SpectraError> {
        let shape = a.size();
        if shape.len() != 2 || shape[0] <= 0 || shape[1] <= 0 {
            return Err(SpectraError::NotAMatrix(shape));
        }
        let threads = host_threads(self.krylov.config().threads);
        let owned: Tensor;
        let host = match host_matrix(a) {
            Some(h) => Some(h),
            None if a.device() == Device::Cpu => {
                owned = a.f_to_kind(compute_kind(a))?.f_contiguous()?;
                Some(host_matrix(&owned).ok_or_else(|| SpectraError::NotAMatrix(shape.clone()))?)
            }
            None => None,
        };
        let outcome = match host {
            Some(h) => self.krylov.estimate_host(&h, threads),
            None if self.krylov.solves_exactly(shape[0] as usize, shape[1] as usize) => return self.exact(a),
            None => {
                // On a device the smaller side is the Krylov side.
                let x = a.f_to_kind(compute_kind(a))?.f_detach()?;
                let op = if shape[1] <= shape[0] { x } else { x.f_tr()? };
                let mut operand = DeviceOperand { op, b: None };
                let (m, n) = operand.dims();
                let key = WarmKey { device: device_tag(a.device()), rows: m, cols: n, double: a.kind() == Kind::Double };
                self.krylov.run(&mut operand, key, threads, &|fro2| sum_means_nonfinite(fro2, a))?
            }
        };
        match outcome {
            Outcome::Done(e) => Ok(e),
            Outcome::NonFinite => Err(SpectraError::NonFinite(shape)),
        }
    }

    /// A device matrix with a small side: every singular value, from the float64 Gram matrix.
    fn exact(&mut self, a: &Tensor) -> Result<Estimate, SpectraError> {
        self.krylov.reset();
        let k = self.krylov.config().k.max(1).min(a.size()[0].min(a.size()[1]) as usize);
        let fro2 = frobenius_norm(a).powi(2);
        if sum_means_nonfinite(fro2, a) {
            return Err(SpectraError::NonFinite(a.size()));
        }
        if fro2 == 0.0 {
            return Ok(Estimate::zero(k));
        }
        Ok(Estimate::exact(&gram_singular_values(a)?, fro2, k))
    }
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
    if let Some(h) = host_flat(t) {
        return gainguard_spectra::sum_squares(&h, host_threads(0)).sqrt();
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
        if let (Some(x), Some(y)) = (host_flat(a), host_flat(b)) {
            return gainguard_spectra::distance_squares(&x, &y, host_threads(0)).sqrt();
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
    fn the_libtorch_pass_of_devices_computes_what_a_float64_product_does() {
        // The device operand runs libtorch's products; on a CPU tensor they must agree with float64 ones.
        let a = Tensor::randn([90, 70], (Kind::Float, Device::Cpu));
        let qt = Tensor::randn([8, 70], (Kind::Double, Device::Cpu));
        let q: Vec<f64> = Vec::try_from(&qt.view([-1])).unwrap();
        let a64 = a.to_kind(Kind::Double);
        let b = a64.mm(&qt.tr());
        let w_ref: Vec<f64> = Vec::try_from(&b.tr().mm(&a64).contiguous().view([-1])).unwrap();
        let bb_ref: Vec<f64> = Vec::try_from(&b.tr().mm(&b).contiguous().view([-1])).unwrap();
        let ss_ref = a64.square().sum(Kind::Double).double_value(&[]);
        let run = |operand: &mut DeviceOperand, mode| {
            let (mut w, mut bb) = (vec![0.0; 70 * 8], vec![0.0; 64]);
            let req = PassRequest { q: &q, width: 8, mode, norm: true, threads: 1 };
            let s = operand.pass(req, &mut w, &mut bb).unwrap();
            (s, w, bb)
        };
        let mut device = DeviceOperand { op: a.shallow_clone(), b: None };
        let full = run(&mut device, Mode::Full);
        assert!((full.0 - ss_ref).abs() <= 1e-12 * ss_ref, "sum of squares");
        let scale = w_ref.iter().chain(&bb_ref).fold(0f64, |m, x| m.max(x.abs()));
        for (x, y) in full.1.iter().zip(&w_ref).chain(full.2.iter().zip(&bb_ref)) {
            assert!((x - y).abs() <= 1e-5 * scale, "{x} vs {y}");
        }
        // Forward then backward: the same W from the kept B.
        let forward = run(&mut device, Mode::Forward);
        assert_eq!(forward.2, full.2);
        let backward = run(&mut device, Mode::Backward);
        assert_eq!(backward.1, full.1);
    }

    #[test]
    fn a_transposed_view_is_read_as_its_contiguous_transpose() {
        let a = Tensor::randn([40, 70], (Kind::Float, Device::Cpu));
        let t = a.tr();
        let h = host_matrix(&t).unwrap();
        assert_eq!((h.rows, h.cols), (40, 70));
        assert!(host_matrix(&a.narrow(1, 0, 30)).is_none(), "a strided view is not dense");
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

//! The fused AdamW kernels: one pass per group over parameters, gradients and both moments, instead of the
//! reference path's ~10 tensor ops (each a full sweep over memory) per parameter. A leaf over buffers and
//! scalars: the optimizer ([`crate::optim`]) computes the step's scalars, picks the kernel and calls it; this
//! module knows nothing of groups, plans or the optimizer's state.
//!
//! Two kernels, both in the C++ shim (`csrc/fused_adamw.cpp`, reached through the crate-private `shim` module):
//! - **[`adamw_cpu`]**: one loop per call, parallel over libtorch's own OpenMP thread pool, that reads θ, g, m,
//!   v once and writes θ, m, v once, in libtorch AdamW's order of operations and roundings (mul, add, mul,
//!   add, sqrt, div, add, div, mul, sub, each rounded to the parameters' dtype), without FMA, with the
//!   correctly rounded sqrt ([`correctly_rounded_sqrt`], which the optimizer's reference path takes too, so
//!   the two are bit-identical: tests/fused_parity.rs). Per element, with the tensor's own step count t:
//!   ```text
//!   theta ← theta · decay
//!   first_moment  ← beta1 · first_moment  + (1 − beta1) · g
//!   second_moment ← beta2 · second_moment + (1 − beta2) · g²
//!   theta ← theta − (first_moment / (sqrt(second_moment) / bias_correction2_sqrt_t + eps)) · step_size_t
//!   ```
//!   Also mixed precision: bf16 or f16 parameters and gradients with f32 moments (θ and g widened to f32,
//!   stepped in f32, θ rounded back to nearest even, as the reference path does).
//! - **[`adamw_aten`]**: ATen's `_fused_adamw_`, the kernel of `torch.optim.AdamW(fused=True)`, on the CPU or
//!   CUDA, with one step count per tensor. It decays by `(1 − lr·wd)` and rounds differently (lerp, FMA), so
//!   it agrees with the CPU loop to float precision, not bit for bit. (The CUDA path has not run yet: the
//!   development machine has no GPU; `scripts/device-check.sh` checks it on one.)
//!
//! [`layout`] says whether one call can take a set of tensors: dense and contiguous, all on one device, `f32`
//! or `f64` with moments of the same dtype, or (CPU only) `bf16`/`f16` with `f32` moments.

use std::ffi::c_void;

use tch::{Device, Kind, Tensor};

use crate::shim::{self, AtenStep, CpuStep, DType, RawGroup};

pub use crate::shim::limit_this_thread;

/// Why a fused kernel did not run. Nothing was changed in either case.
#[derive(Debug, thiserror::Error)]
pub enum FusedError {
    #[error("{}", shim::NO_SHIM)]
    NoShim,
    #[error("the fused kernel does not take these tensors: {0}")]
    NotCovered(&'static str),
    #[error("the fused kernel failed: {0}")]
    Kernel(String),
}

impl FusedError {
    fn from_shim(message: String) -> FusedError {
        if shim::available() {
            FusedError::Kernel(message)
        } else {
            FusedError::NoShim
        }
    }
}

/// Whether this build carries the shim, and with it the fused kernels.
pub fn available() -> bool {
    shim::available()
}

/// One tensor's buffers for a step: the parameter, its gradient and its two moments.
#[derive(Clone, Copy)]
pub struct Buffers<'a> {
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    pub first_moment: &'a Tensor,
    pub second_moment: &'a Tensor,
}

/// Where the tensors of one kernel call live and in what dtype (the parameters').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub device: Device,
    pub kind: Kind,
}

impl Layout {
    /// bf16 or f16 parameters with f32 moments: only [`adamw_cpu`] takes them.
    pub fn mixed_precision(&self) -> bool {
        matches!(self.kind, Kind::BFloat16 | Kind::Half)
    }

    fn dtype(&self) -> DType {
        match self.kind {
            Kind::Float => DType::F32,
            Kind::Double => DType::F64,
            Kind::BFloat16 => DType::BF16,
            _ => DType::F16,
        }
    }
}

/// The layout every member shares, or None when one call cannot take them all (a dtype or device the kernels
/// do not cover, a sparse or strided tensor, members on several devices or of several dtypes, no members).
pub fn layout(members: &[Buffers<'_>]) -> Option<Layout> {
    let first = members.first()?;
    let common = Layout { device: first.param.device(), kind: first.param.kind() };
    // f32/f64 with moments of the same dtype anywhere; bf16/f16 with f32 moments on the CPU only (ATen's
    // kernel wants one dtype for all four).
    let moment_kind = match common.kind {
        Kind::Float | Kind::Double => common.kind,
        Kind::BFloat16 | Kind::Half if common.device == Device::Cpu => Kind::Float,
        _ => return None,
    };
    let covered = |b: &Buffers<'_>| {
        b.param.kind() == common.kind
            && b.param.device() == common.device
            && b.grad.kind() == common.kind
            && b.grad.device() == common.device
            && [b.first_moment, b.second_moment].iter().all(|m| m.kind() == moment_kind && m.device() == common.device && m.is_contiguous())
            && !b.grad.is_sparse()
            && b.param.is_contiguous()
            && b.grad.is_contiguous()
    };
    members.iter().all(covered).then_some(common)
}

/// The scalars of one [`adamw_cpu`] call that every member shares.
#[derive(Clone, Copy, Debug)]
pub struct CpuScalars {
    /// The factor θ is multiplied by: `1 − lr·wd` (coupled) or `1 − wd` (independent).
    pub decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// One member's bias corrections, from its own step count t.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BiasCorrection {
    /// `lr / (1 − beta1^t)`.
    pub step_size: f64,
    /// `sqrt(1 − beta2^t)`.
    pub bias_correction2_sqrt: f64,
}

/// The raw buffers of `members`, which the caller's borrows keep alive for the call.
fn raw(members: &[Buffers<'_>]) -> RawGroup {
    RawGroup {
        params: members.iter().map(|b| b.param.data_ptr()).collect(),
        grads: members.iter().map(|b| b.grad.data_ptr()).collect(),
        first_moments: members.iter().map(|b| b.first_moment.data_ptr()).collect(),
        second_moments: members.iter().map(|b| b.second_moment.data_ptr()).collect(),
        numels: members.iter().map(|b| b.param.numel() as i64).collect(),
    }
}

/// One AdamW step of `members` with the CPU loop (see the module docs); `bias[i]` belongs to `members[i]`.
/// The scalars are rounded once to the moments' dtype, as ATen rounds a scalar operand.
pub fn adamw_cpu(members: &[Buffers<'_>], s: &CpuScalars, bias: &[BiasCorrection]) -> Result<(), FusedError> {
    let layout = layout(members).ok_or(FusedError::NotCovered("not one dense CPU dtype (f32, f64, bf16, f16) with matching moments"))?;
    if layout.device != Device::Cpu || bias.len() != members.len() {
        return Err(FusedError::NotCovered("the CPU loop takes CPU tensors, with one bias correction each"));
    }
    let step_sizes: Vec<f64> = bias.iter().map(|b| b.step_size).collect();
    let bias_correction2_sqrts: Vec<f64> = bias.iter().map(|b| b.bias_correction2_sqrt).collect();
    let step = CpuStep { decay: s.decay, beta1: s.beta1, beta2: s.beta2, eps: s.eps, step_sizes: &step_sizes, bias_correction2_sqrts: &bias_correction2_sqrts };
    // SAFETY: `layout` checked that every buffer is a contiguous CPU tensor of its dtype (f32 moments for
    // bf16/f16) with the parameter's element count; `members` borrows them for the call, and a parameter,
    // its gradient and its moments are distinct tensors.
    unsafe { shim::adamw_cpu(&raw(members), layout.dtype(), &step) }.map_err(FusedError::from_shim)
}

/// The scalars of one [`adamw_aten`] call that every member shares.
#[derive(Clone, Copy, Debug)]
pub struct AtenScalars {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// ATen decays by `1 − lr·weight_decay`.
    pub weight_decay: f64,
    pub eps: f64,
}

/// One AdamW step of `members` with ATen's `_fused_adamw_`; `steps[i]` is `members[i]`'s own step count
/// (this step included). f32 or f64 on any device.
pub fn adamw_aten(members: &[Buffers<'_>], s: &AtenScalars, steps: &[u64]) -> Result<(), FusedError> {
    let layout = layout(members).ok_or(FusedError::NotCovered("not one dense dtype (f32, f64) with matching moments"))?;
    if layout.mixed_precision() || steps.len() != members.len() {
        return Err(FusedError::NotCovered("ATen's kernel takes f32 or f64 with moments of the same dtype, one step count each"));
    }
    let params: Vec<*mut c_void> = members.iter().map(|b| shim::handle(b.param)).collect();
    let grads: Vec<*mut c_void> = members.iter().map(|b| shim::handle(b.grad)).collect();
    let first: Vec<*mut c_void> = members.iter().map(|b| shim::handle(b.first_moment)).collect();
    let second: Vec<*mut c_void> = members.iter().map(|b| shim::handle(b.second_moment)).collect();
    let steps: Vec<f64> = steps.iter().map(|&t| t as f64).collect();
    let step = AtenStep { steps: &steps, lr: s.lr, beta1: s.beta1, beta2: s.beta2, weight_decay: s.weight_decay, eps: s.eps };
    // SAFETY: every handle is an `at::Tensor*` of a tch tensor that `members` borrows for the call.
    unsafe { shim::fused_adamw(&params, &grads, &first, &second, &step) }.map_err(FusedError::from_shim)
}

/// Σ x² of each tensor in one parallel pass whose result does not depend on the thread count: f64 tensors
/// in f64; narrower ones squared in f32 (exactly for bf16 and f16) and summed in f32 over runs of 1024 values,
/// then in f64 (f32's precision, ~1e-7 relative). NaN or ±Inf anywhere makes a sum non-finite, as does a square's
/// overflow (|x| beyond 1.8e19 in f32, 1.3e154 in f64). Takes dense contiguous CPU tensors of f32, f64, bf16
/// or f16; [`FusedError::NotCovered`] for anything else.
pub fn sum_squares(tensors: &[&Tensor]) -> Result<Vec<f64>, FusedError> {
    let mut dtypes = Vec::with_capacity(tensors.len());
    for t in tensors {
        let dtype = match t.kind() {
            Kind::Float => DType::F32,
            Kind::Double => DType::F64,
            Kind::BFloat16 => DType::BF16,
            Kind::Half => DType::F16,
            _ => return Err(FusedError::NotCovered("sums of squares take f32, f64, bf16 or f16")),
        };
        if t.device() != Device::Cpu || t.is_sparse() || !t.is_contiguous() {
            return Err(FusedError::NotCovered("sums of squares take dense contiguous CPU tensors"));
        }
        dtypes.push(dtype);
    }
    let buffers: Vec<*mut c_void> = tensors.iter().map(|t| t.data_ptr()).collect();
    let numels: Vec<i64> = tensors.iter().map(|t| t.numel() as i64).collect();
    // SAFETY: contiguous CPU tensors of the given dtypes and element counts, borrowed for the call.
    unsafe { shim::sum_squares(&buffers, &numels, &dtypes) }.map_err(FusedError::from_shim)
}

/// The fused CPU step's memory traffic with no arithmetic that changes a value: over the same buffers, in
/// the same split over threads, it reads θ, g, m, v and writes θ, m, v back (each `x + g·0`). Its time is the
/// step's memory-traffic floor on this machine (28 bytes per f32 element); `benches/optimizer_step.rs`
/// reports the step against it. Takes f32 CPU members only; returns the number of elements it moved.
pub fn stream_probe(members: &[Buffers<'_>]) -> Result<usize, FusedError> {
    if members.is_empty() {
        return Ok(0);
    }
    match layout(members) {
        Some(Layout { device: Device::Cpu, kind: Kind::Float }) => {}
        _ => return Err(FusedError::NotCovered("the stream probe takes f32 CPU tensors")),
    }
    let group = raw(members);
    // SAFETY: as for adamw_cpu, with f32 buffers.
    unsafe { shim::stream_probe(&group) }.map_err(FusedError::from_shim)?;
    Ok(group.numels.iter().sum::<i64>() as usize)
}

/// The correctly rounded square root of a contiguous CPU tensor of f32 or f64 values, computed by the shim
/// over libtorch's thread pool; None where it cannot take the tensor (another device or dtype, a strided
/// tensor, a build without the shim), and the caller then uses libtorch's `sqrt`.
///
/// libtorch's own CPU `sqrt` is, on x86 builds with MKL below AVX-512, MKL's `vsSqrt`, which lies one unit in
/// the last place from the correctly rounded value for about one f32 value in five. The reference path takes
/// this one, like the fused CPU loop, so that the two paths are bit-identical; otherwise those roundings, tiny
/// per step, grow through training to ~1e-6 relative after 200 steps.
pub fn correctly_rounded_sqrt(t: &Tensor) -> Option<Tensor> {
    let dtype = match t.kind() {
        Kind::Float => DType::F32,
        Kind::Double => DType::F64,
        _ => return None,
    };
    if t.device() != Device::Cpu || !t.is_contiguous() {
        return None;
    }
    let out = t.empty_like();
    // SAFETY: `t` and `out` are contiguous CPU tensors of `t.numel()` values of `dtype`, held for the call.
    unsafe { shim::sqrt_cpu(t.data_ptr(), out.data_ptr(), t.numel() as i64, dtype) }.ok()?;
    Some(out)
}

//! The fused AdamW step: one pass per `(lr, wd)` group over parameters, gradients and both moments,
//! instead of the reference path's ~10 tensor ops (each a full sweep over memory) per parameter.
//!
//! Two kernels, both in the C++ shim `csrc/fused_adamw.cpp` (compiled by `build.rs`), picked by device:
//! - **CPU**: one loop per group, parallel over libtorch's own OpenMP thread pool, that reads θ, g, m, v
//!   once and writes θ, m, v once, in the reference path's order of operations and roundings, without
//!   FMA, with the correctly rounded sqrt that the reference path also takes ([`correctly_rounded_sqrt`]).
//!   It is bit-identical to [`WidthScaledAdamW::reference_step_group`] (tests/fused_parity.rs: 0 difference
//!   after 200 training steps), and as close to libtorch's C++ AdamW as that is:
//!   ```text
//!   theta ← theta · (1 − lr·wd)                       (coupled; independent: theta · (1 − wd))
//!   first_moment  ← beta1 · first_moment  + (1 − beta1) · g
//!   second_moment ← beta2 · second_moment + (1 − beta2) · g²
//!   theta ← theta − (first_moment / (sqrt(second_moment) / sqrt(1 − beta2^t) + eps)) · lr / (1 − beta1^t)
//!   ```
//! - **CUDA** (and CPU with [`CpuKernel::Aten`]): ATen's `_fused_adamw_`, the kernel of
//!   `torch.optim.AdamW(fused=True)`, one call per group. It decays by `(1 − lr·wd')`, so independent
//!   decay passes `wd' = wd / lr`. It rounds differently from the reference path (lerp, FMA), so such
//!   runs agree with it to float precision, not bit for bit. (The CUDA path has not run yet: the
//!   development machine has no GPU; `scripts/device-check.sh` checks it on one.)
//!
//! Covered: dense, contiguous `f32` or `f64` parameters whose gradient and moments have the parameter's
//! dtype and device; on the CPU also mixed precision, `bf16` or `f16` parameters and gradients with `f32`
//! moments (the loop widens θ and g to f32, steps in f32 and rounds θ back to nearest even, as the
//! reference path does). A group with any other member (mixed precision on CUDA, a sparse or strided
//! gradient, members on several devices), an independent-decay CUDA group at `lr = 0`, every group when
//! the shim is not built, and a group the kernel refuses (logged once) take the reference path. The state
//! is the same tensors in both paths, so either path resumes the other's checkpoint.

use std::sync::Once;

use tch::{Device, Kind, Tensor};

use crate::optim::{CpuKernel, DecayMode, StepReport, WidthScaledAdamW};

/// Steps every group, with the fused kernel where it covers the group and the reference path
/// elsewhere. Returns false when the fused kernel is not available at all, in which case the caller runs
/// the reference path.
pub(crate) fn step_groups(opt: &mut WidthScaledAdamW, t: u64, lr_mult: f64, wd_mult: f64, report: &mut StepReport) -> bool {
    if !available() {
        return false;
    }
    for gi in 0..opt.groups.len() {
        if !step_group(opt, gi, t, lr_mult, wd_mult, report) {
            opt.reference_step_group(gi, t, lr_mult, wd_mult, report);
        }
    }
    true
}

/// Whether this build carries the shim to ATen's fused kernel.
pub fn available() -> bool {
    cfg!(gainguard_fused_shim)
}

/// A group's members with a gradient, all of which one kernel call can take.
struct Covered {
    /// (slot index, its gradient).
    members: Vec<(usize, Tensor)>,
    /// Members without a gradient.
    skipped: usize,
    /// The members' device and dtype; None when no member has a gradient.
    common: Option<(Device, Kind)>,
}

/// The group's members with a gradient, or None when one of them is not covered by the fused kernels
/// (dtype, device, layout), in which case the whole group takes the reference path.
fn covered_members(opt: &WidthScaledAdamW, gi: usize) -> Option<Covered> {
    let group = &opt.groups[gi];
    let mut covered = Covered { members: Vec::with_capacity(group.members.len()), skipped: 0, common: None };
    for &si in &group.members {
        let slot = &opt.slots[si];
        let grad = slot.tensor.grad();
        if !grad.defined() {
            covered.skipped += 1;
            continue;
        }
        let (kind, device) = (slot.tensor.kind(), slot.tensor.device());
        // f32/f64 with moments of the same dtype anywhere; bf16/f16 with f32 moments on the CPU only (ATen's
        // kernel wants one dtype for all four).
        let moment_kind = match kind {
            Kind::Float | Kind::Double => Some(kind),
            Kind::BFloat16 | Kind::Half if device == Device::Cpu => Some(Kind::Float),
            _ => None,
        };
        let ok = moment_kind.is_some_and(|mk| slot.first_moment.kind() == mk && slot.second_moment.kind() == mk)
            && *covered.common.get_or_insert((device, kind)) == (device, kind)
            && grad.kind() == kind
            && grad.device() == device
            && slot.first_moment.device() == device
            && slot.second_moment.device() == device
            && !grad.is_sparse()
            && slot.tensor.is_contiguous()
            && grad.is_contiguous()
            && slot.first_moment.is_contiguous()
            && slot.second_moment.is_contiguous();
        if !ok {
            return None;
        }
        covered.members.push((si, grad));
    }
    Some(covered)
}

/// Raw buffers of a CPU group for the shim: (params, grads, first moments, second moments, numels).
type RawGroup = (Vec<*mut std::ffi::c_void>, Vec<*mut std::ffi::c_void>, Vec<*mut std::ffi::c_void>, Vec<*mut std::ffi::c_void>, Vec<i64>);

fn raw_buffers(opt: &WidthScaledAdamW, members: &[(usize, Tensor)]) -> RawGroup {
    let raw = |t: &Tensor| t.data_ptr();
    (
        members.iter().map(|(si, _)| raw(&opt.slots[*si].tensor)).collect(),
        members.iter().map(|(_, g)| raw(g)).collect(),
        members.iter().map(|(si, _)| raw(&opt.slots[*si].first_moment)).collect(),
        members.iter().map(|(si, _)| raw(&opt.slots[*si].second_moment)).collect(),
        members.iter().map(|(si, _)| opt.slots[*si].tensor.numel() as i64).collect(),
    )
}

/// The CPU fused step's memory traffic with no arithmetic that changes a value: over the same buffers,
/// in the same split over threads, it reads θ, g, m, v and writes θ, m, v back (each `x + g·0`), for
/// every group the fused CPU kernel covers with `f32` members. Its time is the step's memory-traffic
/// floor on this machine (28 bytes per element); `benches/optimizer_step.rs` reports the step against it.
/// Returns the number of elements it moved.
pub fn stream_probe(opt: &WidthScaledAdamW) -> Result<usize, String> {
    let mut elements = 0;
    for gi in 0..opt.groups.len() {
        let Some(Covered { members, common: Some((Device::Cpu, Kind::Float)), .. }) = covered_members(opt, gi) else {
            continue;
        };
        let group = raw_buffers(opt, &members);
        shim::stream_probe(&group)?;
        elements += group.4.iter().sum::<i64>() as usize;
    }
    Ok(elements)
}

/// One group in one pass. Returns false, having changed nothing, when the group is not covered or the
/// kernel refused it.
fn step_group(opt: &mut WidthScaledAdamW, gi: usize, t: u64, lr_mult: f64, wd_mult: f64, report: &mut StepReport) -> bool {
    let (beta1, beta2, eps) = (opt.config.beta1, opt.config.beta2, opt.config.eps);
    let (bias_correction1, bias_correction2) = opt.bias_corrections(t);
    let group = &opt.groups[gi];
    let lr = group.lr * lr_mult;
    let wd = group.weight_decay * wd_mult;

    let Some(Covered { members, skipped, common }) = covered_members(opt, gi) else {
        return false;
    };
    let Some((device, kind)) = common else {
        report.skipped_without_grad += skipped;
        return true;
    };

    let mixed = matches!(kind, Kind::BFloat16 | Kind::Half);
    let result = if device == Device::Cpu && (opt.config.cpu_kernel == CpuKernel::Exact || mixed) {
        // θ·(1 − lr·wd) or θ·(1 − wd), as the reference path computes it.
        let decay = match opt.config.decay {
            DecayMode::Coupled => 1.0 - lr * wd,
            DecayMode::Independent => 1.0 - wd,
        };
        let group = raw_buffers(opt, &members);
        let scalars = shim::Scalars {
            decay,
            beta1,
            beta2,
            bias_correction2_sqrt: bias_correction2.sqrt(),
            eps,
            step_size: lr / bias_correction1,
        };
        let dtype = match kind {
            Kind::Float => shim::DType::F32,
            Kind::Double => shim::DType::F64,
            Kind::BFloat16 => shim::DType::BF16,
            _ => shim::DType::F16,
        };
        shim::adamw_cpu(&group, dtype, &scalars)
    } else {
        // CUDA, or CPU with `CpuKernel::Aten`: ATen's kernel, which decays by (1 − lr·wd'); independent
        // decay (1 − wd) needs wd' = wd / lr.
        let kernel_wd = match opt.config.decay {
            DecayMode::Coupled => wd,
            DecayMode::Independent if wd == 0.0 => 0.0,
            DecayMode::Independent if lr != 0.0 => wd / lr,
            DecayMode::Independent => return false,
        };
        let handle = |t: &Tensor| t.as_ptr() as *mut std::ffi::c_void;
        let params: Vec<_> = members.iter().map(|(si, _)| handle(&opt.slots[*si].tensor)).collect();
        let grads: Vec<_> = members.iter().map(|(_, g)| handle(g)).collect();
        let first: Vec<_> = members.iter().map(|(si, _)| handle(&opt.slots[*si].first_moment)).collect();
        let second: Vec<_> = members.iter().map(|(si, _)| handle(&opt.slots[*si].second_moment)).collect();
        shim::fused_adamw(&params, &grads, &first, &second, t as f64, lr, beta1, beta2, kernel_wd, eps)
    };
    if let Err(e) = result {
        // Every member passed the kernels' argument checks above (dtype, device, layout), so a refusal
        // here is unexpected; the reference path then steps the group.
        static LOGGED: Once = Once::new();
        LOGGED.call_once(|| eprintln!("gainguard: fused AdamW step failed, using the reference path: {e}"));
        return false;
    }
    report.skipped_without_grad += skipped;
    true
}

/// Limits libtorch's intra-op parallelism (its OpenMP team and MKL's) **for the calling thread only** to
/// `threads`, leaving every other thread's setting, and the process-wide default that `tch::set_num_threads`
/// would change, as they are. Used by the spectra worker. Returns false when this build has no shim.
/// (It lives here because it is part of the C++ shim.)
pub fn limit_this_thread(threads: usize) -> bool {
    shim::limit_this_thread(threads.clamp(1, i32::MAX as usize) as i32)
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
    let n = t.numel() as i64;
    shim::sqrt_cpu(t.data_ptr(), out.data_ptr(), n, dtype).ok()?;
    Some(out)
}

/// The parameter dtype codes of the shim's CPU loop (`gainguard_adamw_cpu`'s `dtype`).
#[derive(Clone, Copy)]
enum DType {
    /// f32 parameters and moments.
    F32 = 0,
    /// f64 parameters and moments.
    F64 = 1,
    /// bf16 parameters and gradients, f32 moments.
    BF16 = 2,
    /// f16 parameters and gradients, f32 moments.
    F16 = 3,
}

/// The per-step scalars of the CPU loop, in f64; the loop rounds each once to the parameters' dtype.
struct Scalars {
    decay: f64,
    beta1: f64,
    beta2: f64,
    bias_correction2_sqrt: f64,
    eps: f64,
    step_size: f64,
}

#[cfg(gainguard_fused_shim)]
mod shim {
    use std::ffi::{c_char, c_int, c_void, CStr};

    pub(super) use super::{DType, RawGroup, Scalars};

    extern "C" {
        fn gainguard_adamw_cpu(
            params: *const *mut c_void,
            grads: *const *mut c_void,
            exp_avgs: *const *mut c_void,
            exp_avg_sqs: *const *mut c_void,
            numels: *const i64,
            n: usize,
            dtype: c_int,
            decay: f64,
            beta1: f64,
            beta2: f64,
            bias_correction2_sqrt: f64,
            eps: f64,
            step_size: f64,
            err: *mut c_char,
            cap: usize,
        ) -> c_int;

        fn gainguard_limit_this_thread(threads: c_int);

        fn gainguard_sqrt_cpu(input: *const c_void, out: *mut c_void, n: i64, dtype: c_int, err: *mut c_char, cap: usize) -> c_int;

        fn gainguard_stream_probe(
            params: *const *mut c_void,
            grads: *const *mut c_void,
            exp_avgs: *const *mut c_void,
            exp_avg_sqs: *const *mut c_void,
            numels: *const i64,
            n: usize,
            err: *mut c_char,
            cap: usize,
        ) -> c_int;

        fn gainguard_fused_adamw(
            params: *const *mut c_void,
            grads: *const *mut c_void,
            exp_avgs: *const *mut c_void,
            exp_avg_sqs: *const *mut c_void,
            n: usize,
            step: f64,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
            err: *mut c_char,
            cap: usize,
        ) -> c_int;
    }

    fn error_text(err: &[c_char]) -> String {
        // SAFETY: the shim NUL-terminates within the buffer it was given.
        unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned()
    }

    /// Runs a shim call that reports failure as 1 and a message in the buffer it is given.
    fn checked(call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
        let mut err = vec![0 as c_char; 1024];
        if call(err.as_mut_ptr(), err.len()) == 0 {
            Ok(())
        } else {
            Err(error_text(&err))
        }
    }

    /// The CPU loop over raw contiguous buffers that outlive the call (`numels[i]` elements each).
    pub(super) fn adamw_cpu(group: &RawGroup, dtype: DType, s: &Scalars) -> Result<(), String> {
        let (params, grads, exp_avgs, exp_avg_sqs, numels) = group;
        let n = params.len();
        assert!(grads.len() == n && exp_avgs.len() == n && exp_avg_sqs.len() == n && numels.len() == n);
        // SAFETY: every buffer belongs to a live, contiguous tensor of the given dtype with `numels[i]`
        // elements, held by the caller; parameters, gradients and moments do not overlap.
        checked(|err, cap| unsafe {
            gainguard_adamw_cpu(
                params.as_ptr(),
                grads.as_ptr(),
                exp_avgs.as_ptr(),
                exp_avg_sqs.as_ptr(),
                numels.as_ptr(),
                n,
                dtype as c_int,
                s.decay,
                s.beta1,
                s.beta2,
                s.bias_correction2_sqrt,
                s.eps,
                s.step_size,
                err,
                cap,
            )
        })
    }

    pub(super) fn limit_this_thread(threads: c_int) -> bool {
        // SAFETY: sets thread-local runtime settings only.
        unsafe { gainguard_limit_this_thread(threads) };
        true
    }

    /// `n` contiguous values of `dtype` (F32 or F64) at `input` and at `out`, which may be the same buffer.
    pub(super) fn sqrt_cpu(input: *mut c_void, out: *mut c_void, n: i64, dtype: DType) -> Result<(), String> {
        // SAFETY: the caller passes the buffers of live contiguous CPU tensors of `n` elements of `dtype`.
        checked(|err, cap| unsafe { gainguard_sqrt_cpu(input, out, n, dtype as c_int, err, cap) })
    }

    /// The probe over f32 buffers as [`adamw_cpu`] takes them.
    pub(super) fn stream_probe(group: &RawGroup) -> Result<(), String> {
        let (params, grads, exp_avgs, exp_avg_sqs, numels) = group;
        let n = params.len();
        assert!(grads.len() == n && exp_avgs.len() == n && exp_avg_sqs.len() == n && numels.len() == n);
        // SAFETY: as for adamw_cpu: live, contiguous, non-overlapping f32 buffers of `numels[i]` elements.
        checked(|err, cap| unsafe {
            gainguard_stream_probe(params.as_ptr(), grads.as_ptr(), exp_avgs.as_ptr(), exp_avg_sqs.as_ptr(), numels.as_ptr(), n, err, cap)
        })
    }

    /// `_fused_adamw_` over `at::Tensor*` handles that outlive the call; returns the C++ exception text.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fused_adamw(
        params: &[*mut c_void],
        grads: &[*mut c_void],
        exp_avgs: &[*mut c_void],
        exp_avg_sqs: &[*mut c_void],
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> Result<(), String> {
        let n = params.len();
        assert!(grads.len() == n && exp_avgs.len() == n && exp_avg_sqs.len() == n);
        // SAFETY: every pointer is a live `at::Tensor*` owned by a tch `Tensor` the caller holds; the shim
        // catches all C++ exceptions.
        checked(|err, cap| unsafe {
            gainguard_fused_adamw(
                params.as_ptr(),
                grads.as_ptr(),
                exp_avgs.as_ptr(),
                exp_avg_sqs.as_ptr(),
                n,
                step,
                lr,
                beta1,
                beta2,
                weight_decay,
                eps,
                err,
                cap,
            )
        })
    }
}

#[cfg(not(gainguard_fused_shim))]
mod shim {
    pub(super) use super::{DType, RawGroup, Scalars};

    const NO_SHIM: &str = "built without the fused AdamW shim";

    pub(super) fn adamw_cpu(_: &RawGroup, _: DType, _: &Scalars) -> Result<(), String> {
        Err(NO_SHIM.into())
    }

    pub(super) fn limit_this_thread(_: i32) -> bool {
        false
    }

    pub(super) fn sqrt_cpu(_: *mut std::ffi::c_void, _: *mut std::ffi::c_void, _: i64, _: DType) -> Result<(), String> {
        Err(NO_SHIM.into())
    }

    pub(super) fn stream_probe(_: &RawGroup) -> Result<(), String> {
        Err(NO_SHIM.into())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn fused_adamw(
        _: &[*mut std::ffi::c_void],
        _: &[*mut std::ffi::c_void],
        _: &[*mut std::ffi::c_void],
        _: &[*mut std::ffi::c_void],
        _: f64,
        _: f64,
        _: f64,
        _: f64,
        _: f64,
        _: f64,
    ) -> Result<(), String> {
        Err(NO_SHIM.into())
    }
}

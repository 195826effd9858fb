//! The fused AdamW step: one pass per `(lr, wd)` group over parameters, gradients and both moments.
//!
//! It calls ATen's `_fused_adamw_`, the kernel behind `torch.optim.AdamW(fused=True)`, through a small
//! C++ shim (`csrc/fused_adamw.cpp`, compiled by `build.rs`). The kernel exists for CPU and CUDA; the
//! dispatcher picks it from the tensors' device. Per element it computes the same update as the
//! reference path ([`WidthScaledAdamW::reference_step_group`]):
//!
//! ```text
//! theta ← theta · (1 − lr·wd')
//! first_moment  ← lerp(first_moment, g, 1 − beta1)
//! second_moment ← beta2 · second_moment + (1 − beta2) · g²
//! theta ← theta − lr / (1 − beta1^t) · first_moment / (sqrt(second_moment) / sqrt(1 − beta2^t) + eps)
//! ```
//!
//! with `wd' = wd` for coupled decay and `wd' = wd / lr` for independent decay (so `lr·wd' = wd`).
//!
//! Covered: dense, contiguous `f32` or `f64` parameters whose gradient and moments have the parameter's
//! dtype and device. A group with any other member (a `bf16` or `f16` parameter with `f32` moments, a
//! sparse or strided gradient, members on several devices), or an independent-decay group at `lr = 0`, takes the reference path, as
//! does every group when the shim is not built or the kernel throws (logged once). The state is the same
//! tensors in both paths, so either path resumes the other's checkpoint.

use std::sync::Once;

use tch::{Device, Kind, Tensor};

use crate::optim::{DecayMode, StepReport, WidthScaledAdamW};

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

/// One group through the fused kernel. Returns false, having changed nothing, when the group is not
/// covered or the kernel refused it.
fn step_group(opt: &mut WidthScaledAdamW, gi: usize, t: u64, lr_mult: f64, wd_mult: f64, report: &mut StepReport) -> bool {
    let (beta1, beta2, eps) = (opt.config.beta1, opt.config.beta2, opt.config.eps);
    let group = &opt.groups[gi];
    let lr = group.lr * lr_mult;
    let wd = group.weight_decay * wd_mult;
    // The kernel decays by (1 − lr·wd'); independent decay (1 − wd) needs wd' = wd / lr.
    let kernel_wd = match opt.config.decay {
        DecayMode::Coupled => wd,
        DecayMode::Independent if wd == 0.0 => 0.0,
        DecayMode::Independent if lr != 0.0 => wd / lr,
        DecayMode::Independent => return false,
    };

    // Members with a gradient; the kernel takes them in one call when they share device and dtype.
    let mut skipped = 0;
    let mut members: Vec<(usize, Tensor)> = Vec::with_capacity(group.members.len());
    let mut common: Option<(Device, Kind)> = None;
    for &si in &group.members {
        let slot = &opt.slots[si];
        let grad = slot.tensor.grad();
        if !grad.defined() {
            skipped += 1;
            continue;
        }
        let (kind, device) = (slot.tensor.kind(), slot.tensor.device());
        let covered = matches!(kind, Kind::Float | Kind::Double)
            && *common.get_or_insert((device, kind)) == (device, kind)
            && slot.first_moment.kind() == kind
            && slot.second_moment.kind() == kind
            && grad.kind() == kind
            && grad.device() == device
            && slot.first_moment.device() == device
            && slot.second_moment.device() == device
            && !grad.is_sparse()
            && slot.tensor.is_contiguous()
            && grad.is_contiguous()
            && slot.first_moment.is_contiguous()
            && slot.second_moment.is_contiguous();
        if !covered {
            return false;
        }
        members.push((si, grad));
    }

    let ptr = |t: &Tensor| t.as_ptr() as *mut std::ffi::c_void;
    let params: Vec<_> = members.iter().map(|(si, _)| ptr(&opt.slots[*si].tensor)).collect();
    let grads: Vec<_> = members.iter().map(|(_, g)| ptr(g)).collect();
    let first: Vec<_> = members.iter().map(|(si, _)| ptr(&opt.slots[*si].first_moment)).collect();
    let second: Vec<_> = members.iter().map(|(si, _)| ptr(&opt.slots[*si].second_moment)).collect();
    if let Err(e) = shim::fused_adamw(&params, &grads, &first, &second, t as f64, lr, beta1, beta2, kernel_wd, eps) {
        // Every member passed the kernel's own argument checks above (dtype, device, layout), so a
        // refusal here is unexpected; the reference path then steps the group.
        static LOGGED: Once = Once::new();
        LOGGED.call_once(|| eprintln!("gainguard: fused AdamW step failed, using the reference path: {e}"));
        return false;
    }
    report.skipped_without_grad += skipped;
    true
}

#[cfg(gainguard_fused_shim)]
mod shim {
    use std::ffi::{c_char, c_int, c_void, CStr};

    extern "C" {
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
        let mut err = vec![0 as c_char; 1024];
        // SAFETY: every pointer is a live `at::Tensor*` owned by a tch `Tensor` the caller holds; the shim
        // catches all C++ exceptions.
        let rc = unsafe {
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
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            // SAFETY: the shim NUL-terminates within `cap`.
            Err(unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned())
        }
    }
}

#[cfg(not(gainguard_fused_shim))]
mod shim {
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
        Err("built without the fused AdamW shim".into())
    }
}

//! The optimizer's settings ([`AdamWConfig`]) and their enums: the decay convention, what a non-finite
//! gradient does, the fused CPU kernel; and the optimizer's errors.

use crate::classify::Override;
use crate::plan::PlanError;
use crate::rule::Rule;
use crate::schedule::Schedule;

/// How weight decay enters the update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecayMode {
    /// PyTorch/libtorch AdamW: `theta ← theta·(1 − lr·wd)`. The `sqrt(lr/wd)` law holds for this one.
    Coupled,
    /// `theta ← theta·(1 − wd)`, decoupled from the learning rate.
    Independent,
}

/// What a step does when a gradient holds NaN or ±Inf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFiniteGrad {
    /// Change nothing (no parameter, moment or per-parameter step count), count the step in
    /// [`super::StepReport::skipped_steps_total`] and say so once in the log. Training goes on with the next batch.
    #[default]
    Skip,
    /// Step anyway, as `torch.optim.AdamW` does (the NaN spreads into the parameters and moments), and skip
    /// the check too, saving its read of the gradients: [`super::StepReport::grad_norm`] and
    /// [`super::StepReport::nonfinite_grad`] are then only reported when clipping computes the norm.
    Step,
    /// [`super::WidthScaledAdamW::try_step`] returns [`OptimError::NonFiniteGradient`] naming the parameter, having
    /// changed nothing. [`super::WidthScaledAdamW::step`], which cannot return an error, logs it and skips.
    Error,
}

impl NonFiniteGrad {
    /// What step `step` does, given the first parameter whose gradient holds NaN or Inf (None: all finite)
    /// and the global gradient norm: `Ok(true)` skips it, `Ok(false)` steps, and under
    /// [`NonFiniteGrad::Error`] the error to return, nothing having changed. The Rust optimizer and the
    /// Python package both decide through this.
    pub fn decide(self, nonfinite: Option<&str>, step: u64, grad_norm: Option<f64>) -> Result<bool, OptimError> {
        match (nonfinite, self) {
            (None, _) | (Some(_), NonFiniteGrad::Step) => Ok(false),
            (Some(_), NonFiniteGrad::Skip) => Ok(true),
            (Some(param), NonFiniteGrad::Error) => {
                Err(OptimError::NonFiniteGradient { param: param.to_string(), step, grad_norm: grad_norm.unwrap_or(f64::NAN) })
            }
        }
    }
}

/// Settings of the optimizer. `lr` and `weight_decay` are the proxy's tuned base values.
#[derive(Clone, Debug)]
pub struct AdamWConfig {
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub decay: DecayMode,
    /// Clip the global gradient norm to this value before the step (PyTorch's `clip_grad_norm_`).
    pub max_grad_norm: Option<f64>,
    pub rule: Rule,
    pub overrides: Vec<Override>,
    pub schedule: Schedule,
    /// Whether the schedule multiplies weight decay too (it always multiplies lr). Under coupled decay the
    /// per-step decay `lr_t·wd_t` then follows the schedule **squared**, as in PyTorch when a scheduler sets
    /// both a group's `lr` and its `weight_decay`.
    pub schedule_weight_decay: bool,
    /// Use the fused step where it covers the parameters' dtype and device.
    pub fused: bool,
    /// Which kernel the fused step uses on CPU (CUDA always uses ATen's `_fused_adamw_`).
    pub cpu_kernel: CpuKernel,
    /// What a step does when a gradient holds NaN or Inf.
    pub nonfinite_grad: NonFiniteGrad,
}

/// The fused step's CPU kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuKernel {
    /// gainguard's own loop in libtorch AdamW's order of roundings (no FMA, no lerp) with the correctly rounded
    /// sqrt: bit-identical to the reference path (tests/fused_parity.rs), and ≤ 1e-6 relative from
    /// `tch::COptimizer::adamw` over 200 steps (tests/optim_parity.rs; libtorch's CPU sqrt may be MKL's).
    #[default]
    Exact,
    /// ATen's `_fused_adamw_`, the kernel behind `torch.optim.AdamW(fused=True)` (lerp and FMA): the same
    /// update rounded differently; after 200 steps of the example model it is ~5e-7 relative from libtorch's
    /// AdamW, as close as `Exact` (tests/optim_parity.rs).
    Aten,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            decay: DecayMode::Coupled,
            max_grad_norm: None,
            rule: Rule::default(),
            overrides: Vec::new(),
            schedule: Schedule::Constant,
            schedule_weight_decay: false,
            fused: true,
            cpu_kernel: CpuKernel::Exact,
            nonfinite_grad: NonFiniteGrad::Skip,
        }
    }
}

impl AdamWConfig {
    /// Checks the settings the optimizer cannot step with; the error names the setting and its value.
    pub(crate) fn check(&self) -> Result<(), OptimError> {
        for (name, v, lo, hi) in [
            ("beta1", self.beta1, 0.0, 1.0),
            ("beta2", self.beta2, 0.0, 1.0),
            ("eps", self.eps, 0.0, f64::INFINITY),
        ] {
            if !(v.is_finite() && v >= lo && v < hi) {
                return Err(OptimError::BadSetting(name, v));
            }
        }
        if let Some(max) = self.max_grad_norm {
            if !(max.is_finite() && max > 0.0) {
                return Err(OptimError::BadSetting("max_grad_norm", max));
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("optimizer checkpoint `{path}`: {reason}")]
    Checkpoint { path: String, reason: String },
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{0} = {1} must be finite and in its range")]
    BadSetting(&'static str, f64),
    #[error("step {step}: the gradient of `{param}` holds NaN or Inf (global gradient norm {grad_norm}); nothing was changed (nonfinite_grad = error)")]
    NonFiniteGradient { param: String, step: u64, grad_norm: f64 },
}

//! Width-scaled AdamW: the optimizer step and its state.
//!
//! Every parameter has its own width-scaled `(lr, wd)` from the [`ScalingPlan`] (and its Adam epsilon from the
//! rule); a [`Schedule`] multiplies lr (and optionally wd) per step. The update is PyTorch's AdamW with coupled
//! decay (docs/design.md §1.4), written out once in
//! [`StepScalars`]. As in `torch.optim.AdamW`:
//! - a parameter whose gradient is undefined at `step()` is skipped entirely (no decay, no moment update), and
//!   [`WidthScaledAdamW::zero_grad`] leaves gradients undefined (`zero_grad(set_to_none=True)`);
//! - each parameter keeps its own step count (`state['step']`), so its bias corrections count the steps that
//!   were applied to it; both survive [`save`](WidthScaledAdamW::save) / [`load`](WidthScaledAdamW::load).
//!
//! Before anything changes, a step checks the gradients: their global norm (which clipping uses) and whether any
//! holds NaN or Inf. A non-finite gradient skips the step by default ([`NonFiniteGrad`]).
//!
//! Parameters that share one `(lr, wd, eps)` form a group; the groups are fixed at construction and only
//! [`WidthScaledAdamW::regroup`] changes them. Two paths step a group, chosen here per group:
//! - the fused kernels of [`crate::fused`] (one pass over the group's buffers) where they cover its tensors;
//! - the reference path, written with libtorch tensor ops one parameter at a time, elsewhere.
//! Both keep the same state, so either one resumes the other's checkpoint.

use std::path::Path;
use std::sync::Once;

use tch::{Device, Kind, Tensor};

use crate::classify::{BaseShapes, Override, ParamClass};
use crate::fused::{self, BiasCorrection, Buffers};
use crate::plan::{ParamSpec, PlanError, ScalingPlan};
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
    /// [`StepReport::skipped_steps_total`] and say so once in the log. Training goes on with the next batch.
    #[default]
    Skip,
    /// Step anyway, as `torch.optim.AdamW` does (the NaN spreads into the parameters and moments), and skip
    /// the check too, saving its read of the gradients: [`StepReport::grad_norm`] and
    /// [`StepReport::nonfinite_grad`] are then only reported when clipping computes the norm.
    Step,
    /// [`WidthScaledAdamW::try_step`] returns [`OptimError::NonFiniteGradient`] naming the parameter, having
    /// changed nothing. [`WidthScaledAdamW::step`], which cannot return an error, logs it and skips.
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

/// One parameter the optimizer steps, with its state.
pub struct ParamSlot {
    pub name: String,
    pub tensor: Tensor,
    pub first_moment: Tensor,
    pub second_moment: Tensor,
    /// Steps applied to this parameter (torch's `state['step']`): steps at which it had no gradient, or that
    /// were skipped for a non-finite gradient, do not count. Its bias corrections use this count.
    pub step: u64,
    /// Its decay horizon `H = Σ_t (1 − decay_t)` over the steps applied to it: `Σ lr_t·wd_t` under coupled
    /// decay, `Σ wd_t` under independent decay (width-scaled values, schedule included). One unit is one
    /// timescale of weight decay; below a few units the weights are mostly their decayed initialisation.
    pub decay_horizon: f64,
    /// Index into the plan's decisions.
    pub decision: usize,
    /// Index into the groups.
    pub group: usize,
}

/// Parameters that share one width-scaled `(lr, wd)` and Adam epsilon.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub lr: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub class: ParamClass,
    pub members: Vec<usize>,
}

/// What one step did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepReport {
    /// Number of `step()` calls so far, this one included (1 after the first), skipped ones too: the
    /// schedule's clock. Each parameter's own count is [`ParamSlot::step`].
    pub step: u64,
    pub lr_multiplier: f64,
    pub wd_multiplier: f64,
    /// Global 2-norm of the defined gradients before clipping, f64 for f64 gradients and f32's precision
    /// otherwise (None when no parameter
    /// had a gradient, or under [`NonFiniteGrad::Step`] without clipping). NaN or Inf when a gradient was not
    /// finite.
    pub grad_norm: Option<f64>,
    pub clipped: bool,
    /// Parameters skipped because they had no gradient.
    pub skipped_without_grad: usize,
    /// The first parameter (in the optimizer's order) whose gradient held NaN or Inf at this step.
    pub nonfinite_grad: Option<String>,
    /// True when this step changed nothing because of a non-finite gradient.
    pub skipped: bool,
    /// Steps skipped for a non-finite gradient so far, this one included
    /// (`gainguard_skipped_steps_total{reason="nonfinite_grad"}`).
    pub skipped_steps_total: u64,
}

/// Something that watches the optimizer step, such as the spectra sampler. It must return quickly:
/// it runs on the training thread.
pub trait StepObserver: Send {
    /// Called before the parameters change, with the step about to be taken (1-based).
    fn before_step(&mut self, _step: u64, _slots: &[ParamSlot]) {}
    /// Called after the step (also after a skipped one: see [`StepReport::skipped`]).
    fn after_step(&mut self, report: &StepReport, slots: &[ParamSlot], plan: &ScalingPlan);
}

/// The scalars of one AdamW step of one group, computed once per step. With g the gradient and t the
/// parameter's own step count, this one included (torch's `state['step']`):
///
/// ```text
/// first_moment  ← beta1 · first_moment  + (1 − beta1) · g
/// second_moment ← beta2 · second_moment + (1 − beta2) · g²
/// theta ← theta · decay − step_size(t) · first_moment / (sqrt(second_moment) / bias_correction2_sqrt(t) + eps)
///
/// decay = 1 − lr·wd (coupled, PyTorch's AdamW) or 1 − wd (independent)
/// step_size(t) = lr / (1 − beta1^t),   bias_correction2_sqrt(t) = sqrt(1 − beta2^t)
/// ```
///
/// `lr` and `wd` are the group's width-scaled values times this step's schedule multipliers. The decay is
/// applied first and the update to the decayed theta, as libtorch's AdamW (and torch's) order it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepScalars {
    pub lr: f64,
    pub weight_decay: f64,
    pub decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// What this step adds to a stepped parameter's decay horizon: `1 − decay`, as `lr·wd` or `wd`.
    pub horizon: f64,
    mode: DecayMode,
}

impl StepScalars {
    pub fn new(config: &AdamWConfig, group: &Group, lr_multiplier: f64, wd_multiplier: f64) -> StepScalars {
        let (beta1, beta2) = (config.beta1, config.beta2);
        StepScalars::of(group.lr * lr_multiplier, group.weight_decay * wd_multiplier, beta1, beta2, group.eps, config.decay)
    }

    /// The scalars for this step's `lr` and `weight_decay` as given (schedule already applied), for a caller
    /// that keeps its own groups (the Python package, whose `param_groups` a torch scheduler scales).
    pub fn of(lr: f64, weight_decay: f64, beta1: f64, beta2: f64, eps: f64, mode: DecayMode) -> StepScalars {
        let horizon = match mode {
            DecayMode::Coupled => lr * weight_decay,
            DecayMode::Independent => weight_decay,
        };
        StepScalars { lr, weight_decay, decay: 1.0 - horizon, beta1, beta2, eps, horizon, mode }
    }

    /// The bias corrections of a parameter at its own step `t` (1 for its first).
    pub fn bias_correction(&self, t: u64) -> BiasCorrection {
        let t = t as f64;
        BiasCorrection { step_size: self.lr / (1.0 - self.beta1.powf(t)), bias_correction2_sqrt: (1.0 - self.beta2.powf(t)).sqrt() }
    }

    /// The weight decay to hand ATen's kernel, which decays by `1 − lr·wd'`: `wd` when coupled, `wd / lr`
    /// when independent; None where no `wd'` gives `1 − wd` (lr = 0 with wd ≠ 0).
    fn aten_weight_decay(&self) -> Option<f64> {
        match self.mode {
            DecayMode::Coupled => Some(self.weight_decay),
            DecayMode::Independent if self.weight_decay == 0.0 => Some(0.0),
            DecayMode::Independent if self.lr != 0.0 => Some(self.weight_decay / self.lr),
            DecayMode::Independent => None,
        }
    }
}

/// Σ x² of each tensor from its libtorch norm, computed on its own device in f64 for f64 tensors and in f32
/// otherwise (a bf16 norm would keep 3 digits), read back together (one device synchronisation): for what
/// the fused pass does not take (other devices, layouts or dtypes).
fn libtorch_sum_squares(tensors: &[&Tensor]) -> Vec<f64> {
    if tensors.is_empty() {
        return Vec::new();
    }
    let norms: Vec<Tensor> = tensors
        .iter()
        .map(|g| {
            let kind = if g.kind() == Kind::Double { Kind::Double } else { Kind::Float };
            g.norm_scalaropt_dtype(2, kind).to_kind(Kind::Double).to_device(Device::Cpu)
        })
        .collect();
    let norms = Vec::<f64>::try_from(&Tensor::stack(&norms, 0)).unwrap_or_else(|_| vec![f64::NAN; tensors.len()]);
    norms.into_iter().map(|n| n * n).collect()
}

/// The gradients at a step, checked before anything changes.
struct GradientCheck {
    /// Each slot's gradient, None where it is undefined.
    grads: Vec<Option<Tensor>>,
    norm: Option<f64>,
    /// The first slot whose gradient holds NaN or Inf.
    nonfinite: Option<usize>,
}

/// The global 2-norm of the defined gradients (None when none is defined) and the index of the first one
/// holding NaN or Inf. The squares are summed in f64 (an f64 gradient stays f64, narrower ones are squared in
/// f32): in one fused pass over the dense CPU gradients ([`fused::sum_squares`]), per tensor with libtorch
/// elsewhere. The optimizer's check before a step; public for the Python package, which keeps its own tensors.
pub fn gradient_norm(grads: &[Option<Tensor>]) -> (Option<f64>, Option<usize>) {
    let mut sums: Vec<Option<f64>> = vec![None; grads.len()];
    let cpu: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].as_ref().is_some_and(|g| g.device() == Device::Cpu)).collect();
    let cpu_grads: Vec<&Tensor> = cpu.iter().filter_map(|&i| grads[i].as_ref()).collect();
    if let Ok(cpu_sums) = fused::sum_squares(&cpu_grads) {
        for (&i, v) in cpu.iter().zip(cpu_sums) {
            sums[i] = Some(v);
        }
    }
    let rest: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].is_some() && sums[i].is_none()).collect();
    let rest_grads: Vec<&Tensor> = rest.iter().filter_map(|&i| grads[i].as_ref()).collect();
    for (&i, v) in rest.iter().zip(libtorch_sum_squares(&rest_grads)) {
        sums[i] = Some(v);
    }
    // A non-finite sum is a NaN/Inf value, or an overflow of finite ones: tell them apart.
    let nonfinite = (0..grads.len()).find(|&i| {
        sums[i].is_some_and(|s| !s.is_finite()) && grads[i].as_ref().is_some_and(|g| !bool::try_from(g.isfinite().all()).unwrap_or(false))
    });
    let defined: Vec<f64> = sums.iter().flatten().copied().collect();
    let norm = (!defined.is_empty()).then(|| defined.iter().sum::<f64>().sqrt());
    (norm, nonfinite)
}

/// One AdamW step of `members` at their own steps `steps` (this step included), on buffers the caller owns:
/// one fused kernel call where a kernel covers them (the CPU loop on the CPU unless `cpu_kernel` is
/// [`CpuKernel::Aten`] for f32/f64, ATen's `_fused_adamw_` elsewhere), else the reference path per member. The
/// optimizer's step of one group; public for the Python package, whose moments live in torch's `state`.
pub fn step_buffers(members: &[Buffers<'_>], s: &StepScalars, steps: &[u64], fused: bool, cpu_kernel: CpuKernel) {
    if !(fused && fused_step(members, s, steps, cpu_kernel)) {
        for (b, &t) in members.iter().zip(steps) {
            reference_step(*b, s, t);
        }
    }
}

/// One fused kernel call for `buffers` (see [`step_buffers`]). Returns false, having changed nothing, when no
/// kernel covers them or the kernel refused them.
fn fused_step(buffers: &[Buffers<'_>], s: &StepScalars, steps: &[u64], cpu_kernel: CpuKernel) -> bool {
    let Some(layout) = fused::layout(buffers) else { return false };
    let result = if layout.device == Device::Cpu && (cpu_kernel == CpuKernel::Exact || layout.mixed_precision()) {
        let bias: Vec<BiasCorrection> = steps.iter().map(|&t| s.bias_correction(t)).collect();
        let shared = fused::CpuScalars { decay: s.decay, beta1: s.beta1, beta2: s.beta2, eps: s.eps };
        fused::adamw_cpu(buffers, &shared, &bias)
    } else {
        let Some(weight_decay) = s.aten_weight_decay() else { return false };
        let shared = fused::AtenScalars { lr: s.lr, beta1: s.beta1, beta2: s.beta2, weight_decay, eps: s.eps };
        fused::adamw_aten(buffers, &shared, steps)
    };
    match result {
        Ok(()) => true,
        Err(fused::FusedError::NoShim) => false,
        Err(e) => {
            // `layout` checked what the kernels check (dtype, device, layout), so a refusal here is
            // unexpected; the reference path then steps the group.
            static LOGGED: Once = Once::new();
            LOGGED.call_once(|| eprintln!("gainguard: fused AdamW step failed, using the reference path: {e}"));
            false
        }
    }
}

/// The reference path for one parameter at its own step `t`: libtorch tensor ops in libtorch AdamW's order.
fn reference_step(b: Buffers<'_>, s: &StepScalars, t: u64) {
    let bias = s.bias_correction(t);
    let (mut first_moment, mut second_moment) = (b.first_moment.shallow_clone(), b.second_moment.shallow_clone());
    let g = b.grad.to_kind(first_moment.kind());
    let mut theta = if b.param.kind() == first_moment.kind() { b.param.shallow_clone() } else { b.param.to_kind(first_moment.kind()) };
    if s.decay != 1.0 {
        let _ = theta.g_mul_scalar_(s.decay);
    }
    let _ = first_moment.g_mul_scalar_(s.beta1);
    let _ = first_moment.g_add_(&(&g * (1.0 - s.beta1)));
    let _ = second_moment.g_mul_scalar_(s.beta2);
    let _ = second_moment.g_add_(&(&g * &g * (1.0 - s.beta2)));
    // The correctly rounded sqrt, as the fused CPU loop takes (libtorch's CPU sqrt may be MKL's).
    let root = fused::correctly_rounded_sqrt(&second_moment).unwrap_or_else(|| second_moment.sqrt());
    let denom = root / bias.bias_correction2_sqrt + s.eps;
    let _ = theta.g_sub_(&(&first_moment / denom * bias.step_size));
    if b.param.kind() != theta.kind() {
        b.param.shallow_clone().copy_(&theta);
    }
}

pub struct WidthScaledAdamW {
    pub(crate) config: AdamWConfig,
    pub(crate) plan: ScalingPlan,
    pub(crate) slots: Vec<ParamSlot>,
    pub(crate) groups: Vec<Group>,
    pub(crate) step_t: u64,
    skipped_steps: u64,
    skip_logged: bool,
    observers: Vec<Box<dyn StepObserver>>,
}

impl WidthScaledAdamW {
    /// Builds the optimizer over every variable of `vs`, classified against `base`.
    pub fn new(vs: &tch::nn::VarStore, base: &BaseShapes, config: AdamWConfig) -> Result<Self, OptimError> {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Self::from_named(named, base, config)
    }

    /// Builds the optimizer over named tensors (tied weights may appear under several names).
    pub fn from_named(named: Vec<(String, Tensor)>, base: &BaseShapes, config: AdamWConfig) -> Result<Self, OptimError> {
        for (name, v, lo, hi) in [
            ("beta1", config.beta1, 0.0, 1.0),
            ("beta2", config.beta2, 0.0, 1.0),
            ("eps", config.eps, 0.0, f64::INFINITY),
        ] {
            if !(v.is_finite() && v >= lo && v < hi) {
                return Err(OptimError::BadSetting(name, v));
            }
        }
        if let Some(max) = config.max_grad_norm {
            if !(max.is_finite() && max > 0.0) {
                return Err(OptimError::BadSetting("max_grad_norm", max));
            }
        }
        let specs: Vec<ParamSpec> = named
            .iter()
            .map(|(n, t)| ParamSpec { name: n.clone(), shape: t.size(), storage: Some(t.data_ptr() as usize) })
            .collect();
        let plan = ScalingPlan::build(&specs, base, &config.overrides, config.rule, config.lr, config.weight_decay)?;
        let slots = named
            .into_iter()
            .enumerate()
            .filter(|(i, _)| plan.decisions[*i].tied_to.is_none())
            .map(|(i, (name, tensor))| {
                let moment_kind = if tensor.kind() == Kind::Double { Kind::Double } else { Kind::Float };
                ParamSlot {
                    name,
                    first_moment: Tensor::zeros(tensor.size(), (moment_kind, tensor.device())),
                    second_moment: Tensor::zeros(tensor.size(), (moment_kind, tensor.device())),
                    tensor,
                    step: 0,
                    decay_horizon: 0.0,
                    decision: i,
                    group: 0,
                }
            })
            .collect();
        let mut opt = WidthScaledAdamW {
            config,
            plan,
            slots,
            groups: Vec::new(),
            step_t: 0,
            skipped_steps: 0,
            skip_logged: false,
            observers: Vec::new(),
        };
        opt.regroup_slots();
        Ok(opt)
    }

    /// Rebuilds the plan under a new rule or overrides, keeping moments, step counts and decay horizons.
    /// This is the only way the groups change; nothing regroups silently during a step.
    pub fn regroup(&mut self, rule: Rule, overrides: Vec<Override>, base: &BaseShapes) -> Result<(), OptimError> {
        let specs: Vec<ParamSpec> = self
            .plan
            .decisions
            .iter()
            .map(|d| ParamSpec { name: d.name.clone(), shape: d.shape.clone(), storage: None })
            .collect();
        let mut plan = ScalingPlan::build(&specs, base, &overrides, rule, self.config.lr, self.config.weight_decay)?;
        for (new, old) in plan.decisions.iter_mut().zip(&self.plan.decisions) {
            new.tied_to = old.tied_to.clone();
        }
        self.plan = plan;
        self.config.rule = rule;
        self.config.overrides = overrides;
        self.regroup_slots();
        Ok(())
    }

    fn regroup_slots(&mut self) {
        let mut groups: Vec<Group> = Vec::new();
        for (si, slot) in self.slots.iter_mut().enumerate() {
            let d = &self.plan.decisions[slot.decision];
            let eps = self.plan.rule.eps(d.class, self.config.eps, d.width_multiplier);
            let same = |g: &Group| {
                g.lr.to_bits() == d.lr.to_bits()
                    && g.weight_decay.to_bits() == d.weight_decay.to_bits()
                    && g.eps.to_bits() == eps.to_bits()
                    && g.class == d.class
            };
            let gi = match groups.iter().position(same) {
                Some(gi) => gi,
                None => {
                    groups.push(Group { lr: d.lr, weight_decay: d.weight_decay, eps, class: d.class, members: Vec::new() });
                    groups.len() - 1
                }
            };
            groups[gi].members.push(si);
            slot.group = gi;
        }
        self.groups = groups;
    }

    pub fn plan(&self) -> &ScalingPlan {
        &self.plan
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    pub fn slots(&self) -> &[ParamSlot] {
        &self.slots
    }

    /// Calls of `step()` so far (skipped steps included): the schedule's clock.
    pub fn step_count(&self) -> u64 {
        self.step_t
    }

    /// Steps skipped so far because a gradient held NaN or Inf.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    /// The slot that steps parameter `name` (its own, or the one it is tied to).
    fn slot_of(&self, name: &str) -> Option<&ParamSlot> {
        let d = self.plan.get(name)?;
        let owner = d.tied_to.as_deref().unwrap_or(name);
        self.slots.iter().find(|s| s.name == owner)
    }

    /// Steps applied to parameter `name` so far (its own count, which its bias corrections use).
    pub fn param_step_count(&self, name: &str) -> Option<u64> {
        self.slot_of(name).map(|s| s.step)
    }

    /// Decay horizon of parameter `name`: `H = Σ_t lr_t·wd_t` over the steps applied to it (width-scaled
    /// values, schedule included; `Σ wd_t` under independent decay). See [`ParamSlot::decay_horizon`].
    pub fn decay_horizon(&self, name: &str) -> Option<f64> {
        self.slot_of(name).map(|s| s.decay_horizon)
    }

    pub fn set_schedule(&mut self, schedule: Schedule) {
        self.config.schedule = schedule;
    }

    pub fn add_observer(&mut self, observer: Box<dyn StepObserver>) {
        self.observers.push(observer);
    }

    /// The effective learning rate of a parameter at the next step: its width-scaled lr times the
    /// schedule multiplier.
    pub fn effective_lr(&self, name: &str) -> Option<f64> {
        self.plan.get(name).map(|d| d.lr * self.config.schedule.multiplier(self.step_t))
    }

    /// Drops every parameter's gradient, as `torch.optim.Optimizer.zero_grad()` (`set_to_none=True`): a
    /// parameter that then gets no gradient from the next backward is skipped by the next step, with no decay
    /// and no moment update. (A build without the C++ shim cannot drop gradients; it zeroes them, logs that
    /// once, and then steps every parameter.)
    pub fn zero_grad(&mut self) {
        let tensors: Vec<&Tensor> = self.slots.iter().map(|s| &s.tensor).collect();
        if let Err(e) = crate::shim::clear_grads(&tensors) {
            static LOGGED: Once = Once::new();
            LOGGED.call_once(|| eprintln!("gainguard: cannot drop gradients ({e}); zeroing them instead"));
            for s in &mut self.slots {
                let mut g = s.tensor.grad();
                if g.defined() {
                    let _ = g.detach_().zero_();
                }
            }
        }
    }

    /// Every slot's gradient, None where it is undefined.
    fn gradients(&self) -> Vec<Option<Tensor>> {
        self.slots
            .iter()
            .map(|s| {
                let g = s.tensor.grad();
                g.defined().then_some(g)
            })
            .collect()
    }

    /// Every slot's gradient, its global norm and the first non-finite one ([`gradient_norm`]).
    fn check_gradients(&self) -> GradientCheck {
        let grads = self.gradients();
        let (norm, nonfinite) = gradient_norm(&grads);
        GradientCheck { grads, norm, nonfinite }
    }

    /// Global-norm clipping as PyTorch's `clip_grad_norm_`: scale every defined gradient by
    /// `max / (norm + 1e-6)` when that is below 1. Returns whether it clipped.
    fn clip_gradients(grads: &[Option<Tensor>], norm: f64, max_norm: f64) -> bool {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter().flatten() {
                let mut g = g.shallow_clone();
                let _ = g.g_mul_scalar_(coef);
            }
            true
        } else {
            false
        }
    }

    /// One AdamW step over every parameter that has a gradient. A non-finite gradient skips the step under
    /// [`NonFiniteGrad::Skip`] (the default) and [`NonFiniteGrad::Error`] (logged; use
    /// [`try_step`](Self::try_step) to get the error), and steps anyway under [`NonFiniteGrad::Step`].
    pub fn step(&mut self) -> StepReport {
        match self.advance(true) {
            Ok(report) => report,
            Err(e) => unreachable!("advance(skip_on_error = true) does not fail: {e}"),
        }
    }

    /// [`step`](Self::step), except that under [`NonFiniteGrad::Error`] a non-finite gradient returns
    /// [`OptimError::NonFiniteGradient`] naming the parameter, with nothing changed (not even the step count).
    pub fn try_step(&mut self) -> Result<StepReport, OptimError> {
        self.advance(false)
    }

    fn advance(&mut self, skip_on_error: bool) -> Result<StepReport, OptimError> {
        let check = if self.config.nonfinite_grad == NonFiniteGrad::Step && self.config.max_grad_norm.is_none() {
            GradientCheck { grads: self.gradients(), norm: None, nonfinite: None }
        } else {
            self.check_gradients()
        };
        let t = self.step_t + 1;
        let nonfinite = check.nonfinite.map(|i| self.slots[i].name.clone());
        let skip = match self.config.nonfinite_grad.decide(nonfinite.as_deref(), t, check.norm) {
            Ok(skip) => skip,
            Err(error) if skip_on_error => {
                eprintln!("gainguard: {error}; step() skips it (try_step() returns this error)");
                true
            }
            Err(error) => return Err(error),
        };
        let lr_multiplier = self.config.schedule.multiplier(self.step_t);
        let wd_multiplier = if self.config.schedule_weight_decay { lr_multiplier } else { 1.0 };
        self.step_t = t;
        for o in &mut self.observers {
            o.before_step(t, &self.slots);
        }
        let mut report = StepReport { step: t, lr_multiplier, wd_multiplier, grad_norm: check.norm, nonfinite_grad: nonfinite, ..Default::default() };
        if skip {
            self.skipped_steps += 1;
            report.skipped = true;
            report.skipped_without_grad = check.grads.iter().filter(|g| g.is_none()).count();
            if !std::mem::replace(&mut self.skip_logged, true) {
                eprintln!(
                    "gainguard: step {t}: the gradient of `{}` holds NaN or Inf; the step was skipped (no parameter or moment changed). \
                     Later skips are only counted (StepReport::skipped_steps_total, gainguard_skipped_steps_total).",
                    report.nonfinite_grad.as_deref().unwrap_or("?")
                );
            }
        } else {
            tch::no_grad(|| {
                if let (Some(max), Some(norm)) = (self.config.max_grad_norm, check.norm) {
                    // A NaN norm compares false: nothing is clipped, as the gradients are stepped as they are.
                    report.clipped = norm.is_finite() && Self::clip_gradients(&check.grads, norm, max);
                }
                for gi in 0..self.groups.len() {
                    report.skipped_without_grad += self.step_group(gi, &check.grads, lr_multiplier, wd_multiplier);
                }
            });
        }
        report.skipped_steps_total = self.skipped_steps;
        let mut observers = std::mem::take(&mut self.observers);
        for o in &mut observers {
            o.after_step(&report, &self.slots, &self.plan);
        }
        self.observers = observers;
        Ok(report)
    }

    /// Steps the members of group `gi` that have a gradient, advancing their own step counts and decay
    /// horizons; returns how many had none.
    fn step_group(&mut self, gi: usize, grads: &[Option<Tensor>], lr_multiplier: f64, wd_multiplier: f64) -> usize {
        let scalars = StepScalars::new(&self.config, &self.groups[gi], lr_multiplier, wd_multiplier);
        let members: Vec<(usize, &Tensor)> =
            self.groups[gi].members.iter().filter_map(|&si| grads[si].as_ref().map(|g| (si, g))).collect();
        let without = self.groups[gi].members.len() - members.len();
        if members.is_empty() {
            return without;
        }
        let steps: Vec<u64> = members.iter().map(|&(si, _)| self.slots[si].step + 1).collect();
        step_buffers(&self.buffers(&members), &scalars, &steps, self.config.fused, self.config.cpu_kernel);
        for &(si, _) in &members {
            let slot = &mut self.slots[si];
            slot.step += 1;
            slot.decay_horizon += scalars.horizon;
        }
        without
    }

    /// The buffers of `members` (slot, gradient).
    fn buffers<'a>(&'a self, members: &[(usize, &'a Tensor)]) -> Vec<Buffers<'a>> {
        members
            .iter()
            .map(|&(si, grad)| {
                let slot = &self.slots[si];
                Buffers { param: &slot.tensor, grad, first_moment: &slot.first_moment, second_moment: &slot.second_moment }
            })
            .collect()
    }

    /// Saves moments, per-parameter step counts, decay horizons, the step and skip counters and the plan to one
    /// file, so a resumed run follows the same trajectory.
    pub fn save(&self, path: &Path) -> Result<(), OptimError> {
        let meta = serde_json::json!({
            "format": "gainguard-adamw",
            "version": 2,
            "step": self.step_t,
            "skipped_steps": self.skipped_steps,
            "plan": self.plan,
        })
        .to_string();
        let mut named: Vec<(String, Tensor)> = vec![("__meta__".into(), Tensor::from_slice(meta.as_bytes()))];
        for s in &self.slots {
            named.push((format!("first_moment.{}", s.name), s.first_moment.shallow_clone()));
            named.push((format!("second_moment.{}", s.name), s.second_moment.shallow_clone()));
            named.push((format!("step.{}", s.name), Tensor::from(s.step as i64)));
            named.push((format!("decay_horizon.{}", s.name), Tensor::from(s.decay_horizon)));
        }
        Tensor::save_multi(&named, path)?;
        Ok(())
    }

    /// Loads a checkpoint written by [`save`](Self::save). The checkpoint's plan must match this one.
    ///
    /// A checkpoint of format version 1 (one global step count) gives every parameter that count, as that
    /// version stepped every parameter at every step, and the decay horizon those steps add up to under the
    /// configured schedule.
    pub fn load(&mut self, path: &Path) -> Result<(), OptimError> {
        let err = |reason: String| OptimError::Checkpoint { path: path.display().to_string(), reason };
        let named = Tensor::load_multi(path).map_err(|e| err(e.to_string()))?;
        let mut map: std::collections::HashMap<String, Tensor> = named.into_iter().collect();
        let meta = map.remove("__meta__").ok_or_else(|| err("no `__meta__` entry: not a gainguard optimizer checkpoint".into()))?;
        let bytes: Vec<u8> = Vec::<u8>::try_from(&meta).map_err(|e| err(e.to_string()))?;
        let meta: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| err(format!("bad metadata: {e}")))?;
        let plan: ScalingPlan = serde_json::from_value(meta["plan"].clone()).map_err(|e| err(format!("bad plan: {e}")))?;
        if plan.decisions != self.plan.decisions {
            let names: Vec<&str> = plan
                .decisions
                .iter()
                .zip(&self.plan.decisions)
                .filter(|(a, b)| a != b)
                .map(|(a, _)| a.name.as_str())
                .collect();
            return Err(err(format!(
                "its rule table differs from this optimizer's (parameters: {:?}; {} vs {} entries)",
                names,
                plan.decisions.len(),
                self.plan.decisions.len()
            )));
        }
        let step = meta["step"].as_u64().ok_or_else(|| err("metadata has no step".into()))?;
        let version = meta["version"].as_u64().unwrap_or(1);
        if version > 2 {
            return Err(err(format!("format version {version} is newer than this gainguard reads (1 or 2)")));
        }
        let get = |key: &str, size: &[i64]| -> Result<&Tensor, OptimError> {
            let t = map.get(key).ok_or_else(|| err(format!("missing `{key}`")))?;
            if t.size() != size {
                return Err(err(format!("`{key}` has shape {:?}, expected {:?}", t.size(), size)));
            }
            Ok(t)
        };
        // Read everything before changing anything, so a bad checkpoint leaves the optimizer as it was.
        let mut state = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let first = get(&format!("first_moment.{}", s.name), &s.first_moment.size())?;
            let second = get(&format!("second_moment.{}", s.name), &s.second_moment.size())?;
            let (count, horizon) = if version >= 2 {
                let count = get(&format!("step.{}", s.name), &[])?.int64_value(&[]);
                let horizon = get(&format!("decay_horizon.{}", s.name), &[])?.double_value(&[]);
                (u64::try_from(count).map_err(|_| err(format!("`step.{}` is negative", s.name)))?, horizon)
            } else {
                (step, self.horizon_after(s.group, step))
            };
            state.push((first, second, count, horizon));
        }
        for (s, (first, second, count, horizon)) in self.slots.iter_mut().zip(state) {
            tch::no_grad(|| {
                s.first_moment.copy_(first);
                s.second_moment.copy_(second);
            });
            s.step = count;
            s.decay_horizon = horizon;
        }
        self.step_t = step;
        self.skipped_steps = meta["skipped_steps"].as_u64().unwrap_or(0);
        Ok(())
    }

    /// The decay horizon of a member of group `gi` stepped at each of the first `steps` steps.
    fn horizon_after(&self, gi: usize, steps: u64) -> f64 {
        (0..steps)
            .map(|t| {
                let m = self.config.schedule.multiplier(t);
                StepScalars::new(&self.config, &self.groups[gi], m, if self.config.schedule_weight_decay { m } else { 1.0 }).horizon
            })
            .sum()
    }

    /// The fused CPU step's memory traffic over this optimizer's own f32 CPU buffers, group by group, with no
    /// arithmetic ([`fused::stream_probe`]): the floor `benches/optimizer_step.rs` measures the step against.
    /// Covers the members with a gradient; returns the elements moved.
    pub fn stream_probe(&self) -> Result<usize, fused::FusedError> {
        let grads: Vec<Tensor> = self.slots.iter().map(|s| s.tensor.grad()).collect();
        let mut moved = 0;
        for g in &self.groups {
            let buffers: Vec<Buffers<'_>> = g
                .members
                .iter()
                .filter(|&&si| grads[si].defined())
                .map(|&si| {
                    let s = &self.slots[si];
                    Buffers { param: &s.tensor, grad: &grads[si], first_moment: &s.first_moment, second_moment: &s.second_moment }
                })
                .collect();
            if fused::layout(&buffers).is_some_and(|l| l.device == Device::Cpu && l.kind == Kind::Float) {
                moved += fused::stream_probe(&buffers)?;
            }
        }
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_libtorch_sums_of_squares_agree_with_the_fused_pass_in_every_dtype() {
        let x = Tensor::randn([300_001], (Kind::Double, Device::Cpu)) * 1e-2;
        for kind in [Kind::Double, Kind::Float, Kind::BFloat16, Kind::Half] {
            let t = x.to_kind(kind);
            // An independent reference: the values widened to f64 and summed here.
            let exact: f64 = Vec::<f64>::try_from(&t.to_kind(Kind::Double)).unwrap().iter().map(|v| v * v).sum();
            let fused = crate::fused::sum_squares(&[&t]).expect("the shim takes contiguous CPU tensors")[0];
            let libtorch = libtorch_sum_squares(&[&t])[0];
            // libtorch accumulates narrower dtypes in f32 (observed 3e-5 off for bf16 here).
            let bar = match kind {
                Kind::Double => 1e-12,
                Kind::Float => 1e-5,
                _ => 1e-4,
            };
            // f64 in f64; narrower values squared and summed in f32 over runs of 1024 (f32's precision).
            let fused_bar = if kind == Kind::Double { 1e-12 } else { 1e-6 };
            assert!((fused - exact).abs() <= fused_bar * exact, "{kind:?}: fused {fused} vs {exact}");
            assert!((libtorch - exact).abs() <= bar * exact, "{kind:?}: libtorch {libtorch} vs {exact}");
        }
        let nan = Tensor::zeros([70_000], (Kind::Float, Device::Cpu));
        let _ = nan.get(69_999).fill_(f64::NAN);
        assert!(crate::fused::sum_squares(&[&nan]).unwrap()[0].is_nan());
        let _ = nan.get(69_999).fill_(f64::INFINITY);
        assert!(crate::fused::sum_squares(&[&nan]).unwrap()[0].is_infinite());
    }
}

//! Width-scaled AdamW: the optimizer step and its state.
//!
//! Every parameter has its own width-scaled `(lr, wd)` from the [`ScalingPlan`] (and its Adam epsilon from the
//! rule); a [`Schedule`] multiplies lr (and optionally wd) per step. The update is PyTorch's AdamW with coupled
//! decay (docs/design.md §1.4), written out once above the reference path
//! (`reference_step`) with the scalars of [`StepScalars`]. As in `torch.optim.AdamW`:
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

//!
//! The files: this one holds the step (its scalars, the reference path with the formula, the group loop);
//! `config` the settings and their enums, `gradients` the check and clipping before a step, `checkpoint` the
//! state across a regroup, a save and a load.

use std::sync::Once;

use tch::{Device, Kind, Tensor};

use crate::classify::{BaseShapes, ParamClass};
use crate::fused::{self, BiasCorrection, Buffers};
use crate::plan::{ParamSpec, ScalingPlan};
use crate::schedule::Schedule;

mod checkpoint;
mod config;
mod gradients;

pub use config::{AdamWConfig, CpuKernel, DecayMode, NonFiniteGrad, OptimError};
pub use gradients::gradient_norm;
use gradients::GradientCheck;

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

/// The scalars of one AdamW step of one group, computed once per step: `lr` and `wd` are the group's
/// width-scaled values times this step's schedule multipliers; the update they enter is written out on the
/// reference path (`reference_step`, below), which the fused kernels compute too.
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
/// With g the gradient and t the parameter's own step count, this one included (torch's `state['step']`):
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
/// with the scalars of [`StepScalars`]. The decay is applied first and the update to the decayed theta, as
/// libtorch's AdamW (and torch's) order it.
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
        config.check()?;
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
            GradientCheck { grads: gradients::gradients(self.slots.iter().map(|s| &s.tensor)), norm: None, nonfinite: None }
        } else {
            gradients::check(self.slots.iter().map(|s| &s.tensor))
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
                    report.clipped = norm.is_finite() && gradients::clip(&check.grads, norm, max);
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


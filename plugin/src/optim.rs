//! Width-scaled AdamW: the optimizer step and its state.
//!
//! Every parameter has its own width-scaled `(lr, wd)` from the [`ScalingPlan`]; a [`Schedule`]
//! multiplies them per step. The update is PyTorch/libtorch's coupled AdamW (docs/design.md §1.4):
//!
//! ```text
//! theta ← theta · (1 − lr·wd)                       (coupled; independent: theta · (1 − wd))
//! first_moment  ← beta1 · first_moment  + (1 − beta1) · g
//! second_moment ← beta2 · second_moment + (1 − beta2) · g²
//! theta ← theta − lr / (1 − beta1^t) · first_moment / (sqrt(second_moment) / sqrt(1 − beta2^t) + eps)
//! ```
//!
//! Parameters that share one `(lr, wd)` form a group; the groups are fixed at construction and only
//! [`WidthScaledAdamW::regroup`] changes them. Two paths step them:
//! - the reference path, written with libtorch tensor ops one parameter at a time;
//! - the fused path ([`crate::fused`]), one pass per group over parameters, moments and step counts.
//! Both keep the same state, so either one resumes the other's checkpoint.

use std::path::Path;
use tch::{Kind, Tensor};

use crate::classify::{BaseShapes, Override, ParamClass};
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
    /// Whether the schedule multiplies weight decay too (it always multiplies lr).
    pub schedule_weight_decay: bool,
    /// Use the fused step where it covers the parameters' dtype and device.
    pub fused: bool,
    /// Which kernel the fused step uses on CPU (CUDA always uses ATen's `_fused_adamw_`).
    pub cpu_kernel: CpuKernel,
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
}

/// One parameter the optimizer steps, with its moments.
pub struct ParamSlot {
    pub name: String,
    pub tensor: Tensor,
    pub first_moment: Tensor,
    pub second_moment: Tensor,
    /// Index into the plan's decisions.
    pub decision: usize,
    /// Index into the groups.
    pub group: usize,
}

/// Parameters that share one width-scaled `(lr, wd)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub lr: f64,
    pub weight_decay: f64,
    pub class: ParamClass,
    pub members: Vec<usize>,
}

/// What one step did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepReport {
    /// Number of completed steps after this one (1 after the first step).
    pub step: u64,
    pub lr_multiplier: f64,
    pub wd_multiplier: f64,
    /// Global gradient norm before clipping (only computed when clipping is on).
    pub grad_norm: Option<f64>,
    pub clipped: bool,
    /// Parameters skipped because they had no gradient.
    pub skipped_without_grad: usize,
}

/// Something that watches the optimizer step, such as the spectra sampler. It must return quickly:
/// it runs on the training thread.
pub trait StepObserver: Send {
    /// Called before the parameters change, with the step about to be taken (1-based).
    fn before_step(&mut self, _step: u64, _slots: &[ParamSlot]) {}
    /// Called after the step.
    fn after_step(&mut self, report: &StepReport, slots: &[ParamSlot], plan: &ScalingPlan);
}

pub struct WidthScaledAdamW {
    pub(crate) config: AdamWConfig,
    pub(crate) plan: ScalingPlan,
    pub(crate) slots: Vec<ParamSlot>,
    pub(crate) groups: Vec<Group>,
    pub(crate) step_t: u64,
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
                    decision: i,
                    group: 0,
                }
            })
            .collect();
        let mut opt = WidthScaledAdamW { config, plan, slots, groups: Vec::new(), step_t: 0, observers: Vec::new() };
        opt.regroup_slots();
        Ok(opt)
    }

    /// Rebuilds the plan under a new rule or overrides, keeping moments and step count. This is the only
    /// way the groups change; nothing regroups silently during a step.
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
            let gi = match groups
                .iter()
                .position(|g| g.lr.to_bits() == d.lr.to_bits() && g.weight_decay.to_bits() == d.weight_decay.to_bits() && g.class == d.class)
            {
                Some(gi) => gi,
                None => {
                    groups.push(Group { lr: d.lr, weight_decay: d.weight_decay, class: d.class, members: Vec::new() });
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

    /// Completed steps.
    pub fn step_count(&self) -> u64 {
        self.step_t
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

    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            let mut g = s.tensor.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// Global-norm clipping as PyTorch's `clip_grad_norm_`: scale by `max / (norm + 1e-6)` when above.
    fn clip_gradients(&mut self, max_norm: f64) -> (f64, bool) {
        let grads: Vec<Tensor> = self.slots.iter().map(|s| s.tensor.grad()).filter(|g| g.defined()).collect();
        if grads.is_empty() {
            return (0.0, false);
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).norm()).collect();
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        let coef = max_norm / (total + 1e-6);
        if coef < 1.0 {
            for mut g in grads {
                let _ = g.g_mul_scalar_(coef);
            }
            (total, true)
        } else {
            (total, false)
        }
    }

    /// One AdamW step over every parameter that has a gradient.
    pub fn step(&mut self) -> StepReport {
        let schedule_index = self.step_t;
        self.step_t += 1;
        let t = self.step_t;
        for o in &mut self.observers {
            o.before_step(t, &self.slots);
        }
        let lr_multiplier = self.config.schedule.multiplier(schedule_index);
        let wd_multiplier = if self.config.schedule_weight_decay { lr_multiplier } else { 1.0 };
        let mut report = StepReport { step: t, lr_multiplier, wd_multiplier, ..Default::default() };
        tch::no_grad(|| {
            if let Some(max) = self.config.max_grad_norm {
                let (norm, clipped) = self.clip_gradients(max);
                report.grad_norm = Some(norm);
                report.clipped = clipped;
            }
            let fused_done = self.config.fused && crate::fused::step_groups(self, t, lr_multiplier, wd_multiplier, &mut report);
            if !fused_done {
                for gi in 0..self.groups.len() {
                    self.reference_step_group(gi, t, lr_multiplier, wd_multiplier, &mut report);
                }
            }
        });
        let mut observers = std::mem::take(&mut self.observers);
        for o in &mut observers {
            o.after_step(&report, &self.slots, &self.plan);
        }
        self.observers = observers;
        report
    }

    /// Bias corrections `1 − beta^t`, computed once per step for every parameter.
    pub(crate) fn bias_corrections(&self, t: u64) -> (f64, f64) {
        let t = t as i32;
        (1.0 - self.config.beta1.powi(t), 1.0 - self.config.beta2.powi(t))
    }

    /// The reference path: libtorch tensor ops, one parameter at a time, in libtorch AdamW's order.
    pub(crate) fn reference_step_group(&mut self, gi: usize, t: u64, lr_mult: f64, wd_mult: f64, report: &mut StepReport) {
        let (beta1, beta2, eps) = (self.config.beta1, self.config.beta2, self.config.eps);
        let (bias_correction1, bias_correction2) = self.bias_corrections(t);
        let group = &self.groups[gi];
        let lr = group.lr * lr_mult;
        let wd = group.weight_decay * wd_mult;
        let decay_factor = match self.config.decay {
            DecayMode::Coupled => 1.0 - lr * wd,
            DecayMode::Independent => 1.0 - wd,
        };
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.sqrt();
        for &si in &group.members {
            let slot = &mut self.slots[si];
            let grad = slot.tensor.grad();
            if !grad.defined() {
                report.skipped_without_grad += 1;
                continue;
            }
            let g = grad.to_kind(slot.first_moment.kind());
            let mut theta = if slot.tensor.kind() == slot.first_moment.kind() {
                slot.tensor.shallow_clone()
            } else {
                slot.tensor.to_kind(slot.first_moment.kind())
            };
            if decay_factor != 1.0 {
                let _ = theta.g_mul_scalar_(decay_factor);
            }
            let _ = slot.first_moment.g_mul_scalar_(beta1);
            let _ = slot.first_moment.g_add_(&(&g * (1.0 - beta1)));
            let _ = slot.second_moment.g_mul_scalar_(beta2);
            let _ = slot.second_moment.g_add_(&(&g * &g * (1.0 - beta2)));
            // The correctly rounded sqrt, as the fused CPU loop takes (libtorch's CPU sqrt may be MKL's).
            let root = crate::fused::correctly_rounded_sqrt(&slot.second_moment).unwrap_or_else(|| slot.second_moment.sqrt());
            let denom = root / bias_correction2_sqrt + eps;
            let _ = theta.g_sub_(&(&slot.first_moment / denom * step_size));
            if slot.tensor.kind() != theta.kind() {
                slot.tensor.copy_(&theta);
            }
        }
    }

    /// Saves moments, step count and the plan to one file, so a resumed run follows the same trajectory.
    pub fn save(&self, path: &Path) -> Result<(), OptimError> {
        let meta = serde_json::json!({
            "format": "gainguard-adamw",
            "version": 1,
            "step": self.step_t,
            "plan": self.plan,
        })
        .to_string();
        let mut named: Vec<(String, Tensor)> = vec![("__meta__".into(), Tensor::from_slice(meta.as_bytes()))];
        for s in &self.slots {
            named.push((format!("first_moment.{}", s.name), s.first_moment.shallow_clone()));
            named.push((format!("second_moment.{}", s.name), s.second_moment.shallow_clone()));
        }
        Tensor::save_multi(&named, path)?;
        Ok(())
    }

    /// Loads a checkpoint written by [`save`](Self::save). The checkpoint's plan must match this one.
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
        for s in &mut self.slots {
            for (prefix, dst) in [("first_moment", &mut s.first_moment), ("second_moment", &mut s.second_moment)] {
                let key = format!("{prefix}.{}", s.name);
                let src = map.get(&key).ok_or_else(|| err(format!("missing `{key}`")))?;
                if src.size() != dst.size() {
                    return Err(err(format!("`{key}` has shape {:?}, expected {:?}", src.size(), dst.size())));
                }
                tch::no_grad(|| dst.copy_(src));
            }
        }
        self.step_t = step;
        Ok(())
    }
}

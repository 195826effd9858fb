//! The optimizer's state across a change of plan or process: [`WidthScaledAdamW::regroup`] (a new rule or
//! overrides, the state kept) and [`save`](WidthScaledAdamW::save) / [`load`](WidthScaledAdamW::load) (moments,
//! per-parameter step counts, decay horizons, counters and the plan, in one file).

use std::path::Path;

use tch::Tensor;

use crate::classify::{BaseShapes, Override};
use crate::plan::{ParamSpec, ScalingPlan};
use crate::rule::Rule;

use super::{Group, OptimError, StepScalars, WidthScaledAdamW};

impl WidthScaledAdamW {
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

    pub(super) fn regroup_slots(&mut self) {
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
}

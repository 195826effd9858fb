//! Per-parameter optimizer settings: the width-scaled base lr and weight decay from the Params table, times
//! the schedule multipliers of the latest Step.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::Opts;

use gainguard_protocol::events::{Envelope, Event};

use crate::exposition::GaugeVec;

use super::{param_label_values, remove, ParamLabels, ParamMap, RunKey, RunView, Source, SourceContext, SourceSpec, PARAM_LABELS};
use crate::error::DaemonError;

pub const SPEC: SourceSpec = SourceSpec { name: "optimizer", default_enabled: true, build };

pub struct Optimizer {
    learning_rate: GaugeVec,
    weight_decay: GaugeVec,
    width_multiplier: GaugeVec,
}

/// Per run (in its memo): the schedule multipliers in effect and every admitted parameter's base settings.
struct RunOptimizer {
    lr_multiplier: f64,
    wd_multiplier: f64,
    /// Base (width-scaled, unscheduled) lr and wd per admitted parameter.
    base: HashMap<String, (f64, f64)>,
}

impl Default for RunOptimizer {
    fn default() -> Self {
        RunOptimizer { lr_multiplier: 1.0, wd_multiplier: 1.0, base: HashMap::new() }
    }
}

fn build(ctx: &SourceContext<'_>) -> Result<Arc<dyn Source>, DaemonError> {
    let g = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &PARAM_LABELS);
    let o = Optimizer {
        learning_rate: g(
            "gainguard_param_learning_rate",
            "Learning rate in effect: width-scaled base lr times the latest step's schedule multiplier.",
        )?,
        weight_decay: g(
            "gainguard_param_weight_decay",
            "Weight decay in effect: width-scaled base weight decay times the latest step's schedule multiplier.",
        )?,
        width_multiplier: g("gainguard_param_width_multiplier", "Width multiplier m = fan_in / base_fan_in.")?,
    };
    ctx.registry.register(Box::new(o.learning_rate.clone()))?;
    ctx.registry.register(Box::new(o.weight_decay.clone()))?;
    ctx.registry.register(Box::new(o.width_multiplier.clone()))?;
    Ok(Arc::new(o))
}

impl Optimizer {
    fn export(&self, key: &RunKey, params: &ParamMap, name: &str, (lr, wd): (f64, f64), state: &RunOptimizer) {
        if let Some(p) = params.get(name) {
            let labels = param_label_values(key, p);
            self.learning_rate.with_label_values(&labels).set(lr * state.lr_multiplier);
            self.weight_decay.with_label_values(&labels).set(wd * state.wd_multiplier);
        }
    }
}

impl Source for Optimizer {
    fn name(&self) -> &'static str {
        SPEC.name
    }

    fn series_per_param(&self) -> usize {
        3
    }

    fn observe(&self, run: &mut RunView<'_>, envelope: &Envelope) {
        let (key, params) = (run.key, run.params);
        let state: &mut RunOptimizer = run.memo.get();
        match &envelope.event {
            Event::Params(table) => {
                for p in &table.params {
                    let Some(labels) = params.get(&p.name) else { continue };
                    state.base.insert(p.name.clone(), (p.lr, p.weight_decay));
                    self.width_multiplier.with_label_values(&param_label_values(key, labels)).set(p.width_multiplier);
                    self.export(key, params, &p.name, (p.lr, p.weight_decay), state);
                }
            }
            Event::Step(s) => {
                if state.lr_multiplier != s.lr_multiplier || state.wd_multiplier != s.wd_multiplier {
                    state.lr_multiplier = s.lr_multiplier;
                    state.wd_multiplier = s.wd_multiplier;
                    for (name, base) in &state.base {
                        self.export(key, params, name, *base, state);
                    }
                }
            }
            _ => {}
        }
    }

    fn forget_run(&self, run: &RunKey, params: &[ParamLabels]) {
        for p in params {
            let labels = param_label_values(run, p);
            remove(&self.learning_rate, &labels);
            remove(&self.weight_decay, &labels);
            remove(&self.width_multiplier, &labels);
        }
    }
}

//! μP helpers, both opt-in: the readout layer with its `1/m` output multiplier, and the init rule.
//!
//! gainguard cannot change a user's forward pass silently, so these are things a model uses on purpose.
//! - [`MuReadout`]: a `d → vocab` linear layer whose output is multiplied by `1/m`, as microsoft/mup's
//!   `MuReadout`. Without it, the logits grow with width under μP's learning rates.
//! - [`init_matrix_like`]: draws every matrix-like weight from `N(0, (base_std / sqrt(m))²)`, so its
//!   standard deviation follows `1/sqrt(fan_in)` relative to the base model.

use tch::nn::{self, Module};
use tch::Tensor;

use crate::classify::ParamClass;
use crate::plan::ScalingPlan;

/// A readout layer `y = (x Wᵀ + b) / m`, with `m = d / base_d`.
#[derive(Debug)]
pub struct MuReadout {
    pub linear: nn::Linear,
    pub width_multiplier: f64,
}

/// Builds a [`MuReadout`] from `in_dim` inputs (the model width) to `out_dim` outputs (the vocabulary).
/// `base_in_dim` is the width of the base (proxy) model.
pub fn mu_readout(vs: nn::Path, in_dim: i64, out_dim: i64, base_in_dim: i64, bias: bool) -> MuReadout {
    let linear = nn::linear(vs, in_dim, out_dim, nn::LinearConfig { bias, ..Default::default() });
    MuReadout { linear, width_multiplier: in_dim as f64 / base_in_dim as f64 }
}

impl Module for MuReadout {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.linear.forward(xs) * (1.0 / self.width_multiplier)
    }
}

/// Re-draws each matrix-like parameter of `vs` in `plan` from `N(0, (base_std / sqrt(m))²)`.
/// Vector-like parameters and tied aliases are left as they are. Returns how many were re-drawn.
pub fn init_matrix_like(vs: &nn::VarStore, plan: &ScalingPlan, base_std: f64) -> usize {
    let vars = vs.variables();
    let mut n = 0;
    tch::no_grad(|| {
        for d in plan.decisions.iter().filter(|d| d.class == ParamClass::MatrixLike && d.tied_to.is_none()) {
            if let Some(t) = vars.get(&d.name) {
                let std = base_std / d.width_multiplier.sqrt();
                let mut t = t.shallow_clone();
                let _ = t.normal_(0.0, std);
                n += 1;
            }
        }
    });
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::BaseShapes;
    use crate::plan::ParamSpec;
    use crate::rule::Rule;

    #[test]
    fn mu_readout_divides_the_linear_output_by_m() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let r = mu_readout(vs.root() / "head", 64, 10, 16, true);
        assert_eq!(r.width_multiplier, 4.0);
        let x = Tensor::randn([3, 64], (tch::Kind::Float, tch::Device::Cpu));
        let plain = r.linear.forward(&x);
        let diff = (r.forward(&x) * 4.0 - plain).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn matrix_like_init_std_falls_as_one_over_sqrt_m_and_vectors_are_untouched() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let w = vs.root().zeros("w", &[1024, 1024]);
        let g = vs.root().ones("g", &[1024]);
        let base = BaseShapes::from_json_str(r#"{"w": [256, 256], "g": [256]}"#, "t").unwrap();
        let specs: Vec<ParamSpec> =
            vs.variables().into_iter().map(|(n, t)| ParamSpec { name: n, shape: t.size(), storage: None }).collect();
        let plan = ScalingPlan::build(&specs, &base, &[], Rule::default(), 1e-3, 0.1).unwrap();
        assert_eq!(init_matrix_like(&vs, &plan, 0.02), 1);
        let std = w.std(true).double_value(&[]);
        // m = 4, so the std is 0.02 / 2; with 1M samples the estimate is within 1%.
        assert!((std - 0.01).abs() < 1e-4, "{std}");
        assert_eq!(g.sum(tch::Kind::Float).double_value(&[]), 1024.0);
    }
}

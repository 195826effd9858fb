//! μP helpers, all opt-in: the readout layers with their `1/m` on the output path, and the init rule.
//!
//! gainguard cannot change a user's forward pass silently, so these are things a model uses on purpose.
//! - [`MuReadout`]: a `d → vocab` linear layer `y = W·(x/m) + b`, as microsoft/mup's `MuReadout`
//!   (`mup/layer.py`, `MuReadout.forward`: `super().forward(self.output_mult * x / self.width_mult())`): the
//!   input is divided by m, so the logits do not grow with width under μP's learning rates, and the bias is
//!   added unscaled.
//! - [`MuSharedReadout`]: the same for a head tied to the token embedding (microsoft/mup's `MuSharedReadout`):
//!   only the output path is divided by m; the embedding lookup reads the shared weight as it is.
//! - [`init_matrix_like`]: draws every matrix-like weight from `N(0, (base_std / sqrt(m))²)`, so its
//!   standard deviation follows `1/sqrt(fan_in)` relative to the base model.

use tch::nn::{self, Module};
use tch::Tensor;

use crate::classify::ParamClass;
use crate::plan::ScalingPlan;

/// A readout layer `y = W·(x/m) + b`, with `m = d / base_d`.
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
        self.linear.forward(&(xs / self.width_multiplier))
    }
}

/// A readout tied to a token embedding `E` of shape `[vocab, d]`: `y = E·(x/m) + b`, with `m = d / base_d`.
/// The embedding keeps reading `E` unscaled; only this output path is divided by m (microsoft/mup's
/// `MuSharedReadout`, a `MuReadout` whose weight is the embedding's). `E` is one tensor under one name, so
/// the optimizer scales and steps it once, as the embedding (vector-like).
#[derive(Debug)]
pub struct MuSharedReadout {
    /// The embedding's weight, shared (not a copy).
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub width_multiplier: f64,
}

/// Builds a [`MuSharedReadout`] on `embedding`'s weight; `base_in_dim` is the base (proxy) model's width. A
/// bias, when asked for, is a new zero-initialised `[vocab]` parameter `bias` under `vs`.
pub fn mu_shared_readout(vs: nn::Path, embedding: &nn::Embedding, base_in_dim: i64, bias: bool) -> MuSharedReadout {
    let (vocab, d) = (embedding.ws.size()[0], embedding.ws.size()[1]);
    MuSharedReadout {
        weight: embedding.ws.shallow_clone(),
        bias: bias.then(|| vs.zeros("bias", &[vocab])),
        width_multiplier: d as f64 / base_in_dim as f64,
    }
}

impl Module for MuSharedReadout {
    fn forward(&self, xs: &Tensor) -> Tensor {
        (xs / self.width_multiplier).linear(&self.weight, self.bias.as_ref())
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

    /// `y[r][o] = Σ_i w[o][i] · x[r][i] / m + b[o]`, in f64 from the tensors' values.
    fn hand_readout(x: &Tensor, w: &Tensor, b: Option<&Tensor>, m: f64) -> Vec<Vec<f64>> {
        let x: Vec<Vec<f64>> = Vec::<Vec<f64>>::try_from(&x.to_kind(tch::Kind::Double)).unwrap();
        let w: Vec<Vec<f64>> = Vec::<Vec<f64>>::try_from(&w.to_kind(tch::Kind::Double)).unwrap();
        let b: Vec<f64> = b.map_or(vec![0.0; w.len()], |b| Vec::<f64>::try_from(&b.to_kind(tch::Kind::Double)).unwrap());
        x.iter().map(|row| w.iter().zip(&b).map(|(wo, bo)| wo.iter().zip(row).map(|(a, xi)| a * xi / m).sum::<f64>() + bo).collect()).collect()
    }

    fn max_abs_diff(y: &Tensor, expected: &[Vec<f64>]) -> f64 {
        let y: Vec<Vec<f64>> = Vec::<Vec<f64>>::try_from(&y.to_kind(tch::Kind::Double)).unwrap();
        y.iter().flatten().zip(expected.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
    }

    #[test]
    fn mu_readout_divides_its_input_by_m_and_adds_the_bias_unscaled_as_microsoft_mup() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let r = mu_readout(vs.root() / "head", 64, 10, 16, true);
        assert_eq!(r.width_multiplier, 4.0);
        tch::no_grad(|| {
            let mut b = r.linear.bs.as_ref().unwrap().shallow_clone();
            let _ = b.copy_(&(Tensor::arange(10, (tch::Kind::Float, tch::Device::Cpu)) + 1.0));
        });
        let x = Tensor::randn([3, 64], (tch::Kind::Float, tch::Device::Cpu));
        let expected = hand_readout(&x, &r.linear.ws, r.linear.bs.as_ref(), 4.0);
        let diff = max_abs_diff(&r.forward(&x), &expected);
        assert!(diff < 1e-5, "{diff}");
        // The old form, (x·Wᵀ + b) / m, divides the bias too: it is off by (1 − 1/m)·b, up to 7.5 here.
        let scaled_bias = max_abs_diff(&(r.linear.forward(&x) / 4.0), &expected);
        assert!(scaled_bias > 1.0, "{scaled_bias}");
    }

    #[test]
    fn mu_shared_readout_divides_only_the_output_path_of_a_tied_embedding() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let emb = nn::embedding(vs.root() / "tok_emb", 7, 32, Default::default());
        let head = mu_shared_readout(vs.root() / "head", &emb, 8, true);
        assert_eq!(head.width_multiplier, 4.0);
        tch::no_grad(|| {
            let mut b = head.bias.as_ref().unwrap().shallow_clone();
            let _ = b.copy_(&(Tensor::arange(7, (tch::Kind::Float, tch::Device::Cpu)) * 0.5));
        });
        // One weight under one name: the optimizer sees the embedding and the head's bias, nothing else.
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        assert_eq!(names, ["head.bias", "tok_emb.weight"]);
        // Input path: the lookup returns rows of E, unscaled.
        let ids = Tensor::from_slice(&[3i64, 0, 6]);
        let rows = emb.forward(&ids);
        for (r, id) in [3i64, 0, 6].iter().enumerate() {
            assert!(rows.get(r as i64).equal(&emb.ws.get(*id)), "row {r}");
        }
        // Output path: E·(x/m) + b by hand.
        let x = Tensor::randn([4, 32], (tch::Kind::Float, tch::Device::Cpu));
        let expected = hand_readout(&x, &emb.ws, head.bias.as_ref(), 4.0);
        let diff = max_abs_diff(&head.forward(&x), &expected);
        assert!(diff < 1e-5, "{diff}");
        // A change to the embedding is the head's change too (shared, not copied).
        tch::no_grad(|| {
            let mut w = emb.ws.shallow_clone();
            let _ = w.g_mul_scalar_(2.0);
        });
        let expected = hand_readout(&x, &emb.ws, head.bias.as_ref(), 4.0);
        assert!(max_abs_diff(&head.forward(&x), &expected) < 1e-5);
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

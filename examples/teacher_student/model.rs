//! The teacher–student network, and the three numbers read off its hidden matrix.
//!
//! `hidden` (the default): `x → W_in (d × d_in) → RMSNorm → ReLU → W_hidden (d × d) → RMSNorm → ReLU → μP
//! readout`. The ReLU between `W_in` and `W_hidden` makes the hidden matrix's input a nonlinear function of
//! `x`, so a batch of its inputs spans all d dimensions: `W_hidden` is a hidden layer.
//!
//! `rank-capped` (the earlier model, kept as an illustration): no nonlinearity between the two matrices.
//! Since `rms(W_h · rms(W_in·x)) = rms(W_h · W_in · x)`, the hidden matrix only ever acts on the `d_in`-dimensional
//! image of `W_in`, its gradient lies in that subspace, and its stable rank cannot grow with width.
//!
//! Both are scale-invariant in `W_hidden` (an RMSNorm follows it), so AdamW with weight decay alone sets its
//! scale.

use gainguard::mup::mu_readout;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

pub const D_IN: i64 = 32;
pub const D_OUT: i64 = 8;
pub const TEACHER_WIDTH: i64 = 64;
pub const PARAM: &str = "hidden.weight";

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Model {
    /// A nonlinearity and a norm between W_in and W_hidden: the hidden matrix sees a full-rank input.
    Hidden,
    /// No nonlinearity between W_in and W_hidden: the hidden matrix sees a rank-d_in input (illustration).
    RankCapped,
}

impl Model {
    pub fn describe(self) -> &'static str {
        match self {
            Model::Hidden => "x → W_in → RMSNorm → ReLU → W_hidden → RMSNorm → ReLU → μP readout (W_hidden sees a full-rank input)",
            Model::RankCapped => {
                "x → W_in → RMSNorm → W_hidden → RMSNorm → ReLU → μP readout (RANK-CAPPED ILLUSTRATION: W_hidden acts on a d_in = 32-dimensional subspace)"
            }
        }
    }
}

fn rms_norm(x: &Tensor) -> Tensor {
    x * (x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + 1e-6).rsqrt()
}

fn linear(vs: nn::Path, i: i64, o: i64) -> nn::Linear {
    nn::linear(vs, i, o, nn::LinearConfig { bias: false, ..Default::default() })
}

#[derive(Debug)]
pub struct Network {
    model: Model,
    w_in: nn::Linear,
    hidden: nn::Linear,
    readout: gainguard::mup::MuReadout,
}

/// The network at width `d`, its readout divided by `d / base`.
pub fn network(vs: nn::Path, d: i64, base: i64, model: Model) -> Network {
    Network {
        model,
        w_in: linear(&vs / "w_in", D_IN, d),
        hidden: linear(&vs / "hidden", d, d),
        readout: mu_readout(&vs / "readout", d, D_OUT, base, false),
    }
}

impl Network {
    /// What `W_hidden` multiplies: one row per input.
    pub fn hidden_input(&self, x: &Tensor) -> Tensor {
        let z = rms_norm(&x.apply(&self.w_in));
        match self.model {
            Model::Hidden => z.relu(),
            Model::RankCapped => z,
        }
    }
}

impl Module for Network {
    fn forward(&self, x: &Tensor) -> Tensor {
        rms_norm(&self.hidden_input(x).apply(&self.hidden)).relu().apply(&self.readout)
    }
}

/// sigma_max, ‖W‖_F and the stable rank `‖W‖_F² / sigma_max²` of a matrix, from a float64 SVD. They obey
/// `ln sigma_max = ln ‖W‖_F − ½ ln(stable rank)`, so along a width sweep
/// `slope(sigma_max) = slope(‖W‖_F) − ½·slope(stable rank)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spectrum {
    pub sigma_max: f64,
    pub frobenius: f64,
    pub stable_rank: f64,
}

pub fn spectrum(w: &Tensor) -> Spectrum {
    let (_, s, _) = w.to_kind(Kind::Double).svd(true, false);
    let sigma_max = s.max().double_value(&[]);
    let frobenius = s.pow_tensor_scalar(2).sum(Kind::Double).double_value(&[]).sqrt();
    Spectrum { sigma_max, frobenius, stable_rank: (frobenius / sigma_max).powi(2) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// numpy's `matrix_rank` convention: singular values above `s_max · max(rows, cols) · eps` of the
    /// matrix's own dtype (float32 here: its rounding, not float64's, is the noise floor).
    fn numerical_rank(a: &Tensor) -> i64 {
        let (_, s, _) = a.to_kind(Kind::Double).svd(true, false);
        let s_max = s.max().double_value(&[]);
        let tol = s_max * a.size().into_iter().max().unwrap() as f64 * f32::EPSILON as f64;
        s.gt(tol).sum(Kind::Int64).int64_value(&[])
    }

    fn hidden_input_rank(model: Model, d: i64, batch: i64) -> i64 {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = network(vs.root(), d, 64, model);
        let x = Tensor::randn([batch, D_IN], (Kind::Float, Device::Cpu));
        numerical_rank(&tch::no_grad(|| net.hidden_input(&x)))
    }

    #[test]
    fn the_hidden_matrix_of_the_hidden_layer_model_sees_a_full_rank_input() {
        for batch in [64, 128, 512] {
            let rank = hidden_input_rank(Model::Hidden, 128, batch);
            assert!(rank as f64 >= 0.9 * 128.min(batch) as f64, "batch {batch}: rank {rank} of min(d, batch) = {}", 128.min(batch));
        }
    }

    #[test]
    fn the_rank_capped_model_feeds_its_hidden_matrix_at_most_d_in_dimensions() {
        let rank = hidden_input_rank(Model::RankCapped, 128, 512);
        assert!(rank <= D_IN, "rank {rank} > d_in = {D_IN}");
        assert!(rank >= D_IN - 2, "rank {rank}: the control should reach d_in, not fail for another reason");
    }

    #[test]
    fn the_spectrum_obeys_sigma_equals_frobenius_over_the_root_of_the_stable_rank() {
        tch::manual_seed(1);
        let w = Tensor::randn([96, 64], (Kind::Float, Device::Cpu));
        let s = spectrum(&w);
        // Independent references: sigma_max² as the largest eigenvalue of WᵀW (a symmetric eigensolver, not
        // the SVD), and the Frobenius norm as the root of the sum of squared entries.
        let wd = w.to_kind(Kind::Double);
        let two = wd.tr().matmul(&wd).linalg_eigvalsh("L").max().double_value(&[]).sqrt();
        let fro = w.to_kind(Kind::Double).pow_tensor_scalar(2).sum(Kind::Double).double_value(&[]).sqrt();
        assert!((s.sigma_max - two).abs() < 1e-9 * two && (s.frobenius - fro).abs() < 1e-9 * fro, "{s:?} vs {two} {fro}");
        assert!((s.sigma_max.ln() - (s.frobenius.ln() - 0.5 * s.stable_rank.ln())).abs() < 1e-12);
    }
}

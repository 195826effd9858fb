//! The gradients at a step, checked before anything changes: their global norm (summed in f64 where the
//! gradients are f64), the first one holding NaN or Inf, and global-norm clipping.

use tch::{Device, Kind, Tensor};

use crate::fused;

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
pub(super) struct GradientCheck {
    /// Each slot's gradient, None where it is undefined.
    pub(super) grads: Vec<Option<Tensor>>,
    pub(super) norm: Option<f64>,
    /// The first slot whose gradient holds NaN or Inf.
    pub(super) nonfinite: Option<usize>,
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

/// Each parameter's gradient, None where it is undefined.
pub(super) fn gradients<'a>(params: impl Iterator<Item = &'a Tensor>) -> Vec<Option<Tensor>> {
    params
        .map(|p| {
            let g = p.grad();
            g.defined().then_some(g)
        })
        .collect()
}

/// Each parameter's gradient, their global norm and the first non-finite one ([`gradient_norm`]).
pub(super) fn check<'a>(params: impl Iterator<Item = &'a Tensor>) -> GradientCheck {
    let grads = gradients(params);
    let (norm, nonfinite) = gradient_norm(&grads);
    GradientCheck { grads, norm, nonfinite }
}

/// Global-norm clipping as PyTorch's `clip_grad_norm_`: scale every defined gradient by
/// `max / (norm + 1e-6)` when that is below 1. Returns whether it clipped.
pub(super) fn clip(grads: &[Option<Tensor>], norm: f64, max_norm: f64) -> bool {
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

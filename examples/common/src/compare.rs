//! Comparisons of two models' weights, shared by the optimizer parity tests and examples/device_check.rs.

use tch::nn::VarStore;
use tch::{Device, Tensor};

/// ‖a − b‖_∞ / ‖b‖_∞, compared on the CPU (either tensor may live on a GPU).
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_device(Device::Cpu), b.to_device(Device::Cpu));
    (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-30)
}

/// Max over parameters of ‖a − b‖_∞ / ‖b‖_∞, with the name of the worst parameter.
pub fn max_rel_diff(a: &VarStore, b: &VarStore) -> (f64, String) {
    let bv = b.variables();
    let mut worst = (0.0, String::new());
    for (name, t) in a.variables() {
        let d = rel_diff(&t, &bv[&name]);
        if d > worst.0 {
            worst = (d, name);
        }
    }
    worst
}

//! Comparisons of two models' weights, shared by the optimizer parity tests.
#![allow(dead_code)]

use tch::nn::VarStore;

/// Max over parameters of ‖a − b‖_∞ / ‖b‖_∞, with the name of the worst parameter.
pub fn max_rel_diff(a: &VarStore, b: &VarStore) -> (f64, String) {
    let bv = b.variables();
    let mut worst = (0.0, String::new());
    for (name, t) in a.variables() {
        let r = &bv[&name];
        let d = (&t - r).abs().max().double_value(&[]) / r.abs().max().double_value(&[]).max(1e-30);
        if d > worst.0 {
            worst = (d, name);
        }
    }
    worst
}

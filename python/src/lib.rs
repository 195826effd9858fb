//! `gainguard._native`: the Rust core under the Python package. The package (python/gainguard) keeps every
//! tensor in torch's own objects; these functions take them through pyo3-tch, which hands over the same
//! `at::Tensor` (shared storage, no copy), and step, plan or monitor them with the `gainguard` crate.

use std::path::Path;

use gainguard::fit::{self, FitError, MupPoint};
use gainguard::fused::Buffers;
use gainguard::optim::{gradient_norm, step_buffers, StepScalars};
use gainguard::plan::ParamSpec;
use gainguard::{BaseShapes, CpuKernel, DecayMode, NonFiniteGrad, Override, Rule, ScalingPlan};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::Tensor;

mod monitor;

fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Base shapes read and checked by the Rust side, as the canonical JSON it writes (`{name: shape}` or
/// `{"base": ..., "delta": ...}`). `origin` names the source in errors.
#[pyfunction]
fn parse_base_shapes(text: &str, origin: &str) -> PyResult<String> {
    BaseShapes::from_json_str(text, origin).map(|b| b.to_json_string()).map_err(value_error)
}

#[pyfunction]
fn read_base_shapes(path: &str) -> PyResult<String> {
    BaseShapes::from_json_file(Path::new(path)).map(|b| b.to_json_string()).map_err(value_error)
}

/// A built scaling plan: the rule table and each parameter's width-scaled lr, wd and Adam epsilon.
#[pyclass(frozen)]
struct Plan {
    plan: ScalingPlan,
    eps: Vec<f64>,
}

#[pymethods]
impl Plan {
    fn table(&self) -> String {
        self.plan.to_table()
    }

    fn json(&self) -> String {
        self.plan.to_json()
    }

    /// One tuple per parameter, in the order given: (name, lr, weight_decay, eps, class, width_multiplier,
    /// tied_to).
    #[allow(clippy::type_complexity)]
    fn decisions(&self) -> Vec<(String, f64, f64, f64, String, f64, Option<String>)> {
        self.plan
            .decisions
            .iter()
            .zip(&self.eps)
            .map(|(d, &eps)| {
                let class = serde_json::to_value(d.class).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
                (d.name.clone(), d.lr, d.weight_decay, eps, class, d.width_multiplier, d.tied_to.clone())
            })
            .collect()
    }
}

/// Builds the plan for parameters `names` of `shapes` (tied where `storages` repeat) against base shapes given
/// as JSON, under `rule` (`paper`, `mup-coupled`, `mup-fixed-wd`, `standard`, `gamma=G[,lr_exponent=E]`).
#[pyfunction]
#[pyo3(signature = (names, shapes, storages, base_json, rule, lr, weight_decay, eps, overrides_json=None))]
#[allow(clippy::too_many_arguments)]
fn build_plan(
    names: Vec<String>,
    shapes: Vec<Vec<i64>>,
    storages: Vec<usize>,
    base_json: &str,
    rule: &str,
    lr: f64,
    weight_decay: f64,
    eps: f64,
    overrides_json: Option<&str>,
) -> PyResult<Plan> {
    let rule = Rule::parse(rule).map_err(value_error)?;
    let base = BaseShapes::from_json_str(base_json, "base_shapes").map_err(value_error)?;
    let overrides = match overrides_json {
        Some(text) => Override::parse_list(text, "overrides").map_err(value_error)?,
        None => Vec::new(),
    };
    let specs: Vec<ParamSpec> = names
        .into_iter()
        .zip(shapes)
        .zip(storages)
        .map(|((name, shape), storage)| ParamSpec { name, shape, storage: Some(storage) })
        .collect();
    let plan = ScalingPlan::build(&specs, &base, &overrides, rule, lr, weight_decay).map_err(value_error)?;
    let eps = plan.decisions.iter().map(|d| plan.rule.eps(d.class, eps, d.width_multiplier)).collect();
    Ok(Plan { plan, eps })
}

/// What a step does with its gradients: `(grad_norm, nonfinite, skip, error)`.
type StepDecision = (Option<f64>, Option<String>, bool, Option<String>);

fn nonfinite_mode(mode: &str) -> PyResult<NonFiniteGrad> {
    serde_json::from_value(serde_json::Value::String(mode.to_string()))
        .map_err(|_| PyValueError::new_err(format!("nonfinite_grad = {mode:?}: expected \"skip\", \"step\" or \"error\"")))
}

/// Checks `nonfinite_grad` (`skip`, `step`, `error`), as the optimizer does at construction.
#[pyfunction]
fn parse_nonfinite_grad(mode: &str) -> PyResult<()> {
    nonfinite_mode(mode).map(|_| ())
}

/// What step `step` does with its gradients, by the plugin's rule ([`NonFiniteGrad::decide`], which
/// `WidthScaledAdamW` steps by), so that both languages decide alike: `(grad_norm, nonfinite, skip, error)`.
/// The global 2-norm and the first gradient holding NaN or Inf come from [`gradient_norm`], named by `names`;
/// `"step"` reads no gradient (both None, never skips), `"skip"` skips on a non-finite one, `"error"` returns
/// the plugin's `OptimError::NonFiniteGradient` message for the caller to raise, nothing having changed.
#[pyfunction]
fn check_step(
    py: Python<'_>,
    grads: Vec<PyTensor>,
    names: Vec<String>,
    step: u64,
    nonfinite_grad: &str,
) -> PyResult<StepDecision> {
    let mode = nonfinite_mode(nonfinite_grad)?;
    if names.len() != grads.len() {
        return Err(PyValueError::new_err("check_step: grads and names differ in length"));
    }
    if mode == NonFiniteGrad::Step {
        return Ok((None, None, false, None));
    }
    let grads: Vec<Option<Tensor>> = grads.into_iter().map(|g| Some(g.0)).collect();
    let (norm, first) = py.allow_threads(move || gradient_norm(&grads));
    let nonfinite = first.map(|i| names[i].clone());
    let (skip, error) = match mode.decide(nonfinite.as_deref(), step, norm) {
        Ok(skip) => (skip, None),
        Err(error) => (true, Some(error.to_string())),
    };
    Ok((norm, nonfinite, skip, error))
}

/// What step `step` does by the plugin's rule ([`NonFiniteGrad::decide`]) when the caller found the gradient
/// norm and the first non-finite gradient itself: the optimizer over DTensor shards, whose norm and flags are
/// one all-reduce over the ranks. Returns `(grad_norm, nonfinite, skip, error)` as [`check_step`].
#[pyfunction]
#[pyo3(signature = (nonfinite_grad, nonfinite, step, grad_norm))]
fn decide_step(
    nonfinite_grad: &str,
    nonfinite: Option<String>,
    step: u64,
    grad_norm: Option<f64>,
) -> PyResult<StepDecision> {
    let mode = nonfinite_mode(nonfinite_grad)?;
    let (skip, error) = match mode.decide(nonfinite.as_deref(), step, grad_norm) {
        Ok(skip) => (skip, None),
        Err(error) => (true, Some(error.to_string())),
    };
    Ok((grad_norm, nonfinite, skip, error))
}

/// gamma* by the plugin's fit, the one `gainguard calibrate` makes ([`fit::calibrate_gamma`]), over
/// `(group, gamma, width, sigma_max)` points: `(gamma, gamma_se, per_gamma)`, with per_gamma
/// `(gamma, slope, slope_se, implied_alpha)` in ascending gamma, and gamma and its error None where the slope
/// does not move with gamma. Points the fit cannot take raise ValueError naming them.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn calibrate_gamma(points: Vec<(String, f64, f64, f64)>) -> PyResult<(Option<f64>, Option<f64>, Vec<(f64, f64, f64, f64)>)> {
    let points: Vec<MupPoint> =
        points.into_iter().map(|(group, gamma, width, sigma_max)| MupPoint { group, gamma, width, sigma_max }).collect();
    let per_gamma = fit::slopes_at_gammas(&points).map_err(value_error)?;
    let slopes = per_gamma.iter().map(|s| (s.gamma, s.slope, s.slope_se, s.implied_alpha)).collect();
    match fit::gamma_from_slopes(per_gamma) {
        Ok(c) => Ok((Some(c.gamma), Some(c.gamma_se), slopes)),
        Err(FitError::FlatInGamma(_)) => Ok((None, None, slopes)),
        Err(e) => Err(value_error(e)),
    }
}

/// A percentile-bootstrap interval on [`calibrate_gamma`]'s gamma* ([`fit::bootstrap_gamma`]) over the same
/// points and one seed per point: `(lo, hi, method, failed)`, method `"seeds"` (resampled within every
/// (gamma, width) cell) or `"residuals"` (one seed per cell), failed the resamples without a zero crossing.
/// Raises ValueError naming bad input, or when no resample has a crossing.
#[pyfunction]
#[pyo3(signature = (points, seeds, resamples=fit::DEFAULT_RESAMPLES, level=0.95, rng_seed=0))]
fn bootstrap_gamma(points: Vec<(String, f64, f64, f64)>, seeds: Vec<u64>, resamples: usize, level: f64, rng_seed: u64) -> PyResult<(f64, f64, &'static str, usize)> {
    let points: Vec<MupPoint> =
        points.into_iter().map(|(group, gamma, width, sigma_max)| MupPoint { group, gamma, width, sigma_max }).collect();
    let b = fit::bootstrap_gamma(&points, &seeds, resamples, level, rng_seed).map_err(value_error)?;
    let method = match b.method {
        fit::BootstrapMethod::Seeds => "seeds",
        fit::BootstrapMethod::Residuals => "residuals",
    };
    Ok((b.interval.0, b.interval.1, method, b.failed))
}

fn decay_mode(decay: &str) -> PyResult<DecayMode> {
    match decay {
        "coupled" => Ok(DecayMode::Coupled),
        "independent" => Ok(DecayMode::Independent),
        other => Err(PyValueError::new_err(format!("decay = {other:?}: expected \"coupled\" or \"independent\""))),
    }
}

/// One AdamW step of one group, in place: `steps` are torch's `state['step']` tensors (one per parameter,
/// counting the steps applied to it), each incremented here. `lr` and `weight_decay` are the group's values
/// now (a torch scheduler may have scaled them). Returns each parameter's decay horizon after the step:
/// `horizons[i]` plus what this step's decay adds (`StepScalars::horizon`: `lr·wd` coupled, `wd`
/// independent), as the plugin's optimizer accumulates it per stepped parameter.
#[pyfunction]
#[pyo3(signature = (params, grads, exp_avgs, exp_avg_sqs, steps, horizons, lr, weight_decay, beta1, beta2, eps, decay, fused=true))]
#[allow(clippy::too_many_arguments)]
fn adamw_step(
    py: Python<'_>,
    params: Vec<PyTensor>,
    grads: Vec<PyTensor>,
    exp_avgs: Vec<PyTensor>,
    exp_avg_sqs: Vec<PyTensor>,
    steps: Vec<PyTensor>,
    horizons: Vec<f64>,
    lr: f64,
    weight_decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    decay: &str,
    fused: bool,
) -> PyResult<Vec<f64>> {
    let n = params.len();
    if [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len(), horizons.len()].iter().any(|&l| l != n) {
        return Err(PyValueError::new_err("adamw_step: params, grads, exp_avgs, exp_avg_sqs, steps and horizons differ in length"));
    }
    let mode = decay_mode(decay)?;
    let scalars = StepScalars::of(lr, weight_decay, beta1, beta2, eps, mode);
    let mut counts = Vec::with_capacity(n);
    for (i, t) in steps.iter().enumerate() {
        let t = f64::try_from(&t.0).map_err(|e| PyTypeError::new_err(format!("state['step'] of parameter {i}: {e}")))?;
        counts.push(t as u64 + 1);
    }
    let (params, grads, exp_avgs, exp_avg_sqs): (Vec<Tensor>, Vec<Tensor>, Vec<Tensor>, Vec<Tensor>) = (
        params.into_iter().map(|t| t.0).collect(),
        grads.into_iter().map(|t| t.0).collect(),
        exp_avgs.into_iter().map(|t| t.0).collect(),
        exp_avg_sqs.into_iter().map(|t| t.0).collect(),
    );
    let mut steps: Vec<Tensor> = steps.into_iter().map(|t| t.0).collect();
    py.allow_threads(move || {
        let buffers: Vec<Buffers<'_>> = (0..n)
            .map(|i| Buffers { param: &params[i], grad: &grads[i], first_moment: &exp_avgs[i], second_moment: &exp_avg_sqs[i] })
            .collect();
        tch::no_grad(|| {
            step_buffers(&buffers, &scalars, &counts, fused, CpuKernel::Exact);
            for t in &mut steps {
                let _ = t.g_add_scalar_(1);
            }
        });
    });
    Ok(horizons.into_iter().map(|h| h + scalars.horizon).collect())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(parse_base_shapes, m)?)?;
    m.add_function(wrap_pyfunction!(read_base_shapes, m)?)?;
    m.add_function(wrap_pyfunction!(build_plan, m)?)?;
    m.add_function(wrap_pyfunction!(parse_nonfinite_grad, m)?)?;
    m.add_function(wrap_pyfunction!(check_step, m)?)?;
    m.add_function(wrap_pyfunction!(decide_step, m)?)?;
    m.add_function(wrap_pyfunction!(calibrate_gamma, m)?)?;
    m.add_function(wrap_pyfunction!(bootstrap_gamma, m)?)?;
    m.add_function(wrap_pyfunction!(adamw_step, m)?)?;
    m.add_class::<Plan>()?;
    monitor::register(m)?;
    Ok(())
}

//! The steady-state coord check: the user's own model, trained along the μP path (`lr ∝ 1/m`,
//! `wd ∝ m^gamma`) at several widths and gammas until every matrix-like parameter reaches the decay horizon
//! `H = Σ_t lr_t·wd_t`, and the gamma* at which its sigma_max is flat in width.
//!
//! microsoft/mup's coord check trains a few steps at several widths and plots activations; this one trains to
//! AdamW's steady state (H ≥ 5) and reads each matrix's sigma_max, ‖W‖_F and stable rank `‖W‖_F²/sigma_max²`
//! (float64 SVD, mean over the last timescale `H − 1 < h ≤ H`). gamma* is [`crate::fit::calibrate_gamma`]'s,
//! the same fit `gainguard calibrate` makes, with a percentile-bootstrap interval ([`crate::fit::bootstrap_gamma`]),
//! and [`CoordCheck::measurements`] writes its file.
//!
//! ```no_run
//! use gainguard::coord_check::{coord_check, CoordCheckConfig};
//! use tch::nn::{self, Module};
//! # fn demo() -> Result<(), gainguard::coord_check::CoordCheckError> {
//! let config = CoordCheckConfig { widths: vec![32, 64, 128], base_width: 32, lr: 0.02, weight_decay: 1.0, ..Default::default() };
//! let result = coord_check(
//!     &config,
//!     |vs: &nn::Path, d: i64| nn::seq().add(nn::linear(vs / "inp", 8, d, Default::default())).add_fn(|x| x.relu())
//!         .add(nn::linear(vs / "hidden", d, d, Default::default())),
//!     |model: &nn::Sequential, _step: u64| model.forward(&tch::Tensor::randn([32, 8], tch::kind::FLOAT_CPU)).square().mean(None),
//! )?;
//! println!("gamma* = {:.2}, 95% bootstrap interval {:?}", result.calibration.gamma, result.interval);
//! # Ok(()) }
//! ```

use tch::nn;
use tch::{Device, Kind, Tensor};

use crate::fit::{self, FitError, GammaCalibration, Measurement, MupPoint, SteadyStateChecks};
use crate::steady_state::{warmup_then_constant, HorizonRate, SteadyStateTrace};
use crate::{AdamWConfig, BaseShapes, Override, ParamClass, Rule, WidthScaledAdamW};

#[derive(Debug, thiserror::Error)]
pub enum CoordCheckError {
    #[error("coord_check: widths {widths:?} hold {found} distinct values, need at least 3 to fit a slope in width")]
    TooFewWidths { widths: Vec<i64>, found: usize },
    #[error("coord_check: gammas {gammas:?} hold {found} distinct values, need at least 2 to locate the gamma where the slope is zero")]
    TooFewGammas { gammas: Vec<f64>, found: usize },
    #[error("coord_check: {what} = {value} must be finite and > 0")]
    NotPositive { what: &'static str, value: f64 },
    #[error("coord_check: the model at width {width} has no matrix-like parameter (its plan: {params}); the check measures hidden matrices, whose shape grows with width in two dimensions")]
    NoMatrixLike { width: i64, params: String },
    #[error("coord_check: the plan at width {width} puts `{param}` at width multiplier {found}, expected {expected} = width / base_width")]
    UnexpectedMultiplier { width: i64, param: String, found: f64, expected: f64 },
    #[error("coord_check: `{param}` at width {width}, gamma {gamma}: H = {horizon} is out of reach within {limit} steps (lr·wd = {per_step:e})")]
    HorizonOutOfReach { param: String, width: i64, gamma: f64, horizon: f64, limit: u64, per_step: f64 },
    #[error("coord_check: {0}")]
    Rule(#[from] crate::rule::RuleError),
    #[error("coord_check: {0}")]
    Optim(#[from] crate::OptimError),
    #[error("coord_check: {0}")]
    Fit(#[from] FitError),
}

#[derive(Clone, Debug)]
pub struct CoordCheckConfig {
    /// Model widths (at least 3 distinct), each trained at every gamma.
    pub widths: Vec<i64>,
    /// The proxy width: m = width / base_width. The base shapes are the model at this width and at twice it
    /// (the delta, as mup's `set_base_shapes`).
    pub base_width: i64,
    /// Base (proxy) lr and weight decay, before width scaling.
    pub lr: f64,
    pub weight_decay: f64,
    /// Weight-decay exponents to run (at least 2 distinct).
    pub gammas: Vec<f64>,
    /// Every matrix-like parameter trains until its decay horizon reaches this.
    pub horizon: f64,
    pub seeds: u64,
    /// Linear warmup steps before the constant lr.
    pub warmup: u64,
    /// Adam's beta2: 0.95, so that the second moment's memory is short against a timescale `1/(lr·wd)`.
    pub beta2: f64,
    /// Overrides passed to the optimizer (a readout's role, say).
    pub overrides: Vec<Override>,
    pub device: Device,
    /// sigma_max samples per timescale over a run.
    pub samples_per_timescale: f64,
    pub max_steps: u64,
}

impl Default for CoordCheckConfig {
    fn default() -> Self {
        CoordCheckConfig {
            widths: vec![],
            base_width: 0,
            lr: 1e-2,
            weight_decay: 0.5,
            gammas: vec![0.5, 0.75, 1.0],
            horizon: 6.0,
            seeds: 1,
            warmup: 20,
            beta2: 0.95,
            overrides: vec![],
            device: Device::Cpu,
            samples_per_timescale: 8.0,
            max_steps: 10_000_000,
        }
    }
}

/// The bootstrap's generator seed: the interval is the same on every call with the same rows.
pub const BOOTSTRAP_SEED: u64 = 2510;

/// One matrix-like parameter at the end of one (width, gamma, seed) run.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CoordCheckRow {
    pub width: i64,
    pub gamma: f64,
    pub seed: u64,
    pub param: String,
    pub sigma_max: f64,
    pub frobenius: f64,
    pub stable_rank: f64,
    pub decay_horizon: f64,
    pub steps: u64,
    /// sigma_max's last-timescale mean over the one before, minus 1.
    pub drift: Option<f64>,
}

#[derive(Clone, Debug)]
pub struct CoordCheck {
    pub rows: Vec<CoordCheckRow>,
    /// gamma* (`calibration.gamma`) with its standard error, from all matrix-like parameters pooled.
    pub calibration: GammaCalibration,
    /// 95% percentile-bootstrap interval on gamma* ([`fit::bootstrap_gamma`]: seeds resampled within every
    /// (gamma, width) cell when there are two or more, each gamma's residuals otherwise); `gamma* ± 1.96·se`
    /// only where no resample has a zero crossing (then `bootstrap` is None).
    pub interval: (f64, f64),
    pub bootstrap: Option<fit::GammaBootstrap>,
    /// Whether every run reached H ≥ 5 and no drift check failed, and if not, why (as `gainguard calibrate`).
    pub reliability: fit::Reliability,
    base_lr: f64,
    base_weight_decay: f64,
}

impl CoordCheck {
    /// The rows as a `gainguard calibrate` measurements file.
    pub fn measurements(&self) -> Vec<Measurement> {
        self.rows.iter().map(|r| to_measurement(r, self.base_lr, self.base_weight_decay)).collect()
    }
}

fn to_measurement(r: &CoordCheckRow, lr: f64, wd: f64) -> Measurement {
    Measurement {
        decay_horizon: Some(r.decay_horizon),
        steps: Some(r.steps),
        seed: Some(r.seed),
        checks: Some(SteadyStateChecks { drift: r.drift, ..Default::default() }),
        ..Measurement::new(r.width as f64, r.gamma, lr, wd, r.param.clone(), r.sigma_max)
    }
}

fn spectrum(w: &Tensor) -> (f64, f64, f64) {
    let w = w.detach().to_kind(Kind::Double);
    let w = if w.dim() > 2 { w.flatten(0, -2) } else { w };
    let (_, s, _) = w.svd(true, false);
    let sigma = s.max().double_value(&[]);
    let frobenius = s.square().sum(Kind::Double).double_value(&[]).sqrt();
    (sigma, frobenius, (frobenius / sigma).powi(2))
}

fn distinct<T: Copy + PartialOrd>(v: &[T]) -> usize {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.dedup_by(|a, b| a == b);
    v.len()
}

/// Trains `build(vs, width)` with `loss(model, step)` at every (gamma, width, seed) and fits gamma*.
pub fn coord_check<M, B, L>(config: &CoordCheckConfig, mut build: B, mut loss: L) -> Result<CoordCheck, CoordCheckError>
where
    B: FnMut(&nn::Path, i64) -> M,
    L: FnMut(&M, u64) -> Tensor,
{
    let c = config;
    if distinct(&c.widths) < 3 {
        return Err(CoordCheckError::TooFewWidths { widths: c.widths.clone(), found: distinct(&c.widths) });
    }
    if distinct(&c.gammas) < 2 {
        return Err(CoordCheckError::TooFewGammas { gammas: c.gammas.clone(), found: distinct(&c.gammas) });
    }
    for (what, value) in [("base_width", c.base_width as f64), ("lr", c.lr), ("weight_decay", c.weight_decay), ("horizon", c.horizon)] {
        if !(value.is_finite() && value > 0.0) {
            return Err(CoordCheckError::NotPositive { what, value });
        }
    }
    let (base_vs, delta_vs) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let _ = build(&base_vs.root(), c.base_width);
    let _ = build(&delta_vs.root(), 2 * c.base_width);
    let base = BaseShapes::from_var_stores(&base_vs, &delta_vs);
    let schedule = warmup_then_constant(c.warmup);
    let mut rows = Vec::new();
    for &gamma in &c.gammas {
        let rule = Rule::custom(gamma, 1.0)?;
        for &width in &c.widths {
            for seed in 0..c.seeds.max(1) {
                tch::manual_seed(1000 * seed as i64 + width);
                let vs = nn::VarStore::new(c.device);
                let model = build(&vs.root(), width);
                let config = AdamWConfig {
                    lr: c.lr,
                    weight_decay: c.weight_decay,
                    rule,
                    overrides: c.overrides.clone(),
                    schedule: schedule.clone(),
                    beta2: c.beta2,
                    ..Default::default()
                };
                let mut opt = WidthScaledAdamW::new(&vs, &base, config)?;
                let matrices: Vec<_> =
                    opt.plan().decisions.iter().filter(|d| d.class == ParamClass::MatrixLike && d.tied_to.is_none()).cloned().collect();
                if matrices.is_empty() {
                    let params = opt.plan().decisions.iter().map(|d| format!("{} {:?}", d.name, d.class)).collect::<Vec<_>>().join(", ");
                    return Err(CoordCheckError::NoMatrixLike { width, params });
                }
                let expected = width as f64 / c.base_width as f64;
                let mut steps = 0;
                let mut per_step = f64::INFINITY;
                for d in &matrices {
                    if (d.width_multiplier - expected).abs() > 1e-9 * expected {
                        return Err(CoordCheckError::UnexpectedMultiplier { width, param: d.name.clone(), found: d.width_multiplier, expected });
                    }
                    let rate = HorizonRate::new(d.lr, d.weight_decay, opt.config().decay, opt.config().schedule_weight_decay);
                    let n = rate.steps_to_reach(&schedule, c.horizon, c.max_steps).ok_or_else(|| CoordCheckError::HorizonOutOfReach {
                        param: d.name.clone(),
                        width,
                        gamma,
                        horizon: c.horizon,
                        limit: c.max_steps,
                        per_step: rate.per_step,
                    })?;
                    steps = steps.max(n);
                    per_step = per_step.min(rate.per_step);
                }
                let every = ((1.0 / per_step / c.samples_per_timescale).floor() as u64).max(1);
                let variables = vs.variables();
                let mut traces: Vec<[SteadyStateTrace; 3]> = matrices.iter().map(|_| Default::default()).collect();
                for step in 0..steps {
                    let l = loss(&model, step);
                    opt.zero_grad();
                    l.backward();
                    opt.step();
                    if (steps - 1 - step) % every == 0 {
                        for (d, t) in matrices.iter().zip(&mut traces) {
                            let h = opt.decay_horizon(&d.name).unwrap_or(0.0);
                            if h > c.horizon - 2.0 {
                                let (s, f, r) = spectrum(&variables[&d.name]);
                                t[0].push(h, s);
                                t[1].push(h, f);
                                t[2].push(h, r);
                            }
                        }
                    }
                }
                for (d, t) in matrices.iter().zip(&traces) {
                    let h = opt.decay_horizon(&d.name).unwrap_or(0.0);
                    let (sigma, frobenius, stable_rank) = match (t[0].last_timescale_mean(h), t[1].last_timescale_mean(h), t[2].last_timescale_mean(h)) {
                        (Some(s), Some(f), Some(r)) => (s, f, r),
                        _ => spectrum(&variables[&d.name]),
                    };
                    rows.push(CoordCheckRow {
                        width,
                        gamma,
                        seed,
                        param: d.name.clone(),
                        sigma_max: sigma,
                        frobenius,
                        stable_rank,
                        decay_horizon: h,
                        steps,
                        drift: t[0].drift(h),
                    });
                }
            }
        }
    }
    let points: Vec<MupPoint> = rows.iter().map(|r| MupPoint { group: r.param.clone(), gamma: r.gamma, width: r.width as f64, sigma_max: r.sigma_max }).collect();
    let calibration = fit::calibrate_gamma(&points)?;
    let ms: Vec<Measurement> = rows.iter().map(|r| to_measurement(r, c.lr, c.weight_decay)).collect();
    let seeds: Vec<u64> = rows.iter().map(|r| r.seed).collect();
    let bootstrap = match fit::bootstrap_gamma(&points, &seeds, fit::DEFAULT_RESAMPLES, 0.95, BOOTSTRAP_SEED) {
        Ok(b) => Some(b),
        Err(FitError::Bootstrap(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let interval = bootstrap
        .as_ref()
        .map_or((calibration.gamma - 1.96 * calibration.gamma_se, calibration.gamma + 1.96 * calibration.gamma_se), |b| b.interval);
    Ok(CoordCheck { rows, calibration, interval, bootstrap, reliability: fit::reliability(&ms), base_lr: c.lr, base_weight_decay: c.weight_decay })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::Module;

    fn rms_norm(x: &Tensor) -> Tensor {
        x * (x.square().mean_dim(-1, true, Kind::Float) + 1e-6).rsqrt()
    }

    /// `x → W_in → RMSNorm → ReLU → W_hidden → RMSNorm → readout` fitted to a fixed random linear map.
    #[derive(Debug)]
    struct Tiny {
        w_in: nn::Linear,
        hidden: nn::Linear,
        readout: nn::Linear,
        d: i64,
    }

    fn tiny(vs: &nn::Path, d: i64) -> Tiny {
        let cfg = nn::LinearConfig { bias: false, ..Default::default() };
        Tiny { w_in: nn::linear(vs / "w_in", 8, d, cfg), hidden: nn::linear(vs / "hidden", d, d, cfg), readout: nn::linear(vs / "readout", d, 4, cfg), d }
    }

    impl Module for Tiny {
        fn forward(&self, x: &Tensor) -> Tensor {
            let h = rms_norm(&x.apply(&self.w_in)).relu();
            (rms_norm(&h.apply(&self.hidden)).relu().apply(&self.readout)) * (16.0 / self.d as f64)
        }
    }

    fn config() -> CoordCheckConfig {
        CoordCheckConfig {
            widths: vec![16, 32, 64],
            base_width: 16,
            lr: 0.05,
            weight_decay: 1.0,
            gammas: vec![0.0, 1.0],
            horizon: 5.0,
            warmup: 5,
            overrides: vec![Override { role: Some(crate::ParamRole::Readout), ..Override::new("readout.weight") }],
            ..Default::default()
        }
    }

    fn loss(target: &Tensor) -> impl FnMut(&Tiny, u64) -> Tensor + '_ {
        move |m: &Tiny, _| {
            let x = Tensor::randn([32, 8], (Kind::Float, Device::Cpu));
            (m.forward(&x) - x.matmul(target)).square().mean(Kind::Float)
        }
    }

    #[test]
    fn coord_check_runs_every_cell_to_the_horizon_and_its_gamma_is_calibrates_fit_of_its_rows() {
        let target = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
        let r = coord_check(&config(), tiny, loss(&target)).unwrap();
        assert_eq!(r.rows.len(), 2 * 3, "one hidden matrix per (gamma, width): {:?}", r.rows);
        for row in &r.rows {
            assert_eq!(row.param, "hidden.weight");
            assert!(row.decay_horizon >= 5.0 && row.decay_horizon < 5.0 + 0.1, "{row:?}");
            // Each reading is a mean over the last timescale, so sigma² · stable rank = ‖W‖_F² holds up to the
            // separate averaging; sigma_max ≤ ‖W‖_F and 1 ≤ stable rank ≤ d hold for every sample.
            assert!((row.sigma_max.powi(2) * row.stable_rank / row.frobenius.powi(2) - 1.0).abs() < 0.05, "{row:?}");
            assert!(row.sigma_max <= row.frobenius && row.stable_rank >= 1.0 && row.stable_rank <= row.width as f64, "{row:?}");
        }
        // The slope at each gamma from the rows, by hand: least squares of ln sigma on ln width.
        let slope = |g: f64| {
            let pts: Vec<(f64, f64)> = r.rows.iter().filter(|x| x.gamma == g).map(|x| ((x.width as f64).ln(), x.sigma_max.ln())).collect();
            let (mx, my) = (pts.iter().map(|p| p.0).sum::<f64>() / 3.0, pts.iter().map(|p| p.1).sum::<f64>() / 3.0);
            pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / pts.iter().map(|p| (p.0 - mx).powi(2)).sum::<f64>()
        };
        let (s0, s1) = (slope(0.0), slope(1.0));
        // Two gammas: the line through both points crosses zero at −s0 / (s1 − s0).
        assert!((r.calibration.gamma - (-s0 / (s1 - s0))).abs() < 1e-9, "{} vs {}", r.calibration.gamma, -s0 / (s1 - s0));
        // The interval is the plugin's bootstrap on these rows (one seed per cell: residuals resampled).
        let points: Vec<MupPoint> = r.rows.iter().map(|x| MupPoint { group: x.param.clone(), gamma: x.gamma, width: x.width as f64, sigma_max: x.sigma_max }).collect();
        let b = fit::bootstrap_gamma(&points, &vec![0; points.len()], fit::DEFAULT_RESAMPLES, 0.95, BOOTSTRAP_SEED).unwrap();
        assert_eq!((r.interval, b.method), (b.interval, fit::BootstrapMethod::Residuals));
        assert!(r.interval.0 <= r.interval.1 && r.interval.0.is_finite() && r.interval.1.is_finite(), "{:?}", r.interval);
        assert_eq!(r.measurements().len(), r.rows.len());
    }

    #[test]
    fn bad_input_is_an_error_that_names_it() {
        let target = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
        let one_width = CoordCheckConfig { widths: vec![16, 16, 16], ..config() };
        let e = coord_check(&one_width, tiny, loss(&target)).unwrap_err().to_string();
        assert!(e.contains("widths [16, 16, 16] hold 1 distinct"), "{e}");
        let one_gamma = CoordCheckConfig { gammas: vec![0.5], ..config() };
        let e = coord_check(&one_gamma, tiny, loss(&target)).unwrap_err().to_string();
        assert!(e.contains("gammas [0.5] hold 1 distinct"), "{e}");
        // A model whose only width-sized matrices have one width dimension.
        let vector_only = |vs: &nn::Path, d: i64| nn::linear(vs / "inp", 8, d, Default::default());
        let e = coord_check(&CoordCheckConfig { overrides: vec![], ..config() }, vector_only, |m: &nn::Linear, _| m.forward(&Tensor::ones([2, 8], (Kind::Float, Device::Cpu))).sum(Kind::Float))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no matrix-like parameter") && e.contains("inp.weight"), "{e}");
    }
}

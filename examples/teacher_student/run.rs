//! One training run of the student at one width, rule, seed and regime, to the decay horizon.

use anyhow::{bail, Context, Result};
use gainguard::steady_state::{mean, warmup_then_constant, HorizonRate, SteadyStateTrace};
use gainguard::{AdamWConfig, BaseShapes, Override, ParamClass, ParamRole, Rule, WidthScaledAdamW};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::model::{network, spectrum, Model, D_IN, PARAM};

/// sigma_max samples per timescale over the last two timescales of a run.
const SAMPLES_PER_TIMESCALE: f64 = 16.0;
/// The quarter-horizon windows' samples are every `COARSE`-th of that grid (4 per timescale), from `H/2` on.
const COARSE: u64 = 4;

/// The regime of a run: what sets the gradient noise (batch), the base `(lr, wd)` and how far it runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Regime {
    pub lr: f64,
    pub wd: f64,
    pub batch: i64,
    pub horizon: f64,
}

/// The variations of one (rule, width, seed) cell.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Variant {
    Main,
    /// The hidden matrix's init multiplied by 0.1.
    SmallInit,
    /// lr and wd doubled: of the hidden matrix (`hidden`) or of the whole run (`all`).
    Doubled,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum DoubleScope {
    Hidden,
    All,
}

/// The hidden matrix at the end of a run: each number the mean over the last timescale (`H − 1 < h ≤ H`).
#[derive(Clone, Debug)]
pub struct RunResult {
    pub steps: u64,
    pub horizon: f64,
    pub sigma: f64,
    pub frobenius: f64,
    pub stable_rank: f64,
    /// sigma_max's last-timescale mean over the one before, minus 1.
    pub drift: f64,
    /// sigma_max's mean over the timescale before the last (`H − 2 < h ≤ H − 1`).
    pub previous_sigma: f64,
    /// sigma_max's mean over the last quarter of the run's horizon (`3H/4 < h ≤ H`) and over the quarter
    /// before (`H/2 < h ≤ 3H/4`), from a coarser grid of samples: a drift over windows of `H/4` timescales,
    /// whose means average over more of the steady state's own fluctuation than one timescale does.
    pub last_quarter_sigma: f64,
    pub previous_quarter_sigma: f64,
    pub tail_loss: f64,
}

pub struct Setup {
    pub model: Model,
    pub base: i64,
    pub base_shapes: BaseShapes,
    pub teacher: Box<dyn Module>,
    pub warmup: u64,
    pub beta2: f64,
    pub double: DoubleScope,
    /// Train exactly this many steps instead of until the horizon.
    pub steps: Option<u64>,
}

impl Setup {
    pub fn new(model: Model, base: i64, warmup: u64, beta2: f64, double: DoubleScope, steps: Option<u64>) -> Setup {
        // Base and delta shapes (the model at twice the base width), as mup's set_base_shapes: the delta
        // declares which dimensions are widths, so the hidden matrix is matrix-like at m = 1 too.
        let (base_vs, delta_vs) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
        let _ = network(base_vs.root(), base, base, model);
        let _ = network(delta_vs.root(), 2 * base, base, model);
        tch::manual_seed(12345);
        let mut teacher_vs = nn::VarStore::new(Device::Cpu);
        let teacher = network(teacher_vs.root(), crate::model::TEACHER_WIDTH, crate::model::TEACHER_WIDTH, model);
        teacher_vs.freeze();
        Setup { model, base, base_shapes: BaseShapes::from_var_stores(&base_vs, &delta_vs), teacher: Box::new(teacher), warmup, beta2, double, steps }
    }

    pub fn run(&self, rule: Rule, regime: Regime, d: i64, seed: u64, variant: Variant) -> Result<RunResult> {
        let doubled = |scope| if variant == Variant::Doubled && self.double == scope { 2.0 } else { 1.0 };
        tch::manual_seed(1000 * seed as i64 + d);
        let vs = nn::VarStore::new(Device::Cpu);
        let student = network(vs.root(), d, self.base, self.model);
        if variant == Variant::SmallInit {
            tch::no_grad(|| {
                let _ = vs.variables()[PARAM].shallow_clone().g_mul_scalar_(0.1);
            });
        }
        let schedule = warmup_then_constant(self.warmup);
        let readout = Override { role: Some(ParamRole::Readout), ..Override::new("readout.weight") };
        let (scale_hidden, scale_all) = (doubled(DoubleScope::Hidden), doubled(DoubleScope::All));
        let hidden = Override { lr_multiplier: Some(scale_hidden), wd_multiplier: Some(scale_hidden), ..Override::new(PARAM) };
        let config = AdamWConfig {
            lr: regime.lr * scale_all,
            weight_decay: regime.wd * scale_all,
            rule,
            overrides: vec![readout, hidden],
            schedule: schedule.clone(),
            beta2: self.beta2,
            ..Default::default()
        };
        let mut opt = WidthScaledAdamW::new(&vs, &self.base_shapes, config)?;
        let planned = opt.plan().get(PARAM).context("hidden.weight is planned")?.clone();
        let m = d as f64 / self.base as f64;
        if planned.class != ParamClass::MatrixLike || planned.width_multiplier != m {
            bail!("{PARAM} planned as {:?} with m = {}, expected matrix-like with m = {m}", planned.class, planned.width_multiplier);
        }
        let rate = HorizonRate::new(planned.lr, planned.weight_decay, opt.config().decay, opt.config().schedule_weight_decay);
        let steps = match self.steps {
            Some(n) => n,
            None => rate
                .steps_to_reach(&schedule, regime.horizon, 50_000_000)
                .with_context(|| format!("H = {} is out of reach at lr·wd = {:e}", regime.horizon, rate.per_step))?,
        };
        let final_horizon = rate.after(&schedule, steps);
        let every = ((rate.timescale_steps() / SAMPLES_PER_TIMESCALE).floor() as u64).max(1);
        let weights = vs.variables()[PARAM].shallow_clone();
        let (mut sigma, mut frobenius, mut stable_rank) = (SteadyStateTrace::default(), SteadyStateTrace::default(), SteadyStateTrace::default());
        let mut coarse = SteadyStateTrace::default();
        let mut tail = Vec::new();
        for step in 0..steps {
            let x = Tensor::randn([regime.batch, D_IN], (Kind::Float, Device::Cpu));
            let y = tch::no_grad(|| self.teacher.forward(&x));
            let loss = (student.forward(&x) - y).pow_tensor_scalar(2).mean(Kind::Float);
            opt.zero_grad();
            loss.backward();
            opt.step();
            let horizon = opt.decay_horizon(PARAM).context("the optimizer counts hidden.weight's horizon")?;
            let dense = horizon > final_horizon - 2.0 && (steps - 1 - step) % every == 0;
            let sparse = horizon > final_horizon / 2.0 && (steps - 1 - step) % (COARSE * every) == 0;
            if dense || sparse {
                let s = spectrum(&weights);
                if dense {
                    sigma.push(horizon, s.sigma_max);
                    frobenius.push(horizon, s.frobenius);
                    stable_rank.push(horizon, s.stable_rank);
                }
                if sparse {
                    coarse.push(horizon, s.sigma_max);
                }
            }
            if horizon > final_horizon - 1.0 {
                tail.push(loss.double_value(&[]));
            }
        }
        // The optimizer's own count and the plan's must agree: they are two computations of one sum.
        let horizon = opt.decay_horizon(PARAM).context("the optimizer counts hidden.weight's horizon")?;
        if (horizon - final_horizon).abs() > 1e-9 * final_horizon {
            bail!("{PARAM}: the optimizer counted decay horizon {horizon}, the plan predicts {final_horizon}");
        }
        let last = |t: &SteadyStateTrace| t.last_timescale_mean(horizon).context("no sample in the last timescale");
        Ok(RunResult {
            steps,
            horizon,
            sigma: last(&sigma)?,
            frobenius: last(&frobenius)?,
            stable_rank: last(&stable_rank)?,
            drift: sigma.drift(horizon).unwrap_or(f64::NAN),
            previous_sigma: sigma.mean_between(horizon - 2.0, horizon - 1.0).unwrap_or(f64::NAN),
            last_quarter_sigma: coarse.mean_between(0.75 * horizon, horizon).unwrap_or(f64::NAN),
            previous_quarter_sigma: coarse.mean_between(0.5 * horizon, 0.75 * horizon).unwrap_or(f64::NAN),
            tail_loss: mean(&tail),
        })
    }
}

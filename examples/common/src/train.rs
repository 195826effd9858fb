//! The training loop shared by the example trainer, the demo, the width-transfer experiment and the
//! end-to-end tests. Where gainguard enters: build the optimizer from the base shapes, call `step`,
//! nothing else; monitoring is a [`Monitor`] attached to the optimizer, off the training thread.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use gainguard::data::MarkovCorpus;
use gainguard::protocol::Sink;
use gainguard::reference::{GainReference, ReferenceProfile};
use gainguard::steady_state::{mean, HorizonRate, SteadyStateTrace};
use gainguard::{AdamWConfig, BaseShapes, Monitor, Override, ParamClass, ParamRole, Rule, SamplerConfig, ScalingPlan, Schedule, WidthScaledAdamW};
use indicatif::{ProgressBar, ProgressStyle};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::model;

#[derive(Clone, Debug)]
pub struct RunSpec {
    pub name: String,
    pub d_model: i64,
    pub base_d_model: i64,
    pub layers: i64,
    pub vocab: i64,
    pub seq_len: i64,
    pub batch: i64,
    pub steps: u64,
    pub lr: f64,
    pub wd: f64,
    pub rule: Rule,
    pub schedule: Schedule,
    pub seed: u64,
    pub device: Device,
    /// Sample spectra every this many steps (0: off).
    pub sample_every: u64,
    /// Adam's beta2. The steady-state experiments take 0.95 (LLaMA's): with 0.999 the second moment
    /// remembers 1000 steps, longer than their runs' timescales.
    pub beta2: f64,
}

/// The example trainer's and the demo's settings: the 256-token vocabulary of their Markov corpus, batches
/// of 16 sequences of 64 tokens, 2 layers at d_model 64 (the base width too), (lr, wd) = (3e-3, 0.1) under the
/// paper rule with a constant schedule, seed 0, on the CPU, spectra every 10 steps.
impl Default for RunSpec {
    fn default() -> Self {
        RunSpec {
            name: "run".into(),
            d_model: 64,
            base_d_model: 64,
            layers: 2,
            vocab: 256,
            seq_len: 64,
            batch: 16,
            steps: 100,
            lr: 3e-3,
            wd: 0.1,
            rule: Rule::default(),
            schedule: Schedule::Constant,
            seed: 0,
            device: Device::Cpu,
            sample_every: 10,
            beta2: 0.999,
        }
    }
}

impl RunSpec {
    pub fn model_config(&self, d_model: i64) -> model::Config {
        model::Config::new(self.vocab, d_model, self.base_d_model, self.layers, self.seq_len)
    }

    /// The base (proxy) model's shapes, with delta shapes from the same model at twice the width, so
    /// the proxy run itself knows its width dimensions.
    pub fn base_shapes(&self) -> BaseShapes {
        let base = VarStore::new(Device::Cpu);
        let _ = model::llama(base.root(), &self.model_config(self.base_d_model));
        let delta = VarStore::new(Device::Cpu);
        let _ = model::llama(delta.root(), &self.model_config(2 * self.base_d_model));
        BaseShapes::from_var_stores(&base, &delta)
    }

    /// The optimizer every example run uses: the spec's rule and schedule, global-norm clipping at 1.
    pub fn optimizer_config(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            weight_decay: self.wd,
            rule: self.rule,
            schedule: self.schedule.clone(),
            max_grad_norm: Some(1.0),
            beta2: self.beta2,
            // Declared, since the shapes cannot tell a `[vocab, d]` embedding from a readout (the head is a MuReadout).
            overrides: vec![
                Override { role: Some(ParamRole::Embedding), ..Override::new("tok_emb.weight") },
                Override { role: Some(ParamRole::Readout), ..Override::new("lm_head.weight") },
            ],
            ..Default::default()
        }
    }
}

impl RunSpec {
    /// Each matrix-like parameter's decay-horizon rate under this spec's plan and optimizer settings
    /// (`gainguard::steady_state`). Vector-like parameters (no decay under the μP presets) are left out.
    pub fn matrix_horizon_rates(&self) -> anyhow::Result<Vec<(String, HorizonRate)>> {
        let vs = VarStore::new(Device::Cpu);
        let _ = model::llama(vs.root(), &self.model_config(self.d_model));
        let config = self.optimizer_config();
        let opt = WidthScaledAdamW::new(&vs, &self.base_shapes(), config.clone())?;
        Ok(opt
            .plan()
            .decisions
            .iter()
            .filter(|d| d.class == ParamClass::MatrixLike && d.tied_to.is_none())
            .map(|d| (d.name.clone(), HorizonRate::new(d.lr, d.weight_decay, config.decay, config.schedule_weight_decay)))
            .collect())
    }

    /// The steps that bring every matrix-like parameter to decay horizon `horizon` under this spec's rule and
    /// schedule: the slowest parameter's count.
    pub fn steps_to_horizon(&self, horizon: f64) -> anyhow::Result<u64> {
        let mut steps = 0;
        for (name, rate) in self.matrix_horizon_rates()? {
            let n = rate.steps_to_reach(&self.schedule, horizon, 100_000_000).ok_or_else(|| {
                anyhow::anyhow!("`{name}` never reaches decay horizon {horizon} (lr·wd = {:e} under schedule {:?})", rate.per_step, self.schedule)
            })?;
            steps = steps.max(n);
        }
        Ok(steps)
    }
}

/// How the run is monitored.
#[derive(Default)]
pub struct Monitoring {
    /// Where the run's events go (an embedded daemon's sink, say), as the run the spec names; None: nowhere.
    pub sink: Option<Sink>,
    pub reference: Option<Arc<dyn GainReference>>,
    /// Record this run's sigma_max profile (a proxy run).
    pub record_profile: bool,
    pub alpha: f64,
    /// Show a progress bar on stderr (hidden when stderr is not a terminal).
    pub progress: bool,
}

pub struct RunResult {
    pub table: String,
    pub losses: Vec<f64>,
    /// Mean loss over the last 10% of steps.
    pub final_loss: f64,
    /// Final sigma_max of every matrix-like parameter, from a float64 SVD.
    pub sigma_max: BTreeMap<String, f64>,
    pub profile: Option<ReferenceProfile>,
    pub seconds: f64,
}

pub fn tail_mean(losses: &[f64]) -> f64 {
    let n = (losses.len() / 10).max(1);
    let tail = &losses[losses.len() - n..];
    tail.iter().sum::<f64>() / tail.len() as f64
}

/// Trains one model on the synthetic corpus.
pub fn train(spec: &RunSpec, corpus: &MarkovCorpus, monitoring: Monitoring) -> anyhow::Result<RunResult> {
    train_on(spec, &|step| corpus.batch(step, spec.batch as usize, spec.seq_len as usize), monitoring)
}

/// Trains one model on any token source: `batch(step)` returns `spec.batch × spec.seq_len` ids,
/// row-major, each below `spec.vocab` (a [`gainguard::data::TokenFile`], say). The base shapes carry
/// delta shapes, so a run at the base width itself (m = 1) still classifies and decays its hidden matrices.
pub fn train_on(spec: &RunSpec, batch: &dyn Fn(u64) -> Vec<i64>, monitoring: Monitoring) -> anyhow::Result<RunResult> {
    let progress = monitoring.progress;
    tch::manual_seed(spec.seed as i64);
    let vs = VarStore::new(spec.device);
    let net = model::llama(vs.root(), &spec.model_config(spec.d_model));
    let mut opt = WidthScaledAdamW::new(&vs, &spec.base_shapes(), spec.optimizer_config())?;
    let table = opt.plan().to_table();
    let mut monitor = attach_monitor(spec, &mut opt, monitoring)?;

    let bar = progress_bar(spec, progress);
    let start = Instant::now();
    let losses = run_steps(spec, &net, &mut opt, batch, &bar, monitor.as_mut(), &mut |_, _| {});
    bar.finish_and_clear();
    let profile = finish_monitoring(monitor)?;

    let sigma_max = final_sigma_max(&vs, opt.plan());
    Ok(RunResult { table, final_loss: tail_mean(&losses), losses, sigma_max, profile, seconds: start.elapsed().as_secs_f64() })
}

/// Attaches a [`Monitor`] to the optimizer when someone listens: a sink (telemetry, and spectra when the spec
/// samples) or a profile recording (spectra into no sink but the recorder). None: nothing is monitored.
fn attach_monitor(spec: &RunSpec, opt: &mut WidthScaledAdamW, monitoring: Monitoring) -> anyhow::Result<Option<Monitor>> {
    let record = monitoring.record_profile && spec.sample_every > 0;
    if monitoring.sink.is_none() && !record {
        return Ok(None);
    }
    let sampler = SamplerConfig {
        interval: spec.sample_every.max(1),
        // A fixed interval: reference profiles need the same progress points at every width.
        budget_fraction: None,
        alpha: monitoring.alpha,
        ..Default::default()
    };
    let mut builder = Monitor::builder(&spec.name)
        .planned_steps(spec.steps)
        .sampler(sampler)
        .spectra(spec.sample_every > 0)
        // The sampler drains its queue (at most its shutdown timeout), then the Goodbye is flushed.
        .finish_timeout(std::time::Duration::from_secs(65));
    if let Some(r) = monitoring.reference {
        builder = builder.reference_from(r);
    }
    if record {
        builder = builder.record_profile_in_memory();
    }
    let monitor = builder.to_sink(monitoring.sink.unwrap_or_else(Sink::disabled));
    Ok(Some(monitor.attach(opt)?))
}

/// A progress bar on stderr, or a hidden one.
fn progress_bar(spec: &RunSpec, visible: bool) -> ProgressBar {
    let bar = if visible { ProgressBar::new(spec.steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} steps  {msg}  eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(spec.name.clone());
    bar
}

/// The training loop itself; returns the loss of every step. `after_step(step, opt)` runs after each
/// optimizer step (zero-based index).
fn run_steps(
    spec: &RunSpec,
    net: &model::Llama,
    opt: &mut WidthScaledAdamW,
    batch: &dyn Fn(u64) -> Vec<i64>,
    bar: &ProgressBar,
    mut monitor: Option<&mut Monitor>,
    after_step: &mut dyn FnMut(u64, &WidthScaledAdamW),
) -> Vec<f64> {
    let mut losses = Vec::with_capacity(spec.steps as usize);
    let tokens = (spec.batch * spec.seq_len) as u64;
    for step in 0..spec.steps {
        let ids = Tensor::from_slice(&batch(step))
            .view([spec.batch, spec.seq_len])
            .to_device(spec.device);
        opt.zero_grad();
        let loss = net.loss(&ids);
        loss.backward();
        let report = opt.step();
        let loss = loss.double_value(&[]);
        losses.push(loss);
        bar.set_message(format!("loss {loss:.3}"));
        bar.inc(1);
        if let Some(m) = monitor.as_deref_mut() {
            m.step(&report, loss, tokens);
        }
        after_step(step, opt);
    }
    losses
}

/// The steady-state protocol's settings for one run (`gainguard::steady_state`). The run's length is the
/// spec's `steps`: take [`RunSpec::steps_to_horizon`] (or more, for equal tokens across runs) with a schedule
/// that is constant after its warmup.
#[derive(Clone, Debug)]
pub struct SteadyState {
    /// Multiplies every matrix-like parameter's initial weights: 0.1 is the "10× smaller init" check, whose
    /// steady state must be the same.
    pub init_scale: f64,
    /// Multiplies every matrix-like parameter's width-scaled lr *and* wd: 2 is the "(2·lr, 2·wd)" check,
    /// whose steady state the `sqrt(lr/wd)` law says is the same.
    pub matrix_scale: f64,
    /// sigma_max samples (float64 SVD) per timescale `1/(lr·wd)` over each parameter's last two timescales.
    pub samples_per_timescale: f64,
}

impl Default for SteadyState {
    fn default() -> Self {
        SteadyState { init_scale: 1.0, matrix_scale: 1.0, samples_per_timescale: 8.0 }
    }
}

/// One matrix-like parameter at the end of a steady-state run.
#[derive(Clone, Debug)]
pub struct SteadyParam {
    /// `H = Σ lr_t·wd_t` over the run (width-scaled, schedule included).
    pub decay_horizon: f64,
    /// Mean over the last timescale, `H − 1 < h ≤ H`.
    pub sigma_max: f64,
    /// The last timescale's mean over the one before, minus 1 (None when the run has fewer than two).
    pub drift: Option<f64>,
}

pub struct SteadyRun {
    pub steps: u64,
    /// Mean training loss over the slowest matrix's last timescale.
    pub final_loss: f64,
    pub params: BTreeMap<String, SteadyParam>,
    pub seconds: f64,
}

/// `config` with every matrix-like parameter's lr and wd multiplied by `scale` (the protocol's (2·lr, 2·wd)
/// check at `scale` 2); `config` itself at 1.
fn with_matrix_scale(mut config: AdamWConfig, vs: &VarStore, base_shapes: &BaseShapes, scale: f64) -> anyhow::Result<AdamWConfig> {
    if scale != 1.0 {
        let plan = WidthScaledAdamW::new(vs, base_shapes, config.clone())?.plan().clone();
        config.overrides.extend(
            plan.decisions
                .iter()
                .filter(|d| d.class == ParamClass::MatrixLike)
                .map(|d| Override { lr_multiplier: Some(scale), wd_multiplier: Some(scale), ..Override::new(&d.name) }),
        );
    }
    Ok(config)
}

/// Trains `spec` as [`train_on`] does, without monitoring, and reads every matrix-like parameter's sigma_max
/// at its steady state: the mean over its last timescale, with the drift from the timescale before. The
/// decay horizon is the optimizer's own count, checked at the end against the plan's prediction.
pub fn train_steady(spec: &RunSpec, batch: &dyn Fn(u64) -> Vec<i64>, steady: &SteadyState) -> anyhow::Result<SteadyRun> {
    tch::manual_seed(spec.seed as i64);
    let vs = VarStore::new(spec.device);
    let net = model::llama(vs.root(), &spec.model_config(spec.d_model));
    let base_shapes = spec.base_shapes();
    let config = with_matrix_scale(spec.optimizer_config(), &vs, &base_shapes, steady.matrix_scale)?;
    let mut opt = WidthScaledAdamW::new(&vs, &base_shapes, config.clone())?;
    let vars = vs.variables();
    struct Watched {
        name: String,
        weights: Tensor,
        rate: HorizonRate,
        horizon: f64,
        final_horizon: f64,
        every: u64,
        trace: SteadyStateTrace,
    }
    let mut watched: Vec<Watched> = opt
        .plan()
        .decisions
        .iter()
        .filter(|d| d.class == ParamClass::MatrixLike && d.tied_to.is_none())
        .map(|d| {
            let rate = HorizonRate::new(d.lr, d.weight_decay, config.decay, config.schedule_weight_decay);
            Watched {
                name: d.name.clone(),
                weights: vars[&d.name].shallow_clone(),
                rate,
                horizon: 0.0,
                final_horizon: rate.after(&config.schedule, spec.steps),
                every: ((rate.timescale_steps() / steady.samples_per_timescale).floor() as u64).max(1),
                trace: SteadyStateTrace::default(),
            }
        })
        .collect();
    if steady.init_scale != 1.0 {
        tch::no_grad(|| {
            for w in &watched {
                let _ = w.weights.shallow_clone().g_mul_scalar_(steady.init_scale);
            }
        });
    }
    let start = Instant::now();
    let steps = spec.steps;
    let mut sample = |step: u64, opt: &WidthScaledAdamW| {
        for w in &mut watched {
            w.horizon = opt.decay_horizon(&w.name).unwrap_or(f64::NAN);
            if w.horizon > w.final_horizon - 2.0 && (steps - 1 - step) % w.every == 0 {
                let m = w.weights.to_device(Device::Cpu).to_kind(Kind::Double);
                let (_, s, _) = m.reshape([m.size()[0], -1]).svd(true, false);
                w.trace.push(w.horizon, s.max().double_value(&[]));
            }
        }
    };
    let losses = run_steps(spec, &net, &mut opt, batch, &ProgressBar::hidden(), None, &mut sample);
    // The optimizer's own count and the plan's must agree: they are two computations of one sum.
    for w in &watched {
        if (w.horizon - w.final_horizon).abs() > 1e-9 * w.final_horizon {
            anyhow::bail!("`{}`: the optimizer counted decay horizon {}, the plan predicts {}", w.name, w.horizon, w.final_horizon);
        }
    }
    let slowest = watched.iter().map(|w| w.rate.timescale_steps()).fold(1.0, f64::max);
    let tail = &losses[losses.len().saturating_sub(slowest.ceil() as usize)..];
    let params = watched
        .into_iter()
        .map(|w| {
            let sigma_max = w.trace.last_timescale_mean(w.horizon).unwrap_or(f64::NAN);
            (w.name, SteadyParam { decay_horizon: w.horizon, sigma_max, drift: w.trace.drift(w.horizon) })
        })
        .collect();
    Ok(SteadyRun { steps, final_loss: mean(tail), params, seconds: start.elapsed().as_secs_f64() })
}

/// Lets the sampler drain its queue, then says goodbye and flushes the sink, so that every sample and the
/// final step reach the daemon; returns the recorded profile when the run recorded one.
fn finish_monitoring(monitor: Option<Monitor>) -> anyhow::Result<Option<ReferenceProfile>> {
    let Some(mut monitor) = monitor else { return Ok(None) };
    monitor.finish()?;
    Ok(monitor.recorded_profile())
}

/// The final sigma_max of every matrix-like parameter, from a float64 SVD on the CPU (independent of
/// the sampler's estimates).
fn final_sigma_max(vs: &VarStore, plan: &ScalingPlan) -> BTreeMap<String, f64> {
    let vars = vs.variables();
    plan.decisions
        .iter()
        .filter(|d| d.class == ParamClass::MatrixLike)
        .map(|d| {
            let w = vars[&d.name].to_device(Device::Cpu).to_kind(Kind::Double);
            let (_, s, _) = w.reshape([w.size()[0], -1]).svd(true, false);
            (d.name.clone(), s.max().double_value(&[]))
        })
        .collect()
}

//! The training loop shared by the example trainer, the demo and the width-transfer experiment.
//! Where gainguard enters: build the optimizer from the base shapes, call `step`, nothing else.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use gainguard::data::MarkovCorpus;
use gainguard::reference::{GainReference, ProfileRecorder, ReferenceProfile};
use gainguard::telemetry::Telemetry;
use gainguard::{AdamWConfig, BaseShapes, ParamClass, Rule, Schedule, WidthScaledAdamW};
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
}

impl RunSpec {
    pub fn model_config(&self, d_model: i64) -> model::Config {
        model::Config::new(self.vocab, d_model, self.base_d_model, self.layers, self.seq_len)
    }

    /// The base (proxy) model's shapes, from a model built at the base width.
    pub fn base_shapes(&self) -> BaseShapes {
        let vs = VarStore::new(Device::Cpu);
        let _ = model::llama(vs.root(), &self.model_config(self.base_d_model));
        BaseShapes::from_var_store(&vs)
    }
}

/// How the run is monitored.
#[derive(Default)]
pub struct Monitoring {
    pub telemetry: Option<Telemetry>,
    pub reference: Option<Arc<dyn GainReference>>,
    /// Record this run's sigma_max profile (a proxy run).
    pub record_profile: bool,
    pub alpha: f64,
}

pub struct RunResult {
    pub table: String,
    pub losses: Vec<f64>,
    /// Mean loss over the last 10% of steps.
    pub final_loss: f64,
    /// Final sigma_max of every matrix-like parameter (and every hidden matrix of a base-width run), from a float64 SVD.
    pub sigma_max: BTreeMap<String, f64>,
    pub profile: Option<ReferenceProfile>,
    pub seconds: f64,
}

pub fn tail_mean(losses: &[f64]) -> f64 {
    let n = (losses.len() / 10).max(1);
    let tail = &losses[losses.len() - n..];
    tail.iter().sum::<f64>() / tail.len() as f64
}

/// The hidden matrices of the architecture: parameters with two width dimensions. Found by comparing
/// two small widths, because at the base width itself (m = 1) no dimension differs and the plan calls
/// every parameter vector-like; the proxy's sigma_max must still be reported.
pub fn hidden_matrices(spec: &RunSpec) -> std::collections::BTreeSet<String> {
    let shapes = |d: i64| {
        let vs = VarStore::new(Device::Cpu);
        let _ = model::llama(vs.root(), &model::Config::new(spec.vocab.min(64), d, 16, spec.layers, spec.seq_len));
        BaseShapes::from_var_store(&vs).0
    };
    let (a, b) = (shapes(16), shapes(32));
    a.iter().filter(|(n, s)| s.len() == 2 && b.get(*n).is_some_and(|t| t[0] != s[0] && t[1] != s[1])).map(|(n, _)| n.clone()).collect()
}

/// Trains one model on the synthetic corpus.
pub fn train(spec: &RunSpec, corpus: &MarkovCorpus, monitoring: Monitoring) -> anyhow::Result<RunResult> {
    train_with(spec, &|step| corpus.batch(step, spec.batch as usize, spec.seq_len as usize), monitoring, Vec::new())
}

/// Trains one model on any token source: `batch(step)` returns `spec.batch × spec.seq_len` ids,
/// row-major, each below `spec.vocab` (a [`gainguard::data::TokenFile`], say).
///
/// Unlike [`train`], a run at the base width itself (m = 1) gets its hidden matrices classified
/// matrix-like by override: the shape test alone finds no width dimension there, calls every parameter
/// vector-like and gives it no weight decay, so a proxy would never see the `wd` it is tuned for.
pub fn train_on(spec: &RunSpec, batch: &dyn Fn(u64) -> Vec<i64>, monitoring: Monitoring) -> anyhow::Result<RunResult> {
    let overrides = if spec.d_model == spec.base_d_model {
        hidden_matrices(spec)
            .into_iter()
            .map(|n| gainguard::Override { class: Some(ParamClass::MatrixLike), width_multiplier: Some(1.0), ..gainguard::Override::new(&n) })
            .collect()
    } else {
        Vec::new()
    };
    train_with(spec, batch, monitoring, overrides)
}

fn train_with(
    spec: &RunSpec,
    batch: &dyn Fn(u64) -> Vec<i64>,
    mut monitoring: Monitoring,
    overrides: Vec<gainguard::Override>,
) -> anyhow::Result<RunResult> {
    tch::manual_seed(spec.seed as i64);
    let vs = VarStore::new(spec.device);
    let net = model::llama(vs.root(), &spec.model_config(spec.d_model));
    let config = AdamWConfig {
        lr: spec.lr,
        weight_decay: spec.wd,
        rule: spec.rule,
        schedule: spec.schedule.clone(),
        max_grad_norm: Some(1.0),
        overrides,
        ..Default::default()
    };
    let mut opt = WidthScaledAdamW::new(&vs, &spec.base_shapes(), config)?;
    let table = opt.plan().to_table();
    let recorder = monitoring.record_profile.then(ProfileRecorder::new);
    if let Some(t) = &monitoring.telemetry {
        t.start(opt.plan(), Some(spec.steps), monitoring.alpha, None);
    }

    let start = Instant::now();
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
        if let Some(t) = monitoring.telemetry.as_mut() {
            t.step(&report, loss, tokens);
        }
    }
    if let Some(t) = &monitoring.telemetry {
        t.finish(spec.steps, "finished");
    }

    let vars = vs.variables();
    let hidden = hidden_matrices(spec);
    let sigma_max = opt
        .plan()
        .decisions
        .iter()
        .filter(|d| d.class == ParamClass::MatrixLike || hidden.contains(&d.name))
        .map(|d| {
            let w = vars[&d.name].to_device(Device::Cpu).to_kind(Kind::Double);
            let (_, s, _) = w.reshape([w.size()[0], -1]).svd(true, false);
            (d.name.clone(), s.max().double_value(&[]))
        })
        .collect();
    let profile = recorder.map(|r| r.finish(&spec.name, opt.plan(), monitoring.alpha, Some(spec.steps)));
    Ok(RunResult { table, final_loss: tail_mean(&losses), losses, sigma_max, profile, seconds: start.elapsed().as_secs_f64() })
}

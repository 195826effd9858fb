//! The width-transfer experiments on the LLaMA-style example model, at AdamW's steady state.
//!
//! ```text
//! cargo run --release --example width_transfer -- --gamma-sweep --preset cpu --out docs/experiments/llama-gamma-cpu
//! cargo run --release --example width_transfer -- --preset cpu --out docs/experiments/llama-transfer-cpu
//! cargo run --release --example width_transfer -- --preset smoke --out out/smoke        # seconds; the tests run it
//! cargo run --release --example width_transfer -- --gamma-sweep --preset gpu --device cuda --out out/gpu-gamma
//! ```
//!
//! **Steady-state protocol** (`gainguard::steady_state`, the same as `teacher_student`'s). The law
//! `sigma_max ≈ c·sqrt(lr/wd)·d^alpha` is about the state weight decay reaches after several of its
//! timescales, `1/(lr·wd)` steps each, so every run has a constant lr after a short warmup and runs until
//! every hidden matrix's decay horizon `H = Σ_t lr_t·wd_t` (width-scaled, schedule included) reaches the
//! preset's `horizon`; sigma_max is the mean over each matrix's last timescale (float64 SVD). Every figure
//! comes with the H it was measured at.
//!
//! - `--gamma-sweep`: the μP path (`lr ∝ 1/m`, `wd ∝ m^gamma`) at gamma ∈ {0, 0.25, 0.5, 0.75, 1}, at every
//!   width, for `seeds` seeds, each run as long as its own H needs; with the checks of the protocol on seed
//!   0 (a 10× smaller init of the hidden matrices, and their `(2·lr, 2·wd)`, land within 5%; drift over the
//!   last two timescales under 3%). gamma*, where the slope of `ln sigma_max` on `ln m` crosses zero, for
//!   the attention and the MLP matrices separately, with 95% bootstrap intervals over the seeds.
//! - default: loss transfer. A 2-D `(lr, wd)` grid at the base width (not a cross: under coupled decay an lr
//!   step also moves `lr·wd`), widened one ring at a time until its optimum is inside (up to the preset's
//!   `max_reach`; the report marks an optimum still on the edge); then at each target width under each rule
//!   a 2-D grid around the transferred point, widened the same way; per rule, the optimum's offset in grid
//!   steps. Every run has the same number of steps (equal tokens at every width): enough for the slowest
//!   rule's hidden matrices at the widest target to reach `horizon` at the centre of the grid, so points of
//!   smaller `lr·wd` are transients; each run's H is reported beside its loss.
//!
//! Identical runs (same width, seed and effective per-class lr and wd) are trained once; `--shared-runs`
//! splits one experiment's runs between processes.

mod report;
mod sweep;
mod transfer;

use anyhow::{bail, Context, Result};
use clap::Parser;
use gainguard::data::{MarkovCorpus, TokenFile};
use gainguard::steady_state::warmup_then_constant;
use gainguard::{ParamClass, Preset, Rule};
use gainguard_examples::plot;
use gainguard_examples::train::{self, RunSpec, SteadyRun, SteadyState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Width-transfer experiments at AdamW's steady state: the gamma sweep (--gamma-sweep) and the 2-D (lr, wd) loss transfer")]
pub struct Args {
    /// smoke (seconds), cpu (≤ 30 min of CPU time on one core), gpu (use with --device cuda).
    #[arg(long, default_value = "cpu")]
    preset: String,
    /// Run the gamma sweep along the μP path instead of the loss-transfer experiment.
    #[arg(long)]
    gamma_sweep: bool,
    #[arg(long, default_value = "out/width-transfer")]
    out: PathBuf,
    /// markov (synthetic second-order Markov source, entropy floor known), text:PATH (bytes) or
    /// bin:PATH[:VOCAB] (nanoGPT uint16).
    #[arg(long, default_value = "markov")]
    data: String,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seeds per cell of the gamma sweep (the preset's by default).
    #[arg(long)]
    seeds: Option<u64>,
    /// libtorch intra-op threads (0: libtorch's default). One thread by default: on a shared 2-core
    /// machine, two threads stalled 10× whenever another process ran (measured: 1 s runs took 18 s).
    #[arg(long, default_value_t = 1)]
    threads: i32,
    /// A folder shared by several processes running the same experiment on one machine: each run is claimed
    /// there before it is trained and its outcome written there, so the processes split the runs between
    /// them and each reads the others'. Every process makes the same decisions (the grids widen on the
    /// same losses) and writes the same report.
    #[arg(long)]
    shared_runs: Option<PathBuf>,
    /// With --shared-runs: start with the rule at this index (of the preset's rules), so that processes
    /// begin on different rules instead of queueing behind one.
    #[arg(long, default_value_t = 0)]
    first_rule: usize,
    /// Experiment overrides of the preset (recorded in the report's command line): a search for a
    /// configuration the protocol's checks accept.
    #[command(flatten)]
    overrides: PlanOverrides,
}

/// Overrides of a preset's sizes, for a search over configurations without a preset per try.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PlanOverrides {
    /// Widths of the gamma sweep, the first the base: e.g. 16,32,64 (each a multiple of the first).
    #[arg(long, value_delimiter = ',')]
    widths: Option<Vec<i64>>,
    /// Decay horizon every hidden matrix runs to.
    #[arg(long)]
    horizon: Option<f64>,
    #[arg(long, value_delimiter = ',')]
    gammas: Option<Vec<f64>>,
    /// Base (proxy) lr and wd.
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    wd: Option<f64>,
    #[arg(long)]
    batch: Option<i64>,
    #[arg(long)]
    seq_len: Option<i64>,
    #[arg(long)]
    layers: Option<i64>,
    #[arg(long)]
    beta2: Option<f64>,
    /// The Markov corpus of `--data markov`: VOCAB,ORDER,BRANCHING (default 64,2,4).
    #[arg(long, value_delimiter = ',')]
    markov: Option<Vec<usize>>,
    /// Skip the (2·lr, 2·wd) check runs (not a reliability criterion; the init and drift checks stay).
    #[arg(long)]
    no_doubled_check: bool,
}

impl PlanOverrides {
    fn apply(&self, plan: &mut Plan) -> Result<()> {
        if let Some(w) = &self.widths {
            let base = *w.first().context("--widths is empty")?;
            if w.len() < 3 || base <= 0 || w.iter().any(|x| x % base != 0 || *x <= base && x != &base) {
                bail!("--widths {w:?}: need 3 or more ascending multiples of the first");
            }
            plan.base_width = base;
            plan.multipliers = w[1..].iter().map(|x| x / base).collect();
        }
        if let Some(g) = &self.gammas {
            // One gamma runs the checks alone (a search for a steady state); gamma* needs two or more.
            if g.is_empty() {
                bail!("--gammas is empty");
            }
            plan.gammas = g.clone();
        }
        plan.horizon = self.horizon.unwrap_or(plan.horizon);
        plan.lr = self.lr.unwrap_or(plan.lr);
        plan.wd = self.wd.unwrap_or(plan.wd);
        plan.batch = self.batch.unwrap_or(plan.batch);
        plan.seq_len = self.seq_len.unwrap_or(plan.seq_len);
        plan.layers = self.layers.unwrap_or(plan.layers);
        plan.beta2 = self.beta2.unwrap_or(plan.beta2);
        Ok(())
    }
}

/// Sizes of one experiment.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    name: &'static str,
    base_width: i64,
    /// Target widths as multiples of the base width (the gamma sweep's).
    multipliers: Vec<i64>,
    layers: i64,
    seq_len: i64,
    batch: i64,
    /// Every hidden matrix runs to this decay horizon.
    horizon: f64,
    warmup: u64,
    beta2: f64,
    /// Base (proxy) lr and wd of the gamma sweep, and the centre of the transfer experiment's proxy grid.
    lr: f64,
    wd: f64,
    gammas: Vec<f64>,
    seeds: u64,
    /// The transfer experiment's proxy width (the base width of its multipliers, lr and wd).
    transfer_base_width: i64,
    /// The transfer experiment's target widths, as multiples of its proxy width.
    transfer_multipliers: Vec<i64>,
    /// The factor between neighbouring grid points, on both axes.
    grid_factor: f64,
    /// A grid starts at ±reach steps on both axes and grows by one ring until its optimum is inside.
    initial_reach: i32,
    max_reach: i32,
    /// The transfer experiment's rules.
    rules: Vec<Preset>,
}

impl Plan {
    fn preset(name: &str) -> Result<Plan> {
        Ok(match name {
            "smoke" => Plan::smoke(),
            "cpu" => Plan::cpu(),
            "gpu" => Plan::gpu(),
            other => bail!("unknown preset `{other}`: expected smoke, cpu or gpu"),
        })
    }

    /// Seconds of CPU: what the tests run.
    fn smoke() -> Plan {
        Plan {
            name: "smoke",
            base_width: 16,
            multipliers: vec![2, 4],
            layers: 1,
            seq_len: 16,
            batch: 4,
            horizon: 2.0,
            warmup: 2,
            beta2: 0.95,
            lr: 0.02,
            wd: 1.0,
            gammas: vec![0.0, 1.0],
            seeds: 2,
            transfer_base_width: 16,
            transfer_multipliers: vec![2],
            grid_factor: 2.0,
            initial_reach: 1,
            max_reach: 1,
            rules: vec![Preset::Paper, Preset::Standard],
        }
    }

    /// Within 30 minutes on 2 cores.
    fn cpu() -> Plan {
        Plan {
            // Sized from CPU time (user + sys, one libtorch thread; docs/EXPERIMENTS.md): a step of the
            // 64-wide model on 16 × 32 tokens costs about 8 ms, 128-wide about 23 ms. A first sweep at
            // (lr, wd) = (0.02, 1) over widths 16–128 (12 min) failed every check of the protocol: at
            // lr·wd = 0.02 a run reaches H = 6 in 300 steps, before the model has learnt much, and some
            // attention matrices had no steady state. (0.01, 0.5) keeps lr/wd and quarters lr·wd, so
            // every run is 4× longer; the widths stop at 64 (m = 4) to stay within 30 minutes.
            name: "cpu",
            base_width: 16,
            multipliers: vec![2, 4],
            layers: 2,
            seq_len: 32,
            batch: 16,
            horizon: 6.0,
            warmup: 20,
            beta2: 0.95,
            lr: 0.01,
            wd: 0.5,
            gammas: vec![0.0, 0.25, 0.5, 0.75, 1.0],
            seeds: 3,
            // The transfer's proxy is 32 wide: a 16-wide model cannot learn this corpus (loss 2.7 at every
            // grid point against 1.8 at d = 64), so its optimum says little about a wider model's. A grid
            // point costs about 8 s of CPU at d = 32 and 15 s at d = 64 (1700 steps, paper's at d = 64 reach
            // H = 6), so two rules on grids of up to 5 × 5 fit in 20 minutes of CPU: paper, and standard,
            // which a 2× target sets a whole lr step away (mup-coupled's and mup-fixed-wd's wd differ from
            // paper's by half a grid step there). --shared-runs splits the runs between processes; the gpu
            // preset runs every rule at 2-8×.
            transfer_base_width: 32,
            transfer_multipliers: vec![2],
            grid_factor: 2.0,
            initial_reach: 1,
            max_reach: 2,
            rules: vec![Preset::Paper, Preset::Standard],
        }
    }

    /// For a GPU session: widths 128–1024, every rule.
    fn gpu() -> Plan {
        Plan {
            name: "gpu",
            base_width: 128,
            multipliers: vec![2, 4, 8],
            layers: 4,
            seq_len: 128,
            batch: 32,
            horizon: 6.0,
            warmup: 100,
            beta2: 0.95,
            lr: 4e-3,
            wd: 0.5,
            gammas: vec![0.0, 0.25, 0.5, 0.75, 1.0],
            seeds: 3,
            transfer_base_width: 128,
            transfer_multipliers: vec![2, 4, 8],
            grid_factor: 2.0,
            initial_reach: 1,
            max_reach: 3,
            rules: Preset::ALL.to_vec(),
        }
    }

    fn widths(&self, multipliers: &[i64]) -> Vec<i64> {
        std::iter::once(self.base_width).chain(multipliers.iter().map(|m| m * self.base_width)).collect()
    }
}

/// The token source.
pub enum Data {
    Markov(MarkovCorpus),
    File(TokenFile, String),
}

/// The default corpus: a second-order source, so the next token depends on the one before the current one
/// and the model must attend to it (a first-order source is predictable from the current token alone).
const MARKOV: (usize, usize, usize, u64) = (64, 2, 4, 0);

impl Data {
    fn parse(s: &str, min_tokens: usize, markov: Option<&[usize]>) -> Result<Data> {
        if s == "markov" {
            let (mut vocab, mut order, mut branching, seed) = MARKOV;
            if let Some(m) = markov {
                let [v, o, b] = m else { bail!("--markov {m:?}: expected VOCAB,ORDER,BRANCHING") };
                (vocab, order, branching) = (*v, *o, *b);
            }
            return Ok(Data::Markov(MarkovCorpus::with_order(vocab, order, branching, seed)));
        }
        if let Some(path) = s.strip_prefix("text:") {
            return Ok(Data::File(TokenFile::text_bytes(Path::new(path), min_tokens)?, s.to_string()));
        }
        if let Some(rest) = s.strip_prefix("bin:") {
            let (path, vocab) = match rest.rsplit_once(':') {
                Some((p, v)) if v.chars().all(|c| c.is_ascii_digit()) && !v.is_empty() => {
                    (p, v.parse::<usize>().with_context(|| format!("--data `{s}`: vocabulary `{v}`"))?)
                }
                _ => (rest, 50304),
            };
            if vocab == 0 || vocab > 65536 {
                bail!("--data `{s}`: vocabulary {vocab} must be in 1..=65536 (uint16 ids)");
            }
            return Ok(Data::File(TokenFile::nanogpt_bin(Path::new(path), vocab, min_tokens)?, s.to_string()));
        }
        bail!("--data `{s}`: expected markov, text:PATH or bin:PATH[:VOCAB]")
    }

    fn vocab(&self) -> i64 {
        match self {
            Data::Markov(c) => c.vocab as i64,
            Data::File(f, _) => f.vocab as i64,
        }
    }

    /// The lowest loss any model can reach, where known (the Markov source's entropy rate).
    fn floor(&self) -> Option<f64> {
        match self {
            Data::Markov(c) => Some(c.entropy_rate()),
            Data::File(..) => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Data::Markov(c) => format!(
                "synthetic Markov source of order {} (vocab {}, {} successors per context, seed {}), entropy floor {:.4} nats/token",
                c.order, c.vocab, c.transitions.first().map_or(0, |t| t.len()), c.seed, c.entropy_rate()
            ),
            Data::File(f, s) => format!("`{s}`: {} tokens, vocab {}", f.tokens.len(), f.vocab),
        }
    }

    fn batch(&self, step: u64, batch: i64, seq_len: i64) -> Vec<i64> {
        match self {
            Data::Markov(c) => c.batch(step, batch as usize, seq_len as usize),
            Data::File(f, _) => f.batch(step, batch as usize, seq_len as usize, 0),
        }
    }
}

/// What one run is: width, rule, base `(lr, wd)`, seed, its steps (None: until every hidden matrix reaches the
/// plan's horizon) and the protocol's check it belongs to.
#[derive(Clone, Debug, Serialize)]
pub struct RunRequest {
    pub width: i64,
    pub rule: Rule,
    pub lr: f64,
    pub wd: f64,
    pub seed: u64,
    pub steps: Option<u64>,
    pub init_scale: f64,
    pub matrix_scale: f64,
}

impl RunRequest {
    fn new(width: i64, rule: Rule, lr: f64, wd: f64, seed: u64) -> RunRequest {
        RunRequest { width, rule, lr, wd, seed, steps: None, init_scale: 1.0, matrix_scale: 1.0 }
    }

    /// Two requests with the same key train the same model on the same data: one run serves both. The preset
    /// is part of the key, since presets differ in what the effective lr and wd below do not show (vector-like
    /// decay by rank, Adam's eps); runs of one preset at equal effective values are shared (a gamma sweep's m = 1).
    fn key(&self, base: i64) -> String {
        let m = self.width as f64 / base as f64;
        let r = &self.rule;
        format!(
            "{}-d{}-s{}-n{:?}-i{}-x{}-{:.10e}-{:.10e}-{:.10e}-{:.10e}",
            r.preset.name(),
            self.width,
            self.seed,
            self.steps,
            self.init_scale,
            self.matrix_scale,
            r.learning_rate(ParamClass::MatrixLike, self.lr, m),
            r.weight_decay(ParamClass::MatrixLike, self.wd, m),
            r.learning_rate(ParamClass::VectorLike, self.lr, m),
            r.weight_decay(ParamClass::VectorLike, self.wd, m),
        )
    }
}

/// One finished run, as the reports need it. NaN (a diverged run) is written as null.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunOutcome {
    pub steps: u64,
    #[serde(deserialize_with = "nan_if_null")]
    pub final_loss: f64,
    /// Per hidden matrix: (decay horizon, steady-state sigma_max, drift over the last two timescales).
    #[serde(deserialize_with = "params_nan_if_null")]
    pub params: BTreeMap<String, (f64, f64, Option<f64>)>,
    pub seconds: f64,
    pub trained_as: String,
}

fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

#[allow(clippy::type_complexity)]
fn params_nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, (f64, f64, Option<f64>)>, D::Error> {
    let raw = BTreeMap::<String, (Option<f64>, Option<f64>, Option<f64>)>::deserialize(d)?;
    Ok(raw.into_iter().map(|(n, (h, s, drift))| (n, (h.unwrap_or(f64::NAN), s.unwrap_or(f64::NAN), drift))).collect())
}

impl RunOutcome {
    fn min_horizon(&self) -> f64 {
        self.params.values().map(|p| p.0).fold(f64::INFINITY, f64::min)
    }
}

pub struct Runner<'a> {
    plan: &'a Plan,
    data: &'a Data,
    device: tch::Device,
    cache: BTreeMap<String, RunOutcome>,
    /// See `Args::shared_runs`.
    shared: Option<PathBuf>,
    trained: usize,
    reused: usize,
    start: Instant,
}

impl Runner<'_> {
    fn spec(&self, r: &RunRequest) -> RunSpec {
        RunSpec {
            name: format!("d={} {} lr={:.2e} wd={:.3} seed={}", r.width, r.rule, r.lr, r.wd, r.seed),
            d_model: r.width,
            base_d_model: self.plan.base_width,
            layers: self.plan.layers,
            vocab: self.data.vocab(),
            seq_len: self.plan.seq_len,
            batch: self.plan.batch,
            lr: r.lr,
            wd: r.wd,
            rule: r.rule,
            schedule: warmup_then_constant(self.plan.warmup),
            seed: r.seed,
            device: self.device,
            sample_every: 0,
            beta2: self.plan.beta2,
            ..Default::default()
        }
    }

    /// The steps a request needs: its own, or those that bring every hidden matrix (its lr and wd scaled by
    /// the check's `matrix_scale`) to the plan's horizon.
    fn steps_for(&self, r: &RunRequest) -> Result<u64> {
        if let Some(s) = r.steps {
            return Ok(s);
        }
        let spec = RunSpec { lr: r.lr * r.matrix_scale, wd: r.wd * r.matrix_scale, ..self.spec(r) };
        spec.steps_to_horizon(self.plan.horizon)
    }

    /// The outcome of `r`, waiting for another process that claimed it in the shared folder.
    fn run(&mut self, r: &RunRequest) -> Result<RunOutcome> {
        loop {
            if let Some(o) = self.try_run(r)? {
                return Ok(o);
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }

    /// The outcome of `r`, from the cache, the shared folder or a training run; None when another process
    /// has claimed it and not finished.
    fn try_run(&mut self, r: &RunRequest) -> Result<Option<RunOutcome>> {
        let key = r.key(self.plan.base_width);
        if let Some(o) = self.cache.get(&key) {
            self.reused += 1;
            return Ok(Some(o.clone()));
        }
        if let Some(dir) = self.shared.clone() {
            let done = dir.join(format!("{key}.json"));
            if let Ok(text) = std::fs::read_to_string(&done) {
                let o: RunOutcome = serde_json::from_str(&text).with_context(|| format!("reading {}", done.display()))?;
                self.reused += 1;
                self.cache.insert(key, o.clone());
                return Ok(Some(o));
            }
            match std::fs::OpenOptions::new().write(true).create_new(true).open(dir.join(format!("{key}.claim"))) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(None),
                Err(e) => return Err(e).with_context(|| format!("claiming {key} in {}", dir.display())),
            }
            let o = self.train(r, &key)?;
            // Written whole, then renamed: a reader never sees half a file.
            let partial = dir.join(format!("{key}.partial"));
            std::fs::write(&partial, serde_json::to_string(&o)?)?;
            std::fs::rename(&partial, &done)?;
            return Ok(Some(o));
        }
        self.train(r, &key).map(Some)
    }

    fn train(&mut self, r: &RunRequest, key: &str) -> Result<RunOutcome> {
        let steps = self.steps_for(r)?;
        let spec = RunSpec { steps, ..self.spec(r) };
        let steady = SteadyState { init_scale: r.init_scale, matrix_scale: r.matrix_scale, ..Default::default() };
        let (b, t, data) = (self.plan.batch, self.plan.seq_len, self.data);
        let res: SteadyRun = train::train_steady(&spec, &|step| data.batch(step, b, t), &steady).with_context(|| format!("run {}", spec.name))?;
        let check = match (r.init_scale != 1.0, r.matrix_scale != 1.0) {
            (true, _) => format!(" init×{}", r.init_scale),
            (_, true) => format!(" lr,wd×{} on hidden matrices", r.matrix_scale),
            _ => String::new(),
        };
        let o = RunOutcome {
            steps,
            final_loss: res.final_loss,
            params: res.params.into_iter().map(|(n, p)| (n, (p.decay_horizon, p.sigma_max, p.drift))).collect(),
            seconds: res.seconds,
            trained_as: format!("{}{check}", spec.name),
        };
        self.trained += 1;
        eprintln!(
            "[{:>6.0} s, cpu {:>6.0} s] {} -> {} steps, H ≥ {:.2}, loss {:.4} ({:.1} s)",
            self.start.elapsed().as_secs_f64(),
            report::cpu_seconds(),
            o.trained_as,
            steps,
            o.min_horizon(),
            o.final_loss,
            o.seconds
        );
        self.cache.insert(key.to_string(), o.clone());
        Ok(o)
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut plan = Plan::preset(&a.preset)?;
    if let Some(s) = a.seeds {
        plan.seeds = s.max(1);
    }
    a.overrides.apply(&mut plan)?;
    if a.threads > 0 {
        tch::set_num_threads(a.threads);
    }
    if !a.gamma_sweep {
        plan.base_width = plan.transfer_base_width;
    }
    let data = Data::parse(&a.data, plan.seq_len as usize, a.overrides.markov.as_deref())?;
    let device = gainguard::device::parse_device(&a.device).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    plot::ensure_font()?;
    if let Some(dir) = &a.shared_runs {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let shared = a.shared_runs.clone();
    let mut runner = Runner { plan: &plan, data: &data, device, cache: BTreeMap::new(), shared, trained: 0, reused: 0, start: Instant::now() };
    if a.gamma_sweep {
        sweep::run(&a, &plan, &mut runner)
    } else {
        transfer::run(&a, &plan, &mut runner)
    }
}

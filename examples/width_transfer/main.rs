//! The width-transfer experiment (issue 6): does the proxy's tuned `(lr, wd)` stay optimal at 2×, 4×
//! and 8× width under each rule, and does the rule keep sigma_max flat across widths?
//!
//! ```text
//! cargo run --release --example width_transfer -- --preset cpu-small --out out/width-transfer
//! cargo run --release --example width_transfer -- --preset gpu --device cuda --out out/width-transfer-gpu
//! cargo run --release --example width_transfer -- --preset smoke --out out/smoke
//! cargo run --release --example width_transfer -- --preset cpu-small --calibrate --out out/calibrate
//! ```
//!
//! 1. Sweep `(lr, wd)` on a grid at the base width; the best final loss is the proxy's optimum.
//! 2. At each target width and under each rule, train at that optimum zero-shot, and on a cross of grid
//!    steps around it (lr × 2^i, wd × 2^j) to locate the optimum there.
//! 3. Report the grid steps between the two, sigma_max of every hidden matrix per width, its spread,
//!    the fitted alpha and the gamma that flattens sigma_max along the μP path.
//!
//! Identical runs (same width, same effective per-class lr and wd) are trained once.

mod report;

use anyhow::{bail, Context, Result};
use clap::Parser;
use gainguard::data::{MarkovCorpus, TokenFile};
use gainguard::{ParamClass, Preset, Rule, Schedule};
use gainguard_examples::{plot, train};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use report::Measurement;

#[derive(Parser)]
#[command(about = "Width-transfer experiment: proxy (lr, wd) sweep, zero-shot transfer to 2x/4x/8x under each rule, sigma_max and fits")]
struct Args {
    /// smoke (under a minute), cpu-small (≤ 30 min on 2 cores), gpu (use with --device cuda).
    #[arg(long, default_value = "cpu-small")]
    preset: String,
    #[arg(long, default_value = "out/width-transfer")]
    out: PathBuf,
    /// markov (synthetic, known entropy floor), text:PATH (bytes) or bin:PATH[:VOCAB] (nanoGPT uint16).
    #[arg(long, default_value = "markov")]
    data: String,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Override the preset's number of steps per run.
    #[arg(long)]
    steps: Option<u64>,
    /// libtorch intra-op threads (0: libtorch's default). One thread by default: on a shared 2-core
    /// machine, two threads stalled 10× whenever another process ran (measured: 1 s runs took 18 s).
    #[arg(long, default_value_t = 1)]
    threads: i32,
    /// Instead of the transfer experiment: train along the μP path (lr ∝ 1/m, wd ∝ m^gamma) at the
    /// preset's widths for each of --gammas, write measurements.json and recommend gamma.
    #[arg(long)]
    calibrate: bool,
    /// Gamma values for --calibrate (at least 2).
    #[arg(long, value_delimiter = ',', default_value = "0,0.5,1")]
    gammas: Vec<f64>,
    /// Base (lr, wd) for --calibrate; defaults to the centre of the preset's grid.
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    wd: Option<f64>,
}

/// Sizes of one experiment.
#[derive(Clone, Debug, Serialize)]
struct Plan {
    name: &'static str,
    base_width: i64,
    /// Target widths as multiples of the base width.
    multipliers: Vec<i64>,
    layers: i64,
    seq_len: i64,
    batch: i64,
    steps: u64,
    lr_grid: Vec<f64>,
    wd_grid: Vec<f64>,
    /// The factor between neighbouring grid points (both axes).
    grid_factor: f64,
    rules: Vec<Preset>,
    /// Local search at each target: lr × factor^i for |i| ≤ lr_reach (at the transferred wd), and
    /// wd × factor^j for |j| ≤ wd_reach (at the transferred lr).
    lr_reach: i32,
    wd_reach: i32,
    /// Extra seeds of the proxy's best run, to show how much the loss moves with the seed alone.
    seed_repeats: u64,
}

fn geometric(start: f64, factor: f64, n: usize) -> Vec<f64> {
    (0..n).map(|i| start * factor.powi(i as i32)).collect()
}

impl Plan {
    fn preset(name: &str) -> Result<Plan> {
        Ok(match name {
            "smoke" => Plan {
                name: "smoke",
                base_width: 16,
                multipliers: vec![2],
                layers: 1,
                seq_len: 16,
                batch: 4,
                steps: 12,
                lr_grid: vec![2e-3, 4e-3],
                wd_grid: vec![0.1],
                grid_factor: 2.0,
                rules: vec![Preset::Paper, Preset::Standard],
                lr_reach: 1,
                wd_reach: 0,
                seed_repeats: 0,
            },
            "cpu-small" => Plan {
                // Sized by measurement (docs/EXPERIMENTS.md): a 256-wide run took about 1 s per step on
                // the shared 2-core machine with two threads, so the widths stop at 128; one thread runs
                // the whole preset in about 8 minutes.
                name: "cpu-small",
                base_width: 16,
                multipliers: vec![2, 4, 8],
                layers: 2,
                seq_len: 32,
                batch: 16,
                steps: 150,
                // A first try with lr from 2e-3 and wd from 0.05 put the optimum in the grid's corner
                // (highest lr, highest wd): in 150 steps the optimum sits higher, so the grid does too.
                lr_grid: geometric(4e-3, 2.0, 4),
                wd_grid: geometric(0.1, 2.0, 4),
                grid_factor: 2.0,
                rules: Preset::ALL.to_vec(),
                lr_reach: 2,
                wd_reach: 1,
                seed_repeats: 2,
            },
            "gpu" => Plan {
                name: "gpu",
                base_width: 128,
                multipliers: vec![2, 4, 8],
                layers: 4,
                seq_len: 128,
                batch: 32,
                steps: 1000,
                lr_grid: geometric(1e-3, 2.0, 5),
                wd_grid: geometric(0.025, 2.0, 4),
                grid_factor: 2.0,
                rules: Preset::ALL.to_vec(),
                lr_reach: 2,
                wd_reach: 1,
                seed_repeats: 2,
            },
            other => bail!("unknown preset `{other}`: expected smoke, cpu-small or gpu"),
        })
    }

    fn widths(&self) -> Vec<i64> {
        std::iter::once(self.base_width).chain(self.multipliers.iter().map(|m| m * self.base_width)).collect()
    }
}

/// The token source.
enum Data {
    Markov(MarkovCorpus),
    File(TokenFile, String),
}

impl Data {
    fn parse(s: &str, min_tokens: usize) -> Result<Data> {
        if s == "markov" {
            return Ok(Data::Markov(MarkovCorpus::new(256, 4, 0)));
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

    /// The lowest loss any model can reach, where known (the Markov corpus's entropy rate).
    fn floor(&self) -> Option<f64> {
        match self {
            Data::Markov(c) => Some(c.entropy_rate()),
            Data::File(..) => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Data::Markov(c) => format!("synthetic Markov corpus (vocab {}, branching 4, seed 0), entropy rate {:.4} nats/token", c.vocab, c.entropy_rate()),
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

/// What was asked of one run: width, rule and base `(lr, wd)`.
#[derive(Clone, Debug, Serialize)]
struct RunRequest {
    width: i64,
    rule: Rule,
    lr: f64,
    wd: f64,
    seed: u64,
}

impl RunRequest {
    fn m(&self, base: i64) -> f64 {
        self.width as f64 / base as f64
    }
    /// Effective values: (matrix lr, matrix wd, vector lr). Vector-like wd is always 0.
    fn effective(&self, base: i64) -> (f64, f64, f64) {
        let m = self.m(base);
        (
            self.rule.learning_rate(ParamClass::MatrixLike, self.lr, m),
            self.rule.weight_decay(ParamClass::MatrixLike, self.wd, m),
            self.rule.learning_rate(ParamClass::VectorLike, self.lr, m),
        )
    }
    /// Two requests with the same key train the same model on the same data: one run serves both.
    fn key(&self, base: i64) -> String {
        let (a, b, c) = self.effective(base);
        format!("d{}-s{}-{:.10e}-{:.10e}-{:.10e}", self.width, self.seed, a, b, c)
    }
}

#[derive(Clone, Debug, Serialize)]
struct RunOutcome {
    final_loss: f64,
    sigma_max: BTreeMap<String, f64>,
    seconds: f64,
    /// The first request that trained it (others were served from the cache).
    trained_as: String,
}

struct Runner<'a> {
    plan: &'a Plan,
    data: &'a Data,
    device: tch::Device,
    cache: BTreeMap<String, RunOutcome>,
    bar: ProgressBar,
    trained: usize,
    reused: usize,
}

/// Relative cost of one run: multiply–adds per token of the model, times steps.
fn cost(plan: &Plan, vocab: i64, width: i64) -> u64 {
    let d = width;
    let d_ff = ((8 * d / 3) + 7) / 8 * 8;
    let per_token = plan.layers * (4 * d * d + 3 * d * d_ff + plan.seq_len * d) + vocab * d;
    (per_token as u64 * plan.steps).div_ceil(1000).max(1)
}

impl<'a> Runner<'a> {
    fn run(&mut self, r: &RunRequest) -> Result<RunOutcome> {
        let key = r.key(self.plan.base_width);
        if let Some(o) = self.cache.get(&key) {
            self.reused += 1;
            return Ok(o.clone());
        }
        let label = format!("d={} {} lr={:.2e} wd={:.3}", r.width, r.rule.preset, r.lr, r.wd);
        self.bar.set_message(label.clone());
        let spec = train::RunSpec {
            name: label.clone(),
            d_model: r.width,
            base_d_model: self.plan.base_width,
            layers: self.plan.layers,
            vocab: self.data.vocab(),
            seq_len: self.plan.seq_len,
            batch: self.plan.batch,
            steps: self.plan.steps,
            lr: r.lr,
            wd: r.wd,
            rule: r.rule,
            schedule: Schedule::WarmupCosine { warmup: self.plan.steps / 10, total: self.plan.steps, floor: 0.1 },
            seed: r.seed,
            device: self.device,
            sample_every: 0,
        };
        let (b, t) = (self.plan.batch, self.plan.seq_len);
        let data = self.data;
        let res = train::train_on(&spec, &|step| data.batch(step, b, t), Default::default()).with_context(|| format!("run {label}"))?;
        let o = RunOutcome { final_loss: res.final_loss, sigma_max: res.sigma_max, seconds: res.seconds, trained_as: label };
        self.bar.inc(cost(self.plan, self.data.vocab(), r.width));
        self.trained += 1;
        // indicatif draws nothing when stderr is not a terminal (a nohup log): say the same in lines.
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprintln!(
                "[{:>6.0} s] {:>3}% ETA {:>5.0} s  {} -> loss {:.4} ({:.1} s)",
                self.bar.elapsed().as_secs_f64(),
                100 * self.bar.position() / self.bar.length().unwrap_or(1).max(1),
                self.bar.eta().as_secs_f64(),
                o.trained_as,
                o.final_loss,
                o.seconds
            );
        }
        self.cache.insert(key, o.clone());
        Ok(o)
    }

    fn is_cached(&self, r: &RunRequest) -> bool {
        self.cache.contains_key(&r.key(self.plan.base_width))
    }
}

/// The finite loss, or +inf for a diverged run, so diverged runs never win.
fn loss_key(o: &RunOutcome) -> f64 {
    if o.final_loss.is_finite() {
        o.final_loss
    } else {
        f64::INFINITY
    }
}

#[derive(Clone, Debug, Serialize)]
struct LocalPoint {
    lr_step: i32,
    wd_step: i32,
    lr: f64,
    wd: f64,
    final_loss: f64,
}

#[derive(Clone, Debug, Serialize)]
struct TargetResult {
    rule: String,
    width: i64,
    zero_shot: RunOutcome,
    local: Vec<LocalPoint>,
    best_lr_step: i32,
    best_wd_step: i32,
    best_loss: f64,
    /// The best point lies on the edge of the local search: the true optimum may be further out.
    at_edge: bool,
}

impl TargetResult {
    /// The target's result from its zero-shot run and its local search; the best local point is the
    /// lowest finite loss.
    fn new(rule: Preset, width: i64, zero_shot: RunOutcome, local: Vec<LocalPoint>, plan: &Plan) -> TargetResult {
        let b = local
            .iter()
            .min_by(|x, y| {
                let f = |l: &LocalPoint| if l.final_loss.is_finite() { l.final_loss } else { f64::INFINITY };
                f(x).total_cmp(&f(y))
            })
            .unwrap()
            .clone();
        TargetResult {
            rule: rule.name().into(),
            width,
            zero_shot,
            at_edge: (b.lr_step != 0 && b.lr_step.abs() == plan.lr_reach) || (b.wd_step != 0 && b.wd_step.abs() == plan.wd_reach),
            best_lr_step: b.lr_step,
            best_wd_step: b.wd_step,
            best_loss: b.final_loss,
            local,
        }
    }
}

/// One point of the proxy's (lr, wd) grid at the base width.
#[derive(Clone, Debug)]
struct GridPoint {
    lr: f64,
    wd: f64,
    outcome: RunOutcome,
}

/// What the transfer experiment measured.
struct Results {
    base_grid: Vec<GridPoint>,
    /// The grid point with the lowest loss: the proxy's optimum.
    best: GridPoint,
    /// The optimum's final loss at seeds 0, 1, …: the seed noise.
    seed_losses: Vec<f64>,
    targets: Vec<TargetResult>,
    /// Wall time of every run, in seconds.
    wall: f64,
}

impl Results {
    fn target(&self, rule: &str, width: i64) -> Option<&TargetResult> {
        self.targets.iter().find(|t| t.rule == rule && t.width == width)
    }

    /// sigma_max of every hidden matrix at `width` under `rule`, zero-shot (the proxy's own run at the
    /// base width, where every rule is the identity).
    fn sigma_at(&self, plan: &Plan, rule: &str, width: i64) -> Option<&BTreeMap<String, f64>> {
        if width == plan.base_width {
            Some(&self.best.outcome.sigma_max)
        } else {
            self.target(rule, width).map(|t| &t.zero_shot.sigma_max)
        }
    }

    /// The hidden matrices, by name.
    fn params(&self) -> Vec<String> {
        self.best.outcome.sigma_max.keys().cloned().collect()
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut plan = Plan::preset(&a.preset)?;
    if let Some(s) = a.steps {
        plan.steps = s;
    }
    if a.threads > 0 {
        tch::set_num_threads(a.threads);
    }
    let data = Data::parse(&a.data, plan.seq_len as usize)?;
    let device = gainguard::device::parse_device(&a.device).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    plot::ensure_font()?;
    let mut runner = Runner {
        plan: &plan,
        data: &data,
        device,
        cache: BTreeMap::new(),
        bar: ProgressBar::hidden(),
        trained: 0,
        reused: 0,
    };
    let start = Instant::now();
    if a.calibrate {
        return calibrate(&a, &plan, &data, &mut runner, start);
    }

    runner.bar = progress_bar(&plan, data.vocab());
    let (base_grid, best) = sweep_proxy_grid(&plan, &mut runner)?;
    let mut seed_losses = vec![best.outcome.final_loss];
    for s in 1..=plan.seed_repeats {
        seed_losses.push(runner.run(&RunRequest { width: plan.base_width, rule: Rule::default(), lr: best.lr, wd: best.wd, seed: s })?.final_loss);
    }
    let targets = transfer(&plan, &mut runner, best.lr, best.wd)?;
    runner.bar.finish_and_clear();
    let results = Results { base_grid, best, seed_losses, targets, wall: start.elapsed().as_secs_f64() };
    report::write_report(&a, &plan, &data, &results, &runner)
}

/// A bar sized for the whole experiment. Phase 1 is known up front; phase 2's size is bounded by the
/// cross around any grid point. The bar counts cost (multiply–adds), so its ETA weighs an 8× run as
/// the 8× run it is.
fn progress_bar(plan: &Plan, vocab: i64) -> ProgressBar {
    let phase1 = (plan.lr_grid.len() * plan.wd_grid.len()) as u64 * cost(plan, vocab, plan.base_width)
        + plan.seed_repeats * cost(plan, vocab, plan.base_width);
    let cross = (1 + 2 * plan.lr_reach + 2 * plan.wd_reach) as u64;
    let phase2_bound: u64 = plan.widths()[1..].iter().map(|w| cross * plan.rules.len() as u64 * cost(plan, vocab, *w)).sum();
    let bar = ProgressBar::new(phase1 + phase2_bound);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {percent:>3}% ETA {eta_precise} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    bar
}

/// Phase 1: the proxy's (lr, wd) grid at the base width (every rule is the identity at m = 1). Returns
/// the grid and its best point.
fn sweep_proxy_grid(plan: &Plan, runner: &mut Runner) -> Result<(Vec<GridPoint>, GridPoint)> {
    let mut base_grid = Vec::new();
    for &lr in &plan.lr_grid {
        for &wd in &plan.wd_grid {
            let outcome = runner.run(&RunRequest { width: plan.base_width, rule: Rule::default(), lr, wd, seed: 0 })?;
            base_grid.push(GridPoint { lr, wd, outcome });
        }
    }
    let best = base_grid.iter().min_by(|x, y| loss_key(&x.outcome).total_cmp(&loss_key(&y.outcome))).unwrap().clone();
    Ok((base_grid, best))
}

/// The local search at every target width under every rule, as (width, rule, lr step, wd step): the
/// transferred point first, then lr steps at the transferred wd, then wd steps at the transferred lr.
fn local_search(plan: &Plan) -> Vec<(i64, Preset, i32, i32)> {
    let mut points = Vec::new();
    for &w in &plan.widths()[1..] {
        for &p in &plan.rules {
            points.push((w, p, 0, 0));
            for i in -plan.lr_reach..=plan.lr_reach {
                if i != 0 {
                    points.push((w, p, i, 0));
                }
            }
            for j in -plan.wd_reach..=plan.wd_reach {
                if j != 0 {
                    points.push((w, p, 0, j));
                }
            }
        }
    }
    points
}

/// Phase 2: each target width under each rule, zero-shot at the proxy's optimum and around it.
fn transfer(plan: &Plan, runner: &mut Runner, best_lr: f64, best_wd: f64) -> Result<Vec<TargetResult>> {
    let points = local_search(plan);
    let request = |w: i64, p: Preset, i: i32, j: i32| RunRequest {
        width: w,
        rule: Rule::preset(p),
        lr: best_lr * plan.grid_factor.powi(i),
        wd: best_wd * plan.grid_factor.powi(j),
        seed: 0,
    };
    // Exact length of phase 2 now that the centre is known (cached duplicates cost nothing).
    let mut distinct = BTreeMap::new();
    for &(w, p, i, j) in &points {
        let r = request(w, p, i, j);
        if !runner.is_cached(&r) {
            distinct.insert(r.key(plan.base_width), cost(plan, runner.data.vocab(), w));
        }
    }
    runner.bar.set_length(runner.bar.position() + distinct.values().sum::<u64>());

    let mut targets = Vec::new();
    for &w in &plan.widths()[1..] {
        for &p in &plan.rules {
            let zero_shot = runner.run(&request(w, p, 0, 0))?;
            let mut local = Vec::new();
            for &(pw, pp, i, j) in points.iter().filter(|x| x.0 == w && x.1 == p) {
                let r = request(pw, pp, i, j);
                let o = runner.run(&r)?;
                local.push(LocalPoint { lr_step: i, wd_step: j, lr: r.lr, wd: r.wd, final_loss: o.final_loss });
            }
            targets.push(TargetResult::new(p, w, zero_shot, local, plan));
        }
    }
    Ok(targets)
}

/// `--calibrate`: trains along the μP path (lr ∝ 1/m, wd ∝ m^gamma) at the preset's widths for each gamma,
/// writes measurements.json and prints the recommended gamma.
fn calibrate(a: &Args, plan: &Plan, data: &Data, runner: &mut Runner, start: Instant) -> Result<()> {
    if a.gammas.len() < 2 {
        bail!("--calibrate needs at least 2 gamma values in --gammas, got {}", a.gammas.len());
    }
    let lr = a.lr.unwrap_or(plan.lr_grid[plan.lr_grid.len() / 2]);
    let wd = a.wd.unwrap_or(plan.wd_grid[plan.wd_grid.len() / 2]);
    let widths = plan.widths();
    let total: u64 = widths.iter().map(|w| cost(plan, data.vocab(), *w)).sum::<u64>() * a.gammas.len() as u64;
    runner.bar = ProgressBar::new(total);
    runner.bar.set_style(ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {percent:>3}% ETA {eta_precise} {msg}").unwrap());
    let mut ms = Vec::new();
    for &gamma in &a.gammas {
        let rule = Rule::custom(gamma, 1.0)?;
        for &w in &widths {
            let o = runner.run(&RunRequest { width: w, rule, lr, wd, seed: 0 })?;
            for (param, s) in &o.sigma_max {
                ms.push(Measurement { width: w, gamma, lr, wd, param: param.clone(), sigma_max: *s });
            }
        }
    }
    runner.bar.finish_and_clear();
    let path = a.out.join("measurements.json");
    std::fs::write(&path, serde_json::to_string_pretty(&ms)?)?;
    let (text, _) = report::calibration_text(&ms);
    println!("μP-path calibration, preset {}, base (lr, wd) = ({lr:e}, {wd}), widths {widths:?}, {:.0} s", plan.name, start.elapsed().as_secs_f64());
    println!("{text}");
    println!("measurements: {} (read it with `gainguard calibrate {}`)", path.display(), path.display());
    Ok(())
}

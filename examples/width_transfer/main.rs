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

#[path = "../llama/model.rs"]
mod model;
#[path = "../llama/report.rs"]
mod report;
#[path = "../llama/train.rs"]
mod train;

use anyhow::{bail, Context, Result};
use clap::Parser;
use gainguard::data::{MarkovCorpus, TokenFile};
use gainguard::fit::{self, MupPoint, WidthPoint};
use gainguard::{ParamClass, Preset, Rule, Schedule};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    report::ensure_font()?;
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

    // Phase 1 is known up front; phase 2's size is bounded by the cross around any grid point. The
    // bar counts cost (multiply–adds), so its ETA weighs an 8× run as the 8× run it is.
    let vocab = data.vocab();
    let phase1 = (plan.lr_grid.len() * plan.wd_grid.len()) as u64 * cost(&plan, vocab, plan.base_width)
        + plan.seed_repeats * cost(&plan, vocab, plan.base_width);
    let cross = (1 + 2 * plan.lr_reach + 2 * plan.wd_reach) as u64;
    let phase2_bound: u64 = plan.widths()[1..].iter().map(|w| cross * plan.rules.len() as u64 * cost(&plan, vocab, *w)).sum();
    let bar = ProgressBar::new(phase1 + phase2_bound);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {percent:>3}% ETA {eta_precise} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    runner.bar = bar;

    // Phase 1: the proxy's (lr, wd) grid at the base width (every rule is the identity at m = 1).
    let mut base_grid = Vec::new();
    for (i, &lr) in plan.lr_grid.iter().enumerate() {
        for (j, &wd) in plan.wd_grid.iter().enumerate() {
            let o = runner.run(&RunRequest { width: plan.base_width, rule: Rule::default(), lr, wd, seed: 0 })?;
            base_grid.push((i, j, lr, wd, o));
        }
    }
    let best = base_grid.iter().min_by(|x, y| loss_key(&x.4).total_cmp(&loss_key(&y.4))).unwrap().clone();
    let (best_lr, best_wd) = (best.2, best.3);
    let mut seed_losses = vec![best.4.final_loss];
    for s in 1..=plan.seed_repeats {
        seed_losses.push(runner.run(&RunRequest { width: plan.base_width, rule: Rule::default(), lr: best_lr, wd: best_wd, seed: s })?.final_loss);
    }

    // Exact length of phase 2 now that the centre is known (cached duplicates cost nothing).
    let mut phase2: Vec<(i64, Preset, i32, i32)> = Vec::new();
    for &w in &plan.widths()[1..] {
        for &p in &plan.rules {
            phase2.push((w, p, 0, 0));
            for i in -plan.lr_reach..=plan.lr_reach {
                if i != 0 {
                    phase2.push((w, p, i, 0));
                }
            }
            for j in -plan.wd_reach..=plan.wd_reach {
                if j != 0 {
                    phase2.push((w, p, 0, j));
                }
            }
        }
    }
    let request = |w: i64, p: Preset, i: i32, j: i32| RunRequest {
        width: w,
        rule: Rule::preset(p),
        lr: best_lr * plan.grid_factor.powi(i),
        wd: best_wd * plan.grid_factor.powi(j),
        seed: 0,
    };
    let mut distinct = BTreeMap::new();
    for &(w, p, i, j) in &phase2 {
        let r = request(w, p, i, j);
        if !runner.is_cached(&r) {
            distinct.insert(r.key(plan.base_width), cost(&plan, vocab, w));
        }
    }
    runner.bar.set_length(runner.bar.position() + distinct.values().sum::<u64>());

    // Phase 2: each target width under each rule, zero-shot and around it.
    let mut targets = Vec::new();
    for &w in &plan.widths()[1..] {
        for &p in &plan.rules {
            let zero_shot = runner.run(&request(w, p, 0, 0))?;
            let mut local = Vec::new();
            for &(pw, pp, i, j) in phase2.iter().filter(|x| x.0 == w && x.1 == p) {
                let r = request(pw, pp, i, j);
                let o = runner.run(&r)?;
                local.push(LocalPoint { lr_step: i, wd_step: j, lr: r.lr, wd: r.wd, final_loss: o.final_loss });
            }
            let b = local
                .iter()
                .min_by(|x, y| {
                    let f = |l: &LocalPoint| if l.final_loss.is_finite() { l.final_loss } else { f64::INFINITY };
                    f(x).total_cmp(&f(y))
                })
                .unwrap()
                .clone();
            targets.push(TargetResult {
                rule: p.name().into(),
                width: w,
                zero_shot,
                at_edge: (b.lr_step != 0 && b.lr_step.abs() == plan.lr_reach) || (b.wd_step != 0 && b.wd_step.abs() == plan.wd_reach),
                best_lr_step: b.lr_step,
                best_wd_step: b.wd_step,
                best_loss: b.final_loss,
                local,
            });
        }
    }
    runner.bar.finish_and_clear();
    let wall = start.elapsed().as_secs_f64();
    let base_run = best.4.clone();
    write_report(&a, &plan, &data, &base_grid, &base_run, best_lr, best_wd, &seed_losses, &targets, &runner, wall)
}

/// Measurements in the format `gainguard calibrate` reads.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
struct Measurement {
    width: i64,
    gamma: f64,
    lr: f64,
    wd: f64,
    param: String,
    sigma_max: f64,
}

fn mup_points(ms: &[Measurement]) -> Vec<MupPoint> {
    ms.iter()
        .map(|m| MupPoint { group: format!("{} lr={:e} wd={:e}", m.param, m.lr, m.wd), gamma: m.gamma, width: m.width as f64, sigma_max: m.sigma_max })
        .collect()
}

fn calibration_text(ms: &[Measurement]) -> (String, Option<fit::GammaCalibration>) {
    let mut s = String::new();
    match fit::calibrate_gamma(&mup_points(ms)) {
        Ok(c) => {
            let _ = writeln!(s, "| gamma | slope of ln sigma_max vs ln d | ± se | widths | implied alpha |");
            let _ = writeln!(s, "|---|---|---|---|---|");
            for g in &c.per_gamma {
                let _ = writeln!(s, "| {} | {:+.3} | {:.3} | {} | {:.3} |", g.gamma, g.slope, g.slope_se, g.widths, g.implied_alpha);
            }
            let _ = writeln!(
                s,
                "\nRecommended gamma (slope = 0): **{:.2} ± {:.2}** (alpha = (1+gamma)/2 = {:.3} ± {:.3}); \
                 fitted d slope / d gamma = {:.3} ± {:.3} (the sqrt(lr/wd)·d^alpha law predicts −0.5){}.",
                c.gamma,
                c.gamma_se,
                c.alpha,
                c.alpha_se,
                c.rate,
                c.rate_se,
                if c.extrapolated { "; **extrapolated** beyond the measured gammas" } else { "" }
            );
            (s, Some(c))
        }
        Err(e) => {
            let _ = writeln!(s, "No gamma calibration: {e}.");
            (s, None)
        }
    }
}

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
    let (text, _) = calibration_text(&ms);
    println!("μP-path calibration, preset {}, base (lr, wd) = ({lr:e}, {wd}), widths {widths:?}, {:.0} s", plan.name, start.elapsed().as_secs_f64());
    println!("{text}");
    println!("measurements: {} (read it with `gainguard calibrate {}`)", path.display(), path.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_report(
    a: &Args,
    plan: &Plan,
    data: &Data,
    base_grid: &[(usize, usize, f64, f64, RunOutcome)],
    base_run: &RunOutcome,
    best_lr: f64,
    best_wd: f64,
    seed_losses: &[f64],
    targets: &[TargetResult],
    runner: &Runner,
    wall: f64,
) -> Result<()> {
    use report::{plot_panels, Axes, Panel, Series};
    let out = &a.out;
    let widths = plan.widths();
    let floor = data.floor();
    let hlines = |v: Option<f64>| v.map(|f| vec![("entropy floor".to_string(), f)]).unwrap_or_default();
    let params: Vec<String> = base_run.sigma_max.keys().cloned().collect();
    let by = |rule: &str, w: i64| targets.iter().find(|t| t.rule == rule && t.width == w);
    let sigma_at = |rule: &str, w: i64| -> Option<&BTreeMap<String, f64>> {
        if w == plan.base_width {
            Some(&base_run.sigma_max)
        } else {
            by(rule, w).map(|t| &t.zero_shot.sigma_max)
        }
    };

    // Plot 1: final loss vs lr, one line per width, one panel per rule (the base width's line is the
    // proxy grid at the chosen wd).
    let mut panels = Vec::new();
    for p in &plan.rules {
        let mut series = vec![Series::new(
            format!("d={} (proxy)", plan.base_width),
            base_grid.iter().filter(|g| g.3 == best_wd).map(|g| (g.2, g.4.final_loss)).filter(|p| p.1.is_finite()).collect(),
        )];
        for &w in &widths[1..] {
            if let Some(t) = by(p.name(), w) {
                let mut pts: Vec<(f64, f64)> = t.local.iter().filter(|l| l.wd_step == 0 && l.final_loss.is_finite()).map(|l| (l.lr, l.final_loss)).collect();
                pts.sort_by(|x, y| x.0.total_cmp(&y.0));
                series.push(Series::new(format!("d={w}"), pts));
            }
        }
        panels.push(Panel { title: format!("{} (wd = {best_wd})", p.name()), series, hlines: hlines(floor) });
    }
    plot_panels(
        &out.join("loss_vs_lr.png"),
        "final loss (last 10% mean) vs base lr",
        Axes { x_label: "base lr", y_label: "loss (nats/token)", log_x: true, log_y: false },
        &panels,
        2,
    )?;

    // Plot 2: sigma_max per hidden matrix vs width, zero-shot, one panel per rule.
    let mut panels = Vec::new();
    for p in &plan.rules {
        let series = params
            .iter()
            .map(|n| {
                let pts = widths.iter().filter_map(|&w| sigma_at(p.name(), w).and_then(|s| s.get(n)).map(|s| (w as f64, *s))).collect();
                Series::new(short(n), pts)
            })
            .collect();
        panels.push(Panel { title: p.name().into(), series, hlines: vec![] });
    }
    plot_panels(
        &out.join("sigma_vs_width.png"),
        &format!("sigma_max of each hidden matrix vs width, proxy's (lr, wd) = ({best_lr:e}, {best_wd}) transferred"),
        Axes { x_label: "width d", y_label: "sigma_max", log_x: true, log_y: true },
        &panels,
        2,
    )?;

    // Spread per layer and rule.
    let mut spreads: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for p in &plan.rules {
        let v = params
            .iter()
            .map(|n| {
                let vals: Vec<f64> = widths.iter().filter_map(|&w| sigma_at(p.name(), w).and_then(|s| s.get(n)).copied()).collect();
                fit::spread(&vals)
            })
            .collect();
        spreads.insert(p.name(), v);
    }
    let panels = [Panel {
        title: "max/min over widths, per hidden matrix (1 = flat)".into(),
        series: plan.rules.iter().map(|p| Series::new(p.name(), spreads[p.name()].iter().enumerate().map(|(i, s)| (i as f64, *s)).collect())).collect(),
        hlines: vec![("1".into(), 1.0)],
    }];
    plot_panels(&out.join("sigma_spread.png"), "spread of sigma_max across widths", Axes { x_label: "hidden matrix index (see report)", y_label: "spread", log_x: false, log_y: true }, &panels, 1)?;

    // Fits: alpha on every run (effective lr, wd), and the μP-path gamma from the zero-shot runs.
    let mut alpha_points = Vec::new();
    let add = |pts: &mut Vec<WidthPoint>, r: &RunRequest, o: &RunOutcome| {
        let (lr, wd, _) = r.effective(plan.base_width);
        for (n, s) in &o.sigma_max {
            pts.push(WidthPoint { group: n.clone(), width: r.width as f64, lr, wd, sigma_max: *s });
        }
    };
    for g in base_grid {
        add(&mut alpha_points, &RunRequest { width: plan.base_width, rule: Rule::default(), lr: g.2, wd: g.3, seed: 0 }, &g.4);
    }
    for t in targets {
        let p: Preset = t.rule.parse()?;
        for l in &t.local {
            let r = RunRequest { width: t.width, rule: Rule::preset(p), lr: l.lr, wd: l.wd, seed: 0 };
            if let Some(o) = runner.cache.get(&r.key(plan.base_width)) {
                if o.final_loss.is_finite() {
                    add(&mut alpha_points, &r, o);
                }
            }
        }
    }
    let alpha_all = fit::fit_alpha(&alpha_points);
    let mut ms = Vec::new();
    for p in &plan.rules {
        let Some(gamma) = Rule::preset(*p).reported_gamma() else { continue };
        for &w in &widths {
            if let Some(s) = sigma_at(p.name(), w) {
                for (n, v) in s {
                    ms.push(Measurement { width: w, gamma, lr: best_lr, wd: best_wd, param: n.clone(), sigma_max: *v });
                }
            }
        }
    }
    std::fs::write(out.join("measurements.json"), serde_json::to_string_pretty(&ms)?)?;
    let (calib_text, calib) = calibration_text(&ms);
    if let Some(c) = &calib {
        let xs = c.per_gamma.iter().map(|g| (g.gamma, g.slope)).collect();
        let mut s = Series::new("measured slope ± se", xs);
        s.y_err = Some(c.per_gamma.iter().map(|g| g.slope_se).collect());
        let (g0, g1) = (c.per_gamma[0].gamma.min(c.gamma), c.per_gamma.last().unwrap().gamma.max(c.gamma));
        let line = Series::new(format!("fit: zero at gamma {:.2} ± {:.2}", c.gamma, c.gamma_se), vec![(g0, c.intercept + c.rate * g0), (g1, c.intercept + c.rate * g1)]);
        plot_panels(
            &out.join("gamma_calibration.png"),
            "slope of ln sigma_max vs ln d along the μP path (lr ∝ 1/m, wd ∝ m^gamma)",
            Axes { x_label: "gamma", y_label: "slope", log_x: false, log_y: false },
            &[Panel { title: "zero slope = width-invariant sigma_max".into(), series: vec![s, line], hlines: vec![("0".into(), 0.0)] }],
            1,
        )?;
    }

    // report.md
    let mut r = String::new();
    let _ = writeln!(r, "# Width-transfer experiment: preset `{}`\n", plan.name);
    let _ = writeln!(
        r,
        "Command: `cargo run --release --example width_transfer -- --preset {} --out {} --data {} --device {}`{}\n",
        plan.name,
        a.out.display(),
        a.data,
        a.device,
        a.steps.map(|s| format!(" --steps {s}")).unwrap_or_default()
    );
    let _ = writeln!(r, "- data: {}", data.describe());
    let _ = writeln!(
        r,
        "- model: LLaMA-style, {} layers, base width {}, widths {:?}, seq {} × batch {}, {} steps, warmup-cosine (10% warmup, floor 0.1), grad clip 1.0, seed 0",
        plan.layers, plan.base_width, widths, plan.seq_len, plan.batch, plan.steps
    );
    let _ = writeln!(r, "- proxy grid: lr {:?} × wd {:?}; local search at each target: lr × {}^i, |i| ≤ {} (at the transferred wd) and wd × {}^j, |j| ≤ {} (at the transferred lr)", plan.lr_grid, plan.wd_grid, plan.grid_factor, plan.lr_reach, plan.grid_factor, plan.wd_reach);
    let _ = writeln!(r, "- final loss = mean training loss over the last 10% of steps (fresh batches every step); sigma_max from a float64 SVD of the final weights");
    let _ = writeln!(r, "- runs: {} trained, {} served from the cache of identical runs; wall time {:.0} s ({:.1} min); {} threads", runner.trained, runner.reused, wall, wall / 60.0, tch::get_num_threads());
    let _ = writeln!(r, "- machine: {}\n", machine());

    let _ = writeln!(r, "## Proxy (lr, wd) grid at d = {}\n", plan.base_width);
    let _ = writeln!(r, "| lr \\ wd | {} |", plan.wd_grid.iter().map(|w| w.to_string()).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(r, "|---|{}", "---|".repeat(plan.wd_grid.len()));
    for &lr in &plan.lr_grid {
        let cells: Vec<String> = plan
            .wd_grid
            .iter()
            .map(|&wd| {
                let o = &base_grid.iter().find(|g| g.2 == lr && g.3 == wd).unwrap().4;
                let s = format!("{:.4}", o.final_loss);
                if lr == best_lr && wd == best_wd {
                    format!("**{s}**")
                } else {
                    s
                }
            })
            .collect();
        let _ = writeln!(r, "| {lr:e} | {} |", cells.join(" | "));
    }
    let _ = writeln!(r, "\nProxy optimum: lr = {best_lr:e}, wd = {best_wd}, loss {:.4}{}.", base_run.final_loss, floor.map(|f| format!(" (entropy floor {f:.4})")).unwrap_or_default());
    if seed_losses.len() > 1 {
        let mean = seed_losses.iter().sum::<f64>() / seed_losses.len() as f64;
        let sd = (seed_losses.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (seed_losses.len() - 1) as f64).sqrt();
        let _ = writeln!(
            r,
            "Seed noise at the optimum: losses {:?} over seeds 0..{} (sd {:.4}). Loss differences smaller than this are not evidence.",
            seed_losses.iter().map(|l| (l * 1e4).round() / 1e4).collect::<Vec<_>>(),
            seed_losses.len() - 1,
            sd
        );
    }

    let _ = writeln!(r, "\n## Transfer: where is the optimum at each target width?\n");
    let _ = writeln!(r, "Grid steps are factors of {} from the transferred point (lr step, wd step). \"edge\" means the best point is at the edge of the local search, so the true optimum may lie further out.\n", plan.grid_factor);
    let _ = writeln!(r, "| rule | width | zero-shot loss | best local loss | regret | best (lr step, wd step) | lr within 1 step |");
    let _ = writeln!(r, "|---|---|---|---|---|---|---|");
    for t in targets {
        let _ = writeln!(
            r,
            "| {} | {} | {:.4} | {:.4} | {:.4} | ({:+}, {:+}){} | {} |",
            t.rule,
            t.width,
            t.zero_shot.final_loss,
            t.best_loss,
            t.zero_shot.final_loss - t.best_loss,
            t.best_lr_step,
            t.best_wd_step,
            if t.at_edge { " edge" } else { "" },
            lr_verdict(t.best_lr_step, plan.lr_reach)
        );
    }
    let _ = writeln!(r, "\n![loss vs lr](loss_vs_lr.png)\n");
    let _ = writeln!(r, "Loss at each local point (rule, width: lr step → loss at the transferred wd; wd step → loss at the transferred lr):\n");
    for t in targets {
        let lr_line: Vec<String> = t.local.iter().filter(|l| l.wd_step == 0).map(|l| format!("{:+}: {:.4}", l.lr_step, l.final_loss)).collect();
        let wd_line: Vec<String> = t.local.iter().filter(|l| l.lr_step == 0 && l.wd_step != 0).map(|l| format!("{:+}: {:.4}", l.wd_step, l.final_loss)).collect();
        let _ = writeln!(r, "- {} d={}: lr [{}]; wd [{}]", t.rule, t.width, lr_line.join(", "), wd_line.join(", "));
    }

    let _ = writeln!(r, "\n## sigma_max across widths (zero-shot runs)\n");
    let _ = writeln!(r, "Spread = max/min of sigma_max over widths {:?}; 1 means the gain is width-invariant.\n", widths);
    let _ = writeln!(r, "| # | hidden matrix | {} |", plan.rules.iter().map(|p| p.name()).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(r, "|---|---|{}", "---|".repeat(plan.rules.len()));
    for (i, n) in params.iter().enumerate() {
        let _ = writeln!(r, "| {i} | `{n}` | {} |", plan.rules.iter().map(|p| format!("{:.2}", spreads[p.name()][i])).collect::<Vec<_>>().join(" | "));
    }
    let _ = writeln!(
        r,
        "| | **median** | {} |",
        plan.rules.iter().map(|p| format!("**{:.2}**", median(&spreads[p.name()]))).collect::<Vec<_>>().join(" | ")
    );
    let _ = writeln!(r, "\n![sigma_max vs width](sigma_vs_width.png)\n\n![spread](sigma_spread.png)\n");
    let _ = writeln!(r, "sigma_max values (zero-shot):\n");
    let _ = writeln!(r, "| rule | hidden matrix | {} |", widths.iter().map(|w| format!("d={w}")).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(r, "|---|---|{}", "---|".repeat(widths.len()));
    for p in &plan.rules {
        for n in &params {
            let cells: Vec<String> =
                widths.iter().map(|&w| sigma_at(p.name(), w).and_then(|s| s.get(n)).map(|v| format!("{v:.3}")).unwrap_or("–".into())).collect();
            let _ = writeln!(r, "| {} | `{}` | {} |", p.name(), short(n), cells.join(" | "));
        }
    }

    let _ = writeln!(r, "\n## Fitted exponents\n");
    match &alpha_all {
        Ok(f) => {
            let _ = writeln!(
                r,
                "alpha in sigma_max ∝ sqrt(lr/wd)·d^alpha, fitted on all {} runs' hidden matrices (effective lr, wd; one constant per matrix): \
                 **alpha = {:.3} ± {:.3}**, implied gamma = 2·alpha − 1 = {:.2} ± {:.2} (residual sd of ln sigma {:.3}, n = {}).\n",
                runner.trained,
                f.alpha,
                f.alpha_se,
                f.implied_gamma,
                f.implied_gamma_se,
                f.fit.residual_sd,
                f.fit.n
            );
        }
        Err(e) => {
            let _ = writeln!(r, "No alpha fit: {e}.\n");
        }
    }
    let _ = writeln!(r, "Direct μP-path calibration from the zero-shot runs of the rules with a gamma (measurements.json; `gainguard calibrate out/.../measurements.json` reproduces it):\n");
    let _ = writeln!(r, "{calib_text}");
    if calib.is_some() {
        let _ = writeln!(r, "![gamma calibration](gamma_calibration.png)\n");
    }
    let _ = writeln!(r, "All of this is one seed per point at a small scale; read the seed noise above before reading differences in loss.");
    std::fs::write(out.join("report.md"), &r)?;
    let runs: Vec<_> = runner.cache.values().collect();
    std::fs::write(out.join("runs.json"), serde_json::to_string_pretty(&serde_json::json!({ "plan": plan, "runs": runs, "targets": targets }))?)?;
    println!("{r}");
    println!("wrote {}", out.join("report.md").display());
    Ok(())
}

/// Whether the target's loss-optimal lr is within one grid step of the transferred one; an optimum on
/// the edge of the search at one step may lie further out, so that is "unknown", not "yes".
fn lr_verdict(step: i32, reach: i32) -> String {
    match step.abs() {
        0 => "yes (0)".into(),
        1 if reach > 1 => "yes (1)".into(),
        s if s == reach && s <= 1 => format!("unknown ({step:+}, edge)"),
        _ => format!("no ({step:+}{})", if step.abs() == reach { ", edge" } else { "" }),
    }
}

fn short(name: &str) -> String {
    name.trim_end_matches(".weight").replace("blocks.", "b")
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{} logical CPUs ({cpu}); load average at the end: {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    )
}

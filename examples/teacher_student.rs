//! The paper's minimal synthetic setting (arXiv 2510.15262), measured at AdamW's steady state.
//!
//! A teacher–student feed-forward network whose hidden matrix sits between two RMSNorms: it is
//! scale-invariant, so AdamW with weight decay alone sets its scale. Trained with gainguard's
//! `WidthScaledAdamW` at several widths under each rule, it prints sigma_max of the hidden matrix per width
//! and rule at steady state, and its spread across widths.
//!
//! ```text
//! cargo run --release --example teacher_student                       # 4 rules, widths 64..256, 3 seeds
//! cargo run --release --example teacher_student -- --gamma-sweep --out docs/experiments/teacher-student-gamma
//! ```
//!
//! **Steady-state protocol** (`gainguard::steady_state`). The law `sigma_max ≈ c·sqrt(lr/wd)·d^alpha` is
//! about the state weight decay reaches after several of its timescales, `1/(lr·wd)` steps each. So:
//! - the lr is constant after a short linear warmup;
//! - every run stops when its hidden matrix's decay horizon `H = Σ_t lr_t·wd_t` (width-scaled values,
//!   schedule included) reaches `--horizon` (6): under `lr ∝ 1/m, wd ∝ m^gamma` a wider run takes
//!   `m^(1−gamma)` times as many steps;
//! - its reading is sigma_max averaged over the last timescale (`H − 1 < h ≤ H`), from a float64 SVD;
//! - three checks are printed beside each reading: the same run from a 10× smaller init of the hidden
//!   matrix lands within 5% (the initialisation is forgotten); the same run at `(2·lr, 2·wd)` lands within
//!   5% (only `lr/wd` sets the scale, as the law says); the last timescale's mean is within 3% of the one
//!   before (no drift left);
//! - `--seeds` (3) seeds per cell; spreads carry a 95% percentile-bootstrap interval over the seeds.
//!
//! `--gamma-sweep` runs the μP path (`lr ∝ 1/m`, `wd ∝ m^gamma`) at gamma ∈ {0, 0.25, 0.5, 0.75, 1} over
//! widths 64–512 and finds gamma*, the gamma where sigma_max is flat in width (the slope of
//! `ln sigma_max` on `ln m` crosses zero), with its bootstrap interval.
//!
//! Student: `x → W_in (d × d_in, vector-like) → RMSNorm → W_hidden (d × d, matrix-like) → RMSNorm → ReLU →
//! μP readout (d_out × d, output / m)`. Teacher: the same architecture at width 64 with fixed random
//! weights. The loss is the mean squared error to the teacher's output on fresh Gaussian inputs.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use gainguard::mup::mu_readout;
use gainguard::steady_state::{bootstrap_interval, mean, warmup_then_constant, HorizonRate, SteadyStateTrace};
use gainguard::{AdamWConfig, BaseShapes, Override, ParamClass, ParamRole, Preset, Rule, WidthScaledAdamW};
use gainguard_examples::plot;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

#[derive(Parser)]
#[command(about = "Teacher–student FFN with RMSNorm: sigma_max of the hidden matrix per width and rule, at AdamW's steady state")]
struct Args {
    /// Student widths; the first is the base (m = 1). Default: 64,128,256 (64,128,256,512 with --gamma-sweep).
    /// Narrower students than the teacher (64) cannot fit it, and their sigma_max answers to that as well.
    #[arg(long, value_delimiter = ',')]
    widths: Option<Vec<i64>>,
    /// Rules to compare (presets or gamma=G). Default: paper, mup-coupled, mup-fixed-wd, standard.
    #[arg(long, value_delimiter = ',')]
    rules: Option<Vec<String>>,
    /// Run the μP path at gamma = --gammas instead of the presets, and fit gamma*.
    #[arg(long)]
    gamma_sweep: bool,
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1")]
    gammas: Vec<f64>,
    /// Decay horizon H = Σ lr_t·wd_t of the hidden matrix at which every run stops.
    #[arg(long, default_value_t = 8.0)]
    horizon: f64,
    /// Train every run exactly this many steps instead of until the horizon: equal data for every width
    /// (then the narrower or faster-decaying runs end past the horizon; every run's H is printed).
    #[arg(long)]
    steps: Option<u64>,
    /// Linear warmup steps before the constant lr.
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Base (proxy) learning rate.
    #[arg(long, default_value_t = 2e-2)]
    lr: f64,
    /// Base (proxy) weight decay.
    #[arg(long, default_value_t = 1.0)]
    wd: f64,
    /// Adam's beta2. 0.95 (LLaMA's): at 0.999 the second moment remembers 1000 steps, longer than a whole
    /// run at these rates, and a 10× smaller init is not forgotten by H = 6 (30–45% off, measured).
    #[arg(long, default_value_t = 0.95)]
    beta2: f64,
    #[arg(long, default_value_t = 64)]
    batch: i64,
    /// What the (2·lr, 2·wd) check doubles: `hidden` (that matrix's own lr and wd, what the law is about) or
    /// `all` (the base lr and wd of the whole run).
    #[arg(long, value_enum, default_value = "hidden")]
    double: DoubleScope,
    /// Skip the 10×-smaller-init and (2·lr, 2·wd) check runs.
    #[arg(long)]
    no_checks: bool,
    /// Write report.md and measurements.json (the `gainguard calibrate` format) here.
    #[arg(long)]
    out: Option<PathBuf>,
}

const D_IN: i64 = 32;
const D_OUT: i64 = 8;
const TEACHER_WIDTH: i64 = 64;
const PARAM: &str = "hidden.weight";
/// sigma_max samples per timescale over the last two timescales of a run.
const SAMPLES_PER_TIMESCALE: f64 = 16.0;
/// Check bars: a steady state forgets its init and depends on lr/wd alone, within 5%; it no longer drifts, within 3%.
const SAME_WITHIN: f64 = 0.05;
const DRIFT_BELOW: f64 = 0.03;
const BOOTSTRAP_RESAMPLES: usize = 2000;

fn rms_norm(x: &Tensor) -> Tensor {
    x * (x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + 1e-6).rsqrt()
}

fn linear(vs: nn::Path, i: i64, o: i64) -> nn::Linear {
    nn::linear(vs, i, o, nn::LinearConfig { bias: false, ..Default::default() })
}

/// The network at width `d`, its readout divided by `d / base`.
fn network(vs: nn::Path, d: i64, base: i64) -> impl Module {
    let w_in = linear(&vs / "w_in", D_IN, d);
    let hidden = linear(&vs / "hidden", d, d);
    let readout = mu_readout(&vs / "readout", d, D_OUT, base, false);
    nn::func(move |x| rms_norm(&rms_norm(&x.apply(&w_in)).apply(&hidden)).relu().apply(&readout))
}

fn sigma_max(t: &Tensor) -> f64 {
    let (_, s, _) = t.to_kind(Kind::Double).svd(true, false);
    s.max().double_value(&[])
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum DoubleScope {
    Hidden,
    All,
}

/// The variations of one (rule, width, seed) cell.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    Main,
    /// The hidden matrix's init multiplied by 0.1.
    SmallInit,
    /// Base lr and wd both doubled.
    Doubled,
}

#[derive(Clone, Debug)]
struct RunResult {
    steps: u64,
    horizon: f64,
    sigma: f64,
    drift: f64,
    tail_loss: f64,
}

struct Setup<'a> {
    args: &'a Args,
    base: i64,
    base_shapes: BaseShapes,
    teacher: Box<dyn Module>,
}

impl Setup<'_> {
    fn run(&self, rule: Rule, d: i64, seed: u64, variant: Variant) -> Result<RunResult> {
        let a = self.args;
        let doubled = |scope| if variant == Variant::Doubled && a.double == scope { 2.0 } else { 1.0 };
        tch::manual_seed(1000 * seed as i64 + d);
        let vs = nn::VarStore::new(Device::Cpu);
        let student = network(vs.root(), d, self.base);
        if variant == Variant::SmallInit {
            tch::no_grad(|| {
                let _ = vs.variables()[PARAM].shallow_clone().g_mul_scalar_(0.1);
            });
        }
        let schedule = warmup_then_constant(a.warmup);
        let readout = Override { role: Some(ParamRole::Readout), ..Override::new("readout.weight") };
        let (scale_hidden, scale_all) = (doubled(DoubleScope::Hidden), doubled(DoubleScope::All));
        let hidden = Override { lr_multiplier: Some(scale_hidden), wd_multiplier: Some(scale_hidden), ..Override::new(PARAM) };
        let config = AdamWConfig {
            lr: a.lr * scale_all,
            weight_decay: a.wd * scale_all,
            rule,
            overrides: vec![readout, hidden],
            schedule: schedule.clone(),
            beta2: a.beta2,
            ..Default::default()
        };
        let mut opt = WidthScaledAdamW::new(&vs, &self.base_shapes, config)?;
        let hidden = opt.plan().get(PARAM).context("hidden.weight is planned")?.clone();
        if hidden.class != ParamClass::MatrixLike || hidden.width_multiplier != d as f64 / self.base as f64 {
            bail!("{PARAM} planned as {:?} with m = {}, expected matrix-like with m = {}", hidden.class, hidden.width_multiplier, d as f64 / self.base as f64);
        }
        let rate = HorizonRate::new(hidden.lr, hidden.weight_decay, opt.config().decay, opt.config().schedule_weight_decay);
        let steps = match a.steps {
            Some(n) => n,
            None => rate
                .steps_to_reach(&schedule, a.horizon, 50_000_000)
                .with_context(|| format!("H = {} is out of reach at lr·wd = {:e}", a.horizon, rate.per_step))?,
        };
        let final_horizon = rate.after(&schedule, steps);
        let timescale = rate.timescale_steps();
        let every = ((timescale / SAMPLES_PER_TIMESCALE).floor() as u64).max(1);
        let weights = vs.variables()[PARAM].shallow_clone();
        let (mut trace, mut tail) = (SteadyStateTrace::default(), Vec::new());
        for step in 0..steps {
            let x = Tensor::randn([a.batch, D_IN], (Kind::Float, Device::Cpu));
            let y = tch::no_grad(|| self.teacher.forward(&x));
            let loss = (student.forward(&x) - y).pow_tensor_scalar(2).mean(Kind::Float);
            opt.zero_grad();
            loss.backward();
            opt.step();
            let horizon = opt.decay_horizon(PARAM).context("the optimizer counts hidden.weight's horizon")?;
            if horizon > final_horizon - 2.0 && ((steps - 1 - step) % every == 0) {
                trace.push(horizon, sigma_max(&weights));
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
        Ok(RunResult {
            steps,
            horizon,
            sigma: trace.last_timescale_mean(horizon).context("no sigma_max sample in the last timescale")?,
            drift: trace.drift(horizon).unwrap_or(f64::NAN),
            tail_loss: mean(&tail),
        })
    }
}

/// One (rule, width) cell: a run per seed, and the checks on seed 0.
struct Cell {
    d: i64,
    seeds: Vec<RunResult>,
    small_init: Option<RunResult>,
    doubled: Option<RunResult>,
}

impl Cell {
    fn sigmas(&self) -> Vec<f64> {
        self.seeds.iter().map(|r| r.sigma).collect()
    }

    /// (name, relative difference or drift, passes) for each check.
    fn checks(&self) -> Vec<(&'static str, f64, bool)> {
        let reference = self.seeds[0].sigma;
        let mut out = Vec::new();
        if let Some(r) = &self.small_init {
            let diff = r.sigma / reference - 1.0;
            out.push(("init/10", diff, diff.abs() < SAME_WITHIN));
        }
        if let Some(r) = &self.doubled {
            let diff = r.sigma / reference - 1.0;
            out.push(("2lr,2wd", diff, diff.abs() < SAME_WITHIN));
        }
        let drift = self.seeds[0].drift;
        out.push(("drift", drift, drift.abs() < DRIFT_BELOW));
        out
    }
}

struct RuleRow {
    label: String,
    rule: Rule,
    cells: Vec<Cell>,
}

impl RuleRow {
    fn means(&self) -> Vec<f64> {
        self.cells.iter().map(|c| mean(&c.sigmas())).collect()
    }

    fn seed_cells(&self) -> Vec<Vec<f64>> {
        self.cells.iter().map(|c| c.sigmas()).collect()
    }

    fn spread(&self) -> f64 {
        gainguard::fit::spread(&self.means())
    }

    fn spread_interval(&self) -> Option<(f64, f64)> {
        let spread = |c: &[Vec<f64>]| gainguard::fit::spread(&c.iter().map(|v| mean(v)).collect::<Vec<_>>());
        bootstrap_interval(&self.seed_cells(), spread, BOOTSTRAP_RESAMPLES, 0.95, 17)
    }
}

/// Least-squares slope of `ln sigma` on `ln m`.
fn log_slope(ms: &[f64], sigmas: &[f64]) -> f64 {
    let xs: Vec<f64> = ms.iter().map(|m| m.ln()).collect();
    let ys: Vec<f64> = sigmas.iter().map(|s| s.ln()).collect();
    let (mx, my) = (mean(&xs), mean(&ys));
    let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    sxy / sxx
}

fn main() -> Result<()> {
    let a = Args::parse();
    // One thread: the models are small, and two threads stall badly on a shared 2-core machine.
    tch::set_num_threads(1);
    let widths = a.widths.clone().unwrap_or_else(|| if a.gamma_sweep { vec![64, 128, 256, 512] } else { vec![64, 128, 256] });
    let base = *widths.first().context("--widths is empty")?;
    if widths.len() < 2 || a.seeds == 0 || !(a.horizon >= 2.0) {
        bail!("need at least 2 widths, 1 seed and --horizon >= 2 (the drift check compares the last two timescales)");
    }
    let rules: Vec<(String, Rule)> = if a.gamma_sweep {
        a.gammas.iter().map(|&g| Ok((format!("gamma={g}"), Rule::custom(g, 1.0)?))).collect::<Result<_>>()?
    } else {
        let names = a.rules.clone().unwrap_or_else(|| Preset::ALL.iter().map(|p| p.name().to_string()).collect());
        names.iter().map(|n| Ok((n.clone(), Rule::parse(n)?))).collect::<Result<_>>()?
    };
    // Base and delta shapes (the model at twice the base width), as mup's set_base_shapes: the delta
    // declares which dimensions are widths, so the hidden matrix is matrix-like at m = 1 too.
    let (base_vs, delta_vs) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let _ = network(base_vs.root(), base, base);
    let _ = network(delta_vs.root(), 2 * base, base);
    tch::manual_seed(12345);
    let mut teacher_vs = nn::VarStore::new(Device::Cpu);
    let teacher = network(teacher_vs.root(), TEACHER_WIDTH, TEACHER_WIDTH);
    teacher_vs.freeze();
    let setup = Setup { args: &a, base, base_shapes: BaseShapes::from_var_stores(&base_vs, &delta_vs), teacher: Box::new(teacher) };

    let mut text = String::new();
    let header = protocol_header(&a, &widths, base);
    print!("{header}");
    text.push_str(&header);
    let line = format!(
        "\n{:<14} {:>5} {:>5} {:>7} {:>6}  {:<26} {:>7}  {:>13} {:>13} {:>13}\n",
        "rule", "d", "m", "steps", "H", "sigma_max per seed", "mean", "init/10", "2lr,2wd (H)", "drift"
    );
    print!("{line}");
    text.push_str(&line);

    let mut rows = Vec::new();
    for (label, rule) in &rules {
        let mut cells = Vec::new();
        for &d in &widths {
            let seeds = (0..a.seeds).map(|s| setup.run(*rule, d, s, Variant::Main)).collect::<Result<Vec<_>>>()?;
            let (small_init, doubled) = if a.no_checks {
                (None, None)
            } else {
                (Some(setup.run(*rule, d, 0, Variant::SmallInit)?), Some(setup.run(*rule, d, 0, Variant::Doubled)?))
            };
            let cell = Cell { d, seeds, small_init, doubled };
            let line = cell_row(label, &cell, base);
            print!("{line}");
            text.push_str(&line);
            cells.push(cell);
        }
        rows.push(RuleRow { label: label.clone(), rule: *rule, cells });
    }

    let summary = summary_table(&rows, &widths);
    print!("{summary}");
    text.push_str(&summary);
    let sweep = if a.gamma_sweep { gamma_fit(&rows, &widths, base)? } else { String::new() };
    print!("{sweep}");
    text.push_str(&sweep);

    if let Some(dir) = &a.out {
        write_outputs(dir, &a, &rows, &text)?;
    }
    Ok(())
}

/// What a run of this program measured and how: widths, hyper-parameters and the steady-state protocol.
fn protocol_header(a: &Args, widths: &[i64], base: i64) -> String {
    format!(
        "teacher–student FFN, student widths {widths:?} (base {base}), teacher width {TEACHER_WIDTH}, base lr {}, base wd {}, batch {}\n\
         steady-state protocol: constant lr after a {}-step warmup; {}\n\
         H = Σ lr_t·wd_t (width-scaled, schedule included){}; sigma_max = mean over the last timescale\n\
         (float64 SVD, {SAMPLES_PER_TIMESCALE} samples per timescale); {} seed(s) per cell; checks on seed 0\n",
        a.lr,
        a.wd,
        a.batch,
        a.warmup,
        match a.steps {
            Some(n) => format!("every run trains {n} steps (equal data); {PARAM}'s decay horizon"),
            None => format!("each run stops when {PARAM}'s decay horizon"),
        },
        if a.steps.is_some() { " is printed per run".to_string() } else { format!(" reaches {}", a.horizon) },
        a.seeds
    )
}

/// One (rule, width) cell: steps, H, sigma_max per seed, their mean and the protocol's three checks.
fn cell_row(label: &str, cell: &Cell, base: i64) -> String {
    let first = &cell.seeds[0];
    let checks = cell.checks();
    let check = |name: &str| {
        checks.iter().find(|c| c.0 == name).map_or("-".to_string(), |c| format!("{:+.1}% {}", 100.0 * c.1, if c.2 { "ok" } else { "FAIL" }))
    };
    let doubled_h = cell.doubled.as_ref().map_or(String::new(), |r| format!(" ({:.2})", r.horizon));
    format!(
        "{:<14} {:>5} {:>5} {:>7} {:>6.2}  {:<26} {:>7.4}  {:>13} {:>13} {:>13}\n",
        label,
        cell.d,
        cell.d as f64 / base as f64,
        first.steps,
        first.horizon,
        cell.sigmas().iter().map(|s| format!("{s:.4}")).collect::<Vec<_>>().join(" "),
        mean(&cell.sigmas()),
        check("init/10"),
        format!("{}{doubled_h}", check("2lr,2wd")),
        check("drift"),
    )
}

fn summary_table(rows: &[RuleRow], widths: &[i64]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\nsigma_max of {PARAM} at steady state (mean of the seeds) and its spread across widths (max/min; 1 = width-invariant gain):");
    let _ = writeln!(
        s,
        "{:<14} {}  {:>7}  {:>16}  {:>11}  {}",
        "rule",
        widths.iter().map(|w| format!("{:>8}", format!("d={w}"))).collect::<String>(),
        "spread",
        "95% bootstrap",
        "H min–max",
        "tail loss per width"
    );
    let (mut passed, mut total) = (0, 0);
    for row in rows {
        let (lo, hi) = row.spread_interval().unwrap_or((f64::NAN, f64::NAN));
        let hs: Vec<f64> = row.cells.iter().flat_map(|c| c.seeds.iter().map(|r| r.horizon)).collect();
        let losses: Vec<String> = row.cells.iter().map(|c| format!("{:.4}", mean(&c.seeds.iter().map(|r| r.tail_loss).collect::<Vec<_>>()))).collect();
        let _ = writeln!(
            s,
            "{:<14} {}  {:>7.3}  {:>16}  {:>11}  {}",
            row.label,
            row.means().iter().map(|m| format!("{m:>8.4}")).collect::<String>(),
            row.spread(),
            format!("[{lo:.3}, {hi:.3}]"),
            format!("{:.2}–{:.2}", hs.iter().copied().fold(f64::INFINITY, f64::min), hs.iter().copied().fold(0.0, f64::max)),
            losses.join("/")
        );
        for c in &row.cells {
            for (_, _, ok) in c.checks() {
                total += 1;
                passed += usize::from(ok);
            }
        }
    }
    let _ = writeln!(
        s,
        "checks: {passed} of {total} pass (init/10 and (2lr,2wd): sigma_max within {:.0}% of seed 0; drift: last timescale within {:.0}% of the one before)",
        100.0 * SAME_WITHIN,
        100.0 * DRIFT_BELOW
    );
    s
}

/// gamma*: where the slope of ln sigma_max on ln m crosses zero, with a bootstrap interval over seeds.
fn gamma_fit(rows: &[RuleRow], widths: &[i64], base: i64) -> Result<String> {
    let ms: Vec<f64> = widths.iter().map(|&w| w as f64 / base as f64).collect();
    let gammas: Vec<f64> = rows.iter().map(|r| r.rule.gamma).collect();
    let slopes: Vec<f64> = rows.iter().map(|r| log_slope(&ms, &r.means())).collect();
    let gamma_star = gainguard::fit::zero_crossing(&gammas, &slopes).unwrap_or(f64::NAN);
    let cells: Vec<Vec<f64>> = rows.iter().flat_map(|r| r.seed_cells()).collect();
    let k = widths.len();
    let statistic = |c: &[Vec<f64>]| {
        let slopes: Vec<f64> = c.chunks(k).map(|row| log_slope(&ms, &row.iter().map(|v| mean(v)).collect::<Vec<_>>())).collect();
        gainguard::fit::zero_crossing(&gammas, &slopes).unwrap_or(f64::NAN)
    };
    let interval = bootstrap_interval(&cells, statistic, BOOTSTRAP_RESAMPLES, 0.95, 23);
    let mut s = String::new();
    let _ = writeln!(s, "\nslope of ln sigma_max on ln m along the μP path (lr ∝ 1/m, wd ∝ m^gamma); the law predicts alpha − (1 + gamma)/2:");
    let _ = writeln!(s, "{:>8}  {:>9}  {:>13}", "gamma", "slope", "implied alpha");
    for (g, sl) in gammas.iter().zip(&slopes) {
        let _ = writeln!(s, "{g:>8.2}  {sl:>+9.4}  {:>13.3}", sl + (1.0 + g) / 2.0);
    }
    match interval {
        Some((lo, hi)) if gamma_star.is_finite() => {
            let _ = writeln!(s, "gamma* = {gamma_star:.3}, 95% bootstrap interval [{lo:.3}, {hi:.3}] (the paper's rule: 0.5)");
        }
        _ => {
            let _ = writeln!(s, "gamma*: the slope does not cross zero within gamma {:?}", gammas);
        }
    }
    Ok(s)
}

fn write_outputs(dir: &std::path::Path, a: &Args, rows: &[RuleRow], text: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut measurements = Vec::new();
    for row in rows.iter().filter(|r| r.rule.reported_gamma().is_some() && r.rule.lr_exponent == 1.0) {
        for c in &row.cells {
            for (seed, r) in c.seeds.iter().enumerate() {
                measurements.push(gainguard::fit::Measurement {
                    decay_horizon: Some(r.horizon),
                    steps: Some(r.steps),
                    schedule: Some(format!("linear warmup {} steps, then constant", a.warmup)),
                    seed: Some(seed as u64),
                    ..gainguard::fit::Measurement::new(c.d as f64, row.rule.gamma, a.lr, a.wd, PARAM, r.sigma)
                });
            }
        }
    }
    std::fs::write(dir.join("measurements.json"), serde_json::to_string_pretty(&measurements)? + "\n")?;
    plot_sigma_vs_width(&dir.join("sigma_vs_width.png"), a, rows)?;
    if a.gamma_sweep {
        plot_slope_vs_gamma(&dir.join("slope_vs_gamma.png"), rows)?;
    }
    let command = std::iter::once("cargo run --release --example teacher_student --".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ");
    let plots = if a.gamma_sweep { "![sigma_max vs width](sigma_vs_width.png)\n\n![slope vs gamma](slope_vs_gamma.png)\n" } else { "![sigma_max vs width](sigma_vs_width.png)\n" };
    std::fs::write(dir.join("report.md"), format!("# teacher–student at steady state\n\nCommand: `{command}`\n\n```text\n{text}```\n\n{plots}"))?;
    println!("\nwrote {}/report.md, measurements.json and the plots", dir.display());
    Ok(())
}

/// sigma_max at steady state against width, one series per rule, with the seeds' standard deviation.
fn plot_sigma_vs_width(path: &std::path::Path, a: &Args, rows: &[RuleRow]) -> Result<()> {
    let series = rows
        .iter()
        .map(|row| {
            let points = row.cells.iter().map(|c| (c.d as f64, mean(&c.sigmas()))).collect();
            let sd = row
                .cells
                .iter()
                .map(|c| {
                    let (m, v) = (mean(&c.sigmas()), c.sigmas());
                    (v.iter().map(|s| (s - m).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64).sqrt()
                })
                .collect();
            plot::Series { y_err: Some(sd), ..plot::Series::new(format!("{} (spread {:.2})", row.label, row.spread()), points) }
        })
        .collect();
    let panel = plot::Panel { title: format!("{PARAM}: sigma_max at decay horizon H = {} (mean of {} seeds ± sd)", a.horizon, a.seeds), series, hlines: vec![] };
    let axes = plot::Axes { x_label: "student width d", y_label: "sigma_max (steady state)", log_x: true, log_y: true };
    plot::plot_panels(path, "teacher–student: steady-state sigma_max vs width", axes, &[panel], 1)
}

/// The slope of ln sigma_max on ln m against gamma; gamma* is where it crosses 0.
fn plot_slope_vs_gamma(path: &std::path::Path, rows: &[RuleRow]) -> Result<()> {
    let base = rows[0].cells[0].d as f64;
    let ms: Vec<f64> = rows[0].cells.iter().map(|c| c.d as f64 / base).collect();
    let measured = rows.iter().map(|r| (r.rule.gamma, log_slope(&ms, &r.means()))).collect();
    let panel = plot::Panel {
        title: "slope of ln sigma_max on ln m along the μP path (0: width-invariant)".into(),
        series: vec![
            plot::Series::new("measured", measured),
            plot::Series::new("the law with alpha = 0.75: 0.75 − (1 + gamma)/2", vec![(0.0, 0.25), (1.0, -0.25)]),
        ],
        hlines: vec![("flat in width".into(), 0.0)],
    };
    let axes = plot::Axes { x_label: "gamma (wd ∝ m^gamma, lr ∝ 1/m)", y_label: "slope", log_x: false, log_y: false };
    plot::plot_panels(path, "teacher–student: where sigma_max stops depending on width", axes, &[panel], 1)
}

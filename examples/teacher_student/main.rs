//! The paper's minimal synthetic setting (arXiv 2510.15262), measured at AdamW's steady state.
//!
//! A teacher–student feed-forward network whose hidden matrix sits behind a ReLU and in front of an RMSNorm:
//! it is a hidden layer (a batch of its inputs has full rank) and scale-invariant, so AdamW with weight decay
//! alone sets its scale. Trained with gainguard's `WidthScaledAdamW` at several widths under each rule, it
//! prints per width and rule the hidden matrix's sigma_max, ‖W‖_F and stable rank `‖W‖_F²/sigma_max²` at
//! steady state, its decay horizon H, and the spread of sigma_max across widths.
//!
//! ```text
//! cargo run --release --example teacher_student                       # 4 rules, widths 64..256, 3 seeds
//! cargo run --release --example teacher_student -- --gamma-sweep --out DIR
//! cargo run --release --example teacher_student -- --regime-map --out docs/experiments/teacher-student-regime
//! cargo run --release --example teacher_student -- --regime-merge DIR1,DIR2 --out DIR   # join parts of one grid
//! cargo run --release --example teacher_student -- --model rank-capped --gamma-sweep   # the rank-capped illustration
//! ```
//!
//! **Steady-state protocol** (`gainguard::steady_state`). The law `sigma_max ≈ c·sqrt(lr/wd)·d^alpha` is
//! about the state weight decay reaches after several of its timescales, `1/(lr·wd)` steps each. So:
//! - the lr is constant after a short linear warmup;
//! - every run stops when its hidden matrix's decay horizon `H = Σ_t lr_t·wd_t` (width-scaled values,
//!   schedule included) reaches `--horizon` (8): under `lr ∝ 1/m, wd ∝ m^gamma` a wider run takes
//!   `m^(1−gamma)` times as many steps;
//! - its readings are averaged over the last timescale (`H − 1 < h ≤ H`), from a float64 SVD;
//! - three checks are printed beside each reading: the same run from a 10× smaller init of the hidden
//!   matrix lands within 5% (the initialisation is forgotten); the same run at `(2·lr, 2·wd)` lands within
//!   5% (only `lr/wd` sets the scale, as the law says); the last timescale's mean is within 3% of the one
//!   before (no drift left);
//! - `--seeds` (3) seeds per cell; spreads and gamma* carry a 95% percentile-bootstrap interval over the seeds.
//!
//! `--gamma-sweep` runs the μP path (`lr ∝ 1/m`, `wd ∝ m^gamma`) at gamma ∈ `--gammas` and finds gamma*, the
//! gamma where sigma_max is flat in width (the slope of `ln sigma_max` on `ln m` crosses zero). Every sweep
//! prints the decomposition `slope(sigma_max) = slope(‖W‖_F) − ½·slope(stable rank)`.
//!
//! `--regime-map` repeats the gamma sweep over batch × `lr·wd` (at the fixed `lr/wd` of `--lr`/`--wd`) × H and
//! draws gamma* and the stable-rank exponent as heatmaps (`regime.rs`).
//!
//! Teacher: the same architecture at width 64 with fixed random weights. The loss is the mean squared error
//! to the teacher's output on fresh Gaussian inputs.

mod model;
mod regime;
mod run;
mod sweep;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use gainguard::steady_state::mean;
use gainguard::{Preset, Rule};
use gainguard_examples::plot;

use model::{Model, PARAM, TEACHER_WIDTH};
use run::{DoubleScope, Regime, Setup};
use sweep::{ExtraRuns, RuleRow};

#[derive(Parser)]
#[command(about = "Teacher–student FFN: sigma_max, ‖W‖_F and stable rank of the hidden matrix per width and rule, at AdamW's steady state")]
pub struct Args {
    /// `hidden`: a ReLU and an RMSNorm between W_in and W_hidden, so the hidden matrix sees a full-rank input.
    /// `rank-capped`: the earlier model without the ReLU, an illustration of a hidden matrix confined to d_in = 32
    /// input directions (its stable rank cannot grow with width).
    #[arg(long, value_enum, default_value = "hidden")]
    model: Model,
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
    /// The gamma sweep at every point of --batches × --lr-wd × --horizons, and heatmaps of gamma* and of the
    /// stable-rank exponent (checks: drift only, unless --regime-checks).
    #[arg(long)]
    regime_map: bool,
    /// Regime map: batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    batches: Vec<i64>,
    /// Regime map: base lr·wd products, each at the fixed lr/wd = --lr / --wd.
    #[arg(long, value_delimiter = ',', default_value = "0.01,0.02,0.04")]
    lr_wd: Vec<f64>,
    /// Regime map: decay horizons.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    horizons: Vec<f64>,
    /// Regime map: also run the 10×-smaller-init check on seed 0 of every cell.
    #[arg(long)]
    regime_checks: bool,
    /// Join the regime.json of these --regime-map runs (each a part of the grid, e.g. one per process) into
    /// one report and heatmaps in --out; give the full grid's --batches, --lr-wd and --horizons.
    #[arg(long, value_delimiter = ',')]
    regime_merge: Option<Vec<PathBuf>>,
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

fn main() -> Result<()> {
    let a = Args::parse();
    // One thread: the models are small, and two threads stall badly on a shared 2-core machine.
    tch::set_num_threads(1);
    let widths = a.widths.clone().unwrap_or_else(|| if a.gamma_sweep { vec![64, 128, 256, 512] } else { vec![64, 128, 256] });
    let base = *widths.first().context("--widths is empty")?;
    if widths.len() < 2 || a.seeds == 0 || !(a.horizon >= 2.0) {
        bail!("need at least 2 widths, 1 seed and --horizon >= 2 (the drift check compares the last two timescales)");
    }
    if let Some(parts) = &a.regime_merge {
        return regime::merge(&a, &widths, parts);
    }
    let setup = Setup::new(a.model, base, a.warmup, a.beta2, a.double, a.steps);
    if a.regime_map {
        return regime::run(&a, &setup, &widths);
    }
    let rules: Vec<(String, Rule)> = if a.gamma_sweep {
        a.gammas.iter().map(|&g| Ok((format!("gamma={g}"), Rule::custom(g, 1.0)?))).collect::<Result<_>>()?
    } else {
        let names = a.rules.clone().unwrap_or_else(|| Preset::ALL.iter().map(|p| p.name().to_string()).collect());
        names.iter().map(|n| Ok((n.clone(), Rule::parse(n)?))).collect::<Result<_>>()?
    };
    let regime = Regime { lr: a.lr, wd: a.wd, batch: a.batch, horizon: a.horizon };

    let mut text = String::new();
    let mut say = |s: &str| {
        print!("{s}");
        text.push_str(s);
    };
    say(&protocol_header(&a, &widths, base));
    say(&sweep::cell_header());
    let extra = ExtraRuns { small_init: !a.no_checks, doubled: !a.no_checks };
    let rows = sweep::run_rows(&setup, &rules, &widths, regime, a.seeds, extra, &mut say)?;
    say(&sweep::summary_table(&rows, &widths, PARAM));
    say(&sweep::decomposition_table(&rows));
    if a.gamma_sweep {
        say(&sweep::gamma_fit_text(&rows));
    }
    if let Some(dir) = &a.out {
        write_outputs(dir, &a, &rows, &text)?;
    }
    Ok(())
}

/// What a run of this program measured and how: model, widths, hyper-parameters and the steady-state protocol.
fn protocol_header(a: &Args, widths: &[i64], base: i64) -> String {
    format!(
        "teacher–student FFN: {}\nstudent widths {widths:?} (base {base}), teacher width {TEACHER_WIDTH}, base lr {}, base wd {}, batch {}\n\
         steady-state protocol: constant lr after a {}-step warmup; {}\n\
         H = Σ lr_t·wd_t (width-scaled, schedule included){}; readings = mean over the last timescale\n\
         (float64 SVD, 16 samples per timescale); {} seed(s) per cell; checks on seed 0\n",
        a.model.describe(),
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

/// The calibrate-format entries of a set of rows, with the checks of seed 0.
pub fn measurements(rows: &[RuleRow], lr: f64, wd: f64, warmup: u64) -> Vec<gainguard::fit::Measurement> {
    let mut out = Vec::new();
    for row in rows.iter().filter(|r| r.rule.reported_gamma().is_some() && r.rule.lr_exponent == 1.0) {
        for c in &row.cells {
            for (seed, r) in c.seeds.iter().enumerate() {
                let checks = c.checks();
                let find = |name| checks.iter().find(|x| x.0 == name).map(|x| x.1);
                let checks = gainguard::fit::SteadyStateChecks {
                    drift: r.drift.is_finite().then_some(r.drift),
                    small_init: if seed == 0 { find("init/10") } else { None },
                    doubled_lr_wd: if seed == 0 { find("2lr,2wd") } else { None },
                };
                out.push(gainguard::fit::Measurement {
                    decay_horizon: Some(r.horizon),
                    steps: Some(r.steps),
                    schedule: Some(format!("linear warmup {warmup} steps, then constant")),
                    seed: Some(seed as u64),
                    checks: Some(checks),
                    ..gainguard::fit::Measurement::new(c.d as f64, row.rule.gamma, lr, wd, PARAM, r.sigma)
                });
            }
        }
    }
    out
}

fn write_outputs(dir: &Path, a: &Args, rows: &[RuleRow], text: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ms = measurements(rows, a.lr, a.wd, a.warmup);
    std::fs::write(dir.join("measurements.json"), serde_json::to_string_pretty(&ms)? + "\n")?;
    plot_sigma_vs_width(&dir.join("sigma_vs_width.png"), a, rows)?;
    if a.gamma_sweep {
        plot_slope_vs_gamma(&dir.join("slope_vs_gamma.png"), rows, a.horizon)?;
    }
    let command = std::iter::once("cargo run --release --example teacher_student --".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ");
    let plots = if a.gamma_sweep { "![sigma_max vs width](sigma_vs_width.png)\n\n![slope vs gamma](slope_vs_gamma.png)\n" } else { "![sigma_max vs width](sigma_vs_width.png)\n" };
    std::fs::write(dir.join("report.md"), format!("# teacher–student at steady state\n\nCommand: `{command}`\n\n```text\n{text}```\n\n{plots}"))?;
    println!("\nwrote {}/report.md, measurements.json and the plots", dir.display());
    Ok(())
}

/// sigma_max at steady state against width, one series per rule, with the seeds' standard deviation.
fn plot_sigma_vs_width(path: &Path, a: &Args, rows: &[RuleRow]) -> Result<()> {
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

/// The slopes of ln sigma_max, ln ‖W‖_F and ln(stable rank) on ln m against gamma; gamma* is where the first
/// crosses 0.
fn plot_slope_vs_gamma(path: &Path, rows: &[RuleRow], horizon: f64) -> Result<()> {
    let at = |f: fn(&sweep::Slopes) -> f64| rows.iter().map(|r| (r.rule.gamma, f(&r.slopes()))).collect();
    let panel = plot::Panel {
        title: format!("slopes on ln m along the μP path at H = {horizon} (0: width-invariant)"),
        series: vec![
            plot::Series::new("sigma_max", at(|s| s.sigma)),
            plot::Series::new("‖W‖_F", at(|s| s.frobenius)),
            plot::Series::new("−½ · stable rank", at(|s| -0.5 * s.stable_rank)),
            plot::Series::new("the law with alpha = 0.75: 0.75 − (1 + gamma)/2", vec![(0.0, 0.25), (1.0, -0.25)]),
        ],
        hlines: vec![("flat in width".into(), 0.0)],
    };
    let axes = plot::Axes { x_label: "gamma (wd ∝ m^gamma, lr ∝ 1/m)", y_label: "slope on ln m", log_x: false, log_y: false };
    plot::plot_panels(path, "teacher–student: where sigma_max stops depending on width", axes, &[panel], 1)
}

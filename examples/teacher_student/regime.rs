//! gamma* over the regime: the gamma sweep repeated at every batch size × base `lr·wd` (at fixed `lr/wd`) ×
//! decay horizon, with gamma* and the stable-rank exponent drawn as heatmaps.
//!
//! Batch sets the gradient noise, `lr·wd` the number of steps per timescale (the law's `sqrt(lr/wd)` is
//! the same at every point of one map), H how long the steady state has had. gamma* is the plugin's
//! [`gainguard::fit::calibrate_gamma`] (a line through the per-gamma slopes, its zero crossing; outside the
//! measured gammas it is an extrapolation and marked so) with a percentile-bootstrap interval over the seeds
//! ([`gainguard::fit::bootstrap_gamma`]); the stable-rank exponent is the slope of ln(stable rank) on ln m,
//! interpolated between the measured gammas at gamma*, on the same resamples.
//!
//! Points run cheapest first and the report, `regime.json` and the heatmaps are rewritten after each, so a
//! cut-short run keeps what it measured. `--regime-merge DIR,DIR,...` joins the `regime.json` of runs that
//! each measured part of the grid (two processes on two cores) into one report and one pair of heatmaps.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use gainguard::fit::{self, MupPoint};
use gainguard::steady_state::mean;
use gainguard::Rule;
use gainguard_examples::plot;

use crate::model::PARAM;
use crate::run::{Regime, RunResult, Setup};
use crate::sweep::{self, interpolate, ExtraRuns, RuleRow, DRIFT_BELOW, SAME_WITHIN};
use crate::Args;

const RESAMPLES: usize = 2000;
const BOOTSTRAP_SEED: u64 = 23;

/// One point of the map.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Point {
    batch: i64,
    lr_wd: f64,
    lr: f64,
    wd: f64,
    horizon: f64,
    gamma: Gamma,
    /// Per gamma: the slopes on ln m of ln sigma_max, ln ‖W‖_F, ln(stable rank), and the identity's residual.
    slopes: Vec<(f64, f64, f64, f64, f64)>,
    cells: Vec<CellSummary>,
    cpu_s: f64,
    /// This point's section of the run log.
    log: String,
}

/// gamma* of one point.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Gamma {
    /// The zero crossing of the line through the per-gamma slopes ([`fit::calibrate_gamma`]); None when the
    /// slope does not move with gamma.
    gamma_star: Option<f64>,
    /// The crossing lies outside the measured gammas.
    extrapolated: bool,
    /// The delta method's standard error, for comparison with the bootstrap.
    gamma_se: Option<f64>,
    /// 95% percentile bootstrap over the seeds.
    interval: Option<(f64, f64)>,
    /// Resamples without a crossing, left out.
    failed: usize,
    /// Where the piecewise-linear curve through the measured slopes crosses zero (None: it does not, inside
    /// the measured gammas).
    crossing: Option<f64>,
    stable_rank_exponent: Option<f64>,
    stable_rank_interval: Option<(f64, f64)>,
}

/// One (gamma, width) cell: the seed means, and the checks.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct CellSummary {
    gamma: f64,
    d: i64,
    steps: u64,
    horizon: f64,
    sigma_max: f64,
    frobenius: f64,
    stable_rank: f64,
    /// Seed-to-seed standard deviation of the last-timescale mean of sigma_max, relative to their mean: how
    /// much one timescale's mean fluctuates at this point.
    seed_sd: f64,
    /// The protocol's drift (last timescale over the one before, minus 1) of every seed; seed 0's is the check.
    drifts: Vec<f64>,
    /// The same for the seed mean: mean over seeds of the last timescale over that of the one before.
    drift_of_mean: f64,
    /// The seed mean's drift over quarter-horizon windows: `3H/4 < h ≤ H` over `H/2 < h ≤ 3H/4`.
    quarter_drift: f64,
    /// A 10×-smaller init of the hidden matrix (seed 0): its sigma_max over seed 0's, minus 1.
    small_init: Option<f64>,
}

impl CellSummary {
    fn drift_passes(&self) -> bool {
        self.drifts[0].abs() < DRIFT_BELOW
    }

    /// Why seed 0's drift check failed: the longer windows of the seed mean still move (a transient), or
    /// they do not and one timescale's mean fluctuates by about the bar (noise).
    fn drift_verdict(&self) -> &'static str {
        if self.drift_passes() {
            "ok"
        } else if self.quarter_drift.abs() >= DRIFT_BELOW {
            "FAIL: still moving"
        } else {
            "FAIL: fluctuation"
        }
    }
}

/// User + system CPU seconds of this process, from /proc/self/stat (clock ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after: Vec<&str> = stat.rsplit_once(')').map_or("", |p| p.1).split_whitespace().collect();
    // Fields 14 and 15 (utime, stime); the first after the command name is field 3 (the state).
    let tick = |i: usize| after.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (tick(11) + tick(12)) / 100.0
}

fn summarise(rows: &[RuleRow]) -> Vec<CellSummary> {
    rows.iter()
        .flat_map(|r| {
            r.cells.iter().map(|c| {
                let of = |f: fn(&RunResult) -> f64| c.seeds.iter().map(f).collect::<Vec<_>>();
                let sigmas = of(|s| s.sigma);
                let m = mean(&sigmas);
                let sd = (sigmas.iter().map(|s| (s - m).powi(2)).sum::<f64>() / (sigmas.len().max(2) - 1) as f64).sqrt();
                CellSummary {
                    gamma: r.rule.gamma,
                    d: c.d,
                    steps: c.seeds[0].steps,
                    horizon: c.seeds[0].horizon,
                    sigma_max: m,
                    frobenius: mean(&of(|s| s.frobenius)),
                    stable_rank: mean(&of(|s| s.stable_rank)),
                    seed_sd: if sigmas.len() > 1 { sd / m } else { f64::NAN },
                    drifts: of(|s| s.drift),
                    drift_of_mean: m / mean(&of(|s| s.previous_sigma)) - 1.0,
                    quarter_drift: mean(&of(|s| s.last_quarter_sigma)) / mean(&of(|s| s.previous_quarter_sigma)) - 1.0,
                    small_init: c.small_init.as_ref().map(|s| s.sigma / c.seeds[0].sigma - 1.0),
                }
            })
        })
        .collect()
}


/// gamma* by the plugin's fit and bootstrap, and the stable-rank exponent at gamma* on the same resamples.
fn gamma(rows: &[RuleRow]) -> Result<Gamma> {
    let gammas: Vec<f64> = rows.iter().map(|r| r.rule.gamma).collect();
    // One point per (gamma, width, seed), with its run's stable rank beside it.
    let (mut points, mut seeds, mut ranks) = (Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        for c in &r.cells {
            for (s, run) in c.seeds.iter().enumerate() {
                points.push(MupPoint { group: PARAM.into(), gamma: r.rule.gamma, width: c.d as f64, sigma_max: run.sigma });
                seeds.push(s as u64);
                ranks.push(run.stable_rank);
            }
        }
    }
    // The slope of ln(stable rank) on ln d at each gamma, over the points `idx`, interpolated at `g`.
    let rank_exponent = |idx: &[usize], g: f64| -> f64 {
        let slopes: Vec<f64> = gammas
            .iter()
            .map(|&gm| {
                let xy: Vec<(String, f64, f64)> =
                    idx.iter().filter(|&&i| points[i].gamma == gm).map(|&i| (PARAM.to_string(), points[i].width.ln(), ranks[i].ln())).collect();
                fit::pooled_slope("stable rank", &xy).map_or(f64::NAN, |f| f.slope)
            })
            .collect();
        interpolate(&gammas, &slopes, g)
    };
    let crossing = fit::zero_crossing(&gammas, &rows.iter().map(|r| r.slopes().sigma).collect::<Vec<_>>());
    let calibration = match fit::calibrate_gamma(&points) {
        Ok(c) => c,
        Err(fit::FitError::FlatInGamma(_)) => {
            return Ok(Gamma {
                gamma_star: None,
                extrapolated: false,
                gamma_se: None,
                interval: None,
                failed: 0,
                crossing,
                stable_rank_exponent: None,
                stable_rank_interval: None,
            })
        }
        Err(e) => return Err(e.into()),
    };
    let all: Vec<usize> = (0..points.len()).collect();
    let boot = fit::bootstrap_gamma(&points, &seeds, RESAMPLES, 0.95, BOOTSTRAP_SEED).ok();
    let mut rank_draws: Vec<f64> = fit::seed_resamples(&points, &seeds, RESAMPLES, BOOTSTRAP_SEED)?
        .iter()
        .filter_map(|drawn| {
            let pts: Vec<MupPoint> = drawn.iter().map(|&i| points[i].clone()).collect();
            fit::line_zero(&pts).ok().flatten().map(|g| rank_exponent(drawn, g))
        })
        .filter(|v| v.is_finite())
        .collect();
    rank_draws.sort_by(f64::total_cmp);
    Ok(Gamma {
        gamma_star: Some(calibration.gamma),
        extrapolated: calibration.extrapolated,
        gamma_se: Some(calibration.gamma_se),
        interval: boot.as_ref().map(|b| b.interval),
        failed: boot.as_ref().map_or(RESAMPLES, |b| b.failed),
        crossing,
        stable_rank_exponent: Some(rank_exponent(&all, calibration.gamma)),
        stable_rank_interval: fit::percentile_interval(&rank_draws, 0.95),
    })
}

fn gamma_text(g: &Gamma) -> String {
    match g.gamma_star {
        Some(star) => format!(
            "gamma* = {star:.3}{} (line through the per-gamma slopes; delta-method se {:.3}), 95% bootstrap interval over the seeds {}{}; \
             the measured slopes cross zero {}; stable-rank exponent at gamma* {:+.3} {}\n",
            if g.extrapolated { " EXTRAPOLATED beyond the measured gammas" } else { "" },
            g.gamma_se.unwrap_or(f64::NAN),
            iv(g.interval),
            if g.failed > 0 { format!(" ({} of {RESAMPLES} resamples without a crossing left out)", g.failed) } else { String::new() },
            g.crossing.map_or("nowhere inside the measured gammas".to_string(), |c| format!("at {c:.3}")),
            g.stable_rank_exponent.unwrap_or(f64::NAN),
            iv(g.stable_rank_interval),
        ),
        None => "gamma*: the slope does not move with gamma, no crossing\n".to_string(),
    }
}

fn iv(i: Option<(f64, f64)>) -> String {
    i.map_or("—".to_string(), |(lo, hi)| format!("[{lo:.3}, {hi:.3}]"))
}

/// Per cell: the seed means, the seed-to-seed spread and every check.
fn checks_table(cells: &[CellSummary]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nper cell: seed means; seed sd = seed-to-seed sd of the last-timescale mean (relative); drift = seed 0's protocol check \
         (last timescale / the one before − 1, bar {:.0}%), then every seed's, the seed mean's, and the seed mean's over quarter-H windows; \
         init/10 = seed 0 from a 10× smaller init (bar {:.0}%)",
        100.0 * DRIFT_BELOW,
        100.0 * SAME_WITHIN
    );
    let _ = writeln!(
        s,
        "{:>6} {:>5} {:>6} {:>6} {:>9} {:>7} {:>7} {:>7}  {:<24} {:>8} {:>8} {:>9}  {}",
        "gamma", "d", "steps", "H", "sigma_max", "‖W‖_F", "s.rank", "seed sd", "drift per seed", "of mean", "quarter", "init/10", "verdict"
    );
    for c in cells {
        let _ = writeln!(
            s,
            "{:>6} {:>5} {:>6} {:>6.2} {:>9.4} {:>7.3} {:>7.2} {:>6.1}%  {:<24} {:>+7.1}% {:>+7.1}% {:>9}  drift {}{}",
            c.gamma,
            c.d,
            c.steps,
            c.horizon,
            c.sigma_max,
            c.frobenius,
            c.stable_rank,
            100.0 * c.seed_sd,
            c.drifts.iter().map(|d| format!("{:+.1}%", 100.0 * d)).collect::<Vec<_>>().join(" "),
            100.0 * c.drift_of_mean,
            100.0 * c.quarter_drift,
            c.small_init.map_or("-".to_string(), |v| format!("{:+.1}%", 100.0 * v)),
            c.drift_verdict(),
            match c.small_init {
                Some(v) if v.abs() >= SAME_WITHIN => ", init/10 FAIL",
                Some(_) => ", init/10 ok",
                None => "",
            }
        );
    }
    s
}

pub fn run(a: &Args, setup: &Setup, widths: &[i64]) -> Result<()> {
    let rules: Vec<(String, Rule)> = a.gammas.iter().map(|&g| Ok((format!("gamma={g}"), Rule::custom(g, 1.0)?))).collect::<Result<_>>()?;
    let ratio = a.lr / a.wd;
    // Cheapest first: steps ∝ H / (lr·wd), cost per step grows with the batch.
    let mut plan: Vec<(f64, f64, i64)> =
        a.horizons.iter().flat_map(|&h| a.lr_wd.iter().flat_map(move |&p| a.batches.iter().map(move |&b| (h, p, b)))).collect();
    plan.sort_by(|x, y| (x.0 / x.1 * (x.2 as f64 + 64.0)).total_cmp(&(y.0 / y.1 * (y.2 as f64 + 64.0))));
    let dir = a.out.clone().context("--regime-map writes its report: give --out DIR")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut points: Vec<Point> = Vec::new();
    for (i, &(horizon, lr_wd, batch)) in plan.iter().enumerate() {
        let regime = Regime { lr: (lr_wd * ratio).sqrt(), wd: (lr_wd / ratio).sqrt(), batch, horizon };
        let before = cpu_seconds();
        let mut log = String::new();
        let mut say = |s: &str| {
            print!("{s}");
            log.push_str(s);
        };
        say(&format!(
            "\n## point {} of {}: batch {batch}, lr·wd {lr_wd} (lr {:.4}, wd {:.4}), H = {horizon}\n{}",
            i + 1,
            plan.len(),
            regime.lr,
            regime.wd,
            sweep::cell_header()
        ));
        let extra = ExtraRuns { small_init: a.regime_checks, doubled: false };
        let rows = sweep::run_rows(setup, &rules, widths, regime, a.seeds, extra, &mut say)?;
        let cells = summarise(&rows);
        say(&checks_table(&cells));
        say(&sweep::decomposition_table(&rows));
        let g = gamma(&rows)?;
        say(&gamma_text(&g));
        let cpu_s = cpu_seconds() - before;
        say(&format!("CPU time of this point: {cpu_s:.0} s\n"));
        let slopes = rows
            .iter()
            .map(|r| {
                let s = r.slopes();
                (r.rule.gamma, s.sigma, s.frobenius, s.stable_rank, s.residual())
            })
            .collect();
        points.push(Point { batch, lr_wd, lr: regime.lr, wd: regime.wd, horizon, gamma: g, slopes, cells, cpu_s, log });
        write(&dir, a, widths, &points, plan.len(), &command())?;
    }
    Ok(())
}

fn command() -> String {
    std::iter::once("cargo run --release --example teacher_student --".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ")
}

/// Joins the `regime.json` of the runs in `parts` (each a part of the grid) into one report in `--out`.
pub fn merge(a: &Args, widths: &[i64], parts: &[PathBuf]) -> Result<()> {
    let dir = a.out.clone().context("--regime-merge writes its report: give --out DIR")?;
    let mut points: Vec<Point> = Vec::new();
    let mut commands = Vec::new();
    for p in parts {
        let file = p.join("regime.json");
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        points.extend(serde_json::from_str::<Vec<Point>>(&text).with_context(|| format!("parsing {}", file.display()))?);
        let report = std::fs::read_to_string(p.join("report.md")).unwrap_or_default();
        if let Some(c) = report.lines().find_map(|l| l.strip_prefix('`').and_then(|l| l.strip_suffix('`')).filter(|c| c.starts_with("cargo run"))) {
            commands.push(c.to_string());
        }
    }
    let planned = a.horizons.len() * a.lr_wd.len() * a.batches.len();
    commands.push(command());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write(&dir, a, widths, &points, planned, &commands.join("`\n\n`"))
}

fn write(dir: &Path, a: &Args, widths: &[i64], points: &[Point], planned: usize, command: &str) -> Result<()> {
    std::fs::write(dir.join("regime.json"), serde_json::to_string_pretty(points)? + "\n")?;
    heatmaps(dir, a, points)?;
    let cpu_s: f64 = points.iter().map(|p| p.cpu_s).sum();
    let mut r = String::new();
    let _ = writeln!(r, "# teacher–student: gamma* over the regime\n\nCommand(s):\n\n`{command}`\n");
    let _ = writeln!(
        r,
        "Model: {}. Widths {widths:?}, gammas {:?}, {} seed(s), lr/wd = {} at every point, Adam beta2 {}, warmup {} steps; \
         every run to its decay horizon H. {} of {planned} points measured; CPU time {:.1} min (user + sys of the points, one \
         libtorch thread per process).\n",
        a.model.describe(),
        a.gammas,
        a.seeds,
        a.lr / a.wd,
        a.beta2,
        a.warmup,
        points.len(),
        cpu_s / 60.0
    );
    let _ = writeln!(
        r,
        "gamma*: the zero crossing of the line through the per-gamma slopes of ln sigma_max on ln m (`gainguard::fit::calibrate_gamma`), \
         with a 95% percentile-bootstrap interval (`gainguard::fit::bootstrap_gamma`: {RESAMPLES} resamples of the seeds within every \
         (gamma, width) cell, the line refitted each time); `ext.` marks a crossing outside the measured gammas. The stable-rank \
         exponent is the slope of ln(stable rank) on ln m, interpolated at gamma*, on the same resamples. Drift: seed 0's protocol \
         check passes when |drift| < {:.0}%; a cell that fails it is `still moving` when the seed mean also drifts by {:.0}% or more over \
         quarter-H windows, `fluctuation` when it does not.\n",
        100.0 * DRIFT_BELOW,
        100.0 * DRIFT_BELOW
    );
    let _ = writeln!(
        r,
        "| H | batch | lr·wd | gamma* [95% bootstrap] | delta se | measured crossing | stable-rank exponent [95%] | drift fails (moving / fluct.) | init/10 fails | CPU s |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut sorted: Vec<&Point> = points.iter().collect();
    sorted.sort_by(|x, y| (x.horizon, x.batch, x.lr_wd).partial_cmp(&(y.horizon, y.batch, y.lr_wd)).expect("finite"));
    for p in &sorted {
        let g = &p.gamma;
        let fails = p.cells.iter().filter(|c| !c.drift_passes()).count();
        let moving = p.cells.iter().filter(|c| c.drift_verdict() == "FAIL: still moving").count();
        let init = p.cells.iter().filter(|c| c.small_init.is_some_and(|v| v.abs() >= SAME_WITHIN)).count();
        let checked = p.cells.iter().filter(|c| c.small_init.is_some()).count();
        let _ = writeln!(
            r,
            "| {} | {} | {} | {} {} | {} | {} | {} {} | {fails} of {} ({moving} / {}) | {} | {:.0} |",
            p.horizon,
            p.batch,
            p.lr_wd,
            g.gamma_star.map_or("none".into(), |v| format!("{v:.3}{}", if g.extrapolated { " ext." } else { "" })),
            iv(g.interval),
            g.gamma_se.map_or("—".into(), |v| format!("{v:.3}")),
            g.crossing.map_or("none".into(), |v| format!("{v:.3}")),
            g.stable_rank_exponent.map_or("—".into(), |v| format!("{v:+.3}")),
            iv(g.stable_rank_interval),
            p.cells.len(),
            fails - moving,
            if checked > 0 { format!("{init} of {checked}") } else { "not run".into() },
            p.cpu_s
        );
    }
    let _ = writeln!(r, "\n![gamma*](gamma_star.png)\n\n![stable-rank exponent](stable_rank_exponent.png)\n\n## Every point\n\n```text");
    for p in &sorted {
        r.push_str(&p.log);
    }
    let _ = writeln!(r, "```");
    std::fs::write(dir.join("report.md"), r)?;
    Ok(())
}

/// gamma* and the stable-rank exponent on (lr·wd, batch), one panel per H.
fn heatmaps(dir: &Path, a: &Args, points: &[Point]) -> Result<()> {
    let mut horizons = a.horizons.clone();
    horizons.sort_by(f64::total_cmp);
    let grid = |h: f64, f: &dyn Fn(&Point) -> (Option<f64>, Option<(f64, f64)>, bool)| -> Vec<Vec<Option<(f64, String)>>> {
        a.batches
            .iter()
            .map(|&b| {
                a.lr_wd
                    .iter()
                    .map(|&p| {
                        points.iter().find(|q| q.batch == b && q.lr_wd == p && q.horizon == h).map(|q| {
                            let (v, iv, ext) = f(q);
                            let v = v.unwrap_or(f64::NAN);
                            let value = if v.is_finite() { format!("{v:.2}{}", if ext { " ext." } else { "" }) } else { "no crossing".to_string() };
                            (v, iv.map_or(value.clone(), |(lo, hi)| format!("{value} [{lo:.2}, {hi:.2}]")))
                        })
                    })
                    .collect()
            })
            .collect()
    };
    let x_ticks: Vec<String> = a.lr_wd.iter().map(|p| format!("{p}")).collect();
    let y_ticks: Vec<String> = a.batches.iter().map(|b| format!("{b}")).collect();
    let maps = |f: &dyn Fn(&Point) -> (Option<f64>, Option<(f64, f64)>, bool)| -> Vec<plot::Heatmap> {
        horizons
            .iter()
            .map(|&h| plot::Heatmap {
                title: format!("decay horizon H = {h}{}", if h < 5.0 { " (a transient: H < 5)" } else { "" }),
                values: grid(h, f),
                x_ticks: x_ticks.clone(),
                y_ticks: y_ticks.clone(),
            })
            .collect()
    };
    let axes = plot::HeatmapAxes { x_label: "base lr·wd (lr/wd fixed)", y_label: "batch size", colour_label: "gamma*" };
    plot::plot_heatmaps(
        &dir.join("gamma_star.png"),
        &format!("teacher–student {PARAM}: gamma* (sigma_max flat in width), 95% bootstrap over seeds"),
        axes,
        &maps(&|q| (q.gamma.gamma_star, q.gamma.interval, q.gamma.extrapolated)),
    )?;
    let axes = plot::HeatmapAxes { colour_label: "stable-rank exponent", ..axes };
    plot::plot_heatmaps(
        &dir.join("stable_rank_exponent.png"),
        &format!("teacher–student {PARAM}: slope of ln(stable rank) on ln m at gamma*"),
        axes,
        &maps(&|q| (q.gamma.stable_rank_exponent, q.gamma.stable_rank_interval, false)),
    )
}

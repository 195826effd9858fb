//! `--gamma-sweep`: sigma_max at steady state along the μP path (`lr ∝ 1/m`, `wd ∝ m^gamma`) at each gamma
//! and width, and gamma*, where it stops depending on width, for attention and MLP matrices separately.

use std::fmt::Write as _;

use anyhow::Result;
use gainguard::fit::{self, Measurement};
use gainguard::steady_state::{bootstrap_interval, mean};
use gainguard::Rule;
use gainguard_examples::plot::{plot_panels, Axes, Panel, Series};

use crate::report::{kind_of, setup_section, short};
use crate::{Args, Plan, RunOutcome, RunRequest, Runner};

const KINDS: [&str; 2] = ["attention", "MLP"];
/// Check bars: within 5% of seed 0 (10× smaller init; 2·lr and 2·wd of the hidden matrices); drift under 3%.
const SAME_WITHIN: f64 = 0.05;
const DRIFT_BELOW: f64 = 0.03;
const BOOTSTRAP_RESAMPLES: usize = 2000;

/// One (gamma, width): a run per seed and the checks on seed 0.
struct Cell {
    gamma: f64,
    width: i64,
    seeds: Vec<RunOutcome>,
    small_init: Option<RunOutcome>,
    doubled: Option<RunOutcome>,
}

impl Cell {
    /// Mean over the given seeds of `param`'s steady-state sigma_max.
    fn sigma(&self, param: &str, seeds: &[usize]) -> f64 {
        mean(&seeds.iter().map(|&s| self.seeds[s].params[param].1).collect::<Vec<_>>())
    }

    /// Per check: the worst relative difference over the hidden matrices, how many of them pass, and how many
    /// there are. The cell passes a check when every matrix does.
    fn checks(&self) -> Vec<(&'static str, f64, usize, usize)> {
        let first = &self.seeds[0];
        let tally = |f: &dyn Fn(&str) -> Option<f64>, bar: f64| {
            let ds: Vec<f64> = first.params.keys().filter_map(|p| f(p)).collect();
            let worst = ds.iter().copied().fold(0.0f64, |w, d| if d.abs() > w.abs() { d } else { w });
            (worst, ds.iter().filter(|d| d.abs() < bar).count(), ds.len())
        };
        let mut out = Vec::new();
        for (name, check) in [("init/10", &self.small_init), ("2lr,2wd", &self.doubled)] {
            if let Some(c) = check {
                let (w, ok, n) = tally(&|p| Some(c.params[p].1 / first.params[p].1 - 1.0), SAME_WITHIN);
                out.push((name, w, ok, n));
            }
        }
        let (w, ok, n) = tally(&|p| first.params[p].2, DRIFT_BELOW);
        out.push(("drift", w, ok, n));
        out
    }
}

/// Least-squares slope of ln sigma_max on ln m with one intercept per matrix.
fn pooled_log_slope(points: &[(String, f64, f64)]) -> f64 {
    fit::pooled_slope("slope", points).map(|f| f.slope).unwrap_or(f64::NAN)
}

struct Sweep<'p> {
    plan: &'p Plan,
    widths: Vec<i64>,
    /// cells[g][w]
    cells: Vec<Vec<Cell>>,
    params: Vec<String>,
}

impl Sweep<'_> {
    fn m(&self, width: i64) -> f64 {
        width as f64 / self.plan.base_width as f64
    }

    fn params_of(&self, kind: &str) -> Vec<&String> {
        self.params.iter().filter(|p| kind_of(p) == kind).collect()
    }

    /// Slope of ln sigma_max on ln m for `kind` at gamma index `g`, using seeds `seeds[w]` at each width.
    fn slope(&self, kind: &str, g: usize, seeds: &[Vec<usize>]) -> f64 {
        let mut pts = Vec::new();
        for (w, cell) in self.cells[g].iter().enumerate() {
            for p in self.params_of(kind) {
                pts.push((p.clone(), self.m(cell.width).ln(), cell.sigma(p, &seeds[w]).ln()));
            }
        }
        pooled_log_slope(&pts)
    }

    fn all_seeds(&self) -> Vec<usize> {
        (0..self.plan.seeds as usize).collect()
    }

    fn slopes(&self, kind: &str) -> Vec<f64> {
        let all = vec![self.all_seeds(); self.widths.len()];
        (0..self.cells.len()).map(|g| self.slope(kind, g, &all)).collect()
    }

    /// gamma* and its 95% percentile-bootstrap interval (seeds resampled in every (gamma, width) cell).
    fn gamma_star(&self, kind: &str) -> (f64, Option<(f64, f64)>, usize) {
        let gammas: Vec<f64> = self.cells.iter().map(|c| c[0].gamma).collect();
        let star = gainguard::fit::zero_crossing(&gammas, &self.slopes(kind)).unwrap_or(f64::NAN);
        let seeds: Vec<f64> = self.all_seeds().iter().map(|&s| s as f64).collect();
        let k = self.widths.len();
        let cells = vec![seeds; self.cells.len() * k];
        let undefined = std::cell::Cell::new(0usize);
        let statistic = |drawn: &[Vec<f64>]| {
            let slopes: Vec<f64> = (0..self.cells.len())
                .map(|g| {
                    let seeds: Vec<Vec<usize>> = drawn[g * k..(g + 1) * k].iter().map(|v| v.iter().map(|s| *s as usize).collect()).collect();
                    self.slope(kind, g, &seeds)
                })
                .collect();
            let z = gainguard::fit::zero_crossing(&gammas, &slopes).unwrap_or(f64::NAN);
            if !z.is_finite() {
                undefined.set(undefined.get() + 1);
            }
            z
        };
        let interval = bootstrap_interval(&cells, statistic, BOOTSTRAP_RESAMPLES, 0.95, 29);
        (star, interval, undefined.get())
    }

    /// Per gamma, the median over `kind`'s matrices of max/min seed-mean sigma_max across widths.
    fn spread(&self, kind: &str, g: usize) -> f64 {
        let all = self.all_seeds();
        let spreads: Vec<f64> =
            self.params_of(kind).iter().map(|p| fit::spread(&self.cells[g].iter().map(|c| c.sigma(p, &all)).collect::<Vec<_>>())).collect();
        crate::report::median(&spreads)
    }

    /// Geometric mean over `kind`'s matrices of the seed-mean sigma_max.
    fn kind_sigma(&self, kind: &str, cell: &Cell) -> f64 {
        let all = self.all_seeds();
        let logs: Vec<f64> = self.params_of(kind).iter().map(|p| cell.sigma(p, &all).ln()).collect();
        mean(&logs).exp()
    }
}

pub fn run(a: &Args, plan: &Plan, runner: &mut Runner) -> Result<()> {
    let widths = plan.widths(&plan.multipliers);
    let mut cells = Vec::new();
    for &gamma in &plan.gammas {
        let rule = Rule::custom(gamma, 1.0)?;
        let mut row = Vec::new();
        for &w in &widths {
            let base = RunRequest::new(w, rule, plan.lr, plan.wd, 0);
            let seeds = (0..plan.seeds).map(|s| runner.run(&RunRequest { seed: s, ..base.clone() })).collect::<Result<Vec<_>>>()?;
            let small_init = Some(runner.run(&RunRequest { init_scale: 0.1, ..base.clone() })?);
            let doubled = if a.overrides.no_doubled_check { None } else { Some(runner.run(&RunRequest { matrix_scale: 2.0, ..base.clone() })?) };
            row.push(Cell { gamma, width: w, seeds, small_init, doubled });
        }
        cells.push(row);
    }
    let params: Vec<String> = cells[0][0].seeds[0].params.keys().cloned().collect();
    let sweep = Sweep { plan, widths, cells, params };
    let measurements = measurements(&sweep);
    std::fs::write(a.out.join("measurements.json"), serde_json::to_string_pretty(&measurements)? + "\n")?;
    plot_sigma_vs_width(&a.out.join("sigma_vs_width.png"), &sweep)?;
    plot_slope_vs_gamma(&a.out.join("slope_vs_gamma.png"), &sweep)?;

    let mut r = String::new();
    setup_section(&mut r, "Gamma sweep at steady state", a, plan, runner, runner.data);
    let _ = writeln!(
        r,
        "- μP path: lr = {} / m, wd = {} · m^gamma on the hidden matrices; vector-like parameters lr {} and no decay; gamma ∈ {:?}; widths {:?}; {} seed(s) per cell, the checks on seed 0\n",
        plan.lr, plan.wd, plan.lr, plan.gammas, sweep.widths, plan.seeds
    );
    horizon_section(&mut r, &sweep);
    for kind in KINDS {
        kind_section(&mut r, &sweep, kind);
    }
    checks_section(&mut r, &sweep);
    calibrate_section(&mut r, &measurements);
    let _ = writeln!(r, "![sigma_max vs width](sigma_vs_width.png)\n\n![slope vs gamma](slope_vs_gamma.png)");
    std::fs::write(a.out.join("report.md"), &r)?;
    println!("{r}");
    println!("wrote {}", a.out.join("report.md").display());
    Ok(())
}

/// Steps and decay horizon per (gamma, width): every run's, seed 0.
fn horizon_section(r: &mut String, s: &Sweep) {
    let _ = writeln!(r, "## Decay horizon of every run\n\nSteps, and the smallest and largest H over the hidden matrices at the end (seed 0; the other seeds run the same steps).\n");
    let _ = writeln!(r, "| gamma | {} |", s.widths.iter().map(|w| format!("d = {w}")).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(r, "|---|{}", "---|".repeat(s.widths.len()));
    for row in &s.cells {
        let cells: Vec<String> = row
            .iter()
            .map(|c| {
                let hs: Vec<f64> = c.seeds[0].params.values().map(|p| p.0).collect();
                let (lo, hi) = (hs.iter().copied().fold(f64::INFINITY, f64::min), hs.iter().copied().fold(0.0, f64::max));
                format!("{} steps, H {lo:.2}–{hi:.2}", c.seeds[0].steps)
            })
            .collect();
        let _ = writeln!(r, "| {} | {} |", row[0].gamma, cells.join(" | "));
    }
    let _ = writeln!(r);
}

fn kind_section(r: &mut String, s: &Sweep, kind: &str) {
    let names: Vec<String> = s.params_of(kind).iter().map(|p| short(p)).collect();
    let _ = writeln!(r, "## {kind} matrices ({})\n", names.join(", "));
    let _ = writeln!(r, "Steady-state sigma_max (geometric mean over these matrices of the seed means), the slope of ln sigma_max on ln m (one intercept per matrix), and the spread across widths (median over the matrices of max/min).\n");
    let _ = writeln!(r, "| gamma | {} | slope | law's slope (alpha 0.75) | spread |", s.widths.iter().map(|w| format!("d = {w}")).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(r, "|---|{}---|---|---|", "---|".repeat(s.widths.len()));
    let slopes = s.slopes(kind);
    for (g, row) in s.cells.iter().enumerate() {
        let sig: Vec<String> = row.iter().map(|c| format!("{:.4}", s.kind_sigma(kind, c))).collect();
        let gamma = row[0].gamma;
        let _ = writeln!(r, "| {gamma} | {} | {:+.3} | {:+.3} | {:.3} |", sig.join(" | "), slopes[g], 0.75 - 0.5 * (1.0 + gamma), s.spread(kind, g));
    }
    let (star, interval, undefined) = s.gamma_star(kind);
    let _ = writeln!(
        r,
        "\n**gamma\\* ({kind}) = {}**, 95% bootstrap interval {} over {} resamples of the seeds{}. The paper's rule is 0.5.\n",
        if star.is_finite() { format!("{star:.3}") } else { "not inside the measured gammas".into() },
        interval.map_or("—".into(), |(lo, hi)| format!("[{lo:.3}, {hi:.3}]")),
        BOOTSTRAP_RESAMPLES,
        if undefined > 0 { format!(" ({undefined} resamples had no crossing and are left out)") } else { String::new() }
    );
}

fn checks_section(r: &mut String, s: &Sweep) {
    let _ = writeln!(r, "## Checks of the protocol (seed 0)\n\nPer cell: the hidden matrices that pass out of all, and the worst one's difference.\n");
    let _ = writeln!(r, "init/10: the same run from a 10× smaller init of the hidden matrices; 2lr,2wd: the hidden matrices' lr and wd both doubled (run to the same H); both within {:.0}% of seed 0 if the steady state depends on lr/wd alone. drift: the last timescale's mean over the one before, within {:.0}%.\n", 100.0 * SAME_WITHIN, 100.0 * DRIFT_BELOW);
    let _ = writeln!(r, "| gamma | d | init/10 | 2lr,2wd | drift |\n|---|---|---|---|---|");
    let (mut passed, mut total) = (0, 0);
    for row in &s.cells {
        for c in row {
            let checks = c.checks();
            let cell = |name: &str| {
                checks.iter().find(|x| x.0 == name).map_or("—".into(), |x| {
                    format!("{}/{} (worst {:+.1}%){}", x.2, x.3, 100.0 * x.1, if x.2 == x.3 { "" } else { " **FAIL**" })
                })
            };
            let _ = writeln!(r, "| {} | {} | {} | {} | {} |", c.gamma, c.width, cell("init/10"), cell("2lr,2wd"), cell("drift"));
            total += checks.iter().map(|x| x.3).sum::<usize>();
            passed += checks.iter().map(|x| x.2).sum::<usize>();
        }
    }
    let _ = writeln!(r, "\n{passed} of {total} matrix checks pass.\n");
}

/// What `gainguard calibrate` says about this sweep's measurements.json.
fn calibrate_section(r: &mut String, ms: &[Measurement]) {
    let reliability = fit::reliability(ms);
    let points: Vec<fit::MupPoint> =
        ms.iter().map(|m| fit::MupPoint { group: m.param.clone(), gamma: m.gamma, width: m.width, sigma_max: m.sigma_max }).collect();
    let _ = writeln!(r, "## `gainguard calibrate measurements.json`\n");
    match fit::calibrate_gamma(&points) {
        Ok(c) => {
            let _ = writeln!(
                r,
                "All matrices pooled, a straight line through (gamma, slope): gamma = {:.3} ± {:.3}, d slope / d gamma = {:.3} ± {:.3} (the law: −0.5); reliable: {}{}.\n",
                c.gamma,
                c.gamma_se,
                c.rate,
                c.rate_se,
                reliability.reliable,
                reliability.reason.map(|s| format!(" ({s})")).unwrap_or_default()
            );
        }
        Err(e) => {
            let _ = writeln!(r, "No calibration: {e}.\n");
        }
    }
}

fn measurements(s: &Sweep) -> Vec<Measurement> {
    let mut out = Vec::new();
    for row in &s.cells {
        for c in row {
            for (seed, run) in c.seeds.iter().enumerate() {
                for (param, (h, sigma, drift)) in &run.params {
                    // The checks were run on seed 0; every seed has its own drift.
                    let against = |check: &Option<RunOutcome>| check.as_ref().filter(|_| seed == 0).map(|c| c.params[param].1 / sigma - 1.0);
                    let checks = fit::SteadyStateChecks { drift: *drift, small_init: against(&c.small_init), doubled_lr_wd: against(&c.doubled) };
                    out.push(Measurement {
                        decay_horizon: Some(*h),
                        steps: Some(run.steps),
                        schedule: Some(format!("linear warmup {} steps, then constant", s.plan.warmup)),
                        seed: Some(seed as u64),
                        checks: Some(checks),
                        ..Measurement::new(c.width as f64, c.gamma, s.plan.lr, s.plan.wd, param.clone(), *sigma)
                    });
                }
            }
        }
    }
    out
}

fn plot_sigma_vs_width(path: &std::path::Path, s: &Sweep) -> Result<()> {
    let panels: Vec<Panel> = KINDS
        .iter()
        .map(|kind| Panel {
            title: format!("{kind} matrices (geometric mean of {})", s.params_of(kind).len()),
            series: s
                .cells
                .iter()
                .enumerate()
                .map(|(g, row)| {
                    let pts = row.iter().map(|c| (c.width as f64, s.kind_sigma(kind, c))).collect();
                    Series::new(format!("gamma {} (spread {:.2})", row[0].gamma, s.spread(kind, g)), pts)
                })
                .collect(),
            hlines: vec![],
        })
        .collect();
    let axes = Axes { x_label: "width d_model", y_label: "sigma_max at steady state", log_x: true, log_y: true };
    plot_panels(path, &format!("LLaMA example: steady-state sigma_max along the μP path (H ≥ {})", s.plan.horizon), axes, &panels, 2)
}

fn plot_slope_vs_gamma(path: &std::path::Path, s: &Sweep) -> Result<()> {
    let gammas: Vec<f64> = s.cells.iter().map(|r| r[0].gamma).collect();
    let mut series: Vec<Series> = KINDS.iter().map(|k| Series::new(*k, gammas.iter().copied().zip(s.slopes(k)).collect())).collect();
    series.push(Series::new("the law with alpha = 0.75", vec![(0.0, 0.25), (1.0, -0.25)]));
    let panel = Panel { title: "slope of ln sigma_max on ln m (0: width-invariant; gamma* where it crosses)".into(), series, hlines: vec![("flat in width".into(), 0.0)] };
    let axes = Axes { x_label: "gamma (wd ∝ m^gamma, lr ∝ 1/m)", y_label: "slope", log_x: false, log_y: false };
    plot_panels(path, "LLaMA example: where sigma_max stops depending on width", axes, &[panel], 1)
}

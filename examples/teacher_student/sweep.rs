//! The runs of one regime: every rule at every width, a run per seed, the checks on seed 0; the tables, the
//! decomposition `slope(sigma_max) = slope(‖W‖_F) − ½·slope(stable rank)` and gamma*.

use std::fmt::Write as _;

use anyhow::Result;
use gainguard::steady_state::{bootstrap_interval, mean};
use gainguard::{ParamClass, Rule};

use crate::run::{Regime, RunResult, Setup, Variant};

/// Check bars: a steady state forgets its init and depends on lr/wd alone, within 5%; it no longer drifts, within 3%.
pub const SAME_WITHIN: f64 = 0.05;
pub const DRIFT_BELOW: f64 = 0.03;
pub const BOOTSTRAP_RESAMPLES: usize = 2000;

/// Which of the protocol's extra runs to make on seed 0 of every cell.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExtraRuns {
    pub small_init: bool,
    pub doubled: bool,
}

/// One (rule, width) cell: a run per seed, and the checks on seed 0.
pub struct Cell {
    pub d: i64,
    pub seeds: Vec<RunResult>,
    pub small_init: Option<RunResult>,
    pub doubled: Option<RunResult>,
}

impl Cell {
    pub fn sigmas(&self) -> Vec<f64> {
        self.seeds.iter().map(|r| r.sigma).collect()
    }

    /// (name, relative difference or drift, passes) for each check.
    pub fn checks(&self) -> Vec<(&'static str, f64, bool)> {
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

    /// Geometric mean over the seeds of one reading.
    fn geo(&self, seeds: &[usize], f: fn(&RunResult) -> f64) -> f64 {
        mean(&seeds.iter().map(|&s| f(&self.seeds[s]).ln()).collect::<Vec<_>>()).exp()
    }
}

pub struct RuleRow {
    pub label: String,
    pub rule: Rule,
    pub cells: Vec<Cell>,
}

impl RuleRow {
    pub fn means(&self) -> Vec<f64> {
        self.cells.iter().map(|c| mean(&c.sigmas())).collect()
    }

    pub fn spread(&self) -> f64 {
        gainguard::fit::spread(&self.means())
    }

    pub fn spread_interval(&self) -> Option<(f64, f64)> {
        let cells: Vec<Vec<f64>> = self.cells.iter().map(|c| c.sigmas()).collect();
        let spread = |c: &[Vec<f64>]| gainguard::fit::spread(&c.iter().map(|v| mean(v)).collect::<Vec<_>>());
        bootstrap_interval(&cells, spread, BOOTSTRAP_RESAMPLES, 0.95, 17)
    }

    fn ms(&self) -> Vec<f64> {
        let base = self.cells[0].d as f64;
        self.cells.iter().map(|c| c.d as f64 / base).collect()
    }

    /// Slopes on ln m of ln sigma_max, ln ‖W‖_F and ln(stable rank) (geometric means over the given seeds).
    fn slopes_with(&self, seeds: &[Vec<usize>]) -> Slopes {
        let ms = self.ms();
        let line = |f: fn(&RunResult) -> f64| log_slope(&ms, &self.cells.iter().zip(seeds).map(|(c, s)| c.geo(s, f)).collect::<Vec<_>>());
        Slopes { sigma: line(|r| r.sigma), frobenius: line(|r| r.frobenius), stable_rank: line(|r| r.stable_rank) }
    }

    pub fn slopes(&self) -> Slopes {
        self.slopes_with(&self.cells.iter().map(|c| (0..c.seeds.len()).collect()).collect::<Vec<_>>())
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Slopes {
    pub sigma: f64,
    pub frobenius: f64,
    pub stable_rank: f64,
}

impl Slopes {
    /// `slope(sigma) − (slope(‖W‖_F) − ½·slope(stable rank))`: zero up to the separate averaging of the three
    /// readings over the last timescale.
    pub fn residual(&self) -> f64 {
        self.sigma - (self.frobenius - 0.5 * self.stable_rank)
    }
}

/// Least-squares slope of `ln y` on `ln m`.
pub fn log_slope(ms: &[f64], ys: &[f64]) -> f64 {
    let xs: Vec<f64> = ms.iter().map(|m| m.ln()).collect();
    let ys: Vec<f64> = ys.iter().map(|s| s.ln()).collect();
    let (mx, my) = (mean(&xs), mean(&ys));
    let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    sxy / sxx
}

/// Every rule at every width of one regime. `progress` gets one line per finished cell.
pub fn run_rows(
    setup: &Setup,
    rules: &[(String, Rule)],
    widths: &[i64],
    regime: Regime,
    seeds: u64,
    extra: ExtraRuns,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<RuleRow>> {
    let mut rows = Vec::new();
    // Runs that train the same model the same way are made once: the base width (m = 1) of every gamma of a
    // gamma sweep, where each rule's lr and wd are the base values.
    let mut memo: std::collections::BTreeMap<String, RunResult> = std::collections::BTreeMap::new();
    let mut run = |rule: Rule, d: i64, seed: u64, variant: Variant| -> Result<RunResult> {
        let m = d as f64 / setup.base as f64;
        let key = format!(
            "{}-{d}-{seed}-{variant:?}-{:e}-{:e}-{:e}-{:e}",
            rule.preset.name(),
            rule.learning_rate(ParamClass::MatrixLike, regime.lr, m),
            rule.weight_decay(ParamClass::MatrixLike, regime.wd, m),
            rule.learning_rate(ParamClass::VectorLike, regime.lr, m),
            rule.weight_decay(ParamClass::VectorLike, regime.wd, m)
        );
        if let Some(r) = memo.get(&key) {
            return Ok(r.clone());
        }
        let r = setup.run(rule, regime, d, seed, variant)?;
        memo.insert(key, r.clone());
        Ok(r)
    };
    for (label, rule) in rules {
        let mut cells = Vec::new();
        for &d in widths {
            let runs = (0..seeds).map(|s| run(*rule, d, s, Variant::Main)).collect::<Result<Vec<_>>>()?;
            let small_init = if extra.small_init { Some(run(*rule, d, 0, Variant::SmallInit)?) } else { None };
            let doubled = if extra.doubled { Some(run(*rule, d, 0, Variant::Doubled)?) } else { None };
            let cell = Cell { d, seeds: runs, small_init, doubled };
            progress(&cell_row(label, &cell, widths[0]));
            cells.push(cell);
        }
        rows.push(RuleRow { label: label.clone(), rule: *rule, cells });
    }
    Ok(rows)
}

pub fn cell_header() -> String {
    format!(
        "\n{:<14} {:>5} {:>5} {:>7} {:>6}  {:<26} {:>7} {:>8} {:>7}  {:>13} {:>13} {:>13}\n",
        "rule", "d", "m", "steps", "H", "sigma_max per seed", "mean", "‖W‖_F", "s.rank", "init/10", "2lr,2wd (H)", "drift"
    )
}

/// One (rule, width) cell: steps, H, sigma_max per seed, the means of sigma_max, ‖W‖_F and the stable rank,
/// and the protocol's checks.
pub fn cell_row(label: &str, cell: &Cell, base: i64) -> String {
    let first = &cell.seeds[0];
    let checks = cell.checks();
    let check = |name: &str| {
        checks.iter().find(|c| c.0 == name).map_or("-".to_string(), |c| format!("{:+.1}% {}", 100.0 * c.1, if c.2 { "ok" } else { "FAIL" }))
    };
    let doubled_h = cell.doubled.as_ref().map_or(String::new(), |r| format!(" ({:.2})", r.horizon));
    format!(
        "{:<14} {:>5} {:>5} {:>7} {:>6.2}  {:<26} {:>7.4} {:>8.3} {:>7.2}  {:>13} {:>13} {:>13}\n",
        label,
        cell.d,
        cell.d as f64 / base as f64,
        first.steps,
        first.horizon,
        cell.sigmas().iter().map(|s| format!("{s:.4}")).collect::<Vec<_>>().join(" "),
        mean(&cell.sigmas()),
        mean(&cell.seeds.iter().map(|r| r.frobenius).collect::<Vec<_>>()),
        mean(&cell.seeds.iter().map(|r| r.stable_rank).collect::<Vec<_>>()),
        check("init/10"),
        format!("{}{doubled_h}", check("2lr,2wd")),
        check("drift"),
    )
}

pub fn summary_table(rows: &[RuleRow], widths: &[i64], param: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\nsigma_max of {param} at steady state (mean of the seeds) and its spread across widths (max/min; 1 = width-invariant gain):");
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

/// Per rule: the slopes on ln m of ln sigma_max, ln ‖W‖_F and ln(stable rank), and how far the identity
/// `slope(sigma) = slope(‖W‖_F) − ½·slope(stable rank)` is from holding.
pub fn decomposition_table(rows: &[RuleRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\nslopes on ln m (geometric means over the seeds): slope(sigma_max) = slope(‖W‖_F) − ½·slope(stable rank):");
    let _ = writeln!(s, "{:<14} {:>10} {:>10} {:>12} {:>14} {:>10}", "rule", "sigma_max", "‖W‖_F", "stable rank", "F − ½·s.rank", "residual");
    let mut worst: f64 = 0.0;
    for row in rows {
        let sl = row.slopes();
        worst = worst.max(sl.residual().abs());
        let _ = writeln!(
            s,
            "{:<14} {:>+10.4} {:>+10.4} {:>+12.4} {:>+14.4} {:>+10.1e}",
            row.label,
            sl.sigma,
            sl.frobenius,
            sl.stable_rank,
            sl.frobenius - 0.5 * sl.stable_rank,
            sl.residual()
        );
    }
    let _ = writeln!(s, "largest |residual|: {worst:.1e} (the three are averaged over the last timescale separately)");
    s
}

/// gamma* (where the slope of ln sigma_max on ln m crosses zero over gamma, read off the piecewise-linear
/// curve through the measured slopes) and the stable-rank exponent there (the slope of ln(stable rank) on
/// ln m, interpolated at gamma*), each with a 95% bootstrap interval over the seeds.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct GammaStar {
    pub gamma_star: f64,
    pub interval: Option<(f64, f64)>,
    pub stable_rank_exponent: f64,
    pub stable_rank_interval: Option<(f64, f64)>,
    /// Bootstrap resamples whose slope did not cross zero within the measured gammas.
    pub no_crossing: usize,
}

/// Piecewise-linear interpolation through `(xs, ys)`, extended linearly beyond both ends.
pub(crate) fn interpolate(xs: &[f64], ys: &[f64], x: f64) -> f64 {
    for i in 1..xs.len() {
        if x <= xs[i] || i == xs.len() - 1 {
            let t = (x - xs[i - 1]) / (xs[i] - xs[i - 1]);
            return ys[i - 1] + t * (ys[i] - ys[i - 1]);
        }
    }
    f64::NAN
}

pub fn gamma_star(rows: &[RuleRow]) -> GammaStar {
    let gammas: Vec<f64> = rows.iter().map(|r| r.rule.gamma).collect();
    let k = rows[0].cells.len();
    let statistic = |seeds: &[Vec<usize>]| -> (f64, f64) {
        let slopes: Vec<Slopes> = rows.iter().zip(seeds.chunks(k)).map(|(r, s)| r.slopes_with(s)).collect();
        let g = gainguard::fit::zero_crossing(&gammas, &slopes.iter().map(|s| s.sigma).collect::<Vec<_>>()).unwrap_or(f64::NAN);
        let sr = if g.is_finite() { interpolate(&gammas, &slopes.iter().map(|s| s.stable_rank).collect::<Vec<_>>(), g) } else { f64::NAN };
        (g, sr)
    };
    let all: Vec<Vec<usize>> = rows.iter().flat_map(|r| r.cells.iter().map(|c| (0..c.seeds.len()).collect())).collect();
    let (gamma_star, stable_rank_exponent) = statistic(&all);
    let cells: Vec<Vec<f64>> = all.iter().map(|s| s.iter().map(|&i| i as f64).collect()).collect();
    let as_seeds = |c: &[Vec<f64>]| c.iter().map(|v| v.iter().map(|&i| i as usize).collect()).collect::<Vec<Vec<usize>>>();
    let no_crossing = std::cell::Cell::new(0);
    let interval = bootstrap_interval(
        &cells,
        |c| {
            let g = statistic(&as_seeds(c)).0;
            no_crossing.set(no_crossing.get() + usize::from(!g.is_finite()));
            g
        },
        BOOTSTRAP_RESAMPLES,
        0.95,
        23,
    );
    let stable_rank_interval = bootstrap_interval(&cells, |c| statistic(&as_seeds(c)).1, BOOTSTRAP_RESAMPLES, 0.95, 23);
    GammaStar { gamma_star, interval, stable_rank_exponent, stable_rank_interval, no_crossing: no_crossing.get() }
}

pub fn gamma_fit_text(rows: &[RuleRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\nslope of ln sigma_max on ln m along the μP path (lr ∝ 1/m, wd ∝ m^gamma); the law predicts alpha − (1 + gamma)/2:");
    let _ = writeln!(s, "{:>8}  {:>9}  {:>13}", "gamma", "slope", "implied alpha");
    for r in rows {
        let (g, sl) = (r.rule.gamma, r.slopes().sigma);
        let _ = writeln!(s, "{g:>8.2}  {sl:>+9.4}  {:>13.3}", sl + (1.0 + g) / 2.0);
    }
    let g = gamma_star(rows);
    match g.interval {
        Some((lo, hi)) if g.gamma_star.is_finite() => {
            let (slo, shi) = g.stable_rank_interval.unwrap_or((f64::NAN, f64::NAN));
            let _ = writeln!(
                s,
                "gamma* = {:.3}, 95% bootstrap interval [{lo:.3}, {hi:.3}] (the paper's rule: 0.5); stable-rank exponent there {:+.3} [{slo:+.3}, {shi:+.3}]{}",
                g.gamma_star,
                g.stable_rank_exponent,
                if g.no_crossing > 0 { format!("; {} of {BOOTSTRAP_RESAMPLES} resamples had no crossing and are left out", g.no_crossing) } else { String::new() }
            );
        }
        _ => {
            let _ = writeln!(s, "gamma*: the slope does not cross zero within gamma {:?}", rows.iter().map(|r| r.rule.gamma).collect::<Vec<_>>());
        }
    }
    s
}

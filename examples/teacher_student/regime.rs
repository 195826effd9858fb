//! gamma* over the regime: the gamma sweep repeated at every batch size × base `lr·wd` (at fixed `lr/wd`) ×
//! decay horizon, with gamma* and the stable-rank exponent drawn as heatmaps.
//!
//! Batch sets the gradient noise, `lr·wd` the number of steps per timescale (the law's `sqrt(lr/wd)` is
//! the same at every point of one map), H how long the steady state has had. Points run cheapest first and
//! the report, `regime.json` and the heatmaps are rewritten after each, so a cut-short run keeps what it
//! measured.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use gainguard::Rule;
use gainguard_examples::plot;

use crate::model::PARAM;
use crate::run::{Regime, Setup};
use crate::sweep::{self, ExtraRuns, GammaStar, RuleRow};
use crate::Args;

/// One point of the map.
#[derive(serde::Serialize)]
struct Point {
    batch: i64,
    lr_wd: f64,
    lr: f64,
    wd: f64,
    horizon: f64,
    gamma: GammaStar,
    /// Per gamma: the slopes on ln m of ln sigma_max, ln ‖W‖_F, ln(stable rank), and the identity's residual.
    slopes: Vec<(f64, f64, f64, f64, f64)>,
    /// Per gamma and width: d, steps, H, and the seed means of sigma_max, ‖W‖_F and the stable rank, the
    /// seed-0 drift and (with --regime-checks) the seed-0 init/10 difference.
    cells: Vec<CellSummary>,
    cpu_s: f64,
}

#[derive(serde::Serialize)]
struct CellSummary {
    gamma: f64,
    d: i64,
    steps: u64,
    horizon: f64,
    sigma_max: f64,
    frobenius: f64,
    stable_rank: f64,
    drift: f64,
    small_init: Option<f64>,
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
    let mean = gainguard::steady_state::mean;
    rows.iter()
        .flat_map(|r| {
            r.cells.iter().map(|c| CellSummary {
                gamma: r.rule.gamma,
                d: c.d,
                steps: c.seeds[0].steps,
                horizon: c.seeds[0].horizon,
                sigma_max: mean(&c.sigmas()),
                frobenius: mean(&c.seeds.iter().map(|s| s.frobenius).collect::<Vec<_>>()),
                stable_rank: mean(&c.seeds.iter().map(|s| s.stable_rank).collect::<Vec<_>>()),
                drift: c.seeds[0].drift,
                small_init: c.small_init.as_ref().map(|s| s.sigma / c.seeds[0].sigma - 1.0),
            })
        })
        .collect()
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
    let mut log = String::new();
    let mut points: Vec<Point> = Vec::new();
    let start = cpu_seconds();
    for (i, &(horizon, lr_wd, batch)) in plan.iter().enumerate() {
        let regime = Regime { lr: (lr_wd * ratio).sqrt(), wd: (lr_wd / ratio).sqrt(), batch, horizon };
        let before = cpu_seconds();
        let head = format!(
            "\n## point {} of {}: batch {batch}, lr·wd {lr_wd} (lr {:.4}, wd {:.4}), H = {horizon}\n{}",
            i + 1,
            plan.len(),
            regime.lr,
            regime.wd,
            sweep::cell_header()
        );
        print!("{head}");
        log.push_str(&head);
        let mut say = |s: &str| {
            print!("{s}");
            log.push_str(s);
        };
        let extra = ExtraRuns { small_init: a.regime_checks, doubled: false };
        let rows = sweep::run_rows(setup, &rules, widths, regime, a.seeds, extra, &mut say)?;
        say(&sweep::decomposition_table(&rows));
        say(&sweep::gamma_fit_text(&rows));
        let cpu_s = cpu_seconds() - before;
        say(&format!("CPU time of this point: {cpu_s:.0} s\n"));
        let slopes = rows
            .iter()
            .map(|r| {
                let s = r.slopes();
                (r.rule.gamma, s.sigma, s.frobenius, s.stable_rank, s.residual())
            })
            .collect();
        points.push(Point { batch, lr_wd, lr: regime.lr, wd: regime.wd, horizon, gamma: sweep::gamma_star(&rows), slopes, cells: summarise(&rows), cpu_s });
        write(&dir, a, widths, &points, &plan, &log, cpu_seconds() - start)?;
    }
    Ok(())
}

fn write(dir: &Path, a: &Args, widths: &[i64], points: &[Point], plan: &[(f64, f64, i64)], log: &str, cpu_s: f64) -> Result<()> {
    std::fs::write(dir.join("regime.json"), serde_json::to_string_pretty(points)? + "\n")?;
    heatmaps(dir, a, points)?;
    let command = std::iter::once("cargo run --release --example teacher_student --".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ");
    let mut r = String::new();
    let _ = writeln!(r, "# teacher–student: gamma* over the regime\n\nCommand: `{command}`\n");
    let _ = writeln!(
        r,
        "Model: {}. Widths {widths:?}, gammas {:?}, {} seed(s), lr/wd = {} at every point, Adam beta2 {}, warmup {} steps; \
         every run to its decay horizon H. {} of {} points measured; CPU time {:.1} min (user + sys, one libtorch thread).\n",
        a.model.describe(),
        a.gammas,
        a.seeds,
        a.lr / a.wd,
        a.beta2,
        a.warmup,
        points.len(),
        plan.len(),
        cpu_s / 60.0
    );
    let _ = writeln!(r, "| H | batch | lr·wd | gamma* [95%] | stable-rank exponent at gamma* [95%] | worst \\|drift\\| | CPU s |\n|---|---|---|---|---|---|---|");
    let mut sorted: Vec<&Point> = points.iter().collect();
    sorted.sort_by(|x, y| (x.horizon, x.batch, x.lr_wd).partial_cmp(&(y.horizon, y.batch, y.lr_wd)).expect("finite"));
    let iv = |i: Option<(f64, f64)>| i.map_or("—".to_string(), |(lo, hi)| format!("[{lo:.3}, {hi:.3}]"));
    for p in sorted {
        let drift = p.cells.iter().map(|c| c.drift.abs()).fold(0.0, f64::max);
        let _ = writeln!(
            r,
            "| {} | {} | {} | {:.3} {} | {:+.3} {} | {:.1}% | {:.0} |",
            p.horizon,
            p.batch,
            p.lr_wd,
            p.gamma.gamma_star,
            iv(p.gamma.interval),
            p.gamma.stable_rank_exponent,
            iv(p.gamma.stable_rank_interval),
            100.0 * drift,
            p.cpu_s
        );
    }
    let _ = writeln!(r, "\n![gamma*](gamma_star.png)\n\n![stable-rank exponent](stable_rank_exponent.png)\n\n## Every point\n\n```text\n{log}```");
    std::fs::write(dir.join("report.md"), r)?;
    Ok(())
}

/// gamma* and the stable-rank exponent on (lr·wd, batch), one panel per H.
fn heatmaps(dir: &Path, a: &Args, points: &[Point]) -> Result<()> {
    let mut horizons = a.horizons.clone();
    horizons.sort_by(f64::total_cmp);
    let grid = |h: f64, f: &dyn Fn(&Point) -> (f64, Option<(f64, f64)>)| -> Vec<Vec<Option<(f64, String)>>> {
        a.batches
            .iter()
            .map(|&b| {
                a.lr_wd
                    .iter()
                    .map(|&p| {
                        points.iter().find(|q| q.batch == b && q.lr_wd == p && q.horizon == h).map(|q| {
                            let (v, iv) = f(q);
                            let value = if v.is_finite() { format!("{v:.2}") } else { "no crossing".to_string() };
                            (v, iv.map_or(value.clone(), |(lo, hi)| format!("{value} [{lo:.2}, {hi:.2}]")))
                        })
                    })
                    .collect()
            })
            .collect()
    };
    let x_ticks: Vec<String> = a.lr_wd.iter().map(|p| format!("{p}")).collect();
    let y_ticks: Vec<String> = a.batches.iter().map(|b| format!("{b}")).collect();
    let maps = |f: &dyn Fn(&Point) -> (f64, Option<(f64, f64)>)| -> Vec<plot::Heatmap> {
        horizons
            .iter()
            .map(|&h| plot::Heatmap {
                title: format!("decay horizon H = {h}{}", if h < 5.0 { " (a transient: H < 5)" } else { "" }), values: grid(h, f), x_ticks: x_ticks.clone(), y_ticks: y_ticks.clone() })
            .collect()
    };
    let axes = plot::HeatmapAxes { x_label: "base lr·wd (lr/wd fixed)", y_label: "batch size", colour_label: "gamma*" };
    plot::plot_heatmaps(
        &dir.join("gamma_star.png"),
        &format!("teacher–student {PARAM}: gamma* (sigma_max flat in width), 95% bootstrap over seeds"),
        axes,
        &maps(&|q| (q.gamma.gamma_star, q.gamma.interval)),
    )?;
    let axes = plot::HeatmapAxes { colour_label: "stable-rank exponent", ..axes };
    plot::plot_heatmaps(
        &dir.join("stable_rank_exponent.png"),
        &format!("teacher–student {PARAM}: slope of ln(stable rank) on ln m at gamma*"),
        axes,
        &maps(&|q| (q.gamma.stable_rank_exponent, q.gamma.stable_rank_interval)),
    )
}

//! The width-transfer report: one function per figure and per section of report.md, plus the files a
//! reader can re-check (measurements.json for `gainguard calibrate`, runs.json with every run).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use gainguard::fit::{self, AlphaFit, FitError, GammaCalibration, MupPoint, WidthPoint};
use gainguard::{Preset, Rule};
use gainguard_examples::plot::{plot_panels, Axes, Panel, Series};
use serde::Serialize;

use crate::{Args, Data, Plan, Results, RunOutcome, RunRequest, Runner};

/// Measurements in the format `gainguard calibrate` reads.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Measurement {
    pub width: i64,
    pub gamma: f64,
    pub lr: f64,
    pub wd: f64,
    pub param: String,
    pub sigma_max: f64,
}

/// Writes the figures, measurements.json, report.md and runs.json into `a.out`, and prints the report.
pub fn write_report(a: &Args, plan: &Plan, data: &Data, res: &Results, runner: &Runner) -> Result<()> {
    let out = &a.out;
    plot_loss_vs_lr(out, plan, data.floor(), res)?;
    plot_sigma_vs_width(out, plan, res)?;
    let spreads = sigma_spreads(plan, res);
    plot_spreads(out, plan, &spreads)?;
    let alpha = fit::fit_alpha(&alpha_points(plan, res, runner)?);
    let ms = zero_shot_measurements(plan, res);
    std::fs::write(out.join("measurements.json"), serde_json::to_string_pretty(&ms)?)?;
    let (calib_text, calib) = calibration_text(&ms);
    if let Some(c) = &calib {
        plot_gamma_calibration(out, c)?;
    }

    let mut r = String::new();
    setup_section(&mut r, a, plan, data, runner, res.wall);
    proxy_grid_section(&mut r, plan, res, data.floor());
    transfer_section(&mut r, plan, res);
    sigma_section(&mut r, plan, res, &spreads);
    fits_section(&mut r, runner.trained, &alpha, &calib_text, calib.is_some());
    std::fs::write(out.join("report.md"), &r)?;
    let runs: Vec<_> = runner.cache.values().collect();
    std::fs::write(out.join("runs.json"), serde_json::to_string_pretty(&serde_json::json!({ "plan": plan, "runs": runs, "targets": res.targets }))?)?;
    println!("{r}");
    println!("wrote {}", out.join("report.md").display());
    Ok(())
}

fn entropy_floor_line(floor: Option<f64>) -> Vec<(String, f64)> {
    floor.map(|f| vec![("entropy floor".to_string(), f)]).unwrap_or_default()
}

/// Figure 1: final loss vs lr, one line per width, one panel per rule (the base width's line is the
/// proxy grid at the chosen wd).
fn plot_loss_vs_lr(out: &Path, plan: &Plan, floor: Option<f64>, res: &Results) -> Result<()> {
    let best_wd = res.best.wd;
    let mut panels = Vec::new();
    for p in &plan.rules {
        let mut series = vec![Series::new(
            format!("d={} (proxy)", plan.base_width),
            res.base_grid.iter().filter(|g| g.wd == best_wd).map(|g| (g.lr, g.outcome.final_loss)).filter(|p| p.1.is_finite()).collect(),
        )];
        for &w in &plan.widths()[1..] {
            if let Some(t) = res.target(p.name(), w) {
                let mut pts: Vec<(f64, f64)> = t.local.iter().filter(|l| l.wd_step == 0 && l.final_loss.is_finite()).map(|l| (l.lr, l.final_loss)).collect();
                pts.sort_by(|x, y| x.0.total_cmp(&y.0));
                series.push(Series::new(format!("d={w}"), pts));
            }
        }
        panels.push(Panel { title: format!("{} (wd = {best_wd})", p.name()), series, hlines: entropy_floor_line(floor) });
    }
    plot_panels(
        &out.join("loss_vs_lr.png"),
        "final loss (last 10% mean) vs base lr",
        Axes { x_label: "base lr", y_label: "loss (nats/token)", log_x: true, log_y: false },
        &panels,
        2,
    )
}

/// Figure 2: sigma_max per hidden matrix vs width, zero-shot, one panel per rule.
fn plot_sigma_vs_width(out: &Path, plan: &Plan, res: &Results) -> Result<()> {
    let mut panels = Vec::new();
    for p in &plan.rules {
        let series = res
            .params()
            .iter()
            .map(|n| Series::new(short(n), sigma_by_width(plan, res, p.name(), n).into_iter().map(|(w, s)| (w as f64, s)).collect()))
            .collect();
        panels.push(Panel { title: p.name().into(), series, hlines: vec![] });
    }
    plot_panels(
        &out.join("sigma_vs_width.png"),
        &format!("sigma_max of each hidden matrix vs width, proxy's (lr, wd) = ({:e}, {}) transferred", res.best.lr, res.best.wd),
        Axes { x_label: "width d", y_label: "sigma_max", log_x: true, log_y: true },
        &panels,
        2,
    )
}

/// Max/min of sigma_max across widths, per rule, one value per hidden matrix (in [`Results::params`] order).
fn sigma_spreads<'p>(plan: &'p Plan, res: &Results) -> BTreeMap<&'p str, Vec<f64>> {
    let mut spreads = BTreeMap::new();
    for p in &plan.rules {
        let v = res
            .params()
            .iter()
            .map(|n| {
                let vals: Vec<f64> = sigma_by_width(plan, res, p.name(), n).into_iter().map(|(_, s)| s).collect();
                fit::spread(&vals)
            })
            .collect();
        spreads.insert(p.name(), v);
    }
    spreads
}

/// `(width, sigma_max)` of one hidden matrix under one rule, zero-shot, at every width that has it.
fn sigma_by_width(plan: &Plan, res: &Results, rule: &str, param: &str) -> Vec<(i64, f64)> {
    plan.widths().into_iter().filter_map(|w| res.sigma_at(plan, rule, w).and_then(|s| s.get(param)).map(|s| (w, *s))).collect()
}

/// Figure 3: the spread of every hidden matrix, one line per rule.
fn plot_spreads(out: &Path, plan: &Plan, spreads: &BTreeMap<&str, Vec<f64>>) -> Result<()> {
    let panels = [Panel {
        title: "max/min over widths, per hidden matrix (1 = flat)".into(),
        series: plan.rules.iter().map(|p| Series::new(p.name(), spreads[p.name()].iter().enumerate().map(|(i, s)| (i as f64, *s)).collect())).collect(),
        hlines: vec![("1".into(), 1.0)],
    }];
    plot_panels(&out.join("sigma_spread.png"), "spread of sigma_max across widths", Axes { x_label: "hidden matrix index (see report)", y_label: "spread", log_x: false, log_y: true }, &panels, 1)
}

/// Every finite run's hidden matrices with their effective (width-scaled) lr and wd, for the alpha fit:
/// the proxy grid and every target's local search.
fn alpha_points(plan: &Plan, res: &Results, runner: &Runner) -> Result<Vec<WidthPoint>> {
    let mut points = Vec::new();
    let add = |pts: &mut Vec<WidthPoint>, r: &RunRequest, o: &RunOutcome| {
        let (lr, wd, _) = r.effective(plan.base_width);
        for (n, s) in &o.sigma_max {
            pts.push(WidthPoint { group: n.clone(), width: r.width as f64, lr, wd, sigma_max: *s });
        }
    };
    for g in &res.base_grid {
        add(&mut points, &RunRequest { width: plan.base_width, rule: Rule::default(), lr: g.lr, wd: g.wd, seed: 0 }, &g.outcome);
    }
    for t in &res.targets {
        let p: Preset = t.rule.parse()?;
        for l in &t.local {
            let r = RunRequest { width: t.width, rule: Rule::preset(p), lr: l.lr, wd: l.wd, seed: 0 };
            if let Some(o) = runner.cache.get(&r.key(plan.base_width)) {
                if o.final_loss.is_finite() {
                    add(&mut points, &r, o);
                }
            }
        }
    }
    Ok(points)
}

/// The zero-shot sigma_max of every rule with a gamma, at every width: the μP-path measurements.
fn zero_shot_measurements(plan: &Plan, res: &Results) -> Vec<Measurement> {
    let mut ms = Vec::new();
    for p in &plan.rules {
        let Some(gamma) = Rule::preset(*p).reported_gamma() else { continue };
        for &w in &plan.widths() {
            if let Some(s) = res.sigma_at(plan, p.name(), w) {
                for (n, v) in s {
                    ms.push(Measurement { width: w, gamma, lr: res.best.lr, wd: res.best.wd, param: n.clone(), sigma_max: *v });
                }
            }
        }
    }
    ms
}

/// Figure 4: the slope of ln sigma_max vs ln d per gamma, and the fitted line through zero slope.
fn plot_gamma_calibration(out: &Path, c: &GammaCalibration) -> Result<()> {
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
    )
}

fn mup_points(ms: &[Measurement]) -> Vec<MupPoint> {
    ms.iter()
        .map(|m| MupPoint { group: format!("{} lr={:e} wd={:e}", m.param, m.lr, m.wd), gamma: m.gamma, width: m.width as f64, sigma_max: m.sigma_max })
        .collect()
}

/// The μP-path calibration as a markdown table and a recommendation, with the fit when there is one.
pub fn calibration_text(ms: &[Measurement]) -> (String, Option<GammaCalibration>) {
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

/// The title, the command that reproduces the report, and the settings.
fn setup_section(r: &mut String, a: &Args, plan: &Plan, data: &Data, runner: &Runner, wall: f64) {
    let _ = writeln!(r, "# Width-transfer experiment: preset `{}`\n", plan.name);
    let _ = writeln!(
        r,
        "Command: `cargo run --release --example width_transfer -- --preset {} --out {} --data {} --device {}{}`\n",
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
        plan.layers,
        plan.base_width,
        plan.widths(),
        plan.seq_len,
        plan.batch,
        plan.steps
    );
    let _ = writeln!(r, "- proxy grid: lr {:?} × wd {:?}; local search at each target: lr × {}^i, |i| ≤ {} (at the transferred wd) and wd × {}^j, |j| ≤ {} (at the transferred lr)", plan.lr_grid, plan.wd_grid, plan.grid_factor, plan.lr_reach, plan.grid_factor, plan.wd_reach);
    let _ = writeln!(r, "- final loss = mean training loss over the last 10% of steps (fresh batches every step); sigma_max from a float64 SVD of the final weights");
    let _ = writeln!(r, "- runs: {} trained, {} served from the cache of identical runs; wall time {:.0} s ({:.1} min); {} threads", runner.trained, runner.reused, wall, wall / 60.0, tch::get_num_threads());
    let _ = writeln!(r, "- machine: {}\n", machine());
}

/// The proxy's (lr, wd) grid with its optimum in bold, and the seed noise at the optimum.
fn proxy_grid_section(r: &mut String, plan: &Plan, res: &Results, floor: Option<f64>) {
    let (best_lr, best_wd) = (res.best.lr, res.best.wd);
    let _ = writeln!(r, "## Proxy (lr, wd) grid at d = {}\n", plan.base_width);
    let _ = writeln!(r, "| lr \\ wd | {} |", plan.wd_grid.iter().map(|w| w.to_string()).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(r, "|---|{}", "---|".repeat(plan.wd_grid.len()));
    for &lr in &plan.lr_grid {
        let cells: Vec<String> = plan
            .wd_grid
            .iter()
            .map(|&wd| {
                let o = &res.base_grid.iter().find(|g| g.lr == lr && g.wd == wd).unwrap().outcome;
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
    let _ = writeln!(r, "\nProxy optimum: lr = {best_lr:e}, wd = {best_wd}, loss {:.4}{}.", res.best.outcome.final_loss, floor.map(|f| format!(" (entropy floor {f:.4})")).unwrap_or_default());
    let seed_losses = &res.seed_losses;
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
}

/// Where the optimum lies at each target width, against the transferred point, and every local loss.
fn transfer_section(r: &mut String, plan: &Plan, res: &Results) {
    let _ = writeln!(r, "\n## Transfer: where is the optimum at each target width?\n");
    let _ = writeln!(r, "Grid steps are factors of {} from the transferred point (lr step, wd step). \"edge\" means the best point is at the edge of the local search, so the true optimum may lie further out.\n", plan.grid_factor);
    let _ = writeln!(r, "| rule | width | zero-shot loss | best local loss | regret | best (lr step, wd step) | lr within 1 step |");
    let _ = writeln!(r, "|---|---|---|---|---|---|---|");
    for t in &res.targets {
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
    for t in &res.targets {
        let lr_line: Vec<String> = t.local.iter().filter(|l| l.wd_step == 0).map(|l| format!("{:+}: {:.4}", l.lr_step, l.final_loss)).collect();
        let wd_line: Vec<String> = t.local.iter().filter(|l| l.lr_step == 0 && l.wd_step != 0).map(|l| format!("{:+}: {:.4}", l.wd_step, l.final_loss)).collect();
        let _ = writeln!(r, "- {} d={}: lr [{}]; wd [{}]", t.rule, t.width, lr_line.join(", "), wd_line.join(", "));
    }
}

/// The spread of sigma_max across widths per hidden matrix and rule, its median, and every value.
fn sigma_section(r: &mut String, plan: &Plan, res: &Results, spreads: &BTreeMap<&str, Vec<f64>>) {
    let widths = plan.widths();
    let params = res.params();
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
                widths.iter().map(|&w| res.sigma_at(plan, p.name(), w).and_then(|s| s.get(n)).map(|v| format!("{v:.3}")).unwrap_or("–".into())).collect();
            let _ = writeln!(r, "| {} | `{}` | {} |", p.name(), short(n), cells.join(" | "));
        }
    }
}

/// The fitted alpha over every run and the direct μP-path calibration of gamma.
fn fits_section(r: &mut String, trained: usize, alpha: &Result<AlphaFit, FitError>, calib_text: &str, calibrated: bool) {
    let _ = writeln!(r, "\n## Fitted exponents\n");
    match alpha {
        Ok(f) => {
            let _ = writeln!(
                r,
                "alpha in sigma_max ∝ sqrt(lr/wd)·d^alpha, fitted on all {} runs' hidden matrices (effective lr, wd; one constant per matrix): \
                 **alpha = {:.3} ± {:.3}**, implied gamma = 2·alpha − 1 = {:.2} ± {:.2} (residual sd of ln sigma {:.3}, n = {}).\n",
                trained,
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
    if calibrated {
        let _ = writeln!(r, "![gamma calibration](gamma_calibration.png)\n");
    }
    let _ = writeln!(r, "All of this is one seed per point at a small scale; read the seed noise above before reading differences in loss.");
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

//! Loss transfer with equal tokens for every run: is the proxy's best `(lr, wd)` still best at the target width under each
//! rule? 2-D grids, widened until their optimum is inside, with equal tokens for every run.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use gainguard::{Preset, Rule};
use gainguard_examples::plot::{plot_panels, Axes, Panel, Series};

use crate::report::setup_section;
use crate::{Args, Plan, RunOutcome, RunRequest, Runner};

/// A 2-D grid of runs around a centre: lr × factor^i, wd × factor^j for |i|, |j| ≤ reach.
struct Grid {
    centre: (f64, f64),
    reach: i32,
    points: BTreeMap<(i32, i32), RunOutcome>,
    /// The lowest finite loss: its offset.
    best: (i32, i32),
    /// The best point is still on the edge at the largest reach the plan allows.
    at_edge: bool,
}

impl Grid {
    fn at(&self, ij: (i32, i32), factor: f64) -> (f64, f64) {
        (self.centre.0 * factor.powi(ij.0), self.centre.1 * factor.powi(ij.1))
    }

    fn loss(&self, ij: (i32, i32)) -> f64 {
        self.points.get(&ij).map_or(f64::NAN, |o| o.final_loss)
    }
}

fn loss_key(o: &RunOutcome) -> f64 {
    if o.final_loss.is_finite() {
        o.final_loss
    } else {
        f64::INFINITY
    }
}

/// Runs the grid at `reach`, and widens it by one ring while its optimum is on the edge.
fn grid(plan: &Plan, runner: &mut Runner, centre: (f64, f64), request: &dyn Fn(f64, f64) -> RunRequest) -> Result<Grid> {
    let mut reach = plan.initial_reach;
    let mut points = BTreeMap::new();
    loop {
        // Two passes: the runs nobody has claimed first, then those other processes are training.
        let ring: Vec<(i32, i32)> = (-reach..=reach).flat_map(|i| (-reach..=reach).map(move |j| (i, j))).filter(|ij| !points.contains_key(ij)).collect();
        let at = |(i, j): (i32, i32)| request(centre.0 * plan.grid_factor.powi(i), centre.1 * plan.grid_factor.powi(j));
        let mut claimed = Vec::new();
        for ij in ring {
            match runner.try_run(&at(ij))? {
                Some(o) => {
                    points.insert(ij, o);
                }
                None => claimed.push(ij),
            }
        }
        for ij in claimed {
            points.insert(ij, runner.run(&at(ij))?);
        }
        let best = *points.iter().min_by(|a, b| loss_key(a.1).total_cmp(&loss_key(b.1))).expect("a grid has points").0;
        let on_edge = best.0.abs() == reach || best.1.abs() == reach;
        if !on_edge || reach >= plan.max_reach {
            return Ok(Grid { centre, reach, points, best, at_edge: on_edge });
        }
        reach += 1;
    }
}

struct RuleResult {
    rule: Preset,
    proxy: Grid,
    /// (target width, its grid around the proxy's optimum).
    targets: Vec<(i64, Grid)>,
}

pub fn run(a: &Args, plan: &Plan, runner: &mut Runner) -> Result<()> {
    // Equal tokens for every run: the steps that bring the slowest rule's hidden matrices at the widest
    // target to the plan's horizon at the centre of the proxy grid.
    let widths = plan.widths(&plan.transfer_multipliers);
    let mut steps = 0;
    for &p in &plan.rules {
        for &w in &widths {
            steps = steps.max(runner.steps_for(&RunRequest::new(w, Rule::preset(p), plan.lr, plan.wd, 0))?);
        }
    }
    let mut results = Vec::new();
    let n = plan.rules.len();
    for &p in (0..n).map(|k| &plan.rules[(k + a.first_rule) % n]) {
        let rule = Rule::preset(p);
        let at = |w: i64| move |lr: f64, wd: f64| RunRequest { steps: Some(steps), ..RunRequest::new(w, rule, lr, wd, 0) };
        let proxy = grid(plan, runner, (plan.lr, plan.wd), &at(plan.base_width))?;
        let optimum = proxy.at(proxy.best, plan.grid_factor);
        let mut targets = Vec::new();
        for &w in &widths[1..] {
            targets.push((w, grid(plan, runner, optimum, &at(w))?));
        }
        results.push(RuleResult { rule: p, proxy, targets });
    }
    results.sort_by_key(|res| plan.rules.iter().position(|&q| q == res.rule));
    plot_grids(&a.out.join("loss_transfer.png"), plan, &results)?;
    write_runs(&a.out.join("runs.json"), plan, &results, steps)?;

    let mut r = String::new();
    // Equal tokens put the grid's centre at the horizon, not every point: the optimum may be a transient, and
    // each cell's H says so.
    setup_section(&mut r, "Loss transfer at equal tokens, with each run's decay horizon", a, plan, runner, runner.data);
    let _ = writeln!(
        r,
        "- every run: {steps} steps of {} × {} tokens (equal tokens at every width), enough for the slowest rule's hidden matrices at d = {} to reach H = {} at the grid's centre (lr {}, wd {}); grids: lr × {f}^i, wd × {f}^j, |i|, |j| ≤ {} to start, widened one ring at a time (up to {}) until the optimum is inside\n",
        plan.batch,
        plan.seq_len,
        widths[widths.len() - 1],
        plan.horizon,
        plan.lr,
        plan.wd,
        plan.initial_reach,
        plan.max_reach,
        f = plan.grid_factor
    );
    summary_section(&mut r, plan, &results, runner);
    for res in &results {
        grid_section(&mut r, plan, &format!("{}: proxy d = {}", res.rule, plan.base_width), &res.proxy);
        for (w, g) in &res.targets {
            grid_section(&mut r, plan, &format!("{}: target d = {w}, centred on the proxy's optimum", res.rule), g);
        }
    }
    let _ = writeln!(r, "![loss around the transferred point](loss_transfer.png)");
    std::fs::write(a.out.join("report.md"), &r)?;
    println!("{r}");
    println!("wrote {}", a.out.join("report.md").display());
    Ok(())
}

fn summary_section(r: &mut String, plan: &Plan, results: &[RuleResult], runner: &Runner) {
    let floor = runner.data.floor().map(|f| format!(" (entropy floor {f:.4})")).unwrap_or_default();
    let _ = writeln!(r, "## Where the optimum lands, per rule{floor}\n");
    let _ = writeln!(r, "Offsets are in grid steps (×{} per step) from the transferred point, lr first; 0, 0 is perfect transfer. H is the smallest decay horizon over the hidden matrices of that run.\n", plan.grid_factor);
    let _ = writeln!(r, "| rule | proxy optimum (lr, wd) | proxy loss (H) | target d | target optimum offset | loss there (H) | loss at the transferred point (H) |");
    let _ = writeln!(r, "|---|---|---|---|---|---|---|");
    for res in results {
        let (lr, wd) = res.proxy.at(res.proxy.best, plan.grid_factor);
        let p = &res.proxy.points[&res.proxy.best];
        for (w, g) in &res.targets {
            let best = &g.points[&g.best];
            let zero = &g.points[&(0, 0)];
            let _ = writeln!(
                r,
                "| {} | ({lr:.3e}, {wd:.3}){} | {:.4} ({:.1}) | {w} | {:+}, {:+}{} | {:.4} ({:.1}) | {:.4} ({:.1}) |",
                res.rule,
                if res.proxy.at_edge { " **on the edge**" } else { "" },
                p.final_loss,
                p.min_horizon(),
                g.best.0,
                g.best.1,
                if g.at_edge { " **on the edge**" } else { "" },
                best.final_loss,
                best.min_horizon(),
                zero.final_loss,
                zero.min_horizon()
            );
        }
    }
    let _ = writeln!(r);
}

/// One grid as a table: loss (and H) at every (lr, wd), the optimum in bold.
fn grid_section(r: &mut String, plan: &Plan, title: &str, g: &Grid) {
    let _ = writeln!(r, "### {title}\n");
    let js: Vec<i32> = (-g.reach..=g.reach).collect();
    let _ = writeln!(r, "| lr \\ wd | {} |", js.iter().map(|&j| format!("{:.3}", g.at((0, j), plan.grid_factor).1)).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(r, "|---|{}", "---|".repeat(js.len()));
    for i in -g.reach..=g.reach {
        let cells: Vec<String> = js
            .iter()
            .map(|&j| match g.points.get(&(i, j)) {
                Some(o) => {
                    let s = format!("{:.4} (H {:.1})", o.final_loss, o.min_horizon());
                    if (i, j) == g.best {
                        format!("**{s}**")
                    } else {
                        s
                    }
                }
                None => "—".into(),
            })
            .collect();
        let _ = writeln!(r, "| {:.3e} | {} |", g.at((i, 0), plan.grid_factor).0, cells.join(" | "));
    }
    let _ = writeln!(r);
}

/// Every grid point as a record: rule, width, (lr, wd), its offset, steps, schedule, final loss, and per hidden
/// matrix (decay horizon, steady-state sigma_max, drift), so every figure of the report can be read back.
fn write_runs(path: &std::path::Path, plan: &Plan, results: &[RuleResult], steps: u64) -> Result<()> {
    let mut runs = Vec::new();
    for res in results {
        for (w, g) in std::iter::once((plan.base_width, &res.proxy)).chain(res.targets.iter().map(|(w, g)| (*w, g))) {
            for (&(i, j), o) in &g.points {
                let (lr, wd) = g.at((i, j), plan.grid_factor);
                runs.push(serde_json::json!({
                    "rule": res.rule.name(),
                    "width": w,
                    "base_width": plan.base_width,
                    "lr": lr,
                    "wd": wd,
                    "offset": [i, j],
                    "optimum": (i, j) == g.best,
                    "steps": steps,
                    "schedule": format!("linear warmup {} steps, then constant", plan.warmup),
                    "final_loss": o.final_loss,
                    "min_decay_horizon": o.min_horizon(),
                    "params": o.params.iter().map(|(n, (h, s, d))| (n.clone(), serde_json::json!({"decay_horizon": h, "sigma_max": s, "drift": d}))).collect::<serde_json::Map<_, _>>(),
                }));
            }
        }
    }
    std::fs::write(path, serde_json::to_string_pretty(&runs)?)?;
    Ok(())
}

/// Per rule and target width: loss against the lr step from the transferred point, one line per wd step.
fn plot_grids(path: &std::path::Path, plan: &Plan, results: &[RuleResult]) -> Result<()> {
    let mut panels = Vec::new();
    for res in results {
        for (w, g) in &res.targets {
            let series = (-g.reach..=g.reach)
                .map(|j| {
                    let pts = (-g.reach..=g.reach).map(|i| (i as f64, g.loss((i, j)))).filter(|p| p.1.is_finite()).collect();
                    Series::new(format!("wd step {j:+}"), pts)
                })
                .collect();
            let best = g.best;
            panels.push(Panel { title: format!("{} at d = {w}: optimum at ({:+}, {:+})", res.rule, best.0, best.1), series, hlines: vec![] });
        }
    }
    let axes = Axes { x_label: "lr step from the transferred point (×2 each)", y_label: "final loss", log_x: false, log_y: false };
    plot_panels(path, &format!("Loss near the transferred (lr, wd), equal tokens (H {} at the proxy grid centre)", plan.horizon), axes, &panels, 2)
}

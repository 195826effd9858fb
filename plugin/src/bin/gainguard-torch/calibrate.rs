//! `gainguard calibrate MEASUREMENTS.json [--format json]`: recommend gamma from short runs of the
//! user's own model along the μP path.

use anyhow::Result;
use gainguard::fit::{self, Measurement, MupPoint, WidthPoint};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;

use crate::Format;
use crate::BadInput;

const FORMAT_HELP: &str = "\
MEASUREMENTS is a JSON array, one object per hidden matrix per run:
  {\"width\": 256, \"gamma\": 0.5, \"lr\": 0.003, \"wd\": 0.1, \"param\": \"blocks.0.mlp.up.weight\", \"sigma_max\": 4.21}
- width: the model width d of the run;
- gamma: the weight-decay exponent the run used (wd ∝ m^gamma), with μP learning rates (lr ∝ 1/m);
- lr, wd: the base (proxy) values given to the optimizer, before width scaling;
- param: the matrix's name; sigma_max: its top singular value at the end of the run;
- decay_horizon (optional, but without it the result is marked unreliable): the matrix's H = Σ lr_t·wd_t
  when sigma_max was read; steps, schedule, seed (optional): how the run went.
Needs at least 2 distinct gammas, each run at 3 or more widths with the same base (lr, wd).
- checks (optional): the steady-state protocol's checks of the run, relative differences:
  {\"drift\": -0.012, \"small_init\": 0.02, \"doubled_lr_wd\": 0.07} (sigma_max's last timescale over the one
  before; a 10x smaller init; lr and wd doubled), each optional.
The fit is marked unreliable (\"reliable\": false, with a reason) when any width's decay horizon is below 5
or missing, or when an entry's drift (bar 3%) or 10x-smaller-init (bar 5%) check failed: sigma_max is then
not the steady state the rule is about. The reason names the entries; doubled_lr_wd is reported only.
The `width_transfer` example writes such a file (`--calibrate`, or measurements.json of a full run).";

#[derive(clap::Args)]
#[command(after_long_help = FORMAT_HELP)]
pub struct Args {
    /// Measurements file (JSON array; see --help for the format).
    measurements: PathBuf,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

pub fn run(a: Args) -> Result<()> {
    let path = a.measurements.display().to_string();
    let bytes = std::fs::read(&a.measurements).map_err(|e| BadInput(format!("measurements file `{path}`: {e}")))?;
    let ms = fit::parse_measurements(&bytes, &path).map_err(|e| BadInput(e.to_string()))?;
    fit::check_measurements(&ms, &path).map_err(|e| BadInput(e.to_string()))?;
    let widths: BTreeSet<u64> = ms.iter().map(|m| m.width.to_bits()).collect();
    let group = |m: &Measurement| format!("{} lr={:e} wd={:e}", m.param, m.lr, m.wd);
    let mup: Vec<MupPoint> = ms.iter().map(|m| MupPoint { group: group(m), gamma: m.gamma, width: m.width, sigma_max: m.sigma_max }).collect();
    let calibration = fit::calibrate_gamma(&mup).map_err(|e| BadInput(format!("measurements file `{path}`: {e}")))?;

    // alpha from sigma ∝ sqrt(lr_eff/wd_eff)·d^alpha with the μP path's effective values,
    // lr_eff = lr·(d0/d), wd_eff = wd·(d/d0)^gamma; d0 (the smallest width) only moves the constant.
    let d0 = ms.iter().map(|m| m.width).fold(f64::INFINITY, f64::min);
    let points: Vec<WidthPoint> = ms
        .iter()
        .map(|m| WidthPoint { group: m.param.clone(), width: m.width, lr: m.lr * d0 / m.width, wd: m.wd * (m.width / d0).powf(m.gamma), sigma_max: m.sigma_max })
        .collect();
    let alpha = fit::fit_alpha(&points).ok();
    let reliability = fit::reliability(&ms);
    let params: BTreeMap<&str, usize> = ms.iter().fold(BTreeMap::new(), |mut acc, m| {
        *acc.entry(m.param.as_str()).or_insert(0) += 1;
        acc
    });

    let mut out = std::io::stdout().lock();
    match a.format {
        Format::Json => {
            let report = serde_json::json!({
                "gamma": calibration.gamma,
                "gamma_se": calibration.gamma_se,
                "alpha": calibration.alpha,
                "alpha_se": calibration.alpha_se,
                "extrapolated": calibration.extrapolated,
                "rate": calibration.rate,
                "rate_se": calibration.rate_se,
                "per_gamma": calibration.per_gamma,
                "alpha_pooled_fit": alpha,
                "measurements": ms.len(),
                "params": params.len(),
                "reliable": reliability.reliable,
                "reason": reliability.reason,
                "min_decay_horizon_by_width": reliability.min_horizon_by_width,
                "checked_entries": reliability.checked_entries,
                "failed_checks": reliability.failed_checks,
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        }
        Format::Table => write_table(&mut out, &ms, params.len(), &widths, &calibration, alpha.as_ref(), &reliability)?,
    }
    out.flush()?;
    Ok(())
}

/// The report for people: widths and their smallest H, the slope per gamma, the recommendation and whether to
/// use it.
fn write_table(
    out: &mut impl Write,
    ms: &[Measurement],
    params: usize,
    widths: &BTreeSet<u64>,
    calibration: &fit::GammaCalibration,
    alpha: Option<&fit::AlphaFit>,
    reliability: &fit::Reliability,
) -> Result<()> {
    writeln!(out, "{} measurements, {} matrices, widths {:?}", ms.len(), params, {
        let mut w: Vec<f64> = widths.iter().map(|b| f64::from_bits(*b)).collect();
        w.sort_by(f64::total_cmp);
        w
    })?;
    let horizons: Vec<String> = reliability
        .min_horizon_by_width
        .iter()
        .map(|(w, h)| format!("{w}: {}", h.map_or("missing".to_string(), |h| format!("{h:.2}"))))
        .collect();
    writeln!(out, "smallest decay horizon H per width: {}", horizons.join(", "))?;
    write_checks(out, ms, reliability)?;
    writeln!(out, "{:>8}  {:>10}  {:>8}  {:>7}  {:>13}", "gamma", "slope", "± se", "widths", "implied alpha")?;
    for g in &calibration.per_gamma {
        writeln!(out, "{:>8.3}  {:>+10.4}  {:>8.4}  {:>7}  {:>13.3}", g.gamma, g.slope, g.slope_se, g.widths, g.implied_alpha)?;
    }
    writeln!(
        out,
        "recommended gamma: {:.3} ± {:.3} (sigma_max flat in width; alpha = (1+gamma)/2 = {:.3} ± {:.3}){}",
        calibration.gamma,
        calibration.gamma_se,
        calibration.alpha,
        calibration.alpha_se,
        if calibration.extrapolated { "  [extrapolated outside the measured gammas]" } else { "" }
    )?;
    writeln!(out, "d slope / d gamma: {:.3} ± {:.3} (the sqrt(lr/wd)·d^alpha law predicts -0.5)", calibration.rate, calibration.rate_se)?;
    if calibration.rate.abs() < 2.0 * calibration.rate_se {
        writeln!(
            out,
            "warning: the slope barely depends on gamma (|d slope / d gamma| < 2 se): the runs were probably too short \
             for weight decay to set the scale (it takes about 1/(lr·wd) steps); the recommendation is not reliable"
        )?;
    }
    if let Some(f) = alpha {
        writeln!(
            out,
            "pooled alpha fit, ln(sigma/sqrt(lr/wd)) on ln d: {:.3} ± {:.3} (implied gamma {:.2}); it can drift with lr·wd, so prefer the gamma above",
            f.alpha, f.alpha_se, f.implied_gamma
        )?;
    }
    match &reliability.reason {
        None => writeln!(out, "use it: --rule gamma={:.2}", calibration.gamma)?,
        Some(reason) => writeln!(out, "UNRELIABLE, do not use this gamma as it stands: {reason}")?,
    }
    Ok(())
}

/// How many entries carry the steady-state checks and how many of each failed; (2·lr, 2·wd) as information.
fn write_checks(out: &mut impl Write, ms: &[Measurement], reliability: &fit::Reliability) -> Result<()> {
    if reliability.checked_entries == 0 {
        return Ok(writeln!(out, "steady-state checks: none recorded (judged by the decay horizon alone)")?);
    }
    let count = |check: &str| reliability.failed_checks.iter().filter(|f| f.check == check).count();
    let doubled: Vec<f64> = ms.iter().filter_map(|m| m.checks.as_ref().and_then(|c| c.doubled_lr_wd)).collect();
    let doubled_off = doubled.iter().filter(|d| !(d.abs() < fit::MAX_INIT_DIFFERENCE)).count();
    writeln!(
        out,
        "steady-state checks on {} entries: drift failed in {}, small_init in {}; doubled_lr_wd (not a criterion) off by 5% or more in {} of {}",
        reliability.checked_entries,
        count("drift"),
        count("small_init"),
        doubled_off,
        doubled.len()
    )?;
    Ok(())
}

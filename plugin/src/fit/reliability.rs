//! Whether a calibration rests on steady-state measurements: every width's decay horizon, and the
//! protocol's checks that the entries carry (the last timescale's drift, the 10×-smaller init).

use std::collections::BTreeMap;

use serde::Serialize;

use super::measurement::Measurement;

/// A steady state no longer drifts: the last timescale's mean within 3% of the one before.
pub const MAX_DRIFT: f64 = 0.03;
/// A steady state has forgotten its init: a 10× smaller init lands within 5%.
pub const MAX_INIT_DIFFERENCE: f64 = 0.05;

/// The decay horizon every measurement needs before its sigma_max is read as a steady state: below it the
/// initialisation's share `e^(−H)` and the slow end of the transient still show, and the widths of a μP path
/// (whose `lr·wd ∝ m^(gamma − 1)`) are compared at different stages of it.
pub const MIN_RELIABLE_HORIZON: f64 = 5.0;

/// Whether a calibration rests on steady-state measurements, and if not, why.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Reliability {
    pub reliable: bool,
    /// Why not (None when reliable).
    pub reason: Option<String>,
    /// The smallest decay horizon per width, where every entry at that width carries one.
    pub min_horizon_by_width: Vec<(f64, Option<f64>)>,
    /// Entries that carry a drift or init check.
    pub checked_entries: usize,
    /// Every failed drift or init check, in entry order.
    pub failed_checks: Vec<FailedCheck>,
}

/// One entry whose drift or init check is past its bar.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FailedCheck {
    /// Its index in the measurements file.
    pub entry: usize,
    pub param: String,
    pub width: f64,
    pub gamma: f64,
    /// `drift` or `small_init`.
    pub check: &'static str,
    pub value: f64,
    pub bar: f64,
}

/// Checks every width's decay horizons against [`MIN_RELIABLE_HORIZON`]: a width with an entry below it, or
/// without one, makes the calibration unreliable.
pub fn horizon_reliability(ms: &[Measurement]) -> Reliability {
    let mut by_width: BTreeMap<u64, (usize, Option<f64>)> = BTreeMap::new();
    for m in ms {
        let e = by_width.entry(m.width.to_bits()).or_insert((0, Some(f64::INFINITY)));
        match m.decay_horizon {
            Some(h) if h.is_finite() => e.1 = e.1.map(|min| min.min(h)),
            _ => {
                e.0 += 1;
                e.1 = None;
            }
        }
    }
    let mut widths: Vec<(f64, usize, Option<f64>)> = by_width.into_iter().map(|(w, (missing, h))| (f64::from_bits(w), missing, h)).collect();
    widths.sort_by(|a, b| a.0.total_cmp(&b.0));
    let missing: Vec<String> = widths.iter().filter(|w| w.1 > 0).map(|w| format!("{}", w.0)).collect();
    let short: Vec<String> =
        widths.iter().filter_map(|w| w.2.filter(|h| *h < MIN_RELIABLE_HORIZON).map(|h| format!("{} (H = {h:.2})", w.0))).collect();
    let missing_entries: usize = widths.iter().map(|w| w.1).sum();
    let mut reasons = Vec::new();
    if !missing.is_empty() {
        reasons.push(format!(
            "{missing_entries} of {} entries carry no decay_horizon (widths {}), so nothing shows their sigma_max was read at steady state",
            ms.len(),
            missing.join(", ")
        ));
    }
    if !short.is_empty() {
        reasons.push(format!(
            "decay horizon below {MIN_RELIABLE_HORIZON} at widths {}: sigma_max there is still largely the decayed initialisation,              and under lr ∝ 1/m, wd ∝ m^gamma the wider runs are further from steady state, which biases gamma towards 1",
            short.join(", ")
        ));
    }
    let reason = (!reasons.is_empty()).then(|| {
        format!("{}; rerun every width until its hidden matrices reach H = Σ lr_t·wd_t ≥ {MIN_RELIABLE_HORIZON}", reasons.join("; "))
    });
    Reliability {
        reliable: reason.is_none(),
        reason,
        min_horizon_by_width: widths.into_iter().map(|w| (w.0, w.2)).collect(),
        checked_entries: 0,
        failed_checks: Vec::new(),
    }
}




/// The drift and init checks past their bars, in entry order, and how many entries carry either check.
pub fn failed_checks(ms: &[Measurement]) -> (usize, Vec<FailedCheck>) {
    let mut failed = Vec::new();
    let mut checked = 0;
    for (entry, m) in ms.iter().enumerate() {
        let Some(c) = &m.checks else { continue };
        if c.drift.is_some() || c.small_init.is_some() {
            checked += 1;
        }
        for (check, value, bar) in [("drift", c.drift, MAX_DRIFT), ("small_init", c.small_init, MAX_INIT_DIFFERENCE)] {
            // NaN fails too: a check that could not be computed shows nothing settled.
            if let Some(v) = value.filter(|v| !(v.abs() < bar)) {
                failed.push(FailedCheck { entry, param: m.param.clone(), width: m.width, gamma: m.gamma, check, value: v, bar });
            }
        }
    }
    (checked, failed)
}

/// [`horizon_reliability`] and the checks the entries carry: an entry whose drift or init check failed makes
/// the calibration unreliable, and the reason names the entries (the first 10 per check). Entries without
/// checks are judged by their horizon alone.
pub fn reliability(ms: &[Measurement]) -> Reliability {
    let mut r = horizon_reliability(ms);
    let (checked, failed) = failed_checks(ms);
    r.checked_entries = checked;
    if !failed.is_empty() {
        let mut parts = Vec::new();
        for (check, what) in [("drift", "drift over the last timescale"), ("small_init", "a 10× smaller init lands elsewhere")] {
            let of: Vec<&FailedCheck> = failed.iter().filter(|f| f.check == check).collect();
            if of.is_empty() {
                continue;
            }
            let mut named: Vec<String> = of
                .iter()
                .take(10)
                .map(|f| format!("entry {} (`{}`, width {}, gamma {}: {:+.1}%)", f.entry, f.param, f.width, f.gamma, 100.0 * f.value))
                .collect();
            if of.len() > 10 {
                named.push(format!("and {} more", of.len() - 10));
            }
            parts.push(format!(
                "{check} check failed in {} of {checked} checked entries ({what}, bar {:.0}%): {}",
                of.len(),
                100.0 * of[0].bar,
                named.join(", ")
            ));
        }
        let checks = format!("{}: these runs were not at steady state, so their sigma_max is not the one the rule is about", parts.join("; "));
        r.reason = Some(match r.reason.take() {
            Some(horizon) => format!("{checks}; {horizon}"),
            None => checks,
        });
        r.reliable = false;
    }
    r.failed_checks = failed;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::SteadyStateChecks;

    fn measurement(param: &str, gamma: f64, width: f64, wd: f64) -> Measurement {
        Measurement::new(width, gamma, 0.003, wd, param, 1.0 + width / 1000.0)
    }

    #[test]
    fn a_calibration_is_reliable_only_when_every_width_reached_the_minimum_horizon() {
        let at = |w: f64, h: Option<f64>| Measurement { decay_horizon: h, ..measurement("w", 0.5, w, 0.1) };
        let steady = vec![at(64.0, Some(8.0)), at(128.0, Some(6.0)), at(256.0, Some(5.0))];
        let r = horizon_reliability(&steady);
        assert!(r.reliable && r.reason.is_none(), "{r:?}");
        assert_eq!(r.min_horizon_by_width, vec![(64.0, Some(8.0)), (128.0, Some(6.0)), (256.0, Some(5.0))]);

        let short = vec![at(64.0, Some(8.0)), at(128.0, Some(6.0)), at(128.0, Some(2.0)), at(256.0, Some(0.75))];
        let r = horizon_reliability(&short);
        let reason = r.reason.clone().unwrap();
        assert!(!r.reliable && reason.contains("128 (H = 2.00)") && reason.contains("256 (H = 0.75)") && !reason.contains("64 ("), "{reason}");

        let missing = vec![at(64.0, Some(8.0)), at(128.0, None), at(256.0, Some(9.0))];
        let r = horizon_reliability(&missing);
        assert!(!r.reliable && r.reason.unwrap().contains("1 of 3 entries carry no decay_horizon (widths 128)"));
    }


    #[test]
    fn a_failed_drift_or_init_check_makes_the_calibration_unreliable_and_names_the_entry() {
        let at = |w: f64, drift: f64, small_init: Option<f64>| Measurement {
            decay_horizon: Some(8.0),
            checks: Some(SteadyStateChecks { drift: Some(drift), small_init, doubled_lr_wd: Some(0.2) }),
            ..measurement("blocks.0.attn.k.weight", 0.5, w, 0.1)
        };
        // Every check inside its bar (a failed (2·lr, 2·wd) check is reported, not disqualifying).
        let steady = vec![at(64.0, 0.01, Some(-0.02)), at(128.0, -0.029, Some(0.049)), at(256.0, 0.0, None)];
        let r = reliability(&steady);
        assert!(r.reliable && r.reason.is_none() && r.checked_entries == 3, "{r:?}");

        let drifting = vec![at(64.0, 0.01, Some(-0.02)), at(128.0, -0.076, Some(0.01)), at(256.0, 0.0, Some(0.27))];
        let r = reliability(&drifting);
        let reason = r.reason.clone().unwrap();
        assert!(!r.reliable, "{r:?}");
        assert!(reason.contains("drift check failed in 1 of 3") && reason.contains("entry 1 (`blocks.0.attn.k.weight`, width 128, gamma 0.5: -7.6%)"), "{reason}");
        assert!(reason.contains("small_init check failed in 1 of 3") && reason.contains("entry 2 (") && reason.contains("+27.0%"), "{reason}");
        assert_eq!(r.failed_checks.iter().map(|f| (f.entry, f.check)).collect::<Vec<_>>(), vec![(1, "drift"), (2, "small_init")]);

        // A short horizon and a failed check: both reasons, the checks first.
        let mut both = drifting.clone();
        both[0].decay_horizon = Some(2.0);
        let reason = reliability(&both).reason.unwrap();
        assert!(reason.contains("drift check failed") && reason.contains("64 (H = 2.00)"), "{reason}");

        // A NaN drift (no samples to compare) is not a pass.
        let mut nan = steady.clone();
        nan[2].checks.as_mut().unwrap().drift = Some(f64::NAN);
        assert!(!reliability(&nan).reliable);
    }

    #[test]
    fn entries_without_checks_are_judged_by_their_horizon_alone() {
        let ms: Vec<Measurement> = [64.0, 128.0, 256.0].iter().map(|&w| Measurement { decay_horizon: Some(6.0), ..measurement("w", 0.5, w, 0.1) }).collect();
        let r = reliability(&ms);
        assert!(r.reliable && r.checked_entries == 0 && r.failed_checks.is_empty(), "{r:?}");
    }
}

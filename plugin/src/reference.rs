//! Reference profiles and the gain ratio (docs/design.md §1.6, "matching top singular values").
//!
//! - A proxy run's [`crate::Monitor`] ([`crate::MonitorBuilder::record_profile`]) records each matrix-like
//!   parameter's `sigma_max` against training progress (the fraction of planned steps), and writes a versioned
//!   JSON [`ReferenceProfile`] that also records the widths, rule, lr, wd, gamma and alpha.
//! - A target run loads it; the spectra worker asks it for `sigma_reference` at the same progress
//!   (linear interpolation between recorded points, clamped at the ends) and exports
//!   `gain_ratio = sigma_target / sigma_reference`.
//! - The profile is keyed by **progress**, not by decay horizon: at equal progress both runs are at the same
//!   point of their schedule (the same lr and wd multipliers), which a comparison at equal H would not give
//!   once the schedule decays. It also records each parameter's decay horizon `H = Σ_t lr_t·wd_t` against
//!   progress (from the samples' `decay_horizon`), so a profile says whether the proxy itself reached steady
//!   state ([`ReferenceProfile::min_final_horizon`]). A gain ratio is a verdict on the rule only once both
//!   runs are past a few timescales; under `lr ∝ 1/m, wd ∝ m^gamma` with gamma ≤ 1 (every preset) the target
//!   has the smaller H at equal progress, so the alerts gate on the target's H alone
//!   (`gainguard:gain_drift_min_decay_horizon`, docs/runbook.md#gaindrift).
//! - Without a reference, [`SelfBaseline`] compares `sigma_max_normalized = sigma_max / (sqrt(lr/wd)·m^alpha)`
//!   with its own median over an early steady-state window of the same run: drift of the normalized
//!   gain. The window is a range of decay horizon (default H ∈ [3, 4]) so that it is past the transient
//!   whatever the run's length, or a range of progress. It reports
//!   `reference_sigma_max = baseline_normalized · sqrt(lr/wd)·m^alpha`, so the gain ratio means the same
//!   thing in both modes.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use gainguard_protocol::events::{ParamClass, SpectrumSample};

use crate::plan::ScalingPlan;

pub const PROFILE_FORMAT: &str = "gainguard-reference-profile";
pub const PROFILE_VERSION: u32 = 1;

/// Gives the reference sigma_max a sample is compared with.
pub trait GainReference: Send + Sync {
    /// The reference sigma_max for `sample.param` at `sample.progress`, if there is one.
    fn reference_sigma_max(&self, sample: &SpectrumSample) -> Option<f64>;
}

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("reference profile `{path}`: {reason}")]
    File { path: String, reason: String },
    #[error("reference profile and target disagree on parameter names: missing in the reference: [{}]; missing in the target: [{}]", .missing_in_reference.join(", "), .missing_in_target.join(", "))]
    NameMismatch { missing_in_reference: Vec<String>, missing_in_target: Vec<String> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamProfile {
    pub shape: Vec<i64>,
    pub width_multiplier: f64,
    pub lr: f64,
    pub weight_decay: f64,
    /// (progress, sigma_max), sorted by progress.
    pub points: Vec<(f64, f64)>,
    /// (progress, decay horizon H), sorted by progress: empty when the samples carried no horizon (and in
    /// profiles written before it was recorded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decay_horizon: Vec<(f64, f64)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferenceProfile {
    pub format: String,
    pub version: u32,
    pub run: String,
    pub rule: String,
    pub gamma: Option<f64>,
    pub alpha: f64,
    pub base_lr: f64,
    pub base_weight_decay: f64,
    pub planned_steps: Option<u64>,
    /// Matrix-like parameters only.
    pub params: BTreeMap<String, ParamProfile>,
}

impl ReferenceProfile {
    pub fn write_json(&self, path: &Path) -> Result<(), ReferenceError> {
        let text = serde_json::to_string_pretty(self).expect("profile serializes");
        std::fs::write(path, text + "\n")
            .map_err(|e| ReferenceError::File { path: path.display().to_string(), reason: e.to_string() })
    }

    pub fn read_json(path: &Path) -> Result<ReferenceProfile, ReferenceError> {
        let err = |reason: String| ReferenceError::File { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(PROFILE_FORMAT) {
            return Err(err(format!("not a gainguard reference profile (expected \"format\": \"{PROFILE_FORMAT}\")")));
        }
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version != PROFILE_VERSION as u64 {
            return Err(err(format!("version {version} is not supported (this build reads version {PROFILE_VERSION})")));
        }
        let profile: ReferenceProfile = serde_json::from_value(value).map_err(|e| err(e.to_string()))?;
        for (name, p) in &profile.params {
            if p.points.is_empty() || p.points.windows(2).any(|w| w[1].0 < w[0].0) {
                return Err(err(format!("`{name}`: points must be non-empty and sorted by progress")));
            }
        }
        Ok(profile)
    }

    /// Checks that the target's matrix-like parameters are exactly the reference's; lists every name
    /// that differs.
    pub fn check_names(&self, target: &ScalingPlan) -> Result<(), ReferenceError> {
        let target_names: Vec<&str> = target
            .decisions
            .iter()
            .filter(|d| d.class == ParamClass::MatrixLike && d.tied_to.is_none())
            .map(|d| d.name.as_str())
            .collect();
        let missing_in_reference: Vec<String> =
            target_names.iter().filter(|n| !self.params.contains_key(**n)).map(|n| n.to_string()).collect();
        let missing_in_target: Vec<String> =
            self.params.keys().filter(|n| !target_names.contains(&n.as_str())).cloned().collect();
        if missing_in_reference.is_empty() && missing_in_target.is_empty() {
            Ok(())
        } else {
            Err(ReferenceError::NameMismatch { missing_in_reference, missing_in_target })
        }
    }

    /// sigma_max of `param` at `progress`, linearly interpolated, clamped to the recorded range.
    pub fn sigma_at(&self, param: &str, progress: f64) -> Option<f64> {
        interpolate(&self.params.get(param)?.points, progress)
    }

    /// Decay horizon of `param` at `progress` in the reference run, where it was recorded.
    pub fn horizon_at(&self, param: &str, progress: f64) -> Option<f64> {
        interpolate(&self.params.get(param)?.decay_horizon, progress)
    }

    /// The smallest final decay horizon over the parameters, with that parameter's name: whether the
    /// reference run reached steady state. None when any parameter has no recorded horizon.
    pub fn min_final_horizon(&self) -> Option<(String, f64)> {
        let mut min: Option<(String, f64)> = None;
        for (name, p) in &self.params {
            let h = p.decay_horizon.last()?.1;
            if min.as_ref().is_none_or(|m| h < m.1) {
                min = Some((name.clone(), h));
            }
        }
        min
    }
}

/// `y` at `x` on the piecewise-linear curve through `pts` (sorted by x), clamped at the ends.
fn interpolate(pts: &[(f64, f64)], x: f64) -> Option<f64> {
    let first = pts.first()?;
    let last = pts.last()?;
    if x <= first.0 {
        return Some(first.1);
    }
    if x >= last.0 {
        return Some(last.1);
    }
    let i = pts.partition_point(|(p, _)| *p <= x);
    let (x0, y0) = pts[i - 1];
    let (x1, y1) = pts[i];
    if x1 == x0 {
        return Some(y1);
    }
    Some(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
}

impl GainReference for ReferenceProfile {
    fn reference_sigma_max(&self, sample: &SpectrumSample) -> Option<f64> {
        self.sigma_at(&sample.param, sample.progress?)
    }
}

/// Collects a run's sigma_max samples into a [`ReferenceProfile`]: the sampler's listener when a
/// [`crate::Monitor`] records ([`crate::MonitorBuilder::record_profile`]).
#[derive(Clone, Default)]
pub(crate) struct ProfileRecorder {
    /// Per parameter: (progress, sigma_max) and (progress, decay horizon) points.
    points: Arc<Mutex<BTreeMap<String, (Vec<(f64, f64)>, Vec<(f64, f64)>)>>>,
}

impl ProfileRecorder {
    pub fn new() -> ProfileRecorder {
        ProfileRecorder::default()
    }

    pub fn record(&self, sample: &SpectrumSample) {
        if sample.class != ParamClass::MatrixLike || sample.nonfinite {
            return;
        }
        if let (Some(progress), Some(sigma)) = (sample.progress, sample.sigma_max) {
            let mut points = self.points.lock().expect("recorder lock");
            let (sigmas, horizons) = points.entry(sample.param.clone()).or_default();
            sigmas.push((progress, sigma));
            if let Some(h) = sample.decay_horizon {
                horizons.push((progress, h));
            }
        }
    }

    /// A listener for the spectra sampler.
    pub fn listener(&self) -> Box<dyn FnMut(&SpectrumSample, u64) + Send> {
        let me = self.clone();
        Box::new(move |s, _step| me.record(s))
    }

    /// Builds the profile for the matrix-like parameters of `plan`.
    pub fn finish(&self, run: &str, plan: &ScalingPlan, alpha: f64, planned_steps: Option<u64>) -> ReferenceProfile {
        let points = self.points.lock().expect("recorder lock");
        let params = plan
            .decisions
            .iter()
            .filter(|d| d.class == ParamClass::MatrixLike && d.tied_to.is_none())
            .filter_map(|d| {
                let (mut pts, mut horizons) = points.get(&d.name)?.clone();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                horizons.sort_by(|a, b| a.0.total_cmp(&b.0));
                Some((
                    d.name.clone(),
                    ParamProfile {
                        shape: d.shape.clone(),
                        width_multiplier: d.width_multiplier,
                        lr: d.lr,
                        weight_decay: d.weight_decay,
                        points: pts,
                        decay_horizon: horizons,
                    },
                ))
            })
            .collect();
        ReferenceProfile {
            format: PROFILE_FORMAT.into(),
            version: PROFILE_VERSION,
            run: run.into(),
            rule: plan.rule.preset.name().into(),
            gamma: plan.rule.reported_gamma(),
            alpha,
            base_lr: plan.base_lr,
            base_weight_decay: plan.base_weight_decay,
            planned_steps,
            params,
        }
    }
}

/// Where [`SelfBaseline`] takes its baseline: a range of training progress or of decay horizon.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BaselineWindow {
    /// Progress (step / planned steps) in `[from, to)`; needs `planned_steps`.
    Progress { from: f64, to: f64 },
    /// Decay horizon H in `[from, to)`; needs samples that carry `decay_horizon`. Past the transient whatever
    /// the run's length and rates.
    DecayHorizon { from: f64, to: f64 },
}

/// The fallback without a proxy profile: each parameter's normalized gain against its own median over
/// an early steady-state window (default: decay horizon H ∈ [3, 4)).
pub struct SelfBaseline {
    window: BaselineWindow,
    state: Mutex<BTreeMap<String, (Vec<f64>, Option<f64>)>>,
}

impl SelfBaseline {
    /// A baseline over progress `[from, to)`.
    pub fn new(from: f64, to: f64) -> SelfBaseline {
        SelfBaseline::with_window(BaselineWindow::Progress { from, to })
    }

    pub fn with_window(window: BaselineWindow) -> SelfBaseline {
        SelfBaseline { window, state: Mutex::new(BTreeMap::new()) }
    }
}

impl Default for SelfBaseline {
    fn default() -> Self {
        SelfBaseline::with_window(BaselineWindow::DecayHorizon { from: 3.0, to: 4.0 })
    }
}

impl GainReference for SelfBaseline {
    fn reference_sigma_max(&self, sample: &SpectrumSample) -> Option<f64> {
        let (position, from, to) = match self.window {
            BaselineWindow::Progress { from, to } => (sample.progress?, from, to),
            BaselineWindow::DecayHorizon { from, to } => (sample.decay_horizon?, from, to),
        };
        let (sigma, normalized) = (sample.sigma_max?, sample.sigma_max_normalized?);
        if normalized <= 0.0 || !normalized.is_finite() {
            return None;
        }
        let mut state = self.state.lock().expect("baseline lock");
        let (window, baseline) = state.entry(sample.param.clone()).or_default();
        if position < to {
            if position >= from {
                window.push(normalized);
            }
            return None;
        }
        if baseline.is_none() && !window.is_empty() {
            window.sort_by(f64::total_cmp);
            *baseline = Some(window[window.len() / 2]);
        }
        // reference_sigma = baseline_normalized · (sigma / normalized) = baseline · sqrt(lr/wd)·m^alpha
        baseline.map(|b| b * sigma / normalized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(param: &str, progress: f64, sigma: f64, normalized: Option<f64>) -> SpectrumSample {
        SpectrumSample {
            sigma_max: Some(sigma),
            top_k: vec![sigma],
            iterations: 1,
            sigma_max_normalized: normalized,
            progress: Some(progress),
            ..SpectrumSample::empty(param, None, ParamClass::MatrixLike)
        }
    }

    fn profile(points: Vec<(f64, f64)>) -> ReferenceProfile {
        let mut params = BTreeMap::new();
        params.insert("w".to_string(), ParamProfile { shape: vec![4, 4], width_multiplier: 1.0, lr: 1e-3, weight_decay: 0.1, points, decay_horizon: vec![] });
        ReferenceProfile {
            format: PROFILE_FORMAT.into(),
            version: PROFILE_VERSION,
            run: "proxy".into(),
            rule: "paper".into(),
            gamma: Some(0.5),
            alpha: 0.75,
            base_lr: 1e-3,
            base_weight_decay: 0.1,
            planned_steps: Some(100),
            params,
        }
    }

    #[test]
    fn sigma_is_interpolated_linearly_and_clamped_at_the_ends() {
        let p = profile(vec![(0.0, 1.0), (0.5, 2.0), (1.0, 4.0)]);
        assert_eq!(p.sigma_at("w", 0.25), Some(1.5));
        assert_eq!(p.sigma_at("w", 0.75), Some(3.0));
        assert_eq!(p.sigma_at("w", -1.0), Some(1.0));
        assert_eq!(p.sigma_at("w", 2.0), Some(4.0));
        assert_eq!(p.sigma_at("other", 0.5), None);
    }

    #[test]
    fn a_profile_round_trips_and_a_wrong_file_is_named() {
        let dir = std::env::temp_dir().join(format!("gg-ref-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = profile(vec![(0.1, 1.0), (0.9, 1.2)]);
        p.write_json(&dir.join("ref.json")).unwrap();
        assert_eq!(ReferenceProfile::read_json(&dir.join("ref.json")).unwrap(), p);
        std::fs::write(dir.join("bad.json"), r#"{"format": "something-else"}"#).unwrap();
        let e = ReferenceProfile::read_json(&dir.join("bad.json")).unwrap_err().to_string();
        assert!(e.contains("bad.json") && e.contains("not a gainguard reference profile"), "{e}");
        let mut v2 = serde_json::to_value(&p).unwrap();
        v2["version"] = 99.into();
        std::fs::write(dir.join("v99.json"), v2.to_string()).unwrap();
        assert!(ReferenceProfile::read_json(&dir.join("v99.json")).unwrap_err().to_string().contains("version 99"));
    }

    #[test]
    fn the_recorder_keeps_matrix_like_finite_samples_sorted_by_progress() {
        let r = ProfileRecorder::new();
        r.record(&sample("w", 0.5, 2.0, None));
        r.record(&sample("w", 0.1, 1.0, None));
        let mut nan = sample("w", 0.3, 9.0, None);
        nan.nonfinite = true;
        r.record(&nan);
        let pts = r.points.lock().unwrap()["w"].0.clone();
        let mut sorted = pts.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(sorted, vec![(0.1, 1.0), (0.5, 2.0)]);
    }

    #[test]
    fn the_recorder_keeps_the_decay_horizon_against_progress_and_the_profile_reports_the_smallest_final_one() {
        let r = ProfileRecorder::new();
        for (param, h_per_progress) in [("a", 10.0), ("b", 4.0)] {
            for p in [0.5, 1.0, 0.25] {
                r.record(&SpectrumSample { decay_horizon: Some(h_per_progress * p), ..sample(param, p, 1.0, None) });
            }
        }
        let decision = |name: &str| crate::plan::ParamDecision {
            name: name.into(),
            shape: vec![8, 8],
            base_shape: vec![4, 4],
            class: ParamClass::MatrixLike,
            layer: None,
            fan_in_dim: Some(1),
            width_multiplier: 2.0,
            lr: 5e-4,
            weight_decay: 0.14,
            tied_to: None,
            width_dims: vec![0, 1],
            role: None,
        };
        let plan = ScalingPlan {
            rule: crate::rule::Rule::default(),
            base_lr: 1e-3,
            base_weight_decay: 0.1,
            decisions: vec![decision("a"), decision("b")],
            warnings: vec![],
        };
        let p = r.finish("proxy", &plan, 0.75, Some(100));
        assert_eq!(p.params["a"].decay_horizon, vec![(0.25, 2.5), (0.5, 5.0), (1.0, 10.0)]);
        assert_eq!(p.horizon_at("a", 0.75), Some(7.5));
        assert_eq!(p.min_final_horizon(), Some(("b".to_string(), 4.0)));
        // A profile without horizons (written before they were recorded) reads back, and says nothing.
        let mut old = serde_json::to_value(&p).unwrap();
        old["params"]["a"].as_object_mut().unwrap().remove("decay_horizon");
        let back: ReferenceProfile = serde_json::from_value(old).unwrap();
        assert_eq!(back.min_final_horizon(), None);
    }

    #[test]
    fn the_default_self_baseline_is_taken_between_decay_horizons_3_and_4_whatever_the_progress() {
        let b = SelfBaseline::default();
        let at = |h: f64, n: f64| SpectrumSample { decay_horizon: Some(h), ..sample("w", 0.9, 10.0 * n, Some(n)) };
        // A transient (H < 3) far off, then the window: normalized 2.0 and 4.0 (median of two: the upper, 4.0).
        for (h, n) in [(0.5, 50.0), (2.9, 9.0), (3.0, 2.0), (3.5, 4.0)] {
            assert_eq!(b.reference_sigma_max(&at(h, n)), None);
        }
        let r = b.reference_sigma_max(&at(6.0, 2.0)).unwrap();
        assert!((20.0 / r - 0.5).abs() < 1e-12, "{r}");
        // Without a horizon on the sample there is no reference under this window.
        assert_eq!(b.reference_sigma_max(&sample("w", 0.9, 1.0, Some(1.0))), None);
    }

    #[test]
    fn self_baseline_reports_the_ratio_of_normalized_gain_to_its_early_median() {
        let b = SelfBaseline::new(0.1, 0.3);
        // Window: normalized gains 1.0, 2.0, 3.0 (median 2.0); sigma = 10 × normalized.
        for (p, n) in [(0.05, 100.0), (0.1, 1.0), (0.2, 3.0), (0.25, 2.0)] {
            assert_eq!(b.reference_sigma_max(&sample("w", p, 10.0 * n, Some(n))), None);
        }
        // Later: normalized 3.0 → reference = 2.0 × (30 / 3) = 20, gain ratio 30 / 20 = 1.5 = 3.0 / 2.0.
        let r = b.reference_sigma_max(&sample("w", 0.5, 30.0, Some(3.0))).unwrap();
        assert!((30.0 / r - 1.5).abs() < 1e-12, "{r}");
    }
}

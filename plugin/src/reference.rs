//! Reference profiles and the gain ratio (docs/design.md §1.6, "matching top singular values").
//!
//! - A proxy run records each matrix-like parameter's `sigma_max` against training progress (the
//!   fraction of planned steps) with a [`ProfileRecorder`], and writes a versioned JSON
//!   [`ReferenceProfile`] that also records the widths, rule, lr, wd, gamma and alpha.
//! - A target run loads it; the spectra worker asks it for `sigma_reference` at the same progress
//!   (linear interpolation between recorded points, clamped at the ends) and exports
//!   `gain_ratio = sigma_target / sigma_reference`.
//! - Without a reference, [`SelfBaseline`] compares `sigma_max_normalized = sigma_max / (sqrt(lr/wd)·m^alpha)`
//!   with its own median over an early steady-state window of the same run: drift of the normalized
//!   gain. It reports `reference_sigma_max = baseline_normalized · sqrt(lr/wd)·m^alpha`, so the gain ratio
//!   means the same thing in both modes.

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
        let pts = &self.params.get(param)?.points;
        let first = pts.first()?;
        let last = pts.last()?;
        if progress <= first.0 {
            return Some(first.1);
        }
        if progress >= last.0 {
            return Some(last.1);
        }
        let i = pts.partition_point(|(p, _)| *p <= progress);
        let (p0, s0) = pts[i - 1];
        let (p1, s1) = pts[i];
        if p1 == p0 {
            return Some(s1);
        }
        Some(s0 + (s1 - s0) * (progress - p0) / (p1 - p0))
    }
}

impl GainReference for ReferenceProfile {
    fn reference_sigma_max(&self, sample: &SpectrumSample) -> Option<f64> {
        self.sigma_at(&sample.param, sample.progress?)
    }
}

/// Collects a run's sigma_max samples into a [`ReferenceProfile`]. Subscribe [`ProfileRecorder::listener`]
/// to the spectra sampler.
#[derive(Clone, Default)]
pub struct ProfileRecorder {
    points: Arc<Mutex<BTreeMap<String, Vec<(f64, f64)>>>>,
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
            self.points.lock().expect("recorder lock").entry(sample.param.clone()).or_default().push((progress, sigma));
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
                let mut pts = points.get(&d.name)?.clone();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                Some((
                    d.name.clone(),
                    ParamProfile { shape: d.shape.clone(), width_multiplier: d.width_multiplier, lr: d.lr, weight_decay: d.weight_decay, points: pts },
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

/// The fallback without a proxy profile: each parameter's normalized gain against its own median over
/// an early steady-state window of progress `[from, to]` (default 0.1–0.25 of planned steps).
pub struct SelfBaseline {
    from: f64,
    to: f64,
    state: Mutex<BTreeMap<String, (Vec<f64>, Option<f64>)>>,
}

impl SelfBaseline {
    pub fn new(from: f64, to: f64) -> SelfBaseline {
        SelfBaseline { from, to, state: Mutex::new(BTreeMap::new()) }
    }
}

impl Default for SelfBaseline {
    fn default() -> Self {
        SelfBaseline::new(0.1, 0.25)
    }
}

impl GainReference for SelfBaseline {
    fn reference_sigma_max(&self, sample: &SpectrumSample) -> Option<f64> {
        let (progress, sigma, normalized) = (sample.progress?, sample.sigma_max?, sample.sigma_max_normalized?);
        if normalized <= 0.0 || !normalized.is_finite() {
            return None;
        }
        let mut state = self.state.lock().expect("baseline lock");
        let (window, baseline) = state.entry(sample.param.clone()).or_default();
        if progress < self.to {
            if progress >= self.from {
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
        params.insert("w".to_string(), ParamProfile { shape: vec![4, 4], width_multiplier: 1.0, lr: 1e-3, weight_decay: 0.1, points });
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
        let pts = r.points.lock().unwrap()["w"].clone();
        let mut sorted = pts.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(sorted, vec![(0.1, 1.0), (0.5, 2.0)]);
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

//! Which alerts of dashboards/prometheus/gainguard.rules.yml would fire, judged on the history with the same
//! conditions, windows and `for:` durations as the rules (the bands, the gate and the `for:`s are read from
//! the file, [`super::rules`]). An alert is `pending` while its condition holds for less than its `for:`,
//! `firing` once it has held for all of it. The history keeps one point per interval, so a condition is
//! judged at most once per interval, as Prometheus judges it once per evaluation interval.
//!
//! Judged here: GainDrift, GainDriftSevere, LossNotFinite, LossSpike, NonFiniteParameters, TrainerStalled,
//! TrainerDown, TelemetryEventsDropped, SpectraStalled, SpectrumSamplesDropped, GpuMemoryNearlyFull and
//! NvmlDown. The others need what only Prometheus has (ExporterDown: its own scrapes; IngestRejected, the
//! throttling, power-cap and Xid alerts: series the history does not keep).

use std::collections::BTreeMap;

use serde::Serialize;

use super::rules::Rules;
use super::store::{Point, Ring};
use super::{
    GpuHist, History, RunHist, DECAY_HORIZON, EVENTS_DROPPED, GAIN_RATIO, LOSS, LOSS_NONFINITE, NONFINITE_PARAMETERS,
    SPECTRUM_DROPPED,
};
use crate::sources::{lock, RunKey};

/// Thresholds written in the rules' expressions, each with the text of the rules file it restates (a test
/// checks that the file still says so).
pub const LOSS_SPIKE_RATIO: (f64, &str) = (1.5, "gainguard:loss:baseline_median30m > 1.5)");
pub const LOSS_SPIKE_MIN_RISE: (f64, &str) = (0.1, "gainguard:loss:baseline_median30m > 0.1)");
pub const STALLED_AFTER: (f64, &str) = (600.0, "gainguard_trainer_last_step_timestamp_seconds > 600)");
pub const SPECTRA_STALLED_AFTER: (f64, &str) = (900.0, "(time() - gainguard_spectrum_last_sample_timestamp_seconds > 900)");
pub const SPECTRA_STEPPING_WITHIN: (f64, &str) = (300.0, "(time() - gainguard_trainer_last_step_timestamp_seconds < 300)");
pub const FINISHED_PROGRESS: (f64, &str) = (0.999, "gainguard_progress_ratio >= 0.999");
pub const GPU_MEMORY_FULL: (f64, &str) = (0.95, "gainguard_gpu_memory_total_bytes > 0.95");
/// Windows of the rules, in seconds, with their text.
pub const GAIN_AVG_WINDOW: (f64, &str) = (300.0, "avg_over_time(gainguard_gain_ratio{class=\"matrix_like\"}[5m])");
pub const LOSS_SHORT_WINDOW: (f64, &str) = (180.0, "quantile_over_time(0.5, gainguard:loss:finite[3m])");
pub const LOSS_BASELINE_WINDOW: (f64, &str) = (1800.0, "quantile_over_time(0.5, gainguard:loss:finite[30m] offset 3m)");
pub const NONFINITE_WINDOW: (f64, &str) = (300.0, "increase(gainguard_loss_nonfinite_total[5m]) > 0");
pub const EVENTS_DROPPED_WINDOW: (f64, &str) = (300.0, "rate(gainguard_events_dropped_total[5m]) > 0");
pub const SPECTRUM_DROPPED_WINDOW: (f64, &str) = (300.0, "rate(gainguard_spectrum_samples_dropped_total[5m]) > 0");

/// An alert that would be pending or firing now.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Alert {
    pub alert: String,
    pub severity: String,
    /// `pending` or `firing`.
    pub state: &'static str,
    pub labels: BTreeMap<String, String>,
    /// The value the rule's expression would have (the 5-minute average gain ratio, the loss ratio, ...).
    pub value: f64,
    /// Unix time since which the condition has held.
    pub active_since: f64,
    pub for_seconds: f64,
    pub runbook_url: String,
}

/// The judge's view: the history's clock and the rules.
struct Judge<'a> {
    history: &'a History,
    rules: &'a Rules,
    /// Tenths of a second since the history's epoch.
    now: u32,
    out: Vec<Alert>,
}

fn ds(seconds: f64) -> u32 {
    (seconds * 10.0).round() as u32
}

fn mean(points: impl Iterator<Item = Point>) -> Option<f64> {
    let (mut n, mut sum) = (0usize, 0.0f64);
    for p in points {
        n += 1;
        sum += p.v as f64;
    }
    (n > 0).then(|| sum / n as f64)
}

/// Prometheus' `quantile_over_time(0.5, ...)`: linear interpolation between the closest ranks.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = 0.5 * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (rank - lo as f64))
}

/// How much a counter series rose in `(t - window, t]`: the rise over the window's points, or, as the rule's
/// middle term says for a counter first seen already above 0, its value when it has no point before.
fn increase(ring: &Ring, t: u32, window: u32) -> Option<f64> {
    let from = t.saturating_sub(window);
    let last = ring.at(t)?;
    if last.t <= from {
        return None;
    }
    let mut inc = 0.0;
    let mut prev = ring.at(from).map(|p| p.v as f64);
    let first_seen = prev.is_none();
    for p in ring.window(from, t) {
        let v = p.v as f64;
        match prev {
            // A fall is a restart: the new total counts from 0.
            Some(q) => inc += if v >= q { v - q } else { v },
            None if first_seen => inc += v,
            None => {}
        }
        prev = Some(v);
    }
    Some(inc)
}

impl Judge<'_> {
    fn interval(&self) -> u32 {
        self.history.budget.interval_ds
    }

    /// Since when `cond` has held without a break, judged every interval back from now (at most 240
    /// judgements across `for_`), and its value now; `None` when it does not hold now.
    fn held(&self, for_: u32, cond: impl Fn(u32) -> Option<f64>) -> Option<(u32, f64)> {
        let value = cond(self.now)?;
        let step = self.interval().max(for_ / 240).max(1);
        let mut since = self.now;
        let mut t = self.now;
        while self.now - t < for_ + step {
            let Some(prev) = t.checked_sub(step) else { break };
            if cond(prev).is_none() {
                break;
            }
            since = prev;
            t = prev;
        }
        Some((since, value))
    }

    fn push(&mut self, name: &str, labels: BTreeMap<String, String>, since_ds: u32, value: f64) {
        let Some(rule) = self.rules.alert(name) else { return };
        let for_ = ds(rule.for_.as_secs_f64());
        self.out.push(Alert {
            alert: name.to_string(),
            severity: rule.severity.clone(),
            state: if self.now.saturating_sub(since_ds) >= for_ { "firing" } else { "pending" },
            labels,
            value,
            active_since: self.history.budget.unix(since_ds),
            for_seconds: rule.for_.as_secs_f64(),
            runbook_url: rule.runbook_url.clone(),
        });
    }

    fn for_of(&self, name: &str) -> u32 {
        self.rules.alert(name).map_or(0, |r| ds(r.for_.as_secs_f64()))
    }

    /// A timed condition that the history can judge at any past moment.
    fn judge_held(&mut self, name: &str, labels: BTreeMap<String, String>, cond: impl Fn(u32) -> Option<f64>) {
        if let Some((since, value)) = self.held(self.for_of(name), cond) {
            self.push(name, labels, since, value);
        }
    }

    /// A condition that holds from a known moment (a time `since`, Unix seconds) on.
    fn judge_since(&mut self, name: &str, labels: BTreeMap<String, String>, since_unix: f64, value: f64) {
        let since = self.history.budget.tenths(since_unix).min(self.now);
        self.push(name, labels, since, value);
    }

    fn run(&mut self, key: &RunKey, h: &RunHist) {
        let run_labels = || {
            BTreeMap::from([("run".to_string(), key.run.clone()), ("rank".into(), key.rank.clone()), ("host".into(), key.host.clone())])
        };
        let band = self.rules.band;
        let avg_window = ds(GAIN_AVG_WINDOW.0);
        for p in h.params().filter(|p| p.labels.class == "matrix_like") {
            let Some(gain) = p.series[GAIN_RATIO].ring() else { continue };
            let horizon = p.series[DECAY_HORIZON].ring();
            // gainguard:gain_ratio:steady_avg5m at t.
            let steady = |t: u32| {
                let avg = mean(gain.window(t.saturating_sub(avg_window), t))?;
                match horizon.and_then(|r| r.at(t)) {
                    Some(hz) if (hz.v as f64) < band.min_decay_horizon => None,
                    _ => Some(avg),
                }
            };
            let labels = || {
                let mut l = run_labels();
                l.insert("param".into(), p.labels.param.clone());
                l.insert("layer".into(), p.labels.layer.clone());
                l.insert("class".into(), p.labels.class.into());
                l
            };
            let outside = |lo: f64, hi: f64| move |t: u32| steady(t).filter(|a| *a < lo || *a > hi);
            self.judge_held("GainDrift", labels(), outside(band.lower, band.upper));
            self.judge_held("GainDriftSevere", labels(), outside(band.severe_lower, band.severe_upper));
        }

        // LossNotFinite: a non-finite step in the last 5 minutes, or the latest loss NaN.
        let nonfinite = h.series[LOSS_NONFINITE].ring().and_then(|r| increase(r, self.now, ds(NONFINITE_WINDOW.0))).filter(|n| *n > 0.0);
        let loss_nan = h.series[LOSS].ring().and_then(|r| r.last()).is_some_and(|p| p.v.is_nan());
        if let Some(n) = nonfinite.or(loss_nan.then_some(f64::NAN)) {
            self.push("LossNotFinite", run_labels(), self.now, n);
        }

        if let Some(loss) = h.series[LOSS].ring() {
            let (short, base) = (ds(LOSS_SHORT_WINDOW.0), ds(LOSS_BASELINE_WINDOW.0));
            let finite = |from: u32, to: u32| loss.window(from, to).map(|p| p.v as f64).filter(|v| v.is_finite()).collect::<Vec<_>>();
            let spike = |t: u32| {
                let m3 = median(finite(t.saturating_sub(short), t))?;
                let end = t.checked_sub(short)?;
                let m30 = median(finite(end.saturating_sub(base), end))?;
                (m3 / m30 > LOSS_SPIKE_RATIO.0 && m3 - m30 > LOSS_SPIKE_MIN_RISE.0).then_some(m3 / m30)
            };
            self.judge_held("LossSpike", run_labels(), spike);
        }

        let bad_tensors = h.series[NONFINITE_PARAMETERS].ring().and_then(|r| r.last()).map_or(0.0, |p| p.v as f64);
        let bad_samples = h.params().filter(|p| p.nonfinite).count() as f64;
        if bad_tensors > 0.0 || bad_samples > 0.0 {
            self.push("NonFiniteParameters", run_labels(), self.now, if bad_tensors > 0.0 { bad_tensors } else { bad_samples });
        }

        let now_unix = self.history.budget.unix(self.now);
        if let (true, Some(last)) = (h.up, h.last_step_timestamp) {
            if now_unix - last > STALLED_AFTER.0 {
                self.judge_since("TrainerStalled", run_labels(), last + STALLED_AFTER.0, now_unix - last);
            }
        }
        let finished = h.progress().is_some_and(|p| p >= FINISHED_PROGRESS.0) || h.exit_reason.as_deref() == Some("finished");
        if let (false, Some(down), false) = (h.up, h.down_since, finished) {
            self.judge_since("TrainerDown", run_labels(), down, 0.0);
        }
        if let (Some(spectrum), Some(step)) = (h.last_spectrum, h.last_step_timestamp) {
            if now_unix - spectrum > SPECTRA_STALLED_AFTER.0 && now_unix - step < SPECTRA_STEPPING_WITHIN.0 {
                self.judge_since("SpectraStalled", run_labels(), spectrum + SPECTRA_STALLED_AFTER.0, now_unix - spectrum);
            }
        }
        for (name, i, window) in [
            ("TelemetryEventsDropped", EVENTS_DROPPED, EVENTS_DROPPED_WINDOW.0),
            ("SpectrumSamplesDropped", SPECTRUM_DROPPED, SPECTRUM_DROPPED_WINDOW.0),
        ] {
            if let Some(r) = h.series[i].ring() {
                let w = ds(window);
                // The rule's rate() needs two samples in the window; so does the rise here.
                let rate = |t: u32| {
                    let from = t.saturating_sub(w);
                    (r.at(from).is_some() || r.window(from, t).nth(1).is_some()).then_some(())?;
                    increase(r, t, w).filter(|n| *n > 0.0).map(|n| n / window)
                };
                self.judge_held(name, run_labels(), rate);
            }
        }
    }

    fn gpus(&mut self, gpus: &BTreeMap<String, GpuHist>, up: Option<&Ring>) {
        let history = self.history;
        let host = || history.host.clone();
        for g in gpus.values() {
            let (Some(used), Some(total)) = (g.series[1].ring(), g.series[2].ring()) else { continue };
            let full = |t: u32| {
                let (u, tot) = (used.at(t)?, total.at(t)?);
                let r = u.v as f64 / tot.v as f64;
                (r > GPU_MEMORY_FULL.0).then_some(r)
            };
            let labels = BTreeMap::from([
                ("host".to_string(), host()),
                ("gpu".into(), g.gpu.clone()),
                ("uuid".into(), g.uuid.clone()),
                ("name".into(), g.name.clone()),
            ]);
            self.judge_held("GpuMemoryNearlyFull", labels, full);
        }
        if let (true, Some(up)) = (self.history.nvml_enabled, up) {
            let down = |t: u32| up.at(t).filter(|p| p.v == 0.0).map(|_| 0.0);
            self.judge_held("NvmlDown", BTreeMap::from([("host".to_string(), host())]), down);
        }
    }
}

/// Every alert that would be pending or firing now, firing first, then by name.
pub fn evaluate(history: &History, rules: &Rules) -> Vec<Alert> {
    let now = history.budget.tenths(gainguard_protocol::events::unix_now());
    let mut judge = Judge { history, rules, now, out: Vec::new() };
    for (key, run) in history.runs() {
        judge.run(&key, &lock(&run));
    }
    history.with_gpus(|gpus, up| judge.gpus(gpus, up));
    let mut out = judge.out;
    out.sort_by(|a, b| (a.state != "firing", &a.alert, &a.labels).cmp(&(b.state != "firing", &b.alert, &b.labels)));
    out
}

#[cfg(test)]
mod tests {
    use super::super::rules::RULES_YAML;
    use super::*;

    #[test]
    fn every_threshold_and_window_restated_here_is_what_the_rules_file_says() {
        let restated = [
            LOSS_SPIKE_RATIO,
            LOSS_SPIKE_MIN_RISE,
            STALLED_AFTER,
            SPECTRA_STALLED_AFTER,
            SPECTRA_STEPPING_WITHIN,
            FINISHED_PROGRESS,
            GPU_MEMORY_FULL,
            GAIN_AVG_WINDOW,
            LOSS_SHORT_WINDOW,
            LOSS_BASELINE_WINDOW,
            NONFINITE_WINDOW,
            EVENTS_DROPPED_WINDOW,
            SPECTRUM_DROPPED_WINDOW,
        ];
        for (value, text) in restated {
            assert!(RULES_YAML.contains(text), "the rules file no longer says `{text}` (restated here as {value})");
        }
        let rules = Rules::parse(RULES_YAML).unwrap();
        for name in [
            "GainDrift",
            "GainDriftSevere",
            "LossNotFinite",
            "LossSpike",
            "NonFiniteParameters",
            "TrainerStalled",
            "TrainerDown",
            "TelemetryEventsDropped",
            "SpectraStalled",
            "SpectrumSamplesDropped",
            "GpuMemoryNearlyFull",
            "NvmlDown",
        ] {
            assert!(rules.alert(name).is_some(), "the rules file has no alert {name}");
        }
    }

    use super::super::{HistorySettings, ParamHist};
    use crate::sources::ParamLabels;
    use gainguard_protocol::events::unix_now;

    /// A history whose epoch is an hour ago, holding for run `r` one matrix per (name, gain, horizon, seconds
    /// of samples up to now), one sample per 15 s.
    fn history(params: &[(&str, f64, f64, f64)]) -> std::sync::Arc<History> {
        let now = unix_now();
        let settings = HistorySettings { interval: std::time::Duration::from_secs(15), retention: std::time::Duration::from_secs(3600), max_bytes: 1 << 20 };
        let h = History::with_epoch(settings, false, "node".into(), &prometheus::Registry::new(), now - 3600.0).unwrap();
        let entry = h.run_entry(&RunKey { run: "r".into(), rank: "0".into(), host: "node".into() });
        let mut r = lock(&entry);
        for (slot, (name, gain, horizon, seconds)) in params.iter().enumerate() {
            let labels = ParamLabels { param: name.to_string(), layer: "0".into(), class: "matrix_like", slot };
            let mut p = ParamHist { labels, series: Default::default(), nonfinite: false };
            let n = (seconds / 15.0) as usize;
            for k in 0..=n {
                let t = now - 15.0 * (n - k) as f64;
                h.budget.record(&mut p.series[GAIN_RATIO], t, *gain);
                h.budget.record(&mut p.series[DECAY_HORIZON], t, *horizon);
            }
            r.params.push(Some(p));
        }
        drop(r);
        h
    }

    #[test]
    fn gain_drift_fires_after_its_for_is_pending_before_and_is_silent_below_the_horizon_gate() {
        // 11 minutes at 0.7 (outside [0.8, 1.25], inside [0.5, 2]) past the gate; the same below it; 4 minutes
        // past the gate; 11 minutes in the band.
        let h = history(&[("long", 0.7, 5.0, 660.0), ("gated", 0.7, 2.0, 660.0), ("short", 0.7, 5.0, 240.0), ("fine", 1.1, 5.0, 660.0)]);
        let alerts = evaluate(&h, Rules::builtin());
        let state = |param: &str, alert: &str| {
            alerts.iter().find(|a| a.alert == alert && a.labels["param"] == param).map(|a| a.state)
        };
        assert_eq!(state("long", "GainDrift"), Some("firing"), "{alerts:?}");
        assert_eq!(state("short", "GainDrift"), Some("pending"), "{alerts:?}");
        assert_eq!(state("gated", "GainDrift"), None, "{alerts:?}");
        assert_eq!(state("fine", "GainDrift"), None, "{alerts:?}");
        assert!(alerts.iter().all(|a| a.alert != "GainDriftSevere"), "{alerts:?}");
        let long = alerts.iter().find(|a| a.labels["param"] == "long").unwrap();
        assert!((long.value - 0.7).abs() < 1e-6 && long.for_seconds == 600.0 && long.runbook_url.ends_with("#gaindrift"), "{long:?}");
    }

    #[test]
    fn the_median_interpolates_as_quantile_over_time_does() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![1.0, 2.0, 3.0, 10.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}

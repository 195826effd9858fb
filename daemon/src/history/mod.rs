//! The history behind the live page: a bounded ring of points per series, fed by the same events as the
//! metrics (the `history` source) and by the NVML poller, read as JSON under `/api/v1/` ([`api`]), and judged
//! by the same conditions as the alert rules ([`alerts`], [`rules`]).
//!
//! Bound: every series keeps at most one point per `interval` and at most `retention / interval` points, and
//! takes its full ring's bytes from `max_bytes` when it is created; a series that would pass the cap is not
//! kept and is counted (`gainguard_daemon_history_series_refused_total`). The bytes held are exported as
//! `gainguard_daemon_history_bytes` beside the cap, `gainguard_daemon_history_max_bytes`. The defaults (15 s,
//! the scrape interval of dashboards/prometheus/prometheus.yml; one day; 64 MiB) hold a day of one run with
//! up to 480 tracked parameters: 6 run series, 3 per parameter and NVML's, 5760 points of 8 bytes each.

pub mod alerts;
pub mod api;
pub mod rules;
pub mod store;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge, Opts};

use gainguard_protocol::events::{unix_now, Envelope, Event};

use crate::duration::MAX_DURATION;
use crate::error::DaemonError;
use crate::sources::{lock, ParamLabels, RunKey, RunView, Source, SourceContext, SourceSpec};
use store::{Budget, Slot};

/// How much history the daemon keeps for the live page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistorySettings {
    /// At most one point per series per interval (the latest sample in it).
    pub interval: Duration,
    /// How far back a series reaches when it is sampled every interval: `retention / interval` points.
    pub retention: Duration,
    /// Bytes all series together may hold.
    pub max_bytes: usize,
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings { interval: Duration::from_secs(15), retention: Duration::from_secs(24 * 3600), max_bytes: 64 << 20 }
    }
}

/// Points a series keeps at most, for the given settings.
pub fn points_per_series(s: &HistorySettings) -> usize {
    (s.retention.as_secs_f64() / s.interval.as_secs_f64()).ceil().max(1.0) as usize
}

impl HistorySettings {
    pub fn validate(&self) -> Result<(), DaemonError> {
        let bad = |setting: &str, detail: String| Err(DaemonError::Setting { setting: setting.into(), detail });
        if self.interval < Duration::from_millis(100) || self.interval > MAX_DURATION {
            return bad("history-interval", format!("{:?}, expected at least 0.1 s and at most one year", self.interval));
        }
        if self.retention < self.interval || self.retention > MAX_DURATION {
            return bad("history-retention", format!("{:?}, expected at least --history-interval and at most one year", self.retention));
        }
        let points = points_per_series(self);
        if points > 10_000_000 {
            return bad("history-retention", format!("{points} points per series (retention / interval), expected at most 10000000"));
        }
        let one = points * store::POINT_BYTES + store::SERIES_OVERHEAD;
        if self.max_bytes < one {
            return bad("history-max-bytes", format!("{}, expected at least one series' worth ({one} bytes)", self.max_bytes));
        }
        Ok(())
    }
}

/// Run-level series, in [`RunHist::series`] order.
pub const RUN_SERIES: [&str; 6] = [
    "loss",
    "tokens_per_second",
    "loss_nonfinite_total",
    "spectrum_samples_dropped_total",
    "events_dropped_total",
    "nonfinite_parameters",
];
const LOSS: usize = 0;
const TOKENS_PER_SECOND: usize = 1;
const LOSS_NONFINITE: usize = 2;
const SPECTRUM_DROPPED: usize = 3;
const EVENTS_DROPPED: usize = 4;
const NONFINITE_PARAMETERS: usize = 5;

/// Parameter-level series, in [`ParamHist::series`] order.
pub const PARAM_SERIES: [&str; 3] = ["gain_ratio", "sigma_max", "decay_horizon"];
pub const GAIN_RATIO: usize = 0;
pub const SIGMA_MAX: usize = 1;
pub const DECAY_HORIZON: usize = 2;

/// GPU series, in [`GpuHist::series`] order.
pub const GPU_SERIES: [&str; 4] = ["utilization_ratio", "memory_used_bytes", "memory_total_bytes", "power_watts"];

/// One run's history and the state the alert conditions need.
#[derive(Default)]
pub struct RunHist {
    pub series: [Slot; 6],
    /// By [`ParamLabels::slot`].
    pub params: Vec<Option<ParamHist>>,
    pub up: bool,
    /// Unix time at which the trainer said Goodbye or went away.
    pub down_since: Option<f64>,
    pub exit_reason: Option<String>,
    pub planned_steps: Option<u64>,
    pub step: u64,
    /// As the trainer reported it.
    pub last_step_timestamp: Option<f64>,
    /// Unix time at which the latest spectrum sample arrived.
    pub last_spectrum: Option<f64>,
    tokens_total: u64,
    nonfinite_total: u64,
    /// (tokens, trainer time) at the last step of the previous interval, and at the latest step.
    rate_base: Option<(u64, f64)>,
    rate_prev: Option<(u64, f64)>,
    rate_bucket: Option<u64>,
}

pub struct ParamHist {
    pub labels: ParamLabels,
    pub series: [Slot; 3],
    /// The latest sample found NaN or Inf in the weights.
    pub nonfinite: bool,
}

impl RunHist {
    pub fn progress(&self) -> Option<f64> {
        self.planned_steps.filter(|p| *p > 0).map(|p| self.step as f64 / p as f64)
    }

    pub fn params(&self) -> impl Iterator<Item = &ParamHist> {
        self.params.iter().flatten()
    }
}

pub struct GpuHist {
    pub gpu: String,
    pub uuid: String,
    pub name: String,
    pub series: [Slot; 4],
}

#[derive(Default)]
struct Gpus {
    by_uuid: BTreeMap<String, GpuHist>,
    /// `gainguard_nvml_up`, 1 or 0 per poll.
    up: Slot,
}

/// The daemon's history. Shared by the `history` source (writer), the NVML poller (writer) and the HTTP
/// endpoint (reader).
pub struct History {
    pub budget: Budget,
    /// This machine's host name, the `host` label of GPU alerts.
    pub host: String,
    pub settings: HistorySettings,
    pub nvml_enabled: bool,
    runs: Mutex<BTreeMap<RunKey, Arc<Mutex<RunHist>>>>,
    gpus: Mutex<Gpus>,
    bytes: IntGauge,
    series: IntGauge,
    refused: IntCounter,
}

impl History {
    /// Registers the history's own metrics in `registry` (the daemon's).
    pub fn new(settings: HistorySettings, nvml_enabled: bool, host: String, registry: &prometheus::Registry) -> Result<Arc<History>, DaemonError> {
        Self::with_epoch(settings, nvml_enabled, host, registry, unix_now())
    }

    /// With tenth-second 0 at Unix time `epoch` (tests put it in the past to record past points).
    pub fn with_epoch(
        settings: HistorySettings,
        nvml_enabled: bool,
        host: String,
        registry: &prometheus::Registry,
        epoch: f64,
    ) -> Result<Arc<History>, DaemonError> {
        let interval_ds = (settings.interval.as_secs_f64() * 10.0).round() as u32;
        let budget = Budget::new(epoch, interval_ds, points_per_series(&settings), settings.max_bytes);
        let bytes = IntGauge::with_opts(Opts::new(
            "gainguard_daemon_history_bytes",
            "Bytes the live page's history holds now (points and per-series overhead).",
        ))?;
        let max = IntGauge::with_opts(Opts::new(
            "gainguard_daemon_history_max_bytes",
            "Cap of gainguard_daemon_history_bytes (--history-max-bytes); a series that would pass it is not kept.",
        ))?;
        let series = IntGauge::with_opts(Opts::new("gainguard_daemon_history_series", "Series the history keeps."))?;
        let refused = IntCounter::with_opts(Opts::new(
            "gainguard_daemon_history_series_refused_total",
            "Series the history did not keep because --history-max-bytes was spent.",
        ))?;
        for m in [&bytes, &max, &series] {
            registry.register(Box::new(m.clone()))?;
        }
        registry.register(Box::new(refused.clone()))?;
        max.set(settings.max_bytes as i64);
        Ok(Arc::new(History {
            budget,
            host,
            settings,
            nvml_enabled,
            runs: Mutex::new(BTreeMap::new()),
            gpus: Mutex::new(Gpus::default()),
            bytes,
            series,
            refused,
        }))
    }

    fn publish(&self) {
        self.bytes.set(self.budget.used_bytes() as i64);
        self.series.set(self.budget.series() as i64);
        let refused = self.budget.refused() as u64;
        let seen = self.refused.get();
        if refused > seen {
            self.refused.inc_by(refused - seen);
        }
    }

    /// Every run, in key order.
    pub fn runs(&self) -> Vec<(RunKey, Arc<Mutex<RunHist>>)> {
        lock(&self.runs).iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect()
    }

    pub fn run(&self, key: &RunKey) -> Option<Arc<Mutex<RunHist>>> {
        lock(&self.runs).get(key).cloned()
    }

    fn run_entry(&self, key: &RunKey) -> Arc<Mutex<RunHist>> {
        Arc::clone(lock(&self.runs).entry(key.clone()).or_default())
    }

    fn forget(&self, key: &RunKey) {
        let Some(run) = lock(&self.runs).remove(key) else { return };
        let mut run = lock(&run);
        for s in std::mem::take(&mut run.series) {
            self.budget.release(s);
        }
        for p in std::mem::take(&mut run.params).into_iter().flatten() {
            for s in p.series {
                self.budget.release(s);
            }
        }
        drop(run);
        self.publish();
    }

    /// One NVML poll: per GPU (index, uuid, name) its utilisation ratio, memory used and total in bytes,
    /// and power in watts; `None` when the poll failed.
    pub fn record_gpus(&self, readings: Option<&[(String, String, String, [Option<f64>; 4])]>) {
        let now = unix_now();
        let mut gpus = lock(&self.gpus);
        let gpus = &mut *gpus;
        self.budget.record(&mut gpus.up, now, if readings.is_some() { 1.0 } else { 0.0 });
        for (gpu, uuid, name, values) in readings.unwrap_or_default() {
            let h = gpus.by_uuid.entry(uuid.clone()).or_insert_with(|| GpuHist {
                gpu: gpu.clone(),
                uuid: uuid.clone(),
                name: name.clone(),
                series: Default::default(),
            });
            for (slot, v) in h.series.iter_mut().zip(values) {
                if let Some(v) = v {
                    self.budget.record(slot, now, *v);
                }
            }
        }
        self.publish();
    }

    /// Calls `f` with the GPUs and the NVML-up series.
    pub fn with_gpus<R>(&self, f: impl FnOnce(&BTreeMap<String, GpuHist>, Option<&store::Ring>) -> R) -> R {
        let gpus = lock(&self.gpus);
        f(&gpus.by_uuid, gpus.up.ring())
    }

    fn observe(&self, run: &mut RunView<'_>, envelope: &Envelope) {
        let memo: &mut Memo = run.memo.get();
        let entry = memo.0.get_or_insert_with(|| self.run_entry(run.key));
        let mut h = lock(entry);
        let h = &mut *h;
        let now = run.received;
        let b = &self.budget;
        match &envelope.event {
            Event::Hello(hello) => {
                h.planned_steps = hello.planned_steps;
                h.up = true;
                h.down_since = None;
                h.exit_reason = None;
            }
            Event::Step(s) => {
                h.step = envelope.step;
                h.up = true;
                h.down_since = None;
                h.last_step_timestamp = Some(s.timestamp_seconds);
                if s.loss_nonfinite {
                    h.nonfinite_total += 1;
                    b.record(&mut h.series[LOSS], now, f64::NAN);
                } else if let Some(loss) = s.loss {
                    b.record(&mut h.series[LOSS], now, loss);
                }
                b.record(&mut h.series[LOSS_NONFINITE], now, h.nonfinite_total as f64);
                // tokens/s over the steps since the previous interval's last one (the first step: over its
                // own duration).
                let bucket = (b.tenths(now) / b.interval_ds) as u64;
                if h.rate_bucket != Some(bucket) {
                    h.rate_base = h.rate_prev.or(s.duration_seconds.map(|d| (0, s.timestamp_seconds - d)));
                    h.rate_bucket = Some(bucket);
                }
                h.tokens_total += s.tokens;
                h.rate_prev = Some((h.tokens_total, s.timestamp_seconds));
                if let Some((tokens, t)) = h.rate_base {
                    if s.timestamp_seconds > t && h.tokens_total >= tokens {
                        let rate = (h.tokens_total - tokens) as f64 / (s.timestamp_seconds - t);
                        b.record(&mut h.series[TOKENS_PER_SECOND], now, rate);
                    }
                }
                b.record(&mut h.series[SPECTRUM_DROPPED], now, s.spectrum_samples_dropped_total as f64);
                b.record(&mut h.series[EVENTS_DROPPED], now, s.events_dropped_total as f64);
                if let Some(n) = s.nonfinite_parameters {
                    b.record(&mut h.series[NONFINITE_PARAMETERS], now, n as f64);
                }
            }
            Event::Spectrum(s) => {
                h.last_spectrum = Some(now);
                let Some(labels) = run.params.get(&s.param) else { return };
                if h.params.len() <= labels.slot {
                    h.params.resize_with(labels.slot + 1, || None);
                }
                let p = h.params[labels.slot].get_or_insert_with(|| ParamHist {
                    labels: labels.clone(),
                    series: Default::default(),
                    nonfinite: false,
                });
                p.nonfinite = s.nonfinite;
                for (i, v) in [(GAIN_RATIO, s.gain_ratio), (SIGMA_MAX, s.sigma_max), (DECAY_HORIZON, s.decay_horizon)] {
                    if let Some(v) = v {
                        b.record(&mut p.series[i], now, v);
                    }
                }
            }
            Event::Goodbye(g) => {
                h.up = false;
                h.down_since = Some(now);
                h.exit_reason = Some(g.reason.clone());
            }
            Event::Params(_) => {}
        }
        self.publish();
    }
}

/// The history source's memo: its run's entry, so that an event looks up no key.
#[derive(Default)]
struct Memo(Option<Arc<Mutex<RunHist>>>);

pub const SPEC: SourceSpec = SourceSpec { name: "history", default_enabled: true, build };

struct HistorySource(Arc<History>);

fn build(ctx: &SourceContext<'_>) -> Result<Arc<dyn Source>, DaemonError> {
    Ok(Arc::new(HistorySource(Arc::clone(ctx.history))))
}

impl Source for HistorySource {
    fn name(&self) -> &'static str {
        SPEC.name
    }

    fn observe(&self, run: &mut RunView<'_>, envelope: &Envelope) {
        self.0.observe(run, envelope);
    }

    fn trainer_down(&self, run: &RunKey, _memo: &mut crate::sources::RunMemo) {
        if let Some(h) = self.0.run(run) {
            let mut h = lock(&h);
            h.up = false;
            h.down_since.get_or_insert_with(unix_now);
        }
    }

    fn forget_run(&self, run: &RunKey, _params: &[ParamLabels]) {
        self.0.forget(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_history_settings_are_refused_naming_the_flag() {
        let d = HistorySettings::default();
        assert_eq!(points_per_series(&d), 5760);
        assert!(d.validate().is_ok());
        let cases = [
            (HistorySettings { interval: Duration::from_millis(10), ..d.clone() }, "--history-interval"),
            (HistorySettings { retention: Duration::from_secs(1), ..d.clone() }, "--history-retention"),
            (HistorySettings { max_bytes: 100, ..d.clone() }, "--history-max-bytes"),
        ];
        for (s, flag) in cases {
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
        // The default cap holds a day of one run with 480 tracked parameters (3 series each, 7 run series).
        let series = 480 * 3 + 7;
        assert!(series * (5760 * store::POINT_BYTES + store::SERIES_OVERHEAD) <= d.max_bytes);
    }
}

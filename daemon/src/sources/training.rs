//! Training progress from Hello and Step events: step, loss, tokens, step time, progress, drop and skip
//! counters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::{HistogramOpts, Opts};

use gainguard_protocol::events::{Envelope, Event};

use crate::exposition::{GaugeCell, GaugeVec, HistogramCell, HistogramVec, IntCounterCell, IntCounterVec, Series};

use super::{cumulative_delta, lock, remove, RunKey, RunView, Source, SourceContext, SourceSpec, RUN_LABELS};
use crate::error::DaemonError;

pub const SPEC: SourceSpec = SourceSpec { name: "training", default_enabled: true, build };

/// Step-time buckets in seconds: from tiny proxy models to slow pipeline-parallel steps.
pub const STEP_DURATION_BUCKETS: [f64; 14] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

pub struct Training {
    step: GaugeVec,
    loss: GaugeVec,
    loss_nonfinite: IntCounterVec,
    tokens: IntCounterVec,
    step_duration: HistogramVec,
    last_step_timestamp: GaugeVec,
    progress: GaugeVec,
    spectrum_dropped: IntCounterVec,
    events_dropped: IntCounterVec,
    nonfinite_parameters: GaugeVec,
    skipped_steps: IntCounterVec,
    run_info: GaugeVec,
    state: Mutex<State>,
}

/// The `reason` of `gainguard_skipped_steps_total` the optimizer reports (its only one so far).
pub const SKIP_REASON_NONFINITE_GRAD: &str = "nonfinite_grad";

#[derive(Default)]
struct State {
    /// The run_info label values currently exported per run, to replace them when a Hello changes them.
    info: HashMap<RunKey, [String; 4]>,
}

type Gauge = Option<Arc<Series<GaugeCell>>>;
type Counter = Option<Arc<Series<IntCounterCell>>>;

/// Per run: what its Hello announced, the last cumulative drop counts it reported, and the handles of its
/// series, created as values first arrive.
#[derive(Default)]
struct Memo {
    planned_steps: Option<u64>,
    spectrum_dropped_last: u64,
    events_dropped_last: u64,
    skipped_steps_last: u64,
    step: Gauge,
    loss: Gauge,
    last_step_timestamp: Gauge,
    progress: Gauge,
    nonfinite_parameters: Gauge,
    loss_nonfinite: Counter,
    tokens: Counter,
    spectrum_dropped: Counter,
    events_dropped: Counter,
    skipped_steps: Counter,
    step_duration: Option<Arc<Series<HistogramCell>>>,
}

fn build(ctx: &SourceContext<'_>) -> Result<Arc<dyn Source>, DaemonError> {
    let g = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &RUN_LABELS);
    let c = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &RUN_LABELS);
    let t = Training {
        step: g("gainguard_step", "Optimizer step of the latest Step event.")?,
        loss: g("gainguard_loss", "Training loss of the latest step; NaN when that loss was not finite.")?,
        loss_nonfinite: c("gainguard_loss_nonfinite_total", "Steps whose loss was NaN or infinite.")?,
        tokens: c("gainguard_tokens_total", "Tokens processed.")?,
        step_duration: HistogramVec::new(
            HistogramOpts::new("gainguard_step_duration_seconds", "Wall time of one optimizer step.")
                .buckets(STEP_DURATION_BUCKETS.to_vec()),
            &RUN_LABELS,
        )?,
        last_step_timestamp: g(
            "gainguard_trainer_last_step_timestamp_seconds",
            "Unix time at which the latest step finished, as reported by the trainer.",
        )?,
        progress: g("gainguard_progress_ratio", "step / planned_steps, when the trainer announced planned steps.")?,
        spectrum_dropped: c(
            "gainguard_spectrum_samples_dropped_total",
            "Spectrum samples the plugin dropped because monitoring fell behind.",
        )?,
        events_dropped: c(
            "gainguard_events_dropped_total",
            "Events the trainer's sink dropped because the daemon was away or its buffer was full.",
        )?,
        nonfinite_parameters: g(
            "gainguard_nonfinite_parameters",
            "Parameters holding NaN or Inf after the latest checked step.",
        )?,
        skipped_steps: IntCounterVec::new(
            Opts::new(
                "gainguard_skipped_steps_total",
                "Optimizer steps the plugin skipped, by reason (nonfinite_grad: a gradient held NaN or Inf).",
            ),
            &["run", "rank", "host", "reason"],
        )?,
        run_info: GaugeVec::new(
            Opts::new("gainguard_run_info", "Always 1; the scaling rule of the run as labels."),
            &["run", "rank", "host", "rule", "gamma", "alpha", "reference"],
        )?,
        state: Mutex::new(State::default()),
    };
    let r = ctx.registry;
    r.register(Box::new(t.step.clone()))?;
    r.register(Box::new(t.loss.clone()))?;
    r.register(Box::new(t.loss_nonfinite.clone()))?;
    r.register(Box::new(t.tokens.clone()))?;
    r.register(Box::new(t.step_duration.clone()))?;
    r.register(Box::new(t.last_step_timestamp.clone()))?;
    r.register(Box::new(t.progress.clone()))?;
    r.register(Box::new(t.spectrum_dropped.clone()))?;
    r.register(Box::new(t.events_dropped.clone()))?;
    r.register(Box::new(t.nonfinite_parameters.clone()))?;
    r.register(Box::new(t.skipped_steps.clone()))?;
    r.register(Box::new(t.run_info.clone()))?;
    Ok(Arc::new(t))
}

fn opt_label(v: Option<f64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

impl Source for Training {
    fn name(&self) -> &'static str {
        SPEC.name
    }

    fn series_per_run(&self) -> usize {
        // 11 single series, the histogram (buckets + +Inf + sum + count), run_info.
        11 + STEP_DURATION_BUCKETS.len() + 3 + 1
    }

    fn observe(&self, run: &mut RunView<'_>, envelope: &Envelope) {
        let labels = run.key.labels();
        let memo: &mut Memo = run.memo.get();
        match &envelope.event {
            Event::Hello(h) => {
                memo.planned_steps = h.planned_steps;
                let info = [
                    h.rule.clone(),
                    opt_label(h.gamma),
                    opt_label(h.alpha),
                    h.reference.clone().unwrap_or_default(),
                ];
                let mut state = lock(&self.state);
                if let Some(old) = state.info.insert(run.key.clone(), info.clone()) {
                    if old != info {
                        remove(&self.run_info, &info_labels(run.key, &old));
                    }
                }
                self.run_info.with_label_values(&info_labels(run.key, &info)).set(1.0);
                // Counters exist from the start at 0, so `increase()` sees the first non-finite step
                // and dashboards show 0 rather than nothing for a healthy run.
                self.loss_nonfinite.cached(&mut memo.loss_nonfinite, &labels).inc_by(0);
                self.spectrum_dropped.cached(&mut memo.spectrum_dropped, &labels).inc_by(0);
                self.events_dropped.cached(&mut memo.events_dropped, &labels).inc_by(0);
                self.skipped_steps.cached(&mut memo.skipped_steps, &skip_labels(&labels)).inc_by(0);
            }
            Event::Step(s) => {
                self.step.cached(&mut memo.step, &labels).set(envelope.step as f64);
                if s.loss_nonfinite {
                    self.loss.cached(&mut memo.loss, &labels).set(f64::NAN);
                    self.loss_nonfinite.cached(&mut memo.loss_nonfinite, &labels).inc();
                } else if let Some(loss) = s.loss {
                    self.loss.cached(&mut memo.loss, &labels).set(loss);
                }
                self.tokens.cached(&mut memo.tokens, &labels).inc_by(s.tokens);
                if let Some(d) = s.duration_seconds {
                    self.step_duration.cached(&mut memo.step_duration, &labels).observe(d);
                }
                self.last_step_timestamp.cached(&mut memo.last_step_timestamp, &labels).set(s.timestamp_seconds);
                if let Some(planned) = memo.planned_steps {
                    self.progress.cached(&mut memo.progress, &labels).set(envelope.step as f64 / planned as f64);
                }
                let d = cumulative_delta(&mut memo.spectrum_dropped_last, s.spectrum_samples_dropped_total);
                self.spectrum_dropped.cached(&mut memo.spectrum_dropped, &labels).inc_by(d);
                let d = cumulative_delta(&mut memo.events_dropped_last, s.events_dropped_total);
                self.events_dropped.cached(&mut memo.events_dropped, &labels).inc_by(d);
                if let Some(n) = s.nonfinite_parameters {
                    self.nonfinite_parameters.cached(&mut memo.nonfinite_parameters, &labels).set(n as f64);
                }
                let d = cumulative_delta(&mut memo.skipped_steps_last, s.skipped_steps_total);
                self.skipped_steps.cached(&mut memo.skipped_steps, &skip_labels(&labels)).inc_by(d);
            }
            _ => {}
        }
    }

    fn forget_run(&self, run: &RunKey, _params: &[super::ParamLabels]) {
        let labels = run.labels();
        remove(&self.step, &labels);
        remove(&self.loss, &labels);
        remove(&self.loss_nonfinite, &labels);
        remove(&self.tokens, &labels);
        remove(&self.step_duration, &labels);
        remove(&self.last_step_timestamp, &labels);
        remove(&self.progress, &labels);
        remove(&self.spectrum_dropped, &labels);
        remove(&self.events_dropped, &labels);
        remove(&self.nonfinite_parameters, &labels);
        remove(&self.skipped_steps, &skip_labels(&labels));
        if let Some(info) = lock(&self.state).info.remove(run) {
            remove(&self.run_info, &info_labels(run, &info));
        }
    }
}

fn skip_labels<'a>(run: &[&'a str]) -> [&'a str; 4] {
    [run[0], run[1], run[2], SKIP_REASON_NONFINITE_GRAD]
}

fn info_labels<'a>(run: &'a RunKey, info: &'a [String; 4]) -> [&'a str; 7] {
    [&run.run, &run.rank, &run.host, &info[0], &info[1], &info[2], &info[3]]
}

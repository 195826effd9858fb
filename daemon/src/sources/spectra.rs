//! Spectrum samples: sigma_max and its normalisations, the gain ratio against the reference profile, and the
//! shape of the spectrum. A value the sample does not carry leaves its series untouched (never a sentinel).

use std::sync::Arc;

use prometheus::{HistogramOpts, Opts};

use gainguard_protocol::events::{Envelope, Event};

use crate::exposition::{GaugeCell, GaugeVec, HistogramCell, HistogramVec, IntCounterCell, IntCounterVec, Series};

use super::{
    param_label_values, remove, ParamLabels, RunKey, RunView, Source, SourceContext, SourceSpec, PARAM_LABELS,
    RUN_LABELS,
};
use crate::error::DaemonError;

pub const SPEC: SourceSpec = SourceSpec { name: "spectra", default_enabled: true, build };

pub const SAMPLE_DURATION_BUCKETS: [f64; 13] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// The `quantile` label values of `gainguard_singular_value_quantile`.
pub const QUANTILES: [&str; 4] = ["0.1", "0.5", "0.9", "0.99"];

pub struct Spectra {
    sigma_max: GaugeVec,
    sigma_max_normalized: GaugeVec,
    reference_sigma_max: GaugeVec,
    gain_ratio: GaugeVec,
    stable_rank: GaugeVec,
    frobenius_norm: GaugeVec,
    effective_rank: GaugeVec,
    quantile: GaugeVec,
    update_ratio: GaugeVec,
    iterations: GaugeVec,
    nonfinite: GaugeVec,
    decay_horizon: GaugeVec,
    samples: IntCounterVec,
    last_sample_timestamp: GaugeVec,
    sample_duration: HistogramVec,
}

/// Per run: the handles of its series, created as values first arrive.
#[derive(Default)]
struct Memo {
    samples: Option<Arc<Series<IntCounterCell>>>,
    last_sample_timestamp: Option<Arc<Series<GaugeCell>>>,
    sample_duration: Option<Arc<Series<HistogramCell>>>,
    /// By [`ParamLabels::slot`].
    params: Vec<ParamSeries>,
}

/// One parameter's series: the per-parameter gauges in [`Spectra::gauges`] order, then the quantiles.
#[derive(Default)]
struct ParamSeries {
    gauges: [Option<Arc<Series<GaugeCell>>>; 11],
    quantiles: [Option<Arc<Series<GaugeCell>>>; 4],
}

fn build(ctx: &SourceContext<'_>) -> Result<Arc<dyn Source>, DaemonError> {
    let g = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &PARAM_LABELS);
    let mut quantile_labels = PARAM_LABELS.to_vec();
    quantile_labels.push("quantile");
    let s = Spectra {
        sigma_max: g("gainguard_sigma_max", "Top singular value of the weight matrix (its sublayer gain).")?,
        sigma_max_normalized: g(
            "gainguard_sigma_max_normalized",
            "sigma_max / (sqrt(lr/wd) * m^alpha), the width-invariant gain of arXiv 2510.15262.",
        )?,
        reference_sigma_max: g(
            "gainguard_reference_sigma_max",
            "sigma_max of the reference profile at the same training progress.",
        )?,
        gain_ratio: g("gainguard_gain_ratio", "sigma_max / reference sigma_max; drift away from 1 breaks transfer.")?,
        stable_rank: g("gainguard_stable_rank", "||W||_F^2 / sigma_max^2 (full-spectrum samples).")?,
        frobenius_norm: g("gainguard_frobenius_norm", "Frobenius norm ||W||_F.")?,
        effective_rank: g(
            "gainguard_effective_rank",
            "exp(entropy of the normalized singular values) (full-spectrum samples).",
        )?,
        // A summary's quantiles (without _sum and _count): a `quantile` label is legal only on summaries.
        quantile: GaugeVec::new_quantiles(
            Opts::new("gainguard_singular_value_quantile", "Singular-value quantiles (full-spectrum samples)."),
            &quantile_labels,
        )?,
        update_ratio: g("gainguard_update_ratio", "||dW||_F / ||W||_F of the sampled step.")?,
        iterations: g("gainguard_spectrum_iterations", "Subspace iterations the latest estimate took.")?,
        nonfinite: g("gainguard_spectrum_nonfinite", "1 when the latest sampled weights held NaN or Inf, else 0.")?,
        decay_horizon: g(
            "gainguard_decay_horizon",
            "Decay horizon H = sum_t lr_t*wd_t of the parameter at its latest spectrum sample (width-scaled, schedule included): weight-decay timescales seen.",
        )?,
        samples: IntCounterVec::new(
            Opts::new("gainguard_spectrum_samples_total", "Spectrum samples received."),
            &RUN_LABELS,
        )?,
        last_sample_timestamp: GaugeVec::new(
            Opts::new(
                "gainguard_spectrum_last_sample_timestamp_seconds",
                "Unix time at which the daemon received the latest spectrum sample.",
            ),
            &RUN_LABELS,
        )?,
        sample_duration: HistogramVec::new(
            HistogramOpts::new(
                "gainguard_spectrum_sample_duration_seconds",
                "Wall time the plugin's worker spent on one spectrum sample.",
            )
            .buckets(SAMPLE_DURATION_BUCKETS.to_vec()),
            &RUN_LABELS,
        )?,
    };
    for vec in s.gauges() {
        ctx.registry.register(Box::new(vec.clone()))?;
    }
    ctx.registry.register(Box::new(s.quantile.clone()))?;
    ctx.registry.register(Box::new(s.samples.clone()))?;
    ctx.registry.register(Box::new(s.last_sample_timestamp.clone()))?;
    ctx.registry.register(Box::new(s.sample_duration.clone()))?;
    Ok(Arc::new(s))
}

/// Which of [`Spectra::gauges`] are measured from the weights (not the reference profile's value, the
/// iteration count, the non-finite flag or the optimizer's decay horizon).
const MEASURED_FROM_WEIGHTS: [bool; 11] = [true, true, false, true, true, true, true, true, false, false, false];

impl Spectra {
    /// Per-parameter gauges with exactly the param labels.
    fn gauges(&self) -> [&GaugeVec; 11] {
        [
            &self.sigma_max,
            &self.sigma_max_normalized,
            &self.reference_sigma_max,
            &self.gain_ratio,
            &self.stable_rank,
            &self.frobenius_norm,
            &self.effective_rank,
            &self.update_ratio,
            &self.iterations,
            &self.nonfinite,
            &self.decay_horizon,
        ]
    }

    /// Removes a parameter's quantile series.
    fn remove_quantiles(&self, labels: &[&str]) {
        for q in QUANTILES {
            let mut l = labels.to_vec();
            l.push(q);
            remove(&self.quantile, &l);
        }
    }
}

impl Source for Spectra {
    fn name(&self) -> &'static str {
        SPEC.name
    }

    fn series_per_run(&self) -> usize {
        2 + SAMPLE_DURATION_BUCKETS.len() + 3
    }

    fn series_per_param(&self) -> usize {
        11 + QUANTILES.len()
    }

    fn observe(&self, run: &mut RunView<'_>, envelope: &Envelope) {
        let Event::Spectrum(s) = &envelope.event else { return };
        let Some(param) = run.params.get(&s.param) else { return };
        let labels = param_label_values(run.key, param);
        let memo: &mut Memo = run.memo.get();
        if memo.params.len() <= param.slot {
            memo.params.resize_with(param.slot + 1, ParamSeries::default);
        }
        let series = &mut memo.params[param.slot];
        let values = [
            s.sigma_max,
            s.sigma_max_normalized,
            s.reference_sigma_max,
            s.gain_ratio,
            s.stable_rank,
            s.frobenius_norm,
            s.effective_rank,
            s.update_ratio,
            Some(s.iterations as f64),
            Some(if s.nonfinite { 1.0 } else { 0.0 }),
            s.decay_horizon,
        ];
        for ((vec, handle), v) in self.gauges().into_iter().zip(&mut series.gauges).zip(values) {
            if let Some(v) = v {
                vec.cached(handle, &labels).set(v);
            }
        }
        if s.nonfinite {
            // Non-finite weights have no spectrum: what was measured from the earlier, finite weights goes,
            // rather than standing beside `gainguard_spectrum_nonfinite 1` as if it were current. The memo's
            // handles go with them, so that the next finite sample creates the series again.
            for ((vec, handle), measured) in self.gauges().into_iter().zip(&mut series.gauges).zip(MEASURED_FROM_WEIGHTS) {
                if measured {
                    *handle = None;
                    remove(vec, &labels);
                }
            }
            self.remove_quantiles(&labels);
            series.quantiles = Default::default();
        }
        if let Some(q) = &s.quantiles {
            let [r, k, h, p, l, c] = labels;
            for ((name, handle), v) in QUANTILES.iter().zip(&mut series.quantiles).zip([q.p10, q.p50, q.p90, q.p99]) {
                self.quantile.cached(handle, &[r, k, h, p, l, c, name]).set(v);
            }
        }
        let run_labels = run.key.labels();
        self.samples.cached(&mut memo.samples, &run_labels).inc();
        self.last_sample_timestamp.cached(&mut memo.last_sample_timestamp, &run_labels).set(run.received);
        self.sample_duration.cached(&mut memo.sample_duration, &run_labels).observe(s.duration_seconds);
    }

    fn forget_run(&self, run: &RunKey, params: &[ParamLabels]) {
        for p in params {
            let labels = param_label_values(run, p);
            for vec in self.gauges() {
                remove(vec, &labels);
            }
            self.remove_quantiles(&labels);
        }
        let labels = run.labels();
        remove(&self.samples, &labels);
        remove(&self.last_sample_timestamp, &labels);
        remove(&self.sample_duration, &labels);
    }
}

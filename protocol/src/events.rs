//! The event types that flow from a trainer to the daemon.
//!
//! In embedded mode they travel as values over a crossbeam channel; across processes they travel as
//! versioned JSON lines (one [`Envelope`] per line, see `docs/protocol.md`). They are plain serde structs,
//! so that the plugin and the daemon share them without either one's heavy dependencies (libtorch, tokio).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch, the clock of every `*_timestamp_seconds` field and metric.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The wire protocol version carried in every envelope's `v` field.
pub const PROTOCOL_VERSION: u32 = 1;

/// One event together with the identity of the trainer that sent it. Absent optional values are left out of
/// the encoded line (they decode back to `None`), which keeps lines short for the daemon to parse. The run and
/// host names are shared (`Arc<str>`): a sender's events, and the lines a daemon decodes from one connection,
/// carry the same two names over and over, and then hold one allocation of each.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Protocol version; a daemon rejects versions it does not know.
    pub v: u32,
    /// Run name, e.g. `proxy-w128` or `target-w512`.
    pub run: Arc<str>,
    /// Data-parallel rank of the sending process.
    pub rank: u32,
    /// Host name of the sending process.
    pub host: Arc<str>,
    /// Optimizer step the event refers to.
    pub step: u64,
    /// The payload, tagged by `"type"`.
    pub event: Event,
}

impl Envelope {
    pub fn new(run: impl Into<Arc<str>>, rank: u32, host: impl Into<Arc<str>>, step: u64, event: Event) -> Self {
        Envelope { v: PROTOCOL_VERSION, run: run.into(), rank, host: host.into(), step, event }
    }
}

/// The payloads a trainer sends. Deserialized by hand (see `wire.rs`): serde's derive for an internally
/// tagged enum buffers every event into an intermediate tree first, which was most of the cost of ingest.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A trainer process started (or reconnected). Marks the run/rank as up.
    Hello(Hello),
    /// The per-parameter decisions of the width-scaling rule. Sent once before training starts and again
    /// whenever the rule is changed explicitly.
    Params(ParamsTable),
    /// One optimizer step finished.
    Step(StepEvent),
    /// One spectrum sample of one parameter.
    Spectrum(SpectrumSample),
    /// The trainer finished or is shutting down. Marks the run/rank as down.
    Goodbye(Goodbye),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Hello {
    /// OS process id of the trainer, for per-process GPU memory.
    pub pid: u32,
    /// Planned number of optimizer steps, if known (progress = step / planned_steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned_steps: Option<u64>,
    /// Rule preset name (`paper`, `mup-coupled`, `mup-fixed-wd`, `standard`, `custom`).
    pub rule: String,
    /// Weight-decay width exponent gamma (`lambda ∝ m^gamma`); None for `standard`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma: Option<f64>,
    /// Exponent alpha used for `sigma_max_normalized`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Path or name of the reference profile in use, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// Parameter class under μP's infinite-shape test.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ParamClass {
    MatrixLike,
    VectorLike,
}

impl ParamClass {
    pub fn as_str(&self) -> &'static str {
        match self {
            ParamClass::MatrixLike => "matrix_like",
            ParamClass::VectorLike => "vector_like",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ParamInfo {
    /// Full parameter name, e.g. `blocks.3.mlp.up.weight`.
    pub name: String,
    /// Block index parsed from the name where one exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<u32>,
    pub class: ParamClass,
    pub shape: Vec<i64>,
    /// Width multiplier m = fan_in / base_fan_in (1 for vector-like).
    pub width_multiplier: f64,
    /// Width-scaled base learning rate, before any schedule multiplier.
    pub lr: f64,
    /// Width-scaled base weight decay, before any schedule multiplier.
    pub weight_decay: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ParamsTable {
    pub params: Vec<ParamInfo>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StepEvent {
    /// Training loss of this step. None when it was not finite (JSON has no NaN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// True when the loss was NaN or ±Inf.
    #[serde(default)]
    pub loss_nonfinite: bool,
    /// Tokens processed in this step (added to `gainguard_tokens_total`).
    #[serde(default)]
    pub tokens: u64,
    /// Wall time of this step in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// Unix time at which the step finished.
    pub timestamp_seconds: f64,
    /// Schedule multiplier applied to every parameter's base learning rate at this step.
    #[serde(default = "one")]
    pub lr_multiplier: f64,
    /// Schedule multiplier applied to every parameter's base weight decay at this step.
    #[serde(default = "one")]
    pub wd_multiplier: f64,
    /// Cumulative spectrum samples the plugin dropped because monitoring fell behind.
    #[serde(default)]
    pub spectrum_samples_dropped_total: u64,
    /// Cumulative events the trainer's sink dropped (daemon away or its buffer full).
    #[serde(default)]
    pub events_dropped_total: u64,
    /// Number of parameters that held NaN/Inf after this step (None when not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonfinite_parameters: Option<u64>,
    /// Cumulative optimizer steps skipped because a gradient held NaN or Inf.
    #[serde(default)]
    pub skipped_steps_total: u64,
}

fn one() -> f64 {
    1.0
}

/// Like the wire format's defaults: multipliers 1 (no schedule), everything else zero or absent.
impl Default for StepEvent {
    fn default() -> Self {
        StepEvent {
            loss: None,
            loss_nonfinite: false,
            tokens: 0,
            duration_seconds: None,
            timestamp_seconds: 0.0,
            lr_multiplier: 1.0,
            wd_multiplier: 1.0,
            spectrum_samples_dropped_total: 0,
            events_dropped_total: 0,
            nonfinite_parameters: None,
            skipped_steps_total: 0,
        }
    }
}

/// Singular-value quantiles from a full spectrum.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SpectrumQuantiles {
    pub p10: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SpectrumSample {
    /// Full parameter name.
    pub param: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<u32>,
    pub class: ParamClass,
    /// Top singular value. None when the weights were not finite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma_max: Option<f64>,
    /// Top-k singular values, descending (k is configurable; the first is sigma_max).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_k: Vec<f64>,
    /// Block Krylov iterations the estimate took (1 for a matrix small enough to solve exactly).
    #[serde(default)]
    pub iterations: u32,
    /// sigma_max / (sqrt(lr/wd) · m^alpha); only where wd > 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma_max_normalized: Option<f64>,
    /// Reference sigma_max at the same progress (from the proxy's profile or the run's own baseline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_sigma_max: Option<f64>,
    /// sigma_max / reference_sigma_max.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gain_ratio: Option<f64>,
    /// ‖W‖_F² / sigma_max² (every sample: exact given sigma_max and the Frobenius norm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_rank: Option<f64>,
    /// ‖W‖_F.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frobenius_norm: Option<f64>,
    /// exp(entropy of the normalized singular values) (full-spectrum samples only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_rank: Option<f64>,
    /// Singular-value quantiles (full-spectrum samples only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantiles: Option<SpectrumQuantiles>,
    /// ‖ΔW‖_F / ‖W‖_F for the sampled step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_ratio: Option<f64>,
    /// True when the sampled weights held NaN or ±Inf.
    #[serde(default)]
    pub nonfinite: bool,
    /// Wall time the worker spent on this sample.
    #[serde(default)]
    pub duration_seconds: f64,
    /// Training progress in [0, 1] at the sampled step, if planned steps are known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    /// Decay horizon `H = Σ_t lr_t·wd_t` of the parameter at the sampled step (width-scaled, schedule included):
    /// the weight-decay timescales it has seen. Below a few, sigma_max is mostly the decayed initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decay_horizon: Option<f64>,
}

impl SpectrumSample {
    /// A sample of `param` that carries no measurement yet: fill in what was measured with struct update
    /// syntax, `SpectrumSample { sigma_max: Some(s), ..SpectrumSample::empty(name, layer, class) }`.
    pub fn empty(param: impl Into<String>, layer: Option<u32>, class: ParamClass) -> SpectrumSample {
        SpectrumSample {
            param: param.into(),
            layer,
            class,
            sigma_max: None,
            top_k: Vec::new(),
            iterations: 0,
            sigma_max_normalized: None,
            reference_sigma_max: None,
            gain_ratio: None,
            stable_rank: None,
            frobenius_norm: None,
            effective_rank: None,
            quantiles: None,
            update_ratio: None,
            nonfinite: false,
            duration_seconds: 0.0,
            progress: None,
            decay_horizon: None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Goodbye {
    /// `finished`, `error`, or `interrupted`.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_round_trips_through_one_json_line() {
        let e = Envelope::new(
            "proxy",
            3,
            "node-a",
            17,
            Event::Step(StepEvent { loss: Some(2.5), tokens: 4096, timestamp_seconds: 1.0e9, ..Default::default() }),
        );
        let line = serde_json::to_string(&e).unwrap();
        assert!(!line.contains('\n'));
        assert!(line.contains(r#""type":"step""#), "{line}");
        let back: Envelope = serde_json::from_str(&line).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn a_default_step_event_has_the_wire_defaults() {
        let from_wire: StepEvent = serde_json::from_str(r#"{"timestamp_seconds":0.0}"#).unwrap();
        assert_eq!(StepEvent::default(), from_wire);
    }

    #[test]
    fn a_step_event_without_multipliers_defaults_them_to_one() {
        let line = r#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":5.0}}"#;
        let e: Envelope = serde_json::from_str(line).unwrap();
        match e.event {
            Event::Step(s) => {
                assert_eq!(s.lr_multiplier, 1.0);
                assert_eq!(s.wd_multiplier, 1.0);
            }
            other => panic!("expected a step event, got {other:?}"),
        }
    }
}

//! Training telemetry: the events a trainer sends besides spectra (hello, the rule table, steps,
//! goodbye), through a [`Sink`] that never blocks.
//!
//! The sink is either an embedded daemon's ([`gainguard_daemon::Daemon::sink`]) or a connection to a
//! standalone `gainguardd` ([`Sink::connect`]); the trainer code is the same for both. [`crate::Monitor`] sets
//! it up with the spectra sampler in one call.

use std::time::Instant;

use gainguard_protocol::events::{Event, Goodbye, Hello, ParamInfo, ParamsTable, StepEvent};
use gainguard_protocol::Sink;

use crate::identity::RunIdentity;
use crate::sampler::SamplerHandle;
use crate::optim::StepReport;
use crate::plan::ScalingPlan;

pub use gainguard_protocol::events::unix_now;

/// Sends a run's training events. Each step event carries the optimizer's count of steps skipped for a
/// non-finite gradient; with a spectra sampler attached, also the sampler's dropped-sample count and the
/// parameters whose latest check found NaN/Inf weights.
pub struct Telemetry {
    sink: Sink,
    id: RunIdentity,
    last_step_end: Option<Instant>,
    sampler: Option<SamplerHandle>,
}

impl Telemetry {
    pub fn new(sink: Sink, id: RunIdentity) -> Telemetry {
        Telemetry {
            sink,
            id,
            last_step_end: None,
            sampler: None,
        }
    }

    /// Reports the sampler's counters in every step event from now on.
    pub fn attach_sampler(&mut self, sampler: SamplerHandle) {
        self.sampler = Some(sampler);
    }

    pub fn identity(&self) -> &RunIdentity {
        &self.id
    }

    pub fn sink(&self) -> &Sink {
        &self.sink
    }

    /// Announces the run and its rule table. Call once before training.
    pub fn start(&self, plan: &ScalingPlan, planned_steps: Option<u64>, alpha: f64, reference: Option<String>) {
        self.sink.send(self.id.envelope(
            0,
            Event::Hello(Hello {
                pid: std::process::id(),
                planned_steps,
                rule: plan.rule.preset.name().to_string(),
                gamma: plan.rule.reported_gamma(),
                alpha: Some(alpha),
                reference,
            }),
        ));
        self.send_params(plan);
    }

    /// Sends the rule table again (after an explicit regroup).
    pub fn send_params(&self, plan: &ScalingPlan) {
        let params = plan
            .decisions
            .iter()
            .filter(|d| d.tied_to.is_none())
            .map(|d| ParamInfo {
                name: d.name.clone(),
                layer: d.layer,
                class: d.class,
                shape: d.shape.clone(),
                width_multiplier: d.width_multiplier,
                lr: d.lr,
                weight_decay: d.weight_decay,
            })
            .collect();
        self.sink.send(self.id.envelope(0, Event::Params(ParamsTable { params })));
    }

    /// Reports one finished step. Never blocks; a full sink drops and counts.
    pub fn step(&mut self, report: &StepReport, loss: f64, tokens: u64) {
        let now = Instant::now();
        let duration = self.last_step_end.map(|t| now.duration_since(t).as_secs_f64());
        self.last_step_end = Some(now);
        let event = StepEvent {
            loss: loss.is_finite().then_some(loss),
            loss_nonfinite: !loss.is_finite(),
            tokens,
            duration_seconds: duration,
            timestamp_seconds: unix_now(),
            lr_multiplier: report.lr_multiplier,
            wd_multiplier: report.wd_multiplier,
            spectrum_samples_dropped_total: self.sampler.as_ref().map_or(0, |s| s.dropped_total()),
            events_dropped_total: self.sink.dropped_total(),
            nonfinite_parameters: self.sampler.as_ref().and_then(|s| s.nonfinite_parameters()),
            skipped_steps_total: report.skipped_steps_total,
        };
        self.sink.send(self.id.envelope(report.step, Event::Step(event)));
    }

    pub fn finish(&self, step: u64, reason: &str) {
        self.sink.send(self.id.envelope(step, Event::Goodbye(Goodbye { reason: reason.to_string() })));
    }
}

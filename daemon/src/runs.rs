//! The run table: which trainers are known, which parameters each has, when they expire. It enforces the
//! caps on runs, parameters and series, and feeds admitted events to every source.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::daemon::Limits;
use crate::events::{Envelope, Event, ParamClass};
use crate::protocol::{self, RejectReason};
use crate::selfmetrics::SelfMetrics;
use crate::sources::{ParamLabels, RunKey, RunView, Source};

/// Identifies one trainer connection (socket) or one embedded sink.
pub(crate) type ConnId = u64;

/// Data-path messages, in arrival order per connection: a connection's end queues behind its last lines.
pub(crate) enum IngestMsg {
    Event { conn: ConnId, envelope: Envelope, validated: bool },
    Disconnected { conn: ConnId },
}

pub(crate) enum Control {
    Disconnected { conn: ConnId },
    Shutdown,
}

struct RunState {
    conn: ConnId,
    up: bool,
    expires_at: Option<Instant>,
    params: HashMap<String, ParamLabels>,
}

pub(crate) struct RunTable {
    sources: Vec<Arc<dyn Source>>,
    metrics: SelfMetrics,
    limits: Limits,
    ttl: Duration,
    runs: HashMap<RunKey, RunState>,
    /// Upper bound of the series all runs hold, from the sources' per-run and per-param costs.
    series: usize,
    run_cost: usize,
    param_cost: usize,
}

fn labels_of(name: &str, layer: Option<u32>, class: ParamClass) -> ParamLabels {
    ParamLabels { param: name.to_string(), layer: layer.map(|l| l.to_string()).unwrap_or_default(), class: class.as_str() }
}

impl RunTable {
    pub fn new(sources: Vec<Arc<dyn Source>>, metrics: SelfMetrics, limits: Limits, ttl: Duration) -> Self {
        let run_cost = sources.iter().map(|s| s.series_per_run()).sum();
        let param_cost = sources.iter().map(|s| s.series_per_param()).sum();
        RunTable { sources, metrics, limits, ttl, runs: HashMap::new(), series: 0, run_cost, param_cost }
    }

    pub fn handle(&mut self, conn: ConnId, envelope: Envelope, validated: bool, now: Instant) {
        if !validated {
            if let Err(r) = protocol::validate(&envelope) {
                self.metrics.reject(r.reason);
                return;
            }
        }
        let key = RunKey::of(&envelope);
        if !self.runs.contains_key(&key) {
            if self.runs.len() >= self.limits.max_runs {
                self.metrics.reject(RejectReason::TooManyRuns);
                return;
            }
            if self.series + self.run_cost > self.limits.max_series {
                self.metrics.reject(RejectReason::TooManySeries);
                return;
            }
            self.series += self.run_cost;
            self.runs.insert(key.clone(), RunState { conn, up: false, expires_at: None, params: HashMap::new() });
            self.metrics.runs.set(self.runs.len() as i64);
        }
        let state = self.runs.get_mut(&key).expect("inserted above");
        state.conn = conn;
        let mut admit = |name: &str, layer: Option<u32>, class: ParamClass| -> Result<(), RejectReason> {
            if state.params.contains_key(name) {
                return Ok(());
            }
            if state.params.len() >= self.limits.max_params_per_run {
                return Err(RejectReason::TooManyParams);
            }
            if self.series + self.param_cost > self.limits.max_series {
                return Err(RejectReason::TooManySeries);
            }
            self.series += self.param_cost;
            state.params.insert(name.to_string(), labels_of(name, layer, class));
            Ok(())
        };
        match &envelope.event {
            Event::Params(table) => {
                // Admit what fits; the event still updates the admitted part. One rejection per event.
                let mut refused = None;
                for p in &table.params {
                    if let Err(r) = admit(&p.name, p.layer, p.class) {
                        refused.get_or_insert(r);
                    }
                }
                if let Some(r) = refused {
                    self.metrics.reject(r);
                }
            }
            Event::Spectrum(s) => {
                if let Err(r) = admit(&s.param, s.layer, s.class) {
                    self.metrics.reject(r);
                    return;
                }
            }
            Event::Goodbye(_) => {
                state.up = false;
                state.expires_at = Some(now + self.ttl);
            }
            Event::Hello(_) | Event::Step(_) => {
                state.up = true;
                state.expires_at = None;
            }
        }
        self.metrics.events.with_label_values(&[protocol::event_type(&envelope.event)]).inc();
        let view = RunView { key: &key, params: &state.params };
        for s in &self.sources {
            s.observe(&view, &envelope);
        }
    }

    /// A connection or embedded sink went away: its live runs are down and start their TTL.
    pub fn disconnected(&mut self, conn: ConnId, now: Instant) {
        for (key, state) in self.runs.iter_mut() {
            if state.conn == conn && state.up {
                state.up = false;
                state.expires_at = Some(now + self.ttl);
                for s in &self.sources {
                    s.trainer_down(key);
                }
            }
        }
    }

    /// Removes every series of runs whose TTL ran out.
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<RunKey> =
            self.runs.iter().filter(|(_, s)| s.expires_at.is_some_and(|t| t <= now)).map(|(k, _)| k.clone()).collect();
        for key in expired {
            let state = self.runs.remove(&key).expect("listed above");
            let params: Vec<ParamLabels> = state.params.into_values().collect();
            self.series -= self.run_cost + params.len() * self.param_cost;
            for s in &self.sources {
                s.forget_run(&key, &params);
            }
        }
        self.metrics.runs.set(self.runs.len() as i64);
    }
}

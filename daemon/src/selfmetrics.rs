//! The daemon's own metrics: what it ingested, what it refused, how much it exports.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use gainguard_protocol::events::Event;
use gainguard_protocol::wire::{event_type, RejectReason, EVENT_TYPES};


/// Why the daemon closed an ingest connection it had admitted (`gainguard_ingest_connections_closed_total`).
pub const CLOSE_REASONS: [&str; 2] = ["idle_timeout", "evicted"];
/// Why an HTTP connection or request was turned away (`gainguard_http_refused_total`).
pub const HTTP_REFUSALS: [&str; 6] =
    ["too_many_connections", "evicted", "too_many_scrapes", "unauthorized", "plain_http", "tls_handshake_failed"];

#[derive(Clone)]
pub struct SelfMetrics {
    pub events: IntCounterVec,
    /// The children of `events`, in [`EVENT_TYPES`] order, so that counting an event needs no lookup.
    events_by_type: Vec<IntCounter>,
    pub rejected: IntCounterVec,
    pub connections: IntGauge,
    pub connections_closed: IntCounterVec,
    pub http_refused: IntCounterVec,
    pub runs: IntGauge,
    pub runs_evicted: IntCounter,
    /// Set from the size of the body being rendered, just before the families that hold it are encoded.
    pub exported_series: IntGauge,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str, values: &[&str]) -> prometheus::Result<IntCounterVec> {
    let v = IntCounterVec::new(Opts::new(name, help), &[label])?;
    // Zero-initialise every label so that rate() and increase() see the first increment.
    for x in values {
        v.with_label_values(&[x]);
    }
    registry.register(Box::new(v.clone()))?;
    Ok(v)
}

impl SelfMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let events = counter_vec(registry, "gainguard_ingest_events_total", "Events accepted by the daemon, by event type.", "type", &EVENT_TYPES)?;
        let reasons: Vec<&str> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        let rejected = counter_vec(
            registry,
            "gainguard_ingest_rejected_total",
            "Input lines, events or connections refused by the daemon, by reason (see docs/protocol.md).",
            "reason",
            &reasons,
        )?;
        let connections_closed = counter_vec(
            registry,
            "gainguard_ingest_connections_closed_total",
            "Admitted ingest connections the daemon closed: idle_timeout (no byte for --ingest-idle-timeout) or evicted (an idle slot given to a newcomer at a cap).",
            "reason",
            &CLOSE_REASONS,
        )?;
        let http_refused = counter_vec(
            registry,
            "gainguard_http_refused_total",
            "HTTP connections closed or requests refused: 503 to keep the exporter within its limits, 401 without the basic auth of the web config file, 400 for plain HTTP to its TLS port, or a failed TLS handshake.",
            "reason",
            &HTTP_REFUSALS,
        )?;
        let connections =
            IntGauge::new("gainguard_ingest_connections", "Open trainer connections (sockets and embedded sinks).")?;
        let runs = IntGauge::new("gainguard_runs", "Run/rank/host combinations currently tracked.")?;
        let runs_evicted = IntCounter::new(
            "gainguard_runs_evicted_total",
            "Idle runs removed before their TTL to make room for a new trainer at --max-runs.",
        )?;
        let exported_series = IntGauge::new(
            "gainguard_exported_series",
            "Samples in this /metrics body apart from this one (histograms count every bucket).",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("gainguard_build_info", "Always 1; the daemon's version as a label."),
            &["version"],
        )?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for c in [&connections, &runs, &exported_series] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(runs_evicted.clone()))?;
        registry.register(Box::new(build_info))?;
        let events_by_type = EVENT_TYPES.iter().map(|t| events.with_label_values(&[t])).collect();
        Ok(SelfMetrics { events, events_by_type, rejected, connections, connections_closed, http_refused, runs, runs_evicted, exported_series })
    }

    pub fn count_event(&self, event: &Event) {
        let t = event_type(event);
        if let Some(c) = EVENT_TYPES.iter().position(|x| *x == t).and_then(|i| self.events_by_type.get(i)) {
            c.inc();
        }
    }

    pub fn reject(&self, reason: RejectReason) {
        self.rejected.with_label_values(&[reason.as_str()]).inc();
    }

    pub fn closed(&self, reason: &str) {
        self.connections_closed.with_label_values(&[reason]).inc();
    }

    pub fn http_refused(&self, reason: &str) {
        self.http_refused.with_label_values(&[reason]).inc();
    }
}

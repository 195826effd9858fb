//! The daemon's own metrics: what it ingested, what it refused, how much it exports.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::protocol::{RejectReason, EVENT_TYPES};

#[derive(Clone)]
pub struct SelfMetrics {
    pub events: IntCounterVec,
    pub rejected: IntCounterVec,
    pub connections: IntGauge,
    pub runs: IntGauge,
    /// Lives in its own registry: it is set from the size of the main registry's output, just before encoding.
    pub exported_series: IntGauge,
}

impl SelfMetrics {
    pub fn new(registry: &Registry, meta: &Registry) -> Result<Self, prometheus::Error> {
        let events = IntCounterVec::new(
            Opts::new("gainguard_ingest_events_total", "Events accepted by the daemon, by event type."),
            &["type"],
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "gainguard_ingest_rejected_total",
                "Input lines or events refused by the daemon, by reason (see docs/protocol.md).",
            ),
            &["reason"],
        )?;
        // Zero-initialise every label so that rate() and increase() see the first rejection.
        for t in EVENT_TYPES {
            events.with_label_values(&[t]);
        }
        for r in RejectReason::ALL {
            rejected.with_label_values(&[r.as_str()]);
        }
        let connections =
            IntGauge::new("gainguard_ingest_connections", "Open trainer connections (sockets and embedded sinks).")?;
        let runs = IntGauge::new("gainguard_runs", "Run/rank/host combinations currently tracked.")?;
        let exported_series = IntGauge::new(
            "gainguard_exported_series",
            "Samples in the previous-to-this /metrics body, excluding this one (histograms count every bucket).",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("gainguard_build_info", "Always 1; the daemon's version as a label."),
            &["version"],
        )?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(runs.clone()))?;
        registry.register(Box::new(build_info))?;
        meta.register(Box::new(exported_series.clone()))?;
        Ok(SelfMetrics { events, rejected, connections, runs, exported_series })
    }

    pub fn reject(&self, reason: RejectReason) {
        self.rejected.with_label_values(&[reason.as_str()]).inc();
    }
}

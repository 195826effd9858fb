//! Whether each trainer is alive: up after Hello or Step, down after Goodbye or when its connection (or
//! embedded sink) goes away without one.

use std::sync::Arc;

use prometheus::{GaugeVec, Opts};

use super::{remove, ParamLabels, RunKey, RunView, Source, SourceContext, SourceSpec, RUN_LABELS};
use crate::daemon::DaemonError;
use crate::events::{Envelope, Event};

pub const SPEC: SourceSpec = SourceSpec { name: "liveness", default_enabled: true, build };

pub struct Liveness {
    up: GaugeVec,
}

fn build(ctx: &SourceContext<'_>) -> Result<Arc<dyn Source>, DaemonError> {
    let up = GaugeVec::new(
        Opts::new(
            "gainguard_trainer_up",
            "1 while the trainer is running; 0 after Goodbye or when it vanished without one.",
        ),
        &RUN_LABELS,
    )?;
    ctx.registry.register(Box::new(up.clone()))?;
    Ok(Arc::new(Liveness { up }))
}

impl Source for Liveness {
    fn name(&self) -> &'static str {
        SPEC.name
    }

    fn series_per_run(&self) -> usize {
        1
    }

    fn observe(&self, run: &RunView<'_>, envelope: &Envelope) {
        let value = match envelope.event {
            Event::Hello(_) | Event::Step(_) => 1.0,
            Event::Goodbye(_) => 0.0,
            _ => return,
        };
        self.up.with_label_values(&run.key.labels()).set(value);
    }

    fn trainer_down(&self, run: &RunKey) {
        self.up.with_label_values(&run.labels()).set(0.0);
    }

    fn forget_run(&self, run: &RunKey, _params: &[ParamLabels]) {
        remove(&self.up, &run.labels());
    }
}

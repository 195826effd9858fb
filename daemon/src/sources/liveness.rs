//! Whether each trainer is alive: up after Hello or Step, down after Goodbye or when its connection (or
//! embedded sink) goes away without one; and, once it is down, why (`gainguard_trainer_exit_info`), so that
//! a run that said `finished` is not paged as a crash even when it never reported its planned steps.

use std::sync::Arc;

use prometheus::Opts;

use gainguard_protocol::events::{Envelope, Event};

use crate::exposition::{GaugeCell, GaugeVec, Series};

use super::{remove, ParamLabels, RunKey, RunMemo, RunView, Source, SourceContext, SourceSpec, RUN_LABELS};
use crate::error::DaemonError;

pub const SPEC: SourceSpec = SourceSpec { name: "liveness", default_enabled: true, build };

pub struct Liveness {
    up: GaugeVec,
    exit: GaugeVec,
}

/// Per run: the `up` series, and the reason its exit series carries while it is down (to replace it, and
/// not add a second, or keep it).
#[derive(Default)]
struct Memo {
    up: Option<Arc<Series<GaugeCell>>>,
    exit: Option<&'static str>,
}

/// Values of the `reason` label: a Goodbye's reason when it is one of the protocol's, `other` for any
/// other text (so a client cannot grow the label set), `vanished` when the connection went away without
/// a Goodbye.
pub const EXIT_REASONS: [&str; 5] = ["finished", "error", "interrupted", "other", "vanished"];

fn exit_reason(goodbye: &str) -> &'static str {
    EXIT_REASONS[..3].iter().copied().find(|r| *r == goodbye).unwrap_or("other")
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
    let exit = GaugeVec::new(
        Opts::new(
            "gainguard_trainer_exit_info",
            "1 for how the trainer's last process ended: reason = finished, error, interrupted, other (from its Goodbye) or vanished (no Goodbye). Absent while it runs.",
        ),
        &["run", "rank", "host", "reason"],
    )?;
    ctx.registry.register(Box::new(exit.clone()))?;
    Ok(Arc::new(Liveness { up, exit }))
}

impl Liveness {
    fn clear_exit(&self, run: &RunKey, memo: &mut Memo) {
        if let Some(reason) = memo.exit.take() {
            let [r, k, h] = run.labels();
            remove(&self.exit, &[r, k, h, reason]);
        }
    }

    fn set_exit(&self, run: &RunKey, memo: &mut Memo, reason: &'static str) {
        self.clear_exit(run, memo);
        let [r, k, h] = run.labels();
        self.exit.with_label_values(&[r, k, h, reason]).set(1.0);
        memo.exit = Some(reason);
    }
}

impl Source for Liveness {
    fn name(&self) -> &'static str {
        SPEC.name
    }

    fn series_per_run(&self) -> usize {
        2
    }

    fn observe(&self, run: &mut RunView<'_>, envelope: &Envelope) {
        let memo: &mut Memo = run.memo.get();
        let value = match &envelope.event {
            // A new process for the same run and rank, or steps after a Goodbye: it is running again, and
            // has no exit reason (yet).
            Event::Hello(_) | Event::Step(_) => {
                self.clear_exit(run.key, memo);
                1.0
            }
            Event::Goodbye(g) => {
                self.set_exit(run.key, memo, exit_reason(&g.reason));
                0.0
            }
            _ => return,
        };
        self.up.cached(&mut memo.up, &run.key.labels()).set(value);
    }

    fn trainer_down(&self, run: &RunKey, memo: &mut RunMemo) {
        let memo: &mut Memo = memo.get();
        // After a Goodbye the connection closes too: keep the reason the trainer gave.
        if memo.exit.is_none() {
            self.set_exit(run, memo, "vanished");
        }
        self.up.cached(&mut memo.up, &run.labels()).set(0.0);
    }

    fn forget_run(&self, run: &RunKey, _params: &[ParamLabels]) {
        let [r, k, h] = run.labels();
        remove(&self.up, &[r, k, h]);
        for reason in EXIT_REASONS {
            remove(&self.exit, &[r, k, h, reason]);
        }
    }
}

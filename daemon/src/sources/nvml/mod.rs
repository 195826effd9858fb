//! GPU statistics from NVML, polled on the source's own thread: the mapping from readings to series
//! ([`mapping`]), the real backend over the driver ([`backend`]), and the settings ([`settings`]). Without a
//! driver or a GPU the daemon exports `gainguard_nvml_up 0`, logs one line, and carries on; with
//! [`NvmlMode::On`] it does not start.

mod backend;
mod mapping;
mod settings;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use gainguard_protocol::events::{Envelope, Event};

use super::{lock, ParamLabels, RunKey, RunView, Source, SourceContext, SourceSpec};
use crate::error::DaemonError;
use crate::history::History;
pub use backend::{GpuBackend, GpuReading, RealNvml, THROTTLE_REASONS};
pub use mapping::GpuSeries;
pub use settings::{NvmlArgs, NvmlMode, NvmlSettings};

pub const SPEC: SourceSpec = SourceSpec { name: "nvml", default_enabled: true, build };

/// The NVML source: its series and the thread that polls the driver into them.
pub struct Nvml {
    series: Arc<GpuSeries>,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
    poller: Mutex<Option<JoinHandle<()>>>,
}

fn build(ctx: &SourceContext<'_>) -> Result<Arc<dyn Source>, DaemonError> {
    let settings = &ctx.settings.nvml;
    let nvml = Nvml {
        series: Arc::new(GpuSeries::new(ctx.registry, ctx.host.clone())?),
        history: Arc::clone(ctx.history),
        stop: Arc::new(AtomicBool::new(false)),
        poller: Mutex::new(None),
    };
    if settings.mode == NvmlMode::Off {
        return Ok(Arc::new(nvml));
    }
    if let Err(err) = nvml.start_poller(settings.interval) {
        if settings.mode == NvmlMode::On {
            return Err(DaemonError::SourceUnavailable {
                source_name: SPEC.name,
                detail: format!("NVML was required (--nvml on) but is unavailable: {err}"),
            });
        }
        tracing::warn!("NVML unavailable ({err}); GPU metrics disabled, gainguard_nvml_up 0");
    }
    Ok(Arc::new(nvml))
}

impl Nvml {
    /// Starts the poller thread, which opens NVML and keeps it (and the Xid event set that borrows it) on its
    /// own stack until it stops. Returns once NVML answered or failed to.
    fn start_poller(&self, interval: Duration) -> Result<(), String> {
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (series, stop, history) = (Arc::clone(&self.series), Arc::clone(&self.stop), Arc::clone(&self.history));
        let handle = std::thread::Builder::new()
            .name("gainguard-nvml".into())
            .spawn(move || {
                let nvml = match backend::open_nvml() {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut backend = RealNvml::new(&nvml);
                let _ = ready_tx.send(Ok(()));
                poll_loop(&series, &history, &mut backend, interval, &stop);
            })
            .map_err(|e| format!("cannot start the NVML poller thread: {e}"))?;
        let ready = ready_rx.recv().unwrap_or_else(|_| Err("the NVML poller thread ended during start-up".into()));
        match ready {
            Ok(()) => *lock(&self.poller) = Some(handle),
            Err(_) => {
                let _ = handle.join();
            }
        }
        ready
    }
}

/// Polls `backend` every `interval` until `stop`.
fn poll_loop(series: &GpuSeries, history: &History, backend: &mut dyn GpuBackend, interval: Duration, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let readings = backend.read();
        record_history(history, &readings);
        series.apply(readings);
        // Sleep in slices so that shutdown is prompt.
        let mut slept = Duration::ZERO;
        while slept < interval && !stop.load(Ordering::Relaxed) {
            let step = Duration::from_millis(50).min(interval - slept);
            std::thread::sleep(step);
            slept += step;
        }
    }
}

/// What the live page shows of a poll: utilisation, memory used and total, power, in the exported units.
fn record_history(history: &History, readings: &Result<Vec<GpuReading>, String>) {
    let summary: Option<Vec<_>> = readings.as_ref().ok().map(|rs| {
        rs.iter()
            .map(|r| {
                let values = [
                    r.utilization_percent.map(|p| p as f64 / 100.0),
                    r.memory_used_bytes.map(|b| b as f64),
                    r.memory_total_bytes.map(|b| b as f64),
                    r.power_milliwatts.map(|mw| mw as f64 / 1000.0),
                ];
                (r.index.to_string(), r.uuid.clone(), r.name.clone(), values)
            })
            .collect()
    });
    history.record_gpus(summary.as_deref());
}

impl Source for Nvml {
    fn name(&self) -> &'static str {
        SPEC.name
    }

    fn observe(&self, run: &mut RunView<'_>, envelope: &Envelope) {
        if let Event::Hello(h) = &envelope.event {
            self.series.announce(h.pid, run.key);
        }
    }

    fn forget_run(&self, run: &RunKey, _params: &[ParamLabels]) {
        self.series.forget_run(run);
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = lock(&self.poller).take() {
            let _ = h.join();
        }
    }
}

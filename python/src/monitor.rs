//! `gainguard.monitor`'s native half: the telemetry, the spectra sampler (driven through its observer hooks
//! around the Python optimizer's step) and the optional reference profile, over an embedded daemon or a
//! connection to a standalone gainguardd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gainguard::daemon::{Daemon, DaemonConfig};
use gainguard::monitor::{SamplerConfig, SamplerHandle, SpectrumSampler};
use gainguard::optim::ParamSlot;
use gainguard::protocol::Sink;
use gainguard::reference::{ProfileRecorder, ReferenceProfile};
use gainguard::telemetry::{RunIdentity, Telemetry};
use gainguard::{ScalingPlan, StepObserver, StepReport};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::Tensor;

use crate::Plan;

fn runtime_error(context: &str, e: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(format!("{context}: {e}"))
}

#[pyclass(unsendable)]
struct NativeMonitor {
    plan: ScalingPlan,
    telemetry: Telemetry,
    sampler: Option<SpectrumSampler>,
    handle: Option<SamplerHandle>,
    daemon: Option<Daemon>,
    recorder: Option<(ProfileRecorder, PathBuf)>,
    alpha: f64,
    planned_steps: Option<u64>,
    last_report: StepReport,
    closed: bool,
}

/// The optimizer's untied parameters as the sampler sees them: `slots[i]` is `(decision index, tensor)`.
fn param_slots(plan: &ScalingPlan, slots: Vec<(usize, PyTensor)>) -> PyResult<Vec<ParamSlot>> {
    slots
        .into_iter()
        .map(|(decision, t)| {
            let d = plan.decisions.get(decision).ok_or_else(|| PyValueError::new_err(format!("no parameter {decision} in the plan")))?;
            // The sampler reads only the parameter; the moments stay in torch's optimizer state.
            Ok(ParamSlot {
                name: d.name.clone(),
                tensor: t.0,
                first_moment: Tensor::new(),
                second_moment: Tensor::new(),
                step: 0,
                decay_horizon: 0.0,
                decision,
                group: 0,
            })
        })
        .collect()
}

#[pymethods]
impl NativeMonitor {
    #[new]
    #[pyo3(signature = (plan, run, listen=None, connect=None, interval=10, planned_steps=None, alpha=0.75, reference=None, record_profile=None, budget_fraction=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        plan: &Plan,
        run: &str,
        listen: Option<&str>,
        connect: Option<&str>,
        interval: u64,
        planned_steps: Option<u64>,
        alpha: f64,
        reference: Option<PathBuf>,
        record_profile: Option<PathBuf>,
        budget_fraction: Option<f64>,
    ) -> PyResult<NativeMonitor> {
        let plan = plan.plan.clone();
        let (sink, daemon) = match (listen, connect) {
            (Some(_), Some(_)) => return Err(PyValueError::new_err("monitor: give listen= (embedded daemon) or connect= (gainguardd), not both")),
            (Some(addr), None) => {
                let listen: SocketAddr = addr
                    .parse()
                    .map_err(|e| PyValueError::new_err(format!("monitor: listen = {addr:?} is not an address such as 127.0.0.1:9464: {e}")))?;
                let d = Daemon::spawn(DaemonConfig { listen, ..Default::default() }).map_err(|e| runtime_error(&format!("starting the embedded daemon on {addr}"), e))?;
                (d.sink(), Some(d))
            }
            (None, Some(addr)) => (Sink::connect(addr, Default::default()).map_err(|e| runtime_error(&format!("connecting to gainguardd at {addr}"), e))?, None),
            (None, None) => return Err(PyValueError::new_err("monitor: give listen=\"127.0.0.1:9464\" (embedded daemon) or connect=\"unix:/path\" | \"tcp:127.0.0.1:PORT\"")),
        };
        let id = RunIdentity::local(run);
        let mut telemetry = Telemetry::new(sink.clone(), id.clone());
        let config = SamplerConfig {
            run: id.run.clone(),
            rank: id.rank,
            host: id.host.clone(),
            interval,
            budget_fraction,
            alpha,
            planned_steps,
            ..Default::default()
        };
        let mut sampler = SpectrumSampler::new(config, &plan, sink).map_err(|e| runtime_error("starting the spectra sampler", e))?;
        let reference_name = reference.as_ref().map(|p| p.display().to_string());
        if let Some(path) = &reference {
            let profile = ReferenceProfile::read_json(path).map_err(|e| PyValueError::new_err(format!("reference {}: {e}", path.display())))?;
            profile.check_names(&plan).map_err(|e| PyValueError::new_err(format!("reference {}: {e}", path.display())))?;
            sampler = sampler.with_reference(Arc::new(profile));
        }
        let recorder = record_profile.map(|path| (ProfileRecorder::new(), path));
        if let Some((rec, _)) = &recorder {
            sampler.add_listener(rec.listener());
        }
        let handle = sampler.handle();
        telemetry.attach_sampler(handle.clone());
        telemetry.start(&plan, planned_steps, alpha, reference_name);
        Ok(NativeMonitor {
            plan,
            telemetry,
            sampler: Some(sampler),
            handle: Some(handle),
            daemon,
            recorder,
            alpha,
            planned_steps,
            last_report: StepReport::default(),
            closed: false,
        })
    }

    /// The embedded daemon's `/metrics` address, None when connected to a gainguardd.
    fn metrics_addr(&self) -> Option<String> {
        self.daemon.as_ref().map(|d| d.metrics_addr().to_string())
    }

    /// Before the optimizer changes the parameters of step `step` (1-based).
    fn before_step(&mut self, py: Python<'_>, step: u64, slots: Vec<(usize, PyTensor)>) -> PyResult<()> {
        let slots = param_slots(&self.plan, slots)?;
        if let Some(s) = self.sampler.as_mut() {
            py.allow_threads(move || s.before_step(step, &slots));
        }
        Ok(())
    }

    /// After the optimizer's step `step`, with what it did.
    #[pyo3(signature = (step, slots, lr_multiplier, wd_multiplier, grad_norm, nonfinite_grad, skipped, skipped_steps_total, skipped_without_grad))]
    #[allow(clippy::too_many_arguments)]
    fn after_step(
        &mut self,
        py: Python<'_>,
        step: u64,
        slots: Vec<(usize, PyTensor)>,
        lr_multiplier: f64,
        wd_multiplier: f64,
        grad_norm: Option<f64>,
        nonfinite_grad: Option<String>,
        skipped: bool,
        skipped_steps_total: u64,
        skipped_without_grad: usize,
    ) -> PyResult<()> {
        let slots = param_slots(&self.plan, slots)?;
        let report = StepReport {
            step,
            lr_multiplier,
            wd_multiplier,
            grad_norm,
            clipped: false,
            skipped_without_grad,
            nonfinite_grad,
            skipped,
            skipped_steps_total,
        };
        if let Some(s) = self.sampler.as_mut() {
            let plan = &self.plan;
            let report = &report;
            py.allow_threads(move || s.after_step(report, &slots, plan));
        }
        self.last_report = report;
        Ok(())
    }

    /// Reports the finished step's loss and tokens (after the optimizer's step).
    fn step(&mut self, loss: f64, tokens: u64) {
        if !self.closed {
            self.telemetry.step(&self.last_report, loss, tokens);
        }
    }

    /// Parameter samples dropped because the sampler fell behind (`gainguard_spectrum_samples_dropped_total`).
    fn dropped_samples(&self) -> u64 {
        self.handle.as_ref().map_or(0, |h| h.dropped_total())
    }

    fn emitted_samples(&self) -> u64 {
        self.handle.as_ref().map_or(0, |h| h.emitted_total())
    }

    /// Drains the sampler, says goodbye, flushes, writes the recorded profile and stops the embedded daemon
    /// (after `linger` seconds, so that a scrape can still read the last values). Idempotent.
    #[pyo3(signature = (reason="finished", linger=0.0))]
    fn close(&mut self, py: Python<'_>, reason: &str, linger: f64) -> PyResult<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        let handle = self.handle.take();
        let sampler = self.sampler.take();
        let step = self.last_report.step;
        let telemetry = &self.telemetry;
        py.allow_threads(|| {
            if let Some(h) = &handle {
                h.finish(Duration::from_secs(60));
            }
            drop(sampler);
            telemetry.finish(step, reason);
            telemetry.sink().flush(Duration::from_secs(5));
        });
        if let Some((rec, path)) = self.recorder.take() {
            let run = self.telemetry.identity().run.clone();
            let profile = rec.finish(&run, &self.plan, self.alpha, self.planned_steps);
            profile.write_json(&path).map_err(|e| runtime_error(&format!("writing the profile {}", path.display()), e))?;
        }
        if let Some(d) = self.daemon.take() {
            py.allow_threads(|| {
                std::thread::sleep(Duration::from_secs_f64(linger.max(0.0)));
                d.shutdown();
            });
        }
        Ok(())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeMonitor>()
}

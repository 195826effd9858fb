//! `gainguard.monitor`'s native half: a [`gainguard::Monitor`] attached to the Python optimizer's plan and
//! driven through its hooks for optimizers that step by themselves, around the Python optimizer's step.

use std::error::Error;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gainguard::protocol::events::{ParamClass, SpectrumSample};
use gainguard::{ParamRef, SamplerConfig};
use gainguard::reference::ReferenceError;
use gainguard::{Monitor, MonitorError, StepReport};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::Tensor;

use crate::Plan;

/// `e` and its sources: `MonitorError` keeps the OS's or the connection's reason as its source.
fn with_sources(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// A bad profile is the caller's input (ValueError); the rest is the environment (RuntimeError).
fn monitor_error(e: MonitorError, reference: Option<&Path>) -> PyErr {
    match &e {
        // The mismatch names the parameters; the file is the caller's `reference=`.
        MonitorError::Reference(ReferenceError::NameMismatch { .. }) => match reference {
            Some(path) => PyValueError::new_err(format!("reference {}: {e}", path.display())),
            None => PyValueError::new_err(e.to_string()),
        },
        MonitorError::Reference(_) => PyValueError::new_err(with_sources(&e)),
        MonitorError::Sampler(_) => PyRuntimeError::new_err(format!("starting the spectra sampler: {}", with_sources(&e))),
        // Its hint names the Rust knobs; a Python caller's is `listen=`.
        MonitorError::Daemon { listen, source } => PyRuntimeError::new_err(format!(
            "monitor: cannot start the embedded gainguardd serving /metrics on listen = \"{listen}\" (if the port is taken: give another listen=, port 0 picks a free one): {}",
            with_sources(source)
        )),
        _ => PyRuntimeError::new_err(with_sources(&e)),
    }
}

#[pyclass(unsendable)]
struct NativeMonitor {
    /// None once closed.
    monitor: Option<Monitor>,
    /// The plan's parameter names by decision index: the optimizer's slots come as `(decision, tensor, H)`.
    names: Vec<String>,
    /// Class and layer by decision index, for the samples the Python side estimates itself.
    classes: Vec<(ParamClass, Option<u32>)>,
    last_report: StepReport,
}

impl NativeMonitor {
    /// The optimizer's untied parameters as `(name, tensor, decay horizon)`: `slots[i]` is `(decision index,
    /// tensor, H)`, H being the optimizer's `Σ lr·wd` of the parameter so far.
    fn params(names: &[String], slots: Vec<(usize, PyTensor, Option<f64>)>) -> PyResult<Vec<(&str, Tensor, Option<f64>)>> {
        slots
            .into_iter()
            .map(|(decision, t, horizon)| {
                let name = names.get(decision).ok_or_else(|| PyValueError::new_err(format!("no parameter {decision} in the plan")))?;
                Ok((name.as_str(), t.0, horizon))
            })
            .collect()
    }
}

/// `tch::Tensor` is `Send` but not `Sync`, so the tensors move into the closure that runs without the GIL and
/// are borrowed there.
fn param_refs<'a>(params: &'a [(&'a str, Tensor, Option<f64>)]) -> Vec<ParamRef<'a>> {
    params.iter().map(|(name, tensor, decay_horizon)| ParamRef { name, tensor, decay_horizon: *decay_horizon }).collect()
}

#[pymethods]
impl NativeMonitor {
    #[new]
    #[pyo3(signature = (plan, run, listen=None, connect=None, interval=10, planned_steps=None, alpha=0.75, reference=None, record_profile=None, budget_fraction=None, rank=None, spectra=true, ingest_unix=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
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
        rank: Option<u32>,
        spectra: bool,
        ingest_unix: Option<PathBuf>,
    ) -> PyResult<NativeMonitor> {
        let sampler = SamplerConfig { interval, budget_fraction, alpha, ..Default::default() };
        let mut builder = Monitor::builder(run).sampler(sampler).spectra(spectra);
        if let Some(rank) = rank {
            builder = builder.rank(rank);
        }
        if let Some(n) = planned_steps {
            builder = builder.planned_steps(n);
        }
        if let Some(path) = &reference {
            builder = builder.reference(path);
        }
        if let Some(path) = record_profile {
            builder = builder.record_profile(path);
        }
        let monitor = match (listen, connect) {
            (Some(_), Some(_)) => return Err(PyValueError::new_err("monitor: give listen= (embedded daemon) or connect= (gainguardd), not both")),
            (Some(addr), None) => {
                let listen: SocketAddr = addr
                    .parse()
                    .map_err(|e| PyValueError::new_err(format!("monitor: listen = {addr:?} is not an address such as 127.0.0.1:9464: {e}")))?;
                // The node's other ranks, if any, send to this daemon over a Unix socket.
                if let Some(path) = &ingest_unix {
                    builder = builder.ingest_unix(path);
                }
                builder.listen(listen).embedded().map_err(|e| match (e, &ingest_unix) {
                    (MonitorError::Daemon { listen, source }, Some(path)) => PyRuntimeError::new_err(format!(
                        "monitor: cannot start the embedded gainguardd serving /metrics on listen = \"{listen}\" and taking the other ranks' events on unix:{}: {}",
                        path.display(),
                        with_sources(&source)
                    )),
                    (e, _) => monitor_error(e, reference.as_deref()),
                })
            }
            (None, Some(addr)) => builder
                .connect(addr)
                .map_err(|e| match e {
                    // The Python caller gave `connect=`, or monitor.py read $GAINGUARD_ADDR: not Monitor::connect.
                    MonitorError::Connect { addr, source, .. } => MonitorError::Connect { addr, origin: "connect= or $GAINGUARD_ADDR".into(), source },
                    e => e,
                })
                .map_err(|e| monitor_error(e, reference.as_deref())),
            (None, None) => return Err(PyValueError::new_err("monitor: give listen=\"127.0.0.1:9464\" (embedded daemon) or connect=\"unix:/path\" | \"tcp:127.0.0.1:PORT\"")),
        }?;
        let plan = &plan.plan;
        // Reads and checks the reference profile, starts the sampler's thread and announces the run.
        let monitor = py.allow_threads(move || monitor.for_plan(plan)).map_err(|e| monitor_error(e, reference.as_deref()))?;
        Ok(NativeMonitor {
            monitor: Some(monitor),
            names: plan.decisions.iter().map(|d| d.name.clone()).collect(),
            classes: plan.decisions.iter().map(|d| (d.class, d.layer)).collect(),
            last_report: StepReport::default(),
        })
    }

    /// The embedded daemon's `/metrics` address, None when connected to a gainguardd (or closed).
    fn metrics_addr(&self) -> Option<String> {
        self.monitor.as_ref().and_then(|m| m.metrics_addr()).map(|a| a.to_string())
    }

    /// Sends one spectrum sample that the Python side estimated itself (a matrix sharded over ranks, whose
    /// estimate every rank computed together and this rank exports) for parameter `decision` at `step`.
    #[pyo3(signature = (step, decision, sigma_max, top_k, iterations, frobenius_norm, duration_seconds, decay_horizon=None))]
    #[allow(clippy::too_many_arguments)]
    fn emit_spectrum(
        &self,
        step: u64,
        decision: usize,
        sigma_max: Option<f64>,
        top_k: Vec<f64>,
        iterations: u32,
        frobenius_norm: Option<f64>,
        duration_seconds: f64,
        decay_horizon: Option<f64>,
    ) -> PyResult<bool> {
        let Some(m) = self.monitor.as_ref() else { return Ok(false) };
        let name = self.names.get(decision).ok_or_else(|| PyValueError::new_err(format!("no parameter {decision} in the plan")))?;
        let (class, layer) = self.classes[decision];
        let stable_rank = match (sigma_max, frobenius_norm) {
            (Some(s), Some(f)) if s > 0.0 => Some(f * f / (s * s)),
            _ => None,
        };
        let sample = SpectrumSample {
            sigma_max,
            top_k,
            iterations,
            frobenius_norm,
            stable_rank,
            nonfinite: sigma_max.is_none(),
            duration_seconds,
            decay_horizon,
            ..SpectrumSample::empty(name.clone(), layer, class)
        };
        Ok(m.send_spectrum(step, sample))
    }

    /// Before the optimizer changes the parameters of step `step` (1-based).
    fn before_step(&mut self, py: Python<'_>, step: u64, slots: Vec<(usize, PyTensor, Option<f64>)>) -> PyResult<()> {
        let params = Self::params(&self.names, slots)?;
        if let Some(m) = self.monitor.as_mut() {
            py.allow_threads(move || m.before_step(step, &param_refs(&params)));
        }
        Ok(())
    }

    /// After the optimizer's step `step`, with what it did.
    #[pyo3(signature = (step, slots, lr_multiplier, wd_multiplier, grad_norm, nonfinite_grad, skipped, skipped_steps_total, skipped_without_grad, clipped=false))]
    #[allow(clippy::too_many_arguments)]
    fn after_step(
        &mut self,
        py: Python<'_>,
        step: u64,
        slots: Vec<(usize, PyTensor, Option<f64>)>,
        lr_multiplier: f64,
        wd_multiplier: f64,
        grad_norm: Option<f64>,
        nonfinite_grad: Option<String>,
        skipped: bool,
        skipped_steps_total: u64,
        skipped_without_grad: usize,
        clipped: bool,
    ) -> PyResult<()> {
        let params = Self::params(&self.names, slots)?;
        let report = StepReport {
            step,
            lr_multiplier,
            wd_multiplier,
            grad_norm,
            clipped,
            skipped_without_grad,
            nonfinite_grad,
            skipped,
            skipped_steps_total,
        };
        if let Some(m) = self.monitor.as_mut() {
            let report = &report;
            py.allow_threads(move || m.after_step(report, &param_refs(&params)));
        }
        self.last_report = report;
        Ok(())
    }

    /// Reports the finished step's loss and tokens (after the optimizer's step).
    fn step(&mut self, loss: f64, tokens: u64) {
        if let Some(m) = self.monitor.as_mut() {
            m.step(&self.last_report, loss, tokens);
        }
    }

    /// Waits at most `timeout` seconds until the sampler has processed what is queued and the sink has
    /// delivered it; the run goes on. True when both finished in time; false when closed.
    #[pyo3(signature = (timeout=10.0))]
    fn flush(&mut self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        if !(timeout.is_finite() && timeout >= 0.0) {
            return Err(PyValueError::new_err(format!("flush: timeout = {timeout} is not a number of seconds >= 0")));
        }
        let Some(m) = self.monitor.as_mut() else { return Ok(false) };
        Ok(py.allow_threads(move || m.flush(Duration::from_secs_f64(timeout))))
    }

    /// Parameter samples dropped because the sampler fell behind (`gainguard_spectrum_samples_dropped_total`).
    fn dropped_samples(&self) -> u64 {
        self.monitor.as_ref().and_then(|m| m.sampler()).map_or(0, |h| h.dropped_total())
    }

    /// Adds `n` samples dropped outside the native sampler (rounds of sharded matrices that the Python
    /// sampler could not estimate in time) to its drop count, which the step telemetry exports. Without a
    /// native sampler (spectra off, or closed) there is nothing to add to: returns false.
    fn count_dropped(&self, n: u64) -> bool {
        match self.monitor.as_ref().and_then(|m| m.sampler()) {
            Some(h) => {
                h.dropped_counter().fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    fn emitted_samples(&self) -> u64 {
        self.monitor.as_ref().and_then(|m| m.sampler()).map_or(0, |h| h.emitted_total())
    }

    /// Drains the sampler, writes the recorded profile, says goodbye, flushes and stops the embedded daemon
    /// (after `linger` seconds, so that a scrape can still read the last values). Idempotent.
    #[pyo3(signature = (reason="finished", linger=0.0))]
    fn close(&mut self, py: Python<'_>, reason: &str, linger: f64) -> PyResult<()> {
        let Some(mut monitor) = self.monitor.take() else { return Ok(()) };
        let finished = py.allow_threads(move || {
            let finished = monitor.finish_with(reason);
            if linger.is_finite() && linger > 0.0 {
                std::thread::sleep(Duration::from_secs_f64(linger));
            }
            // Dropping the monitor stops its embedded daemon.
            drop(monitor);
            finished
        });
        finished.map_err(|e| match e {
            MonitorError::Reference(ReferenceError::File { path, reason }) => {
                PyRuntimeError::new_err(format!("writing the profile {path}: {reason}"))
            }
            e => PyRuntimeError::new_err(with_sources(&e)),
        })
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeMonitor>()
}

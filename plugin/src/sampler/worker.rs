//! The worker thread: receives the rounds of snapshots the observer queued and turns each snapshot into a
//! [`SpectrumSample`] (top-k warm started, `‖W‖_F`, the update ratio, the full spectrum every K-th sample, the
//! reference's gain ratio) sent through the sink.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver};
use gainguard_protocol::events::{Event, ParamClass, SpectrumSample};
use gainguard_protocol::sink::Sink;
use tch::Tensor;

use crate::identity::RunIdentity;
use crate::spectra::{all_finite, frobenius_distance, frobenius_norm, full_spectrum, Estimator, EstimatorConfig, FullPrecision, MatrixLayout, SpectraError};

use super::handle::{ema, record_checks, Control, Shared};
use super::thread::thread_cpu_time;

/// What the worker needs to know about one sampled parameter.
#[derive(Clone, Debug)]
pub(super) struct ParamInfo {
    pub(super) name: String,
    pub(super) class: ParamClass,
    pub(super) layer: Option<u32>,
    pub(super) layout: MatrixLayout,
    pub(super) width_multiplier: f64,
}

pub(super) struct Snapshot {
    pub(super) info: Arc<ParamInfo>,
    pub(super) after: Tensor,
    pub(super) before: Option<Tensor>,
    /// Effective lr and wd at the sampled step (width-scaled × schedule multipliers).
    pub(super) lr: f64,
    pub(super) weight_decay: f64,
    /// The optimizer's decay horizon of the parameter after the sampled step (None: not counted there).
    pub(super) decay_horizon: Option<f64>,
    pub(super) full: bool,
}

pub(super) struct Round {
    pub(super) step: u64,
    pub(super) snapshots: Vec<Snapshot>,
    pub(super) bytes: u64,
}

/// The worker thread's state: one warm-started estimator per parameter.
pub(super) struct Worker {
    pub(super) shared: Arc<Shared>,
    pub(super) sink: Sink,
    pub(super) rounds: Receiver<Round>,
    pub(super) control: Receiver<Control>,
    pub(super) estimators: HashMap<String, Estimator>,
    pub(super) estimator_config: EstimatorConfig,
    pub(super) id: RunIdentity,
    pub(super) alpha: f64,
    pub(super) planned_steps: Option<u64>,
    pub(super) shutdown_timeout: Duration,
}

impl Worker {
    pub(super) fn run(mut self) {
        let mut paused = false;
        loop {
            if paused {
                match self.control.recv() {
                    Ok(Control::Resume) => paused = false,
                    Ok(Control::Pause(ack)) => {
                        let _ = ack.send(());
                    }
                    // A parked worker processes nothing: the drain's caller times out.
                    Ok(Control::Drain(_)) => {}
                    Ok(Control::Stop) | Err(_) => break,
                }
                continue;
            }
            select! {
                recv(self.control) -> msg => match msg {
                    Ok(Control::Pause(ack)) => {
                        paused = true;
                        let _ = ack.send(());
                    }
                    Ok(Control::Resume) => {}
                    Ok(Control::Drain(ack)) => {
                        // Every round sent before the drain is in the queue now (one sender, in order).
                        while let Ok(round) = self.rounds.try_recv() {
                            self.process(round);
                        }
                        let _ = ack.send(());
                    }
                    Ok(Control::Stop) | Err(_) => break,
                },
                recv(self.rounds) -> round => match round {
                    Ok(round) => self.process(round),
                    Err(_) => break,
                },
            }
        }
        // Drain what is queued, within the shutdown timeout; what is left is counted as dropped.
        let deadline = Instant::now() + self.shutdown_timeout;
        while let Ok(round) = self.rounds.try_recv() {
            if Instant::now() < deadline {
                self.process(round);
            } else {
                self.shared.in_flight_bytes.fetch_sub(round.bytes, Ordering::AcqRel);
                self.shared.dropped.fetch_add(round.snapshots.len() as u64, Ordering::Relaxed);
            }
        }
    }

    fn process(&mut self, round: Round) {
        let started = Instant::now();
        let cpu_started = thread_cpu_time();
        // What a round costs the trainer: on CPU the worker's own CPU time (a niced worker waiting for a
        // core costs nothing, and its wall time would stretch the interval for that wait); on a GPU its
        // wall time, which covers the device work it queued and waited for.
        let on_cpu = round.snapshots.first().is_some_and(|s| s.after.device() == tch::Device::Cpu);
        let mut checks = Vec::with_capacity(round.snapshots.len());
        let bytes = round.bytes;
        for snap in round.snapshots {
            let sample = self.sample(&snap, round.step);
            checks.push((snap.info.name.clone(), sample.nonfinite));
            {
                let mut listeners = self.shared.listeners.lock().unwrap_or_else(|e| e.into_inner());
                for l in listeners.iter_mut() {
                    l(&sample, round.step);
                }
            }
            let envelope = self.id.envelope(round.step, Event::Spectrum(sample));
            self.sink.send(envelope);
            self.shared.emitted.fetch_add(1, Ordering::Relaxed);
        }
        self.shared.in_flight_bytes.fetch_sub(bytes, Ordering::AcqRel);
        record_checks(&self.shared, round.step, checks.iter().map(|(n, bad)| (n.as_str(), *bad)));
        let cost = match (on_cpu, cpu_started, thread_cpu_time()) {
            (true, Some(a), Some(b)) => b.saturating_sub(a),
            _ => started.elapsed(),
        };
        ema(&self.shared.worker_ns_per_round, cost.as_nanos() as u64);
    }

    fn sample(&mut self, snap: &Snapshot, step: u64) -> SpectrumSample {
        let started = Instant::now();
        let info = &snap.info;
        // The horizon goes on every sample, before the reference is asked: a SelfBaseline windows by it.
        let mut sample = SpectrumSample {
            progress: self.planned_steps.filter(|&p| p > 0).map(|p| step as f64 / p as f64),
            decay_horizon: snap.decay_horizon,
            ..SpectrumSample::empty(info.name.clone(), info.layer, info.class)
        };
        let estimator = self.estimators.entry(info.name.clone()).or_insert_with(|| Estimator::new(self.estimator_config.clone()));
        let matrix = match info.layout.apply(&snap.after) {
            Ok(m) => m,
            Err(_) => {
                sample.duration_seconds = started.elapsed().as_secs_f64();
                return sample;
            }
        };
        if !all_finite(&matrix) {
            estimator.reset();
            sample.nonfinite = true;
            sample.duration_seconds = started.elapsed().as_secs_f64();
            return sample;
        }
        // The estimate's first pass sums ‖W‖_F as well (the matrix holds the snapshot's elements).
        let mut fro = None;
        match estimator.estimate(&matrix) {
            Ok(e) => {
                sample.sigma_max = Some(e.sigma_max);
                sample.top_k = e.top_k;
                sample.iterations = e.iterations;
                fro = Some(e.frobenius_norm);
            }
            Err(SpectraError::NonFinite(_)) => sample.nonfinite = true,
            Err(_) => {}
        }
        let fro = fro.unwrap_or_else(|| frobenius_norm(&snap.after));
        sample.frobenius_norm = Some(fro);
        if let Some(s) = sample.sigma_max {
            if s > 0.0 {
                sample.stable_rank = Some(fro * fro / (s * s));
            }
            // sigma_max / (sqrt(lr/wd) · m^alpha): the paper's steady-state scale removed.
            if snap.weight_decay > 0.0 && snap.lr > 0.0 {
                let scale = (snap.lr / snap.weight_decay).sqrt() * info.width_multiplier.powf(self.alpha);
                sample.sigma_max_normalized = Some(s / scale);
            }
        }
        if let Some(before) = &snap.before {
            let norm_before = frobenius_norm(before);
            if norm_before > 0.0 {
                let delta = frobenius_distance(&snap.after, before);
                sample.update_ratio = Some(delta / norm_before);
            }
        }
        if snap.full && sample.sigma_max.is_some() {
            if let Ok(f) = full_spectrum(&matrix, FullPrecision::Device) {
                sample.effective_rank = Some(f.effective_rank);
                sample.quantiles = Some(f.quantiles);
            }
        }
        if let (Some(r), Some(s)) = (&self.shared.reference, sample.sigma_max) {
            if let Some(rs) = r.reference_sigma_max(&sample).filter(|v| v.is_finite()) {
                sample.reference_sigma_max = Some(rs);
                if rs > 0.0 {
                    sample.gain_ratio = Some(s / rs);
                }
            }
        }
        sample.duration_seconds = started.elapsed().as_secs_f64();
        sample
    }
}


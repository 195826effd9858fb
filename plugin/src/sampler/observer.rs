//! The observer half of the sampler, owned by the optimizer: on a sampling step it picks the parameters,
//! copies them on their device and queues the round for the worker; after a non-finite gradient it checks
//! every parameter at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{bounded, Sender};
use gainguard_protocol::events::{Event, ParamClass, SpectrumSample};
use gainguard_protocol::sink::Sink;
use tch::Tensor;

use crate::identity::RunIdentity;
use crate::optim::{ParamSlot, StepObserver, StepReport};
use crate::plan::{ParamDecision, ScalingPlan};
use crate::reference::GainReference;
use crate::spectra::{all_finite, MatrixLayout};

use super::config::{SamplerConfig, SamplerError};
use super::handle::{ema, record_checks, SamplerHandle, Shared};
use super::thread::configure_worker_thread;
use super::worker::{ParamInfo, Round, Snapshot, Worker};

/// The observer half, owned by the optimizer ([`crate::Monitor::attach`] adds it) or driven by the
/// [`crate::Monitor`] of an optimizer that steps by itself.
pub(crate) struct SpectrumSampler {
    config: SamplerConfig,
    /// For `progress = step / planned_steps`.
    planned_steps: Option<u64>,
    id: RunIdentity,
    /// Parameter name → index into the plan's decisions, for parameters given by name ([`ParamRef`]).
    decision_of: HashMap<String, usize>,
    shared: Arc<Shared>,
    /// For the non-finite samples of the check after a non-finite gradient (everything else goes through
    /// the worker).
    sink: Sink,
    /// Whether the latest check of every parameter found NaN/Inf.
    nonfinite_found: bool,
    tx: Sender<Round>,
    /// Per decision index: the parameter's info when it is eligible for sampling.
    eligible: Vec<Option<Arc<ParamInfo>>>,
    /// Round-robin cursor over eligible slots.
    cursor: usize,
    samples_of: HashMap<usize, u64>,
    next_step: u64,
    /// Chosen in `before_step` for the step in flight: (slot index, pre-step copy).
    pending: Option<(u64, Vec<(usize, Option<Tensor>)>, u64)>,
    last_after_step: Option<Instant>,
}

impl SpectrumSampler {
    /// A sampler for the parameters of `plan` (the optimizer's [`crate::WidthScaledAdamW::plan`]), sending as
    /// `id` through `sink`, every sample compared with `reference` when there is one; `planned_steps` gives
    /// the samples' `progress`. Starts its worker thread.
    pub(crate) fn start(
        config: SamplerConfig,
        planned_steps: Option<u64>,
        id: RunIdentity,
        plan: &ScalingPlan,
        sink: Sink,
        reference: Option<Arc<dyn GainReference>>,
    ) -> Result<SpectrumSampler, SamplerError> {
        if config.interval == 0 {
            return Err(SamplerError::Config("interval = 0, expected at least 1".into()));
        }
        if config.queue_capacity == 0 {
            return Err(SamplerError::Config("queue_capacity = 0, expected at least 1".into()));
        }
        if let Some(f) = config.budget_fraction {
            if !(f.is_finite() && f > 0.0 && f <= 1.0) {
                return Err(SamplerError::Config(format!("budget_fraction = {f}, expected 0 < f <= 1")));
            }
        }
        if !config.alpha.is_finite() {
            return Err(SamplerError::Config(format!("alpha = {}, expected a finite number", config.alpha)));
        }
        let eligible: Vec<Option<Arc<ParamInfo>>> = plan.decisions.iter().map(|d| eligible_info(d, config.include_all_matrices)).collect();
        let (tx, rx) = bounded::<Round>(config.queue_capacity);
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let (done_tx, done_rx) = bounded(1);
        let shared = Arc::new(Shared {
            dropped: Arc::new(AtomicU64::new(0)),
            nonfinite: Arc::new(AtomicU64::new(0)),
            nonfinite_known: AtomicBool::new(false),
            nonfinite_checks: Mutex::new(HashMap::new()),
            emitted: AtomicU64::new(0),
            in_flight_bytes: AtomicU64::new(0),
            worker_ns_per_round: AtomicU64::new(0),
            step_ns: AtomicU64::new(0),
            interval: AtomicU64::new(config.interval),
            listeners: Mutex::new(Vec::new()),
            reference,
            sampled: eligible.iter().flatten().map(|i| i.name.clone()).collect(),
            control: control_tx,
            done: Mutex::new(Some(done_rx)),
            worker: Mutex::new(None),
            finished: AtomicBool::new(false),
        });
        let worker = Worker {
            shared: Arc::clone(&shared),
            sink: sink.clone(),
            rounds: rx,
            control: control_rx,
            estimators: HashMap::new(),
            estimator_config: config.estimator.clone(),
            id: id.clone(),
            alpha: config.alpha,
            planned_steps,
            shutdown_timeout: config.shutdown_timeout,
        };
        let (threads, nice) = (config.worker_threads, config.worker_nice);
        let handle = std::thread::Builder::new()
            .name("gainguard-spectra".into())
            .spawn(move || {
                configure_worker_thread(threads, nice);
                worker.run();
                let _ = done_tx.send(());
            })
            .map_err(SamplerError::Thread)?;
        *shared.worker.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(SpectrumSampler {
            id,
            decision_of: plan.decisions.iter().enumerate().map(|(i, d)| (d.name.clone(), i)).collect(),
            sink,
            nonfinite_found: false,
            next_step: config.interval,
            config,
            planned_steps,
            shared,
            tx,
            eligible,
            cursor: 0,
            samples_of: HashMap::new(),
            pending: None,
            last_after_step: None,
        })
    }

    pub(crate) fn handle(&self) -> SamplerHandle {
        SamplerHandle { shared: Arc::clone(&self.shared) }
    }

    /// The interval after the budget: `max(interval, worker cost / (budget · step time))`, rounded up.
    fn adapt_interval(&self) -> u64 {
        let base = self.config.interval;
        let Some(fraction) = self.config.budget_fraction else { return base };
        let worker = self.shared.worker_ns_per_round.load(Ordering::Relaxed) as f64;
        let step = self.shared.step_ns.load(Ordering::Relaxed) as f64;
        if worker <= 0.0 || step <= 0.0 {
            return base;
        }
        let needed = (worker / (fraction * step)).ceil();
        base.max(needed.min(1e9) as u64)
    }
}

fn eligible_info(d: &ParamDecision, include_all: bool) -> Option<Arc<ParamInfo>> {
    if d.tied_to.is_some() {
        return None;
    }
    if !(include_all || d.class == ParamClass::MatrixLike) {
        return None;
    }
    let layout = MatrixLayout::for_decision(d)?;
    Some(Arc::new(ParamInfo { name: d.name.clone(), class: d.class, layer: d.layer, layout, width_multiplier: d.width_multiplier }))
}

fn tensor_bytes(t: &Tensor) -> u64 {
    t.numel() as u64 * t.kind().elt_size_in_bytes() as u64
}

/// A copy on the tensor's own device (no host transfer), detached from autograd.
fn device_copy(t: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let mut c = t.detach().empty_like();
        c.copy_(t);
        c
    })
}

/// One parameter of an optimizer that is not a [`crate::WidthScaledAdamW`], as its step hooks hand it to
/// [`crate::Monitor::before_step`] / [`crate::Monitor::after_step`]:
/// its name in the plan, the live tensor (the sampler copies it on its device, never keeps it) and, where the
/// optimizer counts it, the parameter's decay horizon `H = Σ lr_t·wd_t` (`None`: not counted, and then the
/// alerts' horizon gate cannot hold GainDrift back during the transient).
#[derive(Clone, Copy)]
pub struct ParamRef<'a> {
    pub name: &'a str,
    pub tensor: &'a Tensor,
    pub decay_horizon: Option<f64>,
}

/// What the sampler reads of the optimizer's parameters: the optimizer's own slots, or [`ParamRef`]s.
trait ParamView {
    fn count(&self) -> usize;
    fn name(&self, i: usize) -> &str;
    fn tensor(&self, i: usize) -> &Tensor;
    /// Index into the plan's decisions; None for a name the plan does not hold.
    fn decision(&self, i: usize, decision_of: &HashMap<String, usize>) -> Option<usize>;
    /// The optimizer's decay horizon of the parameter; None where the optimizer does not count it.
    fn decay_horizon(&self, i: usize) -> Option<f64>;
}

impl ParamView for [ParamSlot] {
    fn count(&self) -> usize {
        self.len()
    }
    fn name(&self, i: usize) -> &str {
        &self[i].name
    }
    fn tensor(&self, i: usize) -> &Tensor {
        &self[i].tensor
    }
    fn decision(&self, i: usize, _: &HashMap<String, usize>) -> Option<usize> {
        Some(self[i].decision)
    }
    fn decay_horizon(&self, i: usize) -> Option<f64> {
        Some(self[i].decay_horizon)
    }
}

impl ParamView for [ParamRef<'_>] {
    fn count(&self) -> usize {
        self.len()
    }
    fn name(&self, i: usize) -> &str {
        self[i].name
    }
    fn tensor(&self, i: usize) -> &Tensor {
        self[i].tensor
    }
    fn decision(&self, i: usize, decision_of: &HashMap<String, usize>) -> Option<usize> {
        decision_of.get(self[i].name).copied()
    }
    fn decay_horizon(&self, i: usize) -> Option<f64> {
        self[i].decay_horizon
    }
}

impl StepObserver for SpectrumSampler {
    fn before_step(&mut self, step: u64, slots: &[ParamSlot]) {
        self.observe_before(step, slots);
    }

    fn after_step(&mut self, report: &StepReport, slots: &[ParamSlot], plan: &ScalingPlan) {
        self.observe_after(report, slots, plan);
    }
}

impl SpectrumSampler {
    /// [`StepObserver::before_step`] for an optimizer that is not a [`crate::WidthScaledAdamW`]: call it
    /// before the parameters change, with the step about to be taken (1-based) and every parameter of the
    /// plan the sampler was built for (names not in the plan are ignored). Copies on the device at most,
    /// on sampling steps only.
    pub(crate) fn before_step_of(&mut self, step: u64, params: &[ParamRef<'_>]) {
        self.observe_before(step, params);
    }

    /// [`StepObserver::after_step`] for such an optimizer: after the update, with the same parameters and
    /// the step's report (at least `step`, `lr_multiplier` and `wd_multiplier`; `nonfinite_grad` and
    /// `grad_norm` when known, for the check of every parameter).
    pub(crate) fn after_step_of(&mut self, report: &StepReport, params: &[ParamRef<'_>], plan: &ScalingPlan) {
        self.observe_after(report, params, plan);
    }

    fn observe_before<P: ParamView + ?Sized>(&mut self, step: u64, slots: &P) {
        self.pending = None;
        if step < self.next_step {
            return;
        }
        self.next_step = step + self.adapt_interval();
        self.shared.interval.store(self.next_step - step, Ordering::Relaxed);
        // Round-robin: the next `max_params_per_sample` eligible slots after the cursor.
        let candidates: Vec<usize> = (0..slots.count())
            .filter(|&i| slots.decision(i, &self.decision_of).is_some_and(|d| self.eligible.get(d).is_some_and(|e| e.is_some())))
            .collect();
        if candidates.is_empty() {
            return;
        }
        let take = self.config.max_params_per_sample.max(1).min(candidates.len());
        let start = self.cursor % candidates.len();
        let chosen: Vec<usize> = (0..take).map(|i| candidates[(start + i) % candidates.len()]).collect();
        self.cursor = (start + take) % candidates.len();
        let copies = if self.config.update_ratio { 2 } else { 1 };
        let bytes: u64 = chosen.iter().map(|&i| copies * tensor_bytes(slots.tensor(i))).sum();
        // Decide before copying anything: a round that cannot be queued costs the trainer nothing.
        let over_budget = self.shared.in_flight_bytes.load(Ordering::Acquire) + bytes > self.config.max_in_flight_bytes;
        if self.tx.is_full() || over_budget {
            self.shared.dropped.fetch_add(chosen.len() as u64, Ordering::Relaxed);
            return;
        }
        self.shared.in_flight_bytes.fetch_add(bytes, Ordering::AcqRel);
        let before = chosen
            .into_iter()
            .map(|i| (i, self.config.update_ratio.then(|| device_copy(slots.tensor(i)))))
            .collect();
        self.pending = Some((step, before, bytes));
    }

    fn observe_after<P: ParamView + ?Sized>(&mut self, report: &StepReport, slots: &P, plan: &ScalingPlan) {
        let now = Instant::now();
        if let Some(last) = self.last_after_step.replace(now) {
            ema(&self.shared.step_ns, now.duration_since(last).as_nanos() as u64);
        }
        // After a check that found NaN/Inf, the first step with finite gradients checks again, so that weights
        // repaired (e.g. by loading a checkpoint) are not counted forever.
        let recovered = self.nonfinite_found && report.grad_norm.is_some_and(f64::is_finite);
        if report.nonfinite_grad.is_some() || recovered {
            self.check_every_parameter(report.step, slots);
        }
        let Some((step, chosen, bytes)) = self.pending.take() else { return };
        if step != report.step {
            self.shared.in_flight_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return;
        }
        let every = self.config.full_spectrum_every;
        let snapshots: Vec<Snapshot> = chosen
            .into_iter()
            .filter_map(|(si, before)| {
                if si >= slots.count() {
                    return None;
                }
                let decision = slots.decision(si, &self.decision_of)?;
                let info = self.eligible.get(decision)?.clone()?;
                let d = plan.decisions.get(decision)?;
                let count = self.samples_of.entry(decision).or_insert(0);
                let full = every > 0 && *count % every == 0;
                *count += 1;
                Some(Snapshot {
                    info,
                    after: device_copy(slots.tensor(si)),
                    before,
                    lr: d.lr * report.lr_multiplier,
                    weight_decay: d.weight_decay * report.wd_multiplier,
                    decay_horizon: slots.decay_horizon(si),
                    full,
                })
            })
            .collect();
        let n = snapshots.len() as u64;
        if let Err(e) = self.tx.try_send(Round { step, snapshots, bytes }) {
            // Only this thread sends and the queue was checked in before_step, so this is a worker
            // that has stopped; count it all the same.
            self.shared.in_flight_bytes.fetch_sub(e.into_inner().bytes, Ordering::AcqRel);
            self.shared.dropped.fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl SpectrumSampler {
    /// Checks every parameter's weights for NaN/Inf now, records the result for
    /// [`SamplerHandle::nonfinite_parameters`], and sends a non-finite sample for each sampled matrix that
    /// holds them (the daemon then drops its stale spectrum series).
    fn check_every_parameter<P: ParamView + ?Sized>(&mut self, step: u64, slots: &P) {
        let results: Vec<(usize, bool)> = (0..slots.count()).map(|i| (i, !tch::no_grad(|| all_finite(slots.tensor(i))))).collect();
        self.nonfinite_found = results.iter().any(|&(_, bad)| bad);
        record_checks(&self.shared, step, results.iter().map(|&(i, bad)| (slots.name(i), bad)));
        let progress = self.planned_steps.filter(|&p| p > 0).map(|p| step as f64 / p as f64);
        for (i, _) in results.into_iter().filter(|&(_, bad)| bad) {
            let Some(info) = slots.decision(i, &self.decision_of).and_then(|d| self.eligible.get(d).cloned().flatten()) else { continue };
            let sample = SpectrumSample {
                nonfinite: true,
                progress,
                decay_horizon: slots.decay_horizon(i),
                ..SpectrumSample::empty(info.name.clone(), info.layer, info.class)
            };
            self.sink.send(self.id.envelope(step, Event::Spectrum(sample)));
            self.shared.emitted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for SpectrumSampler {
    fn drop(&mut self) {
        let timeout = self.config.shutdown_timeout;
        self.handle().finish(timeout);
    }
}

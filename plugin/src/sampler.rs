//! The spectra sampler: an optimizer observer that snapshots weights on their device and a worker
//! thread that computes spectra and emits events (issue 3).
//!
//! ```text
//! trainer thread (StepObserver)                 worker thread
//! before_step: pick params, copy W on device    recv a round ─► per param: finite? top-k (warm start),
//! after_step:  copy W again, try_send a round   ‖ΔW‖/‖W‖, full spectrum every K-th sample ─► Sink
//!              full queue / byte budget: drop, count
//! ```
//!
//! The training thread never waits: the only work on it is one device copy per sampled parameter
//! (two where the update ratio is wanted) and an O(1) `try_send`. The one exception is a step whose gradients
//! held NaN or Inf ([`StepReport::nonfinite_grad`]), the usual first sign of non-finite weights: then the
//! sampler checks every parameter's weights at once, on the training thread, so that
//! [`SamplerHandle::nonfinite_parameters`] (and `gainguard_nonfinite_parameters` through telemetry) says so in
//! that very step, and each non-finite sampled matrix is sent as a non-finite sample, rather than waiting for
//! the next scheduled round (thousands of steps away once the budget has stretched the interval). A round that does not fit in the
//! queue or the in-flight byte budget is dropped *before* anything is copied, and every parameter
//! sample in it is counted in [`SamplerHandle::dropped_total`].
//!
//! [`crate::Monitor`] wires it, telemetry and a reference into a trainer in one call. By hand:
//!
//! ```no_run
//! # use gainguard::{RunIdentity, WidthScaledAdamW, monitor::{SamplerConfig, SpectrumSampler}};
//! # fn demo(opt: &mut WidthScaledAdamW, sink: gainguard::protocol::Sink) -> Result<(), Box<dyn std::error::Error>> {
//! let config = SamplerConfig { planned_steps: Some(10_000), ..Default::default() };
//! let sampler = SpectrumSampler::for_run(config, RunIdentity::local("target-w512"), opt.plan(), sink)?;
//! let handle = sampler.handle(); // dropped_total(), nonfinite_parameters(), finish()
//! opt.add_observer(Box::new(sampler));
//! // … train …
//! handle.finish(std::time::Duration::from_secs(5));
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, Receiver, Sender};
use gainguard_protocol::events::{Event, ParamClass, SpectrumSample};
use gainguard_protocol::sink::Sink;
use tch::Tensor;

use crate::optim::{ParamSlot, StepObserver, StepReport};
use crate::plan::{ParamDecision, ScalingPlan};
use crate::reference::GainReference;
use crate::telemetry::RunIdentity;
use crate::spectra::{all_finite, frobenius_distance, frobenius_norm, full_spectrum, Estimator, EstimatorConfig, FullPrecision, MatrixLayout, SpectraError};

/// Settings of the sampler.
#[derive(Clone, Debug)]
pub struct SamplerConfig {
    /// Identity carried by every event, for [`SpectrumSampler::new`] only: [`SpectrumSampler::for_run`] and
    /// [`crate::Monitor`] take it from their [`RunIdentity`] and ignore these three.
    pub run: String,
    pub rank: u32,
    pub host: String,
    /// Sample every this many steps (at least; the budget may stretch it). Steps `interval`,
    /// `2·interval`, … are sampled.
    pub interval: u64,
    /// Keep the worker's cost at or below this fraction of the measured step time by stretching the
    /// interval. The cost of a round is the worker thread's CPU time for CPU tensors, its wall time for
    /// device tensors. None: fixed interval.
    pub budget_fraction: Option<f64>,
    /// Parameters per sampling step; a model with more matrices is covered round-robin.
    pub max_params_per_sample: usize,
    /// Sample every parameter of rank ≥ 2, not only the matrix-like ones.
    pub include_all_matrices: bool,
    /// Every K-th sample of a parameter (the first included) also computes the full spectrum. 0: never.
    pub full_spectrum_every: u64,
    /// Sampling rounds that may wait for the worker.
    pub queue_capacity: usize,
    /// Device bytes the queued and in-process snapshots may hold.
    pub max_in_flight_bytes: u64,
    /// Copy the pre-step weights too, for `update_ratio = ‖W_t − W_{t−1}‖_F / ‖W_{t−1}‖_F`.
    pub update_ratio: bool,
    pub estimator: EstimatorConfig,
    /// Exponent of `sigma_max_normalized = sigma_max / (sqrt(lr/wd) · m^alpha)`.
    pub alpha: f64,
    /// Planned optimizer steps, for `progress = step / planned_steps`.
    pub planned_steps: Option<u64>,
    /// How long `finish` (and Drop) lets the worker drain the queue before giving up on it.
    pub shutdown_timeout: Duration,
    /// libtorch intra-op (OpenMP and MKL) threads of the worker thread alone; the trainer's own setting is
    /// untouched. 0 leaves libtorch's default (every core), which on a CPU-bound trainer makes the worker's
    /// thread team fight the trainer's for the same cores.
    pub worker_threads: usize,
    /// Linux nice value of the worker thread (0–19; 0 leaves it as is). At 19 the scheduler gives the worker
    /// about 1.5% of a core that the trainer also wants, and the whole core when the trainer leaves it idle
    /// (GPU training): the trainer never waits for monitoring, and a worker that falls behind drops and
    /// counts samples.
    pub worker_nice: i32,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            run: "run".into(),
            rank: 0,
            host: crate::telemetry::hostname(),
            interval: 10,
            budget_fraction: Some(0.01),
            max_params_per_sample: 16,
            include_all_matrices: false,
            full_spectrum_every: 10,
            queue_capacity: 2,
            max_in_flight_bytes: 1 << 30,
            update_ratio: true,
            estimator: EstimatorConfig::default(),
            alpha: 0.75,
            planned_steps: None,
            shutdown_timeout: Duration::from_secs(5),
            worker_threads: 1,
            worker_nice: 19,
        }
    }
}


#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    #[error("sampler setting {0}")]
    Config(String),
    #[error("cannot start the spectra worker thread: {0}")]
    Thread(std::io::Error),
}

/// A listener sees every sample the worker emits, with its step (e.g. a reference-profile recorder).
pub type SampleListener = Box<dyn FnMut(&SpectrumSample, u64) + Send>;

/// What the worker needs to know about one sampled parameter.
#[derive(Clone, Debug)]
struct ParamInfo {
    name: String,
    class: ParamClass,
    layer: Option<u32>,
    layout: MatrixLayout,
    width_multiplier: f64,
}

struct Snapshot {
    info: Arc<ParamInfo>,
    after: Tensor,
    before: Option<Tensor>,
    /// Effective lr and wd at the sampled step (width-scaled × schedule multipliers).
    lr: f64,
    weight_decay: f64,
    /// The optimizer's decay horizon of the parameter after the sampled step (None: not counted there).
    decay_horizon: Option<f64>,
    full: bool,
}

struct Round {
    step: u64,
    snapshots: Vec<Snapshot>,
    bytes: u64,
}

enum Control {
    Pause(Sender<()>),
    Resume,
    Stop,
}

/// State shared by the sampler, its worker and every [`SamplerHandle`].
struct Shared {
    dropped: Arc<AtomicU64>,
    /// Parameters whose latest check found NaN/Inf: the count of `nonfinite_checks` entries that say so.
    nonfinite: Arc<AtomicU64>,
    nonfinite_known: AtomicBool,
    /// Per parameter name: the step of its latest check and whether it found NaN/Inf. A round the worker
    /// finishes late does not overwrite a newer check.
    nonfinite_checks: Mutex<HashMap<String, (u64, bool)>>,
    emitted: AtomicU64,
    in_flight_bytes: AtomicU64,
    /// Exponential averages, in nanoseconds: worker time per round, trainer time per step.
    worker_ns_per_round: AtomicU64,
    step_ns: AtomicU64,
    interval: AtomicU64,
    listeners: Mutex<Vec<SampleListener>>,
    reference: Mutex<Option<Arc<dyn GainReference>>>,
    control: Sender<Control>,
    done: Mutex<Option<Receiver<()>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    finished: AtomicBool,
}

/// A cheap, cloneable view of a sampler that the trainer keeps after handing the sampler to the
/// optimizer: counters for telemetry, the reference, listeners, pause/resume, and shutdown.
#[derive(Clone)]
pub struct SamplerHandle {
    shared: Arc<Shared>,
}

impl SamplerHandle {
    /// Parameter samples dropped because the queue was full or the byte budget exhausted.
    pub fn dropped_total(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// The drop counter itself, for a telemetry thread to read (`spectrum_samples_dropped_total`).
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.shared.dropped)
    }

    /// Parameters whose latest check found NaN/Inf weights (a sampled round, or the check of every parameter
    /// after a step with a non-finite gradient); None before the first check.
    pub fn nonfinite_parameters(&self) -> Option<u64> {
        self.shared.nonfinite_known.load(Ordering::Acquire).then(|| self.shared.nonfinite.load(Ordering::Relaxed))
    }

    /// The non-finite gauge itself (valid once [`nonfinite_parameters`](Self::nonfinite_parameters) is Some).
    pub fn nonfinite_gauge(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.shared.nonfinite)
    }

    /// Samples emitted so far.
    pub fn emitted_total(&self) -> u64 {
        self.shared.emitted.load(Ordering::Relaxed)
    }

    /// The sampling interval in force (the configured one, stretched by the budget).
    pub fn current_interval(&self) -> u64 {
        self.shared.interval.load(Ordering::Relaxed)
    }

    /// Compares every later sample with this reference (`reference_sigma_max`, `gain_ratio`).
    pub fn set_reference(&self, reference: Option<Arc<dyn GainReference>>) {
        *self.shared.reference.lock().unwrap_or_else(|e| e.into_inner()) = reference;
    }

    /// Calls `listener` on the worker thread with every sample emitted from now on.
    pub fn add_listener(&self, listener: SampleListener) {
        self.shared.listeners.lock().unwrap_or_else(|e| e.into_inner()).push(listener);
    }

    /// Parks the worker (a test hook for a stalled worker). Returns true once it is parked, so that
    /// every round sent afterwards stays in the queue; false if it did not park within `timeout`
    /// (it was busy with a round, or has finished).
    pub fn pause(&self, timeout: Duration) -> bool {
        let (tx, rx) = bounded(1);
        if self.shared.control.send(Control::Pause(tx)).is_err() {
            return false;
        }
        rx.recv_timeout(timeout).is_ok()
    }

    pub fn resume(&self) {
        let _ = self.shared.control.send(Control::Resume);
    }

    /// Stops the worker after it has drained the queue, waiting at most `timeout`; a worker still busy
    /// then is left to finish on its own (its rounds are counted as dropped). Returns true when it
    /// stopped in time. Idempotent.
    pub fn finish(&self, timeout: Duration) -> bool {
        if self.shared.finished.swap(true, Ordering::SeqCst) {
            return self.shared.worker.lock().unwrap_or_else(|e| e.into_inner()).is_none();
        }
        let _ = self.shared.control.send(Control::Stop);
        let done = self.shared.done.lock().unwrap_or_else(|e| e.into_inner()).take();
        let stopped = done.is_some_and(|rx| rx.recv_timeout(timeout).is_ok());
        if stopped {
            if let Some(h) = self.shared.worker.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = h.join();
            }
        }
        stopped
    }
}

/// The observer half, owned by the optimizer. See the module docs for how to wire it.
pub struct SpectrumSampler {
    config: SamplerConfig,
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
    /// A sampler for the parameters of `plan` (the optimizer's [`crate::WidthScaledAdamW::plan`]),
    /// emitting through `sink`. Starts its worker thread.
    pub fn new(config: SamplerConfig, plan: &ScalingPlan, sink: Sink) -> Result<SpectrumSampler, SamplerError> {
        let id = RunIdentity { run: config.run.clone(), rank: config.rank, host: config.host.clone() };
        SpectrumSampler::for_run(config, id, plan, sink)
    }

    /// As [`new`](Self::new), with the identity every event carries given once as a [`RunIdentity`]
    /// (`config.run`, `rank` and `host` are ignored).
    pub fn for_run(config: SamplerConfig, id: RunIdentity, plan: &ScalingPlan, sink: Sink) -> Result<SpectrumSampler, SamplerError> {
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
        let eligible = plan.decisions.iter().map(|d| eligible_info(d, config.include_all_matrices)).collect();
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
            reference: Mutex::new(None),
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
            planned_steps: config.planned_steps,
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
            shared,
            tx,
            eligible,
            cursor: 0,
            samples_of: HashMap::new(),
            pending: None,
            last_after_step: None,
        })
    }

    pub fn handle(&self) -> SamplerHandle {
        SamplerHandle { shared: Arc::clone(&self.shared) }
    }

    /// See [`SamplerHandle::add_listener`].
    pub fn add_listener(&mut self, listener: SampleListener) {
        self.handle().add_listener(listener);
    }

    /// See [`SamplerHandle::set_reference`].
    pub fn with_reference(self, reference: Arc<dyn GainReference>) -> Self {
        self.handle().set_reference(Some(reference));
        self
    }

    pub fn dropped_total(&self) -> u64 {
        self.handle().dropped_total()
    }

    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.handle().dropped_counter()
    }

    pub fn pause(&self, timeout: Duration) -> bool {
        self.handle().pause(timeout)
    }

    pub fn resume(&self) {
        self.handle().resume()
    }

    /// Names of the parameters the sampler covers, in round-robin order.
    pub fn sampled_params(&self) -> Vec<String> {
        self.eligible.iter().flatten().map(|i| i.name.clone()).collect()
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

/// CPU time the calling thread has used (Linux `CLOCK_THREAD_CPUTIME_ID`); None elsewhere.
fn thread_cpu_time() -> Option<Duration> {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: writes into the timespec we own.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            return Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
        }
    }
    None
}

/// Applies [`SamplerConfig::worker_threads`] and [`SamplerConfig::worker_nice`] to the calling thread.
/// Either can fail (no shim, a nice the process may not set); the worker then runs as it is, after one
/// log line.
fn configure_worker_thread(threads: usize, nice: i32) {
    if threads > 0 && !crate::shim::limit_this_thread(threads) {
        eprintln!("gainguard: cannot limit the spectra worker to {threads} libtorch thread(s) in this build; it uses libtorch's default");
    }
    #[cfg(target_os = "linux")]
    if nice != 0 {
        // SAFETY: setpriority on this thread's own id; no memory is shared.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
        if rc != 0 {
            eprintln!("gainguard: cannot set the spectra worker's nice to {nice}: {}", std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// One parameter of an optimizer that is not a [`crate::WidthScaledAdamW`], as its step hooks hand it to
/// [`SpectrumSampler::before_step_of`] / [`SpectrumSampler::after_step_of`] (and [`crate::Monitor`]'s):
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
    pub fn before_step_of(&mut self, step: u64, params: &[ParamRef<'_>]) {
        self.observe_before(step, params);
    }

    /// [`StepObserver::after_step`] for such an optimizer: after the update, with the same parameters and
    /// the step's report (at least `step`, `lr_multiplier` and `wd_multiplier`; `nonfinite_grad` and
    /// `grad_norm` when known, for the check of every parameter).
    pub fn after_step_of(&mut self, report: &StepReport, params: &[ParamRef<'_>], plan: &ScalingPlan) {
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
        let progress = self.config.planned_steps.filter(|&p| p > 0).map(|p| step as f64 / p as f64);
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

/// Records the checks of one step (parameter name, whether it holds NaN/Inf), unless a later step's check of
/// that parameter is already recorded, and updates the count.
fn record_checks<'a>(shared: &Shared, step: u64, checks: impl Iterator<Item = (&'a str, bool)>) {
    let mut map = shared.nonfinite_checks.lock().unwrap_or_else(|e| e.into_inner());
    for (name, bad) in checks {
        match map.get_mut(name) {
            Some(entry) if entry.0 > step => {}
            Some(entry) => *entry = (step, bad),
            None => {
                map.insert(name.to_string(), (step, bad));
            }
        }
    }
    shared.nonfinite.store(map.values().filter(|(_, bad)| *bad).count() as u64, Ordering::Relaxed);
    shared.nonfinite_known.store(true, Ordering::Release);
}

impl Drop for SpectrumSampler {
    fn drop(&mut self) {
        let timeout = self.config.shutdown_timeout;
        self.handle().finish(timeout);
    }
}

/// Exponential moving average with weight 1/4 on the new value (the first value is taken as is).
fn ema(cell: &AtomicU64, value: u64) {
    let old = cell.load(Ordering::Relaxed);
    let new = if old == 0 { value } else { (old * 3 + value) / 4 };
    cell.store(new, Ordering::Relaxed);
}

struct Worker {
    shared: Arc<Shared>,
    sink: Sink,
    rounds: Receiver<Round>,
    control: Receiver<Control>,
    estimators: HashMap<String, Estimator>,
    estimator_config: EstimatorConfig,
    id: RunIdentity,
    alpha: f64,
    planned_steps: Option<u64>,
    shutdown_timeout: Duration,
}

impl Worker {
    fn run(mut self) {
        let mut paused = false;
        loop {
            if paused {
                match self.control.recv() {
                    Ok(Control::Resume) => paused = false,
                    Ok(Control::Pause(ack)) => {
                        let _ = ack.send(());
                    }
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
        let reference = self.shared.reference.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let (Some(r), Some(s)) = (reference, sample.sigma_max) {
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

//! The state the sampler, its worker and every [`SamplerHandle`] share, and the handle itself: the counters
//! telemetry reads, listeners, pause/resume and shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use gainguard_protocol::events::SpectrumSample;

use crate::reference::GainReference;

/// A listener sees every sample the worker emits, with its step (e.g. a reference-profile recorder).
pub type SampleListener = Box<dyn FnMut(&SpectrumSample, u64) + Send>;

/// What a handle asks of the worker.
pub(super) enum Control {
    Pause(Sender<()>),
    Resume,
    /// Process every round queued so far, then answer (the worker keeps running).
    Drain(Sender<()>),
    Stop,
}


/// State shared by the sampler, its worker and every [`SamplerHandle`].
pub(super) struct Shared {
    pub(super) dropped: Arc<AtomicU64>,
    /// Parameters whose latest check found NaN/Inf: the count of `nonfinite_checks` entries that say so.
    pub(super) nonfinite: Arc<AtomicU64>,
    pub(super) nonfinite_known: AtomicBool,
    /// Per parameter name: the step of its latest check and whether it found NaN/Inf. A round the worker
    /// finishes late does not overwrite a newer check.
    pub(super) nonfinite_checks: Mutex<HashMap<String, (u64, bool)>>,
    pub(super) emitted: AtomicU64,
    pub(super) in_flight_bytes: AtomicU64,
    /// Exponential averages, in nanoseconds: worker time per round, trainer time per step.
    pub(super) worker_ns_per_round: AtomicU64,
    pub(super) step_ns: AtomicU64,
    pub(super) interval: AtomicU64,
    pub(super) listeners: Mutex<Vec<SampleListener>>,
    /// What every sample is compared with (`reference_sigma_max`, `gain_ratio`), given at the start.
    pub(super) reference: Option<Arc<dyn GainReference>>,
    /// The names of the parameters sampled, in round-robin order.
    pub(super) sampled: Vec<String>,
    pub(super) control: Sender<Control>,
    pub(super) done: Mutex<Option<Receiver<()>>>,
    pub(super) worker: Mutex<Option<JoinHandle<()>>>,
    pub(super) finished: AtomicBool,
}


/// A cheap, cloneable view of a sampler that the trainer keeps after handing the sampler to the
/// optimizer: counters for telemetry, listeners, pause/resume, and shutdown. [`crate::Monitor::sampler`] gives it.
#[derive(Clone)]
pub struct SamplerHandle {
    pub(super) shared: Arc<Shared>,
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

    /// Names of the parameters the sampler covers, in round-robin order.
    pub fn sampled_params(&self) -> &[String] {
        &self.shared.sampled
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

    /// Waits at most `timeout` until the worker has processed every round queued before this call, and
    /// leaves it running. Returns true when it has (false on timeout, or once the sampler is finished or
    /// paused). The trainer's thread never calls this on its own: it is for a caller that wants the last
    /// sampled step on `/metrics` before it scrapes, checkpoints or ends.
    pub fn drain(&self, timeout: Duration) -> bool {
        let (tx, rx) = bounded(1);
        if self.shared.finished.load(Ordering::SeqCst) || self.shared.control.send(Control::Drain(tx)).is_err() {
            return false;
        }
        rx.recv_timeout(timeout).is_ok()
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

/// Records the checks of one step (parameter name, whether it holds NaN/Inf), unless a later step's check of
/// that parameter is already recorded, and updates the count.
pub(super) fn record_checks<'a>(shared: &Shared, step: u64, checks: impl Iterator<Item = (&'a str, bool)>) {
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

/// Exponential moving average with weight 1/4 on the new value (the first value is taken as is).
pub(super) fn ema(cell: &AtomicU64, value: u64) {
    let old = cell.load(Ordering::Relaxed);
    let new = if old == 0 { value } else { (old * 3 + value) / 4 };
    cell.store(new, Ordering::Relaxed);
}

//! The spectra sampler: an optimizer observer that snapshots weights on their device and a worker
//! thread that computes spectra and emits events.
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
//! held NaN or Inf ([`crate::StepReport::nonfinite_grad`]), the usual first sign of non-finite weights: then the
//! sampler checks every parameter's weights at once, on the training thread, so that
//! [`SamplerHandle::nonfinite_parameters`] (and `gainguard_nonfinite_parameters` through telemetry) says so in
//! that very step, and each non-finite sampled matrix is sent as a non-finite sample, rather than waiting for
//! the next scheduled round (thousands of steps away once the budget has stretched the interval). A round that does not fit in the
//! queue or the in-flight byte budget is dropped *before* anything is copied, and every parameter
//! sample in it is counted in [`SamplerHandle::dropped_total`].
//!
//! [`crate::Monitor`] starts it, with telemetry and a reference, and is the one way in: its settings are a
//! [`SamplerConfig`] given to [`crate::MonitorBuilder::sampler`], and [`crate::Monitor::sampler`] gives the
//! [`SamplerHandle`] (counters, listeners, pause/resume).
//!
//! The parts: `config` (the settings), `observer` (the half on the training thread), `worker` (the thread
//! that computes the spectra), `handle` (the state both share, and the handle), `thread` (the worker
//! thread's libtorch threads, nice value and CPU clock).

mod config;
mod handle;
mod observer;
mod thread;
mod worker;

pub use config::{SamplerConfig, SamplerError};
pub use handle::{SampleListener, SamplerHandle};
pub use observer::ParamRef;
pub(crate) use observer::SpectrumSampler;

//! # gainguard
//!
//! Width-scaled AdamW for tch trainers (arXiv 2510.15262): matrix-like parameters get `lr ∝ 1/m` and
//! `weight decay ∝ m^gamma` (gamma = 0.5 by default), vector-like parameters get the base lr and no decay,
//! so that `(lr, wd)` tuned on a small proxy transfer to a wide target. Other presets reproduce microsoft/mup's
//! `MuAdamW`, Megatron-LM's muP and plain AdamW. See the README for the rule table.
//!
//! ```no_run
//! use gainguard::{AdamWConfig, BaseShapes, WidthScaledAdamW};
//! # fn demo(vs: &tch::nn::VarStore, loss: tch::Tensor) -> anyhow::Result<()> {
//! let base = BaseShapes::from_json_file("proxy_shapes.json".as_ref())?;
//! let mut opt = WidthScaledAdamW::new(vs, &base, AdamWConfig { lr: 3e-3, weight_decay: 0.1, ..Default::default() })?;
//! println!("{}", opt.plan().to_table());
//! opt.zero_grad();
//! loss.backward();
//! opt.step();
//! # Ok(()) }
//! ```
//!
//! Monitoring (telemetry, spectra, a reference profile) attaches in one call: [`Monitor`].

pub mod classify;
pub mod coord_check;
pub mod data;
pub mod device;
pub mod fit;
pub mod fused;
pub mod identity;
pub mod monitor;
pub mod mup;
pub mod optim;
pub mod plan;
pub mod reference;
pub mod rule;
pub mod sampler;
pub mod schedule;
mod shim;
pub mod spectra;
pub mod steady_state;
mod telemetry;

pub use classify::{BaseShapes, Override, ParamClass, ParamRole};
pub use optim::{AdamWConfig, CpuKernel, DecayMode, NonFiniteGrad, OptimError, StepObserver, StepReport, WidthScaledAdamW};
pub use plan::{ParamDecision, ScalingPlan};
pub use rule::{Preset, Rule};
pub use schedule::Schedule;
pub use identity::RunIdentity;
pub use monitor::{Monitor, MonitorBuilder, MonitorError};
pub use sampler::{ParamRef, SamplerConfig, SamplerHandle};

/// The events, their wire format and the sinks a trainer sends through (`protocol::Sink`), with or without
/// the embedded daemon.
pub use gainguard_protocol as protocol;

/// The exporter, to run it inside the trainer (`daemon::Daemon::spawn`, `daemon::DaemonConfig`); it also
/// re-exports the protocol's `events` and `Sink` at the paths trainers used before the protocol had its own
/// crate. Behind the default-on `embedded-daemon` feature, which brings tokio, hyper and NVML.
#[cfg(feature = "embedded-daemon")]
pub use gainguard_daemon as daemon;

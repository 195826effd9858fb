//! The example LLaMA-style model, the training loop that puts gainguard into it, and the plots of the
//! reports: one library that the examples (`examples/`), the demo (`src/main.rs`), the benchmarks and the
//! tests all use.
//!
//! - [`model`]: the model in one file (tch-rs min-gpt style).
//! - [`train`]: where gainguard enters a training loop: build the optimizer from the base shapes, call
//!   `step`, and optionally monitor (spectra sampler, telemetry, reference profile).
//! - [`plot`]: PNG figures for the experiment reports and the demo.
//! - [`compare`]: how far apart two models' weights are, for the optimizer parity checks.

pub mod compare;
pub mod model;
pub mod plot;
pub mod train;

//! Singular-value estimates of weight matrices in host memory, with no libtorch: the fused passes over
//! the matrix (`pass`), the small float64 algebra (`dense`) and the block Krylov estimator ([`Krylov`]).
//!
//! The plugin (`gainguard::spectra`) wraps this for tensors on any device and is what a trainer uses;
//! `gainguard inspect` uses it directly on a memory-mapped checkpoint, so that its process never loads
//! libtorch (whose start-up alone, 0.2 s of operator registration, was a third of an inspect of a 51M
//! parameter checkpoint).

mod dense;
mod krylov;
mod pass;

pub use krylov::{Estimate, EstimatorConfig, Krylov, Local, Operand, Outcome, Reduction, WarmKey};
pub use pass::{distance_squares, kernels, set_parallel_runner, sum_squares, Elem, HostMatrix, Mode, ParallelRunner, PassRequest};

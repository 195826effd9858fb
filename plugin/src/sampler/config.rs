//! The sampler's settings ([`SamplerConfig`], given to [`crate::MonitorBuilder::sampler`]) and why it could
//! not start ([`SamplerError`]).

use std::time::Duration;

use crate::spectra::EstimatorConfig;

/// Settings of the sampler.
#[derive(Clone, Debug)]
pub struct SamplerConfig {
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

//! Reference profiles: the proxy's sigma_max per hidden matrix over training progress, and the gain
//! ratio of a target run against it (issue 5). This file holds the interface the spectra worker uses.

use gainguard_daemon::events::SpectrumSample;

/// Gives the reference sigma_max a sample is compared with. Implementations: a proxy run's profile
/// (interpolated at the same progress), or the run's own early steady state.
pub trait GainReference: Send + Sync {
    /// The reference sigma_max for `sample.param` at `sample.progress`, if there is one.
    fn reference_sigma_max(&self, sample: &SpectrumSample) -> Option<f64>;
}

//! Fits of width exponents: alpha in `sigma_max ∝ sqrt(lr/wd) · d^alpha`, and the gamma that makes
//! sigma_max flat along the μP path, with the measurements file `gainguard calibrate` reads and whether
//! those measurements are a steady state.
//!
//! Both fits are ordinary least squares on logarithms. Measurements come in *groups* (one per hidden
//! matrix, say `blocks.0.mlp.up.weight`): every group has its own constant `c` and all groups share
//! one slope, so the slope is fitted on values centred within each group ("fixed effects").
//!
//! Two ways to get gamma, and why the second is the one to trust:
//! - [`fit_alpha`]: `ln(sigma / sqrt(lr/wd)) = ln c + alpha · ln d`, then `gamma = 2·alpha − 1`
//!   (arXiv 2510.15262). An independent check on this project found alpha fitted at one fixed
//!   `(lr, wd)` moves with `lr·wd` (0.70 to 0.93), so this gamma depends on where it was measured.
//! - [`calibrate_gamma`]: run the μP path (`lr ∝ 1/m`, `wd ∝ m^gamma`) at two or more gammas and three
//!   or more widths each, fit the slope of `ln sigma_max` against `ln d` per gamma, and find the gamma
//!   where that slope crosses zero. This measures the property the rule is for (a flat sigma_max)
//!   directly. If the `sqrt(lr/wd)·d^alpha` law held exactly, the slope would be
//!   `alpha − (1 + gamma)/2`: a line in gamma with slope −1/2, zero at `gamma = 2·alpha − 1`.
//!
//! - [`slope`]: the fits.
//! - [`measurement`]: the measurements file, its parsing and the checks that it can be fitted.
//! - [`bootstrap`]: percentile-bootstrap intervals on gamma* (seeds or residuals resampled, the fit redone).
//! - [`reliability`]: whether the entries were read at steady state (decay horizon, drift, init checks).

pub mod bootstrap;
pub mod measurement;
pub mod reliability;
pub mod slope;

pub use bootstrap::{bootstrap_gamma, has_replicate_seeds, percentile_interval, seed_resamples, BootstrapMethod, GammaBootstrap, DEFAULT_RESAMPLES};
pub use measurement::{check_measurements, parse_measurements, Measurement, MeasurementsError, SteadyStateChecks, MEASUREMENTS_EXAMPLE};
pub use reliability::{
    failed_checks, horizon_reliability, reliability, FailedCheck, Reliability, MAX_DRIFT, MAX_INIT_DIFFERENCE,
    MIN_RELIABLE_HORIZON,
};
pub use slope::{
    calibrate_gamma, fit_alpha, gamma_from_slopes, line_zero, pooled_slope, slopes_at_gammas, spread, zero_crossing, AlphaFit, FitError, GammaCalibration, MupPoint, SlopeAtGamma, SlopeFit,
    WidthPoint,
};

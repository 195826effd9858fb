//! Fits of width exponents: alpha in `sigma_max ∝ sqrt(lr/wd) · d^alpha`, and the gamma that makes
//! sigma_max flat along the μP path (issue 6).

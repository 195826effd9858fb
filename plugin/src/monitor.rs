//! The spectra sampler: an optimizer observer that snapshots weights on their device and a worker
//! thread that computes spectra and emits events (issue 3).

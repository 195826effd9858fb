//! gainguard

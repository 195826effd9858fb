//! `gainguard-daemon`: receives gainguard events and exports them as Prometheus metrics.
//!
//! This crate links no libtorch (DESIGN.md §2). The plugin depends on [`events`]; never the reverse.

pub mod events;

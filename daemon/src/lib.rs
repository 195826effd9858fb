//! `gainguard-daemon`: receives gainguard events and exports them as Prometheus metrics.
//!
//! This crate links no libtorch (docs/design.md §2.1). The events, their wire format and the trainer's sink
//! are the `gainguard-protocol` crate, which the plugin uses without this one; they are re-exported here at
//! the paths they had when they lived in this crate.
//!
//! - Embedded mode: [`Daemon::spawn`] runs the exporter on its own threads inside the trainer; the trainer
//!   sends through [`Daemon::sink`].
//! - Standalone mode: the `gainguardd` binary ingests JSON lines ([`protocol`]) from several trainers over a
//!   Unix socket or loopback TCP; trainers send through [`Sink::connect`].

pub use gainguard_protocol::{addr, events, sink, wire as protocol};

mod admission;
pub mod auth;
pub mod config;
mod duration;
mod daemon;
pub mod error;
pub mod history;
pub mod exposition;
mod http;
mod ingest;
mod listeners;
mod page;
pub mod logging;
mod queue;
mod runs;
mod scrape;
pub mod selfmetrics;
pub mod sources;
pub mod web;

pub use addr::{default_ingest_addr, IngestAddr};
pub use config::{DaemonConfig, IngestAuth, Limits};
pub use sources::nvml::{NvmlMode, NvmlSettings};
pub use sources::SourceSettings;
pub use daemon::Daemon;
pub use history::HistorySettings;
pub use error::DaemonError;
pub use sink::{Sink, SinkError, SinkOptions};

//! `gainguard-daemon`: receives gainguard events and exports them as Prometheus metrics.
//!
//! This crate links no libtorch (docs/design.md §2.1). The plugin depends on [`events`]; never the reverse.
//!
//! - Embedded mode: [`Daemon::spawn`] runs the exporter on its own threads inside the trainer; the trainer
//!   sends through [`Daemon::sink`].
//! - Standalone mode: the `gainguardd` binary ingests JSON lines ([`protocol`]) from several trainers over a
//!   Unix socket or loopback TCP; trainers send through [`Sink::connect`].

pub mod addr;
mod admission;
pub mod auth;
pub mod config;
mod daemon;
pub mod error;
pub mod events;
pub mod exposition;
mod http;
mod ingest;
mod listeners;
pub mod logging;
pub mod protocol;
mod queue;
mod runs;
mod scrape;
pub mod selfmetrics;
pub mod sink;
pub mod sources;

pub use addr::{default_ingest_addr, IngestAddr};
pub use config::{DaemonConfig, IngestAuth, Limits, NvmlMode};
pub use daemon::Daemon;
pub use error::DaemonError;
pub use sink::{Sink, SinkError, SinkOptions};

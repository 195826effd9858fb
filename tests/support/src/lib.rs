//! Helpers shared by the workspace's end-to-end tests (dev-only): child processes that die with the test,
//! free loopback ports, polling, a minimal HTTP/1.1 client, and real Prometheus and Alertmanager servers
//! on loopback (Debian packages `prometheus` and `prometheus-alertmanager`, installed by `make test`).
//!
//! Every address these helpers contact is a loopback address; [`http::get`] refuses any other.

pub mod alertmanager;
pub mod http;
pub mod process;
pub mod prometheus;
pub mod promql;

use std::path::{Path, PathBuf};

pub use alertmanager::{Alertmanager, Webhook};
pub use http::http_get;
pub use process::{free_port, installed, required, wait_until, ChildGuard};
pub use prometheus::{prometheus_binary, spawn_prometheus, Prometheus, PrometheusConfig};

/// The workspace root: this crate lives in `tests/support/`.
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().and_then(Path::parent).expect("tests/support has two parents").to_path_buf()
}

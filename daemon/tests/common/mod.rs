//! The daemon's test harness: the workspace's shared process, HTTP and Prometheus helpers
//! (`gainguard-test-support`), plus what only the daemon's tests need (starting `gainguardd`, reading its
//! exposition).
// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code, unused_imports)]

pub use gainguard_test_support::{free_port, http_get, prometheus_binary, spawn_prometheus, wait_until, ChildGuard, Prometheus};

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

pub fn metrics(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    body
}

/// The value of one sample in a text exposition body whose labels include all of `labels`.
pub fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, l)) => (m, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        if labels.iter().all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\""))) {
            return value.parse().ok();
        }
    }
    None
}

/// Starts `gainguardd` with the given extra arguments; returns the guard and its metrics address.
pub fn gainguardd(args: &[&str]) -> (ChildGuard, SocketAddr) {
    let port = free_port();
    gainguardd_at(format!("127.0.0.1:{port}").parse().unwrap(), args)
}

/// Starts `gainguardd` serving metrics on `addr`.
pub fn gainguardd_at(addr: SocketAddr, args: &[&str]) -> (ChildGuard, SocketAddr) {
    let child = Command::new(env!("CARGO_BIN_EXE_gainguardd"))
        .arg(format!("--listen={addr}"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting gainguardd");
    let guard = ChildGuard(child);
    wait_until(Duration::from_secs(10), "gainguardd /healthz", || {
        http_get(addr, "/healthz").ok().filter(|(s, _)| *s == 200)
    });
    (guard, addr)
}

pub fn socket_in(dir: &Path) -> String {
    format!("unix:{}", dir.join("gainguardd.sock").display())
}

//! The daemon's test harness: the workspace's shared process, HTTP and Prometheus helpers
//! (`gainguard-test-support`), plus what only the daemon's tests need (starting `gainguardd`, reading its
//! exposition).
// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code, unused_imports)]

pub use gainguard_test_support::{free_port, http_get, prometheus_binary, spawn_prometheus, wait_until, ChildGuard, Prometheus};
pub mod procfs;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
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

/// Runs `gainguardd` with `args` until it exits (within 20 s); returns its exit code and stderr.
pub fn run_to_exit(args: &[&str]) -> (i32, String) {
    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_gainguardd"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let status = child.wait_exit(Duration::from_secs(20)).expect("gainguardd exits");
    let mut stderr = String::new();
    child.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status.code().unwrap_or(-1), stderr)
}

pub fn socket_in(dir: &Path) -> String {
    format!("unix:{}", dir.join("gainguardd.sock").display())
}

/// The token every test daemon with TCP ingest uses.
pub const TOKEN: &str = "test-token-0123456789";

/// Writes [`TOKEN`] to a 0600 file in `dir`.
pub fn token_file(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("ingest.token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Reads the daemon's one-line greeting.
pub fn greeting(s: &mut impl Read) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).map(|n| n == 1).unwrap_or(false) && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// A TCP ingest connection that sent the token and was greeted `ok`.
pub fn tcp_ingest(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    writeln!(s, "{{\"auth\":\"{TOKEN}\"}}").unwrap();
    assert_eq!(greeting(&mut s), r#"{"status":"ok"}"#);
    s
}

//! Test harness: a real Prometheus server, child-process guards, and a minimal HTTP client (loopback only).
#![allow(dead_code)]

pub mod process;
pub mod procfs;
pub use process::{free_port, spawn_prometheus, wait_until, ChildGuard};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// GET over HTTP/1.0; returns (status, body).
pub fn http_get(addr: SocketAddr, path_and_query: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, body.to_string()))
}

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


pub fn prometheus_binary() -> PathBuf {
    let p = PathBuf::from(std::env::var("PROMETHEUS").unwrap_or_else(|_| "/usr/bin/prometheus".into()));
    assert!(
        p.exists(),
        "{} not found: the daemon's integration tests need a real Prometheus server; `make test` installs it \
         (Debian package `prometheus`), or point $PROMETHEUS at one",
        p.display()
    );
    p
}

/// A real Prometheus server on a free loopback port, scraping `targets` every 250 ms.
pub struct Prometheus {
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
    _child: ChildGuard,
}

impl Prometheus {
    pub fn start(targets: &[SocketAddr]) -> Prometheus {
        let bin = prometheus_binary();
        let dir = tempfile::tempdir().unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 250ms\n  scrape_timeout: 200ms\nscrape_configs:\n  - job_name: gainguard\n    \
             static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let (child, addr) = spawn_prometheus(&bin, &config_path, &dir.path().join("data"));
        let prom = Prometheus { addr, _dir: dir, _child: child };
        wait_until(Duration::from_secs(30), "prometheus to become ready", || {
            http_get(addr, "/-/ready").ok().filter(|(s, _)| *s == 200)
        });
        prom
    }

    /// Runs an instant query; returns each result's labels and value.
    pub fn query(&self, promql: &str) -> Vec<(serde_json::Value, f64)> {
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={}", encode(promql))).unwrap();
        assert_eq!(status, 200, "{promql}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["metric"].clone(), r["value"][1].as_str().unwrap().parse::<f64>().unwrap()))
            .collect()
    }

    /// Waits until the query returns exactly one series and returns its value.
    pub fn scalar(&self, promql: &str) -> f64 {
        wait_until(Duration::from_secs(15), promql, || {
            let r = self.query(promql);
            (r.len() == 1).then(|| r[0].1)
        })
    }

    /// Waits until the query's single value equals `want` (bit-exact, NaN equal to NaN).
    pub fn expect(&self, promql: &str, want: f64) {
        let mut last = None;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let r = self.query(promql);
            if r.len() == 1 && (r[0].1 == want || (r[0].1.is_nan() && want.is_nan())) {
                return;
            }
            last = Some(r);
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{promql}: expected {want}, last result {last:?}");
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
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

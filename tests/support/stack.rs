//! A real monitoring stack on loopback for end-to-end tests: Prometheus (with gainguard's rules) and
//! Alertmanager (Debian packages, installed by `make test`), plus a tiny webhook receiver that records
//! every alert Alertmanager delivers. Every child is killed when its guard drops.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// ChildGuard, free_port and wait_until: the same helpers the daemon's own tests use.
#[path = "../../daemon/tests/common/process.rs"]
mod process;
pub use process::{free_port, spawn_prometheus, wait_until, ChildGuard};

pub fn binary(env: &str, default: &str, package: &str) -> PathBuf {
    let p = PathBuf::from(std::env::var(env).unwrap_or_else(|_| default.into()));
    assert!(p.exists(), "{} not found: `make test` installs it (Debian package `{package}`), or set ${env}", p.display());
    p
}


pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gainguard-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Records the JSON bodies Alertmanager posts.
pub struct Webhook {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Webhook {
    pub fn start() -> Webhook {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Some(body) = read_post(stream) {
                    if let Ok(v) = serde_json::from_slice(&body) {
                        sink.lock().unwrap().push(v);
                    }
                }
            }
        });
        Webhook { addr, received }
    }

    /// Every alert delivered so far, as (labels, status).
    pub fn alerts(&self) -> Vec<(serde_json::Value, String)> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .flat_map(|n| n["alerts"].as_array().cloned().unwrap_or_default())
            .map(|a| (a["labels"].clone(), a["status"].as_str().unwrap_or("").to_string()))
            .collect()
    }
}

fn read_post(stream: TcpStream) -> Option<Vec<u8>> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    let mut s = stream;
    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    Some(body)
}

pub struct Alertmanager {
    pub addr: SocketAddr,
    _child: ChildGuard,
}

impl Alertmanager {
    /// Routes every alert to `webhook` at once (test timings: 1 s group wait and interval).
    pub fn start(dir: &Path, webhook: SocketAddr) -> Alertmanager {
        let bin = binary("ALERTMANAGER", "/usr/bin/prometheus-alertmanager", "prometheus-alertmanager");
        let config = format!(
            "route:\n  receiver: hook\n  group_by: ['alertname', 'run', 'param']\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n\
             receivers:\n  - name: hook\n    webhook_configs:\n      - url: 'http://{webhook}/alert'\n        send_resolved: true\n"
        );
        let cfg = dir.join("alertmanager.yml");
        std::fs::write(&cfg, config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.path={}", dir.join("am-data").display()))
            .arg(format!("--web.listen-address={addr}"))
            // No cluster gossip: it would listen on every interface.
            .arg("--cluster.listen-address=")
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus-alertmanager");
        let am = Alertmanager { addr, _child: ChildGuard(child) };
        wait_until(Duration::from_secs(30), "alertmanager to become ready", || {
            crate::promql::http_get(&format!("http://{addr}"), "/-/ready").ok()
        });
        am
    }
}

pub struct Prometheus {
    pub addr: SocketAddr,
    _child: ChildGuard,
}

impl Prometheus {
    /// Scrapes `targets` every second with gainguard's rules (after `edit_rules`), sending alerts to
    /// `alertmanager` when given.
    pub fn start(dir: &Path, targets: &[SocketAddr], alertmanager: Option<SocketAddr>, edit_rules: impl Fn(String) -> String) -> Prometheus {
        let bin = binary("PROMETHEUS", "/usr/bin/prometheus", "prometheus");
        let rules_src = crate::promql::workspace_root().join("dashboards/prometheus/gainguard.rules.yml");
        let rules = edit_rules(std::fs::read_to_string(&rules_src).unwrap());
        let rules_path = dir.join("rules.yml");
        std::fs::write(&rules_path, rules).unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             rule_files:\n  - '{}'\n\
             scrape_configs:\n  - job_name: gainguard\n    static_configs:\n      - targets: [{}]\n",
            rules_path.display(),
            targets.join(", ")
        );
        if let Some(am) = alertmanager {
            config.push_str(&format!("alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{am}']\n"));
        }
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, config).unwrap();
        let (child, addr) = spawn_prometheus(&bin, &cfg, &dir.join("prom-data"));
        let p = Prometheus { addr, _child: child };
        wait_until(Duration::from_secs(30), "prometheus to become ready", || {
            crate::promql::http_get(&p.url(), "/-/ready").ok()
        });
        p
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Instant query: each result's labels and value.
    pub fn query(&self, promql: &str) -> Vec<(serde_json::Value, f64)> {
        let body = crate::promql::http_get(&self.url(), &format!("/api/v1/query?query={}", crate::promql::percent_encode(promql))).unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{promql}: {body}");
        v["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|r| (r["metric"].clone(), r["value"][1].as_str().unwrap_or("NaN").parse().unwrap_or(f64::NAN)))
            .collect()
    }
}

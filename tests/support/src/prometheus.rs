//! A real Prometheus server on a free loopback port, with its configuration and TSDB in a temporary
//! folder removed when it stops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::http::{http_get, percent_encode};
use crate::process::{free_port, required, wait_until, ChildGuard};

/// `$PROMETHEUS`, else Debian's `/usr/bin/prometheus`, else `prometheus` on `PATH`; fails the test when
/// there is none.
pub fn prometheus_binary() -> PathBuf {
    required("PROMETHEUS", "/usr/bin/prometheus", "prometheus")
}

/// Starts Prometheus (`bin`) on a free loopback port with the given config file and TSDB folder, quiet;
/// the caller waits for readiness.
pub fn spawn_prometheus(bin: &Path, config: &Path, data: &Path) -> (ChildGuard, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting prometheus");
    (ChildGuard(child), addr)
}

/// What one test's Prometheus scrapes and evaluates.
#[derive(Clone, Debug)]
pub struct PrometheusConfig {
    /// Scraped as job `gainguard`; none: no scrape configuration.
    pub targets: Vec<SocketAddr>,
    /// Also the rule evaluation interval.
    pub scrape_interval: Duration,
    pub scrape_timeout: Duration,
    /// The text of a rule file to load.
    pub rules: Option<String>,
    /// Where firing alerts are sent.
    pub alertmanager: Option<SocketAddr>,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        PrometheusConfig {
            targets: Vec::new(),
            scrape_interval: Duration::from_secs(1),
            scrape_timeout: Duration::from_millis(900),
            rules: None,
            alertmanager: None,
        }
    }
}

impl PrometheusConfig {
    /// The `prometheus.yml` for this configuration, with the rule file at `rules_path`.
    fn yaml(&self, rules_path: &Path) -> String {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut yaml = format!(
            "global:\n  scrape_interval: {}\n  scrape_timeout: {}\n  evaluation_interval: {}\n",
            ms(self.scrape_interval),
            ms(self.scrape_timeout),
            ms(self.scrape_interval)
        );
        if self.rules.is_some() {
            yaml.push_str(&format!("rule_files:\n  - '{}'\n", rules_path.display()));
        }
        if !self.targets.is_empty() {
            let targets: Vec<String> = self.targets.iter().map(|t| format!("'{t}'")).collect();
            yaml.push_str(&format!(
                "scrape_configs:\n  - job_name: gainguard\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ));
        }
        if let Some(am) = self.alertmanager {
            yaml.push_str(&format!("alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{am}']\n"));
        }
        yaml
    }
}

/// A running Prometheus; killed, and its folder removed, when dropped.
pub struct Prometheus {
    pub addr: SocketAddr,
    // Field order: the child dies before its folder is removed.
    _child: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `targets` every 250 ms, no rules.
    pub fn start(targets: &[SocketAddr]) -> Prometheus {
        Prometheus::with_config(PrometheusConfig {
            targets: targets.to_vec(),
            scrape_interval: Duration::from_millis(250),
            scrape_timeout: Duration::from_millis(200),
            ..Default::default()
        })
    }

    /// Starts the binary [`prometheus_binary`] names and waits until it is ready.
    pub fn with_config(config: PrometheusConfig) -> Prometheus {
        Prometheus::with_binary(&prometheus_binary(), config)
    }

    pub fn with_binary(bin: &Path, config: PrometheusConfig) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules_path = dir.path().join("rules.yml");
        if let Some(rules) = &config.rules {
            std::fs::write(&rules_path, rules).unwrap();
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config.yaml(&rules_path)).unwrap();
        let (child, addr) = spawn_prometheus(bin, &config_path, &dir.path().join("data"));
        let prom = Prometheus { addr, _child: child, _dir: dir };
        wait_until(Duration::from_secs(30), "prometheus to become ready", || {
            http_get(addr, "/-/ready").ok().filter(|(s, _)| *s == 200)
        });
        prom
    }

    /// The body of a GET answered with 200.
    pub fn get(&self, path_and_query: &str) -> String {
        let (status, body) = http_get(self.addr, path_and_query).unwrap();
        assert_eq!(status, 200, "GET {path_and_query}: {body}");
        body
    }

    /// Runs an instant query; returns each result's labels and value.
    pub fn query(&self, promql: &str) -> Vec<(serde_json::Value, f64)> {
        let body = self.get(&format!("/api/v1/query?query={}", percent_encode(promql)));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{promql}: {body}");
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

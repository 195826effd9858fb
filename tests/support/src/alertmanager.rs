//! A real Alertmanager on loopback, and a tiny webhook receiver that records every alert it delivers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::http::http_get;
use crate::process::{free_port, required, wait_until, ChildGuard};

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

/// A running Alertmanager; killed, and its folder removed, when dropped.
pub struct Alertmanager {
    pub addr: SocketAddr,
    // Field order: the child dies before its folder is removed.
    _child: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    /// Routes every alert to `webhook` at once (test timings: 1 s group wait and interval).
    pub fn start(webhook: SocketAddr) -> Alertmanager {
        let bin = required("ALERTMANAGER", "/usr/bin/prometheus-alertmanager", "prometheus-alertmanager");
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "route:\n  receiver: hook\n  group_by: ['alertname', 'run', 'param']\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n\
             receivers:\n  - name: hook\n    webhook_configs:\n      - url: 'http://{webhook}/alert'\n        send_resolved: true\n"
        );
        let cfg = dir.path().join("alertmanager.yml");
        std::fs::write(&cfg, config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            // No cluster gossip: it would listen on every interface.
            .arg("--cluster.listen-address=")
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus-alertmanager");
        let am = Alertmanager { addr, _child: ChildGuard(child), _dir: dir };
        wait_until(Duration::from_secs(30), "alertmanager to become ready", || {
            http_get(addr, "/-/ready").ok().filter(|(s, _)| *s == 200)
        });
        am
    }
}

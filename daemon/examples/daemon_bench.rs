//! Benchmark (not a test): `/metrics` latency and RSS of `gainguardd` at ~20k series against a Python
//! `prometheus_client` exporter serving the same series, and ingest throughput with 8 concurrent senders.
//!
//! Run: cargo build --release -p gainguard-daemon --bins --examples &&
//!      target/release/examples/daemon_bench [--python .venv/bin/python] [--scrapes 40]
//! Loopback only; every request count is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gainguard_daemon::events::*;
use gainguard_daemon::{Sink, SinkOptions};

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn get(addr: SocketAddr, path: &str) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    raw.get(..12).filter(|h| h.ends_with(b"200"))?;
    Some(raw[split + 4..].to_vec())
}

fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(addr, "/metrics").is_none() {
        assert!(Instant::now() < deadline, "{addr} never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn value(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum()
}

/// p50 and p99 of `n` sequential scrapes, after 3 warm-up scrapes.
fn scrape_latency(addr: SocketAddr, n: usize) -> (Duration, Duration, usize) {
    let mut bytes = 0;
    for _ in 0..3 {
        bytes = get(addr, "/metrics").unwrap().len();
    }
    let mut t: Vec<Duration> = (0..n)
        .map(|_| {
            let s = Instant::now();
            get(addr, "/metrics").unwrap();
            s.elapsed()
        })
        .collect();
    t.sort();
    let pick = |q: f64| t[((t.len() as f64 - 1.0) * q).round() as usize];
    (pick(0.5), pick(0.99), bytes)
}

fn bin(name: &str) -> PathBuf {
    let dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    let p = dir.join(name);
    assert!(p.exists(), "{} missing: build with `cargo build --release -p gainguard-daemon --bins --examples`", p.display());
    p
}

fn spectrum(param: String, layer: u32, v: f64) -> Event {
    Event::Spectrum(SpectrumSample {
        param,
        layer: Some(layer),
        class: ParamClass::MatrixLike,
        sigma_max: Some(v),
        top_k: vec![v],
        iterations: 2,
        sigma_max_normalized: Some(v / 10.0),
        reference_sigma_max: Some(v),
        gain_ratio: Some(1.0),
        stable_rank: Some(12.5),
        frobenius_norm: Some(v * 3.0),
        effective_rank: Some(100.0),
        quantiles: Some(SpectrumQuantiles { p10: 0.1, p50: 0.5, p90: 0.9, p99: v }),
        update_ratio: Some(1e-3),
        nonfinite: false,
        duration_seconds: 0.01,
        progress: None,
        decay_horizon: Some(6.0),
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str, d: &str| args.iter().position(|a| a == k).map(|i| args[i + 1].clone()).unwrap_or(d.into());
    let python = arg("--python", ".venv/bin/python");
    let scrapes: usize = arg("--scrapes", "40").parse().unwrap();
    let dir = std::env::temp_dir().join(format!("gainguard-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = format!("unix:{}", dir.join("d.sock").display());

    // 1. gainguardd with ~20k series: 8 ranks x 147 fully sampled parameters.
    let metrics = free_addr();
    let daemon = Guard(
        Command::new(bin("gainguardd"))
            .args(["--listen", &metrics.to_string(), "--ingest", &sock, "--nvml", "off"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_ready(metrics);
    let (ranks, params) = (8u32, 147usize);
    for rank in 0..ranks {
        let sink = Sink::connect(&sock, SinkOptions { capacity: 100_000, ..Default::default() }).unwrap();
        let e = |step, ev| Envelope::new("bench", rank, "node", step, ev);
        sink.send(e(0, Event::Hello(Hello { pid: 1, planned_steps: Some(1000), rule: "paper".into(), gamma: Some(0.5), alpha: Some(0.75), reference: None })));
        let table = (0..params)
            .map(|j| ParamInfo {
                name: format!("blocks.{j}.attn.q.weight"),
                layer: Some(j as u32),
                class: ParamClass::MatrixLike,
                shape: vec![1024, 1024],
                width_multiplier: 4.0,
                lr: 1e-3,
                weight_decay: 0.1,
            })
            .collect();
        sink.send(e(0, Event::Params(ParamsTable { params: table })));
        for j in 0..params {
            sink.send(e(1, spectrum(format!("blocks.{j}.attn.q.weight"), j as u32, 1.0 + j as f64)));
        }
        sink.send(e(1, Event::Step(StepEvent { loss: Some(2.0), tokens: 1, duration_seconds: Some(0.1), timestamp_seconds: 1.0, ..Default::default() })));
        assert_eq!(sink.dropped_total(), 0);
    }
    let body = loop {
        let body = String::from_utf8(get(metrics, "/metrics").unwrap()).unwrap();
        if value(&body, "gainguard_spectrum_samples_total") as usize == ranks as usize * params {
            break body;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let series = body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count();
    let (d50, d99, dbytes) = scrape_latency(metrics, scrapes);
    let drss = rss_kib(daemon.0.id());

    // 2. The same series from prometheus_client.
    let body_path = dir.join("body.txt");
    std::fs::write(&body_path, &body).unwrap();
    let py_addr = free_addr();
    let mut py = Guard(
        Command::new(&python)
            .args([concat!(env!("CARGO_MANIFEST_DIR"), "/benches/python_exporter.py")])
            .arg(&body_path)
            .arg(py_addr.port().to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python with prometheus_client"),
    );
    let mut ready = String::new();
    BufReader::new(py.0.stdout.take().unwrap()).read_line(&mut ready).unwrap();
    wait_ready(py_addr);
    let (p50, p99, pbytes) = scrape_latency(py_addr, scrapes);
    let prss = rss_kib(py.0.id());
    drop(py);

    println!("series in the body: {series} (python: {})", ready.trim());
    println!("| exporter | /metrics p50 | /metrics p99 | body bytes | RSS |");
    println!("|---|---|---|---|---|");
    println!("| gainguardd | {:.2} ms | {:.2} ms | {dbytes} | {:.1} MiB |", d50.as_secs_f64() * 1e3, d99.as_secs_f64() * 1e3, drss as f64 / 1024.0);
    println!("| prometheus_client | {:.2} ms | {:.2} ms | {pbytes} | {:.1} MiB |", p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3, prss as f64 / 1024.0);
    println!(
        "ratios (python / gainguardd): p50 {:.1}x, p99 {:.1}x, RSS {:.1}x",
        p50.as_secs_f64() / d50.as_secs_f64(),
        p99.as_secs_f64() / d99.as_secs_f64(),
        prss as f64 / drss as f64
    );

    // 3. Ingest throughput: 8 gainguard-send processes at once over the Unix socket.
    let before = value(&String::from_utf8(get(metrics, "/metrics").unwrap()).unwrap(), "gainguard_ingest_events_total");
    let (senders, steps, sparams) = (8, 25_000u64, 3usize);
    let start = Instant::now();
    let children: Vec<Guard> = (0..senders)
        .map(|r| {
            Guard(
                Command::new(bin("gainguard-send"))
                    .args(["--addr", &sock, "--run", "ingest", "--rank", &r.to_string()])
                    .args(["--steps", &steps.to_string(), "--params", &sparams.to_string(), "--capacity", "200000"])
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let mut dropped = 0u64;
    let mut sent = 0u64;
    for mut c in children {
        let mut out = String::new();
        c.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        sent += v["sent"].as_u64().unwrap();
        dropped += v["dropped"].as_u64().unwrap();
    }
    let expected = (sent - dropped) as f64;
    loop {
        let now = value(&String::from_utf8(get(metrics, "/metrics").unwrap()).unwrap(), "gainguard_ingest_events_total");
        if now - before >= expected {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "ingest stalled at {}", now - before);
        // Scrapes of 20k series cost CPU that the senders and the daemon share; poll gently.
        std::thread::sleep(Duration::from_millis(250));
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "ingest: {senders} senders, {sent} events ({dropped} dropped by senders) in {secs:.2} s = {:.0} events/s end to end",
        expected / secs
    );
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

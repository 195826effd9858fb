//! Soak benchmark (not a test): a release `gainguardd` fed by 8 senders × 1,000 parameters for a long time,
//! scraped every 5 s like Prometheus would, its live page's JSON read as often (the overview with the alert
//! judgement, and one rank's run); its RSS is sampled every 10 s and must stay flat (within 10%) after the
//! warm-up. Loopback only.
//!
//! The live page's history is filled within the warm-up: one point per 0.5 s and 60 s of retention (120 points
//! per series, 1,024 bytes each; a parameter is sampled every 0.5 s), under a 12 MiB cap that holds 12,288 of
//! the 16,040 series (8 x (1,000 x gain ratio and sigma_max + 5 run series); the others are refused and
//! counted), so that after the warm-up every kept ring is full and the cap binds.
//!
//! Run: cargo build --release -p gainguard-daemon --bins --examples &&
//!      target/release/examples/daemon_soak [--minutes 10] [--warmup-seconds 90]
//!      [--history-interval 0.5 --history-retention 60 --history-max-bytes 12582912]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gainguard_protocol::events::*;
use gainguard_protocol::{Sink, SinkOptions};

mod support;
use support::{bin, die_with_parent, get, status_mib, Guard};





/// One trainer: a Hello, the Params table of 1,000 matrices, then steps at `hz`, each with spectrum samples
/// of 100 parameters in turn (every parameter is sampled every 10 steps).
fn sender(sock: String, rank: u32, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>, dropped: Arc<AtomicU64>) {
    let sink = Sink::connect(&sock, SinkOptions { capacity: 65_536, ..Default::default() }).unwrap();
    let e = |step, ev| Envelope::new("soak", rank, "node", step, ev);
    let name = |j: usize| format!("blocks.{}.{}.weight", j / 8, ["q", "k", "v", "o", "up", "gate", "down", "x"][j % 8]);
    let h = Hello { pid: 1, planned_steps: None, rule: "paper".into(), gamma: Some(0.5), alpha: Some(0.75), reference: None };
    sink.send(e(0, Event::Hello(h)));
    let params = (0..1000)
        .map(|j| ParamInfo {
            name: name(j),
            layer: Some((j / 8) as u32),
            class: ParamClass::MatrixLike,
            shape: vec![1024, 1024],
            width_multiplier: 4.0,
            lr: 1e-3,
            weight_decay: 0.1,
        })
        .collect();
    sink.send(e(0, Event::Params(ParamsTable { params })));
    let period = Duration::from_millis(50);
    let mut next = Instant::now();
    let mut step = 0u64;
    while !stop.load(Ordering::Relaxed) {
        step += 1;
        for k in 0..100 {
            let j = ((step as usize % 10) * 100 + k) % 1000;
            let v = 1.0 + (step % 97) as f64 / 97.0 + j as f64 * 1e-3;
            let s = SpectrumSample {
                sigma_max: Some(v),
                frobenius_norm: Some(v * 20.0),
                stable_rank: Some(400.0),
                gain_ratio: Some(1.0),
                update_ratio: Some(1e-3),
                iterations: 2,
                duration_seconds: 0.002,
                ..SpectrumSample::empty(name(j), Some((j / 8) as u32), ParamClass::MatrixLike)
            };
            sink.send(e(step, Event::Spectrum(s)));
        }
        let st = StepEvent {
            loss: Some(2.0 + 1.0 / step as f64),
            tokens: 65_536,
            duration_seconds: Some(0.05),
            timestamp_seconds: unix_now(),
            events_dropped_total: sink.dropped_total(),
            ..Default::default()
        };
        sink.send(e(step, Event::Step(st)));
        sent.fetch_add(101, Ordering::Relaxed);
        next += period;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    sink.flush(Duration::from_secs(10));
    dropped.fetch_add(sink.dropped_total(), Ordering::Relaxed);
}

/// The value of an unlabelled series in a /metrics body (0 when absent).
fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str, d: &str| args.iter().position(|a| a == k).map(|i| args[i + 1].clone()).unwrap_or(d.into());
    let minutes: f64 = arg("--minutes", "10").parse().unwrap();
    let warmup = Duration::from_secs_f64(arg("--warmup-seconds", "90").parse().unwrap());
    let history = [
        ("--history-interval", arg("--history-interval", "0.5")),
        ("--history-retention", arg("--history-retention", "60")),
        ("--history-max-bytes", arg("--history-max-bytes", "12582912")),
    ];
    let dir = std::env::temp_dir().join(format!("gainguard-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = format!("unix:{}", dir.join("d.sock").display());
    let metrics: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let daemon = Guard(
        die_with_parent(&mut Command::new(bin("gainguardd")))
            .args(["--listen", &metrics.to_string(), "--ingest", &sock, "--nvml", "off"])
            .args(history.iter().flat_map(|(k, v)| [k.to_string(), v.clone()]))
            .stderr(Stdio::null())
            .spawn()
            .expect("target/release/gainguardd: build with --bins"),
    );
    while get(metrics, "/healthz").is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, dropped) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let senders: Vec<_> = (0..8)
        .map(|rank| {
            let (sock, stop, sent, dropped) = (sock.clone(), stop.clone(), sent.clone(), dropped.clone());
            std::thread::spawn(move || sender(sock, rank, stop, sent, dropped))
        })
        .collect();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(minutes * 60.0);
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let mut next_rss = start;
    let (mut json_bytes, mut json_ms) = (0usize, 0.0f64);
    println!("| t (s) | RSS (MiB) | /metrics bytes | history bytes | history series (refused) | /api JSON bytes, ms |");
    println!("|---|---|---|---|---|---|");
    while Instant::now() < end {
        let body = get(metrics, "/metrics").unwrap_or_default();
        let t0 = Instant::now();
        json_bytes = ["/api/v1/overview", "/api/v1/run?run=soak&rank=3&host=node"]
            .iter()
            .map(|p| get(metrics, p).map_or(0, |b| b.len()))
            .sum();
        json_ms = t0.elapsed().as_secs_f64() * 1e3;
        if Instant::now() >= next_rss {
            let t = start.elapsed().as_secs_f64();
            let rss = status_mib(daemon.0.id(), "VmRSS:");
            samples.push((t, rss));
            let text = String::from_utf8_lossy(&body);
            let value = |name: &str| metric(&text, name);
            println!(
                "| {t:.0} | {rss:.1} | {} | {:.0} of {:.0} | {:.0} ({:.0}) | {json_bytes}, {json_ms:.0} |",
                body.len(),
                value("gainguard_daemon_history_bytes"),
                value("gainguard_daemon_history_max_bytes"),
                value("gainguard_daemon_history_series"),
                value("gainguard_daemon_history_series_refused_total"),
            );
            next_rss += Duration::from_secs(10);
        }
        std::thread::sleep(Duration::from_secs(5));
    }
    stop.store(true, Ordering::Relaxed);
    senders.into_iter().for_each(|s| s.join().unwrap());
    let after: Vec<f64> = samples.iter().filter(|(t, _)| *t >= warmup.as_secs_f64()).map(|(_, r)| *r).collect();
    let (lo, hi) = after.iter().fold((f64::MAX, 0.0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    let body = String::from_utf8(get(metrics, "/metrics").unwrap()).unwrap();
    let accepted: f64 = body
        .lines()
        .filter(|l| l.starts_with("gainguard_ingest_events_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum();
    println!(
        "soak: {minutes} min, 8 senders x 1,000 params, {} events sent, {} dropped by senders, {accepted} accepted; \
         history {} bytes of {} ({} series, {} refused; {:?}); last /api JSON {json_bytes} bytes in {json_ms:.0} ms; \
         RSS after {:.0} s warm-up: min {lo:.1} MiB, max {hi:.1} MiB, max/min {:.3} ({})",
        sent.load(Ordering::Relaxed),
        dropped.load(Ordering::Relaxed),
        metric(&body, "gainguard_daemon_history_bytes"),
        metric(&body, "gainguard_daemon_history_max_bytes"),
        metric(&body, "gainguard_daemon_history_series"),
        metric(&body, "gainguard_daemon_history_series_refused_total"),
        history,
        warmup.as_secs_f64(),
        hi / lo,
        if hi / lo <= 1.10 { "flat within 10%" } else { "NOT flat within 10%" }
    );
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

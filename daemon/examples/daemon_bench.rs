//! Benchmark (not a test) of `gainguardd`, each figure a ratio against a baseline measured in the same run:
//!
//! 1. `/metrics` at ~20k series against a Python `prometheus_client` exporter serving the same series
//!    (p50/p99 of sequential scrapes, each rendered afresh: `--metrics-max-age 0`), and both processes' RSS.
//! 2. At ~206k series: 16 concurrent scrapers (each every `--scrape-interval` seconds, default 5; 0 = back to
//!    back; asking for gzip as Prometheus does unless `--scrape-encoding identity`), the daemon's peak RSS, and
//!    ingest throughput while they scrape against the same ingest without.
//! 3. Ingest throughput: 8 senders over the Unix socket writing realistic lines (3 spectrum samples and a step
//!    per training step) as fast as the socket takes them; and end to end through 8 `gainguard-send`
//!    processes (their JSON encoding shares the same cores). With `--baseline-gainguardd PATH` (another
//!    build's binary, e.g. one built from main), first the raw-line measurement alternating between that
//!    build and this one, 3 rounds each: their ratio.
//! 4. Decoding section 3's lines on one thread: serde alone against one sender's `LineDecoder` (the
//!    hand-written path gainguardd takes), interleaved in rounds.
//!
//! Run: cargo build --release -p gainguard-daemon --bins --examples &&
//!      target/release/examples/daemon_bench [--scrapes 40] [--python PYTHON] [--scrape-interval 5]
//!      [--scrape-encoding gzip|identity] [--baseline-gainguardd PATH] [--only N]
//! Without --python, the baseline's `prometheus_client` is installed into a throwaway virtualenv under
//! target/bench-venv. Loopback only; every request count is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gainguard_protocol::events::*;
use gainguard_protocol::wire::{decode_line_serde, encode_line, LineDecoder, Rejection};

mod support;
use support::{bin, cpu_seconds, die_with_parent, free_addr, get, get_with, status_mib, threads_cpu_seconds, Guard};




fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(addr, "/metrics").is_none() {
        assert!(Instant::now() < deadline, "{addr} never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
}



fn value(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum()
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    value(&String::from_utf8(get(addr, "/metrics").unwrap()).unwrap(), name)
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


fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Gd {
    child: Guard,
    metrics: SocketAddr,
    sock: PathBuf,
}

fn gainguardd(dir: &Path, name: &str, extra: &[&str]) -> Gd {
    gainguardd_at(&bin("gainguardd"), dir, name, extra)
}

/// Like [`gainguardd`], with another build's binary.
fn gainguardd_at(binary: &Path, dir: &Path, name: &str, extra: &[&str]) -> Gd {
    let sock = dir.join(format!("{name}.sock"));
    let metrics = free_addr();
    let child = Guard(
        die_with_parent(&mut Command::new(binary))
            .args(["--listen", &metrics.to_string(), "--nvml", "off"])
            .arg(format!("--ingest=unix:{}", sock.display()))
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_ready(metrics);
    Gd { child, metrics, sock }
}

/// A greeted raw connection to the daemon's Unix socket.
fn connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap();
    let mut greeting = String::new();
    BufReader::new(s.try_clone().unwrap()).read_line(&mut greeting).unwrap();
    assert!(greeting.contains("\"ok\""), "{greeting}");
    s
}

fn full_sample(param: String, layer: u32, v: f64) -> Event {
    Event::Spectrum(SpectrumSample {
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
        duration_seconds: 0.01,
        decay_horizon: Some(6.0),
        ..SpectrumSample::empty(param, Some(layer), ParamClass::MatrixLike)
    })
}

/// Loads `runs × params` fully sampled parameters (a Params table, one full sample each, one Step).
fn load(gd: &Gd, runs: u32, params: usize) -> usize {
    let mut s = connect(&gd.sock);
    for rank in 0..runs {
        let e = |step, ev| encode_line(&Envelope::new("bench", rank, "node", step, ev)).unwrap();
        let h = Hello { pid: 1, planned_steps: Some(1000), rule: "paper".into(), gamma: Some(0.5), alpha: Some(0.75), reference: None };
        let mut out = e(0, Event::Hello(h));
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
        out.extend(e(0, Event::Params(ParamsTable { params: table })));
        for j in 0..params {
            out.extend(e(1, full_sample(format!("blocks.{j}.attn.q.weight"), j as u32, 1.0 + j as f64)));
        }
        let st = StepEvent { loss: Some(2.0), tokens: 1, duration_seconds: Some(0.1), timestamp_seconds: 1.0, ..Default::default() };
        out.extend(e(1, Event::Step(st)));
        s.write_all(&out).unwrap();
    }
    let want = runs as f64 * params as f64;
    while metric(gd.metrics, "gainguard_spectrum_samples_total") < want {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Counted on a body rendered after the last event was applied (a body rendered meanwhile can show
    // families encoded before and after a given event).
    std::thread::sleep(Duration::from_millis(1100));
    let body = String::from_utf8(get(gd.metrics, "/metrics").unwrap()).unwrap();
    body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count()
}

/// One training step as `gainguard-send` writes it: 3 spectrum samples and a step, for run `ingest-RANK`.
fn step_block(rank: u32, steps: u64) -> (Vec<u8>, u64) {
    let mut out = Vec::new();
    let mut events = 0;
    for i in 1..=steps {
        for j in 0..3u32 {
            let s = SpectrumSample {
                sigma_max: Some(1.0 + j as f64),
                iterations: 2,
                duration_seconds: 0.001,
                ..SpectrumSample::empty(format!("blocks.{j}.mlp.up.weight"), Some(j), ParamClass::MatrixLike)
            };
            out.extend(encode_line(&Envelope::new(format!("ingest-{rank}"), rank, "localhost", i, Event::Spectrum(s))).unwrap());
        }
        let st = StepEvent { loss: Some(2.0 + 1.0 / i as f64), tokens: 1000, duration_seconds: Some(0.01), timestamp_seconds: 1.7e9, ..Default::default() };
        out.extend(encode_line(&Envelope::new(format!("ingest-{rank}"), rank, "localhost", i, Event::Step(st))).unwrap());
        events += 4;
    }
    (out, events)
}

/// Copies of each sender's 1,000-step block per ingest measurement: 8 × 4,000 × 100 = 3.2M events, a few
/// seconds, so that one burst of another process's load moves a figure little.
const REPEATS: usize = 100;
/// Section 2's: 12.8M events, longer than the default 5 s between scrape rounds, so that the measurement with
/// scrapers spans at least one round.
const SCRAPE_REPEATS: usize = 400;

/// The daemon's threads that ingest (reading and decoding sockets, the run table), not those serving HTTP.
const INGEST_THREADS: [&str; 2] = ["gainguard-inges", "gainguard-runs"];

/// 8 senders each write `repeats` copies of a 1,000-step block; returns accepted events per second, the
/// event count and the daemon's CPU µs per event. Timed from the first byte until the daemon's ingest threads stop (their CPU time, from /proc,
/// has not risen for 200 ms), then checked against its event counter. /metrics is read only then: polling it
/// would load the daemon (a 28.8 MB body in section 2), and a body can be up to --metrics-max-age old.
fn ingest_rate(gd: &Gd, repeats: usize) -> (f64, f64, f64) {
    let pid = gd.child.0.id();
    let before = metric(gd.metrics, "gainguard_ingest_events_total");
    let (cpu, ingest_cpu) = (cpu_seconds(pid), threads_cpu_seconds(pid, &INGEST_THREADS));
    let blocks: Vec<(Vec<u8>, u64)> = (0..8).map(|r| step_block(r, 1000)).collect();
    let total: u64 = blocks.iter().map(|(_, n)| n * repeats as u64).sum();
    let conns: Vec<UnixStream> = (0..8).map(|_| connect(&gd.sock)).collect();
    let start = Instant::now();
    let writers: Vec<_> = conns
        .into_iter()
        .zip(blocks)
        .map(|(mut s, (block, _))| {
            std::thread::spawn(move || {
                for _ in 0..repeats {
                    s.write_all(&block).unwrap();
                }
                s
            })
        })
        .collect();
    let conns: Vec<UnixStream> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let secs = (ingested(gd, before, total as f64) - start).as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu;
    let ingest_cpu = threads_cpu_seconds(pid, &INGEST_THREADS) - ingest_cpu;
    println!(
        "  {total} events in {secs:.2} s: daemon CPU {cpu:.2} s = {:.2} µs per event, {:.2} µs in its ingest and \
         run-table threads (2 cores: at most {:.0} events/s for the daemon alone)",
        cpu / total as f64 * 1e6,
        ingest_cpu / total as f64 * 1e6,
        2.0 * total as f64 / cpu
    );
    drop(conns);
    (total as f64 / secs, total as f64, cpu / total as f64 * 1e6)
}

/// When the daemon finished ingesting, once every sender is done: the last moment its ingest threads' CPU time
/// rose before it stayed flat for 200 ms and its counter showed `total` events more than `before`.
fn ingested(gd: &Gd, before: f64, total: f64) -> Instant {
    let pid = gd.child.0.id();
    let start = Instant::now();
    let (mut seen, mut last_active) = (threads_cpu_seconds(pid, &INGEST_THREADS), Instant::now());
    let mut next_check = last_active + Duration::from_millis(200);
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let now = threads_cpu_seconds(pid, &INGEST_THREADS);
        if now > seen {
            (seen, last_active) = (now, Instant::now());
            next_check = last_active + Duration::from_millis(200);
        }
        if Instant::now() >= next_check {
            let counted = metric(gd.metrics, "gainguard_ingest_events_total") - before;
            if counted >= total {
                return last_active;
            }
            assert!(start.elapsed() < Duration::from_secs(600), "ingest stalled at {counted} of {total}");
            next_check = Instant::now() + Duration::from_millis(200);
        }
    }
}

/// Creates target/bench-venv with prometheus_client, unless it is there; returns its python.
fn baseline_python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-venv");
    let python = venv.join("bin/python");
    let ok = |p: &Path| Command::new(p).args(["-c", "import prometheus_client"]).status().is_ok_and(|s| s.success());
    if !ok(&python) {
        let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().unwrap();
        assert!(made.success(), "python3 -m venv {}", venv.display());
        let pip = Command::new(venv.join("bin/pip")).args(["install", "--quiet", "prometheus_client"]).status().unwrap();
        assert!(pip.success(), "pip install prometheus_client");
    }
    python
}

fn python_exporter(python: &Path, body: &str, dir: &Path, scrapes: usize) -> (Duration, Duration, usize, f64, String) {
    let body_path = dir.join("body.txt");
    std::fs::write(&body_path, body).unwrap();
    let addr = free_addr();
    let mut py = Guard(
        Command::new(python)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/python_exporter.py"))
            .arg(&body_path)
            .arg(addr.port().to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python with prometheus_client"),
    );
    let mut ready = String::new();
    BufReader::new(py.0.stdout.take().unwrap()).read_line(&mut ready).unwrap();
    wait_ready(addr);
    let (p50, p99, bytes) = scrape_latency(addr, scrapes);
    let rss = status_mib(py.0.id(), "VmRSS:");
    (p50, p99, bytes, rss, ready.trim().to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| args.iter().position(|a| a == k).map(|i| args[i + 1].clone());
    let scrapes: usize = arg("--scrapes").map_or(40, |s| s.parse().unwrap());
    // `--only 3` runs one section (1, 2 or 3).
    let only: Option<u32> = arg("--only").map(|s| s.parse().unwrap());
    let run = |section: u32| only.is_none_or(|o| o == section);
    let dir = std::env::temp_dir().join(format!("gainguard-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    if run(1) {
        exporter_against_python(&dir, scrapes, arg("--python"));
    }
    if run(2) {
        let interval = Duration::from_secs_f64(arg("--scrape-interval").map_or(5.0, |s| s.parse().unwrap()));
        let gzip = match arg("--scrape-encoding").as_deref() {
            None | Some("gzip") => true,
            Some("identity") => false,
            Some(other) => panic!("--scrape-encoding {other}: expected gzip or identity"),
        };
        concurrent_scrapes_at_200k(&dir, interval, gzip);
    }
    if run(3) {
        ingest_throughput(&dir, arg("--baseline-gainguardd").map(PathBuf::from));
    }
    if run(4) {
        decoding();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Section 1: 20k series, every scrape rendered afresh, against prometheus_client.
fn exporter_against_python(dir: &Path, scrapes: usize, python: Option<String>) {
    let python = python.map_or_else(baseline_python, PathBuf::from);
    let dir = dir.to_path_buf();
    let gd = gainguardd(&dir, "a", &["--metrics-max-age", "0"]);
    let series = load(&gd, 8, 147);
    let body = String::from_utf8(get(gd.metrics, "/metrics").unwrap()).unwrap();
    let (d50, d99, dbytes) = scrape_latency(gd.metrics, scrapes);
    let drss = status_mib(gd.child.0.id(), "VmRSS:");
    drop(gd);
    let (p50, p99, pbytes, prss, ready) = python_exporter(&python, &body, dir.as_path(), scrapes);
    println!("## 1. /metrics at {series} series (python: {ready}), {scrapes} sequential scrapes, each rendered afresh");
    println!("| exporter | p50 | p99 | body bytes | RSS |");
    println!("|---|---|---|---|---|");
    println!("| gainguardd | {:.2} ms | {:.2} ms | {dbytes} | {drss:.1} MiB |", ms(d50), ms(d99));
    println!("| prometheus_client | {:.2} ms | {:.2} ms | {pbytes} | {prss:.1} MiB |", ms(p50), ms(p99));
    println!(
        "ratios: python / gainguardd p50 {:.1}x, p99 {:.1}x; RSS gainguardd / python {:.2}",
        ms(p50) / ms(d50),
        ms(p99) / ms(d99),
        drss / prss
    );

}

/// Section 2: 206k series, 16 concurrent scrapers each scraping every `interval` (0: back to back); ingest
/// while they scrape against ingest without them, measured before and after (the mean is the baseline, so that
/// a change in the machine's other load during the run shows as a gap between the two).
fn concurrent_scrapes_at_200k(dir: &Path, interval: Duration, gzip: bool) {
    let gd = gainguardd(&dir, "b", &[]);
    let series = load(&gd, 3, 4096);
    let (cached50, _, big_bytes) = scrape_latency(gd.metrics, 5);
    let headers = if gzip { "Accept-Encoding: gzip\r\n" } else { "" };
    let sent_bytes = get_with(gd.metrics, "/metrics", headers).map_or(0, |b| b.len());
    let (idle_before, _, _) = ingest_rate(&gd, SCRAPE_REPEATS);
    let stop = Arc::new(AtomicBool::new(false));
    let scrapers: Vec<_> = (0..16)
        .map(|_| {
            let (addr, stop) = (gd.metrics, Arc::clone(&stop));
            std::thread::spawn(move || {
                // Prometheus would run elsewhere; here its stand-ins yield the shared cores to ingest.
                // SAFETY: lowers this thread's priority only (Linux).
                unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
                let mut n = 0;
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if get_with(addr, "/metrics", headers).is_some() {
                        n += 1;
                    }
                    next += interval;
                    while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let (busy_rate, _, _) = ingest_rate(&gd, SCRAPE_REPEATS);
    stop.store(true, Ordering::Relaxed);
    let served: usize = scrapers.into_iter().map(|s| s.join().unwrap()).sum();
    let (idle_after, _, _) = ingest_rate(&gd, SCRAPE_REPEATS);
    let idle_rate = (idle_before + idle_after) / 2.0;
    let peak = status_mib(gd.child.0.id(), "VmHWM:");
    let encoding = if gzip { "gzip" } else { "identity" };
    println!(
        "## 2. {series} series ({big_bytes} bytes; {sent_bytes} as sent, {encoding}), 16 concurrent scrapers, each every {interval:?}"
    );
    println!(
        "scrape p50 {:.1} ms (cached body); {served} scrapes served while the scrapers ran; peak RSS {peak:.0} MiB",
        ms(cached50)
    );
    println!(
        "ingest: {idle_before:.0} and {idle_after:.0} events/s without scrapers (before, after), {busy_rate:.0} \
         with 16; ratio to their mean {:.2}",
        busy_rate / idle_rate
    );
    drop(gd);

}

/// Section 3: ingest from 8 raw senders, then from 8 gainguard-send processes.
fn ingest_throughput(dir: &Path, baseline: Option<PathBuf>) {
    if let Some(baseline) = baseline {
        against_baseline(dir, &baseline);
    }
    let gd = gainguardd(&dir, "c", &[]);
    let (rate, total, _) = ingest_rate(&gd, REPEATS);
    let rejected = metric(gd.metrics, "gainguard_ingest_rejected_total");
    println!("## 3. ingest, 8 senders over the Unix socket");
    println!("raw lines: {total} events in {:.2} s = {rate:.0} events/s, {rejected} rejected", total / rate);
    let before = metric(gd.metrics, "gainguard_ingest_events_total");
    let start = Instant::now();
    let sock = format!("unix:{}", gd.sock.display());
    let children: Vec<Guard> = (0..8)
        .map(|r| {
            Guard(
                Command::new(bin("gainguard-send"))
                    .args(["--addr", &sock, "--run", "e2e", "--rank", &r.to_string()])
                    .args(["--steps", "25000", "--params", "3", "--capacity", "200000"])
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let (mut sent, mut dropped) = (0u64, 0u64);
    for mut c in children {
        let mut out = String::new();
        c.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        sent += v["sent"].as_u64().unwrap();
        dropped += v["dropped"].as_u64().unwrap();
    }
    let expected = (sent - dropped) as f64;
    let secs = (ingested(&gd, before, expected) - start).as_secs_f64();
    println!("gainguard-send x 8: {sent} events ({dropped} dropped by senders) in {secs:.2} s = {:.0} events/s end to end", expected / secs);
}

/// Section 4: ns per line of section 3's lines, serde alone against a sender's `LineDecoder`, median of 15
/// interleaved rounds after 3 warm-up rounds.
/// Section 3's raw-line measurement with another build of gainguardd (`--baseline-gainguardd`) and this one,
/// alternating over 3 rounds so that both see the same changes in the machine's other load; a fresh daemon
/// each time.
fn against_baseline(dir: &Path, baseline: &Path) {
    println!("## 3a. ingest, this build against {}, alternating", baseline.display());
    let (mut base, mut this) = (Vec::new(), Vec::new());
    for round in 0..3 {
        for (binary, into, label) in [(baseline.to_path_buf(), &mut base, "baseline"), (bin("gainguardd"), &mut this, "this build")] {
            let gd = gainguardd_at(&binary, dir, &format!("ab{round}"), &[]);
            println!("{label}, round {}:", round + 1);
            let (rate, _, cpu_us) = ingest_rate(&gd, REPEATS);
            into.push((rate, cpu_us));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let column = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| v.iter().map(f).collect::<Vec<f64>>();
    let (br, bc) = (median(&mut column(&base, |x| x.0)), median(&mut column(&base, |x| x.1)));
    let (tr, tc) = (median(&mut column(&this, |x| x.0)), median(&mut column(&this, |x| x.1)));
    println!(
        "medians: baseline {br:.0} events/s, {bc:.2} µs CPU per event; this build {tr:.0} events/s, {tc:.2} µs; \
         ratio {:.2} in events/s, {:.2} in CPU per event",
        tr / br,
        tc / bc
    );
}

fn decoding() {
    let (block, _) = step_block(0, 1000);
    let lines: Vec<&[u8]> = block.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
    let time = |decode: &mut dyn FnMut(&[u8]) -> Result<Envelope, Rejection>| {
        let start = Instant::now();
        let ok = lines.iter().filter(|l| std::hint::black_box(decode(std::hint::black_box(l))).is_ok()).count();
        assert_eq!(ok, lines.len());
        start.elapsed().as_secs_f64() * 1e9 / lines.len() as f64
    };
    let mut sender = LineDecoder::default();
    let (mut serde, mut fast) = (Vec::new(), Vec::new());
    for round in 0..18 {
        let s = time(&mut decode_line_serde);
        let f = time(&mut |l| sender.decode(l));
        if round >= 3 {
            serde.push(s);
            fast.push(f);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (s, f) = (median(&mut serde), median(&mut fast));
    let bytes = lines.iter().map(|l| l.len()).sum::<usize>() as f64 / lines.len() as f64;
    println!("## 4. decoding {} lines of {bytes:.0} bytes on one thread", lines.len());
    println!("serde alone {s:.0} ns per line, LineDecoder {f:.0} ns per line: {:.2}x ({:.1}x faster)", f / s, s / f);
}

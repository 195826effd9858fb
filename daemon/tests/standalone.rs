//! The `gainguardd` process: start-up errors, signals, the socket file, restarts, expiry, promtool.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, gainguardd, gainguardd_at, metrics, run_to_exit, sample, socket_in, wait_until};
use gainguard_daemon::{Daemon, DaemonConfig, NvmlSettings, SourceSettings};
use gainguard_protocol::events::*;
use gainguard_protocol::{Sink, SinkOptions};

#[test]
fn a_metrics_port_already_in_use_exits_with_status_2_and_names_the_port() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) =
        run_to_exit(&["--listen", &format!("127.0.0.1:{port}"), "--ingest", &socket_in(dir.path()), "--nvml", "off"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(&port.to_string()), "message must name the port: {stderr}");
    assert_eq!(stderr.matches("os error").count(), 1, "the OS error once: {stderr}");
}

#[test]
fn nvml_on_without_a_driver_exits_with_status_2() {
    if std::path::Path::new("/dev/nvidiactl").exists() {
        return; // a GPU machine: NVML is there
    }
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = run_to_exit(&[
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--ingest",
        &socket_in(dir.path()),
        "--nvml",
        "on",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("NVML"), "{stderr}");
}

#[test]
fn without_nvml_the_daemon_exports_nvml_up_0_logs_once_and_serves_everything_else() {
    if std::path::Path::new("/dev/nvidiactl").exists() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ingest = socket_in(dir.path());
    let (mut daemon, addr) = gainguardd(&["--ingest", &ingest, "--nvml", "auto", "--nvml-interval", "0.1"]);
    let sink = Sink::connect(&ingest, SinkOptions::default()).unwrap();
    sink.send(Envelope::new("r", 0, "h", 5, Event::Step(StepEvent { timestamp_seconds: 1.0, ..Default::default() })));
    wait_until(Duration::from_secs(5), "the step", || {
        (sample(&metrics(addr), "gainguard_step", &[("run", "r")]) == Some(5.0)).then_some(())
    });
    let body = metrics(addr);
    assert_eq!(sample(&body, "gainguard_nvml_up", &[]), Some(0.0));
    assert!(!body.contains("gainguard_gpu_"), "no GPU series without NVML");
    std::thread::sleep(Duration::from_millis(500)); // several poll intervals
    daemon.signal(libc::SIGTERM);
    daemon.wait_exit(Duration::from_secs(5)).expect("exits on SIGTERM");
    let mut stderr = String::new();
    use std::io::Read;
    daemon.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(stderr.lines().filter(|l| l.contains("NVML")).count(), 1, "exactly one NVML log line: {stderr}");
}

#[test]
fn sigterm_shuts_down_cleanly_and_removes_the_socket_file() {
    let dir = tempfile::tempdir().unwrap();
    let ingest = socket_in(dir.path());
    let path = dir.path().join("gainguardd.sock");
    let (mut daemon, _) = gainguardd(&["--ingest", &ingest, "--nvml", "off"]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(5)).expect("exits on SIGTERM");
    assert!(status.success());
    assert!(!path.exists());
}

#[test]
fn a_stale_socket_file_is_replaced_but_a_live_daemon_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gainguardd.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // leaves a stale file
    assert!(path.exists());
    let ingest = socket_in(dir.path());
    let (_live, _) = gainguardd(&["--ingest", &ingest, "--nvml", "off"]);
    let (code, stderr) =
        run_to_exit(&["--listen", &format!("127.0.0.1:{}", free_port()), "--ingest", &ingest, "--nvml", "off"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("already listening"), "{stderr}");
    assert!(path.exists(), "the live daemon's socket must survive");
}

#[test]
fn a_restarted_daemon_relearns_the_run_within_5s_while_send_never_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let ingest = socket_in(dir.path());
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (first, addr) = gainguardd_at(listen, &["--ingest", &ingest, "--nvml", "off"]);
    let sink = Sink::connect(&ingest, SinkOptions { capacity: 1024, ..Default::default() }).unwrap();
    let hello = Hello {
        pid: std::process::id(),
        planned_steps: Some(1_000_000),
        rule: "paper".into(),
        gamma: Some(0.5),
        alpha: None,
        reference: None,
    };
    assert!(sink.send(Envelope::new("restart", 0, "h", 0, Event::Hello(hello))));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let sink = sink.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut times = Vec::new();
            let mut step = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                step += 1;
                let e = Envelope::new(
                    "restart",
                    0,
                    "h",
                    step,
                    Event::Step(StepEvent { tokens: 1, timestamp_seconds: 1.0, ..Default::default() }),
                );
                let t = Instant::now();
                sink.send(e);
                times.push(t.elapsed());
                std::thread::sleep(Duration::from_millis(2));
            }
            times.sort();
            times
        })
    };
    wait_until(Duration::from_secs(5), "the run", || sample(&metrics(addr), "gainguard_step", &[("run", "restart")]));
    drop(first); // SIGKILL: no clean shutdown, the socket file stays behind
    std::thread::sleep(Duration::from_millis(500));
    let (_second, addr2) = gainguardd_at(listen, &["--ingest", &ingest, "--nvml", "off"]);
    let restarted = Instant::now();
    wait_until(Duration::from_secs(5), "the run to reappear after the restart", || {
        let body = metrics(addr2);
        let step = sample(&body, "gainguard_step", &[("run", "restart")])?;
        // The Hello was replayed: the run's rule and progress are known again.
        let info = sample(&body, "gainguard_run_info", &[("run", "restart"), ("rule", "paper")])?;
        let progress = sample(&body, "gainguard_progress_ratio", &[("run", "restart")])?;
        (step > 0.0 && info == 1.0 && progress > 0.0).then_some(())
    });
    assert!(restarted.elapsed() < Duration::from_secs(5));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let times = sender.join().unwrap();
    // Allow for the scheduler on a loaded machine in the tail, but not for waiting on the daemon (whose
    // absence lasted over 500 ms, and the sink's write timeout is 1 s).
    let p99 = times[times.len() * 99 / 100];
    let slowest = *times.last().unwrap();
    assert!(p99 < Duration::from_millis(1), "p99 send took {p99:?}");
    assert!(slowest < Duration::from_millis(100), "the slowest send took {slowest:?}");
}

#[test]
fn a_finished_run_keeps_its_series_for_the_ttl_then_loses_all_of_them() {
    let daemon = Daemon::spawn(DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        sources: SourceSettings { nvml: NvmlSettings::off() },
        ttl: Duration::from_millis(800),
        ..Default::default()
    })
    .unwrap();
    let addr = daemon.metrics_addr();
    let sink = daemon.sink();
    let e = |step, event| Envelope::new("ttl", 1, "h", step, event);
    sink.send(e(0, Event::Hello(Hello { pid: 1, planned_steps: None, rule: "paper".into(), gamma: None, alpha: None, reference: None })));
    sink.send(e(
        0,
        Event::Params(ParamsTable {
            params: vec![ParamInfo {
                name: "w".into(),
                layer: Some(0),
                class: ParamClass::MatrixLike,
                shape: vec![4, 4],
                width_multiplier: 1.0,
                lr: 0.1,
                weight_decay: 0.1,
            }],
        }),
    ));
    sink.send(e(1, Event::Step(StepEvent { loss: Some(1.0), timestamp_seconds: 1.0, ..Default::default() })));
    let spectrum = |sigma| Event::Spectrum(SpectrumSample { sigma_max: Some(sigma), ..SpectrumSample::empty("w", Some(0), ParamClass::MatrixLike) });
    sink.send(e(1, spectrum(1.5)));
    sink.send(e(1, Event::Goodbye(Goodbye { reason: "finished".into() })));
    wait_until(Duration::from_secs(5), "the goodbye", || {
        (sample(&metrics(addr), "gainguard_trainer_up", &[("run", "ttl")]) == Some(0.0)).then_some(())
    });
    let body = metrics(addr);
    assert!(sample(&body, "gainguard_param_learning_rate", &[("run", "ttl")]).is_some(), "kept during the TTL");
    assert_eq!(sample(&body, "gainguard_trainer_exit_info", &[("run", "ttl"), ("reason", "finished")]), Some(1.0));
    wait_until(Duration::from_secs(5), "expiry", || {
        let body = metrics(addr);
        (!body.lines().any(|l| !l.starts_with('#') && l.contains("run=\"ttl\""))).then_some(())
    });
    assert_eq!(sample(&metrics(addr), "gainguard_runs", &[]), Some(0.0));
    // The same run coming back starts afresh: its series are new (the daemon keeps handles to a run's series
    // between events; none may outlive the run), its counters count from zero.
    sink.send(e(7, Event::Step(StepEvent { loss: Some(3.0), timestamp_seconds: 2.0, ..Default::default() })));
    sink.send(e(7, spectrum(2.5)));
    let ttl = [("run", "ttl")];
    wait_until(Duration::from_secs(5), "the run's return", || {
        (sample(&metrics(addr), "gainguard_sigma_max", &ttl) == Some(2.5)).then_some(())
    });
    let body = metrics(addr);
    assert_eq!(sample(&body, "gainguard_step", &ttl), Some(7.0));
    assert_eq!(sample(&body, "gainguard_loss", &ttl), Some(3.0));
    assert_eq!(sample(&body, "gainguard_trainer_up", &ttl), Some(1.0));
    assert_eq!(sample(&body, "gainguard_spectrum_samples_total", &ttl), Some(1.0));
    assert_eq!(sample(&body, "gainguard_trainer_exit_info", &[("run", "ttl"), ("reason", "finished")]), None);
}

#[test]
fn the_exit_reason_follows_the_last_goodbye_and_a_new_hello_or_step_clears_it() {
    let daemon = Daemon::spawn(DaemonConfig { listen: "127.0.0.1:0".parse().unwrap(), sources: SourceSettings { nvml: NvmlSettings::off() }, ..Default::default() }).unwrap();
    let addr = daemon.metrics_addr();
    let sink = daemon.sink();
    let e = |step, event| Envelope::new("exits", 0, "h", step, event);
    let hello = || Event::Hello(Hello { pid: 1, planned_steps: None, rule: "paper".into(), gamma: None, alpha: None, reference: None });
    let reasons = || {
        let body = metrics(addr);
        body.lines()
            .filter(|l| l.starts_with("gainguard_trainer_exit_info{") && l.contains("run=\"exits\""))
            .map(|l| l.split("reason=\"").nth(1).unwrap().split('"').next().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let wait_for = |want: Vec<&str>| {
        wait_until(Duration::from_secs(5), &format!("exit reasons {want:?}"), || (reasons() == want).then_some(()));
    };
    sink.send(e(0, hello()));
    sink.send(e(1, Event::Step(StepEvent { loss: Some(1.0), timestamp_seconds: 1.0, ..Default::default() })));
    wait_until(Duration::from_secs(5), "the run", || sample(&metrics(addr), "gainguard_trainer_up", &[("run", "exits")]).filter(|v| *v == 1.0));
    assert!(reasons().is_empty(), "no exit reason while running");
    sink.send(e(2, Event::Goodbye(Goodbye { reason: "error".into() })));
    wait_for(vec!["error"]);
    // The same run and rank started again: running, no reason.
    sink.send(e(0, hello()));
    wait_until(Duration::from_secs(5), "up again", || sample(&metrics(addr), "gainguard_trainer_up", &[("run", "exits")]).filter(|v| *v == 1.0));
    wait_for(vec![]);
    // A step after a Goodbye: the trainer carried on, so the run is up and has no exit reason.
    sink.send(e(2, Event::Goodbye(Goodbye { reason: "error".into() })));
    wait_for(vec!["error"]);
    sink.send(e(3, Event::Step(StepEvent { loss: Some(1.0), timestamp_seconds: 1.0, ..Default::default() })));
    wait_for(vec![]);
    assert_eq!(sample(&metrics(addr), "gainguard_trainer_up", &[("run", "exits")]), Some(1.0));
    // A reason outside the protocol's list does not become a label value.
    sink.send(e(3, Event::Goodbye(Goodbye { reason: "out of memory".into() })));
    wait_for(vec!["other"]);
    // Its embedded sink going away keeps the reason the trainer gave.
    drop(sink);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(reasons(), vec!["other"]);
    daemon.shutdown();
}

#[test]
fn promtool_finds_no_problem_in_a_realistic_metrics_body() {
    let promtool = std::path::Path::new("/usr/bin/promtool");
    assert!(promtool.exists(), "promtool not found: `make test` installs the Debian package `prometheus`");
    let dir = tempfile::tempdir().unwrap();
    let ingest = socket_in(dir.path());
    let (_daemon, addr) = gainguardd(&["--ingest", &ingest, "--nvml", "auto"]);
    let status = Command::new(env!("CARGO_BIN_EXE_gainguard-send"))
        .args(["--addr", &ingest, "--steps", "20", "--params", "4", "--goodbye", "false"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    // Add full-spectrum fields and a non-finite step so that every family is present.
    let sink = Sink::connect(&ingest, SinkOptions::default()).unwrap();
    sink.send(Envelope::new(
        "synthetic",
        0,
        "localhost",
        21,
        Event::Spectrum(SpectrumSample {
            param: "blocks.0.mlp.up.weight".into(),
            layer: Some(0),
            class: ParamClass::MatrixLike,
            sigma_max: Some(3.0),
            top_k: vec![3.0],
            iterations: 0,
            sigma_max_normalized: Some(1.0),
            reference_sigma_max: Some(3.0),
            gain_ratio: Some(1.0),
            stable_rank: Some(10.0),
            frobenius_norm: Some(9.0),
            effective_rank: Some(100.0),
            quantiles: Some(SpectrumQuantiles { p10: 0.1, p50: 0.5, p90: 0.9, p99: 1.0 }),
            update_ratio: Some(0.001),
            nonfinite: false,
            duration_seconds: 0.2,
            progress: Some(0.5),
            decay_horizon: Some(4.5),
        }),
    ));
    drop(sink);
    let body = wait_until(Duration::from_secs(5), "the full spectrum sample", || {
        let body = metrics(addr);
        sample(&body, "gainguard_stable_rank", &[]).map(|_| body)
    });
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics:\n{report}");
}

/// A raw GET of /metrics with the given extra header lines: the response head and body bytes.
fn get_metrics(addr: std::net::SocketAddr, headers: &str) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n{headers}\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    (String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase(), raw[split + 4..].to_vec())
}

#[test]
fn a_scraper_that_accepts_gzip_gets_the_same_body_gzipped_and_others_get_it_plain() {
    let daemon = Daemon::spawn(DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        sources: SourceSettings { nvml: NvmlSettings::off() },
        metrics_max_age: Duration::ZERO,
        ..Default::default()
    })
    .unwrap();
    let addr = daemon.metrics_addr();
    let sink = daemon.sink();
    for step in 1..=3 {
        sink.send(Envelope::new("gz", 0, "h", step, Event::Step(StepEvent { loss: Some(1.5), timestamp_seconds: 1.0, ..Default::default() })));
    }
    wait_until(Duration::from_secs(5), "the steps", || (sample(&metrics(addr), "gainguard_step", &[("run", "gz")]) == Some(3.0)).then_some(()));
    // Every scrape renders afresh (max age 0), and nothing changes between these renders: the same bytes.
    let (plain_head, plain) = get_metrics(addr, "");
    assert!(!plain_head.contains("content-encoding"), "{plain_head}");
    let (head, gzipped) = get_metrics(addr, "Accept-Encoding: deflate, gzip;q=0.5\r\n");
    assert!(head.contains("content-encoding: gzip") && head.contains("vary: accept-encoding"), "{head}");
    let mut unzipped = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gzipped[..]), &mut unzipped).expect("a gzip stream");
    assert_eq!(unzipped, plain);
    assert!(gzipped.len() < plain.len());
    let (refused_head, refused) = get_metrics(addr, "Accept-Encoding: gzip;q=0, identity\r\n");
    assert!(!refused_head.contains("content-encoding"), "{refused_head}");
    assert_eq!(refused, plain);
}

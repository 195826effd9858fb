//! Hostile or broken input must be refused and counted, must not stop the daemon, and must not cost a
//! well-behaved trainer on another connection a single event.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use common::{http_get, metrics, sample, tcp_ingest, token_file, wait_until};
use gainguard_daemon::{Daemon, DaemonConfig, IngestAddr, IngestAuth, Limits, NvmlSettings, SourceSettings};
use gainguard_protocol::events::*;
use gainguard_protocol::wire::encode_line;

const GOOD_STEPS: u64 = 300;
const GOOD_TOKENS: u64 = 64;

fn start(limits: Limits) -> (Daemon, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::spawn(DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ingest: vec!["tcp:127.0.0.1:0".parse().unwrap()],
        auth: IngestAuth { token_file: Some(token_file(dir.path())), ..Default::default() },
        sources: SourceSettings { nvml: NvmlSettings::off() },
        limits,
        ..Default::default()
    })
    .unwrap();
    let IngestAddr::Tcp(ingest) = daemon.ingest_addrs()[0] else { unreachable!() };
    (daemon, ingest)
}

fn step_line(run: &str, step: u64) -> Vec<u8> {
    encode_line(&Envelope::new(
        run,
        0,
        "h",
        step,
        Event::Step(StepEvent { loss: Some(1.0), tokens: GOOD_TOKENS, timestamp_seconds: 1.0, ..Default::default() }),
    ))
    .unwrap()
}

/// A trainer that behaves, on its own connection, while the bad input arrives.
fn good_run(ingest: SocketAddr) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut s = tcp_ingest(ingest);
        for i in 1..=GOOD_STEPS {
            s.write_all(&step_line("good", i)).unwrap();
            if i % 50 == 0 {
                thread::sleep(Duration::from_millis(5));
            }
        }
    })
}

fn rejected(body: &str, reason: &str) -> f64 {
    sample(body, "gainguard_ingest_rejected_total", &[("reason", reason)]).unwrap_or(0.0)
}

/// Waits for the good run to arrive whole and for `reason` to reach `count`; checks the daemon is healthy.
fn assert_survived(daemon: &Daemon, reason: &str, count: f64) {
    let addr = daemon.metrics_addr();
    wait_until(Duration::from_secs(20), "the good run to arrive in full", || {
        let body = metrics(addr);
        let tokens = sample(&body, "gainguard_tokens_total", &[("run", "good")]);
        (tokens == Some((GOOD_STEPS * GOOD_TOKENS) as f64)
            && sample(&body, "gainguard_step", &[("run", "good")]) == Some(GOOD_STEPS as f64))
        .then_some(())
    });
    wait_until(Duration::from_secs(10), &format!("rejected{{reason={reason}}} == {count}"), || {
        (rejected(&metrics(addr), reason) == count).then_some(())
    });
    assert_eq!(http_get(addr, "/healthz").unwrap().0, 200);
}

fn wait_for_step(daemon: &Daemon, run: &str, step: f64) {
    wait_until(Duration::from_secs(10), &format!("run {run} at step {step}"), || {
        (sample(&metrics(daemon.metrics_addr()), "gainguard_step", &[("run", run)]) == Some(step)).then_some(())
    });
}

fn send_bad(ingest: SocketAddr, bytes: &[u8]) {
    let mut s = tcp_ingest(ingest);
    s.write_all(bytes).unwrap();
}

#[test]
fn truncated_json_is_counted_as_malformed_and_the_next_line_on_the_same_connection_still_counts() {
    let (daemon, ingest) = start(Limits::default());
    let good = good_run(ingest);
    let mut bad = br#"{"v":1,"run":"other","rank":0,"host":"h","step":1,"event":{"type":"st"#.to_vec();
    bad.push(b'\n');
    bad.extend(step_line("after-bad", 7));
    send_bad(ingest, &bad);
    good.join().unwrap();
    assert_survived(&daemon, "malformed", 1.0);
    wait_for_step(&daemon, "after-bad", 7.0);
}

#[test]
fn a_ten_megabyte_line_is_skipped_unbuffered_and_the_following_line_still_counts() {
    let (daemon, ingest) = start(Limits::default());
    let good = good_run(ingest);
    let mut s = tcp_ingest(ingest);
    let chunk = vec![b'x'; 1 << 20];
    s.write_all(b"{\"v\":1,\"run\":\"").unwrap();
    for _ in 0..10 {
        s.write_all(&chunk).unwrap();
    }
    s.write_all(b"\"}\n").unwrap();
    s.write_all(&step_line("after-long", 3)).unwrap();
    drop(s);
    good.join().unwrap();
    assert_survived(&daemon, "line_too_long", 1.0);
    wait_for_step(&daemon, "after-long", 3.0);
}

#[test]
fn wrong_types_are_counted_as_schema_errors() {
    let (daemon, ingest) = start(Limits::default());
    let good = good_run(ingest);
    send_bad(
        ingest,
        concat!(
            r#"{"v":1,"run":"r","rank":"zero","host":"h","step":1,"event":{"type":"step","timestamp_seconds":1.0}}"#,
            "\n",
            r#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1.0,"tokens":-5}}"#,
            "\n",
            r#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"teleport"}}"#,
            "\n",
            "[1,2,3]\n"
        )
        .as_bytes(),
    );
    good.join().unwrap();
    assert_survived(&daemon, "schema", 4.0);
}

#[test]
fn nan_and_infinities_are_refused_as_invalid_values() {
    let (daemon, ingest) = start(Limits::default());
    let good = good_run(ingest);
    let mut bad = Vec::new();
    for token in ["NaN", "Infinity", "-Infinity"] {
        bad.extend(
            format!(r#"{{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{{"type":"step","timestamp_seconds":1.0,"loss":{token}}}}}"#)
                .bytes(),
        );
        bad.push(b'\n');
    }
    // Finite but impossible: a negative singular value.
    bad.extend(
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"spectrum","param":"w","class":"matrix_like","sigma_max":-2.0}}"#,
    );
    bad.push(b'\n');
    send_bad(ingest, &bad);
    // And non-finite floats from an in-process sender, which never pass through JSON.
    let sink = daemon.sink();
    sink.send(Envelope::new(
        "r",
        0,
        "h",
        1,
        Event::Step(StepEvent { loss: Some(f64::INFINITY), timestamp_seconds: 1.0, ..Default::default() }),
    ));
    good.join().unwrap();
    assert_survived(&daemon, "invalid_value", 5.0);
    assert_eq!(sample(&metrics(daemon.metrics_addr()), "gainguard_loss", &[("run", "r")]), None);
}

#[test]
fn an_unknown_protocol_version_is_refused() {
    let (daemon, ingest) = start(Limits::default());
    let good = good_run(ingest);
    send_bad(
        ingest,
        b"{\"v\":2,\"run\":\"r\",\"rank\":0,\"host\":\"h\",\"step\":1,\"event\":{\"type\":\"step\",\"timestamp_seconds\":1.0}}\n{\"v\":99,\"new\":\"shape\"}\n",
    );
    good.join().unwrap();
    assert_survived(&daemon, "unknown_version", 2.0);
}

#[test]
fn a_hundred_thousand_distinct_param_names_stop_at_the_per_run_cap() {
    let max_params = 500;
    let (daemon, ingest) = start(Limits { max_params_per_run: max_params, ..Limits::default() });
    let good = good_run(ingest);
    let flood = thread::spawn(move || {
        let mut s = std::io::BufWriter::new(tcp_ingest(ingest));
        for j in 0..100_000u32 {
            let e = Envelope::new(
                "flood",
                0,
                "h",
                1,
                Event::Spectrum(SpectrumSample {
                    sigma_max: Some(1.0),
                    iterations: 1,
                    ..SpectrumSample::empty(format!("p{j}"), None, ParamClass::MatrixLike)
                }),
            );
            s.write_all(&encode_line(&e).unwrap()).unwrap();
        }
    });
    good.join().unwrap();
    flood.join().unwrap();
    assert_survived(&daemon, "too_many_params", (100_000 - max_params) as f64);
    let body = metrics(daemon.metrics_addr());
    let series = body.lines().filter(|l| l.starts_with("gainguard_sigma_max{") && l.contains("run=\"flood\"")).count();
    assert_eq!(series, max_params);
}

#[test]
fn a_client_that_connects_and_sends_nothing_costs_the_others_nothing() {
    let (daemon, ingest) = start(Limits::default());
    let _silent = tcp_ingest(ingest);
    let good = good_run(ingest);
    good.join().unwrap();
    assert_survived(&daemon, "malformed", 0.0);
    let body = metrics(daemon.metrics_addr());
    assert_eq!(sample(&body, "gainguard_ingest_connections", &[]), Some(1.0), "only the silent client is left");
}

#[test]
fn a_client_that_disconnects_mid_line_is_counted_and_its_run_goes_down() {
    let (daemon, ingest) = start(Limits::default());
    let good = good_run(ingest);
    let mut bytes = step_line("cut", 1);
    bytes.extend_from_slice(&step_line("cut", 2)[..20]);
    send_bad(ingest, &bytes);
    good.join().unwrap();
    assert_survived(&daemon, "malformed", 1.0);
    wait_until(Duration::from_secs(5), "the cut run to go down", || {
        let body = metrics(daemon.metrics_addr());
        (sample(&body, "gainguard_step", &[("run", "cut")]) == Some(1.0)
            && sample(&body, "gainguard_trainer_up", &[("run", "cut")]) == Some(0.0)
            && sample(&body, "gainguard_trainer_exit_info", &[("run", "cut"), ("reason", "vanished")]) == Some(1.0))
        .then_some(())
    });
}

#[test]
fn connections_beyond_the_cap_are_refused_and_counted_when_none_is_idle() {
    let (daemon, ingest) = start(Limits { max_connections: 3, ..Limits::default() });
    let connections = || sample(&metrics(daemon.metrics_addr()), "gainguard_ingest_connections", &[]);
    // Each held connection delivers an event, so none is idle and none is closed to make room.
    let mut held: Vec<TcpStream> = (0..3)
        .map(|i| {
            let mut s = tcp_ingest(ingest);
            s.write_all(&step_line(&format!("held{i}"), 1)).unwrap();
            s
        })
        .collect();
    wait_until(Duration::from_secs(5), "three connections", || (connections() == Some(3.0)).then_some(()));
    for _ in 0..4 {
        let mut s = TcpStream::connect(ingest).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(common::greeting(&mut s), r#"{"status":"refused","reason":"too_many_connections"}"#);
    }
    wait_until(Duration::from_secs(5), "four refusals", || {
        (rejected(&metrics(daemon.metrics_addr()), "too_many_connections") == 4.0).then_some(())
    });
    held.pop(); // frees one slot for the well-behaved trainer
    wait_until(Duration::from_secs(5), "a free slot", || (connections() == Some(2.0)).then_some(()));
    good_run(ingest).join().unwrap();
    assert_survived(&daemon, "too_many_connections", 4.0);
}

#[test]
fn runs_beyond_the_cap_are_refused_and_counted() {
    let (daemon, ingest) = start(Limits { max_runs: 3, ..Limits::default() });
    let good = good_run(ingest);
    good.join().unwrap();
    let mut lines = Vec::new();
    for r in 0..5 {
        lines.extend(step_line(&format!("extra{r}"), 1));
    }
    send_bad(ingest, &lines);
    assert_survived(&daemon, "too_many_runs", 3.0);
    assert_eq!(sample(&metrics(daemon.metrics_addr()), "gainguard_runs", &[]), Some(3.0));
}

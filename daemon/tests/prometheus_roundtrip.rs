//! Values sent by trainers must arrive in a real Prometheus server exactly as sent.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{gainguardd, socket_in, ChildGuard, Prometheus};
use gainguard_daemon::{Daemon, DaemonConfig, NvmlMode, NvmlSettings, SourceSettings};
use gainguard_protocol::events::*;

fn env(rank: u32, step: u64, event: Event) -> Envelope {
    Envelope::new("emb", rank, "node-a", step, event)
}

#[test]
fn an_embedded_daemon_round_trips_exact_values_through_a_real_prometheus() {
    let daemon = Daemon::spawn(DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        sources: SourceSettings { nvml: NvmlSettings { mode: NvmlMode::Auto, ..Default::default() } },
        ..Default::default()
    })
    .unwrap();
    let prom = Prometheus::start(&[daemon.metrics_addr()]);
    let sink = daemon.sink();
    let planned = 200u64;
    assert!(sink.send(env(
        3,
        0,
        Event::Hello(Hello {
            pid: std::process::id(),
            planned_steps: Some(planned),
            rule: "paper".into(),
            gamma: Some(0.5),
            alpha: Some(0.75),
            reference: Some("proxy-w128.json".into()),
        })
    )));
    let (lr_a, wd_a, m_a) = (0.003_f64, 0.05_f64, 4.0_f64);
    assert!(sink.send(env(
        3,
        0,
        Event::Params(ParamsTable {
            params: vec![
                ParamInfo {
                    name: "blocks.2.attn.q.weight".into(),
                    layer: Some(2),
                    class: ParamClass::MatrixLike,
                    shape: vec![512, 512],
                    width_multiplier: m_a,
                    lr: lr_a,
                    weight_decay: wd_a,
                },
                ParamInfo {
                    name: "norm.weight".into(),
                    layer: None,
                    class: ParamClass::VectorLike,
                    shape: vec![512],
                    width_multiplier: 1.0,
                    lr: 0.012,
                    weight_decay: 0.0,
                },
            ],
        })
    )));
    let losses = [3.25_f64, 2.718281828459045, 2.3456789012345];
    let tokens = [4096_u64, 4096, 1234567];
    let durations = [0.125_f64, 0.25, 0.0625];
    let (lr_mult, wd_mult) = (0.37_f64, 0.5_f64);
    for (i, ((loss, tok), dur)) in losses.iter().zip(tokens).zip(durations).enumerate() {
        assert!(sink.send(env(
            3,
            15 + i as u64,
            Event::Step(StepEvent {
                loss: Some(*loss),
                tokens: tok,
                duration_seconds: Some(dur),
                timestamp_seconds: 1.7e9 + i as f64,
                lr_multiplier: lr_mult,
                wd_multiplier: wd_mult,
                spectrum_samples_dropped_total: [5, 5, 7][i],
                events_dropped_total: 0,
                nonfinite_parameters: Some(0),
                loss_nonfinite: false,
                skipped_steps_total: [0, 1, 1][i],
            })
        )));
    }
    let sigma = 12.345678901234567_f64;
    assert!(sink.send(env(
        3,
        17,
        Event::Spectrum(SpectrumSample {
            param: "blocks.2.attn.q.weight".into(),
            layer: Some(2),
            class: ParamClass::MatrixLike,
            sigma_max: Some(sigma),
            top_k: vec![sigma, 11.0],
            iterations: 3,
            sigma_max_normalized: Some(0.8125),
            reference_sigma_max: Some(12.0),
            gain_ratio: Some(sigma / 12.0),
            stable_rank: None,
            frobenius_norm: Some(99.5),
            effective_rank: None,
            quantiles: Some(SpectrumQuantiles { p10: 0.5, p50: 1.5, p90: 4.25, p99: 9.75 }),
            update_ratio: Some(1e-3),
            nonfinite: false,
            duration_seconds: 0.0042,
            progress: Some(17.0 / planned as f64),
            decay_horizon: Some(6.25),
        })
    )));

    let run = r#"run="emb",rank="3",host="node-a""#;
    let q = r#"param="blocks.2.attn.q.weight",layer="2",class="matrix_like""#;
    prom.expect(&format!("gainguard_step{{{run}}}"), 17.0);
    prom.expect(&format!("gainguard_loss{{{run}}}"), losses[2]);
    prom.expect(&format!("gainguard_tokens_total{{{run}}}"), tokens.iter().sum::<u64>() as f64);
    prom.expect(&format!("gainguard_step_duration_seconds_count{{{run}}}"), 3.0);
    prom.expect(&format!("gainguard_step_duration_seconds_sum{{{run}}}"), durations.iter().sum());
    prom.expect(&format!("gainguard_trainer_last_step_timestamp_seconds{{{run}}}"), 1.7e9 + 2.0);
    prom.expect(&format!("gainguard_progress_ratio{{{run}}}"), 17.0 / planned as f64);
    prom.expect(&format!("gainguard_spectrum_samples_dropped_total{{{run}}}"), 7.0);
    prom.expect(&format!("gainguard_skipped_steps_total{{{run},reason=\"nonfinite_grad\"}}"), 1.0);
    prom.expect(&format!("gainguard_trainer_up{{{run}}}"), 1.0);
    prom.expect(
        &format!(r#"gainguard_run_info{{{run},rule="paper",gamma="0.5",alpha="0.75",reference="proxy-w128.json"}}"#),
        1.0,
    );
    prom.expect(&format!("gainguard_param_learning_rate{{{run},{q}}}"), lr_a * lr_mult);
    prom.expect(&format!("gainguard_param_weight_decay{{{run},{q}}}"), wd_a * wd_mult);
    prom.expect(&format!("gainguard_param_width_multiplier{{{run},{q}}}"), m_a);
    prom.expect(
        &format!(r#"gainguard_param_learning_rate{{{run},param="norm.weight",layer="",class="vector_like"}}"#),
        0.012 * lr_mult,
    );
    prom.expect(&format!("gainguard_sigma_max{{{run},{q}}}"), sigma);
    prom.expect(&format!("gainguard_gain_ratio{{{run},{q}}}"), sigma / 12.0);
    prom.expect(&format!("gainguard_singular_value_quantile{{{run},{q},quantile=\"0.99\"}}"), 9.75);
    prom.expect(&format!("gainguard_update_ratio{{{run},{q}}}"), 1e-3);
    prom.expect(&format!("gainguard_decay_horizon{{{run},{q}}}"), 6.25);
    prom.expect(&format!("gainguard_spectrum_samples_total{{{run}}}"), 1.0);
    // Values the sample did not carry have no series at all.
    assert!(prom.query(&format!("gainguard_stable_rank{{{run}}}")).is_empty());
    // No GPU driver here: NVML is down and everything else above still works.
    if !std::path::Path::new("/dev/nvidiactl").exists() {
        prom.expect("gainguard_nvml_up", 0.0);
    }

    // A non-finite loss shows as NaN and is counted.
    assert!(sink.send(env(
        3,
        18,
        Event::Step(StepEvent { loss: None, loss_nonfinite: true, timestamp_seconds: 1.7e9 + 3.0, ..Default::default() })
    )));
    prom.expect(&format!("gainguard_loss{{{run}}}"), f64::NAN);
    prom.expect(&format!("gainguard_loss_nonfinite_total{{{run}}}"), 1.0);

    // Non-finite weights: the flag is set, and what was measured from the earlier weights is gone.
    assert!(sink.send(env(
        3,
        19,
        Event::Spectrum(SpectrumSample { nonfinite: true, ..SpectrumSample::empty("blocks.2.attn.q.weight", Some(2), ParamClass::MatrixLike) })
    )));
    prom.expect(&format!("gainguard_spectrum_nonfinite{{{run},{q}}}"), 1.0);
    for family in ["gainguard_sigma_max", "gainguard_gain_ratio", "gainguard_frobenius_norm", "gainguard_singular_value_quantile"] {
        assert!(prom.query(&format!("{family}{{{run},{q}}}")).is_empty(), "{family} left standing beside spectrum_nonfinite 1");
    }
    // Finite weights again: what they measure is exported again.
    assert!(sink.send(env(
        3,
        20,
        Event::Spectrum(SpectrumSample { sigma_max: Some(2.5), ..SpectrumSample::empty("blocks.2.attn.q.weight", Some(2), ParamClass::MatrixLike) })
    )));
    prom.expect(&format!("gainguard_sigma_max{{{run},{q}}}"), 2.5);
    prom.expect(&format!("gainguard_spectrum_nonfinite{{{run},{q}}}"), 0.0);

    // Embedded mode: the trainer is up while its sink lives.
    drop(sink);
    prom.expect(&format!("gainguard_trainer_up{{{run}}}"), 0.0);
    // Gone without a Goodbye.
    prom.expect(&format!("gainguard_trainer_exit_info{{{run},reason=\"vanished\"}}"), 1.0);
    daemon.shutdown();
}

fn send_process(addr: &str, rank: u32, steps: u64, tokens: u64, loss_base: f64, sigma_base: f64) -> ChildGuard {
    ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_gainguard-send"))
            .args(["--addr", addr, "--run", "multi", "--host", "node-b", "--params", "3"])
            .args(["--rank", &rank.to_string(), "--steps", &steps.to_string()])
            .args(["--tokens-per-step", &tokens.to_string(), "--loss-base", &loss_base.to_string()])
            .args(["--sigma-base", &sigma_base.to_string(), "--lr-multiplier", "0.5"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn a_standalone_daemon_fed_by_two_trainer_processes_exports_each_rank_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ingest = socket_in(dir.path());
    let (_daemon, metrics): (ChildGuard, SocketAddr) = gainguardd(&["--ingest", &ingest]);
    let prom = Prometheus::start(&[metrics]);
    let ranks = [(0u32, 40u64, 512u64, 1.5f64, 2.0f64), (1, 55, 777, 3.0, 0.25)];
    let mut children: Vec<ChildGuard> =
        ranks.iter().map(|&(r, s, t, l, g)| send_process(&ingest, r, s, t, l, g)).collect();
    for c in &mut children {
        let status = c.wait_exit(Duration::from_secs(20)).expect("sender finished");
        assert!(status.success());
    }
    for (rank, steps, tokens, loss_base, sigma_base) in ranks {
        let run = format!(r#"run="multi",rank="{rank}",host="node-b""#);
        prom.expect(&format!("gainguard_tokens_total{{{run}}}"), (steps * tokens) as f64);
        prom.expect(&format!("gainguard_step{{{run}}}"), steps as f64);
        prom.expect(&format!("gainguard_loss{{{run}}}"), loss_base + 1.0 / steps as f64);
        prom.expect(&format!("gainguard_spectrum_samples_total{{{run}}}"), (steps * 3) as f64);
        prom.expect(&format!("gainguard_progress_ratio{{{run}}}"), 1.0);
        // Both senders said Goodbye.
        prom.expect(&format!("gainguard_trainer_up{{{run}}}"), 0.0);
        for j in 0..3u32 {
            let p = format!(r#"param="blocks.{j}.mlp.up.weight",layer="{j}",class="matrix_like""#);
            prom.expect(&format!("gainguard_sigma_max{{{run},{p}}}"), sigma_base * (j + 1) as f64);
            prom.expect(&format!("gainguard_param_learning_rate{{{run},{p}}}"), 0.01 / (j + 1) as f64 * 0.5);
        }
    }
    let total_steps: u64 = ranks.iter().map(|r| r.1).sum();
    prom.expect(r#"gainguard_ingest_events_total{type="step"}"#, total_steps as f64);
    prom.expect(r#"sum(gainguard_ingest_rejected_total)"#, 0.0);
    prom.expect("gainguard_runs", 2.0);
    if !std::path::Path::new("/dev/nvidiactl").exists() {
        prom.expect("gainguard_nvml_up", 0.0);
    }
}

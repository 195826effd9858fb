//! `gainguard-send`: a synthetic trainer that sends a deterministic run to a gainguardd through
//! `Sink::connect`. For smoke-testing a deployment, for the daemon's integration tests, and for the ingest
//! benchmark.
//!
//! A TCP address needs the daemon's token: `--token-file PATH` or `$GAINGUARD_INGEST_TOKEN_FILE`.
//!
//! Values are functions of the arguments, so a checker can compute what must arrive:
//! - step i in 1..=steps: loss = loss_base + 1/i, tokens = tokens_per_step, lr_multiplier as given;
//! - parameter j in 0..params: `blocks.{j}.mlp.up.weight`, matrix-like, layer j, width multiplier 2,
//!   lr = 0.01/(j+1), weight decay 0.1·(j+1), sigma_max = sigma_base·(j+1) (sent every step).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use gainguard_protocol::events::{
    Envelope, Event, Goodbye, Hello, ParamClass, ParamInfo, ParamsTable, SpectrumSample, StepEvent,
};
use gainguard_protocol::{Sink, SinkOptions};

#[derive(Parser, Debug)]
#[command(name = "gainguard-send", version)]
struct Args {
    /// Daemon address: unix:/path or tcp:127.0.0.1:PORT.
    #[arg(long)]
    addr: String,
    #[arg(long, default_value = "synthetic")]
    run: String,
    #[arg(long, default_value_t = 0)]
    rank: u32,
    #[arg(long, default_value = "localhost")]
    host: String,
    #[arg(long, default_value_t = 100)]
    steps: u64,
    #[arg(long, default_value_t = 4)]
    params: usize,
    #[arg(long, default_value_t = 1000)]
    tokens_per_step: u64,
    #[arg(long, default_value_t = 2.0)]
    loss_base: f64,
    #[arg(long, default_value_t = 1.0)]
    sigma_base: f64,
    #[arg(long, default_value_t = 1.0)]
    lr_multiplier: f64,
    /// Pause between steps in milliseconds (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Send a Goodbye at the end.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    goodbye: bool,
    /// Sink buffer capacity.
    #[arg(long, default_value_t = 8192)]
    capacity: usize,
    /// For a tcp: address, the file holding the daemon's ingest token (default: $GAINGUARD_INGEST_TOKEN_FILE).
    #[arg(long, value_name = "PATH")]
    token_file: Option<std::path::PathBuf>,
}

fn param_name(j: usize) -> String {
    format!("blocks.{j}.mlp.up.weight")
}

fn main() -> std::process::ExitCode {
    gainguard_daemon::logging::init();
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let options = SinkOptions { capacity: args.capacity, token_file: args.token_file.clone(), ..Default::default() };
    let sink = Sink::connect(&args.addr, options)?;
    let env = |step: u64, event: Event| Envelope::new(args.run.clone(), args.rank, args.host.clone(), step, event);
    let mut sent = 0u64;
    let mut send = |e: Envelope| {
        sent += 1;
        sink.send(e)
    };
    send(env(
        0,
        Event::Hello(Hello {
            pid: std::process::id(),
            planned_steps: Some(args.steps),
            rule: "paper".into(),
            gamma: Some(0.5),
            alpha: Some(0.75),
            reference: None,
        }),
    ));
    let params = (0..args.params)
        .map(|j| ParamInfo {
            name: param_name(j),
            layer: Some(j as u32),
            class: ParamClass::MatrixLike,
            shape: vec![256, 256],
            width_multiplier: 2.0,
            lr: 0.01 / (j + 1) as f64,
            weight_decay: 0.1 * (j + 1) as f64,
        })
        .collect();
    send(env(0, Event::Params(ParamsTable { params })));
    let start = Instant::now();
    for i in 1..=args.steps {
        for j in 0..args.params {
            send(env(
                i,
                Event::Spectrum(SpectrumSample {
                    sigma_max: Some(args.sigma_base * (j + 1) as f64),
                    iterations: 2,
                    duration_seconds: 0.001,
                    ..SpectrumSample::empty(param_name(j), Some(j as u32), ParamClass::MatrixLike)
                }),
            ));
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
        send(env(
            i,
            Event::Step(StepEvent {
                loss: Some(args.loss_base + 1.0 / i as f64),
                tokens: args.tokens_per_step,
                duration_seconds: Some(0.01),
                timestamp_seconds: now,
                lr_multiplier: args.lr_multiplier,
                events_dropped_total: sink.dropped_total(),
                ..Default::default()
            }),
        ));
        if args.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
    }
    if args.goodbye {
        send(env(args.steps, Event::Goodbye(Goodbye { reason: "finished".into() })));
    }
    let elapsed = start.elapsed();
    sink.flush(Duration::from_secs(120));
    let dropped = sink.dropped_total();
    drop(sink);
    let report = format!(
        "{{\"sent\":{sent},\"dropped\":{dropped},\"send_seconds\":{:.6},\"total_seconds\":{:.6}}}\n",
        elapsed.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    // A reader that went away (`| head -0`) is not an error worth a panic or a message.
    use std::io::Write;
    let _ = std::io::stdout().write_all(report.as_bytes());
    Ok(())
}

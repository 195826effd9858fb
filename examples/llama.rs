//! The example trainer: a small LLaMA-style model trained with gainguard's width-scaled AdamW.
//!
//! ```text
//! cargo run --release --example llama -- --d-model 256 --base-d-model 64 --steps 200 --metrics 127.0.0.1:9464
//! ```
//! Where gainguard enters the loop: `WidthScaledAdamW::new(&vs, &base_shapes, config)`, then
//! `opt.zero_grad(); loss.backward(); opt.step();` (see `gainguard_examples::train`, examples/common/src/train.rs).

use anyhow::Context;
use clap::Parser;
use gainguard::data::MarkovCorpus;
use gainguard::telemetry::{RunIdentity, Telemetry};
use gainguard::{Rule, Schedule};
use gainguard_examples::train;

#[derive(Parser)]
#[command(about = "Train the example LLaMA-style model with width-scaled AdamW")]
struct Args {
    /// Model width.
    #[arg(long, default_value_t = 128)]
    d_model: i64,
    /// Width of the proxy the (lr, wd) were tuned at.
    #[arg(long, default_value_t = 64)]
    base_d_model: i64,
    #[arg(long, default_value_t = 2)]
    layers: i64,
    #[arg(long, default_value_t = 100)]
    steps: u64,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.1)]
    wd: f64,
    /// paper, mup-coupled, mup-fixed-wd, standard, or gamma=G[,lr_exponent=E].
    #[arg(long, default_value = "paper")]
    rule: String,
    /// constant, cosine:WARMUP:TOTAL[:FLOOR] or wsd:WARMUP:DECAY:TOTAL[:FLOOR].
    #[arg(long, default_value = "constant")]
    schedule: String,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Serve Prometheus metrics from an embedded daemon on this address.
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// Send events to a standalone gainguardd instead (unix:PATH or tcp:127.0.0.1:PORT).
    #[arg(long, conflicts_with = "metrics")]
    gainguardd: Option<String>,
    #[arg(long, default_value = "example")]
    run: String,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let spec = train::RunSpec {
        name: a.run.clone(),
        d_model: a.d_model,
        base_d_model: a.base_d_model,
        layers: a.layers,
        steps: a.steps,
        lr: a.lr,
        wd: a.wd,
        rule: Rule::parse(&a.rule)?,
        schedule: Schedule::parse(&a.schedule).map_err(anyhow::Error::msg)?,
        device: gainguard::device::parse_device(&a.device).map_err(anyhow::Error::msg)?,
        ..Default::default()
    };
    let mut daemon = None;
    let sink = match (&a.metrics, &a.gainguardd) {
        (Some(addr), _) => {
            let d = gainguard::daemon::Daemon::spawn(gainguard::daemon::DaemonConfig { listen: *addr, ..Default::default() })
                .with_context(|| format!("starting the embedded daemon on {addr}"))?;
            eprintln!("metrics on http://{}/metrics", d.metrics_addr());
            let s = d.sink();
            daemon = Some(d);
            Some(s)
        }
        (None, Some(addr)) => Some(gainguard::protocol::Sink::connect(addr, Default::default())?),
        (None, None) => None,
    };
    let monitoring = train::Monitoring {
        telemetry: sink.map(|s| Telemetry::new(s, RunIdentity::local(&a.run))),
        alpha: 0.75,
        ..Default::default()
    };
    let corpus = MarkovCorpus::new(256, 4, 0);
    let r = train::train(&spec, &corpus, monitoring)?;
    println!("{}", r.table);
    println!(
        "loss: first {:.3}, last-10% mean {:.3}, entropy floor {:.3} nats; {} steps in {:.1}s",
        r.losses[0],
        r.final_loss,
        corpus.entropy_rate(),
        r.losses.len(),
        r.seconds
    );
    if let Some(d) = daemon {
        d.shutdown();
    }
    Ok(())
}

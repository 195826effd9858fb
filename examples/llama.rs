//! The example trainer: a small LLaMA-style model trained with gainguard's width-scaled AdamW, monitored live.
//! Model, optimizer and loop are all in this file; the model itself is examples/common/src/model.rs.
//!
//! ```text
//! cargo run --release --example llama -- --d-model 256 --base-d-model 64 --steps 200 --metrics 127.0.0.1:9464
//! ```

use anyhow::Context;
use clap::Parser;
use gainguard::data::MarkovCorpus;
use gainguard::sampler::SamplerConfig;
use gainguard::protocol::Sink;
use gainguard::{AdamWConfig, BaseShapes, Monitor, Override, ParamRole, Rule, Schedule, WidthScaledAdamW};
use gainguard_examples::model;
use tch::nn::VarStore;
use tch::{Device, Tensor};

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

const VOCAB: i64 = 256;
const BATCH: i64 = 16;
const SEQ_LEN: i64 = 64;

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let device = gainguard::device::parse_device(&a.device).map_err(anyhow::Error::msg)?;
    let config = |d_model| model::Config::new(VOCAB, d_model, a.base_d_model, a.layers, SEQ_LEN);

    // The model.
    tch::manual_seed(0);
    let vs = VarStore::new(device);
    let net = model::llama(vs.root(), &config(a.d_model));

    // The optimizer: each parameter's (lr, wd) from its width relative to the proxy's. The proxy's shapes
    // come with a delta model at twice its width, which says which dimensions are widths (mup's
    // `set_base_shapes(base, delta)`), so that a run at the proxy's own width decays its hidden matrices too.
    let (proxy, delta) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    let _ = model::llama(proxy.root(), &config(a.base_d_model));
    let _ = model::llama(delta.root(), &config(2 * a.base_d_model));
    let mut opt = WidthScaledAdamW::new(
        &vs,
        &BaseShapes::from_var_stores(&proxy, &delta),
        AdamWConfig {
            lr: a.lr,
            weight_decay: a.wd,
            rule: Rule::parse(&a.rule)?,
            schedule: Schedule::parse(&a.schedule).map_err(anyhow::Error::msg)?,
            max_grad_norm: Some(1.0),
            // Shapes cannot tell a `[vocab, d]` embedding from a `[vocab, d]` readout, so they are declared.
            overrides: vec![
                Override { role: Some(ParamRole::Embedding), ..Override::new("tok_emb.weight") },
                Override { role: Some(ParamRole::Readout), ..Override::new("lm_head.weight") },
            ],
            ..Default::default()
        },
    )?;
    println!("{}", opt.plan().to_table());

    // Monitoring: an embedded daemon, a standalone one, or nothing at all (a monitor that sends nowhere).
    let settings = Monitor::builder(&a.run)
        .planned_steps(a.steps)
        .sampler(SamplerConfig { interval: 10, budget_fraction: None, ..Default::default() });
    let mon = match (a.metrics, &a.gainguardd) {
        (Some(listen), _) => settings.listen(listen).embedded().context("--metrics")?,
        (None, Some(addr)) => settings.connect(addr).context("--gainguardd")?,
        (None, None) => settings.spectra(false).to_sink(Sink::disabled()),
    };
    if let Some(addr) = mon.metrics_addr() {
        eprintln!("metrics on http://{addr}/metrics");
    }
    let mut mon = mon.attach(&mut opt)?;

    // The loop.
    let corpus = MarkovCorpus::new(VOCAB as usize, 4, 0);
    let started = std::time::Instant::now();
    let mut losses = Vec::with_capacity(a.steps as usize);
    for step in 0..a.steps {
        let ids = Tensor::from_slice(&corpus.batch(step, BATCH as usize, SEQ_LEN as usize)).view([BATCH, SEQ_LEN]).to_device(device);
        opt.zero_grad();
        let loss = net.loss(&ids);
        loss.backward();
        let loss = loss.double_value(&[]);
        mon.step(&opt.step(), loss, (BATCH * SEQ_LEN) as u64);
        losses.push(loss);
    }
    mon.finish()?;

    let tail = &losses[losses.len() - (losses.len() / 10).max(1)..];
    println!(
        "loss: first {:.3}, last-10% mean {:.3}, entropy floor {:.3} nats; {} steps in {:.1}s",
        losses[0],
        tail.iter().sum::<f64>() / tail.len() as f64,
        corpus.entropy_rate(),
        losses.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

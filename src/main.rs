//! `make demo`: the main job. A proxy run at the base width, then a 4× wider target run that reuses
//! the proxy's (lr, wd) under the width-scaling rule. Prints the rule table and the loss curves.

#[path = "../examples/llama/model.rs"]
mod model;
#[path = "../examples/llama/train.rs"]
mod train;

use clap::Parser;
use gainguard::data::MarkovCorpus;
use gainguard::{Rule, Schedule};

#[derive(Parser)]
#[command(about = "gainguard demo: proxy run, then a 4x target run with the proxy's (lr, wd) transferred by the rule")]
struct Args {
    #[arg(long, default_value_t = 64)]
    proxy_width: i64,
    #[arg(long, default_value_t = 4)]
    multiplier: i64,
    #[arg(long, default_value_t = 300)]
    steps: u64,
    #[arg(long, default_value = "paper")]
    rule: String,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.1)]
    wd: f64,
    /// Where the report files go.
    #[arg(long, default_value = "out/demo")]
    out: std::path::PathBuf,
}

fn summary(name: &str, losses: &[f64]) -> String {
    let at = |f: f64| losses[((losses.len() - 1) as f64 * f) as usize];
    format!(
        "{name:<8} loss  start {:.3}  25% {:.3}  50% {:.3}  75% {:.3}  end(last 10% mean) {:.3}",
        at(0.0),
        at(0.25),
        at(0.5),
        at(0.75),
        train::tail_mean(losses)
    )
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    std::fs::create_dir_all(&a.out)?;
    let corpus = MarkovCorpus::new(256, 4, 0);
    let rule = Rule::parse(&a.rule)?;
    let proxy = train::RunSpec {
        name: "proxy".into(),
        d_model: a.proxy_width,
        base_d_model: a.proxy_width,
        layers: 2,
        vocab: 256,
        seq_len: 64,
        batch: 16,
        steps: a.steps,
        lr: a.lr,
        wd: a.wd,
        rule,
        schedule: Schedule::WarmupCosine { warmup: a.steps / 10, total: a.steps, floor: 0.1 },
        seed: 1,
        device: gainguard::device::parse_device("auto").map_err(anyhow::Error::msg)?,
        sample_every: 10,
    };
    let target = train::RunSpec { name: "target".into(), d_model: a.proxy_width * a.multiplier, ..proxy.clone() };

    println!("== proxy: d_model {} ==", proxy.d_model);
    let p = train::train(&proxy, &corpus, Default::default())?;
    proxy.base_shapes().write_json(&a.out.join("base_shapes.json"))?;
    println!("== target: d_model {} ({}x), (lr, wd) = ({}, {}) transferred by rule {} ==", target.d_model, a.multiplier, a.lr, a.wd, rule);
    let t = train::train(&target, &corpus, Default::default())?;
    println!("{}", t.table);
    println!("{}", summary("proxy", &p.losses));
    println!("{}", summary("target", &t.losses));
    println!("entropy floor of the corpus: {:.3} nats/token", corpus.entropy_rate());
    println!("\nper-layer sigma_max (float64 SVD of the final weights):");
    println!("{:<28} {:>10} {:>10} {:>8}", "parameter", "proxy", "target", "ratio");
    for (name, sp) in &p.sigma_max {
        let st = t.sigma_max.get(name).copied().unwrap_or(f64::NAN);
        println!("{name:<28} {sp:>10.4} {st:>10.4} {:>8.3}", st / sp);
    }
    Ok(())
}

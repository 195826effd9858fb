//! `make demo`: the main job. A proxy run at the base width, then a 4× wider target run that reuses
//! the proxy's (lr, wd) under the width-scaling rule. Prints the rule table and the loss curves.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use gainguard::daemon::{Daemon, DaemonConfig};
use gainguard::data::MarkovCorpus;
use gainguard::reference::ReferenceProfile;
use gainguard::telemetry::{RunIdentity, Telemetry};
use gainguard::{Rule, Schedule};
use gainguard_examples::plot;
use gainguard_examples::train::{self, RunResult, RunSpec};

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
    out: PathBuf,
    /// Where the embedded daemon serves /metrics during the target run (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics: std::net::SocketAddr,
}

/// One scrape of our own /metrics, to show what Prometheus will see.
fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
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
    let proxy = proxy_spec(&a, rule)?;
    let target = RunSpec { name: "target".into(), d_model: a.proxy_width * a.multiplier, ..proxy.clone() };
    let planned = format!("{} steps each, (lr, wd) = ({}, {}), rule {}", a.steps, a.lr, a.wd, rule);

    let (p, profile_path) = run_proxy(&a, &proxy, &corpus, &planned)?;
    let t = run_target(&a, &target, &corpus, &profile_path, &p)?;
    let sigma = SigmaTable::new(&p, &t);
    let header = format!(
        "# gainguard demo\n\n{planned}; proxy d_model {}, target d_model {}.\n\n{}\n{}\nentropy floor {:.3} nats/token\n\n",
        proxy.d_model,
        target.d_model,
        summary("proxy", &p.losses),
        summary("target", &t.losses),
        corpus.entropy_rate()
    );
    let (report, png) = write_report(&a.out, &header, &sigma)?;
    sigma.print();
    println!("\nreport: {} and {}", report.display(), png.display());
    Ok(())
}

/// The proxy: the base width, a warmup-cosine schedule over the planned steps, on the best device here;
/// the rest as [`RunSpec::default`] (2 layers, the corpus's 256 tokens, batches of 16 × 64).
fn proxy_spec(a: &Args, rule: Rule) -> anyhow::Result<RunSpec> {
    Ok(RunSpec {
        name: "proxy".into(),
        d_model: a.proxy_width,
        base_d_model: a.proxy_width,
        steps: a.steps,
        lr: a.lr,
        wd: a.wd,
        rule,
        schedule: Schedule::WarmupCosine { warmup: a.steps / 10, total: a.steps, floor: 0.1 },
        seed: 1,
        device: gainguard::device::parse_device("auto").map_err(anyhow::Error::msg)?,
        ..Default::default()
    })
}

/// Trains the proxy, recording its reference profile; writes the profile and the base shapes, and returns
/// the run with the profile's path.
fn run_proxy(a: &Args, proxy: &RunSpec, corpus: &MarkovCorpus, planned: &str) -> anyhow::Result<(RunResult, PathBuf)> {
    println!("== proxy: d_model {} ({planned}) ==", proxy.d_model);
    let monitoring = train::Monitoring { record_profile: true, alpha: 0.75, progress: true, ..Default::default() };
    let p = train::train(proxy, corpus, monitoring)?;
    let profile = p.profile.clone().context("the proxy run recorded no spectra")?;
    let profile_path = a.out.join("reference_profile.json");
    profile.write_json(&profile_path)?;
    proxy.base_shapes().write_json(&a.out.join("base_shapes.json"))?;
    println!("{}", summary("proxy", &p.losses));
    println!("wrote {} and base_shapes.json", profile_path.display());
    Ok((p, profile_path))
}

/// Trains the target with the proxy's (lr, wd) under the rule, monitored by an embedded daemon against
/// the proxy's profile; prints the rule table, both loss summaries and the exported gain ratios.
fn run_target(a: &Args, target: &RunSpec, corpus: &MarkovCorpus, profile_path: &Path, p: &RunResult) -> anyhow::Result<RunResult> {
    // The target run loads the profile back from disk, as a separate job would.
    let reference = Arc::new(ReferenceProfile::read_json(profile_path)?);
    let daemon = Daemon::spawn(DaemonConfig { listen: a.metrics, ..Default::default() })
        .with_context(|| format!("starting the embedded daemon on {} (use --metrics 127.0.0.1:0 for any free port)", a.metrics))?;
    println!(
        "\n== target: d_model {} ({}x), same (lr, wd) transferred by the rule; metrics on http://{}/metrics ==",
        target.d_model,
        a.multiplier,
        daemon.metrics_addr()
    );
    let monitoring = train::Monitoring {
        telemetry: Some(Telemetry::new(daemon.sink(), RunIdentity::local("demo-target"))),
        reference: Some(reference),
        alpha: 0.75,
        progress: true,
        ..Default::default()
    };
    let t = train::train(target, corpus, monitoring)?;
    println!("{}", t.table);
    println!("{}", summary("proxy", &p.losses));
    println!("{}", summary("target", &t.losses));
    println!("entropy floor of the corpus: {:.3} nats/token", corpus.entropy_rate());

    let metrics = scrape(daemon.metrics_addr())?;
    println!("\nexported gain ratios (sigma_target / sigma_reference at the same progress), as Prometheus scrapes them:");
    for l in metrics.lines().filter(|l| l.starts_with("gainguard_gain_ratio{")) {
        println!("  {l}");
    }
    daemon.shutdown();
    Ok(t)
}

/// Each hidden matrix's final sigma_max in the proxy and in the target (float64 SVD), in the proxy's order.
struct SigmaTable {
    names: Vec<String>,
    proxy: Vec<f64>,
    target: Vec<f64>,
}

impl SigmaTable {
    fn new(p: &RunResult, t: &RunResult) -> SigmaTable {
        let target_of = |name: &String| t.sigma_max.get(name).copied().unwrap_or(f64::NAN);
        SigmaTable {
            names: p.sigma_max.keys().cloned().collect(),
            proxy: p.sigma_max.values().copied().collect(),
            target: p.sigma_max.keys().map(target_of).collect(),
        }
    }

    fn rows(&self) -> impl Iterator<Item = (&String, f64, f64)> {
        self.names.iter().zip(&self.proxy).zip(&self.target).map(|((n, p), t)| (n, *p, *t))
    }

    fn markdown(&self) -> String {
        let mut text = String::from("| parameter | proxy sigma_max | target sigma_max | target / proxy |\n|---|---|---|---|\n");
        for (name, s_proxy, s_target) in self.rows() {
            text.push_str(&format!("| {name} | {s_proxy:.4} | {s_target:.4} | {:.3} |\n", s_target / s_proxy));
        }
        text
    }

    fn print(&self) {
        println!("\nper-layer sigma_max (float64 SVD of the final weights):");
        println!("{:<28} {:>10} {:>10} {:>8}", "parameter", "proxy", "target", "ratio");
        for (n, a_, b) in self.rows() {
            println!("{n:<28} {a_:>10.4} {b:>10.4} {:>8.3}", b / a_);
        }
    }
}

/// Writes `report.md` (`header`, then the per-layer sigma_max table and its figure); returns the paths
/// of the report and the figure.
fn write_report(out: &Path, header: &str, sigma: &SigmaTable) -> anyhow::Result<(PathBuf, PathBuf)> {
    let png = out.join("sigma_max_proxy_vs_target.png");
    plot::plot_sigma_proxy_vs_target(&png, &sigma.names, &sigma.proxy, &sigma.target)?;
    let figure = format!("\n![per-layer sigma_max]({})\n", png.file_name().unwrap().to_string_lossy());
    let report = out.join("report.md");
    std::fs::write(&report, format!("{header}{}{figure}", sigma.markdown()))?;
    Ok((report, png))
}

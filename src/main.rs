//! `make demo`: the main job, at steady state. A proxy run at the base width records its reference profile;
//! a 4× wider target reuses the proxy's (lr, wd) twice, under the paper's rule and under a wrong one
//! (`mup-fixed-wd`, weight decay not scaled with width), both monitored by one embedded daemon. Every run is
//! long enough for every hidden matrix to reach decay horizon `H = Σ lr_t·wd_t ≥ 5`: the gain ratio the
//! alert watches means something only at steady state (docs/runbook.md#gaindrift). The demo then prints,
//! with the alert's own band from the shipped rules, which parameters would fire GainDrift under each rule,
//! and draws them. The proxy is also run again at the targets' seed, against its own reference: what the
//! seed alone does to a gain ratio.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use gainguard::daemon::{Daemon, DaemonConfig};
use gainguard::data::MarkovCorpus;
use gainguard::reference::{ReferenceProfile, PROFILE_FORMAT};
use gainguard::steady_state::warmup_then_constant;
use gainguard::Rule;
use gainguard_examples::plot;
use gainguard_examples::train::{self, RunResult, RunSpec};

/// The shipped alert rules: the demo judges with the same band and horizon threshold Prometheus pages on.
const RULES: &str = include_str!("../dashboards/prometheus/gainguard.rules.yml");

#[derive(Parser)]
#[command(about = "gainguard demo: proxy run, then a 4x target under the paper rule and under mup-fixed-wd, at steady state, with the alert's verdict per parameter")]
struct Args {
    /// A multiple of 48, so that every width dimension scales by exactly the multiplier: heads are 16 wide
    /// and the SwiGLU hidden size is 8/3·d rounded up to a multiple of 8 (128 at 48, 512 at 192). At 32 it
    /// is 88 against 344 at 128, a ratio of 3.91 that the plan flags as `uneven_width_ratio`.
    #[arg(long, default_value_t = 48)]
    proxy_width: i64,
    #[arg(long, default_value_t = 4)]
    multiplier: i64,
    /// The proxy's tuned (lr, wd), transferred to the target by each rule.
    #[arg(long, default_value_t = 2e-2)]
    lr: f64,
    #[arg(long, default_value_t = 1.0)]
    wd: f64,
    /// Every hidden matrix of every run reaches this decay horizon.
    #[arg(long, default_value_t = 5.0)]
    horizon: f64,
    /// The target's rules: the one under test first, then the wrong one to compare with.
    #[arg(long, value_delimiter = ',', default_value = "paper,mup-fixed-wd")]
    rules: Vec<String>,
    /// Where the report files go.
    #[arg(long, default_value = "out/demo")]
    out: PathBuf,
    /// Where the embedded daemon serves /metrics during the target runs (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics: std::net::SocketAddr,
}

/// `expr: vector(X)` of the recording rule `name` in the shipped rules.
fn recorded_constant(name: &str) -> anyhow::Result<f64> {
    let mut lines = RULES.lines().skip_while(|l| l.trim() != format!("- record: {name}"));
    lines.next().with_context(|| format!("recording rule {name} not in the shipped rules"))?;
    let expr = lines.next().map(str::trim).unwrap_or("");
    expr.strip_prefix("expr: vector(")
        .and_then(|v| v.strip_suffix(')'))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("recording rule {name}: expected `expr: vector(NUMBER)`, found `{expr}`"))
}

/// The alert's judgement: GainDrift's band and the decay horizon below which it is silent.
struct Alert {
    lower: f64,
    upper: f64,
    severe_lower: f64,
    severe_upper: f64,
    min_horizon: f64,
}

impl Alert {
    fn shipped() -> anyhow::Result<Alert> {
        Ok(Alert {
            lower: recorded_constant("gainguard:gain_drift_band_lower")?,
            upper: recorded_constant("gainguard:gain_drift_band_upper")?,
            severe_lower: recorded_constant("gainguard:gain_drift_severe_band_lower")?,
            severe_upper: recorded_constant("gainguard:gain_drift_severe_band_upper")?,
            min_horizon: recorded_constant("gainguard:gain_drift_min_decay_horizon")?,
        })
    }

    fn verdict(&self, ratio: f64, horizon: f64) -> &'static str {
        if !ratio.is_finite() {
            "no data"
        } else if horizon < self.min_horizon {
            "silent (transient)"
        } else if ratio < self.severe_lower || ratio > self.severe_upper {
            "GainDriftSevere"
        } else if ratio < self.lower || ratio > self.upper {
            "GainDrift"
        } else {
            "-"
        }
    }
}

/// One hidden matrix in one target run: its decay horizon at the end and its gain ratio, the mean of
/// `sigma_target / sigma_reference` over the samples of the run's last 10%.
struct Gain {
    horizon: f64,
    ratio: f64,
}

/// A run compared with the reference: a target under one rule, or the proxy again at the targets' seed,
/// which shows how far the gain ratio moves with the seed alone.
struct TargetRun {
    label: String,
    rule: Rule,
    run: RunResult,
    gains: BTreeMap<String, Gain>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    // One libtorch thread for the trainer: the models are small, and the spectra worker has the other core.
    tch::set_num_threads(1);
    std::fs::create_dir_all(&a.out)?;
    let alert = Alert::shipped()?;
    // A second-order source: the next token depends on the one before the current one, so attention matters.
    let corpus = MarkovCorpus::with_order(64, 2, 4, 0);
    let rules = a.rules.iter().map(|r| Rule::parse(r)).collect::<Result<Vec<_>, _>>()?;
    let proxy = proxy_spec(&a)?;
    // One length for every run (the reference profile is keyed by progress): enough for every hidden
    // matrix of the slowest target to reach the horizon.
    let mut steps = proxy.steps_to_horizon(a.horizon)?;
    for &rule in &rules {
        steps = steps.max(target_spec(&proxy, &a, rule).steps_to_horizon(a.horizon)?);
    }
    let proxy = RunSpec { steps, sample_every: (steps / 80).max(1), ..proxy };
    let planned = format!(
        "{steps} steps each (constant lr after a 20-step warmup), proxy (lr, wd) = ({}, {}); every hidden matrix reaches decay horizon H ≥ {}",
        a.lr, a.wd, a.horizon
    );

    let (p, profile_path) = run_proxy(&a, &proxy, &corpus, &planned)?;
    let reference = Arc::new(ReferenceProfile::read_json(&profile_path)?);
    match reference.min_final_horizon() {
        Some((name, h)) if h < a.horizon => println!("warning: the reference is not at steady state: `{name}` ended at decay horizon {h:.2} < {}", a.horizon),
        Some((name, h)) => println!("the reference's smallest final decay horizon: {h:.2} (`{name}`)"),
        None => println!("the reference profile records no decay horizons (samples without them)"),
    }
    let daemon = Daemon::spawn(DaemonConfig { listen: a.metrics, ..Default::default() })
        .with_context(|| format!("starting the embedded daemon on {} (use --metrics 127.0.0.1:0 for any free port)", a.metrics))?;
    println!("\nmetrics of both target runs on http://{}/metrics", daemon.metrics_addr());
    let mut targets = Vec::new();
    for &rule in &rules {
        let spec = RunSpec { steps, sample_every: proxy.sample_every, ..target_spec(&proxy, &a, rule) };
        targets.push(run_target(rule.preset.name(), &spec, &corpus, &daemon, &reference)?);
    }
    let again = RunSpec { name: "demo-proxy-seed-2".into(), seed: 2, ..proxy.clone() };
    targets.push(run_target("proxy, seed 2 (seed noise)", &again, &corpus, &daemon, &reference)?);
    let exported = scrape(daemon.metrics_addr())?;
    daemon.shutdown();

    let names: Vec<String> = p.sigma_max.keys().cloned().collect();
    let verdicts = verdict_table(&alert, &names, &targets);
    print_exported(&exported);
    println!("{verdicts}");
    let png = a.out.join("gain_ratio_by_param.png");
    plot_verdicts(&png, &alert, &names, &targets, a.multiplier)?;
    let report = a.out.join("report.md");
    std::fs::write(&report, report_text(&a, &planned, &proxy, &p, &targets, &corpus, &verdicts, &png))?;
    println!("report: {} and {}", report.display(), png.display());
    Ok(())
}

/// The proxy: the base width, 2 layers, 16 × 32 tokens of the second-order source (vocab 64), Adam beta2
/// 0.95, constant lr after a warmup, on the best device here.
fn proxy_spec(a: &Args) -> anyhow::Result<RunSpec> {
    Ok(RunSpec {
        name: "demo-proxy".into(),
        d_model: a.proxy_width,
        base_d_model: a.proxy_width,
        vocab: 64,
        seq_len: 32,
        batch: 16,
        lr: a.lr,
        wd: a.wd,
        rule: Rule::default(),
        schedule: warmup_then_constant(20),
        seed: 1,
        beta2: 0.95,
        device: gainguard::device::parse_device("auto").map_err(anyhow::Error::msg)?,
        ..Default::default()
    })
}

fn target_spec(proxy: &RunSpec, a: &Args, rule: Rule) -> RunSpec {
    RunSpec { name: format!("demo-target-{}", rule.preset), d_model: a.proxy_width * a.multiplier, rule, seed: 2, ..proxy.clone() }
}

/// Trains the proxy, recording its reference profile; writes the profile and the base shapes.
fn run_proxy(a: &Args, proxy: &RunSpec, corpus: &MarkovCorpus, planned: &str) -> anyhow::Result<(RunResult, PathBuf)> {
    println!("== proxy: d_model {} ({planned}) ==", proxy.d_model);
    let monitoring = train::Monitoring { record_profile: true, alpha: 0.75, progress: true, ..Default::default() };
    let p = train::train(proxy, corpus, monitoring)?;
    let profile = p.profile.clone().context("the proxy run recorded no spectra")?;
    let profile_path = a.out.join("reference_profile.json");
    profile.write_json(&profile_path)?;
    proxy.base_shapes().write_json(&a.out.join("base_shapes.json"))?;
    println!("loss {:.3} (mean of the last 10%), entropy floor {:.3}; wrote {} ({PROFILE_FORMAT})", p.final_loss, corpus.entropy_rate(), profile_path.display());
    Ok((p, profile_path))
}

/// Trains one target with the proxy's (lr, wd) under `spec.rule`, reporting to the daemon against the
/// reference, and reads each hidden matrix's gain ratio over the last 10% of the run.
fn run_target(label: &str, spec: &RunSpec, corpus: &MarkovCorpus, daemon: &Daemon, reference: &Arc<ReferenceProfile>) -> anyhow::Result<TargetRun> {
    println!("\n== {}: d_model {}, rule {}, the proxy's (lr, wd), seed {} ==", spec.name, spec.d_model, spec.rule, spec.seed);
    let monitoring = train::Monitoring {
        sink: Some(daemon.sink()),
        reference: Some(reference.clone()),
        record_profile: true,
        alpha: 0.75,
        progress: true,
    };
    let run = train::train(spec, corpus, monitoring)?;
    println!("{}", run.table);
    let own = run.profile.as_ref().context("the target recorded no spectra")?;
    let samples: usize = own.params.values().map(|p| p.points.len()).sum();
    let late: usize = own.params.values().map(|p| p.points.iter().filter(|q| q.0 >= 0.9).count()).sum();
    println!("loss {:.3} (mean of the last 10%); {samples} spectrum samples, {late} of them in the last 10%", run.final_loss);
    let horizons = final_horizons(spec)?;
    let gains = own
        .params
        .iter()
        .map(|(name, prof)| {
            let late: Vec<f64> = prof
                .points
                .iter()
                .filter(|(progress, _)| *progress >= 0.9)
                .filter_map(|(progress, sigma)| reference.sigma_at(name, *progress).map(|r| sigma / r))
                .collect();
            // A worker that fell behind (a busy machine) may have dropped the late samples: then the final
            // weights' float64 SVD against the reference's last point.
            let ratio = if late.is_empty() {
                run.sigma_max.get(name).zip(reference.sigma_at(name, 1.0)).map_or(f64::NAN, |(s, r)| s / r)
            } else {
                late.iter().sum::<f64>() / late.len() as f64
            };
            (name.clone(), Gain { horizon: horizons.get(name).copied().unwrap_or(f64::NAN), ratio })
        })
        .collect();
    Ok(TargetRun { label: label.into(), rule: spec.rule, run, gains })
}

/// Each hidden matrix's decay horizon after the run, from the plan's width-scaled lr and wd and the schedule.
fn final_horizons(spec: &RunSpec) -> anyhow::Result<BTreeMap<String, f64>> {
    Ok(spec.matrix_horizon_rates()?.into_iter().map(|(name, rate)| (name, rate.after(&spec.schedule, spec.steps))).collect())
}

/// One scrape of our own /metrics, to show what Prometheus sees.
fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

fn print_exported(metrics: &str) {
    println!("\nas Prometheus scrapes them (gain ratio and decay horizon of each hidden matrix, latest sample):");
    for l in metrics.lines().filter(|l| {
        (l.starts_with("gainguard_gain_ratio{") || l.starts_with("gainguard_decay_horizon{")) && l.contains("matrix_like")
    }) {
        println!("  {l}");
    }
}

fn short(name: &str) -> String {
    name.trim_end_matches(".weight").replace("blocks.", "b")
}

/// Per parameter and rule: H, the gain ratio and what the alert would do; then a line per rule.
fn verdict_table(alert: &Alert, names: &[String], targets: &[TargetRun]) -> String {
    let mut s = format!(
        "\nGainDrift per hidden matrix: gain ratio = sigma_target / sigma_reference (mean over the last 10% of the run), H = decay horizon at the end.\n\
         The alert's own band (dashboards/prometheus/gainguard.rules.yml): GainDrift outside [{}, {}], GainDriftSevere outside [{}, {}], silent while H < {}.\n\n{:<14}",
        alert.lower, alert.upper, alert.severe_lower, alert.severe_upper, alert.min_horizon, "parameter"
    );
    for t in targets {
        s.push_str(&format!(" | {:>6} {:>7} {:<16}", "H", "ratio", t.label));
    }
    s.push('\n');
    for name in names {
        s.push_str(&format!("{:<14}", short(name)));
        for t in targets {
            match t.gains.get(name) {
                Some(g) => s.push_str(&format!(" | {:>6.2} {:>7.3} {:<16}", g.horizon, g.ratio, alert.verdict(g.ratio, g.horizon))),
                None => s.push_str(&format!(" | {:>6} {:>7} {:<16}", "-", "-", "no data")),
            }
        }
        s.push('\n');
    }
    for t in targets {
        let firing: Vec<String> = names
            .iter()
            .filter_map(|n| t.gains.get(n).filter(|g| alert.verdict(g.ratio, g.horizon).starts_with("GainDrift")).map(|g| format!("{} ({:.2})", short(n), g.ratio)))
            .collect();
        s.push_str(&format!(
            "\n{}: {} of {} hidden matrices would fire GainDrift{}",
            t.label,
            firing.len(),
            names.len(),
            if firing.is_empty() { String::new() } else { format!(": {}", firing.join(", ")) }
        ));
    }
    s.push('\n');
    s
}

fn plot_verdicts(path: &Path, alert: &Alert, names: &[String], targets: &[TargetRun], multiplier: i64) -> anyhow::Result<()> {
    let series: Vec<(String, Vec<f64>)> = targets
        .iter()
        .map(|t| (t.label.clone(), names.iter().map(|n| t.gains.get(n).map_or(f64::NAN, |g| g.ratio)).collect()))
        .collect();
    let short_names: Vec<String> = names.iter().map(|n| short(n)).collect();
    let title = format!("{multiplier}x target vs proxy reference at steady state, one series per rule (and the proxy at another seed)");
    plot::plot_gain_ratio_by_param(path, &title, &short_names, &series, (alert.lower, alert.upper))
}

#[allow(clippy::too_many_arguments)]
fn report_text(a: &Args, planned: &str, proxy: &RunSpec, p: &RunResult, targets: &[TargetRun], corpus: &MarkovCorpus, verdicts: &str, png: &Path) -> String {
    let mut text = format!(
        "# gainguard demo\n\nProxy d_model {}, target d_model {} ({}×); {planned}.\nData: second-order Markov source (vocab 64), entropy floor {:.3} nats/token.\n\n",
        proxy.d_model,
        proxy.d_model * a.multiplier,
        a.multiplier,
        corpus.entropy_rate()
    );
    text.push_str(&format!("| run | rule | loss (last 10%) |\n|---|---|---|\n| proxy (reference) | {} | {:.3} |\n", proxy.rule, p.final_loss));
    for t in targets {
        text.push_str(&format!("| {} | {} | {:.3} |\n", t.label, t.rule, t.run.final_loss));
    }
    text.push_str(&format!("\n```text\n{verdicts}```\n\n![gain ratio per hidden matrix]({})\n", png.file_name().unwrap().to_string_lossy()));
    text
}

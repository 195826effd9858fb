//! End to end, on loopback: trainers → embedded daemon → real Prometheus (gainguard's rules, short
//! `for:` in this test's copy only) → real Alertmanager → a webhook, at steady state: every run is long enough
//! for every hidden matrix to reach decay horizon H ≥ 5, so the gain-drift alerts (silent below H = 3) judge
//! steady states, not transients.
//!
//! - A run whose weight decay is mis-scaled (wd × 10) pages, and the page names the run and the parameter.
//! - A 4× wider target under the paper rule, judged against the proxy's reference profile, is what the rule
//!   is for. On this toy model it does not stay silent everywhere: the demo (`make demo`, 48 -> 192,
//!   docs/experiments/demo) measured 4 of its 14 hidden matrices outside [0.8, 1.25] (the layer-0 MLP gate at
//!   2.09, the layer-1 attention output at 1.74 and value at 1.27, the layer-0 MLP down at 0.68), while the
//!   proxy itself at another seed puts 1 of 14 outside (that MLP down, 0.67) by seed noise alone. So this test
//!   prints every matrix's ratio and H and asserts what does hold: every matrix reached the horizon, most (at
//!   least 9 of 14) sit inside the band, and the paper target is far closer to its reference than the
//!   mis-scaled run.

use std::sync::Arc;
use std::time::Duration;

use gainguard::daemon::{Daemon, DaemonConfig, NvmlSettings, SourceSettings};
use gainguard::data::MarkovCorpus;
use gainguard::steady_state::warmup_then_constant;
use gainguard::Rule;
use gainguard_examples::train;
use gainguard_test_support::{promql, wait_until, workspace_root, Alertmanager, Prometheus, PrometheusConfig, Webhook};

/// This test's copy of the rules: minutes become seconds so the test takes one minute, not twenty.
fn fast_rules(rules: String) -> String {
    rules
        .replace("for: 10m", "for: 3s")
        .replace("for: 5m", "for: 3s")
        .replace("avg_over_time(gainguard_gain_ratio{class=\"matrix_like\"}[5m])", "avg_over_time(gainguard_gain_ratio{class=\"matrix_like\"}[10s])")
}

const PROXY: i64 = 32;
const TARGET: i64 = 128;
const HORIZON: f64 = 5.0;

/// The demo's recipe: 2 layers, 16 × 32 tokens of a second-order source (vocab 64), (lr, wd) = (0.02, 1) with
/// Adam beta2 0.95, constant lr after 20 warmup steps.
fn spec(name: &str, d_model: i64, wd: f64, seed: u64) -> train::RunSpec {
    train::RunSpec {
        name: name.into(),
        d_model,
        base_d_model: PROXY,
        vocab: 64,
        seq_len: 32,
        batch: 16,
        lr: 2e-2,
        wd,
        rule: Rule::default(),
        schedule: warmup_then_constant(20),
        seed,
        beta2: 0.95,
        ..Default::default()
    }
}

fn is_gain_drift(labels: &serde_json::Value) -> bool {
    labels["alertname"].as_str().is_some_and(|a| a.starts_with("GainDrift"))
}

/// Every panel of every dashboard, evaluated through Prometheus's HTTP API after the real runs: each
/// non-GPU panel returns data; GPU panels (no GPU here) only have to parse.
fn every_dashboard_panel_returns_data(prom: &Prometheus) {
    let mut vars = promql::default_variables();
    vars.insert("__rate_interval".into(), "10s".into());
    vars.insert("__interval".into(), "1s".into());
    vars.insert("__range".into(), "5m".into());
    let queries = promql::concrete_panel_queries(&promql::grafana_dir(), &vars).unwrap();
    assert!(queries.len() > 20, "the dashboards have panels ({})", queries.len());
    let results = promql::evaluate_all(prom.addr, &queries).unwrap();
    let empty: Vec<String> = queries
        .iter()
        .zip(&results)
        .filter(|(q, r)| r.series == 0 && !(q.dashboard.contains("gpu") || q.expr.contains("gainguard_gpu_") || q.expr.contains("nvml")))
        .map(|(q, _)| format!("{} / {}: {}", q.dashboard, q.panel, q.expr))
        .collect();
    assert!(empty.is_empty(), "panels without data after a real run:\n{}", empty.join("\n"));
}

#[test]
fn at_steady_state_a_mis_scaled_weight_decay_pages_and_a_4x_paper_target_stays_mostly_in_band() {
    tch::set_num_threads(1);
    let webhook = Webhook::start();
    let am = Alertmanager::start(webhook.addr);
    let daemon = Daemon::spawn(DaemonConfig { listen: "127.0.0.1:0".parse().unwrap(), sources: SourceSettings { nvml: NvmlSettings::off() }, ..Default::default() }).unwrap();
    let rules = std::fs::read_to_string(workspace_root().join("dashboards/prometheus/gainguard.rules.yml")).unwrap();
    let prom = Prometheus::with_config(PrometheusConfig {
        targets: vec![daemon.metrics_addr()],
        rules: Some(fast_rules(rules)),
        alertmanager: Some(am.addr),
        ..Default::default()
    });

    let corpus = MarkovCorpus::with_order(64, 2, 4, 0);
    let base_wd = 1.0;
    // One length for every run (the profile is keyed by progress): the 4x target's hidden matrices reach the horizon.
    let steps = spec("target", TARGET, base_wd, 0).steps_to_horizon(HORIZON).unwrap();
    let with_steps = |s: train::RunSpec| train::RunSpec { steps, sample_every: 10, ..s };
    // The proxy records its reference profile.
    let proxy = train::train(&with_steps(spec("proxy", PROXY, base_wd, 3)), &corpus, train::Monitoring { record_profile: true, alpha: 0.75, ..Default::default() }).unwrap();
    let profile = Arc::new(proxy.profile.expect("the proxy recorded a profile"));
    assert!(!profile.params.is_empty());

    for (run, width, wd) in [("target-paper-4x", TARGET, base_wd), ("target-wd10", PROXY, base_wd * 10.0)] {
        let monitoring = train::Monitoring {
            sink: Some(daemon.sink()),
            reference: Some(profile.clone()),
            alpha: 0.75,
            ..Default::default()
        };
        train::train(&with_steps(spec(run, width, wd, 4)), &corpus, monitoring).unwrap();
    }

    // The mis-scaled run pages, with its run and param labels.
    let fired = wait_until(Duration::from_secs(90), "a GainDrift alert for target-wd10 at the webhook", || {
        webhook.alerts().into_iter().find(|(l, status)| is_gain_drift(l) && l["run"] == "target-wd10" && status == "firing")
    });
    let param = fired.0["param"].as_str().unwrap_or("");
    assert!(param.starts_with("blocks."), "the page names a hidden parameter: {}", fired.0);
    let wd10 = prom.query("gainguard_gain_ratio{run=\"target-wd10\", class=\"matrix_like\"}");
    assert!(wd10.iter().any(|(_, v)| *v < 0.8 || *v > 1.25), "the mis-scaled run's gain ratios are out of band: {wd10:?}");

    // The 4x target under the paper rule, at steady state: what it shows, then what holds.
    let ratios = prom.query("gainguard_gain_ratio{run=\"target-paper-4x\", class=\"matrix_like\"}");
    let horizons = prom.query("gainguard_decay_horizon{run=\"target-paper-4x\", class=\"matrix_like\"}");
    let paged: Vec<String> = webhook
        .alerts()
        .into_iter()
        .filter(|(l, _)| is_gain_drift(l) && l["run"] == "target-paper-4x")
        .map(|(l, status)| format!("{} {} ({status})", l["alertname"], l["param"]))
        .collect();
    let h_of = |param: &serde_json::Value| horizons.iter().find(|(l, _)| l["param"] == *param).map_or(f64::NAN, |(_, h)| *h);
    eprintln!("target-paper-4x at steady state ({steps} steps): gain ratio and decay horizon per hidden matrix");
    for (labels, v) in &ratios {
        eprintln!("  {:<28} ratio {v:.3}  H {:.2}{}", labels["param"], h_of(&labels["param"]), if (0.8..=1.25).contains(v) { "" } else { "  outside the band" });
    }
    eprintln!("  pages: {paged:?}");
    assert_eq!(ratios.len(), profile.params.len(), "every hidden matrix exported a gain ratio: {ratios:?}");
    for (labels, _) in &ratios {
        assert!(h_of(&labels["param"]) >= 3.0, "{} judged before its decay horizon reached 3: {horizons:?}", labels["param"]);
    }
    let inside = ratios.iter().filter(|(_, v)| (0.8..=1.25).contains(v)).count();
    assert!(inside >= 9, "only {inside} of {} matrices of the paper target inside the band", ratios.len());
    let median_log = |rs: &[(serde_json::Value, f64)]| {
        let mut v: Vec<f64> = rs.iter().map(|(_, r)| r.ln().abs()).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    assert!(
        median_log(&ratios) < 0.5 * median_log(&wd10),
        "the paper target's median |ln ratio| {:.3} is not well below the mis-scaled run's {:.3}",
        median_log(&ratios),
        median_log(&wd10)
    );

    every_dashboard_panel_returns_data(&prom);
    daemon.shutdown();
}

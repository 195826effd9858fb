//! gainguardd's live page in a real browser: headless Chromium (Debian package `chromium`, installed by
//! scripts/setup-services.sh) loads `/` of an embedded daemon fed by short real training runs, and the
//! rendered DOM is checked: the run's name, one chart per kind with non-empty series, a matrix outside
//! GainDrift's band marked (and one below the horizon gate greyed). A second test feeds a run whose loss
//! series stays empty and shows that the same check fails on it.
//!
//! The runs: a proxy (width 32) records its sigma_max profile; against it, a run with weight decay x10 (its
//! hidden matrices reach decay horizon H >= 3 and leave the band) and a run at the proxy's own recipe (its
//! matrices stay below H = 3, so the page greys them and does not judge them). NVML is off: the GPU view
//! says so.
//!
//! Screenshots of every view are written under target/live_page/; with GAINGUARD_UPDATE_SCREENSHOTS=1 they
//! are copied to docs/screenshots/ (the README shows them).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use gainguard::data::MarkovCorpus;
use gainguard::steady_state::warmup_then_constant;
use gainguard::Rule;
use gainguard_daemon::events::{Envelope, Event, Hello, StepEvent};
use gainguard_daemon::{Daemon, DaemonConfig, HistorySettings, NvmlSettings, SourceSettings};
use gainguard_examples::train;
use gainguard_test_support::{http_get, required, wait_until};

/// The trained runs report as this machine (the monitor names its host); the failing twin uses it too.
fn host() -> String {
    gainguard::identity::hostname()
}

/// This checkout's root (this test's own package), where the screenshots go.
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chromium() -> PathBuf {
    required("GAINGUARD_CHROMIUM", "/usr/bin/chromium", "chromium")
}

fn daemon() -> Daemon {
    Daemon::spawn(DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        sources: SourceSettings { nvml: NvmlSettings::off() },
        // Short runs: one point per 0.1 s so that each series has several.
        history: HistorySettings { interval: Duration::from_millis(100), retention: Duration::from_secs(600), max_bytes: 64 << 20 },
        ..Default::default()
    })
    .unwrap()
}

/// Chromium's flags for a test: headless, no network of its own, a fresh profile.
fn browser(profile: &Path) -> Command {
    let mut c = Command::new(chromium());
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--virtual-time-budget=8000",
    ]);
    c.arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// A fresh, empty browser profile directory, removed when dropped.
struct Profile(PathBuf);

impl Profile {
    fn new() -> Profile {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("gainguard-live-page-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Profile(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The DOM of `url` after the page's scripts ran.
fn dump_dom(url: &str) -> String {
    let profile = Profile::new();
    let out = browser(profile.path()).arg("--dump-dom").arg(url).output().expect("chromium starts");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && dom.contains("</html>"), "chromium --dump-dom {url} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    dom
}

/// A PNG of `url` at a laptop's 1440 x 900.
fn screenshot(url: &str, file: &Path) {
    let profile = Profile::new();
    let out = browser(profile.path())
        .arg("--window-size=1440,900")
        .arg(format!("--screenshot={}", file.display()))
        .arg(url)
        .output()
        .expect("chromium starts");
    let png = std::fs::read(file).unwrap_or_default();
    assert!(
        out.status.success() && png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "chromium --screenshot {url}: {} ({} bytes): {}",
        out.status,
        png.len(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The start tags named `tag` in `html`, as attribute maps (values as the serializer escaped them).
fn tags(html: &str, tag: &str) -> Vec<HashMap<String, String>> {
    let open = format!("<{tag} ");
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let end = after.find('>').unwrap_or(after.len());
        let mut attrs = HashMap::new();
        let mut s = &after[..end];
        while let Some(eq) = s.find("=\"") {
            let name = s[..eq].trim().to_string();
            let v = &s[eq + 2..];
            let close = v.find('"').unwrap_or(v.len());
            attrs.insert(name, v[..close].to_string());
            s = &v[(close + 1).min(v.len())..];
        }
        out.push(attrs);
        rest = &after[end..];
    }
    out
}

/// The chart kinds of every view (the GPU view's charts exist only when NVML answers).
const KINDS: [&str; 6] = ["loss", "tokens_per_second", "dropped", "gain_ratio", "sigma_max", "decay_horizon"];

/// What the page must show of `run`: its name, every chart kind once with a series and points, and (when
/// `outside` is set) a matrix outside the band marked, in the table and on the gain chart.
fn check_page(dom: &str, run: &str, outside: bool) -> Result<(), String> {
    let titles = tags(dom, "h2");
    if !titles.iter().any(|a| a.get("id").map(String::as_str) == Some("run-title") && a.get("data-run").map(String::as_str) == Some(run)) {
        return Err(format!("the page does not name run `{run}`"));
    }
    let figures = tags(dom, "figure");
    for kind in KINDS {
        let charts: Vec<_> = figures.iter().filter(|a| a.get("data-kind").map(String::as_str) == Some(kind)).collect();
        if charts.len() != 1 {
            return Err(format!("{} charts of kind `{kind}`, expected 1", charts.len()));
        }
        let n = |k: &str| charts[0].get(k).and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
        if n("data-series") == 0 || n("data-points") == 0 {
            return Err(format!("the `{kind}` chart has {} series and {} points, expected some", n("data-series"), n("data-points")));
        }
    }
    let paths = tags(dom, "path");
    if paths.iter().filter(|a| a.get("class").is_some_and(|c| c.starts_with("line"))).count() < KINDS.len() {
        return Err("fewer drawn lines than charts".into());
    }
    if outside {
        let rows = tags(dom, "tr");
        let marked: Vec<_> =
            rows.iter().filter(|a| matches!(a.get("data-status").map(String::as_str), Some("outside" | "severe"))).collect();
        if marked.is_empty() {
            return Err("no matrix is marked outside the band in the table".into());
        }
        if !marked.iter().all(|a| a.get("class").is_some_and(|c| c.contains("status-outside") || c.contains("status-severe"))) {
            return Err("a matrix outside the band is not styled as such".into());
        }
        let on_chart = paths.iter().filter(|a| a.get("class").is_some_and(|c| c.contains("outside"))).count();
        if on_chart == 0 {
            return Err("no gain-ratio line is drawn as outside the band".into());
        }
    }
    Ok(())
}

fn spec(name: &str, wd: f64, steps: u64) -> train::RunSpec {
    train::RunSpec {
        name: name.into(),
        d_model: 32,
        base_d_model: 32,
        vocab: 64,
        seq_len: 32,
        batch: 16,
        lr: 2e-2,
        wd,
        rule: Rule::default(),
        schedule: warmup_then_constant(10),
        seed: 0,
        beta2: 0.95,
        steps,
        sample_every: 2,
        ..Default::default()
    }
}

fn url(daemon: &Daemon, view: &str, run: &str) -> String {
    format!("http://{}/#view={view}&run={run}&rank=0&host={}", daemon.metrics_addr(), host())
}

#[test]
fn the_live_page_in_chromium_shows_a_real_runs_charts_and_marks_the_matrix_outside_the_band() {
    chromium();
    tch::set_num_threads(1);
    let daemon = daemon();
    let corpus = MarkovCorpus::with_order(64, 2, 4, 0);
    // Long enough for the wd x10 run's hidden matrices to pass H = 3 (the proxy's stay below it).
    let steps = spec("x", 10.0, 0).steps_to_horizon(4.0).unwrap().max(60);
    let proxy = train::train(
        &spec("proxy", 1.0, steps),
        &corpus,
        train::Monitoring { record_profile: true, alpha: 0.75, sink: Some(daemon.sink()), ..Default::default() },
    )
    .unwrap();
    let profile = Arc::new(proxy.profile.expect("the proxy recorded a profile"));
    for (run, wd) in [("target-wd10", 10.0), ("target-same", 1.0)] {
        let monitoring = train::Monitoring {
            sink: Some(daemon.sink()),
            reference: Some(profile.clone()),
            alpha: 0.75,
            ..Default::default()
        };
        train::train(&spec(run, wd, steps), &corpus, monitoring).unwrap();
    }
    let addr = daemon.metrics_addr();
    let run_json = |run: &str| {
        let (status, body) = http_get(addr, &format!("/api/v1/run?run={run}&rank=0&host={}", host())).unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    wait_until(Duration::from_secs(10), "the last runs' spectra in the history", || {
        let v = run_json("target-same");
        v["params"].as_array().is_some_and(|p| p.iter().any(|p| p["class"] == "matrix_like" && p["gain_ratio"].as_array().is_some_and(|g| !g.is_empty())))
            .then_some(())
    });

    // What the API says, which the page must show.
    let wd10 = run_json("target-wd10");
    let statuses = |v: &serde_json::Value| -> Vec<String> {
        v["params"].as_array().unwrap().iter().filter(|p| p["class"] == "matrix_like").map(|p| p["status"].as_str().unwrap().to_string()).collect()
    };
    eprintln!("target-wd10 matrices: {:?}", statuses(&wd10));
    eprintln!("target-same matrices: {:?}", statuses(&run_json("target-same")));
    assert!(statuses(&wd10).iter().any(|s| s == "outside" || s == "severe"), "the wd x10 run has a matrix outside the band: {wd10}");
    assert!(statuses(&run_json("target-same")).iter().all(|s| s == "gated"), "the proxy recipe's matrices stay below H = 3");

    let dom = dump_dom(&url(&daemon, "matrices", "target-wd10"));
    check_page(&dom, "target-wd10", true).unwrap_or_else(|e| panic!("{e}\n--- DOM ---\n{dom}"));
    // Below the gate the lines are drawn greyed.
    let same = dump_dom(&url(&daemon, "matrices", "target-same"));
    check_page(&same, "target-same", false).unwrap_or_else(|e| panic!("{e}\n--- DOM ---\n{same}"));
    assert!(tags(&same, "path").iter().any(|a| a.get("class").is_some_and(|c| c.contains("gated"))), "no greyed line below H = 3");
    assert!(tags(&same, "tr").iter().any(|a| a.get("data-status").map(String::as_str) == Some("gated")));
    // Every run is listed, and the alert list was rendered (pending GainDrift for the wd x10 run: its `for:`
    // of 10 minutes has not passed).
    for run in ["proxy", "target-wd10", "target-same"] {
        assert!(tags(&dom, "a").iter().any(|a| a.get("data-run").map(String::as_str) == Some(run)), "run {run} not listed");
    }
    let alerts = tags(&dom, "li");
    assert!(
        alerts.iter().any(|a| a.get("data-alert").is_some_and(|n| n.starts_with("GainDrift")) && a.get("data-state").map(String::as_str) == Some("pending")),
        "no pending GainDrift alert on the page"
    );

    let shots = workspace_root().join("target/live_page");
    std::fs::create_dir_all(&shots).unwrap();
    for view in ["training", "matrices", "gpus"] {
        let file = shots.join(format!("live-page-{view}.png"));
        screenshot(&url(&daemon, view, "target-wd10"), &file);
        if std::env::var("GAINGUARD_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
            let docs = workspace_root().join("docs/screenshots");
            std::fs::create_dir_all(&docs).unwrap();
            std::fs::copy(&file, docs.join(file.file_name().unwrap())).unwrap();
        }
    }
    daemon.shutdown();
}

#[test]
fn the_page_check_fails_on_a_run_whose_loss_series_is_empty() {
    chromium();
    let daemon = daemon();
    let sink = daemon.sink();
    let hello = Hello { pid: std::process::id(), planned_steps: Some(10), rule: "paper".into(), gamma: None, alpha: None, reference: None };
    sink.send(Envelope::new("no-loss", 0, host().as_str(), 0, Event::Hello(hello)));
    for step in 1..=10u64 {
        // Steps that report tokens but never a loss.
        let s = StepEvent { tokens: 512, duration_seconds: Some(0.05), timestamp_seconds: gainguard_daemon::events::unix_now(), ..Default::default() };
        sink.send(Envelope::new("no-loss", 0, host().as_str(), step, Event::Step(s)));
        std::thread::sleep(Duration::from_millis(120));
    }
    let addr = daemon.metrics_addr();
    wait_until(Duration::from_secs(5), "the run in the history", || {
        let (_, body) = http_get(addr, &format!("/api/v1/run?run=no-loss&rank=0&host={}", host())).ok()?;
        body.contains("tokens_per_second").then_some(())
    });
    let dom = dump_dom(&url(&daemon, "training", "no-loss"));
    let err = check_page(&dom, "no-loss", false).expect_err("the check passes a page whose loss chart is empty");
    assert!(err.contains("`loss` chart has 0 series"), "{err}");
    // The page itself says so rather than drawing an empty frame.
    assert!(dom.contains("no data yet"));
    daemon.shutdown();
}

//! The monitoring assets under `dashboards/` hold together: the rules pass promtool and their unit tests, every
//! alert is documented and tested both ways, and every dashboard panel has a unit, a query that parses, and
//! only metric names the daemon exports (or the rules record).
//!
//! The dashboards also satisfy Grafana's own types (`@grafana/schema`, with TypeScript's compiler), every unit
//! is one of Grafana's unit ids (`@grafana/data`) and every query goes to the `datasource` variable: see
//! `dashboards/typecheck.sh`, which these tests run on the real dashboards and on broken copies.
//!
//! promtool comes from PATH or `$PROMTOOL` and the real Prometheus from PATH or `$PROMETHEUS` (Debian package
//! `prometheus`); the type check needs Node.js 20 with npm and the npm registry on its first run. A missing
//! tool fails the test that needs it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gainguard_test_support::{promql, required, Prometheus, PrometheusConfig};
use serde_json::Value;

fn root() -> PathBuf {
    gainguard_test_support::workspace_root()
}

fn rules_file() -> PathBuf {
    root().join("dashboards/prometheus/gainguard.rules.yml")
}

fn rules_test_file() -> PathBuf {
    root().join("dashboards/prometheus/gainguard.rules.test.yml")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn promtool() -> String {
    std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_string())
}

/// Runs promtool and fails the test with its whole output unless it succeeds.
fn run_promtool(args: &[&str]) {
    let out = Command::new(promtool())
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{} {}`: {e} (install the Debian package `prometheus` or set PROMTOOL)",
                promtool(),
                args.join(" ")
            )
        });
    assert!(
        out.status.success(),
        "`promtool {}` failed ({}):\n{}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------------------------------------------------- rules, as text
//
// No YAML crate is available to the root package's tests, and promtool already validates the YAML; these
// helpers only read the few fields the checks below need from the file as written.

/// One alerting rule: its name and the lines of its block.
struct AlertBlock {
    name: String,
    text: String,
}

fn alert_blocks(rules: &str) -> Vec<AlertBlock> {
    let mut blocks: Vec<AlertBlock> = Vec::new();
    let mut current: Option<AlertBlock> = None;
    for line in rules.lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            blocks.extend(current.take());
            current = Some(AlertBlock {
                name: name.trim().to_string(),
                text: String::new(),
            });
        } else if t.starts_with("- record:") || t.starts_with("- name:") {
            blocks.extend(current.take());
        } else if let Some(block) = current.as_mut() {
            block.text.push_str(line);
            block.text.push('\n');
        }
    }
    blocks.extend(current);
    blocks
}

fn recorded_names(rules: &str) -> BTreeSet<String> {
    rules
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- record:"))
        .map(|n| n.trim().to_string())
        .collect()
}

/// Every `expr:` in a rules file, with block scalars (`|`, `>`) joined into one string.
fn rule_exprs(rules: &str) -> Vec<String> {
    let lines: Vec<&str> = rules.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if let Some(rest) = line.trim_start().strip_prefix("expr:") {
            let rest = rest.trim();
            if rest.starts_with('|') || rest.starts_with('>') {
                let mut body = String::new();
                i += 1;
                while i < lines.len()
                    && (lines[i].trim().is_empty() || indent(lines[i]) > indent(line))
                {
                    body.push_str(lines[i].trim());
                    body.push(' ');
                    i += 1;
                }
                exprs.push(body);
                continue;
            }
            exprs.push(rest.trim_matches(['"', '\'']).to_string());
        }
        i += 1;
    }
    exprs
}

/// GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens.
fn github_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

// ------------------------------------------------------------------------------------------ promtool

#[test]
fn promtool_accepts_the_rule_file() {
    run_promtool(&["check", "rules", rules_file().to_str().unwrap()]);
}

#[test]
fn the_rule_unit_tests_pass() {
    run_promtool(&["test", "rules", rules_test_file().to_str().unwrap()]);
}

#[test]
fn every_panel_query_parses_as_promql() {
    // promtool has no stand-alone PromQL parser in 2.42, so each expanded panel query becomes a recording
    // rule of a throw-away rule file that `promtool check rules` must accept.
    let queries =
        promql::concrete_panel_queries(&promql::grafana_dir(), &promql::default_variables())
            .unwrap();
    let mut yaml = String::from("groups:\n  - name: panel-queries\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        // JSON strings are valid YAML double-quoted scalars.
        yaml.push_str(&format!(
            "      # {} / {}\n      - record: panel_query_{i}\n        expr: {}\n",
            q.dashboard,
            q.panel.replace('\n', " "),
            serde_json::to_string(&q.expr).unwrap()
        ));
    }
    let dir = std::env::temp_dir().join(format!("gainguard-panel-queries-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("panels.rules.yml");
    std::fs::write(&file, yaml).unwrap();
    run_promtool(&["check", "rules", file.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).ok();
}

// ----------------------------------------------------------------------------------------- the alerts

#[test]
fn every_alert_has_severity_summary_description_and_a_runbook_section() {
    let rules = read(&rules_file());
    let runbook = read(&root().join("docs/runbook.md"));
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## ").or_else(|| l.strip_prefix("### ")))
        .map(github_anchor)
        .collect();
    let alerts = alert_blocks(&rules);
    assert!(
        alerts.len() >= 12,
        "expected the full alert set, found {}",
        alerts.len()
    );
    for alert in &alerts {
        for field in ["severity:", "summary:", "description:", "runbook_url:"] {
            assert!(
                alert.text.contains(field),
                "alert {} has no `{field}`",
                alert.name
            );
        }
        let url_line = alert
            .text
            .lines()
            .find(|l| l.contains("runbook_url:"))
            .unwrap();
        let anchor = url_line
            .split_once("docs/runbook.md#")
            .map(|(_, a)| a.trim_end_matches(['"', '\'', ' ']))
            .unwrap_or_else(|| {
                panic!(
                    "alert {}: runbook_url does not point into docs/runbook.md: {url_line}",
                    alert.name
                )
            });
        assert_eq!(
            anchor,
            alert.name.to_lowercase(),
            "alert {}: runbook anchor",
            alert.name
        );
        assert!(
            anchors.contains(anchor),
            "docs/runbook.md has no section with anchor #{anchor} (alert {})",
            alert.name
        );
        for label in ["$labels.", "$value"] {
            if alert.name != "ExporterDown" && alert.name != "NvmlDown" {
                assert!(
                    alert.text.contains(label),
                    "alert {}: the description should template `{label}`",
                    alert.name
                );
            }
        }
    }
}

#[test]
fn every_alert_is_unit_tested_firing_and_silent() {
    let rules = read(&rules_file());
    let tests = read(&rules_test_file());
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    let mut current = String::new();
    for line in tests.lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("alertname:") {
            current = name.trim().to_string();
        } else if t.starts_with("exp_alerts: []") {
            silent.insert(current.clone());
        } else if t.starts_with("- exp_labels:") {
            fires.insert(current.clone());
        }
    }
    for alert in alert_blocks(&rules) {
        assert!(
            fires.contains(&alert.name),
            "no unit test in which {} fires",
            alert.name
        );
        assert!(
            silent.contains(&alert.name),
            "no unit test in which {} stays silent",
            alert.name
        );
    }
}

#[test]
fn gain_drift_bands_are_set_by_recording_rules() {
    let rules = read(&rules_file());
    let recorded = recorded_names(&rules);
    for band in [
        "gainguard:gain_drift_band_lower",
        "gainguard:gain_drift_band_upper",
        "gainguard:gain_drift_severe_band_lower",
        "gainguard:gain_drift_severe_band_upper",
    ] {
        assert!(recorded.contains(band), "missing recording rule {band}");
    }
    for alert in alert_blocks(&rules)
        .iter()
        .filter(|a| a.name.starts_with("GainDrift"))
    {
        assert!(
            alert.text.contains("gain_drift"),
            "{} does not read its band from the recording rules",
            alert.name
        );
    }
}

// --------------------------------------------------------------------------------------- the dashboards

fn dashboards() -> Vec<(String, Value)> {
    promql::dashboard_files(&promql::grafana_dir())
        .unwrap()
        .into_iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                promql::load_dashboard(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_three_dashboards_exist_with_a_modern_schema() {
    let names: BTreeSet<String> = dashboards().into_iter().map(|(n, _)| n).collect();
    for expected in [
        "gainguard-overview.json",
        "gainguard-gain.json",
        "gainguard-gpu.json",
    ] {
        assert!(
            names.contains(expected),
            "dashboards/grafana/{expected} is missing"
        );
    }
    for (name, d) in dashboards() {
        let schema = d["schemaVersion"].as_u64().unwrap_or(0);
        assert!(schema >= 38, "{name}: schemaVersion {schema} < 38");
        assert!(
            d["uid"].as_str().is_some_and(|u| !u.is_empty()),
            "{name}: no uid"
        );
    }
}

#[test]
fn every_panel_has_a_unit_and_uses_the_datasource_variable() {
    for (name, d) in dashboards() {
        let panels = promql::panels(&d);
        assert!(!panels.is_empty(), "{name} has no panels");
        for p in panels {
            let title = p["title"].as_str().unwrap_or("?");
            let unit = p["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("");
            assert!(
                !unit.is_empty(),
                "{name}: panel `{title}` has no fieldConfig.defaults.unit"
            );
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{name}: panel `{title}` datasource"
            );
            for t in p["targets"].as_array().into_iter().flatten() {
                assert_eq!(
                    t["datasource"]["uid"], "${datasource}",
                    "{name}: panel `{title}` target datasource"
                );
            }
        }
    }
}

#[test]
fn every_target_has_an_expr() {
    for (name, d) in dashboards() {
        for p in promql::panels(&d) {
            let title = p["title"].as_str().unwrap_or("?");
            let targets = p["targets"]
                .as_array()
                .unwrap_or_else(|| panic!("{name}: panel `{title}` has no targets"));
            assert!(
                !targets.is_empty(),
                "{name}: panel `{title}` has no targets"
            );
            for t in targets {
                let expr = t["expr"].as_str().unwrap_or("");
                assert!(
                    !expr.trim().is_empty(),
                    "{name}: panel `{title}` target {} has no expr",
                    t["refId"]
                );
            }
        }
    }
}

#[test]
fn every_dashboard_has_the_template_variables() {
    for (name, d) in dashboards() {
        let vars: BTreeMap<String, &Value> = d["templating"]["list"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no templating.list"))
            .iter()
            .map(|v| (v["name"].as_str().unwrap_or("").to_string(), v))
            .collect();
        let ds = vars
            .get("datasource")
            .unwrap_or_else(|| panic!("{name}: no `datasource` variable"));
        assert_eq!(ds["type"], "datasource", "{name}: datasource variable type");
        assert_eq!(
            ds["query"], "prometheus",
            "{name}: datasource variable plugin"
        );
        for v in ["run", "rank", "host"] {
            let var = vars
                .get(v)
                .unwrap_or_else(|| panic!("{name}: no `{v}` variable"));
            assert_eq!(var["type"], "query", "{name}: `{v}` type");
            assert_eq!(var["multi"], true, "{name}: `{v}` must be multi-value");
            assert_eq!(var["includeAll"], true, "{name}: `{v}` must include All");
            let query = var["definition"]
                .as_str()
                .or(var["query"]["query"].as_str())
                .or(var["query"].as_str())
                .unwrap_or("");
            assert!(
                query.starts_with("label_values("),
                "{name}: `{v}` should be a label_values query, is `{query}`"
            );
            assert!(
                query.contains(&format!("{v})")),
                "{name}: `{v}` should list the `{v}` label, is `{query}`"
            );
        }
        let param = vars
            .get("param")
            .unwrap_or_else(|| panic!("{name}: no `param` variable"));
        assert_eq!(param["type"], "textbox", "{name}: `param` type");
        assert_eq!(param["query"], ".*", "{name}: `param` default");
    }
}

/// The metric names the dashboards and rules may use: the exported contract (from `docs/metrics.md` when
/// it exists, otherwise the list in `tests/support/src/promql.rs`), Prometheus's own `up`, and recorded names.
fn allowed_metric_names() -> (BTreeSet<String>, &'static str) {
    let mut allowed: BTreeSet<String> = BTreeSet::new();
    let metrics_md = root().join("docs/metrics.md");
    let source = if let Ok(text) = std::fs::read_to_string(&metrics_md) {
        let mut word = String::new();
        for c in text.chars().chain(std::iter::once(' ')) {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                word.push(c);
            } else {
                if word.starts_with("gainguard_") {
                    allowed.insert(promql::histogram_base(&word).to_string());
                    allowed.insert(word.clone());
                }
                word.clear();
            }
        }
        "docs/metrics.md"
    } else {
        allowed.extend(promql::CONTRACT_METRICS.iter().map(|s| s.to_string()));
        "tests/support/src/promql.rs"
    };
    allowed.extend(promql::PROMETHEUS_METRICS.iter().map(|s| s.to_string()));
    allowed.extend(recorded_names(&read(&rules_file())));
    (allowed, source)
}

#[test]
fn dashboards_and_rules_use_only_exported_or_recorded_metrics() {
    let (allowed, source) = allowed_metric_names();
    let mut unknown = Vec::new();
    for q in promql::panel_queries(&promql::grafana_dir()).unwrap() {
        for name in promql::metric_names(&q.expr) {
            if !allowed.contains(&name) && !allowed.contains(promql::histogram_base(&name)) {
                unknown.push(format!("{} / `{}`: {name}", q.dashboard, q.panel));
            }
        }
    }
    for expr in rule_exprs(&read(&rules_file())) {
        for name in promql::metric_names(&expr) {
            if !allowed.contains(&name) && !allowed.contains(promql::histogram_base(&name)) {
                unknown.push(format!("gainguard.rules.yml: {name} in `{expr}`"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metric names not in the contract ({source}) nor recorded by the rules:\n{}",
        unknown.join("\n")
    );
}

#[test]
fn template_variables_expand_to_concrete_promql() {
    let mut values = promql::default_variables();
    values.insert("run".into(), "target-w1024".into());
    let q = r#"sum by (run) (rate(gainguard_tokens_total{run=~"$run",rank=~"${rank}",host=~"[[host]]"}[$__rate_interval]))"#;
    assert_eq!(
        promql::substitute(q, &values).unwrap(),
        r#"sum by (run) (rate(gainguard_tokens_total{run=~"target-w1024",rank=~".*",host=~".*"}[1m]))"#
    );
    assert!(
        promql::substitute("x{a=\"$nope\"}", &values).is_err(),
        "an unknown variable must be an error"
    );
    // Every dashboard query expands with the default values, leaving no `$` behind.
    for q in promql::concrete_panel_queries(&promql::grafana_dir(), &values).unwrap() {
        assert!(
            !q.expr.contains('$'),
            "{} / `{}`: unexpanded variable in `{}`",
            q.dashboard,
            q.panel,
            q.expr
        );
    }
}

// ----------------------------------------------------------------------------------- a real Prometheus

#[test]
fn prometheus_loads_the_rules_and_answers_every_panel_query() {
    let binary = required("PROMETHEUS", "/usr/bin/prometheus", "prometheus");
    let prom = Prometheus::with_binary(&binary, PrometheusConfig { rules: Some(read(&rules_file())), ..Default::default() });

    // The server loaded every alert of the file.
    let rules: Value = serde_json::from_str(&prom.get("/api/v1/rules?type=alert")).unwrap();
    let loaded = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_array().unwrap().len())
        .sum::<usize>();
    assert_eq!(
        loaded,
        alert_blocks(&read(&rules_file())).len(),
        "alert rules loaded by Prometheus"
    );

    // Every panel query evaluates (an empty TSDB answers with no series, but a bad query is an error), and
    // the constant band rules already answer with one series each.
    let queries =
        promql::concrete_panel_queries(&promql::grafana_dir(), &promql::default_variables())
            .unwrap();
    let results = promql::evaluate_all(prom.addr, &queries).unwrap();
    assert_eq!(results.len(), queries.len());
    let deadline = Instant::now() + Duration::from_secs(30);
    while promql::instant_query(prom.addr, "gainguard:gain_drift_band_upper").unwrap() != 1 {
        assert!(
            Instant::now() < deadline,
            "the band recording rule never produced a series"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        promql::instant_query(prom.addr, "gainguard_no_such_metric{").is_err(),
        "a broken query must be an error"
    );
}

// ------------------------------------------------------------------------------- Grafana's own types

/// Runs `dashboards/typecheck.sh` on the dashboards in `dir`: whether it passed, and everything it printed.
fn typecheck(dir: &Path) -> (bool, String) {
    let script = root().join("dashboards/typecheck.sh");
    let out = Command::new(&script).arg(dir).output().unwrap_or_else(|e| {
        panic!("cannot run {}: {e} (it needs bash, and Node.js 20 with npm)", script.display())
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_dashboards_satisfy_grafanas_types_units_and_datasource() {
    let (ok, output) = typecheck(&promql::grafana_dir());
    assert!(ok, "dashboards/typecheck.sh rejected the dashboards:\n{output}");
    assert!(
        output.contains("3 dashboard(s)"),
        "the type check did not see the three dashboards:\n{output}"
    );
}

/// One deliberately broken copy of the overview dashboard.
struct Breakage {
    file: &'static str,
    panel: &'static str,
    /// JSON pointer, inside the panel, of the object that gets `key`.
    parent: &'static str,
    key: &'static str,
    value: Value,
    /// What the report must call the field, and a piece of its reason.
    field: &'static str,
    reason: &'static str,
}

#[test]
fn the_type_check_rejects_broken_dashboards_naming_dashboard_panel_and_field() {
    let cases = [
        Breakage {
            file: "unknown-unit.json",
            panel: "Loss",
            parent: "/fieldConfig/defaults",
            key: "unit",
            value: Value::from("bogus"),
            field: "fieldConfig.defaults.unit",
            reason: "`bogus` is not a Grafana unit id",
        },
        Breakage {
            file: "wrong-field-type.json",
            panel: "Tokens per second",
            parent: "/options/legend",
            key: "showLegend",
            value: Value::from("yes"),
            field: "options.legend.showLegend",
            reason: "not assignable to type 'boolean'",
        },
        Breakage {
            file: "unknown-enum-value.json",
            panel: "Trainer up",
            parent: "/options",
            key: "colorMode",
            value: Value::from("rainbow"),
            field: "options.colorMode",
            reason: "'\"rainbow\"' is not assignable",
        },
        Breakage {
            file: "misspelt-custom-field.json",
            panel: "Step time (p50 / p90 / p99)",
            parent: "/fieldConfig/defaults/custom",
            key: "lineWidht",
            value: Value::from(2),
            field: "fieldConfig.defaults.custom.lineWidht",
            reason: "does not exist in type",
        },
        Breakage {
            file: "foreign-datasource.json",
            panel: "Trainer up",
            parent: "/targets/0/datasource",
            key: "uid",
            value: Value::from("prod-prometheus"),
            field: "targets[0].datasource",
            reason: "expected {\"type\":\"prometheus\",\"uid\":\"${datasource}\"}",
        },
    ];
    let overview = promql::load_dashboard(&promql::grafana_dir().join("gainguard-overview.json")).unwrap();
    let dir = std::env::temp_dir().join(format!("gainguard-broken-dashboards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut expected = Vec::new();
    for case in &cases {
        let mut d = overview.clone();
        let panel = d["panels"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|p| p["title"] == case.panel)
            .unwrap_or_else(|| panic!("the overview dashboard has no panel `{}`", case.panel));
        let location = format!(
            "{}: panel {} {} ({}): {}",
            case.file,
            panel["id"],
            panel["title"],
            panel["type"].as_str().unwrap(),
            case.field
        );
        panel
            .pointer_mut(case.parent)
            .and_then(Value::as_object_mut)
            .unwrap_or_else(|| panic!("panel `{}` has no object at {}", case.panel, case.parent))
            .insert(case.key.to_string(), case.value.clone());
        std::fs::write(dir.join(case.file), serde_json::to_string_pretty(&d).unwrap()).unwrap();
        expected.push((case, location));
    }
    let (ok, output) = typecheck(&dir);
    std::fs::remove_dir_all(&dir).ok();
    assert!(!ok, "the type check accepted broken dashboards:\n{output}");
    for (case, location) in expected {
        let reports: Vec<&str> = output
            .lines()
            .filter(|l| l.starts_with(&format!("{}: ", case.file)))
            .collect();
        assert!(
            reports.len() == 1 && reports[0].starts_with(&location) && reports[0].contains(case.reason),
            "{}: expected exactly one report `{location}: …{}…`, got:\n{}\n\nwhole output:\n{output}",
            case.file,
            case.reason,
            reports.join("\n")
        );
    }
}

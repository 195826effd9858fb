//! The PromQL behind the Grafana dashboards, made concrete enough for a real Prometheus to evaluate.
//!
//! Grafana expands template variables (`$run`, `${rank}`, `$__rate_interval`, …) before it sends a query.
//! [`concrete_panel_queries`] does the same with fixed values, and [`evaluate_all`] sends each query to
//! Prometheus's `/api/v1/query` over a plain blocking HTTP/1.1 GET on loopback ([`crate::http`]), so an
//! end-to-end test can check that every panel shows data.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::http::{http_get, percent_encode};

/// Metric names the daemon exports (the contract), used when `docs/metrics.md` does not exist yet.
/// Histograms are listed by their base name; `_bucket`, `_sum` and `_count` are implied.
pub const CONTRACT_METRICS: &[&str] = &[
    // training
    "gainguard_step",
    "gainguard_loss",
    "gainguard_loss_nonfinite_total",
    "gainguard_tokens_total",
    "gainguard_step_duration_seconds",
    "gainguard_trainer_last_step_timestamp_seconds",
    "gainguard_trainer_up",
    "gainguard_progress_ratio",
    "gainguard_spectrum_samples_dropped_total",
    "gainguard_events_dropped_total",
    "gainguard_nonfinite_parameters",
    "gainguard_run_info",
    // optimizer
    "gainguard_param_learning_rate",
    "gainguard_param_weight_decay",
    "gainguard_param_width_multiplier",
    // spectra
    "gainguard_sigma_max",
    "gainguard_sigma_max_normalized",
    "gainguard_reference_sigma_max",
    "gainguard_gain_ratio",
    "gainguard_stable_rank",
    "gainguard_frobenius_norm",
    "gainguard_effective_rank",
    "gainguard_singular_value_quantile",
    "gainguard_update_ratio",
    "gainguard_spectrum_iterations",
    "gainguard_spectrum_nonfinite",
    "gainguard_spectrum_samples_total",
    "gainguard_spectrum_last_sample_timestamp_seconds",
    "gainguard_spectrum_sample_duration_seconds",
    // GPU (NVML)
    "gainguard_nvml_up",
    "gainguard_gpu_utilization_ratio",
    "gainguard_gpu_memory_utilization_ratio",
    "gainguard_gpu_memory_used_bytes",
    "gainguard_gpu_memory_total_bytes",
    "gainguard_gpu_power_watts",
    "gainguard_gpu_power_limit_watts",
    "gainguard_gpu_energy_joules_total",
    "gainguard_gpu_temperature_celsius",
    "gainguard_gpu_sm_clock_hertz",
    "gainguard_gpu_memory_clock_hertz",
    "gainguard_gpu_throttle_active",
    "gainguard_gpu_ecc_errors_total",
    "gainguard_gpu_xid_errors_total",
    "gainguard_gpu_process_memory_bytes",
    // daemon self
    "gainguard_ingest_events_total",
    "gainguard_ingest_rejected_total",
    "gainguard_ingest_connections",
    "gainguard_exported_series",
    "gainguard_runs",
    "gainguard_build_info",
];

/// Series Prometheus itself makes for every scrape target, which dashboards may use.
pub const PROMETHEUS_METRICS: &[&str] = &["up"];

/// One query of one dashboard panel.
#[derive(Clone, Debug, PartialEq)]
pub struct PanelQuery {
    /// File name of the dashboard, e.g. `gainguard-gain.json`.
    pub dashboard: String,
    pub panel: String,
    pub ref_id: String,
    pub expr: String,
}

/// What Prometheus answered for one panel query.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub panel: String,
    pub expr: String,
    /// Number of series (or 1 for a scalar / string result).
    pub series: usize,
}

pub fn grafana_dir() -> PathBuf {
    crate::workspace_root().join("dashboards").join("grafana")
}

/// The dashboard JSON files, sorted by name.
pub fn dashboard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("no dashboard JSON files in {}", dir.display());
    }
    Ok(files)
}

pub fn load_dashboard(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Every panel of a dashboard, including panels nested in collapsed rows.
pub fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: Option<&'a Vec<Value>>, out: &mut Vec<&'a Value>) {
        for p in list.into_iter().flatten() {
            out.push(p);
            walk(p.get("panels").and_then(Value::as_array), out);
        }
    }
    let mut out = Vec::new();
    walk(dashboard.get("panels").and_then(Value::as_array), &mut out);
    out
}

/// The raw (unexpanded) PromQL of every panel target in every dashboard under `dir`.
pub fn panel_queries(dir: &Path) -> Result<Vec<PanelQuery>> {
    let mut queries = Vec::new();
    for file in dashboard_files(dir)? {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let dashboard = load_dashboard(&file)?;
        for panel in panels(&dashboard) {
            let title = panel
                .get("title")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            for target in panel
                .get("targets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let expr = target.get("expr").and_then(Value::as_str).ok_or_else(|| {
                    anyhow!("{name}: panel `{title}` has a target without an `expr`")
                })?;
                queries.push(PanelQuery {
                    dashboard: name.clone(),
                    panel: title.clone(),
                    ref_id: target
                        .get("refId")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    expr: expr.to_string(),
                });
            }
        }
    }
    Ok(queries)
}

/// Values for the dashboards' variables and Grafana's built-ins: every selector matches everything, and the
/// interval variables get values that suit a 15s scrape interval.
pub fn default_variables() -> BTreeMap<String, String> {
    [
        ("datasource", "prometheus"),
        ("run", ".*"),
        ("rank", ".*"),
        ("host", ".*"),
        ("param", ".*"),
        ("__rate_interval", "1m"),
        ("__interval", "15s"),
        ("__interval_ms", "15000"),
        ("__range", "1h"),
        ("__range_s", "3600"),
        ("__range_ms", "3600000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Expands Grafana template variables in `expr`: `$name`, `${name}`, `${name:format}` and `[[name]]`.
/// A variable without a value is an error, so that a new dashboard variable cannot slip through untested.
pub fn substitute(expr: &str, values: &BTreeMap<String, String>) -> Result<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let lookup = |name: &str| {
        values
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("no value for template variable `{name}` in `{expr}`"))
    };
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find(['$', '[']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(body) = tail.strip_prefix("${") {
            let end = body
                .find('}')
                .ok_or_else(|| anyhow!("unclosed `${{` in `{expr}`"))?;
            let name = body[..end].split(':').next().unwrap_or("");
            out.push_str(&lookup(name)?);
            rest = &body[end + 1..];
        } else if let Some(body) = tail.strip_prefix("[[") {
            let end = body
                .find("]]")
                .ok_or_else(|| anyhow!("unclosed `[[` in `{expr}`"))?;
            out.push_str(&lookup(body[..end].split(':').next().unwrap_or(""))?);
            rest = &body[end + 2..];
        } else if let Some(body) = tail.strip_prefix('$') {
            let len = body.find(|c: char| !is_name(c)).unwrap_or(body.len());
            if len == 0 {
                out.push('$');
            } else {
                out.push_str(&lookup(&body[..len])?);
            }
            rest = &body[len..];
        } else {
            // A plain `[`, e.g. a range selector.
            out.push('[');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Every panel query with its template variables expanded from `values`.
pub fn concrete_panel_queries(
    dir: &Path,
    values: &BTreeMap<String, String>,
) -> Result<Vec<PanelQuery>> {
    panel_queries(dir)?
        .into_iter()
        .map(|q| {
            let expr = substitute(&q.expr, values)
                .with_context(|| format!("{}: panel `{}`", q.dashboard, q.panel))?;
            Ok(PanelQuery { expr, ..q })
        })
        .collect()
}

/// Evaluates every query at the server's current time through `GET /api/v1/query` on the Prometheus at
/// `prometheus` (a loopback address) and returns how many series each one produced.
pub fn evaluate_all(prometheus: SocketAddr, queries: &[PanelQuery]) -> Result<Vec<Evaluation>> {
    queries
        .iter()
        .map(|q| {
            let series = instant_query(prometheus, &q.expr)
                .with_context(|| format!("{}: panel `{}`: `{}`", q.dashboard, q.panel, q.expr))?;
            Ok(Evaluation {
                panel: q.panel.clone(),
                expr: q.expr.clone(),
                series,
            })
        })
        .collect()
}

/// Number of series an instant query returns. A query Prometheus refuses is an error.
pub fn instant_query(prometheus: SocketAddr, expr: &str) -> Result<usize> {
    let path = format!("/api/v1/query?query={}", percent_encode(expr));
    let (status, body) = http_get(prometheus, &path).with_context(|| format!("GET {path} from {prometheus}"))?;
    // Prometheus puts its error JSON in 400/422 bodies.
    if !(200..500).contains(&status) {
        bail!("GET {path}: HTTP {status}: {body}");
    }
    let answer: Value = serde_json::from_str(&body)
        .with_context(|| format!("Prometheus answered non-JSON: {body}"))?;
    if answer["status"] != "success" {
        bail!(
            "Prometheus error {}: {}",
            answer["errorType"],
            answer["error"]
        );
    }
    match answer["data"]["resultType"].as_str() {
        Some("vector") | Some("matrix") => {
            Ok(answer["data"]["result"].as_array().map_or(0, Vec::len))
        }
        Some("scalar") | Some("string") => Ok(1),
        other => bail!("unexpected resultType {other:?} in {body}"),
    }
}

/// Metric names a PromQL expression selects (including recording-rule names), in order of appearance.
///
/// This is a lexer, not a parser: it drops string literals, label matchers `{…}`, range and subquery
/// brackets `[…]`, grouping label lists after `by`/`without`/`on`/`ignoring`/`group_left`/`group_right`,
/// function calls and keywords; what is left of the identifiers are metric names.
pub fn metric_names(expr: &str) -> Vec<String> {
    // Words before a parenthesised label list; keywords too.
    const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    const KEYWORDS: &[&str] = &[
        "bool", "and", "or", "unless", "offset", "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
        "count_values", "bottomk", "topk", "quantile", "inf", "nan", "atan2", "start", "end",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let mut last_word = String::new();
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            // string literal
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c == '{' || c == '[' {
            let close = if c == '{' { '}' } else { ']' };
            while i < chars.len() && chars[i] != close {
                if chars[i] == '"' {
                    i += 1;
                    while i < chars.len() && chars[i] != '"' {
                        if chars[i] == '\\' {
                            i += 1;
                        }
                        i += 1;
                    }
                }
                i += 1;
            }
            i += 1;
        } else if c == '(' && GROUPING.contains(&last_word.as_str()) {
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            i += 1;
            last_word.clear();
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let is_call = j < chars.len() && chars[j] == '(';
            let lower = word.to_ascii_lowercase();
            // `offset 5m`, `1e3` and similar: the previous token decides.
            let after_offset = last_word == "offset";
            if !is_call && !KEYWORDS.contains(&lower.as_str()) && !GROUPING.contains(&lower.as_str()) && !after_offset {
                names.push(word.clone());
            }
            last_word = lower;
        } else if c.is_ascii_digit() || c == '.' {
            // number or duration (5m, 1e-3, 0x1F)
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            last_word.clear();
        } else {
            if !c.is_whitespace() {
                last_word.clear();
            }
            i += 1;
        }
    }
    names
}

/// Strips the series suffixes Prometheus adds to a histogram or summary.
pub fn histogram_base(name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            return base;
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metric_name_lexer_finds_selectors_and_nothing_else() {
        let expr = r#"histogram_quantile(0.9, sum by (run, le) (rate(a_bucket{x="y{z}",run=~"$run"}[5m])))
        / on (run) group_left (class) b:rec offset 5m > bool 1 or max without (le) (c) unless time() - d"#;
        assert_eq!(metric_names(expr), ["a_bucket", "b:rec", "c", "d"]);
        assert_eq!(histogram_base("a_bucket"), "a");
    }
}
